//! Running a hub and daemons inside one process: what `tether demo` and
//! `tether bench` use, and what an app embedding tether can use as well.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{
    ConflictPolicy, DaemonConfig, DatabaseConfig, DatasetConfig, Dur, HubConfig, HubConn,
    Reconnect, TokenAccess, TokenConfig,
};
use crate::daemon::Daemon;
use crate::hub::auth::{hash_token, new_token};
use crate::hub::Hub;
use crate::session::{ConnectionState, Status};

/// A hub serving on a loopback port.
pub struct EmbeddedHub {
    pub hub: Hub,
    pub addr: SocketAddr,
    pub token: String,
    pub config: HubConfig,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl EmbeddedHub {
    /// Starts a hub with an SQLite store at `store`, the given datasets
    /// (name, tables) and one read-write token for all of them, on `addr`
    /// (`127.0.0.1:0` picks a free port).
    pub async fn start(
        store: &Path,
        datasets: &[(&str, &[&str])],
        addr: &str,
    ) -> anyhow::Result<EmbeddedHub> {
        let token = new_token();
        let config = HubConfig {
            listen: addr.to_owned(),
            store: format!("sqlite:{}", store.display()),
            datasets: datasets
                .iter()
                .map(|(n, t)| DatasetConfig {
                    name: n.to_string(),
                    tables: t.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
            tokens: vec![TokenConfig {
                name: "embedded".into(),
                sha256: hash_token(&token),
                datasets: vec!["*".into()],
                access: TokenAccess::ReadWrite,
            }],
            metrics: true,
            log_level: None,
            read_timeout: Dur(Duration::from_secs(120)),
            tls_cert: None,
            tls_key: None,
            limits: Default::default(),
            admin_socket: None,
        };
        Self::start_with(config, token).await
    }

    /// Starts a hub from a full config; `token` is what daemons should send.
    pub async fn start_with(config: HubConfig, token: String) -> anyhow::Result<EmbeddedHub> {
        let listener = TcpListener::bind(&config.listen).await?;
        let addr = listener.local_addr()?;
        let hub = Hub::open(&config)?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let hub = hub.clone();
            let shutdown = shutdown.clone();
            async move { hub.run(listener, shutdown).await }
        });
        Ok(EmbeddedHub {
            hub,
            addr,
            token,
            config,
            shutdown,
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("ws://{}/v1/sync", self.addr)
    }

    /// Stops the hub and waits for every session to close.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let _ = (&mut self.task).await;
    }
}

/// A hub dropped without [`EmbeddedHub::stop`] (a test that panicked, a
/// value built only for its config) still stops: its sessions close in the
/// background instead of serving forever.
impl Drop for EmbeddedHub {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A daemon running in this process.
pub struct EmbeddedDaemon {
    pub daemon: Daemon,
    pub config: DaemonConfig,
    shutdown: CancellationToken,
}

/// Reconnect settings suited to loopback demos and tests.
pub fn fast_reconnect() -> Reconnect {
    Reconnect {
        initial: Dur(Duration::from_millis(50)),
        max: Dur(Duration::from_millis(500)),
        multiplier: 2.0,
        ping_interval: Dur(Duration::from_secs(5)),
        read_timeout: Dur(Duration::from_secs(20)),
    }
}

/// One database entry for [`EmbeddedDaemon::start`].
pub fn database(
    name: &str,
    path: PathBuf,
    tables: &[&str],
    conflict: ConflictPolicy,
) -> DatabaseConfig {
    DatabaseConfig {
        name: name.into(),
        path,
        dataset: None,
        tables: tables.iter().map(|s| s.to_string()).collect(),
        conflict,
        table_conflict: Default::default(),
    }
}

impl EmbeddedDaemon {
    pub fn start(url: &str, token: &str, databases: Vec<DatabaseConfig>) -> EmbeddedDaemon {
        let config = DaemonConfig {
            control_socket: PathBuf::from("/nonexistent/tether.sock"),
            control: Default::default(),
            shutdown_timeout: Dur(Duration::from_secs(10)),
            metrics_listen: None,
            log_level: None,
            hub: HubConn {
                url: url.into(),
                token: Some(token.into()),
                token_file: None,
                ca_file: None,
            },
            reconnect: fast_reconnect(),
            databases,
        };
        Self::start_with(config)
    }

    pub fn start_with(config: DaemonConfig) -> EmbeddedDaemon {
        let shutdown = CancellationToken::new();
        let daemon = Daemon::start(&config, shutdown.clone());
        EmbeddedDaemon {
            daemon,
            config,
            shutdown,
        }
    }

    pub fn status(&self, name: &str) -> watch::Receiver<Status> {
        self.daemon
            .session(name)
            .unwrap_or_else(|| panic!("no database named {name}"))
            .status
            .clone()
    }

    /// Waits until every session is connected and caught up.
    pub async fn wait_connected(&self, timeout: Duration) -> anyhow::Result<()> {
        for s in &self.daemon.handles() {
            let mut rx = s.status.clone();
            tokio::time::timeout(
                timeout,
                rx.wait_for(|s| s.connection == ConnectionState::Connected && s.caught_up),
            )
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "database {} did not connect within {timeout:?}: {:?}",
                    s.name,
                    s.status.borrow().last_error
                )
            })??;
        }
        Ok(())
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.daemon.wait().await;
    }
}

/// A daemon dropped without [`EmbeddedDaemon::stop`] still shuts down.
impl Drop for EmbeddedDaemon {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
