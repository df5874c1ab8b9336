//! The server's templates (`[templates]`): an image that resolves to a template built from
//! package registries (`opensandbox/code-interpreter` → `code-interpreter`) waits for it here
//! (built on first use, or in the background at start), then its sandbox sees it read-only at
//! [`execbox_jail::rootfs::TEMPLATE_DIR`] with the environment that makes Python use it.
//!
//! The builds themselves are `execbox_image::template`'s: content-addressed, atomic, built
//! once per host and per process.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use execbox_image::template::{Progress, ProgressFn, Python, Recipe, TemplateError, TemplateStore};

use crate::ServerConfig;

/// The template of the host's own runtimes, with nothing built.
pub const DEFAULT_TEMPLATE: &str = "default";

/// What a sandbox of a built template needs.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Template name.
    pub name: String,
    /// Its directory on the host, bound read-only into the sandbox.
    pub host_dir: PathBuf,
    /// Environment of every process of the sandbox (commands, sessions, code contexts).
    pub env: Vec<(String, String)>,
}

/// The templates of one server.
pub struct Templates {
    store: TemplateStore,
    /// The configured Python (`python`), else `python3` on `PATH`: the one the sandboxes run.
    python_config: Option<PathBuf>,
    /// Discovered once it succeeds.
    python: tokio::sync::OnceCell<Python>,
    prebuild: Vec<String>,
}

impl Templates {
    /// The templates of a server with `config`.
    pub fn new(config: &ServerConfig) -> Templates {
        Templates {
            store: store(config),
            python_config: config.python.clone(),
            python: tokio::sync::OnceCell::new(),
            prebuild: config.templates.prebuild.clone(),
        }
    }

    /// Where they are kept.
    pub fn dir(&self) -> &Path {
        self.store.root()
    }

    async fn python(&self) -> Result<Python, TemplateError> {
        self.python
            .get_or_try_init(|| async {
                let configured = self.python_config.clone();
                tokio::task::spawn_blocking(move || Python::discover(configured.as_deref()))
                    .await
                    .map_err(|e| TemplateError::NoPython(e.to_string()))?
            })
            .await
            .cloned()
    }

    /// The template `name` for a sandbox: `None` for [`DEFAULT_TEMPLATE`] (nothing to build),
    /// else the built template, built now when it is not yet (which can take minutes the
    /// first time; concurrent callers share one build).
    pub async fn prepare(&self, name: &str) -> Result<Option<Prepared>, TemplateError> {
        if name == DEFAULT_TEMPLATE {
            return Ok(None);
        }
        let recipe = Recipe::named(name)?;
        let python = self.python().await?;
        let quiet: ProgressFn = Arc::new(|_: Progress<'_>| {});
        let template = self.store.ensure(&recipe, &python, quiet).await?;
        Ok(Some(Prepared {
            name: template.name.clone(),
            env: template.sandbox_env(),
            host_dir: template.dir,
        }))
    }

    /// Starts building the `[templates] prebuild` templates in the background. A failure is
    /// logged; the next sandbox asking for the template tries again and reports it.
    pub fn start_prebuild(self: &Arc<Self>) {
        for name in self.prebuild.clone() {
            let me = self.clone();
            tokio::spawn(async move {
                match me.prepare(&name).await {
                    Ok(Some(t)) => {
                        tracing::info!(template = %name, dir = %t.host_dir.display(), "template ready")
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(
                        template = %name,
                        error = %e,
                        "building a template at start failed; a sandbox asking for it will try again"
                    ),
                }
            });
        }
    }
}

/// The template store of a server with `config` (also what `execbox template` works on).
pub fn store(config: &ServerConfig) -> TemplateStore {
    TemplateStore::new(
        config.templates_dir(),
        Duration::from_secs(config.templates.build_timeout_secs.max(1)),
    )
}

/// The environment of a sandbox: the client's, with a template's added. A `PYTHONPATH` of the
/// client's own keeps its entries first.
pub fn merged_env(
    mut env: Vec<(String, String)>,
    template: Option<&Prepared>,
) -> Vec<(String, String)> {
    let Some(t) = template else { return env };
    for (k, v) in &t.env {
        match env.iter_mut().find(|(ek, _)| ek == k) {
            Some((_, ev)) if k == "PYTHONPATH" && !ev.is_empty() => *ev = format!("{ev}:{v}"),
            Some(_) => {}
            None => env.push((k.clone(), v.clone())),
        }
    }
    env
}

/// Every template a sandbox may ask for under `config`, and whether it is built (for
/// `execbox doctor`): the host's runtimes, then each known recipe, then the operator's aliases.
pub fn describe(config: &ServerConfig) -> Vec<String> {
    let mut out = vec![format!(
        "{DEFAULT_TEMPLATE} (the host's runtimes, nothing to build)"
    )];
    let store = store(config);
    let python = Python::discover(config.python.as_deref());
    for name in Recipe::known() {
        let state = match (&python, Recipe::named(name)) {
            (Ok(python), Ok(recipe)) => match store.find(&recipe, python) {
                Some(t) => format!(
                    "built, {} packages, {} MiB in {}",
                    t.manifest.installed.len(),
                    t.manifest.size_bytes >> 20,
                    t.dir.display()
                ),
                None => format!(
                    "not built yet: built at its first use, or now with `execbox template build {name}`"
                ),
            },
            (Err(e), _) => format!("cannot be built: {e}"),
            (_, Err(e)) => e.to_string(),
        };
        out.push(format!("{name} ({state})"));
    }
    for (alias, target) in &config.images {
        if alias != target && alias != DEFAULT_TEMPLATE {
            out.push(format!("{alias} → {target}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_adds_to_the_clients_environment() {
        let t = Prepared {
            name: "t".into(),
            host_dir: PathBuf::from("/x"),
            env: vec![
                ("PYTHONPATH".into(), "/opt/execbox/template/site".into()),
                ("EXECBOX_TEMPLATE".into(), "/opt/execbox/template".into()),
            ],
        };
        let env = merged_env(vec![("A".into(), "1".into())], Some(&t));
        assert_eq!(env.len(), 3);
        let env = merged_env(vec![("PYTHONPATH".into(), "/mine".into())], Some(&t));
        assert_eq!(env[0].1, "/mine:/opt/execbox/template/site");
        assert_eq!(merged_env(vec![], None), vec![]);
    }
}
