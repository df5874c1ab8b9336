//! The sandbox's filesystem and the mount program that builds it.
//!
//! The root is an overlay: read-only lower layers (execbox's own *skeleton* on top: mount
//! points, the user database and the files execbox adds; below it the image's layers, or none
//! for the host-runtimes template, whose system directories are then bound read-only from the
//! host) and one writable layer, on the sandbox's disk (see [`crate::storage`]) or, when asked,
//! in memory. The overlay is mounted by the sandbox's first process, inside its user namespace,
//! from a staging directory that the server prepared ([`SandboxRoot`]): the layers and the disk
//! are there as id-mapped mounts, so that files owned by ids `0..65536` on disk belong to the
//! same ids inside. The paths in the overlay's options are relative to the staging directory:
//! nothing of the host's layout shows in the sandbox's `mountinfo`.
//!
//! The plan is made on the host, in ordinary Rust, and compiled into a flat list of
//! [`MountOp`]s holding only `CString`s. The child of `clone` then runs that list with raw
//! syscalls ([`run_ops`]), which is async-signal-safe: no allocation happens after the clone.

use std::ffi::{CStr, CString};
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::sys::{self, Errno};

/// Uid of the unprivileged sandbox user (`user`), inside the sandbox.
pub const SANDBOX_UID: u32 = 1000;
/// Gid of the sandbox user's group.
pub const SANDBOX_GID: u32 = 1000;
/// Home directory of the sandbox user; the default working directory.
pub const SANDBOX_HOME: &str = "/home/user";
/// Directory inside the sandbox that holds the interpreter links put first on `PATH`.
pub const RUNTIME_BIN_DIR: &str = "/opt/execbox/bin";
/// The entrypoint of OpenSandbox's code-interpreter image, under both names its SDK's README
/// and code pass.
pub const CODE_INTERPRETER_ENTRYPOINTS: &[&str] = &[
    "/opt/opensandbox/code-interpreter.sh",
    "/opt/code-interpreter/code-interpreter.sh",
];
/// Its content here: the agent starts interpreters on demand, so the entrypoint has nothing to
/// start and only keeps running, as upstream's does.
const CODE_INTERPRETER_SCRIPT: &str = "#!/bin/sh\n\
# execbox: interpreters are started by the sandbox agent when a code context needs one.\n\
exec sleep infinity\n";
/// Where a sandbox sees its template (a directory tree built from package registries on the
/// host), read-only; an empty directory in sandboxes without one.
pub const TEMPLATE_DIR: &str = "/opt/execbox/template";
/// Working directory of isol8 runs (a writable area of its own, as isol8's `/sandbox`).
pub const SANDBOX_WORKDIR: &str = "/sandbox";
/// Directory inside the sandbox for the agent's private data (command logs and the like).
pub const AGENT_DATA_DIR: &str = "/run/execbox";
/// A sandbox's address on its network device, when it has one.
pub const SANDBOX_ADDRESS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 2, 100);
/// The sandbox's name server: the server, reached through the network device.
pub const SANDBOX_DNS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 2, 3);
/// `PATH` of processes started inside the sandbox.
pub const SANDBOX_PATH: &str =
    "/opt/execbox/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// System directories bound read-only when the host has them (symlinks are recreated).
const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc",
];
/// Device nodes bound from the host's `/dev`.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];
/// Entries of `/proc` hidden behind `/dev/null` (files) because they leak host internals.
const PROC_MASKED_FILES: &[&str] = &[
    "kcore",
    "keys",
    "timer_list",
    "sched_debug",
    "latency_stats",
    "timer_stats",
    "kallsyms",
    "kmsg",
    "config.gz",
];
/// Entries of `/proc` made read-only.
const PROC_READONLY: &[&str] = &[
    "sys",
    "sysrq-trigger",
    "irq",
    "bus",
    "fs",
    "asound",
    "acpi",
    "scsi",
];
/// Host files under `/etc` hidden behind `/dev/null`.
const ETC_MASKED: &[&str] = &["shadow", "gshadow", "shadow-", "gshadow-"];

/// A language runtime found on the host and made visible inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Runtime {
    /// Name users type (`python`, `python3`, `pip`, `node`, `java`, `bun`, `deno`, `go`, `bash`).
    pub name: String,
    /// Absolute path of the real executable (symlinks and shims resolved).
    pub executable: PathBuf,
    /// Install prefix to bind read-only when it lies outside the system directories
    /// (for example a pyenv version directory).
    pub prefix: Option<PathBuf>,
}

/// Sizes of a sandbox's storage, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StorageSizes {
    /// The writable layer: the whole root's writable space (`/home/user`, `/workspace`,
    /// `/tmp`, …), on the sandbox's disk (or in memory when the request or the operator asks).
    pub disk: u64,
    /// `/tmp` as a memory file system of this size, apart from the disk (isol8's `tmpSize`).
    pub tmp_in_memory: Option<u64>,
    /// `/dev/shm` (memory).
    pub shm: u64,
    /// The agent's private data (`/run/execbox`: command logs, kernel scripts; memory).
    pub agent_data: u64,
}

impl StorageSizes {
    /// The most memory the sandbox's files can take: every memory file system together, the
    /// writable layer included when it is in memory.
    pub fn in_memory(&self, upper: &Upper) -> u64 {
        let layer = match upper {
            Upper::Disk => 0,
            Upper::Memory => self.disk,
        };
        [
            self.tmp_in_memory.unwrap_or(0),
            self.shm,
            self.agent_data,
            layer,
        ]
        .iter()
        .fold(0u64, |a, b| a.saturating_add(*b))
    }

    /// What user code can fill in memory (the agent's own data excluded).
    pub fn user_in_memory(&self, upper: &Upper) -> u64 {
        self.in_memory(upper).saturating_sub(self.agent_data)
    }
}

impl Default for StorageSizes {
    fn default() -> Self {
        const MIB: u64 = 1024 * 1024;
        Self {
            disk: 2048 * MIB,
            tmp_in_memory: None,
            shm: 64 * MIB,
            agent_data: 256 * MIB,
        }
    }
}

/// Where a sandbox's writable layer lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Upper {
    /// On its disk, mounted by the server at the staging directory's `d` (with `upper/` and
    /// `work/` in it).
    Disk,
    /// In a memory file system the sandbox mounts itself (rootless servers, or when asked).
    Memory,
}

/// One sandbox's root as the server prepared it.
#[derive(Debug, Clone)]
pub struct SandboxRoot {
    /// The staging directory (host path): holds the lower layers, the disk (`d`) and the
    /// overlay's mount point (`root`).
    pub stage: PathBuf,
    /// The lower layers as paths relative to `stage`, topmost first; the first is the
    /// skeleton.
    pub lowers: Vec<String>,
    /// Where the writable layer is.
    pub upper: Upper,
    /// Sizes.
    pub sizes: StorageSizes,
    /// The server mounted the overlay at `stage/root` already (root servers: it needs the
    /// host's root to reach the layers); otherwise the sandbox's first process mounts it,
    /// the writable layer in memory.
    pub mounted: bool,
}

/// Everything needed to build one sandbox's root filesystem.
#[derive(Debug, Clone)]
pub struct RootfsPlan {
    /// Host directory holding the skeleton of the root: mount points, the usual directories,
    /// the interpreter links and the user database. Built once per base
    /// ([`RootfsPlan::build_skeleton`]) and used as the topmost read-only layer of every
    /// sandbox's root, so that a sandbox start writes nothing.
    pub skeleton: PathBuf,
    /// Host name inside the sandbox.
    pub hostname: String,
    /// Runtimes to expose.
    pub runtimes: Vec<Runtime>,
    /// The base of the root: the host's system directories, or an image's layers.
    pub base: RootBase,
    /// Host directory of the agent's own shared libraries (and loader), bound read-only at
    /// [`crate::spawn::AGENT_LIB_DIR`] for roots that have not the host's C library.
    pub agent_libs: Option<PathBuf>,
    /// True when only one uid is mapped (rootless server): the sandbox user is then uid 0.
    pub rootless: bool,
    /// A host directory shown read-only at [`TEMPLATE_DIR`] (the sandbox's template), if any.
    pub template: Option<PathBuf>,
}

/// What a sandbox's root is made of, below execbox's skeleton.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootBase {
    /// The host's system directories, bound read-only, and its runtimes (the `default`
    /// template).
    HostRuntimes,
    /// An image's layers. Its user database, with the sandbox user added.
    Image {
        /// The image's `/etc/passwd`, if it has one.
        passwd: Option<String>,
        /// The image's `/etc/group`, if it has one.
        group: Option<String>,
    },
}

/// One step of the mount program. Paths are absolute host paths before the pivot.
#[derive(Debug)]
pub enum MountOp {
    /// `mount(2)`.
    Mount {
        /// Source, or none.
        src: Option<CString>,
        /// Target.
        target: CString,
        /// File system type, or none for binds and propagation changes.
        fstype: Option<CString>,
        /// `MS_*` flags.
        flags: libc::c_ulong,
        /// File system options.
        data: Option<CString>,
    },
    /// `mount_setattr(2)` adding attributes.
    SetAttr {
        /// Target mount.
        target: CString,
        /// `MOUNT_ATTR_*` flags to set.
        attrs: u64,
        /// Also below the target.
        recursive: bool,
    },
    /// Pivots into `dir`: `chdir(dir)`, `pivot_root(".", ".")`, detach the old root, `chdir("/")`.
    PivotInto(CString),
    /// `chdir(2)`: later relative paths start there.
    Chdir(CString),
    /// `mkdir(2)` with a mode.
    Mkdir(CString, u32),
    /// Attaches the detached mount open at descriptor `fd` (inherited from the server) at
    /// `target` (`move_mount(2)`). Placed after the pivot, so `target` resolves in the
    /// sandbox's own root, and after every other mount, so nothing covers it.
    Attach {
        /// The detached mount.
        fd: RawFd,
        /// Where, in the sandbox's root.
        target: CString,
    },
}

/// A failed mount-program step: which step and the errno.
#[derive(Debug, Clone, Copy)]
pub struct OpFailure {
    /// Index of the step in the program.
    pub index: usize,
    /// errno of the failed syscall.
    pub errno: Errno,
}

fn cpath(p: &Path) -> CString {
    // Paths built by this module never contain NUL bytes (they come from the file system or
    // from constants); a path with NUL could not exist on Linux anyway.
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

const RO: u64 = sys::MOUNT_ATTR_RDONLY | sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV;

/// The user database and host files written into the skeleton.
const ETC_FILES: &[&str] = &["passwd", "group", "hostname", "hosts", "resolv.conf"];

fn inside(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

impl RootfsPlan {
    fn ids(&self) -> (u32, u32) {
        if self.rootless {
            (0, 0)
        } else {
            (SANDBOX_UID, SANDBOX_GID)
        }
    }

    /// Runtime prefixes outside the system directories, outermost only.
    fn extra_prefixes(&self) -> Vec<PathBuf> {
        let mut prefixes: Vec<PathBuf> = self
            .runtimes
            .iter()
            .filter_map(|r| r.prefix.clone())
            .filter(|p| !SYSTEM_DIRS.iter().any(|d| p.starts_with(d)) && p.is_dir())
            .collect();
        prefixes.sort();
        prefixes.dedup();
        let mut outer: Vec<PathBuf> = Vec::new();
        for p in prefixes {
            if !outer.iter().any(|o| p.starts_with(o)) {
                outer.push(p);
            }
        }
        outer
    }

    fn etc_contents(&self, name: &str) -> String {
        let (uid, gid) = self.ids();
        let user = format!("user:x:{uid}:{gid}:user:{SANDBOX_HOME}:/bin/sh\n");
        match (name, &self.base) {
            ("passwd", RootBase::HostRuntimes) => format!(
                "root:x:0:0:root:/root:/bin/bash\n\
                 user:x:{uid}:{gid}:user:{SANDBOX_HOME}:/bin/bash\n\
                 nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
            ),
            ("group", RootBase::HostRuntimes) => {
                format!("root:x:0:\ntty:x:5:\nuser:x:{gid}:\nnogroup:x:65534:\n")
            }
            // The image's own database, its entries for the sandbox user's name or ids replaced
            // by the sandbox user (`uid`/`gid` of the third field).
            ("passwd", RootBase::Image { passwd, .. }) => {
                let base = passwd
                    .as_deref()
                    .unwrap_or("root:x:0:0:root:/root:/bin/sh\n");
                merge_db(base, &user, uid)
            }
            ("group", RootBase::Image { group, .. }) => {
                let base = group.as_deref().unwrap_or("root:x:0:\n");
                merge_db(base, &format!("user:x:{gid}:\n"), gid)
            }
            ("hostname", _) => format!("{}\n", self.hostname),
            ("resolv.conf", _) => format!("nameserver {SANDBOX_DNS}\noptions ndots:0 attempts:1\n"),
            _ => format!(
                "127.0.0.1\tlocalhost {h}\n::1\tlocalhost ip6-localhost ip6-loopback {h}\n",
                h = self.hostname
            ),
        }
    }

    /// Creates the skeleton directory (idempotent). Runs on the host, once per plan.
    pub fn build_skeleton(&self) -> std::io::Result<()> {
        use std::fs;
        use std::os::unix::fs::{chown, symlink, PermissionsExt};
        let root = &self.skeleton;
        let (uid, gid) = self.ids();
        let dir = |p: &Path, mode: u32, owner: Option<(u32, u32)>| -> std::io::Result<()> {
            fs::create_dir_all(p)?;
            fs::set_permissions(p, fs::Permissions::from_mode(mode))?;
            if let (Some((u, g)), false) = (owner, self.rootless) {
                chown(p, Some(u), Some(g))?;
            }
            Ok(())
        };
        let link = |dest: &Path, at: &Path| -> std::io::Result<()> {
            match fs::symlink_metadata(at) {
                Ok(_) => fs::remove_file(at)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            symlink(dest, at)
        };
        let empty_file = |at: &Path| -> std::io::Result<()> {
            if !at.exists() {
                fs::write(at, b"")?;
            }
            Ok(())
        };
        dir(root, 0o755, None)?;
        if self.base == RootBase::HostRuntimes {
            for d in SYSTEM_DIRS {
                let host = Path::new(d);
                let at = inside(root, host);
                match fs::symlink_metadata(host) {
                    Ok(m) if m.file_type().is_symlink() => link(&fs::read_link(host)?, &at)?,
                    Ok(m) if m.is_dir() => dir(&at, 0o755, None)?,
                    _ => {}
                }
            }
            for p in self.extra_prefixes() {
                dir(&inside(root, &p), 0o755, None)?;
            }
        } else {
            // Targets of the binds of execbox's own /etc files, whatever the image has.
            dir(&root.join("etc"), 0o755, None)?;
            for name in ETC_FILES {
                empty_file(&root.join("etc").join(name))?;
            }
        }
        // The usual directories, where the sandbox user works, and the mount points.
        for (d, mode, owner) in [
            (SANDBOX_HOME, 0o750, Some((uid, gid))),
            ("/workspace", 0o755, Some((uid, gid))),
            (SANDBOX_WORKDIR, 0o755, Some((uid, gid))),
            ("/tmp", 0o1777, None),
            ("/var", 0o755, None),
            ("/var/tmp", 0o1777, None),
            ("/opt", 0o755, None),
            (TEMPLATE_DIR, 0o755, None),
            ("/srv", 0o755, Some((uid, gid))),
            ("/mnt", 0o755, Some((uid, gid))),
            ("/run", 0o755, None),
            (AGENT_DATA_DIR, 0o700, None),
            ("/proc", 0o555, None),
            ("/dev", 0o755, None),
            ("/dev/pts", 0o755, None),
            ("/dev/shm", 0o1777, None),
        ] {
            dir(&inside(root, Path::new(d)), mode, owner)?;
        }
        for name in DEVICES {
            empty_file(&root.join("dev").join(name))?;
        }
        link(Path::new("pts/ptmx"), &root.join("dev/ptmx"))?;
        for (name, dest) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ] {
            link(Path::new(dest), &root.join("dev").join(name))?;
        }
        let files = root.join(".execbox");
        dir(&files, 0o755, None)?;
        if self.agent_libs.is_some() {
            dir(
                &inside(root, Path::new(crate::spawn::AGENT_LIB_DIR)),
                0o755,
                None,
            )?;
        }
        for name in ETC_FILES {
            fs::write(files.join(name), self.etc_contents(name))?;
        }
        if self.base == RootBase::HostRuntimes {
            let bin = inside(root, Path::new(RUNTIME_BIN_DIR));
            dir(&bin, 0o755, None)?;
            for rt in &self.runtimes {
                link(&rt.executable, &bin.join(&rt.name))?;
            }
            for path in CODE_INTERPRETER_ENTRYPOINTS {
                let entrypoint = inside(root, Path::new(path));
                if let Some(parent) = entrypoint.parent() {
                    dir(parent, 0o755, None)?;
                }
                fs::write(&entrypoint, CODE_INTERPRETER_SCRIPT)?;
                fs::set_permissions(&entrypoint, fs::Permissions::from_mode(0o755))?;
            }
        }
        Ok(())
    }

    /// Compiles the plan into the mount program run by the sandbox's first process, for the
    /// root prepared at `sandbox`.
    pub fn compile(&self, sandbox: &SandboxRoot) -> Vec<MountOp> {
        let stage = sandbox.stage.clone();
        let root = stage.join("root");
        let mut ops = Vec::new();
        let bind = |ops: &mut Vec<MountOp>, src: &Path, target: &Path, attrs: u64| {
            ops.push(MountOp::Mount {
                src: Some(cpath(src)),
                target: cpath(target),
                fstype: None,
                flags: libc::MS_BIND | libc::MS_REC,
                data: None,
            });
            if attrs != 0 {
                ops.push(MountOp::SetAttr {
                    target: cpath(target),
                    attrs,
                    recursive: true,
                });
            }
        };
        let mount = |ops: &mut Vec<MountOp>, fstype: &str, target: &Path, flags, data: String| {
            ops.push(MountOp::Mount {
                src: Some(cstr(fstype)),
                target: cpath(target),
                fstype: Some(cstr(fstype)),
                flags,
                data: Some(cstr(&data)),
            });
        };
        let fs_flags = libc::MS_NOSUID | libc::MS_NODEV;
        let sizes = &sandbox.sizes;

        // Nothing mounted here may propagate back to the host.
        ops.push(MountOp::Mount {
            src: None,
            target: cstr("/"),
            fstype: None,
            flags: libc::MS_REC | libc::MS_PRIVATE,
            data: None,
        });
        // The overlay, from the staging directory with relative paths.
        if !sandbox.mounted {
            ops.push(MountOp::Chdir(cpath(&stage)));
        }
        if !sandbox.mounted && sandbox.upper == Upper::Memory {
            mount(
                &mut ops,
                "tmpfs",
                Path::new("d"),
                fs_flags,
                format!("size={},mode=755", sizes.disk),
            );
            ops.push(MountOp::Mkdir(cstr("d/upper"), 0o755));
            ops.push(MountOp::Mkdir(cstr("d/work"), 0o700));
        }
        // `userxattr`: an overlay mounted in a user namespace keeps its metadata (opaque
        // directories of image layers included) in `user.overlay.*` attributes (as the
        // server's own mount of it does, see `storage::mount_overlay`).
        if !sandbox.mounted {
            mount(
                &mut ops,
                "overlay",
                Path::new("root"),
                fs_flags,
                format!(
                    "lowerdir={},upperdir=d/upper,workdir=d/work,userxattr",
                    sandbox.lowers.join(":")
                ),
            );
        }

        if sandbox.mounted {
            // The server's mount came into this namespace locked (as every mount copied into a
            // less privileged one): a bind of it made here can be the new root.
            bind(&mut ops, &root, &root, 0);
        }

        if self.base == RootBase::HostRuntimes {
            for d in SYSTEM_DIRS {
                let host = Path::new(d);
                if std::fs::symlink_metadata(host).is_ok_and(|m| m.is_dir()) {
                    bind(&mut ops, host, &inside(&root, host), RO);
                }
            }
            for name in ETC_MASKED {
                let host = Path::new("/etc").join(name);
                if host.exists() {
                    bind(&mut ops, Path::new("/dev/null"), &inside(&root, &host), 0);
                }
            }
        }
        // execbox's /etc files (the user database, host name, resolver), read-only. The
        // skeleton is the overlay's top layer, so its copies are at `/.execbox` of the root.
        for name in ETC_FILES {
            let exists = match self.base {
                RootBase::HostRuntimes => Path::new("/etc").join(name).exists(),
                RootBase::Image { .. } => true,
            };
            if exists {
                bind(
                    &mut ops,
                    &root.join(".execbox").join(name),
                    &root.join("etc").join(name),
                    RO,
                );
            }
        }
        if self.base == RootBase::HostRuntimes {
            // Runtimes installed outside the system directories, bound at the same path so
            // their compiled-in prefixes keep working.
            for prefix in self.extra_prefixes() {
                bind(&mut ops, &prefix, &inside(&root, &prefix), RO);
            }
        }
        // The template: read-only, but not noexec (it holds native extension modules, which
        // are mapped executable).
        if let Some(template) = &self.template {
            bind(
                &mut ops,
                template,
                &inside(&root, Path::new(TEMPLATE_DIR)),
                RO,
            );
        }

        if let Some(size) = sizes.tmp_in_memory {
            mount(
                &mut ops,
                "tmpfs",
                &root.join("tmp"),
                fs_flags,
                format!("size={size},mode=1777,uid=0,gid=0"),
            );
        }
        // The agent's private data: root-only (the agent opens it to traversal for its kernel
        // scripts), inside the sandbox's own memory budget.
        mount(
            &mut ops,
            "tmpfs",
            &inside(&root, Path::new(AGENT_DATA_DIR)),
            fs_flags | libc::MS_NOEXEC,
            format!("size={},mode=700,uid=0,gid=0", sizes.agent_data),
        );
        if let Some(libs) = &self.agent_libs {
            let at = inside(&root, Path::new(crate::spawn::AGENT_LIB_DIR));
            bind(&mut ops, libs, &at, RO);
        }

        // A minimal /dev: a few host device nodes, a private devpts, a private shm.
        let dev = root.join("dev");
        for name in DEVICES {
            let host = Path::new("/dev").join(name);
            if host.exists() {
                bind(
                    &mut ops,
                    &host,
                    &dev.join(name),
                    sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NOEXEC,
                );
            }
        }
        let pts_opts = if self.rootless {
            "newinstance,ptmxmode=0666,mode=620"
        } else {
            "newinstance,ptmxmode=0666,mode=620,gid=5"
        };
        mount(
            &mut ops,
            "devpts",
            &dev.join("pts"),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            pts_opts.into(),
        );
        mount(
            &mut ops,
            "tmpfs",
            &dev.join("shm"),
            fs_flags,
            format!("size={},mode=1777,uid=0,gid=0", sizes.shm),
        );

        // A fresh /proc of the sandbox's pid namespace, with the revealing parts masked.
        let proc_ = root.join("proc");
        ops.push(MountOp::Mount {
            src: Some(cstr("proc")),
            target: cpath(&proc_),
            fstype: Some(cstr("proc")),
            flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data: None,
        });
        for name in PROC_MASKED_FILES {
            if Path::new("/proc").join(name).is_file() {
                bind(&mut ops, Path::new("/dev/null"), &proc_.join(name), 0);
            }
        }
        for name in PROC_READONLY {
            if Path::new("/proc").join(name).exists() {
                let p = proc_.join(name);
                bind(&mut ops, &p, &p, RO | sys::MOUNT_ATTR_NOEXEC);
            }
        }
        ops.push(MountOp::PivotInto(cpath(&root)));
        ops
    }
}

/// `db` (an `/etc/passwd` or `/etc/group`) without entries named `user` or with id `id`,
/// then `entry`.
fn merge_db(db: &str, entry: &str, id: u32) -> String {
    let id = id.to_string();
    let mut out: String = db
        .lines()
        .filter(|l| {
            let mut f = l.split(':');
            let name = f.next().unwrap_or("");
            let entry_id = f.nth(1).unwrap_or("");
            !l.trim().is_empty() && name != "user" && entry_id != id
        })
        .map(|l| format!("{l}\n"))
        .collect();
    out.push_str(entry);
    out
}

/// Binds a read-only file with `content` over each `/proc/<name>` of `files`, the files kept in
/// `store` (a directory of the agent's own tmpfs). Run by the agent before its seccomp filter
/// (which forbids `mount`); it is root of the sandbox's user namespace, which owns its `/proc`.
pub fn virtualize_proc(store: &Path, files: &[(&str, String)]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(store)?;
    for (name, content) in files {
        let src = store.join(name.replace('/', "_"));
        std::fs::write(&src, content)?;
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o444))?;
        let target = Path::new("/proc").join(name);
        let (src_c, target_c) = (cpath(&src), cpath(&target));
        sys::mount(Some(&src_c), &target_c, None, libc::MS_BIND, None)
            .and_then(|()| sys::mount_setattr(&target_c, RO | sys::MOUNT_ATTR_NOEXEC, false))
            .map_err(|e| {
                std::io::Error::new(
                    std::io::Error::from_raw_os_error(e).kind(),
                    format!(
                        "binding over {}: {}",
                        target.display(),
                        std::io::Error::from_raw_os_error(e)
                    ),
                )
            })?;
    }
    Ok(())
}

/// Whether this kernel makes detached mounts (`open_tree(OPEN_TREE_CLONE)`, Linux 5.2), which
/// is how the agent gets its cgroup directories without a way back to the host; the reason when
/// it does not. Tried in a child in a user and mount namespace of its own, like a sandbox.
pub fn probe_detached_mounts() -> Result<(), String> {
    // SAFETY: the child only makes raw syscalls and exits with `_exit`.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            let code = match sys::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS)
                // A mount point with nothing mounted below it, as a cgroup directory is.
                .and_then(|()| sys::open_tree_clone(c"/dev/null"))
            {
                Ok(_) => 0,
                Err(e) => e.clamp(1, 255),
            };
            sys::exit_now(code)
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => match nix::sys::wait::waitpid(child, None)
        {
            Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) => Ok(()),
            Ok(nix::sys::wait::WaitStatus::Exited(_, errno)) => Err(format!(
                "open_tree(OPEN_TREE_CLONE): {}",
                std::io::Error::from_raw_os_error(errno)
            )),
            other => Err(format!("probe ended with {other:?}")),
        },
        Err(e) => Err(format!("fork: {e}")),
    }
}

/// Set once this process runs in a mount namespace of its own ([`enter_private_mount_namespace`]).
static PRIVATE_MOUNTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Moves this process into a mount namespace of its own, to which the host's mounts still
/// propagate (slave) but from which nothing propagates back: what the server mounts for its
/// sandboxes (the store of root skeletons) is invisible to the host and vanishes with the
/// server's last sandbox. Must be called while the process has a single thread (the new
/// namespace belongs to the calling thread only). Needs `CAP_SYS_ADMIN`; a rootless server
/// goes without it.
pub fn enter_private_mount_namespace() -> std::io::Result<()> {
    sys::unshare(libc::CLONE_NEWNS).map_err(std::io::Error::from_raw_os_error)?;
    sys::mount(None, c"/", None, libc::MS_REC | libc::MS_SLAVE, None)
        .map_err(std::io::Error::from_raw_os_error)?;
    PRIVATE_MOUNTS.store(true, std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

/// Mounts a small tmpfs (source name `execbox`) at `dir` to hold root skeletons, when this
/// process has a mount namespace of its own. Skeletons on it show up inside a sandbox's
/// `/proc/self/mountinfo` as `/<name>` on `execbox`, where a skeleton in a host directory would
/// show that directory's host path. Returns whether it mounted.
pub fn mount_skeleton_store(dir: &Path) -> std::io::Result<bool> {
    if !PRIVATE_MOUNTS.load(std::sync::atomic::Ordering::SeqCst) {
        return Ok(false);
    }
    std::fs::create_dir_all(dir)?;
    sys::mount(
        Some(c"execbox"),
        &cpath(dir),
        Some(c"tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(c"size=64m,mode=0755"),
    )
    .map_err(std::io::Error::from_raw_os_error)?;
    Ok(true)
}

/// Runs a mount program. Async-signal-safe: only syscalls on data built beforehand.
pub fn run_ops(ops: &[MountOp]) -> Result<(), OpFailure> {
    for (index, op) in ops.iter().enumerate() {
        let fail = |errno| OpFailure { index, errno };
        match op {
            MountOp::Mount {
                src,
                target,
                fstype,
                flags,
                data,
            } => sys::mount(
                src.as_deref(),
                target,
                fstype.as_deref(),
                *flags,
                data.as_deref(),
            ),
            MountOp::SetAttr {
                target,
                attrs,
                recursive,
            } => sys::mount_setattr(target, *attrs, *recursive),
            MountOp::PivotInto(dir) => pivot_into(dir),
            MountOp::Chdir(dir) => sys::chdir(dir),
            MountOp::Mkdir(dir, mode) => sys::mkdir(dir, *mode as libc::mode_t),
            MountOp::Attach { fd, target } => sys::move_mount_to(*fd, target),
        }
        .map_err(fail)?;
    }
    Ok(())
}

fn pivot_into(dir: &CStr) -> Result<(), Errno> {
    sys::chdir(dir)?;
    sys::pivot_root(c".", c".")?;
    // The old root is now stacked on top of the new one at "/": detach it.
    sys::umount_detach(c".")?;
    sys::chdir(c"/")
}

/// Describes a failed step for error messages (host side, may allocate).
pub fn describe_op(op: &MountOp) -> String {
    match op {
        MountOp::Mount {
            src,
            target,
            fstype,
            ..
        } => format!(
            "mount {} on {} (type {})",
            src.as_ref().map_or("none".into(), |s| s.to_string_lossy()),
            target.to_string_lossy(),
            fstype
                .as_ref()
                .map_or("bind".into(), |s| s.to_string_lossy())
        ),
        MountOp::SetAttr { target, .. } => {
            format!("make {} read-only", target.to_string_lossy())
        }
        MountOp::PivotInto(p) => format!("pivot_root into {}", p.to_string_lossy()),
        MountOp::Chdir(p) => format!("chdir {}", p.to_string_lossy()),
        MountOp::Mkdir(p, _) => format!("mkdir {}", p.to_string_lossy()),
        MountOp::Attach { target, .. } => {
            format!("attach a volume at {}", target.to_string_lossy())
        }
    }
}
