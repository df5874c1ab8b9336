//! The E2B API against a real `execbox serve`: its routing and auth with plain HTTP, and the
//! official Python SDKs from PyPI (`e2b`, `e2b-code-interpreter`) with `E2B_API_URL` and
//! `E2B_SANDBOX_URL` pointing at the server.
//!
//! The pytest files live in `tests/e2b_sdk/` (next to this file); a virtualenv with their
//! `requirements.txt` is made at `target/e2b-venv` when missing or out of date. Each group is
//! a test function of its own, so that which groups pass shows at a glance: the control plane
//! and the routing need only the server; commands, files and the code interpreter need the
//! agent's `/e2b/envd` and `/e2b/ci` routes.
//!
//! The JavaScript SDKs from npm (`e2b`, `@e2b/code-interpreter`, the versions in [`JS_SDKS`]) run
//! their README examples (`tests/e2b_sdk/js/readme_examples.mjs`) against the server too; they
//! are installed once at `target/e2b-node` with `npm install`.

mod common;

use common::procs::{
    build_code_interpreter_template, describe, pytest_command, python_venv, repo_root,
    run_with_deadline, FileLock, INSTALL_DEADLINE,
};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const PYTEST_DEADLINE: Duration = Duration::from_secs(15 * 60);
const KEY: &str = "e2b-test-key";
/// The npm packages the JavaScript README examples run with (exact versions).
const JS_SDKS: [&str; 2] = ["e2b@2.51.0", "@e2b/code-interpreter@2.8.0"];

fn suite_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2b_sdk")
}

/// The virtualenv with the E2B SDKs from PyPI.
fn ensure_venv() -> PathBuf {
    python_venv(
        "e2b-venv",
        &suite_dir().join("requirements.txt"),
        "the E2B SDK tests",
    )
}

/// The directory holding `node_modules` with [`JS_SDKS`], installed from npm when missing or
/// installed for other versions. Fails, never skips, without Node or npm.
fn ensure_node_modules() -> PathBuf {
    let target = repo_root().join("target");
    std::fs::create_dir_all(&target).expect("create target/");
    let dir = target.join("e2b-node");
    let wanted = JS_SDKS.join("\n");
    let stamp = dir.join(".execbox-packages");
    let _lock = FileLock::acquire(&target.join("e2b-node.lock"));
    if dir
        .join("node_modules/@e2b/code-interpreter/package.json")
        .exists()
        && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&wanted)
    {
        return dir;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create target/e2b-node");
    std::fs::write(
        dir.join("package.json"),
        "{\"name\": \"execbox-e2b-js\", \"private\": true}\n",
    )
    .expect("write package.json");
    let mut npm = Command::new("npm");
    npm.args(["install", "--no-audit", "--no-fund", "--save-exact"])
        .args(JS_SDKS)
        .current_dir(&dir);
    let out = run_with_deadline(npm, "npm install", INSTALL_DEADLINE);
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&dir);
        panic!(
            "could not install the E2B JavaScript SDKs from npm ({}); the E2B tests need npm \
             and are not skipped:\n{}",
            JS_SDKS.join(" "),
            describe(&out)
        );
    }
    std::fs::write(&stamp, &wanted).expect("write packages stamp");
    dir
}

/// Runs one pytest file of the suite against `server`.
fn pytest(server: &common::TestServer, file: &str) {
    let python = ensure_venv();
    let mut cmd = pytest_command(&python, &suite_dir(), file);
    cmd.env("PYTHONUNBUFFERED", "1")
        .env("E2B_API_URL", &server.base)
        .env("E2B_SANDBOX_URL", &server.base)
        .env("E2B_API_KEY", KEY)
        .env_remove("E2B_DOMAIN")
        .env_remove("E2B_DEBUG")
        .env_remove("E2B_ACCESS_TOKEN")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost");
    let out = run_with_deadline(cmd, &format!("pytest {file}"), PYTEST_DEADLINE);
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "the E2B SDK tests of {file} failed ({}); see the pytest output above",
        out.status
    );
}

/// `POST /v2/sandboxes` with the test key; the sandbox's id and token.
fn create(server: &common::TestServer, body: Value) -> (String, String) {
    let r = common::reply(
        ureq::post(&server.url("/v2/sandboxes"))
            .set("X-API-Key", KEY)
            .send_json(body),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    (
        v["sandboxID"].as_str().expect("id").to_string(),
        v["envdAccessToken"].as_str().expect("token").to_string(),
    )
}

fn data(
    server: &common::TestServer,
    method: &str,
    path: &str,
    id: &str,
    port: &str,
) -> ureq::Request {
    ureq::request(method, &server.url(path))
        .set("E2b-Sandbox-Id", id)
        .set("E2b-Sandbox-Port", port)
}

/// An E2B control-plane error: exactly `{"code","message"}`, `code` the status.
#[track_caller]
fn assert_e2b_error(r: &common::Reply, status: u16) -> String {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    assert_eq!(v["code"], status, "{v}");
    let keys: Vec<&String> = v.as_object().expect("object").keys().collect();
    assert_eq!(keys.len(), 2, "{v}");
    v["message"].as_str().expect("message").to_string()
}

#[test]
fn e2b_control_plane_sdk() {
    let server = common::TestServer::start_with_key(KEY);
    pytest(&server, "test_control.py");
}

#[test]
fn e2b_control_plane_http() {
    let server = common::TestServer::start_with_key(KEY);
    // Keys: X-API-Key or Bearer; none or a wrong one is 401 with E2B's envelope.
    let r = common::reply(ureq::get(&server.url("/v2/sandboxes")).call());
    assert_e2b_error(&r, 401);
    let r = common::reply(
        ureq::get(&server.url("/v2/sandboxes"))
            .set("X-API-Key", "wrong")
            .call(),
    );
    assert_e2b_error(&r, 401);
    let r = common::reply(
        ureq::get(&server.url("/v2/sandboxes"))
            .set("Authorization", &format!("Bearer {KEY}"))
            .call(),
    );
    assert_eq!(r.status, 200, "{}", r.text());

    // Create: 201 and the Sandbox object.
    let r = common::reply(
        ureq::post(&server.url("/v2/sandboxes"))
            .set("X-API-Key", KEY)
            .send_json(json!({"templateID": "base", "timeout": 600,
                               "metadata": {"bar": "e2b x"}, "envVars": {"A": "1"}})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    let id = v["sandboxID"].as_str().expect("id").to_string();
    assert_eq!(v["templateID"], "base");
    assert_eq!(v["clientID"], "execbox");
    assert_eq!(v["envdVersion"], "0.5.7");
    assert!(v["envdAccessToken"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(v["trafficAccessToken"], v["envdAccessToken"]);
    assert!(v["domain"].is_null(), "{v}");

    // The same sandbox is an ordinary execbox sandbox: the OpenSandbox API sees it.
    let r = common::reply(
        ureq::get(&server.url(&format!("/v1/sandboxes/{id}")))
            .set("OPEN-SANDBOX-API-KEY", KEY)
            .call(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["metadata"]["bar"], "e2b x");

    // The code interpreter's templates are execbox's code-interpreter template.
    build_code_interpreter_template();
    for template in ["code-interpreter-v1", "code-interpreter:default"] {
        let (ci, _) = create(&server, json!({"templateID": template, "timeout": 120}));
        let r = common::reply(
            ureq::get(&server.url(&format!("/sandboxes/{ci}")))
                .set("X-API-Key", KEY)
                .call(),
        );
        assert_eq!(r.json()["templateID"], template);
        let r = common::reply(
            ureq::get(&server.url(&format!("/v1/sandboxes/{ci}")))
                .set("OPEN-SANDBOX-API-KEY", KEY)
                .call(),
        );
        assert_eq!(r.json()["image"]["uri"], "code-interpreter", "{}", r.text());
    }

    // Unsupported fields are named; unknown templates are 404; timeouts are bounded.
    for (body, status, needle) in [
        (
            json!({"templateID": "base", "volumeMounts": [{"name": "v", "path": "/v"}]}),
            400,
            "volumeMounts",
        ),
        (
            json!({"templateID": "base", "autoPause": true, "autoPauseMemory": false}),
            400,
            "autoPauseMemory",
        ),
        (
            json!({"templateID": "base", "network": {"rules": {"x": []}}}),
            400,
            "network.rules",
        ),
        (json!({"templateID": "base", "timeout": 0}), 400, "timeout"),
        (
            json!({"templateID": "base", "timeout": 100_000_000}),
            400,
            "timeout",
        ),
        (
            json!({"templateID": "nope"}),
            404,
            "template 'nope' not found",
        ),
        (
            json!({"templateID": "base", "mcp": {"x": {}}}),
            404,
            "template 'mcp-gateway' not found",
        ),
        (json!({}), 400, "templateID"),
        (
            json!({"templateID": "base", "autoResume": {"enabled": true}}),
            400,
            "autoResume.enabled",
        ),
        (
            json!({"templateID": "base", "envVars": {"A": "x".repeat(200_000)}}),
            400,
            "envVars",
        ),
        (
            json!({"templateID": "base", "envVars": {"A=B": "1"}}),
            400,
            "envVars.A=B",
        ),
    ] {
        let r = common::reply(
            ureq::post(&server.url("/v2/sandboxes"))
                .set("X-API-Key", KEY)
                .send_json(body.clone()),
        );
        let message = assert_e2b_error(&r, status);
        assert!(message.contains(needle), "{body}: {message}");
    }

    // Unknown sandboxes: 404 with upstream's message.
    let r = common::reply(
        ureq::get(&server.url("/sandboxes/nope"))
            .set("X-API-Key", KEY)
            .call(),
    );
    let message = assert_e2b_error(&r, 404);
    assert_eq!(
        message,
        "Sandbox \"nope\" doesn't exist or you don't have access to it"
    );

    // Not supported yet: 501 naming the feature.
    for (method, path) in [
        ("POST", format!("/sandboxes/{id}/fork")),
        ("POST", format!("/sandboxes/{id}/snapshots")),
        ("GET", "/snapshots".to_string()),
        ("GET", "/templates".to_string()),
        ("GET", "/volumes".to_string()),
    ] {
        let r = common::reply(
            ureq::request(method, &server.url(&path))
                .set("X-API-Key", KEY)
                .send_string("{}"),
        );
        let message = assert_e2b_error(&r, 501);
        assert!(message.contains("not supported by execbox"), "{message}");
    }

    // An Idempotency-Key names the sandbox its first create made.
    let idem = |key: &str| {
        common::reply(
            ureq::post(&server.url("/v2/sandboxes"))
                .set("X-API-Key", KEY)
                .set("Idempotency-Key", key)
                .send_json(json!({"templateID": "base", "timeout": 60})),
        )
    };
    let first = idem("retry-1");
    assert_eq!(first.status, 201, "{}", first.text());
    let again = idem("retry-1");
    assert_eq!(again.status, 201, "{}", again.text());
    assert_eq!(first.json()["sandboxID"], again.json()["sandboxID"]);
    assert_ne!(
        idem("retry-2").json()["sandboxID"],
        first.json()["sandboxID"]
    );
    assert_e2b_error(&idem("Not_Valid"), 400);

    // Kill: 204, then 404.
    let kill = || {
        common::reply(
            ureq::delete(&server.url(&format!("/sandboxes/{id}")))
                .set("X-API-Key", KEY)
                .call(),
        )
    };
    assert_eq!(kill().status, 204);
    assert_e2b_error(&kill(), 404);
}

#[test]
fn e2b_tenants_see_only_their_sandboxes() {
    let server = common::TestServer::start_with_env(
        "[tenants]\nacme = [\"acme-key\"]\nglobex = [\"globex-key\"]\n",
        &[],
    )
    .cleaning_up_for(&["acme-key", "globex-key"]);
    let r = common::reply(
        ureq::post(&server.url("/v2/sandboxes"))
            .set("X-API-Key", "acme-key")
            .send_json(json!({"templateID": "base", "timeout": 120})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["sandboxID"].as_str().expect("id").to_string();
    let get = |key: &str| {
        common::reply(
            ureq::get(&server.url(&format!("/sandboxes/{id}")))
                .set("X-API-Key", key)
                .call(),
        )
    };
    assert_eq!(get("acme-key").status, 200);
    assert_e2b_error(&get("globex-key"), 404);
    let r = common::reply(
        ureq::get(&server.url("/v2/sandboxes"))
            .set("X-API-Key", "globex-key")
            .call(),
    );
    assert_eq!(r.json(), json!([]));
    let r = common::reply(
        ureq::delete(&server.url(&format!("/sandboxes/{id}")))
            .set("X-API-Key", "globex-key")
            .call(),
    );
    assert_e2b_error(&r, 404);
}

#[test]
fn e2b_data_plane_routing_and_auth() {
    let server = common::TestServer::start_with_key(KEY);
    let (id, token) = create(&server, json!({"templateID": "base", "timeout": 300}));

    // Routing headers win over every route: `/health` and `/execute` are the sandbox's.
    let r = common::reply(data(&server, "GET", "/health", "nope", "49983").call());
    assert_eq!(r.status, 502);
    let v = r.json();
    assert_eq!(v["code"], 502);
    assert_eq!(v["sandboxId"], "nope");
    assert!(
        v["message"]
            .as_str()
            .expect("message")
            .contains("was not found"),
        "{v}"
    );
    let r = common::reply(data(&server, "POST", "/execute", "nope", "49999").send_string("{}"));
    assert_eq!(r.status, 502, "{}", r.text());
    let r = common::reply(
        ureq::get(&server.url("/health"))
            .set("E2b-Sandbox-Id", &id)
            .call(),
    );
    assert_eq!(
        assert_e2b_error(&r, 400),
        "Missing header: E2b-Sandbox-Port"
    );
    // Without them, `/health` is still the server's.
    let r = common::reply(ureq::get(&server.url("/health")).call());
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ok");

    // envd: the token on every route but GET /health.
    let r = common::reply(data(&server, "GET", "/files?path=/etc/hostname", &id, "49983").call());
    let message = assert_e2b_error(&r, 401);
    assert!(message.starts_with("unauthorized access"), "{message}");
    let r = common::reply(
        data(&server, "POST", "/process.Process/List", &id, "49983")
            .set("X-Access-Token", "wrong")
            .set("Content-Type", "application/json")
            .send_string("{}"),
    );
    assert_e2b_error(&r, 401);
    // The code interpreter and other ports take either token header.
    let r = common::reply(data(&server, "GET", "/contexts", &id, "49999").call());
    assert_e2b_error(&r, 401);
    let r = common::reply(
        data(&server, "GET", "/", &id, "8000")
            .set("E2B-Traffic-Access-Token", &token)
            .call(),
    );
    assert_eq!(r.status, 502, "{}", r.text());
    let v = r.json();
    assert!(
        v["message"]
            .as_str()
            .expect("message")
            .contains("port is not open"),
        "{v}"
    );
    assert_eq!(v["port"], 8000);
    let r = common::reply(
        data(&server, "GET", "/", &id, "8000")
            .set("X-Access-Token", &token)
            .call(),
    );
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("port is not open"));
    let r = common::reply(data(&server, "GET", "/", &id, "8000").call());
    assert_e2b_error(&r, 401);
    let r = common::reply(data(&server, "GET", "/", &id, "notaport").call());
    assert_e2b_error(&r, 400);

    // A service in the sandbox, reached through the port proxy with the traffic token; no
    // credential reaches it.
    let execd = |body: Value| {
        common::reply(
            ureq::post(&server.url(&format!("/v1/sandboxes/{id}/proxy/44772/command")))
                .set("X-EXECD-ACCESS-TOKEN", &token)
                .send_json(body),
        )
    };
    let r = execd(json!({"command": "mkdir -p /tmp/www && echo served > /tmp/www/index.html"}));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = execd(
        json!({"command": "cd /tmp/www && exec python3 -m http.server 8123",
                         "background": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = common::reply(
            data(&server, "GET", "/index.html", &id, "8123")
                .set("E2B-Traffic-Access-Token", &token)
                .call(),
        );
        if r.status == 200 {
            assert_eq!(r.text().trim(), "served");
            break;
        }
        assert!(Instant::now() < deadline, "{} {}", r.status, r.text());
        std::thread::sleep(Duration::from_millis(200));
    }

    // Signed `/files` with no routing header: a signature no sandbox's token gives is 401.
    let r = common::reply(
        ureq::get(&server.url("/files?path=/etc/hostname&signature=v1_bogus")).call(),
    );
    assert_e2b_error(&r, 401);

    // A paused sandbox is not running for the data plane; is_running() reads the 502.
    let r = common::reply(
        ureq::post(&server.url(&format!("/sandboxes/{id}/pause")))
            .set("X-API-Key", KEY)
            .send_string("{}"),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let r = common::reply(data(&server, "GET", "/health", &id, "49983").call());
    assert_eq!(r.status, 502);
    assert!(r.text().contains("was not found"));
    let r = common::reply(
        ureq::post(&server.url(&format!("/v2/sandboxes/{id}/connect")))
            .set("X-API-Key", KEY)
            .send_json(json!({"timeout": 120})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = common::reply(
        ureq::post(&server.url(&format!("/v2/sandboxes/{id}/connect")))
            .set("X-API-Key", KEY)
            .send_json(json!({})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn e2b_host_names_route_to_sandboxes() {
    let server = common::TestServer::start_with_env(
        &format!("api_keys = [\"{KEY}\"]\n[e2b]\ndomain = \"sbx.test\"\n"),
        &[],
    )
    .cleaning_up_for(&[KEY]);
    let r = common::reply(
        ureq::post(&server.url("/v2/sandboxes"))
            .set("X-API-Key", KEY)
            .send_json(json!({"templateID": "base", "timeout": 120})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    assert_eq!(v["domain"], "sbx.test");
    let id = v["sandboxID"].as_str().expect("id").to_string();
    // `{port}-{id}.{domain}`: the data plane, without routing headers.
    let r = common::reply(
        ureq::get(&server.url("/"))
            .set("Host", &format!("8000-{id}.sbx.test"))
            .set(
                "X-Access-Token",
                v["envdAccessToken"].as_str().expect("token"),
            )
            .call(),
    );
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("port is not open"), "{}", r.text());
    let r = common::reply(
        ureq::get(&server.url("/health"))
            .set("Host", "49983-nope.sbx.test")
            .call(),
    );
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("was not found"));
    // Any other host is the server's own.
    let r = common::reply(ureq::get(&server.url("/health")).call());
    assert_eq!(r.json()["status"], "ok");
}

#[test]
fn e2b_auto_pause_and_auto_resume() {
    let server = common::TestServer::start_with_key(KEY);
    let (id, _) = create(
        &server,
        json!({"templateID": "base", "timeout": 2, "autoPause": true,
               "autoResume": {"enabled": true}}),
    );
    let state = || {
        let r = common::reply(
            ureq::get(&server.url(&format!("/sandboxes/{id}")))
                .set("X-API-Key", KEY)
                .call(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    let v = state();
    assert_eq!(
        v["lifecycle"],
        json!({"autoResume": true, "onTimeout": "pause"})
    );
    // Paused, not deleted, at its timeout.
    let deadline = Instant::now() + Duration::from_secs(15);
    while state()["state"] != "paused" {
        assert!(Instant::now() < deadline, "not paused at its timeout");
        std::thread::sleep(Duration::from_millis(300));
    }
    // Any data-plane request resumes it, for its create's timeout.
    let r = common::reply(data(&server, "GET", "/health", &id, "49983").call());
    assert_ne!(r.status, 502, "{}", r.text());
    assert_eq!(state()["state"], "running");
}

#[test]
fn e2b_network_maps_onto_the_egress_policy() {
    let server = common::TestServer::start_with_key(KEY);
    let policy = |id: &str, token: &str| {
        let r = common::reply(
            ureq::get(&server.url(&format!("/v1/sandboxes/{id}/proxy/18080/policy")))
                .set("X-EXECD-ACCESS-TOKEN", token)
                .call(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    // allowOut with a denyOut of everything: deny by default, those destinations allowed.
    let (id, token) = create(
        &server,
        json!({"templateID": "base", "timeout": 120,
               "network": {"allowOut": ["example.com", "1.1.1.1"], "denyOut": ["0.0.0.0/0"]}}),
    );
    let p = policy(&id, &token);
    assert_eq!(p["policy"]["defaultAction"], "deny", "{p}");
    let targets: Vec<&str> = p["policy"]["egress"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| r["target"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(targets, ["example.com", "1.1.1.1"], "{p}");
    let r = common::reply(
        ureq::get(&server.url(&format!("/sandboxes/{id}")))
            .set("X-API-Key", KEY)
            .call(),
    );
    assert_eq!(r.json()["allowInternetAccess"], false);
    // PUT …/network replaces the rules.
    let r = common::reply(
        ureq::put(&server.url(&format!("/sandboxes/{id}/network")))
            .set("X-API-Key", KEY)
            .send_json(json!({"allowOut": ["pypi.org"]})),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let p = policy(&id, &token);
    assert_eq!(p["policy"]["egress"][0]["target"], "pypi.org", "{p}");
    assert_eq!(
        p["policy"]["egress"].as_array().map(Vec::len),
        Some(1),
        "{p}"
    );
    // Omitted fields are cleared: nothing leaves.
    let r = common::reply(
        ureq::put(&server.url(&format!("/sandboxes/{id}/network")))
            .set("X-API-Key", KEY)
            .send_json(json!({})),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(policy(&id, &token)["mode"], "deny_all");

    // allow_internet_access: false: no egress at all.
    let (id, token) = create(
        &server,
        json!({"templateID": "base", "timeout": 120, "allow_internet_access": false}),
    );
    let p = policy(&id, &token);
    assert_eq!(p["mode"], "deny_all", "{p}");

    // Without either: no network device (execbox's default), and one cannot be added later.
    let (id, _) = create(&server, json!({"templateID": "base", "timeout": 120}));
    let r = common::reply(
        ureq::put(&server.url(&format!("/sandboxes/{id}/network")))
            .set("X-API-Key", KEY)
            .send_json(json!({"allowOut": ["pypi.org"]})),
    );
    let message = assert_e2b_error(&r, 400);
    assert!(message.contains("without network"), "{message}");

    // An allow-by-default network needs the `public` mode, which the default policy refuses.
    let r = common::reply(
        ureq::post(&server.url("/v2/sandboxes"))
            .set("X-API-Key", KEY)
            .send_json(json!({"templateID": "base", "allow_internet_access": true})),
    );
    let message = assert_e2b_error(&r, 400);
    assert!(message.starts_with("network:"), "{message}");
}

// The groups below need the agent's `/e2b/envd` and `/e2b/ci` routes (the in-sandbox half of
// the E2B API).

#[test]
fn e2b_sdk_commands() {
    let server = common::TestServer::start_with_key(KEY);
    pytest(&server, "test_commands.py");
}

#[test]
fn e2b_sdk_files() {
    let server = common::TestServer::start_with_key(KEY);
    pytest(&server, "test_files.py");
}

#[test]
fn e2b_sdk_code_interpreter() {
    build_code_interpreter_template();
    let server = common::TestServer::start_with_key(KEY);
    pytest(&server, "test_code_interpreter.py");
}

#[test]
fn e2b_sdk_readme_examples() {
    build_code_interpreter_template();
    let server = common::TestServer::start_with_key(KEY);
    pytest(&server, "test_readme.py");
}

/// The README examples of the npm `e2b` and `@e2b/code-interpreter` packages, their calls as
/// written (`Sandbox.create()`, `commands.run`, `files.write`/`read`, `runCode`, `kill`), with
/// only the SDK's environment variables pointing at the server.
#[test]
fn e2b_js_sdk_readme_examples() {
    build_code_interpreter_template();
    let sdks = ensure_node_modules();
    let server = common::TestServer::start_with_key(KEY);
    let mut cmd = Command::new("node");
    cmd.arg(suite_dir().join("js/readme_examples.mjs"))
        .current_dir(&sdks)
        .env("E2B_JS_SDK_DIR", &sdks)
        .env("E2B_API_URL", &server.base)
        .env("E2B_SANDBOX_URL", &server.base)
        .env("E2B_API_KEY", KEY)
        .env_remove("E2B_DOMAIN")
        .env_remove("E2B_DEBUG")
        .env_remove("E2B_ACCESS_TOKEN")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost");
    let out = run_with_deadline(cmd, "node readme_examples.mjs", PYTEST_DEADLINE);
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the README examples failed: {}",
        describe(&out)
    );
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            r#"commands.run: "Hello from E2B!\n""#,
            r#"files.read: "written by the JS SDK""#,
            "kill: true",
            r#"runCode logs: {"stdout":["hello world\n"],"stderr":[]}"#,
            "runCode text: 2",
            "runCode text (one cell): 2",
            "code interpreter killed",
            "done",
        ],
        "{}",
        describe(&out)
    );
}
