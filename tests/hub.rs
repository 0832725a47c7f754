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
    // A read-only token may download; its uploads are refused, never applied.
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
    drop(full);
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
        row_change(2, "short", 2),
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
    // The hub may cut the connection while the frame is still being written.
    if ws.send(big).await.is_ok() {
        match raw_recv(&mut ws).await {
            None => {}
            Some(HubFrame::Error(e)) => assert_eq!(e.code, ErrorCode::FrameTooLarge),
            Some(other) => panic!("expected a refusal, got {other:?}"),
        }
    }
    // The hub still serves new sessions.
    let _ws = raw_session(&world, "next").await;
}
