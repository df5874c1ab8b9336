//! Upstream's pools (`/v1/pools`): named sets of sandboxes started ahead of need from one
//! template, handed out whole by a create with `extensions.poolRef`. Unlike the warm pool of
//! one-shot runs (`pool.rs`), a pooled sandbox here becomes an ordinary lifecycle sandbox of the
//! caller when taken; nothing is ever given back to the pool.
//!
//! A pool's `template` is what upstream takes (a Kubernetes pod template: the first
//! container's `image`, `command` + `args`, `env` and `resources.limits`) or, simpler, the body
//! of a create request (`image`, `entrypoint`, `resourceLimits`, `env`, `networkPolicy`).
//! Capacity: at least `bufferMin` idle sandboxes (more while the pool holds fewer than
//! `poolMin` in all), never more than `bufferMax` idle, nor more than `poolMax` idle and
//! taken together. Definitions are kept in `<state_dir>/pools.json` per tenant; idle
//! sandboxes are the server's own (removed when it stops, started again when it starts).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use execbox_proto::lifecycle::{self as wire, ErrorCode, ErrorEnvelope};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::lifecycle::{Capacity as CapacityCheck, LifecycleError};
use crate::registry::SandboxRecord;
use crate::secrets::{SecretBox, SecretsError};
use crate::{Server, Tenant};

/// Most idle sandboxes one pool may keep: each is a running sandbox.
const MAX_BUFFER: u32 = 64;
/// Owner mark of a pool's idle sandboxes.
const IDLE_OWNER_PREFIX: &str = "lifecycle-pool:";

/// `capacitySpec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CapacitySpec {
    /// Most idle sandboxes.
    pub buffer_max: u32,
    /// Fewest idle sandboxes.
    pub buffer_min: u32,
    /// Most sandboxes, idle and taken.
    pub pool_max: u32,
    /// Fewest sandboxes, idle and taken.
    pub pool_min: u32,
}

impl CapacitySpec {
    fn check(&self) -> Result<(), LifecycleError> {
        let bad = |why: String| Err(LifecycleError::invalid(format!("capacitySpec: {why}")));
        if self.buffer_min > self.buffer_max {
            return bad("bufferMin must not exceed bufferMax".into());
        }
        if self.pool_min > self.pool_max {
            return bad("poolMin must not exceed poolMax".into());
        }
        if self.buffer_max > self.pool_max {
            return bad("bufferMax must not exceed poolMax".into());
        }
        if self.buffer_max > MAX_BUFFER {
            return bad(format!("bufferMax is at most {MAX_BUFFER} on this server"));
        }
        Ok(())
    }

    /// Idle sandboxes wanted when `taken` are out.
    fn idle_wanted(&self, taken: u32) -> u32 {
        self.buffer_min
            .max(self.pool_min.saturating_sub(taken))
            .min(self.buffer_max.max(self.buffer_min))
            .min(self.pool_max.saturating_sub(taken))
    }
}

/// `POST /v1/pools` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatePoolRequest {
    /// Lowercase letters, digits and `-`, at most 253 characters.
    name: String,
    /// A Kubernetes pod template (its first container's `image`, `command`, `args`, `env`,
    /// `resources.limits`), or a create request's `image`, `entrypoint`, `resourceLimits`,
    /// `env`, `networkPolicy`.
    #[schema(value_type = Object)]
    template: Value,
    /// How many sandboxes the pool keeps.
    capacity_spec: CapacitySpec,
}

/// `PUT /v1/pools/{name}` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpdatePoolRequest {
    /// The new capacity.
    capacity_spec: CapacitySpec,
}

/// A pool as answered.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolResponse {
    name: String,
    capacity_spec: CapacitySpec,
    status: PoolStatus,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
}

/// A pool's sandboxes now.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PoolStatus {
    total: u32,
    allocated: u32,
    available: u32,
    revision: String,
}

/// `GET /v1/pools`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ListPoolsResponse {
    items: Vec<PoolResponse>,
}

/// A pool's definition, as kept on disk: its template (which may hold an environment and
/// registry credentials) only sealed, in [`StoredPool`]; read in clear from a file an earlier
/// version wrote.
#[derive(Clone, Serialize, Deserialize)]
struct PoolDefinition {
    tenant: String,
    name: String,
    #[serde(default, skip_serializing)]
    template: Value,
    capacity: CapacitySpec,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    revision: u64,
}

impl std::fmt::Debug for PoolDefinition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolDefinition")
            .field("tenant", &self.tenant)
            .field("name", &self.name)
            .field("capacity", &self.capacity)
            .field("revision", &self.revision)
            .finish_non_exhaustive()
    }
}

/// A definition as written: its clear fields and its sealed template.
#[derive(Serialize, Deserialize)]
struct StoredPool {
    #[serde(flatten)]
    def: PoolDefinition,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed: Option<String>,
}

/// Associated data of a pool's sealed template.
fn sealed_owner(tenant: &str, name: &str) -> String {
    format!("pool:{tenant}/{name}")
}

/// A pool with its idle sandboxes.
struct Pool {
    def: PoolDefinition,
    /// The template as a create request.
    request: wire::CreateSandboxRequest,
    idle: Vec<String>,
    starting: u32,
}

/// Every tenant's pools.
pub struct SandboxPools {
    file: PathBuf,
    secrets: Arc<SecretBox>,
    pools: Mutex<BTreeMap<(String, String), Pool>>,
}

impl SandboxPools {
    /// The pools defined in `state_dir` (a definition that no longer parses is logged and
    /// skipped). A sealed template that does not open stops the load; definitions an earlier
    /// version wrote in clear are sealed now.
    pub fn load(
        state_dir: &std::path::Path,
        secrets: Arc<SecretBox>,
    ) -> Result<Self, SecretsError> {
        let file = state_dir.join("pools.json");
        let stored: Vec<StoredPool> = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(path = %file.display(), error = %e, "pool definitions unreadable");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        let mut in_clear = false;
        let mut defs = Vec::new();
        for StoredPool { mut def, sealed } in stored {
            match sealed {
                Some(sealed) => {
                    def.template = secrets
                        .open(&sealed_owner(&def.tenant, &def.name), &sealed)
                        .and_then(|bytes| {
                            serde_json::from_slice(&bytes)
                                .map_err(|_| SecretsError::Malformed("sealed pool template"))
                        })
                        .map_err(|e| SecretsError::Sealed {
                            path: file.clone(),
                            error: Box::new(e),
                        })?;
                }
                None => in_clear = true,
            }
            defs.push(def);
        }
        let mut pools = BTreeMap::new();
        for def in defs {
            match template_request(&def.template) {
                Ok(request) => {
                    pools.insert(
                        (def.tenant.clone(), def.name.clone()),
                        Pool {
                            def,
                            request,
                            idle: Vec::new(),
                            starting: 0,
                        },
                    );
                }
                Err(e) => tracing::error!(pool = %def.name, error = %e, "pool skipped"),
            }
        }
        let me = Self {
            file,
            secrets,
            pools: Mutex::new(pools),
        };
        if in_clear {
            let pools = me.lock();
            match me.save(&pools) {
                Ok(()) => tracing::info!(
                    pools = pools.len(),
                    "sealed the pool templates an earlier version wrote in clear"
                ),
                Err(e) => tracing::error!(error = %e, "sealing pool templates written in clear"),
            }
            drop(pools);
        }
        Ok(me)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), Pool>> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes every definition (a temporary file renamed over the old one).
    fn save(&self, pools: &BTreeMap<(String, String), Pool>) -> Result<(), LifecycleError> {
        let mut defs = Vec::new();
        for p in pools.values() {
            let template = serde_json::to_vec(&p.def.template)
                .map_err(|e| LifecycleError::Internal(e.to_string()))?;
            defs.push(StoredPool {
                def: p.def.clone(),
                sealed: Some(
                    self.secrets
                        .seal(&sealed_owner(&p.def.tenant, &p.def.name), &template),
                ),
            });
        }
        let bytes = serde_json::to_vec_pretty(&defs)
            .map_err(|e| LifecycleError::Internal(e.to_string()))?;
        let tmp = self.file.with_extension("json.tmp");
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &self.file))
            .map_err(|e| LifecycleError::Internal(format!("saving {}: {e}", self.file.display())))
    }

    /// Idle sandboxes of every pool (for tests and metrics).
    pub fn idle_total(&self) -> usize {
        self.lock().values().map(|p| p.idle.len()).sum()
    }
}

/// The create request a pool template stands for.
fn template_request(template: &Value) -> Result<wire::CreateSandboxRequest, LifecycleError> {
    let bad = |why: String| LifecycleError::invalid(format!("template: {why}"));
    let obj = template
        .as_object()
        .ok_or_else(|| bad("must be an object".into()))?;
    let request = if let Some(spec) = obj.get("spec") {
        pod_template_request(spec).map_err(bad)?
    } else {
        let req: wire::CreateSandboxRequest =
            serde_json::from_value(template.clone()).map_err(|e| bad(e.to_string()))?;
        req
    };
    if request.image.is_none() {
        return Err(bad(
            "names no image (spec.containers[0].image, or image.uri)".into(),
        ));
    }
    if request.volumes.as_ref().is_some_and(|v| !v.is_empty()) {
        return Err(bad("volumes are not supported in a pool's template".into()));
    }
    if request
        .extensions
        .as_ref()
        .is_some_and(|e| e.contains_key(wire::EXT_POOL_REF))
    {
        return Err(bad("a pool's template cannot name a pool".into()));
    }
    Ok(request)
}

/// The first container of a Kubernetes pod template as a create request.
fn pod_template_request(spec: &Value) -> Result<wire::CreateSandboxRequest, String> {
    let container = spec
        .get("containers")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .ok_or("spec.containers must hold at least one container")?;
    let field = |name: &str| container.get(name);
    let image = field("image")
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
        .ok_or("spec.containers[0].image must be a non-empty string")?;
    let strings = |name: &str| -> Result<Vec<String>, String> {
        match field(name) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or(format!("spec.containers[0].{name} must hold strings"))
                })
                .collect(),
            Some(_) => Err(format!(
                "spec.containers[0].{name} must be a list of strings"
            )),
        }
    };
    let mut entrypoint = strings("command")?;
    entrypoint.extend(strings("args")?);
    let mut env = BTreeMap::new();
    if let Some(list) = field("env") {
        let list = list
            .as_array()
            .ok_or("spec.containers[0].env must be a list")?;
        for (i, item) in list.iter().enumerate() {
            let name = item
                .get("name")
                .and_then(Value::as_str)
                .ok_or(format!("spec.containers[0].env[{i}].name must be a string"))?;
            let value = item.get("value").and_then(Value::as_str).unwrap_or("");
            env.insert(name.to_string(), value.to_string());
        }
    }
    let mut limits = BTreeMap::new();
    if let Some(l) = field("resources").and_then(|r| r.get("limits")) {
        let l = l
            .as_object()
            .ok_or("spec.containers[0].resources.limits must be an object")?;
        for (k, v) in l {
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => {
                    return Err(format!(
                        "spec.containers[0].resources.limits.{k} must be a quantity"
                    ))
                }
            };
            limits.insert(k.clone(), v);
        }
    }
    Ok(wire::CreateSandboxRequest {
        image: Some(wire::ImageSpec {
            uri: image.to_string(),
            auth: None,
        }),
        entrypoint: (!entrypoint.is_empty()).then_some(entrypoint),
        env: (!env.is_empty()).then_some(env),
        resource_limits: Some(limits),
        ..Default::default()
    })
}

/// The template's request, checked as a create would check it (the entrypoint defaults to
/// waiting forever, as the SDKs' does).
fn validated(
    request: &wire::CreateSandboxRequest,
    server: &Server,
) -> Result<(wire::CreateSandboxRequest, wire::ValidatedCreate), LifecycleError> {
    let mut request = request.clone();
    if request.entrypoint.is_none() {
        request.entrypoint = Some(
            wire::DEFAULT_ENTRYPOINT
                .iter()
                .map(|s| s.to_string())
                .collect(),
        );
    }
    request.resource_limits.get_or_insert_with(BTreeMap::new);
    let v = request
        .validate(
            server.config.max_timeout_secs,
            crate::lifecycle::host_arch(),
        )
        .map_err(|e| LifecycleError::invalid(format!("template: {e}")))?;
    Ok((request, v))
}

fn check_name(name: &str) -> Result<(), LifecycleError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(LifecycleError::invalid(format!(
            "name: {name:?} must be lowercase letters, digits and '-', starting and ending \
             with a letter or digit, at most 253 characters"
        )))
    }
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, LifecycleError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        // A template's string values (an environment, a password) are not echoed.
        let inner = crate::secrets::redact_json_error(&e.inner().to_string());
        if path == "." {
            LifecycleError::invalid(format!("body: {inner}"))
        } else {
            LifecycleError::invalid(format!("{path}: {inner}"))
        }
    })
}

/// Sandboxes taken from the pool `(tenant, name)` that still exist.
fn taken(records: &[SandboxRecord], tenant: &str, name: &str) -> u32 {
    records
        .iter()
        .filter(|r| r.tenant == tenant && r.owner.is_none() && r.pool.as_deref() == Some(name))
        .count() as u32
}

fn response(pool: &Pool, records: &[SandboxRecord]) -> PoolResponse {
    let allocated = taken(records, &pool.def.tenant, &pool.def.name);
    let available = pool.idle.len() as u32;
    PoolResponse {
        name: pool.def.name.clone(),
        capacity_spec: pool.def.capacity,
        status: PoolStatus {
            total: allocated + available,
            allocated,
            available,
            revision: pool.def.revision.to_string(),
        },
        created_at: pool.def.created_at,
    }
}

/// `POST /v1/pools` → 201.
#[utoipa::path(
    post,
    path = "/v1/pools",
    operation_id = "createPool",
    tag = "pools",
    description = "Defines a pool; its idle sandboxes start in the background.",
    request_body = CreatePoolRequest,
    responses(
        (status = 201, description = "Created.", body = PoolResponse),
        (status = 400, description = "A field breaks a rule; the message names it.", body = ErrorEnvelope),
        (status = 409, description = "A pool of that name exists: `KUBERNETES::POOL_ALREADY_EXISTS`.", body = ErrorEnvelope),
        (status = 502, description = "The template's image registry failed.", body = ErrorEnvelope),
        (status = 401, description = "No or an unknown `OPEN-SANDBOX-API-KEY` (only when the server has keys): `MISSING_API_KEY` or `INVALID_API_KEY`.", body = ErrorEnvelope),
    ),
    security(("api_key" = []), ())
)]
pub async fn create(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    body: Bytes,
) -> Result<Response, LifecycleError> {
    let req: CreatePoolRequest = parse_body(&body)?;
    check_name(&req.name)?;
    req.capacity_spec.check()?;
    let request = template_request(&req.template)?;
    // Everything a create would refuse is refused now, not at every refill (the image is
    // pulled once here).
    let (checked, v) = validated(&request, &server)?;
    crate::lifecycle::prepare(&server, &tenant.0, &checked, &v, CapacityCheck::Ignore).await?;
    let now = OffsetDateTime::now_utc();
    let key = (tenant.0.clone(), req.name.clone());
    let answer = {
        let mut pools = server.sandbox_pools.lock();
        if pools.contains_key(&key) {
            return Err(LifecycleError::Conflict {
                code: ErrorCode::PoolAlreadyExists,
                message: format!("a pool named {} exists already", req.name),
            });
        }
        let pool = Pool {
            def: PoolDefinition {
                tenant: tenant.0.clone(),
                name: req.name.clone(),
                template: req.template,
                capacity: req.capacity_spec,
                created_at: now.replace_nanosecond(0).unwrap_or(now),
                revision: 1,
            },
            request,
            idle: Vec::new(),
            starting: 0,
        };
        let answer = response(&pool, &[]);
        pools.insert(key.clone(), pool);
        if let Err(e) = server.sandbox_pools.save(&pools) {
            pools.remove(&key);
            return Err(e);
        }
        answer
    };
    tracing::info!(tenant = %tenant.0, pool = %req.name, "pool created");
    maintain(&server);
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// `GET /v1/pools`.
#[utoipa::path(
    get,
    path = "/v1/pools",
    operation_id = "listPools",
    tag = "pools",
    description = "The tenant's pools.",
    responses(
        (status = 200, description = "The pools.", body = ListPoolsResponse),
        (status = 401, description = "No or an unknown `OPEN-SANDBOX-API-KEY` (only when the server has keys): `MISSING_API_KEY` or `INVALID_API_KEY`.", body = ErrorEnvelope),
    ),
    security(("api_key" = []), ())
)]
pub async fn list(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
) -> Json<ListPoolsResponse> {
    let records = server.registry.all();
    let pools = server.sandbox_pools.lock();
    Json(ListPoolsResponse {
        items: pools
            .values()
            .filter(|p| p.def.tenant == tenant.0)
            .map(|p| response(p, &records))
            .collect(),
    })
}

/// `GET /v1/pools/{name}`.
#[utoipa::path(
    get,
    path = "/v1/pools/{name}",
    operation_id = "getPool",
    tag = "pools",
    description = "One pool and its sandboxes now.",
    params(
        ("name" = String, Path, description = "Pool name."),
    ),
    responses(
        (status = 200, description = "The pool.", body = PoolResponse),
        (status = 404, description = "No such pool for this tenant: `KUBERNETES::POOL_NOT_FOUND`.", body = ErrorEnvelope),
        (status = 401, description = "No or an unknown `OPEN-SANDBOX-API-KEY` (only when the server has keys): `MISSING_API_KEY` or `INVALID_API_KEY`.", body = ErrorEnvelope),
    ),
    security(("api_key" = []), ())
)]
pub async fn get(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    Path(name): Path<String>,
) -> Result<Json<PoolResponse>, LifecycleError> {
    let records = server.registry.all();
    let pools = server.sandbox_pools.lock();
    pools
        .get(&(tenant.0.clone(), name.clone()))
        .map(|p| Json(response(p, &records)))
        .ok_or(LifecycleError::PoolNotFound(name))
}

/// `PUT /v1/pools/{name}`: a new capacity (the template stays).
#[utoipa::path(
    put,
    path = "/v1/pools/{name}",
    operation_id = "updatePool",
    tag = "pools",
    description = "A new capacity; the template stays.",
    params(
        ("name" = String, Path, description = "Pool name."),
    ),
    request_body = UpdatePoolRequest,
    responses(
        (status = 200, description = "The pool.", body = PoolResponse),
        (status = 400, description = "A field breaks a rule; the message names it.", body = ErrorEnvelope),
        (status = 404, description = "No such pool for this tenant: `KUBERNETES::POOL_NOT_FOUND`.", body = ErrorEnvelope),
        (status = 401, description = "No or an unknown `OPEN-SANDBOX-API-KEY` (only when the server has keys): `MISSING_API_KEY` or `INVALID_API_KEY`.", body = ErrorEnvelope),
    ),
    security(("api_key" = []), ())
)]
pub async fn update(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<PoolResponse>, LifecycleError> {
    let req: UpdatePoolRequest = parse_body(&body)?;
    req.capacity_spec.check()?;
    let answer = {
        let records = server.registry.all();
        let mut pools = server.sandbox_pools.lock();
        let pool = pools
            .get_mut(&(tenant.0.clone(), name.clone()))
            .ok_or_else(|| LifecycleError::PoolNotFound(name.clone()))?;
        let before = (pool.def.capacity, pool.def.revision);
        pool.def.capacity = req.capacity_spec;
        pool.def.revision += 1;
        let answer = response(pool, &records);
        if let Err(e) = server.sandbox_pools.save(&pools) {
            if let Some(pool) = pools.get_mut(&(tenant.0.clone(), name.clone())) {
                (pool.def.capacity, pool.def.revision) = before;
            }
            return Err(e);
        }
        answer
    };
    maintain(&server);
    Ok(Json(answer))
}

/// `DELETE /v1/pools/{name}`: its idle sandboxes go; those taken stay the callers'.
#[utoipa::path(
    delete,
    path = "/v1/pools/{name}",
    operation_id = "deletePool",
    tag = "pools",
    description = "Removes the pool and its idle sandboxes; sandboxes taken from it stay.",
    params(
        ("name" = String, Path, description = "Pool name."),
    ),
    responses(
        (status = 204, description = "Deleted."),
        (status = 404, description = "No such pool for this tenant: `KUBERNETES::POOL_NOT_FOUND`.", body = ErrorEnvelope),
        (status = 401, description = "No or an unknown `OPEN-SANDBOX-API-KEY` (only when the server has keys): `MISSING_API_KEY` or `INVALID_API_KEY`.", body = ErrorEnvelope),
    ),
    security(("api_key" = []), ())
)]
pub async fn delete(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    Path(name): Path<String>,
) -> Result<Response, LifecycleError> {
    let idle = {
        let mut pools = server.sandbox_pools.lock();
        let key = (tenant.0.clone(), name.clone());
        let pool = pools
            .remove(&key)
            .ok_or_else(|| LifecycleError::PoolNotFound(name.clone()))?;
        if let Err(e) = server.sandbox_pools.save(&pools) {
            pools.insert(key, pool);
            return Err(e);
        }
        pool.idle
    };
    for id in idle {
        let _ = server.destroy(&id, "pool_deleted").await;
    }
    tracing::info!(tenant = %tenant.0, pool = %name, "pool deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A create with `extensions.poolRef`: an idle sandbox of the pool made the caller's (its
/// metadata and expiry from the request), or a new one from the pool's template while the
/// pool is below `poolMax`.
pub async fn acquire(
    server: &Arc<Server>,
    tenant: &str,
    req: &wire::CreateSandboxRequest,
    v: &wire::ValidatedCreate,
    name: &str,
) -> Result<SandboxRecord, LifecycleError> {
    let field = format!("extensions.{}", wire::EXT_POOL_REF);
    // What cannot change on a running sandbox is the pool's to say.
    if req.env.as_ref().is_some_and(|e| !e.is_empty()) {
        return Err(LifecycleError::invalid(
            "env: cannot be given with extensions.poolRef (a pooled sandbox is running already; \
             set the environment in the pool's template)",
        ));
    }
    if req.volumes.as_ref().is_some_and(|v| !v.is_empty()) {
        return Err(LifecycleError::invalid(
            "volumes: cannot be given with extensions.poolRef",
        ));
    }
    if req.network_policy.is_some() {
        return Err(LifecycleError::invalid(
            "networkPolicy: cannot be given with extensions.poolRef (set it in the pool's template)",
        ));
    }
    let policy = server.config.policy.for_tenant(tenant);
    let expires_at = policy
        .lifetime_secs("timeout", v.timeout_secs)?
        .map(crate::lifecycle::expiry_in);
    let key = (tenant.to_string(), name.to_string());
    loop {
        crate::lifecycle::check_tenant_capacity(&server.registry.all(), tenant, &policy)?;
        let (idle, template) = {
            let mut pools = server.sandbox_pools.lock();
            let pool = pools.get_mut(&key).ok_or_else(|| {
                LifecycleError::invalid(format!("{field}: no pool named {name:?}"))
            })?;
            (pool.idle.pop(), pool.request.clone())
        };
        let Some(id) = idle else {
            crate::prometheus::pool_acquired("lifecycle", false);
            return cold_start(server, tenant, name, &template, req, v, expires_at).await;
        };
        let now = OffsetDateTime::now_utc();
        let claimed = server.registry.update(&id, |r| {
            r.owner = None;
            r.pool = Some(name.to_string());
            r.metadata = req.metadata.clone().unwrap_or_default();
            r.expires_at = expires_at;
            r.renew_on_access_secs = v.renew_extend_secs;
            r.last_transition_at = now;
            // The caller's sandbox starts now: its lifetime bound counts from here, not from
            // when it was started to wait in the pool.
            r.created_at = now.replace_nanosecond(0).unwrap_or(now);
        });
        match claimed {
            Some(Ok(rec)) if rec.placement.as_ref().is_some_and(|p| server.is_alive(p)) => {
                crate::prometheus::pool_acquired("lifecycle", true);
                server.events.record(
                    &rec.id,
                    format!("taken from pool {name} by tenant {tenant}"),
                );
                tracing::info!(sandbox = %rec.id, %tenant, pool = %name, "sandbox taken from a pool");
                maintain(server);
                return Ok(rec);
            }
            // Died while idle: removed, and the next one tried.
            _ => {
                let _ = server.destroy(&id, "pool_dead").await;
            }
        }
    }
}

/// A new sandbox from the pool's template for a caller who found none idle.
async fn cold_start(
    server: &Arc<Server>,
    tenant: &str,
    name: &str,
    template: &wire::CreateSandboxRequest,
    req: &wire::CreateSandboxRequest,
    v: &wire::ValidatedCreate,
    expires_at: Option<OffsetDateTime>,
) -> Result<SandboxRecord, LifecycleError> {
    let (capacity, taken_now) = {
        let records = server.registry.all();
        let pools = server.sandbox_pools.lock();
        let pool = pools
            .get(&(tenant.to_string(), name.to_string()))
            .ok_or_else(|| LifecycleError::PoolNotFound(name.to_string()))?;
        (
            pool.def.capacity,
            taken(&records, tenant, name) + pool.idle.len() as u32 + pool.starting,
        )
    };
    if taken_now >= capacity.pool_max {
        return Err(LifecycleError::TooMany(format!(
            "pool {name} holds its poolMax of {} sandboxes; try again later",
            capacity.pool_max
        )));
    }
    let (checked, tv) = validated(template, server)?;
    let mut spec =
        crate::lifecycle::prepare(server, tenant, &checked, &tv, CapacityCheck::Check).await?;
    spec.metadata = req.metadata.clone().unwrap_or_default();
    spec.expires_at = expires_at;
    spec.renew_on_access_secs = v.renew_extend_secs;
    let rec = server.launch(spec).await?;
    let rec = match server
        .registry
        .update(&rec.id, |r| r.pool = Some(name.to_string()))
    {
        Some(Ok(rec)) => rec,
        _ => rec,
    };
    maintain(server);
    Ok(rec)
}

/// Starts or removes idle sandboxes until every pool has what its capacity asks for. Called
/// after every change and by the reaper every second (which also notices idle sandboxes that
/// died).
pub fn maintain(server: &Arc<Server>) {
    if server.stopping() || server.sandbox_pools.lock().is_empty() {
        return;
    }
    let records = server.registry.all();
    let alive: std::collections::HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
    let mut to_start = Vec::new();
    let mut to_remove = Vec::new();
    {
        let mut pools = server.sandbox_pools.lock();
        for pool in pools.values_mut() {
            pool.idle.retain(|id| alive.contains(id.as_str()));
            let taken_now = taken(&records, &pool.def.tenant, &pool.def.name);
            let wanted = pool.def.capacity.idle_wanted(taken_now);
            let have = pool.idle.len() as u32 + pool.starting;
            if have < wanted {
                let n = wanted - have;
                pool.starting += n;
                for _ in 0..n {
                    to_start.push((
                        pool.def.tenant.clone(),
                        pool.def.name.clone(),
                        pool.request.clone(),
                    ));
                }
            }
            let most = pool.def.capacity.buffer_max as usize;
            while pool.idle.len() > most {
                if let Some(id) = pool.idle.pop() {
                    to_remove.push(id);
                }
            }
        }
    }
    for (tenant, name, request) in to_start {
        let server = server.clone();
        tokio::spawn(async move {
            let made = start_idle(&server, &tenant, &name, &request).await;
            // Deleted meanwhile: what was made goes.
            let orphan = {
                let mut pools = server.sandbox_pools.lock();
                match pools.get_mut(&(tenant.clone(), name.clone())) {
                    None => made.ok(),
                    Some(pool) => {
                        pool.starting = pool.starting.saturating_sub(1);
                        match made {
                            Ok(rec) => pool.idle.push(rec.id),
                            Err(e) => tracing::warn!(
                                %tenant, pool = %name, error = %e,
                                "pool: starting a sandbox failed"
                            ),
                        }
                        None
                    }
                }
            };
            if let Some(rec) = orphan {
                let _ = server.destroy(&rec.id, "pool_deleted").await;
            }
        });
    }
    for id in to_remove {
        let server = server.clone();
        tokio::spawn(async move {
            let _ = server.destroy(&id, "pool_shrunk").await;
        });
    }
}

async fn start_idle(
    server: &Arc<Server>,
    tenant: &str,
    name: &str,
    template: &wire::CreateSandboxRequest,
) -> Result<SandboxRecord, LifecycleError> {
    let (checked, v) = validated(template, server)?;
    let mut spec =
        crate::lifecycle::prepare(server, tenant, &checked, &v, CapacityCheck::Ignore).await?;
    spec.owner = Some(format!("{IDLE_OWNER_PREFIX}{name}"));
    spec.expires_at = None;
    server.launch(spec).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(buffer_min: u32, buffer_max: u32, pool_min: u32, pool_max: u32) -> CapacitySpec {
        CapacitySpec {
            buffer_max,
            buffer_min,
            pool_max,
            pool_min,
        }
    }

    #[test]
    fn idle_wanted_follows_buffer_and_pool_bounds() {
        assert_eq!(cap(1, 3, 0, 10).idle_wanted(0), 1);
        assert_eq!(cap(1, 3, 3, 10).idle_wanted(0), 3);
        assert_eq!(cap(1, 3, 3, 10).idle_wanted(2), 1);
        assert_eq!(cap(2, 3, 0, 4).idle_wanted(3), 1);
        assert_eq!(cap(2, 3, 0, 4).idle_wanted(4), 0);
        assert!(cap(3, 2, 0, 4).check().is_err());
        assert!(cap(0, 2, 5, 4).check().is_err());
        assert!(cap(0, 5, 0, 4).check().is_err());
        assert!(cap(1, 2, 0, 4).check().is_ok());
    }

    #[test]
    fn a_pod_template_becomes_a_create_request() {
        let t = serde_json::json!({"spec": {"containers": [{
            "name": "sandbox",
            "image": "default",
            "command": ["sleep"],
            "args": ["infinity"],
            "env": [{"name": "A", "value": "1"}],
            "resources": {"limits": {"cpu": "500m", "memory": "256Mi"}}
        }]}});
        let r = template_request(&t).expect("valid");
        assert_eq!(r.image.map(|i| i.uri).as_deref(), Some("default"));
        assert_eq!(r.entrypoint, Some(vec!["sleep".into(), "infinity".into()]));
        assert_eq!(
            r.env.and_then(|e| e.get("A").cloned()).as_deref(),
            Some("1")
        );
        assert_eq!(
            r.resource_limits
                .and_then(|l| l.get("memory").cloned())
                .as_deref(),
            Some("256Mi")
        );
        assert!(template_request(&serde_json::json!({"spec": {"containers": []}})).is_err());
        assert!(template_request(&serde_json::json!({"entrypoint": ["x"]})).is_err());
        assert!(template_request(&serde_json::json!("x")).is_err());
    }
}
