//! Reading every request body to its end before the answer goes out (within bounds).
//!
//! A handler that answers without reading the body (an unknown route, a method the route does
//! not take, a refusal before the body is parsed) makes the HTTP server close the connection
//! while the server's proxy in front is still sending the body: the proxy then reports its
//! failed write (a 502) instead of this answer. So the body goes through a pump that forwards it
//! to the handler while the handler reads, and drops the rest once the handler is done.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use futures_util::StreamExt;
use tokio::sync::mpsc;

/// Request bytes still read (and dropped) after the handler is done with the body. The real
/// bound is the deadline below; this one only stops a client that sends faster than that.
/// (An upload refused for want of room has the rest of its body to go: up to the whole file.)
const MAX_DRAIN: usize = 1 << 30;
/// How long the answer may wait for the rest of the request body.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);
/// Frames in flight between the connection and the handler.
const IN_FLIGHT: usize = 4;

/// [`read_body_to_end`] for a route that also takes WebSocket upgrades: an upgrade's
/// connection becomes the session (nothing to drain), anything else is drained as usual.
pub async fn read_body_to_end_unless_upgrade(req: Request, next: Next) -> Response {
    if req.headers().contains_key(axum::http::header::UPGRADE) {
        return next.run(req).await;
    }
    read_body_to_end(req, next).await
}

/// The middleware: the handler sees the body as it arrives; whatever it leaves unread is read
/// and dropped before its answer is sent.
pub async fn read_body_to_end(req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let (tx, rx) = mpsc::channel::<Result<Bytes, axum::Error>>(IN_FLIGHT);
    let pump = tokio::spawn(async move {
        let mut stream = body.into_data_stream();
        let mut forwarding = true;
        let mut drained = 0usize;
        while let Some(frame) = stream.next().await {
            if forwarding {
                if let Err(mpsc::error::SendError(frame)) = tx.send(frame).await {
                    forwarding = false;
                    drained += frame.map(|b| b.len()).unwrap_or(0);
                }
            } else {
                drained += frame.map(|b| b.len()).unwrap_or(0);
            }
            if drained > MAX_DRAIN {
                break;
            }
        }
    });
    let forwarded = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|frame| (frame, rx))
    });
    let resp = next
        .run(Request::from_parts(parts, Body::from_stream(forwarded)))
        .await;
    if tokio::time::timeout(DRAIN_DEADLINE, pump).await.is_err() {
        tracing::debug!("request body not read to its end before the answer");
    }
    resp
}
