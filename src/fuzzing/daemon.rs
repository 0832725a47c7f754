//! The daemon's session machine fed arbitrary hub frames, with a small
//! model of the local database behind it (captured writes, the cursor)
//! standing in for what the driver reads and writes. The driver performs
//! each action before the next input, so the harness does too.
//!
//! What must hold after every step (a panic otherwise):
//!
//! * every frame the daemon sends decodes; `hello` opens each connection;
//!   uploads are numbered 1, 2, ... per connection, their seqs increase
//!   across the batches in flight, at most [`MAX_INFLIGHT`] are in flight,
//!   and `acked` never claims an answer not received;
//! * whatever the hub sends, results reach the database only with the
//!   batch they answer, one per change in the order sent, and remote
//!   changes only in order after the cursor (the cursor never goes back
//!   on one connection);
//! * one local read at a time; nothing after the session stopped;
//! * a timer that fires leaves no deadline in the past (no busy loop).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::local::{Batch, Pending};
use crate::proto::{
    self, Access, CaughtUp, Change, ChangeResult, Changes, ClientFrame, ErrorCode, ErrorFrame,
    Head, HubFrame, Op, Outcome, RemoteChange, ServerRow, UploadResult, UploadSummary, Value,
    Welcome, FEATURE_HEAD,
};
use crate::session::machine::{Action, Command, Config, Input, LocalInfo, Machine, State};
use crate::session::{SessionError, MAX_INFLIGHT};

/// A number from a small domain near where the session stands, or far off.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Near {
    /// This much past the reference.
    Ahead(u8),
    /// This much before it (saturating at 0).
    Behind(u8),
    Raw(u64),
}

impl Near {
    fn from(self, reference: u64) -> u64 {
        match self {
            Near::Ahead(n) => reference.saturating_add(n as u64),
            Near::Behind(n) => reference.saturating_sub(n as u64),
            Near::Raw(n) => n,
        }
    }
}

/// How an answer to the oldest batch in flight is made.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Answer {
    /// One result per change, in order.
    Right,
    /// Only the first `n` results, with `more`.
    Part(u8),
    /// A result dropped, or one added, or two swapped.
    Short,
    Long,
    Swapped,
    /// Names another batch.
    OtherBatch(u8),
}

/// What happens next.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Step {
    /// A binary message of arbitrary bytes from the hub.
    Raw(Vec<u8>),
    Welcome {
        head: Near,
        client_seq: Near,
        read_only: bool,
        head_feature: bool,
    },
    /// A `changes` frame: `count` changes from the cursor on, `gap` apart.
    Changes {
        from: Near,
        count: u8,
        gap: u8,
        up_to: Near,
        head: Near,
    },
    CaughtUp(Near),
    /// An answer to the oldest batch in flight, every change given `outcome`
    /// (0 applied, 1 conflict, 2 invalid, 3 could not store).
    Answer {
        how: Answer,
        outcome: u8,
    },
    Error(u8),
    Head(Near),
    /// A ping from the hub.
    Ping,
    /// The connection breaks.
    Lost,
    /// The next connection attempt fails.
    FailConnect,
    /// The app writes rows.
    Write(u8),
    Wake,
    Tick(u16),
    /// An operator's command: pause or resume (upload/download), reconnect,
    /// ask for the head.
    Command(u8),
    TokenChanged,
    Shutdown,
}

/// The local database as the session sees it.
#[derive(Default)]
struct Local {
    /// Captured writes not answered, by seq.
    pending: Vec<u64>,
    last_seq: u64,
    /// Everything up to here was applied from the hub.
    cursor: u64,
    data_version: i64,
}

/// One upload seen on the wire, not yet answered.
struct Sent {
    batch: u64,
    seqs: Vec<u64>,
}

pub struct Harness {
    machine: Machine,
    now: Instant,
    local: Local,
    fail_connect: bool,
    connected: bool,
    stopped: bool,
    reading: bool,
    /// This connection's uploads in flight, and the next batch number.
    inflight: VecDeque<Sent>,
    next_batch: u64,
    /// The highest seq whose answer reached the database.
    answered: u64,
}

fn config() -> Config {
    Config {
        dataset: "d".into(),
        echo_own: false,
        ping_interval: Duration::from_secs(15),
        read_timeout: Duration::from_secs(40),
        max_backoff: Duration::from_secs(60),
        shutdown_timeout: Duration::from_secs(5),
    }
}

impl Harness {
    pub fn new() -> Harness {
        let backoff = || -> Box<dyn Iterator<Item = Duration> + Send> {
            Box::new((0..).map(|i| Duration::from_millis(100 << (i as u32).min(9))))
        };
        Harness {
            machine: Machine::new(config(), false, false, Box::new(backoff)),
            now: Instant::now(),
            local: Local::default(),
            fail_connect: false,
            connected: false,
            stopped: false,
            reading: false,
            inflight: VecDeque::new(),
            next_batch: 1,
            answered: 0,
        }
    }

    /// Starts the session, runs the steps, then shuts it down.
    pub fn run(steps: &[Step]) {
        let mut h = Harness::new();
        h.input(Input::Tick);
        for s in steps {
            h.step(s);
        }
        h.input(Input::Shutdown);
    }

    pub fn step(&mut self, step: &Step) {
        let cursor = self.local.cursor;
        let input = match step {
            Step::Raw(bytes) => {
                crate::session::conn::to_input(Some(Ok(Message::Binary(bytes.clone().into()))))
            }
            Step::Welcome {
                head,
                client_seq,
                read_only,
                head_feature,
            } => self.frame(HubFrame::Welcome(Welcome {
                protocol: 1,
                head: head.from(cursor),
                access: if *read_only {
                    Access::ReadOnly
                } else {
                    Access::ReadWrite
                },
                client_seq: client_seq.from(self.answered),
                features: head_feature
                    .then(|| FEATURE_HEAD.to_owned())
                    .into_iter()
                    .collect(),
            })),
            Step::Changes {
                from,
                count,
                gap,
                up_to,
                head,
            } => {
                let first = from.from(cursor);
                let changes: Vec<RemoteChange> = (0..*count as u64 % 16)
                    .map(|i| remote(first.saturating_add(i * (*gap as u64))))
                    .collect();
                let last = changes.last().map(|c| c.version).unwrap_or(cursor);
                self.frame(HubFrame::Changes(Changes {
                    changes,
                    up_to: up_to.from(last),
                    head: head.from(last),
                }))
            }
            Step::CaughtUp(head) => self.frame(HubFrame::CaughtUp(CaughtUp {
                head: head.from(cursor),
            })),
            Step::Answer { how, outcome } => self.answer(*how, *outcome),
            Step::Error(code) => self.frame(HubFrame::Error(ErrorFrame {
                code: error_code(*code),
                message: "from the harness".into(),
            })),
            Step::Head(head) => self.frame(HubFrame::Head(Head {
                id: 1,
                head: head.from(cursor),
            })),
            Step::Ping => Input::Alive,
            Step::Lost => Input::Lost(SessionError::Retry("connection lost".into())),
            Step::FailConnect => {
                self.fail_connect = true;
                return;
            }
            Step::Write(n) => {
                for _ in 0..*n % 32 {
                    self.local.last_seq += 1;
                    self.local.pending.push(self.local.last_seq);
                }
                self.local.data_version += 1;
                Input::Wake
            }
            Step::Wake => Input::Wake,
            Step::Tick(ms) => {
                self.now += Duration::from_millis(*ms as u64);
                Input::Tick
            }
            Step::Command(c) => Input::Command(command(*c)),
            Step::TokenChanged => Input::TokenChanged,
            Step::Shutdown => Input::Shutdown,
        };
        self.input(input);
    }

    fn frame(&self, f: HubFrame) -> Input {
        let size = proto::encode(&f).len();
        Input::Frame(f, size)
    }

    /// An answer to the oldest batch in flight (or to nothing).
    fn answer(&self, how: Answer, outcome: u8) -> Input {
        let (batch, mut seqs) = match self.inflight.front() {
            Some(s) => (s.batch, s.seqs.clone()),
            None => (1, vec![1]),
        };
        let mut more = false;
        let batch = match how {
            Answer::Right => batch,
            Answer::Part(n) => {
                seqs.truncate(n as usize);
                more = true;
                batch
            }
            Answer::Short => {
                seqs.pop();
                batch
            }
            Answer::Long => {
                seqs.push(seqs.last().copied().unwrap_or(0) + 1);
                batch
            }
            Answer::Swapped => {
                if seqs.len() > 1 {
                    seqs.swap(0, 1);
                }
                batch
            }
            Answer::OtherBatch(b) => b as u64,
        };
        let results: Vec<ChangeResult> = seqs
            .iter()
            .map(|&seq| ChangeResult {
                seq,
                outcome: match outcome % 4 {
                    0 => Outcome::Applied { version: seq },
                    1 => Outcome::Conflict {
                        server: ServerRow {
                            version: 1,
                            deleted: false,
                            values: vec![Value::Integer(1), Value::Null],
                        },
                    },
                    2 => Outcome::Invalid {
                        reason: proto::InvalidReason::WrongKey,
                        message: "wrong key".into(),
                    },
                    _ => Outcome::MaterializeError {
                        message: "disk full".into(),
                    },
                },
            })
            .collect();
        self.frame(HubFrame::UploadResult(UploadResult {
            batch,
            summary: UploadSummary::of(&results),
            results,
            more,
        }))
    }

    /// Feeds the machine an input and whatever performing its actions
    /// gives, in order; the driver feeds nothing once the session stopped.
    fn input(&mut self, input: Input) {
        let mut queue = VecDeque::from([input]);
        while let Some(input) = queue.pop_front() {
            if self.stopped {
                return;
            }
            let tick = matches!(input, Input::Tick);
            if matches!(input, Input::BatchRead { .. }) {
                self.reading = false;
            }
            let actions = self.machine.handle(input, self.now);
            for a in actions {
                assert!(!self.stopped, "an action after stop: {a:?}");
                if let Some(next) = self.perform(a) {
                    queue.push_back(next);
                }
            }
            if tick && !self.stopped {
                if let Some(d) = self.machine.next_deadline() {
                    assert!(d > self.now, "a deadline in the past after a tick");
                }
            }
        }
    }

    fn perform(&mut self, a: Action) -> Option<Input> {
        match a {
            Action::Connect => {
                assert!(!self.connected, "connecting while connected");
                if std::mem::take(&mut self.fail_connect) {
                    return Some(Input::OpenFailed(SessionError::Retry("refused".into())));
                }
                self.connected = true;
                self.inflight.clear();
                self.next_batch = 1;
                Some(Input::Opened(LocalInfo {
                    client_id: "me".into(),
                    client_key: "key".into(),
                    cursor: self.local.cursor,
                    local_seq: self.local.last_seq,
                    anchor: None,
                    tables: Vec::new(),
                    refetch: false,
                }))
            }
            Action::Send(bytes) => {
                assert!(self.connected, "a frame sent with no connection");
                self.sent(&bytes);
                None
            }
            Action::Ping => None,
            Action::Close(_) => {
                self.connected = false;
                self.inflight.clear();
                None
            }
            Action::Recover | Action::RenewIdentity => {
                self.local.cursor = 0;
                None
            }
            Action::ReadBatch { after, .. } => {
                assert!(!self.reading, "two local reads at once");
                assert!(self.connected, "a read for no connection");
                self.reading = true;
                Some(self.read(after))
            }
            Action::ApplyRemote { changes, up_to, .. } => {
                let mut last = self.local.cursor;
                for c in &changes {
                    assert!(
                        c.version > last && c.version <= up_to,
                        "remote change {} applied out of order (after {last}, up to {up_to})",
                        c.version
                    );
                    last = c.version;
                }
                assert!(up_to >= self.local.cursor, "the cursor went back");
                self.local.cursor = up_to;
                None
            }
            Action::ApplyResults { sent, results, .. } => {
                let s = self
                    .inflight
                    .pop_front()
                    .expect("results of no batch in flight");
                assert_eq!(sent.batch, s.batch, "results applied to another batch");
                let seqs: Vec<u64> = results.iter().map(|r| r.seq).collect();
                assert_eq!(seqs, s.seqs, "results that do not answer the batch sent");
                let through = sent.read.through;
                self.local.pending.retain(|&q| q > through);
                self.answered = self.answered.max(through);
                Some(Input::ResultsApplied {
                    pending: self.pending(),
                })
            }
            Action::RetryHeld | Action::ReconnectAnswer(_) | Action::HeadAnswer(_) => None,
            Action::Note(_) => None,
            Action::Stop => {
                assert!(!self.stopped, "stopped twice");
                self.stopped = true;
                None
            }
        }
    }

    /// A frame the daemon sends.
    fn sent(&mut self, bytes: &[u8]) {
        let f: ClientFrame = proto::decode(bytes)
            .unwrap_or_else(|e| panic!("the daemon sent a frame that does not decode: {e}"));
        match f {
            ClientFrame::Hello(h) => {
                assert_eq!(h.cursor, self.local.cursor, "hello carries the cursor");
                assert!(self.inflight.is_empty(), "hello after uploads");
            }
            ClientFrame::Upload(up) => {
                assert!(
                    matches!(self.machine.state(), State::Live(_)),
                    "an upload before welcome"
                );
                assert_eq!(up.batch, self.next_batch, "batches numbered in order");
                self.next_batch += 1;
                assert!(up.acked <= self.answered, "acked an answer not received");
                let mut last = self.inflight.back().and_then(|s| s.seqs.last().copied());
                for c in &up.changes {
                    assert!(last.is_none_or(|l| c.seq > l), "seqs do not increase");
                    last = Some(c.seq);
                }
                self.inflight.push_back(Sent {
                    batch: up.batch,
                    seqs: up.changes.iter().map(|c| c.seq).collect(),
                });
                assert!(self.inflight.len() <= MAX_INFLIGHT, "too many in flight");
            }
            ClientFrame::Head(_) => {}
        }
    }

    fn read(&self, after: u64) -> Input {
        let seqs: Vec<u64> = self
            .local
            .pending
            .iter()
            .copied()
            .filter(|&q| q > after)
            .take(40)
            .collect();
        let through = seqs.last().copied().unwrap_or(after);
        let changes: Vec<Change> = seqs
            .iter()
            .map(|&seq| Change {
                seq,
                table: "t".into(),
                op: Op::Upsert,
                pk: vec![Value::Integer(seq as i64 % 7)],
                values: vec![Value::Integer(seq as i64 % 7), Value::Integer(seq as i64)],
                base: 0,
                mask: u64::MAX,
            })
            .collect();
        Input::BatchRead {
            batch: Some(Batch {
                captured_ms: vec![0; changes.len()],
                changes,
                through,
                schema_changed: None,
            }),
            pending: Some(self.pending()),
            data_version: self.local.data_version,
        }
    }

    fn pending(&self) -> Pending {
        Pending {
            changes: self.local.pending.len() as u64,
            last_seq: self.local.last_seq,
            oldest_seq: self.local.pending.first().copied(),
            consumed: self.answered,
            oldest_at_ms: None,
            held: 0,
            held_reason: None,
        }
    }
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}

fn remote(version: u64) -> RemoteChange {
    RemoteChange {
        version,
        table: "t".into(),
        op: Op::Upsert,
        pk: vec![Value::Integer(1)],
        values: vec![Value::Integer(1), Value::Integer(version as i64)],
    }
}

fn error_code(n: u8) -> ErrorCode {
    ErrorCode::ALL[n as usize % ErrorCode::ALL.len()]
}

fn command(n: u8) -> Command {
    let (upload, download) = (n & 1 != 0, n & 2 != 0);
    match (n >> 2) % 4 {
        0 => Command::Pause { upload, download },
        1 => Command::Resume { upload, download },
        2 => Command::Reconnect,
        _ => Command::FetchHead,
    }
}
