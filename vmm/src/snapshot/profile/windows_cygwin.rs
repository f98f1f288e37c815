//! The `windows-cygwin` profile's place in the interface. Installing Windows needs install
//! media (an ISO the user supplies), an unattended answer file (autounattend.xml on a
//! second drive), a first-boot script that installs Cygwin's sshd and the virtio-fs
//! service, and a machine with OVMF or SeaBIOS and a SATA/virtio disk: all specified by a
//! later issue. Until then `install` says so instead of pretending.

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
        "Administrator"
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
