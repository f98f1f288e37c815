//! Driving a guest kit VM in the embedded VMM, for `run --vmm embedded` and the
//! lifecycle's embedded controller alike: its console read line by line as it arrives
//! (phases and the exit status, as under QEMU), a stop request, a deadline or an awaited
//! phase seen while the vCPU runs on, and the end of the guest told apart from ours.

use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::guest::console::{ConsoleEvent, LineSplitter};
use crate::vm::timings::{note_console_event, Marks};
use embedded_vmm::linux::{LinuxEnd, LinuxVm};
use embedded_vmm::uart::Transcript;

/// How long a guest that reported its status may take to power off.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// The console of an embedded guest: kept (for error messages), copied to `log`, and
/// read for its markers as it arrives.
pub struct GuestConsole {
    pub transcript: Transcript,
    markers: Arc<Mutex<Vec<(ConsoleEvent, Instant)>>>,
}

impl GuestConsole {
    pub fn new(log: Option<Box<dyn std::io::Write + Send>>) -> GuestConsole {
        let markers = Arc::new(Mutex::new(Vec::new()));
        let sink = ConsoleMarkers {
            lines: LineSplitter::default(),
            markers: markers.clone(),
            log,
        };
        GuestConsole {
            transcript: Transcript::new(Some(Box::new(sink))),
            markers,
        }
    }

    /// Applies the markers that arrived since the last call.
    pub fn note(&self, marks: &mut Marks, status: &mut Option<i32>) {
        for (ev, at) in self.markers.lock().unwrap().drain(..) {
            note_console_event(marks, status, &ev, at);
        }
    }

    /// A console that also goes to the file at `log`, if any (created).
    pub fn logged_to(log: Option<&std::path::Path>) -> anyhow::Result<GuestConsole> {
        let log: Option<Box<dyn std::io::Write + Send>> = match log {
            Some(p) => Some(Box::new(std::fs::File::create(p).map_err(|e| {
                anyhow::anyhow!("creating the console log {}: {e}", p.display())
            })?)),
            None => None,
        };
        Ok(GuestConsole::new(log))
    }

    pub fn tail(&self, lines: usize) -> String {
        let text = self.transcript.text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// How driving a guest ended.
#[derive(Debug, PartialEq, Eq)]
pub enum DriveEnd {
    /// The guest ended the VM (after reporting its status, or not).
    Guest(LinuxEnd),
    /// The guest reported its status but did not power off within a grace period (a
    /// kernel without ACPI power-off halts with interrupts off, which never leaves
    /// KVM_RUN): stopped.
    ReportedButStayed,
    /// The caller's `stopped` said so.
    Stopped,
    DeadlinePassed,
    /// The console announced the phase the caller waited for; the vCPU is stopped, and
    /// the VM can be snapshotted or run on.
    Reached,
}

/// Runs `vm` until the guest ends it, `stopped` says so, `deadline` passes or the console
/// announces phase `until`, noting its console lines in `marks` and `status` as they
/// come. The vCPU runs undisturbed meanwhile; these are checked every few milliseconds.
pub fn drive(
    vm: &mut LinuxVm,
    console: &GuestConsole,
    marks: &mut Marks,
    status: &mut Option<i32>,
    stopped: &mut dyn FnMut() -> bool,
    deadline: Option<Instant>,
    until: Option<&str>,
) -> DriveEnd {
    let mut reported: Option<Instant> = None;
    let mut why = None;
    let end = vm.run_until(|| {
        console.note(marks, status);
        if reported.is_none() && status.is_some() {
            reported = Some(Instant::now());
        }
        why = if reported.is_some_and(|at| at.elapsed() > EXIT_GRACE) {
            Some(DriveEnd::ReportedButStayed)
        } else if until.is_some_and(|p| marks.phase(p).is_some()) {
            Some(DriveEnd::Reached)
        } else if stopped() {
            Some(DriveEnd::Stopped)
        } else if deadline.is_some_and(|d| Instant::now() >= d) {
            Some(DriveEnd::DeadlinePassed)
        } else {
            None
        };
        why.is_some()
    });
    marks.exited = Some(Instant::now());
    console.note(marks, status);
    match (end, why) {
        (LinuxEnd::TimedOut, Some(why)) => why,
        (end, _) => DriveEnd::Guest(end),
    }
}

/// A stop channel as [`drive`] asks it: a message, or the channel closed (a caller that
/// went away must not leave its VM running).
pub fn stop_requested(stop: &Receiver<()>) -> bool {
    !matches!(stop.try_recv(), Err(TryRecvError::Empty))
}

/// Why a guest that ended gave no status.
pub fn why_no_status(end: &LinuxEnd) -> String {
    match end {
        LinuxEnd::Failed(why) => format!("the embedded VMM stopped the guest: {why}"),
        LinuxEnd::PowerOff => "the guest powered off before its command finished".into(),
        LinuxEnd::Reset => "the guest reset before its command finished".into(),
        LinuxEnd::TimedOut => "the guest did not finish".into(),
    }
}

/// The console's markers as they arrive, with the moment each line was complete; all
/// of it copied on to the log if there is one.
struct ConsoleMarkers {
    lines: LineSplitter,
    markers: Arc<Mutex<Vec<(ConsoleEvent, Instant)>>>,
    log: Option<Box<dyn std::io::Write + Send>>,
}

impl std::io::Write for ConsoleMarkers {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(log) = &mut self.log {
            let _ = log.write_all(buf);
        }
        self.lines.push(buf, |line| {
            let ev = ConsoleEvent::parse(&line);
            if ev.is_marker() {
                self.markers.lock().unwrap().push((ev, Instant::now()));
            }
        });
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.log {
            Some(log) => log.flush(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn console_markers_are_found_as_they_arrive() {
        use crate::guest::console::ConsoleEvent::*;
        use std::io::Write;
        let markers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut c = super::ConsoleMarkers {
            lines: Default::default(),
            markers: markers.clone(),
            log: None,
        };
        c.write_all(b"vmbuild-phase=init\r\nvmbuild-ex").unwrap();
        c.write_all(b"it=12\n").unwrap();
        c.write_all(&vec![b'x'; 100_000]).unwrap();
        c.write_all(b"\n[ 1.0] vmbuild-exit=13\n").unwrap();
        let got: Vec<_> = markers
            .lock()
            .unwrap()
            .iter()
            .map(|(e, _)| e.clone())
            .collect();
        assert_eq!(got, [Phase("init".into()), Exit(Some(12)), Exit(Some(13))]);
    }
}
