//! Apps change their schema while devices keep syncing: columns added live
//! on some devices and not others, a table added by reload, and a breaking
//! change refused by name then accepted by the operator. Real hub, real
//! daemons, real SQLite files; every row and column compared at the end.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::procs::cli;
use common::*;
use rusqlite::Connection;
use tether::config::ConflictPolicy;
use tether::embedded::database;

const MSGS: &str = "CREATE TABLE msgs (id TEXT PRIMARY KEY, body TEXT)";

/// Rows of `table` by id, each as its columns' debug text (`table` has
/// `id` first).
fn rows(c: &Connection, table: &str) -> BTreeMap<String, Vec<String>> {
    dump(c, table)
        .into_iter()
        .map(|line| {
            let cols: Vec<String> = line.split('|').map(str::to_owned).collect();
            (cols[0].clone(), cols[1..].to_vec())
        })
        .collect()
}

/// The hub's rows of `table`, each padded with NULLs to `ncols` values.
fn hub_rows(world: &World, table: &str, ncols: usize) -> BTreeMap<String, Vec<String>> {
    let hub = Connection::open(world.path("hub.db")).unwrap();
    let mut st = hub
        .prepare(
            "SELECT l.vals FROM rows_1 r JOIN log_1 l ON l.seq = r.version WHERE r.tbl = ?1 AND r.deleted = 0",
        )
        .unwrap();
    let all: Vec<Vec<u8>> = st
        .query_map([table], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    all.into_iter()
        .map(|v| {
            let mut vals = tether::proto::decode_values(&v).unwrap();
            vals.resize(ncols, tether::proto::Value::Null);
            let text: Vec<String> = vals
                .iter()
                .map(|v| {
                    let sql: rusqlite::types::Value = match v {
                        tether::proto::Value::Null => rusqlite::types::Value::Null,
                        tether::proto::Value::Integer(i) => rusqlite::types::Value::Integer(*i),
                        tether::proto::Value::Real(f) => rusqlite::types::Value::Real(*f),
                        tether::proto::Value::Text(t) => rusqlite::types::Value::Text(t.clone()),
                        tether::proto::Value::Blob(b) => rusqlite::types::Value::Blob(b.clone()),
                    };
                    format!("{sql:?}")
                })
                .collect();
            (text[0].clone(), text[1..].to_vec())
        })
        .collect()
}

fn text(s: &str) -> String {
    format!("{:?}", rusqlite::types::Value::Text(s.into()))
}

const NULL: &str = "Null";

/// Writes rows `<prefix>-<n>` until told to stop; returns how many.
fn writer(path: std::path::PathBuf, prefix: &'static str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u32> {
    std::thread::spawn(move || {
        let c = Connection::open(path).unwrap();
        c.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) || n < 20 {
            c.execute(
                "INSERT INTO msgs (id, body) VALUES (?1, ?2)",
                [format!("{prefix}-{n:03}"), format!("body {n}")],
            )
            .unwrap();
            n += 1;
            if n >= 400 {
                break;
            }
        }
        n
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_upgrade_of_three_devices_loses_no_write_and_never_blanks_the_new_column() {
    let world = World::new(&[("db", &["msgs"])]).await;
    let (a, b, c) = (
        app(&world.path("a.db"), MSGS),
        app(&world.path("b.db"), MSGS),
        app(&world.path("c.db"), MSGS),
    );
    for (conn, p) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        for i in 0..5 {
            conn.execute(
                "INSERT INTO msgs VALUES (?1, ?2)",
                [format!("{p}{i}"), format!("first {p}{i}")],
            )
            .unwrap();
        }
    }
    let tables = &["msgs"];
    let da = world.daemon_for("a.db", tables, ConflictPolicy::ServerWins);
    let db = world.daemon_for("b.db", tables, ConflictPolicy::ServerWins);
    let dc = world.daemon_for("c.db", tables, ConflictPolicy::ServerWins);
    wait_until("15 rows everywhere", || {
        count(&a, "msgs") == 15 && count(&b, "msgs") == 15 && count(&c, "msgs") == 15
    })
    .await;

    // A adds a column live while B and C keep writing.
    let stop = Arc::new(AtomicBool::new(false));
    let wb = writer(world.path("b.db"), "bw", stop.clone());
    let wc = writer(world.path("c.db"), "cw", stop.clone());
    a.execute_batch("ALTER TABLE msgs ADD COLUMN extra TEXT")
        .unwrap();
    a.execute("UPDATE msgs SET extra = 'x-' || id", []).unwrap();
    a.execute(
        "INSERT INTO msgs (id, body, extra) VALUES ('a-new', 'made after the change', 'x-a-new')",
        [],
    )
    .unwrap();
    stop.store(true, Ordering::SeqCst);
    let (nb, nc) = (wb.join().unwrap(), wc.join().unwrap());
    wait_idle(&da, "db").await;
    wait_idle(&db, "db").await;
    wait_idle(&dc, "db").await;
    let total = 16 + nb as usize + nc as usize;
    wait_until("every row on every device", || {
        [&a, &b, &c].iter().all(|x| count(x, "msgs") as usize == total)
    })
    .await;

    // C (never upgraded) edits rows whose new column A filled in; B too.
    c.execute("UPDATE msgs SET body = 'edited by c' WHERE id IN ('a0', 'b1', 'c2')", [])
        .unwrap();
    b.execute("UPDATE msgs SET body = 'edited by b' WHERE id = 'a3'", [])
        .unwrap();
    wait_until("the edits reach A", || {
        let r = rows(&a, "msgs");
        r[&text("a0")][0] == text("edited by c") && r[&text("a3")][0] == text("edited by b")
    })
    .await;
    let ra = rows(&a, "msgs");
    for id in ["a0", "b1", "c2", "a3"] {
        assert_eq!(
            ra[&text(id)][1],
            text(&format!("x-{id}")),
            "an edit by a device without the column blanked it on A"
        );
    }

    // B upgrades later: it receives the values A gave the new column.
    b.execute_batch("ALTER TABLE msgs ADD COLUMN extra TEXT")
        .unwrap();
    wait_until("B holds A's rows, new column included", || {
        rows(&b, "msgs") == rows(&a, "msgs")
    })
    .await;
    // B writes the new column; C writes without it; A sees both.
    b.execute_batch(
        "BEGIN; UPDATE msgs SET extra = 'from b' WHERE id = 'c0'; INSERT INTO msgs VALUES ('b-mark', 'after b', NULL); COMMIT;",
    )
    .unwrap();
    // C edits the row once it has B's change (else the edits conflict,
    // and the table's policy, not the schema, decides).
    wait_until("C has B's change", || {
        rows(&c, "msgs").contains_key(&text("b-mark"))
    })
    .await;
    c.execute("UPDATE msgs SET body = 'c after b' WHERE id = 'c0'", [])
        .unwrap();
    c.execute("INSERT INTO msgs VALUES ('c-last', 'c writes last')", [])
        .unwrap();
    for d in [&da, &db, &dc] {
        wait_idle(d, "db").await;
    }
    wait_until("A and B converge", || {
        let (ra, rb) = (rows(&a, "msgs"), rows(&b, "msgs"));
        ra == rb && ra.get(&text("c-last")).is_some() && ra[&text("c0")][0] == text("c after b")
    })
    .await;

    // Every write is everywhere, every column where it exists.
    let ra = rows(&a, "msgs");
    assert_eq!(ra.len(), total + 2);
    assert_eq!(ra, rows(&b, "msgs"));
    assert_eq!(ra, hub_rows(&world, "msgs", 3));
    let projected: BTreeMap<_, _> = ra
        .iter()
        .map(|(k, v)| (k.clone(), v[..1].to_vec()))
        .collect();
    assert_eq!(projected, rows(&c, "msgs"), "C holds every row, its columns");
    for (id, v) in &ra {
        let id = id.trim_start_matches("Text(\"").trim_end_matches("\")");
        let want_extra = if id == "c0" {
            text("from b")
        } else if id == "b-mark" {
            NULL.to_owned()
        } else if id.len() == 2 || id == "a-new" {
            text(&format!("x-{id}"))
        } else if id.starts_with("bw-") || id.starts_with("cw-") {
            // Written while A changed its schema: A filled them in if it
            // had received them by its UPDATE.
            continue;
        } else {
            NULL.to_owned()
        };
        assert_eq!(v[1], want_extra, "row {id}");
    }
    for n in 0..nb {
        assert!(ra.contains_key(&text(&format!("bw-{n:03}"))));
    }
    for n in 0..nc {
        assert!(ra.contains_key(&text(&format!("cw-{n:03}"))));
    }
    da.stop().await;
    db.stop().await;
    dc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_by_reload_starts_syncing_with_the_rows_it_already_held() {
    const PEOPLE: &str = "CREATE TABLE people (id TEXT PRIMARY KEY, name TEXT, age INTEGER)";
    let world = World::new(&[("db", &["msgs", "people"])]).await;
    let schema = format!("{MSGS}; {PEOPLE}");
    let (a, b) = (app(&world.path("a.db"), &schema), app(&world.path("b.db"), &schema));
    for i in 0..20 {
        a.execute(
            "INSERT INTO people VALUES (?1, ?2, ?3)",
            rusqlite::params![format!("pa{i}"), format!("a person {i}"), i],
        )
        .unwrap();
        b.execute(
            "INSERT INTO people VALUES (?1, ?2, ?3)",
            rusqlite::params![format!("pb{i}"), format!("b person {i}"), 100 + i],
        )
        .unwrap();
    }
    a.execute("INSERT INTO msgs VALUES ('m-a', 'hello')", []).unwrap();
    let da = world.daemon_for("a.db", &["msgs"], ConflictPolicy::ServerWins);
    let db = world.daemon_for("b.db", &["msgs", "people"], ConflictPolicy::ServerWins);
    wait_until("msgs synced", || count(&b, "msgs") == 1).await;
    wait_idle(&da, "db").await;
    wait_idle(&db, "db").await;
    // B's people reached the hub; A (which does not sync them yet) holds
    // only its own, and moves its cursor past B's.
    assert_eq!(hub_rows(&world, "people", 3).len(), 20);
    assert_eq!(count(&a, "people"), 20);
    b.execute("UPDATE people SET age = 7 WHERE id = 'pb3'", []).unwrap();
    b.execute("INSERT INTO msgs VALUES ('m-b', 'moves the cursor')", [])
        .unwrap();
    wait_until("A has m-b", || count(&a, "msgs") == 2).await;

    let mut cfg = da.config.clone();
    cfg.databases = vec![database(
        "db",
        world.path("a.db"),
        &["msgs", "people"],
        ConflictPolicy::ServerWins,
    )];
    let report = da.daemon.reload(cfg).await;
    assert_eq!(report.restarted, vec!["db".to_string()]);
    a.execute("INSERT INTO people VALUES ('pa-late', 'after reload', 1)", [])
        .unwrap();
    wait_until("A and B hold the same people", || {
        rows(&a, "people") == rows(&b, "people") && count(&a, "people") == 41
    })
    .await;
    wait_idle(&da, "db").await;
    let ra = rows(&a, "people");
    assert_eq!(ra[&text("pb3")][1], "Integer(7)");
    assert_eq!(ra[&text("pa5")][0], text("a person 5"));
    assert_eq!(ra, hub_rows(&world, "people", 3));
    da.stop().await;
    db.stop().await;
}
