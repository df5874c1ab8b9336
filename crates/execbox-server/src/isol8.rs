//! The isol8 API (`../shared/compat/isol8.md`) at the top level of the port: `/execute`,
//! `/execute/stream`, `/file`, `/sessions`, `/session/{id}` (and `/health`, served for every
//! surface). One-shot runs take a sandbox from the warm pool and destroy it afterwards; runs with
//! a `sessionId` use the tenant's persistent sandbox of that session. Every option is checked
//! against the server's policy: asking for more than it allows, or for weaker isolation, is a 400
//! naming the option.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use base64::Engine;
use execbox_proto::isol8::{
    parse_size, ErrorBody, ExecuteBody, ExecutionRequest, ExecutionResult, Options, PutFileBody,
    StreamEvent,
};
use execbox_proto::run::{FileContent, RunEvent, RunRequest, RunResult};
use tokio::sync::mpsc;

use crate::agent_run::{self, AgentCallError};
use crate::config::Policy;
use crate::local::SandboxLimits;
use crate::pool::{Profile, WarmPool};
use crate::sessions::{Lease, SessionKey, Sessions, Surface};
use crate::{LaunchSpec, Server, Tenant};

/// Working directory and writable area of isol8 runs.
const SANDBOX_DIR: &str = "/sandbox";
/// Roots input files may be written under.
const FILE_ROOTS: [&str; 2] = ["/sandbox", "/tmp"];
/// Roots `POST /file` may write under (every writable area of a sandbox).
const PUT_FILE_ROOTS: [&str; 4] = ["/sandbox", "/tmp", "/home/user", "/workspace"];
/// isol8's defaults (§4).
const DEFAULT_TIMEOUT_MS: u64 = 30_000;
const DEFAULT_MEMORY: u64 = 512 << 20;
const DEFAULT_CPU_MILLICORES: u64 = 1000;
const DEFAULT_PIDS: u64 = 64;
const DEFAULT_SANDBOX_SIZE: u64 = 512 << 20;
const DEFAULT_TMP_SIZE: u64 = 256 << 20;
const DEFAULT_MAX_OUTPUT: u64 = 1 << 20;
/// Longest session id.
const MAX_SESSION_ID: usize = 256;
/// The template every isol8 run uses.
const TEMPLATE: &str = "default";

/// An isol8 API error, answered as `{"error":"…"}`.
#[derive(Debug, thiserror::Error)]
pub enum Isol8Error {
    /// 400: the request is invalid or asks for more than the policy allows.
    #[error("{0}")]
    BadRequest(String),
    /// 401.
    #[error("Missing Authorization header")]
    MissingKey,
    /// 403.
    #[error("Invalid API key")]
    InvalidKey,
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 413.
    #[error("{0}")]
    TooLarge(String),
    /// 429: the tenant's sessions are all busy at the cap.
    #[error("{0}")]
    TooMany(String),
    /// 500.
    #[error("{0}")]
    Internal(String),
}

impl IntoResponse for Isol8Error {
    fn into_response(self) -> Response {
        let status = match &self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::MissingKey => StatusCode::UNAUTHORIZED,
            Self::InvalidKey => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(error = %self, "isol8 request failed");
        }
        (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

impl From<AgentCallError> for Isol8Error {
    fn from(e: AgentCallError) -> Self {
        match e {
            AgentCallError::Refused(s, err) if s == StatusCode::NOT_FOUND => {
                Self::NotFound(err.message)
            }
            AgentCallError::Refused(s, err) if s == StatusCode::PAYLOAD_TOO_LARGE => {
                Self::TooLarge(err.message)
            }
            AgentCallError::Refused(_, err) => Self::BadRequest(err.message),
            AgentCallError::Failed(m) => Self::Internal(m),
        }
    }
}

impl From<crate::policy::LimitError> for Isol8Error {
    fn from(e: crate::policy::LimitError) -> Self {
        Self::BadRequest(e.to_string())
    }
}

impl From<crate::lifecycle::LifecycleError> for Isol8Error {
    fn from(e: crate::lifecycle::LifecycleError) -> Self {
        match e {
            crate::lifecycle::LifecycleError::TooMany(m) => Self::TooMany(m),
            e => Self::Internal(e.to_string()),
        }
    }
}

impl From<crate::sessions::SessionError> for Isol8Error {
    fn from(e: crate::sessions::SessionError) -> Self {
        match e {
            crate::sessions::SessionError::TooMany(_) => Self::TooMany(e.to_string()),
            crate::sessions::SessionError::Sandbox(e) => e.into(),
        }
    }
}

type Result<T> = std::result::Result<T, Isol8Error>;

/// `Authorization: Bearer <key>` (prefix case-insensitive and optional): 401 without the
/// header, 403 with a key the server does not know.
async fn auth(State(server): State<Arc<Server>>, mut req: Request, next: Next) -> Response {
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    let key = header.map(|h| match h.get(..7) {
        Some(p) if p.eq_ignore_ascii_case("bearer ") => h[7..].trim(),
        _ => h,
    });
    if server.config.has_keys() && key.is_none() {
        return Isol8Error::MissingKey.into_response();
    }
    match server.tenant_of(key).await {
        Some(t) => {
            req.extensions_mut().insert(Tenant(t));
            next.run(req).await
        }
        None => Isol8Error::InvalidKey.into_response(),
    }
}

/// The isol8 routes.
pub fn routes(server: Arc<Server>) -> Router<Arc<Server>> {
    let limit = server.config.policy.max_request_bytes;
    Router::new()
        .route("/execute", post(execute))
        .route("/execute/stream", post(execute_stream))
        .route("/execute/ws", get(execute_ws))
        .route("/file", post(put_file).get(get_file))
        .route("/sessions", get(list_sessions))
        .route("/session/{id}", delete(delete_session))
        .route("/session/{id}/signal", post(signal_session))
        .layer(DefaultBodyLimit::max(limit))
        .route_layer(middleware::from_fn_with_state(server, auth))
}

/// Starts the pool's sandboxes for the default options, so the first one-shot run finds one.
pub fn warm(server: &Arc<Server>) {
    WarmPool::refill(server, &default_profile());
}

fn default_profile() -> Profile {
    Profile {
        template: TEMPLATE.to_string(),
        limits: SandboxLimits {
            cpu_millicores: Some(DEFAULT_CPU_MILLICORES),
            memory_bytes: Some(DEFAULT_MEMORY),
            pids: Some(DEFAULT_PIDS),
            disk_bytes: None,
            sandbox_bytes: Some(DEFAULT_SANDBOX_SIZE),
            tmp_bytes: Some(DEFAULT_TMP_SIZE),
        },
        network: false,
    }
}

fn body_bytes(body: std::result::Result<Bytes, BytesRejection>) -> Result<Bytes> {
    body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            Isol8Error::TooLarge("request body is larger than this server accepts".into())
        }
        _ => Isol8Error::BadRequest(format!("unreadable request body: {e}")),
    })
}

/// Parses JSON, naming the field that is wrong.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            Isol8Error::BadRequest(format!("invalid request body: {inner}"))
        } else {
            Isol8Error::BadRequest(format!("{path}: {inner}"))
        }
    })
}

/// A runtime of §6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runtime {
    Python,
    Node,
    Bun,
    Deno,
    Bash,
}

impl Runtime {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "python" => Self::Python,
            "node" => Self::Node,
            "bun" => Self::Bun,
            "deno" => Self::Deno,
            "bash" => Self::Bash,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Python => "python",
            Self::Node => "node",
            Self::Bun => "bun",
            Self::Deno => "deno",
            Self::Bash => "bash",
        }
    }

    /// The program it needs in the sandbox.
    fn program(self) -> &'static str {
        match self {
            Self::Python => "python3",
            other => other.name(),
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Self::Python => ".py",
            Self::Node => ".mjs",
            Self::Bun => ".ts",
            Self::Deno => ".mts",
            Self::Bash => ".sh",
        }
    }

    fn inline(self, code: &str) -> Option<Vec<String>> {
        let (prog, flag) = match self {
            Self::Python => ("python3", "-c"),
            Self::Node => ("node", "-e"),
            Self::Bun => ("bun", "-e"),
            Self::Bash => ("bash", "-c"),
            Self::Deno => return None,
        };
        Some(vec![prog.into(), flag.into(), code.into()])
    }

    fn file(self, path: &str) -> Vec<String> {
        let v: &[&str] = match self {
            Self::Python => &["python3"],
            Self::Node => &["node"],
            Self::Bun => &["bun", "run"],
            Self::Deno => &[
                "deno",
                "run",
                "--allow-read=/sandbox,/tmp",
                "--allow-write=/sandbox,/tmp",
                "--allow-env",
                "--allow-net",
            ],
            Self::Bash => &["bash"],
        };
        v.iter()
            .map(|s| s.to_string())
            .chain([path.to_string()])
            .collect()
    }
}

/// A checked execute request: what to run, where, with which limits.
struct Plan {
    runtime: Runtime,
    profile: Profile,
    run: RunRequest,
    setup: Option<RunRequest>,
    /// The package install (`installPackages`) and the only egress it has: the registries.
    install: Option<(RunRequest, execbox_net::Policy)>,
    /// The egress of the setup script and the code (none: nothing leaves).
    network: Option<execbox_net::Policy>,
    secrets: Vec<String>,
    max_output: u64,
}

fn exceeds(field: &str, max: impl std::fmt::Display) -> Isol8Error {
    Isol8Error::BadRequest(format!("{field} exceeds server maximum {max}"))
}

fn weaker(field: &str, what: &str) -> Isol8Error {
    Isol8Error::BadRequest(format!(
        "{field}: {what} is not allowed by this server's policy"
    ))
}

/// A size option in isol8's syntax (`512m`), parsed; `None` when absent.
fn size_option(field: &str, raw: Option<&str>) -> Result<Option<u64>> {
    raw.map(|raw| {
        parse_size(raw)
            .filter(|b| *b > 0)
            .ok_or_else(|| Isol8Error::BadRequest(format!("{field}: invalid size {raw:?}")))
    })
    .transpose()
}

/// The egress policy of isol8's `networkFilter` (`{"whitelist":[regex],"blacklist":[regex]}`):
/// the blacklist wins, an empty whitelist allows everything else.
fn filter_policy(filter: Option<&serde_json::Value>) -> Result<execbox_net::Policy> {
    let list = |key: &str| -> Result<Vec<String>> {
        match filter.and_then(|f| f.get(key)) {
            None | Some(serde_json::Value::Null) => Ok(Vec::new()),
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        Isol8Error::BadRequest(format!(
                            "options.networkFilter.{key}[{i}]: must be a string"
                        ))
                    })
                })
                .collect(),
            Some(_) => Err(Isol8Error::BadRequest(format!(
                "options.networkFilter.{key}: must be an array of regular expressions"
            ))),
        }
    };
    let (white, black) = (list("whitelist")?, list("blacklist")?);
    let mut rules = Vec::new();
    for (key, items, action) in [
        ("blacklist", &black, execbox_net::Action::Deny),
        ("whitelist", &white, execbox_net::Action::Allow),
    ] {
        for (i, pattern) in items.iter().enumerate() {
            rules.push(execbox_net::Rule::pattern(action, pattern).map_err(|e| {
                Isol8Error::BadRequest(format!("options.networkFilter.{key}[{i}]: {e}"))
            })?);
        }
    }
    Ok(execbox_net::Policy {
        default: if white.is_empty() {
            execbox_net::Action::Allow
        } else {
            execbox_net::Action::Deny
        },
        rules,
    })
}

/// The user code's egress for isol8's `network` (`none`, `filtered`, `host`), within the
/// tenant's network modes: `filtered` is execbox's allowlist mode (public when its whitelist is
/// empty), `host` the public mode (never the host's own network).
fn user_network(o: &Options, p: &Policy) -> Result<Option<execbox_net::Policy>> {
    let network = o.network.as_deref().unwrap_or("none");
    let (mode, policy) = match network {
        "none" => ("none", None),
        "host" => (
            "public",
            Some(execbox_net::Policy {
                default: execbox_net::Action::Allow,
                rules: Vec::new(),
            }),
        ),
        "filtered" => {
            let policy = filter_policy(o.network_filter.as_ref())?;
            let mode = match policy.default {
                execbox_net::Action::Allow => "public",
                execbox_net::Action::Deny => "allowlist",
            };
            (mode, Some(policy))
        }
        other => {
            return Err(Isol8Error::BadRequest(format!(
                "options.network: {other:?} is not one of none, filtered, host"
            )))
        }
    };
    if !p.network_modes.iter().any(|m| m == mode) {
        return Err(Isol8Error::BadRequest(format!(
            "options.network: {network:?} (network mode {mode}) is not allowed by this server's \
             policy (allowed: {})",
            p.network_modes.join(", ")
        )));
    }
    Ok(policy)
}

/// Checks `options` against the policy; returns the sandbox profile and the output cap.
fn check_options(o: &Options, p: &Policy, config: &crate::ServerConfig) -> Result<(Profile, u64)> {
    let memory = p.memory(
        "options.memoryLimit",
        size_option("options.memoryLimit", o.memory_limit.as_deref())?,
        DEFAULT_MEMORY,
    )?;
    let cpus = o.cpu_limit;
    if cpus.is_some_and(|c| !c.is_finite() || c <= 0.0) {
        return Err(Isol8Error::BadRequest(format!(
            "options.cpuLimit: {} is not a positive number of CPUs",
            cpus.unwrap_or_default()
        )));
    }
    if cpus.is_some_and(|c| c > p.max_cpus) {
        return Err(exceeds("options.cpuLimit", p.max_cpus));
    }
    let cpu_millicores = p.cpu_millicores(
        "options.cpuLimit",
        cpus.map(|c| (c * 1000.0).round() as u64),
        DEFAULT_CPU_MILLICORES,
    )?;
    let pids = p.pids("options.pidsLimit", o.pids_limit, DEFAULT_PIDS)?;
    let sandbox = p.sandbox_size(
        "options.sandboxSize",
        size_option("options.sandboxSize", o.sandbox_size.as_deref())?,
        DEFAULT_SANDBOX_SIZE,
    )?;
    let tmp = p.tmp_size(
        "options.tmpSize",
        size_option("options.tmpSize", o.tmp_size.as_deref())?,
        DEFAULT_TMP_SIZE,
    )?;
    let max_output = p.output_bytes(
        "options.maxOutputSize",
        o.max_output_size,
        DEFAULT_MAX_OUTPUT,
    )?;
    if let Some(t) = o.timeout_ms {
        p.timeout_ms("options.timeoutMs", Some(t), DEFAULT_TIMEOUT_MS)?;
    }
    let network = o.network.as_deref().unwrap_or("none");
    // Isolation switches: the secure default is accepted (and is what runs anyway), anything
    // weaker is refused.
    if let Some(image) = o.image.as_deref().filter(|i| !i.is_empty()) {
        if config.resolve_image(image) != Some(TEMPLATE) {
            return Err(weaker("options.image", &format!("the image {image:?}")));
        }
    }
    if let Some(sec) = &o.security {
        if let Some(mode) = sec.seccomp.as_deref().filter(|m| *m != "strict") {
            return Err(weaker(
                "options.security.seccomp",
                &format!("the seccomp mode {mode:?}"),
            ));
        }
        if sec.custom_profile_path.is_some() {
            return Err(weaker(
                "options.security.customProfilePath",
                "a custom seccomp profile",
            ));
        }
    }
    if o.readonly_root_fs == Some(false) {
        return Err(weaker(
            "options.readonlyRootFs",
            "a writable root filesystem",
        ));
    }
    if o.persist == Some(true) {
        return Err(weaker(
            "options.persist",
            "keeping the sandbox after the run",
        ));
    }
    if o.debug == Some(true) {
        return Err(weaker("options.debug", "debug mode"));
    }
    if o.remote_code
        .as_ref()
        .and_then(|r| r.get("enabled"))
        .and_then(|e| e.as_bool())
        == Some(true)
    {
        return Err(weaker("options.remoteCode.enabled", "fetching remote code"));
    }
    if o.network_filter.is_some() && network != "filtered" {
        return Err(Isol8Error::BadRequest(
            "options.networkFilter: only used with network \"filtered\"".into(),
        ));
    }
    let profile = Profile {
        template: TEMPLATE.to_string(),
        limits: SandboxLimits {
            cpu_millicores: Some(cpu_millicores),
            memory_bytes: Some(memory),
            pids: Some(pids),
            disk_bytes: None,
            sandbox_bytes: Some(sandbox),
            tmp_bytes: Some(tmp),
        },
        network: false,
    };
    Ok((profile, max_output))
}

/// `path` without `.` and `..`, when absolute.
fn normalize(path: &str) -> Option<PathBuf> {
    execbox_proto::paths::normalize_absolute(path).map(PathBuf::from)
}

fn inside(path: &Path, roots: &[&str]) -> bool {
    let path = path.to_string_lossy();
    roots
        .iter()
        .any(|r| execbox_proto::paths::is_strictly_under(&path, r))
}

/// A 400 naming `field` when `path` is longer than the kernel resolves.
fn too_long(field: &str, path: &str) -> Result<()> {
    match execbox_proto::limits::path_too_long(path) {
        Some(why) => Err(Isol8Error::BadRequest(format!("{field}: {why}"))),
        None => Ok(()),
    }
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn valid_package(name: &str) -> bool {
    // Never an option of the installer (`-r/etc/x`, `--index-url=…`).
    !name.is_empty()
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@_./-=".contains(&b))
}

/// The install command of `installPackages` for `runtime`, and the egress it gets: the hosts of
/// the registry the operator names for it (`[network.registries]`), nothing else. Adds to `env`
/// what the code needs to find the packages (as isol8 installs them under `/sandbox`).
fn install_phase(
    server: &Server,
    runtime: Runtime,
    packages: &[String],
    env: &mut BTreeMap<String, String>,
) -> Result<(Vec<String>, execbox_net::Policy)> {
    let (registry, mut argv): (&str, Vec<String>) = match runtime {
        Runtime::Python => {
            env.insert("PYTHONUSERBASE".into(), format!("{SANDBOX_DIR}/.local"));
            (
                "pypi",
                [
                    "python3",
                    "-m",
                    "pip",
                    "install",
                    "--user",
                    "--no-cache-dir",
                    "--break-system-packages",
                    "--disable-pip-version-check",
                    "--retries",
                    "0",
                    "--timeout",
                    "15",
                    "--",
                ]
                .map(str::to_string)
                .to_vec(),
            )
        }
        Runtime::Node => {
            env.insert("NODE_PATH".into(), format!("{SANDBOX_DIR}/node_modules"));
            (
                "npm",
                [
                    "npm",
                    "install",
                    "--prefix",
                    SANDBOX_DIR,
                    "--cache",
                    "/sandbox/.npm-cache",
                    "--no-audit",
                    "--no-fund",
                    "--fetch-retries",
                    "0",
                    "--",
                ]
                .map(str::to_string)
                .to_vec(),
            )
        }
        Runtime::Bun => {
            env.insert(
                "BUN_INSTALL_GLOBAL_DIR".into(),
                format!("{SANDBOX_DIR}/.bun-global"),
            );
            (
                "npm",
                ["bun", "install", "-g", "--global-dir=/sandbox/.bun-global"]
                    .map(str::to_string)
                    .to_vec(),
            )
        }
        other => {
            return Err(Isol8Error::BadRequest(format!(
                "request.installPackages: not supported for runtime {}",
                other.name()
            )))
        }
    };
    let hosts = server
        .config
        .network
        .registries
        .get(registry)
        .filter(|h| !h.is_empty())
        .ok_or_else(|| {
            Isol8Error::BadRequest(format!(
                "request.installPackages: this server names no {registry} registry for installs \
                 to reach ([network.registries] {registry} = [hosts]); use a runtime that has \
                 the packages already"
            ))
        })?;
    let rules = hosts
        .iter()
        .map(|h| execbox_net::Rule::parse(execbox_net::Action::Allow, h))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Isol8Error::Internal(format!("[network.registries] {registry}: {e}")))?;
    argv.extend(packages.iter().cloned());
    Ok((
        argv,
        execbox_net::Policy {
            default: execbox_net::Action::Deny,
            rules,
        },
    ))
}

/// Sets the egress of the sandbox `id` for the next phase (deny-all for none).
/// Sets what sandbox `id` may reach for the next phase (`None`: nothing). A sandbox started
/// without a network device (a session's first call asked for none) cannot be given one: a
/// request that needs the network there is refused rather than run without it.
fn set_network(server: &Server, id: &str, policy: Option<&execbox_net::Policy>) -> Result<()> {
    match server.net_of(id) {
        Some(net) => {
            let policy = policy
                .cloned()
                .unwrap_or_else(execbox_net::Policy::deny_all);
            net.update(|p| *p = policy, true);
            Ok(())
        }
        None if policy.is_some() => Err(Isol8Error::BadRequest(
            "network: this session's sandbox was started without network (its first request \
             asked for none); use a new sessionId for requests that need the network"
                .into(),
        )),
        None => Ok(()),
    }
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Checks an execute request against §3–§4 and the policy.
fn plan(server: &Server, tenant: &Tenant, body: &ExecuteBody) -> Result<Plan> {
    let r: &ExecutionRequest = &body.request;
    let p = &server.config.policy.for_tenant(&tenant.0);
    let (mut profile, max_output) = check_options(&body.options, p, &server.config)?;
    let network = user_network(&body.options, p)?;
    let sources = [r.code.is_some(), r.code_url.is_some(), r.cmd.is_some()];
    match sources.iter().filter(|s| **s).count() {
        0 => {
            return Err(Isol8Error::BadRequest(
                "request: one of code, codeUrl or cmd is required".into(),
            ))
        }
        1 => {}
        _ => {
            return Err(Isol8Error::BadRequest(
                "request: code, codeUrl and cmd are mutually exclusive; give exactly one".into(),
            ))
        }
    }
    if r.code_url.is_some() {
        return Err(weaker("request.codeUrl", "fetching remote code"));
    }
    let runtime_name = r
        .runtime
        .as_deref()
        .ok_or_else(|| Isol8Error::BadRequest("request.runtime: required".into()))?;
    let runtime = Runtime::parse(runtime_name)
        .ok_or_else(|| Isol8Error::BadRequest(format!("Unsupported runtime: {runtime_name}")))?;
    if !server.has_runtime(runtime.program()) && r.cmd.is_none() {
        return Err(Isol8Error::BadRequest(format!(
            "Unsupported runtime: {runtime_name} ({} is not installed on this server)",
            runtime.program()
        )));
    }
    let timeout_ms = p.timeout_ms(
        "request.timeoutMs",
        r.timeout_ms.or(body.options.timeout_ms),
        DEFAULT_TIMEOUT_MS,
    )?;
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let secrets = body.options.secrets.clone().unwrap_or_default();
    let user_env = r.env.clone().unwrap_or_default();
    if user_env.len() + secrets.len() > p.max_env {
        return Err(exceeds("request.env", format!("{} variables", p.max_env)));
    }
    for (k, v) in secrets.iter().chain(user_env.iter()) {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(Isol8Error::BadRequest(format!(
                "request.env: invalid variable name or value {k:?}"
            )));
        }
        env.insert(k.clone(), v.clone());
    }
    if let Some((name, why)) = execbox_proto::limits::env_too_large(env.iter()) {
        return Err(Isol8Error::BadRequest(format!("request.env.{name}: {why}")));
    }
    let workdir = match r.workdir.as_deref() {
        None | Some("") => PathBuf::from(SANDBOX_DIR),
        Some(w) => {
            let joined = if w.starts_with('/') {
                w.to_string()
            } else {
                format!("{SANDBOX_DIR}/{w}")
            };
            normalize(&joined)
                .filter(|p| p.starts_with(SANDBOX_DIR))
                .ok_or_else(|| {
                    Isol8Error::BadRequest(format!(
                        "request.workdir: {w:?} must resolve inside /sandbox"
                    ))
                })?
        }
    };
    too_long("request.workdir", &workdir.display().to_string())?;
    let mut files = Vec::new();
    for (path, content) in r.files.iter().flatten() {
        too_long(&format!("request.files: {path:?}"), path)?;
        let lexical = normalize(path)
            .filter(|p| inside(p, &FILE_ROOTS))
            .ok_or_else(|| {
                Isol8Error::BadRequest(format!(
                    "request.files: {path:?} must be an absolute path under /sandbox or /tmp"
                ))
            })?;
        if content.len() as u64 > p.max_file_bytes {
            return Err(Isol8Error::TooLarge(format!(
                "request.files: {path:?} is larger than {} bytes",
                p.max_file_bytes
            )));
        }
        files.push(FileContent {
            path: lexical.display().to_string(),
            content: b64(content.as_bytes()),
        });
    }
    if files.len() > p.max_files {
        return Err(exceeds("request.files", format!("{} files", p.max_files)));
    }
    let output_paths = r.output_paths.clone().unwrap_or_default();
    for path in &output_paths {
        too_long(&format!("request.outputPaths: {path:?}"), path)?;
    }
    if let Some(bad) = output_paths.iter().find(|o| normalize(o).is_none()) {
        return Err(Isol8Error::BadRequest(format!(
            "request.outputPaths: {bad:?} is not an absolute path"
        )));
    }
    let packages = r.install_packages.clone().unwrap_or_default();
    if let Some(bad) = packages.iter().find(|n| !valid_package(n)) {
        return Err(Isol8Error::BadRequest(format!(
            "request.installPackages: {bad:?} is not a valid package name"
        )));
    }
    let install = if packages.is_empty() {
        None
    } else {
        Some(install_phase(server, runtime, &packages, &mut env)?)
    };
    if network.is_some() || install.is_some() {
        server
            .network_available()
            .map_err(|why| Isol8Error::BadRequest(format!("options.network: {why}")))?;
        profile.network = true;
    }
    if let Some(ext) = &r.file_extension {
        let ok = ext.len() <= 12
            && ext.starts_with('.')
            && ext.len() > 1
            && ext[1..].bytes().all(|b| b.is_ascii_alphanumeric());
        if !ok {
            return Err(Isol8Error::BadRequest(format!(
                "request.fileExtension: {ext:?} is not an extension like \".cjs\""
            )));
        }
    }
    let inline_ok = r.stdin.is_none() && files.is_empty() && output_paths.is_empty();
    let mut program = None;
    // A program longer than one exec argument may be goes to a file instead (E2BIG otherwise).
    let fits = |text: &str| text.len() <= execbox_proto::limits::MAX_ARG_BYTES;
    let argv = match (&r.cmd, r.code.as_deref().unwrap_or_default()) {
        (Some(cmd), _) if fits(cmd) => vec!["bash".into(), "-c".into(), cmd.clone()],
        (cmd, code) => {
            let (runtime, code) = match cmd {
                Some(cmd) => (Runtime::Bash, cmd.clone()),
                None => (runtime, code.to_string()),
            };
            match runtime.inline(&code).filter(|_| inline_ok && fits(&code)) {
                Some(argv) => argv,
                None => {
                    let ext = match cmd {
                        Some(_) => runtime.extension().to_string(),
                        None => r
                            .file_extension
                            .clone()
                            .unwrap_or_else(|| runtime.extension().to_string()),
                    };
                    // Unique: runs of one session may start in the same millisecond.
                    let path = format!(
                        "{SANDBOX_DIR}/exec_{}_{}{ext}",
                        now_ms(),
                        uuid::Uuid::new_v4().simple()
                    );
                    program = Some(FileContent {
                        path: path.clone(),
                        content: b64(code.as_bytes()),
                    });
                    runtime.file(&path)
                }
            }
        }
    };
    let persistent = body.session_id.is_some();
    let run = RunRequest {
        argv,
        cwd: workdir.display().to_string(),
        create_cwd: true,
        env: env.clone(),
        stdin: r.stdin.clone(),
        timeout_ms,
        max_output_bytes: max_output,
        files,
        file_roots: FILE_ROOTS.iter().map(|s| s.to_string()).collect(),
        program,
        output_paths,
        track_changes_under: None,
        keep_background: persistent,
        stream: false,
    };
    let setup = r.setup_script.as_ref().map(|script| RunRequest {
        argv: vec!["bash".into(), "-c".into(), script.clone()],
        cwd: SANDBOX_DIR.into(),
        env: env.clone(),
        timeout_ms,
        max_output_bytes: max_output,
        keep_background: persistent,
        ..Default::default()
    });
    let install = install.map(|(argv, policy)| {
        (
            RunRequest {
                argv,
                cwd: SANDBOX_DIR.into(),
                env: env.clone(),
                timeout_ms,
                max_output_bytes: max_output,
                keep_background: false,
                ..Default::default()
            },
            policy,
        )
    });
    Ok(Plan {
        runtime,
        profile,
        run,
        setup,
        install,
        network,
        secrets: secrets.into_values().filter(|v| !v.is_empty()).collect(),
        max_output,
    })
}

/// Replaces secret values with `***`, also when a value is split across chunks: the last
/// `longest - 1` bytes are held back until more output (or the end) shows what they are.
struct Masker {
    secrets: Vec<String>,
    held: String,
}

impl Masker {
    fn new(secrets: Vec<String>) -> Self {
        Self {
            secrets,
            held: String::new(),
        }
    }

    fn mask(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in &self.secrets {
            out = out.replace(s.as_str(), "***");
        }
        out
    }

    fn feed(&mut self, chunk: &str) -> String {
        if self.secrets.is_empty() {
            return chunk.to_string();
        }
        self.held.push_str(chunk);
        let masked = self.mask(&self.held);
        let keep = self.secrets.iter().map(String::len).max().unwrap_or(1) - 1;
        let mut cut = masked.len().saturating_sub(keep);
        while !masked.is_char_boundary(cut) {
            cut -= 1;
        }
        self.held = masked[cut..].to_string();
        masked[..cut].to_string()
    }

    fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.held);
        self.mask(&rest)
    }
}

/// Where a run happens: a pooled one-shot sandbox (destroyed after) or a session's.
enum Slot {
    OneShot(Arc<Server>, String),
    Session(Lease),
}

impl Slot {
    fn sandbox(&self) -> &str {
        match self {
            Slot::OneShot(_, id) => id,
            Slot::Session(l) => &l.sandbox,
        }
    }
}

/// Longest the removal of a one-shot sandbox waits for the other runs in progress.
const DESTROY_DEFER: std::time::Duration = std::time::Duration::from_millis(500);

impl Drop for Slot {
    fn drop(&mut self) {
        if let Slot::OneShot(server, id) = self {
            WarmPool::release(server, id);
            let (server, id) = (server.clone(), std::mem::take(id));
            tokio::spawn(async move {
                // While other one-shot runs are in progress (a burst), the removal waits for
                // them, at most `DESTROY_DEFER`: it is the server's own CPU work, which the runs
                // still waiting for the CPUs would pay for. The run's processes are gone already.
                let deadline = tokio::time::Instant::now() + DESTROY_DEFER;
                while server.pool.runs_in_progress() > 0
                    && !server.pool.is_stopping()
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                match server.destroy(&id, "oneshot_done").await {
                    // A stopping server removed it first.
                    Ok(()) | Err(crate::lifecycle::LifecycleError::NotFound(_)) => {}
                    Err(e) => {
                        tracing::warn!(sandbox = %id, error = %e, "removing a one-shot sandbox")
                    }
                }
            });
        }
    }
}

fn check_session_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > MAX_SESSION_ID {
        return Err(Isol8Error::BadRequest(format!(
            "sessionId: must be 1 to {MAX_SESSION_ID} characters"
        )));
    }
    Ok(())
}

fn session_key(tenant: &Tenant, id: &str) -> SessionKey {
    SessionKey {
        surface: Surface::Isol8,
        tenant: tenant.0.clone(),
        id: id.to_string(),
    }
}

async fn acquire(
    server: &Arc<Server>,
    tenant: &Tenant,
    plan: &Plan,
    session: Option<&str>,
) -> Result<Slot> {
    match session {
        None => {
            let rec = WarmPool::acquire(server, &plan.profile, &tenant.0).await?;
            Ok(Slot::OneShot(server.clone(), rec.id))
        }
        Some(id) => {
            let key = session_key(tenant, id);
            let profile = plan.profile.clone();
            let mut lease = Sessions::open(server, &key, || LaunchSpec {
                tenant: tenant.0.clone(),
                owner: None,
                image_uri: Some(profile.template.clone()),
                root: crate::images::RootSource::Template(profile.template.clone()),
                entrypoint: Vec::new(),
                env: BTreeMap::new(),
                metadata: BTreeMap::new(),
                limits: profile.limits,
                expires_at: None,
                network: profile.network.then(execbox_net::Policy::deny_all),
                template: None,
                volumes: Vec::new(),
                named_volumes: Vec::new(),
                renew_on_access_secs: None,
            })
            .await?;
            if let Err(bound) = lease.bind_runtime(plan.runtime.name()) {
                return Err(Isol8Error::BadRequest(format!(
                    "Cannot switch runtime from {bound} to {} in session {id:?}",
                    plan.runtime.name()
                )));
            }
            Ok(Slot::Session(lease))
        }
    }
}

fn timestamp() -> String {
    let f = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(&f)
        .unwrap_or_default()
}

/// A stream's text as isol8 returns it: masked, cut with the truncation marker, trimmed.
fn finish_stream(text: &str, total: u64, max: u64, masker: &Masker) -> String {
    let masked = masker.mask(text);
    let trimmed = masked.trim_end();
    if total > text.len() as u64 {
        format!("{trimmed}\n\n--- OUTPUT TRUNCATED ({total} bytes, limit: {max}) ---")
    } else {
        trimmed.to_string()
    }
}

fn to_result(plan: &Plan, r: RunResult, sandbox: &str) -> ExecutionResult {
    let masker = Masker::new(plan.secrets.clone());
    let truncated = r.truncated();
    let stdout = finish_stream(&r.stdout, r.stdout_bytes, plan.max_output, &masker);
    let mut stderr = finish_stream(&r.stderr, r.stderr_bytes, plan.max_output, &masker);
    if r.timed_out {
        stderr.push_str("\n--- EXECUTION TIMED OUT ---");
    }
    ExecutionResult {
        stdout,
        stderr,
        exit_code: r.exit_code,
        duration_ms: r.duration_ms,
        truncated,
        execution_id: uuid::Uuid::new_v4().to_string(),
        runtime: plan.runtime.name().to_string(),
        timestamp: timestamp(),
        container_id: Some(sandbox.to_string()),
        files: (!plan.run.output_paths.is_empty()).then_some(r.files),
        timed_out: r.timed_out,
        oom_killed: r.oom_killed,
    }
}

/// `POST /execute`.
#[utoipa::path(
    post,
    path = "/execute",
    operation_id = "isol8Execute",
    tag = "isol8",
    description = "Runs code once (a sandbox of the warm pool) or in the caller's persistent session (`sessionId`).",
    request_body = ExecuteBody,
    responses(
        (status = 200, description = "The run's result (a failed install or setup script is a result too).", body = ExecutionResult),
        (status = 400, description = "The request is invalid or asks for more than the policy allows; the message names the option.", body = ErrorBody),
        (status = 401, description = "No `Authorization` header while the server has keys.", body = ErrorBody),
        (status = 403, description = "A key the server does not know.", body = ErrorBody),
        (status = 404, description = "No such session, or a file the run needs is missing.", body = ErrorBody),
        (status = 413, description = "The body is larger than the server accepts.", body = ErrorBody),
        (status = 429, description = "The tenant's runs or sessions are at their cap.", body = ErrorBody),
        (status = 500, description = "execbox failed.", body = ErrorBody),
    ),
    security(("bearer" = []), ())
)]
async fn execute(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let body: ExecuteBody = parse(&body_bytes(body)?)?;
    if let Some(id) = &body.session_id {
        check_session_id(id)?;
    }
    let t0 = std::time::Instant::now();
    let plan = plan(&server, &tenant, &body)?;
    let _permit = admit(&server, &tenant)?;
    let slot = acquire(&server, &tenant, &plan, body.session_id.as_deref()).await?;
    let t_acquired = t0.elapsed();
    let socket = server.socket_path(slot.sandbox())?;
    if let Some((install, registries)) = &plan.install {
        set_network(&server, slot.sandbox(), Some(registries))?;
        let r = agent_run::run(&socket, install).await?;
        if r.exit_code != 0 {
            set_network(&server, slot.sandbox(), None)?;
            let mut result = to_result(&plan, r, slot.sandbox());
            result.stderr.push_str("\n--- PACKAGE INSTALL FAILED ---");
            return Ok(Json(result).into_response());
        }
    }
    set_network(&server, slot.sandbox(), plan.network.as_ref())?;
    if let Some(setup) = &plan.setup {
        let r = agent_run::run(&socket, setup).await?;
        if r.exit_code != 0 {
            let mut result = to_result(&plan, r, slot.sandbox());
            result.stderr.push_str("\n--- SETUP SCRIPT FAILED ---");
            return Ok(Json(result).into_response());
        }
    }
    let t_run = std::time::Instant::now();
    let r = agent_run::run(&socket, &plan.run).await?;
    tracing::debug!(
        acquire_us = t_acquired.as_micros() as u64,
        run_call_us = t_run.elapsed().as_micros() as u64,
        run_ms = r.duration_ms,
        prestarted = r.prestarted,
        "isol8 execute"
    );
    let usage = [
        (PRESTARTED_HEADER, r.prestarted.to_string()),
        (MEMORY_PEAK_HEADER, r.memory_peak_bytes.to_string()),
        (CPU_TIME_HEADER, r.cpu_time_ms.to_string()),
    ];
    let mut resp = Json(to_result(&plan, r, slot.sandbox())).into_response();
    // Which path served the run (a pre-started interpreter or a fresh process) and the run's
    // own accounting: for operators, and the tests that compare the two paths.
    for (name, value) in usage {
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(name, v);
        }
    }
    Ok(resp)
}

/// Response header of `/execute`: whether a pre-started interpreter ran the code.
pub const PRESTARTED_HEADER: &str = "x-execbox-prestarted";
/// Response header of `/execute`: the run's peak memory (its execution cgroup), bytes.
pub const MEMORY_PEAK_HEADER: &str = "x-execbox-memory-peak-bytes";
/// Response header of `/execute`: the run's CPU time (its execution cgroup), milliseconds.
pub const CPU_TIME_HEADER: &str = "x-execbox-cpu-time-ms";

/// `POST /execute/stream`: always one-shot (a `sessionId` is ignored, as upstream).
#[utoipa::path(
    post,
    path = "/execute/stream",
    operation_id = "isol8ExecuteStream",
    tag = "isol8",
    description = "Runs code once and streams its events as SSE (`data: {\"type\",\"data\",\"phase\"}` frames); a `sessionId` is ignored.",
    request_body = ExecuteBody,
    responses(
        (status = 200, description = "Server-sent events, one `StreamEvent` per frame.", content_type = "text/event-stream", body = serde_json::Value),
        (status = 400, description = "The request is invalid or asks for more than the policy allows; the message names the option.", body = ErrorBody),
        (status = 401, description = "No `Authorization` header while the server has keys.", body = ErrorBody),
        (status = 403, description = "A key the server does not know.", body = ErrorBody),
        (status = 413, description = "The body is larger than the server accepts.", body = ErrorBody),
        (status = 429, description = "The tenant's runs are at their cap.", body = ErrorBody),
        (status = 500, description = "execbox failed.", body = ErrorBody),
    ),
    security(("bearer" = []), ())
)]
async fn execute_stream(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let mut body: ExecuteBody = parse(&body_bytes(body)?)?;
    body.session_id = None;
    let plan = plan(&server, &tenant, &body)?;
    let permit = admit(&server, &tenant)?;
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let _permit = permit;
        let mut out = StreamOut::new(tx, |ev| Bytes::from(ev.to_sse()));
        out.run(&server, &tenant, &plan).await;
    });
    let mut resp = crate::sse_response(rx);
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    Ok(resp)
}

/// Where a streamed run's events go: SSE frames or WebSocket messages, as `frame` encodes them.
struct StreamOut {
    tx: mpsc::Sender<Bytes>,
    gone: bool,
    frame: fn(&StreamEvent) -> Bytes,
}

impl StreamOut {
    fn new(tx: mpsc::Sender<Bytes>, frame: fn(&StreamEvent) -> Bytes) -> Self {
        Self {
            tx,
            gone: false,
            frame,
        }
    }

    /// The whole one-shot run; a failure ends the events with an `error`.
    async fn run(&mut self, server: &Arc<Server>, tenant: &Tenant, plan: &Plan) {
        if let Err(e) = stream_run(server, tenant, plan, self).await {
            tracing::warn!(error = %e, "isol8 stream failed");
            self.send("error", e.to_string(), None).await;
        }
    }

    async fn send(&mut self, kind: &str, data: String, phase: Option<&str>) {
        if self.gone || (data.is_empty() && matches!(kind, "stdout" | "stderr")) {
            return;
        }
        let ev = StreamEvent {
            kind: kind.into(),
            data,
            phase: phase.map(str::to_string),
        };
        let sent = tokio::time::timeout(crate::CLIENT_STALL, self.tx.send((self.frame)(&ev))).await;
        if !matches!(sent, Ok(Ok(()))) {
            // The client left, or takes nothing: the run still ends (and its sandbox is
            // removed) normally.
            self.gone = true;
        }
    }
}

/// Runs one phase, forwarding its output; returns its outcome.
async fn stream_phase(
    socket: &Path,
    req: &RunRequest,
    phase: &str,
    secrets: &[String],
    out: &mut StreamOut,
) -> Result<RunResult> {
    let mut events = agent_run::run_stream(socket, req).await?;
    let mut so = Masker::new(secrets.to_vec());
    let mut se = Masker::new(secrets.to_vec());
    while let Some(ev) = events.recv().await {
        match ev {
            RunEvent::Stdout { data } => out.send("stdout", so.feed(&data), Some(phase)).await,
            RunEvent::Stderr { data } => out.send("stderr", se.feed(&data), Some(phase)).await,
            RunEvent::Result { result } => {
                out.send("stdout", so.finish(), Some(phase)).await;
                out.send("stderr", se.finish(), Some(phase)).await;
                return Ok(result);
            }
            RunEvent::Error { message } => return Err(Isol8Error::Internal(message)),
        }
    }
    Err(Isol8Error::Internal(
        "the sandbox stopped before the run finished".into(),
    ))
}

async fn stream_run(
    server: &Arc<Server>,
    tenant: &Tenant,
    plan: &Plan,
    out: &mut StreamOut,
) -> Result<()> {
    let slot = acquire(server, tenant, plan, None).await?;
    let socket = server.socket_path(slot.sandbox())?;
    if let Some((install, registries)) = &plan.install {
        set_network(server, slot.sandbox(), Some(registries))?;
        let r = stream_phase(&socket, install, "install", &plan.secrets, out).await?;
        if r.exit_code != 0 {
            set_network(server, slot.sandbox(), None)?;
            out.send(
                "error",
                format!("package install failed with exit code {}", r.exit_code),
                Some("install"),
            )
            .await;
            return Ok(());
        }
    }
    set_network(server, slot.sandbox(), plan.network.as_ref())?;
    if let Some(setup) = &plan.setup {
        let r = stream_phase(&socket, setup, "setup", &plan.secrets, out).await?;
        if r.exit_code != 0 {
            out.send(
                "error",
                format!("setup script failed with exit code {}", r.exit_code),
                Some("setup"),
            )
            .await;
            return Ok(());
        }
    }
    let r = stream_phase(&socket, &plan.run, "code", &plan.secrets, out).await?;
    if r.timed_out {
        out.send("error", "EXECUTION TIMED OUT".into(), None).await;
    }
    out.send("exit", r.exit_code.to_string(), None).await;
    Ok(())
}

fn admit(server: &Arc<Server>, tenant: &Tenant) -> Result<crate::concurrency::RunPermit> {
    crate::concurrency::RunGate::admit(server, &tenant.0).map_err(|max| {
        Isol8Error::TooMany(format!(
            "too many concurrent executions: at most {max} for this API key"
        ))
    })
}

/// `GET /execute/ws`: the first text message is `{"type":"execute","request",…}`; every event
/// of the one-shot run is then one message, and the socket closes with 1000 `Execution
/// complete`. `stdin` and `signal` messages are accepted and ignored, as upstream; invalid JSON
/// gets an `error` event and close code 1003.
#[utoipa::path(
    get,
    path = "/execute/ws",
    operation_id = "isol8ExecuteWebSocket",
    tag = "isol8",
    description = "WebSocket: the first text message is `{\"type\":\"execute\",\"request\",…}`; each event of the one-shot run is then one message.",
    responses(
        (status = 101, description = "Switched to the WebSocket protocol."),
        (status = 400, description = "Not a WebSocket upgrade request.", content_type = "text/plain", body = String),
        (status = 401, description = "No `Authorization` header while the server has keys.", body = ErrorBody),
        (status = 403, description = "A key the server does not know.", body = ErrorBody),
        (status = 405, description = "Not a GET (axum's answer)."),
        (status = 426, description = "An upgrade other than WebSocket was asked for.", content_type = "text/plain", body = String),
    ),
    security(("bearer" = []), ())
)]
async fn execute_ws(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> Response {
    ws.on_upgrade(move |socket| ws_session(server, tenant, socket))
}

async fn ws_session(server: Arc<Server>, tenant: Tenant, mut socket: axum::extract::ws::WebSocket) {
    use axum::extract::ws::{CloseFrame, Message};
    let json = |kind: &str, data: String| {
        let ev = StreamEvent {
            kind: kind.into(),
            data,
            phase: None,
        };
        Message::Text(serde_json::to_string(&ev).unwrap_or_default().into())
    };
    let close = |code: u16, reason: &'static str| {
        Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }))
    };
    let text = loop {
        match socket.recv().await {
            Some(Ok(Message::Text(t))) => break t,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
            Some(Ok(_)) => continue,
        }
    };
    let started = serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|e| (1003, format!("invalid JSON: {e}")))
        .and_then(|v| match v.get("type").and_then(|t| t.as_str()) {
            Some("execute") => {
                parse::<ExecuteBody>(text.as_bytes()).map_err(|e| (1008, e.to_string()))
            }
            _ => Err((
                1003,
                "the first message must have type \"execute\"".to_string(),
            )),
        })
        .and_then(|mut body| {
            body.session_id = None;
            let plan = plan(&server, &tenant, &body).map_err(|e| (1008, e.to_string()))?;
            let permit = admit(&server, &tenant).map_err(|e| (1008, e.to_string()))?;
            Ok((plan, permit))
        });
    let (plan, permit) = match started {
        Ok(p) => p,
        Err((code, message)) => {
            let _ = socket.send(json("error", message)).await;
            let reason = if code == 1003 {
                "Invalid message"
            } else {
                "Request refused"
            };
            let _ = socket.send(close(code, reason)).await;
            return;
        }
    };
    let (tx, mut rx) = mpsc::channel::<Bytes>(64);
    let run_server = server.clone();
    let run = tokio::spawn(async move {
        let _permit = permit;
        let mut out = StreamOut::new(tx, |ev| {
            Bytes::from(serde_json::to_vec(ev).unwrap_or_default())
        });
        out.run(&run_server, &tenant, &plan).await;
    });
    loop {
        tokio::select! {
            frame = rx.recv() => match frame {
                Some(b) => {
                    let text = String::from_utf8_lossy(&b).into_owned();
                    let sent = tokio::time::timeout(
                        crate::CLIENT_STALL,
                        socket.send(Message::Text(text.into())),
                    )
                    .await;
                    if !matches!(sent, Ok(Ok(()))) {
                        break;
                    }
                }
                None => {
                    let _ = socket.send(close(1000, "Execution complete")).await;
                    break;
                }
            },
            // stdin and signal messages are accepted and ignored; a closed socket ends only
            // the forwarding (the run ends by itself and its sandbox is removed).
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
        }
    }
    drop(rx);
    let _ = run.await;
}

async fn session_lease(server: &Arc<Server>, tenant: &Tenant, id: &str) -> Result<Lease> {
    Sessions::get(server, &session_key(tenant, id))
        .ok_or_else(|| Isol8Error::NotFound("Session not found".into()))
}

/// `POST /file`.
#[utoipa::path(
    post,
    path = "/file",
    operation_id = "isol8PutFile",
    tag = "isol8",
    description = "Writes one file (base64 content) into a session's sandbox.",
    request_body = PutFileBody,
    responses(
        (status = 200, description = "Written.", body = crate::openapi::schemas::Isol8Ok),
        (status = 400, description = "The request is invalid or asks for more than the policy allows; the message names the option.", body = ErrorBody),
        (status = 401, description = "No `Authorization` header while the server has keys.", body = ErrorBody),
        (status = 403, description = "A key the server does not know.", body = ErrorBody),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 413, description = "The body is larger than the server accepts.", body = ErrorBody),
        (status = 500, description = "execbox failed.", body = ErrorBody),
    ),
    security(("bearer" = []), ())
)]
async fn put_file(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>> {
    let body: PutFileBody = parse(&body_bytes(body)?)?;
    let lease = session_lease(&server, &tenant, &body.session_id).await?;
    let data = base64::engine::general_purpose::STANDARD
        .decode(body.content.as_bytes())
        .map_err(|e| Isol8Error::BadRequest(format!("content: invalid base64: {e}")))?;
    too_long("path", &body.path)?;
    let path = normalize(&body.path)
        .filter(|p| inside(p, &PUT_FILE_ROOTS))
        .ok_or_else(|| {
            Isol8Error::BadRequest(format!(
                "path: {:?} must be an absolute path in a writable area ({})",
                body.path,
                PUT_FILE_ROOTS.join(", ")
            ))
        })?;
    let socket = server.socket_path(&lease.sandbox)?;
    agent_run::write_files(
        &socket,
        &execbox_proto::run::WriteFilesRequest {
            files: vec![FileContent {
                path: path.display().to_string(),
                content: b64(&data),
            }],
            roots: PUT_FILE_ROOTS.iter().map(|s| s.to_string()).collect(),
        },
    )
    .await?;
    Ok(Json(serde_json::json!({"ok": true})))
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileQuery {
    session_id: Option<String>,
    path: Option<String>,
}

/// `GET /file?sessionId=&path=`.
#[utoipa::path(
    get,
    path = "/file",
    operation_id = "isol8GetFile",
    tag = "isol8",
    description = "Reads one file of a session's sandbox, base64.",
    params(
        ("sessionId" = String, Query, description = "Session id."),
        ("path" = String, Query, description = "Absolute path inside the sandbox."),
    ),
    responses(
        (status = 200, description = "The content.", body = crate::openapi::schemas::Isol8FileContent),
        (status = 400, description = "`sessionId` or `path` missing, or a path over the kernel's limits.", body = ErrorBody),
        (status = 401, description = "No `Authorization` header while the server has keys.", body = ErrorBody),
        (status = 403, description = "A key the server does not know.", body = ErrorBody),
        (status = 404, description = "No such session or file.", body = ErrorBody),
        (status = 413, description = "The file is larger than the tenant's `max_file_bytes`.", body = ErrorBody),
        (status = 500, description = "execbox failed.", body = ErrorBody),
    ),
    security(("bearer" = []), ())
)]
async fn get_file(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    query: std::result::Result<Query<FileQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>> {
    let missing = || Isol8Error::BadRequest("Missing sessionId or path".into());
    let Query(q) = query.map_err(|_| missing())?;
    let (Some(id), Some(path)) = (
        q.session_id.filter(|s| !s.is_empty()),
        q.path.filter(|p| !p.is_empty()),
    ) else {
        return Err(missing());
    };
    too_long("path", &path)?;
    let lease = session_lease(&server, &tenant, &id).await?;
    let socket = server.socket_path(&lease.sandbox)?;
    let max = server.config.policy.for_tenant(&tenant.0).max_file_bytes;
    match agent_run::read_file(&socket, &path, max).await? {
        Some(data) => Ok(Json(serde_json::json!({"content": b64(&data)}))),
        None => Err(Isol8Error::NotFound("File not found".into())),
    }
}

/// `GET /sessions`: the caller's sessions only.
#[utoipa::path(
    get,
    path = "/sessions",
    operation_id = "isol8ListSessions",
    tag = "isol8",
    description = "The caller's sessions.",
    responses(
        (status = 200, description = "The sessions.", body = crate::openapi::schemas::Isol8Sessions),
        (status = 401, description = "No `Authorization` header while the server has keys.", body = ErrorBody),
        (status = 403, description = "A key the server does not know.", body = ErrorBody),
    ),
    security(("bearer" = []), ())
)]
async fn list_sessions(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
) -> Json<serde_json::Value> {
    let sessions: Vec<serde_json::Value> = server
        .sessions
        .list(Surface::Isol8, &tenant.0)
        .into_iter()
        .map(|s| {
            serde_json::json!({"id": s.id, "isActive": s.active, "lastAccessedAt": s.last_used_ms})
        })
        .collect();
    Json(serde_json::json!({ "sessions": sessions }))
}

/// `DELETE /session/{id}`: idempotent; another tenant's session is left alone.
#[utoipa::path(
    delete,
    path = "/session/{id}",
    operation_id = "isol8DeleteSession",
    tag = "isol8",
    description = "Ends a session and removes its sandbox; idempotent.",
    params(
        ("id" = String, Path, description = "Session id."),
    ),
    responses(
        (status = 200, description = "Gone (or was never there).", body = crate::openapi::schemas::Isol8Ok),
        (status = 401, description = "No `Authorization` header while the server has keys.", body = ErrorBody),
        (status = 403, description = "A key the server does not know.", body = ErrorBody),
    ),
    security(("bearer" = []), ())
)]
async fn delete_session(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    UrlPath(id): UrlPath<String>,
) -> Json<serde_json::Value> {
    Sessions::remove(&server, &session_key(&tenant, &id)).await;
    Json(serde_json::json!({"ok": true}))
}

/// `POST /session/{id}/signal` (`{"signal":"SIGTERM"}`): to every process of the session.
#[utoipa::path(
    post,
    path = "/session/{id}/signal",
    operation_id = "isol8SignalSession",
    tag = "isol8",
    description = "Sends a signal (default `SIGTERM`) to every process of a session.",
    params(
        ("id" = String, Path, description = "Session id."),
    ),
    request_body(content = crate::openapi::schemas::Isol8SignalBody, description = "An empty body means `SIGTERM`."),
    responses(
        (status = 200, description = "Sent.", body = crate::openapi::schemas::Isol8Signalled),
        (status = 400, description = "An unknown signal, or no running sandbox for the session.", body = ErrorBody),
        (status = 401, description = "No `Authorization` header while the server has keys.", body = ErrorBody),
        (status = 403, description = "A key the server does not know.", body = ErrorBody),
        (status = 404, description = "No such session.", body = ErrorBody),
        (status = 413, description = "The body is larger than the server accepts.", body = ErrorBody),
        (status = 500, description = "execbox failed.", body = ErrorBody),
    ),
    security(("bearer" = []), ())
)]
async fn signal_session(
    State(server): State<Arc<Server>>,
    Extension(tenant): Extension<Tenant>,
    UrlPath(id): UrlPath<String>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>> {
    #[derive(serde::Deserialize)]
    struct SignalBody {
        signal: Option<String>,
    }
    let body = body_bytes(body)?;
    let name = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        parse::<SignalBody>(&body)?.signal
    }
    .unwrap_or_else(|| "SIGTERM".to_string());
    use nix::sys::signal::Signal;
    const ALLOWED: [Signal; 7] = [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGKILL,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ];
    let number = name
        .parse::<Signal>()
        .ok()
        .filter(|s| ALLOWED.contains(s))
        .ok_or_else(|| {
            Isol8Error::BadRequest(format!(
                "signal: {name:?} is not one of SIGTERM, SIGINT, SIGKILL, SIGHUP, SIGQUIT, \
                 SIGUSR1, SIGUSR2"
            ))
        })? as i32;
    let lease = session_lease(&server, &tenant, &id).await?;
    let socket = server.socket_path(&lease.sandbox)?;
    match agent_run::kill(&socket, execbox_proto::run::EVERY_PROCESS, number).await {
        Err(e) if e.is_not_found() => {
            return Err(Isol8Error::BadRequest(
                "No running container for session".into(),
            ))
        }
        other => other?,
    }
    Ok(Json(
        serde_json::json!({"ok": true, "signal": name, "containerId": lease.sandbox}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masker_catches_a_secret_split_across_chunks() {
        let mut m = Masker::new(vec!["hunter2".into()]);
        let mut out = m.feed("pass: hun");
        out.push_str(&m.feed("ter2 ok"));
        out.push_str(&m.finish());
        assert_eq!(out, "pass: *** ok");
    }

    #[test]
    fn workdir_and_files_stay_inside_their_roots() {
        assert!(inside(&normalize("/sandbox/a").unwrap(), &FILE_ROOTS));
        assert!(!inside(
            &normalize("/sandbox/../etc/x").unwrap(),
            &FILE_ROOTS
        ));
        assert!(!inside(&normalize("/tmp").unwrap(), &FILE_ROOTS));
        assert!(normalize("relative").is_none());
    }

    #[test]
    fn truncation_marker_names_the_sizes() {
        let m = Masker::new(Vec::new());
        assert_eq!(
            finish_stream("abc", 10, 3, &m),
            "abc\n\n--- OUTPUT TRUNCATED (10 bytes, limit: 3) ---"
        );
        assert_eq!(finish_stream("hello\n\n", 7, 100, &m), "hello");
    }

    #[test]
    fn package_names_follow_isol8s_pattern() {
        assert!(valid_package("numpy==1.26"));
        assert!(valid_package("@types/node"));
        assert!(!valid_package("x; rm -rf /"));
        assert!(!valid_package(""));
    }
}
