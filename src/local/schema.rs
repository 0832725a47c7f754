//! Introspection of the synced tables and the SQL tether installs beside them.
//!
//! For each synced table `t`, tether keeps (all names start with `_tether_`):
//!
//! * `_tether_out_t`: the outbox, one row per primary key with a pending local
//!   change (`op` 1 = upsert, 2 = delete), the columns it touched (`mask`) and
//!   the client sequence number of its latest write (`seq`). Several writes to
//!   one row coalesce into one entry; the row's current values are read at
//!   upload time, so the last value always wins.
//! * `_tether_ver_t`: the hub version of each row as last seen locally, sent as
//!   `base` with a change so that the hub can detect conflicts.
//! * triggers `_tether_t_ins`, `_tether_t_upd`, `_tether_t_updkey`,
//!   `_tether_t_del` that fill the outbox inside the writer's own transaction.
//!
//! Key columns in tether's tables are declared without a type, so SQLite keeps
//! every key value exactly as the app stored it.

use sha2::{Digest, Sha256};

use crate::proto::TableSchema;

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
        Ok(Table {
            name: name.to_owned(),
            columns: rows.iter().map(|r| r.0.clone()).collect(),
            types: rows.iter().map(|r| r.1.to_uppercase()).collect(),
            pk: pk.into_iter().map(|(_, i)| i).collect(),
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
        }
    }

    pub fn is_key(&self, col: usize) -> bool {
        self.pk.contains(&col)
    }

    pub fn out_table(&self) -> String {
        ident(&format!("_tether_out_{}", self.name))
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

    /// The statements that create tether's side tables and triggers for this
    /// table. Triggers are dropped and recreated so they always match the
    /// current columns.
    pub fn install_sql(&self) -> String {
        let t = ident(&self.name);
        let out = self.out_table();
        let ver = self.ver_table();
        let keys = self.key_cols();
        let seq_idx = ident(&format!("_tether_out_{}_seq", self.name));
        let trig = |kind: &str| ident(&format!("_tether_{}_{}", self.name, kind));
        let new_keys = self
            .pk
            .iter()
            .map(|&i| format!("NEW.{}", ident(&self.columns[i])))
            .collect::<Vec<_>>()
            .join(", ");
        let old_keys = self
            .pk
            .iter()
            .map(|&i| format!("OLD.{}", ident(&self.columns[i])))
            .collect::<Vec<_>>()
            .join(", ");
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
        let bump = "UPDATE _tether_seq SET n = n + 1;";
        let seq = "(SELECT n FROM _tether_seq)";
        format!(
            "CREATE TABLE IF NOT EXISTS {out} ({keys}, op INTEGER NOT NULL, mask INTEGER NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY ({keys}));
CREATE INDEX IF NOT EXISTS {seq_idx} ON {out}(seq);
CREATE TABLE IF NOT EXISTS {ver} ({keys}, version INTEGER NOT NULL, PRIMARY KEY ({keys})) WITHOUT ROWID;
DROP TRIGGER IF EXISTS {ins};
DROP TRIGGER IF EXISTS {upd};
DROP TRIGGER IF EXISTS {updkey};
DROP TRIGGER IF EXISTS {del};
CREATE TRIGGER {ins} AFTER INSERT ON {t} WHEN {guard} BEGIN
  {bump}
  INSERT INTO {out} ({keys}, op, mask, seq) VALUES ({new_keys}, 1, -1, {seq})
    ON CONFLICT ({keys}) DO UPDATE SET op = 1, mask = -1, seq = excluded.seq;
END;
CREATE TRIGGER {upd} AFTER UPDATE ON {t} WHEN {guard} BEGIN
  {bump}
  INSERT INTO {out} ({keys}, op, mask, seq)
    VALUES ({new_keys}, 1, CASE WHEN {key_changed} THEN -1 ELSE {col_mask} END, {seq})
    ON CONFLICT ({keys}) DO UPDATE SET op = 1,
      mask = CASE WHEN op = 2 THEN -1 ELSE mask | excluded.mask END, seq = excluded.seq;
END;
CREATE TRIGGER {updkey} AFTER UPDATE ON {t} WHEN {guard} AND ({key_changed}) BEGIN
  {bump}
  INSERT INTO {out} ({keys}, op, mask, seq) VALUES ({old_keys}, 2, 0, {seq})
    ON CONFLICT ({keys}) DO UPDATE SET op = 2, mask = 0, seq = excluded.seq;
END;
CREATE TRIGGER {del} AFTER DELETE ON {t} WHEN {guard} BEGIN
  {bump}
  INSERT INTO {out} ({keys}, op, mask, seq) VALUES ({old_keys}, 2, 0, {seq})
    ON CONFLICT ({keys}) DO UPDATE SET op = 2, mask = 0, seq = excluded.seq;
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

/// tether's shared bookkeeping tables, created once per database.
pub const BASE_SQL: &str = "
CREATE TABLE IF NOT EXISTS _tether_meta (key TEXT PRIMARY KEY, value ANY) STRICT;
CREATE TABLE IF NOT EXISTS _tether_seq (n INTEGER NOT NULL);
INSERT INTO _tether_seq (n) SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM _tether_seq);
CREATE TABLE IF NOT EXISTS _tether_applying (x INTEGER);
CREATE TABLE IF NOT EXISTS _tether_deferred (tbl TEXT NOT NULL, pk BLOB NOT NULL, version INTEGER NOT NULL, op INTEGER NOT NULL, vals BLOB NOT NULL, PRIMARY KEY (tbl, pk));
CREATE TABLE IF NOT EXISTS _tether_rejected (id INTEGER PRIMARY KEY, seq INTEGER NOT NULL, tbl TEXT NOT NULL, pk BLOB NOT NULL, op INTEGER NOT NULL, vals BLOB NOT NULL, reason TEXT NOT NULL, message TEXT NOT NULL, at INTEGER NOT NULL);
";
