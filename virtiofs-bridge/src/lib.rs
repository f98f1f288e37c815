//! virtiofs-bridge: vmbuild's in-process file server. It offers host directories to guests
//! as virtio-fs (FUSE over virtio) shares:
//!
//! * the **store**, read-only and immutable, so guests may cache it for as long as they like;
//! * **xchg**, read-write, where the host and the guest see each other's changes.
//!
//! Each share is served on its own vhost-user socket ([`ShareServer`]) for QEMU's
//! `vhost-user-fs-pci`; several shares run in one process. A VMM in this same process
//! uses [`InProcessShare`] instead, with no socket. The FUSE wire format and the
//! passthrough engine come from `fuse-backend-rs`; this crate adds the share policies
//! ([`share`]), the vhost-user device ([`vhost_user`]) and the serving lifecycle.
//!
//! The same shares are also served as **9P2000.L** ([`ninep`]: wire format, typed
//! requests, dispatch under the same policies), for the embedded VMM's virtio-9p device.

pub mod inprocess;
pub mod ninep;
mod record;
pub mod share;
pub mod stats;
pub mod vhost_user;

pub use inprocess::InProcessShare;
pub use share::{CacheMode, ShareConfig};
pub use stats::StatsSnapshot;
pub use vhost_user::ShareServer;

/// What can go wrong setting up or serving a share.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The share's configuration cannot work; the message says what to change.
    #[error("{0}")]
    Config(String),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The vhost-user layer failed (socket or protocol).
    #[error("vhost-user: {0}")]
    Backend(String),
}
