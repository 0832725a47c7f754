//! A hub whose store is restored from a backup: devices notice that its
//! history went back, recover by themselves, and every device and the hub
//! end with the same rows, the ones the restore lost included.

mod common;

use common::*;
use rusqlite::Connection;
use tether::config::ConflictPolicy;
use tether::embedded::EmbeddedDaemon;

const T: &str = "CREATE TABLE t (id TEXT PRIMARY KEY, v TEXT)";

fn write(c: &Connection, id: &str) {
    c.execute("INSERT INTO t VALUES (?1, 'x')", [id]).unwrap();
}

/// Waits until `c` holds exactly the rows `want` (ids) in `t`.
async fn wait_rows(c: &Connection, want: &[&str]) {
    wait_ids(c, "t", want).await
}

/// An online backup of the hub's store, as `sqlite3 hub.db ".backup ..."`.
fn backup(world: &World, to: &str) {
    let hub = Connection::open(world.path("hub.db")).unwrap();
    hub.execute("VACUUM INTO ?1", [world.path(to).to_str().unwrap()])
        .unwrap();
}

/// Stops the hub, puts the backup in place of its store, starts it again.
async fn restore(world: &mut World, from: &str) {
    world.stop_hub().await;
    for f in ["hub.db-wal", "hub.db-shm"] {
        let _ = std::fs::remove_file(world.path(f));
    }
    std::fs::copy(world.path(from), world.path("hub.db")).unwrap();
    world.start_hub().await;
}

fn daemon(world: &World, file: &str) -> EmbeddedDaemon {
    world.daemon_for(file, &["t"], ConflictPolicy::ServerWins)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_restored_from_a_backup_loses_nothing_and_reuses_no_number() {
    let mut world = World::new(&[("db", &["t"])]).await;
    let a = app(&world.path("a.db"), T);
    let b = app(&world.path("b.db"), T);
    let da = daemon(&world, "a.db");
    let db = daemon(&world, "b.db");
    write(&a, "before");
    wait_rows(&b, &["before"]).await;
    backup(&world, "backup.db");
    write(&a, "after-1");
    write(&a, "after-2");
    write(&b, "after-b");
    let lost = ["before", "after-1", "after-2", "after-b"];
    wait_rows(&a, &lost).await;
    wait_rows(&b, &lost).await;
    wait_idle(&da, "db").await;
    wait_idle(&db, "db").await;

    restore(&mut world, "backup.db").await;
    let c = app(&world.path("c.db"), T);
    let dc = daemon(&world, "c.db");
    write(&a, "after-restore");
    let all = ["before", "after-1", "after-2", "after-b", "after-restore"];
    for x in [&a, &b, &c] {
        wait_rows(x, &all).await;
    }
    for d in [&da, &db, &dc] {
        wait_idle(d, "db").await;
    }
    assert_eq!(
        hub_dump(&world, T, "t"),
        dump(&a, "t"),
        "the hub holds them too"
    );
    assert!(status(&da, "db").recoveries >= 1, "A recovered");
    assert!(status(&db, "db").recoveries >= 1, "B recovered");
    // Writes after the recovery reach everyone.
    write(&b, "later");
    let later = [
        "before",
        "after-1",
        "after-2",
        "after-b",
        "after-restore",
        "later",
    ];
    for x in [&a, &b, &c] {
        wait_rows(x, &later).await;
    }
    for d in [da, db, dc] {
        d.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_offline_across_two_restores_brings_back_what_only_it_holds() {
    let mut world = World::new(&[("db", &["t"])]).await;
    let a = app(&world.path("a.db"), T);
    let b = app(&world.path("b.db"), T);
    let da = daemon(&world, "a.db");
    let db = daemon(&world, "b.db");
    write(&a, "base");
    wait_rows(&b, &["base"]).await;
    wait_idle(&da, "db").await;
    backup(&world, "first.db");
    // A is away while B writes a row; then B goes away too, and is the
    // only device holding it.
    da.stop().await;
    write(&b, "b-only");
    wait_idle(&db, "db").await;
    db.stop().await;
    // First restore: the hub forgets b-only. A comes back (nothing it
    // holds was lost) and writes, reusing the number b-only had.
    restore(&mut world, "first.db").await;
    let da = daemon(&world, "a.db");
    write(&a, "a-2");
    wait_idle(&da, "db").await;
    backup(&world, "second.db");
    write(&a, "a-3");
    wait_idle(&da, "db").await;
    // Second restore: the hub forgets a-3; A notices and sends it again.
    restore(&mut world, "second.db").await;
    wait_until("A recovered", || status(&da, "db").recoveries >= 1).await;
    wait_idle(&da, "db").await;
    // B returns across both restores and brings b-only back.
    let db = daemon(&world, "b.db");
    let all = ["base", "b-only", "a-2", "a-3"];
    wait_rows(&b, &all).await;
    wait_rows(&a, &all).await;
    wait_idle(&db, "db").await;
    wait_idle(&da, "db").await;
    assert_eq!(hub_dump(&world, T, "t"), dump(&b, "t"));
    assert!(status(&db, "db").recoveries >= 1, "B noticed on its return");
    da.stop().await;
    db.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_deleted_after_the_backup_comes_back_on_every_device_alike() {
    let mut world = World::new(&[("db", &["t"])]).await;
    let a = app(&world.path("a.db"), T);
    let b = app(&world.path("b.db"), T);
    let da = daemon(&world, "a.db");
    let db = daemon(&world, "b.db");
    write(&a, "k");
    write(&a, "keep");
    wait_rows(&b, &["k", "keep"]).await;
    wait_idle(&da, "db").await;
    wait_idle(&db, "db").await;
    backup(&world, "backup.db");
    a.execute("DELETE FROM t WHERE id = 'k'", []).unwrap();
    write(&a, "after");
    wait_rows(&b, &["keep", "after"]).await;
    wait_idle(&da, "db").await;
    wait_idle(&db, "db").await;
    restore(&mut world, "backup.db").await;
    // The restored store holds k again; the devices recover and agree with
    // it (the delete is the restore's to undo), and `after` comes back.
    let all = ["k", "keep", "after"];
    wait_rows(&a, &all).await;
    wait_rows(&b, &all).await;
    wait_idle(&da, "db").await;
    wait_idle(&db, "db").await;
    assert_eq!(hub_dump(&world, T, "t"), dump(&a, "t"));
    assert_eq!(dump(&a, "t"), dump(&b, "t"));
    da.stop().await;
    db.stop().await;
}
