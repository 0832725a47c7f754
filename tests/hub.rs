//! The hub facing bad clients: wrong tokens, malformed frames, unknown
//! datasets and tables, invalid changes. Every other session keeps working.

mod common;

use common::*;
use tether::config::{ConflictPolicy, Dur, HubConfig, TokenAccess, TokenConfig};
use tether::embedded::EmbeddedHub;
use tether::hub::auth::{hash_token, new_token};
use tether::proto::{
    self, Change, ClientFrame, ErrorCode, HubFrame, InvalidReason, Op, Outcome, Upload, Value,
};
use tokio_tungstenite::tungstenite::Error as WsError;

fn http_status(e: WsError) -> u16 {
    match e {
        WsError::Http(resp) => resp.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

async fn hub_with_scoped_tokens(dir: &std::path::Path) -> (EmbeddedHub, String, String) {
    let (full, only_other) = (new_token(), new_token());
    let config = HubConfig {
        listen: "127.0.0.1:0".into(),
        store: format!("sqlite:{}", dir.join("hub.db").display()),
        datasets: vec![
            tether::config::DatasetConfig {
                name: "notes".into(),
                tables: vec!["notes".into()],
            },
            tether::config::DatasetConfig {
                name: "other".into(),
                tables: vec!["notes".into()],
            },
        ],
        tokens: vec![
            TokenConfig {
                name: "full".into(),
                sha256: hash_token(&full),
                datasets: vec!["*".into()],
                access: TokenAccess::ReadWrite,
            },
            TokenConfig {
                name: "other-only".into(),
                sha256: hash_token(&only_other),
                datasets: vec!["other".into()],
                access: TokenAccess::ReadOnly,
            },
        ],
        metrics: true,
        log_level: None,
        read_timeout: Dur(std::time::Duration::from_secs(60)),
        tls_cert: None,
        tls_key: None,
        limits: Default::default(),
        admin_socket: None,
    };
    let hub = EmbeddedHub::start_with(config, full.clone()).await.unwrap();
    (hub, full, only_other)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_missing_or_out_of_scope_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, full, other_only) = hub_with_scoped_tokens(dir.path()).await;
    let url = hub.url();
    let no_token = raw_connect(&url, None, Some("notes")).await.unwrap_err();
    assert_eq!(http_status(no_token), 401);
    let wrong = raw_connect(&url, Some("not-a-token"), Some("notes"))
        .await
        .unwrap_err();
    assert_eq!(http_status(wrong), 401);
    let scoped = raw_connect(&url, Some(&other_only), Some("notes"))
        .await
        .unwrap_err();
    assert_eq!(http_status(scoped), 403);
    // Without the dataset header the refusal comes as an error frame.
    let mut ws = raw_connect(&url, Some(&other_only), None).await.unwrap();
    raw_send(&mut ws, proto::encode(&notes_hello("notes", "c1"))).await;
    match raw_recv(&mut ws).await {
        Some(HubFrame::Error(e)) => {
            assert_eq!(e.code, ErrorCode::Forbidden);
            assert!(e.message.contains("other-only"), "{}", e.message);
        }
        other => panic!("expected forbidden, got {other:?}"),
    }
    assert!(
        raw_recv(&mut ws).await.is_none(),
        "connection closed after a fatal error"
    );
    // A read-only token may download (once a read_write client registered
    // the table); its uploads are refused, never applied.
    let mut reg = raw_connect(&url, Some(&full), Some("other")).await.unwrap();
    raw_send(&mut reg, proto::encode(&notes_hello("other", "registrar"))).await;
    assert!(matches!(
        raw_recv(&mut reg).await,
        Some(HubFrame::Welcome(_))
    ));
    let mut ws = raw_connect(&url, Some(&other_only), Some("other"))
        .await
        .unwrap();
    raw_send(&mut ws, proto::encode(&notes_hello("other", "c2"))).await;
    let Some(HubFrame::Welcome(w)) = raw_recv(&mut ws).await else {
        panic!("welcome")
    };
    assert_eq!(w.access, proto::Access::ReadOnly);
    let _caught_up = raw_recv(&mut ws).await;
    raw_send(
        &mut ws,
        proto::encode(&upload(1, vec![row_change(1, "x", 4)])),
    )
    .await;
    match raw_recv(&mut ws).await {
        Some(HubFrame::Error(e)) => assert_eq!(e.code, ErrorCode::Forbidden),
        other => panic!("expected forbidden, got {other:?}"),
    }
    // Nothing of it reached the store: the dataset's log is empty.
    let store = rusqlite::Connection::open(dir.path().join("hub.db")).unwrap();
    let logged: i64 = store
        .query_row(
            "SELECT coalesce(sum(head), 0) FROM datasets WHERE name = 'other'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(logged, 0, "a read-only upload was stored");

    // A daemon with a bad token says so and waits for a new one.
    let d = tether::embedded::EmbeddedDaemon::start(
        &url,
        "bad-token",
        vec![tether::embedded::database(
            "db",
            {
                let p = dir.path().join("a.db");
                app(&p, NOTES);
                p
            },
            &["notes"],
            ConflictPolicy::ServerWins,
        )],
    );
    let rx = d.status("db");
    wait_until("daemon waits for a token", || {
        rx.borrow().session == tether::session::SessionState::WaitingForAccessToken
    })
    .await;
    let err = status(&d, "db").last_error.unwrap();
    assert!(err.contains("401") && err.contains("token"), "{err}");
    d.stop().await;
    hub.stop().await;
}

fn row_change(seq: u64, id: &str, ncols: usize) -> Change {
    let mut values = vec![Value::Text(id.into())];
    values.extend((1..ncols).map(|i| Value::Integer(i as i64)));
    Change {
        seq,
        table: "notes".into(),
        op: Op::Upsert,
        pk: vec![Value::Text(id.into())],
        values,
        base: 0,
        mask: u64::MAX,
    }
}

fn upload(batch: u64, changes: Vec<Change>) -> ClientFrame {
    ClientFrame::Upload(Upload {
        batch,
        acked: 0,
        changes,
    })
}

/// Opens a raw session on dataset `db` and reads up to `caught_up`.
async fn raw_session(world: &World, client: &str) -> RawWs {
    let mut ws = raw_connect(&world.url(), Some(&world.token), Some("db"))
        .await
        .unwrap();
    raw_send(&mut ws, proto::encode(&notes_hello("db", client))).await;
    loop {
        match raw_recv(&mut ws).await {
            Some(HubFrame::CaughtUp(_)) => return ws,
            Some(HubFrame::Error(e)) => panic!("refused: {e:?}"),
            Some(_) => continue,
            None => panic!("closed"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_clear_errors_and_other_sessions_keep_syncing() {
    let world = World::new(&[("db", &["notes"])]).await;
    let (a, b, da, db) = notes_pair(&world, ConflictPolicy::ServerWins).await;
    let url = world.url();
    let token = world.token.clone();

    let expect_error = |f: Option<HubFrame>, code: ErrorCode, needle: &str| match f {
        Some(HubFrame::Error(e)) => {
            assert_eq!(e.code, code, "{}", e.message);
            assert!(
                e.message.contains(needle),
                "{:?} lacks {needle:?}",
                e.message
            );
        }
        other => panic!("expected {code:?}, got {other:?}"),
    };

    // Garbage instead of a hello.
    let mut ws = raw_connect(&url, Some(&token), None).await.unwrap();
    raw_send(&mut ws, vec![0xc1, 0xff, 0x00, 0x13]).await;
    expect_error(
        raw_recv(&mut ws).await,
        ErrorCode::MalformedFrame,
        "malformed",
    );
    // An unknown frame type.
    let mut ws = raw_connect(&url, Some(&token), None).await.unwrap();
    raw_send(
        &mut ws,
        rmp_serde::to_vec_named(&serde_json::json!({"launch": {"x": 1}})).unwrap(),
    )
    .await;
    expect_error(
        raw_recv(&mut ws).await,
        ErrorCode::MalformedFrame,
        "unknown variant",
    );
    // A wrong protocol version, an unknown dataset, an undeclared table.
    let mut hello = notes_hello("db", "c");
    if let ClientFrame::Hello(h) = &mut hello {
        h.protocol = 99;
    }
    let mut ws = raw_connect(&url, Some(&token), None).await.unwrap();
    raw_send(&mut ws, proto::encode(&hello)).await;
    expect_error(raw_recv(&mut ws).await, ErrorCode::UnsupportedVersion, "99");
    let mut ws = raw_connect(&url, Some(&token), None).await.unwrap();
    raw_send(&mut ws, proto::encode(&notes_hello("nope", "c"))).await;
    expect_error(
        raw_recv(&mut ws).await,
        ErrorCode::UnknownDataset,
        "\"nope\"",
    );
    let mut hello = notes_hello("db", "c");
    if let ClientFrame::Hello(h) = &mut hello {
        h.tables[0].name = "secrets".into();
        h.tables[0].fingerprint = tether::local::schema::fingerprint(
            "secrets",
            &h.tables[0].columns,
            &h.tables[0].types,
            &h.tables[0].pk,
        );
    }
    let mut ws = raw_connect(&url, Some(&token), None).await.unwrap();
    raw_send(&mut ws, proto::encode(&hello)).await;
    expect_error(
        raw_recv(&mut ws).await,
        ErrorCode::UnknownTable,
        "\"secrets\"",
    );
    // An upload before hello.
    let mut ws = raw_connect(&url, Some(&token), None).await.unwrap();
    raw_send(&mut ws, proto::encode(&upload(1, vec![]))).await;
    expect_error(raw_recv(&mut ws).await, ErrorCode::UnexpectedFrame, "hello");

    // Changes of the wrong shape are reported invalid, each with its reason;
    // valid ones in the same batch are applied.
    let mut ws = raw_session(&world, "raw-client").await;
    let mut wrong_key = row_change(4, "k", 4);
    wrong_key.pk = vec![Value::Text("other".into())];
    let mut unknown = row_change(5, "u", 4);
    unknown.table = "secrets".into();
    let changes = vec![
        row_change(1, "good", 4),
        row_change(2, "long", 5),
        row_change(3, "good", 4),
        wrong_key,
        unknown,
    ];
    raw_send(&mut ws, proto::encode(&upload(7, changes.clone()))).await;
    let first = loop {
        match raw_recv(&mut ws).await {
            Some(HubFrame::UploadResult(r)) => break r,
            Some(_) => continue,
            None => panic!("closed"),
        }
    };
    assert_eq!(first.batch, 7);
    let reasons: Vec<_> = first
        .results
        .iter()
        .map(|r| match &r.outcome {
            Outcome::Applied { .. } => None,
            Outcome::Invalid { reason, .. } => Some(*reason),
            o => panic!("unexpected {o:?}"),
        })
        .collect();
    assert_eq!(
        reasons,
        vec![
            None,
            Some(InvalidReason::WrongColumnCount),
            Some(InvalidReason::DuplicateRow),
            Some(InvalidReason::WrongKey),
            Some(InvalidReason::UnknownTable),
        ]
    );
    assert_eq!(first.summary.total, 5);
    assert_eq!(first.summary.applied, 1);
    assert_eq!(first.summary.invalid, 4);
    assert_eq!(first.summary.invalid_reasons["wrong_key"], 1);
    // The same batch sent again is answered the same and applied once.
    raw_send(&mut ws, proto::encode(&upload(7, changes))).await;
    let again = loop {
        match raw_recv(&mut ws).await {
            Some(HubFrame::UploadResult(r)) => break r,
            Some(_) => continue,
            None => panic!("closed"),
        }
    };
    assert_eq!(again.results, first.results);
    wait_until("B got the one good row", || count(&b, "notes") == 1).await;
    // Applied once in the store, not only answered alike.
    let hub = rusqlite::Connection::open(world.path("hub.db")).unwrap();
    let entries: i64 = hub
        .query_row("SELECT count(*) FROM log_1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(entries, 1, "the resent batch was stored again");

    // Meanwhile the daemons kept syncing.
    a.execute("INSERT INTO notes VALUES ('after', 't', 'b', 2)", [])
        .unwrap();
    wait_converged(&a, &b, "notes").await;
    da.stop().await;
    db.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_are_refused_without_hurting_the_hub() {
    let world = World::new(&[("db", &["notes"])]).await;
    let mut ws = raw_session(&world, "big").await;
    use futures_util::SinkExt;
    let big = tokio_tungstenite::tungstenite::Message::Binary(
        vec![0x90; proto::MAX_FRAME_BYTES + 1].into(),
    );
    // The hub may cut the connection while the frame is still being
    // written, so the client may see a reset rather than the error frame;
    // the hub's own count says why it ended the session.
    if ws.send(big).await.is_ok() {
        match raw_next(&mut ws).await {
            Next::Closed | Next::Broken(_) => {}
            Next::Frame(HubFrame::Error(e)) => assert_eq!(e.code, ErrorCode::FrameTooLarge),
            Next::Frame(other) => panic!("expected a refusal, got {other:?}"),
        }
    }
    let metrics = world.hub().hub.metrics();
    wait_until("the refusal counted as frame_too_large", || {
        metrics
            .render()
            .lines()
            .any(|l| l.starts_with("tether_hub_refused_total{code=\"frame_too_large\"} 1"))
    })
    .await;
    // The hub still serves new sessions.
    let _ws = raw_session(&world, "next").await;
}

/// A hub with dataset `db` (tables `notes` and `other`), a read-write and a
/// read-only token, and the given read timeout.
async fn hub_for_limits(
    dir: &std::path::Path,
    read_timeout: std::time::Duration,
) -> (EmbeddedHub, String, String) {
    let (rw, ro) = (new_token(), new_token());
    let config = HubConfig {
        listen: "127.0.0.1:0".into(),
        store: format!("sqlite:{}", dir.join("hub.db").display()),
        datasets: vec![tether::config::DatasetConfig {
            name: "db".into(),
            tables: vec!["notes".into(), "other".into()],
        }],
        tokens: vec![
            TokenConfig {
                name: "rw".into(),
                sha256: hash_token(&rw),
                datasets: vec!["*".into()],
                access: TokenAccess::ReadWrite,
            },
            TokenConfig {
                name: "ro".into(),
                sha256: hash_token(&ro),
                datasets: vec!["*".into()],
                access: TokenAccess::ReadOnly,
            },
        ],
        metrics: true,
        log_level: None,
        read_timeout: Dur(read_timeout),
        tls_cert: None,
        tls_key: None,
        limits: Default::default(),
        admin_socket: None,
    };
    let hub = EmbeddedHub::start_with(config, rw.clone()).await.unwrap();
    (hub, rw, ro)
}

/// A hello for `notes`, and for `other` (same columns) when `both`.
fn hello(client: &str, both: bool) -> ClientFrame {
    let mut h = notes_hello("db", client);
    if let ClientFrame::Hello(h) = &mut h {
        if both {
            let mut t = h.tables[0].clone();
            t.name = "other".into();
            t.fingerprint =
                tether::local::schema::fingerprint("other", &t.columns, &t.types, &t.pk);
            h.tables.push(t);
        }
    }
    h
}

/// A notes-shaped row of `table` with a body of `body` bytes.
fn big_change(seq: u64, table: &str, id: &str, body: usize) -> Change {
    Change {
        seq,
        table: table.into(),
        op: Op::Upsert,
        pk: vec![Value::Text(id.into())],
        values: vec![
            Value::Text(id.into()),
            Value::Text("t".into()),
            Value::Text("b".repeat(body)),
            Value::Integer(seq as i64),
        ],
        base: 0,
        mask: u64::MAX,
    }
}

/// Connects, says hello and reads up to `caught_up`.
async fn session_at(url: &str, token: &str, hello: &ClientFrame) -> RawWs {
    let mut ws = raw_connect(url, Some(token), Some("db")).await.unwrap();
    raw_send(&mut ws, proto::encode(hello)).await;
    loop {
        match recv_sized(&mut ws).await {
            Some((HubFrame::CaughtUp(_), _)) => return ws,
            Some((HubFrame::Error(e), _)) => panic!("refused: {e:?}"),
            Some(_) => continue,
            None => panic!("closed"),
        }
    }
}

/// The next hub frame and its size in bytes; None once closed.
async fn recv_sized(ws: &mut RawWs) -> Option<(HubFrame, usize)> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let m = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("hub answers within the deadline")?;
        match m {
            Ok(Message::Binary(b)) => {
                assert!(b.len() <= proto::MAX_FRAME_BYTES, "frame of {}", b.len());
                return Some((proto::decode(&b).expect("hub frames decode"), b.len()));
            }
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// Reads the whole answer of `batch` (every part up to `more == false`),
/// skipping other frames; returns the results and the parts' sizes.
async fn answer(ws: &mut RawWs, batch: u64) -> (Vec<proto::ChangeResult>, Vec<usize>) {
    let (mut results, mut sizes) = (Vec::new(), Vec::new());
    loop {
        match recv_sized(ws).await {
            Some((HubFrame::UploadResult(r), n)) => {
                assert_eq!(r.batch, batch);
                assert_eq!(r.summary.total as usize, r.results.len());
                results.extend(r.results);
                sizes.push(n);
                if !r.more {
                    return (results, sizes);
                }
            }
            Some((HubFrame::Error(e), _)) => panic!("error: {e:?}"),
            Some(_) => continue,
            None => panic!("closed before the answer of batch {batch}"),
        }
    }
}

fn stalled(hub: &EmbeddedHub) -> bool {
    hub.hub
        .metrics()
        .render()
        .lines()
        .any(|l| l == "tether_hub_stalled_sessions_total{dataset=\"db\"} 1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_dropped_while_others_keep_being_served() {
    let dir = tempfile::tempdir().unwrap();
    let read_timeout = std::time::Duration::from_secs(2);
    let (hub, rw, ro) = hub_for_limits(dir.path(), read_timeout).await;
    let url = hub.url();
    // A read_write client registers the table; a read_only one may not.
    drop(session_at(&url, &rw, &hello("registrar", false)).await);
    // The reader that never reads: hello, then only pings (it is alive).
    let mut idle = raw_connect(&url, Some(&ro), Some("db")).await.unwrap();
    raw_send(&mut idle, proto::encode(&hello("idle", false))).await;
    let pinger = tokio::spawn(async move {
        use futures_util::SinkExt;
        let ping = tokio_tungstenite::tungstenite::Message::Ping(vec![1].into());
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
        for _ in 0..(DEADLINE.as_millis() / 200) {
            tick.tick().await;
            if idle.send(ping.clone()).await.is_err() {
                return;
            }
        }
    });
    // The writer uploads about 24 MB, far more than the socket buffers hold.
    let mut w = session_at(&url, &rw, &hello("writer", false)).await;
    let mut seq = 0;
    for batch in 1..=24u64 {
        let changes = (0..1000)
            .map(|_| {
                seq += 1;
                big_change(seq, "notes", &format!("r{seq}"), 1000)
            })
            .collect();
        raw_send(&mut w, proto::encode(&upload(batch, changes))).await;
        let (results, _) = answer(&mut w, batch).await;
        assert_eq!(results.len(), 1000);
    }
    let uploaded = std::time::Instant::now();
    wait_until("the idle reader is dropped as stalled", || stalled(&hub)).await;
    assert!(uploaded.elapsed() < read_timeout * 10);
    // The writer is still served.
    raw_send(
        &mut w,
        proto::encode(&upload(25, vec![big_change(seq + 1, "notes", "last", 1)])),
    )
    .await;
    let (results, _) = answer(&mut w, 25).await;
    assert!(matches!(results[0].outcome, Outcome::Applied { .. }));
    tokio::time::timeout(DEADLINE, pinger)
        .await
        .expect("the pinger ends once dropped")
        .unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_with_large_rows_are_answered_in_parts_under_the_frame_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, rw, _) = hub_for_limits(dir.path(), std::time::Duration::from_secs(60)).await;
    let url = hub.url();
    let mut a = session_at(&url, &rw, &hello("a", false)).await;
    for batch in 0..4u64 {
        let changes = (1..=1000)
            .map(|i| {
                let n = batch * 1000 + i;
                big_change(n, "notes", &format!("k{n}"), 5000)
            })
            .collect();
        raw_send(&mut a, proto::encode(&upload(batch + 1, changes))).await;
        answer(&mut a, batch + 1).await;
    }
    let mut b = session_at(&url, &rw, &hello("b", false)).await;
    let changes = (1..=4000)
        .map(|n| big_change(n, "notes", &format!("k{n}"), 1))
        .collect();
    raw_send(&mut b, proto::encode(&upload(1, changes))).await;
    let (results, sizes) = answer(&mut b, 1).await;
    assert!(sizes.len() >= 2, "one answer of {sizes:?}");
    let seqs: Vec<u64> = results.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=4000).collect::<Vec<_>>(), "each answered once");
    assert!(results
        .iter()
        .all(|r| matches!(r.outcome, Outcome::Conflict { .. })));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_too_large_change_is_refused_and_a_16_mb_batch_fans_out_in_frames_under_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, rw, _) = hub_for_limits(dir.path(), std::time::Duration::from_secs(60)).await;
    let url = hub.url();
    let mut watcher = session_at(&url, &rw, &hello("watcher", false)).await;
    let mut a = session_at(&url, &rw, &hello("a", false)).await;
    let huge = big_change(1, "notes", "huge", proto::MAX_CHANGE_BYTES);
    raw_send(&mut a, proto::encode(&upload(1, vec![huge]))).await;
    let (results, _) = answer(&mut a, 1).await;
    match &results[0].outcome {
        Outcome::Invalid { reason, message } => {
            assert_eq!(*reason, InvalidReason::TooLarge);
            assert!(message.contains("notes"), "{message}");
        }
        other => panic!("expected too_large, got {other:?}"),
    }
    // Nothing was stored: the next change is the dataset's first.
    raw_send(
        &mut a,
        proto::encode(&upload(2, vec![big_change(2, "notes", "small", 1)])),
    )
    .await;
    let (results, _) = answer(&mut a, 2).await;
    assert_eq!(results[0].outcome, Outcome::Applied { version: 1 });
    // About 15 MB in one batch.
    let changes: Vec<Change> = (3..3003)
        .map(|n| big_change(n, "notes", &format!("k{n}"), 5000))
        .collect();
    let frame = proto::encode(&upload(3, changes));
    assert!(frame.len() > 15_000_000 && frame.len() < proto::MAX_FRAME_BYTES);
    raw_send(&mut a, frame).await;
    let (results, _) = answer(&mut a, 3).await;
    assert_eq!(results.len(), 3000);
    let (mut got, mut frames, mut up_to) = (0, 0, 0);
    while up_to < 3001 {
        match recv_sized(&mut watcher).await {
            Some((HubFrame::Changes(c), _)) => {
                got += c.changes.len();
                frames += 1;
                up_to = c.up_to;
            }
            Some(_) => continue,
            None => panic!("watcher closed"),
        }
    }
    assert_eq!(got, 3001);
    assert!(frames >= 4, "{frames} frames");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_subscribed_to_one_table_gets_only_its_changes_and_reaches_the_head() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, rw, _) = hub_for_limits(dir.path(), std::time::Duration::from_secs(60)).await;
    let url = hub.url();
    let mut partial = session_at(&url, &rw, &hello("partial", false)).await;
    let mut a = session_at(&url, &rw, &hello("a", true)).await;
    // Batch 1 mixes both tables; batch 2 holds only the other table.
    let mixed = (1..=10)
        .map(|n| {
            let t = if n % 2 == 0 { "notes" } else { "other" };
            big_change(n, t, &format!("k{n}"), 10)
        })
        .collect();
    raw_send(&mut a, proto::encode(&upload(1, mixed))).await;
    answer(&mut a, 1).await;
    let others = (11..=15)
        .map(|n| big_change(n, "other", &format!("k{n}"), 10))
        .collect();
    raw_send(&mut a, proto::encode(&upload(2, others))).await;
    answer(&mut a, 2).await;
    let read_to_head = |mut ws: RawWs| async move {
        let mut versions = Vec::new();
        let mut up_to = 0;
        while up_to < 15 {
            match recv_sized(&mut ws).await {
                Some((HubFrame::Changes(c), _)) => {
                    assert!(c.changes.iter().all(|c| c.table == "notes"), "{c:?}");
                    versions.extend(c.changes.iter().map(|c| c.version));
                    up_to = c.up_to;
                }
                Some(_) => continue,
                None => panic!("closed"),
            }
        }
        versions
    };
    // Live, then by catch-up.
    assert_eq!(read_to_head(partial).await, vec![2, 4, 6, 8, 10]);
    partial = raw_connect(&url, Some(&rw), Some("db")).await.unwrap();
    raw_send(&mut partial, proto::encode(&hello("partial-2", false))).await;
    assert_eq!(read_to_head(partial).await, vec![2, 4, 6, 8, 10]);
    hub.stop().await;
}

/// A hello of client `client` presenting `key` (empty: none).
fn keyed_hello(client: &str, key: &str) -> ClientFrame {
    let mut h = notes_hello("db", client);
    if let ClientFrame::Hello(h) = &mut h {
        h.client_key = key.into();
    }
    h
}

/// Opens a session with `hello` on dataset `db`; returns it once caught up,
/// with its welcome.
async fn session_with(world: &World, hello: &ClientFrame) -> (RawWs, proto::Welcome) {
    let mut ws = raw_connect(&world.url(), Some(&world.token), Some("db"))
        .await
        .unwrap();
    raw_send(&mut ws, proto::encode(hello)).await;
    let mut welcome = None;
    loop {
        match raw_recv(&mut ws).await {
            Some(HubFrame::Welcome(w)) => welcome = Some(w),
            Some(HubFrame::CaughtUp(_)) => return (ws, welcome.expect("welcome first")),
            Some(HubFrame::Error(e)) => panic!("refused: {e:?}"),
            Some(_) => continue,
            None => panic!("closed"),
        }
    }
}

/// Reads up to an `error` frame (skipping stream frames), checks its code
/// and that the hub then closes; returns its message.
async fn refused_with(ws: &mut RawWs, code: ErrorCode) -> String {
    loop {
        match raw_recv(ws).await {
            Some(HubFrame::Error(e)) => {
                assert_eq!(e.code, code, "{}", e.message);
                assert!(raw_recv(ws).await.is_none(), "closed after {code:?}");
                return e.message;
            }
            Some(HubFrame::UploadResult(r)) => panic!("answered instead of {code:?}: {r:?}"),
            Some(_) => continue,
            None => panic!("closed without an error frame {code:?}"),
        }
    }
}

/// Sends one upload and returns its whole answer.
async fn upload_answered(ws: &mut RawWs, batch: u64, changes: Vec<Change>) -> Vec<Outcome> {
    raw_send(ws, proto::encode(&upload(batch, changes))).await;
    let (results, _) = answer(ws, batch).await;
    results.into_iter().map(|r| r.outcome).collect()
}

/// Waits until `ws` receives a change of row `id`.
async fn receives_row(ws: &mut RawWs, id: &str) {
    loop {
        match raw_recv(ws).await {
            Some(HubFrame::Changes(c))
                if c.changes.iter().any(|c| c.pk == [Value::Text(id.into())]) =>
            {
                return
            }
            Some(HubFrame::Error(e)) => panic!("refused: {e:?}"),
            Some(_) => continue,
            None => panic!("closed before row {id:?} arrived"),
        }
    }
}

/// Every row of every table of the hub's store file, as text.
fn store_dump(world: &World) -> Vec<String> {
    let c = rusqlite::Connection::open(world.path("hub.db")).unwrap();
    let tables: Vec<String> = c
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut out = Vec::new();
    for t in tables {
        let mut st = c
            .prepare(&format!("SELECT * FROM {t} ORDER BY 1, 2"))
            .unwrap();
        let n = st.column_count();
        let rows: Vec<String> = st
            .query_map([], |r| {
                let mut row = vec![t.clone()];
                for i in 0..n {
                    row.push(format!("{:?}", r.get::<_, rusqlite::types::Value>(i)?));
                }
                Ok(row.join("|"))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        out.extend(rows);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_with_another_key_or_none_is_refused_and_the_device_keeps_syncing() {
    let world = World::new(&[("db", &["notes"])]).await;
    let (mut watcher, _) = session_with(&world, &keyed_hello("watcher", "w-key")).await;
    let (mut device, _) = session_with(&world, &keyed_hello("dev", "dev-key")).await;
    let got = upload_answered(&mut device, 1, vec![row_change(1, "one", 4)]).await;
    assert!(matches!(got[..], [Outcome::Applied { .. }]), "{got:?}");
    for key in ["stolen-guess", ""] {
        let mut ws = raw_connect(&world.url(), Some(&world.token), Some("db"))
            .await
            .unwrap();
        raw_send(&mut ws, proto::encode(&keyed_hello("dev", key))).await;
        let m = refused_with(&mut ws, ErrorCode::IdentityRefused).await;
        assert!(m.contains("client id \"dev\""), "{m}");
        assert!(m.contains("not present the key"), "{m}");
        assert!(!m.contains("dev-key"), "the key is never shown: {m}");
    }
    // The device was not replaced by the refused connections: it uploads on
    // the same connection and its write reaches the watcher.
    let got = upload_answered(&mut device, 2, vec![row_change(2, "two", 4)]).await;
    assert!(matches!(got[..], [Outcome::Applied { .. }]), "{got:?}");
    receives_row(&mut watcher, "two").await;
    // The key is never written to the store, only its hash.
    let dump = store_dump(&world).join("\n");
    assert!(!dump.contains("dev-key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_zero_or_backward_seqs_are_refused_and_the_device_keeps_syncing() {
    let world = World::new(&[("db", &["notes"])]).await;
    let (mut watcher, _) = session_with(&world, &keyed_hello("watcher", "w-key")).await;
    let hello = keyed_hello("dev", "dev-key");
    let (mut device, _) = session_with(&world, &hello).await;
    let got = upload_answered(
        &mut device,
        1,
        vec![row_change(1, "one", 4), row_change(2, "two", 4)],
    )
    .await;
    assert_eq!(got.len(), 2);
    drop(device);
    let stored = store_dump(&world);
    // Each bad batch on a connection of its own (the hub closes after it).
    let mut other_two = row_change(2, "two", 4);
    other_two.values[1] = Value::Integer(99);
    let cases: Vec<(Vec<Change>, u64, ErrorCode, &str)> = vec![
        (
            vec![row_change(u64::MAX, "max", 4)],
            0,
            ErrorCode::BadSequence,
            "out of range",
        ),
        (
            vec![row_change(0, "zero", 4)],
            0,
            ErrorCode::BadSequence,
            "out of range",
        ),
        (
            vec![row_change(5, "five", 4), row_change(4, "four", 4)],
            0,
            ErrorCode::BadSequence,
            "strictly increase",
        ),
        (
            vec![row_change(3 + proto::MAX_SEQ_JUMP, "far", 4)],
            0,
            ErrorCode::BadSequence,
            "at most",
        ),
        // Backwards: a used seq with other content, or one whose answer the
        // client acknowledged.
        (
            vec![other_two],
            0,
            ErrorCode::IdentityConflict,
            "other content",
        ),
        (
            vec![row_change(2, "two", 4)],
            2,
            ErrorCode::IdentityConflict,
            "acknowledged",
        ),
    ];
    for (changes, acked, code, needle) in cases {
        let (mut ws, w) = session_with(&world, &hello).await;
        assert_eq!(w.client_seq, 2, "the mark did not move");
        let up = ClientFrame::Upload(Upload {
            batch: 1,
            acked,
            changes,
        });
        raw_send(&mut ws, proto::encode(&up)).await;
        let m = refused_with(&mut ws, code).await;
        assert!(m.contains(needle) && m.contains("\"dev\""), "{m}");
        assert!(m.contains("nothing of this batch was stored"), "{m}");
        assert_eq!(store_dump(&world), stored, "after {code:?} {needle}");
    }
    // The device's next real write is stored and reaches the watcher.
    let (mut device, w) = session_with(&world, &hello).await;
    assert_eq!(w.client_seq, 2);
    let got = upload_answered(&mut device, 1, vec![row_change(3, "three", 4)]).await;
    assert!(
        matches!(got[..], [Outcome::Applied { version: 3 }]),
        "{got:?}"
    );
    receives_row(&mut watcher, "three").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_seq_with_other_content_is_refused_after_the_earlier_answers_and_stores_nothing()
{
    let world = World::new(&[("db", &["notes"])]).await;
    let (mut device, _) = session_with(&world, &keyed_hello("dev", "dev-key")).await;
    let got = upload_answered(
        &mut device,
        1,
        vec![row_change(1, "a", 4), row_change(2, "b", 4)],
    )
    .await;
    assert_eq!(got.len(), 2);
    let before = store_dump(&world);
    // Three batches back to back: a good one, one reusing seq 2 for another
    // row (as a copied file would), and one behind it.
    raw_send(
        &mut device,
        proto::encode(&upload(2, vec![row_change(3, "c", 4)])),
    )
    .await;
    raw_send(
        &mut device,
        proto::encode(&upload(
            3,
            vec![row_change(2, "copy", 4), row_change(4, "d", 4)],
        )),
    )
    .await;
    raw_send(
        &mut device,
        proto::encode(&upload(4, vec![row_change(5, "e", 4)])),
    )
    .await;
    // Batch 2 is answered first, then the refusal, then the connection ends.
    let (results, _) = answer(&mut device, 2).await;
    assert!(matches!(
        results[0].outcome,
        Outcome::Applied { version: 3 }
    ));
    let m = refused_with(&mut device, ErrorCode::IdentityConflict).await;
    assert!(
        m.contains("client seq 2 of client \"dev\" was stored with other content"),
        "{m}"
    );
    assert!(m.contains("copied file"), "{m}");
    // Only batch 2 was stored: not batch 3, nor batch 4 behind it.
    let after = store_dump(&world);
    let log = |d: &[String]| d.iter().filter(|r| r.starts_with("log_")).count();
    assert_eq!((log(&before), log(&after)), (2, 3), "{after:#?}");
    let (_watcher, w) = session_with(&world, &keyed_hello("watcher", "w-key")).await;
    assert_eq!(w.head, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_of_one_identity_replaces_the_first() {
    let world = World::new(&[("db", &["notes"])]).await;
    let hello = keyed_hello("dev", "dev-key");
    let (mut watcher, _) = session_with(&world, &keyed_hello("watcher", "w-key")).await;
    let (mut first, _) = session_with(&world, &hello).await;
    let (mut second, _) = session_with(&world, &hello).await;
    let m = refused_with(&mut first, ErrorCode::Replaced).await;
    assert!(m.contains("client \"dev\" took over"), "{m}");
    // The newcomer keeps working.
    let got = upload_answered(&mut second, 1, vec![row_change(1, "one", 4)]).await;
    assert!(
        matches!(got[..], [Outcome::Applied { version: 1 }]),
        "{got:?}"
    );
    receives_row(&mut watcher, "one").await;
    // Once the first session is gone, the second is still the identity's:
    // a third connection replaces it.
    let hub = world.hub().hub.metrics();
    wait_until("the replaced session ended", || {
        hub.render()
            .lines()
            .any(|l| l == "tether_hub_sessions{dataset=\"db\"} 2")
    })
    .await;
    let (mut third, _) = session_with(&world, &hello).await;
    refused_with(&mut second, ErrorCode::Replaced).await;
    let got = upload_answered(&mut third, 1, vec![row_change(2, "two", 4)]).await;
    assert!(
        matches!(got[..], [Outcome::Applied { version: 2 }]),
        "{got:?}"
    );
}

const PEOPLE: &str = "CREATE TABLE people (id INTEGER PRIMARY KEY, email TEXT, n INTEGER)";
const PEOPLE_STRICT: &str =
    "CREATE TABLE people (id INTEGER PRIMARY KEY, email TEXT, n INTEGER) STRICT";
const TAGS: &str = "CREATE TABLE tags (name TEXT PRIMARY KEY, n INTEGER)";

/// A table's description as a daemon announces it.
fn schema(name: &str, cols: &[(&str, &str)], strict: bool) -> proto::TableSchema {
    let (columns, types): (Vec<String>, Vec<String>) = cols
        .iter()
        .map(|(c, t)| (c.to_string(), t.to_string()))
        .unzip();
    proto::TableSchema {
        name: name.into(),
        fingerprint: tether::local::schema::fingerprint(name, &columns, &types, &[0]),
        columns,
        types,
        pk: vec![0],
        strict,
    }
}

fn people_schema(strict: bool) -> proto::TableSchema {
    schema(
        "people",
        &[("id", "INTEGER"), ("email", "TEXT"), ("n", "INTEGER")],
        strict,
    )
}

/// A hello of `client` on dataset `db` for these tables.
fn hello_for(client: &str, tables: Vec<proto::TableSchema>) -> ClientFrame {
    let mut h = notes_hello("db", client);
    if let ClientFrame::Hello(h) = &mut h {
        h.tables = tables;
    }
    h
}

/// An upsert of a row of `table` whose key is `key`, with `rest` after it.
fn row_of(seq: u64, table: &str, key: Value, rest: Vec<Value>) -> Change {
    let mut values = vec![key.clone()];
    values.extend(rest);
    Change {
        seq,
        table: table.into(),
        op: Op::Upsert,
        pk: vec![key],
        values,
        base: 0,
        mask: u64::MAX,
    }
}

fn person(seq: u64, id: Value, email: &str, n: Value) -> Change {
    row_of(seq, "people", id, vec![Value::Text(email.into()), n])
}

/// The message of a `wrong_type` answer.
fn wrong_type(o: &Outcome) -> &str {
    match o {
        Outcome::Invalid { reason, message } => {
            assert_eq!(*reason, InvalidReason::WrongType, "{message}");
            message
        }
        other => panic!("expected wrong_type, got {other:?}"),
    }
}

/// The hub's changes a device's database refused and holds.
fn held_rows(c: &rusqlite::Connection) -> Vec<String> {
    c.prepare("SELECT tbl || ': ' || reason FROM _tether_held")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Key values in the hub's log, with their SQLite type, as text.
fn hub_keys(world: &World) -> Vec<String> {
    let c = rusqlite::Connection::open(world.path("hub.db")).unwrap();
    c.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    let mut st = c.prepare("SELECT tbl, pk FROM log_1 ORDER BY seq").unwrap();
    st.query_map([], |r| {
        let (t, pk): (String, Vec<u8>) = (r.get(0)?, r.get(1)?);
        Ok(format!("{t} {:?}", proto::decode_key(&pk).unwrap()))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_another_type_with_the_same_digits_is_refused_and_devices_keep_their_rows() {
    let world = World::new(&[("db", &["people", "tags"])]).await;
    let schema_sql = format!("{PEOPLE}; {TAGS}");
    let a = app(&world.path("a.db"), &schema_sql);
    let b = app(&world.path("b.db"), &schema_sql);
    let da = world.daemon_for("a.db", &["people", "tags"], ConflictPolicy::ServerWins);
    let db = world.daemon_for("b.db", &["people", "tags"], ConflictPolicy::ServerWins);
    da.wait_connected(DEADLINE).await.unwrap();
    db.wait_connected(DEADLINE).await.unwrap();
    a.execute_batch(
        "INSERT INTO people VALUES (42, 'ann@example.org', 1);
         INSERT INTO tags VALUES ('42', 1);",
    )
    .unwrap();
    wait_until("A's rows on B", || {
        count(&b, "people") == 1 && count(&b, "tags") == 1
    })
    .await;

    // The attacker's keys name the same rows on every device (SQLite turns
    // '42' into 42 in an INTEGER key, 42 into '42' in a TEXT key, and finds
    // 42.0 equal to 42), but other rows on the hub.
    let tags = schema("tags", &[("name", "TEXT"), ("n", "INTEGER")], false);
    let (mut evil, _) = session_with(
        &world,
        &hello_for("mallory", vec![people_schema(false), tags]),
    )
    .await;
    let mut delete = person(3, Value::Text("42".into()), "", Value::Null);
    delete.op = Op::Delete;
    delete.values.clear();
    let got = upload_answered(
        &mut evil,
        1,
        vec![
            person(
                1,
                Value::Text("42".into()),
                "evil@example.org",
                Value::Integer(66),
            ),
            person(2, Value::Real(42.0), "evil@example.org", Value::Integer(66)),
            delete,
            row_of(4, "tags", Value::Integer(42), vec![Value::Integer(66)]),
            person(5, Value::Integer(43), "bob@example.org", Value::Integer(2)),
        ],
    )
    .await;
    let m = wrong_type(&got[0]);
    assert!(
        m.contains("table \"people\", key column \"id\": a text value")
            && m.contains("declared INTEGER"),
        "{m}"
    );
    assert!(wrong_type(&got[1]).contains("a real value"));
    wrong_type(&got[2]);
    let m = wrong_type(&got[3]);
    assert!(
        m.contains("table \"tags\", key column \"name\": an integer value")
            && m.contains("declared TEXT"),
        "{m}"
    );
    // The rest of the batch went on.
    assert!(matches!(got[4], Outcome::Applied { .. }), "{got:?}");

    // Every device holds the right rows, and keeps syncing.
    wait_until("row 43 on A and B", || {
        count(&a, "people") == 2 && count(&b, "people") == 2
    })
    .await;
    a.execute("UPDATE people SET n = 3 WHERE id = 42", [])
        .unwrap();
    wait_until("the update on B", || {
        dump(&b, "people")[0] == dump(&a, "people")[0]
    })
    .await;
    for c in [&a, &b] {
        assert_eq!(
            dump(c, "people"),
            vec![
                "Integer(42)|Text(\"ann@example.org\")|Integer(3)",
                "Integer(43)|Text(\"bob@example.org\")|Integer(2)",
            ]
        );
        assert_eq!(dump(c, "tags"), vec!["Text(\"42\")|Integer(1)"]);
        assert!(held_rows(c).is_empty(), "{:?}", held_rows(c));
    }
    assert_eq!(
        hub_keys(&world),
        vec![
            "people [Integer(42)]",
            "tags [Text(\"42\")]",
            "people [Integer(43)]",
            "people [Integer(42)]",
        ]
    );
    da.stop().await;
    db.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_a_strict_table_refuses_is_refused_at_the_hub_and_held_by_no_device() {
    let world = World::new(&[("db", &["people"])]).await;
    let a = app(&world.path("a.db"), PEOPLE_STRICT);
    let b = app(&world.path("b.db"), PEOPLE_STRICT);
    let da = world.daemon_for("a.db", &["people"], ConflictPolicy::ServerWins);
    let db = world.daemon_for("b.db", &["people"], ConflictPolicy::ServerWins);
    da.wait_connected(DEADLINE).await.unwrap();
    db.wait_connected(DEADLINE).await.unwrap();

    // A table announced STRICT must declare STRICT types.
    let mut odd = people_schema(true);
    odd.types[1] = "VARCHAR(80)".into();
    odd.fingerprint =
        tether::local::schema::fingerprint("people", &odd.columns, &odd.types, &odd.pk);
    let mut ws = raw_connect(&world.url(), Some(&world.token), Some("db"))
        .await
        .unwrap();
    raw_send(&mut ws, proto::encode(&hello_for("odd", vec![odd]))).await;
    let m = refused_with(&mut ws, ErrorCode::MalformedFrame).await;
    assert!(m.contains("STRICT") && m.contains("\"VARCHAR(80)\""), "{m}");

    // The attacker does not say STRICT: the hub knows it from the devices.
    let (mut evil, _) =
        session_with(&world, &hello_for("mallory", vec![people_schema(false)])).await;
    let got = upload_answered(
        &mut evil,
        1,
        vec![
            person(
                1,
                Value::Integer(7),
                "evil@example.org",
                Value::Text("three".into()),
            ),
            person(2, Value::Integer(8), "ok@example.org", Value::Integer(8)),
        ],
    )
    .await;
    assert_eq!(
        wrong_type(&got[0]),
        "table \"people\", column \"n\": a text value cannot be stored in a column declared INTEGER of a STRICT table; the devices' SQLite would refuse it"
    );
    assert!(matches!(got[1], Outcome::Applied { .. }), "{got:?}");
    // Row 8 came after row 7 in the batch: had row 7 been pushed, it would
    // have reached the devices first.
    wait_until("row 8 on A and B", || {
        count(&a, "people") == 1 && count(&b, "people") == 1
    })
    .await;
    b.execute("INSERT INTO people VALUES (9, 'cy@example.org', 9)", [])
        .unwrap();
    wait_converged(&a, &b, "people").await;
    for (c, d) in [(&a, &da), (&b, &db)] {
        assert!(held_rows(c).is_empty(), "{:?}", held_rows(c));
        assert_eq!(status(d, "db").held_changes, 0);
    }
    assert_eq!(count(&a, "people"), 2);
    da.stop().await;
    db.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loose_devices_value_that_a_strict_device_refuses_is_refused_at_the_hub_not_held() {
    // Same columns, types and key (same fingerprint): A's table is not
    // STRICT, B's is. B announced it STRICT, so the hub refuses for every
    // client what B's SQLite would refuse.
    let world = World::new(&[("db", &["people"])]).await;
    let a = app(&world.path("a.db"), PEOPLE);
    let b = app(&world.path("b.db"), PEOPLE_STRICT);
    let da = world.daemon_for("a.db", &["people"], ConflictPolicy::ServerWins);
    let db = world.daemon_for("b.db", &["people"], ConflictPolicy::ServerWins);
    da.wait_connected(DEADLINE).await.unwrap();
    db.wait_connected(DEADLINE).await.unwrap();
    a.execute_batch(
        "INSERT INTO people VALUES (3, 'bob@example.org', 'three');
         INSERT INTO people VALUES (4, 'cy@example.org', 4);",
    )
    .unwrap();
    wait_until("row 4 on B", || count(&b, "people") == 1).await;
    wait_idle(&da, "db").await;
    // A keeps its row and is told why the hub refused it.
    let rejected: Vec<(String, String)> = a
        .prepare("SELECT reason, message FROM _tether_rejected")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].0, "wrong_type");
    assert!(
        rejected[0].1.contains("column \"n\": a text value") && rejected[0].1.contains("STRICT"),
        "{rejected:?}"
    );
    assert!(held_rows(&b).is_empty(), "{:?}", held_rows(&b));
    assert_eq!(status(&db, "db").held_changes, 0);
    // Writes keep flowing both ways.
    b.execute("INSERT INTO people VALUES (5, 'dee@example.org', 5)", [])
        .unwrap();
    wait_until("row 5 on A", || count(&a, "people") == 3).await;
    da.stop().await;
    db.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_token_cannot_register_a_schema_and_lock_devices_out() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, rw, ro) = hub_for_limits(dir.path(), std::time::Duration::from_secs(60)).await;
    let url = hub.url();
    // The schema of a table no client registered yet, with another key.
    let poisoned = || {
        let mut t = schema(
            "notes",
            &[
                ("id", "TEXT"),
                ("title", "TEXT"),
                ("body", "TEXT"),
                ("n", "INTEGER"),
            ],
            false,
        );
        t.pk = vec![3];
        t.fingerprint = tether::local::schema::fingerprint("notes", &t.columns, &t.types, &t.pk);
        hello_for("mallory", vec![t])
    };
    let mut ws = raw_connect(&url, Some(&ro), Some("db")).await.unwrap();
    raw_send(&mut ws, proto::encode(&poisoned())).await;
    let m = refused_with(&mut ws, ErrorCode::Forbidden).await;
    assert!(
        m.contains("table \"notes\" of dataset \"db\" is not registered")
            && m.contains("read_only token cannot register")
            && m.contains("read_write token"),
        "{m}"
    );
    // The legitimate devices register the table and sync.
    let path = |f: &str| dir.path().join(f);
    let (a, b) = (app(&path("a.db"), NOTES), app(&path("b.db"), NOTES));
    let daemon = |f: &str| {
        tether::embedded::EmbeddedDaemon::start(
            &url,
            &rw,
            vec![tether::embedded::database(
                "db",
                path(f),
                &["notes"],
                ConflictPolicy::ServerWins,
            )],
        )
    };
    let (da, db) = (daemon("a.db"), daemon("b.db"));
    da.wait_connected(DEADLINE).await.unwrap();
    db.wait_connected(DEADLINE).await.unwrap();
    a.execute("INSERT INTO notes VALUES ('one', 't', 'b', 1)", [])
        .unwrap();
    wait_converged(&a, &b, "notes").await;
    assert_eq!(count(&b, "notes"), 1);
    // From now on the poisoned schema is a mismatch, and the registered one
    // is welcome to download.
    let mut ws = raw_connect(&url, Some(&ro), Some("db")).await.unwrap();
    raw_send(&mut ws, proto::encode(&poisoned())).await;
    refused_with(&mut ws, ErrorCode::SchemaMismatch).await;
    let mut reader = session_at(&url, &ro, &hello("reader", false)).await;
    b.execute("INSERT INTO notes VALUES ('two', 't', 'b', 2)", [])
        .unwrap();
    receives_row(&mut reader, "two").await;
    wait_converged(&a, &b, "notes").await;
    da.stop().await;
    db.stop().await;
}

// ---- Budgets: what one client, one token or a flood may take ----

use tether::config::HubLimits;
use tether::metrics::Limit;

/// A hub with dataset `db` (table `notes`), two read-write tokens (`rw`,
/// `other`) and the given limits.
async fn budget_hub(
    dir: &std::path::Path,
    limits: impl FnOnce(&mut HubLimits),
) -> (EmbeddedHub, String, String) {
    let (rw, other) = (new_token(), new_token());
    let mut l = HubLimits::default();
    limits(&mut l);
    let token = |name: &str, t: &str| TokenConfig {
        name: name.into(),
        sha256: hash_token(t),
        datasets: vec!["*".into()],
        access: TokenAccess::ReadWrite,
    };
    let config = HubConfig {
        listen: "127.0.0.1:0".into(),
        store: format!("sqlite:{}", dir.join("hub.db").display()),
        datasets: vec![tether::config::DatasetConfig {
            name: "db".into(),
            tables: vec!["notes".into()],
        }],
        tokens: vec![token("rw", &rw), token("other", &other)],
        metrics: true,
        log_level: None,
        read_timeout: Dur(std::time::Duration::from_secs(60)),
        tls_cert: None,
        tls_key: None,
        limits: l,
        admin_socket: None,
    };
    let hub = EmbeddedHub::start_with(config, rw.clone()).await.unwrap();
    (hub, rw, other)
}

fn limited(hub: &EmbeddedHub, limit: Limit) -> u64 {
    hub.hub.metrics().limited_count(limit)
}

/// The value of an unlabelled gauge in the hub's metrics.
fn gauge(hub: &EmbeddedHub, name: &str) -> f64 {
    let text = hub.hub.metrics().render();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// The status and body of an HTTP refusal at the upgrade.
fn http_refusal(e: WsError) -> (u16, String) {
    match e {
        WsError::Http(resp) => (
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

/// A session opened with `token` uploads one row and gets it answered.
async fn still_served(url: &str, token: &str, client: &str) {
    let mut ws = session_at(url, token, &hello(client, false)).await;
    let got = upload_answered(&mut ws, 1, vec![row_change(1, client, 4)]).await;
    assert!(matches!(got[..], [Outcome::Applied { .. }]), "{got:?}");
}

/// Opens `n` TCP connections to `addr` that send nothing.
async fn idle_sockets(addr: std::net::SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut out = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    for i in 0..n {
        let s = tokio::time::timeout_at(deadline, tokio::net::TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| panic!("{i} of {n} idle sockets connected within {DEADLINE:?}"))
            .unwrap();
        out.push(s);
    }
    out
}

/// Reads what the hub sends on a socket until it closes it; `None` when it
/// is still open at the deadline.
async fn closed_with(s: &mut tokio::net::TcpStream, within: std::time::Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    match tokio::time::timeout(within, s.read_to_end(&mut got)).await {
        Ok(_) => Some(String::from_utf8_lossy(&got).into_owned()),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unauthenticated_sockets_never_keeps_a_daemon_out() {
    // More idle sockets than the hub ever served at once: first with the
    // default limits (all come from one address, so its own budget of 64
    // fills), then with no address budget to speak of (the hub's budget of
    // unauthenticated connections fills).
    const FLOOD: usize = 4200;
    for per_address in [
        HubLimits::default().max_unauthenticated_per_address,
        100_000,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (hub, rw, other) = budget_hub(dir.path(), |l| {
            l.max_unauthenticated_per_address = per_address;
        })
        .await;
        let url = hub.url();
        let mut live = session_at(&url, &other, &hello("live", false)).await;
        let mut flood = idle_sockets(hub.addr, FLOOD).await;
        // A daemon's connect, hello and welcome, while the flood is open.
        let t0 = std::time::Instant::now();
        let newcomer = hello("newcomer", false);
        let connect = session_at(&url, &rw, &newcomer);
        let mut ws = tokio::time::timeout(std::time::Duration::from_secs(5), connect)
            .await
            .unwrap_or_else(|_| panic!("no session within 5 s behind {FLOOD} idle sockets"));
        let took = t0.elapsed();
        let got = upload_answered(&mut ws, 1, vec![row_change(1, "new", 4)]).await;
        assert!(matches!(got[..], [Outcome::Applied { .. }]), "{got:?}");
        // The session that was live all along is served too.
        let got = upload_answered(&mut live, 1, vec![row_change(1, "live", 4)]).await;
        assert!(matches!(got[..], [Outcome::Applied { .. }]), "{got:?}");
        // The oldest flood socket was closed with a clear answer.
        let first = closed_with(&mut flood[0], DEADLINE)
            .await
            .expect("the oldest idle socket is closed");
        assert!(
            first.starts_with("HTTP/1.1 503") && first.contains("waited longest"),
            "{first}"
        );
        let (address, overall) = (
            limited(&hub, Limit::max_unauthenticated_per_address),
            limited(&hub, Limit::max_unauthenticated),
        );
        let evicted = if per_address < 1000 { address } else { overall };
        assert!(evicted as usize >= FLOOD - 1024, "{address} {overall}");
        let pending = gauge(&hub, "tether_hub_unauthenticated_connections");
        assert!(pending <= 1024.0, "{pending}");
        eprintln!(
            "per address {per_address}: session after {took:?} behind {FLOOD} idle sockets; closed {address} for their address, {overall} for the hub"
        );
        drop(flood);
        hub.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_presents_no_token_in_time_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, rw, _) = budget_hub(dir.path(), |l| {
        l.unauthenticated_timeout = Dur(std::time::Duration::from_millis(300));
    })
    .await;
    let mut idle = idle_sockets(hub.addr, 1).await;
    // Well before the 10 s a request head may take otherwise.
    let got = closed_with(&mut idle[0], std::time::Duration::from_secs(5)).await;
    assert_eq!(got.as_deref(), Some(""), "closed without an answer");
    assert_eq!(limited(&hub, Limit::unauthenticated_timeout), 1);
    still_served(&hub.url(), &rw, "legit").await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_each_tokens_connections_stop_at_their_limits_with_a_clear_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, rw, other) = budget_hub(dir.path(), |l| {
        l.max_sessions = 3;
        l.max_connections_per_token = 2;
    })
    .await;
    let url = hub.url();
    let mut a1 = session_at(&url, &rw, &hello("a1", false)).await;
    let _a2 = session_at(&url, &rw, &hello("a2", false)).await;
    let e = raw_connect(&url, Some(&rw), Some("db")).await.unwrap_err();
    let (status, body) = http_refusal(e);
    assert_eq!(status, 429, "{body}");
    assert!(
        body.contains("token \"rw\"") && body.contains("max_connections_per_token"),
        "{body}"
    );
    // Another token still connects, up to the hub's sessions.
    let mut b1 = session_at(&url, &other, &hello("b1", false)).await;
    let e = raw_connect(&url, Some(&other), Some("db"))
        .await
        .unwrap_err();
    let (status, body) = http_refusal(e);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("max_sessions"), "{body}");
    assert_eq!(limited(&hub, Limit::max_connections_per_token), 1);
    assert_eq!(limited(&hub, Limit::max_sessions), 1);
    // The sessions in place are served; one leaving makes room.
    let got = upload_answered(&mut b1, 1, vec![row_change(1, "b", 4)]).await;
    assert!(matches!(got[..], [Outcome::Applied { .. }]), "{got:?}");
    let got = upload_answered(&mut a1, 1, vec![row_change(1, "a", 4)]).await;
    assert!(matches!(got[..], [Outcome::Applied { .. }]), "{got:?}");
    drop(a1);
    let metrics = hub.hub.metrics();
    wait_until("the closed session left", || {
        metrics
            .render()
            .lines()
            .any(|l| l == "tether_hub_sessions{dataset=\"db\"} 2")
    })
    .await;
    still_served(&url, &other, "b2").await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_sending_frames_past_its_rate_is_refused_and_others_keep_syncing() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let dir = tempfile::tempdir().unwrap();
    let (hub, rw, other) = budget_hub(dir.path(), |l| l.max_frames_per_second = 20).await;
    let url = hub.url();
    let mut calm = session_at(&url, &other, &hello("calm", false)).await;
    let busy = session_at(&url, &rw, &hello("busy", false)).await;
    // Pings as fast as they go, still coming while the hub refuses: the
    // error frame must reach the client all the same.
    let (mut tx, mut rx) = busy.split();
    let sender = tokio::spawn(async move {
        let ping = Message::Ping(vec![1].into());
        for _ in 0..20_000 {
            if tx.send(ping.clone()).await.is_err() {
                return;
            }
        }
    });
    let error = loop {
        let m = tokio::time::timeout(DEADLINE, rx.next())
            .await
            .expect("the hub answers within the deadline");
        match m {
            Some(Ok(Message::Binary(b))) => match proto::decode::<HubFrame>(&b).unwrap() {
                HubFrame::Error(e) => break e,
                f => panic!("expected an error frame, got {f:?}"),
            },
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("connection broken before the error frame: {e}"),
            None => panic!("closed without an error frame"),
        }
    };
    assert_eq!(error.code, ErrorCode::Internal, "{}", error.message);
    assert!(
        error.message.contains("more than 20 frames a second")
            && error.message.contains("max_frames_per_second"),
        "{}",
        error.message
    );
    tokio::time::timeout(DEADLINE, sender)
        .await
        .expect("the sender stops once the connection closes")
        .unwrap();
    assert_eq!(limited(&hub, Limit::max_frames_per_second), 1);
    let got = upload_answered(&mut calm, 1, vec![row_change(1, "calm", 4)]).await;
    assert!(matches!(got[..], [Outcome::Applied { .. }]), "{got:?}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_of_more_changes_than_allowed_is_refused_and_a_daemons_largest_batch_is_applied()
{
    let dir = tempfile::tempdir().unwrap();
    let (hub, rw, other) = budget_hub(dir.path(), |_| {}).await;
    let url = hub.url();
    let mut watcher = session_at(&url, &other, &hello("watcher", false)).await;
    // As probed: 100,000 small changes in one frame.
    let mut huge = session_at(&url, &rw, &hello("huge", false)).await;
    let changes: Vec<Change> = (1..=100_000)
        .map(|n| row_change(n, &format!("k{n}"), 4))
        .collect();
    raw_send(&mut huge, proto::encode(&upload(1, changes))).await;
    let m = refused_with(&mut huge, ErrorCode::FrameTooLarge).await;
    assert!(
        m.contains("upload of 100000 changes") && m.contains("max_upload_changes"),
        "{m}"
    );
    assert_eq!(limited(&hub, Limit::max_upload_changes), 1);
    // Nothing of it was stored; a daemon's largest batch is applied whole.
    let mut daemon = session_at(&url, &rw, &hello("daemon", false)).await;
    let changes: Vec<Change> = (1..=proto::MAX_BATCH_CHANGES as u64)
        .map(|n| row_change(n, &format!("d{n}"), 4))
        .collect();
    let got = upload_answered(&mut daemon, 1, changes).await;
    assert_eq!(got.len(), proto::MAX_BATCH_CHANGES);
    assert!(
        got.iter().enumerate().all(|(i, o)| *o
            == Outcome::Applied {
                version: i as u64 + 1
            }),
        "versions start at 1: nothing of the refused batch was stored"
    );
    receives_row(&mut watcher, "d1").await;
    hub.stop().await;
}

/// Starts a binary message of `total` payload bytes on `ws`'s socket
/// (masked with a zero key, as a client must) and sends its first `sent`
/// bytes of `payload`.
async fn start_frame(ws: &mut RawWs, payload: &[u8], sent: usize) {
    use tokio::io::AsyncWriteExt;
    let mut head = vec![0x82, 0x80 | 127];
    head.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    head.extend_from_slice(&[0, 0, 0, 0]);
    head.extend_from_slice(&payload[..sent]);
    let tokio_tungstenite::MaybeTlsStream::Plain(s) = ws.get_mut() else {
        panic!("plain TCP expected")
    };
    // The hub may close while the bytes are still on their way.
    let _ = tokio::time::timeout(DEADLINE, s.write_all(&head)).await;
}

/// Sends the rest of a message started by [`start_frame`].
async fn finish_frame(ws: &mut RawWs, payload: &[u8], sent: usize) {
    use tokio::io::AsyncWriteExt;
    let tokio_tungstenite::MaybeTlsStream::Plain(s) = ws.get_mut() else {
        panic!("plain TCP expected")
    };
    tokio::time::timeout(DEADLINE, s.write_all(&payload[sent..]))
        .await
        .expect("written within the deadline")
        .unwrap();
}

const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incomplete_frames_past_the_hubs_budget_close_the_connection_that_went_past() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, rw, other) = budget_hub(dir.path(), |l| l.max_partial_frames_mib = 4).await;
    let url = hub.url();
    // A slow upload of about 3.5 MiB, 3 MiB of it sent.
    let mut slow = session_at(&url, &rw, &hello("slow", false)).await;
    let big = proto::encode(&upload(1, vec![big_change(1, "notes", "big", 7 * MIB / 2)]));
    start_frame(&mut slow, &big, 3 * MIB).await;
    wait_until("the slow frame's bytes are held", || {
        gauge(&hub, "tether_hub_partial_frame_bytes") >= (3 * MIB) as f64
    })
    .await;
    let slow_held = gauge(&hub, "tether_hub_partial_frame_bytes");
    // Another connection's 2 MiB more go past the 4 MiB.
    let mut greedy = session_at(&url, &other, &hello("greedy", false)).await;
    let payload = vec![0x90; 3 * MIB];
    start_frame(&mut greedy, &payload, 2 * MIB).await;
    let m = refused_with(&mut greedy, ErrorCode::Internal).await;
    assert!(m.contains("max_partial_frames_mib"), "{m}");
    assert_eq!(limited(&hub, Limit::max_partial_frames_mib), 1);
    // Its bytes are given back once its connection is gone (after the
    // refusal was sent); then small frames and the slow upload go through.
    wait_until("the refused frame's bytes are given back", || {
        gauge(&hub, "tether_hub_partial_frame_bytes") <= slow_held
    })
    .await;
    still_served(&url, &other, "small").await;
    finish_frame(&mut slow, &big, 3 * MIB).await;
    let (results, _) = answer(&mut slow, 1).await;
    assert!(matches!(results[0].outcome, Outcome::Applied { .. }));
    wait_until("nothing incomplete is held", || {
        gauge(&hub, "tether_hub_partial_frame_bytes") == 0.0
    })
    .await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokens_bytes_in_flight_past_its_limit_end_the_session_that_went_past() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, rw, other) = budget_hub(dir.path(), |l| l.max_in_flight_mib_per_token = 2).await;
    let url = hub.url();
    let mut calm = session_at(&url, &other, &hello("calm", false)).await;
    let mut greedy = session_at(&url, &rw, &hello("greedy", false)).await;
    let payload = vec![0x90; 4 * MIB];
    start_frame(&mut greedy, &payload, 3 * MIB).await;
    let m = refused_with(&mut greedy, ErrorCode::Internal).await;
    assert!(
        m.contains("token \"rw\"") && m.contains("max_in_flight_mib_per_token"),
        "{m}"
    );
    assert_eq!(limited(&hub, Limit::max_in_flight_mib_per_token), 1);
    // The other token is not held back, and the token itself connects again.
    let got = upload_answered(&mut calm, 1, vec![big_change(1, "notes", "c", MIB)]).await;
    assert!(matches!(got[..], [Outcome::Applied { .. }]), "{got:?}");
    still_served(&url, &rw, "again").await;
    hub.stop().await;
}
