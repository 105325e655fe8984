//! The `waterfall` command line.
//!
//! Human output goes to stderr, machine output (`--json`) to stdout.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// waterfall: decentralized live streaming through a relay tree of peers.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print this node's peer id, creating its identity key on first run.
    Keygen {
        /// Data directory holding identity.key (mode 0600).
        #[arg(long, env = "WATERFALL_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
}

/// `$WATERFALL_DATA_DIR`, else `$XDG_DATA_HOME/waterfall`, else `~/.local/share/waterfall`.
fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("waterfall");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".local/share/waterfall");
    }
    PathBuf::from(".waterfall")
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Keygen { data_dir } => {
            let dir = data_dir.unwrap_or_else(default_data_dir);
            let id = waterfall::crypto::Identity::load_or_create(&dir)
                .with_context(|| format!("loading identity from {}", dir.display()))?;
            eprintln!("identity: {}", dir.join("identity.key").display());
            println!("{}", id.peer_id());
        }
    }
    Ok(())
}
