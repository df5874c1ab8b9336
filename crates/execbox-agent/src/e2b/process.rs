//! `process.Process` (spec §3.3): processes started through [`crate::runner::Runner`] (identity,
//! cgroup leaf, Landlock), kept in a per-agent table so that they outlive the request that started
//! them (a background command's client reads to `start` and goes; it comes back with `Connect`).
//!
//! Each process has one pump task that reads its output in chunks of at most 32 KiB and
//! publishes events on a broadcast channel; streams (`Start`, `Connect`) subscribe to it. The
//! pump never waits for a client: a stream that falls more than [`EVENT_BUFFER`] events behind
//! ends with `data_loss`. Ended processes keep only their `end` event (a `Connect` replays
//! `start` + `end`), at most [`MAX_ENDED`] of them for [`ENDED_KEPT`].

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use execbox_jail::cgroup::ExecLeaf;
use execbox_jail::process::ExitInfo;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::unix::pipe;
use tokio::sync::{broadcast, mpsc};

use super::connect::{self, de_u32, Code, RpcError};
use super::User;
use crate::runner::{Input, Output, RunSpec};
use crate::sse::{read_some, sleep_until_opt};
use crate::AppState;

/// Largest data chunk of one event.
const CHUNK: usize = 32 * 1024;
/// Events a stream may fall behind before it is cut (each up to 32 KiB as base64: the most one
/// slow stream holds is about 11 MiB of the agent's memory).
const EVENT_BUFFER: usize = 256;
/// Ended processes kept for `Connect`.
const MAX_ENDED: usize = 256;
/// How long an ended process is kept.
const ENDED_KEPT: Duration = Duration::from_secs(600);
/// Output still read after the process exited (children may hold the pipes open).
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(100);
/// How long one input write may wait for a process that does not read its stdin.
const INPUT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the cgroup leaf of an ended process is checked for what it left running.
const LEAF_SWEEP: Duration = Duration::from_secs(5);
/// Terminal size when the request gives none.
const DEFAULT_PTY: (u16, u16) = (80, 24);

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
struct ProcessConfig {
    #[serde(default)]
    cmd: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    envs: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cwd: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct PtySize {
    #[serde(default, deserialize_with = "de_u32")]
    cols: Option<u32>,
    #[serde(default, deserialize_with = "de_u32")]
    rows: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
struct Pty {
    #[serde(default)]
    size: Option<PtySize>,
}

impl Pty {
    fn size(&self) -> (u16, u16) {
        let s = self.size.as_ref();
        let clamp = |v: Option<u32>, d: u16| {
            v.filter(|v| *v > 0)
                .map_or(d, |v| v.min(u16::MAX as u32) as u16)
        };
        (
            clamp(s.and_then(|s| s.cols), DEFAULT_PTY.0),
            clamp(s.and_then(|s| s.rows), DEFAULT_PTY.1),
        )
    }
}

#[derive(Debug, Default, Deserialize)]
struct StartRequest {
    #[serde(default)]
    process: Option<ProcessConfig>,
    #[serde(default)]
    pty: Option<Pty>,
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    stdin: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
struct Selector {
    #[serde(default, deserialize_with = "de_u32")]
    pid: Option<u32>,
    #[serde(default)]
    tag: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ProcessInput {
    #[serde(default)]
    stdin: Option<String>,
    #[serde(default)]
    pty: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct SelectorRequest {
    #[serde(default)]
    process: Option<Selector>,
}

#[derive(Debug, Default, Deserialize)]
struct SendInputRequest {
    #[serde(default)]
    process: Option<Selector>,
    #[serde(default)]
    input: Option<ProcessInput>,
}

#[derive(Debug, Default, Deserialize)]
struct SendSignalRequest {
    #[serde(default)]
    process: Option<Selector>,
    #[serde(default)]
    signal: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct UpdateRequest {
    #[serde(default)]
    process: Option<Selector>,
    #[serde(default)]
    pty: Option<Pty>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamStart {
    #[serde(default)]
    process: Option<Selector>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamData {
    #[serde(default)]
    input: Option<ProcessInput>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamInputRequest {
    #[serde(default)]
    start: Option<StreamStart>,
    #[serde(default)]
    data: Option<StreamData>,
}

/// One published event, its envelope ready to send.
#[derive(Clone)]
enum Ev {
    Data(Bytes),
    End(Bytes),
}

struct ProcState {
    /// The `end` envelope, once ended.
    end: Option<Bytes>,
    ended_at: Option<Instant>,
    /// The process was killed because its `Connect-Timeout-Ms` passed.
    timed_out: bool,
}

/// A process of the table.
pub(crate) struct Proc {
    pid: u32,
    tag: Option<String>,
    config: ProcessConfig,
    pty: bool,
    /// Its stdin (or the terminal's controller), until closed.
    input: tokio::sync::Mutex<Option<pipe::Sender>>,
    /// The terminal's controller, for resizing.
    terminal: Option<OwnedFd>,
    leaf: Option<Arc<ExecLeaf>>,
    events: broadcast::Sender<Ev>,
    state: Mutex<ProcState>,
}

enum Subscription {
    Live(broadcast::Receiver<Ev>),
    Ended(Bytes),
}

impl Proc {
    fn lock(&self) -> std::sync::MutexGuard<'_, ProcState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn running(&self) -> bool {
        self.lock().end.is_none()
    }

    fn subscribe(&self) -> Subscription {
        let st = self.lock();
        match &st.end {
            Some(end) => Subscription::Ended(end.clone()),
            None => Subscription::Live(self.events.subscribe()),
        }
    }

    fn publish(&self, event: Value) {
        let _ = self
            .events
            .send(Ev::Data(connect::message(&json!({ "event": event }))));
    }

    fn finish(&self, end: Value, timed_out: bool) {
        let bytes = connect::message(&json!({ "event": { "end": end } }));
        let mut st = self.lock();
        st.end = Some(bytes.clone());
        st.ended_at = Some(Instant::now());
        st.timed_out = timed_out;
        let _ = self.events.send(Ev::End(bytes));
    }

    fn kill(&self, sig: i32) {
        let _ = execbox_jail::process::signal_group(self.pid as i32, sig);
        if sig == libc::SIGKILL {
            if let Some(leaf) = &self.leaf {
                let _ = leaf.kill_all();
            }
        }
    }

    async fn write(&self, data: &[u8]) -> Result<(), RpcError> {
        use tokio::io::AsyncWriteExt;
        let mut input = self.input.lock().await;
        let Some(w) = input.as_mut() else {
            return Err(RpcError::new(
                Code::FailedPrecondition,
                format!("stdin of process {} is not open", self.pid),
            ));
        };
        match tokio::time::timeout(INPUT_WRITE_TIMEOUT, w.write_all(data)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(RpcError::new(
                Code::FailedPrecondition,
                format!("writing to process {}: {e}", self.pid),
            )),
            Err(_) => Err(RpcError::new(
                Code::DeadlineExceeded,
                format!("process {} does not read its input", self.pid),
            )),
        }
    }
}

/// The process table of this agent.
#[derive(Default)]
pub(crate) struct Procs {
    map: Mutex<HashMap<u32, Arc<Proc>>>,
}

impl Procs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Proc>>> {
        match self.map.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn insert(&self, proc: Arc<Proc>) {
        let mut map = self.lock();
        let mut ended: Vec<(Instant, u32)> = map
            .values()
            .filter_map(|p| p.lock().ended_at.map(|t| (t, p.pid)))
            .collect();
        ended.sort();
        let over = ended.len().saturating_sub(MAX_ENDED - 1);
        for (i, (t, pid)) in ended.into_iter().enumerate() {
            if i < over || t.elapsed() > ENDED_KEPT {
                map.remove(&pid);
            }
        }
        map.insert(proc.pid, proc);
    }

    fn find(&self, sel: Option<&Selector>) -> Result<Arc<Proc>, RpcError> {
        let map = self.lock();
        let found = match sel {
            Some(Selector { pid: Some(pid), .. }) => map.get(pid).cloned(),
            Some(Selector { tag: Some(tag), .. }) => map
                .values()
                .filter(|p| p.tag.as_deref() == Some(tag.as_str()))
                .max_by_key(|p| (p.running(), p.pid))
                .cloned(),
            _ => {
                return Err(RpcError::new(
                    Code::InvalidArgument,
                    "process selector (pid or tag) is required",
                ))
            }
        };
        found.ok_or_else(|| {
            let what = match sel {
                Some(Selector { pid: Some(pid), .. }) => format!("process with pid {pid}"),
                Some(Selector { tag: Some(t), .. }) => format!("process with tag {t}"),
                _ => "process".into(),
            };
            RpcError::new(Code::NotFound, format!("{what} not found"))
        })
    }

    /// Like [`Procs::find`], but an ended process is not found (it can take no input or signal).
    fn find_running(&self, sel: Option<&Selector>) -> Result<Arc<Proc>, RpcError> {
        let p = self.find(sel)?;
        if !p.running() {
            return Err(RpcError::new(
                Code::NotFound,
                format!("process with pid {} not found (it has ended)", p.pid),
            ));
        }
        Ok(p)
    }
}

/// `POST /e2b/envd/process.Process/{method}`.
pub async fn rpc(
    State(app): State<Arc<AppState>>,
    UrlPath(method): UrlPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if method == "StreamInput" {
        return stream_input(app, &headers, body).await;
    }
    let streaming = matches!(method.as_str(), "Start" | "Connect");
    let fail = |e: RpcError| {
        if streaming {
            connect::stream_error(e)
        } else {
            e.into_response()
        }
    };
    let bytes = match axum::body::to_bytes(body, connect::MAX_MESSAGE).await {
        Ok(b) => b,
        Err(e) => {
            return fail(RpcError::new(
                Code::InvalidArgument,
                format!("reading the request: {e}"),
            ))
        }
    };
    let call = async {
        match method.as_str() {
            "Start" => start(&app, &headers, &bytes),
            "Connect" => connect_stream(&app, &headers, &bytes),
            "List" => list(&app, &headers, &bytes),
            "SendInput" => send_input(&app, &headers, &bytes).await,
            "SendSignal" => send_signal(&app, &headers, &bytes),
            "Update" => update(&app, &headers, &bytes),
            "CloseStdin" => close_stdin(&app, &headers, &bytes).await,
            other => Err(RpcError::new(
                Code::Unimplemented,
                format!("process.Process/{other} is not implemented"),
            )),
        }
    };
    // On streams the timeout is the process's lifetime or the stream's bound (handled there).
    let deadline = connect::timeout(&headers).filter(|_| !streaming);
    connect::within(deadline, call).await.unwrap_or_else(fail)
}

fn spawn_error(e: crate::runner::RunError) -> RpcError {
    match e {
        crate::runner::RunError::Cwd { .. } => RpcError::new(Code::InvalidArgument, e.to_string()),
        crate::runner::RunError::Spawn(io)
            if crate::error::is_client_fault(&io) || io.kind() == std::io::ErrorKind::NotFound =>
        {
            RpcError::new(
                Code::InvalidArgument,
                format!("error starting process: {io}"),
            )
        }
        other => RpcError::new(Code::Internal, format!("error starting process: {other}")),
    }
}

fn start(app: &Arc<AppState>, headers: &HeaderMap, body: &[u8]) -> Result<Response, RpcError> {
    let req: StartRequest = connect::decode_request(headers, body)?;
    let user = User::of_rpc(app, headers)?;
    let config = req
        .process
        .ok_or_else(|| RpcError::new(Code::InvalidArgument, "process is required"))?;
    if config.cmd.is_empty() {
        return Err(RpcError::new(
            Code::InvalidArgument,
            "process.cmd is required",
        ));
    }
    let cwd = match config.cwd.as_deref().filter(|c| !c.is_empty()) {
        Some(c) => user.path(c)?,
        // The sandbox's default workdir for every user, as envd's `defaults.Workdir`.
        None => crate::paths::default_cwd(),
    };
    if !crate::files::is_dir(&cwd) {
        return Err(RpcError::new(
            Code::InvalidArgument,
            format!(
                "cwd '{}' does not exist or is not a directory",
                cwd.display()
            ),
        ));
    }
    let env = user.env(config.envs.clone());
    let pairs: Vec<(&String, &String)> = env.iter().map(|(k, v)| (k, v)).collect();
    if let Some((k, why)) = execbox_proto::limits::env_too_large(pairs) {
        return Err(RpcError::new(
            Code::InvalidArgument,
            format!("envs.{k}: {why}"),
        ));
    }
    let argv: Vec<String> = std::iter::once(config.cmd.clone())
        .chain(config.args.iter().cloned())
        .collect();
    let spec = |output, input, controlling_tty| RunSpec {
        argv: argv.clone(),
        cwd: &cwd,
        extra_env: env.clone(),
        creds: Some(user.creds),
        groups: user.groups.clone(),
        output,
        input,
        controlling_tty,
        inherit_fds: Vec::new(),
    };
    let io =
        |e: std::io::Error| RpcError::new(Code::Internal, format!("setting up the process: {e}"));
    let (started, input, terminal, out, err) = match &req.pty {
        Some(pty) => {
            let (cols, rows) = pty.size();
            let pair = execbox_jail::pty::open(cols, rows).map_err(io)?;
            execbox_jail::pty::set_nonblocking(&pair.controller).map_err(io)?;
            let writer = pair.controller.try_clone().map_err(io)?;
            let resizer = pair.controller.try_clone().map_err(io)?;
            let reader = pipe::Receiver::from_owned_fd_unchecked(pair.controller).map_err(io)?;
            let writer = pipe::Sender::from_owned_fd_unchecked(writer).map_err(io)?;
            let tout = pair.terminal.try_clone().map_err(io)?;
            let terr = pair.terminal.try_clone().map_err(io)?;
            let started = app
                .runner
                .start(spec(
                    Output::Fds {
                        stdout: tout,
                        stderr: terr,
                    },
                    Input::Fd(pair.terminal),
                    true,
                ))
                .map_err(spawn_error)?;
            (started, Some(writer), Some(resizer), Some(reader), None)
        }
        None => {
            let stdin = req.stdin.unwrap_or(true);
            let mut started = app
                .runner
                .start(spec(
                    Output::Pipes,
                    if stdin { Input::Pipe } else { Input::Null },
                    false,
                ))
                .map_err(spawn_error)?;
            let input = started
                .stdin
                .take()
                .and_then(|fd| pipe::Sender::from_owned_fd(fd).ok());
            let out = crate::sse::pipe_reader(started.stdout.take());
            let err = crate::sse::pipe_reader(started.stderr.take());
            (started, input, None, out, err)
        }
    };
    let pid = started.pid as u32;
    let (events, rx) = broadcast::channel(EVENT_BUFFER);
    let proc = Arc::new(Proc {
        pid,
        tag: req.tag.filter(|t| !t.is_empty()),
        config,
        pty: req.pty.is_some(),
        input: tokio::sync::Mutex::new(input),
        terminal,
        leaf: started.leaf.map(Arc::new),
        events,
        state: Mutex::new(ProcState {
            end: None,
            ended_at: None,
            timed_out: false,
        }),
    });
    app.e2b.procs.insert(proc.clone());
    tracing::info!(pid, user = %user.name, pty = proc.pty, "e2b process started");
    let lifetime = connect::timeout(headers).map(|t| Instant::now() + t);
    tokio::spawn(pump(proc.clone(), out, err, started.exit, lifetime));
    Ok(forward(
        proc,
        Subscription::Live(rx),
        connect::keepalive(headers),
        None,
        true,
    ))
}

/// Reads the process's output into events until it has exited and its pipes are drained (or
/// held open past [`DRAIN_AFTER_EXIT`] by children), then publishes `end`.
async fn pump(
    proc: Arc<Proc>,
    mut out: Option<pipe::Receiver>,
    mut err: Option<pipe::Receiver>,
    mut exit: tokio::sync::oneshot::Receiver<ExitInfo>,
    lifetime: Option<Instant>,
) {
    let out_kind = if proc.pty { "pty" } else { "stdout" };
    let mut ob = vec![0u8; CHUNK];
    let mut eb = vec![0u8; CHUNK];
    let mut status: Option<Option<ExitInfo>> = None;
    let mut timed_out = false;
    let mut drain_until: Option<Instant> = None;
    loop {
        if out.is_none() && err.is_none() && status.is_some() {
            break;
        }
        tokio::select! {
            n = read_some(&mut out, &mut ob) => match n {
                Some(n) => proc.publish(json!({ "data": { out_kind: connect::encode_bytes(&ob[..n]) } })),
                None => out = None,
            },
            n = read_some(&mut err, &mut eb) => match n {
                Some(n) => proc.publish(json!({ "data": { "stderr": connect::encode_bytes(&eb[..n]) } })),
                None => err = None,
            },
            r = &mut exit, if status.is_none() => {
                status = Some(r.ok());
                drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
            },
            _ = sleep_until_opt(lifetime), if status.is_none() && !timed_out => {
                timed_out = true;
                proc.kill(libc::SIGKILL);
            },
            _ = sleep_until_opt(drain_until) => break,
        }
    }
    // The input side goes with the process.
    proc.input.lock().await.take();
    proc.finish(end_event(status.flatten()), timed_out);
    tracing::info!(pid = proc.pid, "e2b process ended");
    // What it left running in the background (`cmd &`) lives on, as under envd: its cgroup leaf
    // is removed once empty, looked at every [`LEAF_SWEEP`]. `SendSignal` SIGKILL and a passed
    // lifetime kill the whole leaf.
    if let Some(leaf) = proc.leaf.clone() {
        tokio::spawn(async move {
            loop {
                let l = leaf.clone();
                let removed = tokio::task::spawn_blocking(move || {
                    match l.pids() {
                        Ok(p) if p.is_empty() => l.remove().is_ok(),
                        Ok(_) => false,
                        // Gone already, or unreadable: nothing more to do.
                        Err(_) => true,
                    }
                })
                .await
                .unwrap_or(true);
                if removed {
                    return;
                }
                tokio::time::sleep(LEAF_SWEEP).await;
            }
        });
    }
}

/// The `end` event of a process, as envd words it (Go's `ProcessState`).
fn end_event(exit: Option<ExitInfo>) -> Value {
    match exit {
        Some(ExitInfo::Code(0)) => json!({ "exited": true, "status": "exit status 0" }),
        Some(ExitInfo::Code(c)) => {
            let s = format!("exit status {c}");
            json!({ "exitCode": c, "exited": true, "status": s, "error": s })
        }
        Some(ExitInfo::Signal(sig)) => {
            let s = format!("signal: {}", crate::command::go_signal_name(sig));
            json!({ "exitCode": -1, "exited": false, "status": s, "error": s })
        }
        None => json!({
            "exitCode": -1, "exited": false, "status": "signal: killed", "error": "signal: killed"
        }),
    }
}

/// A stream of the process's events: `start` first, then what `sub` brings, keepalives after
/// `keepalive` of silence, until `end`; `stream_deadline` bounds the stream only. With
/// `report_timeout`, a process killed for its lifetime ends the stream with `deadline_exceeded`.
fn forward(
    proc: Arc<Proc>,
    sub: Subscription,
    keepalive: Duration,
    stream_deadline: Option<Instant>,
    report_timeout: bool,
) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let start = connect::message(&json!({ "event": { "start": { "pid": proc.pid } } }));
        if tx.send(start).await.is_err() {
            return;
        }
        let mut ended = false;
        match sub {
            Subscription::Ended(end) => {
                if tx.send(end).await.is_err() {
                    return;
                }
                ended = true;
            }
            Subscription::Live(mut events) => loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Ok(Ev::Data(b)) => {
                            if tx.send(b).await.is_err() {
                                return;
                            }
                        }
                        Ok(Ev::End(b)) => {
                            if tx.send(b).await.is_err() {
                                return;
                            }
                            ended = true;
                            break;
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let e = RpcError::new(
                                Code::DataLoss,
                                format!("the client fell {n} events behind the process's output"),
                            );
                            let _ = tx.send(connect::end_stream(Some(&e))).await;
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                    _ = tokio::time::sleep(keepalive) => {
                        let k = connect::message(&json!({ "event": { "keepalive": {} } }));
                        if tx.send(k).await.is_err() {
                            return;
                        }
                    }
                    _ = sleep_until_opt(stream_deadline) => {
                        let e = RpcError::new(Code::DeadlineExceeded, "the stream's deadline passed");
                        let _ = tx.send(connect::end_stream(Some(&e))).await;
                        return;
                    }
                    _ = tx.closed() => return,
                }
            },
        }
        let error = (ended && report_timeout && proc.lock().timed_out).then(|| {
            RpcError::new(
                Code::DeadlineExceeded,
                "the process was killed: its Connect-Timeout-Ms passed",
            )
        });
        let _ = tx.send(connect::end_stream(error.as_ref())).await;
    });
    connect::stream_response(rx)
}

fn connect_stream(
    app: &Arc<AppState>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, RpcError> {
    let req: SelectorRequest = connect::decode_request(headers, body)?;
    User::of_rpc(app, headers)?;
    let proc = app.e2b.procs.find(req.process.as_ref())?;
    let sub = proc.subscribe();
    let deadline = connect::timeout(headers).map(|t| Instant::now() + t);
    Ok(forward(
        proc,
        sub,
        connect::keepalive(headers),
        deadline,
        false,
    ))
}

fn list(app: &Arc<AppState>, headers: &HeaderMap, body: &[u8]) -> Result<Response, RpcError> {
    let _: Value = connect::decode_request(headers, body)?;
    let mut procs: Vec<Arc<Proc>> = app
        .e2b
        .procs
        .lock()
        .values()
        .filter(|p| p.running())
        .cloned()
        .collect();
    procs.sort_by_key(|p| p.pid);
    let items: Vec<Value> = procs
        .iter()
        .map(|p| {
            let mut v = json!({ "config": p.config, "pid": p.pid });
            if let Some(tag) = &p.tag {
                v["tag"] = json!(tag);
            }
            v
        })
        .collect();
    Ok(connect::unary(json!({ "processes": items })))
}

fn input_bytes(input: Option<&ProcessInput>) -> Result<Vec<u8>, RpcError> {
    match input {
        Some(ProcessInput { stdin: Some(s), .. }) | Some(ProcessInput { pty: Some(s), .. }) => {
            connect::decode_bytes(s)
        }
        _ => Err(RpcError::new(
            Code::InvalidArgument,
            "input (stdin or pty) is required",
        )),
    }
}

async fn send_input(
    app: &Arc<AppState>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, RpcError> {
    let req: SendInputRequest = connect::decode_request(headers, body)?;
    User::of_rpc(app, headers)?;
    let proc = app.e2b.procs.find_running(req.process.as_ref())?;
    let data = input_bytes(req.input.as_ref())?;
    proc.write(&data).await?;
    Ok(connect::unary(json!({})))
}

/// `StreamInput`: a client stream of `{start:{process}}`, then `{data:{input}}` and
/// `{keepalive:{}}` messages, written in order; answered with one `{}` and the end of stream.
async fn stream_input(app: Arc<AppState>, headers: &HeaderMap, body: Body) -> Response {
    let result = async {
        connect::check_codec(headers)?;
        User::of_rpc(&app, headers)?;
        let mut stream = body.into_data_stream();
        let mut buf = Vec::new();
        let mut target: Option<Arc<Proc>> = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                RpcError::new(Code::Canceled, format!("reading the input stream: {e}"))
            })?;
            buf.extend_from_slice(&chunk);
            for (flags, payload) in connect::take_envelopes(&mut buf)? {
                if flags & connect::FLAG_END_STREAM != 0 {
                    continue;
                }
                let msg: StreamInputRequest = connect::decode_message(&payload)?;
                if let Some(start) = msg.start {
                    target = Some(app.e2b.procs.find_running(start.process.as_ref())?);
                } else if let Some(data) = msg.data {
                    let proc = target.as_ref().ok_or_else(|| {
                        RpcError::new(Code::FailedPrecondition, "the first message must be start")
                    })?;
                    proc.write(&input_bytes(data.input.as_ref())?).await?;
                }
            }
        }
        if !buf.is_empty() {
            return Err(RpcError::new(
                Code::InvalidArgument,
                "the input stream ended inside a message",
            ));
        }
        Ok(())
    }
    .await;
    let (tx, rx) = mpsc::channel(2);
    match result {
        Ok(()) => {
            let _ = tx.try_send(connect::message(&json!({})));
            let _ = tx.try_send(connect::end_stream(None));
        }
        Err(e) => {
            let _ = tx.try_send(connect::end_stream(Some(&e)));
        }
    }
    connect::stream_response(rx)
}

fn parse_signal(v: Option<&Value>) -> Result<i32, RpcError> {
    match v {
        Some(Value::String(s)) if s == "SIGNAL_SIGKILL" => Ok(libc::SIGKILL),
        Some(Value::String(s)) if s == "SIGNAL_SIGTERM" => Ok(libc::SIGTERM),
        Some(Value::Number(n)) if n.as_i64() == Some(9) => Ok(libc::SIGKILL),
        Some(Value::Number(n)) if n.as_i64() == Some(15) => Ok(libc::SIGTERM),
        other => Err(RpcError::new(
            Code::InvalidArgument,
            format!("unsupported signal {other:?}: use SIGNAL_SIGKILL or SIGNAL_SIGTERM"),
        )),
    }
}

fn send_signal(
    app: &Arc<AppState>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, RpcError> {
    let req: SendSignalRequest = connect::decode_request(headers, body)?;
    User::of_rpc(app, headers)?;
    let sig = parse_signal(req.signal.as_ref())?;
    let proc = app.e2b.procs.find_running(req.process.as_ref())?;
    proc.kill(sig);
    Ok(connect::unary(json!({})))
}

fn update(app: &Arc<AppState>, headers: &HeaderMap, body: &[u8]) -> Result<Response, RpcError> {
    let req: UpdateRequest = connect::decode_request(headers, body)?;
    User::of_rpc(app, headers)?;
    let proc = app.e2b.procs.find_running(req.process.as_ref())?;
    if let Some(pty) = &req.pty {
        let Some(terminal) = &proc.terminal else {
            return Err(RpcError::new(
                Code::FailedPrecondition,
                format!("process {} has no terminal", proc.pid),
            ));
        };
        let (cols, rows) = pty.size();
        execbox_jail::pty::resize(terminal, cols, rows)
            .map_err(|e| RpcError::new(Code::Internal, format!("resizing the terminal: {e}")))?;
    }
    Ok(connect::unary(json!({})))
}

async fn close_stdin(
    app: &Arc<AppState>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, RpcError> {
    let req: SelectorRequest = connect::decode_request(headers, body)?;
    User::of_rpc(app, headers)?;
    let proc = app.e2b.procs.find_running(req.process.as_ref())?;
    if proc.pty {
        return Err(RpcError::new(
            Code::FailedPrecondition,
            "a terminal has no stdin to close: send EOT (Ctrl-D) as input",
        ));
    }
    proc.input.lock().await.take();
    Ok(connect::unary(json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_events_word_exits_as_envd() {
        assert_eq!(
            end_event(Some(ExitInfo::Code(0))),
            json!({"exited": true, "status": "exit status 0"})
        );
        assert_eq!(
            end_event(Some(ExitInfo::Code(3))),
            json!({"exitCode": 3, "exited": true, "status": "exit status 3", "error": "exit status 3"})
        );
        assert_eq!(
            end_event(Some(ExitInfo::Signal(libc::SIGKILL))),
            json!({"exitCode": -1, "exited": false, "status": "signal: killed", "error": "signal: killed"})
        );
    }

    #[test]
    fn requests_parse_as_the_sdks_send_them() {
        let r: StartRequest = serde_json::from_str(
            r#"{"process":{"cmd":"/bin/bash","args":["-l","-c","echo hi"],"envs":{"B":"2"},"cwd":"/tmp"},"stdin":false}"#,
        )
        .unwrap();
        let p = r.process.unwrap();
        assert_eq!(p.args, ["-l", "-c", "echo hi"]);
        assert_eq!(p.envs["B"], "2");
        assert_eq!(r.stdin, Some(false));
        let r: StartRequest = serde_json::from_str(
            r#"{"process":{"cmd":"/bin/bash","args":["-i","-l"]},"pty":{"size":{"cols":120,"rows":"40"}}}"#,
        )
        .unwrap();
        assert_eq!(r.pty.unwrap().size(), (120, 40));
        let r: SendSignalRequest =
            serde_json::from_str(r#"{"process":{"pid":"12"},"signal":"SIGNAL_SIGKILL"}"#).unwrap();
        assert_eq!(r.process.unwrap().pid, Some(12));
        assert_eq!(parse_signal(r.signal.as_ref()).unwrap(), libc::SIGKILL);
        assert!(parse_signal(Some(&json!("SIGNAL_SIGHUP"))).is_err());
        let r: SendInputRequest =
            serde_json::from_str(r#"{"process":{"tag":"t"},"input":{"pty":"aGk="}}"#).unwrap();
        assert_eq!(input_bytes(r.input.as_ref()).unwrap(), b"hi");
    }
}
