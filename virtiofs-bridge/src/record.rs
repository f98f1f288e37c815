//! Recording what guests send, for the fuzzers' seed corpora: in debug builds, with
//! `VMBUILD_RECORD_DIR` set, every FUSE request and 9P message a server receives is
//! appended to a file of its session there (`fuse-<pid>-<n>`, `ninep-ro-<pid>-<n>`,
//! `ninep-rw-<pid>-<n>`), each as `len[4]` (little-endian) and the bytes.
//! `cargo run -p fuzz-harness --bin fuzz-seeds -- --recorded DIR` turns them into seeds.
//! Release builds never record and carry nothing of this but an empty type.

/// One session's recording (nothing unless recording is on).
pub(crate) struct Recorder {
    #[cfg(debug_assertions)]
    file: Option<std::sync::Mutex<std::fs::File>>,
}

impl Recorder {
    /// A recorder for a new session of `kind`.
    pub(crate) fn new(kind: &str) -> Recorder {
        #[cfg(debug_assertions)]
        {
            use std::sync::atomic::{AtomicU64, Ordering};
            static SESSIONS: AtomicU64 = AtomicU64::new(0);
            let file = std::env::var_os("VMBUILD_RECORD_DIR").and_then(|dir| {
                let n = SESSIONS.fetch_add(1, Ordering::Relaxed);
                let path =
                    std::path::Path::new(&dir).join(format!("{kind}-{}-{n}", std::process::id()));
                std::fs::File::create(path).ok().map(std::sync::Mutex::new)
            });
            Recorder { file }
        }
        #[cfg(not(debug_assertions))]
        {
            let _ = kind;
            Recorder {}
        }
    }

    /// Whether anything is recorded (callers skip gathering the bytes otherwise).
    pub(crate) fn enabled(&self) -> bool {
        #[cfg(debug_assertions)]
        {
            self.file.is_some()
        }
        #[cfg(not(debug_assertions))]
        {
            false
        }
    }

    pub(crate) fn record(&self, bytes: &[u8]) {
        #[cfg(debug_assertions)]
        if let Some(f) = &self.file {
            use std::io::Write;
            let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
            let _ = f.write_all(&(bytes.len() as u32).to_le_bytes());
            let _ = f.write_all(bytes);
        }
        #[cfg(not(debug_assertions))]
        let _ = bytes;
    }
}
