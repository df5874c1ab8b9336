//! The `execbox` command line: parses arguments and hands over to the library crates.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod image_cli;
mod template_cmd;
mod volume_cli;

#[derive(Parser)]
#[command(
    name = "execbox",
    version,
    about = "Run untrusted code in isolated Linux sandboxes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the server's settings come from: the configuration file, then these (each also from
/// its environment variable).
#[derive(clap::Args)]
struct Settings {
    /// Configuration file (TOML).
    #[arg(long, env = "EXECBOX_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address (over the configuration's `listen`; default 127.0.0.1:8080).
    #[arg(long, env = "EXECBOX_LISTEN")]
    listen: Option<SocketAddr>,
    /// State directory (over the configuration's `state_dir`; default /var/lib/execbox).
    #[arg(long, env = "EXECBOX_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// API key (also from EXECBOX_API_KEY).
    #[arg(long, env = "EXECBOX_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Where built templates are kept (the configuration's `[templates] dir`; default
    /// `<state-dir>/templates`).
    #[arg(long, env = "EXECBOX_TEMPLATES_DIR")]
    templates_dir: Option<PathBuf>,
    /// Registries sandboxes' images may come from, comma-separated (`host[:port]`; a host
    /// alone allows every port): replaces the configuration's
    /// `[image_store] allowed_registries`.
    #[arg(long, env = "EXECBOX_ALLOWED_REGISTRIES", value_delimiter = ',')]
    allowed_registries: Option<Vec<String>>,
}

impl Settings {
    /// The configuration in force: the file's, with what the command line (or its
    /// environment variables) gives over it.
    fn resolve(self) -> Result<execbox_server::ServerConfig, String> {
        let mut cfg = match &self.config {
            Some(path) => execbox_server::ServerConfig::from_file(path)?,
            None => execbox_server::ServerConfig::default(),
        };
        if let Some(listen) = self.listen {
            cfg.listen = listen;
        }
        if let Some(dir) = self.state_dir {
            cfg.state_dir = dir;
        }
        if let Some(dir) = self.templates_dir {
            cfg.templates.dir = Some(dir);
        }
        if let Some(registries) = self.allowed_registries {
            cfg.image_store.allowed_registries = registries;
        }
        if let Some(k) = self.api_key.filter(|k| !k.is_empty()) {
            cfg.api_keys.push(k);
        }
        Ok(cfg)
    }
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration (TOML; keys and passwords masked).
    Show {
        #[command(flatten)]
        settings: Settings,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Make a new API key: prints the key once, and the configuration line holding its salted
    /// hash (the key itself is stored nowhere).
    New {
        /// The tenant the key belongs to (`default`: the `api_keys` list).
        #[arg(long, default_value = execbox_server::config::DEFAULT_TENANT)]
        tenant: String,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP APIs.
    Serve {
        #[command(flatten)]
        settings: Settings,
        /// Log format: `text` (colours only on a terminal) or `json` (one object per line).
        #[arg(long, env = "EXECBOX_LOG_FORMAT", value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// The effective configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// API keys stored as salted hashes.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Run code once in a fresh sandbox, without a server.
    Run {
        /// Language of the code.
        #[arg(long, value_enum, default_value = "python")]
        lang: Lang,
        /// The code (or `--file`).
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        code: Option<String>,
        /// A file holding the code.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Memory limit (Kubernetes quantity, e.g. 512Mi, 2Gi).
        #[arg(long, default_value = execbox_server::oneshot::DEFAULT_MEMORY)]
        memory: String,
        /// CPU limit (Kubernetes quantity, e.g. 1, 500m).
        #[arg(long, default_value = execbox_server::oneshot::DEFAULT_CPUS)]
        cpus: String,
        /// Most processes and threads at once.
        #[arg(long, default_value_t = execbox_server::oneshot::DEFAULT_PIDS)]
        pids: u64,
        /// Timeout in seconds.
        #[arg(long, default_value_t = execbox_server::oneshot::DEFAULT_TIMEOUT_SECS)]
        timeout: u64,
    },
    /// Show every isolation layer (active, missing or degraded), the runtimes and the
    /// templates sandboxes get, for the configuration in force.
    Doctor {
        #[command(flatten)]
        settings: Settings,
    },
    /// Manage the image store (OCI images): ls, pull, import, rm, gc.
    Image(image_cli::ImageArgs),
    /// Manage named volumes: ls, rm.
    Volume(volume_cli::VolumeArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Build, list and remove templates (images built from package registries).
    Template(template_cmd::TemplateArgs),
    /// The in-sandbox agent (started by the server as PID 1 of a sandbox).
    #[command(hide = true)]
    Agent,
}

#[derive(Clone, Copy, ValueEnum)]
enum Lang {
    Python,
    Javascript,
    Bash,
}

/// How the server writes its log.
#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The server's log on stderr: text (coloured only on a terminal, so log files stay plain) or
/// JSON lines; `info` unless `RUST_LOG` says otherwise.
fn init_server_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Commands with a display of their own log warnings only (unless `RUST_LOG` says more).
fn init_tracing_quiet() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// The agent logs to a pipe the server reads and forwards: no colours, and a write that fails
/// (a server restarted since, whose end of the pipe is gone) is dropped, never reported on that
/// same stderr (tracing's own report would panic there).
fn init_agent_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_ansi(false)
        .without_time()
        .log_internal_errors(false)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Agent => {
            init_agent_tracing();
            match execbox_agent::run() {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("execbox agent: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Doctor { settings } => match settings.resolve() {
            Ok(cfg) => doctor(&cfg),
            Err(e) => {
                eprintln!("execbox: {e}");
                ExitCode::from(2)
            }
        },
        Command::Image(args) => image_cli::run(args),
        Command::Volume(args) => volume_cli::run(args),
        Command::Key {
            command: KeyCommand::New { tenant },
        } => new_key(&tenant),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "execbox",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Template(args) => {
            init_tracing_quiet();
            template_cmd::run(args)
        }
        Command::Config {
            command: ConfigCommand::Show { settings },
        } => match settings.resolve() {
            Ok(cfg) => match cfg.masked_toml() {
                Ok(text) => {
                    print!("{text}");
                    // Where the secrets key comes from and its fingerprint, never the key.
                    let secrets = execbox_server::secrets::describe(
                        &cfg.state_dir,
                        cfg.secrets.key_file.as_deref(),
                    )
                    .unwrap_or_else(|e| format!("PROBLEM: {e}"));
                    println!("\n# secrets at rest: {secrets}");
                    // The state of TLS, as a TOML comment: the output stays a configuration.
                    println!("\n# tls: {}", tls_summary(&cfg));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("execbox: {e}");
                    ExitCode::from(1)
                }
            },
            Err(e) => {
                eprintln!("execbox: {e}");
                ExitCode::from(2)
            }
        },
        Command::Serve {
            settings,
            log_format,
        } => {
            init_server_tracing(log_format);
            let cfg = match settings.resolve() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("execbox: {e}");
                    return ExitCode::from(2);
                }
            };
            // Before any thread exists: the namespace belongs to the calling thread.
            if let Err(e) = execbox_jail::rootfs::enter_private_mount_namespace() {
                tracing::warn!(error = %e, "no private mount namespace: sandboxes see the state directory's path in their mount table");
            }
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("execbox: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(execbox_server::serve(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("execbox: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Run {
            lang,
            code,
            file,
            memory,
            cpus,
            pids,
            timeout,
        } => {
            let lang = match lang {
                Lang::Python => execbox_server::oneshot::Lang::Python,
                Lang::Javascript => execbox_server::oneshot::Lang::JavaScript,
                Lang::Bash => execbox_server::oneshot::Lang::Bash,
            };
            let limits = execbox_server::oneshot::RunLimits {
                memory,
                cpus,
                pids,
                timeout_secs: timeout,
            };
            let code = match (code, file) {
                (Some(code), _) => code,
                (None, Some(path)) => match std::fs::read_to_string(&path) {
                    Ok(code) => code,
                    Err(e) => {
                        eprintln!("execbox run: cannot read {}: {e}", path.display());
                        return ExitCode::from(125);
                    }
                },
                (None, None) => {
                    eprintln!("execbox run: give the code or --file");
                    return ExitCode::from(125);
                }
            };
            // Standard input goes to the program when it is not a terminal (a pipe, a file).
            let stdin = {
                use std::io::{IsTerminal, Read};
                let input = std::io::stdin();
                if input.is_terminal() {
                    None
                } else {
                    let mut text = String::new();
                    match input.lock().read_to_string(&mut text) {
                        Ok(_) => Some(text),
                        Err(e) => {
                            eprintln!("execbox run: reading standard input: {e}");
                            return ExitCode::from(125);
                        }
                    }
                }
            };
            match execbox_server::oneshot::run(lang, &code, stdin, &limits) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("execbox run: {e}");
                    ExitCode::from(125)
                }
            }
        }
    }
}

fn doctor(cfg: &execbox_server::ServerConfig) -> ExitCode {
    let layers =
        execbox_server::doctor::check(cfg.require_seccomp, cfg.require_landlock, &cfg.cgroup_base);
    let mut failed = false;
    for l in &layers {
        let state = match (l.ok, l.degraded) {
            (true, false) => "active",
            (true, true) => "degraded",
            (false, _) if l.required => {
                failed = true;
                "MISSING"
            }
            (false, _) => "missing (optional)",
        };
        println!("{:<22} {:<20} {}", l.name, state, l.detail);
    }
    // Disk-backed storage, tried for real in a scratch directory: optional (without it,
    // writable layers live in memory), unless `[storage] medium = "disk"` asks for it.
    let scratch = std::env::temp_dir().join(format!("execbox-doctor-{}", std::process::id()));
    let storage = execbox_jail::storage::probe(&scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    match storage {
        Ok(()) => println!(
            "{:<22} {:<20} per-sandbox ext4 disks: loop devices, mke2fs, the new mount API, id-mapped mounts",
            "storage:disk", "active"
        ),
        Err(why) => println!(
            "{:<22} {:<20} {why}: writable layers live in memory (refused with [storage] medium = \"disk\")",
            "storage:disk", "missing (optional)"
        ),
    }
    // What sandboxes of the host-runtimes template can run.
    let runtimes = execbox_jail::runtimes::discover(None);
    let names: Vec<String> = runtimes
        .iter()
        .map(|r| format!("{} ({})", r.name, r.executable.display()))
        .collect();
    println!(
        "{:<22} {:<20} {}",
        "runtimes",
        if names.is_empty() {
            "none found"
        } else {
            "found"
        },
        if names.is_empty() {
            "no python3, node, java or bash on PATH: code contexts will be refused".to_string()
        } else {
            names.join(", ")
        }
    );
    println!(
        "{:<22} {:<20} {}",
        "templates",
        "found",
        execbox_server::templates::describe(cfg).join(", ")
    );
    // Never the key itself: where it comes from and its fingerprint.
    match execbox_server::secrets::describe(&cfg.state_dir, cfg.secrets.key_file.as_deref()) {
        Ok(how) => println!("{:<22} {:<20} {how}", "secrets at rest", "active"),
        Err(why) => {
            failed = true;
            println!("{:<22} {:<20} {why}", "secrets at rest", "MISSING");
        }
    }
    use execbox_server::tls::Health;
    let now = time::OffsetDateTime::now_utc();
    let (state, detail, tls_failed) = match execbox_server::tls::health(&cfg.tls, now) {
        Health::Off => (
            "off",
            if cfg.listen.ip().is_loopback() {
                "plain HTTP (loopback listener)".to_string()
            } else {
                format!(
                    "plain HTTP on {}: traffic, API keys included, is unencrypted",
                    cfg.listen
                )
            },
            false,
        ),
        Health::Ok(d) => ("on", d, false),
        Health::Expiring(d) => ("on, EXPIRING SOON", d, false),
        Health::Failed(d) => ("FAILED", d, true),
    };
    println!("{:<22} {:<20} {}", "tls", state, detail);
    if failed {
        println!("\nA required layer is missing: execbox refuses to create sandboxes.");
        ExitCode::from(1)
    } else if tls_failed {
        println!("\n[tls] is not usable: execbox refuses to start.");
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// `execbox key new`: the key, once, and the line to paste into the configuration.
fn new_key(tenant: &str) -> ExitCode {
    let valid = !tenant.is_empty()
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid {
        eprintln!("execbox: --tenant: {tenant:?} is not a tenant name (letters, digits, - and _)");
        return ExitCode::from(2);
    }
    let (key, hash) = match execbox_server::api_keys::new_key() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("execbox: {e}");
            return ExitCode::from(1);
        }
    };
    println!("# API key of tenant {tenant:?}, shown only this once:");
    println!("{key}");
    if tenant == execbox_server::config::DEFAULT_TENANT {
        println!(
            "# Add its hash to the configuration file, at the top level (with any other keys):"
        );
        println!("api_keys = [\"{hash}\"]");
    } else {
        println!("# Add its hash to the configuration file, under [tenants] (with the tenant's other keys):");
        println!("{tenant} = [\"{hash}\"]");
    }
    ExitCode::SUCCESS
}

/// One line on TLS for `config show`: off, or the certificate with its expiry.
fn tls_summary(cfg: &execbox_server::ServerConfig) -> String {
    use execbox_server::tls::Health;
    match execbox_server::tls::health(&cfg.tls, time::OffsetDateTime::now_utc()) {
        Health::Off => "off (plain HTTP)".into(),
        Health::Ok(d) => format!("on: {d}"),
        Health::Expiring(d) => format!("on, expiring soon: {d}"),
        Health::Failed(d) => format!("FAILED: {d}"),
    }
}
