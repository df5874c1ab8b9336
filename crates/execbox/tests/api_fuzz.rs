//! Property-based API fuzzing with schemathesis (PyPI) against a real `execbox serve`, driven by
//! the server's own OpenAPI documents: no answer may be a 5xx, and every answer must match the
//! document (`not_a_server_error`, `response_schema_conformance`). Fixed seed, a bound on
//! examples per operation and on time per run, so the whole test stays within a few minutes.
//!
//! Three runs: the server's surfaces (`/openapi.json`: lifecycle, egress, isol8,
//! session-execute), then the agent's execd and Leap0 APIs of one real sandbox, through the
//! proxy with the sandbox's token (`/openapi/execd.json`, `/openapi/leap0.json`).
//!
//! schemathesis is installed by `scripts/test-deps.sh` (a pinned version in its own virtualenv
//! at `/opt/execbox-test/schemathesis`, or wherever `EXECBOX_SCHEMATHESIS` points); the test
//! fails, never skips, without it.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use common::TestServer;

/// Where `scripts/test-deps.sh` installs schemathesis.
const DEFAULT_SCHEMATHESIS: &str = "/opt/execbox-test/schemathesis/bin/schemathesis";
/// No 5xx, and every answer as documented.
const BOTH: &str = "not_a_server_error,response_schema_conformance";
/// Every run uses this seed: a failure replays.
const SEED: &str = "20261207";

fn schemathesis() -> PathBuf {
    let path = std::env::var_os("EXECBOX_SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SCHEMATHESIS));
    assert!(
        path.exists(),
        "schemathesis is not installed at {} (run scripts/test-deps.sh, or set \
         EXECBOX_SCHEMATHESIS)",
        path.display()
    );
    path
}

/// One bounded schemathesis run; panics with its report when it finds anything.
fn fuzz(
    name: &str,
    schema_url: &str,
    checks: &str,
    extra: &[&str],
    max_examples: u32,
    max_secs: u32,
) {
    let started = Instant::now();
    let report_dir = std::env::temp_dir().join(common::unique("execbox-fuzz-report"));
    // schemathesis keeps a cache (`.schemathesis/`) in its working directory: not the
    // repository's.
    std::fs::create_dir_all(&report_dir).expect("create the report directory");
    let mut cmd = Command::new(schemathesis());
    cmd.arg("run")
        .arg(schema_url)
        .args([
            "--checks",
            checks,
            "--seed",
            SEED,
            "--max-examples",
            &max_examples.to_string(),
            "--max-time",
            &max_secs.to_string(),
            // Two cores on CI: one worker keeps the run's share of the machine predictable.
            "--workers",
            "1",
            "--request-timeout",
            "60",
            "--no-color",
            "--report-dir",
        ])
        .arg(&report_dir)
        .args(extra)
        // Its cache of examples would make runs differ; keep it out of the repository.
        .env(
            "HYPOTHESIS_STORAGE_DIRECTORY",
            report_dir.join("hypothesis"),
        )
        .current_dir(&report_dir)
        .stdin(Stdio::null());
    let out = cmd.output().expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&report_dir);
    // The summary, for the CI log.
    let summary = stdout
        .find("SUMMARY")
        .map(|i| &stdout[stdout[..i].rfind('\n').unwrap_or(0)..])
        .unwrap_or(&stdout);
    eprintln!(
        "schemathesis {name} ({:.0?}):\n{summary}",
        started.elapsed()
    );
    assert!(
        out.status.success(),
        "schemathesis found problems in {name} (exit {:?}):\n{stdout}\n{stderr}",
        out.status.code()
    );
}

#[test]
fn the_api_survives_schemathesis() {
    let server = TestServer::start();
    // The server's own surfaces. The agent's paths are fuzzed below against a real sandbox
    // (here every sandbox id would be unknown); `/v1/snapshots` answers 501 by design (the
    // OpenSandbox "not supported" answer, documented), which the server-error check counts.
    fuzz(
        "server",
        &server.url("/openapi.json"),
        BOTH,
        &["--exclude-path-regex", "(/proxy/44772/|snapshots)"],
        30,
        90,
    );

    let sandbox = server.create(serde_json::json!({}));
    let base = server.url(&format!("/v1/sandboxes/{}/proxy/44772", sandbox.id));
    let token = format!("X-EXECD-ACCESS-TOKEN:{}", sandbox.token);
    // Streams that never end by themselves (WebSocket, the metrics watch) are not for a fuzzer.
    fuzz(
        "execd",
        &server.url("/openapi/execd.json"),
        // execd answers 500 `RUNTIME_ERROR` to some client mistakes because upstream's execd
        // does (`shared/compat/opensandbox-execd.md` §2: an unknown id on interrupt, an unknown
        // bash session on run…; `tests/fuzz_requests.rs` pins that list), so here every answer
        // is checked against the document, whose 500s say so, not against the 5xx rule.
        "response_schema_conformance",
        &[
            "--url",
            &base,
            "-H",
            &token,
            "--exclude-path-regex",
            "^/(pty/\\{id\\}/ws|metrics/watch)$",
        ],
        10,
        60,
    );
    // Found by this test: code with a NUL byte on `/execute/async` was a 500 (the process
    // could not start); it is the client's 400 now.
    let r = ureq::post(&format!("{base}/execute/async"))
        .set("X-EXECD-ACCESS-TOKEN", &sandbox.token)
        .send_string(r#"{"code":"print(1)\u0000"}"#);
    let (status, body) = common::into_pair(r);
    assert_eq!(status, 400, "{body}");
    fuzz(
        "leap0",
        &server.url("/openapi/leap0.json"),
        BOTH,
        &["--url", &base, "-H", &token],
        10,
        30,
    );
}
