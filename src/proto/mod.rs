//! Wire protocol v1: frames, their MessagePack codec and size limits. No I/O.
//!
//! `proto/PROTOCOL.md` at the repository root documents every frame and
//! `proto/vectors.json` holds test vectors checked by the tests.

mod frame;
mod value;

pub use frame::*;
pub use value::{decode_key, decode_values, encode_key, encode_values, Value};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest WebSocket message either side accepts (also given to tungstenite).
pub const MAX_FRAME_BYTES: usize = 16 << 20;

/// Upload batches stop growing at this many changes ...
pub const MAX_BATCH_CHANGES: usize = 4000;
/// ... or at about this many bytes of values.
pub const MAX_BATCH_BYTES: usize = 4 << 20;

/// Largest single change (its [`Change::wire_size`]) the hub accepts; a
/// larger one is answered `invalid` / `too_large` and a daemon does not even
/// send it. With pages and answers cut at [`MAX_PAGE_BYTES`], a frame holds at
/// most one page plus one change, which stays under [`MAX_FRAME_BYTES`].
pub const MAX_CHANGE_BYTES: usize = 8 << 20;

/// Catch-up pages, live pushes and upload answers stop growing at this many
/// changes or bytes (a frame always carries at least one change).
pub const MAX_PAGE_CHANGES: usize = 4000;
pub const MAX_PAGE_BYTES: usize = 4 << 20;

/// Largest sequence number either side accepts, for client seqs, dataset
/// seqs, cursors and heads alike (2^53 - 1: a million writes a second for
/// 285 years). A larger number on the wire is a protocol violation, never
/// stored.
pub const MAX_SEQ: u64 = (1 << 53) - 1;

/// Largest step from a client's last processed seq to the next one the hub
/// accepts, and from a daemon's own numbering to the `client_seq` a hub may
/// announce. Local numbering only grows by writes; a bigger jump is an
/// impostor or a bug, and accepting it would make the hub treat every later
/// real write as a resend.
pub const MAX_SEQ_JUMP: u64 = 1 << 32;

/// HTTP header carrying the dataset at the upgrade, so that a token that is
/// not valid for it is refused with 403 before any frame is exchanged.
pub const DATASET_HEADER: &str = "tether-dataset";

/// Why a binary message could not be turned into a frame.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed frame: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
}

/// Encodes a frame (named fields).
pub fn encode<T: serde::Serialize>(frame: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(frame).expect("BUG: frames always encode")
}

/// Decodes one frame, refusing oversized input before parsing it.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            limit: MAX_FRAME_BYTES,
        });
    }
    Ok(rmp_serde::from_slice(bytes)?)
}

/// Digest of one change of a dataset's log, computed alike by the hub (from
/// its log) and by a client (from a change it received or sent): lowercase
/// hex of the first 16 bytes of SHA-256 over the version (8 bytes, big
/// endian), the table name, a zero byte, the op (1 upsert, 2 delete), and the
/// key and values as [`encode_key`] and [`encode_values`] write them.
pub fn log_digest(version: u64, table: &str, op: Op, key: &[u8], values: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(version.to_be_bytes());
    h.update(table.as_bytes());
    h.update([
        0,
        match op {
            Op::Upsert => 1,
            Op::Delete => 2,
        },
    ]);
    h.update(key);
    h.update(values);
    hex::encode(&h.finalize()[..16])
}

impl Change {
    /// Approximate encoded size, for batch limits and progress.
    pub fn wire_size(&self) -> usize {
        32 + self.table.len()
            + self.pk.iter().map(Value::wire_size).sum::<usize>()
            + self.values.iter().map(Value::wire_size).sum::<usize>()
    }
}

impl RemoteChange {
    /// Approximate encoded size, for page limits and progress.
    pub fn wire_size(&self) -> usize {
        24 + self.table.len()
            + self.pk.iter().map(Value::wire_size).sum::<usize>()
            + self.values.iter().map(Value::wire_size).sum::<usize>()
    }
}
