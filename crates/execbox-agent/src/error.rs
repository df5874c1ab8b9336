//! The execd error envelope: every handler error becomes `{"code","message"}` here, and only
//! here.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use execbox_proto::execd::{codes, ExecdError};

/// An execd API error.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `INVALID_REQUEST_BODY`.
    #[error("{0}")]
    BadRequest(String),
    /// 400 `MISSING_QUERY`.
    #[error("{0}")]
    MissingQuery(String),
    /// 404 `INVALID_REQUEST_BODY` (unknown command on status, as upstream).
    #[error("{0}")]
    CommandNotFound(String),
    /// 500 `RUNTIME_ERROR`.
    #[error("{0}")]
    Runtime(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, codes::INVALID_REQUEST_BODY),
            ApiError::MissingQuery(_) => (StatusCode::BAD_REQUEST, codes::MISSING_QUERY),
            ApiError::CommandNotFound(_) => (StatusCode::NOT_FOUND, codes::INVALID_REQUEST_BODY),
            ApiError::Runtime(_) => (StatusCode::INTERNAL_SERVER_ERROR, codes::RUNTIME_ERROR),
        };
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let body = ExecdError {
            code: code.to_string(),
            message: self.to_string(),
        };
        (status, Json(body)).into_response()
    }
}

/// Unknown route or method: 404 with a plain-text body, as upstream.
pub async fn not_found() -> impl IntoResponse {
    (StatusCode::NOT_FOUND, "404 page not found")
}
