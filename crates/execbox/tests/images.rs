//! Sandboxes made from OCI images pulled from a real registry (Debian's `docker-registry` on
//! loopback), images built here with `umoci` from a static busybox and pushed with `skopeo`:
//! the root is the image's (its files, environment, working directory, user database), layers
//! are pulled once and shared read-only, writes stay in the sandbox, and bad references are
//! the client's errors with nothing of a failed pull left behind.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{free_port, TestServer};
use serde_json::json;

/// The registry, its image and what keeps it running.
struct Registry {
    /// `127.0.0.1:<port>`.
    addr: String,
    /// Its log: one line per request.
    log: PathBuf,
    /// A file of the host that `test/hostile:1`'s `/etc/passwd` links to.
    host_secret: PathBuf,
    /// Keeps the registry's wrapper alive: when this process ends its stdin closes, and it
    /// stops the registry and removes its directory.
    _wrapper: Mutex<Child>,
}

static REGISTRY: OnceLock<Registry> = OnceLock::new();

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tools_present() -> bool {
    Path::new("/usr/bin/docker-registry").exists()
        && Path::new("/usr/bin/skopeo").exists()
        && Path::new("/usr/bin/umoci").exists()
        && Path::new("/bin/busybox").exists()
}

/// The registry with `test/busybox:1` (busybox, `/data/hello.txt`, `FOO=bar`, working
/// directory `/data`, a user database of its own) and `test/busybox:2` (one more layer).
fn registry() -> &'static Registry {
    REGISTRY.get_or_init(|| {
        if !tools_present() {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/test-deps.sh");
            run(Command::new("bash").arg(script));
        }
        assert!(tools_present(), "scripts/test-deps.sh installs the image tools");
        let dir = std::env::temp_dir().join(common::unique("execbox-images-test"));
        std::fs::create_dir_all(&dir).expect("registry dir");
        let addr = format!("127.0.0.1:{}", free_port());
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.join("storage").display()
            ),
        )
        .expect("registry config");
        let wrapper = Command::new("sh")
            .args([
                "-c",
                r#"/usr/bin/docker-registry serve "$0" >"$1/registry.log" 2>&1 & pid=$!; read _; kill $pid; wait $pid; rm -rf "$1""#,
            ])
            .arg(&config)
            .arg(&dir)
            .stdin(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the registry");
        wait_for(&addr);

        let layout = dir.join("layout");
        let oci = |tag: &str| format!("{}:{tag}", layout.display());
        run(Command::new("umoci").args(["init", "--layout"]).arg(&layout));
        run(Command::new("umoci").args(["new", "--image", &oci("1")]));
        let bundle = dir.join("bundle");
        run(Command::new("umoci")
            .args(["unpack", "--image", &oci("1")])
            .arg(&bundle));
        let rootfs = bundle.join("rootfs");
        for d in ["bin", "data", "etc"] {
            std::fs::create_dir_all(rootfs.join(d)).expect("image dirs");
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox");
        for tool in ["sh", "ls", "cat", "id", "pwd", "stat", "touch", "echo", "dd", "df"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(tool)).expect("link");
        }
        std::fs::write(rootfs.join("data/hello.txt"), "hello from the image\n").expect("data");
        std::fs::write(
            rootfs.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nimageuser:x:4242:4242::/data:/bin/sh\n",
        )
        .expect("passwd");
        std::fs::write(rootfs.join("etc/group"), "root:x:0:\nimagegroup:x:4242:\n")
            .expect("group");
        run(Command::new("umoci")
            .args(["repack", "--image", &oci("1")])
            .arg(&bundle));
        run(Command::new("umoci").args([
            "config",
            "--image",
            &oci("1"),
            "--config.env",
            "FOO=bar",
            "--config.env",
            "PATH=/bin",
            "--config.workingdir",
            "/data",
        ]));
        // Version 2: one more layer on top of the same base.
        std::fs::write(rootfs.join("data/v2.txt"), "second layer\n").expect("v2");
        run(Command::new("umoci")
            .args(["repack", "--image", &oci("2")])
            .arg(&bundle));
        // `hostile`: links that lead out of the image: `/etc/passwd` to a file of the host,
        // `/agentdata` to the agent's own data, `/escape` to `/etc`.
        let host_secret = dir.join("host-secret.txt");
        std::fs::write(&host_secret, "host-secret-never-in-a-sandbox\n").expect("secret");
        std::fs::remove_file(rootfs.join("etc/passwd")).expect("passwd");
        std::os::unix::fs::symlink(&host_secret, rootfs.join("etc/passwd")).expect("link");
        std::os::unix::fs::symlink("/run/execbox", rootfs.join("agentdata")).expect("link");
        std::os::unix::fs::symlink("/etc", rootfs.join("escape")).expect("link");
        run(Command::new("umoci")
            .args(["repack", "--image", &oci("hostile")])
            .arg(&bundle));
        run(Command::new("skopeo").args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            &format!("oci:{}", oci("hostile")),
            &format!("docker://{addr}/test/hostile:1"),
        ]));
        for tag in ["1", "2"] {
            run(Command::new("skopeo").args([
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                &format!("oci:{}", oci(tag)),
                &format!("docker://{addr}/test/busybox:{tag}"),
            ]));
            run(Command::new("skopeo").args([
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                &format!("oci:{}", oci(tag)),
                &format!("docker://{addr}/test/shared:{tag}"),
            ]));
        }
        Registry {
            addr,
            log: dir.join("registry.log"),
            host_secret,
            _wrapper: Mutex::new(wrapper),
        }
    })
}

fn wait_for(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes());
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            if answer.starts_with("HTTP/1.") && answer.contains(" 200 ") {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the registry at {addr} did not come up");
}

fn image(tag: &str) -> String {
    format!("{}/test/busybox:{tag}", registry().addr)
}

/// The same images under a name only one test pulls.
fn shared(tag: &str) -> String {
    format!("{}/test/shared:{tag}", registry().addr)
}

/// Sandboxes of an image get their own root made of its layers.
fn create_from<'a>(server: &'a TestServer, uri: &str) -> common::Sandbox<'a> {
    server.create(json!({
        "image": {"uri": uri},
        "entrypoint": ["/bin/sh", "-c", "while :; do sleep 3600; done"],
    }))
}

/// Directories directly under `dir` (none when it does not exist).
fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[test]
fn a_sandbox_runs_in_the_image_it_names() {
    let server = TestServer::start();
    let sb = create_from(&server, &image("1"));

    // The image's working directory, environment and files; commands run with its /bin/sh
    // (it has no bash).
    let run = sb.run(
        "pwd; echo \"FOO=$FOO\"; cat hello.txt; ls /usr 2>&1; test -e /bin/bash || echo no-bash",
    );
    assert_eq!(run.exit_code, Some(0), "{run:?}");
    let out = run.out();
    assert!(
        out.starts_with("/data\nFOO=bar\nhello from the image\n"),
        "{out}"
    );
    assert!(
        out.contains("No such file"),
        "the host's /usr is not there: {out}"
    );
    assert!(out.ends_with("no-bash"), "{out}");

    // The image's user database, with the sandbox user added; image files keep their owner.
    let run = sb.run("id; stat -c '%u %U' /data/hello.txt; cat /etc/passwd");
    let out = run.out();
    assert!(out.starts_with("uid=1000(user) gid=1000(user)"), "{out}");
    assert!(out.contains("\n0 root\n"), "{out}");
    assert!(
        out.contains("imageuser:x:4242:4242"),
        "the image's users stay: {out}"
    );

    // The image is read-only to the sandbox user, who writes where the user works.
    let run = sb.run("touch /data/new 2>&1; echo written > /workspace/w && cat /workspace/w");
    let out = run.out();
    assert!(out.contains("Permission denied"), "{out}");
    assert!(out.ends_with("written"), "{out}");

    // The files API works in an image's root.
    let got = common::reply(
        sb.execd("GET", "/files/download?path=/data/hello.txt")
            .call(),
    );
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.text(), "hello from the image\n");
}

#[test]
fn layers_are_pulled_once_and_shared_and_writes_stay_in_their_sandbox() {
    let server = TestServer::start();
    let a = create_from(&server, &shared("1"));
    let b = create_from(&server, &shared("2"));
    let layers = server.state_dir.join("images/layers");
    // Version 2 adds one layer to version 1's: two layers stored, not three.
    assert_eq!(entries(&layers).len(), 2, "{:?}", entries(&layers));

    // A sandbox's root is its own: a file written, or an image file removed by root inside,
    // is not seen by the other sandbox nor written to the shared layer.
    assert_eq!(a.run("echo mine > /tmp/only-a").exit_code, Some(0));
    let run = b.run("cat /data/v2.txt; test -e /tmp/only-a && echo leaked || echo apart");
    assert_eq!(run.out(), "second layer\napart", "{run:?}");
    let run = a.run("test -e /data/v2.txt && echo v2 || echo v1");
    assert_eq!(run.out(), "v1");
    for layer in entries(&layers) {
        let listing: Vec<_> = walk(&layer);
        assert!(
            !listing.iter().any(|p| p.ends_with("only-a")),
            "a sandbox wrote into a shared layer: {listing:?}"
        );
    }

    // Deleting the sandboxes leaves the image stored: the next one does not pull it again.
    for sb in [a, b] {
        assert_eq!(server.delete(&format!("/v1/sandboxes/{}", sb.id)), 204);
    }
    let before = registry_log_pulls();
    let c = create_from(&server, &shared("1"));
    assert_eq!(c.run("cat /data/hello.txt").out(), "hello from the image");
    assert_eq!(
        registry_log_pulls(),
        before,
        "a stored image is not fetched again"
    );
}

/// Every path under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in entries(dir) {
        if e.is_dir() && !e.is_symlink() {
            out.extend(walk(&e));
        }
        out.push(e);
    }
    out
}

/// How many requests for `test/shared` the registry has answered so far, from its log.
fn registry_log_pulls() -> usize {
    let log = std::fs::read_to_string(&registry().log).unwrap_or_default();
    let count = log.matches("/v2/test/shared/").count();
    assert!(count > 0, "the registry logs requests: {log}");
    count
}

#[test]
fn bad_references_are_the_clients_errors_and_leave_nothing() {
    let addr = &registry().addr;
    let unreachable = format!("127.0.0.1:{}", free_port());
    let server = TestServer::start_with_env(
        "",
        &[(
            "EXECBOX_ALLOWED_REGISTRIES",
            &format!("{addr},{unreachable}"),
        )],
    );
    let create = |uri: &str| {
        server.create_raw(
            &json!({
                "image": {"uri": uri},
                "entrypoint": ["/bin/sh"],
                "resourceLimits": {"cpu": "1", "memory": "256Mi"},
            })
            .to_string(),
        )
    };
    for (uri, status, says) in [
        ("UPPER//case::", 400, "image.uri"),
        (&*format!("{addr}/test/missing:1"), 400, "not found"),
        (&*format!("{addr}/test/busybox:nope"), 400, "not found"),
        (
            "ghcr.io/someone/image:1",
            400,
            "not one this server pulls from",
        ),
        (
            &*format!("{unreachable}/test/busybox:1"),
            502,
            &*unreachable,
        ),
    ] {
        let (s, body) = create(uri);
        assert_eq!(s, status, "{uri}: {body}");
        assert_eq!(
            body["code"],
            if status == 400 {
                "SANDBOX::INVALID_PARAMETER"
            } else {
                "SANDBOX::UNKNOWN_ERROR"
            },
            "{body}"
        );
        let message = body["message"].as_str().unwrap_or("");
        assert!(message.starts_with("image.uri"), "{uri}: {message}");
        assert!(message.contains(says), "{uri}: {message}");
    }
    // Nothing of the failed pulls remains, and no sandbox was made.
    let images = server.state_dir.join("images");
    assert!(entries(&images.join("layers")).is_empty());
    assert!(entries(&images.join("tmp")).is_empty());
    assert!(entries(&images.join("images")).is_empty());
    let (s, list) = server.get("/v1/sandboxes");
    assert_eq!(s, 200);
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0), "{list}");
}

#[test]
fn an_image_root_works_on_memory_storage_too() {
    let server = TestServer::start_with_config("[storage]\nmedium = \"memory\"\n");
    let sb = create_from(&server, &image("1"));
    let run = sb.run("pwd; cat hello.txt; echo kept > /tmp/f && cat /tmp/f");
    assert_eq!(run.out(), "/data\nhello from the image\nkept", "{run:?}");
}

#[test]
fn an_image_without_a_runtime_refuses_it_clearly() {
    let server = TestServer::start();
    let sb = create_from(&server, &image("1"));
    for (path, body, says) in [
        (
            "/code/context",
            json!({"language": "python"}),
            "python3 is not installed",
        ),
        (
            "/code/context",
            json!({"language": "javascript"}),
            "node (or bun) is not installed",
        ),
        (
            "/code/context",
            json!({"language": "bash"}),
            "bash is not installed",
        ),
        ("/session", json!({}), "bash is not installed"),
    ] {
        let reply = common::reply(
            sb.execd("POST", path)
                .set("Content-Type", "application/json")
                .send_string(&body.to_string()),
        );
        let message = reply.assert_error(400, "INVALID_REQUEST_BODY");
        assert!(message.contains(says), "{path} {body}: {message}");
    }
    // Commands still run, with the image's own shell.
    assert_eq!(sb.run("echo $0").out(), "/bin/sh");
}

#[test]
fn links_in_an_image_lead_nowhere_outside_the_sandbox() {
    let server = TestServer::start();
    let claim = common::unique("escape").replace('_', "-");
    let sb = server.create(json!({
        "image": {"uri": format!("{}/test/hostile:1", registry().addr)},
        "entrypoint": ["/bin/sh", "-c", "while :; do sleep 3600; done"],
        // A mount path through the image's `/escape -> /etc`.
        "volumes": [{"name": "v", "mountPath": format!("/escape/{claim}"),
                     "pvc": {"claimName": claim, "deleteOnSandboxTermination": true}}],
    }));
    // The user database is built from the image's layers without following its link to the
    // host (the lower layer's file is used instead).
    let passwd = sb.run("cat /etc/passwd").out();
    let secret = std::fs::read_to_string(&registry().host_secret).expect("secret");
    assert!(!passwd.contains(secret.trim()), "{passwd}");
    assert!(passwd.contains("user:x:1000"), "{passwd}");
    // The volume is at the link's target inside the sandbox, never in the host's /etc.
    let run = sb.run(&format!("grep -c ' /etc/{claim} ' /proc/self/mountinfo"));
    assert_eq!(run.out(), "1", "{run:?}");
    assert!(!Path::new("/etc").join(&claim).exists());
    // The agent's data is not writable through the image's link, even by uid 0 (the fence
    // is on the directories of the root, opened without following links).
    let run =
        sb.run_with(json!({"command": "(echo x > /agentdata/pwned) 2>&1; echo rc=$?", "uid": 0}));
    assert!(run.out().ends_with("rc=1"), "{run:?}");
    let run = sb.run_with(
        json!({"command": "test -e /run/execbox/pwned && echo present || echo absent", "uid": 0}),
    );
    assert_eq!(run.out(), "absent", "{run:?}");
    assert_eq!(server.delete(&format!("/v1/sandboxes/{}", sb.id)), 204);
}

#[test]
fn the_command_line_keeps_images_that_sandboxes_use() {
    let server = TestServer::start();
    let reference = image("2");
    let sb = create_from(&server, &reference);
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_execbox"))
            .arg("image")
            .args(args)
            .arg("--state-dir")
            .arg(&server.state_dir)
            .output()
            .expect("execbox image")
    };
    let layers = server.state_dir.join("images/layers");
    let stored = entries(&layers).len();
    assert!(stored >= 1, "{stored}");
    // In use by a sandbox (its record in the state directory): not removed, layers kept.
    let rm = cli(&["rm", &reference]);
    assert!(!rm.status.success(), "{rm:?}");
    assert!(
        String::from_utf8_lossy(&rm.stderr).contains("in use"),
        "{rm:?}"
    );
    assert!(cli(&["gc"]).status.success());
    assert_eq!(entries(&layers).len(), stored);
    assert_eq!(sb.run("cat /data/v2.txt").out(), "second layer");
    // Once the sandbox is gone, both go.
    assert_eq!(server.delete(&format!("/v1/sandboxes/{}", sb.id)), 204);
    assert!(cli(&["rm", &reference]).status.success());
    assert!(cli(&["gc"]).status.success());
    assert!(entries(&layers).is_empty(), "{:?}", entries(&layers));
}
