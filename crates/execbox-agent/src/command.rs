//! `/command`: shell commands in the foreground (streamed line by line) and in the background
//! (status, byte-cursor logs, interrupt).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use execbox_jail::cgroup::ExecLeaf;
use execbox_jail::process::{Credentials, ExitInfo};
use execbox_jail::rootfs::AGENT_DATA_DIR;
use execbox_proto::execd::{CommandStatus, Event, RunCommandRequest};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::runner::{Input, Output, RunSpec};
use crate::sse::{
    now_ms, pipe_reader, read_some, sleep_until_opt, sse_response, LineSplitter, Sink,
};
use crate::AppState;

/// Interval of `ping` events.
const PING_EVERY: Duration = Duration::from_secs(3);
/// Grace between SIGTERM and SIGKILL on interrupt.
const INTERRUPT_GRACE: Duration = Duration::from_secs(3);
/// How long output is still collected after the command's main process exits (children that
/// kept the pipes open).
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(50);
/// Finished commands kept for status queries; older ones are forgotten first.
const MAX_FINISHED: usize = 4096;
/// Finished commands (and their logs) are forgotten after this long.
const RETENTION: Duration = Duration::from_secs(24 * 3600);
/// Interval of retention sweeps while under the count cap.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// Largest page of background output returned by one `/logs` call; clients follow the cursor.
const MAX_LOG_PAGE: u64 = 8 << 20;

fn rfc3339_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

struct Entry {
    content: String,
    background: bool,
    pid: i32,
    running: bool,
    exit_code: Option<i32>,
    error: Option<String>,
    started_at: String,
    finished_at: Option<String>,
    finished: Option<Instant>,
    /// Output of a background command: an unnamed file (`O_TMPFILE`) in the agent's data
    /// directory, reached only through this descriptor, so nothing in the sandbox can swap,
    /// replace or redirect it.
    log: Option<Arc<std::fs::File>>,
    leaf: Option<Arc<ExecLeaf>>,
}

/// Registry of commands of this sandbox.
pub struct Commands {
    entries: Mutex<HashMap<String, Entry>>,
    last_sweep: Mutex<Instant>,
    max_log_bytes: u64,
    /// Where background logs are made (the agent's own tmpfs, inside the sandbox's budget).
    log_dir: Option<execbox_jail::fsroot::Dir>,
}

impl Commands {
    /// An empty registry; background logs are capped at `max_log_bytes` (0 = 64 MiB).
    pub fn new(max_log_bytes: u64) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            last_sweep: Mutex::new(Instant::now()),
            log_dir: execbox_jail::fsroot::Dir::open_trusted(Path::new(AGENT_DATA_DIR))
                .map_err(|e| tracing::warn!(error = %e, "no directory for command logs"))
                .ok(),
            max_log_bytes: if max_log_bytes == 0 {
                64 << 20
            } else {
                max_log_bytes
            },
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        match self.entries.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn finish(&self, id: &str, outcome: &Outcome) {
        let mut entries = self.lock();
        if let Some(e) = entries.get_mut(id) {
            e.running = false;
            e.exit_code = Some(outcome.exit_code);
            e.error = outcome.error.clone();
            e.finished_at = Some(rfc3339_now());
            e.finished = Some(Instant::now());
            e.leaf = None;
        }
        // Expired ids behave as unknown ids: drop what is too old, then the oldest beyond the cap.
        // The sweep sorts every finished command, so it runs only when there is work for it.
        let due = entries.len() > MAX_FINISHED || {
            let mut last = match self.last_sweep.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            let due = last.elapsed() > SWEEP_EVERY;
            if due {
                *last = Instant::now();
            }
            due
        };
        if !due {
            return;
        }
        let mut finished: Vec<(Instant, String)> = entries
            .iter()
            .filter_map(|(k, e)| e.finished.map(|t| (t, k.clone())))
            .collect();
        finished.sort();
        let over = entries.len().saturating_sub(MAX_FINISHED);
        let expired = finished
            .iter()
            .enumerate()
            .take_while(|(i, (t, _))| *i < over || t.elapsed() > RETENTION)
            .map(|(_, (_, k))| k.clone())
            .collect::<Vec<_>>();
        // A log's storage is freed when its last descriptor closes.
        for k in expired {
            entries.remove(&k);
        }
    }
}

/// How a command ended.
struct Outcome {
    exit_code: i32,
    error: Option<String>,
    event: Event,
}

fn outcome(exit: Option<ExitInfo>, timed_out: bool, oom: bool, elapsed_ms: u64) -> Outcome {
    let ts = now_ms();
    let killed = |extra: Option<&str>| {
        let mut tb = vec!["signal: killed".to_string()];
        tb.extend(extra.map(str::to_string));
        Outcome {
            exit_code: -1,
            error: Some(match extra {
                Some(e) => format!("signal: killed ({e})"),
                None => "signal: killed".into(),
            }),
            event: Event::error("CommandExecError", "-1".into(), tb, ts),
        }
    };
    if oom {
        return killed(Some("OOMKilled: the sandbox memory limit was exceeded"));
    }
    if timed_out {
        // As upstream: a timeout reads exactly like any SIGKILL.
        return killed(None);
    }
    match exit {
        Some(ExitInfo::Code(0)) => Outcome {
            exit_code: 0,
            error: None,
            event: Event::complete(elapsed_ms, ts),
        },
        Some(ExitInfo::Code(c)) => Outcome {
            exit_code: c,
            error: Some(format!("exit status {c}")),
            event: Event::error(
                "CommandExecError",
                c.to_string(),
                vec![format!("exit status {c}")],
                ts,
            ),
        },
        Some(ExitInfo::Signal(s)) => {
            let name = go_signal_name(s);
            Outcome {
                exit_code: -1,
                error: Some(format!("signal: {name}")),
                event: Event::error(
                    "CommandExecError",
                    "-1".into(),
                    vec![format!("signal: {name}")],
                    ts,
                ),
            }
        }
        None => killed(None),
    }
}

/// The text Go's `syscall.Signal.String()` gives, which upstream's wait errors carry
/// (`signal: killed`, `signal: terminated`).
pub(crate) fn go_signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "hangup",
        libc::SIGINT => "interrupt",
        libc::SIGQUIT => "quit",
        libc::SIGILL => "illegal instruction",
        libc::SIGTRAP => "trace/breakpoint trap",
        libc::SIGABRT => "aborted",
        libc::SIGBUS => "bus error",
        libc::SIGFPE => "floating point exception",
        libc::SIGKILL => "killed",
        libc::SIGUSR1 => "user defined signal 1",
        libc::SIGSEGV => "segmentation fault",
        libc::SIGUSR2 => "user defined signal 2",
        libc::SIGPIPE => "broken pipe",
        libc::SIGALRM => "alarm clock",
        libc::SIGTERM => "terminated",
        libc::SIGXCPU => "CPU time limit exceeded",
        libc::SIGXFSZ => "file size limit exceeded",
        libc::SIGSYS => "bad system call",
        other => return format!("signal {other}"),
    };
    name.to_string()
}

fn parse_body(body: &Bytes) -> Result<RunCommandRequest, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::BadRequest(format!(
            "error parsing request, MAYBE invalid body format. {e}"
        ))
    })
}

/// The working directory of a command: the one asked for, else the home of the user it runs as
/// (the sandbox's default working directory for the sandbox user; `/` for a user whose home does not exist), which that user
/// can enter.
fn resolve_cwd(
    cwd: Option<&str>,
    uid: Option<u32>,
    names: &crate::users::Names,
    env: &[(String, String)],
) -> Result<PathBuf, ApiError> {
    let default = match uid {
        Some(uid) => names
            .home_of(uid)
            .filter(|h| crate::files::is_dir(std::path::Path::new(h)))
            .unwrap_or("/")
            .to_string(),
        None => crate::paths::default_cwd().to_string_lossy().into_owned(),
    };
    let raw = cwd.filter(|c| !c.is_empty()).unwrap_or(&default);
    let path = crate::paths::resolve(raw, env)?;
    if !crate::files::is_dir(&path) {
        return Err(ApiError::BadRequest(format!(
            "invalid request, validation error cwd {raw:?} does not exist or is not a directory"
        )));
    }
    Ok(path)
}

/// `POST /command`.
#[utoipa::path(
    post,
    path = "/command",
    operation_id = "execdRunCommand",
    tag = "execd",
    description = "Runs `bash -c command` and streams its events (or starts it in the background).",
    request_body = execbox_proto::execd::RunCommandRequest,
    responses(
        (status = 200, description = "Server-sent events (`data: {json}` frames of `ExecdEvent`).", content_type = "text/event-stream", body = serde_json::Value),
        (status = 400, description = "`INVALID_REQUEST_BODY` or `MISSING_QUERY`: the message names what is wrong.", body = execbox_proto::execd::ExecdError),
        (status = 500, description = "`RUNTIME_ERROR`: the agent failed.", body = execbox_proto::execd::ExecdError),
    )
)]
pub async fn run(State(app): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let req = parse_body(&body)?;
    let command = req.command.filter(|c| !c.is_empty()).ok_or_else(|| {
        ApiError::BadRequest("invalid request, validation error command is required".into())
    })?;
    let timeout_ms = req.timeout.unwrap_or(0);
    if timeout_ms < 0 {
        return Err(ApiError::BadRequest(
            "invalid request, validation error timeout must not be negative".into(),
        ));
    }
    if req.gid.is_some() && req.uid.is_none() {
        return Err(ApiError::BadRequest(
            "uid is required when gid is provided".into(),
        ));
    }
    let background = req.background.unwrap_or(false);
    // As upstream: `uid` also brings that user's primary group (unless `gid` is given) and
    // supplementary groups, from the sandbox's own user database.
    let names = crate::users::Names::load();
    let cwd = resolve_cwd(
        req.cwd.as_deref(),
        req.uid,
        &names,
        &app.runner.env_with(&[]),
    )?;
    let creds = req.uid.map(|uid| Credentials {
        uid,
        gid: req.gid.or_else(|| names.primary_gid(uid)).unwrap_or(uid),
    });
    let groups = req
        .uid
        .map(|uid| names.supplementary_gids(uid))
        .unwrap_or_default();
    let extra_env: Vec<(String, String)> = req.envs.unwrap_or_default().into_iter().collect();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let shell = if Path::new("/bin/bash").exists() {
        "/bin/bash"
    } else {
        "/bin/sh"
    };

    let started = app.runner.start(RunSpec {
        argv: vec![shell.to_string(), "-c".to_string(), command.clone()],
        cwd: &cwd,
        extra_env,
        creds,
        groups,
        output: if background {
            Output::Combined
        } else {
            Output::Pipes
        },
        input: Input::Null,
        controlling_tty: false,
        inherit_fds: Vec::new(),
    });
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let mut sink = Sink { tx, gone: false };
    let timeout = (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms as u64));

    let started = match started {
        Ok(s) => s,
        Err(e @ crate::runner::RunError::Cwd { .. }) => return Err(e.into()),
        Err(e) => {
            // Start failure after init, as upstream.
            let text = e.to_string();
            tokio::spawn(async move {
                sink.send(&Event::text("init", id, now_ms())).await;
                sink.send(&Event::error(
                    "CommandExecError",
                    text.clone(),
                    vec![text],
                    now_ms(),
                ))
                .await;
            });
            return Ok(sse_response(rx));
        }
    };
    let leaf = started.leaf.map(Arc::new);
    let log = match (background, &app.commands.log_dir) {
        (true, Some(dir)) => match dir.tmpfile(0o600) {
            Ok(f) => Some(Arc::new(f)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot create a command log");
                None
            }
        },
        _ => None,
    };
    app.commands.lock().insert(
        id.clone(),
        Entry {
            content: command,
            background,
            pid: started.pid,
            running: true,
            exit_code: None,
            error: None,
            started_at: rfc3339_now(),
            finished_at: None,
            finished: None,
            log: log.clone(),
            leaf: leaf.clone(),
        },
    );
    let exec = Execution {
        app: app.clone(),
        id: id.clone(),
        pid: started.pid,
        exit: started.exit,
        leaf,
        timeout,
    };
    if background {
        let max = app.commands.max_log_bytes;
        let out = pipe_reader(started.stdout);
        tokio::spawn(async move {
            sink.send(&Event::text("init", id, now_ms())).await;
            sink.send(&Event::complete(0, now_ms())).await;
            drop(sink);
            exec.run_background(out, log, max).await;
        });
    } else {
        let out = pipe_reader(started.stdout);
        let err = pipe_reader(started.stderr);
        tokio::spawn(async move {
            sink.send(&Event::text("init", id, now_ms())).await;
            exec.run_foreground(out, err, sink).await;
        });
    }
    Ok(sse_response(rx))
}

struct Execution {
    app: Arc<AppState>,
    id: String,
    pid: i32,
    exit: tokio::sync::oneshot::Receiver<ExitInfo>,
    leaf: Option<Arc<ExecLeaf>>,
    timeout: Option<Duration>,
}

impl Execution {
    async fn wait_exit(&mut self, deadline: Option<Instant>) -> (Option<ExitInfo>, bool) {
        tokio::select! {
            r = &mut self.exit => (r.ok(), false),
            _ = sleep_until_opt(deadline) => {
                self.kill_tree();
                ((&mut self.exit).await.ok(), true)
            }
        }
    }

    fn kill_tree(&self) {
        let _ = execbox_jail::process::signal_group(self.pid, libc::SIGKILL);
        if let Some(leaf) = &self.leaf {
            let _ = leaf.kill_all();
        }
    }

    fn conclude(&self, exit: Option<ExitInfo>, timed_out: bool, started: Instant) -> Outcome {
        let oom = matches!(exit, Some(ExitInfo::Signal(libc::SIGKILL)))
            && crate::runner::leaf_stats(self.leaf.as_deref()).is_some_and(|s| s.oom_kills > 0);
        let o = outcome(exit, timed_out, oom, started.elapsed().as_millis() as u64);
        self.app.commands.finish(&self.id, &o);
        o
    }

    /// Whatever the command left behind in its cgroup goes with it. Done after the terminal
    /// event is out and on a blocking thread (removing a memory cgroup can take milliseconds),
    /// so neither this client nor the next request waits for it.
    fn clean_up(self) {
        if let Some(leaf) = self.leaf {
            tokio::task::spawn_blocking(move || {
                let _ = leaf.kill_all();
                let _ = leaf.remove();
            });
        }
    }

    async fn run_foreground(
        mut self,
        mut out: Option<tokio::net::unix::pipe::Receiver>,
        mut err: Option<tokio::net::unix::pipe::Receiver>,
        mut sink: Sink,
    ) {
        let started = Instant::now();
        let deadline = self.timeout.map(|t| started + t);
        let (mut so, mut se) = (LineSplitter::default(), LineSplitter::default());
        let mut ob = vec![0u8; 64 * 1024];
        let mut eb = vec![0u8; 64 * 1024];
        let mut lines = Vec::new();
        let mut ping = tokio::time::interval_at((started + PING_EVERY).into(), PING_EVERY);
        let mut exit: Option<(Option<ExitInfo>, bool)> = None;
        let mut drain_until: Option<Instant> = None;
        loop {
            if out.is_none() && err.is_none() && exit.is_some() {
                break;
            }
            tokio::select! {
                n = read_some(&mut out, &mut ob) => match n {
                    Some(n) => {
                        so.feed(&ob[..n], &mut lines);
                        sink.send_lines("stdout", &mut lines).await;
                    }
                    None => out = None,
                },
                n = read_some(&mut err, &mut eb) => match n {
                    Some(n) => {
                        se.feed(&eb[..n], &mut lines);
                        sink.send_lines("stderr", &mut lines).await;
                    }
                    None => err = None,
                },
                r = self.wait_exit(deadline), if exit.is_none() => {
                    exit = Some(r);
                    drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
                },
                _ = sleep_until_opt(drain_until) => break,
                _ = ping.tick() => sink.send(&Event::text("ping", "pong", now_ms())).await,
            }
        }
        so.finish(&mut lines);
        sink.send_lines("stdout", &mut lines).await;
        se.finish(&mut lines);
        sink.send_lines("stderr", &mut lines).await;
        let (info, timed_out) = exit.unwrap_or((None, false));
        let o = self.conclude(info, timed_out, started);
        sink.send(&o.event).await;
        drop(sink);
        self.clean_up();
    }

    async fn run_background(
        mut self,
        mut out: Option<tokio::net::unix::pipe::Receiver>,
        log: Option<Arc<std::fs::File>>,
        max: u64,
    ) {
        let started = Instant::now();
        let deadline = self.timeout.map(|t| started + t);
        let mut file = log.and_then(|f| match f.try_clone() {
            Ok(f) => Some(tokio::fs::File::from_std(f)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot write the command log");
                None
            }
        });
        let mut written = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        let mut exit: Option<(Option<ExitInfo>, bool)> = None;
        let mut drain_until: Option<Instant> = None;
        loop {
            if out.is_none() && exit.is_some() {
                break;
            }
            tokio::select! {
                n = read_some(&mut out, &mut buf) => match n {
                    Some(n) => {
                        let keep = (max.saturating_sub(written) as usize).min(n);
                        if let (Some(f), true) = (file.as_mut(), keep > 0) {
                            use tokio::io::AsyncWriteExt;
                            if f.write_all(&buf[..keep]).await.is_ok() {
                                written += keep as u64;
                            }
                        }
                    }
                    None => out = None,
                },
                r = self.wait_exit(deadline), if exit.is_none() => {
                    exit = Some(r);
                    drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
                },
                _ = sleep_until_opt(drain_until) => break,
            }
        }
        let (info, timed_out) = exit.unwrap_or((None, false));
        self.conclude(info, timed_out, started);
        self.clean_up();
    }
}

/// `GET /command/status/{id}`.
#[utoipa::path(
    get,
    path = "/command/status/{id}",
    operation_id = "execdCommandStatus",
    tag = "execd",
    description = "A command's state.",
    params(
        ("id" = String, Path, description = "Id."),
    ),
    responses(
        (status = 200, description = "The state.", body = execbox_proto::execd::CommandStatus),
        (status = 404, description = "Unknown command.", body = execbox_proto::execd::ExecdError),
    )
)]
pub async fn status(
    State(app): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<CommandStatus>, ApiError> {
    let entries = app.commands.lock();
    let e = entries
        .get(&id)
        .ok_or_else(|| ApiError::CommandNotFound(format!("command not found: {id}")))?;
    Ok(Json(CommandStatus {
        id: id.clone(),
        content: e.content.clone(),
        running: e.running,
        exit_code: e.exit_code,
        error: e.error.clone(),
        started_at: e.started_at.clone(),
        finished_at: e.finished_at.clone(),
    }))
}

#[derive(serde::Deserialize)]
pub struct LogsQuery {
    cursor: Option<String>,
}

/// `GET /command/{id}/logs?cursor=N`.
#[utoipa::path(
    get,
    path = "/command/{id}/logs",
    operation_id = "execdCommandLogs",
    tag = "execd",
    description = "A background command's output from `cursor` on; `EXECD-COMMANDS-TAIL-CURSOR` gives the next.",
    params(
        ("id" = String, Path, description = "Id."),
        ("cursor" = Option<u64>, Query, description = "Byte offset to start from."),
    ),
    responses(
        (status = 200, description = "Output.", content_type = "text/plain", body = String),
        (status = 400, description = "A malformed query (axum's plain-text answer).", body = String),
        (status = 404, description = "Unknown command.", body = execbox_proto::execd::ExecdError),
    )
)]
pub async fn logs(
    State(app): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    let log = {
        let entries = app.commands.lock();
        let e = entries
            .get(&id)
            .ok_or_else(|| ApiError::BadRequest(format!("command not found: {id}")))?;
        if !e.background {
            return Err(ApiError::BadRequest(format!(
                "command {id} is not running in background"
            )));
        }
        e.log.clone()
    };
    let cursor: u64 = q.cursor.and_then(|c| c.parse().ok()).unwrap_or(0);
    let (body, next) = match log {
        Some(f) => tokio::task::spawn_blocking(move || read_log_page(&f, cursor))
            .await
            .map_err(|e| ApiError::Runtime(format!("error reading command logs. {e}")))?
            .map_err(|e| ApiError::Runtime(format!("error reading command logs. {e}")))?,
        None => (Vec::new(), 0),
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&next.to_string()) {
        headers.insert("EXECD-COMMANDS-TAIL-CURSOR", v);
    }
    Ok((StatusCode::OK, headers, body).into_response())
}

/// Bytes of the log from `cursor` (clamped to its end, as upstream does not), at most
/// [`MAX_LOG_PAGE`], and the cursor after them.
fn read_log_page(file: &std::fs::File, cursor: u64) -> std::io::Result<(Vec<u8>, u64)> {
    use std::os::unix::fs::FileExt;
    let size = file.metadata()?.len();
    let start = cursor.min(size);
    let len = (size - start).min(MAX_LOG_PAGE) as usize;
    let mut body = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match file.read_at(&mut body[got..], start + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    body.truncate(got);
    Ok((body, start + got as u64))
}

#[derive(serde::Deserialize)]
pub struct IdQuery {
    id: Option<String>,
}

/// `DELETE /command?id=`: SIGTERM to the command's process group, SIGKILL to its whole cgroup
/// after a grace period.
#[utoipa::path(
    delete,
    path = "/command",
    operation_id = "execdInterruptCommand",
    tag = "execd",
    description = "Interrupts a command (or a code execution).",
    params(
        ("id" = String, Query, description = "Command id."),
    ),
    responses(
        (status = 200, description = "Interrupted."),
        (status = 400, description = "`INVALID_REQUEST_BODY` or `MISSING_QUERY`: the message names what is wrong.", body = execbox_proto::execd::ExecdError),
        (status = 500, description = "`RUNTIME_ERROR`: an unknown or finished id (upstream execd's answer, kept for wire compatibility), or the agent failed.", body = execbox_proto::execd::ExecdError),
    )
)]
pub async fn interrupt(
    State(app): State<Arc<AppState>>,
    Query(q): Query<IdQuery>,
) -> Result<StatusCode, ApiError> {
    let id =
        q.id.filter(|i| !i.is_empty())
            .ok_or_else(|| ApiError::MissingQuery("missing query parameter id".into()))?;
    interrupt_id(app, id)
}

/// `DELETE /command/{id}`.
#[utoipa::path(
    delete,
    path = "/command/{id}",
    operation_id = "execdInterruptCommandById",
    tag = "execd",
    description = "Interrupts a command.",
    params(
        ("id" = String, Path, description = "Id."),
    ),
    responses(
        (status = 200, description = "Interrupted."),
        (status = 500, description = "`RUNTIME_ERROR`: an unknown or finished id (upstream execd's answer, kept for wire compatibility), or the agent failed.", body = execbox_proto::execd::ExecdError),
    )
)]
pub async fn interrupt_path(
    State(app): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    interrupt_id(app, id)
}

fn interrupt_id(app: Arc<AppState>, id: String) -> Result<StatusCode, ApiError> {
    let (pid, leaf) = {
        let entries = app.commands.lock();
        match entries.get(&id) {
            Some(e) if e.running => (e.pid, e.leaf.clone()),
            Some(_) => return Err(ApiError::Runtime(format!("command {id} is not running"))),
            // The generic interrupt (§5): a code context is interrupted, a bash session closed.
            None if app.contexts.interrupt(&id) => return Ok(StatusCode::OK),
            None if app.sessions.close(&id) => return Ok(StatusCode::OK),
            None => return Err(ApiError::Runtime(format!("no such session: {id}"))),
        }
    };
    let _ = execbox_jail::process::signal_group(pid, libc::SIGTERM);
    tokio::spawn(async move {
        tokio::time::sleep(INTERRUPT_GRACE).await;
        let still = app.commands.lock().get(&id).is_some_and(|e| e.running);
        if still {
            let _ = execbox_jail::process::signal_group(pid, libc::SIGKILL);
            if let Some(leaf) = leaf {
                let _ = leaf.kill_all();
            }
        }
    });
    Ok(StatusCode::OK)
}
