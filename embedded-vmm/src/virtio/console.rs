//! virtio-console as the host ↔ guest command channel: one port (no MULTIPORT), so the
//! guest sees a plain `hvc0`. What the host [`ConsoleHandle::send`]s lands in the guest's
//! receive buffers (held until the guest posts some); what the guest transmits arrives
//! at [`ConsoleHandle::recv_timeout`]. Malformed chains are returned unused and counted.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use virtio_queue::{Queue, QueueT};

use vm_memory::GuestMemoryMmap;

use super::{IrqLine, VirtioDevice, VIRTIO_F_VERSION_1};

const RX: usize = 0;
const TX: usize = 1;
/// Host bytes held while the guest has no receive buffer posted.
const MAX_PENDING: usize = 1 << 20;
/// Largest single transmit chain accepted.
const MAX_CHAIN: usize = 1 << 20;
/// Guest output held for the host before further output is dropped (and counted).
const MAX_RECEIVED: usize = 16 << 20;

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    irq: IrqLine,
}

#[derive(Default)]
struct Shared {
    active: Mutex<Option<Active>>,
    /// Host → guest bytes not yet in a guest buffer.
    pending: Mutex<VecDeque<u8>>,
    /// Guest → host chunks not yet taken.
    received: Mutex<VecDeque<Vec<u8>>>,
    arrived: Condvar,
    bad_chains: AtomicU64,
    /// Guest bytes dropped because the host did not take them.
    dropped: AtomicU64,
    /// While a snapshot is taken: host bytes wait in `pending`.
    quiesced: std::sync::atomic::AtomicBool,
}

/// The host's end of the channel.
#[derive(Clone)]
pub struct ConsoleHandle(Arc<Shared>);

impl ConsoleHandle {
    /// Queues bytes for the guest; false if more than 1 MiB is already waiting.
    pub fn send(&self, bytes: &[u8]) -> bool {
        {
            let mut p = self.0.pending.lock().unwrap();
            if p.len() + bytes.len() > MAX_PENDING {
                return false;
            }
            p.extend(bytes);
        }
        if let Some(a) = self.0.active.lock().unwrap().as_mut() {
            if !self.0.quiesced.load(Relaxed) {
                fill_rx(a, &self.0);
            }
        }
        true
    }

    /// The next chunk the guest wrote, waiting up to `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Vec<u8>> {
        let q = self.0.received.lock().unwrap();
        let (mut q, _) = self
            .0
            .arrived
            .wait_timeout_while(q, timeout, |q| q.is_empty())
            .unwrap();
        q.pop_front()
    }

    pub fn bad_chains(&self) -> u64 {
        self.0.bad_chains.load(Relaxed)
    }
}

pub struct ConsoleDevice {
    shared: Arc<Shared>,
}

impl ConsoleDevice {
    pub fn new() -> (ConsoleDevice, ConsoleHandle) {
        let shared = Arc::new(Shared::default());
        (
            ConsoleDevice {
                shared: shared.clone(),
            },
            ConsoleHandle(shared),
        )
    }
}

impl Drop for ConsoleDevice {
    fn drop(&mut self) {
        // A host handle may outlive the device: it must not reach guest memory then.
        *self
            .shared
            .active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }
}

impl VirtioDevice for ConsoleDevice {
    fn device_type(&self) -> u32 {
        3
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[64, 64]
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // No SIZE, MULTIPORT or EMERG_WRITE: the config space carries nothing.
        data.fill(0);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: IrqLine,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(queues.len() == 2, "virtio-console needs 2 queues");
        let mut active = self.shared.active.lock().unwrap();
        *active = Some(Active { mem, queues, irq });
        fill_rx(active.as_mut().unwrap(), &self.shared);
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        let mut guard = self.shared.active.lock().unwrap();
        let Some(a) = guard.as_mut() else { return };
        match index as usize {
            RX => fill_rx(a, &self.shared),
            TX => drain_tx(a, &self.shared),
            _ => {}
        }
    }

    fn reset(&mut self) {
        *self.shared.active.lock().unwrap() = None;
    }

    /// Host sends only queue their bytes; taking the lock waits out a copy under way.
    fn quiesce(&mut self) {
        let _active = self
            .shared
            .active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.shared.quiesced.store(true, Relaxed);
    }

    fn resume(&mut self) {
        let mut active = self
            .shared
            .active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.shared.quiesced.store(false, Relaxed);
        if let Some(a) = active.as_mut() {
            fill_rx(a, &self.shared);
        }
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.shared
            .active
            .lock()
            .unwrap()
            .as_ref()
            .map(|a| a.queues.iter().map(|q| q.state()).collect())
            .unwrap_or_default()
    }
}

/// Copies pending host bytes into the receive buffers the guest posted.
fn fill_rx(a: &mut Active, shared: &Shared) {
    let mut pending = shared.pending.lock().unwrap();
    let mut returned = false;
    while !pending.is_empty() {
        let Some(chain) = a.queues[RX].pop_descriptor_chain(&a.mem) else {
            break;
        };
        let head = chain.head_index();
        let written = match chain.writer(&a.mem) {
            Ok(mut w) => {
                let n = w.available_bytes().min(pending.len());
                let bytes: Vec<u8> = pending.drain(..n).collect();
                match w.write_all(&bytes) {
                    Ok(()) => n as u32,
                    Err(_) => {
                        shared.bad_chains.fetch_add(1, Relaxed);
                        0
                    }
                }
            }
            Err(_) => {
                shared.bad_chains.fetch_add(1, Relaxed);
                0
            }
        };
        let _ = a.queues[RX].add_used(&a.mem, head, written);
        returned = true;
    }
    if returned {
        a.irq.signal_used();
    }
}

/// Takes everything the guest transmitted.
fn drain_tx(a: &mut Active, shared: &Shared) {
    let mut returned = false;
    let mut budget = a.queues[TX].size();
    while budget > 0 {
        let Some(chain) = a.queues[TX].pop_descriptor_chain(&a.mem) else {
            break;
        };
        budget -= 1;
        let head = chain.head_index();
        let mut buf = Vec::new();
        let ok = match chain.reader(&a.mem) {
            Ok(mut r) if r.available_bytes() <= MAX_CHAIN => r.read_to_end(&mut buf).is_ok(),
            _ => false,
        };
        if ok && !buf.is_empty() {
            let mut received = shared.received.lock().unwrap();
            let held: usize = received.iter().map(Vec::len).sum();
            if held + buf.len() > MAX_RECEIVED {
                shared.dropped.fetch_add(buf.len() as u64, Relaxed);
            } else {
                received.push_back(buf);
                shared.arrived.notify_all();
            }
        } else if !ok {
            shared.bad_chains.fetch_add(1, Relaxed);
        }
        let _ = a.queues[TX].add_used(&a.mem, head, 0);
        returned = true;
    }
    if returned {
        a.irq.signal_used();
    }
}
