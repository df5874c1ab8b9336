//! The warm pool: sandboxes started ahead of need, per template and limits profile, so that a
//! one-shot run does not wait for a sandbox to start. A pooled sandbox serves exactly one
//! caller and is destroyed after use; nothing is ever returned to the pool, so nothing of one
//! caller (files, processes, environment) can reach the next.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::lifecycle::LifecycleError;
use crate::local::SandboxLimits;
use crate::registry::SandboxRecord;
use crate::{LaunchSpec, Server};

/// Owner mark of a ready pooled sandbox.
pub const POOL_OWNER: &str = "pool";
/// Owner mark of a sandbox serving one one-shot run.
pub const ONESHOT_OWNER: &str = "oneshot";

/// What makes pooled sandboxes interchangeable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Profile {
    /// Template name.
    pub template: String,
    /// Limits.
    pub limits: SandboxLimits,
    /// With a network device (deny-all until a run sets its policy).
    pub network: bool,
}

#[derive(Default)]
struct Shelf {
    ready: Vec<String>,
    starting: usize,
}

/// Ready sandboxes by profile.
pub struct WarmPool {
    size: usize,
    max_profiles: usize,
    shelves: Mutex<HashMap<Profile, Shelf>>,
    stopping: std::sync::atomic::AtomicBool,
}

impl WarmPool {
    /// A pool keeping `size` sandboxes for each of at most `max_profiles` profiles.
    pub fn new(size: usize, max_profiles: usize) -> Self {
        Self {
            size,
            max_profiles,
            shelves: Mutex::new(HashMap::new()),
            stopping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Starts nothing more, and waits (bounded) until the sandboxes being started are up, so
    /// that the caller can then remove every pooled sandbox.
    pub async fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
        while self.lock().values().any(|s| s.starting > 0) && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Whether [`WarmPool::stop`] was called: the server is stopping.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Profile, Shelf>> {
        self.shelves.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ready sandboxes of `profile` (for tests and metrics).
    /// Ready sandboxes, every profile together.
    pub fn ready_total(&self) -> usize {
        self.lock().values().map(|s| s.ready.len()).sum()
    }

    pub fn ready(&self, profile: &Profile) -> usize {
        self.lock().get(profile).map_or(0, |s| s.ready.len())
    }

    /// A sandbox of `profile` for one run by `tenant`: a ready one when there is one, else a new
    /// one. Either way the pool starts a replacement in the background.
    pub async fn acquire(
        server: &Arc<Server>,
        profile: &Profile,
        tenant: &str,
    ) -> Result<SandboxRecord, LifecycleError> {
        let pool = &server.pool;
        loop {
            let taken = pool.lock().get_mut(profile).and_then(|s| s.ready.pop());
            Self::refill(server, profile);
            let Some(id) = taken else { break };
            let claimed = server.registry.update(&id, |r| {
                r.tenant = tenant.to_string();
                r.owner = Some(ONESHOT_OWNER.to_string());
            });
            match claimed {
                Some(Ok(rec)) if rec.placement.as_ref().is_some_and(|p| server.is_alive(p)) => {
                    crate::prometheus::pool_acquired("warm", true);
                    return Ok(rec);
                }
                // Died while waiting: remove it and try the next.
                _ => {
                    let _ = server.destroy(&id, "pool_dead").await;
                }
            }
        }
        crate::prometheus::pool_acquired("warm", false);
        server
            .launch(Self::spec(profile, tenant, ONESHOT_OWNER))
            .await
    }

    fn spec(profile: &Profile, tenant: &str, owner: &str) -> LaunchSpec {
        LaunchSpec {
            tenant: tenant.to_string(),
            owner: Some(owner.to_string()),
            image_uri: Some(profile.template.clone()),
            root: crate::images::RootSource::Template(profile.template.clone()),
            entrypoint: Vec::new(),
            env: Default::default(),
            metadata: Default::default(),
            limits: profile.limits,
            expires_at: None,
            network: profile.network.then(execbox_net::Policy::deny_all),
            template: None,
            volumes: Vec::new(),
            named_volumes: Vec::new(),
            renew_on_access_secs: None,
        }
    }

    /// Starts sandboxes until `profile` has its ready count (counting those starting).
    pub fn refill(server: &Arc<Server>, profile: &Profile) {
        let pool = &server.pool;
        if pool.size == 0 || pool.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let missing = {
            let mut shelves = pool.lock();
            if !shelves.contains_key(profile) && shelves.len() >= pool.max_profiles {
                return;
            }
            let shelf = shelves.entry(profile.clone()).or_default();
            let missing = pool.size.saturating_sub(shelf.ready.len() + shelf.starting);
            shelf.starting += missing;
            missing
        };
        for _ in 0..missing {
            let server = server.clone();
            let profile = profile.clone();
            tokio::spawn(async move {
                let made = server.launch(Self::spec(&profile, "", POOL_OWNER)).await;
                let mut shelves = server.pool.lock();
                let shelf = shelves.entry(profile).or_default();
                shelf.starting = shelf.starting.saturating_sub(1);
                match made {
                    Ok(rec) => shelf.ready.push(rec.id),
                    Err(e) => tracing::warn!(error = %e, "warm pool: starting a sandbox failed"),
                }
            });
        }
    }
}
