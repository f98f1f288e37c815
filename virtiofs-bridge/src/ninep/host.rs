//! The host calls shared by the request handlers, each on a descriptor the server holds:
//! stat, the `O_NOFOLLOW` lookup of one name, the reopen of an `O_PATH` descriptor for
//! I/O, and reading a directory.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use super::error::RequestError;
use super::wire::{Qid, QTDIR, QTSYMLINK};
use super::DirEntry;

type Result<T> = std::result::Result<T, RequestError>;

/// `Err` with the errno of the host call that just failed when `rc` is negative.
pub(super) fn check(rc: libc::c_int) -> Result<()> {
    if rc < 0 {
        Err(RequestError::last_os())
    } else {
        Ok(())
    }
}

pub(super) fn stat(fd: &impl AsRawFd) -> Result<libc::stat> {
    // SAFETY: fstat on a descriptor we own into a zeroed stat buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

pub(super) fn is(st: &libc::stat, kind: libc::mode_t) -> bool {
    st.st_mode & libc::S_IFMT == kind
}

pub(super) fn qid_of(st: &libc::stat) -> Qid {
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => QTDIR,
        libc::S_IFLNK => QTSYMLINK,
        _ => 0,
    };
    (kind, st.st_mtime as u32, st.st_ino)
}

/// O_PATH|O_NOFOLLOW open of one name under `dir` (a name with a NUL is `BadName`).
pub(super) fn open_at(dir: &OwnedFd, name: &[u8]) -> Result<OwnedFd> {
    let c = CString::new(name).map_err(|_| RequestError::BadName)?;
    // SAFETY: openat with a valid directory fd and NUL-terminated name.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    check(fd)?;
    // SAFETY: fd was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(super) fn dup(fd: &OwnedFd) -> Result<OwnedFd> {
    Ok(fd.try_clone()?)
}

/// `/proc/self/fd/N` of a descriptor: the magic link to the very inode it holds.
pub(super) fn proc_fd(fd: &impl AsRawFd) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap()
}

/// Reopens an O_PATH descriptor for I/O through /proc/self/fd (as virtiofsd does): the
/// magic link leads to the very inode the descriptor holds, with no name looked up, so
/// there is no way to be redirected. Callers only reopen directories and regular files
/// (a symlink's descriptor would give ELOOP, not its target).
pub(super) fn reopen(node: &impl AsRawFd, flags: i32) -> Result<File> {
    let p = proc_fd(node);
    // SAFETY: open of a NUL-terminated path with valid flags.
    let fd = unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC) };
    check(fd)?;
    // SAFETY: as above.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// A directory's entries, `.` and `..` first, then the rest sorted by name.
pub(super) fn read_dir(node: &OwnedFd) -> Result<Vec<DirEntry>> {
    let dir = reopen(node, libc::O_RDONLY | libc::O_DIRECTORY)?;
    let path = format!("/proc/self/fd/{}", dir.as_raw_fd());
    let mut out = vec![
        (b".".to_vec(), libc::DT_DIR, 0),
        (b"..".to_vec(), libc::DT_DIR, 0),
    ];
    let mut rest: Vec<DirEntry> = std::fs::read_dir(&path)?
        .flatten()
        .map(|e| {
            use std::os::unix::fs::DirEntryExt;
            let t = e.file_type().ok();
            let dtype = match t {
                Some(t) if t.is_dir() => libc::DT_DIR,
                Some(t) if t.is_symlink() => libc::DT_LNK,
                Some(t) if t.is_file() => libc::DT_REG,
                _ => libc::DT_UNKNOWN,
            };
            (e.file_name().as_bytes().to_vec(), dtype, e.ino())
        })
        .collect();
    rest.sort();
    out.extend(rest);
    Ok(out)
}
