//! VLANs, aging and a MAC flood through real taps in namespaces the test creates.

use std::time::Duration;

use vmbuild_tests::netns::Netns;
use vswitch::tap::{Tap, TapPort};
use vswitch::{Switch, SwitchConfig, VlanMode};

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

#[test]
fn aging_forgets_and_a_mac_flood_leaves_the_table_bounded() {
    let pid = std::process::id() % 10_000;
    let sw = Switch::new(SwitchConfig {
        aging: Duration::from_secs(1),
        mac_table_size: 1024,
        ..SwitchConfig::default()
    });
    let (a, b) = (format!("vfa{pid}"), format!("vfb{pid}"));
    let _ports = [tap(&sw, &a, "access:1"), tap(&sw, &b, "access:1")];
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
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        sw.mac_table_len() <= 1024,
        "table grew to {}",
        sw.mac_table_len()
    );
    n1.exec(&["busybox", "ping", "-c", "2", "-W", "2", "10.82.0.2"])
        .expect("still forwarding after the flood");
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
