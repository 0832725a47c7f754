//! The local side of sync for one database: reading the outbox, applying the
//! hub's answers and its changes. Synchronous; owned by one thread (see
//! [`super::LocalDb`]).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::{params, params_from_iter, Connection, OptionalExtension, TransactionBehavior};

use super::schema::{self, ident, SchemaError, Table};
use crate::config::ConflictPolicy;
use crate::proto::{
    decode_values, encode_key, encode_values, Change, ChangeResult, Op, Outcome, RemoteChange,
    ServerRow, TableSchema, Value,
};

/// How long tether waits for the app's write locks before giving up on one
/// attempt (the attempt is retried later; the app's writes are never failed).
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("opening {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database {db}: {source}")]
    Sqlite {
        db: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database {db}: hub sent a change for table {table:?}, which is not synced here")]
    UnknownTable { db: String, table: String },
    #[error("database {db}: hub sent a change for {table:?} with {got} values, the table has {want} columns")]
    Shape {
        db: String,
        table: String,
        got: usize,
        want: usize,
    },
}

/// What [`Replica::apply_results`] did, for logs and status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResultsApplied {
    /// Changes cleared from the outbox.
    pub cleared: u64,
    /// Conflicts resolved by writing the hub's row locally.
    pub server_rows_written: u64,
    /// Conflicts whose local change goes out again (client_wins, merge_columns).
    pub resent: u64,
    /// Invalid changes moved to `_tether_rejected`.
    pub rejected: u64,
}

/// Pending outbox size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    pub changes: u64,
    /// Client seq of the newest captured write (0 = none ever).
    pub last_seq: u64,
}

struct Tbl {
    t: Table,
    policy: ConflictPolicy,
    sql_batch: String,
    sql_upsert: String,
    sql_delete: String,
    sql_select_row: String,
    sql_get_ver: String,
    sql_set_ver: String,
    sql_set_ver_if_newer: String,
    sql_out_empty: String,
    sql_get_out: String,
    sql_del_out_seq: String,
    sql_bump_out: String,
}

impl Tbl {
    fn new(t: Table, policy: ConflictPolicy) -> Tbl {
        let name = ident(&t.name);
        let out = t.out_table();
        let ver = t.ver_table();
        let keys = t.key_cols();
        let nk = t.pk.len();
        let cols: Vec<String> = t.columns.iter().map(|c| ident(c)).collect();
        let key_eq = |alias: &str, other: &str| {
            t.pk.iter()
                .enumerate()
                .map(|(i, &c)| format!("{alias}.{} = {other}.k{i}", cols[c]))
                .collect::<Vec<_>>()
                .join(" AND ")
        };
        let k_params = (0..nk)
            .map(|i| format!("k{i} = ?{}", i + 1))
            .collect::<Vec<_>>()
            .join(" AND ");
        let pk_params =
            t.pk.iter()
                .enumerate()
                .map(|(i, &c)| format!("{} = ?{}", cols[c], i + 1))
                .collect::<Vec<_>>()
                .join(" AND ");
        let ver_eq = (0..nk)
            .map(|i| format!("v.k{i} = o.k{i}"))
            .collect::<Vec<_>>()
            .join(" AND ");
        let sql_batch = format!(
            "SELECT o.op, o.mask, o.seq, COALESCE(v.version, 0), r.{first_pk} IS NOT NULL, {okeys}, {rcols}
             FROM {out} o LEFT JOIN {name} r ON {join} LEFT JOIN {ver} v ON {ver_eq}
             WHERE o.seq > ?2 ORDER BY o.seq LIMIT ?1",
            first_pk = cols[t.pk[0]],
            okeys = (0..nk).map(|i| format!("o.k{i}")).collect::<Vec<_>>().join(", "),
            rcols = cols.iter().map(|c| format!("r.{c}")).collect::<Vec<_>>().join(", "),
            join = key_eq("r", "o"),
        );
        let non_key: Vec<&String> = cols
            .iter()
            .enumerate()
            .filter(|(i, _)| !t.is_key(*i))
            .map(|(_, c)| c)
            .collect();
        let on_conflict = if non_key.is_empty() {
            "DO NOTHING".to_owned()
        } else {
            format!(
                "DO UPDATE SET {}",
                non_key
                    .iter()
                    .map(|c| format!("{c} = excluded.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let sql_upsert = format!(
            "INSERT INTO {name} ({}) VALUES ({}) ON CONFLICT ({}) {on_conflict}",
            cols.join(", "),
            (1..=cols.len())
                .map(|i| format!("?{i}"))
                .collect::<Vec<_>>()
                .join(", "),
            t.pk_cols(),
        );
        Tbl {
            sql_batch,
            sql_upsert,
            sql_delete: format!("DELETE FROM {name} WHERE {pk_params}"),
            sql_select_row: format!("SELECT {} FROM {name} WHERE {pk_params}", cols.join(", ")),
            sql_get_ver: format!("SELECT version FROM {ver} WHERE {k_params}"),
            sql_set_ver: format!(
                "INSERT INTO {ver} ({keys}, version) VALUES ({}, ?{}) ON CONFLICT ({keys}) DO UPDATE SET version = max(version, excluded.version)",
                (1..=nk).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", "),
                nk + 1
            ),
            sql_out_empty: format!("SELECT NOT EXISTS (SELECT 1 FROM {out})"),
            sql_set_ver_if_newer: format!(
                "INSERT INTO {ver} ({keys}, version) VALUES ({}, ?{}) ON CONFLICT ({keys}) DO UPDATE SET version = excluded.version WHERE excluded.version > version",
                (1..=nk).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", "),
                nk + 1
            ),
            sql_get_out: format!("SELECT seq, op, mask FROM {out} WHERE {k_params}"),
            sql_del_out_seq: format!("DELETE FROM {out} WHERE {k_params} AND seq = ?{}", nk + 1),
            sql_bump_out: format!(
                "UPDATE {out} SET seq = (SELECT n FROM _tether_seq) WHERE {k_params}"
            ),
            t,
            policy,
        }
    }
}

/// One local database as tether sees it.
pub struct Replica {
    name: String,
    conn: Connection,
    tables: HashMap<String, Tbl>,
    order: Vec<String>,
    client_id: String,
}

fn sq(db: &str) -> impl Fn(rusqlite::Error) -> LocalError + '_ {
    move |source| LocalError::Sqlite {
        db: db.to_owned(),
        source,
    }
}

impl Replica {
    /// Opens the database, checks the tables and installs capture.
    ///
    /// `tables` pairs each synced table with its conflict policy.
    pub fn open(
        name: &str,
        path: &Path,
        tables: &[(String, ConflictPolicy)],
    ) -> Result<Replica, LocalError> {
        let conn = Connection::open(path).map_err(|source| LocalError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let e = sq(name);
        conn.busy_timeout(BUSY_TIMEOUT).map_err(&e)?;
        // WAL lets the app read while tether writes and the other way round.
        // It is a property of the file and stays set; tether never checkpoints
        // with RESTART or TRUNCATE, so the app's readers are never blocked.
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(&e)?;
        if mode != "wal" {
            tracing::warn!(db = name, mode, "could not switch the database to WAL mode");
        }
        // Per-connection settings: they do not change how the app's own
        // connections behave.
        conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA cache_size = -32768; PRAGMA temp_store = MEMORY;")
            .map_err(&e)?;
        let mut found = Vec::new();
        for (t, policy) in tables {
            found.push(Tbl::new(Table::introspect(&conn, name, t)?, *policy));
        }
        let mut sql = String::from("BEGIN IMMEDIATE;");
        sql.push_str(schema::BASE_SQL);
        for t in &found {
            sql.push_str(&t.t.install_sql());
        }
        sql.push_str("COMMIT;");
        conn.execute_batch(&sql).map_err(|source| {
            let _ = conn.execute_batch("ROLLBACK");
            LocalError::Sqlite {
                db: name.into(),
                source,
            }
        })?;
        let client_id: Option<String> = conn
            .query_row(
                "SELECT value FROM _tether_meta WHERE key = 'client_id'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(&e)?;
        let client_id = match client_id {
            Some(id) => id,
            None => {
                let id = uuid::Uuid::new_v4().to_string();
                conn.execute(
                    "INSERT INTO _tether_meta (key, value) VALUES ('client_id', ?1)",
                    [&id],
                )
                .map_err(&e)?;
                id
            }
        };
        let order = found.iter().map(|t| t.t.name.clone()).collect();
        Ok(Replica {
            name: name.to_owned(),
            tables: found.into_iter().map(|t| (t.t.name.clone(), t)).collect(),
            order,
            conn,
            client_id,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Schemas for `hello`, in config order.
    pub fn wire_schemas(&self) -> Vec<TableSchema> {
        self.order
            .iter()
            .map(|n| self.tables[n].t.wire_schema())
            .collect()
    }

    /// Highest hub sequence number applied locally.
    pub fn cursor(&self) -> Result<u64, LocalError> {
        self.meta_u64("cursor")
    }

    fn meta_u64(&self, key: &str) -> Result<u64, LocalError> {
        let v: Option<i64> = self
            .conn
            .query_row(
                "SELECT value FROM _tether_meta WHERE key = ?1",
                [key],
                |r| r.get(0),
            )
            .optional()
            .map_err(sq(&self.name))?;
        Ok(v.unwrap_or(0) as u64)
    }

    /// Changes whenever another connection commits (see SQLite's `data_version`).
    pub fn data_version(&self) -> Result<i64, LocalError> {
        self.conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(sq(&self.name))
    }

    /// Number of rows with a pending local change.
    pub fn pending(&self) -> Result<Pending, LocalError> {
        let e = sq(&self.name);
        let mut changes = 0u64;
        for name in &self.order {
            let n: i64 = self
                .conn
                .prepare_cached(&format!(
                    "SELECT count(*) FROM {}",
                    self.tables[name].t.out_table()
                ))
                .map_err(&e)?
                .query_row([], |r| r.get(0))
                .map_err(&e)?;
            changes += n as u64;
        }
        let last_seq: i64 = self
            .conn
            .query_row("SELECT n FROM _tether_seq", [], |r| r.get(0))
            .map_err(&e)?;
        Ok(Pending {
            changes,
            last_seq: last_seq as u64,
        })
    }

    /// Makes sure new local changes get sequence numbers above what the hub has
    /// already seen from this client (the database may have been restored from
    /// a backup). Pending changes are renumbered in that case, so they are sent
    /// as new changes instead of being taken for duplicates.
    pub fn ensure_seq_above(&mut self, hub_seq: u64) -> Result<bool, LocalError> {
        let e = sq(&self.name);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&e)?;
        let n: i64 = tx
            .query_row("SELECT n FROM _tether_seq", [], |r| r.get(0))
            .map_err(&e)?;
        if (n as u64) >= hub_seq {
            return Ok(false);
        }
        tx.execute("UPDATE _tether_seq SET n = ?1", [hub_seq as i64])
            .map_err(&e)?;
        for name in &self.order {
            tx.execute(
                &format!(
                    "UPDATE {} SET seq = seq + ?1",
                    self.tables[name].t.out_table()
                ),
                [hub_seq as i64],
            )
            .map_err(&e)?;
        }
        tx.execute("UPDATE _tether_seq SET n = n + ?1", [n])
            .map_err(&e)?;
        tx.commit().map_err(&e)?;
        Ok(true)
    }

    /// The oldest pending changes with a seq above `after` (those at or below
    /// are in flight), at most `max_changes` and about `max_bytes`, in client
    /// sequence order.
    pub fn read_batch(
        &self,
        after: u64,
        max_changes: usize,
        max_bytes: usize,
    ) -> Result<Vec<Change>, LocalError> {
        let e = sq(&self.name);
        let tx = self.conn.unchecked_transaction().map_err(&e)?;
        let mut all = Vec::new();
        for name in &self.order {
            let tbl = &self.tables[name];
            let nk = tbl.t.pk.len();
            let ncols = tbl.t.columns.len();
            let mut stmt = tx.prepare_cached(&tbl.sql_batch).map_err(&e)?;
            let mut rows = stmt
                .query([max_changes as i64, after as i64])
                .map_err(&e)?;
            while let Some(r) = rows.next().map_err(&e)? {
                let op: i64 = r.get(0).map_err(&e)?;
                let mask: i64 = r.get(1).map_err(&e)?;
                let seq: i64 = r.get(2).map_err(&e)?;
                let base: i64 = r.get(3).map_err(&e)?;
                let exists: bool = r.get(4).map_err(&e)?;
                let mut pk = Vec::with_capacity(nk);
                for i in 0..nk {
                    pk.push(r.get::<_, Value>(5 + i).map_err(&e)?);
                }
                let (op, values) = if op == 1 && exists {
                    let mut values = Vec::with_capacity(ncols);
                    for i in 0..ncols {
                        values.push(r.get::<_, Value>(5 + nk + i).map_err(&e)?);
                    }
                    (Op::Upsert, values)
                } else {
                    (Op::Delete, Vec::new())
                };
                all.push(Change {
                    seq: seq as u64,
                    table: name.clone(),
                    op,
                    pk,
                    values,
                    base: base as u64,
                    mask: mask as u64,
                });
            }
        }
        drop(tx);
        all.sort_by_key(|c| c.seq);
        all.truncate(max_changes);
        let mut bytes = 0;
        let mut keep = 0;
        for c in &all {
            bytes += c.wire_size();
            if keep > 0 && bytes > max_bytes {
                break;
            }
            keep += 1;
        }
        all.truncate(keep);
        Ok(all)
    }

    fn tbl(&self, table: &str) -> Result<&Tbl, LocalError> {
        self.tables
            .get(table)
            .ok_or_else(|| LocalError::UnknownTable {
                db: self.name.clone(),
                table: table.to_owned(),
            })
    }

    /// Applies the hub's answer to an upload: clears applied changes, resolves
    /// conflicts by policy, moves invalid changes to `_tether_rejected`.
    pub fn apply_results(
        &mut self,
        sent: &[Change],
        results: &[ChangeResult],
    ) -> Result<ResultsApplied, LocalError> {
        let e = sq(&self.name);
        let by_seq: HashMap<u64, &Change> = sent.iter().map(|c| (c.seq, c)).collect();
        let mut done = ResultsApplied::default();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&e)?;
        tx.execute("INSERT INTO _tether_applying (x) VALUES (1)", [])
            .map_err(&e)?;
        let any_deferred: bool = tx
            .query_row("SELECT EXISTS (SELECT 1 FROM _tether_deferred)", [], |r| {
                r.get(0)
            })
            .map_err(&e)?;
        for r in results {
            let Some(change) = by_seq.get(&r.seq) else {
                tracing::warn!(db = %self.name, seq = r.seq, "hub answered a change that was not sent; ignored");
                continue;
            };
            let tbl = self
                .tables
                .get(&change.table)
                .ok_or_else(|| LocalError::UnknownTable {
                    db: self.name.clone(),
                    table: change.table.clone(),
                })?;
            let pk = &change.pk;
            if let Outcome::Applied { version } = &r.outcome {
                // The row's version is not recorded here: the hub knows this
                // client wrote it last, so the next local change to it is not
                // a conflict whatever its base, and any later change by
                // another client arrives with a higher version. This keeps
                // an acknowledgement to one statement per change.
                // Cleared only if the app did not write the row again since.
                if del_out(&tx, tbl, pk, change.seq).map_err(&e)? {
                    done.cleared += 1;
                    if any_deferred {
                        apply_deferred(&tx, tbl, pk, *version).map_err(&e)?;
                    }
                }
                continue;
            }
            let pending = get_out(&tx, tbl, pk).map_err(&e)?;
            let still_same = pending.map(|p| p.0 == change.seq).unwrap_or(false);
            match &r.outcome {
                Outcome::Applied { .. } => unreachable!("handled above"),
                Outcome::Conflict { server } => {
                    let policy = tbl.policy;
                    let local_delete = pending.map(|p| p.1 == 2).unwrap_or(true);
                    let effective = match policy {
                        ConflictPolicy::MergeColumns if local_delete || server.deleted => {
                            ConflictPolicy::ServerWins
                        }
                        p => p,
                    };
                    match effective {
                        ConflictPolicy::ServerWins => {
                            if still_same || pending.is_none() {
                                del_out(&tx, tbl, pk, change.seq).map_err(&e)?;
                                write_server_row(&tx, tbl, pk, server).map_err(&e)?;
                                apply_deferred(&tx, tbl, pk, server.version).map_err(&e)?;
                                done.server_rows_written += 1;
                            } else {
                                // The app wrote this row again meanwhile; that
                                // write was also made without the hub's
                                // version, so it will meet the same conflict.
                                // Keep the hub's row as deferred until then.
                                defer(&tx, tbl, pk, server_as_remote(server)).map_err(&e)?;
                            }
                        }
                        ConflictPolicy::ClientWins => {
                            set_ver_exact(&tx, tbl, pk, server.version).map_err(&e)?;
                            clear_deferred_upto(&tx, tbl, pk, server.version).map_err(&e)?;
                            if pending.is_some() {
                                bump_out(&tx, tbl, pk).map_err(&e)?;
                                done.resent += 1;
                            }
                        }
                        ConflictPolicy::MergeColumns => {
                            let mask = pending.map(|p| p.2).unwrap_or(-1);
                            let local: Option<Vec<Value>> = select_row(&tx, tbl, pk).map_err(&e)?;
                            let mut merged = server.values.clone();
                            if let Some(local) = local {
                                for (i, v) in local.into_iter().enumerate() {
                                    if tbl.t.is_key(i) || mask & Table::mask_bit(i) != 0 {
                                        if let Some(slot) = merged.get_mut(i) {
                                            *slot = v;
                                        }
                                    }
                                }
                            }
                            upsert_row(&tx, tbl, &merged).map_err(&e)?;
                            set_ver_exact(&tx, tbl, pk, server.version).map_err(&e)?;
                            clear_deferred_upto(&tx, tbl, pk, server.version).map_err(&e)?;
                            bump_out(&tx, tbl, pk).map_err(&e)?;
                            done.resent += 1;
                        }
                    }
                }
                Outcome::Invalid { reason, message } => {
                    tx.execute(
                        "INSERT INTO _tether_rejected (seq, tbl, pk, op, vals, reason, message, at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, unixepoch())",
                        params![
                            change.seq as i64,
                            change.table,
                            encode_key(pk),
                            if change.op == Op::Upsert { 1 } else { 2 },
                            encode_values(&change.values),
                            reason.as_str(),
                            message
                        ],
                    )
                    .map_err(&e)?;
                    if still_same {
                        del_out(&tx, tbl, pk, change.seq).map_err(&e)?;
                    }
                    done.rejected += 1;
                }
                Outcome::MaterializeError { .. } => {}
            }
        }
        tx.execute("DELETE FROM _tether_applying", []).map_err(&e)?;
        tx.commit().map_err(&e)?;
        Ok(done)
    }

    /// Applies changes pushed by the hub and moves the cursor to `up_to`, in
    /// one transaction. Rows with a pending local change keep the local value;
    /// the hub's row is kept aside until the local change is answered.
    pub fn apply_remote(
        &mut self,
        changes: &[RemoteChange],
        up_to: u64,
    ) -> Result<u64, LocalError> {
        let e = sq(&self.name);
        for c in changes {
            let tbl = self.tbl(&c.table)?;
            if c.op == Op::Upsert && c.values.len() != tbl.t.columns.len() {
                return Err(LocalError::Shape {
                    db: self.name.clone(),
                    table: c.table.clone(),
                    got: c.values.len(),
                    want: tbl.t.columns.len(),
                });
            }
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&e)?;
        tx.execute("INSERT INTO _tether_applying (x) VALUES (1)", [])
            .map_err(&e)?;
        // Tables without any pending local change take a short path: one
        // statement moves the row's version (only forward) and tells whether
        // the change is new, one writes the row.
        let mut quiet: HashMap<&str, bool> = HashMap::new();
        for name in &self.order {
            let t = &self.tables[name];
            let empty: bool = tx
                .prepare_cached(&t.sql_out_empty)
                .and_then(|mut st| st.query_row([], |r| r.get(0)))
                .map_err(&e)?;
            quiet.insert(name.as_str(), empty);
        }
        let mut applied = 0;
        for c in changes {
            let tbl = &self.tables[&c.table];
            if quiet[c.table.as_str()] {
                if !set_ver_if_newer(&tx, tbl, &c.pk, c.version).map_err(&e)? {
                    continue;
                }
            } else {
                let local_ver = get_ver(&tx, tbl, &c.pk).map_err(&e)?;
                if c.version <= local_ver {
                    continue;
                }
                if get_out(&tx, tbl, &c.pk).map_err(&e)?.is_some() {
                    defer(&tx, tbl, &c.pk, c.clone()).map_err(&e)?;
                    continue;
                }
                set_ver(&tx, tbl, &c.pk, c.version).map_err(&e)?;
            }
            match c.op {
                Op::Upsert => upsert_row(&tx, tbl, &c.values).map_err(&e)?,
                Op::Delete => delete_row(&tx, tbl, &c.pk).map_err(&e)?,
            }
            applied += 1;
        }
        tx.execute(
            "INSERT INTO _tether_meta (key, value) VALUES ('cursor', ?1)
             ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
            [up_to as i64],
        )
        .map_err(&e)?;
        tx.execute("DELETE FROM _tether_applying", []).map_err(&e)?;
        tx.commit().map_err(&e)?;
        Ok(applied)
    }

    /// Runs a passive checkpoint when the WAL has grown; never blocks the app.
    pub fn checkpoint_passive(&self) {
        let _ = self.conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE)");
    }
}

fn key_params(pk: &[Value]) -> impl rusqlite::Params + '_ {
    params_from_iter(pk.iter())
}

/// The pending outbox entry of a row: (seq, op, mask).
fn get_out(c: &Connection, t: &Tbl, pk: &[Value]) -> rusqlite::Result<Option<(u64, i64, i64)>> {
    c.prepare_cached(&t.sql_get_out)?
        .query_row(key_params(pk), |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?))
        })
        .optional()
}

/// Removes a row's outbox entry if it still has sequence number `seq`.
fn del_out(c: &Connection, t: &Tbl, pk: &[Value], seq: u64) -> rusqlite::Result<bool> {
    let seqv = Value::Integer(seq as i64);
    let n = c
        .prepare_cached(&t.sql_del_out_seq)?
        .execute(params_from_iter(pk.iter().chain(std::iter::once(&seqv))))?;
    Ok(n == 1)
}

/// Gives a pending change a fresh sequence number so it is sent again.
fn bump_out(c: &Connection, t: &Tbl, pk: &[Value]) -> rusqlite::Result<()> {
    c.execute("UPDATE _tether_seq SET n = n + 1", [])?;
    c.prepare_cached(&t.sql_bump_out)?.execute(key_params(pk))?;
    Ok(())
}

fn get_ver(c: &Connection, t: &Tbl, pk: &[Value]) -> rusqlite::Result<u64> {
    Ok(c.prepare_cached(&t.sql_get_ver)?
        .query_row(key_params(pk), |r| r.get::<_, i64>(0))
        .optional()?
        .unwrap_or(0) as u64)
}

/// Moves a row's version forward; false when it already was at or past it.
fn set_ver_if_newer(c: &Connection, t: &Tbl, pk: &[Value], version: u64) -> rusqlite::Result<bool> {
    let v = Value::Integer(version as i64);
    let n = c
        .prepare_cached(&t.sql_set_ver_if_newer)?
        .execute(params_from_iter(pk.iter().chain(std::iter::once(&v))))?;
    Ok(n == 1)
}

fn set_ver(c: &Connection, t: &Tbl, pk: &[Value], version: u64) -> rusqlite::Result<()> {
    let v = Value::Integer(version as i64);
    c.prepare_cached(&t.sql_set_ver)?
        .execute(params_from_iter(pk.iter().chain(std::iter::once(&v))))?;
    Ok(())
}

/// Sets the version even if lower than the stored one: after a conflict the
/// hub's answer is authoritative for what the next upload is based on.
fn set_ver_exact(c: &Connection, t: &Tbl, pk: &[Value], version: u64) -> rusqlite::Result<()> {
    let nk = pk.len();
    let sql = format!(
        "INSERT INTO {ver} ({keys}, version) VALUES ({}, ?{}) ON CONFLICT ({keys}) DO UPDATE SET version = excluded.version",
        (1..=nk).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", "),
        nk + 1,
        ver = t.t.ver_table(),
        keys = t.t.key_cols(),
    );
    let v = Value::Integer(version as i64);
    c.prepare_cached(&sql)?
        .execute(params_from_iter(pk.iter().chain(std::iter::once(&v))))?;
    Ok(())
}

fn select_row(c: &Connection, t: &Tbl, pk: &[Value]) -> rusqlite::Result<Option<Vec<Value>>> {
    let n = t.t.columns.len();
    c.prepare_cached(&t.sql_select_row)?
        .query_row(key_params(pk), |r| {
            (0..n).map(|i| r.get::<_, Value>(i)).collect()
        })
        .optional()
}

fn upsert_row(c: &Connection, t: &Tbl, values: &[Value]) -> rusqlite::Result<()> {
    c.prepare_cached(&t.sql_upsert)?
        .execute(params_from_iter(values.iter()))?;
    Ok(())
}

fn delete_row(c: &Connection, t: &Tbl, pk: &[Value]) -> rusqlite::Result<()> {
    c.prepare_cached(&t.sql_delete)?.execute(key_params(pk))?;
    Ok(())
}

fn write_server_row(c: &Connection, t: &Tbl, pk: &[Value], s: &ServerRow) -> rusqlite::Result<()> {
    if s.deleted || s.values.len() != t.t.columns.len() {
        delete_row(c, t, pk)?;
    } else {
        upsert_row(c, t, &s.values)?;
    }
    set_ver_exact(c, t, pk, s.version)
}

fn server_as_remote(s: &ServerRow) -> RemoteChange {
    RemoteChange {
        version: s.version,
        table: String::new(),
        op: if s.deleted { Op::Delete } else { Op::Upsert },
        pk: Vec::new(),
        values: s.values.clone(),
    }
}

/// Keeps the hub's newest row for a key whose local change is still pending.
fn defer(c: &Connection, t: &Tbl, pk: &[Value], rc: RemoteChange) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO _tether_deferred (tbl, pk, version, op, vals) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (tbl, pk) DO UPDATE SET version = excluded.version, op = excluded.op, vals = excluded.vals
         WHERE excluded.version > version",
    )?
    .execute(params![
        t.t.name,
        encode_key(pk),
        rc.version as i64,
        if rc.op == Op::Upsert { 1 } else { 2 },
        encode_values(&rc.values)
    ])?;
    Ok(())
}

fn clear_deferred_upto(
    c: &Connection,
    t: &Tbl,
    pk: &[Value],
    version: u64,
) -> rusqlite::Result<()> {
    c.prepare_cached("DELETE FROM _tether_deferred WHERE tbl = ?1 AND pk = ?2 AND version <= ?3")?
        .execute(params![t.t.name, encode_key(pk), version as i64])?;
    Ok(())
}

/// After our change to a row was applied at `version`, applies a newer hub
/// row that arrived while the change was pending.
fn apply_deferred(c: &Connection, t: &Tbl, pk: &[Value], version: u64) -> rusqlite::Result<()> {
    let key = encode_key(pk);
    let found: Option<(i64, i64, Vec<u8>)> = c
        .prepare_cached(
            "SELECT version, op, vals FROM _tether_deferred WHERE tbl = ?1 AND pk = ?2",
        )?
        .query_row(params![t.t.name, key], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    let Some((dv, op, vals)) = found else {
        return Ok(());
    };
    c.prepare_cached("DELETE FROM _tether_deferred WHERE tbl = ?1 AND pk = ?2")?
        .execute(params![t.t.name, key])?;
    if dv as u64 <= version {
        return Ok(());
    }
    if op == 2 {
        delete_row(c, t, pk)?;
    } else {
        let values = decode_values(&vals).map_err(|err| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, Box::new(err))
        })?;
        upsert_row(c, t, &values)?;
    }
    set_ver(c, t, pk, dv as u64)
}
