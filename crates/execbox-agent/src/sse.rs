//! The execd streaming wire format (§3): events framed as `data: {json}\n\n`, line splitting of
//! process output, and the plumbing that moves process output into a stream without ever
//! blocking on a client that stopped reading.

use std::os::fd::OwnedFd;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use execbox_proto::execd::Event;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

/// Longest line sent as one event; longer runs without a newline are split.
const MAX_LINE: usize = 64 * 1024;

pub(crate) fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Splits a byte stream into execd line events: `\r`, `\n` and `\r\n` end a line, a blank line
/// becomes `"\n"`, the terminator is not part of the text.
#[derive(Default)]
pub(crate) struct LineSplitter {
    buf: Vec<u8>,
    after_cr: bool,
}

impl LineSplitter {
    pub(crate) fn feed(&mut self, chunk: &[u8], out: &mut Vec<String>) {
        let mut rest = chunk;
        while let Some((&first, tail)) = rest.split_first() {
            if std::mem::take(&mut self.after_cr) && first == b'\n' {
                rest = tail;
                continue;
            }
            let room = MAX_LINE - self.buf.len();
            let scan = &rest[..rest.len().min(room)];
            match memchr::memchr2(b'\n', b'\r', scan) {
                Some(i) => {
                    self.buf.extend_from_slice(&scan[..i]);
                    out.push(self.take_line());
                    self.after_cr = scan[i] == b'\r';
                    rest = &rest[i + 1..];
                }
                None => {
                    self.buf.extend_from_slice(scan);
                    rest = &rest[scan.len()..];
                    if self.buf.len() >= MAX_LINE {
                        out.push(self.take_line());
                    }
                }
            }
        }
    }

    fn take_line(&mut self) -> String {
        let line = std::mem::take(&mut self.buf);
        if line.is_empty() {
            return "\n".to_string();
        }
        String::from_utf8(line)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    pub(crate) fn finish(&mut self, out: &mut Vec<String>) {
        if !self.buf.is_empty() {
            out.push(self.take_line());
        }
    }
}

/// Event sink that keeps the command going when the client has gone.
pub(crate) struct Sink {
    pub(crate) tx: mpsc::Sender<Bytes>,
    pub(crate) gone: bool,
}

impl Sink {
    pub(crate) async fn send(&mut self, event: &Event) {
        if self.gone {
            return;
        }
        if self.tx.send(Bytes::from(event.to_sse())).await.is_err() {
            self.gone = true;
        }
    }

    /// An error after the stream began: one frame carrying the execd error envelope
    /// `{"code":"RUNTIME_ERROR","message":…}` (§3.1).
    pub(crate) async fn send_envelope(&mut self, message: &str) {
        if self.gone {
            return;
        }
        let env = execbox_proto::execd::ExecdError {
            code: execbox_proto::execd::codes::RUNTIME_ERROR.into(),
            message: message.into(),
        };
        if let Ok(json) = serde_json::to_string(&env) {
            if self
                .tx
                .send(Bytes::from(format!("data: {json}\n\n")))
                .await
                .is_err()
            {
                self.gone = true;
            }
        }
    }

    /// Sends each of `lines` as an output event of `kind` and empties it. The events go out as
    /// one chunk: one channel message, one write per hop, instead of one per line.
    pub(crate) async fn send_lines(&mut self, kind: &str, lines: &mut Vec<String>) {
        if lines.is_empty() || self.gone {
            lines.clear();
            return;
        }
        let ts = now_ms();
        let mut chunk = Vec::new();
        for l in lines.drain(..) {
            Event::text(kind, l, ts).write_sse(&mut chunk);
        }
        if self.tx.send(Bytes::from(chunk)).await.is_err() {
            self.gone = true;
        }
    }
}

/// Sleeps until `deadline`, or forever when there is none (a `select!` arm that never fires).
pub(crate) async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

pub(crate) fn sse_response(rx: mpsc::Receiver<Bytes>) -> Response {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    event_stream_response(Body::from_stream(stream))
}

/// A `text/event-stream` response with `body`, never buffered by a proxy on the way.
pub(crate) fn event_stream_response(body: Body) -> Response {
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("X-Accel-Buffering", HeaderValue::from_static("no"));
    resp
}

pub(crate) fn pipe_reader(fd: Option<OwnedFd>) -> Option<tokio::net::unix::pipe::Receiver> {
    fd.and_then(|fd| tokio::net::unix::pipe::Receiver::from_owned_fd(fd).ok())
}

pub(crate) async fn read_some(
    r: &mut Option<tokio::net::unix::pipe::Receiver>,
    buf: &mut [u8],
) -> Option<usize> {
    match r {
        Some(r) => match r.read(buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => Some(n),
        },
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<String> {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut out);
        }
        s.finish(&mut out);
        out
    }

    #[test]
    fn blank_lines_become_newline_events() {
        assert_eq!(
            split(&[b"a\n\nb\n\n\nc\n"]),
            ["a", "\n", "b", "\n", "\n", "c"]
        );
    }

    #[test]
    fn crlf_split_across_chunks_is_one_terminator() {
        assert_eq!(split(&[b"a\r", b"\nb\rc"]), ["a", "b", "c"]);
    }

    #[test]
    fn trailing_partial_line_is_flushed() {
        assert_eq!(split(&[b"hello"]), ["hello"]);
    }

    #[test]
    fn long_lines_are_split_and_bad_utf8_replaced() {
        let long = vec![b'x'; MAX_LINE + 10];
        let out = split(&[&long, b"\n"]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].len(), MAX_LINE);
        assert_eq!(out[1].len(), 10);
        assert_eq!(split(&[b"a\xffb\r", b"\r\n"]), ["a\u{fffd}b", "\n"]);
    }
}
