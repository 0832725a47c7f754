//! Introspection of the synced tables and the SQL tether installs beside them.
//!
//! Capture is an append-only log, `_tether_log`: triggers on each synced
//! table append one row per written row (`op` 1 = insert or update, 2 =
//! delete, the columns touched as a bit `mask`, the primary key in `k0`..`k7`)
//! inside the writer's own transaction. Appending to a table with no index
//! other than its rowid is the cheapest write SQLite has, so the app's own
//! writes stay fast. The log's rowid is the client sequence number (`seq`)
//! sent to the hub; tether never deletes the log's newest row, so SQLite never
//! hands out a sequence number twice (see `Replica`).
//!
//! Coalescing happens when the daemon reads the log: several writes to one
//! row become one change carrying the row's current values, so the last value
//! always wins.
//!
//! `_tether_ver_<t>` keeps the hub version of each row as last seen locally,
//! sent as `base` with a change so that the hub can detect conflicts.
//!
//! Key columns in tether's tables are declared without a type, so SQLite keeps
//! every key value exactly as the app stored it.

use sha2::{Digest, Sha256};

use crate::proto::TableSchema;

/// SQL for the current time in milliseconds since the epoch, for `at` in
/// `_tether_log`; julianday() works on every SQLite an app may bring.
pub const NOW_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)";

/// Quotes an SQL identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Why a configured table cannot be synced.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("table {table:?} does not exist in {db}; create it, or remove it from `tables` in the config")]
    MissingTable { db: String, table: String },
    #[error("table {table:?} in {db} has no declared PRIMARY KEY; tether identifies rows by their key, so declare one (for example `id INTEGER PRIMARY KEY`)")]
    NoPrimaryKey { db: String, table: String },
    #[error("table {table:?} in {db} has a name starting with `_tether_`, which is reserved for tether's own tables")]
    Reserved { db: String, table: String },
    #[error(
        "table {table:?} in {db} has a primary key of {n} columns; tether supports at most {max}"
    )]
    KeyTooWide {
        db: String,
        table: String,
        n: usize,
        max: usize,
    },
    #[error("reading the schema of {db}: {source}")]
    Sqlite {
        db: String,
        #[source]
        source: rusqlite::Error,
    },
}

/// The shape of a synced table as found in the local database.
#[derive(Clone, Debug)]
pub struct Table {
    pub name: String,
    pub columns: Vec<String>,
    pub types: Vec<String>,
    /// Column indexes of the key, in key order.
    pub pk: Vec<usize>,
    /// Declared `STRICT`: SQLite refuses values of another type than the
    /// declared one (announced in `hello`, so the hub refuses them too).
    pub strict: bool,
}

impl Table {
    /// Reads a table's columns and key; refuses missing and keyless tables.
    pub fn introspect(
        conn: &rusqlite::Connection,
        db: &str,
        name: &str,
    ) -> Result<Table, SchemaError> {
        if name.starts_with("_tether_") {
            return Err(SchemaError::Reserved {
                db: db.into(),
                table: name.into(),
            });
        }
        let sql_err = |source| SchemaError::Sqlite {
            db: db.into(),
            source,
        };
        let mut stmt = conn
            .prepare("SELECT name, type, pk FROM pragma_table_info(?1) ORDER BY cid")
            .map_err(sql_err)?;
        let rows: Vec<(String, String, i64)> = stmt
            .query_map([name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(sql_err)?
            .collect::<Result<_, _>>()
            .map_err(sql_err)?;
        if rows.is_empty() {
            return Err(SchemaError::MissingTable {
                db: db.into(),
                table: name.into(),
            });
        }
        let mut pk: Vec<(i64, usize)> = rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r.2 > 0)
            .map(|(i, r)| (r.2, i))
            .collect();
        if pk.is_empty() {
            return Err(SchemaError::NoPrimaryKey {
                db: db.into(),
                table: name.into(),
            });
        }
        pk.sort();
        let strict: i64 = conn
            .query_row(
                "SELECT coalesce(max(strict), 0) FROM pragma_table_list(?1)",
                [name],
                |r| r.get(0),
            )
            .map_err(sql_err)?;
        if pk.len() > MAX_KEY_COLUMNS {
            return Err(SchemaError::KeyTooWide {
                db: db.into(),
                table: name.into(),
                n: pk.len(),
                max: MAX_KEY_COLUMNS,
            });
        }
        Ok(Table {
            name: name.to_owned(),
            columns: rows.iter().map(|r| r.0.clone()).collect(),
            types: rows.iter().map(|r| r.1.to_uppercase()).collect(),
            pk: pk.into_iter().map(|(_, i)| i).collect(),
            strict: strict != 0,
        })
    }

    /// The schema as announced in `hello`, with its fingerprint.
    pub fn wire_schema(&self) -> TableSchema {
        let pk: Vec<u32> = self.pk.iter().map(|&i| i as u32).collect();
        TableSchema {
            name: self.name.clone(),
            columns: self.columns.clone(),
            types: self.types.clone(),
            fingerprint: fingerprint(&self.name, &self.columns, &self.types, &pk),
            pk,
            strict: self.strict,
        }
    }

    pub fn is_key(&self, col: usize) -> bool {
        self.pk.contains(&col)
    }

    pub fn ver_table(&self) -> String {
        ident(&format!("_tether_ver_{}", self.name))
    }

    /// `k0, k1, ...`: key columns of tether's side tables.
    pub fn key_cols(&self) -> String {
        (0..self.pk.len())
            .map(|i| format!("k{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `"id", "sub"`: key columns of the user table.
    pub fn pk_cols(&self) -> String {
        self.pk
            .iter()
            .map(|&i| ident(&self.columns[i]))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The bit used in a change's mask for column `i`. Columns past the 62nd
    /// share the top bit, which makes `merge_columns` treat them as one group.
    pub fn mask_bit(i: usize) -> i64 {
        1i64 << i.min(62)
    }

    /// The statements that create tether's side table and triggers for this
    /// table, whose id in `_tether_tables` is `id`. Triggers are dropped and
    /// recreated so they always match the current columns.
    pub fn install_sql(&self, id: i64) -> String {
        let t = ident(&self.name);
        let ver = self.ver_table();
        let keys = self.key_cols();
        let trig = |kind: &str| ident(&format!("_tether_{}_{}", self.name, kind));
        let cols_of = |prefix: &str| {
            self.pk
                .iter()
                .map(|&i| format!("{prefix}.{}", ident(&self.columns[i])))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (new_keys, old_keys) = (cols_of("NEW"), cols_of("OLD"));
        let key_changed = self
            .pk
            .iter()
            .map(|&i| {
                let c = ident(&self.columns[i]);
                format!("OLD.{c} IS NOT NEW.{c}")
            })
            .collect::<Vec<_>>()
            .join(" OR ");
        let col_mask = self
            .columns
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.is_key(*i))
            .map(|(i, c)| {
                let c = ident(c);
                format!(
                    "(CASE WHEN OLD.{c} IS NOT NEW.{c} THEN {} ELSE 0 END)",
                    Self::mask_bit(i)
                )
            })
            .collect::<Vec<_>>();
        let col_mask = if col_mask.is_empty() {
            "0".to_owned()
        } else {
            col_mask.join(" | ")
        };
        let guard = "NOT EXISTS (SELECT 1 FROM _tether_applying)";
        // `at` (milliseconds since the epoch) lets status show the age of the
        // oldest pending write; julianday() works on every SQLite an app may
        // bring, unlike unixepoch('subsec').
        let log = format!("INSERT INTO _tether_log (tbl, op, mask, at, {keys})");
        let now = NOW_MS;
        format!(
            "CREATE TABLE IF NOT EXISTS {ver} ({keys}, version INTEGER NOT NULL, PRIMARY KEY ({keys})) WITHOUT ROWID;
DROP TRIGGER IF EXISTS {ins};
DROP TRIGGER IF EXISTS {upd};
DROP TRIGGER IF EXISTS {updkey};
DROP TRIGGER IF EXISTS {del};
CREATE TRIGGER {ins} AFTER INSERT ON {t} WHEN {guard} BEGIN
  {log} VALUES ({id}, 1, -1, {now}, {new_keys});
END;
CREATE TRIGGER {upd} AFTER UPDATE ON {t} WHEN {guard} BEGIN
  {log} VALUES ({id}, 1, CASE WHEN {key_changed} THEN -1 ELSE {col_mask} END, {now}, {new_keys});
END;
CREATE TRIGGER {updkey} AFTER UPDATE ON {t} WHEN {guard} AND ({key_changed}) BEGIN
  {log} VALUES ({id}, 2, 0, {now}, {old_keys});
END;
CREATE TRIGGER {del} AFTER DELETE ON {t} WHEN {guard} BEGIN
  {log} VALUES ({id}, 2, 0, {now}, {old_keys});
END;
",
            ins = trig("ins"),
            upd = trig("upd"),
            updkey = trig("updkey"),
            del = trig("del"),
        )
    }
}

/// Fingerprint of a table's schema: lowercase hex SHA-256 of the canonical
/// text `name\n` then, per column in order, `column\ttype\tkeypos\n` where
/// `keypos` is the 1-based position in the key or 0.
pub fn fingerprint(name: &str, columns: &[String], types: &[String], pk: &[u32]) -> String {
    let mut text = format!("{name}\n");
    for (i, (c, t)) in columns.iter().zip(types).enumerate() {
        let keypos = pk
            .iter()
            .position(|&k| k as usize == i)
            .map(|p| p + 1)
            .unwrap_or(0);
        text.push_str(&format!("{c}\t{t}\t{keypos}\n"));
    }
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Most primary key columns a synced table may have (`k0` .. `k7` in the log).
pub const MAX_KEY_COLUMNS: usize = 8;

/// tether's shared bookkeeping tables, created once per database.
///
/// * `_tether_meta`: client id, cursor, how far the log was consumed.
/// * `_tether_tables`: stable small ids of the synced tables, used in the log.
/// * `_tether_log`: captured writes (see the module docs).
/// * `_tether_applying`: holds a row only inside tether's own transactions,
///   so the triggers skip what tether writes itself.
/// * `_tether_deferred`: the hub's newest row for a key whose local change is
///   still unanswered.
/// * `_tether_rejected`: changes the hub refused as invalid, kept for the operator.
/// * `_tether_held`: the hub's changes the local database refused, one per row
///   (the newest), kept until they apply or are superseded (see `local::held`).
pub const BASE_SQL: &str = "
CREATE TABLE IF NOT EXISTS _tether_meta (key TEXT PRIMARY KEY, value ANY) STRICT;
CREATE TABLE IF NOT EXISTS _tether_tables (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS _tether_log (seq INTEGER PRIMARY KEY, tbl INTEGER NOT NULL, op INTEGER NOT NULL, mask INTEGER NOT NULL, k0, k1, k2, k3, k4, k5, k6, k7, at INTEGER);
CREATE TABLE IF NOT EXISTS _tether_applying (x INTEGER);
CREATE TABLE IF NOT EXISTS _tether_deferred (tbl TEXT NOT NULL, pk BLOB NOT NULL, version INTEGER NOT NULL, op INTEGER NOT NULL, vals BLOB NOT NULL, PRIMARY KEY (tbl, pk));
CREATE TABLE IF NOT EXISTS _tether_rejected (id INTEGER PRIMARY KEY, seq INTEGER NOT NULL, tbl TEXT NOT NULL, pk BLOB NOT NULL, op INTEGER NOT NULL, vals BLOB NOT NULL, reason TEXT NOT NULL, message TEXT NOT NULL, at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS _tether_held (tbl TEXT NOT NULL, pk BLOB NOT NULL, version INTEGER NOT NULL, op INTEGER NOT NULL, vals BLOB NOT NULL, reason TEXT NOT NULL, since INTEGER NOT NULL, attempts INTEGER NOT NULL, PRIMARY KEY (tbl, pk));
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_strict_table_is_announced_strict_with_the_fingerprint_of_its_loose_twin() {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        c.execute_batch(
            "CREATE TABLE loose (id INTEGER PRIMARY KEY, n INTEGER);
             CREATE TABLE tight (id INTEGER PRIMARY KEY, n INTEGER) STRICT;",
        )
        .unwrap();
        let loose = Table::introspect(&c, "mem", "loose").unwrap().wire_schema();
        let tight = Table::introspect(&c, "mem", "tight").unwrap().wire_schema();
        assert!(!loose.strict && tight.strict);
        assert_eq!(
            tight.fingerprint,
            fingerprint("tight", &loose.columns, &loose.types, &loose.pk)
        );
    }
}
