//! A 9p session's state, for snapshots of the VM whose guest holds it: the negotiated
//! msize and every fid, by its path below the share's root, the identity of its node and
//! how it is open. A restore walks each path down again from the root (the same
//! `O_NOFOLLOW` walk as `..`), so it can only land inside the share; a fid whose node is
//! gone or was replaced by another file (different device or inode) is not restored and
//! is reported lost: the guest then gets EBADF for it, never another file's data. The
//! root is the exception: a fid of the share's root binds to the root of the share it
//! is restored into, which may be another directory (each restored VM its own xchg).

use std::os::fd::AsRawFd;

use super::error::RequestError;
use super::host::{read_dir, reopen, stat};
use super::{Fid, NinepServer, Open};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NinepState {
    pub msize: u32,
    pub fids: Vec<SavedFid>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedFid {
    pub fid: u32,
    pub path: Vec<Vec<u8>>,
    pub dev: u64,
    pub ino: u64,
    pub open: Option<SavedOpen>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SavedOpen {
    /// A regular file: its open flags as the host has them (access mode, append, sync;
    /// never create or truncate), and whether Twrite may use it.
    File {
        flags: i32,
        write: bool,
    },
    Dir,
}

/// What a restore could not bring back.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    pub restored: usize,
    /// Fids not restored, and why.
    pub lost: Vec<(u32, String)>,
}

/// The open flags worth keeping across a restore.
const KEPT_FLAGS: i32 = libc::O_ACCMODE | libc::O_APPEND | libc::O_DSYNC | libc::O_SYNC;

impl NinepServer {
    /// The session as it is now.
    pub fn save_state(&self) -> NinepState {
        let fids = self.fids.lock().unwrap();
        let mut saved: Vec<SavedFid> = fids
            .iter()
            .filter_map(|(id, f)| {
                let st = stat(&f.node).ok()?;
                let open = match &f.open {
                    None => None,
                    Some(Open::Dir(_)) => Some(SavedOpen::Dir),
                    Some(Open::File { file, write }) => {
                        // SAFETY: F_GETFL on a descriptor we own.
                        let fl = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
                        Some(SavedOpen::File {
                            flags: fl.max(0) & KEPT_FLAGS,
                            write: *write,
                        })
                    }
                };
                Some(SavedFid {
                    fid: *id,
                    path: f.path.clone(),
                    dev: st.st_dev,
                    ino: st.st_ino,
                    open,
                })
            })
            .collect();
        saved.sort_by_key(|f| f.fid);
        NinepState {
            msize: self.msize(),
            fids: saved,
        }
    }

    /// Takes over a saved session (this server's own fids are replaced).
    pub fn restore_state(&self, state: &NinepState) -> RestoreReport {
        let mut report = RestoreReport::default();
        let mut fids = std::collections::HashMap::new();
        for s in &state.fids {
            match self.restore_fid(s) {
                Ok(f) => {
                    fids.insert(s.fid, f);
                    report.restored += 1;
                }
                Err(why) => report.lost.push((s.fid, why)),
            }
        }
        *self.msize.lock().unwrap() = state.msize.clamp(4096, super::MAX_MSIZE);
        *self.fids.lock().unwrap() = fids;
        report
    }

    fn restore_fid(&self, s: &SavedFid) -> Result<Fid, String> {
        if s.path
            .iter()
            .any(|c| c.is_empty() || c.contains(&b'/') || c.contains(&0) || c == b"." || c == b"..")
        {
            return Err("its saved path is not a list of plain names".into());
        }
        let errno = |e: RequestError| e.to_string();
        let node = self.walk_path(&s.path).map_err(errno)?;
        let st = stat(&node).map_err(errno)?;
        // The share's root is whatever directory the restoring side shares: a VM
        // restored from one snapshot gets an xchg of its own (another directory, another
        // inode), and its mount must reach that one. Below the root, identity holds.
        if !s.path.is_empty() && (st.st_dev, st.st_ino) != (s.dev, s.ino) {
            return Err("another file is at its path now".into());
        }
        let open = match &s.open {
            None => None,
            Some(SavedOpen::Dir) => Some(Open::Dir(read_dir(&node).map_err(errno)?)),
            Some(SavedOpen::File { flags, write }) => {
                if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                    return Err("it was an open file and is not a regular file now".into());
                }
                if *write && self.read_only {
                    return Err("it was open for writing and the share is read-only".into());
                }
                // The access mode follows `write`, whatever the saved flags claim: a
                // fid that may not write is never opened for writing on the host.
                let access = match (*write, flags & libc::O_ACCMODE) {
                    (false, _) => libc::O_RDONLY,
                    (true, a @ (libc::O_WRONLY | libc::O_RDWR)) => a,
                    (true, _) => return Err("its saved access mode is not a writing one".into()),
                };
                let flags = (flags & KEPT_FLAGS & !libc::O_ACCMODE) | access;
                Some(Open::File {
                    file: reopen(&node, flags).map_err(errno)?,
                    write: *write,
                })
            }
        };
        Ok(Fid {
            node,
            path: s.path.clone(),
            open,
        })
    }
}
