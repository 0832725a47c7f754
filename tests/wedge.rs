//! Sessions that never wedge: both directions busy at once, changes the local
//! database refuses, devices that sync part of a dataset, answers larger than
//! a frame, rows larger than any frame. Real hub and daemons on loopback,
//! real SQLite files.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rusqlite::{params, Connection};
use tether::config::ConflictPolicy;
use tether::embedded::{database, EmbeddedDaemon};
use tether::session::ConnectionState;

/// Bulk transfers get a longer deadline than [`DEADLINE`]: in a debug build
/// they move tens of megabytes each way.
const BULK_DEADLINE: Duration = Duration::from_secs(240);

const BULK: &str = "CREATE TABLE bulk (id TEXT PRIMARY KEY, title TEXT, b BLOB, body TEXT)";

/// Inserts `n` rows in one transaction: a text key, a 40-character title, a
/// 64-byte blob and a `body_len`-character text, as the app would.
fn insert_bulk(c: &Connection, side: &str, n: usize, body_len: usize) {
    let tx = c.unchecked_transaction().unwrap();
    {
        let mut ins = tx
            .prepare("INSERT INTO bulk (id, title, b, body) VALUES (?1, ?2, randomblob(64), ?3)")
            .unwrap();
        for i in 0..n {
            let body: String = format!("{side}{i:06}-").repeat(body_len / 8 + 1);
            ins.execute(params![
                format!("{side}-{i:06}"),
                format!("{side} row {i:06} with a title of forty ch"),
                &body[..body_len]
            ])
            .unwrap();
        }
    }
    tx.commit().unwrap();
}

/// Changes in the hub's log of the world's first dataset, and distinct rows
/// among them, read from the store file.
fn hub_log(world: &World) -> (u64, u64) {
    let c = Connection::open(world.path("hub.db")).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.query_row(
        "SELECT count(*), count(DISTINCT tbl || hex(pk)) FROM log_1",
        [],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )
    .unwrap()
}

/// Waits, re-checking every 50 ms up to `deadline`, until `cond` holds.
async fn wait_long(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        if cond() {
            return;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tick.tick().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_bulk_writing_at_once_both_receive_everything() {
    // About 12 MB each way, at the same moment, through links with almost
    // no buffer (see `Proxy::start_narrow`): a session that stops reading
    // while it sends (or a hub that does) wedges for good here.
    const ROWS: usize = 5_000;
    const BODY: usize = 2_000;
    let world = World::new(&[("db", &["bulk"])]).await;
    let (pa, pb) = (world.path("a.db"), world.path("b.db"));
    let (a, b) = (app(&pa, BULK), app(&pb, BULK));
    let (xa, xb) = (
        proxy::Proxy::start_narrow(world.addr.clone()).await,
        proxy::Proxy::start_narrow(world.addr.clone()).await,
    );
    let daemon = |x: &proxy::Proxy, path: &std::path::Path| {
        EmbeddedDaemon::start(
            &format!("ws://{}/v1/sync", x.addr),
            &world.token,
            vec![database(
                "db",
                path.to_path_buf(),
                &["bulk"],
                ConflictPolicy::ServerWins,
            )],
        )
    };
    let (da, db) = (daemon(&xa, &pa), daemon(&xb, &pb));
    da.wait_connected(DEADLINE).await.unwrap();
    db.wait_connected(DEADLINE).await.unwrap();

    let wa = std::thread::spawn(move || insert_bulk(&app(&pa, "SELECT 1"), "a", ROWS, BODY));
    let wb = std::thread::spawn(move || insert_bulk(&app(&pb, "SELECT 1"), "b", ROWS, BODY));
    wa.join().unwrap();
    wb.join().unwrap();

    let (sa, sb) = (da.status("db"), db.status("db"));
    wait_long("both devices to hold both bulks", BULK_DEADLINE, || {
        count(&a, "bulk") == 2 * ROWS as i64
            && count(&b, "bulk") == 2 * ROWS as i64
            && sa.borrow().pending_changes == 0
            && sb.borrow().pending_changes == 0
    })
    .await;
    // Every row arrived whole, on both sides, exactly as written.
    assert_eq!(dump(&a, "bulk"), dump(&b, "bulk"));
    for c in [&a, &b] {
        let bad: i64 = c
            .query_row(
                "SELECT count(*) FROM bulk WHERE length(b) != 64 OR length(body) != ?1
                 OR substr(body, 1, 8) != substr(id, 1, 1) || substr(id, 3, 6) || '-'",
                [BODY as i64],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(bad, 0, "rows whose content differs from what was written");
    }
    // The hub holds each of them once.
    let n = 2 * ROWS as u64;
    assert_eq!(
        hub_log(&world),
        (n, n),
        "hub log holds each row exactly once"
    );
    da.stop().await;
    db.stop().await;
}

const PEOPLE_LOOSE: &str = "CREATE TABLE people (id INTEGER PRIMARY KEY, email TEXT, n INTEGER)";
/// Same columns, types and key (same fingerprint), stricter rules that the
/// hub does not know of (a value of the wrong type in a STRICT table it
/// does know of, and refuses itself).
const PEOPLE_STRICT: &str =
    "CREATE TABLE people (id INTEGER PRIMARY KEY, email TEXT UNIQUE, n INTEGER CHECK (n >= 0)) STRICT";

fn held(c: &Connection) -> Vec<(String, String)> {
    let mut st = c
        .prepare("SELECT pk, reason FROM _tether_held ORDER BY reason")
        .unwrap();
    st.query_map([], |r| {
        let pk: Vec<u8> = r.get(0)?;
        Ok((hex::encode(pk), r.get::<_, String>(1)?))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_the_database_refuses_are_held_and_never_stop_the_ones_behind() {
    let world = World::new(&[("db", &["people"])]).await;
    let a = app(&world.path("a.db"), PEOPLE_LOOSE);
    let b = app(&world.path("b.db"), PEOPLE_STRICT);
    let da = world.daemon_for("a.db", &["people"], ConflictPolicy::ServerWins);
    let db = world.daemon_for("b.db", &["people"], ConflictPolicy::ServerWins);
    da.wait_connected(DEADLINE).await.unwrap();
    db.wait_connected(DEADLINE).await.unwrap();

    b.execute("INSERT INTO people VALUES (1, 'ann@example.org', 1)", [])
        .unwrap();
    wait_until("row 1 on A", || count(&a, "people") == 1).await;
    // On B: a UNIQUE violation, a CHECK violation, then a good row behind
    // them.
    a.execute("INSERT INTO people VALUES (2, 'ann@example.org', 2)", [])
        .unwrap();
    a.execute("INSERT INTO people VALUES (3, 'bob@example.org', -3)", [])
        .unwrap();
    a.execute("INSERT INTO people VALUES (4, 'cy@example.org', 4)", [])
        .unwrap();
    let sb = db.status("db");
    wait_until("row 4 on B, two changes held", || {
        count(&b, "people") == 2 && sb.borrow().held_changes == 2
    })
    .await;
    let reasons = held(&b);
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons.iter().any(|(_, r)| r.contains("UNIQUE")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|(_, r)| r.contains("CHECK")),
        "{reasons:?}"
    );
    // The session never dropped its connection over them.
    let s = sb.borrow().clone();
    assert_eq!(
        (s.connection, s.connects, s.last_error.clone()),
        (ConnectionState::Connected, 1, None)
    );
    assert_eq!(s.cursor, s.hub_head);
    // The status names why.
    let why = s.held_reason.clone().unwrap_or_default();
    assert!(why.contains("people"), "{why:?}");

    // A later version of a held row that B can take supersedes the entry.
    a.execute(
        "UPDATE people SET email = 'dee@example.org' WHERE id = 2",
        [],
    )
    .unwrap();
    wait_until("row 2 on B once its email is unique", || {
        count(&b, "people") == 3 && sb.borrow().held_changes == 1
    })
    .await;
    let email: String = b
        .query_row("SELECT email FROM people WHERE id = 2", [], |r| r.get(0))
        .unwrap();
    assert_eq!(email, "dee@example.org");
    // And writes keep flowing both ways.
    b.execute("INSERT INTO people VALUES (5, 'eve@example.org', 5)", [])
        .unwrap();
    wait_until("row 5 on A", || count(&a, "people") == 5).await;
    da.stop().await;
    db.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_syncing_some_tables_gets_only_those_and_keeps_up() {
    const TAGS: &str = "CREATE TABLE tags (id TEXT PRIMARY KEY, label TEXT)";
    let world = World::new(&[("db", &["notes", "tags"])]).await;
    let a = app(&world.path("a.db"), &format!("{NOTES}; {TAGS}"));
    let b = app(&world.path("b.db"), &format!("{NOTES}; {TAGS}"));
    let da = world.daemon_for("a.db", &["notes", "tags"], ConflictPolicy::ServerWins);
    let db = world.daemon_for("b.db", &["notes"], ConflictPolicy::ServerWins);
    da.wait_connected(DEADLINE).await.unwrap();
    db.wait_connected(DEADLINE).await.unwrap();
    for i in 0..20 {
        a.execute("INSERT INTO tags VALUES (?1, 'x')", [format!("t{i}")])
            .unwrap();
        if i % 5 == 0 {
            a.execute(
                "INSERT INTO notes (id, title) VALUES (?1, 'n')",
                [format!("n{i}")],
            )
            .unwrap();
        }
    }
    // Ends with tags only: the cursor must still reach the head.
    a.execute("INSERT INTO tags VALUES ('last', 'x')", [])
        .unwrap();
    wait_until("hub holds every change", || hub_log(&world).0 == 25).await;
    let sb = db.status("db");
    wait_until("B caught up to the head", || {
        let s = sb.borrow();
        s.cursor == 25 && s.connection == ConnectionState::Connected
    })
    .await;
    assert_eq!(count(&b, "notes"), 4);
    assert_eq!(count(&b, "tags"), 0, "B does not sync tags");
    let s = sb.borrow().clone();
    assert_eq!((s.connects, s.held_changes, s.last_error), (1, 0, None));
    da.stop().await;
    db.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflict_answers_larger_than_a_frame_arrive_in_parts_and_devices_converge() {
    // 4,000 offline edits that all conflict with 5 KB rows on the hub: the
    // answer carries 20 MB of server rows, more than one frame may hold.
    const ROWS: i64 = 4_000;
    let world = World::new(&[("db", &["notes"])]).await;
    let a = app(&world.path("a.db"), NOTES);
    let b = app(&world.path("b.db"), NOTES);
    let big = "x".repeat(5_000);
    {
        let tx = a.unchecked_transaction().unwrap();
        for i in 0..ROWS {
            tx.execute(
                "INSERT INTO notes (id, title, body, n) VALUES (?1, 'server', ?2, ?3)",
                params![format!("k{i:05}"), big, i],
            )
            .unwrap();
        }
        tx.commit().unwrap();
        let tx = b.unchecked_transaction().unwrap();
        for i in 0..ROWS {
            tx.execute(
                "INSERT INTO notes (id, title, n) VALUES (?1, 'offline', ?2)",
                params![format!("k{i:05}"), -i],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    let da = world.daemon_for("a.db", &["notes"], ConflictPolicy::ServerWins);
    wait_idle(&da, "db").await;
    assert_eq!(hub_log(&world).0, ROWS as u64);
    // B comes online with its 4,000 edits based on nothing.
    let db = world.daemon_for("b.db", &["notes"], ConflictPolicy::ServerWins);
    let sb = db.status("db");
    wait_long("B's edits answered", BULK_DEADLINE, || {
        let s = sb.borrow();
        s.pending_changes == 0 && s.caught_up
    })
    .await;
    wait_converged(&a, &b, "notes").await;
    let s = sb.borrow().clone();
    assert_eq!(s.connects, 1, "no reconnect: {:?}", s.last_error);
    assert_eq!(
        s.last_upload.as_ref().map(|u| u.conflict),
        Some(ROWS as u64)
    );
    let servers: i64 = b
        .query_row(
            "SELECT count(*) FROM notes WHERE title = 'server' AND length(body) = 5000",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(servers, ROWS, "server_wins: B holds the hub's rows");
    da.stop().await;
    db.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_too_large_for_any_frame_is_refused_and_the_rest_syncs() {
    let world = World::new(&[("db", &["notes"])]).await;
    let a = app(&world.path("a.db"), NOTES);
    let b = app(&world.path("b.db"), NOTES);
    let da = world.daemon_for("a.db", &["notes"], ConflictPolicy::ServerWins);
    let db = world.daemon_for("b.db", &["notes"], ConflictPolicy::ServerWins);
    da.wait_connected(DEADLINE).await.unwrap();
    db.wait_connected(DEADLINE).await.unwrap();
    let huge = "y".repeat(tether::proto::MAX_CHANGE_BYTES + 1);
    a.execute(
        "INSERT INTO notes (id, title, body) VALUES ('huge', 't', ?1)",
        [&huge],
    )
    .unwrap();
    a.execute("INSERT INTO notes (id, title) VALUES ('after', 't')", [])
        .unwrap();
    wait_until("the row behind it on B", || count(&b, "notes") == 1).await;
    let sa = da.status("db");
    wait_until("nothing pending on A", || sa.borrow().pending_changes == 0).await;
    let (reason, pk): (String, Vec<u8>) = a
        .query_row("SELECT reason, pk FROM _tether_rejected", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(reason, "too_large");
    assert!(String::from_utf8_lossy(&pk).contains("huge"));
    assert_eq!(sa.borrow().connects, 1);
    assert_eq!(hub_log(&world).0, 1, "the huge row is not stored");
    da.stop().await;
    db.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_holding_the_write_lock_for_long_does_not_cost_the_connection() {
    // Short timeouts on both ends: the wait for the app's lock (7 s) is
    // longer than either, and the connection must survive it.
    let world = World::with_hub_read_timeout(&[("db", &["notes"])], Duration::from_secs(3)).await;
    let a = app(&world.path("a.db"), NOTES);
    let b = app(&world.path("b.db"), NOTES);
    let short = tether::config::Reconnect {
        ping_interval: tether::config::Dur(Duration::from_millis(500)),
        read_timeout: tether::config::Dur(Duration::from_secs(3)),
        ..tether::embedded::fast_reconnect()
    };
    let da = world.daemon_with("a.db", &["notes"], short.clone());
    let db = world.daemon_with("b.db", &["notes"], short);
    da.wait_connected(DEADLINE).await.unwrap();
    db.wait_connected(DEADLINE).await.unwrap();

    // The app on A holds its write lock while B's change arrives for A, until
    // A's daemon has waited out tether's 5 s busy timeout twice: far longer
    // than the 3 s read timeouts of both ends.
    let path = world.path("a.db");
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let c = app(&path, "SELECT 1");
        c.execute_batch("BEGIN IMMEDIATE; INSERT INTO notes (id, title) VALUES ('a-long', 't')")
            .unwrap();
        locked_tx.send(()).unwrap();
        release_rx.recv_timeout(DEADLINE).unwrap();
        c.execute_batch("COMMIT").unwrap();
    });
    locked_rx.recv_timeout(DEADLINE).unwrap();
    b.execute("INSERT INTO notes (id, title) VALUES ('from-b', 't')", [])
        .unwrap();
    let local = da.daemon.session("db").unwrap().local.clone();
    wait_until("A's daemon waited twice for the app's lock", || {
        local.get().is_some_and(|l| l.busy_waits() >= 2)
    })
    .await;
    release_tx.send(()).unwrap();
    tokio::task::spawn_blocking(move || holder.join().unwrap())
        .await
        .unwrap();
    wait_until("both rows on both sides", || {
        count(&a, "notes") == 2 && count(&b, "notes") == 2
    })
    .await;
    let s = status(&da, "db");
    assert_eq!(s.connects, 1, "A reconnected: {:?}", s.last_error);
    da.stop().await;
    db.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_link_whose_bytes_keep_moving_is_never_taken_for_a_dead_one() {
    // Frames of about 600 KB over links of 150 KB/s take 4 s each way:
    // twice the read timeout of the hub (which receives A's upload slowly)
    // and of B (which receives the push slowly). A's own read timeout must
    // outlast its upload draining from its socket: the hub has nothing to
    // say meanwhile, and A's pings wait behind the frame.
    let world = World::with_hub_read_timeout(&[("db", &["notes"])], Duration::from_secs(2)).await;
    let a = app(&world.path("a.db"), NOTES);
    let b = app(&world.path("b.db"), NOTES);
    let (xa, xb) = (
        proxy::Proxy::start_slow(world.addr.clone(), 150_000).await,
        proxy::Proxy::start_slow(world.addr.clone(), 150_000).await,
    );
    let short = tether::config::Reconnect {
        ping_interval: tether::config::Dur(Duration::from_millis(500)),
        read_timeout: tether::config::Dur(Duration::from_secs(2)),
        ..tether::embedded::fast_reconnect()
    };
    let cfg = |x: &proxy::Proxy, file: &str| tether::config::DaemonConfig {
        control_socket: std::path::PathBuf::from("/nonexistent/tether.sock"),
        control: Default::default(),
        shutdown_timeout: tether::config::Dur(Duration::from_secs(10)),
        metrics_listen: None,
        log_level: None,
        hub: tether::config::HubConn {
            url: format!("ws://{}/v1/sync", x.addr),
            token: Some(world.token.clone()),
            token_file: None,
            ca_file: None,
        },
        reconnect: short.clone(),
        databases: vec![database(
            "db",
            world.path(file),
            &["notes"],
            ConflictPolicy::ServerWins,
        )],
    };
    let mut uploader = cfg(&xa, "a.db");
    uploader.reconnect.read_timeout = tether::config::Dur(Duration::from_secs(10));
    let da = EmbeddedDaemon::start_with(uploader);
    let db = EmbeddedDaemon::start_with(cfg(&xb, "b.db"));
    da.wait_connected(DEADLINE).await.unwrap();
    db.wait_connected(DEADLINE).await.unwrap();
    a.execute(
        "INSERT INTO notes (id, title, body) VALUES ('big', 't', ?1)",
        ["z".repeat(600_000)],
    )
    .unwrap();
    wait_until("the big row on B", || count(&b, "notes") == 1).await;
    for d in [&da, &db] {
        let s = status(d, "db");
        assert_eq!(s.connects, 1, "reconnected: {:?}", s.last_error);
    }
    da.stop().await;
    db.stop().await;
}
