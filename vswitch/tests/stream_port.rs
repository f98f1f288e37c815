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
