//! The command channel (virtio-console, one port) with the test as the guest driver:
//! host bytes wait for a receive buffer and land in it, guest writes reach the host, a
//! malformed chain is counted and the channel keeps working.

mod support;

use std::sync::Arc;
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};

use embedded_vmm::memory::GuestRam;
use embedded_vmm::virtio::console::ConsoleDevice;
use embedded_vmm::virtio::mmio::MmioTransport;
use support::{Driver, DESC_F_WRITE};

#[test]
fn bytes_cross_the_command_channel_both_ways() {
    let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
    let (dev, host) = ConsoleDevice::new();
    let t = MmioTransport::new(Box::new(dev), ram.memory().clone(), None);
    let mut d = Driver::init(ram, t, 3, 1 << 32, 2);

    // The host speaks first: held until the guest posts a buffer.
    assert!(host.send(b"run: make check\n"));
    d.desc(0, 0, 0x100000, 64, DESC_F_WRITE, 0);
    d.post(0, 0);
    d.wait_used(0, 1);
    let (id, len) = d.used_elem(0, 0);
    assert_eq!((id, len), (0, 16));
    let mut got = vec![0u8; 16];
    d.ram.read_slice(&mut got, GuestAddress(0x100000)).unwrap();
    assert_eq!(got, b"run: make check\n");

    // More than one buffer holds: the rest waits for the next buffer.
    assert!(host.send(&[b'x'; 100]));
    d.desc(0, 1, 0x110000, 64, DESC_F_WRITE, 0);
    d.post(0, 1);
    d.wait_used(0, 2);
    assert_eq!(d.used_elem(0, 1).1, 64);
    d.desc(0, 2, 0x120000, 64, DESC_F_WRITE, 0);
    d.post(0, 2);
    d.wait_used(0, 3);
    assert_eq!(d.used_elem(0, 2).1, 36);

    // The guest answers.
    d.ram
        .write_slice(b"vmbuild-exit=0\n", GuestAddress(0x200000))
        .unwrap();
    d.desc(1, 0, 0x200000, 15, 0, 0);
    d.post(1, 0);
    assert_eq!(
        host.recv_timeout(Duration::from_secs(5)).as_deref(),
        Some(&b"vmbuild-exit=0\n"[..])
    );

    // A transmit buffer outside guest memory: counted, nothing delivered, still working.
    d.desc(1, 1, 0xffff_0000, 16, 0, 0);
    d.post(1, 1);
    d.wait_used(1, 2);
    assert_eq!(host.bad_chains(), 1);
    assert!(host.recv_timeout(Duration::from_millis(50)).is_none());
    d.ram.write_slice(b"ok", GuestAddress(0x200000)).unwrap();
    d.desc(1, 2, 0x200000, 2, 0, 0);
    d.post(1, 2);
    assert_eq!(
        host.recv_timeout(Duration::from_secs(5)).as_deref(),
        Some(&b"ok"[..])
    );
}
