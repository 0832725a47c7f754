//! The accounting of a schedule: the fate of every committed write, found in
//! the hub's log, judged by the conflict policy's rule; and the duplicates
//! the log must not hold.
//!
//! A write is *applied* when the hub's log holds its value in its row and
//! column (an insert: one of its values; a delete: a delete, by its device
//! or by another one first, after the first change holding a value of the
//! row it deleted, or nothing when none of that row reached the hub). A write the same
//! device's app overwrote before it left (the same column, or the row
//! deleted or inserted again) may have been folded into the later one: it is
//! *superseded*. Otherwise it was lost, and the policy says whether that is
//! allowed:
//!
//! * rows only one device writes (its private row, its appended rows):
//!   never;
//! * `server_wins`: when another device wrote the row;
//! * `client_wins`: never (the local row always goes out again);
//! * `merge_columns`: a column only its device writes, never; otherwise
//!   when another device wrote the row (on rows that are deleted, a delete
//!   on either side is settled as `server_wins`).

use std::collections::{BTreeMap, HashMap, HashSet};

use rusqlite::{Connection, OptionalExtension};
use serde::Serialize;

use super::workload::{self, single_writer, Op, Row, Write, CHURN};
use crate::config::ConflictPolicy;
use crate::proto::{decode_key, decode_values, Value};

/// One change in the hub's log.
#[derive(Clone, Debug)]
pub struct Entry {
    pub key: i64,
    /// None for a delete.
    pub row: Option<Row>,
    pub client_no: i64,
}

/// What the hub holds for the synced table.
#[derive(Debug, Default)]
pub struct Hub {
    /// In log order.
    pub log: Vec<Entry>,
    /// The live rows.
    pub rows: BTreeMap<i64, Row>,
    /// The dataset's head.
    pub head: u64,
}

/// The counts of one schedule (or of many, added up).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Tally {
    pub committed: u64,
    pub applied: u64,
    pub superseded: u64,
    /// Lost to a conflict, as the policy allows.
    pub lost: u64,
    pub lost_wrongly: u64,
    /// Databases that differ from the hub after healing, and values on the
    /// hub that no app wrote.
    pub divergent: u64,
    /// A change stored twice on the hub.
    pub duplicated: u64,
}

impl Tally {
    pub fn add(&mut self, o: &Tally) {
        self.committed += o.committed;
        self.applied += o.applied;
        self.superseded += o.superseded;
        self.lost += o.lost;
        self.lost_wrongly += o.lost_wrongly;
        self.divergent += o.divergent;
        self.duplicated += o.duplicated;
    }

    /// No write lost wrongly, no divergence, no duplicate.
    pub fn clean(&self) -> bool {
        self.lost_wrongly == 0 && self.divergent == 0 && self.duplicated == 0
    }
}

fn dataset_id(c: &Connection) -> rusqlite::Result<Option<(i64, u64)>> {
    c.query_row(
        "SELECT id, head FROM datasets WHERE name = ?1",
        [super::procs::DATASET],
        |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)),
    )
    .optional()
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Text(t) => Some(t.clone()),
        _ => None,
    }
}

fn decode(pk: &[u8], vals: &[u8]) -> anyhow::Result<(i64, Option<Row>)> {
    let key = match decode_key(pk)?[..] {
        [Value::Integer(k)] => k,
        ref other => anyhow::bail!("a key of the hub's log is not one integer: {other:?}"),
    };
    let vals = decode_values(vals)?;
    let row = (!vals.is_empty()).then(|| vals[1..].iter().map(text).collect());
    Ok((key, row))
}

/// Reads the hub's log, rows and head of table `t` from its store file.
pub fn read_hub(c: &Connection) -> anyhow::Result<Hub> {
    let Some((id, head)) = dataset_id(c)? else {
        return Ok(Hub::default());
    };
    let mut log = Vec::new();
    let mut st = c.prepare(&format!(
        "SELECT pk, op, vals, client_no FROM log_{id} WHERE tbl = 't' ORDER BY seq"
    ))?;
    let mut q = st.query([])?;
    while let Some(r) = q.next()? {
        let (key, row) = decode(&r.get::<_, Vec<u8>>(0)?, &r.get::<_, Vec<u8>>(2)?)?;
        let delete = r.get::<_, i64>(1)? == 2;
        log.push(Entry {
            key,
            row: if delete { None } else { row },
            client_no: r.get(3)?,
        });
    }
    let mut rows = BTreeMap::new();
    let mut st = c.prepare(&format!(
        "SELECT r.pk, l.vals FROM rows_{id} r JOIN log_{id} l ON l.seq = r.version
         WHERE r.tbl = 't' AND r.deleted = 0"
    ))?;
    let mut q = st.query([])?;
    while let Some(r) = q.next()? {
        let (key, row) = decode(&r.get::<_, Vec<u8>>(0)?, &r.get::<_, Vec<u8>>(1)?)?;
        rows.insert(key, row.unwrap_or_default());
    }
    Ok(Hub { log, rows, head })
}

/// The fate of one write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Applied,
    Superseded,
    Lost,
    LostWrongly,
}

/// Judges every write and counts duplicates; `problems` gets a line for
/// each write lost wrongly and each duplicate.
pub fn account(
    policy: ConflictPolicy,
    writes: &[Write],
    hub: &Hub,
    problems: &mut Vec<String>,
) -> Tally {
    let mut t = Tally::default();
    let by_key: HashMap<i64, Vec<&Entry>> = hub.log.iter().fold(HashMap::new(), |mut m, e| {
        m.entry(e.key).or_insert_with(Vec::new).push(e);
        m
    });
    let writers: HashMap<i64, HashSet<usize>> = writes.iter().fold(HashMap::new(), |mut m, w| {
        m.entry(w.key).or_default().insert(w.device);
        m
    });
    let empty = Vec::new();
    for (i, w) in writes.iter().enumerate() {
        t.committed += 1;
        let entries = by_key.get(&w.key).unwrap_or(&empty);
        let fate = fate(policy, w, &writes[i + 1..], entries, &writers);
        match fate {
            Fate::Applied => t.applied += 1,
            Fate::Superseded => t.superseded += 1,
            Fate::Lost => t.lost += 1,
            Fate::LostWrongly => {
                t.lost_wrongly += 1;
                problems.push(format!("write lost wrongly: {w:?}"));
            }
        }
    }
    t.duplicated = duplicates(hub, problems);
    t
}

/// Whether the row a delete removed (its values as the app deleted it)
/// is deleted on the hub: a delete follows the first change of the log
/// holding one of its values (every insert writes new values, so that
/// change is of the same row's life). When no change holds any, the row
/// never reached the hub (its app inserted it, then deleted it before it
/// left) and there is nothing to delete there.
fn delete_applied(deleted: &Row, entries: &[&Entry]) -> bool {
    let of_this_row = |e: &Entry| {
        e.row.as_ref().is_some_and(|r| {
            r.iter()
                .zip(deleted)
                .any(|(held, gone)| gone.is_some() && held == gone)
        })
    };
    match entries.iter().position(|e| of_this_row(e)) {
        None => true,
        Some(first) => entries[first..].iter().any(|e| e.row.is_none()),
    }
}

fn fate(
    policy: ConflictPolicy,
    w: &Write,
    later: &[Write],
    entries: &[&Entry],
    writers: &HashMap<i64, HashSet<usize>>,
) -> Fate {
    let holds = |col: usize, v: &str| {
        entries
            .iter()
            .any(|e| e.row.as_ref().is_some_and(|r| r[col].as_deref() == Some(v)))
    };
    let (applied, col) = match &w.op {
        Op::Update { col, value } => (holds(*col, value), Some(*col)),
        // Later updates of the same app may have replaced some columns
        // before the row left: any of its values on the hub counts.
        Op::Insert { row } => (
            row.iter()
                .enumerate()
                .any(|(c, v)| v.as_deref().is_some_and(|v| holds(c, v))),
            None,
        ),
        // A delete meeting a row another device deleted first has nothing
        // left to do: it is not sent again.
        Op::Delete { row } => (delete_applied(row, entries), None),
    };
    if applied {
        return Fate::Applied;
    }
    let superseded = later.iter().any(|l| {
        l.device == w.device
            && l.key == w.key
            && match (&l.op, col) {
                (Op::Update { col: c, .. }, Some(mine)) => *c == mine,
                (Op::Update { .. }, None) => false,
                (Op::Insert { .. } | Op::Delete { .. }, _) => true,
            }
    });
    if superseded {
        return Fate::Superseded;
    }
    let others_wrote = writers
        .get(&w.key)
        .is_some_and(|ds| ds.iter().any(|d| *d != w.device));
    let allowed = !single_writer(w.key)
        && others_wrote
        && match policy {
            ConflictPolicy::ServerWins => true,
            ConflictPolicy::ClientWins => false,
            ConflictPolicy::MergeColumns => CHURN.contains(&w.key) || col == Some(0),
        };
    if allowed {
        Fate::Lost
    } else {
        Fate::LostWrongly
    }
}

/// Changes stored twice: on a row only one device writes, which never meets
/// a conflict, two entries in a row with the same content (or a second
/// entry of an appended row).
fn duplicates(hub: &Hub, problems: &mut Vec<String>) -> u64 {
    let mut last: HashMap<i64, &Entry> = HashMap::new();
    let mut n = 0;
    for e in hub.log.iter().filter(|e| single_writer(e.key)) {
        let appended = e.key >= workload::append_key(0, 0);
        if let Some(prev) = last.insert(e.key, e) {
            if appended || prev.row == e.row {
                n += 1;
                problems.push(format!("a change stored twice on the hub: {e:?}"));
            }
        }
    }
    n
}

/// Counts the device files whose rows differ from the hub's, and the values
/// on the hub that no app wrote.
pub fn divergence(
    hub: &Hub,
    devices: &[BTreeMap<i64, Row>],
    writes: &[Write],
    problems: &mut Vec<String>,
) -> u64 {
    let mut n = 0;
    for (d, rows) in devices.iter().enumerate() {
        if *rows != hub.rows {
            n += 1;
            let differ: Vec<i64> = hub
                .rows
                .keys()
                .chain(rows.keys())
                .filter(|k| hub.rows.get(k) != rows.get(k))
                .copied()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            problems.push(format!(
                "device {d} differs from the hub in rows {differ:?}"
            ));
        }
    }
    let written: HashSet<(i64, usize, &str)> = writes
        .iter()
        .flat_map(|w| match &w.op {
            Op::Update { col, value } => vec![(w.key, *col, value.as_str())],
            Op::Insert { row } => row
                .iter()
                .enumerate()
                .filter_map(|(c, v)| v.as_deref().map(|v| (w.key, c, v)))
                .collect(),
            Op::Delete { .. } => vec![],
        })
        .collect();
    for (k, row) in &hub.rows {
        for (col, v) in row.iter().enumerate() {
            let v = v.as_deref().unwrap_or("NULL");
            if v != workload::seed_value(*k, col) && !written.contains(&(*k, col, v)) {
                n += 1;
                problems.push(format!(
                    "row {k} column {col} holds {v}, which no app wrote there"
                ));
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reliability::workload::private_key;

    fn update(device: usize, key: i64, col: usize, value: &str) -> Write {
        Write {
            device,
            key,
            op: Op::Update {
                col,
                value: value.into(),
            },
        }
    }

    fn entry(key: i64, shared: &str) -> Entry {
        Entry {
            key,
            row: Some(vec![Some(shared.into()), None, None, None]),
            client_no: 1,
        }
    }

    fn judge(policy: ConflictPolicy, writes: &[Write], log: Vec<Entry>) -> (Tally, Vec<String>) {
        let hub = Hub {
            log,
            ..Hub::default()
        };
        let mut problems = Vec::new();
        (account(policy, writes, &hub, &mut problems), problems)
    }

    #[test]
    fn a_write_missing_from_the_hub_is_lost_only_where_the_policy_allows() {
        let writes = [update(0, 1, 0, "a"), update(1, 1, 0, "b")];
        // b reached the hub, a did not: another device wrote the row.
        let log = || vec![entry(1, "b")];
        let (t, _) = judge(ConflictPolicy::ServerWins, &writes, log());
        assert_eq!((t.applied, t.lost, t.lost_wrongly), (1, 1, 0));
        let (t, _) = judge(ConflictPolicy::MergeColumns, &writes, log());
        assert_eq!(
            (t.applied, t.lost, t.lost_wrongly),
            (1, 1, 0),
            "shared column"
        );
        let (t, problems) = judge(ConflictPolicy::ClientWins, &writes, log());
        assert_eq!((t.applied, t.lost, t.lost_wrongly), (1, 0, 1));
        assert!(problems[0].contains("lost wrongly"), "{problems:?}");
        // A column only its device writes is never lost under merge_columns.
        let own = [update(0, 1, 1, "a"), update(1, 1, 0, "b")];
        let (t, _) = judge(ConflictPolicy::MergeColumns, &own, log());
        assert_eq!(t.lost_wrongly, 1);
    }

    #[test]
    fn a_private_write_is_never_lost_unless_its_app_overwrote_it() {
        let k = private_key(0);
        let writes = [update(0, k, 0, "a"), update(0, k, 0, "b")];
        let (t, _) = judge(ConflictPolicy::ServerWins, &writes, vec![entry(k, "b")]);
        assert_eq!((t.applied, t.superseded, t.lost_wrongly), (1, 1, 0));
        let (t, _) = judge(ConflictPolicy::ServerWins, &writes, vec![entry(k, "a")]);
        assert_eq!(
            (t.applied, t.lost_wrongly),
            (1, 1),
            "the last write vanished"
        );
    }

    #[test]
    fn a_delete_counts_when_the_row_it_removed_is_deleted_on_the_hub() {
        let gone = |shared: &str| Write {
            device: 0,
            key: 4,
            op: Op::Delete {
                row: vec![Some(shared.into()), None, None, None],
            },
        };
        let deleted = Entry {
            key: 4,
            row: None,
            client_no: 2,
        };
        let (t, _) = judge(
            ConflictPolicy::ClientWins,
            &[gone("a")],
            vec![entry(4, "a"), deleted.clone()],
        );
        assert_eq!(t.applied, 1);
        // A delete of an earlier life of the row does not count.
        let (t, _) = judge(
            ConflictPolicy::ClientWins,
            &[gone("a")],
            vec![deleted.clone(), entry(4, "a")],
        );
        assert_eq!(t.lost_wrongly, 1);
        // A row that never reached the hub has nothing to delete there.
        let (t, _) = judge(
            ConflictPolicy::ClientWins,
            &[gone("z")],
            vec![entry(4, "a")],
        );
        assert_eq!(t.applied, 1);
    }

    #[test]
    fn a_change_stored_twice_on_a_private_row_is_a_duplicate() {
        let k = private_key(2);
        let writes = [update(2, k, 0, "a")];
        let (t, problems) = judge(
            ConflictPolicy::ClientWins,
            &writes,
            vec![entry(k, "a"), entry(k, "a")],
        );
        assert_eq!((t.applied, t.duplicated), (1, 1));
        assert!(problems[0].contains("stored twice"), "{problems:?}");
        let (t, _) = judge(
            ConflictPolicy::ClientWins,
            &writes,
            vec![entry(k, "a"), entry(k, "x"), entry(k, "a")],
        );
        assert_eq!(
            t.duplicated, 0,
            "a row going back to a value is no duplicate"
        );
    }
}
