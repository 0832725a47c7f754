//! The frame decoder against arbitrary bytes.

use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::proto::{self, ClientFrame, DecodeError, HubFrame};

/// Decodes `bytes` as every frame kind, a key and a row's values. Whatever
/// decodes must encode and decode back to the same thing, and encode to the
/// same bytes again (the encoding is canonical); what does not decode must
/// give an error that says what is wrong. Panics otherwise.
pub fn check(bytes: &[u8]) {
    round_trip::<ClientFrame>(bytes);
    round_trip::<HubFrame>(bytes);
    match proto::decode_key(bytes) {
        Ok(k) => {
            let again = proto::encode_key(&k);
            let back = proto::decode_key(&again).expect("an encoded key decodes");
            assert_eq!(back, k, "a key survives encoding");
            assert_eq!(proto::encode_key(&back), again, "keys encode canonically");
        }
        Err(e) => assert!(!e.to_string().is_empty(), "a key error says something"),
    }
    match proto::decode_values(bytes) {
        Ok(v) => {
            let again = proto::encode_values(&v);
            let back = proto::decode_values(&again).expect("encoded values decode");
            assert_eq!(back, v, "values survive encoding");
        }
        Err(e) => assert!(!e.to_string().is_empty(), "a values error says something"),
    }
}

/// Decodes `bytes` as an `F` and checks the round trip of what decoded.
pub fn round_trip<F>(bytes: &[u8])
where
    F: Serialize + DeserializeOwned + PartialEq + Debug,
{
    match proto::decode::<F>(bytes) {
        Ok(f) => check_frame(&f),
        Err(e) => check_error(&e, bytes.len()),
    }
}

/// A frame encodes, decodes back to itself and encodes to the same bytes.
pub fn check_frame<F>(f: &F)
where
    F: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let bytes = proto::encode(f);
    let back: F = proto::decode(&bytes)
        .unwrap_or_else(|e| panic!("a frame this build encoded does not decode: {e}: {f:?}"));
    assert_eq!(&back, f, "a frame survives encoding");
    assert_eq!(proto::encode(&back), bytes, "frames encode canonically");
}

/// A decode error names its cause: the size, or what is malformed.
pub fn check_error(e: &DecodeError, len: usize) {
    let text = e.to_string();
    match e {
        DecodeError::TooLarge { size, .. } => assert_eq!(*size, len),
        DecodeError::Malformed(_) => {
            assert!(
                text.len() > "malformed frame: ".len(),
                "a malformed frame's error says what is wrong: {text:?}"
            );
        }
    }
}
