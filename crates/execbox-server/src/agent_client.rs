//! HTTP/1.1 to a sandbox agent over its unix socket.

use std::path::Path;

use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// Errors reaching an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentClientError {
    /// Connecting to the socket failed.
    #[error("connecting to the sandbox agent failed: {0}")]
    Connect(#[source] std::io::Error),
    /// The HTTP exchange failed.
    #[error("talking to the sandbox agent failed: {0}")]
    Http(#[from] hyper::Error),
}

/// Sends one request on a fresh connection (a unix-socket connect costs a few microseconds,
/// and a connection per request keeps slow streams from blocking each other).
pub async fn send<B>(
    socket: &Path,
    req: Request<B>,
) -> Result<http::Response<Incoming>, AgentClientError>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(AgentClientError::Connect)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "agent connection ended");
        }
    });
    Ok(sender.send_request(req).await?)
}
