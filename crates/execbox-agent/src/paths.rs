//! Path handling shared by every execd endpoint that takes a path or a `cwd`: `$VAR` and
//! `${VAR}` expansion, `~` expansion, relative paths against the agent's working directory
//! (the sandbox home), and lexical normalisation of `.` and `..`.
//!
//! No jail is needed beyond this: the agent lives in the sandbox's mount namespace, so every
//! path, symlinks included, resolves inside the sandbox's own filesystem view.

use std::path::{Component, Path, PathBuf};

use execbox_jail::rootfs::SANDBOX_HOME;

use crate::error::ApiError;

/// The working directory of processes that name none (an image's `WorkingDir`, else the
/// sandbox user's home); set once at start.
static DEFAULT_CWD: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Sets the default working directory (at start, from the configuration).
pub fn set_default_cwd(dir: Option<&str>) {
    if let Some(dir) = dir.filter(|d| d.starts_with('/')) {
        let _ = DEFAULT_CWD.set(normalize(Path::new(dir)));
    }
}

/// The working directory of processes that name none.
pub fn default_cwd() -> PathBuf {
    DEFAULT_CWD
        .get()
        .cloned()
        .unwrap_or_else(|| PathBuf::from(SANDBOX_HOME))
}

/// Expands and absolutises a client-supplied path. `env` is the sandbox environment.
pub fn resolve(raw: &str, env: &[(String, String)]) -> Result<PathBuf, ApiError> {
    let expanded = expand_vars(raw, env)?;
    let home_relative = if expanded == "~" {
        SANDBOX_HOME.to_string()
    } else if let Some(rest) = expanded
        .strip_prefix("~/")
        .or_else(|| expanded.strip_prefix("~\\"))
    {
        format!("{SANDBOX_HOME}/{rest}")
    } else {
        expanded
    };
    let joined = Path::new(SANDBOX_HOME).join(home_relative);
    Ok(normalize(&joined))
}

/// Removes `.` and resolves `..` lexically (`/..` stays `/`).
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

fn lookup<'a>(name: &str, env: &'a [(String, String)]) -> Result<&'a str, ApiError> {
    env.iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "invalid request, validation error environment variable {name} is not defined"
            ))
        })
}

/// `$NAME` and `${NAME}` from `env`; an undefined variable is an error. A `$` not followed by
/// a name is kept.
fn expand_vars(raw: &str, env: &[(String, String)]) -> Result<String, ApiError> {
    if !raw.contains('$') {
        return Ok(raw.to_string());
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "invalid request, validation error unterminated ${{ in path {raw:?}"
                ))
            })?;
            out.push_str(lookup(&braced[..end], env)?);
            rest = &braced[end + 1..];
        } else {
            let len = after
                .bytes()
                .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
                .count();
            if len == 0 {
                out.push('$');
            } else {
                out.push_str(lookup(&after[..len], env)?);
            }
            rest = &after[len..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Vec<(String, String)> {
        vec![
            ("HOME".into(), "/home/user".into()),
            ("DATA".into(), "/workspace/data".into()),
        ]
    }

    #[test]
    fn expands_variables_home_and_relative_paths() {
        let e = env();
        assert_eq!(
            resolve("$DATA/x", &e).unwrap(),
            Path::new("/workspace/data/x")
        );
        assert_eq!(
            resolve("${DATA}y", &e).unwrap(),
            Path::new("/workspace/datay")
        );
        assert_eq!(resolve("~", &e).unwrap(), Path::new("/home/user"));
        assert_eq!(resolve("~/a/b", &e).unwrap(), Path::new("/home/user/a/b"));
        assert_eq!(
            resolve("rel.txt", &e).unwrap(),
            Path::new("/home/user/rel.txt")
        );
        assert_eq!(resolve("/tmp/../etc/./x", &e).unwrap(), Path::new("/etc/x"));
        assert_eq!(resolve("/../../..", &e).unwrap(), Path::new("/"));
        assert_eq!(resolve("/a$", &e).unwrap(), Path::new("/a$"));
    }

    #[test]
    fn undefined_variable_is_a_bad_request() {
        assert!(matches!(
            resolve("$NOPE/x", &env()),
            Err(ApiError::BadRequest(m)) if m.contains("NOPE")
        ));
        assert!(matches!(
            resolve("${DATA", &env()),
            Err(ApiError::BadRequest(_))
        ));
    }
}
