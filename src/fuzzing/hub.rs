//! The hub's session machine of two authenticated clients over a real
//! SQLite store, driven step by step the way the session driver drives it,
//! with the store calls and the live fan-out done by the harness. The steps
//! come from a fuzzer or a property test and may be any order of frames,
//! store answers, writer progress, timers and endings.
//!
//! What must hold after every step (a panic otherwise):
//!
//! * every frame the hub sends decodes, and at most
//!   [`WRITE_QUEUE_FRAMES`] wait for the writer;
//! * one page read and one apply at a time, uploads applied in the order
//!   they arrived, nothing done after the session closed;
//! * an upload's answer names the batch's changes one by one in order, and
//!   a change answered `applied` is in the store's log at that version with
//!   that content (a resend is answered with the same version);
//! * `changes` frames hold the store's log content, in order, never the
//!   client's own changes unless it asked for them, and by their `up_to`
//!   every change of the log the client should get was sent (nothing
//!   skipped);
//! * once nothing is left to do, every subscribed session's cursor is the
//!   store's head.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::hub::fanout::Published;
use crate::hub::session::machine::WRITE_QUEUE_FRAMES;
use crate::hub::session::machine::{Action, Ending, Input, Machine, Params, Refusal};
use crate::hub::store::sqlite::SqliteStore;
use crate::hub::store::{HubStore, LogEntry, StoreError};
use crate::local::schema::fingerprint;
use crate::proto::{
    self, Access, Change, ChangeResult, ClientFrame, ErrorCode, HeadAsk, Hello, HubFrame, Op,
    Outcome, TableSchema, Upload, Value, Welcome, MAX_FRAME_BYTES, MAX_PAGE_BYTES,
    MAX_PAGE_CHANGES, PROTOCOL_VERSION,
};

const DATASET: &str = "d";
/// Live batches a session may fall behind before it lags (the hub keeps
/// 256; a small buffer makes the fuzzer meet lag).
const LIVE_BUFFER: usize = 3;
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// One of the two clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Who {
    A,
    B,
}

/// Where a new session's `hello` cursor stands.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum CursorAt {
    Zero,
    /// Where the client's last session brought it.
    Received,
    Head,
}

/// A SQLite value, from a small domain so that keys collide.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum SmallValue {
    Null,
    Int(i8),
    Real(f64),
    Text(u8),
    Blob(Vec<u8>),
}

impl SmallValue {
    fn value(&self) -> Value {
        match self {
            SmallValue::Null => Value::Null,
            SmallValue::Int(i) => Value::Integer(*i as i64),
            SmallValue::Real(f) => Value::Real(*f),
            SmallValue::Text(t) => Value::Text(format!("k{}", t % 8)),
            SmallValue::Blob(b) => Value::Blob(b.iter().take(64).copied().collect()),
        }
    }
}

/// One change of an upload. Table `t` has an INTEGER key and a column of
/// any type; table `u` is STRICT with a TEXT key and an INTEGER column.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct ChangeSpec {
    /// Step from the previous seq of the batch (or from the client's
    /// numbering for the first): 0 repeats it, 255 jumps absurdly far.
    pub seq_step: u8,
    /// 0 `t`, 1 `u`, anything else a table nobody declared.
    pub table: u8,
    pub delete: bool,
    /// The key, in the key column's type unless `odd_key`.
    pub key: i8,
    pub odd_key: bool,
    pub value: SmallValue,
    /// Number of values when not 2 (wrong column count).
    pub columns: Option<u8>,
    pub base: u8,
}

/// What happens next to one client's session.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Step {
    /// A new session after a valid `hello`; an open one of the same client
    /// is replaced, as the registry does.
    Start {
        who: Who,
        cursor: CursorAt,
        echo_own: bool,
        subscribe: bool,
        read_only: bool,
        /// Bit 0: announces `t`, bit 1: `u`.
        tables: u8,
    },
    /// An `upload` frame.
    Upload {
        who: Who,
        batch: u8,
        /// Acknowledges the answers up to the client's last answered seq.
        ack: bool,
        changes: Vec<ChangeSpec>,
    },
    /// A binary message of arbitrary bytes.
    Raw {
        who: Who,
        bytes: Vec<u8>,
    },
    /// A `head` question.
    Head {
        who: Who,
        id: u8,
    },
    /// A second `hello`.
    Hello {
        who: Who,
    },
    /// A ping.
    Ping {
        who: Who,
    },
    /// The store finishes the apply under way.
    FinishApply {
        who: Who,
    },
    /// The store finishes the apply, and a fault point cuts the connection.
    CutAfterApply {
        who: Who,
    },
    /// The store finishes the page read under way.
    FinishRead {
        who: Who,
    },
    /// The store fails the page read under way.
    FailRead {
        who: Who,
    },
    /// The live stream gives the session its next batch (or says it lagged).
    Deliver {
        who: Who,
    },
    /// The writer writes up to this many frames.
    Write {
        who: Who,
        frames: u8,
    },
    /// Bytes of a frame move.
    Progress {
        who: Who,
    },
    /// Time passes, then the timer fires.
    Tick {
        who: Who,
        ms: u16,
    },
    Shutdown {
        who: Who,
    },
    Gone {
        who: Who,
    },
}

/// What the harness knows of one client (beyond its sessions).
struct Client {
    id: &'static str,
    key: &'static str,
    /// The client's own numbering: the last seq it used.
    seq: u64,
    /// The highest seq whose answer it received (its `acked`).
    answered: u64,
    /// Where its last session's stream brought it.
    received: u64,
    /// Answers `applied` by seq: a resend must get the same version.
    applied: HashMap<u64, u64>,
}

/// An apply whose answer has not been sent in full.
struct Answering {
    batch: u64,
    changes: Vec<Change>,
    /// Results already seen in `upload_result` frames.
    seen: usize,
}

struct Session {
    machine: Machine,
    closed: bool,
    replaced: bool,
    echo_own: bool,
    subscribe: bool,
    read_only: bool,
    tables: HashMap<String, TableSchema>,
    /// Frames handed to the writer and not written.
    unwritten: usize,
    written: u64,
    frames_seen: u64,
    reading: Option<u64>,
    /// Uploads read from the client and not yet applied, in order.
    uploads: VecDeque<Upload>,
    applying: Option<Upload>,
    answering: VecDeque<Answering>,
    /// `forbidden` answers expected (uploads on a read-only token).
    forbidden: usize,
    heads: VecDeque<u64>,
    live: VecDeque<Arc<Published>>,
    lagged: bool,
    /// The stream: last `up_to`, the last change's version, and versions
    /// received above `checked` (everything up to `checked` was verified).
    cursor: u64,
    last_version: u64,
    checked: u64,
    received: Vec<u64>,
    caught_up: bool,
}

/// Two clients of one dataset, their sessions and the store.
pub struct Harness {
    store: Arc<SqliteStore>,
    schemas: [TableSchema; 2],
    clients: [Client; 2],
    sessions: [Option<Session>; 2],
    now: Instant,
}

fn schema(name: &str, columns: &[&str], types: &[&str], strict: bool) -> TableSchema {
    let columns: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
    let types: Vec<String> = types.iter().map(|c| c.to_string()).collect();
    TableSchema {
        fingerprint: fingerprint(name, &columns, &types, &[0]),
        name: name.into(),
        columns,
        types,
        pk: vec![0],
        strict,
    }
}

fn idx(who: Who) -> usize {
    match who {
        Who::A => 0,
        Who::B => 1,
    }
}

impl Harness {
    /// A store in `dir` (a new directory; tmpfs keeps fuzzing fast).
    pub fn new(dir: &Path) -> Harness {
        let store = SqliteStore::open(&dir.join("hub.db")).expect("the store opens");
        let client = |id, key| Client {
            id,
            key,
            seq: 0,
            answered: 0,
            received: 0,
            applied: HashMap::new(),
        };
        Harness {
            store: Arc::new(store),
            schemas: [
                schema("t", &["id", "v"], &["INTEGER", ""], false),
                schema("u", &["k", "n"], &["TEXT", "INTEGER"], true),
            ],
            clients: [client("a", "key-a"), client("b", "key-b")],
            sessions: [None, None],
            now: Instant::now(),
        }
    }

    /// Runs the steps, then lets every session finish what it can and
    /// checks where they stand.
    pub fn run(dir: &Path, steps: &[Step]) {
        let mut h = Harness::new(dir);
        for s in steps {
            h.step(s);
        }
        h.settle();
    }

    pub fn step(&mut self, step: &Step) {
        match step {
            Step::Start {
                who,
                cursor,
                echo_own,
                subscribe,
                read_only,
                tables,
            } => self.start(*who, *cursor, *echo_own, *subscribe, *read_only, *tables),
            Step::Upload {
                who,
                batch,
                ack,
                changes,
            } => {
                let up = self.upload(*who, *batch, *ack, changes);
                self.inbound(*who, Ok(ClientFrame::Upload(up)));
            }
            Step::Raw { who, bytes } => {
                let f = proto::decode::<ClientFrame>(bytes).map_err(|e| e.to_string());
                self.inbound(*who, f);
            }
            Step::Head { who, id } => {
                self.inbound(*who, Ok(ClientFrame::Head(HeadAsk { id: *id as u64 })))
            }
            Step::Hello { who } => {
                let hello = self.hello(*who, 0, &self.schemas, false, true);
                self.inbound(*who, Ok(ClientFrame::Hello(hello)));
            }
            Step::Ping { who } => self.input(*who, Input::Heard),
            Step::FinishApply { who } => self.finish_apply(*who, false),
            Step::CutAfterApply { who } => self.finish_apply(*who, true),
            Step::FinishRead { who } => self.finish_read(*who, false),
            Step::FailRead { who } => self.finish_read(*who, true),
            Step::Deliver { who } => self.deliver(*who),
            Step::Write { who, frames } => self.write(*who, *frames as usize),
            Step::Progress { who } => self.input(*who, Input::Progress),
            Step::Tick { who, ms } => {
                self.now += Duration::from_millis(*ms as u64);
                self.input(*who, Input::Tick);
            }
            Step::Shutdown { who } => self.input(*who, Input::Shutdown),
            Step::Gone { who } => self.input(*who, Input::Gone),
        }
    }

    fn hello(
        &self,
        who: Who,
        cursor: u64,
        tables: &[TableSchema],
        echo_own: bool,
        subscribe: bool,
    ) -> Hello {
        let c = &self.clients[idx(who)];
        Hello {
            protocol: PROTOCOL_VERSION,
            client_id: c.id.into(),
            client_key: c.key.into(),
            dataset: DATASET.into(),
            cursor,
            tables: tables.to_vec(),
            echo_own,
            subscribe,
            anchor: None,
        }
    }

    /// What `open` does after the `hello` checks: schemas, identity, the
    /// registry (replacing an open session), the machine's start.
    fn start(
        &mut self,
        who: Who,
        at: CursorAt,
        echo_own: bool,
        subscribe: bool,
        read_only: bool,
        tables: u8,
    ) {
        let i = idx(who);
        if let Some(old) = self.sessions[i].as_mut() {
            old.replaced = true;
            self.input(who, Input::Replaced);
            if self.sessions[i]
                .as_ref()
                .is_some_and(|s| s.applying.is_some())
            {
                // The new session registered before the store took it.
                self.sessions[i].as_mut().unwrap().applying = None;
                self.input(who, Input::NotApplied);
            }
        }
        let head = self.store.head(DATASET).expect("head");
        let cursor = match at {
            CursorAt::Zero => 0,
            CursorAt::Received => self.clients[i].received.min(head),
            CursorAt::Head => head,
        };
        let announced: Vec<TableSchema> = self
            .schemas
            .iter()
            .enumerate()
            .filter(|(n, _)| tables & (1 << n) != 0)
            .map(|(_, t)| t.clone())
            .collect();
        let access = if read_only {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        };
        let id = self.clients[i].id;
        match self
            .store
            .register_schema(DATASET, id, &announced, !read_only)
        {
            // Rows a breaking change wrote again go out like an upload's
            // (none here: the harness never accepts a breaking change).
            Ok(rewritten) => self.publish(rewritten),
            // A read-only token cannot register a table: refused at hello.
            Err(StoreError::NotRegistered { .. }) if read_only => {
                self.sessions[i] = None;
                return;
            }
            Err(e) => panic!("registering the schema: {e}"),
        }
        let c = &self.clients[i];
        let client_seq = self
            .store
            .claim_identity(DATASET, c.id, c.key)
            .expect("the identity's own key is accepted");
        let params = Params {
            client: Arc::from(c.id),
            access,
            echo_own,
            subscribe,
            tables: announced.iter().map(|t| t.name.clone()).collect(),
            read_timeout: READ_TIMEOUT,
        };
        let welcome = Welcome {
            protocol: PROTOCOL_VERSION,
            head,
            access,
            client_seq,
            features: vec![proto::FEATURE_HEAD.to_owned()],
        };
        let (machine, actions) = Machine::start(params, welcome, cursor, self.now);
        self.sessions[i] = Some(Session {
            machine,
            closed: false,
            replaced: false,
            echo_own,
            subscribe,
            read_only,
            tables: announced.into_iter().map(|t| (t.name.clone(), t)).collect(),
            unwritten: 0,
            written: 0,
            frames_seen: 0,
            reading: None,
            uploads: VecDeque::new(),
            applying: None,
            answering: VecDeque::new(),
            forbidden: 0,
            heads: VecDeque::new(),
            live: VecDeque::new(),
            lagged: false,
            cursor,
            last_version: cursor,
            checked: cursor,
            received: Vec::new(),
            caught_up: false,
        });
        self.perform(who, actions);
    }

    fn upload(&mut self, who: Who, batch: u8, ack: bool, specs: &[ChangeSpec]) -> Upload {
        let c = &mut self.clients[idx(who)];
        let mut seq = c.seq;
        let mut changes = Vec::new();
        for s in specs.iter().take(64) {
            seq = match s.seq_step {
                255 => u64::MAX - 1,
                254 => proto::MAX_SEQ + 1,
                n => seq.saturating_add(n as u64),
            };
            let table = match s.table {
                0 => "t",
                1 => "u",
                _ => "elsewhere",
            };
            let key = match (table, s.odd_key) {
                ("u", false) | ("t", true) => Value::Text(format!("k{}", s.key)),
                _ => Value::Integer(s.key as i64),
            };
            let (op, values) = if s.delete {
                (Op::Delete, Vec::new())
            } else {
                let n = s.columns.map(|n| n as usize % 4).unwrap_or(2);
                let mut values = vec![key.clone(), s.value.value()];
                values.resize(n, Value::Null);
                (Op::Upsert, values)
            };
            changes.push(Change {
                seq,
                table: table.into(),
                op,
                pk: vec![key],
                values,
                base: s.base as u64,
                mask: u64::MAX,
            });
        }
        if seq <= proto::MAX_SEQ {
            c.seq = c.seq.max(seq);
        }
        Upload {
            batch: batch as u64,
            acked: if ack { c.answered } else { 0 },
            changes,
        }
    }

    /// A message read from the client's socket, as the driver maps it.
    fn inbound(&mut self, who: Who, frame: Result<ClientFrame, String>) {
        let head = self.store.head(DATASET).expect("head");
        let Some(s) = self.open(who) else { return };
        if !s.machine.wants_inbound() {
            // The driver does not read now.
            return;
        }
        let input = match frame {
            Ok(ClientFrame::Head(h)) => {
                s.heads.push_back(h.id);
                Input::HeadAsked { id: h.id, head }
            }
            Ok(ClientFrame::Upload(up)) => {
                if s.read_only {
                    s.forbidden += 1;
                } else {
                    s.uploads.push_back(up.clone());
                }
                Input::Frame(ClientFrame::Upload(up))
            }
            Ok(f) => Input::Frame(f),
            Err(e) => Input::Bad(Refusal::new(ErrorCode::MalformedFrame, e)),
        };
        self.input(who, input);
    }

    /// The open session of a client.
    fn open(&mut self, who: Who) -> Option<&mut Session> {
        self.sessions[idx(who)].as_mut().filter(|s| !s.closed)
    }

    fn input(&mut self, who: Who, input: Input) {
        let now = self.now;
        let Some(s) = self.open(who) else { return };
        let actions = s.machine.handle(input, now);
        self.perform(who, actions);
    }

    fn finish_apply(&mut self, who: Who, cut: bool) {
        let i = idx(who);
        let Some(s) = self.open(who) else { return };
        let Some(up) = s.applying.take() else { return };
        if s.replaced {
            return self.input(who, Input::NotApplied);
        }
        let tables = s.tables.clone();
        let client = self.clients[i].id;
        let r = self
            .store
            .apply_batch(DATASET, client, &tables, &up.changes, up.acked);
        let input = match r {
            Ok(mut applied) => {
                self.check_results(who, &up, &applied.results);
                self.publish(std::mem::take(&mut applied.logged));
                if cut {
                    Input::Cut
                } else {
                    let s = self.open(who).expect("still open");
                    s.answering.push_back(Answering {
                        batch: up.batch,
                        changes: up.changes,
                        seen: 0,
                    });
                    Input::Applied {
                        results: applied.results,
                        failed: false,
                    }
                }
            }
            Err(e @ (StoreError::IdentityConflict(_) | StoreError::BadSequence(_))) => {
                Input::Refused(e.into())
            }
            Err(e) => panic!("the store failed on a batch: {e}"),
        };
        self.input(who, input);
    }

    /// The store's answers: one per change, in order; `applied` means the
    /// log holds the change at that version, and a seq answered twice gets
    /// the same version.
    fn check_results(&mut self, who: Who, up: &Upload, results: &[ChangeResult]) {
        assert_eq!(results.len(), up.changes.len(), "one answer per change");
        for (r, ch) in results.iter().zip(&up.changes) {
            assert_eq!(r.seq, ch.seq, "answers in the batch's order");
            let Outcome::Applied { version } = r.outcome else {
                continue;
            };
            let earlier = self.clients[idx(who)].applied.insert(ch.seq, version);
            assert!(
                earlier.is_none_or(|v| v == version),
                "seq {} applied twice: versions {earlier:?} and {version}",
                ch.seq
            );
            self.check_logged(ch, version);
        }
    }

    /// A change answered `applied` at `version` is what the log holds there
    /// (a delete of a row not there is applied at the row's version, or 0).
    fn check_logged(&self, ch: &Change, version: u64) {
        if ch.op == Op::Delete {
            if version == 0 {
                return;
            }
            let page = self
                .store
                .changes_since(DATASET, version - 1, None, 1, MAX_PAGE_BYTES)
                .expect("log read");
            let e = page.changes.first().expect("an applied delete is logged");
            assert_eq!(
                (e.version, &e.table, e.op, &e.pk),
                (version, &ch.table, Op::Delete, &ch.pk),
                "an applied delete is the log's change at its version"
            );
            return;
        }
        let want = proto::log_digest(
            version,
            &ch.table,
            ch.op,
            &proto::encode_key(&ch.pk),
            &proto::encode_values(&ch.values),
        );
        let got = self.store.log_digest(DATASET, version).expect("log read");
        assert_eq!(
            got.as_deref(),
            Some(want.as_str()),
            "change seq {} answered applied at {version} is not in the log",
            ch.seq
        );
    }

    /// Fans a stored batch out to every open session, as the broadcast
    /// does: a session that falls more than [`LIVE_BUFFER`] behind lags.
    fn publish(&mut self, logged: Vec<LogEntry>) {
        let (Some(first), Some(last)) = (logged.first(), logged.last()) else {
            return;
        };
        let p = Arc::new(Published {
            after: first.change.version - 1,
            last: last.change.version,
            entries: logged,
            stored: self.now,
            breaking: Vec::new(),
        });
        for s in self.sessions.iter_mut().flatten().filter(|s| !s.closed) {
            s.live.push_back(p.clone());
            if s.live.len() > LIVE_BUFFER {
                s.live.pop_front();
                s.lagged = true;
            }
        }
    }

    fn finish_read(&mut self, who: Who, fail: bool) {
        let i = idx(who);
        let Some(s) = self.open(who) else { return };
        let Some(after) = s.reading.take() else {
            return;
        };
        if fail {
            let r = Refusal::new(ErrorCode::Internal, "hub store: disk I/O error");
            return self.input(who, Input::StoreFailed(r));
        }
        let exclude = (!s.echo_own).then_some(self.clients[i].id);
        let head = self.store.head(DATASET).expect("head");
        let page = self
            .store
            .changes_since(DATASET, after, exclude, MAX_PAGE_CHANGES, MAX_PAGE_BYTES)
            .expect("page read");
        self.input(who, Input::PageRead { page, head });
    }

    fn deliver(&mut self, who: Who) {
        let Some(s) = self.open(who) else { return };
        if !s.machine.wants_live() {
            return;
        }
        let input = if std::mem::take(&mut s.lagged) {
            Input::Lagged
        } else if let Some(p) = s.live.pop_front() {
            Input::Published(p)
        } else {
            return;
        };
        self.input(who, input);
    }

    fn write(&mut self, who: Who, frames: usize) {
        let Some(s) = self.open(who) else { return };
        let n = frames.min(s.unwritten);
        if n == 0 {
            return;
        }
        s.unwritten -= n;
        s.written += n as u64;
        let total = s.written;
        self.input(who, Input::Written { total });
    }

    fn perform(&mut self, who: Who, actions: Vec<Action>) {
        for a in actions {
            let s = self.sessions[idx(who)].as_mut().expect("a session acts");
            assert!(!s.closed, "an action after the session closed: {a:?}");
            match a {
                Action::Send(f) => {
                    s.unwritten += 1;
                    assert!(
                        s.unwritten <= WRITE_QUEUE_FRAMES,
                        "more than {WRITE_QUEUE_FRAMES} frames wait for the writer"
                    );
                    self.check_sent(who, &f);
                }
                Action::ReadPage { after } => {
                    assert!(s.reading.is_none(), "a second page read at once");
                    assert!(s.subscribe, "a page read for a client not subscribed");
                    s.reading = Some(after);
                }
                Action::Apply(up) => {
                    assert!(s.applying.is_none(), "a second apply at once");
                    assert!(!s.read_only, "an upload of a read-only token applied");
                    let next = s.uploads.pop_front().expect("applies only what came");
                    assert_eq!(next, up, "uploads applied in the order they came");
                    s.applying = Some(up);
                }
                Action::FannedOut(_) => {}
                Action::Close { flush, ending } => {
                    for f in &flush {
                        self.check_sent(who, f);
                    }
                    let s = self.sessions[idx(who)].as_mut().unwrap();
                    s.closed = true;
                    if let Ending::Refuse(r) = &ending {
                        assert!(!r.message.is_empty(), "a refusal says why");
                    }
                    self.clients[idx(who)].received = s.cursor;
                }
            }
        }
    }

    /// One frame the hub sends to the client.
    fn check_sent(&mut self, who: Who, bytes: &[u8]) {
        assert!(bytes.len() <= MAX_FRAME_BYTES, "a frame over the limit");
        let f: HubFrame = proto::decode(bytes)
            .unwrap_or_else(|e| panic!("the hub sent a frame that does not decode: {e}"));
        let head = self.store.head(DATASET).expect("head");
        let i = idx(who);
        let s = self.sessions[i].as_mut().expect("a session sends");
        s.frames_seen += 1;
        match f {
            HubFrame::Welcome(_) => assert_eq!(s.frames_seen, 1, "welcome comes first"),
            HubFrame::Changes(c) => {
                assert!(s.subscribe, "changes sent to a client not subscribed");
                assert!(c.up_to >= s.cursor, "up_to went back");
                assert!(c.up_to <= head, "up_to past the store's head");
                for ch in &c.changes {
                    assert!(
                        ch.version > s.last_version && ch.version <= c.up_to,
                        "change {} out of order (after {}, up to {})",
                        ch.version,
                        s.last_version,
                        c.up_to
                    );
                    s.last_version = ch.version;
                    assert!(s.tables.contains_key(&ch.table), "a table not announced");
                    let digest = proto::log_digest(
                        ch.version,
                        &ch.table,
                        ch.op,
                        &proto::encode_key(&ch.pk),
                        &proto::encode_values(&ch.values),
                    );
                    let logged = self.store.log_digest(DATASET, ch.version).expect("log");
                    assert_eq!(logged, Some(digest), "a change sent is the log's");
                    s.received.push(ch.version);
                }
                s.cursor = c.up_to;
                s.last_version = s.last_version.max(c.up_to);
                self.check_complete(who);
            }
            HubFrame::CaughtUp(c) => {
                assert!(s.subscribe && !s.caught_up, "caught_up twice or unasked");
                // It may move the cursor past changes of other tables.
                assert!(
                    c.head >= s.cursor && c.head <= head,
                    "caught up out of range"
                );
                s.caught_up = true;
                s.cursor = c.head;
                s.last_version = s.last_version.max(c.head);
                self.check_complete(who);
            }
            HubFrame::UploadResult(r) => {
                let a = s.answering.front_mut().expect("an answer to no upload");
                assert_eq!(r.batch, a.batch, "answers in the order of the uploads");
                assert!(
                    a.seen + r.results.len() <= a.changes.len(),
                    "too many results"
                );
                for (res, ch) in r.results.iter().zip(&a.changes[a.seen..]) {
                    assert_eq!(res.seq, ch.seq, "an answer names the batch's changes");
                }
                a.seen += r.results.len();
                assert_eq!(r.summary, proto::UploadSummary::of(&r.results));
                if !r.more {
                    assert_eq!(a.seen, a.changes.len(), "an answer covers the batch");
                    s.answering.pop_front();
                    let c = &mut self.clients[i];
                    if let Some(last) = r.results.last() {
                        c.answered = c.answered.max(last.seq);
                    }
                }
            }
            HubFrame::Error(e) => {
                assert_eq!(e.code, ErrorCode::Forbidden, "{e:?}");
                assert!(s.forbidden > 0, "forbidden without a read-only upload");
                s.forbidden -= 1;
            }
            HubFrame::Head(h) => {
                let id = s.heads.pop_front().expect("a head answer to no question");
                assert_eq!(h.id, id, "head answers in order");
                assert!(h.head <= head, "a head past the store's");
            }
        }
    }

    /// By its `up_to`, a session has sent every change of the log it owes
    /// the client: not its own (unless echoed), of an announced table.
    fn check_complete(&mut self, who: Who) {
        let i = idx(who);
        let id = self.clients[i].id;
        let s = self.sessions[i].as_mut().expect("a session");
        let exclude = (!s.echo_own).then_some(id);
        let mut want = Vec::new();
        let mut after = s.checked;
        while after < s.cursor {
            let page = self
                .store
                .changes_since(DATASET, after, exclude, MAX_PAGE_CHANGES, MAX_PAGE_BYTES)
                .expect("log read");
            assert!(page.up_to > after, "the log read moves");
            want.extend(
                page.changes
                    .iter()
                    .filter(|c| c.version <= s.cursor && s.tables.contains_key(&c.table))
                    .map(|c| c.version),
            );
            after = page.up_to;
        }
        assert_eq!(
            s.received, want,
            "changes in ({}, {}] the client should have received",
            s.checked, s.cursor
        );
        s.checked = s.cursor;
        s.received.clear();
    }

    /// Performs whatever is pending until nothing moves; then every open
    /// session has answered every upload, and a subscribed, caught-up one
    /// stands at the store's head.
    pub fn settle(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            for who in [Who::A, Who::B] {
                let Some(s) = self.open(who) else { continue };
                let (writing, applying, reading) =
                    (s.unwritten > 0, s.applying.is_some(), s.reading.is_some());
                let live = s.machine.wants_live() && (s.lagged || !s.live.is_empty());
                if writing {
                    self.write(who, usize::MAX);
                } else if applying {
                    self.finish_apply(who, false);
                } else if reading {
                    self.finish_read(who, false);
                } else if live {
                    self.deliver(who);
                } else {
                    continue;
                }
                moved = true;
            }
            if !moved {
                break;
            }
        }
        let head = self.store.head(DATASET).expect("head");
        for who in [Who::A, Who::B] {
            let Some(s) = self.open(who) else { continue };
            assert!(
                s.uploads.is_empty() && s.answering.is_empty() && s.forbidden == 0,
                "uploads left unanswered"
            );
            assert!(s.heads.is_empty(), "head questions left unanswered");
            if s.subscribe && s.caught_up && !s.replaced {
                assert_eq!(s.cursor, head, "a live session ends behind the head");
            }
        }
    }
}
