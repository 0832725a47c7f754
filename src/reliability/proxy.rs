//! A loopback proxy between one daemon and the hub that knows where
//! WebSocket frames begin and end, so that a fault can hit a frame exactly:
//! drop it and close, cut it in half and close, hold every frame back for a
//! while, or stall the whole link (no byte either way) until the read-timeout
//! guards of both ends must fire.
//!
//! Frames are parsed only as far as their length (RFC 6455 section 5.2); the
//! HTTP upgrade before them passes unchanged. A fault is armed on the
//! [`Link`] and counted only when it really hit a live connection, so that a
//! schedule whose faults never happened cannot pass for a faulty one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A fault that hits the next data frame on the link, in either direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameFault {
    /// The frame is discarded and the connection closed: it never arrives.
    Drop,
    /// The first half of the frame is sent, then the connection is closed.
    Cut,
}

/// How often each kind of link fault really hit a connection.
#[derive(Debug, Default)]
pub struct LinkCounts {
    pub dropped: AtomicU64,
    pub cut: AtomicU64,
    /// Stalls during which a peer gave up on the silent connection.
    pub stalled: AtomicU64,
    pub delayed: AtomicU64,
}

/// What the link does now; shared by every connection through it.
#[derive(Debug, Default)]
struct State {
    /// Hits the next frame, then is disarmed.
    armed: Option<FrameFault>,
    /// Nothing passes either way until then.
    stall_until: Option<Instant>,
    /// Whether the stall now armed has been counted: once, when a peer
    /// closed a connection during it (its read-timeout guard fired).
    stall_counted: bool,
    /// Every frame waits this long before it is passed on, until the instant.
    delay: Option<(Duration, Instant)>,
    /// Whether the delay now armed has been counted.
    delay_counted: bool,
}

/// One daemon's path to the hub: a listener on 127.0.0.1 whose connections
/// are forwarded to the hub's current address.
pub struct Link {
    /// Where the daemon connects (`127.0.0.1:<port>`).
    pub addr: String,
    /// The hub's address; changed when a restarted hub had to take another
    /// port.
    target: Arc<Mutex<String>>,
    state: Arc<Mutex<State>>,
    pub counts: Arc<LinkCounts>,
    /// Ends the listener and every connection's copying.
    stop: CancellationToken,
}

impl Link {
    /// Listens on a new loopback port and forwards to `target`.
    pub async fn start(target: String) -> std::io::Result<Link> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let link = Link {
            addr,
            target: Arc::new(Mutex::new(target)),
            state: Arc::default(),
            counts: Arc::default(),
            stop: CancellationToken::new(),
        };
        let (target, state, counts, stop) = (
            link.target.clone(),
            link.state.clone(),
            link.counts.clone(),
            link.stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stop.cancelled() => return,
                };
                let Ok((client, _)) = accepted else { continue };
                let to = target.lock().expect("BUG: target lock").clone();
                let conn = Conn {
                    state: state.clone(),
                    counts: counts.clone(),
                    stop: stop.child_token(),
                };
                tokio::spawn(conn.run(client, to));
            }
        });
        Ok(link)
    }

    /// Forwards new connections to `target` from now on.
    pub fn retarget(&self, target: String) {
        *self.target.lock().expect("BUG: target lock") = target;
    }

    /// The next frame either way meets `fault`.
    pub fn arm(&self, fault: FrameFault) {
        self.state().armed = Some(fault);
    }

    /// Nothing passes either way for `d`.
    pub fn stall(&self, d: Duration) {
        let mut s = self.state();
        s.stall_until = Some(Instant::now() + d);
        s.stall_counted = false;
    }

    /// Every frame waits `each` before it passes, for `d`.
    pub fn delay(&self, each: Duration, d: Duration) {
        let mut s = self.state();
        s.delay = Some((each, Instant::now() + d));
        s.delay_counted = false;
    }

    /// No fault any more: what is armed is disarmed, stalls and delays end.
    pub fn heal(&self) {
        *self.state() = State::default();
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("BUG: link state lock")
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One proxied connection.
struct Conn {
    state: Arc<Mutex<State>>,
    counts: Arc<LinkCounts>,
    /// Cancelled when either direction ends or a fault closes the
    /// connection: both sockets are then dropped (closed).
    stop: CancellationToken,
}

impl Conn {
    async fn run(self, client: TcpStream, target: String) {
        let server = tokio::select! {
            s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&target)) => s,
            _ = self.stop.cancelled() => return,
        };
        let Ok(Ok(server)) = server else {
            return; // the hub is down: the daemon sees its connection close
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        let up = Direction {
            state: self.state.clone(),
            counts: self.counts.clone(),
            from: cr,
            to: sw,
        };
        let down = Direction {
            state: self.state.clone(),
            counts: self.counts.clone(),
            from: sr,
            to: cw,
        };
        tokio::select! {
            _ = up.pump() => {}
            _ = down.pump() => {}
            _ = self.stop.cancelled() => return,
        }
        // A peer closed while nothing passed: its read-timeout guard fired.
        let mut s = self.state.lock().expect("BUG: link state lock");
        if s.stall_until.is_some_and(|until| Instant::now() < until) && !s.stall_counted {
            s.stall_counted = true;
            self.counts.stalled.fetch_add(1, Ordering::Relaxed);
        }
        // Returning drops all four halves: both sockets close.
    }
}

/// One direction of a connection: whole frames from `from` to `to`.
struct Direction {
    state: Arc<Mutex<State>>,
    counts: Arc<LinkCounts>,
    from: OwnedReadHalf,
    to: OwnedWriteHalf,
}

/// What to do with the frame just read.
enum Verdict {
    Pass,
    /// Wait this long, then decide again (a stall or a delay).
    Wait(Instant, bool),
    Drop,
    Cut,
}

impl Direction {
    /// Copies the HTTP head as it is, then frame by frame until either side
    /// closes or a fault ends the connection.
    async fn pump(mut self) {
        let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
        if self.head(&mut buf).await.is_none() {
            return;
        }
        loop {
            let len = loop {
                if let Some(len) = frame_len(&buf) {
                    if buf.len() >= len {
                        break len;
                    }
                }
                if !self.fill(&mut buf).await {
                    return;
                }
            };
            let mut held = Vec::new();
            if !self.pass_frame(&buf[..len], &mut held).await {
                return;
            }
            buf.drain(..len);
            buf.extend_from_slice(&held);
        }
    }

    /// Passes the bytes up to the end of the HTTP head (`\r\n\r\n`);
    /// returns with `buf` holding what came after it.
    async fn head(&mut self, buf: &mut Vec<u8>) -> Option<()> {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                self.to.write_all(&buf[..end + 4]).await.ok()?;
                buf.drain(..end + 4);
                return Some(());
            }
            if buf.len() > 64 * 1024 || !self.fill(buf).await {
                return None;
            }
        }
    }

    /// Reads more bytes; false when the peer closed or failed.
    async fn fill(&mut self, buf: &mut Vec<u8>) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match self.from.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Applies the link's state to one whole frame; false when the
    /// connection must end. Bytes read during a stall go to `held`.
    async fn pass_frame(&mut self, frame: &[u8], held: &mut Vec<u8>) -> bool {
        // Opcodes 0x8 and up are control frames (close, ping, pong).
        let data = frame[0] & 0x08 == 0;
        loop {
            match self.verdict(data) {
                Verdict::Pass => return self.to.write_all(frame).await.is_ok(),
                Verdict::Wait(until, true) => {
                    tokio::time::sleep_until(until).await;
                    return self.to.write_all(frame).await.is_ok();
                }
                Verdict::Wait(until, false) => {
                    if !self.hold_until(until, held).await {
                        return false;
                    }
                }
                Verdict::Drop => return false,
                Verdict::Cut => {
                    let _ = self.to.write_all(&frame[..frame.len() / 2]).await;
                    let _ = self.to.flush().await;
                    return false;
                }
            }
        }
    }

    /// Keeps reading (and holding) what comes until `until`, so that a peer
    /// closing during a stall is noticed; false when it closed.
    async fn hold_until(&mut self, until: Instant, held: &mut Vec<u8>) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return true,
                r = self.from.read(&mut chunk) => match r {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => held.extend_from_slice(&chunk[..n]),
                },
            }
        }
    }

    /// Decides, under the state's lock, what the frame meets; counts a
    /// fault the first time it hits a connection. An armed fault waits for
    /// a data frame (an upload, an answer, changes): losing a ping proves
    /// little.
    fn verdict(&self, data: bool) -> Verdict {
        let mut s = self.state.lock().expect("BUG: link state lock");
        let now = Instant::now();
        if let Some(until) = s.stall_until {
            if now < until {
                return Verdict::Wait(until, false);
            }
            s.stall_until = None;
        }
        if let Some(fault) = s.armed.take_if(|_| data) {
            return match fault {
                FrameFault::Drop => {
                    self.counts.dropped.fetch_add(1, Ordering::Relaxed);
                    Verdict::Drop
                }
                FrameFault::Cut => {
                    self.counts.cut.fetch_add(1, Ordering::Relaxed);
                    Verdict::Cut
                }
            };
        }
        if let Some((each, until)) = s.delay {
            if now < until {
                if !s.delay_counted {
                    s.delay_counted = true;
                    self.counts.delayed.fetch_add(1, Ordering::Relaxed);
                }
                return Verdict::Wait(now + each, true);
            }
            s.delay = None;
        }
        Verdict::Pass
    }
}

/// The length of the WebSocket frame at the start of `buf` (header, mask
/// key and payload), once its header is complete.
pub fn frame_len(buf: &[u8]) -> Option<usize> {
    let b1 = *buf.get(1)?;
    let masked = b1 & 0x80 != 0;
    let (header, payload) = match b1 & 0x7f {
        126 => (
            4,
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as u64,
        ),
        127 => (10, u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?)),
        n => (2, n as u64),
    };
    let mask = if masked { 4 } else { 0 };
    usize::try_from(payload).ok()?.checked_add(header + mask)
}

#[cfg(test)]
mod tests {
    use super::frame_len;

    #[test]
    fn frame_lengths_follow_the_header() {
        assert_eq!(frame_len(&[0x82]), None, "header incomplete");
        assert_eq!(frame_len(&[0x82, 5]), Some(7));
        assert_eq!(frame_len(&[0x82, 0x85]), Some(11), "masked: 4 more");
        assert_eq!(frame_len(&[0x82, 126, 0x01]), None);
        assert_eq!(frame_len(&[0x82, 126, 0x01, 0x00]), Some(4 + 256));
        assert_eq!(frame_len(&[0x82, 0xfe, 0x01, 0x00]), Some(8 + 256));
        let mut long = vec![0x82, 127];
        long.extend_from_slice(&70_000u64.to_be_bytes());
        assert_eq!(frame_len(&long), Some(10 + 70_000));
    }
}
