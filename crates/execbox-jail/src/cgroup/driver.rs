//! Detection of the cgroup setup and creation of sandbox cgroups.

use std::path::{Path, PathBuf};

use super::mountinfo::{parse_mountinfo, CgroupMount};
use super::node::{Node, PathNode};
use super::sandbox::SandboxCgroup;
use super::{
    validate_name, CgroupError, CgroupVersion, FeatureStatus, Limits, DEFAULT_BASE, UNIFIED_LABEL,
};

/// Controllers execbox needs on cgroup v2.
const V2_WANTED: &[&str] = &["memory", "cpu", "pids"];
/// Controllers execbox needs on cgroup v1.
const V1_WANTED: &[&str] = &["memory", "cpu", "cpuacct", "pids", "freezer"];

/// One hierarchy used by a driver: for v2 the unified one, for v1 one per
/// (group of co-mounted) controller(s).
#[derive(Clone, Debug)]
pub(crate) struct Hierarchy {
    /// `unified`, or the v1 controller list such as `cpu,cpuacct`.
    pub label: String,
    /// Usable controllers (v2: those enabled down to the base directory).
    pub controllers: Vec<String>,
    /// Mount point of the hierarchy.
    pub mount: PathBuf,
    /// `<mount>/<base name>`.
    pub base: PathBuf,
}

impl Hierarchy {
    pub fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }
}

/// Entry point of the cgroup layer: knows which hierarchies to use and
/// creates ([`create`](Self::create)) or re-opens ([`open`](Self::open))
/// sandbox cgroups below `<mount>/<base>` in each of them.
#[derive(Clone, Debug)]
pub struct CgroupDriver {
    version: CgroupVersion,
    base_name: String,
    hierarchies: Vec<Hierarchy>,
    notes: Vec<String>,
}

fn mkdir_p(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(CgroupError::io("mkdir", path, e)),
    }
}

fn words(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_string).collect()
}

impl CgroupDriver {
    /// Detects the cgroup setup with the default base directory
    /// ([`DEFAULT_BASE`]).
    pub fn detect() -> Result<CgroupDriver, CgroupError> {
        Self::detect_with_base(DEFAULT_BASE)
    }

    /// Detects the cgroup setup from `/proc/self/mountinfo`, using
    /// `<mount>/<base>` as base directory in each hierarchy.
    ///
    /// cgroup v2 is chosen when a `cgroup2` mount offers the `memory`, `cpu`
    /// and `pids` controllers (they are enabled in the `cgroup.subtree_control`
    /// of the mount root and of the base directory); otherwise cgroup v1 when
    /// `memory`, `cpu`, `cpuacct`, `pids` and `freezer` are mounted; otherwise
    /// [`CgroupError::NoUsableCgroups`]. The base directories are created.
    pub fn detect_with_base(base: &str) -> Result<CgroupDriver, CgroupError> {
        validate_name(base)?;
        let path = Path::new("/proc/self/mountinfo");
        let text = std::fs::read_to_string(path).map_err(|e| CgroupError::io("read", path, e))?;
        Self::detect_from_mounts(&parse_mountinfo(&text), base)
    }

    /// Like [`detect_with_base`](Self::detect_with_base) but on an already
    /// parsed mount list.
    pub fn detect_from_mounts(
        mounts: &[CgroupMount],
        base: &str,
    ) -> Result<CgroupDriver, CgroupError> {
        validate_name(base)?;
        let mut reasons = Vec::new();
        for m in mounts.iter().filter(|m| m.version == CgroupVersion::V2) {
            if m.read_only {
                reasons.push(format!(
                    "cgroup2 at {} is read-only",
                    m.mount_point.display()
                ));
                continue;
            }
            let file = m.mount_point.join("cgroup.controllers");
            let available = match std::fs::read_to_string(&file) {
                Ok(t) => words(&t),
                Err(e) => {
                    reasons.push(format!("cannot read {}: {e}", file.display()));
                    continue;
                }
            };
            let missing: Vec<&str> = V2_WANTED
                .iter()
                .copied()
                .filter(|c| !available.iter().any(|a| a == c))
                .collect();
            if !missing.is_empty() {
                reasons.push(format!(
                    "cgroup2 at {} lacks controller(s) {}",
                    m.mount_point.display(),
                    missing.join(", ")
                ));
                continue;
            }
            match Self::v2_with_root(&m.mount_point, base) {
                Ok(d) => {
                    let missing: Vec<&str> = V2_WANTED
                        .iter()
                        .copied()
                        .filter(|c| !d.hierarchies.iter().any(|h| h.has(c)))
                        .collect();
                    if missing.is_empty() {
                        return Ok(d);
                    }
                    reasons.push(format!(
                        "cgroup2 at {}: cannot enable {} ({})",
                        m.mount_point.display(),
                        missing.join(", "),
                        d.notes.join("; ")
                    ));
                }
                Err(e) => reasons.push(e.to_string()),
            }
        }

        let v1: Vec<&CgroupMount> = mounts
            .iter()
            .filter(|m| m.version == CgroupVersion::V1 && !m.read_only)
            .collect();
        let missing: Vec<&str> = V1_WANTED
            .iter()
            .copied()
            .filter(|c| !v1.iter().any(|m| m.controllers.iter().any(|x| x == c)))
            .collect();
        if missing.is_empty() {
            let owned: Vec<CgroupMount> = v1.into_iter().cloned().collect();
            return Self::v1_with_mounts(&owned, base);
        }
        reasons.push(format!(
            "cgroup v1 lacks writable controller(s) {}",
            missing.join(", ")
        ));
        Err(CgroupError::NoUsableCgroups {
            reason: reasons.join("; "),
        })
    }

    /// Builds a cgroup v2 driver on the unified hierarchy mounted at `mount`,
    /// whatever controllers it offers. `memory`, `cpu` and `pids` are enabled
    /// down to `<mount>/<base>` where available; limits needing a missing
    /// controller later fail with [`CgroupError::ControllerMissing`].
    /// Freezing (`cgroup.freeze`), killing (`cgroup.kill`) and process
    /// placement work without any controller.
    pub fn v2_with_root(mount: impl AsRef<Path>, base: &str) -> Result<CgroupDriver, CgroupError> {
        validate_name(base)?;
        let mount = mount.as_ref().to_path_buf();
        let root = PathNode(mount.clone());
        let available = words(&root.read("cgroup.controllers")?);
        let mut notes = Vec::new();
        let mut enabled: Vec<String> = Vec::new();
        for c in V2_WANTED {
            if !available.iter().any(|a| a == c) {
                notes.push(format!(
                    "{c} not in {}",
                    root.display("cgroup.controllers").display()
                ));
                continue;
            }
            match enable_controller(&root, c) {
                Ok(()) => enabled.push((*c).to_string()),
                Err(e) => notes.push(e.to_string()),
            }
        }
        let base_dir = mount.join(base);
        mkdir_p(&base_dir)?;
        let base_node = PathNode(base_dir.clone());
        let mut usable = Vec::new();
        for c in enabled {
            match enable_controller(&base_node, &c) {
                Ok(()) => usable.push(c),
                Err(e) => notes.push(e.to_string()),
            }
        }
        Ok(CgroupDriver {
            version: CgroupVersion::V2,
            base_name: base.to_string(),
            hierarchies: vec![Hierarchy {
                label: UNIFIED_LABEL.to_string(),
                controllers: usable,
                mount,
                base: base_dir,
            }],
            notes,
        })
    }

    /// Builds a cgroup v1 driver from v1 mounts: every mount carrying one of
    /// `memory`, `cpu`, `cpuacct`, `pids`, `freezer` is used (bind mounts of
    /// one hierarchy, i.e. the same device, only once). Missing controllers
    /// are not an error here; operations needing them fail with
    /// [`CgroupError::ControllerMissing`].
    pub fn v1_with_mounts(mounts: &[CgroupMount], base: &str) -> Result<CgroupDriver, CgroupError> {
        validate_name(base)?;
        let mut hierarchies: Vec<Hierarchy> = Vec::new();
        let mut seen_dev: Vec<&str> = Vec::new();
        for m in mounts {
            if m.version != CgroupVersion::V1
                || seen_dev.contains(&m.device.as_str())
                || !m
                    .controllers
                    .iter()
                    .any(|c| V1_WANTED.contains(&c.as_str()))
            {
                continue;
            }
            // Two hierarchies cannot share a controller, but be defensive.
            if m.controllers
                .iter()
                .any(|c| hierarchies.iter().any(|h| h.has(c)))
            {
                continue;
            }
            seen_dev.push(&m.device);
            let base_dir = m.mount_point.join(base);
            mkdir_p(&base_dir)?;
            hierarchies.push(Hierarchy {
                label: m.controllers.join(","),
                controllers: m.controllers.clone(),
                mount: m.mount_point.clone(),
                base: base_dir,
            });
        }
        if hierarchies.is_empty() {
            return Err(CgroupError::NoUsableCgroups {
                reason: "no cgroup v1 hierarchy with memory, cpu, cpuacct, pids or freezer"
                    .to_string(),
            });
        }
        Ok(CgroupDriver {
            version: CgroupVersion::V1,
            base_name: base.to_string(),
            hierarchies,
            notes: Vec::new(),
        })
    }

    /// The cgroup version in use.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The base directory name (`execbox` by default).
    pub fn base_name(&self) -> &str {
        &self.base_name
    }

    /// `(label, mount point)` for each hierarchy used.
    pub fn mounts(&self) -> Vec<(String, PathBuf)> {
        self.hierarchies
            .iter()
            .map(|h| (h.label.clone(), h.mount.clone()))
            .collect()
    }

    /// `(label, <mount>/<base>)` for each hierarchy used.
    pub fn base_dirs(&self) -> Vec<(String, PathBuf)> {
        self.hierarchies
            .iter()
            .map(|h| (h.label.clone(), h.base.clone()))
            .collect()
    }

    /// Whether `controller` (`memory`, `cpu`, `cpuacct`, `pids`, `freezer`)
    /// is usable. On v2 `cpuacct` and `freezer` are core features.
    pub fn has_controller(&self, controller: &str) -> bool {
        match self.version {
            CgroupVersion::V1 => self.hierarchies.iter().any(|h| h.has(controller)),
            CgroupVersion::V2 => {
                matches!(controller, "cpuacct" | "freezer")
                    || self.hierarchies.iter().any(|h| h.has(controller))
            }
        }
    }

    fn hierarchy_for(&self, controller: &str) -> Option<&Hierarchy> {
        match self.version {
            CgroupVersion::V1 => self.hierarchies.iter().find(|h| h.has(controller)),
            CgroupVersion::V2 => self.hierarchies.first(),
        }
    }

    /// Availability of each feature, for `execbox doctor`: memory, swap
    /// limit, cpu, cpuacct / cpu.stat, pids, freezer, oom detection, kill.
    pub fn report(&self) -> Vec<FeatureStatus> {
        let mut out = Vec::new();
        let mut push = |name: &str, available: bool, detail: String| {
            out.push(FeatureStatus {
                name: name.to_string(),
                available,
                detail,
            })
        };
        let v1 = self.version == CgroupVersion::V1;
        let at = |c: &str| -> Option<PathBuf> {
            if self.has_controller(c) {
                self.hierarchy_for(c).map(|h| h.base.clone())
            } else {
                None
            }
        };
        let file_status = |c: &str, file: &str| -> (bool, String) {
            match at(c) {
                Some(base) => {
                    let p = base.join(file);
                    if p.exists() {
                        (true, format!("{} ({})", p.display(), self.version))
                    } else {
                        (false, format!("{} missing", p.display()))
                    }
                }
                None => {
                    let why = if self.notes.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", self.notes.join("; "))
                    };
                    (
                        false,
                        format!("controller {c} not available ({}){why}", self.version),
                    )
                }
            }
        };
        let (ok, d) = file_status(
            "memory",
            if v1 {
                "memory.limit_in_bytes"
            } else {
                "memory.max"
            },
        );
        push("memory", ok, d);
        let (ok, d) = file_status(
            "memory",
            if v1 {
                "memory.memsw.limit_in_bytes"
            } else {
                "memory.swap.max"
            },
        );
        push("swap limit", ok, d);
        let (ok, d) = file_status("cpu", if v1 { "cpu.cfs_quota_us" } else { "cpu.max" });
        push("cpu", ok, d);
        let (ok, d) = if v1 {
            file_status("cpuacct", "cpuacct.usage")
        } else {
            file_status("cpuacct", "cpu.stat")
        };
        push(if v1 { "cpuacct" } else { "cpu.stat" }, ok, d);
        let (ok, d) = file_status("pids", "pids.max");
        push("pids", ok, d);
        let (ok, d) = file_status(
            "freezer",
            if v1 { "freezer.state" } else { "cgroup.freeze" },
        );
        push("freezer", ok, d);
        let (ok, d) = if v1 {
            match at("memory").map(|b| PathNode(b).read_opt("memory.oom_control")) {
                Some(Ok(Some(t))) if t.lines().any(|l| l.starts_with("oom_kill ")) => {
                    (true, "memory.oom_control oom_kill counter".to_string())
                }
                Some(Ok(_)) => (
                    false,
                    "memory.oom_control has no oom_kill counter".to_string(),
                ),
                Some(Err(e)) => (false, e.to_string()),
                None => (false, "controller memory not available".to_string()),
            }
        } else {
            file_status("memory", "memory.events")
        };
        push("oom detection", ok, d);
        let (ok, d) = if v1 {
            match at("freezer") {
                Some(_) => (true, "freezer + SIGKILL loop (v1)".to_string()),
                None => (
                    false,
                    "no freezer: SIGKILL loop without freezing".to_string(),
                ),
            }
        } else {
            file_status("freezer", "cgroup.kill")
        };
        push("kill", ok, d);
        out
    }

    /// Checks that every requested limit has its controller and a sane value.
    fn check_limits(&self, limits: &Limits) -> Result<(), CgroupError> {
        if let Some(m) = limits.memory_bytes {
            if !self.has_controller("memory") {
                return Err(CgroupError::missing("memory"));
            }
            if m < 1 << 20 {
                return Err(CgroupError::InvalidLimit {
                    what: "memory_bytes",
                    reason: format!("{m} is below 1 MiB"),
                });
            }
        }
        if let Some(c) = limits.cpu_millicores {
            if !self.has_controller("cpu") {
                return Err(CgroupError::missing("cpu"));
            }
            if !(10..=1_000_000).contains(&c) {
                return Err(CgroupError::InvalidLimit {
                    what: "cpu_millicores",
                    reason: format!("{c} is outside 10..=1000000"),
                });
            }
        }
        if let Some(p) = limits.pids_max {
            if !self.has_controller("pids") {
                return Err(CgroupError::missing("pids"));
            }
            if p == 0 || p > i32::MAX as u64 {
                return Err(CgroupError::InvalidLimit {
                    what: "pids_max",
                    reason: format!("{p} is outside 1..={}", i32::MAX),
                });
            }
        }
        Ok(())
    }

    fn handle(&self, name: &str) -> SandboxCgroup {
        SandboxCgroup::new(name, self.version, self.hierarchies.clone())
    }

    /// Creates the sandbox cgroup `<base>/<name>` in every hierarchy, writes
    /// `limits` on it and creates the [`AGENT_LEAF`](super::AGENT_LEAF) leaf.
    /// Fails with [`CgroupError::AlreadyExists`] if it exists in any
    /// hierarchy (cgroups are never reused) and with
    /// [`CgroupError::ControllerMissing`] if a limit cannot be enforced; on
    /// failure nothing is left behind.
    pub fn create(&self, name: &str, limits: &Limits) -> Result<SandboxCgroup, CgroupError> {
        validate_name(name)?;
        self.check_limits(limits)?;
        for h in &self.hierarchies {
            let dir = h.base.join(name);
            if dir.exists() {
                return Err(CgroupError::AlreadyExists { path: dir });
            }
        }
        let cg = self.handle(name);
        if let Err(e) = cg.setup(limits) {
            if let Err(e2) = cg.remove() {
                tracing::warn!(error = %e2, "cgroup cleanup after failed create");
            }
            return Err(e);
        }
        Ok(cg)
    }

    /// Re-opens an existing sandbox cgroup (e.g. after a server restart).
    /// Fails with [`CgroupError::NotFound`] unless `<base>/<name>` exists in
    /// every hierarchy.
    pub fn open(&self, name: &str) -> Result<SandboxCgroup, CgroupError> {
        validate_name(name)?;
        for h in &self.hierarchies {
            let dir = h.base.join(name);
            if !dir.is_dir() {
                return Err(CgroupError::NotFound { path: dir });
            }
        }
        Ok(self.handle(name))
    }

    /// Names of the sandbox cgroups present under the base directory of any
    /// hierarchy (for clean-up after a restart).
    pub fn list(&self) -> Result<Vec<String>, CgroupError> {
        let mut names = std::collections::BTreeSet::new();
        for h in &self.hierarchies {
            for child in PathNode(h.base.clone()).children()? {
                if let Some(n) = child.0.file_name().and_then(|n| n.to_str()) {
                    names.insert(n.to_string());
                }
            }
        }
        Ok(names.into_iter().collect())
    }

    /// Removes the (empty) base directories. Fails with `EBUSY`/`ENOTEMPTY`
    /// style errors if sandbox cgroups remain; missing ones are fine.
    pub fn remove_base(&self) -> Result<(), CgroupError> {
        for h in &self.hierarchies {
            match std::fs::remove_dir(&h.base) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(CgroupError::io("rmdir", &h.base, e)),
            }
        }
        Ok(())
    }
}

/// Enables `controller` in `node/cgroup.subtree_control` unless already on.
fn enable_controller(node: &PathNode, controller: &str) -> Result<(), CgroupError> {
    let current = node.read("cgroup.subtree_control")?;
    if current.split_whitespace().any(|c| c == controller) {
        return Ok(());
    }
    node.write("cgroup.subtree_control", &format!("+{controller}"))
}
