//! The builder VM: root in a VM of its own, it fills a scratch disk from the packages
//! with the distribution's own installer and sends back a sorted tar of the new root, or
//! a failure report naming the package and the installer's words. Each package manager
//! has its recipe ([`dpkg`], [`rpm`]): what it prepares on the host and the shell script
//! the VM runs, appended to `lib.sh` (logging, progress, the failure report).
//!
//! Why a VM and not the host: maintainer scripts and scriptlets must run as root (they
//! chown, add users, mknod) in a chroot. On the host that needs root, or user namespaces
//! with subordinate ID ranges (`newuidmap`, `/etc/subuid`), which many build hosts do
//! not grant. In a VM any user is root, as nixpkgs' vmTools did it, and a script can
//! never touch the host. The cost is the VM's speed: under KVM close to the host's,
//! under TCG several times slower.

pub mod dpkg;
pub mod rpm;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use super::distro::PackageManager;
use super::ImageError;
use crate::guest::kit::GuestKit;
use crate::progress::Progress;
use crate::qemu::accel::Accel;
use crate::qemu::QemuBinary;
use crate::vm::run::{Disk, DiskMode, ExtraShare, RunEnd, RunSpec, ShareProtocol, Vmm};

/// What every recipe starts with.
const LIB: &str = include_str!("lib.sh");

/// The builder's memory: dpkg or rpm and the tar of a toolchain fit with room to spare.
const MEMORY_MIB: u32 = 1024;

/// A build that takes longer than this is stuck (a maintainer script waiting for input).
const TIME_LIMIT: Duration = Duration::from_secs(3 * 3600);

/// The script a recipe's VM runs.
fn script(recipe: &str) -> String {
    format!("#!/bin/sh\n{LIB}\n{recipe}")
}

/// The recipe's identity, part of every image key: a change to it is a new image.
pub fn recipe_digest(manager: PackageManager) -> String {
    use sha2::{Digest, Sha256};
    let recipe = match manager {
        PackageManager::Dpkg => dpkg::SCRIPT,
        PackageManager::Rpm => rpm::SCRIPT,
    };
    super::apt::hex(&Sha256::digest(script(recipe).as_bytes()))
}

/// One builder VM run, as a recipe sets it up.
pub(super) struct BuilderVm<'a> {
    /// The recipe's script (without `lib.sh`).
    pub recipe: &'a str,
    /// The builder's root: None is the guest kit itself; Some is a distribution image
    /// (the kit's init chroots into it), for an installer the kit lacks.
    pub root_image: Option<PathBuf>,
    /// The recipe's own environment (XCHG, SCRATCH, TTY and QUIET are set here).
    pub env: Vec<(&'static str, String)>,
    /// For the progress line.
    pub packages: usize,
    pub size_bytes: u64,
    /// The build's own directory (removed with it): `build/` is shared read-only at
    /// /build, `out/` is the VM's xchg.
    pub work: &'a Path,
    pub accel: Accel,
}

impl BuilderVm<'_> {
    pub fn build_dir(work: &Path) -> PathBuf {
        work.join("build")
    }

    /// Boots the builder over a blank scratch disk; returns the path of the root's tar.
    pub fn run(&self, progress: &Progress, signals: Receiver<()>) -> Result<PathBuf, ImageError> {
        let fail = |e: anyhow::Error| ImageError::Failed(e);
        let build = Self::build_dir(self.work);
        let out = self.work.join("out");
        std::fs::create_dir_all(&build).map_err(ImageError::io)?;
        std::fs::create_dir_all(&out).map_err(ImageError::io)?;
        std::fs::write(build.join("builder.sh"), script(self.recipe)).map_err(ImageError::io)?;

        // The scratch disk: sparse, as big as the image, so a full image fails here too.
        let scratch = self.work.join("scratch.raw");
        let mkfs = Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-L", "vmbuild-scratch"])
            .arg(&scratch)
            .arg(format!("{}k", self.size_bytes / 1024))
            .output()
            .map_err(|e| {
                fail(anyhow::anyhow!(
                    "running mke2fs (Debian package e2fsprogs): {e}"
                ))
            })?;
        if !mkfs.status.success() {
            return Err(fail(anyhow::anyhow!(
                "mke2fs (scratch disk): {}",
                String::from_utf8_lossy(&mkfs.stderr).trim()
            )));
        }

        let qemu = QemuBinary::locate().map_err(fail)?;
        let kit = GuestKit::locate().map_err(fail)?;
        let tty = std::io::stderr().is_terminal();
        // The root image, when there is one, is the first drive.
        let scratch_dev = if self.root_image.is_some() {
            "/dev/vdb"
        } else {
            "/dev/vda"
        };
        let mut env = vec![
            ("XCHG", "/tmp/xchg".to_owned()),
            ("SCRATCH", scratch_dev.to_owned()),
            ("TTY", if tty { "1" } else { "0" }.to_owned()),
            (
                "QUIET",
                if progress.enabled() { "0" } else { "1" }.to_owned(),
            ),
        ];
        env.extend(self.env.iter().cloned());
        let spec = RunSpec {
            qemu,
            accel: self.accel,
            kernel: kit.kernel,
            initrd: kit.initrd,
            append: Some("vmbuild.modules=crc32c_generic,ext4".into()),
            memory_mib: MEMORY_MIB,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get().min(4) as u32),
            argv: vec!["/bin/sh".into(), "/build/builder.sh".into()],
            shell: false,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
            cwd: None,
            store: None,
            xchg: Some(out.clone()),
            keep_xchg: true,
            no_xchg: false,
            xchg_writeback: false,
            nic: None,
            extra_shares: vec![ExtraShare {
                host: build.clone(),
                guest: "/build".into(),
                read_only: true,
            }],
            disk: Some(Disk {
                path: scratch.clone(),
                format: "raw".into(),
                mode: DiskMode::Rw,
            }),
            image: self.root_image.clone(),
            timeout: Some(TIME_LIMIT),
            log: Some(self.work.join("console.log")),
            vmm: Vmm::Qemu,
            share_protocol: ShareProtocol::Virtiofs,
            dax: false,
            runtime_dir: None,
        };
        let step = progress.step(&format!(
            "installing {} packages in a builder VM",
            self.packages
        ));
        let outcome = crate::vm::run::run(&spec, signals).map_err(fail)?;
        let _ = std::fs::remove_file(&scratch);
        match outcome.end {
            RunEnd::Exited(0) if out.join("result").is_file() => {
                step.done();
                Ok(out.join("root.tar"))
            }
            RunEnd::Exited(_) => Err(failure_report(&out, self.size_bytes)),
            RunEnd::Interrupted => Err(ImageError::Interrupted),
            RunEnd::TimedOut(t) => Err(fail(anyhow::anyhow!(
                "the builder VM ran past its {} s limit and was stopped",
                t.as_secs()
            ))),
            RunEnd::NoExitCode { why, console_tail } => Err(fail(anyhow::anyhow!(
                "the builder VM stopped: {why}\n{console_tail}"
            ))),
            RunEnd::HostFailed(why) => Err(fail(anyhow::anyhow!("the builder VM stopped: {why}"))),
        }
    }
}

/// The builder's `failure` file, as the user's error: a package that fails, or a disk
/// too small, is the input's fault (exit 2); anything else is ours.
fn failure_report(out: &Path, size_bytes: u64) -> ImageError {
    let text = std::fs::read_to_string(out.join("failure")).unwrap_or_default();
    let mut lines = text.lines();
    let kind = lines.next().unwrap_or("");
    let summary = lines
        .next()
        .unwrap_or("the builder failed without a report");
    let detail: Vec<&str> = lines.collect();
    let detail = if detail.is_empty() {
        String::new()
    } else {
        format!("\n{}", detail.join("\n"))
    };
    match kind {
        "package" | "audit" => ImageError::Usage(format!("{summary}{detail}")),
        "disk" => ImageError::Usage(format!(
            "{summary}: the packages do not fit in --size {} MiB; give a larger --size",
            size_bytes >> 20
        )),
        _ => {
            let log = std::fs::read_to_string(out.join("build.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(30)..].join("\n");
            ImageError::Failed(anyhow::anyhow!(
                "{summary}{detail}\nthe end of the builder's log:\n{tail}"
            ))
        }
    }
}
