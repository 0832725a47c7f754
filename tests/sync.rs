//! End-to-end sync between real daemons through a real hub on loopback.

mod common;

use common::*;
use rusqlite::params;
use tether::config::ConflictPolicy;
use tether::embedded::database;

const ITEMS: &str =
    "CREATE TABLE items (id INTEGER PRIMARY KEY, i INTEGER, r REAL, t TEXT, b BLOB, u)";
const PAIRS: &str = "CREATE TABLE pairs (a TEXT, b INTEGER, v, PRIMARY KEY (a, b)) WITHOUT ROWID";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_value_type_round_trips_both_ways() {
    let world = World::new(&[("db", &["items", "pairs"])]).await;
    let schema = format!("{ITEMS}; {PAIRS}");
    let a = app(&world.path("a.db"), &schema);
    let b = app(&world.path("b.db"), &schema);
    let da = world.daemon_for("a.db", &["items", "pairs"], ConflictPolicy::ServerWins);
    let db = world.daemon_for("b.db", &["items", "pairs"], ConflictPolicy::ServerWins);
    da.wait_connected(DEADLINE).await.unwrap();
    db.wait_connected(DEADLINE).await.unwrap();

    let reals = [
        0.1 + 0.2,
        -0.0,
        f64::MIN_POSITIVE,
        5e-324,
        1e308,
        -123.456,
        f64::INFINITY,
    ];
    for (k, r) in reals.iter().enumerate() {
        a.execute(
            "INSERT INTO items (id, i, r, t, b, u) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                k as i64,
                if k % 2 == 0 {
                    i64::MIN + k as i64
                } else {
                    i64::MAX - k as i64
                },
                r,
                ["héllo ✓", "", "with 'quote' and \"dq\"", "\u{0}nul inside"][k % 4],
                vec![0u8, 1, 255, k as u8],
                rusqlite::types::Value::Null
            ],
        )
        .unwrap();
    }
    // An empty blob, a column of no declared type holding each storage class.
    a.execute("INSERT INTO items (id, b, u) VALUES (100, x'', 1.5)", [])
        .unwrap();
    a.execute("INSERT INTO items (id, u) VALUES (101, x'ff00')", [])
        .unwrap();
    a.execute("INSERT INTO items (id, u) VALUES (102, 'text')", [])
        .unwrap();
    a.execute(
        "INSERT INTO pairs VALUES ('k', 1, 'one'), ('k', 2, x'02'), ('', -1, NULL)",
        [],
    )
    .unwrap();
    wait_converged(&a, &b, "items").await;
    wait_converged(&a, &b, "pairs").await;
    // Bit-exact REAL: B reads back the very bits A's SQLite stored (SQLite
    // itself stores -0.0 as 0.0, so A's value is the reference).
    for (k, r) in reals.iter().enumerate() {
        let read = |c: &rusqlite::Connection| -> f64 {
            c.query_row("SELECT r FROM items WHERE id = ?1", [k as i64], |row| {
                row.get(0)
            })
            .unwrap()
        };
        assert_eq!(
            read(&b).to_bits(),
            read(&a).to_bits(),
            "REAL {r} changed on the way"
        );
    }
    let types: String = b
        .query_row(
            "SELECT group_concat(typeof(u), ',') FROM (SELECT u FROM items WHERE id >= 100 ORDER BY id)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(types, "real,blob,text");

    // Updates and deletes from B flow back to A, including a key change.
    b.execute(
        "UPDATE items SET t = 'changed on B', i = 7 WHERE id = 1",
        [],
    )
    .unwrap();
    b.execute("DELETE FROM items WHERE id = 2", []).unwrap();
    b.execute("UPDATE pairs SET b = 3 WHERE a = 'k' AND b = 2", [])
        .unwrap();
    b.execute("DELETE FROM pairs WHERE a = ''", []).unwrap();
    wait_converged(&a, &b, "items").await;
    wait_converged(&a, &b, "pairs").await;
    assert_eq!(count(&a, "items"), reals.len() as i64 + 2);
    assert_eq!(
        dump(&a, "pairs"),
        vec![
            "Text(\"k\")|Integer(1)|Text(\"one\")",
            "Text(\"k\")|Integer(3)|Blob([2])"
        ]
    );
    // A row deleted and inserted again in one transaction arrives as the new row.
    a.execute_batch("BEGIN; DELETE FROM items WHERE id = 3; INSERT INTO items (id, t) VALUES (3, 'reborn'); COMMIT;")
        .unwrap();
    wait_converged(&a, &b, "items").await;
    wait_idle(&da, "db").await;
    wait_idle(&db, "db").await;
    da.stop().await;
    db.stop().await;
}

/// Both sides edit the same rows while B is offline, then B comes back.
async fn conflict_case(policy: ConflictPolicy) -> (Vec<String>, Vec<String>) {
    let world = World::new(&[("db", &["notes"])]).await;
    let (a, b, da, mut db) = notes_pair(&world, policy).await;
    for r in ["r1", "r2", "r3"] {
        a.execute("INSERT INTO notes VALUES (?1, 'title', 'body', 0)", [r])
            .unwrap();
    }
    wait_converged(&a, &b, "notes").await;
    wait_idle(&db, "db").await;
    db.stop().await;
    b.execute("UPDATE notes SET body = 'B-body' WHERE id = 'r1'", [])
        .unwrap();
    b.execute("UPDATE notes SET title = 'B2' WHERE id = 'r2'", [])
        .unwrap();
    b.execute("DELETE FROM notes WHERE id = 'r3'", []).unwrap();
    let before = status(&da, "db").uploaded;
    a.execute("UPDATE notes SET title = 'A-title' WHERE id = 'r1'", [])
        .unwrap();
    a.execute("DELETE FROM notes WHERE id = 'r2'", []).unwrap();
    a.execute("UPDATE notes SET title = 'A3' WHERE id = 'r3'", [])
        .unwrap();
    let rx = da.status("db");
    wait_until("A uploaded its edits", || {
        let s = rx.borrow();
        s.uploaded >= before + 3 && s.pending_changes == 0
    })
    .await;
    db = world.daemon_for("b.db", &["notes"], policy);
    db.wait_connected(DEADLINE).await.unwrap();
    wait_idle(&db, "db").await;
    wait_converged(&a, &b, "notes").await;
    wait_idle(&da, "db").await;
    let s = status(&db, "db");
    assert!(s.last_upload.is_some(), "B uploaded its offline edits");
    let rows = dump(&a, "notes");
    da.stop().await;
    db.stop().await;
    (rows, dump(&b, "notes"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_wins_keeps_the_hub_rows() {
    let (a, b) = conflict_case(ConflictPolicy::ServerWins).await;
    assert_eq!(a, b);
    assert_eq!(
        a,
        vec![
            "Text(\"r1\")|Text(\"A-title\")|Text(\"body\")|Integer(0)",
            "Text(\"r3\")|Text(\"A3\")|Text(\"body\")|Integer(0)",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_wins_keeps_the_late_client_rows() {
    let (a, b) = conflict_case(ConflictPolicy::ClientWins).await;
    assert_eq!(a, b);
    assert_eq!(
        a,
        vec![
            "Text(\"r1\")|Text(\"title\")|Text(\"B-body\")|Integer(0)",
            "Text(\"r2\")|Text(\"B2\")|Text(\"body\")|Integer(0)",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_columns_merges_and_settles_deletes_as_server_wins() {
    let (a, b) = conflict_case(ConflictPolicy::MergeColumns).await;
    assert_eq!(a, b);
    assert_eq!(
        a,
        vec![
            "Text(\"r1\")|Text(\"A-title\")|Text(\"B-body\")|Integer(0)",
            "Text(\"r3\")|Text(\"A3\")|Text(\"body\")|Integer(0)",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_edits_of_the_same_rows_converge() {
    // Three live daemons hammer the same 20 rows at once.
    let world = World::new(&[("db", &["notes"])]).await;
    let files = ["a.db", "b.db", "c.db"];
    let apps: Vec<_> = files.iter().map(|f| app(&world.path(f), NOTES)).collect();
    let daemons: Vec<_> = files
        .iter()
        .map(|f| world.daemon_for(f, &["notes"], ConflictPolicy::ServerWins))
        .collect();
    for d in &daemons {
        d.wait_connected(DEADLINE).await.unwrap();
    }
    for round in 0..30 {
        for (i, a) in apps.iter().enumerate() {
            let id = format!("row{}", (round * 7 + i * 3) % 20);
            a.execute(
                "INSERT INTO notes VALUES (?1, ?2, 'x', ?3) ON CONFLICT (id) DO UPDATE SET title = excluded.title, n = n + 1",
                params![id, format!("from {i} round {round}"), round],
            )
            .unwrap();
            if round % 9 == 8 {
                a.execute(
                    "DELETE FROM notes WHERE id = ?1",
                    [format!("row{}", (round + i) % 20)],
                )
                .unwrap();
            }
        }
    }
    for d in &daemons {
        wait_idle(d, "db").await;
    }
    wait_converged(&apps[0], &apps[1], "notes").await;
    wait_converged(&apps[0], &apps[2], "notes").await;
    // Not only alike, but what the hub holds, values included.
    assert_eq!(hub_dump(&world, NOTES, "notes"), dump(&apps[0], "notes"));
    for d in daemons {
        d.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_daemon_catches_up_both_ways_after_restart() {
    let world = World::new(&[("db", &["notes"])]).await;
    let (a, b, da, db) = notes_pair(&world, ConflictPolicy::ServerWins).await;
    da.stop().await;
    // A's app keeps writing while its daemon is down; B writes more than one
    // catch-up page meanwhile.
    let tx = a.unchecked_transaction().unwrap();
    for i in 0..300 {
        tx.execute(
            "INSERT INTO notes VALUES (?1, 'a', 'offline', ?2)",
            params![format!("a{i}"), i],
        )
        .unwrap();
    }
    tx.commit().unwrap();
    let tx = b.unchecked_transaction().unwrap();
    for i in 0..4500 {
        tx.execute(
            "INSERT INTO notes VALUES (?1, 'b', 'online', ?2)",
            params![format!("b{i}"), i],
        )
        .unwrap();
    }
    tx.commit().unwrap();
    wait_idle(&db, "db").await;
    let da = world.daemon_for("a.db", &["notes"], ConflictPolicy::ServerWins);
    wait_converged(&a, &b, "notes").await;
    assert_eq!(count(&a, "notes"), 4800);
    wait_idle(&da, "db").await;
    let sa = status(&da, "db");
    assert_eq!(sa.cursor, sa.hub_head, "A's cursor reached the hub head");
    da.stop().await;
    db.stop().await;
}

fn hub_log_stats(world: &World) -> (i64, i64) {
    let c = rusqlite::Connection::open(world.path("hub.db")).unwrap();
    c.query_row("SELECT count(*), count(DISTINCT pk) FROM log_1", [], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_restart_mid_stream_loses_and_duplicates_nothing() {
    let mut world = World::new(&[("db", &["notes"])]).await;
    let (a, b, da, db) = notes_pair(&world, ConflictPolicy::ServerWins).await;
    let mut written = 0;
    for round in 0..30 {
        let tx = a.unchecked_transaction().unwrap();
        for i in 0..200 {
            tx.execute(
                "INSERT INTO notes VALUES (?1, 't', 'b', ?2)",
                params![format!("{round}-{i}"), i],
            )
            .unwrap();
            written += 1;
        }
        tx.commit().unwrap();
        if round == 10 {
            world.stop_hub().await;
        }
        if round == 20 {
            world.start_hub().await;
        }
    }
    wait_converged(&a, &b, "notes").await;
    assert_eq!(count(&b, "notes"), written);
    wait_idle(&da, "db").await;
    let (n, distinct) = hub_log_stats(&world);
    assert_eq!(
        (n, distinct),
        (written, written),
        "every row reached the hub exactly once"
    );
    assert!(status(&da, "db").connects >= 2, "A reconnected");
    da.stop().await;
    db.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_resent_after_a_lost_acknowledgement_is_applied_once() {
    let world = World::new(&[("db", &["notes"])]).await;
    let (a, b, da, db) = notes_pair(&world, ConflictPolicy::ServerWins).await;
    world
        .hub()
        .hub
        .faults()
        .drop_upload_results
        .store(2, std::sync::atomic::Ordering::SeqCst);
    for i in 0..50 {
        a.execute(
            "INSERT INTO notes VALUES (?1, 't', 'b', ?2)",
            params![format!("r{i}"), i],
        )
        .unwrap();
    }
    // Written again after the first upload: the resend carries the new value.
    a.execute("UPDATE notes SET title = 'final' WHERE id = 'r0'", [])
        .unwrap();
    wait_converged(&a, &b, "notes").await;
    wait_idle(&da, "db").await;
    let (_, distinct) = hub_log_stats(&world);
    assert_eq!(distinct, 50);
    // Every row is in the hub's log once, except r0, whose update may have
    // gone out on its own (then its two entries differ): nothing twice.
    let hub = rusqlite::Connection::open(world.path("hub.db")).unwrap();
    let repeated: Vec<(Vec<u8>, i64, i64)> = hub
        .prepare(
            "SELECT pk, count(*), count(DISTINCT vals) FROM log_1 GROUP BY pk HAVING count(*) > 1",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        repeated.len() <= 1 && repeated.iter().all(|(_, n, d)| *n == 2 && *d == 2),
        "resent changes were applied once: {repeated:?}"
    );
    let sa = status(&da, "db");
    assert!(
        sa.connects >= 2,
        "the dropped acknowledgements cost a reconnect"
    );
    let title: String = b
        .query_row("SELECT title FROM notes WHERE id = 'r0'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(title, "final");
    da.stop().await;
    db.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_is_reported_and_other_databases_keep_syncing() {
    let world = World::new(&[("db", &["notes"]), ("other", &["notes"])]).await;
    let _broken = rusqlite::Connection::open(world.path("broken.db")).unwrap();
    let a = app(&world.path("a.db"), NOTES);
    let b = app(&world.path("b.db"), NOTES);
    let mut broken = database(
        "broken",
        world.path("broken.db"),
        &["notes"],
        ConflictPolicy::ServerWins,
    );
    broken.dataset = Some("other".into());
    let da = world.daemon(vec![
        broken,
        database(
            "db",
            world.path("a.db"),
            &["notes"],
            ConflictPolicy::ServerWins,
        ),
    ]);
    let db = world.daemon_for("b.db", &["notes"], ConflictPolicy::ServerWins);
    let rx = da.status("broken");
    wait_until("broken database reports its error", || {
        rx.borrow().session == tether::session::SessionState::Error
    })
    .await;
    let err = status(&da, "broken").last_error.unwrap();
    assert!(
        err.contains("\"notes\"") && err.contains("broken") && err.contains("create it"),
        "{err}"
    );
    a.execute("INSERT INTO notes VALUES ('x', 't', 'b', 1)", [])
        .unwrap();
    wait_converged(&a, &b, "notes").await;
    da.stop().await;
    db.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_mismatch_is_a_clear_typed_error() {
    let world = World::new(&[("db", &["notes"])]).await;
    let a = app(&world.path("a.db"), NOTES);
    let _b = app(
        &world.path("b.db"),
        "CREATE TABLE notes (id TEXT PRIMARY KEY, title TEXT, body BLOB, n INTEGER)",
    );
    let da = world.daemon_for("a.db", &["notes"], ConflictPolicy::ServerWins);
    da.wait_connected(DEADLINE).await.unwrap();
    a.execute("INSERT INTO notes VALUES ('x', 't', 'b', 1)", [])
        .unwrap();
    let db = world.daemon_for("b.db", &["notes"], ConflictPolicy::ServerWins);
    let rx = db.status("db");
    wait_until("B refused for its schema", || {
        rx.borrow().session == tether::session::SessionState::Error
    })
    .await;
    let err = status(&db, "db").last_error.unwrap();
    assert!(
        err.contains("schema_mismatch") && err.contains("\"notes\""),
        "{err}"
    );
    da.stop().await;
    db.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_daemon_mid_upload_loses_and_duplicates_nothing() {
    let world = World::new(&[("db", &["notes"])]).await;
    let a = app(&world.path("a.db"), NOTES);
    let b = app(&world.path("b.db"), NOTES);
    let db = world.daemon_for("b.db", &["notes"], ConflictPolicy::ServerWins);
    let da = world.daemon_for("a.db", &["notes"], ConflictPolicy::ServerWins);
    da.wait_connected(DEADLINE).await.unwrap();
    // Ten batches: a stop after the first answer leaves most of them
    // unsent (at most four are in flight and drained).
    const ROWS: i64 = 40_000;
    let tx = a.unchecked_transaction().unwrap();
    for i in 0..ROWS {
        tx.execute(
            "INSERT INTO notes VALUES (?1, 't', 'body', ?2)",
            params![format!("s{i}"), i],
        )
        .unwrap();
    }
    tx.commit().unwrap();
    let rx = da.status("db");
    wait_until("upload under way", || rx.borrow().uploaded > 0).await;
    da.stop().await;
    let (at_stop, _) = hub_log_stats(&world);
    assert!(
        at_stop > 0 && at_stop < ROWS,
        "the stop came mid-upload: the hub held {at_stop} of {ROWS} rows"
    );
    let da = world.daemon_for("a.db", &["notes"], ConflictPolicy::ServerWins);
    wait_converged(&a, &b, "notes").await;
    wait_idle(&da, "db").await;
    assert_eq!(count(&b, "notes"), ROWS);
    let (n, distinct) = hub_log_stats(&world);
    assert_eq!(
        (n, distinct),
        (ROWS, ROWS),
        "stopped with {at_stop} rows on the hub"
    );
    da.stop().await;
    db.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_uploading_device_shows_the_hub_head_its_own_changes_reached() {
    let world = World::new(&[("db", &["notes"])]).await;
    let a = app(&world.path("a.db"), NOTES);
    let da = world.daemon_for("a.db", &["notes"], ConflictPolicy::ServerWins);
    da.wait_connected(DEADLINE).await.unwrap();
    for i in 0..10 {
        a.execute(
            "INSERT INTO notes (id, title) VALUES (?1, 't')",
            [format!("n{i}")],
        )
        .unwrap();
    }
    let sa = da.status("db");
    wait_until("A's status at the head of its own changes", || {
        let s = sa.borrow();
        s.pending_changes == 0 && s.cursor == 10 && s.hub_head == 10
    })
    .await;
    da.stop().await;
}
