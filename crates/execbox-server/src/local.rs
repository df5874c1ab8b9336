//! The `local` backend: sandboxes as jailed process trees on this host.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use execbox_jail::cgroup::{CgroupDriver, CgroupVersion, Limits, SandboxCgroup};
use execbox_jail::rootfs::{MountOp, RootfsPlan, WritableSizes, SANDBOX_GID, SANDBOX_UID};
use execbox_jail::spawn::{self, SpawnRequest, UserMapping};
use execbox_proto::agent::{AgentConfig, AGENT_CONFIG_ENV};
use nix::fcntl::{Flock, FlockArg};

use crate::doctor::{self, Layer};

/// First host uid of the per-sandbox uid ranges (root mode).
const UID_RANGE_BASE: u32 = 1_000_000_000;
/// Ids mapped per sandbox.
const UID_RANGE_SIZE: u32 = 65_536;
/// Number of uid ranges (keeps every id below 2^32 - 1).
pub const MAX_SLOTS: u32 = 40_000;
/// Host-wide directory of the uid range locks: one file per slot, locked (`flock`) by the
/// execbox process whose sandbox holds that range, so that every instance on the host (servers
/// with other state directories, `execbox run`) hands out distinct ranges. Deliberately not
/// configurable: instances that disagreed on it would share ranges again.
pub const UID_SLOT_DIR: &str = "/run/execbox/uid-slots";
/// Hostname inside every sandbox.
const HOSTNAME: &str = "sandbox";
/// Memory the sandbox cgroup allows beyond the workload's limit and its storage, for the agent
/// itself: the workload is limited apart (its own cgroup), so its pressure never reaches this.
const AGENT_MEMORY_RESERVE: u64 = 64 << 20;
/// Tasks the sandbox cgroup allows beyond the workload's limit, for the agent's threads.
const AGENT_PIDS_RESERVE: u64 = 64;

/// Errors of the local backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A required isolation layer is missing; sandboxes are refused.
    #[error("refusing to create sandboxes: {0}")]
    Unavailable(String),
    /// cgroup operation failed.
    #[error("cgroup: {0}")]
    Cgroup(#[from] execbox_jail::cgroup::CgroupError),
    /// Starting the sandbox failed.
    #[error(transparent)]
    Spawn(#[from] execbox_jail::spawn::SpawnError),
    /// Host I/O failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// No uid range is free.
    #[error("too many sandboxes: no free uid range")]
    NoSlot,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackendError {
    let what = what.into();
    move |source| BackendError::Io { what, source }
}

/// Resource limits of one sandbox.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct SandboxLimits {
    /// CPU in millicores.
    pub cpu_millicores: Option<u64>,
    /// Memory in bytes.
    pub memory_bytes: Option<u64>,
    /// Maximum tasks.
    pub pids: Option<u64>,
    /// Size of each writable area in bytes.
    pub disk_bytes: Option<u64>,
    /// Size of `/sandbox` in bytes, over `disk_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_bytes: Option<u64>,
    /// Size of `/tmp` in bytes, over `disk_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmp_bytes: Option<u64>,
}

/// What the backend needs to start one sandbox.
pub struct SandboxParams<'a> {
    /// Sandbox id (also the cgroup name).
    pub id: &'a str,
    /// Limits.
    pub limits: SandboxLimits,
    /// Environment of user processes.
    pub env: Vec<(String, String)>,
    /// Entrypoint.
    pub entrypoint: Vec<String>,
    /// Give the sandbox a network device (served by the server under a policy); without one
    /// it has loopback only.
    pub network: bool,
    /// The host directory of the sandbox's template, shown read-only at
    /// [`execbox_jail::rootfs::TEMPLATE_DIR`]; none for the plain host runtimes.
    pub template: Option<PathBuf>,
}

/// What the server watches of a sandbox it just started (not persisted).
#[derive(Debug)]
pub struct Watch {
    /// A pidfd of the agent: readable once it has exited.
    pub pidfd: OwnedFd,
    /// Read end of the agent's standard output and error.
    pub log: OwnedFd,
    /// The host end of the sandbox's network device, when it has one.
    pub tun: Option<OwnedFd>,
}

/// A running sandbox as the backend tracks it (persisted in the sandbox record).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Placement {
    /// Host pid of the agent.
    pub pid: i32,
    /// Its start time (guards against pid reuse after a restart).
    pub start_time: u64,
    /// uid range slot (root mode).
    pub slot: Option<u32>,
    /// Host uid of the sandbox user.
    pub user_host_uid: Option<u32>,
}

/// Backend configuration.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// State directory.
    pub state_dir: PathBuf,
    /// The agent executable (this binary).
    pub agent_exe: PathBuf,
    /// Python interpreter to expose (discovered when `None`).
    pub python: Option<PathBuf>,
    /// Require seccomp.
    pub seccomp: bool,
    /// Require Landlock.
    pub landlock: bool,
    /// Default pids limit.
    pub default_pids: u64,
    /// Prefix of cgroup names (lets tests run beside a real server).
    pub cgroup_base: String,
    /// Largest accepted upload in bytes (0: bounded by the sandbox's disk only).
    pub max_upload_bytes: u64,
    /// Idle lifetime of implicitly created code contexts, in seconds (0: one hour).
    pub context_idle_ttl_secs: u64,
}

/// How long a delete waits for a killed agent to be reaped.
const REAP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// The local backend.
pub struct LocalBackend {
    config: LocalConfig,
    cgroups: CgroupDriver,
    plan: RootfsPlan,
    ops_default: Vec<MountOp>,
    mapping_mode: MappingMode,
    /// The uid range slots this process holds, each with its host-wide lock (released on drop).
    slots: Mutex<HashMap<u32, Flock<std::fs::File>>>,
}

#[derive(Debug, Clone, Copy)]
enum MappingMode {
    Root,
    Rootless { uid: u32, gid: u32 },
}

impl LocalBackend {
    /// Checks every isolation layer and prepares the sandbox root. Fails closed: a missing
    /// required layer is an error naming it.
    pub fn new(config: LocalConfig) -> Result<Self, BackendError> {
        let report = doctor::check(config.seccomp, config.landlock, &config.cgroup_base);
        let missing: Vec<&Layer> = report.iter().filter(|l| l.required && !l.ok).collect();
        if !missing.is_empty() {
            let why = missing
                .iter()
                .map(|l| format!("{} ({})", l.name, l.detail))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(BackendError::Unavailable(format!(
                "required isolation layers are missing: {why}"
            )));
        }
        let cgroups = CgroupDriver::detect_with_base(&config.cgroup_base)?;
        let uid = nix::unistd::geteuid().as_raw();
        let mapping_mode = if uid == 0 {
            MappingMode::Root
        } else {
            MappingMode::Rootless {
                uid,
                gid: nix::unistd::getegid().as_raw(),
            }
        };
        let runtimes = execbox_jail::runtimes::discover(config.python.as_deref());
        let sandboxes = config.state_dir.join("sandboxes");
        std::fs::create_dir_all(&sandboxes).map_err(io_err("creating the state directory"))?;
        std::fs::set_permissions(&config.state_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err("securing the state directory"))?;
        let rootless = matches!(mapping_mode, MappingMode::Rootless { .. });
        let mut plan = RootfsPlan {
            skeleton: PathBuf::new(),
            hostname: HOSTNAME.to_string(),
            runtimes,
            sizes: WritableSizes::default(),
            rootless,
            template: None,
        };
        // One skeleton per distinct plan, named by its content: running sandboxes keep theirs.
        let fingerprint = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            format!("{:?}{}", plan.runtimes, rootless).hash(&mut h);
            h.finish()
        };
        let store = config.state_dir.join("rootfs");
        execbox_jail::rootfs::mount_skeleton_store(&store)
            .map_err(io_err("mounting the store of root skeletons"))?;
        plan.skeleton = store.join(format!("{fingerprint:016x}"));
        plan.build_skeleton()
            .map_err(io_err("building the sandbox root skeleton"))?;
        let ops_default = plan.compile();
        Ok(Self {
            slots: Mutex::new(HashMap::new()),
            config,
            cgroups,
            plan,
            ops_default,
            mapping_mode,
        })
    }

    /// Whether sandboxes can have a network device here (the server can open `/dev/net/tun`);
    /// the reason when not.
    pub fn network_available() -> Result<(), String> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map(drop)
            .map_err(|e| format!("/dev/net/tun: {e}"))
    }

    /// Whether the sandboxes have the runtime `name` (`python3`, `node`, `bun`, …) on their
    /// `PATH`.
    pub fn has_runtime(&self, name: &str) -> bool {
        self.plan.runtimes.iter().any(|r| r.name == name)
    }

    /// Directory of one sandbox's host-side files.
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.config.state_dir.join("sandboxes").join(id)
    }

    /// Path of the agent socket of a sandbox.
    pub fn socket_path(&self, id: &str) -> PathBuf {
        self.sandbox_dir(id).join("agent.sock")
    }

    /// Takes the host-wide lock of uid range `slot`; `None` when another process holds it.
    fn lock_slot(slot: u32) -> Result<Option<Flock<std::fs::File>>, BackendError> {
        let dir = std::path::Path::new(UID_SLOT_DIR);
        std::fs::create_dir_all(dir).map_err(io_err(format!("creating {UID_SLOT_DIR}")))?;
        let path = dir.join(slot.to_string());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(lock)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(io_err(format!("locking {}", path.display()))(
                std::io::Error::from(e),
            )),
        }
    }

    /// A uid range slot no process on this host holds, locked until [`Self::free_slot`].
    fn take_slot(&self) -> Result<u32, BackendError> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        for slot in 0..MAX_SLOTS {
            if slots.contains_key(&slot) {
                continue;
            }
            if let Some(lock) = Self::lock_slot(slot)? {
                slots.insert(slot, lock);
                return Ok(slot);
            }
        }
        Err(BackendError::NoSlot)
    }

    /// Releases a slot's lock (its sandbox is gone).
    fn free_slot(&self, slot: Option<u32>) {
        if let Some(s) = slot {
            self.slots
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&s);
        }
    }

    /// Takes the lock of a re-attached sandbox's slot (after a restart).
    pub fn claim_slot(&self, slot: Option<u32>) {
        let Some(s) = slot else { return };
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots.contains_key(&s) {
            return;
        }
        match Self::lock_slot(s) {
            Ok(Some(lock)) => {
                slots.insert(s, lock);
            }
            Ok(None) => tracing::error!(
                slot = s,
                "uid range of a re-attached sandbox is held by another execbox process"
            ),
            Err(e) => tracing::error!(slot = s, error = %e, "locking a re-attached uid range"),
        }
    }

    /// Starts a sandbox and waits until its agent answers.
    pub fn create(&self, p: SandboxParams<'_>) -> Result<Placement, BackendError> {
        self.create_with(p, false).map(|(placement, _)| placement)
    }

    /// [`create`](Self::create), also returning what to watch: the agent's exit and its log.
    pub fn create_watched(&self, p: SandboxParams<'_>) -> Result<(Placement, Watch), BackendError> {
        match self.create_with(p, true)? {
            (placement, Some(watch)) => Ok((placement, watch)),
            (_, None) => Err(BackendError::Io {
                what: "watching the sandbox".into(),
                source: std::io::Error::other("no log pipe was made"),
            }),
        }
    }

    fn create_with(
        &self,
        p: SandboxParams<'_>,
        with_log: bool,
    ) -> Result<(Placement, Option<Watch>), BackendError> {
        let slot = match self.mapping_mode {
            MappingMode::Root => Some(self.take_slot()?),
            MappingMode::Rootless { .. } => None,
        };
        let result = self.create_in_slot(&p, slot, with_log);
        if result.is_err() {
            self.free_slot(slot);
            let _ = self.cleanup(p.id);
        }
        result
    }

    fn create_in_slot(
        &self,
        p: &SandboxParams<'_>,
        slot: Option<u32>,
        with_log: bool,
    ) -> Result<(Placement, Option<Watch>), BackendError> {
        let (mapping, user_host_uid) = match (self.mapping_mode, slot) {
            (MappingMode::Root, Some(slot)) => {
                let host_base = UID_RANGE_BASE + slot * UID_RANGE_SIZE;
                (
                    UserMapping::Range {
                        host_base,
                        count: UID_RANGE_SIZE,
                    },
                    Some(host_base + SANDBOX_UID),
                )
            }
            (MappingMode::Rootless { uid, gid }, _) => (
                UserMapping::Single {
                    host_uid: uid,
                    host_gid: gid,
                },
                None,
            ),
            (MappingMode::Root, None) => return Err(BackendError::NoSlot),
        };
        let dir = self.sandbox_dir(p.id);
        std::fs::create_dir_all(&dir).map_err(io_err("creating the sandbox directory"))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err("securing the sandbox directory"))?;
        let socket_path = self.socket_path(p.id);
        let _ = std::fs::remove_file(&socket_path);
        let listener = std::os::unix::net::UnixListener::bind(&socket_path)
            .map_err(io_err("binding the agent socket"))?;

        let ops_custom;
        let l = &p.limits;
        let custom_sizes =
            l.disk_bytes.is_some() || l.sandbox_bytes.is_some() || l.tmp_bytes.is_some();
        let (ops, sizes) = if custom_sizes || p.template.is_some() {
            let d = WritableSizes::default();
            let mut plan = self.plan.clone();
            if custom_sizes {
                plan.sizes = WritableSizes {
                    home: l.disk_bytes.unwrap_or(d.home),
                    workspace: l.disk_bytes.unwrap_or(d.workspace),
                    tmp: l.tmp_bytes.or(l.disk_bytes).unwrap_or(d.tmp),
                    sandbox: l.sandbox_bytes.or(l.disk_bytes).unwrap_or(d.sandbox),
                    shm: l.disk_bytes.unwrap_or(d.shm).min(d.shm),
                };
            }
            plan.template = p.template.clone();
            ops_custom = plan.compile();
            (&ops_custom, plan.sizes)
        } else {
            (&self.ops_default, self.plan.sizes)
        };
        // The sandbox cgroup bounds everything: the workload, the files written to its tmpfs
        // (RAM, charged to whoever writes them: user code or the agent for uploads), and the
        // agent. The workload cgroup below it bounds user code alone, so that user pressure
        // ends in the OOM killer choosing among user processes, and an upload that does not
        // fit ends in ENOSPC, never in the agent being killed.
        let pids = p.limits.pids.unwrap_or(self.config.default_pids);
        let cgroup = self.cgroups.create(
            p.id,
            &Limits {
                memory_bytes: p.limits.memory_bytes.map(|m| {
                    m.saturating_add(sizes.total())
                        .saturating_add(AGENT_MEMORY_RESERVE)
                }),
                cpu_millicores: p.limits.cpu_millicores,
                pids_max: Some(pids.saturating_add(AGENT_PIDS_RESERVE)),
            },
        )?;
        // Each execution is limited to the memory asked for (the agent sets it on every
        // execution's cgroup); the workload as a whole also has room for what the executions
        // leave in the sandbox's tmpfs, so a full storage never starves the next execution.
        cgroup.create_workload(&Limits {
            memory_bytes: p
                .limits
                .memory_bytes
                .map(|m| m.saturating_add(sizes.total())),
            cpu_millicores: None,
            pids_max: Some(pids),
        })?;
        let root_host = mapping.host_uid(0).unwrap_or(0);
        cgroup.delegate(root_host, root_host)?;
        let pass_fds: Vec<OwnedFd> = vec![OwnedFd::from(listener)];
        let (labels, detached_dirs): (Vec<String>, Vec<PathBuf>) =
            cgroup.work_dirs().into_iter().unzip();
        let (log_read, log_write) = if with_log {
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| io_err("creating the agent's log pipe")(e.into()))?;
            (Some(r), Some(w))
        } else {
            (None, None)
        };
        let rootless = matches!(mapping, UserMapping::Single { .. });
        let agent_config = AgentConfig {
            env: p.env.clone(),
            entrypoint: p.entrypoint.clone(),
            user_uid: if rootless { 0 } else { SANDBOX_UID },
            user_gid: if rootless { 0 } else { SANDBOX_GID },
            rootless,
            cgroup_version: match cgroup.version() {
                CgroupVersion::V1 => "v1".into(),
                CgroupVersion::V2 => "v2".into(),
            },
            cgroup_labels: labels,
            landlock: self.config.landlock,
            seccomp: self.config.seccomp,
            max_log_bytes: 64 << 20,
            cpu_millicores: p.limits.cpu_millicores,
            max_upload_bytes: self.config.max_upload_bytes,
            context_idle_ttl_secs: self.config.context_idle_ttl_secs,
            execution_memory_bytes: p.limits.memory_bytes,
        };
        let config_json = serde_json::to_string(&agent_config).map_err(|e| BackendError::Io {
            what: "encoding the agent configuration".into(),
            source: std::io::Error::other(e),
        })?;
        let spawned = spawn::spawn_sandbox(SpawnRequest {
            mount_ops: ops,
            agent_exe: &self.config.agent_exe,
            argv: vec!["execbox".into(), "agent".into()],
            env: vec![
                (AGENT_CONFIG_ENV.into(), config_json),
                ("RUST_LOG".into(), "warn".into()),
            ],
            mapping,
            hostname: HOSTNAME,
            pass_fds,
            detached_dirs,
            log: log_write,
            network: p.network.then_some(spawn::TunSetup {
                address: execbox_jail::rootfs::SANDBOX_ADDRESS,
                mtu: execbox_net::DEVICE_MTU,
            }),
            cgroup_procs: cgroup.procs_files(execbox_jail::cgroup::AGENT_LEAF)?,
            ready_timeout: Duration::from_secs(10),
        })?;
        let start_time = spawn::process_start_time(spawned.pid).unwrap_or(0);
        Ok((
            Placement {
                pid: spawned.pid,
                start_time,
                slot,
                user_host_uid,
            },
            log_read.map(|log| Watch {
                pidfd: spawned.pidfd,
                log,
                tun: spawned.tun,
            }),
        ))
    }

    /// A pidfd of the agent recorded in `placement` (re-attach after a restart); `None` when it
    /// is gone.
    pub fn pidfd(&self, placement: &Placement) -> Option<OwnedFd> {
        spawn::pidfd_of(placement.pid, placement.start_time)
    }

    /// Whether the agent recorded in `placement` still runs (same pid, same start time).
    pub fn is_alive(&self, placement: &Placement) -> bool {
        spawn::process_start_time(placement.pid) == Some(placement.start_time)
    }

    fn cgroup(&self, id: &str) -> Result<SandboxCgroup, BackendError> {
        Ok(self.cgroups.open(id)?)
    }

    /// Freezes every process of the sandbox.
    pub fn pause(&self, id: &str) -> Result<(), BackendError> {
        Ok(self.cgroup(id)?.freeze()?)
    }

    /// Thaws the sandbox.
    pub fn resume(&self, id: &str) -> Result<(), BackendError> {
        Ok(self.cgroup(id)?.thaw()?)
    }

    /// Whether the sandbox is frozen.
    pub fn is_paused(&self, id: &str) -> bool {
        self.cgroup(id)
            .and_then(|c| Ok(c.is_frozen()?))
            .unwrap_or(false)
    }

    /// Stops the sandbox and removes everything it had on the host: processes, cgroups, socket,
    /// state directory, uid range.
    pub fn destroy(&self, id: &str, placement: &Placement) -> Result<(), BackendError> {
        if self.is_alive(placement) {
            // PID 1 takes its whole pid namespace with it.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(placement.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // Reap it when it is our child (not after a restart; ECHILD then). A dying PID 1 waits
        // for every process of its namespace, and a process in a frozen cgroup cannot die: the
        // agent may have been killed halfway through killing one of its execution cgroups
        // (freeze, kill, thaw), so thaw the whole tree until the agent is gone.
        let pid = nix::unistd::Pid::from_raw(placement.pid);
        let deadline = std::time::Instant::now() + REAP_DEADLINE;
        loop {
            if let Ok(cg) = self.cgroups.open(id) {
                let _ = cg.thaw();
            }
            match nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                Ok(nix::sys::wait::WaitStatus::StillAlive)
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                _ => break,
            }
        }
        let result = self.cleanup(id);
        self.free_slot(placement.slot);
        result
    }

    fn cleanup(&self, id: &str) -> Result<(), BackendError> {
        if let Ok(cg) = self.cgroups.open(id) {
            // A frozen cgroup cannot die: thaw first.
            let _ = cg.thaw();
            cg.kill_all()?;
            cg.remove()?;
        }
        let dir = self.sandbox_dir(id);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io_err(format!("removing {}", dir.display()))(e))
            }
            _ => Ok(()),
        }
    }

    /// Removes what is left on the host of a sandbox with no agent (a failed one whose
    /// resources were released already: its state directory).
    pub fn destroy_leftovers(&self, id: &str) -> Result<(), BackendError> {
        self.cleanup(id)
    }

    /// Removes leftovers of a sandbox whose agent is gone.
    pub fn forget(&self, id: &str, placement: &Placement) {
        if let Err(e) = self.destroy(id, placement) {
            tracing::warn!(sandbox = id, error = %e, "cleaning up a dead sandbox failed");
        }
    }

    /// Statistics of a sandbox's cgroup.
    pub fn stats(&self, id: &str) -> Option<execbox_jail::cgroup::CgroupStats> {
        self.cgroup(id).ok().and_then(|c| c.stats().ok())
    }
}
