//! The few plain HTTP answers tether gives: `/metrics` and `/healthz`, on the
//! hub's WebSocket listener and on the daemon's optional `metrics_listen`.
//!
//! This is deliberately not a web framework: one request per connection, a
//! bounded request head parsed by `httparse`, an answer with a
//! `Content-Length`, then close. On the hub the request head is read first;
//! a WebSocket upgrade is handed on to tungstenite together with the bytes
//! already read ([`Prefixed`]), anything else is answered here.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Largest request head accepted (request line plus headers).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Time a client has to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed request head.
#[derive(Debug)]
pub struct Head {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Whether the client asks for a WebSocket upgrade.
    pub websocket: bool,
    /// The `Authorization` header, when there is one.
    pub authorization: Option<String>,
    /// Every byte read from the connection so far (the head, maybe more).
    pub raw: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("connection closed before a complete request head")]
    Closed,
    #[error("request head larger than {MAX_HEAD_BYTES} bytes")]
    TooLarge,
    #[error("malformed HTTP request: {0}")]
    Malformed(httparse::Error),
    #[error("reading the request: {0}")]
    Io(#[from] io::Error),
}

/// Reads until a complete request head has arrived.
pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Result<Head, HeadError> {
    let mut raw = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        raw.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&raw) {
            Ok(httparse::Status::Complete(_)) => {
                let websocket = req.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("upgrade")
                        && String::from_utf8_lossy(h.value)
                            .to_ascii_lowercase()
                            .contains("websocket")
                });
                let authorization = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("authorization"))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .map(str::to_owned);
                let target = req.path.unwrap_or("/");
                let path = target.split('?').next().unwrap_or("/").to_owned();
                return Ok(Head {
                    method: req.method.unwrap_or("").to_owned(),
                    path,
                    websocket,
                    authorization,
                    raw,
                });
            }
            Ok(httparse::Status::Partial) if raw.len() < MAX_HEAD_BYTES => continue,
            Ok(httparse::Status::Partial) => return Err(HeadError::TooLarge),
            Err(e) => return Err(HeadError::Malformed(e)),
        }
    }
}

/// An answer to a plain HTTP request.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Writes `reply` (without its body for HEAD) and shuts the connection down.
pub async fn respond<S: AsyncWrite + Unpin>(s: &mut S, head_only: bool, reply: &Reply) {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        reply.status,
        reason(reply.status),
        reply.content_type,
        reply.body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(reply.body.as_bytes());
    }
    // A client that went away has nothing left to be told.
    let _ = s.write_all(&out).await;
    let _ = s.shutdown().await;
}

/// Reads a request head within [`HEAD_TIMEOUT`]. A head that does not parse
/// is answered with 400 here; `None` then, or when the client sent nothing.
pub async fn read_request<S>(s: &mut S, peer: impl std::fmt::Display) -> Option<Head>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(HEAD_TIMEOUT, read_head(s)).await {
        Ok(Ok(h)) => Some(h),
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "unreadable request");
            respond(s, false, &Reply::text(400, format!("{e}\n"))).await;
            None
        }
        Err(_) => {
            tracing::info!(%peer, "no request within {HEAD_TIMEOUT:?}");
            None
        }
    }
}

/// Answers a plain request with `reply` (left unpolled for a method other
/// than GET or HEAD, which gets 405), then closes the connection.
pub async fn answer<S: AsyncWrite + Unpin>(
    s: &mut S,
    head: &Head,
    reply: impl Future<Output = Reply>,
) {
    let reply = if head.method == "GET" || head.method == "HEAD" {
        reply.await
    } else {
        Reply::text(405, "only GET and HEAD are served here\n")
    };
    respond(s, head.method == "HEAD", &reply).await;
}

/// Most metrics clients served at once.
const MAX_CLIENTS: usize = 64;

/// Serves plain HTTP on `listener` until `shutdown`: `route` answers each
/// request by its path. Used for the daemon's `metrics_listen`.
pub async fn serve<F, Fut>(listener: TcpListener, shutdown: CancellationToken, route: F)
where
    F: Fn(String) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Reply> + Send,
{
    let accept = |mut stream: TcpStream, peer: SocketAddr| {
        let route = route.clone();
        async move {
            if let Some(head) = read_request(&mut stream, peer).await {
                let reply = route(head.path.clone());
                answer(&mut stream, &head, reply).await;
            }
        }
    };
    crate::listen::serve(listener, MAX_CLIENTS, "metrics listener", &shutdown, accept).await;
}

/// A stream that first yields bytes already read from it.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Prefixed<S> {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }

    /// The stream the bytes come from after the prefix.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let rest = &this.prefix[this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_a_head_in_pieces_and_replays_it() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let req = b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: WebSocket\r\n\r\nrest";
        let writer = tokio::spawn(async move {
            for piece in req.chunks(7) {
                client.write_all(piece).await.unwrap();
            }
            client
        });
        let head = read_head(&mut server).await.unwrap();
        let _client = writer.await.unwrap();
        assert_eq!(head.method, "GET");
        assert_eq!(head.path, "/metrics");
        assert!(head.websocket);
        assert_eq!(head.authorization, None);
        let mut again = Prefixed::new(head.raw, server);
        let mut buf = vec![0u8; req.len()];
        again.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf[..], &req[..]);
    }

    #[tokio::test]
    async fn refuses_garbage_and_oversized_heads() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(b"\x00\x01garbage\r\n\r\n").await.unwrap();
        assert!(matches!(
            read_head(&mut server).await,
            Err(HeadError::Malformed(_))
        ));
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let mut big = b"GET / HTTP/1.1\r\nX-Filler: ".to_vec();
        big.resize(MAX_HEAD_BYTES + 100, b'a');
        let w = tokio::spawn(async move {
            let _ = client.write_all(&big).await;
            client
        });
        assert!(matches!(
            read_head(&mut server).await,
            Err(HeadError::TooLarge)
        ));
        drop(w);
    }
}
