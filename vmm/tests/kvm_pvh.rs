//! The embedded VMM's Linux machine (`kvm::linux::LinuxVm`: PVH entry, COM1, the keyboard
//! controller, the ACPI sleep registers) with kernels the test assembles itself: an ELF
//! with a PVH note and a few instructions. Unlike the guest kit's Linux, these run on any
//! KVM, so the ways a guest ends a VM are checked here on every host.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmbuild::kvm::linux::{LinuxConfig, LinuxEnd, LinuxVm};
use vmbuild::kvm::uart::Transcript;

/// Where the code is loaded and entered (PVH: 32-bit protected mode, paging off).
const LOAD: u64 = 0x10_0000;

/// An ELF64 executable whose one segment is `code` at [`LOAD`], with the
/// `XEN_ELFNOTE_PHYS32_ENTRY` note pointing there.
fn pvh_kernel(code: &[u8]) -> Vec<u8> {
    const NOTE_AT: usize = 0x200;
    const CODE_AT: usize = 0x1000;
    let mut note = Vec::new();
    note.extend(4u32.to_le_bytes()); // name size
    note.extend(4u32.to_le_bytes()); // descriptor size
    note.extend(18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend(b"Xen\0");
    note.extend((LOAD as u32).to_le_bytes());

    let mut elf = vec![0u8; CODE_AT + code.len()];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little endian
    elf[6] = 1; // version
    let mut put = |at: usize, bytes: &[u8]| elf[at..at + bytes.len()].copy_from_slice(bytes);
    put(16, &2u16.to_le_bytes()); // ET_EXEC
    put(18, &62u16.to_le_bytes()); // EM_X86_64
    put(20, &1u32.to_le_bytes());
    put(24, &LOAD.to_le_bytes()); // entry
    put(32, &64u64.to_le_bytes()); // program headers right after this header
    put(52, &64u16.to_le_bytes()); // header size
    put(54, &56u16.to_le_bytes()); // program header size
    put(56, &2u16.to_le_bytes()); // two of them
    let phdr = |kind: u32, flags: u32, offset: usize, addr: u64, size: usize, align: u64| {
        let mut p = Vec::new();
        p.extend(kind.to_le_bytes());
        p.extend(flags.to_le_bytes());
        p.extend((offset as u64).to_le_bytes());
        p.extend(addr.to_le_bytes());
        p.extend(addr.to_le_bytes());
        p.extend((size as u64).to_le_bytes());
        p.extend((size as u64).to_le_bytes());
        p.extend(align.to_le_bytes());
        p
    };
    put(64, &phdr(1, 5, CODE_AT, LOAD, code.len(), 0x1000)); // PT_LOAD, R+X
    put(120, &phdr(4, 4, NOTE_AT, 0, note.len(), 4)); // PT_NOTE
    put(NOTE_AT, &note);
    put(CODE_AT, code);
    elf
}

/// `mov dx, port; mov al, byte; out dx, al` for each byte.
fn out_bytes(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut code = vec![0x66, 0xba];
    code.extend(port.to_le_bytes());
    for b in bytes {
        code.extend([0xb0, *b, 0xee]);
    }
    code
}

/// `cli; hlt; jmp hlt`: stopped for good, as a kernel without ACPI power-off halts.
const HALT_FOR_GOOD: [u8; 4] = [0xfa, 0xf4, 0xeb, 0xfd];

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

fn kvm_here(name: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        vmbuild_tests::skip(name, "/dev/kvm cannot be opened");
    }
    ok
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
    code.extend(out_bytes(0x3c0, &[(3 << 2) | (1 << 5)]));
    code.extend(out_bytes(0x3f8, b"still here\n"));
    code.extend(out_bytes(0x3c0, &[vmbuild::kvm::acpi::S5_POWER_OFF]));
    code.extend(out_bytes(0x3f8, b"after power-off\n"));
    code.extend(HALT_FOR_GOOD);
    let (mut vm, console) = boot(&write_kernel(dir.path(), &code));
    let end = vm.run(Duration::from_secs(10));
    assert_eq!(end, LinuxEnd::PowerOff, "{}", console.text());
    assert_eq!(console.text(), "up\nstill here\n");
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
