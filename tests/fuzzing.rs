//! Property tests over the surfaces the fuzz targets in `fuzz/` cover, with
//! the same harnesses (`tether::fuzzing`) and a bounded number of cases so
//! that they run with every `cargo test`: the frame decoder, the hub's and
//! the daemon's session machines, and the control socket's request lines.
//! Below them, the inputs the fuzzers found, kept as regression tests.

use proptest::prelude::*;
use tether::control::Request;
use tether::fuzzing::{control, daemon, frames, hub};
use tether::proto::*;

#[allow(dead_code)] // only the vectors file's path and shape are used
#[path = "vectors/frames.rs"]
mod vectors;

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---- frames ----

fn value() -> impl Strategy<Value = tether::proto::Value> {
    use tether::proto::Value as V;
    prop_oneof![
        Just(V::Null),
        any::<i64>().prop_map(V::Integer),
        any::<f64>().prop_map(V::Real),
        ".{0,12}".prop_map(V::Text),
        proptest::collection::vec(any::<u8>(), 0..12).prop_map(V::Blob),
    ]
}

fn values() -> impl Strategy<Value = Vec<tether::proto::Value>> {
    proptest::collection::vec(value(), 0..4)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![Just(Op::Upsert), Just(Op::Delete)]
}

fn table_schema() -> impl Strategy<Value = TableSchema> {
    (
        "[a-z]{1,6}",
        proptest::collection::vec(("[a-z]{1,4}", "[A-Z]{0,7}"), 0..4),
        proptest::collection::vec(any::<u32>(), 0..3),
        "[0-9a-f]{0,64}",
        any::<bool>(),
    )
        .prop_map(|(name, cols, pk, fingerprint, strict)| TableSchema {
            name,
            columns: cols.iter().map(|c| c.0.clone()).collect(),
            types: cols.into_iter().map(|c| c.1).collect(),
            pk,
            fingerprint,
            strict,
        })
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    let hello = (
        any::<u32>(),
        ".{0,10}",
        ".{0,10}",
        ".{0,10}",
        any::<u64>(),
        proptest::collection::vec(table_schema(), 0..3),
        any::<(bool, bool)>(),
        proptest::option::of((any::<u64>(), "[0-9a-f]{0,32}")),
    )
        .prop_map(
            |(
                protocol,
                client_id,
                client_key,
                dataset,
                cursor,
                tables,
                (echo_own, subscribe),
                anchor,
            )| {
                ClientFrame::Hello(Hello {
                    protocol,
                    client_id,
                    client_key,
                    dataset,
                    cursor,
                    tables,
                    echo_own,
                    subscribe,
                    anchor: anchor.map(|(version, digest)| Anchor { version, digest }),
                })
            },
        );
    let change = (
        any::<u64>(),
        ".{0,6}",
        op(),
        values(),
        values(),
        any::<(u64, u64)>(),
    )
        .prop_map(|(seq, table, op, pk, values, (base, mask))| Change {
            seq,
            table,
            op,
            pk,
            values,
            base,
            mask,
        });
    let upload = (
        any::<u64>(),
        any::<u64>(),
        proptest::collection::vec(change, 0..6),
    )
        .prop_map(|(batch, acked, changes)| {
            ClientFrame::Upload(Upload {
                batch,
                acked,
                changes,
            })
        });
    prop_oneof![
        hello,
        upload,
        any::<u64>().prop_map(|id| ClientFrame::Head(HeadAsk { id }))
    ]
}

fn outcome() -> impl Strategy<Value = Outcome> {
    let reason = prop_oneof![
        Just(InvalidReason::UnknownTable),
        Just(InvalidReason::WrongColumnCount),
        Just(InvalidReason::WrongKey),
        Just(InvalidReason::DuplicateRow),
        Just(InvalidReason::TooLarge),
        Just(InvalidReason::WrongType),
    ];
    prop_oneof![
        any::<u64>().prop_map(|version| Outcome::Applied { version }),
        (any::<u64>(), any::<bool>(), values()).prop_map(|(version, deleted, values)| {
            Outcome::Conflict {
                server: ServerRow {
                    version,
                    deleted,
                    values,
                },
            }
        }),
        (reason, ".{0,10}").prop_map(|(reason, message)| Outcome::Invalid { reason, message }),
        ".{0,10}".prop_map(|message| Outcome::MaterializeError { message }),
    ]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    proptest::sample::select(ErrorCode::ALL.to_vec())
}

fn hub_frame() -> impl Strategy<Value = HubFrame> {
    let welcome = (
        any::<u32>(),
        any::<u64>(),
        any::<bool>(),
        any::<u64>(),
        proptest::collection::vec("[a-z]{0,6}", 0..3),
    )
        .prop_map(|(protocol, head, ro, client_seq, features)| {
            HubFrame::Welcome(Welcome {
                protocol,
                head,
                access: if ro {
                    Access::ReadOnly
                } else {
                    Access::ReadWrite
                },
                client_seq,
                features,
            })
        });
    let remote = (any::<u64>(), ".{0,6}", op(), values(), values()).prop_map(
        |(version, table, op, pk, values)| RemoteChange {
            version,
            table,
            op,
            pk,
            values,
        },
    );
    let changes = (
        proptest::collection::vec(remote, 0..6),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(changes, up_to, head)| {
            HubFrame::Changes(Changes {
                changes,
                up_to,
                head,
            })
        });
    let result = (
        any::<u64>(),
        proptest::collection::vec((any::<u64>(), outcome()), 0..6),
        any::<bool>(),
    )
        .prop_map(|(batch, results, more)| {
            let results: Vec<ChangeResult> = results
                .into_iter()
                .map(|(seq, outcome)| ChangeResult { seq, outcome })
                .collect();
            HubFrame::UploadResult(UploadResult {
                batch,
                summary: UploadSummary::of(&results),
                results,
                more,
            })
        });
    prop_oneof![
        welcome,
        changes,
        any::<u64>().prop_map(|head| HubFrame::CaughtUp(CaughtUp { head })),
        result,
        (error_code(), ".{0,20}")
            .prop_map(|(code, message)| HubFrame::Error(ErrorFrame { code, message })),
        any::<(u64, u64)>().prop_map(|(id, head)| HubFrame::Head(Head { id, head })),
    ]
}

/// The stored test vectors' bytes, one per frame kind.
fn vector_bytes() -> Vec<Vec<u8>> {
    let text = std::fs::read_to_string(vectors::PATH).expect("proto/vectors.json exists");
    let stored: Vec<vectors::Vector> = serde_json::from_str(&text).expect("vectors parse");
    stored
        .iter()
        .map(|v| hex::decode(&v.hex).expect("hex"))
        .collect()
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder_and_get_a_clear_error(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        frames::check(&bytes);
    }

    /// Valid frames with a few bytes changed reach deep into the decoder.
    #[test]
    fn mutated_vectors_never_panic_the_decoder(
        which in any::<prop::sample::Index>(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let all = vector_bytes();
        let mut bytes = all[which.index(all.len())].clone();
        for (at, b) in edits {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        frames::check(&bytes);
        bytes.truncate(cut.index(bytes.len() + 1));
        frames::check(&bytes);
    }

    #[test]
    fn arbitrary_client_frames_round_trip(f in client_frame()) {
        frames::check_frame(&f);
    }

    #[test]
    fn arbitrary_hub_frames_round_trip(f in hub_frame()) {
        frames::check_frame(&f);
    }
}

// ---- control lines ----

fn control_line() -> impl Strategy<Value = Vec<u8>> {
    let field = prop_oneof![
        proptest::sample::select(Request::CMDS.to_vec()).prop_map(|c| format!("\"cmd\":\"{c}\"")),
        ".{0,8}".prop_map(|c| format!("\"cmd\":{}", serde_json::Value::String(c))),
        Just("\"cmd\":3".to_owned()),
        ".{0,6}".prop_map(|d| format!("\"db\":{}", serde_json::Value::String(d))),
        Just("\"db\":null".to_owned()),
        any::<bool>().prop_map(|b| format!("\"upload\":{b}")),
        any::<bool>().prop_map(|b| format!("\"follow\":{b}")),
        any::<i64>().prop_map(|n| format!("\"timeout_ms\":{n}")),
        "[a-z_]{1,8}".prop_map(|k| format!("\"{k}\":1")),
    ];
    prop_oneof![
        proptest::collection::vec(field, 0..5)
            .prop_map(|f| format!("{{{}}}", f.join(",")).into_bytes()),
        proptest::collection::vec(any::<u8>(), 0..40),
        "[ \t\r]{0,3}".prop_map(String::into_bytes),
        Just(b"[]".to_vec()),
    ]
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn arbitrary_control_lines_always_get_a_request_or_an_error_line(
        lines in proptest::collection::vec(control_line(), 1..6),
    ) {
        let input: Vec<u8> = lines.join(&b'\n');
        let answers = control::check(&input);
        // One answer per line (the last needs no newline).
        let ends = input.is_empty() || input.ends_with(b"\n");
        prop_assert_eq!(answers.len(), input.split(|&b| b == b'\n').count() - usize::from(ends));
    }
}

// ---- the hub's session machine ----

fn who() -> impl Strategy<Value = hub::Who> {
    prop_oneof![Just(hub::Who::A), Just(hub::Who::B)]
}

fn small_value() -> impl Strategy<Value = hub::SmallValue> {
    prop_oneof![
        Just(hub::SmallValue::Null),
        any::<i8>().prop_map(hub::SmallValue::Int),
        prop_oneof![Just(0.5), Just(-0.0), Just(f64::NAN), Just(2.0)]
            .prop_map(hub::SmallValue::Real),
        any::<u8>().prop_map(hub::SmallValue::Text),
        proptest::collection::vec(any::<u8>(), 0..4).prop_map(hub::SmallValue::Blob),
    ]
}

fn change_spec() -> impl Strategy<Value = hub::ChangeSpec> {
    (
        prop_oneof![8 => Just(1u8), 1 => Just(0u8), 1 => 2u8..4, 1 => Just(255u8)],
        prop_oneof![4 => 0u8..2, 1 => Just(2u8)],
        any::<bool>(),
        -3i8..4,
        prop_oneof![9 => Just(false), 1 => Just(true)],
        small_value(),
        prop_oneof![9 => Just(None), 1 => Just(Some(1u8))],
        prop_oneof![Just(0u8), 1u8..20],
    )
        .prop_map(
            |(seq_step, table, delete, key, odd_key, value, columns, base)| hub::ChangeSpec {
                seq_step,
                table,
                delete,
                key,
                odd_key,
                value,
                columns,
                base,
            },
        )
}

fn hub_step() -> impl Strategy<Value = hub::Step> {
    use hub::Step;
    let cursor = prop_oneof![
        Just(hub::CursorAt::Zero),
        Just(hub::CursorAt::Received),
        Just(hub::CursorAt::Head)
    ];
    prop_oneof![
        2 => (who(), cursor, any::<bool>(), prop_oneof![4 => Just(true), 1 => Just(false)],
              prop_oneof![5 => Just(false), 1 => Just(true)], prop_oneof![3 => Just(3u8), 1 => 1u8..3])
            .prop_map(|(who, cursor, echo_own, subscribe, read_only, tables)| Step::Start {
                who, cursor, echo_own, subscribe, read_only, tables,
            }),
        4 => (who(), 1u8..6, any::<bool>(), proptest::collection::vec(change_spec(), 0..5))
            .prop_map(|(who, batch, ack, changes)| Step::Upload { who, batch, ack, changes }),
        1 => (who(), proptest::collection::vec(any::<u8>(), 0..12))
            .prop_map(|(who, bytes)| Step::Raw { who, bytes }),
        1 => (who(), any::<u8>()).prop_map(|(who, id)| Step::Head { who, id }),
        3 => who().prop_map(|who| Step::FinishApply { who }),
        3 => who().prop_map(|who| Step::FinishRead { who }),
        3 => who().prop_map(|who| Step::Deliver { who }),
        3 => (who(), 1u8..5).prop_map(|(who, frames)| Step::Write { who, frames }),
        1 => (who(), any::<u16>()).prop_map(|(who, ms)| Step::Tick { who, ms }),
        1 => who().prop_map(|who| Step::Ping { who }),
        1 => who().prop_map(|who| Step::Progress { who }),
        1 => prop_oneof![
            who().prop_map(|who| Step::Hello { who }),
            who().prop_map(|who| Step::CutAfterApply { who }),
            who().prop_map(|who| Step::FailRead { who }),
            who().prop_map(|who| Step::Shutdown { who }),
            who().prop_map(|who| Step::Gone { who }),
        ],
    ]
}

proptest! {
    #![proptest_config(cases(48))]

    #[test]
    fn arbitrary_frame_sequences_keep_the_hub_sessions_invariants(
        starts in proptest::collection::vec(hub_step(), 0..4),
        steps in proptest::collection::vec(hub_step(), 0..50),
    ) {
        let dir = tempfile::tempdir().unwrap();
        // Both clients start first, so most steps meet a session.
        let mut all = vec![
            hub::Step::Start { who: hub::Who::A, cursor: hub::CursorAt::Zero, echo_own: false, subscribe: true, read_only: false, tables: 3 },
            hub::Step::Start { who: hub::Who::B, cursor: hub::CursorAt::Zero, echo_own: false, subscribe: true, read_only: false, tables: 3 },
        ];
        all.extend(starts);
        all.extend(steps);
        hub::Harness::run(dir.path(), &all);
    }
}

// ---- the daemon's session machine ----

fn near() -> impl Strategy<Value = daemon::Near> {
    prop_oneof![
        4 => (0u8..4).prop_map(daemon::Near::Ahead),
        1 => (0u8..4).prop_map(daemon::Near::Behind),
        1 => any::<u64>().prop_map(daemon::Near::Raw),
    ]
}

fn daemon_step() -> impl Strategy<Value = daemon::Step> {
    use daemon::{Answer, Step};
    let answer = prop_oneof![
        6 => Just(Answer::Right),
        1 => (0u8..3).prop_map(Answer::Part),
        1 => Just(Answer::Short),
        1 => Just(Answer::Long),
        1 => Just(Answer::Swapped),
        1 => (0u8..4).prop_map(Answer::OtherBatch),
    ];
    prop_oneof![
        3 => (near(), near(), prop_oneof![5 => Just(false), 1 => Just(true)], any::<bool>())
            .prop_map(|(head, client_seq, read_only, head_feature)| Step::Welcome {
                head, client_seq, read_only, head_feature,
            }),
        3 => (near(), 0u8..4, 0u8..3, near(), near())
            .prop_map(|(from, count, gap, up_to, head)| Step::Changes { from, count, gap, up_to, head }),
        1 => near().prop_map(Step::CaughtUp),
        4 => (answer, prop_oneof![4 => Just(0u8), 1 => 1u8..4])
            .prop_map(|(how, outcome)| Step::Answer { how, outcome }),
        1 => any::<u8>().prop_map(Step::Error),
        1 => near().prop_map(Step::Head),
        1 => proptest::collection::vec(any::<u8>(), 0..12).prop_map(Step::Raw),
        4 => (1u8..6).prop_map(Step::Write),
        1 => (0u16..5000).prop_map(Step::Tick),
        1 => any::<u16>().prop_map(Step::Tick),
        1 => prop_oneof![
            Just(Step::Ping),
            Just(Step::Lost),
            Just(Step::FailConnect),
            Just(Step::Wake),
            Just(Step::TokenChanged),
            Just(Step::Shutdown),
            any::<u8>().prop_map(Step::Command),
        ],
    ]
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn arbitrary_hub_frames_keep_the_daemon_sessions_invariants(
        steps in proptest::collection::vec(daemon_step(), 0..60),
    ) {
        daemon::Harness::run(&steps);
    }
}
