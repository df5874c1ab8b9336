//! Real sandboxes, checked from inside: namespaces, users, filesystem, cgroups, seccomp.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[test]
fn pid1_is_the_agent_and_proc_shows_only_the_sandbox() {
    let server = TestServer::start();
    let sbx = server.create(json!({}));
    let r = sbx.run(
        "python3 -c \"import os; print(sorted(open(f'/proc/{p}/comm').read().strip() \
         for p in os.listdir('/proc') if p.isdigit()))\"; cat /proc/1/comm",
    );
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    let comms = &r.stdout[0];
    assert_eq!(r.stdout[1], "execbox", "PID 1 must be the agent: {r:?}");
    // The agent, the entrypoint (tail), bash and python: nothing of the host.
    for expected in ["'execbox'", "'tail'", "'python3'"] {
        assert!(comms.contains(expected), "{comms}");
    }
    assert!(
        comms.matches(',').count() <= 4,
        "unexpected processes: {comms}"
    );
}

#[test]
fn only_loopback_exists_and_it_is_up() {
    let server = TestServer::start();
    let sbx = server.create(json!({}));
    let r = sbx.run("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '");
    assert_eq!(r.stdout, ["lo"], "{r:?}");
    let r = sbx.run(
        "python3 -c \"import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(); \
         c=socket.create_connection(s.getsockname()); print('lo up')\"",
    );
    assert_eq!(r.out(), "lo up", "{r:?}");
    // No route anywhere: the routing table holds nothing but its header.
    let r = sbx.run("tail -n +2 /proc/net/route | wc -l");
    assert_eq!(r.out(), "0", "{r:?}");
}

#[test]
fn host_files_are_invisible_and_system_dirs_read_only() {
    let marker = format!("execbox-marker-{}", unique("m"));
    std::fs::write(std::env::temp_dir().join(&marker), "secret").expect("marker");
    let server = TestServer::start();
    let sbx = server.create(json!({}));
    let r = sbx.run(&format!(
        "ls -a /tmp; test -e /tmp/{marker} && echo VISIBLE; test -e /sys/kernel && echo SYS; \
         find / -xdev -name '{marker}' 2>/dev/null; ls {}",
        server.state_dir.display()
    ));
    let out = r.out();
    assert!(!out.contains(&marker), "{out}");
    assert!(!out.contains("VISIBLE") && !out.contains("SYS"), "{out}");
    let r = sbx.run("touch /usr/x 2>&1; touch /etc/x 2>&1; touch / 2>&1; cat /etc/shadow | wc -c");
    assert!(r.out().contains("Read-only file system"), "{r:?}");
    assert_eq!(r.stdout.last().map(String::as_str), Some("0"), "{r:?}");
    let r = sbx.run("touch /home/user/a /workspace/b /tmp/c && pwd && echo ok");
    assert_eq!(r.stdout, ["/home/user", "ok"], "{r:?}");
    let r = sbx.run("cat /proc/kcore | wc -c; echo 1 > /proc/sysrq-trigger 2>&1 || echo denied");
    assert_eq!(r.stdout[0], "0", "{r:?}");
    assert!(
        r.out().contains("denied") || r.out().contains("Read-only"),
        "{r:?}"
    );
    let _ = std::fs::remove_file(std::env::temp_dir().join(&marker));
}

#[test]
fn user_code_is_unprivileged_with_clean_signals_and_runtimes_on_path() {
    let server = TestServer::start();
    let sbx = server.create(json!({}));
    let r = sbx.run(
        "id -u; id -un; grep -E '^(CapEff|CapPrm|CapBnd|CapAmb|NoNewPrivs|Seccomp|SigIgn|SigBlk):' \
         /proc/self/status",
    );
    assert_eq!(r.stdout[0], "1000", "{r:?}");
    assert_eq!(r.stdout[1], "user", "{r:?}");
    let status = r.out();
    for (k, v) in [
        ("CapEff", "0000000000000000"),
        ("CapPrm", "0000000000000000"),
        ("CapBnd", "0000000000000000"),
        ("CapAmb", "0000000000000000"),
        ("NoNewPrivs", "1"),
        ("Seccomp", "2"),
        ("SigIgn", "0000000000000000"),
        ("SigBlk", "0000000000000000"),
    ] {
        assert!(
            status
                .lines()
                .any(|l| l.starts_with(&format!("{k}:")) && l.ends_with(v)),
            "{k} should be {v}: {status}"
        );
    }
    let r = sbx.run("python --version && python3 -c 'print(6*7)' && node -e 'console.log(6*7)' && bash -c 'echo $((6*7))' && pip --version >/dev/null && echo pip");
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    assert!(
        r.out().contains("42\n42\n42") && r.out().ends_with("pip"),
        "{r:?}"
    );
}

#[test]
fn two_sandboxes_run_as_different_host_uids() {
    let server = TestServer::start();
    let a = server.create(json!({}));
    let b = server.create(json!({}));
    let uids = |s: &Sandbox| -> Vec<u32> {
        let mut v: Vec<u32> = s.host_pids().into_iter().filter_map(host_uid_of).collect();
        v.sort();
        v.dedup();
        v
    };
    let (ua, ub) = (uids(&a), uids(&b));
    assert!(!ua.is_empty() && !ub.is_empty());
    assert!(
        !ua.contains(&0) && !ub.contains(&0),
        "no sandbox process may be host root"
    );
    assert!(ua.iter().all(|u| !ub.contains(u)), "{ua:?} vs {ub:?}");
}

#[test]
fn memory_limit_oom_kills_and_is_reported() {
    let server = TestServer::start();
    let sbx = server.create(json!({"resourceLimits": {"cpu": "1", "memory": "96Mi"}}));
    let r = sbx.run("python3 -c 'x = bytearray(400 << 20); print(len(x))'");
    assert_eq!(r.exit_code, Some(-1), "{r:?}");
    let tb = r
        .error
        .as_ref()
        .map(|e| e["traceback"].to_string())
        .unwrap_or_default();
    assert!(tb.contains("OOM"), "must be reported as OOM: {r:?}");
    // The sandbox survives its process's OOM.
    assert_eq!(sbx.run("echo alive").out(), "alive");
}

#[test]
fn fork_bomb_stops_at_the_pids_limit_and_the_server_stays_responsive() {
    let server = TestServer::start();
    let sbx =
        server.create(json!({"resourceLimits": {"cpu": "1", "memory": "512Mi", "pids": "64"}}));
    let id = sbx.id.clone();
    let base = server.base.clone();
    let bomb = std::thread::scope(|s| {
        let h = s
            .spawn(|| sbx.run_with(json!({"command": "f(){ f|f& }; f; sleep 5", "timeout": 4000})));
        std::thread::sleep(Duration::from_millis(800));
        let mut max_pids = 0;
        let mut worst = Duration::ZERO;
        for _ in 0..10 {
            let t = Instant::now();
            let (status, _) = into_pair(ureq::get(&format!("{base}/v1/sandboxes/{id}")).call());
            assert_eq!(status, 200);
            worst = worst.max(t.elapsed());
            // The workload's own cgroup holds the limit asked for; the agent's threads count
            // beside it, within the sandbox's.
            let cur: usize =
                std::fs::read_to_string(cgroup_dir("pids", &id).join("work/pids.current"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
            max_pids = max_pids.max(cur);
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(max_pids <= 64, "pids limit exceeded: {max_pids}");
        assert!(
            worst < Duration::from_secs(2),
            "server unresponsive: {worst:?}"
        );
        h.join().expect("bomb thread")
    });
    assert_eq!(
        bomb.exit_code,
        Some(-1),
        "the bomb ends at its timeout: {bomb:?}"
    );
    assert_eq!(sbx.run("echo still-usable").out(), "still-usable");
}

#[test]
fn cpu_quota_throttles() {
    let server = TestServer::start();
    let sbx = server.create(json!({"resourceLimits": {"cpu": "100m", "memory": "256Mi"}}));
    let r = sbx.run(
        "python3 -c \"import time,os\nt=time.time()\nwhile time.time()-t<1.5: pass\n\
         c=os.times(); print(round(c.user+c.system,3))\"",
    );
    let cpu: f64 = r.out().parse().unwrap_or(99.0);
    assert!(
        cpu < 0.5,
        "0.1 CPU for 1.5 s must give well under 0.5 s of CPU, got {cpu}: {r:?}"
    );
}

#[test]
fn dangerous_syscalls_fail_with_eperm() {
    let server = TestServer::start();
    let sbx = server.create(json!({}));
    let script = r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def errno_of(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(nr, *[ctypes.c_long(a) for a in args])
    return ctypes.get_errno() if r == -1 else 0
calls = {"ptrace": (101, 16, 1, 0, 0), "mount": (165, 0, 0, 0, 0, 0), "unshare": (272, 0x10000000),
         "keyctl": (250, 0, 0, 0, 0, 0), "bpf": (321, 0, 0, 0), "io_uring_setup": (425, 1, 0)}
print(" ".join(f"{k}={errno_of(*v)}" for k, v in calls.items()))
"#;
    let r = sbx.run(&format!("python3 -c '{script}'"));
    assert_eq!(
        r.out(),
        "ptrace=1 mount=1 unshare=1 keyctl=1 bpf=1 io_uring_setup=1",
        "{r:?}"
    );
}

#[test]
fn delete_leaves_no_process_cgroup_or_state_behind() {
    let server = TestServer::start();
    let sbx = server.create(json!({}));
    sbx.run_with(json!({"command": "sleep 1000", "background": true}));
    let pids = sbx.host_pids();
    assert!(pids.len() >= 3, "agent, entrypoint and sleep: {pids:?}");
    let id = sbx.id.clone();
    assert!(server.state_dir.join("sandboxes").join(&id).exists());
    let t = Instant::now();
    assert_eq!(server.delete(&format!("/v1/sandboxes/{id}")), 204);
    eprintln!("delete took {:?}", t.elapsed());
    for pid in &pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} survived"
        );
    }
    for c in ["memory", "cpu", "cpuacct", "pids", "freezer"] {
        assert!(!cgroup_dir(c, &id).exists(), "{c} cgroup left behind");
    }
    assert!(
        !server.state_dir.join("sandboxes").join(&id).exists(),
        "state left behind"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    assert!(!mounts.contains(&id), "mount left behind");
    assert_eq!(server.get(&format!("/v1/sandboxes/{id}")).0, 404);
}

/// Host uid of the agent (uid 0 of the sandbox: the first id of its range) of every live
/// sandbox recorded in `state_dir`, checked against the record's `user_host_uid`.
fn range_bases(state_dir: &std::path::Path) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(state_dir.join("sandboxes")) else {
        return out;
    };
    for entry in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("record.json")) else {
            continue;
        };
        let rec: serde_json::Value = serde_json::from_str(&text).expect("record");
        let pid = rec["placement"]["pid"].as_i64().expect("pid") as i32;
        let Some(base) = host_uid_of(pid) else {
            continue; // gone meanwhile
        };
        let user = rec["placement"]["user_host_uid"]
            .as_u64()
            .expect("user uid");
        assert_eq!(user, u64::from(base) + 1000, "{rec}");
        out.push((rec["id"].as_str().expect("id").to_string(), base));
    }
    out
}

#[track_caller]
fn assert_distinct_ranges(dirs: &[&std::path::Path]) -> usize {
    let mut all: Vec<(String, u32)> = dirs.iter().flat_map(|d| range_bases(d)).collect();
    all.sort_by_key(|(_, base)| *base);
    for pair in all.windows(2) {
        assert!(
            pair[1].1 - pair[0].1 >= 65_536,
            "sandboxes {} and {} share a uid range: {all:?}",
            pair[0].0,
            pair[1].0
        );
    }
    all.len()
}

#[test]
fn servers_on_one_host_never_share_a_uid_range() {
    let a = TestServer::start();
    let b = TestServer::start();
    let mut b_ids = Vec::new();
    let a_id = {
        let first = a.create(json!({})).id;
        b_ids.push(b.create(json!({})).id);
        let second = a.create(json!({})).id;
        b_ids.push(b.create(json!({})).id);
        assert_eq!(a.delete(&format!("/v1/sandboxes/{first}")), 204);
        // b may now take the range a released, and only that one.
        b_ids.push(b.create(json!({})).id);
        second
    };
    let live = assert_distinct_ranges(&[&a.state_dir, &b.state_dir]);
    assert!(live >= 4, "{live} sandboxes (and the warm pools')");
    // A restarted server takes the ranges of the sandboxes it re-attaches back before anyone
    // else can: b's new sandboxes get other ones.
    let b_dir = b.state_dir.clone();
    let a_dir = a.crash();
    let a = TestServer::start_on(a_dir.clone(), free_port(), None);
    let (s, _) = a.get(&format!("/v1/sandboxes/{a_id}"));
    assert_eq!(s, 200, "re-attached");
    for _ in 0..2 {
        b_ids.push(b.create(json!({})).id);
    }
    assert!(assert_distinct_ranges(&[&a_dir, &b_dir]) >= 6);
    for id in b_ids {
        assert_eq!(b.delete(&format!("/v1/sandboxes/{id}")), 204);
    }
}
