#![no_main]
//! The `switch` target: see `fuzz_harness::switch` for the input format and the invariants.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_harness::switch::run(data));
