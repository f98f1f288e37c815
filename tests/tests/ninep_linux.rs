//! virtiofs-bridge's 9P2000.L server against the real client: the guest kit's Linux
//! kernel (QEMU, TCG) mounts a share over 9p with `trans=tcp`, reaching this test's
//! server through QEMU's user-mode network: the store, which it reads as a file system,
//! and an `xchg`, which busybox's tools write. The test's control directory is QEMU's own
//! 9p share (`-virtfs`). The escapes the guest's kernel resolves itself (`..`, names with
//! '/', opening a symlink) never reach the server from the guest: a raw 9P2000.L client on
//! the same TCP transport sends them.

use std::net::TcpListener;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use virtiofs_bridge::ninep::{self, NinepServer};
use virtiofs_bridge::ShareConfig;
use vmbuild_tests::guest::{GuestKit, GuestShare, GuestVm};

#[test]
fn linux_reads_the_store_over_9p_from_our_server() {
    let root = tempfile::tempdir().unwrap();
    let store = root.path().join("store");
    std::fs::create_dir_all(store.join("pkg/sub")).unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(store.join("pkg/data"), "served by vmbuild\n").unwrap();
    std::fs::write(store.join("pkg/sub/big"), &big).unwrap();
    std::fs::write(root.path().join("secret"), "outside").unwrap();
    std::os::unix::fs::symlink("../secret", store.join("escape")).unwrap();

    let server = Arc::new(NinepServer::new(&ShareConfig::store(&store)).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    ninep::serve_tcp(listener, server.clone());

    let ctl = tempfile::tempdir().unwrap();
    std::fs::write(
        ctl.path().join("run.sh"),
        format!(
            r#"set -e
modprobe 9pnet_fd 2>/dev/null || insmod $(awk '$1=="9pnet_fd"{{print $2}}' /etc/vmbuild/modules)
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
mkdir -p /mnt/s
mount -t 9p -o trans=tcp,port={port},version=9p2000.L,msize=65536 10.0.2.2 /mnt/s
cat /mnt/s/pkg/data > /ctl/data
sha256sum /mnt/s/pkg/sub/big | cut -d' ' -f1 > /ctl/big
ls -a /mnt/s > /ctl/ls
readlink /mnt/s/escape > /ctl/link
if cat /mnt/s/escape > /ctl/escaped 2>/dev/null; then echo followed > /ctl/escape; else echo refused > /ctl/escape; fi
if touch /mnt/s/new 2>/dev/null; then echo written > /ctl/write; else echo refused > /ctl/write; fi
umount /mnt/s
"#
        ),
    )
    .unwrap();
    run_script_in_guest(ctl.path(), 180);
    let read = |name: &str| std::fs::read_to_string(ctl.path().join(name)).unwrap_or_default();
    assert_eq!(read("data"), "served by vmbuild\n");
    let host_sum = {
        let o = std::process::Command::new("sha256sum")
            .arg(store.join("pkg/sub/big"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .split(' ')
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(read("big").trim(), host_sum, "300 KB read over 9p differs");
    let ls = read("ls");
    for name in [".", "..", "escape", "pkg"] {
        assert!(ls.lines().any(|l| l == name), "{name} missing from {ls}");
    }
    assert_eq!(read("link"), "../secret\n");
    // The server answers the link as a link (its walk and Treadlink); the guest resolves
    // "../secret" itself, inside its own mount, where /mnt/secret is nothing. A server
    // that followed the link on the host would have served the host's ../secret.
    assert_eq!(read("escape"), "refused\n");
    assert_eq!(read("escaped"), "", "read through the link");
    assert_eq!(read("write"), "refused\n");
    assert!(!store.join("new").exists());
    assert!(server.stats().requests > 10);
}

fn sha256(path: &Path) -> String {
    let o = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split(' ')
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn linux_writes_xchg_over_9p_to_our_server() {
    let root = tempfile::tempdir().unwrap();
    let xchg = root.path().join("xchg");
    let outside = root.path().join("outside");
    std::fs::create_dir_all(&xchg).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), "outside").unwrap();
    std::fs::write(xchg.join("from-host"), "host wrote this\n").unwrap();

    // One server per mount: a server is one 9p session (one fid table), and each mount
    // is a session of its own.
    let serve = || {
        let server = Arc::new(NinepServer::new(&ShareConfig::xchg(&xchg)).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        ninep::serve_tcp(listener, server.clone());
        (server, port)
    };
    let (server, port) = serve();
    let (server_loose, port_loose) = serve();

    let ctl = tempfile::tempdir().unwrap();
    let host_root = root.path().display();
    let escapes = [
        format!("/mnt/x/up{host_root}/pwned"),
        "/mnt/x/out/pwned".to_owned(),
        "/mnt/x/abs/pwned".to_owned(),
        "/mnt/x/abs/outside/secret".to_owned(),
    ];
    let escape_paths = escapes.join(" ");
    std::fs::write(
        ctl.path().join("run.sh"),
        format!(
            r#"set -e
modprobe 9pnet_fd 2>/dev/null || insmod $(awk '$1=="9pnet_fd"{{print $2}}' /etc/vmbuild/modules)
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
mkdir -p /mnt/x /mnt/l
opts=trans=tcp,version=9p2000.L,msize=131072
mount -t 9p -o $opts,port={port} 10.0.2.2 /mnt/x
mount -t 9p -o $opts,port={port_loose},cache=loose 10.0.2.2 /mnt/l
cat /mnt/x/from-host > /ctl/from-host
# 1 MiB through dd, checked on the host.
dd if=/dev/urandom of=/tmp/src bs=64k count=16 2>/dev/null
dd if=/tmp/src of=/mnt/x/big bs=64k 2>/dev/null
sha256sum /tmp/src | cut -d' ' -f1 > /ctl/big
echo hello from the guest > /mnt/x/small
mkdir -p /mnt/x/a/b/c
echo moved > /mnt/x/a/b/c/before
mv /mnt/x/a/b/c/before /mnt/x/a/after
echo doomed > /mnt/x/doomed
rm /mnt/x/doomed
mkdir -p /mnt/x/tree/u/v
echo 1 > /mnt/x/tree/u/v/f1
echo 2 > /mnt/x/tree/u/f2
rm -r /mnt/x/tree
cp /mnt/x/small /mnt/x/a/copy
echo appended >> /mnt/x/a/copy
touch -d "2001-02-03 04:05:06" /mnt/x/small
ln -s target-name /mnt/x/link
readlink /mnt/x/link > /ctl/link
mkfifo /mnt/x/fifo
if mknod /mnt/x/dev c 1 3 2>/dev/null; then echo made > /ctl/mknod; else echo refused > /ctl/mknod; fi
ls -la /mnt/x > /ctl/ls
# Escapes: the guest resolves its own symlinks, inside its own file system.
ln -s / /mnt/x/up
ln -s ../outside /mnt/x/out
ln -s {host_root} /mnt/x/abs
for p in {escape_paths}; do
  if (echo pwned > $p) 2>/dev/null; then echo "wrote $p" >> /ctl/escape; else echo "refused $p" >> /ctl/escape; fi
done
# cache=loose (page cache, writeback), then read back through the uncached mount.
dd if=/tmp/src of=/mnt/l/big2 bs=64k 2>/dev/null
echo loose > /mnt/l/l1
mkdir -p /mnt/l/ld/sub
mv /mnt/l/l1 /mnt/l/ld/sub/l1
sync
cat /mnt/x/ld/sub/l1 > /ctl/l1
sha256sum /mnt/x/big2 | cut -d' ' -f1 > /ctl/big2
umount /mnt/l
umount /mnt/x
"#
        ),
    )
    .unwrap();
    run_script_in_guest(ctl.path(), 240);
    let read = |name: &str| std::fs::read_to_string(ctl.path().join(name)).unwrap_or_default();
    assert_eq!(read("from-host"), "host wrote this\n");
    let big = xchg.join("big");
    assert_eq!(std::fs::metadata(&big).unwrap().len(), 1 << 20);
    assert_eq!(
        read("big").trim(),
        sha256(&big),
        "1 MiB written over 9p differs"
    );
    assert_eq!(
        std::fs::read_to_string(xchg.join("small")).unwrap(),
        "hello from the guest\n"
    );
    assert!(xchg.join("a/b/c").is_dir());
    assert!(!xchg.join("a/b/c/before").exists());
    assert_eq!(
        std::fs::read_to_string(xchg.join("a/after")).unwrap(),
        "moved\n"
    );
    assert!(!xchg.join("doomed").exists());
    assert!(!xchg.join("tree").exists(), "rm -r left the tree");
    assert_eq!(
        std::fs::read_to_string(xchg.join("a/copy")).unwrap(),
        "hello from the guest\nappended\n"
    );
    assert_eq!(
        std::fs::metadata(xchg.join("small")).unwrap().mtime(),
        981_173_106,
        "touch -d 2001-02-03 04:05:06 (UTC)"
    );
    let link = std::fs::symlink_metadata(xchg.join("link")).unwrap();
    assert!(link.file_type().is_symlink());
    assert_eq!(
        std::fs::read_link(xchg.join("link")).unwrap(),
        Path::new("target-name")
    );
    assert_eq!(read("link"), "target-name\n");
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &std::fs::symlink_metadata(xchg.join("fifo"))
            .unwrap()
            .file_type()
    ));
    assert_eq!(read("mknod"), "refused\n", "device nodes are refused");
    assert!(!xchg.join("dev").exists());
    for l in ["up", "out", "abs"] {
        assert!(std::fs::symlink_metadata(xchg.join(l))
            .unwrap()
            .file_type()
            .is_symlink());
    }
    // Each escape was refused. What reaches the server here is a walk of the link's name
    // (answered "a symlink") and a Treadlink: the guest's kernel then resolves the target
    // in its own namespace, where none of these paths exist. So these lines show that the
    // server hands a link to the guest as a link; a server that followed it on the host
    // would give the guest the host's directory, and the writes would go through. The
    // `..`s, '/'-names and opens of links that the kernel never sends are sent raw in
    // `escapes_sent_as_raw_9p_are_refused_by_our_server`.
    let escape = read("escape");
    let refused: Vec<String> = escapes.iter().map(|p| format!("refused {p}")).collect();
    assert_eq!(escape.lines().collect::<Vec<_>>(), refused, "{escape}");
    // Nothing outside the share changed, whatever the guest's shell managed locally.
    assert!(!root.path().join("pwned").exists());
    assert!(!outside.join("pwned").exists());
    assert_eq!(
        std::fs::read_to_string(outside.join("secret")).unwrap(),
        "outside"
    );
    let mut names: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["outside", "xchg"]);
    // cache=loose: written back before the guest's sync returned.
    assert_eq!(read("l1"), "loose\n");
    assert_eq!(
        std::fs::read_to_string(xchg.join("ld/sub/l1")).unwrap(),
        "loose\n"
    );
    assert_eq!(read("big2").trim(), read("big").trim());
    assert_eq!(sha256(&xchg.join("big2")), read("big").trim());
    let st = server.stats();
    assert_eq!((st.malformed, st.refused_writes), (0, 0), "{st:?}");
    assert!(st.mutations > 20 && st.bytes_written >= 1 << 20, "{st:?}");
    let st = server_loose.stats();
    assert_eq!((st.malformed, st.refused_writes), (0, 0), "{st:?}");
    assert!(st.mutations >= 4 && st.bytes_written >= 1 << 20, "{st:?}");
}

/// Boots the guest kit on QEMU's user network with `ctl` (holding `run.sh`) mounted at
/// /ctl, runs the script, and requires it to succeed within `seconds`.
fn run_script_in_guest(ctl: &std::path::Path, seconds: u64) {
    let kit = GuestKit::locate().expect("guest kit");
    let mut vm = GuestVm::new(kit, "/ctl/run.sh").share(GuestShare::NineP {
        dir: ctl.to_owned(),
        tag: "ctl".into(),
        mount: "/ctl".into(),
        options: String::new(),
    });
    vm.user_net = true;
    vm.exit_file = Some("/ctl/status".into());
    vm.timeout = std::time::Duration::from_secs(seconds);
    let out = vm.run().unwrap();
    assert_eq!(
        out.exit,
        Some(0),
        "guest failed:\n{}",
        vmbuild_tests::guest::tail(&out.console, 30)
    );
}

// 9P2000.L message types the raw client below sends.
const RLERROR: u8 = 7;
const TLOPEN: u8 = 12;
const TLCREATE: u8 = 14;
const TSYMLINK: u8 = 16;
const TREADLINK: u8 = 22;
const TGETATTR: u8 = 24;
const TMKDIR: u8 = 72;
const TRENAMEAT: u8 = 74;
const TVERSION: u8 = 100;
const TATTACH: u8 = 104;
const TWALK: u8 = 110;
const TCLUNK: u8 = 120;
const QTSYMLINK: u8 = 0x02;
const P9_RDONLY: u32 = 0;
const P9_WRONLY: u32 = 1;
const P9_RDWR: u32 = 2;
const P9_TRUNC: u32 = 0o1000;

/// A 9P2000.L message body being built.
#[derive(Default)]
struct Body(Vec<u8>);

impl Body {
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
}

/// A qid: type, version, path.
type Qid = (u8, u32, u64);

fn qid(q: &[u8]) -> Qid {
    (
        q[0],
        u32::from_le_bytes(q[1..5].try_into().unwrap()),
        u64::from_le_bytes(q[5..13].try_into().unwrap()),
    )
}

/// The qids of an Rwalk.
fn qids(b: &[u8]) -> Vec<Qid> {
    let n = u16::from_le_bytes([b[0], b[1]]) as usize;
    assert_eq!(b.len(), 2 + 13 * n, "Rwalk of {n} qids");
    b[2..].chunks(13).map(qid).collect()
}

/// A 9P client on a TCP connection to [`ninep::serve_tcp`] — the transport the guests
/// above use — that sends what the Linux client never does: walks of "..", names holding
/// '/', opens of symlinks. Fid 0 is the share's root.
struct Raw9p {
    conn: std::net::TcpStream,
    tag: u16,
    root: Qid,
}

impl Raw9p {
    fn connect(port: u16) -> Raw9p {
        let conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut c = Raw9p {
            conn,
            tag: 0,
            root: (0, 0, 0),
        };
        let v = c
            .call(TVERSION, Body::default().u32(65536).s(b"9P2000.L"))
            .unwrap();
        assert_eq!(&v[6..], b"9P2000.L");
        let a = c
            .call(
                TATTACH,
                Body::default()
                    .u32(0)
                    .u32(u32::MAX)
                    .s(b"root")
                    .s(b"")
                    .u32(0),
            )
            .unwrap();
        c.root = qid(&a);
        c
    }

    /// One request, one reply: the reply's body, or the errno of an Rlerror.
    fn call(&mut self, kind: u8, body: Body) -> Result<Vec<u8>, i32> {
        use std::io::{Read, Write};
        self.tag = self.tag.wrapping_add(1);
        let mut m = ((7 + body.0.len()) as u32).to_le_bytes().to_vec();
        m.push(kind);
        m.extend_from_slice(&self.tag.to_le_bytes());
        m.extend_from_slice(&body.0);
        self.conn.write_all(&m).unwrap();
        let mut size = [0u8; 4];
        self.conn.read_exact(&mut size).unwrap();
        let mut reply = vec![0u8; u32::from_le_bytes(size) as usize - 4];
        self.conn.read_exact(&mut reply).unwrap();
        assert_eq!(u16::from_le_bytes([reply[1], reply[2]]), self.tag, "tag");
        if reply[0] == RLERROR {
            return Err(i32::from_le_bytes(reply[3..7].try_into().unwrap()));
        }
        assert_eq!(reply[0], kind + 1, "reply type");
        Ok(reply[3..].to_vec())
    }

    /// The qids of a walk from `fid` (fewer than `names` when it stopped part way, in
    /// which case `newfid` was not made).
    fn walk(&mut self, fid: u32, newfid: u32, names: &[&[u8]]) -> Result<Vec<Qid>, i32> {
        let mut b = Body::default().u32(fid).u32(newfid);
        b.0.extend_from_slice(&(names.len() as u16).to_le_bytes());
        for n in names {
            b = b.s(n);
        }
        Ok(qids(&self.call(TWALK, b)?))
    }

    fn exists(&mut self, fid: u32) -> bool {
        match self.call(TGETATTR, Body::default().u32(fid).u64(0x3fff)) {
            Ok(_) => true,
            Err(e) if e == libc::EBADF => false,
            Err(e) => panic!("Tgetattr: errno {e}"),
        }
    }

    fn lopen(&mut self, fid: u32, flags: u32) -> Result<Vec<u8>, i32> {
        self.call(TLOPEN, Body::default().u32(fid).u32(flags))
    }

    fn lcreate(&mut self, dfid: u32, name: &[u8]) -> Result<Vec<u8>, i32> {
        let b = Body::default().u32(dfid).s(name);
        self.call(TLCREATE, b.u32(P9_RDWR).u32(0o644).u32(0))
    }

    fn mkdir(&mut self, dfid: u32, name: &[u8]) -> Result<Vec<u8>, i32> {
        let b = Body::default().u32(dfid).s(name).u32(0o755).u32(0);
        self.call(TMKDIR, b)
    }
}

/// Every file under `dir` with its content (a symlink's target), `skip` left out.
fn tree(dir: &Path, skip: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p == skip {
            continue;
        }
        let md = std::fs::symlink_metadata(&p).unwrap();
        if md.is_dir() {
            out.push((p.clone(), Vec::new()));
            out.extend(tree(&p, skip));
        } else if md.file_type().is_symlink() {
            let target = std::fs::read_link(&p).unwrap();
            out.push((p, target.as_os_str().as_bytes().to_vec()));
        } else {
            let data = std::fs::read(&p).unwrap();
            out.push((p, data));
        }
    }
    out.sort();
    out
}

/// The escapes a Linux guest's kernel resolves itself (`..`, symlink targets, absolute
/// paths) sent to the server as raw 9P2000.L over TCP: each is refused with its own
/// errno, or lands inside the share, and nothing outside the share is read or written.
/// For the store (read-only) and an xchg (read-write).
#[test]
fn escapes_sent_as_raw_9p_are_refused_by_our_server() {
    for read_only in [true, false] {
        let root = tempfile::tempdir().unwrap();
        let share = root.path().join("share");
        let outside = root.path().join("outside");
        std::fs::create_dir_all(share.join("d")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), "outside").unwrap();
        std::fs::write(root.path().join("secret"), "above").unwrap();
        std::os::unix::fs::symlink("../outside", share.join("up")).unwrap();
        std::os::unix::fs::symlink(&outside, share.join("abs")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), share.join("secret-link")).unwrap();
        let before = tree(root.path(), &share);

        let config = if read_only {
            ShareConfig::store(&share)
        } else {
            ShareConfig::xchg(&share)
        };
        let server = Arc::new(NinepServer::new(&config).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        ninep::serve_tcp(listener, server.clone());
        let mut c = Raw9p::connect(port);
        let root_qid = c.root;
        let what = if read_only { "store" } else { "xchg" };

        // ".." never climbs above the share's root: from the root it is the root, and a
        // name looked up there is looked up in the share (where "secret" is not).
        assert_eq!(c.walk(0, 1, &[b".."]).unwrap(), [root_qid], "{what}");
        assert_eq!(
            c.walk(0, 2, &[b"..", b"..", b"..", b"secret"]).unwrap(),
            [root_qid; 3],
            "{what}: ../../../secret"
        );
        assert!(!c.exists(2), "{what}: a partial walk made its fid");
        let d = c.walk(0, 3, &[b"d"]).unwrap()[0];
        assert_eq!(
            c.walk(3, 4, &[b"..", b"..", b"outside"]).unwrap(),
            [root_qid; 2],
            "{what}: d/../../outside"
        );
        assert!(!c.exists(4));
        assert_ne!(d, root_qid);

        // A name is one component: '/' anywhere, "." and "" are refused as the first
        // name, and end a walk after it.
        for bad in ["../secret", "/etc", "d/../..", "d/", ".", ""] {
            let name = bad.as_bytes();
            assert_eq!(c.walk(0, 5, &[name]), Err(libc::ENOENT), "{what}: {bad:?}");
            assert_eq!(
                c.walk(0, 5, &[b"d", name]).unwrap(),
                [d],
                "{what}: d, {bad:?}"
            );
            assert!(!c.exists(5));
        }

        // Symlinks out of the share are nodes of their own: walking through one stops at
        // it, and opening one (to read or to write) is ELOOP.
        for link in ["up", "abs", "secret-link"] {
            let q = c.walk(0, 6, &[link.as_bytes()]).unwrap();
            assert_eq!(q[0].0, QTSYMLINK, "{what}: {link:?} is a symlink");
            assert_eq!(
                c.walk(0, 7, &[link.as_bytes(), b"secret"]).unwrap(),
                q,
                "{what}: walked through {link:?}"
            );
            assert!(!c.exists(7));
            assert_eq!(c.lopen(6, P9_RDONLY), Err(libc::ELOOP), "{what}: {link:?}");
            if read_only {
                assert_eq!(c.lopen(6, P9_WRONLY | P9_TRUNC), Err(libc::EROFS));
                assert_eq!(c.lcreate(6, b"pwned"), Err(libc::EROFS));
            } else {
                assert_eq!(c.lopen(6, P9_WRONLY | P9_TRUNC), Err(libc::ELOOP));
                assert_eq!(c.lcreate(6, b"pwned"), Err(libc::ENOTDIR), "{link:?}");
                assert_eq!(c.mkdir(6, b"pwned"), Err(libc::ENOTDIR), "{link:?}");
            }
            c.call(TCLUNK, Body::default().u32(6)).unwrap();
        }
        // The link's text is the guest's to read; the server never resolves it.
        c.walk(0, 8, &[b"abs"]).unwrap();
        let text = c.call(TREADLINK, Body::default().u32(8)).unwrap();
        assert_eq!(&text[2..], outside.as_os_str().as_bytes());

        // A name to create, rename to or make a link at is one plain component (on the
        // store every such request is refused before its name is looked at).
        for bad in ["..", "../pwned", "/tmp/pwned", "d/../../pwned", "."] {
            let name = bad.as_bytes();
            let refused = if read_only { libc::EROFS } else { libc::EINVAL };
            assert_eq!(c.lcreate(3, name), Err(refused), "{what}: create {bad:?}");
            assert_eq!(c.mkdir(3, name), Err(refused), "{what}: mkdir {bad:?}");
            let rename = Body::default().u32(0).s(b"d").u32(3).s(name);
            assert_eq!(
                c.call(TRENAMEAT, rename),
                Err(refused),
                "{what}: rename to {bad:?}"
            );
            let symlink = Body::default().u32(3).s(name).s(b"/").u32(0);
            assert_eq!(
                c.call(TSYMLINK, symlink),
                Err(refused),
                "{what}: symlink {bad:?}"
            );
        }

        // Nothing outside the share changed, and every refusal was an answer, not a
        // malformed message.
        assert_eq!(tree(root.path(), &share), before, "{what}");
        let st = server.stats();
        assert_eq!(st.malformed, 0, "{what}: {st:?}");
        assert_eq!(st.mutations, 0, "{what}: {st:?}");
        if read_only {
            // Per link a write-open and a create; per bad name four creations.
            assert_eq!(st.refused_writes, 3 * 2 + 5 * 4, "{what}: {st:?}");
        }
    }
}
