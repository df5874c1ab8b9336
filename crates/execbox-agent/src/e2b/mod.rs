//! The E2B data plane inside the sandbox (`shared/compat/e2b.md` §3–§4). The server forwards
//! E2B requests here with their path prefixed: port 49983 (envd) under `/e2b/envd`, port 49999
//! (the code interpreter) under `/e2b/ci`. It has checked the access token and stripped it; the
//! user comes with the request (`Authorization: Basic base64("<user>:")` on RPCs, `username` on
//! `/files`).
//!
//! - `connect.rs`: the Connect protocol (JSON codec, envelopes, error table, timeouts),
//! - `process.rs`: `process.Process` on a per-agent process table (processes outlive requests),
//! - `filesystem.rs`: `filesystem.Filesystem`, its watchers polling snapshots,
//! - `files.rs`: REST `/files`, `/health`, `/envs`, `/metrics`,
//! - `interpreter.rs`: `/execute` and `/contexts` on the agent's code contexts.
//!
//! Every path goes through `files::resolve` (`jail::fsroot`), every process through `Runner`.

pub(crate) mod connect;
mod files;
mod filesystem;
mod interpreter;
mod process;

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use axum::http::HeaderMap;
use axum::routing::{delete, get, post};
use axum::Router;
use base64::Engine as _;
use execbox_jail::process::Credentials;

use crate::AppState;
use connect::{Code, RpcError};

/// The E2B state of the agent.
#[derive(Default)]
pub(crate) struct E2bState {
    /// The process table of `process.Process`.
    pub procs: process::Procs,
    /// The polled watchers of `filesystem.Filesystem`.
    pub watchers: filesystem::Watchers,
    /// Code contexts being restarted (their running execution ends with `ContextRestarting`).
    pub restarting: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Routes of the E2B data plane.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/e2b/envd/process.Process/{method}", post(process::rpc))
        .route(
            "/e2b/envd/filesystem.Filesystem/{method}",
            post(filesystem::rpc),
        )
        .route(
            "/e2b/envd/files",
            get(files::download)
                .post(files::upload)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/e2b/envd/health", get(files::health))
        .route("/e2b/envd/envs", get(files::envs))
        .route("/e2b/envd/metrics", get(files::metrics))
        .route("/e2b/ci/execute", post(interpreter::execute))
        .route(
            "/e2b/ci/contexts",
            get(interpreter::list_contexts).post(interpreter::create_context),
        )
        .route("/e2b/ci/contexts/{id}", delete(interpreter::delete_context))
        .route(
            "/e2b/ci/contexts/{id}/restart",
            post(interpreter::restart_context),
        )
        .route("/e2b/ci/health", get(files::health))
}

/// The header naming an RPC's user when `Authorization` is not forwarded.
pub(crate) const USER_HEADER: &str = "e2b-user";

/// The user a request acts as.
#[derive(Debug, Clone)]
pub(crate) struct User {
    /// Login name.
    pub name: String,
    /// Identity (uid and primary gid).
    pub creds: Credentials,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Home directory: relative paths and the default working directory.
    pub home: PathBuf,
}

impl User {
    /// The user named `name`: `user` is the sandbox user, `root` uid 0, others from the
    /// sandbox's `/etc/passwd`. `None` when unknown.
    pub fn named(app: &AppState, name: &str) -> Option<User> {
        let names = crate::users::Names::load();
        let default = app.runner.user();
        let (uid, gid) = match name {
            "user" => (default.uid, default.gid),
            "root" => (0, 0),
            other => {
                let uid = names.uid(other)?;
                // A number names a user only when the sandbox knows it.
                names.home_of(uid)?;
                (uid, names.primary_gid(uid).unwrap_or(uid))
            }
        };
        let home = match name {
            "user" => crate::paths::default_cwd(),
            "root" => names
                .home_of(0)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/root")),
            _ => PathBuf::from(names.home_of(uid).unwrap_or("/")),
        };
        Some(User {
            name: name.to_string(),
            creds: Credentials { uid, gid },
            groups: if uid == default.uid {
                Vec::new()
            } else {
                names.supplementary_gids(uid)
            },
            home,
        })
    }

    /// The user of an RPC: `Authorization: Basic base64("<user>:")`, else `E2b-User: <user>`
    /// (for a proxy that strips `Authorization` as a credential), else the default user.
    pub fn of_rpc(app: &AppState, headers: &HeaderMap) -> Result<User, RpcError> {
        let header = |name| {
            headers
                .get(name)
                .and_then(|v: &axum::http::HeaderValue| v.to_str().ok())
        };
        let name = match (
            header(axum::http::header::AUTHORIZATION.as_str()),
            header(USER_HEADER),
        ) {
            (Some(v), _) => basic_user(v).ok_or_else(|| {
                RpcError::new(Code::Unauthenticated, "invalid Authorization header")
            })?,
            (None, Some(u)) => u.trim().to_string(),
            (None, None) => "user".to_string(),
        };
        let name = if name.is_empty() {
            "user".to_string()
        } else {
            name
        };
        User::named(app, &name)
            .ok_or_else(|| RpcError::new(Code::Unauthenticated, format!("invalid user: '{name}'")))
    }

    /// Environment of a process of this user: identity variables, then `envs`.
    pub fn env(&self, envs: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
        let mut out = vec![
            ("HOME".to_string(), self.home.to_string_lossy().into_owned()),
            ("USER".to_string(), self.name.clone()),
            ("LOGNAME".to_string(), self.name.clone()),
        ];
        out.extend(envs);
        out
    }

    /// A request's path: absolute as given, relative (and `~`) against the home directory;
    /// `.` and `..` resolved lexically. Symlinks are the kernel's business later
    /// (`files::resolve`).
    pub fn path(&self, raw: &str) -> Result<PathBuf, RpcError> {
        if raw.contains('\0') {
            return Err(RpcError::new(
                Code::InvalidArgument,
                "path contains a NUL byte",
            ));
        }
        let joined = if raw == "~" {
            self.home.clone()
        } else if let Some(rest) = raw.strip_prefix("~/") {
            self.home.join(rest)
        } else {
            self.home.join(raw)
        };
        if joined.as_os_str().len() > execbox_proto::limits::MAX_PATH_BYTES {
            return Err(RpcError::new(
                Code::InvalidArgument,
                "path is longer than PATH_MAX (4095 bytes)",
            ));
        }
        Ok(normalize(&joined))
    }
}

/// The user of `Basic base64("<user>:")`.
fn basic_user(value: &str) -> Option<String> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    Some(
        text.split_once(':')
            .map(|(u, _)| u)
            .unwrap_or(&text)
            .to_string(),
    )
}

fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_names_the_user() {
        assert_eq!(basic_user("Basic cm9vdDo=").as_deref(), Some("root"));
        assert_eq!(basic_user("basic dXNlcjo=").as_deref(), Some("user"));
        assert_eq!(basic_user("Bearer x"), None);
        assert_eq!(basic_user("Basic !!"), None);
    }

    #[test]
    fn paths_are_relative_to_home() {
        let u = User {
            name: "user".into(),
            creds: Credentials {
                uid: 1000,
                gid: 1000,
            },
            groups: Vec::new(),
            home: PathBuf::from("/home/user"),
        };
        assert_eq!(u.path("a/b").unwrap(), Path::new("/home/user/a/b"));
        assert_eq!(u.path("~/x").unwrap(), Path::new("/home/user/x"));
        assert_eq!(u.path("/tmp/../etc").unwrap(), Path::new("/etc"));
        assert_eq!(u.path("$HOME").unwrap(), Path::new("/home/user/$HOME"));
        assert_eq!(u.path("../../..").unwrap(), Path::new("/"));
        assert!(u.path("a\0b").is_err());
    }
}
