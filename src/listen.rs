//! The accept loop shared by every listener tether runs: the hub's
//! WebSocket port, the daemon's control socket and its metrics address.
//!
//! One task per connection, at most `max` at once (more wait in the kernel's
//! backlog), a failed accept (out of file descriptors and the like) logged
//! and retried rather than ending the loop, and on shutdown no new
//! connections while the running ones are waited for.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Something connections are accepted from.
pub trait Listener {
    type Conn: Send + 'static;
    type Peer: Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Conn, Self::Peer)>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Conn = tokio::net::TcpStream;
    type Peer = std::net::SocketAddr;
    async fn accept(&self) -> io::Result<(Self::Conn, Self::Peer)> {
        let (s, peer) = tokio::net::TcpListener::accept(self).await?;
        // Frames are small and answered at once: no Nagle delay.
        let _ = s.set_nodelay(true);
        Ok((s, peer))
    }
}

impl Listener for tokio::net::UnixListener {
    type Conn = tokio::net::UnixStream;
    type Peer = tokio::net::unix::SocketAddr;
    async fn accept(&self) -> io::Result<(Self::Conn, Self::Peer)> {
        tokio::net::UnixListener::accept(self).await
    }
}

/// Accepts until `shutdown`, running `handle` on its own task for each
/// connection, then waits for those tasks. `what` names the listener in logs.
pub async fn serve<L, F, Fut>(
    listener: L,
    max: usize,
    what: &'static str,
    shutdown: &CancellationToken,
    handle: F,
) where
    L: Listener,
    F: Fn(L::Conn, L::Peer) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(max));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("BUG: semaphore closed"),
            _ = shutdown.cancelled() => break,
        };
        let (conn, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "{what}: accept failed");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let task = handle(conn, peer);
        tracker.spawn(async move {
            task.await;
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
}
