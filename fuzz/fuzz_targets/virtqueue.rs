#![no_main]
//! The `virtqueue` target: see `fuzz_harness::virtqueue` for the input format and the invariants.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_harness::virtqueue::run(data));
