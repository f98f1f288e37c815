//! `vmbuild doctor`: what this host can do and why, each finding with a fix hint.

use std::process::Command;
use vm_memory::{Bytes, GuestAddress};

use clap::Args;
use serde::Serialize;

use crate::accel;
use crate::exit;
use crate::guest::kit::GuestKit;
use crate::qemu::QemuBinary;

#[derive(Args, Debug)]
#[command(after_help = "\
Exit status:
  0  vmbuild can run guests here (warnings say what is slower or missing)
  1  a capability run, build or bootstrap need is missing (see the fix: lines)
  2  bad command line

Environment: VMBUILD_QEMU (the QEMU binary), VMBUILD_GUEST_KIT (the guest kit directory),
XDG_CACHE_HOME (cached probe answers), RUST_LOG (log filter).")]
pub struct DoctorArgs {
    /// One JSON object instead of text
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Finding {
    check: &'static str,
    /// "ok", "warn" (vmbuild works, slower or with less), "fail" (a capability is missing).
    status: &'static str,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

fn finding(
    check: &'static str,
    status: &'static str,
    detail: impl Into<String>,
    fix: Option<&str>,
) -> Finding {
    Finding {
        check,
        status,
        detail: detail.into(),
        fix: fix.map(str::to_owned),
    }
}

impl DoctorArgs {
    pub fn run(self) -> anyhow::Result<i32> {
        let mut f = Vec::new();
        let qemu = check_qemu(&mut f);
        check_ssh(&mut f);
        let kit = check_kit(&mut f);
        check_kvm(&mut f, qemu.as_ref().ok(), kit.as_ref().ok());
        check_network(&mut f);
        check_image_builds(&mut f);
        report(&f, self.json)
    }
}

/// QEMU itself and the features vmbuild relies on.
fn check_qemu(f: &mut Vec<Finding>) -> anyhow::Result<QemuBinary> {
    let qemu = QemuBinary::locate();
    match &qemu {
        Ok(q) => f.push(finding(
            "qemu",
            "ok",
            format!(
                "{} {}.{}.{}",
                q.path.display(),
                q.version.0,
                q.version.1,
                q.version.2
            ),
            None,
        )),
        Err(e) => f.push(finding(
            "qemu",
            "fail",
            format!("{e:#}"),
            Some("install QEMU 7.2 or newer (Debian: apt-get install qemu-system-x86; or scripts/install-host-deps.sh from vmbuild's source)"),
        )),
    }
    if let Ok(q) = &qemu {
        let devices = Command::new(&q.path)
            .args(["-device", "help"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let fs = devices.contains("vhost-user-fs-pci");
        f.push(finding(
            "qemu_vhost_user_fs",
            if fs { "ok" } else { "fail" },
            if fs {
                "vhost-user-fs-pci available"
            } else {
                "this QEMU has no vhost-user-fs-pci"
            },
            (!fs).then_some("install qemu-system-x86 from bookworm-backports"),
        ));
        let mapped = (q.version.0, q.version.1) >= (9, 0);
        f.push(finding(
            "qemu_mapped_ram",
            if mapped { "ok" } else { "warn" },
            if mapped {
                "file: migration with mapped-ram"
            } else {
                "no mapped-ram (QEMU < 9.0): snapshots use plain file:"
            },
            (!mapped).then_some("QEMU 10 from bookworm-backports"),
        ));
        let qboot = q.firmware("qboot.rom");
        f.push(finding(
            "qemu_qboot",
            if qboot.is_some() { "ok" } else { "warn" },
            qboot
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "no qboot.rom: SeaBIOS, ~0.3 s slower boots".into()),
            None,
        ));
    }
    qemu
}

/// What `vmbuild image build` runs on the host.
fn check_image_builds(f: &mut Vec<Finding>) {
    f.push(match crate::image::mkfs::host_tools() {
        Ok(found) => finding("image_builds", "ok", found, None),
        Err(e) => finding(
            "image_builds",
            "warn",
            format!("vmbuild image build cannot run: {e:#}"),
            Some(
                "scripts/install-host-deps.sh (e2fsprogs from bookworm-backports, apt, curl, dpkg)",
            ),
        ),
    });
}

/// The SSH tools bootstrap and build put into their guests.
fn check_ssh(f: &mut Vec<Finding>) {
    match crate::snapshot::dropbear::check_installed() {
        Ok(()) => f.push(finding(
            "ssh_for_snapshots",
            "ok",
            "dropbear server, client and keygen (bootstrap/build)",
            None,
        )),
        Err(e) => f.push(finding(
            "ssh_for_snapshots",
            "fail",
            format!("{e:#}"),
            Some("apt-get install dropbear-bin (or scripts/install-host-deps.sh)"),
        )),
    }
}

/// The guest kit: the kernel and initramfs every guest boots.
fn check_kit(f: &mut Vec<Finding>) -> anyhow::Result<GuestKit> {
    let kit = GuestKit::locate();
    match &kit {
        Ok(k) => {
            let release = k
                .info()
                .and_then(|i| i.kernel_release)
                .map(|r| format!(" (kernel {r})"))
                .unwrap_or_default();
            let detail = format!("{}{release}", GuestKit::dir().display());
            f.push(finding("guest_kit", "ok", detail, None))
        }
        Err(e) => f.push(finding(
            "guest_kit",
            "fail",
            format!("{e:#}"),
            Some("scripts/guest-kit.sh"),
        )),
    }
    kit
}

/// KVM: the device, whether it runs Linux (under QEMU, and in the embedded VMM), and
/// whether the embedded VMM runs a guest at all.
fn check_kvm(f: &mut Vec<Finding>, qemu: Option<&QemuBinary>, kit: Option<&GuestKit>) {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    f.push(match &kvm {
        Ok(_) => finding("kvm_device", "ok", "/dev/kvm opens read-write", None),
        Err(e) => finding(
            "kvm_device",
            "warn",
            format!("/dev/kvm: {e}"),
            Some("load kvm_intel/kvm_amd, or join the kvm group; vmbuild falls back to TCG"),
        ),
    });
    if let (Some(q), Some(k), Ok(_)) = (qemu, kit, &kvm) {
        let probe = accel::probe_kvm_cached(&q.path, &k.kernel, &k.initrd);
        f.push(finding(
            "kvm_runs_linux",
            if probe.usable { "ok" } else { "warn" },
            probe.reason,
            (!probe.usable).then_some("nothing to fix here: guests run under TCG (slower); a host with full KVM runs them natively"),
        ));
        // The embedded VMM's own boot of the kit: what lets `run --vmm auto` and a
        // build's controller use it. Only asked where KVM runs Linux at all.
        let embedded = if probe.usable {
            accel::probe_embedded_cached(&q.path, &k.kernel, &k.initrd)
        } else {
            accel::KvmProbe::unknown(
                "not probed: this host's KVM does not run Linux (kvm_runs_linux)".into(),
            )
        };
        f.push(finding(
            "embedded_runs_linux",
            if embedded.usable { "ok" } else { "warn" },
            embedded.reason,
            (!embedded.usable).then_some(
                "run and build use QEMU for their Linux guests (--vmm qemu, --controller revive)",
            ),
        ));
    }
    if kvm.is_ok() {
        f.push(match embedded_vmm_check() {
            Ok(ms) => finding(
                "embedded_vmm",
                "ok",
                format!("the embedded KVM VMM runs a guest (VM creation to first instruction {ms:.2} ms)"),
                None,
            ),
            Err(e) => finding(
                "embedded_vmm",
                "warn",
                format!("the embedded KVM VMM cannot run a guest here: {e:#}"),
                Some("check /dev/kvm permissions; QEMU remains available"),
            ),
        });
    }
}

/// What `switch` needs: tun and the right to make taps and namespaces.
fn check_network(f: &mut Vec<Finding>) {
    f.push(
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
        {
            Ok(_) => finding("tun", "ok", "/dev/net/tun opens read-write", None),
            // Only `switch --tap` needs it: run, build and bootstrap work without.
            Err(e) => finding(
                "tun",
                "warn",
                format!("/dev/net/tun: {e}; `vmbuild switch --tap` cannot make taps (run, build and bootstrap do not need it)"),
                Some("modprobe tun; taps need CAP_NET_ADMIN"),
            ),
        },
    );
    let root = nix::unistd::geteuid().is_root();
    f.push(finding(
        "network_namespaces",
        if root { "ok" } else { "warn" },
        if root {
            "running as root: taps and namespaces can be made"
        } else {
            "not root: taps and namespaces need CAP_NET_ADMIN"
        },
        (!root).then_some("run as root or grant CAP_NET_ADMIN"),
    ));
}

/// The findings as a table (with fix hints) or JSON, and the exit code they mean.
fn report(f: &[Finding], json: bool) -> anyhow::Result<i32> {
    let usable = f.iter().all(|x| x.status != "fail");
    if json {
        println!("{}", serde_json::json!({ "usable": usable, "findings": f }));
    } else {
        for x in f {
            println!("{:<5} {:<20} {}", x.status, x.check, x.detail);
            if let Some(fix) = &x.fix {
                println!("{:<26} fix: {fix}", "");
            }
        }
        println!(
            "\n{}",
            if usable {
                "vmbuild can run guests here."
            } else {
                "vmbuild cannot run guests here until the failures above are fixed."
            }
        );
    }
    Ok(if usable { exit::SUCCESS } else { exit::FAILURE })
}

/// Runs a three-instruction real-mode guest in the embedded VMM (out 0x80, hlt).
fn embedded_vmm_check() -> anyhow::Result<f64> {
    use embedded_vmm::{cpu_mode, memory::GuestRam, vcpu, vm::Vm};
    struct Quiet;
    impl vcpu::Bus for Quiet {
        fn pio_write(&self, _: u16, _: &[u8]) {}
        fn mmio_write(&self, _: u64, _: &[u8]) {}
    }
    let start = std::time::Instant::now();
    let ram = GuestRam::new(1 << 20)?;
    ram.write_slice(&[0xe6, 0x80, 0xf4], GuestAddress(0x7c00))?;
    let mut vm = Vm::new(ram, 1)?;
    cpu_mode::enter(
        &vm.vcpus()[0],
        vm.ram(),
        cpu_mode::CpuMode::Real,
        0x7c00,
        0x7000,
    )?;
    let pause = std::sync::atomic::AtomicBool::new(false);
    match vcpu::run(vm.vcpu_mut(0), &Quiet, &pause) {
        vcpu::Stop::Halted => Ok(start.elapsed().as_secs_f64() * 1000.0),
        other => anyhow::bail!("the test guest ended with {other:?}"),
    }
}
