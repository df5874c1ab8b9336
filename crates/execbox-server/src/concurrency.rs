//! Per-tenant bound on executions running at once (isol8 and session-execute): past
//! `max_concurrent_runs` a request is refused (429) instead of queueing sandboxes without end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::Server;

/// Counts of running executions by tenant.
#[derive(Default)]
pub struct RunGate {
    running: Mutex<HashMap<String, usize>>,
}

/// One admitted execution; its slot is given back when dropped.
pub struct RunPermit {
    server: Arc<Server>,
    tenant: String,
}

impl Drop for RunPermit {
    fn drop(&mut self) {
        let mut running = self.server.runs.lock();
        if let Some(n) = running.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                running.remove(&self.tenant);
            }
        }
    }
}

impl RunGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits one execution of `tenant`, or gives the tenant's limit when it is reached.
    pub fn admit(server: &Arc<Server>, tenant: &str) -> Result<RunPermit, usize> {
        let max = server.config.policy.for_tenant(tenant).max_concurrent_runs;
        let mut running = server.runs.lock();
        let n = running.entry(tenant.to_string()).or_default();
        if *n >= max {
            return Err(max);
        }
        *n += 1;
        Ok(RunPermit {
            server: server.clone(),
            tenant: tenant.to_string(),
        })
    }
}
