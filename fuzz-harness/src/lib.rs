//! The harnesses of vmbuild's fuzz targets: one module per target, each with a
//! `run(data)` that decodes the fuzzer's bytes, feeds them to the real server or device,
//! and checks invariants (not only "no crash"); a violated invariant panics, which
//! libFuzzer reports as a crash and a test reports as a failure.
//!
//! The same `run` functions serve `fuzz/` (cargo-fuzz, nightly) and the corpus replay
//! tests in `tests/corpus_replay.rs` (stable, `cargo test`), so CI replays every corpus
//! and regression input with the checks the fuzzer ran.
//!
//! | target | module |
//! |---|---|
//! | `virtio_fs` | [`virtio_fs`]: FUSE requests on virtqueue chains into an in-process share |
//! | `ninep` | [`ninep`]: a 9P2000.L message stream into one session |
//! | `switch` | [`switch`]: Ethernet frames (virtio-net header, VLAN tags) into a 3-port switch |
//! | `virtqueue` | [`virtqueue`]: rings, descriptors and MMIO registers of the embedded devices |
//! | `vhost_user` | [`vhost_user`]: vhost-user front-end messages into the fs and net back-ends |
//! | `snapshot_files` | [`snapshot_files`]: the embedded VMM's state file and `manifest.json` |

pub mod common;
pub mod mem;
pub mod ninep;
pub mod snapshot_files;
pub mod switch;
pub mod vhost_user;
pub mod virtio_fs;
pub mod virtqueue;

/// A harness: one input, checked (a violated invariant panics).
pub type Harness = fn(&[u8]);

/// Every target, by the name its corpus directory and cargo-fuzz binary have.
pub const TARGETS: &[(&str, Harness)] = &[
    ("virtio_fs", virtio_fs::run),
    ("ninep", ninep::run),
    ("switch", switch::run),
    ("virtqueue", virtqueue::run),
    ("vhost_user", vhost_user::run),
    ("snapshot_files", snapshot_files::run),
];
