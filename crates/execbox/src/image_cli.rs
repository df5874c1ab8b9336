//! `execbox image …`: the image store of a state directory, from the command line (the store
//! itself is `execbox_image::ImageStore`; this only parses arguments and shows results).

use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use clap::{Args, Subcommand};
use execbox_image::{Credentials, ImageStore, PullEvent, StoreConfig};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

#[derive(Args)]
pub struct ImageArgs {
    /// State directory (the store is its `images/`).
    #[arg(long, default_value = "/var/lib/execbox", global = true)]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// List the stored images.
    Ls,
    /// Pull an image from its registry (again, when stored: a tag may have moved).
    Pull {
        /// Image reference (`python:3.12-slim`, `registry:5000/team/app:1`, `name@sha256:…`).
        reference: String,
        /// User name for the registry.
        #[arg(long, requires = "password_stdin")]
        username: Option<String>,
        /// Read the registry password (or token) from standard input.
        #[arg(long, requires = "username")]
        password_stdin: bool,
        /// A registry (`host[:port]`) to reach in plain HTTP (loopback ones always may be).
        #[arg(long = "insecure-registry")]
        insecure_registries: Vec<String>,
    },
    /// Import an image from an OCI layout directory or an OCI archive (a tar of one).
    Import {
        /// The layout directory or archive file.
        path: PathBuf,
        /// Reference to store it as.
        #[arg(long)]
        name: String,
        /// Which image of the layout (its `org.opencontainers.image.ref.name`); needed when it
        /// holds more than one.
        #[arg(long)]
        tag: Option<String>,
    },
    /// Remove an image (its layers go at the next `gc`). A running server's sandboxes are not
    /// known here: remove images in use through the server.
    Rm {
        /// Image reference.
        reference: String,
    },
    /// Remove the layers and blobs no stored image uses.
    Gc,
}

/// Ids of the images the sandboxes recorded in `state_dir` use: `rm` refuses them and `gc`
/// keeps their layers (a running sandbox's root is made of them).
fn in_use(state_dir: &std::path::Path) -> HashSet<String> {
    execbox_server::images::in_use(
        &execbox_server::registry::Registry::load_public(state_dir).all(),
    )
}

pub fn run(args: ImageArgs) -> ExitCode {
    // Per-layer logs would break the progress bars: warnings only unless RUST_LOG says more.
    crate::init_tracing_quiet();
    let root = args.state_dir.join("images");
    let mut config = StoreConfig::default();
    if let ImageCommand::Pull {
        insecure_registries,
        ..
    } = &args.command
    {
        config.insecure_registries = insecure_registries.clone();
    }
    let store = match ImageStore::open(&root, config) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    match args.command {
        ImageCommand::Ls => {
            list(&store);
            ExitCode::SUCCESS
        }
        ImageCommand::Pull {
            reference,
            username,
            password_stdin,
            ..
        } => {
            let auth = match (username, password_stdin) {
                (Some(username), true) => match read_password() {
                    Ok(password) => Some(Credentials { username, password }),
                    Err(e) => return fail(format!("reading the password from stdin: {e}")),
                },
                _ => None,
            };
            pull(&store, &reference, auth.as_ref())
        }
        ImageCommand::Import { path, name, tag } => {
            let imported = if path.is_dir() {
                store.import_oci_layout(&path, tag.as_deref(), &name)
            } else {
                store.import_oci_archive(&path, tag.as_deref(), &name)
            };
            match imported {
                Ok(img) => {
                    println!("{} {}", img.reference, img.id);
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        ImageCommand::Rm { reference } => {
            match store.remove(&reference, &in_use(&args.state_dir)) {
                Ok(()) => {
                    println!("removed {reference} (its layers go at the next `execbox image gc`)");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        ImageCommand::Gc => match store.gc(&in_use(&args.state_dir)) {
            Ok(r) => {
                println!(
                    "removed {} layers and {} blobs, {} freed",
                    r.layers_removed,
                    r.blobs_removed,
                    human_bytes(r.bytes_freed)
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
    }
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("execbox image: {e}");
    ExitCode::from(1)
}

fn read_password() -> std::io::Result<String> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

fn list(store: &ImageStore) {
    let images = store.list();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let width = images
        .iter()
        .map(|i| i.reference.len())
        .max()
        .unwrap_or(0)
        .max(9);
    println!(
        "{:<width$}  {:<12}  {:>6}  {:>9}  STORED",
        "REFERENCE", "ID", "LAYERS", "SIZE"
    );
    for i in images {
        let id = i.id.strip_prefix("sha256:").unwrap_or(&i.id);
        println!(
            "{:<width$}  {:<12}  {:>6}  {:>9}  {}",
            i.reference,
            &id[..id.len().min(12)],
            i.layers,
            human_bytes(i.size),
            age(now.saturating_sub(i.stored_at))
        );
    }
}

fn pull(store: &ImageStore, reference: &str, auth: Option<&Credentials>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(e),
    };
    let bars = MultiProgress::new();
    let layers: Mutex<HashMap<usize, ProgressBar>> = Mutex::default();
    let style =
        ProgressStyle::with_template("{prefix} {bar:30} {bytes:>10}/{total_bytes:<10} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
    let progress = |ev: &PullEvent| {
        let mut layers = layers.lock().unwrap_or_else(|e| e.into_inner());
        match ev {
            PullEvent::Resolved {
                manifest_digest,
                layers: n,
                bytes,
                ..
            } => {
                let _ = bars.println(format!(
                    "{reference}: {manifest_digest}, {n} layers, {}",
                    human_bytes(*bytes)
                ));
            }
            PullEvent::LayerStarted {
                index,
                count,
                digest,
                size,
            } => {
                let bar = bars.add(ProgressBar::new(*size));
                bar.set_style(style.clone());
                bar.set_prefix(format!("{}/{count} {}", index + 1, short(digest)));
                bar.enable_steady_tick(Duration::from_millis(200));
                layers.insert(*index, bar);
            }
            PullEvent::LayerProgress {
                index, received, ..
            } => {
                if let Some(bar) = layers.get(index) {
                    bar.set_position(*received);
                }
            }
            PullEvent::LayerUnpacking { index, .. } => {
                if let Some(bar) = layers.get(index) {
                    bar.set_message("unpacking");
                }
            }
            PullEvent::LayerDone {
                index,
                count,
                digest,
                cached,
            } => match layers.remove(index) {
                Some(bar) => bar.finish_with_message("done"),
                None if *cached => {
                    let _ = bars.println(format!(
                        "{}/{count} {} already stored",
                        index + 1,
                        short(digest)
                    ));
                }
                None => {}
            },
            _ => {}
        }
    };
    match rt.block_on(store.pull(reference, auth, &progress)) {
        Ok(img) => {
            println!("{} {}", img.reference, img.id);
            ExitCode::SUCCESS
        }
        Err(e) => {
            for (_, bar) in layers.lock().unwrap_or_else(|e| e.into_inner()).drain() {
                bar.abandon();
            }
            fail(e)
        }
    }
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn age(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs} s ago"),
        60..=3599 => format!("{} min ago", secs / 60),
        3600..=172_799 => format!("{} h ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}
