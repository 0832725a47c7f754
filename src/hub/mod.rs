//! The hub: accepts daemon connections, authenticates them, applies their
//! uploads to the store and fans applied changes out to every other session of
//! the dataset.
//!
//! Tasks:
//!
//! * one accept loop ([`Hub::run`]), at most [`MAX_CONNECTIONS`] connections;
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

pub mod auth;
pub mod fanout;
mod registry;
mod session;
pub mod store;
mod stream;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::{HubConfig, StoreUrl};
use crate::http::{self, Head, Prefixed, Reply};
use crate::listen;
use crate::metrics::HubMetrics;
use auth::Tokens;
use fanout::Fanout;
use store::{sqlite::SqliteStore, HubStore, StoreError};
use stream::HubStream;

/// Time a client has to complete the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 4096;

/// Fault injection for tests; all off by default.
#[doc(hidden)]
#[derive(Default)]
pub struct Faults {
    /// Number of upload results to drop by cutting the connection right after
    /// the batch was applied (simulates a lost acknowledgement).
    pub drop_upload_results: AtomicU32,
}

pub(crate) struct HubInner {
    /// Declared tables per dataset.
    datasets: HashMap<String, HashSet<String>>,
    tokens: Tokens,
    store: Arc<dyn HubStore>,
    fanout: Fanout,
    /// The live session of each identity.
    sessions: Arc<registry::Registry>,
    read_timeout: Duration,
    faults: Arc<Faults>,
    metrics: Arc<HubMetrics>,
    /// Whether `/metrics` is served.
    expose_metrics: bool,
    /// TLS for every connection, when the hub has a certificate.
    tls: Option<tokio_rustls::TlsAcceptor>,
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

impl Hub {
    /// Opens the configured store and reads the TLS certificate, if any.
    pub fn open(cfg: &HubConfig) -> Result<Hub, OpenError> {
        let tls = match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(cert), Some(key)) => Some(tokio_rustls::TlsAcceptor::from(
                crate::tls::server_config(cert, key)?,
            )),
            _ => None,
        };
        let store: Arc<dyn HubStore> = match cfg.store_url().map_err(StoreError::Backend)? {
            StoreUrl::Sqlite(path) => Arc::new(SqliteStore::open(&path)?),
        };
        let mut hub = Hub::with_store(cfg, store);
        Arc::get_mut(&mut hub.inner)
            .expect("BUG: a new hub is not shared")
            .tls = tls;
        Ok(hub)
    }

    /// Whether connections are served over TLS.
    pub fn serves_tls(&self) -> bool {
        self.inner.tls.is_some()
    }

    pub fn with_store(cfg: &HubConfig, store: Arc<dyn HubStore>) -> Hub {
        let metrics = Arc::new(HubMetrics::new());
        for d in &cfg.datasets {
            metrics.declare_dataset(&d.name);
        }
        Hub {
            inner: Arc::new(HubInner {
                datasets: cfg
                    .datasets
                    .iter()
                    .map(|d| (d.name.clone(), d.tables.iter().cloned().collect()))
                    .collect(),
                tokens: Tokens::new(&cfg.tokens),
                store,
                fanout: Fanout::default(),
                sessions: Arc::default(),
                read_timeout: cfg.read_timeout.0,
                faults: Arc::new(Faults::default()),
                metrics,
                expose_metrics: cfg.metrics,
                tls: None,
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
        let accept = |tcp: TcpStream, peer: SocketAddr| {
            let inner = self.inner.clone();
            let shutdown = shutdown.clone();
            async move {
                let mut stream = match &inner.tls {
                    None => HubStream::Plain(tcp),
                    Some(tls) => {
                        let handshake =
                            tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(tcp));
                        let done = tokio::select! {
                            h = handshake => h,
                            _ = shutdown.cancelled() => return,
                        };
                        match done {
                            Ok(Ok(s)) => HubStream::Tls(Box::new(s)),
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                inner.metrics.refused("tls_handshake");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "no TLS handshake within {TLS_HANDSHAKE_TIMEOUT:?}");
                                inner.metrics.refused("tls_handshake");
                                return;
                            }
                        }
                    }
                };
                let head = tokio::select! {
                    h = http::read_request(&mut stream, peer) => h,
                    _ = shutdown.cancelled() => return,
                };
                match head {
                    Some(head) if head.websocket => {
                        let stream = Prefixed::new(head.raw, stream);
                        session::serve(inner, stream, peer, shutdown).await;
                    }
                    Some(head) => http::answer(&mut stream, &head, plain(&inner, &head)).await,
                    None => {}
                }
            }
        };
        listen::serve(listener, MAX_CONNECTIONS, "hub", &shutdown, accept).await;
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
            let probe = inner.datasets.keys().next().cloned().unwrap_or_default();
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
