//! `/pty`: interactive shells over a WebSocket, through the server's proxy, against real
//! sandboxes (§11 of the execd spec).

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

/// Longest wait for any one expected frame.
const WAIT: Duration = Duration::from_secs(20);

fn create_pty(sb: &Sandbox, body: Option<Value>) -> String {
    let req = sb.execd("POST", "/pty");
    let r = match body {
        Some(b) => req.send_string(&b.to_string()),
        None => req.call(),
    };
    let (status, v) = into_pair(r);
    assert_eq!(status, 201, "{v}");
    let id = v["session_id"].as_str().expect("session_id").to_string();
    assert_eq!(id.len(), 36, "dashed uuid: {id}");
    id
}

fn pty_status(sb: &Sandbox, id: &str) -> (u16, Value) {
    into_pair(sb.execd("GET", &format!("/pty/{id}")).call())
}

/// Everything a client received, in order of arrival.
#[derive(Debug, Default)]
struct Seen {
    /// Kinds in arrival order: "replay", "stdout", "stderr", or the text frame's type.
    order: Vec<String>,
    out: Vec<u8>,
    err: Vec<u8>,
    replay: Vec<(u64, Vec<u8>)>,
    texts: Vec<Value>,
    close: Option<(u16, String)>,
    ended: bool,
}

impl Seen {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.out).into_owned()
    }

    fn err(&self) -> String {
        String::from_utf8_lossy(&self.err).into_owned()
    }

    fn text(&self, kind: &str) -> Option<&Value> {
        self.texts.iter().find(|t| t["type"] == kind)
    }
}

struct Ws {
    sock: WebSocket<TcpStream>,
    seen: Seen,
}

/// Opens `/pty/{id}/ws{query}` through the server's proxy; an HTTP refusal is returned as
/// (status, JSON body).
fn try_attach(sb: &Sandbox, id: &str, query: &str) -> Result<Ws, (u16, Value)> {
    let url = format!(
        "{}/pty/{id}/ws{query}",
        sb.endpoint.replacen("http://", "ws://", 1)
    );
    let mut req = url.as_str().into_client_request().expect("request");
    req.headers_mut().insert(
        "X-EXECD-ACCESS-TOKEN",
        sb.token.parse().expect("token header"),
    );
    let stream = TcpStream::connect(("127.0.0.1", sb.server.port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    match tungstenite::client(req, stream) {
        Ok((sock, _)) => {
            // Short reads from now on, so waits can check their deadline.
            sock.get_ref()
                .set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            Ok(Ws {
                sock,
                seen: Seen::default(),
            })
        }
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            let body = resp
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            Err((resp.status().as_u16(), body))
        }
        Err(e) => panic!("websocket handshake: {e}"),
    }
}

fn attach(sb: &Sandbox, id: &str, query: &str) -> Ws {
    match try_attach(sb, id, query) {
        Ok(ws) => ws,
        Err((status, body)) => panic!("attach refused: {status} {body}"),
    }
}

impl Ws {
    /// Reads at most one message (or times out after 100 ms).
    fn read_one(&mut self) {
        if self.seen.ended {
            std::thread::sleep(Duration::from_millis(20));
            return;
        }
        let s = &mut self.seen;
        match self.sock.read() {
            Ok(Message::Binary(b)) => match b.first() {
                Some(1) => {
                    s.order.push("stdout".into());
                    s.out.extend_from_slice(&b[1..]);
                }
                Some(2) => {
                    s.order.push("stderr".into());
                    s.err.extend_from_slice(&b[1..]);
                }
                Some(3) => {
                    s.order.push("replay".into());
                    let mut off = [0u8; 8];
                    off.copy_from_slice(&b[1..9]);
                    s.replay.push((u64::from_be_bytes(off), b[9..].to_vec()));
                }
                other => panic!("unexpected binary frame type {other:?}"),
            },
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(t.as_str()).expect("text frame is JSON");
                s.order.push(v["type"].as_str().unwrap_or("?").to_string());
                s.texts.push(v);
            }
            Ok(Message::Close(f)) => {
                s.close = Some(
                    f.map(|f| (u16::from(f.code), f.reason.as_str().to_string()))
                        .unwrap_or((1005, String::new())),
                );
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => s.ended = true,
        }
    }

    /// Reads until `pred` holds; panics with what was seen after [`WAIT`].
    fn wait(&mut self, what: &str, pred: impl Fn(&Seen) -> bool) -> &Seen {
        let deadline = Instant::now() + WAIT;
        while !pred(&self.seen) {
            if Instant::now() > deadline || self.seen.ended {
                panic!(
                    "no {what} (connection ended: {}); seen {:?}\nstdout: {:?}\nstderr: {:?}",
                    self.seen.ended,
                    self.seen.order,
                    self.seen.out(),
                    self.seen.err()
                );
            }
            self.read_one();
        }
        &self.seen
    }

    fn send_json(&mut self, v: Value) {
        self.sock
            .send(Message::text(v.to_string()))
            .expect("send text");
    }

    fn send_stdin(&mut self, s: &str) {
        let mut frame = vec![0u8];
        frame.extend_from_slice(s.as_bytes());
        self.sock.send(Message::binary(frame)).expect("send stdin");
    }
}

#[test]
fn pty_shell_echoes_resizes_takes_signals_and_reports_its_exit() {
    let server = TestServer::start();
    let sb = server.create(json!({}));
    let id = create_pty(&sb, None);
    let (status, v) = pty_status(&sb, &id);
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v,
        json!({"session_id": id, "running": false, "output_offset": 0}),
        "nothing starts before the first attach"
    );

    let mut ws = attach(&sb, &id, "");
    let seen = ws.wait("connected", |s| s.text("connected").is_some());
    assert_eq!(
        seen.text("connected"),
        Some(&json!({"type": "connected", "session_id": id, "mode": "pty"}))
    );

    ws.send_stdin("tty\n");
    ws.wait("a /dev/pts terminal", |s| s.out().contains("/dev/pts/"));
    let (_, v) = pty_status(&sb, &id);
    assert_eq!(v["running"], true, "{v}");
    assert!(v["output_offset"].as_u64().unwrap_or(0) > 0, "{v}");

    // Starts at 80x24, then follows resize messages; stdin also arrives as a text message.
    ws.send_json(json!({"type": "stdin", "data": "stty size\n"}));
    ws.wait("the initial size", |s| s.out().contains("24 80"));
    ws.send_json(json!({"type": "resize", "cols": 100, "rows": 30}));
    ws.send_json(json!({"type": "stdin", "data": "stty size\n"}));
    ws.wait("the new size", |s| s.out().contains("30 100"));
    ws.send_stdin("echo term=$TERM\n");
    ws.wait("TERM", |s| s.out().contains("term=xterm-256color"));

    // SIGINT reaches the foreground job; the shell survives it.
    ws.send_stdin("sleep 100\n");
    std::thread::sleep(Duration::from_millis(500));
    let interrupted = Instant::now();
    ws.send_json(json!({"type": "signal", "signal": "SIGINT"}));
    ws.send_stdin("echo after-$((40+2))\n");
    ws.wait("the shell after SIGINT", |s| s.out().contains("after-42"));
    assert!(interrupted.elapsed() < Duration::from_secs(10));

    ws.send_json(json!({"type": "ping"}));
    ws.wait("pong", |s| s.text("pong").is_some());
    ws.send_json(json!({"type": "nonsense"}));
    let seen = ws.wait("an error frame", |s| s.text("error").is_some());
    assert_eq!(
        seen.text("error").map(|e| &e["code"]),
        Some(&json!("INVALID_FRAME"))
    );

    ws.send_stdin("exit 7\n");
    let seen = ws.wait("exit and close", |s| s.close.is_some());
    assert_eq!(
        seen.text("exit"),
        Some(&json!({"type": "exit", "exit_code": 7}))
    );
    assert_eq!(seen.order.last().map(String::as_str), Some("exit"));
    assert_eq!(seen.close.as_ref().map(|c| c.0), Some(1000));

    let (status, v) = pty_status(&sb, &id);
    assert_eq!(status, 200, "a finished session stays queryable: {v}");
    assert_eq!(v["running"], false, "{v}");
}

#[test]
fn pty_replays_missed_output_and_hands_over_between_clients() {
    let server = TestServer::start();
    let sb = server.create(json!({}));
    let id = create_pty(
        &sb,
        Some(json!({
            "cwd": "/tmp/pty-cwd/sub",
            "command": "pwd; echo ready; read x; echo got-$x; sleep 0.3; echo late-output; \
                        read y; exit 3"
        })),
    );

    let mut a = attach(&sb, &id, "");
    a.wait("ready", |s| s.out().contains("ready"));
    assert!(
        a.seen.out().contains("/tmp/pty-cwd/sub"),
        "{}",
        a.seen.out()
    );

    // A second client is refused before the upgrade...
    let (status, body) = try_attach(&sb, &id, "").err().expect("409");
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "ALREADY_CONNECTED", "{body}");

    // ...unless it takes over: the old holder is closed with 4001, the new one gets the replay
    // first, then `connected`.
    let mut b = attach(&sb, &id, "?since=0&takeover=1");
    let seen = b.wait("connected", |s| s.text("connected").is_some());
    assert_eq!(seen.order.first().map(String::as_str), Some("replay"));
    let (offset, bytes) = &seen.replay[0];
    assert_eq!(*offset, 0);
    assert!(String::from_utf8_lossy(bytes).contains("ready"));
    let seen = a.wait("the eviction", |s| s.close.is_some() || s.ended);
    assert_eq!(
        seen.close,
        Some((4001, "TAKEN_OVER".to_string())),
        "{:?}",
        seen.order
    );

    // Output produced while nobody is attached is kept.
    let (_, v) = pty_status(&sb, &id);
    let before = v["output_offset"].as_u64().expect("offset");
    b.send_stdin("hello\n");
    b.wait("the echo", |s| s.out().contains("hello"));
    drop(b);
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, v) = pty_status(&sb, &id);
        let now = v["output_offset"].as_u64().unwrap_or(0);
        if now > before + "hello\r\ngot-hello\r\nlate-output\r\n".len() as u64 - 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no output while detached: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // (takeover: the server may not have noticed yet that `b` went away.)
    let mut c = attach(&sb, &id, &format!("?since={before}&takeover=1"));
    let seen = c.wait("connected", |s| s.text("connected").is_some());
    let (offset, bytes) = &seen.replay[0];
    assert_eq!(*offset, before);
    let replayed = String::from_utf8_lossy(bytes);
    assert!(
        replayed.contains("got-hello") && replayed.contains("late-output"),
        "{replayed:?}"
    );
    assert!(!replayed.contains("ready"), "{replayed:?}");

    c.send_stdin("bye\n");
    let seen = c.wait("exit", |s| s.close.is_some());
    assert_eq!(seen.text("exit").map(|e| &e["exit_code"]), Some(&json!(3)));
    assert_eq!(seen.close.as_ref().map(|c| c.0), Some(1000));

    // Attaching after the exit replays and reports the exit again.
    let mut d = attach(&sb, &id, "");
    let seen = d.wait("exit", |s| s.close.is_some());
    assert_eq!(
        seen.order.iter().map(String::as_str).collect::<Vec<_>>(),
        ["replay", "connected", "exit"]
    );

    let resp = sb
        .execd("DELETE", &format!("/pty/{id}"))
        .call()
        .expect("delete");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.header("Content-Type"), None);
    assert_eq!(resp.into_string().unwrap_or_default(), "");
    let (status, v) = pty_status(&sb, &id);
    assert_eq!(status, 404);
    assert_eq!(v["code"], "CONTEXT_NOT_FOUND");
}

#[test]
fn pipe_mode_keeps_stderr_apart() {
    let server = TestServer::start();
    let sb = server.create(json!({}));
    let id = create_pty(&sb, Some(json!({})));
    let mut ws = attach(&sb, &id, "?pty=0");
    let seen = ws.wait("connected", |s| s.text("connected").is_some());
    assert_eq!(
        seen.text("connected").map(|c| &c["mode"]),
        Some(&json!("pipe"))
    );
    ws.send_stdin("echo to-out; echo to-err >&2; tty || true\n");
    let seen = ws.wait("both streams", |s| {
        s.out().contains("to-out") && s.err().contains("to-err") && s.out().contains("not a tty")
    });
    assert!(!seen.out().contains("to-err"), "{}", seen.out());
    assert!(!seen.err().contains("to-out"), "{}", seen.err());
    ws.send_json(json!({"type": "stdin", "data": "exit 5\n"}));
    let seen = ws.wait("exit", |s| s.close.is_some());
    assert_eq!(seen.text("exit").map(|e| &e["exit_code"]), Some(&json!(5)));
}

#[test]
fn delete_ends_an_attached_session_and_unknown_ids_are_404() {
    let server = TestServer::start();
    let sb = server.create(json!({}));

    let (status, v) = into_pair(sb.execd("POST", "/pty").send_string("{nope"));
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["code"], "INVALID_REQUEST_BODY");
    assert!(v["message"]
        .as_str()
        .unwrap_or("")
        .starts_with("error parsing request, MAYBE invalid body format. "));

    for (method, path) in [("GET", "/pty/no-such-id"), ("DELETE", "/pty/no-such-id")] {
        let (status, v) = into_pair(sb.execd(method, path).call());
        assert_eq!(status, 404, "{method} {path}: {v}");
        assert_eq!(v["code"], "CONTEXT_NOT_FOUND");
    }
    let (status, v) = try_attach(&sb, "no-such-id", "").err().expect("404");
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["code"], "CONTEXT_NOT_FOUND");

    let id = create_pty(&sb, Some(json!({"command": "sleep 1000"})));
    let mut ws = attach(&sb, &id, "");
    ws.wait("connected", |s| s.text("connected").is_some());
    let (status, _) = into_pair(sb.execd("DELETE", &format!("/pty/{id}")).call());
    assert_eq!(status, 200);
    let seen = ws.wait("exit", |s| s.close.is_some());
    assert_eq!(seen.text("exit").map(|e| &e["exit_code"]), Some(&json!(-1)));
    assert_eq!(pty_status(&sb, &id).0, 404);
}

#[test]
fn output_never_waits_for_a_client() {
    let server = TestServer::start();
    let sb = server.create(json!({}));
    // 32 MiB through the terminal: far more than the replay buffer, the client queue and
    // every socket buffer on the way.
    let id = create_pty(
        &sb,
        Some(json!({"command": "head -c 33554432 /dev/zero | tr '\\0' x; echo; echo END"})),
    );
    // A client that attaches and then reads nothing.
    let mut stalled = attach(&sb, &id, "");
    let deadline = Instant::now() + Duration::from_secs(60);
    let total = loop {
        let (_, v) = pty_status(&sb, &id);
        if v["running"] == false {
            break v["output_offset"].as_u64().unwrap_or(0);
        }
        assert!(Instant::now() < deadline, "the process blocked: {v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(total >= 32 << 20, "{total}");
    // The stalled client was let go rather than holding anything up: closed with "try again
    // later" when the close frame still fit in its buffers, else simply disconnected.
    let seen = stalled.wait("the end", |s| s.close.is_some() || s.ended);
    if let Some(close) = &seen.close {
        assert_eq!(close.0, 1013, "{close:?}");
    }
    assert!(seen.out.len() < total as usize);

    // The replay keeps the last MiB.
    let mut ws = attach(&sb, &id, "?since=0");
    let seen = ws.wait("the exit", |s| s.close.is_some());
    let (offset, bytes) = &seen.replay[0];
    assert_eq!(*offset, total - (1 << 20));
    assert_eq!(bytes.len(), 1 << 20);
    assert!(String::from_utf8_lossy(bytes).ends_with("xx\r\nEND\r\n"));
    assert_eq!(seen.text("exit").map(|e| &e["exit_code"]), Some(&json!(0)));
}

/// A plain request with a body to a PTY route is answered as itself (a refusal), never as a
/// proxy failure: the agent reads the body before it answers, as on every other route (a race
/// that fuzzing found: the agent's early answer and close against the proxy's body write). A
/// body of 1 MiB is still being written when a refusal that did not wait for it goes out.
#[test]
fn a_plain_request_with_a_body_to_a_pty_route_gets_its_answer() {
    let server = TestServer::start();
    let sb = server.create(json!({}));
    let body =
        json!([null, "/proc/self/fd/0", {"a": false, "pad": "x".repeat(1 << 20)}]).to_string();
    for _ in 0..40 {
        for (method, path) in [
            ("GET", "/pty"),
            ("GET", "/pty/nope/ws"),
            ("PUT", "/pty/nope"),
        ] {
            let r = reply(
                sb.execd(method, path)
                    .set("Content-Type", "application/json")
                    .send_string(&body),
            );
            assert!(
                (400..500).contains(&r.status),
                "{method} {path}: {} {}",
                r.status,
                r.text()
            );
        }
    }
}
