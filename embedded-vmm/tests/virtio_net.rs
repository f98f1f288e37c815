//! The embedded VMM's virtio-net device on the virtio-mmio transport, with the test as
//! the guest driver: registers written as a driver would, descriptors and rings written
//! into guest memory. Frames cross to another port of a real `vswitch` and back; bad
//! register sequences and malformed descriptor chains are refused, counted, and the
//! device keeps working. No vCPU is needed, so this runs wherever the crate builds.

use std::sync::Arc;
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};

mod support;

use embedded_vmm::memory::GuestRam;
use embedded_vmm::virtio::mmio::MmioTransport;
use embedded_vmm::virtio::net::NetDevice;
use embedded_vmm::virtio::{
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
};
use support::{Driver, DESC_F_NEXT, DESC_F_WRITE};
use vswitch::{InProcessPort, Switch, SwitchConfig, VlanMode};

const VM_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xbb];

fn frame(dst: [u8; 6], src: [u8; 6], fill: u8) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&[fill; 46]);
    f
}

/// A switch with a peer port, and a NIC the test drives up to DRIVER_OK.
fn setup() -> (
    Driver,
    InProcessPort,
    Arc<embedded_vmm::virtio::net::NetCounters>,
) {
    let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
    let switch = Switch::new(SwitchConfig::default());
    let peer = InProcessPort::attach(&switch, "peer", VlanMode::default());
    let nic = NetDevice::new(&switch, "vm0", VM_MAC, VlanMode::default());
    let counters = nic.counters();
    let t = MmioTransport::new(Box::new(nic), ram.memory().clone(), None);
    let mut d = Driver::init(ram, t, 1, (1 << 32) | (1 << 5), 2);
    let mut mac = [0u8; 6];
    d.t.read(0x100, &mut mac);
    assert_eq!(mac, VM_MAC);
    (d, peer, counters)
}

#[test]
fn frames_cross_between_the_guest_and_a_switch_port() {
    let (mut d, peer, counters) = setup();
    // Transmit: header + frame in one readable descriptor.
    let out = frame(PEER_MAC, VM_MAC, 0x11);
    let mut buf = vec![0u8; 12];
    buf.extend_from_slice(&out);
    d.ram.write_slice(&buf, GuestAddress(0x100000)).unwrap();
    d.desc(1, 0, 0x100000, buf.len() as u32, 0, 0);
    d.post(1, 0);
    assert_eq!(peer.recv_timeout(Duration::from_secs(5)), Some(out));
    d.wait_used(1, 1);
    assert_ne!(d.r(0x060) & 1, 0, "used-buffer interrupt raised");
    d.w(0x064, 1);
    assert_eq!(d.r(0x060) & 1, 0, "interrupt acknowledged");

    // Receive: the peer answers; the frame lands in the posted buffer after a header.
    d.desc(0, 0, 0x110000, 2048, DESC_F_WRITE, 0);
    d.post(0, 0);
    let back = frame(VM_MAC, PEER_MAC, 0x22);
    peer.send(&back);
    d.wait_used(0, 1);
    let (id, len) = d.used_elem(0, 0);
    assert_eq!((id, len as usize), (0, 12 + back.len()));
    let mut got = vec![0u8; len as usize];
    d.ram.read_slice(&mut got, GuestAddress(0x110000)).unwrap();
    assert_eq!(&got[12..], &back[..]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(
        counters
            .tx_frames
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        counters
            .rx_frames
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

/// A full ring made available before one notify reaches the switch as one batch: every
/// frame, in order, with a malformed chain among them returned and counted, not sent.
#[test]
fn a_ring_of_frames_sent_in_one_notify_arrives_whole_and_in_order() {
    let (mut d, peer, counters) = setup();
    let mut sent = Vec::new();
    for i in 0..support::QSIZE {
        let at = 0x100000 + 0x1000 * u64::from(i);
        if i == 7 {
            // Shorter than a header and an Ethernet header: malformed.
            d.desc(1, i, at, 8, 0, 0);
        } else {
            let f = frame(PEER_MAC, VM_MAC, i as u8);
            let mut buf = vec![0u8; 12];
            buf.extend_from_slice(&f);
            d.ram.write_slice(&buf, GuestAddress(at)).unwrap();
            d.desc(1, i, at, buf.len() as u32, 0, 0);
            sent.push(f);
        }
        d.post_quietly(1, i);
    }
    d.w(0x50, 1);
    d.wait_used(1, support::QSIZE);
    let mut got = Vec::new();
    while got.len() < sent.len() {
        match peer.recv_timeout(Duration::from_secs(5)) {
            Some(f) => got.push(f),
            None => break,
        }
    }
    assert_eq!(got, sent);
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(load(&counters.tx_frames), u64::from(support::QSIZE) - 1);
    assert_eq!(load(&counters.bad_chains), 1);
}

#[test]
fn a_live_nic_is_saved_and_restored_where_its_queues_were() {
    let (mut d, peer, _) = setup();
    let send = |d: &mut Driver, head: u16, fill: u8| {
        let out = frame(PEER_MAC, VM_MAC, fill);
        let mut buf = vec![0u8; 12];
        buf.extend_from_slice(&out);
        let at = 0x100000 + 0x1000 * u64::from(head);
        d.ram.write_slice(&buf, GuestAddress(at)).unwrap();
        d.desc(1, head, at, buf.len() as u32, 0, 0);
        d.post(1, head);
        out
    };
    let first = send(&mut d, 0, 1);
    assert_eq!(peer.recv_timeout(Duration::from_secs(5)), Some(first));
    d.wait_used(1, 1);

    // Snapshot the transport, throw the device away, restore into a new one (as a VM
    // restored from a snapshot would get): the driver carries on at the next index.
    let state = d.t.save();
    assert_ne!(state.status & embedded_vmm::virtio::STATUS_DRIVER_OK, 0);
    assert_eq!(state.queues[1].next_avail, 1);
    let switch = Switch::new(SwitchConfig::default());
    let peer2 = InProcessPort::attach(&switch, "peer2", VlanMode::default());
    let nic = NetDevice::new(&switch, "vm0-restored", VM_MAC, VlanMode::default());
    d.t = MmioTransport::restore(Box::new(nic), d.ram.memory().clone(), None, &state).unwrap();
    assert_eq!(
        d.t.save(),
        state,
        "the restored transport differs from the saved one"
    );
    let second = send(&mut d, 1, 2);
    assert_eq!(peer2.recv_timeout(Duration::from_secs(5)), Some(second));
    d.wait_used(1, 2);
    d.desc(0, 0, 0x180000, 2048, DESC_F_WRITE, 0);
    d.post(0, 0);
    peer2.send(&frame(VM_MAC, PEER_MAC, 3));
    d.wait_used(0, 1);

    // A state for another kind of device is refused.
    let mut wrong = state.clone();
    wrong.device_type = 26;
    let nic = NetDevice::new(&switch, "vm0-wrong", VM_MAC, VlanMode::default());
    assert!(MmioTransport::restore(Box::new(nic), d.ram.memory().clone(), None, &wrong).is_err());
}

#[test]
fn malformed_chains_are_returned_and_counted_and_the_nic_keeps_working() {
    let (mut d, peer, counters) = setup();
    let bad = |c: &embedded_vmm::virtio::net::NetCounters| {
        c.bad_chains.load(std::sync::atomic::Ordering::Relaxed)
    };
    // A buffer outside guest memory.
    d.desc(1, 0, 0xffff_0000, 64, 0, 0);
    d.post(1, 0);
    d.wait_used(1, 1);
    assert_eq!(bad(&counters), 1);
    // A chain that loops on itself.
    d.desc(1, 1, 0x100000, 64, DESC_F_NEXT, 1);
    d.post(1, 1);
    d.wait_used(1, 2);
    assert_eq!(bad(&counters), 2);
    // Shorter than a header and an Ethernet header.
    d.desc(1, 2, 0x100000, 8, 0, 0);
    d.post(1, 2);
    d.wait_used(1, 3);
    assert_eq!(bad(&counters), 3);
    // A receive buffer too small for the frame.
    d.desc(0, 0, 0x110000, 20, DESC_F_WRITE, 0);
    d.post(0, 0);
    peer.send(&frame(VM_MAC, PEER_MAC, 0x33));
    d.wait_used(0, 1);
    assert_eq!(d.used_elem(0, 0).1, 0);
    assert_eq!(bad(&counters), 4);
    assert!(
        peer.try_recv().is_none(),
        "a malformed chain put a frame on the wire"
    );

    // Still working.
    let out = frame(PEER_MAC, VM_MAC, 0x44);
    let mut buf = vec![0u8; 12];
    buf.extend_from_slice(&out);
    d.ram.write_slice(&buf, GuestAddress(0x100000)).unwrap();
    d.desc(1, 3, 0x100000, buf.len() as u32, 0, 0);
    d.post(1, 3);
    assert_eq!(peer.recv_timeout(Duration::from_secs(5)), Some(out));
}

#[test]
fn a_live_device_cannot_be_activated_twice_and_reports_no_shared_memory() {
    let (mut d, peer, _) = setup();
    let before = d.t.bad_accesses();
    // Take DRIVER_OK back without a reset, as a guest re-activating the NIC would.
    d.w(
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    assert_eq!(d.t.bad_accesses(), before + 1);
    assert_ne!(
        d.r(0x070) & STATUS_DRIVER_OK,
        0,
        "the device left DRIVER_OK"
    );
    // No shared memory region: length ~0 (a zero length would announce one at 0).
    d.w(0x0ac, 0);
    assert_eq!(d.r(0x0b0), u32::MAX);
    assert_eq!(d.r(0x0b4), u32::MAX);
    // Still working.
    let out = frame(PEER_MAC, VM_MAC, 9);
    let mut buf = vec![0u8; 12];
    buf.extend_from_slice(&out);
    d.ram.write_slice(&buf, GuestAddress(0x100000)).unwrap();
    d.desc(1, 0, 0x100000, buf.len() as u32, 0, 0);
    d.post(1, 0);
    assert_eq!(peer.recv_timeout(Duration::from_secs(5)), Some(out));
}

/// A driver that writes a wild avail index and then publishes its next index properly
/// loses nothing: the device takes no chain from the broken ring, stays live, and serves
/// the next valid index (on transmit and on receive) as if the wild one had never been
/// written; a frame that arrived meanwhile waits for the receive buffer.
#[test]
fn a_wild_avail_index_does_not_take_the_device_down() {
    let (mut d, peer, counters) = setup();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    // The driver claims 1000 new buffers in queues of 16, on both queues.
    for q in [0, 1] {
        let avail = d.queues[q].avail;
        d.ram
            .write_slice(&1000u16.to_le_bytes(), GuestAddress(avail + 2))
            .unwrap();
        d.w(0x50, q as u32);
    }
    // A frame for the guest arrives meanwhile: there is no usable receive buffer.
    let inbound = frame(VM_MAC, PEER_MAC, 0x66);
    peer.send(&inbound);
    assert_eq!(
        peer.recv_timeout(Duration::from_millis(300)),
        None,
        "a frame went out of a broken ring"
    );
    assert_eq!((d.used_idx(0), d.used_idx(1)), (0, 0), "a chain was used");
    assert_eq!(load(&counters.tx_frames) + load(&counters.rx_frames), 0);
    // The device did not give up on the driver: still live, not asking for a reset.
    let status = d.r(0x070);
    assert_ne!(status & STATUS_DRIVER_OK, 0, "{status:#x}");
    assert_eq!(
        status & (STATUS_NEEDS_RESET | STATUS_FAILED),
        0,
        "{status:#x}"
    );

    // The driver publishes its next index properly (slot 0, index 1), as it would after
    // noticing the bad write: the frame reaches the peer.
    let out = frame(PEER_MAC, VM_MAC, 0x55);
    let mut buf = vec![0u8; 12];
    buf.extend_from_slice(&out);
    d.ram.write_slice(&buf, GuestAddress(0x100000)).unwrap();
    d.desc(1, 0, 0x100000, buf.len() as u32, 0, 0);
    d.post(1, 0);
    assert_eq!(peer.recv_timeout(Duration::from_secs(5)), Some(out));
    d.wait_used(1, 1);
    assert_eq!(d.used_elem(1, 0), (0, 0));
    // And a receive buffer posted the same way gets the frame that waited.
    d.desc(0, 0, 0x110000, 2048, DESC_F_WRITE, 0);
    d.post(0, 0);
    d.wait_used(0, 1);
    let (id, len) = d.used_elem(0, 0);
    assert_eq!((id, len as usize), (0, 12 + inbound.len()));
    let mut got = vec![0u8; len as usize];
    d.ram.read_slice(&mut got, GuestAddress(0x110000)).unwrap();
    assert_eq!(&got[12..], &inbound[..]);
    assert_eq!(
        (load(&counters.tx_frames), load(&counters.rx_frames)),
        (1, 1)
    );
    // A wild index is not a descriptor chain: the device took none, so it returned none
    // as bad. (It counts nothing for the broken index itself: virtio-queue's
    // pop_descriptor_chain only logs it.)
    assert_eq!(load(&counters.bad_chains), 0);
}

#[test]
fn bad_register_sequences_are_refused_and_counted() {
    let ram = Arc::new(GuestRam::new(1 << 20).unwrap());
    let switch = Switch::new(SwitchConfig::default());
    let nic = NetDevice::new(&switch, "vm0", VM_MAC, VlanMode::default());
    let mut t = MmioTransport::new(Box::new(nic), ram.memory().clone(), None);
    let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
    let r = |t: &mut MmioTransport, off: u64| {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    };
    // A notify before the device is live, a 16-bit register read, an unknown register.
    w(&mut t, 0x50, 0);
    let mut two = [0u8; 2];
    t.read(0x000, &mut two);
    w(&mut t, 0x0c8, 1);
    assert_eq!(t.bad_accesses(), 3);
    // Features the device does not offer: FEATURES_OK does not stick.
    w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    w(&mut t, 0x24, 1);
    w(&mut t, 0x20, 1 | (1 << 8));
    w(
        &mut t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    assert_eq!(r(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
    // DRIVER_OK without FEATURES_OK: the device says FAILED.
    w(
        &mut t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
    );
    assert_ne!(r(&mut t, 0x70) & STATUS_FAILED, 0);
    // A queue size that is not a power of two; a queue that does not exist.
    w(&mut t, 0x70, 0);
    w(&mut t, 0x30, 0);
    w(&mut t, 0x38, 3);
    w(&mut t, 0x30, 7);
    w(&mut t, 0x38, 16);
    assert!(t.bad_accesses() >= 7, "{}", t.bad_accesses());
    // After a reset the device is discoverable as before.
    assert_eq!(r(&mut t, 0x008), 1);
}

/// While a snapshot is taken the NIC writes nothing into guest memory: frames that arrive
/// wait (none lost), and are delivered when it resumes.
#[test]
fn a_quiesced_nic_holds_arriving_frames_until_it_resumes() {
    let (mut d, peer, _) = setup();
    peer.send(&frame(VM_MAC, PEER_MAC, 0x01)); // teach the switch where the peer is
    d.desc(0, 0, 0x110000, 2048, DESC_F_WRITE, 0);
    d.desc(0, 1, 0x111000, 2048, DESC_F_WRITE, 0);
    d.post(0, 0);
    d.wait_used(0, 1);
    d.t.quiesce();
    let ring_before = d.t.save();
    d.post(0, 1);
    let held = frame(VM_MAC, PEER_MAC, 0x33);
    peer.send(&held);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.used_idx(0), 1, "nothing delivered while quiesced");
    assert_eq!(d.t.save().queues, ring_before.queues);
    d.t.resume();
    d.wait_used(0, 2);
    let (_, len) = d.used_elem(0, 1);
    let mut got = vec![0u8; len as usize];
    d.ram.read_slice(&mut got, GuestAddress(0x111000)).unwrap();
    assert_eq!(&got[12..], &held[..]);
}
