//! Frames on their way out of a WebSocket, written while the same task keeps
//! reading.
//!
//! Both ends of tether follow one rule: the task that reads a socket never
//! waits on a send to that same socket, or two busy peers end up each waiting
//! for the other to read. [`Outgoing`] holds the frames waiting for the
//! socket: [`Outgoing::push`] writes what the socket takes at once without
//! waiting, and [`Outgoing::drive`], polled in the same `select!` as the
//! reads, writes the rest. A frame on its way costs no hand-over to another
//! task.

use std::collections::VecDeque;
use std::future::poll_fn;

use futures_util::{FutureExt, Sink, SinkExt};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// The write half of a socket and the frames waiting for it.
pub struct Outgoing<S> {
    sink: S,
    queue: VecDeque<Message>,
    /// Messages handed to the socket but not flushed yet.
    dirty: bool,
    handed: u64,
    flushed: u64,
}

impl<S: Sink<Message, Error = WsError> + Unpin> Outgoing<S> {
    pub fn new(sink: S) -> Outgoing<S> {
        Outgoing {
            sink,
            queue: VecDeque::new(),
            dirty: false,
            handed: 0,
            flushed: 0,
        }
    }

    /// Whether messages wait to be written or flushed.
    pub fn waiting(&self) -> bool {
        self.dirty || !self.queue.is_empty()
    }

    /// Messages waiting, not yet handed to the socket.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Messages written and flushed since the start.
    pub fn flushed(&self) -> u64 {
        self.flushed
    }

    /// Queues a message and writes what the socket takes now, without
    /// waiting. An error means the connection is gone.
    // The error type is tungstenite's; its size is not ours to choose.
    #[allow(clippy::result_large_err)]
    pub fn push(&mut self, m: Message) -> Result<(), WsError> {
        self.queue.push_back(m);
        match self.drive().now_or_never() {
            Some(Err(e)) => Err(e),
            Some(Ok(())) | None => Ok(()),
        }
    }

    /// Writes the waiting messages and flushes them. Cancel-safe: a message
    /// leaves the queue only once the socket took it, and an interrupted
    /// flush resumes where it was.
    pub async fn drive(&mut self) -> Result<(), WsError> {
        while !self.queue.is_empty() {
            poll_fn(|cx| self.sink.poll_ready_unpin(cx)).await?;
            let m = self.queue.pop_front().expect("BUG: checked non-empty");
            self.sink.start_send_unpin(m)?;
            self.handed += 1;
            self.dirty = true;
        }
        if self.dirty {
            poll_fn(|cx| self.sink.poll_flush_unpin(cx)).await?;
            self.dirty = false;
            self.flushed = self.handed;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::WebSocketStream;

    #[tokio::test]
    async fn a_frame_larger_than_the_pipe_goes_out_while_the_reader_drains() {
        let (a, b) = tokio::io::duplex(4096);
        let ws_a = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let mut ws_b = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        let (sink, _stream) = ws_a.split();
        let mut out = Outgoing::new(sink);
        // 1 MiB cannot fit a 4 KiB pipe: push returns at once anyway.
        out.push(Message::Binary(vec![9u8; 1 << 20].into()))
            .unwrap();
        assert!(out.waiting());
        assert_eq!(out.flushed(), 0);
        let (sent, got) = tokio::join!(out.drive(), ws_b.next());
        sent.unwrap();
        assert_eq!(got.unwrap().unwrap().len(), 1 << 20);
        assert!(!out.waiting());
        assert_eq!(out.flushed(), 1);
    }
}
