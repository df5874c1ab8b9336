//! A second, independent filesystem fence built with Landlock.
//!
//! The mount tree already limits what a sandbox can see; Landlock additionally
//! limits what it can *do* with what it sees, enforced by the kernel per
//! process and inherited across `fork`/`exec`, and independent of mounts,
//! capabilities and uid mappings. The fence grants:
//!
//! * read + execute (`Execute | ReadFile | ReadDir`) below [`FenceSpec::read_only`],
//! * every filesystem right of the targeted ABI below [`FenceSpec::read_write`],
//! * nothing anywhere else (for the rights the running kernel can handle).
//!
//! Compatibility is best effort ([`CompatLevel::BestEffort`]): on a kernel with
//! an older Landlock ABI the rights it does not know are dropped, and on a kernel
//! without Landlock the fence is a no-op; [`PreparedFence::enforced_abi`] tells the
//! caller which case applies so it can log it or refuse to run.
//!
//! # Applying it between fork and exec
//!
//! The ruleset is built once in the parent by [`prepare`] (this allocates and
//! opens paths). The `landlock` crate lets us take the ruleset's file descriptor
//! out of a `RulesetCreated` (`impl From<RulesetCreated> for Option<OwnedFd>`), so
//! the three syscalls need not be reimplemented; the child then only needs
//! `prctl(PR_SET_NO_NEW_PRIVS)` and `landlock_restrict_self(fd, 0)`, which
//! [`PreparedFence::restrict_raw`] performs without allocating. The ruleset fd is
//! `O_CLOEXEC` (the kernel always creates it so), so it does not leak into the
//! sandboxed program.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

use landlock::{
    Access, AccessFs, CompatLevel, Compatible, PathBeneath, PathFd, PathFdError, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetError, ABI,
};

/// The Landlock ABI whose filesystem rights the fence asks for. V5 is the newest
/// ABI adding filesystem rights that we test against (V5 added `IoctlDev`; V6–V8
/// add no filesystem rights). Newer rights must be opted into deliberately, after
/// testing, as the `landlock` crate recommends.
const TARGET_ABI: ABI = ABI::V5;
/// `TARGET_ABI` as a number, for reporting.
const TARGET_ABI_NUM: u32 = 5;

/// Which paths the sandbox may use, and how. Paths that do not exist are skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FenceSpec {
    /// Read and execute below each of these paths.
    pub read_only: Vec<PathBuf>,
    /// Full access (read, write, create, remove, execute, ...) below each of these.
    pub read_write: Vec<PathBuf>,
}

/// Errors from building a fence.
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    /// Opening a path listed in the spec failed for a reason other than "not found".
    #[error("opening {path} for a Landlock rule: {source}")]
    OpenPath {
        /// The path from the spec.
        path: PathBuf,
        /// Underlying error.
        source: PathFdError,
    },
    /// Creating the ruleset or adding a rule failed.
    #[error("building Landlock ruleset: {0}")]
    Ruleset(#[from] RulesetError),
}

/// Landlock support of the running kernel (for a `doctor` command).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LandlockStatus {
    /// Landlock works; `abi` is the kernel's ABI version.
    Available {
        /// ABI version reported by the kernel.
        abi: u32,
    },
    /// Landlock cannot be used.
    Unavailable {
        /// Human-readable reason.
        reason: String,
    },
}

/// Queries the kernel's Landlock ABI version
/// (`landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)`).
pub fn landlock_abi_status() -> LandlockStatus {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with the VERSION flag the kernel requires attr == NULL and size == 0
    // and only returns a number; no memory is read or written and no fd is created.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0 as libc::size_t,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if rc >= 1 {
        return match u32::try_from(rc) {
            Ok(abi) => LandlockStatus::Available { abi },
            Err(_) => LandlockStatus::Unavailable {
                reason: format!("kernel reported an invalid Landlock ABI {rc}"),
            },
        };
    }
    let errno = nix::errno::Errno::last();
    let reason = match errno {
        nix::errno::Errno::ENOSYS => "kernel built without Landlock (ENOSYS)".to_string(),
        nix::errno::Errno::EOPNOTSUPP => {
            "Landlock disabled at boot (EOPNOTSUPP; add `landlock` to the lsm= parameter)"
                .to_string()
        }
        e if rc < 0 => format!("landlock_create_ruleset failed: {e}"),
        _ => format!("kernel reported an invalid Landlock ABI {rc}"),
    };
    LandlockStatus::Unavailable { reason }
}

/// A ruleset built in the parent, ready to be enforced in a child.
#[derive(Debug)]
pub struct PreparedFence {
    /// `None` when Landlock is unavailable (best effort: nothing to enforce).
    fd: Option<OwnedFd>,
    enforced_abi: Option<u32>,
    skipped: Vec<PathBuf>,
}

impl PreparedFence {
    /// The ABI whose rights will be enforced: `min(kernel ABI, 5)`, or `None`
    /// if Landlock is unavailable and [`restrict_raw`](Self::restrict_raw) is a no-op.
    pub fn enforced_abi(&self) -> Option<u32> {
        self.enforced_abi
    }

    /// Spec paths that did not exist and got no rule.
    pub fn skipped_paths(&self) -> &[PathBuf] {
        &self.skipped
    }

    /// Enforces the fence on the calling thread: `prctl(PR_SET_NO_NEW_PRIVS)`
    /// then `landlock_restrict_self(fd, 0)`. Async-signal-safe and allocation-free,
    /// for use between `fork` and `exec` (e.g. in `CommandExt::pre_exec`). The
    /// restriction is inherited by everything the thread later forks or execs.
    ///
    /// Returns the errno on failure; `Ok(())` without doing anything when
    /// Landlock is unavailable (see [`enforced_abi`](Self::enforced_abi)).
    pub fn restrict_raw(&self) -> Result<(), i32> {
        let Some(fd) = self.fd.as_ref() else {
            return Ok(());
        };
        crate::sys::set_no_new_privs()?;
        // SAFETY: `fd` is an open Landlock ruleset fd owned by `self` (borrowed for
        // the duration of the call); flags 0 is valid; the syscall reads no user memory.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_landlock_restrict_self,
                fd.as_raw_fd() as libc::c_long,
                0 as libc::c_uint,
            )
        };
        if rc != 0 {
            return Err(nix::errno::Errno::last_raw());
        }
        Ok(())
    }
}

/// Opens `path` for a rule; `Ok(None)` if it does not exist.
fn open_path(path: &PathBuf) -> Result<Option<PathFd>, LandlockError> {
    match PathFd::new(path) {
        Ok(fd) => Ok(Some(fd)),
        Err(PathFdError::OpenCall { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(source) => Err(LandlockError::OpenPath {
            path: path.clone(),
            source,
        }),
    }
}

/// Builds the ruleset for `spec` in the calling (parent) process, without
/// restricting it. Apply it in the child with [`PreparedFence::restrict_raw`].
pub fn prepare(spec: &FenceSpec) -> Result<PreparedFence, LandlockError> {
    prepare_with(spec, Vec::new())
}

/// Like [`prepare`], with full access also below each directory already open in
/// `read_write_dirs` (opened by the caller without following links, so the rule is on
/// exactly what it checked).
pub fn prepare_with(
    spec: &FenceSpec,
    read_write_dirs: Vec<OwnedFd>,
) -> Result<PreparedFence, LandlockError> {
    let all = AccessFs::from_all(TARGET_ABI);
    let read = AccessFs::from_read(TARGET_ABI);

    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)?
        .create()?;

    let mut skipped = Vec::new();
    let lists = [(&spec.read_only, read), (&spec.read_write, all)];
    for (paths, access) in lists {
        for path in paths {
            match open_path(path)? {
                // With BestEffort the crate narrows `access` to what the kernel knows and,
                // for non-directories, to file rights.
                Some(fd) => ruleset = ruleset.add_rule(PathBeneath::new(fd, access))?,
                None => {
                    tracing::debug!(path = %path.display(), "landlock: path missing, skipped");
                    skipped.push(path.clone());
                }
            }
        }
    }

    for dir in read_write_dirs {
        ruleset = ruleset.add_rule(PathBeneath::new(dir, all))?;
    }

    let fd: Option<OwnedFd> = ruleset.into();
    let enforced_abi = match (&fd, landlock_abi_status()) {
        (Some(_), LandlockStatus::Available { abi }) => Some(abi.min(TARGET_ABI_NUM)),
        _ => None,
    };
    match enforced_abi {
        Some(abi) => tracing::debug!(abi, "landlock fence prepared"),
        None => tracing::warn!("landlock unavailable: filesystem fence not enforced"),
    }
    Ok(PreparedFence {
        fd,
        enforced_abi,
        skipped,
    })
}
