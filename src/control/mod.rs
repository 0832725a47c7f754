//! The local control socket: newline-delimited JSON requests from the
//! `tether` CLI (or any process allowed to open the socket) to the daemon.
//!
//! [`Request`] and [`Response`] are shared by the daemon ([`server`]) and the
//! CLI ([`client`]); `proto/CONTROL.md` documents them.

pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};

use crate::daemon::DaemonState;
use crate::local::{HeldChange, RetryReport};
use crate::session::status::UploadTotals;
use crate::session::{Event, ReconnectOutcome, Status};

/// Longest request line accepted, in bytes.
pub const MAX_LINE: usize = 64 * 1024;
/// Control clients served at once; more wait for a slot.
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
