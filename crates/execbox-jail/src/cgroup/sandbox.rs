//! Host-side handle on one sandbox cgroup.

use std::path::PathBuf;

use super::driver::Hierarchy;
use super::node::{rmdir_tree, CgSet, Node, PathNode};
use super::{
    validate_name, CgroupError, CgroupStats, CgroupVersion, Limits, AGENT_LEAF, CPU_PERIOD_US,
    FREEZE_TIMEOUT, KILL_TIMEOUT, WORK_LEAF,
};

/// A sandbox's CPU weight unless set otherwise (the kernel's default, in cgroup v2 terms).
pub const DEFAULT_CPU_WEIGHT: u32 = 100;

/// Host-side handle on the sandbox cgroup `<base>/<name>` in every hierarchy
/// of its driver. Dropping it does nothing; call [`remove`](Self::remove).
#[derive(Clone, Debug)]
pub struct SandboxCgroup {
    name: String,
    version: CgroupVersion,
    hierarchies: Vec<Hierarchy>,
}

impl SandboxCgroup {
    pub(crate) fn new(name: &str, version: CgroupVersion, hierarchies: Vec<Hierarchy>) -> Self {
        SandboxCgroup {
            name: name.to_string(),
            version,
            hierarchies,
        }
    }

    /// The sandbox cgroup name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cgroup version.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// `(label, <base>/<name>)` per hierarchy; labels are `unified` on v2
    /// and the controller list (`memory`, `cpu,cpuacct`, ...) on v1. These
    /// are the directories to open and hand to [`ExecCgroups::from_dir_fds`](super::ExecCgroups::from_dir_fds).
    pub fn dirs(&self) -> Vec<(String, PathBuf)> {
        self.hierarchies
            .iter()
            .map(|h| (h.label.clone(), h.base.join(&self.name)))
            .collect()
    }

    /// `(label, <base>/<name>/`[`WORK_LEAF`]`)` per hierarchy: the directories the agent gets.
    pub fn work_dirs(&self) -> Vec<(String, PathBuf)> {
        self.dirs()
            .into_iter()
            .map(|(l, d)| (l, d.join(WORK_LEAF)))
            .collect()
    }

    /// `(label, <base>/<name>/<leaf>)` per hierarchy.
    pub fn leaf_dirs(&self, leaf: &str) -> Result<Vec<(String, PathBuf)>, CgroupError> {
        validate_name(leaf)?;
        Ok(self
            .dirs()
            .into_iter()
            .map(|(l, d)| (l, d.join(leaf)))
            .collect())
    }

    fn nodes(&self) -> Vec<(String, PathNode)> {
        self.dirs()
            .into_iter()
            .map(|(l, d)| (l, PathNode(d)))
            .collect()
    }

    fn leaf_nodes(&self, leaf: &str) -> Result<Vec<(String, PathNode)>, CgroupError> {
        Ok(self
            .leaf_dirs(leaf)?
            .into_iter()
            .map(|(l, d)| (l, PathNode(d)))
            .collect())
    }

    /// Creates the directories, writes the limits and creates the agent leaf.
    pub(crate) fn setup(&self, limits: &Limits) -> Result<(), CgroupError> {
        for (_, dir) in self.dirs() {
            std::fs::create_dir(&dir).map_err(|e| CgroupError::io("mkdir", &dir, e))?;
        }
        for h in &self.hierarchies {
            let node = PathNode(h.base.join(&self.name));
            match self.version {
                CgroupVersion::V1 => write_limits_v1(h, &node, limits)?,
                CgroupVersion::V2 => write_limits_v2(h, &node, limits)?,
            }
        }
        self.create_leaf(AGENT_LEAF)
    }

    /// Creates the leaf `<name>/<leaf>` in every hierarchy (limits are
    /// inherited from `<name>`).
    pub fn create_leaf(&self, leaf: &str) -> Result<(), CgroupError> {
        for (_, dir) in self.leaf_dirs(leaf)? {
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(CgroupError::AlreadyExists { path: dir })
                }
                Err(e) => return Err(CgroupError::io("mkdir", &dir, e)),
            }
        }
        Ok(())
    }

    /// Creates the workload cgroup `<name>/`[`WORK_LEAF`] with its own `limits` (below the
    /// sandbox's), in which the agent makes every execution leaf. Its limit files stay owned by
    /// root ([`delegate`](Self::delegate) hands over only the directory and `cgroup.procs`),
    /// so the sandbox cannot raise them.
    pub fn create_workload(&self, limits: &Limits) -> Result<(), CgroupError> {
        self.create_leaf(WORK_LEAF)?;
        for h in &self.hierarchies {
            let node = PathNode(h.base.join(&self.name).join(WORK_LEAF));
            match self.version {
                CgroupVersion::V1 => write_limits_v1(h, &node, limits)?,
                CgroupVersion::V2 => write_limits_v2(h, &node, limits)?,
            }
        }
        Ok(())
    }

    /// Sets the sandbox's share of CPU time against the other sandboxes when the CPUs are
    /// contended: `weight` in cgroup v2 terms (1–10000, [`DEFAULT_CPU_WEIGHT`] by default),
    /// written as v1 `cpu.shares` (× 1024 / 100) or v2 `cpu.weight`. Nothing where no
    /// hierarchy has the cpu controller (the weight is a preference, not a limit).
    pub fn set_cpu_weight(&self, weight: u32) -> Result<(), CgroupError> {
        let weight = u64::from(weight.clamp(1, 10_000));
        for h in self.hierarchies.iter().filter(|h| h.has("cpu")) {
            let node = PathNode(h.base.join(&self.name));
            match self.version {
                CgroupVersion::V1 => {
                    node.write("cpu.shares", &(weight * 1024 / 100).to_string())?
                }
                CgroupVersion::V2 => node.write("cpu.weight", &weight.to_string())?,
            }
        }
        Ok(())
    }

    /// Writes `pid` into `<name>/<leaf>/cgroup.procs` in every hierarchy.
    pub fn add_process(&self, leaf: &str, pid: i32) -> Result<(), CgroupError> {
        if pid <= 0 {
            return Err(CgroupError::InvalidPid { pid });
        }
        for (_, node) in self.leaf_nodes(leaf)? {
            node.write("cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    /// The `cgroup.procs` files of a leaf, one per hierarchy.
    pub fn procs_files(&self, leaf: &str) -> Result<Vec<PathBuf>, CgroupError> {
        Ok(self
            .leaf_dirs(leaf)?
            .into_iter()
            .map(|(_, d)| d.join("cgroup.procs"))
            .collect())
    }

    /// Hands the cgroup over to host uid/gid `uid`/`gid` (the root of the
    /// sandbox's user namespace): chowns the `<name>` directories and their
    /// `cgroup.procs` (v1 also `tasks`; v2 also `cgroup.subtree_control` and
    /// `cgroup.threads`), and the same for the agent leaf, so that the sandbox
    /// can create leaves and move its processes into them. Limit files are
    /// left owned by root so the sandbox cannot raise its own limits.
    pub fn delegate(&self, uid: u32, gid: u32) -> Result<(), CgroupError> {
        let files: &[&str] = match self.version {
            CgroupVersion::V1 => &["", "cgroup.procs", "tasks"],
            CgroupVersion::V2 => &[
                "",
                "cgroup.procs",
                "cgroup.subtree_control",
                "cgroup.threads",
            ],
        };
        let leaf_files: &[&str] = match self.version {
            CgroupVersion::V1 => &["", "cgroup.procs", "tasks"],
            CgroupVersion::V2 => &["", "cgroup.procs", "cgroup.threads"],
        };
        for (_, dir) in self.dirs() {
            let work = dir.join(WORK_LEAF);
            let mut nodes = vec![(dir.clone(), files), (dir.join(AGENT_LEAF), leaf_files)];
            if work.is_dir() {
                nodes.push((work, files));
            }
            for (d, list) in nodes {
                for f in list {
                    let p = if f.is_empty() { d.clone() } else { d.join(f) };
                    match std::os::unix::fs::chown(&p, Some(uid), Some(gid)) {
                        Ok(()) => {}
                        // Optional files (e.g. cgroup.threads on old kernels).
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !f.is_empty() => {}
                        Err(e) => return Err(CgroupError::io("chown", p, e)),
                    }
                }
            }
        }
        Ok(())
    }

    fn with_set<T>(
        &self,
        nodes: &[(String, PathNode)],
        f: impl FnOnce(&CgSet<'_, PathNode>) -> Result<T, CgroupError>,
    ) -> Result<T, CgroupError> {
        f(&CgSet {
            version: self.version,
            nodes,
        })
    }

    /// Freezes the whole sandbox and waits (at most [`FREEZE_TIMEOUT`]) until
    /// the kernel reports it frozen (v1 `freezer.state` = `FROZEN`, v2
    /// `frozen 1` in `cgroup.events`).
    pub fn freeze(&self) -> Result<(), CgroupError> {
        self.with_set(&self.nodes(), |s| s.freeze(FREEZE_TIMEOUT))
    }

    /// Thaws the sandbox.
    pub fn thaw(&self) -> Result<(), CgroupError> {
        self.with_set(&self.nodes(), |s| s.thaw())
    }

    /// Whether the sandbox is (completely) frozen.
    pub fn is_frozen(&self) -> Result<bool, CgroupError> {
        self.with_set(&self.nodes(), |s| s.is_frozen())
    }

    /// Kills every process of the sandbox subtree (v2: `cgroup.kill`; v1:
    /// freeze, SIGKILL every pid, thaw, repeat) and returns once none is
    /// left, or [`CgroupError::KillIncomplete`] after [`KILL_TIMEOUT`].
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        self.with_set(&self.nodes(), |s| s.kill_all(KILL_TIMEOUT))
    }

    /// Kills every process of one leaf (and its descendants). On v2 the leaf
    /// must not be reused afterwards.
    pub fn kill_leaf(&self, leaf: &str) -> Result<(), CgroupError> {
        self.with_set(&self.leaf_nodes(leaf)?, |s| s.kill_all(KILL_TIMEOUT))
    }

    /// All processes in the sandbox subtree.
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        self.with_set(&self.nodes(), |s| s.pids())
    }

    /// All processes in one leaf (and its descendants).
    pub fn leaf_pids(&self, leaf: &str) -> Result<Vec<i32>, CgroupError> {
        self.with_set(&self.leaf_nodes(leaf)?, |s| s.pids())
    }

    /// Accounting of the whole sandbox.
    pub fn stats(&self) -> Result<CgroupStats, CgroupError> {
        self.with_set(&self.nodes(), |s| s.stats())
    }

    /// Accounting of one leaf (e.g. one execution).
    pub fn leaf_stats(&self, leaf: &str) -> Result<CgroupStats, CgroupError> {
        self.with_set(&self.leaf_nodes(leaf)?, |s| s.stats())
    }

    /// Kills the processes of a leaf and removes it.
    pub fn remove_leaf(&self, leaf: &str) -> Result<(), CgroupError> {
        self.kill_leaf(leaf)?;
        for (_, dir) in self.leaf_dirs(leaf)? {
            rmdir_tree(&dir)?;
        }
        Ok(())
    }

    /// Kills what is left, then removes all directories bottom-up in every
    /// hierarchy, retrying briefly on `EBUSY`. Idempotent: missing
    /// directories are fine.
    pub fn remove(&self) -> Result<(), CgroupError> {
        if !self.pids()?.is_empty() {
            self.kill_all()?;
        }
        for (_, dir) in self.dirs() {
            rmdir_tree(&dir)?;
        }
        Ok(())
    }
}

fn write_limits_v1(h: &Hierarchy, node: &PathNode, limits: &Limits) -> Result<(), CgroupError> {
    if h.has("memory") {
        if let Some(bytes) = limits.memory_bytes {
            // Lower memory.limit first: memsw must always be >= limit.
            node.write("memory.limit_in_bytes", &bytes.to_string())?;
            if node.has("memory.memsw.limit_in_bytes") {
                node.write("memory.memsw.limit_in_bytes", &bytes.to_string())?;
            }
            if node.has("memory.swappiness") {
                if let Err(e) = node.write("memory.swappiness", "0") {
                    tracing::debug!(error = %e, "memory.swappiness not writable");
                }
            }
        }
    }
    if h.has("cpu") {
        if let Some(mc) = limits.cpu_millicores {
            node.write("cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
            node.write("cpu.cfs_quota_us", &cpu_quota_us(mc).to_string())?;
        }
    }
    if h.has("pids") {
        if let Some(p) = limits.pids_max {
            node.write("pids.max", &p.to_string())?;
        }
    }
    Ok(())
}

fn write_limits_v2(h: &Hierarchy, node: &PathNode, limits: &Limits) -> Result<(), CgroupError> {
    // Let the leaves inherit the controllers (for per-leaf accounting).
    for c in &h.controllers {
        node.write("cgroup.subtree_control", &format!("+{c}"))?;
    }
    if let Some(bytes) = limits.memory_bytes {
        node.write("memory.max", &bytes.to_string())?;
        if node.has("memory.swap.max") {
            node.write("memory.swap.max", "0")?;
        }
        if node.has("memory.oom.group") {
            node.write("memory.oom.group", "0")?;
        }
    }
    if let Some(mc) = limits.cpu_millicores {
        node.write("cpu.max", &format!("{} {CPU_PERIOD_US}", cpu_quota_us(mc)))?;
    }
    if let Some(p) = limits.pids_max {
        node.write("pids.max", &p.to_string())?;
    }
    Ok(())
}

/// CFS quota in µs per [`CPU_PERIOD_US`] for `millicores` (1000 = 1 CPU).
fn cpu_quota_us(millicores: u64) -> u64 {
    millicores * CPU_PERIOD_US / 1000
}
