//! `switch`: Ethernet frames into a switch with three in-process ports: port A is an
//! access port of VLAN 1, B a trunk with native VLAN 1 carrying every VLAN, C a trunk
//! carrying VLANs 1 and 10 only (tagged). The MAC table holds 8 entries, so a few
//! frames already evict and move addresses.
//!
//! Input: records `ctl[1] len[2] bytes[len]`. `ctl` bits 0-1: the ingress port (3 is
//! A); bit 2: the first 12 bytes are a virtio-net header (GSO, partial checksums), the
//! rest the frame, which goes through `ingress_offloaded` as a tap's frames do; bit 3:
//! age the MAC table first.
//!
//! Checked after every frame: the ingress port counted it received; a frame the switch
//! cannot take (runt, oversize, malformed, bad source, filtered VLAN) is counted as
//! dropped on the ingress port and reaches no port; each egress port received exactly
//! the frames its counters say it transmitted, each a valid frame, untagged on an
//! access port and on a trunk's native VLAN, tagged with a VLAN the trunk carries
//! otherwise. At the end: a broadcast from A reaches B untagged and C tagged with VLAN
//! 1, and no thread panicked.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use vswitch::frame::{self, DropReason, ETHERTYPE_VLAN};
use vswitch::offload::{VnetHdr, VNET_HDR_LEN};
use vswitch::port::CountersSnapshot;
use vswitch::{InProcessPort, Switch, SwitchConfig, VlanMode};

use crate::common::Input;

/// `ctl` bit: the record starts with a virtio-net header.
pub const WITH_VNET_HDR: u8 = 4;
/// `ctl` bit: age the MAC table before this frame.
pub const AGE: u8 = 8;

fn modes() -> [VlanMode; 3] {
    [
        VlanMode::Access { vlan: 1 },
        VlanMode::Trunk {
            native: Some(1),
            allowed: None,
        },
        VlanMode::Trunk {
            native: None,
            allowed: Some(BTreeSet::from([1, 10])),
        },
    ]
}

fn dropped(c: &CountersSnapshot) -> u64 {
    c.drops.values().sum()
}

pub fn run(data: &[u8]) {
    crate::common::harness_thread();
    crate::common::env();
    let switch = Switch::new(SwitchConfig {
        mac_table_size: 8,
        aging: Duration::from_millis(1),
        ..SwitchConfig::default()
    });
    let modes = modes();
    let ports: Vec<InProcessPort> = modes
        .iter()
        .enumerate()
        .map(|(i, m)| InProcessPort::attach_with_capacity(&switch, &format!("p{i}"), m.clone(), 64))
        .collect();
    let mut input = Input::new(data);
    while !input.is_empty() {
        let ctl = input.u8();
        let bytes = input.record();
        let ingress = usize::from(ctl & 3) % 3;
        if ctl & AGE != 0 {
            std::thread::sleep(Duration::from_millis(1));
            switch.age();
        }
        let (hdr, frame) = if ctl & WITH_VNET_HDR != 0 && bytes.len() >= VNET_HDR_LEN {
            (VnetHdr::parse(bytes), &bytes[VNET_HDR_LEN..])
        } else {
            (None, bytes)
        };
        one_frame(&switch, &ports, &modes, ingress, hdr.as_ref(), frame);
    }
    still_forwards(&switch, &ports);
    crate::common::check_no_panic_elsewhere();
}

fn one_frame(
    switch: &Arc<Switch>,
    ports: &[InProcessPort],
    modes: &[VlanMode],
    ingress: usize,
    hdr: Option<&VnetHdr>,
    frame: &[u8],
) {
    let before: Vec<CountersSnapshot> = ports
        .iter()
        .map(|p| switch.counters(p.id()).unwrap())
        .collect();
    match hdr {
        Some(h) => switch.ingress_offloaded(ports[ingress].id(), h, frame),
        None => ports[ingress].send(frame),
    }
    let after: Vec<CountersSnapshot> = ports
        .iter()
        .map(|p| switch.counters(p.id()).unwrap())
        .collect();
    assert_eq!(
        after[ingress].rx_frames,
        before[ingress].rx_frames + 1,
        "the ingress port did not count the frame"
    );
    let gso = hdr.is_some_and(|h| h.is_gso());
    let max = if gso {
        vswitch::offload::MAX_GSO_FRAME
    } else {
        switch.config().max_frame
    };
    // What the switch must refuse at ingress, by its own rules.
    let refused = match frame::inspect(frame, max) {
        Err(why) => Some(why),
        Ok(info) => modes[ingress]
            .classify(info.tag)
            .is_none()
            .then_some(DropReason::VlanFiltered),
    };
    let mut delivered = 0;
    for (i, port) in ports.iter().enumerate() {
        let mut got = Vec::new();
        port.drain(&mut got);
        delivered += got.len();
        let tx = after[i].tx_frames - before[i].tx_frames;
        assert_eq!(
            got.len() as u64,
            tx,
            "port {i} received {} frames, its counters say {tx}",
            got.len()
        );
        if i == ingress {
            assert!(got.is_empty(), "a frame came back to the port it came from");
        }
        for f in &got {
            check_egress(f, &modes[i], i, gso);
        }
        if i != ingress && refused.is_none() {
            // Every other port either took it, or counted why not (or is not in the
            // VLAN, or the destination was learnt elsewhere).
            let drops = dropped(&after[i]) - dropped(&before[i]);
            assert!(
                drops <= 1 || gso,
                "port {i} counted {drops} drops for one frame"
            );
        }
    }
    if let Some(why) = refused {
        let drops = after[ingress].dropped(why) - before[ingress].dropped(why);
        assert_eq!(
            drops, 1,
            "a {why:?} frame was not counted as such at ingress"
        );
        assert_eq!(delivered, 0, "a {why:?} frame was forwarded");
    } else {
        assert_eq!(
            dropped(&after[ingress]),
            dropped(&before[ingress]),
            "a frame the switch took was counted as dropped at ingress"
        );
    }
}

/// A frame leaving port `i` (of VLAN mode `mode`) is one the switch would take, tagged
/// as the port wants.
fn check_egress(f: &[u8], mode: &VlanMode, i: usize, gso: bool) {
    let max = if gso {
        vswitch::offload::MAX_GSO_FRAME
    } else {
        frame::DEFAULT_MAX_FRAME
    };
    let info = frame::inspect(f, max + 4)
        .unwrap_or_else(|why| panic!("port {i} received a frame it cannot use: {why:?}"));
    match (mode, info.tag) {
        (VlanMode::Access { .. }, Some(t)) => panic!("access port {i} got a frame tagged {t}"),
        (VlanMode::Trunk { native, allowed }, Some(t)) => {
            assert_ne!(Some(t), *native, "trunk {i} got its native VLAN tagged");
            assert!(
                allowed.as_ref().is_none_or(|a| a.contains(&t)),
                "trunk {i} got VLAN {t}, which it does not carry"
            );
        }
        (VlanMode::Trunk { native: None, .. }, None) => {
            panic!("trunk {i} without a native VLAN got an untagged frame")
        }
        _ => {}
    }
}

/// A broadcast from a new source on A reaches B untagged and C tagged with VLAN 1.
fn still_forwards(switch: &Arc<Switch>, ports: &[InProcessPort]) {
    for p in ports {
        let mut junk = Vec::new();
        p.drain(&mut junk);
    }
    let mut f = vec![0xffu8; 6];
    f.extend_from_slice(&[0x02, 0xfa, 0xce, 0, 0, 0x42]);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&[0x45; 46]);
    switch.age();
    ports[0].send(&f);
    let b = ports[1]
        .try_recv()
        .expect("the broadcast did not reach port B");
    assert_eq!(b, f, "port B got the broadcast changed");
    let c = ports[2]
        .try_recv()
        .expect("the broadcast did not reach port C");
    assert_eq!(c.len(), f.len() + 4);
    assert_eq!(
        u16::from_be_bytes([c[12], c[13]]),
        ETHERTYPE_VLAN,
        "port C got the broadcast untagged"
    );
    assert_eq!(u16::from_be_bytes([c[14], c[15]]) & 0xfff, 1);
}
