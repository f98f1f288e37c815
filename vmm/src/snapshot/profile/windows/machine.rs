//! The Windows target's machine: q35 with UEFI (OVMF, Debian's), a TPM 2.0 from swtpm for
//! Windows 11, the disk on virtio-blk, the NIC on the build's switch, the readiness port
//! on virtio-serial, shared memory for the virtio-fs shares plugged in at each build, and
//! a new VM generation id at every start. While installing, three CD-ROMs: Windows, the
//! virtio-win drivers and the configuration ISO.

use std::path::{Path, PathBuf};

use super::first_logon::READY_PORT;
use super::media::WindowsVersion;
use crate::qemu::QemuCommand;

/// OVMF's code and the variable store a new machine starts from.
#[derive(Debug, Clone)]
pub struct Firmware {
    pub code: PathBuf,
    pub vars_template: PathBuf,
    pub secure_boot: bool,
}

/// Debian's OVMF (package `ovmf`): with Secure Boot and Microsoft's keys enrolled for
/// Windows 11, plain otherwise.
pub fn find_firmware(version: WindowsVersion) -> Result<Firmware, String> {
    let dir = Path::new("/usr/share/OVMF");
    let (code, vars, secure_boot) = if version.needs_tpm() {
        ("OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd", true)
    } else {
        ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd", false)
    };
    let (code, vars_template) = (dir.join(code), dir.join(vars));
    for f in [&code, &vars_template] {
        if !f.is_file() {
            return Err(format!(
                "{} is missing: apt-get install ovmf (UEFI firmware for {})",
                f.display(),
                version.name()
            ));
        }
    }
    Ok(Firmware {
        code,
        vars_template,
        secure_boot,
    })
}

/// The install media, attached only while installing.
#[derive(Debug, Clone)]
pub struct InstallIsos<'a> {
    pub windows: &'a Path,
    pub virtio_win: &'a Path,
    pub config: &'a Path,
}

/// What differs between this machine's instances: files and sockets.
#[derive(Debug, Clone)]
pub struct WindowsPlacement<'a> {
    pub disk: &'a Path,
    /// This machine's copy of the UEFI variables (boot entries live there).
    pub vars: &'a Path,
    pub net_socket: &'a Path,
    /// The socket vmbuild listens on for the readiness port while installing; after
    /// that the port stays (a revive needs the same devices) with nobody reading it.
    pub ready_socket: Option<&'a Path>,
    /// swtpm's socket, for Windows 11.
    pub tpm_socket: Option<&'a Path>,
    pub install: Option<InstallIsos<'a>>,
}

/// The empty PCIe root ports the shares are hot-plugged into at each build (the store
/// and xchg): q35's root bus takes no hot-plug, its root ports do.
pub const SHARE_SLOTS: [&str; 2] = ["share0", "share1"];

#[derive(Debug, Clone)]
pub struct WindowsMachine {
    /// `kvm` or `tcg`.
    pub accel: String,
    /// A versioned q35 type (`pc-q35-10.0`), as the snapshot records it.
    pub machine_type: String,
    pub memory_mib: u32,
    pub cpus: u32,
    pub mac: String,
}

impl WindowsMachine {
    /// Windows' CPU: the host's with the Hyper-V enlightenments Windows uses for its
    /// timers and spinlocks under KVM; under TCG, every feature QEMU emulates.
    pub fn cpu(&self) -> &'static str {
        if self.accel == "kvm" {
            "host,hv_relaxed,hv_vapic,hv_spinlocks=0x1fff,hv_time"
        } else {
            "max"
        }
    }

    pub fn command(&self, firmware: &Firmware, at: &WindowsPlacement) -> QemuCommand {
        let mut cmd = QemuCommand::new(&self.accel, &self.machine_type, self.memory_mib)
            .cpu(Some(self.cpu()))
            .no_user_config()
            .cpus(self.cpus)
            .uefi(&firmware.code, at.vars, firmware.secure_boot)
            .shared_memory()
            .target_disk(at.disk)
            .nic_stream(at.net_socket, &self.mac, Some("nic0"))
            .serial_port(READY_PORT, at.ready_socket)
            .vga()
            .vmgenid();
        for (i, slot) in SHARE_SLOTS.iter().enumerate() {
            cmd = cmd.root_port(slot, i as u8 + 1);
        }
        if let Some(tpm) = at.tpm_socket {
            cmd = cmd.tpm(tpm);
        }
        if let Some(isos) = &at.install {
            cmd = cmd
                .cdrom(isos.windows, 0)
                .cdrom(isos.virtio_win, 1)
                .cdrom(isos.config, 2);
        }
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(version: WindowsVersion, accel: &str, install: bool) -> Vec<String> {
        let m = WindowsMachine {
            accel: accel.into(),
            machine_type: "pc-q35-10.0".into(),
            memory_mib: 4096,
            cpus: 2,
            mac: "52:54:00:77:00:02".into(),
        };
        let fw = Firmware {
            code: "/fw/code.fd".into(),
            vars_template: "/fw/vars.fd".into(),
            secure_boot: version.needs_tpm(),
        };
        let isos = InstallIsos {
            windows: Path::new("/m/win.iso"),
            virtio_win: Path::new("/m/virtio-win.iso"),
            config: Path::new("/m/config.iso"),
        };
        m.command(
            &fw,
            &WindowsPlacement {
                disk: Path::new("/s/disk.qcow2"),
                vars: Path::new("/s/vars.fd"),
                net_socket: Path::new("/r/net.sock"),
                ready_socket: Some(Path::new("/r/ready.sock")),
                tpm_socket: version.needs_tpm().then_some(Path::new("/r/tpm.sock")),
                install: install.then_some(isos),
            },
        )
        .argv()
    }

    fn has(args: &[String], flag: &str, value: &str) -> bool {
        args.windows(2)
            .any(|w| w[0] == flag && w[1].contains(value))
    }

    #[test]
    fn every_version_gets_uefi_virtio_the_readiness_port_and_a_new_generation_id() {
        for version in [
            WindowsVersion::Windows10,
            WindowsVersion::Windows11,
            WindowsVersion::Server2022,
        ] {
            let a = argv(version, "kvm", true);
            assert!(has(&a, "-M", "pc-q35-"), "{version:?}: q35");
            assert!(has(
                &a,
                "-drive",
                "if=pflash,format=raw,unit=0,readonly=on,file=/fw/code.fd"
            ));
            assert!(has(
                &a,
                "-drive",
                "if=pflash,format=raw,unit=1,file=/s/vars.fd"
            ));
            assert!(has(&a, "-device", "virtio-blk-pci,drive=disk0"));
            assert!(has(&a, "-device", "virtio-net-pci,netdev=net0"));
            assert!(has(&a, "-device", &format!("name={READY_PORT}")));
            assert!(has(&a, "-device", "vmgenid,guid=auto"));
            // Slots for the shares plugged in at each build.
            assert!(has(&a, "-device", "pcie-root-port,id=share0,chassis=1"));
            assert!(has(&a, "-device", "pcie-root-port,id=share1,chassis=2"));
            // A screen for Windows and for the screendump taken when an install fails.
            assert!(has(&a, "-device", "VGA"));
            assert!(has(
                &a,
                "-object",
                "memory-backend-memfd,id=mem,size=4096M,share=on"
            ));
            assert!(
                has(&a, "-cpu", "hv_relaxed"),
                "{version:?}: Hyper-V enlightenments under KVM"
            );
            for (i, iso) in ["/m/win.iso", "/m/virtio-win.iso", "/m/config.iso"]
                .iter()
                .enumerate()
            {
                assert!(has(
                    &a,
                    "-drive",
                    &format!("file={iso},if=none,id=cd{i},media=cdrom,readonly=on")
                ));
                assert!(has(
                    &a,
                    "-device",
                    &format!("ide-cd,drive=cd{i},bus=ide.{i}")
                ));
            }
            // Windows 11 alone: the TPM, Secure Boot's SMM-only flash.
            let w11 = version == WindowsVersion::Windows11;
            assert_eq!(
                has(&a, "-device", "tpm-crb,tpmdev=tpm0"),
                w11,
                "{version:?}"
            );
            assert_eq!(has(&a, "-machine", "smm=on"), w11, "{version:?}");
            assert_eq!(
                has(
                    &a,
                    "-global",
                    "driver=cfi.pflash01,property=secure,value=on"
                ),
                w11
            );
        }
    }

    #[test]
    fn a_revived_machine_has_no_install_media_and_tcg_gets_every_cpu_feature() {
        let a = argv(WindowsVersion::Windows11, "tcg", false);
        assert!(!a.iter().any(|x| x.contains("media=cdrom")), "{a:?}");
        assert!(has(&a, "-cpu", "max"));
        // The devices a revive must find in the same slots are all still there.
        assert!(has(&a, "-device", "tpm-crb"));
        assert!(has(&a, "-device", "virtio-blk-pci"));
    }
}
