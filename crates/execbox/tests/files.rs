//! The execd filesystem and directory API (`/files/*`, `/directories*`) end to end, through the
//! server's proxy into a real sandbox: uploads, downloads, metadata, moves, search, replace,
//! directories, error envelopes, cut uploads and symlink attacks.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn get(sb: &Sandbox, path: &str) -> Reply {
    reply(sb.execd("GET", path).call())
}

fn delete(sb: &Sandbox, path: &str) -> Reply {
    reply(sb.execd("DELETE", path).call())
}

fn post(sb: &Sandbox, path: &str, body: &str) -> Reply {
    reply(sb.execd("POST", path).send_string(body))
}

fn post_json(sb: &Sandbox, path: &str, body: Value) -> Reply {
    post(sb, path, &body.to_string())
}

/// Runs a shell command in the sandbox and returns its stdout lines joined by `\n`.
#[track_caller]
fn sh(sb: &Sandbox, cmd: &str) -> String {
    let r = sb.run(cmd);
    assert_eq!(r.exit_code, Some(0), "{cmd}: {r:?}");
    r.out()
}

const BOUNDARY: &str = "execbox-test-boundary-5c0ffee";

/// One multipart part: field name, optional file name, bytes.
struct Part<'a> {
    name: &'a str,
    filename: Option<&'a str>,
    data: Vec<u8>,
}

fn meta_file(v: Value) -> Part<'static> {
    Part {
        name: "metadata",
        filename: Some("metadata"),
        data: v.to_string().into_bytes(),
    }
}

fn meta_field(v: Value) -> Part<'static> {
    Part {
        name: "metadata",
        filename: None,
        data: v.to_string().into_bytes(),
    }
}

fn file_part(data: &[u8]) -> Part<'static> {
    Part {
        name: "file",
        filename: Some("blob"),
        data: data.to_vec(),
    }
}

fn part_head(p: &Part) -> Vec<u8> {
    let mut out = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{}\"",
        p.name
    );
    if let Some(f) = p.filename {
        out.push_str(&format!("; filename=\"{f}\""));
    }
    out.push_str(if p.name == "metadata" {
        "\r\nContent-Type: application/json\r\n\r\n"
    } else {
        "\r\nContent-Type: application/octet-stream\r\n\r\n"
    });
    out.into_bytes()
}

fn multipart(parts: &[Part]) -> Vec<u8> {
    let mut body = Vec::new();
    for p in parts {
        body.extend(part_head(p));
        body.extend(&p.data);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{BOUNDARY}--\r\n").bytes());
    body
}

fn upload(sb: &Sandbox, parts: &[Part]) -> Reply {
    reply(
        sb.execd("POST", "/files/upload")
            .set(
                "Content-Type",
                &format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .send_bytes(&multipart(parts)),
    )
}

/// Polls `cond` for up to 10 s.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn upload_pairs_with_metadata_as_file_part_or_field_and_owners() {
    let server = TestServer::start();
    let sb = server.create(json!({}));
    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let r = upload(
        &sb,
        &[
            meta_file(
                json!({"path": "/home/user/up/deep/a.txt", "mode": 644, "owner": null, "group": null}),
            ),
            file_part(b"hello upload\n"),
            meta_field(
                json!({"path": "~/b.bin", "owner": "nobody", "group": "nogroup", "mode": 600}),
            ),
            file_part(&binary),
            meta_file(json!({"path": "$HOME/c.txt"})),
            file_part(b""),
        ],
    );
    r.assert_empty_ok();
    assert_eq!(
        sh(
            &sb,
            "stat -c '%n %u %g %a' /home/user/up /home/user/up/deep"
        ),
        "/home/user/up 1000 1000 755\n/home/user/up/deep 1000 1000 755"
    );
    assert_eq!(
        sh(
            &sb,
            "stat -c '%n %u %g %a %s' /home/user/up/deep/a.txt /home/user/b.bin /home/user/c.txt"
        ),
        "/home/user/up/deep/a.txt 1000 1000 644 13\n/home/user/b.bin 65534 65534 600 70000\n\
         /home/user/c.txt 1000 1000 755 0"
    );
    assert_eq!(
        get(&sb, "/files/download?path=/home/user/b.bin").body,
        binary
    );
    // No temporary file is left beside the destinations.
    assert_eq!(sh(&sb, "ls -A /home/user/up/deep"), "a.txt");
    assert!(!sh(&sb, "ls -A /home/user").contains(".execbox-upload"));

    // Overwriting replaces the content and keeps the mode when none is given.
    sh(&sb, "chmod 640 /home/user/up/deep/a.txt");
    upload(
        &sb,
        &[
            meta_file(json!({"path": "/home/user/up/deep/a.txt"})),
            file_part(b"v2"),
        ],
    )
    .assert_empty_ok();
    assert_eq!(
        sh(
            &sb,
            "stat -c '%a %u' /home/user/up/deep/a.txt; cat /home/user/up/deep/a.txt"
        ),
        "640 1000\nv2"
    );
    // A file planted as a symlink is replaced, not followed.
    sh(
        &sb,
        "echo keep > /home/user/target; ln -s /home/user/target /home/user/link",
    );
    upload(
        &sb,
        &[
            meta_file(json!({"path": "/home/user/link"})),
            file_part(b"new"),
        ],
    )
    .assert_empty_ok();
    assert_eq!(
        sh(
            &sb,
            "cat /home/user/target; test -L /home/user/link || cat /home/user/link"
        ),
        "keep\nnew"
    );
}

#[test]
fn upload_errors() {
    let server = TestServer::start();
    let sb = server.create(json!({}));
    let m = json!({"path": "/home/user/e.txt"});
    let msg = upload(&sb, &[]).assert_error(400, "INVALID_FILE");
    assert!(msg.contains("multipart form is empty"), "{msg}");
    let msg = upload(&sb, &[file_part(b"x")]).assert_error(400, "INVALID_FILE_METADATA");
    assert!(msg.contains("metadata file is missing"), "{msg}");
    let msg = upload(&sb, &[meta_file(m.clone())]).assert_error(400, "INVALID_FILE_CONTENT");
    assert!(msg.contains("file is missing"), "{msg}");
    let msg = upload(
        &sb,
        &[
            meta_file(m.clone()),
            file_part(b"x"),
            meta_file(json!({"path": "/home/user/f.txt"})),
        ],
    )
    .assert_error(400, "INVALID_FILE");
    assert!(
        msg.contains("metadata and file count mismatch: 2 vs 1"),
        "{msg}"
    );
    upload(
        &sb,
        &[
            Part {
                name: "metadata",
                filename: Some("metadata"),
                data: b"{not json".to_vec(),
            },
            file_part(b"x"),
        ],
    )
    .assert_error(400, "INVALID_FILE_METADATA");
    upload(&sb, &[meta_field(json!({"path": ""})), file_part(b"x")])
        .assert_error(400, "INVALID_FILE_METADATA");
    upload(
        &sb,
        &[
            meta_field(json!({"path": "/home/user/u", "owner": "mallory"})),
            file_part(b"x"),
        ],
    )
    .assert_error(400, "INVALID_REQUEST_BODY");
    // Not multipart at all.
    reply(sb.execd("POST", "/files/upload").send_string("plain")).assert_error(400, "INVALID_FILE");
    // Onto a directory; into the read-only root.
    upload(
        &sb,
        &[meta_field(json!({"path": "/home/user"})), file_part(b"x")],
    )
    .assert_error(400, "INVALID_REQUEST_BODY");
    upload(
        &sb,
        &[meta_field(json!({"path": "/etc/evil"})), file_part(b"x")],
    )
    .assert_error(400, "INVALID_REQUEST_BODY");
    assert_eq!(sh(&sb, "ls -A /home/user | grep -c upload || true"), "0");
}

#[test]
fn download_ranges_conditionals_and_line_mode() {
    let server = TestServer::start();
    let sb = server.create(json!({}));
    sh(
        &sb,
        "printf '0123456789abcdefghij' > /home/user/d.txt; \
         printf 'l1\\nl2\\r\\nl3\\nl4\\n' > /home/user/lines.txt; \
         printf 'x' > /home/user/r\u{e9}sum\u{e9}.txt; mkdir /home/user/dir",
    );
    let full = get(&sb, "/files/download?path=/home/user/d.txt");
    assert_eq!(full.status, 200);
    assert_eq!(full.body, b"0123456789abcdefghij");
    assert_eq!(
        full.header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(
        full.header("content-disposition"),
        Some("attachment; filename=\"d.txt\"")
    );
    assert_eq!(full.header("content-length"), Some("20"));
    assert_eq!(full.header("accept-ranges"), Some("bytes"));
    let last_modified = full
        .header("last-modified")
        .expect("Last-Modified")
        .to_string();

    let ranged = |range: &str| {
        reply(
            sb.execd("GET", "/files/download?path=~/d.txt")
                .set("Range", range)
                .call(),
        )
    };
    let r = ranged("bytes=0-9");
    assert_eq!(r.status, 206);
    assert_eq!(r.body, b"0123456789");
    assert_eq!(r.header("content-range"), Some("bytes 0-9/20"));
    assert_eq!(r.header("content-length"), Some("10"));
    let r = ranged("bytes=-5");
    assert_eq!((r.status, r.text()), (206, "fghij".to_string()));
    assert_eq!(r.header("content-range"), Some("bytes 15-19/20"));
    let r = ranged("bytes=18-,0-1");
    assert_eq!((r.status, r.text()), (206, "ij".to_string()));
    let r = ranged("bytes=20-");
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */20"));
    let r = ranged("bytes=abc");
    assert_eq!(r.status, 416);
    assert_eq!(r.body, br#"{"code":"UNKNOWN"}"#);

    // Conditionals.
    let r = reply(
        sb.execd("GET", "/files/download?path=/home/user/d.txt")
            .set("If-Modified-Since", &last_modified)
            .call(),
    );
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    let r = reply(
        sb.execd("GET", "/files/download?path=/home/user/d.txt")
            .set("If-Modified-Since", "Mon, 01 Jan 2001 00:00:00 GMT")
            .call(),
    );
    assert_eq!(r.status, 200);
    let r = reply(
        sb.execd("GET", "/files/download?path=/home/user/d.txt")
            .set("Range", "bytes=0-1")
            .set("If-Range", &last_modified)
            .call(),
    );
    assert_eq!((r.status, r.text()), (206, "01".to_string()));
    let r = reply(
        sb.execd("GET", "/files/download?path=/home/user/d.txt")
            .set("Range", "bytes=0-1")
            .set("If-Range", "Mon, 01 Jan 2001 00:00:00 GMT")
            .call(),
    );
    assert_eq!((r.status, r.body.len()), (200, 20));

    // Non-ASCII names.
    let r = get(&sb, "/files/download?path=/home/user/r%C3%A9sum%C3%A9.txt");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-disposition"),
        Some(
            "attachment; filename=\"r%C3%A9sum%C3%A9.txt\"; filename*=UTF-8''r%C3%A9sum%C3%A9.txt"
        )
    );

    // Line mode.
    let r = get(
        &sb,
        "/files/download?path=/home/user/lines.txt&offset=2&limit=2",
    );
    assert_eq!((r.status, r.text()), (200, "l2\nl3".to_string()));
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    let r = get(&sb, "/files/download?path=/home/user/lines.txt&offset=3");
    assert_eq!(r.text(), "l3\nl4");
    let r = get(&sb, "/files/download?path=/home/user/lines.txt&offset=9");
    assert_eq!((r.status, r.text()), (200, String::new()));
    get(&sb, "/files/download?path=/home/user/lines.txt&offset=0")
        .assert_error(400, "INVALID_REQUEST_BODY");
    get(&sb, "/files/download?path=/home/user/lines.txt&limit=x")
        .assert_error(400, "INVALID_REQUEST_BODY");
    reply(
        sb.execd("GET", "/files/download?path=/home/user/lines.txt&limit=1")
            .set("Range", "bytes=0-1")
            .call(),
    )
    .assert_error(400, "INVALID_REQUEST_BODY");

    // Errors.
    get(&sb, "/files/download").assert_error(400, "MISSING_QUERY");
    get(&sb, "/files/download?path=/home/user/nope").assert_error(404, "FILE_NOT_FOUND");
    let msg =
        get(&sb, "/files/download?path=/home/user/dir").assert_error(400, "INVALID_REQUEST_BODY");
    assert!(msg.contains("path is a directory"), "{msg}");
}

#[test]
fn info_delete_permissions_move_replace_and_search() {
    let server = TestServer::start();
    let sb = server.create(json!({}));
    sh(
        &sb,
        "cd /home/user && mkdir -p t/sub s/sub/d out && echo hi > t/a.txt && echo x > t/p1 && \
         echo x > t/p2 && echo x > t/p3 && touch s/a.txt s/b.py s/sub/c.txt s/sub/d/e.txt \
         out/f.txt && ln -s /home/user/out s/link && ln -s /home/user/t/a.txt s/l.txt",
    );

    // info
    let r = get(
        &sb,
        "/files/info?path=/home/user/t/a.txt&path=~/t&path=s/link",
    );
    assert_eq!(r.status, 200);
    let v = r.json();
    let a = &v["/home/user/t/a.txt"];
    assert_eq!(a["path"], "/home/user/t/a.txt");
    assert_eq!(a["type"], "file");
    assert_eq!(a["size"], 3);
    assert_eq!(a["owner"], "user");
    assert_eq!(a["group"], "user");
    assert_eq!(a["mode"], 644);
    for key in ["modified_at", "created_at"] {
        let t = a[key].as_str().unwrap_or("");
        assert!(t.contains('T') && t.ends_with('Z'), "{key}: {t}");
    }
    assert_eq!(v["~/t"]["path"], "/home/user/t");
    assert_eq!(v["~/t"]["type"], "directory");
    assert_eq!(v["~/t"]["mode"], 755);
    assert_eq!(v["s/link"]["type"], "symlink");
    assert_eq!(get(&sb, "/files/info").json(), json!({}));
    get(
        &sb,
        "/files/info?path=/home/user/t/a.txt&path=/home/user/none",
    )
    .assert_error(404, "FILE_NOT_FOUND");

    // delete
    sh(&sb, "touch /home/user/t/del1 /home/user/t/del2");
    delete(
        &sb,
        "/files?path=/home/user/t/del1&path=/home/user/t/del2&path=/home/user/t/nope",
    )
    .assert_empty_ok();
    assert_eq!(sh(&sb, "ls /home/user/t | grep -c del || true"), "0");
    let msg = delete(&sb, "/files?path=/home/user/t/sub").assert_error(400, "INVALID_REQUEST_BODY");
    assert!(msg.contains("is a directory"), "{msg}");
    delete(&sb, "/files?path=/nonexistent/dir/file").assert_empty_ok();

    // permissions
    post_json(
        &sb,
        "/files/permissions",
        json!({
            "/home/user/t/p1": {"mode": 755},
            "/home/user/t/p2": {"mode": 644, "owner": null},
            "/home/user/t/p3": {"mode": 600, "owner": "nobody", "group": "nogroup"},
        }),
    )
    .assert_empty_ok();
    assert_eq!(
        sh(&sb, "cd /home/user/t && stat -c '%a %u %g' p1 p2 p3"),
        "755 1000 1000\n644 1000 1000\n600 65534 65534"
    );
    let v = get(&sb, "/files/info?path=/home/user/t/p3").json();
    assert_eq!(
        (
            &v["/home/user/t/p3"]["owner"],
            &v["/home/user/t/p3"]["group"]
        ),
        (&json!("nobody"), &json!("nogroup"))
    );
    post_json(
        &sb,
        "/files/permissions",
        json!({"/home/user/t/p1": {"owner": "mallory"}}),
    )
    .assert_error(400, "INVALID_REQUEST_BODY");
    post_json(
        &sb,
        "/files/permissions",
        json!({"/home/user/t/p1": {"mode": 789}}),
    )
    .assert_error(400, "INVALID_REQUEST_BODY");
    post_json(
        &sb,
        "/files/permissions",
        json!({"/home/user/t/none": {"mode": 644}}),
    )
    .assert_error(404, "FILE_NOT_FOUND");
    assert_eq!(sh(&sb, "stat -c %a /home/user/t/p1"), "755");

    // mv
    sh(&sb, "echo m > /home/user/t/m1 && echo n > /home/user/t/m2");
    post_json(
        &sb,
        "/files/mv",
        json!([{"src": "/home/user/t/m1", "dest": "/home/user/t/new/deep/m1"}]),
    )
    .assert_empty_ok();
    assert_eq!(
        sh(&sb, "cat /home/user/t/new/deep/m1; stat -c %u /home/user/t/new/deep; ls /home/user/t/m1 2>&1 | grep -c 'No such'"),
        "m\n1000\n1"
    );
    post_json(
        &sb,
        "/files/mv",
        json!([{"src": "/home/user/t/m2", "dest": "/home/user/t/new/deep/m1"}]),
    )
    .assert_error(409, "INVALID_REQUEST_BODY");
    post_json(
        &sb,
        "/files/mv",
        json!([{"src": "/home/user/t/gone", "dest": "/home/user/t/g2"}]),
    )
    .assert_error(404, "FILE_NOT_FOUND");
    // Across filesystems (/home/user and /tmp are separate tmpfs): copy, then delete.
    sh(
        &sb,
        "mkdir -p /home/user/xd/in && echo deep > /home/user/xd/in/f && chmod 700 /home/user/xd/in \
         && ln -s f /home/user/xd/in/l",
    );
    post_json(
        &sb,
        "/files/mv",
        json!([{"src": "/home/user/xd", "dest": "/tmp/moved/xd"}]),
    )
    .assert_empty_ok();
    assert_eq!(
        sh(&sb, "cat /tmp/moved/xd/in/f; readlink /tmp/moved/xd/in/l; stat -c '%a %u' /tmp/moved/xd/in; test -e /home/user/xd || echo gone"),
        "deep\nf\n700 1000\ngone"
    );

    // replace
    sh(&sb, "printf 'foo bar foo' > /home/user/t/r.txt && chmod 640 /home/user/t/r.txt && printf 'aaa' > /home/user/t/r2.txt");
    let r = post_json(
        &sb,
        "/files/replace?verbose=true",
        json!({"~/t/r.txt": {"old": "foo", "new": "baz"}, "/home/user/t/r2.txt": {"old": "x", "new": "y"}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"~/t/r.txt": {"replacedCount": 2}, "/home/user/t/r2.txt": {"replacedCount": 0}})
    );
    assert_eq!(
        sh(
            &sb,
            "cat /home/user/t/r.txt; echo; stat -c '%a %u %g' /home/user/t/r.txt"
        ),
        "baz bar baz\n640 1000 1000"
    );
    post_json(
        &sb,
        "/files/replace",
        json!({"/home/user/t/r.txt": {"old": "baz", "new": "q"}}),
    )
    .assert_empty_ok();
    assert_eq!(sh(&sb, "cat /home/user/t/r.txt"), "q bar q");
    let msg = post_json(
        &sb,
        "/files/replace",
        json!({"/home/user/t/r.txt": {"old": "", "new": "q"}}),
    )
    .assert_error(400, "INVALID_REQUEST_BODY");
    assert!(msg.contains("old content must not be empty"), "{msg}");
    post_json(
        &sb,
        "/files/replace",
        json!({"/home/user/t/none": {"old": "a", "new": "b"}}),
    )
    .assert_error(404, "FILE_NOT_FOUND");

    // search: base names only, symlinks never followed.
    let r = get(&sb, "/files/search?path=/home/user/s&pattern=*.txt");
    assert_eq!(r.status, 200);
    let paths: Vec<String> = r
        .json()
        .as_array()
        .expect("array")
        .iter()
        .map(|i| i["path"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        paths,
        [
            "/home/user/s/a.txt",
            "/home/user/s/l.txt",
            "/home/user/s/sub/c.txt",
            "/home/user/s/sub/d/e.txt"
        ]
    );
    assert_eq!(
        get(&sb, "/files/search?path=/home/user/s&pattern=sub/*.txt").json(),
        json!([])
    );
    let all = get(&sb, "/files/search?path=/home/user/s").json();
    assert_eq!(all.as_array().map(Vec::len), Some(6), "{all}");
    get(&sb, "/files/search?pattern=*").assert_error(400, "MISSING_QUERY");
    get(&sb, "/files/search?path=/home/user/none").assert_error(404, "FILE_NOT_FOUND");
    get(&sb, "/files/search?path=/home/user/s&pattern=%5B")
        .assert_error(400, "INVALID_REQUEST_BODY");
}

#[test]
fn directories_create_list_and_remove() {
    let server = TestServer::start();
    let sb = server.create(json!({}));
    post_json(
        &sb,
        "/directories",
        json!({"/home/user/d1/a/b": {"mode": 700}, "~/d2": {"mode": 755, "owner": "nobody"}, "/home/user/d3": null}),
    )
    .assert_empty_ok();
    assert_eq!(
        sh(
            &sb,
            "cd /home/user && stat -c '%n %a %u' d1 d1/a d1/a/b d2 d3"
        ),
        "d1 755 1000\nd1/a 755 1000\nd1/a/b 700 1000\nd2 755 65534\nd3 755 1000"
    );
    // An existing directory keeps its mode and owner.
    sh(&sb, "chmod 711 /home/user/d1");
    post_json(
        &sb,
        "/directories",
        json!({"/home/user/d1": {"mode": 700, "owner": "nobody"}}),
    )
    .assert_empty_ok();
    assert_eq!(sh(&sb, "stat -c '%a %u' /home/user/d1"), "711 1000");
    post_json(&sb, "/directories", json!({"/etc/nope": {"mode": 755}}))
        .assert_error(400, "INVALID_REQUEST_BODY");

    // list
    sh(
        &sb,
        "cd /home/user/d1 && touch z.txt a/f && mkdir a/b/c && touch a/b/c/g && ln -s /home/user a/link",
    );
    let list = |q: &str| -> Vec<String> {
        let r = get(&sb, &format!("/directories/list?{q}"));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
            .as_array()
            .expect("array")
            .iter()
            .map(|i| i["path"].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(
        list("path=/home/user/d1"),
        ["/home/user/d1/a", "/home/user/d1/z.txt"]
    );
    assert_eq!(
        list("path=~/d1&depth=2"),
        [
            "/home/user/d1/a",
            "/home/user/d1/a/b",
            "/home/user/d1/a/f",
            "/home/user/d1/a/link",
            "/home/user/d1/z.txt"
        ]
    );
    assert_eq!(
        list("path=/home/user/d1&depth=10"),
        [
            "/home/user/d1/a",
            "/home/user/d1/a/b",
            "/home/user/d1/a/b/c",
            "/home/user/d1/a/b/c/g",
            "/home/user/d1/a/f",
            "/home/user/d1/a/link",
            "/home/user/d1/z.txt"
        ]
    );
    assert!(list("path=/home/user/d1&depth=0").is_empty());
    let v = get(&sb, "/directories/list?path=/home/user/d1/a").json();
    assert_eq!(v[2]["type"], "symlink", "{v}");
    get(&sb, "/directories/list?path=/home/user/d1&depth=-1")
        .assert_error(400, "INVALID_REQUEST_BODY");
    get(&sb, "/directories/list?path=/home/user/d1&depth=x")
        .assert_error(400, "INVALID_REQUEST_BODY");
    let msg = get(&sb, "/directories/list?path=/home/user/d1/a/link")
        .assert_error(400, "INVALID_REQUEST_BODY");
    assert_eq!(msg, "path is a symbolic link, refusing to traverse");
    get(&sb, "/directories/list?path=/home/user/d1/z.txt")
        .assert_error(400, "INVALID_REQUEST_BODY");
    get(&sb, "/directories/list?path=/home/user/none").assert_error(404, "FILE_NOT_FOUND");
    get(&sb, "/directories/list").assert_error(400, "MISSING_QUERY");

    // remove: recursive, missing fine, a symlink removes only itself.
    delete(&sb, "/directories?path=/home/user/d1/a/link").assert_empty_ok();
    assert_eq!(sh(&sb, "ls /home/user | grep -c d1"), "1");
    delete(
        &sb,
        "/directories?path=/home/user/d1&path=/home/user/nope&path=~/d2",
    )
    .assert_empty_ok();
    assert_eq!(sh(&sb, "ls /home/user"), "d3");
}

#[test]
fn malformed_bodies_get_the_error_envelope() {
    let server = TestServer::start();
    let sb = server.create(json!({}));
    for path in [
        "/files/permissions",
        "/files/mv",
        "/files/replace",
        "/directories",
    ] {
        let msg = post(&sb, path, "{\"broken\"").assert_error(400, "INVALID_REQUEST_BODY");
        assert!(
            msg.starts_with("error parsing request, MAYBE invalid body format. "),
            "{path}: {msg}"
        );
    }
    post(&sb, "/files/mv", r#"[{"src":"/home/user/x"}]"#).assert_error(400, "INVALID_REQUEST_BODY");
    // `null` means absent; unknown fields are ignored.
    post(&sb, "/files/permissions", "null").assert_empty_ok();
    post(
        &sb,
        "/directories",
        r#"{"/home/user/n": {"mode": null, "extra": 1}}"#,
    )
    .assert_empty_ok();
    get(&sb, "/files/download?path=").assert_error(400, "MISSING_QUERY");
    get(&sb, "/files/info?path=$NOPE/x").assert_error(400, "INVALID_REQUEST_BODY");
}

/// Opens a raw HTTP connection to the sandbox's execd base and sends `head` + `body` of a
/// request whose Content-Length promises `promised` bytes, then closes without the rest.
fn send_cut_request(sb: &Sandbox, promised: usize, body: &[u8]) {
    let rest = sb.endpoint.strip_prefix("http://").expect("http endpoint");
    let (host, prefix) = rest.split_once('/').expect("endpoint with a path");
    let mut conn = std::net::TcpStream::connect(host).expect("connect");
    let head = format!(
        "POST /{prefix}/files/upload HTTP/1.1\r\nHost: {host}\r\nX-EXECD-ACCESS-TOKEN: {}\r\n\
         Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {promised}\r\n\r\n",
        sb.token
    );
    conn.write_all(head.as_bytes()).expect("head");
    conn.write_all(body).expect("body");
    conn.flush().expect("flush");
    std::thread::sleep(Duration::from_millis(500));
    drop(conn);
}

#[test]
fn cut_uploads_leave_no_file_behind() {
    let server = TestServer::start();
    let sb = server.create(json!({}));
    sh(
        &sb,
        "mkdir /home/user/cut && echo old > /home/user/cut/existing",
    );
    let meta = meta_file(json!({"path": "/home/user/cut/new.bin"}));
    let mut partial = part_head(&meta);
    partial.extend(&meta.data);
    partial.extend(b"\r\n");
    partial.extend(part_head(&file_part(b"")));
    partial.extend(vec![7u8; 3 << 20]);

    // The connection closes mid-body.
    send_cut_request(&sb, partial.len() + (10 << 20), &partial);
    assert!(
        eventually(|| sh(&sb, "ls -A /home/user/cut") == "existing"),
        "left behind: {}",
        sh(&sb, "ls -A /home/user/cut")
    );

    // The body is complete but the multipart stream is cut (no closing boundary).
    let r = reply(
        sb.execd("POST", "/files/upload")
            .set(
                "Content-Type",
                &format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .send_bytes(&partial),
    );
    r.assert_error(400, "INVALID_FILE");
    assert_eq!(sh(&sb, "ls -A /home/user/cut"), "existing");

    // An overwrite that is cut leaves the old content in place.
    let meta = meta_file(json!({"path": "/home/user/cut/existing"}));
    let mut partial = part_head(&meta);
    partial.extend(&meta.data);
    partial.extend(b"\r\n");
    partial.extend(part_head(&file_part(b"")));
    partial.extend(vec![9u8; 2 << 20]);
    send_cut_request(&sb, partial.len() + (10 << 20), &partial);
    assert!(eventually(|| sh(&sb, "ls -A /home/user/cut") == "existing"));
    assert_eq!(sh(&sb, "cat /home/user/cut/existing"), "old");
}

/// Every file under `dir` on the host whose name contains `needle`.
fn host_files_named(dir: &std::path::Path, needle: &str, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.contains(needle) {
            out.push(e.path().display().to_string());
        }
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            host_files_named(&e.path(), needle, out);
        }
    }
}

#[test]
fn symlinks_into_proc_are_refused() {
    let server = TestServer::start();
    let sb = server.create(json!({}));
    sh(
        &sb,
        "ln -s /proc/1/fd /home/user/fds && ln -s /proc/self/root/etc /home/user/e && \
         ln -s /proc /home/user/p && ln -s ../../proc/1/cwd /home/user/rel",
    );
    let bad = |r: Reply, what: &str| {
        assert!(
            (400..500).contains(&r.status),
            "{what}: {} {}",
            r.status,
            r.text()
        );
    };
    // Reads.
    for n in 0..8 {
        bad(
            get(&sb, &format!("/files/download?path=/home/user/fds/{n}")),
            "download fd",
        );
        bad(
            get(&sb, &format!("/files/info?path=/home/user/fds/{n}")),
            "info fd",
        );
        bad(
            get(&sb, &format!("/directories/list?path=/home/user/fds/{n}")),
            "list fd",
        );
    }
    let msg = get(&sb, "/files/download?path=/home/user/e/passwd")
        .assert_error(400, "INVALID_REQUEST_BODY");
    assert!(
        msg.contains("/home/user/e/passwd") && msg.contains("/proc"),
        "{msg}"
    );
    bad(
        get(&sb, "/files/download?path=/home/user/rel/x"),
        "relative link",
    );
    bad(
        get(&sb, "/files/download?path=/proc/1/environ"),
        "proc direct",
    );
    bad(get(&sb, "/files/info?path=/proc"), "info proc");
    bad(
        get(&sb, "/directories/list?path=/home/user/p/1"),
        "list proc",
    );
    bad(
        get(&sb, "/files/search?path=/home/user/p/1/fd"),
        "search proc",
    );
    bad(
        get(&sb, "/directories/list?path=/home/user/fds"),
        "list link",
    );
    // Writes.
    sh(&sb, "touch /home/user/victim");
    for target in [
        "/home/user/fds/5/evil-x",
        "/home/user/fds/evil-y",
        "/home/user/e/evil-z",
    ] {
        bad(
            upload(
                &sb,
                &[meta_field(json!({"path": target})), file_part(b"pwned")],
            ),
            "upload",
        );
        bad(
            post_json(&sb, "/directories", json!({ target: {"mode": 755} })),
            "mkdir",
        );
        bad(
            post_json(
                &sb,
                "/files/mv",
                json!([{"src": "/home/user/victim", "dest": target}]),
            ),
            "mv dest",
        );
    }
    for n in 0..8 {
        let p = format!("/home/user/fds/{n}");
        bad(
            post_json(&sb, "/files/permissions", json!({ &p: {"mode": 777} })),
            "chmod",
        );
        bad(
            post_json(
                &sb,
                "/files/mv",
                json!([{"src": &p, "dest": "/home/user/stolen"}]),
            ),
            "mv src",
        );
        bad(
            post_json(
                &sb,
                "/files/replace",
                json!({ &p: {"old": "a", "new": "b"}}),
            ),
            "replace",
        );
        bad(delete(&sb, &format!("/files?path={p}")), "delete file");
        bad(delete(&sb, &format!("/directories?path={p}")), "delete dir");
    }
    bad(
        post_json(
            &sb,
            "/files/replace",
            json!({"/home/user/e/hostname": {"old": "a", "new": "b"}}),
        ),
        "replace etc",
    );
    // Deleting the link itself is fine and leaves the target alone.
    delete(&sb, "/files?path=/home/user/fds").assert_empty_ok();
    assert_eq!(
        sh(
            &sb,
            "test -e /home/user/fds || echo gone; ls /proc/1/fd >/dev/null 2>&1; echo ok"
        ),
        "gone\nok"
    );

    // A race: user code keeps swapping a directory for a link to the agent's descriptors
    // (5… are cgroup directories on the host) while the API writes into it.
    // Swaps atomically (renameat2 RENAME_EXCHANGE) so the window between any check and use
    // is hit often.
    let swapper = r#"import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
os.makedirs('/home/user/race', exist_ok=True)
os.symlink('/proc/1/fd/5', '/home/user/alt')
end = time.time() + 8
while time.time() < end:
    for _ in range(1000):
        libc.renameat2(-100, b'/home/user/race', -100, b'/home/user/alt', 2)
"#;
    sh(
        &sb,
        &format!("cat > /home/user/swap.py <<'EOF'\n{swapper}EOF"),
    );
    sb.run_with(json!({"command": "python3 /home/user/swap.py", "background": true}));
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..150 {
        let target = format!("/home/user/race/evil-{i}");
        let _ = upload(
            &sb,
            &[meta_field(json!({"path": &target})), file_part(b"x")],
        );
        let _ = post_json(&sb, "/directories", json!({ &target: {"mode": 777} }));
        let _ = post_json(
            &sb,
            "/files/permissions",
            json!({"/home/user/race": {"mode": 777}}),
        );
        let _ = get(&sb, "/directories/list?path=/home/user/race");
    }

    // Nothing outside the sandbox changed, and the agent still serves.
    let mut found = Vec::new();
    host_files_named(&server.state_dir, "evil", &mut found);
    for ctrl in ["pids", "memory", "cpu", "unified", ""] {
        host_files_named(&cgroup_dir(ctrl, &sb.id), "evil", &mut found);
    }
    assert!(found.is_empty(), "{found:?}");
    assert_eq!(get(&sb, "/ping").status, 200);
    assert_eq!(get(&sb, "/files/download?path=/etc/passwd").status, 200);
}

/// Throughput of a 1 GiB upload and download through the server (run with `--release
/// -- --ignored --nocapture`).
#[test]
#[ignore]
fn one_gib_upload_and_download_throughput() {
    const SIZE: usize = 1 << 30;
    let server = TestServer::start();
    let sb = server.create(json!({
        "resourceLimits": {"cpu": "2", "memory": "3Gi", "disk": "2Gi"}
    }));
    let meta = meta_file(json!({"path": "/home/user/big.bin"}));
    let mut head = part_head(&meta);
    head.extend(&meta.data);
    head.extend(b"\r\n");
    head.extend(part_head(&file_part(b"")));
    let tail = format!("\r\n--{BOUNDARY}--\r\n").into_bytes();
    // A reader producing the body on the fly, so the test itself holds no gigabyte.
    let body = std::io::Cursor::new(head)
        .chain(std::io::repeat(0x5a).take(SIZE as u64))
        .chain(std::io::Cursor::new(tail));
    let started = Instant::now();
    let r = reply(
        sb.execd("POST", "/files/upload")
            .set(
                "Content-Type",
                &format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .send(body),
    );
    let up = started.elapsed();
    r.assert_empty_ok();
    assert_eq!(sh(&sb, "stat -c %s /home/user/big.bin"), SIZE.to_string());

    let started = Instant::now();
    let resp = sb
        .execd("GET", "/files/download?path=/home/user/big.bin")
        .call()
        .expect("download");
    let mut reader = resp.into_reader();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0usize;
    loop {
        let n = reader.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        total += n;
    }
    let down = started.elapsed();
    assert_eq!(total, SIZE);
    let mbps = |d: Duration| SIZE as f64 / 1e6 / d.as_secs_f64();
    println!(
        "1 GiB upload: {:.2?} ({:.0} MB/s); download: {:.2?} ({:.0} MB/s)",
        up,
        mbps(up),
        down,
        mbps(down)
    );
}
