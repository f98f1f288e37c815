//! The options `run` and `build` share, defined once: the directories a command sees and
//! the environment it runs in.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Args;

/// The store and xchg.
#[derive(Args, Debug)]
pub(super) struct SharedDirs {
    /// Directory shared read-only as the store (mounted at the same path unless --store-mount)
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Where the store is mounted in the guest
    #[arg(long, value_name = "PATH")]
    pub store_mount: Option<String>,
    /// Directory shared read-write at /tmp/xchg (default: a fresh temporary directory)
    #[arg(long, value_name = "DIR")]
    pub xchg: Option<PathBuf>,
    /// Keep the temporary xchg directory and print its path (not with --xchg)
    #[arg(long, conflicts_with = "xchg")]
    pub keep_xchg: bool,
    /// Serve xchg with the guest's writeback cache: small writes reach the host in
    /// page-sized or larger WRITEs when the guest closes or syncs a file (a file still
    /// open in the guest may lag behind on the host)
    #[arg(long)]
    pub xchg_writeback: bool,
}

/// The command's environment and working directory.
#[derive(Args, Debug)]
pub(super) struct CommandEnv {
    /// Set K=V for the command, value byte for byte (repeatable)
    #[arg(long, short = 'e', value_name = "K=V")]
    pub env: Vec<OsString>,
    /// Read K=V lines from a file (# comments and blank lines ignored)
    #[arg(long, value_name = "FILE")]
    pub env_file: Vec<PathBuf>,
    /// Pass this host variable to the command (repeatable)
    #[arg(long, value_name = "NAME")]
    pub pass_env: Vec<String>,
    /// Working directory of the command in the guest
    #[arg(long, short = 'w', value_name = "DIR")]
    pub workdir: Option<String>,
}
