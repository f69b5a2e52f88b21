//! Steering adapters: list (GET /adapters), load or reload (POST
//! /adapters/{name}/load) and unload (DELETE /adapters/{name}).

use super::error::{ApiError, PathSegment};
use super::protocol::ErrorResponse;
use super::AppState;
use crate::steering::adapter::{Distribution, LoraConfig};
use crate::steering::Adapter;
use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AdapterInfo {
    pub name: String,
    /// Increases with every load; in-flight requests keep the version they began with.
    pub version: u64,
    pub base_model: String,
    pub attribute: String,
    pub values: Vec<String>,
    pub default_target: Distribution,
    pub context_targets: BTreeMap<String, Distribution>,
    #[schema(value_type = Option<Object>)]
    pub lora: Option<LoraConfig>,
    #[schema(value_type = Object)]
    pub training: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AdapterList {
    pub object: String,
    pub data: Vec<AdapterInfo>,
}

fn info(a: &Adapter) -> AdapterInfo {
    AdapterInfo {
        name: a.name.clone(),
        version: a.version,
        base_model: a.config.base_model.name.clone(),
        attribute: a.config.attribute.name.clone(),
        values: a.config.value_names(),
        default_target: a.config.targets.default.clone(),
        context_targets: a.config.targets.contexts.clone(),
        lora: a.config.lora.clone(),
        training: a.config.training.clone(),
    }
}

#[utoipa::path(get, path = "/adapters", tag = "Steering",
    responses((status = 200, body = AdapterList), (status = 503, body = ErrorResponse)))]
pub async fn list(State(state): State<Arc<AppState>>) -> Result<Json<AdapterList>, ApiError> {
    let data = state.registry()?.list().iter().map(|a| info(a)).collect();
    Ok(Json(AdapterList {
        object: "list".into(),
        data,
    }))
}

#[utoipa::path(post, path = "/adapters/{name}/load", tag = "Steering",
    params(("name" = String, Path, description = "Adapter folder name under the adapters directory", pattern = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")),
    responses((status = 200, description = "Loaded (or reloaded as a new version)", body = AdapterInfo),
              (status = 400, description = "Damaged or mismatched; nothing changed", body = ErrorResponse),
              (status = 401, body = ErrorResponse), (status = 403, body = ErrorResponse),
              (status = 404, description = "No such adapter folder", body = ErrorResponse)))]
pub async fn load(
    State(state): State<Arc<AppState>>,
    PathSegment(name): PathSegment,
) -> Result<Json<AdapterInfo>, ApiError> {
    let registry = state.registry()?;
    crate::steering::registry::check_name(&name)
        .map_err(|e| ApiError::invalid("name", e.to_string()))?;
    if !registry.dir().join(&name).is_dir() {
        return Err(ApiError::not_found(format!(
            "no adapter folder `{name}` in {}",
            registry.dir().display()
        )));
    }
    let state2 = state.clone();
    let name2 = name.clone();
    let loaded = tokio::task::spawn_blocking(move || state2.registry().map(|r| r.load(&name2)))
        .await
        .map_err(|e| ApiError::internal(format!("adapter load failed: {e}")))??;
    let adapter = loaded.map_err(|e| ApiError::invalid("name", format!("{e:#}")))?;
    tracing::info!(adapter = %name, version = adapter.version, "adapter loaded");
    Ok(Json(info(&adapter)))
}

#[utoipa::path(delete, path = "/adapters/{name}", tag = "Steering",
    params(("name" = String, Path, description = "Adapter name")),
    responses((status = 200, description = "Unloaded; requests in flight finish on it", body = AdapterInfo),
              (status = 401, body = ErrorResponse), (status = 403, body = ErrorResponse),
              (status = 404, body = ErrorResponse)))]
pub async fn unload(
    State(state): State<Arc<AppState>>,
    PathSegment(name): PathSegment,
) -> Result<Json<AdapterInfo>, ApiError> {
    let removed = state
        .registry()?
        .unload(&name)
        .ok_or_else(|| ApiError::model_not_found(&name))?;
    tracing::info!(adapter = %name, "adapter unloaded");
    Ok(Json(info(&removed)))
}
