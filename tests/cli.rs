//! The `tether` binary: config checking, token creation, exit codes and messages.

use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn tether() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tether"))
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().expect("tether runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn shipped_example_configs_are_valid() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let (code, out, err) =
        run(tether().args(["check", "--keys-only", &format!("{dir}/config/tether.toml")]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(": ok"));
    let (code, _, err) = run(tether().args([
        "check",
        "--hub",
        "--keys-only",
        &format!("{dir}/config/hub.toml"),
    ]));
    assert_eq!(code, 0, "{err}");
}

#[test]
fn config_errors_name_the_file_and_key_and_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[&str])] = &[
        (
            "[hub]\nurl = \"ws://h/v1/sync\"\ntoken = \"t\"\ncolour = \"red\"\n",
            &["unknown field `colour`", "tether.toml"],
        ),
        (
            "[hub]\nurl = \"http://h\"\ntoken = \"t\"\n",
            &["hub.url", "not a WebSocket URL"],
        ),
        (
            "[hub]\nurl = \"ws://h\"\n",
            &["no token", "tether hub new-token"],
        ),
        (
            "[hub]\nurl = \"ws://h\"\ntoken = \"t\"\n[reconnect]\ninitial = \"soon\"\n",
            &["invalid duration \"soon\"", "500ms"],
        ),
        (
            "[hub]\nurl = \"ws://h\"\ntoken = \"t\"\n[[database]]\nname = \"a\"\npath = \"/x.db\"\ntables = [\"t\"]\n[database.table_conflict]\nu = \"client_wins\"\n",
            &["database[0].table_conflict.u", "not in `tables`"],
        ),
        (
            "[hub]\nurl = \"ws://h\"\ntoken = \"t\"\n[[database]]\nname = \"a\"\npath = \"/x.db\"\ntables = [\"t\"]\nconflict = \"newest\"\n",
            &["unknown variant `newest`", "server_wins"],
        ),
        (
            "[hub]\nurl = \"ws://h\"\ntoken = \"t\"\n[[database]]\nname = \"a\"\npath = \"/x.db\"\ntables = [\"t\"]\n[[database]]\nname = \"a\"\npath = \"/y.db\"\ntables = [\"t\"]\n",
            &["database[1].name", "used twice"],
        ),
        (
            "log_level = \"inof\"\n[hub]\nurl = \"ws://h\"\ntoken = \"t\"\n",
            &["log_level", "\"inof\" in \"inof\" is not a log level", "debug"],
        ),
        (
            "log_level = \"info,tether=loud\"\n[hub]\nurl = \"ws://h\"\ntoken = \"t\"\n",
            &["log_level", "not a log filter"],
        ),
        (
            "metrics_listen = \"localhost\"\n[hub]\nurl = \"ws://h\"\ntoken = \"t\"\n",
            &["metrics_listen", "invalid socket address"],
        ),
        (
            "[control]\nidle_timeout = \"0s\"\n[hub]\nurl = \"ws://h\"\ntoken = \"t\"\n",
            &["control.idle_timeout", "above zero"],
        ),
        (
            "[control]\nallow_users = [-1]\n[hub]\nurl = \"ws://h\"\ntoken = \"t\"\n",
            &["allow_users", "-1 is not a uid or gid"],
        ),
        (
            "[control]\nallow_groups = [\"two words\"]\n[hub]\nurl = \"ws://h\"\ntoken = \"t\"\n",
            &["allow_groups", "\"two words\" is not a user or group name"],
        ),
        (
            "[control]\nallow = [\"root\"]\n[hub]\nurl = \"ws://h\"\ntoken = \"t\"\n",
            &["unknown field `allow`", "allow_users"],
        ),
    ];
    let path = dir.path().join("tether.toml");
    for (text, needles) in cases {
        std::fs::write(&path, text).unwrap();
        let (code, _, err) = run(tether().args(["check", path.to_str().unwrap()]));
        assert_eq!(code, 78, "{text}\n{err}");
        for n in *needles {
            assert!(err.contains(n), "message for\n{text}\nlacks {n:?}: {err}");
        }
    }
    // Names in [control] are looked up when the daemon starts.
    std::fs::write(
        &path,
        format!(
            "control_socket = \"{}\"\n[control]\nallow_groups = [\"no-such-group-here\"]\n[hub]\nurl = \"ws://127.0.0.1:9/v1/sync\"\ntoken = \"t\"\n",
            dir.path().join("t.sock").display()
        ),
    )
    .unwrap();
    let (code, err, _) = run_within(
        &["daemon", "--config", path.to_str().unwrap()],
        Duration::from_secs(20),
    );
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("control.allow_groups: no group named \"no-such-group-here\""),
        "{err}"
    );
    assert!(!dir.path().join("t.sock").exists());
    let (code, _, err) = run(tether().args(["daemon", "--config", "/nonexistent/tether.toml"]));
    assert_eq!(code, 78);
    assert!(
        err.contains("cannot read config file /nonexistent/tether.toml"),
        "{err}"
    );
}

#[test]
fn hub_config_errors_are_precise() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.toml");
    let cases: &[(&str, &str)] = &[
        ("listen = \"nowhere\"\nstore = \"sqlite:/x\"\n", "listen"),
        ("listen = \"127.0.0.1:1\"\nstore = \"mysql:/x\"\n", "store"),
        (
            "listen = \"127.0.0.1:1\"\nstore = \"sqlite:/x\"\n[[token]]\nname = \"t\"\nsha256 = \"ABC\"\ndatasets = [\"*\"]\n",
            "token[0].sha256",
        ),
        (
            "listen = \"127.0.0.1:1\"\nstore = \"sqlite:/x\"\n[[token]]\nname = \"t\"\nsha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\ndatasets = [\"ghost\"]\n",
            "no [[dataset]] declares",
        ),
        (
            "listen = \"127.0.0.1:1\"\nstore = \"sqlite:/x\"\nlog_level = \"tether=verbose\"\n",
            "log_level",
        ),
    ];
    for (text, needle) in cases {
        std::fs::write(&path, text).unwrap();
        let (code, _, err) = run(tether().args(["check", "--hub", path.to_str().unwrap()]));
        assert_eq!(code, 78, "{text}");
        assert!(err.contains(needle), "{text}: {err}");
    }
}

#[test]
fn new_token_prints_a_token_and_its_matching_block() {
    let (code, out, err) = run(tether().args([
        "hub",
        "new-token",
        "--name",
        "kiosk",
        "--dataset",
        "notes",
        "--read-only",
    ]));
    assert_eq!(code, 0, "{err}");
    let token = out
        .lines()
        .find(|l| l.starts_with("tth_"))
        .expect("a token line");
    assert_eq!(token.len(), 4 + 64);
    let block = &out[out.find("[[token]]").expect("a block")..];
    #[derive(serde::Deserialize)]
    struct F {
        token: Vec<tether::config::TokenConfig>,
    }
    let parsed: F = toml::from_str(block).expect("the block is valid TOML");
    let t = &parsed.token[0];
    assert_eq!(t.name, "kiosk");
    assert_eq!(t.sha256, tether::hub::auth::hash_token(token));
    assert_eq!(t.datasets, vec!["notes"]);
    assert_eq!(t.access, tether::config::TokenAccess::ReadOnly);
    // Two tokens are never the same.
    let (_, out2, _) = run(tether().args(["hub", "new-token", "--name", "k", "--dataset", "d"]));
    assert!(!out2.contains(token));
}

#[test]
fn demo_runs_end_to_end() {
    let (code, out, err) = run(tether().arg("demo"));
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("visible on B after"), "{out}");
    assert!(out.contains("conflict 1"), "{out}");
    assert!(out.contains("done: both sides hold the same rows"), "{out}");
}

/// Runs `tether` with `args`, killed if it has not finished within `limit`;
/// exit code, stderr and how long it took.
fn run_within(args: &[&str], limit: Duration) -> (i32, String, Duration) {
    use std::io::Read;
    let started = Instant::now();
    let mut child = tether()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tether runs");
    let mut stderr = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`tether {}` still ran after {limit:?}", args.join(" "));
        }
        std::thread::park_timeout(Duration::from_millis(5));
    };
    (
        status.code().unwrap_or(-1),
        err.join().unwrap(),
        started.elapsed(),
    )
}

/// A socket that takes connections (or leaves them queued) and never
/// says a word: the CLI gives up at its timeout, exit 75, saying so.
#[test]
fn a_daemon_that_never_answers_fails_the_cli_within_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    // Accepted, never answered.
    let sock = dir.path().join("mute.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let (done, held) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let _ = held.recv();
        drop(conn);
    });
    let (code, err, took) = run_within(
        &[
            "status",
            "--socket",
            sock.to_str().unwrap(),
            "--timeout",
            "1s",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(code, 75, "{err}");
    assert!(
        err.contains("did not answer within 1s (waiting for its answer)")
            && err.contains("--timeout"),
        "{err}"
    );
    assert!(took < Duration::from_secs(10), "gave up after {took:?}");
    drop(done);
    server.join().unwrap();
    // Never even accepted: the connection waits in the socket's queue.
    let queued = dir.path().join("queued.sock");
    let _listener = UnixListener::bind(&queued).unwrap();
    let (code, err, took) = run_within(
        &[
            "reload",
            "--socket",
            queued.to_str().unwrap(),
            "--timeout",
            "1s",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(code, 75, "{err}");
    assert!(err.contains("did not answer within 1s"), "{err}");
    assert!(took < Duration::from_secs(10), "gave up after {took:?}");
    // Its queue of new connections full: connecting is tried again until
    // the timeout.
    let full = dir.path().join("full.sock");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_listener, _queued) = rt.block_on(async {
        let s = tokio::net::UnixSocket::new_stream().unwrap();
        s.bind(&full).unwrap();
        let listener = s.listen(1).unwrap();
        let mut queued = Vec::new();
        while let Ok(c) = tokio::net::UnixStream::connect(&full).await {
            queued.push(c);
            assert!(queued.len() < 100, "the queue never filled");
        }
        (listener, queued)
    });
    let (code, err, took) = run_within(
        &[
            "status",
            "--socket",
            full.to_str().unwrap(),
            "--timeout",
            "1s",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(code, 75, "{err}");
    assert!(
        err.contains("did not answer within 1s (connecting"),
        "{err}"
    );
    assert!(took < Duration::from_secs(10), "gave up after {took:?}");
    // A stream's first line is bounded too (a `wait` with a timeout: that
    // timeout and a grace period).
    let (code, err, _) = run_within(
        &[
            "wait",
            "notes",
            "--socket",
            queued.to_str().unwrap(),
            "--timeout",
            "1ms",
        ],
        Duration::from_secs(40),
    );
    assert_eq!(code, 75, "{err}");
    assert!(err.contains("did not answer within 10s"), "{err}");
}

/// A daemon that turns every client away (as many as it serves are
/// connected): the CLI asks again until its timeout, then exits 75 with
/// the daemon's reason.
#[test]
fn a_daemon_that_keeps_turning_the_cli_away_fails_it_within_its_timeout() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("full.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut turned_away = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let (mut conn, _) = listener.accept().unwrap();
                let _ = conn.write_all(b"{\"type\":\"error\",\"code\":\"too_many_clients\",\"message\":\"too many control clients (64 connected); try again shortly\"}\n");
                turned_away += 1;
            }
            turned_away
        }
    });
    let (code, err, took) = run_within(
        &[
            "status",
            "--socket",
            sock.to_str().unwrap(),
            "--timeout",
            "2s",
        ],
        Duration::from_secs(20),
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    // Wake the accept loop so that it sees the flag.
    drop(std::os::unix::net::UnixStream::connect(&sock).unwrap());
    let turned_away = server.join().unwrap();
    assert_eq!(code, 75, "{err}");
    assert!(
        err.contains("kept turning this client away for 2s: too many control clients"),
        "{err}"
    );
    assert!(turned_away > 2, "asked again: {turned_away} times");
    assert!(took < Duration::from_secs(10), "gave up after {took:?}");
}

#[test]
fn every_control_command_documents_its_timeout() {
    for cmd in [
        "status",
        "pause",
        "resume",
        "reconnect",
        "reload",
        "metrics",
        "held",
        "retry",
    ] {
        let (code, out, err) = run(tether().args([cmd, "--help"]));
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains("--timeout") && out.contains("default 30s, reload 2m"),
            "{cmd}: {out}"
        );
    }
}
