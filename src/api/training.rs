//! Training jobs over HTTP (admin): POST /adapters/train (202 with the job),
//! GET /adapters/train/{id}, GET /adapters/train/{id}/events (SSE), DELETE
//! /adapters/train/{id} (cancel).

use super::error::{ApiError, Json, PathSegment};
use super::protocol::ErrorResponse;
use super::AppState;
use crate::training::jobs::{JobError, JobRequest, JobStatus, Jobs};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use std::convert::Infallible;
use std::sync::Arc;

/// Bounds on what one job may ask for.
const MAX_STEPS: usize = 20_000;
const MAX_BATCH: usize = 64;
const MAX_LEN: usize = 2048;
const MAX_EXAMPLES: usize = 100_000;
/// Values of the attribute: one steering token each.
const MAX_VALUES: usize = 64;

fn jobs(state: &AppState) -> Result<&Arc<Jobs>, ApiError> {
    state.engine()?;
    state
        .training
        .get()
        .ok_or_else(|| ApiError::bad_request("training is not available on this server"))
}

/// Everything checkable before the job is queued.
fn check(req: &JobRequest) -> Result<(), ApiError> {
    crate::steering::registry::check_name(&req.name)
        .map_err(|e| ApiError::invalid("name", e.to_string()))?;
    let s = &req.settings;
    if s.sft_steps + s.kl_steps == 0 || s.sft_steps + s.kl_steps > MAX_STEPS {
        return Err(ApiError::invalid(
            "settings",
            format!("total steps must be between 1 and {MAX_STEPS}"),
        ));
    }
    if s.batch == 0 || s.batch > MAX_BATCH || s.max_len > MAX_LEN || s.rank == 0 || s.rank > 256 {
        return Err(ApiError::invalid(
            "settings",
            format!("batch 1–{MAX_BATCH}, rank 1–256 and max_len ≤ {MAX_LEN}"),
        ));
    }
    if req.data.values.len() > MAX_VALUES {
        return Err(ApiError::invalid(
            "data",
            format!("{} values; at most {MAX_VALUES}", req.data.values.len()),
        ));
    }
    let examples = req.data.prompts.len()
        + req.data.held_out.len()
        + req.data.responses.values().map(Vec::len).sum::<usize>();
    if examples > MAX_EXAMPLES {
        return Err(ApiError::invalid(
            "data",
            format!("{examples} prompts and responses; at most {MAX_EXAMPLES}"),
        ));
    }
    let base = crate::steering::adapter::BaseModel {
        name: String::new(),
        sha256: String::new(),
    };
    let config = crate::training::trainer::adapter_config(&req.data, s, base);
    config
        .validate()
        .map_err(|e| ApiError::invalid("data", format!("{e:#}")))?;
    let detector = crate::steering::Detector::new(&config)
        .map_err(|e| ApiError::invalid("data", format!("{e:#}")))?;
    req.data
        .clone()
        .validate(|t| detector.detect(t))
        .map_err(|e| ApiError::invalid("data", format!("{e:#}")))?;
    Ok(())
}

#[utoipa::path(post, path = "/adapters/train", tag = "Steering", request_body = JobRequest,
    responses((status = 202, description = "Queued", body = JobStatus),
              (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse), (status = 403, body = ErrorResponse),
              (status = 429, description = "The training queue is full", body = ErrorResponse)))]
pub async fn submit(
    State(state): State<Arc<AppState>>,
    Json(req): Json<JobRequest>,
) -> Result<Response, ApiError> {
    let jobs = jobs(&state)?;
    check(&req)?;
    let status = jobs.submit(req).map_err(|e| match e {
        JobError::QueueFull(_) => ApiError {
            message: e.to_string(),
            ..ApiError::overloaded(30)
        },
    })?;
    Ok((StatusCode::ACCEPTED, axum::Json(status)).into_response())
}

#[utoipa::path(get, path = "/adapters/train/{id}", tag = "Steering", params(("id" = String, Path, description = "Job id")),
    responses((status = 200, body = JobStatus), (status = 404, body = ErrorResponse)))]
pub async fn status(
    State(state): State<Arc<AppState>>,
    PathSegment(id): PathSegment,
) -> Result<axum::Json<JobStatus>, ApiError> {
    jobs(&state)?
        .status(&id)
        .map(axum::Json)
        .ok_or_else(|| ApiError::not_found(format!("no training job `{id}`")))
}

#[utoipa::path(delete, path = "/adapters/train/{id}", tag = "Steering", params(("id" = String, Path, description = "Job id")),
    responses((status = 200, description = "Cancelled (a running job stops at its next step)", body = JobStatus), (status = 404, body = ErrorResponse)))]
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    PathSegment(id): PathSegment,
) -> Result<axum::Json<JobStatus>, ApiError> {
    jobs(&state)?
        .cancel(&id)
        .map(axum::Json)
        .ok_or_else(|| ApiError::not_found(format!("no training job `{id}`")))
}

#[utoipa::path(get, path = "/adapters/train/{id}/events", tag = "Steering", params(("id" = String, Path, description = "Job id")),
    responses((status = 200, description = "SSE: the job's status after every change, until it ends", content_type = "text/event-stream"),
              (status = 404, body = ErrorResponse)))]
pub async fn events(
    State(state): State<Arc<AppState>>,
    PathSegment(id): PathSegment,
) -> Result<Response, ApiError> {
    let rx = jobs(&state)?
        .watch(&id)
        .ok_or_else(|| ApiError::not_found(format!("no training job `{id}`")))?;
    let stream = futures::stream::unfold(Some(rx), |rx| async move {
        let mut rx = rx?;
        let status = rx.borrow_and_update().clone();
        let event = Event::default().data(serde_json::to_string(&status).unwrap_or_default());
        if status.state.is_final() {
            return Some((event, None));
        }
        // Wait for the next change (a closed channel ends the stream).
        let next = if rx.changed().await.is_ok() {
            Some(rx)
        } else {
            None
        };
        Some((event, next))
    })
    .map(Ok::<_, Infallible>);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
