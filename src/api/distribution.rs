//! The served distribution: GET /distribution/report (JSON, or HTML for
//! `Accept: text/html`), GET /distribution (the page), POST
//! /distribution/reset.

use super::error::{ApiError, Query};
use super::protocol::ErrorResponse;
use super::AppState;
use crate::monitor::report::{Report, WindowKind};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::{IntoParams, ToSchema};

#[derive(Debug, Deserialize, IntoParams)]
pub struct ReportQuery {
    /// Only this adapter.
    pub adapter: Option<String>,
    /// Only this context.
    pub context: Option<String>,
    /// `count` (last N rounds) or `time` (last T seconds); default both.
    pub window: Option<WindowKind>,
}

async fn build(state: &AppState, q: &ReportQuery) -> Report {
    state
        .report(q.adapter.as_deref(), q.context.as_deref(), q.window)
        .await
}

#[utoipa::path(get, path = "/distribution/report", tag = "Steering", params(ReportQuery),
    responses((status = 200, description = "Per adapter and context: n, target, drawn and detected shares with Wilson intervals, consistency, MAE, KL, TV, JS, chi-square, status", body = Report),
              (status = 400, body = ErrorResponse)))]
pub async fn report(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<ReportQuery>,
) -> Response {
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    let report = build(&state, &q).await;
    if wants_html {
        Html(crate::monitor::html::render(&report)).into_response()
    } else {
        Json(report).into_response()
    }
}

#[utoipa::path(get, path = "/distribution", tag = "Steering", params(ReportQuery),
    responses((status = 200, description = "The report as an HTML page with inline SVG charts", content_type = "text/html"),
              (status = 400, body = ErrorResponse)))]
pub async fn page(
    State(state): State<Arc<AppState>>,
    Query(q): Query<ReportQuery>,
) -> Html<String> {
    Html(crate::monitor::html::render(&build(&state, &q).await))
}

#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
pub struct ResetRequest {
    /// Only this adapter (default: all).
    pub adapter: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ResetResponse {
    pub reset: String,
}

#[utoipa::path(post, path = "/distribution/reset", tag = "Steering", request_body(content = Option<ResetRequest>),
    responses((status = 200, description = "Windows and balanced counts cleared", body = ResetResponse),
              (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse),
              (status = 403, body = ErrorResponse),
              (status = 503, description = "Fleet mode and Redis unreachable: nothing was reset", body = ErrorResponse)))]
pub async fn reset(
    State(state): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<Json<ResetResponse>, ApiError> {
    // No body, or `null`, resets everything.
    let req: Option<ResetRequest> = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("Invalid reset request: {e}")))?
    };
    let req = req.unwrap_or_default();
    state.reset_distribution(req.adapter.as_deref()).await?;
    Ok(Json(ResetResponse {
        reset: req.adapter.unwrap_or_else(|| "all".into()),
    }))
}
