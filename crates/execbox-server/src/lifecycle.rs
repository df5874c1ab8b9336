//! The OpenSandbox lifecycle API (`/v1/sandboxes…`) and its error envelope.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use execbox_proto::lifecycle::{
    self as wire, CreateSandboxResponse, Endpoint, ErrorCode, ErrorEnvelope, ListSandboxesQuery,
    ListSandboxesResponse, Pagination, RenewExpirationResponse, SandboxState,
};
// Named in the OpenAPI attributes only.
#[allow(unused_imports)]
use execbox_proto::lifecycle::{CreateSandboxRequest, RenewExpirationRequest, Sandbox};
use time::OffsetDateTime;

use crate::local::SandboxLimits;
use crate::registry::SandboxRecord;
use crate::{LaunchSpec, Server, Tenant};

/// A lifecycle API error: one variant per wire code family.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// 400 with a specific code.
    #[error("{message}")]
    Invalid {
        /// Wire code.
        code: ErrorCode,
        /// Message naming the field.
        message: String,
    },
    /// 404.
    #[error("sandbox {0} not found")]
    NotFound(String),
    /// 409 state conflicts.
    #[error("{message}")]
    Conflict {
        /// Wire code.
        code: ErrorCode,
        /// Message.
        message: String,
    },
    /// 501.
    #[error("{0}")]
    NotSupported(String),
    /// 502: a service the request needed (an image registry) failed.
    #[error("{0}")]
    Upstream(String),
    /// 401 on a signed endpoint: a wrong signature or a time past.
    #[error("{0}")]
    Unauthorized(String),
    /// 404 for an unknown pool.
    #[error("pool {0} not found")]
    PoolNotFound(String),
    /// 429: the server's or the tenant's maximum of sandboxes is reached.
    #[error("{0}")]
    TooMany(String),
    /// 503: something the request needs cannot be had now (a template that could not be
    /// built); the same request may succeed later.
    #[error("{0}")]
    Unavailable(String),
    /// 500.
    #[error("{0}")]
    Internal(String),
}

impl LifecycleError {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::Invalid {
            code: ErrorCode::InvalidParameter,
            message: message.into(),
        }
    }
}

/// The network a create asks for: its `networkPolicy` as a policy, within the network modes
/// the tenant may have (`allowlist` for a deny-by-default policy, `public` for an
/// allow-by-default one); none (loopback only) when absent. Errors name `field`.
pub(crate) fn network_of(
    server: &Server,
    tenant: &str,
    asked: Option<&wire::NetworkPolicy>,
    field: &str,
) -> std::result::Result<Option<execbox_net::Policy>, LifecycleError> {
    let Some(asked) = asked else {
        return Ok(None);
    };
    let mut asked = asked.clone();
    if let Some(rules) = &asked.egress {
        asked.egress = Some(
            crate::egress::expand_presets(
                rules,
                &server.config.network.registries,
                &format!("{field}.egress"),
            )
            .map_err(LifecycleError::invalid)?,
        );
    }
    let policy = execbox_net::Policy::from_wire(&asked, field)
        .map_err(|e| LifecycleError::invalid(e.to_string()))?;
    let mode = match policy.default {
        execbox_net::Action::Deny => "allowlist",
        execbox_net::Action::Allow => "public",
    };
    let allowed = &server.config.policy.for_tenant(tenant).network_modes;
    if !allowed.iter().any(|m| m == mode) {
        return Err(LifecycleError::invalid(format!(
            "{field}: network mode {mode:?} (defaultAction {}) is not allowed by this \
             server's policy (allowed: {})",
            if mode == "public" { "allow" } else { "deny" },
            allowed.join(", ")
        )));
    }
    server
        .network_available()
        .map_err(|why| LifecycleError::invalid(format!("{field}: {why}")))?;
    Ok(Some(policy))
}

impl From<wire::ValidationError> for LifecycleError {
    fn from(e: wire::ValidationError) -> Self {
        Self::Invalid {
            code: e.error_code(),
            message: e.to_string(),
        }
    }
}

impl From<crate::images::ResolveError> for LifecycleError {
    fn from(e: crate::images::ResolveError) -> Self {
        match e {
            crate::images::ResolveError::Invalid(_) => Self::invalid(e.to_string()),
            crate::images::ResolveError::Upstream(_) => Self::Upstream(e.to_string()),
            crate::images::ResolveError::Unavailable(_) => Self::Unavailable(e.to_string()),
        }
    }
}

impl From<crate::policy::LimitError> for LifecycleError {
    fn from(e: crate::policy::LimitError) -> Self {
        Self::invalid(e.to_string())
    }
}

impl IntoResponse for LifecycleError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            Self::Invalid { code, .. } => (StatusCode::BAD_REQUEST, *code),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, ErrorCode::SandboxNotFound),
            Self::Conflict { code, .. } => (StatusCode::CONFLICT, *code),
            Self::NotSupported(_) => (StatusCode::NOT_IMPLEMENTED, ErrorCode::ApiNotSupported),
            Self::Upstream(_) => (StatusCode::BAD_GATEWAY, ErrorCode::UnknownError),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::UnknownError),
            Self::TooMany(_) => (StatusCode::TOO_MANY_REQUESTS, ErrorCode::QuotaExceeded),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, ErrorCode::InvalidSignature),
            Self::PoolNotFound(_) => (StatusCode::NOT_FOUND, ErrorCode::PoolNotFound),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::UnknownError),
        };
        if status.is_server_error() {
            tracing::error!(error = %self, "lifecycle request failed");
        } else {
            // The client's mistake: worth a line, not an alarm.
            tracing::info!(status = status.as_u16(), error = %self, "lifecycle request refused");
        }
        let mut resp = (status, Json(ErrorEnvelope::new(code, self.to_string()))).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        resp
    }
}

type Result<T> = std::result::Result<T, LifecycleError>;

/// When a client refused for capacity may try again, in seconds.
const RETRY_AFTER_SECS: &str = "5";

/// Refuses a create beyond the server's or `tenant`'s maximum of sandboxes.
pub(crate) fn check_capacity(
    server: &Server,
    tenant: &str,
    policy: &crate::config::Policy,
) -> Result<()> {
    // Checked here too, before an image is pulled or a template built for nothing.
    server.check_server_capacity()?;
    check_tenant_capacity(&server.registry.all(), tenant, policy)
}

/// Refuses one more lifecycle sandbox for `tenant` beyond its maximum.
pub(crate) fn check_tenant_capacity(
    records: &[SandboxRecord],
    tenant: &str,
    policy: &crate::config::Policy,
) -> Result<()> {
    let tenant_max = policy.max_sandboxes_per_tenant;
    let mine = records
        .iter()
        .filter(|r| r.tenant == tenant && r.owner.is_none())
        .count();
    if tenant_max > 0 && mine >= tenant_max {
        return Err(LifecycleError::TooMany(format!(
            "tenant {tenant} has its maximum of {tenant_max} sandboxes; delete one or try again later"
        )));
    }
    Ok(())
}

pub(crate) fn host_arch() -> &'static str {
    wire::normalize_arch(std::env::consts::ARCH)
}

/// `POST /v1/sandboxes`.
#[utoipa::path(
    post,
    path = "/v1/sandboxes",
    operation_id = "createSandbox",
    tag = "lifecycle",
    description = "Creates a sandbox; answers as soon as it runs (or has failed).",
    request_body = CreateSandboxRequest,
    responses(
        (status = 202, description = "Created.", body = CreateSandboxResponse),
        (status = 400, description = "A field breaks a rule or exceeds the tenant's policy; the message names it.", body = ErrorEnvelope),
        (status = 401, description = "No or an unknown `OPEN-SANDBOX-API-KEY` (only when the server has keys): `MISSING_API_KEY` or `INVALID_API_KEY`.", body = ErrorEnvelope),
        (status = 413, description = "The body is over 2 MiB.", body = ErrorEnvelope),
        (status = 429, description = "The server's or the tenant's maximum of sandboxes is reached: `SANDBOX::QUOTA_EXCEEDED`, with `Retry-After`.", body = ErrorEnvelope),
        (status = 500, description = "The server failed: `SANDBOX::UNKNOWN_ERROR`.", body = ErrorEnvelope),
        (status = 502, description = "The image registry failed.", body = ErrorEnvelope),
        (status = 503, description = "A template the image needs cannot be built now.", body = ErrorEnvelope),
    ),
    security(("api_key" = []), ())
)]
pub async fn create(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    body: Bytes,
) -> Result<Response> {
    let req = wire::parse_create_request(&body)?;
    let v = req.validate(server.config.max_timeout_secs, host_arch())?;
    let record = match &v.pool_ref {
        Some(pool) => crate::sandbox_pools::acquire(&server, &tenant.0, &req, &v, pool).await?,
        None => {
            let spec = prepare(&server, &tenant.0, &req, &v, Capacity::Check).await?;
            server.launch(spec).await?
        }
    };
    let body = CreateSandboxResponse::from(record.to_api());
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// Whether [`prepare`] checks the server's and the tenant's maximum of sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Capacity {
    /// A create: refused at the maximum.
    Check,
    /// Only the request is checked (a pool's template when the pool is defined).
    Ignore,
}

/// Everything a create request asks for, checked against `tenant`'s policy and resolved (the
/// image pulled, the template built, the volumes found): what `Server::launch` starts.
pub(crate) async fn prepare(
    server: &Server,
    tenant: &str,
    req: &wire::CreateSandboxRequest,
    v: &wire::ValidatedCreate,
    capacity: Capacity,
) -> Result<LaunchSpec> {
    let image = req.image.as_ref().map(|i| i.uri.clone());
    // Upstream's credential proxy injects secrets into outbound requests; execbox has none, and
    // a sandbox that expects one must not start believing it is there.
    if req.credential_proxy.as_ref().is_some_and(|c| c.enabled) {
        return Err(LifecycleError::invalid(
            "credentialProxy.enabled: the credential proxy is not supported by this server",
        ));
    }
    if req.snapshot_id.is_some() {
        return Err(LifecycleError::invalid(
            "snapshotId: snapshots are not supported by this server",
        ));
    }
    let network = network_of(server, tenant, req.network_policy.as_ref(), "networkPolicy")?;
    // The policy of the caller's tenant bounds every limit; an absent one gets the maximum (a
    // sandbox is never unbounded).
    let policy = server.config.policy.for_tenant(tenant);
    let disk_field = match req.resource_limits.as_ref() {
        Some(l) if l.contains_key("ephemeral-storage") => "resourceLimits.ephemeral-storage",
        _ => "resourceLimits.disk",
    };
    let limits = SandboxLimits {
        cpu_millicores: Some(policy.cpu_millicores(
            "resourceLimits.cpu",
            v.cpu_millicores,
            policy.max_cpu_millicores(),
        )?),
        memory_bytes: Some(policy.memory(
            "resourceLimits.memory",
            v.memory_bytes,
            policy.max_memory_bytes,
        )?),
        pids: Some(policy.pids("resourceLimits.pids", v.pids, server.config.default_pids)?),
        disk_bytes: Some(policy.disk(
            disk_field,
            v.disk_bytes,
            server.config.storage.default_disk_bytes,
        )?),
        ..Default::default()
    };
    let lifetime = policy.lifetime_secs("timeout", v.timeout_secs)?;
    if capacity == Capacity::Check {
        check_capacity(server, tenant, &policy)?;
    }
    // Last of the checks: an image may take minutes to pull, a template to build, the first
    // time.
    let root = match &req.image {
        Some(image) => {
            let auth = image.auth.as_ref().map(|a| execbox_image::Credentials {
                username: a.username.clone(),
                password: a.password.clone(),
            });
            crate::images::resolve(&server.config, server.images.as_ref(), &image.uri, auth).await?
        }
        None => crate::images::RootSource::Template(crate::templates::DEFAULT_TEMPLATE.into()),
    };
    let template = match &root {
        crate::images::RootSource::Template(name) => prepare_template(server, name).await?,
        crate::images::RootSource::Image(_) => None,
    };
    let (volumes, named_volumes) = match req.volumes.clone().filter(|v| !v.is_empty()) {
        Some(wanted) => {
            let volumes = server.volumes.clone();
            let tenant_name = tenant.to_string();
            tokio::task::spawn_blocking(move || volumes.resolve(&tenant_name, &wanted))
                .await
                .map_err(|e| LifecycleError::Internal(e.to_string()))?
                .map_err(|e| LifecycleError::invalid(e.to_string()))?
        }
        None => (Vec::new(), Vec::new()),
    };
    Ok(LaunchSpec {
        tenant: tenant.to_string(),
        owner: None,
        image_uri: image,
        root,
        entrypoint: v.entrypoint.clone(),
        env: req.env.clone().unwrap_or_default(),
        metadata: req.metadata.clone().unwrap_or_default(),
        limits,
        expires_at: lifetime.map(expiry_in),
        network,
        template,
        volumes,
        named_volumes,
        renew_on_access_secs: v.renew_extend_secs,
    })
}

/// The time `secs` from now, in whole seconds.
pub(crate) fn expiry_in(secs: u64) -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now) + time::Duration::seconds(secs as i64)
}

/// The built template `name`, waiting for its build; none for the host's runtimes.
async fn prepare_template(
    server: &Server,
    name: &str,
) -> Result<Option<crate::templates::Prepared>> {
    server.templates.prepare(name).await.map_err(|e| {
        let message = format!("image.uri: the template {name:?} is not available: {e}");
        match e {
            execbox_image::template::TemplateError::Unknown(_) => LifecycleError::invalid(message),
            _ => LifecycleError::Unavailable(message),
        }
    })
}

/// The sandbox `id` if it belongs to `tenant`; another tenant's sandbox is as unknown.
pub(crate) fn find(server: &Server, id: &str, tenant: &Tenant) -> Result<SandboxRecord> {
    server
        .registry
        .get(id)
        .filter(|r| r.tenant == tenant.0 && r.owner.is_none())
        .ok_or_else(|| LifecycleError::NotFound(id.to_string()))
}

/// `GET /v1/sandboxes/{id}`.
#[utoipa::path(
    get,
    path = "/v1/sandboxes/{id}",
    operation_id = "getSandbox",
    tag = "lifecycle",
    description = "One sandbox.",
    params(
        ("id" = String, Path, description = "Sandbox id."),
    ),
    responses(
        (status = 200, description = "The sandbox.", body = Sandbox),
        (status = 401, description = "No or an unknown `OPEN-SANDBOX-API-KEY` (only when the server has keys): `MISSING_API_KEY` or `INVALID_API_KEY`.", body = ErrorEnvelope),
        (status = 404, description = "No such sandbox for this tenant: `DOCKER::SANDBOX_NOT_FOUND`.", body = ErrorEnvelope),
    ),
    security(("api_key" = []), ())
)]
pub async fn get(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Response> {
    Ok(Json(find(&server, &id, &tenant)?.to_api()).into_response())
}

/// `GET /v1/sandboxes`.
#[utoipa::path(
    get,
    path = "/v1/sandboxes",
    operation_id = "listSandboxes",
    tag = "lifecycle",
    description = "The tenant's sandboxes, filtered and paged.",
    params(
        ("state" = Option<Vec<String>>, Query, description = "States to keep (OR-ed); any string is accepted."),
        ("metadata" = Option<String>, Query, description = "`key=value` pairs joined by `&` (URL-encoded), all of which must match."),
        ("page" = Option<i64>, Query, description = "1-based page number."),
        ("pageSize" = Option<i64>, Query, description = "Items per page."),
    ),
    responses(
        (status = 200, description = "A page of sandboxes.", body = ListSandboxesResponse),
        (status = 400, description = "A malformed filter or page.", body = ErrorEnvelope),
        (status = 401, description = "No or an unknown `OPEN-SANDBOX-API-KEY` (only when the server has keys): `MISSING_API_KEY` or `INVALID_API_KEY`.", body = ErrorEnvelope),
    ),
    security(("api_key" = []), ())
)]
pub async fn list(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    RawQuery(q): RawQuery,
) -> Result<Response> {
    let query = ListSandboxesQuery::parse(q.as_deref().unwrap_or("")).map_err(|e| {
        let env = e.to_envelope();
        LifecycleError::Invalid {
            code: e.error_code(),
            message: env.message,
        }
    })?;
    let matching: Vec<_> = server
        .registry
        .all()
        .into_iter()
        .filter(|r| {
            r.tenant == tenant.0 && r.owner.is_none() && query.matches(r.state, Some(&r.metadata))
        })
        .collect();
    let pagination = Pagination::new(query.page, query.page_size, matching.len() as u64);
    let range = pagination.range();
    let items = matching
        .get(range.start.min(matching.len())..range.end.min(matching.len()))
        .unwrap_or_default()
        .iter()
        .map(SandboxRecord::to_api)
        .collect();
    Ok(Json(ListSandboxesResponse { items, pagination }).into_response())
}

/// `DELETE /v1/sandboxes/{id}`.
#[utoipa::path(
    delete,
    path = "/v1/sandboxes/{id}",
    operation_id = "deleteSandbox",
    tag = "lifecycle",
    description = "Deletes a sandbox and everything it holds.",
    params(
        ("id" = String, Path, description = "Sandbox id."),
    ),
    responses(
        (status = 204, description = "Deleted."),
        (status = 401, description = "No or an unknown `OPEN-SANDBOX-API-KEY` (only when the server has keys): `MISSING_API_KEY` or `INVALID_API_KEY`.", body = ErrorEnvelope),
        (status = 404, description = "No such sandbox for this tenant: `DOCKER::SANDBOX_NOT_FOUND`.", body = ErrorEnvelope),
        (status = 500, description = "The server failed: `SANDBOX::UNKNOWN_ERROR`.", body = ErrorEnvelope),
    ),
    security(("api_key" = []), ())
)]
pub async fn delete(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Response> {
    find(&server, &id, &tenant)?;
    server.destroy(&id, "user_delete").await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Freezes or thaws a sandbox: the two transitions differ only in their states and codes.
async fn transition(
    server: Arc<Server>,
    tenant: Tenant,
    id: String,
    pause: bool,
) -> Result<Response> {
    let (from, code) = if pause {
        (SandboxState::Running, ErrorCode::SandboxNotRunning)
    } else {
        (SandboxState::Paused, ErrorCode::SandboxNotPaused)
    };
    let rec = find(&server, &id, &tenant)?;
    if rec.state != from {
        return Err(LifecycleError::Conflict {
            code,
            message: format!("sandbox {id} is {}, not {from}", rec.state),
        });
    }
    server.freeze(&id, pause).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

/// `POST /v1/sandboxes/{id}/pause`.
#[utoipa::path(
    post,
    path = "/v1/sandboxes/{id}/pause",
    operation_id = "pauseSandbox",
    tag = "lifecycle",
    description = "Freezes a running sandbox.",
    params(
        ("id" = String, Path, description = "Sandbox id."),
    ),
    responses(
        (status = 202, description = "Paused."),
        (status = 401, description = "No or an unknown `OPEN-SANDBOX-API-KEY` (only when the server has keys): `MISSING_API_KEY` or `INVALID_API_KEY`.", body = ErrorEnvelope),
        (status = 404, description = "No such sandbox for this tenant: `DOCKER::SANDBOX_NOT_FOUND`.", body = ErrorEnvelope),
        (status = 409, description = "The sandbox is not running: `DOCKER::SANDBOX_NOT_RUNNING`.", body = ErrorEnvelope),
        (status = 500, description = "The server failed: `SANDBOX::UNKNOWN_ERROR`.", body = ErrorEnvelope),
    ),
    security(("api_key" = []), ())
)]
pub async fn pause(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Response> {
    transition(server, tenant, id, true).await
}

/// `POST /v1/sandboxes/{id}/resume`.
#[utoipa::path(
    post,
    path = "/v1/sandboxes/{id}/resume",
    operation_id = "resumeSandbox",
    tag = "lifecycle",
    description = "Thaws a paused sandbox.",
    params(
        ("id" = String, Path, description = "Sandbox id."),
    ),
    responses(
        (status = 202, description = "Resumed."),
        (status = 401, description = "No or an unknown `OPEN-SANDBOX-API-KEY` (only when the server has keys): `MISSING_API_KEY` or `INVALID_API_KEY`.", body = ErrorEnvelope),
        (status = 404, description = "No such sandbox for this tenant: `DOCKER::SANDBOX_NOT_FOUND`.", body = ErrorEnvelope),
        (status = 409, description = "The sandbox is not paused: `DOCKER::SANDBOX_NOT_PAUSED`.", body = ErrorEnvelope),
        (status = 500, description = "The server failed: `SANDBOX::UNKNOWN_ERROR`.", body = ErrorEnvelope),
    ),
    security(("api_key" = []), ())
)]
pub async fn resume(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Response> {
    transition(server, tenant, id, false).await
}

/// `POST /v1/sandboxes/{id}/renew-expiration`.
#[utoipa::path(
    post,
    path = "/v1/sandboxes/{id}/renew-expiration",
    operation_id = "renewSandboxExpiration",
    tag = "lifecycle",
    description = "Sets a new expiry (any future time within the server's and the tenant's bounds).",
    params(
        ("id" = String, Path, description = "Sandbox id."),
    ),
    request_body = RenewExpirationRequest,
    responses(
        (status = 200, description = "The new expiry.", body = RenewExpirationResponse),
        (status = 400, description = "A malformed body or an expiry out of bounds: `DOCKER::INVALID_EXPIRATION`.", body = ErrorEnvelope),
        (status = 401, description = "No or an unknown `OPEN-SANDBOX-API-KEY` (only when the server has keys): `MISSING_API_KEY` or `INVALID_API_KEY`.", body = ErrorEnvelope),
        (status = 404, description = "No such sandbox for this tenant: `DOCKER::SANDBOX_NOT_FOUND`.", body = ErrorEnvelope),
        (status = 500, description = "The server failed: `SANDBOX::UNKNOWN_ERROR`.", body = ErrorEnvelope),
    ),
    security(("api_key" = []), ())
)]
pub async fn renew(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response> {
    let rec = find(&server, &id, &tenant)?;
    let req = wire::parse_renew_request(&body)?;
    let now = OffsetDateTime::now_utc();
    if req.expires_at <= now {
        return Err(LifecycleError::Invalid {
            code: ErrorCode::InvalidExpiration,
            message: "expiresAt: must be in the future".into(),
        });
    }
    // Any future expiry, earlier than the current one too (upstream's pool shortens
    // expiries when it hands a sandbox out).
    let max = now + time::Duration::seconds(server.config.max_timeout_secs as i64);
    if req.expires_at > max {
        return Err(LifecycleError::Invalid {
            code: ErrorCode::InvalidExpiration,
            message: format!(
                "expiresAt: at most {} seconds from now",
                server.config.max_timeout_secs
            ),
        });
    }
    // The tenant's lifetime bound counts from creation: renewing cannot extend it.
    if let Some(life) = server.config.policy.for_tenant(&tenant.0).max_lifetime_secs {
        let end = rec.created_at + time::Duration::seconds(life as i64);
        if req.expires_at > end {
            return Err(LifecycleError::Invalid {
                code: ErrorCode::InvalidExpiration,
                message: format!(
                    "expiresAt: exceeds server maximum lifetime of {life} seconds from the \
                     sandbox's creation"
                ),
            });
        }
    }
    server
        .registry
        .update(&id, |r| r.expires_at = Some(req.expires_at))
        .ok_or_else(|| LifecycleError::NotFound(id.clone()))?
        .map_err(|e| LifecycleError::Internal(e.to_string()))?;
    server
        .events
        .record(&id, format!("expiry renewed to {}", req.expires_at));
    Ok(Json(RenewExpirationResponse {
        expires_at: req.expires_at,
    })
    .into_response())
}

/// `PATCH /v1/sandboxes/{id}/metadata`.
#[utoipa::path(
    patch,
    path = "/v1/sandboxes/{id}/metadata",
    operation_id = "patchSandboxMetadata",
    tag = "lifecycle",
    description = "JSON merge patch of the sandbox's metadata: a string sets a key, `null` removes it.",
    params(
        ("id" = String, Path, description = "Sandbox id."),
    ),
    request_body(content = BTreeMap<String, Option<String>>, content_type = "application/json", description = "Keys to set (strings) or remove (`null`)."),
    responses(
        (status = 200, description = "The sandbox with its new metadata.", body = Sandbox),
        (status = 400, description = "Not an object, or a label breaking Kubernetes' rules.", body = ErrorEnvelope),
        (status = 401, description = "No or an unknown `OPEN-SANDBOX-API-KEY` (only when the server has keys): `MISSING_API_KEY` or `INVALID_API_KEY`.", body = ErrorEnvelope),
        (status = 404, description = "No such sandbox for this tenant: `DOCKER::SANDBOX_NOT_FOUND`.", body = ErrorEnvelope),
        (status = 500, description = "The server failed: `SANDBOX::UNKNOWN_ERROR`.", body = ErrorEnvelope),
    ),
    security(("api_key" = []), ())
)]
pub async fn patch_metadata(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response> {
    let rec = find(&server, &id, &tenant)?;
    let patch = wire::parse_metadata_patch(&body)?;
    let mut metadata = rec.metadata.clone();
    wire::apply_metadata_merge_patch(&mut metadata, &patch)?;
    let rec = server
        .registry
        .update(&id, |r| r.metadata = metadata)
        .ok_or_else(|| LifecycleError::NotFound(id.clone()))?
        .map_err(|e| LifecycleError::Internal(e.to_string()))?;
    Ok(Json(rec.to_api()).into_response())
}

/// The query of `GET …/endpoints/{port}`.
#[derive(Debug, Default, serde::Deserialize)]
struct EndpointQuery {
    use_server_proxy: Option<String>,
    expires: Option<String>,
}

/// `GET /v1/sandboxes/{id}/endpoints/{port}`: always the server's proxy (execbox has no other
/// route into a sandbox), so `use_server_proxy` changes nothing; with `expires` (Unix
/// seconds), a signed route that needs no header until then (see `signed.rs`).
#[utoipa::path(
    get,
    path = "/v1/sandboxes/{id}/endpoints/{port}",
    operation_id = "getSandboxEndpoint",
    tag = "lifecycle",
    description = "Where a port of the sandbox is reached (through this server's proxy), and the headers to send.",
    params(
        ("id" = String, Path, description = "Sandbox id."),
        ("port" = String, Path, description = "Port inside the sandbox (1-65535)."),
        ("use_server_proxy" = Option<bool>, Query, description = "Accepted; execbox always answers with its proxy."),
        ("expires" = Option<String>, Query, description = "Unix seconds: a signed route, reachable without headers until then."),
    ),
    responses(
        (status = 200, description = "The endpoint.", body = Endpoint),
        (status = 400, description = "Not a port number (`DOCKER::INVALID_PORT`), a bad `expires` or `use_server_proxy`, or both `expires` and `use_server_proxy=true`.", body = ErrorEnvelope),
        (status = 401, description = "No or an unknown `OPEN-SANDBOX-API-KEY` (only when the server has keys): `MISSING_API_KEY` or `INVALID_API_KEY`.", body = ErrorEnvelope),
        (status = 404, description = "No such sandbox for this tenant: `DOCKER::SANDBOX_NOT_FOUND`.", body = ErrorEnvelope),
    ),
    security(("api_key" = []), ())
)]
pub async fn endpoint(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    Path((id, port)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response> {
    let rec = find(&server, &id, &tenant)?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or(LifecycleError::Invalid {
            code: ErrorCode::InvalidPort,
            message: format!("port: {port:?} is not a port number (1-65535)"),
        })?;
    let query: EndpointQuery = serde_urlencoded::from_str(q.as_deref().unwrap_or(""))
        .map_err(|e| LifecycleError::invalid(format!("query: {e}")))?;
    let use_server_proxy = match query.use_server_proxy.as_deref() {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("true") || v == "1" => true,
        Some(v) if v.eq_ignore_ascii_case("false") || v == "0" => false,
        Some(v) => {
            return Err(LifecycleError::invalid(format!(
                "use_server_proxy: {v:?} is not a boolean"
            )))
        }
    };
    let host = server.config.public_address.clone().unwrap_or_else(|| {
        headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .unwrap_or_else(|| server.config.listen.to_string())
    });
    if let Some(expires) = query.expires {
        if use_server_proxy {
            return Err(LifecycleError::invalid(
                "expires: cannot be combined with use_server_proxy=true",
            ));
        }
        // The egress API decides what the sandbox may reach: only the sandbox's token or a
        // key of its tenant opens it, never a URL that may be handed around.
        if port == crate::proxy::EGRESS_PORT {
            return Err(LifecycleError::invalid(format!(
                "expires: port {port} (the egress API) has no signed endpoint"
            )));
        }
        let expires_at = parse_expires(&expires, server.config.max_timeout_secs)?;
        let expires_b36 = crate::signed::to_b36(expires_at);
        let signature = server.endpoint_signer()?.sign(&id, port, &expires_b36);
        return Ok(Json(Endpoint {
            endpoint: format!("{host}/v1/sandboxes/{id}/signed/{port}/{expires_b36}/{signature}"),
            headers: None,
        })
        .into_response());
    }
    let mut h = BTreeMap::new();
    h.insert("X-EXECD-ACCESS-TOKEN".to_string(), rec.token);
    Ok(Json(Endpoint {
        endpoint: format!("{host}/v1/sandboxes/{id}/proxy/{port}"),
        headers: Some(h),
    })
    .into_response())
}

/// The `expires` of an endpoint request: decimal Unix seconds, in the future and at most the
/// server's longest lifetime from now.
fn parse_expires(raw: &str, max_secs: u64) -> Result<u64> {
    let canonical = !raw.is_empty()
        && raw.len() <= 20
        && raw.bytes().all(|b| b.is_ascii_digit())
        && (raw == "0" || !raw.starts_with('0'));
    let value: u64 = raw.parse().ok().filter(|_| canonical).ok_or_else(|| {
        LifecycleError::invalid(format!(
            "expires: {raw:?} is not a time in Unix seconds (a decimal integer)"
        ))
    })?;
    let now = OffsetDateTime::now_utc().unix_timestamp().max(0) as u64;
    if value <= now {
        return Err(LifecycleError::invalid(
            "expires: must be in the future (Unix seconds, not milliseconds)",
        ));
    }
    if value - now > max_secs {
        return Err(LifecycleError::invalid(format!(
            "expires: at most {max_secs} seconds from now"
        )));
    }
    Ok(value)
}

/// Snapshot routes: not supported.
#[utoipa::path(
    get,
    path = "/v1/snapshots",
    operation_id = "listSnapshots",
    tag = "lifecycle",
    description = "Snapshots are not supported by this server (also `POST /v1/sandboxes/{id}/snapshots`, `GET` and `DELETE /v1/snapshots/{sid}`).",
    responses(
        (status = 501, description = "`SANDBOX::API_NOT_SUPPORTED`.", body = ErrorEnvelope),
        (status = 401, description = "No or an unknown `OPEN-SANDBOX-API-KEY` (only when the server has keys): `MISSING_API_KEY` or `INVALID_API_KEY`.", body = ErrorEnvelope),
    ),
    security(("api_key" = []), ())
)]
pub async fn snapshots_unsupported() -> LifecycleError {
    LifecycleError::NotSupported("snapshots are not supported by this server".into())
}
