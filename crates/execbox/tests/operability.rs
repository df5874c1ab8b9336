//! Running execbox as an operator does: the configuration file's `listen` and `state_dir`
//! are used when no flag overrides them, and the log says what happened (an access line per
//! request with its id, a line per sandbox created and deleted, client mistakes below ERROR),
//! in plain text when written to a file, or as JSON lines.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, unique, TEST_TEMPLATES_DIR};
use serde_json::{json, Value};

/// A server started with only `--config` (and `extra` arguments), its log in a file.
struct Logged {
    child: Child,
    base: String,
    log: PathBuf,
    state_dir: PathBuf,
}

impl Logged {
    fn start(extra: &[&str]) -> Logged {
        Self::start_with(extra, "")
    }

    fn start_with(extra: &[&str], more_config: &str) -> Logged {
        let port = free_port();
        let state_dir = std::env::temp_dir().join(unique("execbox-ops-state"));
        let config = std::env::temp_dir().join(unique("execbox-ops-config"));
        let log = std::env::temp_dir().join(unique("execbox-ops-log"));
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\nstate_dir = \"{}\"\n[templates]\nprebuild = []\n{more_config}",
                state_dir.display()
            ),
        )
        .expect("config");
        let child = Command::new(env!("CARGO_BIN_EXE_execbox"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .args(extra)
            .env("RUST_LOG", "info")
            .env("EXECBOX_TEMPLATES_DIR", TEST_TEMPLATES_DIR)
            .env("EXECBOX_ALLOWED_REGISTRIES", "127.0.0.1")
            .env_remove("EXECBOX_API_KEY")
            .env_remove("EXECBOX_LISTEN")
            .env_remove("EXECBOX_STATE_DIR")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start execbox serve");
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while ureq::get(&format!("{base}/health")).call().is_err() {
            assert!(
                Instant::now() < deadline,
                "the server did not listen where its configuration file says: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Logged {
            child,
            base,
            log,
            state_dir,
        }
    }

    /// Stops the server (SIGTERM: its warm pool's sandboxes go with it) and returns its whole
    /// log.
    fn stop(mut self) -> String {
        let _ = common::terminate(&mut self.child);
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A test that fails before `stop` leaves no server behind (its port and sandboxes would
/// outlive the test run).
impl Drop for Logged {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = common::terminate(&mut self.child);
        }
    }
}

fn post(base: &str, path: &str, body: &Value) -> u16 {
    match ureq::post(&format!("{base}{path}"))
        .set("Content-Type", "application/json")
        .set("X-Request-Id", "ops-test-request")
        .send_string(&body.to_string())
    {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(s, _)) => s,
        Err(e) => panic!("{e}"),
    }
}

fn create_and_delete(base: &str) -> String {
    let resp = ureq::post(&format!("{base}/v1/sandboxes"))
        .set("Content-Type", "application/json")
        .send_string(
            &json!({"image": {"uri": "default"}, "entrypoint": ["tail", "-f", "/dev/null"],
                    "resourceLimits": {"cpu": "1", "memory": "256Mi"}})
            .to_string(),
        )
        .expect("create");
    let v: Value = resp.into_json().expect("json");
    let id = v["id"].as_str().expect("id").to_string();
    ureq::delete(&format!("{base}/v1/sandboxes/{id}"))
        .call()
        .expect("delete");
    id
}

#[test]
fn the_configuration_file_places_the_server_and_the_log_says_what_happened() {
    let server = Logged::start(&[]);
    assert!(
        server.state_dir.join("sandboxes").is_dir(),
        "state_dir from the file"
    );
    let id = create_and_delete(&server.base);
    let bad = json!({"image": {"uri": "default"}, "entrypoint": ["x"], "resourceLimits": {"memory": "lots"}});
    assert_eq!(post(&server.base, "/v1/sandboxes", &bad), 400);
    let log = server.stop();

    assert!(
        !log.contains('\u{1b}'),
        "no colour codes in a log file:\n{log}"
    );
    let has = |parts: &[&str]| log.lines().any(|l| parts.iter().all(|p| l.contains(p)));
    assert!(
        has(&[
            "execbox::access",
            "method=POST",
            "path=/v1/sandboxes",
            "status=202",
            "tenant=default"
        ]),
        "an access line per request:\n{log}"
    );
    assert!(
        has(&[
            "execbox::access",
            "status=400",
            "request_id=ops-test-request"
        ]),
        "the client's request id is logged:\n{log}"
    );
    assert!(has(&["sandbox created", &id]), "{log}");
    assert!(has(&["sandbox deleted", &id, "reason="]), "{log}");
    assert!(
        has(&["INFO", "lifecycle request refused", "resourceLimits.memory"]),
        "{log}"
    );
    assert!(
        !log.lines().any(|l| l.contains("ERROR")),
        "a client's mistake is not an ERROR:\n{log}"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let server = Logged::start(&["--log-format", "json"]);
    let id = create_and_delete(&server.base);
    let log = server.stop();
    let events: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        events.iter().any(|e| e["message"] == "request"
            && e["path"] == "/v1/sandboxes"
            && e["status"] == 202
            && e["target"] == "execbox::access"),
        "{log}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["message"] == "sandbox deleted" && e["sandbox"] == id.as_str()),
        "{log}"
    );
}

/// Ids of the sandboxes the log says were created for `owner`.
fn created_for(log: &str, owner: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("sandbox created") && l.contains(&format!("owner={owner}")))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("sandbox="))
                .map(str::to_string)
        })
        .collect()
}

fn stops_on(signal: nix::sys::signal::Signal) {
    let mut server = Logged::start(&[]);
    let base = server.base.clone();
    let resp: Value = ureq::post(&format!("{base}/v1/sandboxes"))
        .set("Content-Type", "application/json")
        .send_string(
            &json!({"image": {"uri": "default"}, "entrypoint": ["tail", "-f", "/dev/null"],
                    "resourceLimits": {"cpu": "1", "memory": "256Mi"}})
            .to_string(),
        )
        .expect("create")
        .into_json()
        .expect("json");
    let id = resp["id"].as_str().expect("id").to_string();
    let ep: Value = ureq::get(&format!("{base}/v1/sandboxes/{id}/endpoints/44772"))
        .call()
        .expect("endpoint")
        .into_json()
        .expect("json");
    let token = ep["headers"]["X-EXECD-ACCESS-TOKEN"]
        .as_str()
        .expect("token")
        .to_string();
    // A request in flight when the signal comes.
    let url = format!("{base}/v1/sandboxes/{id}/proxy/44772/command");
    let in_flight = std::thread::spawn(move || {
        ureq::post(&url)
            .set("X-EXECD-ACCESS-TOKEN", &token)
            .set("Content-Type", "application/json")
            .send_string(&json!({"command": "sleep 2; echo finished"}).to_string())
            .map(|r| r.into_string().unwrap_or_default())
            .map_err(|e| e.to_string())
    });
    std::thread::sleep(Duration::from_millis(700));
    let pid = nix::unistd::Pid::from_raw(server.child.id() as i32);
    nix::sys::signal::kill(pid, signal).expect("signal");
    std::thread::sleep(Duration::from_millis(300));
    // No new connections once draining.
    assert!(
        ureq::get(&format!("{base}/health"))
            .timeout(Duration::from_secs(2))
            .call()
            .is_err(),
        "still accepting after {signal}"
    );
    let body = in_flight
        .join()
        .expect("thread")
        .expect("the request in flight completes");
    assert!(body.contains("finished"), "{body}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = server.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not stop after {signal}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    assert!(log.contains("draining") && log.contains("stopped"), "{log}");
    // What the server owned is gone; the lifecycle sandbox lives on (re-attached next start).
    let pooled = created_for(&log, "pool");
    assert!(!pooled.is_empty(), "{log}");
    for pool_id in &pooled {
        assert!(
            !common::cgroup_dir("pids", pool_id).exists(),
            "{pool_id} left running"
        );
    }
    assert!(common::cgroup_dir("pids", &id).exists());
    let state_dir = server.state_dir.clone();
    let again = common::TestServer::start_on(state_dir, free_port(), None);
    assert_eq!(again.delete(&format!("/v1/sandboxes/{id}")), 204);
}

#[test]
fn sigterm_drains_requests_in_flight_then_removes_what_the_server_owns() {
    stops_on(nix::sys::signal::Signal::SIGTERM);
}

#[test]
fn sigint_stops_the_same_way() {
    // A harness started in the background has SIGINT ignored, and a server started with it
    // ignored keeps ignoring it: give the server the default, as a terminal's would be.
    assert!(execbox_jail::host::restore_default_signal(
        nix::libc::SIGINT
    ));
    stops_on(nix::sys::signal::Signal::SIGINT);
}

#[test]
fn metrics_are_served_on_their_own_listener() {
    let metrics_port = free_port();
    let server = Logged::start_with(
        &[],
        &format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"),
    );
    create_and_delete(&server.base);
    let bad = json!({"image": {"uri": "default"}, "entrypoint": ["x"], "resourceLimits": {"memory": "lots"}});
    assert_eq!(post(&server.base, "/v1/sandboxes", &bad), 400);
    // Not on the public listener.
    assert!(matches!(
        ureq::get(&format!("{}/metrics", server.base)).call(),
        Err(ureq::Error::Status(404, _))
    ));
    let text = ureq::get(&format!("http://127.0.0.1:{metrics_port}/metrics"))
        .call()
        .expect("metrics")
        .into_string()
        .expect("text");
    let value_of = |series: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    assert_eq!(
        value_of("execbox_sandboxes_created_total{owner=\"lifecycle\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value_of("execbox_sandboxes_deleted_total{reason=\"user_delete\"}"),
        Some(1.0),
        "{text}"
    );
    assert!(
        text.contains("execbox_http_request_duration_seconds_bucket{method=\"POST\",route=\"/v1/sandboxes\",status=\"400\""),
        "{text}"
    );
    assert!(
        text.contains("route=\"/v1/sandboxes/{id}\",status=\"204\""),
        "{text}"
    );
    assert!(value_of("execbox_open_connections").is_some(), "{text}");
    assert!(
        value_of("execbox_pool_ready{pool=\"warm\"}").is_some(),
        "{text}"
    );
    assert!(
        value_of("execbox_pool_ready{pool=\"lifecycle\"}").is_some(),
        "{text}"
    );
    // A one-shot run takes its sandbox from the warm pool (or starts one): counted either way.
    let run = json!({"request": {"code": "print(1)", "runtime": "python"}});
    assert_eq!(post(&server.base, "/execute", &run), 200);
    let text = ureq::get(&format!("http://127.0.0.1:{metrics_port}/metrics"))
        .call()
        .expect("metrics")
        .into_string()
        .expect("text");
    let acquired: f64 = text
        .lines()
        .filter(|l| l.starts_with("execbox_pool_acquisitions_total{pool=\"warm\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(acquired, 1.0, "{text}");
    server.stop();
}

#[test]
fn systemd_hears_ready_once_the_server_listens() {
    let dir = std::env::temp_dir().join(unique("execbox-notify"));
    std::fs::create_dir_all(&dir).unwrap();
    let socket_path = dir.join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let port = free_port();
    let state_dir = std::env::temp_dir().join(unique("execbox-notify-state"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_execbox"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--state-dir")
        .arg(&state_dir)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("EXECBOX_TEMPLATES_DIR", TEST_TEMPLATES_DIR)
        .env("EXECBOX_ALLOWED_REGISTRIES", "127.0.0.1")
        .env_remove("EXECBOX_API_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    let mut buf = [0u8; 256];
    let got = socket.recv(&mut buf);
    // Ready means listening: the health check answers at once.
    let health = ureq::get(&format!("http://127.0.0.1:{port}/health")).call();
    let _ = common::terminate(&mut child);
    let _ = std::fs::remove_dir_all(&dir);
    let n = got.expect("a notification");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim_end(), "READY=1");
    assert!(health.is_ok());
}

#[test]
fn shell_completions_are_printed() {
    let out = Command::new(env!("CARGO_BIN_EXE_execbox"))
        .args(["completions", "bash"])
        .output()
        .expect("completions");
    assert!(out.status.success());
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(
        script.contains("_execbox()") && script.contains("serve"),
        "{script}"
    );
}

#[test]
fn config_show_prints_the_effective_configuration_with_secrets_masked() {
    let dir = std::env::temp_dir().join(unique("execbox-config-show"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("execbox.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:7000\"\nstate_dir = \"/srv/from-file\"\napi_keys = [\"file-secret\"]\n[tenants]\nacme = [\"acme-secret\"]\n[image_store.credentials.\"registry.example:5000\"]\nusername = \"bot\"\npassword = \"registry-secret\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_execbox"))
        .args(["config", "show", "--config"])
        .arg(&file)
        .env("EXECBOX_LISTEN", "127.0.0.1:7100")
        .env_remove("EXECBOX_STATE_DIR")
        .env_remove("EXECBOX_API_KEY")
        .env_remove("EXECBOX_TEMPLATES_DIR")
        .env_remove("EXECBOX_ALLOWED_REGISTRIES")
        .output()
        .expect("config show");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let shown: toml::Value = toml::from_str(&text).expect("TOML");
    // The environment over the file, the file over the defaults.
    assert_eq!(shown["listen"].as_str(), Some("127.0.0.1:7100"), "{text}");
    assert_eq!(
        shown["state_dir"].as_str(),
        Some("/srv/from-file"),
        "{text}"
    );
    assert!(shown["policy"].is_table(), "every section shows: {text}");
    for secret in ["file-secret", "acme-secret", "registry-secret"] {
        assert!(!text.contains(secret), "{secret} shown: {text}");
    }
    assert!(text.contains("bot") && text.contains("***"), "{text}");
}

/// Every key the server knows is in `docs/configuration.md`, under its table's heading: the
/// keys are read from `execbox config show` of a file that sets the optional ones too.
#[test]
fn every_configuration_key_is_documented() {
    let dir = std::env::temp_dir().join(unique("execbox-config-doc"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("execbox.toml");
    std::fs::write(
        &file,
        "public_address = \"example.com\"\npython = \"/usr/bin/python3\"\n\
         [templates]\ndir = \"/tmp/t\"\n[policy]\nmax_lifetime_secs = 600\n\
         [policy.tenants.acme]\nmax_pids = 100\n[metrics]\nlisten = \"127.0.0.1:9464\"\n\
         [endpoints]\nsigning_key = \"0123456789abcdef0123\"\n\
         [e2b]\ndomain = \"sandbox.example.com\"\n\
         [secrets]\nkey_file = \"/etc/execbox/secrets.key\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_execbox"))
        .args(["config", "show", "--config"])
        .arg(&file)
        .output()
        .expect("config show");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{out:?}");
    let shown: toml::Value = toml::from_str(&String::from_utf8_lossy(&out.stdout)).expect("TOML");
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/configuration.md"
    ))
    .expect("docs/configuration.md");
    // The documented keys of each table: the rows under its heading.
    let section = |title: &str| -> String {
        let start = doc
            .find(&format!("\n## {title}\n"))
            .unwrap_or_else(|| panic!("no section {title} in docs/configuration.md"));
        let rest = &doc[start + 1..];
        let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
        rest[..end].to_string()
    };
    // Tables whose keys are the operator's own names (aliases, tenants, hosts…).
    let open_maps = ["tenants", "images", "hosts", "registries", "credentials"];
    let mut missing = Vec::new();
    let mut check = |title: &str, table: &toml::value::Table| {
        let text = section(title);
        // A nested table is a section of its own; an open map is a key of its table.
        let keys = table
            .iter()
            .filter(|(k, v)| !v.is_table() || open_maps.contains(&k.as_str()))
            .map(|(k, _)| k);
        for key in keys {
            if !text.contains(&format!("| `{key}` |")) {
                missing.push(format!("{title}: {key}"));
            }
        }
    };
    let top = shown.as_table().expect("table");
    check("Top level", top);
    for (name, value) in top {
        let Some(table) = value.as_table() else {
            continue;
        };
        if open_maps.contains(&name.as_str()) {
            continue;
        }
        check(&format!("`[{name}]`"), table);
        for (inner, v) in table {
            if let (Some(t), false) = (v.as_table(), open_maps.contains(&inner.as_str())) {
                if name == "policy" && inner == "tenants" {
                    for per in t.values().filter_map(toml::Value::as_table) {
                        check("`[policy.tenants.<tenant>]`", per);
                    }
                }
            }
        }
    }
    assert!(missing.is_empty(), "undocumented keys: {missing:?}");
}

#[test]
fn creates_beyond_the_maximum_are_429_with_retry_after() {
    let server = common::TestServer::start_with_config(
        "[policy]\nwarm_pool_size = 0\nmax_sandboxes = 3\nmax_sandboxes_per_tenant = 2\n",
    );
    let body = json!({"image": {"uri": "default"}, "entrypoint": ["tail", "-f", "/dev/null"],
                      "resourceLimits": {"cpu": "1", "memory": "256Mi"}})
    .to_string();
    let create = || {
        ureq::post(&server.url("/v1/sandboxes"))
            .set("Content-Type", "application/json")
            .send_string(&body)
            .map_err(Box::new)
    };
    let first = server.create(json!({}));
    let _second = server.create(json!({}));
    let refused = match create().map_err(|e| *e) {
        Err(ureq::Error::Status(429, r)) => r,
        other => panic!("expected 429, got {other:?}"),
    };
    assert_eq!(refused.header("Retry-After"), Some("5"));
    let v: Value = refused.into_json().expect("json");
    assert_eq!(v["code"], "SANDBOX::QUOTA_EXCEEDED", "{v}");
    assert!(
        v["message"].as_str().unwrap_or("").contains("maximum of 2"),
        "{v}"
    );
    // Room again once one goes.
    assert_eq!(server.delete(&format!("/v1/sandboxes/{}", first.id)), 204);
    assert_eq!(create().map(|r| r.status()).ok(), Some(202));
}

/// `max_sandboxes` counts every surface's sandboxes: a one-shot run that needs one more is
/// refused with its surface's 429, not a 500.
#[test]
fn the_server_maximum_holds_for_one_shot_runs_too() {
    let server =
        common::TestServer::start_with_config("[policy]\nwarm_pool_size = 0\nmax_sandboxes = 1\n");
    let run = json!({"request": {"code": "print(1)", "runtime": "python"}}).to_string();
    let execute = || {
        common::into_pair(
            ureq::post(&server.url("/execute"))
                .set("Content-Type", "application/json")
                .send_string(&run),
        )
    };
    let (s, v) = execute();
    assert_eq!(s, 200, "room for one: {v}");
    // The one-shot sandbox is torn down after the answer, not before it: its place frees
    // within moments, and a create meanwhile is told to come back (429).
    let body = json!({"image": {"uri": "default"}, "entrypoint": ["tail", "-f", "/dev/null"],
                      "resourceLimits": {"cpu": "1", "memory": "256Mi"}})
    .to_string();
    let deadline = Instant::now() + Duration::from_secs(15);
    let held = loop {
        let (s, v) = server.create_raw(&body);
        if s == 202 {
            break v["id"].as_str().expect("id").to_string();
        }
        assert_eq!(s, 429, "{v}");
        assert!(
            Instant::now() < deadline,
            "the one-shot sandbox never left: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let (s, v) = execute();
    assert_eq!(s, 429, "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("maximum of 1"),
        "{v}"
    );
    assert_eq!(server.delete(&format!("/v1/sandboxes/{held}")), 204);
    assert_eq!(execute().0, 200);
}

#[test]
fn an_entrypoint_that_cannot_start_fails_the_sandbox_with_its_reason() {
    let server = common::TestServer::start_with_config("[policy]\nwarm_pool_size = 0\n");
    let (status, v) = server.create_raw(
        &json!({"image": {"uri": "default"}, "entrypoint": ["/nonexistent", "--flag"],
                "resourceLimits": {"cpu": "1", "memory": "256Mi"}})
        .to_string(),
    );
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["status"]["state"], "Failed", "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    let (_, got) = server.get(&format!("/v1/sandboxes/{id}"));
    assert_eq!(got["status"]["state"], "Failed", "{got}");
    assert_eq!(got["status"]["reason"], "ENTRYPOINT_FAILED", "{got}");
    let message = got["status"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("/nonexistent") && message.contains("No such file"),
        "{got}"
    );
    assert_eq!(server.delete(&format!("/v1/sandboxes/{id}")), 204);
}

#[test]
fn execbox_run_takes_stdin_and_files_and_says_why_it_stopped() {
    use std::io::Write;
    let exe = env!("CARGO_BIN_EXE_execbox");
    // Standard input reaches the program.
    let mut child = Command::new(exe)
        .args([
            "run",
            "--lang",
            "python",
            "import sys; print(sys.stdin.read().upper(), end='')",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"piped in\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "PIPED IN\n");
    // The code from a file.
    let file = std::env::temp_dir().join(unique("execbox-run-file"));
    std::fs::write(&file, "console.log(6 * 7)\n").unwrap();
    let out = Command::new(exe)
        .args(["run", "--lang", "javascript", "--file"])
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .expect("run");
    let _ = std::fs::remove_file(&file);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n", "{out:?}");
    // A timeout and an OOM are said in words, with their own exit codes.
    let out = Command::new(exe)
        .args(["run", "--timeout", "1", "--lang", "bash", "sleep 30"])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("time limit (--timeout)"),
        "{out:?}"
    );
    let out = Command::new(exe)
        .args([
            "run",
            "--memory",
            "64Mi",
            "--lang",
            "python",
            "x = bytearray(1 << 30)",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(137), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("out of memory, the limit is 64Mi"),
        "{out:?}"
    );
}

#[test]
fn an_unprivileged_user_is_told_what_is_missing_and_serve_refuses_to_start() {
    use std::os::unix::fs::PermissionsExt;
    // The binary where `nobody` can run it.
    let dir = std::env::temp_dir().join(unique("execbox-nobody"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let exe = dir.join("execbox");
    std::fs::copy(env!("CARGO_BIN_EXE_execbox"), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |args: &[&str]| {
        Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .arg(&exe)
            .args(args)
            .env_remove("EXECBOX_API_KEY")
            .env_remove("EXECBOX_STATE_DIR")
            .env_remove("EXECBOX_LISTEN")
            .output()
            .expect("runuser (util-linux)")
    };
    let doctor = as_nobody(&["doctor"]);
    let report = String::from_utf8_lossy(&doctor.stdout);
    assert_eq!(doctor.status.code(), Some(1), "{report}");
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("cgroup:write") && l.contains("MISSING") && l.contains("hint:")),
        "{report}"
    );
    let state = dir.join("state");
    let serve = as_nobody(&[
        "serve",
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!serve.status.success(), "{serve:?}");
    assert!(
        String::from_utf8_lossy(&serve.stderr).contains("refusing to create sandboxes"),
        "{serve:?}"
    );
}

/// The two lines `execbox key new` prints that are not comments: the key, and the
/// configuration line holding its hash.
fn new_key(tenant: Option<&str>) -> (String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_execbox"));
    cmd.args(["key", "new"]);
    if let Some(t) = tenant {
        cmd.args(["--tenant", t]);
    }
    let out = cmd.output().expect("execbox key new");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        lines.len(),
        2,
        "the key and one configuration line:\n{text}"
    );
    assert!(
        !lines[1].contains(lines[0]),
        "the configuration holds a hash, not the key:\n{text}"
    );
    (lines[0].to_string(), lines[1].to_string())
}

#[test]
fn keys_from_execbox_key_new_work_when_pasted_and_only_they_do() {
    let (acme_key, acme_line) = new_key(Some("acme"));
    let (default_key, default_line) = new_key(None);
    assert!(acme_line.starts_with("acme = [\"$argon2id$"), "{acme_line}");
    let default_hash = default_line
        .strip_prefix("api_keys = [\"")
        .and_then(|l| l.strip_suffix("\"]"))
        .expect("api_keys line");
    assert_ne!(acme_key, default_key, "every key is new");
    // The tenant's line pasted under [tenants]; the default tenant's hash given as --api-key
    // (a hash is accepted wherever a key is).
    let server = Logged::start_with(
        &["--api-key", default_hash],
        &format!("[tenants]\n{acme_line}\n"),
    );
    let list = |key: &str| match ureq::get(&format!("{}/v1/sandboxes", server.base))
        .set("OPEN-SANDBOX-API-KEY", key)
        .call()
    {
        Ok(r) => (r.status(), r.into_json::<Value>().ok()),
        Err(ureq::Error::Status(s, _)) => (s, None),
        Err(e) => panic!("{e}"),
    };
    let create = |key: &str| -> String {
        let v: Value = ureq::post(&format!("{}/v1/sandboxes", server.base))
            .set("OPEN-SANDBOX-API-KEY", key)
            .set("Content-Type", "application/json")
            .send_string(
                &json!({"image": {"uri": "default"}, "entrypoint": ["tail", "-f", "/dev/null"],
                        "resourceLimits": {"cpu": "1", "memory": "128Mi"}})
                .to_string(),
            )
            .expect("create with a hashed key")
            .into_json()
            .expect("json");
        v["id"].as_str().expect("id").to_string()
    };
    let acme_sandbox = create(&acme_key);
    // Twice each: the first check runs Argon2, the next ones use what it proved.
    for _ in 0..2 {
        let (s, v) = list(&acme_key);
        assert_eq!(s, 200);
        assert!(v.expect("list").to_string().contains(&acme_sandbox));
        let (s, v) = list(&default_key);
        assert_eq!(s, 200, "the default tenant's hashed key");
        assert!(
            !v.expect("list").to_string().contains(&acme_sandbox),
            "another tenant's sandbox is not listed"
        );
    }
    let acme_hash = acme_line
        .strip_prefix("acme = [\"")
        .and_then(|l| l.strip_suffix("\"]"))
        .expect("hash");
    let mut wrong_last = acme_key.clone();
    wrong_last.pop();
    wrong_last.push(if acme_key.ends_with('A') { 'B' } else { 'A' });
    for wrong in [
        acme_hash,
        default_hash,
        wrong_last.as_str(),
        &acme_key[..acme_key.len() - 1],
        "exb_",
    ] {
        for _ in 0..2 {
            assert_eq!(list(wrong).0, 401, "{wrong} is refused");
        }
    }
    ureq::delete(&format!("{}/v1/sandboxes/{acme_sandbox}", server.base))
        .set("OPEN-SANDBOX-API-KEY", &acme_key)
        .call()
        .expect("delete");
    let log = server.stop();
    assert!(
        !log.contains(&acme_key) && !log.contains(&default_key),
        "keys are never logged:\n{log}"
    );
}

#[test]
fn a_malformed_key_hash_stops_the_start_naming_its_place() {
    let config = std::env::temp_dir().join(unique("execbox-badhash"));
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{}\"\n[templates]\nprebuild = []\n[tenants]\nacme = [\"$argon2id$v=19$broken\"]\n",
            free_port()
        ),
    )
    .expect("config");
    let log = std::env::temp_dir().join(unique("execbox-badhash-log"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_execbox"))
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("EXECBOX_API_KEY")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("serve");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server started with a malformed key hash");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("tenants.acme: entry 0"), "{stderr}");
}
