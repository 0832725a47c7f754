//! The hub: accepts daemon connections, authenticates them, applies their
//! uploads to the store and fans applied changes out to every other session of
//! the dataset.
//!
//! Tasks:
//!
//! * one accept loop ([`Hub::run`]) that never waits for a place: a new
//!   connection takes one among the unauthenticated ones, closing the one
//!   that waited longest when that budget is full ([`budget`]); once its
//!   request presents a valid token it takes a session's place and one of
//!   its token's (full: answered 503 or 429), and its reads are metered;
//! * per connection, the session's driver (`session::serve`, or a plain HTTP
//!   answer for `/metrics` and `/healthz`). After the upgrade and `hello`
//!   checks (the client key must match the one that claimed the client
//!   id), the session takes its identity's place in the registry, ending an
//!   older session of the same identity (`registry.rs`). Its loop waits on
//!   the socket's read half, on the replacement signal, on the dataset's
//!   broadcast of applied batches ([`fanout::FANOUT_BUFFER`] batches, then
//!   it lags and reads from the store), on writing the frames that wait for
//!   the client ([`crate::outgoing`]: at most 4, the machine stops preparing
//!   catch-up or live frames past 4 MiB waiting), on its store tasks, on its
//!   deadlines and on shutdown. Its decisions are made by an I/O-free state
//!   machine (`session/machine.rs`). Writes are polled in the same `select!`
//!   as reads and a send is never awaited alone, so it keeps reading and
//!   answering uploads however slow the client is; a client that takes no
//!   byte for `read_timeout` while frames wait is dropped;
//! * store calls on blocking threads (`spawn_blocking`): per session one
//!   page read and one upload apply at a time; uploads wait in order (the
//!   session stops reading past 8 unanswered batches).

//!
//! `hub.toml`'s datasets, tokens and certificate can be reloaded while the
//! hub runs ([`reload`]; they live in [`live::Live`]), and a local admin
//! socket ([`admin`]) shows datasets, clients and tokens and triggers reloads.

pub mod admin;
pub mod auth;
pub mod budget;
pub mod fanout;
mod live;
mod registry;
pub mod reload;
pub mod schema;
pub(crate) mod session;
pub mod store;
mod stream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::{HubConfig, StoreUrl};
use crate::http::{self, Head, Prefixed, Reply};
use crate::listen;
use crate::metrics::HubMetrics;
use budget::{Budget, Expiry, Unauthenticated};
use fanout::Fanout;
use store::{sqlite::SqliteStore, HubStore, StoreError};
use stream::HubStream;

/// Time a client has to complete the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Fault injection for tests; all off by default.
#[doc(hidden)]
#[derive(Default)]
pub struct Faults {
    /// Number of upload results to drop by cutting the connection right after
    /// the batch was applied (simulates a lost acknowledgement).
    pub drop_upload_results: AtomicU32,
}

pub(crate) struct HubInner {
    /// Datasets, tokens and TLS: replaced by a reload.
    live: RwLock<Arc<live::Live>>,
    /// The file the hub was started from, for reloads.
    config_path: OnceLock<PathBuf>,
    /// Serializes reloads.
    reloading: tokio::sync::Mutex<()>,
    store: Arc<dyn HubStore>,
    fanout: Fanout,
    /// The live session of each identity.
    sessions: Arc<registry::Registry>,
    read_timeout: Duration,
    faults: Arc<Faults>,
    metrics: Arc<HubMetrics>,
    /// Whether `/metrics` is served.
    expose_metrics: bool,
    /// What connections, tokens and sessions may take (`[limits]`).
    budget: Arc<Budget>,
}

/// Why a hub cannot start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// A configured hub, ready to serve a listener.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

impl HubInner {
    /// The datasets, tokens and TLS in force now.
    fn live(&self) -> Arc<live::Live> {
        self.live.read().expect("BUG: poisoned").clone()
    }
}

impl Hub {
    /// Opens the configured store and reads the TLS certificate, if any.
    pub fn open(cfg: &HubConfig) -> Result<Hub, OpenError> {
        let live = live::Live::new(cfg)?;
        let store: Arc<dyn HubStore> = match cfg.store_url().map_err(StoreError::Backend)? {
            StoreUrl::Sqlite(path) => Arc::new(SqliteStore::open(&path)?),
        };
        Ok(Hub::build(cfg, store, live))
    }

    /// Whether connections are served over TLS.
    pub fn serves_tls(&self) -> bool {
        self.inner.live().tls.is_some()
    }

    /// Remembers the file the config came from: [`Hub::reload`] reads it.
    pub fn set_config_path(&self, path: PathBuf) {
        let _ = self.inner.config_path.set(path);
    }

    /// Reads the config file again and applies what can change live
    /// (datasets, tokens, TLS certificate); see [`reload`]. An invalid file
    /// is refused as a whole and the current config stays.
    pub async fn reload(&self) -> Result<reload::ReloadReport, reload::ReloadError> {
        reload::reload_from_file(&self.inner).await
    }

    /// A hub on `store`, without TLS (for tests and embedding).
    pub fn with_store(cfg: &HubConfig, store: Arc<dyn HubStore>) -> Hub {
        let mut plain = cfg.clone();
        plain.tls_cert = None;
        plain.tls_key = None;
        let live = live::Live::new(&plain).expect("BUG: no TLS files to read");
        Hub::build(cfg, store, live)
    }

    fn build(cfg: &HubConfig, store: Arc<dyn HubStore>, live: live::Live) -> Hub {
        let metrics = Arc::new(HubMetrics::new());
        for d in &cfg.datasets {
            metrics.declare_dataset(&d.name);
        }
        Hub {
            inner: Arc::new(HubInner {
                live: RwLock::new(Arc::new(live)),
                config_path: OnceLock::new(),
                reloading: tokio::sync::Mutex::new(()),
                store,
                fanout: Fanout::default(),
                sessions: Arc::default(),
                read_timeout: cfg.read_timeout.0,
                faults: Arc::new(Faults::default()),
                metrics: metrics.clone(),
                expose_metrics: cfg.metrics,
                budget: Arc::new(Budget::new(cfg.limits.clone(), metrics.clone())),
            }),
        }
    }

    #[doc(hidden)]
    pub fn faults(&self) -> Arc<Faults> {
        self.inner.faults.clone()
    }

    /// The hub's metrics (what `/metrics` shows).
    pub fn metrics(&self) -> Arc<HubMetrics> {
        self.inner.metrics.clone()
    }

    /// Serves `listener` until `shutdown` is cancelled, then closes every
    /// session with a "going away" close frame and waits for them.
    pub async fn run(&self, listener: TcpListener, shutdown: CancellationToken) {
        let limits = self.inner.budget.limits();
        // A bound on file descriptors only: the budgets close connections
        // well before it (evicted ones may take a moment to end).
        let max = limits.max_sessions + 2 * limits.max_unauthenticated;
        let accept = |tcp: TcpStream, peer: SocketAddr| {
            // Taken in the accept loop itself: where the budget is full, the
            // connection that waited longest is told to close right now.
            let pending = self.inner.budget.admit(peer.ip());
            connection(self.inner.clone(), tcp, peer, pending, shutdown.clone())
        };
        listen::serve(listener, max, "hub", &shutdown, accept).await;
    }
}

/// How a step of an unauthenticated connection ended.
enum Step<T> {
    Done(T),
    Expired(Expiry),
    Shutdown,
}

/// Runs `f` until it ends, the connection's unauthenticated time runs out,
/// or the hub shuts down.
async fn step<T>(
    pending: &Unauthenticated,
    shutdown: &CancellationToken,
    f: impl std::future::Future<Output = T>,
) -> Step<T> {
    tokio::select! {
        v = f => Step::Done(v),
        e = pending.expired() => Step::Expired(e),
        _ = shutdown.cancelled() => Step::Shutdown,
    }
}

fn log_expired(peer: SocketAddr, e: Expiry, pending: &Unauthenticated) {
    match e {
        Expiry::Timeout => tracing::debug!(
            %peer,
            "no valid token presented within {:?} (unauthenticated_timeout); closing",
            pending.timeout()
        ),
        Expiry::Evicted(limit) => tracing::debug!(
            %peer,
            limit = ?limit,
            "closing a connection that has not presented a token: a newer one needed its place"
        ),
    }
}

/// One connection: TLS handshake and request head within the
/// unauthenticated budget, then a session (valid token) or a plain answer.
async fn connection(
    inner: Arc<HubInner>,
    tcp: TcpStream,
    peer: SocketAddr,
    pending: Unauthenticated,
    shutdown: CancellationToken,
) {
    // Taken now: a reload meanwhile serves its certificate to later ones.
    let tls = inner.live().tls.clone();
    let mut stream = match &tls {
        None => HubStream::plain(tcp),
        Some(tls) => {
            let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(tcp));
            match step(&pending, &shutdown, handshake).await {
                Step::Done(Ok(Ok(s))) => HubStream::tls(s),
                Step::Done(Ok(Err(e))) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    inner.metrics.refused("tls_handshake");
                    return;
                }
                Step::Done(Err(_)) => {
                    tracing::debug!(%peer, "no TLS handshake within {TLS_HANDSHAKE_TIMEOUT:?}");
                    inner.metrics.refused("tls_handshake");
                    return;
                }
                Step::Expired(e) => return log_expired(peer, e, &pending),
                Step::Shutdown => return,
            }
        }
    };
    let head = match step(&pending, &shutdown, http::read_request(&mut stream, peer)).await {
        Step::Done(Some(h)) => h,
        Step::Done(None) | Step::Shutdown => return,
        Step::Expired(e) => {
            log_expired(peer, e, &pending);
            if let Expiry::Evicted(limit) = e {
                let reply = Reply::text(
                    503,
                    format!("the hub has too many connections that have not presented a token ({limit:?} in the [limits] of hub.toml) and this one waited longest; retry\n"),
                );
                // Never waited for: a flood must not keep sockets open.
                let _ = http::respond(&mut stream, false, &reply).now_or_never();
            }
            return;
        }
    };
    if head.websocket {
        let grant = inner
            .live()
            .tokens
            .check(head.authorization.as_deref())
            .cloned();
        if let Some(grant) = grant {
            match pending.authenticate(&grant.name) {
                Ok(conn) => stream.attach(conn),
                Err(full) => {
                    tracing::warn!(%peer, token = ?grant.name, limit = ?full.limit, "{}", full.message);
                    let reply = Reply::text(full.status, format!("{}\n", full.message));
                    // A fresh socket takes a short answer at once.
                    let _ = http::respond(&mut stream, false, &reply).now_or_never();
                    return;
                }
            }
            let stream = Prefixed::new(head.raw, stream);
            return session::serve(inner, stream, peer, shutdown).await;
        }
        // No valid token: refused at the upgrade, within the
        // unauthenticated budget still.
        let stream = Prefixed::new(head.raw, stream);
        let serve = session::serve(inner.clone(), stream, peer, shutdown.clone());
        if let Step::Expired(e) = step(&pending, &shutdown, serve).await {
            log_expired(peer, e, &pending);
        }
        return;
    }
    let answer = http::answer(&mut stream, &head, plain(&inner, &head));
    if let Step::Expired(e) = step(&pending, &shutdown, answer).await {
        log_expired(peer, e, &pending);
    }
}

/// How long `/healthz` waits for the store to answer.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// Answers a request that is not a WebSocket upgrade.
async fn plain(inner: &Arc<HubInner>, head: &Head) -> Reply {
    match head.path.as_str() {
        "/metrics" if inner.expose_metrics => Reply {
            status: 200,
            content_type: crate::metrics::CONTENT_TYPE,
            body: inner.metrics.render(),
        },
        "/healthz" => {
            let store = inner.store.clone();
            let probe = inner.live().datasets.keys().next().cloned().unwrap_or_default();
            let read = tokio::task::spawn_blocking(move || store.head(&probe));
            match tokio::time::timeout(HEALTH_TIMEOUT, read).await {
                Ok(Ok(Ok(_))) => Reply::text(200, "ok\n"),
                Ok(Ok(Err(e))) => Reply::text(503, format!("store unavailable: {e}\n")),
                Ok(Err(e)) => Reply::text(503, format!("store check failed: {e}\n")),
                Err(_) => Reply::text(
                    503,
                    format!("store did not answer within {HEALTH_TIMEOUT:?}\n"),
                ),
            }
        }
        "/" => Reply::text(
            426,
            "this is a tether hub: daemons connect here with WebSocket; /healthz and /metrics answer plain GETs\n",
        ),
        _ => Reply::text(404, format!("nothing at {}\n", head.path)),
    }
}
