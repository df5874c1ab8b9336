//! Starting a sandbox: one `clone3` into new user, pid, mount, network, ipc and uts namespaces,
//! then (in the child) the mount program, the pivot, credentials, a cgroup namespace, and the
//! exec of the agent as PID 1.
//!
//! Protocol between parent (host) and child:
//! 1. the child blocks on the *sync* pipe;
//! 2. the parent writes the uid/gid maps, puts the child into its cgroups and protects it from
//!    the OOM killer, then releases it;
//! 3. the child builds its root, becomes uid 0 of its namespace, enters a cgroup namespace and
//!    execs the agent; any failure is written to the *error* pipe (close-on-exec, so a
//!    successful exec reads as end of file);
//! 4. the agent writes one byte to [`READY_FD`] once it serves requests.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::rootfs::{describe_op, run_ops, MountOp};
use crate::sys::{self, Errno};

/// Descriptor number, in the agent, of the readiness pipe.
pub const READY_FD: RawFd = 3;
/// Longest note the agent sends with its readiness (see [`Spawned::entrypoint_error`]).
pub const MAX_READY_NOTE: usize = 1024;
/// Descriptor number, in the agent, of the first descriptor of [`SpawnRequest::pass_fds`].
pub const FIRST_PASSED_FD: RawFd = 4;
const MAX_PASSED_FDS: usize = 24;
/// Open-descriptor limit (soft and hard) of every process of a sandbox.
pub const SANDBOX_NOFILE: u64 = 65_536;

/// How host uids map into the sandbox's user namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum UserMapping {
    /// Root server: sandbox uids `0..count` are host uids `host_base..host_base+count`, a range
    /// no other sandbox uses.
    Range {
        /// First host uid (and gid) of the range.
        host_base: u32,
        /// Number of ids mapped.
        count: u32,
    },
    /// Rootless server: only the server's own uid/gid, mapped to 0.
    Single {
        /// The server's uid.
        host_uid: u32,
        /// The server's gid.
        host_gid: u32,
    },
}

impl UserMapping {
    /// The host uid that the sandbox uid `inner` corresponds to, if mapped.
    pub fn host_uid(&self, inner: u32) -> Option<u32> {
        match *self {
            UserMapping::Range { host_base, count } => (inner < count).then(|| host_base + inner),
            UserMapping::Single { host_uid, .. } => (inner == 0).then_some(host_uid),
        }
    }
}

/// Errors of [`spawn_sandbox`].
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// Preparing descriptors, pipes or strings failed.
    #[error("preparing the sandbox failed: {0}")]
    Prepare(#[source] std::io::Error),
    /// `clone3` refused the namespaces.
    #[error("creating the sandbox namespaces failed (clone3): {0}")]
    Clone(#[source] std::io::Error),
    /// Writing the uid/gid map or the cgroup membership failed.
    #[error("setting up the sandbox from the host failed: {what}: {source}")]
    Setup {
        /// Which step.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A step inside the new namespaces failed.
    #[error("sandbox setup step failed: {step}: {source}")]
    Child {
        /// Which step.
        step: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The agent did not report readiness.
    #[error("the sandbox agent did not become ready: {0}")]
    NotReady(String),
}

/// What to start.
pub struct SpawnRequest<'a> {
    /// The compiled mount program ([`crate::rootfs::RootfsPlan::compile`]).
    pub mount_ops: &'a [MountOp],
    /// The agent executable (opened on the host; executed after the pivot through its fd).
    pub agent_exe: &'a Path,
    /// Arguments of the agent, `argv[0]` included.
    pub argv: Vec<String>,
    /// Environment of the agent.
    pub env: Vec<(String, String)>,
    /// Uid/gid mapping.
    pub mapping: UserMapping,
    /// Host name inside the sandbox.
    pub hostname: &'a str,
    /// Descriptors handed to the agent as fds 4, 5, …
    pub pass_fds: Vec<OwnedFd>,
    /// Host directories handed to the agent after `pass_fds`, each as a *detached* bind mount
    /// rooted at the directory (made by the child with `open_tree`, before the pivot): the
    /// agent holds no descriptor from which `..` or a magic link leads anywhere on the host.
    pub detached_dirs: Vec<PathBuf>,
    /// The agent's standard output and error (e.g. a pipe the server logs from); `/dev/null`
    /// of the sandbox when absent. Its standard input is always the sandbox's `/dev/null`.
    pub log: Option<OwnedFd>,
    /// `cgroup.procs` files the agent's pid is written to before it runs.
    pub cgroup_procs: Vec<PathBuf>,
    /// How long to wait for the agent's readiness byte.
    pub ready_timeout: Duration,
    /// A network device for the sandbox, whose other end the server serves; none leaves the
    /// sandbox with loopback only.
    pub network: Option<TunSetup>,
    /// Run the agent through this dynamic loader (host path), with its libraries from
    /// [`AGENT_LIB_DIR`] inside the sandbox: a root made from an image has not the host's C
    /// library. None: the agent's own interpreter is in the root (the host-runtimes template).
    pub loader: Option<PathBuf>,
}

/// Directory inside the sandbox holding the agent's own shared libraries, when its root is an
/// image's (see [`SpawnRequest::loader`]).
pub const AGENT_LIB_DIR: &str = "/.execbox/lib";
/// Environment variable telling the agent which descriptor holds its own executable (open
/// for the loader): the agent closes it at start.
pub const AGENT_EXE_FD_ENV: &str = "EXECBOX_AGENT_EXE_FD";

/// The TUN device a sandbox with network gets, made in its network namespace by its first
/// process; the device's descriptor comes back to the host ([`Spawned::tun`]).
#[derive(Debug, Clone, Copy)]
pub struct TunSetup {
    /// The sandbox's address.
    pub address: std::net::Ipv4Addr,
    /// MTU of the device.
    pub mtu: u32,
}

/// Name of the sandbox's network device.
pub const TUN_NAME: &[u8] = b"eth0";
const TUN_NAME_C: &std::ffi::CStr = c"eth0";

/// A started sandbox: its PID 1, as seen from the host.
#[derive(Debug)]
pub struct Spawned {
    /// Host pid of the agent.
    pub pid: i32,
    /// A pidfd of the agent (readable once it has exited).
    pub pidfd: OwnedFd,
    /// The host end of the sandbox's network device, when it has one.
    pub tun: Option<OwnedFd>,
    /// Why the sandbox's entrypoint did not start, as the agent said with its readiness.
    pub entrypoint_error: Option<String>,
}

fn io(errno: Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(errno)
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| SpawnError::Prepare(std::io::Error::from(e)))
}

fn cstring(s: impl AsRef<[u8]>) -> Result<CString, SpawnError> {
    CString::new(s.as_ref())
        .map_err(|e| SpawnError::Prepare(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))
}

/// Child failure record written to the error pipe: stage, index, errno.
const STAGE_SYNC: u32 = 1;
const STAGE_MOUNT: u32 = 2;
const STAGE_CREDS: u32 = 3;
const STAGE_CGROUPNS: u32 = 4;
const STAGE_HOSTNAME: u32 = 5;
const STAGE_LOOPBACK: u32 = 6;
const STAGE_FDS: u32 = 7;
const STAGE_EXEC: u32 = 8;
const STAGE_DETACH: u32 = 9;
const STAGE_NETWORK: u32 = 10;

fn describe_stage(stage: u32, index: u32, ops: &[MountOp]) -> String {
    match stage {
        STAGE_SYNC => "waiting for the host".into(),
        STAGE_MOUNT => ops
            .get(index as usize)
            .map_or_else(|| format!("mount step {index}"), describe_op),
        STAGE_CREDS => "becoming root of the user namespace".into(),
        STAGE_CGROUPNS => "entering a cgroup namespace".into(),
        STAGE_HOSTNAME => "setting the host name".into(),
        STAGE_LOOPBACK => "bringing loopback up".into(),
        STAGE_FDS => "arranging descriptors".into(),
        STAGE_EXEC => "executing the agent".into(),
        STAGE_DETACH => format!("detaching host directory {index} for the agent"),
        STAGE_NETWORK => "making the network device (/dev/net/tun)".into(),
        _ => format!("stage {stage}"),
    }
}

/// Everything the child needs, built before the clone so the child never allocates.
struct ChildPlan<'a> {
    ops: &'a [MountOp],
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    exe_fd: RawFd,
    sync_read: RawFd,
    err_write: RawFd,
    ready_write: RawFd,
    pass_fds: [RawFd; MAX_PASSED_FDS],
    pass_count: usize,
    detached: &'a [CString],
    log_fd: RawFd,
    nofile: u64,
    /// `(socket to send the device on, address, MTU)` of the network device to make.
    tun: Option<(RawFd, [u8; 4], i32)>,
    hostname: &'a [u8],
    rootless: bool,
    /// The loader to exec instead of the agent, the agent then at descriptor `exe_at`.
    loader_fd: RawFd,
    exe_at: RawFd,
}

fn child_fail(err_fd: RawFd, stage: u32, index: u32, errno: Errno) -> ! {
    let mut rec = [0u8; 12];
    rec[..4].copy_from_slice(&stage.to_ne_bytes());
    rec[4..8].copy_from_slice(&index.to_ne_bytes());
    rec[8..].copy_from_slice(&errno.to_ne_bytes());
    let _ = sys::write_all(err_fd, &rec);
    sys::exit_now(127)
}

/// Runs in the child of `clone3`: async-signal-safe code only (see [`crate::sys`]).
fn child_main(plan: &ChildPlan<'_>) -> ! {
    sys::block_all_signals();
    // Until the exec: if the server dies mid-start, this half-made child must not wait forever
    // on the sync pipe (a concurrently started sibling may hold its write end open). Cleared
    // before the exec: the creating thread is a pooled one that may exit later.
    if sys::set_parent_death_signal(libc::SIGKILL).is_err() {
        sys::exit_now(126);
    }
    // Move our descriptors out of the range that the final layout (3, 4, …) will use.
    let err = match sys::dup_above(plan.err_write, 64) {
        Ok(fd) => fd,
        Err(_) => sys::exit_now(126),
    };
    let mut byte = [0u8; 1];
    match sys::read(plan.sync_read, &mut byte) {
        Ok(1) => {}
        Ok(_) => sys::exit_now(0),
        Err(e) => child_fail(err, STAGE_SYNC, 0, e),
    }
    // Detached copies of the host directories the agent gets (its cgroups), made while the
    // host paths are still visible; private propagation first, so nothing is shared back.
    if let Err(e) = sys::mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None) {
        child_fail(err, STAGE_DETACH, 0, e);
    }
    let mut detached = [-1 as RawFd; MAX_PASSED_FDS];
    for (i, path) in plan.detached.iter().enumerate() {
        match sys::open_tree_clone(path).and_then(|fd| sys::dup_above(fd, 64).map(|m| (fd, m))) {
            Ok((fd, moved)) => {
                sys::close(fd);
                detached[i] = moved;
            }
            Err(e) => child_fail(err, STAGE_DETACH, i as u32, e),
        }
    }
    // The network device, made in this (new) network namespace while the host's /dev is still
    // visible; its descriptor goes to the host, none stays here.
    if let Some((sock, addr, mtu)) = plan.tun {
        let made =
            sys::tun_create(TUN_NAME, TUN_NAME_C, addr, [255, 255, 255, 0], mtu).and_then(|tun| {
                let sent = sys::send_fd(sock, tun);
                sys::close(tun);
                sent
            });
        sys::close(sock);
        if let Err(e) = made {
            child_fail(err, STAGE_NETWORK, 0, e);
        }
    }
    if let Err(f) = run_ops(plan.ops) {
        child_fail(err, STAGE_MOUNT, f.index as u32, f.errno);
    }
    if !plan.rootless {
        if let Err(e) = sys::setgroups(&[]) {
            child_fail(err, STAGE_CREDS, 0, e);
        }
    }
    if let Err(e) = sys::setresgid(0).and_then(|_| sys::setresuid(0)) {
        child_fail(err, STAGE_CREDS, 1, e);
    }
    if let Err(e) = sys::unshare(libc::CLONE_NEWCGROUP) {
        child_fail(err, STAGE_CGROUPNS, 0, e);
    }
    if let Err(e) = sys::sethostname(plan.hostname) {
        child_fail(err, STAGE_HOSTNAME, 0, e);
    }
    if let Err(e) = sys::loopback_up() {
        child_fail(err, STAGE_LOOPBACK, 0, e);
    }
    // Final descriptor layout: READY_FD, then the passed descriptors; everything else is
    // close-on-exec.
    let exe = match sys::dup_above(plan.exe_fd, 64) {
        Ok(fd) => fd,
        Err(e) => child_fail(err, STAGE_FDS, 0, e),
    };
    // Above the final layout too, or a dup2 below could overwrite it.
    let log = if plan.log_fd >= 0 {
        match sys::dup_above(plan.log_fd, 64) {
            Ok(fd) => fd,
            Err(e) => child_fail(err, STAGE_FDS, 4, e),
        }
    } else {
        -1
    };
    let mut moved = [0 as RawFd; MAX_PASSED_FDS + 1];
    let detached_count = plan.detached.len();
    let total = plan.pass_count + detached_count;
    let sources =
        std::iter::once(plan.ready_write).chain(plan.pass_fds[..plan.pass_count].iter().copied());
    for (i, fd) in sources.enumerate() {
        match sys::dup_above(fd, 64) {
            Ok(m) => moved[i] = m,
            Err(e) => child_fail(err, STAGE_FDS, 1, e),
        }
    }
    moved[plan.pass_count + 1..total + 1].copy_from_slice(&detached[..detached_count]);
    for (i, fd) in moved[..total + 1].iter().enumerate() {
        if let Err(e) = sys::dup2(*fd, READY_FD + i as RawFd) {
            child_fail(err, STAGE_FDS, 2, e);
        }
    }
    // Standard descriptors: the sandbox's own /dev/null, and the log (or /dev/null again).
    // Nothing of the server's (its terminal, its log file) reaches the sandbox.
    let null = match sys::open_dev_null() {
        Ok(fd) => fd,
        Err(e) => child_fail(err, STAGE_FDS, 5, e),
    };
    let out = if log >= 0 { log } else { null };
    for (fd, target) in [(null, 0), (out, 1), (out, 2)] {
        if let Err(e) = sys::dup2(fd, target) {
            child_fail(err, STAGE_FDS, 6, e);
        }
    }
    // With a loader, the loader is what runs, and the agent's executable stays open for it.
    let (exe, first_closed) = if plan.loader_fd >= 0 {
        let loader = match sys::dup_above(plan.loader_fd, 64) {
            Ok(fd) => fd,
            Err(e) => child_fail(err, STAGE_FDS, 8, e),
        };
        if let Err(e) = sys::dup2(exe, plan.exe_at) {
            child_fail(err, STAGE_FDS, 9, e);
        }
        (loader, plan.exe_at + 1)
    } else {
        (exe, READY_FD + total as RawFd + 1)
    };
    if let Err(e) = sys::cloexec_from(first_closed) {
        child_fail(err, STAGE_FDS, 3, e);
    }
    // (A credential change has usually cleared it already; not in a rootless sandbox.)
    if let Err(e) = sys::set_parent_death_signal(0) {
        child_fail(err, STAGE_FDS, 4, e);
    }
    // The sandbox's own descriptor limit, not the server's (raised for its many connections).
    if let Err(e) = sys::set_nofile_limit(plan.nofile, plan.nofile) {
        child_fail(err, STAGE_FDS, 7, e);
    }
    sys::reset_signals();
    let e = sys::execveat_fd(exe, &plan.argv, &plan.envp);
    child_fail(err, STAGE_EXEC, 0, e)
}

fn write_host_file(path: String, contents: &str) -> Result<(), SpawnError> {
    std::fs::write(&path, contents).map_err(|source| SpawnError::Setup { what: path, source })
}

/// Starts a sandbox and waits until its agent is ready.
pub fn spawn_sandbox(req: SpawnRequest<'_>) -> Result<Spawned, SpawnError> {
    if req.pass_fds.len() + req.detached_dirs.len() > MAX_PASSED_FDS {
        return Err(SpawnError::Prepare(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "too many descriptors for the agent",
        )));
    }
    let exe = std::fs::File::open(req.agent_exe).map_err(SpawnError::Prepare)?;
    let loader = match &req.loader {
        Some(path) => Some(std::fs::File::open(path).map_err(SpawnError::Prepare)?),
        None => None,
    };
    // With a loader, the agent's executable is the first descriptor after the final layout.
    let exe_at = READY_FD + (req.pass_fds.len() + req.detached_dirs.len()) as RawFd + 1;
    let mut argv = req.argv.clone();
    let mut env = req.env.clone();
    if loader.is_some() {
        let argv0 = argv.first().cloned().unwrap_or_else(|| "execbox".into());
        let mut with_loader = vec![
            argv0.clone(),
            "--library-path".into(),
            AGENT_LIB_DIR.into(),
            "--argv0".into(),
            argv0,
            format!("/proc/self/fd/{exe_at}"),
        ];
        with_loader.extend(argv.into_iter().skip(1));
        argv = with_loader;
        env.push((AGENT_EXE_FD_ENV.into(), exe_at.to_string()));
    }
    let argv_c = argv.iter().map(cstring).collect::<Result<Vec<_>, _>>()?;
    let env_c = env
        .iter()
        .map(|(k, v)| cstring(format!("{k}={v}")))
        .collect::<Result<Vec<_>, _>>()?;
    let ptrs = |v: &[CString]| {
        v.iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect::<Vec<_>>()
    };
    let detached = req
        .detached_dirs
        .iter()
        .map(|p| cstring(p.as_os_str().as_encoded_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let (sync_read, sync_write) = pipe()?;
    let (err_read, err_write) = pipe()?;
    let tun_pair = match req.network {
        Some(_) => Some(
            nix::sys::socket::socketpair(
                nix::sys::socket::AddressFamily::Unix,
                nix::sys::socket::SockType::Stream,
                None,
                nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            )
            .map_err(|e| SpawnError::Prepare(e.into()))?,
        ),
        None => None,
    };
    let (ready_read, ready_write) = pipe()?;
    let mut pass = [-1; MAX_PASSED_FDS];
    for (slot, fd) in pass.iter_mut().zip(&req.pass_fds) {
        *slot = fd.as_raw_fd();
    }
    let rootless = matches!(req.mapping, UserMapping::Single { .. });
    let plan = ChildPlan {
        ops: req.mount_ops,
        argv: ptrs(&argv_c),
        envp: ptrs(&env_c),
        exe_fd: exe.as_raw_fd(),
        sync_read: sync_read.as_raw_fd(),
        err_write: err_write.as_raw_fd(),
        ready_write: ready_write.as_raw_fd(),
        pass_fds: pass,
        pass_count: req.pass_fds.len(),
        detached: &detached,
        // Lowering is always allowed; raising above the hard limit would need privileges the
        // child no longer has in its user namespace.
        tun: match (&tun_pair, req.network) {
            (Some((_, child_end)), Some(n)) => Some((
                child_end.as_raw_fd(),
                n.address.octets(),
                n.mtu.min(i32::MAX as u32) as i32,
            )),
            _ => None,
        },
        nofile: nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(_, hard)| hard.min(SANDBOX_NOFILE)),
        log_fd: req.log.as_ref().map_or(-1, |fd| fd.as_raw_fd()),
        hostname: req.hostname.as_bytes(),
        rootless,
        loader_fd: loader.as_ref().map_or(-1, |f| f.as_raw_fd()),
        exe_at,
    };

    let mut pidfd: RawFd = -1;
    let mut args = sys::CloneArgs {
        flags: (libc::CLONE_NEWUSER
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWNS
            | libc::CLONE_NEWNET
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS
            | libc::CLONE_PIDFD) as u64,
        pidfd: &mut pidfd as *mut RawFd as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    // SAFETY: the child runs only `child_main`, which is async-signal-safe: it uses data built
    // above (no allocation), raw syscalls, and ends in execve or _exit.
    let pid = match unsafe { sys::clone3(&mut args) } {
        Ok(0) => child_main(&plan),
        Ok(pid) => pid,
        Err(e) => return Err(SpawnError::Clone(io(e))),
    };
    // SAFETY: with CLONE_PIDFD the kernel stored a new descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    drop((sync_read, err_write, ready_write));
    let tun_host_end = tun_pair.map(|(host_end, child_end)| {
        drop(child_end);
        host_end
    });
    let mut spawned = Spawned {
        pid,
        pidfd,
        tun: None,
        entrypoint_error: None,
    };

    let result = (|| {
        let proc_dir = format!("/proc/{pid}");
        match req.mapping {
            UserMapping::Range { host_base, count } => {
                write_host_file(
                    format!("{proc_dir}/uid_map"),
                    &format!("0 {host_base} {count}\n"),
                )?;
                write_host_file(
                    format!("{proc_dir}/gid_map"),
                    &format!("0 {host_base} {count}\n"),
                )?;
            }
            UserMapping::Single { host_uid, host_gid } => {
                write_host_file(format!("{proc_dir}/setgroups"), "deny")?;
                write_host_file(format!("{proc_dir}/uid_map"), &format!("0 {host_uid} 1\n"))?;
                write_host_file(format!("{proc_dir}/gid_map"), &format!("0 {host_gid} 1\n"))?;
            }
        }
        for procs in &req.cgroup_procs {
            std::fs::write(procs, pid.to_string()).map_err(|source| SpawnError::Setup {
                what: procs.display().to_string(),
                source,
            })?;
        }
        // The agent is PID 1: if the OOM killer picked it the whole sandbox would die, so it
        // is exempt; user processes reset this for themselves before they exec.
        // Best effort: lowering the score needs CAP_SYS_RESOURCE, which some hosts withhold.
        if !rootless {
            if let Err(e) = std::fs::write(format!("{proc_dir}/oom_score_adj"), "-1000") {
                tracing::debug!(pid, error = %e, "cannot exempt the agent from the OOM killer");
            }
        }
        sys::write_all(sync_write.as_raw_fd(), b"g").map_err(|e| SpawnError::Setup {
            what: "releasing the sandbox".into(),
            source: io(e),
        })?;
        drop(sync_write);

        let mut rec = [0u8; 12];
        let mut got = 0;
        while got < rec.len() {
            match sys::read(err_read.as_raw_fd(), &mut rec[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => return Err(SpawnError::Prepare(io(e))),
            }
        }
        if got == rec.len() {
            let word = |i: usize| u32::from_ne_bytes([rec[i], rec[i + 1], rec[i + 2], rec[i + 3]]);
            let (stage, index, errno) = (word(0), word(4), word(8) as i32);
            return Err(SpawnError::Child {
                step: describe_stage(stage, index, req.mount_ops),
                source: io(errno),
            });
        }
        if let Some(sock) = &tun_host_end {
            spawned.tun = Some(recv_fd(sock).map_err(|source| SpawnError::Setup {
                what: "receiving the network device".into(),
                source,
            })?);
        }
        spawned.entrypoint_error = wait_ready(&ready_read, req.ready_timeout)?;
        Ok(())
    })();
    match result {
        Ok(()) => Ok(spawned),
        Err(e) => {
            kill_and_reap(&spawned);
            Err(e)
        }
    }
}

/// Receives one descriptor sent with `SCM_RIGHTS` on `sock` (blocking).
fn recv_fd(sock: &OwnedFd) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!(RawFd);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    for cmsg in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel installed this descriptor in this process for us; nothing
                // else refers to it.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(std::io::Error::other(
        "the sandbox sent no network device (it failed before)",
    ))
}

/// Waits for the agent's readiness byte; returns the note that came with it, if any.
fn wait_ready(ready: &OwnedFd, timeout: Duration) -> Result<Option<String>, SpawnError> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(SpawnError::NotReady(format!(
                "no answer within {timeout:?}"
            )));
        }
        let mut pfd = libc::pollfd {
            fd: ready.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(SpawnError::NotReady(e.to_string()));
        }
        if n == 0 {
            continue;
        }
        // The byte and its note come in one write (see `process::signal_ready`).
        let mut message = [0u8; 1 + MAX_READY_NOTE];
        return match sys::read(ready.as_raw_fd(), &mut message) {
            Ok(0) => Err(SpawnError::NotReady(
                "the agent exited during start-up".into(),
            )),
            Ok(1) => Ok(None),
            Ok(n) => Ok(Some(String::from_utf8_lossy(&message[1..n]).into_owned())),
            Err(e) => Err(SpawnError::NotReady(io(e).to_string())),
        };
    }
}

/// Kills the sandbox's PID 1 (which takes every process of its pid namespace with it) and reaps
/// it. Only for sandboxes started by this process.
pub fn kill_and_reap(spawned: &Spawned) {
    let _ = sys::kill(spawned.pid, libc::SIGKILL);
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(spawned.pid), None);
}

/// A pidfd of the running process `pid` whose start time is `start_time` (so that a reused pid
/// is never mistaken for it); `None` when that process is gone.
pub fn pidfd_of(pid: i32, start_time: u64) -> Option<OwnedFd> {
    let fd = sys::pidfd_open(pid).ok()?;
    // SAFETY: `pidfd_open` returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Checked after opening: the pidfd pins this very process from now on.
    (process_start_time(pid) == Some(start_time)).then_some(fd)
}

/// Resolves once the process behind `pidfd` has exited (a pidfd becomes readable then), on the
/// current tokio runtime without a thread of its own; gives the pidfd back.
pub async fn exited(pidfd: OwnedFd) -> std::io::Result<OwnedFd> {
    use tokio::io::unix::AsyncFd;
    // SAFETY: the AsyncFd takes ownership of `pidfd` and deregisters it before the descriptor
    // can be closed (on drop or `into_inner`), so the registered number is this pidfd for the
    // registration's whole life, which is what tokio's I/O-safety contract asks.
    let fd = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    fd.readable().await?.retain_ready();
    Ok(fd.into_inner())
}

/// How the process behind `pidfd` ended, reaping it when it is a child of this process;
/// `None` when it still runs or is not ours to reap.
pub fn exit_of(pidfd: &OwnedFd) -> Option<String> {
    use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
    match waitid(
        Id::PIDFd(std::os::fd::AsFd::as_fd(pidfd)),
        WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG,
    ) {
        Ok(WaitStatus::Exited(_, code)) => Some(format!("exit code {code}")),
        Ok(WaitStatus::Signaled(_, sig, _)) => Some(format!("killed by {sig}")),
        _ => None,
    }
}

/// Start time of a process in clock ticks since boot (field 22 of `/proc/<pid>/stat`); with the
/// pid it identifies a process across pid reuse.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let end = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[end + 1..]).ok()?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The host end of a sandbox's network device, read and written as packets on the current
/// tokio runtime.
#[derive(Debug)]
pub struct TunDevice {
    fd: tokio::io::unix::AsyncFd<OwnedFd>,
}

impl TunDevice {
    /// Takes the descriptor from [`Spawned::tun`]; it is made non-blocking.
    pub fn new(fd: OwnedFd) -> std::io::Result<TunDevice> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let flags = fcntl(&fd, FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
        fcntl(
            &fd,
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
        )
        .map_err(std::io::Error::from)?;
        // SAFETY: the AsyncFd owns the descriptor and deregisters it before it is closed, so the
        // registered number stays this device for the registration's whole life.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                fd,
                tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE,
            )
        }
        .map_err(|e| e.into_parts().1)?;
        Ok(TunDevice { fd })
    }

    /// Reads one packet.
    pub async fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard
                .try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(std::io::Error::from))
            {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes one packet.
    pub async fn send(&self, packet: &[u8]) -> std::io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard
                .try_io(|fd| nix::unistd::write(fd.get_ref(), packet).map_err(std::io::Error::from))
            {
                Ok(r) => return r.map(drop),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Every address of the host's interfaces (in the caller's network namespace).
pub fn interface_addresses() -> std::io::Result<Vec<std::net::IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)?;
    Ok(addrs
        .filter_map(|a| {
            let addr = a.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(std::net::IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6()
                    .map(|v6| std::net::IpAddr::V6(v6.ip()))
            }
        })
        .collect())
}
