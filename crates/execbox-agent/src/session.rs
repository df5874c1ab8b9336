//! Bash sessions (`/session`): one long-lived `bash` per session, so that everything a shell
//! keeps — exported and plain variables, functions, aliases, options and the working
//! directory — persists between runs (upstream starts a fresh bash per run and carries over only
//! the exported environment and the cwd).
//!
//! Protocol with the shell: at start it runs `shopt -s expand_aliases; exec 200>&1` (a spare
//! copy of the output pipe), then each run is one line written to its stdin,
//!
//! ```text
//! cd -- $'<cwd>' && eval $'<command>' </dev/null; printf '\n\x1e<nonce> %d %s\n' $? "$PWD" >&200; exec 1>&200 2>&201
//! ```
//!
//! The command text travels ANSI-C quoted (every unusual byte as `\xHH`), so no input can break
//! out of the line. The marker goes to the spare descriptor and the standard ones are reset after
//! it, so a run that does `exec >/dev/null` silences only itself. The end-of-run marker carries a
//! fresh random nonce, which user output cannot forge.
//! A run that outlives its timeout kills the shell; the next run starts a fresh one in the last
//! known working directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{delete, post};
use axum::{Json, Router};
use execbox_jail::cgroup::ExecLeaf;
use execbox_jail::process::ExitInfo;
use execbox_proto::execd::Event;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::runner::{Input, Output, RunSpec};
use crate::sse::{
    now_ms, pipe_reader, read_some, sleep_until_opt, sse_response, LineSplitter, Sink,
};
use crate::AppState;

/// Sessions kept at once; each holds a shell process.
const MAX_SESSIONS: usize = 256;
/// Interval of `ping` events.
const PING_EVERY: Duration = Duration::from_secs(3);
/// First line every session shell runs (see the module documentation).
const SHELL_PREAMBLE: &str = "shopt -s expand_aliases; exec 200>&1 201>&2\n";
/// Timeout when a run gives none (upstream: 24 h).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Bash sessions of this sandbox.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Arc<Session>>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        match self.map.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.lock().get(id).cloned()
    }

    /// Removes the session `id` and kills its shell; false when there is no such session.
    pub fn close(&self, id: &str) -> bool {
        let Some(session) = self.lock().remove(id) else {
            return false;
        };
        session.kill_shell();
        true
    }
}

/// One session: the shell (absent until started, or after it died) and the last known cwd.
pub(crate) struct Session {
    id: String,
    cwd: Mutex<PathBuf>,
    /// Held for the whole of a run: runs of one session are serialised.
    shell: tokio::sync::Mutex<Option<Shell>>,
    /// Process group of the current shell, for killing it without taking the run lock.
    pgid: Mutex<Option<(i32, Option<Arc<ExecLeaf>>)>>,
    /// Keep stderr apart from stdout (code contexts) instead of merging it (sessions, §6).
    separate_stderr: bool,
}

struct Shell {
    /// The preamble has not been sent yet (it goes with the first run).
    fresh: bool,
    stdin: pipe::Sender,
    output: Option<pipe::Receiver>,
    /// stderr, when it is kept apart (code contexts); sessions merge it into `output`.
    errput: Option<pipe::Receiver>,
    exit: tokio::sync::oneshot::Receiver<ExitInfo>,
}

impl Session {
    fn kill_shell(&self) {
        let current = match self.pgid.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some((pid, leaf)) = current {
            let _ = execbox_jail::process::signal_group(pid, libc::SIGKILL);
            if let Some(leaf) = leaf {
                let _ = leaf.kill_all();
            }
        }
    }

    fn cwd(&self) -> PathBuf {
        match self.cwd.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set_cwd(&self, cwd: PathBuf) {
        match self.cwd.lock() {
            Ok(mut g) => *g = cwd,
            Err(p) => *p.into_inner() = cwd,
        }
    }
}

/// Routes of bash sessions.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/session", post(create))
        .route("/session/{id}/run", post(run))
        .route("/session/{id}", delete(remove))
}

fn parse<T: serde::de::DeserializeOwned + Default>(body: &Bytes) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::BadRequest(format!(
            "error parsing request, MAYBE invalid body format. {e}"
        ))
    })
}

#[derive(Deserialize, Default)]
struct CreateSession {
    cwd: Option<String>,
}

/// `POST /session`.
#[utoipa::path(
    post,
    path = "/session",
    operation_id = "execdCreateSession",
    tag = "execd",
    description = "Starts a long-lived bash session.",
    request_body = crate::openapi::schemas::SessionCreate,
    responses(
        (status = 200, description = "Created.", body = crate::openapi::schemas::SessionCreated),
        (status = 400, description = "`INVALID_REQUEST_BODY` or `MISSING_QUERY`: the message names what is wrong.", body = execbox_proto::execd::ExecdError),
        (status = 500, description = "`RUNTIME_ERROR`: the agent failed.", body = execbox_proto::execd::ExecdError),
    )
)]
async fn create(
    State(app): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let req: CreateSession = parse(&body)?;
    require_bash()?;
    let env = app.runner.env_with(&[]);
    let cwd = match req.cwd.as_deref().filter(|c| !c.is_empty()) {
        Some(raw) => {
            let path = crate::paths::resolve(raw, &env)?;
            crate::files::make_cwd(&path, app.runner.user())?;
            path
        }
        None => crate::paths::default_cwd(),
    };
    let id = uuid::Uuid::new_v4().to_string();
    let session = Arc::new(Session {
        id: id.clone(),
        cwd: Mutex::new(cwd),
        shell: tokio::sync::Mutex::new(None),
        pgid: Mutex::new(None),
        separate_stderr: false,
    });
    {
        let mut map = app.sessions.lock();
        if map.len() >= MAX_SESSIONS {
            return Err(ApiError::Runtime(format!(
                "error creating session. at most {MAX_SESSIONS} sessions may be open"
            )));
        }
        map.insert(id.clone(), session.clone());
    }
    // Start the shell now so that the first run does not pay for it.
    let mut shell = session.shell.lock().await;
    *shell = Some(start_shell(&app, &session)?);
    Ok(Json(serde_json::json!({ "session_id": id })))
}

/// Sessions (and bash contexts) are bash: a root without it (an image of its own) refuses them
/// clearly instead of failing to start a shell.
pub(crate) fn require_bash() -> Result<(), ApiError> {
    if std::path::Path::new(BASH).exists() {
        Ok(())
    } else {
        Err(ApiError::BadRequest(
            "invalid request, bash is not installed in this sandbox".into(),
        ))
    }
}

const BASH: &str = "/bin/bash";

fn start_shell(app: &AppState, session: &Session) -> Result<Shell, ApiError> {
    let mut cwd = session.cwd();
    if !crate::files::is_dir(&cwd) {
        cwd = crate::paths::default_cwd();
    }
    let started = app
        .runner
        .start(RunSpec {
            argv: vec![BASH.into(), "--noprofile".into(), "--norc".into()],
            cwd: &cwd,
            extra_env: Vec::new(),
            creds: None,
            groups: Vec::new(),
            output: if session.separate_stderr {
                Output::Pipes
            } else {
                Output::Combined
            },
            input: Input::Pipe,
            controlling_tty: false,
            inherit_fds: Vec::new(),
        })
        .map_err(|e| match e {
            crate::runner::RunError::Cwd { .. } => ApiError::from(e),
            other => ApiError::Runtime(format!("error starting session shell. {other}")),
        })?;
    let stdin = started
        .stdin
        .and_then(|fd| pipe::Sender::from_owned_fd(fd).ok())
        .ok_or_else(|| ApiError::Runtime("error starting session shell. no stdin".into()))?;

    let leaf = started.leaf.map(Arc::new);
    match session.pgid.lock() {
        Ok(mut g) => *g = Some((started.pid, leaf.clone())),
        Err(p) => *p.into_inner() = Some((started.pid, leaf.clone())),
    }
    let exit = started.exit;
    // The shell's own exit is observed by the run that is active then; the leaf goes with it.
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if let Ok(info) = exit.await {
            let _ = tx.send(info);
        }
        if let Some(leaf) = leaf {
            let _ = leaf.kill_all();
            let _ = leaf.remove();
        }
    });
    Ok(Shell {
        fresh: true,
        stdin,
        output: pipe_reader(started.stdout),
        errput: pipe_reader(started.stderr),
        exit: rx,
    })
}

/// ANSI-C quoting (`$'…'`): printable ASCII except `'` and `\` as is, every other byte `\xHH`.
fn ansi_c_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 3);
    out.push_str("$'");
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'\'' && b != b'\\' {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out.push('\'');
    out
}

/// Go's `time.Duration` text for whole milliseconds (`30s`, `1.5s`, `2m0s`, `1h0m0s`).
fn go_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    let (h, m) = (ms / 3_600_000, (ms / 60_000) % 60);
    let s_ms = ms % 60_000;
    let secs = if s_ms.is_multiple_of(1000) {
        format!("{}s", s_ms / 1000)
    } else {
        let frac = format!("{:03}", s_ms % 1000);
        format!("{}.{}s", s_ms / 1000, frac.trim_end_matches('0'))
    };
    if ms == 0 {
        "0s".into()
    } else if ms < 1000 {
        format!("{ms}ms")
    } else if h > 0 {
        format!("{h}h{m}m{secs}")
    } else if m > 0 {
        format!("{m}m{secs}")
    } else {
        secs
    }
}

#[derive(Deserialize, Default)]
struct RunRequest {
    command: Option<String>,
    cwd: Option<String>,
    timeout: Option<i64>,
}

/// `POST /session/{id}/run`.
#[utoipa::path(
    post,
    path = "/session/{id}/run",
    operation_id = "execdRunInSession",
    tag = "execd",
    description = "Runs a command in a bash session; streamed.",
    params(
        ("id" = String, Path, description = "Id."),
    ),
    request_body = crate::openapi::schemas::SessionRun,
    responses(
        (status = 200, description = "Server-sent events (`data: {json}` frames of `ExecdEvent`).", content_type = "text/event-stream", body = serde_json::Value),
        (status = 400, description = "`INVALID_REQUEST_BODY` or `MISSING_QUERY`: the message names what is wrong.", body = execbox_proto::execd::ExecdError),
        (status = 404, description = "`CONTEXT_NOT_FOUND`.", body = execbox_proto::execd::ExecdError),
        (status = 500, description = "`RUNTIME_ERROR`: the agent failed.", body = execbox_proto::execd::ExecdError),
    )
)]
async fn run(
    State(app): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: RunRequest = parse(&body)?;
    let command = req.command.filter(|c| !c.is_empty()).ok_or_else(|| {
        ApiError::BadRequest("invalid request, validation error command is required".into())
    })?;
    let timeout = match req.timeout.unwrap_or(0) {
        t if t < 0 => {
            return Err(ApiError::BadRequest(
                "invalid request, validation error timeout must not be negative".into(),
            ))
        }
        0 => DEFAULT_TIMEOUT,
        t => Duration::from_millis(t as u64),
    };
    let cwd = match req.cwd.as_deref().filter(|c| !c.is_empty()) {
        Some(raw) => {
            let path = crate::paths::resolve(raw, &app.runner.env_with(&[]))?;
            if !crate::files::is_dir(&path) {
                return Err(ApiError::BadRequest(format!(
                    "invalid request, validation error cwd {raw:?} does not exist or is not a directory"
                )));
            }
            Some(path)
        }
        None => None,
    };
    let session = app
        .sessions
        .get(&id)
        .ok_or_else(|| ApiError::Runtime("error running in session. context not found".into()))?;
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let sink = Sink { tx, gone: false };
    tokio::spawn(async move {
        let mut sink = sink;
        sink.send(&Event::text("init", session.id.clone(), now_ms()))
            .await;
        run_in_shell(
            &app,
            &session,
            &command,
            cwd.as_deref(),
            timeout,
            sink,
            Style::Session,
        )
        .await;
    });
    Ok(sse_response(rx))
}

/// How one run ended.
enum RunEnd {
    /// The end marker arrived: exit status of the command and the shell's cwd after it.
    Marker(i32, PathBuf),
    /// The shell itself exited (the command ran `exit`, or it was killed).
    ShellExited(Option<ExitInfo>),
    /// The timeout passed; the shell was killed.
    TimedOut,
}

/// How a run's output and end are reported.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Style {
    /// `/session/{id}/run` (§6): one event per line without its terminator, empty lines
    /// dropped, and exactly one terminal event.
    Session,
    /// A bash code context (`/code`, §5): lines keep their terminator, blank lines are kept,
    /// and a failure is an `error` followed by `execution_complete`.
    Code,
}

impl Session {
    /// A session outside the `/session` registry, for a bash code context.
    pub(crate) fn detached(cwd: PathBuf) -> Arc<Session> {
        Arc::new(Session {
            id: uuid::Uuid::new_v4().to_string(),
            cwd: Mutex::new(cwd),
            shell: tokio::sync::Mutex::new(None),
            pgid: Mutex::new(None),
            separate_stderr: true,
        })
    }

    /// Whether a run is in progress.
    pub(crate) fn is_busy(&self) -> bool {
        self.shell.try_lock().is_err()
    }

    /// Interrupts the current run: SIGINT to the shell's process group.
    pub(crate) fn interrupt(&self) {
        let pid = match self.pgid.lock() {
            Ok(g) => g.as_ref().map(|(p, _)| *p),
            Err(p) => p.into_inner().as_ref().map(|(p, _)| *p),
        };
        if let Some(pid) = pid {
            let _ = execbox_jail::process::signal_group(pid, libc::SIGINT);
        }
    }

    /// Kills the shell (for good: used when the context is deleted).
    pub(crate) fn kill(&self) {
        self.kill_shell();
    }
}

/// Runs `code` in a bash code context's shell, reporting in the code style.
pub(crate) async fn run_code(app: &AppState, session: &Session, code: &str, sink: Sink) {
    run_in_shell(app, session, code, None, DEFAULT_TIMEOUT, sink, Style::Code).await;
}

async fn run_in_shell(
    app: &AppState,
    session: &Session,
    command: &str,
    cwd: Option<&Path>,
    timeout: Duration,
    mut sink: Sink,
    style: Style,
) {
    let started = Instant::now();
    let mut guard = session.shell.lock().await;
    if guard.is_none() {
        match start_shell(app, session) {
            Ok(s) => *guard = Some(s),
            Err(e) => {
                sink.send_envelope(&e.to_string()).await;
                return;
            }
        }
    }
    let Some(shell) = guard.as_mut() else {
        return;
    };
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let cd = cwd
        .map(|c| format!("cd -- {} && ", ansi_c_quote(&c.to_string_lossy())))
        .unwrap_or_default();
    let preamble = if std::mem::take(&mut shell.fresh) {
        SHELL_PREAMBLE
    } else {
        ""
    };
    let line = format!(
        "{preamble}{cd}eval {} </dev/null; printf '\\n\\x1e%s %d %s\\n' {nonce} $? \"$PWD\" >&200; \
         exec 1>&200 2>&201\n",
        ansi_c_quote(command)
    );
    let end = if shell.stdin.write_all(line.as_bytes()).await.is_err() {
        RunEnd::ShellExited((&mut shell.exit).await.ok())
    } else {
        stream_until_marker(shell, &nonce, started + timeout, &mut sink, style).await
    };
    let ts = now_ms();
    match end {
        RunEnd::Marker(code, pwd) => {
            session.set_cwd(pwd);
            send_exit(&mut sink, code, started, ts, style).await;
        }
        RunEnd::ShellExited(info) => {
            *guard = None;
            session.kill_shell();
            let code = match info {
                Some(ExitInfo::Code(c)) => c,
                _ => -1,
            };
            send_exit(&mut sink, code, started, ts, style).await;
        }
        RunEnd::TimedOut => {
            *guard = None;
            session.kill_shell();
            sink.send_envelope(&format!(
                "error running in session. timeout after {}",
                go_duration(timeout)
            ))
            .await;
        }
    }
}

async fn send_exit(sink: &mut Sink, code: i32, started: Instant, ts: i64, style: Style) {
    sink.send(&exit_event(code, started, ts)).await;
    // Code streams always end with `execution_complete`, after an error too (§3.3).
    if style == Style::Code && code != 0 {
        sink.send(&Event::complete(started.elapsed().as_millis() as u64, ts))
            .await;
    }
}

fn exit_event(code: i32, started: Instant, ts: i64) -> Event {
    if code == 0 {
        Event::complete(started.elapsed().as_millis() as u64, ts)
    } else {
        Event::error(
            "CommandExecError",
            code.to_string(),
            vec![format!("command exited with code {code}")],
            ts,
        )
    }
}

async fn stream_until_marker(
    shell: &mut Shell,
    nonce: &str,
    deadline: Instant,
    sink: &mut Sink,
    style: Style,
) -> RunEnd {
    let marker = format!("\u{1e}{nonce} ");
    let mut splitter = LineSplitter::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut lines = Vec::new();
    let mut ping = tokio::time::interval_at((Instant::now() + PING_EVERY).into(), PING_EVERY);
    let mut held_blank = false;
    let mut err_splitter = LineSplitter::default();
    let mut ebuf = vec![0u8; 64 * 1024];
    let mut err_lines = Vec::new();
    loop {
        tokio::select! {
            n = read_some(&mut shell.errput, &mut ebuf) => match n {
                Some(n) => {
                    err_splitter.feed(&ebuf[..n], &mut err_lines);
                    send_stderr(sink, &mut err_lines, style).await;
                }
                None => shell.errput = None,
            },
            n = read_some(&mut shell.output, &mut buf) => match n {
                Some(n) => {
                    splitter.feed(&buf[..n], &mut lines);
                    let mut end = None;
                    for line in lines.drain(..) {
                        // The marker starts with a newline, which makes an empty line when the
                        // output already ended with one: a code context holds an empty line
                        // back until it knows the marker is not next.
                        if style == Style::Code && line == "\n" {
                            if std::mem::replace(&mut held_blank, true) {
                                sink.send(&Event::text("stdout", "\n", now_ms())).await;
                            }
                            continue;
                        }
                        if let Some(rest) = line.strip_prefix(&marker) {
                            let (code, pwd) = rest.split_once(' ').unwrap_or((rest, ""));
                            end = Some(RunEnd::Marker(
                                code.trim().parse().unwrap_or(-1),
                                PathBuf::from(pwd),
                            ));
                            // Anything after the marker belongs to no run.
                            break;
                        }
                        if std::mem::take(&mut held_blank) {
                            sink.send(&Event::text("stdout", "\n", now_ms())).await;
                        }
                        if let Some(text) = styled_line(line, style) {
                            sink.send(&Event::text("stdout", text, now_ms())).await;
                        }
                    }
                    if let Some(end) = end {
                        // What the command wrote to stderr is in its pipe by now (its writes
                        // ended before the marker's). Read with the syscall itself: tokio's
                        // `try_read` answers from its cached readiness, which may not have
                        // caught up yet.
                        if let Some(err) = &shell.errput {
                            crate::runner::read_ready(err, &mut ebuf, |chunk| {
                                err_splitter.feed(chunk, &mut err_lines)
                            });
                        }
                        err_splitter.finish(&mut err_lines);
                        send_stderr(sink, &mut err_lines, style).await;
                        return end;
                    }
                }
                None => {
                    shell.output = None;
                    let mut rest = Vec::new();
                    splitter.finish(&mut rest);
                    for text in rest.into_iter().filter_map(|l| styled_line(l, style)) {
                        sink.send(&Event::text("stdout", text, now_ms())).await;
                    }
                    let info = tokio::time::timeout_at(deadline.into(), &mut shell.exit).await;
                    return match info {
                        Ok(r) => RunEnd::ShellExited(r.ok()),
                        Err(_) => RunEnd::TimedOut,
                    };
                }
            },
            _ = sleep_until_opt(Some(deadline)) => return RunEnd::TimedOut,
            _ = ping.tick() => sink.send(&Event::text("ping", "pong", now_ms())).await,
        }
    }
}

async fn send_stderr(sink: &mut Sink, lines: &mut Vec<String>, style: Style) {
    for text in lines.drain(..).filter_map(|l| styled_line(l, style)) {
        sink.send(&Event::text("stderr", text, now_ms())).await;
    }
}

/// The event text of one output line: sessions drop empty lines (unlike `/command`); code
/// contexts keep the terminator, as interpreters' output chunks do.
fn styled_line(line: String, style: Style) -> Option<String> {
    match style {
        Style::Session => (line != "\n").then_some(line),
        Style::Code if line == "\n" => Some(line),
        Style::Code => Some(line + "\n"),
    }
}

/// `DELETE /session/{id}`.
#[utoipa::path(
    delete,
    path = "/session/{id}",
    operation_id = "execdDeleteSession",
    tag = "execd",
    description = "Ends a bash session.",
    params(
        ("id" = String, Path, description = "Id."),
    ),
    responses(
        (status = 200, description = "Ended."),
        (status = 404, description = "`CONTEXT_NOT_FOUND`.", body = execbox_proto::execd::ExecdError),
    )
)]
async fn remove(
    State(app): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    if app.sessions.close(&id) {
        Ok(StatusCode::OK)
    } else {
        Err(ApiError::ContextNotFound(format!("session {id} not found")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_escapes_everything_that_could_end_the_word() {
        assert_eq!(
            ansi_c_quote("echo 'a'\\n\n"),
            "$'echo \\x27a\\x27\\x5cn\\x0a'"
        );
        assert_eq!(ansi_c_quote("é"), "$'\\xc3\\xa9'");
    }

    #[test]
    fn durations_in_go_syntax() {
        assert_eq!(go_duration(Duration::from_secs(30)), "30s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(go_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(go_duration(Duration::from_secs(120)), "2m0s");
        assert_eq!(go_duration(Duration::from_secs(3661)), "1h1m1s");
    }
}
