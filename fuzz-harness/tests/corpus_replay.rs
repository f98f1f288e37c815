//! Replays every file of `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` through
//! the harness its fuzz target runs, with the same invariant checks, on stable and
//! without fuzzing time: what the fuzzers found once stays found. One test per target.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};

/// Any single allocation over this is a finding, as libFuzzer's `-malloc_limit_mb` makes
/// it under `scripts/fuzz.sh` (an allocation the guest sized, such as a 3 GiB xattr
/// buffer, succeeds lazily on Linux and would pass unnoticed otherwise).
const MALLOC_LIMIT: usize = 512 << 20;

struct Limited;

// SAFETY: forwards to the system allocator; only refuses (aborts on) oversized requests.
unsafe impl GlobalAlloc for Limited {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

fn check(size: usize) {
    if size > MALLOC_LIMIT {
        // No allocation (and no panic, which allocates) from inside the allocator.
        let msg = b"corpus replay: an allocation over the 512 MiB malloc limit\n";
        // SAFETY: write(2) of a static buffer to stderr.
        unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
        std::process::abort();
    }
}

#[global_allocator]
static ALLOCATOR: Limited = Limited;

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_file()) {
                files.push(e.path());
            }
        }
    }
    files.sort();
    files
}

/// One harness at a time: their checks look at the whole process (its open files, its
/// threads' panics), which another harness running beside them would disturb.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn replay(target: &str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let run = fuzz_harness::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, run)| *run)
        .unwrap();
    let files = inputs(target);
    assert!(!files.is_empty(), "no corpus for {target}");
    for f in &files {
        let data = std::fs::read(f).unwrap();
        eprintln!("replaying {}", f.display());
        run(&data);
    }
    eprintln!("{target}: {} inputs replayed", files.len());
}

#[test]
fn replay_virtio_fs() {
    replay("virtio_fs");
}

#[test]
fn replay_ninep() {
    replay("ninep");
}

#[test]
fn replay_switch() {
    replay("switch");
}

#[test]
fn replay_virtqueue() {
    replay("virtqueue");
}

#[test]
fn replay_vhost_user() {
    replay("vhost_user");
}

#[test]
fn replay_snapshot_files() {
    replay("snapshot_files");
}
