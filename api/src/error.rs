//! One mapping from an API error to goim's envelope and an HTTP status.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A parameter is missing or invalid (HTTP 400, code -400).
    #[error("{0}")]
    BadRequest(String),
    /// The body is larger than `api.max_body` (HTTP 413, code -400).
    #[error("request body exceeds {0} bytes")]
    TooLarge(usize),
    /// Missing or wrong admin token (HTTP 401, code -401).
    #[error("{0}")]
    Unauthorized(String),
    /// The router, the queue or a comet failed (HTTP 503, code -500).
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, i32) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, -400),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, -400),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, -401),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, -500),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::warn!(reason = %self, "request failed");
        }
        (
            status,
            Json(json!({ "code": code, "message": self.to_string(), "data": null })),
        )
            .into_response()
    }
}

impl From<rim_router::Error> for ApiError {
    fn from(err: rim_router::Error) -> Self {
        ApiError::Unavailable(format!("router: {err}"))
    }
}

/// A successful answer in goim's envelope.
pub(crate) fn ok<T: serde::Serialize>(data: T) -> Response {
    Json(json!({ "code": 0, "message": "", "data": data })).into_response()
}
