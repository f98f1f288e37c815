//! The `linux` profile: the guest kit's Debian kernel and busybox, installed on an ext4
//! disk with Debian's dropbear SSH server. The kit's initramfs mounts the disk and hands
//! over to busybox init (`vmbuild.root=`), which configures the network and keeps sshd
//! running. Small enough to install in about a second and boot in a few under TCG, yet a
//! real target: its own disk, its own sshd, reached over the network.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

use super::{Boot, InstallContext, Profile, DISK_FILE};
use crate::guest::cmdline::KernelCmdline;
use crate::guest::command_script::shell_quote;
use crate::guest::console::{phase, phase_line};
use crate::snapshot::{dropbear, KIT_INITRD, KIT_KERNEL};

pub struct Linux;

/// busybox, as the kit carries it (a static binary), for a target of its own.
pub(super) fn kit_busybox(initrd: &Path, to: &Path) -> anyhow::Result<()> {
    let out = Command::new("cpio")
        .args(["-i", "--quiet", "--to-stdout", "bin/busybox"])
        .stdin(std::fs::File::open(initrd)?)
        .output()
        .context("running cpio (Debian package cpio)")?;
    if !out.status.success() || out.stdout.len() < 100_000 {
        bail!(
            "the guest kit's initrd {} holds no busybox",
            initrd.display()
        );
    }
    std::fs::write(to, &out.stdout)?;
    Ok(())
}

/// busybox init: the sysinit script, then dropbear (restarted if it dies).
const INITTAB: &str = "\
::sysinit:/etc/vmbuild/target-init
::respawn:/bin/dropbear -F -s -g -p 22 -r /etc/dropbear/dropbear_ed25519_host_key
::shutdown:/bin/sync
";

/// The target's sysinit: file systems, the address from `vmbuild.ip=`, a marker.
fn target_init() -> String {
    target_init_in("/bin")
}

/// The sysinit script with busybox's applets in `bin` (`bin/sh` runs it).
pub(super) fn target_init_in(bin: &str) -> String {
    TARGET_INIT
        .replace("@TARGET_UP@", &phase_line(phase::TARGET_UP))
        .replace("@BIN@", bin)
}

const TARGET_INIT: &str = r#"#!@BIN@/sh
# vmbuild target: run by busybox init before sshd starts (see /etc/inittab).
PATH=@BIN@
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts 2>/dev/null
mount -t tmpfs -o mode=1777 tmpfs /tmp 2>/dev/null
mount -t tmpfs -o mode=755 tmpfs /run 2>/dev/null
mount -t tmpfs -o mode=1777 tmpfs /dev/shm 2>/dev/null
addr=
for arg in $(cat /proc/cmdline); do
	case "$arg" in vmbuild.ip=*) addr=${arg#vmbuild.ip=} ;; esac
done
ip link set lo up
if [ -z "$addr" ] || ! ip addr add "$addr" dev eth0 || ! ip link set eth0 up; then
	echo "vmbuild-target: cannot configure eth0 with '$addr'" >/dev/console
fi
hostname vmbuild-target
echo "@TARGET_UP@" >/dev/console
"#;

impl Profile for Linux {
    fn name(&self) -> &'static str {
        "linux"
    }

    fn machine_type(&self) -> &'static str {
        // i440fx: ACPI PCI hot-plug on the root bus, which the shares need after revive
        // (q35 would need pre-made root ports for it).
        "pc"
    }

    fn ssh_user(&self) -> &'static str {
        "root"
    }

    fn xchg_mount(&self) -> &'static str {
        "/tmp/xchg"
    }

    fn install(&self, ctx: &InstallContext) -> anyhow::Result<Boot> {
        let root = ctx.scratch.join("root");
        std::fs::create_dir(&root)?;

        let step = ctx.progress.step("installing the linux target's files");
        // The kit's initramfs is the base system: busybox, modules, /etc. Not its device
        // nodes: only root may mknod, and the kit's init moves its devtmpfs onto the
        // target's /dev anyway.
        run(
            Command::new("cpio")
                .args(["-idm", "--quiet", "--no-absolute-filenames"])
                .args(["--nonmatching", "dev/*"])
                .current_dir(&root)
                .stdin(std::fs::File::open(ctx.kit.initrd.as_path())?),
            "cpio (Debian package cpio)",
        )?;
        for (host, guest) in dropbear::runtime_files(Path::new(dropbear::SERVER), "/bin/dropbear")?
        {
            copy_into(&root, &host, &guest, 0o755)?;
        }
        copy_into(
            &root,
            ctx.host_key,
            "/etc/dropbear/dropbear_ed25519_host_key",
            0o600,
        )?;
        write_into(
            &root,
            "/root/.ssh/authorized_keys",
            ctx.authorized_key.as_bytes(),
            0o600,
        )?;
        std::fs::set_permissions(root.join("root"), std::fs::Permissions::from_mode(0o700))?;
        std::fs::set_permissions(
            root.join("root/.ssh"),
            std::fs::Permissions::from_mode(0o700),
        )?;
        write_into(&root, "/etc/inittab", INITTAB.as_bytes(), 0o644)?;
        write_into(
            &root,
            "/etc/vmbuild/target-init",
            target_init().as_bytes(),
            0o755,
        )?;
        write_into(&root, "/etc/shells", b"/bin/sh\n", 0o644)?;
        write_into(&root, "/etc/hostname", b"vmbuild-target\n", 0o644)?;
        std::os::unix::fs::symlink("/run", root.join("var/run")).or_else(|e| {
            if root.join("var").exists() {
                Err(e)
            } else {
                std::fs::create_dir(root.join("var"))?;
                std::os::unix::fs::symlink("/run", root.join("var/run"))
            }
        })?;
        // The kit's stage-1 init has no business on the installed system.
        let _ = std::fs::remove_file(root.join("init"));
        step.done();

        let step = ctx
            .progress
            .step(&format!("creating the {} MiB ext4 disk", ctx.disk_size_mib));
        let raw = ctx.scratch.join("disk.raw");
        // Through a tar that says every file is root's: a bootstrap by any user gives a
        // target whose files are root's (dropbear refuses an authorized_keys that is
        // not), and mke2fs reads owners from a tar, never from the files.
        let tar = ctx.scratch.join("root.tar");
        run(
            Command::new("tar")
                .args([
                    "--create",
                    "--numeric-owner",
                    "--owner=0",
                    "--group=0",
                    "--file",
                ])
                .arg(&tar)
                .arg("-C")
                .arg(&root)
                .arg("."),
            "tar",
        )?;
        crate::image::mkfs::mke2fs_reads_tar()?;
        run(
            Command::new("mke2fs")
                .args(["-q", "-F", "-t", "ext4", "-L", "vmbuild-target", "-d"])
                .arg(&tar)
                .arg(&raw)
                .arg(format!("{}M", ctx.disk_size_mib)),
            "mke2fs (Debian package e2fsprogs)",
        )?;
        run(
            Command::new("qemu-img")
                .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(ctx.out.join(DISK_FILE)),
            "qemu-img (Debian package qemu-utils)",
        )?;
        std::fs::remove_file(&raw)?;
        std::fs::remove_file(&tar)?;
        step.done();

        let n = ctx.network;
        Ok(Boot {
            // The snapshot's copy of the guest kit (bootstrap made it).
            kernel: Some(KIT_KERNEL.into()),
            initrd: Some(KIT_INITRD.into()),
            append: Some(target_cmdline(&format!("{}/{}", n.target_ip, n.prefix_len))),
            uefi: None,
        })
    }

    fn mount_share(&self, tag: &str, mountpoint: &str, read_only: bool) -> String {
        let opts = if read_only { "-o ro " } else { "" };
        let mp = String::from_utf8_lossy(&shell_quote(mountpoint.as_bytes())).into_owned();
        let tag_q = String::from_utf8_lossy(&shell_quote(tag.as_bytes())).into_owned();
        // The device is hot-plugged just after the revive; ACPI and the driver take some
        // tens of milliseconds under TCG. Wait up to 20 s.
        format!(
            "mkdir -p {mp}\n\
             n=0\n\
             while ! mount -t virtiofs {opts}{tag_q} {mp} 2>/dev/null; do\n\
             \tn=$((n + 1))\n\
             \tif [ $n -ge 800 ]; then echo 'vmbuild: a share did not appear in the target' >&2; exit 125; fi\n\
             \tsleep 0.025\n\
             done\n"
        )
    }
}

/// The installed system boots from the disk, with the modules for the shares that are
/// hot-plugged after a revive, and its address.
fn target_cmdline(ip: &str) -> String {
    KernelCmdline::new()
        .fast_boot()
        .root("/dev/vda")
        .modules(&["fuse", "virtiofs"])
        .ip(ip)
        .to_string()
}

pub(super) fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn copy_into(root: &Path, host: &Path, guest: &str, mode: u32) -> anyhow::Result<()> {
    let data = std::fs::read(host).with_context(|| format!("reading {}", host.display()))?;
    write_into(root, guest, &data, mode)
}

fn write_into(root: &Path, guest: &str, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let path = root.join(guest.trim_start_matches('/'));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // A symlink (busybox applet) of the same name is replaced by the real file.
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_target_boots_as_it_always_did() {
        assert_eq!(
            super::target_cmdline("10.0.2.15/24"),
            "console=ttyS0 panic=-1 quiet cryptomgr.notests vmbuild.quiet \
             vmbuild.root=/dev/vda vmbuild.modules=fuse,virtiofs vmbuild.ip=10.0.2.15/24"
        );
        let init = super::target_init();
        assert!(init.starts_with("#!/bin/sh\n"));
        assert!(init.contains("\nPATH=/bin\n"));
        assert!(init.contains("\necho \"vmbuild-phase=target-up\" >/dev/console\n"));
        assert!(!init.contains('@'));
    }
}
