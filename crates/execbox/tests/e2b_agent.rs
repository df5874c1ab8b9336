//! The agent's E2B routes (`/e2b/envd/…`, `/e2b/ci/…`) end to end on a real `execbox serve`,
//! reached through the OpenSandbox proxy to the agent (port 44772) with the paths the server's
//! E2B routing forwards to. The SDK-level tests over the E2B data plane itself live with the
//! server's routing.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{reply, Reply, Sandbox, TestServer, CODE_INTERPRETER_IMAGE};
use serde_json::{json, Value};

const PROCESS: &str = "/e2b/envd/process.Process";
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
    // What a command leaves running in the background outlives it, as under envd.
    let run = start(
        &sb,
        json!({"process": bash("sleep 1000 >/dev/null 2>&1 &")}),
        &[],
    );
    assert_eq!(run.end.unwrap()["status"], "exit status 0");
    let run = start(&sb, json!({"process": bash("pgrep -c sleep || true")}), &[]);
    assert_eq!(String::from_utf8_lossy(&run.stdout).trim(), "1");

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

fn multipart(parts: &[(&str, &str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "e2b-test-boundary";
    let mut body = Vec::new();
    for (name, filename, data) in parts {
        body.extend(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[test]
fn files_rest_and_filesystem_rpcs() {
    let server = TestServer::start();
    let sb = server.create(json!({}));

    let r = reply(sb.execd("GET", "/e2b/envd/health").call());
    assert_eq!(r.status, 204);

    // Raw body with `path`; parents created; relative to the user's home.
    let r = reply(
        sb.execd("POST", "/e2b/envd/files?path=data/a.txt")
            .set("Content-Type", "application/octet-stream")
            .send_bytes(b"hello"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!([{"name": "a.txt", "type": "file", "path": "/home/user/data/a.txt"}])
    );
    let r = reply(
        sb.execd("GET", "/e2b/envd/files?path=%2Fhome%2Fuser%2Fdata%2Fa.txt")
            .call(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"hello");
    assert!(r
        .header("content-disposition")
        .unwrap()
        .starts_with("inline;"));

    // A gzip-encoded raw body (the SDKs' `gzip=True`).
    const GZ: &[u8] = &[
        31, 139, 8, 0, 0, 0, 0, 0, 2, 3, 203, 72, 205, 201, 201, 87, 72, 175, 202, 44, 224, 2, 0,
        57, 124, 99, 86, 11, 0, 0, 0,
    ];
    let r = reply(
        sb.execd("POST", "/e2b/envd/files?path=/tmp/gz.txt")
            .set("Content-Type", "application/octet-stream")
            .set("Content-Encoding", "gzip")
            .send_bytes(GZ),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = reply(sb.execd("GET", "/e2b/envd/files?path=/tmp/gz.txt").call());
    assert_eq!(r.body, b"hello gzip\n");
    let r = reply(
        sb.execd("POST", "/e2b/envd/files?path=/tmp/bad.txt")
            .set("Content-Type", "application/octet-stream")
            .set("Content-Encoding", "gzip")
            .send_bytes(b"not gzip"),
    );
    assert_eq!(r.status, 400, "{}", r.text());

    // Multipart: each part's filename is its path when `path` is absent.
    let (ct, body) = multipart(&[
        ("file", "/tmp/up/one.txt", b"1"),
        ("other", "ignored", b"x"),
        ("file", "two.txt", b"22"),
    ]);
    let r = reply(
        sb.execd("POST", "/e2b/envd/files")
            .set("Content-Type", &ct)
            .send_bytes(&body),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!([
            {"name": "one.txt", "type": "file", "path": "/tmp/up/one.txt"},
            {"name": "two.txt", "type": "file", "path": "/home/user/two.txt"}
        ])
    );
    // With `path`: the single part goes there.
    let (ct, body) = multipart(&[("file", "blob", b"333")]);
    let r = reply(
        sb.execd("POST", "/e2b/envd/files?path=%2Ftmp%2Fnamed.txt")
            .set("Content-Type", &ct)
            .send_bytes(&body),
    );
    assert_eq!(r.json()[0]["path"], "/tmp/named.txt", "{}", r.text());
    let r = reply(
        sb.execd("GET", "/e2b/envd/files?path=/tmp/named.txt")
            .call(),
    );
    assert_eq!(r.body, b"333");
    // Two parts to one path.
    let (ct, body) = multipart(&[("file", "/tmp/d.txt", b"1"), ("file", "/tmp/d.txt", b"2")]);
    let r = reply(
        sb.execd("POST", "/e2b/envd/files")
            .set("Content-Type", &ct)
            .send_bytes(&body),
    );
    assert_eq!(r.status, 400, "{}", r.text());

    // Errors: `{"code":<int>,"message"}`.
    let r = reply(sb.execd("GET", "/e2b/envd/files?path=/nope").call());
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["code"], 404);
    assert!(r.json()["message"].is_string());
    let r = reply(sb.execd("GET", "/e2b/envd/files?path=/tmp").call());
    assert_eq!((r.status, r.json()["code"].clone()), (400, json!(400)));
    let r = reply(
        sb.execd(
            "GET",
            "/e2b/envd/files?path=/tmp/named.txt&username=mallory",
        )
        .call(),
    );
    assert_eq!((r.status, r.json()["code"].clone()), (401, json!(401)));
    let r = reply(
        sb.execd("GET", "/e2b/envd/files?path=/proc/self/status")
            .call(),
    );
    assert_eq!(r.status, 400, "{}", r.text());

    // As root: owned by root, relative to /root.
    let r = reply(
        sb.execd("POST", "/e2b/envd/files?path=r.txt&username=root")
            .set("Content-Type", "application/octet-stream")
            .send_bytes(b"r"),
    );
    assert_eq!(r.json()[0]["path"], "/root/r.txt", "{}", r.text());

    // Stat.
    let r = unary(
        &sb,
        &format!("{FS}/Stat"),
        json!({"path": "data/a.txt"}),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let e = &r.json()["entry"];
    assert_eq!(e["name"], "a.txt");
    assert_eq!(e["type"], "FILE_TYPE_FILE");
    assert_eq!(e["path"], "/home/user/data/a.txt");
    assert_eq!(e["size"], "5");
    assert_eq!(e["owner"], "user");
    assert_eq!(e["permissions"], "-rw-r--r--", "{e}");
    assert_eq!(e["mode"], 0o644, "{e}");
    assert!(e["modifiedTime"].as_str().unwrap().contains('T'), "{e}");
    let r = unary(
        &sb,
        &format!("{FS}/Stat"),
        json!({"path": "/root/r.txt"}),
        None,
    );
    assert_eq!(r.json()["entry"]["owner"], "root", "{}", r.text());
    unary(&sb, &format!("{FS}/Stat"), json!({"path": "/nope"}), None)
        .assert_error(404, "not_found");
    unary(
        &sb,
        &format!("{FS}/Stat"),
        json!({"path": "/proc/1/status"}),
        None,
    )
    .assert_error(400, "invalid_argument");

    // MakeDir.
    let r = unary(
        &sb,
        &format!("{FS}/MakeDir"),
        json!({"path": "/tmp/m/n"}),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["entry"]["type"], "FILE_TYPE_DIRECTORY");
    assert!(r.json()["entry"]["permissions"]
        .as_str()
        .unwrap()
        .starts_with("drwx"));
    unary(
        &sb,
        &format!("{FS}/MakeDir"),
        json!({"path": "/tmp/m/n"}),
        None,
    )
    .assert_error(409, "already_exists");
    unary(
        &sb,
        &format!("{FS}/MakeDir"),
        json!({"path": "/tmp/named.txt"}),
        None,
    )
    .assert_error(400, "invalid_argument");

    // Move: destination parents created.
    let r = unary(
        &sb,
        &format!("{FS}/Move"),
        json!({"source": "/tmp/named.txt", "destination": "/tmp/m/moved/x.txt"}),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["entry"]["path"], "/tmp/m/moved/x.txt");
    unary(
        &sb,
        &format!("{FS}/Move"),
        json!({"source": "/tmp/none", "destination": "/tmp/y"}),
        None,
    )
    .assert_error(404, "not_found");

    // ListDir: depth 0 is 1; the root is excluded.
    let names = |r: Reply| -> Vec<String> {
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["path"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        names(unary(
            &sb,
            &format!("{FS}/ListDir"),
            json!({"path": "/tmp/m"}),
            None
        )),
        ["/tmp/m/moved", "/tmp/m/n"]
    );
    assert_eq!(
        names(unary(
            &sb,
            &format!("{FS}/ListDir"),
            json!({"path": "/tmp/m", "depth": 3}),
            None
        )),
        ["/tmp/m/moved", "/tmp/m/moved/x.txt", "/tmp/m/n"]
    );
    unary(
        &sb,
        &format!("{FS}/ListDir"),
        json!({"path": "/tmp/m/moved/x.txt"}),
        None,
    )
    .assert_error(400, "invalid_argument");
    unary(
        &sb,
        &format!("{FS}/ListDir"),
        json!({"path": "/tmp/zz"}),
        None,
    )
    .assert_error(404, "not_found");

    // Remove: recursive; a missing path is fine.
    let r = unary(
        &sb,
        &format!("{FS}/Remove"),
        json!({"path": "/tmp/m"}),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = unary(
        &sb,
        &format!("{FS}/Remove"),
        json!({"path": "/tmp/m"}),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    unary(&sb, &format!("{FS}/Stat"), json!({"path": "/tmp/m"}), None)
        .assert_error(404, "not_found");

    // The polled watcher.
    unary(
        &sb,
        &format!("{FS}/MakeDir"),
        json!({"path": "/tmp/w"}),
        None,
    );
    let r = unary(
        &sb,
        &format!("{FS}/CreateWatcher"),
        json!({"path": "/tmp/w"}),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.json()["watcherId"].as_str().unwrap().to_string();
    start(
        &sb,
        json!({"process": bash("echo x > /tmp/w/new.txt")}),
        &[],
    );
    std::thread::sleep(Duration::from_millis(600));
    let r = unary(
        &sb,
        &format!("{FS}/GetWatcherEvents"),
        json!({"watcherId": id}),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let events = r.json()["events"].clone();
    assert!(
        events
            .as_array()
            .unwrap()
            .contains(&json!({"name": "new.txt", "type": "EVENT_TYPE_CREATE"})),
        "{events}"
    );
    let r = unary(
        &sb,
        &format!("{FS}/GetWatcherEvents"),
        json!({"watcherId": id}),
        None,
    );
    assert_eq!(r.json()["events"], json!([]));
    let r = unary(
        &sb,
        &format!("{FS}/RemoveWatcher"),
        json!({"watcherId": id}),
        None,
    );
    assert_eq!(r.status, 200);
    unary(
        &sb,
        &format!("{FS}/GetWatcherEvents"),
        json!({"watcherId": id}),
        None,
    )
    .assert_error(404, "not_found");
    unary(
        &sb,
        &format!("{FS}/CreateWatcher"),
        json!({"path": "/tmp/nowhere"}),
        None,
    )
    .assert_error(404, "not_found");

    // The streaming watcher, bounded by its Connect-Timeout-Ms.
    let endpoint = sb.endpoint.clone();
    let token = sb.token.clone();
    let watcher = std::thread::spawn(move || {
        reply(
            ureq::post(&format!("{endpoint}{FS}/WatchDir"))
                .set("X-EXECD-ACCESS-TOKEN", &token)
                .set("Content-Type", "application/connect+json")
                .set("Connect-Timeout-Ms", "2500")
                .send_bytes(&envelope(0, br#"{"path":"/tmp/w","recursive":true}"#)),
        )
    });
    std::thread::sleep(Duration::from_millis(800));
    start(
        &sb,
        json!({"process": bash("mkdir /tmp/w/d && echo y > /tmp/w/d/deep.txt")}),
        &[],
    );
    let r = watcher.join().unwrap();
    let evs = envelopes(&r.body);
    assert_eq!(evs[0], (0, json!({"start": {}})));
    let got: Vec<Value> = evs
        .iter()
        .filter_map(|(_, v)| v.get("filesystem").cloned())
        .collect();
    assert!(
        got.contains(&json!({"name": "d/deep.txt", "type": "EVENT_TYPE_CREATE"})),
        "{got:?}"
    );
    assert_eq!(evs.last().unwrap().1["error"]["code"], "deadline_exceeded");
}

/// `POST /e2b/ci/execute`, read to its end: one JSON object per line.
fn execute(sb: &Sandbox, body: Value) -> Vec<Value> {
    let r = reply(
        sb.execd("POST", "/e2b/ci/execute")
            .set("Content-Type", "application/json")
            .send_string(&body.to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    assert!(text.ends_with('\n'), "{text:?}");
    let lines: Vec<Value> = text
        .split_terminator('\n')
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("line {l:?}")))
        .collect();
    assert_eq!(
        lines.last().unwrap(),
        &json!({"type": "end_of_execution"}),
        "{lines:?}"
    );
    lines
}

fn of_type<'a>(lines: &'a [Value], kind: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["type"] == kind).collect()
}

#[test]
fn code_interpreter_execute_and_contexts() {
    let server = TestServer::start();
    let sb = server.create(json!({"image": {"uri": CODE_INTERPRETER_IMAGE},
        "resourceLimits": {"cpu": "2", "memory": "2Gi"}}));

    // The default Python context (Python's SDK sends nulls).
    let lines = execute(
        &sb,
        json!({"code": "x = 1 + 1\nprint('hi')\nx", "context_id": null, "language": null, "env_vars": null}),
    );
    let out = of_type(&lines, "stdout");
    assert_eq!(out.len(), 1, "{lines:?}");
    assert_eq!(out[0]["text"], "hi\n");
    assert!(out[0]["timestamp"].as_str().unwrap().contains('T'));
    let results = of_type(&lines, "result");
    assert_eq!(results.len(), 1, "{lines:?}");
    assert_eq!(results[0]["text"], "2");
    assert_eq!(results[0]["is_main_result"], true);
    assert_eq!(results[0]["extra"], json!({}));
    let count = of_type(&lines, "number_of_executions");
    assert!(
        count[0]["execution_count"].as_u64().unwrap() >= 1,
        "{lines:?}"
    );

    // State persists; env_vars apply to the run; strings lose one layer of quotes.
    let lines = execute(
        &sb,
        json!({"code": "import os\nos.environ['FOO'] + str(x)", "env_vars": {"FOO": "bar"}}),
    );
    assert_eq!(of_type(&lines, "result")[0]["text"], "bar2", "{lines:?}");

    // Errors.
    let lines = execute(&sb, json!({"code": "1/0"}));
    let err = of_type(&lines, "error");
    assert_eq!(err.len(), 1, "{lines:?}");
    assert_eq!(err[0]["name"], "ZeroDivisionError");
    assert_eq!(err[0]["value"], "division by zero");
    assert!(err[0]["traceback"].is_string());

    // A matplotlib figure shown: a display result with a PNG.
    let lines = execute(
        &sb,
        json!({"code": "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()"}),
    );
    let results = of_type(&lines, "result");
    let png = results
        .iter()
        .find(|r| r.get("png").is_some())
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(png["is_main_result"], false);
    assert!(unb64(png["png"].as_str().unwrap()).starts_with(b"\x89PNG"));

    // Contexts: create, use, list, restart (same id, state lost), delete.
    let r = reply(
        sb.execd("POST", "/e2b/ci/contexts")
            .set("Content-Type", "application/json")
            .send_string(r#"{"language": "js"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let ctx = r.json();
    assert_eq!(ctx["language"], "javascript");
    assert_eq!(ctx["cwd"], "/home/user");
    let id = ctx["id"].as_str().unwrap().to_string();
    let lines = execute(&sb, json!({"code": "var a = 5; a * 2", "context_id": id}));
    assert_eq!(of_type(&lines, "result")[0]["text"], "10", "{lines:?}");
    let r = reply(sb.execd("GET", "/e2b/ci/contexts").call());
    let listed = r.json();
    let listed = listed.as_array().unwrap();
    assert!(listed.iter().any(|c| c["id"] == id.as_str()), "{listed:?}");
    // The default contexts are listed too.
    for lang in ["python", "javascript"] {
        assert!(
            listed
                .iter()
                .any(|c| c["language"] == lang && c["id"] != id.as_str()),
            "{listed:?}"
        );
    }
    // A restart during a run ends it with ContextRestarting.
    let endpoint = sb.endpoint.clone();
    let token = sb.token.clone();
    let ctx_id = id.clone();
    let running = std::thread::spawn(move || {
        reply(
            ureq::post(&format!("{endpoint}/e2b/ci/execute"))
                .set("X-EXECD-ACCESS-TOKEN", &token)
                .send_string(&json!({"code": "while (true) {}", "context_id": ctx_id}).to_string()),
        )
        .text()
    });
    std::thread::sleep(Duration::from_millis(800));
    let r = reply(
        sb.execd("POST", &format!("/e2b/ci/contexts/{id}/restart"))
            .send_string(""),
    );
    assert_eq!((r.status, r.text()), (200, "null".to_string()));
    let text = running.join().unwrap();
    assert!(text.contains(r#""name":"ContextRestarting""#), "{text}");
    assert!(
        text.ends_with("{\"type\":\"end_of_execution\"}\n"),
        "{text}"
    );
    let lines = execute(&sb, json!({"code": "typeof a", "context_id": id}));
    assert_eq!(
        of_type(&lines, "result")[0]["text"],
        "undefined",
        "{lines:?}"
    );
    let r = reply(sb.execd("DELETE", &format!("/e2b/ci/contexts/{id}")).call());
    assert_eq!((r.status, r.text()), (200, "null".to_string()));
    let r = reply(sb.execd("DELETE", &format!("/e2b/ci/contexts/{id}")).call());
    assert_eq!(
        (r.status, r.text()),
        (404, format!("Context {id} not found"))
    );

    // A client that goes away interrupts its run: the next one in the context does not wait.
    {
        let resp = sb
            .execd("POST", "/e2b/ci/execute")
            .send_string(r#"{"code": "import time\ntime.sleep(60)"}"#)
            .expect("execute");
        std::thread::sleep(Duration::from_millis(800));
        drop(resp);
    }
    let t = Instant::now();
    let lines = execute(&sb, json!({"code": "'after'"}));
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert_eq!(of_type(&lines, "result")[0]["text"], "after", "{lines:?}");

    // Plain-text errors.
    let r = reply(
        sb.execd("POST", "/e2b/ci/execute")
            .send_string(r#"{"code": "1", "context_id": "x", "language": "python"}"#),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let r = reply(
        sb.execd("POST", "/e2b/ci/execute")
            .send_string(r#"{"code": "1", "context_id": "nope"}"#),
    );
    assert_eq!(
        (r.status, r.text()),
        (404, "Context nope not found".to_string())
    );

    // Bash, on execbox's bash contexts.
    let lines = execute(
        &sb,
        json!({"code": "echo hi; echo err >&2", "language": "bash"}),
    );
    assert_eq!(of_type(&lines, "stdout")[0]["text"], "hi\n", "{lines:?}");
    assert_eq!(of_type(&lines, "stderr")[0]["text"], "err\n", "{lines:?}");
}
