//! virtio-fs over vhost-user: the device back-end QEMU's `vhost-user-fs-pci` talks to, and
//! the socket server that keeps a share available across front-end restarts.

pub(crate) mod backend;
mod pool;
mod server;

pub use backend::{FsBackend, MAX_QUEUE_SIZE, NUM_QUEUES};
pub use server::ShareServer;
