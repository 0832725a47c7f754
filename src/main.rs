//! The `tether` binary: parses the command line, sets up logging, loads the
//! config and runs the requested mode. Exits 78 (EX_CONFIG) on a config error.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use tether::config::{DaemonConfig, HubConfig};
use tether::daemon::Daemon;
use tether::hub::{auth, Hub};

mod cli;
use cli::{Cli, Command, HubCommand};

const EX_CONFIG: u8 = 78;

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Cancels the token on SIGTERM or SIGINT.
fn on_signals(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        shutdown.cancel();
    });
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the async runtime");
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Daemon { config } => {
            init_tracing("info");
            let cfg = match DaemonConfig::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EX_CONFIG);
                }
            };
            if cfg.databases.is_empty() {
                tracing::warn!(config = %config.display(), "no [[database]] configured; nothing to sync");
            }
            let shutdown = CancellationToken::new();
            on_signals(shutdown.clone());
            let daemon = Daemon::start(&cfg, shutdown.clone());
            tracing::info!(databases = daemon.sessions.len(), hub = %cfg.hub.url, "daemon started");
            shutdown.cancelled().await;
            daemon.wait().await;
            tracing::info!("daemon stopped");
            ExitCode::SUCCESS
        }
        Command::Hub(args) => match args.command {
            Some(HubCommand::NewToken {
                name,
                dataset,
                read_only,
            }) => {
                let token = auth::new_token();
                println!("token (give this to the daemon, e.g. in /etc/tether/token; it is shown only once):");
                println!("{token}\n");
                println!("paste into hub.toml:\n");
                print!("{}", auth::token_block(&name, &token, &dataset, read_only));
                ExitCode::SUCCESS
            }
            None => {
                init_tracing("info");
                let cfg = match HubConfig::load(&args.config) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(EX_CONFIG);
                    }
                };
                let hub = match Hub::open(&cfg) {
                    Ok(h) => h,
                    Err(e) => {
                        eprintln!("error: {}: store: {e}", args.config.display());
                        return ExitCode::from(EX_CONFIG);
                    }
                };
                let listener = match tokio::net::TcpListener::bind(&cfg.listen).await {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!(
                            "error: cannot listen on {} (`listen` in {}): {e}",
                            cfg.listen,
                            args.config.display()
                        );
                        return ExitCode::FAILURE;
                    }
                };
                let shutdown = CancellationToken::new();
                on_signals(shutdown.clone());
                tracing::info!(listen = %cfg.listen, datasets = cfg.datasets.len(), "hub started");
                hub.run(listener, shutdown).await;
                tracing::info!("hub stopped");
                ExitCode::SUCCESS
            }
        },
        Command::Demo => {
            init_tracing("error");
            match tether::demo::demo().await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("demo failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Bench {
            rows,
            commits,
            runs,
            json,
        } => {
            init_tracing("warn");
            match tether::demo::bench(rows, commits, runs.max(1), json).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("bench failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { config, hub } => {
            let r = if hub {
                HubConfig::load(&config).map(|_| ())
            } else {
                DaemonConfig::load(&config).map(|_| ())
            };
            match r {
                Ok(()) => {
                    println!("{}: ok", config.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EX_CONFIG)
                }
            }
        }
    }
}
