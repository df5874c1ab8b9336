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
    /// One-shot runs holding a sandbox of this profile now.
    in_use: usize,
    /// Most runs of this profile at once since demand was last idle.
    peak: usize,
    /// When a run last took a sandbox of this profile.
    last_acquire: Option<std::time::Instant>,
    /// When runs took sandboxes of this profile, over the last [`RATE_WINDOW`].
    arrivals: std::collections::VecDeque<std::time::Instant>,
    /// How long readying one sandbox takes (start and pre-start), smoothed, in milliseconds.
    refill_ms: f64,
}

/// The window over which the pool measures the rate of one-shot runs.
const RATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);
/// Arrivals remembered at most per profile (bounds the memory of a burst).
const MAX_ARRIVALS: usize = 4096;
/// Longest a refill waits for the end of the run that took a sandbox, while the shelf still
/// has a ready one for the next caller. Readying a sandbox (its start and its interpreter's)
/// keeps a small host's CPUs busy for tens of milliseconds: done during the run, it slows the
/// run down (a pre-started `print` took 6 ms beside a refill, 3 ms without).
const REFILL_DEFER: std::time::Duration = std::time::Duration::from_millis(100);
/// CPU weight of a pooled sandbox until a run takes it (against 100 for the others): its
/// interpreter's start, the larger part of readying it, takes only CPU time that runs leave.
const READYING_CPU_WEIGHT: u32 = 1;

/// How the pool sizes itself (`[policy]`).
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Ready sandboxes per profile at rest (0: no pool).
    pub size: usize,
    /// Most ready sandboxes per profile under demand.
    pub max: usize,
    /// Demand older than this no longer counts.
    pub idle: std::time::Duration,
    /// Distinct profiles kept.
    pub max_profiles: usize,
    /// Interpreter started in each ready sandbox (`python`), if any.
    pub prestart: Option<String>,
}

impl Shelf {
    /// Ready sandboxes wanted: the floor, or the recent demand, bounded by the maximum.
    /// Demand is the larger of the recent peak of runs at once and the runs that arrive while
    /// one sandbox is being readied (rate × readying time, Little's law): with fewer, runs
    /// arriving back to back find the shelf empty although each one alone would not.
    fn target(&self, s: &PoolSettings) -> usize {
        if s.size == 0 {
            return 0;
        }
        let rate_per_ms = self.arrivals.len() as f64 / RATE_WINDOW.as_millis() as f64;
        let in_flight = (rate_per_ms * self.refill_ms).ceil() as usize;
        s.size.max(self.peak.max(in_flight).min(s.max))
    }

    fn prune(&mut self, now: std::time::Instant) {
        while self
            .arrivals
            .front()
            .is_some_and(|t| now.duration_since(*t) > RATE_WINDOW)
        {
            self.arrivals.pop_front();
        }
    }
}

/// Ready sandboxes by profile.
pub struct WarmPool {
    settings: PoolSettings,
    shelves: Mutex<HashMap<Profile, Shelf>>,
    /// Sandboxes handed to a run, by id: their profile, for [`WarmPool::release`].
    taken: Mutex<HashMap<String, Profile>>,
    stopping: std::sync::atomic::AtomicBool,
    /// Refills readying a sandbox at once: one per CPU. Started together, a pool growing to a
    /// burst of 50 would start 50 sandboxes beside the burst's own, and every one of them would
    /// be late.
    refills: Arc<tokio::sync::Semaphore>,
}

impl WarmPool {
    /// A pool sized by `settings`.
    pub fn new(settings: PoolSettings) -> Self {
        Self {
            settings,
            shelves: Mutex::new(HashMap::new()),
            taken: Mutex::new(HashMap::new()),
            stopping: std::sync::atomic::AtomicBool::new(false),
            refills: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
        }
    }

    /// The run holding sandbox `id` is over: demand for its profile is one less, and the
    /// refill its acquire left for later starts now.
    pub fn release(server: &Arc<Server>, id: &str) {
        let pool = &server.pool;
        let profile = pool
            .taken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some(profile) = profile {
            if let Some(shelf) = pool.lock().get_mut(&profile) {
                shelf.in_use = shelf.in_use.saturating_sub(1);
            }
            Self::refill(server, &profile);
        }
    }

    /// Ready sandboxes meant to be kept now, every profile together.
    pub fn target_total(&self) -> usize {
        self.lock().values().map(|s| s.target(&self.settings)).sum()
    }

    /// Ready sandboxes `profile` is meant to have now (for tests and metrics).
    pub fn target(&self, profile: &Profile) -> usize {
        self.lock()
            .get(profile)
            .map_or(self.settings.size, |s| s.target(&self.settings))
    }

    /// Shrinks the shelves whose demand has been idle: their peak falls back to the runs in
    /// progress, and ready sandboxes above the target are removed (off any request's path:
    /// called from the reaper's tick).
    pub fn maintain(server: &Arc<Server>) {
        let pool = &server.pool;
        if pool.is_stopping() {
            return;
        }
        let mut surplus = Vec::new();
        {
            let mut shelves = pool.lock();
            for shelf in shelves.values_mut() {
                let idle = shelf
                    .last_acquire
                    .is_none_or(|t| t.elapsed() >= pool.settings.idle);
                if idle {
                    shelf.peak = shelf.in_use;
                }
                shelf.prune(std::time::Instant::now());
                let target = shelf.target(&pool.settings);
                while shelf.ready.len() > target {
                    // The oldest first: the newest are the least likely to have been paged out.
                    surplus.push(shelf.ready.remove(0));
                }
            }
        }
        for id in surplus {
            let server = server.clone();
            tokio::spawn(async move {
                if let Err(e) = server.destroy(&id, "pool_shrink").await {
                    tracing::warn!(sandbox = %id, error = %e, "warm pool: removing a surplus sandbox");
                }
            });
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

    /// One-shot runs in progress, every profile together.
    pub fn runs_in_progress(&self) -> usize {
        self.lock().values().map(|s| s.in_use).sum()
    }

    /// Ready sandboxes, every profile together.
    pub fn ready_total(&self) -> usize {
        self.lock().values().map(|s| s.ready.len()).sum()
    }

    pub fn ready(&self, profile: &Profile) -> usize {
        self.lock().get(profile).map_or(0, |s| s.ready.len())
    }

    /// A sandbox of `profile` for one run by `tenant`: a ready one when there is one, else a new
    /// one. Either way the pool starts a replacement in the background: at once when the shelf
    /// is now empty, otherwise when the run ends ([`WarmPool::release`]) or after
    /// [`REFILL_DEFER`], whichever comes first.
    pub async fn acquire(
        server: &Arc<Server>,
        profile: &Profile,
        tenant: &str,
    ) -> Result<SandboxRecord, LifecycleError> {
        let pool = &server.pool;
        pool.demand(profile);
        loop {
            let (taken, left) = match pool.lock().get_mut(profile) {
                Some(shelf) => (shelf.ready.pop(), shelf.ready.len()),
                None => (None, 0),
            };
            if taken.is_some() && left > 0 {
                let (server, profile) = (server.clone(), profile.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(REFILL_DEFER).await;
                    Self::refill(&server, &profile);
                });
            } else {
                Self::refill(server, profile);
            }
            let Some(id) = taken else { break };
            let claimed = server.registry.update(&id, |r| {
                r.tenant = tenant.to_string();
                r.owner = Some(ONESHOT_OWNER.to_string());
            });
            match claimed {
                Some(Ok(rec)) if rec.placement.as_ref().is_some_and(|p| server.is_alive(p)) => {
                    server.set_cpu_weight(&rec.id, execbox_jail::cgroup::DEFAULT_CPU_WEIGHT);
                    crate::prometheus::pool_acquired("warm", true);
                    pool.took(&rec.id, profile);
                    return Ok(rec);
                }
                // Died while waiting: remove it and try the next.
                _ => {
                    let _ = server.destroy(&id, "pool_dead").await;
                }
            }
        }
        crate::prometheus::pool_acquired("warm", false);
        let rec = server
            .launch(Self::spec(profile, tenant, ONESHOT_OWNER))
            .await;
        match &rec {
            Ok(rec) => pool.took(&rec.id, profile),
            Err(_) => pool.release_demand(profile),
        }
        rec
    }

    /// One more run of `profile` in progress: the peak follows.
    fn demand(&self, profile: &Profile) {
        if self.settings.size == 0 {
            return;
        }
        let mut shelves = self.lock();
        if !shelves.contains_key(profile) && shelves.len() >= self.settings.max_profiles {
            return;
        }
        let shelf = shelves.entry(profile.clone()).or_default();
        let now = std::time::Instant::now();
        shelf.in_use += 1;
        shelf.peak = shelf.peak.max(shelf.in_use);
        shelf.last_acquire = Some(now);
        shelf.prune(now);
        if shelf.arrivals.len() >= MAX_ARRIVALS {
            shelf.arrivals.pop_front();
        }
        shelf.arrivals.push_back(now);
    }

    fn took(&self, id: &str, profile: &Profile) {
        if self.settings.size == 0 || !self.lock().contains_key(profile) {
            return;
        }
        self.taken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), profile.clone());
    }

    fn release_demand(&self, profile: &Profile) {
        if let Some(shelf) = self.lock().get_mut(profile) {
            shelf.in_use = shelf.in_use.saturating_sub(1);
        }
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
        if pool.settings.size == 0 || pool.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let missing = {
            let mut shelves = pool.lock();
            if !shelves.contains_key(profile) && shelves.len() >= pool.settings.max_profiles {
                return;
            }
            let shelf = shelves.entry(profile.clone()).or_default();
            let target = shelf.target(&pool.settings);
            let missing = target.saturating_sub(shelf.ready.len() + shelf.starting);
            shelf.starting += missing;
            missing
        };
        for _ in 0..missing {
            let server = server.clone();
            let profile = profile.clone();
            let slots = pool.refills.clone();
            tokio::spawn(async move {
                let _slot = slots.acquire_owned().await;
                if server.pool.is_stopping() {
                    let mut shelves = server.pool.lock();
                    let shelf = shelves.entry(profile).or_default();
                    shelf.starting = shelf.starting.saturating_sub(1);
                    return;
                }
                let t = std::time::Instant::now();
                let made = server.launch(Self::spec(&profile, "", POOL_OWNER)).await;
                if let (Ok(rec), Some(runtime)) = (&made, &server.pool.settings.prestart) {
                    server.set_cpu_weight(&rec.id, READYING_CPU_WEIGHT);
                    Self::prestart(&server, &rec.id, runtime).await;
                }
                let took_ms = t.elapsed().as_secs_f64() * 1e3;
                let mut shelves = server.pool.lock();
                let shelf = shelves.entry(profile).or_default();
                shelf.starting = shelf.starting.saturating_sub(1);
                if made.is_ok() {
                    shelf.refill_ms = if shelf.refill_ms == 0.0 {
                        took_ms
                    } else {
                        0.8 * shelf.refill_ms + 0.2 * took_ms
                    };
                }
                match made {
                    Ok(rec) => shelf.ready.push(rec.id),
                    Err(e) => tracing::warn!(error = %e, "warm pool: starting a sandbox failed"),
                }
            });
        }
    }

    /// Starts `runtime`'s interpreter in the new sandbox `id`, waiting for its run. A sandbox
    /// whose interpreter does not start still serves (its run starts fresh).
    async fn prestart(server: &Arc<Server>, id: &str, runtime: &str) {
        if !server.has_runtime(
            PRESTART_PROGRAMS
                .iter()
                .find(|(r, _)| *r == runtime)
                .map_or(runtime, |(_, p)| p),
        ) {
            return;
        }
        let socket = match server.socket_path(id) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(sandbox = %id, error = %e, "prestart: no agent socket");
                return;
            }
        };
        match crate::agent_run::prestart(&socket, runtime).await {
            Ok(r) => {
                tracing::debug!(sandbox = %id, pid = r.pid, startup_ms = r.startup_ms, "prestarted")
            }
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "warm pool: pre-starting the interpreter failed")
            }
        }
    }
}

/// The program each pre-startable runtime needs in the sandbox.
const PRESTART_PROGRAMS: &[(&str, &str)] = &[("python", "python3")];
