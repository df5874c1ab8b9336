//! The server's own Prometheus metrics (`[metrics] listen`: a listener of its own, off the
//! public one). Counters and histograms are recorded where things happen (through the
//! `metrics` facade); gauges of the current state (sandboxes by state and tenant, pool,
//! connections) are read when scraped.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::Server;

/// Latency buckets of HTTP requests, in seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Whether this process records metrics (`[metrics] listen`): without it the request path
/// does no metrics work at all.
static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Installs the process's recorder (once). `None` when another recorder is installed already.
pub fn install() -> Option<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets(LATENCY_BUCKETS)
        .ok()?
        .install_recorder()
        .inspect_err(|e| tracing::warn!(error = %e, "metrics recorder"))
        .ok()?;
    ENABLED.store(true, std::sync::atomic::Ordering::Relaxed);
    Some(handle)
}

/// The route a response is counted under when its path is not (the E2B data plane, whose
/// paths are the sandbox's own): set as a response extension.
#[derive(Debug, Clone)]
pub struct MetricsRoute(pub &'static str);

/// One request served: its route (ids and ports replaced by placeholders, so that the number
/// of series stays bounded), status and latency.
pub fn request(method: &str, path: &str, status: u16, seconds: f64) {
    if !ENABLED.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    metrics::histogram!(
        "execbox_http_request_duration_seconds",
        "method" => method.to_string(),
        "route" => route_of(path),
        "status" => status.to_string(),
    )
    .record(seconds);
}

/// A sandbox started (`owner`: lifecycle, pool, isol8, session-execute…).
pub fn sandbox_created(owner: &str) {
    metrics::counter!("execbox_sandboxes_created_total", "owner" => owner.to_string()).increment(1);
}

/// A sandbox could not be started.
pub fn sandbox_create_failed() {
    metrics::counter!("execbox_sandbox_create_failures_total").increment(1);
}

/// A sandbox removed, and why (`user_delete`, `expired`, …).
pub fn sandbox_deleted(reason: &str) {
    metrics::counter!("execbox_sandboxes_deleted_total", "reason" => reason.to_string())
        .increment(1);
}

/// A sandbox asked of a pool (`pool`: `warm` for one-shot runs, `lifecycle` for `/v1/pools`):
/// `hit` when one was ready, else it had to be started.
pub fn pool_acquired(pool: &'static str, hit: bool) {
    metrics::counter!(
        "execbox_pool_acquisitions_total",
        "pool" => pool,
        "result" => if hit { "hit" } else { "miss" },
    )
    .increment(1);
}

/// A sandbox's agent died on its own.
pub fn agent_died() {
    metrics::counter!("execbox_agent_deaths_total").increment(1);
}

/// The route of `path`: `/v1/sandboxes/{id}/proxy/{port}` and the like.
fn route_of(path: &str) -> String {
    let mut out = Vec::new();
    let mut parts = path.split('/').filter(|p| !p.is_empty());
    while let Some(part) = parts.next() {
        out.push(part.to_string());
        match part {
            "sandboxes" | "snapshots" | "sessions" | "contexts" | "pools" => {
                if let Some(_id) = parts.next() {
                    out.push("{id}".into());
                }
            }
            "proxy" | "endpoints" | "signed" => {
                if parts.next().is_some() {
                    out.push("{port}".into());
                }
                // Below the proxy is the sandbox's own API.
                break;
            }
            _ => {}
        }
        if out.len() >= 6 {
            break;
        }
    }
    format!("/{}", out.join("/"))
}

/// Serves `/metrics` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, handle: PrometheusHandle, server: Arc<Server>) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "metrics listener");
            return;
        }
    };
    tracing::info!(%addr, "metrics listening");
    let app = Router::new()
        .route("/metrics", get(render))
        .with_state((handle, server));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics listener");
    }
}

async fn render(State((handle, server)): State<(PrometheusHandle, Arc<Server>)>) -> String {
    // The state now, from the records; a combination seen before and gone now reads 0.
    static SEEN: std::sync::Mutex<std::collections::BTreeSet<(String, String)>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut by_state: std::collections::BTreeMap<(String, String), u64> = Default::default();
    for r in server.registry.all() {
        *by_state
            .entry((format!("{:?}", r.state), r.tenant.clone()))
            .or_default() += 1;
    }
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    for key in seen.iter() {
        by_state.entry(key.clone()).or_insert(0);
    }
    for ((state, tenant), n) in by_state {
        seen.insert((state.clone(), tenant.clone()));
        metrics::gauge!("execbox_sandboxes", "state" => state, "tenant" => tenant).set(n as f64);
    }
    drop(seen);
    metrics::gauge!("execbox_pool_ready", "pool" => "warm").set(server.pool.ready_total() as f64);
    metrics::gauge!("execbox_pool_target", "pool" => "warm").set(server.pool.target_total() as f64);
    metrics::gauge!("execbox_pool_ready", "pool" => "lifecycle")
        .set(server.sandbox_pools.idle_total() as f64);
    metrics::gauge!("execbox_open_connections").set(crate::listener::open_connections() as f64);
    handle.render()
}

#[cfg(test)]
mod tests {
    use super::route_of;

    #[test]
    fn routes_have_placeholders() {
        assert_eq!(route_of("/v1/sandboxes"), "/v1/sandboxes");
        assert_eq!(route_of("/v1/sandboxes/abc-123"), "/v1/sandboxes/{id}");
        assert_eq!(
            route_of("/v1/sandboxes/abc/proxy/44772/command"),
            "/v1/sandboxes/{id}/proxy/{port}"
        );
        assert_eq!(
            route_of("/v1/sandboxes/abc/pause"),
            "/v1/sandboxes/{id}/pause"
        );
        assert_eq!(route_of("/health"), "/health");
    }
}
