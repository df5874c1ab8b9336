//! Outbound network benchmark, beside a baseline measured in the same run on the host:
//! - a 256 MiB download from a server on the host, through a sandbox's network (user-space
//!   stack in the server, one server socket per connection) vs. the same client on the host;
//! - TCP connection setup p50/p99 through the sandbox's network vs. on the host;
//! - the host memory a sandbox costs with networking on vs. off.
//!
//! Run: `cargo bench -p execbox --bench network` (as root). `EXECBOX_BENCH_N` sets the number of
//! connections timed (default 300), `EXECBOX_BENCH_IDLE` the sandboxes per memory series
//! (default 40).
//!
//! Targets (issue #11): download ≥ 50% of direct; ≤ 1 ms added to connection setup p50; ≤ 1 MiB
//! more host memory per sandbox with networking.

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::time::Duration;

use serde_json::{json, Value};
use support::{env_usize, machine, Res, Sandbox, Server};

const DOWNLOAD: u64 = 256 << 20;

/// Downloads timed on each side; the median is reported (one transfer is at the mercy of a
/// noisy neighbour on a small machine).
const DOWNLOADS: usize = 5;

/// The client both sides run: each download's bytes and seconds, then connect/close timings
/// (ms, one per line).
const CLIENT: &str = r#"
import socket, sys, time
host, port, size, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ip = socket.gethostbyname(host)
buf = bytearray(1 << 20)
for _ in range(DOWNLOADS):
    s = socket.create_connection((ip, port)); s.sendall(b"d")
    got = 0; t = time.perf_counter()
    while got < size:
        k = s.recv_into(buf)
        if not k: break
        got += k
    dt = time.perf_counter() - t
    s.close()
    print("download", got, dt)
for _ in range(n):
    t = time.perf_counter()
    c = socket.create_connection((ip, port)); c.sendall(b"c"); c.recv(1); c.close()
    print("connect", (time.perf_counter() - t) * 1e3)
"#;

fn host_address() -> Ipv4Addr {
    nix::ifaddrs::getifaddrs()
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
        .find(|ip| !ip.is_loopback())
        .unwrap_or(Ipv4Addr::LOCALHOST)
}

/// Serves `d` (a download of [`DOWNLOAD`] bytes) or `c` (one byte back) per connection.
fn serve(listener: TcpListener) {
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let _ = conn.set_nodelay(true);
                let mut cmd = [0u8; 1];
                if conn.read_exact(&mut cmd).is_err() {
                    return;
                }
                if cmd[0] == b'd' {
                    let chunk = vec![7u8; 1 << 20];
                    for _ in 0..(DOWNLOAD >> 20) {
                        if conn.write_all(&chunk).is_err() {
                            return;
                        }
                    }
                } else {
                    // As most clients do, the client closes first.
                    let _ = conn.write_all(b"k");
                    let _ = conn.read(&mut cmd);
                }
            });
        }
    });
}

struct Measured {
    /// MB/s of each download, sorted.
    downloads: Vec<f64>,
    connects: Vec<f64>,
}

fn parse(out: &str) -> Res<Measured> {
    let mut downloads = Vec::new();
    let mut connects = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["download", got, dt] => {
                let got: f64 = got.parse().map_err(|_| format!("bad line {line}"))?;
                let dt: f64 = dt.parse().map_err(|_| format!("bad line {line}"))?;
                downloads.push(got / dt / 1e6);
            }
            ["connect", ms] => connects.push(ms.parse().map_err(|_| format!("bad {line}"))?),
            _ => {}
        }
    }
    connects.sort_by(f64::total_cmp);
    downloads.sort_by(f64::total_cmp);
    Ok(Measured {
        downloads,
        connects,
    })
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Runs a shell command in the sandbox and returns its stdout.
fn run(sb: &Sandbox, cmd: &str) -> Res<String> {
    let text = sb
        .req("POST", "/command")
        .timeout(Duration::from_secs(300))
        .send_json(json!({"command": cmd, "timeout": 300000}))
        .map_err(|e| format!("command: {e}"))?
        .into_string()
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    for frame in text.split("\n\n") {
        let json = frame.strip_prefix("data: ").unwrap_or(frame);
        if let Ok(ev) = serde_json::from_str::<Value>(json) {
            if ev["type"] == "stdout" {
                out.push_str(ev["text"].as_str().unwrap_or(""));
                out.push('\n');
            }
        }
    }
    Ok(out)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn sandbox_body(network: bool) -> Value {
    let mut body = json!({"image": {"uri": "default"}, "entrypoint": ["tail", "-f", "/dev/null"],
        "resourceLimits": {"cpu": "1", "memory": "512Mi"}, "timeout": 600});
    if network {
        body["networkPolicy"] = json!({"defaultAction": "deny", "egress": [{"action": "allow", "target": "bench.test"}]});
    }
    body
}

/// Host memory of `count` idle sandboxes: the server's RSS growth plus what their cgroups are
/// charged, per sandbox, in KiB.
fn memory_per_sandbox(server: &Server, count: usize, network: bool) -> Res<(f64, f64)> {
    let before = rss_kib(server.pid());
    let mut made = Vec::new();
    for _ in 0..count {
        made.push(Sandbox::create(server, sandbox_body(network))?);
    }
    std::thread::sleep(Duration::from_millis(500));
    let server_kib = (rss_kib(server.pid()).saturating_sub(before)) as f64 / count as f64;
    let charged: u64 = made
        .iter()
        .map(|sb| {
            std::fs::read_to_string(format!(
                "/sys/fs/cgroup/memory/execbox/{}/memory.usage_in_bytes",
                sb.id
            ))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
        })
        .sum();
    for sb in &made {
        let _ = ureq::delete(&format!("{}/v1/sandboxes/{}", server.base, sb.id)).call();
    }
    Ok((server_kib, charged as f64 / 1024.0 / count as f64))
}

fn main() -> Res<()> {
    let n = env_usize("EXECBOX_BENCH_N", 300);
    let idle = env_usize("EXECBOX_BENCH_IDLE", 40);
    let host = host_address();
    let listener = TcpListener::bind((host, 0)).map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    serve(listener);
    // `EXECBOX_BENCH_WINDOW` sets `[network] tcp_window_bytes` (default: the server's).
    let window = std::env::var("EXECBOX_BENCH_WINDOW")
        .map(|w| format!("tcp_window_bytes = {w}\n"))
        .unwrap_or_default();
    let config = format!(
        "[network]\n{window}allow_addresses = [\"{host}:{port}\"]\n[network.hosts]\n\"bench.test\" = [\"{host}\"]\n"
    );
    let server = Server::start_with_config("network", Some(&config))?;
    println!("execbox network benchmark on {}\n", machine());

    let client = CLIENT.replace("DOWNLOADS", &DOWNLOADS.to_string());
    // Baseline: the same client on the host, straight to the server.
    let direct = std::process::Command::new("python3")
        .args([
            "-c",
            &client,
            &host.to_string(),
            &port.to_string(),
            &DOWNLOAD.to_string(),
            &n.to_string(),
        ])
        .output()
        .map_err(|e| e.to_string())?;
    let direct = parse(&String::from_utf8_lossy(&direct.stdout))?;
    let sb = Sandbox::create(&server, sandbox_body(true))?;
    let script = client.replace('\'', "'\\''");
    let out = run(
        &sb,
        &format!("python3 -c '{script}' bench.test {port} {DOWNLOAD} {n}"),
    )?;
    let through = parse(&out)?;

    let (d, t) = (&direct.downloads, &through.downloads);
    println!(
        "download 256 MiB, host (direct)           median {:>7.1} MB/s  (of {}: {:.0}..{:.0})",
        pct(d, 0.5),
        d.len(),
        pct(d, 0.0),
        pct(d, 1.0)
    );
    println!(
        "download 256 MiB, through the sandbox net median {:>7.1} MB/s  (of {}: {:.0}..{:.0}; {:.0}% of direct; target >= 50%)",
        pct(t, 0.5),
        t.len(),
        pct(t, 0.0),
        pct(t, 1.0),
        100.0 * pct(t, 0.5) / pct(d, 0.5).max(1e-9)
    );
    println!(
        "connect+1 byte+close, host (direct)       n={:<4} p50={:>7.3} ms  p99={:>7.3} ms",
        direct.connects.len(),
        pct(&direct.connects, 0.5),
        pct(&direct.connects, 0.99)
    );
    println!(
        "connect+1 byte+close, through the sandbox n={:<4} p50={:>7.3} ms  p99={:>7.3} ms  (+{:.3} ms p50; target <= 1 ms)",
        through.connects.len(),
        pct(&through.connects, 0.5),
        pct(&through.connects, 0.99),
        pct(&through.connects, 0.5) - pct(&direct.connects, 0.5)
    );
    let _ = ureq::delete(&format!("{}/v1/sandboxes/{}", server.base, sb.id)).call();

    let (srv_off, cg_off) = memory_per_sandbox(&server, idle, false)?;
    let (srv_on, cg_on) = memory_per_sandbox(&server, idle, true)?;
    println!(
        "idle sandbox, network off: {:>7.0} KiB server + {:>7.0} KiB charged",
        srv_off, cg_off
    );
    println!(
        "idle sandbox, network on:  {:>7.0} KiB server + {:>7.0} KiB charged  (+{:.0} KiB; target <= 1024)",
        srv_on,
        cg_on,
        (srv_on + cg_on) - (srv_off + cg_off)
    );
    server.stop();
    Ok(())
}
