//! Watching running sandboxes from the server: the agent's exit (through a pidfd, so the
//! server learns of it at once, not at the next request) and the agent's own log lines.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt};

use crate::Server;

/// Longest agent log line forwarded; the rest of a longer line is dropped.
const MAX_LOG_LINE: usize = 4096;

/// Marks the sandbox `id` failed as soon as its agent exits on its own.
pub fn exit(server: &Arc<Server>, id: String, pidfd: OwnedFd) {
    let weak = Arc::downgrade(server);
    tokio::spawn(async move {
        let pidfd = match execbox_jail::spawn::exited(pidfd).await {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "cannot watch the agent's exit");
                return;
            }
        };
        let how = execbox_jail::spawn::exit_of(&pidfd);
        if let Some(server) = weak.upgrade() {
            server.agent_exited(&id, how).await;
        }
    });
}

/// Forwards the agent's standard output and error to the server's log, one event per line.
pub fn log(id: String, log: OwnedFd) {
    tokio::spawn(async move {
        let pipe = match tokio::net::unix::pipe::Receiver::from_owned_fd(log) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(sandbox = %id, error = %e, "agent log unavailable");
                return;
            }
        };
        let mut reader = tokio::io::BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match (&mut reader)
                .take(MAX_LOG_LINE as u64)
                .read_until(b'\n', &mut line)
                .await
            {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line.len() == MAX_LOG_LINE && line.last() != Some(&b'\n') {
                // Skip the rest of an overlong line.
                let mut rest = Vec::new();
                if reader.read_until(b'\n', &mut rest).await.is_err() {
                    return;
                }
            }
            let text = String::from_utf8_lossy(&line);
            tracing::warn!(sandbox = %id, "agent: {}", text.trim_end());
        }
    });
}
