//! `/metrics` and `/metrics/watch`: CPU and memory of the sandbox itself, from its own cgroup
//! (upstream reports the host's memory and CPU, and samples CPU for one second inside every
//! request).
//!
//! CPU usage is the delta of the cgroup's CPU time since the previous reading, so a request is
//! answered at once and an idle sandbox runs no sampling timer.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::error::ApiError;
use crate::sse::now_ms;
use crate::{AppState, Runner};

const MIB: f64 = 1024.0 * 1024.0;
/// Readings closer together than this reuse the previous percentage (too short to be precise).
const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Interval of `/metrics/watch` objects.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// The execd `Metrics` object.
#[derive(Serialize, Clone, Copy, Debug)]
pub struct Metrics {
    cpu_count: u64,
    cpu_used_pct: f64,
    mem_total_mib: f64,
    mem_used_mib: f64,
    timestamp: i64,
}

struct Reading {
    at: Instant,
    cpu_ns: u64,
    pct: f64,
}

/// CPU-usage bookkeeping between readings.
pub struct Sampler {
    runner: Arc<Runner>,
    /// CPU limit in cores (fractional), or the host's CPUs when unlimited.
    cpu_cores: f64,
    started: Instant,
    last: Mutex<Option<Reading>>,
}

impl Sampler {
    /// A sampler for a sandbox limited to `cpu_millicores` (none: all host CPUs).
    pub fn new(runner: Arc<Runner>, cpu_millicores: Option<u64>) -> Self {
        let host = std::thread::available_parallelism()
            .map(|n| n.get() as f64)
            .unwrap_or(1.0);
        let cpu_cores = match cpu_millicores {
            Some(m) if m > 0 => (m as f64 / 1000.0).min(host),
            _ => host,
        };
        Self {
            runner,
            cpu_cores,
            started: Instant::now(),
            last: Mutex::new(None),
        }
    }

    /// Current metrics of the sandbox.
    pub fn read(&self) -> Result<Metrics, ApiError> {
        let stats = self.runner.sandbox_stats().ok_or_else(|| {
            ApiError::Runtime("error getting metrics. sandbox cgroup unavailable".into())
        })?;
        let now = Instant::now();
        let mut last = match self.last.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let (since, base_ns) = match last.as_ref() {
            Some(r) if now.duration_since(r.at) < MIN_INTERVAL => (None, 0),
            Some(r) => (Some(now.duration_since(r.at)), r.cpu_ns),
            // First reading: the average since the agent started.
            None => (Some(now.duration_since(self.started)), 0),
        };
        let pct = match (since, last.as_ref()) {
            (None, Some(r)) => r.pct,
            (Some(wall), _) if !wall.is_zero() => {
                let used = stats.cpu_usage_ns.saturating_sub(base_ns) as f64;
                (used / (wall.as_nanos() as f64 * self.cpu_cores) * 100.0).clamp(0.0, 100.0)
            }
            _ => 0.0,
        };
        if since.is_some() {
            *last = Some(Reading {
                at: now,
                cpu_ns: stats.cpu_usage_ns,
                pct,
            });
        }
        let mem_total = match self.runner.memory_limit() {
            Some(limit) => limit as f64,
            None => host_memory_bytes().unwrap_or(0) as f64,
        };
        Ok(Metrics {
            cpu_count: (self.cpu_cores.floor() as u64).max(1),
            cpu_used_pct: round2(pct),
            mem_total_mib: round2(mem_total / MIB),
            mem_used_mib: round2(stats.memory_current as f64 / MIB),
            timestamp: now_ms(),
        })
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Routes of the metrics API.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/metrics/watch", get(watch))
}

#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "execdMetrics",
    tag = "execd",
    description = "CPU and memory of the sandbox.",
    responses(
        (status = 200, description = "Metrics.", body = crate::openapi::schemas::Metrics),
        (status = 500, description = "`RUNTIME_ERROR`: the agent failed.", body = execbox_proto::execd::ExecdError),
    )
)]
async fn metrics(State(app): State<Arc<AppState>>) -> Result<Json<Metrics>, ApiError> {
    app.metrics.read().map(Json)
}

/// One NDJSON line: the metrics, or `{"error":…}` when sampling failed.
fn watch_line(app: &AppState) -> Bytes {
    let value = match app.metrics.read() {
        Ok(m) => serde_json::to_value(m).unwrap_or_default(),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    Bytes::from(format!("{value}\n"))
}

/// `GET /metrics/watch`: one object per second until the client goes away (the body stream is
/// dropped with the connection, which ends the loop).
#[utoipa::path(
    get,
    path = "/metrics/watch",
    operation_id = "execdWatchMetrics",
    tag = "execd",
    description = "Metrics every second, one JSON object per line.",
    responses(
        (status = 200, description = "NDJSON.", content_type = "application/x-ndjson", body = String),
    )
)]
async fn watch(State(app): State<Arc<AppState>>) -> Response {
    let mut interval = tokio::time::interval(WATCH_EVERY);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stream = futures_util::stream::unfold((app, interval), |(app, mut interval)| async move {
        interval.tick().await;
        let line = watch_line(&app);
        Some((Ok::<_, std::io::Error>(line), (app, interval)))
    });
    crate::sse::event_stream_response(Body::from_stream(stream))
}
