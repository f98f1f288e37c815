//! The guest driver side of a virtio-mmio device, for device tests: register accesses as
//! a driver makes them, descriptors and rings written into guest memory.

#![allow(dead_code)] // each test binary uses its own part

use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

use embedded_vmm::memory::GuestRam;
use embedded_vmm::virtio::mmio::MmioTransport;
use embedded_vmm::virtio::{
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};

pub const QSIZE: u16 = 16;
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;

/// The test's side of one queue: where its rings are and what it has posted.
pub struct DriverQueue {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_avail: u16,
}

pub struct Driver {
    pub ram: Arc<GuestRam>,
    pub t: MmioTransport,
    pub queues: Vec<DriverQueue>,
}

impl Driver {
    pub fn r(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    pub fn w(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    pub fn desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.queues[q].desc + 16 * u64::from(i);
        let mut d = Vec::new();
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        self.ram.write_slice(&d, GuestAddress(at)).unwrap();
    }

    /// Makes descriptor `head` available and notifies the queue.
    pub fn post(&mut self, q: usize, head: u16) {
        self.post_quietly(q, head);
        self.w(0x50, q as u32);
    }

    /// Makes `head` available without notifying the device (a driver filling the ring
    /// before one notify).
    pub fn post_quietly(&mut self, q: usize, head: u16) {
        let dq = &mut self.queues[q];
        let slot = dq.avail + 4 + 2 * u64::from(dq.next_avail % QSIZE);
        self.ram
            .write_slice(&head.to_le_bytes(), GuestAddress(slot))
            .unwrap();
        dq.next_avail = dq.next_avail.wrapping_add(1);
        let idx = dq.next_avail;
        let avail = dq.avail;
        self.ram
            .write_slice(&idx.to_le_bytes(), GuestAddress(avail + 2))
            .unwrap();
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        let mut b = [0u8; 2];
        self.ram
            .read_slice(&mut b, GuestAddress(self.queues[q].used + 2))
            .unwrap();
        u16::from_le_bytes(b)
    }

    /// (id, len) of used element `n`.
    pub fn used_elem(&self, q: usize, n: u16) -> (u32, u32) {
        let at = self.queues[q].used + 4 + 8 * u64::from(n % QSIZE);
        (
            self.ram.read_obj::<u32>(GuestAddress(at)).unwrap(),
            self.ram.read_obj::<u32>(GuestAddress(at + 4)).unwrap(),
        )
    }

    pub fn wait_used(&self, q: usize, want: u16) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.used_idx(q) != want {
            assert!(
                Instant::now() < deadline,
                "queue {q} never reached used idx {want}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Driver {
    /// Discovers the device, negotiates `features` and sets up `nqueues` queues of
    /// QSIZE at 64 KiB, 128 KiB, ... up to DRIVER_OK.
    pub fn init(
        ram: Arc<GuestRam>,
        t: MmioTransport,
        device_id: u32,
        features: u64,
        nqueues: usize,
    ) -> Driver {
        let queues = (0..nqueues as u64)
            .map(|q| {
                let base = 0x10000 * (q + 1);
                DriverQueue {
                    desc: base,
                    avail: base + 0x1000,
                    used: base + 0x2000,
                    next_avail: 0,
                }
            })
            .collect();
        let mut d = Driver { ram, t, queues };
        assert_eq!(d.r(0x000), 0x7472_6976, "magic");
        assert_eq!(d.r(0x004), 2, "version");
        assert_eq!(d.r(0x008), device_id, "device id");
        d.w(0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        for sel in 0..2u32 {
            d.w(0x014, sel);
            let offered = d.r(0x010);
            let want = (features >> (32 * sel)) as u32;
            assert_eq!(offered & want, want, "feature word {sel} not offered");
            d.w(0x024, sel);
            d.w(0x020, want);
        }
        d.w(
            0x070,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(d.r(0x070) & STATUS_FEATURES_OK, 0);
        for q in 0..nqueues {
            d.w(0x030, q as u32);
            assert!(d.r(0x034) >= u32::from(QSIZE));
            d.w(0x038, u32::from(QSIZE));
            let (desc, avail, used) = (d.queues[q].desc, d.queues[q].avail, d.queues[q].used);
            d.w(0x080, desc as u32);
            d.w(0x084, 0);
            d.w(0x090, avail as u32);
            d.w(0x094, 0);
            d.w(0x0a0, used as u32);
            d.w(0x0a4, 0);
            d.w(0x044, 1);
        }
        d.w(
            0x070,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_ne!(d.r(0x070) & STATUS_DRIVER_OK, 0);
        d
    }
}
