//! Kernels: one interpreter process per code context, driven over a private control channel.
//!
//! A kernel is started as the sandbox user with stdout and stderr on pipes (the program's own
//! output, streamed as produced) and a unix socketpair on fd 3 carrying newline-delimited JSON:
//! the agent sends `{"op":"execute","code":…}`, the kernel answers `ready` once at start, then
//! per execution any number of `display` and one optional `result`, an optional `error`, and
//! `done`. The kernel flushes its output before each message, and the agent drains the output
//! pipes before handling one, which keeps output and results in order.
//!
//! The kernel scripts are part of the agent binary and written to [`KERNEL_DIR`] at start. The
//! Go kernel is a Go program: it is built inside the sandbox, as the sandbox user, when a Go
//! context starts (see [`GO_LAUNCH`]).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use execbox_jail::cgroup::ExecLeaf;
use execbox_jail::process::ExitInfo;
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::pipe;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

use crate::runner::{Input, Output, RunSpec, Runner};
use crate::sse::pipe_reader;

/// Where the kernel scripts are written inside the sandbox (agent-owned, read-only to users).
pub const KERNEL_DIR: &str = "/run/execbox/kernels";

const PYTHON_KERNEL: &str = include_str!("../kernels/python_kernel.py");
const JS_KERNEL: &str = include_str!("../kernels/js_kernel.js");
const JAVA_KERNEL: &str = include_str!("../kernels/JavaKernel.java");
const GO_KERNEL: &str = include_str!("../kernels/go_kernel.go");

/// How a Go kernel starts (`sh -c GO_LAUNCH go-kernel <go> <kernel source>`): a private work
/// directory, the kernel built into it by the sandbox's own toolchain, then the kernel in place
/// of the shell (so that the agent's signals reach it). The kernel removes the directory at
/// exit, and its own binary as soon as it runs.
const GO_LAUNCH: &str = r#"d=$(mktemp -d "${TMPDIR:-/tmp}/execbox-go.XXXXXX") || exit 1
"$1" build -o "$d/kernel" "$2" || { rm -rf "$d"; exit 1; }
exec "$d/kernel" "$d""#;

/// After SIGINT for a timeout, how long the kernel has to finish the execution before it is
/// killed and restarted.
const INTERRUPT_GRACE: Duration = Duration::from_secs(2);

/// Languages with a kernel process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelLanguage {
    /// CPython.
    Python,
    /// Node, or Bun where there is no Node.
    JavaScript,
    /// The JavaScript kernel on Node, each cell's types erased by the agent first
    /// ([`crate::typescript`]); Bun with its own transpiler where there is no Node.
    TypeScript,
    /// jshell's API in a JVM.
    Java,
    /// Each cell compiled with the context's kept declarations and run (`kernels/go_kernel.go`).
    Go,
}

/// Writes the kernel scripts to [`KERNEL_DIR`].
pub fn install_scripts() -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // The agent's data directory is traversable (not listable) so that user processes can
    // reach the kernel scripts; everything else in it is private to the agent.
    std::fs::set_permissions(
        execbox_jail::rootfs::AGENT_DATA_DIR,
        std::fs::Permissions::from_mode(0o711),
    )?;
    std::fs::create_dir_all(KERNEL_DIR)?;
    std::fs::set_permissions(KERNEL_DIR, std::fs::Permissions::from_mode(0o755))?;
    for (name, text) in [
        ("python_kernel.py", PYTHON_KERNEL),
        ("js_kernel.js", JS_KERNEL),
        ("JavaKernel.java", JAVA_KERNEL),
        ("go_kernel.go", GO_KERNEL),
    ] {
        let path = Path::new(KERNEL_DIR).join(name);
        std::fs::write(&path, text)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

/// The first executable called `name` on the sandbox's `PATH`.
pub fn find_program(name: &str, env: &[(String, String)]) -> Option<PathBuf> {
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(execbox_jail::rootfs::SANDBOX_PATH);
    path.split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// How a kernel is started: its command line, its own environment, and whether the agent
/// erases the types of each cell before sending it.
struct Launch {
    argv: Vec<String>,
    /// Set after the context's own environment: these win.
    env: Vec<(String, String)>,
    strip_types: bool,
}

impl KernelLanguage {
    /// The command line of this language's kernel, or why it cannot run here.
    pub fn argv(self, env: &[(String, String)]) -> Result<Vec<String>, String> {
        self.launch(env).map(|l| l.argv)
    }

    /// Node is preferred over Bun for JavaScript and TypeScript alike: one runtime for both,
    /// whose behaviour does not change with what else is installed, and types erased by a
    /// stripper that does not change either.
    fn launch(self, env: &[(String, String)]) -> Result<Launch, String> {
        let need = |name: &str| {
            find_program(name, env)
                .map(|p| p.to_string_lossy().into_owned())
                .ok_or_else(|| format!("{name} is not installed in this sandbox"))
        };
        let script = |name: &str| format!("{KERNEL_DIR}/{name}");
        let plain = |argv| Launch {
            argv,
            env: Vec::new(),
            strip_types: false,
        };
        Ok(match self {
            // -S: the kernel adds the site directories itself, without running .pth hooks.
            KernelLanguage::Python => plain(vec![
                need("python3")?,
                "-S".into(),
                script("python_kernel.py"),
            ]),
            KernelLanguage::JavaScript => {
                let runtime = need("node")
                    .or_else(|_| need("bun"))
                    .map_err(|_| "node (or bun) is not installed in this sandbox".to_string())?;
                plain(vec![runtime, script("js_kernel.js"), "javascript".into()])
            }
            KernelLanguage::TypeScript => match (need("node"), need("bun")) {
                (Ok(node), _) => Launch {
                    argv: vec![
                        node,
                        script("js_kernel.js"),
                        "typescript".into(),
                        "stripped".into(),
                    ],
                    env: Vec::new(),
                    strip_types: true,
                },
                (Err(_), Ok(bun)) => plain(vec![bun, script("js_kernel.js"), "typescript".into()]),
                (Err(_), Err(_)) => {
                    return Err(
                        "typescript needs node (or bun), and neither is installed in \
                                this sandbox"
                            .into(),
                    )
                }
            },
            KernelLanguage::Java => {
                need("jshell")?;
                plain(vec![need("java")?, script("JavaKernel.java")])
            }
            KernelLanguage::Go => {
                // go first: a sandbox without it hears about go, not sh.
                let go = need("go")?;
                let sh = need("sh").map_err(|_| {
                    "go contexts need sh, which is not installed in this sandbox".to_string()
                })?;
                Launch {
                    argv: vec![
                        sh,
                        "-c".into(),
                        GO_LAUNCH.into(),
                        "go-kernel".into(),
                        go,
                        script("go_kernel.go"),
                    ],
                    env: go_env(env),
                    strip_types: false,
                }
            }
        })
    }

    fn start_deadline(self) -> Duration {
        match self {
            // The JVM compiles the kernel source at start.
            KernelLanguage::Java => Duration::from_secs(60),
            // The kernel is built first; with a cold build cache and a toolchain that ships no
            // compiled standard library (Go 1.20 on), that compiles go/types and its
            // dependencies.
            KernelLanguage::Go => Duration::from_secs(180),
            _ => Duration::from_secs(20),
        }
    }
}

/// The Go toolchain's environment in a Go context. Never the network: no module proxy, no
/// checksum database, no toolchain download, no change to a module graph. No cgo unless the
/// context asks (it needs a C compiler, and the kernel's programs never do). The build cache
/// and GOPATH go where Go would put them (under `$HOME`), or under `/tmp` without a home.
fn go_env(env: &[(String, String)]) -> Vec<(String, String)> {
    let get = |k: &str| {
        env.iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    };
    let base = get("HOME").filter(|h| !h.is_empty()).unwrap_or("/tmp");
    let mut out = Vec::new();
    let mut default = |k: &str, v: String| {
        if get(k).is_none_or(str::is_empty) {
            out.push((k.to_string(), v));
        }
    };
    default("GOCACHE", format!("{base}/.cache/go-build"));
    default("GOPATH", format!("{base}/go"));
    default("CGO_ENABLED", "0".into());
    for (k, v) in [
        ("GOPROXY", "off"),
        ("GOSUMDB", "off"),
        ("GOTOOLCHAIN", "local"),
        ("GOFLAGS", "-mod=readonly"),
        ("GOTELEMETRY", "off"),
    ] {
        out.push((k.to_string(), v.to_string()));
    }
    out
}

/// What an execution produces, in order.
#[derive(Debug, Clone)]
pub enum KernelOutput {
    /// Program output on stdout (a chunk, terminators kept).
    Stdout(String),
    /// Program output on stderr.
    Stderr(String),
    /// A rich display output (MIME bundle).
    Display(Map<String, Value>),
    /// The value of the trailing expression.
    Result {
        /// Execution counter.
        execution_count: u64,
        /// MIME bundle.
        data: Map<String, Value>,
    },
    /// An exception.
    Error {
        /// Exception name.
        ename: String,
        /// Exception message.
        evalue: String,
        /// Traceback lines.
        traceback: Vec<String>,
    },
    /// The execution ended.
    Done {
        /// Execution counter.
        execution_count: u64,
    },
    /// The execution passed its timeout (it was interrupted, or the kernel restarted).
    TimedOut {
        /// True when the kernel had to be killed (state lost).
        restarted: bool,
    },
    /// The kernel died during the execution; its state is lost.
    Died(String),
}

#[derive(Deserialize)]
#[serde(tag = "ev", rename_all = "lowercase")]
enum Message {
    Ready {
        /// The kernel waits for `{"op":"ack"}` after each display message.
        #[serde(default)]
        display_acks: bool,
    },
    Display {
        #[serde(default)]
        data: Map<String, Value>,
    },
    Result {
        #[serde(default)]
        execution_count: u64,
        #[serde(default)]
        data: Map<String, Value>,
    },
    Error {
        #[serde(default)]
        ename: String,
        #[serde(default)]
        evalue: String,
        #[serde(default)]
        traceback: Vec<String>,
    },
    Done {
        #[serde(default)]
        execution_count: u64,
    },
    Fatal {
        #[serde(default)]
        message: String,
    },
}

/// The next control message; `None` at EOF (the kernel is gone).
async fn read_message(reader: &mut BufReader<OwnedReadHalf>) -> Option<Message> {
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => match serde_json::from_str::<Message>(line.trim_end()) {
                Ok(m) => return Some(m),
                Err(e) => tracing::debug!(error = %e, "unreadable kernel message"),
            },
        }
    }
}

/// A running kernel process.
pub struct Kernel {
    pid: i32,
    leaf: Option<Arc<ExecLeaf>>,
    out: Option<pipe::Receiver>,
    err: Option<pipe::Receiver>,
    ctl_read: BufReader<OwnedReadHalf>,
    ctl_write: OwnedWriteHalf,
    exit: tokio::sync::oneshot::Receiver<ExitInfo>,
    display_acks: bool,
    /// Cells are TypeScript whose types the agent erases before sending them.
    strip_types: bool,
    /// The kernel's execution counter as last reported (names cells in syntax errors).
    executions: u64,
}

/// Process group and cgroup of a kernel, kept outside the kernel's lock so that interrupt and
/// delete work while it executes.
#[derive(Clone)]
pub struct KernelHandle {
    /// Pid (and process group).
    pub pid: i32,
    leaf: Option<Arc<ExecLeaf>>,
}

impl KernelHandle {
    /// SIGINT to the kernel's process group (interrupts the running execution).
    pub fn interrupt(&self) {
        let _ = execbox_jail::process::signal_group(self.pid, libc::SIGINT);
    }

    /// Kills the kernel and everything it started; its cgroup leaf goes too.
    pub fn kill(&self) {
        let _ = execbox_jail::process::signal_group(self.pid, libc::SIGKILL);
        if let Some(leaf) = self.leaf.clone() {
            tokio::task::spawn_blocking(move || {
                let _ = leaf.kill_all();
                let _ = leaf.remove();
            });
        }
    }
}

/// Errors of starting a kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The runtime is missing.
    #[error("{0}")]
    Unavailable(String),
    /// The process could not start or did not become ready.
    #[error("kernel failed to start: {0}")]
    Start(String),
    /// The sandbox user cannot enter the working directory.
    #[error("{0}")]
    Cwd(String),
}

impl Kernel {
    /// Starts a kernel and waits until it is ready.
    pub async fn start(
        runner: &Runner,
        language: KernelLanguage,
        cwd: &Path,
        extra_env: Vec<(String, String)>,
    ) -> Result<(Kernel, KernelHandle), KernelError> {
        let env = runner.env_with(&extra_env);
        let Launch {
            argv,
            env: kernel_env,
            strip_types,
        } = language.launch(&env).map_err(KernelError::Unavailable)?;
        let mut extra_env = extra_env;
        extra_env.extend(kernel_env);
        let (agent_end, kernel_end) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| KernelError::Start(e.to_string()))?;
        let started = runner
            .start(RunSpec {
                argv,
                cwd,
                extra_env,
                creds: None,
                groups: Vec::new(),
                output: Output::Pipes,
                input: Input::Null,
                controlling_tty: false,
                inherit_fds: vec![OwnedFd::from(kernel_end)],
            })
            .map_err(|e| match e {
                crate::runner::RunError::Cwd { .. } => KernelError::Cwd(e.to_string()),
                other => KernelError::Start(other.to_string()),
            })?;
        let leaf = started.leaf.map(Arc::new);
        let handle = KernelHandle {
            pid: started.pid,
            leaf: leaf.clone(),
        };
        let fail = |handle: &KernelHandle, msg: String| {
            handle.kill();
            KernelError::Start(msg)
        };
        agent_end
            .set_nonblocking(true)
            .map_err(|e| fail(&handle, e.to_string()))?;
        let ctl = tokio::net::UnixStream::from_std(agent_end)
            .map_err(|e| fail(&handle, e.to_string()))?;
        let (read, write) = ctl.into_split();
        let mut kernel = Kernel {
            pid: started.pid,
            leaf,
            out: pipe_reader(started.stdout),
            err: pipe_reader(started.stderr),
            ctl_read: BufReader::new(read),
            ctl_write: write,
            exit: started.exit,
            display_acks: false,
            strip_types,
            executions: 0,
        };
        let deadline = Instant::now() + language.start_deadline();
        loop {
            let line =
                tokio::time::timeout_at(deadline.into(), read_message(&mut kernel.ctl_read)).await;
            match line {
                Ok(Some(Message::Ready { display_acks })) => {
                    kernel.display_acks = display_acks;
                    return Ok((kernel, handle));
                }
                Ok(Some(Message::Fatal { message })) => return Err(fail(&handle, message)),
                Ok(Some(_)) => continue,
                Ok(None) => {
                    let stderr = kernel.drain_stderr();
                    return Err(fail(
                        &handle,
                        format!("the interpreter exited during start. {}", stderr.trim()),
                    ));
                }
                Err(_) => return Err(fail(&handle, "the interpreter did not become ready".into())),
            }
        }
    }

    fn drain_stderr(&mut self) -> String {
        let mut text = Vec::new();
        if let Some(err) = &self.err {
            let mut buf = [0u8; 4096];
            crate::runner::read_ready(err, &mut buf, |chunk| {
                if text.len() <= 16 * 1024 {
                    text.extend_from_slice(chunk);
                }
            });
        }
        String::from_utf8_lossy(&text).into_owned()
    }

    /// Runs `code`, sending what it produces to `out`. Returns false when the kernel is no
    /// longer usable (died, or killed after a timeout).
    pub async fn execute(
        &mut self,
        code: &str,
        env: &[(String, String)],
        timeout: Option<Duration>,
        out: &mpsc::Sender<KernelOutput>,
    ) -> bool {
        let mut request = match self.compile(code).await {
            Ok(js) => serde_json::json!({ "op": "execute", "code": js }),
            // Sent all the same: the kernel counts the cell and reports its error.
            Err(e) => serde_json::json!({
                "op": "execute",
                "code": code,
                "error": { "ename": "SyntaxError", "evalue": e.message, "traceback": e.traceback },
            }),
        };
        if !env.is_empty() {
            request["env"] = env
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect::<Map<_, _>>()
                .into();
        }
        let mut line = request.to_string();
        line.push('\n');
        if self.ctl_write.write_all(line.as_bytes()).await.is_err() {
            let _ = out
                .send(KernelOutput::Died("the interpreter is gone".into()))
                .await;
            return false;
        }
        let mut stdout = Utf8Chunks::default();
        let mut stderr = Utf8Chunks::default();
        let mut buf = vec![0u8; 64 * 1024];
        let mut ebuf = vec![0u8; 64 * 1024];
        let mut deadline = timeout.map(|t| Instant::now() + t);
        let mut interrupted = false;
        loop {
            tokio::select! {
                n = crate::sse::read_some(&mut self.out, &mut buf) => match n {
                    Some(n) => send_text(out, &mut stdout, &buf[..n], KernelOutput::Stdout).await,
                    None => self.out = None,
                },
                n = crate::sse::read_some(&mut self.err, &mut ebuf) => match n {
                    Some(n) => send_text(out, &mut stderr, &ebuf[..n], KernelOutput::Stderr).await,
                    None => self.err = None,
                },
                msg = read_message(&mut self.ctl_read) => {
                    // Output written before the message is in the pipes now.
                    self.drain_output(out, &mut stdout, &mut stderr, &mut buf).await;
                    let Some(msg) = msg else {
                        let why = match tokio::time::timeout(Duration::from_millis(200), &mut self.exit).await {
                            Ok(Ok(ExitInfo::Code(c))) => format!("the interpreter exited with code {c}"),
                            Ok(Ok(ExitInfo::Signal(s))) => format!("the interpreter was killed by signal {s}"),
                            _ => "the interpreter is gone".to_string(),
                        };
                        let _ = out.send(KernelOutput::Died(why)).await;
                        return false;
                    };
                    let item = match msg {
                        Message::Display { data } => KernelOutput::Display(data),
                        Message::Result { execution_count, data } => KernelOutput::Result { execution_count, data },
                        Message::Error { ename, evalue, traceback } => KernelOutput::Error { ename, evalue, traceback },
                        Message::Done { execution_count } => {
                            self.executions = execution_count;
                            if interrupted {
                                let _ = out.send(KernelOutput::TimedOut { restarted: false }).await;
                            }
                            let _ = out.send(KernelOutput::Done { execution_count }).await;
                            return true;
                        }
                        Message::Ready { .. } | Message::Fatal { .. } => continue,
                    };
                    let ack = self.display_acks && matches!(item, KernelOutput::Display(_));
                    if out.send(item).await.is_err() {
                        // Nobody listens any more; the execution still runs to its end.
                        tracing::debug!("execution output dropped");
                    }
                    if ack {
                        let _ = self.ctl_write.write_all(b"{\"op\":\"ack\"}\n").await;
                    }
                },
                _ = crate::sse::sleep_until_opt(deadline) => {
                    if interrupted {
                        self.kill();
                        let _ = out.send(KernelOutput::TimedOut { restarted: true }).await;
                        return false;
                    }
                    interrupted = true;
                    let _ = execbox_jail::process::signal_group(self.pid, libc::SIGINT);
                    deadline = Some(Instant::now() + INTERRUPT_GRACE);
                }
            }
        }
    }

    /// The code to send for a cell: TypeScript with its types erased, when this kernel needs
    /// that; otherwise the cell as it is.
    async fn compile(&self, code: &str) -> Result<String, crate::typescript::SyntaxError> {
        if !self.strip_types {
            return Ok(code.to_string());
        }
        let cell = format!("cell[{}]", self.executions + 1);
        let code = code.to_string();
        match tokio::task::spawn_blocking(move || crate::typescript::strip(&code, &cell)).await {
            Ok(result) => result,
            Err(e) => Err(crate::typescript::SyntaxError {
                message: format!("stripping the types failed: {e}"),
                line: None,
                column: None,
                traceback: vec![format!("SyntaxError: stripping the types failed: {e}")],
            }),
        }
    }

    async fn drain_output(
        &mut self,
        out: &mpsc::Sender<KernelOutput>,
        stdout: &mut Utf8Chunks,
        stderr: &mut Utf8Chunks,
        buf: &mut [u8],
    ) {
        for (pipe, chunks, is_err) in [(&self.out, stdout, false), (&self.err, stderr, true)] {
            let Some(pipe) = pipe else { continue };
            let mut ready = Vec::new();
            crate::runner::read_ready(pipe, buf, |chunk| ready.extend_from_slice(chunk));
            if !ready.is_empty() {
                let kind = if is_err {
                    KernelOutput::Stderr
                } else {
                    KernelOutput::Stdout
                };
                send_text(out, chunks, &ready, kind).await;
            }
        }
    }

    fn kill(&self) {
        KernelHandle {
            pid: self.pid,
            leaf: self.leaf.clone(),
        }
        .kill();
    }
}

/// Spare kernels kept at once per sandbox (each is an idle interpreter process).
const MAX_SPARES: usize = 2;

/// What makes two kernels interchangeable before they have run anything.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SpareKey {
    language: KernelLanguage,
    cwd: PathBuf,
    env: Vec<(String, String)>,
}

struct Spare {
    key: SpareKey,
    kernel: Kernel,
    handle: KernelHandle,
}

/// What [`Spares::find`] found.
enum Found {
    Ready(Box<Spare>),
    Starting(tokio::sync::watch::Receiver<()>),
    Nothing,
}

/// Kernels started ahead of need, so that a new context does not wait for its interpreter to
/// start. A context of a language, working directory and environment that this sandbox has
/// already used takes a spare of that kind, and another is started in the background for the
/// next one; the first such context starts its own kernel. A create that finds the spare still
/// starting waits for it, which is never longer than starting a kernel of its own. A spare is
/// a fresh process that has run nothing: no context ever gets a kernel another context used,
/// and as a process of its own it has its own interpreter state, random seeds and hash salt.
///
/// Spares stay when contexts are deleted one by one (the next create takes one), and go when
/// every context of their language is deleted by language (`DELETE /code/contexts?language=`)
/// or with the sandbox.
///
/// Only for the interpreters that start cheaply (Python, Node): a spare JVM or Go toolchain
/// would hold hundreds of MiB of the sandbox's memory for a context that may never come.
#[derive(Default)]
pub struct Spares {
    ready: std::sync::Mutex<Vec<Spare>>,
    /// Spares being started; the sender of each watch is dropped once its spare is ready (or
    /// has failed), which wakes the creates waiting for it.
    starting:
        std::sync::Mutex<std::collections::HashMap<SpareKey, tokio::sync::watch::Receiver<()>>>,
}

impl Spares {
    /// A ready kernel: a live spare of this kind when there is one, else a new one; either way
    /// a spare for the next context of this kind starts in the background.
    pub async fn start(
        self: &Arc<Self>,
        runner: &Arc<Runner>,
        language: KernelLanguage,
        cwd: &Path,
        env: Vec<(String, String)>,
    ) -> Result<(Kernel, KernelHandle), KernelError> {
        if !matches!(
            language,
            KernelLanguage::Python | KernelLanguage::JavaScript | KernelLanguage::TypeScript
        ) {
            return Kernel::start(runner, language, cwd, env).await;
        }
        let key = SpareKey {
            language,
            cwd: cwd.to_path_buf(),
            env,
        };
        let spare = match self.find(&key) {
            Found::Ready(spare) => Some(*spare),
            Found::Starting(mut ready) => {
                let _ = ready.changed().await;
                self.take(&key)
            }
            Found::Nothing => None,
        };
        let started = match spare {
            Some(spare) => Ok((spare.kernel, spare.handle)),
            None => Kernel::start(runner, language, cwd, key.env.clone()).await,
        };
        if started.is_ok() {
            self.refill(runner.clone(), key);
        }
        started
    }

    fn lock_ready(&self) -> std::sync::MutexGuard<'_, Vec<Spare>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_starting(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::HashMap<SpareKey, tokio::sync::watch::Receiver<()>>,
    > {
        self.starting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A ready spare of this kind, else what wakes when the one being started is ready. Both
    /// are looked at under the `starting` lock, which a spare holds while it moves to `ready`.
    fn find(&self, key: &SpareKey) -> Found {
        let starting = self.lock_starting();
        if let Some(spare) = self.take(key) {
            return Found::Ready(Box::new(spare));
        }
        match starting.get(key) {
            Some(ready) => Found::Starting(ready.clone()),
            None => Found::Nothing,
        }
    }

    /// A live spare of this kind (dead ones, killed by the OOM killer say, are dropped).
    fn take(&self, key: &SpareKey) -> Option<Spare> {
        let mut ready = self.lock_ready();
        while let Some(i) = ready.iter().position(|s| s.key == *key) {
            let mut spare = ready.swap_remove(i);
            if matches!(
                spare.kernel.exit.try_recv(),
                Err(tokio::sync::oneshot::error::TryRecvError::Empty)
            ) {
                return Some(spare);
            }
            spare.handle.kill();
        }
        None
    }

    /// Kills the spares of `language`, ready or starting.
    pub fn discard(&self, language: KernelLanguage) {
        self.lock_starting().retain(|k, _| k.language != language);
        let gone: Vec<Spare> = {
            let mut ready = self.lock_ready();
            let (gone, kept) = ready.drain(..).partition(|s| s.key.language == language);
            *ready = kept;
            gone
        };
        for spare in gone {
            spare.handle.kill();
        }
    }

    /// Starts a spare of this kind in the background, unless one is ready or starting.
    fn refill(self: &Arc<Self>, runner: Arc<Runner>, key: SpareKey) {
        if self.lock_ready().iter().any(|s| s.key == key) {
            return;
        }
        let (ready_tx, ready_rx) = tokio::sync::watch::channel(());
        {
            let mut starting = self.lock_starting();
            if starting.contains_key(&key) {
                return;
            }
            starting.insert(key.clone(), ready_rx);
        }
        let me = self.clone();
        tokio::spawn(async move {
            // Dropped last, after the spare is in `ready`: then the waiting creates look.
            let _ready_tx = ready_tx;
            let started = Kernel::start(&runner, key.language, &key.cwd, key.env.clone()).await;
            let evicted = {
                // Under the `starting` lock the spare leaves `starting` and enters `ready` in
                // one step (a create looks at both under that lock, so it finds the spare in
                // one of them), unless its language was discarded meanwhile.
                let mut starting = me.lock_starting();
                if starting.remove(&key).is_none() {
                    drop(starting);
                    if let Ok((_, handle)) = started {
                        handle.kill();
                    }
                    return;
                }
                let Ok((kernel, handle)) = started else {
                    return;
                };
                let mut ready = me.lock_ready();
                let evicted = (ready.len() >= MAX_SPARES).then(|| ready.remove(0));
                ready.push(Spare {
                    key,
                    kernel,
                    handle,
                });
                evicted
            };
            if let Some(old) = evicted {
                old.handle.kill();
            }
        });
    }
}

async fn send_text(
    out: &mpsc::Sender<KernelOutput>,
    chunks: &mut Utf8Chunks,
    bytes: &[u8],
    kind: fn(String) -> KernelOutput,
) {
    if let Some(text) = chunks.push(bytes) {
        let _ = out.send(kind(text)).await;
    }
}

/// Turns a byte stream into UTF-8 text chunks without splitting a character across chunks.
#[derive(Default)]
struct Utf8Chunks {
    carry: Vec<u8>,
}

impl Utf8Chunks {
    fn push(&mut self, bytes: &[u8]) -> Option<String> {
        self.carry.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.carry) {
            Ok(_) => self.carry.len(),
            // An incomplete character at the end waits for the next chunk; invalid bytes
            // elsewhere are replaced.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.carry.len(),
        };
        if valid == 0 {
            return None;
        }
        let rest = self.carry.split_off(valid);
        let text = String::from_utf8_lossy(&self.carry).into_owned();
        self.carry = rest;
        Some(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_chunks_never_split_a_character() {
        let mut c = Utf8Chunks::default();
        let snow = "☃".as_bytes();
        assert_eq!(c.push(&snow[..1]), None);
        assert_eq!(c.push(&snow[1..]).as_deref(), Some("☃"));
        assert_eq!(c.push(b"a\xffb").as_deref(), Some("a\u{fffd}b"));
    }

    #[test]
    fn messages_parse() {
        let m: Message = serde_json::from_str(
            r#"{"ev":"result","execution_count":2,"data":{"text/plain":"4"}}"#,
        )
        .unwrap();
        assert!(matches!(
            m,
            Message::Result {
                execution_count: 2,
                ..
            }
        ));
        let m: Message =
            serde_json::from_str(r#"{"ev":"done","execution_count":1,"ok":true}"#).unwrap();
        assert!(matches!(m, Message::Done { execution_count: 1 }));
    }
}
