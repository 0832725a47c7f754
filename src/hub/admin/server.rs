//! The hub's side of the admin socket.
//!
//! The socket file is made by the control socket's [`bind`] (mode 0660 from
//! the start, a stale socket replaced, a live one or a non-socket left
//! alone); each client's credentials are checked against root, the hub's
//! own user and its group, as the daemon does by default. Requests are
//! served one at a time per client, at most [`MAX_CLIENTS`] clients at once;
//! a client that sends nothing for [`IDLE_TIMEOUT`] is disconnected.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, Framed};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{figures, AdminError, AdminRequest, AdminResponse, MAX_CLIENTS, MAX_LINE};
use crate::config::ControlConfig;
use crate::control::access::{Access, RefusalLog};
use crate::control::server::{bind, BindError, ControlSocket};
use crate::hub::reload::{self, ReloadError, Trigger};
use crate::hub::Hub;

/// How long a client may take to send a request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one response line may wait for a client that does not read.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Creates the admin socket at `path`; the error says what to do.
pub async fn open(path: &Path) -> Result<ControlSocket, String> {
    bind(path).await.map_err(|e| match e {
        BindError::InUse(p) => format!("another tether hub answers on admin socket {p}; stop it first, or give this hub another `admin_socket` in hub.toml"),
        BindError::NotASocket(p) => format!("admin socket {p} exists and is not a socket; refusing to remove it: fix `admin_socket` in hub.toml"),
        other => format!("admin socket: {other} (set `admin_socket` in hub.toml to a directory the hub may write)"),
    })
}

/// What every client task shares.
#[derive(Clone)]
struct Ctx {
    hub: Hub,
    access: Arc<Access>,
    refusals: Arc<RefusalLog>,
    path: Arc<str>,
    shutdown: CancellationToken,
}

/// Serves admin clients until `shutdown`; then the socket file is removed.
pub async fn serve(socket: ControlSocket, hub: Hub, shutdown: CancellationToken) {
    let access = match Access::resolve(&ControlConfig::default()) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("admin socket closed: cannot resolve who may use it: {e}");
            return;
        }
    };
    tracing::info!(socket = %socket.path().display(), allowed = %access.describe(), "admin socket listening");
    let ctx = Ctx {
        hub,
        access: Arc::new(access),
        refusals: Arc::default(),
        path: socket.path().display().to_string().into(),
        shutdown: shutdown.clone(),
    };
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let tracker = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            a = socket.accept() => match a {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket: accept failed");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            },
            _ = shutdown.cancelled() => break,
        };
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let ctx = ctx.clone();
                tracker.spawn(async move {
                    client(stream, ctx).await;
                    drop(permit);
                });
            }
            Err(_) => {
                let mut conn = Framed::new(stream, codec());
                let r = AdminResponse::error(
                    AdminError::TooManyClients,
                    format!("too many admin clients ({MAX_CLIENTS} connected); try again shortly"),
                );
                // A fresh socket takes one short line at once; never waited on.
                let _ = futures_util::FutureExt::now_or_never(send(&mut conn, &r));
            }
        }
    }
    tracker.close();
    tracker.wait().await;
    drop(socket);
}

type Conn = Framed<UnixStream, AnyDelimiterCodec>;

fn codec() -> AnyDelimiterCodec {
    AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), b"\n".to_vec(), MAX_LINE)
}

async fn send(conn: &mut Conn, r: &AdminResponse) -> bool {
    let line = serde_json::to_string(r).expect("BUG: responses serialize");
    matches!(
        tokio::time::timeout(SEND_TIMEOUT, conn.send(line)).await,
        Ok(Ok(()))
    )
}

/// Whether this client may use the socket; answers and logs it when not.
async fn allowed(conn: &mut Conn, ctx: &Ctx) -> bool {
    let (uid, gid, pid) = match conn.get_ref().peer_cred() {
        Ok(c) => (c.uid(), c.gid(), c.pid()),
        Err(e) => {
            tracing::warn!(error = %e, "admin socket: cannot read a client's credentials; closing it");
            let r = AdminResponse::error(
                AdminError::NotAllowed,
                format!("the hub cannot read this connection's credentials ({e}); closing it"),
            );
            let _ = send(conn, &r).await;
            return false;
        }
    };
    if ctx.access.allows(uid, gid) {
        return true;
    }
    if ctx.refusals.first(uid) {
        tracing::warn!(uid, gid, pid = ?pid, allowed = %ctx.access.describe(), "admin socket: refused a client that is not root, the hub's user or in its group (logged once per uid)");
    }
    let r = AdminResponse::error(
        AdminError::NotAllowed,
        format!(
            "uid {uid} (gid {gid}) may not use the hub's admin socket {}; allowed: {}. Run this as root, as the hub's user, or as a member of its group",
            ctx.path,
            ctx.access.describe()
        ),
    );
    let _ = send(conn, &r).await;
    false
}

/// One admin client: any number of requests, one at a time.
async fn client(stream: UnixStream, ctx: Ctx) {
    let mut conn = Framed::new(stream, codec());
    if !allowed(&mut conn, &ctx).await {
        return;
    }
    let mut idle_until = tokio::time::Instant::now() + IDLE_TIMEOUT;
    loop {
        let line = tokio::select! {
            l = conn.next() => l,
            _ = tokio::time::sleep_until(idle_until) => {
                let r = AdminResponse::error(
                    AdminError::IdleTimeout,
                    format!("no request within {IDLE_TIMEOUT:?}; closing this connection"),
                );
                let _ = send(&mut conn, &r).await;
                return;
            }
            _ = ctx.shutdown.cancelled() => return,
        };
        let line = match line {
            None | Some(Err(AnyDelimiterCodecError::Io(_))) => return,
            Some(Err(AnyDelimiterCodecError::MaxChunkLengthExceeded)) => {
                let r = AdminResponse::error(
                    AdminError::BadRequest,
                    format!("request longer than {MAX_LINE} bytes; closing this connection"),
                );
                let _ = send(&mut conn, &r).await;
                return;
            }
            Some(Ok(l)) => l,
        };
        let answer = match AdminRequest::parse(&line) {
            Ok(None) => continue,
            Ok(Some(req)) => answer(&ctx.hub, req).await,
            Err(message) => AdminResponse::error(AdminError::BadRequest, message),
        };
        if !send(&mut conn, &answer).await {
            return;
        }
        idle_until = tokio::time::Instant::now() + IDLE_TIMEOUT;
    }
}

/// Answers one request.
pub async fn answer(hub: &Hub, req: AdminRequest) -> AdminResponse {
    match req {
        AdminRequest::Datasets {} => figures::datasets(&hub.inner).await,
        AdminRequest::Clients {} => figures::clients(&hub.inner).await,
        AdminRequest::Tokens {} => figures::tokens(&hub.inner),
        AdminRequest::Reload {} => match reload::announced(hub, Trigger::AdminSocket).await {
            Ok(report) => AdminResponse::Reload { report },
            Err(e @ (ReloadError::Config(_) | ReloadError::Tls { .. })) => AdminResponse::error(
                AdminError::InvalidConfig,
                format!("{e}; the hub keeps its current config"),
            ),
            Err(e @ ReloadError::NoFile) => {
                AdminResponse::error(AdminError::InvalidConfig, e.to_string())
            }
        },
    }
}
