//! One policy for every surface, over real HTTP: the `[policy]` maxima (and a tenant's
//! overrides) bound the lifecycle API as they bound isol8; limits below what a sandbox can live
//! with, and sizes the kernel refuses, are the client's 4xx naming the field, never a 500;
//! sandboxes of the other surfaces are not on the `/v1` data plane; `execbox run` is never
//! unbounded.

mod common;

use common::*;
use serde_json::{json, Value};

const CONFIG: &str = r#"
api_keys = ["key-default"]

[tenants]
acme = ["key-acme"]

[policy]
max_memory_bytes = 1073741824
max_cpus = 1.0
max_pids = 200
max_disk_bytes = 268435456
warm_pool_size = 1

[policy.tenants.acme]
max_memory_bytes = 268435456
max_lifetime_secs = 600
"#;

fn lifecycle(
    server: &TestServer,
    method: &str,
    path: &str,
    key: &str,
    body: &Value,
) -> (u16, Value) {
    into_pair(
        ureq::request(method, &server.url(path))
            .set("OPEN-SANDBOX-API-KEY", key)
            .set("Content-Type", "application/json")
            .send_string(&body.to_string()),
    )
}

fn create_body(limits: Value) -> Value {
    json!({"image": {"uri": "default"}, "entrypoint": ["tail", "-f", "/dev/null"],
           "resourceLimits": limits})
}

/// A 400 in the lifecycle envelope whose message names `field`.
#[track_caller]
fn assert_invalid(reply: (u16, Value), field: &str) {
    let (s, v) = reply;
    assert_eq!(s, 400, "{field}: {v}");
    assert_eq!(v["code"], "SANDBOX::INVALID_PARAMETER", "{v}");
    let msg = v["message"].as_str().unwrap_or("");
    assert!(msg.starts_with(field), "{field} not named first in {msg:?}");
}

fn cgroup_value(controller: &str, id: &str, file: &str) -> Option<u64> {
    std::fs::read_to_string(cgroup_dir(controller, id).join(file))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[test]
fn the_policy_and_the_tenants_overrides_bound_the_lifecycle_api() {
    let server =
        TestServer::start_with_config(CONFIG).cleaning_up_for(&["key-default", "key-acme"]);
    let create = |key: &str, limits: Value| {
        lifecycle(&server, "POST", "/v1/sandboxes", key, &create_body(limits))
    };
    // The issue's request: every value far above the maxima.
    let huge = json!({"memory": "8Ei", "pids": "4194304", "disk": "8Ei"});
    let (s, v) = create("key-default", huge);
    assert_eq!(s, 400, "{v}");
    for (limits, field) in [
        (json!({"memory": "8Ei"}), "resourceLimits.memory"),
        (json!({"memory": "2Gi"}), "resourceLimits.memory"),
        (json!({"pids": "4194304"}), "resourceLimits.pids"),
        (json!({"pids": "201"}), "resourceLimits.pids"),
        (json!({"disk": "8Ei"}), "resourceLimits.disk"),
        (
            json!({"ephemeral-storage": "1Gi"}),
            "resourceLimits.ephemeral-storage",
        ),
        (json!({"cpu": "2"}), "resourceLimits.cpu"),
        (json!({"cpu": "1001m"}), "resourceLimits.cpu"),
    ] {
        assert_invalid(create("key-default", limits), field);
    }
    let (_, v) = create("key-default", json!({"memory": "2Gi"}));
    assert_eq!(
        v["message"], "resourceLimits.memory exceeds server maximum 1g",
        "the maximum is named"
    );
    // acme's override is lower than the server's maximum, and holds for acme only.
    assert_invalid(
        create("key-acme", json!({"memory": "512Mi"})),
        "resourceLimits.memory",
    );
    let (s, v) = create("key-default", json!({"memory": "512Mi"}));
    assert_eq!(s, 202, "{v}");
    // What is not asked for is bounded too: the maximum, never unlimited.
    let (s, v) = create("key-default", json!({}));
    assert_eq!(s, 202, "{v}");
    let id = v["id"].as_str().expect("id");
    // The memory asked for bounds the workload (each execution, as `/metrics` reports it); the
    // sandbox's cgroup also has room for its storage and its agent.
    let (s, m) = lifecycle(
        &server,
        "GET",
        &format!("/v1/sandboxes/{id}/proxy/44772/metrics"),
        "key-default",
        &Value::Null,
    );
    assert_eq!(s, 200, "{m}");
    assert_eq!(m["mem_total_mib"], json!(1024.0), "{m}");
    assert!(
        cgroup_value("memory", id, "memory.limit_in_bytes").is_some_and(|v| v > 1 << 30),
        "the sandbox cgroup is bounded"
    );
    assert_eq!(cgroup_value("cpu", id, "cpu.cfs_quota_us"), Some(100_000));
    // acme's lifetime: `timeout` above it is refused, none means it, renewing cannot pass it.
    let mut body = create_body(json!({"memory": "128Mi"}));
    body["timeout"] = json!(3600);
    assert_invalid(
        lifecycle(&server, "POST", "/v1/sandboxes", "key-acme", &body),
        "timeout",
    );
    let (s, v) = create("key-acme", json!({"memory": "128Mi"}));
    assert_eq!(s, 202, "{v}");
    let acme_id = v["id"].as_str().expect("id").to_string();
    let created = time::OffsetDateTime::parse(
        v["createdAt"].as_str().expect("createdAt"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("createdAt");
    let expires = time::OffsetDateTime::parse(
        v["expiresAt"]
            .as_str()
            .expect("a sandbox of acme always expires"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("expiresAt");
    assert_eq!((expires - created).whole_seconds(), 600);
    let fmt = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .expect("format")
    };
    let renew = format!("/v1/sandboxes/{acme_id}/renew-expiration");
    let (s, v) = lifecycle(
        &server,
        "POST",
        &renew,
        "key-acme",
        &json!({"expiresAt": fmt(created + time::Duration::seconds(1200))}),
    );
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["code"], "DOCKER::INVALID_EXPIRATION", "{v}");
    assert!(v["message"].as_str().unwrap_or("").starts_with("expiresAt"));
    // The default tenant has no lifetime bound: no timeout, no expiry.
    let (s, v) = create("key-default", json!({"memory": "128Mi"}));
    assert_eq!(s, 202, "{v}");
    assert!(v.get("expiresAt").is_none_or(Value::is_null), "{v}");
}

#[test]
fn limits_a_sandbox_cannot_live_with_are_400s_naming_the_field() {
    let server = TestServer::start();
    for (limits, field) in [
        (json!({"memory": "1"}), "resourceLimits.memory"),
        (json!({"memory": "1Mi"}), "resourceLimits.memory"),
        (json!({"cpu": "1m"}), "resourceLimits.cpu"),
        (json!({"cpu": "9m"}), "resourceLimits.cpu"),
        (json!({"cpu": "10m"}), "resourceLimits.cpu"),
        (json!({"cpu": "99m"}), "resourceLimits.cpu"),
        (json!({"pids": "1"}), "resourceLimits.pids"),
        (json!({"disk": "1"}), "resourceLimits.disk"),
    ] {
        assert_invalid(server.create_raw(&create_body(limits).to_string()), field);
    }
    // An entrypoint or environment larger than one exec takes (E2BIG at spawn).
    let mut body = create_body(json!({"cpu": "1"}));
    body["entrypoint"] = json!(["echo", "x".repeat(200_000)]);
    assert_invalid(server.create_raw(&body.to_string()), "entrypoint");
    let mut body = create_body(json!({"cpu": "1"}));
    body["env"] = json!({"BIG": "x".repeat(200_000)});
    assert_invalid(server.create_raw(&body.to_string()), "env");
    // The smallest accepted sandbox starts and runs.
    let sbx =
        server.create(json!({"resourceLimits": {"memory": "32Mi", "cpu": "100m", "pids": "16"}}));
    assert_eq!(sbx.run("echo small").out(), "small");
}

fn post(server: &TestServer, path: &str, key: Option<&str>, body: &Value) -> (u16, Value) {
    let mut req = ureq::post(&server.url(path)).set("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    into_pair(req.send_string(&body.to_string()))
}

#[test]
fn isol8_and_session_execute_answer_client_mistakes_with_4xx() {
    let server = TestServer::start();
    let run = |options: Value| {
        post(
            &server,
            "/execute",
            None,
            &json!({"request": {"runtime": "bash", "cmd": "echo ok"}, "options": options}),
        )
    };
    for (options, field) in [
        (json!({"memoryLimit": "1"}), "options.memoryLimit"),
        (json!({"cpuLimit": 0.001}), "options.cpuLimit"),
        (json!({"pidsLimit": 1}), "options.pidsLimit"),
        (json!({"tmpSize": "1"}), "options.tmpSize"),
    ] {
        let (s, v) = run(options);
        assert_eq!(s, 400, "{v}");
        assert!(v["error"].as_str().unwrap_or("").starts_with(field), "{v}");
    }
    let long_name = format!("/sandbox/{}", "a".repeat(5000));
    let (s, v) = post(
        &server,
        "/execute",
        None,
        &json!({"request": {"runtime": "bash", "cmd": "true", "files": {long_name.clone(): "x"}}}),
    );
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .starts_with("request.files"),
        "{v}"
    );
    let (s, v) = post(
        &server,
        "/execute",
        None,
        &json!({"request": {"runtime": "bash", "cmd": "true", "env": {"BIG": "x".repeat(200_000)}}}),
    );
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .starts_with("request.env.BIG"),
        "{v}"
    );
    // A program larger than one exec argument runs from a file instead.
    let big = format!("# {}\necho big", "x".repeat(200_000));
    for request in [
        json!({"runtime": "bash", "cmd": big}),
        json!({"runtime": "bash", "code": big}),
    ] {
        let (s, v) = post(&server, "/execute", None, &json!({ "request": request }));
        assert_eq!((s, v["stdout"].as_str()), (200, Some("big")), "{v}");
    }

    // Session-execute: the issue's 5,000-character file name, a command and an environment
    // larger than one exec.
    let (s, v) = post(
        &server,
        "/api/files",
        None,
        &json!({"sessionId": "s1", "files": [{"path": "a".repeat(5000), "content": "x"}]}),
    );
    assert_eq!(
        (s, v["code"].as_str()),
        (400, Some("INVALID_REQUEST")),
        "{v}"
    );
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .starts_with("files[0].path"),
        "{v}"
    );
    let (s, v) = post(
        &server,
        "/api/execute",
        None,
        &json!({"sessionId": "s1", "command": format!("echo {}", "x".repeat(200_000))}),
    );
    assert_eq!(
        (s, v["code"].as_str()),
        (400, Some("INVALID_REQUEST")),
        "{v}"
    );
    assert!(
        v["error"].as_str().unwrap_or("").starts_with("command"),
        "{v}"
    );
    let (s, v) = post(
        &server,
        "/api/execute",
        None,
        &json!({"sessionId": "s1", "command": "true", "env": {"BIG": "x".repeat(200_000)}}),
    );
    assert_eq!(
        (s, v["code"].as_str()),
        (400, Some("INVALID_REQUEST")),
        "{v}"
    );
    assert!(
        v["error"].as_str().unwrap_or("").starts_with("env.BIG"),
        "{v}"
    );
    let (s, v) = into_pair(
        ureq::get(&server.url(&format!(
            "/api/files?sessionId=s1&path={}",
            "b".repeat(5000)
        )))
        .call(),
    );
    assert_eq!(s, 400, "{v}");
    let (s, v) = post(
        &server,
        "/api/execute",
        None,
        &json!({"sessionId": "s1", "command": "echo fine"}),
    );
    assert_eq!((s, v["stdout"].as_str()), (200, Some("fine\n")), "{v}");
}

/// Every record of the state directory with an owner (pool, isol8, session-execute), its
/// token opened with the state directory's secrets key as the server does.
fn owned_sandboxes(server: &TestServer) -> Vec<(String, String, String)> {
    use execbox_server::secrets::SecretBox;
    let secrets = SecretBox::probe(&server.state_dir, None)
        .expect("the secrets key")
        .expect("a secrets key in the state directory");
    execbox_server::registry::Registry::load(&server.state_dir, std::sync::Arc::new(secrets))
        .expect("records")
        .all()
        .into_iter()
        .filter_map(|rec| Some((rec.id, rec.token, rec.owner?)))
        .collect()
}

#[test]
fn sandboxes_of_other_surfaces_are_not_on_the_data_plane() {
    let server = TestServer::start_with_config(CONFIG).cleaning_up_for(&["key-default"]);
    // An isol8 session, a session-execute session and the warm pool.
    let (s, v) = post(
        &server,
        "/execute",
        Some("key-default"),
        &json!({"request": {"runtime": "bash", "cmd": "echo hi"}, "sessionId": "mine"}),
    );
    assert_eq!(s, 200, "{v}");
    let container = v["containerId"].as_str().expect("containerId").to_string();
    let (s, v) = post(
        &server,
        "/api/execute",
        Some("key-default"),
        &json!({"sessionId": "mine", "command": "echo hi"}),
    );
    assert_eq!(s, 200, "{v}");
    let owned = owned_sandboxes(&server);
    let owners: Vec<&str> = owned.iter().map(|(_, _, o)| o.as_str()).collect();
    assert!(
        owners.contains(&"isol8") && owners.contains(&"session-exec"),
        "{owners:?}"
    );
    assert!(owned.iter().any(|(id, _, _)| *id == container));
    let ping = |id: &str, header: (&str, &str)| {
        into_pair(
            ureq::get(&server.url(&format!("/v1/sandboxes/{id}/proxy/44772/ping")))
                .set(header.0, header.1)
                .call(),
        )
    };
    let (s, unknown) = ping("no-such-sandbox", ("OPEN-SANDBOX-API-KEY", "key-default"));
    assert_eq!(s, 404);
    for (id, token, owner) in &owned {
        for header in [
            ("OPEN-SANDBOX-API-KEY", "key-default"),
            ("Authorization", "Bearer key-default"),
            ("X-EXECD-ACCESS-TOKEN", token.as_str()),
        ] {
            let (s, v) = ping(id, header);
            assert_eq!(s, 404, "{owner} sandbox {id} with {}: {v}", header.0);
            assert_eq!(v["code"], unknown["code"], "{v}");
            assert_eq!(
                v["message"].as_str().map(|m| m.replace(id.as_str(), "ID")),
                unknown["message"]
                    .as_str()
                    .map(|m| m.replace("no-such-sandbox", "ID")),
                "exactly like an unknown sandbox"
            );
        }
    }
    // A lifecycle sandbox of the same tenant still opens with the key.
    let (s, v) = lifecycle(
        &server,
        "POST",
        "/v1/sandboxes",
        "key-default",
        &create_body(json!({"memory": "128Mi"})),
    );
    assert_eq!(s, 202, "{v}");
    let id = v["id"].as_str().expect("id");
    let (s, _) = ping(id, ("OPEN-SANDBOX-API-KEY", "key-default"));
    assert_eq!(s, 200);
    let (s, _) = lifecycle(
        &server,
        "DELETE",
        &format!("/v1/sandboxes/{id}"),
        "key-default",
        &json!({}),
    );
    assert_eq!(s, 204);
}

#[test]
fn execbox_run_has_default_limits_shown_in_help() {
    let exe = env!("CARGO_BIN_EXE_execbox");
    let help = std::process::Command::new(exe)
        .args(["run", "--help"])
        .output()
        .expect("help");
    let help = String::from_utf8_lossy(&help.stdout);
    for default in [
        "--memory <MEMORY>",
        "[default: 512Mi]",
        "--cpus <CPUS>",
        "[default: 1]",
        "--pids <PIDS>",
        "[default: 256]",
        "--timeout <TIMEOUT>",
        "[default: 60]",
    ] {
        assert!(help.contains(default), "{default} not in:\n{help}");
    }
    // Without --memory the run is bounded: 768 MiB does not fit the default 512Mi.
    let out = std::process::Command::new(exe)
        .args([
            "run",
            "--lang",
            "python",
            "x = bytearray(768 << 20); print(len(x))",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(137), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    // A value no sandbox can live with is refused before anything starts.
    let out = std::process::Command::new(exe)
        .args(["run", "--memory", "1", "--lang", "bash", "true"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--memory: must be at least"),
        "{out:?}"
    );
    let out = std::process::Command::new(exe)
        .args([
            "run", "--cpus", "250m", "--pids", "64", "--lang", "bash", "echo ok",
        ])
        .output()
        .expect("run");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
}

#[test]
fn execd_and_leap0_answer_client_mistakes_with_4xx() {
    let server = TestServer::start();
    let sbx = server.create(json!({}));
    let send = |method: &str, path: &str, body: &str| {
        reply(
            sbx.execd(method, path)
                .set("Content-Type", "application/json")
                .send_string(body),
        )
    };
    // A session's cwd that cannot be made: read-only, too long, not a name.
    for cwd in [
        "/usr/execbox-nope".to_string(),
        format!("/workspace/{}", "a".repeat(300)),
    ] {
        let r = send("POST", "/session", &json!({ "cwd": cwd }).to_string());
        r.assert_error(400, "INVALID_REQUEST_BODY");
    }
    let r = send(
        "POST",
        "/code/context",
        &json!({"language": "python", "cwd": "/workspace/a\u{0}b"}).to_string(),
    );
    r.assert_error(400, "INVALID_REQUEST_BODY");
    // Leap0: an environment no process can have.
    let r = send(
        "POST",
        "/execute",
        &json!({"code": "1", "env_vars": {"A": "x\u{0}"}}).to_string(),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    // A body sent to a route that takes none is answered by that route, not a proxy failure.
    let big = "x".repeat(1 << 20);
    let r = send("PUT", "/metrics", &big);
    assert_eq!(r.status, 404, "{}", r.text());
    let r = send("GET", "/ping", &big);
    assert_eq!(r.status, 200, "{}", r.text());

    // Session-execute through the run API: a PATH that hides bash, a file where a directory is.
    let (s, v) = post(
        &server,
        "/api/execute",
        None,
        &json!({"sessionId": "m", "command": "true", "env": {"PATH": "/nonexistent"}}),
    );
    assert_eq!(
        (s, v["code"].as_str()),
        (400, Some("INVALID_REQUEST")),
        "{v}"
    );
    let (s, v) = post(
        &server,
        "/api/files",
        None,
        &json!({"sessionId": "m", "files": [{"path": "d/x", "content": "1"}]}),
    );
    assert_eq!(s, 200, "{v}");
    let (s, v) = post(
        &server,
        "/api/files",
        None,
        &json!({"sessionId": "m", "files": [{"path": "d", "content": "1"}]}),
    );
    assert_eq!(
        (s, v["code"].as_str()),
        (400, Some("INVALID_REQUEST")),
        "{v}"
    );
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .starts_with("files[0].path"),
        "{v}"
    );
}
