//! Guest RAM for the embedded VMM: one contiguous region at guest physical address 0.
//!
//! A fresh VM gets a memfd (shared, so an in-process device or a snapshot can read it
//! without copying through the guest). A restored VM maps the snapshot's memory file
//! **privately**: pages are read from the page cache on first touch and copied only when
//! the guest writes them, so a restore costs an mmap, and any number of VMs can restore
//! from one file at once without seeing each other's writes.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::ptr::NonNull;

pub struct GuestRam {
    ptr: NonNull<u8>,
    len: usize,
    /// The memfd or the snapshot file the mapping comes from (kept open with it).
    _backing: File,
    private: bool,
}

// SAFETY: the mapping is plain memory owned by this value and unmapped only when it is
// dropped; every accessor below bounds-checks and copies bytes (no references into guest
// memory escape, except the short-lived slice `save` reads while the vCPUs are stopped).
// The guest writing concurrently can only change guest-visible bytes.
unsafe impl Send for GuestRam {}
// SAFETY: as above.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// `len` bytes of zeroed, memfd-backed shared memory.
    pub fn new(len: usize) -> io::Result<GuestRam> {
        check_len(len)?;
        // SAFETY: memfd_create with a valid NUL-terminated name and flags.
        let fd = unsafe { libc::memfd_create(c"vmbuild-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let backing = unsafe { File::from_raw_fd(fd) };
        backing.set_len(len as u64)?;
        let ptr = map(&backing, len, libc::MAP_SHARED)?;
        Ok(GuestRam {
            ptr,
            len,
            _backing: backing,
            private: false,
        })
    }

    /// Maps `path` (a memory file written by [`GuestRam::save`]) copy-on-write.
    pub fn map_private(path: &Path, expected_len: usize) -> io::Result<GuestRam> {
        check_len(expected_len)?;
        let backing = File::open(path)?;
        let len = backing.metadata()?.len();
        if len != expected_len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} has {len} bytes of guest memory, the snapshot says {expected_len}",
                    path.display()
                ),
            ));
        }
        let ptr = map(&backing, expected_len, libc::MAP_PRIVATE)?;
        Ok(GuestRam {
            ptr,
            len: expected_len,
            _backing: backing,
            private: true,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether this RAM is a private (copy-on-write) mapping of a snapshot file.
    pub fn is_private(&self) -> bool {
        self.private
    }

    /// The host address KVM maps the guest's physical memory to.
    pub fn host_address(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    fn range(&self, gpa: u64, len: usize) -> io::Result<usize> {
        let start = usize::try_from(gpa).map_err(|_| out_of_range(gpa, len))?;
        match start.checked_add(len) {
            Some(end) if end <= self.len => Ok(start),
            _ => Err(out_of_range(gpa, len)),
        }
    }

    pub fn write(&self, gpa: u64, data: &[u8]) -> io::Result<()> {
        let start = self.range(gpa, data.len())?;
        // SAFETY: [start, start+len) is inside the mapping (checked above); the guest may
        // write concurrently, which is a data race only on guest-visible bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(start), data.len())
        };
        Ok(())
    }

    pub fn read(&self, gpa: u64, out: &mut [u8]) -> io::Result<()> {
        let start = self.range(gpa, out.len())?;
        // SAFETY: as in `write`.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(start), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    pub fn read_u32(&self, gpa: u64) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    pub fn read_u64(&self, gpa: u64) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn write_u64(&self, gpa: u64, v: u64) -> io::Result<()> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// Writes the whole of guest memory to `path`. Pages that are all zero are left as
    /// holes, so the file is as sparse as the guest's memory is untouched.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        use std::io::{Seek, SeekFrom, Write};
        const CHUNK: usize = 2 << 20;
        let mut f = File::create(path)?;
        f.set_len(self.len as u64)?;
        let mut offset = 0usize;
        while offset < self.len {
            let n = CHUNK.min(self.len - offset);
            // SAFETY: [offset, offset+n) is inside the mapping.
            let chunk = unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset), n) };
            let mut page = 0;
            while page < n {
                let p = 4096.min(n - page);
                let bytes = &chunk[page..page + p];
                if bytes.iter().any(|&b| b != 0) {
                    f.seek(SeekFrom::Start((offset + page) as u64))?;
                    f.write_all(bytes)?;
                }
                page += p;
            }
            offset += n;
        }
        f.sync_data()?;
        Ok(())
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping this value created.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

fn check_len(len: usize) -> io::Result<()> {
    if len == 0 || !len.is_multiple_of(4096) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("guest memory must be a non-zero multiple of 4 KiB, not {len} bytes"),
        ));
    }
    Ok(())
}

fn out_of_range(gpa: u64, len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("guest range {gpa:#x}+{len:#x} is outside guest memory"),
    )
}

fn map(file: &File, len: usize, flags: libc::c_int) -> io::Result<NonNull<u8>> {
    // SAFETY: mapping a file we own with a valid length; checked for MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))
}
