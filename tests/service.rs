//! Running as a system service: the unit files verify, and the daemon and hub
//! speak systemd's notify protocol (READY, STATUS, WATCHDOG, STOPPING).

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};

use common::procs::*;
use common::*;

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let mut units = Vec::new();
    for unit in [
        "tether.service",
        "tether-hub.service",
        "tether-sync.service",
        "tether-sync.timer",
    ] {
        let text = std::fs::read_to_string(format!("{root}/systemd/{unit}")).unwrap();
        // verify checks that ExecStart exists: point it at the built binary.
        let text = text.replace("/usr/bin/tether", bin());
        let path = dir.path().join(unit);
        std::fs::write(&path, text).unwrap();
        units.push(path);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .expect("systemd-analyze is installed (.ci/run installs it)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {err}"
    );
}

#[test]
fn sysusers_file_creates_the_users_the_units_run_as() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let conf = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/tether.sysusers");
    let out = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(conf)
        .output()
        .expect("systemd-sysusers is installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    for unit in [
        "tether.service",
        "tether-hub.service",
        "tether-sync.service",
    ] {
        let text =
            std::fs::read_to_string(format!("{}/systemd/{unit}", env!("CARGO_MANIFEST_DIR")))
                .unwrap();
        let user = text
            .lines()
            .find_map(|l| l.strip_prefix("User="))
            .unwrap_or_else(|| panic!("{unit} names its User="));
        let entry = passwd
            .lines()
            .find(|l| l.starts_with(&format!("{user}:")))
            .unwrap_or_else(|| panic!("{user} of {unit} is created: {passwd}"));
        assert!(entry.ends_with(":/usr/sbin/nologin"), "{entry}");
    }
}

/// Collects notify datagrams sent to a socket.
fn notify_socket(dir: &std::path::Path) -> (UnixDatagram, std::path::PathBuf) {
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    (sock, path)
}

/// An address where something listens (no other test can take the port)
/// but hangs up on every connection: a hub that is not there.
async fn hangup_hub() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        // Bounded; ends with the test's runtime anyway.
        for _ in 0..10_000 {
            match listener.accept().await {
                Ok((conn, _)) => drop(conn),
                Err(_) => return,
            }
        }
    });
    addr
}

fn recv_until(sock: &UnixDatagram, want: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 4096];
    let start = std::time::Instant::now();
    while !seen.iter().any(|m: &String| m.contains(want)) {
        assert!(
            start.elapsed() < DEADLINE,
            "no {want} within {DEADLINE:?}; got {:?}",
            &seen[seen.len().saturating_sub(5)..]
        );
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no {want} within the deadline ({e}); got {seen:?}"));
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        assert!(seen.len() < 1000, "too many messages without {want}");
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_notifies_ready_status_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let token = tether::hub::auth::new_token();
    std::fs::write(d.join("token"), &token).unwrap();
    app(&d.join("a.db"), NOTES);
    let (_hub, addr) = start_hub(
        d,
        "127.0.0.1:0",
        &tether::hub::auth::hash_token(&token),
        "hub",
    )
    .await;
    let cfg = d.join("a.toml");
    std::fs::write(
        &cfg,
        format!(
            "control_socket = \"{}\"\n[hub]\nurl = \"ws://{addr}/v1/sync\"\ntoken_file = \"{}\"\n[[database]]\nname = \"one\"\ndataset = \"notes\"\npath = \"{}\"\ntables = [\"notes\"]\n",
            d.join("a.sock").display(),
            d.join("token").display(),
            d.join("a.db").display()
        ),
    )
    .unwrap();
    let (sock, path) = notify_socket(d);
    // systemd names the watched process in WATCHDOG_PID; `exec` keeps the
    // shell's pid for the daemon.
    let child = Command::new("sh")
        .args([
            "-c",
            "WATCHDOG_PID=$$ exec \"$0\" daemon --config \"$1\"",
            bin(),
            cfg.to_str().unwrap(),
        ])
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "400000")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let proc = Proc {
        child,
        log: d.join("unused.log"),
    };
    let sock = std::sync::Arc::new(sock);
    let s2 = sock.clone();
    let seen = tokio::task::spawn_blocking(move || recv_until(&s2, "READY=1"))
        .await
        .unwrap();
    let ready = seen.iter().find(|m| m.contains("READY=1")).unwrap();
    assert!(ready.contains("STATUS=1 databases"), "{ready}");
    // The control socket answers once READY was sent.
    let (code, _, err) = cli(&["status", "--socket", d.join("a.sock").to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let s2 = sock.clone();
    let seen = tokio::task::spawn_blocking(move || recv_until(&s2, "WATCHDOG=1"))
        .await
        .unwrap();
    assert!(seen.iter().any(|m| m.contains("WATCHDOG=1")), "{seen:?}");
    // The status line follows the session: its one database connected.
    let s2 = sock.clone();
    let seen =
        tokio::task::spawn_blocking(move || recv_until(&s2, "STATUS=1 databases, 1 connected,"))
            .await
            .unwrap();
    assert!(
        seen.iter()
            .any(|m| m.contains("STATUS=1 databases, 1 connected, 0 changes pending")),
        "{seen:?}"
    );
    let s2 = sock.clone();
    let stop = tokio::task::spawn_blocking(move || recv_until(&s2, "STOPPING=1"));
    let status = proc.terminate();
    stop.await.unwrap();
    assert!(status.success(), "SIGTERM exits 0: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_the_database_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    app(&d.join("a.db"), NOTES);
    let cfg = d.join("a.toml");
    // No hub there: the session logs its connection errors.
    let port = hangup_hub().await;
    std::fs::write(
        &cfg,
        format!(
            "control_socket = \"{}\"\n[hub]\nurl = \"ws://{port}/v1/sync\"\ntoken = \"t\"\n[reconnect]\ninitial = \"50ms\"\nmax = \"100ms\"\n[[database]]\nname = \"one\"\npath = \"{}\"\ntables = [\"notes\"]\n",
            d.join("a.sock").display(),
            d.join("a.db").display()
        ),
    )
    .unwrap();
    let p = Proc::spawn(
        &[
            "daemon",
            "--config",
            cfg.to_str().unwrap(),
            "--log-format",
            "json",
        ],
        d.join("a.log"),
    );
    wait_until("a connection error is logged", || {
        p.log_text().contains("cannot connect")
    })
    .await;
    let log = p.log_text();
    assert!(p.terminate().success());
    let mut saw_db = false;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v.get("level").is_some() && v.get("fields").is_some(),
            "{line}"
        );
        if line.contains("cannot connect") {
            saw_db = line.contains("\"db\":\"one\"") && line.contains("\"dataset\":\"one\"");
        }
    }
    assert!(
        saw_db,
        "log lines carry the database and dataset names: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_bulk_upload_exits_0_and_a_restart_sends_the_rest() {
    const ROWS: i64 = 40_000;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let token = tether::hub::auth::new_token();
    let token_file = d.join("token");
    std::fs::write(&token_file, &token).unwrap();
    let a_db = app(&d.join("a.db"), NOTES);
    app(&d.join("b.db"), NOTES);
    let fast = "initial = \"100ms\"\nmax = \"1s\"";
    let hash = tether::hub::auth::hash_token(&token);
    let (hub, addr) = start_hub(d, "127.0.0.1:0", &hash, "hub").await;
    let (_b, bcfg) = start_daemon(d, "b", &addr, &token_file, &[("one", "b.db")], fast).await;
    let (a, acfg) = start_daemon(d, "a", &addr, &token_file, &[("one", "a.db")], fast).await;
    wait_connected_cli(&acfg, "one").await;
    wait_connected_cli(&bcfg, "one").await;
    {
        let tx = a_db.unchecked_transaction().unwrap();
        for i in 0..ROWS {
            tx.execute(
                "INSERT INTO notes VALUES (?1, 't', 'body', ?2)",
                rusqlite::params![format!("bulk{i}"), i],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    let hub_db = rusqlite::Connection::open(d.join("hub.db")).unwrap();
    let hub_rows = || -> (i64, i64) {
        hub_db
            .query_row("SELECT count(*), count(DISTINCT pk) FROM log_1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap_or((0, 0))
    };
    // SIGTERM once the upload is under way.
    wait_until("the upload is under way", || {
        status_json(&acfg, "one")["consumed"].as_u64().unwrap_or(0) > 0
    })
    .await;
    let status = a.terminate();
    assert!(status.success(), "SIGTERM exits 0: {status:?}");
    let (stored, _) = hub_rows();
    assert!(
        stored > 0 && stored < ROWS,
        "stopped mid-upload: {stored} of {ROWS} on the hub"
    );
    // The daemon closed its connection with a close frame, not a reset.
    assert!(
        !hub.log_text().contains("connection lost"),
        "{}",
        hub.log_text()
    );

    // The rest goes out on the next start, each write exactly once.
    let (_a, acfg) = start_daemon(d, "a", &addr, &token_file, &[("one", "a.db")], fast).await;
    let b_db = rusqlite::Connection::open(d.join("b.db")).unwrap();
    wait_converged(&a_db, &b_db, "notes").await;
    assert_eq!(count(&b_db, "notes"), ROWS);
    wait_until("A idle", || {
        status_json(&acfg, "one")["pending_changes"] == 0
    })
    .await;
    assert_eq!(hub_rows(), (ROWS, ROWS), "each write reached the hub once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_level_comes_from_the_config_unless_rust_log_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let hub = hangup_hub().await;
    app(&d.join("a.db"), NOTES);
    let cfg = d.join("a.toml");
    let sock = d.join("a.sock");
    std::fs::write(
        &cfg,
        format!(
            "log_level = \"warn\"\ncontrol_socket = \"{}\"\n[hub]\nurl = \"ws://{hub}/v1/sync\"\ntoken = \"t\"\n[[database]]\nname = \"one\"\npath = \"{}\"\ntables = [\"notes\"]\n",
            sock.display(),
            d.join("a.db").display()
        ),
    )
    .unwrap();
    let run = |rust_log: Option<&str>, log: &str| {
        let mut cmd = Command::new(bin());
        cmd.args(["daemon", "--config", cfg.to_str().unwrap()])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join(log)).unwrap());
        if let Some(l) = rust_log {
            cmd.env("RUST_LOG", l);
        }
        Proc {
            child: cmd.spawn().unwrap(),
            log: d.join(log),
        }
    };
    for (rust_log, log, started_shown) in
        [(None, "quiet.log", false), (Some("info"), "loud.log", true)]
    {
        let p = run(rust_log, log);
        wait_until("control socket answers", || {
            cli(&["status", "--socket", sock.to_str().unwrap()]).0 == 0
        })
        .await;
        assert!(p.terminate().success());
        let text = std::fs::read_to_string(d.join(log)).unwrap();
        assert_eq!(
            text.contains("daemon started"),
            started_shown,
            "RUST_LOG={rust_log:?}: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_with_newlines_cannot_forge_hub_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let token = tether::hub::auth::new_token();
    let (hub, addr) = start_hub(
        d,
        "127.0.0.1:0",
        &tether::hub::auth::hash_token(&token),
        "hub",
    )
    .await;
    let url = format!("ws://{addr}/v1/sync");
    let forged = "\nFORGED level=ERROR the hub was compromised";
    for (dataset, client) in [
        ("notes".to_string(), format!("dev{forged}")),
        (format!("notes{forged}"), "dev".to_string()),
    ] {
        let mut ws = raw_connect(&url, Some(&token), None).await.unwrap();
        let mut hello = notes_hello(&dataset, &client);
        if let tether::proto::ClientFrame::Hello(h) = &mut hello {
            h.client_key = "k".into();
        }
        raw_send(&mut ws, tether::proto::encode(&hello)).await;
        match raw_recv(&mut ws).await {
            Some(tether::proto::HubFrame::Error(e)) => assert!(
                matches!(
                    e.code,
                    tether::proto::ErrorCode::MalformedFrame
                        | tether::proto::ErrorCode::UnknownDataset
                ),
                "{e:?}"
            ),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    // The refusals are logged, with the names escaped on one line.
    wait_until("both refusals logged", || {
        hub.log_text().matches("WARN").count() >= 2
    })
    .await;
    let log = hub.log_text();
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED")),
        "a client's name started a log line:\n{log}"
    );
    assert!(
        log.contains("\\nFORGED"),
        "the name is logged escaped:\n{log}"
    );
}
