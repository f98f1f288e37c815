//! vswitch with real taps in network namespaces the test creates: ping and TCP cross the
//! switch, and learned unicast stops reaching a third port.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use vmbuild_tests::netns::Netns;
use vswitch::tap::{Tap, TapPort};
use vswitch::{InProcessPort, Switch, SwitchConfig, VlanMode};

fn access1() -> VlanMode {
    VlanMode::Access { vlan: 1 }
}

#[test]
fn ping_and_tcp_cross_the_switch_and_learned_unicast_stays_off_other_ports() {
    cross_the_switch(false, "p");
}

/// The same with taps in vnet-header mode: TCP crosses as GSO segments with checksums
/// left to the receiver, and must still arrive intact.
#[test]
fn offloaded_tcp_arrives_intact() {
    cross_the_switch(true, "o");
}

fn cross_the_switch(offloads: bool, tag: &str) {
    let pid = std::process::id() % 100_000;
    let sw = Switch::new(SwitchConfig::default());
    let (name_a, name_b) = (format!("vmb{tag}a{pid}"), format!("vmb{tag}b{pid}"));
    let tap_a =
        TapPort::attach(&sw, Tap::open_with(&name_a, offloads).unwrap(), access1()).unwrap();
    let tap_b =
        TapPort::attach(&sw, Tap::open_with(&name_b, offloads).unwrap(), access1()).unwrap();
    let observer = InProcessPort::attach(&sw, "observer", access1());
    let ns1 = Netns::create(&format!("{tag}1")).unwrap();
    let ns2 = Netns::create(&format!("{tag}2")).unwrap();
    ns1.adopt(&name_a, "10.77.1.1/24").unwrap();
    ns2.adopt(&name_b, "10.77.1.2/24").unwrap();

    ns1.exec(&["busybox", "ping", "-c", "3", "-W", "2", "10.77.1.2"])
        .unwrap();
    // Learning done; what the observer saw so far was ARP broadcasts and flooding.
    let mut seen = Vec::new();
    observer.drain(&mut seen);

    // 8 MiB over TCP, checked end to end.
    let payload: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let expected = payload.clone();
    // The server says when it listens; the client connects only then (a refused connect
    // is not retried, so it must not race the bind).
    let (listening_tx, listening) = std::sync::mpsc::channel();
    let server = ns2.run(move || -> std::io::Result<Vec<u8>> {
        let listener = TcpListener::bind("10.77.1.2:7777")?;
        let _ = listening_tx.send(());
        let (mut conn, _) = listener.accept()?;
        let mut got = Vec::new();
        conn.read_to_end(&mut got)?;
        Ok(got)
    });
    if listening.recv_timeout(Duration::from_secs(10)).is_err() {
        // It ended (or hung) before listening: show why.
        panic!(
            "the TCP server never listened: {:?}",
            server.is_finished().then(|| server.join())
        );
    }
    let client = ns1.run(move || -> std::io::Result<()> {
        let mut conn =
            TcpStream::connect_timeout(&"10.77.1.2:7777".parse().unwrap(), Duration::from_secs(5))?;
        conn.write_all(&payload)?;
        Ok(())
    });
    client.join().unwrap().unwrap().unwrap();
    let got = server.join().unwrap().unwrap().unwrap();
    assert!(
        got == expected,
        "TCP payload corrupted ({} bytes)",
        got.len()
    );

    let a = sw.counters(tap_a.id()).unwrap();
    let b = sw.counters(tap_b.id()).unwrap();
    // 8 MiB is ~5,800 MTU frames, or a few hundred GSO segments.
    assert!(a.rx_frames > 100 && b.tx_frames > 100, "{a:?} {b:?}");
    if !offloads {
        assert!(a.rx_frames > 1000, "{a:?}");
    }
    seen.clear();
    observer.drain(&mut seen);
    assert!(
        seen.len() < 10,
        "{} frames of the learned unicast flow reached a third port",
        seen.len()
    );
    drop((tap_a, tap_b));
    // The taps the switch created are gone with it.
    assert!(ns1.exec(&["ip", "link", "show", &name_a]).is_err());
}
