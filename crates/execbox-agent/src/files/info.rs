//! `FileInfo`, user and group names, and `GET /files/info`.

use std::collections::BTreeMap;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::Json;
use serde::Serialize;

use super::resolve;
use super::{blocking, Query};
use crate::error::ApiError;
use crate::AppState;

/// One entry of `/files/info`, `/files/search` and `/directories/list`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FileInfo {
    /// Absolute path.
    pub path: String,
    /// `file`, `directory`, `symlink` or `other` (lstat semantics).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Size in bytes.
    pub size: u64,
    /// mtime, RFC 3339.
    pub modified_at: String,
    /// ctime (status change), RFC 3339.
    pub created_at: String,
    /// Owner name, or the uid as a string.
    pub owner: String,
    /// Group name, or the gid as a string.
    pub group: String,
    /// Permission bits, octal digits read as a decimal number (0o755 → 755).
    pub mode: u32,
}

/// Permission bits as upstream prints them: the octal digits as a decimal integer.
pub fn mode_to_decimal(mode: u32) -> u32 {
    let mut bits = mode & 0o777;
    let (mut out, mut scale) = (0, 1);
    while bits > 0 {
        out += (bits % 8) * scale;
        bits /= 8;
        scale *= 10;
    }
    out
}

/// The request's "octal written as decimal" mode (`755` → 0o755). A non-octal digit or a value
/// beyond 0o7777 is a 400 naming `mode` (upstream answers 500).
pub fn mode_from_decimal(mode: i64) -> Result<u32, ApiError> {
    let bad = || {
        ApiError::BadRequest(format!(
            "invalid request, validation error mode: {mode} is not an octal mode"
        ))
    };
    if mode < 0 {
        return Err(bad());
    }
    let parsed = u32::from_str_radix(&mode.to_string(), 8).map_err(|_| bad())?;
    if parsed > 0o7777 {
        return Err(bad());
    }
    Ok(parsed)
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

/// `file`, `directory`, `symlink` or `other`, from an lstat.
pub fn kind_of(md: &Metadata) -> &'static str {
    let ft = md.file_type();
    if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_file() {
        "file"
    } else {
        "other"
    }
}

/// Builds the `FileInfo` of `path` from its lstat.
pub fn file_info(path: &Path, md: &Metadata, names: &Names) -> FileInfo {
    let kind = kind_of(md);
    FileInfo {
        path: path.to_string_lossy().into_owned(),
        kind,
        size: md.size(),
        modified_at: rfc3339(md.mtime(), md.mtime_nsec()),
        created_at: rfc3339(md.ctime(), md.ctime_nsec()),
        owner: names.user_name(md.uid()),
        group: names.group_name(md.gid()),
        mode: mode_to_decimal(md.mode()),
    }
}

pub use crate::users::Names;

/// `GET /files/info?path=A&path=B`: FileInfo per requested path, keyed as requested.
#[utoipa::path(
    get,
    path = "/files/info",
    operation_id = "execdFileInfo",
    tag = "execd",
    description = "Information on paths.",
    params(
        ("path" = Vec<String>, Query, description = "Absolute path (repeatable)."),
    ),
    responses(
        (status = 200, description = "Path to information.", body = BTreeMap<String, crate::openapi::schemas::FileInfo>),
        (status = 400, description = "`INVALID_REQUEST_BODY` or `MISSING_QUERY`: the message names what is wrong.", body = execbox_proto::execd::ExecdError),
        (status = 404, description = "`FILE_NOT_FOUND`.", body = execbox_proto::execd::ExecdError),
        (status = 500, description = "`RUNTIME_ERROR`: the agent failed.", body = execbox_proto::execd::ExecdError),
    )
)]
pub async fn info(
    State(app): State<Arc<AppState>>,
    RawQuery(raw): RawQuery,
) -> Result<Json<BTreeMap<String, FileInfo>>, ApiError> {
    let query = Query::parse(raw.as_deref());
    let env = app.runner.env_with(&[]);
    let mut wanted = Vec::new();
    for p in query.all("path") {
        wanted.push((p.to_string(), crate::paths::resolve(p, &env)?));
    }
    let infos = blocking(move || {
        let names = Names::load();
        let mut out = BTreeMap::new();
        for (raw, lexical) in wanted {
            let entry = resolve::existing(&lexical, false).map_err(|e| e.into_api(&lexical))?;
            let md = entry.lstat().map_err(|e| {
                ApiError::from_io(&format!("error stating {}", lexical.display()), &e)
            })?;
            out.insert(raw, file_info(&lexical, &md, &names));
        }
        Ok(out)
    })
    .await?;
    Ok(Json(infos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_convert_both_ways() {
        assert_eq!(mode_to_decimal(0o755), 755);
        assert_eq!(mode_to_decimal(0o100644), 644);
        assert_eq!(mode_to_decimal(0o4700), 700);
        assert_eq!(mode_to_decimal(0), 0);
        assert_eq!(mode_to_decimal(0o7), 7);
        assert_eq!(mode_from_decimal(755).unwrap(), 0o755);
        assert_eq!(mode_from_decimal(600).unwrap(), 0o600);
        assert_eq!(mode_from_decimal(4755).unwrap(), 0o4755);
        assert!(matches!(
            mode_from_decimal(789),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            mode_from_decimal(-1),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            mode_from_decimal(17777),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn times_are_rfc3339_with_nanoseconds() {
        assert_eq!(rfc3339(0, 5), "1970-01-01T00:00:00.000000005Z");
        assert_eq!(rfc3339(1_700_000_000, 0), "2023-11-14T22:13:20Z");
    }
}
