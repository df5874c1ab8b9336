//! The agent's run API (`/execbox/…`): one-shot executions with their input files, output caps
//! and accounting, plus direct file writes, listings and signals. It is the single engine under
//! the isol8 and session-execute surfaces, which translate it into their own wire shapes on the
//! server.

use std::collections::BTreeMap;

/// Route of [`RunRequest`].
pub const RUN_PATH: &str = "/execbox/run";
/// Route of [`WriteFilesRequest`].
pub const WRITE_FILES_PATH: &str = "/execbox/files/write";
/// Route of the listing (`?path=&recursive=`), answered with [`ListFilesResponse`].
pub const LIST_FILES_PATH: &str = "/execbox/files/list";
/// Route of [`KillRequest`].
pub const KILL_PATH: &str = "/execbox/kill";
/// Route of the entrypoint's kept output, answered with [`EntrypointOutput`].
pub const ENTRYPOINT_PATH: &str = "/execbox/entrypoint";
/// Route of [`PrestartRequest`].
pub const PRESTART_PATH: &str = "/execbox/prestart";
/// [`KillRequest::pid`] meaning every process of the sandbox but its agent.
pub const EVERY_PROCESS: i32 = -1;

/// A file to write; `content` is base64.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileContent {
    /// Absolute path inside the sandbox.
    pub path: String,
    /// Base64 of the bytes.
    pub content: String,
}

/// `POST /execbox/files/write`: every file is written through a temporary file and a rename,
/// all or none.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct WriteFilesRequest {
    /// Files, absolute paths.
    pub files: Vec<FileContent>,
    /// Directories the files must resolve under (after following symlinks).
    pub roots: Vec<String>,
}

/// Answer of [`WriteFilesRequest`].
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct WriteFilesResponse {
    /// Absolute paths written, in request order.
    pub written: Vec<String>,
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ListedFile {
    /// Absolute path.
    pub path: String,
    /// Base name.
    pub name: String,
    /// `file`, `directory`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, RFC 3339 UTC.
    #[serde(rename = "modifiedAt")]
    pub modified_at: String,
}

/// Answer of the listing route.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ListFilesResponse {
    /// The listed path.
    pub path: String,
    /// Entries sorted by path.
    pub files: Vec<ListedFile>,
}

/// `POST /execbox/kill`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct KillRequest {
    /// Pid inside the sandbox; [`EVERY_PROCESS`] for all of them (the agent excepted).
    pub pid: i32,
    /// Signal number.
    pub signal: i32,
}

/// `POST /execbox/prestart`: start an interpreter now, waiting for the sandbox's next run
/// (one run only), so that run does not pay for the interpreter's start-up. Answered once the
/// interpreter is up with [`PrestartResponse`]; a runtime the agent cannot pre-start is a 400.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct PrestartRequest {
    /// `python` (the only one so far).
    pub runtime: String,
}

/// Answer of [`PrestartRequest`].
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct PrestartResponse {
    /// Pid of the waiting interpreter.
    pub pid: i32,
    /// Milliseconds its start-up took.
    pub startup_ms: u64,
}

/// `POST /execbox/run`.
#[derive(Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RunRequest {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Working directory (absolute).
    pub cwd: String,
    /// Create `cwd` (and its parents) when missing.
    pub create_cwd: bool,
    /// Environment over the sandbox's.
    pub env: BTreeMap<String, String>,
    /// Standard input; none means `/dev/null`.
    pub stdin: Option<String>,
    /// Kill the execution after this long; 0 means never.
    pub timeout_ms: u64,
    /// Bytes of each stream kept in the result (and streamed); the rest is counted only.
    pub max_output_bytes: u64,
    /// Files written (all or none) before the run.
    pub files: Vec<FileContent>,
    /// Roots the `files` must resolve under.
    pub file_roots: Vec<String>,
    /// A private program file written before the run and removed after it (never reported).
    pub program: Option<FileContent>,
    /// Files read after the run, returned base64; missing ones are skipped.
    pub output_paths: Vec<String>,
    /// Report regular files under this directory changed during the run.
    pub track_changes_under: Option<String>,
    /// Leave processes the run started in the background alive after it ends (persistent
    /// sessions); otherwise its whole execution cgroup is killed.
    pub keep_background: bool,
    /// Answer as NDJSON [`RunEvent`]s instead of one [`RunResult`].
    pub stream: bool,
}

impl std::fmt::Debug for RunRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunRequest")
            .field("argv", &self.argv)
            .field("cwd", &self.cwd)
            .field("env", &crate::redact::MaskedMap(Some(&self.env)))
            .field("timeout_ms", &self.timeout_ms)
            .finish_non_exhaustive()
    }
}

/// How a run ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RunResult {
    /// Kept standard output (at most `max_output_bytes`, cut on a UTF-8 boundary).
    pub stdout: String,
    /// Kept standard error.
    pub stderr: String,
    /// Bytes the process wrote to standard output in all.
    pub stdout_bytes: u64,
    /// Bytes written to standard error in all.
    pub stderr_bytes: u64,
    /// Exit code; 128 + N when killed by signal N.
    pub exit_code: i32,
    /// The killing signal, if any.
    pub signal: Option<i32>,
    /// Killed because the timeout passed.
    pub timed_out: bool,
    /// Killed by the out-of-memory killer.
    pub oom_killed: bool,
    /// Wall time from start to exit, in milliseconds.
    pub duration_ms: u64,
    /// Peak memory of the run's cgroup, in bytes.
    pub memory_peak_bytes: u64,
    /// User plus system CPU time of the run's cgroup, in milliseconds.
    pub cpu_time_ms: u64,
    /// Output files, path to base64.
    pub files: BTreeMap<String, String>,
    /// Regular files written by the request or changed during the run, sorted.
    pub files_written: Vec<String>,
    /// The run was served by a pre-started interpreter ([`PrestartRequest`]) rather than a
    /// process started for it.
    pub prestarted: bool,
}

impl RunResult {
    /// Whether either stream produced more than was kept.
    pub fn truncated(&self) -> bool {
        self.stdout_bytes > self.stdout.len() as u64 || self.stderr_bytes > self.stderr.len() as u64
    }
}

/// One line of a streamed run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RunEvent {
    /// Output on standard output (whole UTF-8 characters).
    Stdout {
        /// Text.
        data: String,
    },
    /// Output on standard error.
    Stderr {
        /// Text.
        data: String,
    },
    /// The end of the run.
    Result {
        /// The outcome; its `stdout`/`stderr` hold what was kept.
        result: RunResult,
    },
    /// The run could not be started or completed.
    Error {
        /// Why.
        message: String,
    },
}

/// Error body of the run routes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunError {
    /// `invalid`, `not_found` or `internal`.
    pub kind: String,
    /// Message naming the field.
    pub message: String,
}

/// Splits `bytes` after the longest prefix that is whole UTF-8, so a multi-byte character cut by
/// a read is completed by the next one instead of becoming replacement characters.
pub fn utf8_prefix_len(bytes: &[u8]) -> usize {
    match std::str::from_utf8(bytes) {
        Ok(_) => bytes.len(),
        Err(e) => match e.error_len() {
            // An invalid sequence in the middle: everything is flushed (lossily) as is.
            Some(_) => bytes.len(),
            None => e.valid_up_to(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_prefix_stops_before_a_cut_character() {
        let s = "aé".as_bytes();
        assert_eq!(utf8_prefix_len(s), 3);
        assert_eq!(utf8_prefix_len(&s[..2]), 1);
        assert_eq!(utf8_prefix_len(b"a\xffb"), 3);
    }

    #[test]
    fn events_are_tagged() {
        let e = RunEvent::Stdout { data: "x".into() };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"stdout","data":"x"}"#
        );
        let back: RunEvent = serde_json::from_str(r#"{"type":"error","message":"m"}"#).unwrap();
        assert_eq!(
            back,
            RunEvent::Error {
                message: "m".into()
            }
        );
    }

    #[test]
    fn truncation_compares_totals_with_what_was_kept() {
        let mut r = RunResult {
            stdout: "ab".into(),
            stdout_bytes: 2,
            ..Default::default()
        };
        assert!(!r.truncated());
        r.stdout_bytes = 3;
        assert!(r.truncated());
    }
}

/// `GET /execbox/entrypoint`: what the sandbox's entrypoint wrote (stdout and stderr together,
/// the last bytes only when it wrote more than the agent keeps) and how it ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EntrypointOutput {
    /// The command, as started; empty when the sandbox has no entrypoint.
    pub argv: Vec<String>,
    /// Its output, as text (invalid UTF-8 replaced).
    pub output: String,
    /// Bytes written before the kept part (0: the output is whole).
    pub dropped_bytes: u64,
    /// How it ended (`exit code 0`, `killed by signal 9`); none while it runs.
    pub ended: Option<String>,
}
