//! The requests every share serves: the session's (Tversion, Tattach, Twalk, Tclunk) and
//! the ones that read (Tlopen, Tread, Treaddir, Tgetattr, Treadlink, Tstatfs). Each
//! handler returns its reply's fields; [`super::dispatch`] adds the header.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering::Relaxed;

use super::error::RequestError;
use super::host::{check, dup, open_at, qid_of, read_dir, reopen, stat};
use super::wire::{open_flags, Out, NOFID, QTDIR, QTSYMLINK};
use super::{Fid, NinepServer, Open, MAX_MSIZE, VERSION};

type Reply = Result<Out, RequestError>;

/// Room for data in a reply of `msize`: `size[4] type[1] tag[2] count[4]` before it.
fn room(msize: u32) -> u32 {
    msize.saturating_sub(11)
}

impl NinepServer {
    /// Tversion: a new session (every fid goes), with the msize clamped to what this
    /// server handles.
    pub(super) fn version(&self, msize: u32, version: &[u8]) -> Reply {
        let msize = msize.clamp(4096, MAX_MSIZE);
        *self.msize.lock().unwrap() = msize;
        self.fids.lock().unwrap().clear();
        let mut o = Out::message();
        o.u32(msize);
        if version.starts_with(VERSION.as_bytes()) {
            o.str(VERSION.as_bytes());
        } else {
            o.str(b"unknown");
        }
        Ok(o)
    }

    /// Tattach: `fid` becomes the share's root (no authentication, one tree).
    pub(super) fn attach(&self, fid: u32) -> Reply {
        let node = dup(&self.root)?;
        let st = stat(&node)?;
        let mut fids = self.fids.lock().unwrap();
        if fids.contains_key(&fid) {
            return Err(RequestError::BadFid);
        }
        fids.insert(
            fid,
            Fid {
                node,
                path: Vec::new(),
                open: None,
            },
        );
        let mut o = Out::message();
        o.qid(qid_of(&st));
        Ok(o)
    }

    /// Twalk: one `O_NOFOLLOW` lookup per name, `..` walked down again from the root. A
    /// partial walk answers the qids it got and does not create `newfid`.
    pub(super) fn walk(&self, fid: u32, newfid: u32, names: &[&[u8]]) -> Reply {
        let mut fids = self.fids.lock().unwrap();
        let start = fids.get(&fid).ok_or(RequestError::BadFid)?;
        if newfid != fid && newfid != NOFID && fids.contains_key(&newfid) {
            return Err(RequestError::BadFid);
        }
        let mut node = dup(&start.node)?;
        let mut path = start.path.clone();
        let mut qids = Vec::new();
        for name in names {
            if name.is_empty() || name.contains(&b'/') || *name == b"." {
                if qids.is_empty() {
                    return Err(RequestError::Os(libc::ENOENT));
                }
                break;
            }
            let next = if *name == b".." {
                // Never above the root: walk down again from it, one level less.
                path.pop();
                self.walk_path(&path)?
            } else {
                match open_at(&node, name) {
                    Ok(fd) => {
                        path.push(name.to_vec());
                        fd
                    }
                    Err(e) if qids.is_empty() => return Err(e),
                    Err(_) => break,
                }
            };
            qids.push(qid_of(&stat(&next)?));
            node = next;
        }
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
        let mut o = Out::message();
        o.u16(qids.len() as u16);
        for q in qids {
            o.qid(q);
        }
        Ok(o)
    }

    /// Tlopen: a directory is read whole at open; a regular file is reopened for I/O. On a
    /// read-only share only reading gets here ([`super::request::Request::is_mutation`]).
    pub(super) fn lopen(&self, fid: u32, flags: u32) -> Reply {
        let (host_flags, writes) = if self.read_only {
            (libc::O_RDONLY, false)
        } else {
            open_flags(flags)
        };
        let mut fids = self.fids.lock().unwrap();
        let f = fids.get_mut(&fid).ok_or(RequestError::BadFid)?;
        let st = stat(&f.node)?;
        // Only directories and regular files are reopened for I/O; the type of an
        // O_PATH descriptor's inode never changes, and opening /proc/self/fd/N of a
        // symlink would fail with ELOOP anyway: no link is ever followed here.
        let open = match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR if host_flags & (libc::O_WRONLY | libc::O_RDWR | libc::O_TRUNC) != 0 => {
                return Err(RequestError::Os(libc::EISDIR))
            }
            libc::S_IFDIR => Open::Dir(read_dir(&f.node)?),
            libc::S_IFREG => Open::File {
                file: reopen(&f.node, host_flags)?,
                write: writes,
            },
            libc::S_IFLNK => return Err(RequestError::Os(libc::ELOOP)),
            _ => return Err(RequestError::Os(libc::EACCES)),
        };
        // A truncating open changed the file: a mutation (counted here, as Tlopen is not
        // a mutating type), and its qid is taken again.
        let st = if host_flags & libc::O_TRUNC != 0 {
            self.mutations.fetch_add(1, Relaxed);
            stat(&f.node)?
        } else {
            st
        };
        f.open = Some(open);
        let mut o = Out::message();
        o.qid(qid_of(&st)).u32(0);
        Ok(o)
    }

    pub(super) fn read(&self, fid: u32, offset: u64, count: u32) -> Reply {
        let count = count.min(room(self.msize())) as usize;
        let fids = self.fids.lock().unwrap();
        let f = fids.get(&fid).ok_or(RequestError::BadFid)?;
        let Some(Open::File { file, .. }) = &f.open else {
            return Err(RequestError::BadFid);
        };
        let mut buf = vec![0u8; count];
        let n = file.read_at(&mut buf, offset)?;
        let mut o = Out::message();
        o.u32(n as u32).bytes(&buf[..n]);
        Ok(o)
    }

    /// Treaddir: the entries read at open, from the one after `offset` (an entry's offset
    /// is its index plus one), as many whole ones as fit `count`.
    pub(super) fn readdir(&self, fid: u32, offset: u64, count: u32) -> Reply {
        let room = count.min(room(self.msize())) as usize;
        let fids = self.fids.lock().unwrap();
        let f = fids.get(&fid).ok_or(RequestError::BadFid)?;
        let Some(Open::Dir(entries)) = &f.open else {
            return Err(RequestError::BadFid);
        };
        let mut data = Out::default();
        for (i, (name, dtype, ino)) in entries.iter().enumerate().skip(offset as usize) {
            let entry_len = 13 + 8 + 1 + 2 + name.len();
            if data.as_bytes().len() + entry_len > room {
                break;
            }
            let qtype = match *dtype {
                libc::DT_DIR => QTDIR,
                libc::DT_LNK => QTSYMLINK,
                _ => 0,
            };
            data.qid((qtype, 0, *ino))
                .u64(i as u64 + 1)
                .u8(*dtype)
                .str(name);
        }
        let mut o = Out::message();
        o.u32(data.as_bytes().len() as u32).bytes(data.as_bytes());
        Ok(o)
    }

    /// Tgetattr: every attribute, whatever the request's mask.
    pub(super) fn getattr(&self, fid: u32) -> Reply {
        let fids = self.fids.lock().unwrap();
        let f = fids.get(&fid).ok_or(RequestError::BadFid)?;
        let st = stat(&f.node)?;
        let mut o = Out::message();
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

    pub(super) fn readlink(&self, fid: u32) -> Reply {
        let fids = self.fids.lock().unwrap();
        let f = fids.get(&fid).ok_or(RequestError::BadFid)?;
        let mut buf = vec![0u8; 4096];
        // SAFETY: readlinkat on an O_PATH symlink fd with an empty path reads that link;
        // the buffer is ours.
        let n = unsafe {
            libc::readlinkat(
                f.node.as_raw_fd(),
                c"".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(RequestError::last_os());
        }
        let mut o = Out::message();
        o.str(&buf[..n as usize]);
        Ok(o)
    }

    pub(super) fn statfs(&self, fid: u32) -> Reply {
        let fids = self.fids.lock().unwrap();
        let f = fids.get(&fid).ok_or(RequestError::BadFid)?;
        // SAFETY: fstatfs on our descriptor into a zeroed buffer.
        let mut s: libc::statfs = unsafe { std::mem::zeroed() };
        check(unsafe { libc::fstatfs(f.node.as_raw_fd(), &mut s) })?;
        let mut o = Out::message();
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

    pub(super) fn clunk(&self, fid: u32) -> Reply {
        let removed = self.fids.lock().unwrap().remove(&fid);
        removed.ok_or(RequestError::BadFid)?;
        Ok(Out::message())
    }
}
