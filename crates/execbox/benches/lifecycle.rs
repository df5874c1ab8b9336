//! Sandbox lifecycle benchmark: create→agent ready and delete, with the writable layer on a
//! disk (the default) and in memory (the earlier, RAM-backed path), and for sandboxes made from
//! an OCI image, side by side with a bare `unshare` (and `bwrap` when installed) starting a
//! process in the same namespaces, measured in the same run; then the first create of an image
//! not pulled yet, the throughput of a sandbox's `/workspace` next to the host's disk, and the
//! memory cost of idle sandboxes and 500 of them at once.
//!
//! Run: `cargo bench -p execbox --bench lifecycle` (as root). `EXECBOX_BENCH_N` sets the number
//! of sandboxes per series (default 200), `EXECBOX_BENCH_IDLE` the idle count (default 500).
//!
//! Series:
//! - `create -> agent ready` and `delete` on the disk-backed (default) and memory-backed
//!   writable layer, host runtimes (no image).
//! - `(image, disk)`: the same from an OCI image (static busybox, one layer) already in the
//!   image store: the layers are the sandbox's lower layers, as the server passes them.
//!   The image is built here with `umoci` and pushed with `skopeo` to Debian's
//!   `/usr/bin/docker-registry` on a loopback port, then pulled into an `ImageStore`. Without
//!   those tools (`scripts/test-deps.sh` installs them) the image series are skipped with a note.
//! - `first create, image not pulled`: `ImageStore::resolve` on an empty store (pull, verify,
//!   unpack) plus the first create of that image (its root skeleton included), a fresh store
//!   and a new image id each sample (`EXECBOX_BENCH_PULLS`, default 5; 0 skips); the pull alone
//!   on its own line. Once for the busybox image and once for it with one more layer of
//!   `EXECBOX_BENCH_BIG_MIB` MiB of incompressible data (default 50; 0 skips), whose lines add
//!   the pull throughput (compressed bytes over the pull's time; the registry is on loopback
//!   with its blobs in the page cache, so this is the store's own cost).
//! - storage throughput: `dd` of `EXECBOX_BENCH_DD_MIB` MiB (default 512; 0 skips) in 1 MiB
//!   blocks written with `conv=fsync` and read back after the host dropped its caches
//!   (`/proc/sys/vm/drop_caches`), in a disk-backed sandbox's `/workspace` (run through the
//!   agent's run API on its socket), in a memory-backed one's (tmpfs: the read is never cold),
//!   and on the host in a directory on the file system of the state directory; the median MB/s
//!   of `EXECBOX_BENCH_DD_ROUNDS` rounds (default 3), as dd reports them, side by side.
//!
//! Budgets (issue #2, this machine class): create→ready p50 ≤ 10 ms, p99 ≤ 30 ms; an idle
//! sandbox ≤ 2 MiB of host memory; 500 idle sandboxes at once work.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use execbox_image::{Image, ImageStore, StoreConfig};
use execbox_server::local::{
    LocalBackend, LocalConfig, Placement, RootImage, SandboxLimits, SandboxParams, StorageMedium,
};

mod support;

/// Prints p50/p99; returns them in ms.
fn report(name: &str, mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let p50 = support::percentile(&samples, 0.50).as_secs_f64() * 1e3;
    let p99 = support::percentile(&samples, 0.99).as_secs_f64() * 1e3;
    println!(
        "{name:<44} n={:<4} p50={p50:>8.2} ms  p99={p99:>8.2} ms",
        samples.len(),
    );
    (p50, p99)
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

/// What every sandbox of the benchmark gets: 1 CPU, 512 MiB, and `image` as its root (its
/// layers, environment and working directory, as the server passes them) when there is one.
fn sandbox_params<'a>(id: &'a str, image: Option<&Image>) -> SandboxParams<'a> {
    SandboxParams {
        id,
        limits: SandboxLimits {
            cpu_millicores: Some(1000),
            memory_bytes: Some(512 << 20),
            ..Default::default()
        },
        env: image
            .map(|i| {
                i.config
                    .env
                    .iter()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .unwrap_or_default(),
        entrypoint: Vec::new(),
        network: false,
        image: image.map(|i| RootImage {
            id: i.id.clone(),
            layers: i.layers.clone(),
        }),
        workdir: image
            .and_then(|i| i.config.working_dir.clone())
            .filter(|d| !d.is_empty()),
        template: None,
        volumes: &[],
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

// ---- A registry with the benchmark's images ----------------------------------------------

const IMAGE_TOOLS: [&str; 4] = [
    "/usr/bin/docker-registry",
    "/usr/bin/skopeo",
    "/usr/bin/umoci",
    "/bin/busybox",
];

/// Debian's `docker-registry` on a loopback port. Its wrapper stops it and removes its storage
/// when its stdin closes (on drop, or when this process dies).
struct Registry {
    addr: String,
    wrapper: Child,
}

impl Drop for Registry {
    fn drop(&mut self) {
        drop(self.wrapper.stdin.take());
        let _ = self.wrapper.wait();
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("free port: {e}"))
}

fn start_registry(dir: &Path) -> Result<Registry, String> {
    let home = dir.join("registry");
    std::fs::create_dir_all(&home).map_err(|e| format!("registry dir: {e}"))?;
    let addr = format!("127.0.0.1:{}", free_port()?);
    let config = home.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            home.join("storage").display()
        ),
    )
    .map_err(|e| format!("registry config: {e}"))?;
    let wrapper = Command::new("sh")
        .args([
            "-c",
            r#"/usr/bin/docker-registry serve "$0" >"$1/registry.log" 2>&1 & pid=$!; read _; kill $pid; wait $pid; rm -rf "$1""#,
        ])
        .arg(&config)
        .arg(&home)
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting docker-registry: {e}"))?;
    let registry = Registry { addr, wrapper };
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect(&registry.addr) {
            let _ = s.write_all(
                format!("GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", registry.addr).as_bytes(),
            );
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            if answer.starts_with("HTTP/1.") && answer.contains(" 200 ") {
                return Ok(registry);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(home.join("registry.log")).unwrap_or_default();
    Err(format!(
        "docker-registry did not start on {}: {log}",
        registry.addr
    ))
}

/// `bytes` of incompressible data (xorshift), so the layer's compressed size is its size.
fn write_random(path: &Path, bytes: usize) -> Result<(), String> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = Vec::with_capacity(bytes);
    while buf.len() < bytes {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        buf.extend_from_slice(&state.to_le_bytes());
    }
    buf.truncate(bytes);
    std::fs::write(path, buf).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Builds the images with `umoci` and pushes them: `bench/busybox:1` (static busybox, `PATH`,
/// working directory `/`), `bench/busybox:pull-<i>` and, when `big_mib` > 0,
/// `bench/big:pull-<i>` (busybox plus a layer of `big_mib` MiB), each tag with its own
/// configuration and so its own image id.
fn push_images(dir: &Path, addr: &str, pulls: usize, big_mib: usize) -> Result<(), String> {
    let layout = dir.join("layout");
    let oci = |tag: &str| format!("{}:{tag}", layout.display());
    let umoci = || Command::new("umoci");
    run(umoci().args(["init", "--layout"]).arg(&layout))?;
    run(umoci().args(["new", "--image", &oci("base")]))?;
    let bundle = dir.join("bundle");
    run(umoci()
        .args(["unpack", "--image", &oci("base")])
        .arg(&bundle))?;
    let rootfs = bundle.join("rootfs");
    for d in ["bin", "etc", "data"] {
        std::fs::create_dir_all(rootfs.join(d)).map_err(|e| format!("image dirs: {e}"))?;
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).map_err(|e| e.to_string())?;
    for tool in ["sh", "ls", "cat", "dd", "sleep"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(tool))
            .map_err(|e| e.to_string())?;
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
        .map_err(|e| e.to_string())?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n").map_err(|e| e.to_string())?;
    // (umoci tag, repository) per image.
    let mut kinds = vec![("small", "bench/busybox")];
    run(umoci()
        .args(["repack", "--image", &oci("small")])
        .arg(&bundle))?;
    if big_mib > 0 {
        write_random(&rootfs.join("data/random"), big_mib << 20)?;
        run(umoci()
            .args(["repack", "--image", &oci("big")])
            .arg(&bundle))?;
        kinds.push(("big", "bench/big"));
    }
    let _ = std::fs::remove_dir_all(&bundle);
    let mut pushes: Vec<(String, String)> = Vec::new();
    for (kind, repo) in kinds {
        run(umoci().args([
            "config",
            "--image",
            &oci(kind),
            "--config.env",
            "PATH=/bin",
            "--config.workingdir",
            "/",
        ]))?;
        if kind == "small" {
            pushes.push((kind.to_string(), format!("{repo}:1")));
        }
        for i in 0..pulls {
            let tag = format!("{kind}-{i}");
            run(umoci().args([
                "config",
                "--image",
                &oci(kind),
                "--tag",
                &tag,
                "--config.env",
                &format!("EXECBOX_BENCH_SAMPLE={i}"),
            ]))?;
            pushes.push((tag, format!("{repo}:pull-{i}")));
        }
    }
    for (tag, dest) in pushes {
        run(Command::new("skopeo").args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            &format!("oci:{}", oci(&tag)),
            &format!("docker://{addr}/{dest}"),
        ]))?;
    }
    Ok(())
}

// ---- Running a command in a sandbox ----------------------------------------------------------

/// Runs `argv` in the sandbox `id` through its agent's run API (HTTP on its unix socket, the
/// client the server's isol8 and session-execute surfaces use), in `/workspace`; its stderr.
fn sandbox_run(
    rt: &tokio::runtime::Runtime,
    backend: &LocalBackend,
    id: &str,
    argv: &[&str],
) -> Result<String, String> {
    let req = serde_json::from_value(serde_json::json!({
        "argv": argv,
        "cwd": "/workspace",
        "timeout_ms": 600_000,
        "max_output_bytes": 65_536,
    }))
    .map_err(|e| e.to_string())?;
    let r = rt
        .block_on(execbox_server::agent_run::run(
            &backend.socket_path(id),
            &req,
        ))
        .map_err(|e| format!("{argv:?} in the sandbox: {e}"))?;
    if r.exit_code != 0 {
        return Err(format!(
            "{argv:?} in the sandbox exited with {}: {}{}",
            r.exit_code, r.stdout, r.stderr
        ));
    }
    Ok(r.stderr)
}

fn host_run(argv: &[&str]) -> Result<String, String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|e| format!("{argv:?}: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(format!("{argv:?}: {stderr}"));
    }
    Ok(stderr)
}

/// MB/s from dd's summary line (`N bytes (…) copied, S s, …`).
fn dd_rate(stderr: &str) -> Option<f64> {
    let line = stderr.lines().rev().find(|l| l.contains(" copied, "))?;
    let bytes: f64 = line.split_whitespace().next()?.parse().ok()?;
    let secs: f64 = line
        .split(" copied, ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    (secs > 0.0).then(|| bytes / secs / 1e6)
}

/// Writes back dirty pages and drops the host's page cache, dentries and inodes (the
/// sandboxes' disks included), so the next read comes from the disk.
fn drop_caches() -> bool {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn fs_type(path: &Path) -> String {
    Command::new("df")
        .arg("--output=fstype")
        .arg(path)
        .output()
        .ok()
        .and_then(|o| {
            let out = String::from_utf8_lossy(&o.stdout).into_owned();
            out.lines().nth(1).map(|l| l.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "?".into())
}

/// One place dd writes and reads: a sandbox's `/workspace` or a host directory.
enum DdTarget<'a> {
    Sandbox(&'a LocalBackend, &'a str),
    Host(PathBuf),
}

impl DdTarget<'_> {
    fn dd(&self, rt: &tokio::runtime::Runtime, args: &[String]) -> Result<f64, String> {
        let mut argv = vec!["/usr/bin/dd"];
        argv.extend(args.iter().map(String::as_str));
        let stderr = match self {
            DdTarget::Sandbox(backend, id) => sandbox_run(rt, backend, id, &argv)?,
            DdTarget::Host(_) => host_run(&argv)?,
        };
        dd_rate(&stderr).ok_or_else(|| format!("no rate in dd's output: {stderr}"))
    }

    fn file(&self) -> String {
        match self {
            DdTarget::Sandbox(..) => "/workspace/f".into(),
            DdTarget::Host(dir) => dir.join("f").display().to_string(),
        }
    }
}

/// Storage throughput: dd write (fsync) and cold read, sandboxes next to the host's disk.
fn storage_throughput(
    rt: &tokio::runtime::Runtime,
    disk: &LocalBackend,
    memory: &LocalBackend,
    host_dir: &Path,
    dd_mib: usize,
    rounds: usize,
) -> Result<(), String> {
    let limits = SandboxLimits {
        cpu_millicores: Some(1000),
        // The file counts against an execution's memory when it is in memory (tmpfs), and as
        // page cache (reclaimable) on a disk.
        memory_bytes: Some(((dd_mib as u64) << 20) + (512 << 20)),
        disk_bytes: Some((1u64 << 30).max(((dd_mib as u64) + 256) << 20)),
        ..Default::default()
    };
    let mut live = Vec::new();
    for (id, backend) in [("dd-disk", disk), ("dd-memory", memory)] {
        let mut params = sandbox_params(id, None);
        params.limits = limits;
        match backend.create(params) {
            Ok(p) => live.push((id, backend, p)),
            Err(e) => {
                for (id, backend, p) in &live {
                    let _ = backend.destroy(id, p);
                }
                return Err(format!("create {id}: {e}"));
            }
        }
    }
    std::fs::create_dir_all(host_dir).map_err(|e| e.to_string())?;
    let targets = [
        (
            "sandbox /workspace (disk-backed)".to_string(),
            DdTarget::Sandbox(disk, "dd-disk"),
        ),
        (
            "sandbox /workspace (memory-backed: tmpfs)".to_string(),
            DdTarget::Sandbox(memory, "dd-memory"),
        ),
        (
            format!("host {} ({})", host_dir.display(), fs_type(host_dir)),
            DdTarget::Host(host_dir.to_path_buf()),
        ),
    ];
    let mut writes: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let mut reads: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let mut cold = true;
    let result = (|| {
        for _ in 0..rounds {
            for (i, (_, t)) in targets.iter().enumerate() {
                writes[i].push(t.dd(
                    rt,
                    &[
                        "if=/dev/zero".into(),
                        format!("of={}", t.file()),
                        "bs=1M".into(),
                        format!("count={dd_mib}"),
                        "conv=fsync".into(),
                    ],
                )?);
            }
            cold &= drop_caches();
            for (i, (_, t)) in targets.iter().enumerate() {
                reads[i].push(t.dd(
                    rt,
                    &[
                        format!("if={}", t.file()),
                        "of=/dev/null".into(),
                        "bs=1M".into(),
                    ],
                )?);
            }
        }
        Ok::<(), String>(())
    })();
    for (id, backend, p) in &live {
        let _ = backend.destroy(id, p);
    }
    let _ = std::fs::remove_dir_all(host_dir);
    result?;
    println!(
        "\nstorage throughput: dd {dd_mib} MiB bs=1M, median of {rounds}{}",
        if cold {
            ""
        } else {
            " (reads NOT cold: dropping the host's caches failed)"
        }
    );
    println!("  {:<58} {:>16} {:>16}", "", "write+fsync", "read (cold)");
    for (i, (name, _)) in targets.iter().enumerate() {
        let rate = |v: &Vec<f64>| {
            median(v.clone())
                .map(|r| format!("{r:.0} MB/s"))
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "  {name:<58} {:>16} {:>16}",
            rate(&writes[i]),
            rate(&reads[i])
        );
    }
    Ok(())
}

// ---- First create of an image not pulled yet -------------------------------------------------

/// `store.resolve` on an empty store, then the first create of the image, `pulls` times (a
/// fresh store and a new image id each time).
fn first_creates(
    rt: &tokio::runtime::Runtime,
    backend: &LocalBackend,
    state_dir: &Path,
    addr: &str,
    repo: &str,
    pulls: usize,
) -> Result<(), String> {
    let mut totals = Vec::with_capacity(pulls);
    let mut resolves = Vec::with_capacity(pulls);
    let mut rates = Vec::with_capacity(pulls);
    let mut size = 0;
    for i in 0..pulls {
        let root = state_dir.join(format!("pull-store-{i}"));
        let store = ImageStore::open(&root, StoreConfig::default())
            .map_err(|e| format!("opening the image store: {e}"))?;
        let reference = format!("{addr}/{repo}:pull-{i}");
        let id = format!("pull{i}");
        let t = Instant::now();
        let image = rt
            .block_on(store.resolve(&reference, None))
            .map_err(|e| format!("pulling {reference}: {e}"))?;
        let resolved = t.elapsed();
        let p = backend
            .create(sandbox_params(&id, Some(&image)))
            .map_err(|e| format!("create from {reference}: {e}"))?;
        totals.push(t.elapsed());
        resolves.push(resolved);
        let downloaded = store.stats().bytes_downloaded;
        rates.push(downloaded as f64 / resolved.as_secs_f64() / 1e6);
        size = image.size;
        let _ = backend.destroy(&id, &p);
        drop(store);
        let _ = std::fs::remove_dir_all(&root);
    }
    report(
        &format!("first create, image not pulled ({})", mib(size)),
        totals,
    );
    report("  of which pull + unpack (store.resolve)", resolves);
    // Only a large image's pull says anything about throughput (a small one's is latency).
    if let Some(rate) = median(rates).filter(|_| size >= 16 << 20) {
        println!("  pull + unpack throughput: {rate:.0} MB/s (compressed bytes over the pull's time, median)");
    }
    Ok(())
}

fn main() {
    let n = env_usize("EXECBOX_BENCH_N", 200);
    let idle = env_usize("EXECBOX_BENCH_IDLE", 500);
    let pulls = env_usize("EXECBOX_BENCH_PULLS", 5);
    let big_mib = env_usize("EXECBOX_BENCH_BIG_MIB", 50);
    let dd_mib = env_usize("EXECBOX_BENCH_DD_MIB", 512);
    let dd_rounds = env_usize("EXECBOX_BENCH_DD_ROUNDS", 3).max(1);
    let state_dir = std::env::temp_dir().join(format!("execbox-bench-{}", std::process::id()));
    // As `execbox serve` does, before any thread: the disk pool's ready disks (mounted, with
    // their loop devices) go with this process's mount namespace instead of staying on the host.
    if let Err(e) = execbox_jail::rootfs::enter_private_mount_namespace() {
        println!("no private mount namespace ({e}): the ready disks stay mounted on the host");
    }
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
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

    // The image: a registry on loopback with the benchmark's images, and one pulled into a
    // store, before anything is timed.
    let missing: Vec<&str> = IMAGE_TOOLS
        .iter()
        .copied()
        .filter(|t| !Path::new(t).exists())
        .collect();
    let images: Option<(Registry, Arc<Image>)> = if missing.is_empty() {
        let prepared = (|| {
            let dir = state_dir.join("images-src");
            let registry = start_registry(&dir)?;
            push_images(&dir, &registry.addr, pulls, big_mib)?;
            let _ = std::fs::remove_dir_all(dir.join("layout"));
            let store = ImageStore::open(&state_dir.join("images"), StoreConfig::default())
                .map_err(|e| format!("opening the image store: {e}"))?;
            let reference = format!("{}/bench/busybox:1", registry.addr);
            let image = rt
                .block_on(store.resolve(&reference, None))
                .map_err(|e| format!("pulling {reference}: {e}"))?;
            Ok::<_, String>((registry, image))
        })();
        match prepared {
            Ok(x) => Some(x),
            Err(e) => {
                println!("image series skipped: {e}\n");
                None
            }
        }
    } else {
        println!(
            "image series skipped: {} missing (scripts/test-deps.sh installs them)\n",
            missing.join(", ")
        );
        None
    };
    let image = images.as_ref().map(|(_, i)| i.clone());

    println!("execbox lifecycle benchmark ({n} sandboxes per series)\n");
    let mut series: Vec<(&str, &LocalBackend, Option<&Image>)> =
        vec![("disk", &backend, None), ("memory", &in_memory, None)];
    if let Some(image) = &image {
        series.push(("image, disk", &backend, Some(image)));
    }
    let mut disk_create = (f64::NAN, f64::NAN);
    for (label, backend, image) in series {
        // Warm-up: page cache, skeleton, the formatted disk.
        for i in 0..5 {
            let id = format!("warm{i}");
            let p = backend.create(sandbox_params(&id, image)).expect("create");
            backend.destroy(&id, &p).expect("destroy");
        }
        let mut creates = Vec::with_capacity(n);
        let mut deletes = Vec::with_capacity(n);
        for i in 0..n {
            let id = format!("b{i}");
            let t = Instant::now();
            let p = backend.create(sandbox_params(&id, image)).expect("create");
            creates.push(t.elapsed());
            let t = Instant::now();
            backend.destroy(&id, &p).expect("destroy");
            deletes.push(t.elapsed());
        }
        let created = report(&format!("execbox create -> agent ready ({label})"), creates);
        if label == "disk" {
            disk_create = created;
        }
        report(&format!("execbox delete ({label})"), deletes);
    }
    match time_command(n, "unshare", &["-Urpmnfi", "--uts", "true"]) {
        Some(v) => {
            let (bare, _) = report("baseline: unshare -Urpmnfi --uts true", v);
            support::target_row(
                "sandbox create -> agent ready, p50",
                disk_create.0,
                bare,
                "ms",
                "unshare -Urpmnfi --uts true",
                support::Goal::RatioAtMost(1.3),
            );
            support::target_row(
                "sandbox create -> agent ready, p99 over its own p50",
                disk_create.1,
                disk_create.0,
                "ms",
                "own p50",
                support::Goal::RatioAtMost(3.0),
            );
        }
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
        Some(v) => {
            report("baseline: bwrap --unshare-all ... true", v);
        }
        None => println!("baseline: bwrap not installed"),
    }
    match time_command(n, "/usr/bin/python3", &["-I", "-S", "-c", "pass"]) {
        Some(v) => {
            report("baseline: /usr/bin/python3 -I -S -c pass", v);
        }
        None => println!("baseline: python3 unavailable"),
    }

    // First creates of images not pulled yet (registry on loopback).
    if let Some((registry, _)) = &images {
        if pulls > 0 {
            println!();
            let mut repos = vec!["bench/busybox"];
            if big_mib > 0 {
                repos.push("bench/big");
            }
            for repo in repos {
                if let Err(e) =
                    first_creates(&rt, &backend, &state_dir, &registry.addr, repo, pulls)
                {
                    println!("first create of {repo} failed: {e}");
                }
            }
        }
    }
    drop(images);

    // Storage throughput: a sandbox's /workspace next to the host's disk.
    if dd_mib > 0 {
        if let Err(e) = storage_throughput(
            &rt,
            &backend,
            &in_memory,
            &state_dir.join("host-dd"),
            dd_mib,
            dd_rounds,
        ) {
            println!("storage throughput failed: {e}");
        }
    }
    drop(in_memory);

    // Idle sandboxes: all at once, then their memory.
    println!("\nstarting {idle} idle sandboxes at once...");
    let t = Instant::now();
    let mut live: Vec<(String, Placement)> = Vec::with_capacity(idle);
    for i in 0..idle {
        let id = format!("idle{i}");
        match backend.create(sandbox_params(&id, None)) {
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
    support::target_row(
        &format!("idle sandboxes at once (asked {idle})"),
        live.len() as f64,
        2000.0,
        "sandboxes",
        "target",
        support::Goal::RatioAtLeast(1.0),
    );
    support::target_row(
        "idle sandbox host memory (cgroup-charged, each)",
        cg_bytes as f64 / count / 1048576.0,
        1.0,
        "MiB",
        "target",
        support::Goal::AtMost(1.0),
    );
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
    // The loop devices of the deleted sandboxes' disks go too, as the server removes them.
    let _ = execbox_jail::storage::remove_free_loop_devices();
    let _ = std::fs::remove_dir_all(&state_dir);
}
