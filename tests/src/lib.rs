//! Test support shared by vmbuild's integration tests and benchmarks: a vhost-user
//! front-end that plays the guest driver with no VM, a FUSE client on top of it, and a
//! launcher that boots the guest kit under QEMU.

pub mod fuse_client;
pub mod guest;
pub mod netns;
pub mod vhost_frontend;
