//! virtio-9p: 9P2000.L messages carried on one request queue, answered by a
//! `virtiofs-bridge` 9p server (the store read-only, xchg read-write), for guests that
//! mount `-t 9p -o trans=virtio`. Config space: the mount tag. Unlike virtio-fs, its
//! session (the guest's fids) is saved in snapshots and re-resolved at restore.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};

use vm_memory::GuestMemoryMmap;

use crate::backend::NinepSession;

use super::{IrqLine, VirtioDevice, VIRTIO_F_VERSION_1};

const VIRTIO_9P_MOUNT_TAG: u64 = 1;

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    irq: IrqLine,
}

pub struct NinepDevice {
    server: Arc<dyn NinepSession>,
    config: Vec<u8>,
    active: Option<Active>,
    bad_chains: Arc<AtomicU64>,
}

impl NinepDevice {
    pub fn new(server: Arc<dyn NinepSession>) -> NinepDevice {
        let tag = server.tag().as_bytes();
        let mut config = (tag.len() as u16).to_le_bytes().to_vec();
        config.extend_from_slice(tag);
        NinepDevice {
            server,
            config,
            active: None,
            bad_chains: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Chains that could not carry a request or its reply.
    pub fn bad_chains(&self) -> Arc<AtomicU64> {
        self.bad_chains.clone()
    }
}

impl VirtioDevice for NinepDevice {
    fn device_type(&self) -> u32 {
        9
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_9P_MOUNT_TAG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[128]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        irq: IrqLine,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(queues.len() == 1, "virtio-9p has one queue");
        self.active = Some(Active {
            mem,
            queue: queues.pop().unwrap(),
            irq,
        });
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        if index != 0 {
            return;
        }
        let mut returned = false;
        let mut budget = a.queue.size();
        while budget > 0 {
            let Some(chain) = a.queue.pop_descriptor_chain(&a.mem) else {
                break;
            };
            budget -= 1;
            let head = chain.head_index();
            let mut req = Vec::new();
            let read = match chain.clone().reader(&a.mem) {
                Ok(mut r) if r.available_bytes() <= self.server.max_message() + 4096 => {
                    r.read_to_end(&mut req).is_ok()
                }
                _ => false,
            };
            let mut used = 0;
            if !read {
                self.bad_chains.fetch_add(1, Relaxed);
            } else if let Some(reply) = self.server.handle(&req) {
                match chain.writer(&a.mem) {
                    Ok(mut w) if w.available_bytes() >= reply.len() => {
                        if w.write_all(&reply).is_ok() {
                            used = reply.len() as u32;
                        }
                    }
                    _ => {
                        self.bad_chains.fetch_add(1, Relaxed);
                    }
                }
            }
            let _ = a.queue.add_used(&a.mem, head, used);
            returned = true;
        }
        if returned {
            a.irq.signal_used();
        }
    }

    fn reset(&mut self) {
        self.active = None;
    }

    /// The 9p session: the guest's fids, by path and identity (see
    /// `virtiofs_bridge::ninep::NinepState`).
    fn save_state(&self) -> Option<serde_json::Value> {
        Some(self.server.save())
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> anyhow::Result<()> {
        for (fid, why) in self.server.restore(state)? {
            tracing::warn!(
                "9p share {}: fid {fid} not restored: {why}",
                self.server.tag()
            );
        }
        Ok(())
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map(|a| vec![a.queue.state()])
            .unwrap_or_default()
    }
}
