//! Real-kernel tests of the cgroup layer (run as root). Every test uses its
//! own base directory `ebt-<test>-<pid>` and removes it, even on panic.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use execbox_jail::cgroup::{
    join_self, parse_mountinfo, CgroupDriver, CgroupError, CgroupVersion, ExecCgroups, Limits,
    AGENT_LEAF,
};

const HELPER_ENV: &str = "EXECBOX_CG_HELPER";
const NOBODY: u32 = 65534;

/// Owns a driver with a private base directory; removes every sandbox cgroup
/// under it and the base itself when dropped.
struct Fixture {
    driver: CgroupDriver,
}

impl Fixture {
    fn detect(test: &str) -> Fixture {
        let base = base_name(test);
        let driver = CgroupDriver::detect_with_base(&base).expect("detect cgroups");
        Fixture { driver }
    }

    /// A v2 driver on a cgroup2 mount, if there is one.
    fn v2(test: &str) -> Option<Fixture> {
        let mount = cgroup2_mount()?;
        let driver = CgroupDriver::v2_with_root(&mount, &base_name(test)).expect("v2 driver");
        Some(Fixture { driver })
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Ok(names) = self.driver.list() {
            for n in names {
                if let Ok(cg) = self.driver.open(&n) {
                    if let Err(e) = cg.remove() {
                        eprintln!("cleanup of {n} failed: {e}");
                    }
                } else {
                    // Present in some hierarchies only: remove what is there.
                    for (_, base) in self.driver.base_dirs() {
                        let _ = std::fs::remove_dir(base.join(&n).join(AGENT_LEAF));
                        let _ = std::fs::remove_dir(base.join(&n));
                    }
                }
            }
        }
        if let Err(e) = self.driver.remove_base() {
            eprintln!("cleanup of base failed: {e}");
        }
    }
}

fn base_name(test: &str) -> String {
    format!("ebt-{test}-{}", std::process::id())
}

fn cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_mountinfo(&text)
        .into_iter()
        .find(|m| m.version == CgroupVersion::V2 && !m.read_only)
        .map(|m| m.mount_point)
}

fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Spawns `argv` behind `sh -c 'read x; exec "$@"'`: the process blocks
/// until [`release`] so it can be placed into a cgroup first.
fn spawn_gated(argv: &[&str]) -> Child {
    Command::new("/bin/sh")
        .arg("-c")
        .arg("read x; exec \"$@\"")
        .arg("sh")
        .args(argv)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn")
}

fn release(child: &mut Child) {
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"go\n").expect("release");
}

fn pid_of(child: &Child) -> i32 {
    i32::try_from(child.id()).expect("pid")
}

/// utime + stime of a process, in clock ticks.
fn proc_cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

fn wait_timeout(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        assert!(start.elapsed() < limit, "child did not exit in {limit:?}");
        sleep(Duration::from_millis(10));
    }
}

fn open_dir_fds(dirs: &[(String, PathBuf)]) -> Vec<(String, OwnedFd)> {
    dirs.iter()
        .map(|(label, path)| {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY)
                .open(path)
                .expect("open cgroup dir");
            (label.clone(), OwnedFd::from(f))
        })
        .collect()
}

#[test]
fn mountinfo_parsing() {
    let text = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:5 - cgroup cgroup rw,memory
36 31 0:32 / /mnt/memory\\040again rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd ro,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
42 31 0:39 / /mnt/with\\040space rw - cgroup2 none rw
";
    let m = parse_mountinfo(text);
    assert_eq!(m.len(), 5, "{m:#?}");
    assert_eq!(m[0].controllers, vec!["cpu", "cpuacct"]);
    assert_eq!(m[0].mount_point, Path::new("/sys/fs/cgroup/cpu,cpuacct"));
    assert_eq!(m[1].controllers, vec!["memory"]);
    assert!(m[2].controllers.is_empty() && m[2].read_only);
    assert_eq!(m[3].version, CgroupVersion::V2);
    assert_eq!(m[4].mount_point, Path::new("/mnt/with space"));
}

#[test]
fn names_are_validated() {
    let fx = Fixture::detect("names");
    for bad in ["", "..", "a/b", "memory.max", "x y"] {
        assert!(
            matches!(
                fx.driver.create(bad, &Limits::default()),
                Err(CgroupError::InvalidName { .. })
            ),
            "{bad:?} accepted"
        );
    }
    assert!(matches!(
        fx.driver.create(
            "sb",
            &Limits {
                cpu_millicores: Some(1),
                ..Limits::default()
            }
        ),
        Err(CgroupError::InvalidLimit { .. })
    ));
    assert!(matches!(
        CgroupDriver::detect_with_base("../etc"),
        Err(CgroupError::InvalidName { .. })
    ));
}

#[test]
fn detect_and_report() {
    let fx = Fixture::detect("detect");
    let d = &fx.driver;
    println!("version {}", d.version());
    for (label, dir) in d.base_dirs() {
        println!("{label}: {}", dir.display());
        assert!(dir.is_dir());
    }
    let report = d.report();
    for f in &report {
        println!("{:15} {:5} {}", f.name, f.available, f.detail);
    }
    for name in ["memory", "cpu", "pids", "freezer", "oom detection", "kill"] {
        let f = report
            .iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("{name} missing from report"));
        assert!(f.available, "{name}: {}", f.detail);
    }
    // This machine (and CI) has v1 controllers and a controller-less cgroup2.
    let v2_has_memory = cgroup2_mount()
        .and_then(|m| std::fs::read_to_string(m.join("cgroup.controllers")).ok())
        .is_some_and(|c| c.split_whitespace().any(|x| x == "memory"));
    if !v2_has_memory {
        assert_eq!(d.version(), CgroupVersion::V1);
    }
}

#[test]
fn memory_limit_oom_kills_only_the_offender() {
    let fx = Fixture::detect("oom");
    let limit = 64u64 << 20;
    let cg = fx
        .driver
        .create(
            "sb",
            &Limits {
                memory_bytes: Some(limit),
                ..Limits::default()
            },
        )
        .expect("create");
    // A bystander in the same sandbox must survive the OOM.
    let mut bystander = spawn_gated(&["/bin/sleep", "30"]);
    cg.add_process(AGENT_LEAF, pid_of(&bystander)).expect("add");
    release(&mut bystander);

    let mut hog = spawn_gated(&[python(), "-c", "b = b'x' * (200 << 20); print(len(b))"]);
    cg.add_process(AGENT_LEAF, pid_of(&hog)).expect("add");
    release(&mut hog);
    let status = wait_timeout(&mut hog, Duration::from_secs(30));
    assert_eq!(status.signal(), Some(libc::SIGKILL), "hog: {status:?}");

    let st = cg.stats().expect("stats");
    println!("{st:?}");
    assert!(st.oom_kills >= 1);
    assert_eq!(st.memory_limit, Some(limit));
    assert!(st.memory_peak.unwrap_or(0) <= limit + (1 << 20));
    assert!(
        bystander.try_wait().expect("try_wait").is_none(),
        "bystander died"
    );
    let leaf = cg.leaf_stats(AGENT_LEAF).expect("leaf stats");
    assert!(leaf.oom_kills >= 1);

    cg.remove().expect("remove");
    wait_timeout(&mut bystander, Duration::from_secs(5));
}

#[test]
fn pids_limit_caps_forks() {
    let fx = Fixture::detect("pids");
    let cg = fx
        .driver
        .create(
            "sb",
            &Limits {
                pids_max: Some(20),
                ..Limits::default()
            },
        )
        .expect("create");
    let mut child = spawn_gated(&[
        "/bin/sh",
        "-c",
        "for i in $(seq 50); do sleep 5 & done; wait",
    ]);
    cg.add_process(AGENT_LEAF, pid_of(&child)).expect("add");
    release(&mut child);
    let mut max_seen = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        let st = cg.stats().expect("stats");
        max_seen = max_seen.max(st.pids_current);
        max_seen = max_seen.max(cg.pids().expect("pids").len() as u64);
        sleep(Duration::from_millis(20));
    }
    println!("max pids seen: {max_seen}");
    assert!(max_seen <= 20, "saw {max_seen} tasks");
    assert!(max_seen >= 10, "the loop did not run: {max_seen}");
    cg.kill_all().expect("kill_all");
    let status = wait_timeout(&mut child, Duration::from_secs(5));
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read stderr");
    println!("status {status:?}, stderr: {err}");
    assert!(!err.is_empty(), "fork never failed");
    assert!(cg.pids().expect("pids").is_empty());
    cg.remove().expect("remove");
}

#[test]
fn cpu_limit_throttles() {
    let fx = Fixture::detect("cpu");
    let cg = fx
        .driver
        .create(
            "sb",
            &Limits {
                cpu_millicores: Some(100),
                ..Limits::default()
            },
        )
        .expect("create");
    let busy = "import time\nt = time.time()\nwhile time.time() - t < 1.0: pass";
    let mut child = spawn_gated(&[python(), "-c", busy]);
    cg.add_process(AGENT_LEAF, pid_of(&child)).expect("add");
    release(&mut child);
    let status = wait_timeout(&mut child, Duration::from_secs(20));
    assert!(status.success());
    let st = cg.stats().expect("stats");
    let secs = st.cpu_usage_ns as f64 / 1e9;
    println!(
        "cpu {secs:.3}s, throttled {} times, {} ns",
        st.nr_throttled, st.throttled_ns
    );
    assert!(secs < 0.35, "got {secs} s of CPU");
    assert!(secs > 0.02, "got {secs} s of CPU");
    assert!(st.nr_throttled > 0);
    assert!(st.throttled_ns > 0);
    cg.remove().expect("remove");
}

#[test]
fn a_low_cpu_weight_yields_the_cpu_to_a_sandbox_of_default_weight() {
    // Two busy loops on the same CPU, one per sandbox: the one whose sandbox has weight 1
    // gets a small share of it, the one at the default weight nearly all.
    let fx = Fixture::detect("weight");
    if !fx.driver.has_controller("cpu") {
        eprintln!("no cpu controller: nothing to weigh");
        return;
    }
    let low = fx.driver.create("low", &Limits::default()).expect("create");
    let normal = fx
        .driver
        .create("normal", &Limits::default())
        .expect("create");
    low.set_cpu_weight(1).expect("weight 1");
    normal
        .set_cpu_weight(execbox_jail::cgroup::DEFAULT_CPU_WEIGHT)
        .expect("default weight");
    let busy = ["taskset", "-c", "0", python(), "-c", "while True: pass"];
    let mut children = Vec::new();
    for cg in [&low, &normal] {
        let mut child = spawn_gated(&busy);
        cg.add_process(AGENT_LEAF, pid_of(&child)).expect("add");
        release(&mut child);
        children.push(child);
    }
    sleep(Duration::from_millis(300));
    let before = [low.stats(), normal.stats()].map(|s| s.expect("stats").cpu_usage_ns);
    sleep(Duration::from_millis(700));
    let after = [low.stats(), normal.stats()].map(|s| s.expect("stats").cpu_usage_ns);
    let (low_ns, normal_ns) = (after[0] - before[0], after[1] - before[1]);
    println!("weight 1: {low_ns} ns, weight 100: {normal_ns} ns");
    assert!(
        normal_ns > 5 * low_ns,
        "weight 1 got {low_ns} ns against {normal_ns} ns"
    );
    for cg in [low, normal] {
        cg.remove().expect("remove");
    }
    for mut child in children {
        wait_timeout(&mut child, Duration::from_secs(5));
    }
}

#[test]
fn freeze_stops_and_thaw_resumes() {
    let fx = Fixture::detect("freeze");
    let cg = fx.driver.create("sb", &Limits::default()).expect("create");
    let mut child = spawn_gated(&[python(), "-c", "while True: pass"]);
    cg.add_process(AGENT_LEAF, pid_of(&child)).expect("add");
    release(&mut child);
    sleep(Duration::from_millis(300));
    assert!(!cg.is_frozen().expect("is_frozen"));

    cg.freeze().expect("freeze");
    assert!(cg.is_frozen().expect("is_frozen"));
    let u1 = cg.stats().expect("stats").cpu_usage_ns;
    sleep(Duration::from_millis(500));
    let u2 = cg.stats().expect("stats").cpu_usage_ns;
    println!("frozen: {u1} -> {u2}");
    assert!(u2 - u1 < 5_000_000, "ran {} ns while frozen", u2 - u1);
    assert!(child.try_wait().expect("try_wait").is_none());

    cg.thaw().expect("thaw");
    sleep(Duration::from_millis(500));
    let u3 = cg.stats().expect("stats").cpu_usage_ns;
    println!("thawed: {u2} -> {u3}");
    assert!(u3 - u2 > 50_000_000, "did not resume: {} ns", u3 - u2);
    assert!(!cg.is_frozen().expect("is_frozen"));

    cg.remove().expect("remove");
    let status = wait_timeout(&mut child, Duration::from_secs(5));
    assert_eq!(status.signal(), Some(libc::SIGKILL));
}

#[test]
fn kill_all_and_remove_leave_nothing() {
    let fx = Fixture::detect("kill");
    let cg = fx
        .driver
        .create(
            "sb",
            &Limits {
                pids_max: Some(64),
                memory_bytes: Some(256 << 20),
                cpu_millicores: Some(500),
            },
        )
        .expect("create");
    cg.create_leaf("exec-1").expect("leaf");
    // A nested cgroup, as a sandbox might create, in one hierarchy only.
    let (_, first) = cg.leaf_dirs("exec-1").expect("dirs").remove(0);
    std::fs::create_dir(first.join("nested")).expect("nested");

    let mut a = spawn_gated(&[
        "/bin/sh",
        "-c",
        "sleep 30 & sleep 30 & sh -c 'sleep 30 & wait' & wait",
    ]);
    cg.add_process(AGENT_LEAF, pid_of(&a)).expect("add");
    release(&mut a);
    let mut b = spawn_gated(&["/bin/sleep", "30"]);
    cg.add_process("exec-1", pid_of(&b)).expect("add");
    release(&mut b);
    sleep(Duration::from_millis(200));
    let pids = cg.pids().expect("pids");
    println!("pids before kill: {pids:?}");
    assert!(pids.len() >= 6, "{pids:?}");
    assert_eq!(cg.leaf_pids("exec-1").expect("leaf pids"), vec![pid_of(&b)]);

    cg.kill_all().expect("kill_all");
    assert!(cg.pids().expect("pids").is_empty());
    for c in [&mut a, &mut b] {
        let st = wait_timeout(c, Duration::from_secs(5));
        assert_eq!(st.signal(), Some(libc::SIGKILL));
    }

    cg.remove().expect("remove");
    for (label, dir) in cg.dirs() {
        assert!(!dir.exists(), "{label}: {} still exists", dir.display());
    }
    cg.remove().expect("remove is idempotent");
    fx.driver.remove_base().expect("remove base");
    for (label, dir) in fx.driver.base_dirs() {
        assert!(!dir.exists(), "{label}: {} still exists", dir.display());
    }
}

#[test]
fn remove_kills_running_processes() {
    let fx = Fixture::detect("rmkill");
    let cg = fx.driver.create("sb", &Limits::default()).expect("create");
    let mut child = spawn_gated(&["/bin/sleep", "30"]);
    cg.add_process(AGENT_LEAF, pid_of(&child)).expect("add");
    release(&mut child);
    sleep(Duration::from_millis(50));
    cg.remove().expect("remove");
    assert_eq!(
        wait_timeout(&mut child, Duration::from_secs(5)).signal(),
        Some(libc::SIGKILL)
    );
    assert!(cg.dirs().iter().all(|(_, d)| !d.exists()));
}

#[test]
fn reopen_existing_cgroup() {
    let fx = Fixture::detect("reopen");
    let limits = Limits {
        memory_bytes: Some(128 << 20),
        pids_max: Some(30),
        cpu_millicores: Some(2000),
    };
    let dirs = {
        let cg = fx.driver.create("sb", &limits).expect("create");
        assert!(matches!(
            fx.driver.create("sb", &limits),
            Err(CgroupError::AlreadyExists { .. })
        ));
        cg.dirs()
    };
    assert_eq!(fx.driver.list().expect("list"), vec!["sb".to_string()]);
    let cg = fx.driver.open("sb").expect("open");
    assert_eq!(cg.dirs(), dirs);
    assert_eq!(cg.name(), "sb");
    let st = cg.stats().expect("stats");
    assert_eq!(st.memory_limit, Some(128 << 20));
    assert_eq!(st.pids_current, 0);

    let mut child = spawn_gated(&["/bin/sleep", "30"]);
    cg.add_process(AGENT_LEAF, pid_of(&child)).expect("add");
    release(&mut child);
    assert_eq!(cg.pids().expect("pids"), vec![pid_of(&child)]);
    for p in cg.procs_files(AGENT_LEAF).expect("procs files") {
        let text = std::fs::read_to_string(&p).expect("read procs");
        assert!(text.contains(&child.id().to_string()), "{}", p.display());
    }
    cg.remove().expect("remove");
    wait_timeout(&mut child, Duration::from_secs(5));
    assert!(matches!(
        fx.driver.open("sb"),
        Err(CgroupError::NotFound { .. })
    ));
}

/// `ExecCgroups` used by root on the detected driver: leaf creation through
/// fds, joining with `join_self` in `pre_exec`, leaf stats, kill, remove.
#[test]
fn exec_leaf_through_fds() {
    let fx = Fixture::detect("execfd");
    let cg = fx
        .driver
        .create(
            "sb",
            &Limits {
                pids_max: Some(40),
                ..Limits::default()
            },
        )
        .expect("create");
    let exec = ExecCgroups::from_dir_fds(open_dir_fds(&cg.dirs()), fx.driver.version());
    let leaf = exec.create_leaf("exec-1").expect("create leaf");
    assert!(matches!(
        exec.create_leaf("exec-1"),
        Err(CgroupError::AlreadyExists { .. })
    ));
    let fds = leaf.procs_fds().expect("procs fds");
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", "sleep 30 & sleep 30 & wait"]);
    // SAFETY: join_self only calls write(2) on fds that stay open until exec.
    unsafe {
        cmd.pre_exec(move || join_self(&raw).map_err(std::io::Error::from));
    }
    let mut child = cmd.spawn().expect("spawn");
    drop(fds);
    sleep(Duration::from_millis(100));
    let pids = leaf.pids().expect("pids");
    assert!(pids.contains(&pid_of(&child)), "{pids:?}");
    assert_eq!(pids.len(), 3, "{pids:?}");
    let st = leaf.stats().expect("leaf stats");
    assert_eq!(st.pids_current, 3);
    assert_eq!(
        cg.leaf_stats("exec-1")
            .expect("host leaf stats")
            .pids_current,
        3
    );
    assert_eq!(exec.stats().expect("sandbox stats").pids_current, 3);
    let cgroup_file =
        std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).expect("read");
    let in_leaf = cgroup_file
        .lines()
        .filter(|l| l.ends_with("/sb/exec-1"))
        .count();
    assert_eq!(in_leaf, cg.dirs().len(), "{cgroup_file}");

    leaf.kill_all().expect("kill");
    assert_eq!(
        wait_timeout(&mut child, Duration::from_secs(5)).signal(),
        Some(libc::SIGKILL)
    );
    leaf.remove().expect("remove leaf");
    leaf.remove().expect("remove leaf twice");
    for (_, d) in cg.leaf_dirs("exec-1").expect("dirs") {
        assert!(!d.exists());
    }
    assert!(matches!(
        exec.open_leaf("exec-1"),
        Err(CgroupError::NotFound { .. })
    ));
    cg.remove().expect("remove");
}

/// Runs the test binary's `delegated_helper_child` as uid `nobody` with the
/// sandbox dir fds inherited, after placing it into the agent leaf.
fn run_delegated_helper(cg: &execbox_jail::cgroup::SandboxCgroup) {
    cg.delegate(NOBODY, NOBODY).expect("delegate");
    // Limit files stay root-owned, the delegated ones do not.
    use std::os::unix::fs::MetadataExt;
    for (_, d) in cg.dirs() {
        assert_eq!(std::fs::metadata(&d).expect("stat").uid(), NOBODY);
        assert_eq!(
            std::fs::metadata(d.join("cgroup.procs"))
                .expect("stat")
                .uid(),
            NOBODY
        );
        for limit in ["memory.limit_in_bytes", "memory.max", "pids.max", "cpu.max"] {
            if let Ok(m) = std::fs::metadata(d.join(limit)) {
                assert_eq!(m.uid(), 0, "{limit} was delegated");
            }
        }
    }
    let fds = open_dir_fds(&cg.dirs());
    let spec: Vec<String> = fds
        .iter()
        .map(|(l, fd)| format!("{l}={}", fd.as_raw_fd()))
        .collect();
    let raw: Vec<RawFd> = fds.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    let mut cmd = Command::new(std::env::current_exe().expect("exe"));
    cmd.args([
        "--exact",
        "delegated_helper_child",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(HELPER_ENV, format!("{};{}", cg.version(), spec.join(";")))
    .uid(NOBODY)
    .gid(NOBODY)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    // SAFETY: only fcntl(2) on fds that are open in the parent.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &raw {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn helper");
    drop(fds);
    cg.add_process(AGENT_LEAF, pid_of(&child))
        .expect("add helper");
    release(&mut child);
    let out = child.wait_with_output().expect("helper");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("helper stdout:\n{stdout}\nhelper stderr:\n{stderr}");
    assert!(out.status.success(), "helper failed: {:?}", out.status);
    assert!(stdout.contains("HELPER_OK"), "helper did not run");
}

/// Not a test on its own: does the in-sandbox part of the delegation tests
/// when started by `run_delegated_helper`.
#[test]
fn delegated_helper_child() {
    let Ok(spec) = std::env::var(HELPER_ENV) else {
        return;
    };
    assert_eq!(nix::unistd::geteuid().as_raw(), NOBODY);
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).expect("gate");
    let mut parts = spec.split(';');
    let version = match parts.next() {
        Some("v1") => CgroupVersion::V1,
        Some("v2") => CgroupVersion::V2,
        other => panic!("bad version {other:?}"),
    };
    let fds: Vec<(String, OwnedFd)> = parts
        .map(|p| {
            let (label, fd) = p.split_once('=').expect("label=fd");
            let fd: RawFd = fd.parse().expect("fd");
            // SAFETY: the parent passed this open descriptor to us, and
            // nothing else in this process owns it.
            (label.to_string(), unsafe { OwnedFd::from_raw_fd(fd) })
        })
        .collect();
    let n = fds.len();
    let exec = ExecCgroups::from_dir_fds(fds, version);
    let leaf = exec.create_leaf("exec-1").expect("create leaf as nobody");
    let procs = leaf.procs_fds().expect("procs fds");
    let raw: Vec<RawFd> = procs.iter().map(|f| f.as_raw_fd()).collect();
    let mut cmd = Command::new("/bin/sleep");
    cmd.arg("30");
    // SAFETY: join_self only calls write(2) on fds that stay open until exec.
    unsafe {
        cmd.pre_exec(move || join_self(&raw).map_err(std::io::Error::from));
    }
    let mut child = cmd.spawn().expect("spawn into leaf");
    let cgroup_file =
        std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).expect("read cgroup");
    println!("{cgroup_file}");
    let in_leaf = cgroup_file
        .lines()
        .filter(|l| l.ends_with("/sb/exec-1"))
        .count();
    assert_eq!(in_leaf, n, "child not in the leaf of every hierarchy");
    let me = std::fs::read_to_string("/proc/self/cgroup").expect("read cgroup");
    assert_eq!(me.lines().filter(|l| l.ends_with("/sb/agent")).count(), n);
    assert_eq!(leaf.pids().expect("pids"), vec![pid_of(&child)]);
    match leaf.stats() {
        Ok(st) => assert_eq!(st.pids_current, 1),
        Err(CgroupError::ControllerMissing { .. }) => println!("stats unsupported here"),
        Err(e) => panic!("stats: {e}"),
    }
    leaf.kill_all().expect("kill as nobody");
    assert_eq!(
        wait_timeout(&mut child, Duration::from_secs(5)).signal(),
        Some(libc::SIGKILL)
    );
    leaf.remove().expect("remove as nobody");
    assert!(matches!(
        exec.open_leaf("exec-1"),
        Err(CgroupError::NotFound { .. })
    ));
    println!("HELPER_OK");
}

#[test]
fn delegated_sandbox_creates_and_joins_leaf() {
    let fx = Fixture::detect("deleg");
    let cg = fx
        .driver
        .create(
            "sb",
            &Limits {
                pids_max: Some(40),
                memory_bytes: Some(256 << 20),
                ..Limits::default()
            },
        )
        .expect("create");
    run_delegated_helper(&cg);
    cg.remove().expect("remove");
}

// ---- cgroup v2 paths on a cgroup2 mount (here: without controllers) ----

#[test]
fn v2_limits_without_controllers_are_errors() {
    let Some(fx) = Fixture::v2("v2lim") else {
        println!("no cgroup2 mount, skipped");
        return;
    };
    assert_eq!(fx.driver.version(), CgroupVersion::V2);
    for (controller, limits) in [
        (
            "memory",
            Limits {
                memory_bytes: Some(64 << 20),
                ..Limits::default()
            },
        ),
        (
            "cpu",
            Limits {
                cpu_millicores: Some(100),
                ..Limits::default()
            },
        ),
        (
            "pids",
            Limits {
                pids_max: Some(10),
                ..Limits::default()
            },
        ),
    ] {
        if fx.driver.has_controller(controller) {
            println!("{controller} is available on this cgroup2 mount");
            continue;
        }
        match fx.driver.create("sb", &limits) {
            Err(CgroupError::ControllerMissing { controller: c }) => assert_eq!(c, controller),
            other => panic!("{controller}: expected ControllerMissing, got {other:?}"),
        }
        let report = fx.driver.report();
        let line = report.iter().find(|f| f.name == controller).expect("line");
        assert!(!line.available);
    }
    assert!(
        fx.driver.list().expect("list").is_empty(),
        "left something behind"
    );
    if !fx.driver.has_controller("memory") {
        let cg = fx.driver.create("sb", &Limits::default()).expect("create");
        assert!(matches!(
            cg.stats(),
            Err(CgroupError::ControllerMissing { .. })
        ));
        cg.remove().expect("remove");
    }
}

#[test]
fn v2_freeze_kill_remove() {
    let Some(fx) = Fixture::v2("v2fk") else {
        println!("no cgroup2 mount, skipped");
        return;
    };
    let report = fx.driver.report();
    for name in ["freezer", "kill"] {
        let f = report.iter().find(|f| f.name == name).expect("line");
        assert!(f.available, "{name}: {}", f.detail);
    }
    let cg = fx.driver.create("sb", &Limits::default()).expect("create");
    assert_eq!(cg.dirs().len(), 1);
    assert_eq!(cg.dirs()[0].0, "unified");
    assert!(cg.dirs()[0].1.join(AGENT_LEAF).is_dir());

    let mut busy = spawn_gated(&[python(), "-c", "while True: pass"]);
    let pid = pid_of(&busy);
    cg.add_process(AGENT_LEAF, pid).expect("add");
    release(&mut busy);
    let mut forker = spawn_gated(&["/bin/sh", "-c", "sleep 30 & sleep 30 & wait"]);
    cg.create_leaf("exec-1").expect("leaf");
    cg.add_process("exec-1", pid_of(&forker)).expect("add");
    release(&mut forker);
    sleep(Duration::from_millis(300));
    assert_eq!(cg.pids().expect("pids").len(), 4);

    cg.freeze().expect("freeze");
    assert!(cg.is_frozen().expect("is_frozen"));
    let t1 = proc_cpu_ticks(pid);
    sleep(Duration::from_millis(500));
    let t2 = proc_cpu_ticks(pid);
    println!("frozen ticks {t1} -> {t2}");
    assert!(t2 - t1 <= 1, "ran while frozen");
    cg.thaw().expect("thaw");
    sleep(Duration::from_millis(500));
    let t3 = proc_cpu_ticks(pid);
    println!("thawed ticks {t2} -> {t3}");
    assert!(t3 - t2 >= 5, "did not resume");
    assert!(!cg.is_frozen().expect("is_frozen"));

    cg.kill_all().expect("kill via cgroup.kill");
    assert!(cg.pids().expect("pids").is_empty());
    for c in [&mut busy, &mut forker] {
        assert_eq!(
            wait_timeout(c, Duration::from_secs(5)).signal(),
            Some(libc::SIGKILL)
        );
    }
    cg.remove().expect("remove");
    assert!(!cg.dirs()[0].1.exists());
}

#[test]
fn v2_exec_leaf_and_delegation() {
    let Some(fx) = Fixture::v2("v2exec") else {
        println!("no cgroup2 mount, skipped");
        return;
    };
    let cg = fx.driver.create("sb", &Limits::default()).expect("create");
    // As root through fds.
    let exec = ExecCgroups::from_dir_fds(open_dir_fds(&cg.dirs()), CgroupVersion::V2);
    assert_eq!(exec.labels(), vec!["unified".to_string()]);
    let leaf = exec.create_leaf("exec-0").expect("leaf");
    let fds = leaf.procs_fds().expect("fds");
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut cmd = Command::new("/bin/sleep");
    cmd.arg("30");
    // SAFETY: join_self only calls write(2) on fds that stay open until exec.
    unsafe {
        cmd.pre_exec(move || join_self(&raw).map_err(std::io::Error::from));
    }
    let mut child = cmd.spawn().expect("spawn");
    let text = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).expect("read");
    assert!(
        text.lines()
            .any(|l| l.starts_with("0::") && l.ends_with("/sb/exec-0")),
        "{text}"
    );
    leaf.freeze().expect("freeze leaf");
    leaf.thaw().expect("thaw leaf");
    leaf.kill_all().expect("kill leaf");
    assert_eq!(
        wait_timeout(&mut child, Duration::from_secs(5)).signal(),
        Some(libc::SIGKILL)
    );
    leaf.remove().expect("remove leaf");
    // And as the delegated uid.
    run_delegated_helper(&cg);
    cg.remove().expect("remove");
    assert!(!cg.dirs()[0].1.exists());
}
