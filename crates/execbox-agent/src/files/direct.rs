//! Direct file work for the run API (`/execbox/…`): all-or-nothing writes under given roots,
//! listings, output-file reads and change tracking. Paths go through the same hardened
//! resolution as the execd file API.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use execbox_jail::process::Credentials;
use execbox_proto::run::{ListFilesResponse, ListedFile};

use super::resolve::{self, Dir, Owner, Scope, Unresolved};

/// Errors of direct file work.
#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    /// The request names a path it may not use.
    #[error("{0}")]
    Invalid(String),
    /// The path does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The filesystem failed.
    #[error("{0}")]
    Io(String),
}

fn unresolved(shown: &Path, e: Unresolved) -> DirectError {
    match e {
        Unresolved::Refused { area } => {
            DirectError::Invalid(format!("{}: {area} is not accessible", shown.display()))
        }
        Unresolved::Io(e) => io_error(shown, e),
    }
}

fn io_error(shown: &Path, e: io::Error) -> DirectError {
    match e.raw_os_error() {
        _ if e.kind() == io::ErrorKind::NotFound => {
            DirectError::NotFound(format!("{}: no such file or directory", shown.display()))
        }
        // The path leaves its root, or goes through a magic link: the request's mistake.
        Some(libc::EXDEV | libc::ELOOP | libc::ENOTDIR | libc::EISDIR | libc::ENAMETOOLONG) => {
            DirectError::Invalid(format!("{}: {e}", shown.display()))
        }
        _ => DirectError::Io(format!("{}: {e}", shown.display())),
    }
}

/// `path` free of `.` and `..`, without touching the filesystem; `None` when relative.
pub fn normalize(path: &Path) -> Option<PathBuf> {
    execbox_proto::paths::normalize_absolute(path.to_str()?).map(PathBuf::from)
}

/// The root among `roots` that `path` (normalized) lies strictly under, and the rest of it.
fn locate<'a>(path: &'a Path, roots: &'a [PathBuf]) -> Option<(&'a Path, &'a Path)> {
    roots.iter().find_map(|r| {
        let rest = path.strip_prefix(r).ok()?;
        (!rest.as_os_str().is_empty()).then_some((r.as_path(), rest))
    })
}

/// A file ready to be renamed into place.
struct Staged {
    dir: Dir,
    temp: std::ffi::OsString,
    name: std::ffi::OsString,
    file: fs::File,
    shown: PathBuf,
}

/// Writes every file through a temporary file beside it, then renames them all: either every
/// file is in place or (on an error before the renames) none is. Each path must lie beneath one
/// of `roots`, and is resolved beneath it by the kernel (symlinks that would leave it are
/// refused). New files and directories belong to `user`.
pub fn write_all(
    files: &[(PathBuf, Vec<u8>)],
    roots: &[PathBuf],
    user: Credentials,
) -> Result<Vec<String>, DirectError> {
    let dir_owner = Owner {
        uid: user.uid,
        gid: user.gid,
        mode: 0o755,
    };
    let file_owner = Owner {
        mode: 0o644,
        ..dir_owner
    };
    let mut staged: Vec<Staged> = Vec::with_capacity(files.len());
    let result = (|| {
        for (path, data) in files {
            let lexical = normalize(path).ok_or_else(|| {
                DirectError::Invalid(format!("{}: not an absolute path", path.display()))
            })?;
            let (root, rest) = locate(&lexical, roots).ok_or_else(|| outside(path, roots))?;
            let base = Dir::resolve(root).map_err(|e| unresolved(path, e))?;
            let (dir, name) = resolve::for_create_in(Scope::Beneath(&base), rest, dir_owner)
                .map_err(|e| unresolved(path, e))?;
            let (mut file, temp) = dir.temp_file().map_err(|e| io_error(path, e))?;
            let write = file.write_all(data);
            staged.push(Staged {
                dir,
                temp,
                name,
                file,
                shown: lexical,
            });
            write.map_err(|e| io_error(path, e))?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        for s in &staged {
            s.dir.remove_temp(&s.temp);
        }
        return Err(e);
    }
    let mut written = Vec::with_capacity(staged.len());
    for s in staged {
        let shown = s.shown.display().to_string();
        s.dir
            .commit(s.file, &s.temp, &s.name, file_owner)
            .map_err(|e| io_error(&s.shown, e))?;
        written.push(shown);
    }
    Ok(written)
}

fn outside(path: &Path, roots: &[PathBuf]) -> DirectError {
    let roots: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
    DirectError::Invalid(format!(
        "{}: must be inside {}",
        path.display(),
        roots.join(" or ")
    ))
}

/// Creates the directory `path` (and missing parents) owned by `user`.
pub fn make_dir(path: &Path, user: Credentials) -> Result<(), DirectError> {
    let owner = Owner {
        uid: user.uid,
        gid: user.gid,
        mode: 0o755,
    };
    resolve::make_dirs(path, owner, owner)
        .map(drop)
        .map_err(|e| unresolved(path, e))
}

/// Whether `path` is a directory the kernel resolves inside the sandbox.
pub fn is_dir(path: &Path) -> bool {
    Dir::resolve(path).is_ok()
}

/// Removes the file `path` itself (a symlink is removed, not followed); missing is fine.
pub fn remove(path: &Path) -> Result<(), DirectError> {
    match resolve::existing(path, false) {
        Ok(entry) => match entry.dir.fs().unlink(&entry.name) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error(path, e)),
            _ => Ok(()),
        },
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(unresolved(path, e)),
    }
}

/// Reads a regular file of at most `max` bytes lying beneath one of `roots`, resolved beneath
/// it by the kernel (a symlink that leaves it, or a magic link, is refused) and judged on the
/// opened descriptor. `Ok(None)` when it does not exist or is not a regular file.
pub fn read_small(
    path: &Path,
    roots: &[PathBuf],
    max: u64,
) -> Result<Option<Vec<u8>>, DirectError> {
    let Some(lexical) = normalize(path) else {
        return Ok(None);
    };
    let (root, rest) = locate(&lexical, roots).ok_or_else(|| outside(path, roots))?;
    let base = match Dir::resolve(root) {
        Ok(d) => d,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(unresolved(path, e)),
    };
    use execbox_jail::fsroot::OpenFlags as F;
    let fd = match base
        .fs()
        .resolve_beneath(rest, F::O_RDONLY | F::O_NONBLOCK | F::O_NOCTTY, true)
    {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(path, e)),
    };
    let file = fs::File::from(fd);
    let md = file.metadata().map_err(|e| io_error(path, e))?;
    if !md.is_file() {
        return Ok(None);
    }
    resolve::admit_dev(std::os::unix::fs::MetadataExt::dev(&md))
        .map_err(|e| unresolved(path, e))?;
    if md.len() > max {
        return Err(DirectError::Invalid(format!(
            "{}: {} bytes is more than the {max} bytes an output file may have",
            path.display(),
            md.len()
        )));
    }
    let mut data = Vec::with_capacity(md.len() as usize);
    file.take(max + 1)
        .read_to_end(&mut data)
        .map_err(|e| io_error(path, e))?;
    Ok(Some(data))
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .replace_nanosecond(0)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn listed(path: &Path, md: &fs::Metadata) -> ListedFile {
    ListedFile {
        path: path.display().to_string(),
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into()),
        kind: super::info::kind_of(md).to_string(),
        size: md.len(),
        modified_at: rfc3339(md.modified().unwrap_or(SystemTime::UNIX_EPOCH)),
    }
}

/// Lists `path` (its direct children, or the whole tree), symlinks listed and never followed,
/// sorted by path, at most `max` entries.
pub fn list(path: &Path, recursive: bool, max: usize) -> Result<ListFilesResponse, DirectError> {
    let lexical = normalize(path)
        .ok_or_else(|| DirectError::Invalid(format!("{}: not an absolute path", path.display())))?;
    let entry = resolve::existing(&lexical, false).map_err(|e| unresolved(path, e))?;
    let md = entry.lstat().map_err(|e| io_error(path, e))?;
    let mut files = Vec::new();
    if md.is_dir() {
        let dir = entry
            .dir
            .subdir(&entry.name)
            .map_err(|e| io_error(path, e))?;
        walk_dir(&dir, &lexical, recursive, max, &mut files)
            .map_err(|e| DirectError::Io(format!("{}: {e}", path.display())))?;
    } else {
        files.push(listed(&lexical, &md));
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(ListFilesResponse {
        path: lexical.display().to_string(),
        files,
    })
}

fn walk_dir(
    dir: &Dir,
    shown: &Path,
    recursive: bool,
    max: usize,
    out: &mut Vec<ListedFile>,
) -> io::Result<()> {
    for name in dir.names()? {
        if out.len() >= max {
            return Ok(());
        }
        let Ok(md) = dir.lstat(&name) else {
            continue;
        };
        let path = shown.join(&name);
        out.push(listed(&path, &md));
        if recursive && md.is_dir() {
            if let Ok(sub) = dir.subdir(&name) {
                walk_dir(&sub, &path, recursive, max, out)?;
            }
        }
    }
    Ok(())
}

/// Identity and version of a regular file: inode, size, modification and change times.
pub type FileStamp = (u64, u64, i64, i64, i64, i64);

/// Regular files under `root` (at most `max`), never following symlinks.
fn regular_files(root: &Path, max: usize, mut each: impl FnMut(PathBuf, &fs::Metadata)) {
    let Ok(dir) = Dir::resolve(root) else { return };
    let mut seen = 0usize;
    let mut stack = vec![(dir, root.to_path_buf())];
    while let Some((dir, shown)) = stack.pop() {
        let Ok(names) = dir.names() else { continue };
        for name in names {
            seen += 1;
            if seen > max {
                return;
            }
            let Ok(md) = dir.lstat(&name) else {
                continue;
            };
            let path = shown.join(&name);
            if md.is_dir() {
                if let Ok(sub) = dir.subdir(&name) {
                    stack.push((sub, path));
                }
            } else if md.is_file() {
                each(path, &md);
            }
        }
    }
}

fn stamp(md: &fs::Metadata) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    (
        md.ino(),
        md.size(),
        md.mtime(),
        md.mtime_nsec(),
        md.ctime(),
        md.ctime_nsec(),
    )
}

/// The regular files under `root` and their stamps, taken before a run.
pub fn snapshot(root: &Path, max: usize) -> HashMap<PathBuf, FileStamp> {
    let mut out = HashMap::new();
    regular_files(root, max, |path, md| {
        out.insert(path, stamp(md));
    });
    out
}

/// Regular files under `root` that are new or changed since `before` (a [`snapshot`]).
/// Comparing stamps rather than times against a clock keeps files written just before the run
/// out: tmpfs times come from the coarse clock, a tick behind.
pub fn changed_since(root: &Path, before: &HashMap<PathBuf, FileStamp>, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    regular_files(root, max, |path, md| {
        if before.get(&path) != Some(&stamp(md)) {
            out.push(path.display().to_string());
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_removes_dots_and_refuses_relative_paths() {
        assert_eq!(
            normalize(Path::new("/a/./b/../c")),
            Some(PathBuf::from("/a/c"))
        );
        assert_eq!(
            normalize(Path::new("/../../etc")),
            Some(PathBuf::from("/etc"))
        );
        assert_eq!(normalize(Path::new("a/b")), None);
    }

    #[test]
    fn roots_exclude_the_root_itself_and_siblings() {
        let roots = [PathBuf::from("/tmp")];
        assert_eq!(
            locate(Path::new("/tmp/x/y"), &roots),
            Some((Path::new("/tmp"), Path::new("x/y")))
        );
        assert!(locate(Path::new("/tmp"), &roots).is_none());
        assert!(locate(Path::new("/tmpx/y"), &roots).is_none());
    }
}
