#![no_main]
//! The `snapshot_files` target: see `fuzz_harness::snapshot_files` for the input format and the invariants.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_harness::snapshot_files::run(data));
