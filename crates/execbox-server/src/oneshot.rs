//! `execbox run`: one program in a fresh sandbox, no server; output and exit code passed
//! through.

use std::io::Write;

use execbox_proto::run::{RunEvent, RunRequest};

use crate::local::{LocalBackend, LocalConfig, SandboxLimits, SandboxParams};

/// Language of the code.
#[derive(Debug, Clone, Copy)]
pub enum Lang {
    /// `python3 -c`.
    Python,
    /// `node -e`.
    JavaScript,
    /// `bash -c`.
    Bash,
}

/// Output kept per stream beyond what is streamed through (the run API's cap).
const MAX_OUTPUT_BYTES: u64 = 64 << 20;

/// Exit status of a run stopped by `--timeout` (as `timeout(1)`).
pub const TIMEOUT_EXIT: i32 = 124;

/// Default `--memory` of `execbox run`.
pub const DEFAULT_MEMORY: &str = "512Mi";
/// Default `--cpus` of `execbox run`.
pub const DEFAULT_CPUS: &str = "1";
/// Default `--pids` of `execbox run`.
pub const DEFAULT_PIDS: u64 = 256;
/// Default `--timeout` of `execbox run`, in seconds.
pub const DEFAULT_TIMEOUT_SECS: u64 = 60;

/// The limits of one `execbox run`: every one has a default, so a run is never unbounded.
#[derive(Debug, Clone)]
pub struct RunLimits {
    /// Memory (Kubernetes quantity, `512Mi`).
    pub memory: String,
    /// CPUs (Kubernetes quantity, `1`, `500m`).
    pub cpus: String,
    /// Most processes and threads at once.
    pub pids: u64,
    /// Timeout in seconds.
    pub timeout_secs: u64,
}

impl Default for RunLimits {
    fn default() -> Self {
        Self {
            memory: DEFAULT_MEMORY.into(),
            cpus: DEFAULT_CPUS.into(),
            pids: DEFAULT_PIDS,
            timeout_secs: DEFAULT_TIMEOUT_SECS,
        }
    }
}

impl RunLimits {
    /// The sandbox limits, checked against the smallest sandbox (the operator running
    /// `execbox run` has no policy maximum above them).
    fn sandbox_limits(&self) -> anyhow::Result<SandboxLimits> {
        use execbox_proto::quantity::{parse_cpu, parse_memory};
        let unbounded = crate::config::Policy {
            max_memory_bytes: u64::MAX,
            max_cpus: execbox_proto::quantity::MAX_CPU_MILLICORES as f64 / 1000.0,
            max_pids: execbox_proto::lifecycle::MAX_PIDS,
            ..Default::default()
        };
        let memory = parse_memory(&self.memory).map_err(|e| anyhow::anyhow!("--memory: {e}"))?;
        let cpus = parse_cpu(&self.cpus).map_err(|e| anyhow::anyhow!("--cpus: {e}"))?;
        if self.timeout_secs == 0 {
            anyhow::bail!("--timeout: must be at least 1 second");
        }
        Ok(SandboxLimits {
            memory_bytes: Some(unbounded.memory("--memory", Some(memory), 0)?),
            cpu_millicores: Some(unbounded.cpu_millicores("--cpus", Some(cpus), 0)?),
            pids: Some(unbounded.pids("--pids", Some(self.pids), 0)?),
            ..Default::default()
        })
    }
}

/// Runs `code` and returns its exit code (128 + signal for a killed program).
/// Runs `code` in `lang` with `stdin` (none: an empty input) in a fresh sandbox under
/// `limits`, streaming its output to this process's; returns the exit status to pass on. A
/// run stopped by the timeout or the memory limit says so on stderr.
pub fn run(
    lang: Lang,
    code: &str,
    stdin: Option<String>,
    limits: &RunLimits,
) -> anyhow::Result<i32> {
    let sandbox_limits = limits.sandbox_limits()?;
    let timeout_secs = limits.timeout_secs;
    let state_dir = std::env::temp_dir().join(format!("execbox-run-{}", nix::unistd::geteuid()));
    let backend = LocalBackend::new(LocalConfig {
        state_dir,
        agent_exe: std::env::current_exe()?,
        python: None,
        seccomp: true,
        landlock: crate::doctor::landlock_available(),
        default_pids: 512,
        cgroup_base: "execbox".into(),
        max_upload_bytes: 0,
        context_idle_ttl_secs: 0,
        // A one-shot run's files live as long as the run: memory, no disk to format.
        storage: crate::local::StorageMedium::Memory,
        default_disk_bytes: execbox_jail::rootfs::StorageSizes::default().disk,
        volume_owner: (1000, 1000),
    })?;
    let id = format!(
        "run-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    );
    let placement = backend.create(SandboxParams {
        id: &id,
        limits: sandbox_limits,
        env: Vec::new(),
        entrypoint: Vec::new(),
        network: false,
        image: None,
        workdir: None,
        template: None,
        volumes: &[],
    })?;
    let (program, flag) = match lang {
        Lang::Python => ("python3", "-c"),
        Lang::JavaScript => ("node", "-e"),
        Lang::Bash => ("bash", "-c"),
    };
    let request = RunRequest {
        argv: vec![program.into(), flag.into(), code.into()],
        cwd: "/workspace".into(),
        create_cwd: false,
        env: Default::default(),
        stdin,
        timeout_ms: timeout_secs.saturating_mul(1000),
        max_output_bytes: MAX_OUTPUT_BYTES,
        files: Vec::new(),
        file_roots: Vec::new(),
        program: None,
        output_paths: Vec::new(),
        track_changes_under: None,
        keep_background: false,
        stream: true,
    };
    let socket = backend.socket_path(&id);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(stream_run(&socket, &request, limits));
    backend.destroy(&id, &placement)?;
    result
}

async fn stream_run(
    socket: &std::path::Path,
    request: &RunRequest,
    limits: &RunLimits,
) -> anyhow::Result<i32> {
    let mut events = crate::agent_run::run_stream(socket, request)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    while let Some(event) = events.recv().await {
        match event {
            RunEvent::Stdout { data } => {
                out.write_all(data.as_bytes())?;
                out.flush()?;
            }
            RunEvent::Stderr { data } => {
                err.write_all(data.as_bytes())?;
                err.flush()?;
            }
            RunEvent::Result { result } => {
                if result.timed_out {
                    writeln!(
                        err,
                        "execbox run: stopped after {} s, the time limit (--timeout)",
                        limits.timeout_secs
                    )?;
                    return Ok(TIMEOUT_EXIT);
                }
                if result.oom_killed {
                    writeln!(
                        err,
                        "execbox run: stopped: out of memory, the limit is {} (--memory)",
                        limits.memory
                    )?;
                    return Ok(137);
                }
                if result.stdout_bytes > MAX_OUTPUT_BYTES || result.stderr_bytes > MAX_OUTPUT_BYTES
                {
                    writeln!(
                        err,
                        "execbox run: output past {} MiB per stream was dropped",
                        MAX_OUTPUT_BYTES >> 20
                    )?;
                }
                return Ok(match result.signal {
                    Some(sig) => 128 + sig,
                    None => result.exit_code,
                });
            }
            RunEvent::Error { message } => anyhow::bail!("{message}"),
        }
    }
    anyhow::bail!("the sandbox ended the run without a result")
}
