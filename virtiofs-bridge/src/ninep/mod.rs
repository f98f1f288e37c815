//! A 9P2000.L server for guests that mount 9p rather than virtio-fs: read-only shares (the
//! store) and read-write ones (`xchg`). It answers one request message with one reply
//! message; a transport (the embedded VMM's virtio-9p device, or [`serve_tcp`]) carries them.
//!
//! Same rules as the virtio-fs side: names are resolved one component at a time relative
//! to a directory file descriptor with `O_NOFOLLOW` (a symlink is a node the guest reads
//! with READLINK, never a way out), and `..` never climbs above the share's root.
//! Malformed messages get `Rlerror(EINVAL)` (or no reply when not even a tag can be read)
//! and are counted; the server keeps serving.
//!
//! On a read-only share every mutation is answered `EROFS` and counted. On a read-write
//! share the requests a Linux v9fs client sends to create and change files are served
//! (see [`write`]): every name they carry must be one plain component, and every host
//! call is made relative to a directory descriptor the fid holds (`openat`, `mkdirat`,
//! `unlinkat`, `renameat`, `symlinkat`, `linkat`, `mknodat`), never through a host path
//! built from the guest's names, and never following a symlink the guest planted.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use crate::share::ShareConfig;
use crate::Error;

mod state;
#[cfg(test)]
mod tests;
mod write;

pub use state::{NinepState, RestoreReport, SavedFid, SavedOpen};

pub const VERSION: &str = "9P2000.L";
/// The largest message this server handles (the guest's msize is clamped to it).
pub const MAX_MSIZE: u32 = 128 << 10;
const HEADER: usize = 7;
const NOFID: u32 = u32::MAX;

// Message types (9P2000.L and the base protocol).
const RLERROR: u8 = 7;
const TSTATFS: u8 = 8;
const TLOPEN: u8 = 12;
const TREADLINK: u8 = 22;
const TGETATTR: u8 = 24;
const TREADDIR: u8 = 40;
const TVERSION: u8 = 100;
const TATTACH: u8 = 104;
const TFLUSH: u8 = 108;
const TWALK: u8 = 110;
const TREAD: u8 = 116;
const TCLUNK: u8 = 120;
/// Requests that would change the share: answered EROFS on a read-only share.
const MUTATIONS: [u8; 12] = [14, 16, 18, 20, 26, 32, 70, 72, 74, 76, 118, 122];

const QTDIR: u8 = 0x80;
const QTSYMLINK: u8 = 0x02;

struct Fid {
    /// An O_PATH descriptor of the node.
    node: OwnedFd,
    /// Components from the share's root, each one plain name: only used to answer `..`
    /// (and to find a node's parent for Tremove/Trename). It is a hint, never trusted for
    /// safety: `..` walks it down again from the root descriptor with `O_NOFOLLOW`, so
    /// however stale it gets (a rename or unlink behind the fid's back) the walk lands
    /// inside the share or fails; it cannot climb out. Renames made through this server
    /// rewrite the paths of the fids below the renamed node to keep `..` right.
    path: Vec<Vec<u8>>,
    open: Option<Open>,
}

/// A directory entry: name, d_type, inode.
type DirEntry = (Vec<u8>, u8, u64);

enum Open {
    /// A regular file, and whether it was opened for writing (Twrite needs it).
    File { file: File, write: bool },
    /// Directory entries, read once at open.
    Dir(Vec<DirEntry>),
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NinepStats {
    pub requests: u64,
    pub malformed: u64,
    /// Mutations refused with EROFS (read-only shares).
    pub refused_writes: u64,
    /// Mutations served (read-write shares): creates, writes, renames, setattrs...
    pub mutations: u64,
    /// Bytes written by Twrite.
    pub bytes_written: u64,
}

pub struct NinepServer {
    root: OwnedFd,
    read_only: bool,
    fids: Mutex<HashMap<u32, Fid>>,
    msize: Mutex<u32>,
    tag: String,
    requests: AtomicU64,
    malformed: AtomicU64,
    refused: AtomicU64,
    mutations: AtomicU64,
    written: AtomicU64,
}

/// A reply being built.
struct Out(Vec<u8>);

impl Out {
    fn new(kind: u8, tag: u16) -> Out {
        let mut v = vec![0u8; 4];
        v.push(kind);
        v.extend_from_slice(&tag.to_le_bytes());
        Out(v)
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &[u8]) -> &mut Self {
        self.u16(s.len() as u16);
        self.0.extend_from_slice(s);
        self
    }
    fn qid(&mut self, q: (u8, u32, u64)) -> &mut Self {
        self.u8(q.0).u32(q.1).u64(q.2)
    }
    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[..4].copy_from_slice(&len.to_le_bytes());
        self.0
    }
}

/// A request being read; every read is bounds-checked.
struct In<'a> {
    b: &'a [u8],
    at: usize,
}

impl In<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn str(&mut self) -> Option<Vec<u8>> {
        let n = self.u16()? as usize;
        Some(self.take(n)?.to_vec())
    }
}

fn errno(e: &std::io::Error) -> u32 {
    e.raw_os_error().unwrap_or(libc::EIO) as u32
}

fn stat(fd: &OwnedFd) -> Result<libc::stat, u32> {
    // SAFETY: fstat on a descriptor we own into a zeroed stat buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(errno(&std::io::Error::last_os_error()));
    }
    Ok(st)
}

fn qid_of(st: &libc::stat) -> (u8, u32, u64) {
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => QTDIR,
        libc::S_IFLNK => QTSYMLINK,
        _ => 0,
    };
    (kind, st.st_mtime as u32, st.st_ino)
}

/// O_PATH|O_NOFOLLOW open of one name under `dir`.
fn open_at(dir: &OwnedFd, name: &[u8]) -> Result<OwnedFd, u32> {
    let c = CString::new(name).map_err(|_| libc::EINVAL as u32)?;
    // SAFETY: openat with a valid directory fd and NUL-terminated name.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(errno(&std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn dup(fd: &OwnedFd) -> Result<OwnedFd, u32> {
    fd.try_clone().map_err(|e| errno(&e))
}

/// Reopens an O_PATH descriptor for I/O through /proc/self/fd (as virtiofsd does): the
/// magic link leads to the very inode the descriptor holds, with no name looked up, so
/// there is no way to be redirected. Callers only reopen directories and regular files
/// (a symlink's descriptor would give ELOOP, not its target).
fn reopen(node: &impl AsRawFd, flags: i32) -> Result<File, u32> {
    let p = CString::new(format!("/proc/self/fd/{}", node.as_raw_fd())).unwrap();
    // SAFETY: open of a NUL-terminated path with valid flags.
    let fd = unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(errno(&std::io::Error::last_os_error()));
    }
    // SAFETY: as above.
    Ok(unsafe { File::from_raw_fd(fd) })
}

impl NinepServer {
    /// Serves `config.dir`, read-only or read-write as `config.read_only` says.
    pub fn new(config: &ShareConfig) -> Result<NinepServer, Error> {
        config.validate()?;
        let dir = File::open(&config.dir)
            .map_err(|e| Error::Io(format!("opening {}", config.dir.display()), e))?;
        Ok(NinepServer {
            root: OwnedFd::from(dir),
            read_only: config.read_only,
            fids: Mutex::new(HashMap::new()),
            msize: Mutex::new(MAX_MSIZE),
            tag: config.tag.clone(),
            requests: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            mutations: AtomicU64::new(0),
            written: AtomicU64::new(0),
        })
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    pub fn msize(&self) -> u32 {
        *self.msize.lock().unwrap()
    }

    pub fn stats(&self) -> NinepStats {
        NinepStats {
            requests: self.requests.load(Relaxed),
            malformed: self.malformed.load(Relaxed),
            refused_writes: self.refused.load(Relaxed),
            mutations: self.mutations.load(Relaxed),
            bytes_written: self.written.load(Relaxed),
        }
    }

    /// One request message in, one reply out (`None` when the request is too broken to
    /// carry a tag to answer).
    pub fn handle(&self, req: &[u8]) -> Option<Vec<u8>> {
        self.requests.fetch_add(1, Relaxed);
        if req.len() < HEADER {
            self.malformed.fetch_add(1, Relaxed);
            return None;
        }
        let size = u32::from_le_bytes(req[..4].try_into().unwrap()) as usize;
        let kind = req[4];
        let tag = u16::from_le_bytes([req[5], req[6]]);
        if size < HEADER || size > req.len() {
            self.malformed.fetch_add(1, Relaxed);
            return Some(lerror(tag, libc::EINVAL as u32));
        }
        let mut r = In {
            b: &req[..size],
            at: HEADER,
        };
        let reply = match self.dispatch(kind, tag, &mut r) {
            Ok(out) => out.finish(),
            Err(Some(e)) => lerror(tag, e),
            Err(None) => {
                self.malformed.fetch_add(1, Relaxed);
                lerror(tag, libc::EINVAL as u32)
            }
        };
        Some(reply)
    }

    /// `Err(Some(errno))` for an error reply, `Err(None)` for a malformed request.
    fn dispatch(&self, kind: u8, tag: u16, r: &mut In) -> Result<Out, Option<u32>> {
        let e = |v: i32| Some(v as u32);
        match kind {
            TVERSION => {
                let msize = r.u32().ok_or(None)?;
                let version = r.str().ok_or(None)?;
                let msize = msize.clamp(4096, MAX_MSIZE);
                *self.msize.lock().unwrap() = msize;
                // A new version starts a new session: every fid goes.
                self.fids.lock().unwrap().clear();
                let mut o = Out::new(TVERSION + 1, tag);
                o.u32(msize);
                if version.starts_with(VERSION.as_bytes()) {
                    o.str(VERSION.as_bytes());
                } else {
                    o.str(b"unknown");
                }
                Ok(o)
            }
            TATTACH => {
                let fid = r.u32().ok_or(None)?;
                let _afid = r.u32().ok_or(None)?;
                let _uname = r.str().ok_or(None)?;
                let _aname = r.str().ok_or(None)?;
                let node = dup(&self.root).map_err(Some)?;
                let st = stat(&node).map_err(Some)?;
                let mut fids = self.fids.lock().unwrap();
                if fids.contains_key(&fid) {
                    return Err(e(libc::EBADF));
                }
                fids.insert(
                    fid,
                    Fid {
                        node,
                        path: Vec::new(),
                        open: None,
                    },
                );
                let mut o = Out::new(TATTACH + 1, tag);
                o.qid(qid_of(&st));
                Ok(o)
            }
            TWALK => self.walk(tag, r),
            TLOPEN => {
                let fid = r.u32().ok_or(None)?;
                let flags = r.u32().ok_or(None)?;
                if self.read_only
                    && flags
                        & (write::P9_WRONLY | write::P9_RDWR | write::P9_TRUNC | write::P9_CREATE)
                        != 0
                {
                    self.refused.fetch_add(1, Relaxed);
                    return Err(e(libc::EROFS));
                }
                let (host_flags, writes) = if self.read_only {
                    (libc::O_RDONLY, false)
                } else {
                    write::open_flags(flags)
                };
                let mut fids = self.fids.lock().unwrap();
                let f = fids.get_mut(&fid).ok_or(e(libc::EBADF))?;
                let st = stat(&f.node).map_err(Some)?;
                // Only directories and regular files are reopened for I/O; the type of an
                // O_PATH descriptor's inode never changes, and opening /proc/self/fd/N of a
                // symlink would fail with ELOOP anyway: no link is ever followed here.
                let open = match st.st_mode & libc::S_IFMT {
                    libc::S_IFDIR
                        if host_flags & (libc::O_WRONLY | libc::O_RDWR | libc::O_TRUNC) != 0 =>
                    {
                        return Err(e(libc::EISDIR))
                    }
                    libc::S_IFDIR => Open::Dir(read_dir(&f.node)?),
                    libc::S_IFREG => Open::File {
                        file: reopen(&f.node, host_flags)?,
                        write: writes,
                    },
                    libc::S_IFLNK => return Err(e(libc::ELOOP)),
                    _ => return Err(e(libc::EACCES)),
                };
                let truncated = host_flags & libc::O_TRUNC != 0;
                let st = if truncated {
                    self.mutations.fetch_add(1, Relaxed);
                    stat(&f.node).map_err(Some)?
                } else {
                    st
                };
                f.open = Some(open);
                let mut o = Out::new(TLOPEN + 1, tag);
                o.qid(qid_of(&st)).u32(0);
                Ok(o)
            }
            TREAD => {
                let fid = r.u32().ok_or(None)?;
                let offset = r.u64().ok_or(None)?;
                let count = r.u32().ok_or(None)?;
                let room = self.msize().saturating_sub(11);
                let count = count.min(room) as usize;
                let fids = self.fids.lock().unwrap();
                let f = fids.get(&fid).ok_or(e(libc::EBADF))?;
                let Some(Open::File { file, .. }) = &f.open else {
                    return Err(e(libc::EBADF));
                };
                let mut buf = vec![0u8; count];
                let n = file
                    .read_at(&mut buf, offset)
                    .map_err(|x| Some(errno(&x)))?;
                let mut o = Out::new(TREAD + 1, tag);
                o.u32(n as u32);
                o.0.extend_from_slice(&buf[..n]);
                Ok(o)
            }
            TREADDIR => {
                let fid = r.u32().ok_or(None)?;
                let offset = r.u64().ok_or(None)?;
                let count = r.u32().ok_or(None)?;
                let room = count.min(self.msize().saturating_sub(11)) as usize;
                let fids = self.fids.lock().unwrap();
                let f = fids.get(&fid).ok_or(e(libc::EBADF))?;
                let Some(Open::Dir(entries)) = &f.open else {
                    return Err(e(libc::EBADF));
                };
                let mut data = Vec::new();
                for (i, (name, dtype, ino)) in entries.iter().enumerate().skip(offset as usize) {
                    let entry_len = 13 + 8 + 1 + 2 + name.len();
                    if data.len() + entry_len > room {
                        break;
                    }
                    let qtype = match *dtype {
                        libc::DT_DIR => QTDIR,
                        libc::DT_LNK => QTSYMLINK,
                        _ => 0,
                    };
                    let mut ent = Out(Vec::new());
                    ent.qid((qtype, 0, *ino))
                        .u64(i as u64 + 1)
                        .u8(*dtype)
                        .str(name);
                    data.extend_from_slice(&ent.0);
                }
                let mut o = Out::new(TREADDIR + 1, tag);
                o.u32(data.len() as u32);
                o.0.extend_from_slice(&data);
                Ok(o)
            }
            TGETATTR => {
                let fid = r.u32().ok_or(None)?;
                let _mask = r.u64().ok_or(None)?;
                let fids = self.fids.lock().unwrap();
                let f = fids.get(&fid).ok_or(e(libc::EBADF))?;
                let st = stat(&f.node).map_err(Some)?;
                let mut o = Out::new(TGETATTR + 1, tag);
                o.u64(0x3fff) // P9_GETATTR_ALL
                    .qid(qid_of(&st))
                    .u32(st.st_mode)
                    .u32(st.st_uid)
                    .u32(st.st_gid)
                    .u64(st.st_nlink)
                    .u64(st.st_rdev)
                    .u64(st.st_size as u64)
                    .u64(st.st_blksize as u64)
                    .u64(st.st_blocks as u64)
                    .u64(st.st_atime as u64)
                    .u64(st.st_atime_nsec as u64)
                    .u64(st.st_mtime as u64)
                    .u64(st.st_mtime_nsec as u64)
                    .u64(st.st_ctime as u64)
                    .u64(st.st_ctime_nsec as u64)
                    .u64(0)
                    .u64(0)
                    .u64(0)
                    .u64(0);
                Ok(o)
            }
            TREADLINK => {
                let fid = r.u32().ok_or(None)?;
                let fids = self.fids.lock().unwrap();
                let f = fids.get(&fid).ok_or(e(libc::EBADF))?;
                let mut buf = vec![0u8; 4096];
                // SAFETY: readlinkat on an O_PATH symlink fd with an empty path reads
                // that link; the buffer is ours.
                let n = unsafe {
                    libc::readlinkat(
                        f.node.as_raw_fd(),
                        c"".as_ptr(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                    )
                };
                if n < 0 {
                    return Err(Some(errno(&std::io::Error::last_os_error())));
                }
                let mut o = Out::new(TREADLINK + 1, tag);
                o.str(&buf[..n as usize]);
                Ok(o)
            }
            TSTATFS => {
                let fid = r.u32().ok_or(None)?;
                let fids = self.fids.lock().unwrap();
                let f = fids.get(&fid).ok_or(e(libc::EBADF))?;
                // SAFETY: fstatfs on our descriptor into a zeroed buffer.
                let mut s: libc::statfs = unsafe { std::mem::zeroed() };
                if unsafe { libc::fstatfs(f.node.as_raw_fd(), &mut s) } != 0 {
                    return Err(Some(errno(&std::io::Error::last_os_error())));
                }
                let mut o = Out::new(TSTATFS + 1, tag);
                o.u32(s.f_type as u32)
                    .u32(s.f_bsize as u32)
                    .u64(s.f_blocks)
                    .u64(s.f_bfree)
                    .u64(s.f_bavail)
                    .u64(s.f_files)
                    .u64(s.f_ffree)
                    .u64(0)
                    .u32(s.f_namelen as u32);
                Ok(o)
            }
            TCLUNK => {
                let fid = r.u32().ok_or(None)?;
                self.fids
                    .lock()
                    .unwrap()
                    .remove(&fid)
                    .ok_or(e(libc::EBADF))?;
                Ok(Out::new(TCLUNK + 1, tag))
            }
            TFLUSH => Ok(Out::new(TFLUSH + 1, tag)),
            k if !self.read_only && write::SERVED.contains(&k) => self.mutate(k, tag, r),
            k if MUTATIONS.contains(&k) => {
                self.refused.fetch_add(1, Relaxed);
                Err(e(libc::EROFS))
            }
            _ => Err(e(libc::EOPNOTSUPP)),
        }
    }

    /// The node at `path` below the root, walked down again one `O_NOFOLLOW` component at
    /// a time: whatever `path` holds, the result is inside the share (or an error).
    fn walk_path(&self, path: &[Vec<u8>]) -> Result<OwnedFd, u32> {
        let mut at = dup(&self.root)?;
        for comp in path {
            at = open_at(&at, comp)?;
        }
        Ok(at)
    }

    fn walk(&self, tag: u16, r: &mut In) -> Result<Out, Option<u32>> {
        let fid = r.u32().ok_or(None)?;
        let newfid = r.u32().ok_or(None)?;
        let n = r.u16().ok_or(None)? as usize;
        if n > 16 {
            return Err(None);
        }
        let mut names = Vec::with_capacity(n);
        for _ in 0..n {
            names.push(r.str().ok_or(None)?);
        }
        let mut fids = self.fids.lock().unwrap();
        let start = fids.get(&fid).ok_or(Some(libc::EBADF as u32))?;
        if newfid != fid && newfid != NOFID && fids.contains_key(&newfid) {
            return Err(Some(libc::EBADF as u32));
        }
        let mut node = dup(&start.node).map_err(Some)?;
        let mut path = start.path.clone();
        let mut qids = Vec::new();
        for name in &names {
            if name.is_empty() || name.contains(&b'/') || name.as_slice() == b"." {
                if qids.is_empty() {
                    return Err(Some(libc::ENOENT as u32));
                }
                break;
            }
            let next = if name.as_slice() == b".." {
                // Never above the root: walk down again from it, one level less.
                path.pop();
                self.walk_path(&path).map_err(Some)?
            } else {
                match open_at(&node, name) {
                    Ok(fd) => {
                        path.push(name.clone());
                        fd
                    }
                    Err(errno) if qids.is_empty() => return Err(Some(errno)),
                    Err(_) => break,
                }
            };
            qids.push(qid_of(&stat(&next).map_err(Some)?));
            node = next;
        }
        // A partial walk answers the qids it got and does not create newfid.
        if qids.len() == names.len() {
            fids.insert(
                newfid,
                Fid {
                    node,
                    path,
                    open: None,
                },
            );
        }
        let mut o = Out::new(TWALK + 1, tag);
        o.u16(qids.len() as u16);
        for q in qids {
            o.qid(q);
        }
        Ok(o)
    }
}

/// Serves 9p over TCP (9P's own framing: every message starts with its size), one
/// thread per connection: how a host-side client, or a guest with `trans=tcp`, reaches
/// the server. Runs until the listener fails.
pub fn serve_tcp(listener: std::net::TcpListener, server: std::sync::Arc<NinepServer>) {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            let _ = conn.set_nodelay(true);
            let server = server.clone();
            std::thread::spawn(move || loop {
                let mut size = [0u8; 4];
                if conn.read_exact(&mut size).is_err() {
                    break;
                }
                let n = u32::from_le_bytes(size) as usize;
                if !(HEADER..=MAX_MSIZE as usize + 4096).contains(&n) {
                    break;
                }
                let mut msg = size.to_vec();
                msg.resize(n, 0);
                if conn.read_exact(&mut msg[4..]).is_err() {
                    break;
                }
                if let Some(reply) = server.handle(&msg) {
                    if conn.write_all(&reply).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

fn lerror(tag: u16, errno: u32) -> Vec<u8> {
    let mut o = Out::new(RLERROR, tag);
    o.u32(errno);
    o.finish()
}

fn read_dir(node: &OwnedFd) -> Result<Vec<DirEntry>, Option<u32>> {
    let dir = reopen(node, libc::O_RDONLY | libc::O_DIRECTORY).map_err(Some)?;
    let path = format!("/proc/self/fd/{}", dir.as_raw_fd());
    let mut out = vec![
        (b".".to_vec(), libc::DT_DIR, 0),
        (b"..".to_vec(), libc::DT_DIR, 0),
    ];
    let mut rest: Vec<DirEntry> = std::fs::read_dir(&path)
        .map_err(|e| Some(errno(&e)))?
        .flatten()
        .map(|e| {
            use std::os::unix::fs::DirEntryExt;
            let t = e.file_type().ok();
            let dtype = match t {
                Some(t) if t.is_dir() => libc::DT_DIR,
                Some(t) if t.is_symlink() => libc::DT_LNK,
                Some(t) if t.is_file() => libc::DT_REG,
                _ => libc::DT_UNKNOWN,
            };
            (e.file_name().as_bytes().to_vec(), dtype, e.ino())
        })
        .collect();
    rest.sort();
    out.extend(rest);
    Ok(out)
}
