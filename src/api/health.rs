//! Liveness, readiness and Prometheus metrics.

use super::error::ApiError;
use super::protocol::{ErrorResponse, Health};
use super::AppState;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use std::sync::Arc;

#[utoipa::path(get, path = "/health", tag = "Operations",
    responses((status = 200, description = "The process is up", body = Health)))]
pub async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

#[utoipa::path(get, path = "/ready", tag = "Operations",
    responses((status = 200, description = "The model is loaded", body = Health),
              (status = 503, description = "Still loading", body = ErrorResponse)))]
pub async fn ready(State(state): State<Arc<AppState>>) -> Result<Json<Health>, ApiError> {
    state.engine()?;
    Ok(Json(Health {
        status: "ok".into(),
    }))
}

#[utoipa::path(get, path = "/metrics", tag = "Operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    if let Some(engine) = state.engine.get() {
        // Fresh values, also when the engine is idle between steps.
        metrics::gauge!(crate::metrics::RUNNING).set(engine.running() as f64);
        metrics::gauge!(crate::metrics::WAITING).set(engine.waiting() as f64);
    }
    state.monitor.update_gauges();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
