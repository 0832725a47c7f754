//! What a session reports about itself: typed states, published through a
//! `tokio::sync::watch` channel that the daemon, the tests and (later) the
//! control socket read.

use serde::{Deserialize, Serialize};

use crate::proto::UploadSummary;

/// State of the WebSocket connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionState {
    Disconnected,
    Connecting,
    Connected,
}

/// State of the sync session, independent of the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// Syncing, or trying to connect in order to sync.
    Active,
    /// Paused in both directions by the operator; no connection is kept.
    Paused,
    /// The hub refused the token; waiting for a new one.
    WaitingForAccessToken,
    /// Shutting down, still flushing.
    Dying,
    /// Stopped.
    Inactive,
    /// Cannot make progress until something is fixed; see `last_error`.
    Error,
}

impl Status {
    /// Why the session cannot make progress now, if it cannot (what a wait
    /// or a one-shot round reports instead of running into its timeout).
    pub fn failure(&self) -> Option<String> {
        match self.session {
            SessionState::Error | SessionState::WaitingForAccessToken => Some(
                self.last_error
                    .clone()
                    .unwrap_or_else(|| "session failed".into()),
            ),
            SessionState::Inactive => Some("session stopped".into()),
            _ => None,
        }
    }

    /// Everything up to `up_to` is applied (or skipped); the hub was at
    /// `head` at least. Neither goes back.
    pub fn reached(&mut self, up_to: u64, head: u64) {
        self.cursor = self.cursor.max(up_to);
        self.hub_head = self.hub_head.max(head).max(up_to);
    }

    /// Takes the counts of a look at the capture log.
    pub fn set_pending(&mut self, p: &crate::local::Pending) {
        self.pending_changes = p.changes;
        self.consumed = p.consumed;
        self.last_seq = p.last_seq;
        self.held_changes = p.held;
        self.held_reason = p.held_reason.clone();
    }
}

impl ConnectionState {
    pub const ALL: [ConnectionState; 3] = [
        ConnectionState::Disconnected,
        ConnectionState::Connecting,
        ConnectionState::Connected,
    ];

    /// The name it serializes to.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Disconnected => "disconnected",
            ConnectionState::Connecting => "connecting",
            ConnectionState::Connected => "connected",
        }
    }
}

impl SessionState {
    pub const ALL: [SessionState; 6] = [
        SessionState::Active,
        SessionState::Paused,
        SessionState::WaitingForAccessToken,
        SessionState::Dying,
        SessionState::Inactive,
        SessionState::Error,
    ];

    /// The name it serializes to.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Active => "active",
            SessionState::Paused => "paused",
            SessionState::WaitingForAccessToken => "waiting_for_access_token",
            SessionState::Dying => "dying",
            SessionState::Inactive => "inactive",
            SessionState::Error => "error",
        }
    }
}

/// A snapshot of one session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub name: String,
    pub dataset: String,
    pub connection: ConnectionState,
    pub session: SessionState,
    /// Rows with a pending local change.
    pub pending_changes: u64,
    /// Highest hub sequence number applied locally.
    pub cursor: u64,
    /// Hub's last sequence number as last heard.
    pub hub_head: u64,
    /// Whether the initial catch-up of the current connection is done.
    pub caught_up: bool,
    pub upload_paused: bool,
    pub download_paused: bool,
    /// Capture log answered by the hub up to this client seq.
    pub consumed: u64,
    /// Newest client seq captured (as of the last look at the log).
    pub last_seq: u64,
    /// Age of the oldest pending local change, in milliseconds.
    pub oldest_pending_ms: Option<u64>,
    /// The hub's changes the local database refused, set aside until they
    /// apply (`tether held` lists them, `tether retry` tries them again).
    #[serde(default)]
    pub held_changes: u64,
    /// Why the newest held change was refused.
    #[serde(default)]
    pub held_reason: Option<String>,
    pub last_upload: Option<UploadSummary>,
    pub last_error: Option<String>,
    /// Delay before the next connection attempt, in milliseconds.
    pub backoff_ms: Option<u64>,
    /// Changes the hub acknowledged as applied since start.
    pub uploaded: u64,
    /// Remote changes applied locally since start.
    pub downloaded: u64,
    /// Encoded bytes of upload frames answered since start.
    pub uploaded_bytes: u64,
    /// Encoded bytes of change frames received since start.
    pub downloaded_bytes: u64,
    /// Connections established since start.
    pub connects: u64,
}

impl Status {
    pub fn new(name: &str, dataset: &str) -> Status {
        Status {
            name: name.to_owned(),
            dataset: dataset.to_owned(),
            connection: ConnectionState::Disconnected,
            session: SessionState::Active,
            pending_changes: 0,
            cursor: 0,
            hub_head: 0,
            caught_up: false,
            upload_paused: false,
            download_paused: false,
            consumed: 0,
            last_seq: 0,
            oldest_pending_ms: None,
            held_changes: 0,
            held_reason: None,
            last_upload: None,
            last_error: None,
            backoff_ms: None,
            uploaded: 0,
            downloaded: 0,
            uploaded_bytes: 0,
            downloaded_bytes: 0,
            connects: 0,
        }
    }
}

/// Something that happened to a session, for `tether watch`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Connection {
        db: String,
        old: ConnectionState,
        new: ConnectionState,
    },
    Session {
        db: String,
        old: SessionState,
        new: SessionState,
    },
    Upload {
        db: String,
        summary: UploadSummary,
    },
    Download {
        db: String,
        changes: u64,
        cursor: u64,
        hub_head: u64,
    },
    Error {
        db: String,
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_are_their_serialized_names() {
        for s in SessionState::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for c in ConnectionState::ALL {
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
    }
}
