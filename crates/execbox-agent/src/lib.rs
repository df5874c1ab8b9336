//! execbox-agent: the in-sandbox daemon, PID 1 of every sandbox.
//!
//! The host starts it through `execbox agent` with a listening unix socket (created on the host
//! before the pivot, so only the server can reach it), a readiness pipe and the sandbox's cgroup
//! directories as inherited descriptors (see `execbox_jail::spawn`). It then:
//! - hardens itself (non-dumpable, seccomp filter inherited by everything it starts),
//! - reaps every process of the sandbox (it is PID 1),
//! - serves the execd API over HTTP on the socket,
//! - starts the sandbox entrypoint as the sandbox user.
//!
//! It installs no handler for any stopping signal: as PID 1 of its pid namespace, the kernel
//! then drops every such signal sent from inside the sandbox, by any uid (`kill -TERM 1` from a
//! `uid: 0` command included). Only the server stops it, with SIGKILL from outside.

mod code;
mod command;
mod drain;
mod e2b;
mod entrypoint;
mod error;
mod files;
mod kernel;
mod leap0;
mod metrics;
pub mod openapi;
mod paths;
mod port_proxy;
mod prestart;
mod pty;
mod run;
mod runner;
mod session;
mod sse;
mod typescript;
mod users;

use std::os::fd::OwnedFd;
use std::sync::Arc;

use axum::routing::{delete, get, post};
use axum::Router;
use execbox_proto::agent::{AgentConfig, AGENT_CONFIG_ENV};
use tokio::signal::unix::{signal, SignalKind};

pub use runner::Runner;

/// Errors that stop the agent from starting.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration variable is missing or malformed.
    #[error("bad agent configuration: {0}")]
    Config(String),
    /// A start-up step failed.
    #[error("agent start-up failed: {0}")]
    Startup(#[from] std::io::Error),
}

/// Shared state of the agent's HTTP handlers.
pub(crate) struct AppState {
    pub runner: Arc<Runner>,
    pub commands: command::Commands,
    pub contexts: code::Contexts,
    pub sessions: session::Sessions,
    pub ptys: pty::Ptys,
    pub metrics: metrics::Sampler,
    /// Largest accepted upload in bytes (0 = bounded only by the sandbox's disk).
    pub max_upload_bytes: u64,
    /// The entrypoint's kept output.
    pub entrypoint: Arc<entrypoint::EntrypointLog>,
    /// The E2B data plane's processes and watchers.
    pub e2b: e2b::E2bState,
    /// The interpreter waiting for the next run, if one was pre-started.
    pub prestarted: prestart::Slot,
}

/// The root file system's id and the sandbox's disk size, when the server said it.
static ROOT_DISK: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();

/// The size limit of the file system `dir` is on: the sandbox's disk size as asked for when
/// it is the root's, else what the file system reports.
pub(crate) fn storage_limit_of(dir: &execbox_jail::fsroot::Dir) -> u64 {
    use std::os::fd::AsFd;
    match (ROOT_DISK.get(), execbox_jail::storage::fs_id(dir.as_fd())) {
        (Some((root, bytes)), Some(id)) if *root == id => *bytes,
        _ => dir.capacity().unwrap_or(0),
    }
}

fn read_config() -> Result<AgentConfig, AgentError> {
    let raw = std::env::var(AGENT_CONFIG_ENV)
        .map_err(|_| AgentError::Config(format!("{AGENT_CONFIG_ENV} is not set")))?;
    serde_json::from_str(&raw).map_err(|e| AgentError::Config(e.to_string()))
}

/// The execd routes.
fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/ping", get(|| async {}))
        .route("/command", post(command::run).delete(command::interrupt))
        .route("/command/status/{id}", get(command::status))
        .route("/command/{id}/logs", get(command::logs))
        .route("/command/{id}", delete(command::interrupt_path))
        .merge(session::routes())
        .merge(code::routes())
        .merge(leap0::routes())
        .merge(files::routes())
        .merge(metrics::routes())
        .merge(run::routes())
        .merge(entrypoint::routes())
        .merge(e2b::routes())
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::not_found)
        // Every answer waits for its request body (see `drain`), except on the routes whose
        // bodies are a connection of their own (WebSocket, the port proxy's streams).
        .layer(axum::middleware::from_fn(drain::read_body_to_end))
        .merge(
            pty::routes()
                // Before the layer: a fallback set after it would replace the layered one,
                // and a refusal of a method would answer before its body was read.
                .method_not_allowed_fallback(error::not_found)
                // A PTY's WebSocket is a connection of its own; a plain request to the same
                // routes (a refusal) still waits for its body.
                .layer(axum::middleware::from_fn(
                    drain::read_body_to_end_unless_upgrade,
                ))
                .merge(port_proxy::routes().method_not_allowed_fallback(error::not_found)),
        )
        .with_state(state)
}

/// Port the code-interpreter SDK probes from inside the sandbox before it uses code contexts
/// (`JUPYTER_PORT`, upstream's Jupyter server).
const READINESS_PORT: u16 = 44771;

/// Accepts connections on [`READINESS_PORT`] and answers `200 OK`. It serves no API: whatever
/// runs inside the sandbox must not reach the agent's routes.
async fn readiness_port() {
    use tokio::io::AsyncWriteExt;
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", READINESS_PORT)).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "readiness port unavailable");
            return;
        }
    };
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
        });
    }
}

/// Removes implicitly created code contexts once idle past their TTL.
async fn sweep_idle_contexts(state: Arc<AppState>, ttl_secs: u64) {
    let ttl = std::time::Duration::from_secs(if ttl_secs == 0 { 3600 } else { ttl_secs });
    let every = (ttl / 2).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(60),
    );
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        state.contexts.sweep_idle(ttl);
    }
}

/// The sandbox's own versions of the host-wide `/proc` files that would reveal the host: its
/// memory limit instead of the host's memory, no host load, uptime, boot id or kernel command
/// line.
fn virtual_proc_files(runner: &Runner) -> Vec<(&'static str, String)> {
    let stats = runner.sandbox_stats().unwrap_or_default();
    let kib = |b: u64| b / 1024;
    let limit = runner.memory_limit();
    let total = limit.unwrap_or(u64::MAX / 2);
    let free = total.saturating_sub(stats.memory_current);
    let meminfo = format!(
        "MemTotal:       {:>8} kB\nMemFree:        {:>8} kB\nMemAvailable:   {:>8} kB\n\
         Buffers:               0 kB\nCached:                0 kB\nSwapCached:            0 kB\n\
         SwapTotal:             0 kB\nSwapFree:              0 kB\nShmem:                 0 kB\n\
         SReclaimable:          0 kB\n",
        kib(total),
        kib(free),
        kib(free)
    );
    let files = vec![
        ("cmdline", "BOOT_IMAGE=execbox\n".to_string()),
        ("loadavg", "0.00 0.00 0.00 1/1 1\n".to_string()),
        ("uptime", "0.00 0.00\n".to_string()),
        (
            "sys/kernel/random/boot_id",
            format!("{}\n", uuid::Uuid::new_v4().hyphenated()),
        ),
    ];
    if limit.is_some() {
        files.into_iter().chain([("meminfo", meminfo)]).collect()
    } else {
        files
    }
}

/// Threads for blocking file work (uploads, downloads, walks); more requests wait.
const AGENT_BLOCKING_THREADS: usize = 32;

/// Runs the agent; returns only on a start-up error.
pub fn run() -> Result<(), AgentError> {
    let config = read_config()?;
    let listener_fd = execbox_jail::process::take_passed_fd(0)?;
    let cgroup_fds: Vec<(String, OwnedFd)> = config
        .cgroup_labels
        .iter()
        .enumerate()
        .map(|(i, label)| Ok((label.clone(), execbox_jail::process::take_passed_fd(i + 1)?)))
        .collect::<Result<_, std::io::Error>>()?;
    execbox_jail::process::harden_agent(
        execbox_jail::spawn::FIRST_PASSED_FD + 1 + cgroup_fds.len() as i32,
    )?;
    let runner = Arc::new(Runner::new(&config, cgroup_fds)?);
    // Before the seccomp filter, which forbids mounting.
    if let Err(e) = execbox_jail::rootfs::virtualize_proc(
        &std::path::Path::new(execbox_jail::rootfs::AGENT_DATA_DIR).join("proc"),
        &virtual_proc_files(&runner),
    ) {
        tracing::warn!(error = %e, "host /proc files are not masked");
    }
    if config.seccomp {
        // Installed before any other thread exists, so every thread and child inherits it.
        let program = execbox_jail::seccomp::sandbox_program()
            .map_err(|e| AgentError::Config(format!("seccomp: {e}")))?;
        execbox_jail::seccomp::install(&program)
            .map_err(|e| AgentError::Config(format!("seccomp: {e}")))?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // The agent's threads count against the sandbox's pids beside the workload's own
        // limit; a bounded pool keeps them within the reserve the server gives the agent.
        .max_blocking_threads(AGENT_BLOCKING_THREADS)
        .build()?;
    rt.block_on(serve(config, runner, listener_fd))
}

async fn serve(
    config: AgentConfig,
    runner: Arc<Runner>,
    listener_fd: OwnedFd,
) -> Result<(), AgentError> {
    let std_listener = std::os::unix::net::UnixListener::from(listener_fd);
    std_listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(std_listener)?;

    let mut sigchld = signal(SignalKind::child())?;
    let reaper_runner = runner.clone();
    tokio::spawn(async move {
        loop {
            reaper_runner.reaper().reap();
            if sigchld.recv().await.is_none() {
                break;
            }
        }
    });

    let mut entrypoint_error = None;
    let entrypoint_log = Arc::new(entrypoint::EntrypointLog::default());
    if !config.entrypoint.is_empty() {
        if let Err(e) = runner.start_entrypoint(&config.entrypoint, entrypoint_log.clone()) {
            tracing::warn!(error = %e, "entrypoint failed to start");
            entrypoint_error = Some(format!(
                "the entrypoint {:?} did not start: {e}",
                config.entrypoint
            ));
        }
    }
    crate::paths::set_default_cwd(config.workdir.as_deref());
    if let (Some(bytes), Ok(root)) = (config.disk_bytes, std::fs::File::open("/")) {
        use std::os::fd::AsFd;
        if let Some(id) = execbox_jail::storage::fs_id(root.as_fd()) {
            let _ = ROOT_DISK.set((id, bytes));
        }
    }
    let state = Arc::new(AppState {
        runner: runner.clone(),
        commands: command::Commands::new(config.max_log_bytes),
        contexts: code::Contexts::default(),
        sessions: session::Sessions::default(),
        ptys: pty::Ptys::default(),
        metrics: metrics::Sampler::new(runner.clone(), config.cpu_millicores),
        max_upload_bytes: config.max_upload_bytes,
        entrypoint: entrypoint_log,
        e2b: e2b::E2bState::default(),
        prestarted: prestart::Slot::default(),
    });
    if let Err(e) = kernel::install_scripts() {
        tracing::warn!(error = %e, "kernel scripts not installed: code contexts will fail");
    }
    tokio::spawn(readiness_port());
    tokio::spawn(sweep_idle_contexts(
        state.clone(),
        config.context_idle_ttl_secs,
    ));
    execbox_jail::process::signal_ready(entrypoint_error.as_deref())?;
    let app = router(state);
    axum::serve(listener, app).await?;
    execbox_jail::process::kill_everything();
    Ok(())
}
