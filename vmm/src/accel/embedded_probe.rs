//! The embedded VMM's own answer to "does this host's KVM run Linux": it boots the guest
//! kit's vmlinux to init, as `vmbuild run --vmm embedded` would, within a limit. QEMU's
//! probe (`accel::probe_kvm`) answers for KVM; this one answers for the embedded VMM on
//! top of it, so that `auto` only picks a VMM that has booted this kit on this host.

use std::path::Path;
use std::time::{Duration, Instant};

use super::KvmProbe;
use crate::guest::cmdline::KernelCmdline;
use crate::guest::console::shows_init;
use embedded_vmm::linux::{LinuxConfig, LinuxEnd, LinuxVm};
use embedded_vmm::uart::Transcript;

/// Boots `kernel` (an ELF vmlinux) with `initrd` until the kit's init announces itself.
pub fn boot_to_init(kernel: &Path, initrd: &Path, limit: Duration) -> KvmProbe {
    let unusable = |reason: String| KvmProbe::answer(false, reason);
    let console = Transcript::new(None);
    let start = Instant::now();
    let cmdline = KernelCmdline::probe().keyboard_reset().to_string();
    let vm = LinuxVm::new(
        &LinuxConfig {
            kernel,
            initrd: Some(initrd),
            cmdline: &cmdline,
            memory_mib: 256,
            vcpus: 1,
        },
        console.clone(),
        Vec::new(),
        Vec::new(),
    );
    let mut vm = match vm {
        Ok(vm) => vm,
        Err(e) => {
            return KvmProbe::unknown(format!("the embedded VMM cannot create a Linux VM: {e:#}"))
        }
    };
    // The console is short (`quiet`): looking at all of it every few ms costs little.
    // Decided once: the transcript read after the vCPU stopped may end mid-line.
    let mut reached_init = false;
    let end = vm.run_until(|| {
        reached_init = shows_init(&console.text());
        reached_init || start.elapsed() >= limit
    });
    if reached_init || shows_init(&console.text()) {
        return KvmProbe::answer(
            true,
            format!(
                "the embedded VMM booted a Linux guest to init in {:.1} s",
                start.elapsed().as_secs_f64()
            ),
        );
    }
    let why = match end {
        LinuxEnd::TimedOut => {
            // Slow, not proven broken: remembered briefly (see `KvmProbe::slow`).
            return KvmProbe::slow(format!(
                "the embedded VMM did not boot a Linux guest to init within {} s",
                limit.as_secs()
            ));
        }
        LinuxEnd::Reset | LinuxEnd::PowerOff => {
            "the Linux guest stopped before its init ran".into()
        }
        LinuxEnd::Failed(why) => format!("the embedded VMM stopped the Linux guest: {why}"),
    };
    // The guest's last words say why (`quiet` leaves only warnings and panics).
    let text = console.text();
    let last: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = last[last.len().saturating_sub(3)..].join(" | ");
    unusable(if tail.is_empty() {
        why
    } else {
        format!("{why} (console: {tail})")
    })
}
