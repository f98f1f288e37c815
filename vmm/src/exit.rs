//! Exit codes that mean something to a script.

/// Everything went as asked.
pub const SUCCESS: i32 = 0;
/// vmbuild itself failed while working (I/O, a peer that died, ...).
pub const FAILURE: i32 = 1;
/// The command line or a file it named cannot work; nothing was started.
pub const USAGE: i32 = 2;
