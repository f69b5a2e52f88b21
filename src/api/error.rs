//! Every failure as the OpenAI error envelope, with its status: the one place
//! where errors become HTTP.

use super::protocol::{ErrorBody, ErrorResponse, SamplingFields};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(
        status: StatusCode,
        kind: &'static str,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code,
            retry_after: None,
        }
    }

    /// 400 naming the offending parameter.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("invalid_value"),
                message,
            )
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            message,
        )
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            param: Some("model".into()),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
                format!("The model `{model}` does not exist; see GET /v1/models"),
            )
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("not_found"),
            message,
        )
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            Some("method_not_allowed"),
            "This method is not allowed on this route",
        )
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            Some("invalid_api_key"),
            "Missing or invalid API key; send `Authorization: Bearer <key>`",
        )
    }

    pub fn admin_disabled() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            Some("admin_disabled"),
            "Admin endpoints are off: start the server with --admin-key (or bind it to loopback)",
        )
    }

    pub fn overloaded(retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("server_overloaded"),
                "The server is at capacity; retry shortly",
            )
        }
    }

    /// A dependency (Redis in fleet mode) cannot be reached; nothing changed.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("unavailable"),
                message,
            )
        }
    }

    pub fn not_ready() -> Self {
        Self {
            retry_after: Some(5),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("not_ready"),
                "The model is still loading",
            )
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            Some("internal_error"),
            message,
        )
    }

    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorBody {
                message: self.message.clone(),
                kind: self.kind.to_string(),
                param: self.param.clone(),
                code: self.code.map(str::to_string),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// A JSON body whose errors are ours: wrong content type (415), too large
/// (413), malformed (400), or a field of the wrong type (400 naming it).
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
            });
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                Some("unsupported_media_type"),
                "Expected `Content-Type: application/json`",
            ));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "invalid_request_error",
                        Some("request_too_large"),
                        "The request body is larger than this server accepts",
                    )
                } else {
                    ApiError::bad_request(format!("Cannot read the request body: {e}"))
                }
            })?;
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::bad_request(format!("The request body is not valid JSON: {e}"))
        })?;
        let value = serde_path_to_error::deserialize::<_, T>(value.clone()).map_err(|e| {
            let path = e.path().to_string();
            let text = e.into_inner().to_string();
            if let Some(field) = text
                .strip_prefix("missing field `")
                .and_then(|t| t.split('`').next())
            {
                return ApiError::invalid(field, format!("Missing required parameter `{field}`"));
            }
            if path != "." && !path.is_empty() {
                return ApiError::invalid(&path, format!("Invalid `{path}`: {text}"));
            }
            // serde loses the path inside #[serde(flatten)], which the shared
            // sampling fields use: look for the culprit there.
            if let Err(inner) = serde_path_to_error::deserialize::<_, SamplingFields>(value) {
                let path = inner.path().to_string();
                if path != "." && !path.is_empty() {
                    return ApiError::invalid(
                        &path,
                        format!("Invalid `{path}`: {}", inner.into_inner()),
                    );
                }
            }
            ApiError::bad_request(format!("Invalid request: {text}"))
        })?;
        Ok(Json(value))
    }
}

/// Query parameters whose errors are ours (400 in the envelope, naming the
/// parameter when serde can).
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(Query)
            .map_err(|e| {
                let path = e.path().to_string();
                let text = e.into_inner().to_string();
                if path != "." && !path.is_empty() {
                    ApiError::invalid(&path, format!("Invalid query parameter `{path}`: {text}"))
                } else {
                    ApiError::bad_request(format!("Invalid query: {text}"))
                }
            })
    }
}

/// One path segment as text; a segment that is not UTF-8 is a 400 in the
/// envelope, not axum's plain-text rejection.
pub struct PathSegment(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathSegment {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(s)| PathSegment(s))
            .map_err(|e| ApiError::bad_request(format!("Invalid path: {}", e.body_text())))
    }
}
