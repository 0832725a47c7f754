//! The daemon: one independent session per configured database.
//!
//! Each database gets a supervisor task that opens it on its own thread
//! (retrying with backoff if the file or a table is missing, so one broken
//! database never stalls another), starts the file watcher and runs the
//! session until shutdown.

mod once;

pub use once::{once, OnceResult};

use std::sync::{Arc, OnceLock};

use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{DaemonConfig, DatabaseConfig};
use crate::local::{watch as fswatch, LocalDb};
use crate::session::{
    update_status, Control, Event, ReconnectOutcome, Session, SessionParams, SessionState, Status,
    TokenSource,
};

/// Pending operator commands per session.
const CONTROL_QUEUE: usize = 16;
/// Events kept for slow watchers before they are told they lagged.
pub const EVENT_BUFFER: usize = 1024;

/// A running session as seen from outside.
#[derive(Clone)]
pub struct SessionHandle {
    pub name: String,
    pub status: watch::Receiver<Status>,
    /// Operator commands (pause, resume, reconnect).
    pub ctl: mpsc::Sender<Control>,
    /// The database thread, once the database is open.
    pub local: Arc<OnceLock<LocalDb>>,
}

/// The running daemon.
pub struct Daemon {
    pub sessions: Vec<SessionHandle>,
    events: broadcast::Sender<Event>,
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
        let events = broadcast::channel(EVENT_BUFFER).0;
        for db in &cfg.databases {
            let params = SessionParams {
                name: db.name.clone(),
                dataset: db.dataset().to_owned(),
                url: cfg.hub.url.clone(),
                token: token.clone(),
                reconnect: cfg.reconnect.clone(),
                echo_own: false,
                shutdown_timeout: cfg.shutdown_timeout.0,
            };
            let (tx, rx) = watch::channel(Status::new(&db.name, db.dataset()));
            let (ctl_tx, ctl_rx) = mpsc::channel(CONTROL_QUEUE);
            let local = Arc::new(OnceLock::new());
            tracker.spawn(supervise(
                db.clone(),
                params,
                Channels {
                    status: tx,
                    ctl: ctl_rx,
                    events: events.clone(),
                    local: local.clone(),
                },
                shutdown.clone(),
            ));
            sessions.push(SessionHandle {
                name: db.name.clone(),
                status: rx,
                ctl: ctl_tx,
                local,
            });
        }
        tracker.close();
        Daemon {
            sessions,
            events,
            tracker,
        }
    }

    /// Current status of every session.
    pub fn status(&self) -> Vec<Status> {
        self.sessions
            .iter()
            .map(|s| s.status.borrow().clone())
            .collect()
    }

    /// Events of every session, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub fn session(&self, name: &str) -> Option<&SessionHandle> {
        self.sessions.iter().find(|s| s.name == name)
    }

    /// Waits until every session has stopped (after shutdown).
    pub async fn wait(&self) {
        self.tracker.wait().await;
    }
}

/// The channels a supervisor hands to its session.
struct Channels {
    status: watch::Sender<Status>,
    ctl: mpsc::Receiver<Control>,
    events: broadcast::Sender<Event>,
    local: Arc<OnceLock<LocalDb>>,
}

async fn supervise(
    db: DatabaseConfig,
    params: SessionParams,
    ch: Channels,
    shutdown: CancellationToken,
) {
    let Channels {
        status,
        mut ctl,
        events,
        local: cell,
    } = ch;
    let span = tracing::info_span!("database", db = %db.name, dataset = %db.dataset());
    let mut backoff = crate::session::backoff(&params.reconnect);
    let local = loop {
        match LocalDb::open(db.name.clone(), db.path.clone(), db.table_policies()).await {
            Ok(l) => break l,
            Err(e) => {
                let delay = backoff.next().unwrap_or(params.reconnect.max.0);
                span.in_scope(|| tracing::error!(retry_in = ?delay, "{e}"));
                let _ = events.send(Event::Error {
                    db: db.name.clone(),
                    message: e.to_string(),
                });
                update_status(&status, &events, |s| {
                    s.session = SessionState::Error;
                    s.last_error = Some(e.to_string());
                    s.backoff_ms = Some(delay.as_millis() as u64);
                });
                let until = tokio::time::Instant::now() + delay;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => break,
                        _ = shutdown.cancelled() => {
                            update_status(&status, &events, |s| s.session = SessionState::Inactive);
                            return;
                        }
                        c = ctl.recv() => match c {
                            Some(Control::Reconnect { reply }) => {
                                let _ = reply.send(ReconnectOutcome::Woken);
                                break;
                            }
                            // Remembered; the session starts with them.
                            Some(Control::Pause { upload, download }) => {
                                set_flags(&status, &events, true, upload, download)
                            }
                            Some(Control::Resume { upload, download }) => {
                                set_flags(&status, &events, false, upload, download)
                            }
                            None => {}
                        },
                    }
                }
            }
        }
    };
    let _ = cell.set(local.clone());
    update_status(&status, &events, |s| {
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
    Session::new(params, local, status, wake_rx, ctl, events, shutdown)
        .run()
        .await;
}

fn set_flags(
    status: &watch::Sender<Status>,
    events: &broadcast::Sender<Event>,
    pause: bool,
    upload: bool,
    download: bool,
) {
    let both = !upload && !download;
    update_status(status, events, |s| {
        if upload || both {
            s.upload_paused = pause;
        }
        if download || both {
            s.download_paused = pause;
        }
    });
}
