//! A KVM virtual machine: guest RAM as memory slot 0 and its vCPUs, each with the CPUID
//! KVM supports on this host.

use std::sync::Arc;

use anyhow::{bail, Context};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::kvm::memory::GuestRam;

pub struct Vm {
    // Kept open for the VM's lifetime (the VM fd refers to it).
    _kvm: Kvm,
    fd: VmFd,
    ram: Arc<GuestRam>,
    vcpus: Vec<VcpuFd>,
}

impl Vm {
    /// Creates a VM over `ram` with `vcpus` vCPUs. Fails with what to do when /dev/kvm
    /// is missing or not accessible.
    pub fn new(ram: GuestRam, vcpus: u8) -> anyhow::Result<Vm> {
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
        // SAFETY: the region is the mapping `ram` owns, which this Vm keeps alive (Arc)
        // for as long as the VM exists.
        unsafe { fd.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION")?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .context("KVM_GET_SUPPORTED_CPUID")?;
        let mut list = Vec::new();
        for id in 0..vcpus {
            let vcpu = fd
                .create_vcpu(u64::from(id))
                .with_context(|| format!("KVM_CREATE_VCPU {id}"))?;
            vcpu.set_cpuid2(&cpuid).context("KVM_SET_CPUID2")?;
            list.push(vcpu);
        }
        Ok(Vm {
            _kvm: kvm,
            fd,
            ram: Arc::new(ram),
            vcpus: list,
        })
    }

    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
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
