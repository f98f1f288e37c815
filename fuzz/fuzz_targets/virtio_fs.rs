#![no_main]
//! The `virtio_fs` target: see `fuzz_harness::virtio_fs` for the input format and the invariants.

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_harness::virtio_fs::run(data));
