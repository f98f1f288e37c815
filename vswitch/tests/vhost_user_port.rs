//! A vhost-user-net port ends cleanly: dropping it closes a front-end that is still
//! connected, waits for the thread that served it, and leaves nothing behind, neither its
//! socket nor its private `vswitch-vhost-*` directory. Each test gives the port its own
//! parent directory for that private directory, so "nothing left" is checked exactly.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use vswitch::vhost_user_net::VhostUserNetPort;
use vswitch::{Switch, SwitchConfig, VlanMode};

const GET_FEATURES: u32 = 1;
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

fn access1() -> VlanMode {
    VlanMode::Access { vlan: 1 }
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// Drops the port on another thread and fails (instead of hanging) if that takes too long.
fn drop_within(port: VhostUserNetPort, limit: Duration) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        drop(port);
        let _ = tx.send(());
    });
    rx.recv_timeout(limit)
        .expect("dropping the port did not return: its serving thread never ended");
}

/// Connects a bare vhost-user front-end and shows that the session is live: GET_FEATURES
/// crosses the relay to the back-end and its reply comes back.
fn connect_live(socket: &Path) -> UnixStream {
    let mut front = UnixStream::connect(socket).unwrap();
    front
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut request = Vec::new();
    request.extend_from_slice(&GET_FEATURES.to_le_bytes());
    request.extend_from_slice(&FLAG_VERSION_1.to_le_bytes());
    request.extend_from_slice(&0u32.to_le_bytes());
    front.write_all(&request).unwrap();
    let mut reply = [0u8; 20];
    front.read_exact(&mut reply).unwrap();
    let word = |i: usize| u32::from_le_bytes(reply[i..i + 4].try_into().unwrap());
    assert_eq!(word(0), GET_FEATURES);
    assert_ne!(word(4) & FLAG_REPLY, 0, "a reply");
    assert_eq!(word(8), 8);
    let features = u64::from_le_bytes(reply[12..20].try_into().unwrap());
    assert_ne!(features & VIRTIO_F_VERSION_1, 0, "{features:#x}");
    front
}

#[test]
fn an_idle_port_leaves_nothing_behind() {
    let sw = Switch::new(SwitchConfig::default());
    let (sockets, private) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let socket = sockets.path().join("port.sock");
    let port = VhostUserNetPort::listen_in(&sw, &socket, access1(), private.path()).unwrap();
    // The private directory is made where the test said, so its absence later means
    // something.
    let made = entries(private.path());
    assert_eq!(made.len(), 1, "{made:?}");
    let name = made[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("vswitch-vhost-"), "{name}");
    assert!(made[0].join("backend.sock").exists());
    assert!(socket.exists());

    drop_within(port, Duration::from_secs(10));
    assert_eq!(entries(private.path()), Vec::<PathBuf>::new());
    assert!(!socket.exists(), "the public socket is removed");
    assert!(sw.ports().is_empty(), "the port left the switch");
}

/// A front-end that comes and goes (a QEMU restart) and is still connected when the port
/// drops: the drop closes its connection, and nothing is left behind.
#[test]
fn a_front_end_still_connected_when_the_port_drops_is_closed_and_nothing_is_left() {
    let sw = Switch::new(SwitchConfig::default());
    let (sockets, private) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let socket = sockets.path().join("port.sock");
    let port = VhostUserNetPort::listen_in(&sw, &socket, access1(), private.path()).unwrap();
    for _ in 0..3 {
        drop(connect_live(&socket));
    }
    let mut front = connect_live(&socket);
    assert_eq!(entries(private.path()).len(), 1);

    drop_within(port, Duration::from_secs(10));
    let mut byte = [0u8; 1];
    let n = front
        .read(&mut byte)
        .expect("the front-end's connection is closed, not left open");
    assert_eq!(n, 0, "end of stream for the front-end");
    assert_eq!(entries(private.path()), Vec::<PathBuf>::new());
    assert!(!socket.exists());
    assert!(sw.ports().is_empty());
}
