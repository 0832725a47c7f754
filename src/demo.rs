//! `tether demo` and `tether bench`: a hub and two daemons in this process,
//! on temporary SQLite files and a loopback port.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection};

use crate::clock::now_ms;
use crate::config::ConflictPolicy;
use crate::embedded::{database, EmbeddedDaemon, EmbeddedHub};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS notes (id TEXT PRIMARY KEY, title TEXT NOT NULL, body TEXT NOT NULL, updated INTEGER NOT NULL)";
const WAIT: Duration = Duration::from_secs(30);

/// Opens an app connection to a demo database, creating the table. The app
/// uses WAL with `synchronous = NORMAL`, the setting SQLite recommends for WAL
/// (with the default FULL, every commit also waits for an fsync of the WAL).
fn app(path: &Path) -> anyhow::Result<Connection> {
    let c = Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(5))?;
    c.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")?;
    c.execute_batch(SCHEMA)?;
    Ok(c)
}

/// Waits until `cond` holds on B, re-checking whenever B's session reports
/// progress; returns how long it took.
async fn wait_on(
    daemon: &EmbeddedDaemon,
    name: &str,
    mut cond: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut rx = daemon.status(name);
    loop {
        rx.borrow_and_update();
        if cond()? {
            return Ok(start.elapsed());
        }
        let left = WAIT
            .checked_sub(start.elapsed())
            .ok_or_else(|| anyhow::anyhow!("timed out after {WAIT:?} waiting for {name}"))?;
        // Progress on B is published on its status channel; the short
        // timeout only covers a check racing with the publication.
        let _ = tokio::time::timeout(left.min(Duration::from_millis(50)), rx.changed()).await;
    }
}

struct Pair {
    dir: tempfile::TempDir,
    hub: EmbeddedHub,
    a: EmbeddedDaemon,
    b: EmbeddedDaemon,
    app_a: Connection,
    app_b: Connection,
    path_b: std::path::PathBuf,
}

async fn start_pair() -> anyhow::Result<Pair> {
    let dir = tempfile::tempdir()?;
    let path_a = dir.path().join("a.db");
    let path_b = dir.path().join("b.db");
    let app_a = app(&path_a)?;
    let app_b = app(&path_b)?;
    let hub = EmbeddedHub::start(
        &dir.path().join("hub.db"),
        &[("notes", &["notes"])],
        "127.0.0.1:0",
    )
    .await?;
    let db = |p: &Path| {
        vec![database(
            "notes",
            p.to_path_buf(),
            &["notes"],
            ConflictPolicy::ServerWins,
        )]
    };
    let a = EmbeddedDaemon::start(&hub.url(), &hub.token, db(&path_a));
    let b = EmbeddedDaemon::start(&hub.url(), &hub.token, db(&path_b));
    a.wait_connected(WAIT).await?;
    b.wait_connected(WAIT).await?;
    Ok(Pair {
        dir,
        hub,
        a,
        b,
        app_a,
        app_b,
        path_b,
    })
}

fn title_on(c: &Connection, id: &str) -> anyhow::Result<Option<String>> {
    use rusqlite::OptionalExtension;
    Ok(
        c.query_row("SELECT title FROM notes WHERE id = ?1", [id], |r| r.get(0))
            .optional()?,
    )
}

/// `tether demo`.
pub async fn demo() -> anyhow::Result<()> {
    println!("tether demo: a hub and two daemons (A and B) on temporary SQLite files\n");
    let p = start_pair().await?;
    println!("hub listening on {}; A and B connected\n", p.hub.url());
    println!("1. rows written on A by an ordinary SQLite connection appear on B:");
    for i in 1..=5 {
        let id = format!("note-{i}");
        p.app_a.execute(
            "INSERT INTO notes (id, title, body, updated) VALUES (?1, ?2, ?3, ?4)",
            params![id, format!("Note {i}"), "written on A", now_ms()],
        )?;
        let took = wait_on(&p.b, "notes", || Ok(title_on(&p.app_b, &id)?.is_some())).await?;
        println!(
            "   {id} visible on B after {:.2} ms",
            took.as_secs_f64() * 1000.0
        );
    }

    println!("\n2. a conflict: B goes offline, both sides edit note-1, B comes back");
    let Pair {
        dir: _dir,
        hub,
        a,
        b,
        app_a,
        app_b,
        path_b,
    } = p;
    b.stop().await;
    app_b.execute(
        "UPDATE notes SET title = 'edited on B (offline)' WHERE id = 'note-1'",
        [],
    )?;
    let uploaded = a.status("notes").borrow().uploaded;
    app_a.execute(
        "UPDATE notes SET title = 'edited on A' WHERE id = 'note-1'",
        [],
    )?;
    wait_on(&a, "notes", || {
        let s = a.status("notes").borrow().clone();
        Ok(s.uploaded > uploaded && s.pending_changes == 0)
    })
    .await?;
    println!(
        "   A: {:?}",
        title_on(&app_a, "note-1")?.unwrap_or_default()
    );
    println!(
        "   B: {:?} (not synced yet)",
        title_on(&app_b, "note-1")?.unwrap_or_default()
    );
    let b = EmbeddedDaemon::start(
        &hub.url(),
        &hub.token,
        vec![database(
            "notes",
            path_b,
            &["notes"],
            ConflictPolicy::ServerWins,
        )],
    );
    wait_on(&b, "notes", || {
        let s = b.status("notes").borrow().clone();
        Ok(s.pending_changes == 0 && s.caught_up && s.last_upload.is_some())
    })
    .await?;
    let summary = b
        .status("notes")
        .borrow()
        .last_upload
        .clone()
        .unwrap_or_default();
    println!(
        "   B's upload: total {}, applied {}, conflict {} -> policy server_wins keeps the hub's row",
        summary.total, summary.applied, summary.conflict
    );
    println!(
        "   A: {:?}",
        title_on(&app_a, "note-1")?.unwrap_or_default()
    );
    println!(
        "   B: {:?}",
        title_on(&app_b, "note-1")?.unwrap_or_default()
    );
    anyhow::ensure!(
        title_on(&app_a, "note-1")? == title_on(&app_b, "note-1")?,
        "A and B disagree after the conflict"
    );
    a.stop().await;
    b.stop().await;
    hub.stop().await;
    println!("\ndone: both sides hold the same rows; everything shut down cleanly");
    Ok(())
}

/// Figures of one benchmark run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRun {
    pub bulk_rows: usize,
    pub bulk_seconds: f64,
    /// Of which the app's own insert transaction (with capture triggers).
    pub bulk_insert_seconds: f64,
    /// The same rows inserted the same way into a database tether does not
    /// sync (no capture triggers): what this machine's SQLite does alone.
    pub baseline_insert_seconds: f64,
    pub bulk_rows_per_sec: f64,
    pub latency_commits: usize,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    /// Two-way: rows each side inserted at the same moment.
    pub two_way_rows_per_side: usize,
    /// Until both sides held every row of both.
    pub two_way_seconds: f64,
    /// Rows moved (both directions) per second.
    pub two_way_rows_per_sec: f64,
}

fn random_text(rng: &mut impl rand::Rng, len: usize) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    (0..len)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect()
}

/// One run of `tether bench`: bulk transfer, then single-row latency.
pub async fn bench_once(rows: usize, commits: usize) -> anyhow::Result<BenchRun> {
    let p = start_pair().await?;
    let mut rng = rand::thread_rng();
    // bulk: rows inserted on A in one transaction, until all are on B.
    let data: Vec<(String, String, String, i64)> = (0..rows)
        .map(|i| {
            (
                uuid::Uuid::new_v4().to_string(),
                random_text(&mut rng, 32),
                random_text(&mut rng, 200),
                now_ms() + i as i64,
            )
        })
        .collect();
    let insert_all = |c: &Connection| -> rusqlite::Result<()> {
        let tx = c.unchecked_transaction()?;
        {
            let mut ins =
                tx.prepare("INSERT INTO notes (id, title, body, updated) VALUES (?1, ?2, ?3, ?4)")?;
            for (id, t, b, u) in &data {
                ins.execute(params![id, t, b, u])?;
            }
        }
        tx.commit()
    };
    let start = Instant::now();
    insert_all(&p.app_a)?;
    let insert = start.elapsed();
    let mut count = p.app_b.prepare("SELECT count(*) FROM notes")?;
    let mut rx = p.b.status("notes");
    loop {
        let downloaded = rx.borrow_and_update().downloaded as usize;
        if downloaded >= rows {
            let n: i64 = count.query_row([], |r| r.get(0))?;
            if n as usize >= rows {
                break;
            }
        }
        tokio::time::timeout(WAIT, rx.changed())
            .await
            .map_err(|_| anyhow::anyhow!("bulk transfer stalled"))??;
    }
    drop(count);
    let bulk = start.elapsed();
    // latency: single-row commits, each timed until visible on B.
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut check = p.app_b.prepare("SELECT 1 FROM notes WHERE id = ?1")?;
    for _ in 0..commits {
        let id = uuid::Uuid::new_v4().to_string();
        let mut rx = p.b.status("notes");
        rx.borrow_and_update();
        let t0 = Instant::now();
        p.app_a.execute(
            "INSERT INTO notes (id, title, body, updated) VALUES (?1, ?2, ?3, ?4)",
            params![
                id,
                random_text(&mut rng, 32),
                random_text(&mut rng, 200),
                now_ms()
            ],
        )?;
        loop {
            if check.exists([&id])? {
                break;
            }
            tokio::time::timeout(WAIT, rx.changed())
                .await
                .map_err(|_| anyhow::anyhow!("row {id} never reached B"))??;
        }
        hist.record(t0.elapsed().as_micros() as u64)?;
    }
    drop(check);
    let two_way = two_way(&p, rows).await?;
    // Last, so that its writes do not disturb the measurements above.
    let baseline = {
        let c = app(&p.dir.path().join("baseline.db"))?;
        let t0 = Instant::now();
        insert_all(&c)?;
        t0.elapsed()
    };
    let Pair { hub, a, b, .. } = p;
    a.stop().await;
    b.stop().await;
    hub.stop().await;
    Ok(BenchRun {
        bulk_rows: rows,
        bulk_seconds: bulk.as_secs_f64(),
        bulk_insert_seconds: insert.as_secs_f64(),
        baseline_insert_seconds: baseline.as_secs_f64(),
        bulk_rows_per_sec: rows as f64 / bulk.as_secs_f64(),
        latency_commits: commits,
        latency_p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
        latency_p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
        latency_max_ms: hist.max() as f64 / 1000.0,
        two_way_rows_per_side: rows,
        two_way_seconds: two_way.as_secs_f64(),
        two_way_rows_per_sec: (2 * rows) as f64 / two_way.as_secs_f64(),
    })
}

/// Both apps insert `rows` rows in one transaction each at the same moment;
/// returns the time until both hold every row of both.
async fn two_way(p: &Pair, rows: usize) -> anyhow::Result<Duration> {
    let count = |c: &Connection| -> rusqlite::Result<usize> {
        c.query_row("SELECT count(*) FROM notes", [], |r| r.get::<_, i64>(0))
            .map(|n| n as usize)
    };
    let target = count(&p.app_a)?.max(count(&p.app_b)?) + 2 * rows;
    let insert = |path: PathBuf, side: &'static str| {
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let mut rng = rand::thread_rng();
            let c = app(&path)?;
            let tx = c.unchecked_transaction()?;
            {
                let mut ins = tx.prepare(
                    "INSERT INTO notes (id, title, body, updated) VALUES (?1, ?2, ?3, ?4)",
                )?;
                for i in 0..rows {
                    ins.execute(params![
                        format!("{side}-{}", uuid::Uuid::new_v4()),
                        random_text(&mut rng, 40),
                        random_text(&mut rng, 200),
                        i as i64
                    ])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    };
    let start = Instant::now();
    let (ia, ib) = (
        insert(p.dir.path().join("a.db"), "a"),
        insert(p.path_b.clone(), "b"),
    );
    ia.await??;
    ib.await??;
    let (mut ra, mut rb) = (p.a.status("notes"), p.b.status("notes"));
    loop {
        if count(&p.app_a)? >= target && count(&p.app_b)? >= target {
            return Ok(start.elapsed());
        }
        tokio::select! {
            r = ra.changed() => r?,
            r = rb.changed() => r?,
            _ = tokio::time::sleep(WAIT) => anyhow::bail!("two-way transfer stalled"),
        }
    }
}

/// `tether bench`: several runs, each printed, then the medians.
pub async fn bench(rows: usize, commits: usize, runs: usize, json: bool) -> anyhow::Result<()> {
    let mut all = Vec::new();
    for i in 1..=runs {
        let r = bench_once(rows, commits).await?;
        if json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "run {i}: bulk {} rows in {:.3} s (app insert {:.3} s; the same insert without tether {:.3} s) = {:.0} rows/s; latency over {} commits: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; two-way {} rows per side in {:.3} s = {:.0} rows/s",
                r.bulk_rows, r.bulk_seconds, r.bulk_insert_seconds, r.baseline_insert_seconds, r.bulk_rows_per_sec, r.latency_commits, r.latency_p50_ms, r.latency_p99_ms, r.latency_max_ms, r.two_way_rows_per_side, r.two_way_seconds, r.two_way_rows_per_sec
            );
        }
        all.push(r);
    }
    let median = |f: fn(&BenchRun) -> f64| {
        let mut v: Vec<f64> = all.iter().map(f).collect();
        v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
        v[v.len() / 2]
    };
    if !json {
        println!(
            "median of {runs}: bulk {:.0} rows/s; latency p50 {:.3} ms, p99 {:.3} ms; two-way {:.0} rows/s",
            median(|r| r.bulk_rows_per_sec),
            median(|r| r.latency_p50_ms),
            median(|r| r.latency_p99_ms),
            median(|r| r.two_way_rows_per_sec)
        );
    }
    Ok(())
}
