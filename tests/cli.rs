//! The `tether` binary: config checking, token creation, exit codes and messages.

use std::process::Command;

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
    let (code, out, err) = run(tether().args(["check", &format!("{dir}/config/tether.toml")]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(": ok"));
    let (code, _, err) = run(tether().args(["check", "--hub", &format!("{dir}/config/hub.toml")]));
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
