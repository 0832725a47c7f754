//! The embedded hub store: one SQLite file in WAL mode, a writer connection
//! for batches and a reader connection for catch-up, so that a client paging
//! through history does not hold up uploads.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::evolution::{self, Relation};
use super::versions::{self, Registrant, TableHistory};
use super::{types, Applied, HubStore, LogEntry, Page, StoreError};
use crate::proto::{
    decode_key, decode_values, encode_key, encode_values, Change, ChangeResult, InvalidReason, Op,
    Outcome, RemoteChange, ServerRow, TableSchema, Value, MAX_CHANGE_BYTES, MAX_SEQ, MAX_SEQ_JUMP,
};

/// Shared tables. Each dataset also gets `log_<id>` (the change log; its
/// INTEGER PRIMARY KEY is the dataset's sequence number, so appending is cheap)
/// and `rows_<id>` (per row: current version, tombstone flag and last writer;
/// the row's values are those of its log entry at `version`).
///
/// `tables`: per table of a dataset, the fingerprint of its current schema,
/// whether a read_write client announced it STRICT (its values are then
/// checked by STRICT rules for every client), and its schema version (see
/// [`versions`], which also keeps `schema_versions`).
///
/// `clients`: per client, its high-water mark `last_seq`, its `acked` mark
/// (answers up to it were processed) and `key_hash`, the SHA-256 of the key
/// that claimed the id (NULL: none yet). `client_batches`: the remembered
/// answers of a batch (`results`) and, per answer, the digest of its
/// change's content (`digests`, 32 bytes each in the same order; NULL in
/// rows written by hubs older than digests).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS datasets (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, head INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS tables (dataset INTEGER NOT NULL, name TEXT NOT NULL, fingerprint TEXT NOT NULL, strict INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (dataset, name));
CREATE TABLE IF NOT EXISTS clients (no INTEGER PRIMARY KEY, dataset INTEGER NOT NULL, client TEXT NOT NULL, last_seq INTEGER NOT NULL DEFAULT 0, acked INTEGER NOT NULL DEFAULT 0, key_hash BLOB, UNIQUE (dataset, client));
CREATE TABLE IF NOT EXISTS client_batches (client_no INTEGER NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL, results BLOB NOT NULL, digests BLOB, PRIMARY KEY (client_no, first));
";

/// Columns added after stores were first made: (table, column, declaration).
/// A store that lacks one gets it in place when opened.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("clients", "acked", "INTEGER NOT NULL DEFAULT 0"),
    ("clients", "key_hash", "BLOB"),
    ("client_batches", "digests", "BLOB"),
    ("tables", "strict", "INTEGER NOT NULL DEFAULT 0"),
    ("tables", "version", "INTEGER NOT NULL DEFAULT 1"),
    ("tables", "floor", "INTEGER NOT NULL DEFAULT 1"),
    ("tables", "accept", "INTEGER NOT NULL DEFAULT 0"),
];

/// Adds the [`ADDED_COLUMNS`] a store made by an older hub lacks.
fn migrate(c: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let failed = |e: rusqlite::Error| {
        StoreError::Backend(format!(
            "upgrading the hub store {} to this version: {e}; check that the file is writable and not used by an older hub",
            path.display()
        ))
    };
    let tx = c
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(failed)?;
    for (table, column, decl) in ADDED_COLUMNS {
        let present: i64 = tx
            .query_row(
                "SELECT count(*) FROM pragma_table_info(?1) WHERE name = ?2",
                [table, column],
                |r| r.get(0),
            )
            .map_err(failed)?;
        if present == 0 {
            tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))
                .map_err(failed)?;
            tracing::info!(store = %path.display(), table, column, "hub store upgraded: column added");
        }
    }
    tx.commit().map_err(failed)
}

/// Length of a change's content digest.
const DIGEST_BYTES: usize = 32;

/// Digest of what a change says: table, op, key and values. Not `base` nor
/// `mask`, which a daemon recomputes when it reads its log again after a
/// reconnect; a resend of a seq must match the remembered digest.
fn content_digest(table: &str, op: Op, pk: &[u8], vals: &[u8]) -> [u8; DIGEST_BYTES] {
    let mut h = Sha256::new();
    h.update((table.len() as u64).to_le_bytes());
    h.update(table.as_bytes());
    h.update([match op {
        Op::Upsert => 1u8,
        Op::Delete => 2u8,
    }]);
    h.update((pk.len() as u64).to_le_bytes());
    h.update(pk);
    h.update(vals);
    h.finalize().into()
}

/// SHA-256 of a client key, as recorded in `clients.key_hash`.
fn key_hash(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// Checks the seqs of a batch before anything of it is looked at: each in
/// `1..=MAX_SEQ`, strictly increasing, and at most [`MAX_SEQ_JUMP`] above the
/// previous one (the client's high-water mark `hwm` for the first new one).
/// The client's row number, last seq and acknowledged mark (the row is made
/// on the first batch of a client the hub has not seen).
fn client_marks(tx: &Connection, ds: i64, client: &str) -> Result<(i64, u64, i64), StoreError> {
    tx.prepare_cached(
        "INSERT INTO clients (dataset, client) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
    )?
    .execute(params![ds, client])?;
    let (client_no, hwm, acked_mark): (i64, i64, i64) = tx
        .prepare_cached(
            "SELECT no, last_seq, acked FROM clients WHERE dataset = ?1 AND client = ?2",
        )?
        .query_row(params![ds, client], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
    Ok((client_no, hwm as u64, acked_mark))
}

/// Keeps a batch's answers, with the content digest of each new change, to
/// answer a resend exactly as the first time.
fn remember_answers(
    tx: &Connection,
    client_no: i64,
    remember: &[(u64, Remembered)],
    digests: Vec<u8>,
) -> Result<(), StoreError> {
    if let (Some(first), Some(last)) = (remember.first(), remember.last()) {
        tx.prepare_cached(
            "INSERT INTO client_batches (client_no, first, last, results, digests) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (client_no, first) DO UPDATE SET last = excluded.last, results = excluded.results, digests = excluded.digests",
        )?
        .execute(params![
            client_no,
            first.0 as i64,
            last.0 as i64,
            rmp_serde::to_vec(remember).expect("BUG: encodes"),
            digests
        ])?;
    }
    Ok(())
}

/// The dataset's statements of a batch, named once per batch rather than
/// per row.
struct BatchSql {
    upsert_row: String,
    update_row: String,
    log: String,
    /// The dataset holds rows the hub rewrote in a breaking change's new
    /// layout (see [`versions`]): an upsert may repeat one.
    any_rewritten: bool,
}

impl BatchSql {
    fn new(ds: i64) -> BatchSql {
        BatchSql {
            upsert_row: format!(
                "INSERT INTO rows_{ds} (tbl, pk, version, deleted, client_no) VALUES (?1, ?2, ?3, 0, ?4)
                 ON CONFLICT (tbl, pk) DO UPDATE SET version = excluded.version, deleted = 0, client_no = excluded.client_no
                 WHERE version = ?5 OR client_no = ?4"
            ),
            update_row: format!(
                "UPDATE rows_{ds} SET version = ?3, deleted = ?4, client_no = ?5 WHERE tbl = ?1 AND pk = ?2"
            ),
            log: format!(
                "INSERT INTO log_{ds} (seq, tbl, pk, op, vals, client_no) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
            ),
            any_rewritten: false,
        }
    }
}

/// The answer to a change whose seq this client used before (`marks` =
/// its acknowledged mark and its last seq): the first answer again, if the
/// hub remembers that seq with the same content; otherwise two files share
/// the identity, and nothing of the batch may be stored.
fn resend_answer(
    tx: &Connection,
    ds: i64,
    client: &str,
    ch: &Change,
    pk: &[u8],
    (acked_mark, hwm): (u64, u64),
    remembered: &HashMap<u64, (Remembered, Option<[u8; DIGEST_BYTES]>)>,
) -> Result<Outcome, StoreError> {
    if ch.seq <= acked_mark {
        return Err(conflict(
            client,
            ch.seq,
            &format!("was answered and the client acknowledged that answer (acked up to {acked_mark}), so it is never sent again"),
        ));
    }
    let Some((first, digest)) = remembered.get(&ch.seq) else {
        return Err(conflict(
            client,
            ch.seq,
            &format!("was used before (the client's last seq is {hwm}) by a change this hub does not remember"),
        ));
    };
    let same = digest
        .is_none_or(|d| d == content_digest(&ch.table, ch.op, pk, &encode_values(&ch.values)));
    if !same {
        return Err(conflict(client, ch.seq, "was stored with other content"));
    }
    Ok(match first {
        Remembered::Applied(v) => Outcome::Applied { version: *v },
        Remembered::Invalid(reason, message) => Outcome::Invalid {
            reason: *reason,
            message: message.clone(),
        },
        Remembered::Conflict => Outcome::Conflict {
            server: server_row(tx, ds, load_row(tx, ds, &ch.table, pk)?.as_ref())?,
        },
    })
}

/// Writes one valid new change: its answer to remember, the outcome, and
/// whether it was stored in the log at the new `head`.
///
/// A change conflicts when the row exists, moved since the version the
/// change was made against, and was last written by another client (a row
/// this client wrote last was the base of its new change).
#[allow(clippy::too_many_arguments)]
fn write_change(
    tx: &Connection,
    sql: &BatchSql,
    ds: i64,
    client_no: i64,
    head: &mut u64,
    ch: &Change,
    pk: &[u8],
    vals: Vec<u8>,
) -> Result<(Remembered, Outcome, bool), StoreError> {
    let conflicted = |row: Option<RowState>| -> Result<_, StoreError> {
        let server = server_row(tx, ds, row.as_ref())?;
        Ok((Remembered::Conflict, Outcome::Conflict { server }, false))
    };
    let (op, deleted) = match ch.op {
        Op::Upsert => (1, false),
        Op::Delete => (2, true),
    };
    if ch.op == Op::Upsert && sql.any_rewritten {
        if let Some(version) = repeats_rewrite(tx, ds, ch, pk, &vals)? {
            // The device sends again what the hub's rewrite holds (a table
            // rebuilt for a breaking change is captured again whole): no
            // new version, so changes made against the rewrite's version
            // by devices that upgrade later do not conflict.
            return Ok((
                Remembered::Applied(version),
                Outcome::Applied { version },
                false,
            ));
        }
    }
    if ch.op == Op::Upsert {
        // Fast path: one statement writes the row unless it conflicts.
        let written = tx.prepare_cached(&sql.upsert_row)?.execute(params![
            ch.table,
            pk,
            (*head + 1) as i64,
            client_no,
            ch.base as i64
        ])?;
        if written == 0 {
            let row = load_row(tx, ds, &ch.table, pk)?;
            if !rewritten_over(tx, ds, ch, pk, row.as_ref())? {
                return conflicted(row);
            }
            tx.prepare_cached(&sql.update_row)?.execute(params![
                ch.table,
                pk,
                (*head + 1) as i64,
                false,
                client_no
            ])?;
        }
        *head += 1;
    } else {
        let row = load_row(tx, ds, &ch.table, pk)?;
        if row
            .as_ref()
            .is_some_and(|r| r.version != ch.base && r.client_no != client_no)
            && !rewritten_over(tx, ds, ch, pk, row.as_ref())?
        {
            return conflicted(row);
        }
        if row.as_ref().map(|r| r.deleted).unwrap_or(true) {
            // Deleting what is not there changes nothing.
            let version = row.map(|r| r.version).unwrap_or(0);
            return Ok((
                Remembered::Applied(version),
                Outcome::Applied { version },
                false,
            ));
        }
        *head += 1;
        tx.prepare_cached(&sql.update_row)?.execute(params![
            ch.table,
            pk,
            *head as i64,
            deleted,
            client_no
        ])?;
    }
    tx.prepare_cached(&sql.log)?.execute(params![
        *head as i64,
        ch.table,
        pk,
        op,
        vals,
        client_no
    ])?;
    Ok((
        Remembered::Applied(*head),
        Outcome::Applied { version: *head },
        true,
    ))
}

/// The row's version when it is the hub's rewrite of the row and holds
/// exactly `vals`.
fn repeats_rewrite(
    tx: &Connection,
    ds: i64,
    ch: &Change,
    pk: &[u8],
    vals: &[u8],
) -> Result<Option<u64>, StoreError> {
    let Some(row) = load_row(tx, ds, &ch.table, pk)?.filter(|r| !r.deleted) else {
        return Ok(None);
    };
    if versions::rewritten_from(tx, ds, &ch.table, pk, row.version)?.is_none() {
        return Ok(None);
    }
    let stored: Vec<u8> = tx
        .prepare_cached(&format!("SELECT vals FROM log_{ds} WHERE seq = ?1"))?
        .query_row([row.version as i64], |r| r.get(0))?;
    Ok((stored == vals).then_some(row.version))
}

/// Whether the row's newest version is the hub's rewrite of it in a
/// breaking change's new layout, and the change was made against the
/// version before: not a conflict, since nobody wrote the row in between
/// (a device refused until its app upgraded sends such changes).
fn rewritten_over(
    tx: &Connection,
    ds: i64,
    ch: &Change,
    pk: &[u8],
    row: Option<&RowState>,
) -> Result<bool, StoreError> {
    let Some(r) = row else {
        return Ok(false);
    };
    Ok(versions::rewritten_from(tx, ds, &ch.table, pk, r.version)? == Some(ch.base))
}

fn check_seqs(client: &str, changes: &[Change], hwm: u64) -> Result<(), StoreError> {
    let refuse = |what: String| {
        Err(StoreError::BadSequence(format!(
            "{what}; nothing of this batch was stored (a tether daemon never numbers its changes so: check which program connects with client id {client:?})"
        )))
    };
    let mut prev: Option<u64> = None;
    let mut top = hwm;
    for ch in changes {
        let seq = ch.seq;
        if seq == 0 || seq > MAX_SEQ {
            return refuse(format!(
                "client seq {seq} of client {client:?} is out of range: client seqs run from 1 to {MAX_SEQ}"
            ));
        }
        if let Some(p) = prev.filter(|&p| seq <= p) {
            return refuse(format!(
                "client seq {seq} of client {client:?} follows seq {p} in the same batch: seqs must strictly increase within a batch"
            ));
        }
        if seq > top {
            if seq - top > MAX_SEQ_JUMP {
                return refuse(format!(
                    "client seq {seq} of client {client:?} is {} above the previous seq {top}: a client's seq grows by at most {MAX_SEQ_JUMP} at once",
                    seq - top
                ));
            }
            top = seq;
        }
        prev = Some(seq);
    }
    Ok(())
}

/// The refusal of a seq reused by another file with the same identity.
fn conflict(client: &str, seq: u64, why: &str) -> StoreError {
    StoreError::IdentityConflict(format!(
        "client seq {seq} of client {client:?} {why}: two database files share this identity (a copied file?); nothing of this batch was stored"
    ))
}

/// The names of a dataset's log and rows tables.
pub(super) fn dataset_tables(id: i64) -> (String, String) {
    (format!("log_{id}"), format!("rows_{id}"))
}

fn dataset_sql(id: i64) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS log_{id} (seq INTEGER PRIMARY KEY, tbl TEXT NOT NULL, pk BLOB NOT NULL, op INTEGER NOT NULL, vals BLOB NOT NULL, client_no INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rows_{id} (tbl TEXT NOT NULL, pk BLOB NOT NULL, version INTEGER NOT NULL, deleted INTEGER NOT NULL, client_no INTEGER NOT NULL, PRIMARY KEY (tbl, pk)) WITHOUT ROWID;"
    )
}

/// Outcome of one change as remembered for retries of the same batch.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum Remembered {
    Applied(u64),
    Conflict,
    Invalid(InvalidReason, String),
}

pub struct SqliteStore {
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    ids: Mutex<HashMap<String, i64>>,
}

fn open(path: &Path) -> Result<Connection, StoreError> {
    let c = Connection::open(path)
        .map_err(|e| StoreError::Backend(format!("opening {}: {e}", path.display())))?;
    c.busy_timeout(std::time::Duration::from_secs(10))?;
    // WAL with synchronous=FULL: a batch is on disk before the hub answers
    // it, and a daemon deletes its captured changes on that answer, so an
    // answered batch must survive a power loss, not only a crash (NORMAL
    // would only promise the latter). One fsync per batch, not per row.
    // Checkpoints every 32 MiB of WAL rather than 4 MiB: rows with random
    // keys dirty pages all over the table, and a page rewritten by several
    // batches is then copied back to the database file once.
    c.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA cache_size = -65536; PRAGMA temp_store = MEMORY; PRAGMA wal_autocheckpoint = 8192;",
    )?;
    Ok(c)
}

/// Creates the store's directory (mode 0750) when its parent exists, so a
/// first start needs no `mkdir`; a missing parent is more likely a typo in
/// `store` than a directory to invent, and is refused.
fn prepare_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    let parent_exists = dir
        .parent()
        .is_none_or(|p| p.as_os_str().is_empty() || p.is_dir());
    if !parent_exists {
        return Err(StoreError::Backend(format!(
            "directory {} of the hub store does not exist, nor does its parent; create it or change `store`",
            dir.display()
        )));
    }
    std::fs::DirBuilder::new()
        .mode(0o750)
        .create(dir)
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists if dir.is_dir() => Ok(()),
            _ => Err(e),
        })
        .map_err(|e| {
            StoreError::Backend(format!(
                "cannot create directory {} of the hub store ({e}); create it or change `store`",
                dir.display()
            ))
        })
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent() {
            prepare_dir(dir)?;
        }
        let mut writer = open(path)?;
        writer.execute_batch(SCHEMA)?;
        writer.execute_batch(versions::SQL)?;
        migrate(&mut writer, path)?;
        let reader = open(path)?;
        Ok(SqliteStore {
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
            ids: Mutex::new(HashMap::new()),
        })
    }

    /// The dataset's id, creating the dataset's tables on first use.
    fn dataset_id(&self, c: &Connection, name: &str) -> Result<i64, StoreError> {
        if let Some(id) = self.ids.lock().expect("BUG: poisoned").get(name) {
            return Ok(*id);
        }
        c.execute(
            "INSERT INTO datasets (name) VALUES (?1) ON CONFLICT (name) DO NOTHING",
            [name],
        )?;
        let id: i64 = c.query_row("SELECT id FROM datasets WHERE name = ?1", [name], |r| {
            r.get(0)
        })?;
        c.execute_batch(&dataset_sql(id))?;
        self.ids
            .lock()
            .expect("BUG: poisoned")
            .insert(name.to_owned(), id);
        Ok(id)
    }

    /// Looks a dataset up without creating it (reader side).
    fn known_dataset(&self, c: &Connection, name: &str) -> Result<Option<i64>, StoreError> {
        if let Some(id) = self.ids.lock().expect("BUG: poisoned").get(name) {
            return Ok(Some(*id));
        }
        Ok(
            c.query_row("SELECT id FROM datasets WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?,
        )
    }
}

struct RowState {
    version: u64,
    deleted: bool,
    client_no: i64,
}

fn load_row(c: &Connection, ds: i64, tbl: &str, pk: &[u8]) -> Result<Option<RowState>, StoreError> {
    Ok(c.prepare_cached(&format!(
        "SELECT version, deleted, client_no FROM rows_{ds} WHERE tbl = ?1 AND pk = ?2"
    ))?
    .query_row(params![tbl, pk], |r| {
        Ok(RowState {
            version: r.get::<_, i64>(0)? as u64,
            deleted: r.get(1)?,
            client_no: r.get(2)?,
        })
    })
    .optional()?)
}

/// The row's current state, values read from its log entry.
fn server_row(c: &Connection, ds: i64, row: Option<&RowState>) -> Result<ServerRow, StoreError> {
    let Some(r) = row else {
        return Ok(ServerRow {
            version: 0,
            deleted: true,
            values: Vec::new(),
        });
    };
    let values = if r.deleted {
        Vec::new()
    } else {
        let vals: Vec<u8> = c
            .prepare_cached(&format!("SELECT vals FROM log_{ds} WHERE seq = ?1"))?
            .query_row([r.version as i64], |r| r.get(0))?;
        decode_values(&vals).map_err(|e| StoreError::Backend(e.to_string()))?
    };
    Ok(ServerRow {
        version: r.version,
        deleted: r.deleted,
        values,
    })
}

/// What a batch needs to know of a table, read once per batch.
struct TableState {
    /// Recorded STRICT: values are checked by STRICT rules.
    strict: bool,
    /// Columns of the table's current schema version.
    columns: usize,
}

/// The table's state; refuses the batch when the session's schema of it
/// was retired by a breaking change accepted after the session started.
fn table_state(
    tx: &Connection,
    ds: i64,
    dataset: &str,
    name: &str,
    announced: Option<&TableSchema>,
) -> Result<TableState, StoreError> {
    let recorded: Option<(bool, i64, i64)> = tx
        .prepare_cached(
            "SELECT strict, version, floor FROM tables WHERE dataset = ?1 AND name = ?2",
        )?
        .query_row(params![ds, name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((strict, version, floor)) = recorded else {
        return Ok(TableState {
            strict: false,
            columns: 0,
        });
    };
    let current = versions::schema_at(tx, ds, name, version as u64)?;
    if let (Some(a), true) = (announced, floor > 1) {
        if let Some(f) = versions::schema_at(tx, ds, name, floor as u64)? {
            if !matches!(
                evolution::compare(&f, a),
                Relation::Same | Relation::Extends { .. }
            ) {
                return Err(StoreError::SchemaRetired {
                    dataset: dataset.to_owned(),
                    table: name.to_owned(),
                    floor: floor as u64,
                    change: "a breaking change accepted while this device was connected".into(),
                    columns: f.columns.join(", "),
                });
            }
        }
    }
    Ok(TableState {
        strict,
        columns: current.map(|c| c.columns.len()).unwrap_or(0),
    })
}

/// The row a change writes when the client lacks the table's newest
/// columns (it sends fewer values than the current schema has): its values
/// followed by the stored row's values of the columns it lacks, so that a
/// device that has not upgraded never blanks them. `None` when the change
/// is a whole row, or there is nothing stored to keep.
fn kept_columns(
    tx: &Connection,
    ds: i64,
    ch: &Change,
    pk: &[u8],
    columns: usize,
) -> Result<Option<Vec<Value>>, StoreError> {
    let n = ch.values.len();
    if ch.op != Op::Upsert || n >= columns {
        return Ok(None);
    }
    let Some(row) = load_row(tx, ds, &ch.table, pk)?.filter(|r| !r.deleted) else {
        return Ok(None);
    };
    let stored = server_row(tx, ds, Some(&row))?.values;
    if stored.len() <= n {
        return Ok(None);
    }
    let mut merged = ch.values.clone();
    merged.extend(stored[n..stored.len().min(columns)].iter().cloned());
    Ok(Some(merged))
}

/// Checks a change against the table's declared shape and types: the key
/// values against the key columns' affinity, and, when the table is
/// `strict`, every value against its declared type.
fn validate(
    change: &Change,
    tables: &HashMap<String, TableSchema>,
    strict: impl FnOnce(&str) -> bool,
) -> Result<(), (InvalidReason, String)> {
    let Some(t) = tables.get(&change.table) else {
        return Err((
            InvalidReason::UnknownTable,
            format!(
                "table {:?} is not declared by the dataset or was not announced in hello",
                change.table
            ),
        ));
    };
    let size = change.wire_size();
    if size > MAX_CHANGE_BYTES {
        return Err((
            InvalidReason::TooLarge,
            format!(
                "table {:?}: change of {size} bytes exceeds the limit of {MAX_CHANGE_BYTES} bytes per change; no frame could carry it to the other devices",
                change.table
            ),
        ));
    }
    if change.pk.len() != t.pk.len() {
        return Err((
            InvalidReason::WrongKey,
            format!(
                "table {:?}: key has {} values, the primary key has {} columns",
                change.table,
                change.pk.len(),
                t.pk.len()
            ),
        ));
    }
    match change.op {
        Op::Upsert => {
            // Fewer values are the first columns: a device sends its new
            // columns only once it holds their values (see `kept_columns`).
            if change.values.len() > t.columns.len() || change.values.is_empty() {
                return Err((
                    InvalidReason::WrongColumnCount,
                    format!(
                        "table {:?}: row has {} values, the table has {} columns",
                        change.table,
                        change.values.len(),
                        t.columns.len()
                    ),
                ));
            }
            for (k, &col) in change.pk.iter().zip(&t.pk) {
                if change.values.get(col as usize) != Some(k) {
                    return Err((
                        InvalidReason::WrongKey,
                        format!(
                            "table {:?}: key value does not match column {:?} of the row",
                            change.table, t.columns[col as usize]
                        ),
                    ));
                }
            }
        }
        Op::Delete => {
            if !change.values.is_empty() {
                return Err((
                    InvalidReason::WrongColumnCount,
                    format!("table {:?}: a delete carries no values", change.table),
                ));
            }
        }
    }
    if change.pk.iter().any(|v| matches!(v, Value::Null)) {
        return Err((
            InvalidReason::WrongKey,
            format!("table {:?}: a key value is NULL", change.table),
        ));
    }
    let wrong_type = |message| Err((InvalidReason::WrongType, message));
    for (k, &col) in change.pk.iter().zip(&t.pk) {
        let (column, declared) = (&t.columns[col as usize], &t.types[col as usize]);
        if let Some(m) = types::key_refusal(&change.table, column, declared, k) {
            return wrong_type(m);
        }
    }
    if strict(&change.table) {
        // A delete carries the key values only.
        let checked: Vec<(usize, &Value)> = match change.op {
            Op::Upsert => change.values.iter().enumerate().collect(),
            Op::Delete => t.pk.iter().map(|&c| c as usize).zip(&change.pk).collect(),
        };
        for (col, v) in checked {
            if let Some(m) = types::strict_refusal(&change.table, &t.columns[col], &t.types[col], v)
            {
                return wrong_type(m);
            }
        }
    }
    Ok(())
}

/// A remembered answer and the digest of its change's content (none when
/// remembered by a hub older than digests: such a resend is taken on trust).
type RememberedAnswer = (Remembered, Option<[u8; DIGEST_BYTES]>);

/// The client's remembered answers by seq.
fn remembered(
    c: &Connection,
    client: &str,
    client_no: i64,
) -> Result<HashMap<u64, RememberedAnswer>, StoreError> {
    let mut out = HashMap::new();
    let mut stmt = c.prepare_cached(
        "SELECT first, results, digests FROM client_batches WHERE client_no = ?1",
    )?;
    let mut rows = stmt.query([client_no])?;
    while let Some(r) = rows.next()? {
        let first: i64 = r.get(0)?;
        let blob: Vec<u8> = r.get(1)?;
        let digests: Option<Vec<u8>> = r.get(2)?;
        let entries = match rmp_serde::from_slice::<Vec<(u64, Remembered)>>(&blob) {
            Ok(v) => v,
            Err(e) => {
                // Its seqs are then refused as unknown, and the client
                // takes a new identity: nothing is lost.
                tracing::warn!(client, first, error = %e, "remembered answers of a batch are unreadable; ignored");
                continue;
            }
        };
        let digests = digests.filter(|d| d.len() == entries.len() * DIGEST_BYTES);
        for (i, (seq, answer)) in entries.into_iter().enumerate() {
            let digest = digests.as_ref().map(|d| {
                d[i * DIGEST_BYTES..(i + 1) * DIGEST_BYTES]
                    .try_into()
                    .expect("BUG: sliced to the digest length")
            });
            out.insert(seq, (answer, digest));
        }
    }
    Ok(out)
}

impl HubStore for SqliteStore {
    fn inspect(&self, datasets: &[String]) -> Result<super::inspect::Inspection, StoreError> {
        let path = {
            let c = self.reader.lock().expect("BUG: poisoned");
            c.path().map(std::path::PathBuf::from)
        };
        match path {
            Some(p) if !p.as_os_str().is_empty() => super::inspect::inspect_file(&p, datasets),
            _ => Err(StoreError::Backend(
                "the store has no file to inspect (in memory)".into(),
            )),
        }
    }

    fn register_schema(
        &self,
        dataset: &str,
        client: &str,
        tables: &[TableSchema],
        may_register: bool,
    ) -> Result<Vec<LogEntry>, StoreError> {
        let mut c = self.writer.lock().expect("BUG: poisoned");
        let ds = self.dataset_id(&c, dataset)?;
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut head: u64 = tx
            .prepare_cached("SELECT head FROM datasets WHERE id = ?1")?
            .query_row([ds], |r| r.get::<_, i64>(0))? as u64;
        let (client_no, _, _) = client_marks(&tx, ds, client)?;
        let who = Registrant {
            dataset,
            ds,
            client_no,
            may_register,
        };
        let mut rewritten = Vec::new();
        for t in tables {
            rewritten.extend(versions::register(&tx, &who, t, &mut head)?);
        }
        tx.prepare_cached("UPDATE datasets SET head = ?1 WHERE id = ?2")?
            .execute(params![head as i64, ds])?;
        tx.commit()?;
        Ok(rewritten)
    }

    fn schema_history(&self, dataset: &str) -> Result<Vec<TableHistory>, StoreError> {
        let c = self.reader.lock().expect("BUG: poisoned");
        match self.known_dataset(&c, dataset)? {
            Some(ds) => versions::history(&c, ds),
            None => Ok(Vec::new()),
        }
    }

    fn accept_breaking(&self, dataset: &str, table: &str) -> Result<(), StoreError> {
        let c = self.writer.lock().expect("BUG: poisoned");
        let Some(ds) = self.known_dataset(&c, dataset)? else {
            return Err(StoreError::Backend(format!(
                "the hub store holds no dataset {dataset:?} yet; it is recorded when a device first syncs it"
            )));
        };
        versions::arm(&c, ds, dataset, table)
    }

    fn head(&self, dataset: &str) -> Result<u64, StoreError> {
        let c = self.reader.lock().expect("BUG: poisoned");
        let head: Option<i64> = c
            .prepare_cached("SELECT head FROM datasets WHERE name = ?1")?
            .query_row([dataset], |r| r.get(0))
            .optional()?;
        Ok(head.unwrap_or(0) as u64)
    }

    fn log_digest(&self, dataset: &str, seq: u64) -> Result<Option<String>, StoreError> {
        let c = self.reader.lock().expect("BUG: poisoned");
        let Some(ds) = self.known_dataset(&c, dataset)? else {
            return Ok(None);
        };
        let entry: Option<(String, Vec<u8>, i64, Vec<u8>)> = c
            .prepare_cached(&format!(
                "SELECT tbl, pk, op, vals FROM log_{ds} WHERE seq = ?1"
            ))?
            .query_row([seq as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()?;
        Ok(entry.map(|(tbl, pk, op, vals)| {
            let op = if op == 2 { Op::Delete } else { Op::Upsert };
            crate::proto::log_digest(seq, &tbl, op, &pk, &vals)
        }))
    }

    fn client_seq(&self, dataset: &str, client: &str) -> Result<u64, StoreError> {
        let c = self.reader.lock().expect("BUG: poisoned");
        let seq: Option<i64> = c
            .query_row(
                "SELECT c.last_seq FROM clients c JOIN datasets d ON d.id = c.dataset WHERE d.name = ?1 AND c.client = ?2",
                [dataset, client],
                |r| r.get(0),
            )
            .optional()?;
        Ok(seq.unwrap_or(0) as u64)
    }

    fn claim_identity(&self, dataset: &str, client: &str, key: &str) -> Result<u64, StoreError> {
        let mut c = self.writer.lock().expect("BUG: poisoned");
        let ds = self.dataset_id(&c, dataset)?;
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.prepare_cached(
            "INSERT INTO clients (dataset, client) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        )?
        .execute(params![ds, client])?;
        let (no, hwm, recorded): (i64, i64, Option<Vec<u8>>) = tx
            .prepare_cached(
                "SELECT no, last_seq, key_hash FROM clients WHERE dataset = ?1 AND client = ?2",
            )?
            .query_row(params![ds, client], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
        match recorded {
            None if key.is_empty() => {}
            None => {
                tx.prepare_cached("UPDATE clients SET key_hash = ?1 WHERE no = ?2")?
                    .execute(params![key_hash(key), no])?;
            }
            Some(h) if !key.is_empty() && h == key_hash(key) => {}
            Some(_) => {
                return Err(StoreError::IdentityRefused {
                    dataset: dataset.to_owned(),
                    client: client.to_owned(),
                })
            }
        }
        tx.commit()?;
        Ok(hwm as u64)
    }

    fn apply_batch(
        &self,
        dataset: &str,
        client: &str,
        tables: &HashMap<String, TableSchema>,
        changes: &[Change],
        acked: u64,
    ) -> Result<Applied, StoreError> {
        let mut c = self.writer.lock().expect("BUG: poisoned");
        let ds = self.dataset_id(&c, dataset)?;
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut head: u64 = tx
            .prepare_cached("SELECT head FROM datasets WHERE id = ?1")?
            .query_row([ds], |r| r.get::<_, i64>(0))? as u64;
        let (client_no, hwm, acked_mark) = client_marks(&tx, ds, client)?;
        check_seqs(client, changes, hwm)?;
        // Answers up to here were processed by the client: it never sends
        // those seqs again, and their answers may be forgotten.
        let acked_mark = (acked_mark as u64).max(acked.min(hwm));
        tx.prepare_cached("DELETE FROM client_batches WHERE client_no = ?1 AND last <= ?2")?
            .execute(params![client_no, acked_mark as i64])?;
        let remembered = if changes.iter().any(|c| c.seq <= hwm) {
            remembered(&tx, client, client_no)?
        } else {
            HashMap::new()
        };
        let mut sql = BatchSql::new(ds);
        sql.any_rewritten = versions::any_rewritten(&tx, ds)?;
        let client_arc: Arc<str> = Arc::from(client);
        let mut results = Vec::with_capacity(changes.len());
        let mut remember = Vec::with_capacity(changes.len());
        let mut digests = Vec::with_capacity(changes.len() * DIGEST_BYTES);
        let mut logged = Vec::new();
        let mut seen: HashSet<(&str, Vec<u8>)> = HashSet::new();
        // Each table's state, read once per batch: a session opened before
        // another client announced it STRICT is checked by STRICT rules too,
        // and one whose schema a breaking change retired meanwhile stores
        // nothing.
        let mut state: HashMap<String, TableState> = HashMap::new();
        let mut new_hwm = hwm;
        // Seqs increase, so every resend comes before the first new change:
        // a refused resend returns before anything of the batch is written.
        for ch in changes {
            let pk = encode_key(&ch.pk);
            if ch.seq <= hwm {
                // A resend: answer as the first time, apply nothing.
                let outcome =
                    resend_answer(&tx, ds, client, ch, &pk, (acked_mark, hwm), &remembered)?;
                results.push(ChangeResult {
                    seq: ch.seq,
                    outcome,
                });
                continue;
            }
            new_hwm = new_hwm.max(ch.seq);
            let vals = encode_values(&ch.values);
            digests.extend_from_slice(&content_digest(&ch.table, ch.op, &pk, &vals));
            if !state.contains_key(&ch.table) {
                let st = table_state(&tx, ds, dataset, &ch.table, tables.get(&ch.table))?;
                state.insert(ch.table.clone(), st);
            }
            let invalid = validate(ch, tables, |t| state[t].strict).err().or_else(|| {
                (!seen.insert((ch.table.as_str(), pk.clone()))).then(|| {
                    (
                        InvalidReason::DuplicateRow,
                        format!(
                            "table {:?}: the same row appears twice in one batch",
                            ch.table
                        ),
                    )
                })
            });
            if let Some((reason, message)) = invalid {
                remember.push((ch.seq, Remembered::Invalid(reason, message.clone())));
                results.push(ChangeResult {
                    seq: ch.seq,
                    outcome: Outcome::Invalid { reason, message },
                });
                continue;
            }
            // A client without the newest columns: the row keeps their values.
            let kept = kept_columns(&tx, ds, ch, &pk, state[&ch.table].columns)?;
            let vals = kept.as_ref().map(|v| encode_values(v)).unwrap_or(vals);
            let (first, outcome, stored) =
                write_change(&tx, &sql, ds, client_no, &mut head, ch, &pk, vals)?;
            if stored {
                logged.push(LogEntry {
                    change: RemoteChange {
                        version: head,
                        table: ch.table.clone(),
                        op: ch.op,
                        pk: ch.pk.clone(),
                        values: kept.unwrap_or_else(|| ch.values.clone()),
                    },
                    client: client_arc.clone(),
                });
            }
            remember.push((ch.seq, first));
            results.push(ChangeResult {
                seq: ch.seq,
                outcome,
            });
        }
        remember_answers(&tx, client_no, &remember, digests)?;
        tx.prepare_cached("UPDATE clients SET last_seq = ?1, acked = ?2 WHERE no = ?3")?
            .execute(params![new_hwm as i64, acked_mark as i64, client_no])?;
        tx.prepare_cached("UPDATE datasets SET head = ?1 WHERE id = ?2")?
            .execute(params![head as i64, ds])?;
        tx.commit()?;
        Ok(Applied {
            results,
            logged,
            head,
        })
    }

    fn changes_since(
        &self,
        dataset: &str,
        after: u64,
        exclude_client: Option<&str>,
        max_changes: usize,
        max_bytes: usize,
    ) -> Result<Page, StoreError> {
        let c = self.reader.lock().expect("BUG: poisoned");
        let Some(ds) = self.known_dataset(&c, dataset)? else {
            return Ok(Page {
                changes: Vec::new(),
                up_to: after,
            });
        };
        let exclude: i64 = match exclude_client {
            None => -1,
            Some(client) => c
                .prepare_cached("SELECT no FROM clients WHERE dataset = ?1 AND client = ?2")?
                .query_row(params![ds, client], |r| r.get(0))
                .optional()?
                .unwrap_or(-1),
        };
        let mut stmt = c.prepare_cached(&format!(
            "SELECT seq, tbl, pk, op, vals, client_no FROM log_{ds} WHERE seq > ?1 ORDER BY seq LIMIT ?2"
        ))?;
        let mut rows = stmt.query(params![after as i64, max_changes as i64])?;
        let mut changes = Vec::new();
        let mut up_to = after;
        let mut bytes = 0;
        while let Some(r) = rows.next()? {
            let seq = r.get::<_, i64>(0)? as u64;
            up_to = seq;
            if r.get::<_, i64>(5)? == exclude {
                continue;
            }
            let pk: Vec<u8> = r.get(2)?;
            let vals: Vec<u8> = r.get(4)?;
            let op: i64 = r.get(3)?;
            let bad = |e: rmp_serde::decode::Error| {
                StoreError::Backend(format!("change {seq} of dataset {dataset} is corrupt: {e}"))
            };
            let change = RemoteChange {
                version: seq,
                table: r.get(1)?,
                op: if op == 2 { Op::Delete } else { Op::Upsert },
                pk: decode_key(&pk).map_err(bad)?,
                values: decode_values(&vals).map_err(bad)?,
            };
            bytes += change.wire_size();
            changes.push(change);
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(Page { changes, up_to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notes() -> HashMap<String, TableSchema> {
        let t = TableSchema {
            name: "notes".into(),
            columns: vec!["id".into(), "body".into()],
            types: vec!["TEXT".into(), "BLOB".into()],
            pk: vec![0],
            fingerprint: String::new(),
            strict: false,
        };
        HashMap::from([(t.name.clone(), t)])
    }

    fn change(seq: u64, id: &str, body: usize) -> Change {
        Change {
            seq,
            table: "notes".into(),
            op: Op::Upsert,
            pk: vec![Value::Text(id.into())],
            values: vec![Value::Text(id.into()), Value::Blob(vec![7; body])],
            base: 0,
            mask: u64::MAX,
        }
    }

    #[test]
    fn a_change_over_the_limit_is_too_large_never_stored_and_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("hub.db")).unwrap();
        let batch = [change(1, "big", MAX_CHANGE_BYTES), change(2, "small", 10)];
        let first = store.apply_batch("ds", "c", &notes(), &batch, 0).unwrap();
        let Outcome::Invalid { reason, message } = &first.results[0].outcome else {
            panic!("{:?}", first.results[0]);
        };
        assert_eq!(*reason, InvalidReason::TooLarge);
        assert!(message.contains("\"notes\"") && message.contains(&MAX_CHANGE_BYTES.to_string()));
        assert!(matches!(
            first.results[1].outcome,
            Outcome::Applied { version: 1 }
        ));
        assert_eq!(first.logged.len(), 1);
        assert_eq!(store.head("ds").unwrap(), 1);
        // A resend is answered the same, from memory.
        let again = store.apply_batch("ds", "c", &notes(), &batch, 0).unwrap();
        assert_eq!(again.results, first.results);
        assert_eq!(store.head("ds").unwrap(), 1);
    }
}

#[cfg(test)]
mod rule_tests {
    //! The identity and sequence rules of the store.

    use super::*;

    fn notes() -> HashMap<String, TableSchema> {
        let t = TableSchema {
            name: "notes".into(),
            columns: vec!["id".into(), "body".into()],
            types: vec!["TEXT".into(), "TEXT".into()],
            pk: vec![0],
            fingerprint: String::new(),
            strict: false,
        };
        HashMap::from([(t.name.clone(), t)])
    }

    fn change(seq: u64, id: &str, body: &str) -> Change {
        Change {
            seq,
            table: "notes".into(),
            op: Op::Upsert,
            pk: vec![Value::Text(id.into())],
            values: vec![Value::Text(id.into()), Value::Text(body.into())],
            base: 0,
            mask: u64::MAX,
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        store: SqliteStore,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let store = SqliteStore::open(&path).unwrap();
        Fixture {
            _dir: dir,
            path,
            store,
        }
    }

    impl Fixture {
        fn apply(&self, changes: &[Change], acked: u64) -> Result<Applied, StoreError> {
            self.store.apply_batch("ds", "c", &notes(), changes, acked)
        }

        /// Every row of every table of the store file, as text.
        fn dump(&self) -> Vec<String> {
            let c = Connection::open(&self.path).unwrap();
            let tables: Vec<String> = c
                .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let mut out = Vec::new();
            for t in tables {
                let mut st = c
                    .prepare(&format!("SELECT * FROM {t} ORDER BY 1, 2"))
                    .unwrap();
                let n = st.column_count();
                let rows: Vec<String> = st
                    .query_map([], |r| {
                        let mut row = vec![t.clone()];
                        for i in 0..n {
                            row.push(format!("{:?}", r.get::<_, rusqlite::types::Value>(i)?));
                        }
                        Ok(row.join("|"))
                    })
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap();
                out.extend(rows);
            }
            out
        }

        /// Refused with `want`, and nothing in the store changed.
        fn refused(&self, changes: &[Change], acked: u64, want: &str) -> String {
            let before = self.dump();
            let err = self.apply(changes, acked).unwrap_err();
            assert_eq!(self.dump(), before, "the store changed");
            let variant = match &err {
                StoreError::BadSequence(_) => "bad_sequence",
                StoreError::IdentityConflict(_) => "identity_conflict",
                other => panic!("{other:?}"),
            };
            assert_eq!(variant, want, "{err}");
            let message = err.to_string();
            assert!(message.contains("\"c\""), "{message}");
            assert!(
                message.contains("nothing of this batch was stored"),
                "{message}"
            );
            message
        }
    }

    fn applied(a: &Applied) -> Vec<(u64, u64)> {
        a.results
            .iter()
            .map(|r| match r.outcome {
                Outcome::Applied { version } => (r.seq, version),
                ref o => panic!("{o:?}"),
            })
            .collect()
    }

    #[test]
    fn seq_zero_or_above_the_limit_is_a_bad_sequence_and_nothing_is_stored() {
        let f = fixture();
        f.apply(&[change(1, "a", "x")], 0).unwrap();
        let m = f.refused(
            &[change(2, "b", "x"), change(0, "z", "x")],
            0,
            "bad_sequence",
        );
        assert!(
            m.contains("client seq 0 ") && m.contains("out of range"),
            "{m}"
        );
        for seq in [u64::MAX, MAX_SEQ + 1] {
            let m = f.refused(&[change(seq, "z", "x")], 0, "bad_sequence");
            assert!(m.contains(&format!("client seq {seq} ")), "{m}");
            assert!(
                m.contains(&format!(
                    "out of range: client seqs run from 1 to {MAX_SEQ}"
                )),
                "{m}"
            );
        }
        // The device's next write is stored.
        let a = f.apply(&[change(2, "b", "x")], 0).unwrap();
        assert_eq!(applied(&a), vec![(2, 2)]);
    }

    #[test]
    fn seqs_not_increasing_within_a_batch_are_a_bad_sequence() {
        let f = fixture();
        f.store.claim_identity("ds", "c", "k").unwrap();
        let m = f.refused(
            &[
                change(1, "a", "x"),
                change(3, "b", "x"),
                change(2, "c", "x"),
            ],
            0,
            "bad_sequence",
        );
        assert!(
            m.contains("client seq 2 ") && m.contains("follows seq 3"),
            "{m}"
        );
        f.refused(
            &[change(1, "a", "x"), change(1, "b", "x")],
            0,
            "bad_sequence",
        );
        assert_eq!(f.store.client_seq("ds", "c").unwrap(), 0);
    }

    #[test]
    fn a_jump_beyond_the_limit_is_a_bad_sequence_and_the_device_keeps_its_numbers() {
        let f = fixture();
        f.apply(&[change(5, "a", "x")], 0).unwrap();
        // The first new seq, and a later one of the same batch.
        let m = f.refused(&[change(5 + MAX_SEQ_JUMP + 1, "b", "x")], 0, "bad_sequence");
        assert!(m.contains(&MAX_SEQ_JUMP.to_string()), "{m}");
        f.refused(
            &[change(6, "b", "x"), change(7 + MAX_SEQ_JUMP, "c", "x")],
            0,
            "bad_sequence",
        );
        // Exactly the limit is accepted; the next real write is stored.
        let a = f.apply(&[change(5 + MAX_SEQ_JUMP, "b", "x")], 0).unwrap();
        assert_eq!(applied(&a), vec![(5 + MAX_SEQ_JUMP, 2)]);
        let a = f.apply(&[change(6 + MAX_SEQ_JUMP, "c", "x")], 0).unwrap();
        assert_eq!(applied(&a), vec![(6 + MAX_SEQ_JUMP, 3)]);
    }

    #[test]
    fn a_seq_at_or_below_the_acked_mark_is_an_identity_conflict() {
        let f = fixture();
        f.apply(&[change(1, "a", "x"), change(2, "b", "x")], 0)
            .unwrap();
        f.apply(&[change(3, "c", "x")], 2).unwrap();
        // Even with the very same content: its answer was processed.
        let m = f.refused(&[change(2, "b", "x")], 0, "identity_conflict");
        assert!(
            m.contains("client seq 2 ") && m.contains("acked up to 2"),
            "{m}"
        );
        // `acked` beyond the high-water mark is clamped to it and never
        // moves back.
        f.apply(&[], 1_000).unwrap();
        f.refused(&[change(3, "c", "x")], 0, "identity_conflict");
        let a = f.apply(&[change(4, "d", "x")], 0).unwrap();
        assert_eq!(applied(&a), vec![(4, 4)]);
    }

    #[test]
    fn a_resend_with_the_same_content_is_answered_as_the_first_time() {
        let f = fixture();
        let batch = [change(1, "a", "x"), change(2, "b", "x")];
        let first = f.apply(&batch, 0).unwrap();
        let stored = f.dump();
        // A daemon reading its log again recomputes base and mask.
        let mut again = batch.clone();
        again[0].base = 7;
        again[1].mask = 1;
        let a = f.apply(&again, 0).unwrap();
        assert_eq!(a.results, first.results);
        assert!(a.logged.is_empty());
        // Nothing stored twice (the acked mark is unchanged too).
        assert_eq!(f.dump(), stored);
        // Resends first, then a new change: the new one is applied.
        let a = f
            .apply(&[change(2, "b", "x"), change(3, "c", "x")], 0)
            .unwrap();
        assert_eq!(applied(&a), vec![(2, 2), (3, 3)]);
    }

    #[test]
    fn a_resend_with_other_content_is_an_identity_conflict_and_the_store_is_unchanged() {
        let f = fixture();
        f.apply(&[change(1, "a", "x"), change(2, "b", "x")], 0)
            .unwrap();
        // Other values, another row, another op: each refused.
        let m = f.refused(&[change(2, "b", "y")], 0, "identity_conflict");
        assert!(
            m.contains("client seq 2 ") && m.contains("other content"),
            "{m}"
        );
        f.refused(&[change(2, "other", "x")], 0, "identity_conflict");
        let mut delete = change(2, "b", "x");
        delete.op = Op::Delete;
        delete.values.clear();
        f.refused(&[delete], 0, "identity_conflict");
        // With new changes behind it: none of them is stored either.
        f.refused(
            &[
                change(1, "a", "x"),
                change(2, "b", "z"),
                change(3, "c", "x"),
            ],
            0,
            "identity_conflict",
        );
        assert_eq!(f.store.head("ds").unwrap(), 2);
    }

    #[test]
    fn a_used_seq_the_hub_does_not_remember_is_an_identity_conflict() {
        let f = fixture();
        f.apply(&[change(1, "a", "x"), change(2, "b", "x")], 0)
            .unwrap();
        Connection::open(&f.path)
            .unwrap()
            .execute("DELETE FROM client_batches", [])
            .unwrap();
        let m = f.refused(&[change(2, "b", "x")], 0, "identity_conflict");
        assert!(m.contains("does not remember"), "{m}");
    }

    #[test]
    fn answers_remembered_by_an_older_hub_without_digests_are_still_resends() {
        let f = fixture();
        let first = f.apply(&[change(1, "a", "x")], 0).unwrap();
        Connection::open(&f.path)
            .unwrap()
            .execute("UPDATE client_batches SET digests = NULL", [])
            .unwrap();
        // No digest to compare: taken on trust, as before.
        let a = f.apply(&[change(1, "a", "other")], 0).unwrap();
        assert_eq!(a.results, first.results);
        assert_eq!(f.store.head("ds").unwrap(), 1);
    }

    #[test]
    fn the_first_key_claims_an_id_and_another_key_or_none_is_refused() {
        let f = fixture();
        let s = &f.store;
        assert_eq!(s.claim_identity("ds", "c", "k1").unwrap(), 0);
        assert_eq!(s.claim_identity("ds", "c", "k1").unwrap(), 0);
        // The hello created the client: its id is known before any upload.
        let known: i64 = Connection::open(&f.path)
            .unwrap()
            .query_row("SELECT count(*) FROM clients WHERE client = 'c'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(known, 1);
        for other in ["k2", ""] {
            let e = s.claim_identity("ds", "c", other).unwrap_err();
            assert!(matches!(e, StoreError::IdentityRefused { .. }), "{e:?}");
            let m = e.to_string();
            assert!(
                m.contains("\"c\"") && m.contains("not present the key"),
                "{m}"
            );
            assert!(!m.contains("k1"), "{m}");
        }
        // The same id in another dataset is another identity.
        s.claim_identity("other", "c", "k2").unwrap();
        // The high-water mark is what welcome announces.
        f.apply(&[change(9, "a", "x")], 0).unwrap();
        assert_eq!(s.claim_identity("ds", "c", "k1").unwrap(), 9);
        // Only the key's hash is kept.
        let dump = f.dump().join("\n");
        assert!(!dump.contains("k1") && !dump.contains("k2"), "{dump}");
    }

    #[test]
    fn a_client_without_a_key_is_accepted_until_a_key_claims_its_id() {
        let f = fixture();
        let s = &f.store;
        s.claim_identity("ds", "old", "").unwrap();
        s.claim_identity("ds", "old", "").unwrap();
        s.claim_identity("ds", "old", "k").unwrap();
        s.claim_identity("ds", "old", "k").unwrap();
        assert!(s.claim_identity("ds", "old", "").is_err());
        assert!(s.claim_identity("ds", "old", "k2").is_err());
    }

    #[test]
    fn a_store_made_before_keys_and_digests_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE datasets (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, head INTEGER NOT NULL DEFAULT 0);
                 CREATE TABLE tables (dataset INTEGER NOT NULL, name TEXT NOT NULL, fingerprint TEXT NOT NULL, PRIMARY KEY (dataset, name));
                 CREATE TABLE clients (no INTEGER PRIMARY KEY, dataset INTEGER NOT NULL, client TEXT NOT NULL, last_seq INTEGER NOT NULL DEFAULT 0, UNIQUE (dataset, client));
                 CREATE TABLE client_batches (client_no INTEGER NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL, results BLOB NOT NULL, PRIMARY KEY (client_no, first));
                 INSERT INTO datasets (id, name, head) VALUES (1, 'ds', 1);
                 INSERT INTO clients (no, dataset, client, last_seq) VALUES (1, 1, 'c', 1);",
            )
            .unwrap();
            c.execute_batch(&dataset_sql(1)).unwrap();
            c.execute_batch(
                "INSERT INTO log_1 VALUES (1, 'notes', x'00', 1, x'00', 1);
                 INSERT INTO rows_1 VALUES ('notes', x'00', 1, 0, 1);",
            )
            .unwrap();
            let blob = rmp_serde::to_vec(&vec![(1u64, Remembered::Applied(1))]).unwrap();
            c.execute("INSERT INTO client_batches VALUES (1, 1, 1, ?1)", [blob])
                .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        // A client from before keys claims its id with its first key.
        assert_eq!(store.claim_identity("ds", "c", "k").unwrap(), 1);
        // Its remembered answer (no digest) still answers a resend.
        let a = store
            .apply_batch("ds", "c", &notes(), &[change(1, "a", "x")], 0)
            .unwrap();
        assert_eq!(applied(&a), vec![(1, 1)]);
        let a = store
            .apply_batch("ds", "c", &notes(), &[change(2, "b", "x")], 1)
            .unwrap();
        assert_eq!(applied(&a), vec![(2, 2)]);
        drop(store);
        // Opening again changes nothing.
        let store = SqliteStore::open(&path).unwrap();
        assert!(store.claim_identity("ds", "c", "other").is_err());
    }
}

#[cfg(test)]
mod type_tests {
    //! Types at the door: key values by their column's affinity, values of
    //! STRICT tables by their declared types, and who may register a table.

    use super::*;

    /// `people (id INTEGER PRIMARY KEY, email TEXT, n INTEGER)`, announced
    /// STRICT when `strict`.
    fn people(strict: bool) -> TableSchema {
        let (columns, types): (Vec<String>, Vec<String>) =
            [("id", "INTEGER"), ("email", "TEXT"), ("n", "INTEGER")]
                .iter()
                .map(|(c, t)| (c.to_string(), t.to_string()))
                .unzip();
        TableSchema {
            name: "people".into(),
            fingerprint: crate::local::schema::fingerprint("people", &columns, &types, &[0]),
            columns,
            types,
            pk: vec![0],
            strict,
        }
    }

    fn tables(t: TableSchema) -> HashMap<String, TableSchema> {
        HashMap::from([(t.name.clone(), t)])
    }

    fn row(seq: u64, id: Value, n: Value) -> Change {
        Change {
            seq,
            table: "people".into(),
            op: Op::Upsert,
            pk: vec![id.clone()],
            values: vec![id, Value::Text(format!("p{seq}@example.org")), n],
            base: 0,
            mask: u64::MAX,
        }
    }

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("hub.db")).unwrap();
        (dir, s)
    }

    /// The reason and message of an `invalid` outcome.
    fn invalid(o: &Outcome) -> (InvalidReason, &str) {
        match o {
            Outcome::Invalid { reason, message } => (*reason, message),
            o => panic!("expected invalid, got {o:?}"),
        }
    }

    fn logged_keys(a: &Applied) -> Vec<Value> {
        a.logged.iter().map(|e| e.change.pk[0].clone()).collect()
    }

    #[test]
    fn a_key_value_its_column_would_convert_is_wrong_type_and_the_rest_of_the_batch_goes_on() {
        let (_d, s) = store();
        let t = tables(people(false));
        s.register_schema("ds", "c", &[people(false)], true)
            .unwrap();
        let text_42 = row(2, Value::Text("42".into()), Value::Integer(1));
        let mut delete_text = row(4, Value::Text("7".into()), Value::Null);
        delete_text.op = Op::Delete;
        delete_text.values.clear();
        let batch = [
            row(1, Value::Integer(42), Value::Integer(1)),
            text_42,
            row(3, Value::Real(7.0), Value::Integer(1)),
            delete_text,
            row(5, Value::Integer(8), Value::Integer(1)),
        ];
        let a = s.apply_batch("ds", "c", &t, &batch, 0).unwrap();
        let (reason, m) = invalid(&a.results[1].outcome);
        assert_eq!(reason, InvalidReason::WrongType);
        assert!(
            m.contains("table \"people\", key column \"id\": a text value")
                && m.contains("declared INTEGER"),
            "{m}"
        );
        assert!(invalid(&a.results[2].outcome).1.contains("a real value"));
        assert_eq!(invalid(&a.results[3].outcome).0, InvalidReason::WrongType);
        // Only the integer keys were stored and will be pushed.
        assert_eq!(logged_keys(&a), vec![Value::Integer(42), Value::Integer(8)]);
        assert_eq!(s.head("ds").unwrap(), 2);
        let page = s.changes_since("ds", 0, None, 100, 1 << 20).unwrap();
        assert_eq!(page.changes.len(), 2);
        // A resend is answered the same, from memory.
        let again = s.apply_batch("ds", "c", &t, &batch, 0).unwrap();
        assert_eq!(again.results, a.results);
    }

    #[test]
    fn a_text_key_column_takes_no_number_so_42_and_the_text_42_never_alias() {
        let (_d, s) = store();
        let mut notes = people(false);
        notes.types[0] = "TEXT".into();
        notes.fingerprint =
            crate::local::schema::fingerprint("people", &notes.columns, &notes.types, &[0]);
        s.register_schema("ds", "c", &[notes.clone()], true)
            .unwrap();
        let a = s
            .apply_batch(
                "ds",
                "c",
                &tables(notes),
                &[
                    row(1, Value::Text("42".into()), Value::Integer(1)),
                    row(2, Value::Integer(42), Value::Integer(2)),
                ],
                0,
            )
            .unwrap();
        assert!(matches!(a.results[0].outcome, Outcome::Applied { .. }));
        let (reason, m) = invalid(&a.results[1].outcome);
        assert_eq!(reason, InvalidReason::WrongType);
        assert!(
            m.contains("an integer value") && m.contains("TEXT affinity"),
            "{m}"
        );
        assert_eq!(logged_keys(&a), vec![Value::Text("42".into())]);
    }

    #[test]
    fn a_strict_table_refuses_a_value_of_another_type_for_every_client() {
        let (_d, s) = store();
        // The table is registered by a client that announced it STRICT; the
        // uploading client's own description says nothing of it (an older
        // daemon, or a device whose table is not STRICT).
        s.register_schema("ds", "c", &[people(true)], true).unwrap();
        let loose = tables(people(false));
        let batch = [
            row(1, Value::Integer(1), Value::Text("three".into())),
            row(2, Value::Integer(2), Value::Integer(2)),
            row(3, Value::Integer(3), Value::Null),
            row(4, Value::Integer(4), Value::Real(4.0)),
        ];
        let a = s.apply_batch("ds", "c", &loose, &batch, 0).unwrap();
        let (reason, m) = invalid(&a.results[0].outcome);
        assert_eq!(reason, InvalidReason::WrongType);
        assert_eq!(
            m,
            "table \"people\", column \"n\": a text value cannot be stored in a column declared INTEGER of a STRICT table; the devices' SQLite would refuse it"
        );
        assert!(matches!(a.results[1].outcome, Outcome::Applied { .. }));
        assert!(matches!(a.results[2].outcome, Outcome::Applied { .. }));
        assert_eq!(invalid(&a.results[3].outcome).0, InvalidReason::WrongType);
        assert_eq!(logged_keys(&a), vec![Value::Integer(2), Value::Integer(3)]);
    }

    #[test]
    fn a_table_not_announced_strict_takes_any_value_type_outside_its_key() {
        let (_d, s) = store();
        s.register_schema("ds", "c", &[people(false)], true)
            .unwrap();
        let a = s
            .apply_batch(
                "ds",
                "c",
                &tables(people(false)),
                &[row(1, Value::Integer(1), Value::Text("three".into()))],
                0,
            )
            .unwrap();
        assert!(matches!(a.results[0].outcome, Outcome::Applied { .. }));
    }

    #[test]
    fn a_read_write_client_announcing_strict_makes_the_table_strict_for_good() {
        let (_d, s) = store();
        let loose = tables(people(false));
        let bad = |seq| row(seq, Value::Integer(seq as i64), Value::Text("x".into()));
        s.register_schema("ds", "c", &[people(false)], true)
            .unwrap();
        let a = s.apply_batch("ds", "c", &loose, &[bad(1)], 0).unwrap();
        assert!(matches!(a.results[0].outcome, Outcome::Applied { .. }));
        // A read_only client's word does not change the table.
        s.register_schema("ds", "c", &[people(true)], false)
            .unwrap();
        let a = s.apply_batch("ds", "c", &loose, &[bad(2)], 0).unwrap();
        assert!(matches!(a.results[0].outcome, Outcome::Applied { .. }));
        // A read_write one does, for the session already open too.
        s.register_schema("ds", "c", &[people(true)], true).unwrap();
        let a = s.apply_batch("ds", "c", &loose, &[bad(3)], 0).unwrap();
        assert_eq!(invalid(&a.results[0].outcome).0, InvalidReason::WrongType);
        // A later client without STRICT does not undo it.
        s.register_schema("ds", "c", &[people(false)], true)
            .unwrap();
        let a = s.apply_batch("ds", "c", &loose, &[bad(4)], 0).unwrap();
        assert_eq!(invalid(&a.results[0].outcome).0, InvalidReason::WrongType);
    }

    #[test]
    fn a_read_only_client_registers_nothing_and_syncs_only_registered_tables() {
        let (_d, s) = store();
        // A poisoned schema: same table, another key.
        let mut poison = people(false);
        poison.pk = vec![1];
        poison.fingerprint =
            crate::local::schema::fingerprint("people", &poison.columns, &poison.types, &[1]);
        let e = s
            .register_schema("ds", "c", &[poison.clone()], false)
            .unwrap_err();
        assert!(matches!(e, StoreError::NotRegistered { .. }), "{e:?}");
        let m = e.to_string();
        assert!(
            m.contains("table \"people\" of dataset \"ds\" is not registered")
                && m.contains("read_only token cannot register")
                && m.contains("read_write token"),
            "{m}"
        );
        // Nothing was recorded: the legitimate schema registers, and the
        // read_only client is then welcome with it but not with its own.
        s.register_schema("ds", "c", &[people(false)], true)
            .unwrap();
        s.register_schema("ds", "c", &[people(false)], false)
            .unwrap();
        let e = s.register_schema("ds", "c", &[poison], false).unwrap_err();
        assert!(
            matches!(e, StoreError::SchemaChanged { key: true, .. }),
            "{e:?}"
        );
    }
}

#[cfg(test)]
mod evolution_tests {
    use super::*;

    fn msgs(cols: &[&str]) -> TableSchema {
        let columns: Vec<String> = cols.iter().map(|c| c.to_string()).collect();
        let types = vec!["TEXT".to_string(); columns.len()];
        TableSchema {
            name: "msgs".into(),
            fingerprint: crate::local::schema::fingerprint("msgs", &columns, &types, &[0]),
            columns,
            types,
            pk: vec![0],
            strict: false,
        }
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    fn put(seq: u64, base: u64, values: Vec<Value>) -> Change {
        Change {
            seq,
            table: "msgs".into(),
            op: Op::Upsert,
            pk: vec![values[0].clone()],
            values,
            base,
            mask: u64::MAX,
        }
    }

    fn tables(t: TableSchema) -> HashMap<String, TableSchema> {
        [(t.name.clone(), t)].into_iter().collect()
    }

    /// A store made before schema versions knows a table only by the
    /// fingerprint of its first schema. A device whose app added a column
    /// before the hub was upgraded is refused with the operator's command,
    /// is taken once the operator accepted it, and devices with the first
    /// schema keep syncing beside it.
    #[test]
    fn a_table_known_only_by_fingerprint_takes_an_added_column_once_the_operator_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("hub.db")).unwrap();
        let (old, new) = (msgs(&["id", "body"]), msgs(&["id", "body", "extra"]));
        s.register_schema("ds", "old", std::slice::from_ref(&old), true)
            .unwrap();
        // What a store from before versions holds: the fingerprint only.
        s.writer
            .lock()
            .unwrap()
            .execute("DELETE FROM schema_versions", [])
            .unwrap();
        let e = s
            .register_schema("ds", "new", std::slice::from_ref(&new), true)
            .unwrap_err();
        assert!(
            matches!(e, StoreError::SchemaMismatch { .. })
                && e.to_string().contains("tether hub schema ds --accept msgs"),
            "{e}"
        );
        s.accept_breaking("ds", "msgs").unwrap();
        s.register_schema("ds", "new", std::slice::from_ref(&new), true)
            .unwrap();
        s.register_schema("ds", "old", std::slice::from_ref(&old), true)
            .unwrap();
        s.register_schema("ds", "new", std::slice::from_ref(&new), true)
            .unwrap();
        let h = s.schema_history("ds").unwrap();
        assert_eq!(h[0].version, 2, "{h:?}");
        assert!(!h[0].accept, "the acceptance is used up: {h:?}");
    }

    /// A device that has not added the new column writes the row; the hub
    /// keeps the column's value, stores and publishes the whole row.
    #[test]
    fn an_older_app_never_blanks_a_column_it_does_not_have() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("hub.db")).unwrap();
        let (old, new) = (msgs(&["id", "body"]), msgs(&["id", "body", "extra"]));
        s.register_schema("ds", "old", std::slice::from_ref(&old), true)
            .unwrap();
        s.register_schema("ds", "new", std::slice::from_ref(&new), true)
            .unwrap();
        s.register_schema("ds", "old", std::slice::from_ref(&old), true)
            .unwrap();
        let a = s
            .apply_batch(
                "ds",
                "new",
                &tables(new),
                &[put(1, 0, vec![text("1"), text("b"), text("x")])],
                0,
            )
            .unwrap();
        let v = match a.results[0].outcome {
            Outcome::Applied { version } => version,
            ref o => panic!("{o:?}"),
        };
        let a = s
            .apply_batch(
                "ds",
                "old",
                &tables(old),
                &[put(1, v, vec![text("1"), text("edited")])],
                0,
            )
            .unwrap();
        assert_eq!(
            a.logged[0].change.values,
            vec![text("1"), text("edited"), text("x")]
        );
        let page = s.changes_since("ds", 0, None, 100, 1 << 20).unwrap();
        assert_eq!(
            page.changes.last().unwrap().values,
            a.logged[0].change.values
        );
        let h = s.schema_history("ds").unwrap();
        assert_eq!(h[0].version, 2);
        assert_eq!(h[0].versions[1].change, "added columns extra");
    }

    /// A breaking change is refused until the operator accepts it; then
    /// the rows are written again in the new layout and the old schema is
    /// refused with the way forward.
    #[test]
    fn a_breaking_change_waits_for_the_operator_and_then_retires_the_old_schema() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("hub.db")).unwrap();
        let (old, new) = (msgs(&["id", "note", "body"]), msgs(&["id", "body"]));
        s.register_schema("ds", "a", std::slice::from_ref(&old), true)
            .unwrap();
        s.apply_batch(
            "ds",
            "a",
            &tables(old.clone()),
            &[put(1, 0, vec![text("1"), text("n"), text("b")])],
            0,
        )
        .unwrap();
        let e = s
            .register_schema("ds", "a", std::slice::from_ref(&new), true)
            .unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("column \"note\" was dropped")
                && m.contains("tether hub schema ds --accept msgs"),
            "{m}"
        );
        s.accept_breaking("ds", "msgs").unwrap();
        let rewritten = s
            .register_schema("ds", "a", std::slice::from_ref(&new), true)
            .unwrap();
        assert_eq!(rewritten.len(), 1);
        assert_eq!(rewritten[0].change.values, vec![text("1"), text("b")]);
        let e = s
            .register_schema("ds", "b", std::slice::from_ref(&old), true)
            .unwrap_err();
        assert!(e.to_string().contains("upgrade the app"), "{e}");
        // Once upgraded, its change made against the version before the
        // rewrite is no conflict: nobody wrote the row in between.
        s.register_schema("ds", "b", std::slice::from_ref(&new), true)
            .unwrap();
        let a = s
            .apply_batch(
                "ds",
                "b",
                &tables(new.clone()),
                &[put(1, 1, vec![text("1"), text("b's edit")])],
                0,
            )
            .unwrap();
        assert!(
            matches!(a.results[0].outcome, Outcome::Applied { .. }),
            "{:?}",
            a.results[0]
        );
        // A session opened before the change stores nothing more.
        let e = s
            .apply_batch(
                "ds",
                "b",
                &tables(old),
                &[put(2, 0, vec![text("2"), text("n"), text("b")])],
                0,
            )
            .unwrap_err();
        assert!(matches!(e, StoreError::SchemaRetired { .. }), "{e:?}");
        let h = s.schema_history("ds").unwrap();
        assert_eq!((h[0].version, h[0].floor, h[0].accept), (2, 2, false));
        assert!(h[0].versions[1].breaking);
    }
}
