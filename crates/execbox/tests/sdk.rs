//! Drives a real `execbox serve` through the official `opensandbox` Python SDK from PyPI.
//!
//! The test suite itself lives in `tests/sdk/` at the repository root (pytest). This test
//! makes sure a virtualenv with `tests/sdk/requirements.txt` exists at `target/sdk-venv`
//! (creating it with `python3 -m venv` + `pip install` when missing or out of date), starts
//! a server on loopback and runs `python -m pytest tests/sdk` against it, once the
//! code-interpreter template its sandboxes use is built. The test fails, never skips, when
//! Python or PyPI is unavailable.

mod common;

use common::procs::{
    build_code_interpreter_template, pytest_command, python_venv, repo_root, run_with_deadline,
};

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Upper bound for the whole pytest run; a hang must fail the test, not stall CI.
const PYTEST_DEADLINE: Duration = Duration::from_secs(20 * 60);

/// The virtualenv with the OpenSandbox SDK test requirements from PyPI.
fn sdk_venv(root: &Path) -> PathBuf {
    python_venv(
        "sdk-venv",
        &root.join("tests/sdk/requirements.txt"),
        "the OpenSandbox SDK compatibility tests",
    )
}

#[test]
fn opensandbox_python_sdk_suite() {
    let root = repo_root();
    let python = sdk_venv(&root);
    build_code_interpreter_template();

    let server = common::TestServer::start();

    let mut pytest = pytest_command(&python, &root, "tests/sdk");
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
    let python = sdk_venv(&root);
    let pytest = pytest_command(&python, &root, "crates/execbox-agent/kernels");
    let out = run_with_deadline(pytest, "pytest kernels", PYTEST_DEADLINE);
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "the kernel suites failed ({}); see the pytest output above",
        out.status
    );
}
