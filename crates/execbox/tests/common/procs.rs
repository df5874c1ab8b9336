//! Running helper programs from tests (SDK suites, package installs): a deadline, captured
//! output, a lock shared by parallel tests.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// An exclusive `flock` on a file, released on drop (the fd closes).
pub struct FileLock(#[allow(dead_code)] nix::fcntl::Flock<File>);

impl FileLock {
    pub fn acquire(path: &Path) -> FileLock {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open lock file {}: {e}", path.display()));
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .unwrap_or_else(|(_, e)| panic!("flock {}: {e}", path.display()));
        FileLock(lock)
    }
}

/// Runs a command to completion within `deadline`, capturing stdout and stderr.
pub fn run_with_deadline(mut cmd: Command, what: &str, deadline: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: could not start {cmd:?}: {e}"));
    let out_reader = drain(child.stdout.take().expect("stdout pipe"));
    let err_reader = drain(child.stderr.take().expect("stderr pipe"));
    let status = wait_with_deadline(&mut child, deadline)
        .unwrap_or_else(|| panic!("{what}: still running after {deadline:?}; killed"));
    Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

pub fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

pub fn wait_with_deadline(
    child: &mut Child,
    deadline: Duration,
) -> Option<std::process::ExitStatus> {
    let until = Instant::now() + deadline;
    loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            return Some(status);
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn describe(output: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Upper bound for making a virtualenv, installing packages or building a template.
pub const INSTALL_DEADLINE: Duration = Duration::from_secs(10 * 60);

/// The python of the virtualenv `target/<name>`, made (and `requirements` installed from the
/// package index) when missing or made from other requirements; one builder at a time across
/// test binaries. `suite` names the tests that need it in the failure message: they fail,
/// never skip, without Python or the package index.
pub fn python_venv(name: &str, requirements: &Path, suite: &str) -> PathBuf {
    let target = repo_root().join("target");
    std::fs::create_dir_all(&target).expect("create target/");
    let venv = target.join(name);
    let python = venv.join("bin/python");
    let wanted = std::fs::read_to_string(requirements)
        .unwrap_or_else(|e| panic!("read {}: {e}", requirements.display()));
    let stamp = venv.join(".execbox-requirements");
    let _lock = FileLock::acquire(&target.join(format!("{name}.lock")));
    if python.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&wanted) {
        return python;
    }
    let _ = std::fs::remove_dir_all(&venv);
    let mut mk = Command::new("python3");
    mk.args(["-m", "venv"]).arg(&venv);
    let out = run_with_deadline(mk, "python3 -m venv", INSTALL_DEADLINE);
    assert!(
        out.status.success(),
        "could not create the Python virtualenv for {suite} at {} \
         (python3 with the venv module is required):\n{}",
        venv.display(),
        describe(&out)
    );
    let mut pip = Command::new(&python);
    pip.args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "--timeout",
        "60",
        "-r",
    ])
    .arg(requirements)
    .env("PIP_NO_INPUT", "1");
    let out = run_with_deadline(pip, "pip install", INSTALL_DEADLINE);
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&venv);
        panic!(
            "could not install the requirements of {suite} from the package index ({}); \
             they need it (or PIP_INDEX_URL) and are not skipped:\n{}",
            requirements.display(),
            describe(&out)
        );
    }
    std::fs::write(&stamp, &wanted).expect("write requirements stamp");
    python
}

/// `python -m pytest -q` on `target` from `dir`, writing no caches.
pub fn pytest_command(python: &Path, dir: &Path, target: &str) -> Command {
    let mut cmd = Command::new(python);
    cmd.args([
        "-m",
        "pytest",
        "-q",
        "-rfEs",
        "-p",
        "no:cacheprovider",
        target,
    ])
    .current_dir(dir)
    .env("PYTHONDONTWRITEBYTECODE", "1");
    cmd
}

/// Builds the code-interpreter template into the test servers' shared directory before a suite
/// that needs it (the SDKs give a create 60 s; a cold build takes about a minute). Built
/// already, this returns at once.
pub fn build_code_interpreter_template() {
    let mut build = Command::new(env!("CARGO_BIN_EXE_execbox"));
    build.args([
        "template",
        "build",
        "code-interpreter",
        "--templates-dir",
        super::TEST_TEMPLATES_DIR,
    ]);
    let out = run_with_deadline(build, "execbox template build", INSTALL_DEADLINE);
    assert!(
        out.status.success(),
        "could not build the code-interpreter template (numpy, pandas, matplotlib… from the \
         package index the host's pip is configured for):\n{}",
        describe(&out)
    );
}
