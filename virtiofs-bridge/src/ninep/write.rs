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
//!   when it is a regular file or directory (see [`super::host::reopen`]).
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

use super::error::RequestError;
use super::host::{check, is, open_at, proc_fd, qid_of, reopen, stat};
use super::request::SetAttr;
use super::wire::{open_flags, Out, ParseError, P9_EXCL};
use super::{Fid, NinepServer, Open};

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

/// Size of a Twrite before its data: `size[4] type[1] tag[2] fid[4] offset[8] count[4]`.
const TWRITE_HEADER: u64 = 23;

type Reply = Result<Out, RequestError>;

/// A name the guest asks to create, remove or rename: exactly one plain component.
fn plain_name(name: &[u8]) -> Result<CString, RequestError> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(RequestError::BadName);
    }
    CString::new(name).map_err(|_| RequestError::BadName)
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

/// chmod of the node an O_PATH descriptor holds, through /proc/self/fd (fchmod does not
/// take O_PATH descriptors). Symlinks have no mode of their own: EOPNOTSUPP, as lchmod.
fn chmod_node(node: &OwnedFd, mode: u32) -> Result<(), RequestError> {
    let st = stat(node)?;
    if is(&st, libc::S_IFLNK) {
        return Err(RequestError::Os(libc::EOPNOTSUPP));
    }
    let p = proc_fd(node);
    // SAFETY: chmod of a NUL-terminated path.
    check(unsafe { libc::chmod(p.as_ptr(), perm(mode, is(&st, libc::S_IFDIR))) })
}

fn same_node(a: &OwnedFd, b: &OwnedFd) -> Result<bool, RequestError> {
    let (x, y) = (stat(a)?, stat(b)?);
    Ok(x.st_dev == y.st_dev && x.st_ino == y.st_ino)
}

/// openat of a regular file to read or write, never following a symlink and never
/// blocking (on a FIFO); `mode` applies when it creates.
fn openat_file(
    dir: &OwnedFd,
    name: &CString,
    flags: i32,
    mode: libc::mode_t,
) -> Result<File, RequestError> {
    let flags = flags | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
    // SAFETY: openat with a valid directory fd and a NUL-terminated name.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, mode as libc::c_uint) };
    check(fd)?;
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

fn qid_reply(node: &OwnedFd) -> Reply {
    let st = stat(node)?;
    let mut o = Out::message();
    o.qid(qid_of(&st));
    Ok(o)
}

impl NinepServer {
    /// Finds the parent directory and name of a fid's node from its path, and checks that
    /// the name still holds that very node (else ENOENT: it moved behind our back).
    fn parent_of(&self, f: &Fid) -> Result<(OwnedFd, CString), RequestError> {
        let (last, dir) = f.path.split_last().ok_or(RequestError::Os(libc::EBUSY))?;
        let parent = self.walk_path(dir)?;
        let here = open_at(&parent, last)?;
        if !same_node(&here, &f.node)? {
            return Err(RequestError::Os(libc::ENOENT));
        }
        Ok((parent, plain_name(last)?))
    }

    /// Tlcreate: create and open a regular file in the directory `fid` holds; `fid` then
    /// becomes that open file.
    pub(super) fn lcreate(&self, fid: u32, name: &[u8], flags: u32, mode: u32) -> Reply {
        let cname = plain_name(name)?;
        let mut fids = self.fids.lock().unwrap();
        let f = fids.get_mut(&fid).ok_or(RequestError::BadFid)?;
        if f.open.is_some() {
            return Err(RequestError::BadFid);
        }
        if !is(&stat(&f.node)?, libc::S_IFDIR) {
            return Err(RequestError::Os(libc::ENOTDIR));
        }
        let (host, writes) = open_flags(flags);
        let mode = perm(mode, false);
        // Create exclusively first, so that the exact mode can be set on what was created
        // (and only on that); a name that exists is opened as it is unless EXCL was asked.
        let (file, created) =
            match openat_file(&f.node, &cname, host | libc::O_CREAT | libc::O_EXCL, mode) {
                Ok(file) => (file, true),
                Err(RequestError::Os(libc::EEXIST)) if flags & P9_EXCL == 0 => {
                    (openat_file(&f.node, &cname, host, 0)?, false)
                }
                Err(e) => return Err(e),
            };
        let st = stat(&file)?;
        if !is(&st, libc::S_IFREG) {
            return Err(RequestError::Os(libc::EEXIST));
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
        f.path.push(name.to_vec());
        f.open = Some(Open::File {
            file,
            write: writes,
        });
        let mut o = Out::message();
        o.qid(qid_of(&st)).u32(0);
        Ok(o)
    }

    pub(super) fn write(&self, fid: u32, offset: u64, data: &[u8]) -> Reply {
        // A count that does not fit the negotiated message size is a lie, whatever follows.
        if data.len() as u64 + TWRITE_HEADER > self.msize() as u64 {
            return Err(ParseError::OverMsize(data.len()).into());
        }
        let fids = self.fids.lock().unwrap();
        let f = fids.get(&fid).ok_or(RequestError::BadFid)?;
        let Some(Open::File { file, write: true }) = &f.open else {
            return Err(RequestError::BadFid);
        };
        let n = file.write_at(data, offset)?;
        self.written.fetch_add(n as u64, Relaxed);
        let mut o = Out::message();
        o.u32(n as u32);
        Ok(o)
    }

    pub(super) fn mkdir(&self, dfid: u32, name: &[u8], mode: u32) -> Reply {
        let cname = plain_name(name)?;
        let fids = self.fids.lock().unwrap();
        let d = fids.get(&dfid).ok_or(RequestError::BadFid)?;
        // SAFETY: mkdirat with a valid directory fd and a NUL-terminated name.
        check(unsafe { libc::mkdirat(d.node.as_raw_fd(), cname.as_ptr(), perm(mode, true)) })?;
        let node = open_at(&d.node, name)?;
        chmod_node(&node, mode)?;
        qid_reply(&node)
    }

    pub(super) fn unlinkat(&self, dfid: u32, name: &[u8], flags: u32) -> Reply {
        let cname = plain_name(name)?;
        let fids = self.fids.lock().unwrap();
        let d = fids.get(&dfid).ok_or(RequestError::BadFid)?;
        let at = if flags & P9_AT_REMOVEDIR != 0 {
            libc::AT_REMOVEDIR
        } else {
            0
        };
        // SAFETY: unlinkat with a valid directory fd and a NUL-terminated name.
        check(unsafe { libc::unlinkat(d.node.as_raw_fd(), cname.as_ptr(), at) })?;
        Ok(Out::message())
    }

    pub(super) fn renameat(&self, odfid: u32, oname: &[u8], ndfid: u32, nname: &[u8]) -> Reply {
        let (ocname, ncname) = (plain_name(oname)?, plain_name(nname)?);
        let mut fids = self.fids.lock().unwrap();
        let od = fids.get(&odfid).ok_or(RequestError::BadFid)?;
        let nd = fids.get(&ndfid).ok_or(RequestError::BadFid)?;
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
        from.push(oname.to_vec());
        let mut to = nd.path.clone();
        to.push(nname.to_vec());
        renamed(&mut fids, &from, &to);
        Ok(Out::message())
    }

    /// Trename: the node `fid` holds moves into the directory `dfid` holds, as `name`.
    pub(super) fn rename(&self, fid: u32, dfid: u32, name: &[u8]) -> Reply {
        let cname = plain_name(name)?;
        let mut fids = self.fids.lock().unwrap();
        let f = fids.get(&fid).ok_or(RequestError::BadFid)?;
        let d = fids.get(&dfid).ok_or(RequestError::BadFid)?;
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
        to.push(name.to_vec());
        renamed(&mut fids, &from, &to);
        Ok(Out::message())
    }

    /// Tremove: remove the node `fid` holds; the fid is clunked whatever happens.
    pub(super) fn remove(&self, fid: u32) -> Reply {
        let mut fids = self.fids.lock().unwrap();
        let f = fids.remove(&fid).ok_or(RequestError::BadFid)?;
        drop(fids);
        let (parent, last) = self.parent_of(&f)?;
        let at = if is(&stat(&f.node)?, libc::S_IFDIR) {
            libc::AT_REMOVEDIR
        } else {
            0
        };
        // SAFETY: unlinkat with a valid directory fd and a NUL-terminated name.
        check(unsafe { libc::unlinkat(parent.as_raw_fd(), last.as_ptr(), at) })?;
        Ok(Out::message())
    }

    pub(super) fn setattr(&self, fid: u32, attr: &SetAttr) -> Reply {
        let SetAttr {
            valid,
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        } = *attr;
        let fids = self.fids.lock().unwrap();
        let f = fids.get(&fid).ok_or(RequestError::BadFid)?;
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
                return Err(RequestError::Os(libc::EISDIR));
            }
            if !is(&st, libc::S_IFREG) {
                return Err(RequestError::Os(libc::EINVAL));
            }
            let size = i64::try_from(size).map_err(|_| RequestError::Os(libc::EINVAL))?;
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
        Ok(Out::message())
    }

    pub(super) fn fsync(&self, fid: u32, datasync: bool) -> Reply {
        let fids = self.fids.lock().unwrap();
        let f = fids.get(&fid).ok_or(RequestError::BadFid)?;
        let res = match &f.open {
            Some(Open::File { file, .. }) if datasync => file.sync_data(),
            Some(Open::File { file, .. }) => file.sync_all(),
            _ => {
                let st = stat(&f.node)?;
                if !is(&st, libc::S_IFREG) && !is(&st, libc::S_IFDIR) {
                    return Ok(Out::message());
                }
                reopen(&f.node, libc::O_RDONLY)?.sync_all()
            }
        };
        res?;
        Ok(Out::message())
    }

    /// Tsymlink: the target is stored as the guest gave it and never resolved here.
    pub(super) fn symlink(&self, dfid: u32, name: &[u8], target: &[u8]) -> Reply {
        let cname = plain_name(name)?;
        if target.is_empty() {
            return Err(RequestError::Os(libc::ENOENT));
        }
        let ctarget = CString::new(target).map_err(|_| RequestError::Os(libc::EINVAL))?;
        let fids = self.fids.lock().unwrap();
        let d = fids.get(&dfid).ok_or(RequestError::BadFid)?;
        // SAFETY: symlinkat with NUL-terminated strings and a valid directory fd.
        check(unsafe { libc::symlinkat(ctarget.as_ptr(), d.node.as_raw_fd(), cname.as_ptr()) })?;
        let node = open_at(&d.node, name)?;
        qid_reply(&node)
    }

    /// Tlink: a new name in `dfid` for the node `fid` holds. Linked through the
    /// /proc/self/fd magic link (as virtiofsd does): it resolves to the node itself (a
    /// symlink node is linked as the symlink, never as its target).
    pub(super) fn link(&self, dfid: u32, fid: u32, name: &[u8]) -> Reply {
        let cname = plain_name(name)?;
        let fids = self.fids.lock().unwrap();
        let d = fids.get(&dfid).ok_or(RequestError::BadFid)?;
        let f = fids.get(&fid).ok_or(RequestError::BadFid)?;
        if is(&stat(&f.node)?, libc::S_IFDIR) {
            return Err(RequestError::Os(libc::EPERM));
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
        Ok(Out::message())
    }

    /// Tmknod: regular files and FIFOs only; anything else is EPERM.
    pub(super) fn mknod(&self, dfid: u32, name: &[u8], mode: u32) -> Reply {
        let cname = plain_name(name)?;
        let kind = match mode & libc::S_IFMT {
            0 | libc::S_IFREG => libc::S_IFREG,
            libc::S_IFIFO => libc::S_IFIFO,
            _ => return Err(RequestError::Os(libc::EPERM)),
        };
        let fids = self.fids.lock().unwrap();
        let d = fids.get(&dfid).ok_or(RequestError::BadFid)?;
        // SAFETY: mknodat with a valid directory fd and a NUL-terminated name.
        check(unsafe {
            libc::mknodat(
                d.node.as_raw_fd(),
                cname.as_ptr(),
                kind | perm(mode, false),
                0,
            )
        })?;
        let node = open_at(&d.node, name)?;
        chmod_node(&node, mode)?;
        qid_reply(&node)
    }

    /// Tlock: always granted (see the module's decisions).
    pub(super) fn lock(&self, fid: u32) -> Reply {
        if !self.fids.lock().unwrap().contains_key(&fid) {
            return Err(RequestError::BadFid);
        }
        let mut o = Out::message();
        o.u8(LOCK_SUCCESS);
        Ok(o)
    }

    /// Tgetlock: always "unlocked" (see the module's decisions).
    pub(super) fn getlock(
        &self,
        fid: u32,
        start: u64,
        length: u64,
        proc_id: u32,
        client: &[u8],
    ) -> Reply {
        if !self.fids.lock().unwrap().contains_key(&fid) {
            return Err(RequestError::BadFid);
        }
        let mut o = Out::message();
        o.u8(LOCK_TYPE_UNLCK)
            .u64(start)
            .u64(length)
            .u32(proc_id)
            .str(client);
        Ok(o)
    }
}
