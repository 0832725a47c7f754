//! The daemon side of the control socket.

// Errors here are the response line sent to the client; they are built once
// per request, so their size does not matter.
#![allow(clippy::result_large_err)]

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, oneshot, Semaphore};
use tokio::time::Instant;
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, Framed};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::access::{Access, RefusalLog};
use super::{
    Direction, Directions, ErrorCode, Progress, Request, Response, Woken, MAX_CLIENTS, MAX_LINE,
};
use crate::clock::sleep_opt;
use crate::config::ControlConfig;
use crate::daemon::{Daemon, DaemonState, SessionHandle};
use crate::session::status::UploadState;
use crate::session::{ConnectionState, Control, Event, SessionState, Status};

/// Why the control socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another tether daemon is running with control socket {0}; stop it first, or give this one another `control_socket`")]
    InUse(String),
    #[error("{0} exists and is not a socket; refusing to remove it: fix `control_socket`")]
    NotASocket(String),
    #[error("cannot tell whether a daemon answers on control socket {path} ({source}); it is left alone: stop whatever listens there, or remove the file if nothing does")]
    Unsure {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create control socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Mode of the control socket file: its owner and group may connect.
pub const SOCKET_MODE: u32 = 0o660;

/// The daemon's control socket: the listener, and the lock that makes its
/// path this daemon's. Dropping it removes the socket file (if it is still
/// this daemon's), then lets go of the lock.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file, to remove only our own.
    file: (u64, u64),
    /// Held (`flock`) for the daemon's life: two daemons starting at once
    /// on the same path cannot both decide the socket there is stale.
    _lock: std::fs::File,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.file {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

impl ControlSocket {
    /// Accepts the next client: for another server on a socket made by
    /// [`bind`] (the hub's admin socket).
    pub async fn accept(&self) -> io::Result<UnixStream> {
        self.listener.accept().await.map(|(s, _)| s)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The lock file beside a control socket.
fn lock_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// Creates the control socket at `path` with mode 0660 from the start.
///
/// The mode is never wider, not even for an instant: the socket is bound
/// inside a fresh directory of mode 0700 beside `path` (nobody else can
/// reach a file in it), set to 0660 there, then hard-linked to `path`.
/// The link is atomic and the file appears with its final mode; it also
/// fails, rather than replaces, when `path` exists. (Setting the umask
/// around `bind` would do too, but the umask belongs to the whole process,
/// and its other threads may be creating files at that moment.)
///
/// Whatever is at `path` already: a live daemon's socket (it accepts a
/// connection) is refused; a socket nothing listens on (connecting is
/// refused) is left by a daemon that died and is replaced; anything else
/// (not a socket, or a socket that cannot be probed) is left alone. A lock
/// file beside the socket (`path` + `.lock`) is held while the daemon runs,
/// so that two daemons starting at once cannot both take the path.
pub async fn bind(path: &Path) -> Result<ControlSocket, BindError> {
    let shown = path.display().to_string();
    let io_err = |source| BindError::Io {
        path: shown.clone(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(io_err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("directory {} does not exist", dir.display()),
        )));
    }
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        // The lock file itself, never a file a symbolic link points to.
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(lock_path(path))
        .map_err(io_err)?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(BindError::InUse(shown)),
        Err(std::fs::TryLockError::Error(e)) => return Err(io_err(e)),
    }
    clear_stale(path).await?;
    let private = tempfile::Builder::new()
        .prefix(".tether-")
        .rand_bytes(6)
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(dir)
        .map_err(io_err)?;
    // The umask may have narrowed it further; never wider than 0700.
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700))
        .map_err(io_err)?;
    let hidden = private.path().join("s");
    let listener = UnixListener::bind(&hidden).map_err(io_err)?;
    std::fs::set_permissions(&hidden, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(io_err)?;
    match std::fs::hard_link(&hidden, path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(BindError::InUse(shown));
        }
        Err(e) => return Err(io_err(e)),
    }
    let m = std::fs::symlink_metadata(path).map_err(io_err)?;
    // `private` goes, with the socket's first name; `path` stays.
    Ok(ControlSocket {
        listener,
        path: path.to_owned(),
        file: (m.dev(), m.ino()),
        _lock: lock,
    })
}

/// Removes a socket file at `path` that no daemon answers on.
async fn clear_stale(path: &Path) -> Result<(), BindError> {
    let shown = path.display().to_string();
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(BindError::Io {
                path: shown,
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(BindError::NotASocket(shown));
    }
    let probe = tokio::time::timeout(Duration::from_secs(2), UnixStream::connect(path)).await;
    match probe {
        Ok(Ok(_)) => Err(BindError::InUse(shown)),
        // Only "refused" means nobody listens; a full backlog (a busy
        // daemon) or a permission error says nothing about that.
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(BindError::Io {
                    path: shown,
                    source,
                }),
            }
        }
        Ok(Err(source)) => Err(BindError::Unsure {
            path: shown,
            source,
        }),
        Err(_) => Err(BindError::Unsure {
            path: shown,
            source: io::Error::new(io::ErrorKind::TimedOut, "connecting took over 2s"),
        }),
    }
}

/// How the control socket guards itself, from `[control]`.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Who may use it.
    pub access: Access,
    /// How long a client may wait before sending a request.
    pub idle_timeout: Duration,
}

impl Settings {
    /// Resolves `[control]` (user and group names are looked up now).
    pub fn from_config(cfg: &ControlConfig) -> Result<Settings, String> {
        Ok(Settings {
            access: Access::resolve(cfg)?,
            idle_timeout: cfg.idle_timeout.0,
        })
    }
}

/// How long one response line may wait for a client that does not read.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves control clients until every session has stopped after
/// `shutdown`: during the drain (sessions waiting for the hub to answer
/// their uploads in flight) `status` shows the daemon `dying`, and requests
/// that would start new work are refused with `shutting_down`. Then the
/// socket file is removed.
///
/// At most [`MAX_CLIENTS`] are served at once; one more is answered
/// `too_many_clients` and disconnected at once (never left waiting). A
/// client whose user `settings` does not allow is answered `not_allowed`
/// and disconnected; one that sends no request for the idle timeout is
/// answered `idle_timeout` and disconnected.
pub async fn serve(
    socket: ControlSocket,
    daemon: Arc<Daemon>,
    shutdown: CancellationToken,
    settings: Settings,
) {
    let closed = CancellationToken::new();
    tokio::spawn({
        let (daemon, shutdown, closed) = (daemon.clone(), shutdown.clone(), closed.clone());
        async move {
            shutdown.cancelled().await;
            daemon.wait().await;
            closed.cancel();
        }
    });
    tracing::info!(socket = %socket.path.display(), allowed = %settings.access.describe(), idle_timeout = ?settings.idle_timeout, "control socket listening");
    let ctx = Ctx {
        daemon,
        shutdown,
        closed: closed.clone(),
        access: Arc::new(settings.access),
        idle: settings.idle_timeout,
        refusals: Arc::new(RefusalLog::default()),
        path: socket.path.display().to_string().into(),
    };
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let tracker = TaskTracker::new();
    let mut turned_away = Throttle::default();
    loop {
        let stream = tokio::select! {
            a = socket.listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors and the like: try again soon.
                    tracing::warn!(error = %e, "control socket: accept failed");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                        _ = closed.cancelled() => break,
                    }
                }
            },
            _ = closed.cancelled() => break,
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
                if let Some(n) = turned_away.note() {
                    tracing::warn!(
                        turned_away = n,
                        "control socket: {MAX_CLIENTS} clients connected; turning new ones away (logged at most once a minute)"
                    );
                }
                turn_away(stream);
            }
        }
    }
    tracker.close();
    tracker.wait().await;
    drop(socket);
}

/// Counts events, telling when to log them: at most once a minute.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    count: u64,
}

impl Throttle {
    /// Counts one; the number since the last log when one is due.
    fn note(&mut self) -> Option<u64> {
        self.count += 1;
        let due = self
            .last
            .is_none_or(|l| l.elapsed() >= Duration::from_secs(60));
        if !due {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.count))
    }
}

/// Answers a client over the limit `too_many_clients` and hangs up, without
/// waiting on it: a new connection's send buffer is empty, so one short
/// line written without blocking goes through whole.
fn turn_away(stream: UnixStream) {
    use std::io::Write as _;
    let r = Response::error(
        ErrorCode::TooManyClients,
        format!("too many control clients ({MAX_CLIENTS} connected); try again shortly"),
    );
    let mut line = serde_json::to_string(&r).expect("BUG: responses serialize");
    line.push('\n');
    if let Ok(s) = stream.into_std() {
        let _ = (&s).write(line.as_bytes());
    }
}

/// What every client task shares.
#[derive(Clone)]
struct Ctx {
    daemon: Arc<Daemon>,
    /// Shutdown was asked: the daemon drains.
    shutdown: CancellationToken,
    /// Every session has stopped: the socket closes.
    closed: CancellationToken,
    access: Arc<Access>,
    /// How long a client may take to send a request.
    idle: Duration,
    refusals: Arc<RefusalLog>,
    /// The socket's path, for messages.
    path: Arc<str>,
}

type Conn = Framed<UnixStream, AnyDelimiterCodec>;

/// Request lines are read as bytes (a line that is not UTF-8 is answered,
/// not a broken stream), at most [`MAX_LINE`] long.
pub(crate) fn codec() -> AnyDelimiterCodec {
    AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), b"\n".to_vec(), MAX_LINE)
}

/// Sends one line; false when the client is gone or has not read for
/// [`SEND_TIMEOUT`].
async fn send(conn: &mut Conn, r: &Response) -> bool {
    let line = serde_json::to_string(r).expect("BUG: responses serialize");
    matches!(
        tokio::time::timeout(SEND_TIMEOUT, conn.send(line)).await,
        Ok(Ok(()))
    )
}

/// The answer to a client still connected when the daemon has stopped.
fn stopped() -> Response {
    Response::error(ErrorCode::ShuttingDown, "the daemon has stopped")
}

/// The answer to a client whose user may not use the socket.
fn not_allowed(path: &str, access: &Access, uid: u32, gid: u32) -> Response {
    Response::error(
        ErrorCode::NotAllowed,
        format!(
            "uid {uid} (gid {gid}) may not use the control socket {path}; allowed: {}. To allow it, add the user to `allow_users` (or one of its groups to `allow_groups`) under [control] in the daemon's tether.toml and restart the daemon",
            access.describe()
        ),
    )
}

/// One control client: any number of requests, one at a time.
async fn client(stream: UnixStream, ctx: Ctx) {
    let cred = stream.peer_cred();
    let mut conn = Framed::new(stream, codec());
    match cred {
        Ok(c) if ctx.access.allows(c.uid(), c.gid()) => {}
        Ok(c) => {
            if ctx.refusals.first(c.uid()) {
                tracing::warn!(
                    uid = c.uid(),
                    gid = c.gid(),
                    pid = c.pid(),
                    allowed = %ctx.access.describe(),
                    "control socket: refused a client whose user [control] does not allow (logged once per uid)"
                );
            }
            let _ = send(
                &mut conn,
                &not_allowed(&ctx.path, &ctx.access, c.uid(), c.gid()),
            )
            .await;
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "control socket: cannot read a client's credentials; closing it");
            let r = Response::error(
                ErrorCode::NotAllowed,
                format!("the daemon cannot read this connection's credentials ({e}); closing it"),
            );
            let _ = send(&mut conn, &r).await;
            return;
        }
    }
    // Garbage and blank lines are answered but do not keep a client: only
    // a request (once answered) starts its idle time again.
    let mut idle_until = Instant::now() + ctx.idle;
    loop {
        let line = tokio::select! {
            l = conn.next() => l,
            _ = tokio::time::sleep_until(idle_until) => {
                let r = Response::error(
                    ErrorCode::IdleTimeout,
                    format!(
                        "no request within {} (idle_timeout under [control]); closing this connection",
                        humantime::format_duration(ctx.idle)
                    ),
                );
                let _ = send(&mut conn, &r).await;
                return;
            }
            _ = ctx.closed.cancelled() => {
                let _ = send(&mut conn, &stopped()).await;
                return;
            }
        };
        let line = match line {
            None => return,
            Some(Ok(l)) => l,
            Some(Err(AnyDelimiterCodecError::MaxChunkLengthExceeded)) => {
                let _ = send(
                    &mut conn,
                    &Response::error(
                        ErrorCode::BadRequest,
                        format!("request longer than {MAX_LINE} bytes; closing this connection"),
                    ),
                )
                .await;
                return;
            }
            Some(Err(AnyDelimiterCodecError::Io(_))) => return,
        };
        let req = match Request::parse(&line) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(msg) => {
                if !send(&mut conn, &Response::error(ErrorCode::BadRequest, msg)).await {
                    return;
                }
                continue;
            }
        };
        if !handle(&mut conn, &ctx, req).await {
            return;
        }
        idle_until = Instant::now() + ctx.idle;
    }
}

fn find(daemon: &Daemon, db: &str) -> Result<SessionHandle, Response> {
    daemon.session(db).ok_or_else(|| {
        let handles = daemon.handles();
        let known = handles.iter().map(|s| s.name.as_str());
        Response::error(ErrorCode::UnknownDb, crate::daemon::unknown_db(db, known))
    })
}

/// The database thread of a session; an error answer when it is not open.
fn local_of(h: &SessionHandle) -> Result<crate::local::LocalDb, Response> {
    h.local.get().cloned().ok_or_else(|| {
        Response::error(
            ErrorCode::SessionFailed,
            format!("database {}: not open yet (see `tether status`)", h.name),
        )
    })
}

/// The held changes of one database, or of all open ones.
async fn held(daemon: &Daemon, db: Option<&str>) -> Response {
    let handles = match db {
        None => daemon.handles(),
        Some(name) => match find(daemon, name) {
            Ok(h) => vec![h],
            Err(e) => return e,
        },
    };
    let mut databases = Vec::new();
    for h in handles {
        let local = match local_of(&h) {
            Ok(l) => l,
            Err(e) if db.is_some() => return e,
            Err(_) => continue,
        };
        let read = local
            .call(|r| -> Result<_, crate::local::LocalError> {
                let total = r.pending()?.held;
                Ok((total, r.held(super::HELD_LIST_LIMIT)?))
            })
            .await;
        match read {
            Ok(Ok((total, changes))) => databases.push(super::HeldList {
                db: h.name.clone(),
                total,
                changes,
            }),
            Ok(Err(e)) => return Response::error(ErrorCode::SessionFailed, e.to_string()),
            Err(e) => return Response::error(ErrorCode::SessionFailed, e.to_string()),
        }
    }
    Response::Held { databases }
}

/// Applies one database's held changes again.
async fn retry(daemon: &Daemon, db: &str) -> Response {
    let local = match find(daemon, db).and_then(|h| local_of(&h)) {
        Ok(l) => l,
        Err(e) => return e,
    };
    match local.call(|r| r.retry_held()).await {
        Ok(Ok(report)) => Response::Retried {
            db: db.to_owned(),
            report,
        },
        Ok(Err(e)) => Response::error(ErrorCode::SessionFailed, e.to_string()),
        Err(e) => Response::error(ErrorCode::SessionFailed, e.to_string()),
    }
}

/// Fresh status of one database, or of all of them.
async fn statuses(daemon: &Daemon, db: Option<&str>) -> Result<Vec<Status>, Response> {
    match db {
        None => Ok(daemon.fresh_status().await),
        Some(name) => Ok(vec![find(daemon, name)?.fresh_status().await]),
    }
}

/// The answer to a request that would start new work while the daemon
/// drains.
fn shutting_down(cmd: &str) -> Response {
    Response::error(
        ErrorCode::ShuttingDown,
        format!("the daemon is shutting down (it waits for the hub to answer the uploads in flight, then exits): `{cmd}` needs a running daemon; start it again"),
    )
}

/// The answer to a wait cut short by shutdown.
fn interrupted(db: &str) -> Response {
    Response::error(
        ErrorCode::ShuttingDown,
        format!("{db}: the daemon is shutting down; what is not sent yet stays captured and goes out when it starts again"),
    )
}

/// Handles one request; false when the client is gone.
async fn handle(conn: &mut Conn, ctx: &Ctx, req: Request) -> bool {
    let daemon = &*ctx.daemon;
    let shutdown = &ctx.shutdown;
    if daemon.state() == DaemonState::Dying && req.starts_work() {
        return send(conn, &shutting_down(req.cmd())).await;
    }
    let reply = match req {
        Request::Status { db } => match statuses(daemon, db.as_deref()).await {
            Ok(databases) => Response::Status {
                daemon: daemon.state(),
                databases,
            },
            Err(e) => e,
        },
        Request::Pause { db, dirs } => pause(daemon, &db, dirs, true).await,
        Request::Resume { db, dirs } => pause(daemon, &db, dirs, false).await,
        Request::Reconnect {} => {
            let mut sessions = Vec::new();
            for h in &daemon.handles() {
                let (tx, rx) = oneshot::channel();
                let outcome = match h.ctl.send(Control::Reconnect { reply: tx }).await {
                    Ok(()) => tokio::time::timeout(Duration::from_secs(5), rx)
                        .await
                        .ok()
                        .and_then(|r| r.ok()),
                    Err(_) => None,
                };
                match outcome {
                    Some(outcome) => sessions.push(Woken {
                        db: h.name.clone(),
                        outcome,
                    }),
                    None => {
                        tracing::warn!(db = %h.name, "session did not answer the reconnect request")
                    }
                }
            }
            Response::Reconnect { sessions }
        }
        Request::Wait {
            db,
            dirs,
            timeout_ms,
        } => match find(daemon, &db) {
            Err(e) => e,
            Ok(h) => {
                let deadline = timeout_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
                match wait(conn, &h, dirs, deadline, Until::Done, shutdown).await {
                    Ok(()) => Response::Done {
                        message: format!("{db}: {} complete", dirs_text(dirs)),
                    },
                    Err(r) => r,
                }
            }
        },
        Request::Progress { db, dirs, follow } => match find(daemon, &db) {
            Err(e) => e,
            Ok(h) => {
                let until = if follow {
                    Until::Forever
                } else {
                    Until::Reported
                };
                match wait(conn, &h, dirs, None, until, shutdown).await {
                    Ok(()) => Response::Done {
                        message: format!("{db}: {} complete", dirs_text(dirs)),
                    },
                    Err(r) => r,
                }
            }
        },
        Request::Held { db } => held(daemon, db.as_deref()).await,
        Request::Retry { db } => retry(daemon, &db).await,
        Request::Metrics {} => Response::Metrics {
            text: daemon.metrics_text().await,
        },
        Request::Reload {} => match daemon.reload_from_file().await {
            Ok(report) => {
                tracing::info!(added = ?report.added, removed = ?report.removed, restarted = ?report.restarted, warnings = ?report.warnings, "tether reload: config reloaded");
                Response::Reload { report }
            }
            Err(e) => {
                tracing::warn!("tether reload: reload refused, keeping the current config: {e}");
                Response::error(
                    ErrorCode::InvalidConfig,
                    format!("reload refused, the daemon keeps its current config: {e}"),
                )
            }
        },
        Request::Watch { db } => {
            // Subscribe before taking the snapshot: an event that happens
            // in between is then sent after it, never lost.
            let events = daemon.subscribe();
            let databases = match statuses(daemon, db.as_deref()).await {
                Ok(d) => d,
                Err(e) => return send(conn, &e).await,
            };
            let watching = Response::Watching {
                daemon: daemon.state(),
                databases,
            };
            if !send(conn, &watching).await {
                return false;
            }
            return watch(conn, events, db, &ctx.closed).await;
        }
        Request::Sync { db, timeout_ms } => match find(daemon, &db) {
            Err(e) => e,
            Ok(h) => sync(conn, &h, timeout_ms, shutdown).await,
        },
    };
    send(conn, &reply).await
}

/// Uploads what is captured and downloads what the hub holds, now, and
/// reports what moved during the call: every upload batch answered and
/// every change downloaded meanwhile.
async fn sync(
    conn: &mut Conn,
    h: &SessionHandle,
    timeout_ms: Option<u64>,
    shutdown: &CancellationToken,
) -> Response {
    let before = h.status.borrow().clone();
    let deadline = Instant::now() + Duration::from_millis(timeout_ms.unwrap_or(300_000));
    // Look at the capture log now rather than at the next file event or
    // poll; a full channel means a look is due already.
    let _ = h.wake.try_send(());
    if before.session == SessionState::Active && before.connection == ConnectionState::Disconnected
    {
        // Waiting in backoff: try now. The outcome does not matter here.
        let (reply, _) = oneshot::channel();
        let _ = h.ctl.try_send(Control::Reconnect { reply });
    }
    let both = Directions::default();
    if let Err(r) = wait(conn, h, both, Some(deadline), Until::Done, shutdown).await {
        return r;
    }
    let after = h.status.borrow().clone();
    let upload = after.upload_totals.since(&before.upload_totals);
    Response::Sync {
        db: h.name.clone(),
        upload,
        uploaded: upload.applied,
        downloaded: after.downloaded.saturating_sub(before.downloaded),
    }
}

/// Pauses or resumes a session's directions.
async fn pause(daemon: &Daemon, db: &str, dirs: Directions, pause: bool) -> Response {
    let h = match find(daemon, db) {
        Ok(h) => h,
        Err(e) => return e,
    };
    let (upload, download) = (dirs.upload, dirs.download);
    let ctl = if pause {
        Control::Pause { upload, download }
    } else {
        Control::Resume { upload, download }
    };
    let _ = h.ctl.send(ctl).await;
    let verb = if pause { "paused" } else { "resumed" };
    Response::Ok {
        message: format!("{db}: {verb} {}", dirs_text(dirs)),
    }
}

fn dirs_text(d: Directions) -> &'static str {
    match (d.upload(), d.download()) {
        (true, true) => "upload and download",
        (true, false) => "upload",
        _ => "download",
    }
}

/// Why a session cannot make progress, if it cannot.
fn failed(s: &Status) -> Option<String> {
    s.failure().map(|why| format!("{}: {why}", s.name))
}

/// How long [`wait`] follows a session.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Until {
    /// Until the work outstanding now is done; a paused direction is an
    /// error at once, since it would only run into the timeout (wait, sync).
    Done,
    /// Until the work outstanding now is done, reporting a paused direction
    /// as not moving (progress).
    Reported,
    /// Never: report until the client goes away (progress --follow).
    Forever,
}

/// The answer to an upload wait that can never end: the hub refuses this
/// device's changes.
async fn read_only(h: &SessionHandle) -> Response {
    let s = h.fresh_status().await;
    let n = s.pending_changes;
    Response::error(
        ErrorCode::ReadOnly,
        format!(
            "{}: {n} local change{} cannot be uploaded: the hub token is read-only; put a read_write token in the daemon's token file (or `token` in its config) and restart the daemon; downloads go on",
            h.name,
            if n == 1 { "" } else { "s" }
        ),
    )
}

/// Follows a session, streaming progress. Used by wait, progress and sync.
async fn wait(
    conn: &mut Conn,
    h: &SessionHandle,
    dirs: Directions,
    deadline: Option<Instant>,
    until: Until,
    shutdown: &CancellationToken,
) -> Result<(), Response> {
    opened(h, deadline, shutdown).await?;
    let mut rx = h.status.clone();
    let start = rx.borrow_and_update().clone();
    if let Some(why) = failed(&start) {
        return Err(Response::error(ErrorCode::SessionFailed, why));
    }
    if until == Until::Done {
        let paused = [
            (dirs.upload() && start.upload_paused, "upload"),
            (dirs.download() && start.download_paused, "download"),
        ];
        if let Some((_, dir)) = paused.iter().find(|(p, _)| *p) {
            return Err(Response::error(
                ErrorCode::Paused,
                format!(
                    "{}: {dir}s are paused; `tether resume {} --{dir}` first",
                    h.name, h.name
                ),
            ));
        }
    }
    let follow = until == Until::Forever;
    // Upload target: everything captured up to now.
    let mut up = match dirs.upload() {
        true => Some(UpTarget::now(h, &start).await?),
        false => None,
    };
    // Download target: the hub head once connected and caught up.
    let mut down = DownTarget {
        from: start.cursor,
        head: None,
    };
    let mut last_sent: Option<(Option<Progress>, Option<Progress>)> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    // While following, the log is looked at this often for new writes the
    // session has not read (uploads paused, read-only, disconnected).
    let mut look = tokio::time::interval(FOLLOW_LOOK);
    loop {
        let s = rx.borrow_and_update().clone();
        if let Some(why) = failed(&s) {
            return Err(Response::error(ErrorCode::SessionFailed, why));
        }
        if follow {
            if let Some(u) = &mut up {
                u.grow(h, s.last_seq).await;
            }
        }
        let up_done = up.as_ref().is_none_or(|u| s.consumed >= u.seq);
        if !up_done && !follow && s.upload == UploadState::ReadOnly {
            return Err(read_only(h).await);
        }
        let up_progress = up.as_ref().map(|u| u.progress(h, &start, &s));
        let down_progress = dirs
            .download()
            .then(|| down.progress(h, &start, &s, follow));
        let down_done = !dirs.download() || down.head.is_some_and(|t| s.cursor >= t);
        let now = (up_progress, down_progress);
        if last_sent.as_ref() != Some(&now) {
            for p in [now.0.clone(), now.1.clone()].into_iter().flatten() {
                if !send(conn, &Response::Progress(p)).await {
                    return Err(Response::error(ErrorCode::BadRequest, "client went away"));
                }
            }
            last_sent = Some(now);
        }
        if up_done && down_done && !follow {
            return Ok(());
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(Response::error(
                ErrorCode::Timeout,
                format!(
                    "{}: timed out; the transfer goes on in the background",
                    h.name
                ),
            ));
        }
        if dirs.download()
            && down.head.is_none()
            && s.connection == ConnectionState::Connected
            && s.caught_up
        {
            // What the hub holds now, asked over the connection: the head
            // last heard of may be far behind while frames are in flight.
            // A hub that cannot be asked leaves the head last heard of.
            let head = tokio::select! {
                head = fetch_head(h) => head.unwrap_or(0),
                _ = sleep_opt(deadline) => continue,
                _ = shutdown.cancelled() => return Err(interrupted(&h.name)),
            };
            let s = rx.borrow().clone();
            down.head = Some(head.max(s.hub_head));
            down.from = down.from.min(s.cursor);
            continue;
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() {
                return Err(Response::error(ErrorCode::SessionFailed, format!("{}: session stopped", h.name)));
            },
            _ = tick.tick() => {}
            _ = look.tick(), if follow => {
                if let (Some(u), Some(local)) = (&mut up, h.local.get()) {
                    if let Ok(Ok(p)) = local.call(|r| r.pending()).await {
                        u.grow(h, p.last_seq).await;
                    }
                }
            }
            _ = sleep_opt(deadline) => {}
            _ = shutdown.cancelled() => return Err(interrupted(&h.name)),
        }
    }
}

/// Waits, within `deadline`, for a database that is still being opened (a
/// daemon that has just started): a wait or sync sent right after the
/// daemon starts is answered rather than refused. A database whose open
/// failed is an error at once, with the reason.
async fn opened(
    h: &SessionHandle,
    deadline: Option<Instant>,
    shutdown: &CancellationToken,
) -> Result<(), Response> {
    let mut rx = h.status.clone();
    loop {
        let s = rx.borrow_and_update().clone();
        if h.local.get().is_some() {
            return Ok(());
        }
        if let Some(why) = failed(&s).or(s.last_error) {
            return Err(Response::error(
                ErrorCode::SessionFailed,
                format!("{}: the database is not open: {why}", h.name),
            ));
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() {
                return Err(Response::error(ErrorCode::SessionFailed, format!("{}: session stopped", h.name)));
            },
            _ = sleep_opt(deadline) => return Err(Response::error(
                ErrorCode::Timeout,
                format!("{}: timed out waiting for the database to open", h.name),
            )),
            _ = shutdown.cancelled() => return Err(interrupted(&h.name)),
        }
    }
}

/// How often `progress --follow` looks at the capture log itself.
const FOLLOW_LOOK: Duration = Duration::from_secs(1);

/// What an upload wait waits for: the captured writes after `from` up to
/// `seq` (log sequence numbers), about `bytes` once encoded.
struct UpTarget {
    from: u64,
    seq: u64,
    bytes: u64,
}

impl UpTarget {
    /// Everything captured now, and the estimated size of what is pending.
    async fn now(h: &SessionHandle, start: &Status) -> Result<UpTarget, Response> {
        let Some(local) = h.local.get() else {
            return Err(Response::error(
                ErrorCode::SessionFailed,
                format!(
                    "{}: the database is not open yet: {}",
                    h.name,
                    start.last_error.clone().unwrap_or_default()
                ),
            ));
        };
        let (from, seq, bytes) = local
            .call(|r| -> Result<_, crate::local::LocalError> {
                let p = r.pending()?;
                Ok((p.consumed, p.last_seq, r.pending_bytes(p.last_seq)?))
            })
            .await
            .map_err(|e| Response::error(ErrorCode::SessionFailed, e.to_string()))?
            .map_err(|e| Response::error(ErrorCode::SessionFailed, e.to_string()))?;
        Ok(UpTarget {
            from: from.min(seq),
            seq,
            bytes,
        })
    }

    /// Takes in writes captured up to `last_seq` (a follow): the target
    /// moves there, and the size grows by the new changes at the average
    /// size of those known, or as read from the log when none were.
    async fn grow(&mut self, h: &SessionHandle, last_seq: u64) {
        if last_seq <= self.seq {
            return;
        }
        let added = last_seq - self.seq;
        let known = self.seq - self.from;
        if known > 0 {
            self.bytes += (self.bytes as f64 / known as f64 * added as f64) as u64;
        } else if let Some(local) = h.local.get() {
            if let Ok(Ok(b)) = local.call(move |r| r.pending_bytes(last_seq)).await {
                self.bytes += b;
            }
        }
        self.seq = last_seq;
    }

    fn progress(&self, h: &SessionHandle, start: &Status, s: &Status) -> Progress {
        let moved = s.uploaded_bytes.saturating_sub(start.uploaded_bytes);
        Progress {
            db: h.name.clone(),
            direction: Direction::Upload,
            transferred_changes: s.consumed.min(self.seq).saturating_sub(self.from),
            transferable_changes: self.seq - self.from,
            transferred_bytes: moved,
            // An estimate: never shown below what has moved.
            transferable_bytes: Some(self.bytes.max(moved)),
        }
    }
}

/// What a download wait waits for: the hub sequence numbers after `from`
/// up to the hub's head asked once connected and caught up.
struct DownTarget {
    from: u64,
    head: Option<u64>,
}

impl DownTarget {
    /// Until the head is asked, the head last heard of; a follow takes in
    /// every newer head heard of.
    fn progress(&self, h: &SessionHandle, start: &Status, s: &Status, follow: bool) -> Progress {
        let target = match (self.head, follow) {
            (Some(head), true) => head.max(s.hub_head),
            (Some(head), false) => head,
            (None, _) => s.hub_head,
        }
        .max(self.from);
        Progress {
            db: h.name.clone(),
            direction: Direction::Download,
            transferred_changes: s.cursor.min(target).saturating_sub(self.from),
            transferable_changes: target - self.from,
            transferred_bytes: s.downloaded_bytes.saturating_sub(start.downloaded_bytes),
            transferable_bytes: None,
        }
    }
}

/// How long a download wait waits for the hub to tell its head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The hub's head now, asked through the session; `None` when the session
/// cannot ask (not connected, a hub without the feature) or no answer came.
async fn fetch_head(h: &SessionHandle) -> Option<u64> {
    let (tx, rx) = oneshot::channel();
    h.ctl.send(Control::FetchHead { reply: tx }).await.ok()?;
    tokio::time::timeout(HEAD_TIMEOUT, rx).await.ok()?.ok()?
}

/// Streams events until the client goes away.
async fn watch(
    conn: &mut Conn,
    mut events: broadcast::Receiver<Event>,
    db: Option<String>,
    closed: &CancellationToken,
) -> bool {
    loop {
        tokio::select! {
            e = events.recv() => match e {
                Ok(e) => {
                    if db.as_deref().is_some_and(|d| event_db(&e) != d) {
                        continue;
                    }
                    if !send(conn, &Response::from(e)).await {
                        return false;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let lagged = Event::Error { db: db.clone().unwrap_or_default(), message: format!("watch fell behind: {n} events were dropped") };
                    if !send(conn, &Response::from(lagged)).await {
                        return false;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return false,
            },
            // A watcher that hangs up is noticed here.
            l = conn.next() => if l.is_none() { return false },
            // Events go on through the drain, until the last session stops.
            _ = closed.cancelled() => {
                let _ = send(conn, &stopped()).await;
                return false;
            }
        }
    }
}

fn event_db(e: &Event) -> &str {
    match e {
        Event::Connection { db, .. }
        | Event::Session { db, .. }
        | Event::Upload { db, .. }
        | Event::Download { db, .. }
        | Event::Error { db, .. } => db,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// Whoever looks at the path while the socket is being made sees
    /// either nothing or a socket of mode 0660, never a wider mode.
    #[tokio::test]
    async fn the_socket_file_never_exists_with_another_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tether.sock");
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = std::thread::spawn({
            let (path, stop) = (path.clone(), stop.clone());
            move || {
                let (mut looks, mut seen) = (0u64, std::collections::BTreeMap::new());
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(m) = std::fs::symlink_metadata(&path) {
                        looks += 1;
                        let mode = m.permissions().mode() & 0o777;
                        if mode != SOCKET_MODE {
                            *seen.entry(format!("{mode:o}")).or_insert(0u64) += 1;
                        }
                    }
                }
                (looks, seen)
            }
        });
        for _ in 0..300 {
            let s = bind(&path).await.unwrap();
            assert_eq!(mode(&path), SOCKET_MODE);
            drop(s);
            assert!(!path.exists(), "the socket file goes with the socket");
        }
        stop.store(true, Ordering::Relaxed);
        let (looks, seen) = watcher.join().unwrap();
        assert!(looks > 0, "the watcher saw the socket at least once");
        assert!(
            seen.is_empty(),
            "modes seen besides 0660 (mode: times): {seen:?}"
        );
        // Nothing is left of the private directories.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != "tether.sock.lock")
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test]
    async fn a_socket_nobody_listens_on_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tether.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let s = bind(&path).await.unwrap();
        let c = UnixStream::connect(&path).await.unwrap();
        drop(c);
        drop(s);
    }

    #[tokio::test]
    async fn what_is_not_a_socket_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tether.sock");
        std::fs::write(&path, "data").unwrap();
        let e = bind(&path).await.err().unwrap();
        assert!(matches!(e, BindError::NotASocket(_)), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
        let target = dir.path().join("elsewhere.sock");
        let _live = std::os::unix::net::UnixListener::bind(&target).unwrap();
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = bind(&link).await.err().unwrap();
        assert!(matches!(e, BindError::NotASocket(_)), "{e}");
    }

    /// A live daemon too busy to accept (its queue of new connections is
    /// full: connecting fails with "try again", not "refused") keeps its
    /// socket.
    #[tokio::test]
    async fn a_busy_live_socket_is_never_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tether.sock");
        let sock = tokio::net::UnixSocket::new_stream().unwrap();
        sock.bind(&path).unwrap();
        let _listener = sock.listen(1).unwrap();
        let inode = std::fs::symlink_metadata(&path).unwrap().ino();
        let mut queued = Vec::new();
        let full = loop {
            match UnixStream::connect(&path).await {
                Ok(c) => queued.push(c),
                Err(e) => break e,
            }
            assert!(queued.len() < 100, "the queue never filled");
        };
        assert_eq!(full.kind(), io::ErrorKind::WouldBlock, "{full}");
        let e = bind(&path).await.err().unwrap();
        assert!(matches!(e, BindError::Unsure { .. }), "{e}");
        assert!(e.to_string().contains("left alone"), "{e}");
        assert_eq!(std::fs::symlink_metadata(&path).unwrap().ino(), inode);
    }

    /// The lock, not only the file, says a daemon owns the path: a second
    /// one is refused even when the first one's file is gone, and the
    /// first one, when it stops, removes only its own file.
    #[tokio::test]
    async fn a_running_daemon_keeps_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tether.sock");
        let first = bind(&path).await.unwrap();
        let e = bind(&path).await.err().unwrap();
        assert!(matches!(e, BindError::InUse(_)), "{e}");
        std::fs::remove_file(&path).unwrap();
        let e = bind(&path).await.err().unwrap();
        assert!(matches!(e, BindError::InUse(_)), "{e}");
        std::fs::write(&path, "someone else's").unwrap();
        drop(first);
        assert!(path.exists(), "a file that is not its own stays");
        std::fs::remove_file(&path).unwrap();
        let again = bind(&path).await.unwrap();
        assert!(path.exists());
        drop(again);
    }

    #[test]
    fn a_throttle_logs_at_most_once_a_minute_with_the_count() {
        let mut t = Throttle::default();
        assert_eq!(t.note(), Some(1));
        assert_eq!(t.note(), None);
        assert_eq!(t.note(), None);
        t.last = Some(Instant::now() - Duration::from_secs(61));
        assert_eq!(t.note(), Some(3));
    }
}
