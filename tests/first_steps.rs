//! A newcomer's first steps on the real binary: `hub init`, `init`,
//! `hub new-token --token-file --append-to`, `check` against the files a
//! config names, completions and the manual page, the hub creating its
//! store's directory.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::procs::*;
use common::*;

fn c(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `tether ARGS` in `dir`.
fn cli_in(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(bin())
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("tether runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn hub_init_and_new_token_write_files_the_hub_and_daemon_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (code, out, err) = cli_in(
        d,
        &["hub", "init", "--dataset", "notes", "--table", "notes"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("wrote hub.toml"), "{out}");
    let hub = std::fs::read_to_string(d.join("hub.toml")).unwrap();
    let store = d.join("hub-data/hub.db");
    assert!(
        hub.contains(&format!("sqlite:{}", store.display())),
        "{hub}"
    );
    // Never overwritten by accident.
    let (code, _, err) = cli_in(d, &["hub", "init", "--dataset", "x", "--table", "t"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("exists already") && err.contains("--force"),
        "{err}"
    );

    let (code, out, err) = cli_in(
        d,
        &[
            "hub",
            "new-token",
            "--name",
            "a",
            "--dataset",
            "notes",
            "--token-file",
            "a.token",
            "--append-to",
            "hub.toml",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("tth_"), "the token is not printed: {out}");
    let token_text = std::fs::read_to_string(d.join("a.token")).unwrap();
    let token = token_text.trim_end();
    assert!(token.starts_with("tth_") && token_text.lines().count() == 1);
    let mode = std::fs::metadata(d.join("a.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let cfg = tether::config::HubConfig::load(&d.join("hub.toml")).unwrap();
    assert_eq!(cfg.tokens.len(), 1);
    assert_eq!(cfg.tokens[0].sha256, tether::hub::auth::hash_token(token));
    assert_eq!(cfg.tokens[0].datasets, vec!["notes"]);

    // A token file is never overwritten, and then nothing is appended.
    let before = std::fs::read_to_string(d.join("hub.toml")).unwrap();
    let (code, _, err) = cli_in(
        d,
        &[
            "hub",
            "new-token",
            "--name",
            "b",
            "--dataset",
            "notes",
            "--token-file",
            "a.token",
            "--append-to",
            "hub.toml",
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("a.token exists already"), "{err}");
    // A block the hub would refuse (a dataset it does not declare) is not
    // appended, and no token file is left behind.
    let (code, _, err) = cli_in(
        d,
        &[
            "hub",
            "new-token",
            "--name",
            "c",
            "--dataset",
            "other",
            "--token-file",
            "c.token",
            "--append-to",
            "hub.toml",
        ],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("\"other\"") && err.contains("nothing written"),
        "{err}"
    );
    assert!(!d.join("c.token").exists());
    assert_eq!(std::fs::read_to_string(d.join("hub.toml")).unwrap(), before);
    assert_eq!(cli_in(d, &["check", "--hub", "hub.toml"]).0, 0);
}

#[test]
fn init_writes_a_daemon_config_that_check_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    app(&d.join("app.db"), NOTES);
    std::fs::write(
        d.join("token"),
        format!("{}\n", tether::hub::auth::new_token()),
    )
    .unwrap();
    let (code, out, err) = cli_in(
        d,
        &[
            "init",
            "--database",
            "app.db",
            "--table",
            "notes",
            "--control-socket",
            "app.sock",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("wrote tether.toml") && out.contains("tether check"),
        "{out}"
    );
    let cfg = tether::config::DaemonConfig::load(&d.join("tether.toml")).unwrap();
    assert_eq!(cfg.control_socket, d.join("app.sock"));
    assert_eq!(
        cfg.hub.token_file.as_deref(),
        Some(d.join("token").as_path())
    );
    let db = &cfg.databases[0];
    assert_eq!((db.name.as_str(), db.dataset()), ("app", "app"));
    assert_eq!(db.path, d.join("app.db"));
    let (code, out, err) = cli_in(d, &["check", "tether.toml"]);
    assert_eq!((code, out.trim()), (0, "tether.toml: ok"), "{err}");
    let (code, _, err) = cli_in(d, &["init", "--database", "app.db", "--table", "notes"]);
    assert_eq!(code, 1);
    assert!(err.contains("exists already"), "{err}");
}

/// A daemon config naming what `check` must look at.
fn daemon_config(d: &Path, db: &Path, tables: &str, token_file: &Path) -> std::path::PathBuf {
    let cfg = d.join("t.toml");
    std::fs::write(
        &cfg,
        format!(
            "control_socket = \"{}\"\n[hub]\nurl = \"ws://127.0.0.1:1/v1/sync\"\ntoken_file = \"{}\"\n[[database]]\nname = \"n\"\npath = \"{}\"\ntables = [{tables}]\n",
            d.join("t.sock").display(),
            token_file.display(),
            db.display()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn check_looks_at_the_tables_the_token_file_and_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = d.join("app.db");
    app(
        &db,
        "CREATE TABLE notes (id TEXT PRIMARY KEY, t TEXT); CREATE TABLE loose (a, b)",
    );
    let token = d.join("token");
    std::fs::write(&token, tether::hub::auth::new_token()).unwrap();
    let cfg = daemon_config(d, &db, "\"notes\"", &token);
    assert_eq!(cli(&["check", c(&cfg)]).0, 0);
    let cases: &[(&str, &[&str])] = &[
        (
            "\"notes\", \"nosuch\"",
            &["\"nosuch\" does not exist", "database[0]"],
        ),
        ("\"loose\"", &["\"loose\"", "no declared PRIMARY KEY"]),
    ];
    for (tables, needles) in cases {
        let cfg = daemon_config(d, &db, tables, &token);
        let (code, _, err) = cli(&["check", c(&cfg)]);
        assert_eq!(code, 78, "{tables}: {err}");
        for n in *needles {
            assert!(err.contains(n), "{tables}: {err}");
        }
    }
    // The whole output of new-token in the token file.
    let (_, whole, _) = cli(&["hub", "new-token", "--name", "x", "--dataset", "notes"]);
    std::fs::write(&token, whole).unwrap();
    let (code, _, err) = cli(&["check", c(&cfg)]);
    assert_eq!(code, 78);
    assert!(
        err.contains(&format!(
            "token file {} holds more than one line",
            token.display()
        )) && err.contains("line starting tth_"),
        "{err}"
    );
    std::fs::remove_file(&token).unwrap();
    let (code, _, err) = cli(&["check", c(&cfg)]);
    assert_eq!(code, 78);
    assert!(err.contains("cannot read token file"), "{err}");
    // A missing database.
    std::fs::write(&token, tether::hub::auth::new_token()).unwrap();
    let cfg = daemon_config(d, &d.join("gone.db"), "\"notes\"", &token);
    let (code, _, err) = cli(&["check", c(&cfg)]);
    assert_eq!(code, 78);
    assert!(
        err.contains("no database at") && err.contains("gone.db"),
        "{err}"
    );
    // --keys-only does not look.
    assert_eq!(cli(&["check", "--keys-only", c(&cfg)]).0, 0);

    // Hub: a store whose directory can be created is fine; one whose
    // parent is missing is not.
    let hub = |store: &Path| {
        let p = d.join("hub.toml");
        std::fs::write(
            &p,
            format!(
                "listen = \"127.0.0.1:0\"\nstore = \"sqlite:{}\"\n",
                store.display()
            ),
        )
        .unwrap();
        cli(&["check", "--hub", c(&p)])
    };
    assert_eq!(hub(&d.join("new/hub.db")).0, 0);
    let (code, _, err) = hub(&d.join("no/such/hub.db"));
    assert_eq!(code, 78);
    assert!(
        err.contains("store:") && err.contains("nor does its parent"),
        "{err}"
    );
}

#[test]
fn check_recognises_a_hub_config_without_hub_and_a_daemon_config_with_it() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let hub = format!("{dir}/config/hub.toml");
    let (code, _, err) = cli(&["check", &hub]);
    assert_eq!(code, 78);
    assert!(
        err.contains("is a hub config") && err.contains(&format!("tether check --hub {hub}")),
        "{err}"
    );
    let daemon = format!("{dir}/config/tether.toml");
    let (code, _, err) = cli(&["check", "--hub", &daemon]);
    assert_eq!(code, 78);
    assert!(
        err.contains("is a daemon config") && err.contains("without --hub"),
        "{err}"
    );
}

#[test]
fn completions_and_the_manual_page_come_from_the_cli_definitions() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = cli(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {err}");
        for word in ["new-token", "reconnect", "timeout"] {
            assert!(out.contains(word), "{shell} completions lack {word}");
        }
    }
    let (code, out, err) = cli(&["man"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(".TH tether 1"), "{out}");
    for word in ["completions", "reconnect", "Realtime two\\-way sync"] {
        assert!(out.contains(word), "the man page lacks {word}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_creates_its_store_directory_when_its_parent_exists() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = d.join("hub.toml");
    let store_dir = d.join("hub-data");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nstore = \"sqlite:{}\"\n",
            store_dir.join("hub.db").display()
        ),
    )
    .unwrap();
    let p = Proc::spawn(&["hub", "--config", c(&cfg)], d.join("hub.log"));
    wait_log_field(&p, "hub started", "listen").await;
    assert!(store_dir.join("hub.db").is_file());
    let mode = std::fs::metadata(&store_dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o027, 0, "not open to others: {mode:o}");
    let status = p.terminate();
    let log = std::fs::read_to_string(d.join("hub.log")).unwrap_or_default();
    assert!(
        status.success(),
        "the hub ended with {status:?}; its log:\n{log}"
    );
}

/// The Debian package's maintainer scripts, run into a temporary root
/// (`DPKG_ROOT`, as dpkg does): postinst writes the completions and the
/// manual page from the installed binary, postrm removes them.
#[test]
fn the_debian_package_installs_completions_and_the_man_page_and_removes_them() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("etc")).unwrap();
    std::fs::create_dir_all(r.join("usr/bin")).unwrap();
    std::os::unix::fs::symlink(bin(), r.join("usr/bin/tether")).unwrap();
    // What the package itself installs before postinst runs.
    std::fs::create_dir_all(r.join("usr/lib/sysusers.d")).unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/tether.sysusers"),
        r.join("usr/lib/sysusers.d/tether.conf"),
    )
    .unwrap();
    let script = |name: &str, arg: &str| {
        let out = std::process::Command::new("sh")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/deb/").to_owned() + name)
            .arg(arg)
            .env("DPKG_ROOT", r)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name} {arg}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    script("postinst", "configure");
    let files = [
        ("usr/share/bash-completion/completions/tether", "bash"),
        ("usr/share/zsh/vendor-completions/_tether", "zsh"),
        ("usr/share/fish/vendor_completions.d/tether.fish", "fish"),
    ];
    for (path, shell) in files {
        let written = std::fs::read_to_string(r.join(path)).unwrap();
        assert_eq!(written, cli(&["completions", shell]).1, "{path}");
    }
    let man = std::process::Command::new("gzip")
        .arg("-dc")
        .arg(r.join("usr/share/man/man1/tether.1.gz"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&man.stdout), cli(&["man"]).1);
    script("postrm", "remove");
    for (path, _) in files {
        assert!(!r.join(path).exists(), "{path} left behind");
    }
    assert!(!r.join("usr/share/man/man1/tether.1.gz").exists());
}
