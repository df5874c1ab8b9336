//! isol8 one-shot benchmark: a real release `execbox serve` on loopback, `POST /execute` of
//! `print("hello")` (python, no session: a fresh sandbox per run, destroyed afterwards), side by
//! side in the same run with the bare interpreter, `<python3> -c 'print("hello")'` by absolute
//! path, the same interpreter the sandboxes run.
//!
//! Series:
//! 1. bare interpreter, spawned and waited for from this process;
//! 2. `/execute` through the server with the warm pool (default: 2 ready sandboxes) and its
//!    pre-started Python (`warm_pool_prestart = "python"`, the default): the run pays only for
//!    executing the code. Twice: runs 100 ms apart (`EXECBOX_BENCH_ISOL8_PAUSE_MS`), as a
//!    caller that uses each result makes them, so that each finds the pool warm again; and back
//!    to back, where 2 CPUs cannot ready a sandbox (≈30 ms of CPU: its start and Python's) per
//!    4 ms run, so that many runs find the pool empty and start a sandbox of their own;
//! 3. the same pool with pre-starting off (`warm_pool_prestart = "none"`): a fresh interpreter
//!    per run in a ready sandbox;
//! 4. `/execute` with the pool off (`warm_pool_size = 0`): a sandbox started per request;
//! 5. 50 concurrent one-shot runs, counting errors: a first burst finds the pool at its resting
//!    size; the pool then grows to the burst (`warm_pool_max` = 50 here, an operator's setting),
//!    and a second burst finds it grown.
//!
//! Run: `cargo bench -p execbox --bench isol8` (as root). `EXECBOX_BENCH_ISOL8_N` sets the
//! number of sequential runs (default 200), `EXECBOX_BENCH_ISOL8_CONCURRENT` the concurrent
//! ones (default 50), `EXECBOX_BENCH_PYTHON` the interpreter (default `/usr/bin/python3` when
//! present: a pyenv build may load site hooks costing tens of milliseconds per start), also
//! the sandboxes' (`python =` in the servers' configuration).
//!
//! Targets (issue 15): with the pool and pre-started Python, p50 <= 0.75x the bare p50 and p99
//! <= 1.5x the bare p50; 50 concurrent runs with no error, within 1.25x of 50 bare runs two at
//! a time.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::{json, Value};

mod support;

use support::{describe, env_usize, machine, Res, Server};

/// Prints one series; returns its (p50, p99).
fn report(label: &str, mut ms: Vec<f64>, target: &str) -> (f64, f64) {
    ms.sort_by(|a, b| a.total_cmp(b));
    let (p50, p99) = (
        support::percentile_ms(&ms, 0.50),
        support::percentile_ms(&ms, 0.99),
    );
    println!(
        "  {label:<44} n={:<4} p50={p50:>8.2} ms  p99={p99:>8.2} ms  {target}",
        ms.len(),
    );
    (p50, p99)
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("EXECBOX_BENCH_PYTHON") {
        return PathBuf::from(p);
    }
    let system = PathBuf::from("/usr/bin/python3");
    if system.exists() {
        return system;
    }
    Command::new("python3")
        .args([
            "-c",
            "import os,sys;print(os.path.realpath(sys.executable))",
        ])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| PathBuf::from(s.trim()))
        .unwrap_or_else(|| PathBuf::from("python3"))
}

fn bare(python: &std::path::Path, n: usize) -> Res<Vec<f64>> {
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let out = Command::new(python)
            .args(["-c", "print(\"hello\")"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{}: {e}", python.display()))?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        if out.stdout != b"hello\n" {
            return Err(format!("bare python printed {:?}", out.stdout));
        }
    }
    Ok(ms)
}

fn execute_once(base: &str) -> Res<f64> {
    let body = json!({"request": {"runtime": "python", "code": "print(\"hello\")"}});
    let t = Instant::now();
    let r = ureq::post(&format!("{base}/execute"))
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .map_err(describe)?;
    let v: Value = r.into_json().map_err(|e| e.to_string())?;
    let elapsed = t.elapsed().as_secs_f64() * 1e3;
    if v["stdout"] != "hello" || v["exitCode"] != 0 {
        return Err(format!("unexpected result {v}"));
    }
    Ok(elapsed)
}

/// `n` runs one after the other, `pause` apart (after a warm-up: page cache, the pool's first
/// sandboxes).
fn sequential(base: &str, n: usize, pause: std::time::Duration) -> Res<Vec<f64>> {
    for _ in 0..5 {
        execute_once(base)?;
        std::thread::sleep(pause);
    }
    (0..n)
        .map(|_| {
            let ms = execute_once(base);
            std::thread::sleep(pause);
            ms
        })
        .collect()
}

fn concurrent(base: &str, n: usize) -> (Vec<f64>, Vec<String>, f64) {
    let t = Instant::now();
    let results: Vec<Res<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n).map(|_| s.spawn(|| execute_once(base))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
            .collect()
    });
    let wall = t.elapsed().as_secs_f64() * 1e3;
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(ms) => ok.push(ms),
            Err(e) => errors.push(e),
        }
    }
    (ok, errors, wall)
}

fn config(python: &std::path::Path, pool: usize, prestart: &str) -> String {
    format!(
        "python = {:?}\n[policy]\nwarm_pool_size = {pool}\nwarm_pool_prestart = {prestart:?}\n",
        python.display().to_string()
    )
}

/// [`config`] with the pool allowed to grow to `max` and metrics on `metrics_port`.
fn growing_config(python: &std::path::Path, max: usize, metrics_port: u16) -> String {
    format!(
        "{}warm_pool_max = {max}\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
        config(python, 2, "python")
    )
}

/// Whether the warm pool has as many ready sandboxes as it means to keep now (its target
/// follows the last burst's peak of runs at once), from the metrics listener.
fn pool_at_target(metrics_port: u16) -> bool {
    let Some(text) = ureq::get(&format!("http://127.0.0.1:{metrics_port}/metrics"))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
    else {
        return false;
    };
    let gauge = |name: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{pool=\"warm\"}}")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    matches!(
        (gauge("execbox_pool_ready"), gauge("execbox_pool_target")),
        (Some(ready), Some(target)) if ready >= target
    )
}

/// Reports a series, or why it failed; returns its (p50, p99).
fn series(label: &str, note: &str, ms: Res<Vec<f64>>) -> Option<(f64, f64)> {
    match ms {
        Ok(ms) => Some(report(label, ms, note)),
        Err(e) => {
            println!("  {label}: failed: {e}");
            None
        }
    }
}

/// Waits (bounded) until the pool has had time to ready its sandboxes again, so that a series
/// measures runs that find one.
fn settle() {
    std::thread::sleep(std::time::Duration::from_millis(1500));
}

fn main() {
    let n = env_usize("EXECBOX_BENCH_ISOL8_N", 200);
    let c = env_usize("EXECBOX_BENCH_ISOL8_CONCURRENT", 50);
    let python = python();
    println!("execbox isol8 one-shot benchmark");
    println!("  {}, interpreter: {}\n", machine(), python.display());

    let bare_p50 = match bare(&python, n) {
        Ok(ms) => {
            report(
                &format!("bare {} -c 'print(\"hello\")'", python.display()),
                ms,
                "(baseline)",
            )
            .0
        }
        Err(e) => {
            println!("  bare interpreter failed: {e}");
            f64::NAN
        }
    };

    let pause_ms = env_usize("EXECBOX_BENCH_ISOL8_PAUSE_MS", 100);
    let pause = std::time::Duration::from_millis(pause_ms as u64);
    let mut prestarted = None;
    let mut back_to_back = None;
    let mut concurrent_walls = [f64::NAN; 2];
    let metrics_port = support::free_port().unwrap_or(0);
    match Server::start_with_config(
        "isol8-pool",
        Some(&growing_config(&python, c.max(2), metrics_port)),
    ) {
        Ok(server) => {
            prestarted = series(
                &format!("POST /execute, warm pool, pre-started python, runs {pause_ms} ms apart"),
                "target p50 <= 0.75x bare, p99 <= 1.5x bare p50",
                sequential(&server.base, n, pause),
            );
            settle();
            back_to_back = series(
                "POST /execute, warm pool, pre-started python, back to back",
                "(the pool refills slower than runs end)",
                sequential(&server.base, n, std::time::Duration::ZERO),
            );
            settle();
            for (i, label) in ["pool at rest", "pool grown to the burst"]
                .iter()
                .enumerate()
            {
                let (ok, errors, wall) = concurrent(&server.base, c);
                concurrent_walls[i] = wall;
                report(
                    &format!("{c} concurrent POST /execute, {label}"),
                    ok,
                    &format!("wall {wall:.0} ms, errors: {} (target 0)", errors.len()),
                );
                for e in errors.iter().take(5) {
                    println!("    error: {e}");
                }
                // The pool grows toward the burst's size; wait (bounded) until it has.
                settle();
                let deadline = Instant::now() + std::time::Duration::from_secs(60);
                while !pool_at_target(metrics_port) && Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                settle();
            }
            server.stop();
        }
        Err(e) => println!("  server failed: {e}"),
    }

    let bare_wall = bare_two_at_a_time(&python, c);
    println!("  baseline: {c} bare runs, 2 at a time (one per core): wall {bare_wall:.0} ms");

    let mut pooled = None;
    match Server::start_with_config("isol8-pool-fresh", Some(&config(&python, 2, "none"))) {
        Ok(server) => {
            pooled = series(
                "POST /execute, warm pool, fresh interpreter",
                "(pre-starting off)",
                sequential(&server.base, n, std::time::Duration::ZERO),
            );
            server.stop();
        }
        Err(e) => println!("  server failed: {e}"),
    }

    let mut unpooled = None;
    match Server::start_with_config("isol8-nopool", Some(&config(&python, 0, "none"))) {
        Ok(server) => {
            unpooled = series(
                "POST /execute, no pool (sandbox per run)",
                "(for comparison)",
                sequential(&server.base, n.min(100), std::time::Duration::ZERO),
            );
            server.stop();
        }
        Err(e) => println!("  server failed: {e}"),
    }

    println!();
    let (pre50, pre99) = prestarted.unwrap_or((f64::NAN, f64::NAN));
    let (b2b50, b2b99) = back_to_back.unwrap_or((f64::NAN, f64::NAN));
    for (what, p50, p99) in [
        (format!("runs {pause_ms} ms apart"), pre50, pre99),
        ("back to back".to_string(), b2b50, b2b99),
    ] {
        support::target_row(
            &format!("isol8 /execute print(\"hello\"), warm pool, {what}, p50"),
            p50,
            bare_p50,
            "ms",
            "bare python3 -c p50",
            support::Goal::RatioAtMost(0.75),
        );
        support::target_row(
            &format!("isol8 /execute print(\"hello\"), warm pool, {what}, p99"),
            p99,
            bare_p50,
            "ms",
            "bare python3 -c p50",
            support::Goal::RatioAtMost(1.5),
        );
    }
    support::target_row(
        "the pool's gain: pool p50 over no-pool p50",
        pre50,
        unpooled.map_or(f64::NAN, |(p50, _)| p50),
        "ms",
        "no pool p50",
        support::Goal::RatioAtMost(1.0),
    );
    for (label, wall) in [
        ("pool at rest", concurrent_walls[0]),
        ("pool grown to the burst", concurrent_walls[1]),
    ] {
        support::target_row(
            &format!("{c} concurrent one-shot runs, {label}, wall"),
            wall,
            bare_wall,
            "ms",
            &format!("{c} bare runs 2 at a time"),
            support::Goal::RatioAtMost(1.25),
        );
    }
    if let Some((p50, p99)) = prestarted {
        let ratio = p50 / bare_p50;
        let p99_ratio = p99 / bare_p50;
        println!(
            "  pre-started vs bare: p50 {ratio:.2}x ({}), p99 {p99_ratio:.2}x bare p50 ({})",
            if ratio <= 0.75 {
                "target <= 0.75x met"
            } else {
                "target <= 0.75x MISSED"
            },
            if p99_ratio <= 1.5 {
                "target <= 1.5x met"
            } else {
                "target <= 1.5x MISSED"
            },
        );
        if let Some((fresh50, _)) = pooled {
            println!(
                "  pre-starting's gain in the pool: p50 {fresh50:.2} -> {p50:.2} ms ({:.2} ms)",
                fresh50 - p50
            );
        }
        if let Some((none50, _)) = unpooled {
            println!(
                "  the pool's gain over no pool: p50 {none50:.2} -> {p50:.2} ms ({:.2} ms)",
                none50 - p50
            );
        }
    }
}

/// Wall time of `n` bare runs, two at a time (one per core of the machine the table is for).
fn bare_two_at_a_time(python: &std::path::Path, n: usize) -> f64 {
    let t = Instant::now();
    std::thread::scope(|s| {
        for half in [n / 2, n - n / 2] {
            s.spawn(move || {
                let _ = bare(python, half);
            });
        }
    });
    t.elapsed().as_secs_f64() * 1e3
}
