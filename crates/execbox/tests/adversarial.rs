//! The adversarial suite: every finding of the security review, performed from the outside as
//! an attacker would, against a real server with Landlock switched off by configuration (no
//! guarantee may rest on it alone).
//!
//! The attacker controls the code in a sandbox (and so every symlink, directory and swap in
//! it) and holds that sandbox's token. The prize is a file on the host, outside any sandbox,
//! reached through the agent's own descriptors (`/proc/1/fd/N/../..`).
//!
//! The findings about the server's own surface have their tests beside the code they cover:
//! 4 (idle connections) in `connections.rs`; 6 (caps), 7 (owned sandboxes on the data plane)
//! and 10 (client mistakes) in `limits.rs` and `fuzz_requests.rs`; 9 (uid ranges) in
//! `isolation.rs::servers_on_one_host_never_share_a_uid_range`.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{cgroup_dir, into_pair, reply, unique, Reply, Sandbox, TestServer};
use serde_json::{json, Value};

/// Every test's server: Landlock off.
const CONFIG: &str = "landlock = false\n";

/// The agent's descriptor numbers an attacker tries.
const FDS: std::ops::RangeInclusive<u32> = 3..=40;

/// A directory on the host with a secret file in it: nothing inside a sandbox may ever read,
/// change or add to it.
struct HostSecret {
    dir: PathBuf,
    /// In the secret's content only (paths appear in error messages).
    token: String,
}

impl HostSecret {
    fn new() -> Self {
        let token = format!("{:x}", rand_u64());
        let dir = std::env::temp_dir().join(unique("execbox-adv"));
        std::fs::create_dir_all(&dir).expect("secret dir");
        std::fs::write(dir.join("secret"), self_text(&token)).expect("secret");
        HostSecret { dir, token }
    }

    /// A path that climbs from the agent's descriptor `fd` to the secret directory.
    fn via_fd(&self, fd: u32) -> String {
        format!(
            "/proc/1/fd/{fd}/{}{}",
            "../".repeat(16),
            self.dir.display().to_string().trim_start_matches('/')
        )
    }

    /// Fails if `text` carries the secret.
    #[track_caller]
    fn assert_not_in(&self, what: &str, text: &str) {
        assert!(
            !text.contains(&self.token),
            "{what} leaked the host secret: {text}"
        );
    }

    /// Fails unless the directory holds exactly the untouched secret.
    #[track_caller]
    fn assert_intact(&self) {
        let names: Vec<String> = std::fs::read_dir(&self.dir)
            .expect("secret dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            vec!["secret".to_string()],
            "files appeared on the host"
        );
        let secret = self.dir.join("secret");
        assert_eq!(
            std::fs::read_to_string(&secret).expect("secret"),
            self_text(&self.token)
        );
        let md = std::fs::metadata(&secret).expect("secret");
        assert_eq!(
            (
                std::os::unix::fs::MetadataExt::mode(&md) & 0o7777,
                std::os::unix::fs::MetadataExt::uid(&md)
            ),
            (0o644, 0),
            "the host secret's mode or owner changed"
        );
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

fn self_text(token: &str) -> String {
    format!("HOST-SECRET {token}\n")
}

impl Drop for HostSecret {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn server() -> TestServer {
    TestServer::start_with_config(CONFIG)
}

fn sh(sb: &Sandbox<'_>, cmd: &str) -> String {
    let r = sb.run(cmd);
    assert_eq!(r.exit_code, Some(0), "{cmd}: {r:?}");
    r.out()
}

fn get(sb: &Sandbox<'_>, path: &str) -> Reply {
    reply(sb.execd("GET", path).call())
}

fn delete(sb: &Sandbox<'_>, path: &str) -> Reply {
    reply(sb.execd("DELETE", path).call())
}

fn post(sb: &Sandbox<'_>, path: &str, body: Value) -> Reply {
    reply(
        sb.execd("POST", path)
            .set("Content-Type", "application/json")
            .send_string(&body.to_string()),
    )
}

fn upload(sb: &Sandbox<'_>, path: &str, data: &[u8]) -> Reply {
    let boundary = "adversarial-boundary";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"metadata\"\r\n\
             Content-Type: application/json\r\n\r\n{}\r\n--{boundary}\r\n\
             Content-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\n",
            json!({ "path": path })
        )
        .as_bytes(),
    );
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    reply(
        sb.execd("POST", "/files/upload")
            .set(
                "Content-Type",
                &format!("multipart/form-data; boundary={boundary}"),
            )
            .send_bytes(&body),
    )
}

/// Every file route with paths under `base`, as an attacker who wants the host file behind it
/// would call them. Returns the replies.
fn every_file_route(
    sb: &Sandbox<'_>,
    base: &str,
    tag: &str,
    remove_base: bool,
) -> Vec<(String, Reply)> {
    let f = format!("{base}/secret");
    let enc = |p: &str| p.replace('/', "%2F");
    let mut replies = vec![
        (
            "download".into(),
            get(sb, &format!("/files/download?path={}", enc(&f))),
        ),
        (
            "info".into(),
            get(sb, &format!("/files/info?path={}", enc(&f))),
        ),
        (
            "list".into(),
            get(sb, &format!("/directories/list?path={}", enc(base))),
        ),
        (
            "search".into(),
            get(sb, &format!("/files/search?path={}&pattern=*", enc(base))),
        ),
        (
            "replace".into(),
            post(
                sb,
                "/files/replace?verbose=true",
                json!({ &f: {"old": "HOST", "new": "PWNED"} }),
            ),
        ),
        (
            "permissions".into(),
            post(
                sb,
                "/files/permissions",
                json!({ &f: {"mode": 777, "owner": "user"} }),
            ),
        ),
        (
            "mv".into(),
            post(
                sb,
                "/files/mv",
                json!([{"src": &f, "dest": format!("/tmp/stolen-{tag}")}]),
            ),
        ),
        (
            "upload".into(),
            upload(sb, &format!("{base}/planted-{tag}"), b"planted"),
        ),
        (
            "mkdir".into(),
            post(
                sb,
                "/directories",
                json!({ format!("{base}/dir-{tag}"): {"mode": 755} }),
            ),
        ),
        (
            "delete".into(),
            delete(sb, &format!("/files?path={}", enc(&f))),
        ),
    ];
    if remove_base {
        replies.push((
            "rmdir".into(),
            delete(sb, &format!("/directories?path={}", enc(base))),
        ));
    }
    replies
}

/// The id of a background command (from its `init` event).
fn background(sb: &Sandbox<'_>, cmd: &str) -> String {
    let r = sb.run_with(json!({"command": cmd, "background": true}));
    r.events
        .iter()
        .find(|e| e["type"] == "init")
        .and_then(|e| e["text"].as_str())
        .expect("init event")
        .to_string()
}

/// Finding 1: a symlink to the agent's host-side descriptors, moved into the agent's own log
/// directory and read back as a command's log; and the same link tried on every file route.
#[test]
fn finding_1_agent_descriptors_are_reachable_by_no_route() {
    let secret = HostSecret::new();
    let server = server();
    let sb = server.create(json!({}));
    let id = background(&sb, "echo log-line");
    for fd in FDS {
        sh(&sb, &format!("ln -s '{}' /tmp/evil{fd}", secret.via_fd(fd)));
    }
    sh(&sb, &format!("ln -s '{}' /tmp/evil", secret.via_fd(7)));
    // The reported sequence.
    let r = delete(&sb, &format!("/files?path=/run/execbox/{id}.log"));
    assert!((400..500).contains(&r.status), "{}", r.text());
    let r = post(
        &sb,
        "/files/mv",
        json!([{"src": "/tmp/evil", "dest": format!("/run/execbox/{id}.log")}]),
    );
    assert!((400..500).contains(&r.status), "{}", r.text());
    let logs = get(&sb, &format!("/command/{id}/logs"));
    assert_eq!(logs.status, 200);
    secret.assert_not_in("the command log", &logs.text());
    assert!(logs.text().contains("log-line"), "{}", logs.text());
    // Every route, every descriptor.
    for fd in FDS {
        for (route, r) in every_file_route(&sb, &format!("/tmp/evil{fd}"), "attack", true) {
            secret.assert_not_in(&format!("{route} through fd {fd}"), &r.text());
            assert!(
                r.status < 500,
                "{route} through fd {fd}: {} {}",
                r.status,
                r.text()
            );
            // Deleting or listing the link itself (not what it points to) is allowed.
            if !matches!(route.as_str(), "delete" | "rmdir" | "search") {
                assert!(
                    (400..500).contains(&r.status),
                    "{route} through fd {fd} was not refused: {} {}",
                    r.status,
                    r.text()
                );
            }
        }
    }
    // The run API behind isol8 and session-execute: files in, outputs out.
    let (s, v) = isol8_execute(
        &server,
        json!({"request": {"runtime": "bash",
            "cmd": format!("ln -s '{}' /sandbox/evil; echo done", secret.via_fd(7)),
            "outputPaths": ["/sandbox/evil/secret"]}}),
    );
    secret.assert_not_in("isol8 outputPaths", &v.to_string());
    assert!(s < 500, "{v}");
    secret.assert_intact();
    assert_eq!(sh(&sb, "echo alive"), "alive");
}

/// Finding 1 on the other surfaces that take paths: isol8's `/file` and session-execute's
/// `/api/files`, through links to the agent's descriptors.
#[test]
fn finding_1_isol8_and_session_execute_paths_reach_nothing() {
    let secret = HostSecret::new();
    let server = server();
    let session = json!(unique("isol8"));
    let (s, v) = isol8_execute(
        &server,
        json!({"sessionId": session, "request": {"runtime": "bash", "cmd": format!(
            "ln -s '{}' /sandbox/evil && ln -s /proc/1/fd /sandbox/fds && echo ok", secret.via_fd(7))}}),
    );
    assert_eq!(s, 200, "{v}");
    let sid = session.as_str().expect("id");
    for path in [
        "/sandbox/evil/secret",
        "/sandbox/fds/7",
        "/sandbox/fds/5/cgroup.procs",
    ] {
        let (s, v) = server.get(&format!("/file?sessionId={sid}&path={path}"));
        secret.assert_not_in("isol8 GET /file", &v.to_string());
        assert!((400..500).contains(&s), "GET /file {path}: {s} {v}");
    }
    for path in ["/sandbox/evil/planted", "/sandbox/fds/7/planted"] {
        let (s, v) = into_pair(
            ureq::post(&server.url("/file"))
                .set("Content-Type", "application/json")
                .send_string(
                    &json!({"sessionId": sid, "path": path, "content": "cGxhbnRlZA=="}).to_string(),
                ),
        );
        assert!((400..500).contains(&s), "POST /file {path}: {s} {v}");
    }
    // Session-execute: its files are written beneath its roots, and read back listed.
    let api = |method: &str, path: &str, body: Option<Value>| {
        let req = ureq::request(method, &server.url(path)).set("Content-Type", "application/json");
        into_pair(match body {
            Some(b) => req.send_string(&b.to_string()),
            None => req.call(),
        })
    };
    let (s, v) = api(
        "POST",
        "/api/execute",
        Some(json!({"sessionId": "se", "command": format!(
            "ln -s '{}' /workspace/evil && echo ok", secret.via_fd(7))})),
    );
    assert_eq!(s, 200, "{v}");
    let (s, v) = api(
        "POST",
        "/api/files",
        Some(
            json!({"sessionId": "se", "files": [{"path": "/workspace/evil/planted", "content": "x"}]}),
        ),
    );
    assert!((400..500).contains(&s), "POST /api/files: {s} {v}");
    let (s, v) = api("GET", "/api/files?sessionId=se&path=/workspace/evil", None);
    secret.assert_not_in("GET /api/files", &v.to_string());
    assert!(s < 500, "{s} {v}");
    secret.assert_intact();
}

fn isol8_execute(server: &TestServer, body: Value) -> (u16, Value) {
    into_pair(
        ureq::post(&server.url("/execute"))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string()),
    )
}

/// Finding 2: a working directory on the agent's host-side descriptors, on every route that
/// takes one; and a directory the sandbox user may not enter, which the agent (root) could.
#[test]
fn finding_2_working_directories_are_entered_as_the_user_and_never_through_magic_links() {
    let secret = HostSecret::new();
    let server = server();
    let sb = server.create(json!({}));
    sh(&sb, &format!("ln -s '{}' /tmp/cwdlink", secret.via_fd(7)));
    // Magic links and a symlink to one: refused everywhere. (A path that climbs out of one
    // with `..` is normalised first, as upstream does, to a path inside the sandbox, which the
    // routes that create their working directory then create there: checked below.)
    let cwds: Vec<String> = FDS
        .map(|fd| format!("/proc/1/fd/{fd}"))
        .chain(FDS.map(|fd| format!("/proc/1/fd/{fd}/sub")))
        .chain([
            "/tmp/cwdlink".to_string(),
            "/tmp/cwdlink/sub".to_string(),
            "/proc/self/cwd".to_string(),
        ])
        .collect();
    for cwd in &cwds {
        for (route, r) in [
            (
                "command",
                post(&sb, "/command", json!({"command": "pwd; ls", "cwd": cwd})),
            ),
            (
                "command as uid 0",
                post(
                    &sb,
                    "/command",
                    json!({"command": "pwd; ls", "cwd": cwd, "uid": 0}),
                ),
            ),
            ("bash session", post(&sb, "/session", json!({"cwd": cwd}))),
            (
                "code context",
                post(
                    &sb,
                    "/code/context",
                    json!({"language": "python", "cwd": cwd}),
                ),
            ),
            (
                "leap0 context",
                post(&sb, "/contexts", json!({"language": "python", "cwd": cwd})),
            ),
            ("pty", post(&sb, "/pty", json!({"cwd": cwd}))),
        ] {
            secret.assert_not_in(route, &r.text());
            assert!(
                (400..500).contains(&r.status),
                "{route} with cwd {cwd} was not refused: {} {}",
                r.status,
                r.text()
            );
        }
    }
    for fd in FDS {
        let cwd = secret.via_fd(fd);
        let r = post(&sb, "/session", json!({ "cwd": &cwd }));
        secret.assert_not_in("bash session", &r.text());
        assert!(r.status < 500, "{}", r.text());
    }
    secret.assert_intact();
    // A directory the agent could enter but the sandbox user cannot: the kernel decides, as
    // the user, and the request is refused naming cwd.
    let r =
        sb.run_with(json!({"command": "mkdir -p /tmp/locked && chmod 700 /tmp/locked", "uid": 0}));
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    let r = post(
        &sb,
        "/command",
        json!({"command": "pwd", "cwd": "/tmp/locked"}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("cwd"), "{}", r.text());
    let r = post(
        &sb,
        "/command",
        json!({"command": "pwd", "cwd": "/tmp/locked", "uid": 0}),
    );
    assert_eq!(
        r.status,
        200,
        "root may enter its own directory: {}",
        r.text()
    );
    // The same for a code context and a session: the user's mistake, a 400, never a 500.
    for (route, body) in [
        (
            "/code/context",
            json!({"language": "python", "cwd": "/tmp/locked"}),
        ),
        (
            "/contexts",
            json!({"language": "python", "cwd": "/tmp/locked"}),
        ),
        ("/session", json!({"cwd": "/tmp/locked"})),
    ] {
        let r = post(&sb, route, body);
        assert_eq!(r.status, 400, "{route}: {}", r.text());
    }
    secret.assert_intact();
}

/// The in-sandbox swapper: exchanges `a` and `b` with `renameat2(RENAME_EXCHANGE)` as fast as
/// it can for `secs` seconds.
fn swapper(a: &str, b: &str, secs: u32) -> String {
    format!(
        "import ctypes, time\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         end = time.time() + {secs}\n\
         n = 0\n\
         while time.time() < end:\n\
         \x20   libc.renameat2(-100, b'{a}', -100, b'{b}', 2)\n\
         \x20   n += 1\n\
         open('/tmp/swaps', 'w').write(str(n))\n"
    )
}

/// Finding 3 and the racing variants: while a loop inside the sandbox swaps a real directory
/// with a symlink to the agent's descriptors, every path-taking route is called for more than
/// five seconds; and isol8's outputPaths in a session, whose `/sandbox/out` is swapped the same
/// way.
#[test]
fn finding_3_races_with_a_concurrent_swapper_reach_nothing() {
    let secret = HostSecret::new();
    let server = server();
    let sb = server.create(json!({}));
    sh(
        &sb,
        &format!(
            "mkdir -p /home/user/race/real && echo inside > /home/user/race/real/secret && \
             ln -s '{}' /home/user/race/link",
            secret.via_fd(7)
        ),
    );
    upload(
        &sb,
        "/home/user/swap.py",
        swapper("/home/user/race/real", "/home/user/race/link", 9).as_bytes(),
    )
    .assert_empty_ok();
    background(&sb, "python3 /home/user/swap.py");
    let started = Instant::now();
    let mut calls = 0;
    while started.elapsed() < Duration::from_secs(6) {
        // Removing the raced directory itself would end the race.
        for (route, r) in every_file_route(&sb, "/home/user/race/real", "race", false) {
            secret.assert_not_in(&format!("{route} under race"), &r.text());
            assert!(
                r.status < 500,
                "{route} under race: {} {}",
                r.status,
                r.text()
            );
            calls += 1;
        }
        let r = post(
            &sb,
            "/command",
            json!({"command": "ls ../../../../", "cwd": "/home/user/race/real"}),
        );
        secret.assert_not_in("command cwd under race", &r.text());
        // Put back what the routes moved or removed, for the next round.
        let _ = sb
            .run("mkdir -p /home/user/race/real; echo inside > /home/user/race/real/secret; true");
    }
    assert!(calls > 100, "only {calls} calls in the race window");
    std::thread::sleep(Duration::from_secs(4));
    let swaps: u64 = sh(&sb, "cat /tmp/swaps").parse().expect("swap count");
    assert!(swaps > 1000, "the swapper barely ran: {swaps}");

    // isol8 outputPaths, in a session whose /sandbox/out is swapped with a symlink.
    let session = json!(unique("race"));
    let (s, v) = isol8_execute(
        &server,
        json!({"sessionId": session, "request": {"runtime": "bash", "cmd": format!(
            "echo inside > /sandbox/out && ln -s '{}/secret' /sandbox/link && \
             printf '%s' \"$SWAP\" > /tmp/swap.py && (nohup python3 /tmp/swap.py >/dev/null 2>&1 &) && echo started",
            secret.via_fd(7)),
            "env": {"SWAP": swapper("/sandbox/out", "/sandbox/link", 8)}}}),
    );
    assert_eq!(s, 200, "{v}");
    let started = Instant::now();
    let mut outputs = 0;
    while started.elapsed() < Duration::from_secs(6) {
        let (s, v) = isol8_execute(
            &server,
            json!({"sessionId": session, "request": {"runtime": "bash", "cmd": "true",
                "outputPaths": ["/sandbox/out"]}}),
        );
        secret.assert_not_in("isol8 outputPaths under race", &v.to_string());
        assert!(s < 500, "{v}");
        if v["files"]["/sandbox/out"].is_string() {
            outputs += 1;
        }
    }
    assert!(outputs > 0, "the real output file was never returned");
    secret.assert_intact();
}

/// Finding 5: the sandbox's own writes, and an upload bigger than its storage, never kill the
/// agent; and an agent killed from the host shows as Failed at once, with the envelope on the
/// data plane.
#[test]
fn finding_5_full_storage_leaves_the_agent_alive_and_a_dead_agent_is_reported() {
    let server = server();
    let sb =
        server.create(json!({"resourceLimits": {"cpu": "1", "memory": "256Mi", "disk": "64Mi"}}));
    // Fill every writable mount, as the user and as uid 0.
    for mount in ["/tmp", "/home/user", "/workspace", "/sandbox", "/dev/shm"] {
        for uid in [1000, 0] {
            let r = sb.run_with(json!({"uid": uid, "command":
                format!("dd if=/dev/zero of={mount}/fill-{uid} bs=1M count=4096 2>&1 | tail -1")}));
            assert!(r.exit_code.is_some(), "{r:?}");
            assert_eq!(sh(&sb, "echo ok"), "ok", "after filling {mount} as {uid}");
        }
    }
    let r = get(&sb, "/files/info?path=/tmp/fill-1000");
    assert_eq!(r.status, 200, "{}", r.text());
    // An upload larger than the storage: a 4xx naming the limit, nothing left behind.
    let r = sb.run_with(json!({"uid": 0, "command": "rm -f /tmp/fill-*"}));
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    let big = vec![7u8; 80 << 20];
    let r = upload(&sb, "/tmp/big.bin", &big);
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(
        r.text().contains("67108864"),
        "the limit is named: {}",
        r.text()
    );
    assert_eq!(sh(&sb, "ls -A /tmp | grep -v '^fill' || true"), "");
    assert_eq!(sh(&sb, "echo ok"), "ok");

    // Killed from the host: Failed within a second, with a reason and a message.
    let (_, rec) = server.get(&format!("/v1/sandboxes/{}", sb.id));
    assert_eq!(rec["status"]["state"], "Running", "{rec}");
    let agent = agent_pid(&server, &sb.id);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the agent");
    let killed = Instant::now();
    let state = loop {
        let (_, v) = server.get(&format!("/v1/sandboxes/{}", sb.id));
        if v["status"]["state"] == "Failed" || killed.elapsed() > Duration::from_secs(5) {
            break v;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = killed.elapsed();
    assert_eq!(state["status"]["state"], "Failed", "{state}");
    assert!(took <= Duration::from_secs(1), "Failed only after {took:?}");
    assert_eq!(state["status"]["reason"], "AGENT_EXITED", "{state}");
    assert!(
        state["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("agent")),
        "{state}"
    );
    let r = get(&sb, "/ping");
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(
        r.json()["code"],
        "DOCKER::SANDBOX_NOT_RUNNING",
        "{}",
        r.text()
    );
    // Its processes and cgroups are released (just after the state changes); deleting it still
    // works.
    let released = Instant::now();
    while cgroup_dir("pids", &sb.id).exists() && released.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!cgroup_dir("pids", &sb.id).exists(), "cgroup left behind");
    assert_eq!(server.delete(&format!("/v1/sandboxes/{}", sb.id)), 204);
}

fn agent_pid(server: &TestServer, id: &str) -> i32 {
    let rec: Value = serde_json::from_slice(
        &std::fs::read(
            server
                .state_dir
                .join("sandboxes")
                .join(id)
                .join("record.json"),
        )
        .expect("record"),
    )
    .expect("record json");
    rec["placement"]["pid"].as_i64().expect("pid") as i32
}

/// Finding 8: processes inside the sandbox, root of its user namespace included, cannot stop
/// the agent with any signal.
#[test]
fn finding_8_no_signal_from_inside_stops_the_agent() {
    let server = server();
    let sb = server.create(json!({}));
    for uid in [0, 1000] {
        let r = sb.run_with(json!({"uid": uid, "command":
            "for s in TERM INT HUP QUIT USR1 USR2 ALRM PIPE CHLD STOP KILL; do kill -s $s 1; done; \
             kill -9 -1; echo sent"}));
        assert!(r.exit_code.is_some(), "{r:?}");
        assert_eq!(
            sh(&sb, "echo alive"),
            "alive",
            "after signals from uid {uid}"
        );
    }
    let (_, v) = server.get(&format!("/v1/sandboxes/{}", sb.id));
    assert_eq!(v["status"]["state"], "Running", "{v}");
}

/// Finding 11: the mount table shows no host path, and the host-wide /proc files that tell the
/// host apart (its boot, its command line, its memory and load) are the sandbox's own.
#[test]
fn finding_11_mount_table_and_proc_reveal_no_host_identity() {
    let server = server();
    let sb = server.create(json!({"resourceLimits": {"cpu": "1", "memory": "300Mi"}}));
    let mountinfo = sh(&sb, "cat /proc/self/mountinfo");
    let state = server.state_dir.display().to_string();
    assert!(
        !mountinfo.contains(&state),
        "the state directory shows: {mountinfo}"
    );
    assert!(!mountinfo.contains("execbox-test-state"), "{mountinfo}");
    let host = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let inside = sh(&sb, "cat /proc/sys/kernel/random/boot_id");
    assert_ne!(
        inside.trim(),
        host("/proc/sys/kernel/random/boot_id").trim()
    );
    assert_eq!(
        sh(&sb, "cat /proc/sys/kernel/random/boot_id"),
        inside,
        "stable within a sandbox"
    );
    let cmdline = sh(&sb, "cat /proc/cmdline");
    assert_ne!(cmdline.trim(), host("/proc/cmdline").trim());
    let total = sh(&sb, "awk '/^MemTotal/ {print $2}' /proc/meminfo");
    assert_eq!(
        total,
        (300u64 * 1024).to_string(),
        "MemTotal is the sandbox's limit"
    );
    assert_eq!(sh(&sb, "cut -d' ' -f1-3 /proc/loadavg"), "0.00 0.00 0.00");
    // Read-only, even for uid 0.
    let r = sb.run_with(json!({"uid": 0, "command": "echo x > /proc/meminfo"}));
    assert_ne!(r.exit_code, Some(0), "{r:?}");
}
