//! The CPUID a vCPU sees: what KVM supports on this host (`KVM_GET_SUPPORTED_CPUID`),
//! adjusted the way a VMM must before a guest kernel can rely on it.
//!
//! `KVM_GET_SUPPORTED_CPUID` describes what KVM *can* offer, not a machine: it leaves the
//! "hypervisor present" bit clear, the TSC-deadline timer off, and every vCPU with the
//! same APIC ID. Linux reads the KVM leaves (0x4000_0000: "KVMKVMKVM", 0x4000_0001: the
//! paravirtual features, kvm-clock among them) only when leaf 1 says a hypervisor is
//! present; without kvm-clock, under a nested host with no working PIT calibration and
//! no HPET or PM timer (hardware-reduced ACPI), the TSC has no frequency, jiffies never
//! advance and the boot stops. Firecracker, Cloud Hypervisor and crosvm set the same
//! bits.

use kvm_bindings::CpuId;

/// Leaf 1 ECX: the local APIC can arm its timer with a TSC deadline.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: "running under a hypervisor" (reserved for that use by Intel and AMD).
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: more than one logical processor per package (HTT).
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// What the VM's vCPUs have in common.
#[derive(Debug, Clone, Copy)]
pub struct Topology {
    /// How many vCPUs the VM has.
    pub vcpus: u8,
    /// Whether KVM emulates the TSC-deadline timer (`KVM_CAP_TSC_DEADLINE_TIMER`).
    pub tsc_deadline: bool,
}

/// The CPUID for vCPU `index` (its APIC ID) of a VM with `topology`, from the
/// entries KVM supports.
pub fn for_vcpu(supported: &CpuId, index: u8, topology: Topology) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                if topology.tsc_deadline {
                    entry.ecx |= LEAF1_ECX_TSC_DEADLINE;
                } else {
                    entry.ecx &= !LEAF1_ECX_TSC_DEADLINE;
                }
                // EBX: initial APIC ID (31:24), logical processors per package (23:16),
                // CLFLUSH line size (15:8) kept as KVM reports it.
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | (u32::from(index) << 24)
                    | (u32::from(topology.vcpus) << 16);
                if topology.vcpus > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                } else {
                    entry.edx &= !LEAF1_EDX_HTT;
                }
            }
            // Extended topology (Intel's, and AMD's on newer parts): EDX is the x2APIC
            // ID of the vCPU that asks, at every level.
            0xb | 0x1f => entry.edx = u32::from(index),
            // AMD's extended APIC ID.
            0x8000_001e => entry.eax = u32::from(index),
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    /// The leaf `function` (sub-leaf `index`) of `cpuid`, as (EAX, EBX, ECX, EDX).
    fn leaf(cpuid: &CpuId, function: u32, index: u32) -> Option<(u32, u32, u32, u32)> {
        cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .map(|e| (e.eax, e.ebx, e.ecx, e.edx))
    }

    fn supported() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0x0000_0800,
                ecx: 0x0000_0001,
                edx: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                edx: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x4000_0000,
                ebx: 0x4b4d_564b,
                ..Default::default()
            },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    #[test]
    fn the_hypervisor_bit_and_apic_ids_are_set_per_vcpu() {
        let topology = Topology {
            vcpus: 4,
            tsc_deadline: true,
        };
        let cpuid = for_vcpu(&supported(), 2, topology);
        let (_, ebx, ecx, edx) = leaf(&cpuid, 1, 0).unwrap();
        assert_ne!(ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_eq!(ecx & 1, 1, "other feature bits are kept");
        assert_eq!(ebx >> 24, 2, "APIC ID");
        assert_eq!((ebx >> 16) & 0xff, 4, "logical processors");
        assert_eq!((ebx >> 8) & 0xff, 8, "CLFLUSH size kept");
        assert_ne!(edx & LEAF1_EDX_HTT, 0);
        assert_eq!(leaf(&cpuid, 0xb, 1).unwrap().3, 2);
        // KVM's own leaves stay as KVM gave them.
        assert_eq!(leaf(&cpuid, 0x4000_0000, 0).unwrap().1, 0x4b4d_564b);
    }

    #[test]
    fn one_vcpu_without_a_deadline_timer() {
        let cpuid = for_vcpu(
            &supported(),
            0,
            Topology {
                vcpus: 1,
                tsc_deadline: false,
            },
        );
        let (_, ebx, ecx, edx) = leaf(&cpuid, 1, 0).unwrap();
        assert_eq!(ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_ne!(ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(ebx >> 24, 0);
        assert_eq!(edx & LEAF1_EDX_HTT, 0);
    }
}
