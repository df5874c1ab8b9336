//! Pre-started interpreters (`POST /execbox/prestart`): an interpreter started ahead of the
//! sandbox's next run, through [`Runner::start`] like any user process (identity, its own
//! execution cgroup leaf, Landlock), with its stdin, stdout and stderr as pipes the agent keeps
//! and a control socket as fd 3 on which a tiny bootstrap waits for the run. When the run comes
//! and the interpreter can serve it exactly as a fresh process would ([`Prestarted::message`]),
//! the agent sends argv, environment, working directory and program over fd 3; the bootstrap
//! closes fd 3 and becomes the run, and the run API treats the process as one it has just
//! started (same timeout, output caps, stdin, accounting of its leaf — start-up included —,
//! `oomKilled`). A pre-started interpreter serves one run only: it is taken out of the slot
//! either way, and killed when it does not fit the run, so it never competes with the fresh
//! process for the sandbox's memory.
//!
//! Python only: the bootstrap (`python.py`) is run as `python3 -c <bootstrap>`, the same
//! interpreter by the same `PATH` with the same flags and site initialisation as isol8's
//! `python3 -c <code>` / `python3 <file>`, and imports nothing a fresh start does not.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use execbox_proto::run::{PrestartRequest, PrestartResponse, RunError as WireError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::runner::{Input, Output, RunSpec, Runner, Started};
use crate::AppState;

/// The Python bootstrap, passed as `-c`.
const PYTHON_BOOTSTRAP: &str = include_str!("python.py");
/// How long an interpreter may take to start before the prestart fails.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a handed-over interpreter may take to confirm it took the run.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// Variables whose value an interpreter (or the C library under it) reads while it starts:
/// a run that sets one to another value than the pre-started process had starts fresh.
/// `PATH` picks the interpreter (and `sys.executable`), `HOME` the user site directory,
/// the locale variables the file system and standard stream encodings, `PYTHON*` the
/// interpreter's configuration, `LD_*`/`GLIBC_TUNABLES`/`MALLOC_*` the loader and allocator.
fn read_at_startup(name: &str) -> bool {
    const EXACT: &[&str] = &["PATH", "HOME", "LANG", "LANGUAGE", "TZ", "GLIBC_TUNABLES"];
    const PREFIXES: &[&str] = &["PYTHON", "LC_", "LD_", "MALLOC_", "__PYVENV"];
    EXACT.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// An interpreter waiting for its run.
pub struct Prestarted {
    started: Started,
    control: tokio::net::UnixStream,
    /// The environment it started with.
    env: Vec<(String, String)>,
}

/// The sandbox's pre-started interpreter, if any.
#[derive(Default, Clone)]
pub struct Slot(Arc<Mutex<Option<Prestarted>>>);

impl Slot {
    fn put(&self, p: Prestarted) {
        let old = self.lock().replace(p);
        if let Some(old) = old {
            old.discard();
        }
    }

    /// Takes the waiting interpreter out: it serves this run or none.
    pub fn take(&self) -> Option<Prestarted> {
        self.lock().take()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Prestarted>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Errors of a prestart.
#[derive(Debug, thiserror::Error)]
pub enum PrestartError {
    /// The request names a runtime that cannot be pre-started.
    #[error("runtime: {0:?} cannot be pre-started (only \"python\")")]
    Runtime(String),
    /// The request body is not a prestart request.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The interpreter did not start.
    #[error("the interpreter did not start: {0}")]
    Start(String),
}

impl IntoResponse for PrestartError {
    fn into_response(self) -> Response {
        let (status, kind) = match &self {
            PrestartError::Runtime(_) | PrestartError::Malformed(_) => {
                (StatusCode::BAD_REQUEST, "invalid")
            }
            PrestartError::Start(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status.is_server_error() {
            tracing::warn!(error = %self, "prestart failed");
        }
        let body = WireError {
            kind: kind.into(),
            message: self.to_string(),
        };
        (status, Json(body)).into_response()
    }
}

/// `POST /execbox/prestart`.
pub async fn prestart(
    State(app): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Json<PrestartResponse>, PrestartError> {
    let req: PrestartRequest =
        serde_json::from_slice(&body).map_err(|e| PrestartError::Malformed(e.to_string()))?;
    if req.runtime != "python" {
        return Err(PrestartError::Runtime(req.runtime));
    }
    let t = Instant::now();
    let p = start_python(&app.runner).await?;
    let pid = p.started.pid;
    app.prestarted.put(p);
    Ok(Json(PrestartResponse {
        pid,
        startup_ms: t.elapsed().as_millis() as u64,
    }))
}

async fn start_python(runner: &Runner) -> Result<Prestarted, PrestartError> {
    let start = |e: &dyn std::fmt::Display| PrestartError::Start(e.to_string());
    let (agent_end, child_end) = std::os::unix::net::UnixStream::pair().map_err(|e| start(&e))?;
    let started = runner
        .start(RunSpec {
            argv: vec!["python3".into(), "-c".into(), PYTHON_BOOTSTRAP.into()],
            cwd: Path::new(execbox_jail::rootfs::SANDBOX_HOME),
            extra_env: Vec::new(),
            creds: None,
            groups: Vec::new(),
            output: Output::Pipes,
            input: Input::Pipe,
            controlling_tty: false,
            inherit_fds: vec![OwnedFd::from(child_end)],
        })
        .map_err(|e| start(&e))?;
    let mut p = Prestarted {
        started,
        control: {
            agent_end.set_nonblocking(true).map_err(|e| start(&e))?;
            tokio::net::UnixStream::from_std(agent_end).map_err(|e| start(&e))?
        },
        env: runner.env_with(&[]),
    };
    let mut ready = [0u8; 1];
    match tokio::time::timeout(STARTUP_TIMEOUT, p.control.read(&mut ready)).await {
        Ok(Ok(1)) if ready[0] == b'R' => Ok(p),
        other => {
            let why = match other {
                Err(_) => "timed out".to_string(),
                Ok(Err(e)) => e.to_string(),
                Ok(Ok(_)) => "it exited while starting".to_string(),
            };
            p.discard();
            Err(PrestartError::Start(why))
        }
    }
}

/// What a run is, as far as a pre-started interpreter is concerned.
pub struct RunShape<'a> {
    /// The run's argv.
    pub argv: &'a [String],
    /// Its full environment (the sandbox's with the request's over it), in exec order.
    pub env: &'a [(String, String)],
    /// The request's own variables.
    pub request_env: &'a std::collections::BTreeMap<String, String>,
    /// Working directory.
    pub cwd: &'a Path,
    /// Standard input is `/dev/null` (else the pipe).
    pub stdin_null: bool,
}

impl Prestarted {
    /// The control message that makes this interpreter the run, or none when the run must
    /// start fresh to behave exactly as a fresh run: another program or form of arguments, a
    /// variable read at start-up set to another value, a NUL byte where exec would refuse it.
    pub fn message(&self, run: &RunShape<'_>) -> Option<Vec<u8>> {
        let argv = run.argv;
        if argv.first().map(String::as_str) != Some("python3") || argv.len() < 2 {
            return None;
        }
        let (mode, target, sys_argv): (&str, &str, Vec<&str>) = if argv[1] == "-c" {
            let code = argv.get(2)?;
            let rest = argv[3..].iter().map(String::as_str);
            ("c", code, std::iter::once("-c").chain(rest).collect())
        } else if !argv[1].starts_with('-') && !argv[1].ends_with(".pyc") {
            (
                "f",
                &argv[1],
                argv[1..].iter().map(String::as_str).collect(),
            )
        } else {
            return None;
        };
        for (k, v) in run.request_env {
            if read_at_startup(k) && !self.env.iter().any(|(bk, bv)| bk == k && bv == v) {
                return None;
            }
        }
        let cwd = run.cwd.to_str()?;
        let mut fields: Vec<String> = vec![
            mode.into(),
            if run.stdin_null { "1" } else { "0" }.into(),
            cwd.into(),
            target.into(),
            sys_argv.len().to_string(),
        ];
        fields.extend(sys_argv.iter().map(|s| s.to_string()));
        fields.push(argv.len().to_string());
        fields.extend(argv.iter().cloned());
        // In the order exec gives a fresh process (`Command` sorts its environment by name).
        let mut env: Vec<&(String, String)> = run.env.iter().collect();
        env.sort_by(|a, b| a.0.cmp(&b.0));
        fields.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
        if fields.iter().any(|f| f.contains('\0')) {
            return None;
        }
        Some(fields.join("\0").into_bytes())
    }

    /// Hands the run over: the interpreter becomes the run's process. On failure (it died, or
    /// its user cannot enter `cwd`) it is discarded and the caller starts the run fresh.
    pub async fn hand_over(mut self, message: &[u8]) -> Option<Started> {
        if !matches!(
            self.started.exit.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty)
        ) {
            self.discard();
            return None;
        }
        let sent = async {
            self.control.write_all(message).await?;
            self.control.shutdown().await?;
            let mut reply = [0u8; 1];
            let n = self.control.read(&mut reply).await?;
            Ok::<_, std::io::Error>((n, reply[0]))
        };
        match tokio::time::timeout(HANDOVER_TIMEOUT, sent).await {
            Ok(Ok((1, b'K'))) => Some(self.started),
            other => {
                tracing::debug!(?other, "pre-started interpreter refused the run");
                self.discard();
                None
            }
        }
    }

    /// Kills it and removes its leaf once it is gone.
    pub fn discard(self) {
        let Started {
            pid, exit, leaf, ..
        } = self.started;
        let _ = execbox_jail::process::signal_group(pid, libc::SIGKILL);
        if let Some(leaf) = &leaf {
            let _ = leaf.kill_all();
        }
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), exit).await;
            if let Some(leaf) = leaf {
                let _ = tokio::task::spawn_blocking(move || leaf.remove()).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_up_variables_are_recognised() {
        for v in ["PYTHONPATH", "PATH", "HOME", "LC_ALL", "LANG", "LD_PRELOAD"] {
            assert!(read_at_startup(v), "{v}");
        }
        for v in ["API_KEY", "USER", "TERM", "MY_PATH"] {
            assert!(!read_at_startup(v), "{v}");
        }
    }

    /// `python -c harness arg` with the bootstrap's text on its stdin, in an environment of
    /// `PATH` alone.
    fn harness_run(python: &str, harness: &str, arg: &str) -> std::process::Output {
        use std::io::Write;
        let mut child = std::process::Command::new(python)
            .args(["-c", harness, arg])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(PYTHON_BOOTSTRAP.as_bytes())
            .expect("write the bootstrap");
        drop(stdin);
        child.wait_with_output().expect("python3 ends")
    }

    /// The whole bootstrap, on the host's interpreter, handed a run as the agent hands it:
    /// quiet programs end by the flush and `os._exit(0)` (seen here by wrapping `os._exit`),
    /// others through finalization; both print what they should. An interpreter whose own
    /// start-up loads threads or exit handlers (site hooks) never ends quietly.
    #[test]
    fn quiet_programs_end_after_the_flush_and_others_through_finalization() {
        let python = ["/usr/bin/python3", "python3"]
            .into_iter()
            .find(|p| !p.starts_with('/') || Path::new(p).exists())
            .unwrap_or("python3");
        let harness = r#"
import os, socket, sys, atexit
plain = "threading" not in sys.modules and atexit._ncallbacks() == 0
os.write(2, b"PLAIN %d\n" % plain)
source, code = sys.stdin.read(), sys.argv[1]
os.open("/dev/null", os.O_RDONLY)  # fd 3, until the control socket replaces it
ours, theirs = socket.socketpair()
os.dup2(theirs.fileno(), 3)
env = ["%s=%s" % kv for kv in sorted(os.environ.items())]
ours.sendall("\0".join(["c", "1", os.getcwd(), code, "1", "-c", "3", "python3", "-c", code] + env).encode())
ours.shutdown(socket.SHUT_WR)
real_exit = os._exit
def quiet_exit(status):
    os.write(2, b"QUIET\n")
    real_exit(status)
os._exit = quiet_exit
exec(source)
"#;
        let cases: &[(&str, &str, bool)] = &[
            ("print('hello', end='')", "hello", true),
            ("import json\nprint(json.dumps([1, 2]))", "[1, 2]\n", true),
            (
                "class A:\n    def __del__(self):\n        print('finalized')\na = A()\nprint('end')",
                "end\nfinalized\n",
                false,
            ),
            ("import atexit\natexit.register(print, 'at exit')", "at exit\n", false),
        ];
        for (code, stdout, quiet) in cases {
            let out = harness_run(python, harness, code);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{code}: {out:?}");
            assert_eq!(String::from_utf8_lossy(&out.stdout), *stdout, "{code}");
            let plain = stderr.contains("PLAIN 1");
            assert_eq!(
                stderr.contains("QUIET"),
                *quiet && plain,
                "{code} ({python}, plain start-up: {plain}): {stderr}"
            );
        }
    }

    /// The bootstrap's static test of a program for a quiet end, run by the host's `python3`
    /// on programs whose end it must call quiet (nothing for finalization to do but flush) or
    /// not (a finalizer, a file, a thread, an exit handler, a generator, reflection).
    #[test]
    fn the_quiet_end_is_for_programs_that_leave_finalization_nothing() {
        let cases: &[(&str, bool)] = &[
            ("print('hello')", true),
            ("import math, json, random\nprint(math.pi, json.dumps([1]), random.random())", true),
            ("if __name__ == '__main__':\n    print(sum(i * i for i in range(10)))", true),
            ("class P:\n    def __init__(self, x):\n        self.x = x\n    def __repr__(self):\n        return 'P'\nprint(P(1))", true),
            ("class Q(list):\n    def __init__(self):\n        super().__init__()\nprint(Q())", true),
            ("from dataclasses import dataclass\n@dataclass\nclass P:\n    x: int = 0\nprint(P())", true),
            ("class A:\n    def __del__(self):\n        print('bye')\na = A()", false),
            ("f = open('/tmp/x', 'w')\nf.write('data')", false),
            ("import os\nprint(os.getpid())", false),
            ("import sys\nsys.stdout.write('x')", false),
            ("import atexit\natexit.register(print, 'x')", false),
            ("import threading\nthreading.Thread(target=print).start()", false),
            ("def g():\n    try:\n        yield 1\n    finally:\n        print('fin')\nit = g()\nnext(it)", false),
            ("async def f():\n    pass", false),
            ("print(().__class__.__base__.__subclasses__())", false),
            ("X = type('X', (), {'__del__': lambda s: print('bye')})\nx = X()", false),
            ("getattr(print, 'x', None)", false),
        ];
        let harness = r#"
import json, sys
source = sys.stdin.read().rsplit("_execbox_run()", 1)[0]
ns = {}
exec(source, ns)
for code in json.loads(sys.argv[1]):
    print(int(ns["_quiet_at_exit"](compile(code, "<string>", "exec", dont_inherit=True))))
"#;
        let codes: Vec<&str> = cases.iter().map(|(c, _)| *c).collect();
        let out = harness_run(
            "python3",
            harness,
            &serde_json::to_string(&codes).expect("json"),
        );
        assert!(out.status.success(), "{out:?}");
        let verdicts: Vec<bool> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l == "1")
            .collect();
        assert_eq!(verdicts.len(), cases.len(), "{out:?}");
        for ((code, quiet), got) in cases.iter().zip(verdicts) {
            assert_eq!(got, *quiet, "{code}");
        }
    }
}
