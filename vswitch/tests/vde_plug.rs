//! The VDE plug protocol without QEMU: clients as libvdeplug makes them, frames both ways
//! through an in-process port, bad requests refused and counted while the switch serves on,
//! and every socket (and the directory it made) gone after the server drops.

use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use vswitch::vde_plug::{encode_request, VdeClient, VdeOptions, VdePlugServer};
use vswitch::{InProcessPort, Switch, SwitchConfig, VlanMode};

fn frame(dst: [u8; 6], src: [u8; 6], fill: u8) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend(std::iter::repeat_n(fill, 46));
    f
}

fn until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn clients_get_ports_frames_cross_and_everything_is_removed() {
    let top = tempfile::tempdir().unwrap();
    let dir = top.path().join("vde");
    let sw = Switch::new(SwitchConfig::default());
    let local = InProcessPort::attach(&sw, "local", VlanMode::default());
    let server = VdePlugServer::start(&sw, &dir, VdeOptions::default()).unwrap();
    assert!(dir.join("ctl").exists());

    let a = VdeClient::connect(&dir, 0, "test a").unwrap();
    let b = VdeClient::connect(&dir, 7, "test b").unwrap();
    until("two ports", || sw.ports().len() == 3);
    let ports = sw.ports();
    assert!(
        ports.iter().any(|p| p.id == 7 && p.kind == "vde"),
        "{ports:?}"
    );
    assert!(
        ports.iter().any(|p| p.endpoint.contains("test a")),
        "{ports:?}"
    );

    // a → everyone (unknown destination), then the in-process port answers a by MAC.
    let (ma, ml) = ([2, 0, 0, 0, 0, 0xa], [2, 0, 0, 0, 0, 1]);
    a.data.send(&frame([0xff; 6], ma, 1)).unwrap();
    until("flooded to local", || local.try_recv().is_some());
    let mut buf = [0u8; 2048];
    b.data
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let n = b.data.recv(&mut buf).unwrap();
    assert_eq!(&buf[6..12], &ma, "b got a's broadcast");
    assert_eq!(n, 60);
    local.send(&frame(ma, ml, 2));
    a.data
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let n = a
        .data
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("{e}: {:#?}", sw.ports()));
    assert_eq!((n, buf[20]), (60, 2), "a got the unicast answer");

    // Asking for a port that is taken is refused; the switch serves on.
    assert!(VdeClient::connect(&dir, 7, "again").is_err());
    assert_eq!(server.refused(), 1);

    // Closing the control connection removes the port and its data socket.
    let b_socket = b.port_socket.clone();
    drop(b);
    until("port 7 gone", || sw.ports().iter().all(|p| p.id != 7));
    until("b's socket removed", || !b_socket.exists());

    drop(a);
    drop(server);
    assert!(!dir.exists(), "left behind: {:?}", names(top.path()));
    drop(local);
}

/// Requests that are not a libvdeplug request_v3, or that name someone else's socket, are
/// refused (connection closed, no answer, counted); a good client is served afterwards.
#[test]
fn bad_requests_are_refused_and_counted() {
    let top = tempfile::tempdir().unwrap();
    let dir = top.path().join("vde");
    let sw = Switch::new(SwitchConfig::default());
    let server = VdePlugServer::start(&sw, &dir, VdeOptions::default()).unwrap();
    let ctl = dir.join("ctl");

    let outside = top.path().join("outside.sock");
    let _outside = UnixDatagram::bind(&outside).unwrap();
    let inside = dir.join(".mine");
    let _inside = UnixDatagram::bind(&inside).unwrap();
    let file = dir.join(".file");
    std::fs::write(&file, "x").unwrap();
    let good = encode_request(0, &inside, "ok");
    let mut wrong_magic = good.clone();
    wrong_magic[0] = 0;
    let mut wrong_version = good.clone();
    wrong_version[4] = 2;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"hello switch\n".to_vec()),
        ("wrong magic", wrong_magic),
        ("wrong version", wrong_version),
        ("short", good[..60].to_vec()),
        ("outside", encode_request(0, &outside, "x")),
        ("relative", encode_request(0, Path::new("rel.sock"), "x")),
        ("not a socket", encode_request(0, &file, "x")),
        ("ctl itself", encode_request(0, &ctl, "x")),
        ("no such", encode_request(0, &dir.join(".gone"), "x")),
    ];
    for (i, (what, bytes)) in cases.iter().enumerate() {
        let mut c = UnixStream::connect(&ctl).unwrap();
        c.write_all(bytes).unwrap();
        if *what == "short" || *what == "garbage" {
            // A client that stops mid-request: closing its side ends the wait.
            c.shutdown(std::net::Shutdown::Write).unwrap();
        }
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut answer = Vec::new();
        let _ = c.read_to_end(&mut answer);
        assert!(answer.is_empty(), "{what}: answered {answer:?}");
        until(what, || server.refused() == i as u64 + 1);
    }
    assert_eq!(sw.ports().len(), 0);
    // Still serving.
    let ok = VdeClient::connect(&dir, 0, "after").unwrap();
    until("a port", || sw.ports().len() == 1);
    until("counted as accepted", || server.accepted() == 1);
    drop(ok);
    drop(server);
    std::fs::remove_file(&file).unwrap();
}

/// Sockets left in DIR by a switch that was killed are neither removed nor in the way.
#[test]
fn leftovers_of_a_killed_switch_are_kept_and_avoided() {
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("001.0");
    drop(UnixDatagram::bind(&stale).unwrap());
    let sw = Switch::new(SwitchConfig::default());
    let server = VdePlugServer::start(&sw, dir.path(), VdeOptions::default()).unwrap();
    let client = VdeClient::connect(dir.path(), 0, "after a crash").unwrap();
    assert!(stale.exists());
    assert_ne!(client.port_socket, std::fs::canonicalize(&stale).unwrap());
    drop(client);
    drop(server);
    assert!(stale.exists(), "a socket it did not make was removed");
}

#[test]
fn an_existing_ctl_is_never_replaced() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ctl"), "not yours").unwrap();
    let sw = Switch::new(SwitchConfig::default());
    let e = VdePlugServer::start(&sw, dir.path(), VdeOptions::default())
        .err()
        .unwrap();
    assert!(e.to_string().contains("exists"), "{e}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ctl")).unwrap(),
        "not yours"
    );
    assert!(dir.path().exists(), "a directory it did not make stays");
}
