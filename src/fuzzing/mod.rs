//! Harnesses for the fuzz targets in `fuzz/` and the property tests in
//! `tests/fuzzing.rs`: each feeds one surface arbitrary input and panics
//! when an invariant breaks, so a fuzzer's crash and a failing property are
//! the same finding. Not part of tether's API.
//!
//! * [`frames`]: the frame decoder (every frame kind, values, keys) and the
//!   round trip decode, encode, decode;
//! * [`hub`]: the hub's session machine of two authenticated clients, over a
//!   real SQLite store, driven step by step as the session driver does;
//! * [`daemon`]: the daemon's session machine fed arbitrary hub frames, with
//!   a model of the local database behind it;
//! * [`control`]: request lines of the control socket.
//!
//! With the `arbitrary` feature the steps can be built from raw bytes.

pub mod control;
pub mod daemon;
pub mod frames;
pub mod hub;
