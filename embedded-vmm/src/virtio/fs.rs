//! virtio-fs served in this process: each request queue's descriptor chains go straight to
//! a FUSE server ([`FuseServer`]: in vmbuild a `virtiofs-bridge` share), with its policies (read-only store,
//! no way out of the share) and counters. No vhost-user socket, no shared-memory setup.
//!
//! Queues: hiprio (FORGET, INTERRUPT) and one request queue, as QEMU's vhost-user-fs-pci
//! and the Linux driver use. Config space: the tag (36 bytes, NUL-padded) and the number
//! of request queues.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};

use vm_memory::GuestMemoryMmap;

use crate::backend::FuseServer;

use super::shm::ShmRegion;
use super::{IrqLine, VirtioDevice, VIRTIO_F_VERSION_1};

const TAG_LEN: usize = 36;

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    irq: IrqLine,
}

pub struct FsDevice {
    share: Arc<dyn FuseServer>,
    /// The DAX window (shared memory region 0), if the guest gets one.
    dax: Option<Arc<ShmRegion>>,
    config: [u8; TAG_LEN + 4],
    active: Option<Active>,
    /// Requests served since creation: any means a FUSE session the guest relies on.
    served: u64,
}

impl FsDevice {
    /// Fails when the share's tag does not fit the 36 bytes virtio-fs gives it.
    pub fn new(share: Arc<dyn FuseServer>) -> anyhow::Result<FsDevice> {
        let tag = share.tag().as_bytes();
        anyhow::ensure!(
            !tag.is_empty() && tag.len() <= TAG_LEN,
            "a virtio-fs tag has 1 to {TAG_LEN} bytes, '{}' has {}",
            share.tag(),
            tag.len()
        );
        let mut config = [0u8; TAG_LEN + 4];
        config[..tag.len()].copy_from_slice(tag);
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        Ok(FsDevice {
            share,
            dax: None,
            config,
            active: None,
            served: 0,
        })
    }
}

impl FsDevice {
    /// Gives the guest a DAX window of `window`'s size: with `mount -o dax=always` it
    /// maps the share's files there (FUSE_SETUPMAPPING) and reads them with no request.
    /// For read-only shares: the window maps files privately, so writes never reach them.
    pub fn with_dax(mut self, window: ShmRegion) -> FsDevice {
        self.dax = Some(Arc::new(window));
        self
    }
}

impl VirtioDevice for FsDevice {
    fn device_type(&self) -> u32 {
        26
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[128, 1024]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: IrqLine,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(queues.len() == 2, "virtio-fs needs 2 queues");
        self.active = Some(Active { mem, queues, irq });
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let Some(q) = a.queues.get_mut(index as usize) else {
            return;
        };
        let mut returned = false;
        while let Some(chain) = q.pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            let used = self.share.serve(&a.mem, chain, self.dax.as_ref());
            self.served += 1;
            if q.add_used(&a.mem, head, used).is_err() {
                tracing::debug!("virtio-fs: add_used failed");
            }
            returned = true;
        }
        if returned {
            a.irq.signal_used();
        }
    }

    fn reset(&mut self) {
        self.active = None;
    }

    /// The FUSE session (node ids, open handles) lives in the share server, which has no
    /// way to export it: once the guest has sent a request, a restored guest would hold
    /// ids the new server never gave out.
    fn snapshot_blocker(&self) -> Option<String> {
        (self.served > 0).then(|| {
            "a virtio-fs share is in use: its FUSE session (node ids, open files) cannot be saved; snapshot before mounting it, or share it over 9p, whose session is saved".into()
        })
    }

    fn shared_memory(&self) -> Option<Arc<ShmRegion>> {
        self.dax.clone()
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(|q| q.state()).collect())
            .unwrap_or_default()
    }
}
