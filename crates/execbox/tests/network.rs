//! Outbound network under policy, against servers this test starts on the host: names the
//! server's configuration maps (a static hosts table) to the host's own address, which the
//! configuration also names as an exception to the addresses no sandbox reaches.
//!
//! Covers: an allowed name works; an unlisted name is NXDOMAIN; a bare address is refused; a
//! name resolving to a private address is refused; SNI and Host must be an allowed name that
//! resolved to the address; the metadata address, the host's loopback and the stack's own
//! addresses are unreachable; the egress API's GET/PATCH/DELETE take effect for the next
//! connection; bad rules are 400s naming the field; a sandbox without `networkPolicy` has no
//! device at all.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::sync::mpsc;
use std::time::Duration;

use common::{into_pair, pip_registry_hosts, Sandbox, TestServer};
use serde_json::{json, Value};

/// The host's first non-loopback IPv4 address: where the test servers listen.
fn host_address() -> Ipv4Addr {
    nix::ifaddrs::getifaddrs()
        .expect("interfaces")
        .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
        .find(|ip| !ip.is_loopback())
        .expect("a non-loopback IPv4 address on the host")
}

/// A one-request-at-a-time HTTP server answering `body`, on `addr`.
fn http_server(listener: TcpListener, body: &'static str) {
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
}

/// A TCP server that reports the first bytes of each connection.
fn recording_server(listener: TcpListener) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 4096];
            let n = conn.read(&mut buf).unwrap_or(0);
            let _ = tx.send(buf[..n].to_vec());
        }
    });
    rx
}

/// A minimal TLS ClientHello carrying `name` as SNI, as Python bytes literal source.
fn client_hello_py(name: &str) -> String {
    let n = name.as_bytes();
    let mut sni = Vec::new();
    sni.extend_from_slice(&((n.len() + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&(n.len() as u16).to_be_bytes());
    sni.extend_from_slice(n);
    let mut ext = vec![0, 0];
    ext.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    ext.extend_from_slice(&sni);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0u8; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![22, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec.iter().map(|b| format!("\\x{b:02x}")).collect()
}

fn sh(sb: &Sandbox<'_>, cmd: &str) -> String {
    let r = sb.run(cmd);
    assert_eq!(r.exit_code, Some(0), "{cmd}: {r:?}");
    r.out()
}

/// Runs a Python snippet in the sandbox and returns its output.
fn py(sb: &Sandbox<'_>, code: &str) -> String {
    // `/command` has no stdin: the program goes to a file first.
    let path = format!("/tmp/t{}.py", common::unique("py"));
    let upload = sb
        .execd("POST", "/files/upload")
        .set("Content-Type", "multipart/form-data; boundary=b0undary")
        .send_bytes(
            format!(
                "--b0undary\r\nContent-Disposition: form-data; name=\"metadata\"\r\n\r\n\
                 {{\"path\":\"{path}\"}}\r\n--b0undary\r\nContent-Disposition: form-data; \
                 name=\"file\"; filename=\"f\"\r\n\r\n{code}\r\n--b0undary--\r\n"
            )
            .as_bytes(),
        );
    assert!(upload.is_ok(), "{upload:?}");
    sh(sb, &format!("python3 {path}"))
}

const GET: &str = r#"
import sys, socket, urllib.request
def get(url, host=None):
    req = urllib.request.Request(url)
    if host: req.add_header("Host", host)
    try:
        return urllib.request.urlopen(req, timeout=5).read().decode()
    except Exception as e:
        return "ERR " + type(e).__name__ + " " + str(e)
def resolve(name):
    try: return socket.gethostbyname(name)
    except Exception as e: return "ERR " + type(e).__name__
def connect(ip, port):
    s = socket.socket(); s.settimeout(5)
    try:
        s.connect((ip, port)); s.close(); return "connected"
    except Exception as e: return "ERR " + type(e).__name__
"#;

fn egress(
    server: &TestServer,
    sb: &Sandbox<'_>,
    method: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let req = ureq::request(
        method,
        &server.url(&format!("/v1/sandboxes/{}/proxy/18080/policy", sb.id)),
    )
    .set("X-EXECD-ACCESS-TOKEN", &sb.token);
    into_pair(match body {
        Some(b) => req.send_string(&b.to_string()),
        None => req.call(),
    })
}

#[test]
fn egress_is_exactly_what_the_policy_names() {
    let host = host_address();
    let web = TcpListener::bind((host, 0)).expect("bind the web server");
    let web_port = web.local_addr().expect("addr").port();
    http_server(web, "hello from the host");
    // The name checks apply on 80 and 443: servers there too (skipped when taken).
    let on_80 = TcpListener::bind((host, 80)).ok();
    let on_443 = TcpListener::bind((host, 443)).ok();
    let have_80 = on_80.is_some();
    if let Some(l) = on_80 {
        http_server(l, "hello on 80");
    }
    eprintln!(
        "network: name checks on port 80 {}, on port 443 {}",
        if have_80 {
            "tested"
        } else {
            "skipped (port taken)"
        },
        if on_443.is_some() {
            "tested"
        } else {
            "skipped (port taken)"
        }
    );
    let tls_seen = on_443.map(recording_server);
    let loopback = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind loopback");
    let loopback_port = loopback.local_addr().expect("addr").port();
    http_server(loopback, "host loopback");

    let config = format!(
        "[network]\nallow_addresses = [\"{host}\"]\n\
         [network.hosts]\n\"allowed.test\" = [\"{host}\"]\n\"other.test\" = [\"{host}\"]\n\
         \"private.test\" = [\"10.1.2.3\"]\n\"meta.test\" = [\"169.254.169.254\"]\n"
    );
    let server = TestServer::start_with_config(&config);

    // Without networkPolicy: loopback only, no device.
    let plain = server.create(json!({}));
    let links = sh(&plain, "ls /sys/class/net 2>/dev/null || cat /proc/net/dev");
    assert!(!links.contains("eth0"), "{links}");

    let sb = server.create(
        json!({"networkPolicy": {"defaultAction": "deny", "egress": [
            {"action": "allow", "target": "allowed.test"},
            {"action": "allow", "target": "private.test"},
            {"action": "allow", "target": "meta.test"},
        ]}}),
    );
    // A bare address first, before any name led to it.
    let out = py(&sb, &format!("{GET}\nprint(connect('{host}', {web_port}))"));
    assert_eq!(
        out, "ERR ConnectionRefusedError",
        "a bare address is refused"
    );
    let out = py(
        &sb,
        &format!(
            "{GET}\nprint(get('http://allowed.test:{web_port}/'))\n\
             print(resolve('unlisted.test'))\nprint(resolve('private.test'))\n\
             print(resolve('meta.test'))\nprint(resolve('other.test'))\n\
             print(connect('169.254.169.254', 80))\nprint(connect('127.0.0.1', {loopback_port}))\n\
             print(connect('10.0.2.2', 80))\nprint(connect('10.0.2.3', 53))"
        ),
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "hello from the host", "{out}");
    assert_eq!(lines[1], "ERR gaierror", "unlisted name: NXDOMAIN: {out}");
    assert_eq!(lines[2], "ERR gaierror", "name of a private address: {out}");
    assert_eq!(
        lines[3], "ERR gaierror",
        "name of the metadata address: {out}"
    );
    assert_eq!(lines[4], "ERR gaierror", "name not in the policy: {out}");
    assert_eq!(lines[5], "ERR ConnectionRefusedError", "metadata: {out}");
    assert_eq!(
        lines[6], "ERR ConnectionRefusedError",
        "host loopback: {out}"
    );
    assert_eq!(lines[7], "ERR ConnectionRefusedError", "the gateway: {out}");
    assert_eq!(
        lines[8], "ERR ConnectionRefusedError",
        "the name server over TCP: {out}"
    );

    // On 80 and 443 the name on the wire must be the admitted one.
    if have_80 {
        let out = py(
            &sb,
            &format!(
                "{GET}\nprint(get('http://allowed.test/'))\n\
                 print(get('http://allowed.test/', host='other.test'))"
            ),
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "hello on 80", "{out}");
        assert!(
            lines[1].starts_with("ERR"),
            "Host mismatch must fail: {out}"
        );
    }
    if let Some(seen) = tls_seen {
        let hello = |name: &str| {
            format!(
                "{GET}\nimport socket\nip = resolve('allowed.test')\n\
                 s = socket.create_connection((ip, 443), timeout=5)\n\
                 s.sendall(b'{}')\ns.settimeout(3)\n\
                 try:\n    print(repr(s.recv(10)))\nexcept Exception as e:\n    print('ERR', type(e).__name__)\n",
                client_hello_py(name)
            )
        };
        py(&sb, &hello("other.test"));
        assert!(
            seen.recv_timeout(Duration::from_secs(2)).is_err(),
            "a ClientHello for another name must not reach the server"
        );
        py(&sb, &hello("allowed.test"));
        let first = seen
            .recv_timeout(Duration::from_secs(10))
            .expect("the ClientHello for the allowed name reaches the server");
        assert_eq!(
            first.first(),
            Some(&22),
            "a TLS handshake record: {first:?}"
        );
    }

    // What the network did, in the execd metrics.
    let m = common::reply(sb.execd("GET", "/metrics").call()).json();
    for key in [
        "net_connections",
        "net_bytes_in",
        "net_bytes_out",
        "net_refused",
        "net_dns_queries",
    ] {
        assert!(m[key].as_u64().is_some_and(|n| n > 0), "{key} in {m}");
    }

    // The egress API: what it shows, and changes that apply to the next connection.
    let (s, v) = egress(&server, &sb, "GET", None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["mode"], "rules");
    assert_eq!(v["policy"]["egress"][0]["target"], "allowed.test");
    let (s, v) = egress(
        &server,
        &sb,
        "PATCH",
        Some(json!([{"action": "allow", "target": "other.test"}])),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["policy"]["egress"][0]["target"], "other.test");
    let out = py(
        &sb,
        &format!("{GET}\nprint(get('http://other.test:{web_port}/'))"),
    );
    assert_eq!(
        out, "hello from the host",
        "PATCH applies to the next connection"
    );
    let (s, v) = egress(&server, &sb, "DELETE", Some(json!(["allowed.test"])));
    assert_eq!(s, 200, "{v}");
    let out = py(
        &sb,
        &format!("{GET}\nprint(get('http://allowed.test:{web_port}/'))"),
    );
    assert!(
        out.starts_with("ERR"),
        "a deleted rule admits nothing: {out}"
    );
    let (s, v) = egress(
        &server,
        &sb,
        "PATCH",
        Some(json!([{"action": "allow", "target": "no such target!"}])),
    );
    assert_eq!(s, 400, "{v}");
    assert!(
        v["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("rules[0].target")),
        "{v}"
    );
    let (s, v) = egress(&server, &sb, "PUT", Some(json!({"defaultAction": "allow"})));
    assert_eq!(s, 400, "public is not allowed by default: {v}");
    let (s, _) = egress(&server, &plain, "PATCH", Some(json!([])));
    assert_eq!(s, 409, "a sandbox without network has none to change");

    // Bad policies on create: the lifecycle envelope naming the field.
    let (s, v) = server.create_raw(
        &json!({"image": {"uri": "default"}, "entrypoint": ["tail", "-f", "/dev/null"],
            "resourceLimits": {"cpu": "1", "memory": "256Mi"},
            "networkPolicy": {"egress": [{"action": "allow", "target": "bad:port"}]}})
        .to_string(),
    );
    assert_eq!(s, 400, "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("networkPolicy.egress[0].target")),
        "{v}"
    );
    let (s, v) = server.create_raw(
        &json!({"image": {"uri": "default"}, "entrypoint": ["tail", "-f", "/dev/null"],
            "resourceLimits": {"cpu": "1", "memory": "256Mi"},
            "networkPolicy": {"defaultAction": "allow"}})
        .to_string(),
    );
    assert_eq!(s, 400, "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("networkPolicy")),
        "{v}"
    );
}

/// The host name of the registry the host's own npm uses.
fn npm_registry_host() -> String {
    let out = std::process::Command::new("npm")
        .args(["config", "get", "registry"])
        .output()
        .expect("the host's npm");
    let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
    url.split("://")
        .nth(1)
        .and_then(|rest| rest.split(['/', ':']).next())
        .filter(|h| !h.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no registry in the host's npm configuration: {url:?}"))
}

/// A real install from the package index the host's pip uses: `pip install` of one small
/// package in a sandbox whose policy names that registry, and in one whose does not; the same
/// through isol8's `installPackages`, whose user code then has no network.
#[test]
fn package_installs_reach_the_registry_and_nothing_else() {
    let pypi = common::pypi_registries_line();
    let hosts = pip_registry_hosts();
    let npm = npm_registry_host();
    let server = TestServer::start_with_config(&format!(
        "[network.registries]\n{pypi}\nnpm = [\"{npm}\"]\n"
    ));
    // The host's own CA settings (a proxying network may need them), passed on as they are.
    let ca: serde_json::Map<String, Value> = [
        "PIP_CERT",
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
    ]
    .iter()
    .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), json!(v))))
    .collect();
    let install = "python3 -m pip install --no-cache-dir --disable-pip-version-check \
                   --retries 0 --timeout 20 --target /tmp/pkgs six >/tmp/pip.log 2>&1; \
                   echo exit=$?; PYTHONPATH=/tmp/pkgs python3 -c 'import six; print(six.__name__)' 2>&1 | tail -1";
    let allowed = server.create(json!({"networkPolicy": {"defaultAction": "deny",
        "egress": [{"action": "allow", "target": "@pypi"}, {"action": "allow", "target": "@npm"}]}}));
    let r = allowed.run_with(json!({"command": install, "envs": ca, "timeout": 120000}));
    assert_eq!(r.out(), "exit=0\nsix", "{r:?}");
    let denied = server.create(json!({"networkPolicy": {"defaultAction": "deny", "egress": []}}));
    let r = denied.run_with(json!({"command": install, "envs": ca, "timeout": 120000}));
    assert!(r.out().starts_with("exit=1"), "{r:?}");
    let log = denied.run("cat /tmp/pip.log").out();
    assert!(
        log.contains("Name or service not known")
            || log.contains("Failed to establish a new connection")
            || log.contains("No matching distribution"),
        "a clear message: {log}"
    );

    // npm, from the registry the host's npm uses.
    let r = allowed.run_with(json!({"command":
        "npm install --prefix /tmp/n --cache /tmp/npm-cache --no-audit --no-fund is-number \
         >/tmp/npm.log 2>&1; echo exit=$?; \
         node -e \"console.log(require('/tmp/n/node_modules/is-number')(5))\"",
        "envs": ca, "timeout": 120000}));
    assert_eq!(
        r.out(),
        "exit=0\ntrue",
        "{r:?} {}",
        allowed.run("tail -5 /tmp/npm.log").out()
    );

    // isol8: the install reaches the registry; the code after it has no network.
    let body = json!({"request": {"runtime": "python", "installPackages": ["six"],
        "env": ca,
        "code": format!(
            "import six, socket\nprint(six.__name__)\n\
             try:\n    socket.create_connection(('{}', 443), timeout=5); print('reached')\n\
             except Exception as e:\n    print('blocked')", hosts[0])}});
    let (s, v) = into_pair(
        ureq::post(&server.url("/execute"))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string()),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["stdout"], "six\nblocked", "{v}");
    // A session whose sandbox started without network cannot be given one later: refused,
    // naming the field, rather than run without it.
    let first =
        json!({"sessionId": "no-net", "request": {"runtime": "python", "code": "print(1)"}});
    let (s, v) = into_pair(
        ureq::post(&server.url("/execute"))
            .set("Content-Type", "application/json")
            .send_string(&first.to_string()),
    );
    assert_eq!(s, 200, "{v}");
    let mut later = body.clone();
    later["sessionId"] = json!("no-net");
    let (s, v) = into_pair(
        ureq::post(&server.url("/execute"))
            .set("Content-Type", "application/json")
            .send_string(&later.to_string()),
    );
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("network:")),
        "{v}"
    );
    // A server that names no registry refuses installs, naming the field.
    let bare = TestServer::start();
    let (s, v) = into_pair(
        ureq::post(&bare.url("/execute"))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string()),
    );
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("request.installPackages")),
        "{v}"
    );
}

/// The operator's bandwidth cap holds: 2 MiB at 512 KiB/s cannot arrive in under about three
/// seconds (a lower bound: load only makes it slower), and the bytes are counted.
#[test]
fn the_bandwidth_cap_holds() {
    let host = host_address();
    let listener = TcpListener::bind((host, 0)).expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let _ = conn.write_all(&vec![b'x'; 2 << 20]);
        }
    });
    let server = TestServer::start_with_config(&format!(
        "[network]\nallow_addresses = [\"{host}\"]\nbandwidth_bytes_per_sec = 524288\n\
         [network.hosts]\n\"bulk.test\" = [\"{host}\"]\n"
    ));
    let sb = server.create(json!({"networkPolicy": {"defaultAction": "deny",
        "egress": [{"action": "allow", "target": "bulk.test"}]}}));
    let out = py(
        &sb,
        &format!(
            "import socket, time\ns = socket.create_connection(('bulk.test', {port}))\n\
             t = time.time(); n = 0\nwhile True:\n    b = s.recv(65536)\n    if not b: break\n    n += len(b)\n\
             print(n, round(time.time() - t, 2))"
        ),
    );
    let mut f = out.split_whitespace();
    let (n, secs): (u64, f64) = (
        f.next().and_then(|v| v.parse().ok()).expect("bytes"),
        f.next().and_then(|v| v.parse().ok()).expect("seconds"),
    );
    assert_eq!(n, 2 << 20, "{out}");
    assert!(secs >= 2.0, "2 MiB at 512 KiB/s took only {secs} s");
    let m = common::reply(sb.execd("GET", "/metrics").call()).json();
    assert!(
        m["net_bytes_in"].as_u64().is_some_and(|b| b >= 2 << 20),
        "{m}"
    );
}

/// Another sandbox is out of reach, even for a policy that admits every private address: each
/// sandbox's device leads only to the server's stack, which connects out from the host and
/// never to a sandbox address, the gateway or the host's loopback (where sandboxes' ports are
/// proxied).
#[test]
fn another_sandbox_is_unreachable() {
    let server = TestServer::start();
    let policy = json!({"networkPolicy": {"defaultAction": "deny", "egress": [
        {"action": "allow", "target": "10.0.0.0/8"},
        {"action": "allow", "target": "127.0.0.0/8"},
    ]}});
    let target = server.create(policy.clone());
    let listening = target.run_with(json!({
        "command": "python3 -m http.server 8000 --bind 0.0.0.0",
        "background": true
    }));
    assert!(listening.error.is_none(), "{listening:?}");
    // The listener is up: it answers inside its own sandbox.
    let mut up = String::new();
    for _ in 0..50 {
        up = py(
            &target,
            &format!("{GET}\nprint(connect('10.0.2.100', 8000))"),
        );
        if up == "connected" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(up, "connected", "the target's own listener");

    let other = server.create(policy);
    let port = server.port;
    let out = py(
        &other,
        &format!(
            "{GET}\nfor ip in ['10.0.2.100', '10.0.2.2', '10.0.2.3', '127.0.0.1']:\n    \
             print(ip, connect(ip, 8000))\nprint('server', connect('10.0.2.2', {port}), connect('127.0.0.1', {port}))"
        ),
    );
    assert_eq!(
        out,
        "10.0.2.100 ERR ConnectionRefusedError\n10.0.2.2 ERR ConnectionRefusedError\n\
         10.0.2.3 ERR ConnectionRefusedError\n127.0.0.1 ERR ConnectionRefusedError\n\
         server ERR ConnectionRefusedError ERR ConnectionRefusedError",
        "another sandbox, the gateway, the name server and loopback"
    );
}

/// A sandbox re-attached by a restarted server keeps running but has lost its network device
/// (its server end lived in the old process): the egress API says so, and refuses changes.
#[test]
fn a_reattached_sandbox_says_it_lost_its_network() {
    let state = std::env::temp_dir().join(common::unique("execbox-net-restart"));
    let port = common::free_port();
    let server = TestServer::start_on(state, port, None);
    let sb = server.create(json!({"networkPolicy": {"defaultAction": "deny", "egress": []}}));
    let (id, token) = (sb.id.clone(), sb.token.clone());
    drop(sb);
    let state = server.crash();
    // Another port: the old one may be taken by a concurrent test in between.
    let again = TestServer::start_on(state, common::free_port(), None);
    let sb = Sandbox {
        server: &again,
        id: id.clone(),
        endpoint: format!("{}/v1/sandboxes/{id}/proxy/44772", again.base),
        token,
    };
    assert_eq!(sb.run("echo alive").out(), "alive");
    let (s, v) = egress(&again, &sb, "GET", None);
    assert_eq!(s, 200, "{v}");
    assert!(
        v["reason"]
            .as_str()
            .unwrap_or("")
            .contains("lost its network"),
        "{v}"
    );
    let (s, v) = egress(
        &again,
        &sb,
        "PATCH",
        Some(json!([{"action": "allow", "target": "example.com"}])),
    );
    assert_eq!(s, 409, "{v}");
    assert!(v.to_string().contains("lost its network"), "{v}");
    assert_eq!(again.delete(&format!("/v1/sandboxes/{id}")), 204);
}
