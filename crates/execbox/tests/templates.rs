//! The code-interpreter template through a real server: sandboxes of the image
//! `opensandbox/code-interpreter` see it read-only at `/opt/execbox/template`, and Python finds
//! its packages in commands, sessions and code contexts (a matplotlib plot is a PNG result, a
//! DataFrame an HTML one); what the user installs with `pip install --user` wins over it; a
//! template that cannot be built is a 503 naming what is missing, and nothing is left of it.
//!
//! The template is built on first use into the test servers' shared `TEST_TEMPLATES_DIR`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(300);

/// `POST /code` read to the end: its events (pings dropped).
fn run_code(sb: &Sandbox, code: &str, context: Value) -> Vec<Value> {
    let body = json!({"code": code, "context": context});
    let text = sb
        .execd("POST", "/code")
        .timeout(T)
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .expect("POST /code")
        .into_string()
        .expect("stream");
    text.split_terminator("\n\n")
        .filter_map(|f| f.strip_prefix("data: "))
        .map(|j| serde_json::from_str::<Value>(j).expect("event"))
        .filter(|e| e["type"] != "ping")
        .collect()
}

fn results(evs: &[Value]) -> Vec<Value> {
    evs.iter()
        .filter(|e| e["type"] == "result")
        .map(|e| e["results"].clone())
        .collect()
}

fn no_error(evs: &[Value]) -> bool {
    !evs.iter().any(|e| e["type"] == "error")
        && evs.iter().any(|e| e["type"] == "execution_complete")
}

const WHERE_FROM: &str = "import numpy, pandas, matplotlib, scipy, PIL, requests\n\
    print(' '.join(m.__file__ for m in (numpy, pandas, matplotlib, scipy, PIL, requests)))";

#[track_caller]
fn all_from_the_template(paths: &str) {
    let paths: Vec<&str> = paths.split_whitespace().collect();
    assert_eq!(paths.len(), 6, "{paths:?}");
    for p in paths {
        assert!(p.starts_with("/opt/execbox/template/python/"), "{p}");
    }
}

#[test]
fn code_interpreter_sandboxes_have_the_data_stack_everywhere() {
    let server = TestServer::start();
    let sb = server.create(json!({"image": {"uri": CODE_INTERPRETER_IMAGE},
        "resourceLimits": {"cpu": "2", "memory": "2Gi"}}));

    // Commands: the packages come from the template, whatever the host's Python has.
    let r =
        sb.run_with(json!({"command": format!("python3 -c \"{WHERE_FROM}\""), "timeout": 120000}));
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    all_from_the_template(&r.out());
    // Read-only, with its manifest; the environment says where it is.
    let r = sb.run("touch /opt/execbox/template/x 2>&1; echo $EXECBOX_TEMPLATE; \
                    python3 -c \"import json; m = json.load(open('/opt/execbox/template/manifest.json')); \
                    print(m['name'], sorted(p['name'].lower() for p in m['installed'] if p['name'].lower() in ('numpy', 'pandas')))\"");
    assert_eq!(
        r.stdout,
        [
            "touch: cannot touch '/opt/execbox/template/x': Read-only file system",
            "/opt/execbox/template",
            "code-interpreter ['numpy', 'pandas']"
        ],
        "{r:?}"
    );

    // A bash session.
    let resp = sb
        .execd("POST", "/session")
        .set("Content-Type", "application/json")
        .send_string("{}")
        .expect("create session");
    let session: Value = resp.into_json().expect("session json");
    let sid = session["session_id"]
        .as_str()
        .expect("session_id")
        .to_string();
    let text = sb
        .execd("POST", &format!("/session/{sid}/run"))
        .timeout(T)
        .set("Content-Type", "application/json")
        .send_string(&json!({"command": format!("python3 -c \"{WHERE_FROM}\"")}).to_string())
        .expect("session run")
        .into_string()
        .expect("stream");
    let out: String = text
        .split_terminator("\n\n")
        .filter_map(|f| f.strip_prefix("data: "))
        .filter_map(|j| serde_json::from_str::<Value>(j).ok())
        .filter(|e| e["type"] == "stdout")
        .filter_map(|e| e["text"].as_str().map(str::to_string))
        .collect::<Vec<_>>()
        .join(" ");
    all_from_the_template(&out);

    // A code context (its kernel starts Python with -S, and runs the template's hook itself):
    // a plot is a PNG, a DataFrame is HTML.
    let ctx = json!({"language": "python"});
    let evs = run_code(&sb, WHERE_FROM, ctx.clone());
    assert!(no_error(&evs), "{evs:?}");
    let out: String = evs
        .iter()
        .filter(|e| e["type"] == "stdout")
        .filter_map(|e| e["text"].as_str())
        .collect();
    all_from_the_template(&out);
    let evs = run_code(
        &sb,
        "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [3, 1, 2])\nplt.show()",
        ctx.clone(),
    );
    assert!(no_error(&evs), "{evs:?}");
    let png = results(&evs)
        .iter()
        .find_map(|r| r["image/png"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("an image/png result: {evs:?}"));
    assert!(
        png.starts_with("iVBORw0KGgo"),
        "base64 of a PNG: {}",
        &png[..20.min(png.len())]
    );
    let evs = run_code(
        &sb,
        "import pandas as pd\npd.DataFrame({'city': ['Oslo', 'Lima'], 'n': [1, 2]})",
        ctx,
    );
    assert!(no_error(&evs), "{evs:?}");
    let html = results(&evs)
        .iter()
        .find_map(|r| r["text/html"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("a text/html result: {evs:?}"));
    assert!(html.contains("<table") && html.contains("Oslo"), "{html}");

    // The default image is the host's runtimes alone.
    let plain = server.create(json!({}));
    let r =
        plain.run("ls -A /opt/execbox/template | wc -l; echo \"[$PYTHONPATH][$EXECBOX_TEMPLATE]\"");
    assert_eq!(r.stdout, ["0", "[][]"], "{r:?}");
}

/// A package the user installs (`pip install --user`, from the package index the host's pip
/// uses) is the one imported, not the template's version of it; the rest of the template stays.
#[test]
fn user_installs_are_not_shadowed_by_the_template() {
    let server = TestServer::start_with_config(&format!(
        "[network.registries]\n{}\n",
        pypi_registries_line()
    ));
    // The host's own CA settings (a proxying network may need them), passed on as they are.
    let mut envs: serde_json::Map<String, Value> = [
        "PIP_CERT",
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "PIP_INDEX_URL",
    ]
    .iter()
    .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), json!(v))))
    .collect();
    envs.insert("PIP_DISABLE_PIP_VERSION_CHECK".into(), json!("1"));
    let sb = server.create(json!({
        "image": {"uri": CODE_INTERPRETER_IMAGE},
        "env": envs,
        "networkPolicy": {"defaultAction": "deny",
            "egress": [{"action": "allow", "target": "@pypi"}]},
    }));
    let version = "import requests; print(requests.__version__, requests.__file__)";
    let r = sb.run(&format!("python3 -c '{version}'"));
    let template_version = r.out();
    assert!(
        template_version.contains("/opt/execbox/template/python/requests/"),
        "{r:?}"
    );
    assert!(
        !template_version.starts_with("2.31.0 "),
        "the template has another version: {r:?}"
    );

    let r = sb.run_with(json!({"command":
        "python3 -m pip install --user --no-deps --no-cache-dir --retries 1 --timeout 60 \
         requests==2.31.0 > /tmp/pip.log 2>&1; echo exit=$?",
        "timeout": 240000}));
    assert_eq!(
        r.out(),
        "exit=0",
        "{r:?}\n{}",
        sb.run("tail -20 /tmp/pip.log").out()
    );
    // A new process: the user's version, from the user's site-packages.
    let r = sb.run(&format!("python3 -c '{version}'"));
    assert!(
        r.out().starts_with("2.31.0 /home/user/.local/lib/python3"),
        "the user's install wins: {r:?}"
    );
    // A new code context too; the template's other packages are still there.
    let evs = run_code(
        &sb,
        "import requests, numpy\nprint(requests.__version__, numpy.__file__.startswith('/opt/execbox/template/'))",
        json!({"language": "python"}),
    );
    let out: String = evs
        .iter()
        .filter(|e| e["type"] == "stdout")
        .filter_map(|e| e["text"].as_str())
        .collect();
    assert_eq!(out, "2.31.0 True\n", "{evs:?}");

    // A virtualenv's own packages win too; the template is still there behind them.
    let r = sb.run_with(json!({"command":
        "python3 -m venv /tmp/venv > /tmp/venv.log 2>&1 && /tmp/venv/bin/python -m pip install \
         --no-deps --no-cache-dir --retries 1 --timeout 60 requests==2.31.0 >> /tmp/venv.log 2>&1; \
         echo exit=$?; /tmp/venv/bin/python -c \
         'import requests, numpy; print(requests.__file__.startswith(\"/tmp/venv/\"), numpy.__file__.startswith(\"/opt/execbox/template/\"))'",
        "timeout": 240000}));
    assert_eq!(
        r.stdout,
        ["exit=0", "True True"],
        "{r:?}\n{}",
        sb.run("tail -20 /tmp/venv.log").out()
    );
}

/// With its package index out of reach, the template cannot be built: the server still starts
/// (the build at start fails and is logged), a create asking for the template tries again and
/// is a 503 in the lifecycle API's envelope naming the missing package and the index, nothing
/// of the build is left, and sandboxes of the default image are unaffected.
#[test]
fn a_template_that_cannot_be_built_is_a_503_naming_what_is_missing() {
    let templates = std::env::temp_dir().join(unique("execbox-test-templates-unreachable"));
    // A port nothing listens on: the index is unreachable.
    let port = free_port();
    let index = format!("http://127.0.0.1:{port}/simple");
    let server = TestServer::start_with_env(
        "",
        &[
            (
                "EXECBOX_TEMPLATES_DIR",
                templates.to_str().expect("utf-8 path"),
            ),
            ("PIP_INDEX_URL", &index),
            ("PIP_RETRIES", "0"),
            ("PIP_TIMEOUT", "5"),
        ],
    );
    for _ in 0..2 {
        let (status, v) = server.create_raw(
            &json!({"image": {"uri": CODE_INTERPRETER_IMAGE},
                "entrypoint": ["tail", "-f", "/dev/null"],
                "resourceLimits": {"cpu": "1", "memory": "512Mi"}})
            .to_string(),
        );
        assert_eq!(status, 503, "{v}");
        assert_eq!(v["code"], "SANDBOX::UNKNOWN_ERROR", "{v}");
        assert_eq!(v.as_object().map(|o| o.len()), Some(2), "{v}");
        let message = v["message"].as_str().unwrap_or("");
        assert!(message.starts_with("image.uri: "), "{message}");
        assert!(message.contains("code-interpreter"), "{message}");
        assert!(message.contains("numpy"), "names the package: {message}");
        assert!(message.contains(&index), "names the index: {message}");
    }
    let left: Vec<String> = std::fs::read_dir(&templates)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != ".locks")
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "nothing left of the failed builds: {left:?}"
    );
    let sb = server.create(json!({}));
    assert_eq!(sb.run("echo ok").out(), "ok");
    drop(sb);
    drop(server);
    let _ = std::fs::remove_dir_all(&templates);
}

/// Hard links of every file of `from` under `to` (the same template, instantly, on the same
/// file system).
fn link_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir").flatten() {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let meta = e.path().symlink_metadata().expect("metadata");
        if meta.is_dir() {
            link_tree(&src, &dst);
        } else if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&src).expect("readlink");
            std::os::unix::fs::symlink(target, &dst).expect("symlink");
        } else {
            std::fs::hard_link(&src, &dst).expect("hard link");
        }
    }
}

fn execbox(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_execbox"))
        .args(args)
        .output()
        .expect("run execbox")
}

/// `execbox template`: `build` finds a built template, `ls` lists it, `rm` refuses while a
/// sandbox has it mounted and removes it once none does. On a store of its own (a hard-linked
/// copy of the shared one), so that no other test's template goes.
#[test]
fn the_template_command_builds_lists_and_removes() {
    let shared = execbox(&[
        "template",
        "build",
        "code-interpreter",
        "--templates-dir",
        TEST_TEMPLATES_DIR,
    ]);
    assert!(shared.status.success(), "{shared:?}");
    let built = std::fs::read_dir(TEST_TEMPLATES_DIR)
        .expect("shared store")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("code-interpreter-"))
        })
        .max_by_key(|p| {
            std::fs::metadata(p.join("manifest.json"))
                .and_then(|m| m.modified())
                .ok()
        })
        .expect("a built code-interpreter template");
    let store = std::env::temp_dir().join(unique("execbox-test-templates-own"));
    link_tree(&built, &store.join(built.file_name().expect("name")));
    let dir = store.to_str().expect("utf-8");

    // Found, not rebuilt; listed.
    let out = execbox(&[
        "template",
        "build",
        "code-interpreter",
        "--templates-dir",
        dir,
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("is built"),
        "{out:?}"
    );
    let out = execbox(&["template", "ls", "--templates-dir", dir]);
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        listing.lines().any(|l| l.starts_with("code-interpreter ")),
        "{listing}"
    );

    // In use by a sandbox: refused.
    let server = TestServer::start_with_env(
        "[templates]\nprebuild = []\n",
        &[("EXECBOX_TEMPLATES_DIR", dir)],
    );
    let sb = server.create(json!({"image": {"uri": CODE_INTERPRETER_IMAGE}}));
    assert_eq!(
        sb.run("python3 -c 'import numpy; print(numpy.__name__)'")
            .out(),
        "numpy"
    );
    let out = execbox(&["template", "rm", "code-interpreter", "--templates-dir", dir]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{out:?}"
    );
    assert!(built.is_dir());

    // Once the sandbox is gone: removed (the shared template, linked from, stays).
    assert_eq!(server.delete(&format!("/v1/sandboxes/{}", sb.id)), 204);
    drop(sb);
    let out = execbox(&["template", "rm", "code-interpreter", "--templates-dir", dir]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("removed"),
        "{out:?}"
    );
    let out = execbox(&["template", "ls", "--templates-dir", dir]);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("no templates"),
        "{out:?}"
    );
    assert!(built.join("manifest.json").is_file());
    drop(server);
    let _ = std::fs::remove_dir_all(&store);
}
