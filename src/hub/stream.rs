//! What a hub connection runs over: plain TCP, or TLS when the hub has a
//! certificate (`tls_cert` and `tls_key` in `hub.toml`), and, once the
//! connection presented a valid token, its places in the hub's budgets
//! ([`Conn`]): every byte read is charged to them, and they are given back
//! when the connection is dropped.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::budget::Conn;

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

pub struct HubStream {
    io: Io,
    conn: Option<Arc<Conn>>,
}

impl HubStream {
    pub fn plain(s: TcpStream) -> HubStream {
        HubStream {
            io: Io::Plain(s),
            conn: None,
        }
    }

    pub fn tls(s: TlsStream<TcpStream>) -> HubStream {
        HubStream {
            io: Io::Tls(Box::new(s)),
            conn: None,
        }
    }

    /// From now on, bytes read are charged to `conn`.
    pub fn attach(&mut self, conn: Arc<Conn>) {
        self.conn = Some(conn);
    }

    /// The connection's budgets, once it presented a valid token.
    pub fn conn(&self) -> Option<&Arc<Conn>> {
        self.conn.as_ref()
    }
}

impl AsyncRead for HubStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.conn.as_ref().is_some_and(|c| c.tripped().is_some()) {
            return poll_discard(&mut this.io, cx);
        }
        let before = buf.filled().len();
        let r = match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if let (Poll::Ready(Ok(())), Some(conn)) = (&r, &this.conn) {
            let n = (buf.filled().len() - before) as u64;
            if let Err(why) = conn.charge(n) {
                return Poll::Ready(Err(io::Error::other(why)));
            }
        }
        r
    }
}

/// Past a limit, what the client still sends is read and dropped until it
/// closes (end of stream), so the connection's last frames are not lost to a
/// reset; nothing of it reaches the WebSocket.
fn poll_discard(io: &mut Io, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    let mut scratch = [0u8; 8192];
    // A client that keeps sending does not keep this task: after 128 KiB,
    // other tasks run first.
    for _ in 0..16 {
        let mut b = ReadBuf::new(&mut scratch);
        let r = match io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, &mut b),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, &mut b),
        };
        match r {
            Poll::Ready(Ok(())) if b.filled().is_empty() => return Poll::Ready(Ok(())),
            Poll::Ready(Ok(())) => continue,
            other => return other,
        }
    }
    cx.waker().wake_by_ref();
    Poll::Pending
}

impl AsyncWrite for HubStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
