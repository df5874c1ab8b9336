//! Held-connection benchmark: a real release `execbox serve` on loopback with its default
//! limits, `GET /health` on a new connection each time, first with no other client, then while
//! 5,000 connections hold request heads that never end; and the server's resident memory
//! before, while they are held, and after the server has timed them out.
//!
//! Run: `cargo bench -p execbox --bench connections` (as root, or with a limit on open files
//! above the held count). `EXECBOX_BENCH_N` sets the number of `/health` requests per series
//! (default 2000), `EXECBOX_BENCH_HELD` the held connections (default 5000).
//!
//! Budgets (the connection-hardening issue, this machine class): `/health` p99 with 5,000
//! held connections ≤ 5 ms and no request refused; RSS after the burst within 20% of before.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

mod support;

use support::{env_usize, machine, Res, Server};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn port_of(base: &str) -> Res<u16> {
    base.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("no port in {base}"))
}

/// One `GET /health` on a new connection, read to the end; its time in ms.
fn health(port: u16) -> Res<f64> {
    let t = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).map_err(|e| e.to_string())?;
    if !resp.starts_with(b"HTTP/1.1 200") {
        return Err(format!(
            "unexpected answer {:?}",
            String::from_utf8_lossy(&resp)
        ));
    }
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

fn series(port: u16, n: usize) -> (Vec<f64>, usize) {
    let mut ms = Vec::with_capacity(n);
    let mut errors = 0;
    for _ in 0..n {
        match health(port) {
            Ok(v) => ms.push(v),
            Err(_) => errors += 1,
        }
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    (ms, errors)
}

fn raise_fd_limit(want: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < want {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard);
        }
    }
}

fn run(n: usize, held: usize) -> Res<()> {
    raise_fd_limit(held as u64 + 1024);
    let server = Server::start("connections")?;
    let port = port_of(&server.base)?;
    let pid = server.pid();

    // Warm-up, then the baseline.
    let _ = series(port, 200);
    std::thread::sleep(Duration::from_secs(1));
    let before = rss_kib(pid);
    let (idle, idle_errors) = series(port, n);

    let t = Instant::now();
    let mut conns = Vec::with_capacity(held);
    for i in 0..held {
        let mut s = TcpStream::connect(("127.0.0.1", port))
            .map_err(|e| format!("held connection {i}: {e}"))?;
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            .map_err(|e| format!("held connection {i}: {e}"))?;
        conns.push(s);
    }
    let opened = t.elapsed();
    let (busy, busy_errors) = series(port, n);
    let during = rss_kib(pid);
    let measured = t.elapsed();

    // The server closes them at its header timeout (default 10 s); wait for every EOF.
    let mut b = [0u8; 64];
    for s in &mut conns {
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        while matches!(s.read(&mut b), Ok(n) if n > 0) {}
    }
    let closed = t.elapsed();
    drop(conns);
    let mut after = rss_kib(pid);
    let settle = Instant::now();
    while after > before + before / 5 && settle.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(250));
        after = rss_kib(pid);
    }
    server.stop();

    println!(
        "  {:<34} {:>10} {:>10} {:>8}",
        "GET /health (new connection)", "p50", "p99", "errors"
    );
    for (label, ms, errors) in [
        ("no other connection".to_string(), &idle, idle_errors),
        (format!("{held} held half-open"), &busy, busy_errors),
    ] {
        println!(
            "  {label:<34} {:>7.3} ms {:>7.3} ms {errors:>8}",
            support::percentile_ms(ms, 0.50),
            support::percentile_ms(ms, 0.99)
        );
    }
    println!(
        "\n  held connections: opened in {:.2} s, measured until {:.2} s, all closed by the \
         server at {:.2} s",
        opened.as_secs_f64(),
        measured.as_secs_f64(),
        closed.as_secs_f64()
    );
    println!(
        "  server RSS: before {:.1} MiB, during {:.1} MiB ({:.1} KiB per held connection), \
         after {:.1} MiB",
        before as f64 / 1024.0,
        during as f64 / 1024.0,
        (during.saturating_sub(before)) as f64 / held.max(1) as f64,
        after as f64 / 1024.0
    );
    println!(
        "  budgets: p99 with {held} held <= 5 ms: {}; after within 20% of before: {}",
        if support::percentile_ms(&busy, 0.99) <= 5.0 && busy_errors == 0 {
            "met"
        } else {
            "MISSED"
        },
        if after <= before + before / 5 {
            "met"
        } else {
            "MISSED"
        }
    );
    Ok(())
}

fn main() {
    let n = env_usize("EXECBOX_BENCH_N", 2000);
    let held = env_usize("EXECBOX_BENCH_HELD", 5000);
    println!("execbox held-connection benchmark ({n} requests per series)");
    println!("  {}\n", machine());
    if let Err(e) = run(n, held) {
        println!("  failed: {e}");
    }
}
