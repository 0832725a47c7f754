//! The app changes a synced table's schema while tether runs.
//!
//! * **Noticed before every batch read.** `PRAGMA schema_version` moves with
//!   every schema change of any connection. [`Replica::check_schema`]
//!   compares it with the one capture was built for, and when a synced
//!   table changed, introspects the tables again and rebuilds their capture
//!   in one `IMMEDIATE` transaction: no app write falls between the old
//!   triggers and the new ones. The batch read itself checks the version
//!   inside its own read transaction (see `Replica::read_log`), so a batch
//!   is never read with one shape from a database of another.
//! * **Full rows after an upgrade.** A table that gained columns (or that
//!   is synced for the first time by a database that already downloaded
//!   part of the dataset) is *refetched*: the next `hello` asks from cursor
//!   0 with the device's own changes echoed, and every change up to the old
//!   cursor is applied again even at the version the row already has, so
//!   that the values other devices gave the new columns arrive. Until then
//!   the table's changes carry only the columns it had before (unless the
//!   app wrote a new one), so that the empty new columns of this device
//!   never blank the values the hub holds.
//!
//! Bookkeeping in `_tether_meta`: `columns:<t>` (columns at the last
//! install), `refetch:<t>` (-1: due at the next `hello`; else the cursor up
//! to which changes apply again) and `refetch_cols:<t>` (the columns sent
//! until then).

use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use super::replica::{install, meta_u64, sq, LocalError, Replica};
use super::schema::{ident, Table};

/// `PRAGMA schema_version`: moves whenever a connection changes the schema.
pub(super) fn schema_cookie(c: &Connection) -> rusqlite::Result<i64> {
    c.query_row("PRAGMA schema_version", [], |r| r.get(0))
}

fn same_shape(a: &Table, b: &Table) -> bool {
    a.columns == b.columns && a.types == b.types && a.pk == b.pk && a.strict == b.strict
}

fn shape(t: &Table) -> String {
    t.columns
        .iter()
        .zip(&t.types)
        .map(|(c, ty)| format!("{c} {ty}").trim().to_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Called by `install` for each synced table, in its transaction: records
/// the table's columns and marks it for a refetch when it gained columns or
/// is synced for the first time by a database that already downloaded.
pub(super) fn note_columns(
    c: &Connection,
    t: &Table,
    id: i64,
    first_time: bool,
) -> rusqlite::Result<()> {
    let key = format!("columns:{}", t.name);
    let before: Option<i64> = c
        .prepare_cached("SELECT value FROM _tether_meta WHERE key = ?1")?
        .query_row([&key], |r| r.get(0))
        .optional()?;
    let grew = before.is_some_and(|n| (n as usize) < t.columns.len());
    if (grew || first_time) && meta_u64(c, "cursor")? > 0 {
        let sent = if first_time {
            t.columns.len() as i64
        } else {
            before.unwrap_or(0)
        };
        let refetch = format!("refetch:{}", t.name);
        let cols = format!("refetch_cols:{}", t.name);
        // A refetch already under way keeps the columns it sends.
        c.prepare_cached(
            "INSERT INTO _tether_meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
        )?
        .execute(params![cols, sent])?;
        c.prepare_cached(
            "INSERT INTO _tether_meta (key, value) VALUES (?1, -1) ON CONFLICT (key) DO UPDATE SET value = -1",
        )?
        .execute([refetch])?;
        tracing::info!(table = %t.name, "the table gained columns or is newly synced: its rows are downloaded again at the next connection, to receive the values other devices hold");
    }
    if let Some(before) = before.filter(|_| grew) {
        mark_new_columns(c, t, id, before as usize)?;
    }
    c.prepare_cached(
        "INSERT INTO _tether_meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, t.columns.len() as i64])?;
    Ok(())
}

/// The app may have written a new column between its `ALTER TABLE` and
/// this rebuild, under the old triggers, which did not know the column
/// (their mask lacks its bit). A pending row whose new column holds another
/// value than the column's default was written by the app (nothing else
/// fills it before the refetch): its change is marked as writing it, so it
/// goes out.
fn mark_new_columns(c: &Connection, t: &Table, id: i64, before: usize) -> rusqlite::Result<()> {
    let consumed = meta_u64(c, "consumed")?;
    let defaults: Vec<Option<String>> = c
        .prepare("SELECT dflt_value FROM pragma_table_info(?1) ORDER BY cid")?
        .query_map([&t.name], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let join =
        t.pk.iter()
            .enumerate()
            .map(|(k, &i)| format!("r.{} = _tether_log.k{k}", ident(&t.columns[i])))
            .collect::<Vec<_>>()
            .join(" AND ");
    for i in before..t.columns.len() {
        let default = defaults
            .get(i)
            .cloned()
            .flatten()
            .unwrap_or_else(|| "NULL".into());
        c.execute(
            &format!(
                "UPDATE _tether_log SET mask = mask | ?1 WHERE tbl = ?2 AND op = 1 AND seq > ?3 AND EXISTS (SELECT 1 FROM {} r WHERE {join} AND r.{} IS NOT ({default}))",
                ident(&t.name),
                ident(&t.columns[i])
            ),
            params![Table::mask_bit(i), id, consumed as i64],
        )?;
    }
    Ok(())
}

impl Replica {
    /// Rebuilds capture if the app changed the schema of a synced table
    /// since it was built; returns what changed (None: nothing did). The
    /// session then ends its connection once its uploads are answered and
    /// says `hello` with the new schema.
    pub fn check_schema(&mut self) -> Result<Option<String>, LocalError> {
        let db = self.name.clone();
        let e = sq(&db);
        if schema_cookie(&self.conn).map_err(&e)? == self.schema_version {
            return Ok(None);
        }
        let tx =
            Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate).map_err(&e)?;
        let mut found = Vec::new();
        let mut changed = Vec::new();
        for name in &self.order {
            let old = &self.tables[name];
            let t = Table::introspect(&tx, &self.name, name)?;
            if !same_shape(&old.t, &t) {
                changed.push(format!(
                    "table {name:?}: ({}) became ({})",
                    shape(&old.t),
                    shape(&t)
                ));
            }
            found.push((t, old.policy));
        }
        if changed.is_empty() {
            // Another table, an index, a view: capture stays as it is.
            self.schema_version = schema_cookie(&tx).map_err(&e)?;
            tx.commit().map_err(&e)?;
            return Ok(None);
        }
        let installed = install(&tx, &self.name, found).map_err(&e)?;
        // Rebuilding the triggers moved the version too.
        self.schema_version = schema_cookie(&tx).map_err(&e)?;
        tx.commit().map_err(&e)?;
        self.set_tables(installed);
        let what = changed.join("; ");
        tracing::info!(db = %self.name, "the app changed a synced table's schema; capture rebuilt: {what}");
        Ok(Some(what))
    }

    /// The cursor to say in `hello`, and whether own changes must be echoed
    /// (a refetch is under way). A refetch that is due starts here: its
    /// tables apply changes again up to the current cursor, downloaded
    /// from 0.
    pub fn hello_cursor(&mut self) -> Result<(u64, bool), LocalError> {
        let e = sq(&self.name);
        let tx =
            Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate).map_err(&e)?;
        let cursor = meta_u64(&tx, "cursor").map_err(&e)?;
        let due: i64 = tx
            .query_row(
                "SELECT count(*) FROM _tether_meta WHERE key LIKE 'refetch:%' AND value < 0",
                [],
                |r| r.get(0),
            )
            .map_err(&e)?;
        if due > 0 {
            let tables: Vec<String> = tx
                .prepare("SELECT substr(key, 9) FROM _tether_meta WHERE key LIKE 'refetch:%' AND value < 0")
                .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
                .map_err(&e)?;
            for t in tables {
                // Up to the newest version the table holds: this device's
                // answered changes are past its cursor.
                let newest: i64 = tx
                    .query_row(
                        &format!(
                            "SELECT coalesce(max(version), 0) FROM {}",
                            ident(&format!("_tether_ver_{t}"))
                        ),
                        [],
                        |r| r.get(0),
                    )
                    .map_err(&e)?;
                tx.execute(
                    "UPDATE _tether_meta SET value = ?1 WHERE key = ?2",
                    params![(cursor as i64).max(newest), format!("refetch:{t}")],
                )
                .map_err(&e)?;
            }
            tx.execute("UPDATE _tether_meta SET value = 0 WHERE key = 'cursor'", [])
                .map_err(&e)?;
            tracing::info!(db = %self.name, from = cursor, "downloading the dataset again for the tables that gained columns or are newly synced");
        }
        end_refetch(&tx, if due > 0 { 0 } else { cursor }).map_err(&e)?;
        let active: i64 = tx
            .query_row(
                "SELECT count(*) FROM _tether_meta WHERE key LIKE 'refetch:%'",
                [],
                |r| r.get(0),
            )
            .map_err(&e)?;
        tx.commit().map_err(&e)?;
        Ok((if due > 0 { 0 } else { cursor }, active > 0))
    }
}

/// Tables being refetched, each with the cursor up to which changes apply
/// again.
pub(super) fn refetching(c: &Connection) -> rusqlite::Result<HashMap<String, u64>> {
    let mut st = c.prepare_cached(
        "SELECT substr(key, 9), value FROM _tether_meta WHERE key LIKE 'refetch:%' AND value > 0",
    )?;
    let rows = st.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
    })?;
    rows.collect()
}

/// Per refetched table, the columns its changes carry until the refetch
/// ends (unless the app wrote a newer one).
pub(super) fn sent_columns(c: &Connection) -> rusqlite::Result<HashMap<String, usize>> {
    let mut st = c.prepare_cached(
        "SELECT substr(key, 14), value FROM _tether_meta WHERE key LIKE 'refetch\\_cols:%' ESCAPE '\\'",
    )?;
    let rows = st.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as usize))
    })?;
    rows.collect()
}

/// Ends the refetches the cursor has passed: every change up to their mark
/// was applied again (a mark of 0 had nothing to apply again).
pub(super) fn end_refetch(c: &Connection, cursor: u64) -> rusqlite::Result<()> {
    let done: Vec<String> = c
        .prepare_cached(
            "SELECT substr(key, 9) FROM _tether_meta WHERE key LIKE 'refetch:%' AND value >= 0 AND value <= ?1",
        )?
        .query_map([cursor as i64], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for t in done {
        c.prepare_cached("DELETE FROM _tether_meta WHERE key IN (?1, ?2)")?
            .execute(params![format!("refetch:{t}"), format!("refetch_cols:{t}")])?;
        tracing::info!(table = %t, "the table's rows were downloaded again: its changes carry every column from now on");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::*;
    use crate::config::ConflictPolicy;
    use crate::proto::{ChangeResult, Op, Outcome, RemoteChange, Value};

    fn upsert(version: u64, values: Vec<Value>) -> RemoteChange {
        RemoteChange {
            version,
            table: "t".into(),
            op: Op::Upsert,
            pk: vec![values[0].clone()],
            values,
        }
    }

    fn rows(app: &Connection) -> Vec<(i64, String, Option<String>)> {
        app.prepare("SELECT * FROM t ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// A device that adds a column notices it by itself, downloads its rows
    /// again (at the versions it already holds) and sends only the columns
    /// it had until then, unless the app wrote the new one.
    #[test]
    fn a_column_added_live_is_refetched_and_not_sent_empty_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let app = Connection::open(&path).unwrap();
        app.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT)")
            .unwrap();
        let tables = [("t".to_string(), ConflictPolicy::ServerWins)];
        let mut r = Replica::open("t", &path, &tables).unwrap();
        let int = Value::Integer;
        let text = |s: &str| Value::Text(s.into());
        r.apply_remote(
            &[
                upsert(1, vec![int(1), text("one")]),
                upsert(2, vec![int(2), text("two")]),
            ],
            2,
        )
        .unwrap();
        assert_eq!(r.check_schema().unwrap(), None);
        app.execute_batch("ALTER TABLE t ADD COLUMN b TEXT")
            .unwrap();
        app.execute("UPDATE t SET a = 'uno' WHERE id = 1", [])
            .unwrap();
        app.execute("UPDATE t SET b = 'mine' WHERE id = 2", [])
            .unwrap();
        let b = r.read_batch(0, 100, 1 << 20).unwrap();
        assert!(b
            .schema_changed
            .as_deref()
            .unwrap()
            .contains("became (id INTEGER, a TEXT, b TEXT)"));
        assert!(b.changes.is_empty());
        assert_eq!(r.wire_schemas()[0].columns.len(), 3);
        let b = r.read_batch(0, 100, 1 << 20).unwrap();
        let vals: Vec<usize> = b.changes.iter().map(|c| c.values.len()).collect();
        assert_eq!(
            vals,
            vec![2, 3],
            "row 1: the old columns only; row 2: b was written"
        );
        let answers: Vec<ChangeResult> = b
            .changes
            .iter()
            .zip([3, 4])
            .map(|(c, version)| ChangeResult {
                seq: c.seq,
                outcome: Outcome::Applied { version },
            })
            .collect();
        r.apply_results(&b, &answers).unwrap();
        assert_eq!(r.hello_cursor().unwrap(), (0, true));
        // The hub's log again, row 1 merged with the column another device
        // filled in; and this device's own changes echoed.
        r.apply_remote(
            &[
                upsert(1, vec![int(1), text("one"), text("stale")]),
                upsert(2, vec![int(2), text("two")]),
                upsert(3, vec![int(1), text("uno"), text("theirs")]),
                upsert(4, vec![int(2), text("two"), text("mine")]),
            ],
            4,
        )
        .unwrap();
        assert_eq!(
            rows(&app),
            vec![
                (1, "uno".into(), Some("theirs".into())),
                (2, "two".into(), Some("mine".into()))
            ]
        );
        assert_eq!(r.hello_cursor().unwrap(), (4, false), "refetch over");
    }
}
