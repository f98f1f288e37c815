//! The share policy: what a guest may do to a share, enforced in front of the passthrough
//! engine.
//!
//! The passthrough engine (fuse-backend-rs's `PassthroughFs`, the crosvm/virtiofsd lineage)
//! already resolves every name relative to an O_PATH fd with O_NOFOLLOW and rejects names
//! with `/`, `.` or `..`, so no request can walk out of the share. What it does not know is
//! that the store is immutable: this layer answers every mutating request on a read-only
//! share with `EROFS` before the engine sees it, and counts what it served.

use std::ffi::CStr;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::abi::virtio_fs::{RemovemappingOne, SetupmappingFlags};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, FsOptions, GetxattrReply, IoctlData,
    ListxattrReply, OpenOptions, SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::PassthroughFs;
use fuse_backend_rs::transport::FsCacheReqHandler;

use super::read_handles::ReadHandles;
use crate::stats::ShareStats;

type Inode = u64;
type Handle = u64;

fn erofs() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

/// The most an xattr value (XATTR_SIZE_MAX) or a list of names (XATTR_LIST_MAX) can hold
/// on Linux. The engine allocates the buffer size the guest asks for: a GETXATTR of
/// 3 GiB made the host allocate 3 GiB (found by the virtio_fs fuzz target). No answer
/// needs more, so a larger size is served as this one.
const XATTR_MAX_BYTES: u32 = 64 << 10;

/// A request that opens a file for writing or truncation mutates the share.
fn open_flags_mutate(flags: u32) -> bool {
    let flags = flags as i32;
    (flags & libc::O_ACCMODE) != libc::O_RDONLY || (flags & libc::O_TRUNC) != 0
}

/// One share's file system as the FUSE server sees it.
pub struct ShareFs {
    engine: PassthroughFs<()>,
    read_only: bool,
    keep_cache: bool,
    stats: std::sync::Arc<ShareStats>,
    /// The share directory, open, when the engine reaches it through /proc/self/fd.
    _root_fd: Option<std::fs::File>,
    /// An immutable share's open files for READ (the guest opens none: see
    /// [`ReadHandles`]); `None` where the guest opens files itself.
    read_handles: Option<ReadHandles>,
    /// The guest said at INIT that it can do without OPEN (`ZERO_MESSAGE_OPEN`); only
    /// then are `read_handles` used (another front-end opens files as usual).
    guest_opens_nothing: AtomicBool,
    /// Offer per-file DAX (the device has a DAX window; see `ShareConfig::dax_file_size`).
    per_file_dax: bool,
    /// The guest took the writeback cache at INIT (see `ShareConfig::writeback`).
    written_back: AtomicBool,
}

impl ShareFs {
    pub(crate) fn new(
        engine: PassthroughFs<()>,
        read_only: bool,
        keep_cache: bool,
        stats: std::sync::Arc<ShareStats>,
    ) -> Self {
        ShareFs {
            engine,
            read_only,
            keep_cache,
            stats,
            _root_fd: None,
            read_handles: None,
            guest_opens_nothing: AtomicBool::new(false),
            per_file_dax: false,
            written_back: AtomicBool::new(false),
        }
    }

    /// Offers per-file DAX at INIT, where the device has a DAX window.
    pub(crate) fn with_per_file_dax(mut self, on: bool) -> Self {
        self.per_file_dax = on;
        self
    }

    /// The guest opens no file on this share (it cannot change): OPEN and RELEASE are
    /// answered ENOSYS, which the guest kernel takes as "never send them again", and
    /// READs are served from handles kept per inode. The engine must be one that opens
    /// files (no `no_open`).
    pub(crate) fn without_guest_opens(mut self) -> Self {
        self.read_handles = Some(ReadHandles::default());
        self
    }

    /// Files held open for READs without a guest handle (for tests and statistics).
    pub fn read_handles_open(&self) -> usize {
        self.read_handles.as_ref().map_or(0, ReadHandles::len)
    }

    /// The kept handles, where the guest opens nothing on this share.
    fn no_guest_opens(&self) -> Option<&ReadHandles> {
        self.read_handles
            .as_ref()
            .filter(|_| self.guest_opens_nothing.load(Ordering::Relaxed))
    }

    /// The handle a request without one (handle 0 from a guest that opens nothing) is
    /// served with; any other handle is the engine's to check.
    fn read_handle(&self, inode: Inode, handle: Handle) -> io::Result<Handle> {
        match self.no_guest_opens() {
            Some(cache) if handle == 0 => cache.get(&self.engine, inode),
            _ => Ok(handle),
        }
    }

    /// Keeps `fd` (the share directory the engine reaches through /proc/self/fd) open for
    /// as long as the file system.
    pub(crate) fn with_root_fd(mut self, fd: Option<std::fs::File>) -> Self {
        self._root_fd = fd;
        self
    }

    pub(crate) fn read_only(&self) -> bool {
        self.read_only
    }

    /// Fails with `EROFS` (and counts it) when the share is read-only.
    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            self.stats.count_erofs();
            Err(erofs())
        } else {
            Ok(())
        }
    }

    /// On an immutable share the guest's page cache never goes stale, so tell it to keep
    /// cached pages across opens instead of dropping them at every open.
    fn with_keep_cache(&self, mut opts: OpenOptions) -> OpenOptions {
        if self.keep_cache {
            opts |= OpenOptions::KEEP_CACHE;
        }
        opts
    }
}

impl FileSystem for ShareFs {
    type Inode = Inode;
    type Handle = Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let mut opts = self.engine.init(capable)?;
        if self.read_handles.is_some() && capable.contains(FsOptions::ZERO_MESSAGE_OPEN) {
            opts |= FsOptions::ZERO_MESSAGE_OPEN;
            self.guest_opens_nothing.store(true, Ordering::Relaxed);
        }
        // The FUSE server only enables what the file system asks for, and the passthrough
        // engine asks for little: without BIG_WRITES/MAX_PAGES the guest would split I/O
        // into 8 KiB requests. These are what a Linux guest and a passthrough share both
        // handle (virtiofsd asks for the same).
        opts |= FsOptions::ASYNC_READ
            | FsOptions::BIG_WRITES
            | FsOptions::MAX_PAGES
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::ASYNC_DIO
            | FsOptions::AUTO_INVAL_DATA
            | FsOptions::EXPORT_SUPPORT;
        // Per-file DAX only where the device has a window to map files into (the
        // embedded VMM's, `run --dax`); QEMU's vhost-user-fs has none.
        if !self.per_file_dax {
            opts.remove(FsOptions::PERFILE_DAX);
        } else if capable.contains(FsOptions::INIT_EXT) {
            // PERFILE_DAX (FUSE_HAS_INODE_DAX) is a bit of the second flags word, which
            // the kernel reads only when the reply says it is there (INIT_EXT); the FUSE
            // layer does not add that itself.
            opts |= FsOptions::INIT_EXT;
        }
        if !self.read_only {
            // open(O_TRUNC) arrives as one OPEN with O_TRUNC instead of OPEN + SETATTR.
            opts |= FsOptions::ATOMIC_O_TRUNC;
        }
        if self.read_only {
            // Nothing on the share changes, so symlink targets may be cached too.
            if capable.contains(FsOptions::CACHE_SYMLINKS) {
                opts |= FsOptions::CACHE_SYMLINKS;
            }
            // Writeback caching would let the guest buffer writes that can only fail later.
            opts.remove(FsOptions::WRITEBACK_CACHE);
        }
        self.written_back
            .store(opts.contains(FsOptions::WRITEBACK_CACHE), Ordering::Relaxed);
        Ok(opts)
    }

    fn destroy(&self) {
        self.engine.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<Entry> {
        self.engine.lookup(ctx, parent, name)
    }

    fn forget(&self, ctx: &Context, inode: Inode, count: u64) {
        if let Some(cache) = self.no_guest_opens() {
            cache.forget(&self.engine, inode);
        }
        self.engine.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Inode, u64)>) {
        if let Some(cache) = self.no_guest_opens() {
            for (inode, _) in &requests {
                cache.forget(&self.engine, *inode);
            }
        }
        self.engine.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Option<Handle>,
    ) -> io::Result<(stat64, Duration)> {
        // A guest that opens nothing sends handle 0 with an fstat: the inode's own
        // attributes are the file's (nothing changes on such a share).
        let handle = handle.filter(|&h| !(self.no_guest_opens().is_some() && h == 0));
        self.engine.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Inode,
        attr: stat64,
        handle: Option<Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.check_writable()?;
        self.engine.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: Inode) -> io::Result<Vec<u8>> {
        self.engine.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        self.engine.symlink(ctx, linkname, parent, name)
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        // A device node is a door to the host's own device for whoever opens it on the
        // host (the engine itself refuses to open one for a guest): a guest that is root
        // in its VM and a server running as root would otherwise make, say, the host's
        // disk appear in xchg. Builds need FIFOs and sockets, never devices (9p's Tmknod
        // refuses them too).
        if matches!(mode & libc::S_IFMT, libc::S_IFCHR | libc::S_IFBLK) {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        self.engine.mknod(ctx, parent, name, mode, rdev, umask)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        self.engine.mkdir(ctx, parent, name, mode, umask)
    }

    fn unlink(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        self.engine.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        self.engine.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: Inode,
        oldname: &CStr,
        newdir: Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.check_writable()?;
        self.engine
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(
        &self,
        ctx: &Context,
        inode: Inode,
        newparent: Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        self.engine.link(ctx, inode, newparent, newname)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions, Option<u32>)> {
        if open_flags_mutate(flags) {
            self.check_writable()?;
        }
        if self.no_guest_opens().is_some() {
            return Err(io::Error::from_raw_os_error(libc::ENOSYS));
        }
        let (handle, opts, passthrough) = self.engine.open(ctx, inode, flags, fuse_flags)?;
        Ok((handle, self.with_keep_cache(opts), passthrough))
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<Handle>, OpenOptions, Option<u32>)> {
        self.check_writable()?;
        self.engine.create(ctx, parent, name, args)
    }

    fn read(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        let served = self.read_handle(inode, handle)?;
        match self
            .engine
            .read(ctx, inode, served, w, size, offset, lock_owner, flags)
        {
            // Closed by another thread between our lookup and the read (too many open):
            // open it again. Nothing was written to the guest's buffer.
            Err(e) if served != handle && e.raw_os_error() == Some(libc::EBADF) => {
                let served = self.read_handle(inode, handle)?;
                self.engine
                    .read(ctx, inode, served, w, size, offset, lock_owner, flags)
            }
            other => other,
        }
    }

    fn write(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.check_writable()?;
        self.engine.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        lock_owner: u64,
    ) -> io::Result<()> {
        // ENOSYS tells the guest kernel to stop sending FLUSH on every close. Nothing to
        // flush in a file nobody can write; and under the writeback cache the kernel
        // writes a file's dirty pages back before it would send FLUSH, so all FLUSH would
        // add is the engine's dup + close of the host descriptor (POSIX locks stay in the
        // guest here): a request per close for nothing.
        if self.read_only || self.written_back.load(Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(libc::ENOSYS));
        }
        self.engine.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: Inode, datasync: bool, handle: Handle) -> io::Result<()> {
        if self.no_guest_opens().is_some() {
            // Nothing was written to a share that cannot change.
            return Ok(());
        }
        self.engine.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.check_writable()?;
        self.engine
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        handle: Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        if self.no_guest_opens().is_some() {
            return Err(io::Error::from_raw_os_error(libc::ENOSYS));
        }
        self.engine
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: Inode) -> io::Result<statvfs64> {
        let mut st = self.engine.statfs(ctx, inode)?;
        if self.read_only {
            st.f_flag |= libc::ST_RDONLY;
        }
        Ok(st)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.check_writable()?;
        self.engine.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.engine
            .getxattr(ctx, inode, name, size.min(XATTR_MAX_BYTES))
    }

    fn listxattr(&self, ctx: &Context, inode: Inode, size: u32) -> io::Result<ListxattrReply> {
        self.engine.listxattr(ctx, inode, size.min(XATTR_MAX_BYTES))
    }

    fn removexattr(&self, ctx: &Context, inode: Inode, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        self.engine.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions)> {
        let (handle, opts) = self.engine.opendir(ctx, inode, flags)?;
        Ok((handle, self.with_keep_cache(opts)))
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.engine
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.engine
            .readdirplus(ctx, inode, handle, size, offset, add_entry)
    }

    fn fsyncdir(
        &self,
        ctx: &Context,
        inode: Inode,
        datasync: bool,
        handle: Handle,
    ) -> io::Result<()> {
        self.engine.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        handle: Handle,
    ) -> io::Result<()> {
        self.engine.releasedir(ctx, inode, flags, handle)
    }

    fn access(&self, ctx: &Context, inode: Inode, mask: u32) -> io::Result<()> {
        if self.read_only && (mask as i32 & libc::W_OK) != 0 {
            self.stats.count_erofs();
            return Err(erofs());
        }
        self.engine.access(ctx, inode, mask)
    }

    fn setupmapping(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        foffset: u64,
        len: u64,
        flags: u64,
        moffset: u64,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        if self.read_only && flags & SetupmappingFlags::WRITE.bits() != 0 {
            self.stats.count_erofs();
            return Err(erofs());
        }
        self.engine
            .setupmapping(ctx, inode, handle, foffset, len, flags, moffset, vu_req)
    }

    fn removemapping(
        &self,
        ctx: &Context,
        inode: Inode,
        requests: Vec<RemovemappingOne>,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.engine.removemapping(ctx, inode, requests, vu_req)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        let handle = self.read_handle(inode, handle)?;
        self.engine.lseek(ctx, inode, handle, offset, whence)
    }

    fn getlk(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.engine.getlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlk(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.engine.setlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlkw(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.engine.setlkw(ctx, inode, handle, owner, lock, flags)
    }

    fn ioctl(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        flags: u32,
        cmd: u32,
        data: IoctlData,
        out_size: u32,
    ) -> io::Result<IoctlData<'_>> {
        self.engine
            .ioctl(ctx, inode, handle, flags, cmd, data, out_size)
    }
}

#[cfg(test)]
mod tests {
    use super::open_flags_mutate;

    #[test]
    fn open_for_reading_does_not_mutate() {
        assert!(!open_flags_mutate(libc::O_RDONLY as u32));
        assert!(!open_flags_mutate(
            (libc::O_RDONLY | libc::O_CLOEXEC) as u32
        ));
    }

    #[test]
    fn open_for_writing_or_truncating_mutates() {
        assert!(open_flags_mutate(libc::O_WRONLY as u32));
        assert!(open_flags_mutate(libc::O_RDWR as u32));
        assert!(open_flags_mutate((libc::O_RDONLY | libc::O_TRUNC) as u32));
    }
}
