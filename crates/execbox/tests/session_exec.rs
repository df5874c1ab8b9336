//! The session-execute API (`/api/…`, `shared/compat/session-exec.md`) over real HTTP against a
//! real server: executions of commands and TypeScript in persistent sessions, files, listings,
//! processes, streaming, limits, tenants, auth and the error envelope.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// A server of the session-execute API and the key its requests carry.
struct Api {
    server: Option<TestServer>,
    key: Option<String>,
}

impl Api {
    fn start() -> Self {
        Self {
            server: Some(TestServer::start()),
            key: None,
        }
    }

    fn with_key(key: &str) -> Self {
        Self {
            server: Some(TestServer::start_with_key(key)),
            key: Some(key.to_string()),
        }
    }

    fn with_config(toml: &str) -> Self {
        Self {
            server: Some(TestServer::start_with_config(toml)),
            key: None,
        }
    }

    fn server(&self) -> &TestServer {
        self.server.as_ref().expect("running server")
    }

    fn request(&self, method: &str, path: &str, key: Option<&str>) -> ureq::Request {
        let r = ureq::request(method, &self.server().url(path));
        match key.or(self.key.as_deref()) {
            Some(k) => r.set("Authorization", &format!("Bearer {k}")),
            None => r,
        }
    }

    fn post_raw(&self, path: &str, body: &str, key: Option<&str>) -> (u16, Value) {
        into_pair(
            self.request("POST", path, key)
                .set("Content-Type", "application/json")
                .send_string(body),
        )
    }

    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.post_raw(path, &body.to_string(), None)
    }

    fn post_as(&self, key: &str, path: &str, body: Value) -> (u16, Value) {
        self.post_raw(path, &body.to_string(), Some(key))
    }

    fn get_as(&self, key: Option<&str>, path: &str) -> (u16, Value) {
        into_pair(self.request("GET", path, key).call())
    }

    fn get(&self, path: &str) -> (u16, Value) {
        self.get_as(None, path)
    }

    /// `POST /api/execute`, which must answer 200.
    #[track_caller]
    fn exec(&self, body: Value) -> Value {
        let (s, v) = self.post("/api/execute", body.clone());
        assert_eq!(s, 200, "{body} -> {v}");
        v
    }

    /// Runs `command` in `session` and returns its stdout, requiring exit code 0.
    #[track_caller]
    fn sh(&self, session: &str, command: &str) -> String {
        let v = self.exec(json!({"sessionId": session, "command": command}));
        assert_eq!(v["exitCode"], 0, "{command}: {v}");
        v["stdout"].as_str().unwrap_or_default().to_string()
    }
}

/// Asserts an error envelope and returns its message.
#[track_caller]
fn assert_error(reply: &(u16, Value), status: u16, code: &str) -> String {
    let (s, v) = reply;
    assert_eq!(*s, status, "{v}");
    assert_eq!(v["code"], code, "{v}");
    let msg = v["error"].as_str().expect("error message").to_string();
    assert!(!msg.is_empty());
    assert_eq!(
        v.as_object().map(|o| o.len()),
        Some(2),
        "only error and code: {v}"
    );
    msg
}

/// Command lines of every process of a session (pid, cmdline with spaces).
fn processes(api: &Api, session: &str) -> Vec<(i32, String)> {
    let out = api.sh(
        session,
        r#"for p in $(ls /proc | grep -E '^[0-9]+$'); do c=$(tr '\0' ' ' 2>/dev/null < /proc/$p/cmdline) && echo "$p $c"; done; true"#,
    );
    out.lines()
        .filter_map(|l| {
            let (pid, cmd) = l.split_once(' ')?;
            Some((pid.parse().ok()?, cmd.trim().to_string()))
        })
        .collect()
}

fn b64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn command_runs_in_the_workspace_with_env_and_every_field() {
    let api = Api::start();
    let v = api.exec(json!({
        "sessionId": "s1",
        "command": "echo \"$GREETING from $(pwd)\"; echo oops >&2; exit 3",
        "env": {"GREETING": "hello", "_UNUSED1": "x"},
    }));
    assert_eq!(v["stdout"], "hello from /workspace\n", "{v}");
    assert_eq!(v["stderr"], "oops\n");
    assert_eq!(v["exitCode"], 3, "a failing command is still a 200");
    assert_eq!(v["timedOut"], false);
    assert_eq!(v["filesWritten"], json!([]));
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "cpuTime",
            "executionTime",
            "exitCode",
            "filesWritten",
            "memoryUsed",
            "stderr",
            "stdout",
            "timedOut"
        ]
    );
    for k in ["executionTime", "memoryUsed", "cpuTime"] {
        assert!(v[k].is_u64(), "{k}: {v}");
    }
    // The env was for that execution only.
    assert_eq!(api.sh("s1", "echo \"[$GREETING]\""), "[]\n");
}

#[test]
fn typescript_code_runs_with_bun_and_imports_workspace_files() {
    let api = Api::start();
    let v = api.exec(json!({
        "sessionId": "ts",
        "code": "const x: number = 41;\nconsole.log(x + 1);\nconsole.log(process.cwd());",
    }));
    assert_eq!(v["stdout"], "42\n/workspace\n", "{v}");
    assert_eq!(v["exitCode"], 0);
    assert_eq!(
        v["filesWritten"],
        json!([]),
        "the code file is never reported"
    );
    // The request's files are importable from the code, relative to cwd.
    let v = api.exec(json!({
        "sessionId": "ts2",
        "files": [{"path": "src/lib.ts", "content": "export const answer: number = 42;"}],
        "code": "import { answer } from './src/lib.ts';\nconsole.log(answer);",
    }));
    assert_eq!(v["stdout"], "42\n", "{v}");
    assert_eq!(v["filesWritten"], json!(["/workspace/src/lib.ts"]));
    let v = api.exec(json!({"sessionId": "ts", "code": "throw new Error('bad')"}));
    assert_ne!(v["exitCode"], 0, "{v}");
    assert!(v["stderr"].as_str().unwrap_or("").contains("bad"), "{v}");
    // Nothing of the code files is left behind.
    assert_eq!(
        api.sh(
            "ts",
            "ls -A /workspace; ls -A /tmp | grep execbox-code || true"
        ),
        ""
    );
}

#[test]
fn files_are_written_before_the_run_and_reported_sorted() {
    let api = Api::start();
    let bytes: Vec<u8> = (0u8..=255).collect();
    let v = api.exec(json!({
        "sessionId": "f",
        "command": "cat src/b.txt; cmp data.bin /tmp/in/data.bin && echo same; \
                    echo made > made.txt; mkdir -p deep/er && touch deep/er/z; echo t > /tmp/scratch",
        "files": [
            {"path": "src/b.txt", "content": "from utf8\n"},
            {"path": "data.bin", "content": b64(&bytes), "encoding": "base64"},
            {"path": "/tmp/in/data.bin", "content": b64(&bytes), "encoding": "base64"},
            {"path": "a.txt", "content": "", "encoding": "utf8"},
        ],
    }));
    assert_eq!(v["stdout"], "from utf8\nsame\n", "{v}");
    assert_eq!(
        v["filesWritten"],
        json!([
            "/tmp/in/data.bin",
            "/workspace/a.txt",
            "/workspace/data.bin",
            "/workspace/deep/er/z",
            "/workspace/made.txt",
            "/workspace/src/b.txt",
        ]),
        "request files plus files made under /workspace, not /tmp/scratch: {v}"
    );
    // Existing files are overwritten; unchanged ones are not reported again, even by a call
    // right after the one that wrote them.
    let v = api.exec(json!({
        "sessionId": "f",
        "command": "cat a.txt",
        "files": [{"path": "a.txt", "content": "second"}],
    }));
    assert_eq!(v["stdout"], "second");
    assert_eq!(v["filesWritten"], json!(["/workspace/a.txt"]));
}

#[test]
fn cwd_is_created_and_relative_file_paths_follow_it() {
    let api = Api::start();
    let v = api.exec(json!({
        "sessionId": "c",
        "cwd": "/workspace/app/sub",
        "command": "pwd; cat ../up.txt here.txt",
        "files": [{"path": "../up.txt", "content": "up "}, {"path": "here.txt", "content": "here"}],
    }));
    assert_eq!(v["stdout"], "/workspace/app/sub\nup here", "{v}");
    assert_eq!(
        v["filesWritten"],
        json!(["/workspace/app/sub/here.txt", "/workspace/app/up.txt"])
    );
    let v = api.exec(json!({"sessionId": "c", "cwd": "/tmp/work", "command": "pwd"}));
    assert_eq!(v["stdout"], "/tmp/work\n");
    let v = api.exec(json!({"sessionId": "c", "cwd": "rel", "command": "pwd"}));
    assert_eq!(v["stdout"], "/workspace/rel\n");
}

#[test]
fn a_timeout_kills_the_whole_process_tree() {
    let api = Api::start();
    let t = Instant::now();
    let v = api.exec(json!({
        "sessionId": "t",
        "command": "sleep 100 & sleep 100",
        "timeout": 1,
    }));
    assert_eq!(v["timedOut"], true, "{v}");
    assert_eq!(v["exitCode"], 137);
    let ms = v["executionTime"].as_u64().unwrap();
    assert!((900..4000).contains(&ms), "{v}");
    assert!(t.elapsed() < Duration::from_secs(10));
    let left: Vec<_> = processes(&api, "t")
        .into_iter()
        .filter(|(_, c)| c.contains("sleep"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn the_default_timeout_applies_and_the_configured_maximum_caps_it() {
    // With a 2 s maximum, the default (30 s) becomes 2 s and 3 s is refused.
    let api = Api::with_config("[policy]\nmax_timeout_ms = 2000\n");
    let v = api.exec(json!({"sessionId": "d", "command": "sleep 10"}));
    assert_eq!(v["timedOut"], true, "{v}");
    let ms = v["executionTime"].as_u64().unwrap();
    assert!((1900..4000).contains(&ms), "{v}");
    let r = api.post(
        "/api/execute",
        json!({"sessionId": "d", "command": "true", "timeout": 3}),
    );
    let msg = assert_error(&r, 400, "INVALID_REQUEST");
    assert!(msg.contains("timeout"), "{msg}");
}

#[test]
fn accounting_is_plausible_and_memory_overrun_is_an_oom_kill() {
    let api = Api::start();
    let v = api.exec(json!({
        "sessionId": "m",
        "command": "python3 -c 'import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass'",
    }));
    assert_eq!(v["exitCode"], 0, "{v}");
    assert!(v["cpuTime"].as_u64().unwrap() >= 200, "{v}");
    assert!(v["executionTime"].as_u64().unwrap() >= 300, "{v}");
    let v = api.exec(json!({
        "sessionId": "m",
        "command": "python3 -c 'b = bytearray(200 * 1000 * 1000); print(len(b))'",
    }));
    assert_eq!(v["stdout"], "200000000\n", "{v}");
    assert!(v["memoryUsed"].as_u64().unwrap() >= 200_000_000, "{v}");
    let v = api.exec(json!({
        "sessionId": "m",
        "command": "python3 -c 'b = bytearray(1536 * 1024 * 1024); print(len(b))'",
    }));
    assert_eq!(v["exitCode"], 137, "{v}");
    assert_eq!(v["timedOut"], false);
    assert_eq!(v["stdout"], "");
    // The session survives its out-of-memory kill.
    assert_eq!(api.sh("m", "echo alive"), "alive\n");
}

#[test]
fn processes_persist_between_calls_and_can_be_killed() {
    let api = Api::start();
    let v = api.exec(json!({"sessionId": "p", "command": "sleep 1000 & echo $!"}));
    assert_eq!(v["exitCode"], 0, "{v}");
    let pid: i64 = v["stdout"].as_str().unwrap().trim().parse().expect("pid");
    assert!(
        v["executionTime"].as_u64().unwrap() < 2000,
        "the background process does not hold the call: {v}"
    );
    let alive = |pid: i64| {
        processes(&api, "p")
            .iter()
            .any(|(p, c)| *p as i64 == pid && c.starts_with("sleep 1000"))
    };
    // Still running in later calls (give a loaded machine time to exec `sleep` in the child).
    let deadline = Instant::now() + Duration::from_secs(3);
    while !alive(pid) {
        assert!(
            Instant::now() < deadline,
            "pid {pid} is not running: {:?}",
            processes(&api, "p")
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let r = api.post("/api/processes/kill", json!({"sessionId": "p", "pid": pid}));
    assert_eq!(r.0, 200, "{}", r.1);
    assert_eq!(
        r.1,
        json!({"killed": true, "pid": pid, "signal": "SIGKILL"})
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while alive(pid) {
        assert!(Instant::now() < deadline, "pid {pid} survived SIGKILL");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = api.post("/api/processes/kill", json!({"sessionId": "p", "pid": pid}));
    assert_error(&r, 404, "PROCESS_NOT_FOUND");

    // Another signal by name.
    let v = api.exec(json!({"sessionId": "p", "command": "sleep 1001 & echo $!"}));
    let pid2: i64 = v["stdout"].as_str().unwrap().trim().parse().expect("pid");
    let r = api.post(
        "/api/processes/kill",
        json!({"sessionId": "p", "pid": pid2, "signal": "SIGTERM"}),
    );
    assert_eq!(r.1["signal"], "SIGTERM", "{}", r.1);

    let r = api.post("/api/processes/kill", json!({"sessionId": "p", "pid": 1}));
    assert!(assert_error(&r, 400, "INVALID_REQUEST").contains("pid"));
    let r = api.post(
        "/api/processes/kill",
        json!({"sessionId": "p", "pid": pid2, "signal": "SIGSTOP"}),
    );
    assert!(assert_error(&r, 400, "INVALID_REQUEST").contains("signal"));
    let r = api.post(
        "/api/processes/kill",
        json!({"sessionId": "nope", "pid": 5}),
    );
    assert_error(&r, 404, "SESSION_NOT_FOUND");
}

/// One parsed SSE frame: (event, data) or a comment.
fn sse_frames(text: &str) -> Vec<(String, String)> {
    text.split("\n\n")
        .filter(|f| !f.is_empty())
        .map(|frame| {
            if let Some(comment) = frame.strip_prefix(':') {
                return ("comment".to_string(), comment.trim().to_string());
            }
            let mut event = String::new();
            let mut data = String::new();
            for line in frame.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = e.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    assert!(data.is_empty(), "one data line per event: {frame:?}");
                    data = d.to_string();
                } else {
                    panic!("unexpected line {line:?} in {frame:?}");
                }
            }
            (event, data)
        })
        .collect()
}

#[test]
fn streaming_frames_output_and_ends_right_after_one_result() {
    let api = Api::start();
    let t = Instant::now();
    let resp = api
        .request("POST", "/api/execute", None)
        .set("Content-Type", "application/json")
        .send_string(
            &json!({
                "sessionId": "st",
                "command": "for i in 0 1 2; do echo \"Step $i\"; sleep 0.1; done; echo warn >&2; \
                            sleep 30 & exit 4",
                "stream": true,
            })
            .to_string(),
        )
        .expect("stream");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    assert_eq!(resp.header("cache-control"), Some("no-cache"));
    let mut text = String::new();
    resp.into_reader().read_to_string(&mut text).expect("body");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the background sleep does not hold the stream open"
    );
    assert!(text.ends_with("\n\n"), "{text:?}");
    let frames = sse_frames(&text);
    let (last, rest) = frames.split_last().expect("frames");
    assert_eq!(last.0, "result", "{text}");
    assert!(
        rest.iter().all(|(e, _)| e == "stdout" || e == "stderr"),
        "exactly one terminal event, last: {text}"
    );
    let chunk = |kind: &str| -> String {
        rest.iter()
            .filter(|(e, _)| e == kind)
            .map(|(_, d)| {
                let v: Value = serde_json::from_str(d).expect("chunk json");
                assert_eq!(v.as_object().map(|o| o.len()), Some(1), "{v}");
                v["data"].as_str().expect("data").to_string()
            })
            .collect()
    };
    assert_eq!(chunk("stdout"), "Step 0\nStep 1\nStep 2\n");
    assert_eq!(chunk("stderr"), "warn\n");
    let result: Value = serde_json::from_str(&last.1).expect("result json");
    assert_eq!(result["stdout"], "Step 0\nStep 1\nStep 2\n");
    assert_eq!(result["stderr"], "warn\n");
    assert_eq!(result["exitCode"], 4);
    assert_eq!(result["timedOut"], false);
    for k in ["executionTime", "memoryUsed", "cpuTime"] {
        assert!(result[k].is_u64(), "{k}: {result}");
    }
    assert!(result["filesWritten"].is_array());

    // A timeout is a result too.
    let resp = api
        .request("POST", "/api/execute", None)
        .send_string(
            &json!({"sessionId": "st", "command": "sleep 5", "timeout": 0.5, "stream": true})
                .to_string(),
        )
        .expect("stream");
    let text = resp.into_string().expect("body");
    let frames = sse_frames(&text);
    assert_eq!(frames.len(), 1, "{text}");
    let result: Value = serde_json::from_str(&frames[0].1).unwrap();
    assert_eq!(
        (result["timedOut"].clone(), result["exitCode"].clone()),
        (json!(true), json!(137))
    );

    // Refusals come before the stream, as plain JSON.
    let r = api.post(
        "/api/execute",
        json!({"sessionId": "st", "command": "true", "timeout": 0, "stream": true}),
    );
    assert!(assert_error(&r, 400, "INVALID_REQUEST").contains("timeout"));
}

#[test]
fn an_output_flood_is_cut_at_one_mebibyte_and_marked() {
    let api = Api::start();
    let v = api.exec(json!({"sessionId": "o", "command": "yes | head -c 5000000; echo done >&2"}));
    let out = v["stdout"].as_str().unwrap();
    assert!(
        out.ends_with("\n[output truncated]"),
        "{}",
        &out[out.len().saturating_sub(40)..]
    );
    let kept = out.len() - "\n[output truncated]".len();
    assert_eq!(kept, 1 << 20, "1 MiB kept");
    assert!(out.starts_with("y\ny\n"));
    assert_eq!(v["stderr"], "done\n", "a small stream is not marked");
    assert_eq!(v["exitCode"], 0);
}

#[test]
fn write_files_then_list_them() {
    let api = Api::start();
    // A listing needs an existing session.
    let r = api.get("/api/files?sessionId=fresh");
    assert_error(&r, 404, "SESSION_NOT_FOUND");

    let (s, v) = api.post(
        "/api/files",
        json!({"sessionId": "fresh", "files": [
            {"path": "src/z.ts", "content": "export const z = 1;\n"},
            {"path": "/workspace/b.txt", "content": b64(b"bee"), "encoding": "base64"},
            {"path": "/tmp/t.txt", "content": "t"},
        ]}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v,
        json!({"filesWritten": ["/workspace/src/z.ts", "/workspace/b.txt", "/tmp/t.txt"]}),
        "absolute paths in request order"
    );
    assert_eq!(
        api.sh(
            "fresh",
            "cat b.txt; ln -s b.txt link; mkdir -p src/inner && echo 1 > src/inner/x"
        ),
        "bee"
    );

    let (s, v) = api.get("/api/files?sessionId=fresh");
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["path"], "/workspace");
    let entries: Vec<(String, String)> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_string(),
                f["type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        [
            ("/workspace/b.txt".to_string(), "file".to_string()),
            ("/workspace/link".to_string(), "symlink".to_string()),
            ("/workspace/src".to_string(), "directory".to_string()),
        ]
    );
    let b = &v["files"][0];
    assert_eq!(b["name"], "b.txt");
    assert_eq!(b["size"], 3);
    let modified = b["modifiedAt"].as_str().unwrap();
    assert!(
        time::OffsetDateTime::parse(modified, &time::format_description::well_known::Rfc3339)
            .is_ok(),
        "{modified}"
    );

    let (_, v) = api.get("/api/files?sessionId=fresh&recursive=true");
    let paths: Vec<&str> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "/workspace/b.txt",
            "/workspace/link",
            "/workspace/src",
            "/workspace/src/inner",
            "/workspace/src/inner/x",
            "/workspace/src/z.ts",
        ]
    );

    let (s, v) = api.get("/api/files?sessionId=fresh&path=src/z.ts");
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["files"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["files"][0]["path"], "/workspace/src/z.ts");
    assert_eq!(v["files"][0]["size"], 20);
    let (_, v) = api.get("/api/files?sessionId=fresh&path=%2Ftmp");
    assert_eq!(v["files"][0]["path"], "/tmp/t.txt", "{v}");

    let r = api.get("/api/files?sessionId=fresh&path=missing");
    assert_error(&r, 404, "FILE_NOT_FOUND");
    let r = api.get("/api/files?sessionId=fresh&recursive=maybe");
    assert!(assert_error(&r, 400, "INVALID_REQUEST").contains("recursive"));
    let r = api.get("/api/files?path=/workspace");
    assert!(assert_error(&r, 400, "INVALID_REQUEST").contains("sessionId"));
}

#[test]
fn a_symlink_cannot_carry_a_file_outside_the_roots() {
    let api = Api::start();
    api.sh("sl", "ln -s /etc /workspace/etc");
    let r = api.post(
        "/api/files",
        json!({"sessionId": "sl", "files": [{"path": "etc/evil", "content": "x"}]}),
    );
    let msg = assert_error(&r, 400, "INVALID_REQUEST");
    assert!(msg.starts_with("files[0].path"), "{msg}");
    let r = api.post(
        "/api/execute",
        json!({"sessionId": "sl", "command": "true", "files": [
            {"path": "ok.txt", "content": "x"}, {"path": "etc/evil", "content": "x"}]}),
    );
    let msg = assert_error(&r, 400, "INVALID_REQUEST");
    assert!(msg.starts_with("files[1].path"), "{msg}");
    assert_eq!(api.sh("sl", "ls /workspace"), "etc\n", "all or nothing");
}

#[test]
fn tenants_have_separate_sessions() {
    let api = Api::with_config("[tenants]\nacme = [\"key-a\"]\nglobex = [\"key-g\"]\n");
    let (s, v) = api.post_as(
        "key-a",
        "/api/execute",
        json!({"sessionId": "shared", "command": "echo secret > mine.txt; sleep 1000 & echo $!"}),
    );
    assert_eq!(s, 200, "{v}");
    let pid: i64 = v["stdout"].as_str().unwrap().trim().parse().unwrap();
    let r = api.get_as(Some("key-g"), "/api/files?sessionId=shared");
    assert_error(&r, 404, "SESSION_NOT_FOUND");
    let r = api.post_as(
        "key-g",
        "/api/processes/kill",
        json!({"sessionId": "shared", "pid": pid}),
    );
    assert_error(&r, 404, "SESSION_NOT_FOUND");
    let (s, v) = api.post_as(
        "key-g",
        "/api/execute",
        json!({"sessionId": "shared", "command": "ls -A /workspace; echo end"}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["stdout"], "end\n", "globex's session is another sandbox");
    let (s, v) = api.get_as(Some("key-a"), "/api/files?sessionId=shared");
    assert_eq!(s, 200);
    assert_eq!(v["files"][0]["path"], "/workspace/mine.txt", "{v}");
}

#[test]
fn every_route_needs_the_bearer_key() {
    let api = Api::with_key("sekret");
    let routes: [(&str, &str, Value); 4] = [
        (
            "POST",
            "/api/execute",
            json!({"sessionId": "a", "command": "true"}),
        ),
        (
            "POST",
            "/api/files",
            json!({"sessionId": "a", "files": [{"path": "x", "content": ""}]}),
        ),
        ("GET", "/api/files?sessionId=a", Value::Null),
        (
            "POST",
            "/api/processes/kill",
            json!({"sessionId": "a", "pid": 5}),
        ),
    ];
    for (method, path, body) in &routes {
        for key in [None, Some("wrong"), Some("")] {
            let mut req = ureq::request(method, &api.server().url(path));
            if let Some(k) = key {
                req = req.set("Authorization", &format!("Bearer {k}"));
            }
            let r = if *method == "GET" {
                into_pair(req.call())
            } else {
                into_pair(req.send_string(&body.to_string()))
            };
            assert_error(&r, 401, "UNAUTHORIZED");
        }
        let r = into_pair(
            ureq::request(method, &api.server().url(path))
                .set("Authorization", "Basic c2VrcmV0")
                .send_string(&body.to_string()),
        );
        assert_error(&r, 401, "UNAUTHORIZED");
    }
    assert_eq!(api.sh("a", "echo in"), "in\n", "the right key works");
}

#[test]
fn bad_input_is_refused_naming_the_field() {
    let api = Api::start();
    let env101: serde_json::Map<String, Value> =
        (0..101).map(|i| (format!("V{i}"), json!("x"))).collect();
    let files101: Vec<Value> = (0..101)
        .map(|i| json!({"path": format!("f{i}"), "content": ""}))
        .collect();
    let ok = json!({"sessionId": "b", "command": "true"});
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b.to_string()
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "/api/execute",
            json!({"sessionId": "b"}).to_string(),
            "command",
        ),
        ("/api/execute", with("code", json!("1")), "code"),
        ("/api/execute", with("env", Value::Object(env101)), "env"),
        ("/api/execute", with("env", json!({"1BAD": "x"})), "env"),
        ("/api/execute", with("env", json!({"A-B": "x"})), "env"),
        ("/api/execute", with("env", json!({"A": 5})), "env.A"),
        ("/api/execute", with("timeout", json!(301)), "timeout"),
        ("/api/execute", with("timeout", json!(0)), "timeout"),
        ("/api/execute", with("timeout", json!(-5)), "timeout"),
        ("/api/execute", with("timeout", json!("10")), "timeout"),
        ("/api/execute", with("cwd", json!("/etc")), "cwd"),
        ("/api/execute", with("cwd", json!("../..")), "cwd"),
        ("/api/execute", with("stream", json!("yes")), "stream"),
        (
            "/api/execute",
            with("files", json!([{"path": "/etc/passwd", "content": "x"}])),
            "files[0].path",
        ),
        (
            "/api/execute",
            with(
                "files",
                json!([{"path": "a", "content": ""}, {"path": "../../etc/x", "content": "x"}]),
            ),
            "files[1].path",
        ),
        (
            "/api/execute",
            with(
                "files",
                json!([{"path": "a", "content": "!!!", "encoding": "base64"}]),
            ),
            "files[0].content",
        ),
        (
            "/api/execute",
            with(
                "files",
                json!([{"path": "a", "content": "x", "encoding": "latin1"}]),
            ),
            "files[0].encoding",
        ),
        (
            "/api/execute",
            with("files", json!([{"path": "a"}])),
            "files[0].content",
        ),
        (
            "/api/execute",
            with("files", Value::Array(files101)),
            "files",
        ),
        (
            "/api/execute",
            with("sessionId", json!("bad/id")),
            "sessionId",
        ),
        (
            "/api/execute",
            with("sessionId", json!("x".repeat(129))),
            "sessionId",
        ),
        ("/api/execute", with("sessionId", json!(7)), "sessionId"),
        (
            "/api/execute",
            "{\"sessionId\": \"b\", \"command\": ".to_string(),
            "JSON",
        ),
        ("/api/execute", "[]".to_string(), "object"),
        ("/api/files", json!({"sessionId": "b"}).to_string(), "files"),
        (
            "/api/files",
            json!({"sessionId": "b", "files": []}).to_string(),
            "files",
        ),
        (
            "/api/files",
            json!({"sessionId": "b", "files": [{"path": "/root/x", "content": ""}]}).to_string(),
            "files[0].path",
        ),
        (
            "/api/files",
            json!({"sessionId": "", "files": [{"path": "a", "content": ""}]}).to_string(),
            "sessionId",
        ),
        (
            "/api/processes/kill",
            json!({"sessionId": "b", "pid": "12"}).to_string(),
            "pid",
        ),
        (
            "/api/processes/kill",
            json!({"sessionId": "b"}).to_string(),
            "pid",
        ),
        ("/api/processes/kill", "nope".to_string(), "JSON"),
    ];
    for (path, body, field) in cases {
        let r = api.post_raw(path, &body, None);
        let msg = assert_error(&r, 400, "INVALID_REQUEST");
        assert!(msg.contains(field), "{path} {body}: {field} not in {msg:?}");
    }
    // None of them created a session.
    let r = api.get("/api/files?sessionId=b");
    assert_error(&r, 404, "SESSION_NOT_FOUND");
}

#[test]
fn sizes_over_the_limits_are_413() {
    let api = Api::with_config(
        "[policy]\nmax_file_bytes = 1000\nmax_request_bytes = 100000\nmax_files = 3\n",
    );
    let r = api.post(
        "/api/execute",
        json!({"sessionId": "z", "command": "true", "files": [
            {"path": "ok", "content": "x"}, {"path": "big.txt", "content": "x".repeat(1001)}]}),
    );
    let msg = assert_error(&r, 413, "PAYLOAD_TOO_LARGE");
    assert!(msg.contains("files[1]") && msg.contains("big.txt"), "{msg}");
    let r = api.post(
        "/api/files",
        json!({"sessionId": "z", "files": [
            {"path": "big.bin", "content": b64(&[7u8; 1001]), "encoding": "base64"}]}),
    );
    assert!(assert_error(&r, 413, "PAYLOAD_TOO_LARGE").contains("files[0]"));
    // Exactly at the limit is fine.
    let (s, v) = api.post(
        "/api/files",
        json!({"sessionId": "z", "files": [{"path": "edge.bin", "content": b64(&[7u8; 1000]), "encoding": "base64"}]}),
    );
    assert_eq!(s, 200, "{v}");
    let r = api.post(
        "/api/execute",
        json!({"sessionId": "z", "command": "true", "env": {"BIG": "x".repeat(100_001)}}),
    );
    assert_error(&r, 413, "PAYLOAD_TOO_LARGE");
    let files: Vec<Value> = (0..4)
        .map(|i| json!({"path": format!("f{i}"), "content": ""}))
        .collect();
    let r = api.post("/api/files", json!({"sessionId": "z", "files": files}));
    assert!(assert_error(&r, 400, "INVALID_REQUEST").contains("files"));
    assert_eq!(api.sh("z", "wc -c < edge.bin"), "1000\n");
}

#[test]
fn concurrent_executions_share_one_session() {
    let api = Api::start();
    api.sh("cc", "true");
    let t = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|i| {
                let api = &api;
                s.spawn(move || {
                    api.sh(
                        "cc",
                        &format!("sleep 3; echo {i} > /workspace/r{i}; echo {i}"),
                    )
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(h.join().unwrap(), format!("{i}\n"));
        }
    });
    assert!(
        // One after another they would take 9 s.
        t.elapsed() < Duration::from_millis(8000),
        "they ran side by side: {:?}",
        t.elapsed()
    );
    assert_eq!(api.sh("cc", "cat r0 r1 r2"), "0\n1\n2\n");
}

#[test]
fn the_session_cap_refuses_while_busy_and_evicts_when_idle() {
    let api = Api::with_config("[policy]\nmax_sessions = 1\n");
    api.sh("one", "echo 1 > /workspace/mark");
    std::thread::scope(|s| {
        let busy = s.spawn(|| api.sh("one", "sleep 1.5; echo done"));
        std::thread::sleep(Duration::from_millis(500));
        let r = api.post(
            "/api/execute",
            json!({"sessionId": "two", "command": "true"}),
        );
        assert!(assert_error(&r, 429, "TOO_MANY_REQUESTS").contains("session"));
        assert_eq!(busy.join().unwrap(), "done\n");
    });
    // Once idle, the least recently used session makes room.
    assert_eq!(api.sh("two", "echo 2"), "2\n");
    let r = api.get("/api/files?sessionId=one");
    assert_error(&r, 404, "SESSION_NOT_FOUND");
}

#[test]
fn an_execution_outlives_a_client_that_goes_away() {
    let api = Api::start();
    api.sh("gone", "true");
    // Streaming: read the first event, then hang up.
    let resp = api
        .request("POST", "/api/execute", None)
        .send_string(
            &json!({"sessionId": "gone", "stream": true,
                    "command": "echo first; sleep 1; echo streamed > /workspace/s.txt"})
            .to_string(),
        )
        .expect("stream");
    let mut first = [0u8; 16];
    resp.into_reader()
        .read_exact(&mut first)
        .expect("first event");
    assert!(first.starts_with(b"event: stdout"));
    // Not streaming: the client gives up long before the command ends.
    let r = api
        .request("POST", "/api/execute", None)
        .timeout(Duration::from_millis(300))
        .send_string(
            &json!({"sessionId": "gone",
                    "command": "sleep 1; echo plain > /workspace/p.txt"})
            .to_string(),
        );
    assert!(r.is_err(), "the client timed out");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(api.sh("gone", "cat s.txt p.txt"), "streamed\nplain\n");
}
