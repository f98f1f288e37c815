//! The virtio-mmio transport (virtio 1.2, 4.2; version 2 register layout): the registers a
//! driver uses to discover a device, negotiate features, configure queues and notify
//! them. Accesses that do not make sense (unknown registers, wrong sizes, queue setup
//! after DRIVER_OK, features the device does not offer) are ignored and counted; the
//! device never panics on what a guest writes.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};

use vm_memory::GuestMemoryMmap;

use super::{
    IrqLine, SavedQueue, VirtioDevice, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET, VIRTIO_F_VERSION_1,
};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x564d_4231; // "VMB1"
/// Size of the register window; config space starts at 0x100.
pub const WINDOW: u64 = 0x1000;

/// What a snapshot keeps of a transport: the negotiation, the status, and (once live)
/// the queues' positions. Device-internal state beyond the queues (frames in flight, an
/// in-process share's open files) is not kept: a restored NIC has lost what was on the
/// wire, and a share must not be mounted across a snapshot (as the lifecycle does it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub status: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<SavedQueue>,
    /// The device's own state beyond the transport, if it keeps any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<serde_json::Value>,
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: Arc<AtomicU32>,
    irqfd: Option<Arc<vmm_sys_util::eventfd::EventFd>>,
    config_generation: u32,
    /// Accesses ignored because they made no sense.
    bad_accesses: AtomicU64,
    /// The shared memory region selected (SHMSel).
    shm_sel: u32,
    /// Where the device's shared memory region 0 is in the guest and how long, once the
    /// VM has mapped it ([`MmioTransport::set_shared_memory`]).
    shm: Option<(u64, u64)>,
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irqfd: Option<Arc<vmm_sys_util::eventfd::EventFd>>,
    ) -> MmioTransport {
        let queues = fresh_queues(device.as_ref());
        MmioTransport {
            device,
            mem,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: Arc::new(AtomicU32::new(0)),
            irqfd,
            config_generation: 0,
            bad_accesses: AtomicU64::new(0),
            shm_sel: 0,
            shm: None,
        }
    }

    /// The device's shared memory region 0 is mapped at `guest_base` for `len` bytes;
    /// the driver finds it through SHMSel/SHMLen/SHMBase.
    pub fn set_shared_memory(&mut self, guest_base: u64, len: u64) {
        self.shm = Some((guest_base, len));
    }

    /// The selected region's (base, length), or "none": length all ones.
    fn selected_shm(&self) -> (u64, u64) {
        match self.shm {
            Some(region) if self.shm_sel == 0 => region,
            _ => (u64::MAX, u64::MAX),
        }
    }

    pub fn save(&self) -> TransportState {
        let live = self.status & STATUS_DRIVER_OK != 0;
        let queues = if live {
            self.device.queue_states()
        } else {
            self.queues.iter().map(|q| q.state()).collect()
        };
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            interrupt_status: self.interrupt_status.load(Ordering::Acquire),
            config_generation: self.config_generation,
            queues: queues.into_iter().map(SavedQueue::from).collect(),
            device: self.device.save_state(),
        }
    }

    /// See [`VirtioDevice::quiesce`].
    pub fn quiesce(&mut self) {
        self.device.quiesce();
    }

    pub fn resume(&mut self) {
        self.device.resume();
    }

    /// Why this transport's device cannot be snapshotted now, if so.
    pub fn snapshot_blocker(&self) -> Option<String> {
        self.device.snapshot_blocker()
    }

    /// A transport for `device` in the state `saved`: a live device is activated with its
    /// queues where they were. Refuses a state for another kind of device or with queues
    /// the device cannot have.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irqfd: Option<Arc<vmm_sys_util::eventfd::EventFd>>,
        saved: &TransportState,
    ) -> anyhow::Result<MmioTransport> {
        anyhow::ensure!(
            saved.device_type == device.device_type(),
            "the saved state is for virtio device type {}, not {}",
            saved.device_type,
            device.device_type()
        );
        anyhow::ensure!(
            saved.queues.len() == device.queue_max_sizes().len(),
            "the saved state has {} queues, the device {}",
            saved.queues.len(),
            device.queue_max_sizes().len()
        );
        let mut device = device;
        if let Some(state) = &saved.device {
            device.restore_state(state)?;
        }
        let mut t = MmioTransport::new(device, mem, irqfd);
        let mut queues = Vec::new();
        for (i, q) in saved.queues.iter().enumerate() {
            let q = Queue::try_from(virtio_queue::QueueState::from(*q))
                .map_err(|e| anyhow::anyhow!("saved queue {i} is invalid: {e}"))?;
            queues.push(q);
        }
        t.driver_features = saved.driver_features;
        t.queue_sel = saved.queue_sel;
        t.device_features_sel = saved.device_features_sel;
        t.driver_features_sel = saved.driver_features_sel;
        t.config_generation = saved.config_generation;
        t.interrupt_status
            .store(saved.interrupt_status, Ordering::Release);
        if saved.status & STATUS_DRIVER_OK != 0 {
            let irq = IrqLine::new(t.interrupt_status.clone(), t.irqfd.clone());
            t.device.activate(t.mem.clone(), queues, irq)?;
        } else {
            t.queues = queues;
        }
        t.status = saved.status;
        Ok(t)
    }

    pub fn bad_accesses(&self) -> u64 {
        self.bad_accesses.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    fn bad(&self, what: &str, offset: u64) {
        self.bad_accesses.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(offset, "virtio-mmio: ignored {what}");
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Whether queue configuration may still change (not yet live).
    fn configurable(&self) -> bool {
        self.status & STATUS_DRIVER_OK == 0
    }

    /// A read of `data.len()` bytes at `offset` in the device's window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 {
            self.bad("register read that is not 32-bit", offset);
            data.fill(0);
            return;
        }
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR,
            0x010 => {
                let f = self.device.features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x034 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x044 if !self.configurable() => {
                u32::from((self.queue_sel as usize) < self.queues.len())
            }
            0x044 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            // Shared memory regions: the selected one, or none ("length ~0" is how the
            // spec says so; a zero length would announce a region at address 0).
            0x0b0 => self.selected_shm().1 as u32,
            0x0b4 => (self.selected_shm().1 >> 32) as u32,
            0x0b8 => self.selected_shm().0 as u32,
            0x0bc => (self.selected_shm().0 >> 32) as u32,
            0x060 => self.interrupt_status.load(Ordering::Acquire),
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => {
                self.bad("read of an unknown register", offset);
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A write of `data` at `offset` in the device's window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            self.bad("config space write (read-only here)", offset);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.bad("register write that is not 32-bit", offset);
            return;
        };
        let v = u32::from_le_bytes(bytes);
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => {
                if self.status & STATUS_FEATURES_OK != 0 {
                    return self.bad("feature write after FEATURES_OK", offset);
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => self.bad("features beyond bit 63", offset),
                }
            }
            0x024 => self.driver_features_sel = v,
            0x0ac => self.shm_sel = v,
            0x030 => self.queue_sel = v,
            0x038 | 0x044 | 0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => {
                self.write_queue_register(offset, v)
            }
            0x050 => {
                if self.status & STATUS_DRIVER_OK == 0 || v as usize >= self.queues.len() {
                    return self.bad("notify of a queue that is not live", offset);
                }
                self.device.queue_notify(v as u16);
            }
            0x064 => {
                self.interrupt_status.fetch_and(!v, Ordering::AcqRel);
            }
            0x070 => self.write_status(v),
            _ => self.bad("write to an unknown or read-only register", offset),
        }
    }

    fn write_queue_register(&mut self, offset: u64, v: u32) {
        if !self.configurable() {
            return self.bad("queue setup after DRIVER_OK", offset);
        }
        let Some(q) = self.selected_queue() else {
            return self.bad("queue setup of a queue that does not exist", offset);
        };
        match offset {
            0x038 => {
                if v > 0xffff || q.try_set_size(v as u16).is_err() {
                    self.bad(
                        "queue size that is not a power of two up to the maximum",
                        offset,
                    );
                }
            }
            0x044 => q.set_ready(v == 1),
            0x080 => q.set_desc_table_address(Some(v), None),
            0x084 => q.set_desc_table_address(None, Some(v)),
            0x090 => q.set_avail_ring_address(Some(v), None),
            0x094 => q.set_avail_ring_address(None, Some(v)),
            0x0a0 => q.set_used_ring_address(Some(v), None),
            0x0a4 => q.set_used_ring_address(None, Some(v)),
            _ => unreachable!("only queue registers are routed here"),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.device.reset();
            self.queues = fresh_queues(self.device.as_ref());
            self.status = 0;
            self.driver_features = 0;
            self.interrupt_status.store(0, Ordering::Release);
            return;
        }
        if v & self.status != self.status {
            // Only a reset (0) takes bits back; anything else would let a driver
            // re-activate a live device.
            return self.bad("status write that clears bits (only 0 resets)", 0x70);
        }
        let newly = v & !self.status;
        if newly & STATUS_FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                // The driver reads the status back and sees FEATURES_OK missing.
                self.bad("features the device does not offer, or no VERSION_1", 0x70);
                self.status = v & !STATUS_FEATURES_OK;
                return;
            }
        }
        if newly & STATUS_DRIVER_OK != 0 {
            if self.status & STATUS_FEATURES_OK == 0 {
                self.bad("DRIVER_OK before FEATURES_OK", 0x70);
                self.status = (v & !STATUS_DRIVER_OK) | STATUS_FAILED;
                return;
            }
            if let Some(i) = self.queues.iter().position(|q| !q.is_valid(&self.mem)) {
                self.bad("DRIVER_OK with an invalid queue", 0x70);
                tracing::debug!(queue = i, "virtio-mmio: queue invalid at DRIVER_OK");
                self.status = (v & !STATUS_DRIVER_OK) | STATUS_NEEDS_RESET;
                return;
            }
            let irq = IrqLine::new(self.interrupt_status.clone(), self.irqfd.clone());
            // The device takes the configured queues; the transport keeps fresh ones of
            // the same sizes for after a reset.
            let live = std::mem::replace(&mut self.queues, fresh_queues(self.device.as_ref()));
            if let Err(e) = self.device.activate(self.mem.clone(), live, irq) {
                tracing::warn!("virtio device failed to activate: {e:#}");
                self.status = (v & !STATUS_DRIVER_OK) | STATUS_NEEDS_RESET;
                return;
            }
        }
        self.status = v;
    }
}

fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        .filter_map(|&max| Queue::new(max).ok())
        .collect()
}
