//! `execbox run`: one program in a fresh sandbox, no server; output and exit code passed
//! through.

use std::io::Write;

use bytes::Bytes;
use execbox_proto::execd::Event;
use http_body_util::{BodyExt, Full};

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

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

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
pub fn run(lang: Lang, code: &str, limits: &RunLimits) -> anyhow::Result<i32> {
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
    let command = match lang {
        Lang::Python => format!("exec python3 -c {}", shell_quote(code)),
        Lang::JavaScript => format!("exec node -e {}", shell_quote(code)),
        Lang::Bash => code.to_string(),
    };
    let socket = backend.socket_path(&id);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(stream_command(&socket, &command, timeout_secs));
    backend.destroy(&id, &placement)?;
    result
}

async fn stream_command(
    socket: &std::path::Path,
    command: &str,
    timeout_secs: u64,
) -> anyhow::Result<i32> {
    let body = serde_json::json!({"command": command, "timeout": timeout_secs * 1000});
    let req = http::Request::post("/command")
        .header(http::header::HOST, "sandbox")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let resp = crate::agent_client::send(socket, req).await?;
    let mut body = resp.into_body();
    let mut pending: Vec<u8> = Vec::new();
    let mut exit = 0;
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(pos) = pending.windows(2).position(|w| w == b"\n\n") {
            let line: Vec<u8> = pending.drain(..pos + 2).collect();
            let json = line.strip_prefix(b"data: ").unwrap_or(&line);
            let Ok(ev) = serde_json::from_slice::<Event>(json) else {
                continue;
            };
            let text = ev.text.unwrap_or_default();
            let text = if text == "\n" { String::new() } else { text };
            match ev.kind.as_str() {
                "stdout" => writeln!(out, "{text}")?,
                "stderr" => writeln!(err, "{text}")?,
                "error" => {
                    let e = ev
                        .error
                        .unwrap_or_else(|| execbox_proto::execd::EventError {
                            ename: String::new(),
                            evalue: "1".into(),
                            traceback: Vec::new(),
                        });
                    exit = match e.evalue.parse::<i32>() {
                        Ok(-1) => 137,
                        Ok(c) => c,
                        Err(_) => 1,
                    };
                    for line in e.traceback.iter().skip(1) {
                        writeln!(err, "execbox: {line}")?;
                    }
                }
                _ => {}
            }
        }
    }
    Ok(exit)
}
