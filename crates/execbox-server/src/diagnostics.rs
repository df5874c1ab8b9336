//! Diagnostics of a sandbox (`/v1/sandboxes/{id}/diagnostics/…`), as upstream's server offers
//! them: its entrypoint's output (kept by the agent), the lifecycle events this server saw, and
//! a summary of both with the record. Two shapes, as upstream: with `scope`, the stable JSON
//! descriptor of the Diagnostics API (`delivery: inline`); without it, the older plain text
//! (marked `Deprecation: true`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::lifecycle::LifecycleError;
use crate::registry::SandboxRecord;
use crate::{Server, Tenant};
use execbox_proto::lifecycle::ErrorEnvelope;

/// Events kept per sandbox (the oldest go first).
const EVENTS_KEPT: usize = 256;
/// How long the agent has to hand over the entrypoint's output.
const AGENT_WAIT: Duration = Duration::from_secs(3);

/// Lifecycle events per sandbox, in memory (a restarted server starts a sandbox's list again
/// with its re-attachment).
#[derive(Default)]
pub struct Events {
    by_sandbox: Mutex<HashMap<String, VecDeque<(OffsetDateTime, String)>>>,
}

impl Events {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<(OffsetDateTime, String)>>> {
        self.by_sandbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `what` happening to sandbox `id` now.
    pub fn record(&self, id: &str, what: impl Into<String>) {
        let mut all = self.lock();
        let list = all.entry(id.to_string()).or_default();
        if list.len() >= EVENTS_KEPT {
            list.pop_front();
        }
        list.push_back((OffsetDateTime::now_utc(), what.into()));
    }

    /// Forgets sandbox `id` (deleted).
    pub fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    /// The last `limit` events of `id`, one line each, oldest first.
    fn text(&self, id: &str, limit: usize) -> String {
        let all = self.lock();
        let Some(list) = all.get(id) else {
            return String::new();
        };
        let skip = list.len().saturating_sub(limit);
        list.iter()
            .skip(skip)
            .map(|(at, what)| format!("{} {what}\n", stamp(*at)))
            .collect()
    }
}

fn stamp(at: OffsetDateTime) -> String {
    at.replace_nanosecond(0)
        .unwrap_or(at)
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// The query parameters the diagnostics routes take (unknown ones are ignored, as upstream).
#[derive(Debug, Default, serde::Deserialize)]
struct DiagnosticsQuery {
    scope: Option<String>,
    tail: Option<String>,
    limit: Option<String>,
    event_limit: Option<String>,
}

fn parse_query(raw: Option<&str>) -> Result<DiagnosticsQuery, LifecycleError> {
    serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|e| LifecycleError::invalid(format!("query: {e}")))
}

/// A positive count within `1..=max`, `default` when absent.
fn count(
    field: &str,
    raw: Option<&str>,
    default: usize,
    max: usize,
) -> Result<usize, LifecycleError> {
    match raw {
        None => Ok(default),
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                LifecycleError::invalid(format!("{field}: {v:?} is not a number from 1 to {max}"))
            }),
    }
}

/// The stable descriptor of upstream's Diagnostics API, always delivered inline.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiagnosticContent {
    sandbox_id: String,
    kind: &'static str,
    scope: String,
    delivery: &'static str,
    content_type: &'static str,
    content: String,
    content_length: usize,
    truncated: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
}

/// Text gathered for one answer.
struct Gathered {
    text: String,
    truncated: bool,
    warnings: Vec<String>,
}

/// The entrypoint's output, its last `tail` lines.
async fn container_logs(server: &Server, rec: &SandboxRecord, tail: usize) -> Gathered {
    if rec.entrypoint.is_empty() {
        return Gathered {
            text: String::new(),
            truncated: false,
            warnings: vec!["this sandbox has no entrypoint: there is no container output".into()],
        };
    }
    let fetched = match server.socket_path(&rec.id) {
        Ok(socket) => {
            tokio::time::timeout(AGENT_WAIT, crate::agent_run::entrypoint_output(&socket))
                .await
                .map_err(|_| "the sandbox's agent did not answer in time".to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
        }
        Err(e) => Err(e.to_string()),
    };
    match fetched {
        Ok(out) => {
            let lines: Vec<&str> = out.output.split_inclusive('\n').collect();
            let skip = lines.len().saturating_sub(tail);
            let mut text: String = lines[skip..].concat();
            if let Some(how) = &out.ended {
                if !text.is_empty() && !text.ends_with('\n') {
                    text.push('\n');
                }
                // Its command is in the record (`inspect`), which may hold anything.
                text.push_str(&format!("[the entrypoint ended: {how}]\n"));
            }
            Gathered {
                text,
                truncated: skip > 0 || out.dropped_bytes > 0,
                warnings: if out.dropped_bytes > 0 {
                    vec![format!(
                        "the first {} bytes of the output are not kept",
                        out.dropped_bytes
                    )]
                } else {
                    Vec::new()
                },
            }
        }
        Err(why) => Gathered {
            text: String::new(),
            truncated: false,
            warnings: vec![format!("the entrypoint's output is not available: {why}")],
        },
    }
}

fn lifecycle_events(server: &Server, rec: &SandboxRecord, limit: usize) -> Gathered {
    let mut text = server.events.text(&rec.id, limit);
    // The record's current status, which outlives a server restart.
    if let Some(reason) = &rec.reason {
        text.push_str(&format!(
            "{} status {} reason {reason}{}\n",
            stamp(rec.last_transition_at),
            rec.state,
            rec.message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        ));
    }
    Gathered {
        text,
        truncated: false,
        warnings: Vec::new(),
    }
}

fn plain(text: String) -> Response {
    let mut resp = (
        StatusCode::OK,
        [(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        text,
    )
        .into_response();
    resp.headers_mut()
        .insert("deprecation", HeaderValue::from_static("true"));
    resp
}

fn descriptor(
    rec: &SandboxRecord,
    kind: &'static str,
    scope: &str,
    parts: Vec<Gathered>,
) -> Response {
    let mut content = String::new();
    let mut truncated = false;
    let mut warnings = Vec::new();
    for p in parts {
        content.push_str(&p.text);
        truncated |= p.truncated;
        warnings.extend(p.warnings);
    }
    Json(DiagnosticContent {
        sandbox_id: rec.id.clone(),
        kind,
        scope: scope.to_string(),
        delivery: "inline",
        content_type: "text/plain; charset=utf-8",
        content_length: content.len(),
        content,
        truncated,
        warnings,
    })
    .into_response()
}

fn unknown_scope(scope: &str, known: &str) -> LifecycleError {
    LifecycleError::invalid(format!(
        "scope: {scope:?} is not a diagnostic scope of this server (known: {known})"
    ))
}

/// `GET /v1/sandboxes/{id}/diagnostics/logs`: the entrypoint's output (`container`), the
/// lifecycle events (`lifecycle`), or both (`all`).
#[utoipa::path(
    get,
    path = "/v1/sandboxes/{id}/diagnostics/logs",
    operation_id = "getDiagnosticLogs",
    tag = "lifecycle",
    description = "The sandbox's entrypoint output and lifecycle events.",
    params(
        ("id" = String, Path, description = "Sandbox id."),
        ("scope" = Option<String>, Query, description = "`container` (the entrypoint's output), `lifecycle` or `all`; absent: the older plain text."),
        ("tail" = Option<u32>, Query, description = "Last lines of plain text (1-10000, default 100)."),
    ),
    responses(
        (status = 200, description = "With `scope`: the descriptor (delivered inline); without: plain text (`Deprecation: true`).", body = DiagnosticContent, content_type = "application/json"),
        (status = 400, description = "A parameter is out of range; the message names it.", body = ErrorEnvelope),
        (status = 401, description = "No or an unknown `OPEN-SANDBOX-API-KEY` (only when the server has keys): `MISSING_API_KEY` or `INVALID_API_KEY`.", body = ErrorEnvelope),
        (status = 404, description = "No such sandbox for this tenant: `DOCKER::SANDBOX_NOT_FOUND`.", body = ErrorEnvelope),
    ),
    security(("api_key" = []), ())
)]
pub async fn logs(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, LifecycleError> {
    let rec = crate::lifecycle::find(&server, &id, &tenant)?;
    let query = parse_query(q.as_deref())?;
    let tail = count("tail", query.tail.as_deref(), 100, 10_000)?;
    let Some(scope) = query.scope else {
        return Ok(plain(container_logs(&server, &rec, tail).await.text));
    };
    let parts = match scope.as_str() {
        "container" => vec![container_logs(&server, &rec, usize::MAX).await],
        "lifecycle" => vec![lifecycle_events(&server, &rec, EVENTS_KEPT)],
        "all" => vec![
            lifecycle_events(&server, &rec, EVENTS_KEPT),
            container_logs(&server, &rec, usize::MAX).await,
        ],
        other => return Err(unknown_scope(other, "container, lifecycle, all")),
    };
    Ok(descriptor(&rec, "logs", &scope, parts))
}

/// `GET /v1/sandboxes/{id}/diagnostics/events`: what happened to the sandbox.
#[utoipa::path(
    get,
    path = "/v1/sandboxes/{id}/diagnostics/events",
    operation_id = "getDiagnosticEvents",
    tag = "lifecycle",
    description = "What happened to the sandbox.",
    params(
        ("id" = String, Path, description = "Sandbox id."),
        ("scope" = Option<String>, Query, description = "`lifecycle`, `runtime` or `all`; absent: the older plain text."),
        ("limit" = Option<u32>, Query, description = "Last events of plain text (1-500, default 50)."),
    ),
    responses(
        (status = 200, description = "With `scope`: the descriptor (delivered inline); without: plain text (`Deprecation: true`).", body = DiagnosticContent, content_type = "application/json"),
        (status = 400, description = "A parameter is out of range; the message names it.", body = ErrorEnvelope),
        (status = 401, description = "No or an unknown `OPEN-SANDBOX-API-KEY` (only when the server has keys): `MISSING_API_KEY` or `INVALID_API_KEY`.", body = ErrorEnvelope),
        (status = 404, description = "No such sandbox for this tenant: `DOCKER::SANDBOX_NOT_FOUND`.", body = ErrorEnvelope),
    ),
    security(("api_key" = []), ())
)]
pub async fn events(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, LifecycleError> {
    let rec = crate::lifecycle::find(&server, &id, &tenant)?;
    let query = parse_query(q.as_deref())?;
    let limit = count("limit", query.limit.as_deref(), 50, 500)?;
    let Some(scope) = query.scope else {
        return Ok(plain(lifecycle_events(&server, &rec, limit).text));
    };
    match scope.as_str() {
        "lifecycle" | "runtime" | "all" => Ok(descriptor(
            &rec,
            "events",
            &scope,
            vec![lifecycle_events(&server, &rec, EVENTS_KEPT)],
        )),
        other => Err(unknown_scope(other, "lifecycle, runtime, all")),
    }
}

/// `GET /v1/sandboxes/{id}/diagnostics/inspect`: the sandbox's record, as text.
#[utoipa::path(
    get,
    path = "/v1/sandboxes/{id}/diagnostics/inspect",
    operation_id = "getDiagnosticInspect",
    tag = "lifecycle",
    description = "The sandbox's record, as text.",
    params(
        ("id" = String, Path, description = "Sandbox id."),
    ),
    responses(
        (status = 200, description = "Plain text.", body = String, content_type = "text/plain"),
        (status = 400, description = "A parameter is out of range; the message names it.", body = ErrorEnvelope),
        (status = 401, description = "No or an unknown `OPEN-SANDBOX-API-KEY` (only when the server has keys): `MISSING_API_KEY` or `INVALID_API_KEY`.", body = ErrorEnvelope),
        (status = 404, description = "No such sandbox for this tenant: `DOCKER::SANDBOX_NOT_FOUND`.", body = ErrorEnvelope),
    ),
    security(("api_key" = []), ())
)]
pub async fn inspect(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Response, LifecycleError> {
    let rec = crate::lifecycle::find(&server, &id, &tenant)?;
    Ok(plain(inspect_text(&rec)))
}

fn inspect_text(rec: &SandboxRecord) -> String {
    let mut text = serde_json::to_string_pretty(&rec.to_api()).unwrap_or_default();
    text.push('\n');
    text.push_str(&format!(
        "limits: {}\n",
        serde_json::to_string(&rec.limits).unwrap_or_default()
    ));
    // The environment's names only: its values may be secrets (they are sealed at rest).
    let env: BTreeMap<&str, &str> = rec.env.keys().map(|k| (k.as_str(), "***")).collect();
    text.push_str(&format!(
        "env: {}\n",
        serde_json::to_string(&env).unwrap_or_default()
    ));
    text
}

/// `GET /v1/sandboxes/{id}/diagnostics/summary`: the record, the events and the last lines of
/// the entrypoint's output, in one text.
#[utoipa::path(
    get,
    path = "/v1/sandboxes/{id}/diagnostics/summary",
    operation_id = "getDiagnosticSummary",
    tag = "lifecycle",
    description = "Record, events and the last lines of output in one text.",
    params(
        ("id" = String, Path, description = "Sandbox id."),
        ("tail" = Option<u32>, Query, description = "Lines of output (1-10000, default 50)."),
        ("event_limit" = Option<u32>, Query, description = "Events (1-500, default 20)."),
    ),
    responses(
        (status = 200, description = "Plain text.", body = String, content_type = "text/plain"),
        (status = 400, description = "A parameter is out of range; the message names it.", body = ErrorEnvelope),
        (status = 401, description = "No or an unknown `OPEN-SANDBOX-API-KEY` (only when the server has keys): `MISSING_API_KEY` or `INVALID_API_KEY`.", body = ErrorEnvelope),
        (status = 404, description = "No such sandbox for this tenant: `DOCKER::SANDBOX_NOT_FOUND`.", body = ErrorEnvelope),
    ),
    security(("api_key" = []), ())
)]
pub async fn summary(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, LifecycleError> {
    let rec = crate::lifecycle::find(&server, &id, &tenant)?;
    let query = parse_query(q.as_deref())?;
    let tail = count("tail", query.tail.as_deref(), 50, 10_000)?;
    let event_limit = count("event_limit", query.event_limit.as_deref(), 20, 500)?;
    let rule = "=".repeat(72);
    let thin = "-".repeat(40);
    let logs = container_logs(&server, &rec, tail).await;
    let mut text = format!(
        "{rule}\nSANDBOX DIAGNOSTICS SUMMARY\nSandbox ID: {}\n{rule}\n\n{thin}\nINSPECT\n{thin}\n{}\n{thin}\nEVENTS\n{thin}\n{}\n{thin}\nLOGS (last {tail} lines)\n{thin}\n{}",
        rec.id,
        inspect_text(&rec),
        lifecycle_events(&server, &rec, event_limit).text,
        logs.text,
    );
    for w in logs.warnings {
        text.push_str(&format!("[{w}]\n"));
    }
    let mut resp = plain(text);
    resp.headers_mut().remove("deprecation");
    Ok(resp)
}
