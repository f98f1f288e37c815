//! Temporary directories that a later vmbuild can tell are abandoned.
//!
//! Every directory vmbuild makes for one invocation (its runtime directory of sockets and
//! overlays, a temporary xchg, bootstrap scratch) is an [`OwnedDir`]: removed when the
//! value is dropped, and locked (`flock` on the directory itself) for as long as the
//! process lives. A process killed by SIGKILL, or by a bug, cannot drop anything, but the
//! kernel releases its lock. So the next vmbuild [`sweep`]s: a directory of ours whose
//! lock it can take belongs to no living process and is removed.
//!
//! A lock, not the PID in the name: a PID may be reused, or live in another PID namespace
//! that shares this file system, and neither must make us delete a live directory.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};

/// Prefixes of the owned directories vmbuild makes in the temp directory.
pub const TEMP_PREFIXES: [&str; 2] = [XCHG_PREFIX, BOOTSTRAP_SCRATCH_PREFIX];
/// A run's or build's temporary xchg.
pub const XCHG_PREFIX: &str = "vmbuild-xchg";
/// A temporary xchg that `--keep-xchg` gave to the user.
pub const KEPT_XCHG_PREFIX: &str = "vmbuild-xchg-kept";
/// Files a bootstrap needs only while it runs (the target's host key before it is pinned).
pub const BOOTSTRAP_SCRATCH_PREFIX: &str = "vmbuild-bootstrap";

/// Directories younger than this are never swept: a directory is created a moment before
/// its owner locks it.
const GRACE: Duration = Duration::from_secs(10);

/// A directory removed on drop and locked while its owner lives.
pub struct OwnedDir {
    // Field order: the lock is released only after the directory is gone.
    dir: Option<tempfile::TempDir>,
    _lock: Flock<File>,
}

impl OwnedDir {
    /// `parent/PREFIX-PID-XXXXXX`. `prefix` names what the directory is for; the PID is
    /// only there for people looking at the directory.
    pub fn create(parent: &Path, prefix: &str) -> io::Result<OwnedDir> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}-{}-", std::process::id()))
            .tempdir_in(parent)?;
        let lock = Flock::lock(File::open(dir.path())?, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| io::Error::from(errno))?;
        Ok(OwnedDir {
            dir: Some(dir),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("present until drop or keep")
            .path()
    }

    /// Renames the directory to `to`, where it stays: it is no longer removed on drop, and
    /// no sweep touches it (`to` must not match a sweep's pattern). On error the directory
    /// is still owned, and removed on drop.
    pub fn persist_as(mut self, to: &Path) -> io::Result<()> {
        std::fs::rename(self.path(), to)?;
        let _ = self
            .dir
            .take()
            .expect("present until drop or persist")
            .keep();
        Ok(())
    }
}

/// The directories in `parent` named `PREFIX-PID-…` (PID all digits) that belong to this
/// user.
fn ours(parent: &Path, prefix: &str) -> Vec<(PathBuf, std::fs::Metadata)> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let uid = nix::unistd::geteuid().as_raw();
    entries
        .flatten()
        .filter(|entry| {
            let name = entry.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.strip_prefix(prefix))
                .and_then(|n| n.strip_prefix('-'))
                .and_then(|n| n.split_once('-'))
                .map(|(pid, _)| pid);
            pid.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|entry| {
            let meta = std::fs::symlink_metadata(entry.path()).ok()?;
            (meta.is_dir() && meta.uid() == uid).then(|| (entry.path(), meta))
        })
        .collect()
}

/// Whether a living process holds `dir`'s lock.
fn held(dir: &Path) -> bool {
    match File::open(dir) {
        Ok(file) => Flock::lock(file, FlockArg::LockExclusiveNonblock).is_err(),
        Err(_) => false,
    }
}

/// One directory in `parent` named `PREFIX-PID-…` that a living process owns, if any: for
/// refusing to start work that another vmbuild is already doing.
pub fn in_use(parent: &Path, prefix: &str) -> Option<PathBuf> {
    ours(parent, prefix)
        .into_iter()
        .map(|(path, _)| path)
        .find(|path| held(path))
}

/// Removes the directories in `parent` whose names start with `PREFIX-` followed by a
/// number (a PID), that belong to this user and that no living process holds locked.
/// Returns how many were removed. Errors are logged, never fatal: sweeping is a courtesy.
pub fn sweep(parent: &Path, prefix: &str) -> usize {
    let mut removed = 0;
    for (path, meta) in ours(parent, prefix) {
        let age = meta
            .modified()
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok());
        let young = !matches!(age, Some(age) if age >= GRACE);
        if young || held(&path) {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                tracing::debug!(dir = %path.display(), "removed a directory left by a vmbuild that died");
                removed += 1;
            }
            Err(e) => {
                tracing::debug!(dir = %path.display(), "could not remove a stale directory: {e}")
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn age(path: &Path) {
        let old = SystemTime::now() - Duration::from_secs(60);
        File::open(path).unwrap().set_modified(old).unwrap();
    }

    #[test]
    fn a_locked_directory_is_kept_and_an_abandoned_one_removed() {
        let parent = tempfile::tempdir().unwrap();
        let live = OwnedDir::create(parent.path(), "run").unwrap();
        std::fs::write(live.path().join("sock"), "x").unwrap();
        age(live.path());

        // What a SIGKILLed vmbuild leaves: a matching name, nobody holding its lock.
        let dead = parent.path().join("run-4242-abcdef");
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join("initrd.img"), "x").unwrap();
        age(&dead);
        // Too young to judge, and names that are not ours.
        let fresh = parent.path().join("run-4243-abcdef");
        std::fs::create_dir(&fresh).unwrap();
        for other in ["run-notapid-x", "build-4242-x", "runner-1-x"] {
            std::fs::create_dir(parent.path().join(other)).unwrap();
            age(&parent.path().join(other));
        }

        assert_eq!(sweep(parent.path(), "run"), 1);
        assert!(!dead.exists());
        assert!(live.path().join("sock").exists());
        assert!(fresh.exists());
        for other in ["run-notapid-x", "build-4242-x", "runner-1-x"] {
            assert!(parent.path().join(other).exists(), "{other} was removed");
        }
        let path = live.path().to_owned();
        drop(live);
        assert!(!path.exists());
    }

    #[test]
    fn a_persisted_directory_is_left_alone_and_a_live_one_is_in_use() {
        let parent = tempfile::tempdir().unwrap();
        let dir = OwnedDir::create(parent.path(), ".snap.partial").unwrap();
        assert_eq!(
            in_use(parent.path(), ".snap.partial").as_deref(),
            Some(dir.path())
        );
        let out = parent.path().join("snap");
        dir.persist_as(&out).unwrap();
        assert!(in_use(parent.path(), ".snap.partial").is_none());
        age(&out);
        assert_eq!(sweep(parent.path(), ".snap.partial"), 0);
        assert!(out.is_dir());
    }
}
