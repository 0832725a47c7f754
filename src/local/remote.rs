//! Applying the hub's changes to the local database, and applying the held
//! ones again (see [`super::held`]).

use std::collections::HashMap;

use rusqlite::{Transaction, TransactionBehavior};

use super::conflict::defer;
use super::evolve;
use super::held::{self, Abort, HeldChange, Isolation, RemoteApplied, RetryReport};
use super::replica::{
    delete_row, get_ver, meta_u64, raise_anchor, row_fits, set_ver_at_least, set_ver_if_newer, sq,
    upsert_row, LocalError, Replica, Tbl,
};
use crate::proto::{decode_values, Op, RemoteChange};

/// What one pass over a list of hub changes did.
#[derive(Debug, Default)]
struct Counts {
    applied: u64,
    held: u64,
    /// Not newer than the row's local version.
    stale: u64,
    /// Kept aside while the row's local change is unanswered.
    deferred: u64,
}

impl Replica {
    /// Applies changes pushed by the hub and moves the cursor to `up_to`, in
    /// one transaction. Rows with a pending local change keep the local value;
    /// the hub's row is kept aside until the local change is answered.
    ///
    /// A change the local database refuses (see [`held::is_refusal`]), for a
    /// table not synced here or with the wrong number of values is held in
    /// `_tether_held` and the rest of the batch applies; its row keeps its
    /// version, so a later version still applies (and drops the held entry).
    /// Errors about the database fail the whole call.
    pub fn apply_remote(
        &mut self,
        changes: &[RemoteChange],
        up_to: u64,
    ) -> Result<RemoteApplied, LocalError> {
        let n = self.run_remote(changes, Some(up_to))?;
        Ok(RemoteApplied {
            applied: n.applied,
            held: n.held,
        })
    }

    /// Applies the held changes again: those whose row has moved past their
    /// version are dropped, those that now apply are removed, the others stay
    /// with one more attempt and the new reason.
    pub fn retry_held(&mut self) -> Result<RetryReport, LocalError> {
        let entries = held::entries(&self.conn).map_err(sq(&self.name))?;
        let changes: Vec<RemoteChange> = entries
            .into_iter()
            .map(|en| RemoteChange {
                version: en.version,
                op: en.op,
                // A damaged entry decodes to no values and is held again
                // as the wrong shape.
                values: match en.op {
                    Op::Upsert => decode_values(&en.vals).unwrap_or_default(),
                    Op::Delete => Vec::new(),
                },
                table: en.table,
                pk: en.pk,
            })
            .collect();
        let n = self.run_remote(&changes, None)?;
        Ok(RetryReport {
            applied: n.applied,
            superseded: n.stale,
            deferred: n.deferred,
            still_held: n.held,
        })
    }

    /// Up to `limit` held changes, oldest first.
    pub fn held(&self, limit: usize) -> Result<Vec<HeldChange>, LocalError> {
        held::list(&self.conn, limit).map_err(sq(&self.name))
    }

    /// The table of a hub change, if the change fits it.
    fn fitting(&self, c: &RemoteChange) -> Result<&Tbl, LocalError> {
        let tbl = self.tbl(&c.table)?;
        if c.op == Op::Upsert && !row_fits(&tbl.t, c.values.len()) {
            return Err(LocalError::Shape {
                db: self.name.clone(),
                table: c.table.clone(),
                got: c.values.len(),
                want: tbl.t.columns.len(),
            });
        }
        Ok(tbl)
    }

    /// Applies `changes` in one transaction, run again with each write
    /// isolated if one is refused; moves the cursor to `up_to` if given
    /// (no cursor means a retry of held changes).
    fn run_remote(
        &self,
        changes: &[RemoteChange],
        up_to: Option<u64>,
    ) -> Result<Counts, LocalError> {
        let mut iso = Isolation::default();
        loop {
            iso.begin();
            match self.remote_tx(&mut iso, changes, up_to) {
                Ok(n) => return Ok(n),
                Err(abort) => iso.after(abort).map_err(sq(&self.name))?,
            }
        }
    }

    fn remote_tx(
        &self,
        iso: &mut Isolation,
        changes: &[RemoteChange],
        up_to: Option<u64>,
    ) -> Result<Counts, Abort> {
        let tx = Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
        tx.execute("INSERT INTO _tether_applying (x) VALUES (1)", [])?;
        let consumed = meta_u64(&tx, "consumed")?;
        let (pending, any_held) = if changes.is_empty() {
            (HashMap::new(), false)
        } else {
            (self.logged_after(&tx, consumed)?, held::any(&tx)?)
        };
        let retrying = up_to.is_none();
        // Tables downloaded again after an upgrade: a change up to the mark
        // applies at the version the row already has (its values may hold
        // columns this device did not have when it first got it).
        let refetching = if changes.is_empty() {
            HashMap::new()
        } else {
            evolve::refetching(&tx)?
        };
        let mut n = Counts::default();
        for c in changes {
            let hold = |why: &str| {
                let reason = held::reason(&c.table, &c.pk, why);
                held::hold(&tx, &c.table, &c.pk, c.version, c.op, &c.values, &reason)
            };
            let tbl = match self.fitting(c) {
                Ok(t) => t,
                Err(why) => {
                    hold(&why.to_string())?;
                    n.held += 1;
                    continue;
                }
            };
            if !pending.is_empty() && pending.contains_key(&(tbl.id, c.pk.clone())) {
                if c.version > get_ver(&tx, tbl, &c.pk)? {
                    defer(&tx, tbl, &c.pk, c.clone())?;
                    n.deferred += 1;
                    if any_held {
                        held::supersede(&tx, &c.table, &c.pk, c.version)?;
                    }
                } else {
                    n.stale += 1;
                    if retrying {
                        held::supersede(&tx, &c.table, &c.pk, c.version)?;
                    }
                }
                continue;
            }
            // One statement moves the version forward and tells whether the
            // change is new.
            let again = refetching.get(&c.table).is_some_and(|&u| c.version <= u);
            let written = iso.attempt(&tx, || {
                let newer = if again {
                    set_ver_at_least(&tx, tbl, &c.pk, c.version)?
                } else {
                    set_ver_if_newer(&tx, tbl, &c.pk, c.version)?
                };
                if !newer {
                    return Ok(false);
                }
                match c.op {
                    Op::Upsert => upsert_row(&tx, tbl, &c.values)?,
                    Op::Delete => delete_row(&tx, tbl, &c.pk)?,
                }
                Ok(true)
            })?;
            match written {
                Ok(true) => {
                    n.applied += 1;
                    if any_held {
                        held::supersede(&tx, &c.table, &c.pk, c.version)?;
                    }
                }
                Ok(false) => {
                    n.stale += 1;
                    if retrying {
                        held::supersede(&tx, &c.table, &c.pk, c.version)?;
                    }
                }
                Err(why) => {
                    hold(&why)?;
                    n.held += 1;
                }
            }
        }
        if let (Some(_), Some(last)) = (up_to, changes.last()) {
            raise_anchor(
                &tx,
                last.version,
                &last.table,
                last.op,
                &last.pk,
                &last.values,
            )?;
        }
        if let Some(up_to) = up_to {
            tx.prepare_cached(
                "INSERT INTO _tether_meta (key, value) VALUES ('cursor', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
            )?
            .execute([up_to as i64])?;
            evolve::end_refetch(&tx, meta_u64(&tx, "cursor")?)?;
        }
        tx.execute("DELETE FROM _tether_applying", [])?;
        tx.commit()?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::*;
    use crate::config::ConflictPolicy;
    use crate::proto::Value;

    /// A database with `u` (UNIQUE `name`), `s` (STRICT, INTEGER `n`) and
    /// `g` (a trigger refusing negative values), all synced; the rows they
    /// held at open are answered.
    fn setup() -> (tempfile::TempDir, Connection, Replica) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let app = Connection::open(&path).unwrap();
        app.execute_batch(
            "CREATE TABLE u (id INTEGER PRIMARY KEY, name TEXT UNIQUE);
             CREATE TABLE s (id INTEGER PRIMARY KEY, n INTEGER) STRICT;
             CREATE TABLE g (id INTEGER PRIMARY KEY, v INTEGER);
             CREATE TRIGGER g_positive BEFORE INSERT ON g WHEN NEW.v < 0
             BEGIN SELECT RAISE(ABORT, 'v must not be negative'); END;
             CREATE TRIGGER g_small BEFORE INSERT ON g WHEN NEW.v > 1000
             BEGIN SELECT RAISE(ROLLBACK, 'v too large'); END;
             INSERT INTO u VALUES (1, 'taken');",
        )
        .unwrap();
        let tables: Vec<(String, ConflictPolicy)> = ["u", "s", "g"]
            .iter()
            .map(|t| (t.to_string(), ConflictPolicy::ServerWins))
            .collect();
        let mut r = Replica::open("t", &path, &tables).unwrap();
        let b = r.read_batch(0, 100, 1 << 20).unwrap();
        r.apply_results(&b, &[]).unwrap();
        (dir, app, r)
    }

    fn upsert(table: &str, version: u64, values: Vec<Value>) -> RemoteChange {
        RemoteChange {
            version,
            table: table.into(),
            op: Op::Upsert,
            pk: vec![values[0].clone()],
            values,
        }
    }

    fn int(i: i64) -> Value {
        Value::Integer(i)
    }

    fn text(t: &str) -> Value {
        Value::Text(t.into())
    }

    fn count(app: &Connection, sql: &str) -> i64 {
        app.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    /// Applies `bad` between two good changes and checks that only `bad`
    /// is held, the good ones applied and the cursor moved.
    fn held_alone(bad: RemoteChange, why: &str) {
        let (_d, app, mut r) = setup();
        let batch = [
            upsert("u", 1, vec![int(10), text("first")]),
            bad.clone(),
            upsert("u", 3, vec![int(11), text("last")]),
        ];
        let done = r.apply_remote(&batch, 3).unwrap();
        assert_eq!(
            done,
            RemoteApplied {
                applied: 2,
                held: 1
            }
        );
        assert_eq!(r.cursor().unwrap(), 3);
        assert_eq!(
            count(&app, "SELECT count(*) FROM u WHERE id IN (10, 11)"),
            2
        );
        let held = r.held(10).unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].table, bad.table);
        assert_eq!(held[0].version, bad.version);
        assert_eq!(held[0].attempts, 1);
        assert!(held[0].reason.contains(why), "{}", held[0].reason);
        assert_eq!(r.pending().unwrap().held, 1);
        assert_eq!(
            r.pending().unwrap().changes,
            0,
            "tether's writes not captured"
        );
    }

    #[test]
    fn a_unique_violation_is_held_and_the_batch_applies() {
        held_alone(
            upsert("u", 2, vec![int(2), text("taken")]),
            "UNIQUE constraint failed",
        );
    }

    #[test]
    fn a_value_of_the_wrong_type_in_a_strict_table_is_held() {
        held_alone(
            upsert("s", 2, vec![int(1), text("not a number")]),
            "cannot store",
        );
    }

    #[test]
    fn a_trigger_raise_is_held() {
        held_alone(
            upsert("g", 2, vec![int(1), int(-5)]),
            "v must not be negative",
        );
    }

    #[test]
    fn a_trigger_raise_that_rolls_back_the_transaction_is_held() {
        held_alone(upsert("g", 2, vec![int(1), int(5000)]), "v too large");
    }

    #[test]
    fn a_change_for_a_table_not_synced_here_is_held() {
        held_alone(upsert("ghost", 2, vec![int(1)]), "not synced here");
    }

    #[test]
    fn a_change_of_the_wrong_shape_is_held() {
        let keyless = RemoteChange {
            version: 2,
            table: "u".into(),
            op: Op::Upsert,
            pk: vec![int(3)],
            values: Vec::new(),
        };
        held_alone(keyless, "with 0 values");
    }

    /// A row from a device with fewer columns writes those and keeps the
    /// others; one from a device with more columns writes the ones this
    /// table has.
    #[test]
    fn rows_of_another_length_write_the_columns_both_sides_have() {
        let (_d, app, mut r) = setup();
        r.apply_remote(&[upsert("u", 2, vec![int(5), text("five")])], 2)
            .unwrap();
        app.execute("UPDATE u SET name = 'kept' WHERE id = 5", [])
            .unwrap();
        let b = r.read_batch(0, 100, 1 << 20).unwrap();
        r.apply_results(&b, &[]).unwrap();
        // Shorter: only the key; the name stays.
        let done = r.apply_remote(&[upsert("u", 3, vec![int(5)])], 3).unwrap();
        assert_eq!(done.applied, 1);
        assert_eq!(
            count(
                &app,
                "SELECT count(*) FROM u WHERE id = 5 AND name = 'kept'"
            ),
            1
        );
        // Longer: the extra value is for a column this app does not have.
        let done = r
            .apply_remote(
                &[upsert("u", 4, vec![int(6), text("six"), text("extra")])],
                4,
            )
            .unwrap();
        assert_eq!(
            done,
            RemoteApplied {
                applied: 1,
                held: 0
            }
        );
        assert_eq!(
            count(&app, "SELECT count(*) FROM u WHERE id = 6 AND name = 'six'"),
            1
        );
    }

    #[test]
    fn a_held_row_keeps_its_version_and_a_later_version_supersedes() {
        let (_d, app, mut r) = setup();
        r.apply_remote(&[upsert("u", 5, vec![int(2), text("taken")])], 5)
            .unwrap();
        // A newer refused version replaces the entry.
        r.apply_remote(&[upsert("u", 6, vec![int(2), text("taken")])], 6)
            .unwrap();
        let held = r.held(10).unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].version, 6);
        assert_eq!(held[0].key, "[2]");
        // The row's version did not move: version 6 with a free name applies.
        let done = r
            .apply_remote(&[upsert("u", 6, vec![int(2), text("free")])], 7)
            .unwrap();
        assert_eq!(done.applied, 1);
        assert_eq!(
            count(
                &app,
                "SELECT count(*) FROM u WHERE id = 2 AND name = 'free'"
            ),
            1
        );
        assert!(r.held(10).unwrap().is_empty(), "superseded");
    }

    #[test]
    fn retry_applies_a_held_change_once_the_cause_is_gone() {
        let (_d, app, mut r) = setup();
        r.apply_remote(&[upsert("u", 5, vec![int(2), text("taken")])], 5)
            .unwrap();
        let again = r.retry_held().unwrap();
        assert_eq!(
            again,
            RetryReport {
                still_held: 1,
                ..Default::default()
            }
        );
        let held = r.held(10).unwrap();
        assert_eq!(held[0].attempts, 2);
        app.execute("DELETE FROM u WHERE id = 1", []).unwrap();
        let done = r.retry_held().unwrap();
        assert_eq!(
            done,
            RetryReport {
                applied: 1,
                ..Default::default()
            }
        );
        assert!(r.held(10).unwrap().is_empty());
        assert_eq!(
            count(
                &app,
                "SELECT count(*) FROM u WHERE id = 2 AND name = 'taken'"
            ),
            1
        );
    }

    #[test]
    fn retry_drops_a_held_change_its_row_moved_past() {
        let (_d, _app, mut r) = setup();
        r.apply_remote(&[upsert("u", 5, vec![int(2), text("taken")])], 5)
            .unwrap();
        // The row moved past the held version (a later change applied
        // while the entry stayed, as after a restart with another config).
        r.conn
            .execute(
                "INSERT INTO \"_tether_ver_u\" (k0, version) VALUES (2, 8)",
                [],
            )
            .unwrap();
        let done = r.retry_held().unwrap();
        assert_eq!(
            done,
            RetryReport {
                superseded: 1,
                ..Default::default()
            }
        );
        assert!(r.held(10).unwrap().is_empty());
    }

    #[test]
    fn a_conflict_whose_server_row_is_refused_is_held_and_the_answer_applies() {
        use crate::proto::{ChangeResult, Outcome, ServerRow};
        let (_d, app, mut r) = setup();
        app.execute("INSERT INTO u VALUES (3, 'mine')", []).unwrap();
        let b = r.read_batch(0, 100, 1 << 20).unwrap();
        assert_eq!(b.changes.len(), 1);
        let server = ServerRow {
            version: 4,
            deleted: false,
            values: vec![int(3), text("taken")],
        };
        let done = r
            .apply_results(
                &b,
                &[ChangeResult {
                    seq: b.changes[0].seq,
                    outcome: Outcome::Conflict { server },
                }],
            )
            .unwrap();
        assert_eq!(done.server_rows_written, 0);
        assert_eq!(done.consumed, 1);
        assert_eq!(r.pending().unwrap().changes, 0);
        let held = r.held(10).unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!((held[0].version, held[0].key.as_str()), (4, "[3]"));
        assert!(held[0].reason.contains("UNIQUE"), "{}", held[0].reason);
        assert_eq!(
            count(
                &app,
                "SELECT count(*) FROM u WHERE id = 3 AND name = 'mine'"
            ),
            1
        );
    }
}
