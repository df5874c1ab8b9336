//! OpenSandbox `volumes`, for real: host directories under the operator's allowlist and named
//! volumes (ext4 disks execbox makes), id-mapped so that files are the configured owner's on
//! the host, `readOnly` enforced by the kernel, `subPath`, symlinks that lead out of a volume
//! refused, data kept across sandboxes and shared between them, `execbox volume ls|rm`.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{unique, TestServer};
use serde_json::{json, Value};

/// The host owner configured for volumes in these tests.
const OWNER: u32 = 4321;

fn server_sharing(dir: &Path) -> TestServer {
    TestServer::start_with_config(&format!(
        "[volumes]\nhost_paths = [\"{}\"]\nowner_uid = {OWNER}\nowner_gid = {OWNER}\n",
        dir.display()
    ))
}

fn shared_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(unique("execbox-volumes-test"));
    std::fs::create_dir_all(&dir).expect("shared dir");
    dir
}

fn with_volumes(volumes: Value) -> Value {
    json!({ "volumes": volumes })
}

/// A create that must fail: returns (status, message).
fn refused(server: &TestServer, volumes: Value) -> (u16, String) {
    let body = json!({
        "image": {"uri": "default"},
        "entrypoint": ["tail", "-f", "/dev/null"],
        "resourceLimits": {"cpu": "1", "memory": "256Mi"},
        "volumes": volumes,
    });
    let (status, v) = server.create_raw(&body.to_string());
    assert_eq!(v["code"], "SANDBOX::INVALID_PARAMETER", "{v}");
    (status, v["message"].as_str().unwrap_or("").to_string())
}

#[test]
fn host_volumes_are_refused_without_an_allowlist() {
    let server = TestServer::start();
    let (status, message) = refused(
        &server,
        json!([{"name": "h", "mountPath": "/mnt/h", "host": {"path": "/tmp"}}]),
    );
    assert_eq!(status, 400);
    assert!(message.starts_with("volumes[0].host.path:"), "{message}");
    let (status, message) = refused(
        &server,
        json!([{"name": "o", "mountPath": "/mnt/o", "ossfs": {"bucket": "b", "endpoint": "e", "accessKeyId": "k", "accessKeySecret": "s"}}]),
    );
    assert_eq!(status, 400);
    assert!(message.starts_with("volumes[0]:"), "{message}");
}

#[test]
fn a_host_volume_belongs_to_the_configured_owner_and_keeps_its_bounds() {
    let shared = shared_dir();
    let project = shared.join("project");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(project.join("input.txt"), "from the host\n").unwrap();
    std::os::unix::fs::chown(&project, Some(OWNER), Some(OWNER)).unwrap();
    std::os::unix::fs::chown(project.join("input.txt"), Some(OWNER), Some(OWNER)).unwrap();
    // A way out of the shared directory, made on the host.
    std::os::unix::fs::symlink("/etc", shared.join("etc-link")).unwrap();
    let server = server_sharing(&shared);

    let sb = server.create(with_volumes(json!([
        {"name": "p", "mountPath": "/mnt/project", "host": {"path": project.to_str().unwrap()}},
        {"name": "ro", "mountPath": "/mnt/ro", "readOnly": true, "host": {"path": project.to_str().unwrap()}},
    ])));
    // The owner's files are the sandbox user's; what the user writes is the owner's on the host.
    let run = sb.run("stat -c %U /mnt/project/input.txt; cat /mnt/project/input.txt; echo out > /mnt/project/output.txt && echo written");
    assert_eq!(run.out(), "user\nfrom the host\nwritten", "{run:?}");
    let meta = std::fs::metadata(project.join("output.txt")).expect("written on the host");
    assert_eq!((meta.uid(), meta.gid()), (OWNER, OWNER));
    // Read-only is the kernel's: EROFS.
    let run = sb.run("(echo x > /mnt/ro/nope.txt) 2>&1; echo rc=$?");
    assert!(run.out().contains("Read-only file system"), "{run:?}");
    assert!(!project.join("nope.txt").exists());
    // A symlink made inside points into the sandbox's own root, not the host's.
    let run = sb.run("ln -s /etc /mnt/project/link && ls /mnt/project/link/ | grep -cx passwd");
    assert_eq!(run.out(), "1");

    // Paths out of the allowlist are refused, through a symlink too.
    for (volume, field) in [
        (
            json!({"name": "e", "mountPath": "/mnt/e", "host": {"path": "/etc"}}),
            "volumes[0].host.path",
        ),
        (
            json!({"name": "e", "mountPath": "/mnt/e", "host": {"path": shared.join("etc-link").to_str().unwrap()}}),
            "volumes[0].host.path",
        ),
        (
            json!({"name": "e", "mountPath": "/mnt/e", "subPath": "link", "host": {"path": project.to_str().unwrap()}}),
            "volumes[0].subPath",
        ),
        (
            json!({"name": "e", "mountPath": "/proc/e", "host": {"path": project.to_str().unwrap()}}),
            "volumes[0].mountPath",
        ),
    ] {
        let (status, message) = refused(&server, json!([volume]));
        assert_eq!(status, 400, "{message}");
        assert!(message.starts_with(field), "{field}: {message}");
    }
    let _ = std::fs::remove_dir_all(&shared);
}

#[test]
fn named_volumes_keep_data_are_shared_and_stay_inside() {
    let shared = shared_dir();
    let server = server_sharing(&shared);
    let volume = |extra: Value| {
        let mut v = json!({"name": "d", "mountPath": "/data", "pvc": {"claimName": "results", "storage": "64Mi"}});
        if let (Some(v), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            for (k, x) in e {
                v.insert(k.clone(), x.clone());
            }
        }
        v
    };
    let a = server.create(with_volumes(json!([volume(json!({}))])));
    let run = a.run("df -k /data | tail -1 | awk '{print $2}'; echo kept > /data/kept.txt; mkdir -p /data/sub; echo s > /data/sub/s.txt; ln -s / /data/escape; ln -s ../../.. /data/climb");
    let kib: u64 = run
        .stdout
        .first()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    assert!((60_000..=70_000).contains(&kib), "the size asked: {run:?}");

    // Another sandbox sees it at the same time, read-only or through a subPath.
    let b = server.create(with_volumes(json!([
        volume(json!({"readOnly": true})),
        {"name": "s", "mountPath": "/sub", "subPath": "sub", "pvc": {"claimName": "results"}},
    ])));
    let run =
        b.run("cat /data/kept.txt; (echo x > /data/no) 2>&1; ls /sub; echo from-b > /sub/b.txt");
    let out = run.out();
    assert!(out.starts_with("kept\n"), "{out}");
    assert!(out.contains("Read-only file system"), "{out}");
    assert!(out.ends_with("s.txt"), "{out}");
    assert_eq!(a.run("cat /data/sub/b.txt").out(), "from-b");

    // Symlinks made by a sandbox cannot take a later one out of the volume.
    for sub in ["escape", "climb/etc", "escape/etc"] {
        let (status, message) = refused(&server, json!([volume(json!({"subPath": sub}))]));
        assert_eq!(status, 400, "{message}");
        assert!(message.starts_with("volumes[0].subPath:"), "{message}");
    }

    // Kept after its sandboxes are gone.
    for id in [a.id.clone(), b.id.clone()] {
        assert_eq!(server.delete(&format!("/v1/sandboxes/{id}")), 204);
    }
    let c = server.create(with_volumes(json!([volume(json!({}))])));
    assert_eq!(
        c.run("cat /data/kept.txt /data/sub/b.txt").out(),
        "kept\nfrom-b"
    );
    let disk = server.state_dir.join("volumes/default/results/disk.ext4");
    assert!(disk.is_file());

    // The command line lists it and will not remove it while a sandbox uses it.
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_execbox"))
            .arg("volume")
            .args(args)
            .arg("--state-dir")
            .arg(&server.state_dir)
            .output()
            .expect("execbox volume")
    };
    let ls = cli(&["ls"]);
    assert!(
        String::from_utf8_lossy(&ls.stdout).contains("results"),
        "{ls:?}"
    );
    let rm = cli(&["rm", "results"]);
    assert!(!rm.status.success());
    assert!(
        String::from_utf8_lossy(&rm.stderr).contains("in use"),
        "{rm:?}"
    );
    assert_eq!(server.delete(&format!("/v1/sandboxes/{}", c.id)), 204);
    let rm = cli(&["rm", "results"]);
    assert!(rm.status.success(), "{rm:?}");
    assert!(!disk.exists());

    // A volume asked to go with its sandbox goes.
    let d = server.create(with_volumes(json!([{
        "name": "t", "mountPath": "/scratch",
        "pvc": {"claimName": "scratch", "deleteOnSandboxTermination": true},
    }])));
    assert_eq!(d.run("echo t > /scratch/t && cat /scratch/t").out(), "t");
    let scratch = server.state_dir.join("volumes/default/scratch");
    assert!(scratch.join("disk.ext4").is_file());
    assert_eq!(server.delete(&format!("/v1/sandboxes/{}", d.id)), 204);
    assert!(!scratch.exists());
    let _ = std::fs::remove_dir_all(&shared);
}

#[test]
fn a_named_volume_stays_one_file_system_across_a_server_restart() {
    let shared = shared_dir();
    let config = format!(
        "[volumes]\nhost_paths = [\"{}\"]\nowner_uid = {OWNER}\nowner_gid = {OWNER}\n",
        shared.display()
    );
    let config_path = shared.join("execbox.toml");
    std::fs::write(&config_path, &config).unwrap();
    let volume = json!([{"name": "d", "mountPath": "/data", "pvc": {"claimName": "kept"}}]);
    let port = common::free_port();
    let state = std::env::temp_dir().join(unique("execbox-test-state"));
    let server = TestServer::start_on_with_config(state.clone(), port, &config_path);
    let a = server.create(with_volumes(volume.clone()));
    assert_eq!(a.run("echo a > /data/a && cat /data/a").out(), "a");
    let (a_id, a_token) = (a.id.clone(), a.token.clone());
    server.crash();

    // The restarted server mounts the volume again for a new sandbox while the first still
    // holds it: the same file system (through the same loop device), so each sees the other.
    let server = TestServer::start_on_with_config(state, port, &config_path);
    let b = server.create(with_volumes(volume));
    assert_eq!(b.run("cat /data/a; echo b > /data/b").out(), "a");
    let a = common::Sandbox {
        server: &server,
        id: a_id.clone(),
        endpoint: format!("{}/v1/sandboxes/{a_id}/proxy/44772", server.base),
        token: a_token,
    };
    assert_eq!(a.run("cat /data/b").out(), "b");
    let _ = std::fs::remove_dir_all(&shared);
}
