//! The frames behind `proto/vectors.json`, shared by the vectors test and
//! by `cargo run --example write_vectors`, which rewrites the file (review
//! the diff: a changed vector is a protocol change). The test only reads.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tether::proto::*;

pub const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/proto/vectors.json");

#[derive(Serialize, Deserialize)]
pub struct Vector {
    pub name: String,
    pub direction: String,
    pub hex: String,
    pub readable: serde_json::Value,
}

pub enum Frame {
    Client(ClientFrame),
    Hub(HubFrame),
}

pub fn frames() -> Vec<(&'static str, Frame)> {
    let values = vec![
        Value::Text("n1".into()),
        Value::Integer(-42),
        Value::Real(0.1),
        Value::Blob(vec![0, 1, 255]),
        Value::Null,
    ];
    let schema = TableSchema {
        name: "notes".into(),
        columns: vec!["id".into(), "n".into(), "r".into(), "b".into(), "x".into()],
        types: vec![
            "TEXT".into(),
            "INTEGER".into(),
            "REAL".into(),
            "BLOB".into(),
            "".into(),
        ],
        pk: vec![0],
        fingerprint: tether::local::schema::fingerprint(
            "notes",
            &["id".into(), "n".into(), "r".into(), "b".into(), "x".into()],
            &[
                "TEXT".into(),
                "INTEGER".into(),
                "REAL".into(),
                "BLOB".into(),
                "".into(),
            ],
            &[0],
        ),
        strict: false,
    };
    // A STRICT table: `strict` is sent, the fingerprint is that of the same
    // table without STRICT.
    let strict_schema = TableSchema {
        name: "people".into(),
        columns: vec!["id".into(), "n".into()],
        types: vec!["INTEGER".into(), "INT".into()],
        pk: vec![0],
        fingerprint: tether::local::schema::fingerprint(
            "people",
            &["id".into(), "n".into()],
            &["INTEGER".into(), "INT".into()],
            &[0],
        ),
        strict: true,
    };
    let wrong_type = ChangeResult {
        seq: 12,
        outcome: Outcome::Invalid {
            reason: InvalidReason::WrongType,
            message: "table \"people\", column \"n\": a text value cannot be stored in a column declared INT of a STRICT table".into(),
        },
    };
    let server = ServerRow {
        version: 9,
        deleted: false,
        values: values.clone(),
    };
    let results = vec![
        ChangeResult {
            seq: 7,
            outcome: Outcome::Applied { version: 12 },
        },
        ChangeResult {
            seq: 8,
            outcome: Outcome::Conflict { server },
        },
        ChangeResult {
            seq: 9,
            outcome: Outcome::Invalid {
                reason: InvalidReason::WrongColumnCount,
                message: "table \"notes\": row has 2 values, the table has 5 columns".into(),
            },
        },
    ];
    vec![
        (
            "hello",
            Frame::Client(ClientFrame::Hello(Hello {
                protocol: PROTOCOL_VERSION,
                client_id: "6f1c0c1e-4d0a-4c59-9a3e-0c5d1b2a9f10".into(),
                client_key: "0d3f6a8e2b9c41d7a5e0f2c4b6d8e1a3".into(),
                dataset: "notes".into(),
                cursor: 41,
                tables: vec![schema],
                echo_own: false,
                subscribe: true,
                anchor: Some(Anchor {
                    version: 40,
                    digest: "6a1f0c55e2b34d7c9e8f1a2b3c4d5e6f".into(),
                }),
            })),
        ),
        (
            "hello_strict_table",
            Frame::Client(ClientFrame::Hello(Hello {
                protocol: PROTOCOL_VERSION,
                client_id: "6f1c0c1e-4d0a-4c59-9a3e-0c5d1b2a9f10".into(),
                client_key: "0d3f6a8e2b9c41d7a5e0f2c4b6d8e1a3".into(),
                dataset: "people".into(),
                cursor: 0,
                tables: vec![strict_schema],
                echo_own: false,
                subscribe: true,
                anchor: None,
            })),
        ),
        (
            "upload",
            Frame::Client(ClientFrame::Upload(Upload {
                batch: 3,
                acked: 6,
                changes: vec![
                    Change {
                        seq: 7,
                        table: "notes".into(),
                        op: Op::Upsert,
                        pk: vec![Value::Text("n1".into())],
                        values: values.clone(),
                        base: 0,
                        mask: u64::MAX,
                    },
                    Change {
                        seq: 8,
                        table: "notes".into(),
                        op: Op::Delete,
                        pk: vec![Value::Text("n2".into())],
                        values: vec![],
                        base: 5,
                        mask: 0,
                    },
                ],
            })),
        ),
        (
            "welcome",
            Frame::Hub(HubFrame::Welcome(Welcome {
                protocol: PROTOCOL_VERSION,
                head: 120,
                access: Access::ReadWrite,
                client_seq: 6,
                features: vec![],
            })),
        ),
        (
            "welcome_with_features",
            Frame::Hub(HubFrame::Welcome(Welcome {
                protocol: PROTOCOL_VERSION,
                head: 120,
                access: Access::ReadOnly,
                client_seq: 0,
                features: vec![FEATURE_HEAD.into()],
            })),
        ),
        (
            "head_question",
            Frame::Client(ClientFrame::Head(HeadAsk { id: 3 })),
        ),
        (
            "head_answer",
            Frame::Hub(HubFrame::Head(Head { id: 3, head: 4711 })),
        ),
        (
            "changes",
            Frame::Hub(HubFrame::Changes(Changes {
                changes: vec![
                    RemoteChange {
                        version: 42,
                        table: "notes".into(),
                        op: Op::Upsert,
                        pk: vec![Value::Text("n1".into())],
                        values,
                    },
                    RemoteChange {
                        version: 44,
                        table: "notes".into(),
                        op: Op::Delete,
                        pk: vec![Value::Text("n3".into())],
                        values: vec![],
                    },
                ],
                up_to: 44,
                head: 120,
            })),
        ),
        ("caught_up", Frame::Hub(HubFrame::CaughtUp(CaughtUp { head: 120 }))),
        (
            "upload_result",
            Frame::Hub(HubFrame::UploadResult(UploadResult {
                batch: 3,
                summary: UploadSummary::of(&results),
                results,
                more: false,
            })),
        ),
        (
            "upload_result_part",
            Frame::Hub(HubFrame::UploadResult(UploadResult {
                batch: 5,
                results: vec![ChangeResult {
                    seq: 11,
                    outcome: Outcome::Invalid {
                        reason: InvalidReason::TooLarge,
                        message: "change of 9000000 bytes exceeds the limit of 8388608 bytes".into(),
                    },
                }],
                summary: UploadSummary::of(&[ChangeResult {
                    seq: 11,
                    outcome: Outcome::Invalid {
                        reason: InvalidReason::TooLarge,
                        message: "change of 9000000 bytes exceeds the limit of 8388608 bytes".into(),
                    },
                }]),
                more: true,
            })),
        ),
        (
            "upload_result_wrong_type",
            Frame::Hub(HubFrame::UploadResult(UploadResult {
                batch: 6,
                summary: UploadSummary::of(std::slice::from_ref(&wrong_type)),
                results: vec![wrong_type],
                more: false,
            })),
        ),
        (
            "upload_result_materialize_error",
            Frame::Hub(HubFrame::UploadResult(UploadResult {
                batch: 4,
                results: vec![ChangeResult {
                    seq: 10,
                    outcome: Outcome::MaterializeError {
                        message: "hub store: database is locked".into(),
                    },
                }],
                summary: UploadSummary {
                    total: 1,
                    materialize_error: 1,
                    first_error: Some("hub store: database is locked".into()),
                    invalid_reasons: BTreeMap::new(),
                    ..Default::default()
                },
                more: false,
            })),
        ),
        (
            "error",
            Frame::Hub(HubFrame::Error(ErrorFrame {
                code: ErrorCode::SchemaMismatch,
                message: "table \"notes\" of dataset \"notes\" has schema 1a2b3c4d5e6f here but 0f9e8d7c6b5a on the hub".into(),
            })),
        ),
        (
            "error_identity_conflict",
            Frame::Hub(HubFrame::Error(ErrorFrame {
                code: ErrorCode::IdentityConflict,
                message: "client seq 12 was stored with other content".into(),
            })),
        ),
    ]
}

/// Every frame encoded, as the file holds it.
pub fn build() -> Vec<Vector> {
    frames()
        .into_iter()
        .map(|(name, f)| {
            let (direction, bytes, readable) = match &f {
                Frame::Client(c) => ("client_to_hub", encode(c), serde_json::to_value(c).unwrap()),
                Frame::Hub(h) => ("hub_to_client", encode(h), serde_json::to_value(h).unwrap()),
            };
            Vector {
                name: name.into(),
                direction: direction.into(),
                hex: hex::encode(bytes),
                readable,
            }
        })
        .collect()
}
