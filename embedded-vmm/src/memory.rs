//! Guest RAM for the embedded VMM: one contiguous region at guest physical address 0, as
//! one vm-memory `GuestMemoryMmap` that the loader, the boot structures, the devices and
//! snapshots all use. vm-memory's accessors are bounds-checked and volatile, which is what
//! memory the guest writes concurrently needs.
//!
//! A fresh VM gets anonymous memory (transparent huge pages where the host has them). A
//! restored VM maps the snapshot's memory file
//! **privately**: pages are read from the page cache on first touch and copied only when
//! the guest writes them, so a restore costs an mmap, and any number of VMs can restore
//! from one file at once without seeing each other's writes (as Firecracker restores).

use std::fs::File;
use std::io;
use std::path::Path;

use vm_memory::{
    mmap::{MmapRegion, MmapRegionBuilder},
    Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestRegionMmap,
};

pub struct GuestRam {
    memory: GuestMemoryMmap,
    len: usize,
    private: bool,
}

impl std::ops::Deref for GuestRam {
    type Target = GuestMemoryMmap;
    fn deref(&self) -> &GuestMemoryMmap {
        &self.memory
    }
}

impl GuestRam {
    /// `len` bytes of zeroed anonymous memory, backed by transparent huge pages where the
    /// host gives them. Huge pages matter most on a nested host: each 4 KiB page the guest
    /// touches first is a nested page fault, and loading the kernel alone touches 30 MB;
    /// with 2 MiB pages the kernel loads and boots ~1 s faster there (BENCHMARKS.md). The
    /// devices run in this process, so the memory needs no file to be shared through.
    pub fn new(len: usize) -> io::Result<GuestRam> {
        check_len(len)?;
        let region = MmapRegion::new(len)
            .map_err(|e| io::Error::other(format!("mapping guest memory: {e}")))?;
        advise_huge_pages(&region);
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| io::Error::other("guest memory region overflows"))?;
        let memory = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| io::Error::other(format!("guest memory: {e}")))?;
        Ok(GuestRam {
            memory,
            len,
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
        Ok(GuestRam {
            memory: map(backing, expected_len, libc::MAP_PRIVATE)?,
            len: expected_len,
            private: true,
        })
    }

    /// The guest memory, for devices and loaders: a clone shares the mapping and keeps it
    /// alive.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
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
        // The one region starts at guest address 0 (checked when it was built).
        self.memory
            .get_host_address(GuestAddress(0))
            .map(|p| p as u64)
            .unwrap_or(0)
    }

    /// Writes the whole of guest memory to `path`. Pages that are all zero are left as
    /// holes, so the file is as sparse as the guest's memory is untouched.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        use std::io::{Seek, SeekFrom, Write};
        const CHUNK: usize = 2 << 20;
        let mut f = File::create(path)?;
        f.set_len(self.len as u64)?;
        let mut chunk = vec![0u8; CHUNK];
        let mut offset = 0usize;
        while offset < self.len {
            let n = CHUNK.min(self.len - offset);
            let chunk = &mut chunk[..n];
            self.memory
                .read_slice(chunk, GuestAddress(offset as u64))
                .map_err(io::Error::other)?;
            for (i, page) in chunk.chunks(4096).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    f.seek(SeekFrom::Start((offset + i * 4096) as u64))?;
                    f.write_all(page)?;
                }
            }
            offset += n;
        }
        f.sync_data()?;
        Ok(())
    }
}

/// Asks for transparent huge pages over the whole of guest memory (hosts whose THP mode is
/// `madvise`, Debian's default, give them only when asked). Guest physical 0 and the
/// mapping must also agree modulo 2 MiB for KVM to map the guest with huge pages; large
/// mappings usually come 2 MiB aligned, and a debug line says when one does not.
fn advise_huge_pages(region: &MmapRegion) {
    const HUGE_PAGE: usize = 2 << 20;
    let (addr, len) = (region.as_ptr(), region.size());
    if !(addr as usize).is_multiple_of(HUGE_PAGE) {
        tracing::debug!(
            "guest memory at {addr:p} is not 2 MiB aligned: KVM maps it with 4 KiB pages"
        );
    }
    // SAFETY: advice over exactly the mapping `region` owns; MADV_HUGEPAGE changes how
    // the kernel backs it, never its contents. Failing (THP off) is harmless.
    let _ = unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) };
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

/// `len` bytes of `file` mapped read-write at guest address 0; `flags` says shared or
/// private. `MAP_NORESERVE`: a large guest costs only the pages it touches.
fn map(file: File, len: usize, flags: libc::c_int) -> io::Result<GuestMemoryMmap> {
    let region = MmapRegionBuilder::new(len)
        .with_file_offset(FileOffset::new(file, 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| io::Error::other(format!("mapping guest memory: {e}")))?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| io::Error::other("guest memory region overflows"))?;
    GuestMemoryMmap::from_regions(vec![region])
        .map_err(|e| io::Error::other(format!("guest memory: {e}")))
}
