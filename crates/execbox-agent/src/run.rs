//! The run API (`/execbox/…`): the engine under the server's isol8 and session-execute
//! surfaces. One request writes its input files (all or none), starts one process in its own
//! execution cgroup, feeds it standard input, keeps at most a given number of bytes of each
//! output stream (counting the rest), enforces the timeout on the whole process tree, and
//! answers with the outcome and the cgroup's accounting: as one JSON object, or as NDJSON
//! events while it runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use execbox_jail::cgroup::ExecLeaf;
use execbox_jail::process::ExitInfo;
use execbox_proto::run::{
    utf8_prefix_len, FileContent, KillRequest, ListFilesResponse, RunError, RunEvent, RunRequest,
    RunResult, WriteFilesRequest, WriteFilesResponse, KILL_PATH, LIST_FILES_PATH, PRESTART_PATH,
    RUN_PATH, WRITE_FILES_PATH,
};
use tokio::sync::mpsc;

use crate::error::is_client_fault;
use crate::files::direct::{self, DirectError};
use crate::runner::{Input, Output, RunError as StartError, RunSpec, Started};
use crate::sse::{pipe_reader, read_some, sleep_until_opt};
use crate::AppState;

/// How long output is still collected after the main process exits, from processes it left
/// behind holding the pipes (persistent sessions).
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(50);
/// Entries a listing returns at most.
const MAX_LISTED: usize = 10_000;
/// Changed files reported at most.
const MAX_TRACKED: usize = 10_000;
/// Largest output file returned.
const MAX_OUTPUT_FILE: u64 = 64 << 20;
/// How often a leaf left to background processes is checked for removal.
const LINGER_CHECK: Duration = Duration::from_secs(5);

/// Routes of the run API.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(RUN_PATH, post(run))
        .route(WRITE_FILES_PATH, post(write_files))
        .route(LIST_FILES_PATH, get(list_files))
        .route(KILL_PATH, post(kill))
        .route(PRESTART_PATH, post(crate::prestart::prestart))
        // The server bounds request sizes; the agent takes what it is given.
        .layer(DefaultBodyLimit::disable())
}

/// An error of the run API, answered as [`RunError`].
#[derive(Debug, thiserror::Error)]
enum Fail {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Internal(String),
}

impl From<DirectError> for Fail {
    fn from(e: DirectError) -> Self {
        match e {
            DirectError::Invalid(m) => Fail::Invalid(m),
            DirectError::NotFound(m) => Fail::NotFound(m),
            // TODO(files-rewrite): `DirectError::Io` carries only the message; once it carries
            // the `io::Error`, classify that instead of its "(os error N)" text.
            DirectError::Io(m) if os_error(&m).is_some_and(|e| is_client_fault(&e)) => {
                Fail::Invalid(m)
            }
            DirectError::Io(m) => Fail::Internal(m),
        }
    }
}

/// The errno at the end of an `io::Error`'s text (`… (os error 21)`).
fn os_error(message: &str) -> Option<std::io::Error> {
    let n = message.strip_suffix(')')?.rsplit_once("(os error ")?.1;
    n.parse().ok().map(std::io::Error::from_raw_os_error)
}

impl From<StartError> for Fail {
    /// A program that cannot start because of what the request gave (its `PATH` in `env`, a
    /// program file that is not executable, arguments over one exec) is the client's mistake.
    fn from(e: StartError) -> Self {
        match &e {
            StartError::Spawn(io)
                if is_client_fault(io) || io.kind() == std::io::ErrorKind::NotFound =>
            {
                Fail::Invalid(format!("argv: {e}"))
            }
            _ => Fail::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        let (status, kind) = match &self {
            Fail::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
            Fail::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Fail::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status.is_server_error() {
            tracing::error!(error = %self, "run API request failed");
        }
        let body = RunError {
            kind: kind.into(),
            message: self.to_string(),
        };
        (status, Json(body)).into_response()
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Fail> {
    serde_json::from_slice(body).map_err(|e| Fail::Invalid(format!("malformed request: {e}")))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Fail> + Send + 'static,
) -> Result<T, Fail> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Fail::Internal(e.to_string()))?
}

fn decode(files: &[FileContent]) -> Result<Vec<(PathBuf, Vec<u8>)>, Fail> {
    files
        .iter()
        .map(|f| {
            base64::engine::general_purpose::STANDARD
                .decode(&f.content)
                .map(|data| (PathBuf::from(&f.path), data))
                .map_err(|e| Fail::Invalid(format!("{}: content is not base64: {e}", f.path)))
        })
        .collect()
}

fn roots(raw: &[String]) -> Vec<PathBuf> {
    raw.iter().map(PathBuf::from).collect()
}

/// `POST /execbox/files/write`.
async fn write_files(
    State(app): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Json<WriteFilesResponse>, Fail> {
    let req: WriteFilesRequest = parse(&body)?;
    let files = decode(&req.files)?;
    let roots = roots(&req.roots);
    let user = app.runner.user();
    let written = blocking(move || Ok(direct::write_all(&files, &roots, user)?)).await?;
    Ok(Json(WriteFilesResponse { written }))
}

#[derive(serde::Deserialize)]
struct ListQuery {
    path: String,
    #[serde(default)]
    recursive: bool,
}

/// `GET /execbox/files/list?path=&recursive=`.
async fn list_files(Query(q): Query<ListQuery>) -> Result<Json<ListFilesResponse>, Fail> {
    blocking(move || Ok(direct::list(Path::new(&q.path), q.recursive, MAX_LISTED)?))
        .await
        .map(Json)
}

/// `POST /execbox/kill`: a signal to one process of the sandbox.
async fn kill(body: Bytes) -> Result<StatusCode, Fail> {
    let req: KillRequest = parse(&body)?;
    if req.pid == 1 {
        return Err(Fail::Invalid(
            "pid: 1 is the sandbox's init process and cannot be signalled".into(),
        ));
    }
    if req.pid == execbox_proto::run::EVERY_PROCESS {
        return match execbox_jail::process::signal_everything(req.signal) {
            Ok(()) => Ok(StatusCode::OK),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Err(Fail::NotFound(
                "no process is running in this sandbox".into(),
            )),
            Err(e) => Err(Fail::Internal(format!("signalling every process: {e}"))),
        };
    }
    if req.pid <= 0 {
        return Err(Fail::Invalid(format!(
            "pid: {} is not a process id",
            req.pid
        )));
    }
    match execbox_jail::process::signal_process(req.pid, req.signal) {
        Ok(()) => Ok(StatusCode::OK),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Err(Fail::NotFound(format!(
            "pid {} is not running in this session",
            req.pid
        ))),
        Err(e) => Err(Fail::Internal(format!("signalling pid {}: {e}", req.pid))),
    }
}

/// `POST /execbox/run`.
async fn run(State(app): State<Arc<AppState>>, body: Bytes) -> Response {
    // Spawned: a caller gone while a pre-started interpreter takes the run (an await between
    // the process starting on the run and the run's supervision) must not leave that process
    // without its timeout and clean-up.
    match tokio::spawn(start(app, body)).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => e.into_response(),
        Err(e) => Fail::Internal(format!("the run failed: {e}")).into_response(),
    }
}

/// What [`prepare`] left on disk for the run.
struct Prepared {
    written: Vec<String>,
    program: Option<PathBuf>,
}

/// Writes the request's files and program, and makes the working directory.
fn prepare(
    req: &RunRequest,
    cwd: &Path,
    user: execbox_jail::process::Credentials,
) -> Result<Prepared, Fail> {
    let files = decode(&req.files)?;
    let written = if files.is_empty() {
        Vec::new()
    } else {
        direct::write_all(&files, &roots(&req.file_roots), user)?
    };
    let program = match &req.program {
        Some(p) => {
            let decoded = decode(std::slice::from_ref(p))?;
            direct::write_all(&decoded, &[PathBuf::from("/")], user)?;
            Some(PathBuf::from(&p.path))
        }
        None => None,
    };
    if req.create_cwd {
        direct::make_dir(cwd, user)?;
    }
    if !direct::is_dir(cwd) {
        return Err(Fail::Invalid(format!(
            "cwd: {} does not exist or is not a directory",
            cwd.display()
        )));
    }
    Ok(Prepared { written, program })
}

async fn start(app: Arc<AppState>, body: Bytes) -> Result<Response, Fail> {
    let t0 = Instant::now();
    let mut req: RunRequest = parse(&body)?;
    if req.argv.is_empty() {
        return Err(Fail::Invalid("argv: a program is required".into()));
    }
    let cwd = direct::normalize(Path::new(&req.cwd))
        .ok_or_else(|| Fail::Invalid(format!("cwd: {:?} is not an absolute path", req.cwd)))?;
    let user = app.runner.user();
    let (req_back, cwd, prepared, before) = blocking(move || {
        // Taken before the request's files are written: those are reported anyway.
        let before = req
            .track_changes_under
            .as_deref()
            .map(|dir| direct::snapshot(Path::new(dir), MAX_TRACKED))
            .unwrap_or_default();
        let prepared = prepare(&req, &cwd, user);
        Ok((req, cwd, prepared, before))
    })
    .await?;
    req = req_back;
    let prepared = prepared?;
    let t_prepared = t0.elapsed();
    let extra_env: Vec<(String, String)> = std::mem::take(&mut req.env).into_iter().collect();
    // A pre-started interpreter serves this run when it can do so exactly as a fresh process
    // would; it is taken out either way (one run only) and discarded when it does not fit.
    let prestarted = match app.prestarted.take() {
        Some(p) => {
            let env = app.runner.env_with(&extra_env);
            let request_env: std::collections::BTreeMap<String, String> =
                extra_env.iter().cloned().collect();
            let shape = crate::prestart::RunShape {
                argv: &req.argv,
                env: &env,
                request_env: &request_env,
                cwd: &cwd,
                stdin_null: req.stdin.is_none(),
            };
            match p.message(&shape) {
                Some(message) => p.hand_over(&message).await,
                None => {
                    p.discard();
                    None
                }
            }
        }
        None => None,
    };
    let was_prestarted = prestarted.is_some();
    let started = match prestarted {
        Some(started) => Ok(started),
        None => app
            .runner
            .start(RunSpec {
                argv: std::mem::take(&mut req.argv),
                cwd: &cwd,
                extra_env,
                creds: None,
                groups: Vec::new(),
                output: Output::Pipes,
                input: if req.stdin.is_some() {
                    Input::Pipe
                } else {
                    Input::Null
                },
                controlling_tty: false,
                inherit_fds: Vec::new(),
            })
            .map_err(Fail::from),
    };
    let started = match started {
        Ok(s) => s,
        Err(e) => {
            remove_program(prepared.program);
            return Err(e);
        }
    };
    tracing::debug!(
        prepare_us = t_prepared.as_micros() as u64,
        start_us = (t0.elapsed() - t_prepared).as_micros() as u64,
        prestarted = was_prestarted,
        "run started"
    );
    let mut run = Run::new(req, started, prepared, before);
    run.prestarted = was_prestarted;
    if run.req.stream {
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        tokio::spawn(async move {
            let result = run.execute(Some(&tx)).await;
            send_event(&tx, &RunEvent::Result { result }).await;
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
        });
        let mut resp = Response::new(Body::from_stream(stream));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        );
        Ok(resp)
    } else {
        // Spawned: a caller that goes away does not cancel the run, whose timeout must still
        // hold (a persistent session outlives its callers).
        let result = tokio::spawn(run.execute(None))
            .await
            .map_err(|e| Fail::Internal(format!("the run failed: {e}")))?;
        Ok(Json(result).into_response())
    }
}

async fn send_event(tx: &mpsc::Sender<Bytes>, event: &RunEvent) -> bool {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    tx.send(Bytes::from(line)).await.is_ok()
}

fn remove_program(program: Option<PathBuf>) {
    if let Some(p) = program {
        if let Err(e) = direct::remove(&p) {
            tracing::debug!(path = %p.display(), error = %e, "removing a program file");
        }
    }
}

/// One output stream: what is kept, how much there was, and bytes of a character cut by a
/// read that have not been streamed yet.
#[derive(Default)]
struct Captured {
    kept: Vec<u8>,
    total: u64,
    streamed: usize,
}

impl Captured {
    /// Takes a chunk; returns the text to stream now (whole characters within the cap).
    fn feed(&mut self, chunk: &[u8], max: u64) -> Option<String> {
        self.total += chunk.len() as u64;
        let room = (max as usize).saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let pending = &self.kept[self.streamed..];
        let whole = utf8_prefix_len(pending);
        if whole == 0 {
            return None;
        }
        let text = String::from_utf8_lossy(&pending[..whole]).into_owned();
        self.streamed += whole;
        Some(text)
    }

    /// Whatever is still unstreamed (a character cut at the very end).
    fn rest(&mut self) -> Option<String> {
        let pending = &self.kept[self.streamed..];
        self.streamed = self.kept.len();
        (!pending.is_empty()).then(|| String::from_utf8_lossy(pending).into_owned())
    }

    /// The kept text, cut back to a whole character.
    fn text(&self) -> String {
        let whole = utf8_prefix_len(&self.kept);
        String::from_utf8_lossy(&self.kept[..whole]).into_owned()
    }
}

struct Run {
    req: RunRequest,
    pid: i32,
    exit: tokio::sync::oneshot::Receiver<ExitInfo>,
    leaf: Option<ExecLeaf>,
    stdout: Option<tokio::net::unix::pipe::Receiver>,
    stderr: Option<tokio::net::unix::pipe::Receiver>,
    stdin: Option<std::os::fd::OwnedFd>,
    prepared: Prepared,
    before: HashMap<PathBuf, direct::FileStamp>,
    /// Served by a pre-started interpreter.
    prestarted: bool,
}

impl Run {
    fn new(
        req: RunRequest,
        started: Started,
        prepared: Prepared,
        before: HashMap<PathBuf, direct::FileStamp>,
    ) -> Self {
        Self {
            req,
            pid: started.pid,
            exit: started.exit,
            leaf: started.leaf,
            stdout: pipe_reader(started.stdout),
            stderr: pipe_reader(started.stderr),
            stdin: started.stdin,
            prepared,
            before,
            prestarted: false,
        }
    }

    fn kill_tree(&self) {
        let _ = execbox_jail::process::signal_group(self.pid, libc::SIGKILL);
        if let Some(leaf) = &self.leaf {
            let _ = leaf.kill_all();
        }
    }

    async fn execute(mut self, events: Option<&mpsc::Sender<Bytes>>) -> RunResult {
        let started = Instant::now();
        let deadline =
            (self.req.timeout_ms > 0).then(|| started + Duration::from_millis(self.req.timeout_ms));
        if let (Some(fd), Some(input)) = (self.stdin.take(), self.req.stdin.take()) {
            tokio::spawn(feed_stdin(fd, input));
        }
        let max = self.req.max_output_bytes;
        let (mut out, mut err) = (Captured::default(), Captured::default());
        let (mut ob, mut eb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
        let (mut so, mut se) = (self.stdout.take(), self.stderr.take());
        let mut exit: Option<(Option<ExitInfo>, bool, Duration)> = None;
        let mut stats = None;
        let mut drain_until: Option<Instant> = None;
        let mut client_gone = events.is_none();
        loop {
            if so.is_none() && se.is_none() && exit.is_some() {
                break;
            }
            let mut emit = None;
            tokio::select! {
                n = read_some(&mut so, &mut ob) => match n {
                    Some(n) => emit = out.feed(&ob[..n], max).map(|data| RunEvent::Stdout { data }),
                    None => so = None,
                },
                n = read_some(&mut se, &mut eb) => match n {
                    Some(n) => emit = err.feed(&eb[..n], max).map(|data| RunEvent::Stderr { data }),
                    None => se = None,
                },
                r = &mut self.exit, if exit.is_none() => {
                    exit = Some((r.ok(), false, started.elapsed()));
                    stats = crate::runner::leaf_stats(self.leaf.as_ref());
                    self.after_exit();
                    drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
                },
                _ = sleep_until_opt(deadline), if exit.is_none() => {
                    self.kill_tree();
                    let r = (&mut self.exit).await.ok();
                    exit = Some((r, true, started.elapsed()));
                    stats = crate::runner::leaf_stats(self.leaf.as_ref());
                    self.after_exit();
                    drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
                },
                _ = sleep_until_opt(drain_until) => break,
            }
            if let (Some(e), Some(tx), false) = (emit, events, client_gone) {
                // A consumer that stops reading must not hold off the timeout.
                tokio::select! {
                    ok = send_event(tx, &e) => client_gone = !ok,
                    _ = sleep_until_opt(deadline), if exit.is_none() => self.kill_tree(),
                }
            }
        }
        if let (Some(tx), false) = (events, client_gone) {
            if let Some(data) = out.rest() {
                send_event(tx, &RunEvent::Stdout { data }).await;
            }
            if let Some(data) = err.rest() {
                send_event(tx, &RunEvent::Stderr { data }).await;
            }
        }
        let (info, timed_out, elapsed) = exit.unwrap_or((None, false, started.elapsed()));
        let stats = stats.unwrap_or_default();
        let signal = match info {
            Some(ExitInfo::Signal(s)) => Some(s),
            None => Some(libc::SIGKILL),
            Some(ExitInfo::Code(_)) => None,
        };
        let exit_code = match (info, timed_out) {
            (_, true) => 128 + libc::SIGKILL,
            (Some(ExitInfo::Code(c)), _) => c,
            (Some(ExitInfo::Signal(s)), _) => 128 + s,
            (None, _) => 128 + libc::SIGKILL,
        };
        let oom_killed = !timed_out && signal == Some(libc::SIGKILL) && stats.oom_kills > 0;
        let keep = self.req.keep_background;
        let req = std::mem::take(&mut self.req);
        let prepared = std::mem::replace(
            &mut self.prepared,
            Prepared {
                written: Vec::new(),
                program: None,
            },
        );
        let before = std::mem::take(&mut self.before);
        let (files, files_written) = tokio::task::spawn_blocking(move || {
            remove_program(prepared.program);
            collect_files(&req, prepared.written, &before)
        })
        .await
        .unwrap_or_default();
        let prestarted = self.prestarted;
        self.clean_up(keep);
        RunResult {
            stdout: out.text(),
            stderr: err.text(),
            stdout_bytes: out.total,
            stderr_bytes: err.total,
            exit_code,
            signal,
            timed_out,
            oom_killed,
            duration_ms: elapsed.as_millis() as u64,
            memory_peak_bytes: stats.memory_peak.unwrap_or(stats.memory_current),
            cpu_time_ms: stats.cpu_usage_ns / 1_000_000,
            files,
            files_written,
            prestarted,
        }
    }

    /// Once the main process is gone: an ephemeral run takes everything it started with it.
    fn after_exit(&self) {
        if !self.req.keep_background {
            self.kill_tree();
        }
    }

    /// Removes the execution cgroup, at once when it is empty, otherwise once the processes
    /// left in the background (persistent sessions) have ended.
    fn clean_up(mut self, keep: bool) {
        let Some(leaf) = self.leaf.take() else { return };
        tokio::spawn(async move {
            loop {
                let leaf_ref = &leaf;
                let empty = leaf_ref.pids().map(|p| p.is_empty()).unwrap_or(true);
                if empty || !keep {
                    let _ = tokio::task::spawn_blocking(move || {
                        if let Err(e) = leaf.remove() {
                            tracing::debug!(error = %e, "removing an execution cgroup");
                        }
                    })
                    .await;
                    return;
                }
                tokio::time::sleep(LINGER_CHECK).await;
            }
        });
    }
}

/// Output files (base64) and the sorted list of files written by the request or during it.
fn collect_files(
    req: &RunRequest,
    mut written: Vec<String>,
    before: &HashMap<PathBuf, direct::FileStamp>,
) -> (std::collections::BTreeMap<String, String>, Vec<String>) {
    let mut files = std::collections::BTreeMap::new();
    // Output files are read beneath the request's roots (the whole sandbox without any).
    let output_roots = if req.file_roots.is_empty() {
        vec![PathBuf::from("/")]
    } else {
        roots(&req.file_roots)
    };
    for p in &req.output_paths {
        match direct::read_small(Path::new(p), &output_roots, MAX_OUTPUT_FILE) {
            Ok(Some(data)) => {
                files.insert(
                    p.clone(),
                    base64::engine::general_purpose::STANDARD.encode(data),
                );
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(path = %p, error = %e, "output file skipped"),
        }
    }
    if let Some(dir) = &req.track_changes_under {
        written.extend(direct::changed_since(Path::new(dir), before, MAX_TRACKED));
    }
    written.sort();
    written.dedup();
    (files, written)
}

async fn feed_stdin(fd: std::os::fd::OwnedFd, input: String) {
    use tokio::io::AsyncWriteExt;
    let Ok(mut tx) = tokio::net::unix::pipe::Sender::from_owned_fd(fd) else {
        return;
    };
    // A process that exits without reading closes the pipe: nothing to report.
    let _ = tx.write_all(input.as_bytes()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_errors_the_request_caused_are_refusals() {
        let refused = |m: &str| matches!(Fail::from(DirectError::Io(m.into())), Fail::Invalid(_));
        assert!(refused("/tmp/x: Is a directory (os error 21)"));
        assert!(refused("/workspace/a: File name too long (os error 36)"));
        assert!(!refused("/workspace/a: Input/output error (os error 5)"));
        assert!(!refused("no errno here"));
    }

    #[test]
    fn capture_keeps_the_cap_and_counts_the_rest() {
        let mut c = Captured::default();
        assert_eq!(c.feed(b"hello ", 8).as_deref(), Some("hello "));
        assert_eq!(c.feed(b"world", 8).as_deref(), Some("wo"));
        assert_eq!(c.total, 11);
        assert_eq!(c.text(), "hello wo");
    }

    #[test]
    fn capture_streams_whole_characters_only() {
        let mut c = Captured::default();
        let e = "é".as_bytes();
        assert_eq!(c.feed(&e[..1], 100), None);
        assert_eq!(c.feed(&e[1..], 100).as_deref(), Some("é"));
        // A cap inside a character keeps the text whole.
        let mut c = Captured::default();
        c.feed("aé".as_bytes(), 2);
        assert_eq!(c.text(), "a");
    }
}
