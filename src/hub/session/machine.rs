//! The protocol decisions of one hub session, without I/O.
//!
//! [`Machine::handle`] takes what happened ([`Input`]: a frame arrived, a
//! store read or apply finished, a batch was published, the writer took
//! frames, a timer fired, shutdown) and returns what to do ([`Action`]: queue
//! a frame for the writer, read a page, apply an upload, close). The driver
//! (`driver.rs`) performs the actions; no tokio and no socket here.
//!
//! Bounds kept here: at most [`WRITE_QUEUE_FRAMES`] frames wait for the
//! writer (catch-up and live frames also stop at [`MAX_PAGE_BYTES`] waiting
//! bytes); catch-up reads one page at a time and only when that page can be
//! queued; a live batch is cut into frames lazily, one frame when there is
//! room; uploads are applied one at a time and in order, and inbound frames
//! are not read while [`MAX_PENDING_BATCHES`] uploads wait to be applied or
//! answered. A session whose writer is full does not take live batches: its
//! broadcast receiver may lag, and it then reads from the store by sequence.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::hub::fanout::Published;
use crate::hub::store::Page;
use crate::proto::{
    self, Access, CaughtUp, ChangeResult, ChangesRef, ClientFrame, ErrorCode, ErrorFrame, Head,
    HubFrame, Outcome, RemoteChange, Upload, UploadResult, UploadSummary, Value, Welcome,
    MAX_PAGE_BYTES, MAX_PAGE_CHANGES,
};

/// Frames handed to the writer and not yet written, at most.
pub const WRITE_QUEUE_FRAMES: usize = 4;

/// Uploads received and not yet answered (queued, being applied, or answers
/// waiting for the writer) above which the session stops reading: twice the
/// daemon's window of batches in flight, so a well-behaved daemon never
/// meets it.
pub const MAX_PENDING_BATCHES: usize = 8;
/// Head answers waiting to be written; past this the session stops reading
/// (a client that asks without reading cannot grow the queue).
pub const MAX_PENDING_HEADS: usize = 4;

/// Why a session ends with an error frame; also the close frame's reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// How a session ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The client closed the connection, or it was lost: nothing to send.
    Gone,
    /// Nothing received for the read timeout.
    Silent(Duration),
    /// The client took nothing for the read timeout while `waiting` frames
    /// waited for it: dropped without a close handshake.
    Stalled { waiting: usize, took: Duration },
    /// A fault point cut the connection after applying a batch (tests).
    Cut,
    /// An error frame, then a close frame.
    Refuse(Refusal),
}

/// What the session has to do.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Queue one encoded frame for the writer. The machine never has more
    /// than [`WRITE_QUEUE_FRAMES`] of them unwritten, so this never waits.
    Send(Vec<u8>),
    /// Read the next page of the log after this sequence number (without the
    /// client's own changes unless it asked for them), and the head.
    ReadPage { after: u64 },
    /// Apply this upload; answer with [`Input::Applied`].
    Apply(Upload),
    /// A live batch stored at this instant was just queued (fan-out latency).
    FannedOut(Instant),
    /// End the session: queue `flush` (upload answers), then end as said.
    Close { flush: Vec<Vec<u8>>, ending: Ending },
}

/// What happened.
#[derive(Debug)]
pub enum Input {
    /// A frame from the client.
    Frame(ClientFrame),
    /// An inbound message that is not a frame (malformed, text, too large).
    Bad(Refusal),
    /// A control message (ping, pong) arrived: the client is alive.
    Heard,
    /// The client asked for the dataset's head, which was `head` then.
    HeadAsked { id: u64, head: u64 },
    /// Bytes of a frame being written were taken by the client: it reads,
    /// however slowly.
    Progress,
    /// The client closed or the connection broke (either direction).
    Gone,
    /// A page asked for by [`Action::ReadPage`], and the head when read.
    PageRead { page: Page, head: u64 },
    /// The store failed; the session ends with this refusal.
    StoreFailed(Refusal),
    /// The upload of the last [`Action::Apply`] is done: its results, or,
    /// when `failed`, one `materialize_error` per change.
    Applied {
        results: Vec<ChangeResult>,
        failed: bool,
    },
    /// The store refused the upload of the last [`Action::Apply`] as a
    /// whole (`bad_sequence`, `identity_conflict`): nothing of it was
    /// stored. Earlier answers go out, then this refusal; later uploads are
    /// never applied.
    Refused(Refusal),
    /// Another session of the same identity took over: this one applies no
    /// further upload and ends with an `error` frame `replaced` (after the
    /// upload being applied, if any, is answered).
    Replaced,
    /// A reload of `hub.toml` revoked or narrowed the session's token (or
    /// removed its dataset or a table): it applies no further upload and
    /// ends with this refusal (after the upload being applied, if any, is
    /// answered).
    Revoked(Refusal),
    /// The upload of the last [`Action::Apply`] was not applied because the
    /// session was replaced before the store took it.
    NotApplied,
    /// A fault point drops the answer of the batch just applied.
    Cut,
    /// A batch another session applied.
    Published(Arc<Published>),
    /// The live receiver missed batches.
    Lagged,
    /// The writer has written this many frames since the session started.
    Written { total: u64 },
    /// A deadline from [`Machine::deadline`] passed.
    Tick,
    /// The hub is shutting down.
    Shutdown,
}

/// What a session is doing; each state carries what it needs.
#[derive(Debug, PartialEq)]
enum State {
    /// Sending history from the store page by page; `caught_up` follows.
    CatchingUp { reading: bool },
    /// Following the dataset's live batches.
    Live,
    /// Fell behind the live stream (lag or gap): reading from the store until
    /// it has nothing newer, then live again.
    Resyncing { reading: bool },
    /// The client did not subscribe: it only uploads.
    UploadOnly,
    /// Ending once the upload being applied is answered.
    Draining(Ending),
    /// Done; every input is ignored.
    Closed,
}

/// Who the client is, fixed at `hello`.
#[derive(Clone, Debug)]
pub struct Params {
    pub client: Arc<str>,
    pub access: Access,
    pub echo_own: bool,
    /// Whether catch-up and live changes are sent at all.
    pub subscribe: bool,
    /// The tables declared in `hello`: only their changes are sent.
    pub tables: HashSet<String>,
    pub read_timeout: Duration,
}

/// Changes waiting to be cut into `changes` frames.
#[derive(Debug)]
enum Source {
    /// A page from the store, already filtered.
    Page(Vec<RemoteChange>),
    /// A live batch, filtered while it is cut.
    Live(Arc<Published>),
    /// A ready frame (`caught_up`).
    Frame(Vec<u8>),
}

#[derive(Debug)]
struct Outbox {
    source: Source,
    /// Next entry of the source to look at.
    pos: usize,
    /// Cursor once the last frame is sent.
    up_to: u64,
    head: u64,
    /// Send a last frame even when it holds no change, so the cursor moves.
    send_empty: bool,
}

/// One session's protocol state.
#[derive(Debug)]
pub struct Machine {
    params: Params,
    state: State,
    /// Every change up to here was queued for the client (or skipped).
    cursor: u64,
    /// Stream frames waiting for room (one page or one live batch at most).
    outbox: Option<Outbox>,
    /// Upload answers waiting for room, in order; `true` ends a batch.
    answers: VecDeque<(Vec<u8>, bool)>,
    /// Answers to head questions, not yet handed to the writer.
    heads: VecDeque<Vec<u8>>,
    /// Uploads waiting to be applied, in order.
    uploads: VecDeque<Upload>,
    /// Batch number of the upload being applied.
    applying: Option<u64>,
    /// Batches answered whose last part still waits in `answers`.
    answered_unsent: usize,
    /// Sizes of the frames queued for the writer and not written, oldest first.
    unwritten: VecDeque<usize>,
    unwritten_bytes: usize,
    sent_total: u64,
    written_total: u64,
    /// Last time the writer made progress or got work while idle.
    write_progress: Instant,
    /// Last frame received, or when reading resumed.
    read_from: Instant,
}

impl Machine {
    /// A session after a valid `hello`: queues `welcome` and starts catching
    /// up from `cursor` when the client subscribed.
    pub fn start(
        params: Params,
        welcome: Welcome,
        cursor: u64,
        now: Instant,
    ) -> (Machine, Vec<Action>) {
        let state = if params.subscribe {
            State::CatchingUp { reading: false }
        } else {
            State::UploadOnly
        };
        let mut m = Machine {
            params,
            state,
            cursor,
            outbox: Some(Outbox {
                source: Source::Frame(proto::encode(&HubFrame::Welcome(welcome))),
                pos: 0,
                up_to: cursor,
                head: cursor,
                send_empty: false,
            }),
            answers: VecDeque::new(),
            heads: VecDeque::new(),
            uploads: VecDeque::new(),
            applying: None,
            answered_unsent: 0,
            unwritten: VecDeque::new(),
            unwritten_bytes: 0,
            sent_total: 0,
            written_total: 0,
            write_progress: now,
            read_from: now,
        };
        let mut out = Vec::new();
        m.pump(now, &mut out);
        (m, out)
    }

    /// Every change up to here was queued for the client or skipped.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Whether uploads are applied (a read-only token's are refused).
    pub fn applies_uploads(&self) -> bool {
        self.params.access == Access::ReadWrite
    }

    /// Whether the driver should read the socket now.
    pub fn wants_inbound(&self) -> bool {
        !matches!(self.state, State::Draining(_) | State::Closed)
            && self.uploads.len() + usize::from(self.applying.is_some()) + self.answered_unsent
                < MAX_PENDING_BATCHES
            && self.heads.len() < MAX_PENDING_HEADS
    }

    /// Whether frames wait for the writer (the driver then watches whether
    /// their bytes move).
    pub fn writing(&self) -> bool {
        !self.unwritten.is_empty()
    }

    /// Whether the driver should take the next live batch now.
    pub fn wants_live(&self) -> bool {
        self.state == State::Live && self.outbox.is_none() && self.stream_room()
    }

    /// When to send [`Input::Tick`]: the read deadline, or the write
    /// deadline while frames wait for the client.
    pub fn deadline(&self) -> Option<Instant> {
        let t = self.params.read_timeout;
        let read = self.wants_inbound().then(|| self.read_from + t);
        let write = (!self.unwritten.is_empty()).then(|| self.write_progress + t);
        match (read, write) {
            (Some(r), Some(w)) => Some(r.min(w)),
            (r, w) => r.or(w),
        }
    }

    pub fn handle(&mut self, input: Input, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if self.state == State::Closed {
            return out;
        }
        let was_reading = self.wants_inbound();
        if matches!(self.state, State::Draining(_)) {
            // Only the answer of the upload being applied, and the writer,
            // still matter.
            match input {
                Input::Applied { .. }
                | Input::Refused(_)
                | Input::NotApplied
                | Input::Cut
                | Input::Gone
                | Input::Written { .. }
                | Input::Progress
                | Input::Tick => {}
                _ => return out,
            }
        }
        match input {
            Input::Frame(ClientFrame::Upload(up)) => {
                self.read_from = now;
                self.upload(up, &mut out);
            }
            Input::Frame(ClientFrame::Hello(_)) => {
                self.read_from = now;
                self.close(
                    Ending::Refuse(Refusal::new(ErrorCode::UnexpectedFrame, "hello sent twice")),
                    &mut out,
                );
            }
            Input::Heard => self.read_from = now,
            Input::HeadAsked { id, head } => {
                self.read_from = now;
                // Small, and ahead of the stream.
                let frame = proto::encode(&HubFrame::Head(Head { id, head }));
                self.heads.push_back(frame);
            }
            Input::Frame(ClientFrame::Head(h)) => {
                // The driver turns this into `HeadAsked`; answer what is known.
                self.read_from = now;
                let frame = proto::encode(&HubFrame::Head(Head {
                    id: h.id,
                    head: self.cursor,
                }));
                self.heads.push_back(frame);
            }
            Input::Progress => self.write_progress = now,
            Input::Bad(r) => self.close(Ending::Refuse(r), &mut out),
            Input::Gone => self.close_now(Ending::Gone, &mut out),
            Input::StoreFailed(r) => self.close(Ending::Refuse(r), &mut out),
            Input::PageRead { page, head } => self.page_read(page, head),
            Input::Applied { results, failed } => self.applied(results, failed, &mut out),
            Input::Refused(r) => {
                // Nothing of the batch was stored: no answer, and none of
                // the uploads behind it may be applied.
                self.applying = None;
                self.uploads.clear();
                self.close_now(Ending::Refuse(r), &mut out);
            }
            Input::Replaced => {
                let r = self.replaced();
                self.close(Ending::Refuse(r), &mut out);
            }
            Input::Revoked(r) => self.close(Ending::Refuse(r), &mut out),
            Input::NotApplied => {
                self.applying = None;
                self.uploads.clear();
                let ending = match &self.state {
                    State::Draining(ending) => ending.clone(),
                    _ => Ending::Refuse(self.replaced()),
                };
                self.close_now(ending, &mut out);
            }
            Input::Cut => {
                self.applying = None;
                self.uploads.clear();
                self.close_now(Ending::Cut, &mut out);
            }
            Input::Published(p) => self.published(p),
            Input::Lagged => {
                if self.state == State::Live {
                    self.state = State::Resyncing { reading: false };
                }
            }
            Input::Written { total } => self.written(total, now),
            Input::Tick => self.tick(now, &mut out),
            Input::Shutdown => self.close(
                Ending::Refuse(Refusal::new(
                    ErrorCode::ShuttingDown,
                    "hub is shutting down; reconnect later",
                )),
                &mut out,
            ),
        }
        if self.state != State::Closed {
            if !was_reading && self.wants_inbound() {
                self.read_from = now;
            }
            self.pump(now, &mut out);
        }
        out
    }

    /// The refusal that ends a session another one took over from.
    fn replaced(&self) -> Refusal {
        Refusal::new(
            ErrorCode::Replaced,
            format!(
                "another connection of client {:?} took over this identity and this one is closed; a device reconnecting replaces its own stale connection, and if two devices run copies of one database file, each takes its own identity on its next upload",
                self.params.client
            ),
        )
    }

    fn upload(&mut self, up: Upload, out: &mut Vec<Action>) {
        if self.params.access == Access::ReadOnly {
            let refusal = HubFrame::Error(ErrorFrame {
                code: ErrorCode::Forbidden,
                message: "token is read_only: uploads are refused; use a read_write token to send local changes".into(),
            });
            self.answers.push_back((proto::encode(&refusal), true));
            self.answered_unsent += 1;
            return;
        }
        self.uploads.push_back(up);
        self.next_apply(out);
    }

    fn next_apply(&mut self, out: &mut Vec<Action>) {
        if self.applying.is_none() {
            if let Some(up) = self.uploads.pop_front() {
                self.applying = Some(up.batch);
                out.push(Action::Apply(up));
            }
        }
    }

    fn applied(&mut self, results: Vec<ChangeResult>, failed: bool, out: &mut Vec<Action>) {
        let Some(batch) = self.applying.take() else {
            return;
        };
        let parts = split_answer(batch, results);
        let n = parts.len();
        for (i, part) in parts.into_iter().enumerate() {
            self.answers
                .push_back((proto::encode(&HubFrame::UploadResult(part)), i + 1 == n));
        }
        self.answered_unsent += 1;
        if failed {
            // Later batches may already be queued; none may be applied past
            // the failed one.
            self.uploads.clear();
            self.close_now(
                Ending::Refuse(Refusal::new(
                    ErrorCode::Internal,
                    "could not store a batch; reconnect and resend",
                )),
                out,
            );
        } else if let State::Draining(ending) = &self.state {
            let ending = ending.clone();
            self.close_now(ending, out);
        } else {
            self.next_apply(out);
        }
    }

    /// Ends the session, after the upload being applied is answered.
    fn close(&mut self, ending: Ending, out: &mut Vec<Action>) {
        if matches!(self.state, State::Draining(_)) {
            return;
        }
        self.uploads.clear();
        if self.applying.is_some() {
            self.state = State::Draining(ending);
        } else {
            self.close_now(ending, out);
        }
    }

    fn close_now(&mut self, ending: Ending, out: &mut Vec<Action>) {
        let flush = match ending {
            Ending::Refuse(_) | Ending::Cut => self.answers.drain(..).map(|(f, _)| f).collect(),
            _ => Vec::new(),
        };
        self.state = State::Closed;
        out.push(Action::Close { flush, ending });
    }

    fn page_read(&mut self, mut page: Page, head: u64) {
        let (State::CatchingUp { reading } | State::Resyncing { reading }) = &mut self.state else {
            return;
        };
        *reading = false;
        if page.up_to <= self.cursor {
            // The store has nothing newer: caught up.
            if matches!(self.state, State::CatchingUp { .. }) {
                let frame = HubFrame::CaughtUp(CaughtUp { head: self.cursor });
                self.outbox = Some(Outbox {
                    source: Source::Frame(proto::encode(&frame)),
                    pos: 0,
                    up_to: self.cursor,
                    head,
                    send_empty: false,
                });
            }
            self.state = State::Live;
            return;
        }
        let tables = &self.params.tables;
        page.changes.retain(|c| tables.contains(&c.table));
        self.outbox = Some(Outbox {
            source: Source::Page(page.changes),
            pos: 0,
            up_to: page.up_to,
            head,
            send_empty: page.up_to >= head,
        });
        self.cursor = page.up_to;
    }

    fn published(&mut self, p: Arc<Published>) {
        if self.state != State::Live || p.last <= self.cursor {
            return;
        }
        if p.after != self.cursor {
            self.state = State::Resyncing { reading: false };
            return;
        }
        // Own changes and other tables' changes are skipped, but the cursor
        // moves past them: a batch of nothing else ends with an empty frame,
        // so that the uploading device's cursor and head follow its own
        // uploads (its status then shows where the hub really is).
        let skipped = p.entries.iter().any(|e| {
            (!self.params.echo_own && *e.client == *self.params.client)
                || !self.params.tables.contains(&e.change.table)
        });
        self.cursor = p.last;
        self.outbox = Some(Outbox {
            up_to: p.last,
            head: p.last,
            pos: 0,
            send_empty: skipped,
            source: Source::Live(p),
        });
    }

    fn written(&mut self, total: u64, now: Instant) {
        while self.written_total < total {
            self.written_total += 1;
            if let Some(n) = self.unwritten.pop_front() {
                self.unwritten_bytes -= n;
            }
            self.write_progress = now;
        }
    }

    fn tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        let t = self.params.read_timeout;
        if !self.unwritten.is_empty() && now >= self.write_progress + t {
            let ending = Ending::Stalled {
                waiting: self.unwritten.len(),
                took: now - self.write_progress,
            };
            self.close_now(ending, out);
        } else if self.wants_inbound() && now >= self.read_from + t {
            self.close_now(Ending::Silent(t), out);
        }
    }

    fn stream_room(&self) -> bool {
        self.unwritten.len() < WRITE_QUEUE_FRAMES && self.unwritten_bytes < MAX_PAGE_BYTES
    }

    fn send(&mut self, frame: Vec<u8>, now: Instant, out: &mut Vec<Action>) {
        if self.unwritten.is_empty() {
            self.write_progress = now;
        }
        self.unwritten.push_back(frame.len());
        self.unwritten_bytes += frame.len();
        self.sent_total += 1;
        out.push(Action::Send(frame));
    }

    /// Queues what there is room for: upload answers first, then stream
    /// frames; then asks for the next page when catching up.
    fn pump(&mut self, now: Instant, out: &mut Vec<Action>) {
        if matches!(self.state, State::Closed) {
            return;
        }
        loop {
            if self.unwritten.len() < WRITE_QUEUE_FRAMES {
                if let Some((frame, last)) = self.answers.pop_front() {
                    if last {
                        self.answered_unsent -= 1;
                    }
                    self.send(frame, now, out);
                    continue;
                }
                if let Some(frame) = self.heads.pop_front() {
                    self.send(frame, now, out);
                    continue;
                }
            }
            if self.stream_room() {
                if let Some(ob) = &mut self.outbox {
                    let (frame, done, fanned) = next_frame(ob, &self.params);
                    if done {
                        self.outbox = None;
                    }
                    if let Some(stored) = fanned {
                        out.push(Action::FannedOut(stored));
                    }
                    if let Some(f) = frame {
                        self.send(f, now, out);
                    }
                    continue;
                }
            }
            break;
        }
        if self.outbox.is_none() && self.stream_room() {
            if let State::CatchingUp { reading } | State::Resyncing { reading } = &mut self.state {
                if !*reading {
                    *reading = true;
                    out.push(Action::ReadPage { after: self.cursor });
                }
            }
        }
    }
}

/// Cuts the next `changes` frame from an outbox: at most
/// [`MAX_PAGE_CHANGES`] changes and about [`MAX_PAGE_BYTES`] (at least one
/// change). Returns the frame (none when nothing is left to say), whether the
/// outbox is done, and for the last frame of a live batch with changes, when
/// the batch was stored.
fn next_frame(ob: &mut Outbox, params: &Params) -> (Option<Vec<u8>>, bool, Option<Instant>) {
    let mut chunk: Vec<&RemoteChange> = Vec::new();
    let mut bytes = 0;
    let (len, stored) = match &ob.source {
        Source::Frame(f) => return (Some(f.clone()), true, None),
        Source::Page(changes) => {
            for c in &changes[ob.pos..] {
                if chunk.len() == MAX_PAGE_CHANGES || (bytes >= MAX_PAGE_BYTES && !chunk.is_empty())
                {
                    break;
                }
                bytes += c.wire_size();
                chunk.push(c);
                ob.pos += 1;
            }
            (changes.len(), None)
        }
        Source::Live(p) => {
            for e in &p.entries[ob.pos..] {
                if chunk.len() == MAX_PAGE_CHANGES || (bytes >= MAX_PAGE_BYTES && !chunk.is_empty())
                {
                    break;
                }
                ob.pos += 1;
                let own = !params.echo_own && *e.client == *params.client;
                if own || !params.tables.contains(&e.change.table) {
                    continue;
                }
                bytes += e.change.wire_size();
                chunk.push(&e.change);
            }
            (p.entries.len(), Some(p.stored))
        }
    };
    let done = ob.pos >= len;
    let up_to = match (done, chunk.last()) {
        (false, Some(c)) => c.version,
        _ => ob.up_to,
    };
    if chunk.is_empty() && !(done && ob.send_empty) {
        return (None, done, None);
    }
    let frame = proto::encode(&ChangesRef::Changes {
        changes: &chunk,
        up_to,
        head: ob.head,
    });
    // The fan-out latency is observed once per batch that had changes.
    let fanned = (done && !chunk.is_empty()).then_some(()).and(stored);
    (Some(frame), done, fanned)
}

/// Approximate encoded size of one result (conflicts carry the hub's row).
fn result_size(r: &ChangeResult) -> usize {
    24 + match &r.outcome {
        Outcome::Applied { .. } => 16,
        Outcome::Conflict { server } => {
            48 + server.values.iter().map(Value::wire_size).sum::<usize>()
        }
        Outcome::Invalid { message, .. } => 40 + message.len(),
        Outcome::MaterializeError { message } => 32 + message.len(),
    }
}

/// Splits a batch's answer into parts of at most [`MAX_PAGE_CHANGES`]
/// results and about [`MAX_PAGE_BYTES`] (at least one result each); `more`
/// is set on every part but the last, and each summary counts its own part.
pub fn split_answer(batch: u64, results: Vec<ChangeResult>) -> Vec<UploadResult> {
    let mut parts = Vec::new();
    let mut part: Vec<ChangeResult> = Vec::new();
    let mut bytes = 0;
    for r in results {
        if !part.is_empty() && (part.len() == MAX_PAGE_CHANGES || bytes >= MAX_PAGE_BYTES) {
            parts.push(std::mem::take(&mut part));
            bytes = 0;
        }
        bytes += result_size(&r);
        part.push(r);
    }
    parts.push(part);
    let n = parts.len();
    parts
        .into_iter()
        .enumerate()
        .map(|(i, results)| UploadResult {
            batch,
            summary: UploadSummary::of(&results),
            results,
            more: i + 1 < n,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::store::LogEntry;
    use crate::proto::{Changes, Op, ServerRow};

    const T: Duration = Duration::from_secs(10);

    fn params(tables: &[&str]) -> Params {
        Params {
            client: Arc::from("me"),
            access: Access::ReadWrite,
            echo_own: false,
            subscribe: true,
            tables: tables.iter().map(|t| t.to_string()).collect(),
            read_timeout: T,
        }
    }

    fn welcome() -> Welcome {
        Welcome {
            protocol: 1,
            head: 0,
            access: Access::ReadWrite,
            client_seq: 0,
            features: vec![],
        }
    }

    fn rc(version: u64, table: &str, bytes: usize) -> RemoteChange {
        RemoteChange {
            version,
            table: table.into(),
            op: Op::Upsert,
            pk: vec![Value::Integer(version as i64)],
            values: vec![Value::Integer(version as i64), Value::Blob(vec![0; bytes])],
        }
    }

    fn published(after: u64, entries: &[(&str, &str)], bytes: usize) -> Input {
        let entries: Vec<LogEntry> = entries
            .iter()
            .enumerate()
            .map(|(i, (table, client))| LogEntry {
                change: rc(after + 1 + i as u64, table, bytes),
                client: Arc::from(*client),
            })
            .collect();
        Input::Published(Arc::new(Published {
            after,
            last: after + entries.len() as u64,
            entries,
            stored: Instant::now(),
            breaking: Vec::new(),
        }))
    }

    fn page(changes: Vec<RemoteChange>, up_to: u64, head: u64) -> Input {
        Input::PageRead {
            page: Page { changes, up_to },
            head,
        }
    }

    fn upload(batch: u64) -> Input {
        Input::Frame(ClientFrame::Upload(Upload {
            batch,
            acked: 0,
            changes: Vec::new(),
        }))
    }

    fn applied(n: u64) -> Input {
        Input::Applied {
            results: (1..=n)
                .map(|seq| ChangeResult {
                    seq,
                    outcome: Outcome::Applied { version: seq },
                })
                .collect(),
            failed: false,
        }
    }

    /// The frames of the `Send` actions, decoded.
    fn sent(actions: &[Action]) -> Vec<HubFrame> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(f) => Some(proto::decode(f).unwrap()),
                _ => None,
            })
            .collect()
    }

    fn changes(f: &HubFrame) -> (Vec<u64>, u64) {
        match f {
            HubFrame::Changes(Changes { changes, up_to, .. }) => {
                (changes.iter().map(|c| c.version).collect(), *up_to)
            }
            other => panic!("expected changes, got {other:?}"),
        }
    }

    /// A live session at `cursor` with everything written.
    fn live(p: Params, cursor: u64, now: Instant) -> Machine {
        let (mut m, _) = Machine::start(p, welcome(), cursor, now);
        m.handle(page(vec![], cursor, cursor), now);
        let total = m.sent_total;
        m.handle(Input::Written { total }, now);
        assert_eq!(m.state, State::Live);
        m
    }

    fn write_all(m: &mut Machine, now: Instant) -> Vec<Action> {
        let total = m.sent_total;
        m.handle(Input::Written { total }, now)
    }

    #[test]
    fn catch_up_pages_until_the_store_has_nothing_newer_then_caught_up() {
        let now = Instant::now();
        let (mut m, a) = Machine::start(params(&["a"]), welcome(), 0, now);
        assert!(matches!(sent(&a)[..], [HubFrame::Welcome(_)]));
        assert_eq!(a.last(), Some(&Action::ReadPage { after: 0 }));
        // Nothing is taken from the live stream while catching up.
        assert!(!m.wants_live());
        let a = m.handle(page(vec![rc(1, "a", 1), rc(2, "a", 1)], 2, 3), now);
        assert_eq!(changes(&sent(&a)[0]), (vec![1, 2], 2));
        assert_eq!(a.last(), Some(&Action::ReadPage { after: 2 }));
        let a = m.handle(page(vec![rc(3, "a", 1)], 3, 3), now);
        assert_eq!(changes(&sent(&a)[0]), (vec![3], 3));
        let a = m.handle(page(vec![], 3, 3), now);
        assert_eq!(sent(&a), vec![HubFrame::CaughtUp(CaughtUp { head: 3 })]);
        assert_eq!(m.state, State::Live);
        // Four frames wait for the writer: no live batch until it takes them.
        assert!(!m.wants_live());
        write_all(&mut m, now);
        assert!(m.wants_live());
    }

    #[test]
    fn a_session_that_did_not_subscribe_only_uploads() {
        let now = Instant::now();
        let mut p = params(&["a"]);
        p.subscribe = false;
        let (m, a) = Machine::start(p, welcome(), 0, now);
        assert_eq!(a.len(), 1);
        assert!(!m.wants_live() && m.wants_inbound());
    }

    #[test]
    fn live_batches_follow_the_cursor_and_a_gap_or_lag_reads_the_store() {
        let now = Instant::now();
        let mut m = live(params(&["a"]), 3, now);
        // Already sent: ignored.
        assert!(m
            .handle(published(1, &[("a", "x"), ("a", "x")], 1), now)
            .is_empty());
        let a = m.handle(published(3, &[("a", "x")], 1), now);
        assert_eq!(changes(&sent(&a)[0]), (vec![4], 4));
        assert!(a.iter().any(|a| matches!(a, Action::FannedOut(_))));
        // A gap: read from the store.
        let a = m.handle(published(6, &[("a", "x")], 1), now);
        assert_eq!(a, vec![Action::ReadPage { after: 4 }]);
        assert!(!m.wants_live());
        let a = m.handle(page(vec![rc(5, "a", 1)], 5, 7), now);
        assert_eq!(changes(&sent(&a)[0]), (vec![5], 5));
        m.handle(page(vec![], 5, 7), now);
        assert_eq!(m.state, State::Live);
        // A lag: the same.
        let a = m.handle(Input::Lagged, now);
        assert_eq!(a, vec![Action::ReadPage { after: 5 }]);
    }

    #[test]
    fn own_changes_are_skipped_unless_echo_own() {
        let now = Instant::now();
        let mut m = live(params(&["a"]), 0, now);
        let a = m.handle(published(0, &[("a", "me"), ("a", "x")], 1), now);
        assert_eq!(changes(&sent(&a)[0]), (vec![2], 2));
        // A batch of own changes only: an empty frame moves the client's
        // cursor to the head.
        let a = m.handle(published(2, &[("a", "me")], 1), now);
        assert_eq!(changes(&sent(&a)[0]), (vec![], 3));
        assert_eq!(m.cursor(), 3);
        let mut p = params(&["a"]);
        p.echo_own = true;
        let mut m = live(p, 0, now);
        let a = m.handle(published(0, &[("a", "me")], 1), now);
        assert_eq!(changes(&sent(&a)[0]), (vec![1], 1));
    }

    #[test]
    fn only_subscribed_tables_are_sent_and_the_cursor_moves_past_the_others() {
        let now = Instant::now();
        let (mut m, _) = Machine::start(params(&["a"]), welcome(), 0, now);
        let a = m.handle(
            page(vec![rc(1, "b", 1), rc(2, "a", 1), rc(3, "b", 1)], 3, 5),
            now,
        );
        assert_eq!(changes(&sent(&a)[0]), (vec![2], 3));
        // A page of other tables only: nothing to send before the head ...
        let a = m.handle(page(vec![rc(4, "b", 1)], 4, 5), now);
        assert!(sent(&a).is_empty());
        // ... and an empty frame at the head, so the cursor reaches it.
        let a = m.handle(page(vec![rc(5, "b", 1)], 5, 5), now);
        assert_eq!(changes(&sent(&a)[0]), (vec![], 5));
        m.handle(page(vec![], 5, 5), now);
        write_all(&mut m, now);
        // Live: a batch of other tables moves the cursor with an empty frame.
        let a = m.handle(published(5, &[("b", "x"), ("b", "x")], 1), now);
        assert_eq!(changes(&sent(&a)[0]), (vec![], 7));
        let a = m.handle(published(7, &[("b", "x"), ("a", "x")], 1), now);
        assert_eq!(changes(&sent(&a)[0]), (vec![9], 9));
    }

    #[test]
    fn uploads_are_applied_one_at_a_time_and_answered_in_order() {
        let now = Instant::now();
        let mut m = live(params(&["a"]), 0, now);
        let a = m.handle(upload(1), now);
        assert!(matches!(&a[..], [Action::Apply(u)] if u.batch == 1));
        assert!(m.handle(upload(2), now).is_empty());
        let a = m.handle(applied(2), now);
        let HubFrame::UploadResult(r) = &sent(&a)[0] else {
            panic!("{a:?}")
        };
        assert_eq!((r.batch, r.summary.applied, r.more), (1, 2, false));
        assert!(a
            .iter()
            .any(|a| matches!(a, Action::Apply(u) if u.batch == 2)));
        let a = m.handle(applied(1), now);
        assert!(matches!(&sent(&a)[..], [HubFrame::UploadResult(r)] if r.batch == 2));
    }

    #[test]
    fn a_read_only_upload_is_answered_forbidden_and_not_applied() {
        let now = Instant::now();
        let mut p = params(&["a"]);
        p.access = Access::ReadOnly;
        let mut m = live(p, 0, now);
        let a = m.handle(upload(1), now);
        assert!(matches!(&sent(&a)[..], [HubFrame::Error(e)] if e.code == ErrorCode::Forbidden));
        assert!(!a.iter().any(|a| matches!(a, Action::Apply(_))));
    }

    #[test]
    fn answers_are_split_by_bytes_with_more_on_all_parts_but_the_last() {
        let conflict = |seq| ChangeResult {
            seq,
            outcome: Outcome::Conflict {
                server: ServerRow {
                    version: 1,
                    deleted: false,
                    values: vec![Value::Text("x".repeat(5000))],
                },
            },
        };
        let parts = split_answer(9, (1..=4000).map(conflict).collect());
        assert!(parts.len() >= 4, "{}", parts.len());
        let mut seqs = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(p.more, i + 1 < parts.len());
            assert_eq!(p.summary.total as usize, p.results.len());
            assert_eq!(p.summary.conflict as usize, p.results.len());
            let size = proto::encode(&HubFrame::UploadResult(p.clone())).len();
            assert!(size <= MAX_PAGE_BYTES + 6000, "{size}");
            seqs.extend(p.results.iter().map(|r| r.seq));
        }
        assert_eq!(seqs, (1..=4000).collect::<Vec<_>>());
        // Small answers stay whole; an empty batch still gets an answer.
        assert_eq!(split_answer(1, Vec::new()).len(), 1);
    }

    #[test]
    fn a_full_writer_stops_pages_and_live_but_not_reading_and_answers_queue() {
        let now = Instant::now();
        let (mut m, _) = Machine::start(params(&["a"]), welcome(), 0, now);
        // Four frames unwritten: the queue is full.
        for v in 1..=3 {
            let a = m.handle(page(vec![rc(v, "a", 1)], v, 9), now);
            assert_eq!(sent(&a).len(), 1);
        }
        let a = m.handle(page(vec![rc(4, "a", 1)], 4, 9), now);
        assert!(sent(&a).is_empty(), "queued, not sent: {a:?}");
        assert!(!a.iter().any(|a| matches!(a, Action::ReadPage { .. })));
        // Uploads are still read, applied and their answers queued in order.
        assert!(m.wants_inbound());
        m.handle(upload(1), now);
        assert!(sent(&m.handle(applied(1), now)).is_empty());
        m.handle(upload(2), now);
        m.handle(applied(1), now);
        // Room: answers first (in order), then the page, then the next read.
        let a = m.handle(Input::Written { total: 4 }, now);
        let f = sent(&a);
        assert!(matches!(&f[0], HubFrame::UploadResult(r) if r.batch == 1));
        assert!(matches!(&f[1], HubFrame::UploadResult(r) if r.batch == 2));
        assert_eq!(changes(&f[2]), (vec![4], 4));
        assert_eq!(a.last(), Some(&Action::ReadPage { after: 4 }));
    }

    #[test]
    fn a_live_batch_is_cut_by_bytes_one_frame_per_room() {
        let now = Instant::now();
        let mut m = live(params(&["a"]), 0, now);
        let big = MAX_PAGE_BYTES / 2 + 1;
        let a = m.handle(published(0, &[("a", "x"); 6], big), now);
        // Two changes make a page; the queue's bytes stop the second frame.
        let f = sent(&a);
        assert_eq!(f.len(), 1);
        assert_eq!(changes(&f[0]), (vec![1, 2], 2));
        assert!(!m.wants_live());
        let a = write_all(&mut m, now);
        assert_eq!(changes(&sent(&a)[0]), (vec![3, 4], 4));
        let a = write_all(&mut m, now);
        assert_eq!(changes(&sent(&a)[0]), (vec![5, 6], 6));
        assert!(a.iter().any(|a| matches!(a, Action::FannedOut(_))));
        write_all(&mut m, now);
        assert!(m.wants_live());
    }

    #[test]
    fn a_client_with_too_many_unanswered_uploads_is_not_read() {
        let now = Instant::now();
        let mut m = live(params(&["a"]), 0, now);
        for b in 0..MAX_PENDING_BATCHES as u64 {
            assert!(m.wants_inbound());
            m.handle(upload(b), now);
        }
        assert!(!m.wants_inbound());
        m.handle(applied(1), now);
        assert!(m.wants_inbound());
    }

    #[test]
    fn silence_for_the_read_timeout_closes() {
        let now = Instant::now();
        let mut m = live(params(&["a"]), 0, now);
        assert_eq!(m.deadline(), Some(now + T));
        assert!(m.handle(Input::Tick, now + T / 2).is_empty());
        m.handle(Input::Heard, now + T / 2);
        assert!(m.handle(Input::Tick, now + T).is_empty());
        let a = m.handle(Input::Tick, now + T / 2 + T);
        assert_eq!(
            a,
            vec![Action::Close {
                flush: vec![],
                ending: Ending::Silent(T)
            }]
        );
        assert!(m.handle(upload(1), now + 2 * T).is_empty(), "closed");
    }

    #[test]
    fn a_client_that_takes_nothing_for_the_read_timeout_is_dropped() {
        let now = Instant::now();
        let mut m = live(params(&["a"]), 0, now);
        m.handle(published(0, &[("a", "x")], 1), now);
        // It keeps sending (pings), but takes nothing.
        m.handle(Input::Heard, now + T / 2);
        m.handle(Input::Heard, now + T - Duration::from_millis(1));
        assert_eq!(m.deadline(), Some(now + T));
        let a = m.handle(Input::Tick, now + T);
        assert!(matches!(
            &a[..],
            [Action::Close {
                ending: Ending::Stalled { waiting: 1, .. },
                ..
            }]
        ));
        // A writer that makes progress is not stalled.
        let mut m = live(params(&["a"]), 0, now);
        m.handle(published(0, &[("a", "x")], 1), now);
        m.handle(published(1, &[("a", "x")], 1), now);
        m.handle(
            Input::Written {
                total: m.written_total + 1,
            },
            now + T / 2,
        );
        m.handle(Input::Heard, now + T);
        assert!(m.handle(Input::Tick, now + T).is_empty());
    }

    #[test]
    fn a_slow_client_whose_bytes_move_is_never_taken_for_a_stalled_one() {
        // One frame takes three read timeouts to write on a slow link, but
        // its bytes keep moving.
        let now = Instant::now();
        let mut m = live(params(&["a"]), 0, now);
        m.handle(published(0, &[("a", "x")], 1), now);
        assert!(m.writing());
        for i in 1..=6 {
            let t = now + T / 2 * i;
            m.handle(Input::Progress, t);
            m.handle(Input::Heard, t);
            assert!(m.handle(Input::Tick, t).is_empty(), "dropped at step {i}");
        }
        // Then nothing moves for a read timeout: dropped.
        let a = m.handle(Input::Tick, now + T / 2 * 6 + T);
        assert!(matches!(
            &a[..],
            [Action::Close {
                ending: Ending::Stalled { .. },
                ..
            }]
        ));
    }

    #[test]
    fn shutdown_answers_the_upload_being_applied_then_refuses() {
        let now = Instant::now();
        let mut m = live(params(&["a"]), 0, now);
        assert_eq!(
            m.handle(Input::Shutdown, now),
            vec![Action::Close {
                flush: vec![],
                ending: Ending::Refuse(Refusal::new(
                    ErrorCode::ShuttingDown,
                    "hub is shutting down; reconnect later"
                )),
            }]
        );
        let mut m = live(params(&["a"]), 0, now);
        m.handle(upload(1), now);
        m.handle(upload(2), now);
        assert!(m.handle(Input::Shutdown, now).is_empty());
        assert!(!m.wants_inbound());
        let a = m.handle(applied(1), now);
        let [Action::Close { flush, ending }] = &a[..] else {
            panic!("{a:?}")
        };
        assert_eq!(flush.len(), 1, "the answer of batch 1; batch 2 is dropped");
        assert!(matches!(ending, Ending::Refuse(r) if r.code == ErrorCode::ShuttingDown));
    }

    #[test]
    fn a_failed_apply_is_answered_then_the_session_ends() {
        let now = Instant::now();
        let mut m = live(params(&["a"]), 0, now);
        m.handle(upload(1), now);
        m.handle(upload(2), now);
        let results = vec![ChangeResult {
            seq: 1,
            outcome: Outcome::MaterializeError {
                message: "disk full".into(),
            },
        }];
        let a = m.handle(
            Input::Applied {
                results,
                failed: true,
            },
            now,
        );
        let [Action::Close { flush, ending }] = &a[..] else {
            panic!("{a:?}")
        };
        assert_eq!(flush.len(), 1);
        assert!(matches!(ending, Ending::Refuse(r) if r.code == ErrorCode::Internal));
    }

    /// The frames of a `Close`'s flush, decoded, and its ending.
    fn closed(a: &[Action]) -> (Vec<HubFrame>, Ending) {
        let [Action::Close { flush, ending }] = a else {
            panic!("expected a close, got {a:?}")
        };
        let frames = flush.iter().map(|f| proto::decode(f).unwrap()).collect();
        (frames, ending.clone())
    }

    fn batch_of(f: &HubFrame) -> u64 {
        match f {
            HubFrame::UploadResult(r) => r.batch,
            other => panic!("expected an upload answer, got {other:?}"),
        }
    }

    #[test]
    fn a_refused_batch_ends_the_session_after_the_earlier_answers_and_nothing_later_is_applied() {
        let now = Instant::now();
        let mut m = live(params(&["a"]), 0, now);
        // Fill the writer so that answers wait in the machine.
        for v in 0..WRITE_QUEUE_FRAMES as u64 {
            m.handle(published(v, &[("a", "x")], 1), now);
        }
        assert_eq!(m.unwritten.len(), WRITE_QUEUE_FRAMES);
        for b in 1..=3 {
            m.handle(upload(b), now);
        }
        assert!(sent(&m.handle(applied(1), now)).is_empty());
        let refusal = Refusal::new(ErrorCode::IdentityConflict, "client seq 2 of client \"me\"");
        let a = m.handle(Input::Refused(refusal.clone()), now);
        assert!(!a.iter().any(|a| matches!(a, Action::Apply(_))), "{a:?}");
        let (flush, ending) = closed(&a);
        // Batch 1's answer, then the refusal; batch 2 unanswered, 3 dropped.
        assert_eq!(flush.iter().map(batch_of).collect::<Vec<_>>(), vec![1]);
        assert_eq!(ending, Ending::Refuse(refusal));
        assert!(m.handle(upload(4), now).is_empty(), "closed");
        // The same while draining for shutdown: the refusal is what ends it.
        let mut m = live(params(&["a"]), 0, now);
        m.handle(upload(1), now);
        m.handle(Input::Shutdown, now);
        let bad = Refusal::new(ErrorCode::BadSequence, "client seq 0");
        let (flush, ending) = closed(&m.handle(Input::Refused(bad.clone()), now));
        assert!(flush.is_empty());
        assert_eq!(ending, Ending::Refuse(bad));
    }

    #[test]
    fn a_replaced_session_answers_the_batch_being_applied_then_ends_and_applies_no_more() {
        let now = Instant::now();
        // Idle: ends at once.
        let mut m = live(params(&["a"]), 0, now);
        let (flush, ending) = closed(&m.handle(Input::Replaced, now));
        assert!(flush.is_empty());
        let Ending::Refuse(r) = ending else {
            panic!("{ending:?}")
        };
        assert_eq!(r.code, ErrorCode::Replaced);
        assert!(
            r.message.contains("client \"me\" took over"),
            "{}",
            r.message
        );
        // Applying batch 1 with batch 2 queued: 1 is answered, 2 never applied.
        let mut m = live(params(&["a"]), 0, now);
        m.handle(upload(1), now);
        m.handle(upload(2), now);
        assert!(m.handle(Input::Replaced, now).is_empty());
        assert!(!m.wants_inbound());
        assert!(
            m.handle(upload(3), now).is_empty(),
            "nothing read or applied"
        );
        let a = m.handle(applied(1), now);
        assert!(!a.iter().any(|a| matches!(a, Action::Apply(_))), "{a:?}");
        let (flush, ending) = closed(&a);
        assert_eq!(flush.iter().map(batch_of).collect::<Vec<_>>(), vec![1]);
        assert!(matches!(ending, Ending::Refuse(r) if r.code == ErrorCode::Replaced));
        // The store saw the replacement first: batch 1 not applied, no answer.
        for told_first in [false, true] {
            let mut m = live(params(&["a"]), 0, now);
            m.handle(upload(1), now);
            m.handle(upload(2), now);
            if told_first {
                assert!(m.handle(Input::Replaced, now).is_empty());
            }
            let a = m.handle(Input::NotApplied, now);
            assert!(!a.iter().any(|a| matches!(a, Action::Apply(_))), "{a:?}");
            let (flush, ending) = closed(&a);
            assert!(flush.is_empty());
            assert!(matches!(ending, Ending::Refuse(r) if r.code == ErrorCode::Replaced));
        }
    }

    #[test]
    fn a_revoked_session_answers_the_batch_being_applied_then_ends_with_the_reason() {
        let now = Instant::now();
        let revoked = || Input::Revoked(Refusal::new(ErrorCode::Unauthorized, "token revoked"));
        // Idle: ends at once with the reason.
        let mut m = live(params(&["a"]), 0, now);
        let (flush, ending) = closed(&m.handle(revoked(), now));
        assert!(flush.is_empty());
        assert_eq!(
            ending,
            Ending::Refuse(Refusal::new(ErrorCode::Unauthorized, "token revoked"))
        );
        // Applying batch 1 with batch 2 queued: 1 is answered, 2 never applied.
        let mut m = live(params(&["a"]), 0, now);
        m.handle(upload(1), now);
        m.handle(upload(2), now);
        assert!(m.handle(revoked(), now).is_empty());
        assert!(!m.wants_inbound());
        let a = m.handle(applied(1), now);
        assert!(!a.iter().any(|a| matches!(a, Action::Apply(_))), "{a:?}");
        let (flush, ending) = closed(&a);
        assert_eq!(flush.iter().map(batch_of).collect::<Vec<_>>(), vec![1]);
        assert!(matches!(ending, Ending::Refuse(r) if r.code == ErrorCode::Unauthorized));
    }

    #[test]
    fn bad_frames_and_a_second_hello_refuse_and_a_gone_client_just_ends() {
        let now = Instant::now();
        let mut m = live(params(&["a"]), 0, now);
        let hello = crate::proto::Hello {
            client_key: String::new(),
            protocol: 1,
            client_id: "me".into(),
            dataset: "d".into(),
            cursor: 0,
            tables: vec![],
            echo_own: false,
            subscribe: true,
            anchor: None,
        };
        let a = m.handle(Input::Frame(ClientFrame::Hello(hello)), now);
        assert!(
            matches!(&a[..], [Action::Close { ending: Ending::Refuse(r), .. }] if r.code == ErrorCode::UnexpectedFrame)
        );
        let mut m = live(params(&["a"]), 0, now);
        let a = m.handle(Input::Gone, now);
        assert_eq!(
            a,
            vec![Action::Close {
                flush: vec![],
                ending: Ending::Gone
            }]
        );
    }

    #[test]
    fn head_questions_are_answered_and_cannot_pile_up() {
        let now = Instant::now();
        let mut m = live(params(&["a"]), 0, now);
        let a = m.handle(Input::HeadAsked { id: 1, head: 42 }, now);
        let frames = sent(&a);
        let [f] = &frames[..] else { panic!("{a:?}") };
        assert_eq!(*f, HubFrame::Head(Head { id: 1, head: 42 }));
        // A client that asks and reads nothing: the writer fills, answers
        // wait, and past a few the session stops reading.
        let mut m = live(params(&["a"]), 0, now);
        for id in 0..(WRITE_QUEUE_FRAMES + MAX_PENDING_HEADS) as u64 {
            assert!(m.wants_inbound(), "stopped reading after {id}");
            m.handle(Input::HeadAsked { id, head: 1 }, now);
        }
        assert!(!m.wants_inbound());
    }
}
