//! Profiles: how a kind of target is installed and booted. `linux` is a minimal Linux
//! with an SSH server, `image` a Debian image of vmbuild's; `windows-cygwin` installs
//! Windows from the user's ISO in a VM of its own (`install`), and its UEFI machine comes
//! back in `Boot::uefi` for the snapshot to record.

mod image;
mod linux;
pub mod windows;

use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;

use crate::guest::kit::GuestKit;
use crate::progress::Progress;
use crate::qemu::{Accel, QemuBinary};
use crate::snapshot::manifest::{NetworkPlan, UefiPlan};

pub use image::Image;
pub use linux::Linux;
pub use windows::WindowsCygwin;

/// The target's disk in the snapshot directory (qcow2; builds put an overlay on it).
pub const DISK_FILE: &str = "disk.qcow2";

/// What `install` may use and where it writes.
pub struct InstallContext<'a> {
    /// The snapshot directory being written: the disk and boot files go here.
    pub out: &'a Path,
    /// Scratch space, removed afterwards.
    pub scratch: &'a Path,
    pub kit: &'a GuestKit,
    /// The target's SSH host key (dropbear format) and the key it must accept.
    pub host_key: &'a Path,
    pub authorized_key: &'a str,
    pub disk_size_mib: u64,
    pub network: &'a NetworkPlan,
    pub progress: &'a Progress,
    /// For a profile whose install runs in a VM of its own (windows-cygwin): the machine
    /// the target will be, its switch port, a directory for sockets, and the user's
    /// signals (an install takes long enough to be interrupted).
    pub qemu: &'a QemuBinary,
    pub accel: Accel,
    pub memory_mib: u32,
    pub cpus: u32,
    pub rundir: &'a Path,
    pub net_socket: &'a Path,
    pub signals: &'a Receiver<()>,
    /// Where a failed install's screendump is kept (beside --out, not in the snapshot
    /// being written, which a failure removes).
    pub screendump: PathBuf,
}

/// An install the user interrupted (an error the bootstrap reports as such).
#[derive(Debug)]
pub struct InstallInterrupted;

impl std::fmt::Display for InstallInterrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the install was interrupted")
    }
}

impl std::error::Error for InstallInterrupted {}

/// An install that ran and failed in the target (a phase timed out or failed): what and
/// where the screen was left; the bootstrap reports it as a VM failure.
#[derive(Debug)]
pub struct InstallFailed(pub String);

impl std::fmt::Display for InstallFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InstallFailed {}

/// How QEMU boots the installed target: files in the snapshot directory.
#[derive(Debug, Clone, Default)]
pub struct Boot {
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub append: Option<String>,
    /// A UEFI machine (windows-cygwin): firmware, variables, TPM.
    pub uefi: Option<UefiPlan>,
}

pub trait Profile {
    fn name(&self) -> &'static str;
    /// The QEMU machine type (an alias; the snapshot records what it resolves to).
    fn machine_type(&self) -> &'static str;
    /// The user the controller logs in as.
    fn ssh_user(&self) -> &'static str;
    /// Where xchg appears in the target.
    fn xchg_mount(&self) -> &'static str;
    /// Whether this vmbuild can install the profile at all, checked before anything starts
    /// (the error says why not and what to use instead).
    fn available(&self) -> Result<(), String> {
        Ok(())
    }
    /// Creates `DISK_FILE` in `ctx.out` with an installed system that, once booted,
    /// configures `ctx.network`'s target address and answers SSH with `ctx.host_key`.
    fn install(&self, ctx: &InstallContext) -> anyhow::Result<Boot>;
    /// Shell lines (POSIX sh, run as `ssh_user` in the target) that mount the virtio-fs
    /// share `tag` at `mountpoint`, waiting for the hot-plugged device to appear, and
    /// `exit 125` with a message on stderr if it does not.
    fn mount_share(&self, tag: &str, mountpoint: &str, read_only: bool) -> String;
    /// The device the build's session script writes its markers to: the target's
    /// console, which QEMU connects to vmbuild.
    fn console_device(&self) -> &'static str {
        "/dev/console"
    }
    /// Where a build's command starts (a shell word, expanded in the target) unless the
    /// user gave --workdir; `None`: the SSH user's home.
    fn session_workdir(&self, _xchg_mount: &str) -> Option<String> {
        None
    }
    /// The defaults of a bootstrap's machine for this profile: memory (MiB), vCPUs, disk (MiB),
    /// and how long the booted target may take to answer SSH (s).
    fn machine_defaults(&self) -> MachineDefaults {
        MachineDefaults {
            memory_mib: 256,
            cpus: 1,
            disk_mib: 1024,
            ssh_wait_secs: 120.0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct MachineDefaults {
    pub memory_mib: u32,
    pub cpus: u32,
    pub disk_mib: u64,
    pub ssh_wait_secs: f64,
}

pub fn by_name(name: &str) -> anyhow::Result<Box<dyn Profile>> {
    match name {
        "linux" => Ok(Box::new(Linux)),
        // A build needs no image file: the snapshot's disk holds it.
        "image" => Ok(Box::new(Image { image: None })),
        "windows-cygwin" => Ok(Box::new(WindowsCygwin::default())),
        other => anyhow::bail!(
            "unknown profile '{other}': this vmbuild installs linux, image and windows-cygwin"
        ),
    }
}
