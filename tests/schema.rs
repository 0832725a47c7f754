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
fn writer(
    path: std::path::PathBuf,
    prefix: &'static str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u32> {
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
        [&a, &b, &c]
            .iter()
            .all(|x| count(x, "msgs") as usize == total)
    })
    .await;

    // C (never upgraded) edits rows whose new column A filled in; B too.
    c.execute(
        "UPDATE msgs SET body = 'edited by c' WHERE id IN ('a0', 'b1', 'c2')",
        [],
    )
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
        ra == rb && ra.contains_key(&text("c-last")) && ra[&text("c0")][0] == text("c after b")
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
    assert_eq!(
        projected,
        rows(&c, "msgs"),
        "C holds every row, its columns"
    );
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
    let (a, b) = (
        app(&world.path("a.db"), &schema),
        app(&world.path("b.db"), &schema),
    );
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
    a.execute("INSERT INTO msgs VALUES ('m-a', 'hello')", [])
        .unwrap();
    let da = world.daemon_for("a.db", &["msgs"], ConflictPolicy::ServerWins);
    let db = world.daemon_for("b.db", &["msgs", "people"], ConflictPolicy::ServerWins);
    wait_until("msgs synced", || count(&b, "msgs") == 1).await;
    wait_idle(&da, "db").await;
    wait_idle(&db, "db").await;
    // B's people reached the hub; A (which does not sync them yet) holds
    // only its own, and moves its cursor past B's.
    assert_eq!(hub_rows(&world, "people", 3).len(), 20);
    assert_eq!(count(&a, "people"), 20);
    b.execute("UPDATE people SET age = 7 WHERE id = 'pb3'", [])
        .unwrap();
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
    a.execute(
        "INSERT INTO people VALUES ('pa-late', 'after reload', 1)",
        [],
    )
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

/// Drops column `note` the way SQLite documents for any change ALTER TABLE
/// cannot make: a new table, the rows copied, the old one dropped, the new
/// one renamed, in one transaction.
const DROP_NOTE: &str = "BEGIN;
CREATE TABLE msgs_new (id TEXT PRIMARY KEY, body TEXT);
INSERT INTO msgs_new SELECT id, body FROM msgs;
DROP TABLE msgs;
ALTER TABLE msgs_new RENAME TO msgs;
COMMIT;";

/// A hub.toml for the operator's commands against this world's store.
fn hub_toml(world: &World) -> std::path::PathBuf {
    let path = world.path("hub.toml");
    let text = format!(
        "listen = \"127.0.0.1:0\"\nstore = \"sqlite:{}\"\n\n[[dataset]]\nname = \"db\"\ntables = [\"msgs\"]\n\n{}",
        world.path("hub.db").display(),
        tether::hub::auth::token_block("ops", &tether::hub::auth::new_token(), "*", false)
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `tether ARGS` off the runtime's threads.
async fn tether(args: Vec<String>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&args)
    })
    .await
    .unwrap()
}

fn last_error(d: &tether::embedded::EmbeddedDaemon) -> String {
    status(d, "db").last_error.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaking_change_is_refused_naming_the_column_then_accepted_by_the_operator() {
    const WITH_NOTE: &str = "CREATE TABLE msgs (id TEXT PRIMARY KEY, note TEXT, body TEXT)";
    let world = World::new(&[("db", &["msgs"])]).await;
    let (a, b) = (
        app(&world.path("a.db"), WITH_NOTE),
        app(&world.path("b.db"), WITH_NOTE),
    );
    for i in 0..5 {
        a.execute(
            "INSERT INTO msgs VALUES (?1, ?2, ?3)",
            [format!("a{i}"), format!("note a{i}"), format!("body a{i}")],
        )
        .unwrap();
        b.execute(
            "INSERT INTO msgs VALUES (?1, ?2, ?3)",
            [format!("b{i}"), format!("note b{i}"), format!("body b{i}")],
        )
        .unwrap();
    }
    let da = world.daemon_for("a.db", &["msgs"], ConflictPolicy::ServerWins);
    let db = world.daemon_for("b.db", &["msgs"], ConflictPolicy::ServerWins);
    wait_until("10 rows on both", || {
        count(&a, "msgs") == 10 && count(&b, "msgs") == 10
    })
    .await;
    let config = hub_toml(&world);
    let cfg = config.display().to_string();

    // SQLite refuses to drop a column the capture triggers use: an app
    // drops it by rebuilding the table.
    let e = a
        .execute_batch("ALTER TABLE msgs DROP COLUMN note")
        .unwrap_err();
    assert!(e.to_string().contains("no such column: OLD.note"), "{e}");
    // A drops a column that is not the last: refused, by name, with the way on.
    a.execute_batch(DROP_NOTE).unwrap();
    a.execute(
        "INSERT INTO msgs VALUES ('a-after', 'written after the drop')",
        [],
    )
    .unwrap();
    wait_until("A refused naming the column", || {
        last_error(&da).contains("column \"note\" was dropped")
    })
    .await;
    let refused = last_error(&da);
    assert!(
        refused.contains("table \"msgs\"")
            && refused.contains("tether hub schema db --accept msgs"),
        "{refused}"
    );
    // B, which did not change, keeps syncing meanwhile.
    b.execute(
        "INSERT INTO msgs VALUES ('b-during', 'n', 'while A is refused')",
        [],
    )
    .unwrap();
    wait_idle(&db, "db").await;
    assert_eq!(count(&a, "msgs"), 11, "A's rows are all still there");

    let (code, out, err) = tether(
        ["hub", "schema", "db", "--config", &cfg]
            .map(String::from)
            .to_vec(),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("table \"msgs\": version 1")
            && out.contains("columns: id TEXT (key 1), note TEXT, body TEXT")
            && out.contains("v1 ")
            && out.contains("created"),
        "{out}"
    );
    let (code, out, err) = tether(
        ["hub", "schema", "db", "--accept", "msgs", "--config", &cfg]
            .map(String::from)
            .to_vec(),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("accepted") && out.contains("version 2"),
        "{out}"
    );

    // A's next attempt makes its schema version 2; its write goes out and
    // it gets B's, in the new layout.
    b.execute(
        "INSERT INTO msgs VALUES ('b-waits', 'n', 'written by B before it upgrades')",
        [],
    )
    .unwrap();
    wait_until("A has B's rows", || {
        let r = rows(&a, "msgs");
        r.get(&text("b-during")) == Some(&vec![text("while A is refused")])
    })
    .await;
    // B, still on the old schema, is refused: upgrade the app.
    wait_until("B told to upgrade", || {
        last_error(&db).contains("upgrade the app")
    })
    .await;
    assert!(count(&b, "msgs") >= 12, "B's rows stay");
    // An edit B makes meanwhile is no conflict with the hub's rewrite of
    // the row in the new layout (nor with A sending its rebuilt table's
    // rows again): nobody else wrote it.
    b.execute(
        "UPDATE msgs SET body = 'edited by B while refused' WHERE id = 'a1'",
        [],
    )
    .unwrap();
    b.execute_batch(DROP_NOTE).unwrap();
    wait_until("A and B converge", || {
        let (ra, rb) = (rows(&a, "msgs"), rows(&b, "msgs"));
        ra == rb && ra.len() == 13
    })
    .await;
    wait_idle(&da, "db").await;
    wait_idle(&db, "db").await;
    let ra = rows(&a, "msgs");
    assert_eq!(
        ra[&text("b-waits")],
        vec![text("written by B before it upgrades")]
    );
    assert_eq!(ra[&text("a-after")], vec![text("written after the drop")]);
    assert_eq!(ra[&text("a1")], vec![text("edited by B while refused")]);
    for i in 0..5 {
        assert_eq!(
            ra[&text(&format!("b{i}"))],
            vec![text(&format!("body b{i}"))]
        );
    }
    assert_eq!(ra, hub_rows(&world, "msgs", 2));

    let (code, out, _) = tether(
        ["hub", "schema", "db", "--config", &cfg]
            .map(String::from)
            .to_vec(),
    )
    .await;
    assert_eq!(code, 0);
    assert!(
        out.contains("table \"msgs\": version 2")
            && out.contains("breaking: column \"note\" was dropped")
            && out.contains("at least the columns of version 2"),
        "{out}"
    );
    da.stop().await;
    db.stop().await;
}
