//! In-process ports: a typed endpoint for code in this process (the embedded VMM's NICs,
//! test endpoints). Sending is a function call into the switch; receiving takes frames
//! from a bounded queue, so a slow reader loses frames (counted) instead of memory.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::port::{PortId, PortSink, VlanMode};
use crate::switch::Switch;

pub const DEFAULT_QUEUE_FRAMES: usize = 4096;

/// Larger buffers (GSO frames) are freed rather than kept for reuse.
const MAX_SPARE_BUFFER: usize = 2048;

struct Queue {
    frames: Mutex<Frames>,
    ready: Condvar,
    capacity: usize,
    name: String,
}

/// The queued frames, and how many readers sleep waiting for one.
#[derive(Default)]
struct Frames {
    queue: VecDeque<Vec<u8>>,
    /// Readers in [`InProcessPort::recv_timeout`]. Waking a condition variable is a futex
    /// syscall even when nobody waits, which cost more than the rest of forwarding a
    /// frame; a sender wakes only when this says a reader sleeps (both under the lock, so
    /// no wake-up is lost).
    sleepers: usize,
    /// Buffers of frames already read, handed back by [`InProcessPort::recycle`]: a reader
    /// that recycles saves the switch an allocation and a free per frame.
    spare: Vec<Vec<u8>>,
}

impl PortSink for Queue {
    fn transmit(&self, frame: &[u8]) -> io::Result<()> {
        let mut q = self.frames.lock().unwrap();
        if q.queue.len() >= self.capacity {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "in-process port queue full",
            ));
        }
        let mut buf = q.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(frame);
        q.queue.push_back(buf);
        let wake = q.sleepers > 0;
        drop(q);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "in-process"
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

/// An endpoint attached to the switch. Dropping it removes the port.
pub struct InProcessPort {
    switch: Arc<Switch>,
    id: PortId,
    queue: Arc<Queue>,
}

impl InProcessPort {
    pub fn attach(switch: &Arc<Switch>, name: &str, vlan: VlanMode) -> InProcessPort {
        Self::attach_with_capacity(switch, name, vlan, DEFAULT_QUEUE_FRAMES)
    }

    pub fn attach_with_capacity(
        switch: &Arc<Switch>,
        name: &str,
        vlan: VlanMode,
        capacity: usize,
    ) -> InProcessPort {
        let queue = Arc::new(Queue {
            frames: Mutex::default(),
            ready: Condvar::new(),
            capacity,
            name: name.to_owned(),
        });
        let id = switch.add_port(queue.clone(), vlan);
        InProcessPort {
            switch: switch.clone(),
            id,
            queue,
        }
    }

    pub fn id(&self) -> PortId {
        self.id
    }

    /// Puts a frame on the wire: forwarded before this returns.
    pub fn send(&self, frame: &[u8]) {
        self.switch.ingress(self.id, frame);
    }

    /// Puts frames on the wire in this order, forwarded in batches (see
    /// [`Switch::ingress_batch`]) before this returns.
    pub fn send_batch<F: AsRef<[u8]>>(&self, frames: &[F]) {
        self.switch.ingress_batch(self.id, frames);
    }

    pub fn try_recv(&self) -> Option<Vec<u8>> {
        self.queue.frames.lock().unwrap().queue.pop_front()
    }

    /// Takes every queued frame at once (one lock for a batch).
    pub fn drain(&self, into: &mut Vec<Vec<u8>>) {
        into.extend(self.queue.frames.lock().unwrap().queue.drain(..));
    }

    /// Hands back frames this port received and the caller is done with (emptying
    /// `frames`), for the switch to fill again; at most a queue's worth is kept.
    pub fn recycle(&self, frames: &mut Vec<Vec<u8>>) {
        let mut q = self.queue.frames.lock().unwrap();
        let room = self.queue.capacity.saturating_sub(q.spare.len());
        q.spare.extend(
            frames
                .drain(..)
                .filter(|f| f.capacity() <= MAX_SPARE_BUFFER)
                .take(room),
        );
    }

    pub fn recv_timeout(&self, timeout: Duration) -> Option<Vec<u8>> {
        let mut q = self.queue.frames.lock().unwrap();
        if let Some(frame) = q.queue.pop_front() {
            return Some(frame);
        }
        q.sleepers += 1;
        let (mut q, _) = self
            .queue
            .ready
            .wait_timeout_while(q, timeout, |q| q.queue.is_empty())
            .unwrap();
        q.sleepers -= 1;
        q.queue.pop_front()
    }
}

impl Drop for InProcessPort {
    fn drop(&mut self) {
        self.switch.remove_port(self.id);
    }
}
