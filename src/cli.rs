//! Command-line interface (clap).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "tether",
    version,
    about = "Realtime two-way sync of local SQLite databases through a hub"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sync daemon: one session per configured database.
    Daemon {
        /// Path of tether.toml.
        #[arg(long, short, default_value = "/etc/tether/tether.toml")]
        config: PathBuf,
    },
    /// Run the hub, or manage its tokens.
    Hub(HubArgs),
    /// Demonstrate sync with a hub and two daemons on temporary files.
    Demo,
    /// Measure bulk throughput and single-row latency on loopback.
    Bench {
        /// Rows inserted in one transaction for the bulk test.
        #[arg(long, default_value_t = 100_000)]
        rows: usize,
        /// Single-row commits for the latency test.
        #[arg(long, default_value_t = 1_000)]
        commits: usize,
        /// Number of runs; the medians are printed at the end.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// One JSON object per run.
        #[arg(long)]
        json: bool,
    },
    /// Check a config file and exit (0 = valid).
    Check {
        /// tether.toml or hub.toml.
        config: PathBuf,
        /// The file is a hub config.
        #[arg(long)]
        hub: bool,
    },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct HubArgs {
    /// Path of hub.toml.
    #[arg(long, short, default_value = "/etc/tether/hub.toml")]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Option<HubCommand>,
}

#[derive(Debug, Subcommand)]
pub enum HubCommand {
    /// Print a fresh random token and the [[token]] block for hub.toml.
    NewToken {
        /// A name for the token (who or what uses it).
        #[arg(long)]
        name: String,
        /// Dataset the token may sync ("*" for all).
        #[arg(long)]
        dataset: String,
        /// The token may download but not upload.
        #[arg(long)]
        read_only: bool,
    },
}
