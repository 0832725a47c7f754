//! The hub's session machine of two clients over a real SQLite store, fed
//! arbitrary frames, store answers, writer progress, timers and endings.
//! The store lives on tmpfs when there is one (no fsync cost).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::fuzzing::hub::{Harness, Step};

fuzz_target!(|steps: Vec<Step>| {
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .expect("a temporary directory");
    Harness::run(dir.path(), &steps);
});
