//! Path resolution for every agent route that takes a path, on top of the kernel-enforced
//! primitives of [`execbox_jail::fsroot`].
//!
//! Why: the agent is root of its sandbox and acts for clients on paths whose components the
//! sandbox's own code can swap at any moment. So:
//! 1. a path is resolved by the kernel (`openat2` with `RESOLVE_IN_ROOT |
//!    RESOLVE_NO_MAGICLINKS`): symlinks are followed but stay in the sandbox, and
//!    `/proc/<pid>/fd/N`-style magic links are refused outright;
//! 2. the result is a directory *descriptor* plus one final name; everything after that acts on
//!    the descriptor (`*at` calls with one plain name, `O_NOFOLLOW`), never on the path again;
//! 3. decisions are made on what was opened: the file system of a resolved directory or entry
//!    is checked against the refused ones (`/proc`, and the agent's own data under
//!    `/run/execbox`) by device number.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use execbox_jail::fsroot;
use execbox_jail::rootfs::AGENT_DATA_DIR;

use crate::error::ApiError;

/// Mode of files and directories the API creates when the request names none: `0777 & ~022`.
pub const DEFAULT_MODE: u32 = 0o755;

/// Why a path could not be resolved.
#[derive(Debug)]
pub enum Unresolved {
    /// The path leads into an area the file API does not serve (`/proc`, the agent's data).
    Refused {
        /// The area, as the client would name it.
        area: &'static str,
    },
    /// A filesystem error.
    Io(io::Error),
}

impl From<io::Error> for Unresolved {
    fn from(e: io::Error) -> Self {
        Unresolved::Io(e)
    }
}

impl Unresolved {
    /// The envelope for a request about `shown`.
    pub fn into_api(self, shown: &Path) -> ApiError {
        match self {
            Unresolved::Refused { area } => refusal(shown, area),
            // From a kernel-scoped lookup: a magic link, or a symlink loop.
            Unresolved::Io(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                ApiError::BadRequest(format!(
                    "invalid request, validation error path {} goes through a /proc magic link \
                     or a symlink loop, which the file API does not follow",
                    shown.display()
                ))
            }
            Unresolved::Io(e) => {
                ApiError::from_io(&format!("error accessing {}", shown.display()), &e)
            }
        }
    }

    /// Whether the path (or a component of it) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Unresolved::Io(e) if e.kind() == io::ErrorKind::NotFound)
    }
}

/// The 400 for a path that resolves into an area the file API does not serve.
pub fn refusal(shown: &Path, area: &str) -> ApiError {
    ApiError::BadRequest(format!(
        "invalid request, validation error path {} resolves into {area}, which the file API \
         does not serve",
        shown.display()
    ))
}

/// The sandbox root and the file systems the file API refuses, found once.
struct Resolver {
    root: fsroot::Dir,
    /// `(device, area)` of each refused file system.
    refused: Vec<(u64, &'static str)>,
}

fn resolver() -> io::Result<&'static Resolver> {
    static RESOLVER: OnceLock<Result<Resolver, String>> = OnceLock::new();
    RESOLVER
        .get_or_init(|| {
            let root = fsroot::Dir::open_trusted(Path::new("/")).map_err(|e| e.to_string())?;
            let mut refused = Vec::new();
            for (path, area) in [("/proc", "/proc"), (AGENT_DATA_DIR, "the agent's own data")] {
                if let Ok(md) = std::fs::symlink_metadata(path) {
                    // The agent's data dir is only a file system of its own inside a sandbox.
                    let own_fs = std::fs::symlink_metadata("/").map(|r| r.dev() != md.dev());
                    if own_fs.unwrap_or(false) {
                        refused.push((md.dev(), area));
                    }
                }
            }
            Ok(Resolver { root, refused })
        })
        .as_ref()
        .map_err(|e| io::Error::other(format!("opening the sandbox root: {e}")))
}

/// Refuses a device number of a file system the file API does not serve.
pub fn admit_dev(dev: u64) -> Result<(), Unresolved> {
    match resolver()?.refused.iter().find(|(d, _)| *d == dev) {
        Some((_, area)) => Err(Unresolved::Refused { area }),
        None => Ok(()),
    }
}

/// The final component and its parent; `/` is the root directory itself (`.`).
fn split(path: &Path) -> (PathBuf, OsString) {
    match (path.parent(), path.file_name()) {
        (Some(p), Some(n)) => (p.to_path_buf(), n.to_os_string()),
        _ => (PathBuf::from("/"), OsString::from(".")),
    }
}

/// A directory pinned by a descriptor, with the path it was asked for (for messages).
#[derive(Debug)]
pub struct Dir {
    fs: fsroot::Dir,
    path: PathBuf,
}

/// Where a path is resolved from.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// The sandbox's root: symlinks are followed and kept inside the sandbox.
    Sandbox,
    /// Beneath a directory (the path is relative to it): symlinks are followed only while they
    /// stay beneath it.
    Beneath(&'a Dir),
}

impl Dir {
    /// Resolves the directory at `path` (symlinks followed inside the sandbox) and checks what
    /// was opened.
    pub fn resolve(path: &Path) -> Result<Dir, Unresolved> {
        Self::resolve_in(Scope::Sandbox, path)
    }

    /// Resolves the directory at `path` from `scope` and checks what was opened.
    pub fn resolve_in(scope: Scope<'_>, path: &Path) -> Result<Dir, Unresolved> {
        let flags = fsroot::OpenFlags::O_PATH | fsroot::OpenFlags::O_DIRECTORY;
        let (fs, shown) = match scope {
            Scope::Sandbox => (resolver()?.root.resolve_dir(path)?, path.to_path_buf()),
            Scope::Beneath(base) => (
                fsroot::Dir::from_fd(base.fs.resolve_beneath(path, flags, true)?),
                base.path.join(path),
            ),
        };
        Self::admit(fs, shown)
    }

    fn admit(fs: fsroot::Dir, path: PathBuf) -> Result<Dir, Unresolved> {
        if fs.is_on_proc()? {
            return Err(Unresolved::Refused { area: "/proc" });
        }
        admit_dev(fs.metadata()?.dev())?;
        Ok(Dir { fs, path })
    }

    /// The descriptor-level operations ([`fsroot::Dir`]).
    pub fn fs(&self) -> &fsroot::Dir {
        &self.fs
    }

    /// The subdirectory `name`, never through a symlink, and not on a refused file system.
    pub fn subdir(&self, name: &OsStr) -> io::Result<Dir> {
        let fs = self.fs.subdir(name)?;
        let refused = fs
            .metadata()
            .map(|md| admit_dev(md.dev()).is_err())
            .unwrap_or(true);
        if refused {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "not served by the file API",
            ));
        }
        let path = if name == "." {
            self.path.clone()
        } else {
            self.path.join(name)
        };
        Ok(Dir { fs, path })
    }

    /// `lstat` of the entry `name`.
    pub fn lstat(&self, name: &OsStr) -> io::Result<std::fs::Metadata> {
        self.fs.lstat(name)
    }

    /// Entry names, sorted bytewise (the order upstream lists in).
    pub fn names(&self) -> io::Result<Vec<OsString>> {
        let mut names = self.fs.names()?;
        names.sort();
        Ok(names)
    }

    /// fsync of the directory, so a rename into it survives a crash.
    pub fn sync(&self) -> io::Result<()> {
        self.fs.sync()
    }

    /// Creates a hidden, uniquely named temporary file (mode 0600) for a later
    /// [`Dir::commit`].
    pub fn temp_file(&self) -> io::Result<(File, OsString)> {
        let name = OsString::from(format!(".execbox-upload-{}", uuid::Uuid::new_v4().simple()));
        let file = self.fs.create_new(&name, 0o600)?;
        Ok((file, name))
    }

    /// Gives a finished temporary file its owner and mode, makes it durable and renames it over
    /// `name` (replacing a symlink there rather than following it). The temporary file is
    /// removed on failure.
    pub fn commit(&self, file: File, temp: &OsStr, name: &OsStr, owner: Owner) -> io::Result<()> {
        let result = (|| {
            // chown first: it clears set-id bits that the chmod may then set.
            std::os::unix::fs::fchown(&file, Some(owner.uid), Some(owner.gid))?;
            file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(owner.mode))?;
            file.sync_all()?;
            drop(file);
            self.fs.rename(temp, &self.fs, name, false)?;
            self.sync()
        })();
        if result.is_err() {
            self.remove_temp(temp);
        }
        result
    }

    /// Removes a temporary file, logging (not failing) when that is impossible.
    pub fn remove_temp(&self, temp: &OsStr) {
        if let Err(e) = self.fs.unlink(temp) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.path.display(), error = %e,
                    "could not remove a temporary upload file");
            }
        }
    }

    /// Writes `data` to `name` through a temporary file and a rename.
    pub fn replace_contents(&self, name: &OsStr, data: &[u8], owner: Owner) -> io::Result<()> {
        let (mut file, temp) = self.temp_file()?;
        if let Err(e) = file.write_all(data) {
            drop(file);
            self.remove_temp(&temp);
            return Err(e);
        }
        self.commit(file, &temp, name, owner)
    }

    /// Creates the directory `name` with `owner`, or opens it if it exists (a symlink there is
    /// refused). Returns it and whether it was created.
    pub fn make_subdir(&self, name: &OsStr, owner: Owner) -> io::Result<(Dir, bool)> {
        match self.fs.mkdir(name, DEFAULT_MODE) {
            Ok(()) => {
                let sub = self.subdir(name)?;
                fsroot::chown_fd(sub.fs.fd(), Some(owner.uid), Some(owner.gid))?;
                if owner.mode != 0 {
                    fsroot::chmod_fd(sub.fs.fd(), owner.mode)?;
                }
                Ok((sub, true))
            }
            // Made concurrently, or there already; `subdir` refuses a symlink.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok((self.subdir(name)?, false)),
            Err(e) => Err(e),
        }
    }
}

/// Owner and mode given to a created file or directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Owning uid.
    pub uid: u32,
    /// Owning gid.
    pub gid: u32,
    /// Permission bits (with set-id and sticky bits).
    pub mode: u32,
}

/// A name inside a pinned directory (`.` for `/`); it may not exist (yet).
#[derive(Debug)]
pub struct Entry {
    /// The pinned parent.
    pub dir: Dir,
    /// The final component.
    pub name: OsString,
}

impl Entry {
    /// `lstat` of the entry.
    pub fn lstat(&self) -> io::Result<std::fs::Metadata> {
        self.dir.lstat(&self.name)
    }

    /// Pins the entry itself (a symlink as the link) with `O_PATH`; chmod/chown then act on
    /// exactly this inode.
    pub fn pin(&self) -> io::Result<File> {
        self.dir.fs.pin(&self.name)
    }

    /// Opens the entry for reading, never following a symlink; `O_NONBLOCK` so that a FIFO
    /// planted by user code cannot hang the request (no effect on regular files). Callers
    /// decide on the descriptor's own metadata.
    pub fn open_read(&self) -> io::Result<File> {
        use fsroot::OpenFlags as F;
        self.dir
            .fs
            .open(&self.name, F::O_RDONLY | F::O_NONBLOCK | F::O_NOCTTY, 0)
    }
}

/// The entry at `lexical`. With `follow`, a symlink at the end is followed (reading, chmod) and
/// the entry is its target, found as a parent and a name; without, the entry is the link
/// itself (lstat, delete, rename). Symlinks in the parent components are always followed,
/// inside the sandbox.
pub fn existing(lexical: &Path, follow: bool) -> Result<Entry, Unresolved> {
    let (parent, name) = if follow {
        let target = resolver()?
            .root
            .resolve(lexical, fsroot::OpenFlags::O_PATH, true)?;
        let target = File::from(target);
        let want = target.metadata()?;
        admit_dev(want.dev())?;
        // The kernel's name for what it opened; looked up again below and checked to be the
        // same inode, so a swap in between is caught rather than acted on.
        let canonical = fsroot::path_of(std::os::fd::AsFd::as_fd(&target))?;
        let (parent, name) = split(&canonical);
        let entry = Entry {
            dir: Dir::resolve(&parent)?,
            name,
        };
        let got = entry.lstat()?;
        if (got.dev(), got.ino()) != (want.dev(), want.ino()) {
            return Err(io::Error::other(format!(
                "{} changed while it was being resolved",
                lexical.display()
            ))
            .into());
        }
        return Ok(entry);
    } else {
        split(lexical)
    };
    let entry = Entry {
        dir: Dir::resolve(&parent)?,
        name,
    };
    // A mount point of a refused file system (`/proc` itself) is refused as an entry too.
    match entry.lstat() {
        Ok(md) => admit_dev(md.dev())?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    Ok(entry)
}

/// `mkdir -p`: the directory at `lexical`, created with its missing parents. Created parents get
/// `parents`' owner and mode; a created final directory gets `last`. Existing directories are
/// left as they are. Returns the pinned directory and whether the final one was created.
pub fn make_dirs(lexical: &Path, parents: Owner, last: Owner) -> Result<(Dir, bool), Unresolved> {
    make_dirs_in(Scope::Sandbox, lexical, parents, last)
}

/// [`make_dirs`] from `scope` (for [`Scope::Beneath`], `lexical` is relative to its directory).
pub fn make_dirs_in(
    scope: Scope<'_>,
    lexical: &Path,
    parents: Owner,
    last: Owner,
) -> Result<(Dir, bool), Unresolved> {
    match Dir::resolve_in(scope, lexical) {
        Ok(d) => return Ok((d, false)),
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e),
    }
    let names: Vec<&OsStr> = lexical
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    // The deepest ancestor that exists (symlinks in it followed, inside the scope).
    let mut existing = names.len();
    let mut dir = loop {
        if existing == 0 {
            // Beneath a directory that itself is gone.
            return Err(io::Error::from(io::ErrorKind::NotFound).into());
        }
        existing -= 1;
        let top = match scope {
            Scope::Sandbox => OsStr::new("/"),
            Scope::Beneath(_) => OsStr::new("."),
        };
        let prefix: PathBuf = std::iter::once(top)
            .chain(names[..existing].iter().copied())
            .collect();
        match Dir::resolve_in(scope, &prefix) {
            Ok(d) => break d,
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    };
    let mut created_last = false;
    for (i, name) in names[existing..].iter().enumerate() {
        let is_last = existing + i + 1 == names.len();
        let (sub, created) = dir.make_subdir(name, if is_last { last } else { parents })?;
        created_last = created && is_last;
        dir = sub;
    }
    Ok((dir, created_last))
}

/// The parent directory of `lexical` (created as needed, owned by `parents`) and the final name,
/// for operations that create `lexical`.
pub fn for_create(lexical: &Path, parents: Owner) -> Result<(Dir, OsString), Unresolved> {
    for_create_in(Scope::Sandbox, lexical, parents)
}

/// [`for_create`] from `scope`.
pub fn for_create_in(
    scope: Scope<'_>,
    lexical: &Path,
    parents: Owner,
) -> Result<(Dir, OsString), Unresolved> {
    let (Some(parent), Some(name)) = (lexical.parent(), lexical.file_name()) else {
        return Err(io::Error::from_raw_os_error(libc::EISDIR).into());
    };
    let (dir, _) = make_dirs_in(scope, parent, parents, parents)?;
    Ok((dir, name.to_os_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "execbox-resolve-{tag}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        fs::create_dir_all(&d).unwrap();
        // The scratch path itself may sit behind a symlinked temp dir.
        fs::canonicalize(&d).unwrap()
    }

    fn me(d: &Path) -> Owner {
        let md = fs::metadata(d).unwrap();
        Owner {
            uid: md.uid(),
            gid: md.gid(),
            mode: 0o700,
        }
    }

    #[test]
    fn magic_links_and_proc_are_refused() {
        let d = scratch("magic");
        let held = fs::File::open(&d).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&held);
        std::os::unix::fs::symlink(format!("/proc/self/fd/{fd}/.."), d.join("up")).unwrap();
        std::os::unix::fs::symlink("/proc/self", d.join("p")).unwrap();
        let e = existing(&d.join("up/x"), false).unwrap_err();
        assert!(
            matches!(&e, Unresolved::Io(e) if e.raw_os_error() == Some(libc::ELOOP)),
            "{e:?}"
        );
        assert!(matches!(
            existing(&d.join("p/status"), false),
            Err(Unresolved::Refused { area: "/proc" })
        ));
        assert!(matches!(
            existing(Path::new("/proc"), false),
            Err(Unresolved::Refused { area: "/proc" })
        ));
        assert!(Dir::resolve(Path::new("/proc/self")).is_err());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn entries_follow_links_only_when_asked() {
        let d = scratch("follow");
        fs::create_dir(d.join("real")).unwrap();
        fs::write(d.join("real/f"), b"x").unwrap();
        std::os::unix::fs::symlink(d.join("real/f"), d.join("lf")).unwrap();
        std::os::unix::fs::symlink("real", d.join("ld")).unwrap();
        let e = existing(&d.join("lf"), false).unwrap();
        assert!(e.lstat().unwrap().file_type().is_symlink());
        let e = existing(&d.join("lf"), true).unwrap();
        assert!(e.lstat().unwrap().is_file());
        assert_eq!(e.name, OsString::from("f"));
        // A link in a parent component is followed either way.
        let e = existing(&d.join("ld/f"), false).unwrap();
        assert!(e.lstat().unwrap().is_file());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn pinned_dirs_create_and_replace() {
        let d = scratch("pin");
        let me = me(&d);
        let (dir, created) = make_dirs(&d.join("x/y"), me, me).unwrap();
        assert!(created);
        assert_eq!(dir.path, d.join("x/y"));
        dir.replace_contents(OsStr::new("f"), b"hello", Owner { mode: 0o640, ..me })
            .unwrap();
        assert_eq!(fs::read(d.join("x/y/f")).unwrap(), b"hello");
        let md = fs::metadata(d.join("x/y/f")).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o640);
        assert_eq!(dir.names().unwrap(), vec![OsString::from("f")]);
        let e = existing(&d.join("x/y/f"), false).unwrap();
        assert_eq!(e.name.as_os_str(), OsStr::new("f"));
        // mkdir -p through a symlinked directory; a symlink as a component to create is refused.
        std::os::unix::fs::symlink(d.join("x"), d.join("l")).unwrap();
        let (_, created) = make_dirs(&d.join("l/z"), me, me).unwrap();
        assert!(created && d.join("x/z").is_dir());
        std::os::unix::fs::symlink("/nonexistent", d.join("dangling")).unwrap();
        assert!(make_dirs(&d.join("dangling/a"), me, me).is_err());
        assert!(!Path::new("/nonexistent").exists());
        fs::remove_dir_all(&d).unwrap();
    }
}
