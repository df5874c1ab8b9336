//! `/pty`: interactive shells over a WebSocket (§11 of the execd spec).
//!
//! `POST /pty` registers a session; its process starts on the first WebSocket attach, on a
//! real pseudo-terminal (default) or on plain pipes with stderr kept apart (`pty=0`).
//!
//! Flow of output: one supervisor task per session always drains the process's output into a
//! 1 MiB ring buffer, whether or not a client is attached, so the process never blocks because
//! nobody reads. The attached client (at most one) receives the same bytes through a
//! byte-bounded queue; a client that falls too far behind is disconnected instead of slowing
//! the session down, and catches up by reconnecting with `since=<offset>` (replay frame).
//! Every write to a client has a deadline, so a vanished client never holds anything.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use execbox_jail::cgroup::ExecLeaf;
use execbox_jail::process::ExitInfo;
use execbox_proto::execd::codes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::error::ApiError;
use crate::runner::{Input, Output, RunSpec};
use crate::AppState;

/// Size of each session's replay buffer.
const RING_BYTES: usize = 1 << 20;
/// Most sessions kept at once; beyond it the oldest finished session is dropped, and when
/// none has finished creation fails.
const MAX_SESSIONS: usize = 64;
/// Most output bytes queued for one client; a client further behind is disconnected.
const CLIENT_QUEUE_BYTES: usize = 1 << 20;
/// Most stdin bytes taken from a client and not yet accepted by the process; past it the
/// client's messages are not read (backpressure through the WebSocket) until it drains.
const STDIN_PENDING_BYTES: usize = 64 * 1024;
/// Largest message accepted from a client (keystrokes and pastes; control messages are tiny).
const MAX_CLIENT_MESSAGE: usize = 1 << 20;
/// Largest read from the process's output.
const READ_CHUNK: usize = 32 * 1024;
/// Initial terminal size.
const DEFAULT_COLS: u16 = 80;
const DEFAULT_ROWS: u16 = 24;
/// WebSocket ping interval.
const PING_EVERY: Duration = Duration::from_secs(30);
/// A client that sends nothing (not even a pong) for this long is dropped.
const READ_DEADLINE: Duration = Duration::from_secs(60);
/// Longest wait for one frame to be accepted by a client.
const WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// Longest wait for the close frame to an evicted client: it may well be the stalled one.
const EVICT_CLOSE_DEADLINE: Duration = Duration::from_millis(200);
/// How long the client may take to answer our close frame after the exit frame. Waiting
/// for it (instead of dropping the connection at once) keeps the last frames from being
/// lost to a TCP reset when the client had sent something concurrently.
const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(2);
/// After the main process exits, how long output is still collected before whatever still
/// holds the terminal or pipes open (background jobs) is killed.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(100);
/// After that kill, how long the last output may take to arrive.
const DRAIN_AFTER_KILL: Duration = Duration::from_millis(500);

/// Binary frame type bytes.
const FRAME_STDIN: u8 = 0x00;
const FRAME_STDOUT: u8 = 0x01;
const FRAME_STDERR: u8 = 0x02;
const FRAME_REPLAY: u8 = 0x03;

/// WebSocket error codes (the `code` of `{"type":"error"}` frames).
const SESSION_GONE: &str = "SESSION_GONE";
const START_FAILED: &str = "START_FAILED";
const STDIN_WRITE_FAILED: &str = "STDIN_WRITE_FAILED";
const INVALID_FRAME: &str = "INVALID_FRAME";
const TAKEN_OVER: &str = "TAKEN_OVER";
/// Close code sent to a holder evicted by a takeover.
const CLOSE_TAKEN_OVER: u16 = 4001;
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_INTERNAL: u16 = 1011;
/// "Try again later": the client could not keep up and may reconnect with `since`.
const CLOSE_TRY_AGAIN: u16 = 1013;

// ---------------------------------------------------------------------------------------
// Ring buffer and frames
// ---------------------------------------------------------------------------------------

/// The last `cap` bytes of a stream plus the count of all bytes ever written. The byte at
/// absolute offset `o` (if still kept) is at `buf[o % cap]`; the buffer grows to `cap` only
/// as output arrives, so an idle session costs little.
struct Ring {
    buf: Vec<u8>,
    cap: usize,
    total: u64,
}

impl Ring {
    fn new(cap: usize) -> Self {
        Self {
            buf: Vec::new(),
            cap: cap.max(1),
            total: 0,
        }
    }

    /// Bytes ever written (the next byte's offset).
    fn total(&self) -> u64 {
        self.total
    }

    fn write(&mut self, data: &[u8]) {
        let cap = self.cap;
        // Only the last `cap` bytes of an oversized write can be kept.
        let data = if data.len() > cap {
            self.total += (data.len() - cap) as u64;
            &data[data.len() - cap..]
        } else {
            data
        };
        if self.buf.len() < cap {
            // Still growing: `buf.len() == total` until the first wrap.
            if self.total + data.len() as u64 <= cap as u64 && self.buf.len() as u64 == self.total {
                self.buf.extend_from_slice(data);
                self.total += data.len() as u64;
                return;
            }
            self.buf.resize(cap, 0);
        }
        let start = (self.total % cap as u64) as usize;
        let first = (cap - start).min(data.len());
        self.buf[start..start + first].copy_from_slice(&data[..first]);
        let rest = data.len() - first;
        self.buf[..rest].copy_from_slice(&data[first..]);
        self.total += data.len() as u64;
    }

    /// Bytes from absolute offset `since` to the end, clamped to what is still kept; returns
    /// the offset of the first returned byte (the total when nothing is returned).
    fn read_from(&self, since: u64) -> (u64, Vec<u8>) {
        let oldest = self.total.saturating_sub(self.cap as u64);
        let start = since.max(oldest);
        if start >= self.total {
            return (self.total, Vec::new());
        }
        let count = (self.total - start) as usize;
        let pos = (start % self.cap as u64) as usize;
        let mut out = Vec::with_capacity(count);
        let first = (self.buf.len() - pos).min(count);
        out.extend_from_slice(&self.buf[pos..pos + first]);
        out.extend_from_slice(&self.buf[..count - first]);
        (start, out)
    }
}

/// A binary output frame: type byte then the bytes.
fn output_frame(kind: u8, data: &[u8]) -> Bytes {
    let mut f = Vec::with_capacity(1 + data.len());
    f.push(kind);
    f.extend_from_slice(data);
    Bytes::from(f)
}

/// The replay frame: `0x03`, the big-endian offset of the first byte, the bytes.
fn replay_frame(offset: u64, data: &[u8]) -> Bytes {
    let mut f = Vec::with_capacity(9 + data.len());
    f.push(FRAME_REPLAY);
    f.extend_from_slice(&offset.to_be_bytes());
    f.extend_from_slice(data);
    Bytes::from(f)
}

/// The stdin bytes of a binary client frame (`0x00` + bytes). An empty frame carries nothing.
fn decode_client_binary(frame: &[u8]) -> Result<&[u8], String> {
    match frame.split_first() {
        None => Ok(&[]),
        Some((&FRAME_STDIN, data)) => Ok(data),
        Some((t, _)) => Err(format!("unknown binary frame type 0x{t:02x}")),
    }
}

/// Text frames from the client. Parsed leniently (one struct, optional fields), as upstream.
#[derive(Debug, Default, Deserialize)]
struct ClientFrame {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    cols: Option<i64>,
    #[serde(default)]
    rows: Option<i64>,
    #[serde(default)]
    signal: Option<String>,
}

/// Text frames to the client.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ServerFrame<'a> {
    Connected {
        session_id: &'a str,
        mode: &'static str,
    },
    Exit {
        exit_code: i32,
    },
    Pong,
    Error {
        error: String,
        code: &'static str,
    },
}

impl ServerFrame<'_> {
    fn message(&self) -> Message {
        // Serializing these plain structs cannot fail; an empty object is a harmless fallback.
        Message::Text(
            serde_json::to_string(self)
                .unwrap_or_else(|_| "{}".into())
                .into(),
        )
    }

    fn error(code: &'static str, error: impl Into<String>) -> Message {
        ServerFrame::Error {
            error: error.into(),
            code,
        }
        .message()
    }
}

fn parse_signal(name: &str) -> Option<i32> {
    Some(match name {
        "SIGINT" => libc::SIGINT,
        "SIGTERM" => libc::SIGTERM,
        "SIGKILL" => libc::SIGKILL,
        "SIGQUIT" => libc::SIGQUIT,
        "SIGHUP" => libc::SIGHUP,
        _ => return None,
    })
}

/// Exit code reported in the exit frame: the code, or -1 after death by a signal (as
/// upstream, and as the command API).
fn exit_code(info: Option<ExitInfo>) -> i32 {
    match info {
        Some(ExitInfo::Code(c)) => c,
        Some(ExitInfo::Signal(_)) | None => -1,
    }
}

// ---------------------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Pty,
    Pipe,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Pty => "pty",
            Mode::Pipe => "pipe",
        }
    }
}

/// Writes some of `buf` to the process's input (the terminal controller or the stdin
/// pipe), waiting until it can take at least one byte. Cancel-safe: either nothing or the
/// returned count was written.
async fn write_some(stdin: &pipe::Sender, buf: &[u8]) -> std::io::Result<usize> {
    loop {
        stdin.writable().await?;
        match stdin.try_write(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Reads one chunk of output; `None` at the end. The controller of a terminal whose every
/// user has closed it reports EIO: that is the terminal's end of file.
async fn read_opt(r: &mut Option<pipe::Receiver>, buf: &mut [u8]) -> Option<usize> {
    use tokio::io::AsyncReadExt;
    let Some(r) = r else {
        return std::future::pending().await;
    };
    match r.read(buf).await {
        Ok(0) => None,
        Ok(n) => Some(n),
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Some(0),
        Err(e) => {
            if e.raw_os_error() != Some(libc::EIO) {
                tracing::debug!(error = %e, "pty output read failed");
            }
            None
        }
    }
}

/// The running process of a session.
struct Proc {
    pid: i32,
    mode: Mode,
    /// The process's input: a second descriptor of the terminal controller, or the pipe.
    stdin: Arc<pipe::Sender>,
}

enum Phase {
    /// Created, waiting for the first attach.
    Idle,
    Running(Proc),
    Exited(i32),
}

/// What a client receives from the session, in order.
enum Out {
    /// A ready binary frame.
    Data(Bytes),
    /// The process exited with this code; nothing follows.
    Exit(i32),
}

/// Why the session let go of a client.
#[derive(Debug, Clone, Copy)]
enum Kick {
    TakenOver,
    TooSlow,
}

/// The attached client, as the session sees it.
struct Holder {
    id: u64,
    tx: mpsc::UnboundedSender<Out>,
    /// Bytes sent into `tx` and not yet taken out: the queue is unbounded as a channel (the
    /// session never waits) but bounded by this count.
    queued: Arc<AtomicUsize>,
    kick: oneshot::Sender<Kick>,
}

impl Holder {
    fn kick(self, why: Kick) {
        let _ = self.kick.send(why);
    }
}

struct SessionState {
    phase: Phase,
    mode: Mode,
    ring: Ring,
    holder: Option<Holder>,
    next_holder: u64,
    /// Deleted: no new attach.
    removed: bool,
}

struct Session {
    id: String,
    cwd: PathBuf,
    command: Option<String>,
    /// Creation order, to find the oldest finished session.
    seq: u64,
    state: Mutex<SessionState>,
}

/// An error reported to a WebSocket client before it is closed.
struct WsError {
    code: &'static str,
    message: String,
    close: u16,
}

/// What a newly attached client needs.
struct Attachment {
    holder_id: u64,
    rx: mpsc::UnboundedReceiver<Out>,
    queued: Arc<AtomicUsize>,
    /// Fires when the session lets go of this client.
    kick: Option<oneshot::Receiver<Kick>>,
    /// Offset and bytes of the replay, when there is something to replay.
    replay: Option<(u64, Vec<u8>)>,
    mode: Mode,
    stdin: Option<Arc<pipe::Sender>>,
}

#[derive(Debug, Clone, Copy)]
struct AttachOptions {
    pipe_mode: bool,
    since: u64,
    takeover: bool,
}

impl Session {
    fn lock(&self) -> MutexGuard<'_, SessionState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn has_holder(&self) -> bool {
        self.lock().holder.is_some()
    }

    /// Appends output to the ring buffer and forwards it to the client, if any. Never waits:
    /// a client whose queue is full is let go.
    fn push(&self, kind: u8, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let mut st = self.lock();
        st.ring.write(data);
        let Some(h) = st.holder.as_ref() else {
            return;
        };
        let frame = output_frame(kind, data);
        let len = frame.len();
        if h.queued.load(Ordering::Relaxed) + len > CLIENT_QUEUE_BYTES {
            tracing::warn!(session = %self.id, "pty client cannot keep up, disconnecting it");
            if let Some(h) = st.holder.take() {
                h.kick(Kick::TooSlow);
            }
            return;
        }
        h.queued.fetch_add(len, Ordering::Relaxed);
        if h.tx.send(Out::Data(frame)).is_err() {
            // The client's task has ended.
            st.holder = None;
        }
    }

    /// Records the exit (after all output was pushed) and tells the client.
    fn finish(&self, code: i32) {
        let mut st = self.lock();
        st.phase = Phase::Exited(code);
        // The exit frame is the client's last: from now on the session is free for others
        // (the channel still delivers what was queued).
        if let Some(h) = st.holder.take() {
            let _ = h.tx.send(Out::Exit(code));
        }
        tracing::info!(session = %self.id, exit_code = code, "pty process exited");
    }

    /// Registers a new client, evicting the current one on takeover and starting the process
    /// on the first attach; the replay snapshot and the registration happen under one lock,
    /// so every byte reaches the client exactly once.
    fn attach(
        self: &Arc<Self>,
        app: &AppState,
        opts: AttachOptions,
    ) -> Result<Attachment, WsError> {
        let mut st = self.lock();
        if st.removed {
            return Err(WsError {
                code: SESSION_GONE,
                message: format!("pty session {} was deleted", self.id),
                close: CLOSE_GOING_AWAY,
            });
        }
        if st.holder.is_some() {
            if !opts.takeover {
                return Err(WsError {
                    code: codes::ALREADY_CONNECTED,
                    message: format!(
                        "another client is already connected to pty session {}",
                        self.id
                    ),
                    close: CLOSE_POLICY,
                });
            }
            if let Some(old) = st.holder.take() {
                tracing::info!(session = %self.id, "pty client taken over");
                old.kick(Kick::TakenOver);
            }
        }
        if matches!(st.phase, Phase::Idle) {
            let mode = if opts.pipe_mode {
                Mode::Pipe
            } else {
                Mode::Pty
            };
            let proc = self.start(app, mode).map_err(|e| {
                tracing::warn!(session = %self.id, error = %e, "pty process failed to start");
                WsError {
                    code: START_FAILED,
                    message: e,
                    close: CLOSE_INTERNAL,
                }
            })?;
            st.mode = mode;
            st.phase = Phase::Running(proc);
        }
        let (offset, bytes) = st.ring.read_from(opts.since);
        let (tx, rx) = mpsc::unbounded_channel();
        let (kick_tx, kick_rx) = oneshot::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        st.next_holder += 1;
        let holder_id = st.next_holder;
        if let Phase::Exited(code) = st.phase {
            // Nothing to hold: the client gets the replay and the exit, then is closed.
            let _ = tx.send(Out::Exit(code));
        } else {
            st.holder = Some(Holder {
                id: holder_id,
                tx,
                queued: queued.clone(),
                kick: kick_tx,
            });
        }
        Ok(Attachment {
            holder_id,
            rx,
            queued,
            kick: Some(kick_rx),
            replay: (!bytes.is_empty()).then_some((offset, bytes)),
            mode: st.mode,
            stdin: match &st.phase {
                Phase::Running(p) => Some(p.stdin.clone()),
                _ => None,
            },
        })
    }

    /// Unregisters client `holder_id` (unless a newer client took its place).
    fn detach(&self, holder_id: u64) {
        let mut st = self.lock();
        if st.holder.as_ref().is_some_and(|h| h.id == holder_id) {
            st.holder = None;
        }
    }

    /// Starts the process and its supervisor task.
    fn start(self: &Arc<Self>, app: &AppState, mode: Mode) -> Result<Proc, String> {
        let argv = shell_argv(self.command.as_deref());
        let extra_env = vec![("TERM".to_string(), "xterm-256color".to_string())];
        let (started, stdin, primary, stderr) = match mode {
            Mode::Pty => {
                let fail = |e: std::io::Error| format!("setting up a pseudo-terminal: {e}");
                let pair = execbox_jail::pty::open(DEFAULT_COLS, DEFAULT_ROWS).map_err(fail)?;
                execbox_jail::pty::set_nonblocking(&pair.controller).map_err(fail)?;
                // The controller is read and written from different tasks: one descriptor
                // for each direction (same open file, so both are non-blocking). tokio's
                // pipe types poll any such descriptor; the terminal behaves like a pipe pair.
                let writer = pair.controller.try_clone().map_err(fail)?;
                let reader =
                    pipe::Receiver::from_owned_fd_unchecked(pair.controller).map_err(fail)?;
                let writer = pipe::Sender::from_owned_fd_unchecked(writer).map_err(fail)?;
                let out = pair.terminal.try_clone().map_err(fail)?;
                let err = pair.terminal.try_clone().map_err(fail)?;
                // The terminal side goes to the child only: were the agent to keep a copy,
                // the controller would never report the end of output.
                let started = app
                    .runner
                    .start(RunSpec {
                        argv,
                        cwd: &self.cwd,
                        extra_env,
                        creds: None,
                        groups: Vec::new(),
                        output: Output::Fds {
                            stdout: out,
                            stderr: err,
                        },
                        input: Input::Fd(pair.terminal),
                        controlling_tty: true,
                        inherit_fds: Vec::new(),
                    })
                    .map_err(|e| e.to_string())?;
                (started, writer, Some(reader), None)
            }
            Mode::Pipe => {
                let mut started = app
                    .runner
                    .start(RunSpec {
                        argv,
                        cwd: &self.cwd,
                        extra_env,
                        creds: None,
                        groups: Vec::new(),
                        output: Output::Pipes,
                        input: Input::Pipe,
                        controlling_tty: false,
                        inherit_fds: Vec::new(),
                    })
                    .map_err(|e| e.to_string())?;
                let pipes = (|| -> std::io::Result<_> {
                    let missing = || std::io::Error::other("pipe missing");
                    let stdin = started.stdin.take().ok_or_else(missing)?;
                    let out = started.stdout.take().ok_or_else(missing)?;
                    let err = started.stderr.take().ok_or_else(missing)?;
                    Ok((
                        pipe::Sender::from_owned_fd(stdin)?,
                        pipe::Receiver::from_owned_fd(out)?,
                        pipe::Receiver::from_owned_fd(err)?,
                    ))
                })();
                match pipes {
                    Ok((stdin, out, err)) => (started, stdin, Some(out), Some(err)),
                    Err(e) => {
                        // The process already runs: it must not be left behind.
                        let _ = execbox_jail::process::signal_group(started.pid, libc::SIGKILL);
                        if let Some(leaf) = started.leaf {
                            tokio::task::spawn_blocking(move || leaf.remove());
                        }
                        return Err(format!("process pipes: {e}"));
                    }
                }
            }
        };
        let leaf = started.leaf.map(Arc::new);
        tracing::info!(
            session = %self.id,
            pid = started.pid,
            mode = mode.name(),
            "pty process started"
        );
        tokio::spawn(supervise(
            self.clone(),
            primary,
            stderr,
            started.exit,
            started.pid,
            leaf,
        ));
        Ok(Proc {
            pid: started.pid,
            mode,
            stdin: Arc::new(stdin),
        })
    }

    /// Signals the session. On a terminal the signal goes to the foreground job as well as to
    /// the shell's own group: an interactive shell runs each job in its own group, so the
    /// shell's group alone would never reach the command being interrupted, while the shell
    /// itself ignores SIGINT/SIGQUIT/SIGTERM as a shell at a terminal does.
    fn signal(&self, sig: i32) {
        let st = self.lock();
        let Phase::Running(p) = &st.phase else {
            return;
        };
        if p.mode == Mode::Pty {
            match execbox_jail::pty::foreground_group(&*p.stdin) {
                Ok(fg) if fg > 0 && fg != p.pid => {
                    if let Err(e) = execbox_jail::process::signal_group(fg, sig) {
                        tracing::debug!(session = %self.id, error = %e, "pty signal failed");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(session = %self.id, error = %e, "no foreground group"),
            }
        }
        if let Err(e) = execbox_jail::process::signal_group(p.pid, sig) {
            tracing::debug!(session = %self.id, error = %e, "pty signal failed");
        }
    }

    fn resize(&self, cols: u16, rows: u16) {
        if let Phase::Running(p) = &self.lock().phase {
            if p.mode != Mode::Pty {
                // Pipes have no window size.
                return;
            }
            if let Err(e) = execbox_jail::pty::resize(&*p.stdin, cols, rows) {
                tracing::debug!(session = %self.id, error = %e, "pty resize failed");
            }
        }
    }

    /// `DELETE`: no more attaches; the process is killed, and the supervisor finishes the
    /// session as for any exit (it also kills the rest of the tree, jobs in other process
    /// groups included, and an attached client gets the exit frame).
    fn kill(&self) {
        let mut st = self.lock();
        st.removed = true;
        if let Phase::Running(p) = &st.phase {
            let _ = execbox_jail::process::signal_group(p.pid, libc::SIGKILL);
        }
    }

    fn status(&self) -> (bool, u64) {
        let st = self.lock();
        (matches!(st.phase, Phase::Running(_)), st.ring.total())
    }
}

fn shell_argv(command: Option<&str>) -> Vec<String> {
    let mut argv: Vec<String> = if Path::new("/bin/bash").exists() {
        ["/bin/bash", "--norc", "--noprofile"]
            .map(String::from)
            .to_vec()
    } else {
        // sh does not know bash's start-up flags.
        vec!["/bin/sh".to_string()]
    };
    if let Some(c) = command.filter(|c| !c.is_empty()) {
        argv.push("-c".into());
        argv.push(c.to_string());
    }
    argv
}

/// Drains the process's output into the session until the process has exited and its
/// output has ended, then cleans up its cgroup and records the exit.
async fn supervise(
    session: Arc<Session>,
    mut primary: Option<pipe::Receiver>,
    mut stderr: Option<pipe::Receiver>,
    mut exit: oneshot::Receiver<ExitInfo>,
    pid: i32,
    leaf: Option<Arc<ExecLeaf>>,
) {
    let mut out_buf = vec![0u8; READ_CHUNK];
    let mut err_buf = vec![0u8; READ_CHUNK];
    let mut exited: Option<Option<ExitInfo>> = None;
    let mut deadline: Option<Instant> = None;
    let mut killed = false;
    loop {
        if primary.is_none() && stderr.is_none() && exited.is_some() {
            break;
        }
        tokio::select! {
            n = read_opt(&mut primary, &mut out_buf) => match n {
                Some(n) => session.push(FRAME_STDOUT, &out_buf[..n]),
                None => primary = None,
            },
            n = read_opt(&mut stderr, &mut err_buf) => match n {
                Some(n) => session.push(FRAME_STDERR, &err_buf[..n]),
                None => stderr = None,
            },
            r = &mut exit, if exited.is_none() => {
                exited = Some(r.ok());
                deadline = Some(Instant::now() + DRAIN_AFTER_EXIT);
            },
            _ = sleep_until_opt(deadline) => {
                if killed {
                    break;
                }
                // The main process is gone but something (a background job) still holds
                // the output open: the session's processes end with it.
                killed = true;
                kill_tree(pid, leaf.clone()).await;
                deadline = Some(Instant::now() + DRAIN_AFTER_KILL);
            },
        }
    }
    if let Some(leaf) = leaf {
        let _ = tokio::task::spawn_blocking(move || {
            let _ = leaf.kill_all();
            let _ = leaf.remove();
        })
        .await;
    }
    session.finish(exit_code(exited.flatten()));
}

async fn kill_tree(pid: i32, leaf: Option<Arc<ExecLeaf>>) {
    let _ = execbox_jail::process::signal_group(pid, libc::SIGKILL);
    if let Some(leaf) = leaf {
        let _ = tokio::task::spawn_blocking(move || leaf.kill_all()).await;
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// PTY sessions of this sandbox.
#[derive(Default)]
pub struct Ptys {
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    next_seq: AtomicU64,
}

impl Ptys {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Session>>> {
        match self.sessions.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.lock().get(id).cloned()
    }

    fn remove(&self, id: &str) -> Option<Arc<Session>> {
        self.lock().remove(id)
    }

    /// Registers a new session; at the cap, the oldest finished session without a client
    /// makes room.
    fn insert(&self, cwd: PathBuf, command: Option<String>) -> Result<String, ApiError> {
        let mut sessions = self.lock();
        if sessions.len() >= MAX_SESSIONS {
            let oldest_finished = sessions
                .values()
                .filter(|s| {
                    let st = s.lock();
                    matches!(st.phase, Phase::Exited(_)) && st.holder.is_none()
                })
                .min_by_key(|s| s.seq)
                .map(|s| s.id.clone());
            match oldest_finished {
                Some(id) => {
                    tracing::info!(session = %id, "dropping the oldest finished pty session");
                    sessions.remove(&id);
                }
                None => {
                    return Err(ApiError::Runtime(format!(
                        "error creating pty session. too many pty sessions (limit {MAX_SESSIONS})"
                    )))
                }
            }
        }
        let id = uuid::Uuid::new_v4().to_string();
        let session = Arc::new(Session {
            id: id.clone(),
            cwd,
            command,
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            state: Mutex::new(SessionState {
                phase: Phase::Idle,
                mode: Mode::Pty,
                ring: Ring::new(RING_BYTES),
                holder: None,
                next_holder: 0,
                removed: false,
            }),
        });
        sessions.insert(id.clone(), session);
        Ok(id)
    }
}

// ---------------------------------------------------------------------------------------
// HTTP handlers
// ---------------------------------------------------------------------------------------

/// Routes of this module.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/pty", post(create))
        .route("/pty/{id}", get(status).delete(remove))
        .route("/pty/{id}/ws", get(attach))
}

#[derive(Debug, Default, Deserialize)]
struct CreateRequest {
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    command: Option<String>,
}

#[derive(Debug, Serialize)]
struct CreateResponse {
    session_id: String,
}

#[derive(Debug, Serialize)]
struct StatusResponse {
    session_id: String,
    running: bool,
    output_offset: u64,
}

fn not_found(id: &str) -> ApiError {
    ApiError::ContextNotFound(format!("pty session {id} not found"))
}

fn parse_create(body: &[u8]) -> Result<CreateRequest, ApiError> {
    // The body is optional: empty (or `null`) means all defaults.
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(CreateRequest::default());
    }
    serde_json::from_slice::<Option<CreateRequest>>(body)
        .map(Option::unwrap_or_default)
        .map_err(|e| {
            ApiError::BadRequest(format!(
                "error parsing request, MAYBE invalid body format. {e}"
            ))
        })
}

/// `POST /pty`.
#[utoipa::path(
    post,
    path = "/pty",
    operation_id = "execdCreatePty",
    tag = "execd",
    description = "Starts a command (default: a login shell) on a pseudo-terminal.",
    request_body = crate::openapi::schemas::PtyCreate,
    responses(
        (status = 201, description = "Created.", body = crate::openapi::schemas::PtyCreated),
        (status = 400, description = "`INVALID_REQUEST_BODY` or `MISSING_QUERY`: the message names what is wrong.", body = execbox_proto::execd::ExecdError),
        (status = 500, description = "`RUNTIME_ERROR`: the agent failed.", body = execbox_proto::execd::ExecdError),
    )
)]
async fn create(
    State(app): State<Arc<AppState>>,
    body: Bytes,
) -> Result<(StatusCode, Json<CreateResponse>), ApiError> {
    if !Path::new("/dev/ptmx").exists() {
        return Err(ApiError::NotSupported(
            "pty sessions are not supported on this platform".into(),
        ));
    }
    let req = parse_create(&body)?;
    let cwd = match req.cwd.as_deref().filter(|c| !c.is_empty()) {
        Some(raw) => crate::paths::resolve(raw, &app.runner.env_with(&[]))?,
        None => crate::paths::default_cwd(),
    };
    crate::files::make_cwd(&cwd, app.runner.user())?;
    let id = app
        .ptys
        .insert(cwd, req.command.filter(|c| !c.is_empty()))?;
    tracing::info!(session = %id, "pty session created");
    Ok((StatusCode::CREATED, Json(CreateResponse { session_id: id })))
}

/// `GET /pty/{id}`.
#[utoipa::path(
    get,
    path = "/pty/{id}",
    operation_id = "execdPtyStatus",
    tag = "execd",
    description = "A PTY session's state.",
    params(
        ("id" = String, Path, description = "Id."),
    ),
    responses(
        (status = 200, description = "State.", body = crate::openapi::schemas::PtyStatus),
        (status = 404, description = "`CONTEXT_NOT_FOUND`.", body = execbox_proto::execd::ExecdError),
    )
)]
async fn status(
    State(app): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<StatusResponse>, ApiError> {
    let session = app.ptys.get(&id).ok_or_else(|| not_found(&id))?;
    let (running, output_offset) = session.status();
    Ok(Json(StatusResponse {
        session_id: id,
        running,
        output_offset,
    }))
}

/// `DELETE /pty/{id}`.
#[utoipa::path(
    delete,
    path = "/pty/{id}",
    operation_id = "execdDeletePty",
    tag = "execd",
    description = "Ends a PTY session.",
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
    let session = app.ptys.remove(&id).ok_or_else(|| not_found(&id))?;
    session.kill();
    tracing::info!(session = %id, "pty session deleted");
    Ok(StatusCode::OK)
}

#[derive(Debug, Default, Deserialize)]
struct WsQuery {
    #[serde(default)]
    pty: Option<String>,
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    takeover: Option<String>,
}

impl WsQuery {
    fn options(&self) -> AttachOptions {
        let flag = |v: &Option<String>, value: &str| v.as_deref() == Some(value);
        AttachOptions {
            pipe_mode: flag(&self.pty, "0") || flag(&self.pty, "false"),
            // Missing or unparsable = 0 (everything still kept), as upstream.
            since: self
                .since
                .as_deref()
                .and_then(|s| s.parse::<i64>().ok())
                .map_or(0, |s| s.max(0) as u64),
            takeover: flag(&self.takeover, "1") || flag(&self.takeover, "true"),
        }
    }
}

/// `GET /pty/{id}/ws`: 404 and 409 are answered before the upgrade.
#[utoipa::path(
    get,
    path = "/pty/{id}/ws",
    operation_id = "execdAttachPty",
    tag = "execd",
    description = "WebSocket to a PTY session.",
    params(
        ("id" = String, Path, description = "Id."),
    ),
    responses(
        (status = 101, description = "Switched to the WebSocket protocol."),
        (status = 400, description = "Not a WebSocket upgrade, or a bad query.", body = String),
        (status = 404, description = "`CONTEXT_NOT_FOUND`.", body = execbox_proto::execd::ExecdError),
        (status = 409, description = "`ALREADY_CONNECTED`: a client is attached.", body = execbox_proto::execd::ExecdError),
    )
)]
async fn attach(
    State(app): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
    Query(query): Query<WsQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let session = app.ptys.get(&id).ok_or_else(|| not_found(&id))?;
    let opts = query.options();
    if !opts.takeover && session.has_holder() {
        return Err(ApiError::Conflict {
            code: codes::ALREADY_CONNECTED,
            message: format!("another client is already connected to pty session {id}"),
        });
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return Ok(rejection.into_response()),
    };
    Ok(ws
        .max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| serve_client(app, session, opts, socket)))
}

// ---------------------------------------------------------------------------------------
// One WebSocket client
// ---------------------------------------------------------------------------------------

type WsTx = SplitSink<WebSocket, Message>;
type WsRx = SplitStream<WebSocket>;

/// How a client's connection ended.
#[derive(Debug)]
enum End {
    /// The exit frame and close were sent.
    Exited,
    /// The client closed, vanished or could not take a frame in time.
    ClientGone,
    /// Nothing heard from the client within the read deadline.
    ReadTimeout,
    /// The session let go of this client.
    Kicked(Kick),
    /// The session dropped this client without a reason (it is being torn down).
    Detached,
}

/// Sends one frame within the write deadline.
async fn send(tx: &mut WsTx, msg: Message) -> Result<(), ()> {
    match tokio::time::timeout(WRITE_DEADLINE, tx.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

fn close_message(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// Sends a close frame, best effort and briefly: the client may be the stalled one.
async fn close_quickly(tx: &mut WsTx, code: u16, reason: &str) {
    let _ = tokio::time::timeout(EVICT_CLOSE_DEADLINE, tx.send(close_message(code, reason))).await;
}

async fn serve_client(
    app: Arc<AppState>,
    session: Arc<Session>,
    opts: AttachOptions,
    socket: WebSocket,
) {
    let (mut tx, mut rx) = socket.split();
    let mut att = match session.attach(&app, opts) {
        Ok(a) => a,
        Err(e) => {
            let _ = send(&mut tx, ServerFrame::error(e.code, e.message)).await;
            close_quickly(&mut tx, e.close, e.code).await;
            return;
        }
    };
    tracing::debug!(session = %session.id, holder = att.holder_id, "pty client attached");
    let kick = att.kick.take();
    let kicked = async {
        match kick {
            Some(rx) => match rx.await {
                Ok(why) => why,
                // Dropped without a reason: the output channel closes too and says so.
                Err(_) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    };
    let end = tokio::select! {
        biased;
        why = kicked => End::Kicked(why),
        end = run_client(&mut tx, &mut rx, &session, &mut att) => end,
    };
    tracing::debug!(session = %session.id, holder = att.holder_id, ?end, "pty client done");
    match end {
        End::Kicked(Kick::TakenOver) => close_quickly(&mut tx, CLOSE_TAKEN_OVER, TAKEN_OVER).await,
        End::Kicked(Kick::TooSlow) => {
            close_quickly(
                &mut tx,
                CLOSE_TRY_AGAIN,
                "client too slow, reconnect with since",
            )
            .await
        }
        End::ReadTimeout => close_quickly(&mut tx, CLOSE_GOING_AWAY, "read timeout").await,
        End::Detached => close_quickly(&mut tx, CLOSE_GOING_AWAY, SESSION_GONE).await,
        End::Exited => {
            // Our close is sent; wait (briefly) for the client's.
            let _ = tokio::time::timeout(CLOSE_REPLY_WAIT, async {
                while let Some(Ok(m)) = rx.next().await {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        }
        End::ClientGone => {}
    }
    session.detach(att.holder_id);
}

/// Serves one attached client until the process exits, the client leaves, or it is too slow.
async fn run_client(tx: &mut WsTx, rx: &mut WsRx, session: &Session, att: &mut Attachment) -> End {
    if let Some((offset, bytes)) = att.replay.take() {
        if send(tx, Message::Binary(replay_frame(offset, &bytes)))
            .await
            .is_err()
        {
            return End::ClientGone;
        }
    }
    let connected = ServerFrame::Connected {
        session_id: &session.id,
        mode: att.mode.name(),
    };
    if send(tx, connected.message()).await.is_err() {
        return End::ClientGone;
    }
    let mut ping = tokio::time::interval_at(Instant::now() + PING_EVERY, PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut read_deadline = Instant::now() + READ_DEADLINE;
    // Keystrokes accepted from the client and not yet taken by the process.
    let mut pending: Vec<u8> = Vec::new();
    let stdin = att.stdin.clone();
    loop {
        tokio::select! {
            out = att.rx.recv() => match out {
                Some(Out::Data(frame)) => {
                    att.queued.fetch_sub(frame.len(), Ordering::Relaxed);
                    if send(tx, Message::Binary(frame)).await.is_err() {
                        return End::ClientGone;
                    }
                }
                Some(Out::Exit(code)) => {
                    let _ = send(tx, ServerFrame::Exit { exit_code: code }.message()).await;
                    let _ = send(tx, close_message(CLOSE_NORMAL, "process exited")).await;
                    return End::Exited;
                }
                None => return End::Detached,
            },
            msg = rx.next(), if pending.len() < STDIN_PENDING_BYTES => {
                read_deadline = Instant::now() + READ_DEADLINE;
                let msg = match msg {
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return End::ClientGone,
                    Some(Ok(m)) => m,
                };
                let reply = handle_client_message(session, stdin.as_ref(), msg, &mut pending);
                if let Some(reply) = reply {
                    if send(tx, reply).await.is_err() {
                        return End::ClientGone;
                    }
                }
            },
            r = write_pending(stdin.as_ref(), &pending), if !pending.is_empty() => match r {
                Ok(n) => {
                    pending.drain(..n);
                    // While stdin is backed up the client is not read at all: its silence
                    // then is ours, not its own.
                    read_deadline = Instant::now() + READ_DEADLINE;
                }
                Err(e) => {
                    pending.clear();
                    let reply =
                        ServerFrame::error(STDIN_WRITE_FAILED, format!("writing stdin: {e}"));
                    if send(tx, reply).await.is_err() {
                        return End::ClientGone;
                    }
                }
            },
            _ = ping.tick() => {
                if send(tx, Message::Ping(Bytes::new())).await.is_err() {
                    return End::ClientGone;
                }
            },
            _ = tokio::time::sleep_until(read_deadline), if pending.len() < STDIN_PENDING_BYTES => {
                return End::ReadTimeout
            }
        }
    }
}

async fn write_pending(
    stdin: Option<&Arc<pipe::Sender>>,
    pending: &[u8],
) -> std::io::Result<usize> {
    match stdin {
        Some(s) => write_some(s, pending).await,
        None => Err(std::io::Error::other("the process has exited")),
    }
}

/// Applies one client message; returns the reply to send, if any.
fn handle_client_message(
    session: &Session,
    stdin: Option<&Arc<pipe::Sender>>,
    msg: Message,
    pending: &mut Vec<u8>,
) -> Option<Message> {
    let queue_stdin = |data: &[u8], pending: &mut Vec<u8>| {
        if stdin.is_none() {
            return Some(ServerFrame::error(
                STDIN_WRITE_FAILED,
                "the process has exited",
            ));
        }
        pending.extend_from_slice(data);
        None
    };
    match msg {
        Message::Binary(b) => match decode_client_binary(&b) {
            Ok(data) => queue_stdin(data, pending),
            Err(e) => Some(ServerFrame::error(INVALID_FRAME, e)),
        },
        Message::Text(t) => {
            let frame: ClientFrame = match serde_json::from_str(t.as_str()) {
                Ok(f) => f,
                Err(e) => {
                    return Some(ServerFrame::error(
                        INVALID_FRAME,
                        format!("invalid frame: {e}"),
                    ))
                }
            };
            match frame.kind.as_str() {
                "stdin" => queue_stdin(frame.data.unwrap_or_default().as_bytes(), pending),
                "resize" => {
                    let size =
                        |v: Option<i64>| v.and_then(|v| u16::try_from(v).ok()).filter(|v| *v > 0);
                    match (size(frame.cols), size(frame.rows)) {
                        (Some(c), Some(r)) => {
                            session.resize(c, r);
                            None
                        }
                        _ => Some(ServerFrame::error(
                            INVALID_FRAME,
                            "resize needs cols and rows between 1 and 65535",
                        )),
                    }
                }
                "signal" => {
                    let name = frame.signal.unwrap_or_default();
                    match parse_signal(&name) {
                        Some(sig) => {
                            session.signal(sig);
                            None
                        }
                        None => Some(ServerFrame::error(
                            INVALID_FRAME,
                            format!("unknown signal {name:?}"),
                        )),
                    }
                }
                "ping" => Some(ServerFrame::Pong.message()),
                other => Some(ServerFrame::error(
                    INVALID_FRAME,
                    format!("unknown frame type {other:?}"),
                )),
            }
        }
        // Pings are answered by the WebSocket layer; pongs only prove the client is alive.
        Message::Ping(_) | Message::Pong(_) | Message::Close(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_everything_until_full() {
        let mut r = Ring::new(8);
        r.write(b"abc");
        r.write(b"de");
        assert_eq!(r.total(), 5);
        assert_eq!(r.read_from(0), (0, b"abcde".to_vec()));
        assert_eq!(r.read_from(3), (3, b"de".to_vec()));
        assert_eq!(r.read_from(5), (5, Vec::new()));
        assert_eq!(r.read_from(99), (5, Vec::new()));
    }

    #[test]
    fn ring_wraps_and_clamps_to_the_oldest_kept_byte() {
        let mut r = Ring::new(8);
        r.write(b"0123456");
        r.write(b"789ab");
        assert_eq!(r.total(), 12);
        assert_eq!(r.read_from(0), (4, b"456789ab".to_vec()));
        assert_eq!(r.read_from(10), (10, b"ab".to_vec()));
        for i in 0..20u8 {
            r.write(&[b'A' + i]);
        }
        assert_eq!(r.total(), 32);
        assert_eq!(r.read_from(0), (24, b"MNOPQRST".to_vec()));
    }

    #[test]
    fn ring_oversized_write_keeps_the_tail() {
        let mut r = Ring::new(4);
        r.write(b"x");
        r.write(b"abcdefghij");
        assert_eq!(r.total(), 11);
        assert_eq!(r.read_from(0), (7, b"ghij".to_vec()));
        r.write(b"kl");
        assert_eq!(r.read_from(8), (9, b"ijkl".to_vec()));
    }

    #[test]
    fn ring_matches_a_plain_vector() {
        // Random-sized writes against a model: the kept tail is always the stream's tail.
        let mut r = Ring::new(1000);
        let mut all = Vec::new();
        let mut seed = 12345u64;
        for _ in 0..500 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = (seed >> 33) as usize % 1500;
            let chunk: Vec<u8> = (0..len).map(|i| (all.len() + i) as u8).collect();
            r.write(&chunk);
            all.extend_from_slice(&chunk);
            let since = (seed >> 13) % (all.len() as u64 + 1);
            let (off, bytes) = r.read_from(since);
            let oldest = all.len().saturating_sub(1000) as u64;
            assert_eq!(off, since.max(oldest).min(all.len() as u64));
            assert_eq!(bytes, &all[off as usize..]);
        }
    }

    #[test]
    fn frames_encode_as_the_spec_says() {
        assert_eq!(&output_frame(FRAME_STDOUT, b"hi")[..], b"\x01hi");
        assert_eq!(&output_frame(FRAME_STDERR, b"e")[..], b"\x02e");
        let f = replay_frame(0x0102030405060708, b"xy");
        assert_eq!(&f[..], b"\x03\x01\x02\x03\x04\x05\x06\x07\x08xy");
        assert_eq!(decode_client_binary(b"\x00ls\n"), Ok(&b"ls\n"[..]));
        assert_eq!(decode_client_binary(b""), Ok(&b""[..]));
        assert!(decode_client_binary(b"\x05x").is_err());
    }

    #[test]
    fn server_frames_serialize_exactly() {
        let text = |m: Message| match m {
            Message::Text(t) => t.as_str().to_string(),
            _ => String::new(),
        };
        assert_eq!(
            text(
                ServerFrame::Connected {
                    session_id: "s1",
                    mode: "pty"
                }
                .message()
            ),
            r#"{"type":"connected","session_id":"s1","mode":"pty"}"#
        );
        assert_eq!(
            text(ServerFrame::Exit { exit_code: 3 }.message()),
            r#"{"type":"exit","exit_code":3}"#
        );
        assert_eq!(text(ServerFrame::Pong.message()), r#"{"type":"pong"}"#);
        assert_eq!(
            text(ServerFrame::error(INVALID_FRAME, "bad")),
            r#"{"type":"error","error":"bad","code":"INVALID_FRAME"}"#
        );
    }

    #[test]
    fn client_frames_parse_leniently() {
        let f: ClientFrame =
            serde_json::from_str(r#"{"type":"resize","cols":100,"rows":40,"extra":1}"#)
                .unwrap_or_default();
        assert_eq!(
            (f.kind.as_str(), f.cols, f.rows),
            ("resize", Some(100), Some(40))
        );
        assert_eq!(parse_signal("SIGINT"), Some(libc::SIGINT));
        assert_eq!(parse_signal("SIGUSR1"), None);
    }

    #[test]
    fn create_body_is_optional() {
        assert!(parse_create(b"").is_ok_and(|r| r.cwd.is_none() && r.command.is_none()));
        assert!(parse_create(b"null").is_ok());
        assert!(parse_create(br#"{"command":"ls","x":1}"#)
            .is_ok_and(|r| r.command.as_deref() == Some("ls")));
        assert!(matches!(
            parse_create(b"{nope"),
            Err(ApiError::BadRequest(m))
                if m.starts_with("error parsing request, MAYBE invalid body format. ")
        ));
    }

    #[test]
    fn session_count_is_bounded_and_finished_sessions_make_room() {
        let ptys = Ptys::default();
        let ids: Vec<String> = (0..MAX_SESSIONS)
            .map(|_| ptys.insert(PathBuf::from("/"), None).unwrap_or_default())
            .collect();
        assert!(matches!(
            ptys.insert(PathBuf::from("/"), None),
            Err(ApiError::Runtime(m)) if m.contains("too many pty sessions")
        ));
        for id in [&ids[7], &ids[3]] {
            if let Some(s) = ptys.get(id) {
                s.lock().phase = Phase::Exited(0);
            }
        }
        assert!(ptys.insert(PathBuf::from("/"), None).is_ok());
        assert!(ptys.get(&ids[3]).is_none(), "the oldest finished one went");
        assert!(ptys.get(&ids[7]).is_some());
        assert_eq!(ptys.lock().len(), MAX_SESSIONS);
    }

    #[test]
    fn query_options() {
        let q = WsQuery {
            pty: Some("0".into()),
            since: Some("42".into()),
            takeover: Some("1".into()),
        };
        let o = q.options();
        assert!(o.pipe_mode && o.takeover && o.since == 42);
        let o = WsQuery::default().options();
        assert!(!o.pipe_mode && !o.takeover && o.since == 0);
        let o = WsQuery {
            since: Some("-5".into()),
            ..Default::default()
        }
        .options();
        assert_eq!(o.since, 0);
    }
}
