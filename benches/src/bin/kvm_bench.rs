//! The embedded KVM VMM against QEMU, side by side in one run:
//! - VM creation → first guest instruction (a real-mode guest's first port write),
//! - snapshot restore latency for 256, 512 and 1024 MiB guests that touched all their
//!   memory: embedded restore (map the memory file copy-on-write, set the vCPU state)
//!   until the guest's next instruction, vs QEMU `-incoming` from a `file:` snapshot
//!   (mapped-ram + multifd, as `vmbuild bootstrap` writes them) until `running`. Both
//!   warm (state in the page cache).
//! - the lifecycle's controller restore: a `LinuxVm` as the embedded controller is one
//!   (160 MiB, a NIC on a switch, COM1–COM3, the generation ID and its event) restored
//!   until its guest's next instruction, vs QEMU `-incoming` of a 160 MiB guest (how the
//!   QEMU controller is revived).
//!
//! Reproduce: `cargo build --release -p vmbuild-benches && target/release/kvm-bench`

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

use anyhow::{bail, Context};
use clap::Parser;
use embedded_vmm::cpu_mode::{enter, CpuMode};
use embedded_vmm::memory::GuestRam;
use embedded_vmm::snapshot;
use embedded_vmm::vcpu::{run, Bus, Stop};
use embedded_vmm::vm::Vm;
use vmbuild::bench::sample::{write_samples, Sample};
use vmbuild::guest::initrd::{self, GUEST_SCRIPT_PATH};
use vmbuild::guest::kit::GuestKit;
use vmbuild::qemu::console_guest::{ConsoleGuest, ConsoleGuestConfig};
use vmbuild::qemu::StateFormat;
use vmbuild_benches::console::wait_for_line;
use vmbuild_benches::report::median;

#[derive(Parser, Debug)]
#[command(about = "embedded KVM VMM vs QEMU: creation and snapshot restore")]
struct Args {
    #[arg(long, value_delimiter = ',', default_value = "256,512,1024")]
    sizes: Vec<usize>,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    #[arg(long, default_value = "/var/tmp/vmbuild-kvm-bench")]
    workdir: PathBuf,
    /// Skip the controller-shaped restore row
    #[arg(long)]
    no_controller: bool,
    /// Write every measurement as `vmbuild bench` samples (JSON) here
    #[arg(long, value_name = "FILE")]
    samples: Option<PathBuf>,
}

const EMBEDDED: &str = "embedded VMM";
const QEMU: &str = "QEMU";

/// `values` as samples of one workload by one contender, a round each.
fn push_all(out: &mut Vec<Sample>, workload: &str, contender: &str, values: &[f64], mib: usize) {
    for (round, v) in values.iter().enumerate() {
        out.push(
            Sample::new(workload, contender, "ms", false, round + 1, *v).with("memory_mib", mib),
        );
    }
}

/// Long-mode guest: fill memory from 1 MiB to the end with a pattern, `out 0x81` once
/// done, then count forever with a port write per turn.
fn filler(mem: usize) -> Vec<u8> {
    let mut c = vec![0x48, 0xbf];
    c.extend_from_slice(&0x10_0000u64.to_le_bytes()); // mov rdi, 1 MiB
    c.extend_from_slice(&[0x48, 0xb9]);
    c.extend_from_slice(&(((mem - 0x10_0000) / 8) as u64).to_le_bytes()); // mov rcx, qwords
    c.extend_from_slice(&[0x48, 0xb8]);
    c.extend_from_slice(&0x0123_4567_89ab_cdefu64.to_le_bytes()); // mov rax, pattern
    c.extend_from_slice(&[0xf3, 0x48, 0xab]); // rep stosq
    c.extend_from_slice(&[0xe6, 0x81]); // out 0x81, al (filled)
                                        // loop: inc qword [0x500]; out 0x80, al; jmp loop
    c.extend_from_slice(&[0x48, 0xff, 0x04, 0x25, 0x00, 0x05, 0x00, 0x00]);
    c.extend_from_slice(&[0xe6, 0x80, 0xeb, 0xf4]);
    c
}

struct UntilPort(u16, AtomicBool);
impl Bus for UntilPort {
    fn pio_write(&self, port: u16, _: &[u8]) {
        if port == self.0 {
            self.1.store(true, std::sync::atomic::Ordering::Release);
        }
    }
    fn mmio_write(&self, _: u64, _: &[u8]) {}
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = std::fs::remove_dir_all(&args.workdir);
    std::fs::create_dir_all(&args.workdir)?;

    let mut samples = Vec::new();
    // --- creation → first instruction ------------------------------------------------
    let mut create = Vec::new();
    for _ in 0..args.rounds.max(5) {
        let t = Instant::now();
        let ram = GuestRam::new(2 << 20)?;
        ram.write_slice(&[0xe6, 0x80, 0xf4], GuestAddress(0x7c00))?; // out 0x80, al; hlt
        let mut vm = Vm::new(ram, 1)?;
        enter(&vm.vcpus()[0], vm.ram(), CpuMode::Real, 0x7c00, 0x7000)?;
        let stop = run_first_exit(&mut vm);
        create.push(t.elapsed().as_secs_f64() * 1000.0);
        if stop != Stop::Paused {
            bail!("the creation guest did not run: {stop:?}");
        }
    }
    println!(
        "### Embedded KVM VMM vs QEMU (median of {} rounds)\n",
        args.rounds
    );
    push_all(
        &mut samples,
        "VM creation → first guest instruction",
        EMBEDDED,
        &create,
        2,
    );
    println!(
        "- VM creation → first guest instruction (embedded, 2 MiB, 1 vCPU): {:.2} ms\n",
        median(create)
    );

    println!("| guest memory | embedded restore → next instruction (ms) | QEMU -incoming file: (mapped-ram + multifd) → running (ms) | embedded vs QEMU |");
    println!("|---|---|---|---|");
    let kit = GuestKit::locate()?;
    for &mib in &args.sizes {
        let mem = mib << 20;
        let dir = args.workdir.join(format!("{mib}"));
        std::fs::create_dir_all(&dir)?;
        // Embedded: fill, then snapshot while counting.
        eprintln!("[kvm-bench] {mib} MiB: embedded guest filling its memory");
        let ram = GuestRam::new(mem)?;
        ram.write_slice(&filler(mem), GuestAddress(0x8000))?;
        let mut vm = Vm::new(ram, 1)?;
        enter(&vm.vcpus()[0], vm.ram(), CpuMode::Long64, 0x8000, 0x7000)?;
        let filled = UntilPort(0x81, AtomicBool::new(false));
        let vcpu = vm.vcpu_mut(0);
        loop {
            // Run exit by exit until the fill is done, then a few counting turns.
            match vcpu.run().map_err(|e| anyhow::anyhow!("KVM_RUN: {e}"))? {
                kvm_ioctls::VcpuExit::IoOut(port, data) => {
                    filled.pio_write(port, data);
                    if filled.1.load(std::sync::atomic::Ordering::Acquire) && port == 0x80 {
                        break;
                    }
                }
                other => bail!("unexpected exit while filling: {other:?}"),
            }
        }
        let snap = dir.join("embedded");
        snapshot::save(&vm, &snap)?;
        drop(vm);
        let mut restores = Vec::new();
        for _ in 0..args.rounds {
            let t = Instant::now();
            let mut vm = snapshot::restore(&snap)?;
            let stop = run_first_exit(&mut vm);
            restores.push(t.elapsed().as_secs_f64() * 1000.0);
            if stop != Stop::Paused {
                bail!("the restored guest did not run: {stop:?}");
            }
        }

        // QEMU: the guest kit filling ¾ of memory, suspended as vmbuild does.
        eprintln!("[kvm-bench] {mib} MiB: QEMU guest filling its memory");
        let qemu = qemu_restores(&dir, &kit, mib as u32, args.rounds)?;
        const RESTORE: &str = "snapshot restore → the guest runs";
        push_all(&mut samples, RESTORE, EMBEDDED, &restores, mib);
        push_all(&mut samples, RESTORE, QEMU, &qemu, mib);
        let (e, q) = (median(restores), median(qemu));
        println!("| {mib} MiB | {e:.2} | {q:.1} | {:.0}× |", q / e);
    }
    if !args.no_controller {
        controller_restore(&args, &kit, &mut samples)?;
    }
    if let Some(path) = &args.samples {
        write_samples(path, &samples)?;
    }
    let _ = std::fs::remove_dir_all(&args.workdir);
    Ok(())
}

/// The embedded controller's restore against the QEMU controller's revive, at the
/// controller's memory size.
fn controller_restore(
    args: &Args,
    kit: &GuestKit,
    samples: &mut Vec<Sample>,
) -> anyhow::Result<()> {
    use embedded_vmm::linux::{LinuxConfig, LinuxEnd, LinuxVm};
    use embedded_vmm::uart::Transcript;
    use embedded_vmm::virtio::net::NetDevice;
    use std::sync::{Arc, OnceLock};
    use vmbuild::snapshot::controller::CONTROLLER_MEMORY_MIB;
    use vmbuild_tests::pvh::{out_bytes, pvh_kernel};
    use vswitch::{Switch, SwitchConfig, VlanMode};

    /// A console sink that notes when the guest first wrote.
    struct FirstWrite(Arc<OnceLock<Instant>>);
    impl std::io::Write for FirstWrite {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.set(Instant::now());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    let mib = CONTROLLER_MEMORY_MIB as usize;
    let dir = args.workdir.join("controller");
    std::fs::create_dir_all(&dir)?;
    // 32-bit guest: fill memory from 2 MiB up, say so, then write to COM1 for ever.
    let mut code = vec![0xbf]; // mov edi, 2 MiB
    code.extend(0x20_0000u32.to_le_bytes());
    code.push(0xb9); // mov ecx, dwords
    code.extend((((mib << 20) - 0x20_0000) as u32 / 4).to_le_bytes());
    code.push(0xb8); // mov eax, pattern
    code.extend(0x89ab_cdefu32.to_le_bytes());
    code.extend([0xf3, 0xab]); // rep stosd
    code.extend(out_bytes(0x3f8, b"ready\n"));
    code.extend([0xb0, b'.', 0xee, 0xeb, 0xfd]); // mov al, '.'; out dx, al; jmp out
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, pvh_kernel(&code))?;
    let devices = |switch: &Arc<Switch>| -> Vec<Box<dyn embedded_vmm::virtio::VirtioDevice>> {
        vec![Box::new(NetDevice::new(
            switch,
            "controller",
            [0x52, 0x54, 0, 0x77, 0, 1],
            VlanMode::default(),
        ))]
    };
    let switch = Switch::new(SwitchConfig::default());
    let serials = || vec![Transcript::new(None), Transcript::new(None)];
    eprintln!("[kvm-bench] controller ({mib} MiB): embedded guest filling its memory");
    let console = Transcript::new(None);
    let mut vm = LinuxVm::new(
        &LinuxConfig {
            kernel: &kernel,
            initrd: None,
            cmdline: "console=ttyS0",
            memory_mib: mib,
            vcpus: 1,
        },
        console.clone(),
        serials(),
        devices(&switch),
    )?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let end = vm.run_until(|| console.text().contains("ready") || Instant::now() > deadline);
    if end != LinuxEnd::TimedOut || !console.text().contains("ready") {
        bail!("the controller-shaped guest did not fill its memory: {end:?}");
    }
    let snap = dir.join("embedded");
    std::fs::create_dir_all(&snap)?;
    vm.snapshot(&snap)?;
    drop(vm);
    let mut restores = Vec::new();
    for _ in 0..args.rounds {
        let first = Arc::new(OnceLock::new());
        let console = Transcript::new(Some(Box::new(FirstWrite(first.clone()))));
        let t = Instant::now();
        let mut vm = LinuxVm::restore(&snap, console, serials(), devices(&switch))?;
        let limit = Instant::now() + Duration::from_secs(10);
        vm.run_until(|| first.get().is_some() || Instant::now() > limit);
        let Some(at) = first.get() else {
            bail!("the restored controller-shaped guest did not run");
        };
        restores.push((*at - t).as_secs_f64() * 1000.0);
    }
    eprintln!("[kvm-bench] controller ({mib} MiB): QEMU guest filling its memory");
    let qemu = qemu_restores(&dir, kit, mib as u32, args.rounds)?;
    const CONTROLLER: &str = "the lifecycle's controller: restore → the guest runs";
    push_all(samples, CONTROLLER, EMBEDDED, &restores, mib);
    push_all(samples, CONTROLLER, QEMU, &qemu, mib);
    let (e, q) = (median(restores), median(qemu));
    println!(
        "\n| the lifecycle's controller ({mib} MiB) | embedded restore with its devices → next instruction (ms) | QEMU -incoming → running (ms) | embedded vs QEMU |"
    );
    println!("|---|---|---|---|");
    println!("| restore | {e:.2} | {q:.1} | {:.0}× |", q / e);
    Ok(())
}

/// Runs vCPU 0 until its first write to port 0x80 ("the guest ran"; then pauses it) or
/// a halt.
fn run_first_exit(vm: &mut Vm) -> Stop {
    struct PauseOnWrite<'a>(&'a AtomicBool);
    impl Bus for PauseOnWrite<'_> {
        fn pio_write(&self, port: u16, _: &[u8]) {
            if port == 0x80 {
                self.0.store(true, std::sync::atomic::Ordering::Release);
            }
        }
        fn mmio_write(&self, _: u64, _: &[u8]) {}
    }
    let pause = AtomicBool::new(false);
    let bus = PauseOnWrite(&pause);
    run(vm.vcpu_mut(0), &bus, &pause)
}

fn qemu_restores(dir: &Path, kit: &GuestKit, mib: u32, rounds: usize) -> anyhow::Result<Vec<f64>> {
    let each = mib * 3 / 8;
    let script = format!(
        "yes vmbuild-kvm-bench | head -c $(({each} * 1048576)) > /dev/shm/fill\n\
         yes vmbuild-kvm-bench | head -c $(({each} * 1048576)) > /tmp/fill\n\
         echo filled\nwhile true; do sleep 1; done\n"
    );
    let files: [(&str, u32, &[u8]); 1] = [(GUEST_SCRIPT_PATH, 0o755, script.as_bytes())];
    let initrd = initrd::with_files(&kit.initrd, dir, &files)?;
    let append = format!(
        "console=ttyS0 panic=-1 quiet cryptomgr.notests vmbuild.quiet vmbuild.cmd={GUEST_SCRIPT_PATH}"
    );
    let config = |incoming| ConsoleGuestConfig {
        kernel: &kit.kernel,
        initrd: &initrd,
        append: &append,
        memory_mib: mib,
        incoming,
        accel: vmbuild::accel::Accel::Tcg,
    };
    let mut g = ConsoleGuest::start(dir, "boot", &config(false))?;
    wait_for_line(&g.console, "filled", Duration::from_secs(600))?;
    let state = dir.join("qemu-state");
    let format = StateFormat::MappedRamMultifd(2);
    g.qmp
        .suspend_to_file(&state, format, Duration::from_secs(600))
        .context("suspending the QEMU guest")?;
    g.qemu.kill();
    let mut times = Vec::new();
    for r in 0..rounds {
        let mut next = ConsoleGuest::start(dir, &format!("r{r}"), &config(true))?;
        let t = next
            .qmp
            .revive_from_file(&state, format, Duration::from_secs(600))?;
        times.push(t.as_secs_f64() * 1000.0);
        next.qemu.kill();
    }
    Ok(times)
}
