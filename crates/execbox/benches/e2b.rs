//! E2B surface benchmark: the same operations through the E2B API and through the OpenSandbox
//! API (lifecycle + execd) of one real release `execbox serve` on loopback, in one run, over
//! plain HTTP (no SDK), every data-plane request through the server's proxy into the agent:
//!
//! 1. create → first command finished: E2B `POST /v2/sandboxes` (template `base`) then envd
//!    `process.Process/Start` of `/bin/bash -c 'echo hi'` read to its `end` event, vs.
//!    OpenSandbox `POST /v1/sandboxes` (image `default`) + `GET …/endpoints/44772` then execd
//!    `POST /command` `echo hi` read to EOF (each sandbox deleted afterwards, not timed);
//! 2. `echo hi` round trip on an existing sandbox, both surfaces;
//! 3. `print(1)` round trip on a warm Python context: E2B `POST /execute` (port 49999, the
//!    default context; python kernels run in `base` as well) vs. execd `POST /code` on a
//!    context made once; plus a bare `python3 -c 'print(1)'` spawned on the host as baseline.
//!
//! The two sides of a pair run alternately, one iteration each in turn. Each pair is printed with p50/p99 in ms and the E2B/OpenSandbox ratio (target: E2B within
//! 20 %, ratio <= 1.20).
//!
//! Run: `cargo bench -p execbox --bench e2b` (as root). `EXECBOX_BENCH_E2B_N` sets the number
//! of iterations of each series (default 40; creations are half of it, at least 10).
//!
//! The release profile aborts on panic, so nothing here panics: failures are reported and the
//! run goes on to the cleanup (sandboxes deleted, server killed, state directory removed).

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

mod support;

use support::{describe, env_usize, machine, Res, Server};

const TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Reporting

#[derive(Clone, Copy)]
struct Stats {
    n: usize,
    p50: f64,
    p99: f64,
}

fn stats(mut ms: Vec<f64>) -> Stats {
    ms.sort_by(f64::total_cmp);
    Stats {
        n: ms.len(),
        p50: support::percentile_ms(&ms, 0.50),
        p99: support::percentile_ms(&ms, 0.99),
    }
}

fn line(name: &str, s: Option<Stats>) {
    match s {
        Some(s) => println!(
            "  {name:<58} n={:<4} p50={:>8.3} ms  p99={:>8.3} ms",
            s.n, s.p50, s.p99
        ),
        None => println!("  {name:<58} failed"),
    }
}

/// Times `n` runs of `once` (after `warm` untimed ones), in ms; the first failure ends it.
/// (The host baseline; the pairs use [`series_pair`].)
fn series(what: &str, warm: usize, n: usize, mut once: impl FnMut() -> Res<f64>) -> Option<Stats> {
    for _ in 0..warm {
        if let Err(e) = once() {
            println!("  {what}: warm-up failed: {e}");
            return None;
        }
    }
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        match once() {
            Ok(ms) => v.push(ms),
            Err(e) => {
                println!("  {what}: iteration {i} failed: {e}");
                return None;
            }
        }
    }
    Some(stats(v))
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------------------------
// The E2B surface

struct E2bSandbox {
    id: String,
    token: String,
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(TIMEOUT)
        .max_idle_connections_per_host(16)
        .build()
}

fn e2b_create(http: &ureq::Agent, base: &str) -> Res<E2bSandbox> {
    let v: Value = http
        .post(&format!("{base}/v2/sandboxes"))
        .set("X-API-Key", "bench")
        .send_json(json!({"templateID": "base", "timeout": 300}))
        .map_err(|e| format!("POST /v2/sandboxes: {}", describe(e)))?
        .into_json()
        .map_err(|e| e.to_string())?;
    Ok(E2bSandbox {
        id: v["sandboxID"].as_str().ok_or("no sandboxID")?.to_string(),
        token: v["envdAccessToken"]
            .as_str()
            .ok_or("no envdAccessToken")?
            .to_string(),
    })
}

fn e2b_kill(http: &ureq::Agent, base: &str, id: &str) -> Res<()> {
    http.delete(&format!("{base}/sandboxes/{id}"))
        .set("X-API-Key", "bench")
        .call()
        .map(|_| ())
        .map_err(|e| format!("DELETE /sandboxes/{id}: {}", describe(e)))
}

fn envelope(payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// envd `process.Process/Start` of `/bin/bash -c 'echo hi'`, the stream read to its end;
/// checks stdout `hi\n`, an `end` event with exit code 0 and a clean end-of-stream.
fn e2b_echo(http: &ureq::Agent, base: &str, sb: &E2bSandbox) -> Res<()> {
    let body = json!({"process": {"cmd": "/bin/bash", "args": ["-c", "echo hi"], "envs": {}}});
    let resp = http
        .post(&format!("{base}/process.Process/Start"))
        .set("E2b-Sandbox-Id", &sb.id)
        .set("E2b-Sandbox-Port", "49983")
        .set("X-Access-Token", &sb.token)
        .set("Connect-Protocol-Version", "1")
        .set("Content-Type", "application/connect+json")
        .send_bytes(&envelope(body.to_string().as_bytes()))
        .map_err(|e| format!("process.Process/Start: {}", describe(e)))?;
    let mut rd = BufReader::new(resp.into_reader());
    let mut stdout = Vec::new();
    let mut exit = None;
    loop {
        let mut head = [0u8; 5];
        rd.read_exact(&mut head)
            .map_err(|e| format!("stream ended without end-of-stream: {e}"))?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut payload = vec![0u8; len];
        rd.read_exact(&mut payload)
            .map_err(|e| format!("truncated envelope: {e}"))?;
        let v: Value = serde_json::from_slice(&payload).map_err(|e| e.to_string())?;
        if head[0] & 2 != 0 {
            if v.get("error").is_some() {
                return Err(format!("stream error: {v}"));
            }
            break;
        }
        let ev = &v["event"];
        if let Some(b) = ev["data"]["stdout"].as_str() {
            stdout.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| e.to_string())?,
            );
        }
        if ev.get("end").is_some() {
            exit = Some(ev["end"]["exitCode"].as_i64().unwrap_or(0));
        }
    }
    if stdout != b"hi\n" || exit != Some(0) {
        return Err(format!(
            "unexpected: stdout {:?}, exit {exit:?}",
            String::from_utf8_lossy(&stdout)
        ));
    }
    Ok(())
}

/// `POST /execute` (port 49999) of `print(1)` on the default context, read to its end.
fn e2b_print(http: &ureq::Agent, base: &str, sb: &E2bSandbox) -> Res<()> {
    let text = http
        .post(&format!("{base}/execute"))
        .set("E2b-Sandbox-Id", &sb.id)
        .set("E2b-Sandbox-Port", "49999")
        .set("X-Access-Token", &sb.token)
        .set("Content-Type", "application/json")
        .send_string(r#"{"code":"print(1)"}"#)
        .map_err(|e| format!("POST /execute: {}", describe(e)))?
        .into_string()
        .map_err(|e| e.to_string())?;
    let mut stdout = String::new();
    let mut end = false;
    for l in text.lines() {
        let v: Value = serde_json::from_str(l).map_err(|e| format!("line {l:?}: {e}"))?;
        match v["type"].as_str() {
            Some("stdout") => stdout.push_str(v["text"].as_str().unwrap_or("")),
            Some("error") => return Err(format!("error: {v}")),
            Some("end_of_execution") => end = true,
            _ => {}
        }
    }
    if stdout != "1\n" || !end {
        return Err(format!("unexpected answer {text:?}"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The OpenSandbox surface

struct OsSandbox {
    id: String,
    endpoint: String,
    token: String,
}

fn os_create(http: &ureq::Agent, base: &str) -> Res<OsSandbox> {
    let v: Value = http
        .post(&format!("{base}/v1/sandboxes"))
        .send_json(json!({
            "image": {"uri": "default"},
            "entrypoint": ["tail", "-f", "/dev/null"],
            "resourceLimits": {},
            "timeout": 300,
        }))
        .map_err(|e| format!("POST /v1/sandboxes: {}", describe(e)))?
        .into_json()
        .map_err(|e| e.to_string())?;
    let id = v["id"].as_str().ok_or("no id")?.to_string();
    let ep: Value = http
        .get(&format!("{base}/v1/sandboxes/{id}/endpoints/44772"))
        .call()
        .map_err(|e| format!("endpoint: {}", describe(e)))?
        .into_json()
        .map_err(|e| e.to_string())?;
    Ok(OsSandbox {
        id,
        endpoint: format!("http://{}", ep["endpoint"].as_str().ok_or("no endpoint")?),
        token: ep["headers"]["X-EXECD-ACCESS-TOKEN"]
            .as_str()
            .ok_or("no token")?
            .to_string(),
    })
}

fn os_delete(http: &ureq::Agent, base: &str, id: &str) -> Res<()> {
    http.delete(&format!("{base}/v1/sandboxes/{id}"))
        .call()
        .map(|_| ())
        .map_err(|e| format!("DELETE /v1/sandboxes/{id}: {}", describe(e)))
}

impl OsSandbox {
    fn req(&self, http: &ureq::Agent, method: &str, path: &str) -> ureq::Request {
        http.request(method, &format!("{}{path}", self.endpoint))
            .set("X-EXECD-ACCESS-TOKEN", &self.token)
    }
}

/// Reads an execd SSE stream to EOF: its stdout, whether it completed, any error.
fn read_sse(resp: ureq::Response) -> Res<(String, bool)> {
    let mut rd = BufReader::new(resp.into_reader());
    let mut line = String::new();
    let mut stdout = String::new();
    let mut complete = false;
    loop {
        line.clear();
        let n = rd
            .read_line(&mut line)
            .map_err(|e| format!("reading the stream: {e}"))?;
        if n == 0 {
            break;
        }
        let l = line.trim_end_matches('\n');
        if l.is_empty() {
            continue;
        }
        let payload = l
            .strip_prefix("data: ")
            .ok_or_else(|| format!("frame without data: {l}"))?;
        let ev: Value = serde_json::from_str(payload).map_err(|e| format!("event json: {e}"))?;
        match ev["type"].as_str() {
            Some("stdout") => stdout.push_str(ev["text"].as_str().unwrap_or("")),
            Some("execution_complete") => complete = true,
            Some("error") => return Err(format!("error event: {ev}")),
            Some(_) => {}
            None => return Err(format!("error envelope: {ev}")),
        }
    }
    Ok((stdout, complete))
}

/// execd `POST /command` of `echo hi`, read to EOF.
fn os_echo(http: &ureq::Agent, sb: &OsSandbox) -> Res<()> {
    let resp = sb
        .req(http, "POST", "/command")
        .set("Content-Type", "application/json")
        .send_string(r#"{"command":"echo hi"}"#)
        .map_err(|e| format!("POST /command: {}", describe(e)))?;
    let (stdout, complete) = read_sse(resp)?;
    // execd's stdout events are lines without their newline.
    if stdout.trim_end() != "hi" || !complete {
        return Err(format!(
            "unexpected: stdout {stdout:?}, complete {complete}"
        ));
    }
    Ok(())
}

fn os_context(http: &ureq::Agent, sb: &OsSandbox) -> Res<String> {
    let v: Value = sb
        .req(http, "POST", "/code/context")
        .set("Content-Type", "application/json")
        .send_string(r#"{"language":"python"}"#)
        .map_err(|e| format!("POST /code/context: {}", describe(e)))?
        .into_json()
        .map_err(|e| e.to_string())?;
    v["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("no id in {v}"))
}

/// execd `POST /code` of `print(1)` on the context `ctx`, read to EOF.
fn os_print(http: &ureq::Agent, sb: &OsSandbox, ctx: &str) -> Res<()> {
    let body = json!({"code": "print(1)", "context": {"id": ctx, "language": "python"}});
    let resp = sb
        .req(http, "POST", "/code")
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .map_err(|e| format!("POST /code: {}", describe(e)))?;
    let (stdout, complete) = read_sse(resp)?;
    if stdout.trim_end() != "1" || !complete {
        return Err(format!(
            "unexpected: stdout {stdout:?}, complete {complete}"
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Figures {
    create_e2b: Option<Stats>,
    create_os: Option<Stats>,
    echo_e2b: Option<Stats>,
    echo_os: Option<Stats>,
    code_e2b: Option<Stats>,
    code_os: Option<Stats>,
    python: Option<Stats>,
}

/// Like [`series`] for two operations, run alternately (a, b, a, b…) so that a change of the
/// machine's load during the run weighs on both sides alike.
fn series_pair(
    what: &str,
    warm: usize,
    n: usize,
    mut a: impl FnMut() -> Res<f64>,
    mut b: impl FnMut() -> Res<f64>,
) -> (Option<Stats>, Option<Stats>) {
    for _ in 0..warm {
        if let Err(e) = a().and_then(|_| b()) {
            println!("  {what}: warm-up failed: {e}");
            return (None, None);
        }
    }
    let (mut va, mut vb) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        match a().and_then(|x| Ok((x, b()?))) {
            Ok((x, y)) => {
                va.push(x);
                vb.push(y);
            }
            Err(e) => {
                println!("  {what}: iteration {i} failed: {e}");
                return (None, None);
            }
        }
    }
    (Some(stats(va)), Some(stats(vb)))
}

fn bench(server: &Server, n: usize, f: &mut Figures) {
    let base = server.base.as_str();
    let http = agent();
    let n_create = (n / 2).max(10);

    println!("\n[1] create -> first `echo hi` finished (sandbox deleted after each, not timed)");
    // The first creates of each kind are a warm-up (template caches, first cgroup…).
    (f.create_e2b, f.create_os) = series_pair(
        "create",
        2,
        n_create,
        || {
            let t = Instant::now();
            let sb = e2b_create(&http, base)?;
            e2b_echo(&http, base, &sb)?;
            let ms = ms_since(t);
            e2b_kill(&http, base, &sb.id)?;
            Ok(ms)
        },
        || {
            let t = Instant::now();
            let sb = os_create(&http, base)?;
            os_echo(&http, &sb)?;
            let ms = ms_since(t);
            os_delete(&http, base, &sb.id)?;
            Ok(ms)
        },
    );
    line(
        "E2B: POST /v2/sandboxes + process.Process/Start",
        f.create_e2b,
    );
    line(
        "OpenSandbox: POST /v1/sandboxes + endpoint + POST /command",
        f.create_os,
    );

    let e2b = match e2b_create(&http, base) {
        Ok(sb) => sb,
        Err(e) => return println!("  E2B sandbox: {e}"),
    };
    let os = match os_create(&http, base) {
        Ok(sb) => sb,
        Err(e) => {
            let _ = e2b_kill(&http, base, &e2b.id);
            return println!("  OpenSandbox sandbox: {e}");
        }
    };

    println!("\n[2] `echo hi` round trip on an existing sandbox");
    (f.echo_e2b, f.echo_os) = series_pair(
        "echo",
        20,
        n,
        || {
            let t = Instant::now();
            e2b_echo(&http, base, &e2b)?;
            Ok(ms_since(t))
        },
        || {
            let t = Instant::now();
            os_echo(&http, &os)?;
            Ok(ms_since(t))
        },
    );
    line("E2B: process.Process/Start to its end", f.echo_e2b);
    line("OpenSandbox: execd POST /command to EOF", f.echo_os);

    println!("\n[3] print(1) round trip on a warm Python context");
    match os_context(&http, &os) {
        Ok(ctx) => {
            (f.code_e2b, f.code_os) = series_pair(
                "print(1)",
                5,
                n,
                || {
                    let t = Instant::now();
                    e2b_print(&http, base, &e2b)?;
                    Ok(ms_since(t))
                },
                || {
                    let t = Instant::now();
                    os_print(&http, &os, &ctx)?;
                    Ok(ms_since(t))
                },
            );
            line(
                "E2B: POST /execute (port 49999, default context)",
                f.code_e2b,
            );
            line("OpenSandbox: execd POST /code", f.code_os);
        }
        Err(e) => println!("  OpenSandbox context: {e}"),
    }
    let _ = e2b_kill(&http, base, &e2b.id);
    let _ = os_delete(&http, base, &os.id);
}

fn bench_python(n: usize) -> Option<Stats> {
    series("python3 -c", 3, n, || {
        let t = Instant::now();
        let out = Command::new("python3")
            .args(["-c", "print(1)"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map_err(|e| format!("python3: {e}"))?;
        let ms = ms_since(t);
        if out.stdout != b"1\n" {
            return Err(format!("python3 printed {:?}", out.stdout));
        }
        Ok(ms)
    })
}

fn pair(name: &str, e2b: Option<Stats>, os: Option<Stats>) {
    let (Some(e), Some(o)) = (e2b, os) else {
        println!("  {name:<30} (a side failed, see above)");
        return;
    };
    let r50 = e.p50 / o.p50;
    let r99 = e.p99 / o.p99;
    println!(
        "  {name:<30} p50 {:>8.3} | {:>8.3} ms  p99 {:>8.3} | {:>8.3} ms  ratio p50 {r50:.2} p99 {r99:.2}  {}",
        e.p50,
        o.p50,
        e.p99,
        o.p99,
        if r50 <= 1.2 && r99 <= 1.2 {
            "ok (<= 1.20)"
        } else {
            "OVER 1.20"
        }
    );
}

fn main() {
    let n = env_usize("EXECBOX_BENCH_E2B_N", 40);
    println!(
        "execbox E2B vs OpenSandbox benchmark: {}, release server on loopback, plain HTTP",
        machine()
    );
    println!("target: E2B within 20% of the OpenSandbox figures (ratio <= 1.20)");
    let mut f = Figures::default();
    match Server::start("e2b") {
        Ok(server) => {
            bench(&server, n, &mut f);
            server.stop();
            println!("  (sandboxes deleted, server stopped, state directory removed)");
        }
        Err(e) => println!("cannot start the server: {e}"),
    }
    println!("\n[baseline] python3 -c 'print(1)' spawned on the host");
    f.python = bench_python(n);
    line("host: python3 -c 'print(1)'", f.python);

    println!("\nside by side (E2B | OpenSandbox), ratio = E2B / OpenSandbox:");
    pair("create -> first echo hi", f.create_e2b, f.create_os);
    pair("echo hi round trip", f.echo_e2b, f.echo_os);
    pair("print(1) round trip", f.code_e2b, f.code_os);
    if let Some(p) = f.python {
        println!(
            "  {:<30} p50 {:>8.3} ms  p99 {:>8.3} ms  (a fresh interpreter, no warm context)",
            "python3 -c 'print(1)' (host)", p.p50, p.p99
        );
    }
}
