//! vmbuild: runs builds and tests inside virtual machines, reproducibly and fast, from one
//! process. The `vmbuild` binary is a thin `main` over this library; integration tests and
//! later workflows use the same parts.

pub mod accel;
pub mod bench;
pub mod build_slots;
pub mod cache_dir;
pub mod cli;
pub mod exit;
pub mod fd_limit;
pub mod guest;
pub mod image;
pub mod logging;
pub mod owned_dir;
pub mod progress;
pub mod qemu;
pub mod runtime_dir;
pub mod signals;
pub mod snapshot;
pub mod vm;
pub mod workflow;
