//! A private directory per vmbuild invocation for sockets and control files, so that
//! concurrent runs never collide, removed when the invocation ends (success, error or
//! Ctrl-C: the directory is dropped on every path out of the workflow). One left by a
//! vmbuild that was killed outright is removed by the next one (see [`crate::owned_dir`]).

use std::path::{Path, PathBuf};

use crate::owned_dir::{self, OwnedDir};

/// What runtime directories are for; the sweep looks for each of these prefixes.
const PURPOSES: [&str; 4] = ["run", "build", "bootstrap", "migrate"];

pub struct RuntimeDir(OwnedDir);

impl RuntimeDir {
    /// A directory for `purpose` under the default base ([`base_dir`]).
    pub fn create(purpose: &str) -> anyhow::Result<RuntimeDir> {
        Self::create_in(None, purpose)
    }

    /// A directory for `purpose` under `base`, or the default base when `None`. Callers
    /// that run side by side in one process (tests) each pass their own base instead of
    /// changing the process's environment.
    pub fn create_in(base: Option<&Path>, purpose: &str) -> anyhow::Result<RuntimeDir> {
        debug_assert!(PURPOSES.contains(&purpose), "add {purpose} to PURPOSES");
        let base = base.map(Path::to_owned).unwrap_or_else(base_dir);
        std::fs::create_dir_all(&base)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", base.display()))?;
        sweep_abandoned(&base);
        let dir = OwnedDir::create(&base, purpose).map_err(|e| {
            anyhow::anyhow!(
                "cannot create a runtime directory in {}: {e}",
                base.display()
            )
        })?;
        Ok(RuntimeDir(dir))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
}

/// Removes what vmbuilds that died without cleaning up left in `base` and in the temp
/// directory (runtime directories, temporary xchg and bootstrap scratch directories).
pub fn sweep_abandoned(base: &Path) {
    let mut removed = 0;
    for purpose in PURPOSES {
        removed += owned_dir::sweep(base, purpose);
    }
    removed += crate::build_slots::sweep(base);
    let tmp = std::env::temp_dir();
    for prefix in crate::owned_dir::TEMP_PREFIXES {
        removed += owned_dir::sweep(&tmp, prefix);
    }
    if removed > 0 {
        tracing::debug!(
            "removed {removed} directories and slots left by vmbuilds that were killed"
        );
    }
}

/// `$XDG_RUNTIME_DIR/vmbuild`, `/run/vmbuild` for root, else `vmbuild-UID` in the temp
/// dir (one per user: a directory shared by all users belongs to whoever came first).
/// Kept short: unix socket paths must fit in 108 bytes.
pub fn base_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Path::new(&d).join("vmbuild");
    }
    let uid = nix::unistd::geteuid();
    if uid.is_root() && Path::new("/run").is_dir() {
        return PathBuf::from("/run/vmbuild");
    }
    std::env::temp_dir().join(format!("vmbuild-{uid}"))
}
