//! virtio-net on a `vswitch` in-process port: what the guest transmits is forwarded by a
//! function call into the switch, and what the switch sends the port is written into the
//! guest's receive buffers by a thread of this device. No tap, no socket, no copy beyond
//! guest memory ↔ frame buffer.
//!
//! Offered features: VERSION_1 and MAC (no offloads yet: every frame is a finished
//! Ethernet frame). Header: the 12-byte `virtio_net_hdr_v1`, all zero on receive but
//! `num_buffers = 1`. Chains that are too short, too long, point outside guest memory or
//! loop are returned unused and counted; the device keeps serving.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vswitch::{InProcessPort, Switch, VlanMode};

use crate::backend::FramePort;

use vm_memory::GuestMemoryMmap;

use super::{IrqLine, VirtioDevice, VIRTIO_F_VERSION_1};

const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const HDR_LEN: usize = 12;
/// Largest frame without offloads: 64 KiB would need GSO; jumbo 9 KiB is plenty.
const MAX_FRAME: usize = 9216 + 18;
const RX: u16 = 0;
const TX: u16 = 1;
/// Frames held while the guest has no receive buffer posted.
const RX_BACKLOG: usize = 256;

#[derive(Default)]
pub struct NetCounters {
    pub tx_frames: AtomicU64,
    pub rx_frames: AtomicU64,
    /// Frames dropped because the guest posted no receive buffer in time.
    pub rx_dropped: AtomicU64,
    /// Descriptor chains returned unused: too short, too long, outside guest memory.
    pub bad_chains: AtomicU64,
}

struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    irq: IrqLine,
    backlog: VecDeque<Vec<u8>>,
    /// While a snapshot is taken: frames wait in the backlog.
    quiesced: bool,
    /// Buffers for the frames of one transmit batch, kept between notifies.
    tx_buffers: Vec<Vec<u8>>,
}

pub struct NetDevice {
    mac: [u8; 6],
    port: Arc<dyn FramePort>,
    active: Arc<Mutex<Option<Active>>>,
    counters: Arc<NetCounters>,
    stop: Arc<AtomicBool>,
    rx_thread: Option<JoinHandle<()>>,
}

impl NetDevice {
    /// A NIC with `mac` attached to `switch` as an in-process port named `name`.
    pub fn new(switch: &Arc<Switch>, name: &str, mac: [u8; 6], vlan: VlanMode) -> NetDevice {
        Self::on_port(Arc::new(InProcessPort::attach(switch, name, vlan)), mac)
    }

    /// A NIC with `mac` whose frames go through `port`.
    pub fn on_port(port: Arc<dyn FramePort>, mac: [u8; 6]) -> NetDevice {
        NetDevice {
            mac,
            port,
            active: Arc::new(Mutex::new(None)),
            counters: Arc::new(NetCounters::default()),
            stop: Arc::new(AtomicBool::new(false)),
            rx_thread: None,
        }
    }

    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    fn stop_rx_thread(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.rx_thread.take() {
            let _ = t.join();
        }
        self.stop.store(false, Relaxed);
    }
}

impl Drop for NetDevice {
    fn drop(&mut self) {
        self.stop_rx_thread();
        *self
            .active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        1
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 256]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Config space: mac[6], then status (not offered) reads as zero.
        super::read_config_bytes(&self.mac, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        irq: IrqLine,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(queues.len() == 2, "virtio-net needs 2 queues");
        // The transport activates a device once per reset; never run two receivers.
        self.stop_rx_thread();
        let tx = queues.pop().unwrap();
        let rx = queues.pop().unwrap();
        *self.active.lock().unwrap() = Some(Active {
            mem,
            rx,
            tx,
            irq,
            backlog: VecDeque::new(),
            quiesced: false,
            tx_buffers: Vec::new(),
        });
        let (port, active, counters, stop) = (
            self.port.clone(),
            self.active.clone(),
            self.counters.clone(),
            self.stop.clone(),
        );
        self.rx_thread = Some(
            std::thread::Builder::new()
                .name("virtio-net-rx".into())
                .spawn(move || {
                    while !stop.load(Relaxed) {
                        if let Some(frame) = port.recv_timeout(Duration::from_millis(50)) {
                            let mut guard = active.lock().unwrap();
                            let Some(a) = guard.as_mut() else { continue };
                            if a.backlog.len() >= RX_BACKLOG {
                                counters.rx_dropped.fetch_add(1, Relaxed);
                            } else {
                                a.backlog.push_back(frame);
                            }
                            if !a.quiesced {
                                deliver(a, &counters);
                            }
                        }
                    }
                })?,
        );
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        let mut guard = self.active.lock().unwrap();
        let Some(a) = guard.as_mut() else { return };
        match index {
            TX => transmit(a, &*self.port, &self.counters),
            RX if !a.quiesced => deliver(a, &self.counters),
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.stop_rx_thread();
        *self.active.lock().unwrap() = None;
    }

    /// Arriving frames wait in the backlog; taking the lock waits out a delivery that is
    /// under way.
    fn quiesce(&mut self) {
        let mut active = self
            .active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(a) = active.as_mut() {
            a.quiesced = true;
        }
    }

    fn resume(&mut self) {
        let mut active = self
            .active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(a) = active.as_mut() {
            a.quiesced = false;
            deliver(a, &self.counters);
        }
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        match self.active.lock().unwrap().as_ref() {
            Some(a) => vec![a.rx.state(), a.tx.state()],
            None => Vec::new(),
        }
    }
}

/// Whether a chain ends where the driver says it does. virtio-queue stops iterating a
/// chain after queue-size descriptors; a chain whose last descriptor still points on
/// loops (or is longer than the queue) and is malformed.
fn well_formed<M>(chain: &virtio_queue::DescriptorChain<M>) -> bool
where
    M: std::ops::Deref + Clone,
    M::Target: vm_memory::GuestMemory,
{
    match chain.clone().last() {
        Some(last) => !last.has_next(),
        None => false,
    }
}

/// Frames of one notify handed to the switch at once (it decides up to 64 under one
/// hold of its locks).
const TX_BATCH: usize = 64;

/// Sends every frame the guest queued for transmission, in batches of [`TX_BATCH`].
fn transmit(a: &mut Active, port: &dyn FramePort, counters: &NetCounters) {
    let mut returned = false;
    let mut buffers = std::mem::take(&mut a.tx_buffers);
    let mut batched = 0;
    let send = |buffers: &[Vec<u8>]| {
        let frames: Vec<&[u8]> = buffers.iter().map(|b| &b[HDR_LEN..]).collect();
        port.send_batch(&frames);
    };
    // At most one ring's worth per notify: a driver that keeps moving its avail index
    // cannot keep this thread here.
    let mut budget = a.tx.size();
    while budget > 0 {
        let Some(chain) = a.tx.pop_descriptor_chain(&a.mem) else {
            break;
        };
        budget -= 1;
        let head = chain.head_index();
        if buffers.len() == batched {
            buffers.push(Vec::with_capacity(HDR_LEN + MAX_FRAME));
        }
        let buf = &mut buffers[batched];
        buf.clear();
        let ok = well_formed(&chain)
            && match chain.reader(&a.mem) {
                Ok(mut r) if r.available_bytes() <= HDR_LEN + MAX_FRAME => {
                    r.read_to_end(buf).is_ok() && buf.len() >= HDR_LEN + 14
                }
                _ => false,
            };
        if ok {
            // The frame is copied out of the guest: its buffer may go back at once.
            batched += 1;
            counters.tx_frames.fetch_add(1, Relaxed);
        } else {
            counters.bad_chains.fetch_add(1, Relaxed);
        }
        if a.tx.add_used(&a.mem, head, 0).is_err() {
            counters.bad_chains.fetch_add(1, Relaxed);
        }
        returned = true;
        if batched == TX_BATCH {
            send(&buffers[..batched]);
            batched = 0;
        }
    }
    if batched > 0 {
        send(&buffers[..batched]);
    }
    a.tx_buffers = buffers;
    if returned {
        a.irq.signal_used();
    }
}

/// Moves backlogged frames into the receive buffers the guest posted.
fn deliver(a: &mut Active, counters: &NetCounters) {
    let mut returned = false;
    let mut budget = a.rx.size();
    while !a.backlog.is_empty() && budget > 0 {
        let Some(chain) = a.rx.pop_descriptor_chain(&a.mem) else {
            break;
        };
        budget -= 1;
        let head = chain.head_index();
        let frame = a.backlog.pop_front().unwrap();
        let mut hdr = [0u8; HDR_LEN];
        hdr[10] = 1; // num_buffers
        let written = well_formed(&chain)
            && match chain.writer(&a.mem) {
                Ok(mut w) if w.available_bytes() >= HDR_LEN + frame.len() => {
                    w.write_all(&hdr).and_then(|_| w.write_all(&frame)).is_ok()
                }
                _ => false,
            };
        let len = if written {
            counters.rx_frames.fetch_add(1, Relaxed);
            (HDR_LEN + frame.len()) as u32
        } else {
            counters.bad_chains.fetch_add(1, Relaxed);
            0
        };
        if a.rx.add_used(&a.mem, head, len).is_err() {
            counters.bad_chains.fetch_add(1, Relaxed);
        }
        returned = true;
    }
    if returned {
        a.irq.signal_used();
    }
}
