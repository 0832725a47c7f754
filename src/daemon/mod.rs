//! The daemon: one independent session per configured database.
//!
//! Each database gets a supervisor task that opens it on its own thread
//! (retrying with backoff if the file or a table is missing, so one broken
//! database never stalls another), starts the file watcher and runs the
//! session until shutdown.

use std::time::Duration;

use backon::BackoffBuilder;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{DaemonConfig, DatabaseConfig};
use crate::local::{watch as fswatch, LocalDb};
use crate::session::{Session, SessionParams, SessionState, Status, TokenSource};

/// A running session as seen from outside.
#[derive(Clone)]
pub struct SessionHandle {
    pub name: String,
    pub status: watch::Receiver<Status>,
}

/// The running daemon.
pub struct Daemon {
    pub sessions: Vec<SessionHandle>,
    tracker: TaskTracker,
}

impl Daemon {
    /// Starts one session per database; returns at once.
    pub fn start(cfg: &DaemonConfig, shutdown: CancellationToken) -> Daemon {
        let tracker = TaskTracker::new();
        let token = match (&cfg.hub.token, &cfg.hub.token_file) {
            (Some(t), _) => TokenSource::Inline(t.trim().to_owned()),
            (None, Some(f)) => TokenSource::File(f.clone()),
            (None, None) => TokenSource::Inline(String::new()),
        };
        let mut sessions = Vec::new();
        for db in &cfg.databases {
            let params = SessionParams {
                name: db.name.clone(),
                dataset: db.dataset().to_owned(),
                url: cfg.hub.url.clone(),
                token: token.clone(),
                reconnect: cfg.reconnect.clone(),
                echo_own: false,
            };
            let (tx, rx) = watch::channel(Status::new(&db.name, db.dataset()));
            tracker.spawn(supervise(db.clone(), params, tx, shutdown.clone()));
            sessions.push(SessionHandle {
                name: db.name.clone(),
                status: rx,
            });
        }
        tracker.close();
        Daemon { sessions, tracker }
    }

    /// Current status of every session.
    pub fn status(&self) -> Vec<Status> {
        self.sessions
            .iter()
            .map(|s| s.status.borrow().clone())
            .collect()
    }

    pub fn session(&self, name: &str) -> Option<&SessionHandle> {
        self.sessions.iter().find(|s| s.name == name)
    }

    /// Waits until every session has stopped (after shutdown).
    pub async fn wait(&self) {
        self.tracker.wait().await;
    }
}

async fn supervise(
    db: DatabaseConfig,
    params: SessionParams,
    status: watch::Sender<Status>,
    shutdown: CancellationToken,
) {
    let span = tracing::info_span!("database", db = %db.name, dataset = %db.dataset());
    let mut backoff = backon::ExponentialBuilder::default()
        .with_min_delay(params.reconnect.initial.0)
        .with_max_delay(params.reconnect.max.0.max(Duration::from_secs(1)))
        .with_jitter()
        .without_max_times()
        .build();
    let local = loop {
        match LocalDb::open(db.name.clone(), db.path.clone(), db.table_policies()).await {
            Ok(l) => break l,
            Err(e) => {
                let delay = backoff.next().unwrap_or(params.reconnect.max.0);
                span.in_scope(|| tracing::error!(retry_in = ?delay, "{e}"));
                status.send_modify(|s| {
                    s.session = SessionState::Error;
                    s.last_error = Some(e.to_string());
                    s.backoff_ms = Some(delay.as_millis() as u64);
                });
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = shutdown.cancelled() => {
                        status.send_modify(|s| s.session = SessionState::Inactive);
                        return;
                    }
                }
            }
        }
    };
    status.send_modify(|s| {
        s.session = SessionState::Active;
        s.last_error = None;
        s.backoff_ms = None;
    });
    // Room for one wake-up: a burst of writes coalesces into one.
    let (wake_tx, wake_rx) = mpsc::channel(1);
    let _watch = match fswatch::watch(&db.path, wake_tx) {
        Ok(w) => Some(w),
        Err(e) => {
            span.in_scope(|| tracing::warn!(error = %e, "cannot watch the database file; falling back to polling every {:?}", crate::session::POLL_INTERVAL));
            None
        }
    };
    Session::new(params, local, status, wake_rx, shutdown)
        .run()
        .await;
}
