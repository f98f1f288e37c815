#![no_main]
//! The `ninep` target: see `fuzz_harness::ninep` for the input format and the invariants.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_harness::ninep::run(data));
