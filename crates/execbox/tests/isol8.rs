//! The isol8 API over real HTTP against a real server: every route and field of
//! `../shared/compat/isol8.md`, timeouts, memory overrun, output floods, policy refusals, tenant
//! separation and the warm pool's one-caller rule.

mod common;

use std::time::{Duration, Instant};

use common::{into_pair, TestServer};
use serde_json::{json, Value};

fn call(
    server: &TestServer,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut req = ureq::request(method, &server.url(path)).set("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    into_pair(match body {
        Some(b) => req.send_string(&b.to_string()),
        None => req.call(),
    })
}

fn execute(server: &TestServer, body: Value) -> (u16, Value) {
    call(server, "POST", "/execute", None, Some(&body))
}

fn ok(server: &TestServer, body: Value) -> Value {
    let (s, v) = execute(server, body);
    assert_eq!(s, 200, "{v}");
    v
}

fn refused(server: &TestServer, body: Value, field: &str) -> String {
    let (s, v) = execute(server, body);
    assert_eq!(s, 400, "{v}");
    let msg = v["error"].as_str().expect("error message").to_string();
    assert!(msg.contains(field), "{field} not named in {msg:?}");
    msg
}

/// `(stdout of ls of /proc's command lines)`: what runs in the sandbox.
const PROCESSES: &str =
    "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done";

#[test]
fn health_is_open_and_every_other_route_needs_the_key() {
    let server = TestServer::start_with_key("k-isol8");
    let (s, v) = server.get("/health");
    assert_eq!(s, 200);
    assert_eq!(v["status"], "ok");
    assert!(v["version"].as_str().is_some_and(|x| !x.is_empty()));
    let body = json!({"request": {"code": "print(1)", "runtime": "python"}});
    let (s, v) = call(&server, "POST", "/execute", None, Some(&body));
    assert_eq!(
        (s, v),
        (401, json!({"error": "Missing Authorization header"}))
    );
    let (s, v) = call(&server, "POST", "/execute", Some("wrong"), Some(&body));
    assert_eq!((s, v), (403, json!({"error": "Invalid API key"})));
    for (path, method) in [
        ("/sessions", "GET"),
        ("/session/x", "DELETE"),
        ("/file", "GET"),
    ] {
        let (s, _) = call(&server, method, path, None, None);
        assert_eq!(s, 401, "{method} {path}");
    }
    // The prefix is case-insensitive and optional.
    for header in ["bearer k-isol8", "k-isol8", "BEARER k-isol8"] {
        let r = ureq::post(&server.url("/execute"))
            .set("Content-Type", "application/json")
            .set("Authorization", header)
            .send_string(&body.to_string());
        let (s, v) = into_pair(r);
        assert_eq!(s, 200, "{header}: {v}");
        assert_eq!(v["stdout"], "1");
    }
}

#[test]
fn one_shot_runs_of_every_installed_runtime() {
    let server = TestServer::start();
    let v = ok(
        &server,
        json!({"request": {"code": "print(\"hello\")\n\n", "runtime": "python"}}),
    );
    assert_eq!(v["stdout"], "hello", "trailing whitespace is trimmed");
    assert_eq!(v["stderr"], "");
    assert_eq!(v["exitCode"], 0);
    assert_eq!(v["truncated"], false);
    assert_eq!(v["timedOut"], false);
    assert_eq!(v["oomKilled"], false);
    assert_eq!(v["runtime"], "python");
    let id = v["executionId"].as_str().expect("executionId");
    assert_eq!(id.len(), 36);
    assert_eq!(&id[14..15], "4", "UUID v4: {id}");
    let ts = v["timestamp"].as_str().expect("timestamp");
    assert!(ts.ends_with('Z') && ts.len() == 24, "{ts}");
    assert!(v["containerId"].as_str().is_some());
    assert!(v["durationMs"].as_u64().is_some());
    assert!(v.get("files").is_none());

    let v = ok(
        &server,
        json!({"request": {"code": "console.log([1,2].map(x => x * 2).join(','))", "runtime": "node"}}),
    );
    assert_eq!(v["stdout"], "2,4");
    let v = ok(
        &server,
        json!({"request": {"code": "const n: number = 41; console.log(n + 1)", "runtime": "bun"}}),
    );
    assert_eq!(v["stdout"], "42");
    let v = ok(
        &server,
        json!({"request": {"code": "echo $((6 * 7)); echo err >&2; exit 3", "runtime": "bash"}}),
    );
    assert_eq!(
        (v["stdout"].clone(), v["stderr"].clone()),
        (json!("42"), json!("err"))
    );
    assert_eq!(v["exitCode"], 3);
    // `cmd` always runs with bash, whatever the runtime.
    let v = ok(
        &server,
        json!({"request": {"cmd": "echo $BASH_VERSION | cut -c1", "runtime": "python"}}),
    );
    assert!(v["stdout"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
    // An unknown runtime and one not installed here are clear 400s naming it.
    let msg = refused(
        &server,
        json!({"request": {"code": "x", "runtime": "cobol"}}),
        "cobol",
    );
    assert_eq!(msg, "Unsupported runtime: cobol");
    refused(
        &server,
        json!({"request": {"code": "x", "runtime": "agent"}}),
        "Unsupported runtime: agent",
    );
}

#[test]
fn stdin_env_files_workdir_and_output_paths() {
    let server = TestServer::start();
    let v = ok(
        &server,
        json!({"request": {
            "runtime": "python",
            "code": "import os,sys\ndata=sys.stdin.read()\nprint(data[::-1], os.environ['GREETING'], os.getcwd())\nprint(open('/tmp/in/a.txt').read())\nopen('out.txt','w').write('result:'+data)",
            "stdin": "abc",
            "env": {"GREETING": "hi"},
            "files": {"/tmp/in/a.txt": "file one", "/sandbox/data/b.txt": "two"},
            "workdir": "data",
            "outputPaths": ["/sandbox/data/out.txt", "/sandbox/data/b.txt", "/sandbox/missing"],
        }}),
    );
    assert_eq!(v["stdout"], "cba hi /sandbox/data\nfile one", "{v}");
    let files = v["files"].as_object().expect("files");
    assert_eq!(files.len(), 2, "missing output paths are skipped: {v}");
    assert_eq!(files["/sandbox/data/out.txt"], "cmVzdWx0OmFiYw==");
    assert_eq!(files["/sandbox/data/b.txt"], "dHdv");
    // fileExtension picks the code file's type: CommonJS under node.
    let v = ok(
        &server,
        json!({"request": {"runtime": "node", "fileExtension": ".cjs", "stdin": "",
            "code": "const path = require('path'); console.log(path.extname(__filename))"}}),
    );
    assert_eq!(v["stdout"], ".cjs");
    // setupScript runs first, in /sandbox.
    let v = ok(
        &server,
        json!({"request": {"runtime": "bash", "setupScript": "echo ready > /sandbox/setup.txt",
            "code": "cat /sandbox/setup.txt"}}),
    );
    assert_eq!(v["stdout"], "ready");
}

#[test]
fn a_timeout_kills_the_whole_process_tree() {
    let server = TestServer::start();
    let v = ok(
        &server,
        json!({"request": {"runtime": "bash", "cmd": "echo started; sleep 30", "timeoutMs": 300}}),
    );
    assert_eq!(v["exitCode"], 137);
    assert_eq!(v["timedOut"], true);
    assert_eq!(v["oomKilled"], false);
    assert_eq!(v["stdout"], "started");
    assert!(
        v["stderr"]
            .as_str()
            .unwrap()
            .ends_with("\n--- EXECUTION TIMED OUT ---"),
        "{v}"
    );
    // In a session, where background processes normally survive a run, a timeout still takes
    // every process of the run with it.
    let s = json!("tree");
    let v = ok(
        &server,
        json!({"sessionId": s, "request": {"runtime": "bash",
            "cmd": "sleep 1001 & sleep 1002 & sleep 1003", "timeoutMs": 500}}),
    );
    assert_eq!(v["timedOut"], true);
    let v = ok(
        &server,
        json!({"sessionId": s, "request": {"runtime": "bash", "cmd": PROCESSES}}),
    );
    let ps = v["stdout"].as_str().unwrap();
    assert!(!ps.contains("sleep 100"), "survivors: {ps}");
    // Requests' timeoutMs wins over options.timeoutMs.
    let v = ok(
        &server,
        json!({"request": {"runtime": "bash", "cmd": "sleep 2; echo done", "timeoutMs": 5000},
               "options": {"timeoutMs": 100}}),
    );
    assert_eq!(
        (v["stdout"].clone(), v["timedOut"].clone()),
        (json!("done"), json!(false))
    );
}

#[test]
fn memory_overrun_is_oom_killed() {
    let server = TestServer::start();
    let v = ok(
        &server,
        json!({"request": {"runtime": "python", "code": "x = bytearray(300 * 1024 * 1024)\nprint('survived')"},
               "options": {"memoryLimit": "128m"}}),
    );
    assert_eq!(v["exitCode"], 137, "{v}");
    assert_eq!(v["oomKilled"], true);
    assert_eq!(v["timedOut"], false);
    assert_eq!(v["stdout"], "");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn output_floods_are_truncated_and_server_memory_stays_flat() {
    let server = TestServer::start();
    let v = ok(
        &server,
        json!({"request": {"runtime": "bash", "cmd": "yes | head -c 5000000; yes e | head -c 10 >&2"},
               "options": {"maxOutputSize": 1000}}),
    );
    assert_eq!(v["truncated"], true);
    let out = v["stdout"].as_str().unwrap();
    assert!(
        out.ends_with("\n\n--- OUTPUT TRUNCATED (5000000 bytes, limit: 1000) ---"),
        "{}",
        &out[out.len().saturating_sub(80)..]
    );
    assert!(out.len() < 1100);
    assert_eq!(v["stderr"], "e\ne\ne\ne\ne", "the other stream is whole");

    let pid = server.pid().expect("server pid");
    let before = rss_kib(pid);
    for _ in 0..2 {
        let v = ok(
            &server,
            json!({"request": {"runtime": "bash", "cmd": "head -c 150000000 /dev/zero | tr '\\0' x"}}),
        );
        assert_eq!(v["truncated"], true);
        assert!(v["stdout"].as_str().unwrap().len() < (1 << 20) + 100);
    }
    let after = rss_kib(pid);
    assert!(
        after < before + 64 * 1024,
        "server RSS grew from {before} KiB to {after} KiB after 300 MB of output"
    );
}

fn sse_events(server: &TestServer, body: &Value) -> (String, Vec<Value>) {
    let r = ureq::post(&server.url("/execute/stream"))
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .expect("stream");
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert_eq!(r.header("cache-control"), Some("no-cache"));
    let text = r.into_string().expect("body");
    let events = text
        .split("\n\n")
        .filter(|f| !f.is_empty())
        .map(|f| {
            let data = f
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("frame {f:?}"));
            serde_json::from_str(data).expect("json event")
        })
        .collect();
    (text, events)
}

#[test]
fn stream_sends_output_then_exit_and_always_runs_ephemerally() {
    let server = TestServer::start();
    let (_, events) = sse_events(
        &server,
        &json!({"sessionId": "ignored", "request": {"runtime": "bash",
            "cmd": "echo one; echo two >&2; sleep 0.2; echo three; exit 4"}}),
    );
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.last(), Some(&"exit"));
    assert_eq!(events.last().unwrap()["data"], "4", "exit code as a string");
    let out: String = events
        .iter()
        .filter(|e| e["type"] == "stdout")
        .map(|e| e["data"].as_str().unwrap())
        .collect();
    assert_eq!(out, "one\nthree\n");
    assert!(events
        .iter()
        .any(|e| e["type"] == "stderr" && e["data"] == "two\n" && e["phase"] == "code"));
    let (s, v) = server.get("/sessions");
    assert_eq!(s, 200);
    assert_eq!(v["sessions"], json!([]), "the stream ignored sessionId");

    let (_, events) = sse_events(
        &server,
        &json!({"request": {"runtime": "bash", "cmd": "sleep 20", "timeoutMs": 200}}),
    );
    assert_eq!(
        events,
        vec![
            json!({"type": "error", "data": "EXECUTION TIMED OUT"}),
            json!({"type": "exit", "data": "137"})
        ]
    );
    // Validation fails before the stream starts.
    let (s, v) = call(
        &server,
        "POST",
        "/execute/stream",
        None,
        Some(&json!({"request": {"code": "1"}})),
    );
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("request.runtime"));
}

#[test]
fn sessions_keep_files_and_processes_but_not_variables() {
    let server = TestServer::start();
    let sid = json!("s-1");
    let v = ok(
        &server,
        json!({"sessionId": sid, "request": {"runtime": "python",
            "code": "x = 5\nopen('/sandbox/state.txt','w').write('kept')\nimport subprocess\nsubprocess.Popen(['sleep','1234'])\nprint('ok')"}}),
    );
    assert_eq!(v["stdout"], "ok");
    let container = v["containerId"].clone();
    let v = ok(
        &server,
        json!({"sessionId": sid, "request": {"runtime": "python",
            "code": "import os\nprint(open('/sandbox/state.txt').read(), 'x' in dir())\nprint(any(b'sleep\\x001234' in open(f'/proc/{p}/cmdline','rb').read() for p in os.listdir('/proc') if p.isdigit()))"}}),
    );
    assert_eq!(v["stdout"], "kept False\nTrue", "{v}");
    assert_eq!(v["containerId"], container);
    let (_, v) = execute(
        &server,
        json!({"sessionId": sid, "request": {"runtime": "node", "code": "1"}}),
    );
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("Cannot switch runtime"),
        "{v}"
    );

    // /file works on the session's sandbox.
    let put = json!({"sessionId": sid, "path": "/sandbox/up.bin", "content": "AAEC/w=="});
    let (s, v) = call(&server, "POST", "/file", None, Some(&put));
    assert_eq!((s, v), (200, json!({"ok": true})));
    let (s, v) = server.get("/file?sessionId=s-1&path=/sandbox/up.bin");
    assert_eq!((s, v), (200, json!({"content": "AAEC/w=="})));
    let (s, v) = server.get("/file?sessionId=s-1&path=/sandbox/state.txt");
    assert_eq!((s, v), (200, json!({"content": "a2VwdA=="})));
    let (s, v) = server.get("/file?sessionId=s-1&path=/sandbox/nothing");
    assert_eq!((s, v), (404, json!({"error": "File not found"})));
    // A file beyond `max_file_bytes` (10 MB by default) is refused, not held in the server.
    let big = ok(
        &server,
        json!({"sessionId": sid, "request": {"runtime": "python",
            "code": "open('/sandbox/big.bin','wb').write(b'x' * 10_000_001)\nprint('made')"}}),
    );
    assert_eq!(big["stdout"], "made", "{big}");
    let (s, v) = server.get("/file?sessionId=s-1&path=/sandbox/big.bin");
    assert_eq!(s, 413, "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("10000000 bytes"),
        "{v}"
    );
    let (s, v) = server.get("/file?sessionId=s-1");
    assert_eq!((s, v), (400, json!({"error": "Missing sessionId or path"})));
    let (s, v) = server.get("/file?sessionId=nope&path=/sandbox/up.bin");
    assert_eq!((s, v), (404, json!({"error": "Session not found"})));
    let bad = json!({"sessionId": sid, "path": "/sandbox/x", "content": "not base64!"});
    let (s, v) = call(&server, "POST", "/file", None, Some(&bad));
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("content"), "{v}");
    let outside = json!({"sessionId": sid, "path": "/etc/passwd", "content": "AA=="});
    let (s, v) = call(&server, "POST", "/file", None, Some(&outside));
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("path"), "{v}");
    let nosession = json!({"sessionId": "nope", "path": "/sandbox/x", "content": "AA=="});
    let (s, v) = call(&server, "POST", "/file", None, Some(&nosession));
    assert_eq!((s, v), (404, json!({"error": "Session not found"})));

    // POST /session/{id}/signal reaches every process of the session.
    let sig = json!({"signal": "SIGKILL"});
    let (s, v) = call(&server, "POST", "/session/s-1/signal", None, Some(&sig));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["ok"], true);
    assert_eq!(v["signal"], "SIGKILL");
    assert_eq!(v["containerId"], container);
    let v = ok(
        &server,
        json!({"sessionId": sid, "request": {"runtime": "python",
            "code": "import os\nprint(any(b'sleep\\x001234' in open(f'/proc/{p}/cmdline','rb').read() for p in os.listdir('/proc') if p.isdigit()))"}}),
    );
    assert_eq!(v["stdout"], "False", "{v}");
    let (s, v) = call(&server, "POST", "/session/s-1/signal", None, Some(&sig));
    assert_eq!(
        (s, v),
        (400, json!({"error": "No running container for session"}))
    );
    let (s, v) = call(
        &server,
        "POST",
        "/session/s-1/signal",
        None,
        Some(&json!({"signal": "SIGFOO"})),
    );
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().starts_with("signal:"), "{v}");
    let (s, v) = call(&server, "POST", "/session/nope/signal", None, Some(&sig));
    assert_eq!((s, v), (404, json!({"error": "Session not found"})));

    let (s, v) = server.get("/sessions");
    assert_eq!(s, 200);
    let list = v["sessions"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], "s-1");
    assert_eq!(list[0]["isActive"], false);
    assert!(list[0]["lastAccessedAt"].as_i64().unwrap() > 1_700_000_000_000);
    for _ in 0..2 {
        let (s, v) = call(&server, "DELETE", "/session/s-1", None, None);
        assert_eq!((s, v), (200, json!({"ok": true})), "idempotent");
    }
    let (_, v) = server.get("/sessions");
    assert_eq!(v["sessions"], json!([]));
    let (s, _) = server.get("/file?sessionId=s-1&path=/sandbox/up.bin");
    assert_eq!(s, 404);
}

#[test]
fn tenants_never_see_each_others_sessions() {
    let server = TestServer::start_with_config(
        "[tenants]\nacme = [\"key-acme\"]\nglobex = [\"key-globex\"]\n\
         [policy.tenants.globex]\nmax_memory_bytes = 268435456\n",
    );
    let run = |key: &str, cmd: &str| {
        let body = json!({"sessionId": "shared", "request": {"runtime": "bash", "cmd": cmd}});
        let (s, v) = call(&server, "POST", "/execute", Some(key), Some(&body));
        assert_eq!(s, 200, "{v}");
        v
    };
    let a = run("key-acme", "echo acme-secret > /sandbox/s.txt; echo ok");
    let (s, v) = call(
        &server,
        "GET",
        "/file?sessionId=shared&path=/sandbox/s.txt",
        Some("key-globex"),
        None,
    );
    assert_eq!((s, v), (404, json!({"error": "Session not found"})));
    let (_, v) = call(&server, "GET", "/sessions", Some("key-globex"), None);
    assert_eq!(v["sessions"], json!([]));
    let (s, _) = call(
        &server,
        "DELETE",
        "/session/shared",
        Some("key-globex"),
        None,
    );
    assert_eq!(s, 200);
    // The same id under the other key is another sandbox.
    let g = run(
        "key-globex",
        "cat /sandbox/s.txt 2>/dev/null || echo absent",
    );
    assert_eq!(g["stdout"], "absent");
    assert_ne!(g["containerId"], a["containerId"]);
    // The other tenant's delete did not touch acme's session.
    let a2 = run("key-acme", "cat /sandbox/s.txt");
    assert_eq!(a2["stdout"], "acme-secret");
    let (_, v) = call(&server, "GET", "/sessions", Some("key-acme"), None);
    assert_eq!(v["sessions"].as_array().unwrap().len(), 1);
    // Each tenant has its own maxima.
    let big = json!({"request": {"runtime": "bash", "cmd": "echo ok"}, "options": {"memoryLimit": "300m"}});
    let (s, v) = call(&server, "POST", "/execute", Some("key-globex"), Some(&big));
    assert_eq!(
        (s, v),
        (
            400,
            json!({"error": "options.memoryLimit exceeds server maximum 256m"})
        )
    );
    let (s, v) = call(&server, "POST", "/execute", Some("key-acme"), Some(&big));
    assert_eq!((s, v["stdout"].clone()), (200, json!("ok")));
}

#[test]
fn pooled_sandboxes_serve_one_caller_only() {
    let server = TestServer::start();
    let first = ok(
        &server,
        json!({"request": {"runtime": "bash",
            "cmd": "echo secret > /tmp/left.txt; echo mine > /sandbox/left.txt; (sleep 999 &); export LEAK=1; echo done"}}),
    );
    assert_eq!(first["stdout"], "done");
    for _ in 0..3 {
        let next = ok(
            &server,
            json!({"request": {"runtime": "bash",
                "cmd": format!("ls /tmp /sandbox; echo LEAK=$LEAK; {PROCESSES}")}}),
        );
        let out = next["stdout"].as_str().unwrap();
        assert!(!out.contains("left.txt"), "{out}");
        assert!(!out.contains("sleep 999"), "{out}");
        assert!(out.contains("LEAK=\n") || out.contains("LEAK=\r"), "{out}");
        assert_ne!(next["containerId"], first["containerId"]);
    }
    // The used sandbox is destroyed.
    let used = first["containerId"].as_str().unwrap();
    let dir = server.state_dir.join("sandboxes").join(used);
    let deadline = Instant::now() + Duration::from_secs(10);
    while dir.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!dir.exists(), "{} still exists", dir.display());
    // Pooled and one-shot sandboxes are not lifecycle sandboxes.
    let (_, v) = server.get("/v1/sandboxes");
    assert_eq!(v["items"], json!([]));
}

#[test]
fn concurrent_one_shot_runs_all_succeed() {
    let server = TestServer::start();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..12)
            .map(|i| {
                let server = &server;
                s.spawn(move || {
                    ok(
                        server,
                        json!({"request": {"runtime": "python", "code": format!("print({i} * 2)")}}),
                    )
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            let v = h.join().expect("thread");
            assert_eq!(v["stdout"], (i * 2).to_string());
        }
    });
}

#[test]
fn secrets_are_masked_in_output() {
    let server = TestServer::start();
    let v = ok(
        &server,
        json!({"request": {"runtime": "bash", "cmd": "echo token=$API_TOKEN; printf '%s' \"$API_TOKEN\" >&2"},
               "options": {"secrets": {"API_TOKEN": "s3cr3t-value"}}}),
    );
    assert_eq!(v["stdout"], "token=***");
    assert_eq!(v["stderr"], "***");
    let (_, events) = sse_events(
        &server,
        &json!({"request": {"runtime": "bash",
            "cmd": "printf 's3cr'; sleep 0.2; printf '3t-value and more\\n'"},
               "options": {"secrets": {"API_TOKEN": "s3cr3t-value"}}}),
    );
    let out: String = events
        .iter()
        .filter(|e| e["type"] == "stdout")
        .map(|e| e["data"].as_str().unwrap())
        .collect();
    assert_eq!(
        out, "*** and more\n",
        "a secret split across chunks is masked"
    );
}

#[test]
fn policy_refuses_options_beyond_its_maxima_and_weaker_isolation() {
    let server = TestServer::start_with_config(
        "[policy]\nmax_memory_bytes = 268435456\nmax_cpus = 1.0\nmax_pids = 100\nmax_timeout_ms = 10000\n\
         max_output_bytes = 4096\nmax_sandbox_bytes = 67108864\nmax_tmp_bytes = 67108864\n",
    );
    let with = |options: Value| json!({"request": {"runtime": "python", "code": "print(1)"}, "options": options});
    let cases = [
        (
            json!({"memoryLimit": "300m"}),
            "options.memoryLimit exceeds server maximum 256m",
        ),
        (
            json!({"cpuLimit": 1.5}),
            "options.cpuLimit exceeds server maximum 1",
        ),
        (
            json!({"pidsLimit": 101}),
            "options.pidsLimit exceeds server maximum 100",
        ),
        (
            json!({"timeoutMs": 10001}),
            "options.timeoutMs exceeds server maximum 10000",
        ),
        (
            json!({"maxOutputSize": 4097}),
            "options.maxOutputSize exceeds server maximum 4096",
        ),
        (
            json!({"sandboxSize": "1g"}),
            "options.sandboxSize exceeds server maximum 64m",
        ),
        (
            json!({"tmpSize": "65m"}),
            "options.tmpSize exceeds server maximum 64m",
        ),
        (json!({"network": "host"}), "options.network"),
        (json!({"network": "filtered"}), "options.network"),
        (json!({"image": "python:3.12"}), "options.image"),
        (
            json!({"security": {"seccomp": "unconfined"}}),
            "options.security.seccomp",
        ),
        (
            json!({"security": {"seccomp": "custom", "customProfilePath": "/x"}}),
            "options.security.seccomp",
        ),
        (json!({"readonlyRootFs": false}), "options.readonlyRootFs"),
        (json!({"persist": true}), "options.persist"),
        (json!({"debug": true}), "options.debug"),
        (
            json!({"remoteCode": {"enabled": true}}),
            "options.remoteCode",
        ),
        (json!({"memoryLimit": "lots"}), "options.memoryLimit"),
    ];
    for (options, message) in cases {
        let (s, v) = execute(&server, with(options.clone()));
        assert_eq!(s, 400, "{options}: {v}");
        assert!(
            v["error"].as_str().unwrap().starts_with(message),
            "{options}: {v}"
        );
    }
    let (s, v) = execute(
        &server,
        json!({"request": {"runtime": "python", "code": "1", "timeoutMs": 20000}}),
    );
    assert_eq!(s, 400);
    assert_eq!(v["error"], "request.timeoutMs exceeds server maximum 10000");
    // The secure defaults are accepted, and the limits asked for hold.
    let v = ok(
        &server,
        with(
            json!({"network": "none", "image": "default", "readonlyRootFs": true,
            "security": {"seccomp": "strict"}, "persist": false, "debug": false,
            "memoryLimit": "200m", "cpuLimit": 0.5, "pidsLimit": 100, "poolStrategy": "secure",
            "mode": "persistent"}),
        ),
    );
    assert_eq!(v["stdout"], "1");
    let v = ok(
        &server,
        json!({"request": {"runtime": "bash", "cmd": "df -k /tmp /sandbox | tail -2 | awk '{print $2}'"},
               "options": {"tmpSize": "16m", "sandboxSize": "32m"}}),
    );
    // /tmp is a memory file system of exactly that size; /sandbox is on the sandbox's disk,
    // whose file system shows about the size asked for (less a little of its own tables).
    let sizes: Vec<u64> = v["stdout"]
        .as_str()
        .unwrap_or("")
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert_eq!(sizes.len(), 2, "{v}");
    assert_eq!(sizes[0], 16384, "{v}");
    assert!((31_000..=33_000).contains(&sizes[1]), "{v}");
}

#[test]
fn bad_requests_name_the_field() {
    let server = TestServer::start();
    refused(
        &server,
        json!({"request": {"runtime": "python"}}),
        "one of code, codeUrl or cmd",
    );
    refused(
        &server,
        json!({"request": {"runtime": "python", "code": "1", "cmd": "echo"}}),
        "mutually exclusive",
    );
    refused(
        &server,
        json!({"request": {"code": "1"}}),
        "request.runtime",
    );
    refused(
        &server,
        json!({"request": {"runtime": "python", "codeUrl": "https://example.com/x.py"}}),
        "request.codeUrl",
    );
    refused(
        &server,
        json!({"request": {"runtime": "python", "code": "1", "files": {"/etc/x": "a"}}}),
        "request.files",
    );
    refused(
        &server,
        json!({"request": {"runtime": "python", "code": "1", "files": {"/sandbox/../etc/x": "a"}}}),
        "request.files",
    );
    refused(
        &server,
        json!({"request": {"runtime": "python", "code": "1", "files": {"relative.txt": "a"}}}),
        "request.files",
    );
    refused(
        &server,
        json!({"request": {"runtime": "python", "code": "1", "workdir": "../etc"}}),
        "request.workdir",
    );
    refused(
        &server,
        json!({"request": {"runtime": "python", "code": "1", "installPackages": ["x; rm -rf /"]}}),
        "request.installPackages",
    );
    let msg = refused(
        &server,
        json!({"request": {"runtime": "python", "code": "1", "installPackages": ["numpy"]}}),
        "request.installPackages",
    );
    assert!(msg.contains("network"), "{msg}");
    refused(
        &server,
        json!({"request": {"runtime": "python", "code": "1", "timeoutMs": "soon"}}),
        "request.timeoutMs",
    );
    refused(
        &server,
        json!({"request": {"runtime": "python", "code": "1", "timeoutMs": 0}}),
        "request.timeoutMs",
    );
    refused(
        &server,
        json!({"request": {"runtime": "python", "code": "1", "outputPaths": ["out.txt"]}}),
        "request.outputPaths",
    );
    let env: serde_json::Map<String, Value> =
        (0..101).map(|i| (format!("V{i}"), json!("x"))).collect();
    refused(
        &server,
        json!({"request": {"runtime": "python", "code": "1", "env": env}}),
        "request.env",
    );
    refused(&server, json!({"options": {}}), "request");
    refused(
        &server,
        json!({"request": {"runtime": "python", "code": "1"}, "sessionId": ""}),
        "sessionId",
    );
    let r = ureq::post(&server.url("/execute"))
        .set("Content-Type", "application/json")
        .send_string("{not json");
    let (s, v) = into_pair(r);
    assert_eq!(s, 400);
    assert!(v["error"].as_str().is_some(), "{v}");
}

#[test]
fn concurrent_runs_beyond_the_tenants_limit_are_429() {
    let server = TestServer::start_with_config("[policy]\nmax_concurrent_runs = 1\n");
    std::thread::scope(|s| {
        let slow = s.spawn(|| {
            ok(
                &server,
                json!({"request": {"runtime": "bash", "cmd": "sleep 1.5; echo slow"}}),
            )
        });
        std::thread::sleep(Duration::from_millis(500));
        let (st, v) = execute(
            &server,
            json!({"request": {"runtime": "bash", "cmd": "echo fast"}}),
        );
        assert_eq!(st, 429, "{v}");
        assert!(v["error"].as_str().unwrap().contains("at most 1"), "{v}");
        assert_eq!(slow.join().expect("thread")["stdout"], "slow");
    });
    let v = ok(
        &server,
        json!({"request": {"runtime": "bash", "cmd": "echo again"}}),
    );
    assert_eq!(v["stdout"], "again");
}

#[test]
fn idle_sessions_are_removed_after_the_ttl() {
    let server = TestServer::start_with_config("[policy]\nsession_idle_ttl_secs = 1\n");
    let v = ok(
        &server,
        json!({"sessionId": "idle", "request": {"runtime": "bash", "cmd": "echo hi"}}),
    );
    let sandbox = v["containerId"].as_str().unwrap().to_string();
    let (_, v) = server.get("/sessions");
    assert_eq!(v["sessions"].as_array().unwrap().len(), 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, v) = server.get("/sessions");
        if v["sessions"] == json!([]) {
            break;
        }
        assert!(Instant::now() < deadline, "still there: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Its sandbox goes too (removal finishes just after the session leaves the list).
    while server.state_dir.join("sandboxes").join(&sandbox).exists() {
        assert!(
            Instant::now() < deadline,
            "the session's sandbox is still there"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (s, v) = server.get("/file?sessionId=idle&path=/sandbox/x");
    assert_eq!((s, v), (404, json!({"error": "Session not found"})));
    // A session in use is never pruned, however long its run.
    let v = ok(
        &server,
        json!({"sessionId": "busy", "request": {"runtime": "bash", "cmd": "sleep 3; echo done"}}),
    );
    assert_eq!(v["stdout"], "done");
}

/// Messages of one `/execute/ws` exchange: the events, then the close code and reason.
fn ws_exchange(server: &TestServer, first: &str, key: Option<&str>) -> (Vec<Value>, u16, String) {
    use tungstenite::client::IntoClientRequest;
    use tungstenite::Message;
    let mut req = format!("ws://127.0.0.1:{}/execute/ws", server.port)
        .into_client_request()
        .expect("request");
    if let Some(k) = key {
        req.headers_mut().insert(
            "Authorization",
            format!("Bearer {k}").parse().expect("header"),
        );
    }
    let stream = std::net::TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let (mut ws, _) = tungstenite::client(req, stream).expect("upgrade");
    ws.send(Message::text(first)).expect("send");
    // Accepted and ignored.
    let _ = ws.send(Message::text(r#"{"type":"stdin","data":"x"}"#));
    let mut events = Vec::new();
    loop {
        match ws.read().expect("read") {
            Message::Text(t) => events.push(serde_json::from_str(t.as_str()).expect("json")),
            Message::Close(frame) => {
                let (code, reason) = frame
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((0, String::new()));
                return (events, code, reason);
            }
            _ => {}
        }
    }
}

#[test]
fn websocket_execute_sends_one_message_per_event() {
    let server = TestServer::start_with_key("k-ws");
    let body = json!({"type": "execute",
        "request": {"runtime": "bash", "cmd": "echo one; sleep 0.2; echo two >&2; exit 5"}});
    let (events, code, reason) = ws_exchange(&server, &body.to_string(), Some("k-ws"));
    assert_eq!((code, reason.as_str()), (1000, "Execution complete"));
    let out: String = events
        .iter()
        .filter(|e| e["type"] == "stdout")
        .map(|e| e["data"].as_str().unwrap())
        .collect();
    assert_eq!(out, "one\n");
    assert!(events
        .iter()
        .any(|e| e["type"] == "stderr" && e["data"] == "two\n"));
    assert_eq!(events.last(), Some(&json!({"type": "exit", "data": "5"})));
    // Invalid JSON: an error event, then 1003.
    let (events, code, _) = ws_exchange(&server, "{nope", Some("k-ws"));
    assert_eq!(code, 1003);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["type"], "error");
    // A refused request names the field.
    let bad = json!({"type": "execute", "request": {"runtime": "cobol", "code": "x"}});
    let (events, code, _) = ws_exchange(&server, &bad.to_string(), Some("k-ws"));
    assert_eq!(code, 1008);
    assert_eq!(events[0]["data"], "Unsupported runtime: cobol");
    // The upgrade needs the key like every other route.
    let r = ureq::get(&server.url("/execute/ws")).call();
    assert_eq!(into_pair(r).0, 401);
}
