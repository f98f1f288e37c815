//! Exit codes that mean something to a script.

/// Everything went as asked.
pub const SUCCESS: i32 = 0;
/// vmbuild itself failed while working (I/O, a peer that died, ...).
pub const FAILURE: i32 = 1;
/// The command line or a file it named cannot work; nothing was started.
pub const USAGE: i32 = 2;

/// `vmbuild run`/`build`: the VM stopped without reporting the command's exit status.
pub const NO_EXIT_CODE: i32 = 123;
/// `--timeout` expired; the VM was killed (as timeout(1)).
pub const TIMED_OUT: i32 = 124;
/// vmbuild or the guest's init failed around the command (as env(1)/chroot(1) use 125).
pub const VM_FAILED: i32 = 125;
/// Stopped by SIGINT/SIGTERM (128 + SIGINT).
pub const INTERRUPTED: i32 = 130;
