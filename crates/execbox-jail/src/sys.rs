//! Thin wrappers over the raw syscalls the jail needs and that neither `libc` nor `nix` wrap
//! in an async-signal-safe way.
//!
//! Every function here may run between `clone`/`fork` and `execve` in a child of a
//! multi-threaded process, so none of them allocates, takes a lock, or touches thread-local
//! state: each is one syscall, and errors come back as a raw errno.

use std::ffi::CStr;
use std::os::fd::RawFd;

/// A raw errno value.
pub type Errno = i32;

fn errno() -> Errno {
    // SAFETY: `__errno_location` returns a valid pointer to this thread's errno.
    unsafe { *libc::__errno_location() }
}

fn check(ret: libc::c_long) -> Result<libc::c_long, Errno> {
    if ret < 0 {
        Err(errno())
    } else {
        Ok(ret)
    }
}

/// `struct clone_args` of `clone3(2)` (kernel ABI, version 2 without set_tid).
#[repr(C)]
#[derive(Default)]
pub struct CloneArgs {
    /// Clone flags (`CLONE_*`).
    pub flags: u64,
    /// Where the kernel stores the child's pidfd (`CLONE_PIDFD`).
    pub pidfd: u64,
    /// Where the kernel stores the child tid (`CLONE_CHILD_SETTID`).
    pub child_tid: u64,
    /// Where the kernel stores the parent tid (`CLONE_PARENT_SETTID`).
    pub parent_tid: u64,
    /// Signal sent to the parent when the child exits.
    pub exit_signal: u64,
    /// Stack of the child; 0 to share the parent's stack copy-on-write like `fork`.
    pub stack: u64,
    /// Stack size.
    pub stack_size: u64,
    /// TLS for `CLONE_SETTLS`.
    pub tls: u64,
    /// Array of tids for `set_tid`.
    pub set_tid: u64,
    /// Length of `set_tid`.
    pub set_tid_size: u64,
    /// Cgroup fd for `CLONE_INTO_CGROUP`.
    pub cgroup: u64,
}

/// `clone3(2)` with fork semantics (no `CLONE_VM`, no new stack).
///
/// # Safety
/// In the child (return value 0) only async-signal-safe code may run until `execve` or `_exit`,
/// because other threads of the parent may have held locks (for instance the allocator's) at the
/// moment of the clone.
pub unsafe fn clone3(args: &mut CloneArgs) -> Result<libc::pid_t, Errno> {
    // SAFETY: `args` points to a properly sized, initialised `clone_args`; without CLONE_VM and
    // with a null stack the child continues on a copy-on-write copy of this stack, like fork().
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    check(ret).map(|pid| pid as libc::pid_t)
}

/// `mount(2)`.
pub fn mount(
    src: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> Result<(), Errno> {
    let p = |s: Option<&CStr>| s.map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is either null or a valid NUL-terminated string that outlives the call.
    let ret = unsafe {
        libc::mount(
            p(src),
            target.as_ptr(),
            p(fstype),
            flags,
            p(data).cast::<libc::c_void>(),
        )
    };
    check(ret as libc::c_long).map(drop)
}

/// `MOUNT_ATTR_RDONLY` of `mount_setattr(2)`.
pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
/// `MOUNT_ATTR_NOSUID`.
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
/// `MOUNT_ATTR_NODEV`.
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
/// `MOUNT_ATTR_NOEXEC`.
pub const MOUNT_ATTR_NOEXEC: u64 = 0x8;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `mount_setattr(2)`: adds the `attr_set` flags to the mount at `path` (and below it when
/// `recursive`). Unlike a `MS_REMOUNT`, it never has to restate flags that are locked because the
/// mount came from a more privileged namespace.
pub fn mount_setattr(path: &CStr, attr_set: u64, recursive: bool) -> Result<(), Errno> {
    let attr = MountAttr {
        attr_set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let flags = if recursive { libc::AT_RECURSIVE } else { 0 } as libc::c_uint;
    // SAFETY: `path` is NUL-terminated; `attr` is a valid `struct mount_attr` of the size passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    check(ret).map(drop)
}

/// `open_tree(AT_FDCWD, path, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)`: a *detached* bind mount
/// whose root is `path`. Nothing is above its root (`..` there stays there), and it is in no
/// mount namespace, so a descriptor of it leads nowhere else.
pub fn open_tree_clone(path: &CStr) -> Result<RawFd, Errno> {
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    // SAFETY: `path` is a valid NUL-terminated string; the flags are integers.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    check(ret).map(|fd| fd as RawFd)
}

/// `open_tree(fd, "", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH)`: a detached bind
/// mount of the directory open at `fd` (not recursive: nothing mounted below it comes along).
pub fn open_tree_clone_fd(fd: RawFd) -> Result<RawFd, Errno> {
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    // SAFETY: the path is an empty NUL-terminated string; the flags are integers.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            fd,
            c"".as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_EMPTY_PATH as libc::c_uint,
        )
    };
    check(ret).map(|fd| fd as RawFd)
}

/// Opens `/dev/null` for reading and writing (close-on-exec).
pub fn open_dev_null() -> Result<RawFd, Errno> {
    // SAFETY: the path is a valid NUL-terminated string; the flags are integers.
    let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    check(fd as libc::c_long).map(|fd| fd as RawFd)
}

/// `setrlimit(RLIMIT_NOFILE)`: the soft and hard limits on open descriptors.
pub fn set_nofile_limit(soft: u64, hard: u64) -> Result<(), Errno> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `lim` is a valid `struct rlimit`.
    check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } as libc::c_long).map(drop)
}

/// `pidfd_open(pid, 0)`: a descriptor that becomes readable when the process exits.
pub fn pidfd_open(pid: libc::pid_t) -> Result<RawFd, Errno> {
    // SAFETY: plain syscall with integer arguments.
    check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) }).map(|fd| fd as RawFd)
}

/// `pivot_root(2)`.
pub fn pivot_root(new_root: &CStr, put_old: &CStr) -> Result<(), Errno> {
    // SAFETY: both arguments are valid NUL-terminated strings.
    let ret = unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) };
    check(ret).map(drop)
}

/// `umount2(path, MNT_DETACH)`.
pub fn umount_detach(path: &CStr) -> Result<(), Errno> {
    // SAFETY: `path` is a valid NUL-terminated string.
    let ret = unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    check(ret as libc::c_long).map(drop)
}

/// Writes all of `buf` to `fd`, retrying on short writes and `EINTR`.
pub fn write_all(fd: RawFd, mut buf: &[u8]) -> Result<(), Errno> {
    while !buf.is_empty() {
        // SAFETY: `buf` is a valid readable slice of the given length.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = errno();
            if e == libc::EINTR {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// Reads into `buf`, retrying on `EINTR`; returns the byte count (0 at end of file).
pub fn read(fd: RawFd, buf: &mut [u8]) -> Result<usize, Errno> {
    loop {
        // SAFETY: `buf` is a valid writable slice of the given length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = errno();
        if e != libc::EINTR {
            return Err(e);
        }
    }
}

/// `close(2)`, ignoring errors (nothing useful can be done about them here).
pub fn close(fd: RawFd) {
    // SAFETY: closing a descriptor this code owns; a bad fd only yields EBADF.
    unsafe { libc::close(fd) };
}

/// `chdir(2)`.
pub fn chdir(path: &CStr) -> Result<(), Errno> {
    // SAFETY: `path` is a valid NUL-terminated string.
    check(unsafe { libc::chdir(path.as_ptr()) } as libc::c_long).map(drop)
}

/// Enters the directory `path` with `openat2(RESOLVE_NO_MAGICLINKS)` and `fchdir`: the kernel
/// resolves it with the caller's own credentials (so its permission checks apply), and a path
/// through a magic link (`/proc/<pid>/fd/N`, `/proc/<pid>/cwd`, …) is refused with `ELOOP`.
pub fn enter_dir(path: &CStr) -> Result<(), Errno> {
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: `path` is NUL-terminated; `how` is a valid `struct open_how` of the size passed.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    })? as RawFd;
    // SAFETY: plain syscall on the descriptor just opened.
    let ret = check(unsafe { libc::fchdir(fd) } as libc::c_long);
    close(fd);
    ret.map(drop)
}

/// Raw `setresuid(2)`. glibc's wrapper would try to synchronise credentials with threads that
/// do not exist in a child of `clone`, so the raw syscall is used.
pub fn setresuid(uid: u32) -> Result<(), Errno> {
    // SAFETY: plain syscall with integer arguments.
    check(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) }).map(drop)
}

/// Raw `setresgid(2)` (see [`setresuid`] for why raw).
pub fn setresgid(gid: u32) -> Result<(), Errno> {
    // SAFETY: plain syscall with integer arguments.
    check(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) }).map(drop)
}

/// Raw `setgroups(2)` (see [`setresuid`] for why raw).
pub fn setgroups(groups: &[libc::gid_t]) -> Result<(), Errno> {
    // SAFETY: `groups` is a valid slice of gids of the given length.
    check(unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) }).map(drop)
}

/// `unshare(2)`.
pub fn unshare(flags: libc::c_int) -> Result<(), Errno> {
    // SAFETY: plain syscall with an integer argument.
    check(unsafe { libc::unshare(flags) } as libc::c_long).map(drop)
}

/// `sethostname(2)`.
pub fn sethostname(name: &[u8]) -> Result<(), Errno> {
    // SAFETY: `name` is a valid slice; the kernel reads exactly `len` bytes.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } as libc::c_long).map(drop)
}

/// Brings the loopback interface up (`SIOCSIFFLAGS` with `IFF_UP|IFF_RUNNING`).
pub fn loopback_up() -> Result<(), Errno> {
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    let fd = check(fd as libc::c_long)? as RawFd;
    // SAFETY: an all-zero `ifreq` is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: `req` is a valid `ifreq` for SIOCSIFFLAGS and `fd` is an open socket.
    let ret = unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) };
    close(fd);
    check(ret as libc::c_long).map(drop)
}

/// `struct ifreq` with a name and one of its union members, as the interface ioctls take it.
#[repr(C)]
struct IfReq<T: Copy> {
    name: [libc::c_char; libc::IFNAMSIZ],
    value: T,
    _pad: [u8; 16],
}

fn ifreq<T: Copy>(name: &[u8], value: T) -> IfReq<T> {
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        value,
        _pad: [0; 16],
    };
    for (dst, src) in req
        .name
        .iter_mut()
        .zip(name.iter().take(libc::IFNAMSIZ - 1))
    {
        *dst = *src as libc::c_char;
    }
    req
}

fn sockaddr_in(addr: [u8; 4]) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr),
        },
        sin_zero: [0; 8],
    }
}

/// The kernel's `struct rtentry` (SIOCADDRT), which the `libc` crate lacks for glibc.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr_in,
    rt_gateway: libc::sockaddr_in,
    rt_genmask: libc::sockaddr_in,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *const libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// Creates the TUN device `name` (layer 3, no packet information) in the caller's network
/// namespace, gives it `addr` with the netmask `mask` and the MTU `mtu`, brings it up, makes it
/// the default route (on-link: a TUN has no neighbours to resolve), and returns its descriptor.
/// `name_c` is `name` NUL-terminated.
pub fn tun_create(
    name: &[u8],
    name_c: &CStr,
    addr: [u8; 4],
    mask: [u8; 4],
    mtu: i32,
) -> Result<RawFd, Errno> {
    // SAFETY: the path is a valid NUL-terminated string; the flags are integers.
    let tun = check(
        unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) }
            as libc::c_long,
    )? as RawFd;
    let result = (|| {
        let req = ifreq(name, (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short);
        // SAFETY: `req` is a valid `ifreq` for TUNSETIFF on the open tun descriptor.
        check(unsafe { libc::ioctl(tun, libc::TUNSETIFF, &req) } as libc::c_long)?;
        // SAFETY: plain socket creation.
        let sock =
            check(
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) }
                    as libc::c_long,
            )? as RawFd;
        let configured = (|| {
            let set = |request: libc::c_ulong, value: [u8; 4]| -> Result<(), Errno> {
                let req = ifreq(name, sockaddr_in(value));
                // SAFETY: `req` is a valid `ifreq` holding a `sockaddr_in` for an address
                // ioctl on an open socket.
                check(unsafe { libc::ioctl(sock, request, &req) } as libc::c_long).map(drop)
            };
            set(libc::SIOCSIFADDR, addr)?;
            set(libc::SIOCSIFNETMASK, mask)?;
            let req = ifreq(name, mtu);
            // SAFETY: `req` is a valid `ifreq` holding an int for SIOCSIFMTU.
            check(unsafe { libc::ioctl(sock, libc::SIOCSIFMTU, &req) } as libc::c_long)?;
            let req = ifreq(name, (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short);
            // SAFETY: `req` is a valid `ifreq` holding the flags for SIOCSIFFLAGS.
            check(unsafe { libc::ioctl(sock, libc::SIOCSIFFLAGS, &req) } as libc::c_long)?;
            let any = sockaddr_in([0, 0, 0, 0]);
            let route = RtEntry {
                rt_pad1: 0,
                rt_dst: any,
                rt_gateway: any,
                rt_genmask: any,
                rt_flags: libc::RTF_UP,
                rt_pad2: 0,
                rt_pad3: 0,
                rt_pad4: std::ptr::null_mut(),
                rt_metric: 0,
                rt_dev: name_c.as_ptr(),
                rt_mtu: 0,
                rt_window: 0,
                rt_irtt: 0,
            };
            // SAFETY: `route` is a valid `struct rtentry` whose device name outlives the call.
            check(unsafe { libc::ioctl(sock, libc::SIOCADDRT, &route) } as libc::c_long).map(drop)
        })();
        close(sock);
        configured
    })();
    match result {
        Ok(()) => Ok(tun),
        Err(e) => {
            close(tun);
            Err(e)
        }
    }
}

/// Sends the descriptor `fd` over the unix socket `sock` (`SCM_RIGHTS`, one byte of data).
pub fn send_fd(sock: RawFd, fd: RawFd) -> Result<(), Errno> {
    // Room for one control message holding one descriptor, aligned as `cmsghdr` needs.
    let mut control = [0u64; 4];
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: an all-zero `msghdr` is valid; every pointer set below points into live locals.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as _;
    // SAFETY: `msg` has a control buffer large enough for one header and one descriptor, so the
    // first header and its data area lie inside `control`.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
    }
    loop {
        // SAFETY: `msg` is fully initialised and its buffers outlive the call.
        let ret = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if ret >= 0 {
            return Ok(());
        }
        let e = errno();
        if e != libc::EINTR {
            return Err(e);
        }
    }
}

/// Resets every catchable signal to its default disposition and unblocks all signals, so the
/// next program starts with a clean slate even when this process inherited ignored signals (a
/// server started from a non-interactive shell ignores SIGINT and SIGQUIT).
pub fn reset_signals() {
    // The kernel's `struct sigaction` (x86_64 and aarch64 layout): glibc's `signal()` refuses
    // the signals it reserves (32, 33), which can still arrive ignored from a parent.
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }
    let dfl = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: `dfl` is a valid kernel sigaction; the old action is not requested.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &dfl as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                8usize,
            )
        };
    }
    // SAFETY: an empty set is initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// `prctl(PR_SET_PDEATHSIG)`: `sig` is sent to the caller when the thread that created it
/// exits (0 clears it).
pub fn set_parent_death_signal(sig: i32) -> Result<(), Errno> {
    // SAFETY: plain syscall with integer arguments.
    check(
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) }
            as libc::c_long,
    )
    .map(drop)
}

/// Runs `work` in a child that shares this process's memory but not its working directory
/// (`clone(CLONE_VM | CLONE_VFORK)`), on a stack of its own, and returns its result; the
/// calling thread waits meanwhile. Far cheaper than a fork of a large process (no page tables
/// copied), for a few syscalls that need their own working directory. Every signal is blocked
/// in the child, which must only make raw syscalls (it shares the caller's heap and TLS).
pub fn in_vfork_child(work: &(dyn Fn() -> Errno + Sync)) -> Result<Errno, Errno> {
    extern "C" fn trampoline(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` is the `&&dyn Fn` passed below, alive until the child has exited
        // (CLONE_VFORK keeps the caller waiting).
        let work = unsafe { &*(arg as *const &(dyn Fn() -> Errno + Sync)) };
        work()
    }
    let mut stack = vec![0u8; 64 * 1024];
    // SAFETY: the sets are initialised by sigfillset/zeroed before use.
    let old_mask = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        old
    };
    let arg: *const &(dyn Fn() -> Errno + Sync) = &work;
    // SAFETY: the stack is writable memory owned here for the child's whole life (the caller
    // waits, CLONE_VFORK); it grows down, so the top is passed, 16-byte aligned. The child runs
    // `trampoline` with every signal blocked and exits with its result.
    let pid = unsafe {
        let top = stack.as_mut_ptr().add(stack.len()) as usize & !15;
        libc::clone(
            trampoline,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            arg as *mut libc::c_void,
        )
    };
    let err = errno();
    // SAFETY: `old_mask` came from pthread_sigmask above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut());
    }
    if pid < 0 {
        return Err(err);
    }
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out pointer; `pid` is our child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && errno() != libc::EINTR {
            return Err(errno());
        }
    }
    drop(stack);
    if libc::WIFEXITED(status) {
        Ok(libc::WEXITSTATUS(status))
    } else {
        Err(libc::ECHILD)
    }
}

/// Blocks every signal in the calling thread.
pub fn block_all_signals() {
    // SAFETY: the set is initialised by sigfillset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// `dup2(2)`: the new descriptor does not have `FD_CLOEXEC`.
pub fn dup2(old: RawFd, new: RawFd) -> Result<(), Errno> {
    // SAFETY: plain syscall with integer arguments.
    check(unsafe { libc::dup2(old, new) } as libc::c_long).map(drop)
}

/// `fcntl(F_DUPFD_CLOEXEC)`: duplicates `fd` to the lowest free number `>= min`.
pub fn dup_above(fd: RawFd, min: RawFd) -> Result<RawFd, Errno> {
    // SAFETY: plain syscall with integer arguments.
    check(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) } as libc::c_long)
        .map(|v| v as RawFd)
}

/// Marks every descriptor from `first` upwards close-on-exec (`close_range` with
/// `CLOSE_RANGE_CLOEXEC`), so nothing but the chosen descriptors reaches the next program.
pub fn cloexec_from(first: RawFd) -> Result<(), Errno> {
    // SAFETY: plain syscall with integer arguments.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    check(ret).map(drop)
}

/// `execveat(fd, "", argv, envp, AT_EMPTY_PATH)`: runs the program open at `fd`. Only returns
/// on failure.
pub fn execveat_fd(fd: RawFd, argv: &[*const libc::c_char], envp: &[*const libc::c_char]) -> Errno {
    // SAFETY: `argv` and `envp` are NULL-terminated arrays of valid C strings (the caller builds
    // them from owned CStrings that outlive this call); the path is the empty string.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            fd,
            c"".as_ptr(),
            argv.as_ptr(),
            envp.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    errno()
}

/// `_exit(2)`: ends the process without running destructors or atexit handlers.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` is async-signal-safe and never returns.
    unsafe { libc::_exit(code) }
}

/// `prctl(PR_SET_NO_NEW_PRIVS, 1)`.
pub fn set_no_new_privs() -> Result<(), Errno> {
    // SAFETY: plain prctl with integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } as libc::c_long).map(drop)
}

/// `prctl(PR_SET_DUMPABLE, 0)`: no ptrace, no core dump, `/proc/<pid>` owned by root.
pub fn set_non_dumpable() -> Result<(), Errno> {
    // SAFETY: plain prctl with integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } as libc::c_long).map(drop)
}

/// Drops every capability from the bounding set, up to `last_cap` inclusive.
pub fn drop_bounding_set(last_cap: u32) -> Result<(), Errno> {
    for cap in 0..=last_cap {
        // SAFETY: plain prctl with integer arguments.
        let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if ret < 0 && errno() != libc::EINVAL {
            return Err(errno());
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Clears the effective, permitted and inheritable capability sets and the ambient set.
pub fn clear_capabilities() -> Result<(), Errno> {
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: header and data are valid v3 capability structures (two data elements).
    check(unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) })?;
    // SAFETY: plain prctl with integer arguments.
    let ret = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    check(ret as libc::c_long).map(drop)
}

/// `setsid(2)`.
pub fn setsid() -> Result<(), Errno> {
    // SAFETY: plain syscall.
    check(unsafe { libc::setsid() } as libc::c_long).map(drop)
}

/// Makes the terminal on `fd` the controlling terminal of the calling session leader
/// (`TIOCSCTTY`).
pub fn set_controlling_tty(fd: libc::c_int) -> Result<(), Errno> {
    // SAFETY: plain ioctl with an integer argument.
    check(unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0) } as libc::c_long).map(drop)
}

/// `kill(2)`.
pub fn kill(pid: libc::pid_t, sig: libc::c_int) -> Result<(), Errno> {
    // SAFETY: plain syscall with integer arguments.
    check(unsafe { libc::kill(pid, sig) } as libc::c_long).map(drop)
}

// --- Block devices and the new mount API (host side: a sandbox's disk) ---
//
// `libc` has neither the loop device ABI nor wrappers for the new mount API, and the loop
// crates build their bindings with bindgen (libclang at build time); these few definitions
// come from the kernel's uapi headers (`linux/loop.h`, `linux/mount.h`).

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CTL_REMOVE: libc::c_ulong = 0x4C81;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
/// `LO_FLAGS_AUTOCLEAR`: the device detaches itself when its last user closes it.
pub const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// `LO_FLAGS_DIRECT_IO`: I/O to the backing file bypasses the host's page cache (no double
/// caching of what the sandbox's own file system already caches).
pub const LO_FLAGS_DIRECT_IO: u32 = 16;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// `ioctl(LOOP_CTL_GET_FREE)` on `/dev/loop-control`: the number of a free loop device.
pub fn loop_get_free(control: RawFd) -> Result<u32, Errno> {
    // SAFETY: plain ioctl without an argument.
    check(unsafe { libc::ioctl(control, LOOP_CTL_GET_FREE) } as libc::c_long).map(|n| n as u32)
}

/// `ioctl(LOOP_CTL_REMOVE)` on `/dev/loop-control`: removes loop device `n`, which the kernel
/// refuses (`EBUSY`) while it is bound to a file or open.
pub fn loop_remove(control: RawFd, n: u32) -> Result<(), Errno> {
    // SAFETY: plain ioctl whose argument is a device number passed by value.
    check(unsafe { libc::ioctl(control, LOOP_CTL_REMOVE, n as libc::c_ulong) } as libc::c_long)
        .map(|_| ())
}

/// `ioctl(LOOP_CONFIGURE)`: backs the loop device open at `device` with the file open at
/// `backing`, with `flags` (`LO_FLAGS_*`), in one step.
pub fn loop_configure(device: RawFd, backing: RawFd, flags: u32) -> Result<(), Errno> {
    let config = LoopConfig {
        fd: backing as u32,
        block_size: 0,
        info: LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: flags,
            lo_file_name: [0; 64],
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        },
        reserved: [0; 8],
    };
    // SAFETY: `config` is a valid `struct loop_config` that outlives the call.
    check(
        unsafe { libc::ioctl(device, LOOP_CONFIGURE, &config as *const LoopConfig) }
            as libc::c_long,
    )
    .map(drop)
}

/// `fsopen(fstype, FSOPEN_CLOEXEC)`: a file system context.
pub fn fsopen(fstype: &CStr) -> Result<RawFd, Errno> {
    const FSOPEN_CLOEXEC: libc::c_uint = 1;
    // SAFETY: `fstype` is NUL-terminated; the flags are integers.
    check(unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) })
        .map(|fd| fd as RawFd)
}

/// `fsconfig(fd, FSCONFIG_SET_STRING, key, value)`.
pub fn fsconfig_set_string(fd: RawFd, key: &CStr, value: &CStr) -> Result<(), Errno> {
    const FSCONFIG_SET_STRING: libc::c_uint = 1;
    // SAFETY: `key` and `value` are NUL-terminated strings that outlive the call.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fd,
            FSCONFIG_SET_STRING,
            key.as_ptr(),
            value.as_ptr(),
            0,
        )
    })
    .map(drop)
}

/// `fsconfig(fd, FSCONFIG_CMD_CREATE)`: makes the superblock.
pub fn fsconfig_create(fd: RawFd) -> Result<(), Errno> {
    const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
    // SAFETY: no pointers are passed for this command.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fd,
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    })
    .map(drop)
}

/// `fsmount(fd, FSMOUNT_CLOEXEC, attrs)`: a detached mount of the context's superblock.
pub fn fsmount(fd: RawFd, attrs: u64) -> Result<RawFd, Errno> {
    const FSMOUNT_CLOEXEC: libc::c_uint = 1;
    // SAFETY: integer arguments only.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            fd,
            FSMOUNT_CLOEXEC,
            attrs as libc::c_uint,
        )
    })
    .map(|fd| fd as RawFd)
}

/// `MOUNT_ATTR_IDMAP`.
pub const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// `mount_setattr(fd, "", AT_EMPTY_PATH)` on a detached mount: sets `attr_set` and, when
/// given, the id mapping of the user namespace open at `userns`.
pub fn mount_setattr_fd(mount: RawFd, attr_set: u64, userns: Option<RawFd>) -> Result<(), Errno> {
    let attr = MountAttr {
        attr_set: attr_set
            | if userns.is_some() {
                MOUNT_ATTR_IDMAP
            } else {
                0
            },
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.map_or(0, |fd| fd as u64),
    };
    // SAFETY: the path is an empty NUL-terminated string; `attr` is a valid `struct mount_attr`
    // of the size passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mount,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    check(ret).map(drop)
}

/// `move_mount(mount, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH)`: attaches a detached
/// mount at `target`.
pub fn move_mount_to(mount: RawFd, target: &CStr) -> Result<(), Errno> {
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
    // SAFETY: both paths are NUL-terminated strings that outlive the call.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mount,
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })
    .map(drop)
}

/// `mkdir(2)`.
pub fn mkdir(path: &CStr, mode: libc::mode_t) -> Result<(), Errno> {
    // SAFETY: `path` is NUL-terminated.
    check(unsafe { libc::mkdir(path.as_ptr(), mode) } as libc::c_long).map(drop)
}
