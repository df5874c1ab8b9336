//! The contract between the server and the agent it starts as PID 1 of a sandbox.

use serde::{Deserialize, Serialize};

/// Environment variable holding the JSON [`AgentConfig`].
pub const AGENT_CONFIG_ENV: &str = "EXECBOX_AGENT_CONFIG";

/// Configuration handed to the agent at start.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct AgentConfig {
    /// Sandbox environment (from the create request), seen by every user process.
    pub env: Vec<(String, String)>,
    /// Entrypoint started in the background as the sandbox user (may be empty).
    pub entrypoint: Vec<String>,
    /// Uid of the sandbox user inside the sandbox.
    pub user_uid: u32,
    /// Gid of the sandbox user inside the sandbox.
    pub user_gid: u32,
    /// Only one uid is mapped: supplementary groups cannot be set.
    pub rootless: bool,
    /// `"v1"` or `"v2"`, or empty when no cgroup descriptors are passed.
    pub cgroup_version: String,
    /// Hierarchy labels of the cgroup directory descriptors passed after the listener.
    pub cgroup_labels: Vec<String>,
    /// Enter a Landlock fence for user processes (fail when unavailable).
    pub landlock: bool,
    /// Install the seccomp filter on the agent (inherited by every user process).
    pub seccomp: bool,
    /// Per-command output cap for background logs, in bytes.
    pub max_log_bytes: u64,
    /// The sandbox's CPU limit in millicores, if any (reported by `/metrics`).
    #[serde(default)]
    pub cpu_millicores: Option<u64>,
    /// Largest accepted upload, in bytes (0 = unlimited).
    #[serde(default)]
    pub max_upload_bytes: u64,
    /// Code contexts created implicitly (Leap0 `/execute` without `context_id`) are removed
    /// after this many idle seconds (0 = the default, one hour).
    #[serde(default)]
    pub context_idle_ttl_secs: u64,
    /// Memory limit of each execution (its processes and the files they write while they
    /// run), in bytes: the sandbox's memory limit. The workload cgroup above the executions
    /// also has room for the sandbox's storage, so files left by finished executions never
    /// leave the next one without memory.
    #[serde(default)]
    pub execution_memory_bytes: Option<u64>,
    /// Size of the sandbox's disk (its writable root) in bytes, named when it is full.
    #[serde(default)]
    pub disk_bytes: Option<u64>,
    /// Working directory of processes that name none (an image's `WorkingDir`); the sandbox
    /// user's home when absent.
    #[serde(default)]
    pub workdir: Option<String>,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("env", &crate::redact::MaskedPairs(&self.env))
            .field("entrypoint", &self.entrypoint)
            .finish_non_exhaustive()
    }
}
