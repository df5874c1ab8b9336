//! Server configuration: command-line values over an optional TOML file over defaults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Configuration of a server.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// State directory (records, agent sockets, root skeletons).
    pub state_dir: PathBuf,
    /// API keys accepted by every surface; empty = loopback only, no auth.
    pub api_keys: Vec<String>,
    /// Tenants and their API keys (`[tenants] acme = ["key-1"]`). A sandbox belongs to the
    /// tenant of the key that created it; other tenants' keys see 404. Keys of `api_keys`
    /// belong to the tenant `default`.
    pub tenants: BTreeMap<String, Vec<String>>,
    /// Address put into endpoint answers instead of the request's Host.
    pub public_address: Option<String>,
    /// Longest sandbox timeout a client may ask for, in seconds.
    pub max_timeout_secs: u64,
    /// Default pids limit of a sandbox.
    pub default_pids: u64,
    /// Image aliases: image reference (`name` or `name:tag`; a `name` entry matches every tag)
    /// to a template name (`default`: the host's runtimes; `code-interpreter`: a template built
    /// from package registries, see `[templates]`) or another image reference. They add to the
    /// built-in names, never replace them.
    pub images: BTreeMap<String, String>,
    /// Templates built from package registries (`[templates]`).
    pub templates: TemplatesConfig,
    /// Python interpreter to expose (discovered on `PATH` when absent).
    pub python: Option<PathBuf>,
    /// Refuse sandboxes without seccomp.
    pub require_seccomp: bool,
    /// Refuse sandboxes without Landlock (it is used whenever available).
    pub require_landlock: bool,
    /// Use Landlock where the kernel has it (default). `false` turns it off: Landlock is
    /// defence in depth, and the adversarial tests run without it to show that no guarantee
    /// rests on it.
    pub landlock: bool,
    /// Prefix of the cgroups of this server.
    pub cgroup_base: String,
    /// The executable started as each sandbox's agent (this binary).
    #[serde(skip)]
    pub agent_exe: PathBuf,
    /// Largest file accepted by the execd upload route, in bytes; 0 leaves only the sandbox's
    /// disk size as the bound.
    pub max_upload_bytes: u64,
    /// Idle lifetime of code contexts created implicitly by Leap0's `/execute`, in seconds.
    pub context_idle_ttl_secs: u64,
    /// What clients of the isol8 and session-execute surfaces may ask for (`[policy]`).
    pub policy: Policy,
    /// Outbound networking (`[network]`).
    pub network: NetworkConfig,
    /// Sandboxes' storage (`[storage]`).
    pub storage: StorageConfig,
    /// Volumes (`[volumes]`).
    pub volumes: VolumesConfig,
    /// Prometheus metrics (`[metrics]`).
    pub metrics: MetricsConfig,
    /// Where OCI images come from (`[image_store]`).
    pub image_store: ImageStoreConfig,
    /// Endpoints handed to clients (`[endpoints]`).
    pub endpoints: EndpointsConfig,
    /// The E2B API (`[e2b]`).
    pub e2b: E2bConfig,
    /// Secrets at rest (`[secrets]`).
    pub secrets: SecretsConfig,
    /// Client connections open at once, WebSocket sessions included (at least 1). At the cap
    /// the server stops accepting and new connections wait in the kernel's listen backlog
    /// until one closes. Lowered at start to half the process's limit on open files, which
    /// the server raises as far as it may.
    pub max_connections: usize,
    /// Seconds a client has to send a complete request head, counted from the accept or, on a
    /// kept-alive connection, from the first byte of the next request; 0: no limit. Request
    /// bodies and responses (event streams, WebSocket sessions) are not timed.
    pub header_read_timeout_secs: u64,
    /// Seconds a kept-alive connection may wait for its next request after a response; 0: no
    /// limit.
    pub idle_timeout_secs: u64,
    /// On SIGTERM or SIGINT, how long requests in flight may take to finish, in seconds
    /// (default 30), before the server removes what it owns and exits.
    pub shutdown_grace_secs: u64,
    /// TLS on the client listener (`[tls]`).
    pub tls: TlsConfig,
}

/// TLS on the client listener (`[tls]`): off unless `cert_file` and `key_file` are set.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM, leaf first); set with `key_file` or not at all.
    pub cert_file: Option<PathBuf>,
    /// The private key of the certificate (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates must chain to; when set, every
    /// connection must present one or is refused during the handshake.
    pub client_ca_file: Option<PathBuf>,
    /// Oldest TLS version accepted: `"1.2"` (default) or `"1.3"`.
    pub min_version: TlsVersion,
    /// Seconds between checks of the files for a change, which is then loaded for new
    /// connections; 0: only on SIGHUP.
    pub reload_interval_secs: u64,
}

/// A TLS protocol version ([`TlsConfig::min_version`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub enum TlsVersion {
    /// TLS 1.2 (and 1.3).
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            min_version: TlsVersion::Tls12,
            reload_interval_secs: 5,
        }
    }
}

impl TlsConfig {
    /// Whether TLS is configured (both files named; [`TlsConfig::validate`] refuses one alone).
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some() && self.key_file.is_some()
    }

    /// The keys make sense together (the files themselves are read when the server starts).
    pub fn validate(&self) -> Result<(), String> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => Err("tls.key_file: required with tls.cert_file".into()),
            (None, Some(_)) => Err("tls.cert_file: required with tls.key_file".into()),
            (None, None) if self.client_ca_file.is_some() => Err(
                "tls.client_ca_file: client certificates need TLS: set tls.cert_file and \
                 tls.key_file"
                    .into(),
            ),
            _ => Ok(()),
        }
    }
}

/// Where OCI images come from (`[image_store]`).
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageStoreConfig {
    /// Registries clients may name (`host[:port]`, `docker.io` for short names); empty: any.
    pub allowed_registries: Vec<String>,
    /// Registries spoken to in plain HTTP. Loopback registries always may be; any other needs
    /// TLS unless named here.
    pub insecure_registries: Vec<String>,
    /// Credentials per registry (`[image_store.credentials."host:port"]`), used when a request
    /// brings none.
    pub credentials: BTreeMap<String, RegistryCredentials>,
}

/// A registry's credentials.
#[derive(Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryCredentials {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Endpoints handed to clients (`[endpoints]`).
#[derive(Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointsConfig {
    /// Key signing expiring endpoint URLs (`?expires=`), at least 16 characters; servers
    /// behind one address share it. Unset: a random key kept in the state directory
    /// (`endpoint-signing.key`).
    pub signing_key: Option<String>,
}

impl std::fmt::Debug for EndpointsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointsConfig")
            .field("signing_key", &self.signing_key.as_ref().map(|_| "***"))
            .finish()
    }
}

/// Secrets at rest (`[secrets]`): the key sealing sandbox environments, access tokens and
/// pool templates in the state directory.
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecretsConfig {
    /// A file holding the secrets key (32 bytes: 64 hex digits, base64 or raw), owner-only.
    /// `EXECBOX_SECRETS_KEY` takes precedence; with neither, execbox generates
    /// `<state_dir>/secrets.key` at the first start.
    pub key_file: Option<PathBuf>,
}

/// The E2B API (`[e2b]`).
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct E2bConfig {
    /// Domain of the data plane's host names: a request whose `Host` is `{port}-{id}.{domain}`
    /// goes to port `port` of sandbox `id`, and creates answer it as the sandbox's `domain`.
    /// Unset: clients reach the data plane through `E2B_SANDBOX_URL` (routing headers).
    pub domain: Option<String>,
}

/// The server's Prometheus metrics (`[metrics]`).
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the listener serving `/metrics` (keep it off the public interface); none
    /// (the default): no metrics.
    pub listen: Option<SocketAddr>,
}

/// Volumes (`[volumes]`).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct VolumesConfig {
    /// Host directories whose trees `host` volumes may name (absolute); empty (the default):
    /// host volumes are refused.
    pub host_paths: Vec<PathBuf>,
    /// Host uid that files the sandbox user writes through a volume belong to, and whose
    /// files the sandbox user owns there (id-mapped mounts). Not 0.
    pub owner_uid: u32,
    /// Host gid, likewise.
    pub owner_gid: u32,
    /// Size of a named volume whose request names none, in bytes (default 1 GiB).
    pub default_size_bytes: u64,
    /// Largest named volume, in bytes (default 64 GiB).
    pub max_size_bytes: u64,
}

impl Default for VolumesConfig {
    fn default() -> Self {
        Self {
            host_paths: Vec::new(),
            owner_uid: 1000,
            owner_gid: 1000,
            default_size_bytes: 1 << 30,
            max_size_bytes: 64 << 30,
        }
    }
}

impl VolumesConfig {
    fn validate(&self) -> Result<(), String> {
        if self.owner_uid == 0 || self.owner_gid == 0 {
            return Err(
                "volumes.owner_uid/owner_gid: 0 would give sandbox files to root on the host"
                    .into(),
            );
        }
        if let Some(p) = self.host_paths.iter().find(|p| !p.is_absolute()) {
            return Err(format!(
                "volumes.host_paths: {} is not absolute",
                p.display()
            ));
        }
        Ok(())
    }
}

/// Where sandboxes keep their files (`[storage]`).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `auto` (default: a disk per sandbox where the host allows it, memory otherwise),
    /// `disk` (refuse to start without disks) or `memory`.
    pub medium: crate::local::StorageMedium,
    /// Disk size of a sandbox that asks for none, in bytes (default 2 GiB; sparse: only what
    /// is written takes room on the host).
    pub default_disk_bytes: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            medium: crate::local::StorageMedium::Auto,
            default_disk_bytes: execbox_jail::rootfs::StorageSizes::default().disk,
        }
    }
}

/// The server's maxima over request options: a request asking for more is refused with a 400
/// naming the option, never silently granted.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Largest memory limit a run may ask for, in bytes.
    pub max_memory_bytes: u64,
    /// Largest CPU limit, in CPUs.
    pub max_cpus: f64,
    /// Largest pids limit.
    pub max_pids: u64,
    /// Longest timeout, in milliseconds.
    pub max_timeout_ms: u64,
    /// Largest output kept per stream, in bytes.
    pub max_output_bytes: u64,
    /// Largest `/sandbox` size, in bytes.
    pub max_sandbox_bytes: u64,
    /// Largest `/tmp` size, in bytes.
    pub max_tmp_bytes: u64,
    /// Largest size of each writable area of a lifecycle sandbox (`resourceLimits.disk`), in
    /// bytes.
    pub max_disk_bytes: u64,
    /// Longest life of a lifecycle sandbox, in seconds: `timeout` above it is refused, a
    /// sandbox without `timeout` expires after it, and `renew-expiration` cannot take it past
    /// its creation plus this. Unset: `timeout` is bounded by `max_timeout_secs` only and may be
    /// null (no automatic expiry).
    pub max_lifetime_secs: Option<u64>,
    /// Network modes a request may ask for: `none` (loopback only), `allowlist` (only what
    /// its rules admit) and `public` (the public internet, never private, local or host
    /// addresses).
    pub network_modes: Vec<String>,
    /// Sessions per tenant and surface; at the cap the least recently used idle one is removed.
    pub max_sessions: usize,
    /// Executions (isol8 and session-execute) a tenant may have running at once; more are a
    /// 429.
    pub max_concurrent_runs: usize,
    /// Sessions idle this long are removed, in seconds.
    pub session_idle_ttl_secs: u64,
    /// Largest input file after decoding, in bytes.
    pub max_file_bytes: u64,
    /// Files per request.
    pub max_files: usize,
    /// Environment variables per request.
    pub max_env: usize,
    /// Largest request body, in bytes.
    pub max_request_bytes: usize,
    /// Ready sandboxes kept per template and limits profile for one-shot runs (0: no pool).
    pub warm_pool_size: usize,
    /// Most ready sandboxes per profile when demand is high: the pool grows from
    /// `warm_pool_size` toward the recent number of one-shot runs at once, up to this.
    pub warm_pool_max: usize,
    /// After this many seconds without a one-shot run of a profile, its pool shrinks back to
    /// `warm_pool_size` (ready sandboxes above it are removed).
    pub warm_pool_idle_secs: u64,
    /// Interpreter each ready sandbox starts ahead of its run (`python`), or `none`: a one-shot
    /// run it fits then pays only for executing the code.
    pub warm_pool_prestart: String,
    /// Distinct limits profiles the pool keeps sandboxes for.
    pub max_pool_profiles: usize,
    /// Per-tenant maxima over these (`[policy.tenants.acme] max_memory_bytes = …`): what the
    /// keys of that tenant may ask for.
    pub tenants: BTreeMap<String, PolicyOverride>,
    /// Most sandboxes on this server at once, of every surface (0: no maximum); a create
    /// beyond it is a 429 with `Retry-After`.
    pub max_sandboxes: usize,
    /// Most lifecycle sandboxes of one tenant at once (0: no maximum).
    pub max_sandboxes_per_tenant: usize,
}

/// A tenant's maxima, each over the server-wide one when given.
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyOverride {
    /// See [`Policy::max_memory_bytes`].
    pub max_memory_bytes: Option<u64>,
    /// See [`Policy::max_cpus`].
    pub max_cpus: Option<f64>,
    /// See [`Policy::max_pids`].
    pub max_pids: Option<u64>,
    /// See [`Policy::max_timeout_ms`].
    pub max_timeout_ms: Option<u64>,
    /// See [`Policy::max_output_bytes`].
    pub max_output_bytes: Option<u64>,
    /// See [`Policy::max_sandbox_bytes`].
    pub max_sandbox_bytes: Option<u64>,
    /// See [`Policy::max_tmp_bytes`].
    pub max_tmp_bytes: Option<u64>,
    /// See [`Policy::max_disk_bytes`].
    pub max_disk_bytes: Option<u64>,
    /// See [`Policy::max_lifetime_secs`].
    pub max_lifetime_secs: Option<u64>,
    /// See [`Policy::network_modes`].
    pub network_modes: Option<Vec<String>>,
    /// See [`Policy::max_sessions`].
    pub max_sessions: Option<usize>,
    /// See [`Policy::max_concurrent_runs`].
    pub max_concurrent_runs: Option<usize>,
    /// See [`Policy::max_file_bytes`].
    pub max_file_bytes: Option<u64>,
    /// See [`Policy::max_files`].
    pub max_files: Option<usize>,
    /// See [`Policy::max_env`].
    pub max_env: Option<usize>,
    /// See [`Policy::max_sandboxes_per_tenant`].
    pub max_sandboxes_per_tenant: Option<usize>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_memory_bytes: 4 << 30,
            max_cpus: 2.0,
            max_pids: 1024,
            max_timeout_ms: 300_000,
            max_output_bytes: 16 << 20,
            max_sandbox_bytes: 2 << 30,
            max_tmp_bytes: 2 << 30,
            max_disk_bytes: 2 << 30,
            max_lifetime_secs: None,
            network_modes: vec!["none".to_string(), "allowlist".to_string()],
            max_sessions: 64,
            max_concurrent_runs: 64,
            session_idle_ttl_secs: 3600,
            max_file_bytes: 10_000_000,
            max_files: 100,
            max_env: 100,
            max_request_bytes: 256 << 20,
            warm_pool_size: 2,
            warm_pool_max: 8,
            warm_pool_idle_secs: 60,
            warm_pool_prestart: "python".to_string(),
            max_pool_profiles: 4,
            tenants: BTreeMap::new(),
            max_sandboxes: 0,
            max_sandboxes_per_tenant: 0,
        }
    }
}

impl Policy {
    /// The maxima for the keys of `tenant`: the server-wide ones with the tenant's overrides.
    pub fn for_tenant(&self, tenant: &str) -> Policy {
        let mut p = self.clone();
        p.tenants = BTreeMap::new();
        let Some(o) = self.tenants.get(tenant) else {
            return p;
        };
        macro_rules! over {
            ($($f:ident),*) => { $( if let Some(v) = o.$f.clone() { p.$f = v; } )* };
        }
        over!(
            max_memory_bytes,
            max_cpus,
            max_pids,
            max_timeout_ms,
            max_output_bytes,
            max_sandbox_bytes,
            max_tmp_bytes,
            max_disk_bytes,
            network_modes,
            max_sessions,
            max_concurrent_runs,
            max_file_bytes,
            max_files,
            max_env,
            max_sandboxes_per_tenant
        );
        if let Some(secs) = o.max_lifetime_secs {
            p.max_lifetime_secs = Some(secs);
        }
        p
    }

    /// Checks values no server can honour.
    pub fn validate(&self) -> Result<(), String> {
        for tenant in self.tenants.keys() {
            self.for_tenant(tenant)
                .validate()
                .map_err(|e| format!("[policy.tenants.{tenant}]: {e}"))?;
        }
        if let Some(m) = self
            .network_modes
            .iter()
            .find(|m| !NETWORK_MODES.contains(&m.as_str()))
        {
            return Err(format!(
                "policy.network_modes: {m:?} is not a network mode (one of {})",
                NETWORK_MODES.join(", ")
            ));
        }
        if self.max_sessions == 0 {
            return Err("policy.max_sessions: must be at least 1".into());
        }
        if !PRESTART_RUNTIMES.contains(&self.warm_pool_prestart.as_str()) {
            return Err(format!(
                "policy.warm_pool_prestart: {:?} is not one of {}",
                self.warm_pool_prestart,
                PRESTART_RUNTIMES.join(", ")
            ));
        }
        crate::policy::check_maxima(self)
    }
}

/// What `warm_pool_prestart` may name.
pub const PRESTART_RUNTIMES: &[&str] = &["python", "none"];

/// The network modes a sandbox can have.
pub const NETWORK_MODES: &[&str] = &["none", "allowlist", "public"];

/// The operator's network settings (`[network]`).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Names the sandboxes' resolver answers from this table before any lookup
    /// (`"mirror.internal" = ["10.0.0.5"]`): private mirrors, and the tests' own servers.
    pub hosts: BTreeMap<String, Vec<std::net::IpAddr>>,
    /// Private, local or host addresses sandboxes may reach all the same (`"10.0.0.5:443"`,
    /// `"10.0.0.0/8"`).
    pub allow_addresses: Vec<String>,
    /// Named lists of hosts a policy can refer to (`registries.pypi = ["pypi.org",
    /// "files.pythonhosted.org"]`): the hosts package installs may reach.
    pub registries: BTreeMap<String, Vec<String>>,
    /// TTL of the answers sandboxes get, which is also how long their addresses are admitted.
    pub dns_ttl_secs: u32,
    /// Connections one sandbox may have open at once.
    pub max_connections: u64,
    /// Receive and send window of each sandbox connection in the server's stack, in bytes
    /// (default 512 KiB): larger moves bulk data faster; each open connection holds four
    /// buffers of this size.
    pub tcp_window_bytes: u32,
    /// Bytes per second one sandbox may move in each direction (0, the default: no cap).
    pub bandwidth_bytes_per_sec: u64,
    /// What session-execute sessions may reach (targets as in `networkPolicy`; `@name` is a
    /// registry list, e.g. `["@npm"]` for Bun's installs); empty (the default): loopback only.
    pub session_execute: Vec<String>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            hosts: BTreeMap::new(),
            allow_addresses: Vec::new(),
            registries: BTreeMap::new(),
            dns_ttl_secs: 60,
            max_connections: 128,
            tcp_window_bytes: 512 * 1024,
            bandwidth_bytes_per_sec: 0,
            session_execute: Vec::new(),
        }
    }
}

/// Templates built from package registries (`[templates]`).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TemplatesConfig {
    /// Where built templates are kept (default `<state-dir>/templates`). Servers and test runs
    /// pointed at one directory share its templates: each is built once.
    pub dir: Option<PathBuf>,
    /// Templates built in the background as the server starts, so that the first sandbox of
    /// one does not wait for its build (default `["code-interpreter"]`; `[]` builds on first
    /// use only).
    pub prebuild: Vec<String>,
    /// Longest a build may take, in seconds; a longer one is stopped and fails.
    pub build_timeout_secs: u64,
}

impl Default for TemplatesConfig {
    fn default() -> Self {
        Self {
            dir: None,
            prebuild: vec![execbox_image::template::CODE_INTERPRETER.to_string()],
            build_timeout_secs: 1800,
        }
    }
}

/// Tenant of the keys in `api_keys`, and of every request when no key is configured.
pub const DEFAULT_TENANT: &str = "default";

impl Default for ServerConfig {
    fn default() -> Self {
        let mut images = BTreeMap::new();
        images.insert("default".to_string(), "default".to_string());
        images.insert(
            "opensandbox/code-interpreter".to_string(),
            execbox_image::template::CODE_INTERPRETER.to_string(),
        );
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            state_dir: PathBuf::from("/var/lib/execbox"),
            api_keys: Vec::new(),
            tenants: BTreeMap::new(),
            public_address: None,
            max_timeout_secs: 7 * 24 * 3600,
            default_pids: 512,
            images,
            templates: TemplatesConfig::default(),
            python: None,
            require_seccomp: true,
            require_landlock: false,
            landlock: true,
            cgroup_base: "execbox".to_string(),
            agent_exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe")),
            max_upload_bytes: 0,
            context_idle_ttl_secs: 3600,
            policy: Policy::default(),
            network: NetworkConfig::default(),
            storage: StorageConfig::default(),
            volumes: VolumesConfig::default(),
            metrics: MetricsConfig::default(),
            image_store: ImageStoreConfig::default(),
            endpoints: EndpointsConfig::default(),
            e2b: E2bConfig::default(),
            secrets: SecretsConfig::default(),
            max_connections: 10_000,
            header_read_timeout_secs: 10,
            idle_timeout_secs: 60,
            shutdown_grace_secs: 30,
            tls: TlsConfig::default(),
        }
    }
}

impl ServerConfig {
    /// Reads a TOML configuration file.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        let mut config: Self =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        // The operator's aliases add to the built-in names; they never replace them.
        for (name, target) in Self::default().images {
            config.images.insert(name, target);
        }
        config
            .policy
            .validate()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        execbox_net::Exceptions::parse(&config.network.allow_addresses)
            .map_err(|e| format!("{}: network.allow_addresses: {e}", path.display()))?;
        config
            .check_templates()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        config
            .volumes
            .validate()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        config
            .tls
            .validate()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(config)
    }

    /// This configuration as TOML, with API keys and registry passwords masked.
    pub fn masked_toml(&self) -> Result<String, String> {
        let mut shown = self.clone();
        let mask = |k: &mut String| *k = "***".into();
        shown.api_keys.iter_mut().for_each(mask);
        shown.tenants.values_mut().flatten().for_each(mask);
        shown
            .image_store
            .credentials
            .values_mut()
            .for_each(|c| c.password = "***".into());
        if let Some(key) = shown.endpoints.signing_key.as_mut() {
            mask(key);
        }
        toml::to_string(&shown).map_err(|e| e.to_string())
    }

    /// Every template named by `[templates] prebuild` exists (an `[images]` alias may name an
    /// image reference as well as a template).
    fn check_templates(&self) -> Result<(), String> {
        if let Some(t) = self
            .templates
            .prebuild
            .iter()
            .find(|t| execbox_image::template::Recipe::named(t).is_err())
        {
            return Err(format!(
                "templates.prebuild: unknown template {t:?} (templates: {})",
                execbox_image::template::Recipe::known().join(", ")
            ));
        }
        Ok(())
    }

    /// Where built templates are kept.
    pub fn templates_dir(&self) -> PathBuf {
        self.templates
            .dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("templates"))
    }

    /// Whether any API key is configured (otherwise the server is open, on loopback only).
    pub fn has_keys(&self) -> bool {
        !self.api_keys.is_empty() || self.tenants.values().any(|k| !k.is_empty())
    }

    /// Every configured key with its tenant.
    pub fn keys(&self) -> impl Iterator<Item = (&str, &str)> {
        self.api_keys
            .iter()
            .map(|k| (k.as_str(), DEFAULT_TENANT))
            .chain(
                self.tenants
                    .iter()
                    .flat_map(|(t, keys)| keys.iter().map(move |k| (k.as_str(), t.as_str()))),
            )
    }

    /// Whether `name` is one of this server's built-in templates.
    pub fn is_template(&self, name: &str) -> bool {
        name == crate::templates::DEFAULT_TEMPLATE
            || execbox_image::template::Recipe::named(name).is_ok()
    }

    /// What the operator's aliases make of an image reference (a template name or another
    /// reference), if any alias names it.
    pub fn alias_of(&self, uri: &str) -> Option<&str> {
        self.resolve_image(uri)
    }

    /// The target of the alias of an image reference (by exact reference, then by name without
    /// tag), if any.
    pub fn resolve_image(&self, uri: &str) -> Option<&str> {
        let name = match uri.rsplit_once(':') {
            // A colon after the last slash separates the tag (not a registry port).
            Some((n, tag)) if !tag.contains('/') => n,
            _ => uri,
        };
        let name = name.split('@').next().unwrap_or(name);
        self.images
            .get(uri)
            .or_else(|| self.images.get(name))
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_policies_override_the_server_maxima() {
        let c: ServerConfig = toml::from_str(
            "[policy]\nmax_pids = 100\n[policy.tenants.acme]\nmax_pids = 10\nmax_env = 5\n",
        )
        .expect("config");
        assert_eq!(c.policy.for_tenant("acme").max_pids, 10);
        assert_eq!(c.policy.for_tenant("acme").max_env, 5);
        assert_eq!(c.policy.for_tenant("other").max_pids, 100);
        let bad: ServerConfig =
            toml::from_str("[policy.tenants.x]\nnetwork_modes = [\"bridge\"]\n").expect("config");
        assert!(bad.policy.validate().is_err());
    }

    #[test]
    fn code_interpreter_image_of_any_tag_is_the_code_interpreter_template() {
        let c = ServerConfig::default();
        assert_eq!(
            c.resolve_image("opensandbox/code-interpreter:v1.1.0"),
            Some("code-interpreter")
        );
        assert_eq!(
            c.resolve_image("opensandbox/code-interpreter"),
            Some("code-interpreter")
        );
        assert_eq!(c.resolve_image("default"), Some("default"));
        assert_eq!(c.resolve_image("python:3.11"), None);
        assert_eq!(c.resolve_image("registry:5000/python"), None);
    }

    #[test]
    fn templates_default_to_the_state_dir_and_unknown_ones_are_refused() {
        let c = ServerConfig {
            state_dir: PathBuf::from("/srv/execbox"),
            ..Default::default()
        };
        assert_eq!(c.templates_dir(), PathBuf::from("/srv/execbox/templates"));
        assert_eq!(c.templates.prebuild, ["code-interpreter"]);
        assert!(c.check_templates().is_ok());
        let shared: ServerConfig =
            toml::from_str("[templates]\ndir = \"/var/tmp/t\"\nprebuild = []\n").expect("config");
        assert_eq!(shared.templates_dir(), PathBuf::from("/var/tmp/t"));
        assert!(shared.templates.prebuild.is_empty());
        let bad: ServerConfig =
            toml::from_str("[templates]\nprebuild = [\"nope\"]\n").expect("config");
        assert!(bad.check_templates().unwrap_err().contains("nope"));
    }
}
