//! The `tether` binary: parses the command line, sets up logging, loads the
//! config and runs the requested mode. Exits 78 (EX_CONFIG) on a config error.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use tether::config::{DaemonConfig, HubConfig};
use tether::daemon::Daemon;
use tether::hub::Hub;

mod check;
mod cli;
mod commands;
mod hubctl;
mod setup;
use cli::{Cli, Command, HubCommand};
use commands::Output;
use tether::control::{self, Request};

const EX_CONFIG: u8 = 78;

/// Logging to stderr: level from `RUST_LOG` (else `default`, which is the
/// config's `log_level` where there is one), text or JSON.
/// Under journald (`JOURNAL_STREAM` set) text lines carry no timestamp of
/// their own, since the journal records one.
fn init_tracing(default: &str, format: cli::LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    match (format, journald) {
        (cli::LogFormat::Json, _) => builder.json().init(),
        (cli::LogFormat::Text, true) => builder.without_time().init(),
        (cli::LogFormat::Text, false) => builder.init(),
    }
}

/// SIGHUP reloads the config, like `tether reload`. The handler is
/// installed at the call, before the future first runs: a SIGHUP right
/// after the start reloads rather than kills the daemon.
fn reload_on_sighup(
    daemon: std::sync::Arc<Daemon>,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let hup = signal(SignalKind::hangup());
    async move { reload_on_each(hup, daemon, shutdown).await }
}

async fn reload_on_each(
    hup: std::io::Result<tokio::signal::unix::Signal>,
    daemon: std::sync::Arc<Daemon>,
    shutdown: CancellationToken,
) {
    let mut hup = match hup {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; reload with `tether reload`");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {}
            _ = shutdown.cancelled() => return,
        }
        tether::service::reloading();
        match daemon.reload_from_file().await {
            Ok(r) => {
                tracing::info!(added = ?r.added, removed = ?r.removed, restarted = ?r.restarted, warnings = ?r.warnings, "SIGHUP: config reloaded")
            }
            Err(e) => tracing::error!("SIGHUP: reload refused, keeping the current config: {e}"),
        }
        tether::service::ready(&tether::service::daemon_status(&daemon));
    }
}

/// Cancels the token on SIGTERM or SIGINT. The handlers are installed
/// before this returns (not when a task first runs), so a SIGTERM that
/// comes right after the start is a clean shutdown, never the default
/// action's kill.
fn on_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (term, int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM and SIGINT");
            return;
        }
    };
    let (mut term, mut int) = (term, int);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
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

/// Loads tether.toml (from --config, else the default path); a bad file
/// is reported and becomes exit status 78.
/// Loads a config from `path` (else `default`); on error prints it and
/// gives the exit status for a bad config.
fn load_config<T>(
    path: Option<&std::path::Path>,
    default: &str,
    load: fn(&std::path::Path) -> Result<T, tether::config::ConfigError>,
) -> Result<(std::path::PathBuf, T), ExitCode> {
    let path = path.map_or_else(|| default.into(), std::path::Path::to_path_buf);
    match load(&path) {
        Ok(c) => Ok((path, c)),
        Err(e) => {
            eprintln!("error: {e}");
            Err(ExitCode::from(EX_CONFIG))
        }
    }
}

fn load_daemon_config(
    path: Option<&std::path::Path>,
) -> Result<(std::path::PathBuf, DaemonConfig), ExitCode> {
    load_config(path, "/etc/tether/tether.toml", DaemonConfig::load)
}

fn out(json: bool) -> Output {
    if json {
        Output::Json
    } else {
        Output::Human
    }
}

/// The control-socket request a CLI command stands for, whether its
/// output is JSON, and its `--timeout` (for those that have one); `None`
/// for commands that do not talk to a daemon.
fn control_request(cmd: &Command) -> Option<(Request, bool, Option<std::time::Duration>)> {
    match cmd {
        Command::Status { db, json, patience } => {
            Some((Request::Status { db: db.clone() }, *json, patience.timeout))
        }
        Command::Pause { db, dirs, patience } => Some((
            Request::Pause {
                db: db.clone(),
                dirs: commands::dirs(dirs.upload, dirs.download),
            },
            false,
            patience.timeout,
        )),
        Command::Resume { db, dirs, patience } => Some((
            Request::Resume {
                db: db.clone(),
                dirs: commands::dirs(dirs.upload, dirs.download),
            },
            false,
            patience.timeout,
        )),
        Command::Reconnect { json, patience } => {
            Some((Request::Reconnect {}, *json, patience.timeout))
        }
        Command::Reload { json, patience } => Some((Request::Reload {}, *json, patience.timeout)),
        Command::Metrics { json, patience } => Some((Request::Metrics {}, *json, patience.timeout)),
        Command::Held { db, json, patience } => {
            Some((Request::Held { db: db.clone() }, *json, patience.timeout))
        }
        Command::Retry { db, json, patience } => {
            Some((Request::Retry { db: db.clone() }, *json, patience.timeout))
        }
        Command::Wait {
            db,
            dirs,
            timeout,
            json,
        } => Some((
            Request::Wait {
                db: db.clone(),
                dirs: commands::dirs(dirs.upload, dirs.download),
                timeout_ms: timeout.map(|t| t.as_millis() as u64),
            },
            *json,
            None,
        )),
        Command::Progress {
            db,
            dirs,
            follow,
            json,
        } => Some((
            Request::Progress {
                db: db.clone(),
                dirs: commands::dirs(dirs.upload, dirs.download),
                follow: *follow,
            },
            *json,
            None,
        )),
        Command::Watch { db, json } => Some((Request::Watch { db: db.clone() }, *json, None)),
        Command::Sync { db, timeout, json } => Some((
            Request::Sync {
                db: db.clone(),
                timeout_ms: timeout.map(|t| t.as_millis() as u64),
            },
            *json,
            None,
        )),
        _ => None,
    }
}

async fn run(cli: Cli) -> ExitCode {
    if let Some((req, args)) = hubctl::request_of(&cli.command) {
        return hubctl::run(req, args, cli.socket.as_deref(), cli.config.as_deref()).await;
    }
    let socket = || control::client::socket_path(cli.socket.as_deref(), cli.config.as_deref());
    let control_request = control_request(&cli.command);
    if let Some((req, json, timeout)) = control_request {
        let path = match socket() {
            Ok(p) => p,
            Err(e) if matches!(req, Request::Reload {}) => {
                // What the README promises for an invalid file: exit 1.
                eprintln!("error: reload refused, not sent to the daemon (it keeps its current config): {e}");
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EX_CONFIG);
            }
        };
        return commands::run(&path, req, out(json), timeout).await;
    }
    match cli.command {
        Command::Daemon => daemon(cli.config.as_deref(), cli.log_format).await,
        Command::Hub(args) => hub(args, cli.config.as_deref(), cli.log_format).await,
        Command::Once { dbs, timeout, json } => {
            init_tracing("warn", cli.log_format);
            once(cli.config.as_deref(), &dbs, timeout, json).await
        }
        Command::Demo => {
            init_tracing("error", cli.log_format);
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
            init_tracing("warn", cli.log_format);
            match tether::demo::bench(rows, commits, runs.max(1), json).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("bench failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Reliability {
            schedules,
            seed,
            writing,
            json,
        } => {
            init_tracing("warn", cli.log_format);
            let opts = match std::env::current_exe() {
                Ok(exe) => tether::reliability::Options::new(exe, schedules, seed, writing),
                Err(e) => {
                    eprintln!("reliability: cannot find the tether executable to run: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match tether::reliability::command(&opts, json).await {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("reliability failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check {
            file,
            hub,
            keys_only,
        } => match check::check(&file, hub, keys_only) {
            Ok(said) => {
                println!("{said}");
                ExitCode::SUCCESS
            }
            Err(problems) => {
                for p in problems {
                    eprintln!("error: {p}");
                }
                ExitCode::from(EX_CONFIG)
            }
        },
        Command::Init(args) => {
            let out = cli.config.unwrap_or_else(|| "tether.toml".into());
            said(setup::init(&args, &out))
        }
        Command::Completions { shell } => {
            setup::completions(shell);
            ExitCode::SUCCESS
        }
        Command::Man => match setup::man() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        _ => unreachable!("control commands are handled above"),
    }
}

/// `tether once`: one round without a daemon; says what it waits for
/// (unless `json`), then one line per database.
async fn once(
    config: Option<&std::path::Path>,
    dbs: &[String],
    timeout: std::time::Duration,
    json: bool,
) -> ExitCode {
    let (_, cfg) = match load_daemon_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if !json {
        let names: Vec<&str> = match dbs.is_empty() {
            true => cfg.databases.iter().map(|d| d.name.as_str()).collect(),
            false => dbs.iter().map(String::as_str).collect(),
        };
        eprintln!(
                "waiting for {}: connect to {}, download everything, upload everything (gives up after {}, --timeout)",
                names.join(", "),
                cfg.hub.url,
                humantime::format_duration(timeout)
            );
    }
    let results = match tether::daemon::once(cfg, dbs, timeout).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut ok = true;
    for r in &results {
        ok &= r.error.is_none();
        if json {
            println!("{}", serde_json::to_string(r).expect("BUG: serializes"));
        } else if let Some(e) = &r.error {
            println!(
                "{}: FAILED: {e} (downloaded {}, uploaded {})",
                r.db, r.downloaded, r.uploaded
            );
        } else {
            println!(
                "{}: ok: downloaded {}, uploaded {}",
                r.db, r.downloaded, r.uploaded
            );
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The daemon's `metrics_listen`: `/metrics` and `/healthz` over plain HTTP.
async fn serve_daemon_metrics(
    listener: tokio::net::TcpListener,
    daemon: std::sync::Arc<Daemon>,
    shutdown: CancellationToken,
) {
    use tether::http::{self, Reply};
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving metrics at /metrics");
    }
    http::serve(listener, shutdown, move |path| {
        let daemon = daemon.clone();
        async move {
            match path.as_str() {
                "/metrics" => Reply {
                    status: 200,
                    content_type: tether::metrics::CONTENT_TYPE,
                    body: daemon.metrics_text().await,
                },
                "/healthz" => Reply::text(200, "ok\n"),
                p => Reply::text(404, format!("nothing at {p}; try /metrics\n")),
            }
        }
    })
    .await;
}

/// `tether daemon`: runs the configured sessions and the control socket
/// until SIGTERM or SIGINT.
async fn daemon(config: Option<&std::path::Path>, log_format: cli::LogFormat) -> ExitCode {
    let (config, cfg) = match load_daemon_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_tracing(cfg.log_level.as_deref().unwrap_or("info"), log_format);
    if cfg.databases.is_empty() {
        tracing::warn!(config = %config.display(), "no [[database]] configured; nothing to sync");
    }
    let control = match control::server::Settings::from_config(&cfg.control) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}: {e}", config.display());
            return ExitCode::from(EX_CONFIG);
        }
    };
    if let Err(e) = tether::places::prepare_socket_dir(&cfg.control_socket) {
        eprintln!("error: {}: control_socket: {e}", config.display());
        return ExitCode::from(EX_CONFIG);
    }
    let listener = match control::server::bind(&cfg.control_socket).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let metrics_listener = match cfg.metrics_listen {
        None => None,
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("error: cannot serve metrics on {addr} (metrics_listen in {}): {e}; pick a free address or remove metrics_listen", config.display());
                return ExitCode::FAILURE;
            }
        },
    };
    let shutdown = CancellationToken::new();
    on_signals(shutdown.clone());
    let daemon = std::sync::Arc::new(Daemon::start_from(
        &cfg,
        Some(config.clone()),
        shutdown.clone(),
    ));
    tokio::spawn(reload_on_sighup(daemon.clone(), shutdown.clone()));
    let server = tokio::spawn(control::server::serve(
        listener,
        daemon.clone(),
        shutdown.clone(),
        control,
    ));
    let metrics_server = metrics_listener
        .map(|l| tokio::spawn(serve_daemon_metrics(l, daemon.clone(), shutdown.clone())));
    tether::service::ready(&tether::service::daemon_status(&daemon));
    tokio::spawn(tether::service::daemon_heartbeat(
        daemon.clone(),
        shutdown.clone(),
    ));
    tracing::info!(databases = daemon.handles().len(), hub = %cfg.hub.url, socket = %cfg.control_socket.display(), "daemon started");
    shutdown.cancelled().await;
    tether::service::stopping();
    daemon.wait().await;
    let _ = server.await;
    if let Some(m) = metrics_server {
        let _ = m.await;
    }
    tracing::info!("daemon stopped");
    ExitCode::SUCCESS
}

/// Prints what a setup command did, or its error (exit 1).
fn said(r: Result<String, String>) -> ExitCode {
    match r {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `tether hub` and its subcommands.
async fn hub(
    args: cli::HubArgs,
    config: Option<&std::path::Path>,
    log_format: cli::LogFormat,
) -> ExitCode {
    match args.command {
        Some(HubCommand::NewToken {
            name,
            dataset,
            read_only,
            token_file,
            append_to,
        }) => said(
            setup::new_token(
                &name,
                &dataset,
                read_only,
                token_file.as_deref(),
                append_to.as_deref(),
            )
            .map(|s| s.trim_end().to_owned()),
        ),
        Some(HubCommand::Init(args)) => {
            let out = config.map_or_else(|| "hub.toml".into(), std::path::Path::to_path_buf);
            said(setup::hub_init(&args, &out))
        }
        Some(
            HubCommand::Datasets(_)
            | HubCommand::Clients(_)
            | HubCommand::Tokens(_)
            | HubCommand::Reload(_),
        ) => unreachable!("BUG: the hub's admin commands are run by hubctl"),
        Some(HubCommand::Schema {
            dataset,
            accept,
            json,
        }) => {
            let (_, cfg) = match load_config(config, "/etc/tether/hub.toml", HubConfig::load) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match tether::hub::schema::run(&cfg, &dataset, accept.as_deref(), json) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        None => {
            let (config, cfg) = match load_config(config, "/etc/tether/hub.toml", HubConfig::load) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_tracing(cfg.log_level.as_deref().unwrap_or("info"), log_format);
            let hub = match Hub::open(&cfg) {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("error: {}: {e}", config.display());
                    return ExitCode::from(EX_CONFIG);
                }
            };
            hub.set_config_path(config.clone());
            let admin_path = tether::hub::admin::socket_path(&cfg);
            let admin = match tether::hub::admin::server::open(&admin_path).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let listener = match tokio::net::TcpListener::bind(&cfg.listen).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!(
                        "error: cannot listen on {} (`listen` in {}): {e}",
                        cfg.listen,
                        config.display()
                    );
                    return ExitCode::FAILURE;
                }
            };
            let shutdown = CancellationToken::new();
            on_signals(shutdown.clone());
            tokio::spawn(tether::hub::reload::on_sighup(
                hub.clone(),
                shutdown.clone(),
            ));
            let admin = tokio::spawn(tether::hub::admin::server::serve(
                admin,
                hub.clone(),
                shutdown.clone(),
            ));
            let addr = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| cfg.listen.clone());
            tracing::info!(listen = %addr, datasets = cfg.datasets.len(), tls = hub.serves_tls(), admin_socket = %admin_path.display(), "hub started");
            tether::service::ready(&format!("listening on {addr}"));
            tokio::spawn(tether::service::watchdog(shutdown.clone()));
            let stop = shutdown.clone();
            tokio::spawn(async move {
                stop.cancelled().await;
                tether::service::stopping();
            });
            hub.run(listener, shutdown).await;
            let _ = admin.await;
            tracing::info!("hub stopped");
            ExitCode::SUCCESS
        }
    }
}
