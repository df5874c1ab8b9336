//! The E2B data plane (§3.1): requests for a sandbox's envd (49983), code interpreter (49999)
//! or any other port, addressed by the `E2b-Sandbox-Id`/`E2b-Sandbox-Port` headers, by a host
//! name `{port}-{id}.{domain}`, or by a signed `/files` URL. The server checks the token,
//! strips every credential but envd's `Authorization: Basic` (it names the user) and relays
//! the request to the sandbox's agent over its socket: envd as `/e2b/envd{path}`, the code
//! interpreter as `/e2b/ci{path}`, other ports through the agent's port proxy
//! `/proxy/{port}{path}`. The proxy's own errors are E2B's (502 JSON, 401 JSON).

use std::sync::Arc;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use execbox_proto::e2b as wire;
use execbox_proto::lifecycle::SandboxState;
use subtle::ConstantTimeEq;

use super::signed_files;
use crate::proxy::RelayError;
use crate::registry::SandboxRecord;
use crate::Server;

/// Credentials and routing headers that never enter a sandbox (`authorization` is handled
/// apart: envd RPCs keep `Basic`).
const STRIPPED: &[&str] = &[
    "x-access-token",
    "e2b-traffic-access-token",
    "x-api-key",
    "cookie",
    "open-sandbox-api-key",
    "x-execd-access-token",
    "e2b-sandbox-id",
    "e2b-sandbox-port",
    "host",
];

/// Where a data-plane request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Sandbox id.
    pub id: Option<String>,
    /// Port as sent.
    pub port: String,
}

/// A data-plane error: the one place they become E2B's proxy envelopes.
#[derive(Debug)]
pub enum DataError {
    /// 400 `{"code":400,"message"}`.
    BadRequest(String),
    /// 401 `{"code":401,"message"}`.
    Unauthorized,
    /// 502: no running sandbox by that id (`was not found`).
    NotRunning(String),
    /// 502: nothing listens on the port (`port is not open`).
    PortClosed(String, u16),
    /// 500.
    Internal(String),
}

impl IntoResponse for DataError {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            Self::BadRequest(message) => (
                StatusCode::BAD_REQUEST,
                serde_json::json!({"code": 400, "message": message}),
            ),
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"code": 401, "message": wire::UNAUTHORIZED_MESSAGE}),
            ),
            Self::NotRunning(id) => (StatusCode::BAD_GATEWAY, wire::sandbox_not_running_body(&id)),
            Self::PortClosed(id, port) => {
                (StatusCode::BAD_GATEWAY, wire::port_not_open_body(&id, port))
            }
            Self::Internal(message) => {
                tracing::error!(error = %message, "E2B data-plane request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    serde_json::json!({"code": 500, "message": message}),
                )
            }
        };
        (status, Json(body)).into_response()
    }
}

/// Whether `req` belongs to the E2B data plane, and where it goes: the routing headers (both
/// needed), a host name under the configured `[e2b] domain`, or a header-less signed
/// `GET`/`POST /files` (its sandbox found by its signature: no id yet).
pub fn classify(domain: Option<&str>, req: &Request) -> Option<Result<Target, DataError>> {
    let h = req.headers();
    let get = |n: &str| h.get(n).map(|v| v.to_str().unwrap_or_default().to_string());
    let (id, port) = (get(wire::HEADER_SANDBOX_ID), get(wire::HEADER_SANDBOX_PORT));
    match (id, port) {
        (Some(id), Some(port)) => return Some(Ok(Target { id: Some(id), port })),
        (Some(_), None) => {
            return Some(Err(DataError::BadRequest(
                "Missing header: E2b-Sandbox-Port".into(),
            )))
        }
        (None, Some(_)) => {
            return Some(Err(DataError::BadRequest(
                "Missing header: E2b-Sandbox-Id".into(),
            )))
        }
        (None, None) => {}
    }
    if let Some(domain) = domain {
        let host = h
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri().host());
        if let Some((port, id)) = host.and_then(|host| wire::parse_sandbox_host(host, domain)) {
            return Some(Ok(Target {
                id: Some(id.to_string()),
                port: port.to_string(),
            }));
        }
    }
    let signed_files = req.uri().path() == "/files"
        && signed_files::operation(req.method()).is_some()
        && req
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|p| p.starts_with("signature=")));
    signed_files.then(|| {
        Ok(Target {
            id: None,
            port: wire::ENVD_PORT.to_string(),
        })
    })
}

/// The running sandbox `id` the data plane may reach (no owner: pool, isol8 and session
/// sandboxes are as unknown here as on the lifecycle APIs).
/// A paused sandbox created with `autoResume` is resumed by the request.
async fn running(server: &Server, id: &str) -> Result<SandboxRecord, DataError> {
    let rec = server
        .registry
        .get(id)
        .filter(|r| r.owner.is_none())
        .ok_or_else(|| DataError::NotRunning(id.to_string()))?;
    match rec.state {
        SandboxState::Running => Ok(rec),
        SandboxState::Paused if rec.e2b.as_ref().is_some_and(|e| e.auto_resume) => {
            super::control::resume_on_traffic(server, &rec)
                .await
                .map_err(|e| {
                    tracing::warn!(sandbox = %id, error = ?e, "resuming on traffic failed");
                    DataError::NotRunning(id.to_string())
                })
        }
        _ => Err(DataError::NotRunning(id.to_string())),
    }
}

fn token_matches(presented: Option<&str>, rec: &SandboxRecord) -> bool {
    presented.is_some_and(|t| bool::from(t.as_bytes().ct_eq(rec.token.as_bytes())))
}

/// The signed-URL parameters of a `/files` request, if it has a signature.
fn signed_query(req: &Request) -> Option<std::collections::BTreeMap<String, String>> {
    let q = wire::parse_query(req.uri().query().unwrap_or("")).ok()?;
    q.contains_key("signature").then_some(q)
}

fn signed_of<'a>(
    q: &'a std::collections::BTreeMap<String, String>,
    op: &'static str,
) -> signed_files::Signed<'a> {
    signed_files::Signed {
        path: q.get("path").map(String::as_str).unwrap_or(""),
        user: q.get("username").map(String::as_str).unwrap_or(""),
        signature: q.get("signature").map(String::as_str).unwrap_or(""),
        expiration: q.get("signature_expiration").map(String::as_str),
        op,
    }
}

/// Serves one data-plane request.
pub async fn handle(server: Arc<Server>, target: Target, req: Request) -> Response {
    let route = match target.port.trim().parse::<u16>() {
        Ok(wire::ENVD_PORT) => "/e2b/envd",
        Ok(wire::CODE_INTERPRETER_PORT) => "/e2b/ci",
        _ => "/e2b/port",
    };
    let mut resp = match serve(server, target, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    // The sandbox's paths are its own: one series per kind of port, not per path.
    resp.extensions_mut()
        .insert(crate::prometheus::MetricsRoute(route));
    resp
}

async fn serve(server: Arc<Server>, target: Target, req: Request) -> Result<Response, DataError> {
    let port: u16 = target
        .port
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| DataError::BadRequest(format!("Invalid port: {:?}", target.port)))?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let headers = req.headers();
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let access = header(wire::HEADER_ACCESS_TOKEN);
    let rec = match &target.id {
        Some(id) => {
            let rec = running(&server, id).await?;
            let authorized = if port == wire::ENVD_PORT {
                let path = req.uri().path();
                let op = signed_files::operation(req.method());
                if req.method() == http::Method::GET && path == "/health" {
                    true
                } else if let (true, Some(op), None, Some(q)) =
                    (path == "/files", op, access, signed_query(&req))
                {
                    signed_of(&q, op).valid_for(&rec.token, now)
                } else {
                    token_matches(access, &rec)
                }
            } else {
                token_matches(access, &rec)
                    || token_matches(header(wire::HEADER_TRAFFIC_TOKEN), &rec)
            };
            if !authorized {
                return Err(DataError::Unauthorized);
            }
            rec
        }
        // A header-less signed `/files`: the one running sandbox whose token signed it.
        None => {
            let op = signed_files::operation(req.method()).ok_or(DataError::Unauthorized)?;
            let q = signed_query(&req).ok_or(DataError::Unauthorized)?;
            let live: Vec<SandboxRecord> = server
                .registry
                .all()
                .into_iter()
                .filter(|r| r.owner.is_none() && r.state == SandboxState::Running)
                .collect();
            signed_files::find_signer(&signed_of(&q, op), live, now)
                .ok_or(DataError::Unauthorized)?
        }
    };
    server.renew_on_access(&rec);
    let path = req.uri().path();
    let agent_path = match port {
        wire::ENVD_PORT => format!("/e2b/envd{path}"),
        wire::CODE_INTERPRETER_PORT => format!("/e2b/ci{path}"),
        other => format!("/proxy/{other}{path}"),
    };
    let pq = match req.uri().query() {
        Some(q) => format!("{agent_path}?{q}"),
        None => agent_path,
    };
    let keep_basic =
        port == wire::ENVD_PORT && header("authorization").is_some_and(|a| a.starts_with("Basic "));
    let mut strip: Vec<&str> = STRIPPED.to_vec();
    if !keep_basic {
        strip.push("authorization");
    }
    match crate::proxy::relay(&server, &rec.id, pq, req, &strip).await {
        // The agent's port proxy answers a bare 502 when nothing listens on the port.
        Ok(resp)
            if port != wire::ENVD_PORT
                && port != wire::CODE_INTERPRETER_PORT
                && resp.status() == StatusCode::BAD_GATEWAY
                && is_port_proxy_502(&resp) =>
        {
            Err(DataError::PortClosed(rec.id.clone(), port))
        }
        Ok(resp) => Ok(resp),
        Err(RelayError::Unreachable(_)) => Err(DataError::NotRunning(rec.id.clone())),
        Err(RelayError::Internal(e)) => Err(DataError::Internal(e)),
    }
}

/// The agent port proxy's own 502 (`Bad Gateway`, text), not a service's.
fn is_port_proxy_502(resp: &Response) -> bool {
    let h = resp.headers();
    h.get(http::header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() == b"11")
        && h.get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/plain"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)], uri: &str, method: &str) -> Request {
        let mut b = http::Request::builder().uri(uri).method(method);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(axum::body::Body::empty()).expect("request")
    }

    #[test]
    fn routing_headers_and_signed_files_are_the_data_plane() {
        let c = |r: &Request| {
            classify(Some("sbx.example.com"), r).map(|t| t.map_err(|e| format!("{e:?}")))
        };
        let r = request(
            &[("E2b-Sandbox-Id", "abc"), ("E2b-Sandbox-Port", "49983")],
            "/health",
            "GET",
        );
        assert_eq!(
            c(&r),
            Some(Ok(Target {
                id: Some("abc".into()),
                port: "49983".into()
            }))
        );
        let r = request(&[("E2b-Sandbox-Id", "abc")], "/health", "GET");
        assert!(matches!(c(&r), Some(Err(e)) if e.contains("E2b-Sandbox-Port")));
        assert_eq!(c(&request(&[], "/health", "GET")), None);
        assert_eq!(c(&request(&[], "/execute", "POST")), None);
        assert_eq!(c(&request(&[], "/files?path=a", "GET")), None);
        assert!(matches!(
            c(&request(&[], "/files?path=a&signature=v1_x", "GET")),
            Some(Ok(Target { id: None, .. }))
        ));
        let r = request(
            &[("Host", "49999-abc-def.sbx.example.com:8080")],
            "/execute",
            "POST",
        );
        assert_eq!(
            c(&r),
            Some(Ok(Target {
                id: Some("abc-def".into()),
                port: "49999".into()
            }))
        );
        assert_eq!(
            c(&request(&[("Host", "127.0.0.1:8080")], "/execute", "POST")),
            None
        );
    }
}
