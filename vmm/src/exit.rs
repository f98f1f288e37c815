//! Exit codes that mean something to a script.

/// Everything went as asked.
pub const SUCCESS: i32 = 0;
/// vmbuild itself failed while working (I/O, a peer that died, ...).
pub const FAILURE: i32 = 1;
/// The command line or a file it named cannot work; nothing was started.
pub const USAGE: i32 = 2;

/// `vmbuild build`: the target's SSH host key is not the one pinned in the snapshot.
pub const HOST_KEY_CHANGED: i32 = 119;
/// `vmbuild build`/`snapshot verify`: the snapshot is missing, truncated or corrupted.
pub const SNAPSHOT_DAMAGED: i32 = 120;
/// `vmbuild build`/`snapshot verify`: made by another QEMU, machine type or vmbuild format.
pub const SNAPSHOT_INCOMPATIBLE: i32 = 121;
/// `vmbuild build`/`bootstrap`: the target never answered SSH (or refused the login).
pub const TARGET_UNREACHABLE: i32 = 122;

/// `vmbuild run`/`build`: the VM stopped without reporting the command's exit status.
pub const NO_EXIT_CODE: i32 = 123;
/// `--timeout` expired; the VM was killed (as timeout(1)).
pub const TIMED_OUT: i32 = 124;
/// vmbuild or the guest's init failed around the command (as env(1)/chroot(1) use 125).
pub const VM_FAILED: i32 = 125;
/// Stopped by SIGINT/SIGTERM (128 + SIGINT).
pub const INTERRUPTED: i32 = 130;
