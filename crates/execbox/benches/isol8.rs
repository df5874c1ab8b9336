//! isol8 one-shot benchmark: a real release `execbox serve` on loopback, `POST /execute` of
//! `print("hello")` (python, no session: a fresh sandbox per run, destroyed afterwards), side by
//! side in the same run with the bare interpreter, `<python3> -c 'print("hello")'` by absolute
//! path, the same interpreter the sandboxes run.
//!
//! Series:
//! 1. bare interpreter, spawned and waited for from this process;
//! 2. `/execute` through the server with the warm pool (default: 2 ready sandboxes) and its
//!    pre-started Python (`warm_pool_prestart = "python"`, the default): the run pays only for
//!    executing the code;
//! 3. the same pool with pre-starting off (`warm_pool_prestart = "none"`): a fresh interpreter
//!    per run in a ready sandbox;
//! 4. `/execute` with the pool off (`warm_pool_size = 0`): a sandbox started per request;
//! 5. 50 concurrent one-shot runs (with the pool), counting errors.
//!
//! Run: `cargo bench -p execbox --bench isol8` (as root). `EXECBOX_BENCH_ISOL8_N` sets the
//! number of sequential runs (default 200), `EXECBOX_BENCH_ISOL8_CONCURRENT` the concurrent
//! ones (default 50), `EXECBOX_BENCH_PYTHON` the interpreter (default `/usr/bin/python3` when
//! present: a pyenv build may load site hooks costing tens of milliseconds per start).
//!
//! Targets (issue 15): with the pool and pre-started Python, p50 <= 0.75x the bare p50 and p99
//! <= 1.5x the bare p50; 50 concurrent runs with no error.

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

fn sequential(base: &str, n: usize) -> Res<Vec<f64>> {
    // Warm-up: page cache, the pool's first sandboxes.
    for _ in 0..5 {
        execute_once(base)?;
    }
    (0..n).map(|_| execute_once(base)).collect()
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

    let mut prestarted = None;
    let mut concurrent_wall = f64::NAN;
    match Server::start_with_config("isol8-pool", Some(&config(&python, 2, "python"))) {
        Ok(server) => {
            match sequential(&server.base, n) {
                Ok(ms) => {
                    prestarted = Some(report(
                        "POST /execute, warm pool, pre-started python",
                        ms,
                        "target p50 <= 0.75x bare, p99 <= 1.5x bare p50",
                    ))
                }
                Err(e) => println!("  /execute with the pool failed: {e}"),
            }
            settle();
            let (ok, errors, wall) = concurrent(&server.base, c);
            concurrent_wall = wall;
            report(
                &format!("{c} concurrent POST /execute"),
                ok,
                &format!("wall {wall:.0} ms, errors: {} (target 0)", errors.len()),
            );
            for e in errors.iter().take(5) {
                println!("    error: {e}");
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
            match sequential(&server.base, n) {
                Ok(ms) => {
                    pooled = Some(report(
                        "POST /execute, warm pool, fresh interpreter",
                        ms,
                        "(pre-starting off)",
                    ))
                }
                Err(e) => println!("  /execute with the pool failed: {e}"),
            }
            server.stop();
        }
        Err(e) => println!("  server failed: {e}"),
    }

    let mut unpooled = None;
    match Server::start_with_config("isol8-nopool", Some(&config(&python, 0, "none"))) {
        Ok(server) => {
            match sequential(&server.base, n.min(100)) {
                Ok(ms) => {
                    unpooled = Some(report(
                        "POST /execute, no pool (sandbox per run)",
                        ms,
                        "(for comparison)",
                    ))
                }
                Err(e) => println!("  /execute without the pool failed: {e}"),
            }
            server.stop();
        }
        Err(e) => println!("  server failed: {e}"),
    }

    println!();
    let (pre50, pre99) = prestarted.unwrap_or((f64::NAN, f64::NAN));
    support::target_row(
        "isol8 /execute print(\"hello\"), warm pool, p50",
        pre50,
        bare_p50,
        "ms",
        "bare python3 -c p50",
        support::Goal::RatioAtMost(0.75),
    );
    support::target_row(
        "isol8 /execute print(\"hello\"), warm pool, p99",
        pre99,
        bare_p50,
        "ms",
        "bare python3 -c p50",
        support::Goal::RatioAtMost(1.5),
    );
    support::target_row(
        "the pool's gain: pool p50 over no-pool p50",
        pre50,
        unpooled.map_or(f64::NAN, |(p50, _)| p50),
        "ms",
        "no pool p50",
        support::Goal::RatioAtMost(1.0),
    );
    support::target_row(
        &format!("{c} concurrent one-shot runs, wall"),
        concurrent_wall,
        bare_wall,
        "ms",
        &format!("{c} bare runs 2 at a time"),
        support::Goal::RatioAtMost(1.25),
    );
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
