//! `virtqueue`: what a guest driver controls of an embedded-VMM virtio device, behind
//! its virtio-mmio transport: the registers, the split rings (descriptor tables, avail
//! and used rings), indirect tables, and the buffers, in guest memory of two regions
//! with a hole between them, each fenced by guard pages. The devices: net (on a port the
//! harness plays), fs (an in-process share of the store), 9p (the store), console,
//! block (an image file).
//!
//! Input: `device[1]` (0 net, 1 fs, 2 9p, 3 console, 4 block), then operations, each an
//! opcode byte and its operands (see [`Op`]). Before them the harness brings the device
//! up as a driver would: features, queues of 16 entries at fixed addresses, DRIVER_OK.
//!
//! Checked: no access outside guest memory (the guard pages turn one into a crash); after
//! every operation that lets the device run, every byte of guest memory that changed lies
//! in a used ring or in a buffer some descriptor marks device-writable; at the end, after
//! a reset and a fresh setup, the device serves a well-formed request correctly; the
//! block device's image is unchanged; no device thread panicked.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use embedded_vmm::backend::FramePort;
use embedded_vmm::virtio::block::BlockDevice;
use embedded_vmm::virtio::console::{ConsoleDevice, ConsoleHandle};
use embedded_vmm::virtio::fs::FsDevice;
use embedded_vmm::virtio::mmio::MmioTransport;
use embedded_vmm::virtio::net::NetDevice;
use embedded_vmm::virtio::ninep::NinepDevice;
use embedded_vmm::virtio::{
    VirtioDevice, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};
use virtiofs_bridge::ninep::NinepServer;
use virtiofs_bridge::{InProcessShare, ShareConfig};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::common::{env, Input};
use crate::mem::{guest_memory, snapshot, write_desc, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};

pub const NET: u8 = 0;
pub const FS: u8 = 1;
pub const NINEP: u8 = 2;
pub const CONSOLE: u8 = 3;
pub const BLOCK: u8 = 4;

/// Guest memory: region A, a hole, region B.
const A: (u64, usize) = (0, 0x40000);
const B: (u64, usize) = (0x50000, 0x10000);
/// Addresses the fuzzer names are folded into this span (both regions, the hole, and a
/// little past the end); an address with bit 31 set is taken far outside instead.
const SPAN: u64 = 0x64000;
pub const QSIZE: u16 = 16;
/// Where the harness's own setup puts queue `q`'s rings.
pub fn rings(q: usize) -> (u64, u64, u64) {
    let base = 0x4000 * q as u64;
    (base, base + 0x1000, base + 0x2000)
}
/// The buffers of the harness's own requests.
const BUF: u64 = 0x20000;
const REPLY: u64 = 0x30000;

/// The operations, by opcode (the byte is taken modulo their number).
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
pub enum Op {
    /// `addr[4] len[1] bytes[len]`: the driver writes guest memory.
    WriteMem = 0,
    /// `q[1] i[1] addr[4] len[2] flags[1] next[1]`: descriptor `i` of queue `q`'s table.
    Desc,
    /// `table[4] i[1] addr[4] len[2] flags[1] next[1]`: a descriptor in any table (an
    /// indirect one).
    DescAt,
    /// `q[1] head[1]`: puts `head` in the avail ring, moves its index, notifies.
    Post,
    /// `q[1] idx[2]`: sets the avail index to anything and notifies.
    AvailIdx,
    /// `offset[2] value[4]`: a 32-bit register write (config space included).
    MmioWrite,
    /// `offset[2] size[1]`: a register read of 1, 2, 4 or 8 bytes.
    MmioRead,
    /// `q[1]`: a notify of queue `q` (any number).
    Notify,
    /// `len[2] bytes[len]`: the host side sends (a frame for net, bytes for console).
    Host,
    /// Resets the device and sets it up again.
    Reinit,
}

const OPS: u8 = 10;

/// A port the harness plays: frames the NIC sends are kept; a frame for the guest is
/// handed to the device's receive thread when the harness arms one.
#[derive(Default)]
struct Port {
    state: Mutex<PortState>,
    changed: Condvar,
}

#[derive(Default)]
struct PortState {
    sent: Vec<Vec<u8>>,
    armed: Option<Vec<u8>>,
    /// Calls of `recv_timeout`: the receive thread is back for more.
    polls: u64,
}

impl FramePort for Port {
    fn send(&self, frame: &[u8]) {
        self.state.lock().unwrap().sent.push(frame.to_vec());
    }

    fn recv_timeout(&self, timeout: Duration) -> Option<Vec<u8>> {
        let mut s = self.state.lock().unwrap();
        s.polls += 1;
        self.changed.notify_all();
        if s.armed.is_none() {
            // Short waits: the device joins this thread at every reset.
            s = self
                .changed
                .wait_timeout(s, timeout.min(Duration::from_millis(2)))
                .unwrap()
                .0;
        }
        let f = s.armed.take();
        if f.is_some() {
            self.changed.notify_all();
        }
        f
    }
}

impl Port {
    /// Hands `frame` to the receive thread and waits until it has been delivered (the
    /// thread is polling again). False if no thread took it.
    fn deliver(&self, frame: Vec<u8>) -> bool {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut s = self.state.lock().unwrap();
        s.armed = Some(frame);
        self.changed.notify_all();
        while s.armed.is_some() {
            if Instant::now() > deadline {
                s.armed = None;
                return false;
            }
            s = self
                .changed
                .wait_timeout(s, Duration::from_millis(10))
                .unwrap()
                .0;
        }
        let polls = s.polls;
        while s.polls == polls {
            assert!(
                Instant::now() < deadline,
                "the NIC's receive thread never came back"
            );
            s = self
                .changed
                .wait_timeout(s, Duration::from_millis(10))
                .unwrap()
                .0;
        }
        true
    }
}

enum Extra {
    Net(Arc<Port>),
    Console(ConsoleHandle),
    None,
}

struct Rig {
    kind: u8,
    mem: GuestMemoryMmap,
    t: MmioTransport,
    extra: Extra,
    nqueues: usize,
    next_avail: Vec<u16>,
}

fn block_image() -> &'static std::path::Path {
    static IMAGE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    IMAGE.get_or_init(|| {
        let p = env().base().join("disk.img");
        std::fs::write(&p, crate::common::content(9, 64 << 10)).unwrap();
        p
    })
}

fn device(kind: u8) -> (Box<dyn VirtioDevice>, Extra) {
    let env = env();
    match kind {
        NET => {
            let port = Arc::new(Port::default());
            let dev = NetDevice::on_port(port.clone(), [2, 0, 0, 0, 0, 1]);
            (Box::new(dev), Extra::Net(port))
        }
        FS => {
            let share = InProcessShare::new(&ShareConfig::store(env.store())).unwrap();
            (
                Box::new(FsDevice::new(Arc::new(share)).unwrap()),
                Extra::None,
            )
        }
        NINEP => {
            let server = NinepServer::new(&ShareConfig::store(env.store())).unwrap();
            (Box::new(NinepDevice::new(Arc::new(server))), Extra::None)
        }
        CONSOLE => {
            let (dev, handle) = ConsoleDevice::new();
            (Box::new(dev), Extra::Console(handle))
        }
        _ => (
            Box::new(BlockDevice::open(block_image()).unwrap()),
            Extra::None,
        ),
    }
}

impl Rig {
    fn new(kind: u8) -> Rig {
        let mem = guest_memory(&[A, B]);
        let (dev, extra) = device(kind);
        let nqueues = dev.queue_max_sizes().len();
        let t = MmioTransport::new(dev, mem.clone(), None);
        let mut rig = Rig {
            kind,
            mem,
            t,
            extra,
            nqueues,
            next_avail: vec![0; nqueues],
        };
        rig.setup();
        rig
    }

    fn r(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    /// Reset, then what a driver does: features, queues, DRIVER_OK.
    fn setup(&mut self) {
        self.clear_rings();
        self.bring_up();
    }

    /// The driver zeroes the rings it is about to hand over.
    fn clear_rings(&mut self) {
        for q in 0..self.nqueues {
            let (desc, avail, used) = rings(q);
            for a in [desc, avail, used] {
                let _ = self.mem.write_slice(&[0u8; 0x1000], GuestAddress(a));
            }
        }
    }

    /// The register writes of a reset and a driver's setup.
    fn bring_up(&mut self) {
        self.w(0x70, 0);
        self.w(0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        for sel in 0..2u32 {
            self.w(0x14, sel);
            let offered = self.r(0x10);
            self.w(0x24, sel);
            self.w(0x20, offered);
        }
        self.w(
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        for q in 0..self.nqueues {
            let (desc, avail, used) = rings(q);
            self.w(0x30, q as u32);
            self.w(0x38, u32::from(QSIZE));
            self.w(0x80, desc as u32);
            self.w(0x84, 0);
            self.w(0x90, avail as u32);
            self.w(0x94, 0);
            self.w(0xa0, used as u32);
            self.w(0xa4, 0);
            self.w(0x44, 1);
        }
        self.w(
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_ne!(
            self.t.status() & STATUS_DRIVER_OK,
            0,
            "the device did not come up"
        );
        self.next_avail = vec![0; self.nqueues];
    }

    /// Puts `head` in queue `q`'s avail ring and moves the index (no notify).
    fn make_available(&mut self, q: usize, head: u16) {
        let (_, avail, _) = rings(q);
        let n = &mut self.next_avail[q];
        let slot = avail + 4 + 2 * u64::from(*n % QSIZE);
        let _ = self.mem.write_obj(head, GuestAddress(slot));
        *n = n.wrapping_add(1);
        let _ = self.mem.write_obj(*n, GuestAddress(avail + 2));
    }

    fn post(&mut self, q: usize, head: u16) {
        self.make_available(q, head);
        self.w(0x50, q as u32);
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .read_obj::<u16>(GuestAddress(rings(q).2 + 2))
            .unwrap()
    }

    fn used_elem(&self, q: usize, n: u16) -> (u32, u32) {
        let at = rings(q).2 + 4 + 8 * u64::from(n % QSIZE);
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    /// Where the device may write now: the used rings of its queues and every buffer a
    /// descriptor (or an indirect table's descriptor) marks device-writable.
    fn writable(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for q in self.t.save().queues {
            if !q.ready {
                continue;
            }
            let size = u64::from(q.size);
            out.push((q.used_ring, q.used_ring + 4 + 8 * size + 2));
            for i in 0..size {
                let Some((addr, len, flags)) = self.desc_at(q.desc_table.wrapping_add(16 * i))
                else {
                    continue;
                };
                if flags & DESC_F_WRITE != 0 {
                    out.push((addr, addr.saturating_add(u64::from(len))));
                }
                if flags & DESC_F_INDIRECT != 0 {
                    for j in 0..u64::from(len / 16).min(4096) {
                        if let Some((a, l, f)) = self.desc_at(addr.wrapping_add(16 * j)) {
                            if f & DESC_F_WRITE != 0 {
                                out.push((a, a.saturating_add(u64::from(l))));
                            }
                        }
                    }
                }
            }
        }
        out
    }

    fn desc_at(&self, at: u64) -> Option<(u64, u32, u16)> {
        let mut d = [0u8; 16];
        self.mem.read_slice(&mut d, GuestAddress(at)).ok()?;
        Some((
            u64::from_le_bytes(d[..8].try_into().unwrap()),
            u32::from_le_bytes(d[8..12].try_into().unwrap()),
            u16::from_le_bytes(d[12..14].try_into().unwrap()),
        ))
    }

    /// Runs `f` (which lets the device touch guest memory) and checks that whatever
    /// changed lay where the device may write.
    fn checked(&mut self, what: &str, f: impl FnOnce(&mut Rig)) {
        let before = snapshot(&self.mem);
        let mut allowed = self.writable();
        f(self);
        allowed.extend(self.writable());
        let after = snapshot(&self.mem);
        for ((base, old), (_, new)) in before.iter().zip(&after) {
            // Page by page: most pages are untouched, and comparing whole slices is one
            // call where a byte loop would be a traced comparison per byte.
            for (p, (a, b)) in old.chunks(4096).zip(new.chunks(4096)).enumerate() {
                if a == b {
                    continue;
                }
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    let addr = base + (p * 4096 + i) as u64;
                    if x != y && !allowed.iter().any(|&(s, e)| s <= addr && addr < e) {
                        panic!(
                            "{what}: the device wrote guest memory at {addr:#x}, which no \
                             used ring or device-writable descriptor covers"
                        );
                    }
                }
            }
        }
    }
}

/// A guest address from the fuzzer's 32 bits.
fn addr(v: u32) -> u64 {
    if v & 0x8000_0000 != 0 {
        u64::from(v) << 20
    } else {
        u64::from(v) % SPAN
    }
}

fn len(v: u16) -> u32 {
    if v == u16::MAX {
        u32::MAX
    } else {
        u32::from(v)
    }
}

pub fn run(data: &[u8]) {
    crate::common::harness_thread();
    let env = env();
    let mut input = Input::new(data);
    let kind = input.u8() % 5;
    let mut rig = Rig::new(kind);
    while !input.is_empty() {
        let op = input.u8() % OPS;
        match op {
            0 => {
                let at = addr(input.u32());
                let n = usize::from(input.u8());
                let bytes = input.take(n);
                let _ = rig.mem.write_slice(bytes, GuestAddress(at));
            }
            1 | 2 => {
                let (table, i) = if op == 1 {
                    let q = usize::from(input.u8()) % rig.nqueues;
                    (rings(q).0, u16::from(input.u8()) % QSIZE)
                } else {
                    (addr(input.u32()), u16::from(input.u8()))
                };
                let (a, l) = (addr(input.u32()), len(input.u16()));
                let (flags, next) = (u16::from(input.u8()), u16::from(input.u8()));
                write_desc(&rig.mem, table, i, a, l, flags, next);
            }
            3 => {
                let q = usize::from(input.u8()) % rig.nqueues;
                let head = u16::from(input.u8());
                rig.make_available(q, head);
                rig.checked("a posted chain", |r| r.w(0x50, q as u32));
            }
            4 => {
                let q = usize::from(input.u8()) % rig.nqueues;
                let idx = input.u16();
                let avail = rings(q).1;
                let _ = rig.mem.write_obj(idx, GuestAddress(avail + 2));
                rig.checked("a moved avail index", |r| r.w(0x50, q as u32));
            }
            5 => {
                let off = u64::from(input.u16()) % 0x120;
                let v = input.u32();
                rig.checked("a register write", |r| r.t.write(off, &v.to_le_bytes()));
            }
            6 => {
                let off = u64::from(input.u16()) % 0x120;
                let size = [1usize, 2, 4, 8][usize::from(input.u8() & 3)];
                let mut b = vec![0u8; size];
                rig.t.read(off, &mut b);
            }
            7 => {
                let q = u32::from(input.u8());
                rig.checked("a notify", |r| r.w(0x50, q));
            }
            8 => {
                let bytes = input.record().to_vec();
                host_sends(&mut rig, bytes);
            }
            _ => {
                rig.clear_rings();
                rig.checked("a reset and setup", |r| r.bring_up());
            }
        }
    }
    rig.setup();
    still_serves(&mut rig);
    drop(rig);
    assert_eq!(
        std::fs::read(block_image()).unwrap(),
        crate::common::content(9, 64 << 10),
        "the block device's image was written"
    );
    env.check_unchanged();
    crate::common::check_no_panic_elsewhere();
}

fn host_sends(rig: &mut Rig, bytes: Vec<u8>) {
    match &rig.extra {
        Extra::Net(port) => {
            if rig.t.status() & STATUS_DRIVER_OK != 0 {
                let port = port.clone();
                rig.checked("a frame for the guest", move |_| {
                    port.deliver(bytes);
                });
            }
        }
        Extra::Console(h) => {
            let h = h.clone();
            rig.checked("bytes for the guest", move |_| {
                h.send(&bytes);
            });
        }
        Extra::None => {}
    }
}

/// After a reset and a fresh setup, one well-formed request gets its right answer.
fn still_serves(rig: &mut Rig) {
    let mem = rig.mem.clone();
    // A chain: readable `req` at BUF, then `cap` writable bytes at REPLY.
    let chain = |rig: &mut Rig, q: usize, req: &[u8], cap: u32| -> (u32, Vec<u8>) {
        let (desc, _, _) = rings(q);
        mem.write_slice(req, GuestAddress(BUF)).unwrap();
        let mut n = 0u16;
        if !req.is_empty() {
            let flags = if cap > 0 { DESC_F_NEXT } else { 0 };
            write_desc(&mem, desc, 0, BUF, req.len() as u32, flags, 1);
            n = 1;
        }
        if cap > 0 {
            write_desc(&mem, desc, n, REPLY, cap, DESC_F_WRITE, 0);
        }
        let before = rig.used_idx(q);
        rig.post(q, 0);
        let deadline = Instant::now() + Duration::from_secs(2);
        while rig.used_idx(q) == before {
            assert!(
                Instant::now() < deadline,
                "the device never used a good chain"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let (id, used) = rig.used_elem(q, before);
        assert_eq!(id, 0, "the device used another chain");
        let mut reply = vec![0u8; used.min(cap) as usize];
        mem.read_slice(&mut reply, GuestAddress(REPLY)).unwrap();
        (used, reply)
    };
    match rig.kind {
        NET => {
            let Extra::Net(port) = &rig.extra else {
                unreachable!()
            };
            let port = port.clone();
            let mut frame = vec![0u8; 12];
            frame.extend_from_slice(&[0xff; 6]);
            frame.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x00]);
            frame.extend_from_slice(&[0x45; 46]);
            port.state.lock().unwrap().sent.clear();
            chain(rig, 1, &frame, 0);
            let sent = std::mem::take(&mut port.state.lock().unwrap().sent);
            assert_eq!(
                sent,
                vec![frame[12..].to_vec()],
                "the NIC did not send the frame"
            );
            // A receive buffer, then a frame for it.
            let (desc, _, _) = rings(0);
            write_desc(&mem, desc, 0, REPLY, 2048, DESC_F_WRITE, 0);
            let before = rig.used_idx(0);
            rig.post(0, 0);
            assert!(port.deliver(frame[12..].to_vec()), "the NIC took no frame");
            assert_ne!(rig.used_idx(0), before, "the NIC did not fill the buffer");
            let (_, used) = rig.used_elem(0, before);
            assert_eq!(
                used as usize,
                frame.len(),
                "the NIC received a frame of another size"
            );
        }
        FS => {
            let (used, reply) = chain(rig, 1, &crate::virtio_fs::init_request(7), 4096);
            assert!(used >= 16 && reply.len() >= 16, "no reply to INIT");
            let get = fuse_backend_rs::abi::fuse_abi::GetattrIn::default();
            let req = crate::virtio_fs::request(
                fuse_backend_rs::abi::fuse_abi::Opcode::Getattr,
                9,
                1,
                &[vm_memory::ByteValued::as_slice(&get)],
            );
            let (_, reply) = chain(rig, 1, &req, 4096);
            assert!(reply.len() >= 16, "no reply to GETATTR");
            assert_eq!(
                i32::from_le_bytes(reply[4..8].try_into().unwrap()),
                0,
                "GETATTR failed"
            );
        }
        NINEP => {
            let (_, r) = chain(rig, 0, &crate::ninep::version(1, 8192), 8192);
            assert_eq!(r.get(4), Some(&101), "no Rversion");
            let (_, r) = chain(rig, 0, &crate::ninep::attach(2, 0), 8192);
            assert_eq!(r.get(4), Some(&105), "no Rattach");
        }
        CONSOLE => {
            let Extra::Console(h) = &rig.extra else {
                unreachable!()
            };
            let h = h.clone();
            while h.recv_timeout(Duration::ZERO).is_some() {}
            chain(rig, 1, b"still here", 0);
            assert_eq!(
                h.recv_timeout(Duration::from_secs(1)).as_deref(),
                Some(&b"still here"[..]),
                "the console did not pass the guest's bytes on"
            );
        }
        _ => {
            // Sector 3 written, then read back (into the overlay: the image stays).
            let header = |kind: u32| {
                let mut h = kind.to_le_bytes().to_vec();
                h.extend_from_slice(&0u32.to_le_bytes());
                h.extend_from_slice(&3u64.to_le_bytes());
                h
            };
            let mut write = header(1);
            write.extend_from_slice(&[0x5a; 512]);
            let (used, reply) = chain(rig, 0, &write, 1);
            assert_eq!((used, reply[0]), (1, 0), "the disk did not take a write");
            let (used, reply) = chain(rig, 0, &header(0), 513);
            assert_eq!(used, 513, "the disk answered a read with {used} bytes");
            assert_eq!(reply[512], 0, "the disk's status is not OK");
            assert_eq!(reply[..512], [0x5a; 512], "the disk read back wrong");
        }
    }
}
