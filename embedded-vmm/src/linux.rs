//! Booting Linux in the embedded VMM. An ELF vmlinux boots through PVH: loaded at its
//! physical addresses (linux-loader), the vCPU enters the kernel's PVH entry in 32-bit
//! protected mode with `%ebx` pointing at an `hvm_start_info` (command line, memory map,
//! initramfs as module 0, RSDP), the way QEMU's `-kernel vmlinux` does. A bzImage boots
//! through the 64-bit boot protocol: the protected-mode kernel at 1 MiB, `boot_params`
//! (setup header, e820 map, command line, initramfs, RSDP) at the zero page, the vCPU in
//! identity-mapped long mode at its 64-bit entry with `%rsi` pointing at them. The
//! initramfs goes at the top of memory. One or more vCPUs (the first boots, the kernel
//! starts the others); a PC's interrupt controllers and timer in the kernel; COM1 as the console; virtio devices on virtio-mmio windows the kernel finds in
//! ACPI tables (RSDP passed in the start info). The guest ends the VM by powering off
//! (ACPI S5 through the FADT's sleep control register), or by a reset: the keyboard
//! controller's reset line (`reboot=k`) or a triple fault.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kvm_bindings::kvm_userspace_memory_region;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, Cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, MmioDevice};
use crate::cpu_mode::{enter, CpuMode};
use crate::memory::GuestRam;
use crate::snapshot;
use crate::uart::{Transcript, Uart, UartState, COM1_BASE, COM1_GSI};
use crate::vcpu::{run, Bus, Stop};
use crate::virtio::mmio::{MmioTransport, TransportState, WINDOW as MMIO_WINDOW};
use crate::virtio::VirtioDevice;
use crate::vm::Vm;

const START_INFO: u64 = 0x6000;
/// The bzImage boot protocol's `boot_params` ("zero page").
const ZERO_PAGE: u64 = 0x7000;
const MODLIST: u64 = 0x6100;
const MEMMAP: u64 = 0x6200;
const CMDLINE: u64 = 0x20000;
const CMDLINE_MAX: usize = 4096;
const EBDA: u64 = 0x9fc00;
const HIGH_MEMORY: u64 = 0x10_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
/// Guest RAM stays below the PCI hole a PC keeps under 4 GiB.
const MAX_MEMORY: usize = 3 << 30;
pub const MAX_MEMORY_MIB: u32 = (MAX_MEMORY >> 20) as u32;

/// How the kernel is entered.
enum Boot {
    /// ELF vmlinux: its PVH entry point.
    Pvh(u64),
    /// bzImage: its setup header and where its protected-mode part was loaded.
    BzImage(linux_loader::loader::bootparam::setup_header, u64),
}

pub struct LinuxConfig<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub memory_mib: usize,
    /// vCPUs, 1 to [`MAX_VCPUS`]: the first boots the kernel, which starts the others
    /// (INIT and start-up IPIs, handled by KVM's local APICs) from the MADT's list.
    pub vcpus: u8,
}

/// As many vCPUs as the MADT and the APIC IDs (one byte, the IOAPIC's ID after them)
/// allow without x2APIC.
pub const MAX_VCPUS: u8 = 64;

/// The serial ports as this VM wires them: COM1 (the console), then COM2 and COM3, which
/// Linux's 8250 driver registers with `8250.nr_uarts=3`. The DSDT lists them (see
/// [`acpi::LegacySerial`]), so each can have a line of its own: COM3 does not share
/// COM1's as on a PC.
pub const SERIAL_PORTS: [acpi::LegacySerial; 3] = [
    acpi::LegacySerial {
        base: COM1_BASE,
        gsi: COM1_GSI,
    },
    acpi::LegacySerial {
        base: 0x2f8,
        gsi: 3,
    },
    acpi::LegacySerial {
        base: 0x3e8,
        gsi: 22,
    },
];

/// How a Linux guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinuxEnd {
    /// The guest powered itself off (ACPI S5: `poweroff`, or the kit's init at the end).
    PowerOff,
    /// The guest reset (keyboard controller or triple fault); a kernel panic under
    /// `panic=-1` ends this way too.
    Reset,
    TimedOut,
    Failed(String),
}

/// Where the virtio-mmio windows start, one page each, and the first GSI they use (COM1
/// has 4; 5 and up are free on a PC without legacy devices).
const VIRTIO_MMIO_BASE: u32 = 0xd000_0000;
const VIRTIO_FIRST_GSI: u32 = 5;
pub const MAX_VIRTIO_DEVICES: usize = 16;
/// The ACPI tables live in the BIOS area, which the memory map leaves out of RAM.
const ACPI_TABLES: u64 = 0xe_0000;
/// The VM generation ID: at a fixed place (a restore rewrites it without reading the
/// tables), after the tables in the same reserved area, announced on the GSI after the
/// virtio devices'.
pub const GENERATION_ID: acpi::GenerationId = acpi::GenerationId {
    addr: 0xe_f000,
    gsi: VIRTIO_FIRST_GSI + MAX_VIRTIO_DEVICES as u32,
};

/// The PC devices a Linux guest touches: COM1, the keyboard controller's reset line, and
/// the virtio-mmio windows.
struct PcBus {
    /// COM1 (the console), then COM2 and COM3 when asked for.
    uarts: Vec<Uart>,
    /// Stops the vCPU between two exits: set by the host, or with one of the two below.
    stop: Arc<AtomicBool>,
    /// The guest reset the machine (keyboard controller, triple fault). Never cleared: a
    /// VM that ended stays ended, even if the host was stopping it at that moment.
    guest_reset: AtomicBool,
    /// The guest entered S5 (power-off). Never cleared either.
    powered_off: AtomicBool,
    /// Raises the Generic Event Device's interrupt: "the generation ID changed".
    generation_irq: Arc<EventFd>,
    virtio: Vec<(u64, std::sync::Mutex<MmioTransport>)>,
}

impl PcBus {
    fn window(&self, addr: u64) -> Option<(u64, &std::sync::Mutex<MmioTransport>)> {
        self.virtio
            .iter()
            .find(|(base, _)| (*base..*base + MMIO_WINDOW).contains(&addr))
            .map(|(base, t)| (addr - base, t))
    }
}

impl Bus for PcBus {
    fn pio_write(&self, port: u16, data: &[u8]) {
        if self.uarts.iter().any(|u| u.pio_write(port, data)) {
            return;
        }
        // i8042 command 0xFE: pulse the CPU reset line.
        if port == 0x64 && data.first() == Some(&0xfe) {
            self.guest_reset.store(true, Ordering::Release);
            self.stop.store(true, Ordering::Release);
        }
        // Other sleep states (S1–S4) are not offered (`\_S5_` alone): ignored.
        if port == acpi::SLEEP_CONTROL_PORT && data.first() == Some(&acpi::S5_POWER_OFF) {
            self.powered_off.store(true, Ordering::Release);
            self.stop.store(true, Ordering::Release);
        }
    }

    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if self.uarts.iter().any(|u| u.pio_read(port, data)) {
            return;
        }
        // The keyboard controller's status reads "empty": the reboot path does not wait.
        // The sleep status register reads "not woken": the guest is gone by then.
        data.fill(match port {
            0x64 | acpi::SLEEP_STATUS_PORT => 0,
            _ => 0xff,
        });
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((off, t)) = self.window(addr) {
            lock(t).write(off, data);
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.window(addr) {
            Some((off, t)) => lock(t).read(off, data),
            None => data.fill(0xff),
        }
    }
}

pub struct LinuxVm {
    // Dropped before the VM: device threads must be gone before guest RAM is.
    bus: Arc<PcBus>,
    vm: Vm,
    pub console: Transcript,
}

impl LinuxVm {
    /// Loads the kernel, initramfs and command line and sets the vCPU at the PVH entry.
    /// `devices` get virtio-mmio windows, described to the kernel in ACPI tables.
    /// `serials` are COM2 and COM3's outputs (none, one or two).
    pub fn new(
        config: &LinuxConfig,
        console: Transcript,
        serials: Vec<Transcript>,
        devices: Vec<Box<dyn VirtioDevice>>,
    ) -> anyhow::Result<LinuxVm> {
        if devices.len() > MAX_VIRTIO_DEVICES {
            bail!("at most {MAX_VIRTIO_DEVICES} virtio devices");
        }
        let mem_bytes = config.memory_mib << 20;
        if !(64 << 20..=MAX_MEMORY).contains(&mem_bytes) {
            bail!(
                "memory {} MiB: the embedded VMM boots Linux with 64 to {} MiB",
                config.memory_mib,
                MAX_MEMORY >> 20
            );
        }
        if !(1..=MAX_VCPUS).contains(&config.vcpus) {
            bail!(
                "{} vCPUs: the embedded VMM runs Linux with 1 to {MAX_VCPUS}",
                config.vcpus
            );
        }
        let started = Instant::now();
        let ram = GuestRam::new(mem_bytes)?;
        let vm = Vm::new_pc(ram, config.vcpus)?;
        let mem = vm.ram().memory().clone();

        let mut kernel = File::open(config.kernel)
            .with_context(|| format!("opening the kernel {}", config.kernel.display()))?;
        let mut magic = [0u8; 4];
        std::io::Read::read_exact(&mut kernel, &mut magic)
            .with_context(|| format!("reading the kernel {}", config.kernel.display()))?;
        let (boot, kernel_end) = if magic == *b"\x7fELF" {
            let loaded = Elf::load(&mem, None, &mut kernel, Some(GuestAddress(HIGH_MEMORY)))
                .map_err(|e| {
                    anyhow::anyhow!(
                        "{} is not a loadable ELF vmlinux ({e})",
                        config.kernel.display()
                    )
                })?;
            let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
                bail!(
                    "{} has no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY); build it with CONFIG_PVH or boot its bzImage",
                    config.kernel.display()
                );
            };
            // linux-loader reports the end as an address already.
            (Boot::Pvh(entry.0), loaded.kernel_end)
        } else {
            let loaded = BzImage::load(&mem, None, &mut kernel, Some(GuestAddress(HIGH_MEMORY)))
                .map_err(|e| {
                    anyhow::anyhow!(
                        "{} is neither an ELF vmlinux nor a bzImage ({e})",
                        config.kernel.display()
                    )
                })?;
            let header = loaded
                .setup_header
                .context("the bzImage loader returned no setup header")?;
            (
                Boot::BzImage(header, loaded.kernel_load.0),
                loaded.kernel_end,
            )
        };

        tracing::debug!("kernel loaded in {:.3} s", started.elapsed().as_secs_f64());
        let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(|e| anyhow::anyhow!("{e}"))?;
        cmdline
            .insert_str(config.cmdline)
            .map_err(|e| anyhow::anyhow!("kernel command line: {e}"))?;
        load_cmdline(&mem, GuestAddress(CMDLINE), &cmdline)
            .map_err(|e| anyhow::anyhow!("writing the command line: {e}"))?;
        let cmdline_len = config.cmdline.len() as u32;

        let windows = windows(devices.len());
        let n_serials = (1 + serials.len()).min(SERIAL_PORTS.len());
        let tables = acpi::build(
            ACPI_TABLES,
            config.vcpus,
            &windows,
            &SERIAL_PORTS[..n_serials],
            Some(GENERATION_ID),
        );
        if ACPI_TABLES + tables.bytes.len() as u64 > GENERATION_ID.addr {
            bail!("the ACPI tables overlap the generation ID");
        }
        vm.ram()
            .write_slice(&tables.bytes, GuestAddress(ACPI_TABLES))?;
        let initrd = match config.initrd {
            Some(initrd) => {
                let data = std::fs::read(initrd)
                    .with_context(|| format!("reading the initramfs {}", initrd.display()))?;
                let top = mem_bytes as u64;
                let at = top
                    .checked_sub(data.len() as u64)
                    .map(|a| a & !0xfff)
                    .filter(|a| *a >= kernel_end)
                    .with_context(|| {
                        format!(
                            "the initramfs ({} MiB) does not fit above the kernel in {} MiB",
                            data.len() >> 20,
                            config.memory_mib
                        )
                    })?;
                vm.ram().write_slice(&data, GuestAddress(at))?;
                Some((at, data.len() as u64))
            }
            None => None,
        };
        tracing::debug!(
            "initramfs loaded at {:.3} s",
            started.elapsed().as_secs_f64()
        );
        // Usable RAM: below the EBDA, and from 1 MiB up.
        let ram_ranges = [(0, EBDA), (HIGH_MEMORY, mem_bytes as u64 - HIGH_MEMORY)];

        match boot {
            Boot::Pvh(entry) => {
                let mut start = hvm_start_info {
                    magic: XEN_HVM_START_MAGIC,
                    version: 1,
                    rsdp_paddr: tables.rsdp,
                    cmdline_paddr: CMDLINE,
                    memmap_paddr: MEMMAP,
                    memmap_entries: ram_ranges.len() as u32,
                    ..Default::default()
                };
                let memmap: Vec<hvm_memmap_table_entry> = ram_ranges
                    .iter()
                    .map(|(addr, size)| hvm_memmap_table_entry {
                        addr: *addr,
                        size: *size,
                        type_: E820_RAM,
                        reserved: 0,
                    })
                    .collect();
                let modules: Vec<hvm_modlist_entry> = initrd
                    .iter()
                    .map(|(at, size)| hvm_modlist_entry {
                        paddr: *at,
                        size: *size,
                        ..Default::default()
                    })
                    .collect();
                if !modules.is_empty() {
                    start.nr_modules = modules.len() as u32;
                    start.modlist_paddr = MODLIST;
                }
                let mut params = BootParams::new(&start, GuestAddress(START_INFO));
                params.set_sections(&memmap, GuestAddress(MEMMAP));
                if !modules.is_empty() {
                    params.set_modules(&modules, GuestAddress(MODLIST));
                }
                PvhBootConfigurator::write_bootparams(&params, vm.ram().memory())
                    .map_err(|e| anyhow::anyhow!("writing the PVH start info: {e}"))?;
                // PVH: 32-bit protected mode, paging off, %ebx → start info.
                enter(&vm.vcpus()[0], vm.ram(), CpuMode::Protected32, entry, 0)?;
                let mut regs = vm.vcpus()[0].get_regs()?;
                regs.rbx = START_INFO;
                vm.vcpus()[0].set_regs(&regs)?;
            }
            Boot::BzImage(header, load) => {
                let mut params = boot_params {
                    hdr: header,
                    acpi_rsdp_addr: tables.rsdp,
                    ..Default::default()
                };
                params.hdr.type_of_loader = 0xff; // "undefined" boot loader
                params.hdr.boot_flag = 0xaa55;
                params.hdr.cmd_line_ptr = CMDLINE as u32;
                params.hdr.cmdline_size = cmdline_len;
                if let Some((at, size)) = initrd {
                    params.hdr.ramdisk_image = at as u32;
                    params.hdr.ramdisk_size = size as u32;
                }
                for (i, (addr, size)) in ram_ranges.iter().enumerate() {
                    params.e820_table[i] = boot_e820_entry {
                        addr: *addr,
                        size: *size,
                        type_: E820_RAM,
                    };
                }
                params.e820_entries = ram_ranges.len() as u8;
                LinuxBootConfigurator::write_bootparams(
                    &BootParams::new(&params, GuestAddress(ZERO_PAGE)),
                    vm.ram().memory(),
                )
                .map_err(|e| anyhow::anyhow!("writing the zero page: {e}"))?;
                // The 64-bit boot protocol: long mode with the memory identity-mapped,
                // %rsi → boot_params, entry 0x200 into the protected-mode kernel.
                enter(&vm.vcpus()[0], vm.ram(), CpuMode::Long64, load + 0x200, 0)?;
                let mut regs = vm.vcpus()[0].get_regs()?;
                regs.rsi = ZERO_PAGE;
                vm.vcpus()[0].set_regs(&regs)?;
            }
        }

        write_generation_id(&vm)?;
        let mut outputs = vec![console.clone()];
        outputs.extend(serials);
        let bus = build_bus(&vm, &outputs, devices, &windows, None)?;
        tracing::debug!("VM ready in {:.3} s", started.elapsed().as_secs_f64());
        Ok(LinuxVm { bus, vm, console })
    }

    /// The VM generation ID the guest sees now.
    pub fn generation_id(&self) -> anyhow::Result<[u8; 16]> {
        let mut id = [0u8; 16];
        self.vm
            .ram()
            .read_slice(&mut id, GuestAddress(GENERATION_ID.addr))?;
        Ok(id)
    }

    /// Host input for serial port `index` (0 is COM1, the console; 1 and 2 are the
    /// extra ports), usable while the vCPU runs.
    pub fn serial_input(&self, index: usize) -> Option<SerialInput> {
        (index < self.bus.uarts.len()).then(|| SerialInput {
            bus: self.bus.clone(),
            index,
        })
    }

    /// Where the (stopped) vCPU is: for diagnostics.
    pub fn vcpu_regs(&self) -> anyhow::Result<kvm_bindings::kvm_regs> {
        Ok(self
            .vm
            .vcpus()
            .first()
            .context("the vCPU is running")?
            .get_regs()?)
    }

    /// Runs the guest until it ends the VM, fails, or `timeout` passes. After a timeout
    /// the vCPU is stopped between two instructions: the VM can be snapshotted, or run
    /// again.
    pub fn run(&mut self, timeout: Duration) -> LinuxEnd {
        let deadline = Instant::now() + timeout;
        self.run_until(|| Instant::now() >= deadline)
    }

    /// Runs the guest until it ends the VM or fails, or until `stop_now` (asked every
    /// couple of milliseconds while the vCPU runs on undisturbed) says so; then the vCPU
    /// is stopped between two instructions and this returns [`LinuxEnd::TimedOut`].
    pub fn run_until(&mut self, mut stop_now: impl FnMut() -> bool) -> LinuxEnd {
        if let Some(end) = self.guest_end() {
            return end;
        }
        let vcpus = self.vm.take_vcpus();
        if vcpus.is_empty() {
            return LinuxEnd::Failed(
                "the VM was abandoned earlier (its vCPU threads did not stop)".into(),
            );
        }
        self.bus.stop.store(false, Ordering::Release);
        crate::vcpu::kick_signal();
        // One thread per vCPU. Each keeps guest RAM mapped for as long as it may enter
        // the guest, even if the VM is abandoned and dropped while it is stuck.
        let threads: Vec<_> = vcpus
            .into_iter()
            .map(|mut vcpu| {
                let (bus, stop) = (self.bus.clone(), self.bus.stop.clone());
                let ram = self.vm.ram().memory().clone();
                std::thread::spawn(move || {
                    let end = run(&mut vcpu, &*bus, &stop);
                    // Whatever ended this vCPU (a reset, a failure) ends the VM: the
                    // others stop at their next exit, or when kicked below.
                    stop.store(true, Ordering::Release);
                    drop(ram);
                    (vcpu, end)
                })
            })
            .collect();
        while !threads.iter().any(|t| t.is_finished()) {
            if stop_now() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        for thread in &threads {
            crate::vcpu::stop_thread(thread, &self.bus.stop);
        }
        // A vCPU thread leaves KVM_RUN at once when kicked, but it may be inside a
        // device's handler, blocked on the host (a hung file system under a share, a
        // stalled stdout pipe). Waiting for it is bounded: after that the VM is
        // abandoned (each thread keeps what it uses alive until it returns).
        let give_up = Instant::now() + STOP_LIMIT;
        while !threads.iter().all(|t| t.is_finished()) {
            if Instant::now() >= give_up {
                return LinuxEnd::Failed(format!(
                    "a vCPU did not stop within {} s (blocked in a device's host I/O); the VM is abandoned",
                    STOP_LIMIT.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut vcpus = Vec::new();
        let mut ends = Vec::new();
        for thread in threads {
            let Ok((vcpu, end)) = thread.join() else {
                return LinuxEnd::Failed("a vCPU thread panicked; the VM is abandoned".into());
            };
            vcpus.push(vcpu);
            ends.push(end);
        }
        self.vm.return_vcpus(vcpus);
        if ends.contains(&Stop::Shutdown) {
            // A triple fault: the machine resets.
            self.bus.guest_reset.store(true, Ordering::Release);
        }
        if let Some(end) = self.guest_end() {
            return end;
        }
        // The vCPU that ended the run says why; the others were only stopped.
        let end = ends
            .into_iter()
            .find(|e| !matches!(e, Stop::Paused))
            .unwrap_or(Stop::Paused);
        match end {
            Stop::Paused | Stop::Shutdown => LinuxEnd::TimedOut,
            Stop::Halted => LinuxEnd::Failed("a vCPU halted with no interrupt controller".into()),
            Stop::Failed(why) => LinuxEnd::Failed(why),
        }
    }

    /// How the guest ended the VM, if it did.
    fn guest_end(&self) -> Option<LinuxEnd> {
        if self.bus.powered_off.load(Ordering::Acquire) {
            Some(LinuxEnd::PowerOff)
        } else if self.bus.guest_reset.load(Ordering::Acquire) {
            Some(LinuxEnd::Reset)
        } else {
            None
        }
    }
}

/// A device lock that outlives a panic of the thread that held it: the host side still
/// has to save, quiesce and drop the device (its state is the best there is).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How long a stopped vCPU may take to come back from a device's host I/O.
const STOP_LIMIT: Duration = Duration::from_secs(5);

/// What a Linux VM's snapshot keeps beyond the VM's own (`kvm::snapshot`): the UART and
/// the virtio transports.
#[derive(serde::Serialize, serde::Deserialize)]
struct DeviceStates {
    uarts: Vec<UartState>,
    virtio: Vec<TransportState>,
}

impl LinuxVm {
    /// Writes the stopped VM (after [`LinuxVm::run`] returned) and its devices to `dir`.
    pub fn snapshot(&self, dir: &Path) -> anyhow::Result<()> {
        if self.vm.vcpus().is_empty() {
            bail!("the VM was abandoned (its vCPU thread did not stop): it cannot be snapshotted");
        }
        if let Some(end) = self.guest_end() {
            bail!("the guest has ended the VM ({end:?}): there is nothing to snapshot");
        }
        for (i, (_, t)) in self.bus.virtio.iter().enumerate() {
            if let Some(why) = lock(t).snapshot_blocker() {
                bail!("virtio device {i} cannot be snapshotted: {why}");
            }
        }
        // The vCPU is stopped; the devices' host threads stop writing guest memory too,
        // and host input waits, so that memory, the rings, the UARTs and the interrupt
        // state all agree.
        for (_, t) in &self.bus.virtio {
            lock(t).quiesce();
        }
        for u in &self.bus.uarts {
            u.set_quiesced(true);
        }
        let saved = self.save_quiesced(dir);
        for u in &self.bus.uarts {
            u.set_quiesced(false);
        }
        for (_, t) in &self.bus.virtio {
            lock(t).resume();
        }
        saved
    }

    fn save_quiesced(&self, dir: &Path) -> anyhow::Result<()> {
        let states = DeviceStates {
            uarts: self.bus.uarts.iter().map(Uart::save).collect(),
            virtio: self
                .bus
                .virtio
                .iter()
                .map(|(_, t)| lock(t).save())
                .collect(),
        };
        snapshot::save_with(&self.vm, dir, Some(serde_json::to_value(&states)?))
    }

    /// A VM restored from `dir`, with `devices` (the same kinds, in the same order, as
    /// the snapshotted VM had) taking over their transports' state.
    pub fn restore(
        dir: &Path,
        console: Transcript,
        serials: Vec<Transcript>,
        devices: Vec<Box<dyn VirtioDevice>>,
    ) -> anyhow::Result<LinuxVm> {
        let (vm, states) = snapshot::restore_with(dir)?;
        let states: DeviceStates = serde_json::from_value(
            states.with_context(|| format!("{} keeps no device state", dir.display()))?,
        )
        .with_context(|| format!("the device state in {} is damaged", dir.display()))?;
        if states.virtio.len() != devices.len() {
            bail!(
                "the snapshot had {} virtio devices, {} were given",
                states.virtio.len(),
                devices.len()
            );
        }
        let windows = windows(devices.len());
        let mut outputs = vec![console.clone()];
        outputs.extend(serials);
        let bus = build_bus(&vm, &outputs, devices, &windows, Some(&states))?;
        // A restored VM is a new generation: a new ID, and the event that makes the
        // guest read it (it is delivered when the vCPU next runs).
        write_generation_id(&vm)?;
        bus.generation_irq
            .write(1)
            .context("raising the generation ID's interrupt")?;
        Ok(LinuxVm { bus, vm, console })
    }
}

/// The device part of a snapshot's state (as [`snapshot::check`] returns it) taken over
/// by `devices` as [`LinuxVm::restore`] does, without a VM: the UARTs and the virtio
/// transports, with no interrupt routed. Public for the fuzz harness (`fuzz-harness`),
/// which feeds state files to it without `/dev/kvm`.
#[doc(hidden)]
pub fn check_device_states(
    states: serde_json::Value,
    devices: Vec<Box<dyn VirtioDevice>>,
    mem: vm_memory::GuestMemoryMmap,
) -> anyhow::Result<Vec<MmioTransport>> {
    let states: DeviceStates =
        serde_json::from_value(states).context("the device state is damaged")?;
    if states.uarts.len() > SERIAL_PORTS.len() {
        bail!("the snapshot has {} serial ports", states.uarts.len());
    }
    if states.virtio.len() != devices.len() {
        bail!(
            "the snapshot had {} virtio devices, {} were given",
            states.virtio.len(),
            devices.len()
        );
    }
    for (saved, port) in states.uarts.iter().zip(SERIAL_PORTS) {
        let irq = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        Uart::restore(port.base, irq, Transcript::new(None), saved)?;
    }
    devices
        .into_iter()
        .zip(&states.virtio)
        .map(|(device, saved)| MmioTransport::restore(device, mem.clone(), None, saved))
        .collect()
}

/// Bytes for a serial port's receive side, fed while the guest runs.
#[derive(Clone)]
pub struct SerialInput {
    bus: Arc<PcBus>,
    index: usize,
}

impl SerialInput {
    /// Feeds what fits in the port's FIFO now; returns how many bytes were taken.
    pub fn feed(&self, bytes: &[u8]) -> usize {
        self.bus.uarts[self.index].feed(bytes)
    }

    /// As [`SerialInput::feed`], waiting up to `wait` for room when the FIFO is full.
    pub fn feed_wait(&self, bytes: &[u8], wait: Duration) -> usize {
        self.bus.uarts[self.index].feed_wait(bytes, wait)
    }
}

fn write_generation_id(vm: &Vm) -> anyhow::Result<()> {
    let id: [u8; 16] = crate::random::bytes().context("the VM generation ID")?;
    vm.ram()
        .write_slice(&id, GuestAddress(GENERATION_ID.addr))?;
    Ok(())
}

fn windows(n: usize) -> Vec<MmioDevice> {
    (0..n as u32)
        .map(|i| MmioDevice {
            base: VIRTIO_MMIO_BASE + i * MMIO_WINDOW as u32,
            size: MMIO_WINDOW as u32,
            gsi: VIRTIO_FIRST_GSI + i,
        })
        .collect()
}

/// The devices of a Linux VM, their interrupts routed: fresh, or from a snapshot.
fn build_bus(
    vm: &Vm,
    outputs: &[Transcript],
    devices: Vec<Box<dyn VirtioDevice>>,
    windows: &[MmioDevice],
    saved: Option<&DeviceStates>,
) -> anyhow::Result<Arc<PcBus>> {
    if outputs.len() > SERIAL_PORTS.len() {
        bail!("at most {} serial ports", SERIAL_PORTS.len());
    }
    if let Some(s) = saved {
        if s.uarts.len() != outputs.len() {
            bail!(
                "the snapshot had {} serial ports, {} were given",
                s.uarts.len(),
                outputs.len()
            );
        }
    }
    let generation_irq = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
    vm.fd()
        .register_irqfd(&generation_irq, GENERATION_ID.gsi)
        .context("routing the generation ID's interrupt (KVM_IRQFD)")?;
    let mut uarts = Vec::new();
    for (i, (out, port)) in outputs.iter().zip(SERIAL_PORTS).enumerate() {
        let irq = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        vm.fd()
            .register_irqfd(&irq, port.gsi)
            .with_context(|| format!("routing COM{}'s GSI {} (KVM_IRQFD)", i + 1, port.gsi))?;
        let base = port.base;
        uarts.push(match saved {
            Some(s) => Uart::restore(base, irq, out.clone(), &s.uarts[i])?,
            None => Uart::new(base, irq, out.clone()),
        });
    }
    let mut virtio = Vec::new();
    let mut shared_memory = SharedMemoryLayout::default();
    for (i, (device, w)) in devices.into_iter().zip(windows).enumerate() {
        let irq = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        vm.fd()
            .register_irqfd(&irq, w.gsi)
            .with_context(|| format!("routing GSI {} (KVM_IRQFD)", w.gsi))?;
        let mem = vm.ram().memory().clone();
        let region = device.shared_memory();
        let mut transport = match saved {
            Some(s) => MmioTransport::restore(device, mem, Some(irq), &s.virtio[i])?,
            None => MmioTransport::new(device, mem, Some(irq)),
        };
        if let Some(region) = region {
            let guest_base = shared_memory.map(vm, &region)?;
            transport.set_shared_memory(guest_base, region.len());
        }
        virtio.push((u64::from(w.base), std::sync::Mutex::new(transport)));
    }
    Ok(Arc::new(PcBus {
        uarts,
        stop: Arc::new(AtomicBool::new(false)),
        guest_reset: AtomicBool::new(false),
        powered_off: AtomicBool::new(false),
        generation_irq,
        virtio,
    }))
}

/// Where devices' shared memory regions (virtio-fs DAX windows) go in the guest: above
/// 4 GiB, clear of RAM (at most 3 GiB) and the devices below 4 GiB, each in a KVM memory
/// slot of its own after RAM's (slot 0).
#[derive(Default)]
struct SharedMemoryLayout {
    mapped: u32,
    next: u64,
}

impl SharedMemoryLayout {
    const BASE: u64 = 1 << 32;
    /// Regions start on 1 GiB boundaries: aligned for the huge pages the guest's DAX code
    /// maps them with.
    const ALIGN: u64 = 1 << 30;

    /// Maps `region` into the guest and returns its guest-physical address.
    fn map(&mut self, vm: &Vm, region: &crate::virtio::shm::ShmRegion) -> anyhow::Result<u64> {
        let guest_base = Self::BASE.max(self.next);
        self.mapped += 1;
        self.next = (guest_base + region.len()).next_multiple_of(Self::ALIGN);
        let slot = kvm_userspace_memory_region {
            slot: self.mapped,
            flags: 0,
            guest_phys_addr: guest_base,
            memory_size: region.len(),
            userspace_addr: region.host_address(),
        };
        // SAFETY: the region is a mapping its device keeps for as long as the device
        // lives, which the bus holds until the VM is gone; its contents may change under
        // the guest (files mapped in and out), which is what the guest asked for.
        unsafe { vm.fd().set_user_memory_region(slot) }
            .context("mapping a shared memory region (KVM_SET_USER_MEMORY_REGION)")?;
        Ok(guest_base)
    }
}

/// Whether `path` is a kernel this VMM boots: an ELF vmlinux (PVH) or a bzImage. Checked
/// before anything starts, so a wrong `--kernel` is refused with what to give instead.
pub fn check_kernel(path: &Path) -> Result<(), String> {
    let mut head = [0u8; 0x206];
    let read = File::open(path).and_then(|mut f| std::io::Read::read(&mut f, &mut head));
    let n = match read {
        Ok(n) => n,
        Err(e) => return Err(format!("cannot read the kernel {}: {e}", path.display())),
    };
    let elf = n >= 4 && head[..4] == *b"\x7fELF";
    // The boot protocol's setup header carries "HdrS" at 0x202.
    let bzimage = n >= 0x206 && head[0x202..0x206] == *b"HdrS";
    if elf || bzimage {
        return Ok(());
    }
    Err(format!(
        "{} is neither an ELF vmlinux nor a bzImage: the embedded VMM boots one of those (the guest kit's vmlinux, or a distribution's vmlinuz)",
        path.display()
    ))
}
