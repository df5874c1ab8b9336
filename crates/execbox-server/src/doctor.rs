//! `execbox doctor`: the state of every isolation layer on this host.

use std::path::Path;

use execbox_jail::cgroup::CgroupDriver;
use execbox_jail::landlock_fence::{landlock_abi_status, LandlockStatus};

/// One isolation layer and whether it can be used here.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Layer {
    /// Layer name.
    pub name: String,
    /// Usable.
    pub ok: bool,
    /// Sandboxes are refused when a required layer is not usable.
    pub required: bool,
    /// Usable, but weaker than the full design (reason in `detail`).
    pub degraded: bool,
    /// Where it is, or why it is missing.
    pub detail: String,
}

fn layer(name: &str, ok: bool, required: bool, detail: impl Into<String>) -> Layer {
    Layer {
        name: name.to_string(),
        ok,
        required,
        degraded: false,
        detail: detail.into(),
    }
}

/// Checks every layer. `seccomp` and `landlock` say whether the configuration requires them.
pub fn check(seccomp: bool, landlock: bool, cgroup_base: &str) -> Vec<Layer> {
    let mut layers = Vec::new();
    let max_userns = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    layers.push(layer(
        "namespace:user",
        max_userns > 0,
        true,
        format!("max_user_namespaces = {max_userns}"),
    ));
    for ns in ["pid", "mnt", "net", "ipc", "uts", "cgroup"] {
        let ok = Path::new(&format!("/proc/self/ns/{ns}")).exists();
        let detail = if ok { "available" } else { "kernel lacks it" };
        layers.push(layer(&format!("namespace:{ns}"), ok, true, detail));
    }
    let root = nix::unistd::geteuid().is_root();
    let mut users = layer(
        "users",
        true,
        true,
        if root {
            "root: each sandbox gets its own range of 65536 host uids"
        } else {
            "rootless: one mapped uid; user code shares the agent's uid (with all capabilities \
             dropped), so a sandbox escape would run as the server's user"
        },
    );
    users.degraded = !root;
    layers.push(users);

    match CgroupDriver::detect_with_base(cgroup_base) {
        Ok(driver) => {
            // What a create needs: making (and removing) a cgroup here, for real.
            let probe = format!("doctor-probe-{}", std::process::id());
            let writable = driver
                .create(&probe, &Default::default())
                .and_then(|cg| cg.remove());
            layers.push(layer(
                "cgroup:write",
                writable.is_ok(),
                true,
                match &writable {
                    Ok(()) => format!("sandbox cgroups can be made under {cgroup_base}"),
                    Err(e) if root => format!("{e}"),
                    Err(e) => format!(
                        "{e}; hint: run execbox as root, or delegate a cgroup subtree to this \
                         user (systemd: a unit or scope with Delegate=yes) and name it with \
                         cgroup_base"
                    ),
                },
            ));
            for f in driver.report() {
                let required = matches!(f.name.as_str(), "memory" | "cpu" | "pids");
                layers.push(layer(
                    &format!("cgroup:{}", f.name),
                    f.available,
                    required,
                    f.detail,
                ));
            }
        }
        Err(e) => layers.push(layer("cgroups", false, true, e.to_string())),
    }

    let seccomp_ok = match execbox_jail::seccomp::sandbox_program() {
        Ok(p) => (
            true,
            format!("deny-list filter of {} instructions", p.len()),
        ),
        Err(e) => (false, e.to_string()),
    };
    let kernel_seccomp = std::fs::read_to_string("/proc/self/status")
        .map(|s| s.contains("Seccomp:"))
        .unwrap_or(false);
    layers.push(layer(
        "seccomp",
        seccomp_ok.0 && kernel_seccomp,
        seccomp,
        if kernel_seccomp {
            seccomp_ok.1
        } else {
            "kernel without seccomp".into()
        },
    ));
    match landlock_abi_status() {
        LandlockStatus::Available { abi } => {
            layers.push(layer("landlock", true, landlock, format!("ABI {abi}")))
        }
        LandlockStatus::Unavailable { reason } => {
            layers.push(layer("landlock", false, landlock, reason))
        }
    }
    // Every path from a request, or whose components sandbox code can change, is resolved by
    // the kernel beneath the sandbox's root with magic links refused: without `openat2` the
    // agent could be steered onto its own host-side descriptors.
    match execbox_jail::fsroot::probe() {
        Ok(()) => layers.push(layer(
            "path resolution",
            true,
            true,
            "openat2 with RESOLVE_IN_ROOT, RESOLVE_BENEATH and RESOLVE_NO_MAGICLINKS",
        )),
        Err(e) => layers.push(layer("path resolution", false, true, e)),
    }
    // The agent's cgroup handles are detached mounts (`open_tree`), from which `..` leads
    // nowhere on the host.
    layers.push(match execbox_jail::rootfs::probe_detached_mounts() {
        Ok(()) => layer(
            "agent host handles",
            true,
            true,
            "cgroup directories handed over as detached mounts (open_tree)",
        ),
        Err(e) => layer("agent host handles", false, true, e),
    });
    layers.push(layer(
        "network:none",
        Path::new("/proc/self/ns/net").exists(),
        true,
        "own network namespace with only loopback, up",
    ));
    layers
}

/// Whether Landlock can be used here.
pub fn landlock_available() -> bool {
    matches!(landlock_abi_status(), LandlockStatus::Available { .. })
}
