//! What the benchmarks share: a release `execbox serve` on loopback, a sandbox with its execd
//! endpoint, and small helpers. Included by each benchmark with `mod support;`.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub type Res<T> = Result<T, String>;

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into())
}

/// `N CPUs (model), load average a b c`: the machine a result was measured on.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "{cpus} CPUs ({}), load average {}",
        cpu_model(),
        load.join(" ")
    )
}

/// An HTTP error with the response body, when there is one.
pub fn describe(e: ureq::Error) -> String {
    match e {
        ureq::Error::Status(s, r) => format!("HTTP {s}: {}", r.into_string().unwrap_or_default()),
        e => e.to_string(),
    }
}

/// `execbox serve` (the release binary of this build) on `127.0.0.1:port`, with its state in
/// `state_dir` and, when given, the configuration file `config`; errors only to stderr.
pub fn spawn_serve(
    config: Option<&std::path::Path>,
    port: u16,
    state_dir: &std::path::Path,
) -> Res<Child> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_execbox"));
    cmd.arg("serve");
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    cmd.arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--state-dir")
        .arg(state_dir)
        .env("RUST_LOG", "error")
        // The tests' template cache: built once, not into each throwaway state directory.
        .env("EXECBOX_TEMPLATES_DIR", "/var/tmp/execbox-test-templates")
        .env_remove("EXECBOX_API_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting execbox serve: {e}"))
}

/// The `p` quantile (0 to 1) of `sorted`, by nearest rank; `None` when there are no samples.
fn nearest_rank<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    let last = sorted.len().checked_sub(1)?;
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(sorted[i.min(last)])
}

/// The `p` quantile of sorted durations (zero when there are none).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    nearest_rank(sorted, p).unwrap_or(Duration::ZERO)
}

/// The `p` quantile of sorted samples in ms (NaN when there are none).
pub fn percentile_ms(sorted: &[f64], p: f64) -> f64 {
    nearest_rank(sorted, p).unwrap_or(f64::NAN)
}

/// Writes `contents` to `dir/name`, `dir` made anew for it (mode 0700, by this process): the
/// benches run as root with their paths in the shared temporary directory, where a name
/// someone else made first (a symlink to a file of the host's) must not be written through.
/// `mkdir` refuses a name that exists, symlink or not; a leftover of an earlier run (the same
/// pid after a reboot) is removed first, without following it.
fn private_file(dir: &std::path::Path, name: &str, contents: &str) -> Res<std::path::PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(dir),
        Ok(_) => std::fs::remove_file(dir),
        Err(_) => Ok(()),
    }
    .map_err(|e| format!("removing a leftover {}: {e}", dir.display()))?;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("making {}: {e}", dir.display()))?;
    let path = dir.join(name);
    std::fs::write(&path, contents).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(path)
}

pub fn free_port() -> Res<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("free port: {e}"))
}

/// A release `execbox serve` on a free loopback port with its own state directory.
pub struct Server {
    child: Child,
    pub base: String,
    state_dir: PathBuf,
}

impl Server {
    /// Starts the server; `name` labels its state directory.
    pub fn start(name: &str) -> Res<Server> {
        Self::start_with_config(name, None)
    }

    /// Starts the server with a configuration file holding `config_toml`.
    pub fn start_with_config(name: &str, config_toml: Option<&str>) -> Res<Server> {
        let port = free_port()?;
        let state_dir =
            std::env::temp_dir().join(format!("execbox-bench-{name}-{}", std::process::id()));
        let config = match config_toml {
            Some(toml) => Some(private_file(&state_dir, "config.toml", toml)?),
            None => None,
        };
        let child = spawn_serve(config.as_deref(), port, &state_dir)?;
        let server = Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            state_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if ureq::get(&format!("{}/health", server.base)).call().is_ok() {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        server.stop();
        Err("the server did not come up".into())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's state directory.
    pub fn state_dir(&self) -> &std::path::Path {
        &self.state_dir
    }

    /// Deletes every sandbox, stops the server, removes its state.
    pub fn stop(mut self) {
        let timeout = Duration::from_secs(30);
        if let Ok(r) = ureq::get(&format!("{}/v1/sandboxes?pageSize=200", self.base))
            .timeout(timeout)
            .call()
        {
            if let Ok(v) = r.into_json::<Value>() {
                for item in v["items"].as_array().cloned().unwrap_or_default() {
                    if let Some(id) = item["id"].as_str() {
                        let t = Instant::now();
                        let r = ureq::delete(&format!("{}/v1/sandboxes/{id}", self.base))
                            .timeout(timeout)
                            .call();
                        if let Err(e) = r {
                            println!(
                                "  DELETE /v1/sandboxes/{id} failed after {:.1} s: {}",
                                t.elapsed().as_secs_f64(),
                                describe(e)
                            );
                        }
                    }
                }
            }
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        // The server removes its pool and one-shot sandboxes before it exits.
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                _ if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// A sandbox and its execd endpoint.
pub struct Sandbox {
    pub id: String,
    endpoint: String,
    token: String,
    agent: ureq::Agent,
}

impl Sandbox {
    /// Creates a sandbox from the lifecycle request `body` and waits until its agent answers.
    pub fn create(server: &Server, body: Value) -> Res<Sandbox> {
        let r = ureq::post(&format!("{}/v1/sandboxes", server.base))
            .timeout(Duration::from_secs(60))
            .send_json(body)
            .map_err(|e| format!("create: {}", describe(e)))?;
        let v: Value = r.into_json().map_err(|e| e.to_string())?;
        let id = v["id"].as_str().ok_or("no id")?.to_string();
        let ep: Value = ureq::get(&format!(
            "{}/v1/sandboxes/{id}/endpoints/44772",
            server.base
        ))
        .call()
        .map_err(|e| format!("endpoint: {}", describe(e)))?
        .into_json()
        .map_err(|e| e.to_string())?;
        let sb = Sandbox {
            id,
            endpoint: format!("http://{}", ep["endpoint"].as_str().ok_or("no endpoint")?),
            token: ep["headers"]["X-EXECD-ACCESS-TOKEN"]
                .as_str()
                .ok_or("no token")?
                .to_string(),
            // Enough kept-alive connections for the concurrent series.
            agent: ureq::AgentBuilder::new()
                .max_idle_connections(256)
                .max_idle_connections_per_host(256)
                .build(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while sb.req("GET", "/ping").call().is_err() {
            if Instant::now() > deadline {
                return Err("the sandbox never answered /ping".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(sb)
    }

    /// An execd request carrying the sandbox's token.
    pub fn req(&self, method: &str, path: &str) -> ureq::Request {
        self.agent
            .request(method, &format!("{}{path}", self.endpoint))
            .set("X-EXECD-ACCESS-TOKEN", &self.token)
            .timeout(Duration::from_secs(60))
    }
}

/// What a row of the "faster than bare" table (issue 15) asks of a figure.
#[derive(Debug, Clone, Copy)]
pub enum Goal {
    /// The figure over its baseline at most this (times, latencies).
    RatioAtMost(f64),
    /// The figure over its baseline at least this (throughputs).
    RatioAtLeast(f64),
    /// The figure itself at most this, in its own unit (no baseline ratio is asked for).
    AtMost(f64),
}

/// Prints one row of the targets table: the figure, its baseline measured in the same run, the
/// ratio and whether the goal is met. Every row starts with `TARGET |`, so that
/// `scripts/bench-targets.sh` can gather the rows of every benchmark into one table.
pub fn target_row(
    row: &str,
    value: f64,
    baseline: f64,
    unit: &str,
    baseline_label: &str,
    goal: Goal,
) {
    let ratio = value / baseline;
    let (met, want) = match goal {
        Goal::RatioAtMost(r) => (ratio <= r, format!("ratio <= {r}")),
        Goal::RatioAtLeast(r) => (ratio >= r, format!("ratio >= {r}")),
        Goal::AtMost(v) => (value <= v, format!("<= {v} {unit}")),
    };
    let verdict = if !value.is_finite() {
        "NOT MEASURED"
    } else if met {
        "met"
    } else {
        "MISSED"
    };
    println!(
        "TARGET | {row} | {value:.3} {unit} | {baseline_label} {baseline:.3} {unit} | {ratio:.2}x | {want} | {verdict}"
    );
}
