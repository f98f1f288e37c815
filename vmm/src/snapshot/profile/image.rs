//! The `image` profile: a distribution image (`vmbuild image build`) as the target, so
//! that `runInLinuxImage`-style builds revive a booted Debian instead of booting one.
//!
//! The image's own files stay as they are; what vmbuild needs to boot and reach it goes
//! under `/usr/lib/vmbuild` of the snapshot's copy, written into the ext4 file with
//! debugfs (no mount, no root): the kit's static busybox as init (`vmbuild.rootinit=`),
//! dropbear with its own loader and libraries (so the image's libc, of whatever release,
//! is never touched), the host key and the sysinit script. `/etc/inittab` and root's
//! `authorized_keys` are the only files written outside that directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use super::linux::{kit_busybox, run, target_init_in};
use super::{Boot, InstallContext, Profile, DISK_FILE};
use crate::guest::cmdline::KernelCmdline;
use crate::snapshot::{dropbear, KIT_INITRD, KIT_KERNEL};

pub struct Image {
    /// The image to install; `None` where only the snapshot is used (a build).
    pub image: Option<PathBuf>,
}

const DIR: &str = "/usr/lib/vmbuild";
const HOST_KEY: &str = "/usr/lib/vmbuild/dropbear_ed25519_host_key";

/// dropbear's loader in the image: as long as the standard one's path or shorter, so it
/// fits where the ELF header names its interpreter.
const LOADER: &str = "/usr/lib/vmbuild/lib/ld.so";

/// dropbear runs with its own loader (its interpreter, patched) and libraries (the
/// environment, which dropbear clears for a session). Not `ld.so --library-path`: dropbear
/// re-executes itself for every connection, and that must find its libraries again.
fn inittab() -> String {
    format!(
        "::sysinit:{DIR}/target-init\n\
         ::respawn:{DIR}/bin/env LD_LIBRARY_PATH={DIR}/lib {DIR}/dropbear -F -s -g -p 22 -r {HOST_KEY}\n\
         ::shutdown:{DIR}/bin/sync\n"
    )
}

/// `elf` (an x86-64 executable) with its PT_INTERP path replaced by `interp`.
fn with_interpreter(mut elf: Vec<u8>, interp: &str) -> anyhow::Result<Vec<u8>> {
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u64_at =
        |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes")) as usize;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        bail!("not a 64-bit little-endian ELF file");
    }
    let (phoff, phentsize, phnum) = (u64_at(&elf, 32), u16_at(&elf, 54), u16_at(&elf, 56));
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if ph + 56 > elf.len() {
            bail!("program header {i} is past the end of the file");
        }
        const PT_INTERP: u32 = 3;
        if u32::from_le_bytes(elf[ph..ph + 4].try_into().expect("4 bytes")) != PT_INTERP {
            continue;
        }
        let (off, size) = (u64_at(&elf, ph + 8), u64_at(&elf, ph + 32));
        if off + size > elf.len() || interp.len() + 1 > size {
            bail!("its interpreter field ({size} bytes) cannot hold {interp}");
        }
        elf[off..off + size].fill(0);
        elf[off..off + interp.len()].copy_from_slice(interp.as_bytes());
        return Ok(elf);
    }
    bail!("it has no interpreter (a static executable?)")
}

/// The busybox applets the sysinit script and init use, as links in `DIR/bin`.
const APPLETS: &[&str] = &[
    "sh", "mkdir", "mount", "cat", "ip", "hostname", "sync", "env",
];

/// What goes into the image's copy, as one debugfs command file: debugfs writes into the
/// ext4 file with no mount and no root. Host files it copies are staged in `files`.
struct DebugfsScript {
    files: PathBuf,
    commands: String,
}

impl DebugfsScript {
    fn new(files: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&files)?;
        Ok(DebugfsScript {
            files,
            commands: String::new(),
        })
    }

    /// `DIR` with `lib` and `bin`, and root's `.ssh`.
    fn directories(&mut self) {
        for d in [
            DIR.to_owned(),
            format!("{DIR}/lib"),
            format!("{DIR}/bin"),
            "/root/.ssh".into(),
        ] {
            self.commands
                .push_str(&format!("mkdir {d}\nsif {d} mode 040700\n"));
        }
        self.commands.push_str(&format!(
            "sif {DIR} mode 040755\nsif {DIR}/lib mode 040755\nsif {DIR}/bin mode 040755\n"
        ));
    }

    /// The host file `host` as `guest`, owned by root, with `mode`.
    fn file(&mut self, host: &Path, guest: &str, mode: u32) {
        // debugfs copies the file a symbolic link names only if given its target.
        let host = std::fs::canonicalize(host).unwrap_or_else(|_| host.to_owned());
        self.commands.push_str(&format!(
            "rm {guest}\nwrite {} {guest}\nsif {guest} mode 0{:o}\nsif {guest} uid 0\nsif {guest} gid 0\n",
            host.display(),
            0o100000 | mode
        ));
    }

    /// `text` as `guest`, staged on the host as `name`.
    fn text(&mut self, name: &str, text: &str, guest: &str, mode: u32) -> anyhow::Result<()> {
        let host = self.files.join(name);
        std::fs::write(&host, text)?;
        self.file(&host, guest, mode);
        Ok(())
    }

    /// The kit's static busybox as `DIR/init`, with the applets init and the sysinit
    /// script use linked in `DIR/bin`.
    fn busybox(&mut self, kit_initrd: &Path) -> anyhow::Result<()> {
        let busybox = self.files.join("busybox");
        kit_busybox(kit_initrd, &busybox)?;
        self.file(&busybox, &format!("{DIR}/busybox"), 0o755);
        self.commands
            .push_str(&format!("symlink {DIR}/init busybox\n"));
        for applet in APPLETS {
            self.commands
                .push_str(&format!("symlink {DIR}/bin/{applet} ../busybox\n"));
        }
        Ok(())
    }

    /// dropbear with its interpreter patched to `LOADER`, and its libraries in `DIR/lib`:
    /// everything it runs with lives in DIR, and the image's libc stays its own.
    fn dropbear(&mut self) -> anyhow::Result<()> {
        let runtime = dropbear::runtime_files(Path::new(dropbear::SERVER), "/dropbear")?;
        for (i, (host, guest)) in runtime.into_iter().enumerate() {
            if i == 0 {
                let patched = self.files.join("dropbear");
                let elf = std::fs::read(&host)?;
                let elf = with_interpreter(elf, LOADER)
                    .with_context(|| format!("giving {} its own loader", host.display()))?;
                std::fs::write(&patched, elf)?;
                self.file(&patched, &format!("{DIR}/dropbear"), 0o755);
                continue;
            }
            let name = Path::new(&guest)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.starts_with("ld-linux") {
                self.file(&host, LOADER, 0o755);
            } else {
                self.file(&host, &format!("{DIR}/lib/{name}"), 0o644);
            }
        }
        Ok(())
    }

    /// Runs the commands on the ext4 file `raw`, and checks that they took: debugfs goes
    /// on after a failed command.
    fn apply(self, raw: &Path) -> anyhow::Result<()> {
        let commands = self.files.join("debugfs.cmds");
        std::fs::write(&commands, &self.commands)?;
        run(
            Command::new("debugfs")
                .arg("-w")
                .arg("-f")
                .arg(&commands)
                .arg(raw),
            "debugfs (Debian package e2fsprogs)",
        )?;
        for must in [
            format!("{DIR}/dropbear"),
            format!("{DIR}/lib/ld.so"),
            "/etc/inittab".into(),
        ] {
            let out = Command::new("debugfs")
                .args(["-R", &format!("stat {must}")])
                .arg(raw)
                .output()?;
            if !String::from_utf8_lossy(&out.stdout).contains("Inode:") {
                bail!(
                    "writing {must} into the image failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(())
    }
}

impl Profile for Image {
    fn name(&self) -> &'static str {
        "image"
    }

    fn machine_type(&self) -> &'static str {
        // As `linux`: ACPI PCI hot-plug on the root bus for the shares after a revive.
        "pc"
    }

    fn ssh_user(&self) -> &'static str {
        "root"
    }

    fn xchg_mount(&self) -> &'static str {
        "/tmp/xchg"
    }

    fn available(&self) -> Result<(), String> {
        match &self.image {
            Some(p) if p.is_file() => Ok(()),
            Some(p) => Err(format!("--image {}: no such file", p.display())),
            None => Err(
                "--profile image needs --image IMAGE|NAME (vmbuild image build makes one)".into(),
            ),
        }
    }

    fn install(&self, ctx: &InstallContext) -> anyhow::Result<Boot> {
        let image = self
            .image
            .as_ref()
            .context("--profile image needs --image")?;
        let step = ctx.progress.step("copying the image and adding sshd");
        let raw = ctx.scratch.join("disk.raw");
        run(
            Command::new("cp")
                .args(["--sparse=always", "--reflink=auto"])
                .arg(image)
                .arg(&raw),
            "cp",
        )?;
        let mut script = DebugfsScript::new(ctx.scratch.join("image-files"))?;
        script.directories();
        script.busybox(&ctx.kit.initrd)?;
        script.dropbear()?;
        script.file(ctx.host_key, HOST_KEY, 0o600);
        script.text(
            "target-init",
            &target_init_in(&format!("{DIR}/bin")),
            &format!("{DIR}/target-init"),
            0o755,
        )?;
        script.text("inittab", &inittab(), "/etc/inittab", 0o644)?;
        script.text(
            "authorized_keys",
            ctx.authorized_key,
            "/root/.ssh/authorized_keys",
            0o600,
        )?;
        script.text("hostname", "vmbuild-target\n", "/etc/hostname", 0o644)?;
        script.apply(&raw)?;
        run(
            Command::new("qemu-img")
                .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(ctx.out.join(DISK_FILE)),
            "qemu-img (Debian package qemu-utils)",
        )?;
        std::fs::remove_file(&raw)?;
        step.done();
        let n = ctx.network;
        Ok(Boot {
            kernel: Some(KIT_KERNEL.into()),
            initrd: Some(KIT_INITRD.into()),
            append: Some(
                KernelCmdline::new()
                    .fast_boot()
                    .root("/dev/vda")
                    .root_init(&format!("{DIR}/init"))
                    .modules(&["fuse", "virtiofs"])
                    .ip(&format!("{}/{}", n.target_ip, n.prefix_len))
                    .to_string(),
            ),
            uefi: None,
        })
    }

    fn mount_share(&self, tag: &str, mountpoint: &str, read_only: bool) -> String {
        // The image's util-linux mount does what busybox's does for the linux target.
        super::Linux.mount_share(tag, mountpoint, read_only)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interpreter_is_replaced_in_place() {
        let elf = std::fs::read("/bin/true").unwrap();
        let patched = with_interpreter(elf.clone(), LOADER).unwrap();
        assert_eq!(patched.len(), elf.len());
        let at = patched
            .windows(LOADER.len())
            .position(|w| w == LOADER.as_bytes())
            .expect("the new path is in the file");
        assert_eq!(patched[at + LOADER.len()], 0);
        assert!(with_interpreter(elf, &"/x".repeat(40)).is_err());
        assert!(with_interpreter(b"#!/bin/sh\n".to_vec(), LOADER).is_err());
    }
}
