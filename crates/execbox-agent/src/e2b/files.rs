//! envd's REST routes (spec §3.5): `GET/POST /files`, `GET /health`, `GET /envs`,
//! `GET /metrics`. Reads and writes go through the execd file code (`files::download::open`,
//! `files::upload::{prepare, receive}`): paths resolved by the kernel through `jail::fsroot`,
//! `/proc` and the agent's data refused, writes to a temporary file renamed into place, owned by
//! the request's user. Errors are envd's `{"code":<int>,"message"}`.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::User;
use crate::error::ApiError;
use crate::files::upload::{self, Chunks};
use crate::files::{blocking, Permission, Query};
use crate::AppState;

/// Mode of a file `/files` creates: envd's `0666` under the usual umask `022`.
const NEW_FILE_MODE: u32 = 0o644;

/// An envd REST error.
#[derive(Debug)]
pub(crate) struct RestError {
    status: StatusCode,
    message: String,
}

impl RestError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        RestError {
            status,
            message: message.into(),
        }
    }
}

impl From<ApiError> for RestError {
    fn from(e: ApiError) -> Self {
        let status = match &e {
            ApiError::FileNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::StorageFull(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Exists(_) | ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::NotSupported(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::Runtime(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        };
        RestError::new(status, e.to_string())
    }
}

impl IntoResponse for RestError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, message = %self.message, "e2b files failed");
        }
        (
            self.status,
            Json(json!({ "code": self.status.as_u16(), "message": self.message })),
        )
            .into_response()
    }
}

/// The user of a `/files` request (`username`, else the default user); unknown → 401.
fn user_of(app: &AppState, q: &Query) -> Result<User, RestError> {
    let name = q
        .first("username")
        .filter(|u| !u.is_empty())
        .unwrap_or("user");
    User::named(app, name)
        .ok_or_else(|| RestError::new(StatusCode::UNAUTHORIZED, format!("invalid user: '{name}'")))
}

fn path_of(user: &User, raw: &str) -> Result<PathBuf, RestError> {
    user.path(raw)
        .map_err(|e| RestError::new(StatusCode::BAD_REQUEST, e.message))
}

/// `GET /files?path=&username=`: the file's bytes.
pub async fn download(
    State(app): State<Arc<AppState>>,
    RawQuery(raw): RawQuery,
) -> Result<Response, RestError> {
    let q = Query::parse(raw.as_deref());
    let user = user_of(&app, &q)?;
    let raw_path = q
        .first("path")
        .filter(|p| !p.is_empty())
        .ok_or_else(|| RestError::new(StatusCode::BAD_REQUEST, "path is required"))?;
    let path = path_of(&user, raw_path)?;
    let shown = path.clone();
    let (file, md) = blocking(move || crate::files::download::open(&shown)).await?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut resp = Response::new(crate::files::download::stream_bytes(file, 0, md.len()));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(md.len()));
    let disposition = crate::files::download::content_disposition(name.as_bytes()).replacen(
        "attachment",
        "inline",
        1,
    );
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// A whole request body as upload chunks, gunzipped on the way when it came gzip-encoded
/// (`Content-Encoding: gzip`, the SDKs' `gzip=True`).
struct BodyChunks {
    body: axum::body::BodyDataStream,
    gunzip: Option<flate2::write::GzDecoder<Vec<u8>>>,
    /// The body has ended (it must not be polled again).
    ended: bool,
}

impl Chunks for BodyChunks {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, ApiError> {
        use std::io::Write;
        let bad = |e: std::io::Error| ApiError::InvalidFile(format!("invalid gzip body. {e}"));
        loop {
            if self.ended {
                return Ok(None);
            }
            let next = match self.body.next().await {
                None => {
                    self.ended = true;
                    None
                }
                Some(Ok(b)) => Some(b),
                Some(Err(e)) => {
                    self.ended = true;
                    return Err(ApiError::InvalidFile(format!(
                        "error reading the request body. {e}"
                    )));
                }
            };
            let Some(gz) = self.gunzip.as_mut() else {
                return Ok(next);
            };
            match next {
                Some(b) => {
                    gz.write_all(&b).map_err(bad)?;
                    let out = std::mem::take(gz.get_mut());
                    if !out.is_empty() {
                        return Ok(Some(Bytes::from(out)));
                    }
                }
                None => {
                    let Some(gz) = self.gunzip.take() else {
                        return Ok(None);
                    };
                    let rest = gz.finish().map_err(bad)?;
                    return Ok((!rest.is_empty()).then(|| Bytes::from(rest)));
                }
            }
        }
    }
}

fn entry_json(path: &std::path::Path) -> Value {
    json!({
        "name": path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        "type": "file",
        "path": path.to_string_lossy(),
    })
}

/// `POST /files`: multipart parts named `file` (the part's filename is its target path when
/// `path` is absent), or a raw `application/octet-stream` body with `path`.
pub async fn upload(
    State(app): State<Arc<AppState>>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, RestError> {
    let q = Query::parse(raw.as_deref());
    let user = user_of(&app, &q)?;
    let given = q.first("path").filter(|p| !p.is_empty());
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let gzip = match headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|e| e.trim().to_ascii_lowercase())
    {
        None => false,
        Some(e) if e.is_empty() || e == "identity" => false,
        Some(e) if e == "gzip" => true,
        Some(e) => {
            return Err(RestError::new(
                StatusCode::BAD_REQUEST,
                format!("Content-Encoding {e} is not supported: use gzip or none"),
            ))
        }
    };
    let mut written = Vec::new();
    let mut total = 0u64;
    if !ct.starts_with("multipart/") {
        let raw_path = given.ok_or_else(|| {
            RestError::new(StatusCode::BAD_REQUEST, "path is required for a raw body")
        })?;
        let path = path_of(&user, raw_path)?;
        let shown = path.clone();
        let creds = user.creds;
        let target = blocking(move || {
            upload::prepare_with_mode(shown, &Permission::default(), creds, NEW_FILE_MODE)
        })
        .await?;
        let mut chunks = BodyChunks {
            body: body.into_data_stream(),
            gunzip: gzip.then(|| flate2::write::GzDecoder::new(Vec::new())),
            ended: false,
        };
        upload::receive(&mut chunks, target, &mut total, app.max_upload_bytes).await?;
        written.push(entry_json(&path));
        return Ok(Json(Value::Array(written)).into_response());
    }
    if gzip {
        return Err(RestError::new(
            StatusCode::BAD_REQUEST,
            "a gzip-encoded body must be application/octet-stream with path",
        ));
    }
    let mut req = axum::http::Request::new(body);
    if let Some(v) = headers.get(header::CONTENT_TYPE) {
        req.headers_mut().insert(header::CONTENT_TYPE, v.clone());
    }
    let form: Result<Multipart, MultipartRejection> =
        <Multipart as axum::extract::FromRequest<()>>::from_request(req, &()).await;
    let mut form = form.map_err(|e| {
        RestError::new(
            StatusCode::BAD_REQUEST,
            format!("error parsing multipart form: {e}"),
        )
    })?;
    let mut seen = HashSet::new();
    while let Some(mut field) = form
        .next_field()
        .await
        .map_err(|e| RestError::new(StatusCode::BAD_REQUEST, e.body_text()))?
    {
        if field.name() != Some("file") {
            continue;
        }
        let raw_path = match (given, field.file_name()) {
            (Some(p), _) if written.is_empty() => p.to_string(),
            (_, Some(f)) if !f.is_empty() => f.to_string(),
            _ => {
                return Err(RestError::new(
                    StatusCode::BAD_REQUEST,
                    "a file part needs a filename (its path) when path is not given",
                ))
            }
        };
        let path = path_of(&user, &raw_path)?;
        if !seen.insert(path.clone()) {
            return Err(RestError::new(
                StatusCode::BAD_REQUEST,
                format!("two parts write to {}", path.display()),
            ));
        }
        let shown = path.clone();
        let creds = user.creds;
        let target = blocking(move || {
            upload::prepare_with_mode(shown, &Permission::default(), creds, NEW_FILE_MODE)
        })
        .await?;
        upload::receive(&mut field, target, &mut total, app.max_upload_bytes).await?;
        written.push(entry_json(&path));
    }
    if written.is_empty() {
        return Err(RestError::new(
            StatusCode::BAD_REQUEST,
            "the form has no part named file",
        ));
    }
    Ok(Json(Value::Array(written)).into_response())
}

/// `GET /health`: 204.
pub async fn health() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// `GET /envs`: the sandbox's environment.
pub async fn envs(State(app): State<Arc<AppState>>) -> Json<BTreeMap<String, String>> {
    Json(app.runner.env_with(&[]).into_iter().collect())
}

/// `GET /metrics`: envd's shape from the sandbox's cgroup and root file system.
pub async fn metrics(State(app): State<Arc<AppState>>) -> Result<Json<Value>, RestError> {
    let m = serde_json::to_value(app.metrics.read()?).unwrap_or_default();
    let mib = |k: &str| (m[k].as_f64().unwrap_or(0.0) * 1024.0 * 1024.0) as u64;
    // The used part of the disk is not measured (no free-space call on a descriptor yet).
    let disk_total = blocking(|| {
        let root = execbox_jail::fsroot::Dir::open_trusted(std::path::Path::new("/"))
            .map_err(|e| ApiError::Runtime(e.to_string()))?;
        Ok(crate::storage_limit_of(&root))
    })
    .await
    .unwrap_or(0);
    Ok(Json(json!({
        "ts": time::OffsetDateTime::now_utc().unix_timestamp(),
        "cpu_count": m["cpu_count"],
        "cpu_used_pct": m["cpu_used_pct"],
        "mem_total": mib("mem_total_mib"),
        "mem_used": mib("mem_used_mib"),
        "mem_cache": 0,
        "disk_used": 0,
        "disk_total": disk_total,
    })))
}
