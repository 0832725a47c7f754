//! A socket wrapper that counts the bytes the kernel accepted for sending,
//! so that both ends can tell a slow peer (bytes still move) from one that
//! takes nothing.
//!
//! A frame can be megabytes: on a slow link (a field device on a weak
//! cellular connection) writing one may take longer than `read_timeout`
//! while the peer reads all along. A deadline per frame would drop such a
//! peer and resend the same frame forever; a deadline on *progress* drops
//! only a peer that stopped reading.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_written_and_read_are_counted() {
        // A pipe with a 1 KiB buffer: the 64 KiB write completes only as the
        // other end reads, and every byte is counted once.
        let (a, mut b) = tokio::io::duplex(1024);
        let (mut w, progress) = Counted::new(a);
        let peer = tokio::spawn(async move {
            let mut got = vec![0u8; 64 * 1024];
            b.read_exact(&mut got).await.unwrap();
            b.write_all(b"hello").await.unwrap();
            b
        });
        w.write_all(&vec![7u8; 64 * 1024]).await.unwrap();
        assert_eq!(progress.written(), 64 * 1024);
        let _b = peer.await.unwrap();
        let mut got = [0u8; 5];
        w.read_exact(&mut got).await.unwrap();
        assert_eq!((progress.read(), progress.written()), (5, 64 * 1024));
    }
}
