//! OpenSandbox lifecycle parity, over real HTTP against a real server: signed expiring
//! endpoints, diagnostics (entrypoint output, events, summary), and pools with `poolRef`.

mod common;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn get_reply(url: &str) -> common::Reply {
    common::reply(ureq::get(url).call())
}

#[test]
fn signed_endpoints_open_one_port_of_one_sandbox_until_their_time() {
    let server = common::TestServer::start_with_config("[policy]\nwarm_pool_size = 0\n");
    let a = server.create(json!({}));
    let b = server.create(json!({}));
    let expires = now_secs() + 120;

    // `use_server_proxy` is accepted (execbox always answers with its proxy).
    for q in ["use_server_proxy=true", "use_server_proxy=false", ""] {
        let (s, v) = server.get(&format!("/v1/sandboxes/{}/endpoints/44772?{q}", a.id));
        assert_eq!(s, 200, "{q}: {v}");
        assert!(v["headers"]["X-EXECD-ACCESS-TOKEN"].is_string(), "{v}");
    }

    let (s, v) = server.get(&format!(
        "/v1/sandboxes/{}/endpoints/44772?expires={expires}",
        a.id
    ));
    assert_eq!(s, 200, "{v}");
    assert!(
        v.get("headers").is_none(),
        "a signed endpoint needs no header: {v}"
    );
    let signed = format!("http://{}", v["endpoint"].as_str().expect("endpoint"));
    assert!(signed.contains("/signed/44772/"), "{signed}");

    // No header at all: the route is the credential.
    let ok = get_reply(&format!("{signed}/ping"));
    assert_eq!(ok.status, 200, "{}", ok.text());
    let ran = common::reply(
        ureq::post(&format!("{signed}/command"))
            .set("Content-Type", "application/json")
            .send_string(&json!({"command": "echo signed-ok"}).to_string()),
    );
    assert_eq!(ran.status, 200);
    assert!(ran.text().contains("signed-ok"), "{}", ran.text());

    // The same route for another sandbox, another port, another time, or a changed
    // signature opens nothing.
    let parts: Vec<&str> = signed.rsplitn(3, '/').collect();
    let (sig, exp_b36) = (parts[0], parts[1]);
    let other_sandbox = signed.replace(&a.id, &b.id);
    let other_port = signed.replace("/signed/44772/", "/signed/8080/");
    let later = signed.replace(&format!("/{exp_b36}/"), &format!("/{}/", "zzzzzz"));
    let mut flipped = sig.to_string();
    let last = if flipped.ends_with('0') { '1' } else { '0' };
    flipped.pop();
    flipped.push(last);
    let tampered = signed.replace(sig, &flipped);
    for url in [&other_sandbox, &other_port, &later, &tampered] {
        let r = get_reply(&format!("{url}/ping"));
        assert_eq!(r.status, 401, "{url}: {}", r.text());
        assert_eq!(r.json()["code"], "SANDBOX::INVALID_SIGNATURE");
    }
    let malformed = get_reply(&format!(
        "{}/v1/sandboxes/{}/signed/44772/NOT-B36/{sig}/ping",
        server.base, a.id
    ));
    assert_eq!(malformed.status, 400, "{}", malformed.text());

    // Bad requests for a signed endpoint name their field.
    for (q, field) in [
        (
            format!("expires={expires}&use_server_proxy=true"),
            "expires",
        ),
        ("expires=".to_string(), "expires"),
        ("expires=12abc".to_string(), "expires"),
        (format!("expires={}", now_secs() - 10), "expires"),
        (format!("expires={}", (now_secs() + 120) * 1000), "expires"),
        ("use_server_proxy=maybe".to_string(), "use_server_proxy"),
    ] {
        let r = get_reply(&server.url(&format!("/v1/sandboxes/{}/endpoints/44772?{q}", a.id)));
        assert_eq!(r.status, 400, "{q}: {}", r.text());
        let v = r.json();
        assert_eq!(v["code"], "SANDBOX::INVALID_PARAMETER", "{v}");
        assert!(
            v["message"].as_str().unwrap_or("").starts_with(field),
            "{q}: {v}"
        );
    }

    // The egress API (what the sandbox may reach) has no signed endpoint.
    let r = get_reply(&server.url(&format!(
        "/v1/sandboxes/{}/endpoints/18080?expires={expires}",
        a.id
    )));
    assert_eq!(r.status, 400, "{}", r.text());

    // A route whose time has passed is refused.
    let soon = now_secs() + 2;
    let (_, v) = server.get(&format!(
        "/v1/sandboxes/{}/endpoints/44772?expires={soon}",
        a.id
    ));
    let short = format!("http://{}", v["endpoint"].as_str().expect("endpoint"));
    assert_eq!(get_reply(&format!("{short}/ping")).status, 200);
    while now_secs() <= soon {
        std::thread::sleep(Duration::from_millis(200));
    }
    let expired = get_reply(&format!("{short}/ping"));
    assert_eq!(expired.status, 401, "{}", expired.text());

    // A deleted sandbox's route leads nowhere.
    assert_eq!(server.delete(&format!("/v1/sandboxes/{}", a.id)), 204);
    assert_eq!(get_reply(&format!("{signed}/ping")).status, 404);
}

#[test]
fn signed_endpoints_survive_a_restart_of_the_server() {
    let state = std::env::temp_dir().join(common::unique("execbox-signed-state"));
    let port = common::free_port();
    let server = common::TestServer::start_on(state.clone(), port, None);
    let sb = server.create(json!({}));
    let id = sb.id.clone();
    let (_, v) = server.get(&format!(
        "/v1/sandboxes/{id}/endpoints/44772?expires={}",
        now_secs() + 600
    ));
    let signed = format!("http://{}", v["endpoint"].as_str().expect("endpoint"));
    assert_eq!(get_reply(&format!("{signed}/ping")).status, 200);
    let key = std::fs::metadata(state.join("endpoint-signing.key")).expect("key kept");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777,
        0o600
    );
    drop(sb);
    let state = server.crash();
    let again = common::TestServer::start_on(state, port, None);
    assert_eq!(get_reply(&format!("{signed}/ping")).status, 200);
    assert_eq!(again.delete(&format!("/v1/sandboxes/{id}")), 204);
}

/// Polls `path` until `done` holds for its JSON body.
fn wait_for(server: &common::TestServer, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, v) = server.get(path);
        if s == 200 && done(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{path}: gave up waiting: {s} {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn diagnostics_keep_the_entrypoint_output_and_the_lifecycle_events() {
    let server = common::TestServer::start_with_config("[policy]\nwarm_pool_size = 0\n");
    let sb = server.create(json!({
        "entrypoint": ["sh", "-c", "echo hello-from-entrypoint; echo oops-on-stderr >&2; exit 3"]
    }));
    let id = &sb.id;
    let logs = wait_for(
        &server,
        &format!("/v1/sandboxes/{id}/diagnostics/logs?scope=container"),
        |v| v["content"].as_str().unwrap_or("").contains("ended"),
    );
    assert_eq!(logs["sandboxId"], id.as_str());
    assert_eq!(logs["kind"], "logs");
    assert_eq!(logs["scope"], "container");
    assert_eq!(logs["delivery"], "inline");
    assert_eq!(logs["contentType"], "text/plain; charset=utf-8");
    assert_eq!(logs["truncated"], false);
    let content = logs["content"].as_str().unwrap_or("");
    assert!(content.contains("hello-from-entrypoint"), "{content}");
    assert!(content.contains("oops-on-stderr"), "{content}");
    assert!(content.contains("exit code 3"), "{content}");
    assert_eq!(logs["contentLength"], content.len());
    // The entrypoint ending does not end the sandbox: its agent and API stay.
    let (_, got) = server.get(&format!("/v1/sandboxes/{id}"));
    assert_eq!(got["status"]["state"], "Running", "{got}");
    assert_eq!(sb.run("echo still-here").out(), "still-here");

    // The older plain-text form, without `scope`, with `tail`.
    let plain = get_reply(&server.url(&format!("/v1/sandboxes/{id}/diagnostics/logs?tail=1")));
    assert_eq!(plain.status, 200);
    assert_eq!(
        plain.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(plain.header("deprecation"), Some("true"));
    assert!(plain.text().contains("exit code 3"), "{}", plain.text());
    assert!(
        !plain.text().contains("hello-from-entrypoint"),
        "{}",
        plain.text()
    );

    // Events: creation, a pause and a resume, a renewal.
    assert_eq!(server.post(&format!("/v1/sandboxes/{id}/pause"), "").0, 202);
    assert_eq!(
        server.post(&format!("/v1/sandboxes/{id}/resume"), "").0,
        202
    );
    let events = wait_for(
        &server,
        &format!("/v1/sandboxes/{id}/diagnostics/events?scope=lifecycle"),
        |_| true,
    );
    assert_eq!(events["kind"], "events");
    let text = events["content"].as_str().unwrap_or("");
    let created = text.find("created from default").expect(text);
    let paused = text.find("Paused").expect(text);
    let resumed = text[paused..].find("Running").expect(text);
    assert!(created < paused && resumed > 0, "{text}");
    let all = wait_for(
        &server,
        &format!("/v1/sandboxes/{id}/diagnostics/logs?scope=all"),
        |_| true,
    );
    let all = all["content"].as_str().unwrap_or("");
    assert!(
        all.contains("Paused") && all.contains("hello-from-entrypoint"),
        "{all}"
    );

    let summary = get_reply(&server.url(&format!("/v1/sandboxes/{id}/diagnostics/summary")));
    assert_eq!(summary.status, 200);
    let s = summary.text();
    for section in [
        "SANDBOX DIAGNOSTICS SUMMARY",
        "INSPECT",
        "EVENTS",
        "LOGS (last 50 lines)",
    ] {
        assert!(s.contains(section), "{section}: {s}");
    }
    assert!(
        s.contains(id.as_str()) && s.contains("hello-from-entrypoint"),
        "{s}"
    );

    // Bad parameters name themselves; other sandboxes are unknown.
    for (q, field) in [
        ("logs?scope=kernel", "scope"),
        ("logs?tail=0", "tail"),
        ("events?limit=501", "limit"),
        ("events?scope=container", "scope"),
        ("summary?event_limit=x", "event_limit"),
    ] {
        let r = get_reply(&server.url(&format!("/v1/sandboxes/{id}/diagnostics/{q}")));
        assert_eq!(r.status, 400, "{q}: {}", r.text());
        assert!(
            r.json()["message"]
                .as_str()
                .unwrap_or("")
                .starts_with(field),
            "{q}"
        );
    }
    let r = get_reply(&server.url("/v1/sandboxes/nope/diagnostics/logs?scope=container"));
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["code"], "DOCKER::SANDBOX_NOT_FOUND");
}

#[test]
fn a_failed_entrypoint_is_in_the_events_and_output_is_bounded() {
    let server = common::TestServer::start_with_config("[policy]\nwarm_pool_size = 0\n");
    let (s, v) = server.create_raw(
        &json!({"image": {"uri": "default"}, "entrypoint": ["/nonexistent"],
                "resourceLimits": {"cpu": "1", "memory": "256Mi"}})
        .to_string(),
    );
    assert_eq!(s, 202, "{v}");
    let failed = v["id"].as_str().expect("id").to_string();
    let events = get_reply(&server.url(&format!("/v1/sandboxes/{failed}/diagnostics/events")));
    assert!(
        events.text().contains("ENTRYPOINT_FAILED"),
        "{}",
        events.text()
    );

    // An entrypoint that writes far more than is kept: the last part, marked truncated.
    let flood = server.create(json!({
        "entrypoint": ["sh", "-c", "yes 0123456789abcdef | head -c 3000000; echo; echo the-end"]
    }));
    let logs = wait_for(
        &server,
        &format!(
            "/v1/sandboxes/{}/diagnostics/logs?scope=container",
            flood.id
        ),
        |v| v["content"].as_str().unwrap_or("").contains("ended"),
    );
    assert_eq!(logs["truncated"], true, "{}", logs["warnings"]);
    let content = logs["content"].as_str().unwrap_or("");
    assert!(content.len() < 300 * 1024, "{}", content.len());
    assert!(content.contains("the-end"), "the last lines are kept");
    assert_eq!(server.delete(&format!("/v1/sandboxes/{failed}")), 204);
}

fn pool_body(name: &str, buffer_min: u32, buffer_max: u32, pool_max: u32) -> String {
    json!({
        "name": name,
        "template": {"spec": {"containers": [{
            "name": "sandbox",
            "image": "default",
            "command": ["tail", "-f", "/dev/null"],
            "env": [{"name": "FROM_POOL", "value": "yes"}],
            "resources": {"limits": {"cpu": "500m", "memory": "256Mi"}}
        }]}},
        "capacitySpec": {"bufferMin": buffer_min, "bufferMax": buffer_max,
                         "poolMin": 0, "poolMax": pool_max}
    })
    .to_string()
}

fn create_from_pool(server: &common::TestServer, pool: &str) -> (u16, Value) {
    server.create_raw(
        &json!({"extensions": {"poolRef": pool}, "timeout": 600,
                "metadata": {"team": "ml"}})
        .to_string(),
    )
}

#[test]
fn pools_keep_idle_sandboxes_and_pool_ref_hands_them_out() {
    let state = std::env::temp_dir().join(common::unique("execbox-pools-state"));
    let port = common::free_port();
    let server = common::TestServer::start_on(state, port, None);
    let (s, v) = server.post("/v1/pools", &pool_body("warm", 1, 1, 2));
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["name"], "warm");
    assert_eq!(v["capacitySpec"]["poolMax"], 2);
    assert_eq!(v["status"]["revision"], "1");
    let ready = wait_for(&server, "/v1/pools/warm", |v| v["status"]["available"] == 1);
    assert_eq!(ready["status"]["allocated"], 0);
    // Idle sandboxes are the server's: not listed as the tenant's.
    let (_, list) = server.get("/v1/sandboxes");
    assert_eq!(list["pagination"]["totalItems"], 0, "{list}");

    let (s, taken) = create_from_pool(&server, "warm");
    assert_eq!(s, 202, "{taken}");
    let id = taken["id"].as_str().expect("id").to_string();
    assert_eq!(taken["metadata"]["team"], "ml", "{taken}");
    assert!(taken["expiresAt"].is_string(), "{taken}");
    let (_, ep) = server.get(&format!("/v1/sandboxes/{id}/endpoints/44772"));
    let sb = common::Sandbox {
        server: &server,
        id: id.clone(),
        endpoint: format!("http://{}", ep["endpoint"].as_str().expect("endpoint")),
        token: ep["headers"]["X-EXECD-ACCESS-TOKEN"]
            .as_str()
            .expect("token")
            .into(),
    };
    assert_eq!(
        sb.run("echo $FROM_POOL").out(),
        "yes",
        "the pool's template applies"
    );
    // The pool refills; the sandbox taken counts as allocated.
    let after = wait_for(&server, "/v1/pools/warm", |v| v["status"]["available"] == 1);
    assert_eq!(after["status"]["allocated"], 1);
    assert_eq!(after["status"]["total"], 2);

    // poolMax = 2: one more is handed out, then the pool says no.
    let (s, second) = create_from_pool(&server, "warm");
    assert_eq!(s, 202, "{second}");
    let (s, refused) = create_from_pool(&server, "warm");
    assert_eq!(s, 429, "{refused}");
    assert_eq!(refused["code"], "SANDBOX::QUOTA_EXCEEDED");

    // Capacity changes; bad ones name the field; names and duplicates are checked.
    let (s, v) = into_put(
        &server,
        "/v1/pools/warm",
        json!({"capacitySpec":
        {"bufferMin": 1, "bufferMax": 1, "poolMin": 0, "poolMax": 4}}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"]["revision"], "2");
    let (s, v) = into_put(
        &server,
        "/v1/pools/warm",
        json!({"capacitySpec":
        {"bufferMin": 3, "bufferMax": 1, "poolMin": 0, "poolMax": 4}}),
    );
    assert_eq!(s, 400, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("capacitySpec"),
        "{v}"
    );
    let (s, v) = server.post("/v1/pools", &pool_body("warm", 0, 1, 1));
    assert_eq!(
        (s, v["code"].as_str()),
        (409, Some("KUBERNETES::POOL_ALREADY_EXISTS")),
        "{v}"
    );
    let (s, v) = server.post("/v1/pools", &pool_body("Bad_Name", 0, 1, 1));
    assert_eq!(s, 400, "{v}");
    assert!(
        v["message"].as_str().unwrap_or("").starts_with("name"),
        "{v}"
    );
    let (s, v) = server.post(
        "/v1/pools",
        &json!({"name": "noimg", "template": {"spec": {"containers": [{"name": "x"}]}},
                "capacitySpec": {"bufferMin": 0, "bufferMax": 1, "poolMin": 0, "poolMax": 1}})
        .to_string(),
    );
    assert_eq!(s, 400, "{v}");
    assert!(
        v["message"].as_str().unwrap_or("").starts_with("template"),
        "{v}"
    );
    let (s, v) = server.get("/v1/pools/nope");
    assert_eq!(
        (s, v["code"].as_str()),
        (404, Some("KUBERNETES::POOL_NOT_FOUND")),
        "{v}"
    );
    let (s, v) = create_from_pool(&server, "nope");
    assert_eq!(s, 400, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("extensions.poolRef"),
        "{v}"
    );
    let (s, v) = server
        .create_raw(&json!({"extensions": {"poolRef": "warm"}, "env": {"A": "1"}}).to_string());
    assert_eq!(s, 400, "{v}");
    assert!(
        v["message"].as_str().unwrap_or("").starts_with("env"),
        "{v}"
    );

    // Definitions outlive the server; idle sandboxes are started again.
    let (_, pools) = server.get("/v1/pools");
    assert_eq!(pools["items"].as_array().map(Vec::len), Some(1), "{pools}");
    let state = server.crash();
    // Another port: the old one may be taken by a concurrent test in between.
    let again = common::TestServer::start_on(state, common::free_port(), None);
    let back = wait_for(&again, "/v1/pools/warm", |v| v["status"]["available"] == 1);
    assert_eq!(back["status"]["allocated"], 2, "{back}");

    // Deleting the pool removes its idle sandboxes; the taken ones stay their callers'.
    assert_eq!(again.delete("/v1/pools/warm"), 204);
    assert_eq!(again.get("/v1/pools/warm").0, 404);
    let (_, list) = again.get("/v1/sandboxes");
    assert_eq!(list["pagination"]["totalItems"], 2, "{list}");
    assert_eq!(
        again.get(&format!("/v1/sandboxes/{id}")).1["status"]["state"],
        "Running"
    );
}

fn into_put(server: &common::TestServer, path: &str, body: Value) -> (u16, Value) {
    common::into_pair(
        ureq::put(&server.url(path))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string()),
    )
}

/// The sandbox's access token opens its data plane from outside; it never reaches what runs
/// inside (where code could use it to call the proxy, egress API included).
#[test]
fn the_access_token_never_enters_the_sandbox() {
    let server = common::TestServer::start_with_config("[policy]\nwarm_pool_size = 0\n");
    let sb = server.create(json!({}));
    // A service inside that answers with the headers it received.
    let script = r#"import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = str(self.headers).encode()
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer(('127.0.0.1', 8123), H).serve_forever()
"#;
    let wrote = sb.run_with(json!({
        "command": format!("cat > /tmp/echo.py <<'EOF'\n{script}EOF"),
    }));
    assert_eq!(wrote.exit_code, Some(0), "{:?}", wrote.events);
    sb.run_with(json!({"command": "exec python3 /tmp/echo.py", "background": true}));
    let url = format!("{}/v1/sandboxes/{}/proxy/8123/", server.base, sb.id);
    let deadline = Instant::now() + Duration::from_secs(20);
    let seen = loop {
        let r = common::reply(
            ureq::get(&url)
                .set("X-EXECD-ACCESS-TOKEN", &sb.token)
                .set("X-Custom", "passes")
                .call(),
        );
        if r.status == 200 {
            break r.text();
        }
        assert!(
            Instant::now() < deadline,
            "service never answered: {}",
            r.text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        seen.to_ascii_lowercase().contains("x-custom: passes"),
        "{seen}"
    );
    assert!(
        !seen.to_ascii_lowercase().contains("x-execd-access-token"),
        "{seen}"
    );
    assert!(!seen.contains(&sb.token), "{seen}");
}

/// A feature execbox does not have is refused by name, never accepted and ignored.
#[test]
fn an_enabled_credential_proxy_is_refused_by_name() {
    let server = common::TestServer::start_with_config("[policy]\nwarm_pool_size = 0\n");
    let (s, v) = server.create_raw(
        &json!({"image": {"uri": "default"}, "entrypoint": ["tail", "-f", "/dev/null"],
                "resourceLimits": {"cpu": "1", "memory": "256Mi"},
                "networkPolicy": {"defaultAction": "deny", "egress": []},
                "credentialProxy": {"enabled": true}})
        .to_string(),
    );
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["code"], "SANDBOX::INVALID_PARAMETER");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("credentialProxy.enabled"),
        "{v}"
    );
    let (_, list) = server.get("/v1/sandboxes");
    assert_eq!(
        list["pagination"]["totalItems"], 0,
        "nothing was started: {list}"
    );
}

/// A body over the size limit is refused in the lifecycle API's envelope, like every other
/// refusal, and nothing is created.
#[test]
fn an_oversized_body_gets_the_envelope() {
    let server = common::TestServer::start_with_config("[policy]\nwarm_pool_size = 0\n");
    let huge = "x".repeat(3 << 20);
    let body = json!({"image": {"uri": "default"}, "entrypoint": ["true"],
                      "resourceLimits": {"cpu": "1", "memory": "256Mi"},
                      "metadata": {"big": huge}})
    .to_string();
    let r = common::reply(
        ureq::post(&server.url("/v1/sandboxes"))
            .set("Content-Type", "application/json")
            .send_string(&body),
    );
    assert_eq!(r.status, 413, "{}", r.text());
    let v = r.json();
    assert_eq!(v["code"], "SANDBOX::INVALID_PARAMETER", "{v}");
    assert!(
        v["message"].as_str().unwrap_or("").starts_with("body"),
        "{v}"
    );
    let (_, list) = server.get("/v1/sandboxes");
    assert_eq!(list["pagination"]["totalItems"], 0, "{list}");
}
