//! The hub operator's tools, on real processes: `tether hub` reloading
//! hub.toml (`tether hub reload`, SIGHUP) under connected daemons, and the
//! admin socket's `datasets`, `clients` and `tokens`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::procs::*;
use common::*;
use serde_json::Value;
use tether::hub::auth::{hash_token, new_token};

/// A token of the hub.toml a test writes: name, secret, access.
struct Tok {
    name: &'static str,
    secret: String,
    access: &'static str,
}

impl Tok {
    fn new(name: &'static str) -> Tok {
        Tok {
            name,
            secret: new_token(),
            access: "read_write",
        }
    }

    /// Writes the secret where a daemon reads it.
    fn file(&self, dir: &Path) -> PathBuf {
        let p = dir.join(format!("{}.token", self.name));
        std::fs::write(&p, &self.secret).unwrap();
        p
    }
}

/// A hub.toml with dataset "notes" and these tokens.
fn hub_toml(dir: &Path, tokens: &[&Tok]) -> String {
    let mut text = format!(
        "listen = \"127.0.0.1:0\"\nstore = \"sqlite:{}\"\n[[dataset]]\nname = \"notes\"\ntables = [\"notes\"]\n",
        dir.join("hub.db").display()
    );
    for t in tokens {
        text.push_str(&format!(
            "[[token]]\nname = \"{}\"\nsha256 = \"{}\"\ndatasets = [\"notes\"]\naccess = \"{}\"\n",
            t.name,
            hash_token(&t.secret),
            t.access
        ));
    }
    text
}

/// A hub process serving `hub.toml` in `dir`; returns it, its address and
/// its config file.
async fn start_hub(dir: &Path, tokens: &[&Tok]) -> (Proc, String, PathBuf) {
    let cfg = dir.join("hub.toml");
    std::fs::write(&cfg, hub_toml(dir, tokens)).unwrap();
    let p = Proc::spawn(
        &["hub", "--config", cfg.to_str().unwrap()],
        dir.join("hub.log"),
    );
    let addr = wait_log_field(&p, "hub started", "listen").await;
    (p, addr, cfg)
}

/// A daemon syncing `<name>.db` with `tok`; `max` is its longest backoff
/// (how long a refused token keeps its error in `status`).
async fn daemon(dir: &Path, name: &str, addr: &str, tok: &Tok, max: &str) -> (Proc, PathBuf) {
    let db = format!("{name}.db");
    drop(app(&dir.join(&db), NOTES));
    start_daemon(
        dir,
        name,
        addr,
        &tok.file(dir),
        &[(name, &db)],
        &format!("initial = \"50ms\"\nmax = \"{max}\""),
    )
    .await
}

/// `tether hub CMD --json` against the hub of `cfg`, parsed.
fn admin(cfg: &Path, cmd: &str) -> Value {
    let (code, out, err) = cli(&["hub", cmd, "--json", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "tether hub {cmd}: {err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The connected client of `hub clients` whose session uses token `name`.
fn connected(cfg: &Path, token: &str) -> Option<Value> {
    admin(cfg, "clients")["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["connected"] == true && c["token"] == token)
        .cloned()
}

async fn wait_connected_as(cfg: &Path, token: &str) -> Value {
    wait_until(&format!("a session with token {token}"), || {
        connected(cfg, token).is_some()
    })
    .await;
    connected(cfg, token).unwrap()
}

fn sighup(p: &Proc) {
    let ok = Command::new("kill")
        .args(["-HUP", &p.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -HUP");
}

/// The app's connection to a database that has its table already.
fn reopen(db: &Path) -> rusqlite::Connection {
    app(
        db,
        &NOTES.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS"),
    )
}

fn insert(db: &Path, ids: std::ops::Range<u32>) {
    let c = reopen(db);
    let tx = c.unchecked_transaction().unwrap();
    for i in ids {
        tx.execute(
            "INSERT INTO notes (id, title) VALUES (?1, 'x')",
            [format!("n{i}")],
        )
        .unwrap();
    }
    tx.commit().unwrap();
}

fn dataset(cfg: &Path) -> Value {
    admin(cfg, "datasets")["datasets"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_added_by_reload_lets_its_daemon_sync() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b) = (Tok::new("a"), Tok::new("b"));
    let (mut hub, addr, cfg) = start_hub(d, &[&a]).await;
    let (_da, da_cfg) = daemon(d, "da", &addr, &a, "300ms").await;
    wait_connected_cli(&da_cfg, "da").await;
    let before = wait_connected_as(&cfg, "a").await;
    // b is not listed yet: its daemon is refused.
    let (_db, db_cfg) = daemon(d, "db", &addr, &b, "300ms").await;
    wait_until("b refused", || {
        status_json(&db_cfg, "db")["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("401"))
    })
    .await;

    std::fs::write(&cfg, hub_toml(d, &[&a, &b])).unwrap();
    let (code, out, err) = cli(&["hub", "reload", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("tokens added: b"), "{out}");
    assert!(out.contains("sessions kept: 1, closed: 0"), "{out}");

    wait_connected_cli(&db_cfg, "db").await;
    insert(&d.join("db.db"), 0..3);
    wait_until("b's rows on the hub", || dataset(&cfg)["live_rows"] == 3).await;
    // And they reach the other daemon, whose session was kept.
    let da_db = reopen(&d.join("da.db"));
    wait_ids(&da_db, "notes", &["n0", "n1", "n2"]).await;
    let after = connected(&cfg, "a").expect("a still connected");
    assert_eq!(after["connection"], before["connection"]);
    assert_eq!(after["connected_since_ms"], before["connected_since_ms"]);
    assert_eq!(status_json(&da_cfg, "da")["connects"], 1);

    // A setting that needs a restart is reported and left as it runs; the
    // rest applies. Put back, nothing is reported.
    let moved = hub_toml(d, &[&a]).replace("127.0.0.1:0", "127.0.0.1:1");
    for (text, restart) in [(moved, true), (hub_toml(d, &[&a]), false)] {
        std::fs::write(&cfg, text).unwrap();
        let (code, out, err) = cli(&["hub", "reload", "--config", cfg.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            out.contains("needs a restart: listen changed"),
            restart,
            "{out}"
        );
    }
    hub.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_or_narrowed_token_closes_its_session_and_only_that_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b, mut c) = (Tok::new("a"), Tok::new("b"), Tok::new("c"));
    let (mut hub, addr, cfg) = start_hub(d, &[&a, &b, &c]).await;
    // A long backoff: the refused daemons keep their error in `status`.
    let (_da, da_cfg) = daemon(d, "da", &addr, &a, "300ms").await;
    let (_db, db_cfg) = daemon(d, "db", &addr, &b, "60s").await;
    let (dc, dc_cfg) = daemon(d, "dc", &addr, &c, "60s").await;
    for t in ["a", "b", "c"] {
        wait_connected_as(&cfg, t).await;
    }
    let kept = connected(&cfg, "a").unwrap();
    let c_before = connected(&cfg, "c").unwrap();

    // b is removed, c turns read_only.
    c.access = "read_only";
    std::fs::write(&cfg, hub_toml(d, &[&a, &c])).unwrap();
    let (code, out, err) = cli(&["hub", "reload", "--json", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let report = &serde_json::from_str::<Value>(out.trim()).unwrap()["report"];
    assert_eq!(report["tokens_removed"], serde_json::json!(["b"]));
    assert_eq!(report["tokens_changed"], serde_json::json!(["c"]));
    assert_eq!(report["sessions_kept"], 1);
    let closed = report["sessions_closed"].as_array().unwrap();
    let code_of = |t: &str| {
        closed
            .iter()
            .find(|s| s["token"] == t)
            .map(|s| s["code"].clone())
    };
    assert_eq!(code_of("b"), Some("unauthorized".into()), "{report}");
    assert_eq!(code_of("c"), Some("forbidden".into()), "{report}");

    // Each daemon shows why.
    wait_until("b told it was revoked", || {
        status_json(&db_cfg, "db")["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("unauthorized") && e.contains("token \"b\" was revoked"))
    })
    .await;
    // c is told why (its log keeps the reason: its status shows the new
    // session), then reconnects at once as read-only, not after its 60 s
    // backoff.
    wait_until("c told it is read_only now", || {
        dc.log_text().contains("is now read_only")
    })
    .await;
    wait_until("c connected again, read-only", || {
        connected(&cfg, "c").is_some_and(|s| s["connection"] != c_before["connection"])
            && status_json(&dc_cfg, "dc")["upload"] == "read_only"
    })
    .await;
    wait_until("b's session gone", || connected(&cfg, "b").is_none()).await;
    let log = hub.log_text();
    assert!(
        log.contains("token \\\"b\\\" was revoked") || log.contains("token \"b\" was revoked"),
        "{log}"
    );

    // a's session is the same connection, and still syncs.
    insert(&d.join("da.db"), 0..2);
    wait_until("a's rows on the hub", || dataset(&cfg)["live_rows"] == 2).await;
    let now = connected(&cfg, "a").expect("a still connected");
    assert_eq!(now["connection"], kept["connection"]);
    assert_eq!(now["connected_since_ms"], kept["connected_since_ms"]);
    assert_eq!(status_json(&da_cfg, "da")["connects"], 1);
    hub.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_is_refused_and_sighup_reloads_like_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b) = (Tok::new("a"), Tok::new("b"));
    let (mut hub, addr, cfg) = start_hub(d, &[&a]).await;
    let (_da, da_cfg) = daemon(d, "da", &addr, &a, "300ms").await;
    let kept = wait_connected_as(&cfg, "a").await;

    // A bad value: the CLI finds the socket, the hub refuses naming the key.
    let good = hub_toml(d, &[&a, &b]);
    let bad = good.replace(&hash_token(&b.secret), "not-a-hash");
    std::fs::write(&cfg, &bad).unwrap();
    let (code, _, err) = cli(&["hub", "reload", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("token[1].sha256") && err.contains("keeps its current config"),
        "{err}"
    );
    wait_until("the refusal logged", || {
        hub.log_text()
            .lines()
            .any(|l| l.contains("reload (admin socket) refused") && l.contains("token[1].sha256"))
    })
    .await;
    // Not TOML at all, by SIGHUP: refused and logged, the hub lives on.
    std::fs::write(&cfg, "listen = [").unwrap();
    sighup(&hub);
    wait_until("the SIGHUP refusal logged", || {
        hub.log_text()
            .lines()
            .any(|l| l.contains("reload (SIGHUP) refused"))
    })
    .await;
    hub.assert_running();
    // The old config serves: token a only, the same connection.
    let (code, _, err) = cli(&["hub", "tokens", "--config", cfg.to_str().unwrap()]);
    assert_eq!(
        code, 78,
        "the CLI cannot find the socket in a file that is not TOML: {err}"
    );
    assert!(err.contains("--socket"), "{err}");
    let names: Vec<Value> = admin_sock(d, "tokens")["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].clone())
        .collect();
    assert_eq!(names, ["a"]);
    assert_eq!(connected_sock(d, "a")["connection"], kept["connection"]);

    // Fixed, by SIGHUP: b is added as the CLI would.
    std::fs::write(&cfg, &good).unwrap();
    sighup(&hub);
    wait_until("b listed after SIGHUP", || {
        admin(&cfg, "tokens")["tokens"].as_array().unwrap().len() == 2
    })
    .await;
    let (_db, db_cfg) = daemon(d, "db", &addr, &b, "300ms").await;
    wait_connected_cli(&db_cfg, "db").await;
    assert_eq!(
        connected(&cfg, "a").unwrap()["connection"],
        kept["connection"]
    );
    assert_eq!(status_json(&da_cfg, "da")["connects"], 1);
}

/// `tether hub CMD --json --socket` (for when hub.toml is broken).
fn admin_sock(dir: &Path, cmd: &str) -> Value {
    let sock = dir.join("hub.db-admin.sock");
    let (code, out, err) = cli(&["hub", cmd, "--json", "--socket", sock.to_str().unwrap()]);
    assert_eq!(code, 0, "tether hub {cmd}: {err}");
    serde_json::from_str(out.trim()).unwrap()
}

fn connected_sock(dir: &Path, token: &str) -> Value {
    admin_sock(dir, "clients")["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["connected"] == true && c["token"] == token)
        .cloned()
        .expect("connected")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datasets_clients_and_tokens_show_true_figures_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, mut r) = (Tok::new("writer"), Tok::new("reader"));
    r.access = "read_only";
    let (_hub, addr, cfg) = start_hub(d, &[&a, &r]).await;
    let (_da, da_cfg) = daemon(d, "da", &addr, &a, "300ms").await;
    insert(&d.join("da.db"), 0..25);
    wait_until("25 changes on the hub", || dataset(&cfg)["head"] == 25).await;
    {
        let c = reopen(&d.join("da.db"));
        c.execute(
            "DELETE FROM notes WHERE id IN ('n0','n1','n2','n3','n4')",
            [],
        )
        .unwrap();
    }
    wait_until("30 changes on the hub", || dataset(&cfg)["head"] == 30).await;
    let (_dr, dr_cfg) = daemon(d, "dr", &addr, &r, "300ms").await;
    let reader_db = reopen(&d.join("dr.db"));
    wait_until("the reader has the rows", || {
        count(&reader_db, "notes") == 20
    })
    .await;

    let ds = dataset(&cfg);
    assert_eq!(ds["name"], "notes");
    assert_eq!(ds["live_rows"], 20, "{ds}");
    assert_eq!(ds["log_changes"], 30, "{ds}");
    assert_eq!(ds["sessions"], 2, "{ds}");
    assert!(ds["bytes"].as_u64().unwrap() > 0, "{ds}");
    let all = admin(&cfg, "datasets");
    assert!(all["store_bytes"].as_u64().unwrap() >= ds["bytes"].as_u64().unwrap());

    // Each client's cursor is what its daemon holds; lag is head - cursor.
    wait_until("the reader caught up", || {
        connected(&cfg, "reader").is_some_and(|c| c["lag"] == 0)
    })
    .await;
    let rc = connected(&cfg, "reader").unwrap();
    assert_eq!(rc["cursor"], 30, "{rc}");
    assert_eq!(rc["head"], 30, "{rc}");
    wait_until("the reader's daemon at 30", || {
        status_json(&dr_cfg, "dr")["cursor"] == 30
    })
    .await;
    let wc = connected(&cfg, "writer").unwrap();
    assert_eq!(wc["last_seq"], 30, "{wc}");
    assert_eq!(wc["cursor"], 30, "{wc}");
    assert_eq!(wc["lag"], 0, "{wc}");
    assert!(
        wc["address"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{wc}"
    );
    assert!(wc["connected_since_ms"].as_u64().unwrap() > 0);
    drop(da_cfg);

    // Tokens: names, scope, access; never the secret or its hash.
    let (code, out, err) = cli(&["hub", "tokens", "--json", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let (code, text, err) = cli(&["hub", "tokens", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    for t in [&a, &r] {
        for o in [&out, &text] {
            assert!(
                !o.contains(&t.secret) && !o.contains(&hash_token(&t.secret)),
                "{o}"
            );
        }
    }
    let tokens: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        tokens["tokens"],
        serde_json::json!([
            {"name": "writer", "datasets": ["notes"], "access": "read_write", "sessions": 1},
            {"name": "reader", "datasets": ["notes"], "access": "read_only", "sessions": 1},
        ])
    );
    assert!(
        text.starts_with("NAME    ACCESS      DATASETS  SESSIONS\n"),
        "{text}"
    );
    // The people's forms of the other two.
    let (code, text, err) = cli(&["hub", "datasets", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.starts_with("DATASET  TABLES  HEAD  LIVE ROWS  LOG  SIZE"),
        "{text}"
    );
    assert!(
        text.contains("notes    notes   30    20         30"),
        "{text}"
    );
    let (code, text, err) = cli(&["hub", "clients", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("connected since"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_admin_socket_gets_an_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = Tok::new("a");
    let (_hub, _addr, _cfg) = start_hub(d, &[&a]).await;
    let sock = d.join("hub.db-admin.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut ask = |line: &[u8]| -> Value {
        w.write_all(line).unwrap();
        let mut answer = String::new();
        r.read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
    };
    for (line, want) in [
        (&b"hello there\n"[..], "not valid JSON"),
        (b"{\"cmd\":\"drop_everything\"}\n", "unknown request type"),
        (b"\xff\xfe\n", "not UTF-8"),
    ] {
        let v = ask(line);
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["code"], "bad_request", "{v}");
        assert!(v["message"].as_str().unwrap().contains(want), "{v}");
    }
    // The same connection still answers a request.
    let v = ask(b"{\"cmd\":\"tokens\"}\n");
    assert_eq!(v["type"], "tokens", "{v}");
    assert_eq!(v["tokens"][0]["name"], "a");
}

/// A self-signed certificate for 127.0.0.1: (certificate PEM, key PEM).
fn self_signed() -> (String, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    (ck.cert.pem(), ck.key_pair.serialize_pem())
}

/// Whether a TLS handshake with the hub succeeds trusting only `ca`.
async fn trusts(addr: &str, ca: &Path) -> bool {
    let config = tether::tls::client_config(Some(ca)).unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let handshake = connector.connect(name, tcp);
    matches!(tokio::time::timeout(DEADLINE, handshake).await, Ok(Ok(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_rotates_the_tls_certificate_for_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = Tok::new("a");
    let (old, new) = (self_signed(), self_signed());
    let (crt, key) = (d.join("hub.crt"), d.join("hub.key"));
    std::fs::write(&crt, &old.0).unwrap();
    std::fs::write(&key, &old.1).unwrap();
    let (old_ca, new_ca) = (d.join("old-ca.crt"), d.join("new-ca.crt"));
    std::fs::write(&old_ca, &old.0).unwrap();
    std::fs::write(&new_ca, &new.0).unwrap();
    let cfg = d.join("hub.toml");
    let text = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\n{}",
        crt.display(),
        key.display(),
        hub_toml(d, &[&a])
    );
    std::fs::write(&cfg, text).unwrap();
    let mut hub = Proc::spawn(
        &["hub", "--config", cfg.to_str().unwrap()],
        d.join("hub.log"),
    );
    let addr = wait_log_field(&hub, "hub started", "listen").await;
    // A daemon on wss:// trusting the old certificate.
    drop(app(&d.join("da.db"), NOTES));
    let da_cfg = d.join("da.toml");
    let sock = d.join("da.sock");
    std::fs::write(
        &da_cfg,
        format!(
            "control_socket = \"{}\"\n[hub]\nurl = \"wss://{addr}/v1/sync\"\ntoken_file = \"{}\"\nca_file = \"{}\"\n[reconnect]\ninitial = \"50ms\"\nmax = \"300ms\"\n[[database]]\nname = \"da\"\npath = \"{}\"\ndataset = \"notes\"\ntables = [\"notes\"]\n",
            sock.display(),
            a.file(d).display(),
            old_ca.display(),
            d.join("da.db").display()
        ),
    )
    .unwrap();
    let _da = Proc::spawn(
        &["daemon", "--config", da_cfg.to_str().unwrap()],
        d.join("da.log"),
    );
    wait_until("da connected", || {
        cli(&["status", "--socket", sock.to_str().unwrap()]).0 == 0
            && status_json(&da_cfg, "da")["connection"] == "connected"
    })
    .await;
    let kept = wait_connected_as(&cfg, "a").await;
    assert!(trusts(&addr, &old_ca).await && !trusts(&addr, &new_ca).await);

    // The operator renews the certificate in place and reloads.
    std::fs::write(&crt, &new.0).unwrap();
    std::fs::write(&key, &new.1).unwrap();
    let (code, out, err) = cli(&["hub", "reload", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("TLS certificate and key read again"), "{out}");
    assert!(
        trusts(&addr, &new_ca).await,
        "new connections get the new certificate"
    );
    assert!(!trusts(&addr, &old_ca).await);
    // The session opened with the old one goes on.
    let now = connected(&cfg, "a").expect("still connected");
    assert_eq!(now["connection"], kept["connection"]);
    assert_eq!(status_json(&da_cfg, "da")["connects"], 1);

    // A key that does not match its certificate is refused, naming it.
    std::fs::write(&key, &old.1).unwrap();
    let (code, _, err) = cli(&["hub", "reload", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("tls_key") && err.contains("does not match"),
        "{err}"
    );
    assert!(
        trusts(&addr, &new_ca).await,
        "the current certificate stays"
    );
    hub.assert_running();
}
