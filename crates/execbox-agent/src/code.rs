//! Code contexts (§5): persistent interpreters, one process per context, served through the
//! execd `/code` routes here and through the Leap0 routes in `leap0.rs`.
//!
//! A context is a kernel ([`crate::kernel`]) for Python, JavaScript, TypeScript, Java and Go, or a
//! long-lived bash ([`crate::session`]) for Bash. Each language has a default context, created on
//! first use. One execution runs at a time per context; another one gets a busy error.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use execbox_proto::execd::Event;
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::kernel::{Kernel, KernelHandle, KernelLanguage, KernelOutput};
use crate::session::Session;
use crate::sse::{now_ms, sse_response, Sink};
use crate::AppState;

/// Contexts kept at once (each is a process).
const MAX_CONTEXTS: usize = 64;
/// Interval of `ping` events.
const PING_EVERY: Duration = Duration::from_secs(3);

/// A language a context can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Language {
    /// A kernel language.
    Kernel(KernelLanguage),
    /// A persistent bash.
    Bash,
}

impl Language {
    /// Parses an execd language name; `Err` carries the reason for a 400.
    pub fn parse(name: &str) -> Result<Language, String> {
        Ok(match name {
            "python" => Language::Kernel(KernelLanguage::Python),
            "javascript" => Language::Kernel(KernelLanguage::JavaScript),
            "typescript" => Language::Kernel(KernelLanguage::TypeScript),
            "java" => Language::Kernel(KernelLanguage::Java),
            "go" => Language::Kernel(KernelLanguage::Go),
            "bash" => Language::Bash,
            "sql" => return Err(format!("language {name} is not supported by execbox")),
            other => return Err(format!("unknown language: {other}")),
        })
    }

    /// The execd name.
    pub fn name(self) -> &'static str {
        match self {
            Language::Kernel(KernelLanguage::Python) => "python",
            Language::Kernel(KernelLanguage::JavaScript) => "javascript",
            Language::Kernel(KernelLanguage::TypeScript) => "typescript",
            Language::Kernel(KernelLanguage::Java) => "java",
            Language::Kernel(KernelLanguage::Go) => "go",
            Language::Bash => "bash",
        }
    }
}

/// The interpreter of a context.
enum Engine {
    Kernel {
        /// Held for the whole of an execution; `None` until started or after the kernel died.
        kernel: Arc<tokio::sync::Mutex<Option<Kernel>>>,
        handle: Mutex<Option<KernelHandle>>,
    },
    Bash(Arc<Session>),
}

/// One code context.
pub struct Context {
    /// Context id (a dashed UUID).
    pub id: String,
    /// Its language.
    pub language: Language,
    /// Working directory.
    pub cwd: PathBuf,
    /// Extra environment of the interpreter process.
    env: Vec<(String, String)>,
    engine: Engine,
    /// The kernel was restarted and lost its state since the last execution reported it.
    restarted: std::sync::atomic::AtomicBool,
    /// Created implicitly (Leap0 `/execute` without `context_id`): removed when idle too long.
    expires_when_idle: std::sync::atomic::AtomicBool,
    last_used: Mutex<Instant>,
}

/// Why an execution could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Another execution is running in the context.
    #[error("session is busy")]
    Busy,
    /// The interpreter could not be started.
    #[error("{0}")]
    Start(String),
    /// The sandbox user cannot enter the context's working directory.
    #[error("{0}")]
    Cwd(String),
}

impl Context {
    fn new(language: Language, cwd: PathBuf, env: Vec<(String, String)>) -> Arc<Context> {
        let engine = match language {
            Language::Bash => Engine::Bash(Session::detached(cwd.clone())),
            Language::Kernel(_) => Engine::Kernel {
                kernel: Arc::new(tokio::sync::Mutex::new(None)),
                handle: Mutex::new(None),
            },
        };
        Arc::new(Context {
            id: uuid::Uuid::new_v4().to_string(),
            language,
            cwd,
            env,
            engine,
            restarted: std::sync::atomic::AtomicBool::new(false),
            expires_when_idle: std::sync::atomic::AtomicBool::new(false),
            last_used: Mutex::new(Instant::now()),
        })
    }

    /// Marks the context as created implicitly: [`Contexts::sweep_idle`] removes it once idle.
    pub fn expire_when_idle(&self) {
        self.expires_when_idle
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn touch(&self) {
        match self.last_used.lock() {
            Ok(mut g) => *g = Instant::now(),
            Err(p) => *p.into_inner() = Instant::now(),
        }
    }

    fn idle_for(&self) -> Duration {
        match self.last_used.lock() {
            Ok(g) => g.elapsed(),
            Err(p) => p.into_inner().elapsed(),
        }
    }

    fn is_busy(&self) -> bool {
        match &self.engine {
            Engine::Kernel { kernel, .. } => kernel.try_lock().is_err(),
            Engine::Bash(session) => session.is_busy(),
        }
    }

    /// Starts the interpreter now (so that creation fails fast and the first run is quick).
    async fn warm_up(&self, app: &AppState) -> Result<(), RunError> {
        if let (Engine::Kernel { kernel, handle }, Language::Kernel(lang)) =
            (&self.engine, self.language)
        {
            let mut guard = kernel.lock().await;
            if guard.is_none() {
                let (k, h) = app
                    .contexts
                    .spares
                    .start(&app.runner, lang, &self.cwd, self.env.clone())
                    .await
                    .map_err(|e| match e {
                        crate::kernel::KernelError::Cwd(m) => RunError::Cwd(m),
                        other => RunError::Start(other.to_string()),
                    })?;
                *guard = Some(k);
                store_handle(handle, Some(h));
            }
        }
        Ok(())
    }

    /// Interrupts the running execution, if any.
    pub fn interrupt(&self) {
        match &self.engine {
            Engine::Kernel { handle, .. } => {
                if let Some(h) = load_handle(handle) {
                    h.interrupt();
                }
            }
            Engine::Bash(session) => session.interrupt(),
        }
    }

    /// Kills the interpreter for good.
    pub fn shut_down(&self) {
        match &self.engine {
            Engine::Kernel { handle, .. } => {
                if let Some(h) = load_handle(handle) {
                    h.kill();
                }
            }
            Engine::Bash(session) => session.kill(),
        }
    }

    /// Kills the interpreter and starts a fresh one under the same id (state lost); a running
    /// execution ends as its kernel dies.
    pub async fn restart(&self, app: &AppState) -> Result<(), RunError> {
        self.shut_down();
        if let Engine::Kernel { kernel, handle } = &self.engine {
            // Waits for a running execution to see its kernel gone.
            let mut guard = kernel.lock().await;
            *guard = None;
            store_handle(handle, None);
        }
        self.restarted
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.warm_up(app).await
    }

    /// The persistent bash of a bash context.
    pub fn bash_session(&self) -> Option<&Arc<Session>> {
        match &self.engine {
            Engine::Bash(s) => Some(s),
            Engine::Kernel { .. } => None,
        }
    }

    /// Runs `code` in a kernel context, sending its output to the returned channel; the
    /// execution goes on when the receiver is dropped.
    pub fn execute_kernel(
        self: &Arc<Self>,
        app: Arc<AppState>,
        code: String,
        env: Vec<(String, String)>,
        timeout: Option<Duration>,
    ) -> Result<mpsc::Receiver<KernelOutput>, RunError> {
        let Engine::Kernel { kernel, .. } = &self.engine else {
            return Err(RunError::Start("not a kernel context".into()));
        };
        let Language::Kernel(lang) = self.language else {
            return Err(RunError::Start("not a kernel context".into()));
        };
        let guard = kernel
            .clone()
            .try_lock_owned()
            .map_err(|_| RunError::Busy)?;
        self.touch();
        let (tx, rx) = mpsc::channel(64);
        let ctx = self.clone();
        tokio::spawn(async move {
            let mut guard = guard;
            if guard.is_none() {
                match app
                    .contexts
                    .spares
                    .start(&app.runner, lang, &ctx.cwd, ctx.env.clone())
                    .await
                {
                    Ok((k, h)) => {
                        *guard = Some(k);
                        if let Engine::Kernel { handle, .. } = &ctx.engine {
                            store_handle(handle, Some(h));
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(KernelOutput::Died(e.to_string())).await;
                        return;
                    }
                }
            }
            let Some(k) = guard.as_mut() else { return };
            if !k.execute(&code, &env, timeout, &tx).await {
                *guard = None;
                ctx.restarted
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            ctx.touch();
        });
        Ok(rx)
    }

    /// Whether the kernel restarted (state lost) since this was last asked.
    pub fn take_restarted(&self) -> bool {
        self.restarted
            .swap(false, std::sync::atomic::Ordering::Relaxed)
    }
}

fn load_handle(m: &Mutex<Option<KernelHandle>>) -> Option<KernelHandle> {
    match m.lock() {
        Ok(g) => g.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

fn store_handle(m: &Mutex<Option<KernelHandle>>, v: Option<KernelHandle>) {
    match m.lock() {
        Ok(mut g) => *g = v,
        Err(p) => *p.into_inner() = v,
    }
}

/// The code contexts of this sandbox.
#[derive(Default)]
pub struct Contexts {
    map: Mutex<HashMap<String, Arc<Context>>>,
    defaults: Mutex<HashMap<Language, String>>,
    /// Kernels started ahead of new contexts (a context deleted by id leaves them for the next
    /// one; deleting every context of a language by language removes them).
    pub spares: Arc<crate::kernel::Spares>,
}

impl Contexts {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Context>>> {
        match self.map.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn lock_defaults(&self) -> std::sync::MutexGuard<'_, HashMap<Language, String>> {
        match self.defaults.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// The context `id`.
    pub fn get(&self, id: &str) -> Option<Arc<Context>> {
        self.lock().get(id).cloned()
    }

    /// Every context, in no particular order.
    pub fn all(&self) -> Vec<Arc<Context>> {
        self.lock().values().cloned().collect()
    }

    /// Creates a context and starts its interpreter; fails fast when the language's runtime is
    /// missing or does not start.
    pub async fn create(
        &self,
        app: &AppState,
        language: Language,
        cwd: PathBuf,
        env: Vec<(String, String)>,
    ) -> Result<Arc<Context>, ApiError> {
        if language == Language::Bash {
            crate::session::require_bash()?;
        }
        if let Language::Kernel(k) = language {
            k.argv(&app.runner.env_with(&env)).map_err(|e| {
                ApiError::BadRequest(format!(
                    "invalid request, validation error language {}: {e}",
                    language.name()
                ))
            })?;
        }
        if self.lock().len() >= MAX_CONTEXTS {
            return Err(ApiError::Runtime(format!(
                "error creating code context. at most {MAX_CONTEXTS} contexts may exist"
            )));
        }
        let ctx = Context::new(language, cwd, env);
        ctx.warm_up(app).await.map_err(|e| match e {
            // A working directory the user cannot enter is the request's mistake.
            RunError::Cwd(m) => ApiError::BadRequest(m),
            e => ApiError::Runtime(format!("error creating code context. {e}")),
        })?;
        self.lock().insert(ctx.id.clone(), ctx.clone());
        Ok(ctx)
    }

    /// The default context of `language`, created on first use.
    pub async fn default_for(
        &self,
        app: &AppState,
        language: Language,
    ) -> Result<Arc<Context>, ApiError> {
        let existing = self.lock_defaults().get(&language).cloned();
        if let Some(ctx) = existing.and_then(|id| self.get(&id)) {
            return Ok(ctx);
        }
        let ctx = self
            .create(app, language, crate::paths::default_cwd(), Vec::new())
            .await?;
        self.lock_defaults().insert(language, ctx.id.clone());
        Ok(ctx)
    }

    /// Removes and shuts down the context `id`; false when unknown.
    pub fn remove(&self, id: &str) -> bool {
        let Some(ctx) = self.lock().remove(id) else {
            return false;
        };
        self.lock_defaults().retain(|_, v| v != id);
        ctx.shut_down();
        true
    }

    /// Removes the implicitly created contexts idle for longer than `ttl`.
    pub fn sweep_idle(&self, ttl: Duration) {
        let expired: Vec<String> = self
            .all()
            .into_iter()
            .filter(|c| {
                c.expires_when_idle
                    .load(std::sync::atomic::Ordering::Relaxed)
                    && c.idle_for() > ttl
                    && !c.is_busy()
            })
            .map(|c| c.id.clone())
            .collect();
        for id in expired {
            tracing::debug!(context = %id, "idle context removed");
            self.remove(&id);
        }
    }

    /// Interrupts the context `id`; false when unknown.
    pub fn interrupt(&self, id: &str) -> bool {
        match self.get(id) {
            Some(ctx) => {
                ctx.interrupt();
                true
            }
            None => false,
        }
    }
}

/// Routes of the execd code API.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/code", post(run).delete(crate::command::interrupt))
        .route("/code/context", post(create_context))
        .route(
            "/code/contexts",
            get(list_contexts).delete(delete_contexts_by_language),
        )
        .route(
            "/code/contexts/{id}",
            get(get_context).delete(delete_context),
        )
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::BadRequest(format!(
            "error parsing request, MAYBE invalid body format. {e}"
        ))
    })
}

#[derive(Deserialize)]
struct CreateContextRequest {
    language: Option<String>,
    cwd: Option<String>,
}

fn context_json(ctx: &Context, with_cwd: bool) -> Value {
    let mut v = serde_json::json!({ "id": ctx.id, "language": ctx.language.name() });
    if with_cwd {
        v["cwd"] = Value::String(ctx.cwd.to_string_lossy().into_owned());
    }
    v
}

fn bad_language(e: String) -> ApiError {
    ApiError::BadRequest(format!("invalid request, validation error {e}"))
}

/// `mkdir -p` of a context's working directory, owned by the sandbox user.
pub fn prepare_cwd(app: &AppState, raw: Option<&str>) -> Result<PathBuf, ApiError> {
    let Some(raw) = raw.filter(|c| !c.is_empty()) else {
        return Ok(crate::paths::default_cwd());
    };
    let path = crate::paths::resolve(raw, &app.runner.env_with(&[]))?;
    crate::files::make_cwd(&path, app.runner.user())?;
    Ok(path)
}

/// `POST /code/context`.
#[utoipa::path(
    post,
    path = "/code/context",
    operation_id = "execdCreateContext",
    tag = "execd",
    description = "Starts a code context (an interpreter).",
    request_body = crate::openapi::schemas::CodeContextCreate,
    responses(
        (status = 200, description = "Created.", body = crate::openapi::schemas::CodeContext),
        (status = 400, description = "`INVALID_REQUEST_BODY` or `MISSING_QUERY`: the message names what is wrong.", body = execbox_proto::execd::ExecdError),
        (status = 500, description = "`RUNTIME_ERROR`: the agent failed.", body = execbox_proto::execd::ExecdError),
    )
)]
async fn create_context(
    State(app): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: CreateContextRequest = parse_json(&body)?;
    let language = Language::parse(req.language.as_deref().unwrap_or("")).map_err(bad_language)?;
    let cwd = prepare_cwd(&app, req.cwd.as_deref())?;
    let with_cwd = req.cwd.as_deref().is_some_and(|c| !c.is_empty());
    let ctx = app.contexts.create(&app, language, cwd, Vec::new()).await?;
    Ok(Json(context_json(&ctx, with_cwd)))
}

#[derive(Deserialize)]
struct LanguageQuery {
    language: Option<String>,
}

fn unsupported_listing(name: &str) -> Option<ApiError> {
    matches!(name, "command" | "background-command" | "sql")
        .then(|| ApiError::Runtime(format!("unsupported language context operation: {name}")))
}

/// `GET /code/contexts[?language=]`.
#[utoipa::path(
    get,
    path = "/code/contexts",
    operation_id = "execdListContexts",
    tag = "execd",
    description = "Code contexts, of one language if asked.",
    params(
        ("language" = Option<String>, Query, description = "Language."),
    ),
    responses(
        (status = 200, description = "Contexts.", body = Vec<crate::openapi::schemas::CodeContext>),
        (status = 400, description = "`INVALID_REQUEST_BODY` or `MISSING_QUERY`: the message names what is wrong.", body = execbox_proto::execd::ExecdError),
    )
)]
async fn list_contexts(
    State(app): State<Arc<AppState>>,
    Query(q): Query<LanguageQuery>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let wanted = q.language.filter(|l| !l.is_empty());
    if let Some(e) = wanted.as_deref().and_then(unsupported_listing) {
        return Err(e);
    }
    let mut items: Vec<Value> = app
        .contexts
        .all()
        .iter()
        .filter(|c| wanted.as_deref().is_none_or(|w| c.language.name() == w))
        .map(|c| context_json(c, false))
        .collect();
    items.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    Ok(Json(items))
}

/// `DELETE /code/contexts?language=`.
#[utoipa::path(
    delete,
    path = "/code/contexts",
    operation_id = "execdDeleteContexts",
    tag = "execd",
    description = "Removes every context of a language.",
    params(
        ("language" = String, Query, description = "Language."),
    ),
    responses(
        (status = 200, description = "Removed."),
        (status = 400, description = "`INVALID_REQUEST_BODY` or `MISSING_QUERY`: the message names what is wrong.", body = execbox_proto::execd::ExecdError),
    )
)]
async fn delete_contexts_by_language(
    State(app): State<Arc<AppState>>,
    Query(q): Query<LanguageQuery>,
) -> Result<StatusCode, ApiError> {
    let name = q
        .language
        .filter(|l| !l.is_empty())
        .ok_or_else(|| ApiError::MissingQuery("missing query parameter language".into()))?;
    if let Some(e) = unsupported_listing(&name) {
        return Err(e);
    }
    for ctx in app.contexts.all() {
        if ctx.language.name() == name {
            app.contexts.remove(&ctx.id);
        }
    }
    // Every context of the language gone on purpose: its spare kernels go too.
    if let Ok(Language::Kernel(language)) = Language::parse(&name) {
        app.contexts.spares.discard(language);
    }
    Ok(StatusCode::OK)
}

/// `GET /code/contexts/{id}`.
#[utoipa::path(
    get,
    path = "/code/contexts/{id}",
    operation_id = "execdGetContext",
    tag = "execd",
    description = "One code context.",
    params(
        ("id" = String, Path, description = "Id."),
    ),
    responses(
        (status = 200, description = "The context.", body = crate::openapi::schemas::CodeContext),
        (status = 404, description = "`CONTEXT_NOT_FOUND`.", body = execbox_proto::execd::ExecdError),
    )
)]
async fn get_context(
    State(app): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    app.contexts
        .get(&id)
        .map(|c| Json(context_json(&c, false)))
        .ok_or_else(|| ApiError::ContextNotFound(format!("context {id} not found")))
}

/// `DELETE /code/contexts/{id}`.
#[utoipa::path(
    delete,
    path = "/code/contexts/{id}",
    operation_id = "execdDeleteContext",
    tag = "execd",
    description = "Removes a code context.",
    params(
        ("id" = String, Path, description = "Id."),
    ),
    responses(
        (status = 200, description = "Removed."),
        (status = 404, description = "`CONTEXT_NOT_FOUND`.", body = execbox_proto::execd::ExecdError),
    )
)]
async fn delete_context(
    State(app): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    if app.contexts.remove(&id) {
        Ok(StatusCode::OK)
    } else {
        Err(ApiError::ContextNotFound(format!("context {id} not found")))
    }
}

#[derive(Deserialize, Default)]
struct RunContext {
    id: Option<String>,
    language: Option<String>,
}

#[derive(Deserialize)]
struct RunCodeRequest {
    code: Option<String>,
    context: Option<RunContext>,
}

/// `POST /code`.
#[utoipa::path(
    post,
    path = "/code",
    operation_id = "execdRunCode",
    tag = "execd",
    description = "Runs code in a context (the language's default one when none is named); streamed.",
    request_body = crate::openapi::schemas::CodeRun,
    responses(
        (status = 200, description = "Server-sent events (`data: {json}` frames of `ExecdEvent`).", content_type = "text/event-stream", body = serde_json::Value),
        (status = 400, description = "`INVALID_REQUEST_BODY` or `MISSING_QUERY`: the message names what is wrong.", body = execbox_proto::execd::ExecdError),
        (status = 404, description = "`CONTEXT_NOT_FOUND`.", body = execbox_proto::execd::ExecdError),
        (status = 500, description = "`RUNTIME_ERROR`: the agent failed.", body = execbox_proto::execd::ExecdError),
    )
)]
async fn run(State(app): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let req: RunCodeRequest = parse_json(&body)?;
    let code = req.code.filter(|c| !c.is_empty()).ok_or_else(|| {
        ApiError::BadRequest("invalid request, validation error code is required".into())
    })?;
    let context = req.context.unwrap_or_default();
    let language = context.language.filter(|l| !l.is_empty());
    let Some(language) = language else {
        // No language: a stateless shell command, exactly like `POST /command`.
        let body = serde_json::json!({ "command": code }).to_string();
        return crate::command::run(State(app), Bytes::from(body)).await;
    };
    let language = Language::parse(&language)
        .map_err(|e| ApiError::Runtime(format!("error running codes {e}")))?;
    let ctx = match context.id.filter(|i| !i.is_empty()) {
        Some(id) => app
            .contexts
            .get(&id)
            .ok_or_else(|| ApiError::Runtime("error running codes context not found".into()))?,
        None => app.contexts.default_for(&app, language).await?,
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let mut sink = Sink { tx, gone: false };
    tokio::spawn(async move {
        sink.send(&Event::text("init", ctx.id.clone(), now_ms()))
            .await;
        match ctx.language {
            Language::Bash => {
                let Engine::Bash(session) = &ctx.engine else {
                    return;
                };
                if session.is_busy() {
                    send_busy(&mut sink).await;
                    return;
                }
                crate::session::run_code(&app, session, &code, sink).await;
            }
            Language::Kernel(_) => match ctx.execute_kernel(app.clone(), code, Vec::new(), None) {
                Ok(rx) => stream_kernel(&ctx, rx, sink).await,
                Err(RunError::Busy) => send_busy(&mut sink).await,
                Err(e) => {
                    sink.send_envelope(&format!("error running codes {e}"))
                        .await
                }
            },
        }
    });
    Ok(sse_response(rx))
}

async fn send_busy(sink: &mut Sink) {
    sink.send_envelope("error running codes session is busy")
        .await;
}

/// A MIME bundle as an execd `results` object: `text/plain` renamed `text`.
pub fn execd_bundle(mut data: Map<String, Value>) -> Map<String, Value> {
    if let Some(text) = data.remove("text/plain") {
        data.insert("text".into(), text);
    }
    data
}

async fn stream_kernel(ctx: &Context, mut rx: mpsc::Receiver<KernelOutput>, mut sink: Sink) {
    let started = Instant::now();
    let mut ping = tokio::time::interval_at((started + PING_EVERY).into(), PING_EVERY);
    if ctx.take_restarted() {
        sink.send(&Event::text(
            "stderr",
            "[the interpreter restarted; earlier state is lost]\n",
            now_ms(),
        ))
        .await;
    }
    loop {
        let item = tokio::select! {
            item = rx.recv() => item,
            _ = ping.tick() => {
                sink.send(&Event::text("ping", "pong", now_ms())).await;
                continue;
            }
        };
        let ts = now_ms();
        match item {
            Some(KernelOutput::Stdout(t)) => sink.send(&Event::text("stdout", t, ts)).await,
            Some(KernelOutput::Stderr(t)) => sink.send(&Event::text("stderr", t, ts)).await,
            Some(KernelOutput::Display(data)) => {
                let mut e = Event::new("result", ts);
                e.results = Some(execd_bundle(data));
                sink.send(&e).await;
            }
            Some(KernelOutput::Result {
                execution_count,
                data,
            }) => {
                let mut c = Event::new("execution_count", ts);
                c.execution_count = Some(execution_count);
                sink.send(&c).await;
                let mut e = Event::new("result", ts);
                e.results = Some(execd_bundle(data));
                sink.send(&e).await;
            }
            Some(KernelOutput::Error {
                ename,
                evalue,
                traceback,
            }) => {
                sink.send(&Event::text("status", "error", ts)).await;
                sink.send(&Event::error(&ename, evalue, traceback, ts))
                    .await;
            }
            Some(KernelOutput::TimedOut { .. }) => {}
            Some(KernelOutput::Done { .. }) => {
                sink.send(&Event::complete(started.elapsed().as_millis() as u64, ts))
                    .await;
                return;
            }
            Some(KernelOutput::Died(why)) => {
                sink.send(&Event::text("status", "error", ts)).await;
                sink.send(&Event::error("KernelDied", why.clone(), vec![why], ts))
                    .await;
                sink.send(&Event::complete(started.elapsed().as_millis() as u64, ts))
                    .await;
                return;
            }
            None => return,
        }
    }
}

impl IntoResponse for RunError {
    fn into_response(self) -> Response {
        match self {
            RunError::Cwd(m) => ApiError::BadRequest(m).into_response(),
            other => ApiError::Runtime(format!("error running codes {other}")).into_response(),
        }
    }
}
