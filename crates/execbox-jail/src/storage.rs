//! A sandbox's storage on the host: the disk its writable layer lives on, and the id-mapped
//! views through which it sees that disk and its read-only layers.
//!
//! A disk is a sparse ext4 image (formatted once per size, then copied: only its few metadata
//! blocks are data), attached to a loop device that detaches itself when its last mount goes
//! and mounted with the new mount API. The kernel enforces its size: a full disk is ENOSPC for
//! the sandbox, never memory pressure. Mounts made here are made in the server's own mount
//! namespace just before a sandbox starts; the sandbox's copy of them keeps the file systems
//! alive, so the server detaches its own right after the start.
//!
//! Id-mapped mounts (`MOUNT_ATTR_IDMAP`) make files that are owned by ids `0..count` on disk
//! appear owned by the sandbox's host range, and the other way round: layers unpacked with the
//! image's own owners serve every sandbox, whatever its range.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::sys;

fn os(errno: sys::Errno, what: impl std::fmt::Display) -> io::Error {
    let e = io::Error::from_raw_os_error(errno);
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with a NUL byte"))
}

/// A user namespace that exists only for its id mapping (`0..count` → `host_base..`), kept
/// open to make id-mapped mounts with. One per uid range; it has no process.
#[derive(Debug)]
pub struct IdMap {
    userns: OwnedFd,
    host_base: u32,
}

impl IdMap {
    /// A user namespace mapping ids `0..count` (uids and gids) to `host_base..host_base+count`.
    pub fn new(host_base: u32, count: u32) -> io::Result<IdMap> {
        let map = format!("0 {host_base} {count}\n");
        Self::with_maps(&map, &map, host_base)
    }

    /// A user namespace with these `uid_map` and `gid_map` lines (`inside outside count`);
    /// [`IdMap::host_id`] counts from `host_base`.
    pub fn with_maps(uid_map: &str, gid_map: &str, host_base: u32) -> io::Result<IdMap> {
        let (hold_read, hold_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let (r, w) = (hold_read.as_raw_fd(), hold_write.as_raw_fd());
        let mut args = sys::CloneArgs {
            flags: libc::CLONE_NEWUSER as u64,
            exit_signal: libc::SIGCHLD as u64,
            ..Default::default()
        };
        // SAFETY: the child only makes raw syscalls (close, read, _exit) on descriptors made
        // above, then exits: async-signal-safe.
        let pid = match unsafe { sys::clone3(&mut args) } {
            Ok(0) => {
                sys::close(w);
                let mut byte = [0u8; 1];
                let _ = sys::read(r, &mut byte);
                sys::exit_now(0)
            }
            Ok(pid) => pid,
            Err(e) => return Err(os(e, "creating an id-mapping user namespace")),
        };
        drop(hold_read);
        let result = (|| {
            for (file, map) in [("uid_map", uid_map), ("gid_map", gid_map)] {
                std::fs::write(format!("/proc/{pid}/{file}"), map)
                    .map_err(|e| io::Error::new(e.kind(), format!("writing {file}: {e}")))?;
            }
            File::open(format!("/proc/{pid}/ns/user")).map(OwnedFd::from)
        })();
        drop(hold_write);
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        Ok(IdMap {
            userns: result?,
            host_base,
        })
    }

    /// The host id that id `inner` of the mapping is.
    pub fn host_id(&self, inner: u32) -> u32 {
        self.host_base.saturating_add(inner)
    }

    /// The user namespace's descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.userns.as_fd()
    }
}

/// The id of the file system `fd` is on (`statvfs`'s `f_fsid`).
pub fn fs_id(fd: BorrowedFd<'_>) -> Option<u64> {
    nix::sys::statvfs::fstatvfs(fd)
        .ok()
        .map(|s| s.filesystem_id())
}

/// Where `mke2fs` is, if installed.
pub fn mke2fs() -> Option<PathBuf> {
    ["/usr/sbin/mke2fs", "/sbin/mke2fs", "/usr/bin/mke2fs"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Bytes per inode of a disk: ext4's default, room for many small files (a `pip install`
/// writes thousands).
const BYTES_PER_INODE: u64 = 16 << 10;
/// Size of one inode.
const INODE_SIZE: u64 = 256;

/// Writes a new sparse ext4 image at `path` that holds `usable` bytes of files, with an empty
/// `upper/` and `work/` (the overlay's writable layer and its work directory), both owned by
/// id 0. The image is larger by the file system's own tables, so that `df` inside shows about
/// the size asked for. No journal: a sandbox's files do not outlive a host crash anyway.
pub fn format_disk(path: &Path, usable: u64) -> io::Result<()> {
    let populate = path.with_extension("populate");
    let _ = std::fs::remove_dir_all(&populate);
    std::fs::create_dir_all(populate.join("upper"))?;
    std::fs::create_dir_all(populate.join("work"))?;
    let result = make_ext4(
        path,
        usable,
        "^has_journal,^resize_inode",
        (0, 0),
        Some(&populate),
    );
    let _ = std::fs::remove_dir_all(&populate);
    result
}

/// Writes a new sparse ext4 image at `path` for a volume: `usable` bytes of files as
/// [`format_disk`], an empty root owned by `owner` (uid, gid), and a journal (a volume's files
/// outlive its sandboxes, and a host crash).
pub fn format_volume(path: &Path, usable: u64, owner: (u32, u32)) -> io::Result<()> {
    make_ext4(path, usable, "^resize_inode", owner, None)
}

fn make_ext4(
    path: &Path,
    usable: u64,
    features: &str,
    owner: (u32, u32),
    populate: Option<&Path>,
) -> io::Result<()> {
    // The inode tables are what ext4 keeps out of the size it reports.
    let size = usable
        .saturating_add(usable / (BYTES_PER_INODE / INODE_SIZE))
        .next_multiple_of(4096);
    let mke2fs = mke2fs().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "mke2fs is not installed (Debian package e2fsprogs)",
        )
    })?;
    let result = (|| {
        let file = File::create(path)?;
        file.set_len(size)?;
        drop(file);
        // Lazy tables: formatting writes a few hundred KiB whatever the size.
        let mut cmd = std::process::Command::new(&mke2fs);
        cmd.args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-m",
            "0",
            "-b",
            "4096",
            "-i",
            &BYTES_PER_INODE.to_string(),
            "-I",
            &INODE_SIZE.to_string(),
            "-O",
            features,
            "-E",
            &format!(
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner={}:{}",
                owner.0, owner.1
            ),
        ]);
        if let Some(dir) = populate {
            cmd.arg("-d").arg(dir);
        }
        let out = cmd.arg(path).stdin(std::process::Stdio::null()).output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "mke2fs {} failed: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Copies `src` to a new file `dst`, only its data extents: holes stay holes.
pub fn sparse_copy(src: &Path, dst: &Path) -> io::Result<()> {
    use nix::unistd::{lseek, Whence};
    let from = File::open(src)?;
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)?;
    let len = from.metadata()?.len();
    to.set_len(len)?;
    let mut pos: i64 = 0;
    let end = len as i64;
    while pos < end {
        let data = match lseek(&from, pos, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(&from, data, Whence::SeekHole).map_err(io::Error::from)?;
        let mut off_in = data;
        let mut off_out = data;
        let mut left = (hole - data) as usize;
        while left > 0 {
            let n = nix::fcntl::copy_file_range(
                &from,
                Some(&mut off_in),
                &to,
                Some(&mut off_out),
                left,
            )
            .map_err(io::Error::from)?;
            if n == 0 {
                break;
            }
            left -= n;
        }
        pos = hole;
    }
    Ok(())
}

/// Numbers of the loop devices this process has bound a disk to. The kernel keeps a loop
/// device once it exists, bound or free, so a burst of sandboxes would leave as many devices
/// behind for good (each makes every `sysinfo(2)` on the host, and the next binds, slower);
/// [`remove_free_loop_devices`] removes those of them that are free again.
static BOUND_LOOPS: std::sync::Mutex<std::collections::BTreeSet<u32>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Free loop devices of this process kept for the next disks (binding a free device is
/// cheaper than making one).
pub const FREE_LOOPS_KEPT: usize = 8;

fn bound_loops() -> std::sync::MutexGuard<'static, std::collections::BTreeSet<u32>> {
    BOUND_LOOPS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes the loop devices this process bound a disk to and that are free again (their disk
/// unmounted everywhere), but for [`FREE_LOOPS_KEPT`] of them. A device bound or opened
/// meanwhile, by this process or another, is refused by the kernel and stays. Returns how
/// many went.
pub fn remove_free_loop_devices() -> io::Result<usize> {
    let numbers: Vec<u32> = bound_loops().iter().copied().collect();
    if numbers.len() <= FREE_LOOPS_KEPT {
        return Ok(0);
    }
    let mut free = Vec::new();
    let mut gone = Vec::new();
    for n in numbers {
        let dev = PathBuf::from(format!("/sys/block/loop{n}"));
        if !dev.exists() {
            gone.push(n);
        } else if !dev.join("loop").exists() {
            // The `loop` attributes exist only while a file backs the device.
            free.push(n);
        }
    }
    let control = File::options()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    let mut removed = 0;
    for n in free.into_iter().skip(FREE_LOOPS_KEPT) {
        match sys::loop_remove(control.as_raw_fd(), n) {
            Ok(()) => {
                removed += 1;
                gone.push(n);
            }
            Err(libc::ENODEV | libc::ENXIO | libc::ENOENT) => gone.push(n),
            // Bound or opened since: its next user keeps it.
            Err(_) => {}
        }
    }
    let mut bound = bound_loops();
    for n in gone {
        bound.remove(&n);
    }
    Ok(removed)
}

/// Attaches `image` to a free loop device that detaches itself once nothing uses it.
fn attach_loop(image: &File) -> io::Result<(OwnedFd, PathBuf)> {
    let control = File::options()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    // Another process may take the device between the query and the configuration: retry.
    for _ in 0..32 {
        let n = sys::loop_get_free(control.as_raw_fd()).map_err(|e| os(e, "LOOP_CTL_GET_FREE"))?;
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let device = match File::options().read(true).write(true).open(&path) {
            Ok(f) => OwnedFd::from(f),
            // Removed since the query (see `remove_free_loop_devices`).
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || matches!(e.raw_os_error(), Some(libc::ENXIO | libc::ENODEV)) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        match sys::loop_configure(
            device.as_raw_fd(),
            image.as_raw_fd(),
            sys::LO_FLAGS_AUTOCLEAR | sys::LO_FLAGS_DIRECT_IO,
        ) {
            Ok(()) => {
                bound_loops().insert(n);
                return Ok((device, path));
            }
            Err(libc::EBUSY) => continue,
            Err(e) => return Err(os(e, format!("LOOP_CONFIGURE {}", path.display()))),
        }
    }
    Err(io::Error::other("no free loop device"))
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a syscall that made a new descriptor nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Mounts the ext4 image at `image` on `target` (nosuid, nodev), seen through `idmap` when
/// given. The loop device behind it goes away with the last mount of it.
pub fn mount_disk(image: &Path, target: &Path, idmap: Option<&IdMap>) -> io::Result<()> {
    let file = File::options().read(true).write(true).open(image)?;
    let (device, device_path) = attach_loop(&file)?;
    drop(file);
    mount_device(device, &device_path, image, target, idmap)
}

/// Like [`mount_disk`], for an image that mounts elsewhere may be using (a shared volume, a
/// server restarted while sandboxes still hold it): the loop device already backed by this
/// very file is mounted again, which gives the same file system, never a second one writing
/// the same blocks.
pub fn mount_shared_disk(image: &Path, target: &Path) -> io::Result<()> {
    let file = File::options().read(true).write(true).open(image)?;
    // The kernel names a loop device's file by its path (with " (deleted)" once removed).
    let canonical = std::fs::canonicalize(image)?;
    let existing = std::fs::read_dir("/sys/block")?.flatten().find_map(|dev| {
        let name = dev.file_name().into_string().ok()?;
        let number = name.strip_prefix("loop")?;
        let backing = std::fs::read_to_string(dev.path().join("loop/backing_file")).ok()?;
        (Path::new(backing.trim_end_matches('\n')) == canonical)
            .then(|| PathBuf::from(format!("/dev/loop{number}")))
    });
    let (device, device_path) = match existing {
        Some(path) => {
            let device = File::options().read(true).write(true).open(&path)?;
            (OwnedFd::from(device), path)
        }
        None => attach_loop(&file)?,
    };
    drop(file);
    mount_device(device, &device_path, image, target, None)
}

fn mount_device(
    device: OwnedFd,
    device_path: &Path,
    image: &Path,
    target: &Path,
    idmap: Option<&IdMap>,
) -> io::Result<()> {
    let fs = owned(sys::fsopen(c"ext4").map_err(|e| os(e, "fsopen ext4"))?);
    sys::fsconfig_set_string(fs.as_raw_fd(), c"source", &cpath(device_path)?)
        .map_err(|e| os(e, "fsconfig source"))?;
    sys::fsconfig_create(fs.as_raw_fd())
        .map_err(|e| os(e, format!("mounting {}", image.display())))?;
    let mount = owned(
        sys::fsmount(
            fs.as_raw_fd(),
            sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV,
        )
        .map_err(|e| os(e, "fsmount"))?,
    );
    if let Some(map) = idmap {
        sys::mount_setattr_fd(mount.as_raw_fd(), 0, Some(map.fd().as_raw_fd()))
            .map_err(|e| os(e, "id-mapping the disk"))?;
    }
    sys::move_mount_to(mount.as_raw_fd(), &cpath(target)?)
        .map_err(|e| os(e, format!("attaching the disk at {}", target.display())))?;
    // The mount holds the device now; our descriptor would only delay its autoclear.
    drop(device);
    Ok(())
}

/// Binds `src` (recursively) at `target`, seen through `idmap`, with `attrs` (`MOUNT_ATTR_*`).
pub fn bind_idmapped(src: &Path, target: &Path, idmap: &IdMap, attrs: u64) -> io::Result<()> {
    let tree = owned(
        sys::open_tree_clone(&cpath(src)?)
            .map_err(|e| os(e, format!("open_tree {}", src.display())))?,
    );
    sys::mount_setattr_fd(tree.as_raw_fd(), attrs, Some(idmap.fd().as_raw_fd()))
        .map_err(|e| os(e, format!("id-mapping {}", src.display())))?;
    sys::move_mount_to(tree.as_raw_fd(), &cpath(target)?)
        .map_err(|e| os(e, format!("attaching {}", target.display())))
}

/// A detached bind mount of the directory open at `dir` (not of what is mounted below it),
/// seen through `idmap`, nosuid and nodev, read-only when asked: what a sandbox gets of a
/// volume. Made from the descriptor, so it is exactly the directory that was resolved.
pub fn detached_volume(dir: BorrowedFd<'_>, idmap: &IdMap, read_only: bool) -> io::Result<OwnedFd> {
    let tree = owned(
        sys::open_tree_clone_fd(dir.as_raw_fd()).map_err(|e| os(e, "open_tree of a volume"))?,
    );
    let mut attrs = sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV;
    if read_only {
        attrs |= sys::MOUNT_ATTR_RDONLY;
    }
    sys::mount_setattr_fd(tree.as_raw_fd(), attrs, Some(idmap.fd().as_raw_fd())).map_err(|e| {
        os(
            e,
            "id-mapping a volume (its file system may not support id-mapped mounts)",
        )
    })?;
    Ok(tree)
}

/// Mounts an overlay at `stage/root` from layers given as paths relative to `stage`:
/// `lowers` (topmost first), `d/upper` and `d/work`. The options show in the sandbox's
/// `mountinfo` as given, so they are relative: the mount is made by a short-lived child that
/// changes into `stage` (a thread of this multi-threaded process may not change the shared
/// working directory).
pub fn mount_overlay(stage: &Path, lowers: &[String]) -> io::Result<()> {
    let dir = cpath(stage)?;
    let data = CString::new(format!(
        "lowerdir={},upperdir=d/upper,workdir=d/work,userxattr",
        lowers.join(":")
    ))
    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "layer path with a NUL byte"))?;
    let mount = || {
        sys::chdir(&dir)
            .and_then(|()| {
                sys::mount(
                    Some(c"overlay"),
                    c"root",
                    Some(c"overlay"),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    Some(&data),
                )
            })
            .err()
            .unwrap_or(0)
    };
    match sys::in_vfork_child(&mount) {
        Ok(0) => Ok(()),
        Ok(errno) => Err(os(
            errno,
            format!("mounting the overlay at {}", stage.display()),
        )),
        Err(errno) => Err(os(errno, "starting the overlay mount")),
    }
}

/// Moves the mount at `from` to `to` (`MS_MOVE`).
pub fn move_mount(from: &Path, to: &Path) -> io::Result<()> {
    nix::mount::mount(
        Some(from),
        to,
        None::<&str>,
        nix::mount::MsFlags::MS_MOVE,
        None::<&str>,
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("moving {} to {}: {e}", from.display(), to.display()),
        )
    })
}

/// Detaches whatever is mounted at `target` (lazily: users keep theirs).
pub fn detach(target: &Path) -> io::Result<()> {
    sys::umount_detach(&cpath(target)?)
        .map_err(|e| os(e, format!("detaching {}", target.display())))
}

/// Whether sandboxes can have disks here: loop devices, `mke2fs`, ext4 through the new mount
/// API and id-mapped mounts. Tried for real on a small image in `scratch`.
pub fn probe(scratch: &Path) -> Result<(), String> {
    if mke2fs().is_none() {
        return Err("mke2fs is not installed (Debian package e2fsprogs)".into());
    }
    std::fs::create_dir_all(scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let image = scratch.join("probe.ext4");
    let target = scratch.join("probe.mnt");
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::create_dir_all(&target);
    let result = (|| {
        format_disk(&image, 16 << 20).map_err(|e| e.to_string())?;
        let map = IdMap::new(100_000, 65_536).map_err(|e| e.to_string())?;
        mount_disk(&image, &target, Some(&map)).map_err(|e| e.to_string())?;
        let owner = std::fs::metadata(target.join("upper"))
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .map_err(|e| e.to_string());
        let _ = detach(&target);
        match owner? {
            100_000 => Ok(()),
            other => Err(format!("id-mapped disk shows owner {other}, not 100000")),
        }
    })();
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_dir(&target);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = std::env::temp_dir().join(format!("execbox-sparse-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let src = dir.join("src");
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = File::create(&src).expect("create");
            f.set_len(64 << 20).expect("len");
            f.seek(SeekFrom::Start(32 << 20)).expect("seek");
            f.write_all(b"middle").expect("write");
        }
        let dst = dir.join("dst");
        sparse_copy(&src, &dst).expect("copy");
        let a = std::fs::read(&src).expect("read");
        let b = std::fs::read(&dst).expect("read");
        assert_eq!(a, b);
        let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&dst).expect("m"));
        assert!(
            blocks * 512 < 1 << 20,
            "copy is not sparse: {blocks} blocks"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The loop device behind each of these disks, found by its backing file.
    fn loop_numbers_of(images: &[PathBuf]) -> Vec<u32> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/sys/block")
            .expect("/sys/block")
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(n) = name.strip_prefix("loop").and_then(|n| n.parse().ok()) else {
                continue;
            };
            let backing =
                std::fs::read_to_string(e.path().join("loop/backing_file")).unwrap_or_default();
            if images.iter().any(|i| Path::new(backing.trim()) == i) {
                out.push(n);
            }
        }
        out
    }

    #[test]
    fn loop_devices_freed_by_unmounted_disks_are_removed_but_a_few() {
        if !root() {
            eprintln!("skipped: needs root (loop devices)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("execbox-loops-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let golden = dir.join("golden.ext4");
        format_disk(&golden, 16 << 20).expect("format");
        let count = FREE_LOOPS_KEPT + 4;
        let mut images = Vec::new();
        let mut mounts = Vec::new();
        for i in 0..count {
            let image = dir.join(format!("{i}.ext4"));
            sparse_copy(&golden, &image).expect("copy");
            let mnt = dir.join(format!("mnt{i}"));
            std::fs::create_dir_all(&mnt).expect("mnt");
            mount_disk(&image, &mnt, None).expect("mount");
            images.push(image);
            mounts.push(mnt);
        }
        let numbers = loop_numbers_of(&images);
        assert_eq!(
            numbers.len(),
            count,
            "one loop device per disk: {numbers:?}"
        );
        for mnt in &mounts {
            detach(mnt).expect("detach");
        }
        // The devices unbind themselves once their mounts are gone.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !loop_numbers_of(&images).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "loop devices still bound"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let free_left = |numbers: &[u32]| {
            numbers
                .iter()
                .filter(|n| {
                    let dev = PathBuf::from(format!("/sys/block/loop{n}"));
                    dev.exists() && !dev.join("loop").exists()
                })
                .count()
        };
        assert_eq!(free_left(&numbers), count, "free, and still there");
        remove_free_loop_devices().expect("remove");
        let left = free_left(&numbers);
        assert!(
            left <= FREE_LOOPS_KEPT,
            "{left} of this test's {count} free loop devices are still there (at most {FREE_LOOPS_KEPT} kept)"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_disk_is_size_limited_and_id_mapped() {
        if !root() {
            eprintln!("skipped: needs root (loop devices)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("execbox-disk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let image = dir.join("d.ext4");
        format_disk(&image, 32 << 20).expect("format");
        let copy = dir.join("c.ext4");
        sparse_copy(&image, &copy).expect("copy");
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).expect("mnt");
        let map = IdMap::new(300_000, 65_536).expect("idmap");
        mount_disk(&copy, &mnt, Some(&map)).expect("mount");
        let checks = (|| -> Result<(), String> {
            let meta = std::fs::metadata(mnt.join("upper")).map_err(|e| e.to_string())?;
            if std::os::unix::fs::MetadataExt::uid(&meta) != 300_000 {
                return Err("the disk is not id-mapped".into());
            }
            // The host's root is not in the mapping: it cannot create files there.
            if File::create(mnt.join("upper/x")).is_ok() {
                return Err("an unmapped writer created a file".into());
            }
            // A writer of the range fills the disk to ENOSPC (fsuid is per thread).
            let upper = mnt.join("upper/fill");
            std::thread::spawn(move || -> Result<(), String> {
                nix::unistd::setfsgid(nix::unistd::Gid::from_raw(300_000));
                nix::unistd::setfsuid(nix::unistd::Uid::from_raw(300_000));
                use std::io::Write;
                let mut f = File::create(&upper).map_err(|e| format!("create: {e}"))?;
                let chunk = vec![1u8; 1 << 20];
                for _ in 0..64 {
                    if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_data()) {
                        return match e.raw_os_error() {
                            Some(libc::ENOSPC) => Ok(()),
                            _ => Err(format!("write: {e}")),
                        };
                    }
                }
                Err("64 MiB fit on a 32 MiB disk".into())
            })
            .join()
            .map_err(|_| "writer panicked".to_string())?
        })();
        let _ = detach(&mnt);
        let _ = std::fs::remove_dir_all(&dir);
        checks.expect("disk checks");
    }
}
