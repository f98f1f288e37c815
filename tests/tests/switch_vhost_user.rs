//! Two QEMU (TCG) guests of the guest kit, each with a virtio-net NIC attached to a
//! vhost-user-net port of one in-process switch, ping each other. Every port here makes its
//! private `vswitch-vhost-*` directory in a directory of the test's own, and each test
//! checks that dropping its ports left nothing there.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmbuild_tests::guest::{GuestKit, GuestShare, GuestVm};
use vswitch::vhost_user_net::VhostUserNetPort;
use vswitch::{Switch, SwitchConfig, VlanMode};

fn entries(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

/// Drops the ports on another thread and fails (instead of hanging) if that takes too long.
fn drop_within(ports: Vec<VhostUserNetPort>, limit: Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(ports);
        let _ = tx.send(());
    });
    rx.recv_timeout(limit)
        .expect("dropping the ports did not return: a serving thread never ended");
}

fn guest(
    kit: &GuestKit,
    dir: &std::path::Path,
    socket: &std::path::Path,
    me: u8,
    other: u8,
) -> GuestVm {
    fs::write(
        dir.join("run.sh"),
        format!(
            "ip link set eth0 up && ip addr add 10.79.0.{me}/24 dev eth0 && \
             ping -c 3 -w 60 10.79.0.{other} > /tmp/xchg/ping.txt 2>&1; status=$?; \
             sleep 4; exit $status"
        ),
    )
    .unwrap();
    let mut vm = GuestVm::new(kit.clone(), "/tmp/xchg/run.sh").share(GuestShare::NineP {
        dir: dir.to_owned(),
        tag: "xchg".into(),
        mount: "/tmp/xchg".into(),
        options: String::new(),
    });
    vm.nics
        .push((socket.to_owned(), format!("52:54:00:00:00:{me:02x}")));
    vm.timeout = std::time::Duration::from_secs(120);
    vm
}

#[test]
fn two_guests_ping_each_other_through_vhost_user_ports() {
    let kit = GuestKit::locate().expect("guest kit");
    let sw = Switch::new(SwitchConfig::default());
    let (sockets, private) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (sa, sb) = (sockets.path().join("a.sock"), sockets.path().join("b.sock"));
    let vlan = VlanMode::Access { vlan: 1 };
    let pa = VhostUserNetPort::listen_in(&sw, &sa, vlan.clone(), private.path()).unwrap();
    let pb = VhostUserNetPort::listen_in(&sw, &sb, vlan, private.path()).unwrap();
    assert_eq!(
        entries(private.path()).len(),
        2,
        "one private directory per port"
    );
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (ga, gb) = (
        guest(&kit, da.path(), &sa, 1, 2),
        guest(&kit, db.path(), &sb, 2, 1),
    );
    let ta = std::thread::spawn(move || ga.run());
    let tb = std::thread::spawn(move || gb.run());
    let (oa, ob) = (ta.join().unwrap().unwrap(), tb.join().unwrap().unwrap());
    let ping_a = fs::read_to_string(da.path().join("ping.txt")).unwrap_or_default();
    let ping_b = fs::read_to_string(db.path().join("ping.txt")).unwrap_or_default();
    let ports = sw.ports();
    assert_eq!(
        oa.exit,
        Some(0),
        "guest 1: {ping_a}\n{}\n{ports:#?}",
        oa.console
    );
    assert_eq!(ob.exit, Some(0), "guest 2: {ping_b}\n{}", ob.console);
    assert!(ping_a.contains("3 packets received"), "{ping_a}");
    let (ca, cb) = (sw.counters(pa.id()).unwrap(), sw.counters(pb.id()).unwrap());
    assert!(ca.rx_frames >= 4 && cb.rx_frames >= 4, "{ca:?} {cb:?}");
    // (Each guest stays up a little after its own pings, to answer the other's.)
    // Both guests learned: each MAC is in the table on its own port.
    let table = sw.mac_table();
    assert!(table
        .iter()
        .any(|r| r.mac == "52:54:00:00:00:01" && r.port == pa.id()));
    assert!(table
        .iter()
        .any(|r| r.mac == "52:54:00:00:00:02" && r.port == pb.id()));

    drop_within(vec![pa, pb], Duration::from_secs(30));
    assert_eq!(entries(private.path()), Vec::<PathBuf>::new());
    assert!(!sa.exists() && !sb.exists());
}

/// The same ports driven by the vhost-user front-end harness: frames cross, and a front-end
/// that goes away and comes back (a QEMU restart) gets a working port again. The ports then
/// drop while both front-ends are still connected: that closes them and leaves nothing.
#[test]
fn a_front_end_that_reconnects_gets_a_working_port() {
    use vmbuild_tests::vhost_frontend::{FsFrontend, RawDesc, SLOT_BUF};
    const RXQ: usize = 0;
    const TXQ: usize = 1;
    let sw = Switch::new(SwitchConfig::default());
    let (dir, private) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let vlan = VlanMode::Access { vlan: 1 };
    let pa = VhostUserNetPort::listen_in(&sw, &sa, vlan.clone(), private.path()).unwrap();
    let pb = VhostUserNetPort::listen_in(&sw, &sb, vlan, private.path()).unwrap();
    assert_eq!(
        entries(private.path()).len(),
        2,
        "one private directory per port"
    );
    let mut b = FsFrontend::connect(&sb).unwrap();
    for slot in 0..8u16 {
        let addr = FsFrontend::slot_buffer(slot) + SLOT_BUF;
        b.submit_raw(
            RXQ,
            slot,
            &[RawDesc {
                addr,
                len: 2048,
                flags: 2,
                next: 0,
            }],
        )
        .unwrap();
    }
    b.kick(RXQ).unwrap();
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&[2, 0, 0, 0, 0, 0xa, 0x88, 0xb5]);
    frame.extend_from_slice(b"hello through the switch");
    let mut still_connected = None;
    for round in 0..3 {
        let mut a = FsFrontend::connect(&sa).unwrap();
        a.submit(TXQ, 0, &frame, 0).unwrap();
        a.kick(TXQ).unwrap();
        a.wait_used(TXQ, Duration::from_secs(5)).unwrap();
        let used = b.wait_used(RXQ, Duration::from_secs(5)).unwrap();
        assert_eq!(used.len(), 1, "round {round}");
        let got = b.reply(used[0]).unwrap();
        assert_eq!(
            &got[12..],
            &frame[12..],
            "the frame arrives whole, after a virtio-net header"
        );
        if round < 2 {
            drop(a);
            std::thread::sleep(Duration::from_millis(100));
        } else {
            still_connected = Some(a);
        }
    }
    assert_eq!(sw.counters(pa.id()).unwrap().rx_frames, 3);

    // Both front-ends are connected (a's third connection, and b) as the ports drop.
    assert!(still_connected.is_some());
    drop_within(vec![pa, pb], Duration::from_secs(10));
    assert_eq!(entries(private.path()), Vec::<PathBuf>::new());
    assert!(!sa.exists() && !sb.exists());
    assert!(sw.ports().is_empty());
    drop((still_connected, b));
}
