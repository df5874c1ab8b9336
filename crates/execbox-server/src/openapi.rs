//! The OpenAPI documents, generated from the handlers' `#[utoipa::path]` attributes and the wire
//! types' `ToSchema` derives (`execbox-proto`'s `openapi` feature), served without a key like
//! `/health`: they describe the code, never this server's configuration or data.
//!
//! - `GET /openapi.json`: every surface in one document. The server's own routes (lifecycle,
//!   the egress API under `…/proxy/18080`, isol8, session-execute, `/health`) at their paths;
//!   the agent's execd and Leap0 routes under the proxy path a client calls,
//!   `/v1/sandboxes/{sandboxId}/proxy/44772/…`, with the proxy's own answers (401, 404, 409)
//!   added to each.
//! - `GET /openapi/execd.json`, `GET /openapi/leap0.json`: the agent's two APIs alone, at the
//!   agent's paths, with the proxy prefix as their `servers` URL (what an SDK generator wants).
//!
//! Each document is built once, on first request, and kept as bytes.

use std::sync::OnceLock;

use axum::body::Bytes;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use utoipa::OpenApi;

/// Wire shapes the handlers build with `json!` or parse by hand: described here, for the
/// documents only (the handlers keep their own code).
pub mod schemas {
    use std::collections::BTreeMap;

    use execbox_proto::lifecycle::{ErrorEnvelope, NetworkPolicy};
    use utoipa::ToSchema;

    /// `{"ok": true}`.
    #[derive(ToSchema)]
    pub struct Isol8Ok {
        /// Always true.
        pub ok: bool,
    }

    /// A file's content.
    #[derive(ToSchema)]
    pub struct Isol8FileContent {
        /// Base64 of the bytes.
        pub content: String,
    }

    /// One isol8 session.
    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct Isol8Session {
        /// Session id.
        pub id: String,
        /// A run is in progress.
        pub is_active: bool,
        /// Last use, Unix milliseconds.
        pub last_accessed_at: u64,
    }

    /// The caller's isol8 sessions.
    #[derive(ToSchema)]
    pub struct Isol8Sessions {
        /// Sessions.
        pub sessions: Vec<Isol8Session>,
    }

    /// Body of `POST /session/{id}/signal`.
    #[derive(ToSchema)]
    pub struct Isol8SignalBody {
        /// `SIGTERM` (default), `SIGINT`, `SIGKILL`, `SIGHUP`, `SIGQUIT`, `SIGUSR1` or `SIGUSR2`.
        pub signal: Option<String>,
    }

    /// Answer of `POST /session/{id}/signal`.
    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct Isol8Signalled {
        /// Always true.
        pub ok: bool,
        /// The signal sent.
        pub signal: String,
        /// The session's sandbox.
        pub container_id: String,
    }

    /// A file of a session-execute request.
    #[derive(ToSchema)]
    pub struct SessionFile {
        /// Relative to the working directory, or absolute under `/workspace` or `/tmp`.
        pub path: String,
        /// The content, as `encoding` says.
        pub content: String,
        /// `utf8` (default) or `base64`.
        pub encoding: Option<String>,
    }

    /// Body of `POST /api/execute`: exactly one of `code` and `command`.
    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct SessionExecuteBody {
        /// Session to run in (opened on first use); at most 128 characters.
        pub session_id: String,
        /// JavaScript/TypeScript source, run with Bun.
        pub code: Option<String>,
        /// Shell command, run with `bash -c`.
        pub command: Option<String>,
        /// Files written first.
        pub files: Option<Vec<SessionFile>>,
        /// Environment of this execution only.
        pub env: Option<BTreeMap<String, String>>,
        /// Seconds (default 30, at most 300 or the server's maximum).
        pub timeout: Option<f64>,
        /// Working directory under `/workspace` or `/tmp` (default `/workspace`).
        pub cwd: Option<String>,
        /// Answer as server-sent events.
        pub stream: Option<bool>,
    }

    /// Body of `POST /api/files`.
    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct SessionWriteFilesBody {
        /// Session to write into (opened on first use).
        pub session_id: String,
        /// Files (at least one).
        pub files: Vec<SessionFile>,
    }

    /// Body of `POST /api/processes/kill`.
    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct SessionKillBody {
        /// Session of the process.
        pub session_id: String,
        /// Pid inside the session (not 1).
        pub pid: i64,
        /// `SIGKILL` (default), `SIGTERM`, `SIGINT`, `SIGHUP` or `SIGQUIT`.
        pub signal: Option<String>,
    }

    /// The egress API's answer: the policy in force.
    #[derive(ToSchema)]
    #[schema(rename_all = "camelCase")]
    pub struct EgressStatus {
        /// `ok`.
        pub status: String,
        /// `deny_all`, `allow_all`, `allowlist` or `denylist`.
        pub mode: String,
        /// How the policy is enforced.
        pub enforcement_mode: String,
        /// The policy.
        pub policy: NetworkPolicy,
        /// Why nothing can change (a sandbox without network).
        pub reason: Option<String>,
    }

    /// The egress API's error envelope.
    #[derive(ToSchema)]
    pub struct EgressError {
        /// `error`.
        pub status: String,
        /// What went wrong, naming the field.
        pub reason: String,
    }

    /// A 409 of the egress API: the proxy's (the sandbox is not running) or the egress API's
    /// own (no network to change).
    #[derive(ToSchema)]
    #[allow(dead_code)]
    pub enum EgressConflict {
        /// The proxy's.
        NotRunning(ErrorEnvelope),
        /// The egress API's.
        NoNetwork(EgressError),
    }

    /// The proxy's 401.
    #[derive(ToSchema)]
    pub struct ProxyUnauthorized {
        /// `Unauthorized: invalid or missing header X-EXECD-ACCESS-TOKEN`.
        pub error: String,
    }

    /// `GET /health`.
    #[derive(ToSchema)]
    pub struct Health {
        /// `ok`.
        pub status: String,
        /// The server's version.
        pub version: String,
    }
}

/// `GET /health`: documented here, served by `crate::health`.
#[utoipa::path(
    get,
    path = "/health",
    operation_id = "health",
    tag = "server",
    description = "Liveness; needs no key.",
    responses((status = 200, description = "Up.", body = schemas::Health))
)]
#[allow(dead_code)]
fn health_doc() {}

/// The documents themselves.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "server",
    description = "This document; needs no key. `/openapi/execd.json` and `/openapi/leap0.json` \
                   hold the agent's execd and Leap0 APIs alone, at the agent's paths.",
    responses((status = 200, description = "An OpenAPI 3.1 document.", content_type = "application/json", body = Object))
)]
#[allow(dead_code)]
fn openapi_doc() {}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "execbox",
        description = "Every API of execbox in one document: the OpenSandbox lifecycle API \
            (`/v1/sandboxes…`, key `OPEN-SANDBOX-API-KEY`) and its egress API \
            (`…/proxy/18080/…`), isol8 (`/execute`, `/file`, `/sessions`, `/session/{id}`; bearer \
            key), session-execute (`/api/…`; bearer key), and the in-sandbox agent's execd and \
            Leap0 APIs as a client calls them, through this server's proxy \
            (`/v1/sandboxes/{sandboxId}/proxy/44772/…`, header `X-EXECD-ACCESS-TOKEN` from \
            `GET /v1/sandboxes/{id}/endpoints/44772`, or a key of the sandbox's tenant). Keys are \
            required only when the server has some. `/openapi/execd.json` and \
            `/openapi/leap0.json` describe the agent's APIs at the agent's own paths."
    ),
    paths(
        health_doc,
        openapi_doc,
        crate::lifecycle::create,
        crate::lifecycle::list,
        crate::lifecycle::get,
        crate::lifecycle::delete,
        crate::lifecycle::pause,
        crate::lifecycle::resume,
        crate::lifecycle::renew,
        crate::lifecycle::patch_metadata,
        crate::lifecycle::endpoint,
        crate::lifecycle::snapshots_unsupported,
        crate::diagnostics::logs,
        crate::diagnostics::events,
        crate::diagnostics::inspect,
        crate::diagnostics::summary,
        crate::sandbox_pools::create,
        crate::sandbox_pools::list,
        crate::sandbox_pools::get,
        crate::sandbox_pools::update,
        crate::sandbox_pools::delete,
        crate::egress::doc::egress_health,
        crate::egress::doc::get_policy,
        crate::egress::doc::set_policy,
        crate::egress::doc::patch_policy,
        crate::egress::doc::delete_rules,
        crate::isol8::execute,
        crate::isol8::execute_stream,
        crate::isol8::execute_ws,
        crate::isol8::put_file,
        crate::isol8::get_file,
        crate::isol8::list_sessions,
        crate::isol8::delete_session,
        crate::isol8::signal_session,
        crate::session_exec::execute,
        crate::session_exec::write_files,
        crate::session_exec::list_files,
        crate::session_exec::kill,
    ),
    components(schemas(execbox_proto::isol8::StreamEvent, execbox_proto::session_exec::OutputChunk)),
    tags(
        (name = "server", description = "Health and these documents."),
        (name = "lifecycle", description = "OpenSandbox lifecycle API."),
        (name = "pools", description = "OpenSandbox pools: sandboxes started ahead of need, taken with `extensions.poolRef`."),
        (name = "egress", description = "OpenSandbox egress API of a sandbox, answered by the server."),
        (name = "isol8", description = "isol8 API."),
        (name = "session-execute", description = "Session-execute API."),
    )
)]
struct ServerDoc;

/// The proxy prefix of the agent's routes, as a client calls them.
const AGENT_PREFIX: &str = "/v1/sandboxes/{sandboxId}/proxy/44772";

/// Security schemes of every surface, as JSON (merged into each document's components).
fn security_schemes() -> Value {
    json!({
        "api_key": {"type": "apiKey", "in": "header", "name": "OPEN-SANDBOX-API-KEY",
            "description": "A server key (lifecycle API; also opens the data plane of the key's tenant's sandboxes)."},
        "bearer": {"type": "http", "scheme": "bearer",
            "description": "A server key as `Authorization: Bearer` (isol8, session-execute)."},
        "access_token": {"type": "apiKey", "in": "header", "name": "X-EXECD-ACCESS-TOKEN",
            "description": "The sandbox's access token (from `GET /v1/sandboxes/{id}/endpoints/{port}`)."}
    })
}

fn to_json(doc: utoipa::openapi::OpenApi) -> Value {
    serde_json::to_value(doc).unwrap_or_else(|_| json!({}))
}

/// Adds the security schemes to `doc`'s components.
fn add_security(doc: &mut Value) {
    let Some(root) = doc.as_object_mut() else {
        return;
    };
    let components = root
        .entry("components")
        .or_insert_with(|| json!({}))
        .as_object_mut();
    if let Some(c) = components {
        c.insert("securitySchemes".into(), security_schemes());
    }
}

/// A response of the proxy in front of the agent, for `status`.
fn proxy_response(status: &str) -> Option<(String, Value)> {
    let envelope = json!({"$ref": "#/components/schemas/ErrorEnvelope"});
    let (description, schema) = match status {
        "401" => (
            "The proxy: no valid `X-EXECD-ACCESS-TOKEN` (nor a key of the sandbox's tenant).",
            json!({"$ref": "#/components/schemas/ProxyUnauthorized"}),
        ),
        "404" => (
            "The proxy: no such sandbox (`DOCKER::SANDBOX_NOT_FOUND`).",
            envelope,
        ),
        "409" => (
            "The proxy: the sandbox has failed or is paused (`DOCKER::SANDBOX_NOT_RUNNING`).",
            envelope,
        ),
        "502" => (
            "The proxy: the sandbox's agent could not be reached.",
            envelope,
        ),
        _ => return None,
    };
    Some((description.to_string(), schema))
}

/// Adds the proxy's answers to one operation of the agent: a status the agent has too gets
/// both bodies (`anyOf`), one it has not is added.
fn add_proxy_responses(op: &mut Value) {
    let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
        return;
    };
    for status in ["401", "404", "409", "502"] {
        let Some((description, schema)) = proxy_response(status) else {
            continue;
        };
        match responses.get_mut(status) {
            Some(existing) => {
                let json_schema = existing
                    .pointer_mut("/content/application~1json/schema")
                    .map(Value::take);
                let merged = match json_schema {
                    Some(own) => json!({"anyOf": [own, schema]}),
                    None => schema,
                };
                let desc = existing
                    .get("description")
                    .and_then(Value::as_str)
                    .map(|d| format!("{d} Or: {description}"))
                    .unwrap_or(description);
                *existing = json!({
                    "description": desc,
                    "content": {"application/json": {"schema": merged}}
                });
            }
            None => {
                responses.insert(
                    status.to_string(),
                    json!({
                        "description": description,
                        "content": {"application/json": {"schema": schema}}
                    }),
                );
            }
        }
    }
}

/// Moves the agent document `agent`'s paths under the proxy prefix into `merged`, with the
/// `sandboxId` parameter, the proxy's security and answers; its schemas join `merged`'s.
fn merge_agent(merged: &mut Value, agent: &Value) {
    let sandbox_id = json!({
        "name": "sandboxId", "in": "path", "required": true,
        "description": "Sandbox id.", "schema": {"type": "string"}
    });
    let security = json!([{"access_token": []}, {"api_key": []}, {}]);
    if let (Some(paths), Some(into)) = (
        agent.get("paths").and_then(Value::as_object),
        merged.get_mut("paths").and_then(Value::as_object_mut),
    ) {
        for (path, item) in paths {
            let mut item = item.clone();
            if let Some(obj) = item.as_object_mut() {
                for (method, op) in obj.iter_mut() {
                    if method == "parameters" {
                        continue;
                    }
                    add_proxy_responses(op);
                    if let Some(op) = op.as_object_mut() {
                        op.insert("security".into(), security.clone());
                    }
                }
                let params = obj
                    .entry("parameters")
                    .or_insert_with(|| json!([]))
                    .as_array_mut();
                if let Some(params) = params {
                    params.insert(0, sandbox_id.clone());
                }
            }
            into.insert(format!("{AGENT_PREFIX}{path}"), item);
        }
    }
    let schemas = agent
        .pointer("/components/schemas")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if let Some(into) = merged
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        into.extend(schemas);
    }
    if let (Some(tags), Some(into)) = (
        agent.get("tags").and_then(Value::as_array),
        merged.get_mut("tags").and_then(Value::as_array_mut),
    ) {
        into.extend(tags.iter().cloned());
    }
}

/// The whole document of `/openapi.json`.
pub fn merged() -> Value {
    let mut doc = to_json(ServerDoc::openapi());
    // The agent's routes are reached through the proxy, whose errors are the lifecycle's.
    for agent in [
        execbox_agent::openapi::execd(),
        execbox_agent::openapi::leap0(),
    ] {
        merge_agent(&mut doc, &to_json(agent));
    }
    let version = env!("CARGO_PKG_VERSION");
    if let Some(info) = doc.get_mut("info").and_then(Value::as_object_mut) {
        info.insert("version".into(), Value::String(version.into()));
        info.remove("license");
        info.remove("contact");
    }
    add_security(&mut doc);
    doc
}

/// One of the agent's documents alone, with the proxy prefix as its server URL.
pub fn agent_doc(doc: utoipa::openapi::OpenApi) -> Value {
    let mut doc = to_json(doc);
    if let Some(root) = doc.as_object_mut() {
        root.insert(
            "servers".into(),
            json!([{
                "url": AGENT_PREFIX,
                "description": "Through the execbox server's proxy.",
                "variables": {"sandboxId": {"default": "-", "description": "Sandbox id."}}
            }]),
        );
        root.insert(
            "security".into(),
            json!([{"access_token": []}, {"api_key": []}, {}]),
        );
        if let Some(info) = root.get_mut("info").and_then(Value::as_object_mut) {
            info.insert(
                "version".into(),
                Value::String(env!("CARGO_PKG_VERSION").into()),
            );
            info.remove("license");
            info.remove("contact");
        }
    }
    add_security(&mut doc);
    doc
}

fn cached(cell: &'static OnceLock<Bytes>, build: fn() -> Value) -> Response {
    let body = cell.get_or_init(|| Bytes::from(serde_json::to_vec(&build()).unwrap_or_default()));
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.clone(),
    )
        .into_response()
}

/// `GET /openapi.json`.
pub async fn serve_merged() -> Response {
    static DOC: OnceLock<Bytes> = OnceLock::new();
    cached(&DOC, merged)
}

/// `GET /openapi/execd.json`.
pub async fn serve_execd() -> Response {
    static DOC: OnceLock<Bytes> = OnceLock::new();
    cached(&DOC, || agent_doc(execbox_agent::openapi::execd()))
}

/// `GET /openapi/leap0.json`.
pub async fn serve_leap0() -> Response {
    static DOC: OnceLock<Bytes> = OnceLock::new();
    cached(&DOC, || agent_doc(execbox_agent::openapi::leap0()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_merged_document_has_every_surface() {
        let doc = merged();
        let paths = doc["paths"].as_object().expect("paths");
        for p in [
            "/v1/sandboxes",
            "/execute",
            "/api/execute",
            "/v1/sandboxes/{sandboxId}/proxy/44772/command",
            "/v1/sandboxes/{sandboxId}/proxy/44772/contexts",
        ] {
            assert!(paths.contains_key(p), "{p} missing");
        }
        // Every reference resolves.
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().expect("schemas");
        for part in text.split("#/components/schemas/").skip(1) {
            let name: String = part.chars().take_while(|c| *c != '"').collect();
            assert!(schemas.contains_key(&name), "schema {name} missing");
        }
    }
}
