//! `wss://`: the hub serves TLS, daemons verify its certificate and sync
//! through it (or through a TLS-terminating proxy), and a certificate they
//! cannot trust is a clear session error.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use tether::config::ConflictPolicy;
use tether::embedded::{database, EmbeddedDaemon};
use tokio::net::{TcpListener, TcpStream};

const NOTES: &str = "CREATE TABLE notes (id TEXT PRIMARY KEY, title TEXT, body TEXT, n INTEGER)";

/// A self-signed certificate for 127.0.0.1, written as PEM files.
struct Cert {
    cert: PathBuf,
    key: PathBuf,
}

fn self_signed(dir: &Path, name: &str) -> Cert {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    Cert { cert, key }
}

/// A TLS-terminating proxy in front of the hub, as an operator would run;
/// returns its `wss://` URL.
async fn tls_front(cert: &Cert, hub: String) -> String {
    let config = tether::tls::server_config(&cert.cert, &cert.key).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("wss://{}/v1/sync", listener.local_addr().unwrap());
    tokio::spawn(async move {
        // Bounded: a test opens a few connections, or a few hundred
        // failing handshakes with the fastest backoff.
        for _ in 0..2000 {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let hub = hub.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut up) = TcpStream::connect(hub).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    url
}

fn daemon(world: &World, url: &str, ca_file: Option<PathBuf>, file: &str) -> EmbeddedDaemon {
    EmbeddedDaemon::start_with(tether::config::DaemonConfig {
        control_socket: PathBuf::from("/nonexistent/tether.sock"),
        control: Default::default(),
        shutdown_timeout: tether::config::Dur(std::time::Duration::from_secs(10)),
        metrics_listen: None,
        log_level: None,
        hub: tether::config::HubConn {
            url: url.into(),
            token: Some(world.token.clone()),
            token_file: None,
            ca_file,
        },
        reconnect: tether::embedded::fast_reconnect(),
        databases: vec![database(
            "db",
            world.path(file),
            &["notes"],
            ConflictPolicy::ServerWins,
        )],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_sync_over_wss_verifying_the_hub_with_their_ca_file() {
    let world = World::new(&[("db", &["notes"])]).await;
    let cert = self_signed(world.dir.path(), "hub");
    let url = tls_front(&cert, world.addr.clone()).await;
    let a = app(&world.path("a.db"), NOTES);
    let b = app(&world.path("b.db"), NOTES);
    let da = daemon(&world, &url, Some(cert.cert.clone()), "a.db");
    let db = daemon(&world, &url, Some(cert.cert.clone()), "b.db");
    da.wait_connected(DEADLINE).await.unwrap();
    db.wait_connected(DEADLINE).await.unwrap();
    a.execute("INSERT INTO notes (id, title) VALUES ('x', 'over tls')", [])
        .unwrap();
    wait_until("the row on B", || count(&b, "notes") == 1).await;
    da.stop().await;
    db.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_certificate_nobody_trusts_is_a_clear_session_error() {
    let world = World::new(&[("db", &["notes"])]).await;
    let cert = self_signed(world.dir.path(), "hub");
    let other = self_signed(world.dir.path(), "other");
    let url = tls_front(&cert, world.addr.clone()).await;
    let _a = app(&world.path("a.db"), NOTES);
    let _b = app(&world.path("b.db"), NOTES);
    // Trusting another CA, and trusting only the system's roots.
    for (file, ca) in [("a.db", Some(other.cert.clone())), ("b.db", None)] {
        let d = daemon(&world, &url, ca, file);
        let rx = d.status("db");
        wait_until("a TLS error in the status", || {
            rx.borrow()
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("TLS") && e.contains("certificate"))
        })
        .await;
        // A session task that panicked would show `connecting` and no error.
        assert_eq!(status(&d, "db").connects, 0);
        d.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_serves_wss_and_refuses_plain_clients() {
    let certs = tempfile::tempdir().unwrap();
    let cert = self_signed(certs.path(), "hub");
    let world = World::with_hub_tls(&[("db", &["notes"])], &cert.cert, &cert.key).await;
    assert!(world.hub().hub.serves_tls());
    let url = format!("wss://{}/v1/sync", world.addr);
    let a = app(&world.path("a.db"), NOTES);
    let b = app(&world.path("b.db"), NOTES);
    let da = daemon(&world, &url, Some(cert.cert.clone()), "a.db");
    let db = daemon(&world, &url, Some(cert.cert.clone()), "b.db");
    da.wait_connected(DEADLINE).await.unwrap();
    db.wait_connected(DEADLINE).await.unwrap();
    a.execute(
        "INSERT INTO notes (id, title) VALUES ('x', 'to a tls hub')",
        [],
    )
    .unwrap();
    wait_until("the row on B", || count(&b, "notes") == 1).await;
    // A daemon speaking plain ws:// to it never connects, and says why.
    let _c = app(&world.path("c.db"), NOTES);
    let dc = daemon(&world, &world.url(), None, "c.db");
    let rx = dc.status("db");
    wait_until("a connection error for the plain client", || {
        rx.borrow().last_error.is_some()
    })
    .await;
    assert_eq!(status(&dc, "db").connects, 0);
    for d in [da, db, dc] {
        d.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_with_a_key_that_does_not_match_its_certificate_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let cert = self_signed(dir.path(), "hub");
    let other = self_signed(dir.path(), "other");
    let world = World::new(&[("db", &["notes"])]).await;
    let mut config = world.hub().config.clone();
    config.listen = "127.0.0.1:0".into();
    config.store = format!("sqlite:{}", dir.path().join("h.db").display());
    config.tls_cert = Some(cert.cert.clone());
    config.tls_key = Some(other.key.clone());
    let e = match tether::hub::Hub::open(&config) {
        Ok(_) => panic!("a hub with a mismatched key started"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("tls_key") && e.contains("other.key") && e.contains("does not match"),
        "{e}"
    );
}
