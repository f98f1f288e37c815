//! Where the time of a run went, phase by phase, for `--timings`.

use std::time::Instant;

use serde::Serialize;

use crate::guest::console::{phase, ConsoleEvent};

/// Moments seen during a run; phases are the differences between them.
#[derive(Debug, Default, Clone)]
pub struct Marks {
    /// Which VMM ran the guest: "qemu" or "embedded".
    pub vmm: Option<&'static str>,
    pub start: Option<Instant>,
    /// QEMU answered QMP: the VMM is up.
    pub vmm_ready: Option<Instant>,
    /// The guest's init started (kernel boot done).
    pub init: Option<Instant>,
    /// Init mounted the shares.
    pub mounted: Option<Instant>,
    pub command_start: Option<Instant>,
    pub command_end: Option<Instant>,
    /// QEMU exited.
    pub exited: Option<Instant>,
    /// Everything cleaned up.
    pub done: Option<Instant>,
    /// Other `vmbuild-phase=NAME` markers the guest printed, in order.
    pub phases: Vec<(String, Instant)>,
}

impl Marks {
    /// When the guest printed `vmbuild-phase=NAME` first.
    pub fn phase(&self, name: &str) -> Option<Instant> {
        self.phases.iter().find(|(n, _)| n == name).map(|(_, t)| *t)
    }
}

/// What a console marker of the kit's guest says about a run: its phases and its status.
/// Both VMMs' runs read their consoles through this.
pub(crate) fn note_console_event(
    marks: &mut Marks,
    exit: &mut Option<i32>,
    ev: &ConsoleEvent,
    at: Instant,
) {
    match ev {
        ConsoleEvent::Phase(p) => match p.as_str() {
            phase::INIT => marks.init = Some(at),
            phase::MOUNTED => marks.mounted = Some(at),
            phase::COMMAND_START => marks.command_start = Some(at),
            phase::COMMAND_END => marks.command_end = Some(at),
            _ => marks.phases.push((p.clone(), at)),
        },
        ConsoleEvent::Exit(n) => *exit = *n,
        _ => {}
    }
}

/// Seconds per phase; a phase the run never reached is `null`.
#[derive(Debug, Serialize)]
pub struct Timings {
    pub vmm: Option<&'static str>,
    pub spawn: Option<f64>,
    pub kernel_to_init: Option<f64>,
    pub shares_mounted: Option<f64>,
    pub command: Option<f64>,
    pub shutdown: Option<f64>,
    pub teardown: Option<f64>,
    pub total: Option<f64>,
}

fn secs(from: Option<Instant>, to: Option<Instant>) -> Option<f64> {
    Some(to?.checked_duration_since(from?)?.as_secs_f64())
}

impl Marks {
    pub fn timings(&self) -> Timings {
        Timings {
            vmm: self.vmm,
            spawn: secs(self.start, self.vmm_ready),
            kernel_to_init: secs(self.vmm_ready, self.init),
            shares_mounted: secs(self.init, self.mounted),
            command: secs(self.command_start, self.command_end),
            shutdown: secs(self.command_end, self.exited),
            teardown: secs(self.exited, self.done),
            total: secs(self.start, self.done),
        }
    }
}
