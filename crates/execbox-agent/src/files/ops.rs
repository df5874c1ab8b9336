//! `DELETE /files`, `POST /files/permissions`, `POST /files/mv`, `POST /files/replace`.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::info::Names;
use super::resolve::{self, Dir, Entry, Owner};
use super::{blocking, parent_owner, parse_body, Permission, Query};
use crate::error::ApiError;
use crate::paths;
use crate::AppState;
use execbox_jail::fsroot;

/// Deepest directory tree copied by a cross-device move.
const MAX_COPY_DEPTH: usize = 1024;

fn io_err<'a>(what: &str, path: &'a Path) -> impl Fn(io::Error) -> ApiError + 'a {
    let what = what.to_string();
    move |e| ApiError::from_io(&format!("{what} {}", path.display()), &e)
}

/// `DELETE /files?path=…`: removes regular files (and symlinks themselves); missing ones are
/// fine; a directory is a 400 (`DELETE /directories` removes those).
#[utoipa::path(
    delete,
    path = "/files",
    operation_id = "execdDeleteFiles",
    tag = "execd",
    description = "Removes files.",
    params(
        ("path" = Vec<String>, Query, description = "Absolute path (repeatable)."),
    ),
    responses(
        (status = 200, description = "Removed."),
        (status = 400, description = "`INVALID_REQUEST_BODY` or `MISSING_QUERY`: the message names what is wrong.", body = execbox_proto::execd::ExecdError),
        (status = 404, description = "`FILE_NOT_FOUND`.", body = execbox_proto::execd::ExecdError),
        (status = 500, description = "`RUNTIME_ERROR`: the agent failed.", body = execbox_proto::execd::ExecdError),
    )
)]
pub async fn delete_files(
    State(app): State<Arc<AppState>>,
    RawQuery(raw): RawQuery,
) -> Result<StatusCode, ApiError> {
    let targets = Query::parse(raw.as_deref()).resolved_paths(&app)?;
    blocking(move || {
        for lexical in targets {
            let entry = match resolve::existing(&lexical, false) {
                Ok(e) => e,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e.into_api(&lexical)),
            };
            let md = match entry.lstat() {
                Ok(md) => md,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("error removing file", &lexical)(e)),
            };
            if md.is_dir() {
                return Err(ApiError::BadRequest(format!(
                    "invalid request, validation error {} is a directory; remove it with \
                     DELETE /directories",
                    lexical.display()
                )));
            }
            match entry.dir.fs().unlink(&entry.name) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("error removing file", &lexical)(e)),
            }
        }
        Ok(())
    })
    .await?;
    Ok(StatusCode::OK)
}

/// Applies `perm` to an existing path (following a final symlink, as chmod does).
fn apply_permission(lexical: &Path, perm: &Permission, names: &Names) -> Result<(), ApiError> {
    let wanted = perm.resolve(names)?;
    if wanted == super::Wanted::default() {
        return Ok(());
    }
    let entry = resolve::existing(lexical, true).map_err(|e| e.into_api(lexical))?;
    let err = io_err("error changing permissions of", lexical);
    // Pinning the inode makes chown/chmod act on exactly what was resolved.
    let pinned = entry.pin().map_err(&err)?;
    if pinned.metadata().map_err(&err)?.file_type().is_symlink() {
        return Err(ApiError::Exists(format!(
            "error changing permissions of {}. path changed while in use",
            lexical.display()
        )));
    }
    if wanted.uid.is_some() || wanted.gid.is_some() {
        fsroot::chown_fd(pinned.as_fd(), wanted.uid, wanted.gid).map_err(&err)?;
    }
    if let Some(mode) = wanted.mode {
        fsroot::chmod_fd(pinned.as_fd(), mode).map_err(&err)?;
    }
    Ok(())
}

/// `POST /files/permissions`: `{"<path>": Permission}`.
#[utoipa::path(
    post,
    path = "/files/permissions",
    operation_id = "execdSetPermissions",
    tag = "execd",
    description = "Sets owners and modes.",
    request_body = BTreeMap<String, crate::openapi::schemas::Permission>,
    responses(
        (status = 200, description = "Set."),
        (status = 400, description = "`INVALID_REQUEST_BODY` or `MISSING_QUERY`: the message names what is wrong.", body = execbox_proto::execd::ExecdError),
        (status = 404, description = "`FILE_NOT_FOUND`.", body = execbox_proto::execd::ExecdError),
        (status = 500, description = "`RUNTIME_ERROR`: the agent failed.", body = execbox_proto::execd::ExecdError),
    )
)]
pub async fn permissions(
    State(app): State<Arc<AppState>>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let items = super::permission_map(&app, &body)?;
    blocking(move || {
        let names = Names::load();
        items
            .iter()
            .try_for_each(|(lexical, perm)| apply_permission(lexical, perm, &names))
    })
    .await?;
    Ok(StatusCode::OK)
}

#[derive(Debug, Deserialize)]
struct MoveItem {
    #[serde(default)]
    src: Option<String>,
    #[serde(default)]
    dest: Option<String>,
}

/// Copies `sdir/sname` to `ddir/dname` without following symlinks, keeping modes and owners
/// (a rename across filesystems). Every decision is made on an opened descriptor.
fn copy_entry(
    sdir: &Dir,
    sname: &OsStr,
    ddir: &Dir,
    dname: &OsStr,
    depth: usize,
) -> io::Result<()> {
    if depth > MAX_COPY_DEPTH {
        return Err(io::Error::other("directory tree too deep to copy"));
    }
    let md = sdir.lstat(sname)?;
    let ft = md.file_type();
    if ft.is_symlink() {
        ddir.fs().symlink(&sdir.fs().readlink(sname)?, dname)?;
        ddir.fs().chown(dname, Some(md.uid()), Some(md.gid()))
    } else if ft.is_dir() {
        ddir.fs().mkdir(dname, 0o700)?;
        let (s, d) = (sdir.subdir(sname)?, ddir.subdir(dname)?);
        for name in s.names()? {
            copy_entry(&s, &name, &d, &name, depth + 1)?;
        }
        let smd = s.fs().metadata()?;
        fsroot::chown_fd(d.fs().fd(), Some(smd.uid()), Some(smd.gid()))?;
        fsroot::chmod_fd(d.fs().fd(), smd.mode() & 0o7777)
    } else if ft.is_file() {
        let mut from = sdir.fs().open(
            sname,
            fsroot::OpenFlags::O_RDONLY | fsroot::OpenFlags::O_NONBLOCK,
            0,
        )?;
        // Decided on the opened file: a FIFO or directory swapped in since the lstat is refused.
        let fmd = from.metadata()?;
        if !fmd.is_file() {
            return Err(io::Error::other("path changed while being moved"));
        }
        let mut to = ddir.fs().create_new(dname, 0o600)?;
        io::copy(&mut from, &mut to)?;
        std::os::unix::fs::fchown(&to, Some(fmd.uid()), Some(fmd.gid()))?;
        to.set_permissions(std::fs::Permissions::from_mode(fmd.mode() & 0o7777))?;
        to.sync_all()
    } else {
        Err(io::Error::other(
            "special files can not be moved across filesystems",
        ))
    }
}

/// Moves `src` to `dest`, creating the destination's parents; an existing destination is
/// refused unless `replace` (then a file or empty directory there is replaced, as `rename(2)`).
pub(crate) fn move_one(
    src: &Path,
    dest: &Path,
    user: execbox_jail::process::Credentials,
    replace: bool,
) -> Result<(), ApiError> {
    let what = format!("error moving {} to {}", src.display(), dest.display());
    let err = |e: io::Error| ApiError::from_io(&what, &e);
    let from: Entry = resolve::existing(src, false).map_err(|e| e.into_api(src))?;
    from.lstat().map_err(err)?;
    let (ddir, dname) =
        resolve::for_create(dest, parent_owner(user)).map_err(|e| e.into_api(dest))?;
    // RENAME_NOREPLACE: the kernel refuses an existing destination, whatever appeared there.
    match from
        .dir
        .fs()
        .rename(&from.name, ddir.fs(), &dname, !replace)
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(ApiError::Exists(format!(
            "{what}. destination already exists"
        ))),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            if let Err(e) = copy_entry(&from.dir, &from.name, &ddir, &dname, 0) {
                if let Err(cleanup) = ddir.fs().remove_tree(&dname) {
                    tracing::warn!(error = %cleanup, "could not remove a partial copy");
                }
                return Err(err(e));
            }
            ddir.sync().map_err(err)?;
            from.dir.fs().remove_tree(&from.name).map_err(err)
        }
        Err(e) => Err(err(e)),
    }
}

/// `POST /files/mv`: `[{"src","dest"}]`, in order; the destination's parent is created.
#[utoipa::path(
    post,
    path = "/files/mv",
    operation_id = "execdMoveFiles",
    tag = "execd",
    description = "Moves files.",
    request_body = Vec<crate::openapi::schemas::MoveItem>,
    responses(
        (status = 200, description = "Moved."),
        (status = 400, description = "`INVALID_REQUEST_BODY` or `MISSING_QUERY`: the message names what is wrong.", body = execbox_proto::execd::ExecdError),
        (status = 404, description = "`FILE_NOT_FOUND`.", body = execbox_proto::execd::ExecdError),
        (status = 409, description = "The destination exists, or a directory is not empty.", body = execbox_proto::execd::ExecdError),
        (status = 413, description = "The sandbox's storage is full.", body = execbox_proto::execd::ExecdError),
        (status = 500, description = "`RUNTIME_ERROR`: the agent failed.", body = execbox_proto::execd::ExecdError),
    )
)]
pub async fn move_files(
    State(app): State<Arc<AppState>>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let req: Option<Vec<Option<MoveItem>>> = parse_body(&body)?;
    let env = app.runner.env_with(&[]);
    let mut items: Vec<(PathBuf, PathBuf)> = Vec::new();
    for item in req.unwrap_or_default().into_iter().flatten() {
        match (item.src.as_deref(), item.dest.as_deref()) {
            (Some(s), Some(d)) if !s.is_empty() && !d.is_empty() => {
                items.push((paths::resolve(s, &env)?, paths::resolve(d, &env)?))
            }
            _ => {
                return Err(ApiError::BadRequest(
                    "invalid request, validation error src and dest are required".into(),
                ))
            }
        }
    }
    let user = app.runner.user();
    blocking(move || {
        items
            .iter()
            .try_for_each(|(src, dest)| move_one(src, dest, user, false))
    })
    .await?;
    Ok(StatusCode::OK)
}

#[derive(Debug, Default, Deserialize)]
struct ReplaceItem {
    #[serde(default)]
    old: Option<String>,
    #[serde(default)]
    new: Option<String>,
}

#[derive(Debug, Serialize)]
struct Replaced {
    #[serde(rename = "replacedCount")]
    replaced_count: usize,
}

/// Replaces every non-overlapping occurrence of `old` (non-empty), left to right.
pub fn replace_bytes(data: &[u8], old: &[u8], new: &[u8]) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let mut count = 0;
    let mut start = 0;
    let mut i = 0;
    while !old.is_empty() && i + old.len() <= data.len() {
        // Scan for the first byte, then compare the rest.
        match data[i..=data.len() - old.len()]
            .iter()
            .position(|b| *b == old[0])
        {
            None => break,
            Some(off) => i += off,
        }
        if data[i..].starts_with(old) {
            if count == 0 {
                out.reserve(data.len());
            }
            out.extend_from_slice(&data[start..i]);
            out.extend_from_slice(new);
            count += 1;
            i += old.len();
            start = i;
        } else {
            i += 1;
        }
    }
    if count == 0 {
        return (Vec::new(), 0);
    }
    out.extend_from_slice(&data[start..]);
    (out, count)
}

fn replace_one(lexical: &Path, old: &str, new: &str) -> Result<usize, ApiError> {
    let err = io_err("error replacing in", lexical);
    let entry = resolve::existing(lexical, true).map_err(|e| e.into_api(lexical))?;
    let mut file = entry.open_read().map_err(&err)?;
    let md = file.metadata().map_err(&err)?;
    if !md.is_file() {
        return Err(ApiError::BadRequest(format!(
            "invalid request, validation error {} is not a regular file",
            lexical.display()
        )));
    }
    let mut data = Vec::with_capacity(md.len() as usize);
    file.read_to_end(&mut data).map_err(&err)?;
    let (out, count) = replace_bytes(&data, old.as_bytes(), new.as_bytes());
    if count > 0 {
        let owner = Owner {
            uid: md.uid(),
            gid: md.gid(),
            mode: md.mode() & 0o7777,
        };
        entry
            .dir
            .replace_contents(&entry.name, &out, owner)
            .map_err(&err)?;
    }
    Ok(count)
}

/// `POST /files/replace[?verbose=true]`: `{"<path>":{"old","new"}}`.
#[utoipa::path(
    post,
    path = "/files/replace",
    operation_id = "execdReplaceInFiles",
    tag = "execd",
    description = "Replaces text in files.",
    params(("verbose" = Option<bool>, Query, description = "Answer with the counts per file.")),
    request_body = BTreeMap<String, crate::openapi::schemas::ReplaceItem>,
    responses(
        (status = 200, description = "Replaced: an empty body, or with `?verbose=true` the counts per file (path to `Replaced`)."),
        (status = 400, description = "`INVALID_REQUEST_BODY` or `MISSING_QUERY`: the message names what is wrong.", body = execbox_proto::execd::ExecdError),
        (status = 404, description = "`FILE_NOT_FOUND`.", body = execbox_proto::execd::ExecdError),
        (status = 413, description = "The sandbox's storage is full.", body = execbox_proto::execd::ExecdError),
        (status = 500, description = "`RUNTIME_ERROR`: the agent failed.", body = execbox_proto::execd::ExecdError),
    )
)]
pub async fn replace(
    State(app): State<Arc<AppState>>,
    RawQuery(raw): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    let query = Query::parse(raw.as_deref());
    let verbose = matches!(
        query.first("verbose"),
        Some("1" | "t" | "T" | "true" | "TRUE" | "True")
    );
    let req: Option<BTreeMap<String, Option<ReplaceItem>>> = parse_body(&body)?;
    let env = app.runner.env_with(&[]);
    let mut items = Vec::new();
    for (raw_path, item) in req.unwrap_or_default() {
        let item = item.unwrap_or_default();
        let old = item.old.unwrap_or_default();
        if old.is_empty() {
            return Err(ApiError::BadRequest(
                "invalid request, validation error old content must not be empty".into(),
            ));
        }
        let lexical = paths::resolve(&raw_path, &env)?;
        items.push((raw_path, lexical, old, item.new.unwrap_or_default()));
    }
    let counts = blocking(move || {
        let mut counts = BTreeMap::new();
        for (raw_path, lexical, old, new) in items {
            let n = replace_one(&lexical, &old, &new)?;
            counts.insert(raw_path, Replaced { replaced_count: n });
        }
        Ok(counts)
    })
    .await?;
    Ok(if verbose {
        Json(counts).into_response()
    } else {
        StatusCode::OK.into_response()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_all_non_overlapping() {
        assert_eq!(replace_bytes(b"aaaa", b"aa", b"b"), (b"bb".to_vec(), 2));
        assert_eq!(
            replace_bytes(b"x.y.z", b".", b"::"),
            (b"x::y::z".to_vec(), 2)
        );
        assert_eq!(replace_bytes(b"hello", b"world", b"x"), (Vec::new(), 0));
        assert_eq!(replace_bytes(b"abcab", b"ab", b""), (b"c".to_vec(), 2));
        assert_eq!(replace_bytes(b"ab", b"abc", b""), (Vec::new(), 0));
        assert_eq!(replace_bytes(b"", b"a", b"b"), (Vec::new(), 0));
        assert_eq!(replace_bytes(b"aXbX", b"X", b"YY"), (b"aYYbYY".to_vec(), 2));
    }
}
