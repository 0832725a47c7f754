//! Protocol test vectors: `proto/vectors.json` holds, for each frame, its
//! MessagePack bytes (hex) beside a readable JSON form. The test decodes the
//! bytes, checks the readable form, and re-encodes to the same bytes.
//!
//! The frames are in `tests/vectors/frames.rs`; `cargo run --example
//! write_vectors` rewrites the file from them (review the diff: a changed
//! vector is a protocol change). This test never writes it.

use tether::proto::*;

#[path = "vectors/frames.rs"]
mod frames;
use frames::{Vector, PATH};

#[test]
fn vectors_decode_and_reencode_exactly() {
    let built = frames::build();
    let stored: Vec<Vector> =
        serde_json::from_str(&std::fs::read_to_string(PATH).expect("proto/vectors.json exists"))
            .expect("vectors parse");
    assert_eq!(
        stored.len(),
        built.len(),
        "one stored vector per frame kind"
    );
    for v in &stored {
        let bytes = hex::decode(&v.hex).unwrap();
        let (readable, reencoded) = match v.direction.as_str() {
            "client_to_hub" => {
                let f: ClientFrame = decode(&bytes).unwrap_or_else(|e| panic!("{}: {e}", v.name));
                (serde_json::to_value(&f).unwrap(), encode(&f))
            }
            "hub_to_client" => {
                let f: HubFrame = decode(&bytes).unwrap_or_else(|e| panic!("{}: {e}", v.name));
                (serde_json::to_value(&f).unwrap(), encode(&f))
            }
            d => panic!("unknown direction {d}"),
        };
        assert_eq!(
            readable, v.readable,
            "{}: decoded frame differs from its readable form",
            v.name
        );
        assert_eq!(
            hex::encode(reencoded),
            v.hex,
            "{}: re-encoding changed the bytes",
            v.name
        );
        let mine = built
            .iter()
            .find(|b| b.name == v.name)
            .expect("known vector");
        assert_eq!(
            mine.hex, v.hex,
            "{}: this build encodes the frame differently",
            v.name
        );
    }
}

#[test]
fn values_use_native_messagepack_types() {
    // nil, int, float64, str, bin: the first byte gives the type.
    let enc = |v: &Value| rmp_serde::to_vec(v).unwrap();
    assert_eq!(enc(&Value::Null), vec![0xc0]);
    assert_eq!(enc(&Value::Integer(1)), vec![0x01]);
    assert_eq!(enc(&Value::Integer(i64::MIN))[0], 0xd3);
    assert_eq!(enc(&Value::Real(1.0))[0], 0xcb);
    assert_eq!(enc(&Value::Text("a".into())), vec![0xa1, b'a']);
    assert_eq!(enc(&Value::Blob(vec![7])), vec![0xc4, 1, 7]);
    // A uint64 beyond i64 is refused with a clear message, not wrapped.
    let err =
        rmp_serde::from_slice::<Value>(&[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff])
            .unwrap_err()
            .to_string();
    assert!(err.contains("out of SQLite's 64-bit signed range"), "{err}");
    // A boolean is not a SQLite value.
    assert!(rmp_serde::from_slice::<Value>(&[0xc3]).is_err());
}

#[test]
fn the_borrowed_changes_frame_encodes_like_the_owned_one() {
    let stored: Vec<Vector> =
        serde_json::from_str(&std::fs::read_to_string(PATH).unwrap()).unwrap();
    let v = stored.iter().find(|v| v.name == "changes").unwrap();
    let bytes = hex::decode(&v.hex).unwrap();
    let HubFrame::Changes(c) = decode::<HubFrame>(&bytes).unwrap() else {
        panic!("the changes vector holds a changes frame")
    };
    assert!(c.changes.len() > 1);
    let refs: Vec<&RemoteChange> = c.changes.iter().collect();
    let borrowed = ChangesRef::Changes {
        changes: &refs,
        up_to: c.up_to,
        head: c.head,
    };
    assert_eq!(hex::encode(encode(&borrowed)), v.hex);
}
