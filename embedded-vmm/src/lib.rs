//! The embedded KVM VMM: minimal Linux guests run in this process through kvm-ioctls,
//! with no QEMU.
//!
//! * [`memory`]: guest RAM (memfd; or a snapshot file mapped copy-on-write),
//! * [`vm`]: a VM with its memory slot and vCPUs,
//! * [`cpuid`]: what each vCPU sees of CPUID (hypervisor bit, APIC IDs, TSC deadline),
//! * [`cpu_mode`]: entering real, protected or long mode as a loader would,
//! * [`vcpu`]: the run loop, with port and MMIO exits handed to a [`vcpu::Bus`],
//! * [`serial`]: the console (16550 transmit side at COM1) for test guests, and [`uart`]
//!   (vm-superio's full 16550A, interrupt through an irqfd) for Linux,
//! * [`linux`]: booting an ELF vmlinux (PVH) or a bzImage (64-bit boot protocol) with an
//!   initramfs, in a VM with the PC's interrupt controllers and timer in the kernel, its
//!   virtio devices described in [`acpi`] tables,
//! * [`probe`]: whether the embedded VMM boots the guest kit's Linux on this host,
//! * [`snapshot`]: versioned vCPU state + memory file, restored copy-on-write,
//! * [`virtio`]: the virtio-mmio transport; virtio-net on a vswitch in-process port,
//!   virtio-fs on an in-process share, virtio-9p, virtio-console as the command channel.

pub mod acpi;
pub mod backend;
pub mod cpu_mode;
pub mod cpuid;
pub mod linux;
pub mod memory;
pub mod random;
pub mod snapshot;
pub mod uart;
pub mod vcpu;
pub mod virtio;
pub mod vm;
