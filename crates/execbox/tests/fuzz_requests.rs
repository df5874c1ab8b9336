//! Property-based requests against every API surface of ONE real server: bodies shaped like each
//! route's request type (the right field names, each absent, plausible, or a random JSON value of
//! any type: huge strings, deep nesting, odd unicode), random query strings and path parameters.
//!
//! The property: no 5xx (outside [`allowed_5xx`]), no dropped connection, and the server still
//! alive with `/health` answering at the end. Deterministic for CI: a fixed seed and a fixed
//! number of cases per surface (`EXECBOX_FUZZ_SCALE` multiplies them); `timeout` fields are
//! capped so that no generated request legitimately runs long.
//!
//! Failures are collected rather than shrunk (a shrink would replay hundreds of requests against
//! the same server), and printed with the request that caused them; the case counts and
//! statuses go to the test's output and to `target/tmp/fuzz_requests-report.txt`.
//!
//! `cargo test -p execbox --test fuzz_requests -- --nocapture` (as root, like every test that
//! starts sandboxes); `EXECBOX_FUZZ_SCALE=10` for a longer run with the same seed.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{json, Map, Value};

/// The seed of every run: the same requests in the same order, every time.
const SEED: [u8; 32] = *b"execbox fuzz_requests seed 0001!";

/// Longest timeout a generated request may carry, in milliseconds (and in seconds where the
/// field is in seconds).
const TIMEOUT_CAP_MS: u64 = 2_000;
const TIMEOUT_CAP_SECS: u64 = 2;

fn scale() -> u32 {
    std::env::var("EXECBOX_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

// --- Values --------------------------------------------------------------------------------

/// Strings that break naive handling: empty, NUL, traversal, `/proc`, huge, odd unicode,
/// numbers and quantities written as strings.
fn odd_string() -> BoxedStrategy<String> {
    prop_oneof![
        4 => "[a-z0-9_.-]{0,12}",
        3 => "\\PC{0,24}",
        1 => Just(String::new()),
        1 => Just("\0".to_string()),
        1 => Just("a\0b".to_string()),
        1 => Just("../../../etc/passwd".to_string()),
        1 => Just("/proc/self/fd/0".to_string()),
        1 => Just("/proc/1/root/etc/shadow".to_string()),
        1 => Just("é𝄞\u{202e}\u{feff}\u{0}\u{7f}".to_string()),
        1 => prop::sample::select(vec![256usize, 5_000, 70_000, 200_000])
            .prop_map(|n| "x".repeat(n)),
        1 => prop::sample::select(vec![
            "-1", "0", "1", "1e309", "NaN", "8Ei", "1m", "1", "9223372036854775808", "0x10",
            "512Mi", "true", "null", "{}", "[]",
        ])
        .prop_map(str::to_string),
    ]
    .boxed()
}

fn any_number() -> BoxedStrategy<Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1000i64..100_000).prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        Just(json!(0)),
        Just(json!(-1)),
        Just(json!(1.5)),
    ]
    .boxed()
}

/// Any JSON value, nested a few levels.
fn any_json() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any_number(),
        odd_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(odd_string(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}

/// Nesting deeper than any parser should follow.
fn deep_json() -> BoxedStrategy<Value> {
    (1usize..300)
        .prop_map(|depth| {
            let mut v = json!("leaf");
            for i in 0..depth {
                v = if i % 2 == 0 {
                    json!([v])
                } else {
                    json!({ "a": v })
                };
            }
            v
        })
        .boxed()
}

/// `field`: absent, a plausible value, or anything.
type Field = (&'static str, BoxedStrategy<Value>);

fn field(name: &'static str, plausible: BoxedStrategy<Value>) -> Field {
    (name, plausible)
}

/// An object shaped like a request type: each field absent, plausible or random, sometimes an
/// unknown extra field; now and then not an object at all.
fn shaped(fields: Vec<Field>) -> BoxedStrategy<Value> {
    let values: Vec<BoxedStrategy<Option<Value>>> = fields
        .into_iter()
        .map(|(name, plausible)| {
            prop_oneof![
                1 => Just(None),
                4 => plausible.prop_map(move |v| Some(json!({ name: v }))),
                1 => any_json().prop_map(move |v| Some(json!({ name: v }))),
            ]
            .boxed()
        })
        .collect();
    let object = (
        values,
        prop::option::weighted(0.15, (odd_string(), any_json())),
    )
        .prop_map(|(vs, extra)| {
            let mut m = Map::new();
            for v in vs.into_iter().flatten() {
                if let Value::Object(o) = v {
                    m.extend(o);
                }
            }
            if let Some((k, v)) = extra {
                m.insert(k, v);
            }
            Value::Object(m)
        });
    prop_oneof![10 => object, 1 => any_json(), 1 => deep_json()].boxed()
}

fn one_of(values: &[&'static str]) -> BoxedStrategy<Value> {
    prop_oneof![
        4 => prop::sample::select(values.to_vec()).prop_map(Value::from),
        1 => odd_string().prop_map(Value::from),
    ]
    .boxed()
}

fn string_map(keys: &[&'static str]) -> BoxedStrategy<Value> {
    let key = prop_oneof![
        prop::sample::select(keys.to_vec()).prop_map(str::to_string),
        odd_string()
    ];
    let value = prop_oneof![4 => odd_string().prop_map(Value::from), 1 => any_json()];
    prop::collection::btree_map(key, value, 0..4)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
        .boxed()
}

fn string_array(items: &[&'static str]) -> BoxedStrategy<Value> {
    prop::collection::vec(one_of(items), 0..4)
        .prop_map(Value::Array)
        .boxed()
}

fn timeout_ms() -> BoxedStrategy<Value> {
    prop_oneof![(0u64..=TIMEOUT_CAP_MS).prop_map(Value::from), any_number()].boxed()
}

fn boolean() -> BoxedStrategy<Value> {
    any::<bool>().prop_map(Value::Bool).boxed()
}

/// Short programs that end at once whatever their language (or fail to parse).
const COMMANDS: &[&str] = &[
    "true",
    "echo hi",
    "exit 3",
    "printf 'a\\n\\nb'",
    "cat /etc/hostname",
    "ls /proc/self/fd",
    "head -c 100000 /dev/zero | wc -c",
    "print(6*7)",
    "console.log(1)",
];

const LANGUAGES: &[&str] = &[
    "python",
    "javascript",
    "bash",
    "typescript",
    "go",
    "sql",
    "command",
    "",
];

const PATHS: &[&str] = &[
    "/workspace",
    "/workspace/a.txt",
    "/tmp/x",
    "/home/user",
    "relative.txt",
    "/",
    "/etc/passwd",
    "/proc/self/status",
    "/sandbox/f.py",
    "a/../../x",
];

/// Caps every timeout field (by name, at any depth) so no request legitimately runs long.
fn cap_timeouts(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, val) in m.iter_mut() {
                let cap = match k.as_str() {
                    "timeoutMs" | "timeout_ms" => Some(TIMEOUT_CAP_MS),
                    "timeout" => Some(TIMEOUT_CAP_MS),
                    _ => None,
                };
                match (cap, val.as_f64()) {
                    (Some(cap), Some(n)) if n > cap as f64 || n <= 0.0 => {
                        *val = json!(cap);
                    }
                    _ => cap_timeouts(val),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(cap_timeouts),
        _ => {}
    }
}

// --- Requests ------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Req {
    /// Which surface's route (for reporting).
    route: &'static str,
    method: &'static str,
    path: String,
    query: Vec<(String, String)>,
    raw_query: Option<&'static str>,
    body: Option<Vec<u8>>,
    content_type: Option<String>,
    headers: Vec<(&'static str, String)>,
}

fn req(route: &'static str, method: &'static str, path: impl Into<String>) -> Req {
    Req {
        route,
        method,
        path: path.into(),
        query: Vec::new(),
        raw_query: None,
        body: None,
        content_type: None,
        headers: Vec::new(),
    }
}

impl Req {
    fn json(mut self, mut body: Value) -> Self {
        cap_timeouts(&mut body);
        self.body = Some(body.to_string().into_bytes());
        self.content_type = Some("application/json".into());
        self
    }

    fn query(mut self, q: Vec<(String, String)>) -> Self {
        self.query = q;
        self
    }

    fn raw(mut self, raw: Option<&'static str>) -> Self {
        self.raw_query = raw;
        self
    }

    fn describe(&self) -> String {
        let body = self
            .body
            .as_ref()
            .map(|b| {
                let text = String::from_utf8_lossy(b);
                let mut short: String = text.chars().take(300).collect();
                if text.len() > short.len() {
                    short.push_str(&format!("… ({} bytes)", b.len()));
                }
                short
            })
            .unwrap_or_default();
        let path: String = self.path.chars().take(200).collect();
        let query: Vec<String> = self
            .query
            .iter()
            .map(|(k, v)| format!("{k}={}", v.chars().take(60).collect::<String>()))
            .collect();
        format!(
            "{} {path} ?{} {} {body}",
            self.method,
            query.join("&"),
            self.raw_query.unwrap_or("")
        )
    }
}

/// Percent-encodes a path segment (everything but unreserved characters).
fn segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push_str("%20");
    }
    out
}

fn path_param(known: Vec<String>) -> BoxedStrategy<String> {
    prop_oneof![
        2 => prop::sample::select(known),
        3 => odd_string().prop_map(|s| s.chars().take(3000).collect()),
    ]
    .boxed()
}

/// Query pairs with the route's keys (and others), odd values.
fn query(keys: &[&'static str]) -> BoxedStrategy<Vec<(String, String)>> {
    let key = prop_oneof![
        4 => prop::sample::select(keys.to_vec()).prop_map(str::to_string),
        1 => odd_string(),
    ];
    let value = prop_oneof![
        2 => prop::sample::select(PATHS.to_vec()).prop_map(str::to_string),
        3 => odd_string(),
    ];
    prop::collection::vec((key, value), 0..4).boxed()
}

fn raw_query() -> BoxedStrategy<Option<&'static str>> {
    prop::option::weighted(
        0.1,
        prop::sample::select(vec!["%", "%zz", "a=%FF%FE", "path=%00", "&&==&", "path"]),
    )
    .boxed()
}

// --- Surfaces ------------------------------------------------------------------------------

fn limits_only() -> BoxedStrategy<Value> {
    prop::collection::btree_map(
        prop_oneof![
            4 => prop::sample::select(vec!["cpu", "memory", "pids", "disk", "ephemeral-storage", "nvidia.com/gpu"])
                .prop_map(str::to_string),
            1 => odd_string(),
        ],
        prop_oneof![
            4 => prop::sample::select(vec![
                "1", "1m", "9m", "10m", "500m", "2", "64", "1025", "0", "-1", "1.5", "8Ei",
                "128Mi", "32Mi", "1Mi", "4194304", "16", "1e3", "0.0001", "Infinity",
            ])
            .prop_map(Value::from),
            1 => any_json(),
        ],
        0..4,
    )
    .prop_map(|m| Value::Object(m.into_iter().collect()))
    .boxed()
}

fn lifecycle(ids: Vec<String>) -> BoxedStrategy<Req> {
    let limits = limits_only();
    let create = shaped(vec![
        field(
            "image",
            prop_oneof![
                3 => Just(json!({"uri": "default"})),
                1 => odd_string().prop_map(|u| json!({ "uri": u })),
            ]
            .boxed(),
        ),
        field(
            "entrypoint",
            string_array(&["tail", "-f", "/dev/null", "sleep", "1"]),
        ),
        field("resourceLimits", limits),
        field(
            "timeout",
            prop_oneof![(0i64..1_000_000).prop_map(Value::from), any_number()].boxed(),
        ),
        field("env", string_map(&["A", "PATH", "LD_PRELOAD"])),
        field(
            "metadata",
            string_map(&["team", "app.kubernetes.io/name", "a"]),
        ),
        field(
            "extensions",
            string_map(&["poolRef", "access.renew.extend.seconds"]),
        ),
        field("platform", string_map(&["os", "arch"])),
        field("networkPolicy", any_json()),
        field("volumes", any_json()),
        field("snapshotId", odd_string().prop_map(Value::from).boxed()),
    ])
    .prop_map(|b| req("lifecycle POST /v1/sandboxes", "POST", "/v1/sandboxes").json(b));
    // A valid request but for its limits, timeout and environment: reaches the policy and the
    // backend.
    let nearly = (
        limits_only(),
        prop::option::of(prop_oneof![(0i64..1_000_000).prop_map(Value::from), any_number()]),
        prop::option::of(string_map(&["A", "PATH", "LD_PRELOAD"])),
        prop::option::of(string_array(&["tail", "-f", "/dev/null", "sleep", "1"])),
    )
        .prop_map(|(limits, timeout, env, entrypoint)| {
            let mut b = json!({"image": {"uri": "default"},
                               "entrypoint": entrypoint.unwrap_or(json!(["tail", "-f", "/dev/null"])),
                               "resourceLimits": limits});
            if let Some(t) = timeout {
                b["timeout"] = t;
            }
            if let Some(e) = env {
                b["env"] = e;
            }
            req("lifecycle POST /v1/sandboxes", "POST", "/v1/sandboxes").json(b)
        });
    let id = path_param(ids);
    let renew = (
        id.clone(),
        shaped(vec![field(
            "expiresAt",
            one_of(&["2099-01-01T00:00:00Z", "2020-01-01T00:00:00Z", "not a time"]),
        )]),
    )
        .prop_map(|(id, b)| {
            req(
                "lifecycle POST renew-expiration",
                "POST",
                format!("/v1/sandboxes/{}/renew-expiration", segment(&id)),
            )
            .json(b)
        });
    let patch = (
        id.clone(),
        prop_oneof![string_map(&["team", "a", "b"]), any_json()],
    )
        .prop_map(|(id, b)| {
            req(
                "lifecycle PATCH metadata",
                "PATCH",
                format!("/v1/sandboxes/{}/metadata", segment(&id)),
            )
            .json(b)
        });
    let list = (
        query(&["state", "metadata", "page", "pageSize", "page_size"]),
        raw_query(),
    )
        .prop_map(|(q, raw)| {
            req("lifecycle GET /v1/sandboxes", "GET", "/v1/sandboxes")
                .query(q)
                .raw(raw)
        });
    let get = (
        id.clone(),
        prop::sample::select(vec![
            "",
            "/endpoints/44772",
            "/endpoints/0",
            "/endpoints/x",
            "/pause",
            "/resume",
        ]),
    )
        .prop_map(|(id, tail)| {
            let method = if tail == "/pause" || tail == "/resume" {
                "POST"
            } else {
                "GET"
            };
            req(
                "lifecycle GET/POST /v1/sandboxes/{id}…",
                method,
                format!("/v1/sandboxes/{}{tail}", segment(&id)),
            )
        });
    prop_oneof![3 => create, 3 => nearly, 2 => renew, 2 => patch, 2 => list, 1 => get].boxed()
}

/// The E2B API: its control plane (creates, lists with E2B's query, the per-sandbox routes)
/// and its data plane's routing and auth (routing headers, signed `/files`).
fn e2b(ids: Vec<String>, token: String) -> BoxedStrategy<Req> {
    let key = |r: Req| {
        let mut r = r;
        r.headers.push(("X-API-Key", E2B_KEY.to_string()));
        r
    };
    let create = shaped(vec![
        field(
            "templateID",
            one_of(&["base", "code-interpreter-v1", "base:default", "nope"]),
        ),
        field(
            "timeout",
            prop_oneof![(-10i64..1_000_000).prop_map(Value::from), any_number()].boxed(),
        ),
        field("metadata", string_map(&["tag", "a", "b"])),
        field("envVars", string_map(&["A", "PATH", "LD_PRELOAD"])),
        field("allow_internet_access", boolean()),
        field(
            "network",
            shaped(vec![
                field(
                    "allowOut",
                    string_array(&["example.com", "1.1.1.1", "*.x.org"]),
                ),
                field("denyOut", string_array(&["0.0.0.0/0", "10.0.0.0/8"])),
                field("allowPublicTraffic", boolean()),
            ]),
        ),
        field("autoPause", boolean()),
        field("secure", boolean()),
        field("mcp", any_json()),
        field("volumeMounts", any_json()),
    ])
    .prop_map(move |b| key(req("e2b POST /v2/sandboxes", "POST", "/v2/sandboxes").json(b)));
    // Valid but for its timeout, labels and environment: reaches the policy and the backend.
    let nearly = (
        prop::option::of(prop_oneof![
            (-10i64..1_000_000).prop_map(Value::from),
            any_number()
        ]),
        prop::option::of(string_map(&["tag", "a"])),
        prop::option::of(string_map(&["A", "PATH", "LD_PRELOAD"])),
    )
        .prop_map(move |(timeout, metadata, env)| {
            let mut b = json!({"templateID": "base"});
            if let Some(t) = timeout {
                b["timeout"] = t;
            }
            if let Some(m) = metadata {
                b["metadata"] = m;
            }
            if let Some(e) = env {
                b["envVars"] = e;
            }
            key(req("e2b POST /v2/sandboxes", "POST", "/v2/sandboxes").json(b))
        });
    let list = (
        query(&[
            "metadata",
            "state",
            "order",
            "limit",
            "nextToken",
            "startedAfter",
            "template",
        ]),
        raw_query(),
    )
        .prop_map(move |(q, raw)| {
            key(req("e2b GET /v2/sandboxes", "GET", "/v2/sandboxes")
                .query(q)
                .raw(raw))
        });
    let id = path_param(ids.clone());
    let routes = (
        id.clone(),
        prop::sample::select(vec![
            ("GET", ""),
            ("POST", "/timeout"),
            ("POST", "/refreshes"),
            ("POST", "/connect"),
            ("POST", "/resume"),
            ("GET", "/metrics"),
            ("PUT", "/network"),
        ]),
        shaped(vec![
            field("timeout", (-5i64..100_000).prop_map(Value::from).boxed()),
            field("duration", (-5i64..100_000).prop_map(Value::from).boxed()),
            field("allowOut", string_array(&["example.com", "1.1.1.1"])),
        ]),
    )
        .prop_map(move |(id, (method, tail), b)| {
            key(req(
                "e2b /sandboxes/{id}…",
                method,
                format!("/sandboxes/{}{tail}", segment(&id)),
            )
            .json(b))
        });
    let data = (
        prop::sample::select(ids),
        prop::sample::select(vec!["49983", "49999", "8000", "0", "x", ""]),
        prop::sample::select(vec![
            "/health",
            "/files?path=/etc/hostname",
            "/process.Process/List",
            "/execute",
            "/contexts",
            "/",
        ]),
        prop::sample::select(vec![
            None,
            Some("X-Access-Token"),
            Some("E2B-Traffic-Access-Token"),
        ]),
        any::<bool>(),
    )
        .prop_map(move |(id, port, path, header, good)| {
            let mut r = req("e2b data plane", "GET", path.to_string());
            r.headers.push(("E2b-Sandbox-Id", id));
            r.headers.push(("E2b-Sandbox-Port", port.to_string()));
            if let Some(h) = header {
                r.headers
                    .push((h, if good { token.clone() } else { "wrong".into() }));
            }
            r
        });
    let signed = (odd_string(), prop::sample::select(vec!["GET", "POST"])).prop_map(|(sig, m)| {
        req("e2b signed /files", m, "/files").query(vec![
            ("path".into(), "/etc/hostname".into()),
            ("signature".into(), sig),
        ])
    });
    prop_oneof![2 => create, 2 => nearly, 2 => list, 3 => routes, 3 => data, 1 => signed].boxed()
}

/// The key of the fuzzing server's E2B requests (every request is the default tenant's when no
/// key is configured, whatever it carries).
const E2B_KEY: &str = "fuzz";

fn isol8(sessions: Vec<String>) -> BoxedStrategy<Req> {
    let session_id = prop_oneof![
        4 => prop::sample::select(sessions.clone()).prop_map(Value::from),
        1 => odd_string().prop_map(Value::from),
    ]
    .boxed();
    let request = shaped(vec![
        field("code", one_of(COMMANDS)),
        field("cmd", one_of(COMMANDS)),
        field(
            "runtime",
            one_of(&["python", "bash", "node", "bun", "deno", "cobol"]),
        ),
        field("timeoutMs", timeout_ms()),
        field("stdin", odd_string().prop_map(Value::from).boxed()),
        field("env", string_map(&["A", "PATH"])),
        field(
            "files",
            string_map(&["/sandbox/a.txt", "/tmp/b", "/etc/x", "rel"]),
        ),
        field(
            "outputPaths",
            string_array(&["/sandbox/a.txt", "/tmp/none", "x"]),
        ),
        field(
            "workdir",
            one_of(&["/sandbox", "sub", "../etc", "/sandbox/x/y"]),
        ),
        field("setupScript", one_of(COMMANDS)),
        field(
            "fileExtension",
            one_of(&[".py", ".cjs", "py", ".toolongextension"]),
        ),
        field("installPackages", string_array(&["numpy", "x; rm -rf /"])),
        field("codeUrl", one_of(&["https://example.com/x.py"])),
    ]);
    let options = shaped(vec![
        field(
            "memoryLimit",
            one_of(&["1", "64m", "512m", "1g", "100g", "lots", "0"]),
        ),
        field(
            "cpuLimit",
            prop_oneof![any_number(), (0.0f64..4.0).prop_map(Value::from)].boxed(),
        ),
        field("pidsLimit", any_number()),
        field("timeoutMs", timeout_ms()),
        field("maxOutputSize", any_number()),
        field("sandboxSize", one_of(&["1", "16m", "64m", "10g"])),
        field("tmpSize", one_of(&["1", "16m", "64m", "10g"])),
        field("network", one_of(&["none", "host", "filtered"])),
        field("secrets", string_map(&["TOKEN"])),
        field("security", any_json()),
        field("readonlyRootFs", boolean()),
        field("persist", boolean()),
        field("debug", boolean()),
        field("image", one_of(&["default", "python:3.12"])),
    ]);
    let execute = (
        shaped(vec![
            field("request", request),
            field("options", options),
            field("sessionId", session_id.clone()),
        ]),
        prop::sample::select(vec!["/execute", "/execute/stream"]),
    )
        .prop_map(|(b, path)| req("isol8 POST /execute", "POST", path).json(b));
    let put_file = shaped(vec![
        field("sessionId", session_id),
        field("path", one_of(PATHS)),
        field("content", one_of(&["aGVsbG8=", "not base64!", ""])),
    ])
    .prop_map(|b| req("isol8 POST /file", "POST", "/file").json(b));
    let get_file =
        query(&["sessionId", "path"]).prop_map(|q| req("isol8 GET /file", "GET", "/file").query(q));
    let list = Just(req("isol8 GET /sessions", "GET", "/sessions"));
    let id = path_param(sessions);
    let delete = id.clone().prop_map(|id| {
        req(
            "isol8 DELETE /session/{id}",
            "DELETE",
            format!("/session/{}", segment(&id)),
        )
    });
    let signal = (
        id,
        shaped(vec![field(
            "signal",
            one_of(&["SIGTERM", "SIGKILL", "SIGSTOP", "9"]),
        )]),
    )
        .prop_map(|(id, b)| {
            req(
                "isol8 POST /session/{id}/signal",
                "POST",
                format!("/session/{}/signal", segment(&id)),
            )
            .json(b)
        });
    prop_oneof![5 => execute, 2 => put_file, 2 => get_file, 1 => list, 1 => delete, 1 => signal]
        .boxed()
}

fn session_exec(sessions: Vec<String>) -> BoxedStrategy<Req> {
    // Valid but for one field or two: reaches the session and the agent.
    let nearly = (
        prop::sample::select(sessions.clone()),
        prop::sample::select(COMMANDS.to_vec()),
        prop::option::of(one_of(PATHS)),
        prop::option::of(string_map(&["A", "PATH"])),
        prop::option::of((0.01f64..TIMEOUT_CAP_SECS as f64).prop_map(Value::from)),
        prop::option::of(
            (one_of(PATHS), odd_string()).prop_map(|(p, c)| json!([{"path": p, "content": c}])),
        ),
    )
        .prop_map(|(id, cmd, cwd, env, timeout, files)| {
            let mut b = json!({"sessionId": id, "command": cmd});
            for (k, v) in [
                ("cwd", cwd),
                ("env", env),
                ("timeout", timeout),
                ("files", files),
            ] {
                if let Some(v) = v {
                    b[k] = v;
                }
            }
            req("session-exec POST /api/execute", "POST", "/api/execute").json(b)
        });
    let session_id = prop_oneof![
        4 => prop::sample::select(sessions).prop_map(Value::from),
        1 => odd_string().prop_map(Value::from),
    ]
    .boxed();
    let file = shaped(vec![
        field("path", one_of(PATHS)),
        field("content", one_of(&["hello", "aGVsbG8=", "%%%"])),
        field("encoding", one_of(&["utf8", "base64", "utf-16"])),
    ]);
    let files = prop::collection::vec(file, 0..3)
        .prop_map(Value::Array)
        .boxed();
    let execute = shaped(vec![
        field("sessionId", session_id.clone()),
        field("command", one_of(COMMANDS)),
        field("code", one_of(&["console.log(1)"])),
        field("cwd", one_of(PATHS)),
        field(
            "timeout",
            prop_oneof![
                (0.0f64..TIMEOUT_CAP_SECS as f64).prop_map(Value::from),
                any_number()
            ]
            .boxed(),
        ),
        field("env", string_map(&["A", "PATH"])),
        field("files", files.clone()),
        field("stream", boolean()),
    ])
    .prop_map(|mut b| {
        // Seconds here.
        if let Some(t) = b.get_mut("timeout") {
            if t.as_f64()
                .is_some_and(|n| n > TIMEOUT_CAP_SECS as f64 || n <= 0.0)
            {
                *t = json!(TIMEOUT_CAP_SECS);
            }
        }
        let mut r = req("session-exec POST /api/execute", "POST", "/api/execute");
        r.body = Some(b.to_string().into_bytes());
        r.content_type = Some("application/json".into());
        r
    });
    let write = shaped(vec![
        field("sessionId", session_id.clone()),
        field("files", files),
    ])
    .prop_map(|b| req("session-exec POST /api/files", "POST", "/api/files").json(b));
    let list = query(&["sessionId", "path", "recursive"])
        .prop_map(|q| req("session-exec GET /api/files", "GET", "/api/files").query(q));
    let kill = shaped(vec![
        field("sessionId", session_id),
        field("pid", any_number()),
        field("signal", one_of(&["SIGTERM", "SIGKILL", "SIGFOO"])),
    ])
    .prop_map(|b| {
        req(
            "session-exec POST /api/processes/kill",
            "POST",
            "/api/processes/kill",
        )
        .json(b)
    });
    prop_oneof![3 => execute, 3 => nearly, 2 => write, 2 => list, 2 => kill].boxed()
}

/// The agent's execd routes through the data plane, and Leap0's.
fn data_plane(base: String, token: String, ids: Vec<String>) -> BoxedStrategy<Req> {
    let b = move |s: &str| format!("{base}{s}");
    let id = path_param(ids);
    let command = shaped(vec![
        field("command", one_of(COMMANDS)),
        field("cwd", one_of(PATHS)),
        field("background", boolean()),
        field("timeout", timeout_ms()),
        field("envs", string_map(&["A", "PATH", "LD_PRELOAD"])),
        field("uid", any_number()),
        field("gid", any_number()),
    ]);
    let bb = b.clone();
    let command =
        command.prop_map(move |body| req("execd POST /command", "POST", bb("/command")).json(body));
    let bb = b.clone();
    let by_id = (
        id.clone(),
        prop::sample::select(vec![
            ("GET", "/command/status/{}"),
            ("GET", "/command/{}/logs"),
            ("DELETE", "/command/{}"),
            ("DELETE", "/session/{}"),
            ("GET", "/code/contexts/{}"),
            ("DELETE", "/code/contexts/{}"),
            ("GET", "/contexts/{}"),
            ("DELETE", "/contexts/{}"),
        ]),
        query(&["cursor", "id", "language"]),
    )
        .prop_map(move |(id, (method, pattern), q)| {
            let path = pattern.replace("{}", &segment(&id));
            req("execd/leap0 routes by id", method, bb(&path)).query(q)
        });
    let bb = b.clone();
    let interrupt = (
        prop::sample::select(vec!["/command", "/code"]),
        query(&["id"]),
    )
        .prop_map(move |(p, q)| req("execd DELETE /command|/code ?id", "DELETE", bb(p)).query(q));
    let bb = b.clone();
    let session = (
        id.clone(),
        shaped(vec![
            field("command", one_of(COMMANDS)),
            field("cwd", one_of(PATHS)),
            field("timeout", timeout_ms()),
        ]),
        shaped(vec![field("cwd", one_of(PATHS))]),
        any::<bool>(),
    )
        .prop_map(move |(id, run, create, new)| {
            if new {
                req("execd POST /session", "POST", bb("/session")).json(create)
            } else {
                req(
                    "execd POST /session/{id}/run",
                    "POST",
                    bb(&format!("/session/{}/run", segment(&id))),
                )
                .json(run)
            }
        });
    let bb = b.clone();
    let code = (
        shaped(vec![
            field("code", one_of(COMMANDS)),
            field(
                "context",
                shaped(vec![
                    field("id", one_of(&["x"])),
                    field("language", one_of(LANGUAGES)),
                ]),
            ),
        ]),
        shaped(vec![
            field("language", one_of(LANGUAGES)),
            field("cwd", one_of(PATHS)),
        ]),
        query(&["language"]),
        0..3u8,
    )
        .prop_map(move |(run, ctx, q, which)| match which {
            0 => req("execd POST /code", "POST", bb("/code")).json(run),
            1 => req("execd POST /code/context", "POST", bb("/code/context")).json(ctx),
            _ => req(
                "execd GET|DELETE /code/contexts",
                if q.len() % 2 == 0 { "GET" } else { "DELETE" },
                bb("/code/contexts"),
            )
            .query(q),
        });
    let bb = b.clone();
    let permission = shaped(vec![
        field("owner", one_of(&["user", "root", "nobody", "9999"])),
        field("group", one_of(&["user", "root"])),
        field(
            "mode",
            prop_oneof![
                prop::sample::select(vec![644, 755, 0, 7777, 999, 8]).prop_map(Value::from),
                any_number()
            ]
            .boxed(),
        ),
    ]);
    let path_map = |inner: BoxedStrategy<Value>| {
        prop::collection::btree_map(
            prop_oneof![
                prop::sample::select(PATHS.to_vec()).prop_map(str::to_string),
                odd_string()
            ],
            inner,
            0..3,
        )
        .prop_map(|m| Value::Object(m.into_iter().collect::<Map<String, Value>>()))
        .boxed()
    };
    let replace_item = shaped(vec![
        field("old", one_of(&["a", ""])),
        field("new", one_of(&["b"])),
    ]);
    let mv_item = shaped(vec![
        field("src", one_of(PATHS)),
        field("dest", one_of(PATHS)),
    ]);
    let files = (
        prop::sample::select(vec![
            ("GET", "/files/info"),
            ("DELETE", "/files"),
            ("POST", "/files/permissions"),
            ("POST", "/files/mv"),
            ("POST", "/files/replace"),
            ("GET", "/files/search"),
            ("GET", "/files/download"),
            ("GET", "/directories/list"),
            ("POST", "/directories"),
            ("DELETE", "/directories"),
        ]),
        query(&["path", "pattern", "depth", "verbose", "offset", "limit"]),
        prop_oneof![
            path_map(permission),
            path_map(replace_item),
            prop::collection::vec(mv_item, 0..3)
                .prop_map(Value::Array)
                .boxed(),
            any_json()
        ],
        raw_query(),
    )
        .prop_map(move |((method, path), q, body, raw)| {
            let r = req(files_route_name(path), method, bb(path))
                .query(q)
                .raw(raw);
            if method == "POST" {
                r.json(body)
            } else {
                r
            }
        });
    let bb = b.clone();
    let upload = (
        prop::collection::vec(
            (
                prop_oneof![
                    3 => shaped(vec![
                        field("path", one_of(PATHS)),
                        field("owner", one_of(&["user", "nobody"])),
                        field("group", one_of(&["user"])),
                        field("mode", any_number()),
                    ]).prop_map(|v| v.to_string()),
                    1 => odd_string(),
                ],
                prop::sample::select(vec!["metadata", "file", "other"]),
            ),
            0..4,
        ),
    )
        .prop_map(move |(parts,)| {
            let boundary = "fuzzboundary";
            let mut body = String::new();
            for (content, name) in parts {
                body.push_str(&format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\n\r\n{content}\r\n"
                ));
            }
            body.push_str(&format!("--{boundary}--\r\n"));
            let mut r = req("execd POST /files/upload", "POST", bb("/files/upload"));
            r.body = Some(body.into_bytes());
            r.content_type = Some(format!("multipart/form-data; boundary={boundary}"));
            r
        });
    let bb = b.clone();
    let leap0 = shaped(vec![
        field("code", one_of(COMMANDS)),
        field("language", one_of(LANGUAGES)),
        field("context_id", one_of(&["x"])),
        field("timeout_ms", timeout_ms()),
        field("env_vars", string_map(&["A"])),
        field("cwd", one_of(PATHS)),
    ]);
    let leap0 = (
        leap0,
        prop::sample::select(vec![
            ("POST", "/execute"),
            ("POST", "/execute/async"),
            ("POST", "/contexts"),
            ("GET", "/contexts"),
            ("GET", "/healthz"),
        ]),
    )
        .prop_map(move |(body, (method, path))| {
            let r = req("leap0", method, bb(path));
            if method == "POST" {
                r.json(body)
            } else {
                r
            }
        });
    let other = (
        prop::sample::select(vec![
            "/ping",
            "/metrics",
            "/pty",
            "/nope",
            "/proxy/1/",
            "/proxy/notaport/x",
        ]),
        prop::sample::select(vec!["GET", "POST", "DELETE", "PUT"]),
        any_json(),
    )
        .prop_map(move |(path, method, body)| req("execd other", method, b(path)).json(body));
    prop_oneof![
        4 => command,
        2 => by_id,
        1 => interrupt,
        2 => session,
        3 => code,
        4 => files,
        1 => upload,
        2 => leap0,
        1 => other,
    ]
    .prop_map(move |mut r| {
        r.headers.push(("X-EXECD-ACCESS-TOKEN", token.clone()));
        r
    })
    .boxed()
}

fn files_route_name(path: &str) -> &'static str {
    match path {
        "/files/info" => "execd /files/info",
        "/files" => "execd DELETE /files",
        "/files/permissions" => "execd /files/permissions",
        "/files/mv" => "execd /files/mv",
        "/files/replace" => "execd /files/replace",
        "/files/search" => "execd /files/search",
        "/files/download" => "execd /files/download",
        "/directories/list" => "execd /directories/list",
        _ => "execd /directories",
    }
}

/// The 5xx the execd compatibility spec pins on purpose (`../shared/compat/opensandbox-execd.md`),
/// which no other surface has. Everything else that is 5xx fails the test.
fn allowed_5xx(req: &Req, status: u16, body: &str) -> bool {
    // E2B's data plane answers 502 for a sandbox that is not running or a port nothing listens
    // on (its SDKs read `was not found` / `port is not open`), and the E2B routes execbox does
    // not implement are 501.
    if req.route.starts_with("e2b") {
        return (status == 502
            && (body.contains("The sandbox was not found") || body.contains("port is not open")))
            || (status == 501 && body.contains("is not supported by execbox"));
    }
    if !req.route.starts_with("execd") && req.route != "leap0" {
        return false;
    }
    // §12: the port proxy answers 502 `Bad Gateway` when nothing listens on the port inside the
    // sandbox: its upstream is down, which is what 502 means. (With a large request body the
    // agent's early answer closes the connection first, and the server's proxy reports the
    // same 502 in its own envelope: the port-proxy routes stream their bodies, so the agent
    // does not hold the answer back to read them.)
    if status == 502 && req.path.contains("/proxy/44772/proxy/") {
        return true;
    }
    // §5–§7: upstream execd answers 500 RUNTIME_ERROR for an unknown session, command or
    // context id on the interrupt and run routes, and for a language a context operation does
    // not support; the SDKs are written against those statuses, so execbox keeps them.
    const PINNED: [&str; 7] = [
        "\"message\":\"no such session: ",
        "\"message\":\"error running in session. context not found\"",
        "\"message\":\"error running codes context not found\"",
        "\"message\":\"error running codes unknown language: ",
        "\"message\":\"error running codes language ",
        "\"message\":\"unsupported language context operation: ",
        "\"message\":\"command ",
    ];
    let pinned = PINNED.iter().any(|p| body.contains(p))
        && (!body.contains("\"message\":\"command ") || body.ends_with(" is not running\"}"));
    // §5: a context whose interpreter cannot start is 500 RUNTIME_ERROR ("error creating code
    // context"): the sandbox's runtime failed, not the request.
    let interpreter = body.contains("\"message\":\"error creating code context");
    status == 500 && body.contains("RUNTIME_ERROR") && (pinned || interpreter)
}

// --- The run -------------------------------------------------------------------------------

struct Outcome {
    cases: u32,
    statuses: BTreeMap<u16, u32>,
    failures: Vec<String>,
}

fn send(agent: &ureq::Agent, base: &str, r: &Req) -> Result<(u16, String), String> {
    let mut url = format!("{base}{}", r.path);
    if let Some(raw) = r.raw_query {
        url.push('?');
        url.push_str(raw);
    }
    let mut request = agent.request(r.method, &url);
    for (k, v) in &r.query {
        request = request.query(k, v);
    }
    if let Some(ct) = &r.content_type {
        request = request.set("Content-Type", ct);
    }
    for (k, v) in &r.headers {
        request = request.set(k, v);
    }
    let result = match &r.body {
        Some(b) => request.send_bytes(b),
        None => request.call(),
    };
    let resp = match result {
        Ok(resp) => resp,
        Err(ureq::Error::Status(_, resp)) => resp,
        Err(e) => return Err(format!("transport error: {e}")),
    };
    let status = resp.status();
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut resp.into_reader().take(1 << 20), &mut body)
        .map_err(|e| format!("reading the body: {e}"))?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

use std::io::Read as _;

fn run_surface(
    name: &str,
    server: &TestServer,
    cases: u32,
    seed_offset: u8,
    strategy: BoxedStrategy<Req>,
) -> Outcome {
    let mut seed = SEED;
    seed[0] ^= seed_offset;
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed),
    );
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build();
    let mut out = Outcome {
        cases: 0,
        statuses: BTreeMap::new(),
        failures: Vec::new(),
    };
    for _ in 0..cases {
        let r = strategy
            .new_tree(&mut runner)
            .expect("generate a request")
            .current();
        out.cases += 1;
        match send(&agent, &server.base, &r) {
            // The server may answer (a 401, 413…) and close before reading a large body: the
            // client then fails writing it. Not a failure while the server stays alive.
            Err(e) if e.contains("Broken pipe") || e.contains("Connection reset") => {
                *out.statuses.entry(0).or_default() += 1;
            }
            Err(e) => out
                .failures
                .push(format!("[{name}] {}: {e}\n    {}", r.route, r.describe())),
            Ok((status, body)) => {
                *out.statuses.entry(status).or_default() += 1;
                if status >= 500 && !allowed_5xx(&r, status, &body) {
                    let line = format!(
                        "[{name}] {} -> {status} {}\n    {}",
                        r.route,
                        body.chars().take(300).collect::<String>(),
                        r.describe()
                    );
                    out.failures.push(line);
                }
                // An E2B sandbox too.
                if status == 201 && r.path == "/v2/sandboxes" {
                    if let Some(id) = serde_json::from_str::<Value>(&body)
                        .ok()
                        .and_then(|v| v["sandboxID"].as_str().map(str::to_string))
                    {
                        let _ = agent
                            .delete(&server.url(&format!("/sandboxes/{id}")))
                            .call();
                    }
                }
                // A lifecycle sandbox the fuzzer managed to create is removed at once.
                if status == 202 && r.path == "/v1/sandboxes" {
                    if let Some(id) = serde_json::from_str::<Value>(&body)
                        .ok()
                        .and_then(|v| v["id"].as_str().map(str::to_string))
                    {
                        let _ = agent
                            .delete(&server.url(&format!("/v1/sandboxes/{id}")))
                            .call();
                    }
                }
            }
        }
        if !alive(server) {
            out.failures
                .push(format!("[{name}] the server died after: {}", r.describe()));
            break;
        }
    }
    out
}

fn alive(server: &TestServer) -> bool {
    server
        .pid()
        .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
        && ureq::get(&server.url("/health")).call().is_ok()
}

#[test]
fn no_request_of_any_surface_gets_a_5xx_or_kills_the_server() {
    let started = Instant::now();
    // Implicit Leap0 contexts go away quickly, so the fuzzed sandbox does not fill up with
    // interpreters.
    let server = TestServer::start_with_config("context_idle_ttl_secs = 2\n");
    let sbx = server.create(json!({"resourceLimits": {"cpu": "1", "memory": "2Gi"}}));
    let other = server.create(json!({"resourceLimits": {"cpu": "1", "memory": "256Mi"}}));
    // Known ids to aim at, besides random ones.
    let (s, v) = server.post(
        "/execute",
        &json!({"request": {"runtime": "bash", "cmd": "echo"}, "sessionId": "fz"}).to_string(),
    );
    assert_eq!(s, 200, "{v}");
    let (s, v) = server.post(
        "/api/execute",
        &json!({"sessionId": "fz", "command": "echo"}).to_string(),
    );
    assert_eq!(s, 200, "{v}");
    let command_id = sbx
        .run("true")
        .events
        .first()
        .and_then(|e| e["text"].as_str().map(str::to_string))
        .unwrap_or_default();
    let ids = vec![sbx.id.clone(), other.id.clone(), "nope".to_string()];
    let e2b_ids = vec![other.id.clone(), "nope".to_string()];
    let sessions = vec!["fz".to_string(), "fz2".to_string()];
    let base = format!("/v1/sandboxes/{}/proxy/44772", sbx.id);
    let n = scale();
    let surfaces: Vec<(&str, u32, BoxedStrategy<Req>)> = vec![
        ("lifecycle", 1000 * n, lifecycle(ids)),
        ("isol8", 800 * n, isol8(sessions.clone())),
        ("session-exec", 800 * n, session_exec(sessions)),
        (
            "execd+leap0",
            3000 * n,
            data_plane(
                base,
                sbx.token.clone(),
                vec![command_id, "nope".into(), sbx.id.clone()],
            ),
        ),
        ("e2b", 600 * n, e2b(e2b_ids, other.token.clone())),
    ];
    let mut failures = Vec::new();
    let mut summary = Vec::new();
    // `EXECBOX_FUZZ_SURFACES=e2b,lifecycle` runs only those surfaces.
    let only = std::env::var("EXECBOX_FUZZ_SURFACES").ok();
    for (i, (name, cases, strategy)) in surfaces.into_iter().enumerate() {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|s| s.trim() == name))
        {
            continue;
        }
        let t = Instant::now();
        let out = run_surface(name, &server, cases, i as u8, strategy);
        summary.push(format!(
            "{name}: {} cases in {:.1} s, statuses {:?}",
            out.cases,
            t.elapsed().as_secs_f64(),
            out.statuses
        ));
        failures.extend(out.failures);
    }
    let report = format!(
        "fuzz_requests: {}\nfuzz_requests: total {:.1} s\n",
        summary.join("\n  "),
        started.elapsed().as_secs_f64()
    );
    eprint!("{report}");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz_requests-report.txt");
    if std::fs::write(&path, &report).is_ok() {
        eprintln!("fuzz_requests: report in {}", path.display());
    }
    assert!(alive(&server), "the server must still answer /health");
    assert!(
        failures.is_empty(),
        "{} requests got a 5xx or no answer:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
