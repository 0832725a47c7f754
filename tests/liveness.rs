//! Staying connected: the read-timeout guard on both sides.

mod common;

use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::*;
use tether::config::{ConflictPolicy, DaemonConfig, Dur, HubConn, Reconnect};
use tether::embedded::{database, EmbeddedDaemon};
use tether::proto;
use tether::session::ConnectionState;

/// A daemon syncing the world's `a.db` as database "db".
fn daemon_on_a_db(world: &World, hub: HubConn, reconnect: Reconnect) -> EmbeddedDaemon {
    EmbeddedDaemon::start_with(DaemonConfig {
        control_socket: world.path("unused.sock"),
        control: Default::default(),
        shutdown_timeout: Dur(Duration::from_secs(5)),
        metrics_listen: None,
        log_level: None,
        hub,
        reconnect,
        databases: vec![database(
            "db",
            world.path("a.db"),
            &["notes"],
            ConflictPolicy::ServerWins,
        )],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_connection_is_dropped_within_read_timeout_plus_a_ping() {
    let world = World::new(&[("db", &["notes"])]).await;
    let a = app(&world.path("a.db"), NOTES);
    let proxy = Proxy::start(world.hub().addr.to_string()).await;
    let (ping, read_timeout) = (Duration::from_millis(250), Duration::from_millis(2000));
    let d = daemon_on_a_db(
        &world,
        HubConn {
            url: format!("ws://{}/v1/sync", proxy.addr),
            token: Some(world.token.clone()),
            token_file: None,
            ca_file: None,
        },
        Reconnect {
            initial: Dur(Duration::from_millis(50)),
            max: Dur(Duration::from_millis(200)),
            multiplier: 2.0,
            ping_interval: Dur(ping),
            read_timeout: Dur(read_timeout),
        },
    );
    d.wait_connected(DEADLINE).await.unwrap();
    a.execute("INSERT INTO notes VALUES ('x', 't', 'b', 1)", [])
        .unwrap();
    wait_idle(&d, "db").await;
    let mut rx = d.status("db");
    // Stays connected while pings flow (several read timeouts long).
    let calm = tokio::time::timeout(
        3 * read_timeout,
        rx.wait_for(|s| s.connection != ConnectionState::Connected),
    )
    .await
    .is_err();
    assert!(calm, "a healthy idle connection was dropped");
    proxy.black_hole();
    let cut = Instant::now();
    let fired = tokio::time::timeout(
        DEADLINE,
        rx.wait_for(|s| s.connection != ConnectionState::Connected && s.last_error.is_some()),
    )
    .await
    .map(|r| r.is_ok())
    .unwrap_or(false);
    assert!(fired, "the guard fires");
    let took = cut.elapsed();
    assert!(
        took <= read_timeout + ping + Duration::from_secs(1),
        "half-open connection detected after {took:?}, bound is {:?}",
        read_timeout + ping
    );
    let err = rx.borrow().last_error.clone().unwrap_or_default();
    assert!(err.contains("nothing received"), "{err}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_drops_a_silent_client_and_serves_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut world = World::new(&[("db", &["notes"])]).await;
    // Restart the hub with a short read timeout.
    world.stop_hub().await;
    let token = world.token.clone();
    let mut cfg = tether::embedded::EmbeddedHub::start(
        &dir.path().join("h.db"),
        &[("db", &["notes"])],
        "127.0.0.1:0",
    )
    .await
    .unwrap()
    .config
    .clone();
    cfg.read_timeout = Dur(Duration::from_millis(500));
    cfg.tokens[0].sha256 = tether::hub::auth::hash_token(&token);
    let hub = tether::embedded::EmbeddedHub::start_with(cfg, token.clone())
        .await
        .unwrap();
    let mut ws = raw_connect(&hub.url(), Some(&token), Some("db"))
        .await
        .unwrap();
    raw_send(&mut ws, proto::encode(&notes_hello("db", "silent"))).await;
    let start = Instant::now();
    // Welcome and caught_up, then the hub drops the silent client (without
    // a close handshake: a silent peer would not answer one).
    while let Next::Frame(_) = raw_next(&mut ws).await {}
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(10),
        "closed after {took:?}"
    );
    // Others are still served.
    let mut ws2 = raw_connect(&hub.url(), Some(&token), Some("db"))
        .await
        .unwrap();
    raw_send(&mut ws2, proto::encode(&notes_hello("db", "next"))).await;
    assert!(matches!(
        raw_recv(&mut ws2).await,
        Some(proto::HubFrame::Welcome(_))
    ));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_retried_as_soon_as_the_token_file_changes() {
    let world = World::new(&[("db", &["notes"])]).await;
    let _a = app(&world.path("a.db"), NOTES);
    let token_file = world.path("token");
    std::fs::write(&token_file, "not-the-token").unwrap();
    let d = daemon_on_a_db(
        &world,
        HubConn {
            url: world.url(),
            token: None,
            token_file: Some(token_file.clone()),
            ca_file: None,
        },
        // A backoff far longer than the test: only the file change can help.
        Reconnect {
            initial: Dur(Duration::from_secs(120)),
            max: Dur(Duration::from_secs(300)),
            ..Reconnect::default()
        },
    );
    let mut rx = d.status("db");
    let waiting = tokio::time::timeout(
        DEADLINE,
        rx.wait_for(|s| s.session == tether::session::SessionState::WaitingForAccessToken),
    )
    .await
    .map(|r| r.is_ok())
    .unwrap_or(false);
    assert!(
        waiting,
        "a refused token puts the session in waiting_for_access_token"
    );
    assert!(rx.borrow().backoff_ms.unwrap() >= 60_000, "no hammering");
    std::fs::write(&token_file, format!("{}\n", world.token)).unwrap();
    d.wait_connected(DEADLINE).await.unwrap();
    d.stop().await;
}
