//! A 9P2000.L server for guests that mount 9p rather than virtio-fs: read-only shares (the
//! store) and read-write ones (`xchg`). It answers one request message with one reply
//! message; a transport (the embedded VMM's virtio-9p device, or [`serve_tcp`]) carries them.
//!
//! Same rules as the virtio-fs side: names are resolved one component at a time relative
//! to a directory file descriptor with `O_NOFOLLOW` (a symlink is a node the guest reads
//! with READLINK, never a way out), and `..` never climbs above the share's root.
//! Malformed messages get `Rlerror(EINVAL)` (or no reply when not even a tag can be read)
//! and are counted; the server keeps serving.
//!
//! On a read-only share every mutation is answered `EROFS` and counted. On a read-write
//! share the requests a Linux v9fs client sends to create and change files are served
//! (see `write.rs`): every name they carry must be one plain component, and every host
//! call is made relative to a directory descriptor the fid holds (`openat`, `mkdirat`,
//! `unlinkat`, `renameat`, `symlinkat`, `linkat`, `mknodat`), never through a host path
//! built from the guest's names, and never following a symlink the guest planted.
//!
//! How it is built, bottom-up, one file per part: `wire.rs` reads and writes the message
//! format; `request.rs` parses a message into a typed request before anything is done
//! with it; `dispatch.rs` answers the request, one handler per message type, found in
//! `read.rs` (the session and the reading requests: what every share serves) and
//! `write.rs` (what changes a read-write share), over the host calls of `host.rs`;
//! `error.rs` names why a request is answered `Rlerror`, and with which errno. `state.rs`
//! saves and restores a session for VM snapshots; `tcp.rs` carries the messages over TCP.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use crate::share::ShareConfig;

mod dispatch;
mod error;
mod host;
mod read;
mod request;
mod state;
mod tcp;
#[cfg(test)]
mod tests;
mod wire;
mod write;

pub use state::{NinepState, RestoreReport, SavedFid, SavedOpen};
pub use tcp::serve_tcp;

use error::RequestError;
use host::{dup, open_at};

pub const VERSION: &str = "9P2000.L";
/// The largest message this server handles (the guest's msize is clamped to it).
pub const MAX_MSIZE: u32 = 128 << 10;

struct Fid {
    /// An O_PATH descriptor of the node.
    node: OwnedFd,
    /// Components from the share's root, each one plain name: only used to answer `..`
    /// (and to find a node's parent for Tremove/Trename). It is a hint, never trusted for
    /// safety: `..` walks it down again from the root descriptor with `O_NOFOLLOW`, so
    /// however stale it gets (a rename or unlink behind the fid's back) the walk lands
    /// inside the share or fails; it cannot climb out. Renames made through this server
    /// rewrite the paths of the fids below the renamed node to keep `..` right.
    path: Vec<Vec<u8>>,
    open: Option<Open>,
}

/// A directory entry: name, d_type, inode.
type DirEntry = (Vec<u8>, u8, u64);

enum Open {
    /// A regular file, and whether it was opened for writing (Twrite needs it).
    File { file: File, write: bool },
    /// Directory entries, read once at open.
    Dir(Vec<DirEntry>),
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NinepStats {
    pub requests: u64,
    pub malformed: u64,
    /// Mutations refused with EROFS (read-only shares).
    pub refused_writes: u64,
    /// Mutations served (read-write shares): creates, writes, renames, setattrs...
    pub mutations: u64,
    /// Bytes written by Twrite.
    pub bytes_written: u64,
}

pub struct NinepServer {
    root: OwnedFd,
    read_only: bool,
    fids: Mutex<HashMap<u32, Fid>>,
    msize: Mutex<u32>,
    tag: String,
    requests: AtomicU64,
    malformed: AtomicU64,
    refused: AtomicU64,
    mutations: AtomicU64,
    written: AtomicU64,
    recorder: crate::record::Recorder,
}

impl NinepServer {
    /// Serves `config.dir`, read-only or read-write as `config.read_only` says.
    pub fn new(config: &ShareConfig) -> Result<NinepServer, crate::Error> {
        config.validate()?;
        let dir = File::open(&config.dir)
            .map_err(|e| crate::Error::Io(format!("opening {}", config.dir.display()), e))?;
        Ok(NinepServer {
            root: OwnedFd::from(dir),
            read_only: config.read_only,
            fids: Mutex::new(HashMap::new()),
            msize: Mutex::new(MAX_MSIZE),
            tag: config.tag.clone(),
            requests: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            mutations: AtomicU64::new(0),
            written: AtomicU64::new(0),
            recorder: crate::record::Recorder::new(if config.read_only {
                "ninep-ro"
            } else {
                "ninep-rw"
            }),
        })
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    pub fn msize(&self) -> u32 {
        *self.msize.lock().unwrap()
    }

    pub fn stats(&self) -> NinepStats {
        NinepStats {
            requests: self.requests.load(Relaxed),
            malformed: self.malformed.load(Relaxed),
            refused_writes: self.refused.load(Relaxed),
            mutations: self.mutations.load(Relaxed),
            bytes_written: self.written.load(Relaxed),
        }
    }

    /// The node at `path` below the root, walked down again one `O_NOFOLLOW` component at
    /// a time: whatever `path` holds, the result is inside the share (or an error).
    fn walk_path(&self, path: &[Vec<u8>]) -> Result<OwnedFd, RequestError> {
        let mut at = dup(&self.root)?;
        for comp in path {
            at = open_at(&at, comp)?;
        }
        Ok(at)
    }
}
