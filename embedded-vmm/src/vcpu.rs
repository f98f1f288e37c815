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
            // An exit handled above may leave KVM an instruction to finish (the data of
            // an IN, an MMIO read): one KVM_RUN with immediate_exit completes it without
            // running the guest further, so a snapshot taken now is consistent.
            vcpu.set_kvm_immediate_exit(1);
            let _ = vcpu.run();
            vcpu.set_kvm_immediate_exit(0);
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

/// The signal that knocks a vCPU thread out of KVM_RUN (KVM_RUN returns EINTR; [`run`]
/// then sees its `pause` flag). Its handler does nothing.
pub fn kick_signal() -> libc::c_int {
    use std::sync::Once;
    static REGISTER: Once = Once::new();
    extern "C" fn ignore(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    let sig = vmm_sys_util::signal::SIGRTMIN() + 1;
    REGISTER.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(sig, ignore) {
            tracing::warn!("cannot register the vCPU kick signal: {e}");
        }
    });
    sig
}

/// Stops a vCPU thread running [`run`]: sets `pause` and signals the thread until it has
/// left KVM_RUN (a guest spinning without exits never looks at `pause` by itself).
pub fn stop_thread<T>(thread: &std::thread::JoinHandle<T>, pause: &AtomicBool) {
    use vmm_sys_util::signal::Killable;
    pause.store(true, Ordering::Release);
    let sig = kick_signal();
    for _ in 0..200 {
        if thread.is_finished() {
            return;
        }
        let _ = thread.kill(sig);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
