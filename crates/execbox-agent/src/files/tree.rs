//! Tree walks and directories: `GET /files/search`, `GET /directories/list`,
//! `POST /directories`, `DELETE /directories`.

use std::ffi::OsString;
use std::fs::Metadata;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::Json;
use globset::{GlobBuilder, GlobMatcher};

use super::info::{file_info, FileInfo, Names};
use super::resolve::{self, Dir, DEFAULT_MODE};
use super::{blocking, parent_owner, Query};
use crate::error::ApiError;
use crate::paths;
use crate::AppState;

/// Deepest level a walk descends to; deeper trees fail rather than exhaust descriptors.
const MAX_WALK_DEPTH: usize = 1024;

struct Frame {
    dir: Dir,
    shown: PathBuf,
    names: std::vec::IntoIter<OsString>,
}

/// Depth-first walk below `root` without following symlinks: entries in bytewise order, each
/// directory's children right after it. `visit` gets the shown path, lstat and level (1 = a
/// child of the root) and says whether to descend into a directory.
pub(crate) fn walk_tree(
    root: Dir,
    shown: &Path,
    mut visit: impl FnMut(&Path, &Metadata, usize) -> bool,
) -> io::Result<()> {
    let names = root.names()?.into_iter();
    let mut stack = vec![Frame {
        dir: root,
        shown: shown.to_path_buf(),
        names,
    }];
    loop {
        let level = stack.len();
        let Some(top) = stack.last_mut() else {
            break;
        };
        let Some(name) = top.names.next() else {
            stack.pop();
            continue;
        };
        let md = match top.dir.lstat(&name) {
            Ok(md) => md,
            // Removed while walking.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let path = top.shown.join(&name);
        if visit(&path, &md, level) && md.is_dir() {
            if level >= MAX_WALK_DEPTH {
                return Err(io::Error::other(format!(
                    "directory tree deeper than {MAX_WALK_DEPTH} levels"
                )));
            }
            // `subdir` does not follow a symlink swapped in since the lstat, and refuses the
            // file systems the API does not serve (`/proc` when walking from `/`): skipped.
            let sub = match top.dir.subdir(&name) {
                Ok(d) => d,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
                    ) || e.raw_os_error() == Some(libc::ENOTDIR) =>
                {
                    continue
                }
                Err(e) => return Err(e),
            };
            let names = match sub.names() {
                Ok(n) => n.into_iter(),
                // Host-owned directories (e.g. /etc/ssl/private) are unreadable even to the
                // sandbox's root; upstream, running as real root, never meets them, so skip.
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    tracing::debug!(dir = %path.display(), "skipping unreadable directory");
                    continue;
                }
                Err(e) => return Err(e),
            };
            stack.push(Frame {
                dir: sub,
                shown: path,
                names,
            });
        }
    }
    Ok(())
}

/// The glob of `/files/search`, matched against base names only.
fn base_name_glob(pattern: &str) -> Result<GlobMatcher, ApiError> {
    let pattern = if pattern.is_empty() { "**" } else { pattern };
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| {
            ApiError::BadRequest(format!("invalid request, validation error pattern: {e}"))
        })
}

/// `GET /files/search?path=<root>&pattern=<glob>`.
#[utoipa::path(
    get,
    path = "/files/search",
    operation_id = "execdSearchFiles",
    tag = "execd",
    description = "Files under `path` whose name matches `pattern` (a glob).",
    params(
        ("path" = String, Query, description = "Directory."),
        ("pattern" = Option<String>, Query, description = "Glob."),
    ),
    responses(
        (status = 200, description = "Matches.", body = Vec<crate::openapi::schemas::FileInfo>),
        (status = 400, description = "`INVALID_REQUEST_BODY` or `MISSING_QUERY`: the message names what is wrong.", body = execbox_proto::execd::ExecdError),
        (status = 404, description = "`FILE_NOT_FOUND`.", body = execbox_proto::execd::ExecdError),
        (status = 500, description = "`RUNTIME_ERROR`: the agent failed.", body = execbox_proto::execd::ExecdError),
    )
)]
pub async fn search(
    State(app): State<Arc<AppState>>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Vec<FileInfo>>, ApiError> {
    let query = Query::parse(raw.as_deref());
    let root = query.required("path")?;
    let lexical = paths::resolve(root, &app.runner.env_with(&[]))?;
    let glob = base_name_glob(query.first("pattern").unwrap_or(""))?;
    let found = blocking(move || {
        let entry = resolve::existing(&lexical, false).map_err(|e| e.into_api(&lexical))?;
        let err =
            |e: io::Error| ApiError::from_io(&format!("error searching {}", lexical.display()), &e);
        let md = entry.lstat().map_err(err)?;
        let names = Names::load();
        let mut out = Vec::new();
        let matches = |p: &Path| p.file_name().is_some_and(|n| glob.is_match(n));
        if !md.is_dir() {
            // Like a walk of a non-directory: the root itself is the only candidate.
            if matches(&lexical) {
                out.push(file_info(&lexical, &md, &names));
            }
            return Ok(out);
        }
        let dir = entry.dir.subdir(&entry.name).map_err(err)?;
        walk_tree(dir, &lexical, |path, md, _| {
            if !md.is_dir() && matches(path) {
                out.push(file_info(path, md, &names));
            }
            true
        })
        .map_err(err)?;
        Ok(out)
    })
    .await?;
    Ok(Json(found))
}

fn parse_depth(raw: Option<&str>) -> Result<usize, ApiError> {
    match raw {
        None | Some("") => Ok(1),
        Some(d) => d.parse::<usize>().map_err(|_| {
            ApiError::BadRequest(format!(
                "invalid request, validation error invalid depth {d:?}: must be a non-negative \
                 integer"
            ))
        }),
    }
}

/// `GET /directories/list?path=<dir>[&depth=N]`.
#[utoipa::path(
    get,
    path = "/directories/list",
    operation_id = "execdListDirectory",
    tag = "execd",
    description = "A directory's entries.",
    params(
        ("path" = String, Query, description = "Directory."),
    ),
    responses(
        (status = 200, description = "Entries.", body = Vec<crate::openapi::schemas::FileInfo>),
        (status = 400, description = "`INVALID_REQUEST_BODY` or `MISSING_QUERY`: the message names what is wrong.", body = execbox_proto::execd::ExecdError),
        (status = 404, description = "`FILE_NOT_FOUND`.", body = execbox_proto::execd::ExecdError),
        (status = 500, description = "`RUNTIME_ERROR`: the agent failed.", body = execbox_proto::execd::ExecdError),
    )
)]
pub async fn list(
    State(app): State<Arc<AppState>>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Vec<FileInfo>>, ApiError> {
    let query = Query::parse(raw.as_deref());
    let root = query.required("path")?;
    let depth = parse_depth(query.first("depth"))?;
    let lexical = paths::resolve(root, &app.runner.env_with(&[]))?;
    let listed = blocking(move || {
        let entry = resolve::existing(&lexical, false).map_err(|e| e.into_api(&lexical))?;
        let err =
            |e: io::Error| ApiError::from_io(&format!("error listing {}", lexical.display()), &e);
        let md = entry.lstat().map_err(err)?;
        if md.file_type().is_symlink() {
            return Err(ApiError::BadRequest(
                "path is a symbolic link, refusing to traverse".into(),
            ));
        }
        if !md.is_dir() {
            return Err(ApiError::BadRequest(format!(
                "invalid request, validation error {} is not a directory",
                lexical.display()
            )));
        }
        let mut out = Vec::new();
        if depth == 0 {
            return Ok(out);
        }
        let names = Names::load();
        let dir = entry.dir.subdir(&entry.name).map_err(err)?;
        walk_tree(dir, &lexical, |path, md, level| {
            out.push(file_info(path, md, &names));
            level < depth
        })
        .map_err(err)?;
        Ok(out)
    })
    .await?;
    Ok(Json(listed))
}

/// `POST /directories`: `{"<dir>": Permission}`; mkdir -p, then the Permission on a directory
/// that did not exist before.
#[utoipa::path(
    post,
    path = "/directories",
    operation_id = "execdMakeDirectories",
    tag = "execd",
    description = "Creates directories (with parents).",
    request_body = BTreeMap<String, crate::openapi::schemas::Permission>,
    responses(
        (status = 200, description = "Created."),
        (status = 400, description = "`INVALID_REQUEST_BODY` or `MISSING_QUERY`: the message names what is wrong.", body = execbox_proto::execd::ExecdError),
        (status = 404, description = "`FILE_NOT_FOUND`.", body = execbox_proto::execd::ExecdError),
        (status = 409, description = "The destination exists, or a directory is not empty.", body = execbox_proto::execd::ExecdError),
        (status = 413, description = "The sandbox's storage is full.", body = execbox_proto::execd::ExecdError),
        (status = 500, description = "`RUNTIME_ERROR`: the agent failed.", body = execbox_proto::execd::ExecdError),
    )
)]
pub async fn make_directories(
    State(app): State<Arc<AppState>>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let items = super::permission_map(&app, &body)?;
    let user = app.runner.user();
    blocking(move || {
        let names = Names::load();
        for (lexical, perm) in items {
            let last = perm.resolve(&names)?.for_new(user, DEFAULT_MODE);
            resolve::make_dirs(&lexical, parent_owner(user), last)
                .map_err(|e| e.into_api(&lexical))?;
        }
        Ok(())
    })
    .await?;
    Ok(StatusCode::OK)
}

/// `DELETE /directories?path=…`: `rm -rf` of each path; missing ones are fine. A symlink is
/// removed itself, never what it points to.
#[utoipa::path(
    delete,
    path = "/directories",
    operation_id = "execdRemoveDirectories",
    tag = "execd",
    description = "Removes directories with their content.",
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
pub async fn remove_directories(
    State(app): State<Arc<AppState>>,
    RawQuery(raw): RawQuery,
) -> Result<StatusCode, ApiError> {
    let targets = Query::parse(raw.as_deref()).resolved_paths(&app)?;
    blocking(move || {
        for lexical in targets {
            if lexical == Path::new("/") {
                return Err(ApiError::BadRequest(
                    "invalid request, validation error path: refusing to remove the root \
                     directory /"
                        .into(),
                ));
            }
            let err = |e: io::Error| {
                ApiError::from_io(
                    &format!("error removing directory {}", lexical.display()),
                    &e,
                )
            };
            let entry = match resolve::existing(&lexical, false) {
                Ok(e) => e,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e.into_api(&lexical)),
            };
            // Through descriptors only: symlinks inside the tree are removed, never followed.
            match entry.dir.fs().remove_tree(&entry.name) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(err(e)),
            }
        }
        Ok(())
    })
    .await?;
    Ok(StatusCode::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_base_names_only() {
        let g = base_name_glob("*.txt").unwrap();
        assert!(g.is_match("a.txt"));
        assert!(g.is_match(".hidden.txt"));
        assert!(!g.is_match("a.py"));
        let all = base_name_glob("").unwrap();
        assert!(all.is_match("anything"));
        let nested = base_name_glob("src/*.py").unwrap();
        assert!(!nested.is_match("x.py"));
        assert!(base_name_glob("{a,b}.rs").unwrap().is_match("b.rs"));
        assert!(base_name_glob("[").is_err());
    }

    #[test]
    fn depth_parsing() {
        assert_eq!(parse_depth(None).unwrap(), 1);
        assert_eq!(parse_depth(Some("0")).unwrap(), 0);
        assert_eq!(parse_depth(Some("3")).unwrap(), 3);
        assert!(matches!(
            parse_depth(Some("-1")),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            parse_depth(Some("x")),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn listing_is_depth_first_in_name_order() {
        use std::fs;
        let d = std::env::temp_dir().join(format!(
            "execbox-tree-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        let d = {
            fs::create_dir_all(&d).unwrap();
            fs::canonicalize(&d).unwrap()
        };
        for p in ["b/y", "a", "c/z/deep"] {
            fs::create_dir_all(d.join(p)).unwrap();
        }
        fs::write(d.join("b/x.txt"), "1").unwrap();
        fs::write(d.join("a.txt"), "1").unwrap();
        std::os::unix::fs::symlink(d.join("c"), d.join("b/link")).unwrap();
        let collect = |depth: usize| {
            let mut out = Vec::new();
            walk_tree(Dir::resolve(&d).unwrap(), Path::new("/r"), |p, _, level| {
                out.push(p.to_string_lossy().into_owned());
                level < depth
            })
            .unwrap();
            out
        };
        assert_eq!(collect(1), ["/r/a", "/r/a.txt", "/r/b", "/r/c"]);
        assert_eq!(
            collect(2),
            [
                "/r/a",
                "/r/a.txt",
                "/r/b",
                "/r/b/link",
                "/r/b/x.txt",
                "/r/b/y",
                "/r/c",
                "/r/c/z"
            ]
        );
        // The symlink is listed but never descended.
        assert_eq!(collect(10).len(), 9);
        fs::remove_dir_all(&d).unwrap();
    }
}
