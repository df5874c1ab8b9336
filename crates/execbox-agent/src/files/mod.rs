//! The execd filesystem (`/files/*`) and directory (`/directories*`) API.
//!
//! Every path goes through [`crate::paths::resolve`] and then [`resolve`], which refuses
//! `/proc` and pins directories so that symlinks planted by user code cannot redirect an
//! operation. Blocking file work runs on tokio's blocking pool (the agent's runtime is
//! single-threaded); uploads and downloads stream through a blocking worker per transfer.

pub(crate) mod direct;
pub(crate) mod download;
pub(crate) mod info;
pub(crate) mod ops;
pub(crate) mod resolve;
pub(crate) mod tree;
pub(crate) mod upload;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use axum::Router;
use execbox_jail::process::Credentials;
use percent_encoding::percent_decode_str;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::ApiError;
use crate::AppState;
use info::Names;
use resolve::{Owner, DEFAULT_MODE};

/// Routes of the filesystem and directory API.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/files/info", get(info::info))
        .route("/files", delete(ops::delete_files))
        .route("/files/permissions", post(ops::permissions))
        .route("/files/mv", post(ops::move_files))
        .route("/files/replace", post(ops::replace))
        .route("/files/search", get(tree::search))
        // The whole body is read before the answer by the router's `drain` layer.
        .route(
            "/files/upload",
            post(upload::upload).layer(DefaultBodyLimit::disable()),
        )
        .route("/files/download", get(download::download))
        .route("/directories/list", get(tree::list))
        .route(
            "/directories",
            post(tree::make_directories).delete(tree::remove_directories),
        )
}

/// Decoded query parameters in order; repeated keys are kept (`?path=a&path=b`).
#[derive(Debug, Default)]
pub(crate) struct Query(Vec<(String, String)>);

fn decode_component(s: &str) -> String {
    percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

impl Query {
    /// Parses a raw query string (`+` is a space, `%XX` escapes).
    pub fn parse(raw: Option<&str>) -> Self {
        let pairs = raw
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (decode_component(k), decode_component(v))
            })
            .collect();
        Query(pairs)
    }

    /// Every `path` value, resolved against the sandbox environment (`paths::resolve`).
    pub fn resolved_paths(&self, app: &AppState) -> Result<Vec<std::path::PathBuf>, ApiError> {
        let env = app.runner.env_with(&[]);
        self.all("path")
            .map(|p| crate::paths::resolve(p, &env))
            .collect()
    }

    /// Every value of `key`.
    pub fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The first value of `key`.
    pub fn first(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The first non-empty value of a required parameter, else 400 `MISSING_QUERY`.
    pub fn required(&self, key: &str) -> Result<&str, ApiError> {
        self.first(key)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| ApiError::MissingQuery(format!("missing query parameter '{key}'")))
    }
}

/// Parses a JSON body leniently (unknown fields ignored, `null` = absent), with upstream's
/// error prefix.
pub(crate) fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::BadRequest(format!(
            "error parsing request, MAYBE invalid body format. {e}"
        ))
    })
}

/// A `{"<path>": Permission}` body (`/files/permissions`, `/directories`): each path resolved
/// against the sandbox environment, a `null` Permission as the default one.
pub(crate) fn permission_map(
    app: &AppState,
    body: &[u8],
) -> Result<Vec<(std::path::PathBuf, Permission)>, ApiError> {
    let req: Option<std::collections::BTreeMap<String, Option<Permission>>> = parse_body(body)?;
    let env = app.runner.env_with(&[]);
    req.unwrap_or_default()
        .into_iter()
        .map(|(p, perm)| Ok((crate::paths::resolve(&p, &env)?, perm.unwrap_or_default())))
        .collect()
}

/// Runs blocking file work on the blocking pool.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Runtime(format!("file operation failed. {e}")))?
}

/// The Permission object of `/files/permissions`, `/directories` and upload metadata.
#[derive(Debug, Default, Clone, Deserialize)]
pub(crate) struct Permission {
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub mode: Option<i64>,
}

/// A validated Permission: `None` leaves that attribute alone.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Wanted {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mode: Option<u32>,
}

impl Permission {
    /// Resolves names and the mode; an unknown name or a non-octal mode is a 400.
    pub fn resolve(&self, names: &Names) -> Result<Wanted, ApiError> {
        let uid = match self.owner.as_deref().filter(|o| !o.is_empty()) {
            Some(o) => Some(names.uid(o).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "invalid request, validation error owner: unknown user {o}"
                ))
            })?),
            None => None,
        };
        let gid = match self.group.as_deref().filter(|g| !g.is_empty()) {
            Some(g) => Some(names.gid(g).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "invalid request, validation error group: unknown group {g}"
                ))
            })?),
            None => None,
        };
        let mode = match self.mode {
            None | Some(0) => None,
            Some(m) => Some(info::mode_from_decimal(m)?),
        };
        Ok(Wanted { uid, gid, mode })
    }
}

impl Wanted {
    /// Owner and mode of something the API creates: the sandbox user unless asked otherwise,
    /// `default_mode` when no mode was given.
    pub fn for_new(&self, user: Credentials, default_mode: u32) -> Owner {
        Owner {
            uid: self.uid.unwrap_or(user.uid),
            gid: self.gid.unwrap_or(user.gid),
            mode: self.mode.unwrap_or(default_mode),
        }
    }
}

/// `mkdir -p` of a working directory (`cwd` of a session, context or terminal), the
/// directories it creates owned by `user`. Resolved by the kernel inside the sandbox; a path
/// that cannot be a directory is a 400 naming `cwd`. Whether the user may enter it is decided
/// by the kernel when the process enters it as that user.
pub(crate) fn make_cwd(path: &std::path::Path, user: Credentials) -> Result<(), ApiError> {
    let owner = parent_owner(user);
    resolve::make_dirs(path, owner, owner)
        .map(drop)
        .map_err(|e| match e.into_api(path) {
            ApiError::Runtime(m) => ApiError::Runtime(m),
            other => ApiError::BadRequest(format!(
                "invalid request, validation error cwd {}: {other}",
                path.display()
            )),
        })
}

/// Whether `path` is a directory, resolved by the kernel inside the sandbox (no magic links).
pub(crate) fn is_dir(path: &std::path::Path) -> bool {
    resolve::Dir::resolve(path).is_ok()
}

/// Owner and mode of directories created on the way to a destination.
pub(crate) fn parent_owner(user: Credentials) -> Owner {
    Owner {
        uid: user.uid,
        gid: user.gid,
        mode: DEFAULT_MODE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_keeps_repeats_and_decodes() {
        let q = Query::parse(Some("path=%2Ftmp%2Fa+b&path=/x&depth=2&flag"));
        assert_eq!(q.all("path").collect::<Vec<_>>(), vec!["/tmp/a b", "/x"]);
        assert_eq!(q.first("depth"), Some("2"));
        assert_eq!(q.first("flag"), Some(""));
        assert!(matches!(q.required("flag"), Err(ApiError::MissingQuery(_))));
        assert!(matches!(q.required("nope"), Err(ApiError::MissingQuery(_))));
        assert_eq!(Query::parse(None).first("path"), None);
    }

    #[test]
    fn bodies_are_lenient_and_errors_prefixed() {
        let p: Option<std::collections::BTreeMap<String, Option<Permission>>> =
            parse_body(br#"{"/a":{"owner":null,"mode":644,"extra":1},"/b":null}"#).unwrap();
        let p = p.unwrap();
        assert_eq!(p["/a"].as_ref().unwrap().mode, Some(644));
        assert!(p["/b"].is_none());
        match parse_body::<Permission>(b"{nope") {
            Err(ApiError::BadRequest(m)) => {
                assert!(m.starts_with("error parsing request, MAYBE invalid body format. "))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn permissions_resolve() {
        let names = Names::parse("nobody:x:65534:65534::/:/bin/false\n", "nogroup:x:65534:\n");
        let w = Permission {
            owner: Some("nobody".into()),
            group: Some(String::new()),
            mode: Some(0),
        }
        .resolve(&names)
        .unwrap();
        assert_eq!(
            w,
            Wanted {
                uid: Some(65534),
                gid: None,
                mode: None
            }
        );
        let user = Credentials {
            uid: 1000,
            gid: 1000,
        };
        assert_eq!(
            w.for_new(user, 0o755),
            Owner {
                uid: 65534,
                gid: 1000,
                mode: 0o755
            }
        );
        assert!(Permission {
            owner: Some("mallory".into()),
            ..Default::default()
        }
        .resolve(&names)
        .is_err());
    }
}
