//! virtiofs-bridge driven by a vhost-user front-end in test code: real sockets, memfd guest
//! memory, real split virtqueues, no VM. Every FUSE operation a build guest needs, the
//! read-only policy, escape attempts and malformed input.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{AttrOut, Opcode, OutHeader, SetattrIn};
use virtiofs_bridge::{ShareConfig, ShareServer, StatsSnapshot};
use vm_memory::{ByteValued, Bytes, GuestAddress};
use vmbuild_tests::fuse_client::{encode, Errno, FuseClient, ROOT};
use vmbuild_tests::vhost_frontend::{FsFrontend, RawDesc, MEM_SIZE, REQUEST};

const FATTR_MODE: u32 = 1;
const FATTR_UID: u32 = 2;
const FATTR_GID: u32 = 4;
const FATTR_SIZE: u32 = 8;
const FATTR_ATIME: u32 = 16;
const FATTR_MTIME: u32 = 32;

struct Share {
    dir: tempfile::TempDir,
    _sockdir: tempfile::TempDir,
    server: ShareServer,
}

impl Share {
    fn start(make: fn(&Path) -> ShareConfig) -> Share {
        let dir = tempfile::tempdir().unwrap();
        let sockdir = tempfile::tempdir().unwrap();
        let server = ShareServer::spawn(make(dir.path()), sockdir.path().join("fs.sock")).unwrap();
        Share {
            dir,
            _sockdir: sockdir,
            server,
        }
    }

    fn client(&self) -> FuseClient {
        let mut c = FuseClient::new(FsFrontend::connect(self.server.socket()).unwrap());
        let init = c.init().expect("INIT");
        assert_eq!(init.major, 7);
        // Big requests, or the guest splits every read and write into 8 KiB pieces.
        assert_eq!(init.max_write, 1 << 20);
        assert_eq!(init.max_pages, 256);
        c
    }

    fn path(&self, rel: &str) -> std::path::PathBuf {
        self.dir.path().join(rel)
    }
}

fn xchg() -> Share {
    Share::start(|d| ShareConfig::xchg(d))
}

fn store() -> Share {
    Share::start(|d| ShareConfig::store(d))
}

const EROFS: Errno = Errno(libc::EROFS);

#[test]
fn files_are_created_written_read_and_synced() {
    let share = xchg();
    let mut c = share.client();
    let (entry, open) = c.create(ROOT, "hello.txt", libc::O_RDWR, 0o640).unwrap();
    assert_eq!(
        c.write(entry.nodeid, open.fh, 0, b"hello, world").unwrap(),
        12
    );
    assert_eq!(c.write(entry.nodeid, open.fh, 7, b"guest").unwrap(), 5);
    assert_eq!(
        c.read(entry.nodeid, open.fh, 0, 4096).unwrap(),
        b"hello, guest"
    );
    c.flush(entry.nodeid, open.fh).unwrap();
    c.fsync(entry.nodeid, open.fh).unwrap();
    c.fallocate(entry.nodeid, open.fh, 0, 1 << 20).unwrap();
    assert_eq!(c.getattr(entry.nodeid).unwrap().attr.size, 1 << 20);
    // A hole after the data: SEEK_DATA finds 0, SEEK_HOLE finds the end of what was written
    // (or the end of the preallocation, which counts as data on some file systems).
    assert_eq!(
        c.lseek(entry.nodeid, open.fh, 0, libc::SEEK_DATA).unwrap(),
        0
    );
    assert!(c.lseek(entry.nodeid, open.fh, 0, libc::SEEK_HOLE).unwrap() >= 12);
    c.release(entry.nodeid, open.fh).unwrap();

    let host = share.path("hello.txt");
    let bytes = fs::read(&host).unwrap();
    assert_eq!(&bytes[..12], b"hello, guest");
    assert_eq!(
        fs::metadata(&host).unwrap().permissions().mode() & 0o777,
        0o640
    );

    // Reopen read-only and read back through a fresh lookup.
    let e = c.lookup(ROOT, "hello.txt").unwrap();
    assert_eq!(e.nodeid, entry.nodeid, "same inode for the same file");
    let o = c.open(e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(&c.read(e.nodeid, o.fh, 0, 12).unwrap(), b"hello, guest");
    c.release(e.nodeid, o.fh).unwrap();
    c.forget(e.nodeid, 2);
    assert!(share.server.stats().requests > 10);
}

#[test]
fn setattr_changes_mode_owner_size_and_times() {
    let share = xchg();
    fs::write(share.path("f"), vec![7u8; 10_000]).unwrap();
    let mut c = share.client();
    let e = c.lookup(ROOT, "f").unwrap();

    let attr = c
        .setattr(
            e.nodeid,
            SetattrIn {
                valid: FATTR_MODE,
                mode: 0o100600,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(attr.attr.mode & 0o7777, 0o600);
    c.setattr(
        e.nodeid,
        SetattrIn {
            valid: FATTR_UID | FATTR_GID,
            uid: 1234,
            gid: 5678,
            ..Default::default()
        },
    )
    .unwrap();
    c.setattr(
        e.nodeid,
        SetattrIn {
            valid: FATTR_SIZE,
            size: 100,
            ..Default::default()
        },
    )
    .unwrap();
    c.setattr(
        e.nodeid,
        SetattrIn {
            valid: FATTR_ATIME | FATTR_MTIME,
            atime: 1_000_000_000,
            mtime: 1_234_567_890,
            mtimensec: 5000,
            ..Default::default()
        },
    )
    .unwrap();

    let m = fs::metadata(share.path("f")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o600);
    assert_eq!((m.uid(), m.gid()), (1234, 5678));
    assert_eq!(m.len(), 100);
    assert_eq!(m.mtime(), 1_234_567_890);
    assert_eq!(m.mtime_nsec(), 5000);
    assert_eq!(m.atime(), 1_000_000_000);
}

#[test]
fn directories_links_symlinks_fifos_and_renames() {
    let share = xchg();
    let mut c = share.client();
    let d = c.mkdir(ROOT, "dir", 0o755).unwrap();
    let sub = c.mkdir(d.nodeid, "sub", 0o700).unwrap();
    assert!(share.path("dir/sub").is_dir());

    let (f, o) = c.create(sub.nodeid, "file", libc::O_WRONLY, 0o644).unwrap();
    c.write(f.nodeid, o.fh, 0, b"data").unwrap();
    c.release(f.nodeid, o.fh).unwrap();

    // Hard link: same inode, two names, nlink 2.
    let l = c.link(f.nodeid, d.nodeid, "hardlink").unwrap();
    assert_eq!(l.attr.ino, f.attr.ino);
    assert_eq!(l.attr.nlink, 2);
    assert_eq!(fs::read(share.path("dir/hardlink")).unwrap(), b"data");

    // Symlink: stored as given, never resolved on the host.
    let s = c.symlink(d.nodeid, "sym", "sub/file").unwrap();
    assert_eq!(s.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(c.readlink(s.nodeid).unwrap(), b"sub/file");
    assert_eq!(
        fs::read_link(share.path("dir/sym")).unwrap(),
        Path::new("sub/file")
    );

    // FIFO via MKNOD.
    let p = c.mknod(d.nodeid, "pipe", libc::S_IFIFO | 0o600).unwrap();
    assert_eq!(p.attr.mode & libc::S_IFMT, libc::S_IFIFO);
    assert!(fs::metadata(share.path("dir/pipe"))
        .unwrap()
        .file_type()
        .is_fifo());

    // Device nodes are refused: one in xchg would be the host's own device (here
    // /dev/sda, 8:0, and /dev/mem, 1:1) to whoever opens it on the host.
    for (name, kind, rdev) in [
        ("disk", libc::S_IFBLK, 8 << 8),
        ("mem", libc::S_IFCHR, 1 << 8 | 1),
    ] {
        assert_eq!(
            c.mknod_device(d.nodeid, name, kind | 0o666, rdev)
                .unwrap_err(),
            Errno(libc::EPERM),
            "{name}"
        );
        assert!(fs::symlink_metadata(share.path(&format!("dir/{name}"))).is_err());
    }

    // RENAME and RENAME2 (NOREPLACE refuses to clobber, EXCHANGE swaps).
    c.rename(d.nodeid, "hardlink", ROOT, "moved").unwrap();
    assert!(share.path("moved").exists() && !share.path("dir/hardlink").exists());
    fs::write(share.path("other"), b"other").unwrap();
    assert_eq!(
        c.rename2(ROOT, "moved", ROOT, "other", libc::RENAME_NOREPLACE)
            .unwrap_err(),
        Errno(libc::EEXIST)
    );
    c.rename2(ROOT, "moved", ROOT, "other", libc::RENAME_EXCHANGE)
        .unwrap();
    assert_eq!(fs::read(share.path("other")).unwrap(), b"data");
    assert_eq!(fs::read(share.path("moved")).unwrap(), b"other");

    // Directory listing, both flavours.
    let dh = c.opendir(d.nodeid).unwrap();
    let mut names: Vec<_> = c
        .readdir(d.nodeid, dh.fh, false)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    names.retain(|n| n != "." && n != "..");
    names.sort();
    assert_eq!(names, ["pipe", "sub", "sym"]);
    let plus = c.readdir(d.nodeid, dh.fh, true).unwrap();
    let sub_entry = plus.iter().find(|e| e.name == "sub").unwrap();
    assert_eq!(sub_entry.entry.unwrap().attr.ino, sub.attr.ino);
    c.fsyncdir(d.nodeid, dh.fh).unwrap();
    c.releasedir(d.nodeid, dh.fh).unwrap();

    // UNLINK and RMDIR, including the errors a local file system gives.
    assert_eq!(
        c.rmdir(d.nodeid, "sub").unwrap_err(),
        Errno(libc::ENOTEMPTY)
    );
    c.unlink(sub.nodeid, "file").unwrap();
    c.rmdir(d.nodeid, "sub").unwrap();
    c.unlink(d.nodeid, "sym").unwrap();
    c.unlink(d.nodeid, "pipe").unwrap();
    assert_eq!(c.lookup(d.nodeid, "sub").unwrap_err(), Errno(libc::ENOENT));
    assert!(!share.path("dir/sub").exists());
    c.batch_forget(&[(d.nodeid, 1), (sub.nodeid, 1), (f.nodeid, 1)]);
}

#[test]
fn statfs_access_and_xattrs() {
    let share = xchg();
    let mut c = share.client();
    let st = c.statfs(ROOT).unwrap();
    assert!(st.blocks > 0 && st.bsize > 0);
    c.access(ROOT, libc::R_OK | libc::W_OK | libc::X_OK)
        .unwrap();

    let (f, o) = c.create(ROOT, "x", libc::O_RDWR, 0o644).unwrap();
    c.release(f.nodeid, o.fh).unwrap();
    c.setxattr(f.nodeid, "user.vmbuild", b"value").unwrap();
    // Size 0 asks for the size; then the value.
    let size = c.getxattr(f.nodeid, "user.vmbuild", 0).unwrap();
    assert_eq!(u32::from_ne_bytes(size[..4].try_into().unwrap()), 5);
    assert_eq!(c.getxattr(f.nodeid, "user.vmbuild", 64).unwrap(), b"value");
    let list = c.listxattr(f.nodeid, 4096).unwrap();
    assert!(list.split(|b| *b == 0).any(|n| n == b"user.vmbuild"));
    c.removexattr(f.nodeid, "user.vmbuild").unwrap();
    assert_eq!(
        c.getxattr(f.nodeid, "user.vmbuild", 64).unwrap_err(),
        Errno(libc::ENODATA)
    );
    c.destroy();
}

#[test]
fn host_changes_show_in_xchg() {
    let share = xchg();
    let mut c = share.client();
    assert_eq!(c.lookup(ROOT, "later").unwrap_err(), Errno(libc::ENOENT));
    fs::write(share.path("later"), b"from the host").unwrap();
    let e = c.lookup(ROOT, "later").unwrap();
    let o = c.open(e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(c.read(e.nodeid, o.fh, 0, 100).unwrap(), b"from the host");
    fs::write(share.path("later"), b"changed").unwrap();
    assert_eq!(c.getattr(e.nodeid).unwrap().attr.size, 7);
    assert_eq!(c.read(e.nodeid, o.fh, 0, 100).unwrap(), b"changed");
    // xchg tells the guest to revalidate within a second; the store does not.
    assert!(e.entry_valid <= 1);
}

#[test]
fn store_answers_erofs_to_every_mutation() {
    let share = store();
    fs::create_dir(share.path("d")).unwrap();
    fs::write(share.path("d/f"), b"immutable").unwrap();
    let mut c = share.client();
    let d = c.lookup(ROOT, "d").unwrap();
    let f = c.lookup(d.nodeid, "f").unwrap();
    // The store's entries and attributes may be cached for a long time.
    assert!(f.entry_valid >= 3600 && f.attr_valid >= 3600);

    // Reading works, and the guest may keep its page cache (FOPEN_KEEP_CACHE = 2).
    let o = c.open(f.nodeid, libc::O_RDONLY).unwrap();
    assert_ne!(o.open_flags & 2, 0, "store opens keep the page cache");
    assert_eq!(c.read(f.nodeid, o.fh, 0, 100).unwrap(), b"immutable");

    let before = share.server.stats().erofs;
    assert_eq!(c.open(f.nodeid, libc::O_WRONLY).unwrap_err(), EROFS);
    assert_eq!(c.open(f.nodeid, libc::O_RDWR).unwrap_err(), EROFS);
    assert_eq!(
        c.open(f.nodeid, libc::O_RDONLY | libc::O_TRUNC)
            .unwrap_err(),
        EROFS
    );
    assert_eq!(c.write(f.nodeid, o.fh, 0, b"x").unwrap_err(), EROFS);
    assert_eq!(
        c.create(d.nodeid, "new", libc::O_WRONLY, 0o644)
            .unwrap_err(),
        EROFS
    );
    assert_eq!(c.mkdir(d.nodeid, "nd", 0o755).unwrap_err(), EROFS);
    assert_eq!(
        c.mknod(d.nodeid, "p", libc::S_IFIFO | 0o600).unwrap_err(),
        EROFS
    );
    assert_eq!(c.symlink(d.nodeid, "s", "f").unwrap_err(), EROFS);
    assert_eq!(c.link(f.nodeid, d.nodeid, "l").unwrap_err(), EROFS);
    assert_eq!(c.unlink(d.nodeid, "f").unwrap_err(), EROFS);
    assert_eq!(c.rmdir(ROOT, "d").unwrap_err(), EROFS);
    assert_eq!(c.rename(d.nodeid, "f", d.nodeid, "g").unwrap_err(), EROFS);
    assert_eq!(
        c.rename2(d.nodeid, "f", d.nodeid, "g", 0).unwrap_err(),
        EROFS
    );
    assert_eq!(
        c.setattr(
            f.nodeid,
            SetattrIn {
                valid: FATTR_MODE,
                mode: 0o100777,
                ..Default::default()
            }
        )
        .unwrap_err(),
        EROFS
    );
    assert_eq!(
        c.setattr(
            f.nodeid,
            SetattrIn {
                valid: FATTR_SIZE,
                size: 0,
                ..Default::default()
            }
        )
        .unwrap_err(),
        EROFS
    );
    assert_eq!(c.fallocate(f.nodeid, o.fh, 0, 4096).unwrap_err(), EROFS);
    assert_eq!(c.setxattr(f.nodeid, "user.x", b"y").unwrap_err(), EROFS);
    assert_eq!(c.removexattr(f.nodeid, "user.x").unwrap_err(), EROFS);
    assert_eq!(c.access(f.nodeid, libc::W_OK).unwrap_err(), EROFS);
    c.access(f.nodeid, libc::R_OK).unwrap();
    c.release(f.nodeid, o.fh).unwrap();
    assert_eq!(share.server.stats().erofs - before, 19);

    // Nothing changed on the host.
    assert_eq!(fs::read(share.path("d/f")).unwrap(), b"immutable");
    assert_eq!(fs::read_dir(share.path("d")).unwrap().count(), 1);
}

#[test]
fn names_cannot_leave_the_share() {
    let share = xchg();
    fs::create_dir(share.path("d")).unwrap();
    let mut c = share.client();
    let d = c.lookup(ROOT, "d").unwrap();
    // LOOKUP may resolve "." and ".." (the kernel sends them for NFS export), but only to
    // inodes inside the share.
    assert_eq!(c.lookup(d.nodeid, "..").unwrap().nodeid, ROOT);
    assert_eq!(c.lookup(d.nodeid, ".").unwrap().nodeid, d.nodeid);
    for bad in ["a/b", "../etc", "/etc"] {
        let err = c.lookup(d.nodeid, bad).unwrap_err();
        assert_eq!(err, Errno(libc::EINVAL), "{bad}");
    }
    for bad in ["..", ".", "a/b", "../etc", "/etc"] {
        assert!(
            c.create(d.nodeid, bad, libc::O_WRONLY, 0o644).is_err(),
            "create {bad}"
        );
        assert!(c.mkdir(d.nodeid, bad, 0o755).is_err(), "mkdir {bad}");
        assert!(
            c.rename(d.nodeid, "x", ROOT, bad).is_err(),
            "rename to {bad}"
        );
    }
    // A name without its terminating NUL, and an empty name.
    assert!(c.lookup_raw(ROOT, b"d").is_err());
    assert!(c.lookup_raw(ROOT, b"\0").is_err());
    // The root's parent is the root: ".." is refused or resolves to the root itself, never
    // to the host directory above the share.
    if let Ok(e) = c.lookup(ROOT, "..") {
        assert_eq!(e.nodeid, ROOT);
    }
}

#[test]
fn symlinks_pointing_outside_are_never_followed_on_the_host() {
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("secret"), b"host secret").unwrap();
    let share = xchg();
    std::os::unix::fs::symlink(outside.path(), share.path("escape")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), share.path("secret-link")).unwrap();
    let mut c = share.client();

    // The link itself is visible (the guest resolves it, inside the guest).
    let l = c.lookup(ROOT, "escape").unwrap();
    assert_eq!(l.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    // Looking up through it is not a path walk on the host: the symlink is not a directory.
    assert!(c.lookup(l.nodeid, "secret").is_err());
    assert!(c
        .create(l.nodeid, "planted", libc::O_WRONLY, 0o644)
        .is_err());
    assert!(c.mkdir(l.nodeid, "planted-dir", 0o755).is_err());
    // Opening the link to a file must not open the file behind it.
    let s = c.lookup(ROOT, "secret-link").unwrap();
    if let Ok(o) = c.open(s.nodeid, libc::O_RDONLY) {
        let read = c.read(s.nodeid, o.fh, 0, 100);
        assert_ne!(
            read.as_deref().ok(),
            Some(&b"host secret"[..]),
            "read through a symlink"
        );
    }
    assert!(c.open(s.nodeid, libc::O_WRONLY | libc::O_TRUNC).is_err());
    assert!(
        c.setattr(
            s.nodeid,
            SetattrIn {
                valid: FATTR_SIZE,
                size: 0,
                ..Default::default()
            }
        )
        .is_err()
            || fs::read(outside.path().join("secret")).unwrap() == b"host secret"
    );
    // Hard-linking the symlink makes another symlink inside the share, not a link to the
    // target.
    if let Ok(e) = c.link(s.nodeid, ROOT, "hl") {
        assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    }
    assert_eq!(
        fs::read(outside.path().join("secret")).unwrap(),
        b"host secret"
    );
    assert_eq!(
        fs::read_dir(outside.path()).unwrap().count(),
        1,
        "nothing planted outside"
    );
}

#[test]
fn a_directory_swapped_for_a_symlink_does_not_redirect_requests() {
    let outside = tempfile::tempdir().unwrap();
    let share = xchg();
    fs::create_dir(share.path("d")).unwrap();
    let mut c = share.client();
    let d = c.lookup(ROOT, "d").unwrap();
    // The host (or another guest process racing the kernel) swaps the directory for a
    // symlink to somewhere outside, after the guest looked it up.
    fs::rename(share.path("d"), share.path("d.moved")).unwrap();
    std::os::unix::fs::symlink(outside.path(), share.path("d")).unwrap();
    // Requests on the old inode still land in the real directory, inside the share.
    let (f, o) = c
        .create(d.nodeid, "planted", libc::O_WRONLY, 0o644)
        .unwrap();
    c.release(f.nodeid, o.fh).unwrap();
    assert!(share.path("d.moved/planted").exists());
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
    // A fresh lookup sees the symlink, and nothing can be created through it.
    let again = c.lookup(ROOT, "d").unwrap();
    assert_eq!(again.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert!(c
        .create(again.nodeid, "planted2", libc::O_WRONLY, 0o644)
        .is_err());
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
}

/// Files of `share` this process holds open for reading (not the engine's O_PATH fds).
fn open_for_reading(share: &Share) -> usize {
    const O_PATH_OCTAL: u32 = 0o10000000;
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|fd| {
            // Files in the share, not the share's directory (which the server holds open).
            fs::read_link(fd.path()).is_ok_and(|target| {
                target.starts_with(share.dir.path()) && target != share.dir.path()
            })
        })
        .filter(|fd| {
            let info = fs::read_to_string(format!(
                "/proc/self/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                .unwrap_or(0);
            flags & O_PATH_OCTAL == 0
        })
        .count()
}

/// A Linux guest opens nothing on the store (OPEN is answered ENOSYS and never sent
/// again): its READs come with no handle. The share opens each file it reads once and
/// keeps it until the guest forgets the inode, never more than a bounded number at once.
#[test]
fn store_reads_without_guest_opens_keep_one_file_per_inode() {
    let share = store();
    fs::create_dir(share.path("many")).unwrap();
    for i in 0..300 {
        fs::write(share.path(&format!("many/{i}")), format!("file {i}")).unwrap();
    }
    fs::write(share.path("f"), vec![7u8; 64 << 10]).unwrap();
    nix::unistd::mkfifo(&share.path("fifo"), nix::sys::stat::Mode::S_IRUSR).unwrap();
    let mut c = FuseClient::new(FsFrontend::connect(share.server.socket()).unwrap());
    c.init_like_linux().unwrap();
    let f = c.lookup(ROOT, "f").unwrap();
    assert_eq!(
        c.open(f.nodeid, libc::O_RDONLY).unwrap_err(),
        Errno(libc::ENOSYS)
    );
    // Many READs at once, none with a handle: one file opened for all of them.
    let reads: Vec<_> = (0..64u64)
        .map(|i| {
            let r = vmbuild_tests::fuse_client::read_in(0, (i % 16) * 4096, 4096);
            (Opcode::Read, f.nodeid, r.as_slice().to_vec())
        })
        .collect();
    for reply in c.batch(&reads) {
        assert_eq!(reply.unwrap(), vec![7u8; 4096]);
    }
    assert_eq!(open_for_reading(&share), 1);
    // fstat (GETATTR with the handle the guest has: 0) and SEEK_DATA work too.
    let getattr_fh = fuse_backend_rs::abi::fuse_abi::GetattrIn {
        flags: 1, // FUSE_GETATTR_FH
        dummy: 0,
        fh: 0,
    };
    let attr: AttrOut = {
        let b = c
            .request(Opcode::Getattr, f.nodeid, &[getattr_fh.as_slice()])
            .unwrap();
        vmbuild_tests::fuse_client::obj(&b)
    };
    assert_eq!(attr.attr.size, 64 << 10);
    assert_eq!(c.lseek(f.nodeid, 0, 4096, libc::SEEK_DATA).unwrap(), 4096);
    c.forget(f.nodeid, 1);
    // FORGET has no reply: give the server a round trip to have handled it.
    c.statfs(ROOT).unwrap();
    assert_eq!(open_for_reading(&share), 0, "the file outlived its inode");

    // A FIFO is not waited on: the READ is answered (opened non-blocking).
    let fifo = c.lookup(ROOT, "fifo").unwrap();
    let _ = c.read(fifo.nodeid, 0, 0, 10);

    // Reading 300 files keeps a bounded number open, and every one reads right.
    let many = c.lookup(ROOT, "many").unwrap();
    for i in 0..300 {
        let e = c.lookup(many.nodeid, &i.to_string()).unwrap();
        assert_eq!(
            c.read(e.nodeid, 0, 0, 100).unwrap(),
            format!("file {i}").as_bytes()
        );
    }
    let open = open_for_reading(&share);
    assert!((1..=256).contains(&open), "{open} files open");
}

#[test]
fn unknown_inodes_and_handles_are_errors() {
    let share = xchg();
    let mut c = share.client();
    assert!(c.getattr(0xdead_beef).is_err());
    assert!(c.lookup(0xdead_beef, "x").is_err());
    assert!(c.read(ROOT, 0xdead_beef, 0, 10).is_err());
    assert!(c.link(0xdead_beef, ROOT, "x").is_err());
    assert!(c.rename(ROOT, "x", 0xdead_beef, "y").is_err());
    // Forgetting more than was looked up must not underflow anything.
    c.forget(ROOT, u64::MAX);
    c.forget(0xdead_beef, 1);
    c.statfs(ROOT).unwrap();
}

/// What one request did to a share's counters.
#[derive(Debug, PartialEq, Eq)]
struct Counted {
    requests: u64,
    malformed: u64,
    bad_descriptors: u64,
}

fn counted(before: StatsSnapshot, after: StatsSnapshot) -> Counted {
    Counted {
        requests: after.requests - before.requests,
        malformed: after.malformed - before.malformed,
        bad_descriptors: after.bad_descriptors - before.bad_descriptors,
    }
}

/// Served and answered, nothing wrong with it.
const ANSWERED: Counted = Counted {
    requests: 1,
    malformed: 0,
    bad_descriptors: 0,
};
/// Counted as a malformed FUSE request.
const MALFORMED: Counted = Counted {
    requests: 1,
    malformed: 1,
    bad_descriptors: 0,
};
/// Counted as a descriptor chain the device could not use.
const BAD_DESCRIPTOR: Counted = Counted {
    requests: 1,
    malformed: 0,
    bad_descriptors: 1,
};

/// A reply that is exactly one FUSE error header for request `unique`: its errno.
fn error_reply(reply: &[u8], unique: u64) -> Errno {
    assert_eq!(
        reply.len(),
        std::mem::size_of::<OutHeader>(),
        "an error reply is a bare header: {reply:?}"
    );
    assert_eq!(
        u64::from_ne_bytes(reply[8..16].try_into().unwrap()),
        unique,
        "the reply answers another request"
    );
    vmbuild_tests::fuse_client::decode(reply).expect_err("an error reply")
}

#[test]
fn malformed_requests_are_answered_or_dropped_and_counted() {
    let share = xchg();
    let mut c = share.client();
    // Runs one case and returns its reply and what it did to the counters.
    let case = |c: &mut FuseClient, request: &[u8], reply_capacity: u32| {
        let before = share.server.stats();
        let reply = c.frontend.call(REQUEST, request, reply_capacity).unwrap();
        (reply, counted(before, share.server.stats()))
    };
    let getattr_in = [0u8; 16];

    // Unknown opcode: a proper ENOSYS reply, which is an answer, not a malformed request.
    let mut unknown = encode(Opcode::Lookup, 99, ROOT, 0, 0, &[b"x\0"]);
    unknown[4..8].copy_from_slice(&777u32.to_ne_bytes());
    let (reply, n) = case(&mut c, &unknown, 4096);
    assert_eq!(error_reply(&reply, 99), Errno(libc::ENOSYS));
    assert_eq!(n, ANSWERED, "unknown opcode");

    // Truncated header: not even a request id to answer, so no reply bytes.
    let (reply, n) = case(&mut c, &[1, 2, 3], 4096);
    assert_eq!(reply, b"", "truncated header");
    assert_eq!(n, MALFORMED, "truncated header");

    // Headers claiming more bytes than were sent: 1 GiB, and 4 KiB with the GETATTR body
    // itself complete (which the FUSE layer alone would answer as if nothing were wrong).
    for (unique, claimed) in [(101u64, 1u32 << 30), (102, 4096)] {
        let mut long = encode(Opcode::Getattr, unique, ROOT, 0, 0, &[&getattr_in]);
        long[0..4].copy_from_slice(&claimed.to_ne_bytes());
        let (reply, n) = case(&mut c, &long, 4096);
        assert_eq!(
            error_reply(&reply, unique),
            Errno(libc::EINVAL),
            "{claimed}"
        );
        assert_eq!(n, MALFORMED, "header claiming {claimed} bytes");
    }

    // A body shorter than its opcode needs (WRITE's header alone is 40 bytes).
    let short = encode(Opcode::Write, 103, ROOT, 0, 0, &[&[0u8; 8]]);
    let (reply, n) = case(&mut c, &short, 4096);
    assert_eq!(error_reply(&reply, 103), Errno(libc::EINVAL));
    assert_eq!(n, MALFORMED, "short body");

    // Reply buffers too small for the reply: with room for an error header, that header
    // (EINVAL); with less, nothing at all.
    let getattr = encode(Opcode::Getattr, 105, ROOT, 0, 0, &[&getattr_in]);
    let (reply, n) = case(&mut c, &getattr, 24);
    assert_eq!(error_reply(&reply, 105), Errno(libc::EINVAL));
    assert_eq!(n, MALFORMED, "24-byte reply buffer");
    let (reply, n) = case(&mut c, &getattr, 8);
    assert_eq!(reply, b"", "8-byte reply buffer");
    assert_eq!(n, MALFORMED, "8-byte reply buffer");

    // Descriptors outside guest memory, and a length running past its end: returned
    // unused, and counted as bad descriptors rather than as FUSE requests.
    let valid = encode(Opcode::Getattr, 107, ROOT, 0, 0, &[&getattr_in]);
    for (addr, len) in [
        (MEM_SIZE + 4096, valid.len() as u32),
        (u64::MAX - 8, 64),
        (MEM_SIZE - 8, 4096),
    ] {
        let before = share.server.stats();
        let head = c
            .frontend
            .submit_raw(
                REQUEST,
                3,
                &[RawDesc {
                    addr,
                    len,
                    flags: 0,
                    next: 0,
                }],
            )
            .unwrap();
        c.frontend.kick(REQUEST).unwrap();
        let used = c
            .frontend
            .wait_used(REQUEST, Duration::from_secs(5))
            .unwrap();
        assert_eq!(used.len(), 1, "addr {addr:#x}");
        assert_eq!((used[0].id, used[0].len), (u32::from(head), 0));
        assert_eq!(
            counted(before, share.server.stats()),
            BAD_DESCRIPTOR,
            "addr {addr:#x}"
        );
    }

    // A chain whose `next` loops back on itself: a complete GETATTR, read over and over
    // until the walk gives up after a queue's worth of descriptors, with no writable
    // descriptor for a reply. It comes back used, empty, and counted once.
    let buf = FsFrontend::slot_buffer(5);
    let looping = encode(Opcode::Getattr, 109, ROOT, 0, 0, &[&getattr_in]);
    c.frontend
        .mem()
        .write_slice(&looping, GuestAddress(buf))
        .unwrap();
    let before = share.server.stats();
    let head = c
        .frontend
        .submit_raw(
            REQUEST,
            5,
            &[RawDesc {
                addr: buf,
                len: looping.len() as u32,
                flags: 1, // NEXT
                next: 5 * 4,
            }],
        )
        .unwrap();
    assert_eq!(head, 5 * 4, "the descriptor points at itself");
    c.frontend.kick(REQUEST).unwrap();
    let used = c
        .frontend
        .wait_used(REQUEST, Duration::from_secs(5))
        .unwrap();
    assert_eq!(used.len(), 1);
    assert_eq!((used[0].id, used[0].len), (u32::from(head), 0));
    assert_eq!(
        counted(before, share.server.stats()),
        MALFORMED,
        "looping chain"
    );

    // And the share still serves well-formed requests, on the same queue.
    let before = share.server.stats();
    let (reply, n) = case(&mut c, &getattr, 4096);
    assert_eq!(n, ANSWERED);
    let attr = vmbuild_tests::fuse_client::decode(&reply).expect("GETATTR after the malformed");
    assert_eq!(attr.len(), std::mem::size_of::<AttrOut>());
    let (f, o) = c.create(ROOT, "still-works", libc::O_RDWR, 0o644).unwrap();
    c.write(f.nodeid, o.fh, 0, b"ok").unwrap();
    assert_eq!(fs::read(share.path("still-works")).unwrap(), b"ok");
    let after = share.server.stats();
    assert_eq!(
        (after.malformed, after.bad_descriptors),
        (before.malformed, before.bad_descriptors)
    );
}

#[test]
fn a_broken_avail_ring_does_not_take_down_other_shares() {
    let broken = xchg();
    let healthy = store();
    fs::write(healthy.path("f"), b"fine").unwrap();
    let mut bad = broken.client();
    let mut good = healthy.client();
    // An avail index far ahead of anything the driver could have published.
    bad.frontend.set_avail_idx_raw(REQUEST, 40_000).unwrap();
    bad.frontend.kick(REQUEST).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let e = good.lookup(ROOT, "f").unwrap();
    let o = good.open(e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(good.read(e.nodeid, o.fh, 0, 10).unwrap(), b"fine");
    // The broken front-end goes away; its share serves the next one.
    drop(bad);
    let mut again = broken.client();
    again.getattr(ROOT).unwrap();
}

#[test]
fn a_guest_that_never_collects_replies_does_not_stall_the_share() {
    let share = xchg();
    let mut lazy = share.client();
    let getattr = encode(Opcode::Getattr, 1, ROOT, 0, 0, &[&[0u8; 16]]);
    for slot in 0..vmbuild_tests::vhost_frontend::SLOTS {
        lazy.frontend.submit(REQUEST, slot, &getattr, 4096).unwrap();
    }
    lazy.frontend.kick(REQUEST).unwrap();
    // Never read the used ring; disconnect. The next guest gets a working share.
    std::thread::sleep(Duration::from_millis(200));
    drop(lazy);
    let mut next = share.client();
    next.getattr(ROOT).unwrap();
}

#[test]
fn the_share_survives_front_end_restarts() {
    let share = xchg();
    for round in 0..3 {
        let mut c = share.client();
        let name = format!("round-{round}");
        let (f, o) = c.create(ROOT, &name, libc::O_WRONLY, 0o644).unwrap();
        c.write(f.nodeid, o.fh, 0, name.as_bytes()).unwrap();
        c.release(f.nodeid, o.fh).unwrap();
        // Quit without DESTROY, as a killed QEMU does.
        drop(c);
        assert_eq!(fs::read(share.path(&name)).unwrap(), name.as_bytes());
    }
    assert_eq!(share.server.stats().connections, 3);
}

#[test]
fn several_shares_serve_from_one_process() {
    let store = store();
    let xchg = xchg();
    fs::write(store.path("input"), b"from the store").unwrap();
    let mut s = store.client();
    let mut x = xchg.client();
    let e = s.lookup(ROOT, "input").unwrap();
    let o = s.open(e.nodeid, libc::O_RDONLY).unwrap();
    let data = s.read(e.nodeid, o.fh, 0, 100).unwrap();
    let (f, w) = x.create(ROOT, "output", libc::O_WRONLY, 0o644).unwrap();
    x.write(f.nodeid, w.fh, 0, &data).unwrap();
    assert_eq!(fs::read(xchg.path("output")).unwrap(), b"from the store");
    assert_eq!(
        s.create(ROOT, "nope", libc::O_WRONLY, 0o644).unwrap_err(),
        EROFS
    );
}

#[test]
fn large_reads_and_writes_and_big_directories() {
    let share = xchg();
    let big: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 31 % 251) as u8).collect();
    fs::write(share.path("big"), &big).unwrap();
    fs::create_dir(share.path("many")).unwrap();
    for i in 0..3000 {
        fs::write(share.path(&format!("many/file-{i:05}")), i.to_string()).unwrap();
    }
    let mut c = share.client();
    let e = c.lookup(ROOT, "big").unwrap();
    let o = c.open(e.nodeid, libc::O_RDONLY).unwrap();
    let mut got = Vec::new();
    while got.len() < big.len() {
        let chunk = c.read(e.nodeid, o.fh, got.len() as u64, 128 << 10).unwrap();
        assert!(!chunk.is_empty());
        got.extend(chunk);
    }
    assert_eq!(got, big);

    let m = c.lookup(ROOT, "many").unwrap();
    let h = c.opendir(m.nodeid).unwrap();
    let entries = c.readdir(m.nodeid, h.fh, true).unwrap();
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.name.starts_with("file-"))
            .count(),
        3000
    );

    // Many requests in flight at once.
    let reqs: Vec<_> = (0..3000)
        .map(|i| {
            (
                Opcode::Lookup,
                m.nodeid,
                format!("file-{i:05}\0").into_bytes(),
            )
        })
        .collect();
    let replies = c.batch(&reqs);
    assert!(replies.iter().all(|r| r.is_ok()));
}

#[test]
fn a_worker_pool_serves_the_same_requests() {
    let share = Share::start(|d| ShareConfig {
        thread_pool_size: 2,
        ..ShareConfig::xchg(d)
    });
    for i in 0..200 {
        fs::write(share.path(&format!("f{i}")), i.to_string()).unwrap();
    }
    let mut c = share.client();
    let reqs: Vec<_> = (0..200)
        .map(|i| (Opcode::Lookup, ROOT, format!("f{i}\0").into_bytes()))
        .collect();
    let replies = c.batch(&reqs);
    assert!(replies.iter().all(|r| r.is_ok()));
    let (f, o) = c.create(ROOT, "pooled", libc::O_WRONLY, 0o644).unwrap();
    c.write(f.nodeid, o.fh, 0, b"pool").unwrap();
    assert_eq!(fs::read(share.path("pooled")).unwrap(), b"pool");
}
