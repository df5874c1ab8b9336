//! The E2B API: the control plane (`/v2/sandboxes…`, `/sandboxes…`; `control.rs`) and the
//! data plane of every sandbox (envd, the code interpreter and other ports, relayed to the
//! sandbox's agent; `data_plane.rs`, with signed `/files` URLs in `signed_files.rs`). Each
//! plane turns its errors into E2B's envelopes in one place (`control::E2bError`,
//! `data_plane::DataError`).
//!
//! The data plane is recognised before any route ([`intercept`]), so its `/health`, `/files`
//! and `/execute` never reach the server's `/health` or isol8's `/execute`.

pub mod control;
pub mod data_plane;
pub mod signed_files;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post, put};
use axum::Router;

use crate::Server;

/// Runs before routing: a data-plane request (routing headers, a sandbox host name, a signed
/// `/files`) is served here; anything else goes on to the routes.
pub async fn intercept(State(server): State<Arc<Server>>, req: Request, next: Next) -> Response {
    match data_plane::classify(server.config.e2b.domain.as_deref(), &req) {
        Some(Ok(target)) => data_plane::handle(server, target, req).await,
        Some(Err(e)) => {
            let mut resp = e.into_response();
            resp.extensions_mut()
                .insert(crate::prometheus::MetricsRoute("/e2b"));
            resp
        }
        None => next.run(req).await,
    }
}

/// The control plane's routes, behind its key check.
pub fn routes(server: Arc<Server>) -> Router<Arc<Server>> {
    use control as c;
    Router::new()
        .route("/v2/sandboxes", post(c::create_v2).get(c::list_v2))
        .route("/sandboxes", post(c::create_v1).get(c::list_v1))
        .route("/sandboxes/{id}", get(c::get).delete(c::kill))
        .route("/sandboxes/{id}/timeout", post(c::set_timeout))
        .route("/sandboxes/{id}/refreshes", post(c::refresh))
        .route("/sandboxes/{id}/pause", post(c::pause))
        .route("/sandboxes/{id}/resume", post(c::resume))
        .route("/sandboxes/{id}/connect", post(c::connect))
        .route("/v2/sandboxes/{id}/connect", post(c::connect))
        .route("/sandboxes/{id}/metrics", get(c::metrics))
        .route("/sandboxes/{id}/network", put(c::update_network))
        .route("/sandboxes/{id}/fork", post(c::fork_unsupported))
        .route("/sandboxes/{id}/snapshots", any(c::snapshots_unsupported))
        .route("/sandboxes/{id}/logs", get(c::logs_unsupported))
        .route("/v2/sandboxes/{id}/logs", get(c::logs_unsupported))
        .route("/snapshots", any(c::snapshots_unsupported))
        .route("/snapshots/{*rest}", any(c::snapshots_unsupported))
        .route("/templates", any(c::templates_unsupported))
        .route("/templates/{*rest}", any(c::templates_unsupported))
        .route("/v2/templates", any(c::templates_unsupported))
        .route("/v2/templates/{*rest}", any(c::templates_unsupported))
        .route("/volumes", any(c::volumes_unsupported))
        .route("/volumes/{*rest}", any(c::volumes_unsupported))
        .route("/secrets", any(c::secrets_unsupported))
        .route("/secrets/{*rest}", any(c::secrets_unsupported))
        .route_layer(middleware::from_fn_with_state(server, c::auth))
}
