//! Guest memory for the harnesses: vm-memory regions inside mappings fenced by
//! inaccessible guard pages, so that an access a device makes past a region's end is a
//! SIGSEGV (a crash libFuzzer reports) instead of silently touching the process's own
//! memory. The mappings are made once per process and zeroed for every input.

use std::sync::Mutex;

use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

const PAGE: usize = 4096;
/// Guard pages on each side of every region.
const GUARD: usize = 16 * PAGE;

struct Raw {
    addr: usize,
    len: usize,
}

type Key = (std::thread::ThreadId, u64, usize);

/// One guarded mapping per (thread, base, len), kept for the life of the process
/// (devices may keep a clone of the memory a little longer than the input that made it;
/// harnesses on other threads, as replay tests run, have mappings of their own).
static MAPPINGS: Mutex<Vec<(Key, Raw)>> = Mutex::new(Vec::new());

fn guarded(base: u64, len: usize) -> *mut u8 {
    let key = (std::thread::current().id(), base, len);
    let mut maps = MAPPINGS.lock().unwrap();
    if let Some((_, raw)) = maps.iter().find(|(k, _)| *k == key) {
        // SAFETY: the mapping is ours, readable and writable, `len` bytes long.
        unsafe { std::ptr::write_bytes(raw.addr as *mut u8, 0, raw.len) };
        return raw.addr as *mut u8;
    }
    let total = GUARD + len + GUARD;
    // SAFETY: a fresh anonymous mapping; the middle is then made accessible.
    let p = unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mapping guest memory");
        let mid = (p as *mut u8).add(GUARD);
        assert_eq!(
            libc::mprotect(mid.cast(), len, libc::PROT_READ | libc::PROT_WRITE),
            0
        );
        mid
    };
    maps.push((
        key,
        Raw {
            addr: p as usize,
            len,
        },
    ));
    p
}

/// Guest memory made of `regions` (guest address, length; lengths in whole pages), each
/// fenced by guard pages, all bytes zero.
pub fn guest_memory(regions: &[(u64, usize)]) -> GuestMemoryMmap {
    let regions = regions
        .iter()
        .map(|&(base, len)| {
            assert_eq!(len % PAGE, 0);
            let p = guarded(base, len);
            // SAFETY: `p` is `len` accessible bytes inside a mapping this module keeps
            // for the life of the process.
            let region = unsafe {
                MmapRegion::build_raw(
                    p,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                )
            }
            .expect("a guest memory region");
            GuestRegionMmap::new(region, GuestAddress(base)).expect("a guest region")
        })
        .collect();
    GuestMemoryMmap::from_regions(regions).expect("guest memory")
}

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

/// Writes descriptor `i` of the table at `table`.
pub fn write_desc(
    mem: &GuestMemoryMmap,
    table: u64,
    i: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    let _ = mem.write_slice(&d, GuestAddress(table.wrapping_add(16 * u64::from(i))));
}

/// A copy of every region's bytes, to compare memory before and after a device ran.
pub fn snapshot(mem: &GuestMemoryMmap) -> Vec<(u64, Vec<u8>)> {
    use vm_memory::{GuestMemory, GuestMemoryRegion};
    mem.iter()
        .map(|r| {
            let mut v = vec![0u8; r.len() as usize];
            let _ = mem.read_slice(&mut v, r.start_addr());
            (r.start_addr().0, v)
        })
        .collect()
}
