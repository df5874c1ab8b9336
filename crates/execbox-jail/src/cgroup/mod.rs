//! Resource control for sandboxes through Linux cgroups, with one interface
//! over cgroup v1 (one hierarchy per controller group) and cgroup v2 (the
//! unified hierarchy).
//!
//! # Layout
//!
//! Every execbox cgroup lives below a base directory `<mount>/<base>` (the
//! base name defaults to [`DEFAULT_BASE`]) in each hierarchy used. A sandbox
//! `<name>` gets the directory `<base>/<name>`, which carries the limits, and
//! processes only ever live in *leaves* below it: `<name>/agent` (created by
//! [`CgroupDriver::create`]) for the in-sandbox agent and one leaf per
//! execution, created either on the host ([`SandboxCgroup::create_leaf`]) or
//! from inside the sandbox through directory file descriptors
//! ([`ExecCgroups::create_leaf`]). cgroup v2 requires that layout (no
//! processes in inner nodes once controllers are enabled for the children);
//! v1 uses it too so both behave the same.
//!
//! # Host side and sandbox side
//!
//! * [`CgroupDriver`] finds the hierarchies ([`CgroupDriver::detect`]) and
//!   creates or re-opens sandbox cgroups.
//! * [`SandboxCgroup`] is the host-side handle on one sandbox: placing
//!   processes, delegation to the sandbox's uid, freezing, killing, stats and
//!   removal.
//! * [`ExecCgroups`] / [`ExecLeaf`] work on directory file descriptors only,
//!   for the agent inside the sandbox that has no `/sys` mounted, and
//!   [`join_self`] is the async-signal-safe function run between `fork` and
//!   `exec` to enter a leaf.

mod driver;
mod exec;
mod mountinfo;
mod node;
mod sandbox;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

pub use driver::CgroupDriver;
pub use exec::{join_self, ExecCgroups, ExecLeaf};
pub use mountinfo::{parse_mountinfo, CgroupMount};
pub use sandbox::{SandboxCgroup, DEFAULT_CPU_WEIGHT};

/// Default name of the directory, in each hierarchy, that holds all execbox
/// cgroups.
pub const DEFAULT_BASE: &str = "execbox";

/// Name of the leaf created by [`CgroupDriver::create`] for the sandbox's
/// PID 1 (the agent).
pub const AGENT_LEAF: &str = "agent";

/// Name of the cgroup, below the sandbox cgroup, that holds the workload: every execution
/// leaf lives in it and it carries the workload's own limits, so that pressure from user code
/// (and the files it writes to tmpfs) is contained there and never reaches the agent's leaf.
pub const WORK_LEAF: &str = "work";

/// Label used for the cgroup v2 hierarchy in [`SandboxCgroup::dirs`] and
/// [`ExecCgroups::from_dir_fds`]. v1 hierarchies are labelled with their
/// comma-separated controller list, e.g. `memory` or `cpu,cpuacct`.
pub const UNIFIED_LABEL: &str = "unified";

/// CFS period used for CPU limits (100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;

/// How long [`SandboxCgroup::freeze`] waits for the freeze to complete.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long [`SandboxCgroup::kill_all`] keeps trying before giving up.
pub const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `rmdir` is retried while the kernel reports `EBUSY`.
pub const RMDIR_TIMEOUT: Duration = Duration::from_secs(2);

/// The cgroup version a driver, sandbox or exec handle works with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CgroupVersion {
    /// Legacy cgroup v1: one hierarchy per controller (or group of
    /// co-mounted controllers).
    V1,
    /// cgroup v2: a single unified hierarchy.
    V2,
}

impl fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CgroupVersion::V1 => f.write_str("v1"),
            CgroupVersion::V2 => f.write_str("v2"),
        }
    }
}

/// Errors of the cgroup layer. Every variant that touches the filesystem
/// names the file or directory involved.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A filesystem operation on a cgroup file or directory failed.
    #[error("cgroup: {op} {path}: {source}")]
    Io {
        /// What was attempted (`read`, `write`, `mkdir`, `rmdir`, ...).
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Neither a usable cgroup v2 nor a usable cgroup v1 setup was found.
    #[error("no usable cgroup setup: {reason}")]
    NoUsableCgroups {
        /// Why each candidate was rejected.
        reason: String,
    },
    /// A limit or feature was requested whose controller is not available
    /// in the hierarchies this driver uses.
    #[error("cgroup controller `{controller}` is not available")]
    ControllerMissing {
        /// Name of the missing controller (`memory`, `cpu`, `pids`, ...).
        controller: String,
    },
    /// A cgroup, leaf or base name is not acceptable.
    #[error("invalid cgroup name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A limit value is out of range.
    #[error("invalid cgroup limit {what}: {reason}")]
    InvalidLimit {
        /// Which limit.
        what: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// A pid given to [`SandboxCgroup::add_process`] is not a process id.
    #[error("{pid} is not a valid process id")]
    InvalidPid {
        /// The rejected value.
        pid: i32,
    },
    /// The cgroup to be created exists already (cgroups are never reused:
    /// a killed v2 cgroup would kill anything placed into it again).
    #[error("cgroup {path} already exists")]
    AlreadyExists {
        /// The existing directory.
        path: PathBuf,
    },
    /// The cgroup to be opened does not exist.
    #[error("cgroup {path} does not exist")]
    NotFound {
        /// The missing directory.
        path: PathBuf,
    },
    /// A cgroup file had unexpected contents.
    #[error("cgroup: cannot parse {path}: {detail}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// Freezing did not complete in time (the cgroup was thawed again).
    #[error("cgroup {path} did not freeze within {waited:?}")]
    FreezeTimeout {
        /// The cgroup directory.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
    /// Processes survived [`SandboxCgroup::kill_all`].
    #[error("{remaining} process(es) still alive in cgroup {path} after kill")]
    KillIncomplete {
        /// The cgroup directory.
        path: PathBuf,
        /// How many processes remain.
        remaining: usize,
    },
    /// Sending a signal failed for another reason than the process being gone.
    #[error("cgroup: kill({pid}) failed: {source}")]
    Signal {
        /// Target pid.
        pid: i32,
        /// The error.
        #[source]
        source: nix::errno::Errno,
    },
}

impl CgroupError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CgroupError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn errno(
        op: &'static str,
        path: impl Into<PathBuf>,
        source: nix::errno::Errno,
    ) -> Self {
        CgroupError::Io {
            op,
            path: path.into(),
            source: std::io::Error::from(source),
        }
    }

    pub(crate) fn missing(controller: &str) -> Self {
        CgroupError::ControllerMissing {
            controller: controller.to_string(),
        }
    }

    /// The OS error code behind an [`CgroupError::Io`] error, if any.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            CgroupError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// Resource limits written on a sandbox cgroup. `None` leaves the kernel
/// default (unlimited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Memory limit in bytes (swap is limited to zero where possible).
    pub memory_bytes: Option<u64>,
    /// CPU bandwidth in millicores: 1000 = one full CPU. Implemented as a CFS
    /// quota over a [`CPU_PERIOD_US`] period; at least 10.
    pub cpu_millicores: Option<u64>,
    /// Maximum number of tasks (processes and threads).
    pub pids_max: Option<u64>,
}

/// Accounting figures of one cgroup (including its descendants).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// Current memory usage in bytes.
    pub memory_current: u64,
    /// Peak memory usage in bytes, where the kernel reports it.
    pub memory_peak: Option<u64>,
    /// Memory limit in bytes; `None` when unlimited.
    pub memory_limit: Option<u64>,
    /// CPU time consumed, in nanoseconds.
    pub cpu_usage_ns: u64,
    /// Number of processes killed by the OOM killer in this subtree.
    pub oom_kills: u64,
    /// Current number of tasks.
    pub pids_current: u64,
    /// Number of CFS periods in which the cgroup was throttled.
    pub nr_throttled: u64,
    /// Total time spent throttled, in nanoseconds.
    pub throttled_ns: u64,
}

/// One line of the `execbox doctor` report ([`CgroupDriver::report`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureStatus {
    /// Controller or feature name (`memory`, `cpu`, `kill`, ...).
    pub name: String,
    /// Whether it is usable.
    pub available: bool,
    /// Human-readable detail (where it is, or why it is missing).
    pub detail: String,
}

/// Checks a cgroup, leaf or base name: 1 to 128 characters out of
/// `[A-Za-z0-9_-]`, so it can neither escape its parent nor collide with a
/// cgroup interface file (those all contain a dot).
pub fn validate_name(name: &str) -> Result<(), CgroupError> {
    let bad = |reason| {
        Err(CgroupError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 128 {
        return bad("longer than 128 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return bad("only ASCII letters, digits, '-' and '_' are allowed");
    }
    Ok(())
}
