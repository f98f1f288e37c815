//! virtio-9p (9P2000.L) on a read-only share, with the test as the guest's 9p client:
//! version, attach, walk, open, read, readdir, getattr, readlink; `..` stays inside the
//! share, a symlink planted to point out is only ever read as a link, writes are refused
//! with EROFS, and malformed messages are answered without stopping the device.

mod support;

use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress};

use embedded_vmm::memory::GuestRam;
use embedded_vmm::virtio::mmio::MmioTransport;
use embedded_vmm::virtio::ninep::NinepDevice;
use support::{Driver, DESC_F_NEXT, DESC_F_WRITE};
use virtiofs_bridge::ninep::NinepServer;
use virtiofs_bridge::ShareConfig;

const RLERROR: u8 = 7;
const REQ_AT: u64 = 0x100000;
const REPLY_AT: u64 = 0x200000;

struct Client {
    d: Driver,
    tag: u16,
    head: u16,
}

fn msg(kind: u8, tag: u16, body: &[u8]) -> Vec<u8> {
    let mut m = ((7 + body.len()) as u32).to_le_bytes().to_vec();
    m.push(kind);
    m.extend_from_slice(&tag.to_le_bytes());
    m.extend_from_slice(body);
    m
}

fn s(v: &[u8]) -> Vec<u8> {
    let mut o = (v.len() as u16).to_le_bytes().to_vec();
    o.extend_from_slice(v);
    o
}

impl Client {
    /// Sends raw bytes; returns (reply type, reply body).
    fn raw(&mut self, req: &[u8]) -> (u8, Vec<u8>) {
        let head = self.head;
        self.head = (self.head + 2) % support::QSIZE;
        self.d.ram.write_slice(req, GuestAddress(REQ_AT)).unwrap();
        self.d
            .desc(0, head, REQ_AT, req.len() as u32, DESC_F_NEXT, head + 1);
        self.d
            .desc(0, head + 1, REPLY_AT, 64 << 10, DESC_F_WRITE, 0);
        let before = self.d.used_idx(0);
        self.d.post(0, head);
        self.d.wait_used(0, before.wrapping_add(1));
        let (_, len) = self.d.used_elem(0, before);
        let mut reply = vec![0u8; len as usize];
        self.d
            .ram
            .read_slice(&mut reply, GuestAddress(REPLY_AT))
            .unwrap();
        if reply.is_empty() {
            return (0, Vec::new());
        }
        assert_eq!(
            u32::from_le_bytes(reply[..4].try_into().unwrap()) as usize,
            reply.len()
        );
        (reply[4], reply[7..].to_vec())
    }

    fn call(&mut self, kind: u8, body: &[u8]) -> Result<Vec<u8>, u32> {
        self.tag += 1;
        let (t, b) = self.raw(&msg(kind, self.tag, body));
        if t == RLERROR {
            return Err(u32::from_le_bytes(b[..4].try_into().unwrap()));
        }
        assert_eq!(t, kind + 1, "reply type");
        Ok(b)
    }

    fn walk(&mut self, fid: u32, newfid: u32, names: &[&[u8]]) -> Result<Vec<u8>, u32> {
        let mut b = fid.to_le_bytes().to_vec();
        b.extend_from_slice(&newfid.to_le_bytes());
        b.extend_from_slice(&(names.len() as u16).to_le_bytes());
        for n in names {
            b.extend(s(n));
        }
        self.call(110, &b)
    }
}

fn setup(dir: &std::path::Path) -> (Client, Arc<NinepServer>) {
    let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
    let mut cfg = ShareConfig::store(dir);
    cfg.tag = "store9p".into();
    let server = Arc::new(NinepServer::new(&cfg).unwrap());
    let t = MmioTransport::new(
        Box::new(NinepDevice::new(server.clone())),
        ram.memory().clone(),
        None,
    );
    let mut d = Driver::init(ram, t, 9, (1 << 32) | 1, 1);
    let mut cfg_bytes = [0u8; 9];
    d.t.read(0x100, &mut cfg_bytes);
    assert_eq!(u16::from_le_bytes([cfg_bytes[0], cfg_bytes[1]]), 7);
    assert_eq!(&cfg_bytes[2..], b"store9p");
    let mut c = Client { d, tag: 0, head: 0 };
    let mut v = (64u32 << 10).to_le_bytes().to_vec();
    v.extend(s(b"9P2000.L"));
    let r = c.call(100, &v).unwrap();
    assert_eq!(&r[4..], &s(b"9P2000.L")[..]);
    let mut a = 0u32.to_le_bytes().to_vec(); // fid 0
    a.extend_from_slice(&u32::MAX.to_le_bytes()); // no afid
    a.extend(s(b"root"));
    a.extend(s(b""));
    a.extend_from_slice(&0u32.to_le_bytes());
    let q = c.call(104, &a).unwrap();
    assert_eq!(q[0], 0x80, "the root is a directory");
    (c, server)
}

#[test]
fn the_store_is_read_over_9p() {
    let store = tempfile::tempdir().unwrap();
    std::fs::create_dir(store.path().join("pkg")).unwrap();
    std::fs::write(store.path().join("pkg/data"), "nine pee\n").unwrap();
    let (mut c, _) = setup(store.path());

    c.walk(0, 1, &[b"pkg", b"data"]).unwrap();
    let mut open = 1u32.to_le_bytes().to_vec();
    open.extend_from_slice(&(libc::O_RDONLY as u32).to_le_bytes());
    c.call(12, &open).unwrap();
    let mut read = 1u32.to_le_bytes().to_vec();
    read.extend_from_slice(&0u64.to_le_bytes());
    read.extend_from_slice(&4096u32.to_le_bytes());
    let r = c.call(116, &read).unwrap();
    assert_eq!(u32::from_le_bytes(r[..4].try_into().unwrap()), 9);
    assert_eq!(&r[4..], b"nine pee\n");

    let mut getattr = 1u32.to_le_bytes().to_vec();
    getattr.extend_from_slice(&0x7ffu64.to_le_bytes());
    let g = c.call(24, &getattr).unwrap();
    // valid[8] qid[13] mode[4] uid[4] gid[4] nlink[8] rdev[8] size[8]
    let size = u64::from_le_bytes(
        g[8 + 13 + 12 + 16..8 + 13 + 12 + 16 + 8]
            .try_into()
            .unwrap(),
    );
    assert_eq!(size, 9);

    // readdir of the root lists pkg.
    c.walk(0, 2, &[]).unwrap();
    let mut open = 2u32.to_le_bytes().to_vec();
    open.extend_from_slice(&((libc::O_RDONLY | libc::O_DIRECTORY) as u32).to_le_bytes());
    c.call(12, &open).unwrap();
    let mut rd = 2u32.to_le_bytes().to_vec();
    rd.extend_from_slice(&0u64.to_le_bytes());
    rd.extend_from_slice(&8192u32.to_le_bytes());
    let listing = c.call(40, &rd).unwrap();
    assert!(listing.windows(3).any(|w| w == b"pkg"));

    // clunk; a clunked fid is gone.
    c.call(120, &1u32.to_le_bytes()).unwrap();
    assert_eq!(c.call(116, &read), Err(libc::EBADF as u32));
}

#[test]
fn nothing_leads_out_of_the_share_and_nothing_is_written() {
    let root = tempfile::tempdir().unwrap();
    let store = root.path().join("store");
    std::fs::create_dir(&store).unwrap();
    std::fs::write(root.path().join("secret"), "outside").unwrap();
    std::os::unix::fs::symlink("../secret", store.join("escape")).unwrap();
    let (mut c, server) = setup(&store);

    // `..` from the root stays at the root.
    c.walk(0, 1, &[b".."]).unwrap();
    assert_eq!(c.walk(1, 2, &[b"secret"]), Err(libc::ENOENT as u32));
    // A name with a slash is not a path.
    assert!(c.walk(0, 3, &[b"../secret"]).is_err());
    // The planted symlink is a link: reading it gives its text, opening it fails.
    c.walk(0, 4, &[b"escape"]).unwrap();
    let link = c.call(22, &4u32.to_le_bytes()).unwrap();
    assert_eq!(&link[2..], b"../secret");
    let mut open = 4u32.to_le_bytes().to_vec();
    open.extend_from_slice(&(libc::O_RDONLY as u32).to_le_bytes());
    assert_eq!(c.call(12, &open), Err(libc::ELOOP as u32));

    // Writes: opening for writing, mkdir, write.
    c.walk(0, 5, &[]).unwrap();
    let mut open = 5u32.to_le_bytes().to_vec();
    open.extend_from_slice(&(libc::O_RDWR as u32).to_le_bytes());
    assert_eq!(c.call(12, &open), Err(libc::EROFS as u32));
    let mut mkdir = 0u32.to_le_bytes().to_vec();
    mkdir.extend(s(b"new"));
    mkdir.extend_from_slice(&0o755u32.to_le_bytes());
    mkdir.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(c.call(72, &mkdir), Err(libc::EROFS as u32));
    assert!(!store.join("new").exists());
    assert_eq!(server.stats().refused_writes, 2);
}

#[test]
fn malformed_messages_are_answered_and_the_device_keeps_serving() {
    let store = tempfile::tempdir().unwrap();
    std::fs::write(store.path().join("f"), "x").unwrap();
    let (mut c, server) = setup(store.path());
    // A size beyond the message.
    let mut m = msg(110, 77, &[1, 2, 3]);
    m[0..4].copy_from_slice(&1000u32.to_le_bytes());
    let (t, b) = c.raw(&m);
    assert_eq!(
        (t, u32::from_le_bytes(b[..4].try_into().unwrap())),
        (RLERROR, libc::EINVAL as u32)
    );
    // A walk that claims more names than it carries.
    let mut w = 0u32.to_le_bytes().to_vec();
    w.extend_from_slice(&9u32.to_le_bytes());
    w.extend_from_slice(&3u16.to_le_bytes());
    w.extend(s(b"f"));
    let (t, _) = c.raw(&msg(110, 78, &w));
    assert_eq!(t, RLERROR);
    // Three bytes: not even a header.
    let (t, _) = c.raw(&[1, 2, 3]);
    assert_eq!(t, 0, "no reply without a tag");
    assert!(server.stats().malformed >= 3, "{:?}", server.stats());
    // Still serving.
    c.walk(0, 10, &[b"f"]).unwrap();
}

/// A live 9p device in a snapshot: the transport's state carries the session (the
/// guest's fids), and a device restored from it, on a new server, answers the guest's
/// open fids where a virtio-fs share could not (its FUSE session is not saved, so a used
/// virtio-fs device refuses to be snapshotted instead).
#[test]
fn a_live_9p_session_survives_a_snapshot() {
    let xchg = tempfile::tempdir().unwrap();
    std::fs::write(xchg.path().join("log"), "line 1\n").unwrap();
    let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
    let mut cfg = ShareConfig::xchg(xchg.path());
    cfg.tag = "xchg9p".into();
    let t = MmioTransport::new(
        Box::new(NinepDevice::new(Arc::new(NinepServer::new(&cfg).unwrap()))),
        ram.memory().clone(),
        None,
    );
    let d = Driver::init(ram, t, 9, (1 << 32) | 1, 1);
    let mut c = Client { d, tag: 0, head: 0 };
    let mut v = (64u32 << 10).to_le_bytes().to_vec();
    v.extend(s(b"9P2000.L"));
    c.call(100, &v).unwrap();
    let mut a = 0u32.to_le_bytes().to_vec();
    a.extend_from_slice(&u32::MAX.to_le_bytes());
    a.extend(s(b"root"));
    a.extend(s(b""));
    a.extend_from_slice(&0u32.to_le_bytes());
    c.call(104, &a).unwrap();
    c.walk(0, 1, &[b"log"]).unwrap();
    let mut open = 1u32.to_le_bytes().to_vec();
    open.extend_from_slice(&(libc::O_RDWR as u32).to_le_bytes());
    c.call(12, &open).unwrap();
    assert!(c.d.t.snapshot_blocker().is_none());

    // Save, as a snapshot's state file keeps it, and restore onto a new server.
    let state: embedded_vmm::virtio::mmio::TransportState =
        serde_json::from_str(&serde_json::to_string(&c.d.t.save()).unwrap()).unwrap();
    assert!(state.device.is_some(), "the 9p session is saved");
    let fresh = NinepDevice::new(Arc::new(NinepServer::new(&cfg).unwrap()));
    c.d.t =
        MmioTransport::restore(Box::new(fresh), c.d.ram.memory().clone(), None, &state).unwrap();
    let mut write = 1u32.to_le_bytes().to_vec();
    write.extend_from_slice(&7u64.to_le_bytes());
    write.extend_from_slice(&7u32.to_le_bytes());
    write.extend_from_slice(b"line 2\n");
    let r = c.call(118, &write).unwrap();
    assert_eq!(u32::from_le_bytes(r[..4].try_into().unwrap()), 7);
    let mut read = 1u32.to_le_bytes().to_vec();
    read.extend_from_slice(&0u64.to_le_bytes());
    read.extend_from_slice(&4096u32.to_le_bytes());
    let r = c.call(116, &read).unwrap();
    assert_eq!(&r[4..], b"line 1\nline 2\n");
    assert_eq!(
        std::fs::read_to_string(xchg.path().join("log")).unwrap(),
        "line 1\nline 2\n"
    );
}
