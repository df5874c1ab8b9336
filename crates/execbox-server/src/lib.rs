//! execbox-server: the control plane and gateway.
//!
//! One HTTP listener serves the OpenSandbox lifecycle API under `/v1`, the per-sandbox data
//! plane under `/v1/sandboxes/{id}/proxy/{port}/…` (forwarded to the sandbox's agent over its
//! unix socket), and `/health`. Sandboxes run on the [`local::LocalBackend`]; their records live
//! in the state directory, so a restarted server re-attaches to every sandbox still running.

pub mod agent_client;
pub mod agent_run;
pub mod api_keys;
pub mod concurrency;
pub mod config;
pub mod diagnostics;
mod disk_pool;
pub mod doctor;
pub mod e2b;
pub mod egress;
pub mod images;
pub mod isol8;
pub mod lifecycle;
pub mod listener;
pub mod local;
pub mod oneshot;
pub mod openapi;
pub mod policy;
pub mod pool;
pub mod prometheus;
pub mod proxy;
pub mod registry;
pub mod sandbox_pools;
pub mod secrets;
pub mod session_exec;
pub mod sessions;
pub mod signed;
pub mod templates;
pub mod tls;
pub mod volumes;
pub mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use execbox_proto::lifecycle::{ErrorEnvelope, SandboxState};
use subtle::ConstantTimeEq;

pub use config::ServerConfig;
use lifecycle::LifecycleError;
use local::{LocalBackend, LocalConfig};
use registry::Registry;

/// The running server's shared state.
pub struct Server {
    /// Configuration.
    pub config: ServerConfig,
    /// Sandbox records.
    pub registry: Registry,
    /// Ready sandboxes for one-shot runs.
    pub pool: pool::WarmPool,
    /// Persistent sessions of the isol8 and session-execute surfaces.
    pub sessions: sessions::Sessions,
    /// Executions running per tenant.
    pub runs: concurrency::RunGate,
    /// Templates built from package registries.
    pub templates: Arc<templates::Templates>,
    /// Deletions in progress.
    destroying: std::sync::atomic::AtomicUsize,
    /// Sandboxes whose removal from the host failed, retried by the reaper until done.
    pending_cleanups: std::sync::Mutex<Vec<(String, local::Placement)>>,
    /// This server, for the tasks it starts (agent watchers).
    me: std::sync::Weak<Server>,
    /// Every sandbox's network settings, from `[network]`.
    net_config: Arc<execbox_net::NetConfig>,
    /// The networks of the sandboxes that have one.
    nets: std::sync::Mutex<std::collections::HashMap<String, Arc<execbox_net::SandboxNet>>>,
    /// Whether sandboxes can have a network device here; why not.
    network: Result<(), String>,
    /// The OCI image store, or why there is none.
    pub images: Result<Arc<execbox_image::ImageStore>, String>,
    /// Named volumes and the rules for host ones.
    pub volumes: Arc<volumes::Volumes>,
    /// Upstream's pools (`/v1/pools`).
    pub sandbox_pools: sandbox_pools::SandboxPools,
    /// What happened to each sandbox, for its diagnostics.
    pub events: diagnostics::Events,
    /// Signs expiring endpoint URLs, or why it cannot.
    signer: Result<signed::EndpointSigner, String>,
    /// The configured API keys (`serve` refuses to start when one is malformed; here such a
    /// configuration authenticates nobody).
    keys: api_keys::KeyRing,
    backend: Result<Arc<LocalBackend>, String>,
}

impl Server {
    /// Prepares the backend (failing closed into an error kept for every create) and
    /// re-attaches to the sandboxes recorded in the state directory. Without the secrets key
    /// that sealed the state directory (or with another), nothing starts.
    pub fn new(config: ServerConfig) -> Result<Arc<Self>, secrets::SecretsError> {
        let secrets = Arc::new(secrets::SecretBox::load(
            &config.state_dir,
            config.secrets.key_file.as_deref(),
        )?);
        tracing::info!(
            source = %secrets.source(),
            fingerprint = secrets.fingerprint(),
            "secrets at rest: sealed"
        );
        let registry = Registry::load(&config.state_dir, secrets.clone())?;
        let sandbox_pools = sandbox_pools::SandboxPools::load(&config.state_dir, secrets)?;
        let backend = LocalBackend::new(LocalConfig {
            state_dir: config.state_dir.clone(),
            agent_exe: config.agent_exe.clone(),
            python: config.python.clone(),
            seccomp: config.require_seccomp,
            landlock: config.require_landlock || (config.landlock && doctor::landlock_available()),
            default_pids: config.default_pids,
            cgroup_base: config.cgroup_base.clone(),
            max_upload_bytes: config.max_upload_bytes,
            context_idle_ttl_secs: config.context_idle_ttl_secs,
            storage: config.storage.medium,
            default_disk_bytes: config
                .storage
                .default_disk_bytes
                .min(config.policy.max_disk_bytes),
            volume_owner: (config.volumes.owner_uid, config.volumes.owner_gid),
        })
        .map(Arc::new)
        .map_err(|e| {
            tracing::error!(error = %e, "sandboxes cannot be created");
            e.to_string()
        });
        let pool = pool::WarmPool::new(pool::PoolSettings {
            size: config.policy.warm_pool_size,
            max: config
                .policy
                .warm_pool_max
                .max(config.policy.warm_pool_size),
            idle: Duration::from_secs(config.policy.warm_pool_idle_secs),
            max_profiles: config.policy.max_pool_profiles,
            prestart: (config.policy.warm_pool_prestart != "none")
                .then(|| config.policy.warm_pool_prestart.clone()),
        });
        let net_config = Arc::new(net_config(&config));
        let network = LocalBackend::network_available();
        let images = images::open_store(&config).inspect_err(|e| {
            tracing::error!(error = %e, "the image store cannot be opened: OCI images are refused");
        });
        let templates = Arc::new(templates::Templates::new(&config));
        let volumes = Arc::new(volumes::Volumes::new(
            &config.state_dir,
            config.volumes.clone(),
        ));
        let signer = signed::EndpointSigner::load(
            &config.state_dir,
            config.endpoints.signing_key.as_deref(),
        )
        .inspect_err(|e| tracing::error!(error = %e, "signed endpoints are unavailable"));
        let keys = api_keys::KeyRing::from_config(&config).unwrap_or_else(|e| {
            tracing::error!(error = %e, "no API key is accepted");
            api_keys::KeyRing::none()
        });
        let server = Arc::new_cyclic(|me| Self {
            signer,
            keys,
            events: diagnostics::Events::default(),
            sandbox_pools,
            templates,
            volumes,
            config,
            registry,
            pool,
            sessions: sessions::Sessions::default(),
            runs: concurrency::RunGate::default(),
            destroying: std::sync::atomic::AtomicUsize::new(0),
            pending_cleanups: std::sync::Mutex::new(Vec::new()),
            me: me.clone(),
            net_config,
            nets: std::sync::Mutex::new(std::collections::HashMap::new()),
            network,
            images,
            backend,
        });
        server.reattach();
        Ok(server)
    }

    /// Starts watching the agent of `id` (its exit; its log when given). Needs a tokio runtime;
    /// without one (a server built outside it) nothing is watched.
    fn watch(&self, id: &str, pidfd: std::os::fd::OwnedFd, log: Option<std::os::fd::OwnedFd>) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        if let Some(me) = self.me.upgrade() {
            watch::exit(&me, id.to_string(), pidfd);
        }
        if let Some(log) = log {
            watch::log(id.to_string(), log);
        }
    }

    /// The agent of `id` exited without being asked to: the sandbox is `Failed` (with how it
    /// ended), its processes are gone with it, and what it held on the host is released. The
    /// record stays, so clients see why, until it is deleted or expires.
    pub async fn agent_exited(&self, id: &str, how: Option<String>) {
        let Some(rec) = self.registry.get(id) else {
            return;
        };
        if rec.state == SandboxState::Stopping || rec.state == SandboxState::Failed {
            return;
        }
        let message = format!(
            "the sandbox's agent (its PID 1) exited unexpectedly ({}); every process of the \
             sandbox ended with it",
            how.as_deref().unwrap_or("exit status unknown")
        );
        tracing::warn!(sandbox = %id, %message, "sandbox failed");
        self.events
            .record(id, format!("Failed (AGENT_EXITED): {message}"));
        prometheus::agent_died();
        // The state first: clients see the truth at once, whatever the clean-up takes.
        let now = time::OffsetDateTime::now_utc();
        if let Some(Err(e)) = self.registry.update(id, |r| {
            r.state = SandboxState::Failed;
            r.reason = Some("AGENT_EXITED".into());
            r.message = Some(message);
            r.last_transition_at = now;
        }) {
            tracing::warn!(sandbox = %id, error = %e, "recording a failed sandbox");
        }
        let Ok(backend) = self.backend() else { return };
        let id2 = id.to_string();
        let placement = rec.placement.clone();
        let released = tokio::task::spawn_blocking(move || match &placement {
            Some(p) => backend.destroy(&id2, p),
            None => Ok(()),
        })
        .await;
        if !matches!(released, Ok(Ok(()))) {
            if let Some(p) = &rec.placement {
                self.defer_cleanup(id, p.clone());
            }
        }
        // Released (or queued): the record no longer holds a place on the host.
        if let Some(Err(e)) = self.registry.update(id, |r| r.placement = None) {
            tracing::warn!(sandbox = %id, error = %e, "recording a failed sandbox");
        }
    }

    fn defer_cleanup(&self, id: &str, placement: local::Placement) {
        tracing::warn!(sandbox = %id, "removal from the host failed; retrying until done");
        self.pending_cleanups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((id.to_string(), placement));
    }

    /// Retries every removal that failed before; those that fail again stay queued.
    pub async fn retry_cleanups(&self) {
        let pending = std::mem::take(
            &mut *self
                .pending_cleanups
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        if pending.is_empty() {
            return;
        }
        let Ok(backend) = self.backend() else { return };
        let failed = tokio::task::spawn_blocking(move || {
            pending
                .into_iter()
                .filter(|(id, p)| match backend.destroy(id, p) {
                    Ok(()) => {
                        tracing::info!(sandbox = %id, "deferred removal done");
                        false
                    }
                    Err(e) => {
                        tracing::warn!(sandbox = %id, error = %e, "deferred removal failed again");
                        true
                    }
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        self.pending_cleanups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(failed);
    }

    /// Whether sandboxes can have outbound network on this host; why not.
    pub fn network_available(&self) -> Result<(), String> {
        self.network
            .clone()
            .map_err(|why| format!("outbound network is not available on this host ({why})"))
    }

    /// The network of sandbox `id`, when it has one.
    pub fn net_of(&self, id: &str) -> Option<Arc<execbox_net::SandboxNet>> {
        self.nets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// The backend, or the reason sandboxes are refused.
    pub fn backend(&self) -> Result<Arc<LocalBackend>, LifecycleError> {
        self.backend.clone().map_err(LifecycleError::Internal)
    }

    /// Whether sandboxes have the runtime `name` (`python3`, `node`, `bun`, `deno`, `bash`…).
    pub fn has_runtime(&self, name: &str) -> bool {
        self.backend.as_ref().is_ok_and(|b| b.has_runtime(name))
    }

    /// Whether the sandbox placed at `p` still runs.
    pub fn is_alive(&self, p: &local::Placement) -> bool {
        self.backend.as_ref().is_ok_and(|b| b.is_alive(p))
    }

    /// Sets sandbox `id`'s CPU weight against the other sandboxes (a few sysfs writes, done in
    /// place); a failure is logged, since a weight is a preference.
    pub fn set_cpu_weight(&self, id: &str, weight: u32) {
        let set = self
            .backend()
            .map_err(|e| e.to_string())
            .and_then(|b| b.set_cpu_weight(id, weight).map_err(|e| e.to_string()));
        if let Err(e) = set {
            tracing::debug!(sandbox = %id, error = %e, "setting the CPU weight");
        }
    }

    /// Freezes (`pause`) or thaws every process of sandbox `id` in its cgroup, and records the
    /// new state.
    pub async fn freeze(&self, id: &str, pause: bool) -> Result<(), LifecycleError> {
        let backend = self.backend()?;
        let id2 = id.to_string();
        tokio::task::spawn_blocking(move || {
            if pause {
                backend.pause(&id2)
            } else {
                backend.resume(&id2)
            }
        })
        .await
        .map_err(|e| LifecycleError::Internal(e.to_string()))?
        .map_err(|e| LifecycleError::Internal(e.to_string()))?;
        let state = if pause {
            SandboxState::Paused
        } else {
            SandboxState::Running
        };
        self.set_state(id, state, None)
    }

    /// Refuses one more sandbox at the server's maximum (`[policy] max_sandboxes`).
    pub fn check_server_capacity(&self) -> Result<(), LifecycleError> {
        let max = self.config.policy.max_sandboxes;
        if max > 0 && self.registry.len() >= max {
            return Err(LifecycleError::TooMany(format!(
                "this server runs its maximum of {max} sandboxes; try again later"
            )));
        }
        Ok(())
    }

    /// Whether the server is stopping (nothing new is started for its own pools).
    pub fn stopping(&self) -> bool {
        self.pool.is_stopping()
    }

    /// The signer of expiring endpoints, or why there is none.
    pub fn endpoint_signer(&self) -> Result<&signed::EndpointSigner, LifecycleError> {
        self.signer
            .as_ref()
            .map_err(|e| LifecycleError::Unavailable(format!("signed endpoints: {e}")))
    }

    /// Path of a sandbox's agent socket.
    pub fn socket_path(&self, id: &str) -> Result<PathBuf, LifecycleError> {
        Ok(self.backend()?.socket_path(id))
    }

    fn reattach(&self) {
        let Ok(backend) = &self.backend else { return };
        for rec in self.registry.all() {
            let alive = rec.placement.as_ref().is_some_and(|p| backend.is_alive(p));
            if alive {
                // Its uid range is taken again before anything else happens to it, so no other
                // execbox process on the host hands it out while the sandbox still runs.
                backend.claim_slot(rec.placement.as_ref().and_then(|p| p.slot));
            }
            if alive && rec.owner.is_some() {
                // Pool and session sandboxes are tracked in memory only: nobody can reach them
                // after a restart.
                tracing::info!(sandbox = %rec.id, owner = ?rec.owner, "removing an orphaned sandbox");
                if let Some(p) = &rec.placement {
                    backend.forget(&rec.id, p);
                }
                self.registry.remove(&rec.id);
            } else if alive {
                if let Some(pidfd) = rec.placement.as_ref().and_then(|p| backend.pidfd(p)) {
                    self.watch(&rec.id, pidfd, None);
                }
                let state = if backend.is_paused(&rec.id) {
                    SandboxState::Paused
                } else {
                    SandboxState::Running
                };
                if state != rec.state {
                    let _ = self.registry.update(&rec.id, |r| r.state = state);
                }
                tracing::info!(sandbox = %rec.id, "re-attached");
                self.events.record(
                    &rec.id,
                    format!("re-attached by a starting server ({state})"),
                );
            } else if rec.state == SandboxState::Failed && rec.owner.is_none() {
                // Kept until deleted or expired, so that clients see why it failed.
            } else {
                tracing::warn!(sandbox = %rec.id, "sandbox is gone; cleaning up");
                if let Some(p) = &rec.placement {
                    backend.forget(&rec.id, p);
                }
                self.registry.remove(&rec.id);
            }
        }
    }

    fn set_state(
        &self,
        id: &str,
        state: SandboxState,
        reason: Option<&str>,
    ) -> Result<(), LifecycleError> {
        let now = time::OffsetDateTime::now_utc();
        self.events.record(
            id,
            match reason {
                Some(reason) => format!("{state} ({reason})"),
                None => state.to_string(),
            },
        );
        self.registry
            .update(id, |r| {
                r.state = state;
                r.reason = reason.map(str::to_string);
                r.last_transition_at = now;
            })
            .ok_or_else(|| LifecycleError::NotFound(id.to_string()))?
            .map(drop)
            .map_err(|e| LifecycleError::Internal(e.to_string()))
    }

    /// Traffic reached sandbox `rec` through the proxy: when it asked for it, its expiry moves
    /// to at least `renew_on_access_secs` from now (within the tenant's maximum lifetime).
    /// Written at most every few seconds, not on every request.
    pub fn renew_on_access(&self, rec: &registry::SandboxRecord) {
        let (Some(secs), Some(current)) = (rec.renew_on_access_secs, rec.expires_at) else {
            return;
        };
        let now = time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap_or(time::OffsetDateTime::now_utc());
        let step = time::Duration::seconds(RENEW_ON_ACCESS_STEP_SECS);
        let mut wanted = now + time::Duration::seconds(secs as i64);
        // Most requests end here, before the tenant's policy is looked up.
        if wanted <= current + step {
            return;
        }
        if let Some(max) = self.config.policy.for_tenant(&rec.tenant).max_lifetime_secs {
            wanted = wanted.min(rec.created_at + time::Duration::seconds(max as i64));
        }
        if wanted <= current + step {
            return;
        }
        if let Some(Err(e)) = self.registry.update(&rec.id, |r| {
            if r.expires_at.is_some_and(|e| e < wanted) {
                r.expires_at = Some(wanted);
            }
        }) {
            tracing::warn!(sandbox = %rec.id, error = %e, "extending the expiry on access");
        }
    }

    /// Removes the named volumes of `gone` (a sandbox just deleted) that asked to go with their
    /// sandbox and that no other sandbox uses.
    async fn release_volumes(&self, gone: &registry::SandboxRecord) {
        let doomed: Vec<String> = gone
            .volumes
            .iter()
            .filter(|v| v.delete_on_termination)
            .map(|v| v.claim.clone())
            .collect();
        if doomed.is_empty() {
            return;
        }
        let in_use = volumes::in_use(&self.registry.all());
        let volumes = self.volumes.clone();
        let tenant = gone.tenant.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for claim in doomed {
                if let Err(e) = volumes.remove(&tenant, &claim, &in_use) {
                    tracing::info!(tenant, claim, error = %e, "named volume kept");
                }
            }
        })
        .await;
    }

    /// Starts a sandbox and records it.
    pub async fn launch(
        &self,
        spec: LaunchSpec,
    ) -> Result<registry::SandboxRecord, LifecycleError> {
        let backend = self.backend()?;
        // The server's maximum holds for every surface (one-shot, session and pool sandboxes
        // too), whatever checked the request before.
        self.check_server_capacity()?;
        let id = uuid::Uuid::new_v4().to_string();
        let now = time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap_or(time::OffsetDateTime::now_utc());
        let record = registry::SandboxRecord {
            id: id.clone(),
            tenant: spec.tenant,
            token: random_token(),
            image_uri: spec.image_uri,
            image_id: match &spec.root {
                images::RootSource::Image(image) => Some(image.id.clone()),
                images::RootSource::Template(_) => None,
            },
            volumes: spec.named_volumes.clone(),
            renew_on_access_secs: spec.renew_on_access_secs,
            entrypoint: spec.entrypoint.clone(),
            env: spec.env.clone(),
            metadata: spec.metadata,
            created_at: now,
            expires_at: spec.expires_at,
            state: SandboxState::Running,
            reason: None,
            message: None,
            last_transition_at: now,
            limits: spec.limits,
            placement: None,
            owner: spec.owner,
            pool: None,
            e2b: None,
            network: spec.network.as_ref().map(execbox_net::Policy::to_wire),
        };
        let limits = spec.limits;
        let network = spec.network;
        let with_network = network.is_some();
        // An image's environment, working directory and command, under the request's.
        let (root_image, env, entrypoint, workdir) = match &spec.root {
            images::RootSource::Image(image) => {
                let mut env: Vec<(String, String)> = image
                    .config
                    .env
                    .iter()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .filter(|(k, _)| !spec.env.contains_key(k))
                    .collect();
                env.extend(spec.env.clone());
                let entrypoint = if spec.entrypoint.is_empty() {
                    image
                        .config
                        .entrypoint
                        .iter()
                        .chain(&image.config.cmd)
                        .cloned()
                        .collect()
                } else {
                    spec.entrypoint.clone()
                };
                (
                    Some(local::RootImage {
                        id: image.id.clone(),
                        layers: image.layers.clone(),
                    }),
                    env,
                    entrypoint,
                    image.config.working_dir.clone().filter(|d| !d.is_empty()),
                )
            }
            // The template's environment reaches every process, not the record: clients see
            // the environment they asked for.
            images::RootSource::Template(_) => (
                None,
                templates::merged_env(
                    spec.env.clone().into_iter().collect(),
                    spec.template.as_ref(),
                ),
                spec.entrypoint.clone(),
                None,
            ),
        };
        let template = spec.template.map(|t| t.host_dir);
        let volume_mounts = spec.volumes;
        let (placement, watched) = tokio::task::spawn_blocking(move || {
            backend.create_watched(local::SandboxParams {
                id: &id,
                limits,
                env,
                entrypoint,
                network: with_network,
                image: root_image,
                workdir,
                template,
                volumes: &volume_mounts,
            })
        })
        .await
        .map_err(|e| LifecycleError::Internal(e.to_string()))?
        .map_err(|e| match e {
            local::BackendError::Volume { .. } => LifecycleError::invalid(e.to_string()),
            e => {
                prometheus::sandbox_create_failed();
                LifecycleError::Internal(e.to_string())
            }
        })?;
        let record = registry::SandboxRecord {
            placement: Some(placement),
            ..record
        };
        if let Err(e) = self.registry.save(record.clone()) {
            let _ = self.destroy(&record.id, "record_failed").await;
            return Err(LifecycleError::Internal(format!(
                "saving the sandbox record: {e}"
            )));
        }
        self.watch(&record.id, watched.pidfd, Some(watched.log));
        // An entrypoint that did not start fails the sandbox, as a container whose command
        // cannot run does; the status says why.
        let record = match watched.entrypoint_error {
            Some(message) => {
                tracing::warn!(sandbox = %record.id, %message, "entrypoint failed");
                self.events
                    .record(&record.id, format!("Failed (ENTRYPOINT_FAILED): {message}"));
                let now = time::OffsetDateTime::now_utc();
                match self.registry.update(&record.id, |r| {
                    r.state = SandboxState::Failed;
                    r.reason = Some("ENTRYPOINT_FAILED".into());
                    r.message = Some(message.clone());
                    r.last_transition_at = now;
                }) {
                    Some(Ok(updated)) => updated,
                    _ => record,
                }
            }
            None => record,
        };
        if let (Some(policy), Some(tun)) = (network, watched.tun) {
            let net = execbox_net::SandboxNet::new(self.net_config.clone(), policy);
            if let Err(e) = execbox_net::start(tun, net.clone()) {
                let _ = self.destroy(&record.id, "network_failed").await;
                return Err(LifecycleError::Internal(format!(
                    "starting the sandbox's network: {e}"
                )));
            }
            self.nets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(record.id.clone(), net);
        }
        tracing::info!(
            sandbox = %record.id,
            tenant = %record.tenant,
            owner = %record.owner.as_deref().unwrap_or("lifecycle"),
            image = %record.image_uri.as_deref().unwrap_or("default"),
            volumes = record.volumes.len(),
            network = record.network.is_some(),
            "sandbox created"
        );
        self.events.record(
            &record.id,
            format!(
                "created from {} with entrypoint {:?}; Running",
                record.image_uri.as_deref().unwrap_or("default"),
                record.entrypoint
            ),
        );
        prometheus::sandbox_created(record.owner.as_deref().unwrap_or("lifecycle"));
        Ok(record)
    }

    /// Stops a sandbox and removes all of it.
    pub async fn destroy(&self, id: &str, reason: &str) -> Result<(), LifecycleError> {
        let rec = self
            .registry
            .get(id)
            .ok_or_else(|| LifecycleError::NotFound(id.to_string()))?;
        let _ = self.set_state(id, SandboxState::Stopping, Some(reason));
        self.registry.remove(id);
        self.events.forget(id);
        tracing::info!(
            sandbox = %id,
            tenant = %rec.tenant,
            owner = %rec.owner.as_deref().unwrap_or("lifecycle"),
            reason = %reason,
            "sandbox deleted"
        );
        prometheus::sandbox_deleted(reason);
        self.nets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        let backend = self.backend()?;
        let id2 = id.to_string();
        // Counted until done: a stopping server waits for it (see `stop_owned`), or the
        // sandbox, already out of the registry, would be left running.
        let _destroying = Destroying::start(&self.destroying);
        let placement = rec.placement.clone();
        let release = rec.clone();
        let result = tokio::task::spawn_blocking(move || match &placement {
            Some(p) => backend.destroy(&id2, p),
            None => backend.destroy_leftovers(&id2),
        })
        .await;
        self.release_volumes(&release).await;
        match result {
            Ok(Ok(())) => Ok(()),
            // The sandbox is out of the registry either way; what is left on the host is
            // removed by the reaper, however long that takes.
            Ok(Err(e)) => {
                tracing::warn!(sandbox = %id, error = %e, "removing the sandbox");
                if let Some(p) = rec.placement {
                    self.defer_cleanup(id, p);
                }
                Ok(())
            }
            Err(e) => Err(LifecycleError::Internal(e.to_string())),
        }
    }

    /// The tenant of a presented server key, compared in constant time against every
    /// configured key. With no key configured, every request is the default tenant (the server
    /// then listens on loopback only).
    pub async fn tenant_of(&self, presented: Option<&str>) -> Option<String> {
        if !self.config.has_keys() {
            return Some(config::DEFAULT_TENANT.to_string());
        }
        self.keys.tenant_of(presented?).await
    }

    /// Whether a data-plane request may reach the sandbox `rec`: its access token, or a server
    /// key of the sandbox's tenant.
    async fn proxy_authorized(&self, headers: &HeaderMap, rec: &registry::SandboxRecord) -> bool {
        let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
        if let Some(t) = get("x-execd-access-token") {
            if bool::from(t.as_bytes().ct_eq(rec.token.as_bytes())) {
                return true;
            }
        }
        // Without a configured key only the token opens the data plane.
        let bearer = get("authorization").and_then(|a| a.strip_prefix("Bearer "));
        let key = get("open-sandbox-api-key").or(bearer);
        self.config.has_keys()
            && key.is_some()
            && self.tenant_of(key).await.is_some_and(|t| t == rec.tenant)
    }

    /// Removes the sandboxes only this process can reach (pool, one-shot and session sandboxes,
    /// tracked in memory). Lifecycle sandboxes stay: a restarted server re-attaches to them.
    pub async fn stop_owned(&self) {
        self.pool.stop().await;
        for rec in self.registry.all() {
            if rec.owner.is_some() {
                if let Err(e) = self.destroy(&rec.id, "server_stopped").await {
                    tracing::warn!(sandbox = %rec.id, error = %e, "removing a sandbox on stop");
                }
            }
        }
        // Deletions started by requests (one-shot sandboxes after their run) finish too.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.destroying.load(std::sync::atomic::Ordering::SeqCst) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Deletes every sandbox whose expiry has passed.
    pub async fn reap_expired(&self) {
        let now = time::OffsetDateTime::now_utc();
        for rec in self.registry.all() {
            if rec.expires_at.is_some_and(|t| t <= now) {
                // E2B's `autoPause`: frozen instead of killed, until resumed or the longest
                // lifetime this server grants from now.
                if rec.pauses_at_expiry() && rec.state == SandboxState::Running {
                    match e2b::control::pause_at_expiry(self, &rec).await {
                        Ok(()) => continue,
                        Err(e) => {
                            tracing::warn!(sandbox = %rec.id, error = ?e, "pausing at expiry failed")
                        }
                    }
                }
                tracing::info!(sandbox = %rec.id, "expired");
                if let Err(e) = self.destroy(&rec.id, "ttl_expiry").await {
                    tracing::warn!(sandbox = %rec.id, error = %e, "expiry failed");
                }
            }
        }
    }
}

/// A `text/event-stream` response whose body is the frames sent on `rx`; it ends when every
/// sender is gone.
pub(crate) fn sse_response(rx: tokio::sync::mpsc::Receiver<bytes::Bytes>) -> Response {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    let mut resp = Response::new(axum::body::Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    resp
}

/// How long a streaming client may take nothing before it counts as gone (its events are then
/// dropped, so that it holds no sandbox and no memory).
pub const CLIENT_STALL: Duration = Duration::from_secs(60);

/// One deletion in progress, counted in [`Server`] while it lives.
struct Destroying<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Destroying<'a> {
    fn start(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Destroying<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// What [`Server::launch`] starts.
pub struct LaunchSpec {
    /// Owning tenant.
    pub tenant: String,
    /// The surface holding it (see [`registry::SandboxRecord::owner`]).
    pub owner: Option<String>,
    /// Image the client asked for.
    pub image_uri: Option<String>,
    /// What its root is made of.
    pub root: images::RootSource,
    /// Entrypoint (empty: the image's).
    pub entrypoint: Vec<String>,
    /// Environment of user processes (over the image's).
    pub env: std::collections::BTreeMap<String, String>,
    /// Labels.
    pub metadata: std::collections::BTreeMap<String, String>,
    /// Limits.
    pub limits: local::SandboxLimits,
    /// Automatic expiry.
    pub expires_at: Option<time::OffsetDateTime>,
    /// Outbound network under this policy; none for loopback only.
    pub network: Option<execbox_net::Policy>,
    /// The built template the sandbox sees (its image resolved to one); none for the host's
    /// runtimes alone.
    pub template: Option<templates::Prepared>,
    /// Volumes, resolved ([`volumes::Volumes::resolve`]).
    pub volumes: Vec<volumes::VolumeMount>,
    /// The named volumes among them.
    pub named_volumes: Vec<volumes::NamedVolumeRef>,
    /// See [`registry::SandboxRecord::renew_on_access_secs`].
    pub renew_on_access_secs: Option<u64>,
}

/// How often (in ticks of the 1 s maintenance loop) the loop devices of deleted sandboxes'
/// disks are removed.
const LOOP_SWEEP_TICKS: u64 = 30;

/// Removes the loop devices that disks of sandboxes now gone left free, but for a few: after a
/// burst of sandboxes, the host does not keep thousands of them.
fn remove_free_loop_devices() {
    match execbox_jail::storage::remove_free_loop_devices() {
        Ok(0) => {}
        Ok(n) => tracing::debug!(removed = n, "free loop devices removed"),
        // A host without loop devices has no sandbox disks either.
        Err(e) => tracing::debug!(error = %e, "removing free loop devices"),
    }
}

/// An expiry extended on access moves by at least this much, so that a busy sandbox's record
/// is not written on every request.
const RENEW_ON_ACCESS_STEP_SECS: i64 = 5;

/// The network layer's settings from the server's configuration (checked at start).
fn net_config(config: &ServerConfig) -> execbox_net::NetConfig {
    let exceptions = execbox_net::Exceptions::parse(&config.network.allow_addresses)
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "network.allow_addresses");
            execbox_net::Exceptions::default()
        });
    execbox_net::NetConfig {
        hosts: config
            .network
            .hosts
            .iter()
            .map(|(name, ips)| (name.trim_end_matches('.').to_ascii_lowercase(), ips.clone()))
            .collect(),
        exceptions,
        host_addresses: execbox_net::host_addresses(),
        dns_ttl_secs: config.network.dns_ttl_secs,
        max_connections: config.network.max_connections,
        tcp_window_bytes: config.network.tcp_window_bytes.clamp(16 * 1024, 16 << 20),
        bandwidth_bytes_per_sec: (config.network.bandwidth_bytes_per_sec > 0)
            .then_some(config.network.bandwidth_bytes_per_sec),
        ..Default::default()
    }
}

fn random_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 24];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The tenant a lifecycle request acts for (set by the auth middleware).
#[derive(Clone, Debug)]
pub struct Tenant(pub String);

async fn lifecycle_auth(State(server): State<Arc<Server>>, req: Request, next: Next) -> Response {
    let key = req
        .headers()
        .get("open-sandbox-api-key")
        .and_then(|v| v.to_str().ok());
    if let Some(tenant) = server.tenant_of(key).await {
        let mut req = req;
        req.extensions_mut().insert(Tenant(tenant.clone()));
        let mut resp = next.run(req).await;
        // For the access log.
        resp.extensions_mut().insert(Tenant(tenant));
        return resp;
    }
    let env = if key.is_none() {
        ErrorEnvelope::missing_api_key()
    } else {
        ErrorEnvelope::invalid_api_key()
    };
    (StatusCode::UNAUTHORIZED, Json(env)).into_response()
}

/// Every request gets an id (the client's `x-request-id`, else a new one), returned in the
/// response, and one access-log line: method, path (never the query, which may carry tokens),
/// status, latency, tenant when known, request id.
async fn access_log(req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let id = req
        .headers()
        .get("x-request-id")
        .cloned()
        .unwrap_or_else(|| {
            use rand::RngCore;
            let mut b = [0u8; 16];
            rand::rng().fill_bytes(&mut b);
            let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
            HeaderValue::from_str(&hex).unwrap_or(HeaderValue::from_static("0"))
        });
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut resp = next.run(req).await;
    let tenant = resp.extensions().get::<Tenant>().map(|t| t.0.clone());
    let route = resp
        .extensions()
        .get::<prometheus::MetricsRoute>()
        .map_or(path.as_str(), |r| r.0);
    prometheus::request(
        method.as_str(),
        route,
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    tracing::info!(
        target: "execbox::access",
        method = %method,
        path = %signed::redact(&path),
        status = resp.status().as_u16(),
        latency_ms = started.elapsed().as_secs_f64() * 1e3,
        tenant = %tenant.as_deref().unwrap_or("-"),
        request_id = %id.to_str().unwrap_or("-"),
        "request"
    );
    resp.headers_mut().insert("x-request-id", id);
    resp
}

/// A body over the framework's limit is refused before any handler runs, in plain text: on the
/// lifecycle API it gets the API's envelope, like every other refusal.
async fn lifecycle_body_limit_envelope(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let plain = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/plain"));
    if resp.status() != StatusCode::PAYLOAD_TOO_LARGE || !plain {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    // The framework's own short message, kept as the envelope's detail.
    let detail = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let mut out = (
        StatusCode::PAYLOAD_TOO_LARGE,
        Json(ErrorEnvelope::new(
            execbox_proto::lifecycle::ErrorCode::InvalidParameter,
            format!("body: {}", String::from_utf8_lossy(&detail).trim()),
        )),
    )
        .into_response();
    if let Some(id) = parts.headers.get("x-request-id") {
        out.headers_mut().insert("x-request-id", id.clone());
    }
    out
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}))
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(ErrorEnvelope::new(
            execbox_proto::lifecycle::ErrorCode::ApiNotSupported,
            "no such route",
        )),
    )
        .into_response()
}

/// The whole HTTP surface.
pub fn router(server: Arc<Server>) -> Router {
    use lifecycle as l;
    let lifecycle = Router::new()
        .route("/v1/sandboxes", post(l::create).get(l::list))
        .route("/v1/sandboxes/{id}", get(l::get).delete(l::delete))
        .route(
            "/v1/sandboxes/{id}/metadata",
            axum::routing::patch(l::patch_metadata),
        )
        .route("/v1/sandboxes/{id}/pause", post(l::pause))
        .route("/v1/sandboxes/{id}/resume", post(l::resume))
        .route("/v1/sandboxes/{id}/renew-expiration", post(l::renew))
        .route("/v1/sandboxes/{id}/endpoints/{port}", get(l::endpoint))
        .route(
            "/v1/pools",
            post(sandbox_pools::create).get(sandbox_pools::list),
        )
        .route(
            "/v1/pools/{name}",
            get(sandbox_pools::get)
                .put(sandbox_pools::update)
                .delete(sandbox_pools::delete),
        )
        .route(
            "/v1/sandboxes/{id}/diagnostics/logs",
            get(diagnostics::logs),
        )
        .route(
            "/v1/sandboxes/{id}/diagnostics/events",
            get(diagnostics::events),
        )
        .route(
            "/v1/sandboxes/{id}/diagnostics/inspect",
            get(diagnostics::inspect),
        )
        .route(
            "/v1/sandboxes/{id}/diagnostics/summary",
            get(diagnostics::summary),
        )
        .route(
            "/v1/sandboxes/{id}/snapshots",
            post(l::snapshots_unsupported),
        )
        .route("/v1/snapshots", get(l::snapshots_unsupported))
        .route(
            "/v1/snapshots/{sid}",
            get(l::snapshots_unsupported).delete(l::snapshots_unsupported),
        )
        .route_layer(middleware::from_fn_with_state(
            server.clone(),
            lifecycle_auth,
        ))
        .route_layer(middleware::from_fn(lifecycle_body_limit_envelope));
    let routes = Router::new()
        .route("/health", get(health))
        // Public like `/health`: the documents describe the code, not this server's data.
        .route("/openapi.json", get(openapi::serve_merged))
        .route("/openapi/execd.json", get(openapi::serve_execd))
        .route("/openapi/leap0.json", get(openapi::serve_leap0))
        .route("/v1/sandboxes/{id}/proxy/{port}", any(proxy::proxy))
        .route("/v1/sandboxes/{id}/proxy/{port}/", any(proxy::proxy))
        .route("/v1/sandboxes/{id}/proxy/{port}/{*rest}", any(proxy::proxy))
        .route(
            "/v1/sandboxes/{id}/signed/{port}/{expires}/{signature}",
            any(proxy::signed_proxy),
        )
        .route(
            "/v1/sandboxes/{id}/signed/{port}/{expires}/{signature}/",
            any(proxy::signed_proxy),
        )
        .route(
            "/v1/sandboxes/{id}/signed/{port}/{expires}/{signature}/{*rest}",
            any(proxy::signed_proxy),
        )
        .merge(lifecycle)
        .merge(isol8::routes(server.clone()))
        .merge(session_exec::routes(server.clone()))
        .merge(e2b::routes(server.clone()))
        .fallback(not_found)
        .with_state(server.clone());
    // The E2B data plane is recognised before any route (its `/health`, `/files` and
    // `/execute` are the sandbox's, not this server's or isol8's).
    Router::new()
        .fallback_service(routes)
        .layer(middleware::from_fn_with_state(server, e2b::intercept))
        .layer(middleware::from_fn(access_log))
}

/// Errors of [`serve`].
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is unsafe or invalid.
    #[error("{0}")]
    Config(String),
    /// Binding or serving failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The listener's limits are invalid.
    #[error("{0}")]
    Listener(#[from] listener::ListenerError),
    /// The secrets key is missing, wrong or unreadable.
    #[error("secrets at rest: {0}")]
    Secrets(#[from] secrets::SecretsError),
    /// `[tls]` names files that do not make a usable certificate.
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
}

/// SIGHUP reloads the TLS certificate and key (and client CAs) for new connections; without
/// TLS it is logged and otherwise ignored (it no longer ends the process).
fn spawn_sighup(tls: Option<Arc<tls::Tls>>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler: reload TLS by file change only");
            return;
        }
    };
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            match &tls {
                Some(tls) => {
                    let tls = tls.clone();
                    let _ = tokio::task::spawn_blocking(move || tls.reload(true, "SIGHUP")).await;
                }
                None => tracing::info!("SIGHUP: no [tls] configured, nothing to reload"),
            }
        }
    });
}

/// Runs the server until the process is stopped.
pub async fn serve(config: ServerConfig) -> Result<(), ServeError> {
    let keys =
        api_keys::KeyRing::from_config(&config).map_err(|e| ServeError::Config(e.to_string()))?;
    match keys.counts() {
        (0, _) => {}
        (clear, hashed) => tracing::info!(
            clear,
            hashed,
            "some API keys are stored in clear in the configuration: `execbox key new` makes \
             keys stored as salted hashes"
        ),
    }
    if !config.has_keys() {
        if !config.listen.ip().is_loopback() {
            return Err(ServeError::Config(format!(
                "refusing to listen on {} without an API key: set EXECBOX_API_KEY or \
                 listen on a loopback address",
                config.listen
            )));
        }
        tracing::warn!("no API key configured: serving on loopback without authentication");
    }
    // Every client connection is a descriptor: take all the process may have.
    match execbox_jail::host::raise_nofile_limit() {
        Ok((before, after)) => tracing::info!(
            soft = after.soft,
            hard = after.hard,
            was_soft = before.soft,
            was_hard = before.hard,
            "limit on open files"
        ),
        Err(e) => tracing::warn!(error = %e, "could not raise the limit on open files"),
    }
    // The certificate and key are read before anything else starts: a bad one is a start
    // error naming the key.
    let tls = tls::Tls::new(&config.tls)?;
    tls::log_start(tls.as_deref(), config.listen);
    if let Some(tls) = &tls {
        tls.spawn_watcher();
    }
    spawn_sighup(tls.clone());
    let tcp = listener::bind(config.listen)?;
    let listener = listener::Listener::new(tcp, &config)?.with_tls(tls.clone());
    let server = tokio::task::spawn_blocking(move || Server::new(config))
        .await
        .map_err(|e| ServeError::Config(e.to_string()))??;
    // Fail closed, at start: a server that cannot create sandboxes says why once, instead of
    // answering every create with a 500.
    if let Err(why) = &server.backend {
        return Err(ServeError::Config(format!(
            "{why} (execbox doctor shows every layer, with hints)"
        )));
    }
    if let Some(addr) = server.config.metrics.listen {
        match prometheus::install() {
            Some(handle) => {
                tokio::spawn(prometheus::serve(addr, handle, server.clone()));
            }
            None => tracing::warn!("metrics are off: a recorder is installed already"),
        }
    }
    isol8::warm(&server);
    server.templates.start_prebuild();
    let reaper = server.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut ticks: u64 = 0;
        loop {
            tick.tick().await;
            ticks += 1;
            if ticks.is_multiple_of(LOOP_SWEEP_TICKS) {
                tokio::task::spawn_blocking(remove_free_loop_devices);
            }
            reaper.reap_expired().await;
            reaper.retry_cleanups().await;
            sandbox_pools::maintain(&reaper);
            pool::WarmPool::maintain(&reaper);
            let ttl = Duration::from_secs(reaper.config.policy.session_idle_ttl_secs);
            sessions::Sessions::prune(&reaper, ttl).await;
        }
    });
    tracing::info!(
        addr = %listener.local_addr()?,
        max_connections = listener.max_connections(),
        tls = tls.is_some(),
        "execbox listening"
    );
    // Under systemd (`Type=notify`): ready now. Elsewhere NOTIFY_SOCKET is unset: nothing.
    if let Err(e) = sd_notify::notify(true, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "telling systemd the server is ready");
    }
    // SIGTERM and SIGINT alike: stop accepting, let requests in flight finish (within the
    // grace period), then remove what this server owns (pool and session sandboxes; lifecycle
    // sandboxes keep running and are re-attached at the next start).
    let stop = async {
        use tokio::signal::unix::{signal, SignalKind};
        // A SIGINT ignored at start (a job put in the background by a shell) stays ignored.
        let interrupt = if execbox_jail::host::signal_ignored(nix::libc::SIGINT) {
            None
        } else {
            signal(SignalKind::interrupt()).ok()
        };
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            return std::future::pending::<()>().await;
        };
        let name = match interrupt {
            Some(mut int) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            },
            None => {
                term.recv().await;
                "SIGTERM"
            }
        };
        tracing::info!(signal = name, "stopping");
    };
    let grace = Duration::from_secs(server.config.shutdown_grace_secs);
    listener
        .serve_until(router(server.clone()), stop, grace)
        .await;
    server.stop_owned().await;
    // What the deleted sandboxes' disks left (those still in use are refused by the kernel).
    remove_free_loop_devices();
    tracing::info!("stopped");
    // Not a return: the runtime would wait for blocking work that no longer matters.
    std::process::exit(0);
}
