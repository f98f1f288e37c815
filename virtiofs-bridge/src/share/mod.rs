//! A share: one host directory offered to a guest under one tag, with the policy (read-only
//! or read-write) and cache mode that fit what the directory holds.

mod policy;
mod read_handles;

pub use policy::ShareFs;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};

use crate::stats::ShareStats;
use crate::Error;

/// How much the guest may cache, spelled as virtiofsd spells it (`--cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// No data or metadata caching: every access reaches the host. For directories the host
    /// changes behind the guest's back.
    Never,
    /// Close-to-open consistency with short (1 s) metadata timeouts: what `xchg` needs, since
    /// the host and the guest both change it.
    Auto,
    /// Cache everything for as long as the guest likes. Only correct when nothing but the
    /// guest changes the directory — or nothing changes it at all, as with the store.
    Always,
}

impl CacheMode {
    /// How long a guest may trust a looked-up entry or attribute.
    fn timeout(self) -> Duration {
        match self {
            CacheMode::Never => Duration::ZERO,
            CacheMode::Auto => Duration::from_secs(1),
            // Nothing but the guest changes the directory (or nothing at all, for the store):
            // an entry looked up once is valid until the guest forgets it. A day is as good
            // as forever for a build.
            CacheMode::Always => Duration::from_secs(86_400),
        }
    }

    fn policy(self) -> CachePolicy {
        match self {
            CacheMode::Never => CachePolicy::Never,
            CacheMode::Auto => CachePolicy::Auto,
            CacheMode::Always => CachePolicy::Always,
        }
    }
}

impl FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "never" | "none" => Ok(CacheMode::Never),
            "auto" | "metadata" => Ok(CacheMode::Auto),
            "always" => Ok(CacheMode::Always),
            other => Err(format!(
                "unknown cache mode '{other}': use never, auto or always"
            )),
        }
    }
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CacheMode::Never => "never",
            CacheMode::Auto => "auto",
            CacheMode::Always => "always",
        })
    }
}

/// Everything needed to serve one share.
#[derive(Debug, Clone)]
pub struct ShareConfig {
    /// The virtio-fs tag the guest mounts (`mount -t virtiofs TAG /mnt`).
    pub tag: String,
    pub dir: PathBuf,
    pub read_only: bool,
    pub cache: CacheMode,
    /// Serve xattrs (getxattr/listxattr; setxattr/removexattr on writable shares).
    pub xattr: bool,
    /// Worker threads for requests; 0 answers them on the queue's own thread.
    pub thread_pool_size: usize,
    /// Per-file DAX, for a device with a DAX window and a guest that mounts `dax=inode`:
    /// files at least this large are marked for DAX (FUSE_ATTR_DAX), smaller ones are
    /// read with READ. A Linux guest maps DAX in 2 MiB ranges per file, so small files
    /// would waste the window. `None`: no per-file DAX.
    pub dax_file_size: Option<u64>,
    /// Offer the guest a writeback cache (FUSE_WRITEBACK_CACHE) on a read-write share:
    /// its small writes gather in its page cache and reach the host in page-sized or
    /// larger WRITEs when a file is closed, synced or the pages are reclaimed. What the
    /// host sees of a file still open in the guest may lag behind it.
    pub writeback: bool,
}

impl ShareConfig {
    /// The store: immutable, read-only, cached for as long as the guest likes.
    pub fn store(dir: impl Into<PathBuf>) -> Self {
        ShareConfig {
            tag: "store".into(),
            dir: dir.into(),
            read_only: true,
            cache: CacheMode::Always,
            xattr: true,
            thread_pool_size: 0,
            dax_file_size: None,
            writeback: false,
        }
    }

    /// The exchange directory: read-write, and the host's changes must show in the guest.
    pub fn xchg(dir: impl Into<PathBuf>) -> Self {
        ShareConfig {
            tag: "xchg".into(),
            dir: dir.into(),
            read_only: false,
            cache: CacheMode::Auto,
            xattr: true,
            thread_pool_size: 0,
            dax_file_size: None,
            writeback: false,
        }
    }

    /// Checks what can be checked before a guest connects, with errors that say what to do.
    pub fn validate(&self) -> Result<(), Error> {
        if self.tag.is_empty() || self.tag.len() > 36 {
            return Err(Error::Config(format!(
                "share tag '{}' must be 1 to 36 bytes (virtio-fs limit)",
                self.tag
            )));
        }
        check_dir(&self.dir)
    }

    /// A fresh file system for one front-end connection: a new guest gets a new FUSE
    /// session, so no inode or handle of a previous guest survives into it.
    pub(crate) fn open_fs(&self, stats: Arc<ShareStats>) -> Result<ShareFs, Error> {
        // The directory is opened here, and the engine (which opens its root only at the
        // guest's INIT, and takes it as a UTF-8 string) is handed that open directory as
        // /proc/self/fd/N/. (the final "." keeps the engine's O_NOFOLLOW from stopping at
        // the magic link): the session serves the directory as it is now, even if its path
        // is removed or replaced before the guest mounts it, and a path that is not UTF-8
        // needs nothing else. The descriptor lives as long as the file system.
        check_dir(&self.dir)?;
        let dir = std::fs::File::open(&self.dir).map_err(|e| {
            Error::Io(
                format!("opening share '{}' at {}", self.tag, self.dir.display()),
                e,
            )
        })?;
        let root = format!("/proc/self/fd/{}/.", std::os::fd::AsRawFd::as_raw_fd(&dir));
        let root_fd = Some(dir);
        let timeout = self.cache.timeout();
        // An immutable share needs no guest handles: with ZERO_MESSAGE_OPEN(DIR) the guest
        // skips the OPEN/RELEASE (and OPENDIR/RELEASEDIR) round trips, which under a VM
        // cost far more than the host-side work that replaces them (a file opened at its
        // first READ and kept; a directory opened per READDIR). Its page cache never goes
        // stale either, so it may keep it across opens.
        let immutable = self.read_only && self.cache == CacheMode::Always;
        let cfg = Config {
            root_dir: root.clone(),
            cache_policy: self.cache.policy(),
            entry_timeout: timeout,
            attr_timeout: timeout,
            xattr: self.xattr,
            do_import: true,
            writeback: self.writeback && !self.read_only,
            // The guest opens no file (ShareFs::without_guest_opens), but the engine does:
            // READs are served from handles kept open per inode, not reopened each time.
            no_open: false,
            no_opendir: immutable,
            dax_file_size: self.dax_file_size,
            ..Config::default()
        };
        let engine = PassthroughFs::new(cfg).map_err(|e| {
            Error::Io(
                format!("opening share '{}' at {}", self.tag, self.dir.display()),
                e,
            )
        })?;
        let keep_cache = immutable;
        let fs = ShareFs::new(engine, self.read_only, keep_cache, stats)
            .with_root_fd(root_fd)
            .with_per_file_dax(self.dax_file_size.is_some());
        Ok(if immutable {
            fs.without_guest_opens()
        } else {
            fs
        })
    }
}

fn check_dir(dir: &Path) -> Result<(), Error> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::Config(format!(
            "{} is not a directory: a share must be a directory",
            dir.display()
        ))),
        Err(e) => Err(Error::Config(format!(
            "cannot use {} as a share: {e}",
            dir.display()
        ))),
    }
}
