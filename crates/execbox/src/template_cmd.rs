//! `execbox template …`: build, list and remove the templates a server uses (its
//! `[templates] dir`), with a progress display for builds.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use execbox_image::template::{Progress, Python, Recipe, TemplateStore};
use execbox_server::ServerConfig;

/// `execbox template`.
#[derive(Args)]
pub struct TemplateArgs {
    #[command(subcommand)]
    action: Action,
    #[command(flatten)]
    place: Place,
}

/// Which store, and for which Python: as the server with the same options would use.
#[derive(Args)]
struct Place {
    /// State directory of the server (templates in its `templates/`).
    #[arg(long, global = true, default_value = "/var/lib/execbox")]
    state_dir: PathBuf,
    /// Templates directory (the server's `[templates] dir`); overrides --state-dir.
    #[arg(long, global = true, env = "EXECBOX_TEMPLATES_DIR")]
    templates_dir: Option<PathBuf>,
    /// The server's configuration file (its `python` and `[templates]`).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Action {
    /// Build a template now (a server builds it on first use otherwise).
    Build {
        /// Template name (`code-interpreter`).
        name: String,
    },
    /// List the templates built.
    Ls,
    /// Remove the builds of a template.
    Rm {
        /// Template name.
        name: String,
        /// Keep the build the server would use now (same recipe and Python); remove older ones.
        #[arg(long)]
        old: bool,
        /// Remove even builds that running sandboxes have mounted.
        #[arg(long)]
        force: bool,
    },
}

/// Runs `execbox template …`.
pub fn run(args: TemplateArgs) -> ExitCode {
    let config = match &args.place.config {
        Some(path) => match ServerConfig::from_file(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("execbox template: {e}");
                return ExitCode::from(2);
            }
        },
        None => ServerConfig::default(),
    };
    let mut config = config;
    config.state_dir = args.place.state_dir.clone();
    if let Some(dir) = &args.place.templates_dir {
        config.templates.dir = Some(dir.clone());
    }
    let store = execbox_server::templates::store(&config);
    let result = match args.action {
        Action::Build { name } => build(&store, &config, &name),
        Action::Ls => list(&store),
        Action::Rm { name, old, force } => remove(&store, &config, &name, old, force),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("execbox template: {e}");
            ExitCode::from(1)
        }
    }
}

fn build(store: &TemplateStore, config: &ServerConfig, name: &str) -> Result<(), String> {
    let recipe = Recipe::named(name).map_err(|e| e.to_string())?;
    let python = Python::discover(config.python.as_deref()).map_err(|e| e.to_string())?;
    if let Some(t) = store.find(&recipe, &python) {
        println!("{name} is built: {}", t.dir.display());
        return Ok(());
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} {prefix} {wide_msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_prefix(format!("{name}:"));
    let plain = bar.is_hidden();
    let collected = Mutex::new(0usize);
    let started = Instant::now();
    let progress = |p: Progress<'_>| {
        let line = p.to_string();
        match p {
            Progress::Waiting | Progress::Step(_) => {
                if plain {
                    eprintln!("{name}: {line}");
                } else {
                    bar.println(format!("{name}: {line}"));
                }
            }
            Progress::Pip(l) => {
                let mut n = collected.lock().unwrap_or_else(|p| p.into_inner());
                if l.starts_with("Collecting ") {
                    *n += 1;
                }
                bar.set_message(format!("[{n} packages] {}", l.trim()));
                // Without a terminal, the milestones only.
                if plain
                    && (l.starts_with("Collecting ")
                        || l.starts_with("Installing ")
                        || l.starts_with("Successfully ")
                        || l.starts_with("ERROR"))
                {
                    eprintln!("{name}: {}", l.trim());
                }
            }
        }
    };
    let built = store.build(&recipe, &python, &progress);
    bar.finish_and_clear();
    let t = built.map_err(|e| e.to_string())?;
    println!(
        "{name} built in {:.0} s: {} packages, {} MiB, {}",
        started.elapsed().as_secs_f64(),
        t.manifest.installed.len(),
        t.manifest.size_bytes >> 20,
        t.dir.display()
    );
    Ok(())
}

fn list(store: &TemplateStore) -> Result<(), String> {
    let all = store.list().map_err(|e| e.to_string())?;
    if all.is_empty() {
        println!("no templates in {}", store.root().display());
        return Ok(());
    }
    println!(
        "{:<18} {:<16} {:>8} {:>8} {:<8} DIR",
        "NAME", "HASH", "PACKAGES", "MiB", "PYTHON"
    );
    for t in all {
        let version = t
            .manifest
            .python
            .version
            .split_whitespace()
            .next()
            .unwrap_or("");
        println!(
            "{:<18} {:<16} {:>8} {:>8} {:<8} {}",
            t.name,
            &t.hash[..16.min(t.hash.len())],
            t.manifest.installed.len(),
            t.manifest.size_bytes >> 20,
            version,
            t.dir.display()
        );
    }
    Ok(())
}

fn remove(
    store: &TemplateStore,
    config: &ServerConfig,
    name: &str,
    old: bool,
    force: bool,
) -> Result<(), String> {
    let keep = if old {
        let recipe = Recipe::named(name).map_err(|e| e.to_string())?;
        let python = Python::discover(config.python.as_deref()).map_err(|e| e.to_string())?;
        Some(execbox_image::template::recipe_hash(&recipe, &python))
    } else {
        None
    };
    let removed = store
        .remove(name, keep.as_deref(), force)
        .map_err(|e| e.to_string())?;
    if removed.is_empty() {
        println!("nothing to remove");
    }
    for dir in removed {
        println!("removed {}", dir.display());
    }
    Ok(())
}
