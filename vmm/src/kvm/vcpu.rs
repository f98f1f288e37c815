//! Running a vCPU: KVM_RUN until the guest halts, shuts down or is asked to pause,
//! handing port and MMIO accesses to a [`Bus`].

use std::sync::atomic::{AtomicBool, Ordering};

use kvm_ioctls::{VcpuExit, VcpuFd};

/// Where a vCPU's port and MMIO accesses go. Called from vCPU threads.
pub trait Bus: Send + Sync {
    fn pio_write(&self, port: u16, data: &[u8]);
    /// Fills `data`; ports nobody decodes read as all ones, as on a PC.
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        let _ = port;
        data.fill(0xff);
    }
    fn mmio_write(&self, addr: u64, data: &[u8]);
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        let _ = addr;
        data.fill(0xff);
    }
}

/// Why [`run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// HLT with interrupts off (no in-kernel interrupt controller to wake it).
    Halted,
    /// Triple fault or an explicit shutdown: the guest is gone.
    Shutdown,
    /// `pause` was set; the vCPU stopped between two exits and can be snapshotted.
    Paused,
    /// KVM could not run the guest (emulation failure, entry failure, ...).
    Failed(String),
}

/// Runs `vcpu` until it stops. `pause` is checked after every exit: a guest that never
/// exits (a pure compute loop) is only paused at its next port or MMIO access.
pub fn run(vcpu: &mut VcpuFd, bus: &dyn Bus, pause: &AtomicBool) -> Stop {
    loop {
        if pause.load(Ordering::Acquire) {
            return Stop::Paused;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => bus.pio_write(port, data),
            Ok(VcpuExit::IoIn(port, data)) => bus.pio_read(port, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => bus.mmio_write(addr, data),
            Ok(VcpuExit::MmioRead(addr, data)) => bus.mmio_read(addr, data),
            Ok(VcpuExit::Hlt) => return Stop::Halted,
            Ok(VcpuExit::Shutdown) => return Stop::Shutdown,
            Ok(VcpuExit::InternalError) => {
                return Stop::Failed("KVM internal error (emulation failure)".into())
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Stop::Failed(format!(
                    "KVM could not enter the guest on CPU {cpu} (hardware reason {reason:#x})"
                ))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return Stop::Failed(format!("guest system event {kind}"))
            }
            Ok(other) => return Stop::Failed(format!("unhandled vCPU exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Stop::Failed(format!("KVM_RUN failed: {e}")),
        }
    }
}
