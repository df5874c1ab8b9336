//! Path resolution for the file API, hardened against symlinks planted by user code.
//!
//! Why: the agent is PID 1, so `/proc/1/fd/N` (reachable through a link such as
//! `/home/user/fds -> /proc/1/fd`) are magic links to the agent's own host-side descriptors
//! (cgroup directories, the socket). The file API therefore:
//! 1. resolves a path component by component, following symlinks inside the sandbox but refusing
//!    any step that lands in `/proc` ([`walk`]);
//! 2. opens the resulting directory with `O_PATH | O_NOFOLLOW` and checks that the kernel put it
//!    at the checked path ([`Dir::open`]), so a link swapped in after step 1 is caught;
//! 3. reaches names inside it as `/proc/self/fd/<fd>/<name>`: the agent's own descriptor plus a
//!    single component, the std-only equivalent of `openat`, which no later swap can redirect.

use std::ffi::{OsStr, OsString};
use std::fs::{self, DirBuilder, File, Metadata, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::ApiError;

/// Symlinks followed while resolving one path (the kernel's own limit).
const MAX_SYMLINKS: usize = 40;
/// Mode of files and directories the API creates when the request names none: `0777 & ~022`.
pub const DEFAULT_MODE: u32 = 0o755;

/// `/proc` or anything under it.
pub fn is_proc(path: &Path) -> bool {
    path.starts_with("/proc")
}

/// Why a path could not be resolved.
#[derive(Debug)]
pub enum Unresolved {
    /// The path leads into `/proc` (the canonical prefix that did).
    Proc(PathBuf),
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
            Unresolved::Proc(at) => proc_refusal(shown, &at),
            Unresolved::Io(e) => {
                ApiError::from_io(&format!("error accessing {}", shown.display()), &e)
            }
        }
    }
}

/// The 400 for a path that resolves into `/proc`.
pub fn proc_refusal(shown: &Path, at: &Path) -> ApiError {
    ApiError::BadRequest(format!(
        "invalid request, validation error path {} resolves to {}: /proc is not served by the \
         file API",
        shown.display(),
        at.display()
    ))
}

/// Where a walk ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Walk {
    /// Every component exists; the canonical path (no symlinks, not in `/proc`).
    Found(PathBuf),
    /// `existing` (canonical) exists; `rest` (plain names) does not.
    Missing {
        /// Deepest existing directory.
        existing: PathBuf,
        /// Names still to create below it.
        rest: Vec<OsString>,
    },
}

fn push_components(stack: &mut Vec<OsString>, path: &Path) {
    // A stack popped from the end: push in reverse so the first component comes out first.
    for c in path.components().rev() {
        match c {
            Component::Normal(n) => stack.push(n.to_os_string()),
            Component::ParentDir => stack.push(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
}

/// Resolves an absolute path like `realpath`, but refuses as soon as a step lands in `/proc`.
/// With `allow_missing`, a missing component ends the walk with [`Walk::Missing`].
pub fn walk(path: &Path, allow_missing: bool) -> Result<Walk, Unresolved> {
    let mut out = PathBuf::from("/");
    let mut pending = Vec::new();
    push_components(&mut pending, path);
    let mut links = 0;
    while let Some(c) = pending.pop() {
        if c == ".." {
            out.pop();
            continue;
        }
        out.push(&c);
        if is_proc(&out) {
            return Err(Unresolved::Proc(out));
        }
        match fs::symlink_metadata(&out) {
            Ok(md) if md.file_type().is_symlink() => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP).into());
                }
                let target = fs::read_link(&out)?;
                out.pop();
                if target.is_absolute() {
                    out = PathBuf::from("/");
                }
                push_components(&mut pending, &target);
            }
            Ok(md) => {
                if !pending.is_empty() && !md.is_dir() {
                    return Err(io::Error::from_raw_os_error(libc::ENOTDIR).into());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && allow_missing => {
                out.pop();
                let mut rest = vec![c];
                rest.extend(pending.into_iter().rev());
                // Creating below a dangling link whose target climbs with `..` is not supported:
                // the names to create must be plain.
                if rest.iter().any(|r| r == "..") {
                    return Err(e.into());
                }
                return Ok(Walk::Missing {
                    existing: out,
                    rest,
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Walk::Found(out))
}

/// `/proc/self/fd/<fd>`: the agent's own descriptor as a path.
pub fn fd_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// A directory pinned by an `O_PATH` descriptor at a checked location.
#[derive(Debug)]
pub struct Dir {
    fd: File,
    path: PathBuf,
}

fn open_path_dir(at: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(at)
}

impl Dir {
    /// Opens a canonical directory path (from [`walk`]) and checks that the kernel resolved it to
    /// that same place, which fails if a component was swapped for a symlink in between.
    pub fn open(canonical: &Path) -> Result<Dir, Unresolved> {
        if is_proc(canonical) {
            return Err(Unresolved::Proc(canonical.to_path_buf()));
        }
        let fd = open_path_dir(canonical)?;
        let actual = fs::read_link(fd_path(&fd))?;
        if actual != canonical {
            tracing::warn!(expected = %canonical.display(), actual = %actual.display(),
                "directory moved while being resolved");
            return Err(io::Error::other(format!(
                "{} changed while it was being resolved",
                canonical.display()
            ))
            .into());
        }
        Ok(Dir {
            fd,
            path: canonical.to_path_buf(),
        })
    }

    /// Canonical path of the directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory itself as a path through the agent's descriptor.
    pub fn here(&self) -> PathBuf {
        fd_path(&self.fd)
    }

    /// A name inside the directory, reached through the descriptor (never follows a swapped
    /// parent; whether the name itself is followed is up to the operation).
    pub fn child(&self, name: &OsStr) -> PathBuf {
        self.here().join(name)
    }

    /// Opens a subdirectory without following a symlink at `name`.
    pub fn subdir(&self, name: &OsStr) -> io::Result<Dir> {
        let fd = open_path_dir(&self.child(name))?;
        let path = if name == "." {
            self.path.clone()
        } else {
            self.path.join(name)
        };
        Ok(Dir { fd, path })
    }

    /// Entry names, sorted bytewise (the order upstream lists in).
    pub fn names(&self) -> io::Result<Vec<OsString>> {
        let mut names = fs::read_dir(self.here())?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<Vec<_>>>()?;
        names.sort();
        Ok(names)
    }

    /// fsync of the directory, so a rename into it survives a crash.
    pub fn sync(&self) -> io::Result<()> {
        File::open(self.here())?.sync_all()
    }

    /// Creates a hidden, uniquely named temporary file (mode 0600) for a later
    /// [`Dir::commit`].
    pub fn temp_file(&self) -> io::Result<(File, OsString)> {
        let name = OsString::from(format!(".execbox-upload-{}", uuid::Uuid::new_v4().simple()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.child(&name))?;
        Ok((file, name))
    }

    /// Gives a finished temporary file its owner and mode, makes it durable and renames it over
    /// `name` (replacing a symlink there rather than following it). The temporary file is
    /// removed on failure.
    pub fn commit(&self, file: File, temp: &OsStr, name: &OsStr, owner: Owner) -> io::Result<()> {
        let result = (|| {
            // chown first: it clears set-id bits that the chmod may then set.
            std::os::unix::fs::fchown(&file, Some(owner.uid), Some(owner.gid))?;
            file.set_permissions(fs::Permissions::from_mode(owner.mode))?;
            file.sync_all()?;
            drop(file);
            fs::rename(self.child(temp), self.child(name))?;
            self.sync()
        })();
        if result.is_err() {
            self.remove_temp(temp);
        }
        result
    }

    /// Removes a temporary file, logging (not failing) when that is impossible.
    pub fn remove_temp(&self, temp: &OsStr) {
        if let Err(e) = fs::remove_file(self.child(temp)) {
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

/// An existing name inside a pinned directory (`.` for `/`).
#[derive(Debug)]
pub struct Entry {
    /// The pinned parent.
    pub dir: Dir,
    /// The final component.
    pub name: OsString,
}

impl Entry {
    /// The entry as a path through the parent's descriptor.
    pub fn at(&self) -> PathBuf {
        self.dir.child(&self.name)
    }

    /// `lstat` of the entry.
    pub fn lstat(&self) -> io::Result<Metadata> {
        fs::symlink_metadata(self.at())
    }

    /// Pins the entry itself with `O_PATH | O_NOFOLLOW`; chmod/chown then go through
    /// [`fd_path`] of the result and reach exactly this inode.
    pub fn pin(&self) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
            .open(self.at())
    }
}

fn entry_in(parent: &Path, name: &OsStr) -> Result<Entry, Unresolved> {
    let full = parent.join(name);
    if is_proc(&full) {
        return Err(Unresolved::Proc(full));
    }
    Ok(Entry {
        dir: Dir::open(parent)?,
        name: name.to_os_string(),
    })
}

/// An existing path. With `follow`, a symlink at the end is followed (reading, chmod); without,
/// the entry is the link itself (lstat, delete, rename).
pub fn existing(lexical: &Path, follow: bool) -> Result<Entry, Unresolved> {
    let (parent, name) = match (lexical.parent(), lexical.file_name()) {
        (Some(p), Some(n)) if !follow => match walk(p, false)? {
            Walk::Found(p) => (p, n.to_os_string()),
            Walk::Missing { .. } => return Err(io::Error::from(io::ErrorKind::NotFound).into()),
        },
        _ => match walk(lexical, false)? {
            Walk::Found(full) => match (full.parent(), full.file_name()) {
                (Some(p), Some(n)) => (p.to_path_buf(), n.to_os_string()),
                _ => (full, OsString::from(".")),
            },
            Walk::Missing { .. } => return Err(io::Error::from(io::ErrorKind::NotFound).into()),
        },
    };
    entry_in(&parent, &name)
}

/// `mkdir -p`: the directory at `lexical`, created with its missing parents. Created parents get
/// `parents`' owner and mode; a created final directory gets `last`. Existing directories are
/// left as they are. Returns the pinned directory and whether the final one was created.
pub fn make_dirs(lexical: &Path, parents: Owner, last: Owner) -> Result<(Dir, bool), Unresolved> {
    let (existing, rest) = match walk(lexical, true)? {
        Walk::Found(p) => return Ok((Dir::open(&p)?, false)),
        Walk::Missing { existing, rest } => (existing, rest),
    };
    let mut dir = Dir::open(&existing)?;
    let mut created_last = false;
    for (i, name) in rest.iter().enumerate() {
        if is_proc(&dir.path().join(name)) {
            return Err(Unresolved::Proc(dir.path().join(name)));
        }
        let is_last = i + 1 == rest.len();
        let owner = if is_last { last } else { parents };
        match DirBuilder::new().mode(DEFAULT_MODE).create(dir.child(name)) {
            Ok(()) => {
                let sub = dir.subdir(name)?;
                std::os::unix::fs::chown(sub.here(), Some(owner.uid), Some(owner.gid))?;
                if owner.mode != 0 {
                    fs::set_permissions(sub.here(), fs::Permissions::from_mode(owner.mode))?;
                }
                created_last = is_last;
                dir = sub;
            }
            // Created concurrently; `subdir` refuses it if it is a symlink.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => dir = dir.subdir(name)?,
            Err(e) => return Err(e.into()),
        }
    }
    Ok((dir, created_last))
}

/// The parent directory of `lexical` (created as needed, owned by `parents`) and the final name,
/// for operations that create `lexical`.
pub fn for_create(lexical: &Path, parents: Owner) -> Result<(Dir, OsString), Unresolved> {
    let (Some(parent), Some(name)) = (lexical.parent(), lexical.file_name()) else {
        return Err(io::Error::from_raw_os_error(libc::EISDIR).into());
    };
    let (dir, _) = make_dirs(parent, parents, parents)?;
    if is_proc(&dir.path().join(name)) {
        return Err(Unresolved::Proc(dir.path().join(name)));
    }
    Ok((dir, name.to_os_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn walk_follows_links_and_refuses_proc() {
        let d = scratch("walk");
        fs::create_dir(d.join("real")).unwrap();
        std::os::unix::fs::symlink(d.join("real"), d.join("abs")).unwrap();
        std::os::unix::fs::symlink("real", d.join("rel")).unwrap();
        std::os::unix::fs::symlink("/proc/self", d.join("p")).unwrap();
        std::os::unix::fs::symlink("../../../../../../../../proc", d.join("up")).unwrap();
        assert_eq!(
            walk(&d.join("abs"), false).unwrap(),
            Walk::Found(d.join("real"))
        );
        assert_eq!(
            walk(&d.join("rel"), false).unwrap(),
            Walk::Found(d.join("real"))
        );
        assert!(matches!(
            walk(&d.join("p/fd"), false),
            Err(Unresolved::Proc(_))
        ));
        assert!(matches!(
            walk(&d.join("up"), false),
            Err(Unresolved::Proc(_))
        ));
        assert!(matches!(
            walk(Path::new("/proc"), false),
            Err(Unresolved::Proc(_))
        ));
        assert_eq!(
            walk(&d.join("rel/a/b"), true).unwrap(),
            Walk::Missing {
                existing: d.join("real"),
                rest: vec!["a".into(), "b".into()]
            }
        );
        assert!(matches!(
            walk(&d.join("rel/a"), false),
            Err(Unresolved::Io(_))
        ));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn pinned_dirs_create_and_replace() {
        let d = scratch("pin");
        let me = Owner {
            uid: fs::metadata(&d)
                .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
                .unwrap(),
            gid: fs::metadata(&d)
                .map(|m| std::os::unix::fs::MetadataExt::gid(&m))
                .unwrap(),
            mode: 0o700,
        };
        let (dir, created) = make_dirs(&d.join("x/y"), me, me).unwrap();
        assert!(created);
        assert_eq!(dir.path(), d.join("x/y"));
        dir.replace_contents(OsStr::new("f"), b"hello", Owner { mode: 0o640, ..me })
            .unwrap();
        assert_eq!(fs::read(d.join("x/y/f")).unwrap(), b"hello");
        let md = fs::metadata(d.join("x/y/f")).unwrap();
        assert_eq!(md.permissions().mode() & 0o7777, 0o640);
        assert_eq!(dir.names().unwrap(), vec![OsString::from("f")]);
        let e = existing(&d.join("x/y/f"), false).unwrap();
        assert_eq!(
            (e.dir.path(), e.name.as_os_str()),
            (d.join("x/y").as_path(), OsStr::new("f"))
        );
        // A symlinked directory can not be pinned as a directory.
        std::os::unix::fs::symlink(d.join("x"), d.join("l")).unwrap();
        let top = Dir::open(&d).unwrap();
        assert!(top.subdir(OsStr::new("l")).is_err());
        assert!(Dir::open(&d.join("l")).is_err());
        fs::remove_dir_all(&d).unwrap();
    }
}
