//! Settings of the host process itself (the server), not of a sandbox: its limit on open files
//! and handing freed heap memory back to the system.
//!
//! Nothing here runs between `fork` and `exec`; these are ordinary calls for a process that
//! serves many clients.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Highest hard limit on open files this process gives itself, even where the kernel
/// (`fs.nr_open`) would allow more.
pub const MAX_NOFILE: u64 = 1 << 20;

/// A soft and a hard `RLIMIT_NOFILE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    /// The limit in force.
    pub soft: u64,
    /// The ceiling the soft limit may be raised to.
    pub hard: u64,
}

/// Errors of [`raise_nofile_limit`].
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// `getrlimit` or `setrlimit` failed.
    #[error("RLIMIT_NOFILE: {0}")]
    Rlimit(#[from] nix::Error),
}

/// This process's limit on open files.
pub fn nofile_limit() -> Result<NofileLimit, HostError> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok(NofileLimit { soft, hard })
}

/// The kernel's ceiling for `RLIMIT_NOFILE` (`/proc/sys/fs/nr_open`), or `None` when unreadable.
pub fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Raises the limit on open files as far as this process may: the hard limit up to
/// `fs.nr_open` (at most [`MAX_NOFILE`]) when it has `CAP_SYS_RESOURCE` (root), and the soft
/// limit up to the hard one. Returns the limits before and after; never lowers either.
pub fn raise_nofile_limit() -> Result<(NofileLimit, NofileLimit), HostError> {
    let before = nofile_limit()?;
    let ceiling = nr_open().unwrap_or(before.hard).min(MAX_NOFILE);
    let want_hard = before.hard.max(ceiling);
    if want_hard > before.hard {
        // Only a privileged process may raise its hard limit; anyone else gets EPERM and
        // settles for the soft limit below.
        if setrlimit(Resource::RLIMIT_NOFILE, want_hard, want_hard).is_ok() {
            return Ok((before, nofile_limit()?));
        }
    }
    // The kernel refuses a soft limit above `fs.nr_open`, even under an infinite hard limit.
    let want_soft = before.hard.min(ceiling.max(before.soft));
    if want_soft > before.soft {
        setrlimit(Resource::RLIMIT_NOFILE, want_soft, before.hard)?;
    }
    Ok((before, nofile_limit()?))
}

/// Hands the allocator's free memory back to the system (`malloc_trim(0)` on glibc; nothing
/// elsewhere). Returns whether any memory was released.
///
/// glibc keeps memory freed by other threads in per-thread arenas and only shrinks an arena
/// from its top, so a burst of short-lived allocations spread over the heap stays resident after
/// it is freed. `malloc_trim` walks every arena and releases the whole free pages inside them.
/// It takes each arena's lock in turn: call it from a blocking thread, after a burst, not on
/// every request.
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `malloc_trim` takes no pointers and only touches the allocator's own state,
        // under the allocator's locks; it is safe to call from any thread at any time after
        // start-up.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Whether signal `sig` is ignored in this process (`SIG_IGN`, e.g. SIGINT for a job started
/// in the background by a shell): a server then keeps ignoring it.
pub fn signal_ignored(sig: i32) -> bool {
    // SAFETY: a query only (no new action); `old` is a valid out pointer, zeroed first.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

/// Gives signal `sig` its default action in this process (undoing an inherited `SIG_IGN`),
/// so that processes started from here see it too.
pub fn restore_default_signal(sig: i32) -> bool {
    // SAFETY: installs the default action, no handler code; `action` is zeroed then set.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = libc::SIG_DFL;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(sig, &action, std::ptr::null_mut()) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_never_lowers_and_keeps_soft_within_hard() {
        let before = nofile_limit().expect("getrlimit");
        let (b, after) = raise_nofile_limit().expect("raise");
        assert_eq!(b, before);
        assert!(after.soft >= before.soft && after.hard >= before.hard);
        assert!(after.soft <= after.hard);
        if let Some(n) = nr_open() {
            assert!(after.soft <= n.max(before.soft));
        }
        // Idempotent.
        let (_, again) = raise_nofile_limit().expect("raise again");
        assert_eq!(again, after);
    }

    #[test]
    fn releasing_free_memory_is_harmless() {
        let v: Vec<Vec<u8>> = (0..1000).map(|_| vec![1u8; 16 << 10]).collect();
        drop(v);
        let _ = release_free_memory();
    }
}
