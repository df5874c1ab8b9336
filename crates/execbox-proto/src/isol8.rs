//! Wire types of the isol8 API (`../shared/compat/isol8.md`): the execute body, its request and
//! options, the result, stream events and the `{"error"}` envelope, plus isol8's size syntax.

use std::collections::BTreeMap;

use serde_json::Value;

/// Body of `POST /execute` and `POST /execute/stream`.
#[derive(Debug, Clone, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = Isol8ExecuteBody))]
#[serde(rename_all = "camelCase")]
pub struct ExecuteBody {
    /// What to run.
    pub request: ExecutionRequest,
    /// Engine options (checked against the server's policy).
    #[serde(default)]
    pub options: Options,
    /// Persistent session to run in.
    pub session_id: Option<String>,
}

/// `request` (§3).
#[derive(Clone, Default, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = Isol8ExecutionRequest))]
#[serde(rename_all = "camelCase")]
pub struct ExecutionRequest {
    /// Source for the runtime.
    pub code: Option<String>,
    /// Source to fetch.
    pub code_url: Option<String>,
    /// Expected SHA-256 of `codeUrl`'s content.
    pub code_hash: Option<String>,
    /// Allow a non-https `codeUrl`.
    pub allow_insecure_code_url: Option<bool>,
    /// Shell command (`bash -c`).
    pub cmd: Option<String>,
    /// `python`, `node`, `bun`, `deno`, `bash` or `agent`.
    pub runtime: Option<String>,
    /// Timeout over `options.timeoutMs`.
    pub timeout_ms: Option<u64>,
    /// Environment.
    pub env: Option<BTreeMap<String, String>>,
    /// Extension of the code file.
    pub file_extension: Option<String>,
    /// Standard input.
    pub stdin: Option<String>,
    /// Input files, absolute path to content.
    pub files: Option<BTreeMap<String, String>>,
    /// Files returned base64 after the run.
    pub output_paths: Option<Vec<String>>,
    /// Packages to install first.
    pub install_packages: Option<Vec<String>>,
    /// Audit metadata.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Bash run before the code.
    pub setup_script: Option<String>,
    /// Working directory inside `/sandbox`.
    pub workdir: Option<String>,
    /// Flags of the `agent` runtime.
    pub agent_flags: Option<Value>,
}

impl std::fmt::Debug for ExecutionRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecutionRequest")
            .field("runtime", &self.runtime)
            .field("env", &crate::redact::MaskedMap(self.env.as_ref()))
            .field("timeout_ms", &self.timeout_ms)
            .finish_non_exhaustive()
    }
}

/// `options.security`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = Isol8Security))]
#[serde(rename_all = "camelCase")]
pub struct Security {
    /// `strict`, `unconfined` or `custom`.
    pub seccomp: Option<String>,
    /// Profile of `custom`.
    pub custom_profile_path: Option<String>,
}

/// `options` (§4).
#[derive(Clone, Default, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = Isol8Options))]
#[serde(rename_all = "camelCase")]
pub struct Options {
    /// Forced by the server.
    pub mode: Option<String>,
    /// `none`, `host` or `filtered`.
    pub network: Option<String>,
    /// Filter of `filtered`.
    pub network_filter: Option<Value>,
    /// CPUs.
    pub cpu_limit: Option<f64>,
    /// Memory, isol8 size syntax.
    pub memory_limit: Option<String>,
    /// Tasks.
    pub pids_limit: Option<u64>,
    /// Read-only root filesystem.
    pub readonly_root_fs: Option<bool>,
    /// Bytes kept per stream.
    pub max_output_size: Option<u64>,
    /// Secret environment, masked in output.
    pub secrets: Option<BTreeMap<String, String>>,
    /// Timeout.
    pub timeout_ms: Option<u64>,
    /// Custom image.
    pub image: Option<String>,
    /// Size of `/sandbox`.
    pub sandbox_size: Option<String>,
    /// Size of `/tmp`.
    pub tmp_size: Option<String>,
    /// Debug logs.
    pub debug: Option<bool>,
    /// Keep the container after the run.
    pub persist: Option<bool>,
    /// Log proxied requests.
    pub log_network: Option<bool>,
    /// Seccomp profile.
    pub security: Option<Security>,
    /// Audit settings (the server's own apply).
    pub audit: Option<Value>,
    /// Remote code policy.
    pub remote_code: Option<Value>,
    /// Ignored.
    pub pool_strategy: Option<Value>,
    /// Ignored.
    pub pool_size: Option<Value>,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("mode", &self.mode)
            .field("network", &self.network)
            .field("secrets", &crate::redact::MaskedMap(self.secrets.as_ref()))
            .field("timeout_ms", &self.timeout_ms)
            .finish_non_exhaustive()
    }
}

/// `ExecutionResult` (§5), with execbox's `timedOut` and `oomKilled`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = Isol8ExecutionResult))]
#[serde(rename_all = "camelCase")]
pub struct ExecutionResult {
    /// Standard output, trailing whitespace trimmed.
    pub stdout: String,
    /// Standard error, trailing whitespace trimmed.
    pub stderr: String,
    /// Exit code.
    pub exit_code: i32,
    /// Run time of the user code.
    pub duration_ms: u64,
    /// Either stream exceeded `maxOutputSize`.
    pub truncated: bool,
    /// UUID v4.
    pub execution_id: String,
    /// Echoed runtime.
    pub runtime: String,
    /// Completion time, ISO 8601.
    pub timestamp: String,
    /// The sandbox that ran it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// Output files, path to base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<BTreeMap<String, String>>,
    /// Killed by the timeout.
    pub timed_out: bool,
    /// Killed by the out-of-memory killer.
    pub oom_killed: bool,
}

/// A stream event: `{"type","data","phase"?}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = Isol8StreamEvent))]
pub struct StreamEvent {
    /// `stdout`, `stderr`, `exit` or `error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Text; the exit code as a string for `exit`.
    pub data: String,
    /// `setup` or `code`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

impl StreamEvent {
    /// The `data: {json}\n\n` frame.
    pub fn to_sse(&self) -> String {
        format!(
            "data: {}\n\n",
            serde_json::to_string(self).unwrap_or_default()
        )
    }
}

/// The error envelope `{"error":"…"}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = Isol8Error))]
pub struct ErrorBody {
    /// Message.
    pub error: String,
}

/// Body of `POST /file`.
#[derive(Debug, Clone, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = Isol8PutFileBody))]
#[serde(rename_all = "camelCase")]
pub struct PutFileBody {
    /// Session.
    pub session_id: String,
    /// Absolute path.
    pub path: String,
    /// Base64 content.
    pub content: String,
}

/// Parses isol8's size syntax, `^\d+(\.\d+)?\s*[kmgt]?b?$` (case-insensitive, 1024-based).
pub fn parse_size(raw: &str) -> Option<u64> {
    let s = raw.trim().to_ascii_lowercase();
    let s = s.strip_suffix('b').unwrap_or(&s);
    let (num, mult) = match s.chars().last()? {
        'k' => (&s[..s.len() - 1], 1u64 << 10),
        'm' => (&s[..s.len() - 1], 1 << 20),
        'g' => (&s[..s.len() - 1], 1 << 30),
        't' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let num = num.trim_end();
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || (num.contains('.') && !digits(frac)) {
        return None;
    }
    let value: f64 = num.parse().ok()?;
    let bytes = value * mult as f64;
    (bytes.is_finite() && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// A byte count in isol8's syntax (`512m`), exact when it can be.
pub fn format_size(bytes: u64) -> String {
    for (unit, size) in [
        ("t", 1u64 << 40),
        ("g", 1 << 30),
        ("m", 1 << 20),
        ("k", 1 << 10),
    ] {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_isol8_syntax() {
        assert_eq!(parse_size("512m"), Some(512 << 20));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("256 MB"), Some(256 << 20));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("1kb"), Some(1024));
        assert_eq!(parse_size("m"), None);
        assert_eq!(parse_size("-1m"), None);
        assert_eq!(parse_size("1.m"), None);
        assert_eq!(parse_size("12x"), None);
        assert_eq!(format_size(512 << 20), "512m");
        assert_eq!(format_size(1000), "1000");
    }

    #[test]
    fn execute_body_parses_the_client_shape() {
        let b: ExecuteBody = serde_json::from_str(
            r#"{"request":{"code":"print(1)","runtime":"python","timeoutMs":5000},
                "options":{"memoryLimit":"256m","security":{"seccomp":"strict"}},"sessionId":"s"}"#,
        )
        .unwrap();
        assert_eq!(b.request.timeout_ms, Some(5000));
        assert_eq!(b.options.memory_limit.as_deref(), Some("256m"));
        assert_eq!(b.session_id.as_deref(), Some("s"));
    }

    #[test]
    fn results_use_camel_case_and_skip_absent_fields() {
        let r = ExecutionResult {
            exit_code: 1,
            ..Default::default()
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["exitCode"], 1);
        assert!(v.get("files").is_none());
        assert_eq!(v["timedOut"], false);
        let e = StreamEvent {
            kind: "exit".into(),
            data: "0".into(),
            phase: None,
        };
        assert_eq!(e.to_sse(), "data: {\"type\":\"exit\",\"data\":\"0\"}\n\n");
    }
}
