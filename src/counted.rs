//! A socket wrapper that counts the bytes the kernel accepted for sending,
//! so that both ends can tell a slow peer (bytes still move) from one that
//! takes nothing.
//!
//! A frame can be megabytes: on a slow link (a field device on a weak
//! cellular connection) writing one may take longer than `read_timeout`
//! while the peer reads all along. A deadline per frame would drop such a
//! peer and resend the same frame forever; a deadline on *progress* drops
//! only a peer that stopped reading.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// How often a pending send looks at the byte count.
const CHECK: Duration = Duration::from_millis(500);

/// Shared counts of the bytes written and read through a [`Counted`]
/// stream.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    written: Arc<AtomicU64>,
    read: Arc<AtomicU64>,
}

impl Progress {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Bytes read so far (a frame still arriving counts: the peer is alive).
    pub fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }
}

/// A stream whose writes are counted into a [`Progress`].
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    progress: Progress,
}

impl<S> Counted<S> {
    pub fn new(inner: S) -> (Counted<S>, Progress) {
        let progress = Progress::default();
        (
            Counted {
                inner,
                progress: progress.clone(),
            },
            progress,
        )
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        this.progress.read.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            this.progress
                .written
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The peer took no byte for the given time.
#[derive(Debug)]
pub struct Stalled(pub Duration);

/// Runs `send` to completion unless no byte is written through `progress`
/// for `limit`.
pub async fn unless_stalled<F: Future>(
    send: F,
    progress: &Progress,
    limit: Duration,
) -> Result<F::Output, Stalled> {
    tokio::pin!(send);
    let mut seen = progress.written();
    let mut since = Instant::now();
    let mut check = tokio::time::interval(CHECK.min(limit));
    loop {
        tokio::select! {
            out = &mut send => return Ok(out),
            _ = check.tick() => {
                let now = progress.written();
                if now != seen {
                    (seen, since) = (now, Instant::now());
                } else if since.elapsed() >= limit {
                    return Err(Stalled(since.elapsed()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_slow_reader_is_not_stalled_and_one_that_reads_nothing_is() {
        // A pipe with a 1 KiB buffer: a 64 KiB write needs the reader.
        let (a, mut b) = tokio::io::duplex(1024);
        let (mut w, progress) = Counted::new(a);
        let slow_reader = tokio::spawn(async move {
            let mut buf = [0u8; 256];
            let mut total = 0;
            while total < 64 * 1024 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                total += tokio::io::AsyncReadExt::read(&mut b, &mut buf)
                    .await
                    .unwrap();
            }
            b
        });
        // The whole write takes over a second, far over the limit, yet
        // bytes move all along.
        let data = vec![7u8; 64 * 1024];
        let r = unless_stalled(w.write_all(&data), &progress, Duration::from_millis(300)).await;
        assert!(matches!(r, Ok(Ok(()))), "{r:?}");
        assert_eq!(progress.written(), 64 * 1024);
        let mut b = slow_reader.await.unwrap();
        // Bytes read are counted too: a frame still arriving shows life.
        b.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        tokio::io::AsyncReadExt::read_exact(&mut w, &mut got)
            .await
            .unwrap();
        assert_eq!(progress.read(), 5);
        // Now nobody reads: the next write stalls.
        let r = unless_stalled(w.write_all(&data), &progress, Duration::from_millis(300)).await;
        assert!(r.is_err(), "{r:?}");
    }
}
