//! Changes from the hub that the local database refused, set aside in
//! `_tether_held` so that they never block the changes behind them.
//!
//! A refused change is kept (one entry per row, the newest version) with the
//! SQLite error as its reason, and the row keeps its local value and version,
//! so a later good version of the row still applies and drops the entry.
//! [`super::Replica::retry_held`] applies the entries again once the cause may
//! have gone (the operator removed the duplicate, fixed the trigger, ...).
//!
//! Writes are isolated by [`Isolation`]: a batch first runs in one plain
//! transaction (the common case costs nothing extra); after a refusal the
//! transaction is rolled back and run again with a savepoint around each
//! write, so one refused write is undone alone.

use std::collections::HashMap;

use rusqlite::{params, Connection, ErrorCode};
use serde::{Deserialize, Serialize};

use crate::proto::{decode_key, encode_key, encode_values, Op, Value};

/// Whether an error from writing one change is about that change (the change
/// is held and the rest goes on) rather than about the database (the whole
/// call fails and is retried later).
///
/// About the change:
/// * `SQLITE_CONSTRAINT` in all its forms: UNIQUE, NOT NULL, CHECK, FOREIGN
///   KEY, a value of the wrong type in a STRICT table
///   (`SQLITE_CONSTRAINT_DATATYPE`) and `RAISE(ABORT|FAIL|ROLLBACK)` in a
///   trigger (`SQLITE_CONSTRAINT_TRIGGER`);
/// * `SQLITE_MISMATCH` (a non-integer for an `INTEGER PRIMARY KEY`);
/// * `SQLITE_TOOBIG` (a value over the database's length limit);
/// * `SQLITE_ERROR`, the generic code: errors raised while a trigger or a
///   function runs on the change's values (malformed JSON, ...), and schema
///   errors in a trigger body; holding is safe because held changes are
///   retried, nothing is lost;
/// * a value that cannot be converted to or from SQL.
///
/// About the database (everything else): `SQLITE_BUSY` and `SQLITE_LOCKED`,
/// I/O errors, a full disk, a read-only or moved file, corruption, running
/// out of memory. These fail the whole call, which is retried as a whole.
pub fn is_refusal(err: &rusqlite::Error) -> bool {
    match err {
        rusqlite::Error::SqliteFailure(e, _) => matches!(
            e.code,
            ErrorCode::ConstraintViolation
                | ErrorCode::TypeMismatch
                | ErrorCode::TooBig
                | ErrorCode::Unknown
        ),
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::ToSqlConversionFailure(..) => true,
        _ => false,
    }
}

/// A held change as shown to the operator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeldChange {
    pub table: String,
    /// The row's key values as JSON (for example `[42]`).
    pub key: String,
    /// The hub version the change would have given the row.
    pub version: u64,
    pub op: Op,
    /// Why the local database refused it (the SQLite error, with table and key).
    pub reason: String,
    /// How many times it was tried (the first apply included).
    pub attempts: u64,
    /// When this version was first held, in seconds since the epoch.
    pub since: i64,
}

/// What [`super::Replica::retry_held`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryReport {
    /// Held changes now written to the database.
    pub applied: u64,
    /// Held changes dropped because the row moved past their version.
    pub superseded: u64,
    /// Held changes kept aside until their row's local change is answered.
    pub deferred: u64,
    /// Held changes refused again.
    pub still_held: u64,
}

/// What [`super::Replica::apply_remote`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoteApplied {
    /// Changes written to the database.
    pub applied: u64,
    /// Changes the database refused, now in `_tether_held`.
    pub held: u64,
}

/// The key values as readable text: JSON of the values.
pub fn render_key(pk: &[Value]) -> String {
    serde_json::to_string(pk).unwrap_or_else(|_| format!("{pk:?}"))
}

/// The reason stored with a held change: which row, then why.
pub fn reason(table: &str, pk: &[Value], why: &str) -> String {
    format!("table {table:?} key {}: {why}", render_key(pk))
}

fn op_code(op: Op) -> i64 {
    if op == Op::Upsert {
        1
    } else {
        2
    }
}

/// Holds a refused change; a newer version of the row replaces an older
/// entry, the same version counts one more attempt.
pub fn hold(
    c: &Connection,
    table: &str,
    pk: &[Value],
    version: u64,
    op: Op,
    values: &[Value],
    reason: &str,
) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO _tether_held (tbl, pk, version, op, vals, reason, since, attempts)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, unixepoch(), 1)
         ON CONFLICT (tbl, pk) DO UPDATE SET
           attempts = CASE WHEN excluded.version = version THEN attempts + 1 ELSE 1 END,
           since = CASE WHEN excluded.version = version THEN since ELSE excluded.since END,
           version = excluded.version, op = excluded.op, vals = excluded.vals,
           reason = excluded.reason
         WHERE excluded.version >= version",
    )?
    .execute(params![
        table,
        encode_key(pk),
        version as i64,
        op_code(op),
        encode_values(values),
        reason
    ])?;
    Ok(())
}

/// Drops the row's held entry if `version` supersedes it.
pub fn supersede(c: &Connection, table: &str, pk: &[Value], version: u64) -> rusqlite::Result<()> {
    c.prepare_cached("DELETE FROM _tether_held WHERE tbl = ?1 AND pk = ?2 AND version <= ?3")?
        .execute(params![table, encode_key(pk), version as i64])?;
    Ok(())
}

/// Whether anything is held (so that applying can skip superseding).
pub fn any(c: &Connection) -> rusqlite::Result<bool> {
    c.prepare_cached("SELECT EXISTS (SELECT 1 FROM _tether_held)")?
        .query_row([], |r| r.get(0))
}

/// Number of held changes.
pub fn count(c: &Connection) -> rusqlite::Result<u64> {
    c.prepare_cached("SELECT count(*) FROM _tether_held")?
        .query_row([], |r| r.get::<_, i64>(0))
        .map(|n| n as u64)
}

/// Why the most recently held change was refused (None when nothing is held).
pub fn newest_reason(c: &Connection) -> rusqlite::Result<Option<String>> {
    use rusqlite::OptionalExtension;
    c.prepare_cached("SELECT reason FROM _tether_held ORDER BY since DESC LIMIT 1")?
        .query_row([], |r| r.get(0))
        .optional()
}

/// One stored entry, as read back for a retry.
pub struct Entry {
    pub table: String,
    pub pk: Vec<Value>,
    pub version: u64,
    pub op: Op,
    /// Encoded values; decoding may fail on a damaged entry.
    pub vals: Vec<u8>,
}

/// All held entries, oldest first.
pub fn entries(c: &Connection) -> rusqlite::Result<Vec<Entry>> {
    let mut st = c.prepare_cached(
        "SELECT tbl, pk, version, op, vals FROM _tether_held ORDER BY since, rowid",
    )?;
    let rows = st.query_map([], |r| {
        let pk: Vec<u8> = r.get(1)?;
        Ok(Entry {
            table: r.get(0)?,
            pk: decode_key(&pk).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Blob, e.into())
            })?,
            version: r.get::<_, i64>(2)? as u64,
            op: if r.get::<_, i64>(3)? == 2 {
                Op::Delete
            } else {
                Op::Upsert
            },
            vals: r.get(4)?,
        })
    })?;
    rows.collect()
}

/// Up to `limit` held changes for the operator, oldest first.
pub fn list(c: &Connection, limit: usize) -> rusqlite::Result<Vec<HeldChange>> {
    let mut st = c.prepare_cached(
        "SELECT tbl, pk, version, op, reason, attempts, since FROM _tether_held
         ORDER BY since, rowid LIMIT ?1",
    )?;
    let rows = st.query_map([limit.min(i64::MAX as usize) as i64], |r| {
        let pk: Vec<u8> = r.get(1)?;
        let key = match decode_key(&pk) {
            Ok(k) => render_key(&k),
            Err(_) => format!("0x{}", hex::encode(&pk)),
        };
        Ok(HeldChange {
            table: r.get(0)?,
            key,
            version: r.get::<_, i64>(2)? as u64,
            op: if r.get::<_, i64>(3)? == 2 {
                Op::Delete
            } else {
                Op::Upsert
            },
            reason: r.get(4)?,
            attempts: r.get::<_, i64>(5)? as u64,
            since: r.get(6)?,
        })
    })?;
    rows.collect()
}

/// Why a transaction that isolates writes stopped before committing.
#[derive(Debug)]
pub enum Abort {
    /// An error about the database: the whole call fails.
    Db(rusqlite::Error),
    /// A write was refused in the plain run: run again with savepoints.
    Careful,
    /// A refusal rolled back the whole transaction (`RAISE(ROLLBACK)`, an
    /// `ON CONFLICT ROLLBACK` constraint): run again with that write held
    /// without trying it.
    Lost { attempt: usize, reason: String },
}

impl From<rusqlite::Error> for Abort {
    fn from(e: rusqlite::Error) -> Abort {
        Abort::Db(e)
    }
}

/// Runs the writes of one transaction so that a refused write is undone
/// alone (see the module docs). Attempts are numbered in the order they are
/// made, which is the same in every run of the same input.
#[derive(Debug, Default)]
pub struct Isolation {
    careful: bool,
    lost: HashMap<usize, String>,
    next: usize,
}

impl Isolation {
    /// Starts a run of the transaction.
    pub fn begin(&mut self) {
        self.next = 0;
    }

    /// Takes the reason a run stopped and prepares the next run; an error
    /// about the database is handed back.
    pub fn after(&mut self, abort: Abort) -> Result<(), rusqlite::Error> {
        match abort {
            Abort::Db(e) => return Err(e),
            Abort::Careful => self.careful = true,
            Abort::Lost { attempt, reason } => {
                self.careful = true;
                self.lost.insert(attempt, reason);
            }
        }
        Ok(())
    }

    /// Runs one write: `Ok(Ok(_))` when it was done, `Ok(Err(why))` when the
    /// database refused it and it was undone.
    pub fn attempt<T>(
        &mut self,
        c: &Connection,
        write: impl FnOnce() -> rusqlite::Result<T>,
    ) -> Result<Result<T, String>, Abort> {
        let id = self.next;
        self.next += 1;
        if let Some(why) = self.lost.get(&id) {
            return Ok(Err(why.clone()));
        }
        if !self.careful {
            return match write() {
                Ok(v) => Ok(Ok(v)),
                Err(e) if is_refusal(&e) => Err(Abort::Careful),
                Err(e) => Err(Abort::Db(e)),
            };
        }
        c.execute_batch("SAVEPOINT tether_write")?;
        match write() {
            Ok(v) => {
                c.execute_batch("RELEASE tether_write")?;
                Ok(Ok(v))
            }
            Err(e) if is_refusal(&e) => {
                if c.is_autocommit() {
                    return Err(Abort::Lost {
                        attempt: id,
                        reason: e.to_string(),
                    });
                }
                c.execute_batch("ROLLBACK TO tether_write; RELEASE tether_write")?;
                Ok(Err(e.to_string()))
            }
            Err(e) => Err(Abort::Db(e)),
        }
    }
}
