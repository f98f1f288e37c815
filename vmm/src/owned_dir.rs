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

/// A directory being made (`PREFIX-new-XXXXXX`) is locked, then renamed to its final name
/// (`PREFIX-PID-XXXXXX`): a directory under a final name is locked from the moment it has
/// that name, so a sweep may remove every unlocked one at once, however young. What a
/// process killed between the mkdir and the rename leaves under the `new` name is swept
/// once it is older than this.
const GRACE: Duration = Duration::from_secs(10);
/// The middle of the name a directory has while it is made and not yet locked.
const MAKING: &str = "new";

/// A directory removed on drop and locked while its owner lives.
pub struct OwnedDir {
    /// `None` once persisted.
    path: Option<PathBuf>,
    // Released only after the directory is gone (Drop removes it first).
    _lock: Flock<File>,
}

impl OwnedDir {
    /// `parent/PREFIX-PID-XXXXXX`. `prefix` names what the directory is for; the PID is
    /// only there for people looking at the directory.
    pub fn create(parent: &Path, prefix: &str) -> io::Result<OwnedDir> {
        loop {
            let making = tempfile::Builder::new()
                .prefix(&format!("{prefix}-{MAKING}-"))
                .tempdir_in(parent)?;
            let lock = Flock::lock(File::open(making.path())?, FlockArg::LockExclusiveNonblock)
                .map_err(|(_, errno)| io::Error::from(errno))?;
            let random = making
                .path()
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.rsplit_once('-'))
                .map(|(_, r)| r.to_owned())
                .unwrap_or_default();
            let path = parent.join(format!("{prefix}-{}-{random}", std::process::id()));
            match rename_noreplace(making.path(), &path) {
                Ok(()) => {
                    let _ = making.keep();
                    return Ok(OwnedDir {
                        path: Some(path),
                        _lock: lock,
                    });
                }
                // Taken (by a directory of an earlier process with this PID): another name.
                Err(nix::errno::Errno::EEXIST) => continue,
                Err(e) => return Err(io::Error::from(e)),
            }
        }
    }

    pub fn path(&self) -> &Path {
        self.path.as_deref().expect("present until drop or persist")
    }

    /// Renames the directory to `to`, where it stays: it is no longer removed on drop, and
    /// no sweep touches it (`to` must not match a sweep's pattern). On error the directory
    /// is still owned, and removed on drop.
    pub fn persist_as(mut self, to: &Path) -> io::Result<()> {
        std::fs::rename(self.path(), to)?;
        self.path = None;
        Ok(())
    }
}

impl Drop for OwnedDir {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

/// `rename(from, to)` that never replaces `to` (rename(2) would replace an empty
/// directory). File systems without `RENAME_NOREPLACE` (9p, some FUSE and network file
/// systems) answer `EINVAL`; there, a name that exists is refused first, and the rename
/// can then only replace a directory someone made under the same name since: a name with
/// our PID and the random part of the directory we hold.
fn rename_noreplace(from: &Path, to: &Path) -> nix::Result<()> {
    use nix::errno::Errno;
    match nix::fcntl::renameat2(
        None,
        from,
        None,
        to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    ) {
        Err(Errno::EINVAL) => {
            if to.symlink_metadata().is_ok() {
                return Err(Errno::EEXIST);
            }
            std::fs::rename(from, to).map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))
        }
        other => other,
    }
}

/// The directories in `parent` named `PREFIX-PID-…` (PID all digits), or with `making`
/// `PREFIX-new-…` (being made), that belong to this user.
fn ours(parent: &Path, prefix: &str, making: bool) -> Vec<(PathBuf, std::fs::Metadata)> {
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
            match making {
                true => pid == Some(MAKING),
                false => {
                    pid.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                }
            }
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
    ours(parent, prefix, false)
        .into_iter()
        .map(|(path, _)| path)
        .find(|path| held(path))
}

/// Removes the directories in `parent` whose names start with `PREFIX-` followed by a
/// number (a PID), that belong to this user and that no living process holds locked: such
/// a directory was locked from the moment it had its name, so its owner is gone, however
/// recently. Directories still being made (`PREFIX-new-…`) are removed only when older
/// than a grace period. Returns how many were removed. Errors are logged, never fatal:
/// sweeping is a courtesy.
pub fn sweep(parent: &Path, prefix: &str) -> usize {
    let mut removed = 0;
    let abandoned = ours(parent, prefix, false).into_iter().chain(
        ours(parent, prefix, true).into_iter().filter(|(_, meta)| {
            let age = meta
                .modified()
                .ok()
                .and_then(|m| SystemTime::now().duration_since(m).ok());
            matches!(age, Some(age) if age >= GRACE)
        }),
    );
    for (path, _) in abandoned {
        if held(&path) {
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
    fn a_locked_directory_is_kept_and_an_abandoned_one_removed_at_once() {
        let parent = tempfile::tempdir().unwrap();
        let live = OwnedDir::create(parent.path(), "run").unwrap();
        std::fs::write(live.path().join("sock"), "x").unwrap();
        let name = live
            .path()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            name.starts_with(&format!("run-{}-", std::process::id())),
            "{name}"
        );

        // What a SIGKILLed vmbuild leaves: a PID name, nobody holding its lock. Removed
        // however young: the next vmbuild may start a moment after the kill.
        let dead = parent.path().join("run-4242-abcdef");
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join("initrd.img"), "x").unwrap();
        // Killed between mkdir and rename: swept only once old enough (it may be a
        // directory another process is making right now).
        let making_young = parent.path().join("run-new-abcdef");
        let making_old = parent.path().join("run-new-ghijkl");
        std::fs::create_dir(&making_young).unwrap();
        std::fs::create_dir(&making_old).unwrap();
        age(&making_old);
        // Names that are not ours.
        for other in ["run-notapid-x", "build-4242-x", "runner-1-x"] {
            std::fs::create_dir(parent.path().join(other)).unwrap();
            age(&parent.path().join(other));
        }

        assert_eq!(sweep(parent.path(), "run"), 2);
        assert!(!dead.exists());
        assert!(!making_old.exists());
        assert!(making_young.exists());
        assert!(live.path().join("sock").exists());
        for other in ["run-notapid-x", "build-4242-x", "runner-1-x"] {
            assert!(parent.path().join(other).exists(), "{other} was removed");
        }
        let path = live.path().to_owned();
        drop(live);
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 4);
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
