//! Placeholder, being written.

use std::sync::Arc;

use axum::Router;

use crate::{AppState, Runner};

/// Background CPU sampler.
pub struct Sampler {}

impl Sampler {
    /// Starts sampling.
    pub fn start(_runner: Arc<Runner>, _cpu_millicores: Option<u64>) -> Self {
        Self {}
    }
}

/// Routes of this module.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
}
