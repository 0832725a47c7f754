//! The frame decoder: arbitrary bytes as every frame kind, a key and a
//! row's values; whatever decodes must survive encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| tether::fuzzing::frames::check(bytes));
