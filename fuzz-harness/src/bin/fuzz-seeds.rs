//! Writes the fuzz targets' seed corpora into `fuzz/corpus/<target>/seed-*`:
//!
//! * `virtio_fs`, `ninep`: from traffic recorded while the crates' own tests ran
//!   (`--recorded DIR`, made with `VMBUILD_RECORD_DIR=DIR cargo test ...`, see
//!   RELIABILITY.md), cut into seeds of at most 16 KiB;
//! * `switch`, `virtqueue`, `vhost_user`, `snapshot_files`: built here with the crates'
//!   own types and encoders (frames as a guest stack sends them, a driver's device setup
//!   and requests, a front-end's handshake, a state file and a manifest as vmbuild
//!   writes them), plus the broken variants the issue names (loops, indirect tables,
//!   addresses outside memory, memory tables with bad fds and sizes).
//!
//! Usage: `cargo run -p fuzz-harness --bin fuzz-seeds -- [--recorded DIR] [--out DIR]`.

use std::path::{Path, PathBuf};

use fuzz_harness::common::put_record;
use fuzz_harness::{ninep, snapshot_files, switch, vhost_user, virtio_fs, virtqueue};

/// The most a seed from a recording may hold.
const SEED_MAX: usize = 16 << 10;

struct Out(PathBuf);

impl Out {
    fn seed(&self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.0.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut recorded = None;
    let mut out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    while let Some(a) = args.next() {
        match a.as_str() {
            "--recorded" => recorded = args.next().map(PathBuf::from),
            "--out" => out = PathBuf::from(args.next().expect("--out DIR")),
            other => panic!("unknown argument {other}"),
        }
    }
    let out = Out(out);
    if let Some(dir) = recorded {
        from_recordings(&out, &dir);
    }
    switch_seeds(&out);
    virtqueue_seeds(&out);
    vhost_user_seeds(&out);
    snapshot_seeds(&out);
}

/// A recording: its messages.
fn read_recording(path: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= bytes.len() {
        let n = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        at += 4;
        let end = (at + n).min(bytes.len());
        out.push(bytes[at..end].to_vec());
        at = end;
    }
    out
}

fn from_recordings(out: &Out, dir: &Path) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    let mut seen = std::collections::HashSet::new();
    for (i, path) in files.iter().enumerate() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let messages = read_recording(path);
        let (target, mut seed, ctl) = if let Some(kind) = name.strip_prefix("fuse-") {
            let rw = kind.starts_with("rw");
            (
                "virtio_fs",
                vec![virtio_fs::NO_INIT],
                Some(virtio_fs::ctl(rw, 1, 9, true)),
            )
        } else if let Some(kind) = name.strip_prefix("ninep-") {
            let flags = if kind.starts_with("rw") {
                ninep::NO_HANDSHAKE | ninep::READ_WRITE
            } else {
                ninep::NO_HANDSHAKE
            };
            ("ninep", vec![flags], None)
        } else {
            continue;
        };
        for m in &messages {
            // Large writes say little the smaller ones do not; seeds stay small.
            if m.len() > 8192 {
                continue;
            }
            if seed.len() + m.len() + 3 > SEED_MAX {
                break;
            }
            match ctl {
                Some(c) => {
                    seed.push(c);
                    put_record(&mut seed, m);
                }
                None => seed.extend_from_slice(m),
            }
        }
        if seed.len() > 1 && seen.insert(seed.clone()) {
            out.seed(target, &format!("recorded-{i:03}"), &seed);
        }
    }
}

// ---- switch ----

fn mac(last: u8) -> [u8; 6] {
    [0x52, 0x54, 0, 0x12, 0x34, last]
}

fn eth(dst: [u8; 6], src: [u8; 6], tags: &[u16], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    for t in tags {
        f.extend_from_slice(&0x8100u16.to_be_bytes());
        f.extend_from_slice(&t.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn arp_request(src: [u8; 6]) -> Vec<u8> {
    let mut p = vec![0, 1, 8, 0, 6, 4, 0, 1];
    p.extend_from_slice(&src);
    p.extend_from_slice(&[10, 77, 0, 2]);
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&[10, 77, 0, 1]);
    p.resize(46, 0);
    eth([0xff; 6], src, &[], 0x0806, &p)
}

/// An IPv4 TCP segment of `payload` bytes (checksums left to the receiver).
fn tcp4(payload: usize) -> Vec<u8> {
    let total = 20 + 20 + payload;
    let mut ip = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        1,
        0x40,
        0,
        64,
        6,
        0,
        0,
    ];
    ip.extend_from_slice(&[10, 77, 0, 2, 10, 77, 0, 1]);
    let mut tcp = vec![
        0x9c, 0x40, 0, 22, 0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0,
    ];
    tcp.extend((0..payload).map(|i| i as u8));
    ip.extend_from_slice(&tcp);
    ip
}

fn tcp6(payload: usize) -> Vec<u8> {
    let plen = 20 + payload;
    let mut ip = vec![0x60, 0, 0, 0, (plen >> 8) as u8, plen as u8, 6, 64];
    ip.extend_from_slice(&[0xfd; 16]);
    ip.extend_from_slice(&[0xfe; 16]);
    let mut tcp = vec![
        0x9c, 0x40, 0, 22, 0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0,
    ];
    tcp.extend((0..payload).map(|i| i as u8));
    ip.extend_from_slice(&tcp);
    ip
}

fn vnet(
    flags: u8,
    gso: u8,
    hdr_len: u16,
    gso_size: u16,
    csum_start: u16,
    csum_off: u16,
) -> Vec<u8> {
    vswitch::offload::VnetHdr {
        flags,
        gso_type: gso,
        hdr_len,
        gso_size,
        csum_start,
        csum_offset: csum_off,
        num_buffers: 0,
    }
    .to_bytes()
    .to_vec()
}

fn switch_seeds(out: &Out) {
    let frame = |port: u8, hdr: Option<Vec<u8>>, f: Vec<u8>, seed: &mut Vec<u8>| {
        let mut bytes = Vec::new();
        let ctl = match hdr {
            Some(h) => {
                bytes.extend_from_slice(&h);
                port | switch::WITH_VNET_HDR
            }
            None => port,
        };
        bytes.extend_from_slice(&f);
        seed.push(ctl);
        put_record(seed, &bytes);
    };
    // A conversation: ARP broadcast, the answer, unicast both ways (learnt).
    let mut s = Vec::new();
    frame(0, None, arp_request(mac(2)), &mut s);
    frame(1, None, eth(mac(2), mac(1), &[], 0x0806, &[0; 46]), &mut s);
    frame(
        0,
        None,
        eth(mac(1), mac(2), &[], 0x0800, &tcp4(100)),
        &mut s,
    );
    frame(
        1,
        None,
        eth(mac(2), mac(1), &[], 0x0800, &tcp4(1400)),
        &mut s,
    );
    out.seed("switch", "conversation", &s);
    // VLANs: tagged on the trunks, a tag on the access port, an unknown VLAN, VLAN 0,
    // a double tag, a truncated tag.
    let mut s = Vec::new();
    frame(
        1,
        None,
        eth(mac(3), mac(4), &[10], 0x0800, &tcp4(10)),
        &mut s,
    );
    frame(
        2,
        None,
        eth([0xff; 6], mac(5), &[10], 0x0806, &[0; 46]),
        &mut s,
    );
    frame(
        2,
        None,
        eth([0xff; 6], mac(5), &[1], 0x0806, &[0; 46]),
        &mut s,
    );
    frame(
        0,
        None,
        eth([0xff; 6], mac(6), &[1], 0x0800, &tcp4(0)),
        &mut s,
    );
    frame(
        2,
        None,
        eth(mac(1), mac(7), &[20], 0x0800, &tcp4(0)),
        &mut s,
    );
    frame(1, None, eth(mac(1), mac(8), &[0], 0x0800, &tcp4(0)), &mut s);
    frame(
        1,
        None,
        eth([0xff; 6], mac(9), &[1, 10], 0x0800, &tcp4(0)),
        &mut s,
    );
    frame(1, None, eth(mac(1), mac(9), &[], 0x8100, &[0]), &mut s);
    out.seed("switch", "vlans", &s);
    // Broken frames: runts, oversize, a multicast and a zero source, empty.
    let mut s = Vec::new();
    frame(0, None, vec![0xff; 13], &mut s);
    frame(0, None, Vec::new(), &mut s);
    frame(
        1,
        None,
        eth(mac(1), mac(2), &[], 0x0800, &[0; 1600]),
        &mut s,
    );
    frame(
        2,
        None,
        eth(mac(1), [1, 0, 0x5e, 0, 0, 1], &[1], 0x0800, &[0; 46]),
        &mut s,
    );
    frame(0, None, eth(mac(1), [0; 6], &[], 0x0800, &[0; 46]), &mut s);
    out.seed("switch", "broken", &s);
    // With the virtio-net header: TCP GSO over IPv4 and IPv6 (plain, tagged), a partial
    // checksum, offsets past the end, a GSO type the switch cannot cut.
    let mut s = Vec::new();
    frame(
        0,
        Some(vnet(1, 1, 54, 1448, 34, 16)),
        eth(mac(1), mac(2), &[], 0x0800, &tcp4(4000)),
        &mut s,
    );
    frame(
        1,
        Some(vnet(1, 4, 74, 1428, 54, 16)),
        eth(mac(2), mac(1), &[], 0x86dd, &tcp6(3000)),
        &mut s,
    );
    frame(
        2,
        Some(vnet(1, 1, 58, 500, 38, 16)),
        eth([0xff; 6], mac(3), &[1], 0x0800, &tcp4(1200)),
        &mut s,
    );
    frame(
        0,
        Some(vnet(1, 0, 0, 0, 34, 16)),
        eth(mac(1), mac(2), &[], 0x0800, &tcp4(300)),
        &mut s,
    );
    frame(
        0,
        Some(vnet(1, 0, 0, 0, 3000, 16)),
        eth(mac(1), mac(2), &[], 0x0800, &tcp4(30)),
        &mut s,
    );
    frame(
        1,
        Some(vnet(0, 3, 54, 1448, 34, 6)),
        eth(mac(1), mac(2), &[], 0x0800, &tcp4(3000)),
        &mut s,
    );
    frame(
        0,
        Some(vnet(1, 1, 54, 1, 34, 16)),
        eth(mac(1), mac(2), &[], 0x0800, &tcp4(200)),
        &mut s,
    );
    out.seed("switch", "offloads", &s);
    // A MAC flood through the 8-entry table.
    let mut s = Vec::new();
    for i in 0..24u8 {
        frame(
            i % 3,
            None,
            eth(mac(200), mac(i), &[], 0x0800, &tcp4(0)),
            &mut s,
        );
    }
    s.push(switch::AGE);
    put_record(&mut s, &eth(mac(3), mac(4), &[], 0x0800, &tcp4(0)));
    out.seed("switch", "flood", &s);
}

// ---- virtqueue ----

struct Ops(Vec<u8>);

impl Ops {
    fn new(device: u8) -> Ops {
        Ops(vec![device])
    }
    fn mem(&mut self, addr: u32, bytes: &[u8]) -> &mut Self {
        for (i, chunk) in bytes.chunks(255).enumerate() {
            self.0.push(virtqueue::Op::WriteMem as u8);
            self.0
                .extend_from_slice(&(addr + 255 * i as u32).to_le_bytes());
            self.0.push(chunk.len() as u8);
            self.0.extend_from_slice(chunk);
        }
        self
    }
    fn desc(&mut self, q: u8, i: u8, addr: u32, len: u16, flags: u8, next: u8) -> &mut Self {
        self.0.push(virtqueue::Op::Desc as u8);
        self.0.extend_from_slice(&[q, i]);
        self.0.extend_from_slice(&addr.to_le_bytes());
        self.0.extend_from_slice(&len.to_le_bytes());
        self.0.extend_from_slice(&[flags, next]);
        self
    }
    fn desc_at(
        &mut self,
        table: u32,
        i: u8,
        addr: u32,
        len: u16,
        flags: u8,
        next: u8,
    ) -> &mut Self {
        self.0.push(virtqueue::Op::DescAt as u8);
        self.0.extend_from_slice(&table.to_le_bytes());
        self.0.push(i);
        self.0.extend_from_slice(&addr.to_le_bytes());
        self.0.extend_from_slice(&len.to_le_bytes());
        self.0.extend_from_slice(&[flags, next]);
        self
    }
    fn post(&mut self, q: u8, head: u8) -> &mut Self {
        self.0
            .extend_from_slice(&[virtqueue::Op::Post as u8, q, head]);
        self
    }
    fn avail_idx(&mut self, q: u8, idx: u16) -> &mut Self {
        self.0
            .extend_from_slice(&[virtqueue::Op::AvailIdx as u8, q]);
        self.0.extend_from_slice(&idx.to_le_bytes());
        self
    }
    fn mmio(&mut self, off: u16, v: u32) -> &mut Self {
        self.0.push(virtqueue::Op::MmioWrite as u8);
        self.0.extend_from_slice(&off.to_le_bytes());
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn read(&mut self, off: u16, size: u8) -> &mut Self {
        self.0.push(virtqueue::Op::MmioRead as u8);
        self.0.extend_from_slice(&off.to_le_bytes());
        self.0.push(size);
        self
    }
    fn host(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.push(virtqueue::Op::Host as u8);
        put_record(&mut self.0, bytes);
        self
    }
    fn reinit(&mut self) -> &mut Self {
        self.0.push(virtqueue::Op::Reinit as u8);
        self
    }
    /// A request: readable `req` then a writable buffer of `cap`, posted on queue `q`.
    fn request(&mut self, q: u8, head: u8, req: &[u8], cap: u16) -> &mut Self {
        const N: u8 = 1;
        const W: u8 = 2;
        let (buf, reply) = (
            0x20000 + 0x1000 * u32::from(head),
            0x30000 + 0x1000 * u32::from(head),
        );
        self.mem(buf, req);
        if cap > 0 {
            self.desc(q, head, buf, req.len() as u16, N, head + 1);
            self.desc(q, head + 1, reply, cap, W, 0);
        } else {
            self.desc(q, head, buf, req.len() as u16, 0, 0);
        }
        self.post(q, head)
    }
}

const F_NEXT: u8 = 1;
const F_WRITE: u8 = 2;
const F_INDIRECT: u8 = 4;

fn virtqueue_seeds(out: &Out) {
    let frame = {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&arp_request(mac(1)));
        f
    };
    let getattr = virtio_fs::request(
        fuse_backend_rs::abi::fuse_abi::Opcode::Getattr,
        2,
        1,
        &[&[0u8; 16]],
    );
    let blk_read = {
        let mut h = 0u32.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&2u64.to_le_bytes());
        h
    };
    // Each device: its own good traffic.
    let mut o = Ops::new(virtqueue::NET);
    o.request(1, 0, &frame, 0)
        .desc(0, 0, 0x38000, 2048, F_WRITE, 0)
        .post(0, 0)
        .host(&frame[12..])
        .read(0x100, 4)
        .read(0x104, 2);
    out.seed("virtqueue", "net", &o.0);
    let mut o = Ops::new(virtqueue::FS);
    o.request(1, 0, &virtio_fs::init_request(1), 4096)
        .request(1, 2, &getattr, 4096)
        .read(0x100, 4);
    out.seed("virtqueue", "fs", &o.0);
    let mut o = Ops::new(virtqueue::NINEP);
    o.request(0, 0, &ninep::version(1, 8192), 8192)
        .request(0, 2, &ninep::attach(2, 0), 8192)
        .request(0, 4, &ninep::walk(3, 0, 1, &[b"hello.txt"]), 8192)
        .read(0x100, 2);
    out.seed("virtqueue", "9p", &o.0);
    let mut o = Ops::new(virtqueue::CONSOLE);
    o.desc(0, 0, 0x38000, 64, F_WRITE, 0)
        .post(0, 0)
        .host(b"echo hello\n")
        .request(1, 2, b"hello\n", 0);
    out.seed("virtqueue", "console", &o.0);
    let mut o = Ops::new(virtqueue::BLOCK);
    o.request(0, 0, &blk_read, 513).read(0x100, 8);
    out.seed("virtqueue", "block", &o.0);

    // Broken rings, on every device.
    for dev in 0..5u8 {
        let q = if dev == virtqueue::NET || dev == virtqueue::FS || dev == virtqueue::CONSOLE {
            1
        } else {
            0
        };
        let mut o = Ops::new(dev);
        // A loop: 0 -> 1 -> 0.
        o.desc(q, 0, 0x20000, 64, F_NEXT, 1)
            .desc(q, 1, 0x21000, 64, F_NEXT | F_WRITE, 0)
            .post(q, 0)
            // A chain off the end of guest memory, into the hole, far away.
            .desc(q, 2, 0x3fff0, 64, F_NEXT, 3)
            .desc(q, 3, 0x45000, 64, F_WRITE, 0)
            .post(q, 2)
            .desc(q, 4, 0x8000_0001, 64, 0, 0)
            .post(q, 4)
            // An indirect table with a writable buffer in region B, and one nested.
            .desc_at(0x22000, 0, 0x20000, 16, F_NEXT, 1)
            .desc_at(0x22000, 1, 0x5f000, 4096, F_WRITE, 0)
            .desc(q, 5, 0x22000, 32, F_INDIRECT, 0)
            .post(q, 5)
            .desc_at(0x23000, 0, 0x22000, 32, F_INDIRECT, 0)
            .desc(q, 6, 0x23000, 16, F_INDIRECT, 0)
            .post(q, 6)
            // A head past the queue, a huge length, an avail index far ahead.
            .post(q, 200)
            .desc(q, 7, 0x20000, u16::MAX, F_WRITE, 0)
            .post(q, 7)
            .avail_idx(q, 0x8000);
        out.seed("virtqueue", &format!("broken-rings-{dev}"), &o.0);
        // The transport: queue setup after DRIVER_OK, a bad size, odd addresses, a
        // reset and a ring placed over the hole.
        let mut o = Ops::new(dev);
        o.mmio(0x30, 0)
            .mmio(0x38, 3)
            .mmio(0x80, 0x3ffff)
            .mmio(0x70, 0)
            .mmio(0x70, 3)
            .mmio(0x20, 0xffff_ffff)
            .mmio(0x70, 11)
            .mmio(0x30, 0)
            .mmio(0x38, 16)
            .mmio(0x80, 0x44000)
            .mmio(0x44, 1)
            .mmio(0x70, 15)
            .mmio(0x50, 0)
            .mmio(0x64, 1)
            .read(0x44, 4)
            .read(0x34, 4)
            .read(0x1000, 4)
            .reinit();
        out.seed("virtqueue", &format!("transport-{dev}"), &o.0);
    }
}

// ---- vhost-user ----

struct Msgs(Vec<u8>);

impl Msgs {
    fn new(net: bool) -> Msgs {
        Msgs(vec![u8::from(net)])
    }
    fn msg(&mut self, code: u8, flags: u8, payload: &[u8]) -> &mut Self {
        self.0.extend_from_slice(&[code, flags]);
        put_record(&mut self.0, payload);
        self
    }
    fn u64(&mut self, code: u8, flags: u8, v: u64) -> &mut Self {
        self.msg(code, flags, &v.to_le_bytes())
    }
    fn state(&mut self, code: u8, index: u32, num: u32) -> &mut Self {
        let mut p = index.to_le_bytes().to_vec();
        p.extend_from_slice(&num.to_le_bytes());
        self.msg(code, 0, &p)
    }
    fn mem(&mut self, off: u32, bytes: &[u8]) -> &mut Self {
        for (i, c) in bytes.chunks(255).enumerate() {
            self.0.push(vhost_user::WRITE_MEM);
            self.0
                .extend_from_slice(&(off + 255 * i as u32).to_le_bytes());
            self.0.push(c.len() as u8);
            self.0.extend_from_slice(c);
        }
        self
    }
}

const UA: u64 = 0x7f00_0000_0000;

fn mem_table(regions: &[(u64, u64, u64, u64)]) -> Vec<u8> {
    let mut p = (regions.len() as u32).to_le_bytes().to_vec();
    p.extend_from_slice(&[0; 4]);
    for &(gpa, size, ua, off) in regions {
        for v in [gpa, size, ua, off] {
            p.extend_from_slice(&v.to_le_bytes());
        }
    }
    p
}

/// A front-end's setup as the tests' front-end (and QEMU) makes it: features, memory,
/// both queues with call and kick eventfds (eventfds 0-3: call0, kick0, call1, kick1).
fn handshake(m: &mut Msgs, mem_size: u64) {
    m.msg(1, 0, &[])
        .msg(3, 0, &[])
        .u64(2, 0, (1 << 32) | (1 << 30))
        .msg(15, 0, &[])
        .u64(16, vhost_user::FLAG_NEED_REPLY, 0x1 | 0x8)
        .msg(
            5,
            vhost_user::FD_MEMORY,
            &mem_table(&[(0, mem_size, UA, 0)]),
        );
    for q in 0..2u32 {
        let base = UA + 0x4000 * u64::from(q);
        m.state(8, q, 256);
        let mut addr = q.to_le_bytes().to_vec();
        addr.extend_from_slice(&0u32.to_le_bytes());
        for v in [base, base + 0x2000, base + 0x1000, 0] {
            addr.extend_from_slice(&v.to_le_bytes());
        }
        m.msg(9, 0, &addr)
            .state(10, q, 0)
            .msg(13, vhost_user::FD_EVENT, &u64::from(q).to_le_bytes())
            .msg(12, vhost_user::FD_EVENT, &u64::from(q).to_le_bytes())
            .state(18, q, 1);
    }
}

/// A descriptor in the front-end's memory (queue `q`'s table) and its avail entry.
fn post(m: &mut Msgs, q: u32, req: &[u8], cap: u32) {
    let base = 0x4000 * q;
    let mut d = Vec::new();
    let (rq, rp) = (0x10000u64, 0x20000u64);
    let flags0: u16 = if cap > 0 { 1 } else { 0 };
    for (addr, len, flags, next) in [(rq, req.len() as u32, flags0, 1u16), (rp, cap, 2, 0)] {
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
    }
    m.mem(0x10000, req)
        .mem(base, &d)
        .mem(base + 0x1000, &[0, 0, 1, 0, 0, 0]);
    m.0.push(vhost_user::KICK + 1 + 2 * q as u8);
}

fn vhost_user_seeds(out: &Out) {
    let mem = vhost_user::MEM_SIZE as u64;
    // The fs back-end: setup, INIT, GETATTR.
    let mut m = Msgs::new(false);
    handshake(&mut m, mem);
    post(&mut m, 1, &virtio_fs::init_request(1), 4096);
    m.state(11, 1, 0);
    out.seed("vhost_user", "fs-session", &m.0);
    // The net port: setup, a frame transmitted.
    let mut m = Msgs::new(true);
    handshake(&mut m, mem);
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&arp_request(mac(1)));
    post(&mut m, 1, &f, 0);
    out.seed("vhost_user", "net-session", &m.0);
    // Memory tables that lie: larger than the file, at an offset past its end, fds that
    // cannot be mapped, regions that overlap, too many regions, no fd.
    for (i, net) in [false, true].into_iter().enumerate() {
        let mut m = Msgs::new(net);
        m.msg(1, 0, &[])
            .msg(3, 0, &[])
            .u64(2, 0, (1 << 32) | (1 << 30));
        m.msg(
            5,
            vhost_user::FD_MEMORY,
            &mem_table(&[(0, 16 * mem, UA, 0)]),
        )
        .msg(
            5,
            vhost_user::FD_MEMORY,
            &mem_table(&[(0, mem, UA, 4 * mem)]),
        )
        .msg(
            5,
            vhost_user::FD_SMALL_MEMFD,
            &mem_table(&[(0, mem, UA, 0)]),
        )
        .msg(5, vhost_user::FD_NULL, &mem_table(&[(0, mem, UA, 0)]))
        .msg(5, vhost_user::FD_DIR, &mem_table(&[(0, mem, UA, 0)]))
        .msg(5, vhost_user::FD_PIPE, &mem_table(&[(0, mem, UA, 0)]))
        .msg(5, vhost_user::FD_NONE, &mem_table(&[(0, mem, UA, 0)]))
        .msg(
            5,
            vhost_user::FD_MEMORY_TWICE,
            &mem_table(&[(0, mem, UA, 0), (mem / 2, mem, UA + mem, 0)]),
        )
        .msg(5, vhost_user::FD_MEMORY, &mem_table(&[(0, 0, UA, 0)]))
        .msg(
            5,
            vhost_user::FD_MEMORY,
            &mem_table(&[(u64::MAX - 4095, mem, UA, 0)]),
        )
        .msg(
            5,
            vhost_user::FD_MEMORY,
            &mem_table(&vec![(0, 4096, UA, 0); 40]),
        );
        // A region past the end of its file, then queues in it, then a kick.
        let mut m2 = Msgs::new(net);
        m2.msg(1, 0, &[])
            .msg(3, 0, &[])
            .u64(2, 0, (1 << 32) | (1 << 30));
        m2.msg(
            5,
            vhost_user::FD_SMALL_MEMFD,
            &mem_table(&[(0, mem, UA, 0)]),
        );
        for q in 0..2u32 {
            let base = UA + 0x40000 + 0x4000 * u64::from(q);
            m2.state(8, q, 64);
            let mut addr = q.to_le_bytes().to_vec();
            addr.extend_from_slice(&0u32.to_le_bytes());
            for v in [base, base + 0x2000, base + 0x1000, 0] {
                addr.extend_from_slice(&v.to_le_bytes());
            }
            m2.msg(9, 0, &addr)
                .state(10, q, 0)
                .msg(13, vhost_user::FD_EVENT, &u64::from(q).to_le_bytes())
                .msg(12, vhost_user::FD_EVENT, &u64::from(q).to_le_bytes())
                .state(18, q, 1);
        }
        m2.0.extend_from_slice(&[vhost_user::KICK + 1, vhost_user::KICK + 3]);
        out.seed("vhost_user", &format!("bad-memory-tables-{i}"), &m.0);
        out.seed("vhost_user", &format!("region-past-eof-{i}"), &m2.0);
        // Out-of-order and malformed messages.
        let mut m = Msgs::new(net);
        m.state(18, 0, 1)
            .state(8, 7, 256)
            .state(8, 0, 0)
            .state(8, 0, 65535)
            .msg(9, 0, &[0; 40])
            .msg(12, 0, &0x100u64.to_le_bytes())
            .msg(2, vhost_user::FLAG_LONG_SIZE, &0u64.to_le_bytes())
            .msg(1, vhost_user::FLAG_BAD_VERSION, &[])
            .msg(24, vhost_user::FLAG_NEED_REPLY, &[0; 12])
            .msg(63, 0, &[1, 2, 3])
            .msg(37, vhost_user::FD_MEMORY, &[0; 40])
            .msg(38, 0, &[0; 40])
            .msg(36, 0, &[])
            .msg(16, vhost_user::FLAG_NEED_REPLY, &[0xff; 8]);
        out.seed("vhost_user", &format!("malformed-{i}"), &m.0);
    }
}

// ---- snapshot files ----

fn state_file(memory: &str, bytes: u64, devices: Option<serde_json::Value>) -> Vec<u8> {
    use kvm_bindings::*;
    let vcpu = serde_json::json!({
        "regs": kvm_regs { rip: 0x10_0000, rflags: 2, ..Default::default() },
        "sregs": kvm_sregs::default(),
        "xcrs": kvm_xcrs::default(),
        "events": kvm_vcpu_events::default(),
        "mp_state": kvm_mp_state::default(),
        "msrs": [[0xc000_0080u32, 0x500u64], [0x10, 12345]],
        "xsave": vec![0u32; kvm_xsave::default().region.len()],
        "debugregs": kvm_debugregs::default(),
        "lapic": kvm_lapic_state::default(),
    });
    let pc = serde_json::json!({
        "pic_master": kvm_irqchip { chip_id: 0, ..Default::default() },
        "pic_slave": kvm_irqchip { chip_id: 1, ..Default::default() },
        "ioapic": kvm_irqchip { chip_id: 2, ..Default::default() },
        "pit": kvm_pit_state2::default(),
        "clock": kvm_clock_data::default(),
    });
    let mut state = serde_json::json!({
        "magic": embedded_vmm::snapshot::MAGIC,
        "version": embedded_vmm::snapshot::VERSION,
        "memory_file": memory,
        "memory_bytes": bytes,
        "vcpus": [vcpu],
        "pc": pc,
    });
    if let Some(d) = devices {
        state["devices"] = d;
    }
    serde_json::to_vec(&state).unwrap()
}

fn snapshot_seeds(out: &Out) {
    use embedded_vmm::virtio::mmio::TransportState;
    use embedded_vmm::virtio::SavedQueue;
    let (mem, len) = snapshot_files::MEMORY_FILES[0];
    let queue = |desc: u64, ready: bool| SavedQueue {
        max_size: 256,
        size: 16,
        ready,
        next_avail: 3,
        next_used: 3,
        event_idx_enabled: false,
        desc_table: desc,
        avail_ring: desc.wrapping_add(0x1000),
        used_ring: desc.wrapping_add(0x2000),
    };
    let transport =
        |device_type: u32, queues: Vec<SavedQueue>, device: Option<serde_json::Value>| {
            serde_json::to_value(TransportState {
                device_type,
                status: 15,
                driver_features: 1 << 32,
                queue_sel: 0,
                device_features_sel: 0,
                driver_features_sel: 0,
                interrupt_status: 0,
                config_generation: 0,
                queues,
                device,
            })
            .unwrap()
        };
    let ninep_session = serde_json::to_value(virtiofs_bridge::ninep::NinepState {
        msize: 8192,
        fids: vec![
            virtiofs_bridge::ninep::SavedFid {
                fid: 0,
                path: Vec::new(),
                dev: 0,
                ino: 0,
                open: None,
            },
            virtiofs_bridge::ninep::SavedFid {
                fid: 1,
                path: vec![b"hello.txt".to_vec()],
                dev: 0,
                ino: 0,
                open: Some(virtiofs_bridge::ninep::SavedOpen::File {
                    flags: 0,
                    write: false,
                }),
            },
            virtiofs_bridge::ninep::SavedFid {
                fid: 2,
                path: vec![b"..".to_vec(), b"outside".to_vec()],
                dev: 0,
                ino: 0,
                open: Some(virtiofs_bridge::ninep::SavedOpen::Dir),
            },
        ],
    })
    .unwrap();
    let uart =
        serde_json::json!({ "regs": [12, 0, 1, 1, 3, 11, 0x60, 0, 0], "in_buffer": [104, 105] });
    // The devices a controller restores: console, net (bit 0, 1), then 9p.
    let devices = serde_json::json!({
        "uarts": [uart, uart],
        "virtio": [
            transport(3, vec![queue(0x1000, true), queue(0x4000, true)], None),
            transport(1, vec![queue(0x8000, true), queue(0xc000, true)], None),
            transport(9, vec![queue(0x9000, true)], Some(ninep_session)),
        ],
    });
    let mut seed = vec![0u8, 0b111];
    seed.extend_from_slice(&state_file(mem, len as u64, Some(devices.clone())));
    out.seed("snapshot_files", "state-controller", &seed);
    let mut seed = vec![0u8, 0];
    seed.extend_from_slice(&state_file(mem, len as u64, None));
    out.seed("snapshot_files", "state-plain", &seed);
    // The memory file named with the wrong size, a path, a name outside.
    let (small, small_len) = snapshot_files::MEMORY_FILES[1];
    for (i, (name, bytes)) in [
        (small, len as u64),
        (small, small_len as u64),
        ("../outside/secret", 4096),
        (
            "memory-0000000000000001/../memory-0000000000000002",
            small_len as u64,
        ),
        (mem, u64::MAX),
    ]
    .into_iter()
    .enumerate()
    {
        let mut seed = vec![0u8, 0];
        seed.extend_from_slice(&state_file(name, bytes, None));
        out.seed("snapshot_files", &format!("state-memory-{i}"), &seed);
    }
    // Queues restored where they cannot be.
    let bad = serde_json::json!({
        "uarts": [],
        "virtio": [transport(3, vec![queue(0xffff_ffff_ffff_f000, true), queue(0x3f000, true)], None)],
    });
    let mut seed = vec![0u8, 0b1];
    seed.extend_from_slice(&state_file(mem, len as u64, Some(bad)));
    out.seed("snapshot_files", "state-bad-queues", &seed);

    // A manifest as bootstrap writes it, with the right checksums.
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (name, bytes) in snapshot_files::manifest_files() {
        let p = dir.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, &bytes).unwrap();
        let role = match name {
            "disk.qcow2" => "disk",
            "state" => "state",
            "controller.cpio" => "controller",
            "ssh/client_key" => "key",
            "vmlinux" => "kernel",
            "initrd.img" => "initrd",
            "controller-state" => "controller-state",
            "controller-initrd.img" => "controller-initrd",
            _ => vmbuild::snapshot::manifest::OPTIONAL_ROLE,
        };
        files.push(vmbuild::snapshot::manifest::file_entry(dir.path(), name, role).unwrap());
    }
    let manifest = serde_json::json!({
        "format": vmbuild::snapshot::manifest::FORMAT,
        "vmbuild_version": "0.1.0",
        "profile": "linux",
        "created_at": "2026-12-01T10:00:00Z",
        "qemu": {"version": "10.0.2", "binary": "/usr/bin/qemu-system-x86_64"},
        "machine": {
            "machine": "pc-i440fx-10.0", "accel": "tcg", "cpu": "max", "memory_mib": 512,
            "cpus": 1, "kernel": "vmlinux", "initrd": "initrd.img",
            "append": "console=ttyS0 quiet"
        },
        "qemu_args": ["-machine", "pc-i440fx-10.0", "-kernel", "$SNAPSHOT/vmlinux"],
        "state": {"file": "state", "format": "mapped-ram", "bytes": 3017, "multifd_channels": 2},
        "network": {
            "target_ip": "10.77.0.2", "controller_ip": "10.77.0.1", "prefix_len": 24,
            "target_mac": "52:54:00:77:00:02", "controller_mac": "52:54:00:77:00:01",
            "ssh_port": 22
        },
        "ssh": {
            "user": "root", "client_key": "ssh/client_key",
            "client_public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA vmbuild",
            "host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKx"
        },
        "mounts": {"xchg": "/tmp/xchg"},
        "controller": {
            "state": "controller-state", "initrd": "controller-initrd.img",
            "memory_mib": 256, "embedded": "controller-kvm"
        },
        "files": files,
        "timings": {"boot": 2.5, "total": 12.25},
    });
    let mut seed = vec![snapshot_files::MANIFEST];
    seed.extend_from_slice(&serde_json::to_vec_pretty(&manifest).unwrap());
    out.seed("snapshot_files", "manifest", &seed);
    // The same manifest naming files outside the snapshot directory.
    for (i, name) in ["../outside/secret", "/etc/hostname", "ssh/../../x", ""]
        .into_iter()
        .enumerate()
    {
        let mut m = manifest.clone();
        m["files"][0]["name"] = name.into();
        m["state"]["file"] = name.into();
        let mut seed = vec![snapshot_files::MANIFEST];
        seed.extend_from_slice(&serde_json::to_vec(&m).unwrap());
        out.seed("snapshot_files", &format!("manifest-outside-{i}"), &seed);
    }
}
