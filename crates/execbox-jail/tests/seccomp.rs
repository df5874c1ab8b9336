//! Real-kernel tests of the seccomp policy: a Python child installs the filter in
//! `pre_exec`, makes raw syscalls through ctypes and prints the resulting errno.
#![cfg(target_arch = "x86_64")]

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Output, Stdio};

use execbox_jail::seccomp;

const PY: &str = "/usr/bin/python3";

const EPERM: i64 = 1;
const ENOSYS: i64 = 38;
const EAFNOSUPPORT: i64 = 97;

/// Common prelude: `sc(nr, *args)` performs a raw syscall and returns
/// `ret` if it succeeded or `-errno` if it failed.
const PRELUDE: &str = r#"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def sc(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_ulong(a & 0xffffffffffffffff) if isinstance(a, int) else a for a in args])
    return -ctypes.get_errno() if r == -1 else r
"#;

enum Filter {
    None,
    Raw,
    Install,
    InstallAllThreads,
}

fn run_python(filter: Filter, body: &str) -> Output {
    run_python_with(seccomp::sandbox_program().unwrap(), filter, body)
}

fn run_python_with(program: seccompiler::BpfProgram, filter: Filter, body: &str) -> Output {
    let script = format!("{PRELUDE}\n{body}");
    let mut cmd = Command::new(PY);
    cmd.arg("-c").arg(script).stdin(Stdio::null());
    let raw = seccomp::to_raw(&program);
    match filter {
        Filter::None => {}
        // SAFETY: install_raw only calls prctl and seccomp (async-signal-safe) and
        // does not allocate; `raw` was built before fork.
        Filter::Raw => unsafe {
            cmd.pre_exec(move || {
                seccomp::install_raw(&raw).map_err(std::io::Error::from_raw_os_error)
            });
        },
        // SAFETY: seccompiler's apply_filter only calls prctl and seccomp and builds
        // io::Errors from errno, which does not allocate.
        Filter::Install => unsafe {
            cmd.pre_exec(move || {
                seccomp::install(&program).map_err(|_| std::io::Error::other("install failed"))
            });
        },
        // SAFETY: as above; the child of fork has a single thread, so TSYNC trivially works.
        Filter::InstallAllThreads => unsafe {
            cmd.pre_exec(move || {
                seccomp::install_all_threads(&program)
                    .map_err(|_| std::io::Error::other("install failed"))
            });
        },
    }
    cmd.output().unwrap()
}

/// Runs `expr` (a Python expression) under the filter, returns its printed value.
fn eval(filter: Filter, expr: &str) -> i64 {
    let out = run_python(filter, &format!("print({expr})"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed: {:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.trim().parse().unwrap()
}

fn filtered(expr: &str) -> i64 {
    eval(Filter::Raw, expr)
}

#[test]
fn ptrace_denied() {
    // PTRACE_TRACEME would succeed without the filter.
    assert_eq!(eval(Filter::None, "sc(101, 0, 0, 0, 0)"), 0);
    assert_eq!(filtered("sc(101, 0, 0, 0, 0)"), -EPERM);
}

#[test]
fn mount_denied() {
    // Harmless arguments: without the filter this fails with ENOENT.
    let expr = r#"sc(165, b"none", b"/nonexistent-execbox-test", b"tmpfs", 0, None)"#;
    assert_eq!(eval(Filter::None, expr), -2);
    assert_eq!(filtered(expr), -EPERM);
    assert_eq!(filtered("sc(166, b'/nonexistent-execbox-test', 0)"), -EPERM); // umount2
}

#[test]
fn unshare_newuser_denied() {
    assert_eq!(filtered("sc(272, 0x10000000)"), -EPERM);
}

#[test]
fn keyctl_bpf_io_uring_denied() {
    assert_eq!(filtered("sc(250, 0, -3, 0)"), -EPERM); // keyctl(GET_KEYRING_ID, USER)
    assert_eq!(filtered("sc(321, 0, None, 0)"), -EPERM); // bpf
    assert_eq!(filtered("sc(425, 1, None)"), -EPERM); // io_uring_setup
    assert_eq!(filtered("sc(310, 1, None, 1, None, 1, 0)"), -EPERM); // process_vm_readv
}

#[test]
fn clone_with_namespace_flags_denied() {
    // CLONE_THREAD without CLONE_SIGHAND makes the kernel reject the call with EINVAL,
    // so no child is ever created, filtered or not; EPERM can only come from seccomp.
    const CLONE_THREAD: u64 = 0x10000;
    let flags: [(&str, u64); 8] = [
        ("NEWUSER", 0x1000_0000),
        ("NEWNS", 0x0002_0000),
        ("NEWPID", 0x2000_0000),
        ("NEWNET", 0x4000_0000),
        ("NEWIPC", 0x0800_0000),
        ("NEWUTS", 0x0400_0000),
        ("NEWCGROUP", 0x0200_0000),
        ("NEWTIME", 0x0000_0080),
    ];
    let list: Vec<String> = flags
        .iter()
        .map(|(_, f)| format!("sc(56, {}, 0, 0, 0, 0)", f | CLONE_THREAD))
        .collect();
    let expr = format!("','.join(str(x) for x in [{}])", list.join(", "));
    let run = |filter| {
        let out = run_python(filter, &format!("print({expr})"));
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(run(Filter::None), ["-22"; 8].join(","));
    assert_eq!(run(Filter::Raw), ["-1"; 8].join(","), "{flags:?}");
    // Extra bits (including high ones) do not hide a namespace flag.
    assert_eq!(
        filtered(&format!(
            "sc(56, {}, 0, 0, 0, 0)",
            (1u64 << 40) | 0x2_0000 | CLONE_THREAD
        )),
        -EPERM
    );
}

#[test]
fn clone3_is_enosys() {
    // Without the filter, size 0 is EINVAL.
    assert_eq!(eval(Filter::None, "sc(435, None, 0)"), -22);
    assert_eq!(filtered("sc(435, None, 0)"), -ENOSYS);
}

#[test]
fn ioctl_tiocsti_denied_even_with_high_bits() {
    let c = "ctypes.byref(ctypes.c_char(b'x'))";
    // stdin is /dev/null: ENOTTY without the filter.
    assert_eq!(eval(Filter::None, &format!("sc(16, 0, 0x5412, {c})")), -25);
    assert_eq!(filtered(&format!("sc(16, 0, 0x5412, {c})")), -EPERM);
    assert_eq!(
        filtered(&format!("sc(16, 0, 0x5412 | (1 << 32), {c})")),
        -EPERM
    );
    assert_eq!(
        filtered(&format!("sc(16, 0, 0x541C | (7 << 40), {c})")),
        -EPERM
    );
    // Other ioctls pass through (TCGETS on /dev/null: ENOTTY).
    assert_eq!(filtered("sc(16, 0, 0x5401, None)"), -25);
}

/// Why the low-32-bit rule exists: an exact 64-bit comparison alone is bypassed
/// by setting high bits, which the kernel then discards.
#[test]
fn exact_qword_ioctl_rule_alone_is_bypassable() {
    use seccomp::{ArgCond, ArgOp, DenyAction, DenyRule, When};
    const ONLY_EXACT: &[DenyRule] = &[DenyRule {
        name: "ioctl",
        nr: libc::SYS_ioctl,
        when: When::AnyOf(&[ArgCond {
            arg: 1,
            qword: true,
            op: ArgOp::Eq,
            value: 0x5412,
        }]),
        action: DenyAction::Errno(libc::EPERM),
        reason: "test",
    }];
    let program = seccomp::compile_table(ONLY_EXACT).unwrap();
    let expr = "sc(16, 0, 0x5412 | (1 << 32), ctypes.byref(ctypes.c_char(b'x')))";
    let out = run_python_with(program, Filter::Raw, &format!("print({expr})"));
    // Reaches the kernel (ENOTTY on /dev/null) instead of being denied.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "-25",
        "{out:?}"
    );
}

#[test]
fn vsock_socket_is_eafnosupport() {
    assert_eq!(filtered("sc(41, 40, 1, 0)"), -EAFNOSUPPORT);
    // `family` is an int: high bits are ignored by the kernel and by the filter.
    assert_eq!(filtered("sc(41, 40 | (1 << 32), 1, 0)"), -EAFNOSUPPORT);
    // Other families still work.
    assert!(filtered("sc(41, 1, 1, 0)") >= 0); // AF_UNIX
}

#[test]
fn personality_query_allowed_others_denied() {
    assert!(filtered("sc(135, 0xffffffff)") >= 0);
    assert_eq!(filtered("sc(135, 0)"), 0);
    assert_eq!(filtered("sc(135, 0x0040000)"), -EPERM); // ADDR_NO_RANDOMIZE
}

#[test]
fn x32_syscalls_denied() {
    // x32 getpid; this kernel has no x32 ABI, so ENOSYS without the filter.
    assert_eq!(eval(Filter::None, "sc(0x40000000 | 39)"), -ENOSYS);
    assert_eq!(filtered("sc(0x40000000 | 39)"), -EPERM);
}

#[test]
fn i386_int80_kills_process() {
    // mov eax, 20 (i386 getpid); int 0x80; ret
    let body = r#"
import mmap
m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
m.write(bytes([0xb8, 20, 0, 0, 0, 0xcd, 0x80, 0xc3]))
f = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(m)))
print(f() == os.getpid(), flush=True)
"#;
    let out = run_python(Filter::None, body);
    if String::from_utf8_lossy(&out.stdout).trim() != "True" {
        eprintln!("skipping: i386 emulation unavailable ({out:?})");
        return;
    }
    let out = run_python(Filter::Raw, body);
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{out:?}");
    assert!(out.stdout.is_empty());
}

#[test]
fn ordinary_programs_still_work() {
    let body = r#"
import subprocess, threading
print("hello")
pid = os.fork()
if pid == 0:
    os._exit(7)
_, st = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(st) == 7, st
assert subprocess.run(["/bin/true"]).returncode == 0
assert subprocess.run(["/bin/sh", "-c", "exit 3"]).returncode == 3
out = []
ts = [threading.Thread(target=lambda i=i: out.append(i)) for i in range(8)]
[t.start() for t in ts]
[t.join() for t in ts]
assert sorted(out) == list(range(8)), out
print("ok")
"#;
    for filter in [Filter::Raw, Filter::Install, Filter::InstallAllThreads] {
        let out = run_python(filter, body);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\nok\n");
    }
}

#[test]
fn seccompiler_install_paths_deny_too() {
    assert_eq!(eval(Filter::Install, "sc(101, 0, 0, 0, 0)"), -EPERM);
    assert_eq!(eval(Filter::InstallAllThreads, "sc(435, None, 0)"), -ENOSYS);
}
