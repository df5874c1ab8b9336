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
    /// 404 `FILE_NOT_FOUND`.
    #[error("{0}")]
    FileNotFound(String),
    /// 404 `CONTEXT_NOT_FOUND` (code contexts, bash sessions, PTYs).
    #[error("{0}")]
    ContextNotFound(String),
    /// 400 `INVALID_FILE` (upload: unreadable or empty form, count mismatch).
    #[error("{0}")]
    InvalidFile(String),
    /// 400 `INVALID_FILE_CONTENT` (upload: no `file` part).
    #[error("{0}")]
    InvalidFileContent(String),
    /// 400 `INVALID_FILE_METADATA` (upload: no or bad `metadata` part).
    #[error("{0}")]
    InvalidFileMetadata(String),
    /// 413: an upload larger than the configured limit.
    #[error("{0}")]
    TooLarge(String),
    /// 416 `{"code":"UNKNOWN"}`: an unparsable `Range` header.
    #[error("unparsable range")]
    BadRange,
    /// 409 `INVALID_REQUEST_BODY`: the request collides with what exists (a destination that
    /// exists, a directory that is not empty).
    #[error("{0}")]
    Exists(String),
    /// 413 `INVALID_REQUEST_BODY`: the sandbox's storage cannot take the write.
    #[error("{0}")]
    StorageFull(String),
    /// 409 with the given code (PTY `ALREADY_CONNECTED`).
    #[error("{message}")]
    Conflict {
        /// Envelope code.
        code: &'static str,
        /// Message.
        message: String,
    },
    /// 501 `NOT_SUPPORTED`.
    #[error("{0}")]
    NotSupported(String),
    /// 500 `RUNTIME_ERROR`.
    #[error("{0}")]
    Runtime(String),
}

impl ApiError {
    /// Maps a filesystem error. What the request itself caused is a 4xx: ENOENT is 404
    /// `FILE_NOT_FOUND`, an existing destination or non-empty directory 409, a full storage 413,
    /// a path that cannot be used as asked (not a directory, a directory, too long, a refused
    /// link, read-only, not permitted) 400; anything else is the agent's failure, 500.
    pub fn from_io(context: &str, e: &std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::NotFound {
            return ApiError::FileNotFound(format!("file not found. {context}: {e}"));
        }
        match e.raw_os_error() {
            Some(libc::EEXIST | libc::ENOTEMPTY) => ApiError::Exists(format!("{context}. {e}")),
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => {
                ApiError::StorageFull(format!("{context}. the sandbox's storage is full: {e}"))
            }
            _ if is_client_fault(e) => {
                ApiError::BadRequest(format!("invalid request, validation error {context}. {e}"))
            }
            _ => ApiError::Runtime(format!("{context}. {e}")),
        }
    }
}

/// Whether an I/O error was caused by what the request asked for rather than by the sandbox
/// or the agent failing: the class every API surface answers with a 4xx.
pub fn is_client_fault(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::InvalidInput | ErrorKind::PermissionDenied
    ) {
        return true;
    }
    matches!(
        e.raw_os_error(),
        Some(
            libc::ENAMETOOLONG
                | libc::E2BIG
                | libc::EINVAL
                | libc::EEXIST
                | libc::ENOTDIR
                | libc::EISDIR
                | libc::ENOTEMPTY
                | libc::ELOOP
                | libc::EROFS
                | libc::EACCES
                | libc::EPERM
                | libc::ENOEXEC
                | libc::EXDEV
                | libc::ETXTBSY
                | libc::EMLINK
                | libc::EBUSY
        )
    )
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, codes::INVALID_REQUEST_BODY),
            ApiError::MissingQuery(_) => (StatusCode::BAD_REQUEST, codes::MISSING_QUERY),
            ApiError::CommandNotFound(_) => (StatusCode::NOT_FOUND, codes::INVALID_REQUEST_BODY),
            ApiError::FileNotFound(_) => (StatusCode::NOT_FOUND, codes::FILE_NOT_FOUND),
            ApiError::ContextNotFound(_) => (StatusCode::NOT_FOUND, codes::CONTEXT_NOT_FOUND),
            ApiError::InvalidFile(_) => (StatusCode::BAD_REQUEST, codes::INVALID_FILE),
            ApiError::InvalidFileContent(_) => {
                (StatusCode::BAD_REQUEST, codes::INVALID_FILE_CONTENT)
            }
            ApiError::InvalidFileMetadata(_) => {
                (StatusCode::BAD_REQUEST, codes::INVALID_FILE_METADATA)
            }
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, codes::INVALID_FILE),
            ApiError::BadRange => (StatusCode::RANGE_NOT_SATISFIABLE, codes::UNKNOWN),
            ApiError::Exists(_) => (StatusCode::CONFLICT, codes::INVALID_REQUEST_BODY),
            ApiError::StorageFull(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, codes::INVALID_REQUEST_BODY)
            }
            ApiError::Conflict { code, .. } => (StatusCode::CONFLICT, *code),
            ApiError::NotSupported(_) => (StatusCode::NOT_IMPLEMENTED, codes::NOT_SUPPORTED),
            ApiError::Runtime(_) => (StatusCode::INTERNAL_SERVER_ERROR, codes::RUNTIME_ERROR),
        };
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else {
            tracing::debug!(error = %self, status = status.as_u16(), "request refused");
        }
        // The 416 envelope is exactly `{"code":"UNKNOWN"}`: no message.
        let message = match &self {
            ApiError::BadRange => String::new(),
            other => other.to_string(),
        };
        let body = ExecdError {
            code: code.to_string(),
            message,
        };
        (status, Json(body)).into_response()
    }
}

/// Unknown route or method: 404 with a plain-text body, as upstream.
pub async fn not_found() -> impl IntoResponse {
    (StatusCode::NOT_FOUND, "404 page not found")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_the_request_caused_are_the_clients() {
        for errno in [
            libc::ENAMETOOLONG,
            libc::EROFS,
            libc::EISDIR,
            libc::EEXIST,
            libc::E2BIG,
        ] {
            assert!(is_client_fault(&std::io::Error::from_raw_os_error(errno)));
        }
        for errno in [libc::EIO, libc::ENOSPC, libc::EMFILE, libc::ENOMEM] {
            assert!(!is_client_fault(&std::io::Error::from_raw_os_error(errno)));
        }
        let io = std::io::Error::from_raw_os_error;
        assert!(matches!(
            ApiError::from_io("x", &io(libc::EROFS)),
            ApiError::BadRequest(_)
        ));
        assert!(matches!(
            ApiError::from_io("x", &io(libc::ENOENT)),
            ApiError::FileNotFound(_)
        ));
        assert!(matches!(
            ApiError::from_io("x", &io(libc::EEXIST)),
            ApiError::Exists(_)
        ));
        assert!(matches!(
            ApiError::from_io("x", &io(libc::ENOSPC)),
            ApiError::StorageFull(_)
        ));
        assert!(matches!(
            ApiError::from_io("x", &io(libc::EIO)),
            ApiError::Runtime(_)
        ));
    }
}
