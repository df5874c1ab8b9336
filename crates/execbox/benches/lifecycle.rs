//! Sandbox lifecycle benchmark: create→agent ready and delete, with the writable layer on a
//! disk (the default) and in memory (the earlier, RAM-backed path), side by side with a bare
//! `unshare` (and `bwrap` when installed) starting a process in the same namespaces, measured in
//! the same run; then the memory cost of idle sandboxes and 500 of them at once.
//!
//! Run: `cargo bench -p execbox --bench lifecycle` (as root). `EXECBOX_BENCH_N` sets the number
//! of sandboxes per series (default 200), `EXECBOX_BENCH_IDLE` the idle count (default 500).
//!
//! Budgets (issue #2, this machine class): create→ready p50 ≤ 10 ms, p99 ≤ 30 ms; an idle
//! sandbox ≤ 2 MiB of host memory; 500 idle sandboxes at once work.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use execbox_server::local::{
    LocalBackend, LocalConfig, Placement, SandboxLimits, SandboxParams, StorageMedium,
};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name:<44} n={:<4} p50={:>8.2} ms  p99={:>8.2} ms",
        samples.len(),
        percentile(&samples, 0.50).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3
    );
}

fn time_command(n: usize, program: &str, args: &[&str]) -> Option<Vec<Duration>> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let ok = Command::new(program).args(args).status().ok()?.success();
        if !ok {
            return None;
        }
        v.push(t.elapsed());
    }
    Some(v)
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn private_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("Private_Clean:") || l.starts_with("Private_Dirty:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

fn main() {
    let n = env_usize("EXECBOX_BENCH_N", 200);
    let idle = env_usize("EXECBOX_BENCH_IDLE", 500);
    let state_dir = std::env::temp_dir().join(format!("execbox-bench-{}", std::process::id()));
    let make_backend = |storage: StorageMedium, name: &str| {
        LocalBackend::new(LocalConfig {
            state_dir: state_dir.join(name),
            agent_exe: PathBuf::from(env!("CARGO_BIN_EXE_execbox")),
            python: None,
            seccomp: true,
            landlock: execbox_server::doctor::landlock_available(),
            default_pids: 512,
            cgroup_base: format!("execbox-bench-{name}"),
            max_upload_bytes: 0,
            context_idle_ttl_secs: 0,
            storage,
            default_disk_bytes: 1 << 30,
            volume_owner: (1000, 1000),
        })
        .expect("backend")
    };
    let backend = make_backend(StorageMedium::Disk, "disk");
    let in_memory = make_backend(StorageMedium::Memory, "memory");
    let params = |id: &str| SandboxParams {
        id: Box::leak(id.to_string().into_boxed_str()),
        limits: SandboxLimits {
            cpu_millicores: Some(1000),
            memory_bytes: Some(512 << 20),
            ..Default::default()
        },
        env: Vec::new(),
        entrypoint: Vec::new(),
        network: false,
        image: None,
        workdir: None,
        template: None,
        volumes: &[],
    };

    println!("execbox lifecycle benchmark ({n} sandboxes per series)\n");
    for (label, backend) in [("disk", &backend), ("memory", &in_memory)] {
        // Warm-up: page cache, skeleton, the formatted disk.
        for i in 0..5 {
            let id = format!("warm{i}");
            let p = backend.create(params(&id)).expect("create");
            backend.destroy(&id, &p).expect("destroy");
        }
        let mut creates = Vec::with_capacity(n);
        let mut deletes = Vec::with_capacity(n);
        for i in 0..n {
            let id = format!("b{i}");
            let t = Instant::now();
            let p = backend.create(params(&id)).expect("create");
            creates.push(t.elapsed());
            let t = Instant::now();
            backend.destroy(&id, &p).expect("destroy");
            deletes.push(t.elapsed());
        }
        report(&format!("execbox create -> agent ready ({label})"), creates);
        report(&format!("execbox delete ({label})"), deletes);
    }
    drop(in_memory);
    match time_command(n, "unshare", &["-Urpmnfi", "--uts", "true"]) {
        Some(v) => report("baseline: unshare -Urpmnfi --uts true", v),
        None => println!("baseline: unshare unavailable"),
    }
    match time_command(
        n,
        "bwrap",
        &[
            "--unshare-all",
            "--ro-bind",
            "/",
            "/",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "true",
        ],
    ) {
        Some(v) => report("baseline: bwrap --unshare-all ... true", v),
        None => println!("baseline: bwrap not installed"),
    }
    match time_command(n, "/usr/bin/python3", &["-I", "-S", "-c", "pass"]) {
        Some(v) => report("baseline: /usr/bin/python3 -I -S -c pass", v),
        None => println!("baseline: python3 unavailable"),
    }

    // Idle sandboxes: all at once, then their memory.
    println!("\nstarting {idle} idle sandboxes at once...");
    let t = Instant::now();
    let mut live: Vec<(String, Placement)> = Vec::with_capacity(idle);
    for i in 0..idle {
        let id = format!("idle{i}");
        match backend.create(params(&id)) {
            Ok(p) => live.push((id, p)),
            Err(e) => {
                println!("sandbox {i} failed: {e}");
                break;
            }
        }
    }
    println!(
        "{} idle sandboxes running after {:.2} s",
        live.len(),
        t.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_millis(500));
    let cg_bytes: u64 = live
        .iter()
        .filter_map(|(id, _)| backend.stats(id))
        .map(|s| s.memory_current)
        .sum();
    let private: u64 = live.iter().map(|(_, p)| private_kib(p.pid)).sum();
    let count = live.len().max(1) as f64;
    println!(
        "idle sandbox host memory: {:.2} MiB charged to its cgroup (kernel + user), \
         {:.2} MiB private to its agent process",
        cg_bytes as f64 / count / 1048576.0,
        private as f64 / count / 1024.0
    );
    let t = Instant::now();
    for (id, p) in &live {
        let _ = backend.destroy(id, p);
    }
    println!(
        "deleted {} sandboxes in {:.2} s",
        live.len(),
        t.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&state_dir);
}
