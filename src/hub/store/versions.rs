//! The versioned schema of each table of a dataset, in the hub's SQLite
//! store: which schema clients must be compatible with, its history, and a
//! breaking change the operator armed (see [`super::evolution`]).
//!
//! `tables` holds per table the current `version`, the `floor` (the version
//! of the last breaking change: schemas from before it are refused) and
//! `accept` (1: the next breaking change a read_write client brings becomes
//! the new version). `schema_versions` holds every version's schema (JSON of
//! [`TableSchema`]), what changed and when.

use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use super::evolution::{self, Relation};
use super::{LogEntry, StoreError};
use crate::proto::{
    decode_values, encode_key, encode_values, Op, RemoteChange, TableSchema, Value,
};

pub(super) const SQL: &str = "
CREATE TABLE IF NOT EXISTS schema_versions (dataset INTEGER NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL, schema TEXT NOT NULL, change TEXT NOT NULL, breaking INTEGER NOT NULL, at INTEGER NOT NULL, PRIMARY KEY (dataset, name, version));
CREATE TABLE IF NOT EXISTS rewritten (dataset INTEGER NOT NULL, tbl TEXT NOT NULL, pk BLOB NOT NULL, before INTEGER NOT NULL, after INTEGER NOT NULL, PRIMARY KEY (dataset, tbl, pk)) WITHOUT ROWID;
";

/// Whether the dataset holds rows the hub rewrote (checked once per batch).
pub(super) fn any_rewritten(c: &Connection, ds: i64) -> Result<bool, StoreError> {
    Ok(
        c.prepare_cached("SELECT EXISTS (SELECT 1 FROM rewritten WHERE dataset = ?1)")?
            .query_row([ds], |r| r.get(0))?,
    )
}

/// The version a row had before the hub rewrote it in a breaking change's
/// new layout, if its version `now` is that rewrite.
pub(super) fn rewritten_from(
    c: &Connection,
    ds: i64,
    table: &str,
    pk: &[u8],
    now: u64,
) -> Result<Option<u64>, StoreError> {
    Ok(c.prepare_cached(
        "SELECT before FROM rewritten WHERE dataset = ?1 AND tbl = ?2 AND pk = ?3 AND after = ?4",
    )?
    .query_row(params![ds, table, pk, now as i64], |r| r.get::<_, i64>(0))
    .optional()?
    .map(|v| v as u64))
}

/// One version of a table's schema, as `tether hub schema` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct SchemaVersion {
    pub version: u64,
    pub schema: TableSchema,
    /// What changed from the version before ("created", "added columns ...").
    pub change: String,
    /// A breaking change the operator accepted: older schemas are refused.
    pub breaking: bool,
    /// When it was recorded, seconds since the epoch.
    pub at: i64,
}

/// A table of a dataset with its schema history, oldest first.
#[derive(Clone, Debug, Serialize)]
pub struct TableHistory {
    pub name: String,
    pub version: u64,
    /// Clients must have at least this version's columns.
    pub floor: u64,
    pub strict: bool,
    /// A breaking change is armed: the next one a read_write client brings
    /// is accepted.
    pub accept: bool,
    pub versions: Vec<SchemaVersion>,
}

struct Known {
    version: u64,
    floor: u64,
    strict: bool,
    accept: bool,
    fingerprint: String,
}

fn known(tx: &Connection, ds: i64, name: &str) -> Result<Option<Known>, StoreError> {
    Ok(tx
        .prepare_cached(
            "SELECT version, floor, strict, accept, fingerprint FROM tables WHERE dataset = ?1 AND name = ?2",
        )?
        .query_row(params![ds, name], |r| {
            Ok(Known {
                version: r.get::<_, i64>(0)? as u64,
                floor: r.get::<_, i64>(1)? as u64,
                strict: r.get(2)?,
                accept: r.get(3)?,
                fingerprint: r.get(4)?,
            })
        })
        .optional()?)
}

/// The schema of `version`, if recorded (stores made before versions hold
/// only a fingerprint).
pub(super) fn schema_at(
    c: &Connection,
    ds: i64,
    name: &str,
    version: u64,
) -> Result<Option<TableSchema>, StoreError> {
    let text: Option<String> = c
        .prepare_cached(
            "SELECT schema FROM schema_versions WHERE dataset = ?1 AND name = ?2 AND version = ?3",
        )?
        .query_row(params![ds, name, version as i64], |r| r.get(0))
        .optional()?;
    text.map(|t| {
        serde_json::from_str(&t)
            .map_err(|e| StoreError::Backend(format!("schema {version} of table {name:?}: {e}")))
    })
    .transpose()
}

fn record(
    tx: &Connection,
    ds: i64,
    t: &TableSchema,
    version: u64,
    change: &str,
    breaking: bool,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO schema_versions (dataset, name, version, schema, change, breaking, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, unixepoch())",
    )?
    .execute(params![
        ds,
        t.name,
        version as i64,
        serde_json::to_string(t).expect("BUG: a schema encodes"),
        change,
        breaking
    ])?;
    tx.prepare_cached(
        "UPDATE tables SET version = ?3, fingerprint = ?4 WHERE dataset = ?1 AND name = ?2",
    )?
    .execute(params![ds, t.name, version as i64, t.fingerprint])?;
    Ok(())
}

/// The client number of log entries the hub writes itself (row numbers of
/// `clients` start at 1): no session skips them as its own.
const NO_CLIENT: i64 = 0;

/// Where a registering client stands.
pub(super) struct Registrant<'a> {
    pub dataset: &'a str,
    pub ds: i64,
    pub client_no: i64,
    pub may_register: bool,
}

/// Checks one table of a `hello` against the dataset's schema and records
/// what a read_write client brings: a new table, added columns, STRICT, or
/// a breaking change the operator armed (whose rows are then written again
/// in the new layout: returned, to be published).
pub(super) fn register(
    tx: &Connection,
    who: &Registrant,
    t: &TableSchema,
    head: &mut u64,
) -> Result<Vec<LogEntry>, StoreError> {
    let ds = who.ds;
    let Some(k) = known(tx, ds, &t.name)? else {
        if !who.may_register {
            return Err(StoreError::NotRegistered {
                dataset: who.dataset.to_owned(),
                table: t.name.clone(),
            });
        }
        tx.execute(
            "INSERT INTO tables (dataset, name, fingerprint, strict, version, floor) VALUES (?1, ?2, ?3, ?4, 1, 1)",
            params![ds, t.name, t.fingerprint, t.strict],
        )?;
        record(tx, ds, t, 1, "created", false)?;
        return Ok(Vec::new());
    };
    let Some(current) = schema_at(tx, ds, &t.name, k.version)? else {
        return adopt(tx, who, t, &k);
    };
    match evolution::compare(&current, t) {
        Relation::Same => {}
        Relation::Extends { added } => {
            if who.may_register {
                let v = k.version + 1;
                let change = format!("added columns {}", added.join(", "));
                record(tx, ds, t, v, &change, false)?;
                tracing::info!(dataset = who.dataset, table = %t.name, version = v, "{change}: the table's schema is now version {v}; devices without the new columns keep syncing the others");
            }
        }
        Relation::Older { .. } => {
            let floor = schema_at(tx, ds, &t.name, k.floor)?;
            if let Some(f) = floor.filter(|f| {
                !matches!(
                    evolution::compare(f, t),
                    Relation::Same | Relation::Extends { .. }
                )
            }) {
                return Err(retired(tx, who, t, &k, &f));
            }
        }
        Relation::Breaking(diffs) => {
            if is_retired(tx, ds, t, k.floor)? {
                let f = schema_at(tx, ds, &t.name, k.floor)?.unwrap_or(current);
                return Err(retired(tx, who, t, &k, &f));
            }
            if !(k.accept && who.may_register && evolution::acceptable(&diffs)) {
                return Err(StoreError::SchemaChanged {
                    dataset: who.dataset.to_owned(),
                    table: t.name.clone(),
                    version: k.version,
                    what: evolution::describe(&diffs),
                    key: !evolution::acceptable(&diffs),
                });
            }
            let v = k.version + 1;
            let change = format!("breaking: {}", evolution::describe(&diffs));
            record(tx, ds, t, v, &change, true)?;
            tx.execute(
                "UPDATE tables SET floor = ?3, accept = 0 WHERE dataset = ?1 AND name = ?2",
                params![ds, t.name, v as i64],
            )?;
            let rows = rewrite_rows(tx, who, &current, t, head)?;
            tracing::warn!(dataset = who.dataset, table = %t.name, version = v, rows = rows.len(), "the operator's accepted breaking change is now version {v} ({change}); the table's rows were written again in the new layout, and clients with an older schema are refused until their app is upgraded");
            mark_strict(tx, who, t, &k)?;
            return Ok(rows);
        }
    }
    mark_strict(tx, who, t, &k)?;
    Ok(Vec::new())
}

/// A table of a store made before schema versions, which knows only the
/// fingerprint of the schema the table was first synced with. A client
/// with that schema has it recorded as the table's version; a client with
/// another one (its app added a column before the hub was upgraded) is
/// refused until the operator accepts its schema with `tether hub schema
/// DATASET --accept TABLE`, since the store cannot tell an added column from
/// a breaking change. Its schema is then recorded as the next version, and
/// clients whose schema is a prefix of it (not upgraded yet) keep syncing.
fn adopt(
    tx: &Connection,
    who: &Registrant,
    t: &TableSchema,
    k: &Known,
) -> Result<Vec<LogEntry>, StoreError> {
    let same = k.fingerprint == t.fingerprint;
    let accepted = k.accept && who.may_register;
    if !(same || accepted) {
        return Err(StoreError::SchemaMismatch {
            dataset: who.dataset.to_owned(),
            table: t.name.clone(),
            got: t.fingerprint.chars().take(12).collect(),
            want: k.fingerprint.chars().take(12).collect(),
        });
    }
    if who.may_register {
        if same {
            record(tx, who.ds, t, k.version, "recorded", false)?;
        } else {
            let v = k.version + 1;
            let change = "adopted: accepted by the operator over a schema the store knew only by its fingerprint";
            record(tx, who.ds, t, v, change, false)?;
            tx.execute(
                "UPDATE tables SET accept = 0 WHERE dataset = ?1 AND name = ?2",
                params![who.ds, t.name],
            )?;
            tracing::warn!(dataset = who.dataset, table = %t.name, version = v, "the operator accepted this schema of a table the store knew only by fingerprint: it is now version {v}");
        }
    }
    mark_strict(tx, who, t, k)?;
    Ok(Vec::new())
}

/// A table announced STRICT by a read_write client is STRICT for good.
fn mark_strict(
    tx: &Connection,
    who: &Registrant,
    t: &TableSchema,
    k: &Known,
) -> Result<(), StoreError> {
    if t.strict && !k.strict && who.may_register {
        tx.execute(
            "UPDATE tables SET strict = 1 WHERE dataset = ?1 AND name = ?2",
            params![who.ds, t.name],
        )?;
        tracing::info!(dataset = who.dataset, table = %t.name, "a client announced the table STRICT: from now on its values are checked by STRICT rules for every client");
    }
    Ok(())
}

/// Whether `t` is one of the versions a breaking change retired.
fn is_retired(tx: &Connection, ds: i64, t: &TableSchema, floor: u64) -> Result<bool, StoreError> {
    let n: i64 = tx
        .prepare_cached(
            "SELECT count(*) FROM schema_versions WHERE dataset = ?1 AND name = ?2 AND version < ?3 AND schema ->> 'fingerprint' = ?4",
        )?
        .query_row(params![ds, t.name, floor as i64, t.fingerprint], |r| {
            r.get(0)
        })?;
    Ok(n > 0)
}

fn retired(
    tx: &Connection,
    who: &Registrant,
    t: &TableSchema,
    k: &Known,
    floor: &TableSchema,
) -> StoreError {
    let change: String = tx
        .query_row(
            "SELECT change FROM schema_versions WHERE dataset = ?1 AND name = ?2 AND version = ?3",
            params![who.ds, t.name, k.floor as i64],
            |r| r.get(0),
        )
        .unwrap_or_default();
    StoreError::SchemaRetired {
        dataset: who.dataset.to_owned(),
        table: t.name.clone(),
        floor: k.floor,
        change,
        columns: floor.columns.join(", "),
    }
}

/// Writes every live row of the table again, its values carried over into
/// the new layout ([`evolution::column_map`]), as new changes: a device
/// that downloads the log from the start, or missed changes written in the
/// old layout, ends with rows in the new layout. The log entries belong to
/// no client, so every device gets them, the one that brought the change
/// too (it may have missed changes of the old layout while it was
/// refused); the rows stay last written by that client, so that its own
/// pending changes, made against the versions it holds, do not conflict;
/// nor do those of a device that was refused until its app upgraded, made
/// against the version before the rewrite (see `rewritten_from`).
fn rewrite_rows(
    tx: &Connection,
    who: &Registrant,
    from: &TableSchema,
    to: &TableSchema,
    head: &mut u64,
) -> Result<Vec<LogEntry>, StoreError> {
    let ds = who.ds;
    let map = evolution::column_map(from, to);
    let rows: Vec<(Vec<u8>, Vec<u8>, i64)> = tx
        .prepare(&format!(
            "SELECT r.pk, l.vals, r.version FROM rows_{ds} r JOIN log_{ds} l ON l.seq = r.version WHERE r.tbl = ?1 AND r.deleted = 0 ORDER BY r.version"
        ))?
        .query_map([&to.name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(rows.len());
    for (pk, vals, before) in rows {
        let old = decode_values(&vals).map_err(|e| StoreError::Backend(e.to_string()))?;
        let values: Vec<Value> = map
            .iter()
            .map(|m| m.and_then(|i| old.get(i).cloned()).unwrap_or(Value::Null))
            .collect();
        let key: Vec<Value> = to.pk.iter().map(|&i| values[i as usize].clone()).collect();
        debug_assert_eq!(encode_key(&key), pk, "a breaking change keeps the key");
        *head += 1;
        tx.prepare_cached(&format!(
            "INSERT INTO log_{ds} (seq, tbl, pk, op, vals, client_no) VALUES (?1, ?2, ?3, 1, ?4, ?5)"
        ))?
        .execute(params![*head as i64, to.name, pk, encode_values(&values), NO_CLIENT])?;
        tx.prepare_cached(&format!(
            "UPDATE rows_{ds} SET version = ?3, client_no = ?4 WHERE tbl = ?1 AND pk = ?2"
        ))?
        .execute(params![to.name, pk, *head as i64, who.client_no])?;
        // A change made against the version before is no conflict.
        tx.prepare_cached(
            "INSERT INTO rewritten (dataset, tbl, pk, before, after) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (dataset, tbl, pk) DO UPDATE SET before = excluded.before, after = excluded.after",
        )?
        .execute(params![ds, to.name, pk, before, *head as i64])?;
        out.push(LogEntry {
            change: RemoteChange {
                version: *head,
                table: to.name.clone(),
                op: Op::Upsert,
                pk: key,
                values,
            },
            client: Arc::from(""),
        });
    }
    Ok(out)
}

/// Arms a breaking change of `table`: the next read_write client whose
/// schema of it breaks with the current one records the new version.
pub(super) fn arm(c: &Connection, ds: i64, dataset: &str, table: &str) -> Result<(), StoreError> {
    let n = c.execute(
        "UPDATE tables SET accept = 1 WHERE dataset = ?1 AND name = ?2",
        params![ds, table],
    )?;
    if n == 0 {
        return Err(StoreError::Backend(format!(
            "dataset {dataset:?} has no table {table:?} on the hub yet; a table is recorded when a device first syncs it (see `tether hub schema {dataset}`)"
        )));
    }
    Ok(())
}

/// Every table of the dataset with its versions.
pub(super) fn history(c: &Connection, ds: i64) -> Result<Vec<TableHistory>, StoreError> {
    let mut tables: Vec<TableHistory> = c
        .prepare("SELECT name, version, floor, strict, accept FROM tables WHERE dataset = ?1 ORDER BY name")?
        .query_map([ds], |r| {
            Ok(TableHistory {
                name: r.get(0)?,
                version: r.get::<_, i64>(1)? as u64,
                floor: r.get::<_, i64>(2)? as u64,
                strict: r.get(3)?,
                accept: r.get(4)?,
                versions: Vec::new(),
            })
        })?
        .collect::<Result<_, _>>()?;
    for t in &mut tables {
        let rows: Vec<(i64, String, String, bool, i64)> = c
            .prepare_cached(
                "SELECT version, schema, change, breaking, at FROM schema_versions WHERE dataset = ?1 AND name = ?2 ORDER BY version",
            )?
            .query_map(params![ds, t.name], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<Result<_, _>>()?;
        for (version, schema, change, breaking, at) in rows {
            t.versions.push(SchemaVersion {
                version: version as u64,
                schema: serde_json::from_str(&schema).map_err(|e| {
                    StoreError::Backend(format!("schema {version} of {}: {e}", t.name))
                })?,
                change,
                breaking,
                at,
            });
        }
    }
    Ok(tables)
}
