//! A private directory per vmbuild invocation for sockets and control files, so that
//! concurrent runs never collide, removed when the invocation ends (success, error or
//! Ctrl-C: the directory is dropped on every path out of the workflow).

use std::path::{Path, PathBuf};

pub struct RuntimeDir(tempfile::TempDir);

impl RuntimeDir {
    /// A directory for `purpose` under the default base ([`base_dir`]).
    pub fn create(purpose: &str) -> anyhow::Result<RuntimeDir> {
        Self::create_in(None, purpose)
    }

    /// A directory for `purpose` under `base`, or the default base when `None`. Callers
    /// that run side by side in one process (tests) each pass their own base instead of
    /// changing the process's environment.
    pub fn create_in(base: Option<&Path>, purpose: &str) -> anyhow::Result<RuntimeDir> {
        let base = base.map(Path::to_owned).unwrap_or_else(base_dir);
        std::fs::create_dir_all(&base)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", base.display()))?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{purpose}-{}-", std::process::id()))
            .tempdir_in(&base)
            .map_err(|e| {
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

/// `$XDG_RUNTIME_DIR/vmbuild`, `/run/vmbuild` for root, else the temp dir. Kept short:
/// unix socket paths must fit in 108 bytes.
fn base_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Path::new(&d).join("vmbuild");
    }
    if nix::unistd::geteuid().is_root() && Path::new("/run").is_dir() {
        return PathBuf::from("/run/vmbuild");
    }
    std::env::temp_dir().join("vmbuild")
}
