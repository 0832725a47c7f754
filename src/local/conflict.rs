//! The hub's answers to uploads, applied locally: conflicts settled by the
//! table's policy, and the hub's rows kept aside while a local change to
//! their row is unanswered (`_tether_deferred`).
//!
//! A `conflict` answer carries the hub's row: its version, and its values or
//! that it was deleted. The local change it answers was made against an older
//! version. What the app wrote to the row *after the batch was read* (log
//! rows past the batch's `through`, unanswered, maybe already in flight) is
//! never overwritten by settling the conflict, under any policy:
//!
//! * `server_wins`: the hub's row is written locally and the local change is
//!   dropped. If the app wrote the row again, that newer write was made
//!   without the hub's row just the same: the local row is left as it is, the
//!   hub's row is deferred and the newer write goes out against the old
//!   version, so the hub answers it with a conflict settled by the same rule.
//! * `client_wins`: the local row stays, the row's version becomes the hub's
//!   and the row goes out again (a new log row; if the app wrote the row
//!   again, that pending write goes out instead).
//! * `merge_columns`: the columns the app wrote, in the conflicting change or
//!   in any later pending write (the union of their masks), keep the app's
//!   values; the others take the hub's. The merged row is written locally,
//!   the row's version becomes the hub's and the row goes out again with the
//!   union as its mask. A delete on either side is settled as `server_wins`
//!   unless the app wrote the row again: then the app's newest state (the
//!   row as the app left it, or its absence) goes out against the hub's
//!   version.
//!
//! `merge_columns` settles a row the app wrote again *against the hub's
//! version* instead of deferring it as `server_wins` does. A deferred newer
//! write would be answered with a conflict merged by its own mask only: the
//! columns of the conflicting change would take the hub's values, and a
//! delete on either side would drop the newer write. Settled now, the union
//! of the masks is recorded in the new log row, so whatever goes out next for
//! the row carries it, and the newer write is what goes out. A write already
//! in flight (read before the answer came, against the old version) is
//! answered with the same conflict; the new log row is pending then, so that
//! answer is settled with the same union, leaves the same row and sends it
//! once more: an extra change, never a lost one.
//!
//! Every settlement converges: it leaves the row either at the hub's row and
//! version with nothing pending (server wins), or with a pending change based
//! on the hub's version, which the hub applies unless another device's change
//! landed first (a new conflict, settled the same way), or with the hub's row
//! deferred behind a pending change whose own answer settles it. Settling
//! adds at most one change per answer; once the apps stop writing, the hub
//! applies the last change of each row and every device takes it.

use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use super::held::{self, Abort, Isolation};
use super::replica::{
    consume, delete_row, log_write, meta_u64, raise_anchor, row_fits, select_row, set_ver,
    set_ver_exact, set_ver_if_newer, sq, upsert_row, Batch, LocalError, Replica, ResultsApplied,
    Tbl,
};
use super::schema::Table;
use crate::config::ConflictPolicy;
use crate::proto::{
    decode_values, encode_key, encode_values, Change, ChangeResult, InvalidReason, Op, Outcome,
    RemoteChange, ServerRow, Value,
};

/// How one conflict is settled (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Settlement {
    /// The hub's row is written locally; the local change is dropped.
    TakeServer,
    /// The app wrote the row again: the hub's row waits in
    /// `_tether_deferred` and the newer write goes out against the old
    /// version, to meet the same policy.
    Defer,
    /// The local row goes out again against the hub's version: `merged`
    /// replaces it first (when given); a new log row with `mask` is added
    /// when `log` (otherwise a pending write of the app goes out).
    Resend {
        merged: Option<Vec<Value>>,
        mask: u64,
        log: bool,
    },
}

/// Decides how a conflict on one row is settled. `local` is the row now
/// (None: absent), `change_mask` the columns of the change the hub answered,
/// `later` the columns of the app's writes to the row after the batch was
/// read (None: it wrote none).
pub(super) fn decide(
    policy: ConflictPolicy,
    t: &Table,
    local: Option<&[Value]>,
    server: &ServerRow,
    change_mask: u64,
    later: Option<u64>,
) -> Settlement {
    let mask = change_mask | later.unwrap_or(0);
    match policy {
        ConflictPolicy::ServerWins if later.is_some() => Settlement::Defer,
        ConflictPolicy::ServerWins => Settlement::TakeServer,
        ConflictPolicy::ClientWins => Settlement::Resend {
            merged: None,
            mask,
            log: later.is_none(),
        },
        ConflictPolicy::MergeColumns => match local {
            Some(local) if !server.deleted => Settlement::Resend {
                merged: Some(merge(t, local, &server.values, mask)),
                mask,
                log: true,
            },
            // A delete on either side: server_wins, unless the app wrote the
            // row again; then its newest state goes out as it is.
            _ if later.is_none() => Settlement::TakeServer,
            _ => Settlement::Resend {
                merged: None,
                mask,
                log: true,
            },
        },
    }
}

/// The local row with the hub's values in the columns outside `mask` (key
/// columns are the same on both sides).
fn merge(t: &Table, local: &[Value], server: &[Value], mask: u64) -> Vec<Value> {
    local
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let mine = t.is_key(i) || mask & (Table::mask_bit(i) as u64) != 0;
            match server.get(i) {
                Some(s) if !mine => s.clone(),
                _ => v.clone(),
            }
        })
        .collect()
}

impl Replica {
    /// Applies the hub's answer to an upload: consumes the batch's log rows,
    /// resolves conflicts by policy (see the module docs), moves invalid
    /// changes to `_tether_rejected`. A batch the hub could not store is left
    /// in the log whole, to be sent again.
    ///
    /// A hub row the local database refuses (the server's row of a conflict,
    /// a deferred row) is held like a refused remote change (see
    /// [`super::held`]) and the answer still applies.
    pub fn apply_results(
        &mut self,
        batch: &Batch,
        results: &[ChangeResult],
    ) -> Result<ResultsApplied, LocalError> {
        if results
            .iter()
            .any(|r| matches!(r.outcome, Outcome::MaterializeError { .. }))
        {
            return Ok(ResultsApplied::default());
        }
        let mut iso = Isolation::default();
        loop {
            iso.begin();
            match self.results_tx(&mut iso, batch, results) {
                Ok(done) => {
                    self.record_consumed(batch.through);
                    return Ok(done);
                }
                Err(abort) => iso.after(abort).map_err(sq(&self.name))?,
            }
        }
    }

    fn results_tx(
        &self,
        iso: &mut Isolation,
        batch: &Batch,
        results: &[ChangeResult],
    ) -> Result<ResultsApplied, Abort> {
        let mut done = ResultsApplied::default();
        let by_seq: HashMap<u64, &Change> = batch.changes.iter().map(|c| (c.seq, c)).collect();
        let tx = Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
        // Changes this file inherited from the file it is a copy of (see
        // `identity`): the original may have sent them already, so they
        // never win over the hub's newer row, whatever the table's policy.
        let inherited = meta_u64(&tx, "inherited_through")?;
        tx.execute("INSERT INTO _tether_applying (x) VALUES (1)", [])?;
        let any_deferred: bool =
            tx.query_row("SELECT EXISTS (SELECT 1 FROM _tether_deferred)", [], |r| {
                r.get(0)
            })?;
        let needs_keys = any_deferred
            || results
                .iter()
                .any(|r| !matches!(r.outcome, Outcome::Applied { .. }));
        // Rows the app wrote again after this batch was read, with the
        // columns it wrote.
        let later = if needs_keys {
            self.logged_after(&tx, batch.through)?
        } else {
            HashMap::new()
        };
        let mut newest: Option<(u64, &Change)> = None;
        for r in results {
            let Some(change) = by_seq.get(&r.seq) else {
                tracing::warn!(db = %self.name, seq = r.seq, "hub answered a change that was not sent; ignored");
                continue;
            };
            let Some(tbl) = self.tables.get(&change.table) else {
                continue; // read from a table no longer synced
            };
            let again = later.get(&(tbl.id, change.pk.clone())).copied();
            match &r.outcome {
                Outcome::Applied { version } => {
                    if newest.is_none_or(|(v, _)| *version > v) {
                        newest = Some((*version, *change));
                    }
                    // The row's version is recorded: while this identity
                    // lasts the hub would not call its next change a
                    // conflict anyway (it wrote the row last), but a file
                    // that takes a new identity (a copy, a restored backup)
                    // must send the version it really holds as `base`, or
                    // its own rows would all conflict.
                    if *version > 0 {
                        set_ver_if_newer(&tx, tbl, &change.pk, *version)?;
                    }
                    if any_deferred && again.is_none() {
                        apply_deferred(&tx, iso, tbl, &change.pk, *version)?;
                    }
                }
                Outcome::Conflict { server } => {
                    let policy = if change.seq <= inherited {
                        ConflictPolicy::ServerWins
                    } else {
                        tbl.policy
                    };
                    settle(&tx, iso, tbl, policy, change, server, again, &mut done)?;
                }
                Outcome::Invalid { reason, message } => {
                    reject(&tx, change, *reason, message)?;
                    done.rejected += 1;
                }
                Outcome::MaterializeError { .. } => unreachable!("handled above"),
            }
        }
        // One anchor per answer: the newest change it applied.
        if let Some((version, c)) = newest {
            raise_anchor(&tx, version, &c.table, c.op, &c.pk, &c.values)?;
        }
        done.consumed = consume(&tx, batch.through)?;
        tx.execute("DELETE FROM _tether_applying", [])?;
        tx.commit()?;
        Ok(done)
    }
}

/// Settles the conflict the hub answered `change` with; `later` as in
/// [`decide`].
#[allow(clippy::too_many_arguments)]
fn settle(
    c: &Connection,
    iso: &mut Isolation,
    t: &Tbl,
    policy: ConflictPolicy,
    change: &Change,
    server: &ServerRow,
    later: Option<u64>,
    done: &mut ResultsApplied,
) -> Result<(), Abort> {
    let pk = &change.pk;
    // The hub's row is its log's change at that version: known content.
    let op = if server.deleted {
        Op::Delete
    } else {
        Op::Upsert
    };
    raise_anchor(c, server.version, &t.t.name, op, pk, &server.values)?;
    let local = select_row(c, t, pk)?;
    match decide(policy, &t.t, local.as_deref(), server, change.mask, later) {
        Settlement::TakeServer => {
            let written = iso.attempt(c, || {
                write_server_row(c, t, pk, server)?;
                held::supersede(c, &t.t.name, pk, server.version)
            })?;
            match written {
                Ok(()) => done.server_rows_written += 1,
                Err(why) => hold_server_row(c, t, pk, server, &why)?,
            }
            apply_deferred(c, iso, t, pk, server.version)?;
        }
        Settlement::Defer => defer(c, t, pk, server_as_remote(server))?,
        Settlement::Resend { merged, mask, log } => {
            let op = if merged.is_some() || local.is_some() {
                1
            } else {
                2
            };
            let written = iso.attempt(c, || {
                if let Some(row) = &merged {
                    upsert_row(c, t, row)?;
                }
                set_ver_exact(c, t, pk, server.version)?;
                clear_deferred_upto(c, t, pk, server.version)?;
                if log {
                    log_write(c, t, pk, op, mask)?;
                }
                Ok(())
            })?;
            match written {
                Ok(()) => done.resent += 1,
                // The merged row cannot be written: the hub's row is held,
                // as with server_wins.
                Err(why) => hold_server_row(c, t, pk, server, &why)?,
            }
        }
    }
    Ok(())
}

/// Records a change the hub refused as invalid in `_tether_rejected`.
fn reject(
    c: &Connection,
    change: &Change,
    reason: InvalidReason,
    message: &str,
) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO _tether_rejected (seq, tbl, pk, op, vals, reason, message, at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, unixepoch())",
    )?
    .execute(params![
        change.seq as i64,
        change.table,
        encode_key(&change.pk),
        if change.op == Op::Upsert { 1 } else { 2 },
        encode_values(&change.values),
        reason.as_str(),
        message
    ])?;
    Ok(())
}

fn write_server_row(c: &Connection, t: &Tbl, pk: &[Value], s: &ServerRow) -> rusqlite::Result<()> {
    if s.deleted || !row_fits(&t.t, s.values.len()) {
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
pub(super) fn defer(
    c: &Connection,
    t: &Tbl,
    pk: &[Value],
    rc: RemoteChange,
) -> rusqlite::Result<()> {
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
/// row that arrived while the change was pending; holds it if refused.
fn apply_deferred(
    c: &Connection,
    iso: &mut Isolation,
    t: &Tbl,
    pk: &[Value],
    version: u64,
) -> Result<(), Abort> {
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
    let dv = dv as u64;
    if dv <= version {
        return Ok(());
    }
    let op = if op == 2 { Op::Delete } else { Op::Upsert };
    let values = match op {
        Op::Delete => Vec::new(),
        Op::Upsert => decode_values(&vals).unwrap_or_default(),
    };
    let written = iso.attempt(c, || {
        match op {
            Op::Delete => delete_row(c, t, pk)?,
            Op::Upsert if !row_fits(&t.t, values.len()) => {
                return Err(rusqlite::Error::ToSqlConversionFailure(
                    format!(
                        "the hub's row has {} values, the table has {} columns",
                        values.len(),
                        t.t.columns.len()
                    )
                    .into(),
                ));
            }
            Op::Upsert => upsert_row(c, t, &values)?,
        }
        set_ver(c, t, pk, dv)?;
        held::supersede(c, &t.t.name, pk, dv)
    })?;
    if let Err(why) = written {
        let reason = held::reason(&t.t.name, pk, &why);
        held::hold(c, &t.t.name, pk, dv, op, &values, &reason)?;
    }
    Ok(())
}

/// Holds the hub's row of a conflict that the local database refused.
fn hold_server_row(
    c: &Connection,
    t: &Tbl,
    pk: &[Value],
    s: &ServerRow,
    why: &str,
) -> rusqlite::Result<()> {
    let op = if s.deleted { Op::Delete } else { Op::Upsert };
    let reason = held::reason(&t.t.name, pk, why);
    held::hold(c, &t.t.name, pk, s.version, op, &s.values, &reason)
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::*;
    use crate::local::replica::get_ver;

    const A: u64 = 1 << 1;
    const B: u64 = 1 << 2;
    /// The mask of an insert: every column.
    const ALL: u64 = u64::MAX;

    /// What the app did to row 1 (`a0, b0, c0` at version 5) before the batch
    /// was read, and after it was read but before the hub's answer came.
    #[derive(Clone, Copy, Debug)]
    enum Local {
        /// Updated `a`; nothing after.
        Sent,
        /// Deleted the row; nothing after.
        SentDelete,
        /// Updated `a`, then deleted the row.
        DeletedAfter,
        /// Deleted the row, then inserted it again and updated `c`.
        Reinserted,
        /// Updated `a`, then `b`.
        OtherColumn,
        /// Updated `a`, then `b`, and the write to `b` was read in the next
        /// batch (in flight) before the answer came.
        InFlight,
    }

    /// The hub's row in the conflict answer, at version 7: another device
    /// updated `c`, or deleted the row.
    #[derive(Clone, Copy, Debug)]
    enum Server {
        Updated,
        Deleted,
    }

    type Row = Option<[&'static str; 3]>;

    /// The state after the answer: the local row, the next change read from
    /// the log after the batches in flight (op, values, base, mask), the
    /// row's recorded version and the version of a deferred hub row.
    #[derive(Debug, PartialEq)]
    struct After {
        row: Row,
        next: Option<(Op, Row, u64, u64)>,
        version: u64,
        deferred: Option<u64>,
    }

    fn int(i: i64) -> Value {
        Value::Integer(i)
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    fn values(r: [&str; 3]) -> Vec<Value> {
        let mut v = vec![int(1)];
        v.extend(r.iter().map(|s| text(s)));
        v
    }

    /// The values the tests write, to show rows as `&'static str`s.
    const WORDS: [&str; 8] = ["a0", "a1", "a2", "b0", "b2", "c0", "c2", "cS"];

    fn as_row(v: &[Value]) -> Row {
        let s = |i: usize| match &v[i] {
            Value::Text(t) => *WORDS.iter().find(|w| *w == t).expect("a known value"),
            other => panic!("unexpected {other:?}"),
        };
        Some([s(1), s(2), s(3)])
    }

    fn server_row(s: Server) -> ServerRow {
        match s {
            Server::Updated => ServerRow {
                version: 7,
                deleted: false,
                values: values(["a0", "b0", "cS"]),
            },
            Server::Deleted => ServerRow {
                version: 7,
                deleted: true,
                values: Vec::new(),
            },
        }
    }

    /// Table `t` with row 1 synced at version 5, nothing pending.
    fn setup(policy: ConflictPolicy) -> (tempfile::TempDir, Connection, Replica) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let app = Connection::open(&path).unwrap();
        app.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, b TEXT, c TEXT)")
            .unwrap();
        let mut r = Replica::open("t", &path, &[("t".into(), policy)]).unwrap();
        r.apply_remote(
            &[RemoteChange {
                version: 5,
                table: "t".into(),
                op: Op::Upsert,
                pk: vec![int(1)],
                values: values(["a0", "b0", "c0"]),
            }],
            5,
        )
        .unwrap();
        assert_eq!(r.pending().unwrap().changes, 0);
        (dir, app, r)
    }

    fn conflict(b: &Batch, server: ServerRow) -> Vec<ChangeResult> {
        assert_eq!(b.changes.len(), 1, "{b:?}");
        vec![ChangeResult {
            seq: b.changes[0].seq,
            outcome: Outcome::Conflict { server },
        }]
    }

    fn state(r: &mut Replica, app: &Connection, after: u64) -> After {
        let row: Row = app
            .query_row("SELECT id, a, b, c FROM t WHERE id = 1", [], |row| {
                (0..4).map(|i| row.get::<_, Value>(i)).collect()
            })
            .optional()
            .unwrap()
            .and_then(|v: Vec<Value>| as_row(&v));
        let next = r.read_batch(after, 100, 1 << 20).unwrap();
        assert!(next.changes.len() <= 1, "{next:?}");
        let next = next.changes.first().map(|c| {
            let vals = (c.op == Op::Upsert).then(|| as_row(&c.values)).flatten();
            (c.op, vals, c.base, c.mask)
        });
        let t = r.tbl("t").unwrap();
        let version = get_ver(&r.conn, t, &[int(1)]).unwrap();
        let deferred = r
            .conn
            .query_row("SELECT version FROM _tether_deferred", [], |row| {
                row.get::<_, i64>(0)
            })
            .optional()
            .unwrap()
            .map(|v| v as u64);
        After {
            row,
            next,
            version,
            deferred,
        }
    }

    /// Plays `local` against `server` under `policy`: the state after the
    /// answer, and the batch still in flight (for [`Local::InFlight`]).
    fn play(
        policy: ConflictPolicy,
        local: Local,
        server: Server,
    ) -> (tempfile::TempDir, Connection, Replica, Option<Batch>, After) {
        let (d, app, mut r) = setup(policy);
        let first = match local {
            Local::SentDelete | Local::Reinserted => "DELETE FROM t WHERE id = 1",
            _ => "UPDATE t SET a = 'a1' WHERE id = 1",
        };
        app.execute_batch(first).unwrap();
        let b = r.read_batch(0, 100, 1 << 20).unwrap();
        let later = match local {
            Local::Sent | Local::SentDelete => "",
            Local::DeletedAfter => "DELETE FROM t WHERE id = 1",
            Local::Reinserted => {
                "INSERT INTO t VALUES (1, 'a2', 'b2', 'c0'); UPDATE t SET c = 'c2' WHERE id = 1"
            }
            Local::OtherColumn | Local::InFlight => "UPDATE t SET b = 'b2' WHERE id = 1",
        };
        app.execute_batch(later).unwrap();
        let in_flight = matches!(local, Local::InFlight)
            .then(|| r.read_batch(b.through, 100, 1 << 20).unwrap());
        let after = in_flight.as_ref().map_or(b.through, |f| f.through);
        r.apply_results(&b, &conflict(&b, server_row(server)))
            .unwrap();
        let s = state(&mut r, &app, after);
        (d, app, r, in_flight, s)
    }

    fn after(
        row: Row,
        next: Option<(Op, Row, u64, u64)>,
        version: u64,
        deferred: Option<u64>,
    ) -> After {
        After {
            row,
            next,
            version,
            deferred,
        }
    }

    /// Every policy, local row and hub row: the local row after the answer,
    /// what goes out next, the version recorded and what is deferred.
    #[test]
    fn a_conflict_never_overwrites_what_the_app_wrote_after_the_batch_was_read() {
        use ConflictPolicy::*;
        use Local::*;
        use Op::{Delete as Del, Upsert as Up};
        use Server::*;
        let s = Some(["a0", "b0", "cS"]);
        let sent = Some(["a1", "b0", "c0"]);
        let again = Some(["a2", "b2", "c2"]);
        let both = Some(["a1", "b2", "c0"]);
        let merged = Some(["a1", "b0", "cS"]);
        let merged_both = Some(["a1", "b2", "cS"]);
        let gone = None;
        let nothing = None;
        #[rustfmt::skip]
        let cells = [
            // server_wins: the hub's row, unless the app wrote again; then
            // the newer write goes out against version 5, the hub's row waits.
            (ServerWins, Sent, Updated,         after(s, nothing, 7, None)),
            (ServerWins, Sent, Deleted,         after(gone, nothing, 7, None)),
            (ServerWins, SentDelete, Updated,   after(s, nothing, 7, None)),
            (ServerWins, SentDelete, Deleted,   after(gone, nothing, 7, None)),
            (ServerWins, DeletedAfter, Updated, after(gone, Some((Del, gone, 5, 0)), 5, Some(7))),
            (ServerWins, DeletedAfter, Deleted, after(gone, Some((Del, gone, 5, 0)), 5, Some(7))),
            (ServerWins, Reinserted, Updated,   after(again, Some((Up, again, 5, ALL)), 5, Some(7))),
            (ServerWins, Reinserted, Deleted,   after(again, Some((Up, again, 5, ALL)), 5, Some(7))),
            (ServerWins, OtherColumn, Updated,  after(both, Some((Up, both, 5, B)), 5, Some(7))),
            (ServerWins, OtherColumn, Deleted,  after(both, Some((Up, both, 5, B)), 5, Some(7))),
            (ServerWins, InFlight, Updated,     after(both, nothing, 5, Some(7))),
            (ServerWins, InFlight, Deleted,     after(both, nothing, 5, Some(7))),
            // client_wins: the local row stays and goes out on version 7.
            (ClientWins, Sent, Updated,         after(sent, Some((Up, sent, 7, A)), 7, None)),
            (ClientWins, Sent, Deleted,         after(sent, Some((Up, sent, 7, A)), 7, None)),
            (ClientWins, SentDelete, Updated,   after(gone, Some((Del, gone, 7, 0)), 7, None)),
            (ClientWins, SentDelete, Deleted,   after(gone, Some((Del, gone, 7, 0)), 7, None)),
            (ClientWins, DeletedAfter, Updated, after(gone, Some((Del, gone, 7, 0)), 7, None)),
            (ClientWins, DeletedAfter, Deleted, after(gone, Some((Del, gone, 7, 0)), 7, None)),
            (ClientWins, Reinserted, Updated,   after(again, Some((Up, again, 7, ALL)), 7, None)),
            (ClientWins, Reinserted, Deleted,   after(again, Some((Up, again, 7, ALL)), 7, None)),
            (ClientWins, OtherColumn, Updated,  after(both, Some((Up, both, 7, B)), 7, None)),
            (ClientWins, OtherColumn, Deleted,  after(both, Some((Up, both, 7, B)), 7, None)),
            (ClientWins, InFlight, Updated,     after(both, nothing, 7, None)),
            (ClientWins, InFlight, Deleted,     after(both, nothing, 7, None)),
            // merge_columns: the app's columns (the change's and the later
            // writes') keep its values, the others take the hub's; a delete
            // on either side is server_wins unless the app wrote again.
            (MergeColumns, Sent, Updated,         after(merged, Some((Up, merged, 7, A)), 7, None)),
            (MergeColumns, Sent, Deleted,         after(gone, nothing, 7, None)),
            (MergeColumns, SentDelete, Updated,   after(s, nothing, 7, None)),
            (MergeColumns, SentDelete, Deleted,   after(gone, nothing, 7, None)),
            (MergeColumns, DeletedAfter, Updated, after(gone, Some((Del, gone, 7, A)), 7, None)),
            (MergeColumns, DeletedAfter, Deleted, after(gone, Some((Del, gone, 7, A)), 7, None)),
            (MergeColumns, Reinserted, Updated,   after(again, Some((Up, again, 7, ALL)), 7, None)),
            (MergeColumns, Reinserted, Deleted,   after(again, Some((Up, again, 7, ALL)), 7, None)),
            (MergeColumns, OtherColumn, Updated,  after(merged_both, Some((Up, merged_both, 7, A | B)), 7, None)),
            (MergeColumns, OtherColumn, Deleted,  after(both, Some((Up, both, 7, A | B)), 7, None)),
            (MergeColumns, InFlight, Updated,     after(merged_both, Some((Up, merged_both, 7, A | B)), 7, None)),
            (MergeColumns, InFlight, Deleted,     after(both, Some((Up, both, 7, A | B)), 7, None)),
        ];
        let mut wrong = Vec::new();
        for (policy, local, server, want) in cells {
            let (.., got) = play(policy, local, server);
            if got != want {
                wrong.push(format!(
                    "{policy:?} x {local:?} x {server:?}:\n   got {got:?}\n  want {want:?}"
                ));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} cells differ:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
    }

    /// A write already in flight when the first conflict is settled meets the
    /// same rule when its own answer (the same conflict) comes: under
    /// merge_columns the row keeps the app's columns even against a delete.
    #[test]
    fn a_write_in_flight_meets_the_same_rule_when_its_own_conflict_is_answered() {
        use ConflictPolicy::*;
        use Server::*;
        let s = Some(["a0", "b0", "cS"]);
        let both = Some(["a1", "b2", "c0"]);
        let merged_both = Some(["a1", "b2", "cS"]);
        #[rustfmt::skip]
        let cells = [
            (ServerWins, Updated,   after(s, None, 7, None)),
            (ServerWins, Deleted,   after(None, None, 7, None)),
            (ClientWins, Updated,   after(both, Some((Op::Upsert, both, 7, B)), 7, None)),
            (ClientWins, Deleted,   after(both, Some((Op::Upsert, both, 7, B)), 7, None)),
            (MergeColumns, Updated, after(merged_both, Some((Op::Upsert, merged_both, 7, A | B)), 7, None)),
            (MergeColumns, Deleted, after(both, Some((Op::Upsert, both, 7, A | B)), 7, None)),
        ];
        for (policy, server, want) in cells {
            let (_d, app, mut r, in_flight, _) = play(policy, Local::InFlight, server);
            let second = in_flight.unwrap();
            r.apply_results(&second, &conflict(&second, server_row(server)))
                .unwrap();
            let got = state(&mut r, &app, second.through);
            assert_eq!(got, want, "{policy:?} x {server:?}");
        }
    }
}
