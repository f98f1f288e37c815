//! virtiofs-bridge's 9P2000.L server against the real client: the guest kit's Linux
//! kernel (QEMU, TCG) mounts a share over 9p with `trans=tcp`, reaching this test's
//! server through QEMU's user-mode network: the store, which it reads as a file system,
//! and an `xchg`, which busybox's tools write. The test's control directory is QEMU's own
//! 9p share (`-virtfs`).

use std::net::TcpListener;
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
    // The guest resolves the link itself, inside its own mount: /mnt/secret is nothing.
    assert_eq!(read("escape"), "refused\n");
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
for p in /mnt/x/up{host_root}/pwned /mnt/x/out/pwned /mnt/x/abs/pwned /mnt/x/abs/outside/secret; do
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
    let escape = read("escape");
    assert_eq!(escape.lines().count(), 4, "{escape}");
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
