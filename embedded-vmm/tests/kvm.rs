//! The embedded KVM VMM with guests these tests assemble themselves (this host's KVM runs
//! small guests but not Linux): real, protected and long mode, serial output, port and
//! MMIO exits, HLT, two vCPUs, and a counting guest snapshotted mid-run and restored
//! (twice, concurrently, from one snapshot). Where /dev/kvm is missing each test says it
//! is skipped, and why.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The test guests' console: only these tests use a transmit-only UART (Linux guests get
/// the full one, `embedded_vmm::uart`).
#[path = "support/serial.rs"]
mod serial;
use serial::SerialConsole;

use vm_memory::{Bytes, GuestAddress};

use embedded_vmm::cpu_mode::{enter, CpuMode};
use embedded_vmm::memory::GuestRam;
use embedded_vmm::snapshot;
use embedded_vmm::vcpu::{run, Bus, Stop};
use embedded_vmm::vm::Vm;

const MIB: usize = 1 << 20;

/// Whether this host has a KVM at all; prints the skip line otherwise. Any other failure
/// to make a VM is the VMM's and fails the test.
fn kvm_or_skip(test: &str) -> bool {
    if !std::path::Path::new("/dev/kvm").exists() {
        vmbuild_tests::skip(test, "no /dev/kvm on this host");
        return false;
    }
    let ram = GuestRam::new(MIB).expect("guest RAM");
    Vm::new(ram, 1).expect("a VM on this host's /dev/kvm");
    true
}

/// A bus with the console, a record of MMIO writes, and one MMIO register reading 0x55.
#[derive(Default)]
struct TestBus {
    serial: SerialConsole,
    mmio_writes: Mutex<Vec<(u64, Vec<u8>)>>,
    port_writes: Mutex<Vec<(u16, u8)>>,
}

impl Bus for TestBus {
    fn pio_write(&self, port: u16, data: &[u8]) {
        if !self.serial.write(port, data) {
            self.port_writes.lock().unwrap().push((port, data[0]));
        }
    }
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if !self.serial.read(port, data) {
            data.fill(0xff);
        }
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.mmio_writes.lock().unwrap().push((addr, data.to_vec()));
    }
    fn mmio_read(&self, _addr: u64, data: &mut [u8]) {
        data.fill(0x55);
    }
}

fn boot(code: &[u8], at: u64, mode: CpuMode, mem: usize) -> (Vm, TestBus) {
    let ram = GuestRam::new(mem).unwrap();
    ram.write_slice(code, GuestAddress(at)).unwrap();
    let vm = Vm::new(ram, 1).unwrap();
    enter(&vm.vcpus()[0], vm.ram(), mode, at, 0x7000).unwrap();
    (vm, TestBus::default())
}

#[test]
fn a_real_mode_guest_prints_and_halts() {
    if !kvm_or_skip("a_real_mode_guest_prints_and_halts") {
        return;
    }
    // mov dx,0x3f8; mov al,'h'; out dx,al; mov al,'i'; out dx,al; hlt
    let code = [0xba, 0xf8, 0x03, 0xb0, b'h', 0xee, 0xb0, b'i', 0xee, 0xf4];
    let (mut vm, bus) = boot(&code, 0x7c00, CpuMode::Real, MIB);
    let stop = run(vm.vcpu_mut(0), &bus, &AtomicBool::new(false));
    assert_eq!(stop, Stop::Halted);
    assert_eq!(bus.serial.output(), b"hi");
}

#[test]
fn a_protected_mode_guest_prints_and_halts() {
    if !kvm_or_skip("a_protected_mode_guest_prints_and_halts") {
        return;
    }
    // mov edx,0x3f8; mov al,'p'; out dx,al; hlt
    let code = [0xba, 0xf8, 0x03, 0x00, 0x00, 0xb0, b'p', 0xee, 0xf4];
    let (mut vm, bus) = boot(&code, 0x8000, CpuMode::Protected32, MIB);
    assert_eq!(
        run(vm.vcpu_mut(0), &bus, &AtomicBool::new(false)),
        Stop::Halted
    );
    assert_eq!(bus.serial.output(), b"p");
}

#[test]
fn a_long_mode_guest_reaches_mmio_and_the_console() {
    if !kvm_or_skip("a_long_mode_guest_reaches_mmio_and_the_console") {
        return;
    }
    let code = [
        0xba, 0xf8, 0x03, 0x00, 0x00, // mov edx, 0x3f8
        0xb0, b'l', // mov al, 'l'
        0xee, // out dx, al
        0x48, 0xbb, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, // mov rbx, 0x10000000
        0xc6, 0x03, 0x2a, // mov byte [rbx], 0x2a   (MMIO write)
        0x8a, 0x0b, // mov cl, [rbx]            (MMIO read → 0x55)
        0x88, 0xc8, // mov al, cl
        0xee, // out dx, al
        0xf4, // hlt
    ];
    let (mut vm, bus) = boot(&code, 0x8000, CpuMode::Long64, 2 * MIB);
    assert_eq!(
        run(vm.vcpu_mut(0), &bus, &AtomicBool::new(false)),
        Stop::Halted
    );
    assert_eq!(bus.serial.output(), b"lU");
    assert_eq!(
        *bus.mmio_writes.lock().unwrap(),
        vec![(0x1000_0000, vec![0x2a])]
    );
    let sregs = vm.vcpus()[0].get_sregs().unwrap();
    assert_ne!(
        sregs.efer & (1 << 10),
        0,
        "not in long mode (EFER.LMA clear)"
    );
}

#[test]
fn two_vcpus_run_at_once() {
    if !kvm_or_skip("two_vcpus_run_at_once") {
        return;
    }
    let ram = GuestRam::new(MIB).unwrap();
    // vCPU i: mov al, i; out 0x80+i, al; hlt — each at its own entry.
    for i in 0..2u8 {
        ram.write_slice(
            &[0xb0, i, 0xe6, 0x80 + i, 0xf4],
            GuestAddress(0x7c00 + 0x100 * u64::from(i)),
        )
        .unwrap();
    }
    let mut vm = Vm::new(ram, 2).unwrap();
    for i in 0..2 {
        enter(
            &vm.vcpus()[i],
            vm.ram(),
            CpuMode::Real,
            0x7c00 + 0x100 * i as u64,
            0x7000 - 0x100 * i as u64,
        )
        .unwrap();
    }
    let bus = Arc::new(TestBus::default());
    let pause = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = vm
        .take_vcpus()
        .into_iter()
        .map(|mut vcpu| {
            let (bus, pause) = (bus.clone(), pause.clone());
            std::thread::spawn(move || run(&mut vcpu, &*bus, &pause))
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), Stop::Halted);
    }
    let mut writes = bus.port_writes.lock().unwrap().clone();
    writes.sort();
    assert_eq!(writes, vec![(0x80, 0), (0x81, 1)]);
}

/// inc dword [0x500]; out 0x80, al; jmp back — counts in memory, exits on every turn.
const COUNTER: [u8; 9] = [0x66, 0xff, 0x06, 0x00, 0x05, 0xe6, 0x80, 0xeb, 0xf7];
const COUNTER_ADDR: u64 = 0x500;

/// Runs vCPU 0 of `vm` on a thread until the counter passes `until`, then pauses it.
fn count_until(vm: &mut Vm, until: u32) -> u32 {
    let mut vcpus = vm.take_vcpus();
    let mut vcpu = vcpus.pop().unwrap();
    let pause = Arc::new(AtomicBool::new(false));
    let p = pause.clone();
    let t = std::thread::spawn(move || {
        let bus = TestBus::default();
        let stop = run(&mut vcpu, &bus, &p);
        (vcpu, stop)
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm
        .ram()
        .read_obj::<u32>(GuestAddress(COUNTER_ADDR))
        .unwrap()
        < until
    {
        assert!(Instant::now() < deadline, "the guest stopped counting");
        std::thread::sleep(Duration::from_millis(1));
    }
    pause.store(true, Ordering::Release);
    let (vcpu, stop) = t.join().unwrap();
    assert_eq!(stop, Stop::Paused);
    vm.return_vcpus(vec![vcpu]);
    vm.ram()
        .read_obj::<u32>(GuestAddress(COUNTER_ADDR))
        .unwrap()
}

#[test]
fn a_counting_guest_is_snapshotted_and_restored_twice_at_once() {
    if !kvm_or_skip("a_counting_guest_is_snapshotted_and_restored_twice_at_once") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let (mut vm, _) = boot(&COUNTER, 0x7c00, CpuMode::Real, 4 * MIB);
    let at_snapshot = count_until(&mut vm, 1000);
    snapshot::save(&vm, &snap).unwrap();
    drop(vm);

    let restored: Vec<_> = (0..2)
        .map(|_| {
            let snap = snap.clone();
            std::thread::spawn(move || {
                let mut vm = snapshot::restore(&snap).unwrap();
                assert!(vm.ram().is_private());
                // Memory is as it was at the snapshot...
                assert_eq!(
                    vm.ram()
                        .read_obj::<u32>(GuestAddress(COUNTER_ADDR))
                        .unwrap(),
                    at_snapshot
                );
                // ...and the guest carries on from there.
                let now = count_until(&mut vm, at_snapshot + 500);
                assert!(now >= at_snapshot + 500);
                now
            })
        })
        .collect();
    for t in restored {
        t.join().unwrap();
    }
    // The restores wrote to private copies: the snapshot's memory is unchanged.
    let ram = GuestRam::map_private(&snapshot::memory_file(&snap).unwrap(), 4 * MIB).unwrap();
    assert_eq!(
        ram.read_obj::<u32>(GuestAddress(COUNTER_ADDR)).unwrap(),
        at_snapshot
    );

    // A restored VM snapshotted again into the same directory: the new snapshot has its
    // count, and a VM still running from the old memory file keeps its own memory.
    let mut a = snapshot::restore(&snap).unwrap();
    let mut b = snapshot::restore(&snap).unwrap();
    let a_count = count_until(&mut a, at_snapshot + 300);
    snapshot::save(&a, &snap).unwrap();
    assert_eq!(
        b.ram().read_obj::<u32>(GuestAddress(COUNTER_ADDR)).unwrap(),
        at_snapshot
    );
    let b_count = count_until(&mut b, at_snapshot + 50);
    assert!(b_count >= at_snapshot + 50);
    let c = snapshot::restore(&snap).unwrap();
    assert_eq!(
        c.ram().read_obj::<u32>(GuestAddress(COUNTER_ADDR)).unwrap(),
        a_count
    );
    let memory_files = std::fs::read_dir(&snap)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("memory-"))
        .count();
    assert_eq!(memory_files, 1, "the old memory file was not removed");
}

#[test]
fn a_pc_vm_keeps_its_apic_and_interrupt_controllers_across_a_snapshot() {
    if !kvm_or_skip("a_pc_vm_keeps_its_apic_and_interrupt_controllers_across_a_snapshot") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let ram = GuestRam::new(2 * MIB).unwrap();
    ram.write_slice(&COUNTER, GuestAddress(0x7c00)).unwrap();
    let mut vm = Vm::new_pc(ram, 1).unwrap();
    enter(&vm.vcpus()[0], vm.ram(), CpuMode::Real, 0x7c00, 0x7000).unwrap();
    let lapic_before = vm.vcpus()[0].get_lapic().unwrap();
    let pit_before = vm.fd().get_pit2().unwrap();
    let at_snapshot = count_until(&mut vm, 200);
    snapshot::save(&vm, &snap).unwrap();
    drop(vm);

    let mut vm = snapshot::restore(&snap).unwrap();
    assert!(vm.is_pc());
    let lapic_after = vm.vcpus()[0].get_lapic().unwrap();
    // LINT0 (ExtINT) and LINT1 (NMI) as the VM set them up, and the APIC ID page.
    assert_eq!(
        lapic_after.regs[0x350..0x370],
        lapic_before.regs[0x350..0x370]
    );
    assert_eq!(
        vm.fd().get_pit2().unwrap().channels[0].count,
        pit_before.channels[0].count
    );
    assert_eq!(
        vm.ram()
            .read_obj::<u32>(GuestAddress(COUNTER_ADDR))
            .unwrap(),
        at_snapshot
    );
    let now = count_until(&mut vm, at_snapshot + 100);
    assert!(now >= at_snapshot + 100);
}

#[test]
fn damaged_or_foreign_snapshots_are_refused() {
    if !kvm_or_skip("damaged_or_foreign_snapshots_are_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let (mut vm, _) = boot(&COUNTER, 0x7c00, CpuMode::Real, MIB);
    count_until(&mut vm, 10);
    snapshot::save(&vm, &snap).unwrap();

    let state = snap.join(snapshot::VM_STATE_FILE);
    let original = std::fs::read_to_string(&state).unwrap();
    std::fs::write(
        &state,
        original.replace(
            &format!("\"version\":{}", snapshot::VERSION),
            "\"version\":99",
        ),
    )
    .unwrap();
    let e = snapshot::restore(&snap).err().unwrap().to_string();
    assert!(e.contains("format 99"), "{e}");

    std::fs::write(&state, &original[..original.len() / 2]).unwrap();
    let e = format!("{:#}", snapshot::restore(&snap).err().unwrap());
    assert!(e.contains("damaged"), "{e}");

    std::fs::write(&state, &original).unwrap();
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(snapshot::memory_file(&snap).unwrap())
        .unwrap();
    mem.set_len((MIB / 2) as u64).unwrap();
    let e = format!("{:#}", snapshot::restore(&snap).err().unwrap());
    assert!(e.contains("bytes of guest memory"), "{e}");

    let e = format!("{:#}", snapshot::restore(dir.path()).err().unwrap());
    assert!(e.contains("not a snapshot"), "{e}");
}
