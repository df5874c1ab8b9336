//! Wire types of the session-execute API (`../shared/compat/session-exec.md`): request bodies
//! and their validation, responses, the SSE events of a streamed execution and the error
//! envelope `{"error","code"}`.
//!
//! Request bodies are read field by field from a [`serde_json::Value`] (not derived), so every
//! refusal names the field it is about (`files[2].path`, `env.PATH`, `timeout`…). The path rules
//! are lexical: `.` and `..` are resolved here; symlinks are resolved by the agent, which
//! refuses a file that would land outside the roots.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::run::RunResult;

/// The session's working directory and first writable root.
pub const WORKSPACE: &str = "/workspace";
/// The second writable root.
pub const TMP: &str = "/tmp";
/// Directories files and working directories must lie under.
pub const ROOTS: [&str; 2] = [WORKSPACE, TMP];
/// Timeout of an execution that names none, in seconds.
pub const DEFAULT_TIMEOUT_SECS: f64 = 30.0;
/// Largest timeout, in seconds (a server may configure less).
pub const MAX_TIMEOUT_SECS: f64 = 300.0;
/// Output kept of each stream by default, in bytes.
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 1 << 20;
/// Appended to a stream whose output was cut.
pub const TRUNCATION_MARK: &str = "\n[output truncated]";
/// Longest `sessionId`.
pub const MAX_SESSION_ID_LEN: usize = 128;
/// SSE comment sent while a stream is idle.
pub const SSE_PING: &str = ": ping\n\n";

/// The `code` of an error envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = SessionExecErrorCode))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// 400: malformed JSON, a missing or invalid field, a count or timeout limit exceeded.
    InvalidRequest,
    /// 401: missing or invalid bearer key.
    Unauthorized,
    /// 404: list or kill on a session that does not exist for this key.
    SessionNotFound,
    /// 404: the listed path does not exist.
    FileNotFound,
    /// 404: the pid is not running in the session.
    ProcessNotFound,
    /// 413: a file or the whole request is over its size limit.
    PayloadTooLarge,
    /// 429: the session cap is reached.
    TooManyRequests,
    /// 500: execbox failed to run the request.
    Internal,
}

impl ErrorCode {
    /// The HTTP status answered with this code.
    pub fn status(self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            Self::InvalidRequest => S::BAD_REQUEST,
            Self::Unauthorized => S::UNAUTHORIZED,
            Self::SessionNotFound | Self::FileNotFound | Self::ProcessNotFound => S::NOT_FOUND,
            Self::PayloadTooLarge => S::PAYLOAD_TOO_LARGE,
            Self::TooManyRequests => S::TOO_MANY_REQUESTS,
            Self::Internal => S::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Body of every non-2xx answer, and the payload of the `error` stream event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = SessionExecError))]
pub struct ErrorBody {
    /// Human-readable message naming the field at fault.
    pub error: String,
    /// Machine-readable code.
    pub code: ErrorCode,
}

/// A request that breaks a rule (400 `INVALID_REQUEST`); the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid(msg: impl Into<String>) -> Invalid {
    Invalid(msg.into())
}

/// How a file's `content` is encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = SessionExecEncoding))]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// The content is the text itself.
    #[default]
    Utf8,
    /// The content is base64 of the bytes.
    Base64,
}

/// A file of a request (§3). After [`ExecuteRequest::from_json`] or
/// [`WriteFilesRequest::from_json`], `path` is absolute and normalized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct File {
    /// Where to write it.
    pub path: String,
    /// The contents, as `encoding` says.
    pub content: String,
    /// `utf8` (default) or `base64`.
    pub encoding: Encoding,
}

/// The server's limits on a request (from its policy).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Files per request.
    pub max_files: usize,
    /// Environment variables per execution.
    pub max_env: usize,
    /// Largest `timeout`, in seconds.
    pub max_timeout_secs: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_files: 100,
            max_env: 100,
            max_timeout_secs: MAX_TIMEOUT_SECS,
        }
    }
}

/// What an execution runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Program {
    /// JavaScript/TypeScript source, run with Bun.
    Code(String),
    /// A shell command, run with `bash -c`.
    Command(String),
}

/// `POST /api/execute`, validated.
#[derive(Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecuteRequest {
    /// Session to execute in.
    pub session_id: String,
    /// `code` or `command`.
    #[serde(flatten)]
    pub program: Program,
    /// Files written before the run; paths resolved against `cwd`.
    pub files: Vec<File>,
    /// Environment of this execution only.
    pub env: BTreeMap<String, String>,
    /// Timeout in seconds.
    pub timeout: f64,
    /// Working directory, absolute and normalized.
    pub cwd: String,
    /// Answer as SSE.
    pub stream: bool,
}

impl std::fmt::Debug for ExecuteRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecuteRequest")
            .field("session_id", &self.session_id)
            .field("env", &crate::redact::MaskedMap(Some(&self.env)))
            .field("timeout", &self.timeout)
            .field("cwd", &self.cwd)
            .finish_non_exhaustive()
    }
}

impl ExecuteRequest {
    /// Reads and validates a request body.
    pub fn from_json(body: &[u8], limits: &Limits) -> Result<Self, Invalid> {
        let obj = object(body)?;
        let f = Fields::top(&obj);
        let session_id = session_id(&f)?;
        let program = match (f.string("code")?, f.string("command")?) {
            (Some(_), Some(_)) => {
                return Err(invalid("code, command: give exactly one of them, not both"))
            }
            (None, None) => return Err(invalid("code, command: one of them is required")),
            (Some(code), None) => Program::Code(code.to_string()),
            (None, Some(cmd)) => {
                if cmd.contains('\0') {
                    return Err(invalid("command: must not contain NUL characters"));
                }
                // It becomes one argument of `bash -c`.
                if cmd.len() > crate::limits::MAX_ARG_BYTES {
                    return Err(invalid(format!(
                        "command: {} bytes, over the limit of {} for one command",
                        cmd.len(),
                        crate::limits::MAX_ARG_BYTES
                    )));
                }
                Program::Command(cmd.to_string())
            }
        };
        let cwd = match f.string("cwd")? {
            None => WORKSPACE.to_string(),
            Some(c) => resolve_cwd(c).map_err(|e| invalid(format!("cwd: {e}")))?,
        };
        let timeout = match f.number("timeout")? {
            None => DEFAULT_TIMEOUT_SECS.min(limits.max_timeout_secs),
            Some(t) => check_timeout(t, limits)?,
        };
        Ok(Self {
            session_id,
            program,
            files: files(&f, &cwd, limits, false)?,
            env: env(&f, limits)?,
            timeout,
            cwd,
            stream: f.boolean("stream")?.unwrap_or(false),
        })
    }

    /// The timeout in milliseconds.
    pub fn timeout_ms(&self) -> u64 {
        (self.timeout * 1000.0).round() as u64
    }
}

fn check_timeout(t: f64, limits: &Limits) -> Result<f64, Invalid> {
    if t <= 0.0 {
        return Err(invalid(format!(
            "timeout: must be greater than 0 seconds, got {t}"
        )));
    }
    let max = limits.max_timeout_secs.min(MAX_TIMEOUT_SECS);
    if t > max {
        return Err(invalid(format!(
            "timeout: must be at most {max} seconds, got {t}"
        )));
    }
    Ok(t)
}

/// `POST /api/files`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WriteFilesRequest {
    /// Session to write into.
    pub session_id: String,
    /// Files, paths resolved against `/workspace`; never empty.
    pub files: Vec<File>,
}

impl WriteFilesRequest {
    /// Reads and validates a request body.
    pub fn from_json(body: &[u8], limits: &Limits) -> Result<Self, Invalid> {
        let obj = object(body)?;
        let f = Fields::top(&obj);
        Ok(Self {
            session_id: session_id(&f)?,
            files: files(&f, WORKSPACE, limits, true)?,
        })
    }
}

/// `GET /api/files`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListFilesQuery {
    /// Session to list in.
    pub session_id: String,
    /// Absolute, normalized path to list.
    pub path: String,
    /// The whole tree rather than direct children.
    pub recursive: bool,
}

impl ListFilesQuery {
    /// Reads and validates the query parameters.
    pub fn from_params(params: &BTreeMap<String, String>) -> Result<Self, Invalid> {
        let session_id = params
            .get("sessionId")
            .ok_or_else(|| invalid("sessionId: is required"))?;
        check_session_id(session_id)?;
        let path = match params.get("path").map(String::as_str) {
            None | Some("") => WORKSPACE.to_string(),
            Some(p) => {
                if p.contains('\0') {
                    return Err(invalid("path: must not contain NUL characters"));
                }
                let abs = normalize(p, WORKSPACE);
                if let Some(why) = crate::limits::path_too_long(&abs) {
                    return Err(invalid(format!("path: {why}")));
                }
                abs
            }
        };
        let recursive = match params.get("recursive").map(String::as_str) {
            None | Some("") | Some("false") | Some("0") => false,
            Some("true") | Some("1") => true,
            Some(other) => {
                return Err(invalid(format!(
                    "recursive: must be true or false, got {other:?}"
                )))
            }
        };
        Ok(Self {
            session_id: session_id.clone(),
            path,
            recursive,
        })
    }
}

/// `POST /api/processes/kill`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KillRequest {
    /// Session of the process.
    pub session_id: String,
    /// Pid inside the session (never 1).
    pub pid: i32,
    /// The signal.
    pub signal: Signal,
}

impl KillRequest {
    /// Reads and validates a request body.
    pub fn from_json(body: &[u8]) -> Result<Self, Invalid> {
        let obj = object(body)?;
        let f = Fields::top(&obj);
        let session_id = session_id(&f)?;
        let pid = f
            .integer("pid")?
            .ok_or_else(|| invalid("pid: is required"))?;
        if pid == 1 {
            return Err(invalid(
                "pid: 1 is the session's init process and cannot be signalled",
            ));
        }
        let pid = i32::try_from(pid)
            .ok()
            .filter(|p| *p > 1)
            .ok_or_else(|| invalid(format!("pid: {pid} is not a process id")))?;
        let signal = match f.string("signal")? {
            None => Signal::Kill,
            Some(name) => Signal::from_name(name).ok_or_else(|| {
                invalid(format!(
                    "signal: unknown signal {name:?}; use SIGKILL, SIGTERM, SIGINT, SIGHUP or SIGQUIT"
                ))
            })?,
        };
        Ok(Self {
            session_id,
            pid,
            signal,
        })
    }
}

/// A signal a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = SessionExecSignal))]
pub enum Signal {
    /// `SIGKILL` (9), the default.
    #[serde(rename = "SIGKILL")]
    Kill,
    /// `SIGTERM` (15).
    #[serde(rename = "SIGTERM")]
    Term,
    /// `SIGINT` (2).
    #[serde(rename = "SIGINT")]
    Int,
    /// `SIGHUP` (1).
    #[serde(rename = "SIGHUP")]
    Hup,
    /// `SIGQUIT` (3).
    #[serde(rename = "SIGQUIT")]
    Quit,
}

impl Signal {
    const ALL: [Signal; 5] = [Self::Kill, Self::Term, Self::Int, Self::Hup, Self::Quit];

    /// The signal called `name` (`SIGKILL`…).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Kill => "SIGKILL",
            Self::Term => "SIGTERM",
            Self::Int => "SIGINT",
            Self::Hup => "SIGHUP",
            Self::Quit => "SIGQUIT",
        }
    }

    /// Its number on Linux.
    pub fn number(self) -> i32 {
        match self {
            Self::Kill => 9,
            Self::Term => 15,
            Self::Int => 2,
            Self::Hup => 1,
            Self::Quit => 3,
        }
    }
}

/// Answer of `POST /api/execute`, and the payload of the `result` stream event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = SessionExecuteResponse))]
#[serde(rename_all = "camelCase")]
pub struct ExecuteResponse {
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Exit code; 128 + N when killed by signal N (137 on timeout).
    pub exit_code: i32,
    /// Wall-clock time from start to exit, in milliseconds.
    pub execution_time: u64,
    /// Peak memory of the execution's process tree, in bytes.
    pub memory_used: u64,
    /// User plus system CPU time, in milliseconds.
    pub cpu_time: u64,
    /// Killed because the timeout passed.
    pub timed_out: bool,
    /// Regular files written by this call, sorted, absolute.
    pub files_written: Vec<String>,
}

impl ExecuteResponse {
    /// The answer for a run whose output was capped at `max_output_bytes` per stream: a stream
    /// that produced more ends with [`TRUNCATION_MARK`].
    pub fn from_run(r: &RunResult, max_output_bytes: u64) -> Self {
        let mark = |kept: &str, total: u64| {
            if total > max_output_bytes {
                format!("{kept}{TRUNCATION_MARK}")
            } else {
                kept.to_string()
            }
        };
        let mut files_written = r.files_written.clone();
        files_written.sort();
        files_written.dedup();
        Self {
            stdout: mark(&r.stdout, r.stdout_bytes),
            stderr: mark(&r.stderr, r.stderr_bytes),
            exit_code: r.exit_code,
            execution_time: r.duration_ms,
            memory_used: r.memory_peak_bytes,
            cpu_time: r.cpu_time_ms,
            timed_out: r.timed_out,
            files_written,
        }
    }
}

/// Answer of `POST /api/files`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = SessionWriteFilesResponse))]
#[serde(rename_all = "camelCase")]
pub struct WriteFilesResponse {
    /// Absolute paths, in request order.
    pub files_written: Vec<String>,
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = SessionFileEntry))]
#[serde(rename_all = "camelCase")]
pub struct FileEntry {
    /// Absolute path.
    pub path: String,
    /// Base name.
    pub name: String,
    /// `file`, `directory`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, RFC 3339 UTC.
    pub modified_at: String,
}

/// Answer of `GET /api/files`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = SessionListFilesResponse))]
pub struct ListFilesResponse {
    /// The listed path.
    pub path: String,
    /// Entries sorted by path.
    pub files: Vec<FileEntry>,
}

impl From<crate::run::ListFilesResponse> for ListFilesResponse {
    fn from(l: crate::run::ListFilesResponse) -> Self {
        let mut files: Vec<FileEntry> = l
            .files
            .into_iter()
            .map(|f| FileEntry {
                path: f.path,
                name: f.name,
                kind: f.kind,
                size: f.size,
                modified_at: f.modified_at,
            })
            .collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Self {
            path: l.path,
            files,
        }
    }
}

/// Answer of `POST /api/processes/kill`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = SessionKillResponse))]
pub struct KillResponse {
    /// Always true.
    pub killed: bool,
    /// The signalled pid.
    pub pid: i32,
    /// The signal sent.
    pub signal: Signal,
}

/// Payload of the `stdout` and `stderr` stream events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = SessionOutputChunk))]
pub struct OutputChunk {
    /// Output as produced.
    pub data: String,
}

/// One event of a streamed execution (§5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// Standard output chunk.
    Stdout(String),
    /// Standard error chunk.
    Stderr(String),
    /// The end: the full answer.
    Result(ExecuteResponse),
    /// The end: the execution could not be run or completed.
    Error(ErrorBody),
}

impl StreamEvent {
    /// Its SSE frame: `event: <name>\ndata: <json>\n\n`.
    pub fn to_sse(&self) -> String {
        let (name, data) = match self {
            Self::Stdout(d) => ("stdout", to_json(&OutputChunk { data: d.clone() })),
            Self::Stderr(d) => ("stderr", to_json(&OutputChunk { data: d.clone() })),
            Self::Result(r) => ("result", to_json(r)),
            Self::Error(e) => ("error", to_json(e)),
        };
        format!("event: {name}\ndata: {data}\n\n")
    }

    /// Whether it ends the stream.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Result(_) | Self::Error(_))
    }
}

fn to_json<T: Serialize>(v: &T) -> String {
    // Serializing these plain structs cannot fail; JSON text never holds a raw newline, so the
    // payload is always one `data:` line.
    serde_json::to_string(v).unwrap_or_else(|_| "{}".to_string())
}

/// Whether `id` is a valid `sessionId`: 1–128 characters from `[A-Za-z0-9._-]`.
pub fn is_valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_SESSION_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn check_session_id(id: &str) -> Result<(), Invalid> {
    if is_valid_session_id(id) {
        Ok(())
    } else {
        Err(invalid(format!(
            "sessionId: must be 1-{MAX_SESSION_ID_LEN} characters from [A-Za-z0-9._-], got {id:?}"
        )))
    }
}

/// Whether `name` is a valid environment variable name: `^[A-Za-z_][A-Za-z0-9_]*$`.
pub fn is_valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

pub use crate::paths::normalize;

fn under(path: &str, root: &str) -> bool {
    crate::paths::is_strictly_under(path, root)
}

/// Resolves a file path (against the absolute `base`); it must lie strictly inside
/// `/workspace` or `/tmp`. The error says why, without the field name.
pub fn resolve_file_path(path: &str, base: &str) -> Result<String, String> {
    if path.is_empty() {
        return Err("must not be empty".into());
    }
    if path.contains('\0') {
        return Err("must not contain NUL characters".into());
    }
    let abs = normalize(path, base);
    if let Some(why) = crate::limits::path_too_long(&abs) {
        return Err(why);
    }
    if ROOTS.iter().any(|r| under(&abs, r)) {
        Ok(abs)
    } else {
        Err(format!(
            "{path:?} resolves to {abs}, which is not under /workspace or /tmp"
        ))
    }
}

/// Resolves a working directory (relative ones against `/workspace`); it must be `/workspace`,
/// `/tmp` or lie under one of them.
pub fn resolve_cwd(cwd: &str) -> Result<String, String> {
    if cwd.is_empty() {
        return Err("must not be empty".into());
    }
    if cwd.contains('\0') {
        return Err("must not contain NUL characters".into());
    }
    let abs = normalize(cwd, WORKSPACE);
    if let Some(why) = crate::limits::path_too_long(&abs) {
        return Err(why);
    }
    if ROOTS.iter().any(|r| abs == *r || under(&abs, r)) {
        Ok(abs)
    } else {
        Err(format!(
            "{cwd:?} resolves to {abs}, which is not under /workspace or /tmp"
        ))
    }
}

// --- Reading a JSON body field by field -------------------------------------------------------

fn object(body: &[u8]) -> Result<Map<String, Value>, Invalid> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(invalid("body: must be a JSON object")),
        Err(e) => Err(invalid(format!("body: malformed JSON: {e}"))),
    }
}

/// The fields of one JSON object, with the prefix that names them in messages (`files[2].`).
struct Fields<'a> {
    map: &'a Map<String, Value>,
    prefix: String,
}

impl<'a> Fields<'a> {
    fn top(map: &'a Map<String, Value>) -> Self {
        Self {
            map,
            prefix: String::new(),
        }
    }

    fn name(&self, field: &str) -> String {
        format!("{}{field}", self.prefix)
    }

    /// The value of `field`; `null` counts as absent.
    fn get(&self, field: &str) -> Option<&'a Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    fn typed<T>(
        &self,
        field: &str,
        what: &str,
        f: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<Option<T>, Invalid> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => f(v).map(Some).ok_or_else(|| {
                invalid(format!(
                    "{}: must be {what}, got {}",
                    self.name(field),
                    kind(v)
                ))
            }),
        }
    }

    fn string(&self, field: &str) -> Result<Option<&'a str>, Invalid> {
        self.typed(field, "a string", Value::as_str)
    }

    fn boolean(&self, field: &str) -> Result<Option<bool>, Invalid> {
        self.typed(field, "a boolean", Value::as_bool)
    }

    fn number(&self, field: &str) -> Result<Option<f64>, Invalid> {
        self.typed(field, "a number", Value::as_f64)
    }

    fn integer(&self, field: &str) -> Result<Option<i64>, Invalid> {
        self.typed(field, "an integer", |v| {
            v.as_i64()
                .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
        })
    }

    fn array(&self, field: &str) -> Result<Option<&'a Vec<Value>>, Invalid> {
        self.typed(field, "an array", Value::as_array)
    }

    fn object(&self, field: &str) -> Result<Option<&'a Map<String, Value>>, Invalid> {
        self.typed(field, "an object", Value::as_object)
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn session_id(f: &Fields<'_>) -> Result<String, Invalid> {
    let id = f
        .string("sessionId")?
        .ok_or_else(|| invalid("sessionId: is required"))?;
    check_session_id(id)?;
    Ok(id.to_string())
}

fn files(
    f: &Fields<'_>,
    base: &str,
    limits: &Limits,
    required: bool,
) -> Result<Vec<File>, Invalid> {
    let list = match f.array("files")? {
        Some(l) => l,
        None if required => return Err(invalid("files: is required")),
        None => return Ok(Vec::new()),
    };
    if required && list.is_empty() {
        return Err(invalid("files: must hold at least one file"));
    }
    if list.len() > limits.max_files {
        return Err(invalid(format!(
            "files: at most {} files per request, got {}",
            limits.max_files,
            list.len()
        )));
    }
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            let at = format!("files[{i}]");
            let map = v
                .as_object()
                .ok_or_else(|| invalid(format!("{at}: must be an object, got {}", kind(v))))?;
            let ff = Fields {
                map,
                prefix: format!("{at}."),
            };
            let raw_path = ff
                .string("path")?
                .ok_or_else(|| invalid(format!("{at}.path: is required")))?;
            let path = resolve_file_path(raw_path, base)
                .map_err(|e| invalid(format!("{at}.path: {e}")))?;
            let content = ff
                .string("content")?
                .ok_or_else(|| invalid(format!("{at}.content: is required")))?;
            let encoding = match ff.string("encoding")? {
                None | Some("utf8") | Some("utf-8") => Encoding::Utf8,
                Some("base64") => Encoding::Base64,
                Some(other) => {
                    return Err(invalid(format!(
                        "{at}.encoding: must be \"utf8\" or \"base64\", got {other:?}"
                    )))
                }
            };
            Ok(File {
                path,
                content: content.to_string(),
                encoding,
            })
        })
        .collect()
}

fn env(f: &Fields<'_>, limits: &Limits) -> Result<BTreeMap<String, String>, Invalid> {
    let Some(map) = f.object("env")? else {
        return Ok(BTreeMap::new());
    };
    if map.len() > limits.max_env {
        return Err(invalid(format!(
            "env: at most {} variables, got {}",
            limits.max_env,
            map.len()
        )));
    }
    let mut env = BTreeMap::new();
    for (name, value) in map {
        if !is_valid_env_name(name) {
            return Err(invalid(format!(
                "env: {name:?} is not a valid variable name (^[A-Za-z_][A-Za-z0-9_]*$)"
            )));
        }
        let value = value
            .as_str()
            .ok_or_else(|| invalid(format!("env.{name}: must be a string, got {}", kind(value))))?;
        if value.contains('\0') {
            return Err(invalid(format!(
                "env.{name}: must not contain NUL characters"
            )));
        }
        env.insert(name.clone(), value.to_string());
    }
    if let Some((name, why)) = crate::limits::env_too_large(env.iter()) {
        return Err(invalid(format!("env.{name}: {why}")));
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn exec(v: Value) -> Result<ExecuteRequest, Invalid> {
        ExecuteRequest::from_json(v.to_string().as_bytes(), &Limits::default())
    }

    fn err_of(v: Value) -> String {
        exec(v).expect_err("must be refused").0
    }

    #[test]
    fn session_ids() {
        assert!(is_valid_session_id("a"));
        assert!(is_valid_session_id("Run_1.2-x"));
        assert!(is_valid_session_id(&"x".repeat(128)));
        assert!(!is_valid_session_id(""));
        assert!(!is_valid_session_id(&"x".repeat(129)));
        assert!(!is_valid_session_id("a/b"));
        assert!(!is_valid_session_id("a b"));
        assert!(!is_valid_session_id("é"));
    }

    #[test]
    fn env_names() {
        for ok in ["A", "_", "_a1", "PATH", "x_Y_9"] {
            assert!(is_valid_env_name(ok), "{ok}");
        }
        for bad in ["", "1A", "A-B", "A=B", "A B", "é"] {
            assert!(!is_valid_env_name(bad), "{bad}");
        }
    }

    #[test]
    fn signals_by_name_and_number() {
        let all = [
            ("SIGKILL", 9),
            ("SIGTERM", 15),
            ("SIGINT", 2),
            ("SIGHUP", 1),
            ("SIGQUIT", 3),
        ];
        for (name, n) in all {
            let s = Signal::from_name(name).expect(name);
            assert_eq!((s.name(), s.number()), (name, n));
            assert_eq!(serde_json::to_value(s).unwrap(), json!(name));
        }
        assert_eq!(Signal::from_name("SIGSTOP"), None);
        assert_eq!(Signal::from_name("sigkill"), None);
    }

    #[test]
    fn paths_normalize_and_stay_under_the_roots() {
        assert_eq!(normalize("a/./b/../c", "/workspace"), "/workspace/a/c");
        assert_eq!(normalize("/x/../../y/", "/workspace"), "/y");
        assert_eq!(normalize("..", "/"), "/");
        let ok = |p: &str, base: &str| resolve_file_path(p, base).unwrap();
        assert_eq!(ok("src/index.ts", "/workspace"), "/workspace/src/index.ts");
        assert_eq!(ok("../x", "/workspace/app"), "/workspace/x");
        assert_eq!(ok("/tmp/a", "/workspace"), "/tmp/a");
        assert_eq!(ok("a", "/tmp"), "/tmp/a");
        for bad in [
            "/etc/passwd",
            "../../etc/x",
            "..",
            "/workspace",
            "/tmp/..",
            "",
            "/workspacex/a",
        ] {
            assert!(resolve_file_path(bad, "/workspace").is_err(), "{bad}");
        }
        assert_eq!(resolve_cwd("/workspace").unwrap(), "/workspace");
        assert_eq!(resolve_cwd("/tmp/").unwrap(), "/tmp");
        assert_eq!(resolve_cwd("app/../b").unwrap(), "/workspace/b");
        for bad in ["/", "/etc", "..", "/tmpx", ""] {
            assert!(resolve_cwd(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn execute_defaults() {
        let r = exec(json!({"sessionId": "s1", "command": "echo hi"})).unwrap();
        assert_eq!(r.program, Program::Command("echo hi".into()));
        assert_eq!(r.cwd, "/workspace");
        assert_eq!(r.timeout_ms(), 30_000);
        assert!(!r.stream && r.files.is_empty() && r.env.is_empty());
    }

    #[test]
    fn execute_fields() {
        let r = exec(json!({
            "sessionId": "s1", "code": "console.log(1)", "cwd": "app", "timeout": 1.5,
            "stream": true, "env": {"A": "1"},
            "files": [{"path": "x.ts", "content": "aGk=", "encoding": "base64"},
                      {"path": "/tmp/y", "content": "y"}]
        }))
        .unwrap();
        assert_eq!(r.program, Program::Code("console.log(1)".into()));
        assert_eq!(r.cwd, "/workspace/app");
        assert_eq!(r.timeout_ms(), 1500);
        assert!(r.stream);
        assert_eq!(r.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(r.files[0].path, "/workspace/app/x.ts");
        assert_eq!(r.files[0].encoding, Encoding::Base64);
        assert_eq!(r.files[1].path, "/tmp/y");
        assert_eq!(r.files[1].encoding, Encoding::Utf8);
    }

    #[test]
    fn execute_refusals_name_the_field() {
        let cases = [
            (json!({"command": "x"}), "sessionId"),
            (json!({"sessionId": "a/b", "command": "x"}), "sessionId"),
            (json!({"sessionId": "s"}), "code, command"),
            (
                json!({"sessionId": "s", "code": "1", "command": "x"}),
                "code, command",
            ),
            (json!({"sessionId": "s", "command": 5}), "command"),
            (
                json!({"sessionId": "s", "command": "x", "timeout": 0}),
                "timeout",
            ),
            (
                json!({"sessionId": "s", "command": "x", "timeout": -1}),
                "timeout",
            ),
            (
                json!({"sessionId": "s", "command": "x", "timeout": 301}),
                "timeout",
            ),
            (
                json!({"sessionId": "s", "command": "x", "timeout": "5"}),
                "timeout",
            ),
            (
                json!({"sessionId": "s", "command": "x", "stream": "yes"}),
                "stream",
            ),
            (
                json!({"sessionId": "s", "command": "x", "cwd": "/etc"}),
                "cwd",
            ),
            (
                json!({"sessionId": "s", "command": "x", "env": {"1A": "v"}}),
                "env",
            ),
            (
                json!({"sessionId": "s", "command": "x", "env": {"A": 1}}),
                "env.A",
            ),
            (json!({"sessionId": "s", "command": "x", "env": []}), "env"),
            (
                json!({"sessionId": "s", "command": "x", "files": {}}),
                "files",
            ),
            (
                json!({"sessionId": "s", "command": "x", "files": [{"content": "c"}]}),
                "files[0].path",
            ),
            (
                json!({"sessionId": "s", "command": "x", "files": [{"path": "a"}]}),
                "files[0].content",
            ),
            (
                json!({"sessionId": "s", "command": "x",
                       "files": [{"path": "a", "content": ""}, {"path": "/etc/passwd", "content": ""}]}),
                "files[1].path",
            ),
            (
                json!({"sessionId": "s", "command": "x",
                       "files": [{"path": "a", "content": "", "encoding": "hex"}]}),
                "files[0].encoding",
            ),
        ];
        for (body, field) in cases {
            let e = err_of(body.clone());
            assert!(e.starts_with(&format!("{field}:")), "{body} -> {e}");
        }
        let e = ExecuteRequest::from_json(b"{not json", &Limits::default()).unwrap_err();
        assert!(e.0.contains("malformed JSON"), "{e}");
        let e = ExecuteRequest::from_json(b"[1]", &Limits::default()).unwrap_err();
        assert!(e.0.starts_with("body:"), "{e}");
    }

    #[test]
    fn execute_counts_and_configured_maxima() {
        let env: Map<String, Value> = (0..101).map(|i| (format!("V{i}"), json!("x"))).collect();
        let e = err_of(json!({"sessionId": "s", "command": "x", "env": env}));
        assert!(e.starts_with("env:") && e.contains("100"), "{e}");
        let files: Vec<Value> = (0..101)
            .map(|i| json!({"path": format!("f{i}"), "content": ""}))
            .collect();
        let e = err_of(json!({"sessionId": "s", "command": "x", "files": files}));
        assert!(e.starts_with("files:"), "{e}");
        let limits = Limits {
            max_timeout_secs: 10.0,
            ..Limits::default()
        };
        let body = json!({"sessionId": "s", "command": "x", "timeout": 11}).to_string();
        let e = ExecuteRequest::from_json(body.as_bytes(), &limits).unwrap_err();
        assert!(e.0.starts_with("timeout:") && e.0.contains("10"), "{e}");
        let body = json!({"sessionId": "s", "command": "x"}).to_string();
        let r = ExecuteRequest::from_json(body.as_bytes(), &limits).unwrap();
        assert_eq!(
            r.timeout_ms(),
            10_000,
            "the default is capped by the maximum"
        );
    }

    #[test]
    fn write_files_request_needs_files() {
        let l = Limits::default();
        let parse = |v: Value| WriteFilesRequest::from_json(v.to_string().as_bytes(), &l);
        assert!(parse(json!({"sessionId": "s"}))
            .unwrap_err()
            .0
            .starts_with("files:"));
        assert!(parse(json!({"sessionId": "s", "files": []}))
            .unwrap_err()
            .0
            .starts_with("files:"));
        let r = parse(json!({"sessionId": "s", "files": [{"path": "a/b.ts", "content": "x"}]}))
            .unwrap();
        assert_eq!(r.files[0].path, "/workspace/a/b.ts");
    }

    #[test]
    fn list_query() {
        let q = |pairs: &[(&str, &str)]| {
            let m: BTreeMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            ListFilesQuery::from_params(&m)
        };
        let r = q(&[("sessionId", "s")]).unwrap();
        assert_eq!((r.path.as_str(), r.recursive), ("/workspace", false));
        let r = q(&[
            ("sessionId", "s"),
            ("path", "src/../lib"),
            ("recursive", "true"),
        ])
        .unwrap();
        assert_eq!((r.path.as_str(), r.recursive), ("/workspace/lib", true));
        assert!(q(&[]).unwrap_err().0.starts_with("sessionId:"));
        assert!(q(&[("sessionId", "s"), ("recursive", "yes")])
            .unwrap_err()
            .0
            .starts_with("recursive:"));
    }

    #[test]
    fn kill_request() {
        let parse = |v: Value| KillRequest::from_json(v.to_string().as_bytes());
        let r = parse(json!({"sessionId": "s", "pid": 42})).unwrap();
        assert_eq!((r.pid, r.signal), (42, Signal::Kill));
        let r = parse(json!({"sessionId": "s", "pid": 42, "signal": "SIGTERM"})).unwrap();
        assert_eq!(r.signal.number(), 15);
        for (body, field) in [
            (json!({"sessionId": "s", "pid": 1}), "pid"),
            (json!({"sessionId": "s", "pid": 0}), "pid"),
            (json!({"sessionId": "s", "pid": "42"}), "pid"),
            (json!({"sessionId": "s", "pid": 1.5}), "pid"),
            (json!({"sessionId": "s", "pid": 99999999999i64}), "pid"),
            (json!({"sessionId": "s"}), "pid"),
            (
                json!({"sessionId": "s", "pid": 42, "signal": "SIGSTOP"}),
                "signal",
            ),
            (json!({"pid": 42}), "sessionId"),
        ] {
            let e = parse(body.clone()).unwrap_err().0;
            assert!(e.starts_with(&format!("{field}:")), "{body} -> {e}");
        }
    }

    #[test]
    fn result_maps_fields_and_marks_truncation() {
        let run = RunResult {
            stdout: "abc".into(),
            stdout_bytes: 10,
            stderr: "e".into(),
            stderr_bytes: 1,
            exit_code: 137,
            timed_out: true,
            duration_ms: 1000,
            memory_peak_bytes: 5,
            cpu_time_ms: 7,
            files_written: vec!["/workspace/b".into(), "/workspace/a".into()],
            ..Default::default()
        };
        let r = ExecuteResponse::from_run(&run, 3);
        assert_eq!(r.stdout, "abc\n[output truncated]");
        assert_eq!(r.stderr, "e");
        assert_eq!(r.files_written, ["/workspace/a", "/workspace/b"]);
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"stdout": "abc\n[output truncated]", "stderr": "e", "exitCode": 137,
                   "executionTime": 1000, "memoryUsed": 5, "cpuTime": 7, "timedOut": true,
                   "filesWritten": ["/workspace/a", "/workspace/b"]})
        );
    }

    #[test]
    fn sse_frames_and_envelope() {
        assert_eq!(
            StreamEvent::Stdout("Step 0\n".into()).to_sse(),
            "event: stdout\ndata: {\"data\":\"Step 0\\n\"}\n\n"
        );
        let e = StreamEvent::Error(ErrorBody {
            error: "boom".into(),
            code: ErrorCode::Internal,
        });
        assert!(e.is_terminal());
        assert_eq!(
            e.to_sse(),
            "event: error\ndata: {\"error\":\"boom\",\"code\":\"INTERNAL\"}\n\n"
        );
        let r = StreamEvent::Result(ExecuteResponse::default()).to_sse();
        assert!(r.starts_with("event: result\ndata: {\"stdout\":\"\"") && r.ends_with("}\n\n"));
        assert_eq!(r.matches('\n').count(), 3);
        assert_eq!(ErrorCode::PayloadTooLarge.status(), 413);
        assert_eq!(
            serde_json::to_value(ErrorCode::SessionNotFound).unwrap(),
            json!("SESSION_NOT_FOUND")
        );
    }
}
