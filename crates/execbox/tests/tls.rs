//! TLS on the listener (`[tls]`), over real TLS on loopback: certificates made here with
//! `rcgen` (a CA, a server certificate for 127.0.0.1 and localhost, client certificates), the
//! server as a real `execbox serve`, and curl and the official `opensandbox` Python SDK as
//! clients.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::procs::{python_venv, repo_root, run_with_deadline};
use common::{free_port, unique, TEST_TEMPLATES_DIR};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::Value;

/// A certificate authority of the test.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// Its certificate (PEM).
    pem: PathBuf,
}

/// Certificates of one test, under a directory removed at the end.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(unique(&format!("execbox-tls-{name}")));
        std::fs::create_dir_all(&dir).expect("pki dir");
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn ca(&self, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA cert");
        let pem = self.path(&format!("{name}-ca.pem"));
        std::fs::write(&pem, cert.pem()).expect("write CA");
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A leaf certificate signed by `ca`, written as `<name>.crt` and `<name>.key`: for the
    /// server (127.0.0.1 and localhost) or for a client.
    fn leaf(&self, ca: &Ca, name: &str, server: bool) -> (PathBuf, PathBuf) {
        let names = if server {
            vec!["127.0.0.1".to_string(), "localhost".to_string()]
        } else {
            Vec::new()
        };
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &ca.issuer).expect("sign");
        let (crt, k) = (
            self.path(&format!("{name}.crt")),
            self.path(&format!("{name}.key")),
        );
        std::fs::write(&crt, cert.pem()).expect("write cert");
        std::fs::write(&k, key.serialize_pem()).expect("write key");
        (crt, k)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Replaces `dst` with the contents of `src` at once (a rename, as deployment tools do).
fn replace(src: &Path, dst: &Path) {
    let tmp = dst.with_extension("new");
    std::fs::copy(src, &tmp).expect("copy");
    std::fs::rename(&tmp, dst).expect("rename");
}

/// What curl did: its exit code, the body and the HTTP status (0 when there was none).
struct Curl {
    ok: bool,
    status: u16,
    body: String,
    stderr: String,
}

/// Runs curl with `args` (quiet, errors shown, a 60 s limit), the status written last.
fn curl(args: &[&str]) -> Curl {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60", "-w", "\n%{http_code}"])
        .args(args)
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .output()
        .expect("run curl (scripts/test-deps.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Curl {
        ok: out.status.success(),
        status: code.trim().parse().unwrap_or(0),
        body: body.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}

/// A real `execbox serve` with `[tls]`, on a free loopback port.
struct TlsServer {
    child: Option<Child>,
    port: u16,
    state_dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    /// curl's arguments that make it trust the server (and present a client certificate).
    trust: Vec<String>,
}

impl TlsServer {
    /// Starts the server with `tls` as its `[tls]` table (and `extra` at the top level); ready
    /// once `/health` answers over HTTPS to a curl trusting `trust`.
    fn start(tls: &str, extra: &str, trust: &[&str]) -> Self {
        let port = free_port();
        let state_dir = std::env::temp_dir().join(unique("execbox-test-state"));
        let config = std::env::temp_dir().join(unique("execbox-tls-config"));
        let log = std::env::temp_dir().join(unique("execbox-tls-log"));
        std::fs::write(&config, format!("{extra}\n[tls]\n{tls}\n")).expect("config");
        let child = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!(
                "trap '' INT QUIT; exec {} serve --listen 127.0.0.1:{port} --state-dir {} --config {}",
                env!("CARGO_BIN_EXE_execbox"),
                state_dir.display(),
                config.display()
            ))
            .env("RUST_LOG", "info")
            .env("EXECBOX_TEMPLATES_DIR", TEST_TEMPLATES_DIR)
            .env("EXECBOX_ALLOWED_REGISTRIES", "127.0.0.1")
            .env_remove("EXECBOX_API_KEY")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start execbox serve");
        let mut server = Self {
            child: Some(child),
            port,
            state_dir,
            config,
            log,
            trust: trust.iter().map(|s| s.to_string()).collect(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if server.get("/health", &[]).status == 200 {
                return server;
            }
            if let Some(Ok(Some(status))) = server.child.as_mut().map(Child::try_wait) {
                panic!("server exited ({status}): {}", server.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "server did not come up: {}",
                server.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// curl trusting the server's CA, plus `args`, on `path`.
    fn get(&self, path: &str, args: &[&str]) -> Curl {
        let url = self.url(path);
        let mut all: Vec<&str> = self.trust.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        all.push(&url);
        curl(&all)
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).expect("running")
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        // Delete every sandbox over HTTPS, then stop the server.
        let list = self.get("/v1/sandboxes?pageSize=200", &[]);
        if let Ok(v) = serde_json::from_str::<Value>(&list.body) {
            for item in v["items"].as_array().cloned().unwrap_or_default() {
                if let Some(id) = item["id"].as_str() {
                    self.get(&format!("/v1/sandboxes/{id}"), &["-X", "DELETE"]);
                }
            }
        }
        if let Some(c) = self.child.take() {
            let _ = common::stop_server(c);
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
        let _ = std::fs::remove_file(&self.config);
        let _ = std::fs::remove_file(&self.log);
    }
}

fn tls_table(cert: &Path, key: &Path, more: &str) -> String {
    format!(
        "cert_file = \"{}\"\nkey_file = \"{}\"\n{more}",
        cert.display(),
        key.display()
    )
}

/// Waits until `check` holds (up to `secs` seconds).
fn eventually(secs: u64, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn curl_over_https_creates_a_sandbox_and_runs_a_command_through_the_proxy() {
    let pki = Pki::new("curl");
    let ca = pki.ca("server");
    let (crt, key) = pki.leaf(&ca, "execbox-server", true);
    let ca_pem = ca.pem.to_string_lossy().to_string();
    let server = TlsServer::start(&tls_table(&crt, &key, ""), "", &["--cacert", &ca_pem]);

    let body = r#"{"image":{"uri":"default"},"entrypoint":["tail","-f","/dev/null"],"resourceLimits":{"cpu":"1","memory":"512Mi"}}"#;
    let created = server.get(
        "/v1/sandboxes",
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
        ],
    );
    assert_eq!(created.status, 202, "{} {}", created.body, created.stderr);
    let id = serde_json::from_str::<Value>(&created.body).expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let ep = server.get(&format!("/v1/sandboxes/{id}/endpoints/44772"), &[]);
    assert_eq!(ep.status, 200, "{}", ep.body);
    let ep: Value = serde_json::from_str(&ep.body).expect("json");
    let endpoint = ep["endpoint"].as_str().expect("endpoint");
    let token = ep["headers"]["X-EXECD-ACCESS-TOKEN"]
        .as_str()
        .expect("token");
    assert!(
        endpoint.starts_with(&format!("127.0.0.1:{}/", server.port)),
        "{endpoint}"
    );

    // `echo hi` through the execd proxy, over the same TLS listener.
    let run = curl(&[
        "--cacert",
        &ca_pem,
        "-X",
        "POST",
        "-H",
        &format!("X-EXECD-ACCESS-TOKEN: {token}"),
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"command":"echo hi"}"#,
        &format!("https://{endpoint}/command"),
    ]);
    assert_eq!(run.status, 200, "{} {}", run.body, run.stderr);
    let stdout: Vec<String> = run
        .body
        .split("\n\n")
        .filter_map(|f| serde_json::from_str::<Value>(f.trim_start_matches("data: ")).ok())
        .filter(|e| e["type"] == "stdout")
        .map(|e| e["text"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(stdout.concat().trim_end(), "hi", "{}", run.body);

    // Without the CA the certificate is not trusted; plain HTTP gets no answer.
    let untrusted = curl(&[&server.url("/health")]);
    assert!(
        !untrusted.ok && untrusted.status == 0,
        "{}",
        untrusted.stderr
    );
    let plain = curl(&[&format!("http://127.0.0.1:{}/health", server.port)]);
    assert!(
        !plain.ok && plain.status == 0,
        "plain HTTP to the TLS port: {} {}",
        plain.status,
        plain.body
    );
    // HTTP/1.1 is what ALPN settles on, even for a client that offers h2.
    // (The last `-w` wins: the HTTP version, then a line break, so it reads as the body.)
    let alpn = server.get(
        "/health",
        &["--http2", "-o", "/dev/null", "-w", "%{http_version}\n"],
    );
    assert_eq!(alpn.body, "1.1", "{}", alpn.stderr);

    let deleted = server.get(&format!("/v1/sandboxes/{id}"), &["-X", "DELETE"]);
    assert_eq!(deleted.status, 204, "{}", deleted.body);

    let log = server.log_text();
    assert!(log.contains("TLS on the listener"), "{log}");
    assert!(log.contains("CN=execbox-server"), "{log}");

    // `doctor` and `config show` report TLS with the certificate's expiry.
    let doctor = Command::new(env!("CARGO_BIN_EXE_execbox"))
        .args(["doctor", "--config"])
        .arg(&server.config)
        .output()
        .expect("doctor");
    let text = String::from_utf8_lossy(&doctor.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("tls "))
        .unwrap_or_else(|| panic!("no tls line: {text}"));
    assert!(line.contains(" on "), "{line}");
    assert!(line.contains("CN=execbox-server"), "{line}");
    assert!(line.contains("notAfter"), "{line}");
    assert!(line.contains("days left"), "{line}");
    let shown = Command::new(env!("CARGO_BIN_EXE_execbox"))
        .args(["config", "show", "--config"])
        .arg(&server.config)
        .output()
        .expect("config show");
    let shown = String::from_utf8_lossy(&shown.stdout);
    let table: toml::Value = toml::from_str(&shown).expect("still TOML");
    assert_eq!(
        table["tls"]["cert_file"].as_str(),
        Some(crt.to_str().expect("utf-8"))
    );
    assert!(
        shown.contains("# tls: on: certificate CN=execbox-server"),
        "{shown}"
    );
}

#[test]
fn doctor_fails_on_an_unreadable_certificate_and_serve_refuses_to_start() {
    let pki = Pki::new("bad");
    let ca = pki.ca("server");
    let (crt, _) = pki.leaf(&ca, "one", true);
    let (_, other_key) = pki.leaf(&ca, "two", true);
    let config = pki.path("execbox.toml");
    std::fs::write(
        &config,
        format!("[tls]\n{}", tls_table(&crt, &other_key, "")),
    )
    .expect("config");
    let doctor = Command::new(env!("CARGO_BIN_EXE_execbox"))
        .args(["doctor", "--config"])
        .arg(&config)
        .output()
        .expect("doctor");
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(!doctor.status.success(), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("tls "))
        .expect("tls line");
    assert!(
        line.contains("FAILED") && line.contains("tls.key_file"),
        "{line}"
    );

    let serve = Command::new(env!("CARGO_BIN_EXE_execbox"))
        .args(["serve", "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--state-dir")
        .arg(pki.path("state"))
        .arg("--config")
        .arg(&config)
        .env_remove("EXECBOX_API_KEY")
        .output()
        .expect("serve");
    let err = String::from_utf8_lossy(&serve.stderr);
    assert!(!serve.status.success(), "{err}");
    assert!(
        err.contains("tls.key_file:") && err.contains("is not the key of the certificate"),
        "{err}"
    );

    // One file without the other is refused when the configuration is read.
    std::fs::write(
        &config,
        format!("[tls]\ncert_file = \"{}\"\n", crt.display()),
    )
    .expect("config");
    let shown = Command::new(env!("CARGO_BIN_EXE_execbox"))
        .args(["config", "show", "--config"])
        .arg(&config)
        .output()
        .expect("config show");
    assert!(!shown.status.success());
    assert!(
        String::from_utf8_lossy(&shown.stderr).contains("tls.key_file: required"),
        "{shown:?}"
    );
}

#[test]
fn without_tls_a_non_loopback_listener_says_traffic_is_unencrypted() {
    let state = std::env::temp_dir().join(unique("execbox-test-state"));
    let log = std::env::temp_dir().join(unique("execbox-tls-plain-log"));
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_execbox"))
        .args(["serve", "--listen"])
        .arg(format!("0.0.0.0:{port}"))
        .arg("--state-dir")
        .arg(&state)
        .env("EXECBOX_API_KEY", "tls-test-key")
        .env("RUST_LOG", "warn")
        .env("EXECBOX_TEMPLATES_DIR", TEST_TEMPLATES_DIR)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("serve");
    let deadline = Instant::now() + Duration::from_secs(30);
    while curl(&[&format!("http://127.0.0.1:{port}/health")]).status != 200 {
        assert!(Instant::now() < deadline, "server did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Still an API key: without one a request is refused.
    let open = curl(&[&format!("http://127.0.0.1:{port}/v1/sandboxes")]);
    assert_eq!(open.status, 401, "{}", open.body);
    // SIGHUP (a `systemctl reload`) has nothing to reload and does not stop the server.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        matches!(child.try_wait(), Ok(None)),
        "SIGHUP ended the server"
    );
    assert_eq!(
        curl(&[&format!("http://127.0.0.1:{port}/health")]).status,
        200
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_dir_all(&state);
    assert!(text.contains("is unencrypted"), "{text}");
}

#[test]
fn a_certificate_swapped_on_disk_serves_new_connections_and_a_broken_one_is_ignored() {
    let pki = Pki::new("reload");
    let ca1 = pki.ca("first");
    let ca2 = pki.ca("second");
    let (crt, key) = pki.leaf(&ca1, "first-server", true);
    let (crt2, key2) = pki.leaf(&ca2, "second-server", true);
    let ca1_pem = ca1.pem.to_string_lossy().to_string();
    let ca2_pem = ca2.pem.to_string_lossy().to_string();
    let server = TlsServer::start(
        &tls_table(&crt, &key, "reload_interval_secs = 1\n"),
        "",
        &["--cacert", &ca1_pem],
    );
    let url = server.url("/health");
    let with = |ca: &str| curl(&["--cacert", ca, &url]).status;
    assert_eq!(with(&ca1_pem), 200);
    assert_eq!(with(&ca2_pem), 0);
    // A kept-alive connection, opened before the swap, trusting the first CA only.
    let kept = ureq::AgentBuilder::new()
        .tls_config(rustls_client(&ca1.pem))
        .build();
    // The body is read to its end, so that ureq keeps the connection for the next request.
    let kept_get = || -> Result<u16, String> {
        let r = kept.get(&url).call().map_err(|e| e.to_string())?;
        let status = r.status();
        r.into_string().map_err(|e| e.to_string())?;
        Ok(status)
    };
    assert_eq!(kept_get(), Ok(200));

    // A half-written certificate: the old one keeps serving, a warning says why.
    let text = std::fs::read_to_string(&crt2).expect("read");
    std::fs::write(&crt, &text[..text.len() / 2]).expect("truncate");
    eventually(10, "the failed reload is logged", || {
        server.log_text().contains("TLS reload failed")
    });
    assert_eq!(with(&ca1_pem), 200, "the old certificate must keep serving");

    // The new pair: new connections present it.
    replace(&key2, &key);
    replace(&crt2, &crt);
    eventually(10, "the new certificate is served", || {
        with(&ca2_pem) == 200
    });
    assert_eq!(
        with(&ca1_pem),
        0,
        "the old CA no longer verifies the server"
    );
    assert!(server.log_text().contains("TLS certificate reloaded"));
    // The connection open before the reload goes on with the certificate it was opened with.
    assert_eq!(
        kept_get(),
        Ok(200),
        "an open connection is not cut by a reload"
    );
}

#[test]
fn sighup_reloads_the_certificate() {
    let pki = Pki::new("sighup");
    let ca1 = pki.ca("first");
    let ca2 = pki.ca("second");
    let (crt, key) = pki.leaf(&ca1, "first-server", true);
    let (crt2, key2) = pki.leaf(&ca2, "second-server", true);
    let ca1_pem = ca1.pem.to_string_lossy().to_string();
    let ca2_pem = ca2.pem.to_string_lossy().to_string();
    // No polling: only SIGHUP reloads.
    let server = TlsServer::start(
        &tls_table(&crt, &key, "reload_interval_secs = 0\n"),
        "",
        &["--cacert", &ca1_pem],
    );
    let url = server.url("/health");
    let with = |ca: &str| curl(&["--cacert", ca, &url]).status;
    replace(&key2, &key);
    replace(&crt2, &crt);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(with(&ca1_pem), 200, "no reload before the signal");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    eventually(10, "the new certificate is served", || {
        with(&ca2_pem) == 200
    });
    assert_eq!(with(&ca1_pem), 0);
    // The server is still up after the signal.
    assert_eq!(with(&ca2_pem), 200);
}

#[test]
fn client_certificates_are_required_when_configured() {
    let pki = Pki::new("mtls");
    let ca = pki.ca("server");
    let clients = pki.ca("clients");
    let strangers = pki.ca("strangers");
    let (crt, key) = pki.leaf(&ca, "execbox-server", true);
    let (client_crt, client_key) = pki.leaf(&clients, "operator", false);
    let (stranger_crt, stranger_key) = pki.leaf(&strangers, "stranger", false);
    let ca_pem = ca.pem.to_string_lossy().to_string();
    let (cc, ck) = (
        client_crt.to_string_lossy().to_string(),
        client_key.to_string_lossy().to_string(),
    );
    let server = TlsServer::start(
        &tls_table(
            &crt,
            &key,
            &format!("client_ca_file = \"{}\"\n", clients.pem.display()),
        ),
        "",
        &["--cacert", &ca_pem, "--cert", &cc, "--key", &ck],
    );
    let url = server.url("/health");
    let with_cert = curl(&["--cacert", &ca_pem, "--cert", &cc, "--key", &ck, &url]);
    assert_eq!(with_cert.status, 200, "{}", with_cert.stderr);
    let without = curl(&["--cacert", &ca_pem, &url]);
    assert!(
        !without.ok && without.status == 0,
        "no client certificate: {}",
        without.body
    );
    let stranger = curl(&[
        "--cacert",
        &ca_pem,
        "--cert",
        stranger_crt.to_str().expect("utf-8"),
        "--key",
        stranger_key.to_str().expect("utf-8"),
        &url,
    ]);
    assert!(
        !stranger.ok && stranger.status == 0,
        "a certificate of another CA: {}",
        stranger.body
    );
    let doctor = Command::new(env!("CARGO_BIN_EXE_execbox"))
        .args(["doctor", "--config"])
        .arg(&server.config)
        .output()
        .expect("doctor");
    assert!(
        String::from_utf8_lossy(&doctor.stdout).contains("client certificates required"),
        "{doctor:?}"
    );
}

#[test]
fn tls_1_2_is_refused_when_min_version_is_1_3_and_a_silent_client_is_cut() {
    let pki = Pki::new("versions");
    let ca = pki.ca("server");
    let (crt, key) = pki.leaf(&ca, "execbox-server", true);
    let ca_pem = ca.pem.to_string_lossy().to_string();
    let modern = TlsServer::start(
        &tls_table(&crt, &key, "min_version = \"1.3\"\n"),
        "header_read_timeout_secs = 2",
        &["--cacert", &ca_pem],
    );
    assert_eq!(modern.get("/health", &["--tlsv1.3"]).status, 200);
    let old = modern.get("/health", &["--tls-max", "1.2"]);
    assert!(
        !old.ok && old.status == 0,
        "TLS 1.2 against min 1.3: {}",
        old.body
    );
    let default = TlsServer::start(&tls_table(&crt, &key, ""), "", &["--cacert", &ca_pem]);
    assert_eq!(
        default
            .get("/health", &["--tlsv1.2", "--tls-max", "1.2"])
            .status,
        200,
        "TLS 1.2 is accepted by default"
    );

    // A client that connects and never completes its handshake is closed by the head timeout.
    let start = Instant::now();
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", modern.port)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    let n = tcp
        .read(&mut buf)
        .expect("closed, not timed out on our side");
    assert_eq!(n, 0, "the server closes the connection");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(10),
        "closed after {waited:?}"
    );
}

/// The `opensandbox` SDK's Python test environment (the same virtualenv as tests/sdk.rs).
fn sdk_python() -> PathBuf {
    let root = repo_root();
    python_venv(
        "sdk-venv",
        &root.join("tests/sdk/requirements.txt"),
        "the OpenSandbox SDK over TLS",
    )
}

#[test]
fn the_official_opensandbox_sdk_works_over_https() {
    let python = sdk_python();
    let pki = Pki::new("sdk");
    let ca = pki.ca("server");
    let (crt, key) = pki.leaf(&ca, "execbox-server", true);
    let ca_pem = ca.pem.to_string_lossy().to_string();
    let server = TlsServer::start(&tls_table(&crt, &key, ""), "", &["--cacert", &ca_pem]);
    let script = r#"
import asyncio, os
from datetime import timedelta
from opensandbox import Sandbox
from opensandbox.config import ConnectionConfig

async def main():
    config = ConnectionConfig(domain=os.environ["DOMAIN"], api_key="unused-on-loopback",
                              protocol="https")
    sbx = await Sandbox.create("default", connection_config=config,
                               timeout=timedelta(minutes=5))
    try:
        run = await sbx.commands.run("echo hi over tls")
        print("STDOUT=" + "".join(m.text for m in run.logs.stdout).strip())
        await sbx.files.write_file("/tmp/greeting.txt", "hello")
        print("FILE=" + await sbx.files.read_file("/tmp/greeting.txt"))
    finally:
        await sbx.kill()
        await sbx.close()

asyncio.run(asyncio.wait_for(main(), 180))
"#;
    let mut cmd = Command::new(&python);
    cmd.arg("-c")
        .arg(script)
        .env("DOMAIN", format!("127.0.0.1:{}", server.port))
        // httpx trusts the CA through the standard variables.
        .env("SSL_CERT_FILE", &ca_pem)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env("PYTHONUNBUFFERED", "1");
    let out: Output =
        run_with_deadline(cmd, "opensandbox SDK over https", Duration::from_secs(300));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("STDOUT=hi over tls"), "{stdout}");
    assert!(stdout.contains("FILE=hello"), "{stdout}");
    // And without the CA the SDK refuses the server.
    let mut untrusted = Command::new(&python);
    untrusted
        .arg("-c")
        .arg(script)
        .env("DOMAIN", format!("127.0.0.1:{}", server.port))
        .env_remove("SSL_CERT_FILE")
        .env("NO_PROXY", "127.0.0.1,localhost");
    let out = run_with_deadline(
        untrusted,
        "opensandbox SDK, untrusted",
        Duration::from_secs(300),
    );
    assert!(!out.status.success(), "an untrusted certificate must fail");
}

/// A rustls client trusting the CA in `ca` (PEM).
fn rustls_client(ca: &Path) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA PEM")).expect("CA");
    }
    // The server's provider (ring), on the client side too.
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[test]
fn a_pty_websocket_works_over_tls() {
    use tungstenite::client::IntoClientRequest;
    use tungstenite::Message;

    let pki = Pki::new("ws");
    let ca = pki.ca("server");
    let (crt, key) = pki.leaf(&ca, "execbox-server", true);
    let ca_pem = ca.pem.to_string_lossy().to_string();
    let server = TlsServer::start(&tls_table(&crt, &key, ""), "", &["--cacert", &ca_pem]);
    let body = r#"{"image":{"uri":"default"},"entrypoint":["tail","-f","/dev/null"],"resourceLimits":{"cpu":"1","memory":"512Mi"}}"#;
    let created = server.get(
        "/v1/sandboxes",
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
        ],
    );
    assert_eq!(created.status, 202, "{}", created.body);
    let id = serde_json::from_str::<Value>(&created.body).expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let ep: Value = serde_json::from_str(
        &server
            .get(&format!("/v1/sandboxes/{id}/endpoints/44772"), &[])
            .body,
    )
    .expect("endpoint");
    let endpoint = ep["endpoint"].as_str().expect("endpoint").to_string();
    let token = ep["headers"]["X-EXECD-ACCESS-TOKEN"]
        .as_str()
        .expect("token")
        .to_string();
    let pty = curl(&[
        "--cacert",
        &ca_pem,
        "-X",
        "POST",
        "-H",
        &format!("X-EXECD-ACCESS-TOKEN: {token}"),
        &format!("https://{endpoint}/pty"),
    ]);
    assert_eq!(pty.status, 201, "{}", pty.body);
    let session = serde_json::from_str::<Value>(&pty.body).expect("json")["session_id"]
        .as_str()
        .expect("session_id")
        .to_string();

    // The WebSocket upgrade and the session, inside TLS.
    let tcp = std::net::TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let conn = rustls::ClientConnection::new(
        rustls_client(&ca.pem),
        "127.0.0.1".try_into().expect("server name"),
    )
    .expect("client");
    let stream = rustls::StreamOwned::new(conn, tcp);
    let mut req = format!("ws://{endpoint}/pty/{session}/ws")
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("X-EXECD-ACCESS-TOKEN", token.parse().expect("header"));
    let (mut ws, resp) = tungstenite::client(req, stream).expect("websocket over TLS");
    assert_eq!(resp.status().as_u16(), 101);
    let mut frame = vec![0u8];
    frame.extend_from_slice(b"echo over-$((6*7))\n");
    ws.send(Message::binary(frame)).expect("stdin");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains("over-42") {
        assert!(
            Instant::now() < deadline,
            "no output: {:?}",
            String::from_utf8_lossy(&out)
        );
        match ws.read().expect("read") {
            Message::Binary(b) if b.first() == Some(&1) => out.extend_from_slice(&b[1..]),
            _ => {}
        }
    }
    let _ = ws.close(None);
}
