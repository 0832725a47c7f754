//! One daemon connection on the hub: upgrade and auth, `hello` checks, then
//! the session proper: [`machine`] decides (catch-up, live, uploads, limits,
//! timeouts) and [`driver`] performs (socket reader, writer task, store calls).

mod driver;
pub(crate) mod machine;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use super::auth::Grant;
use super::live::Live;
use super::registry::Seat;
use super::store::types::{is_strict_type, STRICT_TYPES};
use super::store::StoreError;
use super::stream::HubStream;
use super::HubInner;
use crate::counted::Counted;
use crate::http::Prefixed;
use crate::local::schema::fingerprint;
use crate::metrics::StoreOp;
use crate::proto::{
    self, Access, ClientFrame, ErrorCode, ErrorFrame, Hello, HubFrame, TableSchema, Welcome,
    DATASET_HEADER, MAX_FRAME_BYTES, PROTOCOL_VERSION,
};
use machine::{Machine, Params, Refusal};

/// Time allowed for the WebSocket upgrade and for the `hello` frame.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type Ws = WebSocketStream<Counted<Prefixed<HubStream>>>;

pub fn ws_config() -> WebSocketConfig {
    let mut c = WebSocketConfig::default();
    c.max_message_size = Some(MAX_FRAME_BYTES);
    c.max_frame_size = Some(MAX_FRAME_BYTES);
    c
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        let code = match e {
            StoreError::SchemaMismatch { .. }
            | StoreError::SchemaChanged { .. }
            | StoreError::SchemaRetired { .. } => ErrorCode::SchemaMismatch,
            StoreError::NotRegistered { .. } => ErrorCode::Forbidden,
            StoreError::IdentityRefused { .. } => ErrorCode::IdentityRefused,
            StoreError::IdentityConflict(_) => ErrorCode::IdentityConflict,
            StoreError::BadSequence(_) => ErrorCode::BadSequence,
            StoreError::Backend(_) => ErrorCode::Internal,
        };
        Refusal::new(code, e.to_string())
    }
}

fn close_code(code: ErrorCode) -> CloseCode {
    match code {
        ErrorCode::MalformedFrame | ErrorCode::UnexpectedFrame => CloseCode::Protocol,
        ErrorCode::FrameTooLarge => CloseCode::Size,
        ErrorCode::Internal => CloseCode::Error,
        ErrorCode::ShuttingDown => CloseCode::Away,
        _ => CloseCode::Policy,
    }
}

/// The error frame and the close frame that end a refused session.
fn refusal_messages(r: &Refusal) -> [Message; 2] {
    let frame = HubFrame::Error(ErrorFrame {
        code: r.code,
        message: r.message.clone(),
    });
    let reason: String = r.message.chars().take(100).collect();
    [
        Message::Binary(proto::encode(&frame).into()),
        Message::Close(Some(CloseFrame {
            code: close_code(r.code),
            reason: reason.into(),
        })),
    ]
}

/// Refuses a session before it started, within [`HANDSHAKE_TIMEOUT`].
async fn refuse(ws: &mut Ws, r: Refusal) {
    let send = async {
        for m in refusal_messages(&r) {
            ws.send(m).await?;
        }
        Ok::<(), tokio_tungstenite::tungstenite::Error>(())
    };
    let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, send).await;
}

fn http_error(status: StatusCode, message: &str) -> ErrorResponse {
    let mut resp = ErrorResponse::new(Some(format!("{message}\n")));
    *resp.status_mut() = status;
    resp
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
}

pub async fn serve(
    inner: Arc<HubInner>,
    stream: Prefixed<HubStream>,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let mut grant: Option<Grant> = None;
    let live = inner.live();
    // The error type is tungstenite's HTTP response; its size is not ours to choose.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let Some(g) = live.tokens.check(auth) else {
            inner.metrics.refused("unauthorized");
            return Err(http_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized: missing or unknown bearer token",
            ));
        };
        if let Some(ds) = req
            .headers()
            .get(DATASET_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            if !g.allows(ds) {
                inner.metrics.refused("forbidden");
                return Err(http_error(
                    StatusCode::FORBIDDEN,
                    &format!(
                        "forbidden: token {:?} is not valid for dataset {ds:?}",
                        g.name
                    ),
                ));
            }
        }
        grant = Some(g.clone());
        Ok(resp)
    };
    // Bytes written are counted: a client on a slow link that keeps taking
    // data is never taken for one that stopped reading.
    let (stream, progress) = Counted::new(stream);
    let upgrade =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config()));
    let mut ws = match tokio::time::timeout(HANDSHAKE_TIMEOUT, upgrade).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "upgrade refused or failed");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "upgrade timed out");
            return;
        }
    };
    let grant = grant.expect("BUG: upgrade succeeded without a grant");
    drop(live);
    let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_hello(&mut ws)).await {
        Ok(Ok(h)) => h,
        Ok(Err(r)) => {
            tracing::warn!(%peer, token = %grant.name, code = r.code.as_str(), "{}", r.message);
            inner.metrics.refused(r.code.as_str());
            refuse(&mut ws, r).await;
            return;
        }
        Err(_) => {
            inner.metrics.refused(ErrorCode::UnexpectedFrame.as_str());
            refuse(
                &mut ws,
                Refusal::new(ErrorCode::UnexpectedFrame, "no hello within 10s"),
            )
            .await;
            return;
        }
    };
    // Names chosen by the client are logged quoted and escaped (`?`): a
    // newline in one cannot forge a log line.
    let span =
        tracing::info_span!("session", dataset = ?hello.dataset, client = ?hello.client_id, %peer);
    let opened =
        tracing::Instrument::instrument(open(&inner, hello, &grant, peer), span.clone()).await;
    let opened = match opened {
        Ok(o) => o,
        Err(r) => {
            {
                let _g = span.enter();
                tracing::warn!(code = r.code.as_str(), "{}", r.message);
            }
            inner.metrics.refused(r.code.as_str());
            refuse(&mut ws, r).await;
            return;
        }
    };
    tracing::Instrument::instrument(driver::run(inner, ws, progress, opened, shutdown), span).await;
}

/// A session whose `hello` was accepted.
struct Opened {
    dataset: String,
    client: String,
    echo_own: bool,
    /// The tables declared by `hello`, shared with every store task.
    tables: Arc<HashMap<String, TableSchema>>,
    machine: Machine,
    /// The actions of the machine's start (`welcome`, first page).
    start: Vec<machine::Action>,
    /// Subscribed before the catch-up starts, so no batch falls between.
    live: tokio::sync::broadcast::Receiver<Arc<super::fanout::Published>>,
    /// The identity's place in the registry, left when the session ends.
    registration: super::registry::Registration,
}

/// Checks `hello` against the hub's configuration and the grant, registers
/// the tables' schemas and starts the session's machine.
async fn open(
    inner: &Arc<HubInner>,
    hello: Hello,
    grant: &Grant,
    peer: SocketAddr,
) -> Result<Opened, Refusal> {
    check_hello(&inner.live(), &hello, grant)?;
    let store = inner.store.clone();
    let (ds, tables, client) = (
        hello.dataset.clone(),
        hello.tables.clone(),
        hello.client_id.clone(),
    );
    let key = hello.client_key.clone();
    let (cursor, anchor) = (hello.cursor, hello.anchor.clone());
    // Only a read_write token registers tables (or marks them STRICT): a
    // read_only one cannot fix the schema legitimate devices must match.
    let may_register = grant.access == Access::ReadWrite;
    let t0 = std::time::Instant::now();
    let fanout = inner.clone();
    let (head, client_seq, diverged) = blocking(move || {
        let head = store.head(&ds)?;
        let diverged = history_diverged(&*store, &ds, head, cursor, anchor.as_ref())?;
        if diverged.is_some() {
            return Ok((head, 0, diverged));
        }
        register(&fanout, &ds, &client, &tables, may_register)?;
        let client_seq = store.claim_identity(&ds, &client, &key)?;
        Ok((head, client_seq, None))
    })
    .await?;
    if let Some(why) = diverged {
        inner.metrics.refused(ErrorCode::HistoryDiverged.as_str());
        return Err(Refusal::new(ErrorCode::HistoryDiverged, why));
    }
    inner
        .metrics
        .store_time(StoreOp::open_session, t0.elapsed());
    // Not past the head: `history_diverged` refused that.
    let cursor = hello.cursor;
    // The key matched: this session is the identity's from now on.
    let tables: Vec<String> = hello.tables.iter().map(|t| t.name.clone()).collect();
    let seat = Seat::new(
        &hello.dataset,
        &hello.client_id,
        &grant.sha256,
        &grant.name,
        grant.access,
        tables.clone(),
        peer,
        cursor,
    );
    let (registration, replaced) = inner.sessions.register(seat);
    if replaced {
        tracing::warn!("another connection of this client was live: it is told to end and this one takes over (a stale connection of the same device, or two devices running copies of one database file)");
    }
    // A reload between the token check and the registration above did not
    // see this session: it checks itself against the config in force now.
    if let Err((code, message)) = inner.live().verdict(
        &grant.sha256,
        &grant.name,
        grant.access,
        &hello.dataset,
        &tables,
    ) {
        return Err(Refusal::new(code, message));
    }
    // Subscribe before catching up so no batch falls between the two.
    let live = inner.fanout.dataset(&hello.dataset).tx.subscribe();
    tracing::info!(cursor, head, subscribe = hello.subscribe, "session started");
    let params = Params {
        client: Arc::from(hello.client_id.as_str()),
        access: grant.access,
        echo_own: hello.echo_own,
        subscribe: hello.subscribe,
        tables: tables.into_iter().collect(),
        read_timeout: inner.read_timeout,
    };
    inner
        .fanout
        .dataset(&hello.dataset)
        .head
        .fetch_max(head, std::sync::atomic::Ordering::SeqCst);
    let welcome = Welcome {
        protocol: PROTOCOL_VERSION,
        head,
        access: grant.access,
        client_seq,
        features: vec![crate::proto::FEATURE_HEAD.to_owned()],
    };
    let (machine, start) = Machine::start(params, welcome, cursor, std::time::Instant::now());
    Ok(Opened {
        dataset: hello.dataset,
        client: hello.client_id,
        echo_own: hello.echo_own,
        tables: Arc::new(
            hello
                .tables
                .into_iter()
                .map(|t| (t.name.clone(), t))
                .collect(),
        ),
        machine,
        start,
        live,
        registration,
    })
}

/// Registers the tables of a `hello` under the dataset's apply lock: rows
/// that an accepted breaking change writes again are published like an
/// upload's, in order with them.
fn register(
    inner: &HubInner,
    dataset: &str,
    client: &str,
    tables: &[TableSchema],
    may_register: bool,
) -> Result<(), StoreError> {
    let fan = inner.fanout.dataset(dataset);
    let _lock = fan.apply_lock.lock().expect("BUG: poisoned");
    let rewritten = inner
        .store
        .register_schema(dataset, client, tables, may_register)?;
    if let (Some(first), Some(last)) = (rewritten.first(), rewritten.last()) {
        let breaking = tables
            .iter()
            .filter(|t| rewritten.iter().any(|e| e.change.table == t.name))
            .cloned()
            .collect();
        let p = super::fanout::Published {
            after: first.change.version - 1,
            last: last.change.version,
            stored: std::time::Instant::now(),
            entries: rewritten,
            breaking,
        };
        fan.head
            .fetch_max(p.last, std::sync::atomic::Ordering::SeqCst);
        let _ = fan.tx.send(Arc::new(p));
    }
    Ok(())
}

/// Whether the hub's log still holds the history the client has seen: its
/// cursor is not past the head, and the change of its anchor is the one the
/// log holds at that number. A store restored from a backup fails one or
/// the other (sequence numbers handed out again mean other changes).
fn history_diverged(
    store: &dyn super::store::HubStore,
    dataset: &str,
    head: u64,
    cursor: u64,
    anchor: Option<&crate::proto::Anchor>,
) -> Result<Option<String>, StoreError> {
    if cursor > head {
        return Ok(Some(format!(
            "this client holds the dataset up to change {cursor}, but the hub's log ends at {head}: the hub's store went back in time (restored from a backup?); the client downloads the dataset again and sends its rows, so that nothing is lost"
        )));
    }
    if let Some(a) = anchor {
        if a.version > head
            || store.log_digest(dataset, a.version)?.as_deref() != Some(a.digest.as_str())
        {
            return Ok(Some(format!(
                "change {} of the hub's log is not the one this client received: the hub's store went back in time and handed its numbers out again (restored from a backup?); the client downloads the dataset again and sends its rows, so that nothing is lost",
                a.version
            )));
        }
    }
    Ok(None)
}

/// The checks of `hello` that need no store.
fn check_hello(live: &Live, hello: &Hello, grant: &Grant) -> Result<(), Refusal> {
    if hello.protocol != PROTOCOL_VERSION {
        return Err(Refusal::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {} is not supported; this hub speaks {PROTOCOL_VERSION}",
                hello.protocol
            ),
        ));
    }
    let Some(declared) = live.datasets.get(&hello.dataset) else {
        return Err(Refusal::new(
            ErrorCode::UnknownDataset,
            format!("dataset {:?} is not declared on the hub; add a [[dataset]] to hub.toml or fix `dataset` in tether.toml", hello.dataset),
        ));
    };
    if !grant.allows(&hello.dataset) {
        return Err(Refusal::new(
            ErrorCode::Forbidden,
            format!(
                "token {:?} is not valid for dataset {:?}",
                grant.name, hello.dataset
            ),
        ));
    }
    if hello.client_id.is_empty()
        || hello.client_id.len() > 128
        || hello.client_id.chars().any(char::is_control)
    {
        return Err(Refusal::new(
            ErrorCode::MalformedFrame,
            "client_id must be 1 to 128 characters, none of them a control character",
        ));
    }
    for t in &hello.tables {
        if !declared.contains(&t.name) {
            return Err(Refusal::new(
                ErrorCode::UnknownTable,
                format!("table {:?} is not declared by dataset {:?} on the hub; add it to the dataset's `tables` in hub.toml or remove it from tether.toml", t.name, hello.dataset),
            ));
        }
        let valid_shape = t.columns.len() == t.types.len()
            && !t.pk.is_empty()
            && t.pk.iter().all(|&i| (i as usize) < t.columns.len());
        if !valid_shape || fingerprint(&t.name, &t.columns, &t.types, &t.pk) != t.fingerprint {
            return Err(Refusal::new(
                ErrorCode::MalformedFrame,
                format!(
                    "table {:?}: schema description is inconsistent with its fingerprint",
                    t.name
                ),
            ));
        }
        if let Some((c, ty)) = t
            .columns
            .iter()
            .zip(&t.types)
            .find(|(_, ty)| t.strict && !is_strict_type(ty))
        {
            return Err(Refusal::new(
                ErrorCode::MalformedFrame,
                format!(
                    "table {:?} is announced STRICT but column {c:?} is declared {ty:?}; a STRICT table declares each column {}",
                    t.name,
                    STRICT_TYPES.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

async fn read_hello(ws: &mut Ws) -> Result<Hello, Refusal> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                return match proto::decode::<ClientFrame>(&b) {
                    Ok(ClientFrame::Hello(h)) => Ok(h),
                    Ok(_) => Err(Refusal::new(
                        ErrorCode::UnexpectedFrame,
                        "the first frame must be hello",
                    )),
                    Err(e) => Err(Refusal::new(ErrorCode::MalformedFrame, e.to_string())),
                }
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Text(_))) => {
                return Err(Refusal::new(
                    ErrorCode::MalformedFrame,
                    "text message; frames are binary MessagePack",
                ))
            }
            Some(Ok(_)) | None => {
                return Err(Refusal::new(
                    ErrorCode::UnexpectedFrame,
                    "connection closed before hello",
                ))
            }
            Some(Err(e)) => return Err(Refusal::new(ErrorCode::MalformedFrame, e.to_string())),
        }
    }
}
