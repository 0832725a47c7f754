//! What the CLI and the daemon say to the person running them, against
//! real hub and daemon processes: a token file holding too much, the time
//! left before the next try, uploads in `watch`, what `sync` and `once`
//! wait for, refused reloads.

mod common;

use std::io::BufRead;
use std::path::Path;
use std::time::{Duration, Instant};

use common::procs::*;
use common::*;

fn c(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A temp dir with the app databases `a1.db` and `b.db`.
fn dir_with_apps() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["a1.db", "b.db"] {
        app(&dir.path().join(f), NOTES);
    }
    dir
}

/// A token for the hub and the file the daemon reads it from.
fn token_in(d: &Path) -> (String, std::path::PathBuf) {
    let token = tether::hub::auth::new_token();
    let file = d.join("token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    (token, file)
}

fn insert(db: &Path, id: &str) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.execute("INSERT INTO notes VALUES (?1, 't', 'b', 1)", [id])
        .unwrap();
}

const FAST: &str =
    "initial = \"100ms\"\nmax = \"60s\"\nping_interval = \"1s\"\nread_timeout = \"10s\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_with_the_whole_new_token_output_is_named_and_its_fix_used_at_once() {
    let dir = dir_with_apps();
    let d = dir.path();
    // The file holds everything `tether hub new-token` printed.
    let (code, whole, err) = cli(&["hub", "new-token", "--name", "a", "--dataset", "notes"]);
    assert_eq!(code, 0, "{err}");
    let token = whole
        .lines()
        .find(|l| l.starts_with("tth_"))
        .unwrap()
        .to_owned();
    let token_file = d.join("token");
    std::fs::write(&token_file, &whole).unwrap();
    let hash = tether::hub::auth::hash_token(&token);
    let (_hub, addr) = start_hub(d, "127.0.0.1:0", &hash, "hub").await;
    let (_a, acfg) = start_daemon(d, "a", &addr, &token_file, &[("one", "a1.db")], FAST).await;
    wait_until("the token file refused", || {
        let st = status_json(&acfg, "one");
        st["session"] == "waiting_for_access_token"
            && st["last_error"].as_str().is_some_and(|e| {
                e.contains(&format!(
                    "token file {} holds more than one line: put only the token (the line starting tth_) in it",
                    token_file.display()
                ))
            })
    })
    .await;
    // The time left before the next try counts down (the refusal waits the
    // longest backoff, 60 s).
    let first = status_json(&acfg, "one")["backoff_ms"].as_u64().unwrap();
    assert!(first > 30_000, "{first}");
    wait_until("the time left shrinks", || {
        status_json(&acfg, "one")["backoff_ms"]
            .as_u64()
            .is_some_and(|ms| ms + 200 < first)
    })
    .await;
    let (_, text, _) = cli(&["status", "one", "--config", c(&acfg)]);
    let line = text.lines().find(|l| l.contains("next try in:")).unwrap();
    let secs: f64 = line.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(
        secs < 60.0 && line.contains(" s (sooner with `tether reconnect`)"),
        "{line}"
    );
    // Fixed: used at once, long before the backoff ends.
    let fixed = Instant::now();
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    wait_connected_cli(&acfg, "one").await;
    assert!(
        fixed.elapsed() < Duration::from_secs(20),
        "{:?}",
        fixed.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reload_exits_1_and_the_daemon_logs_why() {
    let dir = dir_with_apps();
    let d = dir.path();
    let (token, token_file) = token_in(d);
    let hash = tether::hub::auth::hash_token(&token);
    let (_hub, addr) = start_hub(d, "127.0.0.1:0", &hash, "hub").await;
    let (a, acfg) = start_daemon(d, "a", &addr, &token_file, &[("one", "a1.db")], FAST).await;
    wait_connected_cli(&acfg, "one").await;
    let good = std::fs::read_to_string(&acfg).unwrap();
    // A bad value: the CLI finds the socket, the daemon refuses.
    std::fs::write(&acfg, good.replace("[hub]", "log_level = \"loud\"\n[hub]")).unwrap();
    let (code, _, err) = cli(&["reload", "--config", c(&acfg)]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("reload refused") && err.contains("log_level"),
        "{err}"
    );
    wait_until("the daemon logs the refusal", || {
        a.log_text()
            .lines()
            .any(|l| l.contains("reload refused") && l.contains("log_level"))
    })
    .await;
    // Not TOML at all: the CLI cannot find the socket in it; still exit 1.
    std::fs::write(&acfg, "control_socket = [").unwrap();
    let (code, _, err) = cli(&["reload", "--config", c(&acfg)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("reload refused"), "{err}");
    // Mended: reloaded, and the session kept.
    std::fs::write(&acfg, &good).unwrap();
    let (code, out, err) = cli(&["reload", "--config", c(&acfg)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("unchanged one"), "{out}");
    let log = a.log_text();
    assert!(a.terminate().success());
    assert!(!log.contains("watch descriptor"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_uploads_as_sentences_and_json_only_with_json() {
    let dir = dir_with_apps();
    let d = dir.path();
    let (token, token_file) = token_in(d);
    let hash = tether::hub::auth::hash_token(&token);
    let (_hub, addr) = start_hub(d, "127.0.0.1:0", &hash, "hub").await;
    let (_a, acfg) = start_daemon(d, "a", &addr, &token_file, &[("one", "a1.db")], FAST).await;
    wait_connected_cli(&acfg, "one").await;
    let mut watch = std::process::Command::new(bin())
        .args(["watch", "--config", c(&acfg)])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut lines = Vec::new();
    let started = Instant::now();
    let mut inserted = false;
    let upload = loop {
        assert!(
            started.elapsed() < DEADLINE,
            "no upload line within {DEADLINE:?}: {lines:?}"
        );
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(l) if l.starts_with("one: upload") => break l,
            Ok(l) => {
                if l.starts_with("watching for events") && !inserted {
                    insert(&d.join("a1.db"), "w1");
                    inserted = true;
                }
                lines.push(l)
            }
            Err(_) => {}
        }
    };
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(upload, "one: uploaded 1 change: 1 stored", "{lines:?}");
    assert!(lines.iter().all(|l| !l.contains('{')), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_sent_before_its_daemon_starts_waits_for_it_and_says_what_it_waits_for() {
    let dir = dir_with_apps();
    let d = dir.path();
    let (token, token_file) = token_in(d);
    let hash = tether::hub::auth::hash_token(&token);
    let (_hub, addr) = start_hub(d, "127.0.0.1:0", &hash, "hub").await;
    insert(&d.join("a1.db"), "before");
    let sock = d.join("a.sock");
    // sync first; the daemon is started once sync says it waits for one.
    let mut sync = Proc::spawn(&["sync", "one", "--socket", c(&sock)], d.join("sync.err"));
    wait_until("sync waits for the daemon", || {
        sync.log_text().contains(&format!(
            "waiting for a daemon to listen on {}",
            sock.display()
        ))
    })
    .await;
    sync.assert_running();
    let (_a, _) = start_daemon(d, "a", &addr, &token_file, &[("one", "a1.db")], FAST).await;
    let mut status = None;
    wait_until("sync returns", || {
        status = sync.child.try_wait().unwrap();
        status.is_some()
    })
    .await;
    let err = sync.log_text();
    assert!(status.unwrap().success(), "{err}");
    assert!(
        err.contains("waiting for one: local changes stored by the hub and the hub's changes applied here (gives up after 5m, --timeout)"),
        "{err}"
    );
    // The row went out during the call or just before it (the session is
    // live at once); either way nothing is pending once sync returns.
    let (code, st, err) = cli(&["status", "one", "--json", "--socket", c(&d.join("a.sock"))]);
    assert_eq!(code, 0, "{err}");
    let st: serde_json::Value = serde_json::from_str(st.trim()).unwrap();
    assert_eq!(st["databases"][0]["pending_changes"], 0, "{st}");
    // Without a daemon the other commands still fail at once.
    let (code, _, _) = cli(&["status", "--socket", c(&d.join("none.sock"))]);
    assert_eq!(code, 69);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_beside_a_running_daemon_reports_it_without_an_error_log() {
    let dir = dir_with_apps();
    let d = dir.path();
    let (token, token_file) = token_in(d);
    let hash = tether::hub::auth::hash_token(&token);
    let (_hub, addr) = start_hub(d, "127.0.0.1:0", &hash, "hub").await;
    let (_a, acfg) = start_daemon(d, "a", &addr, &token_file, &[("one", "a1.db")], FAST).await;
    wait_connected_cli(&acfg, "one").await;
    let (code, out, err) = cli(&["once", "--config", c(&acfg)]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("one: FAILED") && out.contains("already synced by another tether process"),
        "{out}"
    );
    assert!(
        err.contains("waiting for one: connect to")
            && err.contains("(gives up after 5m, --timeout)"),
        "{err}"
    );
    assert!(!err.contains("ERROR") && !err.contains("retry_in"), "{err}");
}
