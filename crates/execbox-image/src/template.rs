//! Templates: read-only directory trees on the host built from package registries (a layer a
//! sandbox sees at [`TEMPLATE_DIR`]), shared by every sandbox, server and test run that uses the
//! same store.
//!
//! A template is made from a [`Recipe`] (a name and the Python packages to install) with one
//! [`Python`], the interpreter the sandboxes run. Its directory is named by the hash of both
//! (`code-interpreter-<hash>`): a changed package list, or another Python, builds a new
//! directory, and the old one stays until removed ([`TemplateStore::remove`]).
//!
//! Layout of one template:
//! - `python/`: the packages, installed by that Python's own pip with
//!   `pip install --target`, from the package index the host's pip is configured for;
//! - `site/sitecustomize.py`: put on `PYTHONPATH` in the sandbox ([`Template::sandbox_env`]),
//!   it adds `python/` to `sys.path` *after* the user's own site-packages, so that a package the
//!   user installs later (`pip install --user`, or into a virtualenv) wins over the template's,
//!   and *before* the system's site-packages, so that the template's versions win over whatever
//!   the host has; packages put straight on `PYTHONPATH` would instead shadow the user's own
//!   installs;
//! - `manifest.json`: the recipe, the Python, the index used and every package installed, with
//!   its version.
//!
//! Builds are atomic: pip installs into a staging directory that is renamed into place only
//! when complete, so a failed or interrupted build leaves no template behind. A lock file per
//! template makes concurrent processes build it once (the others wait and use the result), and
//! [`TemplateStore::ensure`] does the same for concurrent callers in one process.
//!
//! ```no_run
//! use execbox_image::template::{Python, Recipe, TemplateStore};
//! # fn main() -> Result<(), execbox_image::template::TemplateError> {
//! let store = TemplateStore::new("/var/lib/execbox/templates", std::time::Duration::from_secs(1800));
//! let python = Python::discover(None)?;
//! let template = store.build(&Recipe::code_interpreter(), &python, &|p| println!("{p}"))?;
//! println!("{} at {}", template.name, template.dir.display());
//! # Ok(()) }
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use execbox_jail::rootfs::TEMPLATE_DIR;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The name of the data-science template that OpenSandbox's code-interpreter image resolves to.
pub const CODE_INTERPRETER: &str = "code-interpreter";

/// Bumped when the layout of a template or the way it is built changes, so that templates
/// built the old way are not taken for new ones.
const BUILD_FORMAT: u32 = 1;

/// The site hook put on `PYTHONPATH` (see the module documentation). Its text is part of every
/// template's hash.
const SITECUSTOMIZE: &str = r#""""execbox template site hook (execbox-image, template.rs).

On PYTHONPATH in sandboxes made from a template: puts the template's packages on sys.path after
the user's own site-packages (so that `pip install --user` wins) and before the system's
site-packages (so that the template's versions win over the host's); in a virtualenv, after
its site-packages (what is installed there wins). Then runs the sitecustomize this one
shadows, if there is one.
"""

import os
import sys


def _execbox_template_packages():
    import site

    here = os.path.dirname(os.path.abspath(__file__))
    packages = os.path.join(os.path.dirname(here), "python")
    if not os.path.isdir(packages) or packages in sys.path:
        return
    before = set(sys.path)
    site.addsitedir(packages)  # the directory, and the paths of its .pth files
    added = [p for p in sys.path if p not in before]
    rest = [p for p in sys.path if p in before]
    try:
        system = {os.path.realpath(p) for p in site.getsitepackages()}
    except Exception:
        system = set()
    if sys.prefix != sys.base_prefix:
        system = set()  # a virtualenv: its own site-packages come first
    at = next((i for i, p in enumerate(rest) if os.path.realpath(p) in system), len(rest))
    sys.path[:] = rest[:at] + added + rest[at:]


def _execbox_next_sitecustomize():
    # A kernel started with -S runs this hook itself and wants none of the host's.
    if sys.flags.no_site:
        return
    import importlib.machinery

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    import importlib.util

    try:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except Exception as e:
        print(f"Error in sitecustomize ({spec.origin}): {type(e).__name__}: {e}", file=sys.stderr)


_execbox_template_packages()
_execbox_next_sitecustomize()
del _execbox_template_packages, _execbox_next_sitecustomize
"#;

/// Python asked for the package index pip will use: its own configuration (environment
/// variables over the `install` section over `global`), else pip's built-in default. Read from
/// pip so that no registry's name is written here.
const INDEX_PROBE: &str = r#"
import json
items = {}
try:
    from pip._internal.configuration import Configuration
    c = Configuration(isolated=False)
    c.load()
    items = dict(c.items())
except Exception:
    pass
def get(name):
    for key in (":env:." + name, "install." + name, "global." + name):
        if key in items:
            return items[key]
    return None
index = get("index-url")
if index is None:
    try:
        from pip._internal.models.index import PyPI
        index = PyPI.simple_url
    except Exception:
        index = "(pip's default index)"
split = lambda v: [x for x in (v or "").split() if x]
print(json.dumps({"index_url": index, "extra_index_urls": split(get("extra-index-url")),
                  "find_links": split(get("find-links"))}))
"#;

/// What a template is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipe {
    /// The template's name (`code-interpreter`).
    pub name: String,
    /// Python packages, as pip requirement specifiers; pip resolves their versions and
    /// dependencies (the manifest records what it installed).
    pub python_packages: Vec<String>,
}

impl Recipe {
    /// The data-science stack users expect in OpenSandbox's code-interpreter image: numpy,
    /// pandas, matplotlib, scipy, pillow and requests.
    pub fn code_interpreter() -> Recipe {
        Recipe {
            name: CODE_INTERPRETER.into(),
            python_packages: [
                "numpy",
                "pandas",
                "matplotlib",
                "scipy",
                "pillow",
                "requests",
            ]
            .map(String::from)
            .to_vec(),
        }
    }

    /// The built-in recipe called `name`.
    pub fn named(name: &str) -> Result<Recipe, TemplateError> {
        match name {
            CODE_INTERPRETER => Ok(Recipe::code_interpreter()),
            other => Err(TemplateError::Unknown(other.to_string())),
        }
    }

    /// The names of the built-in recipes.
    pub fn known() -> &'static [&'static str] {
        &[CODE_INTERPRETER]
    }
}

/// The Python a template is built for: the interpreter the sandboxes run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Python {
    /// Its real executable (shims and links resolved).
    pub executable: PathBuf,
    /// Its `sys.version`.
    pub version: String,
}

impl Python {
    /// The Python the sandboxes use: `configured`, else `python3` on `PATH`, resolved to its
    /// real executable as [`execbox_jail::runtimes::discover`] does for the sandboxes.
    pub fn discover(configured: Option<&Path>) -> Result<Python, TemplateError> {
        let runtimes = execbox_jail::runtimes::discover(configured);
        let exe = runtimes
            .into_iter()
            .find(|r| r.name == "python3")
            .map(|r| r.executable)
            .ok_or_else(|| {
                TemplateError::NoPython(match configured {
                    Some(p) => format!("{} does not run", p.display()),
                    None => "no python3 on PATH".into(),
                })
            })?;
        Python::at(&exe)
    }

    /// The Python whose real executable is `exe`.
    pub fn at(exe: &Path) -> Result<Python, TemplateError> {
        let out = python_command(exe)
            .args(["-c", "import sys; print(sys.version)"])
            .output()
            .map_err(|e| TemplateError::NoPython(format!("{}: {e}", exe.display())))?;
        if !out.status.success() {
            return Err(TemplateError::NoPython(format!(
                "{}: {}",
                exe.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(Python {
            executable: exe.to_path_buf(),
            version: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        })
    }
}

/// The package index pip uses, as its configuration says.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageIndex {
    /// `index-url`.
    pub index_url: String,
    /// `extra-index-url`s.
    #[serde(default)]
    pub extra_index_urls: Vec<String>,
    /// `find-links` locations.
    #[serde(default)]
    pub find_links: Vec<String>,
}

impl fmt::Display for PackageIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.index_url)?;
        if !self.extra_index_urls.is_empty() {
            write!(f, " (extra index {})", self.extra_index_urls.join(", "))?;
        }
        if !self.find_links.is_empty() {
            write!(f, " (find-links {})", self.find_links.join(", "))?;
        }
        Ok(())
    }
}

/// One installed package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    /// Distribution name.
    pub name: String,
    /// Installed version.
    pub version: String,
}

/// What a built template holds (`manifest.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Build format (see the module's constant).
    pub format: u32,
    /// Template name.
    pub name: String,
    /// Hash of the recipe and Python ([`recipe_hash`]).
    pub hash: String,
    /// The recipe.
    pub recipe: Recipe,
    /// The Python it was built for.
    pub python: Python,
    /// Where pip took the packages from.
    pub index: PackageIndex,
    /// Every package installed, dependencies included, sorted by name.
    pub installed: Vec<Package>,
    /// When it was built (seconds since the epoch).
    pub built_at: u64,
    /// How long the build took, in seconds.
    pub build_secs: f64,
    /// Size of the template on disk, in bytes.
    pub size_bytes: u64,
}

/// A built template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    /// Its name.
    pub name: String,
    /// Its recipe hash.
    pub hash: String,
    /// Its directory on the host.
    pub dir: PathBuf,
    /// What it holds.
    pub manifest: Manifest,
}

impl Template {
    /// The environment a sandbox needs to use the template seen at [`TEMPLATE_DIR`]:
    /// `PYTHONPATH` holding the site hook, and `EXECBOX_TEMPLATE` (where it is; Python kernels
    /// started with `-S` run the hook themselves when it is set).
    pub fn sandbox_env(&self) -> Vec<(String, String)> {
        vec![
            ("PYTHONPATH".into(), format!("{TEMPLATE_DIR}/site")),
            ("EXECBOX_TEMPLATE".into(), TEMPLATE_DIR.into()),
        ]
    }
}

/// What a build is doing, for progress displays.
#[derive(Debug, Clone, Copy)]
pub enum Progress<'a> {
    /// Another process is building this template; waiting for it.
    Waiting,
    /// A step of the build.
    Step(&'a str),
    /// One line of pip's output.
    Pip(&'a str),
}

impl fmt::Display for Progress<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Progress::Waiting => write!(f, "waiting for another process building it"),
            Progress::Step(s) | Progress::Pip(s) => write!(f, "{s}"),
        }
    }
}

/// A progress callback shared by the callers of [`TemplateStore::ensure`].
pub type ProgressFn = Arc<dyn Fn(Progress<'_>) + Send + Sync>;

/// Errors of templates. Cloneable: one build's outcome goes to every caller waiting for it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TemplateError {
    /// No such recipe.
    #[error("unknown template {0:?} (templates: {known})", known = Recipe::known().join(", "))]
    Unknown(String),
    /// No usable Python to build for.
    #[error("no Python to build templates for: {0}")]
    NoPython(String),
    /// That Python has no pip.
    #[error("template {template:?}: {python} has no pip (python -m pip): {detail}")]
    NoPip {
        /// Template name.
        template: String,
        /// The Python.
        python: String,
        /// What Python said.
        detail: String,
    },
    /// pip could not install the packages: a package that does not exist, or an index that
    /// cannot be reached.
    #[error("{0}")]
    Install(Box<InstallFailure>),
    /// The build ran past its time limit and was stopped.
    #[error("template {template:?}: the build took longer than {secs} s and was stopped")]
    TimedOut {
        /// Template name.
        template: String,
        /// The limit.
        secs: u64,
    },
    /// The template is mounted in running sandboxes.
    #[error("template {template:?} at {} is in use by running sandboxes", dir.display())]
    InUse {
        /// Template name.
        template: String,
        /// Its directory.
        dir: PathBuf,
    },
    /// A file operation failed.
    #[error("template {template:?}: {what}: {source}")]
    Io {
        /// Template name.
        template: String,
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: Arc<std::io::Error>,
    },
}

/// What pip could not install, and from where.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "template {template:?}: pip could not install {missing} (of {requested}) from the package \
     index {index} (is it reachable from this host?); pip said: {detail}",
    missing = missing.join(", "),
    requested = requested.join(", ")
)]
pub struct InstallFailure {
    /// Template name.
    pub template: String,
    /// The packages pip named as not found, else every package of the recipe.
    pub missing: Vec<String>,
    /// Every package of the recipe.
    pub requested: Vec<String>,
    /// The index pip used.
    pub index: PackageIndex,
    /// The end of pip's output.
    pub detail: String,
}

fn io_err(
    template: &str,
    what: impl Into<String>,
) -> impl FnOnce(std::io::Error) -> TemplateError + '_ {
    let what = what.into();
    move |source| TemplateError::Io {
        template: template.to_string(),
        what,
        source: Arc::new(source),
    }
}

/// The hash naming a template built from `recipe` for `python` (hex SHA-256 of the recipe, the
/// Python's real path and version, the site hook and the build format).
pub fn recipe_hash(recipe: &Recipe, python: &Python) -> String {
    let canonical = serde_json::json!({
        "format": BUILD_FORMAT,
        "name": recipe.name,
        "python_packages": recipe.python_packages,
        "python": { "executable": python.executable, "version": python.version },
        "sitecustomize": SITECUSTOMIZE,
    });
    let digest = Sha256::digest(canonical.to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The directory name of a template: its name and the first 16 hex digits of its hash.
fn dir_name(name: &str, hash: &str) -> String {
    format!("{name}-{}", &hash[..16.min(hash.len())])
}

type Flight = tokio::sync::watch::Sender<Option<Result<Template, TemplateError>>>;

/// The templates of one directory on the host.
#[derive(Clone)]
pub struct TemplateStore {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    root: PathBuf,
    build_timeout: Duration,
    /// Builds in progress in this process, by template directory name.
    flights: Mutex<HashMap<String, Flight>>,
}

impl TemplateStore {
    /// The store in `root` (created on first build); a build running longer than
    /// `build_timeout` is stopped.
    pub fn new(root: impl Into<PathBuf>, build_timeout: Duration) -> TemplateStore {
        TemplateStore {
            inner: Arc::new(StoreInner {
                root: root.into(),
                build_timeout,
                flights: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Its directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The template of `recipe` for `python`, when it is built.
    pub fn find(&self, recipe: &Recipe, python: &Python) -> Option<Template> {
        let hash = recipe_hash(recipe, python);
        let dir = self.root().join(dir_name(&recipe.name, &hash));
        read_template(&dir).filter(|t| t.hash == hash)
    }

    /// Every template built here, by name then build time.
    pub fn list(&self) -> Result<Vec<Template>, TemplateError> {
        let entries = match std::fs::read_dir(self.root()) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("*", format!("listing {}", self.root().display()))(e)),
        };
        let mut found: Vec<Template> = entries
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| read_template(&e.path()))
            .collect();
        found.sort_by(|a, b| (&a.name, a.manifest.built_at).cmp(&(&b.name, b.manifest.built_at)));
        Ok(found)
    }

    /// Removes every build of the template `name` (`keep`: except the one with that hash).
    /// A build mounted in a running sandbox is refused unless `force`: its files would vanish
    /// under it. Returns the directories removed.
    pub fn remove(
        &self,
        name: &str,
        keep: Option<&str>,
        force: bool,
    ) -> Result<Vec<PathBuf>, TemplateError> {
        let mut removed = Vec::new();
        for t in self.list()?.into_iter().filter(|t| t.name == name) {
            if keep == Some(t.hash.as_str()) {
                continue;
            }
            let _lock = self.lock(&t.name, &t.hash, &|_| {})?;
            if !force && in_use(&t.dir) {
                return Err(TemplateError::InUse {
                    template: t.name,
                    dir: t.dir,
                });
            }
            discard(&t.dir).map_err(io_err(name, format!("removing {}", t.dir.display())))?;
            tracing::info!(template = %name, dir = %t.dir.display(), "template removed");
            removed.push(t.dir);
        }
        Ok(removed)
    }

    /// The template of `recipe` for `python`, built now if needed: once per process however
    /// many callers ask at the same time (they share its outcome), and once per host (a lock
    /// file per template). `progress` hears the build this call starts; a caller that joins a
    /// build in progress hears nothing. The build goes on if the caller goes away.
    pub async fn ensure(
        &self,
        recipe: &Recipe,
        python: &Python,
        progress: ProgressFn,
    ) -> Result<Template, TemplateError> {
        if let Some(t) = self.find(recipe, python) {
            return Ok(t);
        }
        let key = dir_name(&recipe.name, &recipe_hash(recipe, python));
        let mut rx = {
            let mut flights = self.inner.flights.lock().unwrap_or_else(|p| p.into_inner());
            match flights.get(&key) {
                Some(flight) => flight.subscribe(),
                None => {
                    let (tx, rx) = tokio::sync::watch::channel(None);
                    flights.insert(key.clone(), tx.clone());
                    let store = self.clone();
                    let (recipe, python) = (recipe.clone(), python.clone());
                    tokio::task::spawn_blocking(move || {
                        let result = store.build(&recipe, &python, &*progress);
                        store
                            .inner
                            .flights
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&key);
                        tx.send_replace(Some(result));
                    });
                    rx
                }
            }
        };
        let outcome = rx
            .wait_for(Option::is_some)
            .await
            .map(|v| v.clone())
            .ok()
            .flatten();
        outcome.unwrap_or_else(|| {
            Err(TemplateError::Io {
                template: recipe.name.clone(),
                what: "building".into(),
                source: Arc::new(std::io::Error::other(
                    "the build task ended without a result",
                )),
            })
        })
    }

    /// Builds the template of `recipe` for `python` unless it is built already, waiting for
    /// another process building it. Blocking.
    pub fn build(
        &self,
        recipe: &Recipe,
        python: &Python,
        progress: &(dyn Fn(Progress<'_>) + Send + Sync),
    ) -> Result<Template, TemplateError> {
        let name = recipe.name.as_str();
        if let Some(t) = self.find(recipe, python) {
            return Ok(t);
        }
        let hash = recipe_hash(recipe, python);
        let dir = self.root().join(dir_name(name, &hash));
        let _lock = self.lock(name, &hash, progress)?;
        // Built by another process while this one waited.
        if let Some(t) = self.find(recipe, python) {
            return Ok(t);
        }
        // Left by a build that died (the lock is ours, so nobody else is using them).
        self.discard_stages(name, &hash);
        if dir.exists() {
            discard(&dir).map_err(io_err(name, format!("removing {}", dir.display())))?;
        }
        let stage = self.root().join(format!(
            ".build-{}-{}-{}",
            dir_name(name, &hash),
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        ));
        let started = Instant::now();
        tracing::info!(template = %name, hash = %hash, python = %python.executable.display(), "building template");
        let built = self.build_into(&stage, recipe, python, &hash, started, progress);
        let manifest = match built {
            Ok(m) => m,
            Err(e) => {
                let _ = discard(&stage);
                tracing::warn!(template = %name, error = %e, "template build failed");
                return Err(e);
            }
        };
        if let Err(e) = std::fs::rename(&stage, &dir) {
            let _ = discard(&stage);
            return Err(io_err(
                name,
                format!("moving the build to {}", dir.display()),
            )(e));
        }
        tracing::info!(
            template = %name,
            dir = %dir.display(),
            packages = manifest.installed.len(),
            size_mib = manifest.size_bytes >> 20,
            secs = format!("{:.1}", manifest.build_secs),
            "template built"
        );
        Ok(Template {
            name: name.to_string(),
            hash,
            dir,
            manifest,
        })
    }

    /// The lock of one template, held while it is built or removed.
    fn lock(
        &self,
        name: &str,
        hash: &str,
        progress: &(dyn Fn(Progress<'_>) + Send + Sync),
    ) -> Result<nix::fcntl::Flock<std::fs::File>, TemplateError> {
        let locks = self.root().join(".locks");
        std::fs::create_dir_all(&locks)
            .map_err(io_err(name, format!("creating {}", locks.display())))?;
        // Others may read the store (their sandboxes need the templates): readable by all.
        let _ = std::fs::set_permissions(self.root(), std::fs::Permissions::from_mode(0o755));
        let path = locks.join(format!("{}.lock", dir_name(name, hash)));
        let deadline = Instant::now() + self.inner.build_timeout + Duration::from_secs(60);
        let mut told = false;
        loop {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(io_err(name, format!("opening {}", path.display())))?;
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(lock),
                Err((_, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                    if !told {
                        told = true;
                        progress(Progress::Waiting);
                        tracing::info!(template = %name, "waiting for another process building the template");
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err((_, e)) => {
                    return Err(io_err(name, format!("locking {}", path.display()))(
                        std::io::Error::from(e),
                    ))
                }
            }
        }
    }

    fn discard_stages(&self, name: &str, hash: &str) {
        let prefix = format!(".build-{}-", dir_name(name, hash));
        if let Ok(entries) = std::fs::read_dir(self.root()) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    tracing::info!(dir = %e.path().display(), "removing an unfinished template build");
                    let _ = discard(&e.path());
                }
            }
        }
    }

    fn build_into(
        &self,
        stage: &Path,
        recipe: &Recipe,
        python: &Python,
        hash: &str,
        started: Instant,
        progress: &(dyn Fn(Progress<'_>) + Send + Sync),
    ) -> Result<Manifest, TemplateError> {
        let name = recipe.name.as_str();
        let packages_dir = stage.join("python");
        let site_dir = stage.join("site");
        for d in [&packages_dir, &site_dir] {
            std::fs::create_dir_all(d)
                .map_err(io_err(name, format!("creating {}", d.display())))?;
        }
        let index = package_index(python);
        let step = format!(
            "installing {} with {} from {index}",
            recipe.python_packages.join(", "),
            python.executable.display()
        );
        progress(Progress::Step(&step));
        tracing::info!(template = %name, "{step}");
        let mut pip = python_command(&python.executable);
        pip.args(["-m", "pip", "install", "--target"])
            .arg(&packages_dir)
            .args([
                "--no-input",
                "--disable-pip-version-check",
                "--progress-bar",
                "off",
                "--no-color",
                "--no-warn-script-location",
            ])
            .arg("--")
            .args(&recipe.python_packages);
        let tail = self.run_pip(pip, name, progress)?;
        match tail {
            PipOutcome::Ok => {}
            PipOutcome::Failed(lines) => {
                let text = lines.join("\n");
                if text.contains("No module named pip") {
                    return Err(TemplateError::NoPip {
                        template: name.into(),
                        python: python.executable.display().to_string(),
                        detail: last_lines(&lines, 3),
                    });
                }
                let mut missing = not_found(&lines);
                if missing.is_empty() {
                    missing = recipe.python_packages.clone();
                }
                return Err(TemplateError::Install(Box::new(InstallFailure {
                    template: name.into(),
                    missing,
                    requested: recipe.python_packages.clone(),
                    index,
                    detail: error_lines(&lines),
                })));
            }
        }
        progress(Progress::Step("recording the installed packages"));
        let installed = installed_packages(python, &packages_dir)
            .map_err(io_err(name, "listing the installed packages"))?;
        let hook = site_dir.join("sitecustomize.py");
        std::fs::write(&hook, SITECUSTOMIZE)
            .map_err(io_err(name, format!("writing {}", hook.display())))?;
        let size_bytes = open_up(stage).map_err(io_err(name, "setting permissions"))?;
        let manifest = Manifest {
            format: BUILD_FORMAT,
            name: name.into(),
            hash: hash.into(),
            recipe: recipe.clone(),
            python: python.clone(),
            index,
            installed,
            built_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            build_secs: started.elapsed().as_secs_f64(),
            size_bytes,
        };
        let text = serde_json::to_string_pretty(&manifest)
            .map_err(|e| io_err(name, "encoding the manifest")(std::io::Error::other(e)))?;
        let path = stage.join("manifest.json");
        std::fs::write(&path, text).map_err(io_err(name, format!("writing {}", path.display())))?;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644));
        let _ = std::fs::set_permissions(stage, std::fs::Permissions::from_mode(0o755));
        Ok(manifest)
    }

    /// Runs pip in a process group of its own, passing each line of its output to `progress`
    /// and stopping it at the build's time limit; the end of its output when it fails.
    fn run_pip(
        &self,
        mut pip: Command,
        name: &str,
        progress: &(dyn Fn(Progress<'_>) + Send + Sync),
    ) -> Result<PipOutcome, TemplateError> {
        let (reader, writer) = std::io::pipe().map_err(io_err(name, "creating a pipe"))?;
        let writer2 = writer
            .try_clone()
            .map_err(io_err(name, "creating a pipe"))?;
        pip.stdin(Stdio::null())
            .stdout(writer)
            .stderr(writer2)
            .process_group(0);
        let mut child = pip.spawn().map_err(io_err(name, "starting pip"))?;
        // The pipe's write ends live on in `pip` until it is dropped: EOF needs them gone.
        drop(pip);
        let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let timeout = self.inner.build_timeout;
        let watchdog = std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(timeout) {
                let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                return true;
            }
            false
        });
        let mut tail: VecDeque<String> = VecDeque::new();
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            let line = line.trim_end().to_string();
            if line.is_empty() {
                continue;
            }
            tracing::debug!(template = %name, "pip: {line}");
            progress(Progress::Pip(&line));
            if tail.len() == 40 {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        let status = child.wait().map_err(io_err(name, "waiting for pip"));
        let _ = done_tx.send(());
        let timed_out = watchdog.join().unwrap_or(false);
        if timed_out {
            return Err(TemplateError::TimedOut {
                template: name.into(),
                secs: timeout.as_secs(),
            });
        }
        if status?.success() {
            Ok(PipOutcome::Ok)
        } else {
            Ok(PipOutcome::Failed(tail.into()))
        }
    }
}

enum PipOutcome {
    Ok,
    Failed(Vec<String>),
}

/// A command running `exe` with an environment of the host's own minus what would change where
/// Python or pip look (pip's configuration, the index and certificates, stays).
fn python_command(exe: &Path) -> Command {
    let mut cmd = Command::new(exe);
    for var in [
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "PYTHONUSERBASE",
        "PIP_TARGET",
        "PIP_PREFIX",
        "PIP_ROOT",
        "PIP_USER",
        "PIP_REQUIRE_VIRTUALENV",
        "PIP_BREAK_SYSTEM_PACKAGES",
        // The template is read-only in the sandboxes: its bytecode must be compiled now.
        "PYTHONDONTWRITEBYTECODE",
        "PIP_NO_COMPILE",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("PYTHONNOUSERSITE", "1");
    cmd
}

/// The index pip will use (see [`INDEX_PROBE`]).
fn package_index(python: &Python) -> PackageIndex {
    let unknown = || PackageIndex {
        index_url: "(the index in pip's configuration: `pip config list`)".into(),
        ..Default::default()
    };
    let out = python_command(&python.executable)
        .args(["-c", INDEX_PROBE])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            serde_json::from_slice(&o.stdout).unwrap_or_else(|_| unknown())
        }
        _ => unknown(),
    }
}

/// What pip installed into `dir`, sorted by name.
fn installed_packages(python: &Python, dir: &Path) -> std::io::Result<Vec<Package>> {
    let out = python_command(&python.executable)
        .args([
            "-m",
            "pip",
            "list",
            "--disable-pip-version-check",
            "--format",
            "json",
            "--path",
        ])
        .arg(dir)
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "pip list: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let mut list: Vec<Package> =
        serde_json::from_slice(&out.stdout).map_err(std::io::Error::other)?;
    list.sort_by_key(|p| p.name.to_ascii_lowercase());
    Ok(list)
}

/// The requirements pip reported as not found.
fn not_found(lines: &[String]) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for line in lines {
        for marker in [
            "No matching distribution found for ",
            "Could not find a version that satisfies the requirement ",
        ] {
            if let Some(rest) = line.split(marker).nth(1) {
                if let Some(req) = rest.split_whitespace().next() {
                    if !found.iter().any(|f| f == req) {
                        found.push(req.to_string());
                    }
                }
            }
        }
    }
    found
}

/// pip's error lines (`ERROR: …`), else its last lines.
fn error_lines(lines: &[String]) -> String {
    let errors: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with("ERROR") || l.contains("Error"))
        .map(String::as_str)
        .collect();
    if errors.is_empty() {
        last_lines(lines, 5)
    } else {
        errors[errors.len().saturating_sub(5)..].join(" | ")
    }
}

fn last_lines(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Makes everything under `dir` readable (and directories and executables enterable) by the
/// sandbox users, who are not the builder; returns the total size of its files.
fn open_up(dir: &Path) -> std::io::Result<u64> {
    let mut size = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))?;
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let meta = entry.path().symlink_metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                size += meta.len();
                let mode = meta.permissions().mode();
                let want = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
                if mode & 0o7777 != want {
                    std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(want))?;
                }
            }
        }
    }
    Ok(size)
}

/// Removes a directory tree: renamed out of the way first (a reader never sees half of it
/// under its real name), then deleted.
fn discard(dir: &Path) -> std::io::Result<()> {
    let Some(parent) = dir.parent() else {
        return std::fs::remove_dir_all(dir);
    };
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let trash = if name.starts_with('.') {
        dir.to_path_buf()
    } else {
        let t = parent.join(format!(".trash-{name}-{}", std::process::id()));
        std::fs::rename(dir, &t)?;
        t
    };
    match std::fs::remove_dir_all(&trash) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The template in `dir`, when it is a complete build.
fn read_template(dir: &Path) -> Option<Template> {
    let text = std::fs::read(dir.join("manifest.json")).ok()?;
    let manifest: Manifest = serde_json::from_slice(&text).ok()?;
    let expected = dir_name(&manifest.name, &manifest.hash);
    (dir.file_name()? == expected.as_str() && manifest.format == BUILD_FORMAT).then(|| Template {
        name: manifest.name.clone(),
        hash: manifest.hash.clone(),
        dir: dir.to_path_buf(),
        manifest,
    })
}

/// Whether a mount of `dir` exists in some mount namespace of this host (a sandbox using the
/// template). A bind mount shows in `/proc/<pid>/mountinfo` as its device and the path of its
/// root within that device's file system: the same pair as `dir` has here.
pub fn in_use(dir: &Path) -> bool {
    let Some(wanted) = mount_identity(dir) else {
        return false;
    };
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    let mut seen = std::collections::HashSet::new();
    for p in procs.flatten() {
        if !p
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        // One look per mount namespace.
        if let Ok(ns) = std::fs::read_link(p.path().join("ns/mnt")) {
            if !seen.insert(ns) {
                continue;
            }
        }
        let Ok(text) = std::fs::read_to_string(p.path().join("mountinfo")) else {
            continue;
        };
        if text
            .lines()
            .filter_map(mount_fields)
            .any(|(dev, root, _)| (dev, root) == wanted)
        {
            return true;
        }
    }
    false
}

/// The device and the path within its file system of `dir`, as mountinfo would show a bind
/// mount of it.
fn mount_identity(dir: &Path) -> Option<(String, PathBuf)> {
    let dir = std::fs::canonicalize(dir).ok()?;
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let (dev, root, point) = text
        .lines()
        .filter_map(mount_fields)
        .filter(|(_, _, point)| dir.starts_with(point))
        .max_by_key(|(_, _, point)| point.components().count())?;
    let rest = dir.strip_prefix(&point).ok()?;
    Some((dev, root.join(rest)))
}

/// Device, root and mount point of one mountinfo line.
fn mount_fields(line: &str) -> Option<(String, PathBuf, PathBuf)> {
    let mut f = line.split(' ');
    let dev = f.nth(2)?.to_string();
    let root = unescape(f.next()?);
    let point = unescape(f.next()?);
    Some((dev, root, point))
}

/// mountinfo's octal escapes (`\040` for a space and the like).
fn unescape(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(
                    d.iter()
                        .fold(0u8, |a, c| a.wrapping_mul(8).wrapping_add(c - b'0')),
                );
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn python() -> Python {
        Python::discover(None).expect("the host's python3")
    }

    #[test]
    fn the_hash_follows_the_recipe_and_the_python() {
        let py = python();
        let recipe = Recipe::code_interpreter();
        let h = recipe_hash(&recipe, &py);
        assert_eq!(h.len(), 64);
        assert_eq!(h, recipe_hash(&recipe.clone(), &py.clone()), "stable");
        let mut more = recipe.clone();
        more.python_packages.push("six".into());
        assert_ne!(h, recipe_hash(&more, &py), "another package list");
        let mut other = py.clone();
        other.executable = PathBuf::from("/usr/bin/python3.99");
        assert_ne!(h, recipe_hash(&recipe, &other), "another python");
        let mut newer = py.clone();
        newer.version.push('+');
        assert_ne!(h, recipe_hash(&recipe, &newer), "another version");
        assert!(dir_name(&recipe.name, &h).starts_with("code-interpreter-"));
    }

    #[test]
    fn pip_failures_name_the_packages() {
        let lines: Vec<String> = [
            "Collecting nope-nope",
            "ERROR: Could not find a version that satisfies the requirement nope-nope (from versions: none)",
            "ERROR: No matching distribution found for nope-nope",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(not_found(&lines), ["nope-nope"]);
        assert!(error_lines(&lines).contains("No matching distribution"));
    }

    #[test]
    fn mountinfo_lines_are_read() {
        let line = r"36 35 98:0 /mnt/a\040b /opt/x rw,noatime master:1 - ext3 /dev/root rw";
        let (dev, root, point) = mount_fields(line).expect("fields");
        assert_eq!(dev, "98:0");
        assert_eq!(root, PathBuf::from("/mnt/a b"));
        assert_eq!(point, PathBuf::from("/opt/x"));
        // This directory is not bind-mounted anywhere.
        assert!(!in_use(&std::env::temp_dir()));
        assert!(mount_identity(Path::new("/")).is_some());
    }

    #[test]
    fn unknown_recipes_are_named() {
        let e = Recipe::named("nope").expect_err("unknown");
        assert!(e.to_string().contains("nope") && e.to_string().contains(CODE_INTERPRETER));
    }
}
