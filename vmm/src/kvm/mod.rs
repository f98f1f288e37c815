//! The embedded KVM VMM (issue #6, first part): minimal guests run in this process
//! through kvm-ioctls, with no QEMU. What exists so far:
//!
//! * [`memory`]: guest RAM (memfd; or a snapshot file mapped copy-on-write),
//! * [`vm`]: a VM with its memory slot and vCPUs (CPUID as KVM supports it),
//! * [`cpu_mode`]: entering real, protected or long mode as a loader would,
//! * [`vcpu`]: the run loop, with port and MMIO exits handed to a [`vcpu::Bus`],
//! * [`serial`]: the console (16550 transmit side at COM1),
//! * [`snapshot`]: versioned vCPU state + memory file, restored copy-on-write,
//! * [`virtio`]: the virtio-mmio transport and virtio-net on a vswitch in-process port.
//!
//! Not yet: an in-kernel interrupt controller (so HLT exits to userspace, LAPIC state is
//! not saved and devices cannot interrupt a running guest), the Linux boot (PVH and
//! bzImage), virtio-fs and 9p from the share core, the command channel, device state in
//! snapshots, `vmbuild run --vmm`.

pub mod cpu_mode;
pub mod memory;
pub mod serial;
pub mod snapshot;
pub mod vcpu;
pub mod virtio;
pub mod vm;
