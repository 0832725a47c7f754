//! The local database side: schema and capture triggers ([`schema`]), the
//! sync bookkeeping ([`replica`]), the hub's answers to uploads and the
//! conflicts they settle ([`conflict`]), the hub's changes ([`remote`]) and
//! those the database refused ([`held`]), the thread that owns the connection
//! ([`LocalDb`]) and the file watcher that notices the app's commits ([`watch`]).

mod conflict;
mod evolve;
pub mod held;
pub mod identity;
mod remote;
pub mod replica;
pub mod schema;
pub mod watch;

use std::path::PathBuf;

use tokio::sync::{mpsc, oneshot};

pub use held::{HeldChange, RemoteApplied, RetryReport};
pub use replica::{Batch, LocalError, Pending, Replica, ResultsApplied};

use crate::config::ConflictPolicy;

/// Bound of the queue of calls waiting for the database thread.
const CALL_QUEUE: usize = 64;

type Call = Box<dyn FnOnce(&mut Replica) + Send>;

enum Msg {
    Call(Call),
    /// Drop the connection and the database lock now, even if handles remain.
    Close,
}

/// Handle to the thread that owns one database's SQLite connection.
///
/// SQLite calls block, so they never run on the async runtime: each database
/// gets its own thread and async code sends it closures through a bounded
/// queue, getting the result back on a oneshot channel.
#[derive(Clone)]
pub struct LocalDb {
    tx: mpsc::Sender<Msg>,
    name: String,
    /// Calls that found the app holding the write lock past the busy timeout
    /// and were tried again (see [`LocalDb::call_patient`]).
    busy_waits: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// The database thread is gone (it panicked or the handle outlived it).
#[derive(Debug, thiserror::Error)]
#[error("database {0}: the database thread stopped")]
pub struct ThreadGone(String);

impl LocalDb {
    /// Starts the thread, opens the database and installs capture.
    pub async fn open(
        name: String,
        path: PathBuf,
        tables: Vec<(String, ConflictPolicy)>,
    ) -> Result<LocalDb, LocalError> {
        let (tx, mut rx) = mpsc::channel::<Msg>(CALL_QUEUE);
        let (ready_tx, ready_rx) = oneshot::channel();
        let thread_name = format!("tether-db-{name}");
        let db_name = name.clone();
        std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                let mut replica = match Replica::open(&db_name, &path, &tables) {
                    Ok(r) => {
                        let _ = ready_tx.send(Ok(()));
                        r
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Some(Msg::Call(call)) = rx.blocking_recv() {
                    call(&mut replica);
                }
            })
            .expect("BUG: cannot spawn a database thread");
        match ready_rx.await {
            Ok(Ok(())) => Ok(LocalDb {
                tx,
                name,
                busy_waits: Default::default(),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => panic!("BUG: database thread for {name} died while opening"),
        }
    }

    /// Runs `f` on the database thread and returns its result.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Replica) -> R + Send + 'static,
    ) -> Result<R, ThreadGone> {
        let (tx, rx) = oneshot::channel();
        let call: Call = Box::new(move |r| {
            let _ = tx.send(f(r));
        });
        self.tx
            .send(Msg::Call(call))
            .await
            .map_err(|_| ThreadGone(self.name.clone()))?;
        rx.await.map_err(|_| ThreadGone(self.name.clone()))
    }

    /// Like [`LocalDb::call`], for calls that write: while the app holds the
    /// database's write lock longer than [`replica::BUSY_TIMEOUT`], the call
    /// is tried again for up to `patience` instead of failing. A busy app is
    /// no reason to drop the hub connection; its write lock is released
    /// sooner or later.
    pub async fn call_patient<R, F>(
        &self,
        f: F,
        patience: std::time::Duration,
    ) -> Result<Result<R, LocalError>, ThreadGone>
    where
        R: Send + 'static,
        F: Fn(&mut Replica) -> Result<R, LocalError> + Send + Sync + 'static,
    {
        let f = std::sync::Arc::new(f);
        let start = std::time::Instant::now();
        loop {
            let g = f.clone();
            match self.call(move |r| g(r)).await? {
                Err(e) if e.is_busy() && start.elapsed() < patience => {
                    self.busy_waits
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(db = %self.name, waited = ?start.elapsed(), "the app holds the database's write lock; trying again");
                }
                other => return Ok(other),
            }
        }
    }

    /// How many calls waited for the app's write lock and were tried again.
    pub fn busy_waits(&self) -> u64 {
        self.busy_waits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Closes the database (and releases its lock) once the calls queued
    /// before are done; later calls fail with [`ThreadGone`].
    pub async fn close(&self) {
        let _ = self.tx.send(Msg::Close).await;
        // Wait until the thread has let go: the channel closes with it.
        self.tx.closed().await;
    }
}
