//! The OpenSandbox egress API (`/v1/sandboxes/{id}/proxy/18080/…`), answered by the server
//! itself: the policy lives here, out of the sandbox's reach, and a change applies to the next
//! name and connection at once (`?closeExisting=true` also closes open connections).
//!
//! Routes: `GET /policy`, `POST`/`PUT /policy` (a whole policy; `{}` or `null` is deny-all),
//! `PATCH /policy` (rules merged in front), `DELETE /policy` (targets removed), `GET /healthz`.
//! Errors are `{"status":"error","reason":…}` with 400 for a bad body naming the field.

use axum::body::Bytes;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use execbox_proto::lifecycle::{EgressRule, NetworkPolicy};
use serde_json::json;

use crate::registry::SandboxRecord;
use crate::Server;

/// Largest request body of the egress API.
const MAX_BODY: usize = 1 << 20;

/// An egress API error: `{"status":"error","reason":…}` with its status.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct EgressError {
    status: StatusCode,
    reason: String,
}

impl IntoResponse for EgressError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(reason = %self.reason, "egress API");
        }
        (
            self.status,
            Json(json!({"status": "error", "reason": self.reason})),
        )
            .into_response()
    }
}

fn error(status: StatusCode, reason: impl Into<String>) -> EgressError {
    EgressError {
        status,
        reason: reason.into(),
    }
}

fn status(policy: &execbox_net::Policy) -> Response {
    Json(json!({
        "status": "ok",
        "mode": policy.mode(),
        // Every connection is held to the names this sandbox resolved (DNS pinning).
        "enforcementMode": "dns+nft",
        "policy": policy.to_wire(),
    }))
    .into_response()
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8], field: &str) -> Result<T, EgressError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let at = e.path().to_string();
        let at = if at == "." {
            field.to_string()
        } else {
            format!("{field}{}", at.trim_start_matches('.'))
        };
        error(StatusCode::BAD_REQUEST, format!("{at}: {}", e.inner()))
    })
}

/// Answers one egress API request for the sandbox `rec`.
pub async fn handle(
    server: &Server,
    rec: &SandboxRecord,
    method: Method,
    path: &str,
    query: Option<&str>,
    body: axum::body::Body,
) -> Response {
    answer(server, rec, method, path, query, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn answer(
    server: &Server,
    rec: &SandboxRecord,
    method: Method,
    path: &str,
    query: Option<&str>,
    body: axum::body::Body,
) -> Result<Response, EgressError> {
    let body: Bytes = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body: larger than {MAX_BODY} bytes"),
        )
    })?;
    let close_existing = query.is_some_and(|q| {
        q.split('&')
            .any(|kv| matches!(kv, "closeExisting=true" | "closeExisting=1"))
    });
    match (method, path.trim_end_matches('/')) {
        (Method::GET, "/healthz") => Ok(StatusCode::OK.into_response()),
        (method, "/policy") => {
            let Some(net) = server.net_of(&rec.id) else {
                // A sandbox made without network has none to change.
                return match method {
                    Method::GET => Ok(Json(json!({
                        "status": "ok",
                        "mode": "deny_all",
                        "enforcementMode": "dns+nft",
                        "reason": why_no_network(rec),
                        "policy": execbox_net::Policy::deny_all().to_wire(),
                    }))
                    .into_response()),
                    _ => Err(error(
                        StatusCode::CONFLICT,
                        format!("{}; its egress cannot be changed", why_no_network(rec)),
                    )),
                };
            };
            let change = match method {
                Method::GET => return Ok(status(&net.policy())),
                Method::POST | Method::PUT => {
                    let wire: Option<NetworkPolicy> = parse(&body, "policy")?;
                    let policy = match wire {
                        None => execbox_net::Policy::deny_all(),
                        Some(mut w) => {
                            if let Some(rules) = &w.egress {
                                w.egress = Some(
                                    expand_presets(
                                        rules,
                                        &server.config.network.registries,
                                        "policy.egress",
                                    )
                                    .map_err(|e| error(StatusCode::BAD_REQUEST, e))?,
                                );
                            }
                            execbox_net::Policy::from_wire(&w, "policy")
                                .map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))?
                        }
                    };
                    mode_allowed(server, rec, &policy)?;
                    Change::Replace(policy)
                }
                Method::PATCH => {
                    let rules: Vec<EgressRule> = parse(&body, "rules")?;
                    let rules = expand_presets(&rules, &server.config.network.registries, "rules")
                        .map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
                    let rules = execbox_net::policy::parse_rules(&rules, "rules")
                        .map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))?;
                    let total = net.policy().patched_len(&rules);
                    if total > execbox_net::policy::MAX_RULES {
                        return Err(error(
                            StatusCode::BAD_REQUEST,
                            format!(
                                "rules: the policy would hold {total} rules, at most {} are kept",
                                execbox_net::policy::MAX_RULES
                            ),
                        ));
                    }
                    Change::Patch(rules)
                }
                Method::DELETE => Change::Remove(parse::<Vec<String>>(&body, "targets")?),
                _ => return Err(error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")),
            };
            net.update(
                |p| match change {
                    Change::Replace(new) => *p = new,
                    Change::Patch(rules) => p.patch(rules),
                    Change::Remove(targets) => p.remove(&targets),
                },
                close_existing,
            );
            let now = net.policy();
            if let Some(Err(e)) = server
                .registry
                .update(&rec.id, |r| r.network = Some(now.to_wire()))
            {
                tracing::warn!(sandbox = %rec.id, error = %e, "recording the egress policy");
            }
            tracing::info!(sandbox = %rec.id, mode = now.mode(), rules = now.rules.len(), "egress policy changed");
            Ok(status(&now))
        }
        _ => Err(error(StatusCode::NOT_FOUND, format!("no route {path}"))),
    }
}

/// Why sandbox `rec` has no network device: it never asked for one, or it had one and lost it
/// when the server restarted (the device's server end does not survive a restart).
fn why_no_network(rec: &crate::registry::SandboxRecord) -> &'static str {
    if rec.network.is_some() {
        "this sandbox lost its network when the server restarted (it keeps running without \
         one): nothing leaves it; create a new sandbox for network access"
    } else {
        "this sandbox has no network (it was created without networkPolicy): nothing leaves it"
    }
}

/// Replaces every rule whose target is `@name` by one rule per host of the registry list
/// `name` (`[network.registries]`), with the same action; `field` names the rules in errors.
pub fn expand_presets(
    rules: &[EgressRule],
    registries: &std::collections::BTreeMap<String, Vec<String>>,
    field: &str,
) -> std::result::Result<Vec<EgressRule>, String> {
    let mut out = Vec::with_capacity(rules.len());
    for (i, rule) in rules.iter().enumerate() {
        match rule.target.strip_prefix('@') {
            Some(name) => {
                let hosts = registries.get(name).ok_or_else(|| {
                    format!(
                        "{field}[{i}].target: {:?} names no registry list of this server \
                         ([network.registries])",
                        rule.target
                    )
                })?;
                out.extend(hosts.iter().map(|h| EgressRule {
                    action: rule.action,
                    target: h.clone(),
                }));
            }
            None => out.push(rule.clone()),
        }
    }
    Ok(out)
}

enum Change {
    Replace(execbox_net::Policy),
    Patch(Vec<execbox_net::Rule>),
    Remove(Vec<String>),
}

/// A whole new policy may not turn a sandbox into a mode its tenant may not have.
fn mode_allowed(
    server: &Server,
    rec: &SandboxRecord,
    policy: &execbox_net::Policy,
) -> Result<(), EgressError> {
    let mode = match policy.default {
        execbox_net::Action::Deny => "allowlist",
        execbox_net::Action::Allow => "public",
    };
    let allowed = &server.config.policy.for_tenant(&rec.tenant).network_modes;
    if allowed.iter().any(|m| m == mode) {
        Ok(())
    } else {
        Err(error(
            StatusCode::BAD_REQUEST,
            format!(
                "policy.defaultAction: network mode {mode:?} is not allowed by this server's \
                 policy (allowed: {})",
                allowed.join(", ")
            ),
        ))
    }
}

/// The routes above as OpenAPI operations: [`handle`] dispatches them itself, so these
/// functions exist only to carry their documentation (never called).
#[allow(dead_code)]
pub(crate) mod doc {
    use super::*;
    use execbox_proto::lifecycle::ErrorEnvelope;

    #[utoipa::path(
        get,
        path = "/v1/sandboxes/{id}/proxy/18080/healthz",
        operation_id = "egressHealth",
        tag = "egress",
        description = "The egress API is up.",
        params(
            ("id" = String, Path, description = "Sandbox id."),
        ),
        responses(
            (status = 200, description = "Up."),
            (status = 401, description = "No valid `X-EXECD-ACCESS-TOKEN` (nor a key of the sandbox's tenant).", body = crate::openapi::schemas::ProxyUnauthorized),
            (status = 404, description = "No such sandbox: `DOCKER::SANDBOX_NOT_FOUND`.", body = ErrorEnvelope),
            (status = 409, description = "The sandbox has failed or is paused: `DOCKER::SANDBOX_NOT_RUNNING`.", body = ErrorEnvelope),
        ),
        security(("access_token" = []), ("api_key" = []), ())
    )]
    fn egress_health() {}

    #[utoipa::path(
        get,
        path = "/v1/sandboxes/{id}/proxy/18080/policy",
        operation_id = "getEgressPolicy",
        tag = "egress",
        description = "The sandbox's egress policy (`deny_all` for a sandbox without network).",
        params(
            ("id" = String, Path, description = "Sandbox id."),
        ),
        responses(
            (status = 200, description = "The policy now in force.", body = crate::openapi::schemas::EgressStatus),
            (status = 401, description = "No valid `X-EXECD-ACCESS-TOKEN` (nor a key of the sandbox's tenant).", body = crate::openapi::schemas::ProxyUnauthorized),
            (status = 404, description = "No such sandbox: `DOCKER::SANDBOX_NOT_FOUND`.", body = ErrorEnvelope),
            (status = 409, description = "The sandbox has failed or is paused: `DOCKER::SANDBOX_NOT_RUNNING`.", body = ErrorEnvelope),
        ),
        security(("access_token" = []), ("api_key" = []), ())
    )]
    fn get_policy() {}

    #[utoipa::path(
        method(post, put),
        path = "/v1/sandboxes/{id}/proxy/18080/policy",
        operation_id = "setEgressPolicy",
        tag = "egress",
        description = "Replaces the policy (`{}` or `null` is deny-all); `?closeExisting=true` also closes open connections.",
        params(
            ("id" = String, Path, description = "Sandbox id."),
        ),
        request_body(content = Option<NetworkPolicy>, description = "The whole new policy."),
        responses(
            (status = 200, description = "The policy now in force.", body = crate::openapi::schemas::EgressStatus),
            (status = 400, description = "A malformed body or a rule breaking the policy; the reason names the field.", body = crate::openapi::schemas::EgressError),
            (status = 413, description = "The body is over 1 MiB.", body = crate::openapi::schemas::EgressError),
            (status = 401, description = "No valid `X-EXECD-ACCESS-TOKEN` (nor a key of the sandbox's tenant).", body = crate::openapi::schemas::ProxyUnauthorized),
            (status = 404, description = "No such sandbox: `DOCKER::SANDBOX_NOT_FOUND`.", body = ErrorEnvelope),
            (status = 409, description = "The sandbox has failed or is paused (`DOCKER::SANDBOX_NOT_RUNNING`), or has no network to change (created without `networkPolicy`).", body = crate::openapi::schemas::EgressConflict),
        ),
        security(("access_token" = []), ("api_key" = []), ())
    )]
    fn set_policy() {}

    #[utoipa::path(
        patch,
        path = "/v1/sandboxes/{id}/proxy/18080/policy",
        operation_id = "patchEgressPolicy",
        tag = "egress",
        description = "Merges rules in front of the policy's.",
        params(
            ("id" = String, Path, description = "Sandbox id."),
        ),
        request_body(content = Vec<EgressRule>, description = "Rules to add."),
        responses(
            (status = 200, description = "The policy now in force.", body = crate::openapi::schemas::EgressStatus),
            (status = 400, description = "A malformed body or a rule breaking the policy; the reason names the field.", body = crate::openapi::schemas::EgressError),
            (status = 413, description = "The body is over 1 MiB.", body = crate::openapi::schemas::EgressError),
            (status = 401, description = "No valid `X-EXECD-ACCESS-TOKEN` (nor a key of the sandbox's tenant).", body = crate::openapi::schemas::ProxyUnauthorized),
            (status = 404, description = "No such sandbox: `DOCKER::SANDBOX_NOT_FOUND`.", body = ErrorEnvelope),
            (status = 409, description = "The sandbox has failed or is paused (`DOCKER::SANDBOX_NOT_RUNNING`), or has no network to change (created without `networkPolicy`).", body = crate::openapi::schemas::EgressConflict),
        ),
        security(("access_token" = []), ("api_key" = []), ())
    )]
    fn patch_policy() {}

    #[utoipa::path(
        delete,
        path = "/v1/sandboxes/{id}/proxy/18080/policy",
        operation_id = "deleteEgressRules",
        tag = "egress",
        description = "Removes the rules of the given targets.",
        params(
            ("id" = String, Path, description = "Sandbox id."),
        ),
        request_body(content = Vec<String>, description = "Targets whose rules go."),
        responses(
            (status = 200, description = "The policy now in force.", body = crate::openapi::schemas::EgressStatus),
            (status = 400, description = "A malformed body or a rule breaking the policy; the reason names the field.", body = crate::openapi::schemas::EgressError),
            (status = 413, description = "The body is over 1 MiB.", body = crate::openapi::schemas::EgressError),
            (status = 401, description = "No valid `X-EXECD-ACCESS-TOKEN` (nor a key of the sandbox's tenant).", body = crate::openapi::schemas::ProxyUnauthorized),
            (status = 404, description = "No such sandbox: `DOCKER::SANDBOX_NOT_FOUND`.", body = ErrorEnvelope),
            (status = 409, description = "The sandbox has failed or is paused (`DOCKER::SANDBOX_NOT_RUNNING`), or has no network to change (created without `networkPolicy`).", body = crate::openapi::schemas::EgressConflict),
        ),
        security(("access_token" = []), ("api_key" = []), ())
    )]
    fn delete_rules() {}
}
