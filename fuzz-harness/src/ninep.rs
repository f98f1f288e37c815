//! `ninep`: a 9P2000.L message stream into one server session, on the read-only store or
//! a read-write xchg.
//!
//! Input: `flags[1]`, then 9P messages back to back, each as long as its own size field
//! says (at least 4 bytes, at most what is left): a recorded session is a valid input
//! as it is. Flags: bit 0 serves xchg (read-write) instead of the store; bit 1 skips
//! the harness's own Tversion + Tattach(fid 0) before the stream.
//!
//! Checked after every message: a reply's size field is its length, it fits the msize
//! negotiated, it carries the request's tag and the request's reply type (or Rlerror);
//! it holds nothing of the file outside the shares; every descriptor the server holds
//! points inside the share. At the end: the server still answers Tversion, Tattach,
//! Twalk and Tread (the store's file reads back as it is), the store and the directory
//! outside are unchanged, and no server thread panicked.

use virtiofs_bridge::ninep::{NinepServer, MAX_MSIZE};
use virtiofs_bridge::ShareConfig;

use crate::common::{env, Fds, Input};

pub const TVERSION: u8 = 100;
pub const TATTACH: u8 = 104;
pub const TWALK: u8 = 110;
pub const TLOPEN: u8 = 12;
pub const TREAD: u8 = 116;
pub const TGETATTR: u8 = 24;
pub const TCLUNK: u8 = 120;
const RLERROR: u8 = 7;

/// Flag bit: serve xchg, read-write.
pub const READ_WRITE: u8 = 1;
/// Flag bit: no handshake before the stream.
pub const NO_HANDSHAKE: u8 = 2;

/// A 9P message being built: `size[4] type[1] tag[2]` and the fields.
pub struct Msg(Vec<u8>);

impl Msg {
    pub fn new(kind: u8, tag: u16) -> Msg {
        let mut v = vec![0u8; 4];
        v.push(kind);
        v.extend_from_slice(&tag.to_le_bytes());
        Msg(v)
    }
    pub fn u8(mut self, v: u8) -> Msg {
        self.0.push(v);
        self
    }
    pub fn u16(mut self, v: u16) -> Msg {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(mut self, v: u32) -> Msg {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Msg {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn s(mut self, v: &[u8]) -> Msg {
        self.0.extend_from_slice(&(v.len() as u16).to_le_bytes());
        self.0.extend_from_slice(v);
        self
    }
    pub fn done(mut self) -> Vec<u8> {
        let n = self.0.len() as u32;
        self.0[..4].copy_from_slice(&n.to_le_bytes());
        self.0
    }
}

pub fn version(tag: u16, msize: u32) -> Vec<u8> {
    Msg::new(TVERSION, tag).u32(msize).s(b"9P2000.L").done()
}

pub fn attach(tag: u16, fid: u32) -> Vec<u8> {
    Msg::new(TATTACH, tag)
        .u32(fid)
        .u32(u32::MAX)
        .s(b"root")
        .s(b"")
        .u32(0)
        .done()
}

pub fn walk(tag: u16, fid: u32, newfid: u32, names: &[&[u8]]) -> Vec<u8> {
    let mut m = Msg::new(TWALK, tag)
        .u32(fid)
        .u32(newfid)
        .u16(names.len() as u16);
    for n in names {
        m = m.s(n);
    }
    m.done()
}

/// Splits a stream into messages as the harness does.
pub fn split(stream: &[u8]) -> Vec<&[u8]> {
    let mut input = Input::new(stream);
    let mut out = Vec::new();
    while !input.is_empty() {
        out.push(next_message(&mut input));
    }
    out
}

fn next_message<'a>(input: &mut Input<'a>) -> &'a [u8] {
    let mut size = [0u8; 4];
    let head = input.peek(4);
    size[..head.len()].copy_from_slice(head);
    let size = u32::from_le_bytes(size) as usize;
    input.take(size.clamp(4, input.remaining().max(4)))
}

pub fn run(data: &[u8]) {
    crate::common::harness_thread();
    let env = env();
    let mut input = Input::new(data);
    let flags = input.u8();
    let read_write = flags & READ_WRITE != 0;
    let xchg = read_write.then(|| env.fresh_xchg());
    let config = match &xchg {
        Some(x) => ShareConfig::xchg(x),
        None => ShareConfig::store(env.store()),
    };
    let mut roots = vec![env.store()];
    roots.extend(xchg.as_deref());
    let server = NinepServer::new(&config).expect("a 9p server on the share");
    let fds = Fds::now();
    if flags & NO_HANDSHAKE == 0 {
        for m in [version(0xffff, MAX_MSIZE), attach(1, 0)] {
            let r = server.handle(&m).expect("a reply to the handshake");
            assert_ne!(r[4], RLERROR, "the handshake was refused");
        }
    }
    while !input.is_empty() {
        let msg = next_message(&mut input);
        let reply = server.handle(msg);
        if let Some(reply) = &reply {
            check_reply(msg, reply, server.msize());
            env.check_no_secret(data, reply, "a 9p reply");
        }
        fds.check_since(&roots);
    }
    still_serves(&server, read_write);
    drop(server);
    fds.check_since(&roots);
    env.check_unchanged();
    crate::common::check_no_panic_elsewhere();
}

fn check_reply(msg: &[u8], reply: &[u8], msize: u32) {
    assert!(reply.len() >= 7, "a reply of {} bytes", reply.len());
    let size = u32::from_le_bytes(reply[..4].try_into().unwrap()) as usize;
    assert_eq!(size, reply.len(), "a reply's size field is not its length");
    assert!(
        reply.len() <= msize as usize && reply.len() <= MAX_MSIZE as usize,
        "a reply of {} bytes, over the msize {msize}",
        reply.len()
    );
    if msg.len() >= 7 {
        assert_eq!(reply[5..7], msg[5..7], "a reply with another tag");
        assert!(
            reply[4] == RLERROR || reply[4] == msg[4].wrapping_add(1),
            "reply type {} to request type {}",
            reply[4],
            msg[4]
        );
    }
}

/// The session answers a fresh handshake and serves a file after whatever came before.
fn still_serves(server: &NinepServer, read_write: bool) {
    let ask = |m: Vec<u8>| -> Vec<u8> {
        let r = server.handle(&m).expect("a reply to a well-formed request");
        check_reply(&m, &r, server.msize());
        assert_ne!(
            r[4],
            RLERROR,
            "a well-formed request (type {}) after the input was refused: errno {}",
            m[4],
            u32::from_le_bytes(r[7..11].try_into().unwrap())
        );
        r
    };
    ask(version(1, 8192));
    ask(attach(2, 1));
    ask(Msg::new(TGETATTR, 3).u32(1).u64(0x3fff).done());
    if !read_write {
        // The store's file reads back as it is.
        ask(walk(4, 1, 2, &[b"hello.txt"]));
        ask(Msg::new(TLOPEN, 5).u32(2).u32(0).done());
        let r = ask(Msg::new(TREAD, 6).u32(2).u64(0).u32(4096).done());
        assert_eq!(
            &r[11..],
            b"hello from the store\n",
            "the store's file reads wrong"
        );
    }
}
