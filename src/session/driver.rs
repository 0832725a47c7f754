//! The session driver: performs what the [`Machine`] decides.
//!
//! One loop per session selects the next input (a frame from the hub while
//! waiting output is written, see [`Conn`]; a file wake-up; an operator
//! command; the machine's next deadline; shutdown), feeds it to the machine
//! and performs the actions. Database calls run on the database's own thread
//! ([`LocalDb`]); they never wait on the hub, so the socket is read again as
//! soon as they return. The loop never waits on a send alone: outgoing frames
//! are written as the socket takes them, while inbound frames are read, so
//! two busy peers cannot end up each waiting for the other to read.
//!
//! Bounds: at most [`super::conn::OUT_LIMIT`] frames wait for the socket
//! (the machine keeps at most [`super::machine::MAX_INFLIGHT`] uploads in
//! flight); the file watcher's wake-up channel holds one wake-up; operator
//! commands arrive on the daemon's bounded channel.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::conn::Conn;
use super::connect;
use super::machine::{self, Action, Command, FailureClass, Input, LocalInfo, Machine, Note};
use super::status::UploadState;
use super::{
    update_status, ConnectionState, Control, Event, ReconnectOutcome, SessionError, SessionParams,
    SessionState, Status, TokenSource,
};
use crate::clock::sleep_opt;
use crate::local::{LocalDb, LocalError};
use crate::proto;

/// While the hub refuses the token, the token file is looked at this often.
const TOKEN_POLL: Duration = Duration::from_millis(500);
/// How long a write to the local database keeps being tried while the app
/// holds its write lock, before the session gives up and reconnects (the
/// hub drops a client that takes nothing for its read timeout, 2 minutes by
/// default, so this stays well below).
const LOCAL_PATIENCE: Duration = Duration::from_secs(30);

/// A running session; see the module docs.
pub struct Session {
    params: Arc<SessionParams>,
    db: LocalDb,
    status: watch::Sender<Status>,
    wake: mpsc::Receiver<()>,
    shutdown: CancellationToken,
    ctl: mpsc::Receiver<Control>,
    events: broadcast::Sender<Event>,
    /// The token sent on the latest connection attempt.
    last_token: Option<String>,
    /// Replies to operator reconnects, answered by the machine.
    reconnect_replies: VecDeque<oneshot::Sender<ReconnectOutcome>>,
    /// Replies to head requests, answered in order by the machine.
    head_replies: VecDeque<oneshot::Sender<Option<u64>>>,
    conn: Option<Conn>,
    machine: Machine,
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
        let rc = params.reconnect.clone();
        let cfg = machine::Config {
            dataset: params.dataset.clone(),
            echo_own: params.echo_own,
            ping_interval: rc.ping_interval.0,
            read_timeout: rc.read_timeout.0,
            max_backoff: rc.max.0,
            shutdown_timeout: params.shutdown_timeout,
        };
        let machine = Machine::new(
            cfg,
            upload_paused,
            download_paused,
            Box::new(move || Box::new(super::backoff(&rc))),
        );
        Session {
            params: Arc::new(params),
            db,
            status,
            wake,
            shutdown,
            ctl,
            events,
            last_token: None,
            reconnect_replies: VecDeque::new(),
            head_replies: VecDeque::new(),
            conn: None,
            machine,
        }
    }

    fn update(&self, f: impl FnOnce(&mut Status)) {
        update_status(&self.status, &self.events, f);
    }

    /// Runs until shutdown.
    pub async fn run(mut self) {
        let span =
            tracing::info_span!("sync", db = %self.params.name, dataset = %self.params.dataset);
        if connect::token_in_clear(&self.params.url) {
            span.in_scope(|| tracing::warn!(url = %self.params.url, "the hub is reached over plain ws:// on another machine: the token and every row cross the network in clear; use wss:// (the hub's tls_cert and tls_key) or a TLS-terminating proxy"));
        }
        tracing::Instrument::instrument(self.drive(), span).await;
        self.update(|s| {
            s.connection = ConnectionState::Disconnected;
            s.session = SessionState::Inactive;
            s.clear_backoff();
        });
    }

    async fn drive(&mut self) {
        let mut queue: VecDeque<Input> = VecDeque::from([Input::Tick]);
        let (mut wake_open, mut ctl_open, mut shutdown_seen) = (true, true, false);
        let mut token_check = tokio::time::interval(TOKEN_POLL);
        loop {
            while let Some(input) = queue.pop_front() {
                for action in self.machine.handle(input, Instant::now()) {
                    match self.perform(action).await {
                        Step::Next(Some(i)) => queue.push_back(i),
                        Step::Next(None) => {}
                        Step::Stop => return,
                    }
                }
            }
            let deadline = self.machine.next_deadline();
            // Timers run even while frames keep arriving.
            if deadline.is_some_and(|d| d <= Instant::now()) {
                self.tick_into(&mut queue);
                continue;
            }
            let waiting_for_token = self.machine.waiting_for_token();
            // Not biased: a busy connection must not starve operator
            // commands or file wake-ups.
            let input = tokio::select! {
                _ = self.shutdown.cancelled(), if !shutdown_seen => {
                    shutdown_seen = true;
                    Input::Shutdown
                }
                i = recv_conn(&mut self.conn) => i,
                c = self.ctl.recv(), if ctl_open => match c {
                    Some(Control::Reconnect { reply }) => {
                        self.reconnect_replies.push_back(reply);
                        Input::Command(Command::Reconnect)
                    }
                    Some(Control::FetchHead { reply }) => {
                        self.head_replies.push_back(reply);
                        Input::Command(Command::FetchHead)
                    }
                    Some(Control::Pause { upload, download }) => Input::Command(Command::Pause { upload, download }),
                    Some(Control::Resume { upload, download }) => Input::Command(Command::Resume { upload, download }),
                    // The daemon dropped the handle (reload, shutdown).
                    None => { ctl_open = false; continue; }
                },
                w = self.wake.recv(), if wake_open => match w {
                    Some(()) => Input::Wake,
                    // The watcher is gone; the poll timer takes over.
                    None => { wake_open = false; continue; }
                },
                _ = sleep_opt(deadline) => Input::Tick,
                _ = token_check.tick(), if waiting_for_token => {
                    if !self.token_changed() { continue; }
                    Input::TokenChanged
                }
            };
            if matches!(input, Input::Tick) {
                self.tick_into(&mut queue);
            } else {
                queue.push_back(input);
            }
        }
    }

    /// A write to the local database, tried again while the app holds its
    /// write lock (up to [`LOCAL_PATIENCE`]). Meanwhile the connection is
    /// kept alive with pings, so that a hub with a short read timeout does
    /// not take the wait for a dead client.
    async fn local<R, F>(&mut self, f: F) -> Result<Result<R, LocalError>, crate::local::ThreadGone>
    where
        R: Send + 'static,
        F: Fn(&mut crate::local::Replica) -> Result<R, LocalError> + Send + Sync + 'static,
    {
        let db = self.db.clone();
        let call = db.call_patient(f, LOCAL_PATIENCE);
        tokio::pin!(call);
        let period = self.params.reconnect.ping_interval.0;
        let mut ping = tokio::time::interval_at(Instant::now() + period, period);
        loop {
            tokio::select! {
                r = &mut call => return r,
                _ = ping.tick() => {
                    if let Some(c) = &mut self.conn {
                        c.keep_alive();
                    }
                }
            }
        }
    }

    /// A deadline is due: first, frames already there, then bytes still
    /// moving (a large frame on a slow link) count as a sign of life.
    /// The tick always comes last, so every due deadline is serviced even
    /// while frames keep arriving.
    fn tick_into(&mut self, queue: &mut VecDeque<Input>) {
        // Frames that arrived while the loop was busy (a long local write)
        // come first: the hub was not silent, nobody was listening.
        if let Some(c) = &mut self.conn {
            if let Some(input) = c.next_input().now_or_never() {
                queue.push_back(input);
            }
            if c.bytes_moved() {
                queue.push_back(Input::Alive);
            }
        }
        queue.push_back(Input::Tick);
    }

    /// Whether the token file now holds another token than the refused one.
    fn token_changed(&self) -> bool {
        let TokenSource::File(_) = &self.params.token else {
            return false;
        };
        match self.params.token.read() {
            Ok(t) => self.last_token.as_deref() != Some(t.as_str()),
            Err(_) => false,
        }
    }

    async fn perform(&mut self, action: Action) -> Step {
        match action {
            Action::Connect => return Step::Next(Some(self.open().await)),
            Action::Send(bytes) => return self.send(Message::Binary(bytes.into())),
            Action::Ping => return self.send(Message::Ping(Vec::new().into())),
            Action::Close(reason) => {
                if let Some(c) = self.conn.take() {
                    c.close(reason).await;
                }
                self.update(|s| {
                    s.connection = ConnectionState::Disconnected;
                    s.caught_up = false;
                });
            }
            Action::Recover => {
                match self
                    .local(|r: &mut crate::local::Replica| r.recover())
                    .await
                {
                    Ok(Ok(rows)) => {
                        self.params.metrics.recoveries.inc();
                        self.update(|s| {
                            s.recoveries += 1;
                            s.last_recovery_rows = Some(rows);
                        });
                    }
                    Ok(Err(e)) => return local_failed(e.into()),
                    Err(e) => return local_failed(e.into()),
                }
            }
            Action::RenewIdentity => {
                // The replica logs the old and the new identity.
                let renew = |r: &mut crate::local::Replica| r.renew_identity().map(|_| ());
                match self.local(renew).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return local_failed(e.into()),
                    Err(e) => return local_failed(e.into()),
                }
            }
            Action::ReadBatch {
                after,
                skip_if_version,
                idle,
            } => return Step::Next(Some(self.read_batch(after, skip_if_version, idle).await)),
            Action::ApplyRemote {
                changes,
                up_to,
                head,
                bytes,
            } => return self.apply_remote(changes, up_to, head, bytes).await,
            Action::ApplyResults {
                sent,
                results,
                summary,
            } => return self.apply_results(*sent, results, summary).await,
            Action::RetryHeld => match self
                .db
                .call(|r| -> Result<_, LocalError> { Ok((r.retry_held()?, r.pending()?)) })
                .await
            {
                Ok(Ok((report, pending))) => {
                    if report.applied > 0 {
                        tracing::info!(
                            applied = report.applied,
                            still_held = report.still_held,
                            "changes the database had refused now applied"
                        );
                    }
                    self.machine
                        .held_remaining(report.still_held, Instant::now());
                    self.update(|s| s.set_pending(&pending));
                }
                // Not worth a connection: tried again at the next turn.
                Ok(Err(e)) => tracing::warn!(error = %e, "could not retry the held changes"),
                Err(e) => tracing::warn!(error = %e, "could not retry the held changes"),
            },
            Action::ReconnectAnswer(outcome) => {
                if outcome == ReconnectOutcome::Woken {
                    tracing::info!("reconnecting now at the operator's request");
                }
                if let Some(reply) = self.reconnect_replies.pop_front() {
                    let _ = reply.send(outcome);
                }
            }
            Action::HeadAnswer(head) => {
                if let Some(reply) = self.head_replies.pop_front() {
                    let _ = reply.send(head);
                }
            }
            Action::Note(n) => self.note(n),
            Action::Stop => return Step::Stop,
        }
        Step::Next(None)
    }

    fn send(&mut self, m: Message) -> Step {
        let Some(c) = &mut self.conn else {
            return Step::Next(None);
        };
        match c.queue(m) {
            Ok(()) => Step::Next(None),
            Err(e) => Step::Next(Some(Input::Lost(e))),
        }
    }

    /// Opens the connection: token, WebSocket, local position.
    async fn open(&mut self) -> Input {
        let p = self.params.clone();
        let token = match p.token.read() {
            Ok(t) => t,
            Err(e) => return Input::OpenFailed(e),
        };
        self.last_token = Some(token.clone());
        let ws = tokio::select! {
            ws = connect::connect(&p.url, &token, &p.dataset, p.ca_file.as_deref()) => ws,
            _ = self.shutdown.cancelled() => return Input::Shutdown,
        };
        let (ws, progress) = match ws {
            Ok(ws) => ws,
            Err(e) => return Input::OpenFailed(e),
        };
        let info = self
            .db
            .call(|r| -> Result<_, LocalError> {
                // Before the schemas: a change the app made since is built
                // into capture and announced now.
                r.check_schema()?;
                let (cursor, refetch) = r.hello_cursor()?;
                Ok(LocalInfo {
                    client_id: r.identity().client_id.clone(),
                    client_key: r.identity().client_key.clone(),
                    local_seq: r.local_seq()?,
                    anchor: r.anchor()?,
                    cursor,
                    tables: r.wire_schemas(),
                    refetch,
                })
            })
            .await;
        let info = match info {
            Ok(Ok(i)) => i,
            Ok(Err(e)) => return Input::OpenFailed(e.into()),
            Err(e) => return Input::OpenFailed(e.into()),
        };
        self.conn = Some(Conn::new(ws, progress, p.reconnect.read_timeout.0));
        Input::Opened(info)
    }

    async fn read_batch(&mut self, after: u64, skip_if: Option<i64>, idle: bool) -> Input {
        let read = self
            .local(move |r| -> Result<_, LocalError> {
                let v = r.data_version()?;
                if skip_if == Some(v) {
                    return Ok((None, None, v));
                }
                let batch =
                    r.read_batch(after, proto::MAX_BATCH_CHANGES, proto::MAX_BATCH_BYTES)?;
                if batch.changes.is_empty() && batch.through > after && idle {
                    // Only rows that are not sent (tables no longer synced,
                    // changes too large): mark them answered.
                    r.apply_results(&batch, &[])?;
                }
                Ok((Some(batch), Some(r.pending()?), v))
            })
            .await;
        match read {
            Ok(Ok((batch, pending, data_version))) => Input::BatchRead {
                batch,
                pending,
                data_version,
            },
            Ok(Err(e)) => Input::LocalFailed(e.into()),
            Err(e) => Input::LocalFailed(e.into()),
        }
    }

    async fn apply_remote(
        &mut self,
        changes: Vec<crate::proto::RemoteChange>,
        up_to: u64,
        head: u64,
        bytes: u64,
    ) -> Step {
        let n = changes.len() as u64;
        let t0 = std::time::Instant::now();
        let applied = self
            .local(move |r| -> Result<_, LocalError> {
                let a = r.apply_remote(&changes, up_to)?;
                // The exact count and reason only when something was held.
                let held_now = if a.held > 0 { Some(r.pending()?) } else { None };
                Ok((a, held_now))
            })
            .await;
        let (applied, held_now) = match applied {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => return local_failed(e.into()),
            Err(e) => return local_failed(e.into()),
        };
        tracing::trace!(n, took = ?t0.elapsed(), "applied remote changes");
        if let Some(p) = held_now {
            tracing::warn!(held = applied.held, total = p.held, newest = ?p.held_reason, "the local database refused some of the hub's changes; they are held (see `tether held`) and tried again later");
            self.machine.held_seen(Instant::now());
            self.update(|s| s.set_pending(&p));
        }
        if n > 0 {
            self.params.metrics.downloaded(n, bytes);
            let _ = self.events.send(Event::Download {
                db: self.params.name.clone(),
                changes: n,
                cursor: up_to,
                hub_head: head,
            });
        }
        self.update(|s| {
            s.reached(up_to, head);
            s.downloaded += n;
            s.downloaded_bytes += bytes;
        });
        Step::Next(None)
    }

    async fn apply_results(
        &mut self,
        sent: machine::Inflight,
        results: Vec<crate::proto::ChangeResult>,
        summary: crate::proto::UploadSummary,
    ) -> Step {
        self.params
            .metrics
            .uploaded(&summary, sent.bytes, &sent.read.captured_ms);
        let (batch, bytes) = (sent.batch, sent.bytes);
        let read = sent.read;
        let t0 = std::time::Instant::now();
        let done = self
            .local(move |r| -> Result<_, LocalError> {
                let done = r.apply_results(&read, &results)?;
                Ok((done, r.pending()?))
            })
            .await;
        let (done, pending) = match done {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => return local_failed(e.into()),
            Err(e) => return local_failed(e.into()),
        };
        tracing::trace!(took = ?t0.elapsed(), "applied upload results");
        log_summary(batch, &summary, done.resent);
        let _ = self.events.send(Event::Upload {
            db: self.params.name.clone(),
            summary: summary.clone(),
        });
        self.update(|s| {
            s.uploaded += summary.applied;
            s.uploaded_bytes += bytes;
            s.upload_totals.add(&summary);
            s.last_upload = Some(summary);
        });
        Step::Next(Some(Input::ResultsApplied { pending }))
    }

    /// Reports a note in the status, the events, the metrics and the log.
    fn note(&mut self, n: Note) {
        match n {
            Note::Connecting { reconnect } => {
                if reconnect {
                    self.params.metrics.reconnects.inc();
                }
                self.update(|s| {
                    s.connection = ConnectionState::Connecting;
                    if s.session == SessionState::Paused {
                        s.session = SessionState::Active;
                    }
                    s.clear_backoff();
                });
            }
            Note::Connected {
                cursor,
                head,
                access,
            } => {
                tracing::info!(cursor, head, access = ?access, "connected");
                if access == proto::Access::ReadOnly {
                    tracing::warn!("the hub token is read-only: local changes stay captured and are not uploaded; downloads go on");
                }
                self.params.metrics.connects.inc();
                self.update(|s| {
                    s.connection = ConnectionState::Connected;
                    s.session = SessionState::Active;
                    s.hub_head = head;
                    s.cursor = cursor;
                    s.connects += 1;
                    s.last_error = None;
                    s.upload = match access {
                        proto::Access::ReadWrite => UploadState::Allowed,
                        proto::Access::ReadOnly => UploadState::ReadOnly,
                    };
                });
            }
            Note::CaughtUp => self.update(|s| s.caught_up = true),
            Note::HubHead(head) => self.update(|s| s.hub_head = s.hub_head.max(head)),
            Note::Cursor { up_to, head } => self.update(|s| s.reached(up_to, head)),
            Note::Pending(p) => self.update(|s| s.set_pending(&p)),
            Note::PauseFlags { upload, download } => {
                tracing::info!(
                    upload_paused = upload,
                    download_paused = download,
                    "pause flags changed"
                );
                self.update(|s| {
                    s.upload_paused = upload;
                    s.download_paused = download;
                });
            }
            Note::Paused => self.update(|s| {
                s.session = SessionState::Paused;
                s.connection = ConnectionState::Disconnected;
                s.clear_backoff();
            }),
            Note::Failed {
                error,
                class,
                delay,
            } => {
                match class {
                    FailureClass::Retry => tracing::info!(retry_in = ?delay, "{error}"),
                    _ => tracing::error!(retry_in = ?delay, "{error}"),
                }
                let _ = self.events.send(Event::Error {
                    db: self.params.name.clone(),
                    message: error.clone(),
                });
                let state = match class {
                    FailureClass::Retry => SessionState::Active,
                    FailureClass::Unauthorized => SessionState::WaitingForAccessToken,
                    FailureClass::Fatal => SessionState::Error,
                };
                self.update(|s| {
                    s.connection = ConnectionState::Disconnected;
                    s.caught_up = false;
                    s.session = state;
                    s.last_error = Some(error);
                    s.set_backoff(delay);
                });
            }
            Note::ReadOnly(message) => {
                tracing::error!("{message}");
                self.update(|s| {
                    s.upload = UploadState::ReadOnly;
                    s.last_error = Some(message);
                });
            }
            Note::Dying { in_flight } => {
                tracing::info!(in_flight, "shutting down: waiting for the hub's answers");
                self.update(|s| s.session = SessionState::Dying);
            }
            Note::DrainTimedOut => tracing::warn!(
                "shutting down with unanswered uploads; they stay captured and go out on the next start"
            ),
        }
    }
}

/// What performing an action leads to.
enum Step {
    /// Go on, feeding this input to the machine next.
    Next(Option<Input>),
    /// The session is over.
    Stop,
}

fn local_failed(e: SessionError) -> Step {
    Step::Next(Some(Input::LocalFailed(e)))
}

/// The next input from the open connection; pending while none is open.
async fn recv_conn(conn: &mut Option<Conn>) -> Input {
    match conn {
        Some(c) => c.next_input().await,
        None => std::future::pending().await,
    }
}

fn log_summary(batch: u64, s: &crate::proto::UploadSummary, resent: u64) {
    if s.conflict + s.invalid + s.materialize_error > 0 {
        tracing::warn!(batch, total = s.total, applied = s.applied, conflict = s.conflict, invalid = s.invalid, invalid_reasons = ?s.invalid_reasons, materialize_error = s.materialize_error, resent, first_error = ?s.first_error, "upload result");
    } else {
        tracing::debug!(batch, total = s.total, applied = s.applied, "upload result");
    }
}
