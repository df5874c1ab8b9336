//! The HTTP listener: accepts TCP connections and serves each with hyper's HTTP/1, within
//! limits that keep the server up against clients that open connections and never finish a
//! request.
//!
//! - **A cap on open client connections** ([`ServerConfig::max_connections`], WebSocket
//!   sessions included: a connection holds its slot until its socket closes). At the cap the
//!   accept loop stops accepting and new connections wait in the kernel's listen backlog; each
//!   connection that closes (the timeouts below close idle ones) lets the next one in. Answering
//!   them with an error instead would turn clients away while nothing is wrong but a burst, and
//!   closing an established connection to make room would let anyone evict real clients.
//! - **A request-head timeout** ([`ServerConfig::header_read_timeout_secs`]): a complete request
//!   head must arrive within it, counted from the accept or, on a kept-alive connection, from
//!   the first byte of the next request.
//! - **An idle timeout** ([`ServerConfig::idle_timeout_secs`]) between requests of a kept-alive
//!   connection, counted from the end of the previous response.
//! - **Nothing else is timed**: once a request head is in, its body may take as long as it
//!   takes, and so may the response (event streams of long commands, downloads, WebSocket
//!   upgrades that the proxy splices). Streams bound their own stalls ([`crate::CLIENT_STALL`]).
//!
//! hyper's own `http1::Builder::header_read_timeout` starts its clock when the connection is
//! ready for a request head (right after the accept, and again as soon as a response has been
//! sent) and stops it when a head is complete, so it bounds the keep-alive wait by the same
//! duration as the head itself, and a first byte after a long idle period does not restart
//! it. The two limits are kept here instead, per connection, by [`Clock`]: the connection's
//! socket tells it when bytes arrive and when writes block, the service when a request starts
//! and when its response body is done. hyper's timer is switched off.
//!
//! With TLS ([`crate::tls`]), each connection's handshake happens before hyper sees it, within
//! the request-head timeout counted from the accept (a client that never finishes its
//! handshake holds its slot no longer than one that never finishes its head), and with the
//! configuration in force at the accept. The clock then watches the decrypted stream.
//!
//! The accept loop never exits: errors that belong to one pending connection are skipped, any
//! other error (out of descriptors, out of memory) waits and retries, backing off up to a
//! second and logging at most once a second. After a burst of connections the allocator's free
//! memory is handed back ([`execbox_jail::host::release_free_memory`]).

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::ServerConfig;
use crate::tls::Tls;

/// Errors of [`Listener::new`].
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// `max_connections` is 0.
    #[error("max_connections must be at least 1")]
    NoConnections,
}

/// The per-connection limits of a [`Listener`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Longest wait for a complete request head; `None`: no limit.
    pub header: Option<Duration>,
    /// Longest wait for the next request of a kept-alive connection; `None`: no limit.
    pub idle: Option<Duration>,
}

impl Timeouts {
    /// The timeouts of `config` (0 seconds: no limit).
    pub fn of(config: &ServerConfig) -> Self {
        let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        Self {
            header: secs(config.header_read_timeout_secs),
            idle: secs(config.idle_timeout_secs),
        }
    }
}

/// Connections are at most this share of the limit on open files: the rest is for sandboxes
/// (agent sockets, cgroup directories, pidfds) and for the proxy's connection to an agent,
/// one per proxied client connection.
const FD_SHARE_DIVISOR: u64 = 2;

/// The cap on connections under the process's limit on open files (`nofile`).
pub fn effective_max_connections(configured: usize, nofile: Option<u64>) -> usize {
    match nofile {
        Some(n) => {
            let room = usize::try_from(n / FD_SHARE_DIVISOR).unwrap_or(usize::MAX);
            configured.min(room.max(1))
        }
        None => configured,
    }
}

/// Connections the kernel holds for the accept loop (it caps this at `net.core.somaxconn`).
/// Bursts and the clients waiting at the connection cap wait here; with the usual 128 a
/// burst overflows it, and each SYN dropped then costs its client a 1 s retransmission.
pub const LISTEN_BACKLOG: u32 = 4096;

/// A listening TCP socket on `addr` (with `SO_REUSEADDR`) and a backlog of [`LISTEN_BACKLOG`].
pub fn bind(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// A bound TCP socket and the limits its connections are served within.
pub struct Listener {
    tcp: TcpListener,
    slots: Arc<Slots>,
    timeouts: Timeouts,
    tls: Option<Arc<Tls>>,
}

impl Listener {
    /// Serves `tcp` with the limits of `config`; the connection cap is lowered to fit the
    /// process's limit on open files.
    pub fn new(tcp: TcpListener, config: &ServerConfig) -> Result<Self, ListenerError> {
        if config.max_connections == 0 {
            return Err(ListenerError::NoConnections);
        }
        let nofile = execbox_jail::host::nofile_limit().ok().map(|l| l.soft);
        let max = effective_max_connections(config.max_connections, nofile);
        if max < config.max_connections {
            tracing::warn!(
                configured = config.max_connections,
                max_connections = max,
                nofile = ?nofile,
                "max_connections lowered to half the limit on open files"
            );
        }
        Ok(Self {
            tcp,
            slots: Slots::new(max),
            timeouts: Timeouts::of(config),
            tls: None,
        })
    }

    /// Serves every connection over TLS with `tls` (`None`: plain HTTP).
    pub fn with_tls(mut self, tls: Option<Arc<Tls>>) -> Self {
        self.tls = tls;
        self
    }

    /// The cap on open connections in force.
    pub fn max_connections(&self) -> usize {
        self.slots.max
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.tcp.local_addr()
    }

    /// Accepts and serves connections with `router` until `stop` completes; then stops
    /// accepting (the listening socket closes), lets every connection finish the requests it
    /// has in flight (idle keep-alive connections close at once) and returns when all are
    /// closed or `grace` has passed.
    pub async fn serve_until(
        self,
        router: Router,
        stop: impl Future<Output = ()>,
        grace: Duration,
    ) {
        let slots = self.slots.clone();
        let (drain, draining) = tokio::sync::watch::channel(false);
        tokio::select! {
            () = self.serve(router, draining) => {}
            () = stop => {}
        }
        // `serve` is dropped: so is the listening socket.
        let _ = drain.send(true);
        let open = slots.open.load(Ordering::Acquire);
        tracing::info!(
            open_connections = open,
            grace_secs = grace.as_secs(),
            "draining"
        );
        let deadline = Instant::now() + grace;
        loop {
            let freed = slots.freed.notified();
            if slots.open.load(Ordering::Acquire) == 0 {
                break;
            }
            tokio::select! {
                () = freed => {}
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(
                        open_connections = slots.open.load(Ordering::Acquire),
                        "grace period over: connections still open are cut"
                    );
                    break;
                }
            }
        }
    }

    async fn serve(self, router: Router, draining: tokio::sync::watch::Receiver<bool>) {
        let mut builder = http1::Builder::new();
        // hyper's own header timer stays off: `Clock` keeps both limits (see the module
        // documentation). It needs a timer, which is not set; saying so keeps it off if one is.
        builder.header_read_timeout(None);
        let builder = Arc::new(builder);
        spawn_trimmer(self.slots.clone());
        let mut errors = AcceptErrors::default();
        let mut cap_log = RateLimited::new(Duration::from_secs(10));
        // A slot taken for an accept that failed, kept for the retry: giving it back would
        // signal `freed` and cut the backoff short.
        let mut spare: Option<Slot> = None;
        loop {
            let slot = match spare.take().or_else(|| self.slots.try_take()) {
                Some(s) => s,
                None => {
                    if let Some(waits) = cap_log.ready(Instant::now()) {
                        tracing::warn!(
                            max_connections = self.slots.max,
                            times_since_last_log = waits,
                            "connection cap reached: new connections wait in the listen backlog"
                        );
                    }
                    self.slots.take().await
                }
            };
            let tcp = match self.tcp.accept().await {
                Ok((tcp, _peer)) => {
                    errors.recovered();
                    tcp
                }
                Err(e) => {
                    spare = Some(slot);
                    if let Some(delay) = errors.failed(&e, Instant::now()) {
                        // A connection that closes frees a descriptor: try again then, or when
                        // the backoff is over.
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = self.slots.freed.notified() => {}
                        }
                    }
                    continue;
                }
            };
            // Small request/response exchanges (a command round trip is a few hundred bytes)
            // must not wait for Nagle's algorithm against the client's delayed ACKs.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY");
            }
            tokio::spawn(serve_connection(
                tcp,
                self.tls.clone(),
                slot,
                router.clone(),
                self.timeouts,
                builder.clone(),
                draining.clone(),
            ));
        }
    }
}

/// Serves one connection until it ends, its upgrade takes it over, or a timeout closes it.
async fn serve_connection(
    tcp: TcpStream,
    tls: Option<Arc<Tls>>,
    slot: Slot,
    router: Router,
    timeouts: Timeouts,
    builder: Arc<http1::Builder>,
    mut draining: tokio::sync::watch::Receiver<bool>,
) {
    let clock = Arc::new(Clock::new(timeouts, Instant::now()));
    let stream = match tls {
        None => Stream::Plain(tcp),
        Some(tls) => {
            let accept = tls.acceptor().accept(tcp);
            // The handshake is part of the first request head: due by the same deadline.
            let handshake = async {
                match clock.deadline() {
                    Some(deadline) => tokio::time::timeout_at(deadline, accept).await.ok(),
                    None => Some(accept.await),
                }
            };
            tokio::select! {
                done = handshake => match done {
                    Some(Ok(s)) => Stream::Tls(Box::new(s)),
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                    None => {
                        tracing::debug!("TLS handshake timed out");
                        return;
                    }
                },
                // Stopping: a connection without a request in flight just closes.
                Ok(_) = draining.wait_for(|d| *d) => return,
            }
        }
    };
    let io = TokioIo::new(ClientIo {
        tcp: stream,
        clock: clock.clone(),
        _slot: slot,
    });
    let service = Tracked {
        router,
        clock: clock.clone(),
    };
    let mut conn = pin!(builder.serve_connection(io, service).with_upgrades());
    let mut timer = pin!(tokio::time::sleep_until(Instant::now()));
    let mut armed = None;
    let mut drain = pin!(async move {
        let _ = draining.wait_for(|d| *d).await;
    });
    let mut drained = false;
    let ended = poll_fn(|cx| {
        // The server is stopping: finish what is in flight, then close.
        if !drained && drain.as_mut().poll(cx).is_ready() {
            drained = true;
            conn.as_mut().graceful_shutdown();
        }
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(r.map_err(Some));
        }
        // Every change of phase happens inside the poll above (socket reads and writes, the
        // service and the response body all run in it), so the deadline is current here.
        let Some(deadline) = clock.deadline() else {
            return Poll::Pending;
        };
        if armed != Some(deadline) {
            timer.as_mut().reset(deadline);
            armed = Some(deadline);
        }
        timer.as_mut().poll(cx).map(|()| Err(None))
    })
    .await;
    match ended {
        Ok(()) => {}
        Err(Some(e)) => tracing::debug!(error = %e, "connection ended"),
        // Dropping the connection closes the socket.
        Err(None) => tracing::debug!(phase = ?clock.phase(), "connection timed out"),
    }
}

// ---------------------------------------------------------------------------------------------
// Per-connection clock

/// Where a connection is between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for a complete request head, due by the deadline (if any).
    Head(Option<Instant>),
    /// Kept alive after a response, closed at the deadline (if any) unless a byte arrives.
    Idle(Option<Instant>),
    /// This many requests in flight: no deadline.
    Busy(u32),
}

/// The phase of one connection and its deadline.
#[derive(Debug)]
pub struct Clock {
    timeouts: Timeouts,
    state: Mutex<ClockState>,
}

#[derive(Debug, Clone, Copy)]
struct ClockState {
    phase: Phase,
    /// The last write to the socket could not finish: a response is still being delivered to
    /// a client that reads slowly, which no timeout cuts.
    write_blocked: bool,
}

impl Clock {
    /// A connection accepted at `now`: its first request head is due within the header
    /// timeout.
    pub fn new(timeouts: Timeouts, now: Instant) -> Self {
        Self {
            timeouts,
            state: Mutex::new(ClockState {
                phase: Phase::Head(timeouts.header.map(|h| now + h)),
                write_blocked: false,
            }),
        }
    }

    fn update(&self, f: impl FnOnce(&mut ClockState, &Timeouts)) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut s, &self.timeouts);
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .phase
    }

    /// When the connection is to be closed, if nothing happens before.
    pub fn deadline(&self) -> Option<Instant> {
        let s = *self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match s.phase {
            _ if s.write_blocked => None,
            Phase::Head(d) | Phase::Idle(d) => d,
            Phase::Busy(_) => None,
        }
    }

    /// Bytes arrived: after an idle spell they start the next request head.
    pub fn bytes_read(&self, now: Instant) {
        self.update(|s, t| {
            if let Phase::Idle(_) = s.phase {
                s.phase = Phase::Head(t.header.map(|h| now + h));
            }
        });
    }

    /// A write finished (`done`) or could not (the client does not read).
    pub fn wrote(&self, done: bool, now: Instant) {
        self.update(|s, t| {
            s.write_blocked = !done;
            // The idle spell starts when the last of the response has left.
            if let (true, Phase::Idle(_)) = (done, s.phase) {
                s.phase = Phase::Idle(t.idle.map(|i| now + i));
            }
        });
    }

    /// A complete request head arrived.
    pub fn request_started(&self) {
        self.update(|s, _| {
            s.phase = match s.phase {
                Phase::Busy(n) => Phase::Busy(n.saturating_add(1)),
                _ => Phase::Busy(1),
            }
        });
    }

    /// A response was sent in full (or dropped).
    pub fn request_done(&self, now: Instant) {
        self.update(|s, t| {
            s.phase = match s.phase {
                Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
                Phase::Busy(_) => Phase::Idle(t.idle.map(|i| now + i)),
                p => p,
            }
        });
    }
}

/// A client's byte stream: the socket itself, or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A client's stream: tells its connection's [`Clock`] about reads and writes, and holds the
/// connection's [`Slot`] until it is closed (after an upgrade too).
struct ClientIo {
    tcp: Stream,
    clock: Arc<Clock>,
    _slot: Slot,
}

impl ClientIo {
    /// Tells the clock how a write went: bytes written, or none because the client does not
    /// read. (A flush is not progress: hyper flushes on every poll of an idle connection.)
    fn wrote(&self, r: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match &r {
            Poll::Ready(Ok(n)) if *n > 0 => self.clock.wrote(true, Instant::now()),
            Poll::Pending => self.clock.wrote(false, Instant::now()),
            Poll::Ready(_) => {}
        }
        r
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.clock.bytes_read(Instant::now());
        }
        r
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.tcp).poll_write(cx, buf);
        this.wrote(r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
        this.wrote(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // hyper flushes the socket only once its own buffer is written out.
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// The router as a hyper service that tells the connection's [`Clock`] when a request starts
/// (hyper calls it as soon as the head is parsed, before the body is read) and when its
/// response body is done.
#[derive(Clone)]
struct Tracked {
    router: Router,
    clock: Arc<Clock>,
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let in_flight = InFlight::start(self.clock.clone());
        let router = self.router.clone();
        Box::pin(async move {
            let resp = tower::ServiceExt::oneshot(router, req.map(axum::body::Body::new)).await?;
            Ok(resp.map(|body| TrackedBody {
                body,
                _in_flight: in_flight,
            }))
        })
    }
}

/// One request in flight, from its head until its response body is dropped.
struct InFlight(Arc<Clock>);

impl InFlight {
    fn start(clock: Arc<Clock>) -> Self {
        clock.request_started();
        Self(clock)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_done(Instant::now());
    }
}

/// A response body that keeps its request in flight until hyper is done with it.
struct TrackedBody {
    body: axum::body::Body,
    _in_flight: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

// ---------------------------------------------------------------------------------------------
// Connection slots

/// The open client connections, at most `max`.
struct Slots {
    max: usize,
    open: AtomicUsize,
    /// Most connections open at once since the last memory trim.
    peak: AtomicUsize,
    /// Signalled when a connection closes.
    freed: Notify,
}

/// One open connection's place under the cap; released when dropped.
struct Slot(Arc<Slots>);

impl Slots {
    fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            freed: Notify::new(),
        })
    }

    fn try_take(self: &Arc<Self>) -> Option<Slot> {
        let mut n = self.open.load(Ordering::Acquire);
        loop {
            if n >= self.max {
                return None;
            }
            match self
                .open
                .compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    self.peak.fetch_max(n + 1, Ordering::Relaxed);
                    OPEN_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
                    return Some(Slot(self.clone()));
                }
                Err(now) => n = now,
            }
        }
    }

    /// Waits for a free slot. Only the accept loop waits here.
    async fn take(self: &Arc<Self>) -> Slot {
        loop {
            if let Some(s) = self.try_take() {
                return s;
            }
            // `notify_one` keeps a wake-up for a waiter that is not waiting yet, so a slot freed
            // between the check above and this wait is not missed.
            self.freed.notified().await;
        }
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// Client connections open in this process, every listener together (for the metrics).
static OPEN_CONNECTIONS: AtomicUsize = AtomicUsize::new(0);

/// Client connections open now.
pub fn open_connections() -> usize {
    OPEN_CONNECTIONS.load(Ordering::Relaxed)
}

impl Drop for Slot {
    fn drop(&mut self) {
        OPEN_CONNECTIONS.fetch_sub(1, Ordering::Relaxed);
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

/// Connections that must have closed since the peak before freed memory is handed back.
const TRIM_AFTER: usize = 256;

/// Hands the allocator's free memory back to the system once the number of open connections
/// has fallen by [`TRIM_AFTER`] from its peak. Each connection's buffers and task are freed
/// when it closes, but glibc keeps freed memory in its per-thread arenas: after 5,000
/// connections the server stayed hundreds of MiB over its baseline until it was trimmed.
/// A steady load (the count near its peak) never triggers it.
fn spawn_trimmer(slots: Arc<Slots>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let open = slots.open();
            let peak = slots.peak.load(Ordering::Relaxed);
            if peak < open + TRIM_AFTER {
                continue;
            }
            slots.peak.store(open, Ordering::Relaxed);
            let released =
                tokio::task::spawn_blocking(execbox_jail::host::release_free_memory).await;
            tracing::debug!(peak, open, released = ?released.ok(), "trimmed the heap after a burst of connections");
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Accept errors

/// Shortest and longest wait after an accept error that is not about one connection.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The accept loop's state after errors: its next wait and its log rate.
#[derive(Debug)]
struct AcceptErrors {
    backoff: Duration,
    log: RateLimited,
    failed: u64,
}

impl Default for AcceptErrors {
    fn default() -> Self {
        Self {
            backoff: BACKOFF_MIN,
            log: RateLimited::new(Duration::from_secs(1)),
            failed: 0,
        }
    }
}

/// Errors `accept(2)` reports for one pending connection (already reset, refused by a
/// firewall rule, a network error passed on): the listener itself is fine, retry at once.
fn is_connection_error(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
    ) {
        return true;
    }
    use nix::errno::Errno;
    e.raw_os_error().map(Errno::from_raw).is_some_and(|n| {
        matches!(
            n,
            Errno::EPROTO
                | Errno::ENOPROTOOPT
                | Errno::EHOSTDOWN
                | Errno::ENONET
                | Errno::EHOSTUNREACH
                | Errno::EOPNOTSUPP
                | Errno::ENETDOWN
                | Errno::ENETUNREACH
                | Errno::EPERM
                | Errno::ETIMEDOUT
        )
    })
}

impl AcceptErrors {
    /// An accept failed at `now`: how long to wait before the next one (`None`: at once).
    fn failed(&mut self, e: &io::Error, now: Instant) -> Option<Duration> {
        if is_connection_error(e) {
            tracing::debug!(error = %e, "accept: a pending connection failed");
            return None;
        }
        self.failed += 1;
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        if let Some(skipped) = self.log.ready(now) {
            tracing::warn!(
                error = %e,
                retry_in_ms = wait.as_millis() as u64,
                failed_since_last_log = skipped + 1,
                "accept failed; backing off"
            );
        }
        Some(wait)
    }

    /// An accept succeeded.
    fn recovered(&mut self) {
        if self.failed > 0 {
            tracing::info!(failed = self.failed, "accepting connections again");
            self.failed = 0;
            self.backoff = BACKOFF_MIN;
        }
    }
}

/// Lets an event through at most once per `every`, counting the ones held back.
#[derive(Debug)]
struct RateLimited {
    every: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl RateLimited {
    fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            held_back: 0,
        }
    }

    /// `Some(events held back since the last one let through)` when this one may be logged.
    fn ready(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < self.every => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::errno::Errno;

    const T: Timeouts = Timeouts {
        header: Some(Duration::from_secs(2)),
        idle: Some(Duration::from_secs(5)),
    };

    #[test]
    fn a_new_connection_owes_its_head_within_the_header_timeout() {
        let t0 = Instant::now();
        let c = Clock::new(T, t0);
        assert_eq!(c.deadline(), Some(t0 + Duration::from_secs(2)));
        // Partial bytes of the first head do not extend it.
        c.bytes_read(t0 + Duration::from_secs(1));
        assert_eq!(c.deadline(), Some(t0 + Duration::from_secs(2)));
    }

    #[test]
    fn requests_in_flight_have_no_deadline_then_idle_then_head_again() {
        let t0 = Instant::now();
        let c = Clock::new(T, t0);
        c.request_started();
        assert_eq!(c.deadline(), None, "body reads and responses are not timed");
        c.bytes_read(t0 + Duration::from_secs(30));
        assert_eq!(c.deadline(), None);
        let done = t0 + Duration::from_secs(60);
        c.request_done(done);
        assert_eq!(c.phase(), Phase::Idle(Some(done + Duration::from_secs(5))));
        // The first byte of the next request starts its head clock.
        let next = done + Duration::from_secs(4);
        c.bytes_read(next);
        assert_eq!(c.deadline(), Some(next + Duration::from_secs(2)));
        c.request_started();
        c.request_started();
        c.request_done(next);
        assert_eq!(c.phase(), Phase::Busy(1), "pipelined requests");
    }

    #[test]
    fn a_response_still_leaving_is_not_idle() {
        let t0 = Instant::now();
        let c = Clock::new(T, t0);
        c.request_started();
        c.request_done(t0);
        c.wrote(false, t0);
        assert_eq!(c.deadline(), None, "the client has not read the end yet");
        let flushed = t0 + Duration::from_secs(100);
        c.wrote(true, flushed);
        assert_eq!(c.deadline(), Some(flushed + Duration::from_secs(5)));
    }

    #[test]
    fn zero_means_no_limit() {
        let c = Clock::new(
            Timeouts {
                header: None,
                idle: None,
            },
            Instant::now(),
        );
        assert_eq!(c.deadline(), None);
        c.request_started();
        c.request_done(Instant::now());
        assert_eq!(c.deadline(), None);
        let config: ServerConfig =
            toml::from_str("header_read_timeout_secs = 0\nidle_timeout_secs = 7\n").expect("toml");
        assert_eq!(
            Timeouts::of(&config),
            Timeouts {
                header: None,
                idle: Some(Duration::from_secs(7))
            }
        );
    }

    #[test]
    fn the_cap_fits_the_descriptor_limit() {
        assert_eq!(effective_max_connections(10_000, Some(1 << 20)), 10_000);
        assert_eq!(effective_max_connections(10_000, Some(1024)), 512);
        assert_eq!(effective_max_connections(10_000, Some(1)), 1);
        assert_eq!(effective_max_connections(50, None), 50);
    }

    #[tokio::test]
    async fn slots_are_capped_and_freed() {
        let slots = Slots::new(2);
        let a = slots.try_take().expect("first");
        let _b = slots.try_take().expect("second");
        assert!(slots.try_take().is_none());
        assert_eq!(slots.open(), 2);
        let waiter = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.take().await })
        };
        tokio::task::yield_now().await;
        drop(a);
        let c = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("a freed slot wakes the waiter")
            .expect("task");
        assert_eq!(slots.open(), 2);
        drop(c);
        assert_eq!(slots.open(), 1);
        assert_eq!(slots.peak.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn accept_errors_back_off_and_log_once_a_second() {
        let mut e = AcceptErrors::default();
        let emfile = io::Error::from_raw_os_error(Errno::EMFILE as i32);
        let t0 = Instant::now();
        let mut waits = Vec::new();
        let mut logged = 0;
        let mut now = t0;
        // Three seconds of failing accepts, each after the wait asked for.
        while now < t0 + Duration::from_secs(3) {
            let before = e.log.last;
            let w = e.failed(&emfile, now).expect("a resource error waits");
            if e.log.last != before {
                logged += 1;
            }
            waits.push(w);
            now += w;
        }
        assert_eq!(waits[0], BACKOFF_MIN);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]), "{waits:?}");
        assert_eq!(waits.last(), Some(&BACKOFF_MAX));
        assert!((2..=4).contains(&logged), "{logged} lines in 3 s");
        e.recovered();
        assert_eq!(e.backoff, BACKOFF_MIN);
        // A connection reset before it was accepted is no reason to wait.
        let reset = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(e.failed(&reset, now), None);
    }
}
