//! The daemon's session protocol as a state machine without I/O.
//!
//! [`Machine::handle`] takes one [`Input`] (a frame from the hub, the result
//! of a local read or write, a file wake-up, a timer tick, an operator
//! command, shutdown) with the current time and returns the [`Action`]s the
//! driver ([`super::driver`]) performs: open a connection, send a frame, read
//! or write the local database, close, report. Nothing here touches a socket,
//! a file or a clock, so every transition is covered by table tests below.
//!
//! The states ([`State`]) carry their data: a connection's in-flight uploads
//! live inside [`State::Live`], the cause of a failure inside
//! [`State::Backoff`]. What the control socket reports is the plain
//! [`super::Status`], fed by [`Note`]s.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::checks::{self, Position};
use super::SessionError;
use crate::local::{Batch, Pending};
use crate::proto::{
    self, Access, Change, ChangeResult, ClientFrame, ErrorCode, HeadAsk, Hello, HubFrame,
    RemoteChange, TableSchema, Upload, UploadResult, UploadSummary, Welcome, FEATURE_HEAD,
    MAX_BATCH_BYTES, MAX_BATCH_CHANGES, PROTOCOL_VERSION,
};

/// Upload batches sent before the first is answered. The hub answers in
/// order and keeps the answers of unacknowledged batches, so a resend after a
/// lost connection is answered exactly as the first time.
pub const MAX_INFLIGHT: usize = 4;
/// An upload not answered within this time is taken as a dead connection.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// Safety-net timer: pending changes are looked at least this often, even if
/// no file notification arrives.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Time allowed for the hub's `welcome` after `hello`.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that stayed up this long resets the backoff.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// Changes the local database refused are tried again this often.
pub const HELD_RETRY: Duration = Duration::from_secs(30);
/// Delays of the re-reads after a wake-up that found nothing: a file
/// notification can arrive a few microseconds before the app's commit is
/// visible (the WAL is written before its index is updated).
const RECHECK_DELAYS: [Duration; 3] = [
    Duration::from_micros(500),
    Duration::from_millis(2),
    Duration::from_millis(10),
];

/// Settings the machine needs; everything else stays in the driver.
#[derive(Clone, Debug)]
pub struct Config {
    pub dataset: String,
    pub echo_own: bool,
    pub ping_interval: Duration,
    pub read_timeout: Duration,
    /// Backoff after a fatal error or a refused token.
    pub max_backoff: Duration,
    /// On shutdown, how long in-flight uploads may take to be answered.
    pub shutdown_timeout: Duration,
}

/// Where the local database stands, read by the driver before `hello`.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalInfo {
    pub client_id: String,
    pub client_key: String,
    pub cursor: u64,
    /// Highest client seq this database ever numbered (for the welcome check).
    pub local_seq: u64,
    /// The newest change of the hub's log this database knows the content of.
    pub anchor: Option<crate::proto::Anchor>,
    pub tables: Vec<TableSchema>,
    /// Tables are being downloaded again after an upgrade: the hub echoes
    /// this device's own changes too, since their rows may hold values of
    /// columns it did not have.
    pub refetch: bool,
}

/// What the operator asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Pause {
        upload: bool,
        download: bool,
    },
    Resume {
        upload: bool,
        download: bool,
    },
    Reconnect,
    /// Ask the hub for the dataset's head now (answered by
    /// [`Action::HeadAnswer`]).
    FetchHead,
}

/// Everything the machine reacts to.
#[derive(Debug)]
pub enum Input {
    /// The connection is open and the local position read; `hello` may go.
    Opened(LocalInfo),
    /// Opening the connection failed.
    OpenFailed(SessionError),
    /// A frame from the hub, with its encoded size.
    Frame(HubFrame, usize),
    /// Any other message from the hub (ping, pong): the connection is alive.
    Alive,
    /// The connection broke (read error, close, a send that timed out).
    Lost(SessionError),
    /// Result of [`Action::ReadBatch`]; `None` when the read was skipped
    /// because nothing changed.
    BatchRead {
        batch: Option<Batch>,
        pending: Option<Pending>,
        data_version: i64,
    },
    /// Result of [`Action::ApplyResults`]: the log after the answer.
    ResultsApplied {
        pending: Pending,
    },
    /// A local database call failed for the whole database.
    LocalFailed(SessionError),
    /// The database file changed.
    Wake,
    /// A deadline from [`Machine::next_deadline`] may have passed.
    Tick,
    /// The token file changed while the hub refused the old token.
    TokenChanged,
    Command(Command),
    Shutdown,
}

/// What the driver does for the machine, in order.
#[derive(Debug)]
pub enum Action {
    /// Read the token, open the WebSocket, read [`LocalInfo`]; answer with
    /// [`Input::Opened`] or [`Input::OpenFailed`].
    Connect,
    /// Queue an encoded frame for the writer.
    Send(Vec<u8>),
    /// Queue a WebSocket ping.
    Ping,
    /// Close the connection with this reason (a close frame if possible).
    Close(&'static str),
    /// The hub's history went back (store restored): new identity, cursor
    /// 0, every row captured again ([`crate::local::Replica::recover`]).
    Recover,
    /// Give the database a new client identity (the hub found another file
    /// using this one, or changes of it this file never made) and download
    /// the dataset again; the next connection says `hello` with it.
    RenewIdentity,
    /// Read the next upload batch after `after`; skip the read when
    /// `skip_if_version` equals the database's `data_version`. When `idle`
    /// (nothing in flight), a batch with no changes is marked answered.
    ReadBatch {
        after: u64,
        skip_if_version: Option<i64>,
        idle: bool,
    },
    /// Apply the hub's changes and move the cursor, in one transaction.
    ApplyRemote {
        changes: Vec<RemoteChange>,
        up_to: u64,
        head: u64,
        bytes: u64,
    },
    /// Apply the hub's answer to one batch.
    ApplyResults {
        sent: Box<Inflight>,
        results: Vec<ChangeResult>,
        summary: UploadSummary,
    },
    /// Try the changes the local database refused again.
    RetryHeld,
    /// Answer the operator's reconnect request.
    ReconnectAnswer(super::ReconnectOutcome),
    /// Answer the oldest head request: the hub's head, or `None` when it
    /// cannot be asked (not connected, or a hub without the feature).
    HeadAnswer(Option<u64>),
    /// Report a change of state or progress.
    Note(Note),
    /// The session is over.
    Stop,
}

/// What changed, for status, events, metrics and logs.
#[derive(Debug, PartialEq)]
pub enum Note {
    Connecting {
        reconnect: bool,
    },
    Connected {
        cursor: u64,
        head: u64,
        access: Access,
    },
    CaughtUp,
    /// The hub sent everything up to `up_to`, none of it for this device.
    Cursor {
        up_to: u64,
        head: u64,
    },
    /// The hub's head, as it answered a head request.
    HubHead(u64),
    Pending(Pending),
    PauseFlags {
        upload: bool,
        download: bool,
    },
    Paused,
    /// The connection ended; the session tries again after `delay`.
    Failed {
        error: String,
        class: FailureClass,
        delay: Duration,
    },
    /// Uploads stay captured: the token is read-only.
    ReadOnly(String),
    Dying {
        in_flight: usize,
    },
    /// Shutdown gave up waiting for answers.
    DrainTimedOut,
}

/// How bad a failure is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureClass {
    /// Network, hub busy: retried with exponential backoff.
    Retry,
    /// The hub refused the token: retried when the token file changes or
    /// after the longest backoff.
    Unauthorized,
    /// Nothing changes until an operator fixes something.
    Fatal,
}

impl FailureClass {
    pub fn of(e: &SessionError) -> FailureClass {
        match e {
            SessionError::Retry(_) => FailureClass::Retry,
            SessionError::Unauthorized(_) => FailureClass::Unauthorized,
            SessionError::Fatal(_) => FailureClass::Fatal,
        }
    }
}

/// One upload batch sent and not yet answered.
#[derive(Debug)]
pub struct Inflight {
    pub batch: u64,
    /// What was sent and the log range it answers.
    pub read: Batch,
    /// Encoded size of the upload frame.
    pub bytes: u64,
    deadline: Instant,
    /// Parts of a split answer received so far.
    results: Vec<ChangeResult>,
}

/// When the next local read happens and how thorough it is.
#[derive(Debug, Default, PartialEq)]
struct ReadPlan {
    /// A read is due.
    due: bool,
    /// The read may be skipped if `data_version` did not move (a file
    /// wake-up is often tether's own write).
    only_wake: bool,
    /// When to re-read after an empty wake-up (cleared when it fires).
    recheck: Option<Instant>,
    /// Re-reads done since the last wake-up.
    recheck_attempt: usize,
    /// `data_version` at the last read.
    data_version: Option<i64>,
}

impl ReadPlan {
    fn wake(&mut self) {
        if !self.due {
            self.only_wake = true;
        }
        self.due = true;
        self.recheck = None;
        self.recheck_attempt = 0;
    }
    fn full(&mut self) {
        self.due = true;
        self.only_wake = false;
    }
}

/// A connection past its handshake.
#[derive(Debug)]
pub struct Live {
    /// Uploads sent, oldest first, at most [`MAX_INFLIGHT`].
    inflight: VecDeque<Inflight>,
    /// Whether a local read is being performed (its result not yet in).
    reading: bool,
    read: ReadPlan,
    /// Highest seq whose answer has been processed (sent as `acked`).
    acked: u64,
    next_batch: u64,
    uploads_allowed: bool,
    caught_up: bool,
    read_deadline: Instant,
    next_ping: Instant,
    next_poll: Instant,
    connected_at: Instant,
    /// Set while shutting down: answers are awaited until then.
    draining: Option<Instant>,
    /// Whether the hub answers head requests.
    head_feature: bool,
    /// Head requests sent and not answered yet.
    heads_asked: u64,
    /// Where the hub's frames have brought this database.
    pos: Position,
    /// The app changed a synced table's schema (what changed): nothing
    /// more is read, and once the uploads in flight are answered the
    /// connection ends and `hello` announces the new schema.
    schema_changed: Option<String>,
}

impl Live {
    /// A connection the hub just welcomed: a full read is due first.
    fn start(w: &Welcome, cursor: u64, cfg: &Config, now: Instant) -> Live {
        let mut read = ReadPlan::default();
        read.full();
        Live {
            inflight: VecDeque::new(),
            reading: false,
            read,
            acked: 0,
            next_batch: 1,
            uploads_allowed: w.access == Access::ReadWrite,
            caught_up: false,
            read_deadline: now + cfg.read_timeout,
            next_ping: now + cfg.ping_interval,
            next_poll: now + POLL_INTERVAL,
            connected_at: now,
            draining: None,
            head_feature: w.features.iter().any(|f| f == FEATURE_HEAD),
            heads_asked: 0,
            pos: Position {
                cursor,
                head: w.head,
            },
            schema_changed: None,
        }
    }

    /// Takes one `upload_result` frame for the oldest batch in flight: the
    /// batch and all its results once the answer is whole, `None` while
    /// parts are still to come, an error when it answers nothing sent.
    fn answer(
        &mut self,
        res: UploadResult,
        now: Instant,
    ) -> Result<Option<(Inflight, Vec<ChangeResult>)>, SessionError> {
        let Some(front) = self.inflight.front_mut() else {
            return Err(SessionError::Retry(
                "hub answered an upload that was not sent".into(),
            ));
        };
        if res.batch != front.batch {
            return Err(SessionError::Retry(format!(
                "hub answered batch {} while {} was in flight",
                res.batch, front.batch
            )));
        }
        checks::answer_part(
            &front.read.changes,
            front.results.len(),
            &res.results,
            !res.more,
        )
        .map_err(SessionError::Retry)?;
        front.results.extend(res.results);
        if res.more {
            // Still alive: the next part gets a fresh deadline.
            front.deadline = now + ACK_TIMEOUT;
            return Ok(None);
        }
        let mut sent = self.inflight.pop_front().expect("BUG: front was just seen");
        let results = std::mem::take(&mut sent.results);
        self.acked = self.acked.max(sent.read.through);
        Ok(Some((sent, results)))
    }

    /// The hub sent something: it is alive, and answers come in order behind
    /// what it sends, so the oldest upload gets a fresh answer deadline (on a
    /// slow link an answer may wait behind megabytes of changes).
    fn hub_alive(&mut self, now: Instant) {
        if let Some(f) = self.inflight.front_mut() {
            f.deadline = f.deadline.max(now + ACK_TIMEOUT);
        }
    }
}

/// The session's states.
#[derive(Debug)]
pub enum State {
    /// Not started yet.
    Start,
    /// Paused in both directions: no connection is kept.
    Paused,
    /// Opening the WebSocket.
    Connecting,
    /// `hello` sent, waiting for `welcome` until the deadline.
    Handshaking {
        deadline: Instant,
        cursor: u64,
        local_seq: u64,
    },
    /// Syncing: catching up, then live.
    Live(Box<Live>),
    /// Waiting before the next attempt; `cause` says why.
    Backoff { until: Instant, cause: FailureClass },
    /// Over.
    Stopped,
}

/// The session protocol of one database; see the module docs.
pub struct Machine {
    cfg: Config,
    state: State,
    upload_paused: bool,
    download_paused: bool,
    /// Next reconnect delay; replaced by a fresh sequence after a healthy
    /// connection.
    backoff: Box<dyn Iterator<Item = Duration> + Send>,
    new_backoff: Box<dyn Fn() -> Box<dyn Iterator<Item = Duration> + Send> + Send>,
    attempts: u64,
    /// Held changes are retried at this time (set while any may be held).
    next_held_retry: Option<Instant>,
    /// Shutdown was asked: no new connection, pause commands only recorded.
    shutting_down: bool,
}

impl Machine {
    pub fn new(
        cfg: Config,
        upload_paused: bool,
        download_paused: bool,
        new_backoff: Box<dyn Fn() -> Box<dyn Iterator<Item = Duration> + Send> + Send>,
    ) -> Machine {
        Machine {
            cfg,
            state: State::Start,
            upload_paused,
            download_paused,
            backoff: new_backoff(),
            new_backoff,
            attempts: 0,
            next_held_retry: None,
            shutting_down: false,
        }
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Whether the driver should watch the token file for a new token.
    pub fn waiting_for_token(&self) -> bool {
        matches!(
            self.state,
            State::Backoff {
                cause: FailureClass::Unauthorized,
                ..
            }
        )
    }

    /// Whether a connection is open (the driver's reader and writer run).
    pub fn connected(&self) -> bool {
        matches!(self.state, State::Handshaking { .. } | State::Live(_))
    }

    /// The earliest time at which [`Input::Tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let state = match &self.state {
            State::Handshaking { deadline, .. } => Some(*deadline),
            State::Backoff { until, .. } => Some(*until),
            State::Live(l) => {
                let mut d = l.read_deadline.min(l.next_ping).min(l.next_poll);
                if let Some(f) = l.inflight.front() {
                    d = d.min(f.deadline);
                }
                if let Some(r) = l.read.recheck {
                    d = d.min(r);
                }
                if let Some(dr) = l.draining {
                    d = d.min(dr);
                }
                Some(d)
            }
            _ => None,
        };
        match (state, self.next_held_retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Feeds one input; returns what to do, in order.
    pub fn handle(&mut self, input: Input, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Shutdown => self.shutdown(now, &mut out),
            Input::Command(c) => self.command(c, now, &mut out),
            Input::Tick => self.tick(now, &mut out),
            Input::TokenChanged => {
                if self.waiting_for_token() {
                    self.backoff = (self.new_backoff)();
                    self.connect(&mut out);
                }
            }
            Input::Opened(info) => self.opened(info, now, &mut out),
            Input::OpenFailed(e) | Input::Lost(e) | Input::LocalFailed(e) => {
                if !matches!(self.state, State::Stopped | State::Backoff { .. }) {
                    self.fail(e, now, &mut out)
                }
            }
            Input::Frame(f, bytes) => self.frame(f, bytes, now, &mut out),
            Input::Alive => {
                if let State::Live(l) = &mut self.state {
                    l.read_deadline = now + self.cfg.read_timeout;
                    l.hub_alive(now);
                }
            }
            Input::Wake => {
                if let State::Live(l) = &mut self.state {
                    l.read.wake();
                }
            }
            Input::BatchRead {
                batch,
                pending,
                data_version,
            } => self.batch_read(batch, pending, data_version, now, &mut out),
            Input::ResultsApplied { pending } => {
                if pending.held > 0 {
                    self.next_held_retry.get_or_insert(now + HELD_RETRY);
                }
                out.push(Action::Note(Note::Pending(pending)));
                if let State::Live(l) = &mut self.state {
                    l.read.full();
                }
            }
        }
        if let State::Live(_) = self.state {
            self.after_live_input(now, &mut out);
        }
        out
    }

    fn shutdown(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.shutting_down = true;
        match &mut self.state {
            State::Live(l) if !l.inflight.is_empty() => {
                if l.draining.is_none() {
                    l.draining = Some(now + self.cfg.shutdown_timeout);
                    out.push(Action::Note(Note::Dying {
                        in_flight: l.inflight.len(),
                    }));
                }
            }
            State::Live(_) | State::Handshaking { .. } => {
                out.push(Action::Close("daemon shutting down"));
                self.stop(out);
            }
            State::Stopped => {}
            _ => self.stop(out),
        }
    }

    /// Head requests of a connection that ends are answered `None`.
    fn unanswered_heads(&mut self, out: &mut Vec<Action>) {
        if let State::Live(l) = &mut self.state {
            for _ in 0..std::mem::take(&mut l.heads_asked) {
                out.push(Action::HeadAnswer(None));
            }
        }
    }

    fn stop(&mut self, out: &mut Vec<Action>) {
        self.unanswered_heads(out);
        self.state = State::Stopped;
        out.push(Action::Stop);
    }

    fn command(&mut self, c: Command, now: Instant, out: &mut Vec<Action>) {
        match c {
            Command::Reconnect => {
                // Answered before the attempt, which may take a while.
                match self.state {
                    State::Paused => {
                        out.push(Action::ReconnectAnswer(super::ReconnectOutcome::Paused))
                    }
                    State::Backoff { .. } | State::Start => {
                        out.push(Action::ReconnectAnswer(super::ReconnectOutcome::Woken));
                        self.backoff = (self.new_backoff)();
                        self.connect(out);
                    }
                    _ => out.push(Action::ReconnectAnswer(
                        super::ReconnectOutcome::AlreadyConnected,
                    )),
                }
            }
            Command::FetchHead => match &mut self.state {
                State::Live(l) if l.head_feature && l.draining.is_none() => {
                    l.heads_asked += 1;
                    let ask = ClientFrame::Head(HeadAsk { id: l.heads_asked });
                    out.push(Action::Send(proto::encode(&ask)));
                }
                _ => out.push(Action::HeadAnswer(None)),
            },
            Command::Pause { upload, download } => self.set_pause(true, upload, download, now, out),
            Command::Resume { upload, download } => {
                self.set_pause(false, upload, download, now, out)
            }
        }
    }

    /// Applies a pause or resume; reconnects when the download flag changed
    /// (it is part of `hello`), drops the connection when both are paused.
    fn set_pause(
        &mut self,
        pause: bool,
        upload: bool,
        download: bool,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let both = !upload && !download;
        let before_down = self.download_paused;
        if upload || both {
            self.upload_paused = pause;
        }
        if download || both {
            self.download_paused = pause;
        }
        out.push(Action::Note(Note::PauseFlags {
            upload: self.upload_paused,
            download: self.download_paused,
        }));
        if self.shutting_down {
            // Recorded for the next start; the drain goes on.
            return;
        }
        let all_paused = self.upload_paused && self.download_paused;
        match &mut self.state {
            State::Stopped => {}
            State::Live(_) | State::Handshaking { .. }
                if all_paused || before_down != self.download_paused =>
            {
                out.push(Action::Close(if pause { "paused" } else { "resumed" }));
                self.after_close(now, out);
            }
            State::Live(l) => l.read.full(),
            State::Paused if !all_paused => {
                self.backoff = (self.new_backoff)();
                self.connect(out);
            }
            State::Backoff { .. } | State::Connecting if all_paused => self.enter_paused(out),
            // A resume ends the wait.
            State::Backoff { .. } if !pause => self.connect(out),
            _ => {}
        }
    }

    /// After closing on purpose: paused, or connect again at once.
    fn after_close(&mut self, _now: Instant, out: &mut Vec<Action>) {
        self.unanswered_heads(out);
        if self.upload_paused && self.download_paused {
            self.enter_paused(out);
        } else {
            self.connect(out);
        }
    }

    fn enter_paused(&mut self, out: &mut Vec<Action>) {
        self.state = State::Paused;
        out.push(Action::Note(Note::Paused));
    }

    fn connect(&mut self, out: &mut Vec<Action>) {
        if self.shutting_down {
            return self.stop(out);
        }
        if self.upload_paused && self.download_paused {
            return self.enter_paused(out);
        }
        out.push(Action::Note(Note::Connecting {
            reconnect: self.attempts > 0,
        }));
        self.attempts += 1;
        self.state = State::Connecting;
        out.push(Action::Connect);
    }

    fn tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.next_held_retry.is_some_and(|t| t <= now) {
            self.next_held_retry = Some(now + HELD_RETRY);
            out.push(Action::RetryHeld);
        }
        match &mut self.state {
            State::Start => self.connect(out),
            State::Backoff { until, .. } if *until <= now => self.connect(out),
            State::Handshaking { deadline, .. } if *deadline <= now => self.fail(
                SessionError::Retry(format!(
                    "no welcome from the hub within {WELCOME_TIMEOUT:?}"
                )),
                now,
                out,
            ),
            State::Live(l) => {
                if l.draining.is_some_and(|d| d <= now) {
                    out.push(Action::Note(Note::DrainTimedOut));
                    out.push(Action::Close("daemon shutting down"));
                    return self.stop(out);
                }
                if l.read_deadline <= now {
                    let e = SessionError::Retry(format!(
                        "nothing received from the hub for {:?}; reconnecting",
                        self.cfg.read_timeout
                    ));
                    return self.fail(e, now, out);
                }
                if l.inflight.front().is_some_and(|f| f.deadline <= now) {
                    let e = SessionError::Retry(format!(
                        "upload not answered within {ACK_TIMEOUT:?}; reconnecting"
                    ));
                    return self.fail(e, now, out);
                }
                if l.next_ping <= now {
                    l.next_ping = now + self.cfg.ping_interval;
                    out.push(Action::Ping);
                }
                if l.next_poll <= now {
                    l.next_poll = now + POLL_INTERVAL;
                    l.read.full();
                }
                if l.read.recheck.is_some_and(|t| t <= now) {
                    l.read.recheck = None;
                    if !l.read.due {
                        l.read.only_wake = true;
                    }
                    l.read.due = true;
                }
            }
            _ => {}
        }
    }

    fn opened(&mut self, info: LocalInfo, now: Instant, out: &mut Vec<Action>) {
        if !matches!(self.state, State::Connecting) {
            // Shut down or paused meanwhile.
            out.push(Action::Close("daemon shutting down"));
            return;
        }
        let hello = ClientFrame::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            client_id: info.client_id,
            client_key: info.client_key,
            dataset: self.cfg.dataset.clone(),
            cursor: info.cursor,
            tables: info.tables,
            echo_own: self.cfg.echo_own || info.refetch,
            subscribe: !self.download_paused,
            anchor: info.anchor,
        });
        out.push(Action::Send(proto::encode(&hello)));
        self.state = State::Handshaking {
            deadline: now + WELCOME_TIMEOUT,
            cursor: info.cursor,
            local_seq: info.local_seq,
        };
    }

    /// Ends the connection after an error and schedules the next attempt.
    fn fail(&mut self, e: SessionError, now: Instant, out: &mut Vec<Action>) {
        let class = FailureClass::of(&e);
        let was_connected = self.connected();
        self.unanswered_heads(out);
        if let State::Live(l) = &self.state {
            if l.draining.is_some() {
                // Shutting down anyway: what is unanswered goes out next start.
                out.push(Action::Close("daemon shutting down"));
                out.push(Action::Note(Note::DrainTimedOut));
                return self.stop(out);
            }
            if now.duration_since(l.connected_at) >= HEALTHY_AFTER {
                self.backoff = (self.new_backoff)();
            }
        }
        if was_connected {
            out.push(Action::Close("reconnecting"));
        }
        let delay = match class {
            FailureClass::Retry => self.backoff.next().unwrap_or(self.cfg.max_backoff),
            _ => self.cfg.max_backoff,
        };
        out.push(Action::Note(Note::Failed {
            error: e.to_string(),
            class,
            delay,
        }));
        self.state = State::Backoff {
            until: now + delay,
            cause: class,
        };
    }

    /// `welcome`: checked, then the session is live (or, for a file behind
    /// its identity's numbering, renewed and tried again).
    fn welcomed(
        &mut self,
        w: Welcome,
        cursor: u64,
        local_seq: u64,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        if let Err(why) = checks::welcome(&w, local_seq) {
            return self.fail(SessionError::Retry(why), now, out);
        }
        if w.client_seq > local_seq {
            // The hub holds changes of this identity that this
            // file never numbered: it is a restored backup or a
            // clone. Under a new identity it downloads them all
            // (they are no longer its own) and sends its pending
            // changes as new ones.
            out.push(Action::RenewIdentity);
            let why = format!(
                "the hub has processed client seq {} of this identity, but this database numbered its writes only up to {local_seq}: it was restored from a backup or copied; it takes a new identity and downloads the dataset again",
                w.client_seq
            );
            return self.fail(SessionError::Retry(why), now, out);
        }
        out.push(Action::Note(Note::Connected {
            cursor,
            head: w.head,
            access: w.access,
        }));
        self.state = State::Live(Box::new(Live::start(&w, cursor, &self.cfg, now)));
    }

    /// The hub's answer to `hello`: a welcome, or why not.
    fn handshake_frame(
        &mut self,
        f: HubFrame,
        cursor: u64,
        local_seq: u64,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        match f {
            HubFrame::Welcome(w) => self.welcomed(w, cursor, local_seq, now, out),
            HubFrame::Error(e) if e.code == ErrorCode::HistoryDiverged => {
                out.push(Action::Recover);
                self.fail(hub_error(e.code, &e.message), now, out)
            }
            HubFrame::Error(e) => self.fail(hub_error(e.code, &e.message), now, out),
            other => self.fail(
                SessionError::Retry(format!("expected welcome, got {}", frame_name(&other))),
                now,
                out,
            ),
        }
    }

    fn frame(&mut self, f: HubFrame, bytes: usize, now: Instant, out: &mut Vec<Action>) {
        if let State::Handshaking {
            cursor, local_seq, ..
        } = self.state
        {
            return self.handshake_frame(f, cursor, local_seq, now, out);
        }
        let State::Live(l) = &mut self.state else {
            return;
        };
        l.read_deadline = now + self.cfg.read_timeout;
        l.hub_alive(now);
        let believed = match &f {
            HubFrame::Changes(c) => l.pos.changes(c),
            HubFrame::CaughtUp(c) => l.pos.caught_up(c),
            HubFrame::Head(h) => l.pos.head(h.head),
            _ => Ok(()),
        };
        if let Err(why) = believed {
            return self.fail(SessionError::Retry(why), now, out);
        }
        match f {
            // Nothing to apply (changes of tables this device does not
            // sync): the cursor moves in the status only; the stored one
            // follows with the next write, and a restart from the older one
            // downloads nothing this device keeps.
            HubFrame::Changes(c) if c.changes.is_empty() => out.push(Action::Note(Note::Cursor {
                up_to: c.up_to,
                head: c.head,
            })),
            HubFrame::Changes(c) => out.push(Action::ApplyRemote {
                changes: c.changes,
                up_to: c.up_to,
                head: c.head,
                bytes: bytes as u64,
            }),
            HubFrame::CaughtUp(c) => {
                out.push(Action::ApplyRemote {
                    changes: Vec::new(),
                    up_to: c.head,
                    head: c.head,
                    bytes: 0,
                });
                if !l.caught_up {
                    l.caught_up = true;
                    out.push(Action::Note(Note::CaughtUp));
                }
            }
            HubFrame::UploadResult(res) => match l.answer(res, now) {
                Err(e) => self.fail(e, now, out),
                // The rest of a split answer follows.
                Ok(None) => {}
                Ok(Some((sent, results))) => {
                    let summary = UploadSummary::of(&results);
                    let failed = (summary.materialize_error > 0)
                        .then(|| summary.first_error.clone().unwrap_or_default());
                    out.push(Action::ApplyResults {
                        sent: Box::new(sent),
                        results,
                        summary,
                    });
                    if let Some(why) = failed {
                        // The hub closes after a failed batch; everything
                        // unanswered goes again after backoff.
                        let e = SessionError::Retry(format!("hub could not store a batch: {why}"));
                        self.fail(e, now, out);
                    }
                }
            },
            HubFrame::Error(e) if e.code == ErrorCode::Forbidden && !l.inflight.is_empty() => {
                // Read-only token: keep the changes, stop uploading.
                l.inflight.clear();
                l.uploads_allowed = false;
                out.push(Action::Note(Note::ReadOnly(e.message)));
            }
            HubFrame::Error(e) if e.code == ErrorCode::IdentityConflict => {
                // Another file holds this identity; the hub stored nothing of
                // the refused batch nor of any after it: a new identity, and
                // everything unanswered goes again under it.
                out.push(Action::RenewIdentity);
                self.fail(hub_error(e.code, &e.message), now, out)
            }
            HubFrame::Error(e) if e.code == ErrorCode::Forbidden => {
                // Forbidden in a live session with no upload in flight: a
                // reload of the hub's config narrowed this device's token.
                // The next hello learns what it may still do (a token now
                // read_only downloads; one that lost the dataset is refused
                // there, for good), so reconnect as after any drop.
                let text = format!("hub error forbidden: {}", e.message);
                self.fail(SessionError::Retry(text), now, out)
            }
            HubFrame::Error(e) => self.fail(hub_error(e.code, &e.message), now, out),
            HubFrame::Head(h) if l.heads_asked > 0 => {
                l.heads_asked -= 1;
                out.push(Action::Note(Note::HubHead(h.head)));
                out.push(Action::HeadAnswer(Some(h.head)));
            }
            HubFrame::Head(_) => self.fail(
                SessionError::Retry("hub answered a head request that was not sent".into()),
                now,
                out,
            ),
            HubFrame::Welcome(_) => self.fail(
                SessionError::Retry("hub sent welcome twice".into()),
                now,
                out,
            ),
        }
    }

    fn batch_read(
        &mut self,
        batch: Option<Batch>,
        pending: Option<Pending>,
        data_version: i64,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let State::Live(l) = &mut self.state else {
            return;
        };
        l.reading = false;
        let skipped = batch.is_none();
        let was_wake = l.read.only_wake;
        let seen = l.read.data_version.replace(data_version);
        if let Some(p) = pending {
            if p.held > 0 {
                self.next_held_retry.get_or_insert(now + HELD_RETRY);
            }
            if !skipped || seen != Some(data_version) {
                out.push(Action::Note(Note::Pending(p)));
            }
        }
        let mut read = batch.unwrap_or_default();
        if let Some(what) = read.schema_changed.take() {
            l.schema_changed = Some(what);
            return;
        }
        let attempt = l.read.recheck_attempt;
        if read.changes.is_empty() && was_wake && attempt < RECHECK_DELAYS.len() {
            l.read.recheck = Some(now + RECHECK_DELAYS[attempt]);
            l.read.recheck_attempt = attempt + 1;
        } else {
            l.read.recheck_attempt = 0;
        }
        l.read.only_wake = false;
        if read.changes.is_empty() {
            return;
        }
        // A full batch means more may be waiting: read on, up to the window.
        let full = read.changes.len() >= MAX_BATCH_CHANGES / 2
            || read.changes.iter().map(Change::wire_size).sum::<usize>() >= MAX_BATCH_BYTES / 2;
        if full {
            l.read.full();
        }
        let batch = l.next_batch;
        l.next_batch += 1;
        let frame = ClientFrame::Upload(Upload {
            batch,
            acked: l.acked,
            changes: read.changes,
        });
        let bytes = proto::encode(&frame);
        let ClientFrame::Upload(Upload { changes, .. }) = frame else {
            unreachable!("built as an upload above")
        };
        l.inflight.push_back(Inflight {
            batch,
            bytes: bytes.len() as u64,
            read: Batch {
                changes,
                through: read.through,
                captured_ms: read.captured_ms,
                schema_changed: None,
            },
            deadline: now + ACK_TIMEOUT,
            results: Vec::new(),
        });
        out.push(Action::Send(bytes));
    }

    /// Decides the next local read and finishes a drain.
    fn after_live_input(&mut self, _now: Instant, out: &mut Vec<Action>) {
        let State::Live(l) = &mut self.state else {
            return;
        };
        if l.draining.is_some() {
            if l.inflight.is_empty() {
                out.push(Action::Close("daemon shutting down"));
                self.stop(out);
            }
            return;
        }
        // Only one read at a time, and none after the connection ended in
        // this same step.
        if out.iter().any(|a| matches!(a, Action::Close(_))) {
            return;
        }
        if let Some(what) = l.schema_changed.clone() {
            if l.inflight.is_empty() {
                self.unanswered_heads(out);
                out.push(Action::Close("schema changed"));
                out.push(Action::Note(Note::Failed {
                    error: format!(
                        "the app changed the schema ({what}); reconnecting to announce it"
                    ),
                    class: FailureClass::Retry,
                    delay: Duration::ZERO,
                }));
                self.connect(out);
            }
            return;
        }
        if l.read.due
            && !l.reading
            && l.inflight.len() < MAX_INFLIGHT
            && l.uploads_allowed
            && !self.upload_paused
        {
            l.read.due = false;
            l.reading = true;
            out.push(Action::ReadBatch {
                after: l.inflight.back().map(|i| i.read.through).unwrap_or(0),
                skip_if_version: if l.read.only_wake {
                    l.read.data_version
                } else {
                    None
                },
                idle: l.inflight.is_empty(),
            });
        }
    }

    /// Called by the driver after a held-change retry: stop the timer when
    /// nothing is held any more.
    pub fn held_remaining(&mut self, held: u64, now: Instant) {
        self.next_held_retry = (held > 0).then(|| now + HELD_RETRY);
    }

    /// Called by the driver when changes were just held: start the retry
    /// timer unless it runs already.
    pub fn held_seen(&mut self, now: Instant) {
        self.next_held_retry.get_or_insert(now + HELD_RETRY);
    }
}

/// Classifies an `error` frame from the hub.
pub fn hub_error(code: ErrorCode, message: &str) -> SessionError {
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
        HubFrame::Head(_) => "head",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{
        CaughtUp, Changes, ErrorFrame, Op, Outcome, ServerRow, UploadResult, Value, Welcome,
    };
    use crate::session::ReconnectOutcome;

    const MAX: Duration = Duration::from_secs(60);

    /// A machine whose backoff delays are 1 s, 2 s, 3 s, ... (fresh after a
    /// healthy connection).
    fn machine(upload_paused: bool, download_paused: bool) -> Machine {
        let cfg = Config {
            dataset: "notes".into(),
            echo_own: false,
            ping_interval: Duration::from_secs(30),
            read_timeout: Duration::from_secs(120),
            max_backoff: MAX,
            shutdown_timeout: Duration::from_secs(5),
        };
        Machine::new(
            cfg,
            upload_paused,
            download_paused,
            Box::new(|| Box::new((1..).map(Duration::from_secs))),
        )
    }

    fn info() -> LocalInfo {
        LocalInfo {
            client_id: "c1".into(),
            client_key: "k1".into(),
            cursor: 7,
            local_seq: 5,
            anchor: None,
            tables: Vec::new(),
            refetch: false,
        }
    }

    fn welcome(access: Access) -> Input {
        Input::Frame(
            HubFrame::Welcome(Welcome {
                protocol: PROTOCOL_VERSION,
                head: 9,
                access,
                client_seq: 3,
                features: vec![FEATURE_HEAD.into()],
            }),
            10,
        )
    }

    fn change(seq: u64) -> Change {
        Change {
            seq,
            table: "notes".into(),
            op: Op::Upsert,
            pk: vec![Value::Integer(seq as i64)],
            values: vec![Value::Integer(seq as i64)],
            base: 0,
            mask: 1,
        }
    }

    fn batch(seqs: std::ops::RangeInclusive<u64>) -> Batch {
        let changes: Vec<Change> = seqs.clone().map(change).collect();
        Batch {
            captured_ms: vec![0; changes.len()],
            through: *seqs.end(),
            changes,
            schema_changed: None,
        }
    }

    fn read(b: Batch, version: i64) -> Input {
        Input::BatchRead {
            batch: Some(b),
            pending: Some(Pending::default()),
            data_version: version,
        }
    }

    fn answer(batch: u64, seqs: &[u64], more: bool) -> Input {
        let results: Vec<ChangeResult> = seqs
            .iter()
            .map(|&seq| ChangeResult {
                seq,
                outcome: Outcome::Applied { version: seq },
            })
            .collect();
        Input::Frame(
            HubFrame::UploadResult(UploadResult {
                batch,
                summary: UploadSummary::of(&results),
                results,
                more,
            }),
            100,
        )
    }

    /// A machine that is live with nothing in flight, and the time.
    fn live() -> (Machine, Instant) {
        let mut m = machine(false, false);
        let t = Instant::now();
        m.handle(Input::Tick, t);
        m.handle(Input::Opened(info()), t);
        let a = m.handle(welcome(Access::ReadWrite), t);
        assert!(matches!(a.last(), Some(Action::ReadBatch { .. })), "{a:?}");
        m.handle(
            Input::BatchRead {
                batch: Some(Batch::default()),
                pending: Some(Pending::default()),
                data_version: 1,
            },
            t,
        );
        (m, t)
    }

    fn sends(a: &[Action]) -> Vec<ClientFrame> {
        a.iter()
            .filter_map(|a| match a {
                Action::Send(b) => Some(proto::decode(b).unwrap()),
                _ => None,
            })
            .collect()
    }

    fn failed(a: &[Action]) -> Option<(FailureClass, Duration)> {
        a.iter().find_map(|a| match a {
            Action::Note(Note::Failed { class, delay, .. }) => Some((*class, *delay)),
            _ => None,
        })
    }

    fn has_close(a: &[Action]) -> bool {
        a.iter().any(|a| matches!(a, Action::Close(_)))
    }

    fn reads(a: &[Action]) -> usize {
        a.iter()
            .filter(|a| matches!(a, Action::ReadBatch { .. }))
            .count()
    }

    #[test]
    fn start_connects_unless_paused_both_ways() {
        let mut m = machine(false, false);
        let a = m.handle(Input::Tick, Instant::now());
        assert!(matches!(
            a[..],
            [
                Action::Note(Note::Connecting { reconnect: false }),
                Action::Connect
            ]
        ));
        assert!(matches!(m.state(), State::Connecting));

        let mut m = machine(true, true);
        let a = m.handle(Input::Tick, Instant::now());
        assert!(matches!(a[..], [Action::Note(Note::Paused)]), "{a:?}");
        assert!(matches!(m.state(), State::Paused));
        assert_eq!(m.next_deadline(), None);
    }

    #[test]
    fn hello_carries_cursor_and_subscription_then_welcome_goes_live() {
        let mut m = machine(false, true);
        let t = Instant::now();
        m.handle(Input::Tick, t);
        let a = m.handle(Input::Opened(info()), t);
        let [ClientFrame::Hello(h)] = &sends(&a)[..] else {
            panic!("{a:?}")
        };
        assert_eq!(
            (h.cursor, h.subscribe, h.dataset.as_str()),
            (7, false, "notes")
        );
        assert_eq!(m.next_deadline(), Some(t + WELCOME_TIMEOUT));
        let a = m.handle(welcome(Access::ReadWrite), t);
        assert!(matches!(
            a[0],
            Action::Note(Note::Connected {
                cursor: 7,
                head: 9,
                ..
            })
        ));
        assert!(
            matches!(
                a[1],
                Action::ReadBatch {
                    after: 0,
                    skip_if_version: None,
                    idle: true
                }
            ),
            "{a:?}"
        );
        assert!(matches!(m.state(), State::Live(_)));
    }

    #[test]
    fn no_welcome_in_time_is_retried_with_backoff() {
        let mut m = machine(false, false);
        let t = Instant::now();
        m.handle(Input::Tick, t);
        m.handle(Input::Opened(info()), t);
        assert!(m.handle(Input::Tick, t + Duration::from_secs(9)).is_empty());
        let a = m.handle(Input::Tick, t + WELCOME_TIMEOUT);
        assert!(has_close(&a));
        assert_eq!(
            failed(&a),
            Some((FailureClass::Retry, Duration::from_secs(1)))
        );
        // The backoff ends with a new attempt.
        let a = m.handle(Input::Tick, t + WELCOME_TIMEOUT + Duration::from_secs(1));
        assert!(matches!(
            a[..],
            [
                Action::Note(Note::Connecting { reconnect: true }),
                Action::Connect
            ]
        ));
    }

    #[test]
    fn a_refused_token_waits_the_longest_backoff_or_a_new_token() {
        let mut m = machine(false, false);
        let t = Instant::now();
        m.handle(Input::Tick, t);
        m.handle(Input::Opened(info()), t);
        let refusal = Input::Frame(
            HubFrame::Error(ErrorFrame {
                code: ErrorCode::Unauthorized,
                message: "no".into(),
            }),
            5,
        );
        let a = m.handle(refusal, t);
        assert_eq!(failed(&a), Some((FailureClass::Unauthorized, MAX)));
        assert!(m.waiting_for_token());
        let a = m.handle(Input::TokenChanged, t + Duration::from_secs(1));
        assert!(matches!(a.last(), Some(Action::Connect)));
        // A fatal error waits the longest backoff too.
        m.handle(Input::Opened(info()), t);
        let fatal = Input::Frame(
            HubFrame::Error(ErrorFrame {
                code: ErrorCode::SchemaMismatch,
                message: "x".into(),
            }),
            5,
        );
        assert_eq!(
            failed(&m.handle(fatal, t)),
            Some((FailureClass::Fatal, MAX))
        );
        assert!(!m.waiting_for_token());
    }

    #[test]
    fn uploads_fill_the_window_and_answers_open_it_again() {
        let (mut m, t) = live();
        m.handle(Input::Wake, t);
        // Full batches: every read leads to the next until the window is full.
        let mut sent = 0;
        let mut next = read(batch(1..=2000), 2);
        for _ in 0..MAX_INFLIGHT {
            let a = m.handle(next, t);
            let frames = sends(&a);
            let [ClientFrame::Upload(up)] = &frames[..] else {
                panic!("{a:?}")
            };
            sent += 1;
            assert_eq!(up.batch, sent);
            let more = reads(&a);
            assert_eq!(more, usize::from(sent < MAX_INFLIGHT as u64), "{a:?}");
            let from = sent * 2000 + 1;
            next = read(batch(from..=from + 1999), 2);
        }
        // Window full: a wake-up reads nothing more.
        assert_eq!(reads(&m.handle(Input::Wake, t)), 0);
        // The answer to batch 1 frees a slot and acks its changes.
        let seqs: Vec<u64> = (1..=2000).collect();
        let a = m.handle(answer(1, &seqs, false), t);
        let Some(Action::ApplyResults { sent, summary, .. }) = a.first() else {
            panic!("{a:?}")
        };
        assert_eq!((sent.batch, summary.applied), (1, 2000));
        // The freed slot is used at once (the read was due), after the
        // answer is applied: actions run in order.
        let Some(Action::ReadBatch { after, idle, .. }) = a.last() else {
            panic!("{a:?}")
        };
        assert_eq!((*after, *idle), (8000, false));
        // The applied answer does not start a second read while one runs.
        let a = m.handle(
            Input::ResultsApplied {
                pending: Pending::default(),
            },
            t,
        );
        assert_eq!(reads(&a), 0, "{a:?}");
        let a = m.handle(read(batch(8001..=8001), 3), t);
        let [ClientFrame::Upload(up)] = &sends(&a)[..] else {
            panic!("{a:?}")
        };
        assert_eq!((up.batch, up.acked), (5, 2000));
    }

    #[test]
    fn a_split_answer_is_applied_once_whole() {
        let (mut m, t) = live();
        m.handle(Input::Wake, t);
        m.handle(read(batch(1..=3), 2), t);
        let a = m.handle(answer(1, &[1, 2], true), t);
        assert!(a.is_empty(), "{a:?}");
        let a = m.handle(answer(1, &[3], false), t);
        let Some(Action::ApplyResults {
            results, summary, ..
        }) = a.first()
        else {
            panic!("{a:?}")
        };
        assert_eq!(results.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(summary.total, 3);
    }

    #[test]
    fn answers_that_do_not_match_what_was_sent_end_the_connection() {
        let (mut m, t) = live();
        let a = m.handle(answer(1, &[1], false), t);
        assert!(has_close(&a));
        assert_eq!(failed(&a).map(|f| f.0), Some(FailureClass::Retry));

        let (mut m, t) = live();
        m.handle(Input::Wake, t);
        m.handle(read(batch(1..=1), 2), t);
        let a = m.handle(answer(2, &[1], false), t);
        assert!(has_close(&a), "{a:?}");
    }

    #[test]
    fn a_batch_the_hub_could_not_store_is_kept_and_the_connection_retried() {
        let (mut m, t) = live();
        m.handle(Input::Wake, t);
        m.handle(read(batch(1..=1), 2), t);
        let results = vec![ChangeResult {
            seq: 1,
            outcome: Outcome::MaterializeError {
                message: "disk full".into(),
            },
        }];
        let f = HubFrame::UploadResult(UploadResult {
            batch: 1,
            summary: UploadSummary::of(&results),
            results,
            more: false,
        });
        let a = m.handle(Input::Frame(f, 10), t);
        assert!(matches!(a[0], Action::ApplyResults { .. }));
        assert!(has_close(&a));
        assert!(matches!(m.state(), State::Backoff { .. }));
    }

    #[test]
    fn changes_and_caught_up_are_applied_in_order() {
        let (mut m, t) = live();
        let page = HubFrame::Changes(Changes {
            changes: vec![RemoteChange {
                version: 12,
                table: "notes".into(),
                op: Op::Delete,
                pk: vec![Value::Integer(1)],
                values: vec![],
            }],
            up_to: 12,
            head: 20,
        });
        let a = m.handle(Input::Frame(page, 30), t);
        assert!(matches!(
            a[..],
            [Action::ApplyRemote {
                up_to: 12,
                head: 20,
                bytes: 30,
                ..
            }]
        ));
        let a = m.handle(
            Input::Frame(HubFrame::CaughtUp(CaughtUp { head: 20 }), 5),
            t,
        );
        assert!(matches!(
            a[..],
            [
                Action::ApplyRemote { up_to: 20, .. },
                Action::Note(Note::CaughtUp)
            ]
        ));
    }

    #[test]
    fn timers_ping_poll_and_drop_a_silent_hub() {
        let (mut m, t) = live();
        let a = m.handle(Input::Tick, t + Duration::from_secs(30));
        assert!(a.iter().any(|a| matches!(a, Action::Ping)), "{a:?}");
        // The poll timer made a full read due.
        assert!(matches!(
            a.last(),
            Some(Action::ReadBatch {
                skip_if_version: None,
                ..
            })
        ));
        m.handle(
            Input::BatchRead {
                batch: Some(Batch::default()),
                pending: None,
                data_version: 1,
            },
            t,
        );
        // Anything received pushes the read deadline on.
        m.handle(Input::Alive, t + Duration::from_secs(100));
        let a = m.handle(Input::Tick, t + Duration::from_secs(121));
        assert!(failed(&a).is_none(), "{a:?}");
        let a = m.handle(Input::Tick, t + Duration::from_secs(221));
        assert!(has_close(&a));
        assert_eq!(failed(&a).map(|f| f.0), Some(FailureClass::Retry));
    }

    #[test]
    fn an_unanswered_upload_ends_the_connection_unless_the_hub_is_sending() {
        let (mut m, t) = live();
        m.handle(Input::Wake, t);
        m.handle(read(batch(1..=1), 2), t);
        let a = m.handle(Input::Tick, t + ACK_TIMEOUT);
        assert!(has_close(&a), "{a:?}");
        // Bytes keep arriving (the answer waits behind a large frame on a
        // slow link): the answer deadline moves with them.
        let (mut m, t) = live();
        m.handle(Input::Wake, t);
        m.handle(read(batch(1..=1), 2), t);
        let alive = t + Duration::from_secs(30);
        m.handle(Input::Alive, alive);
        assert!(!has_close(&m.handle(Input::Tick, t + ACK_TIMEOUT)));
        let a = m.handle(Input::Tick, alive + ACK_TIMEOUT);
        assert!(has_close(&a), "{a:?}");
    }

    #[test]
    fn a_wake_up_with_nothing_new_skips_the_read_then_rechecks() {
        let (mut m, t) = live();
        let a = m.handle(Input::Wake, t);
        assert!(matches!(
            a[..],
            [Action::ReadBatch {
                skip_if_version: Some(1),
                ..
            }]
        ));
        let a = m.handle(
            Input::BatchRead {
                batch: None,
                pending: None,
                data_version: 1,
            },
            t,
        );
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(m.next_deadline(), Some(t + RECHECK_DELAYS[0]));
        let a = m.handle(Input::Tick, t + RECHECK_DELAYS[0]);
        assert_eq!(reads(&a), 1);
    }

    #[test]
    fn a_read_only_token_keeps_changes_captured_and_stops_uploading() {
        let (mut m, t) = live();
        m.handle(Input::Wake, t);
        m.handle(read(batch(1..=1), 2), t);
        let f = HubFrame::Error(ErrorFrame {
            code: ErrorCode::Forbidden,
            message: "token is read_only".into(),
        });
        let a = m.handle(Input::Frame(f, 5), t);
        assert!(matches!(a[..], [Action::Note(Note::ReadOnly(_))]), "{a:?}");
        assert_eq!(reads(&m.handle(Input::Wake, t)), 0);
        assert!(matches!(m.state(), State::Live(_)));
    }

    #[test]
    fn shutdown_waits_for_answers_in_flight_then_closes() {
        let (mut m, t) = live();
        assert!(matches!(
            m.handle(Input::Shutdown, t)[..],
            [Action::Close(_), Action::Stop]
        ));

        let (mut m, t) = live();
        m.handle(Input::Wake, t);
        m.handle(read(batch(1..=1), 2), t);
        let a = m.handle(Input::Shutdown, t);
        assert!(matches!(
            a[..],
            [Action::Note(Note::Dying { in_flight: 1 })]
        ));
        // No new reads while draining.
        assert_eq!(reads(&m.handle(Input::Wake, t)), 0);
        let a = m.handle(answer(1, &[1], false), t);
        assert!(matches!(
            a[..],
            [Action::ApplyResults { .. }, Action::Close(_), Action::Stop]
        ));

        let (mut m, t) = live();
        m.handle(Input::Wake, t);
        m.handle(read(batch(1..=1), 2), t);
        m.handle(Input::Shutdown, t);
        let a = m.handle(Input::Tick, t + Duration::from_secs(5));
        assert!(matches!(
            a[..],
            [
                Action::Note(Note::DrainTimedOut),
                Action::Close(_),
                Action::Stop
            ]
        ));
    }

    #[test]
    fn pausing_downloads_reconnects_without_subscription_and_both_disconnects() {
        let (mut m, t) = live();
        let a = m.handle(
            Input::Command(Command::Pause {
                upload: false,
                download: true,
            }),
            t,
        );
        assert!(has_close(&a));
        assert!(matches!(a.last(), Some(Action::Connect)));
        let a = m.handle(Input::Opened(info()), t);
        let [ClientFrame::Hello(h)] = &sends(&a)[..] else {
            panic!("{a:?}")
        };
        assert!(!h.subscribe);
        m.handle(welcome(Access::ReadWrite), t);
        let a = m.handle(
            Input::Command(Command::Pause {
                upload: true,
                download: false,
            }),
            t,
        );
        assert!(has_close(&a));
        assert!(matches!(a.last(), Some(Action::Note(Note::Paused))));
        let a = m.handle(Input::Command(Command::Reconnect), t);
        assert!(matches!(
            a[..],
            [Action::ReconnectAnswer(ReconnectOutcome::Paused)]
        ));
        let a = m.handle(
            Input::Command(Command::Resume {
                upload: false,
                download: false,
            }),
            t,
        );
        assert!(matches!(a.last(), Some(Action::Connect)), "{a:?}");
    }

    #[test]
    fn pausing_uploads_only_stops_reading_the_log() {
        let (mut m, t) = live();
        let a = m.handle(
            Input::Command(Command::Pause {
                upload: true,
                download: false,
            }),
            t,
        );
        assert!(!has_close(&a));
        assert_eq!(reads(&m.handle(Input::Wake, t)), 0);
        let a = m.handle(
            Input::Command(Command::Resume {
                upload: true,
                download: false,
            }),
            t,
        );
        assert_eq!(reads(&a), 1, "{a:?}");
    }

    #[test]
    fn reconnect_ends_a_backoff_and_leaves_a_live_session_alone() {
        let (mut m, t) = live();
        let a = m.handle(Input::Command(Command::Reconnect), t);
        assert!(matches!(
            a[..],
            [Action::ReconnectAnswer(ReconnectOutcome::AlreadyConnected)]
        ));
        m.handle(Input::Lost(SessionError::Retry("cut".into())), t);
        assert!(matches!(m.state(), State::Backoff { .. }));
        let a = m.handle(Input::Command(Command::Reconnect), t);
        // Answered first: the attempt itself may take seconds.
        assert!(matches!(
            a[..],
            [
                Action::ReconnectAnswer(ReconnectOutcome::Woken),
                Action::Note(Note::Connecting { reconnect: true }),
                Action::Connect,
            ]
        ));
    }

    #[test]
    fn a_pause_during_the_shutdown_drain_does_not_keep_the_session_alive() {
        let (mut m, t) = live();
        m.handle(Input::Wake, t);
        m.handle(read(batch(1..=1), 2), t);
        m.handle(Input::Shutdown, t);
        let a = m.handle(
            Input::Command(Command::Pause {
                upload: false,
                download: false,
            }),
            t,
        );
        assert!(!has_close(&a), "{a:?}");
        let a = m.handle(answer(1, &[1], false), t);
        assert!(matches!(a.last(), Some(Action::Stop)), "{a:?}");
        // Shut down while waiting in backoff: no new attempt, just stop.
        let mut m = machine(false, false);
        m.handle(Input::Tick, t);
        m.handle(Input::OpenFailed(SessionError::Retry("x".into())), t);
        let a = m.handle(Input::Shutdown, t);
        assert!(matches!(a[..], [Action::Stop]), "{a:?}");
    }

    #[test]
    fn a_recheck_that_cannot_read_leaves_no_deadline_in_the_past() {
        let (mut m, t) = live();
        m.handle(Input::Wake, t);
        m.handle(
            Input::BatchRead {
                batch: None,
                pending: None,
                data_version: 1,
            },
            t,
        );
        m.handle(
            Input::Command(Command::Pause {
                upload: true,
                download: false,
            }),
            t,
        );
        let fire = t + RECHECK_DELAYS[0];
        let a = m.handle(Input::Tick, fire);
        assert_eq!(reads(&a), 0);
        assert!(
            m.next_deadline().unwrap() > fire,
            "a spent recheck stays armed"
        );
    }

    #[test]
    fn an_empty_page_moves_the_cursor_without_a_database_write() {
        let (mut m, t) = live();
        let page = HubFrame::Changes(Changes {
            changes: vec![],
            up_to: 40,
            head: 40,
        });
        let a = m.handle(Input::Frame(page, 12), t);
        assert!(
            matches!(
                a[..],
                [Action::Note(Note::Cursor {
                    up_to: 40,
                    head: 40
                })]
            ),
            "{a:?}"
        );
    }

    #[test]
    fn backoff_grows_per_failure_and_resets_after_a_healthy_connection() {
        let mut m = machine(false, false);
        let mut t = Instant::now();
        m.handle(Input::Tick, t);
        let mut delays = Vec::new();
        for _ in 0..3 {
            let a = m.handle(Input::OpenFailed(SessionError::Retry("refused".into())), t);
            let (_, d) = failed(&a).unwrap();
            delays.push(d.as_secs());
            t += d;
            m.handle(Input::Tick, t);
        }
        assert_eq!(delays, [1, 2, 3]);
        // A connection that stays up long enough starts the sequence again.
        m.handle(Input::Opened(info()), t);
        m.handle(welcome(Access::ReadWrite), t);
        t += HEALTHY_AFTER;
        m.handle(Input::Alive, t);
        let a = m.handle(Input::Lost(SessionError::Retry("cut".into())), t);
        assert_eq!(failed(&a).map(|f| f.1), Some(Duration::from_secs(1)));
    }

    #[test]
    fn a_lost_connection_is_closed_and_retried() {
        let (mut m, t) = live();
        let a = m.handle(Input::Lost(SessionError::Retry("reset".into())), t);
        assert!(has_close(&a));
        assert!(matches!(m.state(), State::Backoff { .. }));
        // Frames still queued from the dead connection change nothing.
        let late = HubFrame::CaughtUp(CaughtUp { head: 3 });
        assert!(m.handle(Input::Frame(late, 3), t).is_empty());
    }

    #[test]
    fn held_changes_are_retried_on_a_timer_while_any_remain() {
        let (mut m, t) = live();
        m.handle(
            Input::BatchRead {
                batch: None,
                pending: Some(Pending {
                    held: 2,
                    ..Pending::default()
                }),
                data_version: 4,
            },
            t,
        );
        let a = m.handle(Input::Tick, t + HELD_RETRY);
        assert!(a.iter().any(|a| matches!(a, Action::RetryHeld)), "{a:?}");
        m.held_remaining(0, t + HELD_RETRY);
        let a = m.handle(Input::Tick, t + HELD_RETRY * 2);
        assert!(!a.iter().any(|a| matches!(a, Action::RetryHeld)), "{a:?}");
    }

    #[test]
    fn conflict_answers_reach_the_database_with_the_batch_that_was_sent() {
        let (mut m, t) = live();
        m.handle(Input::Wake, t);
        m.handle(read(batch(5..=5), 2), t);
        let results = vec![ChangeResult {
            seq: 5,
            outcome: Outcome::Conflict {
                server: ServerRow {
                    version: 3,
                    deleted: false,
                    values: vec![Value::Integer(1)],
                },
            },
        }];
        let f = HubFrame::UploadResult(UploadResult {
            batch: 1,
            summary: UploadSummary::of(&results),
            results,
            more: false,
        });
        let a = m.handle(Input::Frame(f, 10), t);
        let Some(Action::ApplyResults { sent, summary, .. }) = a.first() else {
            panic!("{a:?}")
        };
        assert_eq!(sent.read.changes[0].seq, 5);
        assert_eq!(summary.conflict, 1);
    }

    #[test]
    fn the_hub_is_asked_for_its_head_and_answers_in_order() {
        let (mut m, t) = live();
        let a = m.handle(Input::Command(Command::FetchHead), t);
        let [ClientFrame::Head(h)] = &sends(&a)[..] else {
            panic!("{a:?}")
        };
        assert_eq!(h.id, 1);
        let answer = HubFrame::Head(crate::proto::Head { id: 1, head: 77 });
        let a = m.handle(Input::Frame(answer, 8), t);
        assert!(
            matches!(
                a[..],
                [
                    Action::Note(Note::HubHead(77)),
                    Action::HeadAnswer(Some(77))
                ]
            ),
            "{a:?}"
        );
        // An answer nobody asked for ends the connection.
        let stray = HubFrame::Head(crate::proto::Head { id: 9, head: 1 });
        assert!(has_close(&m.handle(Input::Frame(stray, 8), t)));
        // A request pending when the connection ends is answered `None`.
        let (mut m, t) = live();
        m.handle(Input::Command(Command::FetchHead), t);
        let a = m.handle(Input::Lost(SessionError::Retry("cut".into())), t);
        assert!(
            a.iter().any(|a| matches!(a, Action::HeadAnswer(None))),
            "{a:?}"
        );
        // Not connected: answered at once.
        let mut m = machine(false, false);
        let a = m.handle(Input::Command(Command::FetchHead), t);
        assert!(matches!(a[..], [Action::HeadAnswer(None)]), "{a:?}");
    }

    #[test]
    fn a_hub_without_the_head_feature_is_not_asked() {
        let mut m = machine(false, false);
        let t = Instant::now();
        m.handle(Input::Tick, t);
        m.handle(Input::Opened(info()), t);
        let old_hub = HubFrame::Welcome(Welcome {
            protocol: PROTOCOL_VERSION,
            head: 9,
            access: Access::ReadWrite,
            client_seq: 0,
            features: vec![],
        });
        m.handle(Input::Frame(old_hub, 10), t);
        let a = m.handle(Input::Command(Command::FetchHead), t);
        assert!(matches!(a[..], [Action::HeadAnswer(None)]), "{a:?}");
    }

    #[test]
    fn an_identity_conflict_renews_the_identity_and_keeps_what_was_in_flight() {
        let (mut m, t) = live();
        m.handle(read(batch(1..=3), 2), t);
        let a = m.handle(
            Input::Frame(
                HubFrame::Error(ErrorFrame {
                    code: ErrorCode::IdentityConflict,
                    message: "client seq 1 was stored with other content".into(),
                }),
                10,
            ),
            t,
        );
        let renew = a.iter().position(|x| matches!(x, Action::RenewIdentity));
        let close = a.iter().position(|x| matches!(x, Action::Close(_)));
        assert!(renew.is_some() && close.is_some(), "{a:?}");
        // Nothing of the batch is applied: it goes again under the new id.
        assert!(!a.iter().any(|x| matches!(x, Action::ApplyResults { .. })));
        assert_eq!(failed(&a).map(|f| f.0), Some(FailureClass::Retry));
        let a = m.handle(Input::Tick, t + Duration::from_secs(2));
        assert!(a.iter().any(|x| matches!(x, Action::Connect)), "{a:?}");
    }

    #[test]
    fn a_welcome_claiming_an_unreachable_client_seq_renumbers_nothing() {
        let mut m = machine(false, false);
        let t = Instant::now();
        m.handle(Input::Tick, t);
        m.handle(Input::Opened(info()), t);
        let a = m.handle(
            Input::Frame(
                HubFrame::Welcome(Welcome {
                    protocol: PROTOCOL_VERSION,
                    head: 9,
                    access: Access::ReadWrite,
                    client_seq: 1 << 63,
                    features: Vec::new(),
                }),
                10,
            ),
            t,
        );
        assert!(
            !a.iter().any(|x| matches!(x, Action::RenewIdentity)),
            "{a:?}"
        );
        assert_eq!(failed(&a).map(|f| f.0), Some(FailureClass::Retry));
    }

    #[test]
    fn a_welcome_beyond_this_files_numbering_renews_the_identity() {
        // Restored from a backup, or a clone: the hub has seq 9 of this
        // identity, the file numbered only up to 5.
        let mut m = machine(false, false);
        let t = Instant::now();
        m.handle(Input::Tick, t);
        m.handle(Input::Opened(info()), t);
        let a = m.handle(
            Input::Frame(
                HubFrame::Welcome(Welcome {
                    protocol: PROTOCOL_VERSION,
                    head: 9,
                    access: Access::ReadWrite,
                    client_seq: 9,
                    features: Vec::new(),
                }),
                10,
            ),
            t,
        );
        assert!(matches!(a[0], Action::RenewIdentity), "{a:?}");
        assert!(!a
            .iter()
            .any(|x| matches!(x, Action::Note(Note::Connected { .. }))));
        assert_eq!(failed(&a).map(|f| f.0), Some(FailureClass::Retry));
    }

    #[test]
    fn frames_a_hub_cannot_have_sent_change_nothing_locally() {
        // An answer naming a seq that was not sent.
        let (mut m, t) = live();
        m.handle(read(batch(1..=3), 2), t);
        let a = m.handle(answer(1, &[1, 2, 99], false), t);
        assert!(
            !a.iter().any(|x| matches!(x, Action::ApplyResults { .. })),
            "{a:?}"
        );
        assert!(failed(&a).is_some() && has_close(&a), "{a:?}");
        // A cursor beyond reach.
        let (mut m, t) = live();
        let far = Input::Frame(
            HubFrame::Changes(Changes {
                changes: Vec::new(),
                up_to: 1 << 62,
                head: 1 << 62,
            }),
            10,
        );
        let a = m.handle(far, t);
        assert!(
            !a.iter().any(|x| matches!(
                x,
                Action::ApplyRemote { .. } | Action::Note(Note::Cursor { .. })
            )),
            "{a:?}"
        );
        assert!(failed(&a).is_some() && has_close(&a), "{a:?}");
        // A cursor going back.
        let (mut m, t) = live();
        let back = Input::Frame(HubFrame::CaughtUp(CaughtUp { head: 2 }), 10);
        let a = m.handle(back, t);
        assert!(
            !a.iter().any(|x| matches!(x, Action::ApplyRemote { .. })),
            "{a:?}"
        );
        assert!(failed(&a).is_some(), "{a:?}");
    }
}
