//! In-sandbox cgroup API working on directory file descriptors only (the
//! agent has no `/sys` mounted).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{mkdirat, Mode};

use super::node::{open_dir_at, rmdir_tree_at, CgSet, FdNode, Node};
use super::{validate_name, CgroupError, CgroupStats, CgroupVersion, FREEZE_TIMEOUT, KILL_TIMEOUT};

/// The sandbox cgroup `<name>` seen through open directory file descriptors,
/// one per hierarchy, as passed into the sandbox. Used by the agent to create
/// one leaf per execution.
#[derive(Debug)]
pub struct ExecCgroups {
    version: CgroupVersion,
    roots: Vec<(String, FdNode)>,
}

impl ExecCgroups {
    /// Wraps `(label, fd)` pairs: `fd` is an `O_DIRECTORY` handle on
    /// `<base>/<name>` in the hierarchy labelled `label` (labels as in
    /// [`SandboxCgroup::dirs`](super::SandboxCgroup::dirs)).
    pub fn from_dir_fds(fds: Vec<(String, OwnedFd)>, version: CgroupVersion) -> ExecCgroups {
        let roots = fds
            .into_iter()
            .map(|(label, fd)| {
                let display = PathBuf::from(format!("{label}:/"));
                (
                    label,
                    FdNode {
                        fd: Arc::new(fd),
                        display,
                    },
                )
            })
            .collect();
        ExecCgroups { version, roots }
    }

    /// The cgroup version.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The hierarchy labels, in order.
    pub fn labels(&self) -> Vec<String> {
        self.roots.iter().map(|(l, _)| l.clone()).collect()
    }

    /// Creates the leaf `<name>/<leaf>` in every hierarchy (`mkdirat`). Limits
    /// are inherited from `<name>`; nothing else is written. Fails with
    /// [`CgroupError::AlreadyExists`] if the leaf exists (leaves are never
    /// reused); on failure, directories created by this call are removed.
    pub fn create_leaf(&self, leaf: &str) -> Result<ExecLeaf, CgroupError> {
        validate_name(leaf)?;
        let mut created: Vec<&(String, FdNode)> = Vec::new();
        let mut result = Ok(());
        for root in &self.roots {
            let (_, node) = root;
            match mkdirat(node.fd.as_fd(), leaf, Mode::from_bits_truncate(0o755)) {
                Ok(()) => created.push(root),
                Err(Errno::EEXIST) => {
                    result = Err(CgroupError::AlreadyExists {
                        path: node.display(leaf),
                    });
                    break;
                }
                Err(e) => {
                    result = Err(CgroupError::errno("mkdir", node.display(leaf), e));
                    break;
                }
            }
        }
        let leaf_handle = result.and_then(|()| self.open_leaf(leaf));
        if leaf_handle.is_err() {
            for (_, node) in created {
                let _ = rmdir_tree_at(&node.fd, leaf, &node.display);
            }
        }
        leaf_handle
    }

    /// Opens an existing leaf; [`CgroupError::NotFound`] if it is missing in
    /// any hierarchy.
    pub fn open_leaf(&self, leaf: &str) -> Result<ExecLeaf, CgroupError> {
        validate_name(leaf)?;
        let mut parts = Vec::with_capacity(self.roots.len());
        for (label, root) in &self.roots {
            match open_dir_at(&root.fd, leaf, &root.display)? {
                Some(node) => parts.push((label.clone(), node)),
                None => {
                    return Err(CgroupError::NotFound {
                        path: root.display(leaf),
                    })
                }
            }
        }
        Ok(ExecLeaf {
            name: leaf.to_string(),
            version: self.version,
            parents: self.roots.iter().map(|(_, n)| n.clone()).collect(),
            parts,
        })
    }

    /// All processes in the sandbox subtree (pids as seen from the caller's
    /// pid namespace).
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        self.set().pids()
    }

    /// Accounting of the whole sandbox cgroup.
    pub fn stats(&self) -> Result<CgroupStats, CgroupError> {
        self.set().stats()
    }

    fn set(&self) -> CgSet<'_, FdNode> {
        CgSet {
            version: self.version,
            nodes: &self.roots,
        }
    }
}

/// One execution leaf `<name>/<leaf>`, reached through file descriptors.
#[derive(Debug)]
pub struct ExecLeaf {
    name: String,
    version: CgroupVersion,
    /// The `<name>` directory of each hierarchy (for `unlinkat`).
    parents: Vec<FdNode>,
    parts: Vec<(String, FdNode)>,
}

impl ExecLeaf {
    /// The leaf name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Limits the leaf's memory (its processes and what they write to tmpfs) to `bytes`, with
    /// no swap. The agent made the leaf, so it owns its files.
    pub fn limit_memory(&self, bytes: u64) -> Result<(), CgroupError> {
        for (label, node) in &self.parts {
            match self.version {
                CgroupVersion::V1 if label.split(',').any(|c| c == "memory") => {
                    node.write("memory.limit_in_bytes", &bytes.to_string())?;
                    if node.has("memory.memsw.limit_in_bytes") {
                        node.write("memory.memsw.limit_in_bytes", &bytes.to_string())?;
                    }
                }
                CgroupVersion::V2 if node.has("memory.max") => {
                    node.write("memory.max", &bytes.to_string())?;
                    if node.has("memory.swap.max") {
                        node.write("memory.swap.max", "0")?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Opens the leaf's `cgroup.procs` in every hierarchy for writing
    /// (`O_WRONLY | O_CLOEXEC`). Give the raw fds to [`join_self`] in the
    /// forked child before `exec`; they close on `exec`.
    pub fn procs_fds(&self) -> Result<Vec<OwnedFd>, CgroupError> {
        self.parts
            .iter()
            .map(|(_, node)| {
                openat(
                    node.fd.as_fd(),
                    "cgroup.procs",
                    OFlag::O_WRONLY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| CgroupError::errno("open", node.display("cgroup.procs"), e))
            })
            .collect()
    }

    /// Moves process `pid` into the leaf in every hierarchy.
    pub fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        for (_, node) in &self.parts {
            node.write("cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    fn set(&self) -> CgSet<'_, FdNode> {
        CgSet {
            version: self.version,
            nodes: &self.parts,
        }
    }

    /// Processes in the leaf (and below).
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        self.set().pids()
    }

    /// Accounting of the leaf.
    pub fn stats(&self) -> Result<CgroupStats, CgroupError> {
        self.set().stats()
    }

    /// Freezes the leaf (bounded wait, see [`FREEZE_TIMEOUT`]).
    pub fn freeze(&self) -> Result<(), CgroupError> {
        self.set().freeze(FREEZE_TIMEOUT)
    }

    /// Thaws the leaf.
    pub fn thaw(&self) -> Result<(), CgroupError> {
        self.set().thaw()
    }

    /// Kills every process in the leaf and waits until it is empty (v2:
    /// `cgroup.kill`, after which the leaf must not be reused).
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        self.set().kill_all(KILL_TIMEOUT)
    }

    /// Kills what is left and removes the leaf (and any sub-directories)
    /// in every hierarchy. Idempotent.
    pub fn remove(&self) -> Result<(), CgroupError> {
        if !self.pids()?.is_empty() {
            self.kill_all()?;
        }
        for parent in &self.parents {
            rmdir_tree_at(&parent.fd, &self.name, &parent.display)?;
        }
        Ok(())
    }
}

/// Moves the calling process into the cgroups whose `cgroup.procs` files are
/// open as `fds` by writing `"0"` (meaning "myself") to each.
///
/// Async-signal-safe: only `write(2)` calls, no allocation, no locks, so it
/// may run in a `pre_exec` hook between `fork` and `exec`.
pub fn join_self(fds: &[RawFd]) -> Result<(), Errno> {
    for &raw in fds {
        if raw < 0 {
            return Err(Errno::EBADF);
        }
        // SAFETY: the caller promises `raw` is an open descriptor for the
        // duration of this call; the borrow does not outlive the loop body.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        loop {
            match nix::unistd::write(fd, b"0") {
                Ok(1) => break,
                Ok(_) => return Err(Errno::EIO),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}
