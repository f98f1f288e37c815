//! A vhost-user-net port serves one front-end after another (a QEMU restarting its guest)
//! for as long as the switch runs, and each session's back-end is dropped whole: no file
//! descriptor is left over from a session that ended. (vhost-user-backend never closes the
//! exit eventfd it is given, which used to leak one eventfd per session.)
//!
//! Alone in its test binary, so that this process's open files are the port's and this
//! test's only.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vswitch::vhost_user_net::VhostUserNetPort;
use vswitch::{Switch, SwitchConfig, VlanMode};

const GET_FEATURES: u32 = 1;
const FLAG_VERSION_1: u32 = 0x1;

/// Connects a bare vhost-user front-end and waits for the back-end's answer to
/// GET_FEATURES, so that the session is live (and the one before it torn down: the port
/// serves one front-end at a time and ends a session before it accepts the next).
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
    assert_eq!(
        u32::from_le_bytes(reply[..4].try_into().unwrap()),
        GET_FEATURES
    );
    front
}

fn open_fds() -> Vec<String> {
    let mut fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    fds.sort();
    fds
}

#[test]
fn sessions_one_after_another_leak_no_file_descriptors() {
    const SESSIONS: usize = 50;
    let sw = Switch::new(SwitchConfig::default());
    let (sockets, private) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let socket = sockets.path().join("port.sock");
    let port =
        VhostUserNetPort::listen_in(&sw, &socket, VlanMode::Access { vlan: 1 }, private.path())
            .unwrap();
    let mut first = None;
    let mut last = Vec::new();
    for _ in 0..SESSIONS {
        let front = connect_live(&socket);
        last = open_fds();
        first.get_or_insert_with(|| last.clone());
        drop(front);
    }
    let first = first.unwrap();
    let eventfds = |fds: &[String]| fds.iter().filter(|f| f.contains("eventfd")).count();
    assert!(
        last.len() <= first.len() + 3 && eventfds(&last) <= eventfds(&first),
        "{} files ({} eventfds) open in the first session, {} ({}) in session {SESSIONS}: \
         {first:?} then {last:?}",
        first.len(),
        eventfds(&first),
        last.len(),
        eventfds(&last),
    );
    drop(port);
}
