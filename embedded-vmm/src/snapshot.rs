//! Snapshots of an embedded-VMM guest: every vCPU's state (general and special registers,
//! the XSAVE area (x87 FPU, SSE, AVX), XCRs, debug registers, pending events, MP state, MSRs, and the
//! local APIC) and the VM's in-kernel devices (PIC, IOAPIC, PIT, kvmclock) in a versioned
//! state file, and guest memory in a file of its own. Restoring maps the memory file privately (copy-on-write), so a
//! restore costs an mmap plus a few ioctls per vCPU, and many VMs can restore from one
//! snapshot at once.
//!
//! Layout of `DIR/vm-state.json`: `{"magic": "vmbuild-kvm-snapshot", "version": 7, ...}`;
//! memory in `DIR/memory-<id>` (sparse where the guest never wrote). A state file of another
//! version, a wrong magic, a memory file of the wrong size: refused with what is wrong.

use std::path::Path;

use anyhow::{bail, Context};
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::memory::GuestRam;
use crate::vm::Vm;

pub const MAGIC: &str = "vmbuild-kvm-snapshot";
/// Bumped whenever the state file's meaning changes, or the machine a Linux snapshot
/// belongs to (its ports, interrupt lines, ACPI tables in guest memory): older files are
/// refused. 4: serial ports listed in the DSDT with COM3 on its own GSI, the sleep
/// registers at 0x600, the VM generation ID. 5: CPUID says "hypervisor" (the guest runs
/// on kvm-clock and KVM's paravirtual MSRs, which are saved), no CMOS RTC in the FADT.
/// 6: KVM's structures in kvm-bindings' serde form; no separate FPU state (XSAVE has it).
/// 7: the state file is `vm-state.json` (it was `vcpus.json`, though it holds the whole
/// VM's state, devices included).
pub const VERSION: u32 = 7;
/// The VM's state: every vCPU, the in-kernel devices, the virtio devices, the memory
/// file's name.
pub const VM_STATE_FILE: &str = "vm-state.json";
/// Guest memory is saved as `memory-<id>`, named in the state file: a new snapshot in
/// the same directory never rewrites a file that restored VMs still map, and a state file
/// can only ever be paired with the memory written with it.
const MEMORY_PREFIX: &str = "memory-";

/// MSRs saved when this host's KVM has them: syscall and sysenter entry points, segment
/// bases, TSC and its deadline timer (which KVM keeps outside the LAPIC state), PAT,
/// MISC_ENABLE, and kvmclock's system time and wall clock.
const MSRS: [u32; 15] = [
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SYSCALL_MASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0100, // FS_BASE
    0xc000_0101, // GS_BASE
    0x0000_0174, // SYSENTER_CS
    0x0000_0175, // SYSENTER_ESP
    0x0000_0176, // SYSENTER_EIP
    0x0000_0010, // TSC
    0x0000_0277, // PAT
    0x0000_01a0, // MISC_ENABLE
    0x4b56_4d01, // KVM_SYSTEM_TIME_NEW
    0x4b56_4d00, // KVM_WALL_CLOCK_NEW
];
/// With an in-kernel APIC only (KVM refuses some of them without one, e.g. PV EOI): the
/// paravirtual features a Linux guest turns on once it sees KVM's CPUID leaves. Without
/// them a restored guest would wait for async page faults that never come, or read a
/// stale steal-time page.
/// The async-PF interrupt vector goes before ASYNC_PF_EN, which KVM checks against it.
const PV_MSRS: [u32; 5] = [
    0x4b56_4d06, // KVM_ASYNC_PF_INT
    0x4b56_4d02, // KVM_ASYNC_PF_EN
    0x4b56_4d03, // KVM_STEAL_TIME
    0x4b56_4d04, // KVM_PV_EOI_EN
    0x4b56_4d05, // KVM_POLL_CONTROL
];
/// After the LAPIC (it arms the LAPIC's deadline timer).
const MSR_TSC_DEADLINE: u32 = 0x6e0;

#[derive(Serialize, Deserialize)]
struct StateFile {
    magic: String,
    version: u32,
    memory_file: String,
    memory_bytes: u64,
    vcpus: Vec<VcpuState>,
    /// The in-kernel PC devices, for a VM made with `Vm::new_pc`.
    pc: Option<PcState>,
    /// The VMM's own devices (a Linux VM's UARTs and virtio devices), kept in this file
    /// so that one rename switches the whole snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    devices: Option<serde_json::Value>,
}

/// The in-kernel devices, as kvm-bindings serializes them (its `serde` feature checks
/// each structure's size on the way back).
#[derive(Serialize, Deserialize)]
struct PcState {
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

#[derive(Serialize, Deserialize)]
struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xcrs: kvm_xcrs,
    events: kvm_vcpu_events,
    mp_state: kvm_mp_state,
    msrs: Vec<(u32, u64)>,
    /// The legacy 4 KiB XSAVE area: x87 FPU, SSE and AVX state (so no separate
    /// KVM_GET_FPU, whose state it includes).
    xsave: Vec<u32>,
    debugregs: kvm_debugregs,
    /// Only with an in-kernel APIC.
    lapic: Option<kvm_lapic_state>,
}

fn save_vcpu(vcpu: &VcpuFd, pc: bool) -> anyhow::Result<VcpuState> {
    // One MSR at a time: KVM_GET_MSRS stops at the first one it does not have, and which
    // it has depends on the host and on the VM (no TSC deadline without an APIC).
    let mut saved = Vec::new();
    let pc_only: &[u32] = if pc { &PV_MSRS } else { &[] };
    for index in MSRS
        .iter()
        .chain(pc_only)
        .chain(pc.then_some(&MSR_TSC_DEADLINE))
    {
        let mut one = Msrs::from_entries(&[kvm_msr_entry {
            index: *index,
            ..Default::default()
        }])
        .map_err(|e| anyhow::anyhow!("MSR list: {e:?}"))?;
        if vcpu.get_msrs(&mut one).context("KVM_GET_MSRS")? == 1 {
            saved.push((*index, one.as_slice()[0].data));
        }
    }
    Ok(VcpuState {
        regs: vcpu.get_regs().context("KVM_GET_REGS")?,
        sregs: vcpu.get_sregs().context("KVM_GET_SREGS")?,
        xcrs: vcpu.get_xcrs().context("KVM_GET_XCRS")?,
        events: vcpu.get_vcpu_events().context("KVM_GET_VCPU_EVENTS")?,
        mp_state: vcpu.get_mp_state().context("KVM_GET_MP_STATE")?,
        msrs: saved,
        xsave: vcpu.get_xsave().context("KVM_GET_XSAVE")?.region.to_vec(),
        debugregs: vcpu.get_debug_regs().context("KVM_GET_DEBUGREGS")?,
        lapic: if pc {
            Some(vcpu.get_lapic().context("KVM_GET_LAPIC")?)
        } else {
            None
        },
    })
}

fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> anyhow::Result<()> {
    // Special registers first: they decide how the rest is interpreted.
    vcpu.set_sregs(&s.sregs).context("KVM_SET_SREGS")?;
    vcpu.set_regs(&s.regs).context("KVM_SET_REGS")?;
    let mut xsave = kvm_bindings::kvm_xsave::default();
    if s.xsave.len() != xsave.region.len() {
        bail!(
            "a saved XSAVE area has {} words, not {}",
            s.xsave.len(),
            xsave.region.len()
        );
    }
    xsave.region.copy_from_slice(&s.xsave);
    // SAFETY: a legacy (4 KiB) XSAVE area as KVM_GET_XSAVE returned it, with no extra
    // (AMX) state after it, which is what KVM_SET_XSAVE reads.
    unsafe { vcpu.set_xsave(&xsave) }.context("KVM_SET_XSAVE")?;
    vcpu.set_xcrs(&s.xcrs).context("KVM_SET_XCRS")?;
    vcpu.set_debug_regs(&s.debugregs)
        .context("KVM_SET_DEBUGREGS")?;
    if let Some(lapic) = &s.lapic {
        vcpu.set_lapic(lapic).context("KVM_SET_LAPIC")?;
    }
    let msrs = Msrs::from_entries(
        &s.msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect::<Vec<_>>(),
    )
    .map_err(|e| anyhow::anyhow!("MSR list: {e:?}"))?;
    let n = vcpu.set_msrs(&msrs).context("KVM_SET_MSRS")?;
    if n != s.msrs.len() {
        bail!("KVM restored {n} of {} MSRs", s.msrs.len());
    }
    vcpu.set_mp_state(s.mp_state).context("KVM_SET_MP_STATE")?;
    vcpu.set_vcpu_events(&s.events)
        .context("KVM_SET_VCPU_EVENTS")?;
    Ok(())
}

/// Writes `vm`'s memory and vCPU state into `dir` (created). The vCPUs must be stopped.
pub fn save(vm: &Vm, dir: &Path) -> anyhow::Result<()> {
    save_with(vm, dir, None)
}

/// As [`save`], with the VMM's device state in the same state file.
pub fn save_with(vm: &Vm, dir: &Path, devices: Option<serde_json::Value>) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let vcpus = vm
        .vcpus()
        .iter()
        .map(|v| save_vcpu(v, vm.is_pc()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let pc = if vm.is_pc() {
        let chip = |id: u32| -> anyhow::Result<kvm_irqchip> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            vm.fd().get_irqchip(&mut c).context("KVM_GET_IRQCHIP")?;
            Ok(c)
        };
        Some(PcState {
            pic_master: chip(kvm_bindings::KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(kvm_bindings::KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(kvm_bindings::KVM_IRQCHIP_IOAPIC)?,
            pit: vm.fd().get_pit2().context("KVM_GET_PIT2")?,
            clock: vm.fd().get_clock().context("KVM_GET_CLOCK")?,
        })
    } else {
        None
    };
    let id: [u8; 8] = crate::random::bytes().context("naming the memory file")?;
    let memory_file = format!("{MEMORY_PREFIX}{:016x}", u64::from_le_bytes(id));
    let tmp_memory = dir.join(format!(".{memory_file}.tmp"));
    vm.ram().save(&tmp_memory).context("writing guest memory")?;
    std::fs::rename(&tmp_memory, dir.join(&memory_file))?;
    let state = StateFile {
        magic: MAGIC.into(),
        version: VERSION,
        memory_file: memory_file.clone(),
        memory_bytes: vm.ram().len() as u64,
        vcpus,
        pc,
        devices,
    };
    let tmp = dir.join(".vm-state.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&state)?)?;
    std::fs::rename(&tmp, dir.join(VM_STATE_FILE))?;
    // Memory of earlier snapshots here is no longer named by the state file. VMs that
    // still map it keep their pages: unlinking does not take a mapping away.
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(MEMORY_PREFIX) && name != memory_file {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// The memory file of the snapshot in `dir`, as its state file names it.
pub fn memory_file(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(VM_STATE_FILE))?)?;
    let name = state
        .get("memory_file")
        .and_then(|n| n.as_str())
        .context("no memory_file in the state file")?;
    check_memory_name(name)?;
    Ok(dir.join(name))
}

fn check_memory_name(name: &str) -> anyhow::Result<()> {
    if !name.starts_with(MEMORY_PREFIX) || name.contains('/') || name.contains("..") {
        bail!("the state file names '{name}' as its memory, which is not a snapshot memory file");
    }
    Ok(())
}

/// A new VM with the memory and vCPU state of the snapshot in `dir`.
pub fn restore(dir: &Path) -> anyhow::Result<Vm> {
    Ok(restore_with(dir)?.0)
}

/// As [`restore`], also returning the device state [`save_with`] kept.
pub fn restore_with(dir: &Path) -> anyhow::Result<(Vm, Option<serde_json::Value>)> {
    let (state, ram) = load(dir)?;
    let vm = Vm::create(ram, state.vcpus.len() as u8, state.pc.is_some())?;
    if let Some(pc) = &state.pc {
        for chip in [&pc.pic_master, &pc.pic_slave, &pc.ioapic] {
            vm.fd().set_irqchip(chip).context("KVM_SET_IRQCHIP")?;
        }
        vm.fd().set_pit2(&pc.pit).context("KVM_SET_PIT2")?;
        let mut clock = pc.clock;
        // Only the clock value is restored; flags describe the host it was read on.
        clock.flags = 0;
        vm.fd().set_clock(&clock).context("KVM_SET_CLOCK")?;
    }
    for (vcpu, s) in vm.vcpus().iter().zip(&state.vcpus) {
        restore_vcpu(vcpu, s)?;
    }
    Ok((vm, state.devices))
}

/// What a restore checks before it asks anything of KVM: the state file is one this
/// VMM wrote (magic, version, every field), its vCPU states are whole, and the memory
/// file it names lies in `dir` and has the size it says; the memory is then mapped.
fn load(dir: &Path) -> anyhow::Result<(StateFile, GuestRam)> {
    let path = dir.join(VM_STATE_FILE);
    let text = std::fs::read(&path).with_context(|| {
        format!(
            "{} is not a snapshot: cannot read {}",
            dir.display(),
            VM_STATE_FILE
        )
    })?;
    let header: serde_json::Value =
        serde_json::from_slice(&text).with_context(|| format!("{} is damaged", path.display()))?;
    if header.get("magic").and_then(|m| m.as_str()) != Some(MAGIC) {
        bail!("{} is not an embedded-VMM snapshot", path.display());
    }
    let version = header.get("version").and_then(|v| v.as_u64());
    if version != Some(u64::from(VERSION)) {
        bail!(
            "{} is snapshot format {}, this vmbuild restores format {VERSION}: take the snapshot again",
            path.display(),
            version.map_or("(none)".into(), |v| v.to_string())
        );
    }
    let state: StateFile =
        serde_json::from_value(header).with_context(|| format!("{} is damaged", path.display()))?;
    if state.vcpus.is_empty() || state.vcpus.len() > 255 {
        bail!("{} lists {} vCPUs", path.display(), state.vcpus.len());
    }
    for (i, v) in state.vcpus.iter().enumerate() {
        let words = kvm_bindings::kvm_xsave::default().region.len();
        if v.xsave.len() != words {
            bail!(
                "{} is damaged: vCPU {i}'s XSAVE area has {} words, not {words}",
                path.display(),
                v.xsave.len()
            );
        }
    }
    check_memory_name(&state.memory_file)?;
    let ram = GuestRam::map_private(&dir.join(&state.memory_file), state.memory_bytes as usize)
        .context("mapping the snapshot's memory")?;
    Ok((state, ram))
}

/// Everything [`restore_with`] checks of the snapshot in `dir` before it creates a VM
/// (so without `/dev/kvm`): returns the mapped guest memory and the device state.
/// Public for the fuzz harness (`fuzz-harness`), which feeds state files to it.
#[doc(hidden)]
pub fn check(dir: &Path) -> anyhow::Result<(GuestRam, Option<serde_json::Value>)> {
    let (state, ram) = load(dir)?;
    Ok((ram, state.devices))
}
