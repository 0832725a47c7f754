//! The frames of protocol v1: one typed enum per direction.
//!
//! Every WebSocket binary message holds exactly one frame, encoded as
//! MessagePack with named fields (maps, not arrays), so that fields can be
//! added later without breaking older peers. Enums are externally tagged:
//! a frame is a one-entry map `{ "<type>": { ...fields } }`. See
//! `proto/PROTOCOL.md` for the normative description.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Value;

/// Frames a daemon sends to the hub.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientFrame {
    /// First frame of every connection: who we are and where we stand.
    Hello(Hello),
    /// A batch of local changes to apply on the hub.
    Upload(Upload),
    /// What is the dataset's head now? Answered by [`HubFrame::Head`]; sent
    /// only to a hub whose `welcome` lists the `head` feature.
    Head(HeadAsk),
}

/// Frames the hub sends to a daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HubFrame {
    /// Answer to a valid `hello`; sync may start.
    Welcome(Welcome),
    /// Changes from other clients, in sequence order (catch-up pages and live pushes).
    Changes(Changes),
    /// Marks the end of catch-up: everything up to `head` has been sent.
    CaughtUp(CaughtUp),
    /// Per-change outcome of one `upload` batch.
    UploadResult(UploadResult),
    /// Something went wrong; `fatal` errors are followed by a close.
    Error(ErrorFrame),
    /// Answer to [`ClientFrame::Head`].
    Head(Head),
}

/// Asks for the dataset's head (for a download wait that must not end
/// before this device holds what the hub holds now).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadAsk {
    /// Echoed in the answer.
    pub id: u64,
}

/// The dataset's head when the question arrived: every change up to here
/// is stored, and reaches the client (or is skipped for it) in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Head {
    pub id: u64,
    pub head: u64,
}

/// The `welcome` feature of hubs that answer [`ClientFrame::Head`].
pub const FEATURE_HEAD: &str = "head";

/// Identifies a client and its position.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Must be [`super::PROTOCOL_VERSION`].
    pub protocol: u32,
    /// Stable random id of the local database (kept in `_tether_meta`).
    /// A copy of the database file takes a new one before its first upload.
    pub client_id: String,
    /// Secret proving this connection is the identity's owner: random,
    /// created with `client_id` and never logged. The hub keeps its SHA-256
    /// from the first `hello` of the id and refuses another key for it
    /// (`identity_refused`). Empty only for clients older than the rule.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client_key: String,
    /// The hub namespace to sync with.
    pub dataset: String,
    /// Highest hub sequence number already applied locally (0 = none).
    pub cursor: u64,
    /// The synced tables and their schema, each with its fingerprint.
    pub tables: Vec<TableSchema>,
    /// Whether the hub should also push this client's own changes back.
    #[serde(default)]
    pub echo_own: bool,
    /// Whether the hub should send changes at all (false while downloads
    /// are paused: the session only uploads).
    #[serde(default = "yes")]
    pub subscribe: bool,
    /// The newest change of the dataset's log whose content this client
    /// knows (received, or its own answered `applied`), so that the hub can
    /// tell whether its log still holds that history (a store restored from
    /// a backup does not). Absent for a client that knows none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<Anchor>,
}

/// One change of a dataset's log, by number and content digest
/// ([`super::log_digest`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    pub version: u64,
    pub digest: String,
}

fn yes() -> bool {
    true
}

/// The shape of one synced table, as the hub needs to validate changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSchema {
    pub name: String,
    /// Column names in declaration order; `values` of a change follow this order.
    pub columns: Vec<String>,
    /// Declared column types, same order (part of the fingerprint).
    pub types: Vec<String>,
    /// Indexes into `columns` of the primary key, in key order.
    pub pk: Vec<u32>,
    /// Lowercase hex SHA-256 of the canonical schema text; see PROTOCOL.md.
    /// STRICT is not part of it: devices whose tables differ only in
    /// STRICT sync the same table.
    pub fingerprint: String,
    /// The table is STRICT on this device (`CREATE TABLE ... STRICT`): its
    /// SQLite refuses a value whose type differs from the declared one.
    /// Once a read_write client announced a table STRICT, the hub refuses
    /// such values for every client (`wrong_type`). Absent means false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub strict: bool,
}

/// What a change does to a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Insert or update: `values` holds the whole row.
    Upsert,
    /// Delete: `values` is empty.
    Delete,
}

/// One local change in an upload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// Client-local sequence number, unique and increasing per client; the
    /// hub uses it to make retried uploads idempotent.
    pub seq: u64,
    pub table: String,
    pub op: Op,
    /// Primary key values in key order.
    pub pk: Vec<Value>,
    /// Full row in column order for `upsert`; empty for `delete`.
    pub values: Vec<Value>,
    /// Hub version of the row this change was made against (0 = unseen).
    pub base: u64,
    /// Bit i set = column i was touched locally (used by `merge_columns`).
    pub mask: u64,
}

/// A batch of changes, applied by the hub in one transaction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Upload {
    /// Client-chosen batch number, echoed in the result.
    pub batch: u64,
    /// The client has processed the answers of every change up to this seq;
    /// the hub may forget them (it keeps answers of unacknowledged batches to
    /// answer a resend exactly as the first time).
    #[serde(default)]
    pub acked: u64,
    pub changes: Vec<Change>,
}

/// Whether the token allows uploads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    ReadWrite,
    ReadOnly,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol: u32,
    /// Current last sequence number of the dataset.
    pub head: u64,
    pub access: Access,
    /// Highest client `seq` the hub has already applied for this client.
    pub client_seq: u64,
    /// Optional frames this hub understands (e.g. [`FEATURE_HEAD`]); a
    /// client sends them only when listed. Absent means none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// A change as the hub stores and pushes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RemoteChange {
    /// Dataset sequence number; also the row's new version.
    pub version: u64,
    pub table: String,
    pub op: Op,
    pub pk: Vec<Value>,
    pub values: Vec<Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Changes {
    pub changes: Vec<RemoteChange>,
    /// Every change with a sequence number up to this one has been sent
    /// (own changes are skipped): the client's new cursor once applied.
    pub up_to: u64,
    /// Dataset head when the frame was built (for progress).
    pub head: u64,
}

/// A `changes` frame over borrowed changes. It encodes to the same bytes as
/// [`HubFrame::Changes`]; the hub uses it to send one live batch to many
/// sessions without copying the batch for each of them.
#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangesRef<'a> {
    Changes {
        changes: &'a [&'a RemoteChange],
        up_to: u64,
        head: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaughtUp {
    pub head: u64,
}

/// The hub's state of a row, sent with a conflict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerRow {
    pub version: u64,
    pub deleted: bool,
    /// Whole row in column order; empty when `deleted`.
    pub values: Vec<Value>,
}

/// Why a change was refused without being applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvalidReason {
    /// The table is not declared by the dataset or not announced in `hello`.
    UnknownTable,
    /// `values` does not have one value per column.
    WrongColumnCount,
    /// `pk` does not match the key columns of the row.
    WrongKey,
    /// The same row appears twice in one batch.
    DuplicateRow,
    /// The change is larger than [`super::MAX_CHANGE_BYTES`]: no frame could
    /// carry it to the other devices.
    TooLarge,
    /// A value's type does not fit its column: a key value the key column's
    /// type affinity would convert (or that would equal another key on the
    /// devices), or, in a STRICT table, a value of another type than the
    /// declared one. Every device would store it differently or refuse it.
    WrongType,
}

impl InvalidReason {
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidReason::UnknownTable => "unknown_table",
            InvalidReason::WrongColumnCount => "wrong_column_count",
            InvalidReason::WrongKey => "wrong_key",
            InvalidReason::DuplicateRow => "duplicate_row",
            InvalidReason::TooLarge => "too_large",
            InvalidReason::WrongType => "wrong_type",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Stored; the row is now at `version`.
    Applied { version: u64 },
    /// The row changed on the hub since `base`; here is its current state.
    Conflict { server: ServerRow },
    /// Refused; resending will not help.
    Invalid {
        reason: InvalidReason,
        message: String,
    },
    /// The hub could not store the batch; it may be resent later.
    MaterializeError { message: String },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChangeResult {
    pub seq: u64,
    pub outcome: Outcome,
}

/// Counts of one batch's outcomes (the shape of oversqlite's `UploadSummary`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadSummary {
    pub total: u64,
    pub applied: u64,
    pub conflict: u64,
    pub invalid: u64,
    /// Invalid changes per reason.
    pub invalid_reasons: BTreeMap<String, u64>,
    pub materialize_error: u64,
    pub first_error: Option<String>,
}

impl UploadSummary {
    /// Builds the summary of a list of results.
    pub fn of(results: &[ChangeResult]) -> UploadSummary {
        let mut s = UploadSummary {
            total: results.len() as u64,
            ..Default::default()
        };
        for r in results {
            match &r.outcome {
                Outcome::Applied { .. } => s.applied += 1,
                Outcome::Conflict { .. } => s.conflict += 1,
                Outcome::Invalid { reason, message } => {
                    s.invalid += 1;
                    *s.invalid_reasons
                        .entry(reason.as_str().to_owned())
                        .or_default() += 1;
                    s.first_error.get_or_insert_with(|| message.clone());
                }
                Outcome::MaterializeError { message } => {
                    s.materialize_error += 1;
                    s.first_error.get_or_insert_with(|| message.clone());
                }
            }
        }
        s
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UploadResult {
    pub batch: u64,
    pub results: Vec<ChangeResult>,
    /// Counts of this frame's `results`.
    pub summary: UploadSummary,
    /// True when more `upload_result` frames for the same batch follow: an
    /// answer is split by bytes so that no frame exceeds the limit (conflicts
    /// carry the hub's rows, which can be much larger than the upload). The
    /// batch is answered when a frame with `more = false` arrives. Absent
    /// means false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
}

/// Error classes, split into fatal (retrying cannot help until something is
/// fixed) and retryable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// No valid token.
    Unauthorized,
    /// The token is not valid for this dataset, or is read-only and an upload came.
    Forbidden,
    /// The hub does not speak the client's protocol version.
    UnsupportedVersion,
    /// The hub has no dataset of that name.
    UnknownDataset,
    /// A table in `hello` is not declared by the dataset.
    UnknownTable,
    /// A table's schema differs from the one other clients sync.
    SchemaMismatch,
    /// The frame could not be decoded.
    MalformedFrame,
    /// The frame is larger than the limit.
    FrameTooLarge,
    /// A valid frame at the wrong time (for example `upload` before `hello`).
    UnexpectedFrame,
    /// The hub failed internally; retry later.
    Internal,
    /// The hub is shutting down; reconnect later.
    ShuttingDown,
    /// `hello` named a client id the hub knows under another `client_key`:
    /// this connection is not the device that created the identity.
    IdentityRefused,
    /// An upload reused a client seq the hub stored with other content (or
    /// one whose answer was already acknowledged): two database files share
    /// one identity, as a copied file does. Nothing of the batch was stored;
    /// the client takes a new identity and sends its pending changes again.
    IdentityConflict,
    /// Another connection of the same identity took over this one.
    Replaced,
    /// An upload's sequence numbers break the rules: zero, not increasing,
    /// above [`super::MAX_SEQ`], or too far above the client's last one.
    BadSequence,
    /// The hub's log no longer holds the history this client has seen (its
    /// cursor is past the head, or the change of its `anchor` differs): the
    /// hub's store went back in time, as a restore from a backup does. The
    /// client recovers: it downloads the dataset again and sends its rows.
    HistoryDiverged,
}

impl ErrorCode {
    /// Every error code, in declaration order (for tests and fuzzing).
    pub const ALL: [ErrorCode; 16] = [
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::UnsupportedVersion,
        ErrorCode::UnknownDataset,
        ErrorCode::UnknownTable,
        ErrorCode::SchemaMismatch,
        ErrorCode::MalformedFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::UnexpectedFrame,
        ErrorCode::Internal,
        ErrorCode::ShuttingDown,
        ErrorCode::IdentityRefused,
        ErrorCode::IdentityConflict,
        ErrorCode::Replaced,
        ErrorCode::BadSequence,
        ErrorCode::HistoryDiverged,
    ];

    /// Fatal errors stop the session until the operator fixes something.
    pub fn is_fatal(self) -> bool {
        matches!(
            self,
            ErrorCode::Unauthorized
                | ErrorCode::Forbidden
                | ErrorCode::UnsupportedVersion
                | ErrorCode::UnknownDataset
                | ErrorCode::UnknownTable
                | ErrorCode::SchemaMismatch
                | ErrorCode::IdentityRefused
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::UnknownDataset => "unknown_dataset",
            ErrorCode::UnknownTable => "unknown_table",
            ErrorCode::SchemaMismatch => "schema_mismatch",
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnexpectedFrame => "unexpected_frame",
            ErrorCode::Internal => "internal",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::IdentityRefused => "identity_refused",
            ErrorCode::IdentityConflict => "identity_conflict",
            ErrorCode::Replaced => "replaced",
            ErrorCode::BadSequence => "bad_sequence",
            ErrorCode::HistoryDiverged => "history_diverged",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    pub message: String,
}
