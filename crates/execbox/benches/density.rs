//! Density through the API: a release `execbox serve` on loopback holding
//! `EXECBOX_BENCH_DENSITY` idle sandboxes (default 2000), each created with `POST /v1/sandboxes`,
//! and how the API answers meanwhile, side by side with the same requests against the same
//! server before those sandboxes existed (measured in the same run):
//!
//! - `GET /v1/sandboxes/{id}` of a random live sandbox;
//! - `GET /v1/sandboxes?pageSize=20` (the first page of the list);
//! - `GET /ping` through the execd proxy of a random live sandbox (server → its agent);
//! - creating and deleting one more sandbox (`POST` until its agent answers, then `DELETE`).
//!
//! Each figure is `EXECBOX_BENCH_DENSITY_SAMPLES` requests (default 200) made one after the
//! other. The creates of the idle sandboxes run on 4 client threads; their rate and the
//! server's memory are printed too.
//!
//! Run: `cargo bench -p execbox --bench density` (as root).
//!
//! Target (issue 15): 2,000 idle sandboxes at once with an API p99 under 50 ms meanwhile.
//!
//! The release profile aborts on panic, so nothing here panics: failures are reported and the
//! run goes on to the cleanup (sandboxes deleted, server stopped, state directory removed).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod support;

use support::{describe, env_usize, machine, Res, Server};

/// Client threads creating (and deleting) the idle sandboxes.
const WORKERS: usize = 4;

fn body() -> Value {
    json!({
        "image": {"uri": "default"},
        "entrypoint": ["tail", "-f", "/dev/null"],
        "timeout": 7200,
        "resourceLimits": {"cpu": "1", "memory": "256Mi"},
    })
}

/// Latencies in ms: p50 and p99.
#[derive(Clone, Copy)]
struct Latency {
    p50: f64,
    p99: f64,
}

fn latency(mut v: Vec<f64>) -> Option<Latency> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(Latency {
        p50: support::percentile_ms(&v, 0.50),
        p99: support::percentile_ms(&v, 0.99),
    })
}

struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    fn call(&self, method: &str, path: &str) -> Res<Value> {
        let r = self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .timeout(Duration::from_secs(120))
            .call()
            .map_err(|e| format!("{method} {path}: {}", describe(e)))?;
        if r.status() == 204 {
            return Ok(Value::Null);
        }
        let text = r.into_string().map_err(|e| e.to_string())?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Creates a sandbox and returns its id and execd endpoint (URL, token), once the agent
    /// answers. A 429 (creates in flight capped) is retried.
    fn create(&self) -> Res<(String, String, String)> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let v: Value = loop {
            match self
                .agent
                .post(&format!("{}/v1/sandboxes", self.base))
                .timeout(Duration::from_secs(120))
                .send_json(body())
            {
                Ok(r) => break r.into_json().map_err(|e| e.to_string())?,
                Err(ureq::Error::Status(429, _)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(format!("create: {}", describe(e))),
            }
        };
        let id = v["id"].as_str().ok_or("no id")?.to_string();
        let ep = self.call("GET", &format!("/v1/sandboxes/{id}/endpoints/44772"))?;
        let url = format!("http://{}", ep["endpoint"].as_str().ok_or("no endpoint")?);
        let token = ep["headers"]["X-EXECD-ACCESS-TOKEN"]
            .as_str()
            .ok_or("no token")?
            .to_string();
        while self.ping(&url, &token).is_err() {
            if Instant::now() > deadline {
                return Err(format!("sandbox {id} never answered /ping"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok((id, url, token))
    }

    fn ping(&self, url: &str, token: &str) -> Res<()> {
        self.agent
            .get(&format!("{url}/ping"))
            .set("X-EXECD-ACCESS-TOKEN", token)
            .timeout(Duration::from_secs(60))
            .call()
            .map(|_| ())
            .map_err(describe)
    }
}

/// One round of API latencies against the sandboxes in `live`.
struct Round {
    get: Option<Latency>,
    list: Option<Latency>,
    ping: Option<Latency>,
    create_delete: Option<Latency>,
}

impl Round {
    /// The worst p99 of the read requests (get, list, ping): what a client of a busy server
    /// waits at worst for an answer, creates aside.
    fn api_p99(&self) -> f64 {
        [self.get, self.list, self.ping]
            .iter()
            .map(|l| l.map_or(f64::NAN, |l| l.p99))
            .fold(f64::NEG_INFINITY, f64::max)
    }
}

fn measure(client: &Client, live: &[(String, String, String)], samples: usize) -> Res<Round> {
    // A cheap deterministic spread over the live sandboxes.
    let pick = |i: usize| &live[(i * 7919) % live.len()];
    let time = |f: &mut dyn FnMut(usize) -> Res<()>| -> Res<Option<Latency>> {
        let mut v = Vec::with_capacity(samples);
        for i in 0..samples {
            let t = Instant::now();
            f(i)?;
            v.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(latency(v))
    };
    let get = time(&mut |i| {
        let (id, _, _) = pick(i);
        let v = client.call("GET", &format!("/v1/sandboxes/{id}"))?;
        match v["id"].as_str() {
            Some(got) if got == id => Ok(()),
            _ => Err(format!("GET /v1/sandboxes/{id} answered {v}")),
        }
    })?;
    let list = time(&mut |_| {
        let v = client.call("GET", "/v1/sandboxes?pageSize=20")?;
        match v["items"].as_array() {
            Some(items) if !items.is_empty() => Ok(()),
            _ => Err(format!("the list answered {v}")),
        }
    })?;
    let ping = time(&mut |i| {
        let (_, url, token) = pick(i);
        client.ping(url, token)
    })?;
    let create_delete = time(&mut |_| {
        let (id, _, _) = client.create()?;
        client
            .call("DELETE", &format!("/v1/sandboxes/{id}"))
            .map(|_| ())
    })?;
    Ok(Round {
        get,
        list,
        ping,
        create_delete,
    })
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn print_round(label: &str, r: &Round) {
    let show = |name: &str, l: Option<Latency>| match l {
        Some(l) => println!(
            "  {label:<22} {name:<40} p50 {:>8.3} ms   p99 {:>8.3} ms",
            l.p50, l.p99
        ),
        None => println!("  {label:<22} {name:<40} not measured"),
    };
    show("GET /v1/sandboxes/{id}", r.get);
    show("GET /v1/sandboxes?pageSize=20", r.list);
    show("GET /ping through the execd proxy", r.ping);
    show("create (agent answering) + delete", r.create_delete);
}

/// Creates `n` sandboxes on [`WORKERS`] threads; stops at the first failure.
fn create_many(client: &Client, n: usize) -> (Vec<(String, String, String)>, Option<String>) {
    let next = AtomicUsize::new(0);
    let live = Mutex::new(Vec::with_capacity(n));
    let failure = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..WORKERS {
            s.spawn(|| {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    match client.create() {
                        Ok(sb) => live.lock().unwrap_or_else(|p| p.into_inner()).push(sb),
                        Err(e) => {
                            *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                            next.store(n, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    (
        live.into_inner().unwrap_or_else(|p| p.into_inner()),
        failure.into_inner().unwrap_or_else(|p| p.into_inner()),
    )
}

fn delete_all(client: &Client, live: &[(String, String, String)]) -> usize {
    let next = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..WORKERS {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((id, _, _)) = live.get(i) else {
                    break;
                };
                if client
                    .call("DELETE", &format!("/v1/sandboxes/{id}"))
                    .is_err()
                {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    failed.into_inner()
}

fn main() {
    let n = env_usize("EXECBOX_BENCH_DENSITY", 2000);
    let samples = env_usize("EXECBOX_BENCH_DENSITY_SAMPLES", 200).max(1);
    println!(
        "execbox density benchmark: {}, release server on loopback",
        machine()
    );
    println!("target: {n} idle sandboxes at once through the API, API p99 < 50 ms meanwhile");
    let server = match Server::start("density") {
        Ok(s) => s,
        Err(e) => {
            println!("cannot start the server: {e}");
            return;
        }
    };
    let client = Client {
        base: server.base.clone(),
        agent: ureq::AgentBuilder::new()
            .max_idle_connections(64)
            .max_idle_connections_per_host(64)
            .build(),
    };
    let run = || -> Res<()> {
        // The baseline: the same requests with one sandbox.
        let first = client.create()?;
        let before = measure(&client, std::slice::from_ref(&first), samples)?;
        println!(
            "\nwith 1 sandbox (server RSS {:.1} MiB):",
            rss_mib(server.pid())
        );
        print_round("1 sandbox", &before);

        let t = Instant::now();
        let (mut live, failure) = create_many(&client, n.saturating_sub(1));
        live.push(first);
        let took = t.elapsed().as_secs_f64();
        println!(
            "\ncreated {} sandboxes through POST /v1/sandboxes in {took:.1} s ({:.0} per second, {WORKERS} clients)",
            live.len(),
            live.len() as f64 / took
        );
        if let Some(e) = &failure {
            println!("  a create failed, so fewer than asked: {e}");
        }
        // Settle: the creates' background work (spare cgroups, pool refills) ends.
        std::thread::sleep(Duration::from_secs(2));
        let after = measure(&client, &live, samples);
        let rss = rss_mib(server.pid());
        match &after {
            Ok(after) => {
                println!(
                    "\nwith {} idle sandboxes (server RSS {rss:.1} MiB):",
                    live.len()
                );
                print_round(&format!("{} sandboxes", live.len()), after);
                support::target_row(
                    &format!(
                        "API p99 with {} idle sandboxes (get, list, execd ping)",
                        live.len()
                    ),
                    after.api_p99(),
                    before.api_p99(),
                    "ms",
                    "same requests with 1 sandbox",
                    support::Goal::AtMost(50.0),
                );
                support::target_row(
                    &format!("idle sandboxes at once through the API (asked {n})"),
                    live.len() as f64,
                    n as f64,
                    "sandboxes",
                    "asked",
                    support::Goal::RatioAtLeast(1.0),
                );
            }
            Err(e) => println!("measuring with {} sandboxes failed: {e}", live.len()),
        }
        let t = Instant::now();
        let failed = delete_all(&client, &live);
        println!(
            "\ndeleted {} sandboxes in {:.1} s ({failed} deletes failed)",
            live.len() - failed,
            t.elapsed().as_secs_f64()
        );
        after.map(|_| ())
    };
    if let Err(e) = run() {
        println!("density run failed: {e}");
    }
    server.stop();
    println!("\ncleaned up: server stopped, state directory removed");
}
