//! Placeholder, being written.

use std::sync::Arc;

use axum::Router;

use crate::AppState;

/// Bash sessions of this sandbox.
#[derive(Default)]
pub struct Sessions {}

/// Routes of this module.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
}
