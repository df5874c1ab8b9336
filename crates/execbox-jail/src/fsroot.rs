//! Kernel-enforced path resolution beneath a root.
//!
//! Why: the agent is root of its sandbox and acts on paths that come from requests, or whose
//! components sandbox code can change at any moment (symlinks swapped in by a loop running
//! `renameat2(RENAME_EXCHANGE)`). A check made on a path and an operation made later on the same
//! path can meet two different files, and a path through `/proc/<pid>/fd/N` is a *magic link*
//! that jumps to whatever that descriptor is, wherever it lives. So nothing here checks paths:
//!
//! - a whole path is resolved by the kernel with `openat2(RESOLVE_IN_ROOT |
//!   RESOLVE_NO_MAGICLINKS)` ([`Dir::resolve_dir`], [`Dir::resolve`]): symlinks are followed but
//!   `..` and absolute targets stay inside the root, and magic links are refused;
//! - one name inside a pinned directory is opened with `openat2(RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS)` and `O_NOFOLLOW` ([`Dir::open`], [`Dir::subdir`], [`Dir::pin`]);
//! - every other operation (`mkdirat`, `unlinkat`, `renameat2`, `fchownat`, …) takes one plain
//!   name relative to a pinned directory descriptor, which no later swap can redirect, and every
//!   decision (file type, owner, file system) is made on an opened descriptor.
//!
//! A kernel without `openat2` (before 5.6) cannot give these guarantees: [`probe`] reports it
//! and the server refuses to create sandboxes.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, AtFlags, OFlag, OpenHow, RenameFlags, ResolveFlag};
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;

pub use nix::fcntl::OFlag as OpenFlags;

/// How often a lookup is retried when the kernel reports that a rename elsewhere in the file
/// system raced with a `..` step (`EAGAIN` from `openat2` with a scoping flag).
const EAGAIN_RETRIES: usize = 256;

/// Deepest directory tree [`Dir::remove_tree`] descends into.
pub const MAX_TREE_DEPTH: usize = 1024;

fn io_err(e: Errno) -> io::Error {
    io::Error::from(e)
}

fn openat2_retry(dirfd: BorrowedFd<'_>, path: &Path, how: OpenHow) -> io::Result<OwnedFd> {
    let mut tries = 0;
    loop {
        match openat2(dirfd, path, how) {
            Err(Errno::EAGAIN) if tries < EAGAIN_RETRIES => tries += 1,
            Err(Errno::ENOSYS) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "openat2 is not available on this kernel",
                ))
            }
            r => return r.map_err(io_err),
        }
    }
}

/// Whether `name` is one plain path component (`.` allowed: the directory itself).
fn one_name(name: &OsStr) -> io::Result<&OsStr> {
    let b = name.as_bytes();
    if b.is_empty() || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a single file name"),
        ));
    }
    Ok(name)
}

/// The path made relative (a leading `/` is dropped: resolution starts at the root anyway).
fn relative(path: &Path) -> &Path {
    let rel = path.strip_prefix("/").unwrap_or(path);
    if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    }
}

/// A directory pinned by an `O_PATH` descriptor.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
}

impl Dir {
    /// Opens a directory that the caller trusts (its own root, a directory it created), with a
    /// plain `open`. Everything reached *from* it goes through `openat2`.
    pub fn open_trusted(path: &Path) -> io::Result<Dir> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_err)?;
        Ok(Dir { fd })
    }

    /// Wraps a descriptor known to be a directory.
    pub fn from_fd(fd: OwnedFd) -> Dir {
        Dir { fd }
    }

    /// The descriptor, owned.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// The descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Another descriptor of the same directory.
    pub fn try_clone(&self) -> io::Result<Dir> {
        Ok(Dir {
            fd: self.fd.try_clone()?,
        })
    }

    /// Resolves `path` with this directory as the root (`RESOLVE_IN_ROOT`): symlinks anywhere
    /// in the path are followed, `..` and absolute link targets cannot leave the root, and magic
    /// links (`/proc/<pid>/fd/N`, `/proc/<pid>/root`, …) are refused (`ELOOP`). The final
    /// component is followed unless `follow_last` is false, in which case a symlink there is
    /// opened itself (with `O_PATH`) or refused (`ELOOP`, other flags).
    pub fn resolve(&self, path: &Path, flags: OFlag, follow_last: bool) -> io::Result<OwnedFd> {
        self.scoped(path, flags, follow_last, ResolveFlag::RESOLVE_IN_ROOT)
    }

    /// Resolves `path` beneath this directory (`RESOLVE_BENEATH`): symlinks are followed only
    /// while they stay beneath it (an absolute target or a `..` above it is refused, `EXDEV`),
    /// magic links are refused. The final component as in [`Dir::resolve`].
    pub fn resolve_beneath(
        &self,
        path: &Path,
        flags: OFlag,
        follow_last: bool,
    ) -> io::Result<OwnedFd> {
        self.scoped(path, flags, follow_last, ResolveFlag::RESOLVE_BENEATH)
    }

    fn scoped(
        &self,
        path: &Path,
        flags: OFlag,
        follow_last: bool,
        scope: ResolveFlag,
    ) -> io::Result<OwnedFd> {
        let mut flags = flags | OFlag::O_CLOEXEC;
        if !follow_last {
            flags |= OFlag::O_NOFOLLOW;
        }
        let how = OpenHow::new()
            .flags(flags)
            .resolve(scope | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        openat2_retry(self.fd(), relative(path), how)
    }

    /// The directory at `path` under this root (see [`Dir::resolve`]), symlinks followed.
    pub fn resolve_dir(&self, path: &Path) -> io::Result<Dir> {
        self.resolve(path, OFlag::O_PATH | OFlag::O_DIRECTORY, true)
            .map(|fd| Dir { fd })
    }

    fn open_name(&self, name: &OsStr, flags: OFlag, mode: u32) -> io::Result<OwnedFd> {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .mode(Mode::from_bits_truncate(mode))
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        openat2_retry(self.fd(), Path::new(one_name(name)?), how)
    }

    /// Opens the entry `name` of this directory, never following a symlink there (`ELOOP`).
    /// `mode` applies when `flags` create a file.
    pub fn open(&self, name: &OsStr, flags: OFlag, mode: u32) -> io::Result<File> {
        self.open_name(name, flags, mode).map(File::from)
    }

    /// The subdirectory `name` (a symlink there is refused).
    pub fn subdir(&self, name: &OsStr) -> io::Result<Dir> {
        self.open_name(name, OFlag::O_PATH | OFlag::O_DIRECTORY, 0)
            .map(|fd| Dir { fd })
    }

    /// Pins the entry `name` itself (a symlink is pinned as the link) with `O_PATH`.
    pub fn pin(&self, name: &OsStr) -> io::Result<File> {
        self.open(name, OFlag::O_PATH, 0)
    }

    /// `lstat` of the entry `name`, taken on a descriptor of it.
    pub fn lstat(&self, name: &OsStr) -> io::Result<std::fs::Metadata> {
        self.pin(name)?.metadata()
    }

    /// `fstat` of the directory itself.
    pub fn metadata(&self) -> io::Result<std::fs::Metadata> {
        File::from(self.fd.try_clone()?).metadata()
    }

    /// Size in bytes of the file system holding the directory.
    pub fn capacity(&self) -> io::Result<u64> {
        let st = nix::sys::statvfs::fstatvfs(self.fd()).map_err(io_err)?;
        Ok(st.blocks() as u64 * st.fragment_size() as u64)
    }

    /// Whether the directory lies on a `proc` file system.
    pub fn is_on_proc(&self) -> io::Result<bool> {
        is_on_proc(self.fd())
    }

    /// Creates the directory `name` (never through a symlink).
    pub fn mkdir(&self, name: &OsStr, mode: u32) -> io::Result<()> {
        nix::sys::stat::mkdirat(self.fd(), one_name(name)?, Mode::from_bits_truncate(mode))
            .map_err(io_err)
    }

    /// Removes the non-directory entry `name` (a symlink itself, never its target).
    pub fn unlink(&self, name: &OsStr) -> io::Result<()> {
        nix::unistd::unlinkat(self.fd(), one_name(name)?, UnlinkatFlags::NoRemoveDir)
            .map_err(io_err)
    }

    /// Removes the empty directory `name`.
    pub fn rmdir(&self, name: &OsStr) -> io::Result<()> {
        nix::unistd::unlinkat(self.fd(), one_name(name)?, UnlinkatFlags::RemoveDir).map_err(io_err)
    }

    /// Renames `name` to `to_name` in `to`; with `no_replace`, an existing destination is an
    /// error (`EEXIST`) decided by the kernel, not by an earlier check.
    pub fn rename(
        &self,
        name: &OsStr,
        to: &Dir,
        to_name: &OsStr,
        no_replace: bool,
    ) -> io::Result<()> {
        let flags = if no_replace {
            RenameFlags::RENAME_NOREPLACE
        } else {
            RenameFlags::empty()
        };
        nix::fcntl::renameat2(
            self.fd(),
            one_name(name)?,
            to.fd(),
            one_name(to_name)?,
            flags,
        )
        .map_err(io_err)
    }

    /// Creates the symlink `name` pointing to `target`.
    pub fn symlink(&self, target: &Path, name: &OsStr) -> io::Result<()> {
        nix::unistd::symlinkat(target, self.fd(), one_name(name)?).map_err(io_err)
    }

    /// The target of the symlink `name`.
    pub fn readlink(&self, name: &OsStr) -> io::Result<PathBuf> {
        nix::fcntl::readlinkat(self.fd(), one_name(name)?)
            .map(PathBuf::from)
            .map_err(io_err)
    }

    /// The names in the directory (without `.` and `..`), in no particular order.
    pub fn names(&self) -> io::Result<Vec<OsString>> {
        let fd = self.open_name(OsStr::new("."), OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0)?;
        let mut dir = nix::dir::Dir::from_fd(fd).map_err(io_err)?;
        let mut out = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(io_err)?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                out.push(OsStr::from_bytes(name).to_os_string());
            }
        }
        Ok(out)
    }

    /// Creates the new file `name` for writing (`O_EXCL`: an existing entry, symlinks included,
    /// is an error).
    pub fn create_new(&self, name: &OsStr, mode: u32) -> io::Result<File> {
        self.open(name, OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL, mode)
    }

    /// An unnamed file in this directory's file system (`O_TMPFILE`): nothing in the
    /// namespace refers to it, so nothing can replace or redirect it.
    pub fn tmpfile(&self, mode: u32) -> io::Result<File> {
        self.open_name(OsStr::new("."), OFlag::O_TMPFILE | OFlag::O_RDWR, mode)
            .map(File::from)
    }

    /// `fsync` of the directory, so a rename into it is durable.
    pub fn sync(&self) -> io::Result<()> {
        self.open(OsStr::new("."), OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0)?
            .sync_all()
    }

    /// Changes the owner of the entry `name` itself (a symlink's own owner).
    pub fn chown(&self, name: &OsStr, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
        nix::unistd::fchownat(
            self.fd(),
            one_name(name)?,
            uid.map(nix::unistd::Uid::from_raw),
            gid.map(nix::unistd::Gid::from_raw),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(io_err)
    }

    /// Removes `name` and, when it is a directory, everything below it, through descriptors
    /// only: symlinks are removed, never followed. A missing entry is fine.
    pub fn remove_tree(&self, name: &OsStr) -> io::Result<()> {
        self.remove_tree_at(name, 0)
    }

    fn remove_tree_at(&self, name: &OsStr, depth: usize) -> io::Result<()> {
        let md = match self.lstat(name) {
            Ok(md) => md,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if !md.is_dir() {
            return match self.unlink(name) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        if depth >= MAX_TREE_DEPTH {
            return Err(io::Error::other(format!(
                "directory tree deeper than {MAX_TREE_DEPTH} levels"
            )));
        }
        let sub = self.subdir(name)?;
        for child in sub.names()? {
            sub.remove_tree_at(&child, depth + 1)?;
        }
        match self.rmdir(name) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Whether the file open at `fd` lies on a `proc` file system.
pub fn is_on_proc(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let st = nix::sys::statfs::fstatfs(fd).map_err(io_err)?;
    Ok(st.filesystem_type() == nix::sys::statfs::PROC_SUPER_MAGIC)
}

/// Changes the owner of the file open at `fd` (any descriptor, `O_PATH` included).
pub fn chown_fd(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    nix::unistd::fchownat(
        fd,
        "",
        uid.map(nix::unistd::Uid::from_raw),
        gid.map(nix::unistd::Gid::from_raw),
        AtFlags::AT_EMPTY_PATH,
    )
    .map_err(io_err)
}

/// Changes the permission bits of the file open at `fd` (any descriptor, `O_PATH` included).
///
/// `fchmod` refuses `O_PATH` descriptors, so this uses `fchmodat2(fd, "", AT_EMPTY_PATH)`
/// (Linux 6.6); on older kernels a regular file or directory is reopened through the process's
/// own descriptor link, which names exactly this inode.
pub fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: the path is a valid NUL-terminated empty string, `fd` is a live descriptor for
    // the duration of the call, and the remaining arguments are integers.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_fchmodat2,
            fd.as_raw_fd(),
            c"".as_ptr(),
            mode as libc::c_uint,
            libc::AT_EMPTY_PATH,
        )
    };
    if ret == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(err);
    }
    let md = File::from(fd.try_clone_to_owned()?).metadata()?;
    if !(md.is_file() || md.is_dir()) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "changing the mode of a special file needs Linux 6.6 (fchmodat2)",
        ));
    }
    let reopened = nix::fcntl::open(
        &PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
        OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
        Mode::empty(),
    )
    .map_err(io_err)?;
    nix::sys::stat::fchmod(reopened, Mode::from_bits_truncate(mode)).map_err(io_err)
}

/// The path of the file open at `fd` as the calling process sees it (the kernel's record, read
/// from the process's own descriptor link; for messages and for a re-resolution that is then
/// checked against the descriptor).
pub fn path_of(fd: BorrowedFd<'_>) -> io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Whether this kernel resolves paths with `openat2` and its scoping flags; the reason when it
/// does not.
pub fn probe() -> Result<(), String> {
    let root = Dir::open_trusted(Path::new("/")).map_err(|e| format!("opening /: {e}"))?;
    match root.resolve(Path::new("/"), OFlag::O_PATH | OFlag::O_DIRECTORY, true) {
        Ok(_) => {}
        Err(e) => return Err(format!("openat2(RESOLVE_IN_ROOT): {e}")),
    }
    // A magic link must be refused.
    match root.resolve(
        Path::new("/proc/self/root"),
        OFlag::O_PATH | OFlag::O_DIRECTORY,
        true,
    ) {
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("openat2(RESOLVE_NO_MAGICLINKS): {e}")),
        Ok(_) => Err("openat2 followed the magic link /proc/self/root".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "execbox-fsroot-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::canonicalize(&d).unwrap()
    }

    #[test]
    fn probe_passes_here() {
        probe().unwrap();
    }

    #[test]
    fn resolution_stays_inside_the_root() {
        let d = scratch("root");
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::fs::write(d.join("a/b/f"), b"inside").unwrap();
        std::os::unix::fs::symlink("/a/b", d.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../../../../../..", d.join("a/up")).unwrap();
        std::os::unix::fs::symlink("/proc/self/root", d.join("magic")).unwrap();
        let root = Dir::open_trusted(&d).unwrap();
        // An absolute link target resolves inside the root.
        let f = root
            .resolve(Path::new("/abs/f"), OFlag::O_RDONLY, true)
            .unwrap();
        let mut s = String::new();
        File::from(f).read_to_string(&mut s).unwrap();
        assert_eq!(s, "inside");
        // `..` beyond the root stays at the root.
        let up = root.resolve_dir(Path::new("/a/up")).unwrap();
        let ino = |m: std::fs::Metadata| std::os::unix::fs::MetadataExt::ino(&m);
        assert_eq!(ino(up.metadata().unwrap()), ino(root.metadata().unwrap()));
        assert!(up
            .lstat(OsStr::new("abs"))
            .unwrap()
            .file_type()
            .is_symlink());
        // A link into /proc resolves inside the root (where there is no /proc)…
        let e = root.resolve_dir(Path::new("/magic")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        // …and where /proc is reachable, its magic links are refused.
        let host = Dir::open_trusted(Path::new("/")).unwrap();
        let held = format!("/proc/self/fd/{}/..", root.fd().as_raw_fd());
        for magic in ["/proc/self/root", "/proc/self/cwd", held.as_str()] {
            let e = host.resolve_dir(Path::new(magic)).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{magic}");
        }
        // One-name operations never follow a symlink.
        let e = root.subdir(OsStr::new("abs")).unwrap_err();
        assert!(
            matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)),
            "{e}"
        );
        assert!(root.open(OsStr::new("a/b"), OFlag::O_PATH, 0).is_err());
        assert!(root.open(OsStr::new(".."), OFlag::O_PATH, 0).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn directory_operations_through_descriptors() {
        let d = scratch("ops");
        let root = Dir::open_trusted(&d).unwrap();
        root.mkdir(OsStr::new("x"), 0o755).unwrap();
        let x = root.subdir(OsStr::new("x")).unwrap();
        let mut f = x.create_new(OsStr::new("f"), 0o600).unwrap();
        f.write_all(b"data").unwrap();
        assert!(x.create_new(OsStr::new("f"), 0o600).is_err());
        x.symlink(Path::new("/etc"), OsStr::new("l")).unwrap();
        assert_eq!(x.readlink(OsStr::new("l")).unwrap(), Path::new("/etc"));
        let mut names = x.names().unwrap();
        names.sort();
        assert_eq!(names, vec![OsString::from("f"), OsString::from("l")]);
        x.rename(OsStr::new("f"), &root, OsStr::new("g"), true)
            .unwrap();
        std::fs::write(d.join("h"), b"").unwrap();
        let e = root
            .rename(OsStr::new("g"), &root, OsStr::new("h"), true)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        let pinned = root.pin(OsStr::new("g")).unwrap();
        chmod_fd(pinned.as_fd(), 0o640).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(d.join("g")).unwrap().permissions()
            ) & 0o7777,
            0o640
        );
        let mut t = root.tmpfile(0o600).unwrap();
        t.write_all(b"anonymous").unwrap();
        root.remove_tree(OsStr::new("x")).unwrap();
        assert!(!d.join("x").exists());
        // The link's target was not touched.
        assert!(Path::new("/etc").is_dir());
        root.remove_tree(OsStr::new("missing")).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }
}

// Operations for unpacking image layers (execbox-image): each acts on a pinned directory and
// one plain name, never following a symlink at that name.

/// Name of the overlayfs xattr that makes a directory opaque when the overlay is mounted with
/// `userxattr` (hides the same directory of the layers below).
pub const OVERLAY_OPAQUE_XATTR: &str = "user.overlay.opaque";

impl Dir {
    /// Creates `name` as an overlayfs whiteout: a character device with device number 0/0,
    /// which hides `name` of the layers below. Unprivileged users may create it since Linux 5.8.
    pub fn whiteout(&self, name: &OsStr) -> io::Result<()> {
        nix::sys::stat::mknodat(
            self.fd(),
            one_name(name)?,
            nix::sys::stat::SFlag::S_IFCHR,
            Mode::empty(),
            nix::sys::stat::makedev(0, 0),
        )
        .map_err(io_err)
    }

    /// Creates the named pipe `name`.
    pub fn mkfifo(&self, name: &OsStr, mode: u32) -> io::Result<()> {
        nix::sys::stat::mknodat(
            self.fd(),
            one_name(name)?,
            nix::sys::stat::SFlag::S_IFIFO,
            Mode::from_bits_truncate(mode),
            0,
        )
        .map_err(io_err)
    }

    /// Creates `to_name` in `to` as a hard link to the entry `name` of this directory (a
    /// symlink there is linked itself, never followed).
    pub fn hard_link(&self, name: &OsStr, to: &Dir, to_name: &OsStr) -> io::Result<()> {
        nix::unistd::linkat(
            self.fd(),
            one_name(name)?,
            to.fd(),
            one_name(to_name)?,
            AtFlags::empty(),
        )
        .map_err(io_err)
    }

    /// Sets the access and modification times of the entry `name` itself (a symlink's own
    /// times), `name` `.` being the directory itself.
    pub fn set_times(&self, name: &OsStr, atime: (i64, u32), mtime: (i64, u32)) -> io::Result<()> {
        let spec = |(secs, nanos): (i64, u32)| {
            nix::sys::time::TimeSpec::from(libc::timespec {
                tv_sec: secs as libc::time_t,
                tv_nsec: nanos.min(999_999_999) as libc::c_long,
            })
        };
        nix::sys::stat::utimensat(
            self.fd(),
            one_name(name)?,
            &spec(atime),
            &spec(mtime),
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .map_err(io_err)
    }

    /// Sets the extended attribute `key` of the directory itself. `fsetxattr` refuses `O_PATH`
    /// descriptors, so the directory is opened for reading (as itself, `.`) first.
    pub fn set_xattr(&self, key: &str, value: &[u8]) -> io::Result<()> {
        let dir = self.open_name(OsStr::new("."), OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0)?;
        let key = std::ffi::CString::new(key)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in xattr name"))?;
        // SAFETY: `dir` is a live descriptor for the duration of the call, `key` is a valid
        // NUL-terminated string, and `value` points to `value.len()` readable bytes. nix has no
        // xattr wrapper.
        let ret = unsafe {
            libc::fsetxattr(
                dir.as_raw_fd(),
                key.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// The extended attribute `key` of the directory itself (`None` when it has none).
    pub fn xattr(&self, key: &str) -> io::Result<Option<Vec<u8>>> {
        let dir = self.open_name(OsStr::new("."), OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0)?;
        let key = std::ffi::CString::new(key)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in xattr name"))?;
        // An xattr value is at most 64 KiB (XATTR_SIZE_MAX).
        let mut buf = vec![0u8; 65536];
        // SAFETY: `dir` is a live descriptor for the duration of the call, `key` is a valid
        // NUL-terminated string, and `buf` has `buf.len()` writable bytes.
        let ret = unsafe {
            libc::fgetxattr(
                dir.as_raw_fd(),
                key.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENODATA) => Ok(None),
                _ => Err(err),
            };
        }
        buf.truncate(ret as usize);
        Ok(Some(buf))
    }
}

#[cfg(test)]
mod layer_ops_tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    #[test]
    fn whiteouts_links_times_and_xattrs() {
        let d = std::env::temp_dir().join(format!("execbox-fsroot-layer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let root = Dir::open_trusted(&d).unwrap();
        root.whiteout(OsStr::new("gone")).unwrap();
        let md = std::fs::symlink_metadata(d.join("gone")).unwrap();
        assert!(md.file_type().is_char_device());
        assert_eq!(md.rdev(), 0);
        root.mkfifo(OsStr::new("pipe"), 0o644).unwrap();
        assert!(std::fs::symlink_metadata(d.join("pipe"))
            .unwrap()
            .file_type()
            .is_fifo());
        root.symlink(Path::new("/etc/passwd"), OsStr::new("l"))
            .unwrap();
        // The link itself is linked, never its target.
        root.hard_link(OsStr::new("l"), &root, OsStr::new("l2"))
            .unwrap();
        assert_eq!(
            std::fs::read_link(d.join("l2")).unwrap(),
            Path::new("/etc/passwd")
        );
        root.set_times(OsStr::new("l"), (1_000_000, 0), (1_000_000, 5))
            .unwrap();
        assert_eq!(
            std::fs::symlink_metadata(d.join("l")).unwrap().mtime(),
            1_000_000
        );
        // Times of the link, not of /etc/passwd.
        assert_ne!(std::fs::metadata("/etc/passwd").unwrap().mtime(), 1_000_000);
        root.mkdir(OsStr::new("o"), 0o755).unwrap();
        let o = root.subdir(OsStr::new("o")).unwrap();
        assert_eq!(o.xattr(OVERLAY_OPAQUE_XATTR).unwrap(), None);
        o.set_xattr(OVERLAY_OPAQUE_XATTR, b"y").unwrap();
        assert_eq!(
            o.xattr(OVERLAY_OPAQUE_XATTR).unwrap().as_deref(),
            Some(&b"y"[..])
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
