//! One sync session: a persistent WebSocket to the hub for one local database.
//!
//! The driver loop waits (in one `select!`) on the socket, the local file
//! watcher, the ping timer, the read deadline, the upload retry timer and
//! shutdown; it then acts on the event: applies remote changes, sends the next
//! upload batch, answers results. Only one upload batch is in flight at a time,
//! which keeps the hub's idempotency bookkeeping to one batch per client.
//!
//! Reconnection uses exponential backoff with jitter (`backon`), reset after a
//! connection that stayed up for [`HEALTHY_AFTER`].

mod connect;
pub mod status;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::clock::sleep_opt;
use crate::config::Reconnect;
use crate::local::{Batch, LocalDb, LocalError, ThreadGone};
use crate::proto::{
    self, Access, Change, ClientFrame, ErrorCode, Hello, HubFrame, Upload, UploadSummary,
    MAX_BATCH_BYTES, MAX_BATCH_CHANGES, PROTOCOL_VERSION,
};
pub use status::{ConnectionState, Event, SessionState, Status};

/// A connection that stayed up this long resets the backoff.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// Upload batches sent before the first is answered. The hub answers in
/// order and keeps the answers of unacknowledged batches, so a resend after a
/// lost connection is answered exactly as the first time.
pub const MAX_INFLIGHT: usize = 4;
/// An upload not answered within this time is taken as a dead connection.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// Safety-net timer: pending changes are looked at least this often, even if
/// no file notification arrives, and a refused batch is retried.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// While the hub refuses the token, the token file is looked at this often.
const TOKEN_POLL: Duration = Duration::from_millis(500);
/// Delays of the re-reads after a wake-up that found nothing.
const RECHECK_DELAYS: [Duration; 3] = [
    Duration::from_micros(500),
    Duration::from_millis(2),
    Duration::from_millis(10),
];
/// Time allowed for the hub's `welcome`.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the bearer token comes from; a file is re-read before each connection.
#[derive(Clone, Debug)]
pub enum TokenSource {
    Inline(String),
    File(PathBuf),
}

impl TokenSource {
    fn read(&self) -> Result<String, SessionError> {
        match self {
            TokenSource::Inline(t) => Ok(t.clone()),
            TokenSource::File(p) => match std::fs::read_to_string(p) {
                Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_owned()),
                Ok(_) => Err(SessionError::Unauthorized(format!(
                    "token file {} is empty",
                    p.display()
                ))),
                Err(e) => Err(SessionError::Unauthorized(format!(
                    "cannot read token file {}: {e}",
                    p.display()
                ))),
            },
        }
    }
}

/// Commands an operator sends to a running session.
#[derive(Debug)]
pub enum Control {
    /// Stop uploading and/or downloading. Local writes keep being captured.
    Pause { upload: bool, download: bool },
    /// Undo a pause.
    Resume { upload: bool, download: bool },
    /// Try to connect now if waiting in backoff; answers what it did.
    Reconnect {
        reply: oneshot::Sender<ReconnectOutcome>,
    },
}

/// What a reconnect request did to one session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReconnectOutcome {
    /// It was disconnected or waiting in backoff and tries now.
    Woken,
    /// Nothing to do: it is connected (or connecting).
    AlreadyConnected,
    /// Left alone: it is paused in both directions; resume it first.
    Paused,
}

/// How a connection ended without an error.
enum End {
    Shutdown,
    /// Pause flags changed in a way that needs a new connection (or none).
    Reconfigure,
}

/// Everything a session needs to know.
#[derive(Clone, Debug)]
pub struct SessionParams {
    pub name: String,
    pub dataset: String,
    pub url: String,
    pub token: TokenSource,
    pub reconnect: Reconnect,
    /// Ask the hub to push this client's own changes back too.
    pub echo_own: bool,
    /// On shutdown, how long in-flight uploads may take to be answered.
    pub shutdown_timeout: Duration,
    /// Where the session counts what it does (shared with the daemon's
    /// registry; a default value counts into nothing anyone reads).
    pub metrics: crate::metrics::SessionMetrics,
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Worth retrying after backoff.
    #[error("{0}")]
    Retry(String),
    /// The hub refused the token.
    #[error("{0}")]
    Unauthorized(String),
    /// Cannot succeed until an operator fixes something.
    #[error("{0}")]
    Fatal(String),
}

impl From<LocalError> for SessionError {
    fn from(e: LocalError) -> Self {
        SessionError::Retry(e.to_string())
    }
}

impl From<ThreadGone> for SessionError {
    fn from(e: ThreadGone) -> Self {
        SessionError::Fatal(e.to_string())
    }
}

fn ws_err(e: tokio_tungstenite::tungstenite::Error) -> SessionError {
    SessionError::Retry(format!("connection lost: {e}"))
}

/// A running session's loop; see the module docs.
pub struct Session {
    params: Arc<SessionParams>,
    db: LocalDb,
    status: watch::Sender<Status>,
    wake: mpsc::Receiver<()>,
    shutdown: CancellationToken,
    next_batch: u64,
    wake_open: bool,
    ctl: mpsc::Receiver<Control>,
    /// False once the daemon dropped the command sender.
    ctl_open: bool,
    /// The token sent on the latest connection attempt.
    last_token: Option<String>,
    events: broadcast::Sender<Event>,
    upload_paused: bool,
    download_paused: bool,
}

struct Inflight {
    batch: u64,
    /// What was sent and the log range it answers.
    read: Batch,
    /// Encoded size of the upload frame.
    bytes: u64,
    deadline: Instant,
}

impl Session {
    pub fn new(
        params: SessionParams,
        db: LocalDb,
        status: watch::Sender<Status>,
        wake: mpsc::Receiver<()>,
        ctl: mpsc::Receiver<Control>,
        events: broadcast::Sender<Event>,
        shutdown: CancellationToken,
    ) -> Session {
        let (upload_paused, download_paused) = {
            let s = status.borrow();
            (s.upload_paused, s.download_paused)
        };
        Session {
            params: Arc::new(params),
            db,
            status,
            wake,
            shutdown,
            next_batch: 1,
            wake_open: true,
            ctl,
            ctl_open: true,
            last_token: None,
            events,
            upload_paused,
            download_paused,
        }
    }

    /// Changes the published status and emits events for state changes.
    fn update(&self, f: impl FnOnce(&mut Status)) {
        update_status(&self.status, &self.events, f);
    }

    /// Applies a pause or resume; true when the connection must be re-made.
    fn set_pause(&mut self, pause: bool, upload: bool, download: bool) -> bool {
        let (both, up, down) = (!upload && !download, upload, download);
        let before = (self.upload_paused, self.download_paused);
        if up || both {
            self.upload_paused = pause;
        }
        if down || both {
            self.download_paused = pause;
        }
        let (u, d) = (self.upload_paused, self.download_paused);
        tracing::info!(db = %self.params.name, upload_paused = u, download_paused = d, "pause flags changed");
        self.update(|s| {
            s.upload_paused = u;
            s.download_paused = d;
        });
        before.1 != d || (u && d)
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> {
        backoff(&self.params.reconnect)
    }

    /// Runs until shutdown.
    pub async fn run(mut self) {
        let mut backoff = self.backoff();
        let name = self.params.name.clone();
        let dataset = self.params.dataset.clone();
        let span = tracing::info_span!("sync", db = %name, dataset = %dataset);
        let mut attempts = 0u64;
        loop {
            if self.shutdown.is_cancelled() {
                break;
            }
            if self.upload_paused && self.download_paused {
                self.update(|s| {
                    s.session = SessionState::Paused;
                    s.connection = ConnectionState::Disconnected;
                    s.backoff_ms = None;
                });
                tokio::select! {
                    c = self.ctl.recv(), if self.ctl_open => match c {
                        Some(Control::Reconnect { reply }) => {
                            let _ = reply.send(ReconnectOutcome::Paused);
                        }
                        Some(Control::Pause { upload, download }) => {
                            self.set_pause(true, upload, download);
                        }
                        Some(Control::Resume { upload, download }) => {
                            self.set_pause(false, upload, download);
                            backoff = self.backoff();
                        }
                        // The daemon dropped the handle (reload, shutdown).
                        None => self.ctl_open = false,
                    },
                    _ = self.shutdown.cancelled() => break,
                }
                continue;
            }
            if attempts > 0 {
                self.params.metrics.reconnects.inc();
            }
            attempts += 1;
            self.update(|s| {
                s.connection = ConnectionState::Connecting;
                if s.session == SessionState::Paused {
                    s.session = SessionState::Active;
                }
                s.backoff_ms = None;
            });
            let started = Instant::now();
            let result = tracing::Instrument::instrument(self.connected(), span.clone()).await;
            self.update(|s| {
                s.connection = ConnectionState::Disconnected;
                s.caught_up = false;
            });
            let err = match result {
                Ok(End::Shutdown) => break,
                Ok(End::Reconfigure) => continue,
                Err(e) => e,
            };
            if started.elapsed() >= HEALTHY_AFTER {
                backoff = self.backoff();
            }
            let max = self.params.reconnect.max.0;
            let (delay, state) = match &err {
                SessionError::Retry(_) => (backoff.next().unwrap_or(max), SessionState::Active),
                SessionError::Unauthorized(_) => (max, SessionState::WaitingForAccessToken),
                SessionError::Fatal(_) => (max, SessionState::Error),
            };
            {
                let _g = span.enter();
                match &err {
                    SessionError::Retry(m) => tracing::info!(retry_in = ?delay, "{m}"),
                    _ => tracing::error!(retry_in = ?delay, "{err}"),
                }
            }
            let message = err.to_string();
            let _ = self.events.send(Event::Error {
                db: name.clone(),
                message: message.clone(),
            });
            self.update(|s| {
                s.session = state;
                s.last_error = Some(message);
                s.backoff_ms = Some(delay.as_millis() as u64);
            });
            // Wait out the backoff; an operator's reconnect or pause change
            // ends the wait at once, and so does a new token in the token
            // file after the hub refused the old one.
            let until = Instant::now() + delay;
            let token_file = match (&err, &self.params.token) {
                (SessionError::Unauthorized(_), TokenSource::File(f)) => Some(f.clone()),
                _ => None,
            };
            // Compared with the token the refused attempt used (read at
            // connect time), so a file written since is seen as new.
            let old_token = self.last_token.clone();
            let mut token_check = tokio::time::interval(TOKEN_POLL);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    _ = token_check.tick(), if token_file.is_some() => {
                        let now = token_file
                            .as_ref()
                            .and_then(|f| std::fs::read_to_string(f).ok())
                            .map(|t| t.trim().to_owned());
                        if now != old_token {
                            tracing::info!(db = %name, "token file changed; reconnecting");
                            backoff = self.backoff();
                            break;
                        }
                    }
                    _ = self.shutdown.cancelled() => break,
                    c = self.ctl.recv(), if self.ctl_open => match c {
                        Some(Control::Reconnect { reply }) => {
                            let _ = reply.send(ReconnectOutcome::Woken);
                            tracing::info!(db = %name, "reconnecting now at the operator's request");
                            backoff = self.backoff();
                            break;
                        }
                        Some(Control::Pause { upload, download }) => {
                            if self.set_pause(true, upload, download) {
                                break;
                            }
                        }
                        Some(Control::Resume { upload, download }) => {
                            self.set_pause(false, upload, download);
                            break;
                        }
                        // The daemon dropped the handle (reload, shutdown).
                        None => self.ctl_open = false,
                    },
                }
            }
        }
        self.update(|s| {
            s.connection = ConnectionState::Disconnected;
            s.session = SessionState::Inactive;
            s.backoff_ms = None;
        });
    }

    /// One connection, from connect to close.
    async fn connected(&mut self) -> Result<End, SessionError> {
        let p = self.params.clone();
        let token = p.token.read()?;
        self.last_token = Some(token.clone());
        let mut ws = tokio::select! {
            ws = connect::connect(&p.url, &token, &p.dataset) => ws?,
            _ = self.shutdown.cancelled() => return Ok(End::Shutdown),
        };
        let (client_id, cursor, tables) = self
            .db
            .call(|r| -> Result<_, LocalError> {
                Ok((r.client_id().to_owned(), r.cursor()?, r.wire_schemas()))
            })
            .await??;
        let hello = ClientFrame::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            client_id,
            dataset: p.dataset.clone(),
            cursor,
            tables,
            echo_own: p.echo_own,
            subscribe: !self.download_paused,
        });
        ws.send(Message::Binary(proto::encode(&hello).into()))
            .await
            .map_err(ws_err)?;
        let welcome = match tokio::time::timeout(WELCOME_TIMEOUT, next_frame(&mut ws)).await {
            Err(_) => {
                return Err(SessionError::Retry(
                    "no welcome from the hub within 10s".into(),
                ))
            }
            Ok(Err(e)) => return Err(e),
            Ok(Ok(HubFrame::Welcome(w))) => w,
            Ok(Ok(HubFrame::Error(e))) => return Err(hub_error(e.code, &e.message)),
            Ok(Ok(other)) => {
                return Err(SessionError::Retry(format!(
                    "expected welcome, got {}",
                    frame_name(&other)
                )))
            }
        };
        let renumbered = self
            .db
            .call(move |r| r.ensure_seq_above(welcome.client_seq))
            .await??;
        if renumbered {
            tracing::warn!(hub_seq = welcome.client_seq, "the hub has seen newer changes from this database than it holds (restored from a backup?); pending changes were renumbered and will be sent");
        }
        tracing::info!(cursor, head = welcome.head, access = ?welcome.access, "connected");
        self.update(|s| {
            s.connection = ConnectionState::Connected;
            s.session = SessionState::Active;
            s.hub_head = welcome.head;
            s.cursor = cursor;
            s.connects += 1;
            s.last_error = None;
        });
        p.metrics.connects.inc();
        let mut uploads_allowed = welcome.access == Access::ReadWrite;
        let rc = &p.reconnect;
        let mut ping =
            tokio::time::interval_at(Instant::now() + rc.ping_interval.0, rc.ping_interval.0);
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut read_deadline = Instant::now() + rc.read_timeout.0;
        let mut inflight: VecDeque<Inflight> = VecDeque::new();
        // Set on shutdown while uploads are in flight: the drain deadline.
        let mut dying: Option<Instant> = None;
        // Highest seq whose answer has been processed (sent as `acked`).
        let mut acked = 0u64;
        let mut upload_due = true;
        // A file notification can arrive a few microseconds before the app's
        // commit is visible (the WAL is written before its index is updated),
        // so an empty read after a wake-up is looked at again shortly.
        let mut recheck: Option<(Instant, u32)> = None;
        let mut woken = false;
        // Set when the next read must not be skipped on an unchanged
        // `data_version` (timer, after an answer, first read).
        let mut full_read = true;
        let mut data_version: Option<i64> = None;
        loop {
            let ack_deadline = inflight.front().map(|i| i.deadline);
            tokio::select! {
                m = ws.next() => {
                    read_deadline = Instant::now() + rc.read_timeout.0;
                    match m {
                        None => return Err(SessionError::Retry("hub closed the connection".into())),
                        Some(Err(e)) => return Err(ws_err(e)),
                        Some(Ok(Message::Binary(b))) => {
                            let frame = proto::decode::<HubFrame>(&b).map_err(|e| {
                                SessionError::Retry(format!("hub sent a frame this daemon cannot read ({e}); reconnecting"))
                            })?;
                            match frame {
                                HubFrame::Changes(c) => {
                                    let n = c.changes.len() as u64;
                                    let frame_bytes = b.len() as u64;
                                    let (up_to, head) = (c.up_to, c.head);
                                    let changes = c.changes;
                                    let t0 = std::time::Instant::now();
                                    self.db.call(move |r| r.apply_remote(&changes, up_to)).await??;
                                    p.metrics.downloaded(n, frame_bytes);
                                    tracing::trace!(n, took = ?t0.elapsed(), "applied remote changes");
                                    self.update(|s| {
                                        s.cursor = s.cursor.max(up_to);
                                        s.hub_head = s.hub_head.max(head).max(up_to);
                                        s.downloaded += n;
                                        s.downloaded_bytes += frame_bytes;
                                    });
                                    let _ = self.events.send(Event::Download { db: p.name.clone(), changes: n, cursor: up_to, hub_head: head });
                                }
                                HubFrame::CaughtUp(c) => {
                                    let head = c.head;
                                    self.db.call(move |r| r.apply_remote(&[], head)).await??;
                                    self.update(|s| {
                                        s.cursor = s.cursor.max(head);
                                        s.hub_head = s.hub_head.max(head);
                                        s.caught_up = true;
                                    });
                                }
                                HubFrame::UploadResult(res) => {
                                    let Some(sent) = inflight.pop_front() else {
                                        return Err(SessionError::Retry("hub answered an upload that was not sent".into()));
                                    };
                                    if res.batch != sent.batch {
                                        return Err(SessionError::Retry(format!("hub answered batch {} while {} was in flight", res.batch, sent.batch)));
                                    }
                                    let summary = UploadSummary::of(&res.results);
                                    p.metrics.uploaded(&summary, sent.bytes, &sent.read.captured_ms);
                                    let results = res.results;
                                    let read = sent.read;
                                    let through = read.through;
                                    let t0 = std::time::Instant::now();
                                    let (done, pending) = self.db.call(move |r| -> Result<_, LocalError> {
                                        let done = r.apply_results(&read, &results)?;
                                        Ok((done, r.pending()?))
                                    }).await??;
                                    tracing::trace!(took = ?t0.elapsed(), "applied upload results");
                                    log_summary(sent.batch, &summary, done.resent);
                                    acked = acked.max(through);
                                    let failed = (summary.materialize_error > 0).then(|| summary.first_error.clone().unwrap_or_default());
                                    let _ = self.events.send(Event::Upload { db: p.name.clone(), summary: summary.clone() });
                                    self.update(|s| {
                                        s.set_pending(&pending);
                                        s.uploaded += summary.applied;
                                        s.uploaded_bytes += sent.bytes;
                                        s.last_upload = Some(summary);
                                    });
                                    if let Some(why) = failed {
                                        // The hub closes after a failed batch;
                                        // everything unanswered goes again
                                        // after backoff.
                                        return Err(SessionError::Retry(format!("hub could not store a batch: {why}")));
                                    }
                                    upload_due = true;
                                    full_read = true;
                                }
                                HubFrame::Error(e) => {
                                    let err = hub_error(e.code, &e.message);
                                    if e.code == ErrorCode::Forbidden && !inflight.is_empty() {
                                        // Read-only token: keep the changes, stop uploading.
                                        inflight.clear();
                                        uploads_allowed = false;
                                        tracing::error!("{}", e.message);
                                        self.update(|s| s.last_error = Some(e.message.clone()));
                                    } else {
                                        return Err(err);
                                    }
                                }
                                HubFrame::Welcome(_) => return Err(SessionError::Retry("hub sent welcome twice".into())),
                            }
                        }
                        Some(Ok(Message::Close(f))) => {
                            let why = f.map(|f| format!("{} {}", u16::from(f.code), f.reason)).unwrap_or_default();
                            return Err(SessionError::Retry(format!("hub closed the connection {why}")));
                        }
                        Some(Ok(_)) => {}
                    }
                }
                w = self.wake.recv(), if self.wake_open => {
                    match w {
                        Some(()) => {
                            upload_due = true;
                            woken = true;
                            recheck = None;
                        }
                        // The watcher is gone; the poll timer takes over.
                        None => self.wake_open = false,
                    }
                }
                _ = poll.tick() => {
                    upload_due = true;
                    full_read = true;
                }
                _ = sleep_opt(recheck.map(|r| r.0)) => {
                    upload_due = true;
                    woken = true;
                }
                c = self.ctl.recv(), if self.ctl_open => match c {
                    Some(Control::Reconnect { reply }) => {
                        let _ = reply.send(ReconnectOutcome::AlreadyConnected);
                    }
                    Some(Control::Pause { upload, download }) => {
                        if self.set_pause(true, upload, download) {
                            let _ = ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "paused".into() })).await;
                            return Ok(End::Reconfigure);
                        }
                    }
                    Some(Control::Resume { upload, download }) => {
                        let reconnect = self.set_pause(false, upload, download);
                        if reconnect {
                            let _ = ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "resumed".into() })).await;
                            return Ok(End::Reconfigure);
                        }
                        upload_due = true;
                        full_read = true;
                    }
                    // The daemon dropped the handle (reload, shutdown).
                        None => self.ctl_open = false,
                },
                _ = ping.tick() => {
                    ws.send(Message::Ping(Vec::new().into())).await.map_err(ws_err)?;
                }
                _ = tokio::time::sleep_until(read_deadline) => {
                    return Err(SessionError::Retry(format!("nothing received from the hub for {}; reconnecting", rc.read_timeout)));
                }
                _ = sleep_opt(ack_deadline) => {
                    return Err(SessionError::Retry(format!("upload not answered within {ACK_TIMEOUT:?}; reconnecting")));
                }
                _ = self.shutdown.cancelled(), if dying.is_none() => {
                    if inflight.is_empty() {
                        let _ = ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "daemon shutting down".into() })).await;
                        return Ok(End::Shutdown);
                    }
                    // Let the batches already sent be answered, so their
                    // log rows are cleared now rather than resent later.
                    tracing::info!(in_flight = inflight.len(), "shutting down: waiting for the hub's answers");
                    dying = Some(Instant::now() + p.shutdown_timeout);
                    self.update(|s| s.session = SessionState::Dying);
                }
                _ = sleep_opt(dying) => {
                    tracing::warn!("shutting down with unanswered uploads; they stay captured and go out on the next start");
                    let _ = ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "daemon shutting down".into() })).await;
                    return Ok(End::Shutdown);
                }
            }
            if dying.is_some() {
                if inflight.is_empty() {
                    let _ = ws
                        .close(Some(CloseFrame {
                            code: CloseCode::Normal,
                            reason: "daemon shutting down".into(),
                        }))
                        .await;
                    return Ok(End::Shutdown);
                }
                continue;
            }
            if upload_due && inflight.len() < MAX_INFLIGHT && uploads_allowed && !self.upload_paused
            {
                upload_due = false;
                let after = inflight.back().map(|i| i.read.through).unwrap_or(0);
                let idle = inflight.is_empty();
                // A wake-up from the file watcher is often tether's own
                // write (applying the hub's changes). `data_version` moves
                // only when another connection committed, so an unchanged
                // value means there is nothing new to read.
                let only_wake = woken && !full_read;
                let seen = data_version;
                let (batch, version) = self
                    .db
                    .call(move |r| -> Result<_, LocalError> {
                        let v = r.data_version()?;
                        if only_wake && Some(v) == seen {
                            return Ok((None, v));
                        }
                        let batch = r.read_batch(after, MAX_BATCH_CHANGES, MAX_BATCH_BYTES)?;
                        if batch.changes.is_empty() && batch.through > after && idle {
                            // Only rows of tables no longer synced: nothing
                            // to send, mark them answered.
                            r.apply_results(&batch, &[])?;
                        }
                        Ok((Some((batch, r.pending()?)), v))
                    })
                    .await??;
                data_version = Some(version);
                full_read = false;
                let (read, pending) = batch.unwrap_or_default();
                if !only_wake || data_version != seen {
                    self.update(|s| s.set_pending(&pending));
                }
                let attempt = recheck.take().map(|r| r.1).unwrap_or(0);
                if read.changes.is_empty() && woken && attempt < RECHECK_DELAYS.len() as u32 {
                    recheck = Some((
                        Instant::now() + RECHECK_DELAYS[attempt as usize],
                        attempt + 1,
                    ));
                }
                woken = false;
                if !read.changes.is_empty() {
                    let batch = self.next_batch;
                    self.next_batch += 1;
                    // A full batch means more may be waiting: read on, up to
                    // the in-flight window.
                    let full = read.changes.len() >= MAX_BATCH_CHANGES / 2
                        || read.changes.iter().map(Change::wire_size).sum::<usize>()
                            >= MAX_BATCH_BYTES / 2;
                    upload_due |= full;
                    full_read |= full;
                    let frame = ClientFrame::Upload(Upload {
                        batch,
                        acked,
                        changes: read.changes,
                    });
                    let bytes = proto::encode(&frame);
                    let frame_bytes = bytes.len() as u64;
                    let ClientFrame::Upload(Upload { changes, .. }) = frame else {
                        unreachable!()
                    };
                    let captured_ms = read.captured_ms;
                    ws.send(Message::Binary(bytes.into()))
                        .await
                        .map_err(ws_err)?;
                    inflight.push_back(Inflight {
                        batch,
                        bytes: frame_bytes,
                        read: Batch {
                            changes,
                            through: read.through,
                            captured_ms,
                        },
                        deadline: Instant::now() + ACK_TIMEOUT,
                    });
                }
            }
        }
    }
}

fn log_summary(batch: u64, s: &UploadSummary, resent: u64) {
    if s.conflict + s.invalid + s.materialize_error > 0 {
        tracing::warn!(batch, total = s.total, applied = s.applied, conflict = s.conflict, invalid = s.invalid, invalid_reasons = ?s.invalid_reasons, materialize_error = s.materialize_error, resent, first_error = ?s.first_error, "upload result");
    } else {
        tracing::debug!(batch, total = s.total, applied = s.applied, "upload result");
    }
}

/// Reads frames until a binary one arrives.
async fn next_frame(ws: &mut connect::Ws) -> Result<HubFrame, SessionError> {
    loop {
        match ws.next().await {
            None => return Err(SessionError::Retry("hub closed the connection".into())),
            Some(Err(e)) => return Err(ws_err(e)),
            Some(Ok(Message::Binary(b))) => {
                return proto::decode(&b).map_err(|e| {
                    SessionError::Retry(format!("unreadable frame from the hub: {e}"))
                })
            }
            Some(Ok(Message::Close(f))) => {
                let why = f.map(|f| f.reason.to_string()).unwrap_or_default();
                return Err(SessionError::Retry(format!(
                    "hub closed the connection: {why}"
                )));
            }
            Some(Ok(_)) => {}
        }
    }
}

fn hub_error(code: ErrorCode, message: &str) -> SessionError {
    let text = format!("hub error {}: {message}", code.as_str());
    match code {
        ErrorCode::Unauthorized => SessionError::Unauthorized(text),
        c if c.is_fatal() => SessionError::Fatal(text),
        _ => SessionError::Retry(text),
    }
}

fn frame_name(f: &HubFrame) -> &'static str {
    match f {
        HubFrame::Welcome(_) => "welcome",
        HubFrame::Changes(_) => "changes",
        HubFrame::CaughtUp(_) => "caught_up",
        HubFrame::UploadResult(_) => "upload_result",
        HubFrame::Error(_) => "error",
    }
}

/// Reconnection delays: exponential (`backon`: `initial`, times `multiplier`
/// per attempt, capped at `max`) with full jitter, i.e. each delay is drawn
/// uniformly between zero and the exponential value, so that many daemons
/// cut off together do not come back together. `backon`'s own jitter adds
/// up to one more delay on top (exceeding `max`), hence this form. A floor
/// of 10 ms keeps a failing hub from being hammered.
pub fn backoff(r: &Reconnect) -> impl Iterator<Item = Duration> {
    use rand::Rng;
    backon::ExponentialBuilder::default()
        .with_min_delay(r.initial.0)
        .with_max_delay(r.max.0)
        .with_factor(r.multiplier)
        .without_max_times()
        .build()
        .map(|d| {
            let jittered = d.mul_f64(rand::thread_rng().gen_range(0.0..=1.0));
            jittered.max(Duration::from_millis(10).min(d))
        })
}

/// Changes a published status and emits events for what changed.
pub fn update_status(
    status: &watch::Sender<Status>,
    events: &broadcast::Sender<Event>,
    f: impl FnOnce(&mut Status),
) {
    let mut emitted = Vec::new();
    status.send_modify(|s| {
        let (conn, sess) = (s.connection, s.session);
        f(s);
        if s.connection != conn {
            emitted.push(Event::Connection {
                db: s.name.clone(),
                old: conn,
                new: s.connection,
            });
        }
        if s.session != sess {
            emitted.push(Event::Session {
                db: s.name.clone(),
                old: sess,
                new: s.session,
            });
        }
    });
    for e in emitted {
        // No watcher is fine.
        let _ = events.send(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    #[test]
    fn backoff_grows_exponentially_with_full_jitter_and_stays_under_max() {
        let r = Reconnect {
            initial: Dur(Duration::from_millis(100)),
            max: Dur(Duration::from_secs(2)),
            multiplier: 2.0,
            ..Reconnect::default()
        };
        let runs: Vec<Vec<Duration>> = (0..200).map(|_| backoff(&r).take(8).collect()).collect();
        for run in &runs {
            for (i, d) in run.iter().enumerate() {
                let cap = Duration::from_millis(100 * (1 << i)).min(Duration::from_secs(2));
                assert!(*d <= cap, "attempt {i}: {d:?} above {cap:?}");
            }
        }
        // Full jitter: delays spread over the whole range, not just above it.
        let late: Vec<Duration> = runs.iter().map(|r| r[7]).collect();
        assert!(late.iter().any(|d| *d < Duration::from_millis(700)));
        assert!(late.iter().any(|d| *d > Duration::from_millis(1300)));
    }
}
