//! Property tests: frames survive encoding; random operation sequences on
//! two databases converge through a real hub under every policy.

mod common;

use common::*;
use proptest::prelude::*;
use tether::config::ConflictPolicy;
use tether::proto::*;

fn value() -> impl Strategy<Value = tether::proto::Value> {
    prop_oneof![
        Just(tether::proto::Value::Null),
        any::<i64>().prop_map(tether::proto::Value::Integer),
        any::<f64>().prop_map(tether::proto::Value::Real),
        ".{0,20}".prop_map(tether::proto::Value::Text),
        proptest::collection::vec(any::<u8>(), 0..20).prop_map(tether::proto::Value::Blob),
    ]
}

fn change() -> impl Strategy<Value = Change> {
    (
        any::<u64>(),
        "[a-z]{1,8}",
        any::<bool>(),
        proptest::collection::vec(value(), 1..3),
        proptest::collection::vec(value(), 0..6),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(seq, table, del, pk, values, base, mask)| Change {
            seq,
            table,
            op: if del { Op::Delete } else { Op::Upsert },
            pk,
            values,
            base,
            mask,
        })
}

proptest! {
    #[test]
    fn upload_frames_round_trip(batch in any::<u64>(), acked in any::<u64>(), changes in proptest::collection::vec(change(), 0..20)) {
        let f = ClientFrame::Upload(Upload { batch, acked, changes });
        let back: ClientFrame = decode(&encode(&f)).unwrap();
        prop_assert_eq!(back, f);
    }

    #[test]
    fn changes_frames_round_trip(up_to in any::<u64>(), rows in proptest::collection::vec((any::<u64>(), proptest::collection::vec(value(), 0..6)), 0..20)) {
        let f = HubFrame::Changes(Changes {
            changes: rows.into_iter().map(|(version, values)| RemoteChange {
                version,
                table: "t".into(),
                op: Op::Upsert,
                pk: values.iter().take(1).cloned().collect(),
                values,
            }).collect(),
            up_to,
            head: up_to,
        });
        let back: HubFrame = decode(&encode(&f)).unwrap();
        prop_assert_eq!(back, f);
    }

    #[test]
    fn garbage_never_panics_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode::<ClientFrame>(&bytes);
        let _ = decode::<HubFrame>(&bytes);
    }
}

#[derive(Clone, Debug)]
enum AppOp {
    Upsert {
        key: u8,
        title: u8,
    },
    Delete {
        key: u8,
    },
    /// B's daemon goes offline or comes back.
    ToggleB,
}

fn app_op() -> impl Strategy<Value = (bool, AppOp)> {
    (
        any::<bool>(),
        prop_oneof![
            6 => (0u8..8, any::<u8>()).prop_map(|(key, title)| AppOp::Upsert { key, title }),
            2 => (0u8..8).prop_map(|key| AppOp::Delete { key }),
            1 => Just(AppOp::ToggleB),
        ],
    )
}

fn policy() -> impl Strategy<Value = ConflictPolicy> {
    prop_oneof![
        Just(ConflictPolicy::ServerWins),
        Just(ConflictPolicy::ClientWins),
        Just(ConflictPolicy::MergeColumns),
    ]
}

async fn run_ops(policy: ConflictPolicy, ops: Vec<(bool, AppOp)>) {
    let world = World::new(&[("db", &["notes"])]).await;
    let a = app(&world.path("a.db"), NOTES);
    let b = app(&world.path("b.db"), NOTES);
    let da = world.daemon_for("a.db", &["notes"], policy);
    let mut db = Some(world.daemon_for("b.db", &["notes"], policy));
    let mut written = std::collections::HashSet::new();
    for (on_a, op) in ops {
        let c = if on_a { &a } else { &b };
        match op {
            AppOp::Upsert { key, title } => {
                written.insert(format!("t{title}"));
                c.execute(
                    "INSERT INTO notes VALUES (?1, ?2, 'x', 1) ON CONFLICT (id) DO UPDATE SET title = excluded.title, n = n + 1",
                    rusqlite::params![format!("k{key}"), format!("t{title}")],
                )
                .unwrap();
            }
            AppOp::Delete { key } => {
                c.execute("DELETE FROM notes WHERE id = ?1", [format!("k{key}")])
                    .unwrap();
            }
            AppOp::ToggleB => match db.take() {
                Some(d) => d.stop().await,
                None => db = Some(world.daemon_for("b.db", &["notes"], policy)),
            },
        }
    }
    let db = db.unwrap_or_else(|| world.daemon_for("b.db", &["notes"], policy));
    wait_idle(&da, "db").await;
    wait_idle(&db, "db").await;
    wait_converged(&a, &b, "notes").await;
    // The hub holds exactly the apps' rows, values included, and each
    // surviving value was written by an app (nothing made up or stale from
    // another row).
    assert_eq!(
        hub_dump(&world, NOTES, "notes"),
        dump(&a, "notes"),
        "hub and apps hold the same rows"
    );
    for (title,) in a
        .prepare("SELECT title FROM notes")
        .unwrap()
        .query_map([], |r| Ok((r.get::<_, String>(0)?,)))
        .unwrap()
        .map(Result::unwrap)
    {
        assert!(written.contains(&title), "{title} was never written");
    }
    da.stop().await;
    db.stop().await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn random_operations_converge(policy in policy(), ops in proptest::collection::vec(app_op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run_ops(policy, ops));
    }
}
