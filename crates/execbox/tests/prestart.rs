//! Pre-started interpreters (issue 15): a one-shot isol8 `/execute` served by a Python the warm
//! pool started ahead of the run must be indistinguishable from a fresh `python3 -c` / `python3
//! <file>`. Each test runs the same program on two real servers over loopback HTTP: one whose
//! pool pre-starts Python (the run must say `x-execbox-prestarted: true`) and one with
//! `warm_pool_prestart = "none"` (a fresh process, `false`), and compares what the program saw
//! and how it ended. Also: two consecutive one-shot callers see nothing of each other, runs whose
//! environment changes the interpreter's start-up fall back to a fresh start, and the pool
//! grows with demand and shrinks when idle.

mod common;

use std::time::{Duration, Instant};

use common::{free_port, TestServer};
use serde_json::{json, Value};

struct Answer {
    status: u16,
    prestarted: Option<bool>,
    memory_peak: u64,
    cpu_ms: u64,
    body: Value,
}

fn post(server: &TestServer, body: &Value) -> Answer {
    let r = ureq::post(&server.url("/execute"))
        .set("Content-Type", "application/json")
        .send_string(&body.to_string());
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request failed: {e}"),
    };
    let header = |n: &str| resp.header(n).map(str::to_string);
    let prestarted = header("x-execbox-prestarted").map(|v| v == "true");
    let memory_peak = header("x-execbox-memory-peak-bytes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let cpu_ms = header("x-execbox-cpu-time-ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let status = resp.status();
    let body = resp.into_json().unwrap_or(Value::Null);
    Answer {
        status,
        prestarted,
        memory_peak,
        cpu_ms,
        body,
    }
}

/// Two servers for one test (dropped, so stopped, with it): one whose pool pre-starts Python
/// and one that starts every run fresh.
struct Pair {
    pre: TestServer,
    fresh: TestServer,
}

impl Pair {
    fn start() -> Self {
        Self::start_with("")
    }

    /// With `head` at the top of both servers' configuration.
    fn start_with(head: &str) -> Self {
        let config = |prestart: &str| {
            format!("{head}[policy]\nwarm_pool_size = 2\nwarm_pool_prestart = \"{prestart}\"\n")
        };
        Self {
            pre: TestServer::start_with_config(&config("python")),
            fresh: TestServer::start_with_config(&config("none")),
        }
    }
}

/// Runs `body` on the pre-starting server until a pre-started interpreter serves it (the first
/// run of a new limits profile finds no ready sandbox of that profile; the pool then readies
/// some in the background).
fn via_prestart(s: &Pair, body: &Value) -> Answer {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let a = post(&s.pre, body);
        assert_eq!(a.status, 200, "{}", a.body);
        if a.prestarted == Some(true) {
            return a;
        }
        assert!(
            Instant::now() < deadline,
            "no run was served by a pre-started interpreter: {}",
            a.body
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn via_fresh(s: &Pair, body: &Value) -> Answer {
    let a = post(&s.fresh, body);
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.prestarted, Some(false), "{}", a.body);
    a
}

/// `value` with the unique names isol8 gives program files (`/sandbox/exec_<ms>_<uuid>.py`)
/// replaced by one name: they differ from run to run whichever path runs them.
fn same_names(value: &Value) -> Value {
    let Some(text) = value.as_str() else {
        return value.clone();
    };
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("/sandbox/exec_") {
        out.push_str(&rest[..i]);
        out.push_str("/sandbox/exec_N");
        rest = &rest[i + "/sandbox/exec_".len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_hexdigit() || c == '_'))
            .unwrap_or(rest.len());
        rest = &rest[end..];
    }
    out.push_str(rest);
    Value::String(out)
}

/// Both paths, the parts of the result that do not vary from run to run.
fn both(s: &Pair, body: Value) -> (Answer, Answer) {
    let p = via_prestart(s, &body);
    let f = via_fresh(s, &body);
    for key in [
        "stdout",
        "stderr",
        "exitCode",
        "timedOut",
        "oomKilled",
        "truncated",
        "files",
    ] {
        assert_eq!(
            same_names(&p.body[key]),
            same_names(&f.body[key]),
            "{key} differs:\npre-started: {}\nfresh: {}",
            p.body,
            f.body
        );
    }
    (p, f)
}

fn python(code: &str) -> Value {
    json!({"request": {"runtime": "python", "code": code}})
}

/// What a program sees of its start, printed as one JSON line, taken before it imports
/// anything itself.
const INTROSPECT: &str = r#"import sys
mods = sorted(sys.modules)
g = {k: repr(v) if k != "__loader__" else type(v).__name__ for k, v in globals().items() if k != "mods"}
import os, json, stat
fds = sorted(os.listdir("/proc/self/fd"))
st = os.fstat(0)
print(json.dumps({
    "argv": sys.argv, "orig_argv": sys.orig_argv, "executable": sys.executable,
    "path": sys.path, "flags": repr(sys.flags), "modules": mods, "globals": g,
    "environ": dict(os.environ), "environ_order": list(os.environ), "cwd": os.getcwd(),
    "fds": fds, "stdin_chr": stat.S_ISCHR(st.st_mode), "stdin_fifo": stat.S_ISFIFO(st.st_mode),
    "stdin": sys.stdin.read(), "uid": os.getuid(), "ppid": os.getppid(),
    "pgid_is_pid": os.getpgid(0) == os.getpid(), "sid_is_pid": os.getsid(0) == os.getpid(),
    "encoding": [sys.getfilesystemencoding(), sys.stdout.encoding, sys.stdin.encoding],
    "stdout_line_buffering": sys.stdout.line_buffering,
    "child_env": os.popen("env -0").read().split("\0"),
}))
"#;

fn introspect_equal(s: &Pair, body: Value) {
    let (p, f) = both(s, body);
    let parse = |a: &Answer| -> Value {
        serde_json::from_str(same_names(&a.body["stdout"]).as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}: {}", a.body))
    };
    let (pv, fv) = (parse(&p), parse(&f));
    let keys: Vec<&String> = fv.as_object().expect("object").keys().collect();
    for key in keys {
        assert_eq!(pv[key], fv[key], "{key}: pre-started vs fresh");
    }
}

#[test]
fn inline_code_sees_exactly_what_a_fresh_python_c_sees() {
    let s = Pair::start();
    // Inline: `python3 -c <code>` with stdin /dev/null; the request's environment on top.
    introspect_equal(
        &s,
        json!({"request": {"runtime": "python", "code": INTROSPECT,
        "env": {"API_TOKEN": "t0k3n", "EMPTY": ""}}}),
    );
}

#[test]
fn file_runs_see_exactly_what_a_fresh_python_file_run_sees() {
    let s = Pair::start();
    // stdin makes isol8 write the program to a file: `python3 /sandbox/exec_….py`, stdin a
    // pipe; a working directory of its own, made for the run.
    introspect_equal(
        &s,
        json!({"request": {"runtime": "python", "code": INTROSPECT,
        "stdin": "line one\nline two\n", "workdir": "sub/dir", "env": {"A": "1"}}}),
    );
}

#[test]
fn globals_and_modules_match_a_fresh_start_exactly() {
    let s = Pair::start();
    // The raw repr of `globals()` (minus the loader object's address) and the module set, at
    // the program's first line.
    let code = "import sys\nprint(sorted(sys.modules))\nprint([(k, type(v).__name__) for k, v in globals().items()])\nprint(__name__, '__file__' in globals())";
    let (p, _) = both(&s, python(code));
    assert!(
        p.body["stdout"]
            .as_str()
            .unwrap_or("")
            .contains("__main__ False"),
        "{}",
        p.body
    );
    let file = json!({"request": {"runtime": "python", "code": code, "stdin": ""}});
    let (p, _) = both(&s, file);
    assert!(
        p.body["stdout"]
            .as_str()
            .unwrap_or("")
            .contains("__main__ True"),
        "{}",
        p.body
    );
}

#[test]
fn exit_codes_tracebacks_and_syntax_errors_are_those_of_a_fresh_run() {
    let s = Pair::start();
    let cases = [
        ("print('ok')", 0),
        ("import sys\nprint('bye')\nsys.exit(3)", 3),
        ("raise SystemExit('message to stderr')", 1),
        (
            "def f():\n    raise ValueError('boom')\nprint('before')\nf()",
            1,
        ),
        ("x = (", 1),
        (
            "import atexit\natexit.register(lambda: print('at exit'))\nraise RuntimeError('x')",
            1,
        ),
    ];
    for (code, exit) in cases {
        let (p, _) = both(&s, python(code));
        assert_eq!(p.body["exitCode"], exit, "{code}: {}", p.body);
    }
    // The traceback names the program's frames only.
    let (p, _) = both(&s, python("def f():\n    raise ValueError('boom')\nf()"));
    let stderr = p.body["stderr"].as_str().unwrap_or("");
    assert_eq!(
        stderr,
        "Traceback (most recent call last):\n  File \"<string>\", line 3, in <module>\n  File \"<string>\", line 2, in f\nValueError: boom",
        "{}",
        p.body
    );
    // The same from a file, whose frames carry its path.
    let (p, _) = both(
        &s,
        json!({"request": {"runtime": "python", "stdin": "",
        "code": "import sys\nsys.stderr.write(__file__ + '\\n')\n1/0"}}),
    );
    let stderr = p.body["stderr"].as_str().unwrap_or("");
    let file = stderr.lines().next().unwrap_or("");
    assert!(file.starts_with("/sandbox/exec_"), "{stderr}");
    assert!(
        stderr.contains(&format!("File \"{file}\", line 3, in <module>\n    1/0\n")),
        "{stderr}"
    );
    assert_eq!(stderr.matches("File \"").count(), 1, "{stderr}");
}

#[test]
fn the_end_of_the_program_is_that_of_a_fresh_run() {
    // A program that provably leaves finalization nothing but the flush of its standard
    // streams ends by `os._exit` after that flush; every other one ends through the
    // interpreter's finalization. Both must be what a fresh run does at its end. The system's
    // Python where there is one: an interpreter whose site hooks start threads or register
    // exit handlers (some pyenv builds) never ends quietly.
    let system = std::path::Path::new("/usr/bin/python3");
    let s = if system.exists() {
        Pair::start_with("python = \"/usr/bin/python3\"\n")
    } else {
        Pair::start()
    };
    let cases = [
        // Quiet: the flush of what is still buffered is all there is.
        ("print('no newline at the end', end='')", "no newline at the end"),
        (
            "import math, json\nprint(json.dumps({'pi': round(math.pi, 3)}), end='')",
            "{\"pi\": 3.142}",
        ),
        (
            "if __name__ == '__main__':\n    print(sum(i * i for i in range(10)))",
            "285",
        ),
        // Finalization has work: a finalizer, an exit handler, a generator's `finally`, a
        // thread to wait for, a `weakref.finalize`, a class built with a finalizer by name.
        (
            "class A:\n    def __del__(self):\n        print('finalized')\na = A()\nprint('end')",
            "end\nfinalized",
        ),
        (
            "import atexit\natexit.register(print, 'at exit')\nprint('end')",
            "end\nat exit",
        ),
        (
            "def g():\n    try:\n        yield 1\n    finally:\n        print('closed')\nit = g()\nnext(it)\nprint('end')",
            "end\nclosed",
        ),
        (
            "import threading, time\ndef w():\n    time.sleep(0.2)\n    print('thread done')\nthreading.Thread(target=w).start()\nprint('main done')",
            "main done\nthread done",
        ),
        (
            "import weakref\nclass O: pass\no = O()\nweakref.finalize(o, print, 'finalizer')\nprint('end')",
            "end\nfinalizer",
        ),
        (
            "X = type('X', (), {'__del__': lambda self: print('bye')})\nx = X()\nprint('end')",
            "end\nbye",
        ),
    ];
    for (code, stdout) in cases {
        let (p, _) = both(&s, python(code));
        assert_eq!(p.body["stdout"], stdout, "{code}: {}", p.body);
        assert_eq!(p.body["exitCode"], 0, "{code}: {}", p.body);
    }
    // A file written and never closed: its buffer reaches the file at the end.
    let body = json!({"request": {"runtime": "python", "outputPaths": ["/sandbox/out.txt"],
        "code": "f = open('/sandbox/out.txt', 'w')\nf.write('buffered')\nprint('end')"}});
    let (p, _) = both(&s, body);
    assert_eq!(
        p.body["files"]["/sandbox/out.txt"], "YnVmZmVyZWQ=",
        "{}",
        p.body
    );
}

#[test]
fn death_by_signal_and_interrupts_are_those_of_a_fresh_run() {
    let s = Pair::start();
    let (p, _) = both(
        &s,
        python("import os\nprint('x', flush=True)\nos.kill(os.getpid(), 9)"),
    );
    assert_eq!(p.body["exitCode"], 137, "{}", p.body);
    let (p, _) = both(
        &s,
        python("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)"),
    );
    assert_eq!(p.body["exitCode"], 143, "{}", p.body);
    // An uncaught KeyboardInterrupt: traceback, then death by SIGINT.
    let (p, _) = both(&s, python("raise KeyboardInterrupt"));
    assert_eq!(p.body["exitCode"], 130, "{}", p.body);
}

#[test]
fn timeouts_and_output_caps_apply_as_to_a_fresh_run() {
    let s = Pair::start();
    let (p, _) = both(
        &s,
        json!({"request": {"runtime": "python", "timeoutMs": 1000,
        "code": "import time\nprint('started', flush=True)\nwhile True: time.sleep(0.01)"}}),
    );
    assert_eq!(p.body["timedOut"], true, "{}", p.body);
    assert_eq!(p.body["exitCode"], 137, "{}", p.body);
    let (p, _) = both(
        &s,
        json!({"request": {"runtime": "python",
        "code": "import sys\nsys.stdout.write('y' * 100000)\nsys.stderr.write('e' * 5000)"},
        "options": {"maxOutputSize": 4096}}),
    );
    assert_eq!(p.body["truncated"], true, "{}", p.body);
}

#[test]
fn stdin_and_files_are_those_of_a_fresh_run() {
    let s = Pair::start();
    let body = json!({"request": {"runtime": "python", "stdin": "3\n4\n",
        "files": {"/sandbox/in.txt": "input file"},
        "outputPaths": ["/sandbox/out.txt"],
        "code": "import sys\nnums = [int(l) for l in sys.stdin]\nopen('/sandbox/out.txt', 'w').write(open('in.txt').read() + str(sum(nums)))\nprint(sum(nums))"}});
    let (p, _) = both(&s, body);
    assert_eq!(p.body["stdout"], "7", "{}", p.body);
    assert!(
        p.body["files"]["/sandbox/out.txt"].is_string(),
        "{}",
        p.body
    );
}

#[test]
fn memory_accounting_and_oom_kills_are_those_of_a_fresh_run() {
    let s = Pair::start();
    // The leaf's peak counts the run and the interpreter's start-up, as in a fresh run.
    let body = json!({"request": {"runtime": "python",
        "code": "x = bytearray(80 * 1024 * 1024)\nprint(len(x))"}});
    let (p, f) = both(&s, body);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    assert!(
        p.memory_peak >= 80 << 20,
        "pre-started peak {:.1} MiB",
        mib(p.memory_peak)
    );
    assert!(
        f.memory_peak >= 80 << 20,
        "fresh peak {:.1} MiB",
        mib(f.memory_peak)
    );
    let diff = (mib(p.memory_peak) - mib(f.memory_peak)).abs();
    assert!(
        diff < 8.0,
        "peaks differ by {diff:.1} MiB: pre-started {:.1}, fresh {:.1}",
        mib(p.memory_peak),
        mib(f.memory_peak)
    );
    // A memory bomb under a limit: killed by the OOM killer, reported so.
    let bomb = json!({"request": {"runtime": "python",
        "code": "x = bytearray(300 * 1024 * 1024)\nprint('survived')"},
        "options": {"memoryLimit": "128m"}});
    let (p, _) = both(&s, bomb);
    assert_eq!(p.body["oomKilled"], true, "{}", p.body);
    assert_eq!(p.body["exitCode"], 137, "{}", p.body);
}

#[test]
fn cpu_time_is_the_runs_own_start_up_included() {
    let s = Pair::start();
    let body =
        python("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass");
    let (p, f) = both(&s, body);
    assert!(p.cpu_ms >= 300, "pre-started cpu {} ms", p.cpu_ms);
    assert!(f.cpu_ms >= 300, "fresh cpu {} ms", f.cpu_ms);
    // Start-up included on both paths: the two agree within scheduling noise.
    assert!(
        p.cpu_ms.abs_diff(f.cpu_ms) < 150,
        "cpu: pre-started {} ms, fresh {} ms",
        p.cpu_ms,
        f.cpu_ms
    );
}

#[test]
fn consecutive_one_shot_callers_see_nothing_of_each_other() {
    let s = Pair::start();
    let first = json!({"request": {"runtime": "python", "env": {"SECRET_OF_A": "s3cr3t"},
        "code": "import os, subprocess\nopen('/tmp/a-was-here', 'w').write('x')\nopen('/sandbox/a-was-here', 'w').write('x')\nos.environ['LEAK'] = '1'\nsubprocess.Popen(['sleep', '300'], start_new_session=True)\nprint(os.getpid())"}});
    let second = json!({"request": {"runtime": "python",
        "code": "import os\nprocs = []\nfor p in os.listdir('/proc'):\n    if p.isdigit():\n        try: procs.append(open(f'/proc/{p}/cmdline').read().replace(chr(0), ' ').strip())\n        except OSError: pass\nprint(sorted(os.listdir('/tmp')), sorted(os.listdir('/sandbox')), 'SECRET_OF_A' in os.environ, 'LEAK' in os.environ, [c for c in procs if 'sleep' in c])"}});
    for _ in 0..3 {
        let a = via_prestart(&s, &first);
        assert_eq!(a.body["exitCode"], 0, "{}", a.body);
        let b = via_prestart(&s, &second);
        assert_eq!(b.body["stdout"], "[] [] False False []", "{}", b.body);
        assert_ne!(a.body["containerId"], b.body["containerId"]);
    }
}

#[test]
fn runs_whose_environment_changes_the_start_up_start_fresh() {
    let s = Pair::start();
    // Warm the default profile's pre-started interpreters first.
    via_prestart(&s, &python("pass"));
    for (name, value) in [
        ("PYTHONDONTWRITEBYTECODE", "1"),
        ("PYTHONPATH", "/sandbox/lib"),
        ("LC_ALL", "C"),
        ("HOME", "/sandbox"),
    ] {
        let code = format!(
            "import os, sys\nprint(os.environ.get({name:?}), sys.path[1:2], sys.getfilesystemencoding())"
        );
        let body = json!({"request": {"runtime": "python", "env": {name: value}, "code": code}});
        let p = post(&s.pre, &body);
        assert_eq!(p.status, 200, "{}", p.body);
        assert_eq!(p.prestarted, Some(false), "{name}: {}", p.body);
        let f = via_fresh(&s, &body);
        assert_eq!(p.body["stdout"], f.body["stdout"], "{name}");
    }
    // Other runtimes, and setup scripts, take the sandbox without its interpreter.
    let bash = post(
        &s.pre,
        &json!({"request": {"runtime": "bash", "code": "echo $0"}}),
    );
    assert_eq!(bash.prestarted, Some(false), "{}", bash.body);
    assert_eq!(bash.body["stdout"], "bash", "{}", bash.body);
}

fn metric(port: u16, series: &str) -> Option<f64> {
    let text = ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
        .call()
        .ok()?
        .into_string()
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn wait_for(what: &str, deadline: Duration, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !ok() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_pool_grows_with_demand_and_shrinks_when_idle() {
    let port = free_port();
    let server = TestServer::start_with_config(&format!(
        "[policy]\nwarm_pool_size = 1\nwarm_pool_max = 4\nwarm_pool_idle_secs = 6\n\
         [metrics]\nlisten = \"127.0.0.1:{port}\"\n"
    ));
    let ready = || metric(port, "execbox_pool_ready{pool=\"warm\"}").unwrap_or(-1.0);
    let target = || metric(port, "execbox_pool_target{pool=\"warm\"}").unwrap_or(-1.0);
    wait_for("the first ready sandbox", Duration::from_secs(30), || {
        ready() == 1.0
    });
    // Four runs at once: the pool's target follows them (up to its maximum).
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let a = post(&server, &python("import time\ntime.sleep(1)\nprint('ok')"));
                assert_eq!(a.body["stdout"], "ok", "{}", a.body);
            });
        }
    });
    wait_for("the pool to grow to 4", Duration::from_secs(30), || {
        target() == 4.0 && ready() == 4.0
    });
    // Idle: back to its floor, the surplus removed.
    wait_for("the pool to shrink to 1", Duration::from_secs(30), || {
        target() == 1.0 && ready() == 1.0
    });
}
