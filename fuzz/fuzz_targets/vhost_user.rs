#![no_main]
//! The `vhost_user` target: see `fuzz_harness::vhost_user` for the input format and the invariants.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_harness::vhost_user::run(data));
