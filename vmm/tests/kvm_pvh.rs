//! The embedded VMM's Linux machine (`kvm::linux::LinuxVm`: PVH entry, COM1, the keyboard
//! controller, the ACPI sleep registers) with kernels the test assembles itself: an ELF
//! with a PVH note and a few instructions. Unlike the guest kit's Linux, these run on any
//! KVM, so the ways a guest ends a VM are checked here on every host.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmbuild::kvm::linux::{LinuxConfig, LinuxEnd, LinuxVm};
use vmbuild::kvm::uart::Transcript;

#[path = "support/pvh.rs"]
mod pvh;
use pvh::{echo_com2_until_newline, kvm_here, out_bytes, pvh_kernel, HALT_FOR_GOOD};

fn write_kernel(dir: &Path, code: &[u8]) -> PathBuf {
    let path = dir.join("vmlinux");
    std::fs::write(&path, pvh_kernel(code)).unwrap();
    path
}

fn boot(kernel: &Path) -> (LinuxVm, Transcript) {
    let console = Transcript::new(None);
    let vm = LinuxVm::new(
        &LinuxConfig {
            kernel,
            initrd: None,
            cmdline: "console=ttyS0",
            memory_mib: 64,
        },
        console.clone(),
        Vec::new(),
        Vec::new(),
    )
    .unwrap();
    (vm, console)
}

/// S5 through the FADT's sleep control register ends the VM as a power-off; a write of
/// another sleep state does not.
#[test]
fn acpi_s5_powers_the_vm_off() {
    if !kvm_here("acpi_s5_powers_the_vm_off") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut code = out_bytes(0x3f8, b"up\n");
    // S3 (sleep type 3 | SLP_EN) is not offered: ignored, the guest carries on.
    code.extend(out_bytes(
        vmbuild::kvm::acpi::SLEEP_CONTROL_PORT,
        &[(3 << 2) | (1 << 5)],
    ));
    code.extend(out_bytes(0x3f8, b"still here\n"));
    code.extend(out_bytes(
        vmbuild::kvm::acpi::SLEEP_CONTROL_PORT,
        &[vmbuild::kvm::acpi::S5_POWER_OFF],
    ));
    code.extend(out_bytes(0x3f8, b"after power-off\n"));
    code.extend(HALT_FOR_GOOD);
    let (mut vm, console) = boot(&write_kernel(dir.path(), &code));
    let end = vm.run(Duration::from_secs(10));
    assert_eq!(end, LinuxEnd::PowerOff, "{}", console.text());
    assert_eq!(console.text(), "up\nstill here\n");
    // A VM that was powered off stays off: running it again says so at once, even had
    // the host been stopping the vCPU as the guest powered off.
    let again = Instant::now();
    assert_eq!(vm.run(Duration::from_secs(10)), LinuxEnd::PowerOff);
    assert!(again.elapsed() < Duration::from_secs(1));
}

/// The keyboard controller's reset line ends the VM as a reset, not a power-off.
#[test]
fn the_reset_line_resets() {
    if !kvm_here("the_reset_line_resets") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut code = out_bytes(0x64, &[0xfe]);
    code.extend(HALT_FOR_GOOD);
    let (mut vm, _) = boot(&write_kernel(dir.path(), &code));
    assert_eq!(vm.run(Duration::from_secs(10)), LinuxEnd::Reset);
}

/// A run whose guest prints its status and then halts for good (as a kernel without
/// ACPI power-off does) ends with that status soon after, not at the run's timeout.
#[test]
fn a_guest_that_reports_and_halts_ends_the_run() {
    use vmbuild::workflow::run::{RunEnd, RunSpec, Vmm};
    if !kvm_here("a_guest_that_reports_and_halts_ends_the_run") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut code = out_bytes(0x3f8, b"[    0.5] vmbuild-exit=5\nvmbuild-exit=5\n");
    code.extend(HALT_FOR_GOOD);
    let kernel = write_kernel(dir.path(), &code);
    let initrd = dir.path().join("initrd");
    std::fs::write(&initrd, b"").unwrap();
    let runtime = tempfile::tempdir().unwrap();
    // This test binary's other tests do not use runtime directories.
    std::env::set_var("XDG_RUNTIME_DIR", runtime.path());
    let spec = RunSpec {
        qemu: vmbuild::qemu::QemuBinary::locate().unwrap(),
        accel: vmbuild::accel::Accel::Kvm,
        kernel,
        initrd,
        append: None,
        memory_mib: 64,
        cpus: 1,
        argv: vec!["true".into()],
        shell: false,
        env: Vec::new(),
        cwd: None,
        store: None,
        xchg: None,
        keep_xchg: false,
        no_xchg: false,
        nic: None,
        extra_shares: Vec::new(),
        disk: None,
        timeout: Some(Duration::from_secs(60)),
        log: None,
        vmm: Vmm::Embedded,
        share_protocol: Default::default(),
    };
    let (_tx, rx) = std::sync::mpsc::channel();
    let started = Instant::now();
    let outcome = vmbuild::workflow::run_embedded::run_embedded(&spec, rx).unwrap();
    assert!(
        matches!(outcome.end, RunEnd::Exited(5)),
        "{:?}",
        outcome.end
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    let left: Vec<_> = std::fs::read_dir(runtime.path().join("vmbuild"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// `jmp $`: busy for ever, with no exits.
const SPIN: [u8; 2] = [0xeb, 0xfe];

/// A restored VM is a new generation: each restore from one snapshot gets its own VM
/// generation ID (what makes Linux reseed its RNG), none equal to the snapshotted VM's.
#[test]
fn every_restore_gets_a_new_generation_id() {
    if !kvm_here("every_restore_gets_a_new_generation_id") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, _) = boot(&write_kernel(dir.path(), &SPIN));
    let first = vm.generation_id().unwrap();
    assert_ne!(first, [0u8; 16]);
    assert_eq!(vm.run(Duration::from_millis(100)), LinuxEnd::TimedOut);
    let snap = dir.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    vm.snapshot(&snap).unwrap();
    let restore =
        || LinuxVm::restore(&snap, Transcript::new(None), Vec::new(), Vec::new()).unwrap();
    let (mut a, mut b) = (restore(), restore());
    let (ida, idb) = (a.generation_id().unwrap(), b.generation_id().unwrap());
    assert_ne!(ida, first);
    assert_ne!(idb, first);
    assert_ne!(ida, idb);
    // Both carry on from where the snapshot was taken.
    assert_eq!(a.run(Duration::from_millis(50)), LinuxEnd::TimedOut);
    assert_eq!(b.run(Duration::from_millis(50)), LinuxEnd::TimedOut);
    assert_eq!(vm.generation_id().unwrap(), first);
}

/// Polls COM2 and echoes what arrives to COM1 until a newline, then powers off.
fn echo_com2_guest() -> Vec<u8> {
    let mut code = echo_com2_until_newline(0x3f8);
    code.extend(out_bytes(
        vmbuild::kvm::acpi::SLEEP_CONTROL_PORT,
        &[vmbuild::kvm::acpi::S5_POWER_OFF],
    ));
    code.extend(HALT_FOR_GOOD);
    code
}

/// Host input reaches a guest through a serial port's receive FIFO, many times its 64
/// bytes, in order, while the guest runs.
#[test]
fn serial_input_reaches_the_guest_in_order() {
    if !kvm_here("serial_input_reaches_the_guest_in_order") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let console = Transcript::new(None);
    let kernel = write_kernel(dir.path(), &echo_com2_guest());
    let mut vm = LinuxVm::new(
        &LinuxConfig {
            kernel: &kernel,
            initrd: None,
            cmdline: "console=ttyS0",
            memory_mib: 64,
        },
        console.clone(),
        vec![Transcript::new(None)],
        Vec::new(),
    )
    .unwrap();
    let input = vm.serial_input(1).expect("COM2");
    assert!(vm.serial_input(2).is_none(), "only COM1 and COM2 exist");
    let mut text: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
    text.push(b'\n');
    let feeder = {
        let text = text.clone();
        std::thread::spawn(move || {
            let mut at = 0;
            let deadline = Instant::now() + Duration::from_secs(20);
            while at < text.len() && Instant::now() < deadline {
                at += input.feed(&text[at..]);
                std::thread::sleep(Duration::from_millis(1));
            }
            at
        })
    };
    let end = vm.run(Duration::from_secs(20));
    assert_eq!(feeder.join().unwrap(), text.len());
    assert_eq!(end, LinuxEnd::PowerOff);
    assert_eq!(console.text().as_bytes(), &text[..]);
}
