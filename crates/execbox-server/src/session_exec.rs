//! The session-execute API (`/api/…`, see `../shared/compat/session-exec.md`).

use std::sync::Arc;

use axum::Router;

use crate::Server;

/// Routes of the session-execute API, with their own auth and error envelope.
pub fn routes(server: Arc<Server>) -> Router<Arc<Server>> {
    let _ = server;
    Router::new()
}
