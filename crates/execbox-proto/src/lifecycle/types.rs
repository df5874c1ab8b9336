//! Wire types of the OpenSandbox lifecycle API (camelCase JSON, nulls omitted on output, unknown
//! fields ignored and `null` read as absent on input).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Entrypoint used when a sandbox restored from a snapshot gives none.
pub const DEFAULT_ENTRYPOINT: [&str; 3] = ["tail", "-f", "/dev/null"];

/// Extension key naming a pre-warmed pool; makes `resourceLimits` optional.
pub const EXT_POOL_REF: &str = "poolRef";

/// Extension key for the renew-on-access extension in seconds (`"300"`–`"86400"`).
pub const EXT_RENEW_EXTEND_SECONDS: &str = "access.renew.extend.seconds";

/// Body of `POST /v1/sandboxes`.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct CreateSandboxRequest {
    /// Container image to start from (exactly one of `image` / `snapshot_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSpec>,
    /// Snapshot to restore from (exactly one of `image` / `snapshot_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// Command of the sandbox's main process; required with `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Lifetime in seconds (≥ 60); `None` (absent or `null`) means no automatic expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    /// Resource limits such as `{"cpu":"500m","memory":"512Mi"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_limits: Option<BTreeMap<String, String>>,
    /// Environment variables of the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// User labels (Kubernetes label rules); key `name` is the human-readable name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Required platform.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Egress network policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<NetworkPolicy>,
    /// Credential proxy settings (requires `network_policy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_proxy: Option<CredentialProxy>,
    /// Whether endpoints require access headers (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_access: Option<bool>,
    /// Volumes to mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<Vec<Volume>>,
    /// Opaque extensions; see [`EXT_POOL_REF`] and [`EXT_RENEW_EXTEND_SECONDS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<BTreeMap<String, String>>,
}

impl std::fmt::Debug for CreateSandboxRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateSandboxRequest")
            .field("image", &self.image)
            .field("entrypoint", &self.entrypoint)
            .field("timeout", &self.timeout)
            .field("env", &crate::redact::MaskedMap(self.env.as_ref()))
            .field("metadata", &self.metadata)
            .finish_non_exhaustive()
    }
}

/// Image reference `{uri, auth?}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ImageSpec {
    /// Image reference, e.g. `python:3.11`.
    pub uri: String,
    /// Registry credentials; never echoed in responses (see [`ImageSpec::without_auth`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<ImageAuth>,
}

impl ImageSpec {
    /// The same image without credentials, for responses.
    pub fn without_auth(&self) -> ImageSpec {
        ImageSpec {
            uri: self.uri.clone(),
            auth: None,
        }
    }
}

/// Registry credentials of an [`ImageSpec`]. `Debug` redacts the password.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ImageAuth {
    /// Registry user name.
    #[serde(default)]
    pub username: String,
    /// Registry password or token.
    #[serde(default)]
    pub password: String,
}

impl fmt::Debug for ImageAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageAuth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Platform constraint `{os, arch}` (`"linux"`/`"windows"`, `"amd64"`/`"arm64"`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Platform {
    /// Operating system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// CPU architecture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
}

/// Allow or deny, for network policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum NetworkAction {
    /// `"allow"`.
    Allow,
    /// `"deny"`.
    Deny,
}

/// Egress policy `{defaultAction?, egress?}`; rules are evaluated in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicy {
    /// Action when no rule matches; absent means deny.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_action: Option<NetworkAction>,
    /// Ordered rules; absent or empty (with no policy at all) means allow-all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<EgressRule>>,
}

/// One egress rule `{action, target}`; target is a host name or `*.domain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    /// What to do with matching traffic.
    pub action: NetworkAction,
    /// `example.com` or `*.example.com`.
    pub target: String,
}

/// Credential proxy settings `{enabled}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct CredentialProxy {
    /// Whether the proxy is enabled (default false).
    #[serde(default)]
    pub enabled: bool,
}

/// A volume mount with exactly one backend (`host`, `pvc` or `ossfs`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    /// Volume name (DNS label, ≤ 63 characters).
    pub name: String,
    /// Absolute mount path inside the sandbox.
    pub mount_path: String,
    /// Mount read-only (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    /// Relative path inside the backend to mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_path: Option<String>,
    /// Host-path backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostVolume>,
    /// Persistent-volume-claim backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcVolume>,
    /// OSS FUSE backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ossfs: Option<OssfsVolume>,
}

/// Host-path volume backend `{path}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct HostVolume {
    /// Absolute path on the host.
    pub path: String,
}

/// PVC volume backend.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct PvcVolume {
    /// Claim name.
    pub claim_name: String,
    /// Create the claim when missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_if_not_exists: Option<bool>,
    /// Delete the claim with the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_on_sandbox_termination: Option<bool>,
    /// Storage class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,
    /// Requested size (quantity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
    /// Access modes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_modes: Option<Vec<String>>,
}

/// OSSFS volume backend. `Debug` redacts the secret.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct OssfsVolume {
    /// Bucket name.
    pub bucket: String,
    /// OSS endpoint.
    pub endpoint: String,
    /// ossfs version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Raw mount options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<Vec<String>>,
    /// Access key id.
    pub access_key_id: String,
    /// Access key secret.
    pub access_key_secret: String,
}

impl fmt::Debug for OssfsVolume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OssfsVolume")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("version", &self.version)
            .field("options", &self.options)
            .field("access_key_id", &self.access_key_id)
            .field("access_key_secret", &"<redacted>")
            .finish()
    }
}

/// Lifecycle state of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum SandboxState {
    /// Being provisioned.
    Pending,
    /// Up.
    Running,
    /// Being paused.
    Pausing,
    /// Paused (frozen).
    Paused,
    /// Being resumed.
    Resuming,
    /// Being deleted.
    Stopping,
    /// Gone (deleted or expired).
    Terminated,
    /// Broken.
    Failed,
}

impl SandboxState {
    /// Every state, in lifecycle order.
    pub const ALL: [SandboxState; 8] = [
        SandboxState::Pending,
        SandboxState::Running,
        SandboxState::Pausing,
        SandboxState::Paused,
        SandboxState::Resuming,
        SandboxState::Stopping,
        SandboxState::Terminated,
        SandboxState::Failed,
    ];

    /// The wire name (`"Running"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Pending => "Pending",
            SandboxState::Running => "Running",
            SandboxState::Pausing => "Pausing",
            SandboxState::Paused => "Paused",
            SandboxState::Resuming => "Resuming",
            SandboxState::Stopping => "Stopping",
            SandboxState::Terminated => "Terminated",
            SandboxState::Failed => "Failed",
        }
    }

    /// True for `Terminated` and `Failed`, from which no transition leads out.
    pub fn is_final(self) -> bool {
        matches!(self, SandboxState::Terminated | SandboxState::Failed)
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error of [`SandboxState::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown sandbox state {0:?}; expected one of Pending, Running, Pausing, Paused, Resuming, Stopping, Terminated, Failed")]
pub struct UnknownSandboxState(pub String);

impl FromStr for SandboxState {
    type Err = UnknownSandboxState;

    /// Parses a state name, ignoring ASCII case (`"running"` is `Running`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SandboxState::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownSandboxState(s.to_string()))
    }
}

/// `status` of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct SandboxStatus {
    /// Current state.
    pub state: SandboxState,
    /// Short machine code (`user_delete`, `ttl_expiry`, `provision_timeout`, `runtime_error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When `state` last changed.
    #[serde(
        default,
        with = "super::timestamp::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub last_transition_at: Option<OffsetDateTime>,
}

impl SandboxStatus {
    /// A status with only `state` set.
    pub fn new(state: SandboxState) -> SandboxStatus {
        SandboxStatus {
            state,
            reason: None,
            message: None,
            last_transition_at: None,
        }
    }
}

/// The Sandbox object (`GET /v1/sandboxes/{id}`, list items, metadata PATCH response).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Sandbox {
    /// Sandbox id.
    pub id: String,
    /// Image started from (never with `auth`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSpec>,
    /// Snapshot restored from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// Status.
    pub status: SandboxStatus,
    /// User labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Entrypoint.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// Automatic expiry; omitted when there is none.
    #[serde(
        default,
        with = "super::timestamp::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<OffsetDateTime>,
    /// Creation time.
    #[serde(with = "super::timestamp::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Platform, only when constrained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

/// 202 body of `POST /v1/sandboxes` (no `image` / `snapshotId`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct CreateSandboxResponse {
    /// Sandbox id.
    pub id: String,
    /// Status (`Pending`, or `Running` when already true).
    pub status: SandboxStatus,
    /// User labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Platform, only when constrained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Automatic expiry; omitted when there is none.
    #[serde(
        default,
        with = "super::timestamp::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<OffsetDateTime>,
    /// Creation time.
    #[serde(with = "super::timestamp::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Entrypoint.
    #[serde(default)]
    pub entrypoint: Vec<String>,
}

impl From<Sandbox> for CreateSandboxResponse {
    fn from(s: Sandbox) -> Self {
        CreateSandboxResponse {
            id: s.id,
            status: s.status,
            metadata: s.metadata,
            platform: s.platform,
            expires_at: s.expires_at,
            created_at: s.created_at,
            entrypoint: s.entrypoint,
        }
    }
}

/// 200 body of `GET /v1/sandboxes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ListSandboxesResponse {
    /// The page's sandboxes.
    pub items: Vec<Sandbox>,
    /// Paging information.
    pub pagination: Pagination,
}

/// Paging information; all five fields are always present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Pagination {
    /// 1-based page number.
    pub page: u64,
    /// Items per page.
    pub page_size: u64,
    /// Items matching the filters.
    pub total_items: u64,
    /// `ceil(total_items / page_size)` (0 when there are no items).
    pub total_pages: u64,
    /// Whether a later page exists.
    pub has_next_page: bool,
}

impl Pagination {
    /// Computes the derived fields for `page` (≥ 1) of `page_size` (≥ 1) items out of
    /// `total_items`.
    pub fn new(page: u64, page_size: u64, total_items: u64) -> Pagination {
        let page = page.max(1);
        let page_size = page_size.max(1);
        let total_pages = total_items.div_ceil(page_size);
        Pagination {
            page,
            page_size,
            total_items,
            total_pages,
            has_next_page: page < total_pages,
        }
    }

    /// Index range of this page's items in the full, filtered list.
    pub fn range(&self) -> std::ops::Range<usize> {
        let start = self.page.saturating_sub(1).saturating_mul(self.page_size);
        let end = start.saturating_add(self.page_size).min(self.total_items);
        let clamp = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        clamp(start.min(end))..clamp(end)
    }
}

/// Body of `POST …/renew-expiration`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RenewExpirationRequest {
    /// Requested new expiry (converted to UTC).
    #[serde(with = "super::timestamp::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// 200 body of `POST …/renew-expiration`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RenewExpirationResponse {
    /// The new expiry.
    #[serde(with = "super::timestamp::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// 200 body of `GET …/endpoints/{port}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// `host[:port][/path]`, no scheme.
    pub endpoint: String,
    /// Headers the client must send on every request to the endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, String>>,
}

/// Error codes of the lifecycle API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// `SANDBOX::INVALID_PARAMETER` (400).
    InvalidParameter,
    /// `SANDBOX::INVALID_METADATA_LABEL` (400).
    InvalidMetadataLabel,
    /// `SANDBOX::API_NOT_SUPPORTED` (501).
    ApiNotSupported,
    /// `SANDBOX::UNKNOWN_ERROR` (500).
    UnknownError,
    /// `INVALID_METADATA_FORMAT` (400).
    InvalidMetadataFormat,
    /// `DOCKER::SANDBOX_NOT_FOUND` (404).
    SandboxNotFound,
    /// `DOCKER::SANDBOX_NOT_RUNNING` (409).
    SandboxNotRunning,
    /// `DOCKER::SANDBOX_NOT_PAUSED` (409).
    SandboxNotPaused,
    /// `DOCKER::INVALID_EXPIRATION` (400).
    InvalidExpiration,
    /// `DOCKER::EXPIRATION_NOT_EXTENDED` (409).
    ExpirationNotExtended,
    /// `DOCKER::INVALID_PORT` (400).
    InvalidPort,
    /// `MISSING_API_KEY` (401).
    MissingApiKey,
    /// `INVALID_API_KEY` (401).
    InvalidApiKey,
    /// `GENERAL::UNKNOWN_ERROR` (500), the fallback.
    GeneralUnknownError,
    /// `SANDBOX::QUOTA_EXCEEDED` (429): the server's or the tenant's maximum of sandboxes.
    QuotaExceeded,
    /// `SANDBOX::INVALID_SIGNATURE` (401): a signed endpoint whose signature is wrong or whose
    /// time is past.
    InvalidSignature,
    /// `KUBERNETES::POOL_NOT_FOUND` (404), upstream's code for an unknown pool.
    PoolNotFound,
    /// `KUBERNETES::POOL_ALREADY_EXISTS` (409).
    PoolAlreadyExists,
}

impl ErrorCode {
    /// The wire string, e.g. `"DOCKER::SANDBOX_NOT_FOUND"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidParameter => "SANDBOX::INVALID_PARAMETER",
            ErrorCode::InvalidMetadataLabel => "SANDBOX::INVALID_METADATA_LABEL",
            ErrorCode::ApiNotSupported => "SANDBOX::API_NOT_SUPPORTED",
            ErrorCode::UnknownError => "SANDBOX::UNKNOWN_ERROR",
            ErrorCode::InvalidMetadataFormat => "INVALID_METADATA_FORMAT",
            ErrorCode::SandboxNotFound => "DOCKER::SANDBOX_NOT_FOUND",
            ErrorCode::SandboxNotRunning => "DOCKER::SANDBOX_NOT_RUNNING",
            ErrorCode::SandboxNotPaused => "DOCKER::SANDBOX_NOT_PAUSED",
            ErrorCode::InvalidExpiration => "DOCKER::INVALID_EXPIRATION",
            ErrorCode::ExpirationNotExtended => "DOCKER::EXPIRATION_NOT_EXTENDED",
            ErrorCode::InvalidPort => "DOCKER::INVALID_PORT",
            ErrorCode::MissingApiKey => "MISSING_API_KEY",
            ErrorCode::InvalidApiKey => "INVALID_API_KEY",
            ErrorCode::GeneralUnknownError => "GENERAL::UNKNOWN_ERROR",
            ErrorCode::QuotaExceeded => "SANDBOX::QUOTA_EXCEEDED",
            ErrorCode::InvalidSignature => "SANDBOX::INVALID_SIGNATURE",
            ErrorCode::PoolNotFound => "KUBERNETES::POOL_NOT_FOUND",
            ErrorCode::PoolAlreadyExists => "KUBERNETES::POOL_ALREADY_EXISTS",
        }
    }

    /// The HTTP status this code is sent with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidParameter
            | ErrorCode::InvalidMetadataLabel
            | ErrorCode::InvalidMetadataFormat
            | ErrorCode::InvalidExpiration
            | ErrorCode::InvalidPort => 400,
            ErrorCode::MissingApiKey | ErrorCode::InvalidApiKey | ErrorCode::InvalidSignature => {
                401
            }
            ErrorCode::SandboxNotFound | ErrorCode::PoolNotFound => 404,
            ErrorCode::SandboxNotRunning
            | ErrorCode::PoolAlreadyExists
            | ErrorCode::SandboxNotPaused
            | ErrorCode::ExpirationNotExtended => 409,
            ErrorCode::UnknownError | ErrorCode::GeneralUnknownError => 500,
            ErrorCode::ApiNotSupported => 501,
            ErrorCode::QuotaExceeded => 429,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Body of every non-2xx response: `{"code","message"}`, both always present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorEnvelope {
    /// Namespaced code, normally one of [`ErrorCode`].
    pub code: String,
    /// Human-readable message.
    pub message: String,
}

impl ErrorEnvelope {
    /// Message of [`ErrorEnvelope::missing_api_key`].
    pub const MISSING_API_KEY_MESSAGE: &'static str =
        "Authentication credentials are missing. Provide API key via OPEN-SANDBOX-API-KEY header.";
    /// Message of [`ErrorEnvelope::invalid_api_key`].
    pub const INVALID_API_KEY_MESSAGE: &'static str =
        "Authentication credentials are invalid. Check your API key and try again.";
    /// Fallback message of `GENERAL::UNKNOWN_ERROR`.
    pub const UNKNOWN_ERROR_MESSAGE: &'static str = "An unexpected error occurred.";

    /// An envelope with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorEnvelope {
        ErrorEnvelope {
            code: code.as_str().to_string(),
            message: message.into(),
        }
    }

    /// The 401 body for a missing `OPEN-SANDBOX-API-KEY` header.
    pub fn missing_api_key() -> ErrorEnvelope {
        ErrorEnvelope::new(ErrorCode::MissingApiKey, Self::MISSING_API_KEY_MESSAGE)
    }

    /// The 401 body for a wrong API key.
    pub fn invalid_api_key() -> ErrorEnvelope {
        ErrorEnvelope::new(ErrorCode::InvalidApiKey, Self::INVALID_API_KEY_MESSAGE)
    }

    /// The 404 body for an unknown sandbox id.
    pub fn sandbox_not_found(id: &str) -> ErrorEnvelope {
        ErrorEnvelope::new(
            ErrorCode::SandboxNotFound,
            format!("Sandbox {id} not found."),
        )
    }
}
