//! The server played by a test client: read-write requests on a temp dir, symlinks that
//! point out of the share, bad names, the read-only share's refusals, and random or
//! truncated messages of every type.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::wire::{HEADER, NOFID, QTDIR};
use super::*;

// Message types by their numbers on the wire: the client speaks the wire, not the
// server's types.
const RLERROR: u8 = 7;
const TSTATFS: u8 = 8;
const TLOPEN: u8 = 12;
const TREADLINK: u8 = 22;
const TGETATTR: u8 = 24;
const TREADDIR: u8 = 40;
const TVERSION: u8 = 100;
const TATTACH: u8 = 104;
const TFLUSH: u8 = 108;
const TWALK: u8 = 110;
const TREAD: u8 = 116;
const TCLUNK: u8 = 120;
const TLCREATE: u8 = 14;
const TSYMLINK: u8 = 16;
const TMKNOD: u8 = 18;
const TRENAME: u8 = 20;
const TSETATTR: u8 = 26;
const TXATTRWALK: u8 = 30;
const TXATTRCREATE: u8 = 32;
const TFSYNC: u8 = 50;
const TLOCK: u8 = 52;
const TGETLOCK: u8 = 54;
const TLINK: u8 = 70;
const TMKDIR: u8 = 72;
const TRENAMEAT: u8 = 74;
const TUNLINKAT: u8 = 76;
const TWRITE: u8 = 118;
const TREMOVE: u8 = 122;

const O_RDONLY: u32 = 0;
const O_WRONLY: u32 = 1;
const O_RDWR: u32 = 2;
const O_TRUNC: u32 = 0o1000;
const O_APPEND: u32 = 0o2000;

/// A message body being built.
#[derive(Default, Clone)]
struct B(Vec<u8>);

impl B {
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn s(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(&(v.len() as u16).to_le_bytes());
        self.0.extend_from_slice(v);
        self
    }
    fn raw(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }
}

fn msg(kind: u8, tag: u16, body: &[u8]) -> Vec<u8> {
    let mut m = ((HEADER + body.len()) as u32).to_le_bytes().to_vec();
    m.push(kind);
    m.extend_from_slice(&tag.to_le_bytes());
    m.extend_from_slice(body);
    m
}

struct C {
    s: NinepServer,
    tag: u16,
}

impl C {
    fn new(dir: &Path, read_only: bool) -> C {
        let cfg = if read_only {
            ShareConfig::store(dir)
        } else {
            ShareConfig::xchg(dir)
        };
        let mut c = C {
            s: NinepServer::new(&cfg).unwrap(),
            tag: 0,
        };
        c.call(TVERSION, B::default().u32(65536).s(b"9P2000.L"))
            .unwrap();
        c.call(
            TATTACH,
            B::default().u32(0).u32(NOFID).s(b"root").s(b"").u32(0),
        )
        .unwrap();
        c
    }

    fn call(&mut self, kind: u8, body: B) -> Result<Vec<u8>, u32> {
        self.tag = self.tag.wrapping_add(1);
        let reply = self
            .s
            .handle(&msg(kind, self.tag, &body.0))
            .expect("a reply");
        assert_eq!(
            u32::from_le_bytes(reply[..4].try_into().unwrap()) as usize,
            reply.len()
        );
        assert_eq!(u16::from_le_bytes([reply[5], reply[6]]), self.tag);
        if reply[4] == RLERROR {
            return Err(u32::from_le_bytes(reply[7..11].try_into().unwrap()));
        }
        assert_eq!(reply[4], kind + 1, "reply type");
        Ok(reply[7..].to_vec())
    }

    fn walk(&mut self, fid: u32, newfid: u32, names: &[&[u8]]) -> Result<usize, u32> {
        let mut b = B::default()
            .u32(fid)
            .u32(newfid)
            .raw(&(names.len() as u16).to_le_bytes());
        for n in names {
            b = b.s(n);
        }
        let r = self.call(TWALK, b)?;
        Ok(u16::from_le_bytes([r[0], r[1]]) as usize)
    }

    /// Walks fully to `names` as `newfid`, or fails.
    fn at(&mut self, newfid: u32, names: &[&[u8]]) -> Result<(), u32> {
        let n = self.walk(0, newfid, names)?;
        if n != names.len() {
            return Err(libc::ENOENT as u32);
        }
        Ok(())
    }

    fn clunk(&mut self, fid: u32) {
        let _ = self.call(TCLUNK, B::default().u32(fid));
    }

    fn lcreate(&mut self, dfid: u32, name: &[u8], flags: u32, mode: u32) -> Result<Vec<u8>, u32> {
        self.call(
            TLCREATE,
            B::default().u32(dfid).s(name).u32(flags).u32(mode).u32(0),
        )
    }

    fn lopen(&mut self, fid: u32, flags: u32) -> Result<Vec<u8>, u32> {
        self.call(TLOPEN, B::default().u32(fid).u32(flags))
    }

    fn write(&mut self, fid: u32, offset: u64, data: &[u8]) -> Result<u32, u32> {
        let r = self.call(
            TWRITE,
            B::default()
                .u32(fid)
                .u64(offset)
                .u32(data.len() as u32)
                .raw(data),
        )?;
        Ok(u32::from_le_bytes(r[..4].try_into().unwrap()))
    }

    fn read(&mut self, fid: u32, offset: u64, count: u32) -> Result<Vec<u8>, u32> {
        let r = self.call(TREAD, B::default().u32(fid).u64(offset).u32(count))?;
        Ok(r[4..].to_vec())
    }

    fn mkdir(&mut self, dfid: u32, name: &[u8], mode: u32) -> Result<Vec<u8>, u32> {
        self.call(TMKDIR, B::default().u32(dfid).s(name).u32(mode).u32(0))
    }

    fn unlinkat(&mut self, dfid: u32, name: &[u8], flags: u32) -> Result<Vec<u8>, u32> {
        self.call(TUNLINKAT, B::default().u32(dfid).s(name).u32(flags))
    }

    fn renameat(&mut self, od: u32, on: &[u8], nd: u32, nn: &[u8]) -> Result<Vec<u8>, u32> {
        self.call(TRENAMEAT, B::default().u32(od).s(on).u32(nd).s(nn))
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &mut self,
        fid: u32,
        valid: u32,
        mode: u32,
        size: u64,
        atime: (u64, u64),
        mtime: (u64, u64),
    ) -> Result<Vec<u8>, u32> {
        self.call(
            TSETATTR,
            B::default()
                .u32(fid)
                .u32(valid)
                .u32(mode)
                .u32(0)
                .u32(0)
                .u64(size)
                .u64(atime.0)
                .u64(atime.1)
                .u64(mtime.0)
                .u64(mtime.1),
        )
    }

    fn symlink(&mut self, dfid: u32, name: &[u8], target: &[u8]) -> Result<Vec<u8>, u32> {
        self.call(TSYMLINK, B::default().u32(dfid).s(name).s(target).u32(0))
    }
}

/// root/share is served; root/outside must never change.
fn layout() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let share = root.path().join("share");
    let outside = root.path().join("outside");
    std::fs::create_dir_all(share.join("sub")).unwrap();
    std::fs::create_dir_all(outside.join("dir")).unwrap();
    std::fs::write(outside.join("secret"), "outside").unwrap();
    std::fs::write(share.join("sub/file"), "inside").unwrap();
    std::os::unix::fs::symlink("../outside", share.join("up")).unwrap();
    std::os::unix::fs::symlink(&outside, share.join("abs")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), share.join("secretlink")).unwrap();
    (root, share, outside)
}

/// Everything about a tree that a write could change: names, types, modes, owners,
/// sizes, mtimes, contents and link targets.
fn snapshot(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let md = std::fs::symlink_metadata(&d).unwrap();
        out.push(format!(
            "{} {:o} {}:{} {} {}.{}",
            d.display(),
            md.mode(),
            md.uid(),
            md.gid(),
            md.size(),
            md.mtime(),
            md.mtime_nsec()
        ));
        if md.file_type().is_symlink() {
            out.push(format!("-> {:?}", std::fs::read_link(&d).unwrap()));
        } else if md.is_file() {
            out.push(format!("= {:?}", std::fs::read(&d).unwrap()));
        } else if md.is_dir() {
            for e in std::fs::read_dir(&d).unwrap() {
                todo.push(e.unwrap().path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn rw_share_creates_writes_and_reads_back() {
    let (_root, share, _) = layout();
    let mut c = C::new(&share, false);
    c.at(1, &[]).unwrap();
    let r = c.lcreate(1, b"f", O_RDWR, 0o666).unwrap();
    assert_eq!(r[0], 0, "a regular file's qid");
    assert_eq!(c.write(1, 0, b"hello ").unwrap(), 6);
    assert_eq!(c.write(1, 6, b"world").unwrap(), 5);
    assert_eq!(c.read(1, 0, 100).unwrap(), b"hello world");
    assert_eq!(std::fs::read(share.join("f")).unwrap(), b"hello world");
    // The exact mode, whatever the server's umask.
    let md = std::fs::metadata(share.join("f")).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o666);
    // Tlcreate made fid 1 the file: ".." from it is the root again.
    assert_eq!(c.walk(1, 2, &[b".."]).unwrap(), 1);
    c.lopen(2, O_RDONLY).unwrap();

    // Opened for writing through Tlopen: truncate, append.
    c.at(3, &[b"sub", b"file"]).unwrap();
    c.lopen(3, O_WRONLY | O_TRUNC).unwrap();
    assert_eq!(std::fs::read(share.join("sub/file")).unwrap(), b"");
    c.write(3, 0, b"new").unwrap();
    c.at(4, &[b"sub", b"file"]).unwrap();
    c.lopen(4, O_WRONLY | O_APPEND).unwrap();
    c.write(4, 0, b"+tail").unwrap();
    assert_eq!(std::fs::read(share.join("sub/file")).unwrap(), b"new+tail");
    c.call(TFSYNC, B::default().u32(4).u32(0)).unwrap();
    c.call(TFSYNC, B::default().u32(0).u32(1)).unwrap();

    // An existing name: opened as it is, or EEXIST with O_EXCL.
    c.at(5, &[]).unwrap();
    assert_eq!(
        c.lcreate(5, b"f", O_RDWR | 0o200, 0o644),
        Err(libc::EEXIST as u32)
    );
    c.lcreate(5, b"f", O_RDONLY, 0o644).unwrap();
    assert_eq!(c.read(5, 6, 100).unwrap(), b"world");

    // Twrite needs a fid opened for writing.
    assert_eq!(c.write(5, 0, b"x"), Err(libc::EBADF as u32));
    assert_eq!(c.write(0, 0, b"x"), Err(libc::EBADF as u32));
    c.at(6, &[b"f"]).unwrap();
    assert_eq!(c.write(6, 0, b"x"), Err(libc::EBADF as u32));
    // A directory is never opened for writing; Tlcreate needs an unopened directory.
    c.at(7, &[b"sub"]).unwrap();
    assert_eq!(c.lopen(7, O_WRONLY), Err(libc::EISDIR as u32));
    assert_eq!(c.lcreate(6, b"g", O_RDWR, 0o644), Err(libc::ENOTDIR as u32));
    assert_eq!(c.lcreate(1, b"g", O_RDWR, 0o644), Err(libc::EBADF as u32));

    // Set-ID bits never reach the host.
    c.at(8, &[]).unwrap();
    c.lcreate(8, b"suid", O_RDWR, 0o6755).unwrap();
    let md = std::fs::metadata(share.join("suid")).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o755);

    let st = c.s.stats();
    assert_eq!(st.malformed, 0);
    assert_eq!(st.refused_writes, 0);
    assert_eq!(st.bytes_written, 19);
    assert!(st.mutations >= 6, "{st:?}");
}

#[test]
fn rw_share_mkdir_unlink_rename_remove() {
    let (_root, share, _) = layout();
    let mut c = C::new(&share, false);
    let q = c.mkdir(0, b"d", 0o750).unwrap();
    assert_eq!(q[0], QTDIR);
    assert_eq!(
        std::fs::metadata(share.join("d"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o750
    );
    assert_eq!(c.mkdir(0, b"d", 0o755), Err(libc::EEXIST as u32));
    c.at(1, &[b"d"]).unwrap();
    c.lcreate(1, b"x", O_WRONLY, 0o644).unwrap();
    c.write(1, 0, b"one").unwrap();

    // Rename the directory: the open fid keeps working, and its ".." follows the rename.
    c.renameat(0, b"d", 0, b"e").unwrap();
    assert!(!share.join("d").exists());
    c.write(1, 3, b"two").unwrap();
    assert_eq!(std::fs::read(share.join("e/x")).unwrap(), b"onetwo");
    assert_eq!(c.walk(1, 2, &[b".."]).unwrap(), 1);
    c.lcreate(2, b"y", O_WRONLY, 0o644).unwrap();
    assert!(share.join("e/y").exists());

    // Trename moves the node a fid holds.
    c.at(3, &[b"e", b"y"]).unwrap();
    c.at(4, &[b"sub"]).unwrap();
    c.call(TRENAME, B::default().u32(3).u32(4).s(b"y2"))
        .unwrap();
    assert!(share.join("sub/y2").exists() && !share.join("e/y").exists());
    assert_eq!(c.walk(3, 5, &[b".."]).unwrap(), 1);
    c.lopen(5, O_RDONLY).unwrap();
    // The root has no parent to be renamed in.
    assert_eq!(
        c.call(TRENAME, B::default().u32(0).u32(4).s(b"root")),
        Err(libc::EBUSY as u32)
    );

    // unlinkat: a file, a non-empty directory, then an empty one.
    assert_eq!(c.unlinkat(0, b"e", 0x200), Err(libc::ENOTEMPTY as u32));
    c.unlinkat(0, b"nope", 0).unwrap_err();
    c.at(6, &[b"e"]).unwrap();
    c.unlinkat(6, b"x", 0).unwrap();
    c.unlinkat(0, b"e", 0x200).unwrap();
    assert!(!share.join("e").exists());

    // Tremove: removes and clunks, even when it fails.
    c.at(7, &[b"sub", b"y2"]).unwrap();
    c.call(TREMOVE, B::default().u32(7)).unwrap();
    assert!(!share.join("sub/y2").exists());
    assert_eq!(
        c.call(TREMOVE, B::default().u32(7)),
        Err(libc::EBADF as u32)
    );
    c.at(8, &[]).unwrap();
    assert_eq!(
        c.call(TREMOVE, B::default().u32(8)),
        Err(libc::EBUSY as u32)
    );
    assert!(share.is_dir());
    assert_eq!(c.call(TCLUNK, B::default().u32(8)), Err(libc::EBADF as u32));

    // Hard links and FIFOs; devices are refused.
    c.at(9, &[b"sub", b"file"]).unwrap();
    c.call(TLINK, B::default().u32(0).u32(9).s(b"hard"))
        .unwrap();
    assert_eq!(std::fs::read(share.join("hard")).unwrap(), b"inside");
    c.call(
        TMKNOD,
        B::default()
            .u32(0)
            .s(b"fifo")
            .u32(libc::S_IFIFO | 0o640)
            .u32(0)
            .u32(0)
            .u32(0),
    )
    .unwrap();
    let md = std::fs::symlink_metadata(share.join("fifo")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&md.file_type()));
    assert_eq!(md.permissions().mode() & 0o7777, 0o640);
    for kind in [libc::S_IFCHR, libc::S_IFBLK, libc::S_IFSOCK] {
        assert_eq!(
            c.call(
                TMKNOD,
                B::default()
                    .u32(0)
                    .s(b"dev")
                    .u32(kind | 0o600)
                    .u32(1)
                    .u32(3)
                    .u32(0)
            ),
            Err(libc::EPERM as u32)
        );
    }
    // The server never opens a FIFO (it could block).
    c.at(10, &[b"fifo"]).unwrap();
    assert_eq!(c.lopen(10, O_RDONLY), Err(libc::EACCES as u32));
    c.at(11, &[]).unwrap();
    assert_eq!(
        c.lcreate(11, b"fifo", O_RDONLY, 0o644),
        Err(libc::EEXIST as u32)
    );

    // Locks: local only, as QEMU and diod answer them.
    let r = c
        .call(
            TLOCK,
            B::default()
                .u32(9)
                .u8(1)
                .u32(0)
                .u64(0)
                .u64(0)
                .u32(42)
                .s(b"guest"),
        )
        .unwrap();
    assert_eq!(r, [0]);
    let r = c
        .call(
            TGETLOCK,
            B::default().u32(9).u8(1).u64(5).u64(10).u32(42).s(b"guest"),
        )
        .unwrap();
    assert_eq!(r[0], 2, "F_UNLCK");
    assert_eq!(&r[1..9], &5u64.to_le_bytes());
    // Xattrs: not supported.
    assert_eq!(
        c.call(TXATTRWALK, B::default().u32(9).u32(20).s(b"user.x")),
        Err(libc::EOPNOTSUPP as u32)
    );
    assert_eq!(
        c.call(TXATTRCREATE, B::default().u32(9).s(b"user.x").u64(1).u32(0)),
        Err(libc::EOPNOTSUPP as u32)
    );
    assert_eq!(c.s.stats().malformed, 0);
}

#[test]
fn rw_share_setattr_truncates_and_sets_times() {
    let (_root, share, _) = layout();
    let mut c = C::new(&share, false);
    c.at(1, &[b"sub", b"file"]).unwrap();
    // Size, through a fid that is not open.
    c.setattr(1, 1 << 3, 0, 3, (0, 0), (0, 0)).unwrap();
    assert_eq!(std::fs::read(share.join("sub/file")).unwrap(), b"ins");
    c.setattr(1, 1 << 3, 0, 10, (0, 0), (0, 0)).unwrap();
    assert_eq!(std::fs::metadata(share.join("sub/file")).unwrap().len(), 10);
    // Size, through a fid open for writing.
    c.at(2, &[b"sub", b"file"]).unwrap();
    c.lopen(2, O_RDWR).unwrap();
    c.setattr(2, 1 << 3, 0, 0, (0, 0), (0, 0)).unwrap();
    assert_eq!(std::fs::metadata(share.join("sub/file")).unwrap().len(), 0);
    assert_eq!(
        c.setattr(1, 1 << 3, 0, u64::MAX, (0, 0), (0, 0)),
        Err(libc::EINVAL as u32)
    );
    // Times given (ATIME|MTIME|*_SET, as `touch -d`).
    c.setattr(
        1,
        (1 << 4) | (1 << 5) | (1 << 7) | (1 << 8),
        0,
        0,
        (1_000_000_000, 5),
        (1_234_567_890, 123_456_789),
    )
    .unwrap();
    let md = std::fs::metadata(share.join("sub/file")).unwrap();
    assert_eq!((md.atime(), md.atime_nsec()), (1_000_000_000, 5));
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_234_567_890, 123_456_789));
    // MTIME alone, without _SET: now; atime left as it was.
    c.setattr(1, 1 << 5, 0, 0, (0, 0), (0, 0)).unwrap();
    let md = std::fs::metadata(share.join("sub/file")).unwrap();
    assert_eq!(md.atime(), 1_000_000_000);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((md.mtime() - now).abs() < 60);
    // Out-of-range nanoseconds: the host says EINVAL.
    assert_eq!(
        c.setattr(1, (1 << 5) | (1 << 8), 0, 0, (0, 0), (5, 2_000_000_000)),
        Err(libc::EINVAL as u32)
    );
    // Mode, without set-ID bits; ownership to the server's own ids is always allowed.
    c.setattr(1, 1, 0o4640, 0, (0, 0), (0, 0)).unwrap();
    let md = std::fs::metadata(share.join("sub/file")).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o640);
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    c.call(
        TSETATTR,
        B::default()
            .u32(1)
            .u32(2 | 4)
            .u32(0)
            .u32(uid)
            .u32(gid)
            .raw(&[0u8; 40]),
    )
    .unwrap();
    // A directory's size cannot be set.
    c.at(3, &[b"sub"]).unwrap();
    assert_eq!(
        c.setattr(3, 1 << 3, 0, 0, (0, 0), (0, 0)),
        Err(libc::EISDIR as u32)
    );
    assert_eq!(c.s.stats().malformed, 0);
}

#[test]
fn rw_share_symlinks_stay_links_and_lead_nowhere() {
    let (root, share, outside) = layout();
    let before = snapshot(&outside);
    let mut c = C::new(&share, false);

    // Walking through a link stops at the link.
    for link in [&b"up"[..], b"abs"] {
        assert_eq!(c.walk(0, 1, &[link, b"secret"]).unwrap(), 1);
        assert_eq!(c.walk(0, 1, &[link, b"dir"]).unwrap(), 1);
        c.at(1, &[link]).unwrap();
        // The link's fid is not a directory: nothing can be created "in" it.
        assert_eq!(
            c.lcreate(1, b"pwned", O_RDWR, 0o644),
            Err(libc::ENOTDIR as u32)
        );
        assert_eq!(c.mkdir(1, b"pwned", 0o755), Err(libc::ENOTDIR as u32));
        assert_eq!(c.symlink(1, b"pwned", b"x"), Err(libc::ENOTDIR as u32));
        assert_eq!(c.unlinkat(1, b"secret", 0), Err(libc::ENOTDIR as u32));
        assert_eq!(
            c.renameat(1, b"secret", 0, b"stolen"),
            Err(libc::ENOTDIR as u32)
        );
        assert_eq!(c.lopen(1, O_WRONLY), Err(libc::ELOOP as u32));
        // setattr changes the link itself or is refused, never the target.
        assert_eq!(
            c.setattr(1, 1, 0o777, 0, (0, 0), (0, 0)),
            Err(libc::EOPNOTSUPP as u32)
        );
        assert_eq!(
            c.setattr(1, 1 << 3, 0, 0, (0, 0), (0, 0)),
            Err(libc::EINVAL as u32)
        );
        c.setattr(1, (1 << 5) | (1 << 8), 0, 0, (0, 0), (42, 0))
            .unwrap();
        let md = std::fs::symlink_metadata(share.join(std::str::from_utf8(link).unwrap())).unwrap();
        assert_eq!(md.mtime(), 42, "the link's own mtime");
        c.clunk(1);
    }
    // A file symlink: opening it for writing or truncating it reaches nothing.
    c.at(2, &[b"secretlink"]).unwrap();
    assert_eq!(c.lopen(2, O_WRONLY | O_TRUNC), Err(libc::ELOOP as u32));
    assert_eq!(
        c.setattr(2, 1 << 3, 0, 0, (0, 0), (0, 0)),
        Err(libc::EINVAL as u32)
    );
    // Creating over the link's name does not follow it.
    c.at(3, &[]).unwrap();
    assert_eq!(
        c.lcreate(3, b"secretlink", O_WRONLY | O_TRUNC, 0o644),
        Err(libc::ELOOP as u32)
    );
    assert_eq!(c.mkdir(0, b"up", 0o755), Err(libc::EEXIST as u32));
    // A hard link of the link is a link, not the target (which is outside the share).
    c.call(TLINK, B::default().u32(0).u32(2).s(b"hardlink"))
        .unwrap();
    let md = std::fs::symlink_metadata(share.join("hardlink")).unwrap();
    assert!(md.file_type().is_symlink());
    assert_eq!(
        md.ino(),
        std::fs::symlink_metadata(share.join("secretlink"))
            .unwrap()
            .ino()
    );
    // New links are stored as given and never resolved here.
    c.symlink(0, b"slash", b"/").unwrap();
    c.symlink(0, b"dotdot", b"../outside/secret").unwrap();
    assert_eq!(
        std::fs::read_link(share.join("slash")).unwrap(),
        Path::new("/")
    );
    assert_eq!(c.walk(0, 4, &[b"slash", b"etc"]).unwrap(), 1);
    c.at(4, &[b"dotdot"]).unwrap();
    assert_eq!(c.lopen(4, O_RDWR), Err(libc::ELOOP as u32));
    // ".." from the root stays at the root; from a link, it is the link's directory.
    c.at(5, &[b"..", b"..", b"outside"]).unwrap_err();
    c.at(6, &[b"up", b".."]).unwrap();
    c.lcreate(6, b"here", O_RDWR, 0o644).unwrap();
    assert!(share.join("here").exists());
    // Renaming a link moves the link.
    c.renameat(0, b"up", 0, b"up2").unwrap();
    assert!(std::fs::symlink_metadata(share.join("up2"))
        .unwrap()
        .file_type()
        .is_symlink());

    assert_eq!(snapshot(&outside), before);
    assert!(!root.path().join("pwned").exists());
    assert_eq!(c.s.stats().malformed, 0);
}

#[test]
fn rw_share_names_must_be_one_plain_component() {
    let (root, share, outside) = layout();
    let before = snapshot(root.path());
    let mut c = C::new(&share, false);
    c.at(1, &[b"sub"]).unwrap();
    let bad: [&[u8]; 8] = [
        b"",
        b".",
        b"..",
        b"a/b",
        b"/etc",
        b"../outside",
        b"x\0y",
        b"sub/",
    ];
    let einval = Err(libc::EINVAL as u32);
    for name in bad {
        c.clunk(2);
        c.at(2, &[b"sub"]).unwrap();
        assert_eq!(
            c.lcreate(2, name, O_RDWR, 0o644).map(drop),
            einval,
            "{name:?}"
        );
        assert_eq!(c.mkdir(1, name, 0o755).map(drop), einval);
        assert_eq!(c.unlinkat(1, name, 0).map(drop), einval);
        assert_eq!(c.unlinkat(1, name, 0x200).map(drop), einval);
        assert_eq!(c.renameat(1, name, 1, b"ok").map(drop), einval);
        assert_eq!(c.renameat(0, b"sub", 1, name).map(drop), einval);
        assert_eq!(c.symlink(1, name, b"t").map(drop), einval);
        let mknod = B::default()
            .u32(1)
            .s(name)
            .u32(libc::S_IFREG | 0o644)
            .u32(0)
            .u32(0)
            .u32(0);
        assert_eq!(c.call(TMKNOD, mknod).map(drop), einval);
        c.at(3, &[b"sub", b"file"]).unwrap();
        assert_eq!(
            c.call(TLINK, B::default().u32(1).u32(3).s(name)).map(drop),
            einval
        );
        assert_eq!(
            c.call(TRENAME, B::default().u32(3).u32(1).s(name))
                .map(drop),
            einval
        );
        c.clunk(3);
    }
    // A symlink target may hold anything but NUL.
    assert_eq!(c.symlink(1, b"l", b"a\0b").map(drop), einval);
    assert_eq!(snapshot(root.path()), before);
    drop(outside);
    let st = c.s.stats();
    assert_eq!(
        st.malformed, 0,
        "bad names are errors, not malformed messages"
    );
    assert_eq!(st.mutations, 0);
}

#[test]
fn rw_share_lying_counts_are_malformed() {
    let (_root, share, _) = layout();
    let mut c = C::new(&share, false);
    c.at(1, &[]).unwrap();
    c.lcreate(1, b"f", O_RDWR, 0o644).unwrap();
    // Twrite claims more data than the message carries.
    let body = B::default().u32(1).u64(0).u32(100).raw(b"short");
    assert_eq!(c.call(TWRITE, body), Err(libc::EINVAL as u32));
    assert_eq!(c.s.stats().malformed, 1);
    // Twrite claims more than msize allows (even with the bytes there).
    let big = vec![7u8; 70_000];
    let body = B::default().u32(1).u64(0).u32(big.len() as u32).raw(&big);
    assert_eq!(c.call(TWRITE, body), Err(libc::EINVAL as u32));
    assert_eq!(c.s.stats().malformed, 2);
    // A name longer than the message.
    let body = B::default().u32(0).raw(&50u16.to_le_bytes()).raw(b"abc");
    assert_eq!(c.call(TMKDIR, body), Err(libc::EINVAL as u32));
    assert_eq!(c.s.stats().malformed, 3);
    // Truncated setattr.
    assert_eq!(
        c.call(TSETATTR, B::default().u32(1).u32(8).u32(0)),
        Err(libc::EINVAL as u32)
    );
    assert_eq!(c.s.stats().malformed, 4);
    assert_eq!(std::fs::read(share.join("f")).unwrap(), b"");
    // And the server still serves.
    assert_eq!(c.write(1, 0, b"ok").unwrap(), 2);
}

#[test]
fn ro_share_still_refuses_every_mutation() {
    let (root, share, _) = layout();
    let before = snapshot(root.path());
    let mut c = C::new(&share, true);
    c.at(1, &[b"sub", b"file"]).unwrap();
    c.at(2, &[b"sub"]).unwrap();
    let erofs = Err(libc::EROFS as u32);
    let mutations: Vec<(u8, B)> = vec![
        (
            TLCREATE,
            B::default().u32(2).s(b"n").u32(O_RDWR).u32(0o644).u32(0),
        ),
        (TSYMLINK, B::default().u32(2).s(b"n").s(b"t").u32(0)),
        (
            TMKNOD,
            B::default()
                .u32(2)
                .s(b"n")
                .u32(libc::S_IFREG)
                .u32(0)
                .u32(0)
                .u32(0),
        ),
        (TRENAME, B::default().u32(1).u32(2).s(b"n")),
        (TSETATTR, B::default().u32(1).u32(8).raw(&[0u8; 52])),
        (TXATTRCREATE, B::default().u32(1).s(b"user.x").u64(1).u32(0)),
        (TLINK, B::default().u32(2).u32(1).s(b"n")),
        (TMKDIR, B::default().u32(2).s(b"n").u32(0o755).u32(0)),
        (TRENAMEAT, B::default().u32(2).s(b"file").u32(2).s(b"n")),
        (TUNLINKAT, B::default().u32(2).s(b"file").u32(0)),
        (TWRITE, B::default().u32(1).u64(0).u32(1).raw(b"x")),
        (TREMOVE, B::default().u32(1)),
    ];
    let n = mutations.len() as u64;
    for (kind, body) in mutations {
        assert_eq!(c.call(kind, body).map(drop), erofs, "type {kind}");
    }
    for flags in [O_WRONLY, O_RDWR, O_TRUNC, 0o100] {
        assert_eq!(c.lopen(1, flags).map(drop), erofs);
    }
    // As before: fsync, locks and xattrs are not served on the store.
    let eopnotsupp = Err(libc::EOPNOTSUPP as u32);
    assert_eq!(
        c.call(TFSYNC, B::default().u32(1).u32(0)).map(drop),
        eopnotsupp
    );
    assert_eq!(
        c.call(TXATTRWALK, B::default().u32(1).u32(9).s(b""))
            .map(drop),
        eopnotsupp
    );
    c.lopen(1, O_RDONLY).unwrap();
    assert_eq!(c.read(1, 0, 100).unwrap(), b"inside");
    let st = c.s.stats();
    assert_eq!(st.refused_writes, n + 4);
    assert_eq!((st.mutations, st.bytes_written, st.malformed), (0, 0, 0));
    assert_eq!(snapshot(root.path()), before);
}

/// The fields of each request (f fid, n name, d u32, q u64, b u8, w walk names,
/// D count and data, t tag).
fn layout_of(kind: u8) -> &'static str {
    match kind {
        TVERSION => "dn",
        TATTACH => "ffnnd",
        TWALK => "ffw",
        TLOPEN => "fd",
        TLCREATE => "fnddd",
        TSYMLINK => "fnnd",
        TMKNOD => "fndddd",
        TRENAME => "ffn",
        TREADLINK | TCLUNK | TREMOVE | TSTATFS => "f",
        TGETATTR => "fq",
        TSETATTR => "fddddqqqqq",
        TXATTRWALK => "ffn",
        TXATTRCREATE => "fnqd",
        TREADDIR | TREAD => "fqd",
        TFSYNC => "fd",
        TLOCK => "fbdqqdn",
        TGETLOCK => "fbqqdn",
        TLINK => "ffn",
        TMKDIR => "fndd",
        TRENAMEAT => "fnfn",
        TUNLINKAT => "fnd",
        TWRITE => "fqD",
        _ => "t",
    }
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

#[test]
fn rw_share_survives_random_and_truncated_messages() {
    let (root, share, outside) = layout();
    let parent = root.path().to_path_buf();
    let outside_before = snapshot(&outside);
    let names_before: Vec<_> = std::fs::read_dir(&parent)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let mut c = C::new(&share, false);
    let token = format!("vmbuild-fuzz-{}", std::process::id());
    let names: Vec<Vec<u8>> = [
        "up",
        "abs",
        "secretlink",
        "sub",
        "file",
        "secret",
        "dir",
        "..",
        ".",
        "",
        "a/b",
        "/tmp",
        "f",
        "g",
        "d",
        "x\0",
        &token,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let kinds = [
        TVERSION,
        TATTACH,
        TWALK,
        TLOPEN,
        TLCREATE,
        TSYMLINK,
        TMKNOD,
        TRENAME,
        TREADLINK,
        TGETATTR,
        TSETATTR,
        TXATTRWALK,
        TXATTRCREATE,
        TREADDIR,
        TFSYNC,
        TLOCK,
        TGETLOCK,
        TLINK,
        TMKDIR,
        TRENAMEAT,
        TUNLINKAT,
        TREAD,
        TWRITE,
        TCLUNK,
        TREMOVE,
        TSTATFS,
        TFLUSH,
        0,
        255,
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for i in 0..30_000u32 {
        // Keep a root fid and a few walked fids around, so that requests reach the host.
        if i % 10 == 0 {
            for fid in 0..8 {
                c.clunk(fid);
            }
            let _ = c.s.handle(&msg(
                TATTACH,
                1,
                &B::default().u32(0).u32(NOFID).s(b"").s(b"").u32(0).0,
            ));
            for (fid, path) in [(1u32, &b"sub"[..]), (2, b"up"), (3, b"abs"), (4, b"n1")] {
                let _ = c.walk(0, fid, &[path]);
            }
            // And one file open for writing.
            let _ = c.walk(0, 5, &[]);
            let _ = c.lcreate(5, b"n2", O_RDWR, 0o644);
        }
        let kind = *rng.pick(&kinds);
        let b = if rng.below(3) == 0 {
            // Fields of plausible shapes in a random order and number.
            let mut b = B::default();
            for _ in 0..rng.below(8) {
                b = match rng.below(6) {
                    0 => b.u32(rng.below(8) as u32),
                    1 => b.s(&rng.pick(&names).clone()),
                    2 => b.u32(rng.next() as u32),
                    3 => b.u64(rng.next()),
                    4 => b.u8(rng.next() as u8),
                    _ => b.raw(&vec![rng.next() as u8; rng.below(64) as usize]),
                };
            }
            b
        } else {
            // The request's own layout, with values of every kind.
            let mut b = B::default();
            for field in layout_of(kind).chars() {
                b = match field {
                    'f' => b.u32(rng.below(7) as u32),
                    'n' if rng.below(2) == 0 => b.s(format!("n{}", rng.below(12)).as_bytes()),
                    'n' => b.s(&rng.pick(&names).clone()),
                    'd' => b.u32(match rng.below(4) {
                        0 => rng.next() as u32,
                        1 => *rng.pick(&[
                            0,
                            1,
                            2,
                            0o1002,
                            0o2001,
                            0o301,
                            0x200,
                            0o644,
                            0o4755,
                            libc::S_IFIFO | 0o600,
                            libc::S_IFREG | 0o644,
                            libc::S_IFCHR | 0o600,
                            0x1ff,
                        ]),
                        _ => rng.below(16) as u32,
                    }),
                    'q' => b.u64(match rng.below(3) {
                        0 => rng.below(1 << 16),
                        1 => rng.next(),
                        _ => 0,
                    }),
                    'b' => b.u8(rng.below(4) as u8),
                    'w' => {
                        let n = rng.below(5) as u16;
                        let mut b = b.raw(&n.to_le_bytes());
                        for _ in 0..n {
                            b = b.s(&rng.pick(&names).clone());
                        }
                        b
                    }
                    'D' => {
                        let n = rng.below(5000) as usize;
                        b.u32(n as u32).raw(&vec![b'z'; n])
                    }
                    _ => b.raw(&(rng.next() as u16).to_le_bytes()),
                };
            }
            b
        };
        let mut m = msg(kind, i as u16, &b.0);
        match rng.below(8) {
            // Truncated, with the size field left lying.
            0 => m.truncate(rng.below(m.len() as u64 + 1) as usize),
            // Size field rewritten at random.
            1 => {
                let n = rng.below(m.len() as u64 + 16) as u32;
                if m.len() >= 4 {
                    m[..4].copy_from_slice(&n.to_le_bytes());
                }
            }
            _ => {}
        }
        let reply = c.s.handle(&m);
        if let Some(r) = reply {
            assert!(r.len() >= HEADER);
            assert_eq!(
                u32::from_le_bytes(r[..4].try_into().unwrap()) as usize,
                r.len()
            );
        }
    }
    // Random well-formed requests made it through to the host too (not all were errors).
    let st = c.s.stats();
    assert!(
        st.malformed > 1000 && st.mutations > 300 && st.bytes_written > 0,
        "{st:?}"
    );
    assert_eq!(snapshot(&outside), outside_before);
    let names_after: Vec<_> = std::fs::read_dir(&parent)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names_after, names_before);
    for dir in ["/", "/tmp", "/etc"] {
        assert!(!Path::new(dir).join(&token).exists());
    }
    // Still serving.
    let mut c2 = C::new(&share, false);
    c2.at(1, &[]).unwrap();
    c2.lcreate(1, b"after-fuzz", O_RDWR, 0o644).unwrap();
    assert!(share.join("after-fuzz").exists());
}

/// A session restored into a server over another directory (a VM restored from one
/// snapshot with an xchg of its own): the mount's root fid reaches the new directory,
/// while a fid of a file below it, which is not the same file there, is lost.
#[test]
fn a_saved_root_binds_to_the_share_it_is_restored_into() {
    let (_root, share, _outside) = layout();
    let mut c = C::new(&share, false);
    c.at(1, &[]).unwrap();
    std::fs::write(share.join("f"), "old").unwrap();
    c.at(2, &[b"f"]).unwrap();
    let saved = c.s.save_state();
    drop(c);
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("f"), "a copy").unwrap();
    std::fs::write(other.path().join("go"), "").unwrap();
    let mut d = C {
        s: NinepServer::new(&ShareConfig::xchg(other.path())).unwrap(),
        tag: 0,
    };
    let report = d.s.restore_state(&saved);
    let lost: Vec<u32> = report.lost.iter().map(|(f, _)| *f).collect();
    assert_eq!(lost, [2], "{report:?}");
    assert_eq!(d.walk(1, 3, &[b"go"]).unwrap(), 1, "the new share's file");
    assert_eq!(d.walk(0, 4, &[b"f"]).unwrap(), 1);
    assert_eq!(d.walk(2, 5, &[]), Err(libc::EBADF as u32));
}

/// A session saved from one server and restored into another (a VM snapshot and its
/// restore): open files read and write on, walked fids walk on, a fid whose file is gone
/// or was replaced is lost rather than bound to another file, and a forged saved path
/// cannot reach outside the share.
#[test]
fn a_saved_session_restores_into_a_new_server() {
    let (_root, share, outside) = layout();
    let before_outside = snapshot(&outside);
    let mut c = C::new(&share, false);
    c.at(1, &[]).unwrap();
    c.lcreate(1, b"a", O_RDWR, 0o644).unwrap();
    assert_eq!(c.write(1, 0, b"hello").unwrap(), 5);
    c.at(2, &[b"sub"]).unwrap();
    c.lopen(2, O_RDONLY).unwrap();
    c.at(3, &[b"sub", b"file"]).unwrap();
    std::fs::write(share.join("gone"), "x").unwrap();
    c.at(4, &[b"gone"]).unwrap();
    c.lopen(4, O_RDONLY).unwrap();
    std::fs::write(share.join("swapped"), "old").unwrap();
    c.at(5, &[b"swapped"]).unwrap();
    let saved = c.s.save_state();
    assert_eq!(saved.msize, 65536);
    assert_eq!(
        saved.fids.iter().map(|f| f.fid).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4, 5]
    );
    drop(c);
    std::fs::remove_file(share.join("gone")).unwrap();
    std::fs::write(share.join("other"), "new").unwrap();
    std::fs::rename(share.join("other"), share.join("swapped")).unwrap();

    let mut d = C {
        s: NinepServer::new(&ShareConfig::xchg(&share)).unwrap(),
        tag: 0,
    };
    let report = d.s.restore_state(&saved);
    assert_eq!(report.restored, 4, "{report:?}");
    let lost: Vec<u32> = report.lost.iter().map(|(f, _)| *f).collect();
    assert_eq!(lost, [4, 5], "{report:?}");
    assert_eq!(d.s.msize(), 65536);
    // The open file carries on where it was, for reading and writing.
    assert_eq!(d.read(1, 0, 100).unwrap(), b"hello");
    assert_eq!(d.write(1, 5, b" again").unwrap(), 6);
    assert_eq!(std::fs::read(share.join("a")).unwrap(), b"hello again");
    // The open directory lists, the walked fid walks on (here: `..` from sub/file).
    assert!(d
        .call(TREADDIR, B::default().u32(2).u64(0).u32(4096))
        .is_ok());
    assert_eq!(d.walk(3, 6, &[b".."]).unwrap(), 1);
    assert_eq!(d.walk(0, 7, &[b"sub", b"file"]).unwrap(), 2);
    // Lost fids are unknown, not somebody else's file.
    assert_eq!(d.read(4, 0, 10), Err(libc::EBADF as u32));
    assert_eq!(d.walk(5, 8, &[]), Err(libc::EBADF as u32));

    // Forged states: paths with separators, dots, or through a symlink out of the share.
    let forged = |path: &[&[u8]]| NinepState {
        msize: 8192,
        fids: vec![SavedFid {
            fid: 9,
            path: path.iter().map(|c| c.to_vec()).collect(),
            dev: 0,
            ino: 0,
            open: Some(SavedOpen::File {
                flags: libc::O_RDWR,
                write: true,
            }),
        }],
    };
    for path in [
        &[&b".."[..]][..],
        &[b"sub/../.."],
        &[b"up", b"secret"],
        &[b"abs", b"dir"],
        &[b"secretlink"],
        &[b""],
    ] {
        let report = d.s.restore_state(&forged(path));
        assert_eq!(report.restored, 0, "{path:?}: {report:?}");
        assert_eq!(d.write(9, 0, b"pwned"), Err(libc::EBADF as u32));
    }
    // A fid saved as not writing is never opened for writing, whatever its flags say.
    let sneaky = NinepState {
        msize: 8192,
        fids: vec![SavedFid {
            fid: 10,
            path: vec![b"a".to_vec()],
            dev: std::fs::metadata(share.join("a")).unwrap().dev(),
            ino: std::fs::metadata(share.join("a")).unwrap().ino(),
            open: Some(SavedOpen::File {
                flags: libc::O_RDWR | libc::O_APPEND,
                write: false,
            }),
        }],
    };
    assert_eq!(d.s.restore_state(&sneaky).restored, 1);
    {
        let fids = d.s.fids.lock().unwrap();
        let Some(Open::File { file, .. }) = &fids[&10].open else {
            panic!("fid 10 is not an open file");
        };
        // SAFETY: F_GETFL on the descriptor the server holds.
        let fl = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(file), libc::F_GETFL) };
        assert_eq!(fl & libc::O_ACCMODE, libc::O_RDONLY);
    }
    assert_eq!(d.write(10, 0, b"x"), Err(libc::EBADF as u32));
    assert_eq!(snapshot(&outside), before_outside);
}
