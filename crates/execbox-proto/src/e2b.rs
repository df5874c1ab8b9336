//! E2B wire types: the control plane's bodies and error envelope, the data plane's routing
//! (ports, host names) and its proxy errors, and the list route's query. Pure: no I/O.
//!
//! The spec is `shared/compat/e2b.md`; section numbers below refer to it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// envd, the in-sandbox daemon of the E2B SDKs (process and filesystem RPCs, `/files`).
pub const ENVD_PORT: u16 = 49983;
/// The code interpreter of `code-interpreter` sandboxes (`/execute`, `/contexts`).
pub const CODE_INTERPRETER_PORT: u16 = 49999;
/// The envd version execbox reports (§6: below 0.6.2 the SDKs refuse file metadata
/// themselves).
pub const ENVD_VERSION: &str = "0.5.7";
/// `clientID` of every sandbox (deprecated upstream; any string).
pub const CLIENT_ID: &str = "execbox";
/// Lifetime of a sandbox created without `timeout`, in seconds, on `/v2/sandboxes`.
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;
/// The same on the older `POST /sandboxes`.
pub const DEFAULT_TIMEOUT_SECS_V1: u64 = 15;
/// Largest `limit` of a list page.
pub const MAX_LIST_LIMIT: usize = 100;

/// The routing header naming the sandbox.
pub const HEADER_SANDBOX_ID: &str = "e2b-sandbox-id";
/// The routing header naming the port.
pub const HEADER_SANDBOX_PORT: &str = "e2b-sandbox-port";
/// The envd access token.
pub const HEADER_ACCESS_TOKEN: &str = "x-access-token";
/// The traffic access token (code interpreter and other ports).
pub const HEADER_TRAFFIC_TOKEN: &str = "e2b-traffic-access-token";

/// Body of `POST /v2/sandboxes` and `POST /sandboxes` (§2.4).
#[derive(Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    /// Template to start from (`base`, `code-interpreter-v1`…).
    #[serde(rename = "templateID", default)]
    pub template_id: Option<String>,
    /// Lifetime in seconds.
    #[serde(default)]
    pub timeout: Option<i64>,
    /// Pause instead of kill at the timeout.
    #[serde(default)]
    pub auto_pause: Option<bool>,
    /// Whether a pause keeps memory.
    #[serde(default)]
    pub auto_pause_memory: Option<bool>,
    /// Resume on traffic.
    #[serde(default)]
    pub auto_resume: Option<AutoResume>,
    /// Older SDKs: whether envd needs the token (execbox always requires it).
    #[serde(default)]
    pub secure: Option<bool>,
    /// `false`: no egress at all.
    #[serde(rename = "allow_internet_access", default)]
    pub allow_internet_access: Option<bool>,
    /// Egress rules.
    #[serde(default)]
    pub network: Option<NetworkConfig>,
    /// Labels.
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Environment of every process.
    #[serde(default)]
    pub env_vars: Option<BTreeMap<String, String>>,
    /// MCP gateway configuration.
    #[serde(default)]
    pub mcp: Option<Value>,
    /// Cloud identity.
    #[serde(default)]
    pub iam: Option<Value>,
    /// Volumes.
    #[serde(default)]
    pub volume_mounts: Option<Value>,
}

impl std::fmt::Debug for NewSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSandbox")
            .field("template_id", &self.template_id)
            .field("timeout", &self.timeout)
            .field(
                "env_vars",
                &crate::redact::MaskedMap(self.env_vars.as_ref()),
            )
            .finish_non_exhaustive()
    }
}

/// `autoResume`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AutoResume {
    /// Resume on traffic.
    #[serde(default)]
    pub enabled: bool,
}

/// `network` of a create, and the body of `PUT /sandboxes/{id}/network`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfig {
    /// Destinations always allowed (CIDR, IP, `example.com`, `*.example.com`); they win over
    /// `denyOut`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_out: Option<Vec<String>>,
    /// Destinations denied (CIDR, IP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_out: Option<Vec<String>>,
    /// Whether the sandbox's ports are public without the traffic token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_public_traffic: Option<bool>,
    /// Host header rewriting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_request_host: Option<Value>,
    /// An egress proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<Value>,
    /// Per-destination rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Value>,
    /// DNS servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_servers: Option<Value>,
    /// Ports treated as HTTPS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_ports: Option<Value>,
}

impl NetworkConfig {
    /// The first field execbox cannot honour, named as the wire spells it under `prefix`.
    pub fn unsupported(&self, prefix: &str) -> Option<String> {
        let set = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
        [
            ("maskRequestHost", set(&self.mask_request_host)),
            ("egressProxy", set(&self.egress_proxy)),
            ("rules", set(&self.rules)),
            ("dnsServers", set(&self.dns_servers)),
            ("httpsPorts", set(&self.https_ports)),
            (
                "allowPublicTraffic",
                self.allow_public_traffic == Some(false),
            ),
        ]
        .into_iter()
        .find(|(_, set)| *set)
        .map(|(name, _)| format!("{prefix}{name}: not supported by execbox"))
    }
}

impl NewSandbox {
    /// The first field execbox cannot honour, with why (§6); a 400 naming it.
    pub fn unsupported(&self) -> Option<String> {
        let set = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
        if set(&self.volume_mounts) {
            return Some("volumeMounts: volumes are not supported by execbox's E2B API".into());
        }
        if set(&self.iam) {
            return Some("iam: not supported by execbox".into());
        }
        if self.auto_resume.as_ref().is_some_and(|a| a.enabled) && self.auto_pause != Some(true) {
            return Some(
                "autoResume.enabled: resuming on traffic needs autoPause (a sandbox is paused at \
                 its timeout only then)"
                    .into(),
            );
        }
        if self.auto_pause_memory == Some(false) {
            return Some("autoPauseMemory: a pause always keeps memory in execbox".into());
        }
        self.network
            .as_ref()
            .and_then(|n| n.unsupported("network."))
    }
}

/// Body of `POST /sandboxes/{id}/timeout`.
#[derive(Debug, Clone, Deserialize)]
pub struct SetTimeout {
    /// Seconds from now.
    pub timeout: i64,
}

/// Body of the connect and resume routes (all optional).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Connect {
    /// Seconds from now.
    #[serde(default)]
    pub timeout: Option<i64>,
    /// `false`: a cold boot.
    #[serde(default)]
    pub memory: Option<bool>,
}

/// The `Sandbox` object of create and connect (§2.2).
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct Sandbox {
    /// Id.
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// Template as asked for.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Always [`CLIENT_ID`].
    #[serde(rename = "clientID")]
    pub client_id: String,
    /// Always [`ENVD_VERSION`].
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
    /// The template's alias (its name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// The sandbox's access token.
    #[serde(rename = "envdAccessToken")]
    pub envd_access_token: String,
    /// The token of its other ports.
    #[serde(rename = "trafficAccessToken")]
    pub traffic_access_token: Option<String>,
    /// Where its data plane is reached by host name (`{port}-{id}.{domain}`), if configured.
    pub domain: Option<String>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("sandbox_id", &self.sandbox_id)
            .field("template_id", &self.template_id)
            .field(
                "envd_access_token",
                &crate::redact::Masked(Some(&self.envd_access_token)),
            )
            .field(
                "traffic_access_token",
                &crate::redact::Masked(self.traffic_access_token.as_deref()),
            )
            .finish_non_exhaustive()
    }
}

/// `lifecycle` of a detail.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Lifecycle {
    /// Always false.
    pub auto_resume: bool,
    /// `kill` (execbox never pauses at the timeout).
    pub on_timeout: String,
}

/// `SandboxDetail` (get) and, without the detail-only fields, `ListedSandbox` (list).
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct SandboxDetail {
    /// Template as asked for.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// The template's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Id.
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// Always [`CLIENT_ID`].
    #[serde(rename = "clientID")]
    pub client_id: String,
    /// RFC 3339.
    #[serde(rename = "startedAt")]
    pub started_at: String,
    /// RFC 3339.
    #[serde(rename = "endAt")]
    pub end_at: String,
    /// Always [`ENVD_VERSION`].
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
    /// CPUs (rounded up).
    #[serde(rename = "cpuCount")]
    pub cpu_count: u64,
    /// Memory limit in MiB.
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    /// Disk size in MiB.
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    /// Labels.
    pub metadata: BTreeMap<String, String>,
    /// `running` or `paused`.
    pub state: String,
    /// Detail only: the access token.
    #[serde(rename = "envdAccessToken", skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    /// Detail only: see [`Sandbox::domain`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Detail only: whether it has any egress.
    #[serde(
        rename = "allowInternetAccess",
        skip_serializing_if = "Option::is_none"
    )]
    pub allow_internet_access: Option<bool>,
    /// Detail only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<Lifecycle>,
    /// Volumes (none).
    #[serde(rename = "volumeMounts")]
    pub volume_mounts: Vec<Value>,
}

impl std::fmt::Debug for SandboxDetail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxDetail")
            .field("sandbox_id", &self.sandbox_id)
            .field("template_id", &self.template_id)
            .field("state", &self.state)
            .field(
                "envd_access_token",
                &crate::redact::Masked(self.envd_access_token.as_deref()),
            )
            .finish_non_exhaustive()
    }
}

/// One sample of `GET /sandboxes/{id}/metrics`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxMetric {
    /// RFC 3339.
    pub timestamp: String,
    /// Unix seconds.
    pub timestamp_unix: i64,
    /// CPUs.
    pub cpu_count: u64,
    /// CPU use in percent.
    pub cpu_used_pct: f64,
    /// Bytes.
    pub mem_used: u64,
    /// Bytes.
    pub mem_total: u64,
    /// Bytes.
    pub mem_cache: u64,
    /// Bytes.
    pub disk_used: u64,
    /// Bytes.
    pub disk_total: u64,
}

/// Every control-plane error body (§2.1): both keys always.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// The HTTP status.
    pub code: u16,
    /// What went wrong.
    pub message: String,
}

/// The message of a 404 for a sandbox that is unknown or another tenant's.
pub fn sandbox_not_found(id: &str) -> String {
    format!("Sandbox \"{id}\" doesn't exist or you don't have access to it")
}

/// The message of a 404 for an unknown template.
pub fn template_not_found(id: &str) -> String {
    format!("template '{id}' not found")
}

/// The data plane's 401 (§3.1).
pub const UNAUTHORIZED_MESSAGE: &str =
    "unauthorized access, please provide a valid access token or method signing if supported";

/// The 502 of the data plane for a sandbox that is not running (§3.1): the SDKs look for
/// `was not found`.
pub fn sandbox_not_running_body(id: &str) -> Value {
    serde_json::json!({
        "sandboxId": id,
        "message": "The sandbox was not found",
        "code": 502,
    })
}

/// The 502 of the data plane for a port nothing listens on (§3.1): `port is not open`.
pub fn port_not_open_body(id: &str, port: u16) -> Value {
    serde_json::json!({
        "sandboxId": id,
        "message": "The sandbox is running but port is not open",
        "port": port,
        "code": 502,
    })
}

/// A template id without the `:default` tag the SDKs may add.
pub fn template_name(id: &str) -> &str {
    id.strip_suffix(":default").unwrap_or(id)
}

/// `(port, sandbox id)` of a data-plane host name `{port}-{id}.{domain}` (an optional `:port`
/// of the listener ignored); none when `host` is not under `domain` or not of that form.
pub fn parse_sandbox_host<'a>(host: &'a str, domain: &str) -> Option<(&'a str, &'a str)> {
    let host = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let domain = domain.trim_matches('.');
    if domain.is_empty() || host.len() <= domain.len() + 1 {
        return None;
    }
    let (label, rest) = host.split_at(host.len() - domain.len() - 1);
    if !rest[1..].eq_ignore_ascii_case(domain) || !rest.starts_with('.') || label.contains('.') {
        return None;
    }
    let (port, id) = label.split_once('-')?;
    (!port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !id.is_empty())
        .then_some((port, id))
}

/// Decodes `%XX` escapes (and `+` as a space when `plus` is set); none on a broken escape or
/// bytes that are not UTF-8.
pub fn percent_decode(s: &str, plus: bool) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = |c: u8| (c as char).to_digit(16);
                let hi = b.get(i + 1).copied().and_then(hex)?;
                let lo = b.get(i + 2).copied().and_then(hex)?;
                out.push(u8::try_from(hi * 16 + lo).ok()?);
                i += 3;
            }
            b'+' if plus => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The query string's parameters, each decoded once (`+` as a space); a later repeat of a
/// name replaces an earlier one. `Err` names a parameter whose escapes are broken.
pub fn parse_query(raw: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k, true).ok_or_else(|| format!("query: bad escape in {k:?}"))?;
        let v = percent_decode(v, true).ok_or_else(|| format!("{k}: bad percent-encoding"))?;
        out.insert(k, v);
    }
    Ok(out)
}

/// The list route's `metadata` filter (§2.5), its value already decoded once as a query
/// parameter: decoded once more, split on `&` then `=`, key and value decoded. Pairs are
/// AND-ed exact matches.
pub fn parse_metadata_filter(value: &str) -> Result<Vec<(String, String)>, String> {
    let bad = || format!("metadata: {value:?} is not key=value pairs joined by '&'");
    let once = percent_decode(value, false).ok_or_else(bad)?;
    let mut pairs = Vec::new();
    for segment in once.split('&').filter(|s| !s.is_empty()) {
        let parts: Vec<&str> = segment.split('=').collect();
        let [k, v] = parts[..] else {
            return Err(bad());
        };
        let k = percent_decode(k, false).ok_or_else(bad)?;
        let v = percent_decode(v, false).ok_or_else(bad)?;
        if k.is_empty() {
            return Err(bad());
        }
        pairs.push((k, v));
    }
    Ok(pairs)
}

/// The list route's `state` filter: `running`, `paused`, comma-joined; absent = both.
pub fn parse_state_filter(value: Option<&str>) -> Result<(bool, bool), String> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Ok((true, true));
    };
    let (mut running, mut paused) = (false, false);
    for s in value.split(',').map(str::trim) {
        match s {
            "running" => running = true,
            "paused" => paused = true,
            other => {
                return Err(format!(
                    "state: {other:?} is not a sandbox state (running, paused)"
                ))
            }
        }
    }
    Ok((running, paused))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_filters_are_decoded_twice() {
        // The Python SDK's wire for {"bar":"e2b x","k&":"v=1"}, after the query's own decoding.
        let value =
            percent_decode("bar%3De2b%252520x%26k%252526%3Dv%25253D1", true).expect("decodes");
        assert_eq!(
            parse_metadata_filter(&value).expect("parses"),
            vec![
                ("bar".to_string(), "e2b x".to_string()),
                ("k&".to_string(), "v=1".to_string())
            ]
        );
        assert!(parse_metadata_filter("a%3Db%3Dc").is_err());
        assert!(parse_metadata_filter("novalue").is_err());
    }

    #[test]
    fn host_names_split_into_port_and_id() {
        assert_eq!(
            parse_sandbox_host("49983-0f1e-22aa.sbx.example.com:8080", "sbx.example.com"),
            Some(("49983", "0f1e-22aa"))
        );
        assert_eq!(
            parse_sandbox_host("8080-abc.SBX.example.com", "sbx.example.com."),
            Some(("8080", "abc"))
        );
        assert_eq!(
            parse_sandbox_host("sbx.example.com", "sbx.example.com"),
            None
        );
        assert_eq!(
            parse_sandbox_host("x.49983-a.sbx.example.com", "sbx.example.com"),
            None
        );
        assert_eq!(
            parse_sandbox_host("api-a.sbx.example.com", "sbx.example.com"),
            None
        );
        assert_eq!(
            parse_sandbox_host("49983-a.evil.com", "sbx.example.com"),
            None
        );
        assert_eq!(
            parse_sandbox_host("49983-a.xsbx.example.com", "sbx.example.com"),
            None
        );
    }

    #[test]
    fn unsupported_fields_are_named() {
        let req: NewSandbox = serde_json::from_str(
            r#"{"templateID":"base","network":{"allowOut":["1.1.1.1"],"rules":{"a":1}}}"#,
        )
        .expect("parses");
        assert_eq!(
            req.unsupported().as_deref(),
            Some("network.rules: not supported by execbox")
        );
        let ok: NewSandbox = serde_json::from_str(
            r#"{"templateID":"base","timeout":600,"metadata":{"bar":"e2b x"},"envVars":{"A":"1"},"autoPause":false,"secure":true}"#,
        )
        .expect("parses");
        assert_eq!(ok.unsupported(), None);
        assert_eq!(template_name("base:default"), "base");
    }

    #[test]
    fn states_filter() {
        assert_eq!(parse_state_filter(None), Ok((true, true)));
        assert_eq!(parse_state_filter(Some("paused")), Ok((false, true)));
        assert!(parse_state_filter(Some("killed")).is_err());
    }
}
