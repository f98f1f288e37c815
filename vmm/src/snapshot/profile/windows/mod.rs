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
//! - `inputs`: the command line's ISOs, edition, WinFsp and Cygwin installers and
//!   packages, checked before anything starts.
//! - `install_watch`: the install watched from the host: phases from the readiness port,
//!   a hard limit for each, a key for the CD's boot prompt, a screendump on failure.
//! - `install_run`: the target's disk, UEFI variables and TPM state, the configuration
//!   ISO with the pinned keys, QEMU with the install media, the watch, the shutdown.
//!
//! Still to come: `install` itself (the install run inside `vmbuild bootstrap`, whose
//! target machine must then boot from UEFI with the same devices), the suspend, and
//! builds. Until then `install` says so instead of pretending, after the inputs were
//! checked (so a user learns now whether the ISOs they brought will do).

pub mod answer_file;
pub mod config_iso;
pub mod first_logon;
pub mod inputs;
pub mod install_run;
pub mod install_watch;
pub mod machine;
pub mod media;

use super::{Boot, InstallContext, Profile};

/// The profile; `inputs` are the checked command line of a bootstrap (a build needs none:
/// the snapshot holds the installed target).
#[derive(Default)]
pub struct WindowsCygwin {
    pub inputs: Option<inputs::CheckedInputs>,
}

const NOT_AVAILABLE: &str = "this vmbuild cannot yet run the Windows install itself (the answer file, \
     first-logon scripts and machine are built; the install run, suspend and builds are not): use --profile linux";

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
        match &self.inputs {
            Some(i) => Err(format!(
                "the inputs are in order ({} edition '{}', index {}, build {}; virtio-win, WinFsp and Cygwin found), but {NOT_AVAILABLE}",
                i.version.name(),
                i.image.name,
                i.image.index,
                i.image.build.map_or("unknown".into(), |b| b.to_string()),
            )),
            None => Err(format!("the windows-cygwin profile: {NOT_AVAILABLE}")),
        }
    }

    fn install(&self, _ctx: &InstallContext) -> anyhow::Result<Boot> {
        anyhow::bail!(NOT_AVAILABLE)
    }

    fn mount_share(&self, tag: &str, mountpoint: &str, _read_only: bool) -> String {
        // WinFsp's virtio-fs service maps each tag to a drive letter by itself.
        format!("test -d '{mountpoint}' || {{ echo 'vmbuild: share {tag} is not mapped' >&2; exit 125; }}\n")
    }
}
