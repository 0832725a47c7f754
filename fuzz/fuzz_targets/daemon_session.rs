//! The daemon's session machine fed arbitrary hub frames and events.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::fuzzing::daemon::{Harness, Step};

fuzz_target!(|steps: Vec<Step>| Harness::run(&steps));
