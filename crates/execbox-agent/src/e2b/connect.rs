//! The Connect protocol (connectrpc.com/docs/protocol) over HTTP/1.1, JSON codec only: unary
//! calls, server streams and the one client stream E2B uses (`StreamInput`).
//!
//! Written by hand rather than taken from a crate: the Rust Connect crates (`connectrpc`,
//! `connectrpc-axum`, `axum-connect`) are young, generate their types from `.proto` files with
//! prost (a `protoc` at build time) and own the handler's lifecycle, while E2B's SDKs speak only
//! Connect's JSON encoding and envd's processes must outlive the request that started them. The
//! wire part needed here is small: a 5-byte envelope, an end-of-stream message and a status table.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Largest request message accepted (a `SendInput` chunk, a `Start` with its environment).
pub const MAX_MESSAGE: usize = 16 << 20;

/// Envelope flag: the payload is compressed (never used by the SDKs; refused).
pub const FLAG_COMPRESSED: u8 = 0x01;
/// Envelope flag: the end-of-stream message.
pub const FLAG_END_STREAM: u8 = 0x02;

/// Connect error codes (the protocol's whole table, not all used here).
#[allow(dead_code)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Canceled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl Code {
    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Aborted => "aborted",
            Code::OutOfRange => "out_of_range",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::DataLoss => "data_loss",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status of a unary error (the Connect protocol's table).
    pub fn status(self) -> StatusCode {
        let n = match self {
            Code::Canceled => 499,
            Code::Unknown | Code::Internal | Code::DataLoss => 500,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
            Code::DeadlineExceeded => 504,
            Code::NotFound => 404,
            Code::AlreadyExists | Code::Aborted => 409,
            Code::PermissionDenied => 403,
            Code::ResourceExhausted => 429,
            Code::Unimplemented => 501,
            Code::Unavailable => 503,
            Code::Unauthenticated => 401,
        };
        StatusCode::from_u16(n).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

/// A Connect error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.name())]
pub struct RpcError {
    /// The code.
    pub code: Code,
    /// The message.
    pub message: String,
}

impl RpcError {
    /// An error of `code`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }

    /// The JSON error object (`{"code","message"}`).
    pub fn to_json(&self) -> Value {
        json!({ "code": self.code.name(), "message": self.message })
    }
}

impl From<crate::error::ApiError> for RpcError {
    fn from(e: crate::error::ApiError) -> Self {
        use crate::error::ApiError as A;
        let code = match &e {
            A::FileNotFound(_) | A::CommandNotFound(_) | A::ContextNotFound(_) => Code::NotFound,
            A::Exists(_) | A::Conflict { .. } => Code::AlreadyExists,
            A::StorageFull(_) | A::TooLarge(_) => Code::ResourceExhausted,
            A::NotSupported(_) => Code::Unimplemented,
            A::Runtime(_) => Code::Internal,
            _ => Code::InvalidArgument,
        };
        RpcError::new(code, e.to_string())
    }
}

impl IntoResponse for RpcError {
    /// A unary error: the code's status, `{"code","message"}`.
    fn into_response(self) -> Response {
        if self.code.status().is_server_error() {
            tracing::warn!(error = %self, "e2b rpc failed");
        }
        let mut resp = (self.code.status(), self.to_json().to_string()).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    }
}

/// A unary success: `200 application/json` with the message.
pub fn unary(message: Value) -> Response {
    let mut resp = (StatusCode::OK, message.to_string()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// One envelope: flag byte, 4-byte big-endian length, payload.
pub fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(flags);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// A message envelope.
pub fn message(value: &Value) -> Bytes {
    envelope(0, value.to_string().as_bytes())
}

/// The end-of-stream envelope: `{}` or `{"error":{…}}`.
pub fn end_stream(error: Option<&RpcError>) -> Bytes {
    let body = match error {
        None => json!({}),
        Some(e) => json!({ "error": e.to_json() }),
    };
    envelope(FLAG_END_STREAM, body.to_string().as_bytes())
}

/// Splits complete envelopes off the front of `buf`: `(flags, payload)` of each. Incomplete data
/// stays in `buf`.
pub fn take_envelopes(buf: &mut Vec<u8>) -> Result<Vec<(u8, Vec<u8>)>, RpcError> {
    let mut out = Vec::new();
    loop {
        if buf.len() < 5 {
            return Ok(out);
        }
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if len > MAX_MESSAGE {
            return Err(RpcError::new(
                Code::ResourceExhausted,
                format!("message of {len} bytes is over the limit of {MAX_MESSAGE}"),
            ));
        }
        if buf.len() < 5 + len {
            return Ok(out);
        }
        let flags = buf[0];
        let payload = buf[5..5 + len].to_vec();
        buf.drain(..5 + len);
        if flags & FLAG_COMPRESSED != 0 {
            return Err(RpcError::new(
                Code::Unimplemented,
                "compressed messages are not supported",
            ));
        }
        out.push((flags, payload));
    }
}

/// Whether the request uses a streaming content type (`application/connect+json`).
pub fn is_streaming(headers: &HeaderMap) -> bool {
    content_type(headers).starts_with("application/connect+")
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// Refuses the binary codec (the SDKs use JSON only).
pub fn check_codec(headers: &HeaderMap) -> Result<(), RpcError> {
    let ct = content_type(headers);
    let ct = ct.split(';').next().unwrap_or("").trim();
    match ct {
        "" | "application/json" | "application/connect+json" => Ok(()),
        other if other.ends_with("proto") => Err(RpcError::new(
            Code::Unimplemented,
            "the proto codec is not supported by execbox: use JSON",
        )),
        other => Err(RpcError::new(
            Code::InvalidArgument,
            format!("unsupported content type {other:?}"),
        )),
    }
}

/// Decodes a request message: a bare JSON body (unary), or one envelope (a server stream).
/// An empty body is the empty message.
pub fn decode_request<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, RpcError> {
    check_codec(headers)?;
    let payload: Vec<u8> = if is_streaming(headers) {
        let mut buf = body.to_vec();
        let mut msgs = take_envelopes(&mut buf)?;
        if !buf.is_empty() {
            return Err(RpcError::new(
                Code::InvalidArgument,
                "incomplete envelope in the request",
            ));
        }
        match msgs.len() {
            0 => Vec::new(),
            1 => msgs.remove(0).1,
            n => {
                return Err(RpcError::new(
                    Code::InvalidArgument,
                    format!("expected one request message, got {n}"),
                ))
            }
        }
    } else {
        body.to_vec()
    };
    decode_message(&payload)
}

/// Decodes one JSON message (empty = `{}`).
pub fn decode_message<T: DeserializeOwned>(payload: &[u8]) -> Result<T, RpcError> {
    let payload: &[u8] = if payload.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        payload
    };
    serde_json::from_slice(payload).map_err(|e| {
        RpcError::new(
            Code::InvalidArgument,
            format!("invalid request message: {e}"),
        )
    })
}

/// `Connect-Timeout-Ms`, when given.
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get("connect-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
}

/// Runs a unary call within its `Connect-Timeout-Ms`: past it, `deadline_exceeded`.
pub async fn within<T>(
    deadline: Option<Duration>,
    call: impl std::future::Future<Output = Result<T, RpcError>>,
) -> Result<T, RpcError> {
    match deadline {
        None => call.await,
        Some(d) => tokio::time::timeout(d, call).await.unwrap_or_else(|_| {
            Err(RpcError::new(
                Code::DeadlineExceeded,
                format!(
                    "the call took longer than its timeout of {} ms",
                    d.as_millis()
                ),
            ))
        }),
    }
}

/// Default keepalive interval of a stream.
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(90);

/// `Keepalive-Ping-Interval` (seconds), else 90 s.
pub fn keepalive(headers: &HeaderMap) -> Duration {
    headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(s.min(3600)))
        .unwrap_or(DEFAULT_KEEPALIVE)
}

/// A server-stream response whose envelopes come from `rx`, each sent as its own chunk (so it
/// is flushed at once).
pub fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/connect+json"),
    );
    h.insert("X-Accel-Buffering", HeaderValue::from_static("no"));
    resp
}

/// A stream that fails before its first message: 200, then only the end-of-stream error.
pub fn stream_error(e: RpcError) -> Response {
    let (tx, rx) = mpsc::channel(1);
    let _ = tx.try_send(end_stream(Some(&e)));
    stream_response(rx)
}

// --- JSON field helpers (proto3 canonical JSON) -----------------------------------------------

/// An int64 given as a string or a number.
pub fn de_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        Num(i64),
        Float(f64),
        Str(String),
    }
    Ok(match Option::<N>::deserialize(d)? {
        None => None,
        Some(N::Num(n)) => Some(n),
        Some(N::Float(f)) => Some(f as i64),
        Some(N::Str(s)) => Some(s.trim().parse().map_err(serde::de::Error::custom)?),
    })
}

/// A uint32 given as a number or a string.
pub fn de_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    match de_i64(d)? {
        None => Ok(None),
        Some(n) => u32::try_from(n)
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("{n} is out of range"))),
    }
}

/// `bytes`: standard base64, padded or not, or URL-safe.
pub fn decode_bytes(s: &str) -> Result<Vec<u8>, RpcError> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let s = s.trim();
    STANDARD
        .decode(s)
        .or_else(|_| STANDARD_NO_PAD.decode(s))
        .or_else(|_| URL_SAFE.decode(s))
        .or_else(|_| URL_SAFE_NO_PAD.decode(s))
        .map_err(|e| RpcError::new(Code::InvalidArgument, format!("invalid base64: {e}")))
}

/// `bytes` out: standard base64 with padding.
pub fn encode_bytes(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_are_flag_length_payload() {
        assert_eq!(&envelope(0, b"{}")[..], &[0u8, 0, 0, 0, 2, b'{', b'}'][..]);
        assert_eq!(&end_stream(None)[..], b"\x02\x00\x00\x00\x02{}");
        let e = RpcError::new(Code::NotFound, "no such process");
        let bytes = end_stream(Some(&e));
        assert_eq!(bytes[0], FLAG_END_STREAM);
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        assert_eq!(len, bytes.len() - 5);
        let v: Value = serde_json::from_slice(&bytes[5..]).unwrap();
        assert_eq!(
            v,
            json!({"error":{"code":"not_found","message":"no such process"}})
        );
    }

    #[test]
    fn envelopes_are_split_across_reads() {
        let mut all = envelope(0, br#"{"a":1}"#).to_vec();
        all.extend_from_slice(&envelope(0, br#"{"b":2}"#));
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for b in all.chunks(3) {
            buf.extend_from_slice(b);
            got.extend(take_envelopes(&mut buf).unwrap());
        }
        assert!(buf.is_empty());
        assert_eq!(
            got,
            vec![(0, br#"{"a":1}"#.to_vec()), (0, br#"{"b":2}"#.to_vec())]
        );
        let mut compressed = envelope(FLAG_COMPRESSED, b"x").to_vec();
        assert_eq!(
            take_envelopes(&mut compressed).unwrap_err().code,
            Code::Unimplemented
        );
    }

    #[test]
    fn status_table() {
        for (code, status) in [
            (Code::Canceled, 499),
            (Code::Unknown, 500),
            (Code::InvalidArgument, 400),
            (Code::DeadlineExceeded, 504),
            (Code::NotFound, 404),
            (Code::AlreadyExists, 409),
            (Code::PermissionDenied, 403),
            (Code::ResourceExhausted, 429),
            (Code::FailedPrecondition, 400),
            (Code::Aborted, 409),
            (Code::OutOfRange, 400),
            (Code::Unimplemented, 501),
            (Code::Internal, 500),
            (Code::Unavailable, 503),
            (Code::DataLoss, 500),
            (Code::Unauthenticated, 401),
        ] {
            assert_eq!(code.status().as_u16(), status, "{}", code.name());
        }
    }

    #[test]
    fn requests_decode_bare_or_enveloped() {
        #[derive(Deserialize)]
        struct M {
            #[serde(default)]
            path: String,
        }
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        let m: M = decode_request(&h, br#"{"path":"/a","unknown":1}"#).unwrap();
        assert_eq!(m.path, "/a");
        let m: M = decode_request(&h, b"").unwrap();
        assert_eq!(m.path, "");
        h.insert(
            header::CONTENT_TYPE,
            "application/connect+json".parse().unwrap(),
        );
        let m: M = decode_request(&h, &envelope(0, br#"{"path":"/b"}"#)).unwrap();
        assert_eq!(m.path, "/b");
        assert!(decode_request::<M>(&h, b"\x00\x00\x00\x00\x09{}").is_err());
        h.insert(header::CONTENT_TYPE, "application/proto".parse().unwrap());
        assert_eq!(
            decode_request::<M>(&h, b"").err().unwrap().code,
            Code::Unimplemented
        );
    }

    #[test]
    fn json_scalars_are_lenient() {
        #[derive(Deserialize)]
        struct M {
            #[serde(default, deserialize_with = "de_i64")]
            n: Option<i64>,
            #[serde(default, deserialize_with = "de_u32")]
            pid: Option<u32>,
        }
        let m: M = serde_json::from_str(r#"{"n":"42","pid":7}"#).unwrap();
        assert_eq!((m.n, m.pid), (Some(42), Some(7)));
        let m: M = serde_json::from_str(r#"{"n":5,"pid":"8"}"#).unwrap();
        assert_eq!((m.n, m.pid), (Some(5), Some(8)));
        assert_eq!(decode_bytes("aGkK").unwrap(), b"hi\n");
        assert_eq!(decode_bytes("aGk").unwrap(), b"hi");
        assert_eq!(decode_bytes("_-8").unwrap(), vec![0xff, 0xef]);
        assert_eq!(encode_bytes(b"hi"), "aGk=");
    }

    #[tokio::test]
    async fn unary_calls_end_at_their_deadline() {
        let slow = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, RpcError>(())
        };
        let e = within(Some(Duration::from_millis(20)), slow)
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::DeadlineExceeded);
        assert_eq!(within(None, async { Ok::<_, RpcError>(1) }).await, Ok(1));
    }

    #[test]
    fn timeouts_and_keepalive_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(timeout(&h), None);
        assert_eq!(keepalive(&h), DEFAULT_KEEPALIVE);
        h.insert("connect-timeout-ms", "1500".parse().unwrap());
        h.insert("keepalive-ping-interval", "50".parse().unwrap());
        assert_eq!(timeout(&h), Some(Duration::from_millis(1500)));
        assert_eq!(keepalive(&h), Duration::from_secs(50));
    }
}
