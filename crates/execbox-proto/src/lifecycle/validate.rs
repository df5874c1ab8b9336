//! Semantic validation of lifecycle requests (pure functions, no I/O).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::types::{
    CreateSandboxRequest, ErrorCode, ErrorEnvelope, SandboxState, Volume, DEFAULT_ENTRYPOINT,
    EXT_POOL_REF, EXT_RENEW_EXTEND_SECONDS,
};
use crate::labels::{self, is_dns_label};
use crate::limits::MAX_LAUNCH_BYTES;
use crate::quantity::{parse_cpu, parse_memory};

/// Smallest accepted `timeout`, in seconds.
pub const MIN_TIMEOUT_SECS: u64 = 60;

/// Largest accepted `resourceLimits.pids`.
pub const MAX_PIDS: u64 = 4_194_304;

/// Default `pageSize` of the list route.
pub const DEFAULT_PAGE_SIZE: u64 = 20;

/// Largest `pageSize` of the list route (larger values are clamped).
pub const MAX_PAGE_SIZE: u64 = 200;

/// A rejected request: the JSON path of the offending field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(.field, .message))]
pub struct ValidationError {
    /// JSON path such as `resourceLimits.memory`, `volumes[0].name` or `metadata.team`; empty
    /// when the whole body is at fault.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// `field: message`, or just `message` without a field.
fn render(field: &str, message: &str) -> String {
    if field.is_empty() {
        message.to_string()
    } else {
        format!("{field}: {message}")
    }
}

impl ValidationError {
    /// An error for `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> ValidationError {
        ValidationError {
            field: field.into(),
            message: message.into(),
        }
    }

    /// `SANDBOX::INVALID_METADATA_LABEL` for `metadata…` fields, else
    /// `SANDBOX::INVALID_PARAMETER`.
    pub fn error_code(&self) -> ErrorCode {
        if self.field == "metadata" || self.field.starts_with("metadata.") {
            ErrorCode::InvalidMetadataLabel
        } else {
            ErrorCode::InvalidParameter
        }
    }

    /// The 400 error envelope (`message` is `field: message`).
    pub fn to_envelope(&self) -> ErrorEnvelope {
        ErrorEnvelope::new(self.error_code(), self.to_string())
    }
}

impl From<ValidationError> for ErrorEnvelope {
    fn from(e: ValidationError) -> Self {
        e.to_envelope()
    }
}

/// The parsed, checked numbers of a valid [`CreateSandboxRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ValidatedCreate {
    /// `resourceLimits.cpu` in millicores.
    pub cpu_millicores: Option<u64>,
    /// `resourceLimits.memory` in bytes.
    pub memory_bytes: Option<u64>,
    /// `resourceLimits.pids`.
    pub pids: Option<u64>,
    /// `resourceLimits.disk` or `resourceLimits.ephemeral-storage` in bytes.
    pub disk_bytes: Option<u64>,
    /// `timeout` in seconds; `None` = no automatic expiry.
    pub timeout_secs: Option<u64>,
    /// The entrypoint to run (the request's, or [`DEFAULT_ENTRYPOINT`] for a snapshot restore).
    pub entrypoint: Vec<String>,
    /// `extensions.poolRef`.
    pub pool_ref: Option<String>,
    /// `extensions["access.renew.extend.seconds"]`.
    pub renew_extend_secs: Option<u64>,
}

/// Canonical OpenSandbox architecture name (`x86_64` → `amd64`, `aarch64` → `arm64`).
pub fn normalize_arch(arch: &str) -> &str {
    match arch {
        "x86_64" | "x86-64" | "amd64" => "amd64",
        "aarch64" | "arm64" => "arm64",
        other => other,
    }
}

impl CreateSandboxRequest {
    /// Checks every rule of the create request and returns the parsed numbers.
    ///
    /// `max_timeout_secs` is the server's upper bound for `timeout`; `host_arch` is the only
    /// architecture a `platform.arch` may ask for (`amd64`/`arm64`, or `x86_64`/`aarch64`).
    pub fn validate(
        &self,
        max_timeout_secs: u64,
        host_arch: &str,
    ) -> Result<ValidatedCreate, ValidationError> {
        let mut out = ValidatedCreate::default();

        // A pool reference first: with one, the pool defines the image, entrypoint and limits
        // (upstream: the Pool's template), so the request need not name them.
        if let Some(pool) = self.extensions.as_ref().and_then(|e| e.get(EXT_POOL_REF)) {
            if pool.trim().is_empty() {
                return Err(ValidationError::new(
                    format!("extensions.{EXT_POOL_REF}"),
                    "must not be empty",
                ));
            }
            if self.snapshot_id.is_some() {
                return Err(ValidationError::new(
                    "snapshotId",
                    "cannot be used together with extensions.poolRef",
                ));
            }
            out.pool_ref = Some(pool.trim().to_string());
        }

        // Startup source.
        match (&self.image, &self.snapshot_id) {
            (None, None) if out.pool_ref.is_some() => {}
            (Some(_), Some(_)) | (None, None) => {
                return Err(ValidationError::new(
                    "image",
                    "exactly one of image or snapshotId must be given",
                ))
            }
            (Some(image), None) => {
                if image.uri.trim().is_empty() {
                    return Err(ValidationError::new("image.uri", "must not be empty"));
                }
            }
            (None, Some(id)) => {
                if id.trim().is_empty() {
                    return Err(ValidationError::new("snapshotId", "must not be empty"));
                }
            }
        }

        // Entrypoint.
        out.entrypoint = match &self.entrypoint {
            Some(ep) => {
                if ep.first().is_none_or(|first| first.is_empty()) {
                    return Err(ValidationError::new(
                        "entrypoint",
                        "must contain at least one command, and the first item must not be empty",
                    ));
                }
                if let Some(i) = ep.iter().position(|a| a.contains('\0')) {
                    return Err(ValidationError::new(
                        format!("entrypoint[{i}]"),
                        "must not contain NUL characters",
                    ));
                }
                ep.clone()
            }
            None if self.image.is_some() && out.pool_ref.is_none() => {
                return Err(ValidationError::new(
                    "entrypoint",
                    "is required when image is given",
                ))
            }
            None => DEFAULT_ENTRYPOINT.iter().map(|s| s.to_string()).collect(),
        };

        // Timeout.
        if let Some(t) = self.timeout {
            let t = u64::try_from(t).unwrap_or(0);
            if t < MIN_TIMEOUT_SECS {
                return Err(ValidationError::new(
                    "timeout",
                    format!("must be at least {MIN_TIMEOUT_SECS} seconds (or null for no automatic expiry)"),
                ));
            }
            if t > max_timeout_secs {
                return Err(ValidationError::new(
                    "timeout",
                    format!("must be at most {max_timeout_secs} seconds"),
                ));
            }
            out.timeout_secs = Some(t);
        }

        // Extensions.
        if let Some(ext) = &self.extensions {
            if let Some(v) = ext.get(EXT_RENEW_EXTEND_SECONDS) {
                let secs = v
                    .parse::<u64>()
                    .ok()
                    .filter(|s| (300..=86_400).contains(s))
                    .ok_or_else(|| {
                        ValidationError::new(
                            format!("extensions.{EXT_RENEW_EXTEND_SECONDS}"),
                            "must be an integer number of seconds between 300 and 86400",
                        )
                    })?;
                out.renew_extend_secs = Some(secs);
            }
        }

        // Resource limits.
        match &self.resource_limits {
            None if out.pool_ref.is_none() => {
                return Err(ValidationError::new(
                    "resourceLimits",
                    "is required unless extensions.poolRef is set",
                ))
            }
            None => {}
            Some(limits) => validate_resource_limits(limits, &mut out)?,
        }

        // Metadata.
        if let Some(md) = &self.metadata {
            validate_metadata_labels(md)?;
        }

        // Environment.
        if let Some(env) = &self.env {
            for (k, v) in env {
                if k.is_empty() {
                    return Err(ValidationError::new(
                        "env",
                        "variable names must not be empty",
                    ));
                }
                if k.contains('=') || k.contains('\0') {
                    return Err(ValidationError::new(
                        format!("env.{k}"),
                        "variable names must not contain '=' or NUL",
                    ));
                }
                if v.contains('\0') {
                    return Err(ValidationError::new(
                        format!("env.{k}"),
                        "value must not contain NUL",
                    ));
                }
            }
        }

        // Entrypoint and environment travel to the agent in one environment string, which the
        // kernel bounds: a larger pair fails at exec (E2BIG) instead of being refused here.
        let (ep_len, env_len) = (
            json_len(&out.entrypoint),
            self.env.as_ref().map_or(0, json_len),
        );
        if ep_len + env_len > MAX_LAUNCH_BYTES {
            let field = if ep_len >= env_len {
                "entrypoint"
            } else {
                "env"
            };
            return Err(ValidationError::new(
                field,
                format!(
                    "too large: entrypoint and env take {} bytes as JSON, at most {MAX_LAUNCH_BYTES} together",
                    ep_len + env_len
                ),
            ));
        }

        // Platform.
        if let Some(p) = &self.platform {
            if let Some(os) = &p.os {
                if os != "linux" {
                    return Err(ValidationError::new(
                        "platform.os",
                        format!("unsupported OS {os:?}: only \"linux\" is available"),
                    ));
                }
            }
            if let Some(arch) = &p.arch {
                let host = normalize_arch(host_arch);
                if normalize_arch(arch) != host {
                    return Err(ValidationError::new(
                        "platform.arch",
                        format!("unsupported architecture {arch:?}: only {host:?} is available"),
                    ));
                }
            }
        }

        // Network policy and credential proxy.
        if let Some(rules) = self.network_policy.as_ref().and_then(|p| p.egress.as_ref()) {
            for (i, rule) in rules.iter().enumerate() {
                if !is_valid_egress_target(&rule.target) {
                    return Err(ValidationError::new(
                        format!("networkPolicy.egress[{i}].target"),
                        format!(
                            "invalid target {:?}: expected a host name (\"example.com\"), a wildcard (\"*.example.com\"), an address or a CIDR, optionally with \":port\"",
                            rule.target
                        ),
                    ));
                }
            }
        }
        if self.credential_proxy.as_ref().is_some_and(|c| c.enabled)
            && self.network_policy.is_none()
        {
            return Err(ValidationError::new(
                "credentialProxy",
                "requires networkPolicy",
            ));
        }

        // Volumes.
        if let Some(volumes) = &self.volumes {
            let mut names = BTreeSet::new();
            let mut paths = BTreeSet::new();
            for (i, v) in volumes.iter().enumerate() {
                validate_volume(i, v)?;
                if !names.insert(v.name.as_str()) {
                    return Err(ValidationError::new(
                        format!("volumes[{i}].name"),
                        format!("duplicate volume name {:?}", v.name),
                    ));
                }
                if !paths.insert(v.mount_path.trim_end_matches('/')) {
                    return Err(ValidationError::new(
                        format!("volumes[{i}].mountPath"),
                        format!("duplicate mount path {:?}", v.mount_path),
                    ));
                }
            }
        }

        Ok(out)
    }
}

/// Length of the JSON encoding of `v`.
fn json_len<T: serde::Serialize>(v: &T) -> usize {
    serde_json::to_string(v).map_or(usize::MAX, |s| s.len())
}

/// Parses the known `resourceLimits` keys into `out`.
fn validate_resource_limits(
    limits: &BTreeMap<String, String>,
    out: &mut ValidatedCreate,
) -> Result<(), ValidationError> {
    for (key, value) in limits {
        let field = format!("resourceLimits.{key}");
        let quantity_err = |e: crate::quantity::QuantityError| {
            ValidationError::new(field.clone(), format!("{e} (got {value:?})"))
        };
        match key.as_str() {
            "cpu" => out.cpu_millicores = Some(parse_cpu(value).map_err(quantity_err)?),
            "memory" => out.memory_bytes = Some(parse_memory(value).map_err(quantity_err)?),
            "disk" | "ephemeral-storage" => {
                if out.disk_bytes.is_some() {
                    return Err(ValidationError::new(
                        field,
                        "give only one of disk and ephemeral-storage",
                    ));
                }
                out.disk_bytes = Some(parse_memory(value).map_err(quantity_err)?);
            }
            "pids" => {
                let pids = value
                    .parse::<u64>()
                    .ok()
                    .filter(|n| (1..=MAX_PIDS).contains(n))
                    .ok_or_else(|| {
                        ValidationError::new(
                            field.clone(),
                            format!("must be an integer between 1 and {MAX_PIDS} (got {value:?})"),
                        )
                    })?;
                out.pids = Some(pids);
            }
            k if k.to_ascii_lowercase().contains("gpu") => {
                // "0" asks for no GPU, which is what every sandbox gets.
                if value.trim() != "0" {
                    return Err(ValidationError::new(field, "GPUs are not supported"));
                }
            }
            _ => return Err(ValidationError::new(
                field,
                "unsupported resource limit; supported: cpu, memory, pids, disk, ephemeral-storage",
            )),
        }
    }
    Ok(())
}

/// True for `example.com`, `*.example.com`, `localhost` or an IP literal (no scheme, port or path).
/// The shape of an egress target (a name, `*.suffix`, address or CIDR, with an optional
/// `:port`); the server's network layer parses it fully and names the field when it cannot.
fn is_valid_egress_target(target: &str) -> bool {
    !target.is_empty()
        && target.len() <= 300
        && !target.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Checks one volume (name, paths, exactly one backend).
fn validate_volume(i: usize, v: &Volume) -> Result<(), ValidationError> {
    let at = |f: &str| format!("volumes[{i}].{f}");
    if !is_dns_label(&v.name) {
        return Err(ValidationError::new(
            at("name"),
            format!(
                "invalid volume name {:?}: must be a DNS label (lowercase letters, digits and '-', at most 63 characters)",
                v.name
            ),
        ));
    }
    if !v.mount_path.starts_with('/') || v.mount_path.contains('\0') {
        return Err(ValidationError::new(
            at("mountPath"),
            format!("must be an absolute path (got {:?})", v.mount_path),
        ));
    }
    if let Some(sub) = &v.sub_path {
        if sub.starts_with('/') || sub.split('/').any(|p| p == "..") || sub.contains('\0') {
            return Err(ValidationError::new(
                at("subPath"),
                format!("must be a relative path without '..' (got {sub:?})"),
            ));
        }
    }
    let backends = [v.host.is_some(), v.pvc.is_some(), v.ossfs.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if backends != 1 {
        return Err(ValidationError::new(
            format!("volumes[{i}]"),
            "exactly one backend (host, pvc or ossfs) must be given",
        ));
    }
    if let Some(host) = &v.host {
        if !host.path.starts_with('/') || host.path.contains('\0') {
            return Err(ValidationError::new(
                at("host.path"),
                format!("must be an absolute path (got {:?})", host.path),
            ));
        }
    }
    if let Some(pvc) = &v.pvc {
        if !crate::labels::is_dns_subdomain(&pvc.claim_name) {
            return Err(ValidationError::new(
                at("pvc.claimName"),
                format!("invalid claim name {:?}", pvc.claim_name),
            ));
        }
    }
    if let Some(oss) = &v.ossfs {
        for (f, val) in [
            ("bucket", &oss.bucket),
            ("endpoint", &oss.endpoint),
            ("accessKeyId", &oss.access_key_id),
            ("accessKeySecret", &oss.access_key_secret),
        ] {
            if val.trim().is_empty() {
                return Err(ValidationError::new(
                    at(&format!("ossfs.{f}")),
                    "must not be empty",
                ));
            }
        }
    }
    Ok(())
}

/// Checks metadata labels (§4.3); errors name the field `metadata.<key>`.
pub fn validate_metadata_labels(
    metadata: &BTreeMap<String, String>,
) -> Result<(), ValidationError> {
    metadata
        .iter()
        .try_for_each(|(k, v)| validate_metadata_label(k, v))
}

/// Checks one label key and value.
fn validate_metadata_label(key: &str, value: &str) -> Result<(), ValidationError> {
    let field = format!("metadata.{key}");
    labels::validate_label_key(key)
        .and_then(|()| labels::validate_label_value(value))
        .map_err(|e| ValidationError::new(field, e.to_string()))
}

/// Applies a JSON Merge Patch (RFC 7396) to sandbox metadata: a string sets, `null` deletes
/// (ignored when absent), absent keys stay. Set keys and values must be valid labels; any other
/// value type is an error naming `metadata.<key>`. On error `current` is left unchanged.
pub fn apply_metadata_merge_patch(
    current: &mut BTreeMap<String, String>,
    patch: &serde_json::Map<String, Value>,
) -> Result<(), ValidationError> {
    for (k, v) in patch {
        match v {
            Value::Null => {}
            Value::String(s) => validate_metadata_label(k, s)?,
            other => {
                return Err(ValidationError::new(
                    format!("metadata.{k}"),
                    format!(
                        "invalid type: {}, expected a string or null",
                        super::parse::json_kind(other)
                    ),
                ))
            }
        }
    }
    for (k, v) in patch {
        match v {
            Value::String(s) => {
                current.insert(k.clone(), s.clone());
            }
            _ => {
                current.remove(k);
            }
        }
    }
    Ok(())
}

/// A malformed `metadata` list filter (→ 400 `INVALID_METADATA_FORMAT`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct MetadataFormatError {
    /// What is wrong.
    pub message: String,
}

impl MetadataFormatError {
    /// Always [`ErrorCode::InvalidMetadataFormat`].
    pub fn error_code(&self) -> ErrorCode {
        ErrorCode::InvalidMetadataFormat
    }

    /// The 400 error envelope.
    pub fn to_envelope(&self) -> ErrorEnvelope {
        ErrorEnvelope::new(self.error_code(), self.message.clone())
    }
}

impl From<MetadataFormatError> for ErrorEnvelope {
    fn from(e: MetadataFormatError) -> Self {
        e.to_envelope()
    }
}

/// Decodes `application/x-www-form-urlencoded` text: `%XX` escapes and `+` as space.
pub fn form_url_decode(s: &str) -> Option<String> {
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
            b'+' => {
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

/// Parses the (already once URL-decoded) value of the list route's `metadata` query parameter,
/// `k=v&k2=v2`, into AND-ed pairs. Keys and values may themselves be percent-encoded. Empty
/// segments are skipped; a segment without `=` or with an empty key is an error.
pub fn parse_metadata_filter(value: &str) -> Result<Vec<(String, String)>, MetadataFormatError> {
    let mut pairs = Vec::new();
    for segment in value.split('&').filter(|s| !s.is_empty()) {
        let Some((k, v)) = segment.split_once('=') else {
            return Err(MetadataFormatError {
                message: format!(
                    "Invalid metadata filter {segment:?}: expected key=value pairs separated by '&'."
                ),
            });
        };
        let decode = |s: &str| {
            form_url_decode(s).ok_or_else(|| MetadataFormatError {
                message: format!("Invalid percent-encoding in metadata filter {segment:?}."),
            })
        };
        let (k, v) = (decode(k)?, decode(v)?);
        if k.is_empty() {
            return Err(MetadataFormatError {
                message: format!("Invalid metadata filter {segment:?}: the key must not be empty."),
            });
        }
        pairs.push((k, v));
    }
    Ok(pairs)
}

/// The query of `GET /v1/sandboxes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListSandboxesQuery {
    /// Wanted states (OR-ed), of those named that a sandbox can have.
    pub states: Vec<SandboxState>,
    /// Whether a `state` filter was given: then a sandbox must be in one of `states` (a
    /// filter naming only states no sandbox here can have matches nothing, as upstream).
    pub state_filter: bool,
    /// Wanted metadata pairs (AND-ed).
    pub metadata: Vec<(String, String)>,
    /// 1-based page.
    pub page: u64,
    /// Page size, clamped to [`MAX_PAGE_SIZE`].
    pub page_size: u64,
}

impl Default for ListSandboxesQuery {
    fn default() -> Self {
        ListSandboxesQuery {
            states: Vec::new(),
            state_filter: false,
            metadata: Vec::new(),
            page: 1,
            page_size: DEFAULT_PAGE_SIZE,
        }
    }
}

/// Why a list query was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListQueryError {
    /// Bad `state`, `page` or `pageSize` (→ `SANDBOX::INVALID_PARAMETER`).
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// Bad `metadata` (→ `INVALID_METADATA_FORMAT`).
    #[error(transparent)]
    MetadataFormat(#[from] MetadataFormatError),
}

impl ListQueryError {
    /// The error code to answer with.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            ListQueryError::Invalid(_) => ErrorCode::InvalidParameter,
            ListQueryError::MetadataFormat(e) => e.error_code(),
        }
    }

    /// The 400 error envelope.
    pub fn to_envelope(&self) -> ErrorEnvelope {
        ErrorEnvelope::new(self.error_code(), self.to_string())
    }
}

impl ListSandboxesQuery {
    /// Parses a raw query string (`state=Running&state=Paused&metadata=a%3D1&page=2&pageSize=10`).
    /// Repeated `state` parameters are OR-ed; unknown parameters are ignored.
    pub fn parse(raw_query: &str) -> Result<ListSandboxesQuery, ListQueryError> {
        let mut q = ListSandboxesQuery::default();
        for part in raw_query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            let bad = |field: &str| ValidationError::new(field, "invalid percent-encoding");
            let key = form_url_decode(k).ok_or_else(|| bad(k))?;
            let value = form_url_decode(v).ok_or_else(|| bad(&key))?;
            match key.as_str() {
                "state" => {
                    // Any string is accepted (upstream's `Allocated`, states of other servers).
                    for s in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                        q.state_filter = true;
                        if let Ok(st) = s.parse::<SandboxState>() {
                            if !q.states.contains(&st) {
                                q.states.push(st);
                            }
                        }
                    }
                }
                "metadata" => q.metadata.extend(parse_metadata_filter(&value)?),
                "page" => q.page = parse_positive("page", &value)?,
                "pageSize" | "page_size" => {
                    q.page_size = parse_positive("pageSize", &value)?.min(MAX_PAGE_SIZE)
                }
                _ => {}
            }
        }
        Ok(q)
    }

    /// True when `state` and `metadata` pass the filters.
    pub fn matches(
        &self,
        state: SandboxState,
        metadata: Option<&BTreeMap<String, String>>,
    ) -> bool {
        (!self.state_filter || self.states.contains(&state))
            && self
                .metadata
                .iter()
                .all(|(k, v)| metadata.and_then(|m| m.get(k)) == Some(v))
    }
}

/// Parses an integer ≥ 1.
fn parse_positive(field: &str, value: &str) -> Result<u64, ValidationError> {
    value
        .parse::<u64>()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| {
            ValidationError::new(field, format!("must be an integer ≥ 1 (got {value:?})"))
        })
}
