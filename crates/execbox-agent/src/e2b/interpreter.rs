//! The code interpreter (spec §4): `POST /execute` streaming newline-delimited JSON in E2B's
//! shapes, and `/contexts`, on the agent's code contexts (`code.rs`, `kernel.rs`: the same
//! kernels as execd's `/code` and Leap0). Errors are plain text.
//!
//! `number_of_executions` comes last before `end_of_execution`: execbox's kernels report the
//! execution count when the cell ends, not when it starts (the SDKs take it from any line).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::code::{Context, Language, RunError};
use crate::kernel::{KernelLanguage, KernelOutput};
use crate::AppState;

/// Silence after which a `keepalive` line goes out.
const KEEPALIVE: Duration = Duration::from_secs(5);
/// Largest request body.
const MAX_BODY: usize = 16 << 20;
/// How often a busy context is tried again (executions queue, as upstream's do).
const BUSY_RETRY: Duration = Duration::from_millis(50);

/// A plain-text error.
pub(crate) struct TextError(StatusCode, String);

impl IntoResponse for TextError {
    fn into_response(self) -> Response {
        let mut resp = (self.0, self.1).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    }
}

fn bad(msg: impl Into<String>) -> TextError {
    TextError(StatusCode::BAD_REQUEST, msg.into())
}

fn not_found(id: &str) -> TextError {
    TextError(StatusCode::NOT_FOUND, format!("Context {id} not found"))
}

/// E2B's language names (lower-cased, `js`, `ts` aliases).
fn parse_language(raw: &str) -> Result<Language, TextError> {
    let name = raw.trim().to_ascii_lowercase();
    let name = match name.as_str() {
        "js" => "javascript",
        "ts" => "typescript",
        "py" | "python3" => "python",
        "sh" => "bash",
        other => other,
    };
    Language::parse(name).map_err(|e| bad(format!("Unsupported language: {raw} ({e})")))
}

fn context_json(ctx: &Context) -> Value {
    json!({ "id": ctx.id, "language": ctx.language.name(), "cwd": ctx.cwd.to_string_lossy() })
}

async fn read_json<T: for<'de> Deserialize<'de> + Default>(body: Body) -> Result<T, TextError> {
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|e| bad(format!("reading the request: {e}")))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes).map_err(|e| bad(format!("invalid JSON body: {e}")))
}

#[derive(Debug, Default, Deserialize)]
struct CreateContext {
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    cwd: Option<String>,
}

/// `POST /contexts`.
pub async fn create_context(
    State(app): State<Arc<AppState>>,
    body: Body,
) -> Result<Json<Value>, TextError> {
    let req: CreateContext = read_json(body).await?;
    let language = parse_language(req.language.as_deref().unwrap_or("python"))?;
    let cwd = crate::code::prepare_cwd(&app, req.cwd.as_deref()).map_err(|e| bad(e.to_string()))?;
    let ctx = app
        .contexts
        .create(&app, language, cwd, Vec::new())
        .await
        .map_err(|e| match e {
            crate::error::ApiError::BadRequest(m) => bad(m),
            other => TextError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        })?;
    Ok(Json(context_json(&ctx)))
}

/// `GET /contexts`: with the default Python and JavaScript contexts, made on first use as
/// upstream makes them at start (a language whose runtime is missing is left out).
pub async fn list_contexts(State(app): State<Arc<AppState>>) -> Json<Value> {
    for lang in [KernelLanguage::Python, KernelLanguage::JavaScript] {
        if let Err(e) = app.contexts.default_for(&app, Language::Kernel(lang)).await {
            tracing::debug!(error = %e, "no default context");
        }
    }
    let mut all = app.contexts.all();
    all.sort_by(|a, b| a.id.cmp(&b.id));
    Json(Value::Array(all.iter().map(|c| context_json(c)).collect()))
}

/// `DELETE /contexts/{id}`.
pub async fn delete_context(
    State(app): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, TextError> {
    if !app.contexts.remove(&id) {
        return Err(not_found(&id));
    }
    Ok(Json(Value::Null))
}

/// `POST /contexts/{id}/restart`: a fresh interpreter under the same id.
pub async fn restart_context(
    State(app): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, TextError> {
    let ctx = app.contexts.get(&id).ok_or_else(|| not_found(&id))?;
    restarting(&app).insert(id.clone());
    let result = ctx.restart(&app).await;
    restarting(&app).remove(&id);
    result.map_err(|e| TextError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(Value::Null))
}

fn restarting(app: &AppState) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
    match app.e2b.restarting.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

#[derive(Debug, Default, Deserialize)]
struct ExecuteRequest {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    context_id: Option<String>,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    env_vars: Option<BTreeMap<String, Value>>,
}

fn now_iso() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn line(v: Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

/// A MIME bundle as E2B's result: known types by name, the rest in `extra`.
fn result_json(data: Map<String, Value>, is_main: bool) -> Value {
    let mut out = Map::new();
    out.insert("type".into(), json!("result"));
    let mut extra = Map::new();
    for (mime, value) in data {
        let key = match mime.as_str() {
            "text/plain" => {
                let text = value.as_str().map(unquote).unwrap_or_default();
                out.insert("text".into(), json!(text));
                continue;
            }
            "text/html" => "html",
            "text/markdown" => "markdown",
            "image/svg+xml" => "svg",
            "image/png" => "png",
            "image/jpeg" => "jpeg",
            "application/pdf" => "pdf",
            "text/latex" => "latex",
            "application/json" => "json",
            "application/javascript" => "javascript",
            "e2b/data" => "data",
            "e2b/chart" => "chart",
            _ => {
                extra.insert(mime, value);
                continue;
            }
        };
        out.insert(key.into(), value);
    }
    out.insert("extra".into(), Value::Object(extra));
    out.insert("is_main_result".into(), json!(is_main));
    Value::Object(out)
}

/// `'x'` or `"x"` → `x` (one layer).
fn unquote(s: &str) -> String {
    let b = s.as_bytes();
    if b.len() >= 2 && (b[0] == b'\'' || b[0] == b'"') && b[b.len() - 1] == b[0] {
        s[1..s.len() - 1].to_string()
    } else {
        s.to_string()
    }
}

fn error_line(name: &str, value: &str, traceback: &str) -> Value {
    json!({ "type": "error", "name": name, "value": value, "traceback": traceback })
}

/// The lines of one kernel output (none for the end, which the caller words).
fn kernel_lines(out: KernelOutput, count: &mut Option<u64>) -> Vec<Value> {
    match out {
        KernelOutput::Stdout(t) => {
            vec![json!({"type": "stdout", "text": t, "timestamp": now_iso()})]
        }
        KernelOutput::Stderr(t) => {
            vec![json!({"type": "stderr", "text": t, "timestamp": now_iso()})]
        }
        KernelOutput::Display(data) => vec![result_json(data, false)],
        KernelOutput::Result {
            execution_count,
            data,
        } => {
            *count = Some(execution_count);
            vec![result_json(data, true)]
        }
        KernelOutput::Error {
            ename,
            evalue,
            traceback,
        } => vec![error_line(&ename, &evalue, &traceback.join("\n"))],
        KernelOutput::TimedOut { .. } => {
            vec![error_line("TimeoutError", "the execution timed out", "")]
        }
        KernelOutput::Done { execution_count } => {
            *count = Some(execution_count);
            Vec::new()
        }
        KernelOutput::Died(why) => vec![error_line("UnexpectedEndOfExecution", &why, "")],
    }
}

/// `POST /execute`.
pub async fn execute(State(app): State<Arc<AppState>>, body: Body) -> Result<Response, TextError> {
    let req: ExecuteRequest = read_json(body).await?;
    let code = req.code.unwrap_or_default();
    let context_id = req.context_id.filter(|c| !c.is_empty());
    let language = req.language.filter(|l| !l.is_empty());
    if context_id.is_some() && language.is_some() {
        return Err(bad(
            "Only one of context_id or language can be provided, not both",
        ));
    }
    let mut env = Vec::new();
    for (k, v) in req.env_vars.unwrap_or_default() {
        let v = match v {
            Value::String(s) => s,
            Value::Null => continue,
            other => other.to_string(),
        };
        if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
            return Err(bad(format!("invalid environment variable {k:?}")));
        }
        env.push((k, v));
    }
    let ctx = match (context_id, language) {
        (Some(id), _) => app.contexts.get(&id).ok_or_else(|| not_found(&id))?,
        (None, lang) => {
            let language = match lang {
                Some(l) => parse_language(&l)?,
                None => Language::Kernel(KernelLanguage::Python),
            };
            app.contexts
                .default_for(&app, language)
                .await
                .map_err(|e| match e {
                    crate::error::ApiError::BadRequest(m) => bad(m),
                    other => TextError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
                })?
        }
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        if ctx.bash_session().is_some() {
            run_bash(&app, &ctx, &code, &tx).await;
        } else {
            run_kernel(&app, &ctx, code, env, &tx).await;
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(resp)
}

async fn run_kernel(
    app: &Arc<AppState>,
    ctx: &Arc<Context>,
    code: String,
    env: Vec<(String, String)>,
    tx: &mpsc::Sender<Bytes>,
) {
    // Executions in one context queue, as upstream's do.
    let mut rx = loop {
        match ctx.execute_kernel(app.clone(), code.clone(), env.clone(), None) {
            Ok(rx) => break rx,
            Err(RunError::Busy) if !tx.is_closed() => tokio::time::sleep(BUSY_RETRY).await,
            Err(RunError::Busy) => return,
            Err(e) => {
                let _ = tx
                    .send(line(error_line("ExecutionError", &e.to_string(), "")))
                    .await;
                let _ = tx.send(line(json!({"type": "end_of_execution"}))).await;
                return;
            }
        }
    };
    if ctx.take_restarted() {
        let text = "[the interpreter restarted; earlier state is lost]\n";
        let _ = tx
            .send(line(
                json!({"type": "stderr", "text": text, "timestamp": now_iso()}),
            ))
            .await;
    }
    let mut count = None;
    loop {
        let out = tokio::select! {
            out = rx.recv() => out,
            _ = tokio::time::sleep(KEEPALIVE) => {
                if tx.send(line(json!({"type": "keepalive"}))).await.is_err() {
                    ctx.interrupt();
                    return;
                }
                continue;
            }
            _ = tx.closed() => {
                // The client went away: the run is interrupted.
                ctx.interrupt();
                return;
            }
        };
        let Some(mut out) = out else { break };
        if let KernelOutput::Died(why) = &out {
            if restarting(app).contains(&ctx.id) {
                out = KernelOutput::Error {
                    ename: "ContextRestarting".into(),
                    evalue: "the context was restarted during the execution".into(),
                    traceback: vec![why.clone()],
                };
                let _ = tx.send(line(kernel_lines(out, &mut count).remove(0))).await;
                break;
            }
        }
        let done = matches!(out, KernelOutput::Done { .. } | KernelOutput::Died(_));
        for l in kernel_lines(out, &mut count) {
            if tx.send(line(l)).await.is_err() {
                ctx.interrupt();
                return;
            }
        }
        if done {
            break;
        }
    }
    if let Some(n) = count {
        let _ = tx
            .send(line(
                json!({"type": "number_of_executions", "execution_count": n}),
            ))
            .await;
    }
    let _ = tx.send(line(json!({"type": "end_of_execution"}))).await;
}

/// A bash context: the session's execd events (`data: {…}` frames) as E2B lines.
async fn run_bash(app: &Arc<AppState>, ctx: &Arc<Context>, code: &str, tx: &mpsc::Sender<Bytes>) {
    let Some(session) = ctx.bash_session().cloned() else {
        return;
    };
    while session.is_busy() {
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(BUSY_RETRY).await;
    }
    let (stx, mut srx) = mpsc::channel::<Bytes>(64);
    let sink = crate::sse::Sink {
        tx: stx,
        gone: false,
    };
    let run = {
        let app = app.clone();
        let session = session.clone();
        let code = code.to_string();
        tokio::spawn(async move { crate::session::run_code(&app, &session, &code, sink).await })
    };
    let mut pending = Vec::new();
    loop {
        let chunk = tokio::select! {
            c = srx.recv() => c,
            _ = tokio::time::sleep(KEEPALIVE) => {
                if tx.send(line(json!({"type": "keepalive"}))).await.is_err() {
                    session.interrupt();
                    return;
                }
                continue;
            }
            _ = tx.closed() => {
                session.interrupt();
                return;
            }
        };
        let Some(chunk) = chunk else { break };
        pending.extend_from_slice(&chunk);
        while let Some(i) = pending.windows(2).position(|w| w == b"\n\n") {
            let frame: Vec<u8> = pending.drain(..i + 2).collect();
            let text = String::from_utf8_lossy(&frame);
            let Some(json_text) = text.trim().strip_prefix("data: ") else {
                continue;
            };
            let Ok(ev) = serde_json::from_str::<Value>(json_text) else {
                continue;
            };
            let out = match ev["type"].as_str() {
                Some(kind @ ("stdout" | "stderr")) => {
                    let t = ev["text"].as_str().unwrap_or("");
                    Some(json!({"type": kind, "text": t, "timestamp": now_iso()}))
                }
                Some("error") => {
                    let e = &ev["error"];
                    let tb: Vec<String> = e["traceback"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|t| t.as_str().map(String::from))
                                .collect()
                        })
                        .unwrap_or_default();
                    Some(error_line(
                        e["ename"].as_str().unwrap_or("Error"),
                        e["evalue"].as_str().unwrap_or(""),
                        &tb.join("\n"),
                    ))
                }
                // An execd error envelope (`{"code","message"}`).
                None if ev.get("message").is_some() => Some(error_line(
                    "ExecutionError",
                    ev["message"].as_str().unwrap_or(""),
                    "",
                )),
                _ => None,
            };
            if let Some(out) = out {
                if tx.send(line(out)).await.is_err() {
                    session.interrupt();
                    return;
                }
            }
        }
    }
    let _ = run.await;
    let _ = tx.send(line(json!({"type": "end_of_execution"}))).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_map_mime_types() {
        let mut data = Map::new();
        data.insert("text/plain".into(), json!("'hi'"));
        data.insert("image/png".into(), json!("iVBOR"));
        data.insert("application/x-custom".into(), json!(1));
        assert_eq!(
            result_json(data, true),
            json!({"type": "result", "text": "hi", "png": "iVBOR",
                   "extra": {"application/x-custom": 1}, "is_main_result": true})
        );
        assert_eq!(
            result_json(Map::new(), false),
            json!({"type": "result", "extra": {}, "is_main_result": false})
        );
        assert_eq!(unquote("\"a\""), "a");
        assert_eq!(unquote("'"), "'");
        assert_eq!(unquote("42"), "42");
    }

    #[test]
    fn languages_take_e2b_aliases() {
        assert_eq!(
            parse_language("JS").ok().map(Language::name),
            Some("javascript")
        );
        assert_eq!(
            parse_language("ts").ok().map(Language::name),
            Some("typescript")
        );
        assert_eq!(
            parse_language("bash").ok().map(Language::name),
            Some("bash")
        );
        assert!(parse_language("cobol").is_err());
    }

    #[test]
    fn kernel_outputs_become_lines() {
        let mut count = None;
        let l = kernel_lines(
            KernelOutput::Error {
                ename: "ZeroDivisionError".into(),
                evalue: "division by zero".into(),
                traceback: vec!["a".into(), "b".into()],
            },
            &mut count,
        );
        assert_eq!(
            l,
            vec![
                json!({"type": "error", "name": "ZeroDivisionError", "value": "division by zero", "traceback": "a\nb"})
            ]
        );
        assert!(kernel_lines(KernelOutput::Done { execution_count: 3 }, &mut count).is_empty());
        assert_eq!(count, Some(3));
        let l = kernel_lines(KernelOutput::Stdout("x\n".into()), &mut count);
        assert_eq!(l[0]["type"], "stdout");
        assert_eq!(l[0]["text"], "x\n");
        assert!(l[0]["timestamp"].is_string());
    }
}
