//! Stateful code contexts over the wire, through a real `execbox serve` on loopback into real
//! sandboxes: the execd `/code*` routes (event order, errors, rich display outputs, busy
//! contexts, interrupts, validation, context management, one smoke test per language) and the
//! Leap0 code-interpreter API (`/healthz`, `/contexts`, `/execute`, `/execute/async`) with the
//! exact response shapes of `shared/compat/leap0.md`.
//!
//! matplotlib and pandas come from the code-interpreter template (sandboxes of the image
//! `opensandbox/code-interpreter`; the template is built on first use from the package index the
//! host's pip is configured for, into the test servers' shared `TEST_TEMPLATES_DIR`); TypeScript
//! runs on Node; the Java smoke test runs only when a JDK (`jshell`) is on the host.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Plain requests

impl Reply {
    /// A Leap0 400 validation error naming `field`; returns the error text.
    #[track_caller]
    fn assert_invalid(&self, field: &str) -> String {
        assert_eq!(self.status, 400, "{}", self.text());
        assert!(
            self.header("content-type")
                .is_some_and(|c| c.starts_with("application/json")),
            "{:?}",
            self.headers
        );
        let v = self.json();
        let obj = v.as_object().expect("object");
        assert_eq!(obj.len(), 2, "only message and errors: {v}");
        assert_eq!(v["message"], "Invalid request", "{v}");
        let errors = v["errors"].as_array().expect("errors array");
        assert!(!errors.is_empty(), "{v}");
        for e in errors {
            assert_eq!(
                e.as_object().map(|o| o.len()),
                Some(2),
                "field and error: {v}"
            );
            assert!(e["field"].is_string() && e["error"].is_string(), "{v}");
            assert!(!e["error"].as_str().unwrap_or("").is_empty(), "{v}");
        }
        let hit = errors
            .iter()
            .find(|e| e["field"] == field)
            .unwrap_or_else(|| panic!("no error on field {field}: {v}"));
        hit["error"].as_str().unwrap_or("").to_string()
    }
}

const T: Duration = Duration::from_secs(120);

fn get(sb: &Sandbox, path: &str) -> Reply {
    reply(sb.execd("GET", path).timeout(T).call())
}

fn delete(sb: &Sandbox, path: &str) -> Reply {
    reply(sb.execd("DELETE", path).timeout(T).call())
}

fn post(sb: &Sandbox, path: &str, body: &str) -> Reply {
    reply(
        sb.execd("POST", path)
            .timeout(T)
            .set("Content-Type", "application/json")
            .send_string(body),
    )
}

fn post_json(sb: &Sandbox, path: &str, body: Value) -> Reply {
    post(sb, path, &body.to_string())
}

// ---------------------------------------------------------------------------------------------
// Event streams

/// Splits a finished `data: <json>\n\n` stream into its JSON frames, checking the framing.
#[track_caller]
fn frames(body: &[u8]) -> Vec<Value> {
    let text = std::str::from_utf8(body).expect("stream is UTF-8");
    assert!(
        text.is_empty() || text.ends_with("\n\n"),
        "stream must end after a whole frame: {:?}",
        cut(text)
    );
    text.split_terminator("\n\n")
        .map(|f| {
            let json = f
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("frame without `data: `: {:?}", cut(f)));
            assert!(!json.contains('\n'), "frame on one line: {:?}", cut(f));
            serde_json::from_str(json)
                .unwrap_or_else(|e| panic!("frame is not JSON ({e}): {:?}", cut(f)))
        })
        .collect()
}

fn cut(s: &str) -> String {
    s.chars().take(300).collect()
}

/// The events of a `/code` stream without pings; every typed event has a ms timestamp.
#[track_caller]
fn code_events(all: Vec<Value>) -> Vec<Value> {
    for e in &all {
        if e.get("type").is_some() {
            assert!(
                e["timestamp"]
                    .as_i64()
                    .is_some_and(|t| t > 1_600_000_000_000),
                "every event has an integer ms timestamp: {e}"
            );
        }
    }
    all.into_iter().filter(|e| e["type"] != "ping").collect()
}

/// `POST /code` read to EOF: (status, events without pings) for a 200, panics otherwise.
#[track_caller]
fn run_code(sb: &Sandbox, body: Value) -> Vec<Value> {
    let r = post_json(sb, "/code", body.clone());
    assert_eq!(r.status, 200, "POST /code {body}: {}", r.text());
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    code_events(frames(&r.body))
}

fn in_ctx(code: &str, language: &str, id: &str) -> Value {
    json!({"code": code, "context": {"id": id, "language": language}})
}

fn types(evs: &[Value]) -> Vec<String> {
    evs.iter()
        .map(|e| e["type"].as_str().unwrap_or("<envelope>").to_string())
        .collect()
}

fn stdout_of(evs: &[Value]) -> String {
    evs.iter()
        .filter(|e| e["type"] == "stdout")
        .map(|e| e["text"].as_str().unwrap_or(""))
        .collect()
}

fn stderr_of(evs: &[Value]) -> String {
    evs.iter()
        .filter(|e| e["type"] == "stderr")
        .map(|e| e["text"].as_str().unwrap_or(""))
        .collect()
}

fn results_of(evs: &[Value]) -> Vec<Value> {
    evs.iter()
        .filter(|e| e["type"] == "result")
        .map(|e| e["results"].clone())
        .collect()
}

fn result_texts(evs: &[Value]) -> Vec<String> {
    results_of(evs)
        .iter()
        .map(|r| r["text"].as_str().unwrap_or("<no text>").to_string())
        .collect()
}

/// The run succeeded: init first, execution_complete last, no error.
#[track_caller]
fn assert_ok(evs: &[Value]) {
    assert_eq!(
        evs.first().map(|e| &e["type"]),
        Some(&json!("init")),
        "{evs:?}"
    );
    assert_eq!(
        evs.last().map(|e| &e["type"]),
        Some(&json!("execution_complete")),
        "{evs:?}"
    );
    assert!(
        !evs.iter()
            .any(|e| e["type"] == "error" || e.get("type").is_none()),
        "no error: {evs:?}"
    );
}

/// The error object of a failed run (status("error") right before it).
#[track_caller]
fn the_error(evs: &[Value]) -> Value {
    let i = evs
        .iter()
        .position(|e| e["type"] == "error")
        .unwrap_or_else(|| panic!("no error event: {evs:?}"));
    assert!(i >= 1, "{evs:?}");
    assert_eq!(evs[i - 1]["type"], "status", "status before error: {evs:?}");
    assert_eq!(evs[i - 1]["text"], "error", "{evs:?}");
    evs[i]["error"].clone()
}

#[track_caller]
fn new_context(sb: &Sandbox, language: &str) -> String {
    let r = post_json(sb, "/code/context", json!({ "language": language }));
    assert_eq!(r.status, 200, "create {language} context: {}", r.text());
    let v = r.json();
    assert_eq!(v["language"], language, "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    assert!(!id.is_empty());
    id
}

#[track_caller]
fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// Decodes standard base64 (padding and line breaks tolerated).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        })
    };
    let clean: Vec<u8> = s
        .bytes()
        .filter(|c| !c.is_ascii_whitespace())
        .take_while(|&c| c != b'=')
        .collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        let n = match chunk.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => return None,
        };
        out.extend_from_slice(&bytes[1..1 + n]);
    }
    Some(out)
}

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

fn have_host_program(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------
// execd /code: Python

#[test]
fn python_event_order_errors_and_display() {
    let server = TestServer::start();
    let sb = server.create(json!({}));

    // Context creation: 200 {"id","language"} (no cwd when none was sent).
    let r = post_json(&sb, "/code/context", json!({"language": "python"}));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let ctx = v["id"].as_str().expect("id").to_string();
    assert_eq!(v, json!({"id": ctx, "language": "python"}));

    // The success order of the spec, exactly.
    let evs = run_code(&sb, in_ctx("x = 2+2\nprint(x)\nx", "python", &ctx));
    assert_eq!(
        types(&evs),
        [
            "init",
            "stdout",
            "execution_count",
            "result",
            "execution_complete"
        ],
        "{evs:?}"
    );
    assert_eq!(evs[0]["text"], ctx.as_str(), "init carries the context id");
    assert_eq!(evs[1]["text"], "4\n");
    assert_eq!(evs[2]["execution_count"], 1);
    assert_eq!(evs[3]["results"], json!({"text": "4"}));
    assert!(evs[4]["execution_time"].is_u64() || evs[4].get("execution_time").is_none());
    assert!(evs[4].get("error").is_none());

    // State is kept, the counter goes up by one per execution.
    let evs = run_code(&sb, in_ctx("x * 10", "python", &ctx));
    assert_ok(&evs);
    assert_eq!(
        types(&evs),
        ["init", "execution_count", "result", "execution_complete"]
    );
    assert_eq!(evs[1]["execution_count"], 2);
    assert_eq!(evs[2]["results"], json!({"text": "40"}));

    // A cell that only prints: no execution_count, no result.
    let evs = run_code(&sb, in_ctx("print('a')\nprint('b')", "python", &ctx));
    assert_ok(&evs);
    assert!(
        !types(&evs)
            .iter()
            .any(|t| t == "execution_count" || t == "result"),
        "{evs:?}"
    );
    assert_eq!(stdout_of(&evs), "a\nb\n");

    // stderr keeps its newline too.
    let evs = run_code(
        &sb,
        in_ctx("import sys\nprint('e', file=sys.stderr)", "python", &ctx),
    );
    assert_ok(&evs);
    assert_eq!(stderr_of(&evs), "e\n");

    // Error order: init → stdout → status("error") → error → execution_complete.
    let evs = run_code(&sb, in_ctx("print('before')\n1/0", "python", &ctx));
    assert_eq!(
        types(&evs),
        ["init", "stdout", "status", "error", "execution_complete"],
        "{evs:?}"
    );
    assert_eq!(evs[1]["text"], "before\n");
    let err = the_error(&evs);
    assert_eq!(err["ename"], "ZeroDivisionError", "{err}");
    assert_eq!(err["evalue"], "division by zero", "{err}");
    let tb = err["traceback"].as_array().expect("traceback list");
    assert!(!tb.is_empty(), "{err}");
    assert!(tb.iter().all(Value::is_string), "{err}");

    let evs = run_code(&sb, in_ctx("undefined_name_q", "python", &ctx));
    let err = the_error(&evs);
    assert_eq!(err["ename"], "NameError", "{err}");
    assert!(
        err["evalue"]
            .as_str()
            .unwrap_or("")
            .contains("undefined_name_q"),
        "{err}"
    );
    assert_eq!(evs.last().unwrap()["type"], "execution_complete");

    // A syntax error is an error too, and the context survives both.
    let evs = run_code(&sb, in_ctx("def (:", "python", &ctx));
    assert_eq!(the_error(&evs)["ename"], "SyntaxError");
    let evs = run_code(&sb, in_ctx("x", "python", &ctx));
    assert_eq!(result_texts(&evs), ["4"]);

    // display() outputs are results too, in output order, interleaved with stdout.
    let evs = run_code(
        &sb,
        in_ctx(
            "display(1)\nprint('mid')\ndisplay('two')\n3",
            "python",
            &ctx,
        ),
    );
    assert_ok(&evs);
    let kinds: Vec<String> = evs
        .iter()
        .filter(|e| e["type"] != "execution_complete" && e["type"] != "init")
        .map(|e| match e["type"].as_str().unwrap_or("") {
            "result" => format!("result:{}", e["results"]["text"].as_str().unwrap_or("?")),
            "stdout" => format!("stdout:{}", e["text"].as_str().unwrap_or("?")),
            t => t.to_string(),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "result:1",
            "stdout:mid\n",
            "result:'two'",
            "execution_count",
            "result:3"
        ],
        "{evs:?}"
    );

    // An object with rich reprs: every MIME key of the bundle, text/plain renamed to text.
    let evs = run_code(
        &sb,
        in_ctx(
            "class R:\n    def _repr_html_(self): return '<b>hi</b>'\n    def __repr__(self): return 'R()'\nR()",
            "python",
            &ctx,
        ),
    );
    assert_ok(&evs);
    let res = results_of(&evs);
    assert_eq!(res.len(), 1, "{evs:?}");
    assert_eq!(res[0]["text"], "R()", "{evs:?}");
    assert_eq!(res[0]["text/html"], "<b>hi</b>", "{evs:?}");
    assert!(res[0].get("text/plain").is_none(), "{evs:?}");

    // A context with a cwd: created, echoed, used.
    let r = post_json(
        &sb,
        "/code/context",
        json!({"language": "python", "cwd": "/tmp/ctx-cwd/deep"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["cwd"], "/tmp/ctx-cwd/deep", "{v}");
    assert_eq!(v["language"], "python");
    let cwd_ctx = v["id"].as_str().unwrap().to_string();
    let evs = run_code(&sb, in_ctx("import os\nos.getcwd()", "python", &cwd_ctx));
    assert_eq!(result_texts(&evs), ["'/tmp/ctx-cwd/deep'"], "{evs:?}");
}

#[test]
fn python_rich_outputs_matplotlib_and_pandas_from_the_template() {
    let server = TestServer::start();
    let sb = server.create(json!({"image": {"uri": CODE_INTERPRETER_IMAGE},
        "resourceLimits": {"cpu": "2", "memory": "2Gi"}}));
    let ctx = new_context(&sb, "python");

    // The template's, not whatever the host's Python may have.
    let evs = run_code(
        &sb,
        in_ctx(
            "import matplotlib, pandas\n[m.__file__.startswith('/opt/execbox/template/python/') for m in (matplotlib, pandas)]",
            "python",
            &ctx,
        ),
    );
    assert_eq!(result_texts(&evs), ["[True, True]"], "{evs:?}");

    let evs = run_code(
        &sb,
        in_ctx(
            "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [4, 1, 9])\nplt.title('execbox')\nplt.show()",
            "python",
            &ctx,
        ),
    );
    assert_ok(&evs);
    let res = results_of(&evs);
    let png = res
        .iter()
        .find_map(|r| r["image/png"].as_str())
        .unwrap_or_else(|| panic!("no image/png result: {evs:?}"));
    let bytes = base64_decode(png).expect("image/png is base64");
    assert!(bytes.starts_with(PNG_SIGNATURE), "not a PNG");
    assert!(bytes.len() > 1000, "a real plot: {} bytes", bytes.len());
    let with_png = res.iter().find(|r| r.get("image/png").is_some()).unwrap();
    assert!(
        with_png["text"]
            .as_str()
            .is_some_and(|t| t.contains("Figure")),
        "{with_png}"
    );

    // A figure shown implicitly as the cell's last value, too.
    let evs = run_code(
        &sb,
        in_ctx(
            "fig, ax = plt.subplots()\nax.bar(['a', 'b'], [1, 2])\nfig",
            "python",
            &ctx,
        ),
    );
    assert_ok(&evs);
    assert!(
        results_of(&evs)
            .iter()
            .any(|r| r["image/png"].as_str().is_some()),
        "{evs:?}"
    );

    let evs = run_code(
        &sb,
        in_ctx(
            "import pandas as pd\ndf = pd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})\ndf",
            "python",
            &ctx,
        ),
    );
    assert_ok(&evs);
    let res = results_of(&evs);
    assert_eq!(res.len(), 1, "{evs:?}");
    let html = res[0]["text/html"]
        .as_str()
        .unwrap_or_else(|| panic!("no text/html: {evs:?}"));
    assert!(html.contains("<table"), "{html}");
    assert!(
        html.contains("<th>a</th>") || html.contains(">a</th>"),
        "{html}"
    );
    let text = res[0]["text"].as_str().expect("text");
    assert!(
        text.contains('a') && text.contains('x') && text.contains('y'),
        "{text}"
    );
}

#[test]
fn busy_context_interrupt_and_validation() {
    let server = TestServer::start();
    let sb = server.create(json!({}));
    let ctx = new_context(&sb, "python");
    let evs = run_code(&sb, in_ctx("kept = 'yes'", "python", &ctx));
    assert_ok(&evs);

    // A long cell, read incrementally.
    let resp = sb
        .execd("POST", "/code")
        .timeout(T)
        .set("Content-Type", "application/json")
        .send_string(
            &in_ctx(
                "import time\nprint('started', flush=True)\nfor _ in range(600):\n    time.sleep(0.1)",
                "python",
                &ctx,
            )
            .to_string(),
        )
        .expect("long cell");
    let mut reader = BufReader::new(resp.into_reader());
    let mut line = String::new();
    let mut first = Vec::new();
    while !first.iter().any(|e: &Value| e["type"] == "stdout") {
        line.clear();
        assert!(
            reader.read_line(&mut line).expect("read") > 0,
            "stream ended early"
        );
        if let Some(j) = line.trim_end().strip_prefix("data: ") {
            first.push(serde_json::from_str::<Value>(j).expect("json"));
        }
    }
    assert_eq!(first[0]["type"], "init");
    assert_eq!(first[0]["text"], ctx.as_str());

    // A second run on the busy context: 200, init, then the in-stream busy envelope.
    let r = post_json(&sb, "/code", in_ctx("1", "python", &ctx));
    assert_eq!(r.status, 200, "{}", r.text());
    let evs = code_events(frames(&r.body));
    assert_eq!(evs[0]["type"], "init", "{evs:?}");
    assert!(
        evs.contains(
            &json!({"code": "RUNTIME_ERROR", "message": "error running codes session is busy"})
        ),
        "busy envelope: {evs:?}"
    );
    assert!(
        !evs.iter().any(|e| e["type"] == "result"),
        "the busy run did not execute: {evs:?}"
    );

    // DELETE /code?id=<context> interrupts the running cell.
    let t = Instant::now();
    delete(&sb, &format!("/code?id={ctx}")).assert_empty_ok();
    let mut rest = String::new();
    reader
        .read_to_string(&mut rest)
        .expect("rest of the stream");
    let took = t.elapsed();
    assert!(took < Duration::from_secs(5), "interrupt took {took:?}");
    // the blank line after the last frame read by lines is still in the reader
    let evs = code_events(frames(rest.trim_start_matches('\n').as_bytes()));
    let err = the_error(&evs);
    assert_eq!(err["ename"], "KeyboardInterrupt", "{err}");
    assert_eq!(evs.last().unwrap()["type"], "execution_complete", "{evs:?}");

    // The context survived with its state.
    let evs = run_code(&sb, in_ctx("kept", "python", &ctx));
    assert_eq!(result_texts(&evs), ["'yes'"], "{evs:?}");

    // Interrupting an unknown id is a 500; no id is a 400.
    let r = delete(&sb, "/code?id=no-such-thing");
    r.assert_error(500, "RUNTIME_ERROR");
    let r = delete(&sb, "/code");
    r.assert_error(400, "MISSING_QUERY");

    // Unknown language on context creation: 400, fast.
    let t = Instant::now();
    let r = post_json(&sb, "/code/context", json!({"language": "cobol"}));
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    r.assert_error(400, "INVALID_REQUEST_BODY");
    // ... and on a run: 500 with the upstream message, fast.
    let t = Instant::now();
    let r = post_json(
        &sb,
        "/code",
        json!({"code": "1", "context": {"language": "cobol"}}),
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    let msg = r.assert_error(500, "RUNTIME_ERROR");
    assert_eq!(msg, "error running codes unknown language: cobol");

    // Bad JSON.
    post(&sb, "/code/context", "{nope").assert_error(400, "INVALID_REQUEST_BODY");
    post(&sb, "/code", "{nope").assert_error(400, "INVALID_REQUEST_BODY");
    // Empty code.
    post_json(
        &sb,
        "/code",
        json!({"code": "", "context": {"language": "python"}}),
    )
    .assert_error(400, "INVALID_REQUEST_BODY");

    // Unknown context: run → 500 before init, GET/DELETE → 404.
    let r = post_json(&sb, "/code", in_ctx("1", "python", "no-such-context"));
    let msg = r.assert_error(500, "RUNTIME_ERROR");
    assert_eq!(msg, "error running codes context not found");
    let msg = get(&sb, "/code/contexts/no-such-context").assert_error(404, "CONTEXT_NOT_FOUND");
    assert_eq!(msg, "context no-such-context not found");
    delete(&sb, "/code/contexts/no-such-context").assert_error(404, "CONTEXT_NOT_FOUND");

    // Empty or missing language: a stateless shell command with command events; the id is
    // ignored.
    for body in [
        json!({"code": "echo hi; echo err >&2"}),
        json!({"code": "echo hi; echo err >&2", "context": {"language": ""}}),
        json!({"code": "echo hi; echo err >&2", "context": {"id": ctx, "language": ""}}),
    ] {
        let evs = run_code(&sb, body.clone());
        assert_ok(&evs);
        let init = evs[0]["text"].as_str().unwrap();
        assert_ne!(init, ctx, "a new command id, not the context: {body}");
        assert_eq!(stdout_of(&evs), "hi", "command rules: no newline: {body}");
        assert_eq!(stderr_of(&evs), "err");
    }
    let evs = run_code(&sb, json!({"code": "exit 3"}));
    let err = evs.iter().find(|e| e["type"] == "error").expect("error")["error"].clone();
    assert_eq!(err["ename"], "CommandExecError");
    assert_eq!(err["evalue"], "3");
}

#[test]
fn context_listing_and_deletion() {
    let server = TestServer::start();
    let sb = server.create(json!({}));

    let a = new_context(&sb, "python");
    let b = new_context(&sb, "python");
    let js = new_context(&sb, "javascript");

    // GET one.
    let r = get(&sb, &format!("/code/contexts/{a}"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"id": a, "language": "python"}));

    let ids = |lang: Option<&str>| -> Vec<String> {
        let path = match lang {
            Some(l) => format!("/code/contexts?language={l}"),
            None => "/code/contexts".to_string(),
        };
        let r = get(&sb, &path);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let v = r.json();
        let arr = v.as_array().unwrap_or_else(|| panic!("array: {v}"));
        for c in arr {
            if let Some(l) = lang {
                assert_eq!(c["language"], l, "{v}");
            }
        }
        arr.iter()
            .map(|c| c["id"].as_str().expect("id").to_string())
            .collect()
    };

    let py = ids(Some("python"));
    assert!(
        py.contains(&a) && py.contains(&b) && !py.contains(&js),
        "{py:?}"
    );
    assert_eq!(py.len(), 2, "{py:?}");
    assert_eq!(ids(Some("javascript")), vec![js.clone()]);
    assert!(ids(Some("bash")).is_empty());
    let all = ids(None);
    assert!(
        all.contains(&a) && all.contains(&b) && all.contains(&js),
        "{all:?}"
    );

    // The language's default context (created by a run without id) is listed too.
    let evs = run_code(
        &sb,
        json!({"code": "d = 1\nd", "context": {"language": "python"}}),
    );
    assert_ok(&evs);
    let default = evs[0]["text"].as_str().unwrap().to_string();
    assert!(default != a && default != b);
    let evs = run_code(
        &sb,
        json!({"code": "d + 1", "context": {"language": "python"}}),
    );
    assert_eq!(evs[0]["text"], default.as_str(), "one default context");
    assert_eq!(result_texts(&evs), ["2"]);
    let py = ids(Some("python"));
    assert!(py.contains(&default), "{py:?}");
    assert_eq!(py.len(), 3, "{py:?}");

    // Unsupported list languages.
    for l in ["command", "background-command", "sql"] {
        let msg =
            get(&sb, &format!("/code/contexts?language={l}")).assert_error(500, "RUNTIME_ERROR");
        assert!(
            msg.starts_with("unsupported language context operation"),
            "{msg}"
        );
    }

    // DELETE one.
    delete(&sb, &format!("/code/contexts/{a}")).assert_empty_ok();
    get(&sb, &format!("/code/contexts/{a}")).assert_error(404, "CONTEXT_NOT_FOUND");
    delete(&sb, &format!("/code/contexts/{a}")).assert_error(404, "CONTEXT_NOT_FOUND");
    post_json(&sb, "/code", in_ctx("1", "python", &a)).assert_error(500, "RUNTIME_ERROR");
    assert!(!ids(Some("python")).contains(&a));

    // DELETE by language: all of them, the default included; other languages untouched.
    delete(&sb, "/code/contexts").assert_error(400, "MISSING_QUERY");
    delete(&sb, "/code/contexts?language=cobol").assert_empty_ok();
    delete(&sb, "/code/contexts?language=python").assert_empty_ok();
    assert!(ids(Some("python")).is_empty());
    assert_eq!(ids(Some("javascript")), vec![js.clone()]);
    get(&sb, &format!("/code/contexts/{b}")).assert_error(404, "CONTEXT_NOT_FOUND");
    // A new default context starts fresh.
    let evs = run_code(
        &sb,
        json!({"code": "'d' in globals()", "context": {"language": "python"}}),
    );
    assert_eq!(result_texts(&evs), ["False"], "{evs:?}");

    // No kernel processes are left behind by deleted contexts, spare kernels included once
    // every context of their language is deleted by language.
    delete(&sb, "/code/contexts?language=python").assert_empty_ok();
    delete(&sb, &format!("/code/contexts/{js}")).assert_empty_ok();
    delete(&sb, "/code/contexts?language=javascript").assert_empty_ok();
    wait_for(
        "the kernels of deleted contexts to exit",
        Duration::from_secs(10),
        || {
            !sb.host_pids().iter().any(|p| {
                let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&cmd);
                cmd.contains("python_kernel") || cmd.contains("js_kernel")
            })
        },
    );
}

#[test]
fn language_smoke_javascript_typescript_bash_java() {
    let server = TestServer::start();
    let sb = server.create(json!({"resourceLimits": {"cpu": "2", "memory": "2Gi"}}));

    // JavaScript.
    let js = new_context(&sb, "javascript");
    let evs = run_code(
        &sb,
        in_ctx("let x = 2 + 2;\nconsole.log('hi');\nx", "javascript", &js),
    );
    assert_ok(&evs);
    assert_eq!(evs[0]["text"], js.as_str());
    assert_eq!(stdout_of(&evs), "hi\n", "{evs:?}");
    assert_eq!(result_texts(&evs), ["4"], "{evs:?}");
    let evs = run_code(&sb, in_ctx("x * 2", "javascript", &js));
    assert_eq!(result_texts(&evs), ["8"], "{evs:?}");
    let evs = run_code(&sb, in_ctx("notDefinedAnywhere", "javascript", &js));
    assert_eq!(the_error(&evs)["ename"], "ReferenceError", "{evs:?}");
    assert_eq!(evs.last().unwrap()["type"], "execution_complete");
    let evs = run_code(&sb, in_ctx("console.error('bad')", "javascript", &js));
    assert_eq!(stderr_of(&evs), "bad\n", "{evs:?}");

    // TypeScript (on Node, the types erased by the agent).
    let ts = new_context(&sb, "typescript");
    let evs = run_code(
        &sb,
        in_ctx(
            "const y: number = 2 + 2;\nconsole.log('hi');\ny",
            "typescript",
            &ts,
        ),
    );
    assert_ok(&evs);
    assert_eq!(stdout_of(&evs), "hi\n", "{evs:?}");
    assert_eq!(result_texts(&evs), ["4"], "{evs:?}");
    let evs = run_code(
        &sb,
        in_ctx(
            "interface P { v: number }\nconst p: P = { v: y + 1 };\np.v",
            "typescript",
            &ts,
        ),
    );
    assert_eq!(result_texts(&evs), ["5"], "{evs:?}");
    let evs = run_code(&sb, in_ctx("notDefinedAnywhere", "typescript", &ts));
    assert_eq!(the_error(&evs)["ename"], "ReferenceError", "{evs:?}");

    // Bash.
    let sh = new_context(&sb, "bash");
    let evs = run_code(&sb, in_ctx("X=$((2 + 2))\necho $X", "bash", &sh));
    assert_ok(&evs);
    assert_eq!(evs[0]["text"], sh.as_str());
    assert_eq!(stdout_of(&evs), "4\n", "{evs:?}");
    let evs = run_code(&sb, in_ctx("cd /tmp; echo $((X * 2))", "bash", &sh));
    assert_eq!(stdout_of(&evs), "8\n", "{evs:?}");
    let evs = run_code(&sb, in_ctx("pwd; echo oops >&2", "bash", &sh));
    assert_eq!(stdout_of(&evs), "/tmp\n", "{evs:?}");
    assert_eq!(stderr_of(&evs), "oops\n", "{evs:?}");

    // Java (jshell), where a JDK is present.
    if have_host_program("jshell") {
        let jv = new_context(&sb, "java");
        let evs = run_code(
            &sb,
            in_ctx(
                "System.out.println(\"Calculating sum...\");\nint a = 10;\nint b = 20;\nint sum = a + b;\nSystem.out.println(\"Sum: \" + sum);\nsum",
                "java",
                &jv,
            ),
        );
        assert_ok(&evs);
        assert_eq!(stdout_of(&evs), "Calculating sum...\nSum: 30\n", "{evs:?}");
        assert_eq!(result_texts(&evs), ["30"], "{evs:?}");
        let evs = run_code(&sb, in_ctx("sum * 2", "java", &jv));
        assert_eq!(result_texts(&evs), ["60"], "{evs:?}");
    } else {
        println!("no jshell on this host: Java smoke test skipped");
    }

    // Interrupt a busy JavaScript loop; the context keeps its state.
    let resp = sb
        .execd("POST", "/code")
        .timeout(T)
        .set("Content-Type", "application/json")
        .send_string(
            &in_ctx(
                "const end = Date.now() + 60000;\nconsole.log('started');\nwhile (Date.now() < end) {}",
                "javascript",
                &js,
            )
            .to_string(),
        )
        .expect("long cell");
    let mut reader = BufReader::new(resp.into_reader());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            reader.read_line(&mut line).expect("read") > 0,
            "ended early"
        );
        if line.contains("\"stdout\"") {
            break;
        }
    }
    let t = Instant::now();
    delete(&sb, &format!("/code?id={js}")).assert_empty_ok();
    let mut rest = String::new();
    reader.read_to_string(&mut rest).expect("rest");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let evs = run_code(&sb, in_ctx("x", "javascript", &js));
    assert_eq!(
        result_texts(&evs),
        ["4"],
        "state kept after the interrupt: {evs:?}"
    );
}

/// TypeScript runs on Node, each cell's types erased by the agent: interfaces, generics, an
/// enum (code generated for it), `as` casts and state across cells; a type error is no error
/// (nothing checks types); a syntax error is the cell's error event, and the context goes on.
#[test]
fn typescript_runs_on_node_with_its_types_erased() {
    let server = TestServer::start();
    let sb = server.create(json!({}));
    let ts = new_context(&sb, "typescript");

    let evs = run_code(
        &sb,
        in_ctx(
            "interface Shape { kind: string; size: number }\n\
             enum Level { Low = 1, High = 10 }\n\
             function largest<T extends Shape>(items: T[]): T {\n\
             \x20 return items.reduce((a: T, b: T) => (b.size > a.size ? b : a));\n\
             }\n\
             const shapes: Shape[] = [{ kind: 'a', size: 2 }, { kind: 'b', size: Level.High }];\n\
             const raw: unknown = '{\"n\": 7}';\n\
             const parsed = JSON.parse(raw as string) as { n: number };\n\
             console.log(largest<Shape>(shapes).kind, Level[10], parsed.n);\n\
             parsed.n * Level.High",
            "typescript",
            &ts,
        ),
    );
    assert_ok(&evs);
    assert_eq!(stdout_of(&evs), "b High 7\n", "{evs:?}");
    assert_eq!(result_texts(&evs), ["70"], "{evs:?}");

    // State across cells: values, the enum, a generic class declared earlier.
    let evs = run_code(
        &sb,
        in_ctx(
            "class Box<T> { constructor(public value: T) {} }\nconst b = new Box<number>(parsed.n);\nb.value + Level.Low",
            "typescript",
            &ts,
        ),
    );
    assert_ok(&evs);
    assert_eq!(result_texts(&evs), ["8"], "{evs:?}");
    let evs = run_code(
        &sb,
        in_ctx(
            "const again: Box<string> = new Box('x');\n[shapes.length, Level.High, again.value]",
            "typescript",
            &ts,
        ),
    );
    assert_eq!(result_texts(&evs), ["[ 2, 10, 'x' ]"], "{evs:?}");

    // It is Node, not Bun.
    let evs = run_code(
        &sb,
        in_ctx(
            "const runtime: string = typeof Bun === 'undefined' ? 'node ' + process.versions.node : 'bun';\nruntime",
            "typescript",
            &ts,
        ),
    );
    assert_ok(&evs);
    let runtime = result_texts(&evs).join("");
    assert!(runtime.starts_with("'node "), "runs on Node: {evs:?}");

    // A type error is not an error: types are erased, not checked.
    let evs = run_code(
        &sb,
        in_ctx(
            "const wrong: number = 'text' as any as number;\nwrong",
            "typescript",
            &ts,
        ),
    );
    assert_ok(&evs);
    assert_eq!(result_texts(&evs), ["'text'"], "{evs:?}");

    // A syntax error: the language's error event (SyntaxError, with where), no 500.
    let evs = run_code(
        &sb,
        in_ctx("const fine = 1;\nconst = 2;", "typescript", &ts),
    );
    let err = the_error(&evs);
    assert_eq!(err["ename"], "SyntaxError", "{evs:?}");
    assert!(
        err["evalue"].as_str().is_some_and(|v| !v.is_empty()),
        "{evs:?}"
    );
    let traceback: Vec<&str> = err["traceback"]
        .as_array()
        .expect("traceback")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        traceback.iter().any(|l| l.contains(":2:")) && traceback.contains(&"const = 2;"),
        "the line of the error: {evs:?}"
    );
    assert_eq!(evs.last().unwrap()["type"], "execution_complete", "{evs:?}");
    // The context goes on, state intact; the failed cell was not run.
    let evs = run_code(
        &sb,
        in_ctx("typeof fine + ' ' + b.value", "typescript", &ts),
    );
    assert_eq!(result_texts(&evs), ["'undefined 7'"], "{evs:?}");

    // The default TypeScript context (no id) is the same runtime.
    let evs = run_code(
        &sb,
        json!({"code": "const v: string = process.release.name;\nv", "context": {"language": "typescript"}}),
    );
    assert_eq!(result_texts(&evs), ["'node'"], "{evs:?}");
}

// ---------------------------------------------------------------------------------------------
// Leap0 code-interpreter API

/// The Execution object's shape: required keys, allowed keys, types.
#[track_caller]
fn check_execution(v: &Value) {
    let obj = v.as_object().unwrap_or_else(|| panic!("object: {v}"));
    for k in obj.keys() {
        assert!(
            ["context_id", "items", "logs", "error", "execution_count"].contains(&k.as_str()),
            "unexpected key {k}: {v}"
        );
    }
    assert!(v["context_id"].is_string(), "{v}");
    assert!(v["items"].is_array(), "{v}");
    let logs = v["logs"].as_object().expect("logs object");
    assert_eq!(logs.len(), 2, "{v}");
    for k in ["stdout", "stderr"] {
        let lines = v["logs"][k]
            .as_array()
            .unwrap_or_else(|| panic!("logs.{k}: {v}"));
        assert!(lines.iter().all(Value::is_string), "{v}");
    }
    for item in v["items"].as_array().unwrap() {
        for (k, val) in item.as_object().expect("item object") {
            let ok = match k.as_str() {
                "is_primary" => val.is_boolean(),
                "json" | "extra" => val.is_object() || val.is_array(),
                "text" | "html" | "markdown" | "svg" | "png" | "jpeg" | "pdf" | "latex"
                | "javascript" => val.is_string(),
                _ => false,
            };
            assert!(ok, "item key {k}: {v}");
        }
    }
    if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
        let o = e.as_object().expect("error object");
        assert_eq!(o.len(), 3, "{v}");
        assert!(e["name"].is_string() && e["value"].is_string(), "{v}");
        assert!(e["traceback"].is_string(), "traceback is one string: {v}");
    }
}

fn no_error(v: &Value) -> bool {
    v.get("error").is_none_or(Value::is_null)
}

#[track_caller]
fn execute(sb: &Sandbox, body: Value) -> Value {
    let r = post_json(sb, "/execute", body.clone());
    assert_eq!(r.status, 200, "/execute {body}: {}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{:?}",
        r.headers
    );
    let v = r.json();
    check_execution(&v);
    v
}

/// `/execute/async` read to EOF: the raw body and its events.
#[track_caller]
fn execute_stream(sb: &Sandbox, body: Value) -> (String, Vec<Value>) {
    let r = post_json(sb, "/execute/async", body.clone());
    assert_eq!(r.status, 200, "/execute/async {body}: {}", r.text());
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let evs = frames(&r.body);
    for e in &evs {
        let t = e["type"]
            .as_i64()
            .unwrap_or_else(|| panic!("integer type: {e}"));
        assert!((0..=3).contains(&t), "{e}");
    }
    let last = evs.last().unwrap_or_else(|| panic!("empty stream"));
    assert!(
        last["type"] == 2 || last["type"] == 3,
        "ends with exit or error: {evs:?}"
    );
    (r.text(), evs)
}

#[test]
fn leap0_contexts_and_validation() {
    let server = TestServer::start();
    let sb = server.create(json!({}));

    let r = get(&sb, "/healthz");
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"status": "ok"}));

    // Create: 201, integer language, cwd defaulting to /home/user.
    let create = |body: Value| -> Value {
        let r = post_json(&sb, "/contexts", body.clone());
        assert_eq!(r.status, 201, "{body}: {}", r.text());
        let v = r.json();
        assert_eq!(v.as_object().map(|o| o.len()), Some(3), "{v}");
        assert!(v["id"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
        v
    };
    let py = create(json!({"language": "python"}));
    assert_eq!(py["language"], 1);
    assert_eq!(py["cwd"], "/home/user");
    for alias in ["py", "python3"] {
        assert_eq!(create(json!({"language": alias}))["language"], 1, "{alias}");
    }
    let dflt = create(json!({}));
    assert_eq!(dflt["language"], 1, "python is the default");
    for alias in ["typescript", "ts", "javascript", "js", "bun", "node"] {
        let v = create(json!({"language": alias}));
        assert_eq!(v["language"], 2, "{alias}: {v}");
        assert_eq!(v["cwd"], "/home/user");
    }
    let tmp = create(json!({"language": "ts", "cwd": "/tmp"}));
    assert_eq!(tmp["cwd"], "/tmp");
    assert_eq!(tmp["language"], 2);

    post_json(&sb, "/contexts", json!({"language": "ruby"})).assert_invalid("language");
    post_json(&sb, "/contexts", json!({"language": 1})).assert_invalid("language");

    // List, get.
    let r = get(&sb, "/contexts");
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v.as_object().map(|o| o.len()), Some(1), "{v}");
    let items = v["items"].as_array().expect("items");
    assert!(items.contains(&py) && items.contains(&tmp), "{v}");
    let id = py["id"].as_str().unwrap();
    let r = get(&sb, &format!("/contexts/{id}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), py);
    let r = get(&sb, "/contexts/nope-nope");
    assert_eq!(r.status, 404);
    assert!(r.json()["message"].is_string(), "{}", r.text());

    // Delete: 204 empty, also for unknown ids.
    let r = delete(&sb, &format!("/contexts/{id}"));
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    assert_eq!(get(&sb, &format!("/contexts/{id}")).status, 404);
    let r = delete(&sb, "/contexts/nope-nope");
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    let items = get(&sb, "/contexts").json()["items"]
        .as_array()
        .cloned()
        .unwrap();
    assert!(!items.contains(&py));

    // Validation errors of /execute.
    let bad = |body: Value, field: &str| {
        post_json(&sb, "/execute", body).assert_invalid(field);
    };
    let e = post_json(&sb, "/execute", json!({})).assert_invalid("code");
    assert!(!e.is_empty());
    bad(json!({"code": ""}), "code");
    bad(json!({"code": 5}), "code");
    bad(json!({"code": null}), "code");
    bad(json!({"code": "1", "language": "cobol"}), "language");
    bad(json!({"code": "1", "language": 1}), "language");
    bad(json!({"code": "1", "timeout_ms": -1}), "timeout_ms");
    bad(json!({"code": "1", "timeout_ms": "soon"}), "timeout_ms");
    bad(json!({"code": "1", "env_vars": "A=1"}), "env_vars");
    bad(json!({"code": "1", "env_vars": {"A": 1}}), "env_vars");
    bad(json!({"code": "1", "context_id": 7}), "context_id");
    // The same for the stream.
    for (body, field) in [
        (json!({}), "code"),
        (json!({"code": ""}), "code"),
        (json!({"code": "1", "language": "cobol"}), "language"),
        (json!({"code": "1", "timeout_ms": -5}), "timeout_ms"),
        (
            json!({"code": "1", "context_id": "nope-nope"}),
            "context_id",
        ),
    ] {
        post_json(&sb, "/execute/async", body).assert_invalid(field);
    }
    // Not JSON at all.
    let r = post(&sb, "/execute", "{nope");
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["message"], "Invalid request", "{}", r.text());
}

#[test]
fn leap0_execute() {
    let server = TestServer::start();
    // The template's data stack, for the figure and the DataFrame below.
    let sb = server.create(json!({"image": {"uri": CODE_INTERPRETER_IMAGE}}));

    // Without context_id: a new context, returned and kept.
    let v = execute(&sb, json!({"code": "x = 10\nprint('hello')\nx * 3.0"}));
    assert_eq!(
        v["items"],
        json!([{"is_primary": true, "text": "30.0"}]),
        "{v}"
    );
    assert_eq!(v["logs"], json!({"stdout": ["hello"], "stderr": []}), "{v}");
    assert!(no_error(&v), "{v}");
    assert_eq!(v["execution_count"], 1, "{v}");
    let cid = v["context_id"].as_str().unwrap().to_string();
    let r = get(&sb, &format!("/contexts/{cid}"));
    assert_eq!(
        r.status,
        200,
        "the auto-created context exists: {}",
        r.text()
    );
    assert_eq!(r.json()["language"], 1);

    // Reuse keeps state.
    let v = execute(
        &sb,
        json!({"code": "print(x)\nprint('a\\nb')\nx", "context_id": cid}),
    );
    assert_eq!(v["context_id"], cid.as_str());
    assert_eq!(
        v["items"],
        json!([{"is_primary": true, "text": "10"}]),
        "{v}"
    );
    assert_eq!(v["logs"]["stdout"], json!(["10", "a", "b"]), "{v}");
    assert_eq!(v["execution_count"], 2, "{v}");

    // stderr lines.
    let v = execute(
        &sb,
        json!({"code": "import sys\nprint('e1', file=sys.stderr)\nprint('e2', file=sys.stderr)", "context_id": cid}),
    );
    assert_eq!(
        v["logs"],
        json!({"stdout": [], "stderr": ["e1", "e2"]}),
        "{v}"
    );
    assert_eq!(v["items"], json!([]), "{v}");

    // User error: 200, error with a string traceback, output before it kept.
    let v = execute(
        &sb,
        json!({"code": "print('a')\nundefined_y", "context_id": cid}),
    );
    let err = &v["error"];
    assert_eq!(err["name"], "NameError", "{v}");
    assert_eq!(err["value"], "name 'undefined_y' is not defined", "{v}");
    assert!(
        err["traceback"]
            .as_str()
            .is_some_and(|t| t.contains("NameError")),
        "{v}"
    );
    assert_eq!(v["logs"]["stdout"], json!(["a"]), "{v}");
    assert_eq!(v["items"], json!([]), "{v}");

    // Language mismatch with the context.
    let e = post_json(
        &sb,
        "/execute",
        json!({"code": "1", "context_id": cid, "language": "typescript"}),
    )
    .assert_invalid("language");
    assert!(!e.is_empty());
    // The matching language (by alias) is fine.
    let v = execute(
        &sb,
        json!({"code": "x", "context_id": cid, "language": "py"}),
    );
    assert_eq!(v["items"][0]["text"], "10", "{v}");

    // env_vars reach the code.
    let v = execute(
        &sb,
        json!({"code": "import os\nos.environ.get('LEAP_VAR')", "context_id": cid, "env_vars": {"LEAP_VAR": "bar"}}),
    );
    assert_eq!(
        v["items"],
        json!([{"is_primary": true, "text": "'bar'"}]),
        "{v}"
    );

    // Rich items: html for a DataFrame-like object; a display is not primary.
    let v = execute(
        &sb,
        json!({"code": "class R:\n    def _repr_html_(self): return '<i>r</i>'\n    def __repr__(self): return 'R()'\ndisplay(R())\nR()", "context_id": cid}),
    );
    assert_eq!(
        v["items"],
        json!([
            {"is_primary": false, "text": "R()", "html": "<i>r</i>"},
            {"is_primary": true, "text": "R()", "html": "<i>r</i>"}
        ]),
        "{v}"
    );

    // Timeout: 200 with a TimeoutError; the context id is kept and usable.
    let t = Instant::now();
    let v = execute(
        &sb,
        json!({"code": "import time\nprint('going')\ntime.sleep(30)", "context_id": cid, "timeout_ms": 500}),
    );
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    assert_eq!(
        v["error"],
        json!({"name": "TimeoutError", "value": "Execution timed out after 500 ms", "traceback": ""}),
        "{v}"
    );
    assert_eq!(v["context_id"], cid.as_str());
    assert_eq!(v["logs"]["stdout"], json!(["going"]), "{v}");
    // An interruptible cell keeps the context's state.
    let v = execute(&sb, json!({"code": "x + 1", "context_id": cid}));
    assert_eq!(v["items"][0]["text"], "11", "{v}");
    assert!(no_error(&v), "{v}");

    // A cell that ignores SIGINT: the REPL is restarted, the id kept, the state lost.
    let t = Instant::now();
    let v = execute(
        &sb,
        json!({"code": "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(30)", "context_id": cid, "timeout_ms": 300}),
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(v["context_id"], cid.as_str());
    assert_eq!(v["error"]["name"], "TimeoutError", "{v}");
    assert_eq!(v["error"]["traceback"], "", "{v}");
    assert!(
        v["error"]["value"]
            .as_str()
            .is_some_and(|s| s.starts_with("Execution timed out after 300 ms")),
        "{v}"
    );
    let v = execute(&sb, json!({"code": "'x' in globals()", "context_id": cid}));
    assert_eq!(
        v["items"][0]["text"], "False",
        "state lost after a restart: {v}"
    );
    let v = execute(&sb, json!({"code": "x = 10\n1 + 1", "context_id": cid}));
    assert_eq!(v["items"][0]["text"], "2", "{v}");
    assert!(no_error(&v), "{v}");

    // A shown figure: a non-primary item with png (and svg); a DataFrame: html.
    let v = execute(
        &sb,
        json!({"code": "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()\n5", "context_id": cid}),
    );
    assert!(no_error(&v), "{v}");
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{v}");
    let fig = &items[0];
    assert_eq!(fig["is_primary"], false, "{v}");
    let png = base64_decode(fig["png"].as_str().expect("png")).expect("base64");
    assert!(png.starts_with(PNG_SIGNATURE), "not a PNG");
    assert_eq!(items[1], json!({"is_primary": true, "text": "5"}), "{v}");
    let fig = fig.clone();
    let v = execute(
        &sb,
        json!({"code": "import pandas as pd\npd.DataFrame({'a': [1, 2]})", "context_id": cid}),
    );
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{v}");
    assert_eq!(items[0]["is_primary"], true, "{v}");
    assert!(
        items[0]["html"]
            .as_str()
            .is_some_and(|h| h.contains("<table")),
        "{v}"
    );
    assert!(items[0]["text"].is_string(), "{v}");

    // TypeScript.
    let v = execute(
        &sb,
        json!({"code": "const a: number = 40 + 2;\nconsole.log('ts');\na", "language": "typescript"}),
    );
    assert!(no_error(&v), "{v}");
    assert_eq!(
        v["items"],
        json!([{"is_primary": true, "text": "42"}]),
        "{v}"
    );
    assert_eq!(v["logs"]["stdout"], json!(["ts"]), "{v}");
    let tsid = v["context_id"].as_str().unwrap().to_string();
    assert_ne!(tsid, cid);
    assert_eq!(get(&sb, &format!("/contexts/{tsid}")).json()["language"], 2);
    let v = execute(&sb, json!({"code": "a + 1", "context_id": tsid}));
    assert_eq!(v["items"][0]["text"], "43", "{v}");
    let v = execute(&sb, json!({"code": "nope.x", "context_id": tsid}));
    assert_eq!(v["error"]["name"], "ReferenceError", "{v}");
    // On Node; a syntax error is the execution's error, the context goes on.
    let v = execute(
        &sb,
        json!({"code": "typeof Bun === 'undefined' && process.release.name", "context_id": tsid}),
    );
    assert_eq!(v["items"][0]["text"], "'node'", "{v}");
    let v = execute(
        &sb,
        json!({"code": "let n: number = ;", "context_id": tsid}),
    );
    assert_eq!(v["error"]["name"], "SyntaxError", "{v}");
    assert!(
        v["error"]["traceback"]
            .as_str()
            .is_some_and(|t| t.contains("let n: number = ;")),
        "{v}"
    );
    let v = execute(&sb, json!({"code": "a", "context_id": tsid}));
    assert_eq!(v["items"][0]["text"], "42", "{v}");
    post_json(
        &sb,
        "/execute",
        json!({"code": "1", "context_id": tsid, "language": "python"}),
    )
    .assert_invalid("language");

    // A context created through /contexts is locked to its language too, and runs in its cwd.
    let r = post_json(
        &sb,
        "/contexts",
        json!({"language": "python", "cwd": "/tmp"}),
    );
    assert_eq!(r.status, 201);
    let pid = r.json()["id"].as_str().unwrap().to_string();
    let v = execute(
        &sb,
        json!({"code": "import os\nos.getcwd()", "context_id": pid}),
    );
    assert_eq!(v["items"][0]["text"], "'/tmp'", "{v}");
    let v = execute(&sb, json!({"code": "import os\nos.getcwd()"}));
    assert_eq!(v["items"][0]["text"], "'/home/user'", "default cwd: {v}");

    // Checked last so that the rest runs even while it fails.
    assert!(
        fig["svg"].as_str().is_some_and(|s| s.contains("<svg")),
        "leap0.md §5: showing a figure adds an item with png and svg: {}",
        serde_json::to_string(&fig.as_object().map(|o| o.keys().collect::<Vec<_>>()))
            .unwrap_or_default()
    );
}

#[test]
fn leap0_execute_async_stream() {
    let server = TestServer::start();
    let sb = server.create(json!({}));

    let (raw, evs) = execute_stream(&sb, json!({"code": "print(\"hello\")"}));
    assert_eq!(
        raw, "data: {\"type\":0,\"data\":\"hello\"}\n\ndata: {\"type\":2,\"code\":0}\n\n",
        "{evs:?}"
    );

    // stdout and stderr lines, exit code.
    let (_, evs) = execute_stream(
        &sb,
        json!({"code": "import sys\nprint('a\\nb')\nprint('e', file=sys.stderr)\nsys.exit(3)"}),
    );
    let outs: Vec<&Value> = evs.iter().filter(|e| e["type"] == 0).collect();
    assert_eq!(
        outs,
        [
            &json!({"type": 0, "data": "a"}),
            &json!({"type": 0, "data": "b"})
        ],
        "{evs:?}"
    );
    assert!(evs.contains(&json!({"type": 1, "data": "e"})), "{evs:?}");
    assert_eq!(evs.last().unwrap(), &json!({"type": 2, "code": 3}));

    // An exception: traceback on stderr, non-zero exit.
    let (_, evs) = execute_stream(&sb, json!({"code": "raise ValueError('boom')"}));
    assert!(
        evs.iter()
            .any(|e| e["type"] == 1 && e["data"] == "ValueError: boom"),
        "{evs:?}"
    );
    assert_eq!(evs.last().unwrap()["type"], 2);
    assert_ne!(evs.last().unwrap()["code"], 0);

    // A fresh process per request: no state from earlier requests.
    let (_, evs) = execute_stream(&sb, json!({"code": "print('x' in globals())"}));
    assert_eq!(evs[0], json!({"type": 0, "data": "False"}));

    // Timeout ends the stream with {"type":3,"data":"timeout"}.
    let t = Instant::now();
    let (_, evs) = execute_stream(
        &sb,
        json!({"code": "import time\nprint('go', flush=True)\ntime.sleep(30)", "timeout_ms": 300}),
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(
        evs.last().unwrap(),
        &json!({"type": 3, "data": "timeout"}),
        "{evs:?}"
    );
    assert!(evs.contains(&json!({"type": 0, "data": "go"})), "{evs:?}");

    // TypeScript, and a context's language and cwd.
    let (_, evs) = execute_stream(
        &sb,
        json!({"code": "const n: number = 1;\nconsole.log('ts ' + n)", "language": "ts"}),
    );
    assert_eq!(
        evs,
        [
            json!({"type": 0, "data": "ts 1"}),
            json!({"type": 2, "code": 0})
        ]
    );
    // Node, types erased; ES module syntax (import, top-level await) and CommonJS both run.
    let (_, evs) = execute_stream(
        &sb,
        json!({"code": "import os from 'node:os';\nconst t: string = await Promise.resolve(typeof os.cpus);\nconsole.log(t, typeof Bun)", "language": "typescript"}),
    );
    assert_eq!(
        evs,
        [
            json!({"type": 0, "data": "function undefined"}),
            json!({"type": 2, "code": 0})
        ]
    );
    let (_, evs) = execute_stream(
        &sb,
        json!({"code": "const p: string = require('node:path').join('a', 'b');\nconsole.log(p)", "language": "js"}),
    );
    assert_eq!(
        evs,
        [
            json!({"type": 0, "data": "a/b"}),
            json!({"type": 2, "code": 0})
        ]
    );
    // A syntax error: on stderr, exit code 1, as Node reports one.
    let (_, evs) = execute_stream(&sb, json!({"code": "const = 1;", "language": "ts"}));
    assert!(
        evs.iter().any(|e| e["type"] == 1
            && e["data"]
                .as_str()
                .is_some_and(|d| d.starts_with("SyntaxError: "))),
        "{evs:?}"
    );
    assert_eq!(
        evs.last().unwrap(),
        &json!({"type": 2, "code": 1}),
        "{evs:?}"
    );
    let r = post_json(
        &sb,
        "/contexts",
        json!({"language": "typescript", "cwd": "/tmp"}),
    );
    assert_eq!(r.status, 201);
    let tid = r.json()["id"].as_str().unwrap().to_string();
    let (_, evs) = execute_stream(
        &sb,
        json!({"code": "console.log(process.cwd())", "context_id": tid}),
    );
    assert_eq!(
        evs,
        [
            json!({"type": 0, "data": "/tmp"}),
            json!({"type": 2, "code": 0})
        ]
    );
}

/// Deleting contexts back to back and then the sandbox right away must neither hang nor leave
/// kernels behind (kernel leaves used to stay frozen with the kernel inside, and the sandbox
/// DELETE never answered).
#[test]
fn sandbox_delete_right_after_context_deletes() {
    let server = TestServer::start();
    for round in 0..4 {
        let sb = server.create(json!({}));
        let ids: Vec<String> = (0..5).map(|_| new_context(&sb, "python")).collect();
        for id in &ids {
            assert_ok(&run_code(&sb, in_ctx("x = 1", "python", id)));
        }
        let pids = sb.host_pids();
        for id in &ids {
            delete(&sb, &format!("/code/contexts/{id}")).assert_empty_ok();
        }
        let t = Instant::now();
        let r = ureq::delete(&server.url(&format!("/v1/sandboxes/{}", sb.id)))
            .timeout(Duration::from_secs(20))
            .call();
        let status = match r {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(s, _)) => s,
            Err(e) => panic!(
                "round {round}: DELETE /v1/sandboxes/{} failed after {:?}: {e}",
                sb.id,
                t.elapsed()
            ),
        };
        assert_eq!(status, 204, "round {round}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "round {round}: {:?}",
            t.elapsed()
        );
        wait_for(
            "every process of the deleted sandbox to exit",
            Duration::from_secs(10),
            || {
                pids.iter().all(|p| {
                    !std::path::Path::new(&format!("/proc/{p}")).exists()
                        || std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                            s.rsplit_once(')')
                                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
                        })
                })
            },
        );
    }
}

/// Leap0 contexts created implicitly by `/execute` go away once idle past the configured TTL;
/// contexts created explicitly stay.
#[test]
fn implicit_leap0_contexts_expire_when_idle() {
    let server = TestServer::start_with_config("context_idle_ttl_secs = 2\n");
    let sb = server.create(json!({}));
    let v = execute(&sb, json!({"code": "41 + 1"}));
    assert_eq!(v["items"][0]["text"], "42", "{v}");
    let implicit = v["context_id"].as_str().expect("context id").to_string();
    let r = post_json(&sb, "/contexts", json!({"language": "python"}));
    assert_eq!(r.status, 201);
    let explicit = r.json()["id"].as_str().expect("id").to_string();
    assert_eq!(get(&sb, &format!("/contexts/{implicit}")).status, 200);

    // Used again before the TTL: still there.
    std::thread::sleep(Duration::from_millis(1200));
    let v = execute(&sb, json!({"code": "1", "context_id": implicit}));
    assert_eq!(v["items"][0]["text"], "1", "{v}");

    wait_for(
        "the idle implicit context to be removed",
        Duration::from_secs(10),
        || get(&sb, &format!("/contexts/{implicit}")).status == 404,
    );
    assert_eq!(get(&sb, &format!("/contexts/{explicit}")).status, 200);
}

/// Go contexts (the Go kernel, built and run inside the sandbox as its user): a variable, a
/// function, a type and an import declared in one cell are there in the next; each cell's
/// output is only its own; a compile error and a panic are `error` events named as upstream's
/// Go kernel (GoNB) names them, `ERROR`; an interrupt stops an endless loop and the context goes
/// on; a Leap0 timeout too. Skipped, saying so, where the host has no `go`.
#[test]
fn go_contexts_keep_declarations_and_values() {
    if !have_host_program("go") {
        println!(
            "GO IS NOT INSTALLED on this host (apt-get install golang-go): Go context test SKIPPED"
        );
        return;
    }
    let server = TestServer::start();
    let sb = server.create(json!({"resourceLimits": {"cpu": "2", "memory": "2Gi"}}));
    let go = new_context(&sb, "go");

    let evs = run_code(
        &sb,
        in_ctx(
            "import \"fmt\"\nimport \"strings\"\ntype point struct{ x, y int }\nx := 40\nfunc add(a, b int) int { return a + b }\np := &point{1, 2}\nfmt.Println(\"first\")",
            "go",
            &go,
        ),
    );
    assert_ok(&evs);
    assert_eq!(evs[0]["text"], go.as_str());
    assert_eq!(stdout_of(&evs), "first\n", "{evs:?}");
    assert!(results_of(&evs).is_empty(), "{evs:?}");

    // The function, the variable (its value carried), the type and the import; only this
    // cell's output.
    let evs = run_code(
        &sb,
        in_ctx(
            "x = add(x, 2)\np.y++\nfmt.Println(strings.Repeat(\"a\", 2), x, *p)",
            "go",
            &go,
        ),
    );
    assert_ok(&evs);
    assert_eq!(stdout_of(&evs), "aa 42 {1 3}\n", "{evs:?}");
    let evs = run_code(&sb, in_ctx("fmt.Println(x, p.y)", "go", &go));
    assert_eq!(stdout_of(&evs), "42 3\n", "{evs:?}");

    // A compile error: ERROR, the compiler's message naming the cell; nothing of it is kept.
    let evs = run_code(
        &sb,
        in_ctx("func notKept() {}\ny := undefinedThing + 1", "go", &go),
    );
    let e = the_error(&evs);
    assert_eq!(e["ename"], "ERROR", "{evs:?}");
    let evalue = e["evalue"].as_str().unwrap_or("");
    assert!(evalue.contains("undefined: undefinedThing"), "{e}");
    assert!(evalue.starts_with("cell["), "{e}");
    assert_eq!(evs.last().unwrap()["type"], "execution_complete", "{evs:?}");
    let evs = run_code(&sb, in_ctx("notKept()", "go", &go));
    assert!(
        the_error(&evs)["evalue"]
            .as_str()
            .is_some_and(|v| v.contains("undefined: notKept")),
        "{evs:?}"
    );

    // A panic: ERROR with the panic's message; its goroutine dump names the cell.
    let evs = run_code(
        &sb,
        in_ctx(
            "fmt.Println(\"before\")\nvar empty []int\n_ = empty[5]",
            "go",
            &go,
        ),
    );
    let e = the_error(&evs);
    assert_eq!(e["ename"], "ERROR", "{evs:?}");
    assert!(
        e["evalue"]
            .as_str()
            .is_some_and(|v| v.starts_with("panic: runtime error: index out of range")),
        "{e}"
    );
    assert!(
        e["traceback"].as_array().is_some_and(|t| t
            .iter()
            .any(|l| l.as_str().is_some_and(|l| l.contains("cell[")))),
        "{e}"
    );
    assert_eq!(stdout_of(&evs), "before\n", "{evs:?}");

    // Interrupt an endless loop; the context keeps its state.
    let resp = sb
        .execd("POST", "/code")
        .timeout(T)
        .set("Content-Type", "application/json")
        .send_string(&in_ctx("fmt.Println(\"started\")\nfor {}", "go", &go).to_string())
        .expect("long cell");
    let mut reader = BufReader::new(resp.into_reader());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            reader.read_line(&mut line).expect("read") > 0,
            "ended early"
        );
        if line.contains("\"stdout\"") {
            break;
        }
    }
    let t = Instant::now();
    delete(&sb, &format!("/code?id={go}")).assert_empty_ok();
    let mut rest = String::new();
    reader.read_to_string(&mut rest).expect("rest");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // The rest of the stream starts at the blank line that ended the stdout frame.
    let evs = code_events(frames(rest.trim_start_matches('\n').as_bytes()));
    let e = the_error(&evs);
    assert_eq!(e["ename"], "ERROR", "{evs:?}");
    assert_eq!(e["evalue"], "interrupted", "{evs:?}");
    let evs = run_code(&sb, in_ctx("fmt.Println(x + 1)", "go", &go));
    assert_eq!(stdout_of(&evs), "43\n", "state kept: {evs:?}");

    // The default Go context, and the Leap0 API: language 3, a timeout that stops the loop.
    let evs = run_code(
        &sb,
        json!({"code": "import \"fmt\"\nfmt.Println(\"default\")", "context": {"language": "go"}}),
    );
    assert_eq!(stdout_of(&evs), "default\n", "{evs:?}");
    let r = post_json(&sb, "/contexts", json!({"language": "golang"}));
    assert_eq!(r.status, 201, "{}", r.text());
    let ctx = r.json();
    assert_eq!(ctx["language"], 3, "{ctx}");
    let cid = ctx["id"].as_str().expect("id").to_string();
    let v = execute(
        &sb,
        json!({"code": "import \"fmt\"\nn := 6 * 7\nfmt.Println(n)", "context_id": cid}),
    );
    assert!(no_error(&v), "{v}");
    assert_eq!(v["logs"]["stdout"], json!(["42"]), "{v}");
    let t = Instant::now();
    let v = execute(
        &sb,
        json!({"code": "for {}", "context_id": cid, "timeout_ms": 1500}),
    );
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert_eq!(v["error"]["name"], "TimeoutError", "{v}");
    let v = execute(
        &sb,
        json!({"code": "fmt.Println(n + 1)", "context_id": cid, "language": "go"}),
    );
    assert_eq!(v["logs"]["stdout"], json!(["43"]), "{v}");
}

/// Where the sandbox has no `go`, a Go context is a quick 400 naming the language, never a
/// hang: here a sandbox whose `PATH` leads nowhere.
#[test]
fn go_context_without_a_toolchain_is_a_400() {
    let server = TestServer::start();
    let sb = server.create(json!({
        "env": {"PATH": "/nonexistent"},
        "entrypoint": ["/usr/bin/tail", "-f", "/dev/null"],
    }));
    let t = Instant::now();
    let r = post_json(&sb, "/code/context", json!({"language": "go"}));
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let msg = r.assert_error(400, "INVALID_REQUEST_BODY");
    assert!(
        msg.contains("language go") && msg.contains("go is not installed"),
        "{msg}"
    );
    post_json(&sb, "/contexts", json!({"language": "go"})).assert_invalid("language");
}

/// Java errors are named as upstream's Java kernel (IJava) names them: `EvalException` with the
/// exception's message and its stack trace under the real class name, `CompilationException`
/// with an empty value and the compiler's diagnostics, `EvaluationInterruptedException` for an
/// interrupt. Skipped, saying so, where the host has no JDK.
#[test]
fn java_errors_are_named_as_upstream() {
    if !have_host_program("jshell") {
        println!("NO JDK (jshell) on this host: Java error names test SKIPPED");
        return;
    }
    let server = TestServer::start();
    let sb = server.create(json!({"resourceLimits": {"cpu": "2", "memory": "2Gi"}}));
    let jv = new_context(&sb, "java");
    let evs = run_code(&sb, in_ctx("int y = 1 / 0;", "java", &jv));
    let e = the_error(&evs);
    assert_eq!(e["ename"], "EvalException", "{e}");
    assert_eq!(e["evalue"], "/ by zero", "{e}");
    assert!(
        e["traceback"].as_array().is_some_and(|t| t
            .iter()
            .any(|l| l == "java.lang.ArithmeticException: / by zero")),
        "{e}"
    );
    let evs = run_code(&sb, in_ctx("int z = undefinedThing + 1;", "java", &jv));
    let e = the_error(&evs);
    assert_eq!(e["ename"], "CompilationException", "{e}");
    assert_eq!(e["evalue"], "", "{e}");
    assert!(
        e["traceback"]
            .as_array()
            .is_some_and(|t| t.iter().any(|l| l == "cannot find symbol")),
        "{e}"
    );
    let evs = run_code(&sb, in_ctx("int q = (1 +", "java", &jv));
    assert_eq!(
        the_error(&evs)["ename"],
        "IncompleteSourceException",
        "{evs:?}"
    );
    let evs = run_code(&sb, in_ctx("40 + 2", "java", &jv));
    assert_eq!(result_texts(&evs), ["42"], "{evs:?}");
}

/// When this process started, in seconds on the sandbox's clock, from its own `/proc`.
const PROCESS_START: &str = "import os\n\
with open('/proc/self/stat') as f: start = int(f.read().rsplit(')', 1)[1].split()[19])\n\
print(start / os.sysconf('SC_CLK_TCK'))";

#[test]
fn a_new_context_takes_a_kernel_started_ahead_which_shares_nothing_with_the_others() {
    let server = TestServer::start();
    let sb = server.create(json!({}));
    for language in ["python", "javascript"] {
        let first = new_context(&sb, language);
        let (set, read) = if language == "python" {
            (
                "import random, os\nsecret = 'first-context'\nprint(random.random(), os.getpid())",
                "print('secret' in globals())",
            )
        } else {
            (
                "globalThis.secret = 'first-context'; console.log(Math.random(), process.pid)",
                "console.log(typeof secret !== 'undefined')",
            )
        };
        let evs = run_code(&sb, in_ctx(set, language, &first));
        assert_ok(&evs);
        let first_out = stdout_of(&evs);
        // Time for the spare to start, and to age: a kernel started for the create below
        // would be younger than this pause.
        std::thread::sleep(Duration::from_millis(1500));
        let second = new_context(&sb, language);
        assert_ne!(first, second);
        if language == "python" {
            let (one, two) = (started_at(&sb, &first), started_at(&sb, &second));
            // A kernel started for the second create would start after the pause.
            assert!(
                two - one < 1.0,
                "the second context's kernel was started ahead, with the first ({one} s, {two} s)"
            );
        }
        let evs = run_code(&sb, in_ctx(read, language, &second));
        assert_ok(&evs);
        assert_eq!(
            stdout_of(&evs).trim().to_lowercase(),
            "false",
            "nothing of the first context: {evs:?}"
        );
        let evs = run_code(&sb, in_ctx(set, language, &second));
        assert_ok(&evs);
        let second_out = stdout_of(&evs);
        let split = |s: &str| {
            let v: Vec<String> = s.split_whitespace().map(str::to_string).collect();
            (v[0].clone(), v[1].clone())
        };
        let (r1, p1) = split(&first_out);
        let (r2, p2) = split(&second_out);
        assert_ne!(p1, p2, "a process of its own");
        assert_ne!(r1, r2, "its own random seed");
        // The first context is unchanged, and a third one is fresh too.
        let evs = run_code(&sb, in_ctx(read, language, &first));
        assert_ok(&evs);
        assert_eq!(
            stdout_of(&evs).trim().to_lowercase(),
            "true",
            "the first context kept its state: {evs:?}"
        );
        let third = new_context(&sb, language);
        let evs = run_code(&sb, in_ctx(read, language, &third));
        assert_ok(&evs);
        assert_eq!(stdout_of(&evs).trim().to_lowercase(), "false", "{evs:?}");
        if language == "python" {
            // Contexts deleted one by one leave the spare for the next create.
            let third_started = started_at(&sb, &third);
            for ctx in [&first, &second, &third] {
                delete(&sb, &format!("/code/contexts/{ctx}")).assert_empty_ok();
            }
            std::thread::sleep(Duration::from_millis(1500));
            let fourth = new_context(&sb, language);
            let fourth_started = started_at(&sb, &fourth);
            assert!(
                fourth_started - third_started < 1.0,
                "a spare outlives contexts deleted by id ({third_started} s, {fourth_started} s)"
            );
        }
    }
    // Deleting by language removes the spares too.
    for language in ["python", "javascript"] {
        delete(&sb, &format!("/code/contexts?language={language}")).assert_empty_ok();
    }
    wait_for("spare kernels to go", Duration::from_secs(10), || {
        !sb.host_pids().iter().any(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.contains("python_kernel") || cmd.contains("js_kernel")
        })
    });
}

/// A create that comes while the spare for its kind is still starting waits for that spare
/// instead of starting a kernel of its own: its kernel is older (a lower pid in the sandbox)
/// than the spare started after it. A kernel of its own would be the newest process.
#[test]
fn a_create_right_after_another_waits_for_the_spare_being_started() {
    let server = TestServer::start();
    let sb = server.create(json!({}));
    // The first create starts its own kernel, and a spare right after it.
    let _first = new_context(&sb, "python");
    let second = new_context(&sb, "python");
    let probe = r#"
import os
me = os.getpid()
kernels = []
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            if b"python_kernel" in open("/proc/%s/cmdline" % p, "rb").read():
                kernels.append(int(p))
        except OSError:
            pass
print(me, max(kernels))
"#;
    let mut last = String::new();
    let newer_spare = (0..50).any(|_| {
        let evs = run_code(&sb, in_ctx(probe, "python", &second));
        assert_ok(&evs);
        last = stdout_of(&evs);
        let v: Vec<i64> = last
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        let newer = v.len() == 2 && v[1] > v[0];
        if !newer {
            std::thread::sleep(Duration::from_millis(100));
        }
        newer
    });
    assert!(
        newer_spare,
        "the second context took the spare started by the first create, and a newer spare \
         started for the next one (its pid, the highest kernel pid: {last})"
    );
}

/// When the kernel of context `ctx` started, in seconds on the sandbox's clock.
fn started_at(sb: &Sandbox, ctx: &str) -> f64 {
    let evs = run_code(sb, in_ctx(PROCESS_START, "python", ctx));
    assert_ok(&evs);
    stdout_of(&evs).trim().parse().expect("start time")
}
