//! A KVM virtual machine: guest RAM as memory slot 0 and its vCPUs, each with the CPUID
//! KVM supports on this host, adjusted per vCPU ([`cpuid`]).

use anyhow::{bail, Context};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use crate::cpuid::{self, Topology};

use crate::memory::GuestRam;

pub struct Vm {
    // Kept open for the VM's lifetime (the VM fd refers to it).
    _kvm: Kvm,
    fd: VmFd,
    ram: GuestRam,
    vcpus: Vec<VcpuFd>,
    pc: bool,
}

impl Vm {
    /// Creates a VM over `ram` with `vcpus` vCPUs and no interrupt controller: HLT exits
    /// to userspace (what small test guests want). Fails with what to do when /dev/kvm is
    /// missing or not accessible.
    pub fn new(ram: GuestRam, vcpus: u8) -> anyhow::Result<Vm> {
        Self::create(ram, vcpus, false)
    }

    /// A VM with the PC's interrupt controllers and timer in the kernel (PIC, IOAPIC,
    /// LAPIC, PIT), as Linux needs them: HLT waits in the kernel for an interrupt, devices
    /// raise GSIs through irqfds.
    pub fn new_pc(ram: GuestRam, vcpus: u8) -> anyhow::Result<Vm> {
        Self::create(ram, vcpus, true)
    }

    /// [`Vm::new`] or [`Vm::new_pc`].
    pub fn create(ram: GuestRam, vcpus: u8, pc: bool) -> anyhow::Result<Vm> {
        if vcpus == 0 {
            bail!("a VM needs at least one vCPU");
        }
        let kvm = Kvm::new().map_err(|e| {
            anyhow::anyhow!(
                "cannot open /dev/kvm ({e}): load kvm_intel or kvm_amd, or run where KVM is available"
            )
        })?;
        let fd = kvm.create_vm().context("KVM_CREATE_VM")?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram.len() as u64,
            userspace_addr: ram.host_address(),
        };
        // SAFETY: the region is the mapping `ram` owns, which this Vm keeps for as long
        // as the VM exists (and each running vCPU thread holds a clone of it).
        unsafe { fd.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION")?;
        if pc {
            // Intel VMX needs a TSS region (3 pages) for real-mode emulation; out of the
            // way just below 4 GiB, as other VMMs place it.
            fd.set_tss_address(0xfffb_d000)
                .context("KVM_SET_TSS_ADDR")?;
            fd.create_irq_chip().context("KVM_CREATE_IRQCHIP")?;
            mask_pics(&fd)?;
            let pit = kvm_bindings::kvm_pit_config {
                flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(pit).context("KVM_CREATE_PIT2")?;
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .context("KVM_GET_SUPPORTED_CPUID")?;
        let topology = Topology {
            vcpus,
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
        };
        let mut list = Vec::new();
        for id in 0..vcpus {
            let vcpu = fd
                .create_vcpu(u64::from(id))
                .with_context(|| format!("KVM_CREATE_VCPU {id}"))?;
            vcpu.set_cpuid2(&cpuid::for_vcpu(&cpuid, id, topology))
                .context("KVM_SET_CPUID2")?;
            if pc {
                set_lint(&vcpu)?;
            }
            list.push(vcpu);
        }
        Ok(Vm {
            _kvm: kvm,
            fd,
            ram,
            vcpus: list,
            pc,
        })
    }

    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Whether the VM has the PC's in-kernel interrupt controllers and timer.
    pub fn is_pc(&self) -> bool {
        self.pc
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn vcpus(&self) -> &[VcpuFd] {
        &self.vcpus
    }

    pub fn vcpu_mut(&mut self, index: usize) -> &mut VcpuFd {
        &mut self.vcpus[index]
    }

    /// Hands the vCPUs out (each runs on a thread of its own); the VM keeps memory.
    pub fn take_vcpus(&mut self) -> Vec<VcpuFd> {
        std::mem::take(&mut self.vcpus)
    }

    /// Gives vCPUs back (after their threads stopped), e.g. to snapshot them.
    pub fn return_vcpus(&mut self, vcpus: Vec<VcpuFd>) {
        self.vcpus = vcpus;
    }
}

/// Masks every line of both 8259s, as firmware leaves them once the IOAPIC is in use.
/// KVM creates them unmasked, and its default routing sends GSIs 0–15 to the PIC as well
/// as the IOAPIC: a guest that never touches the PIC (Linux under hardware-reduced ACPI
/// installs no legacy PIC) would otherwise also take every serial or timer interrupt
/// through LINT0 as a stray vector (the PIC's unprogrammed base + IRQ) and crash.
fn mask_pics(fd: &kvm_ioctls::VmFd) -> anyhow::Result<()> {
    for chip_id in [
        kvm_bindings::KVM_IRQCHIP_PIC_MASTER,
        kvm_bindings::KVM_IRQCHIP_PIC_SLAVE,
    ] {
        let mut chip = kvm_bindings::kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        fd.get_irqchip(&mut chip).context("KVM_GET_IRQCHIP")?;
        // For the PIC chip ids, `pic` is the union member KVM filled in (writing a Copy
        // union field is safe).
        chip.chip.pic.imr = 0xff;
        fd.set_irqchip(&chip).context("KVM_SET_IRQCHIP")?;
    }
    Ok(())
}

/// Local APIC LINT0 as ExtINT (the PIC's output, which Linux uses until it finds an
/// IOAPIC) and LINT1 as NMI, as a PC's firmware leaves them.
fn set_lint(vcpu: &VcpuFd) -> anyhow::Result<()> {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    const DELIVERY_MODE_EXTINT: u32 = 7 << 8;
    const DELIVERY_MODE_NMI: u32 = 4 << 8;
    let mut lapic = vcpu.get_lapic().context("KVM_GET_LAPIC")?;
    let mut reg = |offset: usize, mode: u32| {
        let bytes: Vec<u8> = lapic.regs[offset..offset + 4]
            .iter()
            .map(|b| *b as u8)
            .collect();
        let v = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let v = (v & !0x700) | mode;
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    };
    reg(LVT_LINT0, DELIVERY_MODE_EXTINT);
    reg(LVT_LINT1, DELIVERY_MODE_NMI);
    vcpu.set_lapic(&lapic).context("KVM_SET_LAPIC")?;
    Ok(())
}
