//! The apps of a schedule: each device's app writes its SQLite file
//! directly (as any app would), in short bursts, while faults happen. A
//! write is recorded only after its commit returned, and every value it
//! writes is unique, so the ledger can find each write on the hub.

use std::path::Path;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rusqlite::{params, Connection, OptionalExtension};

/// The synced table: `shared` is written by every device, `o<d>` by device
/// `d` only (on the stable rows).
pub const SCHEMA: &str =
    "CREATE TABLE t (id INTEGER PRIMARY KEY, shared TEXT, o0 TEXT, o1 TEXT, o2 TEXT)";
/// The columns after the key.
pub const COLUMNS: usize = 4;
/// Rows every device updates and none deletes.
pub const STABLE: [i64; 3] = [1, 2, 3];
/// Rows every device updates, deletes and inserts again.
pub const CHURN: [i64; 3] = [4, 5, 6];

/// The row of device `d` that no other device writes.
pub fn private_key(d: usize) -> i64 {
    10 + d as i64
}

/// The `n`th row device `d` appends (written once, never again).
pub fn append_key(d: usize, n: u64) -> i64 {
    1_000_000 * (d as i64 + 1) + n as i64
}

/// Whether only one device ever writes row `key`.
pub fn single_writer(key: i64) -> bool {
    !STABLE.contains(&key) && !CHURN.contains(&key)
}

/// The value row `k` starts with in column `col`.
pub fn seed_value(k: i64, col: usize) -> String {
    format!("seed-k{k}c{col}")
}

/// The columns after the key, NULL as None.
pub type Row = Vec<Option<String>>;

/// What one committed write did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Column `col` (0 = `shared`) set to `value`.
    Update { col: usize, value: String },
    /// The whole row inserted; every column's value is unique.
    Insert { row: Row },
    /// The row deleted, as it was when the app deleted it.
    Delete { row: Row },
}

/// One committed write of one device's app.
#[derive(Clone, Debug)]
pub struct Write {
    pub device: usize,
    pub key: i64,
    pub op: Op,
}

/// The seeded rows, written by device 0's app before any daemon starts.
pub fn seed_rows(c: &Connection) -> rusqlite::Result<()> {
    for k in STABLE.iter().chain(&CHURN) {
        let v: Vec<String> = (0..COLUMNS).map(|col| seed_value(*k, col)).collect();
        c.execute(
            "INSERT INTO t VALUES (?1, ?2, ?3, ?4, ?5)",
            params![k, v[0], v[1], v[2], v[3]],
        )?;
    }
    Ok(())
}

/// Opens an app's connection to a device's file.
pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let c = Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(20))?;
    c.execute_batch("PRAGMA journal_mode = WAL")?;
    Ok(c)
}

/// Device `d`'s app: bursts of one to four writes (some in one
/// transaction) with short pauses, until `until`. Returns the committed
/// writes in commit order; a burst whose commit failed is not among them.
pub fn run(path: &Path, d: usize, seed: u64, until: Instant) -> anyhow::Result<Vec<Write>> {
    let c = open(path)?;
    let mut rng = StdRng::seed_from_u64(seed ^ (d as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut done = Vec::new();
    let mut n = 0u64;
    while Instant::now() < until {
        let one_transaction = rng.gen_bool(0.3);
        let burst: rusqlite::Result<Vec<Write>> = (|| {
            if one_transaction {
                c.execute_batch("BEGIN IMMEDIATE")?;
            }
            let mut burst = Vec::new();
            for _ in 0..rng.gen_range(1..=4) {
                n += 1;
                burst.extend(write_one(&c, d, n, &mut rng)?);
            }
            if one_transaction {
                c.execute_batch("COMMIT")?;
            }
            Ok(burst)
        })();
        match burst {
            Ok(b) => done.extend(b),
            Err(e) if one_transaction => {
                let _ = c.execute_batch("ROLLBACK");
                anyhow::bail!("device {d}: a write failed: {e}");
            }
            Err(e) => anyhow::bail!("device {d}: a write failed: {e}"),
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(5..120)));
    }
    Ok(done)
}

/// One random write; `n` makes its values unique. Returns it when it
/// changed a row (an update of an absent row or an insert of a present one
/// changes nothing and is no write).
fn write_one(
    c: &Connection,
    d: usize,
    n: u64,
    rng: &mut StdRng,
) -> rusqlite::Result<Option<Write>> {
    let own = 1 + d;
    let value = |key: i64, col: usize| format!("d{d}n{n}k{key}c{col}");
    let (key, op) = match rng.gen_range(0..12) {
        0..=5 => {
            let keys: Vec<i64> = STABLE.iter().chain(&CHURN).copied().collect();
            let key = keys[rng.gen_range(0..keys.len())];
            let col = if rng.gen_bool(0.5) { 0 } else { own };
            (
                key,
                Op::Update {
                    col,
                    value: value(key, col),
                },
            )
        }
        6..=7 => {
            let key = CHURN[rng.gen_range(0..CHURN.len())];
            if rng.gen_bool(0.5) {
                (key, Op::Delete { row: Row::new() })
            } else {
                (
                    key,
                    Op::Insert {
                        row: (0..COLUMNS).map(|col| Some(value(key, col))).collect(),
                    },
                )
            }
        }
        8..=9 => {
            let key = private_key(d);
            let op = match rng.gen_range(0..4) {
                0 => Op::Update {
                    col: 0,
                    value: value(key, 0),
                },
                1 => Op::Update {
                    col: own,
                    value: value(key, own),
                },
                2 => Op::Delete { row: Row::new() },
                _ => Op::Insert {
                    row: (0..COLUMNS).map(|col| Some(value(key, col))).collect(),
                },
            };
            (key, op)
        }
        _ => {
            let key = append_key(d, n);
            (
                key,
                Op::Insert {
                    row: (0..COLUMNS).map(|col| Some(value(key, col))).collect(),
                },
            )
        }
    };
    let (changed, op) = match op {
        Op::Update { col, value } => (
            c.execute(
                &format!("UPDATE t SET {} = ?1 WHERE id = ?2", column_name(col)),
                params![value, key],
            )?,
            Op::Update { col, value },
        ),
        Op::Delete { .. } => {
            // The row as it was deleted, read by the delete itself.
            let row: Option<Row> = c
                .query_row(
                    "DELETE FROM t WHERE id = ?1 RETURNING shared, o0, o1, o2",
                    [key],
                    |r| (0..COLUMNS).map(|i| r.get(i)).collect(),
                )
                .optional()?;
            match row {
                Some(row) => (1, Op::Delete { row }),
                None => (0, Op::Delete { row: Row::new() }),
            }
        }
        Op::Insert { row } => (
            c.execute(
                "INSERT INTO t VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (id) DO NOTHING",
                params![key, row[0], row[1], row[2], row[3]],
            )?,
            Op::Insert { row },
        ),
    };
    Ok((changed == 1).then_some(Write { device: d, key, op }))
}

pub fn column_name(col: usize) -> &'static str {
    ["shared", "o0", "o1", "o2"][col]
}

/// The rows of `t` in a device's file.
pub fn rows(c: &Connection) -> rusqlite::Result<std::collections::BTreeMap<i64, Row>> {
    let mut st = c.prepare_cached("SELECT id, shared, o0, o1, o2 FROM t ORDER BY id")?;
    let rows = st.query_map([], |r| {
        Ok((
            r.get(0)?,
            (1..=COLUMNS).map(|i| r.get(i)).collect::<Result<_, _>>()?,
        ))
    })?;
    rows.collect()
}
