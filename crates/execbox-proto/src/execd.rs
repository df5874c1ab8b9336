//! Wire types of the OpenSandbox execd API served by the in-sandbox agent
//! (`shared/compat/opensandbox-execd.md`).

use serde::{Deserialize, Serialize};

/// Error envelope of execd: `{"code","message"}`, each omitted when empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecdError {
    /// Error code such as `INVALID_REQUEST_BODY`.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub code: String,
    /// Human-readable message.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub message: String,
}

/// Error codes of execd (§2 of the spec).
pub mod codes {
    /// 400: JSON decode or validation failure.
    pub const INVALID_REQUEST_BODY: &str = "INVALID_REQUEST_BODY";
    /// 400: a required query or path parameter is missing.
    pub const MISSING_QUERY: &str = "MISSING_QUERY";
    /// 500: internal failure.
    pub const RUNTIME_ERROR: &str = "RUNTIME_ERROR";
    /// 404: file not found.
    pub const FILE_NOT_FOUND: &str = "FILE_NOT_FOUND";
    /// 404: unknown context or session.
    pub const CONTEXT_NOT_FOUND: &str = "CONTEXT_NOT_FOUND";
    /// 501: not supported on this platform.
    pub const NOT_SUPPORTED: &str = "NOT_SUPPORTED";
    /// 400: upload form unreadable or empty, or metadata/file count mismatch.
    pub const INVALID_FILE: &str = "INVALID_FILE";
    /// 400: upload without a `file` part.
    pub const INVALID_FILE_CONTENT: &str = "INVALID_FILE_CONTENT";
    /// 400: upload without a usable `metadata` part.
    pub const INVALID_FILE_METADATA: &str = "INVALID_FILE_METADATA";
    /// 416: unparsable `Range` header.
    pub const UNKNOWN: &str = "UNKNOWN";
    /// 409: a PTY already has a client attached.
    pub const ALREADY_CONNECTED: &str = "ALREADY_CONNECTED";
}

/// `POST /command` request body.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = ExecdRunCommandRequest))]
pub struct RunCommandRequest {
    /// Shell command, run as `bash -c <command>`.
    #[serde(default)]
    pub command: Option<String>,
    /// Working directory.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Run detached.
    #[serde(default)]
    pub background: Option<bool>,
    /// Timeout in milliseconds; 0 or absent means none.
    #[serde(default)]
    pub timeout: Option<i64>,
    /// Run as this uid.
    #[serde(default)]
    pub uid: Option<u32>,
    /// Run with this gid (requires `uid`).
    #[serde(default)]
    pub gid: Option<u32>,
    /// Extra environment.
    #[serde(default)]
    pub envs: Option<std::collections::BTreeMap<String, String>>,
}

/// Error details of an `error` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = ExecdEventError))]
pub struct EventError {
    /// Error name (`CommandExecError` for commands).
    pub ename: String,
    /// Error value (the exit code as a decimal string for commands).
    pub evalue: String,
    /// Traceback lines.
    pub traceback: Vec<String>,
}

/// One streamed execd event; every field but `type` and `timestamp` is omitted when empty.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = ExecdEvent))]
pub struct Event {
    /// Event type (`init`, `stdout`, `stderr`, `result`, `error`, `execution_complete`, …).
    #[serde(rename = "type")]
    pub kind: String,
    /// Text payload.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub text: Option<String>,
    /// Execution counter.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub execution_count: Option<u64>,
    /// Wall time in milliseconds (omitted when zero).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub execution_time: Option<u64>,
    /// Unix milliseconds.
    pub timestamp: i64,
    /// Rich results (MIME type → value, `text/plain` renamed `text`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub results: Option<serde_json::Map<String, serde_json::Value>>,
    /// Error details.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<EventError>,
}

impl Event {
    /// An event of `kind` with only a timestamp.
    pub fn new(kind: &str, timestamp: i64) -> Self {
        Self {
            kind: kind.to_string(),
            timestamp,
            ..Default::default()
        }
    }

    /// An event of `kind` carrying `text`.
    pub fn text(kind: &str, text: impl Into<String>, timestamp: i64) -> Self {
        Self {
            text: Some(text.into()),
            ..Self::new(kind, timestamp)
        }
    }

    /// `execution_complete` with the wall time (omitted when zero).
    pub fn complete(execution_time_ms: u64, timestamp: i64) -> Self {
        Self {
            execution_time: (execution_time_ms > 0).then_some(execution_time_ms),
            ..Self::new("execution_complete", timestamp)
        }
    }

    /// `error` event.
    pub fn error(ename: &str, evalue: String, traceback: Vec<String>, timestamp: i64) -> Self {
        Self {
            error: Some(EventError {
                ename: ename.to_string(),
                evalue,
                traceback,
            }),
            ..Self::new("error", timestamp)
        }
    }

    /// The event in standard SSE framing: `data: <json>\n\n`.
    pub fn to_sse(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_sse(&mut out);
        out
    }

    /// Appends the `data: {json}\n\n` frame to `out`.
    pub fn write_sse(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"data: ");
        // Serialising this struct cannot fail: all keys are strings and values plain data.
        let _ = serde_json::to_writer(&mut *out, self);
        out.extend_from_slice(b"\n\n");
    }
}

/// `GET /command/status/{id}` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = ExecdCommandStatus))]
pub struct CommandStatus {
    /// Command id.
    pub id: String,
    /// The original command.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub content: String,
    /// Still running.
    pub running: bool,
    /// Exit code (-1 after signal death); absent while running.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub exit_code: Option<i32>,
    /// Wait error (`exit status 3`, `signal: killed`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// RFC 3339 start time.
    pub started_at: String,
    /// RFC 3339 finish time; absent while running.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub finished_at: Option<String>,
}
