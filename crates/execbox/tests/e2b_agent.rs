//! The agent's E2B routes (`/e2b/envd/…`, `/e2b/ci/…`) end to end on a real `execbox serve`,
//! reached through the OpenSandbox proxy to the agent (port 44772) with the paths the server's
//! E2B routing forwards to. The SDK-level tests over the E2B data plane itself live with the
//! server's routing.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{reply, Reply, Sandbox, TestServer};
use serde_json::{json, Value};

const PROCESS: &str = "/e2b/envd/process.Process";
#[allow(dead_code)]
const FS: &str = "/e2b/envd/filesystem.Filesystem";

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64")
}

fn envelope(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![flags];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A unary RPC with the JSON codec.
fn unary(sb: &Sandbox, method: &str, body: Value, user: Option<&str>) -> Reply {
    let mut req = sb
        .execd("POST", method)
        .set("Content-Type", "application/json")
        .set("Connect-Protocol-Version", "1");
    if let Some(u) = user {
        req = req.set(
            "Authorization",
            &format!("Basic {}", b64(format!("{u}:").as_bytes())),
        );
    }
    reply(req.send_string(&body.to_string()))
}

/// Splits a server-stream body into envelopes, checking the framing byte for byte: every byte
/// belongs to an envelope, only the last is end-of-stream.
fn envelopes(raw: &[u8]) -> Vec<(u8, Value)> {
    let mut out = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        assert!(rest.len() >= 5, "truncated envelope header: {rest:?}");
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        assert!(rest.len() >= 5 + len, "truncated envelope");
        let v: Value = serde_json::from_slice(&rest[5..5 + len]).expect("envelope JSON");
        out.push((rest[0], v));
        rest = &rest[5 + len..];
    }
    let ends = out.iter().filter(|(f, _)| *f == 2).count();
    assert_eq!(ends, 1, "exactly one end-of-stream: {out:?}");
    assert_eq!(out.last().map(|(f, _)| *f), Some(2), "{out:?}");
    out
}

/// A server-stream call read to its end.
fn stream(
    sb: &Sandbox,
    method: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> (Reply, Vec<(u8, Value)>) {
    let mut req = sb
        .execd("POST", method)
        .set("Content-Type", "application/connect+json")
        .set("Connect-Protocol-Version", "1");
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let r = reply(req.send_bytes(&envelope(0, body.to_string().as_bytes())));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/connect+json"));
    let evs = envelopes(&r.body);
    (r, evs)
}

/// What a process stream said.
#[derive(Debug, Default)]
struct ProcRun {
    pid: u64,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    pty: Vec<u8>,
    end: Option<Value>,
    error: Option<Value>,
}

fn proc_run(evs: &[(u8, Value)]) -> ProcRun {
    let mut run = ProcRun::default();
    for (i, (flags, v)) in evs.iter().enumerate() {
        if *flags == 2 {
            run.error = v.get("error").cloned();
            continue;
        }
        let ev = &v["event"];
        if i == 0 {
            assert!(ev.get("start").is_some(), "first event is start: {v}");
        }
        if let Some(s) = ev.get("start") {
            run.pid = s["pid"].as_u64().expect("pid");
        } else if let Some(d) = ev.get("data") {
            for (k, buf) in [
                ("stdout", &mut run.stdout),
                ("stderr", &mut run.stderr),
                ("pty", &mut run.pty),
            ] {
                if let Some(s) = d.get(k).and_then(Value::as_str) {
                    buf.extend(unb64(s));
                }
            }
        } else if let Some(e) = ev.get("end") {
            run.end = Some(e.clone());
        } else {
            assert!(ev.get("keepalive").is_some(), "unknown event {v}");
        }
    }
    run
}

fn bash(cmd: &str) -> Value {
    json!({"cmd": "/bin/bash", "args": ["-l", "-c", cmd]})
}

fn start(sb: &Sandbox, body: Value, headers: &[(&str, &str)]) -> ProcRun {
    let (_, evs) = stream(sb, &format!("{PROCESS}/Start"), body, headers);
    proc_run(&evs)
}

/// Starts a process and reads only its `start` event, as a background command does.
fn start_background(sb: &Sandbox, body: Value) -> u64 {
    let resp = sb
        .execd("POST", &format!("{PROCESS}/Start"))
        .set("Content-Type", "application/connect+json")
        .send_bytes(&envelope(0, body.to_string().as_bytes()))
        .expect("start");
    let mut reader = resp.into_reader();
    let mut head = [0u8; 5];
    reader.read_exact(&mut head).expect("envelope head");
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).expect("envelope");
    let v: Value = serde_json::from_slice(&payload).unwrap();
    v["event"]["start"]["pid"].as_u64().expect("start pid")
}

#[test]
fn process_start_streams_start_output_and_end_in_connect_framing() {
    let server = TestServer::start();
    let sb = server.create(json!({}));

    let (r, evs) = stream(
        &sb,
        &format!("{PROCESS}/Start"),
        json!({"process": bash("echo hi; echo oops >&2; exit 3"), "stdin": false}),
        &[
            ("Connect-Timeout-Ms", "60000"),
            ("Keepalive-Ping-Interval", "50"),
        ],
    );
    // Byte for byte: the stream ends with the 7-byte `{}` end-of-stream envelope.
    assert!(
        r.body.ends_with(b"\x02\x00\x00\x00\x02{}"),
        "{:?}",
        r.text()
    );
    assert_eq!(r.body[0], 0);
    let run = proc_run(&evs);
    assert!(run.pid > 0);
    assert_eq!(run.stdout, b"hi\n");
    assert_eq!(run.stderr, b"oops\n");
    assert_eq!(
        run.end,
        Some(
            json!({"exitCode": 3, "exited": true, "status": "exit status 3", "error": "exit status 3"})
        )
    );
    assert_eq!(run.error, None);

    // Success: exitCode 0 omitted, no error.
    let run = start(&sb, json!({"process": bash("true")}), &[]);
    assert_eq!(
        run.end,
        Some(json!({"exited": true, "status": "exit status 0"}))
    );

    // The environment: identity, sandbox, then `envs`; the default cwd is the user's home.
    let run = start(
        &sb,
        json!({"process": {"cmd": "/bin/bash", "args": ["-c", "echo $HOME $USER $LOGNAME $B; pwd; id -u"], "envs": {"B": "2"}}}),
        &[],
    );
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "/home/user user user 2\n/home/user\n1000\n"
    );
    // As root, in a given cwd. (The OpenSandbox proxy strips `Authorization`; the E2B routing
    // forwards it, or names the user in `E2b-User`.)
    let run = start(
        &sb,
        json!({"process": {"cmd": "/bin/bash", "args": ["-c", "echo $HOME $USER; pwd; id -u"], "cwd": "/tmp"}}),
        &[("E2b-User", "root")],
    );
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "/root root\n/tmp\n0\n"
    );
    // A relative cwd is against the home directory.
    start(&sb, json!({"process": bash("mkdir -p sub")}), &[]);
    let run = start(
        &sb,
        json!({"process": {"cmd": "/bin/pwd", "cwd": "sub"}}),
        &[],
    );
    assert_eq!(String::from_utf8_lossy(&run.stdout), "/home/user/sub\n");

    // Errors of a stream: 200 and the end-of-stream error, no start.
    let (_, evs) = stream(
        &sb,
        &format!("{PROCESS}/Start"),
        json!({"process": {"cmd": "/bin/true", "cwd": "/nonexistent"}}),
        &[],
    );
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0].1["error"]["code"], "invalid_argument", "{evs:?}");
    let (_, evs) = stream(
        &sb,
        &format!("{PROCESS}/Start"),
        json!({"process": {"cmd": "/bin/true"}}),
        &[("E2b-User", "mallory")],
    );
    assert_eq!(evs[0].1["error"]["code"], "unauthenticated", "{evs:?}");

    // Output is chunked at 32 KiB at most, and arrives whole.
    let (_, evs) = stream(
        &sb,
        &format!("{PROCESS}/Start"),
        json!({"process": bash("head -c 200000 /dev/zero")}),
        &[],
    );
    for (_, v) in &evs {
        if let Some(s) = v["event"]["data"]["stdout"].as_str() {
            assert!(unb64(s).len() <= 32 * 1024);
        }
    }
    assert_eq!(proc_run(&evs).stdout.len(), 200_000);

    // Connect-Timeout-Ms on Start is the process's lifetime.
    let t = Instant::now();
    let run = start(
        &sb,
        json!({"process": bash("sleep 30")}),
        &[("Connect-Timeout-Ms", "1000")],
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(
        run.error.as_ref().map(|e| e["code"].clone()),
        Some(json!("deadline_exceeded"))
    );
    assert_eq!(
        run.end.as_ref().map(|e| e["status"].clone()),
        Some(json!("signal: killed"))
    );
}

#[test]
fn background_processes_list_connect_input_signal_and_close_stdin() {
    let server = TestServer::start();
    let sb = server.create(json!({}));

    // A background command: the client reads `start` and goes; the process lives on.
    let pid = start_background(&sb, json!({"process": {"cmd": "/bin/cat"}, "tag": "cat-1"}));
    let r = unary(&sb, &format!("{PROCESS}/List"), json!({}), None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let procs = r.json()["processes"].as_array().cloned().unwrap();
    let mine = procs.iter().find(|p| p["pid"] == pid).expect("listed");
    assert_eq!(mine["config"]["cmd"], "/bin/cat");
    assert_eq!(mine["tag"], "cat-1");

    // Connect (by tag) in the background, then feed it input and close its stdin.
    let endpoint = sb.endpoint.clone();
    let token = sb.token.clone();
    let reader = std::thread::spawn(move || {
        let r = ureq::post(&format!("{endpoint}{PROCESS}/Connect"))
            .set("X-EXECD-ACCESS-TOKEN", &token)
            .set("Content-Type", "application/connect+json")
            .send_bytes(&envelope(0, br#"{"process":{"tag":"cat-1"}}"#));
        reply(r)
    });
    std::thread::sleep(Duration::from_millis(500));
    let r = unary(
        &sb,
        &format!("{PROCESS}/SendInput"),
        json!({"process": {"pid": pid}, "input": {"stdin": b64(b"hello\n")}}),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({}));
    // StreamInput: a client stream of start, data and keepalive messages.
    let mut body = envelope(
        0,
        json!({"start": {"process": {"pid": pid}}})
            .to_string()
            .as_bytes(),
    );
    body.extend(envelope(
        0,
        json!({"data": {"input": {"stdin": b64(b"more ")}}})
            .to_string()
            .as_bytes(),
    ));
    body.extend(envelope(0, br#"{"keepalive":{}}"#));
    body.extend(envelope(
        0,
        json!({"data": {"input": {"stdin": b64(b"input\n")}}})
            .to_string()
            .as_bytes(),
    ));
    let r = reply(
        sb.execd("POST", &format!("{PROCESS}/StreamInput"))
            .set("Content-Type", "application/connect+json")
            .send_bytes(&body),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, [envelope(0, b"{}"), envelope(2, b"{}")].concat());
    std::thread::sleep(Duration::from_millis(300));
    let r = unary(
        &sb,
        &format!("{PROCESS}/CloseStdin"),
        json!({"process": {"pid": pid}}),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let connected = reader.join().unwrap();
    let run = proc_run(&envelopes(&connected.body));
    assert_eq!(run.pid, pid);
    assert_eq!(String::from_utf8_lossy(&run.stdout), "hello\nmore input\n");
    assert_eq!(
        run.end,
        Some(json!({"exited": true, "status": "exit status 0"}))
    );

    // A recently ended process: Connect replays start + end; input and signals: not_found.
    let (_, evs) = stream(
        &sb,
        &format!("{PROCESS}/Connect"),
        json!({"process": {"pid": pid}}),
        &[],
    );
    let run = proc_run(&evs);
    assert_eq!(evs.len(), 3, "{evs:?}");
    assert_eq!(run.end.unwrap()["status"], "exit status 0");
    let r = unary(
        &sb,
        &format!("{PROCESS}/SendSignal"),
        json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
        None,
    );
    assert!(!r.assert_error(404, "not_found").is_empty());

    // SIGKILL ends a process and what it started.
    let pid = start_background(&sb, json!({"process": bash("sleep 1000 & sleep 1000")}));
    let r = unary(
        &sb,
        &format!("{PROCESS}/SendSignal"),
        json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let (_, evs) = stream(
        &sb,
        &format!("{PROCESS}/Connect"),
        json!({"process": {"pid": pid}}),
        &[],
    );
    assert_eq!(
        proc_run(&evs).end,
        Some(
            json!({"exitCode": -1, "exited": false, "status": "signal: killed", "error": "signal: killed"})
        )
    );
    let run = start(&sb, json!({"process": bash("pgrep -c sleep || true")}), &[]);
    assert_eq!(String::from_utf8_lossy(&run.stdout).trim(), "0");

    // Unknown processes, methods and codecs.
    unary(
        &sb,
        &format!("{PROCESS}/SendInput"),
        json!({"process": {"pid": 999999}, "input": {"stdin": "eA=="}}),
        None,
    )
    .assert_error(404, "not_found");
    let (_, evs) = stream(
        &sb,
        &format!("{PROCESS}/Connect"),
        json!({"process": {"tag": "nope"}}),
        &[],
    );
    assert_eq!(evs[0].1["error"]["code"], "not_found");
    unary(&sb, &format!("{PROCESS}/Nope"), json!({}), None).assert_error(501, "unimplemented");
    unary(
        &sb,
        &format!("{PROCESS}/SendSignal"),
        json!({"process": {"pid": 1}, "signal": "SIGNAL_SIGHUP"}),
        None,
    )
    .assert_error(400, "invalid_argument");
}

#[test]
fn pty_processes_take_input_and_resize() {
    let server = TestServer::start();
    let sb = server.create(json!({}));
    let pid = start_background(
        &sb,
        json!({"process": {"cmd": "/bin/bash", "args": ["--norc", "--noprofile"], "envs": {"TERM": "xterm-256color"}},
               "pty": {"size": {"cols": 100, "rows": 30}}}),
    );
    let r = unary(
        &sb,
        &format!("{PROCESS}/Update"),
        json!({"process": {"pid": pid}, "pty": {"size": {"cols": 120, "rows": 40}}}),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = unary(
        &sb,
        &format!("{PROCESS}/SendInput"),
        json!({"process": {"pid": pid}, "input": {"pty": b64(b"stty size; tty; exit 7\n")}}),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let (_, evs) = stream(
        &sb,
        &format!("{PROCESS}/Connect"),
        json!({"process": {"pid": pid}}),
        &[],
    );
    let run = proc_run(&evs);
    // Output that came before this Connect is not replayed; wait on the end.
    assert_eq!(run.end.unwrap()["exitCode"], 7);
    assert!(run.stdout.is_empty() && run.stderr.is_empty());
    // Terminal output arrives as `pty` data.
    let run = start(
        &sb,
        json!({"process": {"cmd": "/bin/bash", "args": ["-c", "stty size; tty"]}, "pty": {"size": {"cols": 100, "rows": 30}}}),
        &[],
    );
    let out = String::from_utf8_lossy(&run.pty).into_owned();
    assert!(out.contains("30 100"), "{out:?}");
    assert!(out.contains("/dev/pts/"), "{out:?}");
    assert!(run.stdout.is_empty());
}
