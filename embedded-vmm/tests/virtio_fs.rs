//! The embedded VMM's virtio-fs device (virtio-mmio, answered by an in-process
//! virtiofs-bridge share), with the test as the guest's FUSE driver: INIT, LOOKUP, READ on
//! the store, a write refused with EROFS, and a malformed request answered without
//! stopping the device.

mod support;

use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress};

use embedded_vmm::memory::GuestRam;
use embedded_vmm::virtio::fs::FsDevice;
use embedded_vmm::virtio::mmio::MmioTransport;
use fuse_backend_rs::abi::fuse_abi::{
    EntryOut, InitIn, InitOut, MkdirIn, Opcode, OpenIn, OpenOut, ReadIn,
};
use support::{Driver, DESC_F_NEXT, DESC_F_WRITE};
use virtiofs_bridge::{InProcessShare, ShareConfig};
use vm_memory::ByteValued;
use vmbuild_tests::fuse_client::{decode, encode, Errno, FuseResult};

const REQ_AT: u64 = 0x100000;
const REPLY_AT: u64 = 0x200000;
const REPLY_CAP: u32 = 64 << 10;

struct Fs {
    d: Driver,
    unique: u64,
    next_head: u16,
}

impl Fs {
    /// One request on the request queue (1): a readable descriptor with the request, a
    /// writable one for the reply.
    fn request(&mut self, op: Opcode, node: u64, parts: &[&[u8]]) -> FuseResult<Vec<u8>> {
        self.unique += 1;
        let req = encode(op, self.unique, node, 0, 0, parts);
        self.raw(&req)
    }

    fn raw(&mut self, req: &[u8]) -> FuseResult<Vec<u8>> {
        let head = self.next_head;
        self.next_head = (self.next_head + 2) % support::QSIZE;
        self.d.ram.write_slice(req, GuestAddress(REQ_AT)).unwrap();
        self.d
            .desc(1, head, REQ_AT, req.len() as u32, DESC_F_NEXT, head + 1);
        self.d
            .desc(1, head + 1, REPLY_AT, REPLY_CAP, DESC_F_WRITE, 0);
        let before = self.d.used_idx(1);
        self.d.post(1, head);
        self.d.wait_used(1, before.wrapping_add(1));
        let (id, len) = self.d.used_elem(1, before);
        assert_eq!(id, u32::from(head));
        let mut reply = vec![0u8; len as usize];
        self.d
            .ram
            .read_slice(&mut reply, GuestAddress(REPLY_AT))
            .unwrap();
        if len == 0 {
            return Err(Errno(0));
        }
        decode(&reply)
    }
}

fn obj<T: ByteValued + Default>(b: &[u8]) -> T {
    let mut t = T::default();
    let n = std::mem::size_of::<T>().min(b.len());
    t.as_mut_slice()[..n].copy_from_slice(&b[..n]);
    t
}

fn setup(store: &std::path::Path) -> (Fs, Arc<InProcessShare>) {
    let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
    let share = Arc::new(InProcessShare::new(&ShareConfig::store(store)).unwrap());
    let dev = FsDevice::new(share.clone()).unwrap();
    let t = MmioTransport::new(Box::new(dev), ram.memory().clone(), None);
    let mut d = Driver::init(ram, t, 26, 1 << 32, 2);
    let mut tag = [0u8; 36];
    d.t.read(0x100, &mut tag);
    assert_eq!(&tag[..share.tag().len()], share.tag().as_bytes());
    let mut nq = [0u8; 4];
    d.t.read(0x100 + 36, &mut nq);
    assert_eq!(u32::from_le_bytes(nq), 1, "one request queue");
    let mut fs = Fs {
        d,
        unique: 0,
        next_head: 0,
    };
    let init = InitIn {
        major: 7,
        minor: 31,
        max_readahead: 128 << 10,
        flags: 0,
    };
    let out: InitOut = obj(&fs.request(Opcode::Init, 0, &[init.as_slice()]).unwrap());
    assert_eq!(out.major, 7);
    (fs, share)
}

#[test]
fn the_store_is_read_through_the_in_process_device_and_refuses_writes() {
    let store = tempfile::tempdir().unwrap();
    std::fs::write(store.path().join("hello.txt"), "hello from the host\n").unwrap();
    let (mut fs, share) = setup(store.path());

    let e: EntryOut = obj(&fs.request(Opcode::Lookup, 1, &[b"hello.txt\0"]).unwrap());
    assert_eq!(e.attr.size, 20);
    let open = OpenIn {
        flags: libc::O_RDONLY as u32,
        ..Default::default()
    };
    let opened: OpenOut = obj(&fs
        .request(Opcode::Open, e.nodeid, &[open.as_slice()])
        .unwrap());
    let read = ReadIn {
        fh: opened.fh,
        offset: 0,
        size: 20,
        ..Default::default()
    };
    let data = fs
        .request(Opcode::Read, e.nodeid, &[read.as_slice()])
        .unwrap();
    assert_eq!(data, b"hello from the host\n");

    let mkdir = MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    let refused = fs.request(Opcode::Mkdir, 1, &[mkdir.as_slice(), b"new\0"]);
    assert_eq!(refused, Err(Errno(libc::EROFS)));
    assert!(!store.path().join("new").exists());
    assert_eq!(
        fs.request(Opcode::Lookup, 1, &[b"missing\0"]),
        Err(Errno(libc::ENOENT))
    );
    assert!(share.stats().requests >= 5, "{:?}", share.stats());
}

#[test]
fn a_malformed_request_is_answered_and_the_device_keeps_serving() {
    let store = tempfile::tempdir().unwrap();
    std::fs::write(store.path().join("f"), "x").unwrap();
    let (mut fs, share) = setup(store.path());
    // A header that claims 4 KiB of body, with 2 bytes present.
    let mut req = encode(Opcode::Lookup, 99, 1, 0, 0, &[b"f\0"]);
    req[0..4].copy_from_slice(&4096u32.to_le_bytes());
    let answer = fs.raw(&req);
    assert!(
        answer.is_err(),
        "a truncated request got a success: {answer:?}"
    );
    // A LOOKUP without its name.
    let odd = fs.raw(&encode(Opcode::Lookup, 100, 1, 0, 0, &[])[..40]);
    assert!(odd.is_err());
    // Still serving.
    let e: EntryOut = obj(&fs.request(Opcode::Lookup, 1, &[b"f\0"]).unwrap());
    assert_eq!(e.attr.size, 1);
    let s = share.stats();
    assert!(s.malformed + s.bad_descriptors >= 1, "{s:?}");
}

/// A virtio-fs device that has served its guest cannot be snapshotted (the FUSE session
/// lives in the share server and is not saved); one that has not, can.
#[test]
fn a_used_virtio_fs_share_refuses_a_snapshot() {
    let store = tempfile::tempdir().unwrap();
    let ram = Arc::new(GuestRam::new(4 << 20).unwrap());
    let share = Arc::new(InProcessShare::new(&ShareConfig::store(store.path())).unwrap());
    let t = MmioTransport::new(
        Box::new(FsDevice::new(share).unwrap()),
        ram.memory().clone(),
        None,
    );
    let d = Driver::init(ram, t, 26, 1 << 32, 2);
    assert!(d.t.snapshot_blocker().is_none(), "a driver alone is fine");
    let mut fs = Fs {
        d,
        unique: 0,
        next_head: 0,
    };
    let init = InitIn {
        major: 7,
        minor: 31,
        max_readahead: 128 << 10,
        flags: 0,
    };
    fs.request(Opcode::Init, 0, &[init.as_slice()]).unwrap();
    let why = fs.d.t.snapshot_blocker().expect("blocked once used");
    assert!(why.contains("9p"), "{why}");
}
