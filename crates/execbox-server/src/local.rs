//! The `local` backend: sandboxes as jailed process trees on this host.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use execbox_jail::cgroup::{CgroupDriver, CgroupVersion, Limits, SandboxCgroup};
use execbox_jail::rootfs::{
    RootBase, RootfsPlan, SandboxRoot, StorageSizes, Upper, SANDBOX_GID, SANDBOX_UID,
};
use execbox_jail::spawn::{self, SpawnRequest, UserMapping};
use execbox_jail::storage::{self, IdMap};
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
    /// A volume cannot be mounted where the request asks (the client's mistake).
    #[error("{field}: {message}")]
    Volume {
        /// `volumes[i].…`.
        field: String,
        /// Why.
        message: String,
    },
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
    /// Size of the sandbox's disk (its writable space) in bytes.
    pub disk_bytes: Option<u64>,
    /// Size of the disk in bytes as isol8 asks for it (`sandboxSize`), over `disk_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_bytes: Option<u64>,
    /// `/tmp` as a memory file system of this size (isol8's `tmpSize`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmp_bytes: Option<u64>,
}

/// An image a sandbox's root is made of (resolved by the server).
#[derive(Debug, Clone)]
pub struct RootImage {
    /// Its id (the digest of its configuration): names its skeleton.
    pub id: String,
    /// Its unpacked layers, bottom first.
    pub layers: Vec<PathBuf>,
}

/// Where sandboxes' writable layers live (`[storage] medium`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageMedium {
    /// On a disk per sandbox where this host allows it (root, loop devices, `mke2fs`), in
    /// memory otherwise.
    #[default]
    Auto,
    /// On a disk per sandbox; the server refuses to start without.
    Disk,
    /// In memory (tmpfs, charged to the sandbox's memory).
    Memory,
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
    /// The image of its root; none for the host-runtimes template.
    pub image: Option<RootImage>,
    /// Working directory of processes that name none (the image's); the user's home when
    /// none.
    pub workdir: Option<String>,
    /// Volumes to mount.
    pub volumes: &'a [crate::volumes::VolumeMount],
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
    /// Why the entrypoint did not start, if it did not.
    pub entrypoint_error: Option<String>,
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
    /// Where writable layers live.
    pub storage: StorageMedium,
    /// Disk size of a sandbox that asks for none, in bytes.
    pub default_disk_bytes: u64,
    /// Host (uid, gid) owning what sandboxes write through volumes.
    pub volume_owner: (u32, u32),
}

/// How long a delete waits for a killed agent to be reaped.
const REAP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// The local backend.
pub struct LocalBackend {
    config: LocalConfig,
    cgroups: CgroupDriver,
    /// The host-runtimes template.
    plan: Arc<RootfsPlan>,
    /// Skeletons of images, by image id.
    image_plans: Mutex<HashMap<String, Arc<RootfsPlan>>>,
    /// Id mappings of volumes, per uid range.
    volume_idmaps: Mutex<HashMap<u32, Arc<IdMap>>>,
    /// Where skeletons and the staging directories of starting sandboxes are (a memory file
    /// system of this process's mount namespace, when it has one).
    store: PathBuf,
    /// Where writable layers live.
    upper: Upper,
    /// Formatted empty disks, one per size, copied for each sandbox.
    golden_disks: Mutex<HashMap<u64, PathBuf>>,
    /// Disks of the default size made ahead (disk storage only).
    disk_pool: Option<Arc<crate::disk_pool::DiskPool>>,
    /// Id-mapping user namespaces, one per uid range slot.
    idmaps: Mutex<HashMap<u32, Arc<IdMap>>>,
    /// What the agent needs to run in a root without the host's C library (made on first
    /// use; `None` inside when the agent is linked statically).
    agent_runtime: Mutex<Option<Option<Arc<AgentRuntime>>>>,
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
        let store = config.state_dir.join("rootfs");
        execbox_jail::rootfs::mount_skeleton_store(&store)
            .map_err(io_err("mounting the store of root skeletons"))?;
        let upper = Self::choose_upper(&config, rootless)?;
        let mut plan = RootfsPlan {
            skeleton: PathBuf::new(),
            hostname: HOSTNAME.to_string(),
            runtimes,
            base: RootBase::HostRuntimes,
            agent_libs: None,
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
        plan.skeleton = store.join(format!("{fingerprint:016x}"));
        plan.build_skeleton()
            .map_err(io_err("building the sandbox root skeleton"))?;
        Ok(Self {
            slots: Mutex::new(HashMap::new()),
            config,
            cgroups,
            plan: Arc::new(plan),
            image_plans: Mutex::new(HashMap::new()),
            volume_idmaps: Mutex::new(HashMap::new()),
            store,
            upper,
            golden_disks: Mutex::new(HashMap::new()),
            disk_pool: None,
            idmaps: Mutex::new(HashMap::new()),
            agent_runtime: Mutex::new(None),
            mapping_mode,
        }
        .with_disk_pool())
    }

    /// Starts the pool of ready disks of the default size, when sandboxes have disks.
    fn with_disk_pool(mut self) -> Self {
        if self.upper != Upper::Disk {
            return self;
        }
        let size = self.config.default_disk_bytes;
        match self.golden_disk(size) {
            Ok(golden) => {
                self.disk_pool = Some(crate::disk_pool::DiskPool::start(
                    size,
                    golden,
                    self.config.state_dir.join("disks/ready"),
                    self.store.join("ready"),
                ));
            }
            Err(e) => tracing::warn!(error = %e, "no disk pool: every create makes its own disk"),
        }
        self
    }

    /// Where writable layers will live, as configured and as this host allows; fails when the
    /// configuration asks for disks this host cannot give.
    fn choose_upper(config: &LocalConfig, rootless: bool) -> Result<Upper, BackendError> {
        let probe = || {
            if rootless {
                return Err("a rootless server cannot attach loop devices".to_string());
            }
            storage::probe(&config.state_dir.join("disks"))
        };
        match config.storage {
            StorageMedium::Memory => Ok(Upper::Memory),
            StorageMedium::Disk => probe().map(|()| Upper::Disk).map_err(|why| {
                BackendError::Unavailable(format!("[storage] medium = \"disk\": {why}"))
            }),
            StorageMedium::Auto => Ok(match probe() {
                Ok(()) => Upper::Disk,
                Err(why) => {
                    tracing::warn!(%why, "sandbox storage is in memory: disks are not available");
                    Upper::Memory
                }
            }),
        }
    }

    /// Where sandboxes' writable layers live.
    pub fn upper(&self) -> Upper {
        self.upper
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

        let l = &p.limits;
        let sizes = StorageSizes {
            disk: l
                .sandbox_bytes
                .or(l.disk_bytes)
                .unwrap_or(self.config.default_disk_bytes),
            tmp_in_memory: l.tmp_bytes,
            ..StorageSizes::default()
        };
        let mut plan = match &p.image {
            Some(image) => self.image_plan(image)?,
            None => self.plan.clone(),
        };
        if let Some(template) = &p.template {
            let mut with_template = (*plan).clone();
            with_template.template = Some(template.clone());
            plan = Arc::new(with_template);
        }
        let idmap = match slot {
            Some(slot) if !matches!(mapping, UserMapping::Single { .. }) => {
                Some(self.idmap(slot, &mapping)?)
            }
            _ => None,
        };
        let layers: Vec<PathBuf> = std::iter::once(plan.skeleton.clone())
            .chain(p.image.iter().flat_map(|i| i.layers.iter().rev().cloned()))
            .collect();
        let staging = std::time::Instant::now();
        let staged = Staged::prepare(self, p.id, &layers, idmap.as_deref(), sizes)?;
        let staged_in = staging.elapsed();
        let mut ops = plan.compile(&staged.root);
        // Volumes: detached, id-mapped mounts made here from the directories the server
        // resolved, attached by the sandbox's first process after every other mount, in its
        // own root. The descriptors stay open until it has started.
        let volume_trees = if p.volumes.is_empty() {
            Vec::new()
        } else {
            let Some(slot) = slot.filter(|_| staged.root.mounted) else {
                return Err(BackendError::Volume {
                    field: "volumes".into(),
                    message: "this server cannot mount volumes (it runs rootless)".into(),
                });
            };
            let map = self.volume_idmap(slot, &mapping)?;
            let root = execbox_jail::fsroot::Dir::open_trusted(&staged.root.stage.join("root"))
                .map_err(io_err("opening the sandbox's root"))?;
            let mut trees = Vec::with_capacity(p.volumes.len());
            for (i, volume) in p.volumes.iter().enumerate() {
                make_mount_point(&root, &volume.mount_path, map.host_id(0)).map_err(|message| {
                    BackendError::Volume {
                        field: format!("volumes[{i}].mountPath"),
                        message,
                    }
                })?;
                let tree = storage::detached_volume(
                    std::os::fd::AsFd::as_fd(&volume.source),
                    &map,
                    volume.read_only,
                )
                .map_err(|e| BackendError::Volume {
                    field: format!("volumes[{i}]"),
                    message: e.to_string(),
                })?;
                ops.push(execbox_jail::rootfs::MountOp::Attach {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&tree),
                    target: std::ffi::CString::new(volume.mount_path.clone()).map_err(|_| {
                        BackendError::Volume {
                            field: format!("volumes[{i}].mountPath"),
                            message: "has a NUL byte".into(),
                        }
                    })?,
                });
                trees.push(tree);
            }
            trees
        };
        // The sandbox cgroup bounds everything: the workload, the files written to memory file
        // systems (charged to whoever writes them: user code or the agent for uploads), and
        // the agent. The workload cgroup below it bounds user code alone, so that user pressure
        // ends in the OOM killer choosing among user processes, and an upload that does not
        // fit ends in ENOSPC, never in the agent being killed. Files on the disk take memory
        // only as page cache, which the kernel reclaims.
        let pids = p.limits.pids.unwrap_or(self.config.default_pids);
        let cgroup = self.cgroups.create(
            p.id,
            &Limits {
                memory_bytes: p.limits.memory_bytes.map(|m| {
                    m.saturating_add(sizes.in_memory(&self.upper))
                        .saturating_add(AGENT_MEMORY_RESERVE)
                }),
                cpu_millicores: p.limits.cpu_millicores,
                pids_max: Some(pids.saturating_add(AGENT_PIDS_RESERVE)),
            },
        )?;
        // Each execution is limited to the memory asked for (the agent sets it on every
        // execution's cgroup); the workload as a whole also has room for what the executions
        // leave in memory file systems, so a full one never starves the next execution.
        cgroup.create_workload(&Limits {
            memory_bytes: p
                .limits
                .memory_bytes
                .map(|m| m.saturating_add(sizes.user_in_memory(&self.upper))),
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
            disk_bytes: Some(sizes.disk),
            workdir: p.workdir.clone(),
        };
        let config_json = serde_json::to_string(&agent_config).map_err(|e| BackendError::Io {
            what: "encoding the agent configuration".into(),
            source: std::io::Error::other(e),
        })?;
        let spawning = std::time::Instant::now();
        let spawned = spawn::spawn_sandbox(SpawnRequest {
            mount_ops: &ops,
            agent_exe: &self.config.agent_exe,
            argv: vec!["execbox".into(), "agent".into()],
            env: vec![
                (AGENT_CONFIG_ENV.into(), config_json),
                // The agents' own log filter: `warn` unless the operator asks for more
                // (`EXECBOX_AGENT_LOG=execbox_agent=debug` shows each run's phases).
                (
                    "RUST_LOG".into(),
                    std::env::var("EXECBOX_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
                ),
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
            loader: match &p.image {
                Some(_) => self.agent_runtime()?.map(|r| r.loader.clone()),
                None => None,
            },
            ready_timeout: Duration::from_secs(10),
        });
        // The sandbox holds its own copies of the staged mounts (or is gone): ours go, off the
        // create's path (a lazy unmount waits for the kernel's RCU grace period).
        std::thread::spawn(move || drop(staged));
        // Attached by the sandbox (or it is gone): our descriptors of the volumes go.
        drop(volume_trees);
        let spawned = spawned?;
        tracing::debug!(
            sandbox = p.id,
            staging_us = staged_in.as_micros() as u64,
            spawn_us = spawning.elapsed().as_micros() as u64,
            "sandbox started"
        );
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
                entrypoint_error: spawned.entrypoint_error,
            }),
        ))
    }

    /// The root plan of sandboxes of `image`: its skeleton (with the image's user database
    /// and the sandbox user) is built once per image.
    fn image_plan(&self, image: &RootImage) -> Result<Arc<RootfsPlan>, BackendError> {
        let mut plans = self.image_plans.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(plan) = plans.get(&image.id) {
            return Ok(plan.clone());
        }
        let name: String = image
            .id
            .trim_start_matches("sha256:")
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(24)
            .collect();
        let plan = RootfsPlan {
            skeleton: self.store.join(format!("image-{name}")),
            hostname: HOSTNAME.to_string(),
            runtimes: Vec::new(),
            base: RootBase::Image {
                passwd: read_from_layers(&image.layers, "etc/passwd"),
                group: read_from_layers(&image.layers, "etc/group"),
            },
            agent_libs: self.agent_runtime()?.map(|r| r.dir.clone()),
            rootless: self.plan.rootless,
            template: None,
        };
        plan.build_skeleton()
            .map_err(io_err("building the skeleton of an image"))?;
        let plan = Arc::new(plan);
        plans.insert(image.id.clone(), plan.clone());
        Ok(plan)
    }

    /// The agent's dynamic loader and shared libraries, copied from the host once (`None`: the
    /// agent needs none).
    fn agent_runtime(&self) -> Result<Option<Arc<AgentRuntime>>, BackendError> {
        let mut cached = self.agent_runtime.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(runtime) = cached.as_ref() {
            return Ok(runtime.clone());
        }
        let runtime = AgentRuntime::collect(&self.config.agent_exe, &self.store.join("agent-lib"))
            .map_err(io_err("collecting the agent's shared libraries"))?
            .map(Arc::new);
        *cached = Some(runtime.clone());
        Ok(runtime)
    }

    /// The id-mapping user namespace of uid range `slot` (made once per slot).
    fn idmap(&self, slot: u32, mapping: &UserMapping) -> Result<Arc<IdMap>, BackendError> {
        let mut maps = self.idmaps.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(map) = maps.get(&slot) {
            return Ok(map.clone());
        }
        let UserMapping::Range { host_base, count } = *mapping else {
            return Err(BackendError::NoSlot);
        };
        let map = Arc::new(IdMap::new(host_base, count).map_err(io_err("making an id mapping"))?);
        maps.insert(slot, map.clone());
        Ok(map)
    }

    /// The id mapping of volumes for uid range `slot`: the volume owner's files are the sandbox
    /// user's, and the sandbox's root (the agent, which makes uploads then gives them to the
    /// user) is the host's root there.
    fn volume_idmap(&self, slot: u32, mapping: &UserMapping) -> Result<Arc<IdMap>, BackendError> {
        let mut maps = self.volume_idmaps.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(map) = maps.get(&slot) {
            return Ok(map.clone());
        }
        let UserMapping::Range { host_base, .. } = *mapping else {
            return Err(BackendError::NoSlot);
        };
        let (owner_uid, owner_gid) = self.config.volume_owner;
        let user = host_base + execbox_jail::rootfs::SANDBOX_UID;
        let group = host_base + execbox_jail::rootfs::SANDBOX_GID;
        let map = Arc::new(
            IdMap::with_maps(
                &format!("0 {host_base} 1\n{owner_uid} {user} 1\n"),
                &format!("0 {host_base} 1\n{owner_gid} {group} 1\n"),
                host_base,
            )
            .map_err(io_err("making the id mapping of volumes"))?,
        );
        maps.insert(slot, map.clone());
        Ok(map)
    }

    /// A formatted empty disk of `size` bytes to copy (formatted once per size).
    fn golden_disk(&self, size: u64) -> Result<PathBuf, BackendError> {
        let mut disks = self.golden_disks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(path) = disks.get(&size) {
            return Ok(path.clone());
        }
        let dir = self.config.state_dir.join("disks");
        std::fs::create_dir_all(&dir).map_err(io_err("creating the disks directory"))?;
        let path = dir.join(format!("empty-{size}.ext4"));
        let partial = dir.join(format!("empty-{size}.ext4.partial"));
        let _ = std::fs::remove_file(&partial);
        storage::format_disk(&partial, size)
            .and_then(|()| std::fs::rename(&partial, &path))
            .map_err(io_err(format!("formatting a disk of {size} bytes")))?;
        disks.insert(size, path.clone());
        Ok(path)
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

    /// Sets the sandbox's CPU weight against the other sandboxes (cgroup v2 terms, 1–10000,
    /// 100 by default).
    pub fn set_cpu_weight(&self, id: &str, weight: u32) -> Result<(), BackendError> {
        Ok(self.cgroup(id)?.set_cpu_weight(weight)?)
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

/// A file of an image, from the topmost layer that has it (`None` when none has it as a
/// regular file, or a layer above deletes it). Layers are untrusted: the path is resolved by
/// the kernel beneath each layer's root, without following symbolic links.
fn read_from_layers(layers: &[PathBuf], path: &str) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::FileTypeExt;
    for layer in layers.iter().rev() {
        let Ok(dir) = execbox_jail::fsroot::Dir::open_trusted(layer) else {
            continue;
        };
        let Ok(fd) = dir.resolve_beneath(Path::new(path), nix::fcntl::OFlag::O_RDONLY, false)
        else {
            continue;
        };
        let mut file = std::fs::File::from(fd);
        let meta = file.metadata().ok()?;
        if meta.file_type().is_char_device() {
            // An overlay whiteout: deleted by this layer.
            return None;
        }
        if !meta.is_file() {
            return None;
        }
        let mut text = String::new();
        file.by_ref().take(1 << 20).read_to_string(&mut text).ok()?;
        return Some(text);
    }
    None
}

/// The staging directory of a starting sandbox (see [`SandboxRoot`]): its layers and disk
/// mounted there for the sandbox's first process to build its root from. Dropping it detaches
/// them from the server's mount namespace; the sandbox keeps its copies.
struct Staged {
    root: SandboxRoot,
    mounted: Vec<PathBuf>,
}

impl Staged {
    fn prepare(
        backend: &LocalBackend,
        id: &str,
        layers: &[PathBuf],
        idmap: Option<&IdMap>,
        sizes: StorageSizes,
    ) -> Result<Staged, BackendError> {
        let stage = backend.store.join("stage").join(id);
        let _ = std::fs::remove_dir_all(&stage);
        std::fs::create_dir_all(stage.join("root"))
            .map_err(io_err("creating the staging directory"))?;
        std::fs::create_dir_all(stage.join("d"))
            .map_err(io_err("creating the staging directory"))?;
        let mut staged = Staged {
            root: SandboxRoot {
                stage: stage.clone(),
                lowers: Vec::new(),
                upper: backend.upper,
                sizes,
                mounted: false,
            },
            mounted: Vec::new(),
        };
        for (i, layer) in layers.iter().enumerate() {
            match idmap {
                Some(map) => {
                    let name = format!("l{i}");
                    let at = stage.join(&name);
                    std::fs::create_dir(&at).map_err(io_err("creating a layer mount point"))?;
                    storage::bind_idmapped(
                        layer,
                        &at,
                        map,
                        execbox_jail::sys::MOUNT_ATTR_RDONLY
                            | execbox_jail::sys::MOUNT_ATTR_NOSUID
                            | execbox_jail::sys::MOUNT_ATTR_NODEV,
                    )
                    .map_err(io_err(format!("mounting layer {}", layer.display())))?;
                    staged.mounted.push(at);
                    staged.root.lowers.push(name);
                }
                // Rootless: one id only, nothing to map; the layer as it is, by a path
                // relative to the staging directory.
                None => staged.root.lowers.push(relative_to(&stage, layer)),
            }
        }
        let Some(map) = idmap else {
            // Rootless: the sandbox mounts its overlay itself, the writable layer in memory.
            staged.root.upper = Upper::Memory;
            return Ok(staged);
        };
        let layers_done = std::time::Instant::now();
        let d = stage.join("d");
        match backend.upper {
            Upper::Disk => {
                let disk = backend.sandbox_dir(id).join("disk.ext4");
                let _ = std::fs::remove_file(&disk);
                let ready = backend
                    .disk_pool
                    .as_ref()
                    .is_some_and(|pool| pool.take(sizes.disk, &disk, &d));
                if !ready {
                    storage::sparse_copy(&backend.golden_disk(sizes.disk)?, &disk)
                        .map_err(io_err("making the sandbox's disk"))?;
                    storage::mount_disk(&disk, &d, None)
                        .map_err(io_err("mounting the sandbox's disk"))?;
                }
            }
            Upper::Memory => {
                nix::mount::mount(
                    Some("tmpfs"),
                    &d,
                    Some("tmpfs"),
                    nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                    Some(format!("size={},mode=755", sizes.disk).as_str()),
                )
                .map_err(|e| io_err("mounting the sandbox's memory layer")(e.into()))?;
                for sub in ["upper", "work"] {
                    std::fs::create_dir(d.join(sub))
                        .map_err(io_err("preparing the sandbox's memory layer"))?;
                }
            }
        }
        staged.mounted.push(d.clone());
        let upper_done = std::time::Instant::now();
        // The root directory belongs to the sandbox's root.
        let root_uid = map.host_id(0);
        std::os::unix::fs::chown(d.join("upper"), Some(root_uid), Some(root_uid))
            .map_err(io_err("preparing the sandbox's writable layer"))?;
        storage::mount_overlay(&stage, &staged.root.lowers)
            .map_err(io_err("mounting the sandbox's root"))?;
        staged.mounted.push(stage.join("root"));
        staged.root.mounted = true;
        tracing::debug!(
            sandbox = id,
            writable_layer_us = (upper_done - layers_done).as_micros() as u64,
            overlay_us = upper_done.elapsed().as_micros() as u64,
            "root staged"
        );
        Ok(staged)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for at in self.mounted.drain(..).rev() {
            if let Err(e) = storage::detach(&at) {
                tracing::warn!(error = %e, "detaching a staged mount");
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.root.stage) {
            tracing::warn!(error = %e, "removing a staging directory");
        }
    }
}

/// Makes the directory `path` (absolute, normal) in the sandbox's root open at `root`, each
/// component resolved in that root (its symlinks lead nowhere else), missing ones made and
/// given to the sandbox's root (`owner`).
fn make_mount_point(
    root: &execbox_jail::fsroot::Dir,
    path: &str,
    owner: u32,
) -> Result<(), String> {
    let mut dir = root.try_clone().map_err(|e| e.to_string())?;
    for name in Path::new(path).components().filter_map(|c| match c {
        std::path::Component::Normal(n) => Some(n),
        _ => None,
    }) {
        dir = match dir.resolve_dir(Path::new(name)) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                dir.mkdir(name, 0o755).map_err(|e| format!("{path}: {e}"))?;
                dir.chown(name, Some(owner), Some(owner))
                    .map_err(|e| format!("{path}: {e}"))?;
                dir.subdir(name).map_err(|e| format!("{path}: {e}"))?
            }
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOTDIR) => {
                return Err(format!("{path}: not a directory in the sandbox's root"))
            }
            Err(e) => return Err(format!("{path}: {e}")),
        };
    }
    Ok(())
}

/// `path` relative to the directory `from` (both absolute).
fn relative_to(from: &Path, path: &Path) -> String {
    let from: Vec<_> = from.components().collect();
    let to: Vec<_> = path.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..from.len() {
        rel.push("..");
    }
    for c in &to[common..] {
        rel.push(c);
    }
    rel.to_string_lossy().into_owned()
}

/// The agent's dynamic loader and the shared libraries it links, copied into one directory:
/// a root made from an image runs the agent through them (its own C library may be older, or
/// another one).
#[derive(Debug)]
struct AgentRuntime {
    /// The directory (bound read-only into such sandboxes).
    dir: PathBuf,
    /// The loader's copy in it.
    loader: PathBuf,
}

impl AgentRuntime {
    /// Copies what `ldd` says `exe` needs into `dir`; `None` for a static executable.
    fn collect(exe: &Path, dir: &Path) -> std::io::Result<Option<AgentRuntime>> {
        let out = std::process::Command::new("ldd")
            .arg(exe)
            .stdin(std::process::Stdio::null())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || text.contains("statically linked") {
            return Ok(None);
        }
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let mut loader = None;
        for line in text.lines() {
            let line = line.trim();
            // `name => /path (0x…)`, or the loader itself: `/path (0x…)`.
            let (name, path) = match line.split_once(" => ") {
                Some((name, rest)) => (name.trim(), rest.split(" (").next().unwrap_or("").trim()),
                None => {
                    let path = line.split(" (").next().unwrap_or("").trim();
                    (path.rsplit('/').next().unwrap_or(path), path)
                }
            };
            if !path.starts_with('/') {
                continue; // the vDSO
            }
            let copy = dir.join(name);
            std::fs::copy(path, &copy)?;
            if line.split_once(" => ").is_none() {
                loader = Some(copy);
            }
        }
        let loader = loader.ok_or_else(|| {
            std::io::Error::other(format!("ldd names no dynamic loader for {}", exe.display()))
        })?;
        Ok(Some(AgentRuntime {
            dir: dir.to_path_buf(),
            loader,
        }))
    }
}
