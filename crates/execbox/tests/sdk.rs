//! Drives a real `execbox serve` through the official `opensandbox` Python SDK from PyPI.
//!
//! The test suite itself lives in `tests/sdk/` at the repository root (pytest). This test
//! makes sure a virtualenv with `tests/sdk/requirements.txt` exists at `target/sdk-venv`
//! (creating it with `python3 -m venv` + `pip install` when missing or out of date), starts
//! a server on loopback and runs `python -m pytest tests/sdk` against it, once the
//! code-interpreter template its sandboxes use is built. The test fails, never skips, when
//! Python or PyPI is unavailable.

mod common;

use common::procs::{describe, repo_root, run_with_deadline, FileLock};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Upper bound for the whole pytest run; a hang must fail the test, not stall CI.
const PYTEST_DEADLINE: Duration = Duration::from_secs(20 * 60);
/// Upper bound for creating the virtualenv and installing the requirements.
const INSTALL_DEADLINE: Duration = Duration::from_secs(10 * 60);

/// Returns the venv's python, creating the venv and installing the requirements when the
/// venv is missing or was built from a different requirements file.
fn ensure_venv(root: &Path) -> PathBuf {
    let target = root.join("target");
    std::fs::create_dir_all(&target).expect("create target/");
    let venv = target.join("sdk-venv");
    let python = venv.join("bin/python");
    let requirements = root.join("tests/sdk/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements)
        .unwrap_or_else(|e| panic!("read {}: {e}", requirements.display()));
    let stamp = venv.join(".execbox-requirements");

    // Concurrent test binaries (or concurrent `cargo test` runs) must not build the venv
    // at the same time.
    let _lock = FileLock::acquire(&target.join("sdk-venv.lock"));
    if python.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&wanted) {
        return python;
    }

    let _ = std::fs::remove_dir_all(&venv);
    let mut mk = Command::new("python3");
    mk.args(["-m", "venv"]).arg(&venv);
    let out = run_with_deadline(mk, "python3 -m venv", INSTALL_DEADLINE);
    assert!(
        out.status.success(),
        "could not create the Python virtualenv for the SDK tests at {} \
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
    .arg(&requirements)
    .env("PIP_NO_INPUT", "1");
    let out = run_with_deadline(pip, "pip install", INSTALL_DEADLINE);
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&venv);
        panic!(
            "could not install the OpenSandbox SDK test requirements from PyPI \
             ({}). The SDK compatibility tests need network access to PyPI (or a \
             pip index configured via PIP_INDEX_URL); they are not skipped.\n{}",
            requirements.display(),
            describe(&out)
        );
    }
    std::fs::write(&stamp, &wanted).expect("write requirements stamp");
    python
}

/// `python -m pytest -q` on `target` (relative to the repository root), writing no caches.
fn pytest(python: &Path, root: &Path, target: &str) -> Command {
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
    .current_dir(root)
    .env("PYTHONDONTWRITEBYTECODE", "1");
    cmd
}

/// Builds the code-interpreter template (the image `opensandbox/code-interpreter` the suite's
/// sandboxes use) into the test servers' shared cache before the suite runs: the SDK gives a
/// create 60 s, and a cold build takes about a minute. Built already, this returns at once.
fn ensure_code_interpreter_template() {
    let mut build = Command::new(env!("CARGO_BIN_EXE_execbox"));
    build.args([
        "template",
        "build",
        "code-interpreter",
        "--templates-dir",
        common::TEST_TEMPLATES_DIR,
    ]);
    let out = run_with_deadline(build, "execbox template build", INSTALL_DEADLINE);
    assert!(
        out.status.success(),
        "could not build the code-interpreter template (numpy, pandas, matplotlib… from the \
         package index the host's pip is configured for); the SDK suite needs it:\n{}",
        describe(&out)
    );
}

#[test]
fn opensandbox_python_sdk_suite() {
    let root = repo_root();
    let python = ensure_venv(&root);
    ensure_code_interpreter_template();

    let server = common::TestServer::start();

    let mut pytest = pytest(&python, &root, "tests/sdk");
    pytest
        .env("OPEN_SANDBOX_DOMAIN", format!("127.0.0.1:{}", server.port))
        .env_remove("OPEN_SANDBOX_API_KEY")
        .env("PYTHONUNBUFFERED", "1")
        // keep the user's proxy settings away from loopback traffic
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost");
    let out = run_with_deadline(pytest, "pytest tests/sdk", PYTEST_DEADLINE);

    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    drop(server);
    assert!(
        out.status.success(),
        "the OpenSandbox Python SDK suite failed ({}); see the pytest output above",
        out.status
    );
}

/// The kernels' own protocol tests (`crates/execbox-agent/kernels/test_*.py`): each kernel
/// script driven over its fd-3 channel directly, with the host runtimes the sandboxes use.
#[test]
fn kernel_script_suites() {
    let root = repo_root();
    let python = ensure_venv(&root);
    let pytest = pytest(&python, &root, "crates/execbox-agent/kernels");
    let out = run_with_deadline(pytest, "pytest kernels", PYTEST_DEADLINE);
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "the kernel suites failed ({}); see the pytest output above",
        out.status
    );
}
