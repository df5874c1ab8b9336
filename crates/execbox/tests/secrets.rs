//! Secrets at rest and in logs, against the real server: marker secrets handed to every surface
//! (a lifecycle sandbox's `env`, isol8 `secrets`, session-execute `env`, a pool template's
//! `env` and registry password, a pools file an earlier version wrote in clear) never appear in
//! clear in any file of the state directory nor in the server's log at debug level; a restart
//! with the key re-attaches the sandbox with its environment, and a start without the key or
//! with another one is refused, naming the key.

mod common;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::procs::run_with_deadline;
use common::{free_port, into_pair, unique, TestServer};
use nix::unistd::{lseek, Whence};
use serde_json::{json, Value};

/// Every regular file under `dir`, recursively (sockets and other special files skipped: they
/// hold no data at rest).
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => files_under(&path, out),
            Ok(m) if m.is_file() => out.push(path),
            _ => {}
        }
    }
}

/// The needles found in `path`, reading every byte the file holds: its data extents (through
/// `SEEK_DATA`/`SEEK_HOLE`, so a sparse disk image of gigabytes costs only what is written in
/// it; holes read as zeros and can hold nothing), binary files included.
fn found_in(path: &Path, needles: &[&str]) -> Vec<String> {
    let Ok(mut f) = File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len() as i64).unwrap_or(0);
    let longest = needles.iter().map(|n| n.len()).max().unwrap_or(1);
    let mut found: Vec<String> = Vec::new();
    let mut pos = 0i64;
    while pos < len {
        // ENXIO: no data after `pos`.
        let Ok(start) = lseek(&f, pos, Whence::SeekData) else {
            break;
        };
        let end = lseek(&f, start, Whence::SeekHole).unwrap_or(len);
        if f.seek(SeekFrom::Start(start as u64)).is_err() {
            break;
        }
        let mut remaining = (end - start) as usize;
        let mut carry: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        while remaining > 0 {
            let want = remaining.min(buf.len());
            let n = match f.read(&mut buf[..want]) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            remaining -= n;
            carry.extend_from_slice(&buf[..n]);
            for needle in needles {
                if !found.iter().any(|f| f == needle)
                    && carry.windows(needle.len()).any(|w| w == needle.as_bytes())
                {
                    found.push(needle.to_string());
                }
            }
            let keep = carry.len().min(longest - 1);
            carry.drain(..carry.len() - keep);
        }
        pos = end;
    }
    found
}

/// Files of the state directory (and the log) holding any of `needles`.
#[track_caller]
fn assert_nowhere(state_dir: &Path, log: &Path, needles: &[&str], when: &str) {
    let mut files = Vec::new();
    files_under(state_dir, &mut files);
    assert!(
        files.iter().any(|f| f.ends_with("record.json")),
        "{when}: no record in {}",
        state_dir.display()
    );
    files.push(log.to_path_buf());
    let bytes: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    eprintln!(
        "{when}: scanning {} files ({bytes} bytes apparent size): {:?}",
        files.len(),
        files
            .iter()
            .filter_map(|f| f.strip_prefix(state_dir).ok())
            .collect::<Vec<_>>()
    );
    let mut leaks = Vec::new();
    for f in &files {
        for n in found_in(f, needles) {
            leaks.push(format!("{} holds {n}", f.display()));
        }
    }
    assert!(leaks.is_empty(), "{when}: secrets in clear: {leaks:#?}");
    // The check is real: the same scan finds a marker written in clear.
    let probe = state_dir.join("probe.tmp");
    std::fs::write(&probe, format!("xx{}yy", needles[0])).unwrap();
    assert_eq!(found_in(&probe, needles), vec![needles[0].to_string()]);
    std::fs::remove_file(&probe).unwrap();
}

fn marker(n: u32) -> String {
    format!("ebx-secret-marker-{n}-{}", unique("m"))
}

fn reversed(s: &str) -> String {
    s.chars().rev().collect()
}

fn post(server: &TestServer, path: &str, body: Value) -> (u16, Value) {
    into_pair(
        ureq::post(&server.url(path))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string()),
    )
}

/// `execbox serve` on `state_dir` that must refuse to start: its stderr.
fn refused_start(state_dir: &Path, config: &Path, env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_execbox"));
    cmd.arg("serve")
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .env_remove("EXECBOX_API_KEY")
        .env_remove("EXECBOX_SECRETS_KEY")
        .envs(env.iter().copied())
        .stdin(Stdio::null());
    let out = run_with_deadline(cmd, "execbox serve", Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && out.status.code().is_some(),
        "the server started without its key: {out:?}"
    );
    stderr
}

#[test]
fn secrets_are_sealed_at_rest_and_never_logged_and_the_key_is_required() {
    let m_env = marker(1);
    let m_isol8 = marker(2);
    let m_session = marker(3);
    let m_pool_env = marker(4);
    let m_pool_auth = marker(5);
    let m_old_env = marker(6);
    let state_dir = std::env::temp_dir().join(unique("execbox-secrets-state"));
    let log = std::env::temp_dir().join(unique("execbox-secrets-log"));
    let config = std::env::temp_dir().join(unique("execbox-secrets-config"));
    let metrics_port = free_port();
    std::fs::write(
        &config,
        format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"),
    )
    .unwrap();
    // A pools file as an earlier version wrote it: its template in clear.
    std::fs::create_dir_all(&state_dir).unwrap();
    std::fs::write(
        state_dir.join("pools.json"),
        json!([{
            "tenant": "default", "name": "old-pool",
            "template": {"image": {"uri": "default"}, "env": {"OLD": m_old_env}},
            "capacity": {"bufferMax": 0, "bufferMin": 0, "poolMax": 0, "poolMin": 0},
            "created_at": "2026-01-01T00:00:00Z", "revision": 1
        }])
        .to_string(),
    )
    .unwrap();
    let debug = [("RUST_LOG", "debug")];
    let port = free_port();
    let server = TestServer::start_logged_on(state_dir.clone(), port, &config, &debug, &log);

    // Lifecycle: the environment reaches the sandbox.
    let sandbox = server.create(json!({"env": {"SEC1": m_env}}));
    let id = sandbox.id.clone();
    let token = sandbox.token.clone();
    let endpoint = sandbox.endpoint.clone();
    let run = sandbox.run("python3 -c 'import os; print(os.environ[\"SEC1\"][::-1])'");
    assert_eq!(run.out().trim(), reversed(&m_env), "{run:?}");
    // isol8: a persistent session's run with a secret.
    let (s, v) = post(
        &server,
        "/execute",
        json!({"sessionId": "sec-1", "request": {"runtime": "python",
               "code": "import os\nprint(os.environ['SEC2'][::-1])"},
               "options": {"secrets": {"SEC2": m_isol8}}}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["stdout"], reversed(&m_isol8), "{v}");
    // session-execute: a session's run with an environment.
    let (s, v) = post(
        &server,
        "/api/execute",
        json!({"sessionId": "sec-2",
               "command": "python3 -c 'import os; print(os.environ[\"SEC3\"][::-1])'",
               "env": {"SEC3": m_session}}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["stdout"].as_str().unwrap_or("").trim(),
        reversed(&m_session),
        "{v}"
    );
    // A pool whose template holds an environment and a registry password (no sandbox started).
    let (s, v) = post(
        &server,
        "/v1/pools",
        json!({"name": "sec-pool",
               "template": {"image": {"uri": "default",
                                      "auth": {"username": "u", "password": m_pool_auth}},
                            "env": {"SEC4": m_pool_env}},
               "capacitySpec": {"bufferMax": 0, "bufferMin": 0, "poolMax": 0, "poolMin": 0}}),
    );
    assert!(s == 200 || s == 201, "{s} {v}");
    let (s, v) = server.get("/v1/pools/old-pool");
    assert_eq!(s, 200, "the pool written in clear is kept: {v}");

    // Diagnostics show the environment's names, not its values.
    let inspect = ureq::get(&server.url(&format!("/v1/sandboxes/{id}/diagnostics/inspect")))
        .call()
        .expect("inspect")
        .into_string()
        .unwrap();
    assert!(inspect.contains("\"SEC1\":\"***\""), "{inspect}");
    assert!(
        !inspect.contains(&m_env) && !inspect.contains(&token),
        "{inspect}"
    );
    // Metrics name no secret.
    let metrics = ureq::get(&format!("http://127.0.0.1:{metrics_port}/metrics"))
        .call()
        .expect("metrics")
        .into_string()
        .unwrap();
    assert!(metrics.contains("execbox_"), "{metrics}");
    let all = [
        m_env.as_str(),
        m_isol8.as_str(),
        m_session.as_str(),
        m_pool_env.as_str(),
        m_pool_auth.as_str(),
        m_old_env.as_str(),
        token.as_str(),
    ];
    for m in all {
        assert!(!metrics.contains(m), "metrics hold {m}");
    }
    // The record keeps its clear fields readable, its secrets in one sealed field.
    let record: Value = serde_json::from_slice(
        &std::fs::read(state_dir.join("sandboxes").join(&id).join("record.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(record["id"], json!(id));
    assert!(record["sealed"].is_string(), "{record}");
    assert!(
        record.get("token").is_none() && record.get("env").is_none(),
        "{record}"
    );
    assert_nowhere(&state_dir, &log, &all, "running");
    // The log looked at is the debug one.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("DEBUG"), "not a debug log: {text}");

    drop(sandbox);
    // A restart with the key (the one generated in the state directory) re-attaches.
    let status = server.stop_keeping_state();
    assert!(status.success(), "{status}");
    assert_nowhere(&state_dir, &log, &all, "stopped");
    let server = TestServer::start_logged_on(state_dir.clone(), port, &config, &debug, &log);
    let (s, v) = server.get(&format!("/v1/sandboxes/{id}"));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"]["state"], "Running", "{v}");
    let sandbox = common::Sandbox {
        server: &server,
        id: id.clone(),
        endpoint,
        token: token.clone(),
    };
    let run = sandbox.run("python3 -c 'import os; print(os.environ[\"SEC1\"][::-1])'");
    assert_eq!(
        run.out().trim(),
        reversed(&m_env),
        "after a restart: {run:?}"
    );
    let (s, v) = server.get("/v1/pools/sec-pool");
    assert_eq!(s, 200, "{v}");
    let status = server.stop_keeping_state();
    assert!(status.success(), "{status}");
    assert_nowhere(&state_dir, &log, &all, "restarted");

    // `config show` and `doctor` name the key's source and fingerprint, never the key.
    let key_file = state_dir.join("secrets.key");
    let key_text = std::fs::read_to_string(&key_file).unwrap();
    let check: Value =
        serde_json::from_slice(&std::fs::read(state_dir.join("secrets.check")).unwrap()).unwrap();
    let fingerprint = check["fingerprint"]
        .as_str()
        .expect("fingerprint")
        .to_string();
    for args in [&["config", "show"][..], &["doctor"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_execbox"))
            .args(args)
            .arg("--state-dir")
            .arg(&state_dir)
            .env_remove("EXECBOX_SECRETS_KEY")
            .output()
            .expect("execbox");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("secrets at rest"))
            .unwrap_or_else(|| panic!("{args:?}: no secrets line in {text}"));
        assert!(
            line.contains(&fingerprint) && line.contains(&key_file.display().to_string()),
            "{args:?}: {line}"
        );
        assert!(!text.contains(key_text.trim()), "{args:?} shows the key");
    }

    // Without the key: refused, naming where the key is looked for.
    let kept = std::env::temp_dir().join(unique("execbox-secrets-key"));
    std::fs::rename(&key_file, &kept).unwrap();
    let err = refused_start(&state_dir, &config, &[]);
    assert!(
        err.contains("EXECBOX_SECRETS_KEY") && err.contains(&key_file.display().to_string()),
        "{err}"
    );
    assert!(
        !key_file.exists(),
        "a new key was generated over sealed secrets"
    );
    // Another key: refused, naming its source.
    let other = "ab".repeat(32);
    let err = refused_start(&state_dir, &config, &[("EXECBOX_SECRETS_KEY", &other)]);
    assert!(
        err.contains("EXECBOX_SECRETS_KEY") && err.contains("does not open"),
        "{err}"
    );
    // Not a key at all.
    let err = refused_start(&state_dir, &config, &[("EXECBOX_SECRETS_KEY", "hunter2")]);
    assert!(err.contains("EXECBOX_SECRETS_KEY"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");

    // The right key from the environment (the generated file's text) opens everything.
    let hex = std::fs::read_to_string(&kept).unwrap();
    let server = TestServer::start_logged_on(
        state_dir.clone(),
        port,
        &config,
        &[("RUST_LOG", "debug"), ("EXECBOX_SECRETS_KEY", hex.trim())],
        &log,
    );
    let run = sandbox_run(&server, &id, &token);
    assert_eq!(run.trim(), reversed(&m_env));
    assert_nowhere(&state_dir, &log, &all, "with the key from the environment");
    let _ = std::fs::remove_file(&kept);
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_file(&log);
    // Dropping the server deletes the sandbox and the state directory.
    drop(server);
}

/// Stdout of a command that prints `SEC1` reversed in sandbox `id` of `server`.
fn sandbox_run(server: &TestServer, id: &str, token: &str) -> String {
    let (s, ep) = server.get(&format!("/v1/sandboxes/{id}/endpoints/44772"));
    assert_eq!(s, 200, "{ep}");
    let sandbox = common::Sandbox {
        server,
        id: id.to_string(),
        endpoint: format!("http://{}", ep["endpoint"].as_str().expect("endpoint")),
        token: token.to_string(),
    };
    sandbox
        .run("python3 -c 'import os; print(os.environ[\"SEC1\"][::-1])'")
        .out()
}
