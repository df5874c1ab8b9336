//! A real `execbox serve` on loopback, and a small client for its lifecycle API and for the
//! execd `/command` stream of a sandbox.

#![allow(dead_code)]

pub mod procs;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub struct TestServer {
    pub base: String,
    pub state_dir: PathBuf,
    pub port: u16,
    child: Option<Child>,
    keep_state: bool,
    /// Keys whose sandboxes are deleted when the server is dropped (besides the keyless ones).
    cleanup_keys: Vec<String>,
}

/// The templates directory every test server shares (`--templates-dir`), so that a template
/// (the code-interpreter one: numpy, pandas, matplotlib…) is built once for all test runs of
/// the machine, and test servers find it built.
pub const TEST_TEMPLATES_DIR: &str = "/var/tmp/execbox-test-templates";

/// The image whose sandboxes have the code-interpreter template (its data stack).
pub const CODE_INTERPRETER_IMAGE: &str = "opensandbox/code-interpreter:v1.1.0";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn unique(name: &str) -> String {
    format!(
        "{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    )
}

impl TestServer {
    pub fn start() -> Self {
        let state_dir = std::env::temp_dir().join(unique("execbox-test-state"));
        Self::start_on(state_dir, free_port(), None)
    }

    pub fn start_with_key(key: &str) -> Self {
        let state_dir = std::env::temp_dir().join(unique("execbox-test-state"));
        Self::start_on(state_dir, free_port(), Some(key))
    }

    /// Starts the server the way a non-interactive shell would: with SIGINT and SIGQUIT
    /// ignored, which must not reach user code.
    pub fn start_on(state_dir: PathBuf, port: u16, key: Option<&str>) -> Self {
        Self::start_full(state_dir, port, key, None)
    }

    /// Starts the server on `state_dir` and `port` with the configuration file `config`.
    pub fn start_on_with_config(state_dir: PathBuf, port: u16, config: &Path) -> Self {
        Self::start_full(state_dir, port, None, Some(config))
    }

    /// Starts the server with a configuration file holding `config_toml`.
    pub fn start_with_config(config_toml: &str) -> Self {
        let state_dir = std::env::temp_dir().join(unique("execbox-test-state"));
        let config = std::env::temp_dir().join(unique("execbox-test-config"));
        std::fs::write(&config, config_toml).expect("write config");
        let server = Self::start_full(state_dir, free_port(), None, Some(&config));
        // Read at start only.
        let _ = std::fs::remove_file(&config);
        server
    }

    fn start_full(state_dir: PathBuf, port: u16, key: Option<&str>, config: Option<&Path>) -> Self {
        Self::start_env(state_dir, port, key, config, &[])
    }

    /// Starts a server whose environment also has `env` (over the harness's own settings).
    pub fn start_with_env(config_toml: &str, env: &[(&str, &str)]) -> Self {
        let state_dir = std::env::temp_dir().join(unique("execbox-test-state"));
        let config = std::env::temp_dir().join(unique("execbox-test-config"));
        std::fs::write(&config, config_toml).expect("write config");
        let server = Self::start_env(state_dir, free_port(), None, Some(&config), env);
        let _ = std::fs::remove_file(&config);
        server
    }

    fn start_env(
        state_dir: PathBuf,
        port: u16,
        key: Option<&str>,
        config: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Self {
        let exe = env!("CARGO_BIN_EXE_execbox");
        let config = config
            .map(|c| format!(" --config {}", c.display()))
            .unwrap_or_default();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(format!(
                "trap '' INT QUIT; exec {exe} serve --listen 127.0.0.1:{port} --state-dir {}{config}",
                state_dir.display()
            ))
            .env("RUST_LOG", "warn")
            .env("EXECBOX_TEMPLATES_DIR", TEST_TEMPLATES_DIR)
            // Tests send traffic to loopback only: no image comes from elsewhere.
            .env("EXECBOX_ALLOWED_REGISTRIES", "127.0.0.1")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        match key {
            Some(k) => cmd.env("EXECBOX_API_KEY", k),
            None => cmd.env_remove("EXECBOX_API_KEY"),
        };
        let child = cmd.spawn().expect("start execbox serve");
        let server = TestServer {
            base: format!("http://127.0.0.1:{port}"),
            state_dir,
            port,
            child: Some(child),
            keep_state: false,
            cleanup_keys: key.map(str::to_string).into_iter().collect(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if ureq::get(&format!("{}/health", server.base)).call().is_ok() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("server did not come up");
    }

    /// Also deletes the sandboxes of these keys' tenants when dropped.
    pub fn cleaning_up_for(mut self, keys: &[&str]) -> Self {
        self.cleanup_keys.extend(keys.iter().map(|k| k.to_string()));
        self
    }

    /// Kills the server process (SIGKILL), leaving its sandboxes and state behind.
    pub fn crash(mut self) -> PathBuf {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.keep_state = true;
        self.state_dir.clone()
    }

    /// Pid of the server process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `POST /v1/sandboxes`; returns (status, body).
    pub fn create_raw(&self, body: &str) -> (u16, Value) {
        let r = ureq::post(&self.url("/v1/sandboxes"))
            .set("Content-Type", "application/json")
            .send_string(body);
        into_pair(r)
    }

    pub fn create(&self, extra: Value) -> Sandbox<'_> {
        let mut body = json!({
            "image": {"uri": "default"},
            "entrypoint": ["tail", "-f", "/dev/null"],
            "resourceLimits": {"cpu": "1", "memory": "512Mi"},
        });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let (status, v) = self.create_raw(&body.to_string());
        assert_eq!(status, 202, "create failed: {v}");
        let id = v["id"].as_str().expect("id").to_string();
        let (s, ep) = self.get(&format!("/v1/sandboxes/{id}/endpoints/44772"));
        assert_eq!(s, 200, "{ep}");
        Sandbox {
            server: self,
            id,
            endpoint: format!("http://{}", ep["endpoint"].as_str().expect("endpoint")),
            token: ep["headers"]["X-EXECD-ACCESS-TOKEN"]
                .as_str()
                .expect("token")
                .to_string(),
        }
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        into_pair(ureq::get(&self.url(path)).call())
    }

    pub fn delete(&self, path: &str) -> u16 {
        match ureq::delete(&self.url(path)).call() {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(s, _)) => s,
            Err(e) => panic!("{e}"),
        }
    }

    pub fn post(&self, path: &str, body: &str) -> (u16, Value) {
        into_pair(
            ureq::post(&self.url(path))
                .set("Content-Type", "application/json")
                .send_string(body),
        )
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if self.keep_state {
            return;
        }
        // Delete every sandbox through the API, then stop the server.
        let keys = self.cleanup_keys.iter().map(|k| Some(k.as_str()));
        for key in std::iter::once(None).chain(keys) {
            let with_key = |r: ureq::Request| match key {
                Some(k) => r.set("OPEN-SANDBOX-API-KEY", k),
                None => r,
            };
            let list = with_key(ureq::get(&self.url("/v1/sandboxes?pageSize=200"))).call();
            if let Ok(r) = list {
                let v: Value = r.into_json().unwrap_or_default();
                for item in v["items"].as_array().cloned().unwrap_or_default() {
                    if let Some(id) = item["id"].as_str() {
                        let url = self.url(&format!("/v1/sandboxes/{id}"));
                        let _ = with_key(ureq::delete(&url)).call();
                    }
                }
            }
        }
        // SIGTERM: the server removes its pool and session sandboxes before exiting.
        if let Some(c) = self.child.take() {
            let _ = stop_server(c);
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

pub fn into_pair(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    match r {
        Ok(r) => {
            let s = r.status();
            let text = r.into_string().unwrap_or_default();
            (
                s,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            )
        }
        Err(ureq::Error::Status(s, r)) => {
            let text = r.into_string().unwrap_or_default();
            (
                s,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            )
        }
        Err(e) => panic!("request failed: {e}"),
    }
}

pub struct Sandbox<'a> {
    pub server: &'a TestServer,
    pub id: String,
    pub endpoint: String,
    pub token: String,
}

/// What a foreground command produced.
#[derive(Debug, Default)]
pub struct Run {
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
    pub exit_code: Option<i64>,
    pub error: Option<Value>,
    pub events: Vec<Value>,
}

impl Run {
    pub fn out(&self) -> String {
        self.stdout.join("\n")
    }
}

impl Sandbox<'_> {
    pub fn execd(&self, method: &str, path: &str) -> ureq::Request {
        ureq::request(method, &format!("{}{path}", self.endpoint))
            .set("X-EXECD-ACCESS-TOKEN", &self.token)
    }

    pub fn run_with(&self, body: Value) -> Run {
        let resp = self
            .execd("POST", "/command")
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
            .expect("command request");
        let text = resp.into_string().expect("stream");
        let mut run = Run::default();
        for frame in text.split("\n\n").filter(|f| !f.is_empty()) {
            let json = frame.strip_prefix("data: ").unwrap_or(frame);
            let ev: Value = serde_json::from_str(json).expect("event json");
            match ev["type"].as_str() {
                Some("stdout") => run.stdout.push(ev["text"].as_str().unwrap_or("").into()),
                Some("stderr") => run.stderr.push(ev["text"].as_str().unwrap_or("").into()),
                Some("execution_complete") => run.exit_code = Some(0),
                Some("error") => {
                    run.exit_code = ev["error"]["evalue"].as_str().and_then(|v| v.parse().ok());
                    run.error = Some(ev["error"].clone());
                }
                _ => {}
            }
            run.events.push(ev);
        }
        run
    }

    pub fn run(&self, command: &str) -> Run {
        self.run_with(json!({ "command": command }))
    }

    /// Host pids of every process of the sandbox (from its pids cgroup).
    pub fn host_pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for_each_cgroup_dir(&cgroup_dir("pids", &self.id), &mut |dir| {
            if let Ok(s) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(s.lines().filter_map(|l| l.parse::<i32>().ok()));
            }
        });
        pids
    }
}

pub fn cgroup_dir(controller: &str, id: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/cgroup/{controller}/execbox/{id}"))
}

pub fn for_each_cgroup_dir(dir: &Path, f: &mut dyn FnMut(&Path)) {
    if !dir.is_dir() {
        return;
    }
    f(dir);
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                for_each_cgroup_dir(&e.path(), f);
            }
        }
    }
}

pub fn host_uid_of(pid: i32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A response of any status, read whole.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    /// An execd error envelope (`{"code","message"}` and nothing else) with this status and
    /// code; returns the message.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status, status, "{}", self.text());
        let v = self.json();
        assert_eq!(v["code"], code, "{v}");
        assert_eq!(self.header("content-type"), Some("application/json"), "{v}");
        let keys: Vec<&String> = v.as_object().expect("object").keys().collect();
        assert!(
            keys.iter().all(|k| *k == "code" || *k == "message"),
            "envelope has only code and message: {v}"
        );
        v["message"].as_str().unwrap_or("").to_string()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON ({}): {:?}", self.status, self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// 200, empty body, no Content-Type.
    #[track_caller]
    pub fn assert_empty_ok(&self) {
        assert_eq!(self.status, 200, "{}", self.text());
        assert!(self.body.is_empty(), "{}", self.text());
        assert_eq!(self.header("content-type"), None);
    }
}

/// Every header of a response, names as sent.
pub fn headers_of(resp: &ureq::Response) -> Vec<(String, String)> {
    resp.headers_names()
        .into_iter()
        .map(|n| {
            let v = resp.header(&n).unwrap_or("").to_string();
            (n, v)
        })
        .collect()
}

/// Reads a response (an error status is a response too) into a [`Reply`].
pub fn reply(r: Result<ureq::Response, ureq::Error>) -> Reply {
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request failed: {e}"),
    };
    let status = resp.status();
    let headers = headers_of(&resp);
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut resp.into_reader(), &mut body).expect("read body");
    Reply {
        status,
        headers,
        body,
    }
}

impl TestServer {
    /// Like [`TestServer::start_with_config`], with the server's stderr (its log, at `warn`)
    /// written to the returned file instead of the test's.
    pub fn start_logged(config_toml: &str) -> (Self, PathBuf) {
        let state_dir = std::env::temp_dir().join(unique("execbox-test-state"));
        let config = std::env::temp_dir().join(unique("execbox-test-config"));
        let log = std::env::temp_dir().join(unique("execbox-test-log"));
        std::fs::write(&config, config_toml).expect("write config");
        let server = Self::start_logged_on(state_dir, free_port(), &config, &[], &log);
        let _ = std::fs::remove_file(&config);
        (server, log)
    }
}

/// Resident memory of a process (`VmRSS` of `/proc/<pid>/status`), in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Raises this process's own soft limit on open files to at least `want` (up to its hard
/// limit); returns the soft limit now in force.
pub fn raise_fd_limit(want: u64) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft >= want {
        return soft;
    }
    let target = want.min(hard);
    match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => target,
        Err(_) => soft,
    }
}

/// The hosts of the package index the host's own pip uses (its configuration, else pip's
/// default index and file host), read here so that no registry's name is written in the repo.
/// `pypi = ["host", …]` for `[network.registries]`: the package index hosts of the host's pip
/// (there must be one).
pub fn pypi_registries_line() -> String {
    let hosts = pip_registry_hosts();
    assert!(
        !hosts.is_empty(),
        "no package index found in the host's pip"
    );
    let list = hosts
        .iter()
        .map(|h| format!("\"{h}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!("pypi = [{list}]")
}

pub fn pip_registry_hosts() -> Vec<String> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, subprocess, urllib.parse\n\
             from pip._internal.models.index import PyPI\n\
             cfg = subprocess.run(['python3', '-m', 'pip', 'config', 'list'], capture_output=True, text=True).stdout\n\
             url = os.environ.get('PIP_INDEX_URL') or next((l.split('=', 1)[1].strip(\"'\") for l in cfg.splitlines() if l.split('=')[0].endswith('index-url')), None)\n\
             hosts = [urllib.parse.urlparse(url).hostname] if url else [urllib.parse.urlparse(PyPI.simple_url).hostname, PyPI.file_storage_domain]\n\
             print(' '.join(h for h in hosts if h))",
        ])
        .output()
        .expect("the host's python3");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

impl TestServer {
    /// `execbox serve` on `state_dir` and `port` with `env` added to the harness's settings
    /// (after them, so `RUST_LOG` may be raised), the configuration file `config` and its stderr
    /// appended to `log`.
    pub fn start_logged_on(
        state_dir: PathBuf,
        port: u16,
        config: &Path,
        env: &[(&str, &str)],
        log: &Path,
    ) -> Self {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_execbox"))
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "warn")
            .env("EXECBOX_TEMPLATES_DIR", TEST_TEMPLATES_DIR)
            .env("EXECBOX_ALLOWED_REGISTRIES", "127.0.0.1")
            .env_remove("EXECBOX_API_KEY")
            .env_remove("EXECBOX_SECRETS_KEY")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start execbox serve");
        let mut server = TestServer {
            base: format!("http://127.0.0.1:{port}"),
            state_dir,
            port,
            child: Some(child),
            keep_state: false,
            cleanup_keys: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while ureq::get(&server.url("/health")).call().is_err() {
            if let Some(Ok(Some(status))) = server.child.as_mut().map(Child::try_wait) {
                server.keep_state = true;
                panic!(
                    "the server exited at start ({status}): {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// Stops the server with SIGTERM and waits for it; its state directory and its lifecycle
    /// sandboxes stay (for a restart on them).
    pub fn stop_keeping_state(mut self) -> std::process::ExitStatus {
        self.keep_state = true;
        stop_server(self.child.take().expect("a running server")).expect("wait")
    }
}

/// Stops a server as an operator does: SIGTERM (it removes its pool and session sandboxes),
/// then SIGKILL if it has not exited within 40 s; how it ended.
pub fn stop_server(mut c: Child) -> std::io::Result<std::process::ExitStatus> {
    terminate(&mut c)
}

/// SIGTERM, so that the server removes the sandboxes only it can reach (its warm pool's among
/// them); SIGKILL only if it has not exited within 40 s.
pub fn terminate(c: &mut Child) -> std::io::Result<std::process::ExitStatus> {
    let pid = nix::unistd::Pid::from_raw(c.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(40);
    while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = c.kill();
    c.wait()
}
