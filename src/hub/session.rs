//! One daemon connection on the hub: upgrade and auth, `hello`, catch-up, then
//! the live loop (uploads in, applied changes of others out).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;

use crate::http::Prefixed;
use crate::metrics::{HubSessionMetrics, StoreOp};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use super::auth::Grant;
use super::fanout::Published;
use super::store::StoreError;
use super::HubInner;
use crate::local::schema::fingerprint;
use crate::proto::{
    self, Access, CaughtUp, Change, ChangeResult, Changes, ChangesRef, ClientFrame, ErrorCode,
    ErrorFrame, Hello, HubFrame, Outcome, RemoteChange, TableSchema, Upload, UploadResult,
    UploadSummary, Welcome, DATASET_HEADER, MAX_FRAME_BYTES, MAX_PAGE_BYTES, MAX_PAGE_CHANGES,
    PROTOCOL_VERSION,
};

/// Time allowed for the WebSocket upgrade and for the `hello` frame.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type Ws = WebSocketStream<Prefixed<TcpStream>>;

pub fn ws_config() -> WebSocketConfig {
    let mut c = WebSocketConfig::default();
    c.max_message_size = Some(MAX_FRAME_BYTES);
    c.max_frame_size = Some(MAX_FRAME_BYTES);
    c
}

/// Why a session ended early; sent as an error frame then a close.
struct Refusal {
    code: ErrorCode,
    message: String,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::SchemaMismatch { .. } => {
                Refusal::new(ErrorCode::SchemaMismatch, e.to_string())
            }
            StoreError::Backend(_) => Refusal::new(ErrorCode::Internal, e.to_string()),
        }
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

async fn send_frame(
    ws: &mut Ws,
    frame: &HubFrame,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    ws.send(Message::Binary(proto::encode(frame).into())).await
}

async fn refuse(ws: &mut Ws, r: Refusal) {
    let _ = send_frame(
        ws,
        &HubFrame::Error(ErrorFrame {
            code: r.code,
            message: r.message.clone(),
        }),
    )
    .await;
    let reason: String = r.message.chars().take(100).collect();
    let _ = ws
        .close(Some(CloseFrame {
            code: close_code(r.code),
            reason: reason.into(),
        }))
        .await;
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
    stream: Prefixed<TcpStream>,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let mut grant: Option<Grant> = None;
    // The error type is tungstenite's HTTP response; its size is not ours to choose.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let Some(g) = inner.tokens.check(auth) else {
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
    let span =
        tracing::info_span!("session", dataset = %hello.dataset, client = %hello.client_id, %peer);
    let session = Session {
        inner: inner.clone(),
        access: grant.access,
        dataset: hello.dataset.clone(),
        client: hello.client_id.clone(),
        echo_own: hello.echo_own,
        tables: Arc::default(),
        sent_up_to: hello.cursor,
        metrics: None,
    };
    let result = tracing::Instrument::instrument(
        session.run(&mut ws, hello, &grant, shutdown),
        span.clone(),
    )
    .await;
    if let Err(r) = result {
        let _g = span.enter();
        if r.code == ErrorCode::ShuttingDown {
            tracing::debug!("closing: hub shutting down");
        } else {
            tracing::warn!(code = r.code.as_str(), "{}", r.message);
            inner.metrics.refused(r.code.as_str());
        }
        refuse(&mut ws, r).await;
    }
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

struct Session {
    inner: Arc<HubInner>,
    access: Access,
    dataset: String,
    client: String,
    echo_own: bool,
    /// Declared by `hello`; shared with every store task of the session.
    tables: Arc<HashMap<String, TableSchema>>,
    /// Every change up to here was sent (or skipped as our own).
    sent_up_to: u64,
    /// Set once `hello` is accepted: the dataset is then a known label.
    metrics: Option<HubSessionMetrics>,
}

enum Event {
    Inbound(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
    Published(Result<Arc<Published>, RecvError>),
    ReadTimeout,
    Shutdown,
}

impl Session {
    async fn run(
        mut self,
        ws: &mut Ws,
        hello: Hello,
        grant: &Grant,
        shutdown: CancellationToken,
    ) -> Result<(), Refusal> {
        if hello.protocol != PROTOCOL_VERSION {
            return Err(Refusal::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "protocol version {} is not supported; this hub speaks {PROTOCOL_VERSION}",
                    hello.protocol
                ),
            ));
        }
        let Some(declared) = self.inner.datasets.get(&hello.dataset) else {
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
        if hello.client_id.is_empty() || hello.client_id.len() > 128 {
            return Err(Refusal::new(
                ErrorCode::MalformedFrame,
                "client_id must be 1 to 128 characters",
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
        }
        let store = self.inner.store.clone();
        let (ds, tables, client) = (
            self.dataset.clone(),
            hello.tables.clone(),
            self.client.clone(),
        );
        let t0 = std::time::Instant::now();
        let (head, client_seq) = blocking(move || {
            store.register_schema(&ds, &tables)?;
            Ok((store.head(&ds)?, store.client_seq(&ds, &client)?))
        })
        .await?;
        self.inner
            .metrics
            .store_time(StoreOp::open_session, t0.elapsed());
        self.metrics = Some(self.inner.metrics.session(&self.dataset));
        self.tables = Arc::new(
            hello
                .tables
                .into_iter()
                .map(|t| (t.name.clone(), t))
                .collect(),
        );
        if self.sent_up_to > head {
            tracing::warn!(cursor = self.sent_up_to, head, "client cursor is ahead of the hub (was the hub store restored?); sending from the hub's head");
            self.sent_up_to = head;
        }
        // Subscribe before catching up so no batch falls between the two.
        let mut live = self.inner.fanout.dataset(&self.dataset).tx.subscribe();
        self.send(
            ws,
            &HubFrame::Welcome(Welcome {
                protocol: PROTOCOL_VERSION,
                head,
                access: self.access,
                client_seq,
            }),
        )
        .await?;
        tracing::info!(
            cursor = self.sent_up_to,
            head,
            subscribe = hello.subscribe,
            "session started"
        );
        let subscribed = hello.subscribe;
        if subscribed {
            self.catch_up(ws).await?;
            self.send(
                ws,
                &HubFrame::CaughtUp(CaughtUp {
                    head: self.sent_up_to,
                }),
            )
            .await?;
        }

        let read_timeout = self.inner.read_timeout;
        let mut deadline = Instant::now() + read_timeout;
        loop {
            let ev = tokio::select! {
                m = ws.next() => Event::Inbound(m),
                p = live.recv(), if subscribed => Event::Published(p),
                _ = tokio::time::sleep_until(deadline) => Event::ReadTimeout,
                _ = shutdown.cancelled() => Event::Shutdown,
            };
            match ev {
                Event::Inbound(None) => return Ok(()),
                Event::Inbound(Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(e)))) => {
                    return Err(Refusal::new(
                        ErrorCode::FrameTooLarge,
                        format!("{e}; frames are limited to {MAX_FRAME_BYTES} bytes"),
                    ));
                }
                Event::Inbound(Some(Err(e))) => {
                    tracing::info!(error = %e, "connection lost");
                    return Ok(());
                }
                Event::Inbound(Some(Ok(msg))) => {
                    deadline = Instant::now() + read_timeout;
                    if let (Some(m), Message::Binary(b)) = (&self.metrics, &msg) {
                        m.bytes_in.inc_by(b.len() as u64);
                    }
                    match msg {
                        Message::Binary(b) => match proto::decode::<ClientFrame>(&b) {
                            Ok(ClientFrame::Upload(up)) => {
                                if !self.upload(ws, up).await? {
                                    return Ok(());
                                }
                            }
                            Ok(ClientFrame::Hello(_)) => {
                                return Err(Refusal::new(
                                    ErrorCode::UnexpectedFrame,
                                    "hello sent twice",
                                ))
                            }
                            Err(e) => {
                                return Err(Refusal::new(ErrorCode::MalformedFrame, e.to_string()))
                            }
                        },
                        Message::Text(_) => {
                            return Err(Refusal::new(
                                ErrorCode::MalformedFrame,
                                "text message; frames are binary MessagePack",
                            ))
                        }
                        Message::Close(_) => return Ok(()),
                        _ => {}
                    }
                }
                Event::Published(Ok(p)) => self.publish(ws, &p).await?,
                Event::Published(Err(RecvError::Lagged(n))) => {
                    tracing::debug!(
                        missed = n,
                        "fell behind the live stream; reading from the store"
                    );
                    self.catch_up(ws).await?;
                }
                Event::Published(Err(RecvError::Closed)) => {
                    return Err(Refusal::new(ErrorCode::Internal, "fan-out closed"))
                }
                Event::ReadTimeout => {
                    tracing::info!(timeout = ?read_timeout, "client silent for too long; closing");
                    return Ok(());
                }
                Event::Shutdown => {
                    return Err(Refusal::new(
                        ErrorCode::ShuttingDown,
                        "hub is shutting down; reconnect later",
                    ))
                }
            }
        }
    }

    /// Sends everything from the store after `sent_up_to`, page by page.
    async fn catch_up(&mut self, ws: &mut Ws) -> Result<(), Refusal> {
        loop {
            let store = self.inner.store.clone();
            let (ds, after) = (self.dataset.clone(), self.sent_up_to);
            let exclude = (!self.echo_own).then(|| self.client.clone());
            let t0 = std::time::Instant::now();
            let (page, head) = blocking(move || {
                let head = store.head(&ds)?;
                let page = store.changes_since(
                    &ds,
                    after,
                    exclude.as_deref(),
                    MAX_PAGE_CHANGES,
                    MAX_PAGE_BYTES,
                )?;
                Ok((page, head))
            })
            .await?;
            self.inner
                .metrics
                .store_time(StoreOp::read_changes, t0.elapsed());
            if page.up_to <= self.sent_up_to {
                return Ok(());
            }
            self.sent_up_to = page.up_to;
            if !page.changes.is_empty() || page.up_to >= head {
                self.send(
                    ws,
                    &HubFrame::Changes(Changes {
                        changes: page.changes,
                        up_to: page.up_to,
                        head,
                    }),
                )
                .await?;
            }
        }
    }

    /// Forwards a batch applied by another session.
    async fn publish(&mut self, ws: &mut Ws, p: &Published) -> Result<(), Refusal> {
        if p.last <= self.sent_up_to {
            return Ok(());
        }
        if p.after != self.sent_up_to {
            return self.catch_up(ws).await;
        }
        // Borrowed: every session encodes straight from the shared batch.
        let changes: Vec<&RemoteChange> = p
            .entries
            .iter()
            .filter(|e| self.echo_own || *e.client != *self.client)
            .map(|e| &e.change)
            .collect();
        self.sent_up_to = p.last;
        if changes.is_empty() {
            return Ok(());
        }
        let chunks = changes.chunks(MAX_PAGE_CHANGES);
        let n = chunks.len();
        for (i, chunk) in chunks.enumerate() {
            let up_to = if i + 1 == n {
                p.last
            } else {
                chunk.last().map(|c| c.version).unwrap_or(p.last)
            };
            let frame = proto::encode(&ChangesRef::Changes {
                changes: chunk,
                up_to,
                head: p.last,
            });
            self.send_encoded(ws, frame).await?;
        }
        if let Some(m) = &self.metrics {
            m.fanned_out(p.stored);
        }
        Ok(())
    }

    /// Applies an upload and answers it. Returns false when a fault point cut
    /// the connection.
    async fn upload(&mut self, ws: &mut Ws, up: Upload) -> Result<bool, Refusal> {
        if self.access == Access::ReadOnly {
            self.send(ws, &HubFrame::Error(ErrorFrame {
                code: ErrorCode::Forbidden,
                message: "token is read_only: uploads are refused; use a read_write token to send local changes".into(),
            }))
            .await?;
            return Ok(true);
        }
        let inner = self.inner.clone();
        let (ds, client) = (self.dataset.clone(), self.client.clone());
        let tables = self.tables.clone();
        // Shared with the store task; read again only to answer a failure.
        let changes = Arc::new(up.changes);
        let acked = up.acked;
        let batch = changes.clone();
        let applied = blocking(move || {
            let changes = batch;
            let fan = inner.fanout.dataset(&ds);
            let _lock = fan.apply_lock.lock().expect("BUG: poisoned");
            let t0 = std::time::Instant::now();
            let mut applied = inner
                .store
                .apply_batch(&ds, &client, &tables, &changes, acked)?;
            inner.metrics.store_time(StoreOp::apply_batch, t0.elapsed());
            tracing::trace!(n = changes.len(), took = ?t0.elapsed(), "store applied batch");
            if let (Some(first), Some(last)) = (applied.logged.first(), applied.logged.last()) {
                let p = Published {
                    after: first.change.version - 1,
                    last: last.change.version,
                    entries: std::mem::take(&mut applied.logged),
                    stored: std::time::Instant::now(),
                };
                // No receiver is fine: nobody else is connected.
                let _ = fan.tx.send(Arc::new(p));
            }
            Ok(applied)
        })
        .await;
        let (results, summary) = match applied {
            Ok(a) => {
                let s = UploadSummary::of(&a.results);
                if let Some(m) = &self.metrics {
                    m.applied(&s);
                }
                tracing::debug!(
                    batch = up.batch,
                    total = s.total,
                    applied = s.applied,
                    conflict = s.conflict,
                    invalid = s.invalid,
                    head = a.head,
                    "batch applied"
                );
                if s.invalid > 0 {
                    tracing::warn!(batch = up.batch, invalid = s.invalid, first_error = ?s.first_error, "batch had invalid changes");
                }
                (a.results, s)
            }
            Err(e) => {
                tracing::error!(batch = up.batch, error = %e, "could not apply batch");
                let answer = materialize_error(up.batch, &changes, e.to_string());
                if let Some(m) = &self.metrics {
                    m.applied(&answer.summary);
                }
                self.send(ws, &HubFrame::UploadResult(answer)).await?;
                // Later batches of this client may already be queued on the
                // socket; none may be applied past the failed one.
                return Err(Refusal::new(
                    ErrorCode::Internal,
                    "could not store a batch; reconnect and resend",
                ));
            }
        };
        if self
            .inner
            .faults
            .drop_upload_results
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            tracing::warn!(
                batch = up.batch,
                "fault injection: dropping the upload result and the connection"
            );
            return Ok(false);
        }
        self.send(
            ws,
            &HubFrame::UploadResult(UploadResult {
                batch: up.batch,
                results,
                summary,
                more: false,
            }),
        )
        .await?;
        Ok(true)
    }
}

fn materialize_error(batch: u64, changes: &[Change], message: String) -> UploadResult {
    let results: Vec<ChangeResult> = changes
        .iter()
        .map(|c| ChangeResult {
            seq: c.seq,
            outcome: Outcome::MaterializeError {
                message: message.clone(),
            },
        })
        .collect();
    UploadResult {
        batch,
        summary: UploadSummary::of(&results),
        results,
        more: false,
    }
}

impl Session {
    async fn send(&self, ws: &mut Ws, frame: &HubFrame) -> Result<(), Refusal> {
        self.send_encoded(ws, proto::encode(frame)).await
    }

    async fn send_encoded(&self, ws: &mut Ws, bytes: Vec<u8>) -> Result<(), Refusal> {
        let n = bytes.len() as u64;
        ws.send(Message::Binary(bytes.into()))
            .await
            .map_err(|e| Refusal::new(ErrorCode::Internal, format!("sending to client: {e}")))?;
        if let Some(m) = &self.metrics {
            m.bytes_out.inc_by(n);
        }
        Ok(())
    }
}
