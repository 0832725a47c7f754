//! The hub's storage: per dataset, the current rows and a change log with a
//! gap-free, strictly increasing sequence number.
//!
//! [`HubStore`] is synchronous: the hub calls it from blocking threads
//! (`spawn_blocking`), never from the async runtime. SQL dialect details stay
//! inside each implementation; [`sqlite::SqliteStore`] is the embedded one.

pub mod evolution;
pub mod inspect;
pub mod sqlite;
pub mod types;
pub mod versions;

use std::collections::HashMap;
use std::sync::Arc;

use crate::proto::{Change, ChangeResult, RemoteChange, TableSchema};

/// A change in the log, with the client that made it (to skip echoing it back).
#[derive(Clone, Debug)]
pub struct LogEntry {
    pub change: RemoteChange,
    pub client: Arc<str>,
}

/// What [`HubStore::apply_batch`] did.
#[derive(Debug)]
pub struct Applied {
    pub results: Vec<ChangeResult>,
    /// Changes newly written to the log, in sequence order.
    pub logged: Vec<LogEntry>,
    /// Dataset head after the batch.
    pub head: u64,
}

/// A page of the change log.
#[derive(Debug)]
pub struct Page {
    /// Changes in sequence order, without those skipped by `exclude_client`.
    pub changes: Vec<RemoteChange>,
    /// Every change up to this sequence number was scanned.
    pub up_to: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("table {table:?} of dataset {dataset:?} has schema {got} here but {want} on the hub, whose store was made before schema versions and knows only that fingerprint, so it cannot tell added columns from a breaking change. If this device's schema is the one to keep, run `tether hub schema {dataset} --accept {table}` on the hub (devices whose table is a prefix of it, without the added columns, keep syncing); otherwise undo the change on this device")]
    SchemaMismatch {
        dataset: String,
        table: String,
        got: String,
        want: String,
    },
    /// A table's schema breaks with the dataset's (see [`evolution`]);
    /// `key`: the primary key changed, which cannot be accepted in place.
    #[error("table {table:?} of dataset {dataset:?} changed in a way devices cannot sync alongside the hub's version {version}: {what}. {}", schema_fix(dataset, table, *key))]
    SchemaChanged {
        dataset: String,
        table: String,
        version: u64,
        what: String,
        key: bool,
    },
    /// The client's schema is older than the dataset's last accepted
    /// breaking change.
    #[error("table {table:?} of dataset {dataset:?}: this device's app has a schema the operator retired with version {floor} ({change}); upgrade the app on this device: its table must have at least the columns {columns}")]
    SchemaRetired {
        dataset: String,
        table: String,
        floor: u64,
        change: String,
        columns: String,
    },
    /// A read_only token's `hello` named a table the dataset has not
    /// registered: only read_write clients register tables.
    #[error("table {table:?} of dataset {dataset:?} is not registered on the hub yet, and a read_only token cannot register a table (it may sync only tables a read_write client registered); connect a device with a read_write token that syncs {table:?} first, or remove the table from this device's `tables`")]
    NotRegistered { dataset: String, table: String },
    /// `hello` carried another key than the one recorded for the client id
    /// (or none while one is recorded).
    #[error("client id {client:?} of dataset {dataset:?} belongs to another device: this connection did not present the key of the device that created the identity. If this database file is a copy of another device's, tether gives it a new identity by itself; otherwise check which other device or program uses this client id")]
    IdentityRefused { dataset: String, client: String },
    /// An upload reused a client seq: two files share one identity. Nothing
    /// of the batch was stored.
    #[error("{0}")]
    IdentityConflict(String),
    /// An upload's sequence numbers break the rules. Nothing of the batch
    /// was stored.
    #[error("{0}")]
    BadSequence(String),
    #[error("hub store: {0}")]
    Backend(String),
}

/// What the operator does about a breaking change.
fn schema_fix(dataset: &str, table: &str, key: bool) -> String {
    if key {
        format!("A new primary key makes other rows of the same data, so the hub cannot take it in place: create a new table with the new key (for example {table}_v2), copy the rows into it and sync that table instead (add it to `tables` in tether.toml and to the dataset in hub.toml), or undo the change on this device")
    } else {
        format!("Only new columns at the end (ALTER TABLE ... ADD COLUMN) and new tables roll out by themselves. If this change is deliberate, accept it on the hub with `tether hub schema {dataset} --accept {table}`: this device's schema then becomes the next version, and devices whose app still has the old schema are refused until it is upgraded. Otherwise undo the change on this device")
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

/// Storage behind the hub.
pub trait HubStore: Send + Sync + 'static {
    /// Checks each table of `client`'s `hello` against the dataset's
    /// versioned schema ([`evolution::compare`]): the same schema, one with
    /// columns added at the end, or an older one (a prefix) are taken;
    /// a schema from before the last accepted breaking change is
    /// [`StoreError::SchemaRetired`], any other change
    /// [`StoreError::SchemaChanged`]. Only when `may_register` (a
    /// read_write token) is anything recorded: a new table, added columns
    /// (a new version), STRICT (for good: its values are then checked by
    /// STRICT rules, see [`HubStore::apply_batch`]), and a breaking change
    /// the operator armed ([`HubStore::accept_breaking`]), whose rows are
    /// written again in the new layout and returned, to be published. A
    /// read_only client naming an unregistered table is
    /// [`StoreError::NotRegistered`].
    fn register_schema(
        &self,
        dataset: &str,
        client: &str,
        tables: &[TableSchema],
        may_register: bool,
    ) -> Result<Vec<LogEntry>, StoreError>;

    /// The dataset's tables with every version of their schema.
    fn schema_history(&self, dataset: &str) -> Result<Vec<versions::TableHistory>, StoreError>;

    /// Arms a breaking change of `table`: the next read_write client whose
    /// schema of it breaks with the current one makes it the new version,
    /// and clients with older schemas are refused from then on.
    fn accept_breaking(&self, dataset: &str, table: &str) -> Result<(), StoreError>;

    /// Last sequence number of the dataset (0 when empty).
    fn head(&self, dataset: &str) -> Result<u64, StoreError>;

    /// [`crate::proto::log_digest`] of the log's change at `seq`; `None`
    /// when the log holds no change there.
    fn log_digest(&self, dataset: &str, seq: u64) -> Result<Option<String>, StoreError>;

    /// Highest client seq already applied for this client.
    fn client_seq(&self, dataset: &str, client: &str) -> Result<u64, StoreError>;

    /// Claims the identity at `hello`: the first `hello` of a client id
    /// records the SHA-256 of `key` (and creates the client); a later one
    /// must present the same key, else [`StoreError::IdentityRefused`]. An
    /// empty key is accepted only while none is recorded (clients older than
    /// keys); the first non-empty key then claims the id. Returns the
    /// client's high-water mark ([`HubStore::client_seq`]).
    fn claim_identity(&self, dataset: &str, client: &str, key: &str) -> Result<u64, StoreError>;

    /// Applies a batch in one transaction, after checking the sequence rules
    /// for the whole batch (nothing is stored when one fails):
    ///
    /// * every seq in `1..=MAX_SEQ`, strictly increasing, and at most
    ///   `MAX_SEQ_JUMP` above the previous one (the client's high-water mark
    ///   for the first new one), else [`StoreError::BadSequence`];
    /// * a seq at or below the client's acked mark (the highest `acked` seen,
    ///   at most the high-water mark) was answered and processed: never a
    ///   resend, [`StoreError::IdentityConflict`];
    /// * a seq above the acked mark and at or below the high-water mark is a
    ///   resend only if remembered with the same content (table, op, key,
    ///   values); it is answered as the first time and not applied again.
    ///   Other content, or a seq not remembered: `IdentityConflict`.
    ///
    /// Each new change is then validated (answered `invalid`, never stored,
    /// the rest of the batch going on): shape, size, and types: key values
    /// must fit the key columns' affinity (see [`types::key_refusal`]), and
    /// in a table recorded STRICT every value its declared type
    /// ([`types::strict_refusal`]).
    ///
    /// Answers of changes up to the acked mark may be forgotten.
    fn apply_batch(
        &self,
        dataset: &str,
        client: &str,
        tables: &HashMap<String, TableSchema>,
        changes: &[Change],
        acked: u64,
    ) -> Result<Applied, StoreError>;

    /// Log entries after `after`, at most `max_changes` scanned and about
    /// `max_bytes` returned.
    fn changes_since(
        &self,
        dataset: &str,
        after: u64,
        exclude_client: Option<&str>,
        max_changes: usize,
        max_bytes: usize,
    ) -> Result<Page, StoreError>;

    /// Figures of `datasets` and of the store for the admin interface
    /// ([`inspect`]); may take a while on a large store, and holds up
    /// neither uploads nor catch-up reads.
    fn inspect(&self, datasets: &[String]) -> Result<inspect::Inspection, StoreError>;
}
