//! TLS vs. plain HTTP on the listener: two release `execbox serve` on loopback in the same run,
//! one with `[tls]` (a certificate made here with rcgen, ECDSA P-256) and one without, each
//! with one sandbox, driven by the same keep-alive client (ureq; rustls with ring for TLS):
//!
//! 1. round trip of a foreground `echo hi` through the execd proxy (POST /command, SSE read to
//!    EOF), the two servers alternating request by request so that load on the machine
//!    weighs on both alike: p50 and p99 of each, and their ratio;
//! 2. download of a 1 GiB file through the execd files API (GET /files/download to a sink),
//!    alternating plain, TLS, plain, TLS: MB/s of each (the better of its two runs), and the
//!    ratio.
//!
//! 3. the same download with curl as the client (OpenSSL for TLS), which shows the server's
//!    side without rustls's client reader (4 KiB per read) weighing on a small machine.
//!
//! Targets: TLS round trip p50 ≤ 1.10× plain; TLS download ≥ 70% of plain.
//!
//! Run: `cargo bench -p execbox --bench tls` (as root). `EXECBOX_BENCH_ECHO_N` sets the round
//! trips per server (default 300), `EXECBOX_BENCH_FILE_MIB` the file size (default 1024).
//!
//! The release profile aborts on panic, so nothing here panics: failures are reported and the
//! run goes on to the cleanup.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod support;

use support::{describe, env_usize, machine, Res};

const MIB: u64 = 1 << 20;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A CA and a server certificate for 127.0.0.1, as PEM files in `dir`; returns the CA's DER
/// and the `[tls]` table.
fn make_certificates(dir: &std::path::Path) -> Res<(Vec<u8>, String)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let e = |e: rcgen::Error| e.to_string();
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "execbox bench CA");
    let ca_key = KeyPair::generate().map_err(e)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(e)?;
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_string()]).map_err(e)?;
    leaf.distinguished_name
        .push(DnType::CommonName, "execbox bench");
    let key = KeyPair::generate().map_err(e)?;
    let cert = leaf.signed_by(&key, &issuer).map_err(e)?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).map_err(|e| e.to_string())?;
    let (crt_path, key_path) = (dir.join("server.crt"), dir.join("server.key"));
    std::fs::write(&crt_path, cert.pem()).map_err(|e| e.to_string())?;
    std::fs::write(&key_path, key.serialize_pem()).map_err(|e| e.to_string())?;
    Ok((
        ca_cert.der().to_vec(),
        format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            crt_path.display(),
            key_path.display()
        ),
    ))
}

/// A release server on a free loopback port, plain or with TLS.
struct Server {
    child: Child,
    base: String,
    agent: ureq::Agent,
    state_dir: PathBuf,
}

impl Server {
    fn start(
        name: &str,
        dir: &std::path::Path,
        tls: Option<&str>,
        agent: ureq::Agent,
    ) -> Res<Self> {
        let port = support::free_port()?;
        let state_dir = dir.join(format!("state-{name}"));
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, tls.unwrap_or("")).map_err(|e| e.to_string())?;
        let child = support::spawn_serve(Some(&config), port, &state_dir)?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let server = Server {
            child,
            base: format!("{scheme}://127.0.0.1:{port}"),
            agent,
            state_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if server
                .agent
                .get(&format!("{}/health", server.base))
                .call()
                .is_ok()
            {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        server.stop();
        Err(format!("the {name} server did not come up"))
    }

    fn stop(mut self) {
        let t = Duration::from_secs(30);
        if let Ok(r) = self
            .agent
            .get(&format!("{}/v1/sandboxes?pageSize=200", self.base))
            .timeout(t)
            .call()
        {
            if let Ok(v) = r.into_json::<Value>() {
                for item in v["items"].as_array().cloned().unwrap_or_default() {
                    if let Some(id) = item["id"].as_str() {
                        let _ = self
                            .agent
                            .delete(&format!("{}/v1/sandboxes/{id}", self.base))
                            .timeout(t)
                            .call();
                    }
                }
            }
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }

    /// Creates a sandbox; returns its execd base URL and token.
    fn sandbox(&self) -> Res<(String, String)> {
        let v: Value = self
            .agent
            .post(&format!("{}/v1/sandboxes", self.base))
            .timeout(Duration::from_secs(60))
            .send_json(json!({
                "image": {"uri": "default"},
                "entrypoint": ["tail", "-f", "/dev/null"],
                "resourceLimits": {"cpu": "2", "memory": "3Gi", "disk": "2Gi"},
            }))
            .map_err(|e| format!("create: {}", describe(e)))?
            .into_json()
            .map_err(|e| e.to_string())?;
        let id = v["id"].as_str().ok_or("no id")?;
        let ep: Value = self
            .agent
            .get(&format!("{}/v1/sandboxes/{id}/endpoints/44772", self.base))
            .call()
            .map_err(|e| format!("endpoint: {}", describe(e)))?
            .into_json()
            .map_err(|e| e.to_string())?;
        let scheme = self.base.split("://").next().unwrap_or("http");
        let endpoint = format!(
            "{scheme}://{}",
            ep["endpoint"].as_str().ok_or("no endpoint")?
        );
        let token = ep["headers"]["X-EXECD-ACCESS-TOKEN"]
            .as_str()
            .ok_or("no token")?
            .to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self
            .agent
            .get(&format!("{endpoint}/ping"))
            .set("X-EXECD-ACCESS-TOKEN", &token)
            .call()
            .is_err()
        {
            if Instant::now() > deadline {
                return Err("the sandbox never answered /ping".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok((endpoint, token))
    }
}

/// One side of the comparison: a server, its sandbox and the client.
struct Side {
    name: &'static str,
    /// curl's arguments to trust the server.
    curl_trust: Vec<String>,
    server: Server,
    endpoint: String,
    token: String,
}

impl Side {
    fn req(&self, method: &str, path: &str) -> ureq::Request {
        self.server
            .agent
            .request(method, &format!("{}{path}", self.endpoint))
            .set("X-EXECD-ACCESS-TOKEN", &self.token)
            .timeout(Duration::from_secs(600))
    }

    /// One `echo hi` round trip; checks the output.
    fn echo(&self) -> Res<Duration> {
        let t = Instant::now();
        let r = self
            .req("POST", "/command")
            .set("Content-Type", "application/json")
            .send_string(r#"{"command":"echo hi"}"#)
            .map_err(describe)?;
        let text = r.into_string().map_err(|e| e.to_string())?;
        let took = t.elapsed();
        if !text.contains("\"text\":\"hi") {
            return Err(format!("unexpected output: {text}"));
        }
        Ok(took)
    }

    /// Downloads `path`, counting bytes; returns bytes and time.
    fn download(&self, path: &str) -> Res<(u64, Duration)> {
        let t = Instant::now();
        let r = self
            .req("GET", &format!("/files/download?path={path}"))
            .call()
            .map_err(describe)?;
        let mut rd = r.into_reader();
        let mut buf = vec![0u8; MIB as usize];
        let mut total = 0u64;
        loop {
            match rd.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(e) => return Err(format!("read: {e}")),
            }
        }
        Ok((total, t.elapsed()))
    }

    /// Downloads `path` with curl (OpenSSL for TLS) to /dev/null; returns bytes and seconds.
    fn curl_download(&self, path: &str) -> Res<(u64, f64)> {
        let out = Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{size_download} %{time_total}",
            ])
            .args(&self.curl_trust)
            .arg("-H")
            .arg(format!("X-EXECD-ACCESS-TOKEN: {}", self.token))
            .arg(format!("{}/files/download?path={path}", self.endpoint))
            .output()
            .map_err(|e| format!("curl: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut it = text.split_whitespace();
        match (
            it.next().and_then(|b| b.parse().ok()),
            it.next().and_then(|t| t.parse().ok()),
        ) {
            (Some(b), Some(t)) if out.status.success() => Ok((b, t)),
            _ => Err(format!(
                "curl: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    }

    fn run(&self, command: &str) -> Res<()> {
        let body = json!({ "command": command, "timeout": 600_000 }).to_string();
        let text = self
            .req("POST", "/command")
            .set("Content-Type", "application/json")
            .send_string(&body)
            .map_err(describe)?
            .into_string()
            .map_err(|e| e.to_string())?;
        if text.contains("\"type\":\"error\"") {
            return Err(format!("{command}: {text}"));
        }
        Ok(())
    }
}

fn main() {
    let echo_n = env_usize("EXECBOX_BENCH_ECHO_N", 300);
    let file_mib = env_usize("EXECBOX_BENCH_FILE_MIB", 1024) as u64;
    println!("execbox TLS benchmark on {}", machine());
    let dir = std::env::temp_dir().join(format!("execbox-bench-tls-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        println!("cannot create {}: {e}", dir.display());
        return;
    }
    let result = run(&dir, echo_n, file_mib);
    if let Err(e) = result {
        println!("failed: {e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("\ncleaned up: sandboxes deleted, servers stopped, state directories removed");
}

fn run(dir: &std::path::Path, echo_n: usize, file_mib: u64) -> Res<()> {
    let (ca_der, tls_table) = make_certificates(dir)?;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca_der))
        .map_err(|e| e.to_string())?;
    // The server's provider (ring), on the client side too.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let agent = |tls: bool| {
        let b = ureq::AgentBuilder::new()
            .max_idle_connections(16)
            .max_idle_connections_per_host(16);
        if tls {
            b.tls_config(Arc::new(client.clone())).build()
        } else {
            b.build()
        }
    };

    let plain = Server::start("plain", dir, None, agent(false))?;
    let tls = match Server::start("tls", dir, Some(&tls_table), agent(true)) {
        Ok(s) => s,
        Err(e) => {
            plain.stop();
            return Err(e);
        }
    };
    let sides = (|| -> Res<(Side, Side)> {
        let (e1, t1) = plain.sandbox()?;
        let (e2, t2) = tls.sandbox()?;
        Ok((
            Side {
                name: "plain",
                curl_trust: Vec::new(),
                server: plain,
                endpoint: e1,
                token: t1,
            },
            Side {
                name: "tls",
                curl_trust: vec![
                    "--cacert".into(),
                    dir.join("ca.pem").to_string_lossy().into_owned(),
                ],
                server: tls,
                endpoint: e2,
                token: t2,
            },
        ))
    })();
    let (plain, tls) = match sides {
        Ok(s) => s,
        Err(e) => return Err(format!("sandboxes: {e}")),
    };
    let outcome = compare(&plain, &tls, echo_n, file_mib);
    plain.server.stop();
    tls.server.stop();
    outcome
}

fn compare(plain: &Side, tls: &Side, echo_n: usize, file_mib: u64) -> Res<()> {
    // 1. Round trips, alternating; the first few warm the connections (TLS handshake
    // included) and are not counted.
    println!("\n[1] `echo hi` round trip through the execd proxy ({echo_n} each, alternating)");
    for _ in 0..10 {
        plain.echo()?;
        tls.echo()?;
    }
    let (mut p, mut t) = (Vec::with_capacity(echo_n), Vec::with_capacity(echo_n));
    for _ in 0..echo_n {
        p.push(plain.echo()?);
        t.push(tls.echo()?);
    }
    p.sort();
    t.sort();
    for (side, s) in [(plain, &p), (tls, &t)] {
        println!(
            "  {:<6} p50={:>7.3} ms  p99={:>7.3} ms",
            side.name,
            ms(support::percentile(s, 0.5)),
            ms(support::percentile(s, 0.99))
        );
    }
    let ratio50 = ms(support::percentile(&t, 0.5)) / ms(support::percentile(&p, 0.5));
    let ratio99 = ms(support::percentile(&t, 0.99)) / ms(support::percentile(&p, 0.99));
    println!(
        "  tls/plain: p50 {ratio50:.3}x, p99 {ratio99:.3}x   target p50 <= 1.10x: {}",
        if ratio50 <= 1.10 { "met" } else { "MISSED" }
    );

    // 2. Downloads.
    let path = "/tmp/execbox-bench-tls.bin";
    println!("\n[2] download of a {file_mib} MiB file through the execd files API (plain, tls, plain, tls)");
    for side in [plain, tls] {
        side.run(&format!("head -c {} /dev/urandom > {path}", file_mib * MIB))?;
    }
    let mut best = [0f64; 2];
    for round in 0..2 {
        for (i, side) in [plain, tls].into_iter().enumerate() {
            let (bytes, took) = side.download(path)?;
            if bytes != file_mib * MIB {
                return Err(format!("{}: got {bytes} bytes", side.name));
            }
            let rate = bytes as f64 / took.as_secs_f64() / 1e6;
            println!(
                "  {:<6} run {}: {:>8.1} MB/s ({:.2} s)",
                side.name,
                round + 1,
                rate,
                took.as_secs_f64()
            );
            best[i] = best[i].max(rate);
        }
    }
    let share = best[1] / best[0];
    println!(
        "  best: plain {:.1} MB/s, tls {:.1} MB/s; tls/plain {:.1}%   target >= 70%: {}",
        best[0],
        best[1],
        share * 100.0,
        if share >= 0.70 { "met" } else { "MISSED" }
    );

    // The same downloads with curl as the client (OpenSSL for TLS): the client's own cost
    // weighs on the result on a small machine, and rustls's reader takes 4 KiB per read.
    println!("\n[3] the same download with curl as the client (plain, tls, plain, tls)");
    let mut best = [0f64; 2];
    for round in 0..2 {
        for (i, side) in [plain, tls].into_iter().enumerate() {
            let (bytes, secs) = side.curl_download(path)?;
            if bytes != file_mib * MIB {
                return Err(format!("{}: curl got {bytes} bytes", side.name));
            }
            let rate = bytes as f64 / secs / 1e6;
            println!(
                "  {:<6} run {}: {:>8.1} MB/s ({:.2} s)",
                side.name,
                round + 1,
                rate,
                secs
            );
            best[i] = best[i].max(rate);
        }
    }
    let share = best[1] / best[0];
    println!(
        "  best: plain {:.1} MB/s, tls {:.1} MB/s; tls/plain {:.1}%   target >= 70%: {}",
        best[0],
        best[1],
        share * 100.0,
        if share >= 0.70 { "met" } else { "MISSED" }
    );
    Ok(())
}
