//! `/v1/sandboxes/{id}/proxy/{port}/…`: the data plane, a streaming reverse proxy to the
//! sandbox's agent over its unix socket.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use execbox_proto::lifecycle::SandboxState;
use execbox_proto::proxy_headers::{restore_upgrade, strip_hop_by_hop, upgrade_protocol};

use crate::lifecycle::LifecycleError;
use crate::Server;

/// The agent's own port.
pub const AGENT_PORT: u16 = 44772;
/// The egress-policy port the SDKs look up.
pub const EGRESS_PORT: u16 = 18080;

/// Credentials never enter a sandbox: the server's keys, and the sandbox's own access token
/// (with it, code inside could call the proxy for its own sandbox, its egress API included, if
/// it can reach the server; the agent does not need it: only the server talks to it).
const CREDENTIALS: &[&str] = &[
    "authorization",
    "cookie",
    "open-sandbox-api-key",
    "x-execd-access-token",
    "host",
];

/// Splits `/v1/sandboxes/{id}/proxy/{port}{rest}` into its parts.
fn parse_path(path: &str) -> Option<(&str, &str, &str)> {
    let rest = path.strip_prefix("/v1/sandboxes/")?;
    let (id, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("proxy/")?;
    let (port, tail) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    Some((id, port, tail))
}

/// Any method on the proxy path.
pub async fn proxy(State(server): State<Arc<Server>>, req: Request) -> Response {
    match forward(server, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Any method on a signed route, `/v1/sandboxes/{id}/signed/{port}/{expires}/{signature}…`:
/// the route itself is the credential (see `signed.rs`), so no header is asked for.
pub async fn signed_proxy(State(server): State<Arc<Server>>, req: Request) -> Response {
    match forward_signed(server, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Splits `/v1/sandboxes/{id}/signed/{port}/{expires}/{signature}{rest}` into its parts.
fn parse_signed_path(path: &str) -> Option<(&str, &str, &str, &str, &str)> {
    let rest = path.strip_prefix("/v1/sandboxes/")?;
    let (id, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("signed/")?;
    let (port, rest) = rest.split_once('/')?;
    let (expires, rest) = rest.split_once('/')?;
    let (signature, tail) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    Some((id, port, expires, signature, tail))
}

async fn forward_signed(server: Arc<Server>, req: Request) -> Result<Response, LifecycleError> {
    let path = req.uri().path().to_string();
    let (id, port, expires, signature, tail) =
        parse_signed_path(&path).ok_or_else(|| LifecycleError::NotFound(path.clone()))?;
    let port_number = parse_port(port)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp().max(0) as u64;
    let signer = server.endpoint_signer()?;
    signer
        .verify(id, port_number, expires, signature, now)
        .map_err(|e| match e {
            crate::signed::SignedError::Malformed(why) => {
                LifecycleError::invalid(format!("signed endpoint: {why}"))
            }
            e => LifecycleError::Unauthorized(e.to_string()),
        })?;
    let rec = server
        .registry
        .get(id)
        .filter(|r| r.owner.is_none())
        .ok_or_else(|| LifecycleError::NotFound(id.to_string()))?;
    forward_to(server, rec, port, tail, req).await
}

fn parse_port(port: &str) -> Result<u16, LifecycleError> {
    port.parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| LifecycleError::Invalid {
            code: execbox_proto::lifecycle::ErrorCode::InvalidPort,
            message: format!("port: {port:?} is not a port number"),
        })
}

async fn forward(server: Arc<Server>, req: Request) -> Result<Response, LifecycleError> {
    let path = req.uri().path().to_string();
    let (id, port, tail) =
        parse_path(&path).ok_or_else(|| LifecycleError::NotFound(path.clone()))?;
    // Pool, isol8 and session-execute sandboxes (those with an owner) are reached only through
    // their own surface and its policy: here they are as unknown as on the lifecycle API.
    let rec = server
        .registry
        .get(id)
        .filter(|r| r.owner.is_none())
        .ok_or_else(|| LifecycleError::NotFound(id.to_string()))?;
    if !server.proxy_authorized(req.headers(), &rec).await {
        return Ok((
            StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({
                "error": "Unauthorized: invalid or missing header X-EXECD-ACCESS-TOKEN"
            })),
        )
            .into_response());
    }
    forward_to(server, rec, port, tail, req).await
}

/// Relays `req` to `port` of the sandbox `rec`, the caller being authorized.
async fn forward_to(
    server: Arc<Server>,
    rec: crate::registry::SandboxRecord,
    port: &str,
    tail: &str,
    req: Request,
) -> Result<Response, LifecycleError> {
    let id = rec.id.as_str();
    server.renew_on_access(&rec);
    let port = parse_port(port)?;
    if rec.state == SandboxState::Failed {
        return Err(LifecycleError::Conflict {
            code: execbox_proto::lifecycle::ErrorCode::SandboxNotRunning,
            message: format!(
                "sandbox {id} has failed: {}",
                rec.message.as_deref().unwrap_or("its agent is gone")
            ),
        });
    }
    if rec.state == SandboxState::Paused {
        return Err(LifecycleError::Conflict {
            code: execbox_proto::lifecycle::ErrorCode::SandboxNotRunning,
            message: format!("sandbox {id} is paused; resume it first"),
        });
    }
    let tail = if tail.is_empty() { "/" } else { tail };
    if port == EGRESS_PORT {
        let (parts, body) = req.into_parts();
        return Ok(crate::egress::handle(
            &server,
            &rec,
            parts.method,
            tail,
            parts.uri.query(),
            body,
        )
        .await);
    }
    let agent_path = if port == AGENT_PORT {
        tail.to_string()
    } else {
        format!("/proxy/{port}{tail}")
    };
    let pq = match req.uri().query() {
        Some(q) => format!("{agent_path}?{q}"),
        None => agent_path,
    };
    match relay(&server, id, pq, req, CREDENTIALS).await {
        Ok(resp) => {
            if port == AGENT_PORT && tail == "/metrics" && resp.status() == StatusCode::OK {
                if let Some(net) = server.net_of(id) {
                    let (parts, body) = resp.into_parts();
                    return Ok(with_network_usage(parts, body, net.usage()).await);
                }
            }
            Ok(resp)
        }
        Err(RelayError::Unreachable(e)) => Ok((
            StatusCode::BAD_GATEWAY,
            axum::Json(execbox_proto::lifecycle::ErrorEnvelope::new(
                execbox_proto::lifecycle::ErrorCode::UnknownError,
                format!("sandbox {id} is unreachable: {e}"),
            )),
        )
            .into_response()),
        Err(RelayError::Internal(e)) => Err(LifecycleError::Internal(e)),
    }
}

/// Why [`relay`] got no answer from the agent.
#[derive(Debug)]
pub(crate) enum RelayError {
    /// The agent could not be reached, or the exchange failed.
    Unreachable(String),
    /// The request could not be built.
    Internal(String),
}

/// Sends `req` to the agent of sandbox `id` as `path_and_query`, without hop-by-hop headers
/// and `strip` (the caller's credentials); the agent's answer streams back (an upgrade is
/// spliced, WebSockets included). The caller has authorized the request.
pub(crate) async fn relay(
    server: &Server,
    id: &str,
    path_and_query: String,
    req: Request,
    strip: &[&str],
) -> Result<Response, RelayError> {
    let upgrade = upgrade_protocol(req.headers());
    let mut req = req;
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let client_host = parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string);
    strip_hop_by_hop(&mut parts.headers, strip);
    parts.headers.remove(http::header::HOST);
    if let Some(h) = client_host.and_then(|h| HeaderValue::from_str(&h).ok()) {
        parts.headers.entry("x-forwarded-host").or_insert(h);
    }
    parts
        .headers
        .entry("x-forwarded-proto")
        .or_insert(HeaderValue::from_static("http"));
    let mut builder = http::Request::builder()
        .method(parts.method)
        .uri(path_and_query)
        .header(http::header::HOST, "sandbox");
    if let Some(h) = builder.headers_mut() {
        h.extend(parts.headers);
        // A WebSocket (or other) upgrade is end-to-end here: the agent must see it.
        if let Some(proto) = &upgrade {
            restore_upgrade(h, proto);
        }
    }
    let upstream = builder
        .body(body)
        .map_err(|e| RelayError::Internal(e.to_string()))?;
    let socket = server
        .socket_path(id)
        .map_err(|e| RelayError::Internal(e.to_string()))?;
    let resp = match crate::agent_client::send(&socket, upstream).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(sandbox = id, error = %e, "agent unreachable");
            return Err(RelayError::Unreachable(e.to_string()));
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            return Ok(splice_upgrade(id, client_upgrade, resp));
        }
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, &[]);
    // The client's connection is ours: HTTP/1.1 whatever the upstream spoke.
    parts.version = http::Version::HTTP_11;
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// The agent's `/metrics` with what the sandbox's network did, which only the server knows:
/// `net_bytes_out`, `net_bytes_in`, `net_connections`, `net_connections_open`, `net_refused`,
/// `net_dns_queries`.
async fn with_network_usage(
    mut parts: http::response::Parts,
    body: Body,
    usage: execbox_net::Usage,
) -> Response {
    use http_body_util::BodyExt;
    let bytes = match http_body_util::Limited::new(body, 64 * 1024)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            tracing::debug!(error = %e, "reading the agent's metrics");
            return StatusCode::BAD_GATEWAY.into_response();
        }
    };
    let mut v: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(_) => return Response::from_parts(parts, Body::from(bytes)),
    };
    if let Some(m) = v.as_object_mut() {
        for (k, n) in [
            ("net_bytes_out", usage.bytes_out),
            ("net_bytes_in", usage.bytes_in),
            ("net_connections", usage.connections),
            ("net_connections_open", usage.connections_open),
            ("net_refused", usage.refused),
            ("net_dns_queries", usage.dns_queries),
        ] {
            m.insert(k.into(), n.into());
        }
    }
    let body = serde_json::to_vec(&v).unwrap_or_default();
    parts.headers.remove(http::header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

/// Answers the client's upgrade with the agent's 101 and copies bytes both ways between the
/// two upgraded connections until either side closes.
fn splice_upgrade(
    id: &str,
    client: hyper::upgrade::OnUpgrade,
    mut agent_resp: http::Response<hyper::body::Incoming>,
) -> Response {
    let agent = hyper::upgrade::on(&mut agent_resp);
    let id = id.to_string();
    tokio::spawn(async move {
        let (client, agent) = match tokio::try_join!(client, agent) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(sandbox = id, error = %e, "upgrade failed");
                return;
            }
        };
        let mut client = hyper_util::rt::TokioIo::new(client);
        let mut agent = hyper_util::rt::TokioIo::new(agent);
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut agent).await {
            tracing::debug!(sandbox = id, error = %e, "upgraded connection ended");
        }
    });
    let (parts, _) = agent_resp.into_parts();
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = parts.status;
    *resp.headers_mut() = parts.headers;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_proxy_paths() {
        assert_eq!(
            parse_path("/v1/sandboxes/abc/proxy/44772/command/status/x"),
            Some(("abc", "44772", "/command/status/x"))
        );
        assert_eq!(
            parse_path("/v1/sandboxes/abc/proxy/44772"),
            Some(("abc", "44772", ""))
        );
        assert_eq!(parse_path("/v1/sandboxes/abc/endpoints/1"), None);
    }

    #[test]
    fn splits_signed_paths() {
        assert_eq!(
            parse_signed_path("/v1/sandboxes/a-b/signed/8080/x2qxvk/0f0f/index.html"),
            Some(("a-b", "8080", "x2qxvk", "0f0f", "/index.html"))
        );
        assert_eq!(
            parse_signed_path("/v1/sandboxes/a/signed/8080/x2qxvk/0f0f"),
            Some(("a", "8080", "x2qxvk", "0f0f", ""))
        );
        assert_eq!(
            parse_signed_path("/v1/sandboxes/a/signed/8080/x2qxvk"),
            None
        );
        assert_eq!(parse_signed_path("/v1/sandboxes/a/proxy/8080/x/y"), None);
    }
}
