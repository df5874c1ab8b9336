//! Leak check: many create → exec → delete cycles through a release server, with the host's
//! counts of what a sandbox holds printed before and after: processes, mounts, cgroups, the
//! server's descriptors, uid ranges in use and state files. Any count that grew is a leak and
//! fails the run.
//!
//! Run: `cargo bench -p execbox --bench leaks` (as root). `EXECBOX_LEAK_CYCLES` sets the number
//! of cycles (default 10000; about 2 minutes per 1000 on a 2-CPU machine).

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{env_usize, machine, Res, Sandbox, Server};

/// First host uid of the sandboxes' uid ranges (root mode) and the size of a range.
const UID_BASE: u32 = 1_000_000_000;
const UID_RANGE: u32 = 65_536;

fn count_dirs(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| 1 + count_dirs(&e.path()))
        .sum()
}

fn count_files(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => count_files(&e.path()),
            _ => 1,
        })
        .sum()
}

fn lines(path: &str) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// `(pid, parent pid, uid)` of every process of the host.
fn processes() -> Vec<(u32, u32, u32)> {
    let field = |status: &str, name: &str| -> Option<u32> {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
    };
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(e.path().join("status")).ok()?;
            Some((pid, field(&status, "PPid:")?, field(&status, "Uid:")?))
        })
        .collect()
}

/// What the host holds now.
fn counts(server: &Server) -> BTreeMap<&'static str, usize> {
    let procs = processes();
    // The server and everything it started (every sandbox's processes descend from it).
    let mut tree = std::collections::BTreeSet::from([server.pid()]);
    loop {
        let before = tree.len();
        for (pid, ppid, _) in &procs {
            if tree.contains(ppid) {
                tree.insert(*pid);
            }
        }
        if tree.len() == before {
            break;
        }
    }
    let mut sandbox_procs = 0;
    let mut ranges = std::collections::BTreeSet::new();
    for (_, _, uid) in procs.iter().filter(|(_, _, uid)| *uid >= UID_BASE) {
        sandbox_procs += 1;
        ranges.insert((uid - UID_BASE) / UID_RANGE);
    }
    let cgroups: usize = std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|h| count_dirs(&h.path().join("execbox")))
        .sum();
    let pid = server.pid();
    BTreeMap::from([
        ("server and its sandboxes' processes", tree.len()),
        ("sandbox processes (uid >= 1e9)", sandbox_procs),
        ("uid ranges in use", ranges.len()),
        ("host mounts", lines("/proc/self/mountinfo")),
        ("server mounts", lines(&format!("/proc/{pid}/mountinfo"))),
        ("execbox cgroups", cgroups),
        (
            "server fds",
            count_files(Path::new(&format!("/proc/{pid}/fd"))),
        ),
        (
            "state files",
            count_files(&server.state_dir().join("sandboxes")),
        ),
    ])
}

fn cycle(server: &Server) -> Res<()> {
    let sb = Sandbox::create(
        server,
        json!({"image": {"uri": "default"}, "entrypoint": ["tail", "-f", "/dev/null"],
               "resourceLimits": {"cpu": "500m", "memory": "128Mi"}, "timeout": 600}),
    )?;
    let out = sb
        .req("POST", "/command")
        .send_json(json!({"command": "echo leak-check"}))
        .map_err(|e| format!("command: {e}"))?
        .into_string()
        .map_err(|e| e.to_string())?;
    if !out.contains("leak-check") {
        return Err(format!("unexpected output: {out}"));
    }
    ureq::delete(&format!("{}/v1/sandboxes/{}", server.base, sb.id))
        .call()
        .map_err(|e| format!("delete: {e}"))?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    let n = env_usize("EXECBOX_LEAK_CYCLES", 10_000);
    println!(
        "leak check: {n} create → exec → delete cycles on {}",
        machine()
    );
    let server = match Server::start("leaks") {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // One cycle first, so that what the server keeps for good (skeletons, pools) is counted
    // in the baseline.
    if let Err(e) = cycle(&server) {
        eprintln!("first cycle: {e}");
        server.stop();
        return std::process::ExitCode::FAILURE;
    }
    std::thread::sleep(Duration::from_secs(1));
    let before = counts(&server);
    let started = Instant::now();
    let mut failures = 0;
    for i in 1..=n {
        if let Err(e) = cycle(&server) {
            failures += 1;
            eprintln!("cycle {i}: {e}");
        }
        if i % 1000 == 0 {
            println!(
                "  {i} cycles, {:.1} ms each on average",
                started.elapsed().as_secs_f64() * 1e3 / i as f64
            );
        }
    }
    // Removals finish off the request path.
    std::thread::sleep(Duration::from_secs(3));
    let after = counts(&server);
    println!("{:<34} {:>8} {:>8}", "", "before", "after");
    let mut leaked = false;
    for (name, b) in &before {
        let a = after.get(name).copied().unwrap_or(0);
        let mark = if a > *b { "  <- grew" } else { "" };
        leaked |= a > *b;
        println!("{name:<34} {b:>8} {a:>8}{mark}");
    }
    println!(
        "{n} cycles in {:.1} s, {failures} failed",
        started.elapsed().as_secs_f64()
    );
    server.stop();
    if leaked || failures > 0 {
        println!("LEAK CHECK FAILED");
        std::process::ExitCode::FAILURE
    } else {
        println!("no leaks");
        std::process::ExitCode::SUCCESS
    }
}
