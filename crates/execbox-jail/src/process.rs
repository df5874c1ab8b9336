//! Starting user processes inside a sandbox, and reaping every process as PID 1.
//!
//! Used by the agent. A user process starts in a new session with default signal dispositions
//! and an empty signal mask, joins its own execution cgroup, drops every capability (bounding
//! set included), becomes the sandbox user, sets `no_new_privs`, enters the Landlock fence, and
//! inherits the agent's seccomp filter.
//!
//! The agent is PID 1 of its pid namespace, so orphans of user code are reparented to it. One
//! [`Reaper`] owns every `waitpid`: a child is registered under the same lock that spawns it,
//! so no exit status can be reaped before someone waits for it.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::sys;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitInfo {
    /// Normal exit with a code.
    Code(i32),
    /// Killed by a signal.
    Signal(i32),
}

impl ExitInfo {
    /// Shell-style exit code: the code, or 128 + signal.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitInfo::Code(c) => c,
            ExitInfo::Signal(s) => 128 + s,
        }
    }
}

type Waiter = Box<dyn FnOnce(ExitInfo) + Send>;

/// Reaps every child of this process and hands exit statuses to whoever registered for them.
#[derive(Default)]
pub struct Reaper {
    waiters: Mutex<HashMap<i32, Waiter>>,
}

impl Reaper {
    /// Creates a reaper. Call [`Reaper::reap`] whenever `SIGCHLD` arrives.
    pub fn new() -> Self {
        Self::default()
    }

    /// Collects every exited child without blocking and notifies their waiters; children
    /// nobody waits for (orphans adopted by PID 1) are simply reaped.
    pub fn reap(&self) {
        let mut done = Vec::new();
        {
            let mut waiters = match self.waiters.lock() {
                Ok(w) => w,
                Err(poisoned) => poisoned.into_inner(),
            };
            loop {
                let info = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(pid, code)) => (pid, ExitInfo::Code(code)),
                    Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, ExitInfo::Signal(sig as i32)),
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(_) => continue,
                };
                if let Some(w) = waiters.remove(&info.0.as_raw()) {
                    done.push((w, info.1));
                }
            }
        }
        for (w, info) in done {
            w(info);
        }
    }

    /// Spawns `launch` and registers `on_exit` for it, atomically with respect to [`reap`].
    ///
    /// [`reap`]: Reaper::reap
    pub fn spawn(
        &self,
        launch: Launch,
        on_exit: impl FnOnce(ExitInfo) + Send + 'static,
    ) -> Result<std::process::Child, LaunchError> {
        let mut waiters = match self.waiters.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        };
        let (cwd_read, cwd_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| LaunchError::Spawn(e.into()))?;
        let cwd = launch.cwd.clone();
        let spawned = launch.into_command(cwd_write.as_raw_fd()).spawn();
        drop(cwd_write);
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                // The child reports a working directory it could not enter on its own pipe.
                let mut word = [0u8; 4];
                return Err(match sys::read(cwd_read.as_raw_fd(), &mut word) {
                    Ok(4) => LaunchError::Cwd {
                        path: cwd,
                        source: std::io::Error::from_raw_os_error(i32::from_ne_bytes(word)),
                    },
                    _ => LaunchError::Spawn(e),
                });
            }
        };
        waiters.insert(child.id() as i32, Box::new(on_exit));
        Ok(child)
    }
}

/// Why a user process did not start.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The working directory could not be entered as the process's own user (missing, not a
    /// directory, no search permission, or reached through a magic link).
    #[error("cannot enter the working directory {}: {source}", path.display())]
    Cwd {
        /// The directory.
        path: PathBuf,
        /// Why (the kernel's answer to the user).
        #[source]
        source: std::io::Error,
    },
    /// fork or exec failed.
    #[error("{0}")]
    Spawn(#[from] std::io::Error),
}

/// Who a user process runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    /// Uid inside the sandbox.
    pub uid: u32,
    /// Primary gid inside the sandbox.
    pub gid: u32,
}

/// A user process to start.
pub struct Launch {
    /// Program and arguments (`argv[0]` is the program path).
    pub argv: Vec<String>,
    /// Complete environment (nothing is inherited from the agent).
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Identity to switch to.
    pub creds: Credentials,
    /// Supplementary groups; `None` leaves them alone (rootless sandboxes cannot set them).
    pub groups: Option<Vec<u32>>,
    /// Opened `cgroup.procs` files of the execution cgroup, one per hierarchy.
    pub cgroup_procs: Vec<OwnedFd>,
    /// The Landlock fence to enter, if any.
    pub fence: Option<std::sync::Arc<crate::landlock_fence::PreparedFence>>,
    /// Highest capability number of the kernel (`/proc/sys/kernel/cap_last_cap`).
    pub last_cap: u32,
    /// Standard input.
    pub stdin: Stdio,
    /// Standard output.
    pub stdout: Stdio,
    /// Standard error.
    pub stderr: Stdio,
    /// Make standard input (a terminal) the controlling terminal of the new session.
    pub controlling_tty: bool,
    /// Descriptors the program inherits as 3, 4, … (everything else above 2 is closed on exec).
    pub inherit_fds: Vec<OwnedFd>,
}

/// Most descriptors a [`Launch`] can pass on (fixed, so the child needs no allocation).
pub const MAX_INHERITED_FDS: usize = 8;

/// The kernel's highest capability number.
pub fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

fn errno_to_io(e: sys::Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e)
}

impl Launch {
    /// The command, whose child enters the working directory after its identity switch and
    /// writes the errno to `cwd_err` when it cannot.
    fn into_command(self, cwd_err: RawFd) -> Command {
        let mut cmd = Command::new(&self.argv[0]);
        // A path with a NUL cannot exist: the empty path fails in the child (ENOENT) like a
        // missing directory.
        let cwd =
            std::ffi::CString::new(self.cwd.as_os_str().as_encoded_bytes()).unwrap_or_default();
        cmd.args(&self.argv[1..])
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(self.stdin)
            .stdout(self.stdout)
            .stderr(self.stderr);
        let procs: Vec<RawFd> = self.cgroup_procs.iter().map(AsRawFd::as_raw_fd).collect();
        let cgroup_fds = self.cgroup_procs;
        let creds = self.creds;
        let groups = self.groups;
        let fence = self.fence;
        let last_cap = self.last_cap;
        let controlling_tty = self.controlling_tty;
        let inherit: Vec<RawFd> = self.inherit_fds.iter().map(AsRawFd::as_raw_fd).collect();
        let inherit_fds = self.inherit_fds;
        // Copies are first made above every number the program will see, so that moving them
        // down to 3, 4, … cannot overwrite one not yet moved.
        let staging_floor = 3 + inherit.len() as RawFd + inherit.iter().copied().max().unwrap_or(0);
        // SAFETY: the closure runs between fork and exec and only makes raw syscalls on data
        // prepared before the fork (no allocation, no locks).
        unsafe {
            cmd.pre_exec(move || {
                let _keep_open = (&cgroup_fds, &inherit_fds);
                sys::setsid().map_err(errno_to_io)?;
                if controlling_tty {
                    sys::set_controlling_tty(0).map_err(errno_to_io)?;
                }
                sys::reset_signals();
                for fd in &procs {
                    sys::write_all(*fd, b"0").map_err(errno_to_io)?;
                }
                // The agent may be exempt from the OOM killer; user code never is.
                if let Ok(fd) = open_write(c"/proc/self/oom_score_adj") {
                    let _ = sys::write_all(fd, b"0");
                    sys::close(fd);
                }
                sys::drop_bounding_set(last_cap).map_err(errno_to_io)?;
                if let Some(groups) = &groups {
                    sys::setgroups(groups).map_err(errno_to_io)?;
                }
                sys::setresgid(creds.gid).map_err(errno_to_io)?;
                sys::setresuid(creds.uid).map_err(errno_to_io)?;
                // Entered as the user, so the kernel's own permission checks decide; never
                // through a magic link (a host descriptor of the agent).
                if let Err(e) = sys::enter_dir(&cwd) {
                    let _ = sys::write_all(cwd_err, &e.to_ne_bytes());
                    return Err(errno_to_io(e));
                }
                sys::clear_capabilities().map_err(errno_to_io)?;
                sys::set_no_new_privs().map_err(errno_to_io)?;
                if let Some(fence) = &fence {
                    fence.restrict_raw().map_err(errno_to_io)?;
                }
                let mut staged = [0 as RawFd; MAX_INHERITED_FDS];
                if inherit.len() > MAX_INHERITED_FDS {
                    return Err(errno_to_io(libc::EINVAL));
                }
                for (slot, fd) in staged.iter_mut().zip(&inherit) {
                    *slot = sys::dup_above(*fd, staging_floor).map_err(errno_to_io)?;
                }
                for (i, fd) in staged.iter().take(inherit.len()).enumerate() {
                    // dup2 clears close-on-exec on the new number.
                    sys::dup2(*fd, 3 + i as RawFd).map_err(errno_to_io)?;
                }
                sys::cloexec_from(3 + inherit.len() as RawFd).map_err(errno_to_io)?;
                Ok(())
            });
        }
        cmd
    }
}

fn open_write(path: &std::ffi::CStr) -> Result<RawFd, sys::Errno> {
    // SAFETY: `path` is a valid NUL-terminated string.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        // SAFETY: reading this thread's errno.
        Err(unsafe { *libc::__errno_location() })
    } else {
        Ok(fd)
    }
}

/// Sends `sig` to the process group `pgid` (user processes lead their own session and group).
pub fn signal_group(pgid: i32, sig: i32) -> std::io::Result<()> {
    sys::kill(-pgid, sig).map_err(errno_to_io)
}

/// Sends `sig` to the single process `pid` (0 checks that it exists).
pub fn signal_process(pid: i32, sig: i32) -> std::io::Result<()> {
    if pid <= 0 {
        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
    }
    sys::kill(pid, sig).map_err(errno_to_io)
}

/// Sends SIGKILL to every process of the pid namespace except the caller (PID 1).
pub fn kill_everything() {
    let _ = signal_everything(libc::SIGKILL);
}

/// Sends `sig` to every process of the pid namespace except the caller (PID 1); ESRCH when
/// there is none.
pub fn signal_everything(sig: i32) -> std::io::Result<()> {
    sys::kill(-1, sig).map_err(errno_to_io)
}

/// Hardens the agent itself: not dumpable (no ptrace, no core, `/proc/1` unreadable by the
/// sandbox user), and every inherited descriptor from `first_unused` on is close-on-exec.
pub fn harden_agent(first_unused: RawFd) -> std::io::Result<()> {
    sys::set_non_dumpable().map_err(errno_to_io)?;
    // Started through a loader, the agent's own executable is open for it: nothing needs it
    // once running, and no child may inherit it.
    if let Some(fd) = std::env::var_os(crate::spawn::AGENT_EXE_FD_ENV) {
        if let Some(fd) = fd.to_str().and_then(|s| s.parse::<RawFd>().ok()) {
            if fd >= first_unused {
                sys::close(fd);
            }
        }
        std::env::remove_var(crate::spawn::AGENT_EXE_FD_ENV);
    }
    sys::cloexec_from(first_unused).map_err(errno_to_io)
}

/// Marks one descriptor close-on-exec.
pub fn set_cloexec(fd: RawFd) -> std::io::Result<()> {
    nix::fcntl::fcntl(
        // SAFETY: the caller owns `fd` for the duration of the call.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map(drop)
    .map_err(std::io::Error::from)
}

/// Tells the host that the agent is ready (one byte on [`crate::spawn::READY_FD`], then
/// `note` when there is one: why the entrypoint did not start) and closes the descriptor. One
/// write, within the pipe's atomic size, so the host reads it whole.
pub fn signal_ready(note: Option<&str>) -> std::io::Result<()> {
    let fd = crate::spawn::READY_FD;
    let mut message = b"r".to_vec();
    if let Some(note) = note {
        let bytes = note.as_bytes();
        message.extend_from_slice(&bytes[..bytes.len().min(crate::spawn::MAX_READY_NOTE)]);
    }
    let result = sys::write_all(fd, &message).map_err(errno_to_io);
    sys::close(fd);
    result
}

/// Takes ownership of the `index`-th descriptor passed by the host
/// ([`crate::spawn::SpawnRequest::pass_fds`]), marking it close-on-exec.
pub fn take_passed_fd(index: usize) -> std::io::Result<OwnedFd> {
    let fd = crate::spawn::FIRST_PASSED_FD + index as RawFd;
    set_cloexec(fd)?;
    // SAFETY: the host placed an open descriptor at this number for us and nothing else in
    // this process refers to it; ownership is taken exactly once per index by the agent.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}
