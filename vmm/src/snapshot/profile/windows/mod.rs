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
//! - `tpm`: swtpm for Windows 11.
//!
//! `install` runs the install inside `vmbuild bootstrap` and returns the UEFI machine the
//! snapshot records (`target.rs` builds it for the boot and every revive). A build reaches
//! the target through Cygwin's sshd: its session script runs in Cygwin, writes its markers
//! to COM1 (the console QEMU connects to vmbuild), starts virtio-fs on a drive letter per
//! share, and runs the command in xchg's drive.
//!
//! Tests boot a STAND-IN target instead of Windows when `VMBUILD_TEST_WINDOWS_STAND_IN`
//! names a directory (`bzImage`, `initrd`, `append`): a Linux guest that plays Windows'
//! part on the same machine, ports and files. No Windows media can be had where vmbuild
//! is tested; nothing else changes.

pub mod answer_file;
pub mod config_iso;
pub mod first_logon;
pub mod inputs;
pub mod install_run;
pub mod install_watch;
pub mod machine;
pub mod media;
pub mod tpm;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use super::{Boot, InstallContext, InstallFailed, InstallInterrupted, MachineDefaults, Profile};
use crate::qemu::Accel;
use crate::snapshot::manifest::UefiPlan;
use install_run::{InstallRun, RunFailure, StandIn, VARS_FILE};
use install_watch::{InstallFailure, Limits};

/// The profile; `inputs` are the checked command line of a bootstrap (a build needs none:
/// the snapshot holds the installed target).
#[derive(Default)]
pub struct WindowsCygwin {
    pub inputs: Option<inputs::CheckedInputs>,
}

/// The test hook: a directory with the stand-in target's `bzImage`, `initrd` and `append`
/// (and optionally `limit-secs`, each install phase's limit), booted instead of Windows.
pub const STAND_IN_ENV: &str = "VMBUILD_TEST_WINDOWS_STAND_IN";
/// The stand-in's kernel and initramfs in the snapshot (it boots them again as its
/// "installed system").
const STAND_IN_KERNEL: &str = "stand-in-bzImage";
const STAND_IN_INITRD: &str = "stand-in-initrd";

/// Where Cygwin sees WinFsp's launcher (`launchctl-x64.exe`), which starts one instance of
/// virtio-win's `virtiofs.exe` per share (registered as the `virtiofs` class by setup.sh).
pub const LAUNCHCTL: &str = "/cygdrive/c/Program Files (x86)/WinFsp/bin/launchctl-x64.exe";

/// The stand-in named by `STAND_IN_ENV`, if any.
fn stand_in() -> anyhow::Result<Option<(StandIn, Option<Duration>)>> {
    let Some(dir) = std::env::var_os(STAND_IN_ENV).map(PathBuf::from) else {
        return Ok(None);
    };
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .with_context(|| format!("{STAND_IN_ENV}: reading {}", dir.join(name).display()))
    };
    let limit = match dir.join("limit-secs").exists() {
        true => Some(Duration::from_secs(read("limit-secs")?.trim().parse()?)),
        false => None,
    };
    let stand_in = StandIn {
        kernel: dir.join("bzImage"),
        initrd: dir.join("initrd"),
        append: read("append")?.trim().to_owned(),
        console: Some(dir.join("install-console.log")),
    };
    Ok(Some((stand_in, limit)))
}

/// The drive letter a share gets: xchg's mount point names it (`/cygdrive/x`), others
/// (the store) take S:.
fn drive_letter(mountpoint: &str) -> char {
    let rest = mountpoint.strip_prefix("/cygdrive/").unwrap_or("");
    let mut chars = rest.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None | Some('/')) if c.is_ascii_alphabetic() => c.to_ascii_uppercase(),
        _ => 'S',
    }
}

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
            Some(_) => Ok(()),
            None => Err(
                "the windows-cygwin profile is installed by `vmbuild bootstrap --profile windows-cygwin --iso … --virtio-win …`".into(),
            ),
        }
    }

    fn machine_defaults(&self) -> MachineDefaults {
        // Windows 11's own minimums (4 GiB, 64 GB); the disk is sparse. Windows boots
        // slower than the minimal Linux target, more so the first time after its install.
        MachineDefaults {
            memory_mib: 4096,
            cpus: 2,
            disk_mib: 64 * 1024,
            ssh_wait_secs: 900.0,
        }
    }

    fn install(&self, ctx: &InstallContext) -> anyhow::Result<Boot> {
        let inputs = self
            .inputs
            .as_ref()
            .context("the windows-cygwin profile installs only from checked inputs")?;
        ctx.progress.note(&format!(
            "installing {} edition '{}' (index {}, build {}) from {}",
            inputs.version.name(),
            inputs.image.name,
            inputs.image.index,
            inputs
                .image
                .build
                .map_or("unknown".into(), |b| b.to_string()),
            inputs.iso.display()
        ));
        let stand_in = stand_in()?;
        if stand_in.is_some() {
            ctx.progress.note(&format!(
                "{STAND_IN_ENV} is set: installing the tests' STAND-IN target (a Linux guest), not Windows"
            ));
        }
        let kvm = ctx.accel == Accel::Kvm;
        let limits = match &stand_in {
            Some((_, Some(limit))) => Limits::uniform(*limit, Duration::from_secs(2)),
            _ => Limits::windows(kvm),
        };
        let firmware = machine::find_firmware(inputs.version).map_err(anyhow::Error::msg)?;
        let machine_type = ctx.qemu.resolve_machine(self.machine_type())?;
        let run = InstallRun {
            ctx,
            machine_type: &machine_type,
            inputs,
            limits: &limits,
            shutdown_limit: if kvm {
                Duration::from_secs(300)
            } else {
                Duration::from_secs(1800)
            },
            stand_in: stand_in.as_ref().map(|(s, _)| s),
        };
        let report = match run.run() {
            Ok(report) => report,
            Err(RunFailure::Install(InstallFailure::Interrupted)) => {
                return Err(InstallInterrupted.into())
            }
            Err(RunFailure::Install(failure)) => {
                return Err(InstallFailed(format!("the Windows install failed: {failure}")).into())
            }
            Err(RunFailure::Error(e)) => return Err(e),
        };
        if !report.clean_shutdown {
            ctx.progress.note(
                "the installed target did not shut down by itself in time; it was stopped (its disk may need a check on first boot)",
            );
        }
        let mut boot = Boot {
            uefi: Some(UefiPlan {
                firmware: firmware.code.display().to_string(),
                secure_boot: firmware.secure_boot,
                vars: VARS_FILE.into(),
                tpm: inputs.version.needs_tpm(),
            }),
            ..Boot::default()
        };
        if let Some((s, _)) = &stand_in {
            // The stand-in's "installed system" is its kernel again, booted by OVMF.
            for (from, to) in [(&s.kernel, STAND_IN_KERNEL), (&s.initrd, STAND_IN_INITRD)] {
                std::fs::copy(from, ctx.out.join(to))
                    .with_context(|| format!("copying {}", from.display()))?;
            }
            boot.kernel = Some(STAND_IN_KERNEL.into());
            boot.initrd = Some(STAND_IN_INITRD.into());
            boot.append = Some(s.append.clone());
        }
        Ok(boot)
    }

    fn console_device(&self) -> &'static str {
        // COM1 in Cygwin; QEMU connects the machine's first serial port to vmbuild.
        "/dev/ttyS0"
    }

    fn mount_share(&self, tag: &str, mountpoint: &str, _read_only: bool) -> String {
        share_lines(tag, mountpoint)
    }

    fn session_workdir(&self, xchg_mount: &str) -> Option<String> {
        // The command starts in xchg's drive, the directory a Windows build reads and
        // writes; its Windows name is converted as every Windows path is, by cygpath.
        let letter = drive_letter(xchg_mount);
        Some(cygwin_path(&format!("{letter}:\\")))
    }
}

/// The session's lines that make share `tag` a drive and, for a mount point outside
/// /cygdrive, a Cygwin mount of it: WinFsp's launcher starts virtio-win's `virtiofs.exe`
/// for the tag (`-t TAG -m X:`, as setup.sh registered it), retried while the device
/// plugged in a moment ago is still being bound to its driver.
fn share_lines(tag: &str, mountpoint: &str) -> String {
    let letter = drive_letter(mountpoint);
    let drive = format!("/cygdrive/{}", letter.to_ascii_lowercase());
    let mut s = format!(
        r#"i=0
until [ -d {drive}/ ]; do
	if [ $((i % 20)) -eq 0 ]; then launched=$("{LAUNCHCTL}" start virtiofs viofs{letter} {tag} {letter}: 2>&1); fi
	i=$((i + 1))
	if [ $i -gt 600 ]; then echo "vmbuild: the share {tag} did not appear as {letter}: (WinFsp's launcher, virtiofs.exe: $launched)" >&2; exit 125; fi
	sleep 0.1
done
"#
    );
    if !mountpoint.starts_with("/cygdrive/") {
        s.push_str(&format!(
            "mkdir -p '{mountpoint}' && mount -o binary {letter}: '{mountpoint}' || {{ echo \"vmbuild: cannot mount {letter}: at {mountpoint}\" >&2; exit 125; }}\n"
        ));
    }
    s
}

/// Where a path the user gives for the target lands in Cygwin: `X:\dir` through cygpath,
/// a POSIX path as it is.
pub fn cygwin_path(path: &str) -> String {
    let b = path.as_bytes();
    if b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':' {
        format!("\"$(cygpath -u '{}')\"", path.replace('\'', ""))
    } else {
        path.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_get_the_letter_their_mount_point_names_and_the_store_gets_s() {
        assert_eq!(drive_letter("/cygdrive/x"), 'X');
        assert_eq!(drive_letter("/cygdrive/x/"), 'X');
        assert_eq!(drive_letter("/gnu/store"), 'S');
        assert_eq!(drive_letter("/cygdrive/xy"), 'S');
        let xchg = share_lines("xchg", "/cygdrive/x");
        assert!(xchg.contains("start virtiofs viofsX xchg X:"), "{xchg}");
        assert!(xchg.contains("until [ -d /cygdrive/x/ ]"));
        assert!(xchg.contains("exit 125"));
        assert!(!xchg.contains("mount -o"));
        let store = share_lines("store", "/gnu/store");
        assert!(store.contains("start virtiofs viofsS store S:"));
        assert!(store.contains("mount -o binary S: '/gnu/store'"));
        for script in [xchg, store] {
            let out = std::process::Command::new("sh")
                .args(["-n", "-c", &script])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    #[test]
    fn windows_paths_go_through_cygpath_and_posix_paths_stay() {
        assert_eq!(cygwin_path("X:\\out"), "\"$(cygpath -u 'X:\\out')\"");
        assert_eq!(cygwin_path("/cygdrive/x/out"), "/cygdrive/x/out");
    }
}
