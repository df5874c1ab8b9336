//! The session-execute API (`/api/…`, see `../shared/compat/session-exec.md`): code or shell
//! commands run in persistent sessions, one sandbox per (tenant, `sessionId`), over the agent's
//! run API ([`crate::agent_run`]).
//!
//! Requests are validated completely (`execbox_proto::session_exec`) before a session is opened,
//! so a refused request never creates one. Every error becomes the `{"error","code"}` envelope in
//! one place, [`ApiError`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Query, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use execbox_proto::run::{FileContent, RunEvent, RunRequest};
use execbox_proto::session_exec::{
    Encoding, ErrorBody, ErrorCode, ExecuteRequest, ExecuteResponse, File, Invalid, KillRequest,
    KillResponse, Limits, ListFilesQuery, ListFilesResponse, Program, StreamEvent,
    WriteFilesRequest, WriteFilesResponse, DEFAULT_MAX_OUTPUT_BYTES, MAX_TIMEOUT_SECS, ROOTS,
    SSE_PING, WORKSPACE,
};
use tokio::sync::mpsc;

use crate::agent_run::{self, AgentCallError};
use crate::concurrency::{RunGate, RunPermit};
use crate::config::Policy;
use crate::local::SandboxLimits;
use crate::sessions::{Lease, SessionError, SessionKey, Sessions, Surface};
use crate::{LaunchSpec, Server};

/// Memory of a session's sandbox (the original product's per-execution memory).
const SESSION_MEMORY_BYTES: u64 = 1 << 30;
/// A `: ping` comment is sent when a stream has been idle this long.
const PING_EVERY: Duration = Duration::from_secs(15);
/// Frames buffered towards a streaming client.
const STREAM_BUFFER: usize = 64;

/// Routes of the session-execute API, with their own auth and error envelope.
pub fn routes(server: Arc<Server>) -> Router<Arc<Server>> {
    let body_limit = server.config.policy.max_request_bytes;
    Router::new()
        .route("/api/execute", post(execute))
        .route("/api/files", post(write_files).get(list_files))
        .route("/api/processes/kill", post(kill))
        .layer(DefaultBodyLimit::max(body_limit))
}

/// Every failure of this API, answered as `{"error","code"}` with the code's status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request breaks a rule; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// 401: no or a wrong bearer key.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 404: no such session for this key.
    #[error("sessionId: no session {0:?} for this API key")]
    SessionNotFound(String),
    /// 404: the listed path does not exist.
    #[error("{0}")]
    FileNotFound(String),
    /// 404: no such process in the session.
    #[error("{0}")]
    ProcessNotFound(String),
    /// 413: a file or the body is too large.
    #[error("{0}")]
    TooLarge(String),
    /// 429: the session cap is reached.
    #[error("{0}")]
    TooMany(String),
    /// 500: execbox failed.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Invalid(_) => ErrorCode::InvalidRequest,
            Self::Unauthorized(_) => ErrorCode::Unauthorized,
            Self::SessionNotFound(_) => ErrorCode::SessionNotFound,
            Self::FileNotFound(_) => ErrorCode::FileNotFound,
            Self::ProcessNotFound(_) => ErrorCode::ProcessNotFound,
            Self::TooLarge(_) => ErrorCode::PayloadTooLarge,
            Self::TooMany(_) => ErrorCode::TooManyRequests,
            Self::Internal(_) => ErrorCode::Internal,
        }
    }

    fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.to_string(),
            code: self.code(),
        }
    }

    /// An agent failure: its refusals are the client's mistake (400, or `not_found` for a 404),
    /// everything else is ours.
    fn from_agent(e: AgentCallError, not_found: impl FnOnce(String) -> ApiError) -> Self {
        match e {
            AgentCallError::Refused(_, _) if e.is_not_found() => not_found(e.to_string()),
            AgentCallError::Refused(_, r) => Self::Invalid(r.message),
            AgentCallError::Failed(m) => Self::Internal(m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.code();
        if code == ErrorCode::Internal {
            tracing::error!(error = %self, "session-execute request failed");
        }
        (code.status(), Json(self.body())).into_response()
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        Self::Invalid(e.0)
    }
}

impl From<crate::policy::LimitError> for ApiError {
    fn from(e: crate::policy::LimitError) -> Self {
        Self::Invalid(e.to_string())
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::TooMany(_) => Self::TooMany(e.to_string()),
            SessionError::Sandbox(crate::lifecycle::LifecycleError::TooMany(m)) => Self::TooMany(m),
            SessionError::Sandbox(e) => {
                Self::Internal(format!("starting the session's sandbox failed: {e}"))
            }
        }
    }
}

/// The tenant of the request's bearer key (every request is the default tenant when the server
/// has no keys).
struct Caller(String);

impl FromRequestParts<Arc<Server>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        server: &Arc<Server>,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let key = header.and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
                .map(str::trim)
        });
        match server.tenant_of(key).await {
            Some(tenant) => Ok(Caller(tenant)),
            None if header.is_none() => Err(ApiError::Unauthorized(
                "Authorization: a bearer API key is required",
            )),
            None => Err(ApiError::Unauthorized("Authorization: invalid API key")),
        }
    }
}

impl Caller {
    /// The maxima for this caller's tenant.
    fn policy(&self, server: &Server) -> Policy {
        server.config.policy.for_tenant(&self.0)
    }

    fn session(&self, id: &str) -> SessionKey {
        SessionKey {
            surface: Surface::SessionExec,
            tenant: self.0.clone(),
            id: id.to_string(),
        }
    }
}

fn body_bytes(body: Result<Bytes, BytesRejection>, server: &Server) -> Result<Bytes, ApiError> {
    body.map_err(|rej| {
        if rej.status() == http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(format!(
                "body: the request is larger than {} bytes",
                server.config.policy.max_request_bytes
            ))
        } else {
            ApiError::Invalid(format!("body: {}", rej.body_text()))
        }
    })
}

fn limits(p: &Policy) -> Limits {
    Limits {
        max_files: p.max_files,
        max_env: p.max_env,
        max_timeout_secs: (p.max_timeout_ms as f64 / 1000.0).min(MAX_TIMEOUT_SECS),
    }
}

/// Decodes the request's files (base64 or text), checks each one's size and encodes them for
/// the agent.
fn agent_files(files: Vec<File>, max_bytes: u64) -> Result<Vec<FileContent>, ApiError> {
    let b64 = &base64::engine::general_purpose::STANDARD;
    files
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            let data = match f.encoding {
                Encoding::Utf8 => f.content.into_bytes(),
                Encoding::Base64 => {
                    let compact: String = f
                        .content
                        .chars()
                        .filter(|c| !c.is_ascii_whitespace())
                        .collect();
                    lenient_base64().decode(compact.as_bytes()).map_err(|e| {
                        ApiError::Invalid(format!("files[{i}].content: not valid base64 ({e})"))
                    })?
                }
            };
            if data.len() as u64 > max_bytes {
                return Err(ApiError::TooLarge(format!(
                    "files[{i}] ({}): {} bytes, over the limit of {max_bytes} bytes per file",
                    f.path,
                    data.len()
                )));
            }
            Ok(FileContent {
                path: f.path,
                content: b64.encode(data),
            })
        })
        .collect()
}

/// Standard base64, with or without padding.
fn lenient_base64() -> base64::engine::GeneralPurpose {
    base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    )
}

/// An agent error about a request's files: a refusal whose message starts with one of `paths`
/// (a symlink leading out of the roots, a directory in the way…) is named after that file.
fn file_refusal(paths: &[String]) -> impl FnOnce(AgentCallError) -> ApiError + '_ {
    move |e| match ApiError::from_agent(e, ApiError::Invalid) {
        ApiError::Invalid(m) => match paths.iter().position(|p| m.starts_with(&format!("{p}:"))) {
            Some(i) => ApiError::Invalid(format!("files[{i}].path: {m}")),
            None => ApiError::Invalid(m),
        },
        other => other,
    }
}

/// Opens (creating on first use) the session `id` of the caller.
async fn open(server: &Arc<Server>, caller: &Caller, id: &str) -> Result<Lease, ApiError> {
    let key = caller.session(id);
    // The session's sandbox gets the defaults, bounded by the tenant's policy like every other.
    let policy = caller.policy(server);
    let limits = SandboxLimits {
        memory_bytes: Some(policy.memory("memory", None, SESSION_MEMORY_BYTES)?),
        cpu_millicores: Some(policy.cpu_millicores("cpu", None, policy.max_cpu_millicores())?),
        pids: Some(policy.pids("pids", None, server.config.default_pids)?),
        ..Default::default()
    };
    Ok(Sessions::open(server, &key, || LaunchSpec {
        tenant: key.tenant.clone(),
        owner: None,
        image_uri: Some("default".to_string()),
        root: crate::images::RootSource::Template("default".to_string()),
        entrypoint: Vec::new(),
        env: BTreeMap::new(),
        metadata: BTreeMap::new(),
        limits,
        expires_at: None,
        network: session_network(server),
        template: None,
        volumes: Vec::new(),
        named_volumes: Vec::new(),
        renew_on_access_secs: None,
    })
    .await?)
}

/// The existing session `id` of the caller.
fn existing(server: &Arc<Server>, caller: &Caller, id: &str) -> Result<Lease, ApiError> {
    Sessions::get(server, &caller.session(id))
        .ok_or_else(|| ApiError::SessionNotFound(id.to_string()))
}

fn socket(server: &Server, lease: &Lease) -> Result<PathBuf, ApiError> {
    server
        .socket_path(&lease.sandbox)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// The egress of session-execute sessions: `[network] session_execute` (none: loopback only,
/// or when this host cannot give sandboxes a network).
fn session_network(server: &Server) -> Option<execbox_net::Policy> {
    let targets = &server.config.network.session_execute;
    if targets.is_empty() || server.network_available().is_err() {
        return None;
    }
    let rules: Vec<execbox_proto::lifecycle::EgressRule> = targets
        .iter()
        .map(|t| execbox_proto::lifecycle::EgressRule {
            action: execbox_proto::lifecycle::NetworkAction::Allow,
            target: t.clone(),
        })
        .collect();
    let expanded = crate::egress::expand_presets(
        &rules,
        &server.config.network.registries,
        "network.session_execute",
    )
    .map_err(|e| tracing::error!(error = %e, "session-execute network"))
    .ok()?;
    let rules = execbox_net::policy::parse_rules(&expanded, "network.session_execute")
        .map_err(|e| tracing::error!(error = %e, "session-execute network"))
        .ok()?;
    Some(execbox_net::Policy {
        default: execbox_net::Action::Deny,
        rules,
    })
}

/// The argv of a program, and its standard input. `code` goes to `bun run -` on standard
/// input: no file of it exists anywhere (so it is never in `filesWritten`), and its imports
/// resolve from `cwd`, where the request's files are.
fn argv_of(server: &Server, program: Program) -> Result<(Vec<String>, Option<String>), ApiError> {
    match program {
        Program::Command(cmd) => {
            let shell = if server.has_runtime("bash") {
                "bash"
            } else {
                "sh"
            };
            Ok((vec![shell.to_string(), "-c".to_string(), cmd], None))
        }
        Program::Code(code) => {
            if !server.has_runtime("bun") {
                return Err(ApiError::Invalid(
                    "code: TypeScript needs bun, which is not installed on this server".into(),
                ));
            }
            Ok((
                vec!["bun".to_string(), "run".to_string(), "-".to_string()],
                Some(code),
            ))
        }
    }
}

/// `POST /api/execute`.
#[utoipa::path(
    post,
    path = "/api/execute",
    operation_id = "sessionExecute",
    tag = "session-execute",
    description = "Runs `code` (JavaScript/TypeScript on Bun) or `command` (bash) in the caller's session `sessionId` (opened on first use). With `stream: true` the answer is SSE: `stdout`/`stderr` (`{data}`), then `result` (the `ExecuteResponse`) or `error` (the `ErrorBody`).",
    request_body = crate::openapi::schemas::SessionExecuteBody,
    responses(
        (status = 200, description = "The result (`application/json`), or its events (`text/event-stream`) when `stream` is true.", content((ExecuteResponse = "application/json"), (serde_json::Value = "text/event-stream"))),
        (status = 400, description = "`INVALID_REQUEST`: malformed JSON or a field breaking a rule; the message names it.", body = ErrorBody),
        (status = 401, description = "`UNAUTHORIZED`: no or an unknown bearer key (only when the server has keys).", body = ErrorBody),
        (status = 413, description = "`PAYLOAD_TOO_LARGE`: a file or the body is over its limit.", body = ErrorBody),
        (status = 429, description = "`TOO_MANY_REQUESTS`: the session cap or the tenant's concurrent runs are reached.", body = ErrorBody),
        (status = 500, description = "`INTERNAL`: execbox failed.", body = ErrorBody),
    ),
    security(("bearer" = []), ())
)]
async fn execute(
    State(server): State<Arc<Server>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body, &server)?;
    let policy = caller.policy(&server);
    let req = ExecuteRequest::from_json(&body, &limits(&policy))?;
    let timeout_ms = req.timeout_ms();
    let files = agent_files(req.files, policy.max_file_bytes)?;
    let paths: Vec<String> = files.iter().map(|f| f.path.clone()).collect();
    let (argv, stdin) = argv_of(&server, req.program)?;
    let max_output = DEFAULT_MAX_OUTPUT_BYTES.min(policy.max_output_bytes);
    let run = RunRequest {
        argv,
        cwd: req.cwd,
        create_cwd: true,
        env: req.env,
        stdin,
        timeout_ms,
        max_output_bytes: max_output,
        files,
        file_roots: ROOTS.iter().map(|r| r.to_string()).collect(),
        program: None,
        output_paths: Vec::new(),
        track_changes_under: Some(WORKSPACE.to_string()),
        keep_background: true,
        stream: req.stream,
    };
    let permit = RunGate::admit(&server, &caller.0).map_err(|max| {
        ApiError::TooMany(format!(
            "too many concurrent executions: at most {max} for this API key"
        ))
    })?;
    let lease = open(&server, &caller, &req.session_id).await?;
    let socket = socket(&server, &lease)?;
    if req.stream {
        return stream((lease, permit), socket, run, max_output)
            .await
            .map_err(file_refusal(&paths));
    }
    // The run goes on (and keeps its session busy) when the client goes away.
    let task = tokio::spawn(async move {
        let result = agent_run::run(&socket, &run).await;
        drop((lease, permit));
        result
    });
    let result = task
        .await
        .map_err(|e| ApiError::Internal(format!("the execution task failed: {e}")))?
        .map_err(file_refusal(&paths))?;
    Ok(Json(ExecuteResponse::from_run(&result, max_output)).into_response())
}

/// Answers a streamed execution as SSE. Refusals before the run starts are normal errors;
/// afterwards everything, failures included, is an event.
async fn stream(
    hold: (Lease, RunPermit),
    socket: PathBuf,
    run: RunRequest,
    max_output: u64,
) -> Result<Response, AgentCallError> {
    let mut events = agent_run::run_stream(&socket, &run).await?;
    let (tx, rx) = mpsc::channel::<Bytes>(STREAM_BUFFER);
    tokio::spawn(async move {
        // Held until the run ends, whether or not the client is still there.
        let _hold = hold;
        let mut client = Some(tx);
        loop {
            let event = match tokio::time::timeout(PING_EVERY, events.recv()).await {
                Err(_idle) => {
                    forward(&mut client, SSE_PING.to_string()).await;
                    continue;
                }
                Ok(None) => StreamEvent::Error(ErrorBody {
                    error: "the execution ended without a result".into(),
                    code: ErrorCode::Internal,
                }),
                Ok(Some(RunEvent::Stdout { data })) => StreamEvent::Stdout(data),
                Ok(Some(RunEvent::Stderr { data })) => StreamEvent::Stderr(data),
                Ok(Some(RunEvent::Result { result })) => {
                    StreamEvent::Result(ExecuteResponse::from_run(&result, max_output))
                }
                Ok(Some(RunEvent::Error { message })) => {
                    tracing::error!(error = %message, "streamed execution failed");
                    StreamEvent::Error(ApiError::Internal(message).body())
                }
            };
            forward(&mut client, event.to_sse()).await;
            if event.is_terminal() {
                // Dropping the sender ends the response.
                return;
            }
        }
    });
    Ok(crate::sse_response(rx))
}

/// Sends a frame to the client while it is there; once it is gone, frames are dropped. A client
/// that takes nothing for [`crate::CLIENT_STALL`] counts as gone: it must not hold the session
/// busy (and its run's output in memory) for ever.
async fn forward(client: &mut Option<mpsc::Sender<Bytes>>, frame: String) {
    if let Some(tx) = client {
        let sent = tokio::time::timeout(crate::CLIENT_STALL, tx.send(Bytes::from(frame))).await;
        if !matches!(sent, Ok(Ok(()))) {
            *client = None;
        }
    }
}

/// `POST /api/files`.
#[utoipa::path(
    post,
    path = "/api/files",
    operation_id = "sessionWriteFiles",
    tag = "session-execute",
    description = "Writes files into the caller's session (opened on first use); paths are relative to `/workspace` or absolute under `/workspace` or `/tmp`.",
    request_body = crate::openapi::schemas::SessionWriteFilesBody,
    responses(
        (status = 200, description = "Written.", body = WriteFilesResponse),
        (status = 400, description = "`INVALID_REQUEST`: malformed JSON or a field breaking a rule; the message names it.", body = ErrorBody),
        (status = 401, description = "`UNAUTHORIZED`: no or an unknown bearer key (only when the server has keys).", body = ErrorBody),
        (status = 413, description = "`PAYLOAD_TOO_LARGE`: a file or the body is over its limit.", body = ErrorBody),
        (status = 429, description = "`TOO_MANY_REQUESTS`: the session cap is reached.", body = ErrorBody),
        (status = 500, description = "`INTERNAL`: execbox failed.", body = ErrorBody),
    ),
    security(("bearer" = []), ())
)]
async fn write_files(
    State(server): State<Arc<Server>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<WriteFilesResponse>, ApiError> {
    let body = body_bytes(body, &server)?;
    let policy = caller.policy(&server);
    let req = WriteFilesRequest::from_json(&body, &limits(&policy))?;
    let files = agent_files(req.files, policy.max_file_bytes)?;
    let lease = open(&server, &caller, &req.session_id).await?;
    let socket = socket(&server, &lease)?;
    let write = execbox_proto::run::WriteFilesRequest {
        files,
        roots: ROOTS.iter().map(|r| r.to_string()).collect(),
    };
    let paths: Vec<String> = write.files.iter().map(|f| f.path.clone()).collect();
    let written = agent_run::write_files(&socket, &write)
        .await
        .map_err(file_refusal(&paths))?;
    Ok(Json(WriteFilesResponse {
        files_written: written.written,
    }))
}

/// `GET /api/files?sessionId=&path=&recursive=`.
#[utoipa::path(
    get,
    path = "/api/files",
    operation_id = "sessionListFiles",
    tag = "session-execute",
    description = "Lists a directory of an existing session.",
    params(
        ("sessionId" = String, Query, description = "Session id."),
        ("path" = Option<String>, Query, description = "Directory (default `/workspace`)."),
        ("recursive" = Option<bool>, Query, description = "The whole tree rather than direct children."),
    ),
    responses(
        (status = 200, description = "The listing.", body = ListFilesResponse),
        (status = 400, description = "`INVALID_REQUEST`: malformed JSON or a field breaking a rule; the message names it.", body = ErrorBody),
        (status = 401, description = "`UNAUTHORIZED`: no or an unknown bearer key (only when the server has keys).", body = ErrorBody),
        (status = 404, description = "`SESSION_NOT_FOUND` or `FILE_NOT_FOUND`.", body = ErrorBody),
        (status = 500, description = "`INTERNAL`: execbox failed.", body = ErrorBody),
    ),
    security(("bearer" = []), ())
)]
async fn list_files(
    State(server): State<Arc<Server>>,
    caller: Caller,
    query: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Json<ListFilesResponse>, ApiError> {
    let Query(params) =
        query.map_err(|e| ApiError::Invalid(format!("query: {}", e.body_text())))?;
    let q = ListFilesQuery::from_params(&params)?;
    let lease = existing(&server, &caller, &q.session_id)?;
    let socket = socket(&server, &lease)?;
    let listing = agent_run::list_files(&socket, &q.path, q.recursive)
        .await
        .map_err(|e| {
            ApiError::from_agent(e, |_| {
                ApiError::FileNotFound(format!("path: {} does not exist", q.path))
            })
        })?;
    Ok(Json(listing.into()))
}

/// `POST /api/processes/kill`.
#[utoipa::path(
    post,
    path = "/api/processes/kill",
    operation_id = "sessionKillProcess",
    tag = "session-execute",
    description = "Signals a process of an existing session.",
    request_body = crate::openapi::schemas::SessionKillBody,
    responses(
        (status = 200, description = "Signalled.", body = KillResponse),
        (status = 400, description = "`INVALID_REQUEST`: malformed JSON or a field breaking a rule; the message names it.", body = ErrorBody),
        (status = 401, description = "`UNAUTHORIZED`: no or an unknown bearer key (only when the server has keys).", body = ErrorBody),
        (status = 404, description = "`SESSION_NOT_FOUND` or `PROCESS_NOT_FOUND`.", body = ErrorBody),
        (status = 413, description = "`PAYLOAD_TOO_LARGE`: a file or the body is over its limit.", body = ErrorBody),
        (status = 500, description = "`INTERNAL`: execbox failed.", body = ErrorBody),
    ),
    security(("bearer" = []), ())
)]
async fn kill(
    State(server): State<Arc<Server>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<KillResponse>, ApiError> {
    let body = body_bytes(body, &server)?;
    let req = KillRequest::from_json(&body)?;
    let lease = existing(&server, &caller, &req.session_id)?;
    let socket = socket(&server, &lease)?;
    agent_run::kill(&socket, req.pid, req.signal.number())
        .await
        .map_err(|e| {
            ApiError::from_agent(e, |_| {
                ApiError::ProcessNotFound(format!(
                    "pid: {} is not running in session {:?}",
                    req.pid, req.session_id
                ))
            })
        })?;
    Ok(Json(KillResponse {
        killed: true,
        pid: req.pid,
        signal: req.signal,
    }))
}
