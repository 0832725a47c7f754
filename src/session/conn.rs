//! One open connection to the hub, as the driver sees it: frames in, frames
//! out, never one without the other.
//!
//! Reading and writing are polled together in one future
//! ([`Conn::next_input`]): outgoing frames are handed to the socket without
//! waiting ([`Conn::queue`] writes what the socket takes now and keeps the
//! rest), and the rest is flushed only while inbound frames are read too. So
//! the session never waits on a send while nobody reads, and a frame on its
//! way costs no hand-over to another task. A hub that takes no byte for the
//! send timeout while frames wait is reported as lost; bytes are counted
//! below TLS and WebSocket ([`crate::counted`]), so a slow link whose bytes
//! keep moving is never taken for a dead one.

use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::StreamExt;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::connect::Ws;
use super::machine::Input;
use super::SessionError;
use crate::counted::Progress;
use crate::outgoing::Outgoing;
use crate::proto::{self, HubFrame};

/// Frames waiting for the socket. The machine keeps at most 4 uploads in
/// flight plus a ping now and then, so more means the hub stopped reading.
pub const OUT_LIMIT: usize = 16;
/// How often waiting output looks whether its bytes move.
const STALL_CHECK: Duration = Duration::from_millis(500);
/// Time a close frame gets to go out.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Conn {
    stream: SplitStream<Ws>,
    out: Outgoing<SplitSink<Ws, Message>>,
    progress: Progress,
    send_timeout: Duration,
    stall_check: Interval,
    /// Bytes written when last looked, and for how long (while output
    /// waited and the connection was being driven) nothing moved.
    seen: u64,
    idle: Duration,
    /// Bytes read when last looked.
    seen_read: u64,
    last_check: Instant,
}

impl Conn {
    pub fn new(ws: Ws, progress: Progress, send_timeout: Duration) -> Conn {
        let (sink, stream) = ws.split();
        let mut stall_check = tokio::time::interval(STALL_CHECK);
        stall_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Conn {
            stream,
            out: Outgoing::new(sink),
            seen: progress.written(),
            seen_read: progress.read(),
            progress,
            send_timeout,
            stall_check,
            idle: Duration::ZERO,
            last_check: Instant::now(),
        }
    }

    /// Sends a ping if nothing else waits for the socket (used while the
    /// loop is busy elsewhere, so the hub keeps hearing from this client).
    pub fn keep_alive(&mut self) {
        if !self.out.waiting() {
            let _ = self.out.push(Message::Ping(Vec::new().into()));
        }
    }

    /// Whether bytes arrived since the last look: a frame still arriving on
    /// a slow link shows the hub is alive. (Bytes written do not count: the
    /// local kernel takes a whole frame at once, and a black-holed link
    /// swallows pings without end.)
    pub fn bytes_moved(&mut self) -> bool {
        let now = self.progress.read();
        let moved = now != self.seen_read;
        self.seen_read = now;
        moved
    }

    /// Hands a frame to the socket, writing what it takes now without
    /// waiting; the rest goes out while [`Conn::next_input`] runs.
    pub fn queue(&mut self, m: Message) -> Result<(), SessionError> {
        if !self.out.waiting() {
            self.idle = Duration::ZERO;
            self.last_check = Instant::now();
        }
        if self.out.queued() >= OUT_LIMIT {
            return Err(SessionError::Retry(format!(
                "the hub is not taking frames ({OUT_LIMIT} wait); reconnecting"
            )));
        }
        self.out
            .push(m)
            .map_err(|e| SessionError::Retry(format!("connection lost: {e}")))
    }

    /// The next input from the hub; meanwhile, waiting frames are written.
    /// Cancel-safe: a frame is taken from the queue only when the socket
    /// accepts it in the same poll.
    pub async fn next_input(&mut self) -> Input {
        loop {
            let waiting = self.out.waiting();
            tokio::select! {
                m = self.stream.next() => return to_input(m),
                r = self.out.drive(), if waiting => {
                    if let Err(e) = r {
                        return Input::Lost(SessionError::Retry(format!("connection lost: {e}")));
                    }
                }
                _ = self.stall_check.tick(), if waiting => {
                    let now = Instant::now();
                    let written = self.progress.written();
                    if written != self.seen {
                        self.seen = written;
                        self.idle = Duration::ZERO;
                    } else {
                        // Time spent elsewhere (a long local write) is
                        // not the hub's fault: count at most one check.
                        self.idle += now.duration_since(self.last_check).min(STALL_CHECK);
                        if self.idle >= self.send_timeout {
                            return Input::Lost(SessionError::Retry(format!(
                                "the hub took nothing for {:?} while data waited for it; reconnecting",
                                self.idle
                            )));
                        }
                    }
                    self.last_check = now;
                }
            }
        }
    }

    /// Sends a close frame (bounded in time) and drops the connection.
    pub async fn close(mut self, reason: &'static str) {
        let close = Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: reason.into(),
        }));
        if self.out.push(close).is_ok() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.out.drive()).await;
        }
    }
}

/// What a message from the hub means for the machine.
pub(crate) fn to_input(m: Option<Result<Message, WsError>>) -> Input {
    match m {
        None => Input::Lost(SessionError::Retry("hub closed the connection".into())),
        Some(Err(e)) => Input::Lost(SessionError::Retry(format!("connection lost: {e}"))),
        Some(Ok(Message::Binary(b))) => match proto::decode::<HubFrame>(&b) {
            Ok(f) => Input::Frame(f, b.len()),
            Err(e) => Input::Lost(SessionError::Retry(format!(
                "hub sent a frame this daemon cannot read ({e}); reconnecting"
            ))),
        },
        Some(Ok(Message::Close(f))) => {
            let why = f
                .map(|f| format!(" ({} {})", u16::from(f.code), f.reason))
                .unwrap_or_default();
            Input::Lost(SessionError::Retry(format!(
                "hub closed the connection{why}"
            )))
        }
        Some(Ok(Message::Text(_))) => Input::Lost(SessionError::Retry(
            "hub sent a text message; frames are binary MessagePack".into(),
        )),
        Some(Ok(_)) => Input::Alive,
    }
}
