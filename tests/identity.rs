//! One identity per database file: a copied file synced beside its original
//! loses no write of either, whether tether sees the copy by itself or the
//! hub has to tell it.

mod common;

use common::*;
use rusqlite::Connection;
use tether::config::ConflictPolicy;

const T: &str = "CREATE TABLE t (id TEXT PRIMARY KEY, v TEXT)";

fn client_id(c: &Connection) -> String {
    c.query_row(
        "SELECT value FROM _tether_meta WHERE key = 'client_id'",
        [],
        |r| r.get(0),
    )
    .unwrap()
}

fn write(c: &Connection, prefix: &str, n: usize) {
    for i in 0..n {
        c.execute(
            "INSERT INTO t VALUES (?1, ?2)",
            [format!("{prefix}-{i}"), format!("from {prefix}")],
        )
        .unwrap();
    }
}

/// Copies a database file as a user would with `cp`, its writes all in the
/// main file.
fn copy(world: &World, app: &Connection, from: &str, to: &str) {
    app.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
    std::fs::copy(world.path(from), world.path(to)).unwrap();
}

/// Waits until `c` holds exactly the rows `want` (ids) in `t`.
async fn wait_rows(c: &Connection, want: &[String]) {
    wait_ids(c, "t", want).await
}

fn ids(prefixes: &[(&str, usize)]) -> Vec<String> {
    prefixes
        .iter()
        .flat_map(|(p, n)| (0..*n).map(move |i| format!("{p}-{i}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_database_file_syncs_beside_its_original_without_losing_a_write() {
    let world = World::new(&[("db", &["t"])]).await;
    let b = app(&world.path("b.db"), T);
    let c = app(&world.path("c.db"), T);
    let db = world.daemon_for("b.db", &["t"], ConflictPolicy::ServerWins);
    let dc = world.daemon_for("c.db", &["t"], ConflictPolicy::ServerWins);
    write(&b, "first", 5);
    wait_rows(&c, &ids(&[("first", 5)])).await;
    db.stop().await;
    copy(&world, &b, "b.db", "e.db");
    let e = Connection::open(world.path("e.db")).unwrap();

    // Both run at once and both write.
    let db = world.daemon_for("b.db", &["t"], ConflictPolicy::ServerWins);
    let de = world.daemon_for("e.db", &["t"], ConflictPolicy::ServerWins);
    de.wait_connected(DEADLINE).await.unwrap();
    assert_ne!(
        client_id(&e),
        client_id(&b),
        "the copy took its own identity before its first upload"
    );
    write(&b, "b", 10);
    write(&e, "e", 10);
    let all = ids(&[("first", 5), ("b", 10), ("e", 10)]);
    for x in [&c, &b, &e] {
        wait_rows(x, &all).await;
    }
    for (d, name) in [(&db, "b"), (&de, "e")] {
        wait_idle(d, "db").await;
        assert_eq!(status(d, "db").pending_changes, 0, "{name}");
    }
    for d in [db, de, dc] {
        d.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_tether_cannot_see_gets_its_own_identity_from_the_hub() {
    let world = World::new(&[("db", &["t"])]).await;
    let b = app(&world.path("b.db"), T);
    let c = app(&world.path("c.db"), T);
    let db = world.daemon_for("b.db", &["t"], ConflictPolicy::ServerWins);
    let dc = world.daemon_for("c.db", &["t"], ConflictPolicy::ServerWins);
    write(&b, "first", 3);
    wait_rows(&c, &ids(&[("first", 3)])).await;
    db.stop().await;
    copy(&world, &b, "b.db", "e.db");
    // A cloned machine keeps the machine id and the inode: make the copy
    // look like the original's own file to the local check.
    let e = Connection::open(world.path("e.db")).unwrap();
    let here = tether::local::identity::file_id(&world.path("e.db")).unwrap();
    e.execute(
        "UPDATE _tether_meta SET value = ?1 WHERE key = 'file_id'",
        [&here],
    )
    .unwrap();
    let shared = client_id(&b);
    assert_eq!(client_id(&e), shared);

    // The copy writes and uploads first, under the shared identity ...
    let de = world.daemon_for("e.db", &["t"], ConflictPolicy::ServerWins);
    write(&e, "e", 5);
    wait_rows(&c, &ids(&[("first", 3), ("e", 5)])).await;
    wait_idle(&de, "db").await;
    de.stop().await;
    assert_eq!(client_id(&e), shared, "the copy's check saw nothing");
    // ... then the original writes as many rows: the same sequence numbers
    // with other content.
    write(&b, "b", 5);
    let db = world.daemon_for("b.db", &["t"], ConflictPolicy::ServerWins);
    let all = ids(&[("first", 3), ("e", 5), ("b", 5)]);
    wait_rows(&c, &all).await;
    wait_rows(&b, &all).await;
    assert_ne!(
        client_id(&b),
        shared,
        "the hub refused the reused numbers and the original took a new identity"
    );
    let de = world.daemon_for("e.db", &["t"], ConflictPolicy::ServerWins);
    wait_rows(&e, &all).await;
    wait_idle(&db, "db").await;
    for d in [db, de, dc] {
        d.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restored_from_a_backup_gets_back_what_it_wrote_after_the_backup() {
    let world = World::new(&[("db", &["t"])]).await;
    let a = app(&world.path("a.db"), T);
    let b = app(&world.path("b.db"), T);
    let da = world.daemon_for("a.db", &["t"], ConflictPolicy::ServerWins);
    let db = world.daemon_for("b.db", &["t"], ConflictPolicy::ServerWins);
    write(&a, "first", 3);
    wait_rows(&b, &ids(&[("first", 3)])).await;
    wait_idle(&da, "db").await;
    // An online backup, as `sqlite3 a.db ".backup ..."` would take.
    let backup = world.path("backup.db");
    a.execute("VACUUM INTO ?1", [backup.to_str().unwrap()])
        .unwrap();
    write(&a, "after", 4);
    wait_rows(&b, &ids(&[("first", 3), ("after", 4)])).await;
    wait_idle(&da, "db").await;
    da.stop().await;
    // The disk is lost; the backup is put back in place (same file, same
    // inode). Its own writes after the backup come back from the hub.
    drop(a);
    for f in ["a.db-wal", "a.db-shm"] {
        let _ = std::fs::remove_file(world.path(f));
    }
    std::fs::copy(&backup, world.path("a.db")).unwrap();
    let a = Connection::open(world.path("a.db")).unwrap();
    let before = client_id(&a);
    let da = world.daemon_for("a.db", &["t"], ConflictPolicy::ServerWins);
    wait_rows(&a, &ids(&[("first", 3), ("after", 4)])).await;
    // New writes after the restore reuse no sequence number the hub holds.
    write(&a, "restored", 2);
    let all = ids(&[("first", 3), ("after", 4), ("restored", 2)]);
    wait_rows(&a, &all).await;
    wait_rows(&b, &all).await;
    assert_ne!(
        client_id(&a),
        before,
        "the restored file took a new identity"
    );
    wait_idle(&da, "db").await;
    da.stop().await;
    db.stop().await;
}

fn value(c: &Connection, id: &str) -> String {
    c.query_row("SELECT v FROM t WHERE id = ?1", [id], |r| r.get(0))
        .unwrap()
}

async fn wait_value(c: &Connection, id: &str, want: &str) {
    wait_until(&format!("{id} = {want}"), || {
        c.query_row("SELECT v FROM t WHERE id = ?1", [id], |r| {
            r.get::<_, String>(0)
        })
        .map(|v| v == want)
        .unwrap_or(false)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_never_sends_the_originals_old_pending_write_over_a_newer_one() {
    let world = World::new(&[("db", &["t"])]).await;
    let b = app(&world.path("b.db"), T);
    let c = app(&world.path("c.db"), T);
    let policy = ConflictPolicy::ClientWins;
    let dc = world.daemon_for("c.db", &["t"], policy);
    b.execute("INSERT INTO t VALUES ('k', 'orig')", []).unwrap();
    let db = world.daemon_for("b.db", &["t"], policy);
    wait_value(&c, "k", "orig").await;
    wait_idle(&db, "db").await;
    db.stop().await;
    // A write still pending when the file is copied ...
    b.execute("UPDATE t SET v = 'v1' WHERE id = 'k'", [])
        .unwrap();
    copy(&world, &b, "b.db", "e.db");
    // ... which the original sends, and then overwrites.
    let db = world.daemon_for("b.db", &["t"], policy);
    wait_value(&c, "k", "v1").await;
    b.execute("UPDATE t SET v = 'v2' WHERE id = 'k'", [])
        .unwrap();
    wait_value(&c, "k", "v2").await;
    wait_idle(&db, "db").await;
    // The copy starts: the app never wrote in it, so its inherited v1 must
    // not win over v2, even under client_wins.
    let e = Connection::open(world.path("e.db")).unwrap();
    let de = world.daemon_for("e.db", &["t"], policy);
    wait_value(&e, "k", "v2").await;
    wait_idle(&de, "db").await;
    // A later write in the copy follows the policy as any write does.
    for (x, name) in [(&b, "b"), (&c, "c")] {
        assert_eq!(value(x, "k"), "v2", "{name}");
    }
    e.execute("UPDATE t SET v = 'from e' WHERE id = 'k'", [])
        .unwrap();
    wait_value(&b, "k", "from e").await;
    for d in [db, dc, de] {
        d.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restored_in_place_gets_back_its_later_writes_however_much_it_writes_first() {
    let world = World::new(&[("db", &["t"])]).await;
    let a = app(&world.path("a.db"), T);
    let c = app(&world.path("c.db"), T);
    let da = world.daemon_for("a.db", &["t"], ConflictPolicy::ServerWins);
    let dc = world.daemon_for("c.db", &["t"], ConflictPolicy::ServerWins);
    write(&a, "r", 5);
    wait_rows(&c, &ids(&[("r", 5)])).await;
    wait_idle(&da, "db").await;
    let backup = world.path("backup.db");
    a.execute("VACUUM INTO ?1", [backup.to_str().unwrap()])
        .unwrap();
    for i in 0..3 {
        a.execute(
            "UPDATE t SET v = 'after backup' WHERE id = ?1",
            [format!("r-{i}")],
        )
        .unwrap();
    }
    wait_value(&c, "r-2", "after backup").await;
    wait_idle(&da, "db").await;
    da.stop().await;
    drop(a);
    for f in ["a.db-wal", "a.db-shm"] {
        let _ = std::fs::remove_file(world.path(f));
    }
    std::fs::copy(&backup, world.path("a.db")).unwrap();
    // The app writes one row many times before tether starts: its numbers
    // pass everything the hub had from this file.
    let a = Connection::open(world.path("a.db")).unwrap();
    for i in 0..30 {
        a.execute(
            "UPDATE t SET v = ?1 WHERE id = 'r-4'",
            [format!("again {i}")],
        )
        .unwrap();
    }
    let da = world.daemon_for("a.db", &["t"], ConflictPolicy::ServerWins);
    for i in 0..3 {
        wait_value(&a, &format!("r-{i}"), "after backup").await;
    }
    wait_value(&c, "r-4", "again 29").await;
    wait_idle(&da, "db").await;
    for d in [da, dc] {
        d.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_the_hub_tells_about_never_sends_an_old_pending_write_over_a_newer_one() {
    let world = World::new(&[("db", &["t"])]).await;
    let b = app(&world.path("b.db"), T);
    let c = app(&world.path("c.db"), T);
    let policy = ConflictPolicy::ClientWins;
    let dc = world.daemon_for("c.db", &["t"], policy);
    b.execute("INSERT INTO t VALUES ('k', 'orig')", []).unwrap();
    let db = world.daemon_for("b.db", &["t"], policy);
    wait_value(&c, "k", "orig").await;
    wait_idle(&db, "db").await;
    db.stop().await;
    b.execute("UPDATE t SET v = 'v1' WHERE id = 'k'", [])
        .unwrap();
    copy(&world, &b, "b.db", "e.db");
    // A cloned machine: same machine id and inode as far as the copy knows.
    let e = Connection::open(world.path("e.db")).unwrap();
    let here = tether::local::identity::file_id(&world.path("e.db")).unwrap();
    e.execute(
        "UPDATE _tether_meta SET value = ?1 WHERE key = 'file_id'",
        [&here],
    )
    .unwrap();
    let db = world.daemon_for("b.db", &["t"], policy);
    wait_value(&c, "k", "v1").await;
    b.execute("UPDATE t SET v = 'v2' WHERE id = 'k'", [])
        .unwrap();
    wait_value(&c, "k", "v2").await;
    wait_idle(&db, "db").await;
    let shared = client_id(&b);
    // The clone is behind the identity's numbering: the hub's welcome tells
    // it, it renews, and its inherited v1 must not win under client_wins.
    let de = world.daemon_for("e.db", &["t"], policy);
    wait_until("the clone renewed", || client_id(&e) != shared).await;
    wait_value(&e, "k", "v2").await;
    wait_idle(&de, "db").await;
    wait_idle(&db, "db").await;
    for (x, name) in [(&b, "b"), (&c, "c"), (&e, "e")] {
        assert_eq!(value(x, "k"), "v2", "{name}");
    }
    for d in [db, dc, de] {
        d.stop().await;
    }
}
