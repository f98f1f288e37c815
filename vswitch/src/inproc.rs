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

struct Queue {
    frames: Mutex<VecDeque<Vec<u8>>>,
    ready: Condvar,
    capacity: usize,
    name: String,
}

impl PortSink for Queue {
    fn transmit(&self, frame: &[u8]) -> io::Result<()> {
        let mut q = self.frames.lock().unwrap();
        if q.len() >= self.capacity {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "in-process port queue full",
            ));
        }
        q.push_back(frame.to_vec());
        drop(q);
        self.ready.notify_one();
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
            frames: Mutex::new(VecDeque::new()),
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

    pub fn try_recv(&self) -> Option<Vec<u8>> {
        self.queue.frames.lock().unwrap().pop_front()
    }

    /// Takes every queued frame at once (one lock for a batch).
    pub fn drain(&self, into: &mut Vec<Vec<u8>>) {
        into.extend(self.queue.frames.lock().unwrap().drain(..));
    }

    pub fn recv_timeout(&self, timeout: Duration) -> Option<Vec<u8>> {
        let q = self.queue.frames.lock().unwrap();
        let (mut q, _) = self
            .queue
            .ready
            .wait_timeout_while(q, timeout, |q| q.is_empty())
            .unwrap();
        q.pop_front()
    }
}

impl Drop for InProcessPort {
    fn drop(&mut self) {
        self.switch.remove_port(self.id);
    }
}
