//! Cgroup directory access, by path (host side) or by directory file
//! descriptor (inside the sandbox), and the version-independent operations
//! built on it: listing processes, freezing, killing, statistics, removal.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::signal::{kill, Signal};
use nix::sys::stat::Mode;
use nix::unistd::{unlinkat, Pid, UnlinkatFlags};

use super::{CgroupError, CgroupStats, CgroupVersion, UNIFIED_LABEL};

const POLL: Duration = Duration::from_millis(5);

/// One cgroup directory in one hierarchy.
pub(crate) trait Node: Sized {
    /// Path used in error messages for `file` inside this directory (`""`
    /// for the directory itself).
    fn display(&self, file: &str) -> PathBuf;
    /// Reads a file; `Ok(None)` when it does not exist.
    fn read_opt(&self, file: &str) -> Result<Option<String>, CgroupError>;
    /// Writes `data` to a file with a single `write(2)`.
    fn write(&self, file: &str, data: &str) -> Result<(), CgroupError>;
    /// The child cgroups (sub-directories); empty when this directory is gone.
    fn children(&self) -> Result<Vec<Self>, CgroupError>;

    /// Reads a file that must exist.
    fn read(&self, file: &str) -> Result<String, CgroupError> {
        match self.read_opt(file)? {
            Some(s) => Ok(s),
            None => Err(CgroupError::io(
                "read",
                self.display(file),
                std::io::Error::from(ErrorKind::NotFound),
            )),
        }
    }

    /// Whether a file exists (and is readable).
    fn has(&self, file: &str) -> bool {
        matches!(self.read_opt(file), Ok(Some(_)))
    }
}

/// A cgroup directory addressed by path.
#[derive(Clone, Debug)]
pub(crate) struct PathNode(pub PathBuf);

impl Node for PathNode {
    fn display(&self, file: &str) -> PathBuf {
        if file.is_empty() {
            self.0.clone()
        } else {
            self.0.join(file)
        }
    }

    fn read_opt(&self, file: &str) -> Result<Option<String>, CgroupError> {
        let p = self.0.join(file);
        match std::fs::read_to_string(&p) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CgroupError::io("read", p, e)),
        }
    }

    fn write(&self, file: &str, data: &str) -> Result<(), CgroupError> {
        let p = self.0.join(file);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(|e| CgroupError::io("open", &p, e))?;
        write_once(&mut f, data).map_err(|e| CgroupError::io("write", &p, e))
    }

    fn children(&self) -> Result<Vec<Self>, CgroupError> {
        let rd = match std::fs::read_dir(&self.0) {
            Ok(rd) => rd,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(CgroupError::io("readdir", &self.0, e)),
        };
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| CgroupError::io("readdir", &self.0, e))?;
            let is_dir = ent
                .file_type()
                .map_err(|e| CgroupError::io("stat", ent.path(), e))?
                .is_dir();
            if is_dir {
                out.push(PathNode(ent.path()));
            }
        }
        Ok(out)
    }
}

/// A cgroup directory addressed by an open directory file descriptor.
#[derive(Clone, Debug)]
pub(crate) struct FdNode {
    pub fd: Arc<OwnedFd>,
    /// Pseudo path for messages, e.g. `memory:/exec-1`.
    pub display: PathBuf,
}

impl FdNode {
    fn open_file(&self, file: &str, flags: OFlag) -> Result<Option<std::fs::File>, CgroupError> {
        match openat(
            self.fd.as_fd(),
            file,
            flags | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => Ok(Some(std::fs::File::from(fd))),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(CgroupError::errno("open", self.display(file), e)),
        }
    }

    /// Opens the sub-directory `name`; `Ok(None)` if it does not exist.
    pub fn open_dir(&self, name: &str) -> Result<Option<FdNode>, CgroupError> {
        open_dir_at(&self.fd, name, &self.display)
    }

    /// Names of the sub-directories.
    pub fn child_names(&self) -> Result<Vec<String>, CgroupError> {
        // A fresh descriptor, so the shared one keeps its offset.
        let fd = match openat(
            self.fd.as_fd(),
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) | Err(Errno::ENODEV) => return Ok(Vec::new()),
            Err(e) => return Err(CgroupError::errno("opendir", &self.display, e)),
        };
        read_subdirs(fd).map_err(|e| CgroupError::errno("readdir", &self.display, e))
    }
}

/// Lists the names of the sub-directories of the directory open as `fd`
/// (consumed), with `fdopendir(3)`/`readdir(3)`.
fn read_subdirs(fd: OwnedFd) -> Result<Vec<String>, Errno> {
    use std::os::fd::IntoRawFd;
    let raw = fd.into_raw_fd();
    // SAFETY: `raw` is an open directory descriptor we own; on success
    // fdopendir takes ownership of it (released by closedir below).
    let dir = unsafe { libc::fdopendir(raw) };
    if dir.is_null() {
        let e = Errno::last();
        // SAFETY: fdopendir failed, so we still own `raw` and close it once.
        unsafe { libc::close(raw) };
        return Err(e);
    }
    let mut names = Vec::new();
    let result = loop {
        Errno::clear();
        // SAFETY: `dir` is a valid, open DIR stream used by this thread only.
        let ent = unsafe { libc::readdir(dir) };
        if ent.is_null() {
            let e = Errno::last();
            break if e == Errno::UnknownErrno {
                Ok(())
            } else {
                Err(e)
            };
        }
        // SAFETY: readdir returned a valid dirent whose d_name is a
        // NUL-terminated string, valid until the next readdir/closedir; we
        // copy it out before either.
        let (name, dtype) = unsafe {
            (
                std::ffi::CStr::from_ptr((*ent).d_name.as_ptr())
                    .to_string_lossy()
                    .into_owned(),
                (*ent).d_type,
            )
        };
        if dtype == libc::DT_DIR && name != "." && name != ".." {
            names.push(name);
        }
    };
    // SAFETY: `dir` is valid and closed exactly once; this also closes `raw`.
    unsafe { libc::closedir(dir) };
    result.map(|()| names)
}

/// Opens `parent/name` as a directory; `Ok(None)` if it does not exist.
pub(crate) fn open_dir_at(
    parent: &Arc<OwnedFd>,
    name: &str,
    parent_display: &Path,
) -> Result<Option<FdNode>, CgroupError> {
    let display = parent_display.join(name);
    match openat(
        parent.as_fd(),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => Ok(Some(FdNode {
            fd: Arc::new(fd),
            display,
        })),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(CgroupError::errno("open", display, e)),
    }
}

impl Node for FdNode {
    fn display(&self, file: &str) -> PathBuf {
        if file.is_empty() {
            self.display.clone()
        } else {
            self.display.join(file)
        }
    }

    fn read_opt(&self, file: &str) -> Result<Option<String>, CgroupError> {
        let Some(mut f) = self.open_file(file, OFlag::O_RDONLY)? else {
            return Ok(None);
        };
        let mut s = String::new();
        f.read_to_string(&mut s)
            .map_err(|e| CgroupError::io("read", self.display(file), e))?;
        Ok(Some(s))
    }

    fn write(&self, file: &str, data: &str) -> Result<(), CgroupError> {
        let Some(mut f) = self.open_file(file, OFlag::O_WRONLY)? else {
            return Err(CgroupError::io(
                "open",
                self.display(file),
                std::io::Error::from(ErrorKind::NotFound),
            ));
        };
        write_once(&mut f, data).map_err(|e| CgroupError::io("write", self.display(file), e))
    }

    fn children(&self) -> Result<Vec<Self>, CgroupError> {
        let mut out = Vec::new();
        for name in self.child_names()? {
            if let Some(n) = self.open_dir(&name)? {
                out.push(n);
            }
        }
        Ok(out)
    }
}

/// cgroup files must be written with one `write(2)`; a short write is an error.
fn write_once(f: &mut std::fs::File, data: &str) -> std::io::Result<()> {
    let n = f.write(data.as_bytes())?;
    if n != data.len() {
        return Err(std::io::Error::new(
            ErrorKind::WriteZero,
            format!("short write ({n} of {} bytes)", data.len()),
        ));
    }
    Ok(())
}

/// Calls `f` on `node` and all its descendants (pre-order).
pub(crate) fn walk<N: Node>(
    node: &N,
    f: &mut dyn FnMut(&N) -> Result<(), CgroupError>,
) -> Result<(), CgroupError> {
    f(node)?;
    for child in node.children()? {
        walk(&child, f)?;
    }
    Ok(())
}

/// Whether a hierarchy with this label carries `controller` (v1 labels are
/// comma-separated controller lists; the v2 label covers everything, and
/// availability is then decided by the presence of interface files).
pub(crate) fn label_has(label: &str, controller: &str) -> bool {
    label == UNIFIED_LABEL || label.split(',').any(|c| c == controller)
}

/// The same cgroup seen in every hierarchy, as `(label, node)` pairs.
pub(crate) struct CgSet<'a, N: Node> {
    pub version: CgroupVersion,
    pub nodes: &'a [(String, N)],
}

impl<'a, N: Node> CgSet<'a, N> {
    /// The node of the hierarchy holding `controller`.
    pub fn node_for(&self, controller: &str) -> Option<&'a N> {
        self.nodes
            .iter()
            .find(|(l, _)| label_has(l, controller))
            .map(|(_, n)| n)
    }

    fn first_display(&self) -> PathBuf {
        self.nodes
            .first()
            .map(|(_, n)| n.display(""))
            .unwrap_or_default()
    }

    /// All processes in the subtree, in every hierarchy, deduplicated.
    /// Zero (processes outside our pid namespace) is filtered out.
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let mut set = BTreeSet::new();
        for (_, node) in self.nodes {
            walk(node, &mut |n: &N| {
                // The directory may vanish while we walk; that is fine.
                if let Some(text) = n.read_opt("cgroup.procs")? {
                    for line in text.lines() {
                        let line = line.trim();
                        if line.is_empty() {
                            continue;
                        }
                        let pid: i32 = line.parse().map_err(|_| CgroupError::Parse {
                            path: n.display("cgroup.procs"),
                            detail: format!("bad pid {line:?}"),
                        })?;
                        if pid > 0 {
                            set.insert(pid);
                        }
                    }
                }
                Ok(())
            })?;
        }
        Ok(set.into_iter().collect())
    }

    fn freezer_node(&self) -> Result<&'a N, CgroupError> {
        self.node_for("freezer")
            .ok_or_else(|| CgroupError::missing("freezer"))
    }

    /// Requests a freeze and waits (bounded) until it completed. On timeout
    /// the cgroup is thawed again and `FreezeTimeout` returned.
    pub fn freeze(&self, timeout: Duration) -> Result<(), CgroupError> {
        let node = self.freezer_node()?;
        match self.version {
            CgroupVersion::V1 => node.write("freezer.state", "FROZEN")?,
            CgroupVersion::V2 => node.write("cgroup.freeze", "1")?,
        }
        let start = Instant::now();
        loop {
            if self.is_frozen()? {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                let _ = self.thaw();
                return Err(CgroupError::FreezeTimeout {
                    path: node.display(""),
                    waited: start.elapsed(),
                });
            }
            sleep(POLL);
        }
    }

    /// Thaws the cgroup and every cgroup below it (does not wait). A descendant frozen on its
    /// own (by an agent that was killed halfway through killing one of its leaves) stays
    /// frozen when only its parent thaws, and its processes could then never die.
    pub fn thaw(&self) -> Result<(), CgroupError> {
        let node = self.freezer_node()?;
        let version = self.version;
        let thaw_one = |n: &N| match version {
            CgroupVersion::V1 => n.write("freezer.state", "THAWED"),
            CgroupVersion::V2 => n.write("cgroup.freeze", "0"),
        };
        thaw_one(node)?;
        // Descendants may be removed meanwhile: their errors do not matter.
        let _ = walk(node, &mut |n: &N| {
            let _ = thaw_one(n);
            Ok(())
        });
        Ok(())
    }

    /// Whether the freeze has completed.
    pub fn is_frozen(&self) -> Result<bool, CgroupError> {
        let node = self.freezer_node()?;
        match self.version {
            CgroupVersion::V1 => Ok(node.read("freezer.state")?.trim() == "FROZEN"),
            CgroupVersion::V2 => {
                let text = node.read("cgroup.events")?;
                Ok(keyed(&text, "frozen") == Some(1))
            }
        }
    }

    /// Kills every process of the subtree and waits until none is left.
    ///
    /// v2 with `cgroup.kill`: one write, then wait. Otherwise: freeze (so
    /// nothing can fork), SIGKILL every listed pid, thaw (so frozen v1 tasks
    /// can die), repeat until empty or `timeout`.
    pub fn kill_all(&self, timeout: Duration) -> Result<(), CgroupError> {
        let start = Instant::now();
        let me = std::process::id() as i32;
        let mut used_cgroup_kill = false;
        if self.version == CgroupVersion::V2 {
            if let Some(node) = self.node_for("kill") {
                if node.has("cgroup.kill") {
                    if self.pids()?.is_empty() {
                        return Ok(());
                    }
                    node.write("cgroup.kill", "1")?;
                    used_cgroup_kill = true;
                }
            }
        }
        loop {
            let pids = self.pids()?;
            if pids.is_empty() {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(CgroupError::KillIncomplete {
                    path: self.first_display(),
                    remaining: pids.len(),
                });
            }
            if used_cgroup_kill && start.elapsed() < timeout / 2 {
                sleep(POLL);
                continue;
            }
            let have_freezer = self.node_for("freezer").is_some();
            // A failed freeze (e.g. a task stuck in D state) must not stop the
            // kill: fall back to killing unfrozen.
            let frozen = have_freezer && self.freeze(Duration::from_millis(500)).is_ok();
            let pids = if frozen { self.pids()? } else { pids };
            for pid in pids {
                if pid == me {
                    continue;
                }
                match kill(Pid::from_raw(pid), Signal::SIGKILL) {
                    Ok(()) | Err(Errno::ESRCH) => {}
                    Err(source) => return Err(CgroupError::Signal { pid, source }),
                }
            }
            if frozen {
                self.thaw()?;
            }
            sleep(POLL);
        }
    }

    /// Statistics of this cgroup (subtree included).
    pub fn stats(&self) -> Result<CgroupStats, CgroupError> {
        match self.version {
            CgroupVersion::V1 => self.stats_v1(),
            CgroupVersion::V2 => self.stats_v2(),
        }
    }

    fn stats_v1(&self) -> Result<CgroupStats, CgroupError> {
        let mem = self
            .node_for("memory")
            .ok_or_else(|| CgroupError::missing("memory"))?;
        let acct = self
            .node_for("cpuacct")
            .ok_or_else(|| CgroupError::missing("cpuacct"))?;
        let pids = self
            .node_for("pids")
            .ok_or_else(|| CgroupError::missing("pids"))?;
        let mut st = CgroupStats {
            memory_current: read_u64(mem, "memory.usage_in_bytes")?,
            memory_peak: read_u64_opt(mem, "memory.max_usage_in_bytes")?,
            memory_limit: read_u64(mem, "memory.limit_in_bytes").map(v1_limit)?,
            cpu_usage_ns: read_u64(acct, "cpuacct.usage")?,
            pids_current: read_u64(pids, "pids.current")?,
            ..CgroupStats::default()
        };
        // v1 counts OOM kills only in the victim's own memcg: sum the subtree.
        let mut ooms = 0u64;
        walk(mem, &mut |n: &N| {
            if let Some(text) = n.read_opt("memory.oom_control")? {
                ooms += keyed(&text, "oom_kill").unwrap_or(0);
            }
            Ok(())
        })?;
        st.oom_kills = ooms;
        if let Some(cpu) = self.node_for("cpu") {
            if let Some(text) = cpu.read_opt("cpu.stat")? {
                st.nr_throttled = keyed(&text, "nr_throttled").unwrap_or(0);
                st.throttled_ns = keyed(&text, "throttled_time").unwrap_or(0);
            }
        }
        Ok(st)
    }

    fn stats_v2(&self) -> Result<CgroupStats, CgroupError> {
        let node = self
            .node_for("memory")
            .ok_or_else(|| CgroupError::missing("memory"))?;
        let Some(current) = node.read_opt("memory.current")? else {
            return Err(CgroupError::missing("memory"));
        };
        let Some(pids_current) = node.read_opt("pids.current")? else {
            return Err(CgroupError::missing("pids"));
        };
        let events = node.read("memory.events")?;
        let cpu = node.read("cpu.stat")?;
        Ok(CgroupStats {
            memory_current: parse_u64(node, "memory.current", &current)?,
            memory_peak: read_u64_opt(node, "memory.peak")?,
            memory_limit: parse_max(node, "memory.max", &node.read("memory.max")?)?,
            cpu_usage_ns: keyed(&cpu, "usage_usec").unwrap_or(0) * 1000,
            oom_kills: keyed(&events, "oom_kill").unwrap_or(0),
            pids_current: parse_u64(node, "pids.current", &pids_current)?,
            nr_throttled: keyed(&cpu, "nr_throttled").unwrap_or(0),
            throttled_ns: keyed(&cpu, "throttled_usec").unwrap_or(0) * 1000,
        })
    }
}

/// v1 reports "unlimited" as a huge page-aligned number.
fn v1_limit(v: u64) -> Option<u64> {
    if v >= (1u64 << 62) {
        None
    } else {
        Some(v)
    }
}

/// Value of the `key value` line in a flat-keyed cgroup file.
pub(crate) fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        if it.next() == Some(key) {
            it.next().and_then(|v| v.parse().ok())
        } else {
            None
        }
    })
}

fn parse_u64<N: Node>(node: &N, file: &str, text: &str) -> Result<u64, CgroupError> {
    text.trim().parse().map_err(|_| CgroupError::Parse {
        path: node.display(file),
        detail: format!("expected an integer, got {:?}", text.trim()),
    })
}

fn parse_max<N: Node>(node: &N, file: &str, text: &str) -> Result<Option<u64>, CgroupError> {
    if text.trim() == "max" {
        Ok(None)
    } else {
        parse_u64(node, file, text).map(Some)
    }
}

pub(crate) fn read_u64<N: Node>(node: &N, file: &str) -> Result<u64, CgroupError> {
    let text = node.read(file)?;
    parse_u64(node, file, &text)
}

fn read_u64_opt<N: Node>(node: &N, file: &str) -> Result<Option<u64>, CgroupError> {
    match node.read_opt(file)? {
        Some(text) => parse_u64(node, file, &text).map(Some),
        None => Ok(None),
    }
}

/// Retries `op` while it fails with `EBUSY` (a dying task may still pin the
/// cgroup for a few milliseconds). `ENOENT` counts as success.
fn rmdir_retry(
    display: &Path,
    mut op: impl FnMut() -> Result<(), Errno>,
) -> Result<(), CgroupError> {
    let start = Instant::now();
    loop {
        match op() {
            Ok(()) | Err(Errno::ENOENT) => return Ok(()),
            Err(Errno::EBUSY) if start.elapsed() < super::RMDIR_TIMEOUT => sleep(POLL),
            Err(e) => return Err(CgroupError::errno("rmdir", display, e)),
        }
    }
}

/// Removes a cgroup directory and its descendants, bottom-up.
pub(crate) fn rmdir_tree(path: &Path) -> Result<(), CgroupError> {
    for child in PathNode(path.to_path_buf()).children()? {
        rmdir_tree(&child.0)?;
    }
    rmdir_retry(path, || {
        std::fs::remove_dir(path).map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))
    })
}

/// Removes `parent/name` and its descendants, bottom-up, through fds.
pub(crate) fn rmdir_tree_at(
    parent: &Arc<OwnedFd>,
    name: &str,
    parent_display: &Path,
) -> Result<(), CgroupError> {
    let display = parent_display.join(name);
    if let Some(node) = open_dir_at(parent, name, parent_display)? {
        for child in node.child_names()? {
            rmdir_tree_at(&node.fd, &child, &display)?;
        }
    }
    rmdir_retry(&display, || {
        unlinkat(parent.as_fd(), name, UnlinkatFlags::RemoveDir)
    })
}
