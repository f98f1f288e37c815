//! Profiles: how a kind of target is installed and booted. `linux` is a minimal Linux
//! with an SSH server; `windows-cygwin` (a later issue) fits the same interface: install
//! media, an unattended answer file and a first-boot script go in through `install`, and
//! its QEMU machine options through `machine_type`/`boot`.

mod image;
mod linux;
pub mod windows;

use std::path::Path;

use crate::guest::kit::GuestKit;
use crate::progress::Progress;
use crate::snapshot::manifest::NetworkPlan;

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
}

/// How QEMU boots the installed target: files in the snapshot directory.
#[derive(Debug, Clone, Default)]
pub struct Boot {
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub append: Option<String>,
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
}

pub fn by_name(name: &str) -> anyhow::Result<Box<dyn Profile>> {
    match name {
        "linux" => Ok(Box::new(Linux)),
        // A build needs no image file: the snapshot's disk holds it.
        "image" => Ok(Box::new(Image { image: None })),
        "windows-cygwin" => Ok(Box::new(WindowsCygwin::default())),
        other => anyhow::bail!(
            "unknown profile '{other}': this vmbuild installs linux and image (windows-cygwin is not available yet)"
        ),
    }
}
