//! End to end: a real Linux guest (the guest kit, QEMU with TCG) mounts the store and xchg
//! served by virtiofs-bridge over vhost-user-fs-pci, and behaves as on a local file system.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use virtiofs_bridge::{ShareConfig, ShareServer};
use vmbuild_tests::guest::{GuestKit, GuestShare, GuestVm};

struct Shares {
    store: tempfile::TempDir,
    xchg: tempfile::TempDir,
    _sockets: tempfile::TempDir,
    store_server: ShareServer,
    xchg_server: ShareServer,
}

impl Shares {
    fn start() -> Shares {
        let store = tempfile::tempdir().unwrap();
        let xchg = tempfile::tempdir().unwrap();
        let sockets = tempfile::tempdir().unwrap();
        let store_server = ShareServer::spawn(
            ShareConfig::store(store.path()),
            sockets.path().join("store.sock"),
        )
        .unwrap();
        let xchg_server = ShareServer::spawn(
            ShareConfig::xchg(xchg.path()),
            sockets.path().join("xchg.sock"),
        )
        .unwrap();
        Shares {
            store,
            xchg,
            _sockets: sockets,
            store_server,
            xchg_server,
        }
    }

    /// A guest with the store at /nix/store and xchg at /tmp/xchg, running `script`.
    fn guest(&self, script: &str) -> GuestVm {
        fs::write(self.xchg.path().join("run.sh"), script).unwrap();
        let kit = GuestKit::locate().expect("guest kit");
        GuestVm::new(kit, "/tmp/xchg/run.sh")
            .share(GuestShare::VirtioFs {
                socket: self.store_server.socket().to_owned(),
                tag: "store".into(),
                mount: "/nix/store".into(),
                options: String::new(),
            })
            .share(GuestShare::VirtioFs {
                socket: self.xchg_server.socket().to_owned(),
                tag: "xchg".into(),
                mount: "/tmp/xchg".into(),
                options: String::new(),
            })
    }
}

/// Several thousand small files in nested directories, a bigger one, and a static mmap
/// reader (busybox has none).
fn populate_store(root: &Path) -> usize {
    let mut count = 0;
    for a in 0..30 {
        for b in 0..10 {
            let dir = root.join(format!("pkg-{a:02}/share/{b}"));
            fs::create_dir_all(&dir).unwrap();
            for c in 0..10 {
                let n = a * 100 + b * 10 + c;
                let body: Vec<u8> = (0..(n * 37 % 5000))
                    .map(|i| ((i * 7 + n) % 256) as u8)
                    .collect();
                fs::write(dir.join(format!("file-{c}")), body).unwrap();
                count += 1;
            }
        }
    }
    let big: Vec<u8> = (0..(3u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(root.join("big"), big).unwrap();
    fs::create_dir(root.join("bin")).unwrap();
    build_mmap_reader(&root.join("bin/mmapsum"));
    count + 2
}

fn build_mmap_reader(out: &Path) {
    let src = out.with_extension("c");
    fs::write(
        &src,
        r#"#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <fcntl.h>
int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0) { perror("open"); return 2; }
    struct stat st; fstat(fd, &st);
    const unsigned char *p = mmap(0, st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) { perror("mmap"); return 3; }
    unsigned long h = 1469598103934665603UL;
    for (off_t i = 0; i < st.st_size; i++) { h ^= p[i]; h *= 1099511628211UL; }
    printf("%lu %ld\n", h, (long)st.st_size);
    return 0;
}
"#,
    )
    .unwrap();
    let status = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(out)
        .arg(&src)
        .status()
        .expect("gcc (needed to build the guest's mmap reader)");
    assert!(status.success(), "building the static mmap reader failed");
    fs::remove_file(src).unwrap();
}

/// The same FNV-1a the guest's mmap reader prints.
fn fnv(bytes: &[u8]) -> String {
    let mut h: u64 = 1469598103934665603;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(1099511628211);
    }
    format!("{h} {}", bytes.len())
}

fn host_sums(root: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg("find . -type f | LC_ALL=C sort | xargs sha256sum")
        .current_dir(root)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

const GUEST_SCRIPT: &str = r#"
set -u
fail() { echo "FAIL: $*"; exit 1; }
cd /nix/store || fail "no store"
find . -type f | LC_ALL=C sort | xargs sha256sum > /tmp/xchg/guest.sums || fail "checksums"
/nix/store/bin/mmapsum /nix/store/big > /tmp/xchg/mmap-store.out || fail "mmap on store"

# The store is read-only, whatever the guest tries.
{ echo x > /nix/store/new; } 2>> /tmp/xchg/erofs.err && fail "created a file in the store"
{ echo x >> /nix/store/big; } 2>> /tmp/xchg/erofs.err && fail "appended to a store file"
rm /nix/store/big 2>> /tmp/xchg/erofs.err && fail "removed a store file"
mkdir /nix/store/d 2>> /tmp/xchg/erofs.err && fail "made a store directory"
chmod 777 /nix/store/big 2>> /tmp/xchg/erofs.err && fail "chmod in the store"
mv /nix/store/big /nix/store/big2 2>> /tmp/xchg/erofs.err && fail "renamed in the store"

cd /tmp/xchg || fail "no xchg"
mkdir out || fail mkdir
echo hello > out/a || fail write
chmod 640 out/a || fail chmod
touch -d '2001-02-03 04:05:06' out/a || fail touch
mv out/a out/b || fail rename
ln -s b out/link || fail symlink
[ "$(cat out/link)" = hello ] || fail "read through symlink"
ln out/b out/hard || fail "hard link"
[ "$(stat -c %h out/b)" = 2 ] || fail "link count"
echo 0123456789 > out/t && truncate -s 4 out/t || fail truncate
[ "$(cat out/t)" = 0123 ] || fail "truncated content"
mkfifo out/fifo || fail mkfifo
(echo through-fifo > out/fifo &)
read line < out/fifo
[ "$line" = through-fifo ] || fail "fifo"
head -c 1048576 /dev/urandom > out/rand || fail "random data"
sha256sum out/rand > out/rand.sum
/nix/store/bin/mmapsum out/rand > out/rand.mmap || fail "mmap on xchg"
cat /tmp/xchg/host-written > out/echoed || fail "host file not visible"

# A symlink the host planted pointing at a host path resolves inside the guest.
cat /tmp/xchg/escape/secret > out/escape.out 2>/dev/null
ls /tmp/xchg/.. > /dev/null
exit 0
"#;

#[test]
fn a_linux_guest_uses_the_store_and_xchg_like_local_file_systems() {
    let shares = Shares::start();
    let files = populate_store(shares.store.path());
    assert!(files >= 3000);
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("secret"), b"host secret").unwrap();
    std::os::unix::fs::symlink(outside.path(), shares.xchg.path().join("escape")).unwrap();
    fs::write(shares.xchg.path().join("host-written"), b"from the host\n").unwrap();

    let outcome = shares.guest(GUEST_SCRIPT).run().unwrap();
    assert_eq!(outcome.exit, Some(0), "console:\n{}", outcome.console);
    let x = shares.xchg.path();

    assert_eq!(
        fs::read_to_string(x.join("guest.sums")).unwrap(),
        host_sums(shares.store.path())
    );
    let big = fs::read(shares.store.path().join("big")).unwrap();
    assert_eq!(
        fs::read_to_string(x.join("mmap-store.out")).unwrap().trim(),
        fnv(&big)
    );

    let erofs = fs::read_to_string(x.join("erofs.err")).unwrap();
    assert_eq!(erofs.matches("Read-only file system").count(), 6, "{erofs}");
    assert_eq!(
        fs::read_dir(shares.store.path()).unwrap().count(),
        32,
        "store unchanged"
    );
    assert_eq!(big.len(), 3 << 20);

    let out = x.join("out");
    let b = fs::metadata(out.join("b")).unwrap();
    assert_eq!(fs::read(out.join("b")).unwrap(), b"hello\n");
    assert_eq!(b.permissions().mode() & 0o777, 0o640);
    assert_eq!(b.nlink(), 2);
    assert_eq!(b.ino(), fs::metadata(out.join("hard")).unwrap().ino());
    // 2001-02-03 04:05:06 in the guest's zone (UTC).
    assert_eq!(b.mtime(), 981_173_106);
    assert!(!out.join("a").exists());
    assert_eq!(fs::read_link(out.join("link")).unwrap(), Path::new("b"));
    assert_eq!(fs::read(out.join("t")).unwrap(), b"0123");
    assert!(fs::metadata(out.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    let rand = fs::read(out.join("rand")).unwrap();
    assert_eq!(rand.len(), 1 << 20);
    assert_eq!(
        fs::read_to_string(out.join("rand.mmap")).unwrap().trim(),
        fnv(&rand)
    );
    let sum = fs::read_to_string(out.join("rand.sum")).unwrap();
    let host_sum = String::from_utf8(
        Command::new("sha256sum")
            .arg("out/rand")
            .current_dir(x)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(sum, host_sum);
    assert_eq!(fs::read(out.join("echoed")).unwrap(), b"from the host\n");
    assert_eq!(
        fs::read(out.join("escape.out")).unwrap_or_default(),
        b"",
        "the guest read a host file through a symlink"
    );
    let stats = shares.store_server.stats();
    assert!(stats.erofs >= 5, "{stats:?}");
    assert_eq!(stats.malformed + stats.bad_descriptors, 0, "{stats:?}");
}

#[test]
fn a_restarted_qemu_reconnects_to_the_same_shares() {
    let shares = Shares::start();
    fs::write(shares.store.path().join("input"), b"store input\n").unwrap();
    let first = shares
        .guest("cat /nix/store/input > /tmp/xchg/round1 && echo one >> /tmp/xchg/round1")
        .run()
        .unwrap();
    assert_eq!(first.exit, Some(0), "{}", first.console);
    let second = shares
        .guest("cat /tmp/xchg/round1 > /tmp/xchg/round2 && echo two >> /tmp/xchg/round2")
        .run()
        .unwrap();
    assert_eq!(second.exit, Some(0), "{}", second.console);
    assert_eq!(
        fs::read_to_string(shares.xchg.path().join("round2")).unwrap(),
        "store input\none\ntwo\n"
    );
    assert_eq!(shares.xchg_server.stats().connections, 2);
    assert_eq!(shares.store_server.stats().connections, 2);
}
