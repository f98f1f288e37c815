//! A virtio shared memory region (virtio 1.2, 2.10): memory the device maps into the
//! guest's physical address space, found by the driver through the transport (on
//! virtio-mmio, the SHMSel, SHMLen and SHMBase registers).
//!
//! virtio-fs uses region 0 as its DAX window: the guest asks (FUSE_SETUPMAPPING) for a
//! range of a file to appear at an offset in the window, and from then on reads it with
//! plain loads, no request at all, straight from the host's page cache. Here the window
//! is a host mapping that KVM maps into the guest (a memory slot of its own). At first it
//! is anonymous memory (reads as zeros); a file range is mapped over part of it with
//! `mmap(MAP_FIXED)`, which KVM sees through its MMU notifier, and removed by mapping
//! anonymous memory back. File ranges are mapped **privately** (read-only shares only): a
//! guest write to a page copies it, and never reaches the host file.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use fuse_backend_rs::abi::virtio_fs::{RemovemappingOne, SetupmappingFlags};
use fuse_backend_rs::transport::FsCacheReqHandler;

const PAGE: u64 = 4096;

pub struct ShmRegion {
    host: *mut libc::c_void,
    len: u64,
}

// SAFETY: the mapping is owned by this value and only ever replaced with mmap(MAP_FIXED)
// within its bounds; nothing in this process reads or writes it through the pointer.
unsafe impl Send for ShmRegion {}
// SAFETY: as above; concurrent mmap calls on disjoint or overlapping ranges are the
// kernel's to order.
unsafe impl Sync for ShmRegion {}

impl ShmRegion {
    /// `len` bytes (a multiple of 2 MiB, the granule a Linux guest maps in), reading as
    /// zeros. Costs no memory until the guest touches it.
    pub fn new(len: u64) -> io::Result<ShmRegion> {
        if len == 0 || !len.is_multiple_of(2 << 20) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a shared memory region is a non-zero multiple of 2 MiB, not {len} bytes"),
            ));
        }
        // SAFETY: a fresh anonymous mapping at an address the kernel picks.
        let host = unsafe { libc::mmap(std::ptr::null_mut(), len as usize, PROT, ANON, -1, 0) };
        if host == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(ShmRegion { host, len })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The host address KVM maps the region's guest-physical range to.
    pub fn host_address(&self) -> u64 {
        self.host as u64
    }

    /// Maps `len` bytes of `fd` from `file_offset` at `offset` into the region, privately.
    /// Offsets and length must be page-aligned and inside the region; a write mapping is
    /// refused (only read-only shares have windows).
    pub fn map_file(
        &self,
        offset: u64,
        len: u64,
        fd: RawFd,
        file_offset: u64,
        writable: bool,
    ) -> io::Result<()> {
        if writable {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.check_range(offset, len)?;
        if !file_offset.is_multiple_of(PAGE) || i64::try_from(file_offset).is_err() {
            return Err(invalid("file offset is not page-aligned"));
        }
        // SAFETY: the range was checked to lie inside our own mapping, which MAP_FIXED
        // replaces; nothing in this process holds references into it.
        let mapped = unsafe {
            libc::mmap(
                self.at(offset),
                len as usize,
                PROT,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                fd,
                file_offset as libc::off_t,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Puts zeros (anonymous memory) back over `len` bytes at `offset`; `len` of all ones
    /// at offset 0 means the whole region, as FUSE_REMOVEMAPPING may say.
    pub fn unmap(&self, offset: u64, len: u64) -> io::Result<()> {
        let (offset, len) = if offset == 0 && len == u64::MAX {
            (0, self.len)
        } else {
            (offset, len)
        };
        self.check_range(offset, len)?;
        // SAFETY: as in map_file.
        let mapped = unsafe {
            libc::mmap(
                self.at(offset),
                len as usize,
                PROT,
                ANON | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 || !offset.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
            return Err(invalid("range is empty or not page-aligned"));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(invalid("range runs past the end of the window")),
        }
    }

    fn at(&self, offset: u64) -> *mut libc::c_void {
        // In bounds: checked by the callers.
        self.host.wrapping_byte_add(offset as usize)
    }
}

impl Drop for ShmRegion {
    fn drop(&mut self) {
        // SAFETY: our own mapping, whole.
        unsafe { libc::munmap(self.host, self.len as usize) };
    }
}

const PROT: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;
const ANON: libc::c_int = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

fn invalid(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, why.to_owned())
}

/// A region as the FUSE server's FUSE_SETUPMAPPING and FUSE_REMOVEMAPPING see it.
pub struct DaxMapper(pub Arc<ShmRegion>);

impl FsCacheReqHandler for DaxMapper {
    fn map(
        &mut self,
        foffset: u64,
        moffset: u64,
        len: u64,
        flags: u64,
        fd: RawFd,
    ) -> io::Result<()> {
        let writable = flags & SetupmappingFlags::WRITE.bits() != 0;
        self.0.map_file(moffset, len, fd, foffset, writable)
    }

    fn unmap(&mut self, requests: Vec<RemovemappingOne>) -> io::Result<()> {
        requests
            .iter()
            .try_for_each(|r| self.0.unmap(r.moffset, r.len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    fn read(region: &ShmRegion, offset: u64, len: usize) -> Vec<u8> {
        // SAFETY: test-only reads inside the region, nobody maps it meanwhile.
        unsafe { std::slice::from_raw_parts(region.at(offset).cast::<u8>(), len).to_vec() }
    }

    #[test]
    fn a_file_range_appears_in_the_window_and_goes_away_again() {
        let region = ShmRegion::new(2 << 20).unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[0u8; 4096]).unwrap();
        file.write_all(b"second page").unwrap();
        region
            .map_file(8192, 4096, file.as_raw_fd(), 4096, false)
            .unwrap();
        assert_eq!(&read(&region, 8192, 11), b"second page");
        assert_eq!(read(&region, 4096, 4), vec![0; 4]);
        region.unmap(8192, 4096).unwrap();
        assert_eq!(read(&region, 8192, 4), vec![0; 4]);
    }

    #[test]
    fn bad_ranges_and_write_mappings_are_refused() {
        let region = ShmRegion::new(2 << 20).unwrap();
        let file = tempfile::tempfile().unwrap();
        let fd = file.as_raw_fd();
        let len = region.len();
        for (offset, n, foff) in [
            (0, 0, 0),
            (1, 4096, 0),
            (0, 100, 0),
            (len, 4096, 0),
            (len - 4096, 8192, 0),
            (u64::MAX - 4095, 4096, 0),
            (0, 4096, 3),
            (0, 4096, u64::MAX - 4095),
        ] {
            assert!(
                region.map_file(offset, n, fd, foff, false).is_err(),
                "{offset} {n} {foff}"
            );
        }
        assert_eq!(
            region
                .map_file(0, 4096, fd, 0, true)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EROFS)
        );
        assert!(region.unmap(len, 4096).is_err());
        region.unmap(0, u64::MAX).unwrap();
        assert!(ShmRegion::new(4096).is_err());
    }
}
