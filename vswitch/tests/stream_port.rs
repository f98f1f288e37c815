//! Stream ports (QEMU's `-netdev stream` framing) driven by a client socket in the test, as
//! QEMU would: frames cross in both directions, a bad length prefix drops the connection
//! (counted) and a new connection gets the same port, and dropping the port unlinks it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vswitch::frame::Mac;
use vswitch::stream::StreamPort;
use vswitch::{InProcessPort, Switch, SwitchConfig, VlanMode};

const A: Mac = [2, 0, 0, 0, 0, 0xa];
const B: Mac = [2, 0, 0, 0, 0, 0xb];

fn frame(dst: Mac, src: Mac, fill: u8) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&[fill; 46]);
    f
}

fn send(s: &mut UnixStream, f: &[u8]) {
    s.write_all(&(f.len() as u32).to_be_bytes()).unwrap();
    s.write_all(f).unwrap();
}

fn recv(s: &mut UnixStream) -> Vec<u8> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut f).unwrap();
    f
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn frames_cross_a_stream_port_both_ways_and_a_peer_can_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("port.sock");
    let switch = Switch::new(SwitchConfig::default());
    let port = StreamPort::listen(&switch, &path, VlanMode::default()).unwrap();
    let local = InProcessPort::attach(&switch, "local", VlanMode::default());

    let mut peer = UnixStream::connect(&path).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    wait_until("the port to accept", || port.connected());
    let out = frame(B, A, 1);
    send(&mut peer, &out);
    assert_eq!(local.recv_timeout(Duration::from_secs(5)), Some(out));
    let back = frame(A, B, 2);
    local.send(&back);
    assert_eq!(recv(&mut peer), back);

    // An impossible length: the connection goes, the error is counted, the port stays.
    peer.write_all(&u32::MAX.to_be_bytes()).unwrap();
    wait_until("the bad peer to be dropped", || !port.connected());
    assert_eq!(port.protocol_errors(), 1);

    let mut again = UnixStream::connect(&path).unwrap();
    again
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    wait_until("the port to accept again", || port.connected());
    let f = frame(B, A, 3);
    send(&mut again, &f);
    assert_eq!(local.recv_timeout(Duration::from_secs(5)), Some(f));
    local.send(&frame(A, B, 4));
    assert_eq!(recv(&mut again), frame(A, B, 4));

    drop(port);
    assert!(!path.exists(), "the socket outlived its port");
    assert_eq!(switch.ports().len(), 1);
}

/// A peer that connects and never reads: once its socket is full, frames for it are
/// dropped and counted at once, and the other ports get every frame without waiting for
/// it (the switch sends from the ingress thread: a port that made it wait would slow
/// every port's traffic down).
#[test]
fn a_peer_that_stops_reading_costs_the_other_ports_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stuck.sock");
    let switch = Switch::new(SwitchConfig::default());
    let port = StreamPort::listen(&switch, &path, VlanMode::default()).unwrap();
    let sender = InProcessPort::attach(&switch, "sender", VlanMode::default());
    let receiver = InProcessPort::attach(&switch, "receiver", VlanMode::default());
    let _stuck = UnixStream::connect(&path).unwrap();
    wait_until("the port to accept", || port.connected());

    // 10,000 broadcasts of 1,000 bytes: 10 MB, far more than the socket and the port's
    // queue hold.
    let started = Instant::now();
    for i in 0..10_000u32 {
        let mut f = frame([0xff; 6], A, 0);
        f.resize(1000, 0);
        f[14..18].copy_from_slice(&i.to_be_bytes());
        sender.send(&f);
        let got = receiver
            .recv_timeout(Duration::from_secs(5))
            .expect("the receiver lost a frame");
        assert_eq!(&got[14..18], &i.to_be_bytes());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "only {i} frames in 10 s"
        );
    }
    let stuck = switch.counters(port.id()).unwrap();
    assert!(
        stuck.dropped(vswitch::frame::DropReason::EgressFailed) > 5_000,
        "{stuck:?}"
    );
    assert!(port.connected(), "a slow reader is not a protocol error");
    drop(port);
    assert!(!path.exists());
}
