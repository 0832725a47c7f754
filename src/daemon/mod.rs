//! The daemon: one independent session per configured database.
//!
//! Each database gets a supervisor task that opens it on its own thread
//! (retrying with backoff if the file or a table is missing, so one broken
//! database never stalls another), starts the file watcher and runs the
//! session until shutdown.

mod once;

pub use once::{once, OnceResult};

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{DaemonConfig, DatabaseConfig, Dur, HubConn, Reconnect};
use crate::local::{watch as fswatch, LocalDb};
use crate::metrics::DaemonMetrics;
use crate::session::{
    update_status, Control, Event, ReconnectOutcome, Session, SessionParams, SessionState, Status,
    TokenSource,
};

/// Pending operator commands per session.
const CONTROL_QUEUE: usize = 16;
/// Events kept for slow watchers before they are told they lagged.
pub const EVENT_BUFFER: usize = 1024;

/// Whether the daemon runs or drains on its way out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DaemonState {
    /// Syncing.
    #[default]
    Running,
    /// Shutting down: sessions with uploads in flight wait (up to
    /// `shutdown_timeout`) for the hub's answers; no new work starts.
    Dying,
}

impl DaemonState {
    pub const ALL: [DaemonState; 2] = [DaemonState::Running, DaemonState::Dying];

    /// The name it serializes to.
    pub fn as_str(self) -> &'static str {
        match self {
            DaemonState::Running => "running",
            DaemonState::Dying => "dying",
        }
    }
}

/// A running session as seen from outside.
#[derive(Clone)]
pub struct SessionHandle {
    pub name: String,
    pub status: watch::Receiver<Status>,
    /// Operator commands (pause, resume, reconnect).
    pub ctl: mpsc::Sender<Control>,
    /// Makes the session look at its capture log now (what a file change
    /// does); full when a look is already due.
    pub wake: mpsc::Sender<()>,
    /// The database thread, once the database is open.
    pub local: Arc<OnceLock<LocalDb>>,
}

impl SessionHandle {
    /// The session's status, with the pending changes read from the database
    /// now rather than as of the session's last look at its log (which may
    /// be a while ago when paused or disconnected).
    pub async fn fresh_status(&self) -> Status {
        let mut s = self.status.borrow().clone();
        s.count_down(crate::clock::now_ms());
        if let Some(local) = self.local.get() {
            let read =
                tokio::time::timeout(Duration::from_secs(2), local.call(|r| r.pending())).await;
            if let Ok(Ok(Ok(p))) = read {
                s.set_pending(&p);
                s.oldest_pending_ms = p
                    .oldest_at_ms
                    .map(|at| (crate::clock::now_ms() - at).max(0) as u64);
            }
        }
        s
    }
}

/// The message for a database name that is not configured.
pub fn unknown_db<'a>(name: &str, known: impl Iterator<Item = &'a str>) -> String {
    let known: Vec<&str> = known.collect();
    format!("no database named {name:?}; known: {}", known.join(", "))
}

/// One running session and what started it.
struct Entry {
    handle: SessionHandle,
    db: DatabaseConfig,
    /// The settings outside `[[database]]` the session was started with.
    global: Global,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// Daemon-wide settings a session depends on.
#[derive(Clone, Debug, PartialEq)]
struct Global {
    hub: HubConn,
    reconnect: Reconnect,
    shutdown_timeout: Dur,
}

impl Global {
    fn of(cfg: &DaemonConfig) -> Global {
        Global {
            hub: cfg.hub.clone(),
            reconnect: cfg.reconnect.clone(),
            shutdown_timeout: cfg.shutdown_timeout,
        }
    }
}

/// What a reload did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub restarted: Vec<String>,
    pub unchanged: Vec<String>,
    /// Settings that only take effect after a restart of the daemon.
    pub warnings: Vec<String>,
}

/// The running daemon.
pub struct Daemon {
    sessions: std::sync::Mutex<Vec<Entry>>,
    events: broadcast::Sender<Event>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// Where the config came from, for reloads.
    config_path: Option<std::path::PathBuf>,
    config: std::sync::Mutex<DaemonConfig>,
    /// Serializes reloads.
    reloading: tokio::sync::Mutex<()>,
    /// Counters of every session, kept across reloads.
    metrics: DaemonMetrics,
    mode: Mode,
}

/// How long the daemon runs, which decides what a failure to open a
/// database is: something retried and logged (resident), or the round's
/// result, reported by `tether once` and nowhere else (one round).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Resident,
    OneRound,
}

impl Daemon {
    /// Starts one session per database; returns at once.
    pub fn start(cfg: &DaemonConfig, shutdown: CancellationToken) -> Daemon {
        Self::start_from(cfg, None, shutdown)
    }

    /// Like [`Daemon::start`] for one round (`tether once`): a database
    /// that cannot be opened is not logged as retried, since the caller
    /// reports it and stops.
    pub fn start_one_round(cfg: &DaemonConfig, shutdown: CancellationToken) -> Daemon {
        Self::start_with(cfg, None, shutdown, Mode::OneRound)
    }

    /// Like [`Daemon::start`], remembering the config file for reloads.
    pub fn start_from(
        cfg: &DaemonConfig,
        config_path: Option<std::path::PathBuf>,
        shutdown: CancellationToken,
    ) -> Daemon {
        Self::start_with(cfg, config_path, shutdown, Mode::Resident)
    }

    fn start_with(
        cfg: &DaemonConfig,
        config_path: Option<std::path::PathBuf>,
        shutdown: CancellationToken,
        mode: Mode,
    ) -> Daemon {
        let tracker = TaskTracker::new();
        tracker.close();
        let daemon = Daemon {
            sessions: std::sync::Mutex::new(Vec::new()),
            events: broadcast::channel(EVENT_BUFFER).0,
            tracker,
            shutdown,
            config_path,
            config: std::sync::Mutex::new(cfg.clone()),
            reloading: tokio::sync::Mutex::new(()),
            metrics: DaemonMetrics::new(),
            mode,
        };
        let entries: Vec<Entry> = cfg
            .databases
            .iter()
            .map(|db| daemon.spawn(cfg, db))
            .collect();
        *daemon.sessions.lock().expect("BUG: poisoned") = entries;
        daemon
    }

    fn spawn(&self, cfg: &DaemonConfig, db: &DatabaseConfig) -> Entry {
        let token = match (&cfg.hub.token, &cfg.hub.token_file) {
            (Some(t), _) => TokenSource::Inline(t.trim().to_owned()),
            (None, Some(f)) => TokenSource::File(f.clone()),
            (None, None) => TokenSource::Inline(String::new()),
        };
        let params = SessionParams {
            name: db.name.clone(),
            dataset: db.dataset().to_owned(),
            url: cfg.hub.url.clone(),
            ca_file: cfg.hub.ca_file.clone(),
            token,
            reconnect: cfg.reconnect.clone(),
            echo_own: false,
            shutdown_timeout: cfg.shutdown_timeout.0,
            metrics: self.metrics.session(&db.name),
        };
        let (tx, rx) = watch::channel(Status::new(&db.name, db.dataset()));
        let (ctl_tx, ctl_rx) = mpsc::channel(CONTROL_QUEUE);
        // Room for one wake-up: a burst of writes coalesces into one.
        let (wake_tx, wake_rx) = mpsc::channel(1);
        let local = Arc::new(OnceLock::new());
        let stop = self.shutdown.child_token();
        let task = self.tracker.spawn(supervise(
            db.clone(),
            params,
            Channels {
                status: tx,
                ctl: ctl_rx,
                wake: (wake_tx.clone(), wake_rx),
                events: self.events.clone(),
                local: local.clone(),
            },
            stop.clone(),
            self.mode,
        ));
        Entry {
            handle: SessionHandle {
                name: db.name.clone(),
                status: rx,
                ctl: ctl_tx,
                wake: wake_tx,
                local,
            },
            db: db.clone(),
            global: Global::of(cfg),
            stop,
            task,
        }
    }

    /// Handles of every session, in config order.
    pub fn handles(&self) -> Vec<SessionHandle> {
        self.sessions
            .lock()
            .expect("BUG: poisoned")
            .iter()
            .map(|e| e.handle.clone())
            .collect()
    }

    /// Current status of every session.
    pub fn status(&self) -> Vec<Status> {
        self.handles()
            .iter()
            .map(|s| s.status.borrow().clone())
            .collect()
    }

    /// Status of every session with the pending figures read from each
    /// database now (see [`SessionHandle::fresh_status`]).
    pub async fn fresh_status(&self) -> Vec<Status> {
        let mut out = Vec::new();
        for h in self.handles() {
            out.push(h.fresh_status().await);
        }
        out
    }

    /// The daemon's metrics in the OpenMetrics text format.
    pub async fn metrics_text(&self) -> String {
        let statuses = self.fresh_status().await;
        self.metrics.render(&statuses)
    }

    /// Running, or draining after shutdown was asked.
    pub fn state(&self) -> DaemonState {
        if self.shutdown.is_cancelled() {
            DaemonState::Dying
        } else {
            DaemonState::Running
        }
    }

    /// Events of every session, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub fn session(&self, name: &str) -> Option<SessionHandle> {
        self.handles().into_iter().find(|s| s.name == name)
    }

    /// Re-reads the config file given at start and applies it.
    pub async fn reload_from_file(&self) -> Result<ReloadReport, String> {
        if self.state() == DaemonState::Dying {
            return Err("the daemon is shutting down".into());
        }
        let Some(path) = &self.config_path else {
            return Err("this daemon was not started from a config file".into());
        };
        let cfg = DaemonConfig::load(path).map_err(|e| e.to_string())?;
        Ok(self.reload(cfg).await)
    }

    /// Applies a new, already validated config: starts sessions for new
    /// databases, stops removed ones, restarts only those whose settings
    /// changed. Untouched sessions keep their connections.
    pub async fn reload(&self, cfg: DaemonConfig) -> ReloadReport {
        let _one_at_a_time = self.reloading.lock().await;
        let mut report = ReloadReport::default();
        {
            let old = self.config.lock().expect("BUG: poisoned");
            let restart_only = [
                ("log_level", old.log_level != cfg.log_level),
                ("metrics_listen", old.metrics_listen != cfg.metrics_listen),
                ("control_socket", old.control_socket != cfg.control_socket),
                ("[control]", old.control != cfg.control),
            ];
            for (key, _) in restart_only.iter().filter(|(_, changed)| *changed) {
                report.warnings.push(format!(
                    "{key} changed; it takes effect when the daemon restarts"
                ));
            }
        }
        let global = Global::of(&cfg);
        let old: Vec<Entry> = std::mem::take(&mut *self.sessions.lock().expect("BUG: poisoned"));
        let mut keep: Vec<Option<Entry>> = Vec::new();
        let mut stopping = Vec::new();
        let mut old_by_name: std::collections::HashMap<String, Entry> =
            old.into_iter().map(|e| (e.db.name.clone(), e)).collect();
        for db in &cfg.databases {
            match old_by_name.remove(&db.name) {
                Some(e) if e.db == *db && e.global == global => {
                    report.unchanged.push(db.name.clone());
                    keep.push(Some(e));
                }
                Some(e) => {
                    report.restarted.push(db.name.clone());
                    e.stop.cancel();
                    stopping.push(e.task);
                    keep.push(None);
                }
                None => {
                    report.added.push(db.name.clone());
                    keep.push(None);
                }
            }
        }
        for (name, e) in old_by_name {
            report.removed.push(name);
            e.stop.cancel();
            stopping.push(e.task);
        }
        // A restarted session lets go of its database before the new one
        // opens it (one process, one session per database).
        let limit = cfg.shutdown_timeout.0 + std::time::Duration::from_secs(5);
        for t in stopping {
            if tokio::time::timeout(limit, t).await.is_err() {
                tracing::warn!("a stopped session did not finish within {limit:?}");
            }
        }
        tracing::debug!("stopped sessions finished");
        let entries: Vec<Entry> = cfg
            .databases
            .iter()
            .zip(keep)
            .map(|(db, kept)| kept.unwrap_or_else(|| self.spawn(&cfg, db)))
            .collect();
        *self.sessions.lock().expect("BUG: poisoned") = entries;
        *self.config.lock().expect("BUG: poisoned") = cfg;
        report.removed.sort();
        tracing::info!(added = ?report.added, removed = ?report.removed, restarted = ?report.restarted, unchanged = report.unchanged.len(), "config reloaded");
        report
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
    /// The wake-up channel: the file watcher sends on it, the session reads.
    wake: (mpsc::Sender<()>, mpsc::Receiver<()>),
    events: broadcast::Sender<Event>,
    local: Arc<OnceLock<LocalDb>>,
}

async fn supervise(
    db: DatabaseConfig,
    params: SessionParams,
    ch: Channels,
    shutdown: CancellationToken,
    mode: Mode,
) {
    let Channels {
        status,
        mut ctl,
        wake: (wake_tx, wake_rx),
        events,
        local: cell,
    } = ch;
    let span = tracing::info_span!("database", db = %db.name, dataset = %db.dataset());
    let mut backoff = crate::session::backoff(&params.reconnect);
    let mut ctl_open = true;
    let local = loop {
        match LocalDb::open(db.name.clone(), db.path.clone(), db.table_policies()).await {
            Ok(l) => break l,
            Err(e) => {
                let delay = backoff.next().unwrap_or(params.reconnect.max.0);
                match mode {
                    Mode::Resident => span.in_scope(|| tracing::error!(retry_in = ?delay, "{e}")),
                    Mode::OneRound => span.in_scope(|| tracing::debug!("{e}")),
                }
                let _ = events.send(Event::Error {
                    db: db.name.clone(),
                    message: e.to_string(),
                });
                update_status(&status, &events, |s| {
                    s.session = SessionState::Error;
                    s.last_error = Some(e.to_string());
                    s.set_backoff(delay);
                });
                let until = tokio::time::Instant::now() + delay;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => break,
                        _ = shutdown.cancelled() => {
                            update_status(&status, &events, |s| s.session = SessionState::Inactive);
                            return;
                        }
                        c = ctl.recv(), if ctl_open => match c {
                            Some(Control::Reconnect { reply }) => {
                                let _ = reply.send(ReconnectOutcome::Woken);
                                break;
                            }
                            // Not connected: the head cannot be asked.
                            Some(Control::FetchHead { reply }) => {
                                let _ = reply.send(None);
                            }
                            // Remembered; the session starts with them.
                            Some(Control::Pause { upload, download }) => {
                                set_flags(&status, &events, true, upload, download)
                            }
                            Some(Control::Resume { upload, download }) => {
                                set_flags(&status, &events, false, upload, download)
                            }
                            None => ctl_open = false,
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
        s.clear_backoff();
    });
    let watch_guard = match fswatch::watch(&db.path, wake_tx) {
        Ok(w) => Some(w),
        Err(e) => {
            span.in_scope(|| tracing::warn!(error = %e, "cannot watch the database file; falling back to polling every {:?}", crate::session::POLL_INTERVAL));
            None
        }
    };
    Session::new(params, local, status, wake_rx, ctl, events, shutdown)
        .run()
        .await;
    // The watch goes first: closing the database removes its WAL file, and
    // the kernel drops a watch on a removed file by itself (removing it
    // again afterwards fails with a warning on every shutdown).
    drop(watch_guard);
    // Let go of the database and its lock now: a restarted session (reload)
    // or `tether once` may open it next.
    if let Some(l) = cell.get() {
        l.close().await;
    }
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
