//! Build slots: how many `vmbuild build`s of one user run at once on this host.
//!
//! A build is two VMs (the revived target and the controller) that must answer each other
//! within deadlines (`--ssh-wait`). Sixteen builds started at once on two cores made every
//! VM crawl and a quarter of them missed that deadline (exit 122), so a build first takes
//! one of `--jobs` slots and waits, saying so, while all are taken; its deadlines start
//! only when it holds one.
//!
//! A slot is a lock file, `slot-N` in the runtime base directory, held with `flock` for as
//! long as the build lives. The kernel releases the lock of a build that was killed, so a
//! slot is never lost. The holder removes its file when done, so nothing stays behind;
//! since a waiter may have opened the file just before it was removed, a lock is only
//! taken as the slot once the path is checked to still name the locked file (the usual
//! lock-file idiom).
//!
//! Slots are per user: they live in the user's runtime directory, like the sockets, and
//! a build of another user neither sees nor takes them. Waiters are not served in order:
//! each tries every slot a few times a second, and a freed slot goes to whoever tries
//! first.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

/// How often a waiting build tries the slots again.
const RETRY: Duration = Duration::from_millis(100);

/// How many builds run at once when `--jobs` and `VMBUILD_JOBS` say nothing: one per
/// core (each build's two VMs mostly take turns: the controller idles while the target
/// runs the command).
pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A held slot; dropping it frees the slot.
#[derive(Debug)]
pub struct BuildSlot {
    index: usize,
    path: PathBuf,
    _lock: Flock<File>,
}

impl BuildSlot {
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Drop for BuildSlot {
    fn drop(&mut self) {
        // Removed while still locked: a waiter that opened it before is told by the path
        // check that it is no longer the slot.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// How a wait for a slot ended.
#[derive(Debug)]
pub enum Waited {
    Held {
        slot: BuildSlot,
        waited: Duration,
    },
    /// A signal arrived while every slot was taken.
    Interrupted,
}

/// Takes one of slots `0..jobs` in `dir` (created if missing), waiting while all are
/// taken. `on_wait` is called once, when the first try finds every slot taken, so the
/// caller can say why nothing happens. A message on `signals` ends the wait.
pub fn acquire(
    dir: &Path,
    jobs: usize,
    signals: &Receiver<()>,
    on_wait: impl FnOnce(),
) -> io::Result<Waited> {
    assert!(jobs > 0, "0 jobs means no slots, not a slot to wait for");
    std::fs::create_dir_all(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", dir.display())))?;
    let start = Instant::now();
    let mut on_wait = Some(on_wait);
    loop {
        for index in 0..jobs {
            if let Some(slot) = try_slot(dir, index)? {
                return Ok(Waited::Held {
                    slot,
                    waited: start.elapsed(),
                });
            }
        }
        if let Some(say) = on_wait.take() {
            say();
        }
        match signals.recv_timeout(RETRY) {
            Ok(()) => return Ok(Waited::Interrupted),
            // Nobody can signal any more (the sender is gone): keep waiting.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(RETRY),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}

/// Slot `index`, if nobody holds it.
fn try_slot(dir: &Path, index: usize) -> io::Result<Option<BuildSlot>> {
    let path = dir.join(format!("slot-{index}"));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))?;
    let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(None),
        Err((_, errno)) => {
            return Err(io::Error::new(
                io::Error::from(errno).kind(),
                format!("locking {}: {errno}", path.display()),
            ))
        }
    };
    // The holder before us may have removed the file between our open and our lock: then
    // we hold a lock on a file that is no slot any more, and try again.
    let held = lock.metadata()?;
    match std::fs::symlink_metadata(&path) {
        Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => Ok(Some(BuildSlot {
            index,
            path,
            _lock: lock,
        })),
        _ => Ok(None),
    }
}

/// Removes the slot files in `dir` that nobody holds: those of builds that were killed
/// (the kernel released their locks, but the files stay). Each is locked before it is
/// removed, as a holder removes its own, so that a build taking it meanwhile is never
/// left holding a removed file. Returns how many were removed.
pub fn sweep(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let index = name
                .to_str()?
                .strip_prefix("slot-")?
                .parse::<usize>()
                .ok()?;
            let path = e.path();
            // Not created: a file that is already gone is nobody's to sweep.
            let file = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&path)
                .ok()?;
            let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).ok()?;
            let held = lock.metadata().ok()?;
            let now = std::fs::symlink_metadata(&path).ok()?;
            (now.ino() == held.ino() && now.dev() == held.dev()).then(|| {
                tracing::debug!(slot = index, "removing a build slot left by a killed build");
                std::fs::remove_file(&path).is_ok()
            })
        })
        .filter(|&removed| removed)
        .count()
}

/// How many slots in `dir` are held right now (by builds with any `--jobs`).
pub fn held(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("slot-"))
                .is_some_and(|n| n.parse::<usize>().is_ok())
        })
        .filter(|e| {
            File::open(e.path())
                .map(|f| Flock::lock(f, FlockArg::LockSharedNonblock).is_err())
                .unwrap_or(false)
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn take(dir: &Path, jobs: usize) -> Option<BuildSlot> {
        (0..jobs).find_map(|i| try_slot(dir, i).unwrap())
    }

    #[test]
    fn at_most_jobs_slots_are_held_and_a_freed_one_is_taken_again() {
        let dir = tempfile::tempdir().unwrap();
        let a = take(dir.path(), 2).expect("a free slot");
        let b = take(dir.path(), 2).expect("a second free slot");
        assert_ne!(a.index(), b.index());
        assert!(take(dir.path(), 2).is_none(), "a third slot of two");
        assert_eq!(held(dir.path()), 2);
        let freed = a.index();
        drop(a);
        // Nothing stays behind of a freed slot.
        assert!(!dir.path().join(format!("slot-{freed}")).exists());
        let c = take(dir.path(), 2).expect("the freed slot");
        assert_eq!(c.index(), freed);
        drop((b, c));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_lock_on_a_removed_slot_file_is_not_the_slot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slot-0");
        // A waiter opened the file, then its holder removed it and let go.
        let stale = File::create(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let lock = Flock::lock(stale, FlockArg::LockExclusiveNonblock).unwrap();
        // Another build made a new slot-0 and holds it.
        let holder = try_slot(dir.path(), 0).unwrap().expect("slot 0 free");
        assert!(try_slot(dir.path(), 0).unwrap().is_none());
        drop((lock, holder));
    }

    #[test]
    fn a_wait_ends_when_a_slot_is_freed_or_a_signal_arrives() {
        let dir = tempfile::tempdir().unwrap();
        let held_slot = take(dir.path(), 1).unwrap();
        let (tx, rx) = mpsc::channel();
        let mut told = false;
        tx.send(()).unwrap();
        let waited = acquire(dir.path(), 1, &rx, || told = true).unwrap();
        assert!(matches!(waited, Waited::Interrupted), "{waited:?}");
        assert!(told, "the wait was not announced");

        let freer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(held_slot);
        });
        let waited = acquire(dir.path(), 1, &rx, || {}).unwrap();
        freer.join().unwrap();
        match waited {
            Waited::Held { slot, waited } => {
                assert_eq!(slot.index(), 0);
                assert!(waited >= Duration::from_millis(250), "{waited:?}");
            }
            other => panic!("{other:?}"),
        }
        drop(tx);
    }

    #[test]
    fn a_sweep_removes_only_the_slots_nobody_holds() {
        let dir = tempfile::tempdir().unwrap();
        let held = take(dir.path(), 1).unwrap();
        // Killed builds' slots: files with nobody's lock on them.
        std::fs::write(dir.path().join("slot-1"), "").unwrap();
        std::fs::write(dir.path().join("slot-7"), "").unwrap();
        std::fs::write(dir.path().join("not-a-slot"), "").unwrap();
        assert_eq!(sweep(dir.path()), 2);
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["not-a-slot", "slot-0"]);
        drop(held);
    }

    #[test]
    fn a_slot_left_by_a_killed_build_is_free() {
        // The kernel released its lock; only the file remains.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("slot-0"), "").unwrap();
        let (_tx, rx) = mpsc::channel();
        match acquire(dir.path(), 1, &rx, || panic!("waited for a dead build")).unwrap() {
            Waited::Held { slot, .. } => assert_eq!(slot.index(), 0),
            other => panic!("{other:?}"),
        }
    }
}
