//! The sandbox's seccomp policy.
//!
//! # Shape of the policy
//!
//! The whole policy is the single reviewable table [`DENY_TABLE`]: one row per
//! (syscall, condition) with the action taken and a one-line reason. The default
//! action for everything not listed is **allow**; the filter is a deny list that
//! sits *on top of* the other layers (namespaces, dropped capabilities, cgroups,
//! Landlock), closing kernel attack surface that those layers do not cover.
//!
//! * Listed syscalls fail with `EPERM`, except
//!   * `clone3`, which fails with `ENOSYS`: its flags live in a user-memory
//!     struct that seccomp cannot inspect, and `ENOSYS` makes glibc/musl fall back
//!     to `clone(2)`, whose flags *are* a register and are checked below;
//!   * `socket(AF_VSOCK, ..)`, which fails with `EAFNOSUPPORT`, exactly as on a
//!     kernel without vsock, so programs take their "no such family" path.
//! * `clone` is denied only when its flags request a new namespace, `ioctl` only
//!   for `TIOCSTI`/`TIOCLINUX`, `personality` only for values other than
//!   `PER_LINUX` (0) and the query value `0xffffffff`.
//!
//! # Non-native ABIs
//!
//! A seccomp filter sees the raw syscall number of whichever ABI the task used,
//! so a deny list written for x86_64 numbers is meaningless for an `int 0x80`
//! (i386) or x32 syscall. Two mechanisms close this:
//!
//! * **Foreign architectures** (i386 on x86_64, arm32 compat on aarch64): every
//!   program produced by `seccompiler` starts by loading `seccomp_data.arch` and
//!   comparing it with the target's `AUDIT_ARCH_*`; on mismatch it returns
//!   `SECCOMP_RET_KILL_PROCESS` (this action is fixed by `seccompiler`, and it is
//!   what we want: no legitimate sandbox program uses the compat ABI). Our own
//!   hand-written prologue (see [`sandbox_program`]) performs the same check first,
//!   also with `KillProcess`.
//! * **x32** (x86_64 only): x32 syscalls report `AUDIT_ARCH_X86_64` but have
//!   `__X32_SYSCALL_BIT` (`0x4000_0000`) set in the number. `seccompiler` can only
//!   compare numbers for equality, so the prologue loads `seccomp_data.nr` and
//!   returns `EPERM` for every number `>= 0x4000_0000` (this also covers
//!   `syscall(-1)`, which then reports `EPERM` instead of `ENOSYS`).
//!
//! # Several errnos in one program
//!
//! A `seccompiler::SeccompFilter` has one "match" action for all its rules. We
//! compile one filter per distinct action (`EPERM`, `ENOSYS`, `EAFNOSUPPORT`),
//! each with mismatch action `Allow`, and link them into one program: in every
//! sub-program but the last, each `RET ALLOW` is rewritten into a forward jump to
//! the first instruction after that sub-program (same length, so no other jump
//! offset changes). Each sub-program reloads the syscall number itself. The result
//! is "first group that matches decides, otherwise allow".
//!
//! # Architectures
//!
//! Syscall numbers come from `libc::SYS_*` for the compile target, and the
//! `seccompiler` target architecture is chosen with `cfg(target_arch)`. x86_64 and
//! aarch64 are supported (rows for syscalls that do not exist on aarch64, such as
//! `iopl`, are `cfg`-gated to x86_64); only x86_64 is exercised by the tests.
//! Other architectures fail to compile on purpose.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("execbox-jail's seccomp policy supports only x86_64 and aarch64");

/// Errors from building or installing the seccomp program.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// `seccompiler` rejected a rule or filter built from [`DENY_TABLE`].
    #[error("compiling seccomp rule for `{syscall}`: {source}")]
    Compile {
        /// Name of the syscall whose row failed.
        syscall: &'static str,
        /// Underlying error.
        source: seccompiler::BackendError,
    },
    /// Compiling one action group into BPF failed.
    #[error("compiling seccomp filter: {0}")]
    Filter(#[source] seccompiler::BackendError),
    /// The linked program exceeds the kernel's `BPF_MAXINSNS` (4096).
    #[error("seccomp program has {0} instructions, more than the kernel limit of 4096")]
    TooLarge(usize),
    /// Installing the program failed (`prctl`/`seccomp` error, or a TSYNC
    /// failure naming the offending thread).
    #[error("installing seccomp filter: {0}")]
    Install(#[from] seccompiler::Error),
}

/// What the filter does when a [`DenyRule`] matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyAction {
    /// Fail the syscall with this errno, without executing it.
    Errno(i32),
    /// Kill the whole process (`SECCOMP_RET_KILL_PROCESS`).
    KillProcess,
}

impl DenyAction {
    fn to_seccompiler(self) -> SeccompAction {
        match self {
            // Errnos are small positive constants; the kernel keeps the low 16 bits.
            DenyAction::Errno(e) => SeccompAction::Errno(e.unsigned_abs()),
            DenyAction::KillProcess => SeccompAction::KillProcess,
        }
    }

    /// The 32-bit `SECCOMP_RET_*` value, used as a grouping key.
    fn ret_value(self) -> u32 {
        u32::from(self.to_seccompiler())
    }
}

/// One comparison on a syscall argument (mirrors `seccompiler::SeccompCondition`,
/// but is `const`-constructible so it can live in [`DENY_TABLE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArgCond {
    /// Argument index, 0..=5.
    pub arg: u8,
    /// `true`: compare all 64 bits; `false`: only the low 32 bits (right for
    /// arguments the kernel declares as `int`/`unsigned int`).
    pub qword: bool,
    /// The comparison.
    pub op: ArgOp,
    /// Value compared against.
    pub value: u64,
}

/// Comparison operator of an [`ArgCond`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgOp {
    /// `arg == value`.
    Eq,
    /// `arg != value`.
    Ne,
    /// `arg & mask == value & mask`.
    MaskedEq(u64),
}

/// When a [`DenyRule`] applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    /// On every call.
    Always,
    /// When at least one of the conditions holds (one seccomp rule per condition).
    AnyOf(&'static [ArgCond]),
    /// When all the conditions hold (a single seccomp rule).
    AllOf(&'static [ArgCond]),
}

/// One row of the policy table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenyRule {
    /// Syscall name, for humans and error messages.
    pub name: &'static str,
    /// Syscall number on the compile target.
    pub nr: i64,
    /// Condition on the arguments.
    pub when: When,
    /// Action when the row matches.
    pub action: DenyAction,
    /// Why the syscall is denied.
    pub reason: &'static str,
}

const EPERM: DenyAction = DenyAction::Errno(libc::EPERM);

/// `__X32_SYSCALL_BIT`: x32 syscall numbers have this bit set.
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const fn rule(name: &'static str, nr: i64, reason: &'static str) -> DenyRule {
    DenyRule {
        name,
        nr,
        when: When::Always,
        action: EPERM,
        reason,
    }
}

/// `flags & bit == bit` on the full 64-bit argument.
const fn bit_set(arg: u8, bit: u64) -> ArgCond {
    ArgCond {
        arg,
        qword: true,
        op: ArgOp::MaskedEq(bit),
        value: bit,
    }
}

const fn eq(arg: u8, qword: bool, value: u64) -> ArgCond {
    ArgCond {
        arg,
        qword,
        op: ArgOp::Eq,
        value,
    }
}

const fn low32_eq(arg: u8, value: u64) -> ArgCond {
    ArgCond {
        arg,
        qword: true,
        op: ArgOp::MaskedEq(0xffff_ffff),
        value,
    }
}

const fn ne32(arg: u8, value: u64) -> ArgCond {
    ArgCond {
        arg,
        qword: false,
        op: ArgOp::Ne,
        value,
    }
}

const TIOCSTI: u64 = 0x5412;
const TIOCLINUX: u64 = 0x541C;
const AF_VSOCK: u64 = 40;

/// Namespace-creating `clone` flags; any one of them makes `clone` fail.
const CLONE_NS_CONDS: &[ArgCond] = &[
    bit_set(0, libc::CLONE_NEWUSER as u64),
    bit_set(0, libc::CLONE_NEWNS as u64),
    bit_set(0, libc::CLONE_NEWPID as u64),
    bit_set(0, libc::CLONE_NEWNET as u64),
    bit_set(0, libc::CLONE_NEWIPC as u64),
    bit_set(0, libc::CLONE_NEWUTS as u64),
    bit_set(0, libc::CLONE_NEWCGROUP as u64),
    bit_set(0, libc::CLONE_NEWTIME as u64),
];

/// The sandbox seccomp policy: everything not listed is allowed.
///
/// Argument checks only see registers, never memory the arguments point to.
#[rustfmt::skip]
pub const DENY_TABLE: &[DenyRule] = &[
    // --- introspection of / injection into other processes
    rule("ptrace", libc::SYS_ptrace, "debugging other processes; historic source of escapes"),
    rule("process_vm_readv", libc::SYS_process_vm_readv, "reads another process's memory"),
    rule("process_vm_writev", libc::SYS_process_vm_writev, "writes another process's memory"),
    rule("pidfd_getfd", libc::SYS_pidfd_getfd, "steals file descriptors from another process"),
    // --- large kernel attack surface
    rule("io_uring_setup", libc::SYS_io_uring_setup, "io_uring: large attack surface, bypasses seccomp for its ops"),
    rule("io_uring_enter", libc::SYS_io_uring_enter, "io_uring"),
    rule("io_uring_register", libc::SYS_io_uring_register, "io_uring"),
    rule("bpf", libc::SYS_bpf, "eBPF programs and maps: kernel attack surface"),
    rule("perf_event_open", libc::SYS_perf_event_open, "perf: kernel attack surface and side channels"),
    rule("userfaultfd", libc::SYS_userfaultfd, "used to widen kernel race windows in exploits"),
    rule("keyctl", libc::SYS_keyctl, "kernel keyrings are not namespaced"),
    rule("add_key", libc::SYS_add_key, "kernel keyrings are not namespaced"),
    rule("request_key", libc::SYS_request_key, "kernel keyrings are not namespaced"),
    rule("fanotify_init", libc::SYS_fanotify_init, "filesystem-wide event monitoring"),
    rule("name_to_handle_at", libc::SYS_name_to_handle_at, "file handles: pairs with open_by_handle_at"),
    rule("open_by_handle_at", libc::SYS_open_by_handle_at, "opens files by handle, escaping the mount tree (shocker)"),
    // --- mount tree and namespaces: the jail sets these up before exec
    rule("mount", libc::SYS_mount, "the mount tree is fixed by the jail"),
    rule("umount2", libc::SYS_umount2, "the mount tree is fixed by the jail"),
    rule("pivot_root", libc::SYS_pivot_root, "the mount tree is fixed by the jail"),
    rule("move_mount", libc::SYS_move_mount, "new mount API"),
    rule("open_tree", libc::SYS_open_tree, "new mount API"),
    rule("fsopen", libc::SYS_fsopen, "new mount API"),
    rule("fsmount", libc::SYS_fsmount, "new mount API"),
    rule("fsconfig", libc::SYS_fsconfig, "new mount API"),
    rule("fspick", libc::SYS_fspick, "new mount API"),
    rule("mount_setattr", libc::SYS_mount_setattr, "changes mount flags (e.g. removes read-only)"),
    rule("unshare", libc::SYS_unshare, "new namespaces (user namespaces expose more kernel surface)"),
    rule("setns", libc::SYS_setns, "joining other namespaces"),
    DenyRule {
        name: "clone",
        nr: libc::SYS_clone,
        when: When::AnyOf(CLONE_NS_CONDS),
        action: EPERM,
        reason: "clone with CLONE_NEW* flags creates namespaces (same as unshare)",
    },
    DenyRule {
        name: "clone3",
        nr: libc::SYS_clone3,
        when: When::Always,
        action: DenyAction::Errno(libc::ENOSYS),
        reason: "flags are in memory and uninspectable; ENOSYS makes libc fall back to clone",
    },
    // --- whole-machine administration
    rule("kexec_load", libc::SYS_kexec_load, "loads a new kernel"),
    rule("kexec_file_load", libc::SYS_kexec_file_load, "loads a new kernel"),
    rule("init_module", libc::SYS_init_module, "loads kernel modules"),
    rule("finit_module", libc::SYS_finit_module, "loads kernel modules"),
    rule("delete_module", libc::SYS_delete_module, "unloads kernel modules"),
    rule("reboot", libc::SYS_reboot, "reboots the machine"),
    rule("swapon", libc::SYS_swapon, "host swap configuration"),
    rule("swapoff", libc::SYS_swapoff, "host swap configuration"),
    rule("acct", libc::SYS_acct, "host process accounting"),
    rule("quotactl", libc::SYS_quotactl, "host filesystem quotas"),
    rule("quotactl_fd", libc::SYS_quotactl_fd, "host filesystem quotas"),
    rule("lookup_dcookie", libc::SYS_lookup_dcookie, "oprofile leftover, leaks paths"),
    rule("syslog", libc::SYS_syslog, "kernel log: leaks kernel addresses"),
    rule("vhangup", libc::SYS_vhangup, "hangs up the controlling terminal"),
    rule("nfsservctl", libc::SYS_nfsservctl, "removed NFS daemon interface"),
    rule("settimeofday", libc::SYS_settimeofday, "host clock is not namespaced"),
    rule("clock_settime", libc::SYS_clock_settime, "host clock is not namespaced"),
    rule("clock_adjtime", libc::SYS_clock_adjtime, "host clock is not namespaced"),
    rule("adjtimex", libc::SYS_adjtimex, "host clock is not namespaced"),
    #[cfg(target_arch = "x86_64")]
    rule("iopl", libc::SYS_iopl, "raw I/O port access"),
    #[cfg(target_arch = "x86_64")]
    rule("ioperm", libc::SYS_ioperm, "raw I/O port access"),
    #[cfg(target_arch = "x86_64")]
    rule("uselib", libc::SYS_uselib, "obsolete a.out loader"),
    // Numbers from arch/x86/entry/syscalls/syscall_64.tbl (not in libc: removed syscalls).
    #[cfg(target_arch = "x86_64")]
    rule("create_module", 174, "removed module interface"),
    #[cfg(target_arch = "x86_64")]
    rule("get_kernel_syms", 177, "removed module interface"),
    #[cfg(target_arch = "x86_64")]
    rule("query_module", 178, "removed module interface"),
    #[cfg(target_arch = "x86_64")]
    rule("_sysctl", libc::SYS__sysctl, "removed binary sysctl interface"),
    // --- argument-filtered
    DenyRule {
        name: "personality",
        nr: libc::SYS_personality,
        // The kernel takes `unsigned int persona`, so the low 32 bits are all it sees.
        when: When::AllOf(&[ne32(0, 0), ne32(0, 0xffff_ffff)]),
        action: EPERM,
        reason: "only PER_LINUX and the 0xffffffff query; others disable ASLR or change the ABI",
    },
    DenyRule {
        name: "ioctl",
        nr: libc::SYS_ioctl,
        // `cmd` is `unsigned int` in the kernel: compare the full 64 bits *and* the low
        // 32 bits, so `TIOCSTI | 1 << 32` cannot slip past an exact 64-bit comparison.
        when: When::AnyOf(&[
            eq(1, true, TIOCSTI),
            eq(1, true, TIOCLINUX),
            low32_eq(1, TIOCSTI),
            low32_eq(1, TIOCLINUX),
        ]),
        action: EPERM,
        reason: "TIOCSTI/TIOCLINUX inject input into the (possibly shared) terminal",
    },
    DenyRule {
        name: "socket",
        nr: libc::SYS_socket,
        // `family` is `int` in the kernel: compare the low 32 bits only.
        when: When::AnyOf(&[eq(0, false, AF_VSOCK)]),
        action: DenyAction::Errno(libc::EAFNOSUPPORT),
        reason: "AF_VSOCK reaches the hypervisor host, outside the network namespace",
    },
];

#[cfg(target_arch = "x86_64")]
const TARGET_ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const TARGET_ARCH: TargetArch = TargetArch::aarch64;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH_NATIVE: u32 = 62 | 0x8000_0000 | 0x4000_0000; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH_NATIVE: u32 = 183 | 0x8000_0000 | 0x4000_0000; // AUDIT_ARCH_AARCH64

// Classic BPF opcodes (linux/bpf_common.h).
/// `BPF_LD | BPF_W | BPF_ABS` (0x00 | 0x00 | 0x20).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JA: u16 = 0x05;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_RET_K: u16 = 0x06;
/// Offsets in `struct seccomp_data`.
const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;
/// Kernel limit on classic BPF program length.
const BPF_MAXINSNS: usize = 4096;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> seccompiler::sock_filter {
    seccompiler::sock_filter { code, jt, jf, k }
}

/// Hand-written prologue: native arch only, and (x86_64) no x32 numbers.
fn prologue() -> BpfProgram {
    let mut p = vec![
        insn(BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_ARCH),
        insn(BPF_JMP_JEQ_K, 1, 0, AUDIT_ARCH_NATIVE),
        insn(BPF_RET_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
    ];
    if cfg!(target_arch = "x86_64") {
        p.extend([
            insn(BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_NR),
            // nr >= X32_SYSCALL_BIT (unsigned) -> EPERM, else fall through.
            insn(BPF_JMP_JGE_K, 0, 1, X32_SYSCALL_BIT),
            insn(
                BPF_RET_K,
                0,
                0,
                libc::SECCOMP_RET_ERRNO | (libc::EPERM as u32 & libc::SECCOMP_RET_DATA),
            ),
        ]);
    }
    p
}

fn to_condition(name: &'static str, c: &ArgCond) -> Result<SeccompCondition, SeccompError> {
    let len = if c.qword {
        SeccompCmpArgLen::Qword
    } else {
        SeccompCmpArgLen::Dword
    };
    let op = match c.op {
        ArgOp::Eq => SeccompCmpOp::Eq,
        ArgOp::Ne => SeccompCmpOp::Ne,
        ArgOp::MaskedEq(m) => SeccompCmpOp::MaskedEq(m),
    };
    SeccompCondition::new(c.arg, len, op, c.value).map_err(|source| SeccompError::Compile {
        syscall: name,
        source,
    })
}

fn to_rules(row: &DenyRule) -> Result<Vec<SeccompRule>, SeccompError> {
    let compile = |conds: Vec<SeccompCondition>| {
        SeccompRule::new(conds).map_err(|source| SeccompError::Compile {
            syscall: row.name,
            source,
        })
    };
    match row.when {
        // An empty rule chain means "match on the syscall number alone".
        When::Always => Ok(Vec::new()),
        When::AnyOf(conds) => conds
            .iter()
            .map(|c| compile(vec![to_condition(row.name, c)?]))
            .collect(),
        When::AllOf(conds) => {
            let conds = conds
                .iter()
                .map(|c| to_condition(row.name, c))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(vec![compile(conds)?])
        }
    }
}

/// Syscall number -> rule chain (`None`: the syscall matches unconditionally).
type RulesByNr = BTreeMap<i64, Option<Vec<SeccompRule>>>;

/// Compiles `table` into one linked program (see the module docs).
pub fn compile_table(table: &[DenyRule]) -> Result<BpfProgram, SeccompError> {
    // action -> (syscall nr -> rule chain; `None` = unconditional)
    let mut groups: BTreeMap<u32, (DenyAction, RulesByNr)> = BTreeMap::new();
    for row in table {
        let (_, by_nr) = groups
            .entry(row.action.ret_value())
            .or_insert_with(|| (row.action, BTreeMap::new()));
        let rules = to_rules(row)?;
        let slot = by_nr.entry(row.nr).or_insert_with(|| Some(Vec::new()));
        match (slot.as_mut(), rules.is_empty()) {
            // Already unconditional: stays unconditional.
            (None, _) => {}
            // An unconditional row wins over conditional ones.
            (Some(_), true) => *slot = None,
            (Some(chain), false) => chain.extend(rules),
        }
    }

    let allow = u32::from(SeccompAction::Allow);
    let count = groups.len();
    let mut program = prologue();
    for (i, (_, (action, by_nr))) in groups.into_iter().enumerate() {
        let rules = by_nr
            .into_iter()
            .map(|(nr, chain)| (nr, chain.unwrap_or_default()))
            .collect();
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            action.to_seccompiler(),
            TARGET_ARCH,
        )
        .map_err(SeccompError::Filter)?;
        let mut sub: BpfProgram = filter.try_into().map_err(SeccompError::Filter)?;
        if i + 1 < count {
            // Link: "allow" in a non-final group means "not decided here, try the next
            // group": jump to the first instruction after this sub-program.
            let len = sub.len();
            for (pc, ins) in sub.iter_mut().enumerate() {
                if ins.code == BPF_RET_K && ins.k == allow {
                    let skip =
                        u32::try_from(len - pc - 1).map_err(|_| SeccompError::TooLarge(len))?;
                    *ins = insn(BPF_JMP_JA, 0, 0, skip);
                }
            }
        }
        program.extend(sub);
    }
    if program.len() > BPF_MAXINSNS {
        return Err(SeccompError::TooLarge(program.len()));
    }
    Ok(program)
}

/// Builds the sandbox's BPF program from [`DENY_TABLE`].
///
/// Layout: a prologue (kill on foreign arch; on x86_64 `EPERM` for x32 syscall
/// numbers), then one `seccompiler`-compiled sub-program per distinct action,
/// linked so that the first matching group decides and anything else is allowed.
pub fn sandbox_program() -> Result<BpfProgram, SeccompError> {
    compile_table(DENY_TABLE)
}

/// Converts a program to `libc::sock_filter`s for [`install_raw`] (same layout;
/// do this before `fork`, since it allocates).
pub fn to_raw(program: &[seccompiler::sock_filter]) -> Vec<libc::sock_filter> {
    program
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect()
}

/// Installs `program` on the calling thread (sets `no_new_privs` first).
///
/// Meant for a single-threaded process that then `exec`s; the filter is
/// inherited by children and kept across `execve`.
pub fn install(program: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(program)?;
    Ok(())
}

/// Installs `program` on every thread of the calling process
/// (`SECCOMP_FILTER_FLAG_TSYNC`), for a multithreaded daemon restricting itself.
/// Fails with [`seccompiler::Error::ThreadSync`] if a thread cannot be synced.
pub fn install_all_threads(program: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter_all_threads(program)?;
    Ok(())
}

/// Installs `program` on the calling thread using only `prctl` and the raw
/// `seccomp` syscall: async-signal-safe and allocation-free, so it may be called
/// between `fork` and `exec` (e.g. from `CommandExt::pre_exec`). Convert the
/// program with [`to_raw`] beforehand.
///
/// Returns the errno on failure (`EINVAL` for an empty or over-long program).
pub fn install_raw(program: &[libc::sock_filter]) -> Result<(), i32> {
    if program.is_empty() || program.len() > BPF_MAXINSNS {
        return Err(libc::EINVAL);
    }
    let len = u16::try_from(program.len()).map_err(|_| libc::EINVAL)?;
    let fprog = libc::sock_fprog {
        len,
        // The kernel only reads the filter (copy_from_user); the `*mut` is the C type.
        filter: program.as_ptr().cast_mut(),
    };
    crate::sys::set_no_new_privs()?;
    // SAFETY: `fprog` is a valid `struct sock_fprog` living on our stack for the whole
    // call, pointing at `len` initialized `sock_filter`s borrowed from `program`; the
    // kernel copies them (copy_from_user) and keeps no reference after returning.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER as libc::c_ulong,
            0 as libc::c_ulong,
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(nix::errno::Errno::last_raw());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn table_rows_are_unique_and_documented() {
        let mut seen = HashSet::new();
        for row in DENY_TABLE {
            assert!(seen.insert(row.name), "duplicate row for {}", row.name);
            assert!(!row.reason.is_empty(), "{} lacks a reason", row.name);
            assert!(row.nr >= 0 && row.nr < i64::from(X32_SYSCALL_BIT));
        }
        assert!(!seen.contains("landlock_create_ruleset"));
        assert!(!seen.contains("landlock_restrict_self"));
    }

    #[test]
    fn program_builds_and_links() {
        let prog = sandbox_program().unwrap();
        assert!(prog.len() < BPF_MAXINSNS);
        let allow = u32::from(SeccompAction::Allow);
        let rets: Vec<usize> = prog
            .iter()
            .enumerate()
            .filter(|(_, i)| i.code == BPF_RET_K && i.k == allow)
            .map(|(pc, _)| pc)
            .collect();
        // Only the last group may return "allow"; it ends the program.
        assert_eq!(rets.last().copied(), Some(prog.len() - 1));
        // Every jump stays inside the program.
        for (pc, i) in prog.iter().enumerate() {
            if i.code == BPF_JMP_JA {
                assert!(pc + 1 + (i.k as usize) < prog.len());
            } else if i.code & 0x07 == 0x05 {
                assert!(pc + 1 + usize::from(i.jt.max(i.jf)) < prog.len());
            }
        }
        assert_eq!(to_raw(&prog).len(), prog.len());
    }

    #[test]
    fn install_raw_rejects_empty() {
        assert_eq!(install_raw(&[]), Err(libc::EINVAL));
    }
}
