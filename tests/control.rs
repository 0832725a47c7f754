//! The control socket and CLI against real hub and daemon processes.

mod common;

use std::path::Path;

use common::procs::*;
use common::*;

struct Setup {
    dir: tempfile::TempDir,
    token_file: std::path::PathBuf,
    token_hash: String,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let token = tether::hub::auth::new_token();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &token).unwrap();
    for f in ["a1.db", "a2.db", "b.db"] {
        app(&dir.path().join(f), NOTES);
    }
    Setup {
        token_hash: tether::hub::auth::hash_token(&token),
        dir,
        token_file,
    }
}

const FAST: &str =
    "initial = \"100ms\"\nmax = \"1s\"\nping_interval = \"1s\"\nread_timeout = \"10s\"";

fn c(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `tether wait DB --upload --timeout T`.
fn wait_upload(cfg: &Path, db: &str, timeout: &str) -> (i32, String, String) {
    cli(&[
        "wait",
        db,
        "--upload",
        "--timeout",
        timeout,
        "--config",
        c(cfg),
    ])
}

fn has_row(db: &Path, id: &str) -> bool {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("SELECT count(*) FROM notes WHERE id = ?1", [id], |r| {
        r.get::<_, i64>(0)
    })
    .unwrap()
        == 1
}

fn insert(db: &Path, id: &str) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    c.execute("INSERT INTO notes VALUES (?1, 't', 'b', 1)", [id])
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_wait_sync_and_status_from_the_cli() {
    let s = setup();
    let d = s.dir.path();
    let (_hub, addr) = start_hub(d, "127.0.0.1:0", &s.token_hash, "hub").await;
    let (_a, acfg) = start_daemon(
        d,
        "a",
        &addr,
        &s.token_file,
        &[("one", "a1.db"), ("two", "a2.db")],
        FAST,
    )
    .await;
    let (_b, bcfg) = start_daemon(d, "b", &addr, &s.token_file, &[("b", "b.db")], FAST).await;
    for (cfg, db) in [(&acfg, "one"), (&acfg, "two"), (&bcfg, "b")] {
        wait_connected_cli(cfg, db).await;
    }
    let st = status_json(&acfg, "one");
    for key in [
        "name",
        "connection",
        "session",
        "upload_paused",
        "download_paused",
        "pending_changes",
        "cursor",
        "hub_head",
        "last_error",
    ] {
        assert!(st.get(key).is_some(), "status --json lacks {key}: {st}");
    }
    // Pausing one database never affects another.
    let (code, out, err) = cli(&["pause", "one", "--config", c(&acfg)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("one: paused upload and download"), "{out}");
    wait_until("one paused", || {
        status_json(&acfg, "one")["session"] == "paused"
    })
    .await;
    assert_eq!(status_json(&acfg, "one")["connection"], "disconnected");
    insert(&d.join("a1.db"), "from-one");
    insert(&d.join("a2.db"), "from-two");
    wait_until("two's row on b", || has_row(&d.join("b.db"), "from-two")).await;
    assert!(
        !has_row(&d.join("b.db"), "from-one"),
        "a paused database sent a change"
    );
    wait_until("one counts its pending write", || {
        status_json(&acfg, "one")["pending_changes"] == 1
    })
    .await;
    // A wait on a paused direction fails at once with the reason.
    let (code, _, err) = cli(&["wait", "one", "--upload", "--config", c(&acfg)]);
    assert_eq!(code, 1);
    assert!(
        err.contains("paused") && err.contains("tether resume one"),
        "{err}"
    );
    let (code, _, err) = cli(&["resume", "one", "--config", c(&acfg)]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = cli(&["wait", "one", "--timeout", "20s", "--config", c(&acfg)]);
    assert_eq!(code, 0, "{out}{err}");
    wait_until("one's row on b", || has_row(&d.join("b.db"), "from-one")).await;

    // Upload-only pause lets downloads through.
    let (code, _, err) = cli(&["pause", "one", "--upload", "--config", c(&acfg)]);
    assert_eq!(code, 0, "{err}");
    wait_until("upload paused", || {
        status_json(&acfg, "one")["upload_paused"] == true
    })
    .await;
    insert(&d.join("a1.db"), "held-back");
    insert(&d.join("b.db"), "from-b");
    wait_until("b's row reaches one", || {
        has_row(&d.join("a1.db"), "from-b")
    })
    .await;
    wait_until("b's row reaches two", || {
        has_row(&d.join("a2.db"), "from-b")
    })
    .await;
    assert!(!has_row(&d.join("b.db"), "held-back"));
    // Still waiting, counted, while the session is live for downloads.
    let st = status_json(&acfg, "one");
    assert_eq!(
        (st["pending_changes"].as_u64(), st["connection"].as_str()),
        (Some(1), Some("connected")),
        "{st}"
    );
    let (code, _, _) = cli(&["resume", "one", "--upload", "--config", c(&acfg)]);
    assert_eq!(code, 0);

    // sync uploads then downloads and says what it did.
    insert(&d.join("a2.db"), "for-sync");
    let (code, out, err) = cli(&["sync", "two", "--json", "--config", c(&acfg)]);
    assert_eq!(code, 0, "{err}");
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["type"], "sync", "{out}");
    // The row went out during the call or just before it (the session is
    // live); either way nothing is pending once sync returns, and the call
    // counts at most that one row.
    assert!(
        last["upload"]["applied"].as_u64().is_some_and(|n| n <= 1),
        "{out}"
    );
    assert_eq!(status_json(&acfg, "two")["pending_changes"], 0, "{out}");
    wait_until("the synced row on b", || {
        has_row(&d.join("b.db"), "for-sync")
    })
    .await;
    wait_until("held-back row arrives after resume", || {
        has_row(&d.join("b.db"), "held-back")
    })
    .await;

    // Unknown database: the known ones are listed.
    let (code, _, err) = cli(&["status", "nope", "--config", c(&acfg)]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no database named \"nope\"") && err.contains("one, two"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_times_out_with_its_own_exit_code_while_the_hub_is_down() {
    let s = setup();
    let d = s.dir.path();
    let (hub, addr) = start_hub(d, "127.0.0.1:0", &s.token_hash, "hub").await;
    let (_a, acfg) = start_daemon(d, "a", &addr, &s.token_file, &[("one", "a1.db")], FAST).await;
    wait_connected_cli(&acfg, "one").await;
    insert(&d.join("a1.db"), "r1");
    let (code, _, err) = wait_upload(&acfg, "one", "20s");
    assert_eq!(code, 0, "a wait returns once the hub acknowledged: {err}");
    assert_eq!(status_json(&acfg, "one")["pending_changes"], 0);
    drop(hub);
    wait_until("disconnected", || {
        status_json(&acfg, "one")["connection"] != "connected"
    })
    .await;
    insert(&d.join("a1.db"), "r2");
    let (code, _, err) = wait_upload(&acfg, "one", "300ms");
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("timed out") && err.contains("background"),
        "{err}"
    );
    // The hub comes back on its port; the change goes out.
    let (_hub, _) = start_hub(d, &addr, &s.token_hash, "hub2").await;
    let (code, _, err) = wait_upload(&acfg, "one", "20s");
    assert_eq!(code, 0, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_wakes_a_session_in_a_long_backoff() {
    let s = setup();
    let d = s.dir.path();
    // The daemon starts with no hub behind its address.
    let gate = Gate::start().await;
    let slow = "initial = \"300s\"\nmax = \"600s\"";
    let (_a, acfg) =
        start_daemon(d, "a", &gate.addr, &s.token_file, &[("one", "a1.db")], slow).await;
    // Full jitter draws each delay between 0 and the exponential value, so a
    // draw may be short; a short one is over soon and the next is drawn.
    wait_until("in a backoff of at least 20 s", || {
        status_json(&acfg, "one")["backoff_ms"]
            .as_u64()
            .is_some_and(|ms| ms >= 20_000)
    })
    .await;
    let (_hub, addr) = start_hub(d, "127.0.0.1:0", &s.token_hash, "hub").await;
    gate.open_to(&addr);
    let asked = std::time::Instant::now();
    let (code, out, err) = cli(&["reconnect", "--config", c(&acfg)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("one: woken"), "{out}");
    // Well inside the backoff it was woken from (at least 20 s).
    let sock = d.join("a.sock");
    tokio::time::timeout(Duration::from_secs(10), wait_connected(&sock, "one"))
        .await
        .expect("connected at once, not after the backoff");
    assert!(asked.elapsed() < Duration::from_secs(10));
    let (_, out, _) = cli(&["reconnect", "--json", "--config", c(&acfg)]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["sessions"][0]["outcome"], "already_connected", "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_reaches_all_and_watch_sees_a_hub_restart() {
    let s = setup();
    let d = s.dir.path();
    let (hub, addr) = start_hub(d, "127.0.0.1:0", &s.token_hash, "hub").await;
    let (_a, acfg) = start_daemon(d, "a", &addr, &s.token_file, &[("one", "a1.db")], FAST).await;
    wait_connected_cli(&acfg, "one").await;
    cli(&["pause", "one", "--upload", "--config", c(&acfg)]);
    wait_until("paused", || {
        status_json(&acfg, "one")["upload_paused"] == true
    })
    .await;
    {
        let c = rusqlite::Connection::open(d.join("a1.db")).unwrap();
        let tx = c.unchecked_transaction().unwrap();
        for i in 0..500 {
            tx.execute(
                "INSERT INTO notes VALUES (?1, 't', 'body', ?2)",
                rusqlite::params![format!("p{i}"), i],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    wait_until("captured", || {
        status_json(&acfg, "one")["pending_changes"] == 500
    })
    .await;
    // Progress of the outstanding upload: its first line (the target) is
    // out before the resume, so it follows the whole transfer.
    let mut progress = Follow::start(&[
        "progress",
        "one",
        "--upload",
        "--json",
        "--config",
        c(&acfg),
    ]);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut lines = vec![progress.next(deadline, "the first progress line").await];
    assert_eq!(lines[0]["transferred_changes"], 0, "{}", lines[0]);
    let (code, _, err) = cli(&["resume", "one", "--config", c(&acfg)]);
    assert_eq!(code, 0, "{err}");
    while lines.last().unwrap()["type"] != "done" {
        lines.push(progress.next(deadline, "the progress to end").await);
    }
    let last_progress = lines
        .iter()
        .rev()
        .find(|l| l["type"] == "progress")
        .expect("progress lines");
    assert_eq!(
        last_progress["transferable_changes"], 500,
        "{last_progress}"
    );
    assert_eq!(last_progress["transferred_changes"], 500, "{last_progress}");
    assert!(last_progress["transferred_bytes"].as_u64().unwrap() > 500 * 8);
    assert_eq!(lines.last().unwrap()["type"], "done");

    // watch reports the connection going down and coming back.
    let mut watch = Killed(
        std::process::Command::new(bin())
            .args(["watch", "one", "--json", "--config", c(&acfg)])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = watch.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(256);
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    // The watch is registered once its first line, the snapshot, arrives.
    let first = tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .expect("watch snapshot in time")
        .expect("watch output");
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["type"], "watching", "{first}");
    assert_eq!(first["databases"][0]["connection"], "connected", "{first}");
    drop(hub);
    let (_hub2, _) = start_hub(d, &addr, &s.token_hash, "hub2").await;
    let mut seen = Vec::new();
    let want = [
        "connected->disconnected",
        "disconnected->connecting",
        "connecting->connected",
    ];
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !want.iter().all(|w| seen.contains(&w.to_string())) {
        let line = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("watch saw only {seen:?}"))
            .expect("watch output");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["event"]["event"] == "connection" {
            seen.push(format!(
                "{}->{}",
                v["event"]["old"].as_str().unwrap(),
                v["event"]["new"].as_str().unwrap()
            ));
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    // The daemon carries on after the watcher went away.
    assert_eq!(status_json(&acfg, "one")["connection"], "connected");

    // A watch whose reader hangs up (`tether watch | head -1`) ends quietly
    // at its next line instead of panicking on the closed pipe.
    let mut watch = std::process::Command::new(bin())
        .args(["watch", "one", "--config", c(&acfg)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::BufRead;
        let mut first = String::new();
        let mut stdout = std::io::BufReader::new(watch.stdout.take().unwrap());
        stdout.read_line(&mut first).unwrap();
        assert!(first.starts_with("one (dataset"), "{first}");
    }
    // Events for the watch to print into the closed pipe.
    cli(&["pause", "one", "--config", c(&acfg)]);
    cli(&["resume", "one", "--config", c(&acfg)]);
    let pid = watch.id().to_string();
    let out = tokio::time::timeout(
        DEADLINE,
        tokio::task::spawn_blocking(move || watch.wait_with_output().unwrap()),
    )
    .await
    .unwrap_or_else(|_| {
        // Not left running behind a failed test.
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status();
        panic!("the watch did not end once its reader was gone")
    })
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_socket_survives_garbage_and_guards_its_path() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let s = setup();
    let d = s.dir.path();
    let (_hub, addr) = start_hub(d, "127.0.0.1:0", &s.token_hash, "hub").await;
    let (a, acfg) = start_daemon(d, "a", &addr, &s.token_file, &[("one", "a1.db")], FAST).await;
    let sock = d.join("a.sock");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o660
    );
    // Made in a private directory beside it and linked into place: none
    // is left; the lock that keeps a second daemon off the path is there.
    let leftovers: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tether-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(d.join("a.sock.lock").exists());
    let stream = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    w.write_all(b"this is not json\n{\"cmd\":\"launch\"}\n{\"cmd\":\"status\"\n")
        .await
        .unwrap();
    for _ in 0..3 {
        let l = lines.next_line().await.unwrap().unwrap();
        assert!(l.contains("bad_request"), "{l}");
    }
    w.write_all(b"{\"cmd\":\"status\"}\n").await.unwrap();
    let l = lines.next_line().await.unwrap().unwrap();
    assert!(l.contains("\"databases\""), "{l}");
    // A huge line is refused and the connection closed; others carry on.
    // The daemon may close before all of it is written (a broken pipe
    // here); what matters is its answer.
    let _ = w.write_all(&vec![b'x'; 200 * 1024]).await;
    let l = lines.next_line().await.unwrap().unwrap_or_default();
    assert!(l.contains("longer than"), "{l}");
    // A client that hangs up in the middle of a stream.
    {
        let mut s2 = tokio::net::UnixStream::connect(&sock).await.unwrap();
        s2.write_all(b"{\"cmd\":\"watch\"}\n").await.unwrap();
    }
    wait_connected_cli(&acfg, "one").await;
    // A second daemon on the same socket refuses to start.
    let second = Proc::spawn(&["daemon", "--config", c(&acfg)], d.join("second.log"));
    let out = tokio::task::spawn_blocking(move || {
        let mut second = second;
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(s) = second.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "a second daemon on the same socket kept running: {}",
                second.log_text()
            );
            std::thread::park_timeout(Duration::from_millis(10));
        };
        (status, second.log_text())
    })
    .await
    .unwrap();
    assert!(!out.0.success());
    assert!(
        out.1.contains("another tether daemon is running"),
        "{}",
        out.1
    );
    // SIGTERM: clean exit, socket removed; a stale socket file is replaced.
    assert!(a.terminate().success());
    assert!(!sock.exists(), "socket removed on exit");
    let stale = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    drop(stale);
    assert!(sock.exists());
    let (_a2, _) = start_daemon(d, "a", &addr, &s.token_file, &[("one", "a1.db")], FAST).await;
    wait_connected_cli(&acfg, "one").await;
    // No daemon: a clear message and exit 69.
    let (code, _, err) = cli(&["status", "--socket", c(&d.join("none.sock"))]);
    assert_eq!(code, 69);
    assert!(
        err.contains("no tether daemon is listening") && err.contains("tether daemon --config"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_syncs_without_a_daemon_and_refuses_a_database_a_daemon_owns() {
    let s = setup();
    let d = s.dir.path();
    let (_hub, addr) = start_hub(d, "127.0.0.1:0", &s.token_hash, "hub").await;
    let (_b, bcfg) = start_daemon(d, "b", &addr, &s.token_file, &[("b", "b.db")], FAST).await;
    wait_connected_cli(&bcfg, "b").await;
    insert(&d.join("b.db"), "from-b");
    let (code, _, err) = wait_upload(&bcfg, "b", "20s");
    assert_eq!(code, 0, "{err}");
    insert(&d.join("a1.db"), "from-a");
    // Write a config for `once` without starting a daemon.
    let cfg = d.join("once.toml");
    std::fs::write(
        &cfg,
        format!(
            "control_socket = \"{}\"\n[hub]\nurl = \"ws://{addr}/v1/sync\"\ntoken_file = \"{}\"\n[[database]]\nname = \"one\"\ndataset = \"notes\"\npath = \"{}\"\ntables = [\"notes\"]\n",
            d.join("once.sock").display(),
            c(&s.token_file),
            d.join("a1.db").display()
        ),
    )
    .unwrap();
    let (code, out, err) = cli(&["once", "--config", c(&cfg)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("one: ok: downloaded 1, uploaded 1"), "{out}");
    assert!(has_row(&d.join("a1.db"), "from-b"));
    wait_until("A's row reaches B", || has_row(&d.join("b.db"), "from-a")).await;
    // A database a running daemon owns is refused, with the reason.
    let (code, out, err) = cli(&["once", "b", "--timeout", "20s", "--config", c(&bcfg)]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("already synced by another tether process"),
        "{out}"
    );
    let (code, _, err) = cli(&["once", "nope", "--config", c(&bcfg)]);
    assert_eq!(code, 1);
    assert!(err.contains("known: b"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_loses_and_duplicates_nothing() {
    use rand::Rng;
    let s = setup();
    let d = s.dir.path();
    let (_hub, addr) = start_hub(d, "127.0.0.1:0", &s.token_hash, "hub").await;
    let (_b, bcfg) = start_daemon(d, "b", &addr, &s.token_file, &[("b", "b.db")], FAST).await;
    let (mut a, acfg) = start_daemon(d, "a", &addr, &s.token_file, &[("one", "a1.db")], FAST).await;
    let app_a = app(&d.join("a1.db"), "SELECT 1");
    let mut rng = rand::thread_rng();
    let mut written = 0i64;
    for round in 0..4 {
        // The app writes while the daemon uploads; the daemon dies mid-way.
        for batch in 0..rng.gen_range(5..20) {
            let tx = app_a.unchecked_transaction().unwrap();
            for i in 0..200 {
                tx.execute(
                    "INSERT INTO notes VALUES (?1, 't', 'body', ?2)",
                    rusqlite::params![format!("k{round}-{batch}-{i}"), i],
                )
                .unwrap();
                written += 1;
            }
            tx.commit().unwrap();
        }
        let _ = a.child.kill();
        let _ = a.child.wait();
        // Writes go on while the daemon is dead.
        app_a
            .execute(
                "INSERT INTO notes VALUES (?1, 'while dead', '', 0)",
                [format!("dead{round}")],
            )
            .unwrap();
        written += 1;
        a = start_daemon(d, "a", &addr, &s.token_file, &[("one", "a1.db")], FAST)
            .await
            .0;
    }
    let b = rusqlite::Connection::open(d.join("b.db")).unwrap();
    wait_converged(&app_a, &b, "notes").await;
    assert_eq!(count(&b, "notes"), written);
    wait_until("A idle", || {
        status_json(&acfg, "one")["pending_changes"] == 0
    })
    .await;
    let hub = rusqlite::Connection::open(d.join("hub.db")).unwrap();
    let (n, distinct): (i64, i64) = hub
        .query_row("SELECT count(*), count(DISTINCT pk) FROM log_1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(
        (n, distinct),
        (written, written),
        "each write reached the hub exactly once"
    );
    let _ = bcfg;
}

fn write_cfg(path: &Path, sock: &Path, addr: &str, token_file: &Path, dbs: &[(&str, &Path, &str)]) {
    let mut text = format!(
        "control_socket = \"{}\"\n[hub]\nurl = \"ws://{addr}/v1/sync\"\ntoken_file = \"{}\"\n[reconnect]\n{FAST}\n",
        sock.display(),
        token_file.display()
    );
    for (name, file, conflict) in dbs {
        text.push_str(&format!(
            "[[database]]\nname = \"{name}\"\npath = \"{}\"\ndataset = \"notes\"\ntables = [\"notes\"]\nconflict = \"{conflict}\"\n",
            file.display()
        ));
    }
    std::fs::write(path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_removes_and_restarts_while_untouched_sessions_stay_connected() {
    let s = setup();
    let d = s.dir.path();
    let (_hub, addr) = start_hub(d, "127.0.0.1:0", &s.token_hash, "hub").await;
    let (a, cfg) = start_daemon(
        d,
        "a",
        &addr,
        &s.token_file,
        &[("one", "a1.db"), ("two", "a2.db")],
        FAST,
    )
    .await;
    let sock = d.join("a.sock");
    for db in ["one", "two"] {
        wait_connected_cli(&cfg, db).await;
    }
    let connects = status_json(&cfg, "one")["connects"].as_u64().unwrap();
    let (a1, a2, b) = (d.join("a1.db"), d.join("a2.db"), d.join("b.db"));
    // two goes away, three (b.db) arrives, one is untouched.
    write_cfg(
        &cfg,
        &sock,
        &addr,
        &s.token_file,
        &[("one", &a1, "server_wins"), ("three", &b, "server_wins")],
    );
    let (code, out, err) = cli(&["reload", "--config", c(&cfg)]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("added three; removed two; restarted -; unchanged one"),
        "{out}"
    );
    wait_connected_cli(&cfg, "three").await;
    let (code, _, err) = cli(&["status", "two", "--config", c(&cfg)]);
    assert_eq!(code, 1, "two is gone: {err}");
    let one = status_json(&cfg, "one");
    assert_eq!(one["connection"], "connected");
    assert_eq!(
        one["connects"].as_u64().unwrap(),
        connects,
        "one kept its connection"
    );
    // A changed database is restarted; the others are not.
    write_cfg(
        &cfg,
        &sock,
        &addr,
        &s.token_file,
        &[("one", &a1, "client_wins"), ("three", &b, "server_wins")],
    );
    let (code, out, err) = cli(&["reload", "--json", "--config", c(&cfg)]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        v["report"]["restarted"],
        serde_json::json!(["one"]),
        "{out}"
    );
    assert_eq!(
        v["report"]["unchanged"],
        serde_json::json!(["three"]),
        "{out}"
    );
    wait_connected_cli(&cfg, "one").await;
    // An invalid file is refused as a whole; the old config keeps working.
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg).unwrap() + "colour = \"red\"\n",
    )
    .unwrap();
    let (code, _, err) = cli(&["reload", "--socket", c(&sock)]);
    assert_eq!(code, 1);
    assert!(
        err.contains("reload refused") && err.contains("colour"),
        "{err}"
    );
    insert(&a1, "after-bad-reload");
    insert(&b, "three-still-syncs");
    wait_until("old config still syncs", || {
        has_row(&b, "after-bad-reload") && has_row(&a1, "three-still-syncs")
    })
    .await;
    // SIGHUP does the same as `tether reload`.
    write_cfg(
        &cfg,
        &sock,
        &addr,
        &s.token_file,
        &[
            ("one", &a1, "client_wins"),
            ("two", &a2, "server_wins"),
            ("three", &b, "server_wins"),
        ],
    );
    let _ = std::process::Command::new("kill")
        .args(["-HUP", &a.child.id().to_string()])
        .status();
    wait_until("two back after SIGHUP", || {
        let (code, out, _) = cli(&["status", "two", "--json", "--socket", c(&sock)]);
        code == 0 && out.contains("\"connection\":\"connected\"")
    })
    .await;
    assert!(a.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_download_waits_for_what_the_hub_holds_now_not_the_head_last_heard_of() {
    const ROWS: i64 = 5_000;
    let s = setup();
    let d = s.dir.path();
    let (_hub, addr) = start_hub(d, "127.0.0.1:0", &s.token_hash, "hub").await;
    let (_a, acfg) = start_daemon(d, "a", &addr, &s.token_file, &[("a", "a1.db")], FAST).await;
    let (b, bcfg) = start_daemon(d, "b", &addr, &s.token_file, &[("b", "b.db")], FAST).await;
    wait_connected_cli(&acfg, "a").await;
    wait_connected_cli(&bcfg, "b").await;
    // B takes nothing for a moment (a suspended or busy device) while A
    // uploads: its idea of the hub's head is now stale.
    let pid = b.child.id().to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, pid.as_str()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    };
    signal("-STOP");
    {
        let c = rusqlite::Connection::open(d.join("a1.db")).unwrap();
        let tx = c.unchecked_transaction().unwrap();
        for i in 0..ROWS {
            tx.execute(
                "INSERT INTO notes (id, title, body) VALUES (?1, 't', ?2)",
                rusqlite::params![format!("w{i:05}"), "x".repeat(200)],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    let (code, _, err) = wait_upload(&acfg, "a", "60s");
    signal("-CONT");
    assert_eq!(code, 0, "{err}");
    // Right away: the wait must not end before B holds all of it.
    let (code, out, err) = cli(&[
        "wait",
        "b",
        "--download",
        "--timeout",
        "60s",
        "--config",
        c(&bcfg),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let n: i64 = rusqlite::Connection::open(d.join("b.db"))
        .unwrap()
        .query_row("SELECT count(*) FROM notes", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, ROWS, "wait --download returned with {n} of {ROWS} rows");
}

// ---------------------------------------------------------------------
// Bounded helpers: every CLI run and every followed stream has a deadline.

/// Runs a CLI command, killed if it has not finished within `limit`;
/// returns exit code, stdout, stderr and how long it took.
fn cli_within(args: &[&str], limit: Duration) -> (i32, String, String, Duration) {
    let started = std::time::Instant::now();
    let child = std::process::Command::new(bin())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tether runs");
    let pid = child.id().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => {
            let out = out.unwrap();
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
                started.elapsed(),
            )
        }
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid])
                .status();
            panic!(
                "`tether {}` did not finish within {limit:?}",
                args.join(" ")
            );
        }
    }
}

/// [`cli_within`] off the async runtime (the test's own tasks keep running).
async fn cli_async(args: &[&str], limit: Duration) -> (i32, String, String, Duration) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli_within(&args, limit)
    })
    .await
    .unwrap()
}

/// A bounded CLI run.
const CLI_LIMIT: Duration = Duration::from_secs(20);

/// A child process killed when dropped (a failing test leaves none behind).
struct Killed(std::process::Child);

impl std::ops::Deref for Killed {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Killed {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port held for a hub that is not there yet: connections are cut at once
/// until [`Gate::open_to`] names the hub, then forwarded to it. Nothing else
/// can take the port in between (no port reserved by binding and letting go).
struct Gate {
    addr: String,
    target: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    async fn start() -> Gate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let target = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
        let t = target.clone();
        let task = tokio::spawn(async move {
            // Bounded: a test connects a few hundred times at most.
            for _ in 0..10_000 {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let Some(hub) = t.lock().unwrap().clone() else {
                    continue; // dropped: the hub is not there
                };
                tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(hub).await {
                        let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                    }
                });
            }
        });
        Gate { addr, target, task }
    }

    fn open_to(&self, hub: &str) {
        *self.target.lock().unwrap() = Some(hub.to_owned());
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `tether status DB --json` (bounded), the database's object and the
/// daemon's state; `None` when the daemon did not answer.
async fn status_of(sock: &Path, db: &str) -> Option<(serde_json::Value, serde_json::Value)> {
    let (code, out, _, _) =
        cli_async(&["status", db, "--json", "--socket", c(sock)], CLI_LIMIT).await;
    if code != 0 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("status is JSON");
    Some((v["databases"][0].clone(), v["daemon"].clone()))
}

/// Waits until `status` (bounded) reports the database connected.
async fn wait_connected(sock: &Path, db: &str) {
    wait_for(&format!("{db} connected"), || async {
        status_of(sock, db)
            .await
            .is_some_and(|(st, _)| st["connection"] == "connected")
    })
    .await;
}

/// A streaming CLI command whose stdout lines are read with a deadline;
/// killed when dropped.
struct Follow {
    child: std::process::Child,
    lines: tokio::sync::mpsc::Receiver<String>,
}

impl Follow {
    fn start(args: &[&str]) -> Follow {
        let mut child = std::process::Command::new(bin())
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tether runs");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = tokio::sync::mpsc::channel(1024);
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.blocking_send(line).is_err() {
                    break;
                }
            }
        });
        Follow { child, lines }
    }

    /// The next line as JSON; fails the test at `deadline` or at the end of
    /// the output.
    async fn next(&mut self, deadline: tokio::time::Instant, what: &str) -> serde_json::Value {
        let line = tokio::time::timeout_at(deadline, self.lines.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .unwrap_or_else(|| panic!("the output ended before {what}"));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A hub process with the given tokens (SHA-256, read-only) for dataset
/// `notes`, dropping clients silent for `read_timeout`.
async fn start_hub_with(dir: &Path, tokens: &[(&str, bool)], read_timeout: &str) -> (Proc, String) {
    let cfg = dir.join("hub.toml");
    let mut text = format!(
        "listen = \"127.0.0.1:0\"\nstore = \"sqlite:{}\"\nread_timeout = \"{read_timeout}\"\n[[dataset]]\nname = \"notes\"\ntables = [\"notes\"]\n",
        dir.join("hub.db").display()
    );
    for (i, (hash, read_only)) in tokens.iter().enumerate() {
        let access = if *read_only {
            "read_only"
        } else {
            "read_write"
        };
        text.push_str(&format!(
            "[[token]]\nname = \"t{i}\"\nsha256 = \"{hash}\"\ndatasets = [\"*\"]\naccess = \"{access}\"\n"
        ));
    }
    std::fs::write(&cfg, text).unwrap();
    let p = Proc::spawn(&["hub", "--config", c(&cfg)], dir.join("hub.log"));
    let addr = wait_log_field(&p, "hub started", "listen").await;
    (p, addr)
}

/// Sends a signal to a process.
fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Inserts `n` rows in one transaction.
fn insert_many(db: &Path, prefix: &str, n: usize, body: &str) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    let tx = c.unchecked_transaction().unwrap();
    for i in 0..n {
        tx.execute(
            "INSERT INTO notes VALUES (?1, 't', ?2, ?3)",
            rusqlite::params![format!("{prefix}{i}"), body, i as i64],
        )
        .unwrap();
    }
    tx.commit().unwrap();
}

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_token_shows_why_writes_wait_and_wait_upload_fails_at_once() {
    let s = setup();
    let d = s.dir.path();
    let ro_token = tether::hub::auth::new_token();
    let ro_file = d.join("ro-token");
    std::fs::write(&ro_file, &ro_token).unwrap();
    let ro_hash = tether::hub::auth::hash_token(&ro_token);
    let (_hub, addr) = start_hub_with(d, &[(&s.token_hash, false), (&ro_hash, true)], "60s").await;
    let (_a, _) = start_daemon(d, "a", &addr, &ro_file, &[("one", "a1.db")], FAST).await;
    let (_b, _) = start_daemon(d, "b", &addr, &s.token_file, &[("b", "b.db")], FAST).await;
    let sock = d.join("a.sock");
    wait_connected(&d.join("b.sock"), "b").await;
    // The welcome says read-only: known before any upload is tried.
    wait_for("one connected with a read-only token", || async {
        status_of(&sock, "one")
            .await
            .is_some_and(|(st, _)| st["connection"] == "connected" && st["upload"] == "read_only")
    })
    .await;
    insert_many(&d.join("a1.db"), "ro", 3, "b");
    wait_for("three writes pending", || async {
        status_of(&sock, "one")
            .await
            .is_some_and(|(st, _)| st["pending_changes"] == 3)
    })
    .await;
    let (st, _) = status_of(&sock, "one").await.unwrap();
    assert_eq!(st["session"], "active", "{st}");
    let (code, out, err, _) = cli_async(&["status", "one", "--socket", c(&sock)], CLI_LIMIT).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("upload:      refused: the hub token is read-only; 3 local changes wait"),
        "{out}"
    );
    // A wait without --timeout fails at once instead of hanging.
    let (code, _, err, took) = cli_async(
        &["wait", "one", "--upload", "--socket", c(&sock)],
        CLI_LIMIT,
    )
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(
        err.contains("one: 3 local changes cannot be uploaded")
            && err.contains("read-only")
            && err.contains("read_write token"),
        "{err}"
    );
    // Downloads go on.
    insert(&d.join("b.db"), "from-b");
    wait_until("b's row reaches one", || {
        has_row(&d.join("a1.db"), "from-b")
    })
    .await;
    let (code, _, err, _) = cli_async(
        &[
            "wait",
            "one",
            "--download",
            "--timeout",
            "15s",
            "--socket",
            c(&sock),
        ],
        CLI_LIMIT,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        !has_row(&d.join("b.db"), "ro0"),
        "a read-only change went out"
    );
}

/// A loopback TCP proxy that counts the bytes a client sends and can hold
/// back what the server answers (the answers wait in the proxy until it is
/// let go): an upload that reached the hub but whose answer is in transit.
struct Holdback {
    addr: String,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    hold: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Holdback {
    async fn start(target: String) -> Holdback {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (hold, held) = tokio::sync::watch::channel(false);
        let counter = sent.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = cr.read(&mut buf).await {
                        counter.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                    let _ = sw.shutdown().await;
                });
                let mut held = held.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = sr.read(&mut buf).await {
                        if held.wait_for(|h| !*h).await.is_err() {
                            return;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                    let _ = cw.shutdown().await;
                });
            }
        });
        Holdback {
            addr,
            sent,
            hold,
            task,
        }
    }

    /// Bytes the clients sent so far.
    fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Holds (true) or lets go of (false) the server's answers.
    fn hold(&self, on: bool) {
        self.hold.send_replace(on);
    }
}

impl Drop for Holdback {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_daemon_dying_while_an_upload_drains_and_the_socket_goes_with_the_last_session(
) {
    let s = setup();
    let d = s.dir.path();
    let (_hub, addr) = start_hub_with(d, &[(&s.token_hash, false)], "60s").await;
    let proxy = Holdback::start(addr).await;
    // Nothing received for a while must not end the drain before the test
    // lets the answer through: long read timeout and shutdown timeout.
    let patient =
        "initial = \"100ms\"\nmax = \"1s\"\nping_interval = \"1s\"\nread_timeout = \"60s\"";
    let (mut a, _) = start_daemon_with(
        d,
        "a",
        &proxy.addr,
        &s.token_file,
        &[("one", "a1.db")],
        patient,
        "shutdown_timeout = \"60s\"",
    )
    .await;
    let sock = d.join("a.sock");
    wait_connected(&sock, "one").await;
    // One upload reaches the hub; its answer is held in the proxy.
    proxy.hold(true);
    let before = proxy.sent();
    let body: String = {
        use rand::Rng;
        let mut rng = rand::thread_rng();
        (0..20_000).map(|_| rng.gen_range('a'..='z')).collect()
    };
    insert_many(&d.join("a1.db"), "drain", 1, &body);
    wait_until("the upload is sent", || proxy.sent() > before + 20_000).await;
    signal(a.child.id(), "-TERM");
    // The drain is visible: the daemon dying, the session dying.
    wait_for("status shows the drain", || async {
        status_of(&sock, "one")
            .await
            .is_some_and(|(st, daemon)| daemon == "dying" && st["session"] == "dying")
    })
    .await;
    let (code, out, err, _) = cli_async(&["status", "--socket", c(&sock)], CLI_LIMIT).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("daemon: dying"), "{out}");
    // Nothing new starts while it drains.
    for cmd in [
        &["wait", "one", "--upload", "--timeout", "10s"][..],
        &["sync", "one", "--timeout", "10s"][..],
        &["reconnect"][..],
    ] {
        let mut args = cmd.to_vec();
        args.extend(["--socket", c(&sock)]);
        let (code, _, err, _) = cli_async(&args, CLI_LIMIT).await;
        assert_eq!(code, 1, "{cmd:?}: {err}");
        assert!(
            err.contains("the daemon is shutting down"),
            "{cmd:?}: {err}"
        );
    }
    assert!(
        a.child.try_wait().unwrap().is_none(),
        "the daemon left before its drain"
    );
    // The answer arrives: the last session stops, the daemon exits and its
    // socket goes.
    proxy.hold(false);
    wait_until("the daemon exits", || a.child.try_wait().unwrap().is_some()).await;
    assert!(a.child.wait().unwrap().success());
    assert!(
        !sock.exists(),
        "socket removed once the last session stopped"
    );
    let log = a.log_text();
    assert!(
        !log.contains("shutting down with unanswered uploads"),
        "the drain ended on the answer, not on its timeout: {log}"
    );
}

/// Checks what every progress line promises: nothing done beyond the total.
fn check_progress(p: &serde_json::Value) {
    let n = |k: &str| p[k].as_u64().unwrap_or_else(|| panic!("{k} in {p}"));
    assert!(
        n("transferred_changes") <= n("transferable_changes"),
        "done > total: {p}"
    );
    if p["direction"] == "upload" {
        assert!(
            n("transferred_bytes") <= n("transferable_bytes"),
            "bytes done > total: {p}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_follow_takes_in_writes_and_hub_changes_that_arrive_while_it_follows() {
    let s = setup();
    let d = s.dir.path();
    let (_hub, addr) = start_hub_with(d, &[(&s.token_hash, false)], "60s").await;
    let (_a, _) = start_daemon(d, "a", &addr, &s.token_file, &[("one", "a1.db")], FAST).await;
    let (_b, _) = start_daemon(d, "b", &addr, &s.token_file, &[("b", "b.db")], FAST).await;
    let (asock, bsock) = (d.join("a.sock"), d.join("b.sock"));
    wait_connected(&asock, "one").await;
    wait_connected(&bsock, "b").await;
    let mut follow = Follow::start(&[
        "progress",
        "one",
        "--follow",
        "--json",
        "--socket",
        c(&asock),
    ]);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    // Reads progress lines until one of `dir` satisfies `want`; returns it.
    async fn until(
        follow: &mut Follow,
        deadline: tokio::time::Instant,
        dir: &str,
        what: &str,
        want: impl Fn(u64, u64) -> bool,
    ) -> serde_json::Value {
        loop {
            let p = follow.next(deadline, what).await;
            assert_eq!(p["type"], "progress", "{p}");
            check_progress(&p);
            let n = |k: &str| p[k].as_u64().unwrap();
            if p["direction"] == dir && want(n("transferred_changes"), n("transferable_changes")) {
                return p;
            }
        }
    }
    until(
        &mut follow,
        deadline,
        "upload",
        "the first upload line",
        |_, _| true,
    )
    .await;
    // Local writes made while it follows are added to its upload total.
    insert_many(&d.join("a1.db"), "f", 5, "b");
    until(
        &mut follow,
        deadline,
        "upload",
        "5 uploads counted and done",
        |done, total| total >= 5 && done == total,
    )
    .await;
    // The hub's changes made while it follows are added to its download
    // total (this device's own uploads move the hub's head too).
    let mut down = until(
        &mut follow,
        deadline,
        "download",
        "a download line",
        |done, total| done == total && total >= 5,
    )
    .await;
    let seen = down["transferable_changes"].as_u64().unwrap();
    insert_many(&d.join("b.db"), "g", 4, "b");
    down = until(
        &mut follow,
        deadline,
        "download",
        "4 more downloads counted and done",
        |done, total| total >= seen + 4 && done == total,
    )
    .await;
    assert!(has_row(&d.join("a1.db"), "g3"), "{down}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_reports_every_batch_answered_during_the_call_not_the_last_one() {
    // More rows than fit in one upload batch.
    const ROWS: usize = 10_000;
    let s = setup();
    let d = s.dir.path();
    // The hub is stopped for a moment below: it must not take that for a
    // silent client, nor the daemon for a dead hub.
    let (hub, addr) = start_hub_with(d, &[(&s.token_hash, false)], "60s").await;
    let patient =
        "initial = \"100ms\"\nmax = \"1s\"\nping_interval = \"1s\"\nread_timeout = \"60s\"";
    let (_a, _) = start_daemon(d, "a", &addr, &s.token_file, &[("one", "a1.db")], patient).await;
    let sock = d.join("a.sock");
    wait_connected(&sock, "one").await;
    // The writes are captured (and may be sent) while the hub answers
    // nothing; the sync starts before any answer.
    signal(hub.child.id(), "-STOP");
    insert_many(&d.join("a1.db"), "s", ROWS, "b");
    let mut sync = Follow::start(&[
        "sync",
        "one",
        "--json",
        "--timeout",
        "60s",
        "--socket",
        c(&sock),
    ]);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let first = sync.next(deadline, "the first line of sync").await;
    signal(hub.child.id(), "-CONT");
    assert_eq!(first["type"], "progress", "{first}");
    let last = loop {
        let l = sync.next(deadline, "the end of sync").await;
        if l["type"] != "progress" {
            break l;
        }
        check_progress(&l);
    };
    assert_eq!(last["type"], "sync", "{last}");
    let up = &last["upload"];
    assert_eq!(up["applied"], ROWS, "{last}");
    assert_eq!(up["total"], ROWS, "{last}");
    assert!(up["batches"].as_u64().unwrap() >= 3, "{last}");
    assert_eq!(last["uploaded"], ROWS, "{last}");
    // Its own changes are not downloads.
    assert_eq!(last["downloaded"], 0, "{last}");
    assert_eq!(
        status_of(&sock, "one").await.unwrap().0["pending_changes"],
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_connects_now_instead_of_waiting_out_a_backoff() {
    let s = setup();
    let d = s.dir.path();
    // The daemon starts with no hub behind its address and draws long
    // backoff delays (uniform up to 600 s at first).
    let gate = Gate::start().await;
    let slow = "initial = \"600s\"\nmax = \"1200s\"";
    let (_a, _) = start_daemon(d, "a", &gate.addr, &s.token_file, &[("one", "a1.db")], slow).await;
    let sock = d.join("a.sock");
    wait_for("in a long backoff", || async {
        status_of(&sock, "one")
            .await
            .is_some_and(|(st, _)| st["backoff_ms"].as_u64().is_some_and(|ms| ms >= 30_000))
    })
    .await;
    let (_hub, addr) = start_hub(d, "127.0.0.1:0", &s.token_hash, "hub").await;
    gate.open_to(&addr);
    insert(&d.join("a1.db"), "now");
    let (code, out, err, _) = cli_async(
        &[
            "sync",
            "one",
            "--json",
            "--timeout",
            "15s",
            "--socket",
            c(&sock),
        ],
        CLI_LIMIT,
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["upload"]["applied"], 1, "{last}");
}

// ---------------------------------------------------------------------
// The control socket as a careless or hostile client meets it.

/// A daemon with `[control]` settings `control` and one database, whose
/// hub never answers (nothing listens on its port: it keeps retrying);
/// returns it and its socket once the socket listens.
async fn start_guarded(dir: &Path, control: &str) -> (Proc, std::path::PathBuf) {
    let cfg = dir.join("guarded.toml");
    let sock = dir.join("guarded.sock");
    app(&dir.join("g.db"), NOTES);
    std::fs::write(
        &cfg,
        format!(
            "control_socket = \"{}\"\n[control]\n{control}\n[hub]\nurl = \"ws://127.0.0.1:9/v1/sync\"\ntoken = \"t\"\n[[database]]\nname = \"one\"\npath = \"{}\"\ntables = [\"notes\"]\n",
            sock.display(),
            dir.join("g.db").display()
        ),
    )
    .unwrap();
    let mut p = Proc::spawn(&["daemon", "--config", c(&cfg)], dir.join("guarded.log"));
    wait_until("the control socket listens", || {
        p.assert_running();
        p.log_text().contains("control socket listening")
    })
    .await;
    (p, sock)
}

/// Every line a raw client receives until the daemon hangs up; what came
/// before the deadline, with a last `null` if it did not hang up by then.
async fn lines_until_closed(s: tokio::net::UnixStream) -> Vec<serde_json::Value> {
    use tokio::io::AsyncBufReadExt;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut lines = tokio::io::BufReader::new(s).lines();
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Ok(Ok(Some(l))) => out.push(serde_json::from_str(&l).unwrap()),
            // Closed, or reset after it closed with our request unread.
            Ok(Ok(None)) | Ok(Err(_)) => return out,
            Err(_) => {
                out.push(serde_json::Value::Null);
                return out;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_the_allow_list_leaves_out_is_told_who_is_allowed_and_logged_once() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The tests may run as root: the list leaves out root and everyone else
    // this process could be.
    let (p, sock) = start_guarded(d, "allow_users = [12345]\nallow_groups = []").await;
    let me = nix::unistd::geteuid().as_raw();
    for send_first in [false, true] {
        let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
        if send_first {
            // The request is not read: the refusal comes first.
            let _ = s.write_all(b"{\"cmd\":\"status\"}\n").await;
        }
        let got = lines_until_closed(s).await;
        assert_eq!(got.len(), 1, "one line, then the daemon hangs up: {got:?}");
        assert_eq!(got[0]["code"], "not_allowed", "{got:?}");
        let msg = got[0]["message"].as_str().unwrap();
        for needle in [
            &format!("uid {me} "),
            "may not use the control socket",
            "allowed: uid 12345",
            "allow_users",
        ] {
            assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
        }
    }
    let (code, out, err, _) = cli_async(
        &["status", "--socket", c(&sock), "--timeout", "10s"],
        CLI_LIMIT,
    )
    .await;
    assert_eq!(code, 77, "exit 77 (EX_NOPERM): {out}{err}");
    assert!(err.contains("may not use the control socket"), "{err}");
    // The refusal is logged before it is sent: all three are in the log.
    let log = p.log_text();
    let logged = log.matches("refused a client").count();
    assert_eq!(logged, 1, "three refusals of one uid, logged once:\n{log}");
    assert!(log.contains(&format!("uid={me}")), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_idle_clients_cannot_lock_status_out() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_p, sock) = start_guarded(d, "idle_timeout = \"1s\"").await;
    // A watcher has sent its request: it is not idle, however long it
    // then stays silent.
    let watcher = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let (r, mut w) = watcher.into_split();
    let mut watched = tokio::io::BufReader::new(r).lines();
    w.write_all(b"{\"cmd\":\"watch\"}\n").await.unwrap();
    let first = tokio::time::timeout(DEADLINE, watched.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.contains("\"watching\""), "{first}");
    // A hundred clients that never send anything.
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(tokio::net::UnixStream::connect(&sock).await.unwrap());
    }
    // `status` gets through (turned away while every place is taken, it
    // asks again until idle clients are closed).
    let status = tokio::task::spawn_blocking({
        let sock = sock.clone();
        move || {
            cli_within(
                &["status", "--json", "--socket", c(&sock), "--timeout", "20s"],
                CLI_LIMIT,
            )
        }
    });
    let readers: Vec<_> = idle
        .into_iter()
        .map(|s| {
            tokio::spawn(async move {
                let start = std::time::Instant::now();
                (lines_until_closed(s).await, start.elapsed())
            })
        })
        .collect();
    let (mut turned_away, mut timed_out) = (0, 0);
    for r in readers {
        let (got, took) = r.await.unwrap();
        assert_eq!(got.len(), 1, "one line, then the daemon hangs up: {got:?}");
        match got[0]["code"].as_str() {
            Some("too_many_clients") => {
                turned_away += 1;
                let msg = got[0]["message"].as_str().unwrap();
                assert!(msg.contains("too many control clients"), "{msg}");
                // At once, not when a place frees up.
                assert!(took < Duration::from_secs(1), "turned away after {took:?}");
            }
            Some("idle_timeout") => {
                timed_out += 1;
                let msg = got[0]["message"].as_str().unwrap();
                assert!(msg.contains("no request within 1s"), "{msg}");
            }
            _ => panic!("unexpected answer to an idle client: {got:?}"),
        }
    }
    // The watcher holds one place; the CLI may hold another.
    assert!(
        (62..=63).contains(&timed_out) && turned_away == 100 - timed_out,
        "{timed_out} closed for idling, {turned_away} turned away"
    );
    let (code, out, err, took) = status.await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"databases\""), "{out}");
    assert!(took < Duration::from_secs(15), "status took {took:?}");
    // The watcher outlived the idle ones and still hears what happens.
    let (code, _, err, _) = cli_async(&["pause", "one", "--socket", c(&sock)], CLI_LIMIT).await;
    assert_eq!(code, 0, "{err}");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let event = tokio::time::timeout_at(deadline, watched.next_line())
            .await
            .expect("the watcher hears of the pause")
            .unwrap()
            .expect("the watcher is still connected");
        if event.contains("\"new\":\"paused\"") {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_garbage_gets_an_error_line_and_others_are_served_meanwhile() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_p, sock) = start_guarded(d, "").await;
    let other = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let (other_r, mut other_w) = other.into_split();
    let mut other_lines = BufReader::new(other_r).lines();
    let stream = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    let cases: &[(&[u8], &str)] = &[
        (b"{\"cmd\":\"st\xff\xfeatus\"}\n", "not UTF-8"),
        (b"this is not json\n", "not valid JSON"),
        (b"{\"cmd\":\"status\"\n", "not valid JSON"),
        (b"42\n", "not a JSON object"),
        (b"{\"db\":\"one\"}\n", "no `cmd` field"),
        (
            b"{\"cmd\":\"launch\"}\n",
            "unknown request type \\\"launch\\\"",
        ),
        (
            b"{\"cmd\":\"pause\"}\n",
            "request `pause`: missing field `db`",
        ),
        (
            b"{\"cmd\":\"wait\",\"db\":\"one\",\"timeout_ms\":-1}\n",
            "request `wait`: invalid value",
        ),
    ];
    for (line, want) in cases {
        w.write_all(line).await.unwrap();
        let got = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("an answer, not a hang-up");
        assert!(
            got.contains("\"code\":\"bad_request\"") && got.contains(want),
            "{:?}: {got} lacks {want:?}",
            String::from_utf8_lossy(line)
        );
        // Everyone else is served meanwhile.
        other_w.write_all(b"{\"cmd\":\"status\"}\n").await.unwrap();
        let l = tokio::time::timeout(DEADLINE, other_lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(l.contains("\"databases\""), "{l}");
    }
    // The same connection still serves requests.
    w.write_all(b"{\"cmd\":\"status\"}\n").await.unwrap();
    let l = lines.next_line().await.unwrap().unwrap();
    assert!(l.contains("\"databases\""), "{l}");
    // An overlong line is answered, then the connection is closed.
    let _ = w.write_all(&vec![b'x'; 200 * 1024]).await;
    let l = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .unwrap()
        .unwrap_or_default()
        .unwrap_or_default();
    assert!(
        l.contains("bad_request") && l.contains("longer than 65536 bytes"),
        "{l}"
    );
    let end = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .unwrap();
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
}
