//! virtiofs-bridge's 9P2000.L server against the real client: the guest kit's Linux
//! kernel (QEMU, TCG) mounts the store over 9p with `trans=tcp`, reaching this test's
//! server through QEMU's user-mode network, and reads it as a file system. The test's
//! control directory is QEMU's own 9p share (`-virtfs`).

use std::net::TcpListener;
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
    let kit = GuestKit::locate().expect("guest kit");
    let mut vm = GuestVm::new(kit, "/ctl/run.sh").share(GuestShare::NineP {
        dir: ctl.path().to_owned(),
        tag: "ctl".into(),
        mount: "/ctl".into(),
        options: String::new(),
    });
    vm.user_net = true;
    vm.exit_file = Some("/ctl/status".into());
    vm.timeout = std::time::Duration::from_secs(180);
    let out = vm.run().unwrap();
    let read = |name: &str| std::fs::read_to_string(ctl.path().join(name)).unwrap_or_default();
    assert_eq!(
        out.exit,
        Some(0),
        "guest failed:\n{}",
        vmbuild_tests::guest::tail(&out.console, 30)
    );
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
