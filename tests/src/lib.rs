//! Test support shared by vmbuild's integration tests and benchmarks: a vhost-user
//! front-end that plays the guest driver with no VM, and a FUSE client on top of it.

pub mod fuse_client;
pub mod vhost_frontend;
