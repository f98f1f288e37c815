//! Open files for the reads of an immutable share.
//!
//! The guest opens nothing on an immutable share (`ZERO_MESSAGE_OPEN`: no OPEN, FLUSH or
//! RELEASE round trips), so its READs carry no handle. Served as they come, every READ
//! would reopen the file (`openat` through `/proc/self/fd`, what fuse-backend-rs does in
//! its no-open mode): a sequential read of a 256 MiB file is 2,048 opens and closes. This
//! keeps one read-only handle per inode the guest reads, opened at its first READ and
//! closed when the guest forgets the inode, or when too many are open.
//!
//! Only sound because the share cannot change: a handle opened once reads the same bytes
//! as a fresh open would.

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;

use fuse_backend_rs::api::filesystem::{Context, FileSystem};
use fuse_backend_rs::passthrough::PassthroughFs;

type Inode = u64;
type Handle = u64;

/// How many files stay open at most. Well under the 1,024 descriptors a process may have
/// by default (the engine holds an O_PATH fd per inode the guest knows besides).
pub(crate) const MAX_OPEN: usize = 256;

#[derive(Default)]
pub(crate) struct ReadHandles {
    open: Mutex<HashMap<Inode, Handle>>,
}

impl ReadHandles {
    /// The engine's handle for reading `inode`, opened now if it has none.
    pub(crate) fn get(&self, engine: &PassthroughFs<()>, inode: Inode) -> io::Result<Handle> {
        if let Some(&handle) = self.lock().get(&inode) {
            return Ok(handle);
        }
        // O_NONBLOCK: a FIFO in the share must not hang this thread in open(2); the READ
        // sets the flags the guest asked for on the handle before reading.
        let flags = (libc::O_RDONLY | libc::O_NONBLOCK) as u32;
        let (handle, _, _) = engine.open(&Context::new(), inode, flags, 0)?;
        let handle = handle.ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?;
        let mut open = self.lock();
        if let Some(&theirs) = open.get(&inode) {
            // Another thread opened it meanwhile: keep one.
            drop(open);
            release(engine, inode, handle);
            return Ok(theirs);
        }
        if open.len() >= MAX_OPEN {
            // Any one: a file read again is simply reopened.
            if let Some((&old, &old_handle)) = open.iter().next() {
                open.remove(&old);
                release(engine, old, old_handle);
            }
        }
        open.insert(inode, handle);
        Ok(handle)
    }

    /// Closes `inode`'s handle, if it has one (the guest forgot the inode).
    pub(crate) fn forget(&self, engine: &PassthroughFs<()>, inode: Inode) {
        let handle = self.lock().remove(&inode);
        if let Some(handle) = handle {
            release(engine, inode, handle);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Inode, Handle>> {
        // A panic elsewhere while holding it leaves a map that is still consistent.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn release(engine: &PassthroughFs<()>, inode: Inode, handle: Handle) {
    let _ = engine.release(&Context::new(), inode, 0, handle, false, false, None);
}
