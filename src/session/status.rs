//! What a session reports about itself: typed states, published through a
//! `tokio::sync::watch` channel that the daemon, the tests and (later) the
//! control socket read.

use serde::Serialize;

use crate::proto::UploadSummary;

/// State of the WebSocket connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionState {
    Disconnected,
    Connecting,
    Connected,
}

/// State of the sync session, independent of the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// Syncing, or trying to connect in order to sync.
    Active,
    /// The hub refused the token; waiting for a new one.
    WaitingForAccessToken,
    /// Shutting down, still flushing.
    Dying,
    /// Stopped.
    Inactive,
    /// Cannot make progress until something is fixed; see `last_error`.
    Error,
}

/// A snapshot of one session.
#[derive(Clone, Debug, Serialize)]
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
    pub last_upload: Option<UploadSummary>,
    pub last_error: Option<String>,
    /// Delay before the next connection attempt, in milliseconds.
    pub backoff_ms: Option<u64>,
    /// Changes the hub acknowledged as applied since start.
    pub uploaded: u64,
    /// Remote changes applied locally since start.
    pub downloaded: u64,
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
            last_upload: None,
            last_error: None,
            backoff_ms: None,
            uploaded: 0,
            downloaded: 0,
            connects: 0,
        }
    }
}
