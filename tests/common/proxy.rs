//! A loopback TCP proxy that can black-hole traffic: connections stay open
//! but nothing passes, like a peer that vanished without a FIN.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub struct Proxy {
    pub addr: String,
    blackhole: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    /// Ends every connection's copying tasks when the proxy is dropped.
    stop: CancellationToken,
}

/// Runs `f` until it ends or the proxy is dropped.
fn spawn_until(
    stop: &CancellationToken,
    f: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let stop = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = f => {}
        }
    });
}

impl Proxy {
    /// Forwards 127.0.0.1:<new port> to `target`.
    pub async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let blackhole = Arc::new(AtomicBool::new(false));
        let bh = blackhole.clone();
        let stop = CancellationToken::new();
        let conns = stop.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&target).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                spawn_until(&conns, pump(cr, sw, bh.clone()));
                spawn_until(&conns, pump(sr, cw, bh.clone()));
            }
        });
        Proxy {
            addr,
            blackhole,
            task,
            stop,
        }
    }

    /// Forwards 127.0.0.1:<new port> to `target` like a link with almost no
    /// buffer: small socket buffers, and one direction at a time (while a
    /// chunk waits to be taken by one side, nothing is read from either).
    /// Two peers that each stop reading while they send wedge at once here,
    /// where loopback's megabytes of buffers would hide it for a while.
    pub async fn start_narrow(target: String) -> Proxy {
        Proxy::small(target, |client, server, conns| {
            spawn_until(conns, one_way_at_a_time(client, server));
        })
    }

    /// Forwards 127.0.0.1:<new port> to `target` at about `rate` bytes per
    /// second in each direction, like a slow cellular link: small socket
    /// buffers, so a large frame really takes its time.
    pub async fn start_slow(target: String, rate: usize) -> Proxy {
        Proxy::small(target, move |client, server, conns| {
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            spawn_until(conns, paced(cr, sw, rate));
            spawn_until(conns, paced(sr, cw, rate));
        })
    }

    /// A proxy whose sockets have small kernel buffers; `link` starts the
    /// copying of each accepted connection and its upstream.
    fn small(
        target: String,
        link: impl Fn(TcpStream, TcpStream, &CancellationToken) + Send + 'static,
    ) -> Proxy {
        let socket = small_buffers();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(16).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = CancellationToken::new();
        let conns = stop.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = small_buffers().connect(target.parse().unwrap()).await else {
                    continue;
                };
                link(client, server, &conns);
            }
        });
        Proxy {
            addr,
            blackhole: Arc::new(AtomicBool::new(false)),
            task,
            stop,
        }
    }

    /// From now on, bytes in either direction are read and dropped.
    pub fn black_hole(&self) {
        self.blackhole.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.stop.cancel();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    blackhole: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                if !blackhole.load(Ordering::SeqCst) {
                    let _ = to.shutdown().await;
                }
                // A black-holed peer never says goodbye: keep `to` open.
                std::future::pending::<()>().await;
                return;
            }
            Ok(n) => n,
        };
        if blackhole.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn one_way_at_a_time(mut client: TcpStream, mut server: TcpStream) {
    let (mut cb, mut sb) = (vec![0u8; 8 * 1024], vec![0u8; 8 * 1024]);
    loop {
        let done = tokio::select! {
            n = client.read(&mut cb) => match n {
                Ok(0) | Err(_) => true,
                Ok(n) => server.write_all(&cb[..n]).await.is_err(),
            },
            n = server.read(&mut sb) => match n {
                Ok(0) | Err(_) => true,
                Ok(n) => client.write_all(&sb[..n]).await.is_err(),
            },
        };
        if done {
            let _ = client.shutdown().await;
            let _ = server.shutdown().await;
            return;
        }
    }
}

/// Copies at most `rate / 20` bytes every 50 ms.
async fn paced(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    rate: usize,
) {
    let mut buf = vec![0u8; (rate / 20).max(1)];
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
    loop {
        tick.tick().await;
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A loopback socket with 16 KiB kernel buffers, so that little data fills
/// a link.
fn small_buffers() -> tokio::net::TcpSocket {
    const BUF: u32 = 16 * 1024;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(BUF).unwrap();
    socket.set_send_buffer_size(BUF).unwrap();
    socket
}
