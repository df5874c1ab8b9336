//! The agent's OpenAPI documents (execd and Leap0), generated from the handlers'
//! `#[utoipa::path]` attributes. The agent does not serve them: the server does, at
//! `/openapi/execd.json`, `/openapi/leap0.json` and merged into `/openapi.json` under the proxy
//! path clients call (`execbox_server::openapi`).

use utoipa::OpenApi;

/// Wire shapes the handlers build with `json!` or keep private: described here, for the
/// documents only.
pub mod schemas {
    use std::collections::BTreeMap;

    use utoipa::ToSchema;

    /// Body of `POST /session`.
    #[derive(ToSchema)]
    pub struct SessionCreate {
        /// Working directory.
        pub cwd: Option<String>,
    }

    /// Answer of `POST /session`.
    #[derive(ToSchema)]
    pub struct SessionCreated {
        /// Session id.
        pub session_id: String,
    }

    /// Body of `POST /session/{id}/run`.
    #[derive(ToSchema)]
    pub struct SessionRun {
        /// Command.
        pub command: String,
        /// Working directory.
        pub cwd: Option<String>,
        /// Timeout in milliseconds.
        pub timeout: Option<i64>,
    }

    /// Body of `POST /code/context`.
    #[derive(ToSchema)]
    pub struct CodeContextCreate {
        /// `python`, `javascript`, `typescript`, `java`, `bash`…
        pub language: Option<String>,
        /// Working directory.
        pub cwd: Option<String>,
    }

    /// A code context.
    #[derive(ToSchema)]
    pub struct CodeContext {
        /// Context id.
        pub id: String,
        /// Language.
        pub language: String,
        /// Working directory (on creation).
        pub cwd: Option<String>,
    }

    /// The context of `POST /code`.
    #[derive(ToSchema)]
    pub struct CodeRunContext {
        /// Context id.
        pub id: Option<String>,
        /// Language (its default context when no id).
        pub language: Option<String>,
    }

    /// Body of `POST /code`.
    #[derive(ToSchema)]
    pub struct CodeRun {
        /// Source.
        pub code: String,
        /// Where to run it.
        pub context: Option<CodeRunContext>,
    }

    /// The execd `Metrics` object.
    #[derive(ToSchema)]
    pub struct Metrics {
        /// CPUs.
        pub cpu_count: u64,
        /// CPU use, percent.
        pub cpu_used_pct: f64,
        /// Memory limit, MiB.
        pub mem_total_mib: f64,
        /// Memory used, MiB.
        pub mem_used_mib: f64,
        /// Unix milliseconds.
        pub timestamp: i64,
    }

    /// Body of `POST /pty` (optional).
    #[derive(ToSchema)]
    pub struct PtyCreate {
        /// Working directory.
        pub cwd: Option<String>,
        /// Command (default: a login shell).
        pub command: Option<String>,
    }

    /// Answer of `POST /pty`.
    #[derive(ToSchema)]
    pub struct PtyCreated {
        /// Session id.
        pub session_id: String,
    }

    /// Answer of `GET /pty/{id}`.
    #[derive(ToSchema)]
    pub struct PtyStatus {
        /// Session id.
        pub session_id: String,
        /// The command still runs.
        pub running: bool,
        /// Bytes of output so far.
        pub output_offset: u64,
    }

    /// One file's information.
    #[derive(ToSchema)]
    #[schema(as = ExecdFileInfo)]
    pub struct FileInfo {
        /// Absolute path.
        pub path: String,
        /// `file`, `directory`, `symlink` or `other`.
        #[schema(rename = "type")]
        pub kind: String,
        /// Size in bytes.
        pub size: u64,
        /// mtime, RFC 3339.
        pub modified_at: String,
        /// ctime, RFC 3339.
        pub created_at: String,
        /// Owner.
        pub owner: String,
        /// Group.
        pub group: String,
        /// Permission bits, octal digits read as decimal.
        pub mode: u32,
    }

    /// Owner, group and mode to set.
    #[derive(ToSchema)]
    pub struct Permission {
        /// User name or uid.
        pub owner: Option<String>,
        /// Group name or gid.
        pub group: Option<String>,
        /// Octal digits read as decimal (755).
        pub mode: Option<i64>,
    }

    /// One move.
    #[derive(ToSchema)]
    pub struct MoveItem {
        /// Source.
        pub src: String,
        /// Destination.
        pub dest: String,
    }

    /// One replacement.
    #[derive(ToSchema)]
    pub struct ReplaceItem {
        /// Text to find.
        pub old: String,
        /// Its replacement.
        pub new: String,
    }

    /// Answer of `POST /files/replace`.
    #[derive(ToSchema)]
    pub struct Replaced {
        /// Occurrences replaced.
        #[schema(rename = "replacedCount")]
        pub replaced_count: u64,
    }

    /// Leap0's `{"message"}`.
    #[derive(ToSchema)]
    pub struct Leap0Message {
        /// What went wrong.
        pub message: String,
    }

    /// One field at fault.
    #[derive(ToSchema)]
    pub struct Leap0FieldError {
        /// Field.
        pub field: String,
        /// Why.
        pub error: String,
    }

    /// Leap0's validation error.
    #[derive(ToSchema)]
    pub struct Leap0Invalid {
        /// `Invalid request`.
        pub message: String,
        /// The fields at fault.
        pub errors: Vec<Leap0FieldError>,
    }

    /// Body of `POST /contexts`.
    #[derive(ToSchema)]
    pub struct Leap0ContextCreate {
        /// `python` (default) or `typescript`.
        pub language: Option<String>,
        /// Working directory.
        pub cwd: Option<String>,
    }

    /// A Leap0 context.
    #[derive(ToSchema)]
    pub struct Leap0Context {
        /// Context id.
        pub id: String,
        /// Language number.
        pub language: i64,
        /// Working directory.
        pub cwd: String,
    }

    /// Answer of `GET /contexts`.
    #[derive(ToSchema)]
    pub struct Leap0Contexts {
        /// Contexts.
        pub items: Vec<Leap0Context>,
    }

    /// Body of `POST /execute` and `POST /execute/async`.
    #[derive(ToSchema)]
    pub struct Leap0Execute {
        /// Source.
        pub code: String,
        /// `python` or `typescript`.
        pub language: Option<String>,
        /// Context to run in.
        pub context_id: Option<String>,
        /// Timeout in milliseconds.
        pub timeout_ms: Option<u64>,
        /// Environment.
        pub env_vars: Option<BTreeMap<String, String>>,
    }

    /// Output lines.
    #[derive(ToSchema)]
    pub struct Leap0Logs {
        /// Standard output lines.
        pub stdout: Vec<String>,
        /// Standard error lines.
        pub stderr: Vec<String>,
    }

    /// An execution.
    #[derive(ToSchema)]
    pub struct Leap0Execution {
        /// The context it ran in.
        pub context_id: String,
        /// Rich results (`text`, `html`, `png`…, `is_primary`).
        pub items: Vec<serde_json::Value>,
        /// Output.
        pub logs: Leap0Logs,
        /// The error, when it raised one.
        pub error: Option<serde_json::Value>,
        /// Execution counter.
        pub execution_count: Option<u64>,
    }

    /// `{"status": "ok"}`.
    #[derive(ToSchema)]
    pub struct Leap0Health {
        /// `ok`.
        pub status: String,
    }
}

/// `GET /ping` (an inline closure in the router).
#[utoipa::path(get, path = "/ping", operation_id = "execdPing", tag = "execd",
    description = "The agent is up.", responses((status = 200, description = "Up.")))]
#[allow(dead_code)]
fn ping_doc() {}

/// `GET /healthz` (an inline closure in the router).
#[utoipa::path(get, path = "/healthz", operation_id = "leap0Health", tag = "leap0",
    description = "The agent is up.",
    responses((status = 200, description = "Up.", body = schemas::Leap0Health)))]
#[allow(dead_code)]
fn healthz_doc() {}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "execbox execd API",
        description = "The OpenSandbox execd API of a sandbox, served by its agent and reached \
            through the execbox server's proxy."
    ),
    paths(
        ping_doc,
        crate::command::run,
        crate::command::status,
        crate::command::logs,
        crate::command::interrupt,
        crate::command::interrupt_path,
        crate::session::create,
        crate::session::run,
        crate::session::remove,
        crate::code::run,
        crate::code::create_context,
        crate::code::list_contexts,
        crate::code::delete_contexts_by_language,
        crate::code::get_context,
        crate::code::delete_context,
        crate::files::info::info,
        crate::files::ops::delete_files,
        crate::files::ops::permissions,
        crate::files::ops::move_files,
        crate::files::ops::replace,
        crate::files::tree::search,
        crate::files::tree::list,
        crate::files::tree::make_directories,
        crate::files::tree::remove_directories,
        crate::files::download::download,
        crate::files::upload::upload,
        crate::metrics::metrics,
        crate::metrics::watch,
        crate::pty::create,
        crate::pty::status,
        crate::pty::remove,
        crate::pty::attach,
    ),
    components(schemas(execbox_proto::execd::Event, schemas::Replaced)),
    tags((name = "execd", description = "OpenSandbox execd API."))
)]
struct ExecdDoc;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "execbox Leap0 API",
        description = "The Leap0 code-interpreter API of a sandbox, served by its agent and \
            reached through the execbox server's proxy."
    ),
    paths(
        healthz_doc,
        crate::leap0::execute,
        crate::leap0::execute_stream,
        crate::leap0::create_context,
        crate::leap0::list_contexts,
        crate::leap0::get_context,
        crate::leap0::delete_context,
    ),
    tags((name = "leap0", description = "Leap0 code-interpreter API."))
)]
struct Leap0Doc;

/// The execd document, at the agent's paths.
pub fn execd() -> utoipa::openapi::OpenApi {
    ExecdDoc::openapi()
}

/// The Leap0 document, at the agent's paths.
pub fn leap0() -> utoipa::openapi::OpenApi {
    Leap0Doc::openapi()
}
