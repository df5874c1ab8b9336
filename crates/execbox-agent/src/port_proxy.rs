//! `ANY /proxy/{port}/{path…}`: reverse proxy to `http://127.0.0.1:{port}/{path}` inside the
//! sandbox's own network namespace, WebSocket upgrades included.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Request};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use execbox_proto::proxy_headers::{restore_upgrade, strip_hop_by_hop, upgrade_protocol};
use hyper_util::rt::TokioIo;

use crate::AppState;

/// Routes of the port proxy.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/proxy/{port}", any(proxy_root))
        .route("/proxy/{port}/", any(proxy_root))
        .route("/proxy/{port}/{*rest}", any(proxy_path))
}

fn bad_gateway() -> Response {
    (StatusCode::BAD_GATEWAY, "Bad Gateway").into_response()
}

async fn proxy_root(UrlPath(port): UrlPath<String>, req: Request) -> Response {
    forward(&port, "", req).await
}

async fn proxy_path(UrlPath((port, rest)): UrlPath<(String, String)>, req: Request) -> Response {
    forward(&port, &rest, req).await
}

async fn forward(port: &str, rest: &str, mut req: Request) -> Response {
    let Ok(port) = port.parse::<u16>() else {
        return (StatusCode::BAD_REQUEST, "invalid port").into_response();
    };
    let path_and_query = match req.uri().query() {
        Some(q) => format!("/{rest}?{q}"),
        None => format!("/{rest}"),
    };
    let upgrade = upgrade_protocol(req.headers());
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, &[]);
    if let Some(proto) = &upgrade {
        restore_upgrade(&mut parts.headers, proto);
    }
    let mut builder = http::Request::builder()
        .method(parts.method)
        .uri(path_and_query);
    if let Some(h) = builder.headers_mut() {
        h.extend(parts.headers);
        // Services inside the sandbox see themselves addressed as on loopback.
        if let Ok(v) = HeaderValue::from_str(&format!("127.0.0.1:{port}")) {
            h.insert(http::header::HOST, v);
        }
    }
    let Ok(upstream) = builder.body(body) else {
        return bad_gateway();
    };
    let stream = match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(port, error = %e, "port proxy backend unreachable");
            return bad_gateway();
        }
    };
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(pair) => pair,
        Err(_) => return bad_gateway(),
    };
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "port proxy connection ended");
        }
    });
    let mut resp = match sender.send_request(upstream).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(port, error = %e, "port proxy request failed");
            return bad_gateway();
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let backend_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let Ok((client, backend)) = tokio::try_join!(client_upgrade, backend_upgrade) {
                    let mut client = TokioIo::new(client);
                    let mut backend = TokioIo::new(backend);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
                }
            });
            let (parts, _) = resp.into_parts();
            let mut out = Response::new(Body::empty());
            *out.status_mut() = parts.status;
            *out.headers_mut() = parts.headers;
            return out;
        }
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, &[]);
    // The client's connection is ours: HTTP/1.1 even when the service answers HTTP/1.0.
    parts.version = http::Version::HTTP_11;
    Response::from_parts(parts, Body::new(body))
}
