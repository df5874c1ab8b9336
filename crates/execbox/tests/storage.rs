//! Disk-backed sandbox storage, for real: every sandbox's writable layer is a sparse ext4 disk
//! of its own on a loop device, whose size the kernel enforces (ENOSPC, never a dead agent),
//! whose files take memory only as page cache (a file larger than the memory limit fits), and
//! which is gone, loop device and file, when the sandbox is.

mod common;

use std::path::Path;

use common::TestServer;
use serde_json::json;

/// Loop devices attached to files under `dir`.
fn loops_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(devices) = std::fs::read_dir("/sys/block") else {
        return found;
    };
    for dev in devices.flatten() {
        let backing = dev.path().join("loop/backing_file");
        if let Ok(file) = std::fs::read_to_string(&backing) {
            if Path::new(file.trim()).starts_with(dir) {
                found.push(file.trim().to_string());
            }
        }
    }
    found
}

#[test]
fn a_full_disk_is_enospc_and_the_sandbox_lives_on() {
    let server = TestServer::start();
    let sb = server.create(json!({
        "resourceLimits": {"cpu": "1", "memory": "256Mi", "disk": "64Mi"},
    }));
    // The sandbox sees the size it asked for, wherever it writes.
    let run = sb.run("df -k / /workspace /tmp | tail -n +2 | awk '{print $2}'");
    for size in run.stdout.join("\n").lines() {
        let kib: u64 = size.trim().parse().unwrap_or(0);
        assert!((60_000..=66_000).contains(&kib), "df: {}", run.out());
    }

    // Filling it is ENOSPC for the writer.
    let run = sb.run("dd if=/dev/zero of=/workspace/fill bs=1M count=100 2>&1; echo rc=$?");
    let out = run.out();
    assert!(out.contains("No space left on device"), "{out}");
    assert!(out.ends_with("rc=1"), "{out}");

    // The agent answers, an upload that does not fit is refused whole (413 naming the size),
    // and removing the file gives the space back.
    assert_eq!(sb.run("echo alive").out(), "alive");
    let body = vec![b'x'; 8 << 20];
    let boundary = "execbox-storage-test";
    let mut multipart = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"metadata\"\r\n\r\n{{\"path\":\"/workspace/up.bin\"}}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"up.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    multipart.extend_from_slice(&body);
    multipart.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let reply = common::reply(
        sb.execd("POST", "/files/upload")
            .set(
                "Content-Type",
                &format!("multipart/form-data; boundary={boundary}"),
            )
            .send_bytes(&multipart),
    );
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert!(
        reply.text().contains("64"),
        "names the disk size: {}",
        reply.text()
    );
    assert_eq!(
        sb.run("test -e /workspace/up.bin && echo half || echo none")
            .out(),
        "none"
    );
    let run = sb.run("rm /workspace/fill && dd if=/dev/zero of=/workspace/again bs=1M count=32 2>/dev/null && echo fits");
    assert_eq!(run.out(), "fits", "{run:?}");
}

#[test]
fn files_on_disk_are_not_charged_as_memory() {
    let server = TestServer::start();
    // A 1 GiB file in a sandbox of 128 MiB of memory: on disk it is only page cache, which
    // the kernel reclaims; in memory it could not be written.
    let sb = server.create(json!({
        "resourceLimits": {"cpu": "1", "memory": "128Mi", "disk": "1536Mi"},
    }));
    let run = sb.run(
        "dd if=/dev/zero of=/workspace/big bs=1M count=1024 2>&1 && sync && stat -c %s /workspace/big",
    );
    assert_eq!(run.exit_code, Some(0), "{run:?}");
    assert!(run.out().ends_with("1073741824"), "{}", run.out());
    assert_eq!(sb.run("echo alive").out(), "alive");
}

#[test]
fn a_deleted_sandbox_leaves_no_disk_and_no_loop_device() {
    let server = TestServer::start();
    let state = server.state_dir.clone();
    let id = {
        let sb = server.create(json!({}));
        assert_eq!(
            sb.run("echo hi > /workspace/f && cat /workspace/f").out(),
            "hi"
        );
        sb.id.clone()
    };
    let own = state.join("sandboxes").join(&id);
    assert_eq!(loops_under(&own).len(), 1, "one disk per sandbox");
    assert_eq!(server.delete(&format!("/v1/sandboxes/{id}")), 204);
    // Detaching happens in the background once the last mount is gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !loops_under(&own).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(loops_under(&own), Vec::<String>::new());
    assert!(!own.join("disk.ext4").exists());
}

#[test]
fn memory_storage_is_chosen_by_configuration() {
    let server = TestServer::start_with_config("[storage]\nmedium = \"memory\"\n");
    let sb = server.create(json!({
        "resourceLimits": {"cpu": "1", "memory": "256Mi", "disk": "64Mi"},
    }));
    assert!(loops_under(&server.state_dir).is_empty());
    let run = sb.run("echo kept > /workspace/f && cat /workspace/f; dd if=/dev/zero of=/workspace/fill bs=1M count=100 2>&1");
    let out = run.out();
    assert!(out.starts_with("kept"), "{out}");
    assert!(out.contains("No space left on device"), "{out}");
}
