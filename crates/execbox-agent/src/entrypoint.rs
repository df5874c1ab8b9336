//! The sandbox's entrypoint: started as the sandbox user beside the agent, its output kept
//! (the last [`KEPT_BYTES`]) for the server's diagnostics, and how it ended.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use execbox_proto::run::{EntrypointOutput, ENTRYPOINT_PATH};

use crate::AppState;

/// Output kept: enough for the error that made a program stop, bounded whatever it writes.
pub const KEPT_BYTES: usize = 256 * 1024;

/// The entrypoint's kept output and end.
#[derive(Default)]
pub struct EntrypointLog {
    inner: Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    argv: Vec<String>,
    tail: VecDeque<u8>,
    dropped: u64,
    ended: Option<String>,
}

impl EntrypointLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that `argv` started.
    pub fn started(&self, argv: &[String]) {
        self.lock().argv = argv.to_vec();
    }

    /// Keeps `bytes`, dropping the oldest beyond [`KEPT_BYTES`].
    pub fn append(&self, bytes: &[u8]) {
        let mut kept = self.lock();
        kept.tail.extend(bytes);
        let over = kept.tail.len().saturating_sub(KEPT_BYTES);
        if over > 0 {
            kept.tail.drain(..over);
            kept.dropped += over as u64;
        }
    }

    /// Records how it ended.
    pub fn ended(&self, how: String) {
        self.lock().ended = Some(how);
    }

    /// What is kept now.
    pub fn snapshot(&self) -> EntrypointOutput {
        let kept = self.lock();
        let (a, b) = kept.tail.as_slices();
        let mut bytes = Vec::with_capacity(a.len() + b.len());
        bytes.extend_from_slice(a);
        bytes.extend_from_slice(b);
        EntrypointOutput {
            argv: kept.argv.clone(),
            output: String::from_utf8_lossy(&bytes).into_owned(),
            dropped_bytes: kept.dropped,
            ended: kept.ended.clone(),
        }
    }
}

/// Reads the entrypoint's output pipe into `log` until every writer is gone.
pub async fn keep_output(log: Arc<EntrypointLog>, pipe: tokio::net::unix::pipe::Receiver) {
    use tokio::io::AsyncReadExt;
    let mut pipe = pipe;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => log.append(&buf[..n]),
        }
    }
}

async fn output(State(state): State<Arc<AppState>>) -> Json<EntrypointOutput> {
    Json(state.entrypoint.snapshot())
}

/// `GET /execbox/entrypoint`.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new().route(ENTRYPOINT_PATH, get(output))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_bytes_and_counts_the_rest() {
        let log = EntrypointLog::default();
        log.started(&["/bin/app".into()]);
        log.append(b"first line\n");
        assert_eq!(log.snapshot().output, "first line\n");
        assert_eq!(log.snapshot().dropped_bytes, 0);
        let big = vec![b'x'; KEPT_BYTES];
        log.append(&big);
        log.append(b"\nlast\n");
        let snap = log.snapshot();
        assert_eq!(snap.output.len(), KEPT_BYTES);
        assert!(snap.output.ends_with("x\nlast\n"));
        assert_eq!(snap.dropped_bytes, 11 + 6);
        assert_eq!(snap.ended, None);
        log.ended("exit code 3".into());
        assert_eq!(log.snapshot().ended.as_deref(), Some("exit code 3"));
        assert_eq!(log.snapshot().argv, vec!["/bin/app".to_string()]);
    }
}
