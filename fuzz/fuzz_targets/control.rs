//! The control socket: arbitrary bytes split into request lines, each
//! answered with a request or one error line.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    tether::fuzzing::control::check(bytes);
});
