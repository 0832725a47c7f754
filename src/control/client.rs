//! The CLI side of the control socket. Every step is bounded: connecting,
//! sending and waiting for the answer (see [`Limits`]); a daemon that
//! accepts but never answers is an error, not a hang.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tokio::time::Instant;
use tokio_util::codec::{Framed, LinesCodec};

use super::{ErrorCode, Request, Response, MAX_LINE};

/// Where the CLI looks for a daemon run by root when nothing else says;
/// other users' daemons default to [`crate::places::control_socket`].
pub const DEFAULT_SOCKET: &str = crate::places::SYSTEM_SOCKET;

/// How long a command waits for the daemon's answer when `--timeout` does
/// not say; for a stream (`wait`, `progress`, `watch`, `sync`), how long
/// it waits for the first line.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// [`DEFAULT_TIMEOUT`] of `reload`, which waits for changed sessions to
/// stop (each may wait for the hub up to `shutdown_timeout`).
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// What a `wait` or `sync` with a timeout allows the daemon beyond it to
/// send its own `timeout` answer.
pub const GRACE: Duration = Duration::from_secs(10);
/// The daemon's own limit on a `sync` sent without `timeout_ms`.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(300);

/// Why the CLI could not talk to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no tether daemon is listening on {path} ({source}); start it with `tether daemon --config /etc/tether/tether.toml` (or `systemctl start tether`), or point to its socket with --socket or --config")]
    NoDaemon {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to the daemon's control socket {path} ({source}): only its owner, its group and root may; run this as a member of the daemon's group, or see [control] in its tether.toml")]
    Denied {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon on {path} did not answer within {} ({doing}); it may be hung or overloaded: see its log (`journalctl -u tether`), or give it longer with --timeout", humantime::format_duration(*.limit))]
    NoAnswer {
        path: String,
        limit: Duration,
        doing: &'static str,
    },
    #[error("the daemon on {path} kept turning this client away for {}: {message}", humantime::format_duration(*.limit))]
    Busy {
        path: String,
        limit: Duration,
        message: String,
    },
    #[error("lost the connection to the daemon: {0}")]
    Lost(String),
    #[error("the daemon sent a line this CLI cannot read ({0}); are the CLI and daemon versions the same?")]
    Garbled(String),
}

/// How long a command waits: for the first answer line, and for the whole
/// exchange (none: a stream that runs until it ends).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub first: Duration,
    pub all: Option<Duration>,
}

impl Limits {
    /// The limits of `req` given the command's `--timeout`, if any:
    ///
    /// * one answer (`status`, `pause`, ...): `--timeout`, else
    ///   [`DEFAULT_TIMEOUT`] ([`RELOAD_TIMEOUT`] for `reload`);
    /// * `wait` and `sync`: their timeout (sent to the daemon; `sync`
    ///   defaults to [`SYNC_TIMEOUT`]) plus [`GRACE`], the first line within
    ///   [`DEFAULT_TIMEOUT`]; a `wait` without one has no end;
    /// * `progress` and `watch`: the first line within [`DEFAULT_TIMEOUT`],
    ///   then no end.
    pub fn of(req: &Request, timeout: Option<Duration>) -> Limits {
        let stream = |all: Option<Duration>| Limits {
            first: all.map_or(DEFAULT_TIMEOUT, |a| a.min(DEFAULT_TIMEOUT)),
            all,
        };
        let one = |t: Duration| Limits {
            first: t,
            all: Some(t),
        };
        match req {
            Request::Wait { timeout_ms, .. } => {
                stream(timeout_ms.map(|ms| Duration::from_millis(ms) + GRACE))
            }
            Request::Sync { timeout_ms, .. } => stream(Some(
                timeout_ms.map_or(SYNC_TIMEOUT, Duration::from_millis) + GRACE,
            )),
            Request::Progress { .. } | Request::Watch { .. } => stream(None),
            Request::Reload {} => one(timeout.unwrap_or(RELOAD_TIMEOUT)),
            Request::Status { .. }
            | Request::Pause { .. }
            | Request::Resume { .. }
            | Request::Reconnect {}
            | Request::Metrics {}
            | Request::Held { .. }
            | Request::Retry { .. } => one(timeout.unwrap_or(DEFAULT_TIMEOUT)),
        }
    }
}

/// An open control connection.
pub struct Client {
    conn: Framed<UnixStream, LinesCodec>,
    path: String,
}

impl Client {
    /// Connects by `deadline` (`limit` is how long that was, for the
    /// message). A daemon whose backlog is full is tried again until then.
    pub async fn connect(
        path: &Path,
        deadline: Instant,
        limit: Duration,
    ) -> Result<Client, ClientError> {
        let shown = path.display().to_string();
        let mut pause = Duration::from_millis(10);
        loop {
            let attempt = tokio::time::timeout_at(deadline, UnixStream::connect(path)).await;
            let e = match attempt {
                Ok(Ok(stream)) => {
                    return Ok(Client {
                        conn: Framed::new(stream, LinesCodec::new_with_max_length(16 * MAX_LINE)),
                        path: shown,
                    })
                }
                Ok(Err(e)) => e,
                Err(_) => return Err(no_answer(&shown, limit, "connecting")),
            };
            match e.kind() {
                std::io::ErrorKind::WouldBlock => {
                    if Instant::now() + pause >= deadline {
                        return Err(no_answer(
                            &shown,
                            limit,
                            "connecting: the socket's queue of new connections stays full",
                        ));
                    }
                    // Backoff before trying again; the deadline bounds it.
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                std::io::ErrorKind::PermissionDenied => {
                    return Err(ClientError::Denied {
                        path: shown,
                        source: e,
                    })
                }
                _ => {
                    return Err(ClientError::NoDaemon {
                        path: shown,
                        source: e,
                    })
                }
            }
        }
    }

    /// Sends a request by `deadline`; read the answers with [`Client::next`].
    pub async fn send(
        &mut self,
        req: &Request,
        deadline: Instant,
        limit: Duration,
    ) -> Result<(), ClientError> {
        let line = serde_json::to_string(req).expect("BUG: requests serialize");
        match tokio::time::timeout_at(deadline, self.conn.send(line)).await {
            Ok(r) => r.map_err(|e| ClientError::Lost(e.to_string())),
            Err(_) => Err(no_answer(&self.path, limit, "sending the request")),
        }
    }

    /// The next response line, however long it takes (a stream).
    pub async fn next(&mut self) -> Result<Response, ClientError> {
        match self.conn.next().await {
            None => Err(ClientError::Lost("the daemon closed the connection".into())),
            Some(Err(e)) => Err(ClientError::Lost(e.to_string())),
            Some(Ok(line)) => {
                serde_json::from_str(&line).map_err(|e| ClientError::Garbled(e.to_string()))
            }
        }
    }

    /// The next response line, by `deadline`.
    pub async fn next_by(
        &mut self,
        deadline: Instant,
        limit: Duration,
    ) -> Result<Response, ClientError> {
        match tokio::time::timeout_at(deadline, self.next()).await {
            Ok(r) => r,
            Err(_) => Err(no_answer(&self.path, limit, "waiting for its answer")),
        }
    }
}

fn no_answer(path: &str, limit: Duration, doing: &'static str) -> ClientError {
    ClientError::NoAnswer {
        path: path.to_owned(),
        limit,
        doing,
    }
}

/// Sends `req` and reads the first answer, all within `limit`. A daemon
/// serving as many clients as it can turns this one away
/// (`too_many_clients`) before reading the request: it is asked again,
/// with a growing pause, until `limit` runs out.
pub async fn request(
    path: &Path,
    req: &Request,
    limit: Duration,
) -> Result<(Client, Response), ClientError> {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(50);
    loop {
        let mut client = Client::connect(path, deadline, limit).await?;
        let sent = client.send(req, deadline, limit).await;
        // A daemon that refuses a client answers, then hangs up, perhaps
        // before the request is written: its answer is still there to read.
        let first = client.next_by(deadline, limit).await;
        let first = match (sent, first) {
            (_, Ok(r)) => r,
            (Err(e), Err(_)) | (Ok(()), Err(e)) => return Err(e),
        };
        match first {
            Response::Error {
                code: ErrorCode::TooManyClients,
                message,
            } => {
                if Instant::now() + pause >= deadline {
                    return Err(ClientError::Busy {
                        path: client.path,
                        limit,
                        message,
                    });
                }
                drop(client);
                // Backoff before asking again; the deadline bounds it.
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            r => return Ok((client, r)),
        }
    }
}

/// The `control_socket` of the daemon config at `path`, read without
/// validating the rest: a file with a bad value elsewhere still leads to
/// its daemon (`tether reload` is then refused by the daemon, with the
/// reason, and the daemon logs it). Only a file that is not TOML, or a
/// `control_socket` that is not a string, is an error here.
fn control_socket_of(path: &Path) -> Result<PathBuf, crate::config::ConfigError> {
    use crate::config::ConfigError;
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: shown.clone(),
        message: e.to_string().trim_end().replace('\n', "\n  "),
    })?;
    match table.get("control_socket") {
        None => Ok(crate::config::default_control_socket()),
        Some(toml::Value::String(s)) => Ok(PathBuf::from(s)),
        Some(v) => Err(ConfigError::Invalid {
            path: shown,
            key: "control_socket".into(),
            message: format!("{v} is not a path; write it like \"/run/tether/tether.sock\""),
        }),
    }
}

/// Finds the socket: `--socket`, else `--config`'s `control_socket`, else
/// `TETHER_SOCKET`, else [`crate::places::control_socket`].
pub fn socket_path(
    socket: Option<&Path>,
    config: Option<&Path>,
) -> Result<PathBuf, crate::config::ConfigError> {
    if let Some(s) = socket {
        return Ok(s.to_path_buf());
    }
    if let Some(c) = config {
        return control_socket_of(c);
    }
    if let Some(s) = std::env::var_os("TETHER_SOCKET") {
        return Ok(PathBuf::from(s));
    }
    Ok(crate::places::control_socket())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Directions;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn every_command_has_a_bound_on_its_first_answer() {
        let db = || "notes".to_owned();
        let dirs = Directions::default();
        let cases = [
            (Request::Status { db: None }, None, S(30), Some(S(30))),
            (Request::Status { db: None }, Some(S(2)), S(2), Some(S(2))),
            (Request::Retry { db: db() }, None, S(30), Some(S(30))),
            (Request::Reload {}, None, S(120), Some(S(120))),
            (Request::Reload {}, Some(S(5)), S(5), Some(S(5))),
            (
                Request::Wait {
                    db: db(),
                    dirs,
                    timeout_ms: None,
                },
                None,
                S(30),
                None,
            ),
            (
                Request::Wait {
                    db: db(),
                    dirs,
                    timeout_ms: Some(1000),
                },
                None,
                S(11),
                Some(S(11)),
            ),
            (
                Request::Wait {
                    db: db(),
                    dirs,
                    timeout_ms: Some(60_000),
                },
                None,
                S(30),
                Some(S(70)),
            ),
            (
                Request::Sync {
                    db: db(),
                    timeout_ms: None,
                },
                None,
                S(30),
                Some(S(310)),
            ),
            (
                Request::Progress {
                    db: db(),
                    dirs,
                    follow: true,
                },
                None,
                S(30),
                None,
            ),
            (Request::Watch { db: None }, None, S(30), None),
        ];
        for (req, timeout, first, all) in cases {
            assert_eq!(
                Limits::of(&req, timeout),
                Limits { first, all },
                "{req:?} with --timeout {timeout:?}"
            );
        }
    }
}
