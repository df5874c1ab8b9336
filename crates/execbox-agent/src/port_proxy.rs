//! Placeholder, being written.

use std::sync::Arc;

use axum::Router;

use crate::AppState;

/// Routes of this module.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
}
