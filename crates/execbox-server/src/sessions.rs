//! Persistent sessions of the isol8 and session-execute surfaces: one sandbox per
//! (surface, tenant, client-chosen id). A tenant never sees another tenant's session: the key
//! includes the tenant. Sessions end when idle past the policy's TTL, when the per-tenant cap
//! evicts the least recently used idle one, or on request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::lifecycle::LifecycleError;
use crate::{LaunchSpec, Server};

/// Which surface a session belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Surface {
    /// isol8 `sessionId`.
    Isol8,
    /// Session-execute `sessionId`.
    SessionExec,
}

impl Surface {
    /// The owner mark of its sandboxes.
    pub fn owner(self) -> &'static str {
        match self {
            Surface::Isol8 => "isol8",
            Surface::SessionExec => "session-exec",
        }
    }
}

/// Identity of a session.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    /// Surface.
    pub surface: Surface,
    /// Owning tenant.
    pub tenant: String,
    /// Client-chosen id.
    pub id: String,
}

struct Session {
    sandbox: String,
    runtime: Option<String>,
    last_used: Instant,
    last_used_ms: i64,
    busy: usize,
}

/// A listed session.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// Client-chosen id.
    pub id: String,
    /// Whether an execution runs in it now.
    pub active: bool,
    /// Last use, Unix milliseconds.
    pub last_used_ms: i64,
}

/// Errors of opening a session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The tenant's sessions are at the cap and all of them are busy.
    #[error("session limit reached: {0} sessions, all busy")]
    TooMany(usize),
    /// Starting the sandbox failed.
    #[error(transparent)]
    Sandbox(#[from] LifecycleError),
}

/// All sessions of this server.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<SessionKey, Session>>,
    /// Serialises creations so that two first calls with one id make one sandbox.
    creating: tokio::sync::Mutex<()>,
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// A session held for one call: it counts as busy (never pruned or evicted) until dropped.
pub struct Lease {
    server: Arc<Server>,
    key: SessionKey,
    /// The session's sandbox.
    pub sandbox: String,
    /// Runtime the session is bound to, if any.
    pub runtime: Option<String>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut map = self.server.sessions.lock();
        if let Some(s) = map.get_mut(&self.key) {
            s.busy = s.busy.saturating_sub(1);
            s.last_used = Instant::now();
            s.last_used_ms = now_ms();
        }
    }
}

impl Lease {
    /// Binds the session to `runtime` on first use; the runtime it is bound to otherwise.
    pub fn bind_runtime(&mut self, runtime: &str) -> Result<(), String> {
        let mut map = self.server.sessions.lock();
        let Some(s) = map.get_mut(&self.key) else {
            return Ok(());
        };
        match &s.runtime {
            Some(bound) if bound != runtime => Err(bound.clone()),
            Some(_) => Ok(()),
            None => {
                s.runtime = Some(runtime.to_string());
                self.runtime = s.runtime.clone();
                Ok(())
            }
        }
    }
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionKey, Session>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lease_existing(&self, server: &Arc<Server>, key: &SessionKey) -> Option<Lease> {
        let mut map = self.lock();
        let s = map.get_mut(key)?;
        if server.registry.get(&s.sandbox).is_none() {
            map.remove(key);
            return None;
        }
        s.busy += 1;
        s.last_used = Instant::now();
        s.last_used_ms = now_ms();
        Some(Lease {
            server: server.clone(),
            key: key.clone(),
            sandbox: s.sandbox.clone(),
            runtime: s.runtime.clone(),
        })
    }

    /// The session `key` if it exists (and its sandbox still runs).
    pub fn get(server: &Arc<Server>, key: &SessionKey) -> Option<Lease> {
        server.sessions.lease_existing(server, key)
    }

    /// The session `key`, created with `spec` on first use. At the tenant's cap the least
    /// recently used idle session of the surface is removed first.
    pub async fn open(
        server: &Arc<Server>,
        key: &SessionKey,
        spec: impl FnOnce() -> LaunchSpec,
    ) -> Result<Lease, SessionError> {
        let this = &server.sessions;
        if let Some(l) = this.lease_existing(server, key) {
            return Ok(l);
        }
        let _creating = this.creating.lock().await;
        if let Some(l) = this.lease_existing(server, key) {
            return Ok(l);
        }
        let cap = server.config.policy.for_tenant(&key.tenant).max_sessions;
        let evict = {
            let map = this.lock();
            let mine: Vec<(&SessionKey, &Session)> = map
                .iter()
                .filter(|(k, _)| k.surface == key.surface && k.tenant == key.tenant)
                .collect();
            if mine.len() < cap {
                None
            } else {
                let victim = mine
                    .iter()
                    .filter(|(_, s)| s.busy == 0)
                    .min_by_key(|(_, s)| s.last_used)
                    .map(|(k, _)| (*k).clone());
                Some(victim.ok_or(SessionError::TooMany(cap))?)
            }
        };
        if let Some(victim) = evict {
            tracing::info!(session = %victim.id, tenant = %victim.tenant, "session cap: evicting");
            Self::remove(server, &victim).await;
        }
        let mut spec = spec();
        spec.tenant = key.tenant.clone();
        spec.owner = Some(key.surface.owner().to_string());
        let rec = server.launch(spec).await?;
        this.lock().insert(
            key.clone(),
            Session {
                sandbox: rec.id.clone(),
                runtime: None,
                last_used: Instant::now(),
                last_used_ms: now_ms(),
                busy: 1,
            },
        );
        Ok(Lease {
            server: server.clone(),
            key: key.clone(),
            sandbox: rec.id,
            runtime: None,
        })
    }

    /// Removes a session and its sandbox; false when there was none.
    pub async fn remove(server: &Arc<Server>, key: &SessionKey) -> bool {
        let removed = server.sessions.lock().remove(key);
        match removed {
            Some(s) => {
                if let Err(e) = server.destroy(&s.sandbox, "session_deleted").await {
                    tracing::warn!(sandbox = %s.sandbox, error = %e, "removing a session");
                }
                true
            }
            None => false,
        }
    }

    /// Sessions of one tenant on one surface, sorted by id.
    pub fn list(&self, surface: Surface, tenant: &str) -> Vec<SessionInfo> {
        let mut v: Vec<SessionInfo> = self
            .lock()
            .iter()
            .filter(|(k, _)| k.surface == surface && k.tenant == tenant)
            .map(|(k, s)| SessionInfo {
                id: k.id.clone(),
                active: s.busy > 0,
                last_used_ms: s.last_used_ms,
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Removes sessions idle for longer than `ttl` (never one that is executing).
    pub async fn prune(server: &Arc<Server>, ttl: Duration) {
        let idle: Vec<SessionKey> = server
            .sessions
            .lock()
            .iter()
            .filter(|(_, s)| s.busy == 0 && s.last_used.elapsed() > ttl)
            .map(|(k, _)| k.clone())
            .collect();
        for key in idle {
            tracing::info!(session = %key.id, tenant = %key.tenant, "session idle: removing");
            Self::remove(server, &key).await;
        }
    }
}
