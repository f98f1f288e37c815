//! The guest kit's Linux under the embedded VMM (PVH entry, initramfs, COM1 console).
//!
//! Where the host's KVM can run Linux (the probe `vmbuild doctor` reports), the kit must
//! boot to its init, run its command and reset. This host's nested, paging-emulated KVM
//! cannot (it stops with an emulation failure ~20 s in): there the test checks what it
//! can — the kernel starts from the PVH entry, finds its command line, prints its banner,
//! and reads the ACPI tables (RSDP, XSDT, FADT, MADT, DSDT) the VMM wrote — and prints
//! why the rest is skipped.

use std::time::Duration;

use vmbuild::kvm::linux::{LinuxConfig, LinuxEnd, LinuxVm};
use vmbuild::kvm::uart::Transcript;
use vmbuild::kvm::virtio::console::ConsoleDevice;

/// The guest kit's kernel and initramfs, where there is a KVM to boot them; otherwise
/// reports test `name` skipped and gives nothing.
fn kit(name: &str) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    if !std::path::Path::new("/dev/kvm").exists() {
        vmbuild_tests::skip(name, "no /dev/kvm");
        return None;
    }
    let dir = std::env::var_os("VMBUILD_GUEST_KIT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/var/cache/vmbuild/guest-kit".into());
    let (k, i) = (dir.join("vmlinux"), dir.join("initrd.img"));
    if !(k.is_file() && i.is_file()) {
        vmbuild_tests::skip(name, "no guest kit (scripts/guest-kit.sh)");
        return None;
    }
    Some((k, i))
}

#[test]
fn the_guest_kit_boots_from_its_pvh_entry() {
    let Some((kernel, initrd)) = kit("the_guest_kit_boots_from_its_pvh_entry") else {
        return;
    };
    let probe = vmbuild::accel::probe_kvm_cached(
        std::path::Path::new("qemu-system-x86_64"),
        &kernel,
        &initrd,
    );
    let cmdline = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1 cryptomgr.notests \
                   vmbuild.cmd=/bin/true";
    let mut vm = LinuxVm::new(
        &LinuxConfig {
            kernel: &kernel,
            initrd: Some(&initrd),
            cmdline,
            memory_mib: 256,
        },
        Transcript::new(None),
        Vec::new(),
        vec![Box::new(ConsoleDevice::new().0)],
    )
    .unwrap();
    let limit = std::env::var("VMBUILD_KVM_LINUX_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if probe.usable { 60 } else { 30 });
    let end = vm.run(Duration::from_secs(limit));
    let console = vm.console.text();
    if std::env::var_os("VMBUILD_SHOW_CONSOLE").is_some() {
        eprintln!("{console}\n--- {end:?}");
    }
    // Whatever the host: the kernel ran from the PVH entry and got its command line.
    assert!(
        console.contains("Linux version"),
        "no kernel banner on the console ({end:?}):\n{console}"
    );
    assert!(
        console.contains("vmbuild.cmd=/bin/true"),
        "the kernel did not see its command line:\n{console}"
    );
    // Past setup_arch (the "Memory:" line), the kernel has read our ACPI tables: the
    // virtio-mmio devices' DSDT and the MADT with its IOAPIC.
    if console.contains("Memory: ") {
        for line in ["ACPI: DSDT", "ACPI: APIC", "Using ACPI (MADT)"] {
            assert!(
                console.contains(line),
                "no '{line}' on the console:\n{console}"
            );
        }
    }
    if probe.usable {
        assert!(
            console.contains("vmbuild-phase=init"),
            "the kit's init never ran ({end:?}):\n{console}"
        );
        assert!(console.contains("vmbuild-exit=0"), "{console}");
        assert_eq!(end, LinuxEnd::PowerOff, "the kit powers off with ACPI");
    } else {
        vmbuild_tests::skip(
            "the_guest_kit_boots_from_its_pvh_entry (boot to init)",
            &probe.reason,
        );
    }
}

#[test]
fn a_booting_linux_is_snapshotted_and_restored_and_keeps_booting() {
    let name = "a_booting_linux_is_snapshotted_and_restored_and_keeps_booting";
    let Some((kernel, initrd)) = kit(name) else {
        return;
    };
    let config = LinuxConfig {
        kernel: &kernel,
        initrd: Some(&initrd),
        // No vmbuild.cmd: the kit's init ends in an idle shell, so a fast host keeps the
        // guest alive for the snapshot too.
        cmdline: "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1 cryptomgr.notests",
        memory_mib: 256,
    };
    let mut vm = LinuxVm::new(
        &config,
        Transcript::new(None),
        Vec::new(),
        vec![Box::new(ConsoleDevice::new().0)],
    )
    .unwrap();
    // Run it in slices until it has printed its banner, then stop it there.
    let mut slices = 0;
    let before = loop {
        let end = vm.run(Duration::from_secs(2));
        if end != LinuxEnd::TimedOut {
            vmbuild_tests::skip(
                name,
                &format!("the kernel ended before a snapshot ({end:?})"),
            );
            return;
        }
        let text = vm.console.text();
        if text.contains("Command line:") {
            break text;
        }
        slices += 1;
        assert!(slices < 30, "no kernel banner within 60 s:\n{text}");
    };
    let dir = tempfile::tempdir().unwrap();
    vm.snapshot(dir.path()).unwrap();
    drop(vm);

    let mut restored = LinuxVm::restore(
        dir.path(),
        Transcript::new(None),
        Vec::new(),
        vec![Box::new(ConsoleDevice::new().0)],
    )
    .unwrap();
    let end = restored.run(Duration::from_secs(20));
    let after = restored.console.text();
    if std::env::var_os("VMBUILD_SHOW_CONSOLE").is_some() {
        eprintln!("--- before the snapshot:\n{before}\n--- after the restore ({end:?}):\n{after}");
    }
    assert!(
        !after.contains("Linux version"),
        "the restored guest booted from scratch:\n{after}"
    );
    if before.contains("vmbuild-phase=init") {
        // A KVM that runs Linux booted it to the kit's idle shell within the first slice:
        // the restored guest must simply keep running.
        assert_eq!(
            end,
            LinuxEnd::TimedOut,
            "the restored guest stopped:\n{after}"
        );
    } else {
        assert!(
            after.lines().count() >= 3,
            "the restored guest did not carry on ({end:?}); before:\n{before}\nafter:\n{after}"
        );
    }
    // Its clock carried on from the snapshot: printk times continue, not restart.
    let first_after = after.lines().find_map(|l| {
        l.strip_prefix('[')?
            .split(']')
            .next()?
            .trim()
            .parse::<f64>()
            .ok()
    });
    let last_before = before.lines().rev().find_map(|l| {
        l.strip_prefix('[')?
            .split(']')
            .next()?
            .trim()
            .parse::<f64>()
            .ok()
    });
    if let (Some(a), Some(b)) = (first_after, last_before) {
        assert!(a >= b, "guest time went back: {b} → {a}");
    }
    // Device state came along: a restore with another set of devices is refused.
    assert!(LinuxVm::restore(dir.path(), Transcript::new(None), Vec::new(), Vec::new()).is_err());
}

#[test]
fn a_run_in_the_embedded_vmm_serves_its_shares_and_cleans_up() {
    use vmbuild::workflow::run::{RunEnd, RunSpec, Vmm};
    let name = "a_run_in_the_embedded_vmm_serves_its_shares_and_cleans_up";
    let Some((kernel, initrd)) = kit(name) else {
        return;
    };
    let qemu = vmbuild::qemu::QemuBinary::locate().unwrap();
    let probe = vmbuild::accel::probe_kvm_cached(&qemu.path, &kernel, &initrd);
    let runtime = tempfile::tempdir().unwrap();
    // This test binary's other tests do not use runtime directories.
    std::env::set_var("XDG_RUNTIME_DIR", runtime.path());
    let xchg = tempfile::tempdir().unwrap();
    std::fs::write(xchg.path().join("in"), "from the host\n").unwrap();
    let spec = RunSpec {
        qemu,
        accel: vmbuild::accel::Accel::Kvm,
        kernel,
        initrd,
        append: None,
        memory_mib: 256,
        cpus: 1,
        argv: ["sh", "-c", "cat /tmp/xchg/in > /tmp/xchg/out"]
            .iter()
            .map(Into::into)
            .collect(),
        shell: false,
        env: Vec::new(),
        cwd: None,
        store: None,
        xchg: Some(xchg.path().to_owned()),
        keep_xchg: false,
        no_xchg: false,
        nic: None,
        extra_shares: Vec::new(),
        disk: None,
        timeout: Some(Duration::from_secs(if probe.usable { 60 } else { 30 })),
        log: None,
        vmm: Vmm::Embedded,
        share_protocol: Default::default(),
    };
    let (_tx, rx) = std::sync::mpsc::channel();
    let outcome = vmbuild::workflow::run_embedded::run_embedded(&spec, rx).unwrap();
    // Nothing of the run is left.
    let left: Vec<_> = std::fs::read_dir(runtime.path().join("vmbuild"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
    if probe.usable {
        assert!(
            matches!(outcome.end, RunEnd::Exited(0)),
            "{:?}",
            outcome.end
        );
        assert_eq!(
            std::fs::read_to_string(xchg.path().join("out")).unwrap(),
            "from the host\n"
        );
    } else {
        // This host's KVM stops Linux with an emulation failure: the run says so.
        match &outcome.end {
            RunEnd::NoExitCode { why, .. } => {
                assert!(why.contains("emulation failure"), "{why}")
            }
            RunEnd::TimedOut(_) => {}
            other => panic!("unexpected end of an embedded run here: {other:?}"),
        }
        vmbuild_tests::skip(
            "a_run_in_the_embedded_vmm_serves_its_shares_and_cleans_up (command)",
            &probe.reason,
        );
    }
}

#[test]
fn the_guest_kits_bzimage_boots_through_the_64_bit_protocol() {
    let name = "the_guest_kits_bzimage_boots_through_the_64_bit_protocol";
    let Some((vmlinux, initrd)) = kit(name) else {
        return;
    };
    let probe = vmbuild::accel::probe_kvm_cached(
        std::path::Path::new("qemu-system-x86_64"),
        &vmlinux,
        &initrd,
    );
    let bzimage = vmlinux.with_file_name("bzImage");
    let mut vm = LinuxVm::new(
        &LinuxConfig {
            kernel: &bzimage,
            initrd: Some(&initrd),
            cmdline: "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1 vmbuild.cmd=/bin/true",
            memory_mib: 256,
        },
        Transcript::new(None),
        Vec::new(),
        Vec::new(),
    )
    .unwrap();
    let show = std::env::var_os("VMBUILD_SHOW_CONSOLE").is_some();
    // Where KVM runs Linux: the whole boot, banner and command line. Here the xz
    // decompressor alone takes minutes under this KVM's emulated paging: check that it
    // runs (no fault, no exit, moving on from where it was entered) and skip the rest.
    let slices = if probe.usable { 30 } else { 3 };
    let mut rips = Vec::new();
    let mut console = String::new();
    for _ in 0..slices {
        let end = vm.run(Duration::from_secs(2));
        console = vm.console.text();
        let rip = vm.vcpu_regs().unwrap().rip;
        if show {
            eprintln!("{end:?} rip={rip:#x}");
        }
        rips.push(rip);
        assert_eq!(end, LinuxEnd::TimedOut, "the bzImage stopped:\n{console}");
        if console.contains("Command line:") {
            break;
        }
    }
    if probe.usable {
        assert!(console.contains("Linux version"), "no banner:\n{console}");
        assert!(console.contains("vmbuild.cmd=/bin/true"), "{console}");
    } else {
        // The decompressor relocated itself above the 16 MiB the kernel is decompressed
        // to, and keeps running there.
        assert!(rips.iter().all(|r| *r > 16 << 20), "{rips:x?}");
        assert!(rips.windows(2).any(|w| w[0] != w[1]), "{rips:x?}");
        vmbuild_tests::skip(
            "the_guest_kits_bzimage_boots_through_the_64_bit_protocol (banner)",
            &probe.reason,
        );
    }
}

/// The embedded VMM's own probe (what lets `run --vmm auto` and a build's controller pick
/// it) must agree with QEMU's: where KVM boots the kit to init, the embedded VMM must too,
/// and where KVM cannot run Linux, the embedded VMM must say so with a reason rather than
/// hang or claim success.
#[test]
fn the_embedded_probe_agrees_with_qemus() {
    let name = "the_embedded_probe_agrees_with_qemus";
    let Some((kernel, initrd)) = kit(name) else {
        return;
    };
    let qemu = vmbuild::qemu::QemuBinary::locate().unwrap();
    let by_qemu = vmbuild::accel::probe_kvm_cached(&qemu.path, &kernel, &initrd);
    let started = std::time::Instant::now();
    let embedded = vmbuild::kvm::probe::boot_to_init(&kernel, &initrd, vmbuild::accel::PROBE_LIMIT);
    assert!(
        started.elapsed() < vmbuild::accel::PROBE_LIMIT + Duration::from_secs(5),
        "the probe overran its limit: {:?}",
        started.elapsed()
    );
    assert_eq!(
        embedded.usable, by_qemu.usable,
        "QEMU: {}; embedded: {}",
        by_qemu.reason, embedded.reason
    );
    assert!(!embedded.reason.is_empty());
}
