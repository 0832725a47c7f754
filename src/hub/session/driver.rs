//! Performs a session's [`Machine`](super::machine::Machine): one loop selects the next input (socket
//! frame, live batch, writer progress, store task done, deadline, shutdown),
//! feeds it to the machine and carries out the actions.
//!
//! This loop reads the socket and writes it in the same `select!`: a frame
//! is handed to the socket at once when it takes it, and the rest is written
//! ([`Outgoing::drive`]) while inbound frames keep being read; the loop never
//! waits on a send alone. The machine keeps at most [`WRITE_QUEUE_FRAMES`]
//! frames unwritten and is told each time frames are flushed; a client that
//! takes no byte for the read timeout while frames wait is dropped. Store calls run on blocking threads, one read and one apply at a
//! time.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::SplitSink;
use futures_util::StreamExt;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

use super::machine::{Action, Ending, Input, Refusal, WRITE_QUEUE_FRAMES};
use super::{refusal_messages, Opened, Ws};
use crate::counted::Progress;
use crate::hub::budget::{client_wire_size, Conn};
use crate::hub::fanout::Published;
use crate::hub::registry::Registration;
use crate::hub::store::{Applied, Page, StoreError};
use crate::hub::HubInner;
use crate::metrics::Limit;
use crate::metrics::{HubSessionMetrics, StoreOp};
use crate::outgoing::Outgoing;
use crate::proto::{
    self, Change, ChangeResult, ClientFrame, ErrorCode, Outcome, TableSchema, Upload,
    UploadSummary, MAX_BATCH_CHANGES, MAX_FRAME_BYTES, MAX_PAGE_BYTES, MAX_PAGE_CHANGES,
};

/// Longest time a refused session's last frames (answers, error, close) may
/// take to be written before the connection is dropped anyway.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest time a refused session reads (and drops) what its client still
/// sends, waiting for it to close, after the error and close frames.
const LINGER: Duration = Duration::from_secs(2);

type Pending<T> = Option<JoinHandle<T>>;

/// What an apply task did: `None` when the session was replaced before the
/// store took the batch (nothing applied).
type ApplyDone = Result<Option<Applied>, StoreError>;

/// The upload being applied: its batch number, its changes (to answer a
/// failure), the bytes it holds in its token's budget and the store task.
type Applying = Option<(u64, Arc<Vec<Change>>, u64, JoinHandle<ApplyDone>)>;

/// A session's frame rate limit (`max_frames_per_second`).
type FrameRate = governor::DefaultDirectRateLimiter;

/// Upload frames at least this large are counted before they are decoded,
/// so an oversized batch is refused without being built in memory.
const PRESCAN_BYTES: usize = 64 << 10;

/// A session's I/O and what its store tasks need.
struct Driver {
    /// Cancelled once another session of the same identity took over. Left
    /// when the driver is dropped, before the session stops being counted
    /// as connected (fields drop in order).
    registration: Registration,
    inner: Arc<HubInner>,
    dataset: String,
    client: String,
    tables: Arc<HashMap<String, TableSchema>>,
    echo_own: bool,
    metrics: HubSessionMetrics,
    /// The socket's write half and the frames waiting for it.
    out: Outgoing<SplitSink<Ws, Message>>,
    /// The page being read: the page and the head.
    read: Pending<Result<(Page, u64), StoreError>>,
    apply: Applying,
    /// The connection's places in the hub's budgets.
    conn: Option<Arc<Conn>>,
    frames: FrameRate,
    /// Bytes of the uploads received and not yet being applied, in order.
    held: std::collections::VecDeque<u64>,
    /// Whether uploads are applied (a read-only token's are refused).
    holds_uploads: bool,
}

/// Runs an opened session until it ends; never returns while a send waits on
/// a client that reads nothing for longer than the read timeout.
/// While frames wait for a client, how often the driver looks whether their
/// bytes move.
const PROGRESS_CHECK: Duration = Duration::from_millis(500);

pub(super) async fn run(
    inner: Arc<HubInner>,
    ws: Ws,
    progress: Progress,
    opened: Opened,
    shutdown: CancellationToken,
) {
    let Opened {
        dataset,
        client,
        echo_own,
        tables,
        mut machine,
        start,
        mut live,
        registration,
    } = opened;
    let conn = ws.get_ref().get_ref().get_ref().conn().cloned();
    let (sink, mut reader) = ws.split();
    let mut d = Driver {
        metrics: inner.metrics.session(&dataset),
        frames: frame_rate(&inner),
        out: Outgoing::new(sink),
        client,
        echo_own,
        inner,
        dataset,
        tables,
        read: None,
        apply: None,
        registration,
        conn,
        held: Default::default(),
        holds_uploads: machine.applies_uploads(),
    };
    if let Some(c) = &d.conn {
        c.session_started();
    }
    let replaced = d.registration.replaced.clone();
    let mut told_replaced = false;
    let seat = d.registration.seat.clone();
    let mut told_revoked = false;
    let mut actions = start;
    // Frames flushed, as last told to the machine.
    let mut reported = 0u64;
    let mut progress_check = tokio::time::interval(PROGRESS_CHECK);
    progress_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen_written = progress.written();
    let mut seen_read = progress.read();
    let mut shutting = false;
    loop {
        for a in actions.drain(..) {
            if let Some(ending) = d.perform(a) {
                return end(d, ending, reader, &shutdown).await;
            }
        }
        if d.out.flushed() != reported {
            reported = d.out.flushed();
            actions = machine.handle(
                Input::Written { total: reported },
                std::time::Instant::now(),
            );
            continue;
        }
        let deadline = machine.deadline().map(tokio::time::Instant::from_std);
        let input = tokio::select! {
            m = reader.next(), if machine.wants_inbound() => d.heard(m),
            p = live.recv(), if machine.wants_live() => live_input(p, &d.tables),
            r = d.out.drive(), if d.out.waiting() => d.sent(r, &mut reported),
            r = join(&mut d.read), if d.read.is_some() => {
                d.read = None;
                match r {
                    Ok((page, head)) => Input::PageRead { page, head },
                    Err(e) => Input::StoreFailed(e.into()),
                }
            }
            r = join_apply(&mut d.apply), if d.apply.is_some() => {
                // Not applied: the session was replaced meanwhile.
                told_replaced |= matches!(r, Ok(None));
                d.apply_done(r)
            }
            _ = progress_check.tick(), if machine.writing() => {
                moved(progress.written(), &mut seen_written, Input::Progress)
            }
            // A frame still arriving on a slow link counts as heard.
            _ = sleep_until(deadline), if deadline.is_some() => {
                moved(progress.read(), &mut seen_read, Input::Heard)
            }
            _ = replaced.cancelled(), if !told_replaced => {
                told_replaced = true;
                Input::Replaced
            }
            _ = seat.revoked.cancelled(), if !told_revoked => {
                told_revoked = true;
                let (code, message) = seat.reason().expect("BUG: revoked without a reason");
                Input::Revoked(Refusal::new(code, message))
            }
            _ = shutdown.cancelled(), if !shutting => {
                shutting = true;
                Input::Shutdown
            }
        };
        actions = machine.handle(input, std::time::Instant::now());
        seat.cursor.store(machine.cursor(), Ordering::Relaxed);
    }
}

/// `then` when the byte count moved since last seen, else a plain tick.
fn moved(now: u64, seen: &mut u64, then: Input) -> Input {
    if now != *seen {
        *seen = now;
        then
    } else {
        Input::Tick
    }
}

/// The session's frame-rate limiter, from the hub's budget.
fn frame_rate(inner: &HubInner) -> FrameRate {
    let per_second = std::num::NonZeroU32::new(inner.budget.limits().max_frames_per_second)
        .expect("BUG: validated above zero");
    governor::RateLimiter::direct(governor::Quota::per_second(per_second))
}

/// The refusal of a session whose schema of a table a breaking change
/// just retired (it lacks the new version's columns).
fn retired(breaking: &[TableSchema], tables: &HashMap<String, TableSchema>) -> Option<Refusal> {
    use crate::hub::store::evolution::{compare, Relation};
    breaking.iter().find_map(|b| {
        let mine = tables.get(&b.name)?;
        (!matches!(compare(b, mine), Relation::Same | Relation::Extends { .. })).then(|| {
            Refusal::new(
                ErrorCode::SchemaMismatch,
                format!(
                    "table {:?}: the operator accepted a breaking change of its schema, which this device's app does not have; upgrade the app on this device: its table must have at least the columns {}",
                    b.name,
                    b.columns.join(", ")
                ),
            )
        })
    })
}

/// What the live stream brought, as the machine's input.
fn live_input(
    p: Result<Arc<Published>, RecvError>,
    tables: &HashMap<String, TableSchema>,
) -> Input {
    match p {
        Ok(p) => match retired(&p.breaking, tables) {
            Some(r) => Input::StoreFailed(r),
            None => Input::Published(p),
        },
        Err(RecvError::Lagged(n)) => {
            tracing::debug!(
                missed = n,
                "fell behind the live stream; reading from the store"
            );
            Input::Lagged
        }
        Err(RecvError::Closed) => {
            Input::StoreFailed(Refusal::new(ErrorCode::Internal, "fan-out closed"))
        }
    }
}

/// Ends the session. After a refusal, what the client still sends is read
/// and dropped for a moment: closing with unread bytes would answer them
/// with a reset, which can destroy the error frame on its way to the client.
async fn end(
    d: Driver,
    ending: (Vec<Vec<u8>>, Ending),
    mut reader: futures_util::stream::SplitStream<Ws>,
    shutdown: &CancellationToken,
) {
    let linger = matches!(&ending.1, Ending::Refuse(r) if r.code != ErrorCode::ShuttingDown);
    d.finish(ending).await;
    if linger {
        let drain = async { while let Some(Ok(_)) = reader.next().await {} };
        tokio::select! {
            _ = tokio::time::timeout(LINGER, drain) => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

impl Driver {
    /// A message from the client as the machine's input; a `head` question
    /// is answered with the head read here, when it arrives.
    fn heard(&mut self, m: Option<Result<Message, WsError>>) -> Input {
        match self.inbound(m) {
            Input::Frame(ClientFrame::Head(h)) => Input::HeadAsked {
                id: h.id,
                head: self
                    .inner
                    .fanout
                    .dataset(&self.dataset)
                    .head
                    .load(Ordering::SeqCst),
            },
            i => i,
        }
    }

    /// The outcome of pushing queued frames to the client.
    fn sent<E: std::fmt::Display>(&self, r: Result<(), E>, reported: &mut u64) -> Input {
        match r {
            Ok(()) => {
                *reported = self.out.flushed();
                Input::Written { total: *reported }
            }
            Err(e) => {
                tracing::debug!(error = %e, "sending to client failed");
                Input::Gone
            }
        }
    }

    /// The apply task ended: its budget is given back, and its result is the
    /// machine's input.
    fn apply_done(&mut self, r: ApplyDone) -> Input {
        let (batch, changes, held, _) = self.apply.take().expect("BUG: apply polled while none");
        if let Some(c) = &self.conn {
            c.applied(held);
        }
        self.applied(batch, &changes, r)
    }

    /// Carries out one action; returns how the session ends on `Close`.
    fn perform(&mut self, action: Action) -> Option<(Vec<Vec<u8>>, Ending)> {
        match action {
            Action::Send(frame) => {
                debug_assert!(self.out.queued() <= WRITE_QUEUE_FRAMES);
                self.metrics.bytes_out.inc_by(frame.len() as u64);
                if let Err(e) = self.out.push(Message::Binary(frame.into())) {
                    tracing::debug!(error = %e, "sending to client failed");
                    return Some((Vec::new(), Ending::Gone));
                }
            }
            Action::ReadPage { after } => self.read_page(after),
            Action::Apply(up) => self.apply(up),
            Action::FannedOut(stored) => self.metrics.fanned_out(stored),
            Action::Close { flush, ending } => return Some((flush, ending)),
        }
        None
    }

    fn read_page(&mut self, after: u64) {
        let inner = self.inner.clone();
        let ds = self.dataset.clone();
        let exclude = (!self.echo_own).then(|| self.client.clone());
        self.read = Some(tokio::task::spawn_blocking(move || {
            let t0 = std::time::Instant::now();
            let head = inner.store.head(&ds)?;
            let page = inner.store.changes_since(
                &ds,
                after,
                exclude.as_deref(),
                MAX_PAGE_CHANGES,
                MAX_PAGE_BYTES,
            )?;
            inner
                .metrics
                .store_time(StoreOp::read_changes, t0.elapsed());
            Ok((page, head))
        }));
    }

    /// Applies an upload and publishes what it stored, under the dataset's
    /// lock so that published batches arrive in sequence order.
    fn apply(&mut self, up: Upload) {
        let inner = self.inner.clone();
        let (ds, client) = (self.dataset.clone(), self.client.clone());
        let tables = self.tables.clone();
        let changes = Arc::new(up.changes);
        let acked = up.acked;
        let batch = changes.clone();
        let replaced = self.registration.replaced.clone();
        let task = tokio::task::spawn_blocking(move || {
            let changes = batch;
            let fan = inner.fanout.dataset(&ds);
            let _lock = fan.apply_lock.lock().expect("BUG: poisoned");
            if replaced.is_cancelled() {
                // A newer session of this identity took over: it alone
                // applies the client's uploads from now on.
                return Ok(None);
            }
            let t0 = std::time::Instant::now();
            let mut applied = inner
                .store
                .apply_batch(&ds, &client, &tables, &changes, acked)?;
            inner.metrics.store_time(StoreOp::apply_batch, t0.elapsed());
            tracing::trace!(n = changes.len(), took = ?t0.elapsed(), "store applied batch");
            if let (Some(first), Some(last)) = (applied.logged.first(), applied.logged.last()) {
                let p = Published {
                    after: first.change.version - 1,
                    last: last.change.version,
                    entries: std::mem::take(&mut applied.logged),
                    stored: std::time::Instant::now(),
                    breaking: Vec::new(),
                };
                fan.head.fetch_max(p.last, Ordering::SeqCst);
                // No receiver is fine: nobody else is connected.
                let _ = fan.tx.send(Arc::new(p));
            }
            Ok(Some(applied))
        });
        let held = self.held.pop_front().unwrap_or(0);
        self.apply = Some((up.batch, changes, held, task));
    }

    /// Turns a finished apply into the machine's input, with logs, metrics
    /// and the `drop_upload_results` fault point.
    fn applied(&mut self, batch: u64, changes: &[Change], r: ApplyDone) -> Input {
        match r {
            Ok(None) => {
                tracing::debug!(batch, "batch not applied: another connection took over");
                Input::NotApplied
            }
            Err(
                e @ (StoreError::IdentityConflict(_)
                | StoreError::BadSequence(_)
                | StoreError::SchemaRetired { .. }),
            ) => {
                // Logged when the session ends with it.
                Input::Refused(e.into())
            }
            Ok(Some(a)) => {
                let s = UploadSummary::of(&a.results);
                self.metrics.applied(&s);
                tracing::debug!(
                    batch,
                    total = s.total,
                    applied = s.applied,
                    conflict = s.conflict,
                    invalid = s.invalid,
                    head = a.head,
                    "batch applied"
                );
                if s.invalid > 0 {
                    tracing::warn!(batch, invalid = s.invalid, first_error = ?s.first_error, "batch had invalid changes");
                }
                if self
                    .inner
                    .faults
                    .drop_upload_results
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    tracing::warn!(
                        batch,
                        "fault injection: dropping the upload result and the connection"
                    );
                    return Input::Cut;
                }
                Input::Applied {
                    results: a.results,
                    failed: false,
                }
            }
            Err(e) => {
                tracing::error!(batch, error = %e, "could not apply batch");
                let results = materialize_error(changes, e.to_string());
                self.metrics.applied(&UploadSummary::of(&results));
                Input::Applied {
                    results,
                    failed: true,
                }
            }
        }
    }

    /// Ends the session: logs why, writes the last frames of a refusal under
    /// a deadline, and stops the writer.
    async fn finish(mut self, (flush, ending): (Vec<Vec<u8>>, Ending)) {
        let mut last = Vec::new();
        match &ending {
            Ending::Gone => tracing::debug!("client closed the connection"),
            Ending::Silent(t) => {
                tracing::info!(timeout = ?t, "client silent for too long; closing")
            }
            Ending::Stalled { waiting, took } => {
                tracing::warn!(
                    waiting,
                    took = ?took,
                    "client took no data for {took:?} (the read timeout) while {waiting} frames waited for it; dropping the connection"
                );
                self.inner.metrics.stalled(&self.dataset);
            }
            Ending::Cut => {}
            Ending::Refuse(r) => {
                if r.code == ErrorCode::ShuttingDown {
                    tracing::debug!("closing: hub shutting down");
                } else {
                    tracing::warn!(code = r.code.as_str(), "{}", r.message);
                    self.inner.metrics.refused(r.code.as_str());
                }
                last.extend(refusal_messages(r));
            }
        }
        if !matches!(ending, Ending::Refuse(_) | Ending::Cut) {
            return;
        }
        let wait = self.inner.read_timeout.min(CLOSE_TIMEOUT);
        let drain = async {
            for f in flush {
                self.out.push(Message::Binary(f.into()))?;
            }
            for m in last {
                self.out.push(m)?;
            }
            self.out.drive().await
        };
        if tokio::time::timeout(wait, drain).await.is_err() {
            tracing::info!(timeout = ?wait, "client did not take the last frames; dropping the connection");
        }
    }
}

impl Driver {
    /// Maps what the socket gave to an input, keeping the session within its
    /// limits: frames a second, changes per upload, bytes in flight.
    fn inbound(&mut self, m: Option<Result<Message, WsError>>) -> Input {
        let m = match m {
            None => return Input::Gone,
            Some(Err(WsError::Capacity(e))) => {
                return Input::Bad(Refusal::new(
                    ErrorCode::FrameTooLarge,
                    format!("{e}; frames are limited to {MAX_FRAME_BYTES} bytes"),
                ))
            }
            Some(Err(e)) => {
                if let Some(t) = self.conn.as_ref().and_then(|c| c.tripped()) {
                    return Input::Bad(Refusal::new(ErrorCode::Internal, t.message.clone()));
                }
                tracing::info!(error = %e, "connection lost");
                return Input::Gone;
            }
            Some(Ok(m)) => m,
        };
        let payload = match &m {
            Message::Binary(b) => b.len(),
            Message::Text(t) => t.len(),
            Message::Ping(p) | Message::Pong(p) => p.len(),
            Message::Close(_) | Message::Frame(_) => 0,
        };
        let wire = client_wire_size(payload);
        if self.frames.check().is_err() {
            if let Some(c) = &self.conn {
                c.consumed(wire, false);
            }
            self.inner.metrics.limited(Limit::max_frames_per_second);
            let per_second = self.inner.budget.limits().max_frames_per_second;
            return Input::Bad(Refusal::new(
                ErrorCode::Internal,
                format!("more than {per_second} frames a second, the limit of a session (max_frames_per_second in the [limits] of hub.toml); reconnect and send fewer"),
            ));
        }
        let Message::Binary(b) = m else {
            if let Some(c) = &self.conn {
                c.consumed(wire, false);
            }
            return match m {
                Message::Text(_) => Input::Bad(Refusal::new(
                    ErrorCode::MalformedFrame,
                    "text message; frames are binary MessagePack",
                )),
                Message::Close(_) => Input::Gone,
                _ => Input::Heard,
            };
        };
        self.metrics.bytes_in.inc_by(b.len() as u64);
        let max = self.inner.budget.limits().max_upload_changes;
        if b.len() >= PRESCAN_BYTES {
            if let Some(n) = upload_changes(&b).filter(|&n| n > max) {
                if let Some(c) = &self.conn {
                    c.consumed(wire, false);
                }
                self.inner.metrics.limited(Limit::max_upload_changes);
                return Input::Bad(too_many_changes(n, max));
            }
        }
        let frame = proto::decode::<ClientFrame>(&b);
        let hold = self.holds_uploads && matches!(frame, Ok(ClientFrame::Upload(_)));
        if let Some(c) = &self.conn {
            c.consumed(wire, hold);
        }
        if hold {
            self.held.push_back(wire);
        }
        match frame {
            Ok(ClientFrame::Upload(up)) if up.changes.len() > max => {
                self.inner.metrics.limited(Limit::max_upload_changes);
                Input::Bad(too_many_changes(up.changes.len(), max))
            }
            Ok(f) => Input::Frame(f),
            Err(e) => Input::Bad(Refusal::new(ErrorCode::MalformedFrame, e.to_string())),
        }
    }
}

fn too_many_changes(n: usize, max: usize) -> Refusal {
    Refusal::new(
        ErrorCode::FrameTooLarge,
        format!(
            "upload of {n} changes; this hub takes at most {max} in one batch (max_upload_changes in the [limits] of hub.toml), tether daemons send at most {MAX_BATCH_CHANGES}"
        ),
    )
}

/// The number of changes of an `upload` frame, counted without building
/// them; `None` for another frame or one that does not parse.
fn upload_changes(bytes: &[u8]) -> Option<usize> {
    use serde::de::{IgnoredAny, SeqAccess, Visitor};

    struct Count(usize);
    impl<'de> serde::Deserialize<'de> for Count {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Count, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Count;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a list of changes")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
                    let mut n = 0;
                    while seq.next_element::<IgnoredAny>()?.is_some() {
                        n += 1;
                    }
                    Ok(Count(n))
                }
            }
            d.deserialize_seq(V)
        }
    }
    #[derive(serde::Deserialize)]
    struct UploadShape {
        changes: Count,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Shape {
        Upload(UploadShape),
    }
    match rmp_serde::from_slice::<Shape>(bytes) {
        Ok(Shape::Upload(u)) => Some(u.changes.0),
        Err(_) => None,
    }
}

async fn join<T>(h: &mut Pending<Result<T, StoreError>>) -> Result<T, StoreError> {
    match h {
        Some(h) => h
            .await
            .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?,
        None => std::future::pending().await,
    }
}

async fn join_apply(h: &mut Applying) -> ApplyDone {
    match h {
        Some((_, _, _, h)) => h
            .await
            .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn materialize_error(changes: &[Change], message: String) -> Vec<ChangeResult> {
    changes
        .iter()
        .map(|c| ChangeResult {
            seq: c.seq,
            outcome: Outcome::MaterializeError {
                message: message.clone(),
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upload_is_counted_without_decoding_its_changes() {
        let change = |seq| Change {
            seq,
            table: "t".into(),
            op: proto::Op::Upsert,
            pk: vec![proto::Value::Integer(seq as i64)],
            values: vec![proto::Value::Integer(seq as i64)],
            base: 0,
            mask: u64::MAX,
        };
        let up = ClientFrame::Upload(Upload {
            batch: 3,
            acked: 1,
            changes: (1..=5000).map(change).collect(),
        });
        assert_eq!(upload_changes(&proto::encode(&up)), Some(5000));
        let head = ClientFrame::Head(proto::HeadAsk { id: 1 });
        assert_eq!(upload_changes(&proto::encode(&head)), None);
        assert_eq!(upload_changes(&[0xc1, 0x00]), None);
    }
}
