//! GET /v1/models and /v1/models/{id}: the base model and every adapter.

use super::error::{ApiError, PathSegment};
use super::protocol::{ErrorResponse, Model, ModelList};
use super::AppState;
use axum::extract::State;
use axum::Json;
use std::sync::Arc;

fn served(state: &AppState) -> Vec<Model> {
    let mut models = vec![Model {
        id: state.model_id.clone(),
        object: "model".into(),
        created: state.started,
        owned_by: "steerling".into(),
        parent: None,
    }];
    if let Some(registry) = state.registry.get() {
        models.extend(registry.list().iter().map(|a| Model {
            id: a.name.clone(),
            object: "model".into(),
            created: state.started,
            owned_by: "steerling".into(),
            parent: Some(state.model_id.clone()),
        }));
    }
    models
}

#[utoipa::path(get, path = "/v1/models", tag = "OpenAI",
    responses((status = 200, body = ModelList), (status = 401, body = ErrorResponse)))]
pub async fn list(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: served(&state),
    })
}

#[utoipa::path(get, path = "/v1/models/{id}", tag = "OpenAI",
    params(("id" = String, Path, description = "Model id")),
    responses((status = 200, body = Model), (status = 404, body = ErrorResponse)))]
pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    PathSegment(id): PathSegment,
) -> Result<Json<Model>, ApiError> {
    served(&state)
        .into_iter()
        .find(|m| m.id == id)
        .map(Json)
        .ok_or_else(|| ApiError::model_not_found(&id))
}
