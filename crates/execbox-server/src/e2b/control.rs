//! The E2B control plane (§2): `/v2/sandboxes…` and `/sandboxes…`, with `X-API-Key` (or
//! `Authorization: Bearer`) and execbox's tenants. E2B sandboxes are ordinary execbox
//! sandboxes: same registry, limits, policy and expiry (`expires_at`), visible to the
//! OpenSandbox API of the same tenant.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use execbox_proto::e2b as wire;
use execbox_proto::lifecycle::{self as lwire, SandboxState};
use time::OffsetDateTime;

use crate::lifecycle::{Capacity, LifecycleError};
use crate::registry::SandboxRecord;
use crate::{Server, Tenant};

/// A control-plane error: its status and message, answered as `{"code","message"}`.
#[derive(Debug)]
pub struct E2bError {
    status: StatusCode,
    message: String,
}

impl E2bError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found(id: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, wire::sandbox_not_found(id))
    }

    fn unsupported(feature: &str) -> Self {
        Self::new(
            StatusCode::NOT_IMPLEMENTED,
            format!("{feature} is not supported by execbox"),
        )
    }
}

/// The one place where execbox's errors become E2B's control-plane envelope.
impl From<LifecycleError> for E2bError {
    fn from(e: LifecycleError) -> Self {
        let status = match &e {
            LifecycleError::Invalid { .. } => StatusCode::BAD_REQUEST,
            LifecycleError::NotFound(id) => return Self::not_found(id),
            LifecycleError::Conflict { .. } => StatusCode::CONFLICT,
            LifecycleError::NotSupported(_) => StatusCode::NOT_IMPLEMENTED,
            LifecycleError::Upstream(_) => StatusCode::BAD_GATEWAY,
            LifecycleError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            LifecycleError::PoolNotFound(_) => StatusCode::NOT_FOUND,
            LifecycleError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
            LifecycleError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            LifecycleError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.to_string())
    }
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() && self.status != StatusCode::NOT_IMPLEMENTED {
            tracing::error!(status = self.status.as_u16(), error = %self.message, "E2B request failed");
        } else {
            tracing::info!(status = self.status.as_u16(), error = %self.message, "E2B request refused");
        }
        let mut resp = (
            self.status,
            Json(wire::ErrorBody {
                code: self.status.as_u16(),
                message: self.message,
            }),
        )
            .into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        resp
    }
}

type Result<T> = std::result::Result<T, E2bError>;

/// `X-API-Key: <key>` or `Authorization: Bearer <key>`: the key's tenant, else 401.
pub async fn auth(State(server): State<Arc<Server>>, req: Request, next: Next) -> Response {
    let key = {
        let h = req.headers();
        let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok());
        let bearer = get("authorization").and_then(|a| a.strip_prefix("Bearer "));
        get("x-api-key").or(bearer).map(str::to_string)
    };
    let Some(tenant) = server.tenant_of(key.as_deref()).await else {
        let message = if key.is_none() {
            "missing API key: send it as X-API-Key"
        } else {
            "Invalid API key"
        };
        return E2bError::new(StatusCode::UNAUTHORIZED, message).into_response();
    };
    let mut req = req;
    req.extensions_mut().insert(Tenant(tenant.clone()));
    let mut resp = next.run(req).await;
    resp.extensions_mut().insert(Tenant(tenant));
    resp
}

/// The sandbox `id` if it is `tenant`'s and reachable by the lifecycle APIs (no owner).
fn find(server: &Server, id: &str, tenant: &Tenant) -> Result<SandboxRecord> {
    crate::lifecycle::find(server, id, tenant).map_err(|_| E2bError::not_found(id))
}

/// A body that does not parse: serde's message without the strings it quotes (`envVars` given
/// as a string would otherwise be echoed, and logged).
fn body_error(e: serde_json::Error) -> E2bError {
    E2bError::bad_request(format!(
        "body: {}",
        crate::secrets::redact_json_error(&e.to_string())
    ))
}

fn parse_body<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(body_error)
}

/// What an E2B template id names here: the execbox template (or image reference) its
/// sandboxes start from; 404 when unknown.
fn template_target(server: &Server, asked: &str) -> Result<String> {
    let name = wire::template_name(asked);
    let target = match name {
        "base" => crate::templates::DEFAULT_TEMPLATE.to_string(),
        "code-interpreter-v1" | "code-interpreter" => {
            execbox_image::template::CODE_INTERPRETER.to_string()
        }
        // The operator's aliases (`[images]`) add names.
        other => match server.config.alias_of(other) {
            Some(target) => target.to_string(),
            None if server.config.is_template(other) => other.to_string(),
            None => {
                return Err(E2bError::new(
                    StatusCode::NOT_FOUND,
                    wire::template_not_found(asked),
                ))
            }
        },
    };
    Ok(target)
}

/// A lifetime asked for in seconds: positive and within the server's maximum.
fn lifetime(server: &Server, asked: Option<i64>, default: u64) -> Result<u64> {
    let secs = match asked {
        None => default,
        Some(t) if t <= 0 => {
            return Err(E2bError::bad_request(
                "timeout: must be a positive number of seconds",
            ))
        }
        Some(t) => t as u64,
    };
    let max = server.config.max_timeout_secs;
    if secs > max {
        return Err(E2bError::bad_request(format!(
            "timeout: must be at most {max} seconds"
        )));
    }
    Ok(secs)
}

/// The egress policy a create asks for, as OpenSandbox's `networkPolicy` (§6): none without
/// `allow_internet_access` or `network` (execbox's default, loopback only);
/// `allow_internet_access: true` or a `denyOut` allows by default; `allowOut` entries are
/// allowed first (they win over `denyOut`); `allow_internet_access: false`, a `denyOut` of
/// `0.0.0.0/0` or an `allowOut` alone deny everything else.
fn network_policy(
    allow_internet: Option<bool>,
    network: Option<&wire::NetworkConfig>,
) -> Option<lwire::NetworkPolicy> {
    let allow_out = network
        .and_then(|n| n.allow_out.clone())
        .unwrap_or_default();
    let deny_out = network.and_then(|n| n.deny_out.clone()).unwrap_or_default();
    if allow_internet.is_none() && allow_out.is_empty() && deny_out.is_empty() {
        return None;
    }
    let deny_all = allow_internet == Some(false)
        || deny_out.iter().any(|d| d == "0.0.0.0/0" || d == "::/0")
        || (allow_internet.is_none() && deny_out.is_empty());
    let mut egress: Vec<lwire::EgressRule> = allow_out
        .into_iter()
        .map(|target| lwire::EgressRule {
            action: lwire::NetworkAction::Allow,
            target,
        })
        .collect();
    if !deny_all {
        egress.extend(deny_out.into_iter().map(|target| lwire::EgressRule {
            action: lwire::NetworkAction::Deny,
            target,
        }));
    }
    Some(lwire::NetworkPolicy {
        default_action: Some(if deny_all {
            lwire::NetworkAction::Deny
        } else {
            lwire::NetworkAction::Allow
        }),
        egress: Some(egress),
    })
}

fn check_env(env: &BTreeMap<String, String>) -> Result<()> {
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(E2bError::bad_request(format!(
                "envVars.{k}: a variable name must be non-empty, without '=' or NUL"
            )));
        }
        if v.contains('\0') {
            return Err(E2bError::bad_request(format!(
                "envVars.{k}: value must not contain NUL"
            )));
        }
    }
    Ok(())
}

fn check_metadata(metadata: &BTreeMap<String, String>) -> Result<()> {
    for (k, v) in metadata {
        if k.is_empty() || k.contains('\0') || v.contains('\0') {
            return Err(E2bError::bad_request(format!(
                "metadata.{k}: keys must be non-empty and neither key nor value may contain NUL"
            )));
        }
    }
    Ok(())
}

/// The `Sandbox` object of create and connect.
fn sandbox_object(server: &Server, rec: &SandboxRecord) -> wire::Sandbox {
    let template = template_of(rec);
    wire::Sandbox {
        sandbox_id: rec.id.clone(),
        template_id: template.clone(),
        client_id: wire::CLIENT_ID.into(),
        envd_version: wire::ENVD_VERSION.into(),
        alias: Some(template),
        envd_access_token: rec.token.clone(),
        traffic_access_token: Some(rec.token.clone()),
        domain: server.config.e2b.domain.clone(),
    }
}

/// The E2B template of a sandbox: the one it was created from, else its image.
fn template_of(rec: &SandboxRecord) -> String {
    rec.e2b
        .as_ref()
        .map(|e| e.template.clone())
        .or_else(|| rec.image_uri.clone())
        .unwrap_or_else(|| crate::templates::DEFAULT_TEMPLATE.to_string())
}

/// Far in the future, for sandboxes without an expiry (from other surfaces).
fn far_future() -> OffsetDateTime {
    time::macros::datetime!(9999-12-31 23:59:59 UTC)
}

/// `SandboxDetail` (`detail`) or `ListedSandbox`.
fn detail(server: &Server, rec: &SandboxRecord, detail: bool) -> wire::SandboxDetail {
    let template = template_of(rec);
    let mib = |b: Option<u64>| b.unwrap_or(0) >> 20;
    wire::SandboxDetail {
        template_id: template.clone(),
        alias: Some(template),
        sandbox_id: rec.id.clone(),
        client_id: wire::CLIENT_ID.into(),
        started_at: lwire::timestamp::format_rfc3339(rec.created_at),
        end_at: lwire::timestamp::format_rfc3339(rec.expires_at.unwrap_or_else(far_future)),
        envd_version: wire::ENVD_VERSION.into(),
        cpu_count: rec
            .limits
            .cpu_millicores
            .unwrap_or(1000)
            .div_ceil(1000)
            .max(1),
        memory_mb: mib(rec.limits.memory_bytes),
        disk_size_mb: mib(rec.limits.sandbox_bytes.or(rec.limits.disk_bytes)),
        metadata: rec.metadata.clone(),
        state: e2b_state(rec.state).to_string(),
        envd_access_token: detail.then(|| rec.token.clone()),
        domain: if detail {
            server.config.e2b.domain.clone()
        } else {
            None
        },
        allow_internet_access: detail.then(|| {
            rec.network
                .as_ref()
                .is_some_and(|n| n.default_action == Some(lwire::NetworkAction::Allow))
        }),
        lifecycle: detail.then(|| wire::Lifecycle {
            auto_resume: rec.e2b.as_ref().is_some_and(|e| e.auto_resume),
            on_timeout: if rec.pauses_at_expiry() {
                "pause"
            } else {
                "kill"
            }
            .into(),
        }),
        volume_mounts: Vec::new(),
    }
}

/// E2B knows two states: a paused sandbox is `paused`, every other one `running`.
fn e2b_state(state: SandboxState) -> &'static str {
    if state == SandboxState::Paused {
        "paused"
    } else {
        "running"
    }
}

/// `POST /v2/sandboxes`.
pub async fn create_v2(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    create(server, tenant, &headers, &body, wire::DEFAULT_TIMEOUT_SECS).await
}

/// `POST /sandboxes` (older SDKs).
pub async fn create_v1(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    create(
        server,
        tenant,
        &headers,
        &body,
        wire::DEFAULT_TIMEOUT_SECS_V1,
    )
    .await
}

/// How long an `Idempotency-Key` names the sandbox its create made.
const IDEMPOTENCY_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

/// The sandboxes made by creates with an `Idempotency-Key`, per (tenant, key), for
/// [`IDEMPOTENCY_WINDOW`].
type IdempotencyMap = std::collections::HashMap<(String, String), (String, std::time::Instant)>;

fn idempotency() -> std::sync::MutexGuard<'static, IdempotencyMap> {
    static KEYS: std::sync::OnceLock<std::sync::Mutex<IdempotencyMap>> = std::sync::OnceLock::new();
    let mut keys = KEYS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    keys.retain(|_, (_, at)| at.elapsed() < IDEMPOTENCY_WINDOW);
    keys
}

/// The create's `Idempotency-Key` (1–255 of `[a-z0-9-]`), if any.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = v.to_str().unwrap_or_default();
    let valid = (1..=255).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        return Err(E2bError::bad_request(
            "Idempotency-Key: 1 to 255 lowercase letters, digits or hyphens",
        ));
    }
    Ok(Some(key.to_string()))
}

async fn create(
    server: Arc<Server>,
    tenant: Tenant,
    headers: &HeaderMap,
    body: &[u8],
    default_timeout: u64,
) -> Result<Response> {
    // A repeated create (a retry whose answer was lost) gets the sandbox the first one made.
    let idem = idempotency_key(headers)?;
    if let Some(key) = &idem {
        let earlier = idempotency()
            .get(&(tenant.0.clone(), key.clone()))
            .map(|(id, _)| id.clone());
        if let Some(rec) = earlier.and_then(|id| find(&server, &id, &tenant).ok()) {
            return Ok((StatusCode::CREATED, Json(sandbox_object(&server, &rec))).into_response());
        }
    }
    let req: wire::NewSandbox = serde_json::from_slice(body).map_err(body_error)?;
    let template_id = req
        .template_id
        .clone()
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| E2bError::bad_request("templateID: is required"))?;
    if req.mcp.as_ref().is_some_and(|m| !m.is_null()) {
        return Err(E2bError::new(
            StatusCode::NOT_FOUND,
            wire::template_not_found("mcp-gateway"),
        ));
    }
    if let Some(why) = req.unsupported() {
        return Err(E2bError::bad_request(why));
    }
    let target = template_target(&server, &template_id)?;
    let secs = lifetime(&server, req.timeout, default_timeout)?;
    let env = req.env_vars.clone().unwrap_or_default();
    check_env(&env)?;
    let metadata = req.metadata.clone().unwrap_or_default();
    check_metadata(&metadata)?;
    let network = crate::lifecycle::network_of(
        &server,
        &tenant.0,
        network_policy(req.allow_internet_access, req.network.as_ref()).as_ref(),
        "network",
    )?;
    // What the lifecycle API checks of a create (the environment's size against one exec…),
    // then the E2B-only parts: metadata values are free text here, and v1's 15 s default is
    // below the lifecycle API's minimum timeout.
    let mut lreq = lwire::CreateSandboxRequest {
        image: Some(lwire::ImageSpec {
            uri: target,
            auth: None,
        }),
        entrypoint: Some(
            lwire::DEFAULT_ENTRYPOINT
                .iter()
                .map(|s| s.to_string())
                .collect(),
        ),
        resource_limits: Some(BTreeMap::new()),
        env: Some(env),
        ..Default::default()
    };
    let mut v = lreq
        .validate(
            server.config.max_timeout_secs,
            crate::lifecycle::host_arch(),
        )
        .map_err(|e| {
            let field = match e.field.strip_prefix("env") {
                Some(rest) => format!("envVars{rest}"),
                None => e.field.clone(),
            };
            E2bError::bad_request(format!("{field}: {}", e.message))
        })?;
    lreq.metadata = Some(metadata);
    v.timeout_secs = Some(secs);
    let mut spec =
        crate::lifecycle::prepare(&server, &tenant.0, &lreq, &v, Capacity::Check).await?;
    // Always an expiry: E2B sandboxes end at their timeout.
    if spec.expires_at.is_none() {
        spec.expires_at = Some(crate::lifecycle::expiry_in(secs));
    }
    spec.network = network;
    let rec = server.launch(spec).await?;
    let settings = crate::registry::E2bSettings {
        template: template_id.clone(),
        timeout_secs: secs,
        auto_pause: req.auto_pause == Some(true),
        auto_resume: req.auto_resume.as_ref().is_some_and(|a| a.enabled),
    };
    let rec = match server.registry.update(&rec.id, |r| r.e2b = Some(settings)) {
        Some(Ok(r)) => r,
        _ => rec,
    };
    if let Some(key) = idem {
        idempotency().insert(
            (tenant.0.clone(), key),
            (rec.id.clone(), std::time::Instant::now()),
        );
    }
    Ok((StatusCode::CREATED, Json(sandbox_object(&server, &rec))).into_response())
}

/// `GET /v2/sandboxes`: the tenant's sandboxes, filtered, ordered by start time, paged with
/// `nextToken` / `X-Next-Token`.
pub async fn list_v2(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    RawQuery(q): RawQuery,
) -> Result<Response> {
    let q = wire::parse_query(q.as_deref().unwrap_or("")).map_err(E2bError::bad_request)?;
    let metadata = match q.get("metadata") {
        Some(m) => wire::parse_metadata_filter(m).map_err(E2bError::bad_request)?,
        None => Vec::new(),
    };
    let (running, paused) = wire::parse_state_filter(q.get("state").map(String::as_str))
        .map_err(E2bError::bad_request)?;
    let descending = match q.get("order").map(String::as_str) {
        None | Some("") | Some("desc") => true,
        Some("asc") => false,
        Some(other) => {
            return Err(E2bError::bad_request(format!(
                "order: {other:?} is not asc or desc"
            )))
        }
    };
    let started_after = match q.get("startedAfter").filter(|s| !s.is_empty()) {
        Some(s) => Some(lwire::timestamp::parse_rfc3339(s).map_err(|e| {
            E2bError::bad_request(format!("startedAfter: {s:?} is not an RFC 3339 time: {e}"))
        })?),
        None => None,
    };
    let limit = match q.get("limit").filter(|s| !s.is_empty()) {
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=wire::MAX_LIST_LIMIT).contains(l))
            .ok_or_else(|| {
                E2bError::bad_request(format!(
                    "limit: {l:?} is not a number from 1 to {}",
                    wire::MAX_LIST_LIMIT
                ))
            })?,
        None => wire::MAX_LIST_LIMIT,
    };
    let after = match q.get("nextToken").filter(|s| !s.is_empty()) {
        Some(t) => Some(parse_token(t).ok_or_else(|| {
            E2bError::bad_request("nextToken: not a token this server handed out")
        })?),
        None => None,
    };
    let template = q.get("template").filter(|s| !s.is_empty());
    let mut matching: Vec<SandboxRecord> = server
        .registry
        .all()
        .into_iter()
        .filter(|r| r.tenant == tenant.0 && r.owner.is_none())
        .filter(|r| match e2b_state(r.state) {
            "paused" => paused,
            _ => running,
        })
        .filter(|r| {
            metadata
                .iter()
                .all(|(k, v)| r.metadata.get(k).is_some_and(|x| x == v))
        })
        .filter(|r| started_after.is_none_or(|t| r.created_at >= t))
        .filter(|r| {
            template.is_none_or(|t| {
                let mine = template_of(r);
                wire::template_name(t) == wire::template_name(&mine)
            })
        })
        .collect();
    // `all()` is oldest first, ties by id.
    if descending {
        matching.reverse();
    }
    if let Some((at, id)) = after {
        matching.retain(|r| {
            let key = (r.created_at.unix_timestamp_nanos(), r.id.as_str());
            if descending {
                key < (at, id.as_str())
            } else {
                key > (at, id.as_str())
            }
        });
    }
    let more = matching.len() > limit;
    matching.truncate(limit);
    let items: Vec<wire::SandboxDetail> =
        matching.iter().map(|r| detail(&server, r, false)).collect();
    let mut resp = Json(items).into_response();
    if more {
        if let Some(last) = matching.last() {
            let token = format!("{}.{}", last.created_at.unix_timestamp_nanos(), last.id);
            if let Ok(v) = HeaderValue::from_str(&token) {
                resp.headers_mut().insert("x-next-token", v);
            }
        }
    }
    Ok(resp)
}

/// `(start time in ns, id)` of a `nextToken`.
fn parse_token(token: &str) -> Option<(i128, String)> {
    let (at, id) = token.split_once('.')?;
    Some((at.parse().ok()?, id.to_string()))
}

/// `GET /sandboxes` (older SDKs): every running sandbox of the tenant.
pub async fn list_v1(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
) -> Result<Response> {
    let items: Vec<wire::SandboxDetail> = server
        .registry
        .all()
        .iter()
        .filter(|r| r.tenant == tenant.0 && r.owner.is_none() && r.state != SandboxState::Paused)
        .map(|r| detail(&server, r, false))
        .collect();
    Ok(Json(items).into_response())
}

/// `GET /sandboxes/{id}`.
pub async fn get(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Response> {
    let rec = find(&server, &id, &tenant)?;
    Ok(Json(detail(&server, &rec, true)).into_response())
}

/// `DELETE /sandboxes/{id}`: 204; 404 when unknown (the SDK's `kill()` → False).
pub async fn kill(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Response> {
    find(&server, &id, &tenant)?;
    server.destroy(&id, "user_delete").await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The expiry `secs` from now, within the tenant's maximum lifetime counted from creation.
fn bounded_expiry(server: &Server, rec: &SandboxRecord, secs: u64) -> Result<OffsetDateTime> {
    let end = crate::lifecycle::expiry_in(secs);
    if let Some(life) = server
        .config
        .policy
        .for_tenant(&rec.tenant)
        .max_lifetime_secs
    {
        let max = rec.created_at + time::Duration::seconds(life as i64);
        if end > max {
            return Err(E2bError::bad_request(format!(
                "timeout: exceeds this server's maximum lifetime of {life} seconds from the \
                 sandbox's creation"
            )));
        }
    }
    Ok(end)
}

fn set_expiry(server: &Server, id: &str, end: OffsetDateTime) -> Result<SandboxRecord> {
    let rec = server
        .registry
        .update(id, |r| r.expires_at = Some(end))
        .ok_or_else(|| E2bError::not_found(id))?
        .map_err(|e| LifecycleError::Internal(e.to_string()))?;
    server.events.record(id, format!("expiry set to {end}"));
    Ok(rec)
}

/// `POST /sandboxes/{id}/timeout` `{"timeout": s}`: the sandbox ends `s` seconds from now,
/// sooner or later than before.
pub async fn set_timeout(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response> {
    let rec = find(&server, &id, &tenant)?;
    let req: wire::SetTimeout = serde_json::from_slice(&body).map_err(body_error)?;
    let secs = lifetime(&server, Some(req.timeout), 0)?;
    let end = bounded_expiry(&server, &rec, secs)?;
    set_expiry(&server, &id, end)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /sandboxes/{id}/refreshes` `{"duration": s}`: as a timeout that never shortens.
pub async fn refresh(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response> {
    #[derive(Default, serde::Deserialize)]
    struct Refresh {
        #[serde(default)]
        duration: Option<i64>,
    }
    let rec = find(&server, &id, &tenant)?;
    let req: Refresh = parse_body(&body)?;
    let secs = lifetime(&server, req.duration, wire::DEFAULT_TIMEOUT_SECS)?;
    let end = bounded_expiry(&server, &rec, secs)?;
    if rec.expires_at.is_some_and(|e| e < end) {
        set_expiry(&server, &id, end)?;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// E2B's `autoPause` at the sandbox's expiry: frozen, and kept until resumed or for the
/// longest lifetime this server grants (`max_timeout_secs`, within the tenant's maximum
/// lifetime), then deleted.
pub(crate) async fn pause_at_expiry(server: &Server, rec: &SandboxRecord) -> Result<()> {
    server.freeze(&rec.id, true).await?;
    let mut keep = crate::lifecycle::expiry_in(server.config.max_timeout_secs);
    if let Some(life) = server
        .config
        .policy
        .for_tenant(&rec.tenant)
        .max_lifetime_secs
    {
        keep = keep.min(rec.created_at + time::Duration::seconds(life as i64));
    }
    set_expiry(server, &rec.id, keep)?;
    tracing::info!(sandbox = %rec.id, until = %keep, "paused at its timeout (autoPause)");
    Ok(())
}

/// E2B's `autoResume`: a data-plane request for the paused sandbox `rec` thaws it, for its
/// create's `timeout` from now.
pub(crate) async fn resume_on_traffic(
    server: &Server,
    rec: &SandboxRecord,
) -> Result<SandboxRecord> {
    let secs = rec
        .e2b
        .as_ref()
        .map_or(wire::DEFAULT_TIMEOUT_SECS, |e| e.timeout_secs);
    let end = bounded_expiry(server, rec, secs)?;
    if let Err(e) = server.freeze(&rec.id, false).await {
        // Another request may have resumed it first.
        return match server.registry.get(&rec.id) {
            Some(now) if now.state == SandboxState::Running => Ok(now),
            _ => Err(e.into()),
        };
    }
    tracing::info!(sandbox = %rec.id, "resumed by traffic (autoResume)");
    set_expiry(server, &rec.id, end)
}

/// `POST /sandboxes/{id}/pause`: 204; 409 when paused already.
pub async fn pause(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Response> {
    let rec = find(&server, &id, &tenant)?;
    match rec.state {
        SandboxState::Paused => {
            return Err(E2bError::new(
                StatusCode::CONFLICT,
                format!("Sandbox \"{id}\" is already paused"),
            ))
        }
        SandboxState::Running => {}
        other => {
            return Err(E2bError::new(
                StatusCode::CONFLICT,
                format!("Sandbox \"{id}\" cannot be paused: it is {other}"),
            ))
        }
    }
    server.freeze(&id, true).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /v2/sandboxes/{id}/connect` and `POST /sandboxes/{id}/connect`: a running sandbox
/// (200) lives at least `timeout` more seconds; a paused one is resumed (201) and ends
/// `timeout` seconds from now.
pub async fn connect(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response> {
    connect_or_resume(server, tenant, id, &body, false).await
}

/// `POST /sandboxes/{id}/resume` (older SDKs): 201 resumed; 409 when it runs.
pub async fn resume(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response> {
    connect_or_resume(server, tenant, id, &body, true).await
}

async fn connect_or_resume(
    server: Arc<Server>,
    tenant: Tenant,
    id: String,
    body: &[u8],
    resume_only: bool,
) -> Result<Response> {
    let rec = find(&server, &id, &tenant)?;
    let req: wire::Connect = parse_body(body)?;
    let secs = lifetime(&server, req.timeout, wire::DEFAULT_TIMEOUT_SECS)?;
    let end = bounded_expiry(&server, &rec, secs)?;
    let status = match rec.state {
        SandboxState::Paused => {
            server.freeze(&id, false).await?;
            set_expiry(&server, &id, end)?;
            StatusCode::CREATED
        }
        SandboxState::Running if resume_only => {
            return Err(E2bError::new(
                StatusCode::CONFLICT,
                format!("Sandbox \"{id}\" is already running"),
            ))
        }
        SandboxState::Running => {
            if rec.expires_at.is_some_and(|e| e < end) {
                set_expiry(&server, &id, end)?;
            }
            StatusCode::OK
        }
        // A failed or stopping sandbox is as gone to E2B.
        _ => return Err(E2bError::not_found(&id)),
    };
    let rec = find(&server, &id, &tenant)?;
    Ok((status, Json(sandbox_object(&server, &rec))).into_response())
}

/// `GET /sandboxes/{id}/metrics`: one sample, now, from the agent's own metrics (CPU and
/// memory of the sandbox's cgroup); `[]` when the sandbox does not run or the agent has none.
pub async fn metrics(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Response> {
    let rec = find(&server, &id, &tenant)?;
    let samples: Vec<wire::SandboxMetric> = match rec.state {
        SandboxState::Running => sample(&server, &rec).await.into_iter().collect(),
        _ => Vec::new(),
    };
    Ok(Json(samples).into_response())
}

/// The agent's `/metrics` as one E2B sample.
async fn sample(server: &Server, rec: &SandboxRecord) -> Option<wire::SandboxMetric> {
    use http_body_util::BodyExt;
    let socket = server.socket_path(&rec.id).ok()?;
    let req = http::Request::get("/metrics")
        .header(http::header::HOST, "sandbox")
        .body(axum::body::Body::empty())
        .ok()?;
    let resp = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        crate::agent_client::send(&socket, req),
    )
    .await
    .ok()?
    .ok()?;
    if resp.status() != StatusCode::OK {
        return None;
    }
    let body = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
        .collect()
        .await
        .ok()?
        .to_bytes();
    let m: serde_json::Value = serde_json::from_slice(&body).ok()?;
    let mib = |k: &str| (m[k].as_f64().unwrap_or(0.0) * 1024.0 * 1024.0) as u64;
    let now = OffsetDateTime::now_utc();
    Some(wire::SandboxMetric {
        timestamp: lwire::timestamp::format_rfc3339(now),
        timestamp_unix: now.unix_timestamp(),
        cpu_count: m["cpu_count"].as_u64().unwrap_or(1),
        cpu_used_pct: m["cpu_used_pct"].as_f64().unwrap_or(0.0),
        mem_used: mib("mem_used_mib"),
        mem_total: mib("mem_total_mib"),
        mem_cache: 0,
        disk_used: 0,
        disk_total: rec
            .limits
            .sandbox_bytes
            .or(rec.limits.disk_bytes)
            .unwrap_or(0),
    })
}

/// `PUT /sandboxes/{id}/network`: replaces the egress rules of a sandbox created with a
/// network (omitted fields cleared); one created without a device cannot get one.
pub async fn update_network(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response> {
    #[derive(Default, serde::Deserialize)]
    struct Update {
        #[serde(
            rename = "allow_internet_access",
            alias = "allowInternetAccess",
            default
        )]
        allow_internet_access: Option<bool>,
        #[serde(flatten)]
        network: wire::NetworkConfig,
    }
    let rec = find(&server, &id, &tenant)?;
    let req: Update = parse_body(&body)?;
    if let Some(why) = req.network.unsupported("") {
        return Err(E2bError::bad_request(why));
    }
    let Some(net) = server.net_of(&id) else {
        return Err(E2bError::bad_request(format!(
            "network: sandbox \"{id}\" was created without network (no allow_internet_access \
             or network), and execbox cannot add a network device to a running sandbox"
        )));
    };
    // Nothing asked: no egress at all (execbox's default), as upstream's "omitted fields
    // cleared".
    let asked = network_policy(req.allow_internet_access, Some(&req.network)).unwrap_or(
        lwire::NetworkPolicy {
            default_action: Some(lwire::NetworkAction::Deny),
            egress: Some(Vec::new()),
        },
    );
    let policy = crate::lifecycle::network_of(&server, &rec.tenant, Some(&asked), "network")?
        .ok_or_else(|| E2bError::bad_request("network: no policy"))?;
    let wire_policy = policy.to_wire();
    net.update(|p| *p = policy, true);
    server
        .registry
        .update(&id, |r| r.network = Some(wire_policy))
        .ok_or_else(|| E2bError::not_found(&id))?
        .map_err(|e| LifecycleError::Internal(e.to_string()))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Routes execbox does not implement: 501 naming the feature.
pub async fn fork_unsupported() -> E2bError {
    E2bError::unsupported("forking a sandbox")
}

/// Snapshots.
pub async fn snapshots_unsupported() -> E2bError {
    E2bError::unsupported("snapshots")
}

/// Template builds.
pub async fn templates_unsupported() -> E2bError {
    E2bError::unsupported("templates")
}

/// Volumes.
pub async fn volumes_unsupported() -> E2bError {
    E2bError::unsupported("volumes")
}

/// Secrets.
pub async fn secrets_unsupported() -> E2bError {
    E2bError::unsupported("secrets")
}

/// Sandbox logs.
pub async fn logs_unsupported() -> E2bError {
    E2bError::unsupported("sandbox logs")
}

/// Any other path under the E2B prefixes.
pub async fn no_route() -> E2bError {
    E2bError::new(StatusCode::NOT_FOUND, "no such route")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_maps_onto_the_policy() {
        assert_eq!(network_policy(None, None), None);
        let deny = network_policy(Some(false), None).expect("policy");
        assert_eq!(deny.default_action, Some(lwire::NetworkAction::Deny));
        let net = wire::NetworkConfig {
            allow_out: Some(vec!["example.com".into()]),
            deny_out: Some(vec!["0.0.0.0/0".into()]),
            ..Default::default()
        };
        let p = network_policy(None, Some(&net)).expect("policy");
        assert_eq!(p.default_action, Some(lwire::NetworkAction::Deny));
        assert_eq!(p.egress.as_ref().map(Vec::len), Some(1));
        let net = wire::NetworkConfig {
            allow_out: Some(vec!["10.0.0.1".into()]),
            deny_out: Some(vec!["10.0.0.0/8".into()]),
            ..Default::default()
        };
        let p = network_policy(None, Some(&net)).expect("policy");
        assert_eq!(p.default_action, Some(lwire::NetworkAction::Allow));
        let rules = p.egress.expect("rules");
        assert_eq!(rules[0].action, lwire::NetworkAction::Allow);
        assert_eq!(rules[1].action, lwire::NetworkAction::Deny);
    }
}
