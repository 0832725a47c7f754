//! The local control socket: newline-delimited JSON requests from the
//! `tether` CLI (or any process allowed to open the socket) to the daemon.
//!
//! [`Request`] and [`Response`] are shared by the daemon ([`server`]) and the
//! CLI ([`client`]); `proto/CONTROL.md` documents them.

pub mod access;
pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};

use crate::daemon::DaemonState;
use crate::local::{HeldChange, RetryReport};
use crate::session::status::UploadTotals;
use crate::session::{Event, ReconnectOutcome, Status};

/// Longest request line accepted, in bytes.
pub const MAX_LINE: usize = 64 * 1024;
/// Control clients served at once; one more is answered
/// `too_many_clients` at once and disconnected.
pub const MAX_CLIENTS: usize = 64;

/// Most held changes listed per database in one `held` answer.
pub const HELD_LIST_LIMIT: usize = 1000;

/// The held changes of one database.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeldList {
    pub db: String,
    /// How many are held in all (the list stops at [`HELD_LIST_LIMIT`]).
    pub total: u64,
    pub changes: Vec<HeldChange>,
}

/// Which directions a command applies to; neither flag means both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Directions {
    #[serde(default)]
    pub upload: bool,
    #[serde(default)]
    pub download: bool,
}

impl Directions {
    pub fn upload(self) -> bool {
        self.upload || !self.download
    }
    pub fn download(self) -> bool {
        self.download || !self.upload
    }
}

/// One request line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// One `status` response with all (or one) databases.
    Status { db: Option<String> },
    Pause {
        db: String,
        #[serde(flatten)]
        dirs: Directions,
    },
    Resume {
        db: String,
        #[serde(flatten)]
        dirs: Directions,
    },
    /// Wake every session waiting to reconnect.
    Reconnect {},
    /// Stream: `progress` lines, then `done` or `error`.
    Wait {
        db: String,
        #[serde(flatten)]
        dirs: Directions,
        timeout_ms: Option<u64>,
    },
    /// Stream: `progress` lines until the work outstanding now is done
    /// (or forever with `follow`).
    Progress {
        db: String,
        #[serde(flatten)]
        dirs: Directions,
        #[serde(default)]
        follow: bool,
    },
    /// Stream: `event` lines until the client goes away.
    Watch { db: Option<String> },
    /// Upload then download once; ends with `sync` or `error`.
    Sync { db: String, timeout_ms: Option<u64> },
    /// Re-read the config file and apply it (like SIGHUP).
    Reload {},
    /// The daemon's Prometheus metrics.
    Metrics {},
    /// The hub's changes the local database refused, per database (all, or
    /// one); answered with `held`.
    Held { db: Option<String> },
    /// Apply one database's held changes again now; answered with `retried`.
    Retry { db: String },
}

impl Request {
    /// Every `cmd` there is.
    pub const CMDS: [&'static str; 12] = [
        "status",
        "pause",
        "resume",
        "reconnect",
        "wait",
        "progress",
        "watch",
        "sync",
        "reload",
        "metrics",
        "held",
        "retry",
    ];

    /// Reads one request line (without its newline): `None` for a blank
    /// line; for anything else that is not a request, what is wrong with it.
    pub fn parse(line: &[u8]) -> Result<Option<Request>, String> {
        const LIKE: &str = r#"send one JSON object per line, like {"cmd":"status"}"#;
        let text = std::str::from_utf8(line).map_err(|e| {
            let at = e.valid_up_to();
            format!(
                "the request is not UTF-8 text (byte 0x{:02x} at offset {at}); {LIKE}",
                line[at]
            )
        })?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| format!("the request is not valid JSON ({e}); {LIKE}"))?;
        let Some(fields) = value.as_object() else {
            return Err(format!("the request is not a JSON object; {LIKE}"));
        };
        let cmd = match fields.get("cmd") {
            Some(serde_json::Value::String(c)) => c.as_str(),
            Some(other) => {
                return Err(format!(
                    "`cmd` is {other}, not the name of a request; one of: {}",
                    Self::CMDS.join(", ")
                ))
            }
            None => {
                return Err(format!(
                    "the request has no `cmd` field naming what to do; one of: {}",
                    Self::CMDS.join(", ")
                ))
            }
        };
        if !Self::CMDS.contains(&cmd) {
            return Err(format!(
                "unknown request type {cmd:?}; known: {}",
                Self::CMDS.join(", ")
            ));
        }
        let cmd = cmd.to_owned();
        serde_json::from_value(value)
            .map(Some)
            .map_err(|e| format!("request `{cmd}`: {e}; see proto/CONTROL.md"))
    }

    /// The `cmd` it is sent as.
    pub fn cmd(&self) -> &'static str {
        match self {
            Request::Status { .. } => "status",
            Request::Pause { .. } => "pause",
            Request::Resume { .. } => "resume",
            Request::Reconnect {} => "reconnect",
            Request::Wait { .. } => "wait",
            Request::Progress { .. } => "progress",
            Request::Watch { .. } => "watch",
            Request::Sync { .. } => "sync",
            Request::Reload {} => "reload",
            Request::Metrics {} => "metrics",
            Request::Held { .. } => "held",
            Request::Retry { .. } => "retry",
        }
    }

    /// Whether it starts or awaits sync work, which a daemon shutting down
    /// no longer does (the others only look).
    pub fn starts_work(&self) -> bool {
        match self {
            Request::Status { .. }
            | Request::Watch { .. }
            | Request::Metrics {}
            | Request::Held { .. } => false,
            Request::Pause { .. }
            | Request::Resume { .. }
            | Request::Reconnect {}
            | Request::Wait { .. }
            | Request::Progress { .. }
            | Request::Sync { .. }
            | Request::Reload {}
            | Request::Retry { .. } => true,
        }
    }
}

/// Transfer direction of a progress report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Upload,
    Download,
}

/// Progress of one direction since the request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub db: String,
    pub direction: Direction,
    /// Upload: captured writes answered by the hub. Download: hub sequence
    /// numbers covered by the local cursor (exact).
    pub transferred_changes: u64,
    pub transferable_changes: u64,
    /// Encoded frame bytes moved since the request.
    pub transferred_bytes: u64,
    /// Upload: estimated size of the changes outstanding at the request.
    /// Download: not known in advance (null).
    pub transferable_bytes: Option<u64>,
}

/// What a reconnect did to one session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Woken {
    pub db: String,
    pub outcome: ReconnectOutcome,
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The line is not a valid request.
    BadRequest,
    /// No database of that name; the message lists the known ones.
    UnknownDb,
    /// A wait or sync ran out of time; the transfer goes on.
    Timeout,
    /// The session cannot make progress (bad token, schema mismatch, ...).
    SessionFailed,
    /// The direction waited for is paused.
    Paused,
    /// An upload wait on a session whose hub token is read-only: the
    /// changes cannot go until the daemon uses a read-write token.
    ReadOnly,
    /// The daemon is shutting down.
    ShuttingDown,
    /// A reload found the config file invalid; the old config stays.
    InvalidConfig,
    /// The client's user is not allowed to use the control socket
    /// (`[control]` in `tether.toml`); the connection is closed.
    NotAllowed,
    /// As many clients as the daemon serves at once are connected; the
    /// connection is closed. Try again shortly.
    TooManyClients,
    /// The client sent no request for `[control] idle_timeout`; the
    /// connection is closed.
    IdleTimeout,
}

/// One response line.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Status {
        /// Running, or draining on its way out.
        #[serde(default)]
        daemon: DaemonState,
        databases: Vec<Status>,
    },
    Ok {
        message: String,
    },
    Reconnect {
        sessions: Vec<Woken>,
    },
    Progress(Progress),
    /// First line of a `watch`: the state the events that follow start from.
    Watching {
        #[serde(default)]
        daemon: DaemonState,
        databases: Vec<Status>,
    },
    Event {
        event: Event,
    },
    /// What one `sync` moved, from its start to its end.
    Sync {
        db: String,
        /// Every upload batch the hub answered during the call, summed.
        upload: UploadTotals,
        /// Changes the hub stored during the call (`upload.applied`).
        uploaded: u64,
        /// The hub's changes applied here during the call.
        downloaded: u64,
    },
    Reload {
        report: crate::daemon::ReloadReport,
    },
    /// The metrics in the OpenMetrics text format.
    Metrics {
        text: String,
    },
    /// Held changes (at most [`HELD_LIST_LIMIT`] per database).
    Held {
        databases: Vec<HeldList>,
    },
    /// What a `retry` did.
    Retried {
        db: String,
        report: RetryReport,
    },
    /// End of a stream that succeeded.
    Done {
        message: String,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

impl Response {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Response {
        Response::Error {
            code,
            message: message.into(),
        }
    }

    /// Whether this line ends the exchange.
    pub fn is_final(&self) -> bool {
        !matches!(
            self,
            Response::Progress(_) | Response::Watching { .. } | Response::Event { .. }
        )
    }
}

impl From<Event> for Response {
    fn from(event: Event) -> Response {
        Response::Event { event }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_request() -> Vec<Request> {
        let db = || "notes".to_owned();
        let dirs = Directions::default();
        vec![
            Request::Status { db: None },
            Request::Pause { db: db(), dirs },
            Request::Resume { db: db(), dirs },
            Request::Reconnect {},
            Request::Wait {
                db: db(),
                dirs,
                timeout_ms: None,
            },
            Request::Progress {
                db: db(),
                dirs,
                follow: true,
            },
            Request::Watch { db: None },
            Request::Sync {
                db: db(),
                timeout_ms: None,
            },
            Request::Reload {},
            Request::Metrics {},
            Request::Held { db: None },
            Request::Retry { db: db() },
        ]
    }

    #[test]
    fn a_request_names_itself_as_it_is_sent() {
        for r in every_request() {
            assert_eq!(serde_json::to_value(&r).unwrap()["cmd"], r.cmd());
        }
        let cmds: Vec<&str> = every_request().iter().map(Request::cmd).collect();
        assert_eq!(cmds, Request::CMDS);
    }

    #[test]
    fn every_request_reads_back_as_it_was_sent() {
        for r in every_request() {
            let line = serde_json::to_string(&r).unwrap();
            assert_eq!(Request::parse(line.as_bytes()), Ok(Some(r)));
        }
        assert_eq!(Request::parse(b""), Ok(None));
        assert_eq!(Request::parse(b" \r"), Ok(None));
        assert_eq!(
            Request::parse(b"{\"cmd\":\"status\"}\r"),
            Ok(Some(Request::Status { db: None }))
        );
    }

    /// Each kind of garbage gets a message naming what is wrong.
    #[test]
    fn garbage_is_named() {
        let cases: &[(&[u8], &str)] = &[
            (
                b"{\"cmd\":\"st\xffatus\"}",
                "not UTF-8 text (byte 0xff at offset 10)",
            ),
            (
                b"this is not json",
                "not valid JSON (expected ident at line 1 column 2)",
            ),
            (
                b"{\"cmd\":\"status\"",
                "not valid JSON (EOF while parsing an object",
            ),
            (b"[1,2]", "not a JSON object"),
            (b"{\"db\":\"notes\"}", "no `cmd` field"),
            (b"{\"cmd\":7}", "`cmd` is 7, not the name of a request"),
            (
                b"{\"cmd\":\"launch\"}",
                "unknown request type \"launch\"; known: status, pause",
            ),
            (b"{\"cmd\":\"wait\"}", "request `wait`: missing field `db`"),
            (
                b"{\"cmd\":\"wait\",\"db\":\"n\",\"timeout_ms\":\"soon\"}",
                "request `wait`: invalid type: string \"soon\", expected u64",
            ),
        ];
        for (line, want) in cases {
            let e = Request::parse(line).unwrap_err();
            assert!(
                e.contains(want),
                "{:?}: {e:?} lacks {want:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn a_daemon_shutting_down_still_answers_what_only_looks() {
        let looks: Vec<&str> = every_request()
            .iter()
            .filter(|r| !r.starts_work())
            .map(Request::cmd)
            .collect();
        assert_eq!(looks, ["status", "watch", "metrics", "held"]);
        for s in DaemonState::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }

    #[test]
    fn a_status_line_without_a_daemon_state_reads_as_running() {
        let r: Response = serde_json::from_str(r#"{"type":"status","databases":[]}"#).unwrap();
        assert!(matches!(
            r,
            Response::Status {
                daemon: DaemonState::Running,
                ..
            }
        ));
    }
}
