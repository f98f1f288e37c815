//! Forwarding behaviour through in-process ports: learning, flooding, VLANs, bad frames.

use std::sync::Arc;
use std::time::Duration;

use vswitch::frame::{push_tag, DropReason, Mac};
use vswitch::{InProcessPort, Switch, SwitchConfig, VlanMode};

const A: Mac = [2, 0, 0, 0, 0, 0xa];
const B: Mac = [2, 0, 0, 0, 0, 0xb];
const C: Mac = [2, 0, 0, 0, 0, 0xc];
const BROADCAST: Mac = [0xff; 6];

fn frame(dst: Mac, src: Mac) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&[0x45; 46]);
    f
}

fn access(v: u16) -> VlanMode {
    VlanMode::Access { vlan: v }
}

fn drain(p: &InProcessPort) -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    p.drain(&mut v);
    v
}

#[test]
fn unknown_unicast_floods_then_learned_unicast_goes_to_one_port() {
    let sw = Switch::new(SwitchConfig::default());
    let (a, b, c) = (
        InProcessPort::attach(&sw, "a", access(1)),
        InProcessPort::attach(&sw, "b", access(1)),
        InProcessPort::attach(&sw, "c", access(1)),
    );
    // B is unknown: flooded to b and c, not back to a.
    a.send(&frame(B, A));
    assert_eq!(drain(&a).len(), 0);
    assert_eq!(drain(&b).len(), 1);
    assert_eq!(drain(&c).len(), 1);
    // B answers: A is known now, so only a gets it.
    b.send(&frame(A, B));
    assert_eq!(drain(&a), vec![frame(A, B)]);
    assert_eq!(
        drain(&c).len(),
        0,
        "learned unicast must not reach a third port"
    );
    // And A to B goes to b alone.
    a.send(&frame(B, A));
    assert_eq!(drain(&b).len(), 1);
    assert_eq!(drain(&c).len(), 0);
    // Broadcast reaches everyone else.
    c.send(&frame(BROADCAST, C));
    assert_eq!(
        (drain(&a).len(), drain(&b).len(), drain(&c).len()),
        (1, 1, 0)
    );
    let stats = sw.counters(c.id()).unwrap();
    assert_eq!(stats.rx_frames, 1);
    assert_eq!(sw.counters(a.id()).unwrap().tx_frames, 2);
}

#[test]
fn a_mac_that_moves_is_relearned() {
    let sw = Switch::new(SwitchConfig::default());
    let (a, b, c) = (
        InProcessPort::attach(&sw, "a", access(1)),
        InProcessPort::attach(&sw, "b", access(1)),
        InProcessPort::attach(&sw, "c", access(1)),
    );
    a.send(&frame(BROADCAST, A));
    drain(&b);
    drain(&c);
    // A shows up behind c now.
    c.send(&frame(BROADCAST, A));
    drain(&a);
    drain(&b);
    b.send(&frame(A, B));
    assert_eq!(drain(&c).len(), 1);
    assert_eq!(drain(&a).len(), 0);
}

#[test]
fn aging_forgets() {
    let sw = Switch::new(SwitchConfig {
        aging: Duration::from_millis(100),
        ..SwitchConfig::default()
    });
    let (a, b, c) = (
        InProcessPort::attach(&sw, "a", access(1)),
        InProcessPort::attach(&sw, "b", access(1)),
        InProcessPort::attach(&sw, "c", access(1)),
    );
    a.send(&frame(BROADCAST, A));
    assert_eq!(sw.mac_table_len(), 1);
    drain(&b);
    drain(&c);
    std::thread::sleep(Duration::from_millis(150));
    // Aged out: unicast to A floods again.
    b.send(&frame(A, B));
    drain(&a);
    assert_eq!(drain(&c).len(), 1);
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(sw.age(), 2);
    assert_eq!(sw.mac_table_len(), 0);
}

/// 100,000 new source MACs into a 4096-entry table: the table fills to its bound and no
/// further, and two hosts that learned before the flood and keep talking through it stay
/// known: their unicast reaches only each other's port, never the flooder's.
#[test]
fn a_flood_of_source_macs_fills_the_table_to_its_bound_and_talking_hosts_stay_known() {
    const BOUND: usize = 4096;
    let sw = Switch::new(SwitchConfig {
        mac_table_size: BOUND,
        ..SwitchConfig::default()
    });
    let (a, b) = (
        InProcessPort::attach(&sw, "a", access(1)),
        InProcessPort::attach(&sw, "b", access(1)),
    );
    let flooder = InProcessPort::attach_with_capacity(&sw, "flood", access(1), 16);
    // A and B are learned before the flood.
    a.send(&frame(BROADCAST, A));
    b.send(&frame(BROADCAST, B));
    drain(&b);
    drain(&a);
    drain(&flooder);

    // Where A<->B unicast went wrong, as (flood frames so far, what happened).
    let mut misdelivered = Vec::new();
    let mut largest = 0;
    for i in 1..=100_000u32 {
        let b4 = i.to_be_bytes();
        flooder.send(&frame(BROADCAST, [2, 1, b4[0], b4[1], b4[2], b4[3]]));
        if i % 1000 == 0 {
            drain(&a);
            drain(&b);
            a.send(&frame(B, A));
            b.send(&frame(A, B));
            let (to_a, to_b, to_flooder) = (drain(&a), drain(&b), drain(&flooder));
            if to_a != vec![frame(A, B)] || to_b != vec![frame(B, A)] || !to_flooder.is_empty() {
                misdelivered.push((
                    i,
                    format!(
                        "a got {}, b got {}, the flooder got {}",
                        to_a.len(),
                        to_b.len(),
                        to_flooder.len()
                    ),
                ));
            }
            largest = largest.max(sw.mac_table_len());
        }
    }
    assert!(largest <= BOUND, "the table grew to {largest}");
    assert_eq!(
        sw.mac_table_len(),
        BOUND,
        "the flood fills the table to its bound (a switch that learns nothing stays at 0)"
    );
    assert!(
        misdelivered.is_empty(),
        "A<->B unicast during the flood must reach only its own port; it did not after \
         (flood frames, what happened): {:?}",
        &misdelivered[..misdelivered.len().min(5)]
    );
    let table = sw.mac_table();
    assert!(table
        .iter()
        .any(|r| r.mac == "02:00:00:00:00:0a" && r.port == a.id()));
    assert!(table
        .iter()
        .any(|r| r.mac == "02:00:00:00:00:0b" && r.port == b.id()));
}

#[test]
fn vlans_are_isolated_and_trunks_carry_tags() {
    let sw = Switch::new(SwitchConfig::default());
    let v10 = InProcessPort::attach(&sw, "v10", access(10));
    let v20 = InProcessPort::attach(&sw, "v20", access(20));
    let trunk = InProcessPort::attach(&sw, "trunk", VlanMode::parse("trunk:10,20").unwrap());
    let v10b = InProcessPort::attach(&sw, "v10b", access(10));

    v10.send(&frame(BROADCAST, A));
    assert_eq!(drain(&v20).len(), 0, "VLAN 10 must not reach VLAN 20");
    assert_eq!(
        drain(&v10b),
        vec![frame(BROADCAST, A)],
        "access ports get it untagged"
    );
    assert_eq!(
        drain(&trunk),
        vec![push_tag(&frame(BROADCAST, A), 10)],
        "the trunk gets it tagged"
    );

    // Tagged from the trunk into VLAN 20: untagged on the access port.
    trunk.send(&push_tag(&frame(BROADCAST, C), 20));
    assert_eq!(drain(&v20), vec![frame(BROADCAST, C)]);
    assert_eq!(drain(&v10).len() + drain(&v10b).len(), 0);

    // A tag the trunk does not carry, and a tagged frame on an access port: dropped.
    trunk.send(&push_tag(&frame(BROADCAST, C), 30));
    v10.send(&push_tag(&frame(BROADCAST, A), 10));
    assert_eq!(drain(&v10b).len() + drain(&v20).len(), 0);
    assert_eq!(
        sw.counters(trunk.id())
            .unwrap()
            .dropped(DropReason::VlanFiltered),
        1
    );
    assert_eq!(
        sw.counters(v10.id())
            .unwrap()
            .dropped(DropReason::VlanFiltered),
        1
    );

    // The same MAC in two VLANs is two entries.
    v20.send(&frame(BROADCAST, A));
    assert_eq!(
        sw.mac_table()
            .iter()
            .filter(|r| r.mac == "02:00:00:00:00:0a")
            .count(),
        2
    );
}

#[test]
fn malformed_frames_are_counted_and_never_forwarded() {
    let sw = Switch::new(SwitchConfig::default());
    let (a, b) = (
        InProcessPort::attach(&sw, "a", access(1)),
        InProcessPort::attach(&sw, "b", access(1)),
    );
    a.send(&[0u8; 5]);
    a.send(&[]);
    a.send(&frame(BROADCAST, A).repeat(40));
    let mut cut = frame(BROADCAST, A);
    cut.truncate(15);
    cut[12] = 0x81;
    cut[13] = 0x00;
    a.send(&cut);
    a.send(&frame(BROADCAST, [1, 0, 0x5e, 0, 0, 1]));
    assert_eq!(drain(&b).len(), 0);
    let s = sw.counters(a.id()).unwrap();
    assert_eq!(s.dropped(DropReason::Runt), 2);
    assert_eq!(s.dropped(DropReason::Oversize), 1);
    assert_eq!(s.dropped(DropReason::Malformed), 1);
    assert_eq!(s.dropped(DropReason::BadSource), 1);
    assert_eq!(sw.mac_table_len(), 0);
}

#[test]
fn hub_mode_floods_everything() {
    let sw = Switch::new(SwitchConfig {
        hub: true,
        ..SwitchConfig::default()
    });
    let (a, b, c) = (
        InProcessPort::attach(&sw, "a", access(1)),
        InProcessPort::attach(&sw, "b", access(1)),
        InProcessPort::attach(&sw, "c", access(1)),
    );
    b.send(&frame(A, B));
    a.send(&frame(B, A));
    assert_eq!(drain(&c).len(), 2);
    assert_eq!(sw.mac_table_len(), 0);
}

#[test]
fn ports_come_and_go_under_traffic() {
    let sw = Switch::new(SwitchConfig::default());
    let a = Arc::new(InProcessPort::attach(&sw, "a", access(1)));
    let sender = {
        let a = a.clone();
        std::thread::spawn(move || {
            for i in 0..200_000u32 {
                a.send(&frame(if i % 2 == 0 { BROADCAST } else { B }, A));
            }
        })
    };
    for _ in 0..200 {
        let b = InProcessPort::attach(&sw, "b", access(1));
        b.send(&frame(A, B));
        drop(b);
    }
    sender.join().unwrap();
    let last = InProcessPort::attach(&sw, "b", access(1));
    a.send(&frame(BROADCAST, A));
    assert!(last.recv_timeout(Duration::from_secs(1)).is_some());
    assert_eq!(sw.ports().len(), 2);
}

/// `send_batch` decides up to 64 frames under one lock: what each port receives, in
/// which order, and every counter must be what the same frames sent one by one give,
/// across batch boundaries, with learning inside a batch, floods, VLAN tags and drops.
#[test]
fn a_batch_is_forwarded_exactly_as_the_same_frames_sent_one_by_one() {
    let mut frames: Vec<Vec<u8>> = Vec::new();
    for i in 0..150u8 {
        let from: Mac = [2, 0, 0, 1, 0, i % 7];
        frames.push(match i % 9 {
            0 => frame(B, from),                              // learned unicast
            1 => push_tag(&frame(C, from), 10),               // learned in VLAN 10
            2 => frame(BROADCAST, from),                      // flood
            3 => frame([2, 0, 0, 9, 9, i], from),             // unknown unicast
            4 => frame([2, 0, 0, 1, 0, (i + 1) % 7], from),   // learned earlier in the batch
            5 => vec![0u8; 9],                                // runt
            6 => push_tag(&push_tag(&frame(B, from), 10), 1), // stacked tags
            7 => frame(B, [1, 0, 0x5e, 0, 0, 1]),             // multicast source
            _ => push_tag(&frame(B, from), 30),               // a VLAN the trunk does not carry
        });
    }
    let run = |batched: bool| {
        let sw = Switch::new(SwitchConfig::default());
        let trunk =
            InProcessPort::attach(&sw, "t", VlanMode::parse("trunk:native=1:1,10").unwrap());
        let b = InProcessPort::attach(&sw, "b", access(1));
        let c = InProcessPort::attach(&sw, "c", access(10));
        let d = InProcessPort::attach(&sw, "d", VlanMode::parse("trunk").unwrap());
        b.send(&frame(BROADCAST, B));
        c.send(&frame(BROADCAST, C));
        for p in [&trunk, &b, &c, &d] {
            drain(p);
        }
        if batched {
            trunk.send_batch(&frames);
        } else {
            for f in &frames {
                trunk.send(f);
            }
        }
        let received: Vec<Vec<Vec<u8>>> = [&trunk, &b, &c, &d].iter().map(|p| drain(p)).collect();
        let counters: Vec<_> = [&trunk, &b, &c, &d]
            .iter()
            .map(|p| sw.counters(p.id()).unwrap())
            .collect();
        (received, counters, sw.mac_table_len())
    };
    let (one_by_one, batched) = (run(false), run(true));
    assert!(
        one_by_one.0[1].len() > 10 && one_by_one.0[2].len() > 10,
        "the case reaches the ports"
    );
    assert_eq!(batched.0, one_by_one.0, "frames received per port");
    assert_eq!(batched.1, one_by_one.1, "counters per port");
    assert_eq!(batched.2, one_by_one.2, "MAC table entries");
}

/// A reader asleep in `recv_timeout` is woken by the next frame, not by its timeout
/// (senders skip the wake-up when nobody sleeps).
#[test]
fn a_sleeping_reader_is_woken_by_the_next_frame() {
    let sw = Switch::new(SwitchConfig::default());
    let a = InProcessPort::attach(&sw, "a", access(1));
    let b = Arc::new(InProcessPort::attach(&sw, "b", access(1)));
    for round in 0..20 {
        let reader = b.clone();
        let waiting = std::thread::spawn(move || {
            let start = std::time::Instant::now();
            let got = reader.recv_timeout(Duration::from_secs(30));
            (got, start.elapsed())
        });
        std::thread::sleep(Duration::from_millis(if round % 2 == 0 { 20 } else { 0 }));
        a.send(&frame(BROADCAST, A));
        let (got, waited) = waiting.join().unwrap();
        assert_eq!(got, Some(frame(BROADCAST, A)), "round {round}");
        assert!(
            waited < Duration::from_secs(5),
            "round {round}: woken after {waited:?}"
        );
    }
}

/// Buffers handed back are refilled with exactly the next frame, whatever they held.
#[test]
fn recycled_buffers_hold_exactly_the_next_frames() {
    let sw = Switch::new(SwitchConfig::default());
    let a = InProcessPort::attach(&sw, "a", access(1));
    let b = InProcessPort::attach(&sw, "b", access(1));
    let long = {
        let mut f = frame(BROADCAST, A);
        f.resize(1400, 0xee);
        f
    };
    a.send_batch(&[long.clone(), long.clone()]);
    let mut got = Vec::new();
    b.drain(&mut got);
    assert_eq!(got, vec![long.clone(), long]);
    b.recycle(&mut got);
    assert!(got.is_empty(), "recycle takes the buffers");
    let short = frame(BROADCAST, A);
    a.send_batch(&[short.clone(), short.clone(), short.clone()]);
    assert_eq!(drain(&b), vec![short.clone(), short.clone(), short]);
}
