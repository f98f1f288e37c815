//! Virtio devices of the embedded VMM, on the virtio-mmio transport ([`mmio`]). The split
//! virtqueues themselves (descriptor validation, ring indices) are the `virtio-queue`
//! crate's; the devices here decide what a request means.
//!
//! * [`net`]: a NIC whose queues feed a `vswitch` in-process port (no tap, no socket);
//! * [`fs`]: virtio-fs answered by a `virtiofs-bridge` share in this process;
//! * [`console`]: a virtio-console port as the host ↔ guest command channel;
//! * [`ninep`]: virtio-9p (9P2000.L) for read-only shares, from `virtiofs-bridge`;
//! * [`block`]: virtio-blk over an image file, writes kept in a throwaway overlay.
//!
//! Interrupts are raised through an [`IrqLine`]: the transport's interrupt status bit,
//! plus an eventfd when the VM has an in-kernel interrupt controller to route it
//! (irqfd); a driver that polls (the device tests) only needs the status bit.

pub mod block;
pub mod console;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod ninep;
pub mod shm;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Device status bits (virtio 1.2, 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// Interrupt status bit: a used buffer was returned.
pub const INT_USED_RING: u32 = 1;

/// How a device tells the driver that it returned buffers.
#[derive(Clone)]
pub struct IrqLine {
    status: Arc<AtomicU32>,
    irqfd: Option<Arc<EventFd>>,
}

impl IrqLine {
    pub fn new(status: Arc<AtomicU32>, irqfd: Option<Arc<EventFd>>) -> IrqLine {
        IrqLine { status, irqfd }
    }

    pub fn signal_used(&self) {
        self.status.fetch_or(INT_USED_RING, Ordering::AcqRel);
        if let Some(fd) = &self.irqfd {
            let _ = fd.write(1);
        }
    }
}

/// A config read of `data.len()` bytes at `offset` from a device whose config space is
/// `config`; bytes past its end read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = config.get(offset as usize + i).copied().unwrap_or(0);
    }
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (1 net, 26 fs, 9 9p, ...).
    fn device_type(&self) -> u32;
    fn features(&self) -> u64;
    /// Maximum size of each queue; the number of queues is this slice's length.
    fn queue_max_sizes(&self) -> &[u16];
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver set DRIVER_OK: the queues are configured and valid.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: IrqLine,
    ) -> anyhow::Result<()>;
    /// The driver notified queue `index`.
    fn queue_notify(&mut self, index: u16);
    /// Back to the state before activation (the driver wrote status 0).
    fn reset(&mut self);
    /// The live queues' positions, for a snapshot (empty before activation).
    fn queue_states(&self) -> Vec<virtio_queue::QueueState>;
    /// What the device keeps beyond its transport (a 9p session's fids), for a snapshot;
    /// `None` for devices whose state lives only in guest memory and the queues.
    fn save_state(&self) -> Option<serde_json::Value> {
        None
    }
    /// Takes over `state` as [`VirtioDevice::save_state`] wrote it.
    fn restore_state(&mut self, state: &serde_json::Value) -> anyhow::Result<()> {
        let _ = state;
        anyhow::bail!("this device keeps no state, but the snapshot has some for it")
    }
    /// Stops writing guest memory from host threads (frames arriving, host bytes sent)
    /// until [`VirtioDevice::resume`]; what arrives meanwhile waits. A snapshot saves the
    /// vCPUs, memory and device state in between, so that they agree.
    fn quiesce(&mut self) {}
    fn resume(&mut self) {}
    /// Why the device cannot be snapshotted as it is now, if so (a snapshot would not
    /// restore what the guest relies on).
    fn snapshot_blocker(&self) -> Option<String> {
        None
    }
    /// The device's shared memory region 0 (a virtio-fs DAX window), which the VM maps
    /// into the guest's physical address space; `None` for devices without one.
    fn shared_memory(&self) -> Option<Arc<shm::ShmRegion>> {
        None
    }
}

/// A queue's position and configuration as a snapshot keeps it (virtio-queue's
/// `QueueState`, which has no serde).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedQueue {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<virtio_queue::QueueState> for SavedQueue {
    fn from(q: virtio_queue::QueueState) -> Self {
        SavedQueue {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<SavedQueue> for virtio_queue::QueueState {
    fn from(q: SavedQueue) -> Self {
        virtio_queue::QueueState {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}
