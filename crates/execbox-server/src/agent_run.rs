//! Client of the agent's run API (`/execbox/…`, see `execbox_proto::run`): what the isol8 and
//! session-execute surfaces call to write files, run, list and signal inside a sandbox.

use std::path::Path;

use bytes::Bytes;
use execbox_proto::run::{
    EntrypointOutput, KillRequest, ListFilesResponse, PrestartRequest, PrestartResponse, RunError,
    RunEvent, RunRequest, RunResult, WriteFilesRequest, WriteFilesResponse, ENTRYPOINT_PATH,
    KILL_PATH, LIST_FILES_PATH, PRESTART_PATH, RUN_PATH, WRITE_FILES_PATH,
};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;

use crate::agent_client;

/// Errors of a run API call.
#[derive(Debug, thiserror::Error)]
pub enum AgentCallError {
    /// The agent refused the request (4xx): the caller's mistake, named in `message`.
    #[error("{}", .1.message)]
    Refused(StatusCode, RunError),
    /// The agent could not be reached, failed, or answered nonsense.
    #[error("{0}")]
    Failed(String),
}

impl AgentCallError {
    /// Whether the agent answered 404 (no such file or process).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Refused(s, _) if *s == StatusCode::NOT_FOUND)
    }
}

async fn send(
    socket: &Path,
    method: Method,
    uri: &str,
    body: Vec<u8>,
) -> Result<http::Response<hyper::body::Incoming>, AgentCallError> {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header(http::header::HOST, "agent")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| AgentCallError::Failed(e.to_string()))?;
    let resp = agent_client::send(socket, req)
        .await
        .map_err(|e| AgentCallError::Failed(e.to_string()))?;
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let body = collect(resp).await?;
    let err = serde_json::from_slice::<RunError>(&body).unwrap_or_else(|_| RunError {
        kind: "internal".into(),
        message: String::from_utf8_lossy(&body).into_owned(),
    });
    if status.is_client_error() {
        Err(AgentCallError::Refused(status, err))
    } else {
        Err(AgentCallError::Failed(err.message))
    }
}

async fn collect(resp: http::Response<hyper::body::Incoming>) -> Result<Bytes, AgentCallError> {
    resp.into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| AgentCallError::Failed(format!("reading the agent's answer: {e}")))
}

async fn call<T: serde::de::DeserializeOwned>(
    socket: &Path,
    method: Method,
    uri: &str,
    body: Vec<u8>,
) -> Result<T, AgentCallError> {
    let resp = send(socket, method, uri, body).await?;
    let bytes = collect(resp).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| AgentCallError::Failed(format!("unexpected answer from the agent: {e}")))
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// The entrypoint's kept output and how it ended.
pub async fn entrypoint_output(socket: &Path) -> Result<EntrypointOutput, AgentCallError> {
    call(socket, Method::GET, ENTRYPOINT_PATH, Vec::new()).await
}

/// Starts `runtime`'s interpreter, waiting for the sandbox's next run.
pub async fn prestart(socket: &Path, runtime: &str) -> Result<PrestartResponse, AgentCallError> {
    let req = PrestartRequest {
        runtime: runtime.to_string(),
    };
    call(socket, Method::POST, PRESTART_PATH, json(&req)).await
}

/// Runs to completion.
pub async fn run(socket: &Path, req: &RunRequest) -> Result<RunResult, AgentCallError> {
    let mut req = req.clone();
    req.stream = false;
    call(socket, Method::POST, RUN_PATH, json(&req)).await
}

/// Runs, yielding events as they come; the last is `Result` or `Error`.
pub async fn run_stream(
    socket: &Path,
    req: &RunRequest,
) -> Result<mpsc::Receiver<RunEvent>, AgentCallError> {
    let mut req = req.clone();
    req.stream = true;
    let resp = send(socket, Method::POST, RUN_PATH, json(&req)).await?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        let mut ended = false;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(i) = memchr_newline(&buf) {
                let line: Vec<u8> = buf.drain(..=i).collect();
                match serde_json::from_slice::<RunEvent>(&line[..i]) {
                    Ok(ev) => {
                        ended |= matches!(ev, RunEvent::Result { .. } | RunEvent::Error { .. });
                        if tx.send(ev).await.is_err() {
                            // The caller is gone; the run goes on to its end inside the agent.
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "bad run event from the agent"),
                }
            }
        }
        if !ended {
            let _ = tx
                .send(RunEvent::Error {
                    message: "the sandbox stopped before the run finished".into(),
                })
                .await;
        }
    });
    Ok(rx)
}

fn memchr_newline(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

/// Writes files, all or none.
pub async fn write_files(
    socket: &Path,
    req: &WriteFilesRequest,
) -> Result<WriteFilesResponse, AgentCallError> {
    call(socket, Method::POST, WRITE_FILES_PATH, json(req)).await
}

fn query_value(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Lists a path.
pub async fn list_files(
    socket: &Path,
    path: &str,
    recursive: bool,
) -> Result<ListFilesResponse, AgentCallError> {
    let uri = format!(
        "{LIST_FILES_PATH}?path={}&recursive={recursive}",
        query_value(path)
    );
    call(socket, Method::GET, &uri, Vec::new()).await
}

/// Sends a signal to one process.
pub async fn kill(socket: &Path, pid: i32, signal: i32) -> Result<(), AgentCallError> {
    let body = json(&KillRequest { pid, signal });
    send(socket, Method::POST, KILL_PATH, body).await.map(drop)
}

/// Reads a whole file through the execd download route; `None` when it does not exist.
pub async fn read_file(
    socket: &Path,
    path: &str,
    max_bytes: u64,
) -> Result<Option<Bytes>, AgentCallError> {
    let uri = format!("/files/download?path={}", query_value(path));
    let req = Request::builder()
        .method(Method::GET)
        .uri(uri)
        .header(http::header::HOST, "agent")
        .body(Full::new(Bytes::new()))
        .map_err(|e| AgentCallError::Failed(e.to_string()))?;
    let resp = agent_client::send(socket, req)
        .await
        .map_err(|e| AgentCallError::Failed(e.to_string()))?;
    match resp.status() {
        s if s.is_success() => {
            // Held whole in the server's memory (the answer is one JSON value): bounded.
            let limited = http_body_util::Limited::new(resp.into_body(), max_bytes as usize);
            match limited.collect().await {
                Ok(body) => Ok(Some(body.to_bytes())),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    Err(AgentCallError::Refused(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        RunError {
                            kind: "too_large".into(),
                            message: format!("{path}: the file is larger than {max_bytes} bytes"),
                        },
                    ))
                }
                Err(e) => Err(AgentCallError::Failed(format!(
                    "reading the agent's answer: {e}"
                ))),
            }
        }
        StatusCode::NOT_FOUND => Ok(None),
        s => {
            let body = collect(resp).await.unwrap_or_default();
            let message = String::from_utf8_lossy(&body).into_owned();
            let err = RunError {
                kind: "invalid".into(),
                message,
            };
            if s.is_client_error() {
                Err(AgentCallError::Refused(s, err))
            } else {
                Err(AgentCallError::Failed(err.message))
            }
        }
    }
}
