//! The daemon side of the control socket.

// Errors here are the response line sent to the client; they are built once
// per request, so their size does not matter.
#![allow(clippy::result_large_err)]

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, oneshot};
use tokio::time::Instant;
use tokio_util::codec::{Framed, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;

use super::{
    Direction, Directions, ErrorCode, Progress, Request, Response, Woken, MAX_CLIENTS, MAX_LINE,
};
use crate::clock::sleep_opt;
use crate::daemon::{Daemon, SessionHandle};
use crate::session::{ConnectionState, Control, Event, Status};

/// Why the control socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another tether daemon is running with control socket {0}; stop it first, or give this one another `control_socket`")]
    InUse(String),
    #[error("{0} exists and is not a socket; refusing to remove it: fix `control_socket`")]
    NotASocket(String),
    #[error("cannot create control socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// Binds the control socket with mode 0660. A socket left by a crashed
/// daemon is replaced; a live one is refused; anything else is left alone.
pub async fn bind(path: &Path) -> Result<UnixListener, BindError> {
    let shown = path.display().to_string();
    let io_err = |source| BindError::Io {
        path: shown.clone(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(BindError::NotASocket(shown));
        }
        if UnixStream::connect(path).await.is_ok() {
            return Err(BindError::InUse(shown));
        }
        std::fs::remove_file(path).map_err(io_err)?;
    }
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            return Err(io_err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("directory {} does not exist", dir.display()),
            )));
        }
    }
    let listener = UnixListener::bind(path).map_err(io_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io_err)?;
    Ok(listener)
}

/// Serves control clients until `shutdown`.
pub async fn serve(listener: UnixListener, daemon: Arc<Daemon>, shutdown: CancellationToken) {
    let accept = |stream, _peer| client(stream, daemon.clone(), shutdown.clone());
    crate::listen::serve(listener, MAX_CLIENTS, "control socket", &shutdown, accept).await;
}

type Conn = Framed<UnixStream, LinesCodec>;

async fn send(conn: &mut Conn, r: &Response) -> bool {
    let line = serde_json::to_string(r).expect("BUG: responses serialize");
    conn.send(line).await.is_ok()
}

/// One control client: any number of requests, one at a time.
async fn client(stream: UnixStream, daemon: Arc<Daemon>, shutdown: CancellationToken) {
    let mut conn = Framed::new(stream, LinesCodec::new_with_max_length(MAX_LINE));
    loop {
        let line = tokio::select! {
            l = conn.next() => l,
            _ = shutdown.cancelled() => {
                let _ = send(&mut conn, &Response::error(ErrorCode::ShuttingDown, "the daemon is shutting down")).await;
                return;
            }
        };
        let line = match line {
            None => return,
            Some(Ok(l)) => l,
            Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                let _ = send(
                    &mut conn,
                    &Response::error(
                        ErrorCode::BadRequest,
                        format!("request longer than {MAX_LINE} bytes"),
                    ),
                )
                .await;
                return;
            }
            Some(Err(LinesCodecError::Io(_))) => return,
        };
        if line.trim().is_empty() {
            continue;
        }
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                let msg = format!("not a valid request ({e}); see proto/CONTROL.md");
                if !send(&mut conn, &Response::error(ErrorCode::BadRequest, msg)).await {
                    return;
                }
                continue;
            }
        };
        if !handle(&mut conn, &daemon, req, &shutdown).await {
            return;
        }
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

/// Handles one request; false when the client is gone.
async fn handle(
    conn: &mut Conn,
    daemon: &Daemon,
    req: Request,
    shutdown: &CancellationToken,
) -> bool {
    let reply = match req {
        Request::Status { db } => match statuses(daemon, db.as_deref()).await {
            Ok(databases) => Response::Status { databases },
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
            Ok(report) => Response::Reload { report },
            Err(e) => Response::error(
                ErrorCode::InvalidConfig,
                format!("reload refused, the daemon keeps its current config: {e}"),
            ),
        },
        Request::Watch { db } => {
            // Subscribe before taking the snapshot: an event that happens
            // in between is then sent after it, never lost.
            let events = daemon.subscribe();
            let databases = match statuses(daemon, db.as_deref()).await {
                Ok(d) => d,
                Err(e) => return send(conn, &e).await,
            };
            if !send(conn, &Response::Watching { databases }).await {
                return false;
            }
            return watch(conn, events, db, shutdown).await;
        }
        Request::Sync { db, timeout_ms } => match find(daemon, &db) {
            Err(e) => e,
            Ok(h) => {
                let before = h.status.borrow().clone();
                let deadline =
                    Instant::now() + Duration::from_millis(timeout_ms.unwrap_or(300_000));
                let both = Directions::default();
                match wait(conn, &h, both, Some(deadline), Until::Done, shutdown).await {
                    Err(r) => r,
                    Ok(()) => {
                        let after = h.status.borrow().clone();
                        Response::Sync {
                            db,
                            upload: after.last_upload.clone().filter(|_| {
                                after.uploaded > before.uploaded
                                    || after.last_upload != before.last_upload
                            }),
                            uploaded: after.uploaded - before.uploaded,
                            downloaded: after.downloaded - before.downloaded,
                        }
                    }
                }
            }
        },
    };
    send(conn, &reply).await
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

/// Follows a session, streaming progress. Used by wait, progress and sync.
async fn wait(
    conn: &mut Conn,
    h: &SessionHandle,
    dirs: Directions,
    deadline: Option<Instant>,
    until: Until,
    shutdown: &CancellationToken,
) -> Result<(), Response> {
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
    // Upload target: everything captured up to now (target seq, bytes).
    let up = if dirs.upload() {
        Some(upload_target(h, &start).await?)
    } else {
        None
    };
    // Download target: the hub head once connected and caught up.
    let mut down_target: Option<u64> = None;
    let mut down_from = start.cursor;
    let mut last_sent: Option<(Option<Progress>, Option<Progress>)> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        let s = rx.borrow_and_update().clone();
        if let Some(why) = failed(&s) {
            return Err(Response::error(ErrorCode::SessionFailed, why));
        }
        if dirs.download()
            && down_target.is_none()
            && s.connection == ConnectionState::Connected
            && s.caught_up
        {
            // What the hub holds now, asked over the connection: the head
            // last heard of may be far behind while frames are in flight.
            // A hub that cannot be asked leaves the head last heard of.
            let head = fetch_head(h).await.unwrap_or(0);
            down_target = Some(head.max(s.hub_head));
            down_from = down_from.min(s.cursor);
        }
        // Upload progress in captured writes (log sequence numbers).
        let up_progress = up.map(|(target, bytes)| {
            let from = start.consumed.min(target);
            Progress {
                db: h.name.clone(),
                direction: Direction::Upload,
                transferred_changes: s.consumed.min(target).saturating_sub(from),
                transferable_changes: target - from,
                transferred_bytes: s.uploaded_bytes - start.uploaded_bytes,
                transferable_bytes: Some(bytes),
            }
        });
        let down_progress = dirs.download().then(|| {
            let target = down_target.unwrap_or(s.hub_head).max(down_from);
            Progress {
                db: h.name.clone(),
                direction: Direction::Download,
                transferred_changes: s.cursor.min(target).saturating_sub(down_from),
                transferable_changes: target - down_from,
                transferred_bytes: s.downloaded_bytes - start.downloaded_bytes,
                transferable_bytes: None,
            }
        });
        let up_done = up.map(|(target, _)| s.consumed >= target).unwrap_or(true);
        let down_done = !dirs.download() || down_target.map(|t| s.cursor >= t).unwrap_or(false);
        let now = (up_progress, down_progress);
        if last_sent.as_ref() != Some(&now) {
            for p in [now.0.clone(), now.1.clone()].into_iter().flatten() {
                if !send(conn, &Response::Progress(p)).await {
                    return Err(Response::error(ErrorCode::BadRequest, "client went away"));
                }
            }
            last_sent = Some(now);
        }
        if up_done && down_done && until != Until::Forever {
            return Ok(());
        }
        if let Some(d) = deadline {
            if Instant::now() >= d {
                return Err(Response::error(
                    ErrorCode::Timeout,
                    format!(
                        "{}: timed out; the transfer goes on in the background",
                        h.name
                    ),
                ));
            }
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() {
                return Err(Response::error(ErrorCode::SessionFailed, format!("{}: session stopped", h.name)));
            },
            _ = tick.tick() => {}
            _ = sleep_opt(deadline) => {}
            _ = shutdown.cancelled() => return Err(Response::error(ErrorCode::ShuttingDown, "the daemon is shutting down")),
        }
    }
}

/// What a wait for uploads waits for: the newest seq captured now and the
/// estimated size of what is pending up to it.
async fn upload_target(h: &SessionHandle, start: &Status) -> Result<(u64, u64), Response> {
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
    local
        .call(|r| -> Result<_, crate::local::LocalError> {
            let p = r.pending()?;
            Ok((p.last_seq, r.pending_bytes(p.last_seq)?))
        })
        .await
        .map_err(|e| Response::error(ErrorCode::SessionFailed, e.to_string()))?
        .map_err(|e| Response::error(ErrorCode::SessionFailed, e.to_string()))
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
    shutdown: &CancellationToken,
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
            _ = shutdown.cancelled() => {
                let _ = send(conn, &Response::error(ErrorCode::ShuttingDown, "the daemon is shutting down")).await;
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
