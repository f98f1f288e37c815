//! The embedded VMM's Linux machine (`kvm::linux::LinuxVm`: PVH entry, COM1, the keyboard
//! controller, the ACPI sleep registers) with kernels the test assembles itself: an ELF
//! with a PVH note and a few instructions. Unlike the guest kit's Linux, these run on any
//! KVM, so the ways a guest ends a VM are checked here on every host.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use embedded_vmm::linux::{LinuxConfig, LinuxEnd, LinuxVm};
use embedded_vmm::uart::Transcript;

use vmbuild_tests::pvh::{echo_com2_until_newline, kvm_here, out_bytes, pvh_kernel, HALT_FOR_GOOD};

fn write_kernel(dir: &Path, code: &[u8]) -> PathBuf {
    let path = dir.join("vmlinux");
    std::fs::write(&path, pvh_kernel(code)).unwrap();
    path
}

fn boot(kernel: &Path) -> (LinuxVm, Transcript) {
    boot_with(kernel, Vec::new())
}

/// A VM for `kernel` with COM1 as its console and `serials` as COM2 and COM3.
fn boot_with(kernel: &Path, serials: Vec<Transcript>) -> (LinuxVm, Transcript) {
    let console = Transcript::new(None);
    let vm = LinuxVm::new(
        &LinuxConfig {
            kernel,
            initrd: None,
            cmdline: "console=ttyS0",
            memory_mib: 64,
            vcpus: 1,
        },
        console.clone(),
        serials,
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
        embedded_vmm::acpi::SLEEP_CONTROL_PORT,
        &[(3 << 2) | (1 << 5)],
    ));
    code.extend(out_bytes(0x3f8, b"still here\n"));
    code.extend(out_bytes(
        embedded_vmm::acpi::SLEEP_CONTROL_PORT,
        &[embedded_vmm::acpi::S5_POWER_OFF],
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

/// A triple fault (an exception with an empty IDT) ends the VM as a reset, as on a PC.
/// (kvm_pvm stops this guest with an emulation failure instead: it runs where KVM runs
/// Linux, in the nested host on this machine kind.)
#[test]
#[ignore = "needs a KVM that runs Linux (scripts/test.sh runs it in a nested KVM host)"]
fn a_triple_fault_resets() {
    if !kvm_here("a_triple_fault_resets") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // lidt [0x500]: guest memory there is zero, so the IDT's limit is 0; then int3.
    let mut code = vec![0x0f, 0x01, 0x1d];
    code.extend(0x500u32.to_le_bytes());
    code.push(0xcc);
    code.extend(HALT_FOR_GOOD);
    let (mut vm, _) = boot(&write_kernel(dir.path(), &code));
    assert_eq!(vm.run(Duration::from_secs(10)), LinuxEnd::Reset);
}

/// A run whose guest prints its status and then halts for good (as a kernel without
/// ACPI power-off does) ends with that status soon after, not at the run's timeout.
#[test]
fn a_guest_that_reports_and_halts_ends_the_run() {
    use vmbuild::vm::run::{RunEnd, RunSpec, Vmm};
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
        xchg_writeback: false,
        no_xchg: false,
        nic: None,
        extra_shares: Vec::new(),
        disk: None,
        image: None,
        timeout: Some(Duration::from_secs(60)),
        log: None,
        vmm: Vmm::Embedded,
        share_protocol: Default::default(),
        dax: false,
        runtime_dir: Some(runtime.path().to_owned()),
    };
    let (_tx, rx) = std::sync::mpsc::channel();
    let started = Instant::now();
    let outcome = vmbuild::vm::run_embedded::run_embedded(&spec, rx).unwrap();
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
        embedded_vmm::acpi::SLEEP_CONTROL_PORT,
        &[embedded_vmm::acpi::S5_POWER_OFF],
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
    let kernel = write_kernel(dir.path(), &echo_com2_guest());
    let (mut vm, console) = boot_with(&kernel, vec![Transcript::new(None)]);
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

/// The interrupt-driven receive path a Linux 8250 driver uses: the guest programs the
/// IOAPIC (COM2's GSI 3 → vector 0x30) and its local APIC, enables COM2's receive
/// interrupt, and halts with interrupts on; its handler echoes what arrived to COM1 and
/// powers off at a newline. Any other interrupt (a stray one from the PIC, say) finds no
/// IDT entry and resets the VM, which fails the test.
///
/// This host's kvm_pvm hands the handler's protected-mode IRET to KVM's instruction
/// emulator now and then, which cannot emulate it ("emulation failure", ~30% of runs):
/// the test needs a KVM that runs Linux, where it is judged on a single attempt.
#[test]
#[ignore = "needs a KVM that runs Linux (scripts/test.sh runs it in a nested KVM host)"]
fn serial_input_interrupts_the_guest_through_the_ioapic() {
    if !kvm_here("serial_input_interrupts_the_guest_through_the_ioapic") {
        return;
    }
    let mut setup = vec![0x66, 0xba, 0xf9, 0x02, 0xb0, 0x01, 0xee]; // COM2 IER: data available
    setup.extend([0x66, 0xba, 0xfc, 0x02, 0xb0, 0x0b, 0xee]); // COM2 MCR: DTR, RTS, OUT2
    let mut handler = vec![
        0x66, 0xba, 0xfd, 0x02, // 0: mov dx, 0x2fd
        0xec, // 4: in al, dx
        0xa8, 0x01, // 5: test al, 1
        0x74, 0x15, // 7: jz 30 (the end)
        0x66, 0xba, 0xf8, 0x02, // 9: mov dx, 0x2f8
        0xec, // 13: in al, dx
        0x66, 0xba, 0xf8, 0x03, // 14: mov dx, 0x3f8
        0xee, // 18: out dx, al
        0x3c, 0x0a, // 19: cmp al, '\n'
        0x75, 0xe9, // 21: jne 0
    ];
    handler.extend(out_bytes(
        embedded_vmm::acpi::SLEEP_CONTROL_PORT,
        &[embedded_vmm::acpi::S5_POWER_OFF],
    ));
    assert_eq!(handler.len(), 30);
    let com2_gsi = embedded_vmm::linux::SERIAL_PORTS[1].gsi;
    let code = interrupt_guest(com2_gsi, &setup, &handler);

    let dir = tempfile::tempdir().unwrap();
    let kernel = write_kernel(dir.path(), &code);
    let text = b"interrupt-driven input, well over one FIFO's worth of it: 0123456789 abcdefghijklmnopqrstuvwxyz\n";
    let (end, console, at) = {
        let (mut vm, console) = boot_with(&kernel, vec![Transcript::new(None)]);
        let input = vm.serial_input(1).unwrap();
        let feeder = {
            let console = console.clone();
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(20);
                while !console.text().contains("ready\n") && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let mut at = 0;
                while at < text.len() && Instant::now() < deadline {
                    at += input.feed_wait(&text[at..], Duration::from_millis(10));
                }
            })
        };
        let end = vm.run(Duration::from_secs(20));
        feeder.join().unwrap();
        let at = vm.vcpu_regs().map(|r| r.rip).unwrap_or_default();
        (end, console.text(), at)
    };
    assert_eq!(end, LinuxEnd::PowerOff, "console: {console:?}, at {at:#x}");
    assert_eq!(console, format!("ready\n{}", String::from_utf8_lossy(text)));
}

/// A guest that takes GSI `gsi` as an interrupt: it sets up a stack, an IDT whose only
/// gate is the handler's, routes `gsi` through the IOAPIC to it, enables its local APIC,
/// runs `setup`, prints "ready" on COM1 and halts with interrupts on. `handler` runs for
/// each interrupt, followed by an end-of-interrupt and `iret`. (The PIC is left as the
/// VMM created it, as Linux leaves it under hardware-reduced ACPI: any other interrupt
/// finds no gate and resets the VM.)
fn interrupt_guest(gsi: u32, setup: &[u8], handler: &[u8]) -> Vec<u8> {
    const HANDLER: usize = 0x400;
    const IDT: usize = 0x800;
    const IDTR: usize = 0x1000;
    const VECTOR: usize = 0x30;
    let abs = |off: usize| (vmbuild_tests::pvh::LOAD as u32 + off as u32).to_le_bytes();
    let mov_mem = |addr: u32, value: u32| {
        let mut i = vec![0xc7, 0x05];
        i.extend(addr.to_le_bytes());
        i.extend(value.to_le_bytes());
        i
    };
    let mut main = vec![0xbc]; // mov esp, LOAD + 512 KiB
    main.extend(abs(0x8_0000));
    main.extend([0x0f, 0x01, 0x1d]); // lidt [IDTR]
    main.extend(abs(IDTR));
    main.extend(mov_mem(0xfec0_0000, 0x10 + 2 * gsi)); // IOREGSEL: redirection, low half
    main.extend(mov_mem(0xfec0_0010, VECTOR as u32)); // fixed, edge, high, unmasked
    main.extend(mov_mem(0xfec0_0000, 0x11 + 2 * gsi)); // high half
    main.extend(mov_mem(0xfec0_0010, 0)); // to APIC 0
    main.extend(mov_mem(0xfee0_00f0, 0x1ff)); // local APIC on, spurious vector 0xff
    main.extend(setup);
    main.extend(out_bytes(0x3f8, b"ready\n"));
    main.extend([0xfb, 0xf4, 0xeb, 0xfd]); // sti; hlt; jmp hlt

    let mut full_handler = handler.to_vec();
    full_handler.extend(mov_mem(0xfee0_00b0, 0)); // end of interrupt
    full_handler.push(0xcf); // iret

    let mut code = vec![0u8; IDTR + 6];
    assert!(main.len() <= HANDLER && HANDLER + full_handler.len() <= IDT);
    code[..main.len()].copy_from_slice(&main);
    code[HANDLER..HANDLER + full_handler.len()].copy_from_slice(&full_handler);
    let target = vmbuild_tests::pvh::LOAD as u32 + HANDLER as u32;
    let gate = IDT + 8 * VECTOR;
    code[gate..gate + 2].copy_from_slice(&(target as u16).to_le_bytes());
    code[gate + 2..gate + 4].copy_from_slice(&0x08u16.to_le_bytes()); // code segment
    code[gate + 5] = 0x8e; // present, 32-bit interrupt gate
    code[gate + 6..gate + 8].copy_from_slice(&((target >> 16) as u16).to_le_bytes());
    code[IDTR..IDTR + 2].copy_from_slice(&(256u16 * 8 - 1).to_le_bytes());
    code[IDTR + 2..IDTR + 6].copy_from_slice(&abs(IDT));
    code
}

/// A restore announces the new VM generation: the Generic Event Device's interrupt
/// reaches the guest (through the IOAPIC, as Linux's evged driver takes it) and the
/// guest reads an ID at the address the DSDT gives, which is the restored VM's, not the
/// snapshotted one's.
#[test]
fn a_restore_interrupts_the_guest_with_its_new_generation_id() {
    if !kvm_here("a_restore_interrupts_the_guest_with_its_new_generation_id") {
        return;
    }
    let generation = embedded_vmm::linux::GENERATION_ID;
    let (id_at, ged_gsi) = (generation.addr as u32, generation.gsi);
    let mut handler = vec![0xbe]; // mov esi, the ID
    handler.extend(id_at.to_le_bytes());
    handler.extend([0xb9, 16, 0, 0, 0]); // mov ecx, 16
    handler.extend([0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    handler.extend([0xac, 0xee, 0xe2, 0xfc]); // lodsb; out dx, al; loop back
    let code = interrupt_guest(ged_gsi, &[], &handler);
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, console) = boot(&write_kernel(dir.path(), &code));
    let end = vm.run_until(|| console.text().contains("ready\n"));
    assert_eq!(end, LinuxEnd::TimedOut, "{}", console.text());
    let snap = dir.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    vm.snapshot(&snap).unwrap();
    assert_eq!(console.text(), "ready\n", "no event before the restore");

    let after = Transcript::new(None);
    let mut restored = LinuxVm::restore(&snap, after.clone(), Vec::new(), Vec::new()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    restored.run_until(|| after.bytes().len() >= 16 || Instant::now() > deadline);
    let id = restored.generation_id().unwrap();
    assert_ne!(id, vm.generation_id().unwrap());
    assert_eq!(after.bytes(), id, "the guest read the new ID on the event");
}
