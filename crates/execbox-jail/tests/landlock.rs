//! Real-kernel tests of the Landlock fence: a `/bin/sh` child restricted in
//! `pre_exec` may write only below its read-write directory.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use execbox_jail::landlock_fence::{self, FenceSpec, LandlockStatus};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "execbox-landlock-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn landlock_available() -> bool {
    match landlock_fence::landlock_abi_status() {
        LandlockStatus::Available { .. } => true,
        LandlockStatus::Unavailable { reason } => {
            eprintln!("skipping: Landlock unavailable: {reason}");
            false
        }
    }
}

fn sh_fenced(spec: &FenceSpec, script: &str) -> Output {
    let fence = landlock_fence::prepare(spec).unwrap();
    assert!(fence.enforced_abi().is_some());
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(script);
    // SAFETY: restrict_raw only calls prctl and landlock_restrict_self and does
    // not allocate; `fence` was prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            fence
                .restrict_raw()
                .map_err(std::io::Error::from_raw_os_error)
        });
    }
    cmd.output().unwrap()
}

fn system_ro() -> Vec<PathBuf> {
    ["/usr", "/lib", "/lib64", "/bin", "/etc"]
        .iter()
        .map(PathBuf::from)
        .collect()
}

#[test]
fn status_reports_abi() {
    match landlock_fence::landlock_abi_status() {
        LandlockStatus::Available { abi } => assert!(abi >= 1),
        LandlockStatus::Unavailable { reason } => assert!(!reason.is_empty()),
    }
}

#[test]
fn fence_allows_rw_dir_and_denies_the_rest() {
    if !landlock_available() {
        return;
    }
    let rw = TempDir::new("rw");
    let other = TempDir::new("other");
    let secret = TempDir::new("secret");
    std::fs::write(secret.path().join("secret.txt"), "top secret\n").unwrap();

    let spec = FenceSpec {
        read_only: system_ro(),
        read_write: vec![rw.path().to_path_buf(), PathBuf::from("/does/not/exist")],
    };
    let fence = landlock_fence::prepare(&spec).unwrap();
    assert_eq!(fence.skipped_paths(), [PathBuf::from("/does/not/exist")]);
    assert_eq!(fence.enforced_abi(), Some(5), "kernel has ABI >= 5");

    // Writing (and reading back) below the read-write dir works.
    let out = sh_fenced(
        &spec,
        &format!(
            "echo hello > '{0}/f' && mkdir '{0}/d' && cat '{0}/f' && /bin/ls /usr > '{0}/d/ls' && cat '{0}/f'",
            rw.path().display()
        ),
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\nhello\n");
    assert_eq!(
        std::fs::read_to_string(rw.path().join("f")).unwrap(),
        "hello\n"
    );

    // Writing to another directory is denied.
    let out = sh_fenced(&spec, &format!("echo no > '{}/f'", other.path().display()));
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );
    assert!(!other.path().join("f").exists());

    // Writing into a read-only directory is denied too.
    let out = sh_fenced(&spec, "echo no > /etc/execbox-landlock-test");
    assert!(!out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    assert!(!Path::new("/etc/execbox-landlock-test").exists());

    // Reading a file in an unlisted directory is denied.
    let out = sh_fenced(
        &spec,
        &format!("cat '{}/secret.txt'", secret.path().display()),
    );
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );

    // Read-only paths are readable and executable.
    let out = sh_fenced(&spec, "/bin/cat /etc/passwd | /usr/bin/head -n1");
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("root:"),
        "{out:?}"
    );
}

#[test]
fn single_file_rule_works() {
    if !landlock_available() {
        return;
    }
    let dir = TempDir::new("file");
    let file = dir.path().join("allowed.txt");
    std::fs::write(&file, "x").unwrap();
    std::fs::write(dir.path().join("denied.txt"), "y").unwrap();
    let spec = FenceSpec {
        read_only: system_ro(),
        read_write: vec![file.clone(), PathBuf::from("/dev/null")],
    };
    let out = sh_fenced(
        &spec,
        &format!(
            "echo more >> '{0}/allowed.txt' && cat '{0}/allowed.txt' 2>/dev/null; cat '{0}/denied.txt'",
            dir.path().display()
        ),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "xmore\n", "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
}
