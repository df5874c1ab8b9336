//! Clients that hold connections without finishing a request: a real `execbox serve` on
//! loopback, thousands of half-open connections, the connection cap, the idle keep-alive limit,
//! and what must never be cut (request bodies, event streams, WebSocket sessions).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::Message;

/// The tests here time connections against the server's limits: one at a time, so that 5,000
/// connections of one do not slow the clocks of another.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A request head cut before its final blank line.
const PARTIAL_HEAD: &[u8] = b"GET /health HTTP/1.1\r\nHost: x\r\n";

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let _ = s.set_nodelay(true);
    s
}

/// The status line's code and the whole response (up to EOF or `Content-Length`).
fn read_response(s: &mut TcpStream) -> Option<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let status = text.split_whitespace().nth(1)?.parse().ok()?;
                return Some((status, text));
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// `GET /health` on a new connection; the time it took, or `None` without an answer within
/// `limit`.
fn health(port: u16, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut s = connect(port);
    s.set_read_timeout(Some(limit)).ok()?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let (status, text) = read_response(&mut s)?;
    assert_eq!(status, 200, "{text}");
    Some(t.elapsed())
}

/// Whether the server has closed `s` (EOF or reset), waiting at most until `deadline`.
fn closed_by(s: &mut TcpStream, deadline: Instant) -> bool {
    let mut b = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let _ = s.set_read_timeout(Some(left));
        match s.read(&mut b) {
            Ok(0) => return true,
            // A response (a 408, say) before the close is fine: keep reading to the close.
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Whether `s` is still open: nothing to read yet, and no EOF.
fn still_open(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    let _ = s.set_nonblocking(true);
    let open = matches!(s.peek(&mut b), Err(e) if e.kind() == ErrorKind::WouldBlock);
    let _ = s.set_nonblocking(false);
    open
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// RSS of `pid` once it stops falling (or after `limit`).
fn settled_rss(pid: u32, target: u64, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    let mut rss = rss_kib(pid);
    while rss > target && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        rss = rss_kib(pid);
    }
    rss
}

const HELD: usize = 5_000;
/// Long enough for a debug build on a busy machine to accept all of them and answer the
/// requests below before the first one times out.
const HEADER_TIMEOUT: Duration = Duration::from_secs(8);

#[test]
fn thousands_of_half_open_connections_neither_stop_the_server_nor_keep_its_memory() {
    let _serial = serial();
    assert!(
        raise_fd_limit(HELD as u64 + 1_000) > HELD as u64 + 100,
        "this test needs {HELD} descriptors of its own"
    );
    let server = TestServer::start_with_config(&format!(
        "header_read_timeout_secs = {}\n",
        HEADER_TIMEOUT.as_secs()
    ));
    let pid = server.pid().expect("server pid");

    // Warm up what a sandbox and a few hundred requests allocate once, so that "before" is the
    // server's working size and not its empty start.
    let sb = server.create(json!({}));
    assert_eq!(sb.run("echo warm").out(), "warm");
    assert_eq!(server.delete(&format!("/v1/sandboxes/{}", sb.id)), 204);
    drop(sb);
    for _ in 0..300 {
        health(server.port, Duration::from_secs(5)).expect("warm-up /health");
    }
    std::thread::sleep(Duration::from_secs(1));
    let before = rss_kib(pid);

    // Hold HELD connections, each with a request head that never ends.
    let opening = Instant::now();
    let mut held: Vec<(TcpStream, Instant)> = (0..HELD)
        .map(|i| {
            let mut s = connect(server.port);
            s.write_all(PARTIAL_HEAD)
                .unwrap_or_else(|e| panic!("connection {i}: {e}"));
            (s, Instant::now())
        })
        .collect();
    let opened = opening.elapsed();

    // While they are held: /health answers every time, and a sandbox comes and goes.
    let mut lat = Vec::new();
    for i in 0..200 {
        let d = health(server.port, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("/health #{i} got no answer with {HELD} held connections"));
        assert!(
            d < Duration::from_secs(2),
            "/health #{i} took {d:?} with {HELD} held connections"
        );
        lat.push(d);
    }
    let sb = server.create(json!({}));
    assert_eq!(sb.run("echo alive").out(), "alive");
    assert_eq!(server.delete(&format!("/v1/sandboxes/{}", sb.id)), 204);
    drop(sb);
    let during = rss_kib(pid);
    let open = held.iter().filter(|(s, _)| still_open(s)).count();
    assert_eq!(
        open,
        HELD,
        "the measurements above must run while every connection is held (opening them took \
         {opened:?}, everything took {:?})",
        opening.elapsed()
    );
    lat.sort();
    println!(
        "/health with {HELD} held half-open connections: n={} p50={:.2} ms p99={:.2} ms max={:.2} ms",
        lat.len(),
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99)),
        ms(lat[lat.len() - 1])
    );

    // The server closes every one of them within its header timeout (+ slack).
    let slack = Duration::from_secs(3);
    let mut late = 0;
    for (s, at) in &mut held {
        if !closed_by(s, *at + HEADER_TIMEOUT + slack) {
            late += 1;
        }
    }
    assert_eq!(
        late, 0,
        "connections still open {slack:?} after the header timeout"
    );
    let closed_after = opening.elapsed();
    drop(held);

    // Memory returns to where it was.
    let limit = before + before / 5;
    let after = settled_rss(pid, limit, Duration::from_secs(10));
    println!(
        "server RSS: before {before} KiB, during {during} KiB, after {after} KiB \
         (all {HELD} closed {closed_after:?} after the first was opened)"
    );
    assert!(
        after <= limit,
        "RSS after the burst ({after} KiB) is more than 20% over before ({before} KiB)"
    );
    assert!(
        health(server.port, Duration::from_secs(2)).is_some(),
        "still serving"
    );
}

/// Seconds of CPU (user + system) a process has used.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // In clock ticks, USER_HZ, which is 100 on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn the_connection_cap_idle_limit_and_what_they_must_not_cut() {
    let _serial = serial();
    const CAP: usize = 50;
    let header = Duration::from_secs(2);
    let idle = Duration::from_secs(4);
    let server = TestServer::start_with_config(&format!(
        "max_connections = {CAP}\nheader_read_timeout_secs = {}\nidle_timeout_secs = {}\n",
        header.as_secs(),
        idle.as_secs()
    ));

    // ----- At the cap, a new connection waits until a held one times out -----
    let t0 = Instant::now();
    let mut held: Vec<TcpStream> = (0..CAP).map(|_| connect(server.port)).collect();
    for s in held.iter_mut().step_by(2) {
        // Half of them send part of a head, half send nothing.
        s.write_all(PARTIAL_HEAD).expect("partial head");
    }
    let mut next = connect(server.port);
    next.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("request");
    next.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let mut b = [0u8; 1];
    assert!(
        matches!(next.read(&mut b), Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "with {CAP} connections held, the next one is not served"
    );
    assert!(
        t0.elapsed() < header,
        "the check above ran before any held connection could time out"
    );
    next.set_read_timeout(Some(header + Duration::from_secs(5)))
        .expect("timeout");
    let (status, text) = read_response(&mut next).expect("served once slots are free");
    assert_eq!(status, 200, "{text}");
    let served = t0.elapsed();
    assert!(
        served < header + Duration::from_secs(3),
        "served {served:?} after the cap was reached"
    );
    println!("at the cap of {CAP}: the next connection was served after {served:?}");
    for s in &mut held {
        assert!(
            closed_by(s, t0 + header + Duration::from_secs(3)),
            "a held connection outlived the header timeout"
        );
    }
    drop(held);
    assert!(health(server.port, Duration::from_secs(2)).is_some());

    // ----- An idle keep-alive connection is closed after the idle limit, not the header one ---
    let mut ka = connect(server.port);
    ka.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    ka.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    let (status, _) = read_response(&mut ka).expect("first response");
    assert_eq!(status, 200);
    let idle_from = Instant::now();
    // Reused after a pause longer than the header timeout but shorter than the idle one.
    std::thread::sleep(header + Duration::from_millis(500));
    ka.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("second request");
    let (status, text) = read_response(&mut ka).expect("the kept-alive connection still serves");
    assert_eq!(status, 200, "{text}");
    let idle_from_2 = Instant::now();
    assert!(
        closed_by(&mut ka, idle_from_2 + idle + Duration::from_secs(3)),
        "an idle keep-alive connection outlived the idle timeout"
    );
    let lasted = idle_from_2.elapsed();
    assert!(
        lasted + Duration::from_millis(500) >= idle,
        "closed after {lasted:?} idle, before the idle timeout of {idle:?}"
    );
    println!(
        "idle keep-alive: reused after {:?}, closed after {lasted:?} idle",
        idle_from_2 - idle_from
    );

    // ----- A slow request body is read to its end -----
    let body = json!({
        "image": {"uri": "default"},
        "entrypoint": ["tail", "-f", "/dev/null"],
        "resourceLimits": {"cpu": "1", "memory": "512Mi"},
    })
    .to_string();
    let mut slow = connect(server.port);
    write!(
        slow,
        "POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .expect("head");
    let (first, rest) = body.split_at(body.len() / 2);
    slow.write_all(first.as_bytes()).expect("first half");
    // Longer than both the header and the idle timeout.
    std::thread::sleep(idle + Duration::from_secs(1));
    slow.write_all(rest.as_bytes()).expect("second half");
    slow.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let (status, text) = read_response(&mut slow).expect("the slow upload is answered");
    assert_eq!(status, 202, "{text}");
    let id = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str::<Value>(b).ok())
        .and_then(|v| v["id"].as_str().map(str::to_string))
        .expect("sandbox id");
    let (s, ep) = server.get(&format!("/v1/sandboxes/{id}/endpoints/44772"));
    assert_eq!(s, 200, "{ep}");
    let endpoint = format!("http://{}", ep["endpoint"].as_str().expect("endpoint"));
    let token = ep["headers"]["X-EXECD-ACCESS-TOKEN"]
        .as_str()
        .expect("token")
        .to_string();

    // ----- A quiet event stream and an idle WebSocket session outlive both timeouts -----
    let quiet = idle + Duration::from_secs(2);
    let stream = {
        let (endpoint, token) = (endpoint.clone(), token.clone());
        let command = format!("echo start; sleep {}; echo end", quiet.as_secs());
        std::thread::spawn(move || {
            let t = Instant::now();
            let resp = ureq::post(&format!("{endpoint}/command"))
                .set("X-EXECD-ACCESS-TOKEN", &token)
                .set("Content-Type", "application/json")
                .timeout(Duration::from_secs(60))
                .send_string(&json!({ "command": command }).to_string())
                .expect("command stream");
            let text = resp.into_string().expect("the whole stream");
            (text, t.elapsed())
        })
    };
    let (status, v) = into_pair(
        ureq::post(&format!("{endpoint}/pty"))
            .set("X-EXECD-ACCESS-TOKEN", &token)
            .call(),
    );
    assert_eq!(status, 201, "{v}");
    let pty = v["session_id"].as_str().expect("session_id").to_string();
    let mut req = format!("{}/pty/{pty}/ws", endpoint.replacen("http://", "ws://", 1))
        .into_client_request()
        .expect("ws request");
    req.headers_mut()
        .insert("X-EXECD-ACCESS-TOKEN", token.parse().expect("token header"));
    let tcp = connect(server.port);
    tcp.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let (mut ws, _) = tungstenite::client(req, tcp).expect("websocket handshake");
    let mut out = Vec::new();
    let mut read_until = |ws: &mut tungstenite::WebSocket<TcpStream>, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !String::from_utf8_lossy(&out).contains(what) {
            assert!(Instant::now() < deadline, "no {what:?} on the WebSocket");
            match ws.read() {
                Ok(Message::Binary(b)) if b.first() == Some(&1) => out.extend_from_slice(&b[1..]),
                Ok(Message::Text(t)) => out.extend_from_slice(t.as_str().as_bytes()),
                Ok(Message::Close(f)) => panic!("WebSocket closed: {f:?}"),
                Ok(_) => {}
                Err(e) => panic!("WebSocket: {e}"),
            }
        }
    };
    read_until(&mut ws, "connected");
    std::thread::sleep(quiet);
    ws.send(Message::binary(b"\0echo ws-$((40+2))\n".to_vec()))
        .expect("stdin after a quiet spell");
    read_until(&mut ws, "ws-42");
    let _ = ws.close(None);

    let (text, took) = stream.join().expect("stream thread");
    assert!(text.contains("start"), "{text}");
    assert!(
        text.contains("end") && text.contains("execution_complete"),
        "the stream ran to its end: {text}"
    );
    assert!(
        took >= quiet,
        "the stream took {took:?}, less than its {quiet:?} of silence"
    );
    assert_eq!(server.delete(&format!("/v1/sandboxes/{id}")), 204);
}

#[test]
fn out_of_descriptors_the_server_backs_off_and_recovers() {
    let _serial = serial();
    let (server, log) = TestServer::start_logged("header_read_timeout_secs = 2\n");
    let pid = server.pid().expect("server pid");

    // Once the server has settled (its warm pool started), leave it 20 descriptors, then hold
    // three times as many connections.
    let mut fds = open_fds(pid);
    let settle = Instant::now() + Duration::from_secs(20);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = open_fds(pid);
        if now == fds || Instant::now() > settle {
            break;
        }
        fds = now;
    }
    let limit = open_fds(pid) + 20;
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("prlimit");
    assert!(status.success(), "prlimit failed");
    let held: Vec<TcpStream> = (0..60).map(|_| connect(server.port)).collect();

    // Out of descriptors, the accept loop waits instead of spinning.
    std::thread::sleep(Duration::from_millis(300));
    let (cpu0, t0) = (cpu_secs(pid), Instant::now());
    std::thread::sleep(Duration::from_millis(1500));
    let busy = (cpu_secs(pid) - cpu0) / t0.elapsed().as_secs_f64();
    assert!(
        busy < 0.3,
        "the server used {:.0}% of a CPU while out of descriptors",
        busy * 100.0
    );

    // As header timeouts free descriptors (20 at a time), it serves the backlog, then this.
    let t = Instant::now();
    let d = health(server.port, Duration::from_secs(20));
    assert!(
        d.is_some(),
        "no /health answer {:?} after running out of descriptors",
        t.elapsed()
    );
    drop(held);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let lines = text
        .lines()
        .filter(|l| l.contains("accept") && l.to_lowercase().contains("too many open files"))
        .count();
    let secs = t0.elapsed().as_secs_f64() + 2.0;
    println!(
        "out of descriptors: {:.0}% CPU, {lines} accept-error log lines in ~{secs:.0} s, \
         /health answered after {:?}",
        busy * 100.0,
        d.unwrap_or_default()
    );
    assert!(lines >= 1, "the error is logged:\n{text}");
    assert!(
        lines as f64 <= secs + 2.0,
        "at most about one accept-error line per second, got {lines}:\n{text}"
    );
    let _ = std::fs::remove_file(&log);
}
