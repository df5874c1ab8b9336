//! The OpenSandbox lifecycle API over real HTTP: shapes, errors, pause/resume, restart.

mod common;

use common::*;
use serde_json::json;

#[test]
fn bad_input_gets_the_envelope_naming_the_field() {
    let server = TestServer::start();
    let base = json!({"image": {"uri": "default"}, "entrypoint": ["tail", "-f", "/dev/null"],
                      "resourceLimits": {"cpu": "1", "memory": "1Gi"}});
    let with = |k: &str, v: serde_json::Value| {
        let mut b = base.clone();
        b[k] = v;
        b.to_string()
    };
    let cases = [
        (
            with("resourceLimits", json!({"memory": "lots"})),
            "resourceLimits.memory",
        ),
        (
            with("resourceLimits", json!({"cpu": "-1"})),
            "resourceLimits.cpu",
        ),
        (with("timeout", json!(30)), "timeout"),
        (with("image", json!({"uri": "Not A Reference!"})), "image"),
        (with("image", json!({"uri": "python:3.11"})), "image.uri"),
        ("{not json".to_string(), ""),
        (with("entrypoint", json!("tail")), "entrypoint"),
    ];
    for (body, field) in cases {
        let (status, v) = server.create_raw(&body);
        assert_eq!(status, 400, "{body} -> {v}");
        assert_eq!(v["code"], "SANDBOX::INVALID_PARAMETER", "{v}");
        assert!(
            v["message"].as_str().unwrap_or("").contains(field),
            "{field}: {v}"
        );
    }
    let (status, v) = server.get("/v1/sandboxes/does-not-exist");
    assert_eq!(status, 404);
    assert_eq!(v["code"], "DOCKER::SANDBOX_NOT_FOUND");
    let (status, v) = server.get("/v1/sandboxes?metadata=a%3D1%26broken");
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["code"], "INVALID_METADATA_FORMAT");
    assert_eq!(
        server.get("/v1/sandboxes").0,
        200,
        "the server is still fine"
    );
}

#[test]
fn create_get_list_endpoints_metadata_renew_pause_resume() {
    let server = TestServer::start();
    let sbx = server.create(json!({
        "image": {"uri": "opensandbox/code-interpreter:v1.1.0"},
        "metadata": {"project": "apollo"},
        "env": {"GREETING": "hello"},
        "timeout": 600
    }));
    let other = server.create(json!({"metadata": {"project": "zeus"}}));
    let (s, v) = server.get(&format!("/v1/sandboxes/{}", sbx.id));
    assert_eq!(s, 200);
    assert_eq!(v["status"]["state"], "Running");
    assert_eq!(v["image"]["uri"], "opensandbox/code-interpreter:v1.1.0");
    assert!(
        v["expiresAt"].is_string() && v["createdAt"].is_string(),
        "{v}"
    );
    assert_eq!(sbx.run("echo $GREETING").out(), "hello");

    let (s, v) = server.get("/v1/sandboxes?metadata=project%3Dapollo");
    assert_eq!(s, 200);
    assert_eq!(v["pagination"]["totalItems"], 1, "{v}");
    assert_eq!(v["items"][0]["id"], sbx.id.as_str());
    let (_, v) = server.get("/v1/sandboxes?state=Running&pageSize=1&page=2");
    assert_eq!(v["pagination"]["totalItems"], 2, "{v}");
    assert_eq!(v["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["pagination"]["hasNextPage"], false);

    let (s, ep) = server.get(&format!("/v1/sandboxes/{}/endpoints/18080", sbx.id));
    assert_eq!(s, 200);
    assert!(
        ep["endpoint"]
            .as_str()
            .unwrap_or("")
            .ends_with("/proxy/18080"),
        "{ep}"
    );

    // The data plane needs the token (or the server key).
    let no_token = ureq::get(&format!("{}/ping", sbx.endpoint)).call();
    assert!(
        matches!(no_token, Err(ureq::Error::Status(401, _))),
        "{no_token:?}"
    );
    assert_eq!(
        sbx.execd("GET", "/ping").call().map(|r| r.status()).ok(),
        Some(200)
    );
    // Another sandbox's token does not open this one.
    let cross = ureq::get(&format!("{}/ping", sbx.endpoint))
        .set("X-EXECD-ACCESS-TOKEN", &other.token)
        .call();
    assert!(matches!(cross, Err(ureq::Error::Status(401, _))));

    let r = ureq::patch(&server.url(&format!("/v1/sandboxes/{}/metadata", sbx.id)))
        .send_string(r#"{"team":"ml","project":null}"#);
    let (s, v) = into_pair(r);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["metadata"], json!({"team": "ml"}));

    let later = time_in(3600);
    let (s, v) = server.post(
        &format!("/v1/sandboxes/{}/renew-expiration", sbx.id),
        &json!({"expiresAt": later}).to_string(),
    );
    assert_eq!(s, 200, "{v}");
    let (s, _) = server.post(
        &format!("/v1/sandboxes/{}/renew-expiration", sbx.id),
        &json!({"expiresAt": time_in(-10)}).to_string(),
    );
    assert_eq!(s, 400);
    // An earlier (still future) expiry is accepted too, as upstream's pool asks for it.
    let (s, v) = server.post(
        &format!("/v1/sandboxes/{}/renew-expiration", sbx.id),
        &json!({"expiresAt": time_in(600)}).to_string(),
    );
    assert_eq!(s, 200, "{v}");
    let (_, v) = server.get(&format!("/v1/sandboxes/{}", sbx.id));
    assert!(v["expiresAt"].is_string(), "{v}");

    // Any state filter is accepted; one no sandbox here can have matches nothing.
    let (s, v) = server.get("/v1/sandboxes?state=Allocated");
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["items"].as_array().map(Vec::len), Some(0), "{v}");
    let (s, v) = server.get("/v1/sandboxes?state=Allocated&state=Running");
    assert_eq!(s, 200, "{v}");
    assert!(
        v["items"]
            .as_array()
            .is_some_and(|items| items.iter().any(|i| i["id"] == sbx.id.as_str())),
        "{v}"
    );

    let (s, _) = server.post(&format!("/v1/sandboxes/{}/pause", sbx.id), "");
    assert_eq!(s, 202);
    let (_, v) = server.get(&format!("/v1/sandboxes/{}", sbx.id));
    assert_eq!(v["status"]["state"], "Paused");
    let state = std::fs::read_to_string(cgroup_dir("freezer", &sbx.id).join("freezer.state"))
        .unwrap_or_default();
    assert_eq!(state.trim(), "FROZEN");
    let (s, v) = server.post(&format!("/v1/sandboxes/{}/pause", sbx.id), "");
    assert_eq!(s, 409, "{v}");
    let (s, _) = server.post(&format!("/v1/sandboxes/{}/resume", sbx.id), "");
    assert_eq!(s, 202);
    assert_eq!(sbx.run("echo thawed").out(), "thawed");
}

fn time_in(secs: i64) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
        + secs;
    // RFC 3339 via `date`, which every test machine has.
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{t}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_restarted_server_reattaches_to_running_sandboxes() {
    let server = TestServer::start();
    let port = server.port;
    let sbx = server.create(json!({}));
    let (id, token) = (sbx.id.clone(), sbx.token.clone());
    sbx.run("echo before > /workspace/f");
    let state_dir = server.crash();
    let server = TestServer::start_on(state_dir, port, None);
    let (s, v) = server.get(&format!("/v1/sandboxes/{id}"));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"]["state"], "Running");
    let again = Sandbox {
        server: &server,
        id: id.clone(),
        endpoint: format!("{}/v1/sandboxes/{id}/proxy/44772", server.base),
        token,
    };
    assert_eq!(again.run("cat /workspace/f").out(), "before");
    assert_eq!(server.delete(&format!("/v1/sandboxes/{id}")), 204);
    assert!(!cgroup_dir("memory", &id).exists());
}

#[test]
fn api_key_is_required_when_configured() {
    let server = TestServer::start_with_key("s3cret");
    let (s, v) = server.get("/v1/sandboxes");
    assert_eq!(s, 401);
    assert_eq!(v["code"], "MISSING_API_KEY");
    let (s, v) = into_pair(
        ureq::get(&server.url("/v1/sandboxes"))
            .set("OPEN-SANDBOX-API-KEY", "wrong")
            .call(),
    );
    assert_eq!(s, 401);
    assert_eq!(v["code"], "INVALID_API_KEY");
    let (s, _) = into_pair(
        ureq::get(&server.url("/v1/sandboxes"))
            .set("OPEN-SANDBOX-API-KEY", "s3cret")
            .call(),
    );
    assert_eq!(s, 200);
    assert_eq!(server.get("/health").0, 200, "/health needs no key");
}

/// Keys carry tenants: a sandbox belongs to the tenant of the key that created it, and
/// another tenant's key sees neither it (404) nor its data plane.
#[test]
fn tenants_are_separated_by_their_keys() {
    let server = TestServer::start_with_config(
        "[tenants]\nacme = [\"key-acme\"]\nglobex = [\"key-globex-1\", \"key-globex-2\"]\n",
    );
    let call = |method: &str, path: &str, key: &str| {
        ureq::request(method, &server.url(path)).set("OPEN-SANDBOX-API-KEY", key)
    };
    let body = r#"{"image":{"uri":"default"},"entrypoint":["tail","-f","/dev/null"],"resourceLimits":{"cpu":"500m","memory":"256Mi"},"timeout":600}"#;
    let (s, created) = into_pair(
        call("POST", "/v1/sandboxes", "key-acme")
            .set("Content-Type", "application/json")
            .send_string(body),
    );
    assert_eq!(s, 202, "{created}");
    let id = created["id"].as_str().expect("id").to_string();
    let path = format!("/v1/sandboxes/{id}");

    // The owner sees it with its key; the other tenant, with either of its keys, does not.
    assert_eq!(into_pair(call("GET", &path, "key-acme").call()).0, 200);
    for key in ["key-globex-1", "key-globex-2"] {
        let (s, v) = into_pair(call("GET", &path, key).call());
        assert_eq!(s, 404, "{v}");
        let (_, list) = into_pair(call("GET", "/v1/sandboxes", key).call());
        assert_eq!(list["items"], serde_json::json!([]), "{list}");
        for (method, p) in [
            ("DELETE", path.clone()),
            ("POST", format!("{path}/pause")),
            ("GET", format!("{path}/endpoints/44772")),
        ] {
            let (s, v) = into_pair(call(method, &p, key).call());
            assert_eq!(s, 404, "{method} {p} with {key}: {v}");
        }
        // The data plane: another tenant's key does not open it.
        let (s, _) = into_pair(call("GET", &format!("{path}/proxy/44772/ping"), key).call());
        assert_eq!(s, 401, "proxy with {key}");
    }
    let (_, list) = into_pair(call("GET", "/v1/sandboxes", "key-acme").call());
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1), "{list}");
    // The owner's key opens the data plane; no key at all is refused.
    let (s, _) = into_pair(call("GET", &format!("{path}/proxy/44772/ping"), "key-acme").call());
    assert_eq!(s, 200);
    let (s, v) = into_pair(ureq::get(&server.url(&path)).call());
    assert_eq!((s, v["code"].as_str()), (401, Some("MISSING_API_KEY")));
    assert_eq!(into_pair(call("DELETE", &path, "key-acme").call()).0, 204);
}

#[test]
fn serving_without_a_key_on_a_public_address_is_refused() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_execbox"))
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--state-dir",
            "/tmp/execbox-never",
        ])
        .env_remove("EXECBOX_API_KEY")
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("without an API key"));
}

#[test]
fn execbox_run_passes_output_and_exit_code_through() {
    let exe = env!("CARGO_BIN_EXE_execbox");
    let out = std::process::Command::new(exe)
        .args([
            "run",
            "--lang",
            "python",
            "import sys; print('hi'); sys.exit(3)",
        ])
        .output()
        .expect("run");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    assert_eq!(out.status.code(), Some(3));
    let out = std::process::Command::new(exe)
        .args(["run", "--lang", "javascript", "console.log(6*7)"])
        .output()
        .expect("run");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n");
    // With the test servers' templates directory, where the code-interpreter template is
    // built by the tests that use it (or not yet: both are reported).
    let out = std::process::Command::new(exe)
        .arg("doctor")
        .env("EXECBOX_TEMPLATES_DIR", common::TEST_TEMPLATES_DIR)
        .output()
        .expect("doctor");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("seccomp"));
    // Disk storage is tried for real on this machine (root, loop devices, mke2fs).
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("storage:disk") && l.contains("active")),
        "{report}"
    );
    // The runtimes sandboxes get, with where they are.
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("runtimes") && l.contains("python3 (/")),
        "{report}"
    );
    // The templates sandboxes may ask for, and whether each is built.
    let templates = report
        .lines()
        .find(|l| l.starts_with("templates"))
        .unwrap_or_else(|| panic!("{report}"));
    assert!(
        templates.contains("default (the host's runtimes"),
        "{templates}"
    );
    assert!(
        templates.contains("code-interpreter (built, ")
            || templates.contains("code-interpreter (not built yet"),
        "{templates}"
    );
    assert!(
        templates.contains("opensandbox/code-interpreter → code-interpreter"),
        "{templates}"
    );
}

#[test]
fn the_proxy_streams_each_event_as_it_is_produced() {
    use std::io::Read;
    let server = TestServer::start();
    let sbx = server.create(json!({}));
    let started = std::time::Instant::now();
    let resp = sbx
        .execd("POST", "/command")
        .send_string(r#"{"command":"echo first; sleep 3; echo second"}"#)
        .expect("command");
    let mut reader = resp.into_reader();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("first") {
        let n = reader.read(&mut buf).expect("read");
        assert!(n > 0, "stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    let first_after = started.elapsed();
    assert!(
        first_after < std::time::Duration::from_secs(2),
        "first line must arrive before the command ends: {first_after:?}"
    );
    let mut rest = String::new();
    reader.read_to_string(&mut rest).expect("rest");
    assert!(
        rest.contains("second") && rest.contains("execution_complete"),
        "{rest}"
    );
}

#[test]
fn a_sandbox_expires_at_its_timeout() {
    let server = TestServer::start();
    let sbx = server.create(json!({"timeout": 60}));
    let id = sbx.id.clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(80);
    loop {
        let (status, _) = server.get(&format!("/v1/sandboxes/{id}"));
        if status == 404 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sandbox did not expire"
        );
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    assert!(
        !cgroup_dir("memory", &id).exists(),
        "expired sandbox left its cgroup"
    );
}

/// Seconds from now to the RFC 3339 time `t`.
fn secs_until(t: &str) -> i64 {
    let at = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
        .expect("RFC 3339");
    (at - time::OffsetDateTime::now_utc()).whole_seconds()
}

#[test]
fn traffic_through_the_proxy_extends_the_expiry_when_asked() {
    let server = TestServer::start();
    let sbx = server.create(json!({
        "timeout": 60,
        "extensions": {"access.renew.extend.seconds": "300"},
    }));
    let (_, v) = server.get(&format!("/v1/sandboxes/{}", sbx.id));
    let left = secs_until(v["expiresAt"].as_str().expect("expiresAt"));
    assert!((50..=61).contains(&left), "{v}");
    // One request through the proxy: the expiry is now about 300 s away.
    let ping = sbx.execd("GET", "/ping").call().expect("ping");
    assert_eq!(ping.status(), 200);
    let (_, v) = server.get(&format!("/v1/sandboxes/{}", sbx.id));
    let left = secs_until(v["expiresAt"].as_str().expect("expiresAt"));
    assert!((290..=301).contains(&left), "{v}");
    // Without the extension, traffic changes nothing.
    let plain = server.create(json!({"timeout": 60}));
    plain.execd("GET", "/ping").call().expect("ping");
    let (_, v) = server.get(&format!("/v1/sandboxes/{}", plain.id));
    let left = secs_until(v["expiresAt"].as_str().expect("expiresAt"));
    assert!((50..=61).contains(&left), "{v}");
}
