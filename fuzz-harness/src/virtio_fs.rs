//! `virtio_fs`: FUSE requests, each on a virtqueue descriptor chain in guest memory, into
//! the in-process virtio-fs server ([`virtiofs_bridge::InProcessShare`], the path the
//! embedded VMM's virtio-fs device takes) over a read-only store and a read-write xchg
//! with real files.
//!
//! Input: `flags[1]`, then records `ctl[1] len[2] request[len]`. Flags: bit 0 skips the
//! harness's own INIT of both shares. `ctl`: bit 0 picks xchg (else the store); bits 1-2
//! split the request over 1-4 readable descriptors; bits 3-6 pick the reply buffer's size
//! (none, a header, a few bytes, 4 KiB ... 128 KiB + header); bit 7 puts the reply header
//! in a descriptor of its own, as Linux does.
//!
//! Checked after every request: the reply is no longer than the buffer offered and
//! nothing past that buffer changed; a reply's header gives its own length and the
//! request's `unique`; no reply holds the file outside the shares; every descriptor the
//! process holds points inside a share. At the end: both shares still answer INIT and
//! GETATTR of the root, the store's file is still found, the store and the outside
//! directory are unchanged, no server thread panicked.

use fuse_backend_rs::abi::fuse_abi::{GetattrIn, InHeader, InitIn, Opcode, OutHeader};
use fuse_backend_rs::api::filesystem::FsOptions;
use virtio_queue::{Queue, QueueT};
use virtiofs_bridge::{InProcessShare, ShareConfig};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::common::{env, Fds, Input};
use crate::mem::{guest_memory, write_desc, DESC_F_NEXT, DESC_F_WRITE};

/// Flag bit: no INIT before the records.
pub const NO_INIT: u8 = 1;
/// `ctl` bit: the request goes to xchg.
pub const XCHG: u8 = 1;

const MEM: usize = 0x48000;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const QSIZE: u16 = 256;
const REQ: u64 = 0x4000;
const REPLY: u64 = 0x20000;
/// Reply buffer sizes by `ctl` bits 3-6.
const REPLY_SIZES: [u32; 16] = [
    0,
    16,
    17,
    100,
    256,
    4096,
    4096 + 16,
    8192 + 16,
    (64 << 10) + 16,
    (128 << 10) + 16,
    1,
    8,
    15,
    32,
    1024,
    132 << 10,
];
/// Bytes after the reply buffer that must stay as the harness left them.
const FENCE: usize = 256;

/// The `ctl` byte for a request to `xchg` (or the store) split over `readable`
/// descriptors, with the reply buffer of class `reply` and its header apart or not.
pub fn ctl(xchg: bool, readable: u8, reply: u8, split_header: bool) -> u8 {
    u8::from(xchg)
        | ((readable.clamp(1, 4) - 1) << 1)
        | ((reply & 15) << 3)
        | (u8::from(split_header) << 7)
}

/// The reply class of a buffer with room for `bytes`: the smallest that fits.
pub fn reply_class_for(bytes: u32) -> u8 {
    let mut best = 9u8;
    for (i, &s) in REPLY_SIZES.iter().enumerate() {
        if s >= bytes && s < REPLY_SIZES[best as usize] {
            best = i as u8;
        }
    }
    best
}

struct Chains {
    mem: GuestMemoryMmap,
    queue: Queue,
    next_avail: u16,
}

impl Chains {
    fn new() -> Chains {
        let mem = guest_memory(&[(0, MEM)]);
        let mut queue = Queue::new(QSIZE).unwrap();
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        Chains {
            mem,
            queue,
            next_avail: 0,
        }
    }

    /// Serves `request` on a chain shaped by `ctl`; returns the reply (what the server
    /// says it wrote) after checking it against the buffer offered.
    fn call(&mut self, share: &InProcessShare, ctl: u8, request: &[u8]) -> Vec<u8> {
        let readable = usize::from((ctl >> 1) & 3) + 1;
        let cap = REPLY_SIZES[usize::from((ctl >> 3) & 15)];
        let split_header = ctl & 0x80 != 0;
        self.mem.write_slice(request, GuestAddress(REQ)).unwrap();
        let fence = vec![0xa5u8; FENCE];
        let fence_at = GuestAddress(REPLY + u64::from(cap));
        self.mem.write_slice(&fence, fence_at).unwrap();
        // The request over `readable` descriptors (empty ones too, for a short request),
        // then the reply buffer over one or two.
        let mut descs: Vec<(u64, u32, u16)> = Vec::new();
        let n = request.len();
        for i in 0..readable {
            let (a, b) = (n * i / readable, n * (i + 1) / readable);
            descs.push((REQ + a as u64, (b - a) as u32, 0));
        }
        if cap > 0 {
            if split_header && cap > 16 {
                descs.push((REPLY, 16, DESC_F_WRITE));
                descs.push((REPLY + 16, cap - 16, DESC_F_WRITE));
            } else {
                descs.push((REPLY, cap, DESC_F_WRITE));
            }
        }
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let flags = if last { flags } else { flags | DESC_F_NEXT };
            write_desc(&self.mem, DESC, i as u16, addr, len, flags, i as u16 + 1);
        }
        let slot = AVAIL + 4 + 2 * u64::from(self.next_avail % QSIZE);
        self.mem.write_obj(0u16, GuestAddress(slot)).unwrap();
        self.next_avail = self.next_avail.wrapping_add(1);
        self.mem
            .write_obj(self.next_avail, GuestAddress(AVAIL + 2))
            .unwrap();
        let chain = self
            .queue
            .pop_descriptor_chain(&self.mem)
            .expect("the harness's own chain");
        let used = share.serve(&self.mem, chain);
        let _ = self.queue.add_used(&self.mem, 0, used);

        assert!(
            used <= cap,
            "a reply of {used} bytes in a buffer of {cap} (request {:?})",
            request.get(..40)
        );
        let mut after = vec![0u8; FENCE];
        self.mem.read_slice(&mut after, fence_at).unwrap();
        assert_eq!(after, fence, "the server wrote past the reply buffer");
        let mut reply = vec![0u8; used as usize];
        self.mem
            .read_slice(&mut reply, GuestAddress(REPLY))
            .unwrap();
        if used > 0 {
            assert!(used >= 16, "a reply of {used} bytes has no whole header");
            let h = OutHeader::from_slice(&reply[..16]).copied().unwrap();
            assert_eq!(
                h.len, used,
                "the reply header's length is not the used length"
            );
            assert!(
                h.error <= 0 && h.error > -4096,
                "a reply with error {}",
                h.error
            );
            if request.len() >= std::mem::size_of::<InHeader>() {
                let unique = u64::from_le_bytes(request[8..16].try_into().unwrap());
                assert_eq!(h.unique, unique, "a reply to another request");
            }
        }
        reply
    }
}

/// A request as the Linux driver encodes it.
pub fn request(opcode: Opcode, unique: u64, nodeid: u64, parts: &[&[u8]]) -> Vec<u8> {
    vmbuild_tests::fuse_client::encode(opcode, unique, nodeid, 0, 0, parts)
}

pub fn init_request(unique: u64) -> Vec<u8> {
    let init = InitIn {
        major: 7,
        minor: 31,
        max_readahead: 128 << 10,
        flags: (FsOptions::ASYNC_READ
            | FsOptions::DO_READDIRPLUS
            | FsOptions::READDIRPLUS_AUTO
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::BIG_WRITES
            | FsOptions::MAX_PAGES
            | FsOptions::CACHE_SYMLINKS
            | FsOptions::ATOMIC_O_TRUNC)
            .bits() as u32,
    };
    request(Opcode::Init, unique, 0, &[init.as_slice()])
}

fn error_of(reply: &[u8]) -> i32 {
    assert!(reply.len() >= 16, "no reply to a well-formed request");
    OutHeader::from_slice(&reply[..16]).unwrap().error
}

pub fn run(data: &[u8]) {
    crate::common::harness_thread();
    let env = env();
    let mut input = Input::new(data);
    let flags = input.u8();
    let xchg = env.fresh_xchg();
    let roots = [env.store(), xchg.as_path()];
    let shares = [
        InProcessShare::new(&ShareConfig::store(env.store())).expect("the store share"),
        InProcessShare::new(&ShareConfig::xchg(&xchg)).expect("the xchg share"),
    ];
    let mut chains = Chains::new();
    let fds = Fds::now();
    let big = ctl(false, 1, 9, true);
    if flags & NO_INIT == 0 {
        for share in &shares {
            let r = chains.call(share, big, &init_request(1));
            assert_eq!(error_of(&r), 0, "INIT refused");
        }
    }
    while !input.is_empty() {
        let ctl = input.u8();
        let req = input.record();
        let share = &shares[usize::from(ctl & XCHG)];
        let reply = chains.call(share, ctl, req);
        env.check_no_secret(data, &reply, "a FUSE reply");
        fds.check_since(&roots);
    }
    // Both shares still serve a guest that starts over.
    for (i, share) in shares.iter().enumerate() {
        let r = chains.call(share, big, &init_request(1_000_001));
        assert!(r.len() >= 16, "no reply to INIT after the input");
        let get = GetattrIn::default();
        let r = chains.call(
            share,
            big,
            &request(Opcode::Getattr, 1_000_003, 1, &[get.as_slice()]),
        );
        assert_eq!(error_of(&r), 0, "GETATTR of the root after the input");
        if i == 0 {
            let r = chains.call(
                share,
                big,
                &request(Opcode::Lookup, 1_000_005, 1, &[b"hello.txt\0"]),
            );
            assert_eq!(
                error_of(&r),
                0,
                "LOOKUP of the store's file after the input"
            );
        }
    }
    drop(shares);
    fds.check_since(&roots);
    env.check_unchanged();
    crate::common::check_no_panic_elsewhere();
}
