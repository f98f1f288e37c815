//! Unix socket files made atomically and removed only while they are still ours.
//!
//! A socket is bound under a temporary name in the directory it belongs in, then renamed
//! onto its final name with `RENAME_NOREPLACE`: a client never sees a half-made socket,
//! and whatever already sits at the final path (a file, a live server's socket) is left
//! alone and reported as "exists" instead of being replaced. The [`SocketFile`] that comes
//! back remembers the inode it made; dropping it removes the path only if that inode is
//! still there, so a socket that someone else has put in its place since is never removed.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Temporary names start with this; they are kept short (`.vswPID.N` in hex, about 12
/// bytes) because a socket path has 107 bytes at most and the temporary one must fit too.
pub const TEMP_PREFIX: &str = ".vsw";

/// A socket file this process made, removed when dropped (if it is still the same file).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the path still names the socket this process made.
    pub fn is_ours(&self) -> bool {
        std::fs::symlink_metadata(&self.path)
            .map(|m| m.dev() == self.dev && m.ino() == self.ino)
            .unwrap_or(false)
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.is_ours() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A listening stream socket at `path`, which must not exist.
pub fn bind_listener(path: &Path) -> io::Result<(UnixListener, SocketFile)> {
    place(path, |p| UnixListener::bind(p))
}

/// A datagram socket bound at `path`, which must not exist.
pub fn bind_datagram(path: &Path) -> io::Result<(UnixDatagram, SocketFile)> {
    place(path, |p| UnixDatagram::bind(p))
}

fn place<T>(path: &Path, bind: impl Fn(&Path) -> io::Result<T>) -> io::Result<(T, SocketFile)> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(exists(path));
    }
    let (socket, temp) = loop {
        let temp = dir.join(format!(
            "{TEMP_PREFIX}{:x}.{:x}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        match bind(&temp) {
            Ok(s) => break (s, temp),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("binding a socket in {}: {e}", dir.display()),
                ))
            }
        }
    };
    let meta = match std::fs::symlink_metadata(&temp) {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            return Err(e);
        }
    };
    if let Err(e) = rename_noreplace(&temp, path) {
        let _ = std::fs::remove_file(&temp);
        return Err(if e.kind() == io::ErrorKind::AlreadyExists {
            exists(path)
        } else {
            io::Error::new(e.kind(), format!("creating {}: {e}", path.display()))
        });
    }
    Ok((
        socket,
        SocketFile {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

fn exists(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "{} exists: a socket is never put over something else (remove it, or choose another path)",
            path.display()
        ),
    )
}

/// `rename(from, to)` that fails with `AlreadyExists` instead of replacing `to`.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: two valid NUL-terminated paths, relative to the working directory.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) {
        return Err(e);
    }
    // A file system without RENAME_NOREPLACE: link(2) never replaces either.
    std::fs::hard_link(from, to)?;
    std::fs::remove_file(from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_replaces_and_removes_only_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "keep").unwrap();
        let e = bind_listener(&file).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");

        let path = dir.path().join("s.sock");
        let (listener, owned) = bind_listener(&path).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        // Someone moves ours away and puts theirs there: dropping ours leaves theirs.
        drop(listener);
        std::fs::rename(&path, dir.path().join("moved")).unwrap();
        let theirs = UnixListener::bind(&path).unwrap();
        drop(owned);
        assert!(path.exists(), "a socket it did not make was removed");
        drop(theirs);
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(dir.path().join("moved")).unwrap();

        let (_d, owned) = bind_datagram(&path).unwrap();
        drop(owned);
        assert!(!path.exists());
        // No temporary names left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }
}
