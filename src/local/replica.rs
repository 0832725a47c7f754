//! The local side of sync for one database: reading the capture log,
//! applying the hub's answers and its changes. Synchronous; owned by one
//! thread (see [`super::LocalDb`]).
//!
//! Sequence numbers: the log's rowid is the client `seq`. SQLite gives a new
//! row the largest rowid plus one, so as long as the newest log row is never
//! deleted, a number is never handed out twice; consumed rows below it are
//! deleted and `consumed` in `_tether_meta` says how far the log was answered.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::{
    params, params_from_iter, Connection, OptionalExtension, Transaction, TransactionBehavior,
};

use super::evolve;
use super::held;
use super::identity::{self, Identity};
use super::schema::{self, ident, SchemaError, Table, MAX_KEY_COLUMNS};
use crate::config::ConflictPolicy;
use crate::proto::{
    encode_key, encode_values, Change, InvalidReason, Op, TableSchema, Value, MAX_CHANGE_BYTES,
};

/// How long tether waits for the app's write locks before giving up on one
/// attempt (the attempt is retried later; the app's writes are never failed).
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("database {db}: file {path} does not exist; tether syncs the app's database and does not create it: start the app first or fix `path`")]
    Missing { db: String, path: String },
    #[error("database {db}: already synced by another tether process (it holds {lock}); a database is synced by one process at a time: stop the other one (`systemctl stop tether`) or remove the database from one of the configs")]
    Locked { db: String, lock: String },
    #[error("database {db}: cannot take the lock {lock}: {source}")]
    Lock {
        db: String,
        lock: String,
        #[source]
        source: std::io::Error,
    },
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
    #[error("database {db}: cannot read the file {path}: {source}")]
    Io {
        db: String,
        path: String,
        #[source]
        source: std::io::Error,
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

impl LocalError {
    /// Whether the database was busy (another connection held its write
    /// lock past the busy timeout): worth trying again, nothing is wrong.
    pub fn is_busy(&self) -> bool {
        matches!(
            self,
            LocalError::Sqlite { source, .. }
                if matches!(
                    source.sqlite_error_code(),
                    Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
                )
        )
    }
}

/// What [`Replica::apply_results`] did, for logs and status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResultsApplied {
    /// Log rows consumed.
    pub consumed: u64,
    /// Conflicts resolved by writing the hub's row locally.
    pub server_rows_written: u64,
    /// Conflicts whose local change goes out again (client_wins, merge_columns).
    pub resent: u64,
    /// Invalid changes moved to `_tether_rejected`.
    pub rejected: u64,
}

/// Pending capture log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// Captured writes not yet answered by the hub.
    pub changes: u64,
    /// Newest client seq handed out (0 = none ever).
    pub last_seq: u64,
    /// Seq of the oldest unanswered write.
    pub oldest_seq: Option<u64>,
    /// The log is answered up to this seq.
    pub consumed: u64,
    /// When the oldest unanswered write was committed (ms since the epoch).
    pub oldest_at_ms: Option<i64>,
    /// The hub's changes the local database refused, held in `_tether_held`.
    pub held: u64,
    /// Why the newest held change was refused.
    pub held_reason: Option<String>,
}

/// One upload batch as read from the log.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub changes: Vec<Change>,
    /// Log rows with a seq up to here are answered by this batch.
    pub through: u64,
    /// Per change (same order): when its oldest log row in the batch was
    /// committed, in milliseconds since the epoch.
    pub captured_ms: Vec<i64>,
    /// The app changed a synced table's schema: capture was rebuilt and
    /// nothing was read; the connection must say `hello` again with the
    /// new schema before anything of the new shape goes out.
    pub schema_changed: Option<String>,
}

pub(super) struct Tbl {
    pub(super) id: i64,
    pub(super) t: Table,
    pub(super) policy: ConflictPolicy,
    sql_upsert: String,
    sql_delete: String,
    sql_select_row: String,
    sql_get_ver: String,
    sql_set_ver: String,
    sql_set_ver_exact: String,
    sql_set_ver_if_newer: String,
    sql_set_ver_at_least: String,
    sql_log: String,
    sql_row_and_version: String,
}

impl Tbl {
    fn new(id: i64, t: Table, policy: ConflictPolicy) -> Tbl {
        let name = ident(&t.name);
        let ver = t.ver_table();
        let keys = t.key_cols();
        let nk = t.pk.len();
        let cols: Vec<String> = t.columns.iter().map(|c| ident(c)).collect();
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
        let placeholders = |n: usize| {
            (1..=n)
                .map(|i| format!("?{i}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let set_ver = |on_conflict: &str| {
            format!(
                "INSERT INTO {ver} ({keys}, version) VALUES ({}, ?{}) ON CONFLICT ({keys}) {on_conflict}",
                placeholders(nk),
                nk + 1
            )
        };
        Tbl {
            sql_upsert: format!(
                "INSERT INTO {name} ({}) VALUES ({}) ON CONFLICT ({}) {on_conflict}",
                cols.join(", "),
                placeholders(cols.len()),
                t.pk_cols(),
            ),
            sql_delete: format!("DELETE FROM {name} WHERE {pk_params}"),
            sql_select_row: format!("SELECT {} FROM {name} WHERE {pk_params}", cols.join(", ")),
            sql_get_ver: format!("SELECT version FROM {ver} WHERE {k_params}"),
            sql_set_ver: set_ver("DO UPDATE SET version = max(version, excluded.version)"),
            sql_set_ver_exact: set_ver("DO UPDATE SET version = excluded.version"),
            sql_set_ver_if_newer: set_ver(
                "DO UPDATE SET version = excluded.version WHERE excluded.version > version",
            ),
            sql_set_ver_at_least: set_ver(
                "DO UPDATE SET version = excluded.version WHERE excluded.version >= version",
            ),
            sql_row_and_version: format!(
                "SELECT COALESCE(v.version, 0), r.{first} IS NOT NULL, {rcols} FROM (SELECT {kparams}) k
                 LEFT JOIN {name} r ON {rjoin} LEFT JOIN {ver} v ON {vjoin}",
                first = cols[t.pk[0]],
                rcols = cols.iter().map(|c| format!("r.{c}")).collect::<Vec<_>>().join(", "),
                kparams = (0..nk).map(|i| format!("?{} AS k{i}", i + 1)).collect::<Vec<_>>().join(", "),
                rjoin = t.pk.iter().enumerate().map(|(i, &c)| format!("r.{} = k.k{i}", cols[c])).collect::<Vec<_>>().join(" AND "),
                vjoin = (0..nk).map(|i| format!("v.k{i} = k.k{i}")).collect::<Vec<_>>().join(" AND "),
            ),
            sql_log: format!(
                "INSERT INTO _tether_log (tbl, op, mask, at, {keys}) VALUES ({id}, ?{}, ?{}, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER), {})",
                nk + 1,
                nk + 2,
                placeholders(nk)
            ),
            id,
            t,
            policy,
        }
    }
}

impl Tbl {
    /// The upsert of the first `n` columns only: the others keep their
    /// value (or take their default in a new row).
    fn partial_upsert(&self, n: usize) -> String {
        let cols: Vec<String> = self.t.columns[..n].iter().map(|c| ident(c)).collect();
        let set: Vec<String> = (0..n)
            .filter(|&i| !self.t.is_key(i))
            .map(|i| format!("{c} = excluded.{c}", c = cols[i]))
            .collect();
        let on_conflict = if set.is_empty() {
            "DO NOTHING".to_owned()
        } else {
            format!("DO UPDATE SET {}", set.join(", "))
        };
        format!(
            "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) {on_conflict}",
            ident(&self.t.name),
            cols.join(", "),
            (1..=n)
                .map(|i| format!("?{i}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.t.pk_cols()
        )
    }
}

/// The log rows of one key within a batch's range.
struct Entry {
    key: Key,
    /// Seqs of the first and last log row of this key in the range.
    first: u64,
    last: u64,
    mask: u64,
    at: i64,
    /// A key value is TEXT that is not UTF-8.
    bad_key: bool,
}

/// A change that is not sent, with its reason and message for
/// `_tether_rejected`.
type Refused = (Change, &'static str, String);

/// Reason recorded for a change holding TEXT that is not valid UTF-8.
pub const INVALID_TEXT: &str = "invalid_text";

/// One local database as tether sees it.
pub struct Replica {
    pub(super) name: String,
    pub(super) conn: Connection,
    /// Held while this replica lives: one tether process per database.
    lock: std::fs::File,
    /// The answered mark last written into the lock file.
    recorded: u64,
    pub(super) tables: HashMap<String, Tbl>,
    by_id: HashMap<i64, String>,
    pub(super) order: Vec<String>,
    identity: Identity,
    /// Where the file lives ([`identity::file_id`]), to bind a new identity.
    file: String,
    /// The file was found to be a copy at open and took a new identity.
    copied: bool,
    /// `PRAGMA schema_version` capture was built for (see [`super::evolve`]).
    pub(super) schema_version: i64,
}

pub(super) fn sq(db: &str) -> impl Fn(rusqlite::Error) -> LocalError + '_ {
    move |source| LocalError::Sqlite {
        db: db.to_owned(),
        source,
    }
}

/// A row's identity inside one database: table id and key values.
pub(super) type Key = (i64, Vec<Value>);

const LOG_COLS: &str = "seq, tbl, op, mask, k0, k1, k2, k3, k4, k5, k6, k7, at";
/// Position of `at` in [`LOG_COLS`].
const LOG_AT: usize = 12;

impl Replica {
    /// Opens the database, checks the tables and installs capture.
    ///
    /// `tables` pairs each synced table with its conflict policy.
    pub fn open(
        name: &str,
        path: &Path,
        tables: &[(String, ConflictPolicy)],
    ) -> Result<Replica, LocalError> {
        if !path.exists() {
            return Err(LocalError::Missing {
                db: name.to_owned(),
                path: path.display().to_string(),
            });
        }
        let lock = take_lock(name, path)?;
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
        conn.execute_batch(
            "PRAGMA synchronous = NORMAL; PRAGMA cache_size = -32768; PRAGMA temp_store = MEMORY;",
        )
        .map_err(&e)?;
        let mut found = Vec::new();
        for (t, policy) in tables {
            found.push((Table::introspect(&conn, name, t)?, *policy));
        }
        conn.execute_batch("BEGIN IMMEDIATE").map_err(&e)?;
        let installed = install(&conn, name, found);
        let installed = match installed {
            Ok(t) => {
                conn.execute_batch("COMMIT").map_err(&e)?;
                t
            }
            Err(err) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e(err));
            }
        };
        let (identity, origin, file, recorded) = settle_identity(name, path, &conn, &lock)?;
        let schema_version = evolve::schema_cookie(&conn).map_err(&e)?;
        let mut r = Replica {
            name: name.to_owned(),
            by_id: HashMap::new(),
            tables: HashMap::new(),
            order: Vec::new(),
            conn,
            identity,
            file,
            copied: origin != identity::Origin::Kept && origin != identity::Origin::New,
            lock,
            recorded,
            schema_version,
        };
        r.set_tables(installed);
        Ok(r)
    }

    /// The synced tables, as installed (in config order).
    pub(super) fn set_tables(&mut self, installed: Vec<Tbl>) {
        self.order = installed.iter().map(|t| t.t.name.clone()).collect();
        self.by_id = installed.iter().map(|t| (t.id, t.t.name.clone())).collect();
        self.tables = installed
            .into_iter()
            .map(|t| (t.t.name.clone(), t))
            .collect();
    }

    pub fn client_id(&self) -> &str {
        &self.identity.client_id
    }

    /// Recovers from a hub whose history went back (its store was restored
    /// from a backup, so changes this database holds may be gone from it,
    /// and their numbers handed out again): takes a new identity, sets the
    /// cursor back to 0 to download what the hub holds now, and captures
    /// every row of every synced table again, so that the rows the hub lost
    /// go back to it. A row the hub also holds meets it under the table's
    /// conflict policy. Pending changes are kept. Returns the rows captured.
    pub fn recover(&mut self) -> Result<u64, LocalError> {
        let e = sq(&self.name);
        let tx =
            Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate).map_err(&e)?;
        let identity = identity::renew(&tx, &self.file).map_err(&e)?;
        set_meta(&tx, "cursor", 0).map_err(&e)?;
        clear_anchor(&tx).map_err(&e)?;
        // The versions held here number a history the hub no longer has (it
        // hands those numbers out again for other changes): forget them, and
        // the hub's rows kept aside with them. Every row then goes out made
        // against nothing, so a row the hub holds meets it under the
        // table's policy, and every change downloaded applies.
        tx.execute_batch("DELETE FROM _tether_deferred; DELETE FROM _tether_held;")
            .map_err(&e)?;
        let mut rows = 0u64;
        for name in &self.order {
            let t = &self.tables[name];
            tx.execute_batch(&format!("DELETE FROM {}", t.t.ver_table()))
                .map_err(&e)?;
            rows += tx.execute(&capture_rows_sql(t.id, &t.t), []).map_err(&e)? as u64;
        }
        tx.commit().map_err(&e)?;
        tracing::warn!(
            db = %self.name,
            old = %self.identity.client_id,
            new = %identity.client_id,
            rows,
            "the hub's history went back (its store was restored?): recovering under a new identity; the dataset is downloaded again and every row is sent again, conflicts settled by each table's policy"
        );
        self.identity = identity;
        Ok(rows)
    }

    /// Highest client seq this database ever numbered (answered or not).
    pub fn local_seq(&self) -> Result<u64, LocalError> {
        let e = sq(&self.name);
        let consumed = meta_u64(&self.conn, "consumed").map_err(&e)?;
        let max: Option<i64> = self
            .conn
            .query_row("SELECT max(seq) FROM _tether_log", [], |r| r.get(0))
            .map_err(&e)?;
        Ok(consumed.max(max.unwrap_or(0) as u64))
    }

    /// The newest change of the hub's log whose content this database knows,
    /// sent in `hello` so that the hub can tell whether its log still holds
    /// this database's history.
    pub fn anchor(&self) -> Result<Option<crate::proto::Anchor>, LocalError> {
        let e = sq(&self.name);
        let version = meta_u64(&self.conn, "anchor_version").map_err(&e)?;
        if version == 0 {
            return Ok(None);
        }
        let digest: Option<String> = self
            .conn
            .query_row(
                "SELECT value FROM _tether_meta WHERE key = 'anchor_digest'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(&e)?;
        Ok(digest.map(|digest| crate::proto::Anchor { version, digest }))
    }

    /// The identity sent in `hello` (id and key).
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Whether the file took a new identity at open because it is a copy.
    pub fn was_copied(&self) -> bool {
        self.copied
    }

    /// Takes a new identity: the hub holds changes of this identity that
    /// this file did not make (another file used its sequence numbers, or
    /// the file was restored from a backup; nothing of a refused batch was
    /// stored). Pending changes stay and go out under the new identity; the
    /// cursor goes back to 0, since the other file's changes were skipped as
    /// this file's own.
    pub fn renew_identity(&mut self) -> Result<&Identity, LocalError> {
        let e = sq(&self.name);
        let tx =
            Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate).map_err(&e)?;
        let identity = identity::renew(&tx, &self.file).map_err(&e)?;
        // Pending changes may have been sent under the old identity by the
        // other file (or by this one before it went back): they never win.
        identity::mark_inherited(&tx, None).map_err(&e)?;
        // Changes of the old identity were skipped as this file's own while
        // another file used it: download the dataset again. Rows already
        // here are applied over themselves; pending changes keep theirs.
        set_meta(&tx, "cursor", 0).map_err(&e)?;
        clear_anchor(&tx).map_err(&e)?;
        tx.commit().map_err(&e)?;
        tracing::warn!(
            db = %self.name,
            old = %self.identity.client_id,
            new = %identity.client_id,
            "the hub holds writes of this database's identity that this file did not make (a copy, or a restored backup): took a new client identity; pending changes are kept and sent under it, and the dataset is downloaded again"
        );
        self.identity = identity;
        Ok(&self.identity)
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
        meta_u64(&self.conn, "cursor").map_err(sq(&self.name))
    }

    /// Changes whenever another connection commits (see SQLite's `data_version`).
    pub fn data_version(&self) -> Result<i64, LocalError> {
        self.conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(sq(&self.name))
    }

    /// Captured writes not yet answered by the hub.
    pub fn pending(&self) -> Result<Pending, LocalError> {
        let e = sq(&self.name);
        let consumed = meta_u64(&self.conn, "consumed").map_err(&e)?;
        let (n, max, min): (i64, Option<i64>, Option<i64>) = self
            .conn
            .prepare_cached("SELECT count(*), max(seq), min(seq) FROM _tether_log WHERE seq > ?1")
            .and_then(|mut st| {
                st.query_row([consumed as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            })
            .map_err(&e)?;
        let oldest_at: Option<i64> = match min {
            None => None,
            Some(m) => self
                .conn
                .prepare_cached("SELECT at FROM _tether_log WHERE seq = ?1")
                .and_then(|mut st| st.query_row([m], |r| r.get(0)))
                .optional()
                .map_err(&e)?
                .flatten(),
        };
        let held = super::held::count(&self.conn).map_err(&e)?;
        let held_reason = if held > 0 {
            super::held::newest_reason(&self.conn).map_err(&e)?
        } else {
            None
        };
        Ok(Pending {
            changes: n as u64,
            last_seq: (max.unwrap_or(0) as u64).max(consumed),
            oldest_seq: min.map(|m| m as u64),
            oldest_at_ms: oldest_at,
            consumed,
            held,
            held_reason,
        })
    }

    /// The next upload batch: log rows with a seq above `after` (rows at or
    /// below are answered or in flight), at most `max_rows` of them, coalesced
    /// per row into changes carrying the row's current values, cut at about
    /// `max_bytes`.
    ///
    /// A change larger than the hub accepts ([`MAX_CHANGE_BYTES`]) is never
    /// returned: it is recorded in `_tether_rejected` as `too_large` (once,
    /// however often it is read) and the batch's `through` covers it, so it
    /// is consumed with the batch and the rows behind it go out.
    pub fn read_batch(
        &mut self,
        after: u64,
        max_rows: usize,
        max_bytes: usize,
    ) -> Result<Batch, LocalError> {
        let (batch, unsendable) = loop {
            if let Some(what) = self.check_schema()? {
                return Ok(Batch {
                    through: after,
                    schema_changed: Some(what),
                    ..Batch::default()
                });
            }
            // None: the schema moved between the check and the read.
            if let Some(read) = self.read_log(after, max_rows, max_bytes)? {
                break read;
            }
        };
        if !unsendable.is_empty() {
            self.reject_unsendable(&unsendable)
                .map_err(sq(&self.name))?;
        }
        Ok(batch)
    }

    /// Records changes that cannot be sent in `_tether_rejected`.
    fn reject_unsendable(&self, changes: &[Refused]) -> rusqlite::Result<()> {
        let tx = Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
        for (c, reason, message) in changes {
            tracing::warn!(db = %self.name, seq = c.seq, "{message}; not sent");
            tx.prepare_cached(
                "INSERT INTO _tether_rejected (seq, tbl, pk, op, vals, reason, message, at)
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, unixepoch()
                 WHERE NOT EXISTS (SELECT 1 FROM _tether_rejected WHERE seq = ?1 AND reason = ?6)",
            )?
            .execute(params![
                c.seq as i64,
                c.table,
                encode_key(&c.pk),
                if c.op == Op::Upsert { 1 } else { 2 },
                encode_values(&c.values),
                reason,
                message
            ])?;
        }
        tx.commit()
    }

    /// The log rows after `from` (at most `max_rows`), one entry per key
    /// with the columns all its rows touched, and the last seq scanned.
    fn scan_log(
        &self,
        tx: &Transaction,
        from: u64,
        max_rows: usize,
    ) -> Result<(Vec<Entry>, u64), LocalError> {
        let e = sq(&self.name);
        let mut entries: Vec<Entry> = Vec::new();
        let mut index: HashMap<Key, usize> = HashMap::new();
        let mut through = from;
        let mut stmt = tx
            .prepare_cached(&format!(
                "SELECT {LOG_COLS} FROM _tether_log WHERE seq > ?1 ORDER BY seq LIMIT ?2"
            ))
            .map_err(&e)?;
        let mut rows = stmt.query([from as i64, max_rows as i64]).map_err(&e)?;
        while let Some(r) = rows.next().map_err(&e)? {
            let seq = r.get::<_, i64>(0).map_err(&e)? as u64;
            through = seq;
            let tbl: i64 = r.get(1).map_err(&e)?;
            let Some(name) = self.by_id.get(&tbl) else {
                continue; // a table no longer synced, or a marker row
            };
            let nk = self.tables[name].t.pk.len();
            let mut key = Vec::with_capacity(nk);
            let mut bad_key = false;
            for i in 0..nk {
                let raw = r.get_ref(4 + i).map_err(&e)?;
                bad_key |= invalid_text(raw);
                key.push(r.get::<_, Value>(4 + i).map_err(&e)?);
            }
            let mask = r.get::<_, i64>(3).map_err(&e)? as u64;
            let at = r.get::<_, Option<i64>>(LOG_AT).map_err(&e)?.unwrap_or(0);
            let key = (tbl, key);
            match index.get(&key) {
                Some(&i) => {
                    entries[i].last = seq;
                    entries[i].mask |= mask;
                }
                None => {
                    index.insert(key.clone(), entries.len());
                    entries.push(Entry {
                        key,
                        first: seq,
                        last: seq,
                        mask,
                        at,
                        bad_key,
                    });
                }
            }
        }
        Ok((entries, through))
    }

    /// [`Self::read_batch`] without side effects: the batch, and the changes
    /// it covers that are too large to send; None when the schema is not
    /// the one capture was built for (checked in the read's own snapshot).
    fn read_log(
        &self,
        after: u64,
        max_rows: usize,
        max_bytes: usize,
    ) -> Result<Option<(Batch, Vec<Refused>)>, LocalError> {
        let e = sq(&self.name);
        let tx = self.conn.unchecked_transaction().map_err(&e)?;
        // The first read opens the snapshot every later read of this
        // transaction sees.
        if evolve::schema_cookie(&tx).map_err(&e)? != self.schema_version {
            return Ok(None);
        }
        let sent_columns = evolve::sent_columns(&tx).map_err(&e)?;
        let consumed = meta_u64(&tx, "consumed").map_err(&e)?;
        let from = after.max(consumed);
        let (mut entries, mut through) = self.scan_log(&tx, from, max_rows)?;
        entries.sort_by_key(|en| en.last);
        let mut changes = Vec::with_capacity(entries.len());
        let mut captured_ms = Vec::with_capacity(entries.len());
        let mut too_large = Vec::new();
        let mut bytes = 0;
        let mut cut_at = entries.len();
        for (i, en) in entries.iter().enumerate() {
            let name = &self.by_id[&en.key.0];
            let tbl = &self.tables[name];
            let pk = &en.key.1;
            let (values, base, bad_column) = row_and_version(&tx, tbl, pk).map_err(&e)?;
            let (op, values) = match values {
                Some(v) => (Op::Upsert, v),
                None => (Op::Delete, Vec::new()),
            };
            let mut change = Change {
                seq: en.last,
                table: name.clone(),
                op,
                pk: pk.clone(),
                values,
                base,
                mask: en.mask,
            };
            if let Some(&n) = sent_columns.get(name) {
                // Refetching: columns this app added are not sent until
                // their values arrived, unless the app wrote them.
                let newer = !((1u64 << n.min(63)) - 1);
                if n < change.values.len() && en.mask & newer == 0 {
                    change.values.truncate(n);
                }
            }
            let size = change.wire_size();
            if let Some((reason, message)) =
                unsendable(&change, &tbl.t, en.bad_key, bad_column, size)
            {
                too_large.push((change, reason, message));
                continue;
            }
            bytes += size;
            if !changes.is_empty() && bytes > max_bytes {
                cut_at = i;
                break;
            }
            changes.push(change);
            captured_ms.push(en.at);
        }
        if cut_at < entries.len() {
            // Keys left out must keep all their log rows, or the columns
            // their earlier writes touched would be forgotten.
            let kept_min = entries[cut_at..].iter().map(|en| en.first).min();
            // Not empty: a cut needs a change before it.
            let last_sent = entries[cut_at - 1].last;
            through = kept_min.map(|m| m - 1).unwrap_or(last_sent).min(last_sent);
        }
        // Those past `through` are read again with the next batch.
        too_large.retain(|(c, _, _)| c.seq <= through);
        let batch = Batch {
            changes,
            through,
            captured_ms,
            schema_changed: None,
        };
        Ok(Some((batch, too_large)))
    }

    /// Estimated wire size of the pending changes up to `target`.
    pub fn pending_bytes(&self, target: u64) -> Result<u64, LocalError> {
        let mut after = 0;
        let mut bytes = 0u64;
        loop {
            let Some((b, _)) = self.read_log(after, 4000, usize::MAX)? else {
                // Capture is rebuilt by the next batch read; counted then.
                return Ok(bytes);
            };
            if b.through <= after {
                return Ok(bytes);
            }
            for c in b.changes.iter().filter(|c| c.seq <= target) {
                bytes += c.wire_size() as u64;
            }
            if b.through >= target {
                return Ok(bytes);
            }
            after = b.through;
        }
    }

    pub(super) fn tbl(&self, table: &str) -> Result<&Tbl, LocalError> {
        self.tables
            .get(table)
            .ok_or_else(|| LocalError::UnknownTable {
                db: self.name.clone(),
                table: table.to_owned(),
            })
    }

    /// Keys with a log row above `after`, each with the columns those rows
    /// wrote (the union of their masks; a delete writes none).
    pub(super) fn logged_after(
        &self,
        c: &Connection,
        after: u64,
    ) -> rusqlite::Result<HashMap<Key, u64>> {
        let mut stmt = c.prepare_cached(&format!(
            "SELECT {LOG_COLS} FROM _tether_log WHERE seq > ?1"
        ))?;
        let mut rows = stmt.query([after as i64])?;
        let mut keys: HashMap<Key, u64> = HashMap::new();
        while let Some(r) = rows.next()? {
            let tbl: i64 = r.get(1)?;
            let Some(name) = self.by_id.get(&tbl) else {
                continue;
            };
            let nk = self.tables[name].t.pk.len();
            let mut key = Vec::with_capacity(nk);
            for i in 0..nk {
                key.push(r.get::<_, Value>(4 + i)?);
            }
            let mask = r.get::<_, i64>(3)? as u64;
            *keys.entry((tbl, key)).or_default() |= mask;
        }
        Ok(keys)
    }
}

/// Installs tether's tables and each synced table's capture in one
/// transaction (the caller's); a table synced for the first time has the
/// rows it already holds captured in it, so no write falls between.
pub(super) fn install(
    conn: &Connection,
    name: &str,
    found: Vec<(Table, ConflictPolicy)>,
) -> rusqlite::Result<Vec<Tbl>> {
    conn.execute_batch(schema::BASE_SQL)?;
    let mut out = Vec::new();
    for (t, policy) in found {
        let known: Option<i64> = conn
            .query_row(
                "SELECT id FROM _tether_tables WHERE name = ?1",
                [&t.name],
                |r| r.get(0),
            )
            .optional()?;
        let id = match known {
            Some(id) if !has_capture(conn, &t.name)? => {
                // Synced before, but its triggers are gone: the app rebuilt
                // the table (CREATE, copy, DROP, RENAME), or it was left out
                // of `tables` for a while. Writes since were not captured:
                // every row goes out again, against the version it has.
                let n = conn.execute(&capture_rows_sql(id, &t), [])?;
                tracing::info!(db = name, table = %t.name, rows = n, "the table's capture triggers were gone (the table was rebuilt, or not synced for a while): its rows are captured again");
                id
            }
            Some(id) => id,
            None => {
                conn.execute("INSERT INTO _tether_tables (name) VALUES (?1)", [&t.name])?;
                let id = conn.last_insert_rowid();
                // First time this table is synced: the rows it already
                // holds are captured too, in the same transaction that
                // installs the triggers, so no write falls between.
                let n = conn.execute(&capture_rows_sql(id, &t), [])?;
                if n > 0 {
                    tracing::info!(db = name, table = %t.name, rows = n, "captured the rows the table already held");
                }
                id
            }
        };
        evolve::note_columns(conn, &t, id, known.is_none())?;
        conn.execute_batch(&t.install_sql(id))?;
        out.push(Tbl::new(id, t, policy));
    }
    // Tables no longer configured stop being captured.
    let names: Vec<String> = conn
        .prepare("SELECT name FROM _tether_tables")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for n in names {
        if !out.iter().any(|t| t.t.name == n) {
            for kind in ["ins", "upd", "updkey", "del"] {
                conn.execute_batch(&format!(
                    "DROP TRIGGER IF EXISTS {}",
                    ident(&format!("_tether_{n}_{kind}"))
                ))?;
            }
        }
    }
    Ok(out)
}

/// Whether the table's capture triggers are installed.
fn has_capture(conn: &Connection, table: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name = ?1",
        [format!("_tether_{table}_ins")],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
}

/// SQL capturing every row a table holds now as a pending change.
fn capture_rows_sql(id: i64, t: &Table) -> String {
    format!(
        "INSERT INTO _tether_log (tbl, op, mask, at, {}) SELECT {id}, 1, -1, {}, {} FROM {}",
        t.key_cols(),
        schema::NOW_MS,
        t.pk_cols(),
        ident(&t.name)
    )
}

/// Which identity the file has: its own, a new one on first open, or a new
/// one when it is a copy (another machine, device or inode) or went back in
/// time (its log is behind the answered mark the lock file keeps). Returns
/// it with how it was found, the file's place ([`identity::file_id`]) and
/// the answered mark now in the lock file.
fn settle_identity(
    name: &str,
    path: &Path,
    conn: &Connection,
    lock: &std::fs::File,
) -> Result<(Identity, identity::Origin, String, u64), LocalError> {
    let e = sq(name);
    let file = identity::file_id(path).map_err(|source| LocalError::Io {
        db: name.to_owned(),
        path: path.display().to_string(),
        source,
    })?;
    conn.execute_batch("BEGIN IMMEDIATE").map_err(&e)?;
    let (identity, origin) = match identity::load(conn, &file) {
        Ok(found) => {
            conn.execute_batch("COMMIT").map_err(&e)?;
            found
        }
        Err(err) => {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e(err));
        }
    };
    // The lock file remembers how far this file's log was answered; a
    // file behind that mark was put back from a backup in place.
    let recorded = identity::recorded_consumed(lock);
    let consumed = meta_u64(conn, "consumed").map_err(&e)?;
    let (identity, origin) = match recorded {
        Some(r) if origin == identity::Origin::Kept && r > consumed => {
            let tx =
                Transaction::new_unchecked(conn, TransactionBehavior::Immediate).map_err(&e)?;
            let renewed = identity::renew(&tx, &file).map_err(&e)?;
            set_meta(&tx, "cursor", 0).map_err(&e)?;
            clear_anchor(&tx).map_err(&e)?;
            let before = identity::modified_ms(lock);
            identity::mark_inherited(&tx, before).map_err(&e)?;
            tx.commit().map_err(&e)?;
            // The mark starts again from what this file holds.
            identity::record_consumed(lock, consumed);
            tracing::warn!(
                db = name,
                client_id = %renewed.client_id,
                answered = r,
                holds = consumed,
                "this database file went back in time (restored from a backup in place): it takes a new client identity and downloads the dataset again; changes it held from before the restore never win over newer rows on the hub"
            );
            (renewed, identity::Origin::Restored)
        }
        _ => (identity, origin),
    };
    if origin == identity::Origin::Copied {
        tracing::warn!(
            db = name,
            client_id = %identity.client_id,
            "this database file is a copy of another (it was created on another machine, device or inode): it takes a new client identity so that its writes are never taken for the original's; its pending changes are kept and sent under the new identity"
        );
    }
    let marked = consumed.min(recorded.unwrap_or(0));
    Ok((identity, origin, file, marked))
}

/// Takes the per-database lock file `<database>-tether.lock` (an advisory
/// lock, released by the OS if the process dies).
fn take_lock(name: &str, path: &Path) -> Result<std::fs::File, LocalError> {
    // The lock sits beside the real file: a symlink or another spelling of
    // the path leads to the same lock.
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let mut lock_path = real.as_os_str().to_owned();
    lock_path.push("-tether.lock");
    let lock_path = std::path::PathBuf::from(lock_path);
    let shown = lock_path.display().to_string();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(|source| LocalError::Lock {
            db: name.to_owned(),
            lock: shown.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(LocalError::Locked {
            db: name.to_owned(),
            lock: shown,
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(LocalError::Lock {
            db: name.to_owned(),
            lock: shown,
            source,
        }),
    }
}

impl Replica {
    /// Notes in the lock file how far the log was answered, so that a file
    /// put back from a backup in place finds itself behind it at its next
    /// open. Not synced: the mark may lag after a crash, never lead.
    pub(super) fn record_consumed(&mut self, through: u64) {
        if through > self.recorded {
            identity::record_consumed(&self.lock, through);
            self.recorded = through;
        }
    }
}

/// Records that the hub's log holds this change at `version`, if it is the
/// newest such change known here (see [`crate::proto::Anchor`]).
pub(super) fn raise_anchor(
    c: &Connection,
    version: u64,
    table: &str,
    op: Op,
    pk: &[Value],
    values: &[Value],
) -> rusqlite::Result<()> {
    if version == 0 || version <= meta_u64(c, "anchor_version")? {
        return Ok(());
    }
    let digest =
        crate::proto::log_digest(version, table, op, &encode_key(pk), &encode_values(values));
    set_meta(c, "anchor_version", version)?;
    c.prepare_cached(
        "INSERT INTO _tether_meta (key, value) VALUES ('anchor_digest', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute([digest])?;
    Ok(())
}

/// Forgets the anchor (the hub's history is to be learned anew).
pub(super) fn clear_anchor(c: &Connection) -> rusqlite::Result<()> {
    c.execute(
        "DELETE FROM _tether_meta WHERE key IN ('anchor_version', 'anchor_digest')",
        [],
    )?;
    Ok(())
}

pub(super) fn meta_u64(c: &Connection, key: &str) -> rusqlite::Result<u64> {
    let v: Option<i64> = c
        .prepare_cached("SELECT value FROM _tether_meta WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?;
    Ok(v.unwrap_or(0) as u64)
}

fn set_meta(c: &Connection, key: &str, value: u64) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO _tether_meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, value as i64])?;
    Ok(())
}

/// Marks log rows up to `through` as answered and deletes them, except the
/// newest log row (see the module docs). Returns how many were consumed.
pub(super) fn consume(c: &Connection, through: u64) -> rusqlite::Result<u64> {
    let consumed = meta_u64(c, "consumed")?;
    if through <= consumed {
        return Ok(0);
    }
    let n = c
        .prepare_cached("SELECT count(*) FROM _tether_log WHERE seq > ?1 AND seq <= ?2")?
        .query_row([consumed as i64, through as i64], |r| r.get::<_, i64>(0))?;
    c.prepare_cached(
        "DELETE FROM _tether_log WHERE seq <= ?1 AND seq < (SELECT max(seq) FROM _tether_log)",
    )?
    .execute([through as i64])?;
    set_meta(c, "consumed", through)?;
    Ok(n as u64)
}

/// Appends a log row written by tether itself (a change to send again).
pub(super) fn log_write(
    c: &Connection,
    t: &Tbl,
    pk: &[Value],
    op: i64,
    mask: u64,
) -> rusqlite::Result<()> {
    let extra = [Value::Integer(op), Value::Integer(mask as i64)];
    c.prepare_cached(&t.sql_log)?
        .execute(params_from_iter(pk.iter().chain(extra.iter())))?;
    Ok(())
}

fn key_params(pk: &[Value]) -> impl rusqlite::Params + '_ {
    params_from_iter(pk.iter())
}

const _: () = assert!(MAX_KEY_COLUMNS == 8, "LOG_COLS lists k0..k7");

pub(super) fn get_ver(c: &Connection, t: &Tbl, pk: &[Value]) -> rusqlite::Result<u64> {
    Ok(c.prepare_cached(&t.sql_get_ver)?
        .query_row(key_params(pk), |r| r.get::<_, i64>(0))
        .optional()?
        .unwrap_or(0) as u64)
}

/// Runs one of a table's version statements, bound to the key then `version`;
/// returns the number of rows it wrote.
fn exec_ver(c: &Connection, sql: &str, pk: &[Value], version: u64) -> rusqlite::Result<usize> {
    let v = Value::Integer(version as i64);
    c.prepare_cached(sql)?
        .execute(params_from_iter(pk.iter().chain(std::iter::once(&v))))
}

/// Moves a row's version forward; false when it already was at or past it.
pub(super) fn set_ver_if_newer(
    c: &Connection,
    t: &Tbl,
    pk: &[Value],
    version: u64,
) -> rusqlite::Result<bool> {
    Ok(exec_ver(c, &t.sql_set_ver_if_newer, pk, version)? == 1)
}

/// Like [`set_ver_if_newer`], true also when the row is at `version`
/// already (a change downloaded again, see [`super::evolve`]).
pub(super) fn set_ver_at_least(
    c: &Connection,
    t: &Tbl,
    pk: &[Value],
    version: u64,
) -> rusqlite::Result<bool> {
    Ok(exec_ver(c, &t.sql_set_ver_at_least, pk, version)? == 1)
}

pub(super) fn set_ver(c: &Connection, t: &Tbl, pk: &[Value], version: u64) -> rusqlite::Result<()> {
    exec_ver(c, &t.sql_set_ver, pk, version).map(drop)
}

/// Sets the version even if lower than the stored one: after a conflict the
/// hub's answer is authoritative for what the next upload is based on.
pub(super) fn set_ver_exact(
    c: &Connection,
    t: &Tbl,
    pk: &[Value],
    version: u64,
) -> rusqlite::Result<()> {
    exec_ver(c, &t.sql_set_ver_exact, pk, version).map(drop)
}

/// The row's current values (None when absent) and its local version, in
/// one statement.
/// The row and its version, as [`row_and_version`] gives them, and the first
/// column (if any) holding TEXT that is not valid UTF-8.
type RowRead = (Option<Vec<Value>>, u64, Option<usize>);

fn row_and_version(c: &Connection, t: &Tbl, pk: &[Value]) -> rusqlite::Result<RowRead> {
    let n = t.t.columns.len();
    c.prepare_cached(&t.sql_row_and_version)?
        .query_row(key_params(pk), |r| {
            let version = r.get::<_, i64>(0)? as u64;
            let exists: bool = r.get(1)?;
            let mut bad = None;
            let values = if exists {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    let raw = r.get_ref(2 + i)?;
                    if invalid_text(raw) {
                        bad.get_or_insert(i);
                    }
                    v.push(r.get::<_, Value>(2 + i)?);
                }
                Some(v)
            } else {
                None
            };
            Ok((values, version, bad))
        })
}

/// Why a change read from the log cannot be sent, if it cannot: TEXT that is
/// not UTF-8 (in a key value, or in `bad_column`), or a size the hub refuses.
fn unsendable(
    change: &Change,
    table: &Table,
    bad_key: bool,
    bad_column: Option<usize>,
    size: usize,
) -> Option<(&'static str, String)> {
    let what = match (bad_key, bad_column) {
        (true, _) => Some("a key value".to_owned()),
        (false, Some(i)) => Some(format!("column {:?}", table.columns[i])),
        (false, None) => None,
    };
    // Rendered only for a refusal: this runs for every change read.
    let key = || held::render_key(&change.pk);
    if let Some(what) = what {
        return Some((INVALID_TEXT, format!(
            "table {:?} key {}: {what} is TEXT that is not valid UTF-8 and cannot be synced unchanged; store such bytes as a BLOB (CAST(... AS BLOB)) or fix their encoding",
            change.table,
            key()
        )));
    }
    (size > MAX_CHANGE_BYTES).then(|| {
        (InvalidReason::TooLarge.as_str(), format!(
            "table {:?} key {}: the change is {size} bytes, larger than the {MAX_CHANGE_BYTES} bytes the hub accepts",
            change.table,
            key()
        ))
    })
}

/// TEXT whose bytes are not UTF-8 (an app can store them): it cannot travel
/// as text without being changed.
fn invalid_text(v: rusqlite::types::ValueRef<'_>) -> bool {
    matches!(v, rusqlite::types::ValueRef::Text(t) if std::str::from_utf8(t).is_err())
}

pub(super) fn select_row(
    c: &Connection,
    t: &Tbl,
    pk: &[Value],
) -> rusqlite::Result<Option<Vec<Value>>> {
    let n = t.t.columns.len();
    c.prepare_cached(&t.sql_select_row)?
        .query_row(key_params(pk), |r| {
            (0..n).map(|i| r.get::<_, Value>(i)).collect()
        })
        .optional()
}

/// Whether a hub row of `n` values can be written to the table: it holds
/// every key column. A device whose app has not added the newest columns
/// gets longer rows than its table (it writes the columns it has); one that
/// added columns the row's writer did not have gets shorter ones (it writes
/// those, and the others keep their value, or take their default in a new
/// row). Columns are only ever added at the end, so the first values are
/// always the first columns (see `hub::store::evolution`).
pub(super) fn row_fits(t: &Table, n: usize) -> bool {
    t.pk.iter().all(|&i| i < n)
}

/// Writes a hub row: the whole row, or the first columns of a row of
/// another length (see [`row_fits`]).
pub(super) fn upsert_row(c: &Connection, t: &Tbl, values: &[Value]) -> rusqlite::Result<()> {
    let cols = t.t.columns.len();
    if values.len() == cols {
        c.prepare_cached(&t.sql_upsert)?
            .execute(params_from_iter(values.iter()))?;
        return Ok(());
    }
    if !row_fits(&t.t, values.len()) {
        return Err(rusqlite::Error::ToSqlConversionFailure(
            format!(
                "the hub's row has {} values, fewer than the table's key needs ({} columns)",
                values.len(),
                cols
            )
            .into(),
        ));
    }
    let n = values.len().min(cols);
    c.prepare_cached(&t.partial_upsert(n))?
        .execute(params_from_iter(values[..n].iter()))?;
    Ok(())
}

pub(super) fn delete_row(c: &Connection, t: &Tbl, pk: &[Value]) -> rusqlite::Result<()> {
    c.prepare_cached(&t.sql_delete)?.execute(key_params(pk))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{ChangeResult, Outcome, RemoteChange};

    fn setup() -> (tempfile::TempDir, Connection, Replica) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let app = Connection::open(&path).unwrap();
        app.execute_batch(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, b TEXT);
             INSERT INTO t VALUES (1, 'before', 'x');",
        )
        .unwrap();
        let r = Replica::open("t", &path, &[("t".into(), ConflictPolicy::MergeColumns)]).unwrap();
        (dir, app, r)
    }

    #[test]
    fn rows_present_before_the_first_sync_are_captured() {
        let (_d, _app, mut r) = setup();
        let b = r.read_batch(0, 100, 1 << 20).unwrap();
        assert_eq!(b.changes.len(), 1);
        assert_eq!(b.changes[0].values[1], Value::Text("before".into()));
        // With the time of capture, so that status shows how long it waits.
        assert!(b.captured_ms[0] > 1_600_000_000_000, "{:?}", b.captured_ms);
        assert!(r.pending().unwrap().oldest_at_ms.is_some());
    }

    #[test]
    fn a_symlink_to_a_synced_database_is_refused_like_its_own_path() {
        let (d, _app, _r) = setup();
        let link = d.path().join("link.db");
        std::os::unix::fs::symlink(d.path().join("t.db"), &link).unwrap();
        let e = Replica::open("t", &link, &[("t".into(), ConflictPolicy::MergeColumns)]);
        assert!(
            matches!(e, Err(LocalError::Locked { .. })),
            "a second process on one file"
        );
    }

    #[test]
    fn writes_to_one_row_coalesce_and_the_last_value_wins() {
        let (_d, app, mut r) = setup();
        let first = r.read_batch(0, 100, 1 << 20).unwrap();
        r.apply_results(
            &first,
            &[ChangeResult {
                seq: first.changes[0].seq,
                outcome: Outcome::Applied { version: 1 },
            }],
        )
        .unwrap();
        app.execute_batch(
            "UPDATE t SET a = 'one' WHERE id = 1;
             UPDATE t SET b = 'two' WHERE id = 1;
             UPDATE t SET a = 'three' WHERE id = 1;
             INSERT INTO t VALUES (2, 'new', NULL);
             DELETE FROM t WHERE id = 2;",
        )
        .unwrap();
        let b = r.read_batch(0, 100, 1 << 20).unwrap();
        assert_eq!(b.changes.len(), 2);
        let row1 = b
            .changes
            .iter()
            .find(|c| c.pk == vec![Value::Integer(1)])
            .unwrap();
        assert_eq!(row1.op, Op::Upsert);
        assert_eq!(row1.values[1], Value::Text("three".into()));
        // Columns a (bit 1) and b (bit 2) were touched, the key was not.
        assert_eq!(row1.mask, 0b110);
        let row2 = b
            .changes
            .iter()
            .find(|c| c.pk == vec![Value::Integer(2)])
            .unwrap();
        assert_eq!(row2.op, Op::Delete);
        assert_eq!(r.pending().unwrap().changes, 5);
    }

    #[test]
    fn tethers_own_writes_are_not_captured() {
        let (_d, app, mut r) = setup();
        let first = r.read_batch(0, 100, 1 << 20).unwrap();
        r.apply_results(&first, &[]).unwrap();
        r.apply_remote(
            &[RemoteChange {
                version: 5,
                table: "t".into(),
                op: Op::Upsert,
                pk: vec![Value::Integer(9)],
                values: vec![Value::Integer(9), Value::Text("hub".into()), Value::Null],
            }],
            5,
        )
        .unwrap();
        let written: String = app
            .query_row("SELECT a FROM t WHERE id = 9", [], |row| row.get(0))
            .unwrap();
        assert_eq!(written, "hub", "the hub's row was written");
        assert_eq!(r.pending().unwrap().changes, 0, "and not captured");
        assert_eq!(r.cursor().unwrap(), 5);
        // The same change again is ignored (version not newer).
        assert_eq!(
            r.apply_remote(
                &[RemoteChange {
                    version: 5,
                    table: "t".into(),
                    op: Op::Delete,
                    pk: vec![Value::Integer(9)],
                    values: vec![],
                }],
                5,
            )
            .unwrap()
            .applied,
            0
        );
        let still: i64 = app
            .query_row("SELECT count(*) FROM t WHERE id = 9", [], |row| row.get(0))
            .unwrap();
        assert_eq!(still, 1, "an older version does not delete the row");
    }

    #[test]
    fn sequence_numbers_are_never_reused() {
        let (_d, app, mut r) = setup();
        let b = r.read_batch(0, 100, 1 << 20).unwrap();
        let seq1 = b.changes[0].seq;
        r.apply_results(&b, &[]).unwrap();
        app.execute("UPDATE t SET a = 'again' WHERE id = 1", [])
            .unwrap();
        let b2 = r.read_batch(0, 100, 1 << 20).unwrap();
        assert!(b2.changes[0].seq > seq1);
        r.apply_results(&b2, &[]).unwrap();
        app.execute("UPDATE t SET a = 'and again' WHERE id = 1", [])
            .unwrap();
        let b3 = r.read_batch(0, 100, 1 << 20).unwrap();
        assert!(b3.changes[0].seq > b2.changes[0].seq);
    }

    #[test]
    fn text_that_is_not_utf8_is_refused_with_the_reason_never_sent_changed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let app = Connection::open(&path).unwrap();
        app.execute_batch("CREATE TABLE s (k TEXT PRIMARY KEY, v TEXT)")
            .unwrap();
        let mut r = Replica::open("s", &path, &[("s".into(), ConflictPolicy::ServerWins)]).unwrap();
        app.execute_batch(
            "INSERT INTO s VALUES ('good', 'ok');
             INSERT INTO s VALUES (CAST(x'41ff' AS TEXT), 'bad key');
             INSERT INTO s VALUES ('bad value', CAST(x'42fe' AS TEXT));",
        )
        .unwrap();
        let b = r.read_batch(0, 100, 1 << 20).unwrap();
        let keys: Vec<&Value> = b.changes.iter().map(|c| &c.pk[0]).collect();
        assert_eq!(keys, [&Value::Text("good".into())]);
        let rejected: Vec<(String, String)> = app
            .prepare("SELECT reason, message FROM _tether_rejected ORDER BY seq")
            .unwrap()
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        assert!(rejected
            .iter()
            .all(|(r, m)| r == INVALID_TEXT && m.contains("not valid UTF-8")));
        assert!(rejected[1].1.contains("column \"v\""), "{rejected:?}");
        // Nothing is left blocking the log once the batch is answered.
        r.apply_results(&b, &[]).unwrap();
        assert_eq!(r.pending().unwrap().changes, 0);
    }

    #[test]
    fn a_batch_cut_by_size_keeps_the_rows_it_did_not_send() {
        let (_d, app, mut r) = setup();
        let b = r.read_batch(0, 100, 1 << 20).unwrap();
        r.apply_results(&b, &[]).unwrap();
        let big = "x".repeat(1000);
        for i in 10..20 {
            app.execute("INSERT INTO t VALUES (?1, ?2, NULL)", params![i, big])
                .unwrap();
        }
        let b = r.read_batch(0, 100, 3000).unwrap();
        assert!(b.changes.len() < 10 && !b.changes.is_empty());
        r.apply_results(&b, &[]).unwrap();
        let rest = r.read_batch(0, 100, 1 << 20).unwrap();
        assert_eq!(b.changes.len() + rest.changes.len(), 10);
    }

    #[test]
    fn tables_without_key_or_missing_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE nokey (a, b)")
            .unwrap();
        let refusal = |path: &Path, table: Option<&str>| {
            let tables: Vec<(String, ConflictPolicy)> = table
                .map(|t| (t.to_owned(), ConflictPolicy::ServerWins))
                .into_iter()
                .collect();
            Replica::open("mydb", path, &tables)
                .err()
                .unwrap()
                .to_string()
        };
        let err = refusal(&path, Some("nokey"));
        assert!(
            err.contains("mydb") && err.contains("\"nokey\"") && err.contains("PRIMARY KEY"),
            "{err}"
        );
        let err = refusal(&path, Some("ghost"));
        assert!(err.contains("\"ghost\" does not exist"), "{err}");
        let err = refusal(&dir.path().join("none.db"), None);
        assert!(err.contains("does not exist"), "{err}");
    }

    #[test]
    fn a_change_too_large_for_the_hub_is_rejected_and_the_next_goes_out() {
        let (_d, app, mut r) = setup();
        let b = r.read_batch(0, 100, 1 << 20).unwrap();
        r.apply_results(&b, &[]).unwrap();
        let huge = "x".repeat(MAX_CHANGE_BYTES + 1);
        app.execute("INSERT INTO t VALUES (2, ?1, NULL)", [&huge])
            .unwrap();
        app.execute("INSERT INTO t VALUES (3, 'small', NULL)", [])
            .unwrap();
        let rejected = |r: &Replica| -> Vec<(String, String)> {
            r.conn
                .prepare("SELECT reason, message FROM _tether_rejected")
                .unwrap()
                .query_map([], |row| Ok((row.get(0).unwrap(), row.get(1).unwrap())))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        let b = r.read_batch(0, 100, 1 << 20).unwrap();
        assert_eq!(b.changes.len(), 1);
        assert_eq!(b.changes[0].pk, vec![Value::Integer(3)]);
        // Read twice (a batch sent again), recorded once.
        let again = r.read_batch(0, 100, 1 << 20).unwrap();
        assert_eq!(again.through, b.through);
        let found = rejected(&r);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, "too_large");
        assert!(
            found[0].1.contains("\"t\" key [2]")
                && found[0].1.contains(&MAX_CHANGE_BYTES.to_string()),
            "{}",
            found[0].1
        );
        r.apply_results(&b, &[]).unwrap();
        assert_eq!(r.pending().unwrap().changes, 0);
        // Alone in a batch, it is covered by `through` all the same.
        app.execute("UPDATE t SET b = ?1 WHERE id = 3", [&huge])
            .unwrap();
        let b = r.read_batch(0, 100, 1 << 20).unwrap();
        assert!(b.changes.is_empty() && b.through > r.pending().unwrap().consumed);
        r.apply_results(&b, &[]).unwrap();
        assert_eq!(r.pending().unwrap().changes, 0);
        assert_eq!(rejected(&r).len(), 2);
    }
}
