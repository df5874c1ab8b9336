//! Placeholder, being written.

use std::sync::Arc;

use axum::Router;

use crate::AppState;

/// PTY sessions of this sandbox.
#[derive(Default)]
pub struct Ptys {}

/// Routes of this module.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
}
