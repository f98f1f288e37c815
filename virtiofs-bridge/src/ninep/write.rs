//! The 9P2000.L requests that change a read-write share: what a Linux v9fs client sends for
//! `cp`, `touch`, `mv`, `rm -r`, `mkdir -p`, `echo > f`, `dd`, `ln -s` and `sync`.
//!
//! Safety rules, for every request here:
//! - a name to create, remove or rename is exactly one plain component (not empty, not `.`
//!   or `..`, no `/`, no NUL), else `EINVAL`;
//! - every host call is relative to a descriptor a fid holds (`openat`, `mkdirat`,
//!   `unlinkat`, `renameat`, `symlinkat`, `linkat`, `mknodat`, `fchownat`/`utimensat` with
//!   `AT_EMPTY_PATH`), none of which follows a symlink in the name it is given
//!   (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`, or calls that never follow a final symlink);
//!   a symlink the guest planted stays a node, never a way to a host path;
//! - an O_PATH descriptor is reopened for I/O or changed through `/proc/self/fd/N` only
//!   when it is a regular file or directory (see [`super::reopen`]).
//!
//! Decisions:
//! - **Tmknod** creates regular files and FIFOs only; device nodes and sockets get `EPERM`.
//!   A FIFO is used by the guest's own kernel (the pipe lives in the guest); the server
//!   refuses to open one itself (`Tlopen` gives `EACCES`, `Tlcreate` of an existing FIFO
//!   `EEXIST`), so it can never block on one.
//! - **Tlock** always answers success and **Tgetlock** always answers "unlocked", as QEMU
//!   and diod do for local locks: locks hold among the guest's own processes (its kernel
//!   keeps them) and are not shared with host processes.
//! - **Txattrwalk / Txattrcreate** answer `EOPNOTSUPP`: the guest's tools (busybox and
//!   coreutils `cp`, `mv`, ...) carry on without xattrs.
//! - New nodes belong to the server's user; the gid a request carries is not applied.
//!   Tsetattr's uid/gid are applied with `fchownat` (the host says `EPERM` when the
//!   server may not). The guest's mode is applied exactly (the server's umask is undone:
//!   the guest's kernel applied the guest's umask already), except that set-user-ID and
//!   set-group-ID bits are dropped from non-directories: a guest cannot leave a set-ID
//!   program for the host.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering::Relaxed;

use super::{errno, open_at, qid_of, reopen, stat, Fid, In, NinepServer, Open, Out};

const TLCREATE: u8 = 14;
const TSYMLINK: u8 = 16;
const TMKNOD: u8 = 18;
const TRENAME: u8 = 20;
const TSETATTR: u8 = 26;
const TXATTRCREATE: u8 = 32;
const TFSYNC: u8 = 50;
const TLOCK: u8 = 52;
const TGETLOCK: u8 = 54;
const TLINK: u8 = 70;
const TMKDIR: u8 = 72;
const TRENAMEAT: u8 = 74;
const TUNLINKAT: u8 = 76;
const TWRITE: u8 = 118;
const TREMOVE: u8 = 122;

/// The requests [`NinepServer::mutate`] answers on a read-write share (Txattrwalk is
/// answered `EOPNOTSUPP` by the common path, as on a read-only share).
pub(super) const SERVED: [u8; 15] = [
    TLCREATE,
    TSYMLINK,
    TMKNOD,
    TRENAME,
    TSETATTR,
    TXATTRCREATE,
    TFSYNC,
    TLOCK,
    TGETLOCK,
    TLINK,
    TMKDIR,
    TRENAMEAT,
    TUNLINKAT,
    TWRITE,
    TREMOVE,
];

// Open flags on the wire (P9_DOTL_*; they happen to equal x86 Linux's, but are mapped
// one by one so that nothing else ever reaches the host's open).
pub(super) const P9_WRONLY: u32 = 0o1;
pub(super) const P9_RDWR: u32 = 0o2;
pub(super) const P9_CREATE: u32 = 0o100;
const P9_EXCL: u32 = 0o200;
pub(super) const P9_TRUNC: u32 = 0o1000;
const P9_APPEND: u32 = 0o2000;
const P9_DSYNC: u32 = 0o10000;
const P9_SYNC: u32 = 0o4000000;

const P9_AT_REMOVEDIR: u32 = 0x200;

// Tsetattr's valid bits.
const ATTR_MODE: u32 = 1 << 0;
const ATTR_UID: u32 = 1 << 1;
const ATTR_GID: u32 = 1 << 2;
const ATTR_SIZE: u32 = 1 << 3;
const ATTR_ATIME: u32 = 1 << 4;
const ATTR_MTIME: u32 = 1 << 5;
const ATTR_ATIME_SET: u32 = 1 << 7;
const ATTR_MTIME_SET: u32 = 1 << 8;

const LOCK_SUCCESS: u8 = 0;
const LOCK_TYPE_UNLCK: u8 = 2;

/// Size of a Twrite before its data: size[4] type[1] tag[2] fid[4] offset[8] count[4].
const TWRITE_HEADER: u64 = 23;

type Reply = Result<Out, Option<u32>>;

/// Host open flags for a Tlopen/Tlcreate's flags, and whether the file is open for
/// writing. Only the access mode, O_TRUNC, O_APPEND and the sync flags pass; O_CREAT,
/// O_DIRECT, O_NOATIME and the rest are never handed on.
pub(super) fn open_flags(flags: u32) -> (i32, bool) {
    let (mut host, writes) = match flags & 3 {
        P9_WRONLY => (libc::O_WRONLY, true),
        P9_RDWR => (libc::O_RDWR, true),
        _ => (libc::O_RDONLY, false),
    };
    if flags & P9_TRUNC != 0 {
        host |= libc::O_TRUNC;
    }
    if flags & P9_APPEND != 0 {
        host |= libc::O_APPEND;
    }
    if flags & P9_DSYNC != 0 {
        host |= libc::O_DSYNC;
    }
    if flags & P9_SYNC != 0 {
        host |= libc::O_SYNC;
    }
    (host, writes)
}

/// A name the guest asks to create, remove or rename: exactly one plain component.
fn plain_name(name: &[u8]) -> Result<CString, u32> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(libc::EINVAL as u32);
    }
    CString::new(name).map_err(|_| libc::EINVAL as u32)
}

fn last_errno() -> u32 {
    errno(&std::io::Error::last_os_error())
}

fn check(rc: libc::c_int) -> Result<(), u32> {
    if rc < 0 {
        Err(last_errno())
    } else {
        Ok(())
    }
}

fn proc_fd(fd: &impl AsRawFd) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap()
}

/// The permission bits a guest may set: no set-ID bits on anything but directories.
fn perm(mode: u32, dir: bool) -> libc::mode_t {
    let m = mode & 0o7777;
    if dir {
        m & !libc::S_ISUID
    } else {
        m & !(libc::S_ISUID | libc::S_ISGID)
    }
}

fn is(st: &libc::stat, kind: libc::mode_t) -> bool {
    st.st_mode & libc::S_IFMT == kind
}

/// chmod of the node an O_PATH descriptor holds, through /proc/self/fd (fchmod does not
/// take O_PATH descriptors). Symlinks have no mode of their own: EOPNOTSUPP, as lchmod.
fn chmod_node(node: &OwnedFd, mode: u32) -> Result<(), u32> {
    let st = stat(node)?;
    if is(&st, libc::S_IFLNK) {
        return Err(libc::EOPNOTSUPP as u32);
    }
    let p = proc_fd(node);
    // SAFETY: chmod of a NUL-terminated path.
    check(unsafe { libc::chmod(p.as_ptr(), perm(mode, is(&st, libc::S_IFDIR))) })
}

fn same_node(a: &OwnedFd, b: &OwnedFd) -> Result<bool, u32> {
    let (x, y) = (stat(a)?, stat(b)?);
    Ok(x.st_dev == y.st_dev && x.st_ino == y.st_ino)
}

/// openat of a regular file to read or write, never following a symlink and never
/// blocking (on a FIFO); `mode` applies when it creates.
fn openat_file(dir: &OwnedFd, name: &CString, flags: i32, mode: libc::mode_t) -> Result<File, u32> {
    let flags = flags | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
    // SAFETY: openat with a valid directory fd and a NUL-terminated name.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, mode as libc::c_uint) };
    if fd < 0 {
        return Err(last_errno());
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Rewrites the paths of the fids at or below `from` to lie below `to` (a rename made
/// through this server), so that their `..` stays right. Paths are only hints (see
/// [`Fid::path`]): if `from` was stale already, the wrong fids may be rewritten, and their
/// `..` may then fail or land elsewhere in the share, never outside it.
fn renamed(fids: &mut std::collections::HashMap<u32, Fid>, from: &[Vec<u8>], to: &[Vec<u8>]) {
    for f in fids.values_mut() {
        if f.path.len() >= from.len() && f.path[..from.len()] == *from {
            let rest = f.path.split_off(from.len());
            f.path = to.to_vec();
            f.path.extend(rest);
        }
    }
}

fn qid_reply(kind: u8, tag: u16, node: &OwnedFd) -> Reply {
    let st = stat(node)?;
    let mut o = Out::new(kind + 1, tag);
    o.qid(qid_of(&st));
    Ok(o)
}

impl NinepServer {
    /// A mutation on a read-write share. `Err(Some(errno))` for an error reply, `Err(None)`
    /// for a malformed request.
    pub(super) fn mutate(&self, kind: u8, tag: u16, r: &mut In) -> Reply {
        let out = match kind {
            TLCREATE => self.lcreate(tag, r),
            TWRITE => self.write(tag, r),
            TMKDIR => self.mkdir(tag, r),
            TUNLINKAT => self.unlinkat(tag, r),
            TRENAMEAT => self.renameat(tag, r),
            TRENAME => self.rename(tag, r),
            TREMOVE => self.remove(tag, r),
            TSETATTR => self.setattr(tag, r),
            TFSYNC => self.fsync(tag, r),
            TSYMLINK => self.symlink(tag, r),
            TLINK => self.link(tag, r),
            TMKNOD => self.mknod(tag, r),
            TLOCK => self.lock(tag, r),
            TGETLOCK => self.getlock(tag, r),
            TXATTRCREATE => {
                let _fid = r.u32().ok_or(None)?;
                let _name = r.str().ok_or(None)?;
                let _size = r.u64().ok_or(None)?;
                let _flags = r.u32().ok_or(None)?;
                Err(Some(libc::EOPNOTSUPP as u32))
            }
            _ => Err(Some(libc::EOPNOTSUPP as u32)),
        }?;
        if !matches!(kind, TFSYNC | TLOCK | TGETLOCK) {
            self.mutations.fetch_add(1, Relaxed);
        }
        Ok(out)
    }

    /// Finds the parent directory and name of a fid's node from its path, and checks that
    /// the name still holds that very node (else ENOENT: it moved behind our back).
    fn parent_of(&self, f: &Fid) -> Result<(OwnedFd, CString), u32> {
        let (last, dir) = f.path.split_last().ok_or(libc::EBUSY as u32)?;
        let parent = self.walk_path(dir)?;
        let here = open_at(&parent, last)?;
        if !same_node(&here, &f.node)? {
            return Err(libc::ENOENT as u32);
        }
        Ok((parent, plain_name(last)?))
    }

    /// Tlcreate: create and open a regular file in the directory `fid` holds; `fid` then
    /// becomes that open file.
    fn lcreate(&self, tag: u16, r: &mut In) -> Reply {
        let fid = r.u32().ok_or(None)?;
        let name = r.str().ok_or(None)?;
        let flags = r.u32().ok_or(None)?;
        let mode = r.u32().ok_or(None)?;
        let _gid = r.u32().ok_or(None)?;
        let cname = plain_name(&name)?;
        let mut fids = self.fids.lock().unwrap();
        let f = fids.get_mut(&fid).ok_or(libc::EBADF as u32)?;
        if f.open.is_some() {
            return Err(Some(libc::EBADF as u32));
        }
        if !is(&stat(&f.node)?, libc::S_IFDIR) {
            return Err(Some(libc::ENOTDIR as u32));
        }
        let (host, writes) = open_flags(flags);
        let mode = perm(mode, false);
        // Create exclusively first, so that the exact mode can be set on what was created
        // (and only on that); a name that exists is opened as it is unless EXCL was asked.
        let (file, created) =
            match openat_file(&f.node, &cname, host | libc::O_CREAT | libc::O_EXCL, mode) {
                Ok(file) => (file, true),
                Err(e) if e == libc::EEXIST as u32 && flags & P9_EXCL == 0 => {
                    (openat_file(&f.node, &cname, host, 0)?, false)
                }
                Err(e) => return Err(Some(e)),
            };
        // SAFETY: fstat of our own descriptor into a zeroed buffer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        check(unsafe { libc::fstat(file.as_raw_fd(), &mut st) })?;
        if !is(&st, libc::S_IFREG) {
            return Err(Some(libc::EEXIST as u32));
        }
        if created {
            // SAFETY: fchmod of our own descriptor.
            check(unsafe { libc::fchmod(file.as_raw_fd(), mode) })?;
        }
        // The file is regular: O_NONBLOCK only guarded the open.
        // SAFETY: fcntl on our own descriptor.
        unsafe {
            let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            if fl >= 0 {
                libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
            }
        }
        let node = OwnedFd::from(reopen(&file, libc::O_PATH)?);
        f.node = node;
        f.path.push(name);
        f.open = Some(Open::File {
            file,
            write: writes,
        });
        let mut o = Out::new(TLCREATE + 1, tag);
        o.qid(qid_of(&st)).u32(0);
        Ok(o)
    }

    fn write(&self, tag: u16, r: &mut In) -> Reply {
        let fid = r.u32().ok_or(None)?;
        let offset = r.u64().ok_or(None)?;
        let count = r.u32().ok_or(None)?;
        // A count that does not fit the negotiated message size is a lie, whatever follows.
        if count as u64 + TWRITE_HEADER > self.msize() as u64 {
            return Err(None);
        }
        let data = r.take(count as usize).ok_or(None)?;
        let fids = self.fids.lock().unwrap();
        let f = fids.get(&fid).ok_or(libc::EBADF as u32)?;
        let Some(Open::File { file, write: true }) = &f.open else {
            return Err(Some(libc::EBADF as u32));
        };
        let n = file.write_at(data, offset).map_err(|x| Some(errno(&x)))?;
        self.written.fetch_add(n as u64, Relaxed);
        let mut o = Out::new(TWRITE + 1, tag);
        o.u32(n as u32);
        Ok(o)
    }

    fn mkdir(&self, tag: u16, r: &mut In) -> Reply {
        let dfid = r.u32().ok_or(None)?;
        let name = r.str().ok_or(None)?;
        let mode = r.u32().ok_or(None)?;
        let _gid = r.u32().ok_or(None)?;
        let cname = plain_name(&name)?;
        let fids = self.fids.lock().unwrap();
        let d = fids.get(&dfid).ok_or(libc::EBADF as u32)?;
        // SAFETY: mkdirat with a valid directory fd and a NUL-terminated name.
        check(unsafe { libc::mkdirat(d.node.as_raw_fd(), cname.as_ptr(), perm(mode, true)) })?;
        let node = open_at(&d.node, &name)?;
        chmod_node(&node, mode)?;
        qid_reply(TMKDIR, tag, &node)
    }

    fn unlinkat(&self, tag: u16, r: &mut In) -> Reply {
        let dfid = r.u32().ok_or(None)?;
        let name = r.str().ok_or(None)?;
        let flags = r.u32().ok_or(None)?;
        let cname = plain_name(&name)?;
        let fids = self.fids.lock().unwrap();
        let d = fids.get(&dfid).ok_or(libc::EBADF as u32)?;
        let at = if flags & P9_AT_REMOVEDIR != 0 {
            libc::AT_REMOVEDIR
        } else {
            0
        };
        // SAFETY: unlinkat with a valid directory fd and a NUL-terminated name.
        check(unsafe { libc::unlinkat(d.node.as_raw_fd(), cname.as_ptr(), at) })?;
        Ok(Out::new(TUNLINKAT + 1, tag))
    }

    fn renameat(&self, tag: u16, r: &mut In) -> Reply {
        let odfid = r.u32().ok_or(None)?;
        let oname = r.str().ok_or(None)?;
        let ndfid = r.u32().ok_or(None)?;
        let nname = r.str().ok_or(None)?;
        let (ocname, ncname) = (plain_name(&oname)?, plain_name(&nname)?);
        let mut fids = self.fids.lock().unwrap();
        let od = fids.get(&odfid).ok_or(libc::EBADF as u32)?;
        let nd = fids.get(&ndfid).ok_or(libc::EBADF as u32)?;
        // SAFETY: renameat with valid directory fds and NUL-terminated names; it never
        // follows a symlink in either final component.
        check(unsafe {
            libc::renameat(
                od.node.as_raw_fd(),
                ocname.as_ptr(),
                nd.node.as_raw_fd(),
                ncname.as_ptr(),
            )
        })?;
        let mut from = od.path.clone();
        from.push(oname);
        let mut to = nd.path.clone();
        to.push(nname);
        renamed(&mut fids, &from, &to);
        Ok(Out::new(TRENAMEAT + 1, tag))
    }

    /// Trename: the node `fid` holds moves into the directory `dfid` holds, as `name`.
    fn rename(&self, tag: u16, r: &mut In) -> Reply {
        let fid = r.u32().ok_or(None)?;
        let dfid = r.u32().ok_or(None)?;
        let name = r.str().ok_or(None)?;
        let cname = plain_name(&name)?;
        let mut fids = self.fids.lock().unwrap();
        let f = fids.get(&fid).ok_or(libc::EBADF as u32)?;
        let d = fids.get(&dfid).ok_or(libc::EBADF as u32)?;
        let (parent, last) = self.parent_of(f)?;
        // SAFETY: as in renameat.
        check(unsafe {
            libc::renameat(
                parent.as_raw_fd(),
                last.as_ptr(),
                d.node.as_raw_fd(),
                cname.as_ptr(),
            )
        })?;
        let from = f.path.clone();
        let mut to = d.path.clone();
        to.push(name);
        renamed(&mut fids, &from, &to);
        Ok(Out::new(TRENAME + 1, tag))
    }

    /// Tremove: remove the node `fid` holds; the fid is clunked whatever happens.
    fn remove(&self, tag: u16, r: &mut In) -> Reply {
        let fid = r.u32().ok_or(None)?;
        let mut fids = self.fids.lock().unwrap();
        let f = fids.remove(&fid).ok_or(libc::EBADF as u32)?;
        drop(fids);
        let (parent, last) = self.parent_of(&f)?;
        let at = if is(&stat(&f.node)?, libc::S_IFDIR) {
            libc::AT_REMOVEDIR
        } else {
            0
        };
        // SAFETY: unlinkat with a valid directory fd and a NUL-terminated name.
        check(unsafe { libc::unlinkat(parent.as_raw_fd(), last.as_ptr(), at) })?;
        Ok(Out::new(TREMOVE + 1, tag))
    }

    fn setattr(&self, tag: u16, r: &mut In) -> Reply {
        let fid = r.u32().ok_or(None)?;
        let valid = r.u32().ok_or(None)?;
        let mode = r.u32().ok_or(None)?;
        let uid = r.u32().ok_or(None)?;
        let gid = r.u32().ok_or(None)?;
        let size = r.u64().ok_or(None)?;
        let atime = (r.u64().ok_or(None)?, r.u64().ok_or(None)?);
        let mtime = (r.u64().ok_or(None)?, r.u64().ok_or(None)?);
        let fids = self.fids.lock().unwrap();
        let f = fids.get(&fid).ok_or(libc::EBADF as u32)?;
        let st = stat(&f.node)?;
        if valid & ATTR_MODE != 0 {
            chmod_node(&f.node, mode)?;
        }
        if valid & (ATTR_UID | ATTR_GID) != 0 {
            let uid = if valid & ATTR_UID != 0 { uid } else { u32::MAX };
            let gid = if valid & ATTR_GID != 0 { gid } else { u32::MAX };
            // SAFETY: fchownat on our O_PATH descriptor itself (AT_EMPTY_PATH): a symlink
            // is changed, not followed.
            check(unsafe {
                libc::fchownat(
                    f.node.as_raw_fd(),
                    c"".as_ptr(),
                    uid,
                    gid,
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        }
        if valid & ATTR_SIZE != 0 {
            if is(&st, libc::S_IFDIR) {
                return Err(Some(libc::EISDIR as u32));
            }
            if !is(&st, libc::S_IFREG) {
                return Err(Some(libc::EINVAL as u32));
            }
            let size = i64::try_from(size).map_err(|_| libc::EINVAL as u32)?;
            let reopened;
            let file = match &f.open {
                Some(Open::File { file, write: true }) => file,
                _ => {
                    reopened = reopen(&f.node, libc::O_WRONLY)?;
                    &reopened
                }
            };
            // SAFETY: ftruncate of our own descriptor.
            check(unsafe { libc::ftruncate(file.as_raw_fd(), size) })?;
        }
        if valid & (ATTR_ATIME | ATTR_MTIME) != 0 {
            let time = |change: u32, given: u32, (sec, nsec): (u64, u64)| {
                if valid & change == 0 {
                    libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    }
                } else if valid & given == 0 {
                    libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_NOW,
                    }
                } else {
                    libc::timespec {
                        tv_sec: sec as i64,
                        // Out-of-range nanoseconds are refused by the kernel (EINVAL).
                        tv_nsec: nsec.min(i64::MAX as u64) as i64,
                    }
                }
            };
            let times = [
                time(ATTR_ATIME, ATTR_ATIME_SET, atime),
                time(ATTR_MTIME, ATTR_MTIME_SET, mtime),
            ];
            // SAFETY: utimensat on our O_PATH descriptor itself (AT_EMPTY_PATH), with two
            // timespecs; a symlink's own times are set, it is not followed.
            check(unsafe {
                libc::utimensat(
                    f.node.as_raw_fd(),
                    c"".as_ptr(),
                    times.as_ptr(),
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        }
        Ok(Out::new(TSETATTR + 1, tag))
    }

    fn fsync(&self, tag: u16, r: &mut In) -> Reply {
        let fid = r.u32().ok_or(None)?;
        // Older clients send no datasync field.
        let datasync = r.u32().unwrap_or(0);
        let fids = self.fids.lock().unwrap();
        let f = fids.get(&fid).ok_or(libc::EBADF as u32)?;
        let res = match &f.open {
            Some(Open::File { file, .. }) if datasync != 0 => file.sync_data(),
            Some(Open::File { file, .. }) => file.sync_all(),
            _ => {
                let st = stat(&f.node)?;
                if !is(&st, libc::S_IFREG) && !is(&st, libc::S_IFDIR) {
                    return Ok(Out::new(TFSYNC + 1, tag));
                }
                reopen(&f.node, libc::O_RDONLY)?.sync_all()
            }
        };
        res.map_err(|x| Some(errno(&x)))?;
        Ok(Out::new(TFSYNC + 1, tag))
    }

    /// Tsymlink: the target is stored as the guest gave it and never resolved here.
    fn symlink(&self, tag: u16, r: &mut In) -> Reply {
        let dfid = r.u32().ok_or(None)?;
        let name = r.str().ok_or(None)?;
        let target = r.str().ok_or(None)?;
        let _gid = r.u32().ok_or(None)?;
        let cname = plain_name(&name)?;
        if target.is_empty() {
            return Err(Some(libc::ENOENT as u32));
        }
        let ctarget = CString::new(target).map_err(|_| libc::EINVAL as u32)?;
        let fids = self.fids.lock().unwrap();
        let d = fids.get(&dfid).ok_or(libc::EBADF as u32)?;
        // SAFETY: symlinkat with NUL-terminated strings and a valid directory fd.
        check(unsafe { libc::symlinkat(ctarget.as_ptr(), d.node.as_raw_fd(), cname.as_ptr()) })?;
        let node = open_at(&d.node, &name)?;
        qid_reply(TSYMLINK, tag, &node)
    }

    /// Tlink: a new name in `dfid` for the node `fid` holds. Linked through the
    /// /proc/self/fd magic link (as virtiofsd does): it resolves to the node itself (a
    /// symlink node is linked as the symlink, never as its target).
    fn link(&self, tag: u16, r: &mut In) -> Reply {
        let dfid = r.u32().ok_or(None)?;
        let fid = r.u32().ok_or(None)?;
        let name = r.str().ok_or(None)?;
        let cname = plain_name(&name)?;
        let fids = self.fids.lock().unwrap();
        let d = fids.get(&dfid).ok_or(libc::EBADF as u32)?;
        let f = fids.get(&fid).ok_or(libc::EBADF as u32)?;
        if is(&stat(&f.node)?, libc::S_IFDIR) {
            return Err(Some(libc::EPERM as u32));
        }
        let p = proc_fd(&f.node);
        // SAFETY: linkat with NUL-terminated paths and a valid directory fd.
        check(unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                p.as_ptr(),
                d.node.as_raw_fd(),
                cname.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        })?;
        Ok(Out::new(TLINK + 1, tag))
    }

    /// Tmknod: regular files and FIFOs only; anything else is EPERM.
    fn mknod(&self, tag: u16, r: &mut In) -> Reply {
        let dfid = r.u32().ok_or(None)?;
        let name = r.str().ok_or(None)?;
        let mode = r.u32().ok_or(None)?;
        let _major = r.u32().ok_or(None)?;
        let _minor = r.u32().ok_or(None)?;
        let _gid = r.u32().ok_or(None)?;
        let cname = plain_name(&name)?;
        let kind = match mode & libc::S_IFMT {
            0 | libc::S_IFREG => libc::S_IFREG,
            libc::S_IFIFO => libc::S_IFIFO,
            _ => return Err(Some(libc::EPERM as u32)),
        };
        let fids = self.fids.lock().unwrap();
        let d = fids.get(&dfid).ok_or(libc::EBADF as u32)?;
        // SAFETY: mknodat with a valid directory fd and a NUL-terminated name.
        check(unsafe {
            libc::mknodat(
                d.node.as_raw_fd(),
                cname.as_ptr(),
                kind | perm(mode, false),
                0,
            )
        })?;
        let node = open_at(&d.node, &name)?;
        chmod_node(&node, mode)?;
        qid_reply(TMKNOD, tag, &node)
    }

    fn lock(&self, tag: u16, r: &mut In) -> Reply {
        let fid = r.u32().ok_or(None)?;
        let _kind = r.take(1).ok_or(None)?;
        let _flags = r.u32().ok_or(None)?;
        let _start = r.u64().ok_or(None)?;
        let _length = r.u64().ok_or(None)?;
        let _proc_id = r.u32().ok_or(None)?;
        let _client = r.str().ok_or(None)?;
        if !self.fids.lock().unwrap().contains_key(&fid) {
            return Err(Some(libc::EBADF as u32));
        }
        let mut o = Out::new(TLOCK + 1, tag);
        o.u8(LOCK_SUCCESS);
        Ok(o)
    }

    fn getlock(&self, tag: u16, r: &mut In) -> Reply {
        let fid = r.u32().ok_or(None)?;
        let _kind = r.take(1).ok_or(None)?;
        let start = r.u64().ok_or(None)?;
        let length = r.u64().ok_or(None)?;
        let proc_id = r.u32().ok_or(None)?;
        let client = r.str().ok_or(None)?;
        if !self.fids.lock().unwrap().contains_key(&fid) {
            return Err(Some(libc::EBADF as u32));
        }
        let mut o = Out::new(TGETLOCK + 1, tag);
        o.u8(LOCK_TYPE_UNLCK)
            .u64(start)
            .u64(length)
            .u32(proc_id)
            .str(&client);
        Ok(o)
    }
}
