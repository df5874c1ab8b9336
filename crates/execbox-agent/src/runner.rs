//! Starting user processes: environment, identity, execution cgroup, Landlock fence.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use execbox_jail::cgroup::{CgroupStats, CgroupVersion, ExecCgroups, ExecLeaf};
use execbox_jail::landlock_fence::{self, FenceSpec, PreparedFence};
use execbox_jail::process::{Credentials, ExitInfo, Launch, Reaper};
use execbox_jail::rootfs::{SANDBOX_HOME, SANDBOX_PATH};
use execbox_proto::agent::AgentConfig;

/// A started user process.
pub struct Started {
    /// Pid (also its process group and session id).
    pub pid: i32,
    /// Its stdout, when piped.
    pub stdout: Option<OwnedFd>,
    /// Its stderr, when piped.
    pub stderr: Option<OwnedFd>,
    /// Its stdin, when piped.
    pub stdin: Option<OwnedFd>,
    /// Resolves with the exit status.
    pub exit: tokio::sync::oneshot::Receiver<ExitInfo>,
    /// Its execution cgroup, if cgroups are available.
    pub leaf: Option<ExecLeaf>,
}

/// Where a process's output goes.
pub enum Output {
    /// Separate pipes for stdout and stderr.
    Pipes,
    /// One pipe for both.
    Combined,
    /// Discarded.
    Null,
    /// Given descriptors (a terminal, for instance).
    Fds {
        /// Standard output.
        stdout: OwnedFd,
        /// Standard error.
        stderr: OwnedFd,
    },
}

/// Where a process's input comes from.
pub enum Input {
    /// `/dev/null`.
    Null,
    /// A pipe whose write end is returned in [`Started::stdin`].
    Pipe,
    /// A given descriptor.
    Fd(OwnedFd),
}

/// What to run.
pub struct RunSpec<'a> {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Working directory.
    pub cwd: &'a Path,
    /// Extra environment over the sandbox's.
    pub extra_env: Vec<(String, String)>,
    /// Identity (defaults to the sandbox user).
    pub creds: Option<Credentials>,
    /// Supplementary groups (ignored in rootless sandboxes, which cannot set them).
    pub groups: Vec<u32>,
    /// Output routing.
    pub output: Output,
    /// Input routing.
    pub input: Input,
    /// Make the input (a terminal) the controlling terminal of the process's session.
    pub controlling_tty: bool,
    /// Descriptors the process gets as 3, 4, …
    pub inherit_fds: Vec<OwnedFd>,
}

/// Starts user processes for every API of the agent.
pub struct Runner {
    reaper: Reaper,
    base_env: Vec<(String, String)>,
    user: Credentials,
    rootless: bool,
    cgroups: Option<ExecCgroups>,
    fence: Option<Arc<PreparedFence>>,
    last_cap: u32,
    next_leaf: AtomicU64,
    /// Memory limit of each execution leaf.
    execution_memory: Option<u64>,
    /// An execution cgroup made ahead of need: creating one (a directory in every hierarchy)
    /// is then off the path of the next start.
    spare_leaf: std::sync::Mutex<Option<ExecLeaf>>,
}

/// Errors of starting a process.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The execution cgroup could not be created.
    #[error("creating the execution cgroup failed: {0}")]
    Cgroup(#[from] execbox_jail::cgroup::CgroupError),
    /// The process's user cannot enter the working directory (decided by the kernel, as that
    /// user): the request's mistake.
    #[error("invalid request, validation error cwd {}: the sandbox user cannot enter it: {source}", path.display())]
    Cwd {
        /// The directory.
        path: PathBuf,
        /// The kernel's answer.
        source: std::io::Error,
    },
    /// fork/exec failed.
    #[error("starting the process failed: {0}")]
    Spawn(#[from] std::io::Error),
}

impl From<execbox_jail::process::LaunchError> for RunError {
    fn from(e: execbox_jail::process::LaunchError) -> Self {
        match e {
            execbox_jail::process::LaunchError::Cwd { path, source } => {
                RunError::Cwd { path, source }
            }
            execbox_jail::process::LaunchError::Spawn(e) => RunError::Spawn(e),
        }
    }
}

impl From<RunError> for crate::error::ApiError {
    fn from(e: RunError) -> Self {
        match e {
            RunError::Cwd { .. } => crate::error::ApiError::BadRequest(e.to_string()),
            other => crate::error::ApiError::Runtime(other.to_string()),
        }
    }
}

impl Runner {
    /// Builds the runner from the agent configuration and the cgroup descriptors.
    pub fn new(config: &AgentConfig, cgroup_fds: Vec<(String, OwnedFd)>) -> std::io::Result<Self> {
        let mut base_env = vec![
            ("PATH".to_string(), SANDBOX_PATH.to_string()),
            ("HOME".to_string(), SANDBOX_HOME.to_string()),
            ("USER".to_string(), "user".to_string()),
            ("LANG".to_string(), "C.UTF-8".to_string()),
            ("SHELL".to_string(), "/bin/bash".to_string()),
            ("TERM".to_string(), "xterm".to_string()),
        ];
        for (k, v) in &config.env {
            base_env.retain(|(bk, _)| bk != k);
            base_env.push((k.clone(), v.clone()));
        }
        let cgroups = (!cgroup_fds.is_empty()).then(|| {
            let version = if config.cgroup_version == "v2" {
                CgroupVersion::V2
            } else {
                CgroupVersion::V1
            };
            ExecCgroups::from_dir_fds(cgroup_fds, version)
        });
        let fence = if config.landlock {
            let spec = FenceSpec {
                read_only: vec![PathBuf::from("/")],
                read_write: Vec::new(),
            };
            let fence = landlock_fence::prepare_with(&spec, writable_roots()?)
                .map_err(|e| std::io::Error::other(format!("landlock: {e}")))?;
            if fence.enforced_abi().is_none() {
                return Err(std::io::Error::other(
                    "landlock is required but unavailable",
                ));
            }
            Some(Arc::new(fence))
        } else {
            None
        };
        Ok(Self {
            reaper: Reaper::new(),
            base_env,
            user: Credentials {
                uid: config.user_uid,
                gid: config.user_gid,
            },
            rootless: config.rootless,
            cgroups,
            fence,
            last_cap: execbox_jail::process::last_capability(),
            next_leaf: AtomicU64::new(1),
            execution_memory: config.execution_memory_bytes,
            spare_leaf: std::sync::Mutex::new(None),
        })
    }

    /// The reaper of this PID 1.
    pub fn reaper(&self) -> &Reaper {
        &self.reaper
    }

    /// Accounting of the whole sandbox (its cgroup, agent included), if cgroups are available.
    pub fn sandbox_stats(&self) -> Option<CgroupStats> {
        self.cgroups.as_ref().and_then(|c| c.stats().ok())
    }

    /// The memory limit the sandbox was given (each execution's), if any.
    pub fn memory_limit(&self) -> Option<u64> {
        self.execution_memory
            .or_else(|| self.sandbox_stats().and_then(|s| s.memory_limit))
    }

    /// The sandbox user.
    pub fn user(&self) -> Credentials {
        self.user
    }

    /// Environment of a user process: sandbox env, then `extra`.
    pub fn env_with(&self, extra: &[(String, String)]) -> Vec<(String, String)> {
        let mut env = self.base_env.clone();
        for (k, v) in extra {
            env.retain(|(bk, _)| bk != k);
            env.push((k.clone(), v.clone()));
        }
        env
    }

    /// Starts a process in its own execution cgroup.
    pub fn start(&self, spec: RunSpec<'_>) -> Result<Started, RunError> {
        let leaf = match self.take_spare_leaf() {
            Some(leaf) => Some(leaf),
            None => self.new_leaf()?,
        };
        let procs = match &leaf {
            Some(l) => l.procs_fds()?,
            None => Vec::new(),
        };
        let creds = spec.creds.unwrap_or(self.user);
        let (stdout, stderr, out_r, err_r) = match spec.output {
            Output::Pipes => (Stdio::piped(), Stdio::piped(), None, None),
            Output::Null => (Stdio::null(), Stdio::null(), None, None),
            Output::Fds { stdout, stderr } => {
                (Stdio::from(stdout), Stdio::from(stderr), None, None)
            }
            Output::Combined => {
                let (r, w) = std::io::pipe()?;
                let w2 = w.try_clone()?;
                (
                    Stdio::from(w),
                    Stdio::from(w2),
                    Some(OwnedFd::from(r)),
                    None,
                )
            }
        };
        let launch = Launch {
            argv: spec.argv,
            env: self.env_with(&spec.extra_env),
            cwd: spec.cwd.to_path_buf(),
            creds,
            groups: (!self.rootless).then_some(spec.groups),
            cgroup_procs: procs,
            fence: self.fence.clone(),
            last_cap: self.last_cap,
            stdin: match spec.input {
                Input::Null => Stdio::null(),
                Input::Pipe => Stdio::piped(),
                Input::Fd(fd) => Stdio::from(fd),
            },
            stdout,
            stderr,
            controlling_tty: spec.controlling_tty,
            inherit_fds: spec.inherit_fds,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut child = self.reaper.spawn(launch, move |info| {
            let _ = tx.send(info);
        })?;
        let stdout = child.stdout.take().map(OwnedFd::from).or(out_r);
        let stderr = child.stderr.take().map(OwnedFd::from).or(err_r);
        self.refill_spare_leaf();
        let stdin = child.stdin.take().map(OwnedFd::from);
        Ok(Started {
            pid: child.id() as i32,
            stdout,
            stderr,
            stdin,
            exit: rx,
            leaf,
        })
    }

    fn new_leaf(&self) -> Result<Option<ExecLeaf>, RunError> {
        let Some(cg) = &self.cgroups else {
            return Ok(None);
        };
        let n = self.next_leaf.fetch_add(1, Ordering::Relaxed);
        let leaf = cg.create_leaf(&format!("x{n}"))?;
        if let Some(bytes) = self.execution_memory {
            if let Err(e) = leaf.limit_memory(bytes) {
                let _ = leaf.remove();
                return Err(e.into());
            }
        }
        Ok(Some(leaf))
    }

    fn take_spare_leaf(&self) -> Option<ExecLeaf> {
        match self.spare_leaf.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        }
    }

    /// Makes the next execution cgroup now, while the process just started is still loading.
    fn refill_spare_leaf(&self) {
        let mut spare = match self.spare_leaf.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if spare.is_none() {
            match self.new_leaf() {
                Ok(leaf) => *spare = leaf,
                Err(e) => tracing::debug!(error = %e, "spare execution cgroup"),
            }
        }
    }

    /// Starts the sandbox entrypoint in the background, output discarded.
    pub fn start_entrypoint(
        &self,
        argv: &[String],
        log: Arc<crate::entrypoint::EntrypointLog>,
    ) -> Result<(), RunError> {
        let started = self.start(RunSpec {
            argv: argv.to_vec(),
            cwd: Path::new(SANDBOX_HOME),
            extra_env: Vec::new(),
            creds: None,
            groups: Vec::new(),
            output: Output::Combined,
            input: Input::Null,
            controlling_tty: false,
            inherit_fds: Vec::new(),
        })?;
        log.started(argv);
        let output = started
            .stdout
            .and_then(|fd| tokio::net::unix::pipe::Receiver::from_owned_fd(fd).ok());
        let reader =
            output.map(|pipe| tokio::spawn(crate::entrypoint::keep_output(log.clone(), pipe)));
        tokio::spawn(async move {
            let status = started.exit.await;
            tracing::info!(?status, "entrypoint exited");
            // Its last words first (a child that kept the pipe open is not waited for long).
            if let Some(reader) = reader {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), reader).await;
            }
            log.ended(match status {
                Ok(ExitInfo::Code(c)) => format!("exit code {c}"),
                Ok(ExitInfo::Signal(s)) => format!("killed by signal {s}"),
                Err(_) => "exit status unknown".into(),
            });
            if let Some(leaf) = started.leaf {
                let _ = leaf.remove();
            }
        });
        Ok(())
    }
}

/// Reads whatever `pipe` holds now, without waiting (the descriptor is non-blocking).
/// Used where output must be taken in order with a signal that came on another channel (a
/// run's end marker, a kernel's message): tokio's `try_read` answers from its cached readiness,
/// which may not have caught up with data already in the pipe.
pub fn read_ready(
    pipe: &tokio::net::unix::pipe::Receiver,
    buf: &mut [u8],
    mut each: impl FnMut(&[u8]),
) {
    use std::io::Read;
    let Ok(fd) = std::os::fd::AsFd::as_fd(pipe).try_clone_to_owned() else {
        return;
    };
    let mut file = std::fs::File::from(fd);
    // Bounded: a writer that never stops must not keep this loop going.
    let mut left = READ_READY_MAX;
    while let Ok(n) = file.read(buf) {
        if n == 0 {
            break;
        }
        each(&buf[..n]);
        left = left.saturating_sub(n);
        if left == 0 {
            break;
        }
    }
}

/// Most bytes [`read_ready`] takes in one call.
const READ_READY_MAX: usize = 4 << 20;

/// Reads the leaf's statistics, if any.
pub fn leaf_stats(leaf: Option<&ExecLeaf>) -> Option<CgroupStats> {
    leaf.and_then(|l| l.stats().ok())
}

/// Top-level directories of the root that the Landlock fence leaves writable: everything the
/// sandbox owns (its writable layer and volumes: `/home`, `/workspace`, `/tmp`, `/var`, `/srv`,
/// `/mnt`, an image's own directories…), `/dev` and `/proc`; not the system directories (read
/// only mounts of the host's or files of root in an image anyway) nor `/run`, where the agent
/// keeps its own data. Each is opened by one name without following a link (an image's
/// `/data -> /run/execbox` is no directory of the root): the rule is on what was checked.
fn writable_roots() -> std::io::Result<Vec<OwnedFd>> {
    const SYSTEM: &[&str] = &[
        "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "boot", "sys", "run",
        ".execbox",
    ];
    let root = execbox_jail::fsroot::Dir::open_trusted(Path::new("/"))?;
    let mut names = root.names()?;
    names.sort();
    Ok(names
        .into_iter()
        .filter(|name| !SYSTEM.iter().any(|s| name == *s))
        // Not a directory (a file, a link): no rule.
        .filter_map(|name| root.subdir(&name).ok())
        .map(execbox_jail::fsroot::Dir::into_fd)
        .collect())
}
