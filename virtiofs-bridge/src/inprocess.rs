//! A share served in this process without vhost-user: for a VMM in the same process (the
//! embedded KVM VMM's virtio-fs device) that pops descriptor chains from its own queues.
//! Same policies, same FUSE server, same counters as a [`crate::ShareServer`].

use std::sync::Arc;

use fuse_backend_rs::api::server::Server;
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use crate::record::Recorder;
use crate::share::{ShareConfig, ShareFs};
use crate::stats::{ShareStats, StatsSnapshot};
use crate::Error;

pub struct InProcessShare {
    server: Server<Arc<ShareFs>>,
    stats: Arc<ShareStats>,
    tag: String,
    recorder: Recorder,
}

impl InProcessShare {
    pub fn new(config: &ShareConfig) -> Result<InProcessShare, Error> {
        config.validate()?;
        let stats = Arc::new(ShareStats::default());
        let fs = config.open_fs(stats.clone())?;
        Ok(InProcessShare {
            server: Server::new(Arc::new(fs)),
            stats,
            tag: config.tag.clone(),
            recorder: Recorder::new(if config.read_only {
                "fuse-ro"
            } else {
                "fuse-rw"
            }),
        })
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Serves one FUSE request (one descriptor chain) and returns the bytes written into
    /// the chain, for the used ring. Malformed requests are counted and answered with
    /// EINVAL where a reply header fits; this never panics on what a guest sent.
    pub fn serve<M>(&self, mem: &GuestMemoryMmap, chain: DescriptorChain<M>) -> u32
    where
        M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
    {
        crate::vhost_user::backend::serve_chain(
            &self.server,
            &self.stats,
            &self.recorder,
            mem,
            chain,
        )
    }

    /// [`InProcessShare::serve`] for a device with a DAX window: FUSE_SETUPMAPPING and
    /// FUSE_REMOVEMAPPING are handed to `window`.
    pub fn serve_mapping<M>(
        &self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<M>,
        window: &mut dyn fuse_backend_rs::transport::FsCacheReqHandler,
    ) -> u32
    where
        M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
    {
        crate::vhost_user::backend::serve_chain_mapping(
            &self.server,
            &self.stats,
            &self.recorder,
            mem,
            chain,
            Some(window),
        )
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }
}
