//! `vmbuild bootstrap`: install a target once and suspend it to a snapshot directory.

use std::path::PathBuf;

use clap::Args;

use crate::accel::{self, AccelChoice};
use crate::exit;
use crate::guest::kit::GuestKit;
use crate::qemu::QemuBinary;
use crate::snapshot::profile;
use crate::snapshot::profile::windows::inputs::WindowsInputs;
use crate::workflow::bootstrap::{bootstrap, BootstrapFailure, BootstrapSpec};

#[derive(Args, Debug)]
#[command(after_help = "\
Writes DIR: the target's disk (disk.qcow2), its memory state (state), the guest kit's
kernel and initramfs, the controller's SSH client and key, and manifest.json (profile,
QEMU version and machine, memory, network plan, pinned host key, checksums, timings).

Exit status:
  0    the snapshot is ready
  2    bad command line or input (nothing was started)
  122  the target never answered SSH, or refused the snapshot's key
  125  the bootstrap failed (QEMU, install, controller)
  130  interrupted (SIGINT, SIGTERM or SIGHUP); nothing was left behind

Environment: VMBUILD_QEMU (the QEMU binary), VMBUILD_GUEST_KIT (the guest kit directory),
XDG_RUNTIME_DIR (where sockets go),
XDG_CACHE_HOME (probe answers, verification stamps), TMPDIR (scratch files), RUST_LOG (log filter),
NO_COLOR (no colours in log lines).")]
pub struct BootstrapArgs {
    /// What to install: linux (the kit's busybox and sshd), image (a distribution image
    /// from `vmbuild image build`, with --image), or windows-cygwin (Windows and Cygwin's
    /// sshd from the ISOs you bring: --iso, --virtio-win, --winfsp, --cygwin-mirror; its
    /// inputs are checked, the install run itself is not in this release)
    #[arg(long, default_value = "linux")]
    profile: String,
    /// windows-cygwin: the Windows install ISO (Windows 10, 11 or Server 2022)
    #[arg(
        long,
        value_name = "WIN.iso",
        help_heading = "Windows (--profile windows-cygwin)"
    )]
    iso: Option<PathBuf>,
    /// windows-cygwin: the virtio-win driver ISO (viostor, NetKVM, vioserial, viofs)
    #[arg(
        long,
        value_name = "VIRTIO.iso",
        help_heading = "Windows (--profile windows-cygwin)"
    )]
    virtio_win: Option<PathBuf>,
    /// windows-cygwin: the edition to install, by name or index in install.wim (needed
    /// when the ISO holds more than one; a wrong one lists them)
    #[arg(
        long,
        value_name = "NAME|INDEX",
        help_heading = "Windows (--profile windows-cygwin)"
    )]
    edition: Option<String>,
    /// windows-cygwin: where Cygwin's packages come from: a local package directory (made
    /// by `setup-x86_64.exe --download`; no network needed) or a mirror URL
    #[arg(
        long,
        value_name = "DIR|URL",
        help_heading = "Windows (--profile windows-cygwin)"
    )]
    cygwin_mirror: Option<String>,
    /// windows-cygwin: Cygwin's installer (default: setup-x86_64.exe in the local mirror)
    #[arg(
        long,
        value_name = "FILE",
        help_heading = "Windows (--profile windows-cygwin)"
    )]
    cygwin_setup: Option<PathBuf>,
    /// windows-cygwin: Cygwin packages beyond openssh and cygrunsrv (comma-separated)
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        help_heading = "Windows (--profile windows-cygwin)"
    )]
    cygwin_packages: Vec<String>,
    /// windows-cygwin: WinFsp's installer (winfsp-*.msi), which the virtio-fs service needs
    #[arg(
        long,
        value_name = "FILE",
        help_heading = "Windows (--profile windows-cygwin)"
    )]
    winfsp: Option<PathBuf>,
    /// The distribution image for --profile image: a cached image's name or key, or a file
    #[arg(long, value_name = "IMAGE|NAME")]
    image: Option<String>,
    /// The snapshot directory to create (its parent must exist)
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Replace DIR if it already holds something
    #[arg(long)]
    replace: bool,
    /// Target memory: MiB, or with a unit (512M, 1G); the state file is about this big
    /// [default: 256, windows-cygwin 4G]
    #[arg(long, value_name = "SIZE", allow_negative_numbers = true,
          value_parser = super::values::memory_mib)]
    memory: Option<u32>,
    /// Target vCPUs, 1 to 255 [default: 1, windows-cygwin 2]
    #[arg(long, value_name = "N", allow_negative_numbers = true,
          value_parser = super::values::cpus)]
    cpus: Option<u32>,
    /// Target disk size, e.g. 1G or 512M (sparse) [default: 1G, windows-cygwin 64G]
    #[arg(long, value_name = "SIZE")]
    disk_size: Option<String>,
    /// Accelerator: auto uses KVM only where it can run a Linux guest
    #[arg(long, value_name = "ACCEL", value_enum, default_value = "auto")]
    accel: AccelChoice,
    /// How long the target may take to answer SSH after it starts booting (seconds)
    /// [default: 120, windows-cygwin 900]
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    ssh_wait: Option<f64>,
    /// No progress lines and no notices (such as the fallback to TCG); errors are printed
    #[arg(long, short)]
    quiet: bool,
    /// Print the manifest as JSON on stdout when done
    #[arg(long)]
    json: bool,
    /// Share the snapshot with GROUP (a name or number) when done: every file readable
    /// by the group, so its members can build from it (see `vmbuild snapshot share`)
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// How the target's memory is written: zstd (QEMU's multifd channels compressed, a
    /// fraction of the RAM on disk: the fastest cold revive) or mapped-ram (uncompressed,
    /// read in place: the fastest warm revive of memory that does not compress)
    #[arg(long, value_name = "FORMAT", value_enum, default_value = "zstd")]
    state_format: StateFormatChoice,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum StateFormatChoice {
    Zstd,
    MappedRam,
}

impl BootstrapArgs {
    pub fn run(self) -> anyhow::Result<i32> {
        let spec = match self.spec() {
            Ok(s) => s,
            Err(msg) => {
                eprintln!("vmbuild bootstrap: {msg}");
                return Ok(exit::USAGE);
            }
        };
        if let Some(group) = &self.group {
            if let Err(msg) = super::snapshot::may_share_with(group) {
                eprintln!("vmbuild bootstrap: --group {group}: {msg}");
                return Ok(exit::USAGE);
            }
        }
        let signals = super::signal_channel::signal_channel()?;
        match bootstrap(&spec, signals) {
            Ok(Ok(manifest)) => {
                if let Some(group) = &self.group {
                    if let Err(msg) = crate::snapshot::access::share_with_group(&self.out, group) {
                        eprintln!("vmbuild bootstrap: sharing the snapshot with {group}: {msg}");
                        return Ok(exit::FAILURE);
                    }
                }
                if self.json {
                    println!("{}", serde_json::to_string_pretty(&manifest)?);
                }
                Ok(exit::SUCCESS)
            }
            Ok(Err(failure)) => Ok(match failure {
                BootstrapFailure::Interrupted => {
                    eprintln!("vmbuild bootstrap: interrupted; nothing was kept");
                    exit::INTERRUPTED
                }
                BootstrapFailure::TargetUnreachable(tail) => {
                    eprintln!(
                        "vmbuild bootstrap: the target did not answer SSH within {} s; its console ended with:\n{tail}",
                        spec.ssh_wait.as_secs_f64()
                    );
                    exit::TARGET_UNREACHABLE
                }
                BootstrapFailure::HandshakeFailed(detail) => {
                    eprintln!("vmbuild bootstrap: the controller could not log into the target:\n{detail}");
                    exit::TARGET_UNREACHABLE
                }
                BootstrapFailure::TargetStopped(why) => {
                    eprintln!("vmbuild bootstrap: {why}");
                    exit::VM_FAILED
                }
                BootstrapFailure::InstallFailed(why) => {
                    eprintln!("vmbuild bootstrap: {why}");
                    exit::VM_FAILED
                }
                BootstrapFailure::ControllerDied(detail) => {
                    eprintln!("vmbuild bootstrap: the controller VM failed: {detail}");
                    exit::VM_FAILED
                }
            }),
            Err(e) => {
                eprintln!("vmbuild bootstrap: {e:#}");
                Ok(exit::VM_FAILED)
            }
        }
    }

    fn windows_inputs(&self) -> WindowsInputs {
        WindowsInputs {
            iso: self.iso.clone(),
            virtio_win: self.virtio_win.clone(),
            edition: self.edition.clone(),
            cygwin_mirror: self.cygwin_mirror.clone(),
            cygwin_setup: self.cygwin_setup.clone(),
            cygwin_packages: self.cygwin_packages.clone(),
            winfsp: self.winfsp.clone(),
        }
    }

    fn spec(&self) -> Result<BootstrapSpec, String> {
        let windows = self.windows_inputs();
        let profile: Box<dyn profile::Profile> = match (self.profile.as_str(), &self.image) {
            ("image", Some(what)) => Box::new(profile::Image {
                image: Some(super::image::locate(what)?),
            }),
            (_, Some(_)) => return Err("--image needs --profile image".into()),
            ("windows-cygwin", None) => Box::new(profile::WindowsCygwin {
                inputs: Some(windows.check()?),
            }),
            (_, None) if windows.any() => {
                return Err(format!(
                    "--iso, --virtio-win, --edition, --cygwin-* and --winfsp are for --profile windows-cygwin, not {}",
                    self.profile
                ))
            }
            (name, None) => profile::by_name(name).map_err(|e| e.to_string())?,
        };
        profile.available()?;
        let defaults = profile.machine_defaults();
        let memory = self.memory.unwrap_or(defaults.memory_mib);
        if memory < 128 {
            return Err(format!(
                "--memory {memory} MiB is below the 128 MiB the target needs"
            ));
        }
        super::values::check_fits_host(memory)?;
        let disk_size_mib = match &self.disk_size {
            Some(size) => parse_size_mib(size)?,
            None => defaults.disk_mib,
        };
        // A typo in the parent is a mistake to report, not a directory tree to create.
        let parent = match self.out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => std::path::Path::new("."),
        };
        if !parent.is_dir() {
            return Err(format!(
                "--out {}: its parent directory {} does not exist (create it first)",
                self.out.display(),
                parent.display()
            ));
        }
        if let Some(staging) = crate::workflow::bootstrap::out_in_use(&self.out) {
            return Err(format!(
                "--out {}: another bootstrap is writing it now (its staging directory {} is in use); wait for it or choose another --out",
                self.out.display(),
                staging.display()
            ));
        }
        if self.out.exists() {
            let empty = std::fs::read_dir(&self.out)
                .map(|mut d| d.next().is_none())
                .map_err(|e| format!("--out {}: {e}", self.out.display()))?;
            if !empty && !self.replace {
                return Err(format!(
                    "--out {} exists and is not empty: choose another directory or pass --replace",
                    self.out.display()
                ));
            }
            if !empty && !self.out.join("manifest.json").is_file() {
                return Err(format!(
                    "--out {}: refusing to replace a directory that is not a vmbuild snapshot",
                    self.out.display()
                ));
            }
        }
        let ssh_wait = self.ssh_wait.unwrap_or(defaults.ssh_wait_secs);
        let ssh_wait = super::run::seconds(ssh_wait, "--ssh-wait", 86_400.0)
            .map_err(|super::run::Usage(m)| m)?;
        let qemu = QemuBinary::locate().map_err(|e| format!("{e:#}"))?;
        let kit = GuestKit::locate().map_err(|e| format!("{e:#}"))?;
        if self.accel == accel::AccelChoice::Kvm {
            accel::kvm_access()
                .map_err(|why| format!("--accel kvm: {why} (or use --accel auto or tcg)"))?;
            if let Some(why) = accel::known_not_to_run_linux(&kit.kernel, &kit.initrd) {
                return Err(format!(
                    "--accel kvm: {why}; the guest would stop in KVM (use --accel auto or tcg)"
                ));
            }
        }
        let (accel, notice) = accel::resolve(self.accel, &qemu.path, &kit.kernel, &kit.initrd);
        if let (Some(n), false) = (notice, self.quiet) {
            eprintln!("vmbuild bootstrap: {n}");
        }
        Ok(BootstrapSpec {
            profile,
            out: self.out.clone(),
            replace: self.replace,
            qemu,
            accel,
            kit,
            memory_mib: memory,
            cpus: self.cpus.unwrap_or(defaults.cpus),
            disk_size_mib,
            ssh_wait,
            progress: !self.quiet,
            state_format: match self.state_format {
                StateFormatChoice::Zstd => crate::snapshot::manifest::snapshot_state_format(),
                StateFormatChoice::MappedRam => crate::qemu::StateFormat::MappedRamMultifd(
                    crate::snapshot::manifest::default_channels(),
                ),
            },
        })
    }
}

/// The largest disk a bootstrap makes: 64 TiB, far past any build machine's disk.
const MAX_DISK_MIB: u64 = 64 * 1024 * 1024;

/// `1G`, `512M`, `2048` (MiB) → MiB; at least 64 MiB.
fn parse_size_mib(text: &str) -> Result<u64, String> {
    let mib = super::values::size_mib(text)
        .ok_or_else(|| format!("--disk-size '{text}': expected a size like 1G or 512M"))?;
    if mib < 64 {
        return Err(format!("--disk-size '{text}' is below 64M"));
    }
    if mib > MAX_DISK_MIB {
        return Err(format!("--disk-size '{text}' is more than 64T"));
    }
    Ok(mib)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_parse() {
        assert_eq!(super::parse_size_mib("1G"), Ok(1024));
        assert_eq!(super::parse_size_mib("512M"), Ok(512));
        assert_eq!(super::parse_size_mib("100"), Ok(100));
        assert_eq!(super::parse_size_mib("1T"), Ok(1024 * 1024));
        assert!(super::parse_size_mib("99999999T")
            .unwrap_err()
            .contains("more than"));
        assert!(super::parse_size_mib("10M").is_err());
    }
}
