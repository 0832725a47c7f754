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

/// Whether the hub takes this device's local changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UploadState {
    /// Local changes go to the hub (once connected and not paused).
    #[default]
    Allowed,
    /// The hub refuses uploads from this token (its welcome said
    /// `read_only`, or it answered an upload `forbidden`): local changes
    /// stay captured until the daemon uses a read-write token. Downloads go
    /// on.
    ReadOnly,
}

impl UploadState {
    pub const ALL: [UploadState; 2] = [UploadState::Allowed, UploadState::ReadOnly];

    /// The name it serializes to.
    pub fn as_str(self) -> &'static str {
        match self {
            UploadState::Allowed => "allowed",
            UploadState::ReadOnly => "read_only",
        }
    }
}

/// The hub's answers to this device's uploads, summed over batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadTotals {
    /// Batches answered.
    pub batches: u64,
    /// Changes answered (applied + conflict + invalid + materialize_error).
    pub total: u64,
    pub applied: u64,
    pub conflict: u64,
    pub invalid: u64,
    pub materialize_error: u64,
}

impl UploadTotals {
    /// Counts one answered batch.
    pub fn add(&mut self, s: &UploadSummary) {
        self.batches += 1;
        self.total += s.total;
        self.applied += s.applied;
        self.conflict += s.conflict;
        self.invalid += s.invalid;
        self.materialize_error += s.materialize_error;
    }

    /// What was answered after `before` was taken.
    pub fn since(&self, before: &UploadTotals) -> UploadTotals {
        UploadTotals {
            batches: self.batches.saturating_sub(before.batches),
            total: self.total.saturating_sub(before.total),
            applied: self.applied.saturating_sub(before.applied),
            conflict: self.conflict.saturating_sub(before.conflict),
            invalid: self.invalid.saturating_sub(before.invalid),
            materialize_error: self
                .materialize_error
                .saturating_sub(before.materialize_error),
        }
    }
}

impl Status {
    /// Why the local changes cannot be uploaded, with their count, when the
    /// hub refuses them; `None` while uploads are allowed.
    pub fn upload_refused(&self) -> Option<String> {
        match self.upload {
            UploadState::Allowed => None,
            UploadState::ReadOnly => Some(format!(
                "refused: the hub token is read-only; {} local change{} wait{} (put a read_write token in the daemon's token file or `token`, then restart the daemon); downloads go on",
                self.pending_changes,
                if self.pending_changes == 1 { "" } else { "s" },
                if self.pending_changes == 1 { "s" } else { "" },
            )),
        }
    }

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
    /// Whether the hub takes this device's changes (as of the last welcome
    /// or upload answer).
    #[serde(default)]
    pub upload: UploadState,
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
    /// Every upload answer since start, summed.
    #[serde(default)]
    pub upload_totals: UploadTotals,
    pub last_error: Option<String>,
    /// Time left before the next connection attempt, in milliseconds, as
    /// of the answer (a status read from the daemon counts down).
    pub backoff_ms: Option<u64>,
    /// When the next connection attempt is due (Unix milliseconds), while
    /// waiting in backoff.
    #[serde(default)]
    pub next_try_at_ms: Option<i64>,
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
    /// Recoveries since start from a hub whose history went back (its store
    /// restored from a backup): the dataset downloaded again, every row sent.
    #[serde(default)]
    pub recoveries: u64,
    /// Rows the last recovery sent again.
    #[serde(default)]
    pub last_recovery_rows: Option<u64>,
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
            upload: UploadState::Allowed,
            consumed: 0,
            last_seq: 0,
            oldest_pending_ms: None,
            held_changes: 0,
            held_reason: None,
            last_upload: None,
            upload_totals: UploadTotals::default(),
            last_error: None,
            backoff_ms: None,
            next_try_at_ms: None,
            uploaded: 0,
            downloaded: 0,
            uploaded_bytes: 0,
            downloaded_bytes: 0,
            connects: 0,
            recoveries: 0,
            last_recovery_rows: None,
        }
    }

    /// Waiting `delay` before the next connection attempt.
    pub fn set_backoff(&mut self, delay: std::time::Duration) {
        self.backoff_ms = Some(delay.as_millis() as u64);
        self.next_try_at_ms = Some(crate::clock::now_ms() + delay.as_millis() as i64);
    }

    /// Not waiting in backoff.
    pub fn clear_backoff(&mut self) {
        self.backoff_ms = None;
        self.next_try_at_ms = None;
    }

    /// [`Status::backoff_ms`] as the time left at `now_ms`.
    pub fn count_down(&mut self, now_ms: i64) {
        if let Some(at) = self.next_try_at_ms {
            self.backoff_ms = Some((at - now_ms).max(0) as u64);
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
        for u in UploadState::ALL {
            assert_eq!(serde_json::to_value(u).unwrap(), u.as_str());
        }
    }

    #[test]
    fn upload_totals_sum_every_batch() {
        let batch = |applied, conflict| UploadSummary {
            total: applied + conflict,
            applied,
            conflict,
            ..UploadSummary::default()
        };
        let mut t = UploadTotals::default();
        t.add(&batch(4000, 0));
        let before = t;
        t.add(&batch(4000, 1));
        t.add(&batch(999, 0));
        let moved = t.since(&before);
        assert_eq!(
            (moved.batches, moved.total, moved.applied, moved.conflict),
            (2, 5000, 4999, 1)
        );
    }

    #[test]
    fn a_read_only_upload_state_says_why_and_how_many_wait() {
        let mut s = Status::new("notes", "notes");
        assert_eq!(s.upload_refused(), None);
        s.upload = UploadState::ReadOnly;
        s.pending_changes = 3;
        let why = s.upload_refused().unwrap();
        assert!(
            why.contains("read-only") && why.contains("3 local changes wait"),
            "{why}"
        );
    }
}
