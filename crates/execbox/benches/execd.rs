//! execd data-plane benchmark: a real release `execbox serve` on loopback and one sandbox, every
//! request through the server's proxy into the in-sandbox agent, each figure printed next to a
//! baseline measured in the same run on the same machine:
//!
//! 1. round trip of a foreground `echo hi` (POST /command, SSE read to EOF) vs. spawning
//!    `/bin/bash -c 'echo hi'` and `/bin/true` from this process;
//! 2. stdout streaming throughput (256 MiB of 1 KiB lines, parsed as events) vs. the same
//!    command on the host piped into this process;
//! 3. upload and download of a 1 GiB file (multipart streamed from a generator, checksummed on
//!    the fly both ways) with the server's peak RSS before and after, vs. plain file I/O on a
//!    host tmpfs;
//! 4. 100 concurrent streaming commands, every output verified.
//!
//! Run: `cargo bench -p execbox --bench execd` (as root). `EXECBOX_BENCH_ECHO_N` sets the number
//! of round trips (default 300), `EXECBOX_BENCH_STREAM_MIB` the streamed size (default 256),
//! `EXECBOX_BENCH_FILE_MIB` the file size (default 1024), `EXECBOX_BENCH_CONCURRENT` the number
//! of concurrent commands (default 100).
//!
//! Targets: echo round trip p50 ≤ 3 ms; streaming ≥ 200 MB/s; upload and download ≥ 500 MB/s
//! each with flat server memory; 100 concurrent streams without errors.
//!
//! The release profile aborts on panic, so nothing here panics: failures are reported and the
//! run goes on to the cleanup (sandbox deleted, server killed, state directory removed).

use std::borrow::Cow;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod support;

use support::{describe, env_usize, machine, Res, Sandbox, Server};

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Reporting

/// Prints p50/p99 of `samples`; returns the p50 in ms.
fn report(name: &str, mut samples: Vec<Duration>, target: &str) -> f64 {
    samples.sort();
    println!(
        "  {name:<46} n={:<4} p50={:>8.3} ms  p99={:>8.3} ms  {target}",
        samples.len(),
        support::percentile(&samples, 0.50).as_secs_f64() * 1e3,
        support::percentile(&samples, 0.99).as_secs_f64() * 1e3
    );
    support::percentile(&samples, 0.50).as_secs_f64() * 1e3
}

/// Prints a throughput; returns it in MB/s.
fn report_rate(name: &str, bytes: u64, took: Duration, target: &str) -> f64 {
    println!(
        "  {name:<46} {:>8.1} MB/s  ({:.1} MiB in {:.3} s)  {target}",
        bytes as f64 / took.as_secs_f64() / 1e6,
        bytes as f64 / MIB as f64,
        took.as_secs_f64()
    );
    bytes as f64 / took.as_secs_f64() / 1e6
}

/// `VmHWM` (peak RSS) and `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// CPU time (user + system) of a process so far, in seconds; `None` for this process.
fn cpu_secs(pid: Option<u32>) -> f64 {
    cpu_secs_split(pid).0
}

/// CPU seconds of `pid` (this process when `None`): its own, and its waited-for children's.
fn cpu_secs_split(pid: Option<u32>) -> (f64, f64) {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".into(),
    };
    let s = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100)
        .max(1) as f64;
    (
        (ticks(11) + ticks(12)) as f64 / hz,
        (ticks(13) + ticks(14)) as f64 / hz,
    )
}

/// CPU seconds used by this bench, the server and the agent between two points.
struct CpuMeter {
    pids: [Option<u32>; 2],
    start: [f64; 3],
}

impl CpuMeter {
    fn start(server: u32, agent: Option<u32>) -> Self {
        let pids = [Some(server), agent];
        CpuMeter {
            pids,
            start: [
                cpu_secs(None),
                cpu_secs(pids[0]),
                pids[1].map_or(0.0, |p| cpu_secs(Some(p))),
            ],
        }
    }

    fn line(&self, wall: Duration) -> String {
        let now = [
            cpu_secs(None),
            cpu_secs(self.pids[0]),
            self.pids[1].map_or(0.0, |p| cpu_secs(Some(p))),
        ];
        let w = wall.as_secs_f64();
        format!(
            "CPU over {w:.2} s wall: client {:.2} s, server {:.2} s, agent {}",
            now[0] - self.start[0],
            now[1] - self.start[1],
            match self.pids[1] {
                Some(_) => format!("{:.2} s", now[2] - self.start[2]),
                None => "n/a".into(),
            }
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Server and sandbox

impl Sandbox {
    /// Host pid of the sandbox's agent (PID 1 inside), found through its cgroup membership.
    fn agent_pid(&self) -> Option<u32> {
        for e in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if !cmdline.starts_with(b"execbox\0agent") {
                continue;
            }
            let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            if cg.contains(&self.id) {
                return Some(pid);
            }
        }
        None
    }
}

// ---------------------------------------------------------------------------------------------
// Event streams

#[derive(serde::Deserialize)]
struct Ev<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(default)]
    error: Option<Value>,
}

/// What a command stream carried: stdout lines are handed to `on_stdout` as they arrive.
#[derive(Default, Debug)]
struct Summary {
    events: u64,
    stdout_lines: u64,
    stdout_bytes: u64,
    stderr: Vec<String>,
    inits: u32,
    completes: u32,
    error: Option<Value>,
    envelopes: u32,
}

impl Summary {
    fn ok(&self) -> Res<()> {
        if self.inits != 1 || self.completes != 1 || self.error.is_some() || self.envelopes > 0 {
            return Err(format!(
                "bad terminal state: {} init, {} complete, error {:?}, {} envelopes, stderr {:?}",
                self.inits, self.completes, self.error, self.envelopes, self.stderr
            ));
        }
        Ok(())
    }
}

fn run_stream(
    sb: &Sandbox,
    body: &Value,
    mut on_stdout: impl FnMut(&str) -> Res<()>,
) -> Res<Summary> {
    let resp = sb
        .req("POST", "/command")
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .map_err(describe)?;
    let mut rd = BufReader::with_capacity(1 << 20, resp.into_reader());
    let mut line = Vec::with_capacity(4096);
    let mut s = Summary::default();
    loop {
        line.clear();
        let n = rd
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("reading the stream: {e}"))?;
        if n == 0 {
            break;
        }
        let l = match line.strip_suffix(b"\n") {
            Some(l) => l,
            None => &line[..],
        };
        if l.is_empty() {
            continue;
        }
        let payload = l
            .strip_prefix(b"data: ")
            .ok_or_else(|| format!("frame without data: {}", String::from_utf8_lossy(l)))?;
        let ev: Ev = serde_json::from_slice(payload).map_err(|e| format!("event json: {e}"))?;
        s.events += 1;
        match ev.kind.as_deref() {
            Some("stdout") => {
                let t = ev.text.unwrap_or_default();
                s.stdout_lines += 1;
                s.stdout_bytes += t.len() as u64;
                on_stdout(&t)?;
            }
            Some("stderr") => s.stderr.push(ev.text.unwrap_or_default().into_owned()),
            Some("init") => s.inits += 1,
            Some("execution_complete") => s.completes += 1,
            Some("error") => s.error = ev.error,
            Some(_) => {}
            None => s.envelopes += 1,
        }
    }
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// 1. Round trip

fn bench_echo(server: &Server, sb: &Sandbox, n: usize) {
    println!("\n[1] foreground `echo hi` round trip (POST /command, SSE read to EOF)");
    let body = json!({"command": "echo hi"});
    let once = || -> Res<Duration> {
        let t = Instant::now();
        let mut out = Vec::new();
        let s = run_stream(sb, &body, |l| {
            out.push(l.to_string());
            Ok(())
        })?;
        let took = t.elapsed();
        s.ok()?;
        if out != ["hi"] {
            return Err(format!("unexpected output {out:?}"));
        }
        Ok(took)
    };
    for _ in 0..30 {
        if let Err(e) = once() {
            println!("  warm-up failed: {e}");
            return;
        }
    }
    let mut v = Vec::with_capacity(n);
    let pids = [None, Some(server.pid()), sb.agent_pid()];
    let cpu_before = pids.map(cpu_secs_split);
    for _ in 0..n {
        match once() {
            Ok(d) => v.push(d),
            Err(e) => {
                println!("  round trip failed: {e}");
                return;
            }
        }
    }
    let cpu_after = pids.map(cpu_secs_split);
    let echo_p50 = report(
        "execbox: echo hi through the server",
        v,
        "target p50 <= 3 ms",
    );
    // Where a round trip's CPU goes (the agent reaps the command, so its children's time is
    // the command's: bash, its dynamic loading, its exit).
    let per = |i: usize, children: bool| {
        let (a, b) = (cpu_before[i], cpu_after[i]);
        let d = if children { b.1 - a.1 } else { b.0 - a.0 };
        d / n.max(1) as f64 * 1e6
    };
    println!(
        "  {:<46} client {:.0} us, server {:.0} us, agent {:.0} us, the command (bash) {:.0} us",
        "CPU per round trip:",
        per(0, false),
        per(1, false),
        per(2, false),
        per(2, true)
    );
    let spawn = |program: &str, args: &[&str]| -> Option<Vec<Duration>> {
        let mut v = Vec::with_capacity(n);
        for i in 0..n + 30 {
            let t = Instant::now();
            let out = Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
                .ok()?;
            if !out.status.success() {
                return None;
            }
            if i >= 30 {
                v.push(t.elapsed());
            }
        }
        Some(v)
    };
    let children_before = cpu_secs_split(None).1;
    let bash = spawn("/bin/bash", &["-c", "echo hi"]);
    let bash_cpu = (cpu_secs_split(None).1 - children_before) / (n + 30).max(1) as f64 * 1e6;
    match bash {
        Some(v) => {
            let bare = report("baseline: spawn /bin/bash -c 'echo hi' (host)", v, "");
            println!("  {:<46} bash {bash_cpu:.0} us", "CPU per spawn:");
            support::target_row(
                "foreground `echo hi` round trip, p50",
                echo_p50,
                bare,
                "ms",
                "host bash -c 'echo hi' spawn",
                support::Goal::RatioAtMost(1.3),
            );
        }
        None => println!("  baseline: /bin/bash unavailable"),
    }
    match spawn("/bin/true", &[]) {
        Some(v) => {
            report("baseline: spawn /bin/true (host)", v, "");
        }
        None => println!("  baseline: /bin/true unavailable"),
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Streaming throughput

fn bench_stream(server: &Server, sb: &Sandbox, mib: usize) {
    let lines = mib * 1024; // 1 KiB per line with its newline
    let command = format!("yes \"$(printf '%01023d' 0)\" | head -n {lines}");
    println!(
        "\n[2] stdout streaming: {mib} MiB as {lines} lines of 1 KiB (`{command}`), parsed as events"
    );
    let want_text = (lines * 1023) as u64;
    let want_line = "0".repeat(1023);
    let mut best: Option<(Duration, u64)> = None;
    let mut all = Vec::new();
    let mut cpu = String::new();
    for round in 0..3 {
        let meter = CpuMeter::start(server.pid(), sb.agent_pid());
        let t = Instant::now();
        let r = run_stream(sb, &json!({ "command": command }), |l| {
            if l == want_line {
                Ok(())
            } else {
                Err(format!("unexpected line of {} bytes", l.len()))
            }
        });
        let took = t.elapsed();
        match r {
            Ok(s) => {
                if let Err(e) = s.ok() {
                    println!("  round {round}: {e}");
                    return;
                }
                if s.stdout_lines != lines as u64 || s.stdout_bytes != want_text {
                    println!(
                        "  round {round}: got {} lines / {} bytes, want {lines} / {want_text}",
                        s.stdout_lines, s.stdout_bytes
                    );
                    return;
                }
                all.push(s.stdout_bytes as f64 / took.as_secs_f64() / 1e6);
                if best.is_none_or(|(b, _)| took < b) {
                    best = Some((took, s.stdout_bytes));
                    cpu = meter.line(took);
                }
            }
            Err(e) => {
                println!("  round {round} failed: {e}");
                return;
            }
        }
    }
    let mut streamed = f64::NAN;
    if let Some((took, bytes)) = best {
        streamed = report_rate(
            "execbox: stdout text through the server (best)",
            bytes,
            took,
            "target >= 200 MB/s",
        );
        println!(
            "  {:<46} {}",
            "  (all rounds, MB/s)",
            all.iter()
                .map(|r| format!("{r:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "  {:<46} {:.0} events/s; {cpu}",
            "  (best round)",
            lines as f64 / took.as_secs_f64()
        );
    }
    // Baseline: the same command on the host, piped into this process, split into lines.
    let mut best: Option<Duration> = None;
    for _ in 0..3 {
        let t = Instant::now();
        let child = Command::new("/bin/bash")
            .arg("-c")
            .arg(&command)
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn();
        let Ok(mut child) = child else {
            println!("  baseline: cannot spawn bash");
            return;
        };
        let Some(out) = child.stdout.take() else {
            return;
        };
        let mut rd = BufReader::with_capacity(1 << 20, out);
        let mut line = Vec::with_capacity(2048);
        let (mut n, mut bytes) = (0u64, 0u64);
        loop {
            line.clear();
            match rd.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    n += 1;
                    bytes += (k - 1) as u64;
                }
            }
        }
        let _ = child.wait();
        let took = t.elapsed();
        if n != lines as u64 || bytes != want_text {
            println!("  baseline: got {n} lines / {bytes} bytes");
            return;
        }
        if best.is_none_or(|b| took < b) {
            best = Some(took);
        }
    }
    if let Some(took) = best {
        let bare = report_rate(
            "baseline: same command on the host, piped",
            want_text,
            took,
            "",
        );
        support::target_row(
            "stdout streaming",
            streamed,
            bare,
            "MB/s",
            "host pipe",
            support::Goal::RatioAtLeast(0.6),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Upload and download of a big file

/// A streaming checksum over 64-bit words (any split of the input gives the same result).
struct Sum {
    h: u64,
    carry: [u8; 8],
    n: usize,
    total: u64,
}

impl Sum {
    fn new() -> Self {
        Sum {
            h: 0x243f_6a88_85a3_08d3,
            carry: [0; 8],
            n: 0,
            total: 0,
        }
    }

    #[inline]
    fn mix(&mut self, w: u64) {
        self.h = (self.h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.h ^= self.h >> 29;
    }

    fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.n > 0 {
            let k = (8 - self.n).min(data.len());
            self.carry[self.n..self.n + k].copy_from_slice(&data[..k]);
            self.n += k;
            data = &data[k..];
            if self.n < 8 {
                return;
            }
            let w = u64::from_le_bytes(self.carry);
            self.mix(w);
            self.n = 0;
        }
        let mut words = data.chunks_exact(8);
        for c in &mut words {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            self.mix(u64::from_le_bytes(b));
        }
        let rest = words.remainder();
        self.carry[..rest.len()].copy_from_slice(rest);
        self.n = rest.len();
    }

    fn finish(mut self) -> u64 {
        if self.n > 0 {
            let mut b = [0u8; 8];
            b[..self.n].copy_from_slice(&self.carry[..self.n]);
            self.mix(u64::from_le_bytes(b));
        }
        let t = self.total;
        self.mix(t);
        self.h
    }
}

/// Pseudo-random-ish file content: a 1 MiB xorshift block, each chunk keyed by its index.
struct Content {
    base: Vec<u64>,
    chunk: Vec<u8>,
}

impl Content {
    fn new() -> Self {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let base = (0..MIB / 8)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            })
            .collect();
        Content {
            base,
            chunk: vec![0; MIB as usize],
        }
    }

    /// Chunk `i` (1 MiB).
    fn fill(&mut self, i: u64) -> &[u8] {
        let key = (i + 1).wrapping_mul(0xd6e8_feb8_6659_fd93);
        for (dst, w) in self.chunk.chunks_exact_mut(8).zip(&self.base) {
            dst.copy_from_slice(&(w ^ key).to_le_bytes());
        }
        &self.chunk
    }
}

const BOUNDARY: &str = "execbox-bench-boundary-7d41c3a9e2f04b6b";

/// The multipart body of one upload, produced on the fly: prefix, `chunks` MiB of content,
/// suffix. Checksums the content as it goes.
struct MultipartBody {
    prefix: Vec<u8>,
    suffix: Vec<u8>,
    content: Content,
    chunks: u64,
    next_chunk: u64,
    /// 0 = prefix, 1 = content, 2 = suffix, 3 = done.
    stage: u8,
    buf: Vec<u8>,
    pos: usize,
    sum: Sum,
}

impl MultipartBody {
    fn new(path: &str, chunks: u64) -> Self {
        let meta = json!({ "path": path }).to_string();
        let prefix = format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"metadata\"; filename=\"metadata\"\r\n\
             Content-Type: application/json\r\n\r\n{meta}\r\n\
             --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        )
        .into_bytes();
        let suffix = format!("\r\n--{BOUNDARY}--\r\n").into_bytes();
        MultipartBody {
            prefix,
            suffix,
            content: Content::new(),
            chunks,
            next_chunk: 0,
            stage: 0,
            buf: Vec::new(),
            pos: 0,
            sum: Sum::new(),
        }
    }

    fn len(&self) -> u64 {
        self.prefix.len() as u64 + self.chunks * MIB + self.suffix.len() as u64
    }
}

impl Read for MultipartBody {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.pos < self.buf.len() {
                let n = (self.buf.len() - self.pos).min(out.len());
                out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            self.pos = 0;
            match self.stage {
                0 => {
                    self.buf = std::mem::take(&mut self.prefix);
                    self.stage = 1;
                }
                1 if self.next_chunk < self.chunks => {
                    let i = self.next_chunk;
                    self.next_chunk += 1;
                    let chunk = self.content.fill(i);
                    self.sum.update(chunk);
                    self.buf.clear();
                    self.buf.extend_from_slice(chunk);
                }
                1 => {
                    self.buf = std::mem::take(&mut self.suffix);
                    self.stage = 2;
                }
                _ => {
                    self.buf.clear();
                    self.stage = 3;
                    return Ok(0);
                }
            }
        }
    }
}

/// Shares the checksum of a body that is moved into the request.
struct Tee<'a> {
    inner: MultipartBody,
    done: &'a std::sync::Mutex<Option<(u64, u64)>>,
}

impl Read for Tee<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(out)?;
        // From the suffix on, every content byte has been produced (and summed).
        if self.inner.stage >= 2 {
            let sum = std::mem::replace(&mut self.inner.sum, Sum::new());
            let total = sum.total;
            if let Ok(mut g) = self.done.lock() {
                if g.is_none() {
                    *g = Some((total, sum.finish()));
                }
            }
        }
        Ok(n)
    }
}

fn bench_files(server: &Server, sb: &Sandbox, mib: u64, dest: &str) {
    println!("\n[3] file transfer: {mib} MiB to {dest} in the sandbox (multipart upload streamed from a generator; download to a sink)");
    let spid = server.pid();
    let apid = sb.agent_pid();
    let mem = |label: &str| {
        let (hwm, rss) = rss_kib(spid);
        let agent = apid
            .map(|p| {
                let (h, r) = rss_kib(p);
                format!(
                    "; agent VmHWM {:.1} MiB, VmRSS {:.1} MiB",
                    h as f64 / 1024.0,
                    r as f64 / 1024.0
                )
            })
            .unwrap_or_default();
        println!(
            "  {label:<46} server VmHWM {:.1} MiB, VmRSS {:.1} MiB{agent}",
            hwm as f64 / 1024.0,
            rss as f64 / 1024.0
        );
    };
    mem("memory before upload:");

    // Upload.
    let body = MultipartBody::new(dest, mib);
    let len = body.len();
    let done = std::sync::Mutex::new(None);
    let meter = CpuMeter::start(spid, apid);
    let t = Instant::now();
    let r = sb
        .req("POST", "/files/upload")
        .timeout(Duration::from_secs(600))
        .set(
            "Content-Type",
            &format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .set("Content-Length", &len.to_string())
        .send(Tee {
            inner: body,
            done: &done,
        });
    let up_took = t.elapsed();
    match r {
        Ok(r) if r.status() == 200 => {}
        Ok(r) => {
            println!("  upload: HTTP {}", r.status());
            return;
        }
        Err(e) => {
            println!("  upload failed: {}", describe(e));
            return;
        }
    }
    let Some((sent, sent_sum)) = done.lock().ok().and_then(|g| *g) else {
        println!("  upload: the body was not read to its end");
        return;
    };
    let up_rate = report_rate(
        "execbox: upload through the server",
        sent,
        up_took,
        "target >= 500 MB/s",
    );
    println!("  {:<46} {}", "", meter.line(up_took));
    mem("memory after upload:");
    match sb
        .req("GET", &format!("/files/info?path={dest}"))
        .call()
        .map_err(describe)
        .and_then(|r| r.into_json::<Value>().map_err(|e| e.to_string()))
    {
        Ok(v) if v[dest]["size"].as_u64() == Some(sent) => {}
        Ok(v) => println!("  upload: size mismatch: {v}"),
        Err(e) => println!("  upload: info failed: {e}"),
    }

    // Download.
    let meter = CpuMeter::start(spid, apid);
    let t = Instant::now();
    let r = sb
        .req("GET", &format!("/files/download?path={dest}"))
        .timeout(Duration::from_secs(600))
        .call();
    let resp = match r {
        Ok(r) => r,
        Err(e) => {
            println!("  download failed: {}", describe(e));
            return;
        }
    };
    let mut rd = resp.into_reader();
    let mut buf = vec![0u8; MIB as usize];
    let mut sum = Sum::new();
    loop {
        match rd.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => sum.update(&buf[..n]),
            Err(e) => {
                println!("  download read failed: {e}");
                return;
            }
        }
    }
    let got = sum.total;
    let got_sum = sum.finish();
    let down_took = t.elapsed();
    let down_rate = report_rate(
        "execbox: download through the server",
        got,
        down_took,
        "target >= 500 MB/s",
    );
    println!("  {:<46} {}", "", meter.line(down_took));
    mem("memory after download:");
    if got != sent || got_sum != sent_sum {
        println!(
            "  MISMATCH: sent {sent} bytes (sum {sent_sum:016x}), got {got} (sum {got_sum:016x})"
        );
    } else {
        println!("  verified: {got} bytes both ways, checksum {got_sum:016x}");
    }
    if let Err(e) = sb
        .req("DELETE", &format!("/files?path={dest}"))
        .call()
        .map_err(describe)
    {
        println!("  cleanup: {e}");
    }

    // Baseline: plain file I/O on a host tmpfs.
    let host = PathBuf::from("/dev/shm").join(format!("execbox-bench-{}.bin", std::process::id()));
    let mut content = Content::new();
    let t = Instant::now();
    let w = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&host)?;
        for i in 0..mib {
            f.write_all(content.fill(i))?;
        }
        f.sync_all()
    })();
    let w_took = t.elapsed();
    let t = Instant::now();
    let r = (|| -> std::io::Result<u64> {
        let mut f = std::fs::File::open(&host)?;
        let mut sum = Sum::new();
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            sum.update(&buf[..n]);
        }
        Ok(sum.total)
    })();
    let r_took = t.elapsed();
    let _ = std::fs::remove_file(&host);
    match (w, r) {
        (Ok(()), Ok(n)) => {
            let write = report_rate(
                "baseline: write to host tmpfs (/dev/shm)",
                mib * MIB,
                w_took,
                "",
            );
            let read = report_rate("baseline: read from host tmpfs (/dev/shm)", n, r_took, "");
            support::target_row(
                &format!("{mib} MiB upload"),
                up_rate,
                write,
                "MB/s",
                "host tmpfs write",
                support::Goal::RatioAtLeast(0.7),
            );
            support::target_row(
                &format!("{mib} MiB download"),
                down_rate,
                read,
                "MB/s",
                "host tmpfs read",
                support::Goal::RatioAtLeast(0.7),
            );
        }
        (w, r) => println!("  baseline failed: {w:?} {r:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Concurrent streams

fn bench_concurrent(sb: &Sandbox, n: usize) {
    const LINES: u64 = 1000;
    let command = format!(
        "for i in $(seq 1 {LINES}); do echo \"line $i\"; if (( i % 50 == 0 )); then sleep 0.01; fi; done"
    );
    println!(
        "\n[4] {n} concurrent streaming commands, {LINES} numbered lines each with small sleeps"
    );
    let t = Instant::now();
    let results: Vec<Res<Duration>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                let command = &command;
                scope.spawn(move || -> Res<Duration> {
                    let t = Instant::now();
                    let mut next = 1u64;
                    let s = run_stream(sb, &json!({ "command": command }), |l| {
                        let want = format!("line {next}");
                        if l != want {
                            return Err(format!("got {l:?}, want {want:?}"));
                        }
                        next += 1;
                        Ok(())
                    })?;
                    s.ok()?;
                    if s.stdout_lines != LINES {
                        return Err(format!("{} lines", s.stdout_lines));
                    }
                    Ok(t.elapsed())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
            .collect()
    });
    let wall = t.elapsed();
    let mut errors = Vec::new();
    let mut durations = Vec::new();
    for r in results {
        match r {
            Ok(d) => durations.push(d),
            Err(e) => errors.push(e),
        }
    }
    println!(
        "  {:<46} wall {:.3} s, errors {} (must be 0), {} lines verified",
        format!("execbox: {n} concurrent commands"),
        wall.as_secs_f64(),
        errors.len(),
        durations.len() as u64 * LINES
    );
    for e in errors.iter().take(5) {
        println!("    error: {e}");
    }
    report("  per-command duration", durations, "");
    // Baseline: one such command alone, through the server, and on the host.
    let t = Instant::now();
    let alone = run_stream(sb, &json!({ "command": command }), |_| Ok(()));
    match alone {
        Ok(s) if s.ok().is_ok() => println!(
            "  {:<46} {:.3} s",
            "baseline: one such command alone (server)",
            t.elapsed().as_secs_f64()
        ),
        other => println!("  baseline (server) failed: {other:?}"),
    }
    let t = Instant::now();
    match Command::new("/bin/bash")
        .arg("-c")
        .arg(&command)
        .stdout(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => println!(
            "  {:<46} {:.3} s",
            "baseline: one such command alone (host)",
            t.elapsed().as_secs_f64()
        ),
        other => println!("  baseline (host) failed: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------

fn main() {
    let echo_n = env_usize("EXECBOX_BENCH_ECHO_N", 300);
    let stream_mib = env_usize("EXECBOX_BENCH_STREAM_MIB", 256);
    let file_mib = env_usize("EXECBOX_BENCH_FILE_MIB", 1024) as u64;
    let concurrent = env_usize("EXECBOX_BENCH_CONCURRENT", 100);
    println!(
        "execbox execd benchmark: {}, release server on loopback",
        machine()
    );
    println!(
        "targets: echo round trip p50 <= 3 ms; streaming >= 200 MB/s; upload/download >= 500 MB/s \
         with flat server memory; {concurrent} concurrent streams with 0 errors"
    );

    let server = match Server::start("execd") {
        Ok(s) => s,
        Err(e) => {
            println!("cannot start the server: {e}");
            return;
        }
    };
    // The writable tmpfs areas (/home/user, /workspace, /tmp) default to 512 MiB each;
    // `resourceLimits.disk` sizes them, so a 1 GiB file fits in /tmp (its pages are charged to
    // the sandbox's 4 GiB memory limit).
    let disk_gib = (file_mib * 2).div_ceil(1024).max(1);
    let t = Instant::now();
    let sb = Sandbox::create(
        &server,
        json!({
            "image": {"uri": "default"},
            "entrypoint": ["tail", "-f", "/dev/null"],
            "resourceLimits": {"cpu": "2", "memory": "4Gi", "disk": format!("{disk_gib}Gi")},
        }),
    );
    match sb {
        Ok(sb) => {
            println!(
                "sandbox {} (cpu 2, memory 4Gi, disk {disk_gib}Gi) ready in {:.1} ms",
                sb.id,
                t.elapsed().as_secs_f64() * 1e3
            );
            bench_echo(&server, &sb, echo_n);
            bench_stream(&server, &sb, stream_mib);
            bench_files(&server, &sb, file_mib, "/tmp/execbox-bench.bin");
            bench_concurrent(&sb, concurrent);
        }
        Err(e) => println!("cannot create the sandbox: {e}"),
    }
    server.stop();
    println!("\ncleaned up: sandbox deleted, server stopped, state directory removed");
}
