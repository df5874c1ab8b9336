//! The image store against a real registry (Debian's `docker-registry`), with images built by
//! `umoci` from a root made here (a static busybox, links, data files) and pushed by `skopeo`.
//! No mocks.
//!
//! One registry serves every test of this file; each test has its own store. The tools are
//! installed by `scripts/test-deps.sh` (run here when they are missing); the tests are skipped
//! only when they are absent and cannot be installed, and never under CI.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use execbox_image::{Credentials, Image, ImageError, ImageStore, Platform, PullEvent, StoreConfig};
use sha2::{Digest, Sha256};

/// The registry and the images pushed to it.
struct Env {
    /// `127.0.0.1:<port>`.
    registry: String,
    dir: PathBuf,
    /// The umoci layout (tags `base` and `v2`).
    layout: PathBuf,
    /// The same `v2` image as an OCI archive.
    archive: PathBuf,
    /// Where the unsafe layer tries to write.
    outside: PathBuf,
    /// `127.0.0.1:<port>` of a registry that wants HTTP basic credentials ([`user`]).
    auth_registry: String,
    /// Keep the registries' wrappers alive: when this process ends, their stdin closes and
    /// they stop the registries and remove `dir`.
    _registries: Mutex<Vec<Child>>,
}

/// The account of the registry with credentials. The hash is bcrypt (cost 4) of the password:
/// written here so the tests need no tool to make it.
const USER: &str = "alice";
const PASSWORD: &str = "s3cret";
const HTPASSWD: &str = "alice:$2b$04$RM4St2Sh9QdubUmXCOMm8ODVSPf9FQmNnokoaziPdbRBhOI7E.uVi";

fn user() -> Credentials {
    Credentials {
        username: USER.into(),
        password: PASSWORD.into(),
    }
}

static ENV: OnceLock<Option<Env>> = OnceLock::new();

fn env() -> Option<&'static Env> {
    ENV.get_or_init(|| {
        if !tools_present() {
            return None;
        }
        Some(setup())
    })
    .as_ref()
}

/// Skips the calling test when the tools are absent and cannot be installed.
macro_rules! env_or_skip {
    () => {
        match env() {
            Some(e) => e,
            None => {
                eprintln!("SKIPPED: docker-registry, skopeo, umoci or busybox-static missing and not installable");
                return;
            }
        }
    };
}

fn have_tools() -> bool {
    let static_busybox = Command::new("dpkg")
        .args(["-s", "busybox-static"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    Path::new("/usr/bin/docker-registry").exists()
        && which("skopeo")
        && which("umoci")
        && static_busybox
        && Path::new("/bin/busybox").exists()
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn tools_present() -> bool {
    if have_tools() {
        return true;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/test-deps.sh");
    eprintln!("image tools missing: running {}", script.display());
    let _ = Command::new("bash").arg(&script).status();
    if have_tools() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "docker-registry, skopeo, umoci and busybox-static are needed (scripts/test-deps.sh could not install them)"
    );
    false
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn setup() -> Env {
    let dir = std::env::temp_dir().join(format!("execbox-image-registry-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (registry, child) = start_registry(&dir, "registry", false);
    let (auth_registry, auth_child) = start_registry(&dir, "auth-registry", true);

    // The images: `base` (busybox, links, data) and `v2` (base + a layer that deletes a file
    // and adds one).
    let layout = dir.join("layout");
    let oci = |tag: &str| format!("{}:{tag}", layout.display());
    let rootless: &[&str] = if is_root() { &[] } else { &["--rootless"] };
    run(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout));
    run(Command::new("umoci").args(["new", "--image", &oci("base")]));
    let b1 = dir.join("bundle1");
    run(Command::new("umoci")
        .arg("unpack")
        .args(rootless)
        .args(["--image", &oci("base")])
        .arg(&b1));
    let rootfs = b1.join("rootfs");
    for d in ["bin", "data", "etc"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    for l in ["sh", "ls", "cat"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(l)).unwrap();
    }
    std::fs::write(rootfs.join("data/hello.txt"), "hello from the image\n").unwrap();
    std::fs::write(rootfs.join("etc/gone.txt"), "deleted by the next layer\n").unwrap();
    run(Command::new("umoci")
        .arg("repack")
        .args(["--image", &oci("base")])
        .arg(&b1));
    run(Command::new("umoci").args([
        "config",
        "--image",
        &oci("base"),
        "--config.env",
        "FOO=bar",
        "--config.workingdir",
        "/data",
        "--config.cmd",
        "/bin/sh",
        "--config.cmd",
        "-c",
        "--config.cmd",
        "cat hello.txt",
    ]));
    let b2 = dir.join("bundle2");
    run(Command::new("umoci")
        .arg("unpack")
        .args(rootless)
        .args(["--image", &oci("base")])
        .arg(&b2));
    std::fs::remove_file(b2.join("rootfs/etc/gone.txt")).unwrap();
    std::fs::write(b2.join("rootfs/data/new.txt"), "added by layer 2\n").unwrap();
    run(Command::new("umoci")
        .arg("repack")
        .args(["--image", &oci("v2")])
        .arg(&b2));
    let push = |from: &str, to: &str| {
        run(Command::new("skopeo").args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            from,
            &format!("docker://{registry}/{to}"),
        ]))
    };
    push(&format!("oci:{}", oci("base")), "test/base:1");
    for (tag, to) in [("base", "private/base:1"), ("v2", "private/app:1")] {
        run(Command::new("skopeo").args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--dest-creds",
            &format!("{USER}:{PASSWORD}"),
            &format!("oci:{}", oci(tag)),
            &format!("docker://{auth_registry}/{to}"),
        ]));
    }
    push(&format!("oci:{}", oci("v2")), "test/app:1");
    let archive = dir.join("app.tar");
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &format!("oci:{}", oci("v2")),
        &format!("oci-archive:{}", archive.display()),
    ]));

    // Crafted images, through hand-written OCI layouts: an unsafe layer (a symlink to a host
    // directory, then a file beneath it) and one whose content does not match its diff_id.
    let outside = dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let unsafe_tar = Tar::new()
        .dir("ok", 0o755)
        .file("ok/file", "fine")
        .symlink("evil", outside.to_str().unwrap())
        .file("evil/pwned", "escaped")
        .bytes();
    let unsafe_layout = dir.join("unsafe-layout");
    write_layout(&unsafe_layout, &[unsafe_tar], false);
    push(
        &format!("oci:{}:1", unsafe_layout.display()),
        "test/unsafe:1",
    );
    // A big valid layer beside an unsafe one: the failure must stop the other unpack too.
    let mut noise = vec![0u8; 16 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let big = Tar::new()
        .add(tar::EntryType::Regular, "big", "", 0o644, &noise)
        .bytes();
    let unsafe_small = Tar::new()
        .symlink("up", "../../..")
        .file("up/pwned", "x")
        .bytes();
    let mixed_layout = dir.join("mixed-layout");
    write_layout(&mixed_layout, &[big, unsafe_small], false);
    push(&format!("oci:{}:1", mixed_layout.display()), "test/mixed:1");
    let corrupt_layout = dir.join("corrupt-layout");
    write_layout(&corrupt_layout, &[Tar::new().file("a", "b").bytes()], true);
    push(
        &format!("oci:{}:1", corrupt_layout.display()),
        "test/corrupt:1",
    );

    Env {
        registry,
        dir,
        layout,
        archive,
        outside,
        auth_registry,
        _registries: Mutex::new(vec![child, auth_child]),
    }
}

/// Starts a registry on a free loopback port, storing under `dir/<name>`; with `auth`, it
/// wants [`USER`]'s credentials. The wrapper stops it and removes `dir` when this process's end
/// of its stdin closes.
fn start_registry(dir: &Path, name: &str, auth: bool) -> (String, Child) {
    let home = dir.join(name);
    std::fs::create_dir_all(&home).unwrap();
    let registry = format!("127.0.0.1:{}", free_port());
    let mut config = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {registry}\n",
        home.join("storage").display()
    );
    if auth {
        std::fs::write(home.join("htpasswd"), format!("{HTPASSWD}\n")).unwrap();
        config.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: execbox-test\n    path: {}\n",
            home.join("htpasswd").display()
        ));
    }
    let config_path = home.join("registry.yml");
    std::fs::write(&config_path, config).unwrap();
    let child = Command::new("sh")
        .args([
            "-c",
            r#"/usr/bin/docker-registry serve "$0" >"$1/registry.log" 2>&1 & pid=$!; read _; kill $pid; wait $pid; rm -rf "$2""#,
        ])
        .arg(&config_path)
        .arg(&home)
        .arg(dir)
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_registry(&registry, &home);
    (registry, child)
}

fn wait_for_registry(registry: &str, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect(registry) {
            let _ =
                s.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: {registry}\r\n\r\n").as_bytes());
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            // 401: a registry that wants credentials is up too.
            let status = answer.split(' ').nth(1).unwrap_or("");
            if answer.starts_with("HTTP/1.") && (status == "200" || status == "401") {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default();
    panic!("docker-registry did not start on {registry}:\n{log}");
}

/// A tar written header by header (the tar crate's builder refuses hostile names).
struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    fn new() -> Tar {
        Tar(tar::Builder::new(Vec::new()))
    }
    fn add(mut self, kind: tar::EntryType, name: &str, link: &str, mode: u32, data: &[u8]) -> Tar {
        let mut h = tar::Header::new_gnu();
        {
            let old = h.as_old_mut();
            old.name[..name.len()].copy_from_slice(name.as_bytes());
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }
    fn file(self, name: &str, data: &str) -> Tar {
        self.add(tar::EntryType::Regular, name, "", 0o644, data.as_bytes())
    }
    fn dir(self, name: &str, mode: u32) -> Tar {
        self.add(tar::EntryType::Directory, name, "", mode, b"")
    }
    fn symlink(self, name: &str, target: &str) -> Tar {
        self.add(tar::EntryType::Symlink, name, target, 0o777, b"")
    }
    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// Writes an OCI layout holding one image (tag `1`) of `layers` (tars, bottom first, stored
/// gzipped). With `wrong_diff`, the configuration names another uncompressed digest for the
/// last layer.
fn write_layout(dir: &Path, layers: &[Vec<u8>], wrong_diff: bool) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> (String, usize) {
        let d = sha256(bytes);
        std::fs::write(blobs.join(&d[7..]), bytes).unwrap();
        (d, bytes.len())
    };
    let mut descs = Vec::new();
    let mut diffs = Vec::new();
    for (i, tar) in layers.iter().enumerate() {
        // Stored, not compressed: fast in debug builds.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
        gz.write_all(tar).unwrap();
        let (d, size) = put(&gz.finish().unwrap());
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": size,
        }));
        diffs.push(if wrong_diff && i == layers.len() - 1 {
            sha256(b"something else")
        } else {
            sha256(tar)
        });
    }
    let config = serde_json::json!({
        "architecture": Platform::host().architecture, "os": "linux",
        "config": {"Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diffs},
    });
    let (cd, cs) = put(&serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": descs,
    });
    let (md, ms) = put(&serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
            "annotations": {"org.opencontainers.image.ref.name": "1"}}],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// A fresh store of its own for one test.
fn store(tag: &str) -> (ImageStore, PathBuf) {
    static N: AtomicU64 = AtomicU64::new(0);
    let e = env().unwrap();
    let root = e
        .dir
        .join(format!("store-{tag}-{}", N.fetch_add(1, Ordering::Relaxed)))
        .join("images");
    (
        ImageStore::open(&root, StoreConfig::default()).unwrap(),
        root,
    )
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Nothing of an operation is left in `tmp/`, and `layers/` holds only whole layers (named by
/// digest, not a temporary name).
fn assert_no_leftovers(root: &Path) {
    assert_eq!(
        names(&root.join("tmp")),
        Vec::<String>::new(),
        "tmp/ not empty"
    );
    for l in names(&root.join("layers")) {
        assert!(
            l.len() == 64 && l.bytes().all(|b| b.is_ascii_hexdigit()),
            "stray layers/{l}"
        );
    }
}

fn app(e: &Env) -> String {
    format!("{}/test/app:1", e.registry)
}

fn base(e: &Env) -> String {
    format!("{}/test/base:1", e.registry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_by_name_gives_files_config_and_whiteouts() {
    let e = env_or_skip!();
    let (s, root) = store("resolve");
    let img = s.resolve(&app(e), None).await.unwrap();
    assert_eq!(img.reference, app(e));
    assert!(img.id.starts_with("sha256:") && img.manifest_digest.starts_with("sha256:"));
    assert_eq!(img.layers.len(), 2);
    let (bottom, top) = (&img.layers[0], &img.layers[1]);
    assert!(bottom.starts_with(root.join("layers")));
    // Files of the base layer.
    let bb = std::fs::metadata(bottom.join("bin/busybox")).unwrap();
    assert!(bb.is_file() && bb.permissions().mode() & 0o111 != 0);
    assert_eq!(bb.len(), std::fs::metadata("/bin/busybox").unwrap().len());
    assert_eq!(
        std::fs::read_link(bottom.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(
        std::fs::read_to_string(bottom.join("data/hello.txt")).unwrap(),
        "hello from the image\n"
    );
    assert!(bottom.join("etc/gone.txt").is_file());
    // The top layer: the deleted file is an overlay whiteout, the new file is there.
    let wh = std::fs::symlink_metadata(top.join("etc/gone.txt")).unwrap();
    assert!(wh.file_type().is_char_device(), "{wh:?}");
    assert_eq!(wh.rdev(), 0);
    assert!(std::fs::symlink_metadata(top.join("etc/.wh.gone.txt")).is_err());
    assert_eq!(
        std::fs::read_to_string(top.join("data/new.txt")).unwrap(),
        "added by layer 2\n"
    );
    // The configuration.
    assert!(
        img.config.env.iter().any(|v| v == "FOO=bar"),
        "{:?}",
        img.config.env
    );
    assert_eq!(img.config.working_dir.as_deref(), Some("/data"));
    assert_eq!(img.config.cmd, vec!["/bin/sh", "-c", "cat hello.txt"]);
    assert!(img.config.entrypoint.is_empty());
    // Short forms of the same name, the listing, get().
    assert_eq!(s.get(&app(e)).unwrap().id, img.id);
    let list = s.list();
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].reference.as_str(), list[0].layers),
        (app(e).as_str(), 2)
    );
    assert!(s.get(&base(e)).is_none());
    assert_no_leftovers(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_sharing_a_base_layer_share_its_directory() {
    let e = env_or_skip!();
    let (s, root) = store("shared");
    let b = s.resolve(&base(e), None).await.unwrap();
    let before = s.stats();
    let a = s.resolve(&app(e), None).await.unwrap();
    assert_eq!(b.layers.len(), 1);
    assert_eq!(a.layers[0], b.layers[0]);
    // Only the top layer was downloaded for the second image.
    let after = s.stats();
    assert_eq!(after.layers_unpacked - before.layers_unpacked, 1);
    assert_eq!(
        after.blob_downloads - before.blob_downloads,
        2,
        "config + one layer"
    );
    assert_eq!(names(&root.join("layers")).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_resolves_download_each_blob_once() {
    let e = env_or_skip!();
    let (s, root) = store("concurrent");
    let s = Arc::new(s);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (s, r) = (s.clone(), app(e));
        tasks.push(tokio::spawn(async move { s.resolve(&r, None).await }));
    }
    let mut ids = HashSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap().unwrap().id.clone());
    }
    assert_eq!(ids.len(), 1);
    let st = s.stats();
    assert_eq!(st.manifest_fetches, 1, "{st:?}");
    assert_eq!(st.blob_downloads, 3, "config + two layers: {st:?}");
    assert_eq!(st.layers_unpacked, 2, "{st:?}");

    // Two images that share their base, pulled at once: the base is downloaded once.
    let (s2, root2) = store("concurrent-shared");
    let (ra, rb) = (app(e), base(e));
    let (a, b) = tokio::join!(s2.resolve(&ra, None), s2.resolve(&rb, None));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.layers[0], b.layers[0]);
    let st = s2.stats();
    assert_eq!(
        st.blob_downloads, 4,
        "two configs + two distinct layers: {st:?}"
    );
    assert_eq!(st.layers_unpacked, 2, "{st:?}");
    assert_no_leftovers(&root);
    assert_no_leftovers(&root2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_path_is_cheap_and_pull_checks_the_registry_again() {
    let e = env_or_skip!();
    let (s, _root) = store("fast");
    let first = s.resolve(&app(e), None).await.unwrap();
    let before = s.stats();
    let n = 2000;
    let started = Instant::now();
    for _ in 0..n {
        let again = s.resolve(&app(e), None).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again));
    }
    let each = started.elapsed() / n;
    assert!(
        each < Duration::from_micros(200),
        "resolve of a stored image took {each:?}"
    );
    eprintln!("resolve of a stored image: {each:?}");
    assert_eq!(s.stats(), before, "no network on the fast path");

    let events = Mutex::new(Vec::new());
    let pulled = s
        .pull(&app(e), None, &|ev: &PullEvent| {
            events.lock().unwrap().push(ev.clone())
        })
        .await
        .unwrap();
    assert_eq!(pulled.id, first.id);
    let after = s.stats();
    assert_eq!(after.manifest_fetches, before.manifest_fetches + 1);
    assert_eq!(
        after.layers_unpacked, before.layers_unpacked,
        "layers not downloaded again"
    );
    let events = events.into_inner().unwrap();
    assert!(
        matches!(events.first(), Some(PullEvent::Resolving { .. })),
        "{events:?}"
    );
    assert!(events
        .iter()
        .any(|e| matches!(e, PullEvent::Resolved { layers: 2, .. })));
    let cached = events
        .iter()
        .filter(|e| matches!(e, PullEvent::LayerDone { cached: true, .. }))
        .count();
    assert_eq!(cached, 2, "{events:?}");
    assert!(
        matches!(events.last(), Some(PullEvent::Done { .. })),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_reports_progress_for_new_layers() {
    let e = env_or_skip!();
    let (s, _root) = store("progress");
    let events = Mutex::new(Vec::new());
    s.pull(&base(e), None, &|ev: &PullEvent| {
        events.lock().unwrap().push(ev.clone())
    })
    .await
    .unwrap();
    let events = events.into_inner().unwrap();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| match e {
            PullEvent::Resolving { .. } => "resolving",
            PullEvent::Resolved { .. } => "resolved",
            PullEvent::LayerStarted { .. } => "started",
            PullEvent::LayerProgress { .. } => "progress",
            PullEvent::LayerUnpacking { .. } => "unpacking",
            PullEvent::LayerDone { .. } => "done",
            PullEvent::Done { .. } => "stored",
            _ => "other",
        })
        .collect();
    let mut dedup = kinds.clone();
    dedup.dedup();
    assert_eq!(
        dedup,
        [
            "resolving",
            "resolved",
            "started",
            "progress",
            "unpacking",
            "done",
            "stored"
        ]
    );
    let last_progress = events.iter().rev().find_map(|e| match e {
        PullEvent::LayerProgress { received, size, .. } => Some((*received, *size)),
        _ => None,
    });
    let (received, size) = last_progress.unwrap();
    assert_eq!(received, size);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_references_are_refused() {
    let e = env_or_skip!();
    let (s, root) = store("bad");
    for bad in [
        "",
        "Upper",
        "a b",
        "x:",
        &format!("{}/UPPER/x:1", e.registry),
    ] {
        let err = s.resolve(bad, None).await.unwrap_err();
        assert!(
            matches!(err, ImageError::BadReference { .. }),
            "{bad:?}: {err}"
        );
    }
    assert!(s.get("").is_none());
    assert_no_leftovers(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_registry_is_named() {
    let _e = env_or_skip!();
    let (s, root) = store("unreachable");
    let port = free_port();
    let err = s
        .resolve(&format!("127.0.0.1:{port}/x/y:1"), None)
        .await
        .unwrap_err();
    match &err {
        ImageError::Unreachable { registry, why } => {
            assert_eq!(registry, &format!("127.0.0.1:{port}"));
            assert!(!why.is_empty());
        }
        other => panic!("expected Unreachable, got {other}"),
    }
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    assert_no_leftovers(&root);
    assert!(names(&root.join("layers")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_images_are_not_found() {
    let e = env_or_skip!();
    let (s, root) = store("notfound");
    for r in [
        format!("{}/test/nope:1", e.registry),
        format!("{}/test/app:nope", e.registry),
    ] {
        let err = s.resolve(&r, None).await.unwrap_err();
        assert!(matches!(err, ImageError::NotFound { .. }), "{r}: {err}");
    }
    assert_no_leftovers(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsafe_layer_fails_the_pull_and_leaves_nothing() {
    let e = env_or_skip!();
    let (s, root) = store("unsafe");
    // A layer of another image stays: only what this pull added goes.
    s.resolve(&base(e), None).await.unwrap();
    let layers_before = names(&root.join("layers"));
    let err = s
        .resolve(&format!("{}/test/unsafe:1", e.registry), None)
        .await
        .unwrap_err();
    match &err {
        ImageError::UnsafeLayer { digest, why } => {
            assert!(digest.starts_with("sha256:"));
            assert!(why.contains("evil/pwned"), "{why}");
        }
        other => panic!("expected UnsafeLayer, got {other}"),
    }
    assert!(
        !e.outside.join("pwned").exists(),
        "the layer wrote outside its directory"
    );
    assert_no_leftovers(&root);
    assert_eq!(names(&root.join("layers")), layers_before);
    assert_eq!(s.list().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_that_does_not_match_its_diff_id_is_corrupt() {
    let e = env_or_skip!();
    let (s, root) = store("corrupt");
    let err = s
        .resolve(&format!("{}/test/corrupt:1", e.registry), None)
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::Corrupt { .. }), "{err}");
    assert_no_leftovers(&root);
    assert!(names(&root.join("layers")).is_empty());
    assert!(s.list().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_refuses_images_in_use_and_gc_removes_their_layers() {
    let e = env_or_skip!();
    let (s, root) = store("gc");
    let b = s.resolve(&base(e), None).await.unwrap();
    let a = s.resolve(&app(e), None).await.unwrap();
    // Nothing unreferenced yet.
    assert_eq!(s.gc(&HashSet::new()).unwrap().layers_removed, 0);
    let in_use: HashSet<String> = [a.id.clone()].into();
    assert!(matches!(
        s.remove(&app(e), &in_use),
        Err(ImageError::InUse { .. })
    ));
    s.remove(&app(e), &HashSet::new()).unwrap();
    assert!(s.get(&app(e)).is_none());
    assert!(matches!(
        s.remove(&app(e), &HashSet::new()),
        Err(ImageError::NotFound { .. })
    ));
    // A live sandbox still using the removed image keeps its layers and configuration (its
    // manifest is not needed to run it).
    let kept = s.gc(&in_use).unwrap();
    assert_eq!(
        (kept.layers_removed, kept.blobs_removed),
        (0, 1),
        "{kept:?}"
    );
    let report = s.gc(&HashSet::new()).unwrap();
    assert_eq!(report.layers_removed, 1, "{report:?}");
    assert_eq!(report.blobs_removed, 1, "the configuration: {report:?}");
    assert!(report.bytes_freed > 0);
    assert!(!a.layers[1].exists());
    // The base layer is still the other image's.
    assert!(b.layers[0].join("bin/busybox").exists());
    assert_eq!(s.resolve(&base(e), None).await.unwrap().id, b.id);
    s.remove(&base(e), &HashSet::new()).unwrap();
    let report = s.gc(&HashSet::new()).unwrap();
    assert_eq!(report.layers_removed, 1, "{report:?}");
    assert!(names(&root.join("layers")).is_empty());
    assert!(names(&root.join("blobs/sha256")).is_empty());
    assert!(s.list().is_empty());
    assert_no_leftovers(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_of_another_store_on_the_same_root_spares_a_running_pull() {
    let e = env_or_skip!();
    let (s, root) = store("two-stores");
    // A second store on the same root stands for another process (the CLI): its locks are its
    // own.
    let other = Arc::new(ImageStore::open(&root, StoreConfig::default()).unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let collector = {
        let (other, stop) = (other.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(Ordering::Relaxed) {
                other.gc(&HashSet::new()).unwrap();
                runs += 1;
            }
            runs
        })
    };
    for _ in 0..3 {
        let a = s.resolve(&app(e), None).await.unwrap();
        for l in &a.layers {
            assert!(l.is_dir(), "{} removed under a pull", l.display());
        }
        s.remove(&app(e), &HashSet::new()).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let runs = collector.join().unwrap();
    assert!(runs > 0);
    assert_no_leftovers(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_pull_leaves_nothing_behind() {
    let e = env_or_skip!();
    for delay_ms in [0u64, 2, 10, 40] {
        let (s, root) = store("abandoned");
        let r = app(e);
        let _ = tokio::time::timeout(Duration::from_millis(delay_ms), s.resolve(&r, None)).await;
        // An unpack on a blocking thread notices at its next entry.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !names(&root.join("tmp")).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_no_leftovers(&root);
        // Whatever it stored is either a whole image or collected.
        if s.get(&r).is_none() {
            s.gc(&HashSet::new()).unwrap();
            assert!(
                names(&root.join("layers")).is_empty(),
                "after {delay_ms} ms"
            );
        }
        // And the next resolve works.
        s.resolve(&r, None).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_crashed_process_left_is_removed_at_open() {
    let _e = env_or_skip!();
    let (s, root) = store("crash");
    drop(s);
    // A dead operation (its lock is free), stray files, and a live one of another process
    // (its lock held).
    let tmp = root.join("tmp");
    std::fs::create_dir_all(tmp.join("op-dead/layer-3/usr/bin")).unwrap();
    std::fs::write(tmp.join("op-dead/blob-2"), "partial").unwrap();
    std::fs::write(tmp.join("stray"), "x").unwrap();
    std::fs::create_dir_all(tmp.join("op-live")).unwrap();
    let live = std::fs::File::open(tmp.join("op-live")).unwrap();
    let held = nix::fcntl::Flock::lock(live, nix::fcntl::FlockArg::LockExclusive).unwrap();
    let s = ImageStore::open(&root, StoreConfig::default()).unwrap();
    assert_eq!(names(&tmp), vec!["op-live".to_string()]);
    drop(held);
    drop(s);
    let _s = ImageStore::open(&root, StoreConfig::default()).unwrap();
    assert!(names(&tmp).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_from_an_oci_layout_and_an_oci_archive() {
    let e = env_or_skip!();
    let (s, root) = store("import");
    // Two images in the layout: a tag must choose.
    let err = s
        .import_oci_layout(&e.layout, None, "local/app:1")
        .unwrap_err();
    assert!(matches!(err, ImageError::BadReference { .. }), "{err}");
    let err = s
        .import_oci_layout(&e.layout, Some("nope"), "local/app:1")
        .unwrap_err();
    assert!(matches!(err, ImageError::NotFound { .. }), "{err}");
    let img = s
        .import_oci_layout(&e.layout, Some("v2"), "local/app:1")
        .unwrap();
    assert_eq!(img.reference, "docker.io/local/app:1");
    assert_eq!(img.config.working_dir.as_deref(), Some("/data"));
    assert_eq!(
        std::fs::read_to_string(img.layers[1].join("data/new.txt")).unwrap(),
        "added by layer 2\n"
    );
    assert!(
        std::fs::symlink_metadata(img.layers[1].join("etc/gone.txt"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
    // The archive holds the same image: same id, same layer directories.
    let from_archive = s
        .import_oci_archive(&e.archive, None, "local/app:archive")
        .unwrap();
    assert_eq!(from_archive.id, img.id);
    assert_eq!(from_archive.layers, img.layers);
    assert_eq!(s.list().len(), 2);
    // And a pull of it from the registry finds its layers there.
    let before = s.stats();
    let pulled = s.resolve(&app(e), None).await.unwrap();
    assert_eq!(pulled.layers, img.layers);
    assert_eq!(s.stats().layers_unpacked, before.layers_unpacked);
    assert_no_leftovers(&root);
}

/// Runs `script` in a private mount namespace.
fn in_mount_namespace(script: &str) -> std::process::Output {
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .output()
        .unwrap()
}

fn overlay_script(img: &Image, mnt: &Path, then: &str) -> String {
    let lower: Vec<String> = img
        .layers
        .iter()
        .rev()
        .map(|l| l.display().to_string())
        .collect();
    format!(
        "mount -t overlay overlay -o ro,userxattr,lowerdir={} {} && {then}",
        lower.join(":"),
        mnt.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layers_make_a_working_overlay_root() {
    let e = env_or_skip!();
    if !is_root() {
        eprintln!("SKIPPED: mounting an overlay here needs root");
        return;
    }
    let (s, root) = store("overlay");
    let img = s.resolve(&app(e), None).await.unwrap();
    let mnt = root.join("../mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let m = mnt.display();
    let out = in_mount_namespace(&overlay_script(
        &img,
        &mnt,
        &format!("test ! -e {m}/etc/gone.txt && chroot {m} /bin/sh -c 'cd /data && cat hello.txt new.txt'"),
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the image\nadded by layer 2\n"
    );

    // An opaque directory hides the lower layer's contents of that directory.
    let layout = root.join("../opaque-layout");
    write_layout(
        &layout,
        &[
            Tar::new()
                .dir("d", 0o755)
                .file("d/old", "old")
                .file("keep", "k")
                .bytes(),
            Tar::new()
                .dir("d", 0o755)
                .file("d/.wh..wh..opq", "")
                .file("d/new", "new")
                .file(".wh.keep", "")
                .bytes(),
        ],
        false,
    );
    let img = s
        .import_oci_layout(&layout, None, "local/opaque:1")
        .unwrap();
    let out = in_mount_namespace(&overlay_script(&img, &mnt, &format!("ls -a {m}/d {m}")));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("new") && !listing.contains("old") && !listing.contains("keep"),
        "{listing}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_used_and_never_lent_to_another_call() {
    let e = env_or_skip!();
    let (s, root) = store("auth");
    let base = format!("{}/private/base:1", e.auth_registry);
    match s.resolve(&base, None).await.unwrap_err() {
        ImageError::Unauthorized { registry } => assert_eq!(registry, e.auth_registry),
        other => panic!("expected Unauthorized, got {other}"),
    }
    let wrong = Credentials {
        username: USER.into(),
        password: "wrong".into(),
    };
    let err = s.resolve(&base, Some(&wrong)).await.unwrap_err();
    assert!(matches!(err, ImageError::Unauthorized { .. }), "{err}");
    assert!(
        !format!("{wrong:?}").contains("wrong"),
        "the password shows in Debug"
    );
    let img = s.resolve(&base, Some(&user())).await.unwrap();
    assert_eq!(img.layers.len(), 1);
    // Another image of the same registry, asked for without credentials: the ones of the
    // earlier call are not reused.
    let app = format!("{}/private/app:1", e.auth_registry);
    let err = s.pull(&app, None, &|_| {}).await.unwrap_err();
    assert!(matches!(err, ImageError::Unauthorized { .. }), "{err}");
    assert_no_leftovers(&root);
    // Credentials of the configuration, for that registry.
    let mut config = StoreConfig::default();
    config.credentials.insert(e.auth_registry.clone(), user());
    let root2 = root.join("../configured");
    let s2 = ImageStore::open(&root2, config).unwrap();
    let app_img = s2.resolve(&app, None).await.unwrap();
    assert_eq!(app_img.layers.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_layer_stops_the_others_and_leaves_nothing() {
    let e = env_or_skip!();
    let (s, root) = store("mixed");
    let err = s
        .resolve(&format!("{}/test/mixed:1", e.registry), None)
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::UnsafeLayer { .. }), "{err}");
    // At once, not eventually.
    assert_no_leftovers(&root);
    assert!(
        names(&root.join("layers")).is_empty(),
        "{:?}",
        names(&root.join("layers"))
    );
    assert!(s.list().is_empty());
}
