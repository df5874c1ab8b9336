//! The template builder for real: pip of the host's Python, the package index the host's pip is
//! configured for, small recipes (one tiny package), a fresh store per test.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use execbox_image::template::{Progress, Python, Recipe, TemplateError, TemplateStore};

const TIMEOUT: Duration = Duration::from_secs(600);

/// A store in a fresh directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "execbox-template-test-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        ));
        Scratch(dir)
    }

    fn store(&self) -> TemplateStore {
        TemplateStore::new(&self.0, TIMEOUT)
    }

    /// Every entry of the store but its lock directory.
    fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != ".locks")
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tiny(packages: &[&str]) -> Recipe {
    Recipe {
        name: "tiny".into(),
        python_packages: packages.iter().map(|p| p.to_string()).collect(),
    }
}

fn python() -> Python {
    Python::discover(None).expect("the host's python3")
}

/// Counts pip's output lines a build reports.
fn counter() -> (Arc<AtomicUsize>, impl Fn(Progress<'_>) + Send + Sync) {
    let n = Arc::new(AtomicUsize::new(0));
    let m = n.clone();
    (n, move |p: Progress<'_>| {
        if matches!(p, Progress::Pip(_)) {
            m.fetch_add(1, Ordering::SeqCst);
        }
    })
}

fn importable(python: &Python, dir: &Path, module: &str) -> bool {
    std::process::Command::new(&python.executable)
        .args(["-c", &format!("import {module}")])
        .env("PYTHONPATH", dir.join("site"))
        .env("PYTHONNOUSERSITE", "1")
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn a_recipe_builds_once_into_its_own_directory() {
    let scratch = Scratch::new("once");
    let store = scratch.store();
    let py = python();
    let recipe = tiny(&["six"]);
    assert!(store.find(&recipe, &py).is_none());

    let (pip_lines, progress) = counter();
    let t = store.build(&recipe, &py, &progress).expect("build");
    assert!(
        pip_lines.load(Ordering::SeqCst) > 0,
        "pip's output is reported"
    );
    assert_eq!(t.dir, scratch.0.join(format!("tiny-{}", &t.hash[..16])));
    assert_eq!(t.manifest.recipe, recipe);
    assert_eq!(t.manifest.python, py);
    assert!(
        t.manifest
            .installed
            .iter()
            .any(|p| p.name == "six" && !p.version.is_empty()),
        "{:?}",
        t.manifest.installed
    );
    assert!(!t.manifest.index.index_url.is_empty());
    assert!(t.manifest.size_bytes > 0);
    assert!(t.dir.join("python/six.py").is_file());
    assert!(t.dir.join("site/sitecustomize.py").is_file());
    let on_disk: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.dir.join("manifest.json")).expect("manifest"))
            .expect("json");
    assert_eq!(on_disk["hash"], t.hash.as_str());
    // The site hook puts the packages on sys.path.
    assert!(importable(&py, &t.dir, "six"));
    // Only the finished template is left: no staging directory.
    assert_eq!(
        scratch.entries(),
        [t.dir.file_name().unwrap().to_string_lossy()]
    );

    // Built already: found, not rebuilt.
    let (again_lines, progress) = counter();
    let again = store.build(&recipe, &py, &progress).expect("found");
    assert_eq!(again, t);
    assert_eq!(again_lines.load(Ordering::SeqCst), 0, "no second pip run");
    assert_eq!(store.find(&recipe, &py), Some(t.clone()));

    // A changed recipe is a new directory; the old one stays until removed.
    let changed = tiny(&["six==1.16.0"]);
    let t2 = store
        .build(&changed, &py, &|_| {})
        .expect("build the changed recipe");
    assert_ne!(t2.hash, t.hash);
    assert_ne!(t2.dir, t.dir);
    assert!(t.dir.is_dir() && t2.dir.is_dir());
    assert_eq!(
        t2.manifest
            .installed
            .iter()
            .find(|p| p.name == "six")
            .map(|p| p.version.as_str()),
        Some("1.16.0")
    );
    assert_eq!(store.list().expect("list").len(), 2);
    let removed = store
        .remove("tiny", Some(&t2.hash), false)
        .expect("remove old");
    assert_eq!(removed, std::slice::from_ref(&t.dir));
    assert!(!t.dir.exists() && t2.dir.is_dir());
    store.remove("tiny", None, false).expect("remove all");
    assert!(store.list().expect("list").is_empty());
    assert!(scratch.entries().is_empty(), "{:?}", scratch.entries());
}

#[test]
fn a_failed_build_leaves_nothing_and_names_what_is_missing() {
    let scratch = Scratch::new("fail");
    let store = scratch.store();
    let py = python();
    let missing = format!("execbox-no-such-package-{}", std::process::id());
    let recipe = tiny(&[missing.as_str(), "six"]);
    let err = store
        .build(&recipe, &py, &|_| {})
        .expect_err("no such package");
    match &err {
        TemplateError::Install(failure) => {
            assert_eq!(failure.missing, std::slice::from_ref(&missing), "{err}");
            assert_eq!(failure.requested, [missing.clone(), "six".into()], "{err}");
            assert!(!failure.index.index_url.is_empty(), "{err}");
        }
        other => panic!("an install error: {other}"),
    }
    let text = err.to_string();
    assert!(text.contains(&missing), "{text}");
    assert!(text.contains("package index"), "{text}");
    assert!(
        scratch.entries().is_empty(),
        "nothing left: {:?}",
        scratch.entries()
    );
    assert!(store.find(&recipe, &py).is_none());
    assert!(store.list().expect("list").is_empty());
}

/// Two builders that share nothing but the directory (as two processes would): the lock file
/// makes one build and the other wait and take its result.
#[test]
fn concurrent_builders_build_once() {
    let scratch = Scratch::new("race");
    let py = python();
    let recipe = tiny(&["six"]);
    let barrier = Arc::new(Barrier::new(2));
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let (store, py, recipe, barrier) =
                (scratch.store(), py.clone(), recipe.clone(), barrier.clone());
            std::thread::spawn(move || {
                let (lines, progress) = counter();
                barrier.wait();
                let t = store.build(&recipe, &py, &progress).expect("build");
                (t, lines.load(Ordering::SeqCst))
            })
        })
        .collect();
    let results: Vec<_> = runs
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    assert_eq!(results[0].0, results[1].0, "the same template");
    let builders = results.iter().filter(|(_, lines)| *lines > 0).count();
    assert_eq!(
        builders,
        1,
        "pip ran once: {:?}",
        results.iter().map(|r| r.1).collect::<Vec<_>>()
    );
    assert_eq!(scratch.entries().len(), 1, "{:?}", scratch.entries());
}

/// Concurrent callers in one process share one build (and its outcome).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_is_single_flight() {
    let scratch = Scratch::new("flight");
    let store = scratch.store();
    let py = python();
    let recipe = tiny(&["six"]);
    let (lines, progress) = counter();
    let progress: execbox_image::template::ProgressFn = Arc::new(progress);
    let calls = (0..4).map(|_| store.ensure(&recipe, &py, progress.clone()));
    let results = futures_util::future::join_all(calls).await;
    let first = results[0].clone().expect("built");
    for r in &results {
        assert_eq!(r.as_ref().expect("built"), &first);
    }
    assert!(lines.load(Ordering::SeqCst) > 0);
    // A later call finds it without building.
    let (later_lines, later) = counter();
    let again = store
        .ensure(&recipe, &py, Arc::new(later))
        .await
        .expect("found");
    assert_eq!(again, first);
    assert_eq!(later_lines.load(Ordering::SeqCst), 0);

    // A failure is shared too: one pip run for three callers (each failed build is tried
    // anew by the next caller, so without the single flight there would be three).
    let bad = tiny(&["execbox-no-such-package-either"]);
    let builds = Arc::new(AtomicUsize::new(0));
    let count_builds = {
        let builds = builds.clone();
        move |p: Progress<'_>| {
            if matches!(p, Progress::Step(s) if s.starts_with("installing")) {
                builds.fetch_add(1, Ordering::SeqCst);
            }
        }
    };
    let count_builds: execbox_image::template::ProgressFn = Arc::new(count_builds);
    let calls = (0..3).map(|_| store.ensure(&bad, &py, count_builds.clone()));
    for r in futures_util::future::join_all(calls).await {
        assert!(matches!(r, Err(TemplateError::Install(_))), "{r:?}");
    }
    assert_eq!(
        builds.load(Ordering::SeqCst),
        1,
        "one build for concurrent callers"
    );
    // A later call tries again.
    assert!(store.ensure(&bad, &py, count_builds.clone()).await.is_err());
    assert_eq!(builds.load(Ordering::SeqCst), 2);
}
