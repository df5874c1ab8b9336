//! `execbox volume …`: the named volumes of a state directory (the volumes themselves are
//! `execbox_server::volumes`; this only parses arguments and shows results).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use execbox_server::config::VolumesConfig;
use execbox_server::registry::Registry;
use execbox_server::volumes::{self, Volumes};

#[derive(Args)]
pub struct VolumeArgs {
    /// State directory (named volumes are its `volumes/`).
    #[arg(long, default_value = "/var/lib/execbox", global = true)]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: VolumeCommand,
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// List the named volumes: tenant, claim, size, space used.
    Ls,
    /// Remove a named volume and its files; refused while a sandbox uses it.
    Rm {
        /// Claim name.
        claim: String,
        /// Tenant owning it.
        #[arg(long, default_value = "default")]
        tenant: String,
    },
}

pub fn run(args: VolumeArgs) -> ExitCode {
    let store = Volumes::new(&args.state_dir, VolumesConfig::default());
    match args.command {
        VolumeCommand::Ls => {
            println!(
                "{:<16} {:<32} {:>10} {:>10}",
                "TENANT", "CLAIM", "SIZE", "USED"
            );
            for v in store.list() {
                println!(
                    "{:<16} {:<32} {:>10} {:>10}",
                    v.tenant,
                    v.claim,
                    mib(v.size_bytes),
                    mib(v.used_bytes)
                );
            }
            ExitCode::SUCCESS
        }
        VolumeCommand::Rm { claim, tenant } => {
            // The records of the state directory say which sandboxes use which volume.
            let in_use = volumes::in_use(&Registry::load_public(&args.state_dir).all());
            match store.remove(&tenant, &claim, &in_use) {
                Ok(()) => {
                    println!("removed volume {claim} of tenant {tenant}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("execbox volume rm: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1}M", bytes as f64 / (1 << 20) as f64)
}
