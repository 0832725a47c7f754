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
use super::schema::Table;

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
pub(super) fn note_columns(c: &Connection, t: &Table, first_time: bool) -> rusqlite::Result<()> {
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
    c.prepare_cached(
        "INSERT INTO _tether_meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, t.columns.len() as i64])?;
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
            tx.execute(
                "UPDATE _tether_meta SET value = ?1 WHERE key LIKE 'refetch:%' AND value < 0",
                [cursor as i64],
            )
            .map_err(&e)?;
            tx.execute(
                "UPDATE _tether_meta SET value = 0 WHERE key = 'cursor'",
                [],
            )
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
    let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
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
