//! `filesystem.Filesystem` (spec §3.4) on the execd file code: every path resolved by the kernel
//! through `files::resolve` (`jail::fsroot`, no magic links, `/proc` and the agent's data
//! refused), every operation on a pinned directory and one name.
//!
//! Watchers poll: a snapshot of the directory (one level, or the tree when recursive) every
//! [`POLL_EVERY`], diffed against the last one. No inotify: the agent has no binding for it
//! outside `execbox-jail`, and a snapshot sees through symlink swaps the same way every other
//! route does. A rename shows as `REMOVE` + `CREATE`; changes within one interval coalesce.

use std::collections::{BTreeMap, HashMap};
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::connect::{self, de_i64, Code, RpcError};
use super::User;
use crate::error::ApiError;
use crate::files::info::Names;
use crate::files::resolve::{self, Owner, DEFAULT_MODE};
use crate::files::{blocking, parent_owner};
use crate::sse::sleep_until_opt;
use crate::AppState;

/// Interval of a watcher's snapshots.
const POLL_EVERY: Duration = Duration::from_millis(150);
/// Entries one snapshot takes at most (deeper or wider trees are watched in part).
const MAX_WATCH_ENTRIES: usize = 100_000;
/// Events a polled watcher keeps until they are fetched.
const MAX_PENDING_EVENTS: usize = 10_000;
/// Polled watchers kept at once.
const MAX_WATCHERS: usize = 64;
/// Deepest `ListDir`.
const MAX_DEPTH: i64 = 1024;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PathRequest {
    #[serde(default)]
    path: String,
    #[serde(default, deserialize_with = "de_i64")]
    depth: Option<i64>,
    #[serde(default)]
    recursive: bool,
    #[serde(default, alias = "include_entry")]
    include_entry: bool,
}

#[derive(Debug, Default, Deserialize)]
struct MoveRequest {
    #[serde(default)]
    source: String,
    #[serde(default)]
    destination: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WatcherRequest {
    #[serde(default, alias = "watcher_id")]
    watcher_id: String,
}

/// A polled watcher (`CreateWatcher`).
pub(crate) struct Polled {
    events: Mutex<Vec<Value>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Polled {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The polled watchers of this agent.
#[derive(Default)]
pub(crate) struct Watchers {
    map: Mutex<HashMap<String, Arc<Polled>>>,
}

impl Watchers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Polled>>> {
        match self.map.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// `POST /e2b/envd/filesystem.Filesystem/{method}`.
pub async fn rpc(
    State(app): State<Arc<AppState>>,
    UrlPath(method): UrlPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let streaming = method == "WatchDir";
    let fail = |e: RpcError| {
        if streaming {
            connect::stream_error(e)
        } else {
            e.into_response()
        }
    };
    let bytes = match axum::body::to_bytes(body, connect::MAX_MESSAGE).await {
        Ok(b) => b,
        Err(e) => {
            return fail(RpcError::new(
                Code::InvalidArgument,
                format!("reading the request: {e}"),
            ))
        }
    };
    let call = async {
        let user = User::of_rpc(&app, &headers)?;
        match method.as_str() {
            "Stat" => stat(&user, &headers, &bytes).await,
            "MakeDir" => make_dir(&user, &headers, &bytes).await,
            "Move" => move_entry(&user, &headers, &bytes).await,
            "ListDir" => list_dir(&user, &headers, &bytes).await,
            "Remove" => remove(&user, &headers, &bytes).await,
            "WatchDir" => watch_dir(&user, &headers, &bytes).await,
            "CreateWatcher" => create_watcher(&app, &user, &headers, &bytes).await,
            "GetWatcherEvents" => get_watcher_events(&app, &headers, &bytes),
            "RemoveWatcher" => remove_watcher(&app, &headers, &bytes),
            other => Err(RpcError::new(
                Code::Unimplemented,
                format!("filesystem.Filesystem/{other} is not implemented"),
            )),
        }
    };
    let deadline = connect::timeout(&headers).filter(|_| !streaming);
    connect::within(deadline, call).await.unwrap_or_else(fail)
}

fn required_path(user: &User, raw: &str, field: &str) -> Result<PathBuf, RpcError> {
    if raw.is_empty() {
        return Err(RpcError::new(
            Code::InvalidArgument,
            format!("{field} is required"),
        ));
    }
    user.path(raw)
}

/// Go's `os.FileMode` bits of a `st_mode`.
pub(crate) fn go_mode(mode: u32) -> u32 {
    let mut m = mode & 0o777;
    match mode & libc::S_IFMT {
        libc::S_IFDIR => m |= 1 << 31,
        libc::S_IFLNK => m |= 1 << 27,
        libc::S_IFIFO => m |= 1 << 25,
        libc::S_IFSOCK => m |= 1 << 24,
        libc::S_IFBLK => m |= 1 << 26,
        libc::S_IFCHR => m |= (1 << 26) | (1 << 21),
        _ => {}
    }
    if mode & libc::S_ISUID != 0 {
        m |= 1 << 23;
    }
    if mode & libc::S_ISGID != 0 {
        m |= 1 << 22;
    }
    if mode & libc::S_ISVTX != 0 {
        m |= 1 << 20;
    }
    m
}

/// Go's `os.FileMode.String()` (`drwxr-xr-x`, `-rw-r--r--`, `Lrwxrwxrwx`).
pub(crate) fn go_mode_string(m: u32) -> String {
    const TYPES: &[u8] = b"dalTLDpSugct?";
    let mut out = String::new();
    for (i, c) in TYPES.iter().enumerate() {
        if m & (1 << (31 - i)) != 0 {
            out.push(*c as char);
        }
    }
    if out.is_empty() {
        out.push('-');
    }
    for (i, c) in b"rwxrwxrwx".iter().enumerate() {
        out.push(if m & (1 << (8 - i)) != 0 {
            *c as char
        } else {
            '-'
        });
    }
    out
}

fn file_type(md: &Metadata) -> &'static str {
    let ft = md.file_type();
    if ft.is_file() {
        "FILE_TYPE_FILE"
    } else if ft.is_dir() {
        "FILE_TYPE_DIRECTORY"
    } else if ft.is_symlink() {
        "FILE_TYPE_SYMLINK"
    } else {
        "FILE_TYPE_UNSPECIFIED"
    }
}

fn rfc3339(secs: i64, nanos: i64) -> String {
    let total = i128::from(secs) * 1_000_000_000 + i128::from(nanos);
    time::OffsetDateTime::from_unix_timestamp_nanos(total)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// An `EntryInfo`.
pub(crate) fn entry_info(
    path: &Path,
    md: &Metadata,
    names: &Names,
    target: Option<String>,
) -> Value {
    let mode = go_mode(md.mode());
    let mut v = json!({
        "name": path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "/".into()),
        "type": file_type(md),
        "path": path.to_string_lossy(),
        "size": md.size().to_string(),
        "mode": mode,
        "permissions": go_mode_string(mode),
        "owner": names.user_name(md.uid()),
        "group": names.group_name(md.gid()),
        "modifiedTime": rfc3339(md.mtime(), md.mtime_nsec()),
    });
    if let Some(t) = target {
        v["symlinkTarget"] = json!(t);
    }
    v
}

/// The `EntryInfo` of `path` itself (a symlink as the link).
fn stat_entry(path: &Path) -> Result<Value, ApiError> {
    let entry = resolve::existing(path, false).map_err(|e| e.into_api(path))?;
    let md = entry
        .lstat()
        .map_err(|e| ApiError::from_io(&format!("error stating {}", path.display()), &e))?;
    let target = md
        .file_type()
        .is_symlink()
        .then(|| entry.dir.fs().readlink(&entry.name).ok())
        .flatten()
        .map(|t| t.to_string_lossy().into_owned());
    Ok(entry_info(path, &md, &Names::load(), target))
}

async fn stat(user: &User, headers: &HeaderMap, body: &[u8]) -> Result<Response, RpcError> {
    let req: PathRequest = connect::decode_request(headers, body)?;
    let path = required_path(user, &req.path, "path")?;
    let entry = blocking(move || stat_entry(&path)).await?;
    Ok(connect::unary(json!({ "entry": entry })))
}

async fn make_dir(user: &User, headers: &HeaderMap, body: &[u8]) -> Result<Response, RpcError> {
    let req: PathRequest = connect::decode_request(headers, body)?;
    let path = required_path(user, &req.path, "path")?;
    let creds = user.creds;
    let entry = blocking(move || {
        match resolve::existing(&path, true).map(|e| e.lstat()) {
            Ok(Ok(md)) if md.is_dir() => {
                return Err(ApiError::Exists(format!(
                    "directory {} already exists",
                    path.display()
                )))
            }
            Ok(Ok(_)) => {
                return Err(ApiError::BadRequest(format!(
                    "path {} already exists and is not a directory",
                    path.display()
                )))
            }
            _ => {}
        }
        let owner = Owner {
            mode: DEFAULT_MODE,
            ..parent_owner(creds)
        };
        let (_, created) =
            resolve::make_dirs(&path, parent_owner(creds), owner).map_err(|e| e.into_api(&path))?;
        if !created {
            return Err(ApiError::Exists(format!(
                "directory {} already exists",
                path.display()
            )));
        }
        stat_entry(&path)
    })
    .await
    .map_err(|e| match e {
        // A file in the way of a parent.
        ApiError::BadRequest(m) => RpcError::new(Code::InvalidArgument, m),
        other => other.into(),
    })?;
    Ok(connect::unary(json!({ "entry": entry })))
}

async fn move_entry(user: &User, headers: &HeaderMap, body: &[u8]) -> Result<Response, RpcError> {
    let req: MoveRequest = connect::decode_request(headers, body)?;
    let src = required_path(user, &req.source, "source")?;
    let dest = required_path(user, &req.destination, "destination")?;
    let creds = user.creds;
    let entry = blocking(move || {
        crate::files::ops::move_one(&src, &dest, creds, true)?;
        stat_entry(&dest)
    })
    .await?;
    Ok(connect::unary(json!({ "entry": entry })))
}

async fn list_dir(user: &User, headers: &HeaderMap, body: &[u8]) -> Result<Response, RpcError> {
    let req: PathRequest = connect::decode_request(headers, body)?;
    let path = required_path(user, &req.path, "path")?;
    let depth = req.depth.unwrap_or(0);
    if depth < 0 {
        return Err(RpcError::new(
            Code::InvalidArgument,
            "depth must not be negative",
        ));
    }
    let depth = depth.clamp(1, MAX_DEPTH) as usize;
    let entries = blocking(move || {
        let entry = resolve::existing(&path, true).map_err(|e| e.into_api(&path))?;
        let err =
            |e: std::io::Error| ApiError::from_io(&format!("error listing {}", path.display()), &e);
        let md = entry.lstat().map_err(err)?;
        if !md.is_dir() {
            return Err(ApiError::BadRequest(format!(
                "path {} is not a directory",
                path.display()
            )));
        }
        let dir = entry.dir.subdir(&entry.name).map_err(err)?;
        let names = Names::load();
        let mut out = Vec::new();
        // Listed entries carry no `symlinkTarget`: the walk gives no descriptor to read a
        // link through (`Stat` does).
        crate::files::tree::walk_tree(dir, &path, |p, md, level| {
            out.push(entry_info(p, md, &names, None));
            level < depth
        })
        .map_err(err)?;
        Ok(out)
    })
    .await?;
    Ok(connect::unary(json!({ "entries": entries })))
}

async fn remove(user: &User, headers: &HeaderMap, body: &[u8]) -> Result<Response, RpcError> {
    let req: PathRequest = connect::decode_request(headers, body)?;
    let path = required_path(user, &req.path, "path")?;
    if path == Path::new("/") {
        return Err(RpcError::new(
            Code::InvalidArgument,
            "refusing to remove the root directory",
        ));
    }
    blocking(move || {
        let entry = match resolve::existing(&path, false) {
            Ok(e) => e,
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e.into_api(&path)),
        };
        match entry.dir.fs().remove_tree(&entry.name) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ApiError::from_io(
                &format!("error removing {}", path.display()),
                &e,
            )),
            _ => Ok(()),
        }
    })
    .await?;
    Ok(connect::unary(json!({})))
}

/// What a snapshot knows of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    ino: u64,
    mtime: (i64, i64),
    size: u64,
    mode: u32,
}

type Snapshot = BTreeMap<PathBuf, Seen>;

/// The watched directory's entries, relative to it (the tree when `recursive`).
fn snapshot(root: &Path, recursive: bool) -> Result<Snapshot, ApiError> {
    let entry = resolve::existing(root, true).map_err(|e| e.into_api(root))?;
    let err =
        |e: std::io::Error| ApiError::from_io(&format!("error watching {}", root.display()), &e);
    let md = entry.lstat().map_err(err)?;
    if !md.is_dir() {
        return Err(ApiError::BadRequest(format!(
            "path {} is not a directory",
            root.display()
        )));
    }
    let dir = entry.dir.subdir(&entry.name).map_err(err)?;
    let mut snap = Snapshot::new();
    crate::files::tree::walk_tree(dir, Path::new(""), |p, md, _| {
        if snap.len() >= MAX_WATCH_ENTRIES {
            return false;
        }
        snap.insert(
            p.to_path_buf(),
            Seen {
                ino: md.ino(),
                mtime: (md.mtime(), md.mtime_nsec()),
                size: md.size(),
                mode: md.mode(),
            },
        );
        recursive
    })
    .map_err(err)?;
    Ok(snap)
}

/// Events between two snapshots, in name order.
fn diff(old: &Snapshot, new: &Snapshot) -> Vec<Value> {
    let mut out = Vec::new();
    let event = |name: &Path, kind: &str| json!({ "name": name.to_string_lossy(), "type": kind });
    for (name, seen) in new {
        match old.get(name) {
            None => out.push(event(name, "EVENT_TYPE_CREATE")),
            Some(before) if before.ino != seen.ino => {
                out.push(event(name, "EVENT_TYPE_REMOVE"));
                out.push(event(name, "EVENT_TYPE_CREATE"));
            }
            Some(before) => {
                if before.mtime != seen.mtime || before.size != seen.size {
                    out.push(event(name, "EVENT_TYPE_WRITE"));
                }
                if before.mode != seen.mode {
                    out.push(event(name, "EVENT_TYPE_CHMOD"));
                }
            }
        }
    }
    for name in old.keys() {
        if !new.contains_key(name) {
            out.push(event(name, "EVENT_TYPE_REMOVE"));
        }
    }
    out
}

async fn first_snapshot(user: &User, req: &PathRequest) -> Result<(PathBuf, Snapshot), RpcError> {
    let path = required_path(user, &req.path, "path")?;
    let recursive = req.recursive;
    let shown = path.clone();
    let snap = blocking(move || snapshot(&shown, recursive)).await?;
    Ok((path, snap))
}

/// Polls `path` until `each` says stop (or the directory can no longer be read).
async fn poll(
    path: PathBuf,
    recursive: bool,
    mut last: Snapshot,
    mut each: impl FnMut(Vec<Value>) -> bool,
) {
    let mut pause = POLL_EVERY;
    loop {
        tokio::time::sleep(pause).await;
        let p = path.clone();
        let began = Instant::now();
        let Ok(next) = blocking(move || snapshot(&p, recursive)).await else {
            return;
        };
        // A big tree is looked at less often: the walk takes at most a fifth of the time.
        pause = POLL_EVERY.max(began.elapsed() * 4);
        let events = diff(&last, &next);
        last = next;
        if !each(events) {
            return;
        }
    }
}

async fn watch_dir(user: &User, headers: &HeaderMap, body: &[u8]) -> Result<Response, RpcError> {
    let req: PathRequest = connect::decode_request(headers, body)?;
    if req.include_entry {
        return Err(RpcError::new(
            Code::Unimplemented,
            "includeEntry is not supported by this envd version",
        ));
    }
    let (path, snap) = first_snapshot(user, &req).await?;
    let keepalive = connect::keepalive(headers);
    let deadline = connect::timeout(headers).map(|t| Instant::now() + t);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let (etx, mut erx) = mpsc::channel::<Vec<Value>>(16);
    let poller = tokio::spawn(poll(path, req.recursive, snap, move |events| {
        events.is_empty() || etx.try_send(events).is_ok() || !etx.is_closed()
    }));
    tokio::spawn(async move {
        let _poller = AbortOnDrop(poller);
        if tx
            .send(connect::message(&json!({ "start": {} })))
            .await
            .is_err()
        {
            return;
        }
        loop {
            tokio::select! {
                events = erx.recv() => {
                    let Some(events) = events else {
                        let e = RpcError::new(Code::NotFound, "the watched directory is gone");
                        let _ = tx.send(connect::end_stream(Some(&e))).await;
                        return;
                    };
                    for ev in events {
                        if tx.send(connect::message(&json!({ "filesystem": ev }))).await.is_err() {
                            return;
                        }
                    }
                }
                _ = tokio::time::sleep(keepalive) => {
                    if tx.send(connect::message(&json!({ "keepalive": {} }))).await.is_err() {
                        return;
                    }
                }
                _ = sleep_until_opt(deadline) => {
                    let e = RpcError::new(Code::DeadlineExceeded, "the stream's deadline passed");
                    let _ = tx.send(connect::end_stream(Some(&e))).await;
                    return;
                }
                _ = tx.closed() => return,
            }
        }
    });
    Ok(connect::stream_response(rx))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn create_watcher(
    app: &Arc<AppState>,
    user: &User,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, RpcError> {
    let req: PathRequest = connect::decode_request(headers, body)?;
    if req.include_entry {
        return Err(RpcError::new(
            Code::Unimplemented,
            "includeEntry is not supported by this envd version",
        ));
    }
    if app.e2b.watchers.lock().len() >= MAX_WATCHERS {
        return Err(RpcError::new(
            Code::ResourceExhausted,
            format!("at most {MAX_WATCHERS} watchers may exist"),
        ));
    }
    let (path, snap) = first_snapshot(user, &req).await?;
    let id = uuid::Uuid::new_v4().to_string();
    let watcher = Arc::new_cyclic(|weak: &std::sync::Weak<Polled>| {
        let weak = weak.clone();
        let task = tokio::spawn(poll(path, req.recursive, snap, move |events| {
            let Some(w) = weak.upgrade() else {
                return false;
            };
            let mut pending = match w.events.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            let room = MAX_PENDING_EVENTS.saturating_sub(pending.len());
            pending.extend(events.into_iter().take(room));
            true
        }));
        Polled {
            events: Mutex::new(Vec::new()),
            task,
        }
    });
    app.e2b.watchers.lock().insert(id.clone(), watcher);
    Ok(connect::unary(json!({ "watcherId": id })))
}

fn watcher_id(headers: &HeaderMap, body: &[u8]) -> Result<String, RpcError> {
    let req: WatcherRequest = connect::decode_request(headers, body)?;
    if req.watcher_id.is_empty() {
        return Err(RpcError::new(
            Code::InvalidArgument,
            "watcherId is required",
        ));
    }
    Ok(req.watcher_id)
}

fn get_watcher_events(
    app: &Arc<AppState>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, RpcError> {
    let id = watcher_id(headers, body)?;
    let w =
        app.e2b.watchers.lock().get(&id).cloned().ok_or_else(|| {
            RpcError::new(Code::NotFound, format!("watcher with id {id} not found"))
        })?;
    let events = std::mem::take(&mut *match w.events.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    });
    Ok(connect::unary(json!({ "events": events })))
}

fn remove_watcher(
    app: &Arc<AppState>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, RpcError> {
    let id = watcher_id(headers, body)?;
    app.e2b
        .watchers
        .lock()
        .remove(&id)
        .ok_or_else(|| RpcError::new(Code::NotFound, format!("watcher with id {id} not found")))?;
    Ok(connect::unary(json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_go_file_modes() {
        assert_eq!(go_mode(libc::S_IFREG | 0o644), 0o644);
        assert_eq!(go_mode_string(go_mode(libc::S_IFREG | 0o644)), "-rw-r--r--");
        assert_eq!(go_mode(libc::S_IFDIR | 0o755), (1 << 31) | 0o755);
        assert_eq!(go_mode_string(go_mode(libc::S_IFDIR | 0o755)), "drwxr-xr-x");
        assert_eq!(go_mode_string(go_mode(libc::S_IFLNK | 0o777)), "Lrwxrwxrwx");
        assert_eq!(
            go_mode_string(go_mode(libc::S_IFREG | libc::S_ISUID | 0o755)),
            "urwxr-xr-x"
        );
        assert_eq!(
            go_mode_string(go_mode(libc::S_IFDIR | libc::S_ISVTX | 0o777)),
            "dtrwxrwxrwx"
        );
    }

    #[test]
    fn snapshots_diff_into_events() {
        let seen = |ino, size, mode| Seen {
            ino,
            mtime: (1, 0),
            size,
            mode,
        };
        let old: Snapshot = [
            (PathBuf::from("a"), seen(1, 1, 0o644)),
            (PathBuf::from("b"), seen(2, 1, 0o644)),
            (PathBuf::from("c"), seen(3, 1, 0o644)),
        ]
        .into_iter()
        .collect();
        let new: Snapshot = [
            (PathBuf::from("a"), seen(1, 2, 0o644)),
            (PathBuf::from("b"), seen(2, 1, 0o600)),
            (PathBuf::from("d"), seen(4, 0, 0o644)),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            diff(&old, &new),
            vec![
                json!({"name": "a", "type": "EVENT_TYPE_WRITE"}),
                json!({"name": "b", "type": "EVENT_TYPE_CHMOD"}),
                json!({"name": "d", "type": "EVENT_TYPE_CREATE"}),
                json!({"name": "c", "type": "EVENT_TYPE_REMOVE"}),
            ]
        );
        assert!(diff(&new, &new).is_empty());
    }

    #[test]
    fn requests_accept_camel_and_snake_names() {
        let r: PathRequest =
            serde_json::from_str(r#"{"path":"/a","depth":"2","include_entry":true}"#).unwrap();
        assert_eq!((r.depth, r.include_entry), (Some(2), true));
        let r: WatcherRequest = serde_json::from_str(r#"{"watcher_id":"x"}"#).unwrap();
        assert_eq!(r.watcher_id, "x");
        let r: WatcherRequest = serde_json::from_str(r#"{"watcherId":"y"}"#).unwrap();
        assert_eq!(r.watcher_id, "y");
    }
}
