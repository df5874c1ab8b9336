//! `GET /files/download`: streamed whole-file, byte-range and line-range reads.

use std::fs::{File, Metadata};
use std::io::{self, BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use percent_encoding::{percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::resolve;
use super::{blocking, Query};
use crate::error::ApiError;
use crate::paths;
use crate::AppState;

/// Bytes per chunk sent to the client.
const CHUNK: usize = 512 * 1024;
/// Chunks read ahead of the client.
const READ_AHEAD: usize = 4;

/// What a `Range` header asks for, against a file of a given size.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable range (`bytes=` with no specs): the whole file.
    Whole,
    /// The first satisfiable range.
    Part {
        /// First byte.
        start: u64,
        /// Length (≥ 1).
        len: u64,
    },
    /// Valid syntax, but every range starts at or beyond the end: 416 `bytes */size`.
    Unsatisfiable,
    /// Unparsable: 416 `{"code":"UNKNOWN"}`.
    Invalid,
}

fn parse_num(s: &str) -> Option<u64> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// Parses a `Range` header the way Go's `net/http` does, keeping only the first satisfiable
/// range (upstream never sends multipart/byteranges).
pub fn parse_range(header: &str, size: u64) -> RangeRequest {
    let Some(specs) = header.strip_prefix("bytes=") else {
        return RangeRequest::Invalid;
    };
    let mut first = None;
    let mut no_overlap = false;
    for spec in specs.split(',') {
        let spec = spec.trim_matches([' ', '\t']);
        if spec.is_empty() {
            continue;
        }
        let Some((start, end)) = spec.split_once('-') else {
            return RangeRequest::Invalid;
        };
        let (start, end) = (
            start.trim_matches([' ', '\t']),
            end.trim_matches([' ', '\t']),
        );
        let range = if start.is_empty() {
            // Suffix form `-n`: the last n bytes.
            let Some(n) = parse_num(end) else {
                return RangeRequest::Invalid;
            };
            let n = n.min(size);
            (size - n, n)
        } else {
            let Some(s) = parse_num(start) else {
                return RangeRequest::Invalid;
            };
            if s >= size {
                no_overlap = true;
                continue;
            }
            let len = if end.is_empty() {
                size - s
            } else {
                let Some(e) = parse_num(end) else {
                    return RangeRequest::Invalid;
                };
                if s > e {
                    return RangeRequest::Invalid;
                }
                e.min(size - 1) - s + 1
            };
            (s, len)
        };
        if range.1 == 0 {
            // `-0`, or any suffix of an empty file: nothing to serve.
            no_overlap = true;
            continue;
        }
        first.get_or_insert(range);
    }
    match first {
        Some((start, len)) => RangeRequest::Part { start, len },
        None if no_overlap => RangeRequest::Unsatisfiable,
        None => RangeRequest::Whole,
    }
}

/// Characters kept as is in an RFC 5987 `filename*` value (attr-char).
const ATTR_CHAR: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'!')
    .remove(b'#')
    .remove(b'$')
    .remove(b'&')
    .remove(b'+')
    .remove(b'-')
    .remove(b'.')
    .remove(b'^')
    .remove(b'_')
    .remove(b'`')
    .remove(b'|')
    .remove(b'~');

/// `attachment; filename="x"`, or with a percent-encoded `filename*` for names that are not
/// plain printable ASCII.
pub fn content_disposition(name: &[u8]) -> String {
    let plain = name
        .iter()
        .all(|b| (b' '..=b'~').contains(b) && *b != b'"' && *b != b'\\');
    if plain {
        format!("attachment; filename=\"{}\"", String::from_utf8_lossy(name))
    } else {
        let enc = percent_encode(name, ATTR_CHAR);
        format!("attachment; filename=\"{enc}\"; filename*=UTF-8''{enc}")
    }
}

/// Line mode: `offset` (1-based first line) and `limit` (line count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lines {
    /// First line, 1-based.
    pub offset: u64,
    /// Lines to return; `None` = to the end.
    pub limit: Option<u64>,
}

fn parse_lines(q: &Query) -> Result<Option<Lines>, ApiError> {
    let positive = |name: &str| -> Result<Option<u64>, ApiError> {
        match q.first(name) {
            None => Ok(None),
            Some(v) => match v.parse::<u64>() {
                Ok(n) if n >= 1 => Ok(Some(n)),
                _ => Err(ApiError::BadRequest(format!(
                    "invalid request, validation error {name} must be an integer >= 1, got {v:?}"
                ))),
            },
        }
    };
    let (offset, limit) = (positive("offset")?, positive("limit")?);
    Ok((offset.is_some() || limit.is_some()).then(|| Lines {
        offset: offset.unwrap_or(1),
        limit,
    }))
}

/// Whole seconds since the epoch (HTTP dates have no fractions).
fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Whether `If-Range` lets the range apply: only an HTTP date equal to the mtime (there is
/// no ETag to match).
fn if_range_allows(value: &str, mtime: SystemTime) -> bool {
    httpdate::parse_http_date(value.trim()).is_ok_and(|t| unix_secs(t) == unix_secs(mtime))
}

/// Opens the file to download: regular files only.
pub(crate) fn open(lexical: &Path) -> Result<(File, Metadata), ApiError> {
    let entry = resolve::existing(lexical, true).map_err(|e| e.into_api(lexical))?;
    let err = |e: io::Error| ApiError::from_io(&format!("error opening {}", lexical.display()), &e);
    let file = entry.open_read().map_err(err)?;
    let md = file.metadata().map_err(err)?;
    if md.is_dir() {
        return Err(ApiError::BadRequest(format!(
            "invalid request, validation error {}: path is a directory",
            lexical.display()
        )));
    }
    if !md.is_file() {
        return Err(ApiError::BadRequest(format!(
            "invalid request, validation error {}: not a regular file",
            lexical.display()
        )));
    }
    Ok((file, md))
}

/// Streams `len` bytes from `start` through a blocking reader that stays `READ_AHEAD` chunks
/// ahead; it stops when the client goes away.
pub(crate) fn stream_bytes(file: File, start: u64, len: u64) -> Body {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(READ_AHEAD);
    tokio::task::spawn_blocking(move || {
        let (mut pos, end) = (start, start + len);
        while pos < end {
            let want = (end - pos).min(CHUNK as u64) as usize;
            let mut buf = vec![0u8; want];
            let chunk = match file.read_at(&mut buf, pos) {
                // The file shrank: fail the body instead of sending less than announced.
                Ok(0) => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                Ok(n) => {
                    buf.truncate(n);
                    pos += n as u64;
                    Ok(Bytes::from(buf))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
            let failed = chunk.is_err();
            if tx.blocking_send(chunk).is_err() || failed {
                return;
            }
        }
    });
    Body::from_stream(ReceiverStream::new(rx))
}

/// Streams the selected lines, terminators stripped, joined by `\n`.
fn stream_lines(file: File, lines: Lines) -> Body {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(READ_AHEAD);
    tokio::task::spawn_blocking(move || {
        let mut reader = BufReader::with_capacity(CHUNK, file);
        let mut line = Vec::new();
        let mut out = Vec::with_capacity(CHUNK);
        let (mut number, mut sent) = (0u64, 0u64);
        loop {
            if lines.limit.is_some_and(|l| sent >= l) {
                break;
            }
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
            number += 1;
            if number < lines.offset {
                continue;
            }
            if line.last() == Some(&b'\n') {
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
            }
            if sent > 0 {
                out.push(b'\n');
            }
            out.extend_from_slice(&line);
            sent += 1;
            if out.len() >= CHUNK {
                let full = std::mem::replace(&mut out, Vec::with_capacity(CHUNK));
                if tx.blocking_send(Ok(Bytes::from(full))).is_err() {
                    return;
                }
            }
        }
        if !out.is_empty() {
            let _ = tx.blocking_send(Ok(Bytes::from(out)));
        }
    });
    Body::from_stream(ReceiverStream::new(rx))
}

fn set(headers: &mut HeaderMap, name: header::HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

/// `GET /files/download?path=<p>[&offset=N&limit=M]`.
#[utoipa::path(
    get,
    path = "/files/download",
    operation_id = "execdDownloadFile",
    tag = "execd",
    description = "A file's bytes (`Range` supported).",
    params(
        ("path" = String, Query, description = "File."),
    ),
    responses(
        (status = 200, description = "The bytes.", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 206, description = "The range asked for.", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, description = "`INVALID_REQUEST_BODY` or `MISSING_QUERY`: the message names what is wrong.", body = execbox_proto::execd::ExecdError),
        (status = 404, description = "`FILE_NOT_FOUND`.", body = execbox_proto::execd::ExecdError),
        (status = 416, description = "`UNKNOWN`: an unparsable or unsatisfiable range.", body = execbox_proto::execd::ExecdError),
        (status = 500, description = "`RUNTIME_ERROR`: the agent failed.", body = execbox_proto::execd::ExecdError),
    )
)]
pub async fn download(
    State(app): State<Arc<AppState>>,
    RawQuery(raw): RawQuery,
    req_headers: HeaderMap,
) -> Result<Response, ApiError> {
    let query = Query::parse(raw.as_deref());
    let raw_path = query.required("path")?;
    let lines = parse_lines(&query)?;
    let range_header = header_str(&req_headers, header::RANGE).map(str::to_string);
    if lines.is_some() && req_headers.contains_key(header::RANGE) {
        return Err(ApiError::BadRequest(
            "invalid request, validation error offset/limit can not be combined with Range".into(),
        ));
    }
    let lexical = paths::resolve(raw_path, &app.runner.env_with(&[]))?;
    let shown = lexical.clone();
    let (file, md) = blocking(move || open(&shown)).await?;

    if let Some(lines) = lines {
        let mut resp = stream_lines(file, lines).into_response();
        set(
            resp.headers_mut(),
            header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        );
        return Ok(resp);
    }

    let size = md.len();
    let mtime = md.modified().unwrap_or(UNIX_EPOCH);
    let mut headers = HeaderMap::new();
    set(
        &mut headers,
        header::LAST_MODIFIED,
        &httpdate::fmt_http_date(mtime),
    );
    set(&mut headers, header::ACCEPT_RANGES, "bytes");

    if let Some(since) = header_str(&req_headers, header::IF_MODIFIED_SINCE)
        .and_then(|v| httpdate::parse_http_date(v.trim()).ok())
    {
        if unix_secs(mtime) <= unix_secs(since) {
            return Ok((StatusCode::NOT_MODIFIED, headers).into_response());
        }
    }

    let range_applies = match header_str(&req_headers, header::IF_RANGE) {
        Some(v) => if_range_allows(v, mtime),
        None => true,
    };
    let part = match range_header.as_deref().filter(|_| range_applies) {
        None => RangeRequest::Whole,
        Some(h) => parse_range(h, size),
    };
    let (status, start, len) = match part {
        RangeRequest::Whole => (StatusCode::OK, 0, size),
        RangeRequest::Part { start, len } => {
            set(
                &mut headers,
                header::CONTENT_RANGE,
                &format!("bytes {start}-{}/{size}", start + len - 1),
            );
            (StatusCode::PARTIAL_CONTENT, start, len)
        }
        RangeRequest::Unsatisfiable => {
            set(
                &mut headers,
                header::CONTENT_RANGE,
                &format!("bytes */{size}"),
            );
            set(
                &mut headers,
                header::CONTENT_TYPE,
                "text/plain; charset=utf-8",
            );
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                headers,
                "invalid range: failed to overlap",
            )
                .into_response());
        }
        RangeRequest::Invalid => return Err(ApiError::BadRange),
    };
    let name = lexical
        .file_name()
        .map(|n| n.as_encoded_bytes().to_vec())
        .unwrap_or_default();
    set(
        &mut headers,
        header::CONTENT_TYPE,
        "application/octet-stream",
    );
    set(
        &mut headers,
        header::CONTENT_DISPOSITION,
        &content_disposition(&name),
    );
    set(&mut headers, header::CONTENT_LENGTH, &len.to_string());
    Ok((status, headers, stream_bytes(file, start, len)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ranges_follow_go_semantics() {
        use RangeRequest::*;
        assert_eq!(parse_range("bytes=0-9", 100), Part { start: 0, len: 10 });
        assert_eq!(parse_range("bytes=90-", 100), Part { start: 90, len: 10 });
        assert_eq!(parse_range("bytes=-10", 100), Part { start: 90, len: 10 });
        assert_eq!(parse_range("bytes=-500", 100), Part { start: 0, len: 100 });
        assert_eq!(
            parse_range("bytes=50-500", 100),
            Part { start: 50, len: 50 }
        );
        assert_eq!(
            parse_range("bytes= 5-6 , 8-9", 100),
            Part { start: 5, len: 2 }
        );
        assert_eq!(
            parse_range("bytes=200-300,1-1", 100),
            Part { start: 1, len: 1 }
        );
        assert_eq!(parse_range("bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=100-200", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=", 100), Whole);
        assert_eq!(parse_range("items=0-1", 100), Invalid);
        assert_eq!(parse_range("bytes=abc", 100), Invalid);
        assert_eq!(parse_range("bytes=5-1", 100), Invalid);
        assert_eq!(parse_range("bytes=-", 100), Invalid);
        assert_eq!(parse_range("bytes=--5", 100), Invalid);
        assert_eq!(parse_range("bytes=1-x", 100), Invalid);
        assert_eq!(parse_range("bytes=+1-2", 100), Invalid);
        assert_eq!(parse_range("bytes=200-x", 100), Unsatisfiable);
    }

    #[test]
    fn content_disposition_encodes_non_ascii() {
        assert_eq!(
            content_disposition(b"a b.txt"),
            "attachment; filename=\"a b.txt\""
        );
        assert_eq!(
            content_disposition("résumé.pdf".as_bytes()),
            "attachment; filename=\"r%C3%A9sum%C3%A9.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf"
        );
        assert_eq!(
            content_disposition(b"q\"uote"),
            "attachment; filename=\"q%22uote\"; filename*=UTF-8''q%22uote"
        );
    }

    #[test]
    fn line_parameters() {
        let q = |s| parse_lines(&Query::parse(Some(s)));
        assert_eq!(q("path=a").unwrap(), None);
        assert_eq!(
            q("offset=2").unwrap(),
            Some(Lines {
                offset: 2,
                limit: None
            })
        );
        assert_eq!(
            q("limit=3").unwrap(),
            Some(Lines {
                offset: 1,
                limit: Some(3)
            })
        );
        assert!(q("offset=0").is_err());
        assert!(q("limit=x").is_err());
    }

    #[test]
    fn if_range_needs_the_exact_date() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert!(if_range_allows(
            &httpdate::fmt_http_date(t),
            t + Duration::from_millis(300)
        ));
        assert!(!if_range_allows(
            &httpdate::fmt_http_date(t),
            t + Duration::from_secs(1)
        ));
        assert!(!if_range_allows("\"etag\"", t));
    }
}
