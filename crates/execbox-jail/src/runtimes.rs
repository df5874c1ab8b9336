//! Discovery of the language runtimes installed on the host.
//!
//! Interpreters are resolved to their real executables and install prefixes once, at server
//! start: `python3` on `PATH` is often a pyenv shim (a bash script costing ~100 ms a start), so
//! the sandbox links `python` straight to the real binary and binds only its prefix, never the
//! home directory it lives in.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::rootfs::Runtime;

/// Directories that are bound into every sandbox anyway: a runtime under one of them needs no
/// extra bind.
const SYSTEM_PREFIXES: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc"];

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn is_system(p: &Path) -> bool {
    SYSTEM_PREFIXES.iter().any(|d| p.starts_with(d))
}

/// The prefix to bind for an executable: none under the system directories, otherwise the
/// parent of its `bin` directory (or its own directory when it is not in a `bin`).
fn prefix_of(exe: &Path) -> Option<PathBuf> {
    if is_system(exe) {
        return None;
    }
    let dir = exe.parent()?;
    if dir.file_name().is_some_and(|n| n == "bin") {
        dir.parent().map(Path::to_path_buf)
    } else {
        Some(dir.to_path_buf())
    }
}

/// Asks a Python interpreter (possibly a shim) for its real executable and base prefix.
fn resolve_python(candidate: &Path) -> Option<(PathBuf, PathBuf)> {
    let out = Command::new(candidate)
        .args([
            "-c",
            "import os,sys;print(os.path.realpath(sys.executable));print(sys.base_prefix)",
        ])
        .env_remove("PYTHONPATH")
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let mut lines = text.lines();
    let exe = PathBuf::from(lines.next()?);
    let prefix = PathBuf::from(lines.next()?);
    exe.is_file().then_some((exe, prefix))
}

fn runtime(name: &str, exe: PathBuf, prefix: Option<PathBuf>) -> Runtime {
    Runtime {
        name: name.to_string(),
        executable: exe,
        prefix,
    }
}

/// Finds the runtimes of the host. `python` may name an interpreter explicitly (config);
/// otherwise `python3` on `PATH` is used.
pub fn discover(python: Option<&Path>) -> Vec<Runtime> {
    let mut found = Vec::new();
    let py_candidate = python
        .map(Path::to_path_buf)
        .or_else(|| find_in_path("python3"));
    if let Some((exe, prefix)) = py_candidate.as_deref().and_then(resolve_python) {
        let prefix = (!is_system(&prefix)).then_some(prefix);
        found.push(runtime("python", exe.clone(), prefix.clone()));
        found.push(runtime("python3", exe.clone(), prefix.clone()));
        let bin = exe.parent().map(Path::to_path_buf).unwrap_or_default();
        for pip in ["pip3", "pip"] {
            let p = bin.join(pip);
            if p.is_file() {
                found.push(runtime("pip", p.clone(), prefix.clone()));
                found.push(runtime("pip3", p, prefix.clone()));
                break;
            }
        }
    }
    for name in [
        "node", "bun", "deno", "java", "javac", "jshell", "go", "gofmt", "bash",
    ] {
        let Some(p) = find_in_path(name) else {
            continue;
        };
        let Ok(real) = std::fs::canonicalize(&p) else {
            continue;
        };
        let prefix = prefix_of(&real);
        found.push(runtime(name, real, prefix));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_executables_need_no_prefix() {
        assert_eq!(prefix_of(Path::new("/usr/bin/node")), None);
        assert_eq!(
            prefix_of(Path::new("/opt/node/bin/node")),
            Some(PathBuf::from("/opt/node"))
        );
    }

    #[test]
    fn finds_bash_and_a_real_python() {
        let rts = discover(None);
        let bash = rts.iter().find(|r| r.name == "bash").expect("bash");
        assert!(bash.executable.is_absolute());
        if let Some(py) = rts.iter().find(|r| r.name == "python") {
            // Never a shim script: the real ELF binary.
            let head = std::fs::read(&py.executable).expect("read python");
            assert_eq!(&head[..4], b"\x7fELF");
        }
    }
}
