//! The Leap0 code-interpreter API (`leap0.md`): `/healthz`, `/execute`, `/execute/async` and
//! `/contexts`, on the same contexts as the execd `/code` routes. Errors are Leap0's
//! `{"message"}` and validation shapes, mapped in [`Leap0Error`] only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::code::{Context, Language, RunError};
use crate::error::ApiError;
use crate::kernel::{KernelLanguage, KernelOutput};
use crate::runner::{Input, Output, RunSpec};
use crate::sse::{pipe_reader, read_some, sleep_until_opt, LineSplitter};
use crate::AppState;

/// Largest request body (the documented platform limit).
const MAX_BODY: usize = 10 << 20;
/// Default `timeout_ms`.
const DEFAULT_TIMEOUT_MS: u64 = 30_000;

/// Errors of the Leap0 API.
#[derive(Debug, thiserror::Error)]
pub enum Leap0Error {
    /// 400 with the validation shape: (field, error) pairs.
    #[error("Invalid request")]
    Invalid(Vec<(String, String)>),
    /// 404 `{"message"}`.
    #[error("{0}")]
    NotFound(String),
    /// 409 `{"message"}`: the context is running another execution.
    #[error("{0}")]
    Busy(String),
    /// 413 `{"message"}`.
    #[error("{0}")]
    TooLarge(String),
    /// 500 `{"message"}`.
    #[error("{0}")]
    Internal(String),
}

fn invalid(field: &str, error: impl Into<String>) -> Leap0Error {
    Leap0Error::Invalid(vec![(field.to_string(), error.into())])
}

impl IntoResponse for Leap0Error {
    fn into_response(self) -> Response {
        let status = match &self {
            Leap0Error::Invalid(_) => StatusCode::BAD_REQUEST,
            Leap0Error::NotFound(_) => StatusCode::NOT_FOUND,
            Leap0Error::Busy(_) => StatusCode::CONFLICT,
            Leap0Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Leap0Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let body = match &self {
            Leap0Error::Invalid(errors) => json!({
                "message": "Invalid request",
                "errors": errors
                    .iter()
                    .map(|(field, error)| json!({ "field": field, "error": error }))
                    .collect::<Vec<_>>(),
            }),
            other => json!({ "message": other.to_string() }),
        };
        if status.is_server_error() {
            tracing::error!(error = %self, "leap0 request failed");
        }
        (status, Json(body)).into_response()
    }
}

/// Routes of the Leap0 API.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/execute", post(execute))
        .route("/execute/async", post(execute_stream))
        .route("/contexts", get(list_contexts).post(create_context))
        .route("/contexts/{id}", get(get_context).delete(delete_context))
}

async fn read_json(body: Body) -> Result<Map<String, Value>, Leap0Error> {
    let bytes = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        Leap0Error::TooLarge(format!("request body larger than {} MiB", MAX_BODY >> 20))
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(invalid("body", "the body must be a JSON object")),
        Err(e) => Err(invalid("body", format!("malformed JSON: {e}"))),
    }
}

/// A string field; `null` is absent.
fn opt_str<'a>(m: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, Leap0Error> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(field, format!("{field} must be a string"))),
    }
}

fn timeout_ms(m: &Map<String, Value>) -> Result<u64, Leap0Error> {
    match m.get("timeout_ms") {
        None | Some(Value::Null) => Ok(DEFAULT_TIMEOUT_MS),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(v) if v < 0 => Err(invalid("timeout_ms", "timeout_ms must not be negative")),
            Some(0) => Ok(DEFAULT_TIMEOUT_MS),
            Some(v) => Ok(v as u64),
            None => Err(invalid("timeout_ms", "timeout_ms must be an integer")),
        },
        Some(_) => Err(invalid("timeout_ms", "timeout_ms must be an integer")),
    }
}

fn required_code(m: &Map<String, Value>) -> Result<String, Leap0Error> {
    match opt_str(m, "code")? {
        Some(c) if !c.is_empty() => Ok(c.to_string()),
        _ => Err(invalid("code", "code is required")),
    }
}

/// Leap0 language aliases. The JavaScript family is one language, TypeScript (a superset of
/// JavaScript, as upstream's Bun runs it): on Node with the types erased by the agent, on Bun
/// where there is no Node. Go (`go`, `golang`) is an execbox extension: a context of the Go
/// kernel, language number 3.
fn parse_language(alias: &str) -> Result<Language, Leap0Error> {
    match alias {
        "python" | "py" | "python3" => Ok(Language::Kernel(KernelLanguage::Python)),
        "typescript" | "ts" | "javascript" | "js" | "bun" | "node" => {
            Ok(Language::Kernel(KernelLanguage::TypeScript))
        }
        "go" | "golang" => Ok(Language::Kernel(KernelLanguage::Go)),
        other => Err(invalid(
            "language",
            format!("unsupported language {other:?}: use python, typescript or go"),
        )),
    }
}

/// The Leap0 integer of a language (1 Python, 2 TypeScript/JavaScript, 3 Go, an execbox
/// extension); others are not Leap0 contexts.
fn language_number(language: Language) -> Option<u8> {
    match language {
        Language::Kernel(KernelLanguage::Python) => Some(1),
        Language::Kernel(KernelLanguage::JavaScript | KernelLanguage::TypeScript) => Some(2),
        Language::Kernel(KernelLanguage::Go) => Some(3),
        _ => None,
    }
}

fn context_json(ctx: &Context) -> Value {
    json!({
        "id": ctx.id,
        "language": language_number(ctx.language).unwrap_or(0),
        "cwd": ctx.cwd.to_string_lossy(),
    })
}

fn env_vars(m: &Map<String, Value>) -> Result<Vec<(String, String)>, Leap0Error> {
    match m.get("env_vars") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Object(o)) => {
            let env = o
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s)
                        if k.is_empty() || k.contains(['=', '\0']) || s.contains('\0') =>
                    {
                        Err(invalid(
                            "env_vars",
                            format!(
                                "env_vars.{k}: names must be non-empty without '=' or NUL, \
                                 values without NUL"
                            ),
                        ))
                    }
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    _ => Err(invalid(
                        "env_vars",
                        format!("env_vars.{k} must be a string"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            // They become the kernel's environment: more than one exec takes is E2BIG.
            let pairs: Vec<(&String, &String)> = env.iter().map(|(k, v)| (k, v)).collect();
            if let Some((k, why)) = execbox_proto::limits::env_too_large(pairs) {
                return Err(invalid("env_vars", format!("env_vars.{k}: {why}")));
            }
            Ok(env)
        }
        Some(_) => Err(invalid("env_vars", "env_vars must be an object")),
    }
}

async fn create(
    app: &AppState,
    language: Language,
    cwd: Option<&str>,
    env: Vec<(String, String)>,
) -> Result<Arc<Context>, Leap0Error> {
    let cwd = crate::code::prepare_cwd(app, cwd).map_err(|e| invalid("cwd", e.to_string()))?;
    app.contexts
        .create(app, language, cwd, env)
        .await
        .map_err(|e| match e {
            ApiError::BadRequest(m) => invalid("language", m),
            e => Leap0Error::Internal(e.to_string()),
        })
}

/// `POST /contexts`.
#[utoipa::path(
    post,
    path = "/contexts",
    operation_id = "leap0CreateContext",
    tag = "leap0",
    description = "Starts a context.",
    request_body = crate::openapi::schemas::Leap0ContextCreate,
    responses(
        (status = 201, description = "Created.", body = crate::openapi::schemas::Leap0Context),
        (status = 400, description = "Invalid request.", body = crate::openapi::schemas::Leap0Invalid),
        (status = 413, description = "Body over 10 MiB.", body = crate::openapi::schemas::Leap0Message),
        (status = 500, description = "The agent failed.", body = crate::openapi::schemas::Leap0Message),
    )
)]
async fn create_context(
    State(app): State<Arc<AppState>>,
    body: Body,
) -> Result<Response, Leap0Error> {
    let m = read_json(body).await?;
    let language = parse_language(opt_str(&m, "language")?.unwrap_or("python"))?;
    let ctx = create(&app, language, opt_str(&m, "cwd")?, Vec::new()).await?;
    Ok((StatusCode::CREATED, Json(context_json(&ctx))).into_response())
}

/// `GET /contexts`.
#[utoipa::path(
    get,
    path = "/contexts",
    operation_id = "leap0ListContexts",
    tag = "leap0",
    description = "Contexts.",
    responses(
        (status = 200, description = "Contexts.", body = crate::openapi::schemas::Leap0Contexts),
    )
)]
async fn list_contexts(State(app): State<Arc<AppState>>) -> Json<Value> {
    let mut items: Vec<Value> = app
        .contexts
        .all()
        .iter()
        .filter(|c| language_number(c.language).is_some())
        .map(|c| context_json(c))
        .collect();
    items.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    Json(json!({ "items": items }))
}

fn leap0_context(app: &AppState, id: &str) -> Option<Arc<Context>> {
    app.contexts
        .get(id)
        .filter(|c| language_number(c.language).is_some())
}

/// `GET /contexts/{id}`.
#[utoipa::path(
    get,
    path = "/contexts/{id}",
    operation_id = "leap0GetContext",
    tag = "leap0",
    description = "One context.",
    params(
        ("id" = String, Path, description = "Id."),
    ),
    responses(
        (status = 200, description = "The context.", body = crate::openapi::schemas::Leap0Context),
        (status = 404, description = "Not found.", body = crate::openapi::schemas::Leap0Message),
    )
)]
async fn get_context(
    State(app): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, Leap0Error> {
    leap0_context(&app, &id)
        .map(|c| Json(context_json(&c)))
        .ok_or_else(|| Leap0Error::NotFound(format!("context {id} not found")))
}

/// `DELETE /contexts/{id}`: 204 whether or not it existed.
#[utoipa::path(
    delete,
    path = "/contexts/{id}",
    operation_id = "leap0DeleteContext",
    tag = "leap0",
    description = "Removes a context; idempotent.",
    params(
        ("id" = String, Path, description = "Id."),
    ),
    responses(
        (status = 204, description = "Removed."),
    )
)]
async fn delete_context(
    State(app): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> StatusCode {
    if leap0_context(&app, &id).is_some() {
        app.contexts.remove(&id);
    }
    StatusCode::NO_CONTENT
}

/// The context an execute request names, checked against its `language`.
fn named_context(
    app: &AppState,
    m: &Map<String, Value>,
    language: Option<Language>,
) -> Result<Option<Arc<Context>>, Leap0Error> {
    let Some(id) = opt_str(m, "context_id")?.filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let ctx = leap0_context(app, id)
        .ok_or_else(|| invalid("context_id", format!("context {id} does not exist")))?;
    if let Some(lang) = language {
        if language_number(lang) != language_number(ctx.language) {
            return Err(invalid(
                "language",
                format!(
                    "context {id} runs {}, not {}",
                    ctx.language.name(),
                    lang.name()
                ),
            ));
        }
    }
    Ok(Some(ctx))
}

/// A MIME bundle as a Leap0 ExecutionResult item.
fn item(data: Map<String, Value>, is_primary: bool) -> Value {
    let mut out = Map::new();
    out.insert("is_primary".into(), Value::Bool(is_primary));
    let mut extra = Map::new();
    for (mime, value) in data {
        let key = match mime.as_str() {
            "text/plain" => "text",
            "text/html" => "html",
            "text/markdown" => "markdown",
            "image/svg+xml" => "svg",
            "image/png" => "png",
            "image/jpeg" => "jpeg",
            "application/pdf" => "pdf",
            "text/latex" => "latex",
            "application/json" => "json",
            "application/javascript" => "javascript",
            _ => {
                extra.insert(mime, value);
                continue;
            }
        };
        out.insert(key.into(), value);
    }
    if !extra.is_empty() {
        out.insert("extra".into(), Value::Object(extra));
    }
    Value::Object(out)
}

fn lines(text: &str) -> Vec<String> {
    let mut splitter = LineSplitter::default();
    let mut out = Vec::new();
    splitter.feed(text.as_bytes(), &mut out);
    splitter.finish(&mut out);
    out.into_iter()
        .map(|l| if l == "\n" { String::new() } else { l })
        .collect()
}

/// `POST /execute`: runs in the named context, or in a new one whose id is returned.
#[utoipa::path(
    post,
    path = "/execute",
    operation_id = "leap0Execute",
    tag = "leap0",
    description = "Runs code in the named context, or in a new one.",
    request_body = crate::openapi::schemas::Leap0Execute,
    responses(
        (status = 200, description = "The execution.", body = crate::openapi::schemas::Leap0Execution),
        (status = 400, description = "Invalid request.", body = crate::openapi::schemas::Leap0Invalid),
        (status = 409, description = "The context is running another execution.", body = crate::openapi::schemas::Leap0Message),
        (status = 413, description = "Body over 10 MiB.", body = crate::openapi::schemas::Leap0Message),
        (status = 500, description = "The interpreter died; the execution so far.", body = crate::openapi::schemas::Leap0Execution),
    )
)]
async fn execute(State(app): State<Arc<AppState>>, body: Body) -> Result<Response, Leap0Error> {
    let m = read_json(body).await?;
    let code = required_code(&m)?;
    let language = opt_str(&m, "language")?.map(parse_language).transpose()?;
    let timeout = timeout_ms(&m)?;
    let env = env_vars(&m)?;
    let (ctx, env) = match named_context(&app, &m, language)? {
        Some(ctx) => (ctx, env),
        None => {
            let language = match language {
                Some(l) => l,
                None => parse_language("python")?,
            };
            // A new context gets env_vars as its process environment; nobody holds its id
            // yet, so it goes away when left idle.
            let ctx = create(&app, language, None, env).await?;
            ctx.expire_when_idle();
            (ctx, Vec::new())
        }
    };
    let restarted = ctx.take_restarted();
    let mut rx =
        match ctx.execute_kernel(app.clone(), code, env, Some(Duration::from_millis(timeout))) {
            Ok(rx) => rx,
            Err(RunError::Busy) => {
                return Err(Leap0Error::Busy(format!(
                    "context {} is running another execution",
                    ctx.id
                )))
            }
            Err(e) => return Err(Leap0Error::Internal(e.to_string())),
        };
    let (mut stdout, mut stderr) = (String::new(), String::new());
    if restarted {
        stderr.push_str("[the interpreter restarted; earlier state is lost]\n");
    }
    let mut items = Vec::new();
    let mut error: Option<Value> = None;
    let mut execution_count: Option<u64> = None;
    let mut internal = false;
    while let Some(out) = rx.recv().await {
        match out {
            KernelOutput::Stdout(t) => stdout.push_str(&t),
            KernelOutput::Stderr(t) => stderr.push_str(&t),
            KernelOutput::Display(data) => items.push(item(data, false)),
            KernelOutput::Result {
                execution_count: n,
                data,
            } => {
                execution_count = Some(n);
                items.push(item(data, true));
            }
            KernelOutput::Error {
                ename,
                evalue,
                traceback,
            } => {
                error = Some(
                    json!({ "name": ename, "value": evalue, "traceback": traceback.join("\n") }),
                );
            }
            KernelOutput::TimedOut { restarted } => {
                if restarted {
                    stderr.push_str(
                        "[the interpreter did not stop and was restarted; its state is lost]\n",
                    );
                }
                error = Some(json!({
                    "name": "TimeoutError",
                    "value": format!("Execution timed out after {timeout} ms"),
                    "traceback": "",
                }));
            }
            KernelOutput::Done { execution_count: n } => {
                execution_count = Some(n);
            }
            KernelOutput::Died(why) => {
                if error.is_none() {
                    internal = true;
                    error = Some(json!({ "name": "KernelDied", "value": why, "traceback": "" }));
                }
            }
        }
    }
    let mut execution = json!({
        "context_id": ctx.id,
        "items": items,
        "logs": { "stdout": lines(&stdout), "stderr": lines(&stderr) },
    });
    if let Some(e) = error {
        execution["error"] = e;
    }
    if let Some(n) = execution_count {
        execution["execution_count"] = json!(n);
    }
    let status = if internal {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    Ok((status, Json(execution)).into_response())
}

/// `POST /execute/async`: a fresh process per request (as upstream), streamed as integer-typed
/// events, one line each.
#[utoipa::path(
    post,
    path = "/execute/async",
    operation_id = "leap0ExecuteStream",
    tag = "leap0",
    description = "Runs code in a fresh process; server-sent events (`data: {json}` frames), one per output.",
    request_body = crate::openapi::schemas::Leap0Execute,
    responses(
        (status = 200, description = "Server-sent events (`data: {json}` frames).", content_type = "text/event-stream", body = serde_json::Value),
        (status = 400, description = "Invalid request.", body = crate::openapi::schemas::Leap0Invalid),
        (status = 413, description = "Body over 10 MiB.", body = crate::openapi::schemas::Leap0Message),
        (status = 500, description = "The agent failed.", body = crate::openapi::schemas::Leap0Message),
    )
)]
async fn execute_stream(
    State(app): State<Arc<AppState>>,
    body: Body,
) -> Result<Response, Leap0Error> {
    let m = read_json(body).await?;
    let code = required_code(&m)?;
    // The code becomes one argument of a fresh process: what exec would refuse is the
    // client's mistake, said up front (not a 500 when the process cannot start).
    if code.contains('\0') {
        return Err(invalid("code", "must not contain NUL characters"));
    }
    if code.len() > execbox_proto::limits::MAX_ARG_BYTES {
        return Err(invalid(
            "code",
            format!(
                "{} bytes, over the limit of {} for one process's code",
                code.len(),
                execbox_proto::limits::MAX_ARG_BYTES
            ),
        ));
    }
    let language = opt_str(&m, "language")?.map(parse_language).transpose()?;
    let timeout = Duration::from_millis(timeout_ms(&m)?);
    let ctx = named_context(&app, &m, language)?;
    let language = match (&ctx, language) {
        (Some(c), _) => c.language,
        (None, Some(l)) => l,
        (None, None) => parse_language("python")?,
    };
    let cwd = ctx
        .map(|c| c.cwd.clone())
        .unwrap_or_else(crate::paths::default_cwd);
    let env = app.runner.env_with(&[]);
    let program = |name: &str| {
        crate::kernel::find_program(name, &env)
            .map(|p| p.to_string_lossy().into_owned())
            .ok_or_else(|| {
                invalid(
                    "language",
                    format!("{name} is not installed in this sandbox"),
                )
            })
    };
    let argv = match language {
        Language::Kernel(KernelLanguage::Python) => vec![program("python3")?, "-c".into(), code],
        // A Go cell is not a program: only a context's kernel makes one of it.
        Language::Kernel(KernelLanguage::Go) => {
            return Err(invalid(
                "language",
                "go runs in contexts (/execute), not in /execute/async",
            ))
        }
        // The JavaScript family, as in contexts: Node with the types erased here, Bun where
        // there is no Node.
        _ => match program("node") {
            Ok(node) => {
                let stripped = tokio::task::spawn_blocking(move || {
                    crate::typescript::strip_program(&code, "[eval]")
                })
                .await
                .map_err(|e| Leap0Error::Internal(format!("stripping the types failed: {e}")))?;
                match stripped {
                    Ok((js, true)) => vec![node, "--input-type=module".into(), "-e".into(), js],
                    Ok((js, false)) => vec![node, "-e".into(), js],
                    // What Node prints for a syntax error, and its exit code.
                    Err(e) => return Ok(event_stream(syntax_error_frames(&e))),
                }
            }
            Err(no_node) => match program("bun") {
                Ok(bun) => vec![bun, "-e".into(), code],
                Err(_) => return Err(no_node),
            },
        },
    };
    let started = app
        .runner
        .start(RunSpec {
            argv,
            cwd: &cwd,
            extra_env: Vec::new(),
            creds: None,
            groups: Vec::new(),
            output: Output::Pipes,
            input: Input::Null,
            controlling_tty: false,
            inherit_fds: Vec::new(),
        })
        .map_err(|e| Leap0Error::Internal(format!("starting the process failed: {e}")))?;
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(stream_process(started, timeout, tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    Ok(event_stream(Body::from_stream(stream)))
}

/// A `/execute/async` answer carrying `body`.
fn event_stream(body: impl Into<Body>) -> Response {
    let mut resp = Response::new(body.into());
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-cache"),
    );
    resp
}

/// The stream of a program that does not compile: its error on stderr, exit code 1.
fn syntax_error_frames(e: &crate::typescript::SyntaxError) -> Bytes {
    let mut body = Vec::new();
    for line in &e.traceback {
        body.extend_from_slice(&frame(1, Some(line), None));
    }
    body.extend_from_slice(&frame(2, None, Some(1)));
    Bytes::from(body)
}

/// One Leap0 StreamEvent; `type` first, as the compat document shows it.
#[derive(serde::Serialize)]
struct StreamEvent<'a> {
    #[serde(rename = "type")]
    kind: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<i32>,
}

fn frame(kind: u8, data: Option<&str>, code: Option<i32>) -> Bytes {
    let event = StreamEvent { kind, data, code };
    let json = serde_json::to_string(&event).unwrap_or_default();
    Bytes::from(format!("data: {json}\n\n"))
}

async fn stream_process(
    mut started: crate::runner::Started,
    timeout: Duration,
    tx: mpsc::Sender<Bytes>,
) {
    let deadline = Instant::now() + timeout;
    let mut out = pipe_reader(started.stdout.take());
    let mut err = pipe_reader(started.stderr.take());
    let (mut so, mut se) = (LineSplitter::default(), LineSplitter::default());
    let (mut ob, mut eb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let mut lines = Vec::new();
    let send_lines = |kind: u8, lines: &mut Vec<String>| {
        let mut chunk = Vec::new();
        for l in lines.drain(..) {
            let data = if l == "\n" { "" } else { l.as_str() };
            chunk.extend_from_slice(&frame(kind, Some(data), None));
        }
        Bytes::from(chunk)
    };
    let mut exit = None;
    let mut timed_out = false;
    while out.is_some() || err.is_some() || exit.is_none() {
        tokio::select! {
            n = read_some(&mut out, &mut ob) => match n {
                Some(n) => { so.feed(&ob[..n], &mut lines); let _ = tx.send(send_lines(0, &mut lines)).await; }
                None => out = None,
            },
            n = read_some(&mut err, &mut eb) => match n {
                Some(n) => { se.feed(&eb[..n], &mut lines); let _ = tx.send(send_lines(1, &mut lines)).await; }
                None => err = None,
            },
            r = &mut started.exit, if exit.is_none() => exit = Some(r.ok()),
            _ = sleep_until_opt(Some(deadline)), if !timed_out => {
                timed_out = true;
                let _ = execbox_jail::process::signal_group(started.pid, libc::SIGKILL);
                if let Some(leaf) = &started.leaf {
                    let _ = leaf.kill_all();
                }
            }
        }
    }
    so.finish(&mut lines);
    let _ = tx.send(send_lines(0, &mut lines)).await;
    se.finish(&mut lines);
    let _ = tx.send(send_lines(1, &mut lines)).await;
    let last = if timed_out {
        frame(3, Some("timeout"), None)
    } else {
        let code = match exit.flatten() {
            Some(execbox_jail::process::ExitInfo::Code(c)) => c,
            Some(execbox_jail::process::ExitInfo::Signal(s)) => 128 + s,
            None => -1,
        };
        frame(2, None, Some(code))
    };
    let _ = tx.send(last).await;
    drop(tx);
    if let Some(leaf) = started.leaf {
        tokio::task::spawn_blocking(move || {
            let _ = leaf.kill_all();
            let _ = leaf.remove();
        });
    }
}
