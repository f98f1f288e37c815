//! Where vmbuild keeps what outlives one invocation: snapshots, probe answers.

use std::path::{Path, PathBuf};

/// `$XDG_CACHE_HOME/vmbuild`; for root without it `/var/cache/vmbuild` (where the guest
/// kit lives too); otherwise `~/.cache/vmbuild`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Path::new(&d).join("vmbuild");
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/cache/vmbuild");
    }
    std::env::var_os("HOME")
        .map(|h| Path::new(&h).join(".cache/vmbuild"))
        .unwrap_or_else(|| std::env::temp_dir().join("vmbuild-cache"))
}
