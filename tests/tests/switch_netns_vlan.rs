//! VLANs, aging and a MAC flood through real taps in namespaces the test creates.

use std::time::{Duration, Instant};

use vmbuild_tests::netns::Netns;
use vswitch::tap::{Tap, TapPort};
use vswitch::{InProcessPort, Switch, SwitchConfig, VlanMode};

fn tap(sw: &std::sync::Arc<Switch>, name: &str, mode: &str) -> TapPort {
    TapPort::attach(sw, Tap::open(name).unwrap(), VlanMode::parse(mode).unwrap()).unwrap()
}

/// Access ports only: this host's kernel has no 8021q module, so no namespace can speak
/// tagged frames; trunks are tested through in-process ports (vswitch/tests/forwarding.rs).
#[test]
fn vlans_are_isolated() {
    let pid = std::process::id() % 10_000;
    let sw = Switch::new(SwitchConfig::default());
    let names: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|x| format!("vv{x}{pid}"))
        .collect();
    let _ports = [
        tap(&sw, &names[0], "access:10"),
        tap(&sw, &names[1], "access:20"),
        tap(&sw, &names[2], "access:10"),
    ];
    let ns: Vec<Netns> = (0..3)
        .map(|i| Netns::create(&format!("v{i}")).unwrap())
        .collect();
    // All three share a subnet: only the VLAN keeps b apart.
    ns[0].adopt(&names[0], "10.80.0.1/24").unwrap();
    ns[1].adopt(&names[1], "10.80.0.2/24").unwrap();
    ns[2].adopt(&names[2], "10.80.0.3/24").unwrap();
    ns[0]
        .exec(&["busybox", "ping", "-c", "2", "-W", "2", "10.80.0.3"])
        .expect("same VLAN");
    assert!(
        ns[0]
            .exec(&["busybox", "ping", "-c", "2", "-W", "1", "10.80.0.2"])
            .is_err(),
        "VLAN 10 reached VLAN 20"
    );
    assert!(sw.mac_table().iter().all(|r| r.vlan == 10 || r.vlan == 20));
}

/// Aging, then a flood of 100,000 source MACs from one namespace into a 1024-entry table:
/// the table fills to its bound and no further, and the two namespaces' unicast, learned
/// into that full table, reaches only its own tap (a third port sees none of it).
#[test]
fn aging_forgets_and_a_mac_flood_fills_the_table_to_its_bound() {
    const BOUND: usize = 1024;
    let pid = std::process::id() % 10_000;
    let sw = Switch::new(SwitchConfig {
        aging: Duration::from_secs(1),
        mac_table_size: BOUND,
        ..SwitchConfig::default()
    });
    let (a, b) = (format!("vfa{pid}"), format!("vfb{pid}"));
    let ports = [tap(&sw, &a, "access:1"), tap(&sw, &b, "access:1")];
    let observer = InProcessPort::attach(&sw, "observer", VlanMode::Access { vlan: 1 });
    let (n1, n2) = (Netns::create("f1").unwrap(), Netns::create("f2").unwrap());
    n1.adopt(&a, "10.82.0.1/24").unwrap();
    n2.adopt(&b, "10.82.0.2/24").unwrap();
    n1.exec(&["busybox", "ping", "-c", "1", "-W", "2", "10.82.0.2"])
        .unwrap();
    assert!(sw.mac_table_len() >= 2);
    std::thread::sleep(Duration::from_millis(1500));
    sw.age();
    assert_eq!(
        sw.mac_table_len(),
        0,
        "entries older than the aging time are forgotten"
    );

    // 100,000 frames with distinct source MACs, sent raw into the tap from ns1.
    let ifname = a.clone();
    let sent = n1
        .run(move || flood(&ifname, 100_000))
        .join()
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(sent, 100_000);
    // Wait until the switch has read what the tap still held.
    let received = settled_rx_frames(&sw, ports[0].id());
    assert!(
        received > BOUND as u64,
        "only {received} frames reached the switch"
    );
    assert_eq!(
        sw.mac_table_len(),
        BOUND,
        "the flood fills the table to its bound and no further (a switch that does not learn \
         the flood's sources stays below it)"
    );

    // Unicast between the namespaces, learned into the full table, stays off other ports.
    let mut seen = Vec::new();
    observer.drain(&mut seen);
    n1.exec(&["busybox", "ping", "-A", "-c", "5", "-W", "2", "10.82.0.2"])
        .expect("still forwarding after the flood");
    seen.clear();
    observer.drain(&mut seen);
    let unicast: Vec<String> = seen
        .iter()
        .filter(|f| f.len() >= 14 && f[0] & 1 == 0)
        .map(|f| {
            format!(
                "{:02x?} <- {:02x?} type {:02x?}",
                &f[..6],
                &f[6..12],
                &f[12..14]
            )
        })
        .collect();
    // At most the first request, sent to an address the switch had not (re)learned yet,
    // is flooded; a switch that does not learn into a full table floods all ten frames.
    assert!(
        unicast.len() <= 1,
        "{} unicast frames reached a third port: {unicast:?}",
        unicast.len()
    );
    assert_eq!(sw.mac_table_len(), BOUND);
}

/// The port's received-frame count once it has stopped changing (at most 10 s).
fn settled_rx_frames(sw: &Switch, port: vswitch::PortId) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = sw.counters(port).unwrap().rx_frames;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = sw.counters(port).unwrap().rx_frames;
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// Sends `count` broadcast frames with distinct source MACs out of `ifname` (AF_PACKET).
fn flood(ifname: &str, count: u32) -> std::io::Result<u32> {
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: plain socket/if_nametoindex/sendto calls with valid arguments.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let index = libc::if_nametoindex(name.as_ptr());
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = index as i32;
        addr.sll_halen = 6;
        let mut sent = 0;
        for i in 0..count {
            let b = i.to_be_bytes();
            let mut frame = [0u8; 60];
            frame[..6].copy_from_slice(&[0xff; 6]);
            frame[6..12].copy_from_slice(&[0x02, 0x99, b[0], b[1], b[2], b[3]]);
            frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes()); // local experimental EtherType
            let r = libc::sendto(
                fd,
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            if r == frame.len() as isize {
                sent += 1;
            } else if std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        libc::close(fd);
        Ok(sent)
    }
}
