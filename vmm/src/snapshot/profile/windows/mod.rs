//! The `windows-cygwin` profile (issue 18), being built in parts:
//! - `media`: the Windows ISO (editions and version read from its install.wim in place)
//!   and the virtio-win ISO (the drivers each version needs) are checked;
//! - `answer_file`: autounattend.xml for Windows 10, 11 and Server 2022;
//! - `config_iso`: the ISO that carries it and the first-logon files (xorriso);
//! - `first_logon`: setup.cmd (drivers, WinFsp, Cygwin offline or from a mirror) and
//!   setup.sh (sshd with the pinned keys, the address, the firewall), announcing each
//!   phase and readiness on a virtio-serial port.
//!
//! - `machine`: q35, OVMF (Secure Boot and a swtpm TPM for Windows 11), virtio disk and
//!   NIC, the readiness port, shared memory, vmgenid, the install media as CD-ROMs.
//!
//! Still to come: the install run with per-phase timeouts and screendumps, the suspend,
//! `bootstrap --profile windows-cygwin` itself, and builds. Until then `install` says so
//! instead of pretending.

pub mod answer_file;
pub mod config_iso;
pub mod first_logon;
pub mod machine;
pub mod media;

use super::{Boot, InstallContext, Profile};

pub struct WindowsCygwin;

const NOT_AVAILABLE: &str = "the windows-cygwin profile is not available in this vmbuild: it needs \
     Windows install media, an answer file and a first-boot script (a later issue); use --profile linux";

impl Profile for WindowsCygwin {
    fn name(&self) -> &'static str {
        "windows-cygwin"
    }

    fn machine_type(&self) -> &'static str {
        "q35"
    }

    fn ssh_user(&self) -> &'static str {
        // The local administrator the answer file creates (`answer_file::Answers::user`).
        "vmbuild"
    }

    fn xchg_mount(&self) -> &'static str {
        "/cygdrive/x"
    }

    fn available(&self) -> Result<(), String> {
        Err(NOT_AVAILABLE.to_owned())
    }

    fn install(&self, _ctx: &InstallContext) -> anyhow::Result<Boot> {
        anyhow::bail!(NOT_AVAILABLE)
    }

    fn mount_share(&self, tag: &str, mountpoint: &str, _read_only: bool) -> String {
        // WinFsp's virtio-fs service maps each tag to a drive letter by itself.
        format!("test -d '{mountpoint}' || {{ echo 'vmbuild: share {tag} is not mapped' >&2; exit 125; }}\n")
    }
}
