//! Replays every file of `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` through
//! the harness its fuzz target runs, with the same invariant checks, on stable and
//! without fuzzing time: what the fuzzers found once stays found. One test per target.

use std::path::{Path, PathBuf};

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
