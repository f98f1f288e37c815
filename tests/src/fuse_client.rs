//! FUSE requests and replies as a guest kernel sends them, over [`FsFrontend`]. Typed
//! operations return the reply body or the errno the server answered.

use std::ffi::CString;

use fuse_backend_rs::abi::fuse_abi::*;
use vm_memory::ByteValued;

use crate::vhost_frontend::{FsFrontend, HIPRIO, REQUEST, SLOTS};

pub const ROOT: u64 = 1;
/// Room for any reply the tests ask for (128 KiB of data plus headers).
pub const REPLY_CAP: u32 = (128 << 10) + 4096;

/// A FUSE error reply: the (positive) errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

pub type FuseResult<T> = Result<T, Errno>;

pub struct FuseClient {
    pub frontend: FsFrontend,
    unique: u64,
    pub uid: u32,
    pub gid: u32,
}

pub fn obj<T: ByteValued + Default>(bytes: &[u8]) -> T {
    let mut t = T::default();
    let n = std::mem::size_of::<T>().min(bytes.len());
    t.as_mut_slice()[..n].copy_from_slice(&bytes[..n]);
    t
}

fn cstr(name: &str) -> Vec<u8> {
    CString::new(name).unwrap().into_bytes_with_nul()
}

/// Encodes a request: header (length filled in) followed by the body parts.
pub fn encode(
    opcode: Opcode,
    unique: u64,
    nodeid: u64,
    uid: u32,
    gid: u32,
    parts: &[&[u8]],
) -> Vec<u8> {
    let body: usize = parts.iter().map(|p| p.len()).sum();
    let header = InHeader {
        len: (std::mem::size_of::<InHeader>() + body) as u32,
        opcode: opcode as u32,
        unique,
        nodeid,
        uid,
        gid,
        pid: 1,
        padding: 0,
    };
    let mut out = header.as_slice().to_vec();
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

/// Splits a reply into its error and body, checking the header is consistent.
pub fn decode(reply: &[u8]) -> FuseResult<Vec<u8>> {
    let hlen = std::mem::size_of::<OutHeader>();
    assert!(
        reply.len() >= hlen,
        "reply of {} bytes has no header",
        reply.len()
    );
    let h: OutHeader = obj(reply);
    assert_eq!(
        h.len as usize,
        reply.len(),
        "reply header length disagrees with used length"
    );
    if h.error != 0 {
        return Err(Errno(-h.error));
    }
    Ok(reply[hlen..].to_vec())
}

/// Directory entry from READDIR / READDIRPLUS.
#[derive(Debug, Clone)]
pub struct DirEnt {
    pub ino: u64,
    pub off: u64,
    pub name: String,
    pub type_: u32,
    /// READDIRPLUS only.
    pub entry: Option<EntryOut>,
}

impl FuseClient {
    pub fn new(frontend: FsFrontend) -> Self {
        FuseClient {
            frontend,
            unique: 0,
            uid: 0,
            gid: 0,
        }
    }

    pub fn next_unique(&mut self) -> u64 {
        self.unique += 2;
        self.unique
    }

    pub fn request(&mut self, opcode: Opcode, nodeid: u64, parts: &[&[u8]]) -> FuseResult<Vec<u8>> {
        let unique = self.next_unique();
        let req = encode(opcode, unique, nodeid, self.uid, self.gid, parts);
        let cap = reply_capacity(opcode, parts.first().copied().unwrap_or_default());
        let reply = self
            .frontend
            .call(REQUEST, &req, cap)
            .expect("transport failed");
        let h: OutHeader = obj(&reply);
        assert_eq!(h.unique, unique, "reply for another request");
        decode(&reply)
    }

    /// Sends a request that has no reply (FORGET, BATCH_FORGET) on the hiprio queue.
    pub fn send_no_reply(&mut self, opcode: Opcode, nodeid: u64, parts: &[&[u8]]) {
        let unique = self.next_unique();
        let req = encode(opcode, unique, nodeid, self.uid, self.gid, parts);
        let used = self
            .frontend
            .call(HIPRIO, &req, 0)
            .expect("transport failed");
        assert!(used.is_empty(), "no-reply request got a reply");
    }

    /// Many requests in flight at once; errors per request.
    pub fn batch(&mut self, reqs: &[(Opcode, u64, Vec<u8>)]) -> Vec<FuseResult<Vec<u8>>> {
        let mut out = Vec::with_capacity(reqs.len());
        for chunk in reqs.chunks(SLOTS as usize) {
            let encoded: Vec<Vec<u8>> = chunk
                .iter()
                .map(|(op, node, body)| {
                    let u = self.next_unique();
                    encode(*op, u, *node, self.uid, self.gid, &[body])
                })
                .collect();
            let cap = chunk
                .iter()
                .map(|(op, _, body)| reply_capacity(*op, body))
                .max()
                .unwrap_or(REPLY_CAP);
            let replies = self
                .frontend
                .call_batch(REQUEST, &encoded, cap)
                .expect("transport failed");
            out.extend(replies.iter().map(|r| decode(r)));
        }
        out
    }

    pub fn init(&mut self) -> FuseResult<InitOut> {
        self.init_with(FsOptions::empty())
    }

    /// INIT as a Linux guest's virtiofs driver sends it: it can also do without OPEN and
    /// OPENDIR where the server answers them ENOSYS (`FUSE_NO_OPEN(DIR)_SUPPORT`).
    pub fn init_like_linux(&mut self) -> FuseResult<InitOut> {
        self.init_with(FsOptions::ZERO_MESSAGE_OPEN | FsOptions::ZERO_MESSAGE_OPENDIR)
    }

    fn init_with(&mut self, extra: FsOptions) -> FuseResult<InitOut> {
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 128 << 10,
            flags: (extra
                | FsOptions::ASYNC_READ
                | FsOptions::DO_READDIRPLUS
                | FsOptions::READDIRPLUS_AUTO
                | FsOptions::PARALLEL_DIROPS
                | FsOptions::BIG_WRITES
                | FsOptions::MAX_PAGES
                | FsOptions::CACHE_SYMLINKS
                | FsOptions::ATOMIC_O_TRUNC)
                .bits() as u32,
        };
        self.request(Opcode::Init, 0, &[init.as_slice()])
            .map(|b| obj(&b))
    }

    pub fn lookup(&mut self, parent: u64, name: &str) -> FuseResult<EntryOut> {
        self.request(Opcode::Lookup, parent, &[&cstr(name)])
            .map(|b| obj(&b))
    }

    /// LOOKUP with a raw name (no NUL added), for names no path API would produce.
    pub fn lookup_raw(&mut self, parent: u64, name: &[u8]) -> FuseResult<EntryOut> {
        self.request(Opcode::Lookup, parent, &[name])
            .map(|b| obj(&b))
    }

    /// Walks a relative path component by component, as the guest kernel does.
    pub fn walk(&mut self, path: &str) -> FuseResult<EntryOut> {
        let mut e = EntryOut {
            nodeid: ROOT,
            ..Default::default()
        };
        for part in path.split('/').filter(|p| !p.is_empty()) {
            e = self.lookup(e.nodeid, part)?;
        }
        Ok(e)
    }

    pub fn forget(&mut self, node: u64, nlookup: u64) {
        let f = ForgetIn { nlookup };
        self.send_no_reply(Opcode::Forget, node, &[f.as_slice()]);
    }

    pub fn batch_forget(&mut self, nodes: &[(u64, u64)]) {
        let h = BatchForgetIn {
            count: nodes.len() as u32,
            dummy: 0,
        };
        let mut body = h.as_slice().to_vec();
        for &(nodeid, nlookup) in nodes {
            body.extend_from_slice(ForgetOne { nodeid, nlookup }.as_slice());
        }
        self.send_no_reply(Opcode::BatchForget, 0, &[&body]);
    }

    pub fn getattr(&mut self, node: u64) -> FuseResult<AttrOut> {
        let g = GetattrIn::default();
        self.request(Opcode::Getattr, node, &[g.as_slice()])
            .map(|b| obj(&b))
    }

    pub fn setattr(&mut self, node: u64, s: SetattrIn) -> FuseResult<AttrOut> {
        self.request(Opcode::Setattr, node, &[s.as_slice()])
            .map(|b| obj(&b))
    }

    pub fn readlink(&mut self, node: u64) -> FuseResult<Vec<u8>> {
        self.request(Opcode::Readlink, node, &[])
    }

    pub fn symlink(&mut self, parent: u64, name: &str, target: &str) -> FuseResult<EntryOut> {
        self.request(Opcode::Symlink, parent, &[&cstr(name), &cstr(target)])
            .map(|b| obj(&b))
    }

    pub fn mknod(&mut self, parent: u64, name: &str, mode: u32) -> FuseResult<EntryOut> {
        self.mknod_device(parent, name, mode, 0)
    }

    /// MKNOD with a device number (`rdev`), for character and block devices.
    pub fn mknod_device(
        &mut self,
        parent: u64,
        name: &str,
        mode: u32,
        rdev: u32,
    ) -> FuseResult<EntryOut> {
        let m = MknodIn {
            mode,
            rdev,
            umask: 0,
            padding: 0,
        };
        self.request(Opcode::Mknod, parent, &[m.as_slice(), &cstr(name)])
            .map(|b| obj(&b))
    }

    pub fn mkdir(&mut self, parent: u64, name: &str, mode: u32) -> FuseResult<EntryOut> {
        let m = MkdirIn { mode, umask: 0 };
        self.request(Opcode::Mkdir, parent, &[m.as_slice(), &cstr(name)])
            .map(|b| obj(&b))
    }

    pub fn unlink(&mut self, parent: u64, name: &str) -> FuseResult<()> {
        self.request(Opcode::Unlink, parent, &[&cstr(name)])
            .map(drop)
    }

    pub fn rmdir(&mut self, parent: u64, name: &str) -> FuseResult<()> {
        self.request(Opcode::Rmdir, parent, &[&cstr(name)])
            .map(drop)
    }

    pub fn rename(&mut self, olddir: u64, old: &str, newdir: u64, new: &str) -> FuseResult<()> {
        let r = RenameIn { newdir };
        self.request(
            Opcode::Rename,
            olddir,
            &[r.as_slice(), &cstr(old), &cstr(new)],
        )
        .map(drop)
    }

    pub fn rename2(
        &mut self,
        olddir: u64,
        old: &str,
        newdir: u64,
        new: &str,
        flags: u32,
    ) -> FuseResult<()> {
        let r = Rename2In {
            newdir,
            flags,
            padding: 0,
        };
        self.request(
            Opcode::Rename2,
            olddir,
            &[r.as_slice(), &cstr(old), &cstr(new)],
        )
        .map(drop)
    }

    pub fn link(&mut self, node: u64, newparent: u64, newname: &str) -> FuseResult<EntryOut> {
        let l = LinkIn { oldnodeid: node };
        self.request(Opcode::Link, newparent, &[l.as_slice(), &cstr(newname)])
            .map(|b| obj(&b))
    }

    pub fn open(&mut self, node: u64, flags: i32) -> FuseResult<OpenOut> {
        let o = OpenIn {
            flags: flags as u32,
            fuse_flags: 0,
        };
        self.request(Opcode::Open, node, &[o.as_slice()])
            .map(|b| obj(&b))
    }

    pub fn create(
        &mut self,
        parent: u64,
        name: &str,
        flags: i32,
        mode: u32,
    ) -> FuseResult<(EntryOut, OpenOut)> {
        let c = CreateIn {
            flags: flags as u32,
            mode,
            umask: 0,
            fuse_flags: 0,
        };
        self.request(Opcode::Create, parent, &[c.as_slice(), &cstr(name)])
            .map(|b| {
                let e: EntryOut = obj(&b);
                let o: OpenOut = obj(&b[std::mem::size_of::<EntryOut>()..]);
                (e, o)
            })
    }

    pub fn read(&mut self, node: u64, fh: u64, offset: u64, size: u32) -> FuseResult<Vec<u8>> {
        self.request(Opcode::Read, node, &[read_in(fh, offset, size).as_slice()])
    }

    pub fn write(&mut self, node: u64, fh: u64, offset: u64, data: &[u8]) -> FuseResult<u32> {
        let w = WriteIn {
            fh,
            offset,
            size: data.len() as u32,
            ..Default::default()
        };
        self.request(Opcode::Write, node, &[w.as_slice(), data])
            .map(|b| obj::<WriteOut>(&b).size)
    }

    pub fn flush(&mut self, node: u64, fh: u64) -> FuseResult<()> {
        let f = FlushIn {
            fh,
            ..Default::default()
        };
        self.request(Opcode::Flush, node, &[f.as_slice()]).map(drop)
    }

    pub fn fsync(&mut self, node: u64, fh: u64) -> FuseResult<()> {
        let f = FsyncIn {
            fh,
            ..Default::default()
        };
        self.request(Opcode::Fsync, node, &[f.as_slice()]).map(drop)
    }

    pub fn release(&mut self, node: u64, fh: u64) -> FuseResult<()> {
        let r = ReleaseIn {
            fh,
            ..Default::default()
        };
        self.request(Opcode::Release, node, &[r.as_slice()])
            .map(drop)
    }

    pub fn statfs(&mut self, node: u64) -> FuseResult<Kstatfs> {
        self.request(Opcode::Statfs, node, &[]).map(|b| obj(&b))
    }

    pub fn opendir(&mut self, node: u64) -> FuseResult<OpenOut> {
        let o = OpenIn::default();
        self.request(Opcode::Opendir, node, &[o.as_slice()])
            .map(|b| obj(&b))
    }

    pub fn readdir(&mut self, node: u64, fh: u64, plus: bool) -> FuseResult<Vec<DirEnt>> {
        let mut all = Vec::new();
        let mut offset = 0;
        loop {
            let op = if plus {
                Opcode::Readdirplus
            } else {
                Opcode::Readdir
            };
            let body = self.request(op, node, &[read_in(fh, offset, 64 << 10).as_slice()])?;
            if body.is_empty() {
                return Ok(all);
            }
            let page = parse_dirents(&body, plus);
            offset = page.last().map(|d| d.off).unwrap_or(offset);
            all.extend(page);
        }
    }

    pub fn releasedir(&mut self, node: u64, fh: u64) -> FuseResult<()> {
        let r = ReleaseIn {
            fh,
            ..Default::default()
        };
        self.request(Opcode::Releasedir, node, &[r.as_slice()])
            .map(drop)
    }

    pub fn fsyncdir(&mut self, node: u64, fh: u64) -> FuseResult<()> {
        let f = FsyncIn {
            fh,
            ..Default::default()
        };
        self.request(Opcode::Fsyncdir, node, &[f.as_slice()])
            .map(drop)
    }

    pub fn access(&mut self, node: u64, mask: i32) -> FuseResult<()> {
        let a = AccessIn {
            mask: mask as u32,
            padding: 0,
        };
        self.request(Opcode::Access, node, &[a.as_slice()])
            .map(drop)
    }

    pub fn fallocate(&mut self, node: u64, fh: u64, offset: u64, length: u64) -> FuseResult<()> {
        let f = FallocateIn {
            fh,
            offset,
            length,
            mode: 0,
            padding: 0,
        };
        self.request(Opcode::Fallocate, node, &[f.as_slice()])
            .map(drop)
    }

    pub fn lseek(&mut self, node: u64, fh: u64, offset: u64, whence: i32) -> FuseResult<u64> {
        let l = LseekIn {
            fh,
            offset,
            whence: whence as u32,
            padding: 0,
        };
        self.request(Opcode::Lseek, node, &[l.as_slice()])
            .map(|b| obj::<LseekOut>(&b).offset)
    }

    pub fn getxattr(&mut self, node: u64, name: &str, size: u32) -> FuseResult<Vec<u8>> {
        let g = GetxattrIn { size, padding: 0 };
        self.request(Opcode::Getxattr, node, &[g.as_slice(), &cstr(name)])
    }

    pub fn listxattr(&mut self, node: u64, size: u32) -> FuseResult<Vec<u8>> {
        let g = GetxattrIn { size, padding: 0 };
        self.request(Opcode::Listxattr, node, &[g.as_slice()])
    }

    pub fn setxattr(&mut self, node: u64, name: &str, value: &[u8]) -> FuseResult<()> {
        let s = SetxattrIn {
            size: value.len() as u32,
            flags: 0,
        };
        self.request(Opcode::Setxattr, node, &[s.as_slice(), &cstr(name), value])
            .map(drop)
    }

    pub fn removexattr(&mut self, node: u64, name: &str) -> FuseResult<()> {
        self.request(Opcode::Removexattr, node, &[&cstr(name)])
            .map(drop)
    }

    /// DESTROY ends the session; servers differ on whether it gets a reply, so none is
    /// checked.
    pub fn destroy(&mut self) {
        let unique = self.next_unique();
        let req = encode(Opcode::Destroy, unique, 0, self.uid, self.gid, &[]);
        self.frontend
            .call(REQUEST, &req, REPLY_CAP)
            .expect("transport failed");
    }
}

/// The writable room the Linux driver gives a request: exactly header + `size` for reads
/// and directory listings (virtiofsd relies on that and fails reads given more), a
/// generous buffer otherwise.
pub fn reply_capacity(opcode: Opcode, body: &[u8]) -> u32 {
    match opcode {
        Opcode::Read | Opcode::Readdir | Opcode::Readdirplus if body.len() >= 20 => {
            let size = u32::from_ne_bytes(body[16..20].try_into().unwrap());
            (std::mem::size_of::<OutHeader>() as u32 + size).min(REPLY_CAP)
        }
        _ => REPLY_CAP,
    }
}

pub fn read_in(fh: u64, offset: u64, size: u32) -> ReadIn {
    ReadIn {
        fh,
        offset,
        size,
        ..Default::default()
    }
}

fn parse_dirents(mut body: &[u8], plus: bool) -> Vec<DirEnt> {
    let mut out = Vec::new();
    loop {
        let entry = if plus {
            if body.len() < std::mem::size_of::<EntryOut>() {
                break;
            }
            let e: EntryOut = obj(body);
            body = &body[std::mem::size_of::<EntryOut>()..];
            Some(e)
        } else {
            None
        };
        if body.len() < std::mem::size_of::<Dirent>() {
            break;
        }
        let d: Dirent = obj(body);
        let start = std::mem::size_of::<Dirent>();
        let name = String::from_utf8_lossy(&body[start..start + d.namelen as usize]).into_owned();
        let padded = (start + d.namelen as usize + 7) & !7;
        out.push(DirEnt {
            ino: d.ino,
            off: d.off,
            name,
            type_: d.type_,
            entry,
        });
        body = &body[padded.min(body.len())..];
    }
    out
}
