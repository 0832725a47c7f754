//! Randomized convergence under every conflict policy: the apps of three
//! devices keep writing the same few rows (single columns, deletes,
//! inserts again) while the hub answers their conflicts, then stop; every
//! device and the hub must end with identical rows, and each write whose
//! fate the policy decides must have it.
//!
//! The workload is seeded: the seed is printed, and
//! `TETHER_CONVERGENCE_SEED=<seed> cargo test --test convergence` runs the
//! same workloads again (the interleaving with the network still varies).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rusqlite::{params, Connection, OptionalExtension};
use tether::config::ConflictPolicy;
use tether::embedded::EmbeddedDaemon;
use tether::proto::{decode_key, decode_values, Value};
use tether::session::Event;

const SCHEMA: &str =
    "CREATE TABLE t (id INTEGER PRIMARY KEY, shared TEXT, o0 TEXT, o1 TEXT, o2 TEXT)";
/// The columns after the key: `shared` is written by every device, `o<d>`
/// by device `d` only (on the stable rows).
const COLUMNS: usize = 4;
const DEVICES: usize = 3;
/// Rows no device deletes or inserts: only their columns are updated.
const STABLE: [i64; 3] = [1, 2, 3];
/// Rows every device updates, deletes and inserts again.
const CHURN: [i64; 3] = [4, 5, 6];
/// Bursts of writes per device; after each one the device's app waits until
/// its daemon has had an answer from the hub, so that the next burst is
/// written while other batches are in flight and other devices write.
const BURSTS: usize = 16;
/// Workloads per policy, each with its own seed and a fresh hub.
const WORKLOADS: u64 = 4;

/// The columns after the key, NULL as None.
type Row = Vec<Option<String>>;

/// The row of device `d` that no other device writes.
fn private_key(d: usize) -> i64 {
    10 + d as i64
}

/// What one device's app committed.
#[derive(Debug, Default)]
struct Written {
    /// (key, column) of every value written.
    values: HashSet<(i64, usize, String)>,
    /// Per stable row, the last value written to the device's own column.
    owned_last: BTreeMap<i64, String>,
    /// The device's private row as the app left it.
    private: Option<Row>,
}

fn seed_value(k: i64, col: usize) -> String {
    format!("seed-k{k}c{col}")
}

fn meta(c: &Connection, key: &str) -> u64 {
    c.query_row(
        "SELECT value FROM _tether_meta WHERE key = ?1",
        [key],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .unwrap()
    .unwrap_or(0) as u64
}

/// Whether every captured write of this database has been answered.
fn nothing_pending(c: &Connection) -> bool {
    let last: Option<i64> = c
        .query_row("SELECT max(seq) FROM _tether_log", [], |r| r.get(0))
        .unwrap();
    meta(c, "consumed") >= last.unwrap_or(0) as u64
}

/// Runs one device's app: `BURSTS` bursts of random writes.
fn workload(path: &Path, d: usize, seed: u64) -> Written {
    let c = Connection::open(path).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    let mut rng =
        StdRng::seed_from_u64(seed.wrapping_add((d as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    let mut w = Written::default();
    for &k in &STABLE {
        w.owned_last.insert(k, seed_value(k, 1 + d));
    }
    let mut n = 0;
    for _ in 0..BURSTS {
        let answered_before = meta(&c, "consumed");
        let in_one_transaction = rng.gen_bool(0.3);
        if in_one_transaction {
            c.execute_batch("BEGIN IMMEDIATE").unwrap();
        }
        for _ in 0..rng.gen_range(1..=4) {
            n += 1;
            write_one(&c, d, n, &mut rng, &mut w);
        }
        if in_one_transaction {
            c.execute_batch("COMMIT").unwrap();
        }
        // Bounded wait for the next answer from the hub (or for nothing
        // to be pending, when the burst changed nothing).
        let start = Instant::now();
        while meta(&c, "consumed") == answered_before && !nothing_pending(&c) {
            assert!(
                start.elapsed() < DEADLINE,
                "device {d}: no answer from the hub within {DEADLINE:?}"
            );
            std::thread::park_timeout(Duration::from_millis(5));
        }
    }
    w
}

/// A write of the workload.
enum Write {
    /// One column of a row (0 = `shared`).
    Update(usize),
    Delete,
    /// The whole row, if it is absent locally.
    Insert,
}

/// One random write of device `d`'s app; `n` makes its values unique.
/// Stable rows get column updates, churn rows deletes and inserts (and
/// column updates through the first case), the private row all of them.
fn write_one(c: &Connection, d: usize, n: usize, rng: &mut StdRng, w: &mut Written) {
    let own = 1 + d;
    let shared_keys: Vec<i64> = STABLE.iter().chain(&CHURN).copied().collect();
    let (key, write) = match rng.gen_range(0..10) {
        0..=5 => {
            let key = shared_keys[rng.gen_range(0..shared_keys.len())];
            (key, Write::Update(if rng.gen_bool(0.5) { 0 } else { own }))
        }
        6..=7 => {
            let key = CHURN[rng.gen_range(0..CHURN.len())];
            (
                key,
                if rng.gen_bool(0.5) {
                    Write::Delete
                } else {
                    Write::Insert
                },
            )
        }
        _ => {
            let write = match rng.gen_range(0..4) {
                0 => Write::Update(0),
                1 => Write::Update(own),
                2 => Write::Delete,
                _ => Write::Insert,
            };
            (private_key(d), write)
        }
    };
    let private = key == private_key(d);
    let mut value = |col: usize| {
        let v = format!("d{d}n{n}k{key}c{col}");
        w.values.insert((key, col, v.clone()));
        v
    };
    match write {
        Write::Update(col) => {
            let v = value(col);
            let sql = format!("UPDATE t SET {} = ?1 WHERE id = ?2", column_name(col));
            let changed = c.execute(&sql, params![v, key]).unwrap();
            if STABLE.contains(&key) && col == own {
                w.owned_last.insert(key, v.clone());
            }
            if private && changed == 1 {
                w.private.as_mut().expect("the private row is here")[col] = Some(v);
            }
        }
        Write::Delete => {
            c.execute("DELETE FROM t WHERE id = ?1", [key]).unwrap();
            if private {
                w.private = None;
            }
        }
        Write::Insert => {
            let row: Row = (0..COLUMNS).map(|col| Some(value(col))).collect();
            let inserted = c
                .execute(
                    "INSERT INTO t VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (id) DO NOTHING",
                    params![key, row[0], row[1], row[2], row[3]],
                )
                .unwrap();
            if private && inserted == 1 {
                w.private = Some(row);
            }
        }
    }
}

fn column_name(col: usize) -> &'static str {
    ["shared", "o0", "o1", "o2"][col]
}

/// The rows of `t` in an app's database.
fn app_rows(c: &Connection) -> BTreeMap<i64, Row> {
    let mut st = c
        .prepare("SELECT id, shared, o0, o1, o2 FROM t ORDER BY id")
        .unwrap();
    st.query_map([], |r| {
        Ok((
            r.get(0)?,
            (1..=COLUMNS).map(|i| r.get(i)).collect::<Result<_, _>>()?,
        ))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::Text(t) => Some(t.clone()),
        other => panic!("unexpected value {other:?}"),
    }
}

/// The live rows of `t` in the hub's store, and its head.
fn hub_rows(hub: &Connection) -> (BTreeMap<i64, Row>, u64) {
    let mut st = hub
        .prepare(
            "SELECT r.pk, l.vals FROM rows_1 r JOIN log_1 l ON l.seq = r.version
             WHERE r.tbl = 't' AND r.deleted = 0",
        )
        .unwrap();
    let rows = st
        .query_map([], |r| {
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
        })
        .unwrap()
        .map(|r| {
            let (pk, vals) = r.unwrap();
            let key = match decode_key(&pk).unwrap()[..] {
                [Value::Integer(k)] => k,
                ref other => panic!("unexpected key {other:?}"),
            };
            let vals = decode_values(&vals).unwrap();
            (key, vals[1..].iter().map(text).collect())
        })
        .collect();
    let head: Option<i64> = hub
        .query_row("SELECT max(seq) FROM log_1", [], |r| r.get(0))
        .unwrap();
    (rows, head.unwrap_or(0) as u64)
}

/// Waits (bounded) until nothing is pending anywhere, every daemon has
/// applied the hub's head, and every device holds the hub's rows; returns
/// them.
async fn wait_agreement(
    seed: u64,
    apps: &[Connection],
    daemons: &[EmbeddedDaemon],
    hub: &Connection,
) -> BTreeMap<i64, Row> {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        let (rows, head) = hub_rows(hub);
        let local: Vec<BTreeMap<i64, Row>> = apps.iter().map(app_rows).collect();
        let idle = apps.iter().all(nothing_pending)
            && daemons
                .iter()
                .all(|d| status(d, "db").cursor >= head && status(d, "db").caught_up);
        if idle && local.iter().all(|l| *l == rows) {
            return rows;
        }
        if start.elapsed() > DEADLINE {
            let cursors: Vec<u64> = daemons.iter().map(|d| status(d, "db").cursor).collect();
            panic!(
                "seed {seed}: no agreement within {DEADLINE:?}; hub head {head}, cursors {cursors:?}\nhub: {rows:?}\n{}",
                local
                    .iter()
                    .enumerate()
                    .map(|(d, l)| format!("device {d}: {l:?}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        tick.tick().await;
    }
}

/// The seed of this run: `TETHER_CONVERGENCE_SEED`, or a new one.
fn seed() -> u64 {
    match std::env::var("TETHER_CONVERGENCE_SEED") {
        Ok(s) => s.parse().expect("TETHER_CONVERGENCE_SEED is a number"),
        Err(_) => rand::random(),
    }
}

/// Runs [`WORKLOADS`] workloads under `policy`, from the run's seed on.
async fn converge(policy: ConflictPolicy) {
    let first = seed();
    for i in 0..WORKLOADS {
        workload_converges(policy, first.wrapping_add(i)).await;
    }
}

/// Runs one workload under `policy` and checks the outcome.
async fn workload_converges(policy: ConflictPolicy, seed: u64) {
    eprintln!("{policy:?}: seed {seed} (TETHER_CONVERGENCE_SEED={seed} runs it first)");
    let started = Instant::now();
    let world = World::new(&[("db", &["t"])]).await;
    let paths: Vec<PathBuf> = (0..DEVICES)
        .map(|d| world.path(&format!("d{d}.db")))
        .collect();
    let apps: Vec<Connection> = paths.iter().map(|p| app(p, SCHEMA)).collect();
    for k in STABLE.iter().chain(&CHURN) {
        let v: Vec<String> = (0..COLUMNS).map(|col| seed_value(*k, col)).collect();
        apps[0]
            .execute(
                "INSERT INTO t VALUES (?1, ?2, ?3, ?4, ?5)",
                params![k, v[0], v[1], v[2], v[3]],
            )
            .unwrap();
    }
    let daemons: Vec<EmbeddedDaemon> = (0..DEVICES)
        .map(|d| world.daemon_for(&format!("d{d}.db"), &["t"], policy))
        .collect();
    let conflicts = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    for d in &daemons {
        d.wait_connected(DEADLINE).await.unwrap();
        let mut events = d.daemon.subscribe();
        let conflicts = conflicts.clone();
        // Ends when the daemon stops and its event channel closes.
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(Event::Upload { summary, .. }) => {
                        conflicts.fetch_add(summary.conflict, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
    let hub = Connection::open(world.path("hub.db")).unwrap();
    hub.busy_timeout(Duration::from_secs(10)).unwrap();
    wait_agreement(seed, &apps, &daemons, &hub).await;

    let writers: Vec<_> = paths
        .iter()
        .enumerate()
        .map(|(d, p)| {
            let p = p.clone();
            tokio::task::spawn_blocking(move || workload(&p, d, seed))
        })
        .collect();
    let mut written = Vec::new();
    for w in writers {
        written.push(w.await.unwrap_or_else(|e| panic!("seed {seed}: {e}")));
    }
    let rows = wait_agreement(seed, &apps, &daemons, &hub).await;
    let conflicts = conflicts.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "{policy:?}: seed {seed}: {} rows agree after {conflicts} conflicts, {:?}",
        rows.len(),
        started.elapsed()
    );
    assert!(conflicts > 0, "seed {seed}: the workload made no conflict");

    // Every value held was written by an app, in that row and column.
    for (k, row) in &rows {
        for (col, v) in row.iter().enumerate() {
            let v = v.as_deref().unwrap_or("NULL");
            let known = v == seed_value(*k, col)
                || written
                    .iter()
                    .any(|w| w.values.contains(&(*k, col, v.to_owned())));
            assert!(
                known,
                "seed {seed}: row {k} column {col} holds {v}, which no app wrote there"
            );
        }
    }
    // A row only one device writes ends as that device's app left it.
    for (d, w) in written.iter().enumerate() {
        assert_eq!(
            rows.get(&private_key(d)),
            w.private.as_ref(),
            "seed {seed}: the private row of device {d}"
        );
    }
    // merge_columns: a column only one device writes ends with its last value.
    if policy == ConflictPolicy::MergeColumns {
        for (d, w) in written.iter().enumerate() {
            for (k, last) in &w.owned_last {
                assert_eq!(
                    rows[k][1 + d].as_deref(),
                    Some(last.as_str()),
                    "seed {seed}: row {k}, column o{d} (written by device {d} only)"
                );
            }
        }
    }
    for d in daemons {
        d.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_wins_converges_under_concurrent_writes_and_deletes() {
    converge(ConflictPolicy::ServerWins).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_wins_converges_under_concurrent_writes_and_deletes() {
    converge(ConflictPolicy::ClientWins).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_columns_converges_and_keeps_each_devices_own_columns() {
    converge(ConflictPolicy::MergeColumns).await;
}
