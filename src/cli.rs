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
    /// Config file: tether.toml for `daemon` and the control commands
    /// (they read its `control_socket`), hub.toml for `hub`; the file
    /// `init` and `hub init` write (default ./tether.toml, ./hub.toml).
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    /// The daemon's control socket (overrides --config and TETHER_SOCKET).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Log format of `daemon`, `hub` and `once` (stderr).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Which direction(s) a command applies to; neither flag means both.
#[derive(Debug, Args, Clone, Copy)]
pub struct Dirs {
    /// Only the upload direction.
    #[arg(long)]
    pub upload: bool,
    /// Only the download direction.
    #[arg(long)]
    pub download: bool,
}

/// How long a one-answer control command waits for the daemon.
#[derive(Debug, Args, Clone, Copy)]
pub struct Patience {
    /// Give up when the daemon has not answered within this long ("5s",
    /// "1m"; default 30s, reload 2m): exit 75.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<std::time::Duration>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sync daemon: one session per configured database
    /// (config: /etc/tether/tether.toml unless --config).
    Daemon,
    /// Run the hub, or manage its tokens (config: /etc/tether/hub.toml unless --config).
    Hub(HubArgs),
    /// Show each database's connection and session state, pending changes,
    /// cursor, hub head, last upload and last error.
    Status {
        db: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        patience: Patience,
    },
    /// Pause syncing a database (both directions unless --upload/--download).
    /// Local writes keep being captured.
    Pause {
        db: String,
        #[command(flatten)]
        dirs: Dirs,
        #[command(flatten)]
        patience: Patience,
    },
    /// Resume a paused database.
    Resume {
        db: String,
        #[command(flatten)]
        dirs: Dirs,
        #[command(flatten)]
        patience: Patience,
    },
    /// Make every session that is disconnected or waiting in backoff try now.
    Reconnect {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        patience: Patience,
    },
    /// Wait until local changes are on the hub (upload) and/or the hub's
    /// changes are here (download). Exit 3 on timeout.
    Wait {
        db: String,
        #[command(flatten)]
        dirs: Dirs,
        /// Give up after this long ("30s", "2m"): exit 3, the transfer goes
        /// on. Without it the wait has no end.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
        #[arg(long)]
        json: bool,
    },
    /// Show transfer progress until the work outstanding now is done.
    Progress {
        db: String,
        #[command(flatten)]
        dirs: Dirs,
        /// Keep reporting until interrupted.
        #[arg(long)]
        follow: bool,
        #[arg(long)]
        json: bool,
    },
    /// Print session events (connection and state changes, uploads,
    /// downloads, errors) until interrupted.
    Watch {
        db: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Re-read the daemon's config file and apply it (same as SIGHUP):
    /// new databases start, removed ones stop, changed ones restart,
    /// untouched ones keep their connections. An invalid file is refused.
    Reload {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        patience: Patience,
    },
    /// Print the daemon's metrics (Prometheus / OpenMetrics text): the
    /// same figures `metrics_listen` serves over HTTP.
    Metrics {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        patience: Patience,
    },
    /// List the hub's changes that a database refused (a UNIQUE or CHECK
    /// constraint, a trigger, a type in a STRICT table, a table not synced
    /// here), with the reason. Sync goes on without them.
    Held {
        db: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        patience: Patience,
    },
    /// Apply a database's held changes again now (after fixing the cause)
    /// and print how many applied.
    Retry {
        db: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        patience: Patience,
    },
    /// Ask the running daemon to upload and download now, and wait until
    /// it has: says on stderr what it waits for.
    Sync {
        db: String,
        /// Give up after this long ("30s", "10m"; default 5m): exit 3, the
        /// transfer goes on.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
        #[arg(long)]
        json: bool,
    },
    /// Sync once without a daemon (for timers): for each database download
    /// everything, upload everything, close and print a summary. Exits 1 if
    /// any database failed.
    Once {
        /// Databases to sync (all when none given).
        dbs: Vec<String>,
        /// Give up after this long ("30s", "10m"; default 5m): the
        /// databases not done by then are reported FAILED, exit 1.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
        timeout: std::time::Duration,
        #[arg(long)]
        json: bool,
    },
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
    /// Run seeded fault schedules (dropped, stalled, delayed and cut frames;
    /// daemons and hub killed with SIGKILL) against a real hub and three
    /// daemons while apps write, then check that every database equals the
    /// hub and account for every write. Exits 1 if a write was lost
    /// wrongly, a database diverged or a change was stored twice.
    Reliability {
        /// Number of schedules; schedule i has seed S + i.
        #[arg(long, default_value_t = 10)]
        schedules: u64,
        /// First seed (random when not given); a failing schedule prints
        /// its seed to replay it.
        #[arg(long)]
        seed: Option<u64>,
        /// How long the apps write while faults happen, per schedule.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "8s")]
        writing: std::time::Duration,
        /// One JSON object per schedule, then one for the run.
        #[arg(long)]
        json: bool,
    },
    /// Check a config file against reality and exit (0 = valid, 78 =
    /// invalid): keys and values, then that each database and table exists
    /// with a primary key and the token file holds one token (a daemon
    /// config), or that the store's directory is writable (a hub config).
    Check {
        /// tether.toml or hub.toml.
        file: PathBuf,
        /// The file is a hub config.
        #[arg(long)]
        hub: bool,
        /// Check keys and values only, not the files they name (what
        /// tether.service runs before starting: the daemon waits for a
        /// database that is missing at start).
        #[arg(long)]
        keys_only: bool,
    },
    /// Write a daemon config (tether.toml, or the file given with --config)
    /// syncing one database through a hub. Refuses to overwrite a file
    /// unless --force.
    Init(crate::setup::InitArgs),
    /// Print a shell completion script: `tether completions bash >
    /// /etc/bash_completion.d/tether`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `tether man | man -l -`.
    Man,
}

#[derive(Debug, Args)]
pub struct HubArgs {
    #[command(subcommand)]
    pub command: Option<HubCommand>,
}

#[derive(Debug, Subcommand)]
pub enum HubCommand {
    /// Make a fresh random token: print it and the [[token]] block for
    /// hub.toml, or write the token to a file and append the block to
    /// hub.toml (--token-file, --append-to).
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
        /// Write the token to this file (mode 0600, which must not exist
        /// yet) instead of printing it: the daemon's `token_file`.
        #[arg(long, value_name = "PATH")]
        token_file: Option<PathBuf>,
        /// Append the [[token]] block to this hub config instead of
        /// printing it (checked first: the result must be a valid hub.toml).
        #[arg(long, value_name = "HUB_TOML")]
        append_to: Option<PathBuf>,
    },
    /// Write a hub config (hub.toml, or the file given with --config) with
    /// one dataset. Refuses to overwrite a file unless --force.
    Init(crate::setup::HubInitArgs),
    /// Show the running hub's datasets: head, live rows, log length, size
    /// (asks the hub's admin socket, found from --config or --socket).
    Datasets(AdminArgs),
    /// Show the running hub's clients, connected and known: token, address,
    /// connected since or last seen, cursor and lag behind the head.
    Clients(AdminArgs),
    /// Show the running hub's tokens: name, datasets, access (never the secret).
    Tokens(AdminArgs),
    /// Make the running hub re-read hub.toml (same as SIGHUP): tokens and
    /// datasets change without dropping unaffected sessions. Exit 1 when
    /// the hub refuses the file (it keeps its current config).
    Reload(AdminArgs),
    /// Show a dataset's tables, their schema and its history; with
    /// --accept, accept a breaking change of a table deliberately.
    Schema {
        dataset: String,
        /// Accept the next breaking change of this table (a column dropped,
        /// renamed or retyped): the device that brings it makes it the next
        /// version, and devices whose app has an older schema are refused.
        #[arg(long, value_name = "TABLE")]
        accept: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

/// Options of the commands that ask the running hub.
#[derive(Debug, Args, Clone, Copy)]
pub struct AdminArgs {
    #[arg(long)]
    pub json: bool,
    /// Give up when the hub has not answered within this long (default 30s): exit 75.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<std::time::Duration>,
}
