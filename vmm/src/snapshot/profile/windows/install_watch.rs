//! Watching an install from the host: Windows Setup, then the first logon's phases as the
//! target announces them on the readiness port (`first_logon::READY_PORT`), each with a
//! hard time limit, shown as progress; a key pressed for the install CD's "Press any key
//! to boot from CD or DVD" prompt; and on any failure a screendump of the target's
//! display, so a user sees where Windows stopped.
//!
//! The target speaks first: nothing here polls SSH. What it says, one line at a time:
//! `vmbuild-phase NAME` when a phase is done, `vmbuild-failed NAME` when one failed,
//! `vmbuild-ready` at the end.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::json;

use super::first_logon::{FAILED_PREFIX, PHASES, PHASE_PREFIX, READY_LINE};
use crate::progress::Progress;
use crate::qemu::{QemuProcess, Qmp};

/// One line from the readiness port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortLine {
    Phase(String),
    Failed(String),
    Ready,
    /// Anything else (a stray line is shown in the log and otherwise ignored).
    Other(String),
}

pub fn parse_line(line: &str) -> PortLine {
    let line = line.trim_end_matches(['\r', '\n']).trim();
    if line == READY_LINE {
        PortLine::Ready
    } else if let Some(p) = line.strip_prefix(PHASE_PREFIX) {
        PortLine::Phase(p.trim().to_owned())
    } else if let Some(p) = line.strip_prefix(FAILED_PREFIX) {
        PortLine::Failed(p.trim().to_owned())
    } else {
        PortLine::Other(line.to_owned())
    }
}

/// What the host waits for, in order, and how long each may take.
#[derive(Debug, Clone)]
pub struct Limits {
    /// (the line's phase name, or `READY_LINE` last; what the user is told is going on;
    /// how long it may take from the line before it).
    pub steps: Vec<(&'static str, &'static str, Duration)>,
    /// How long after QEMU starts keys are pressed for the CD's boot prompt. Setup's
    /// first reboot, after which the prompt must not be answered (it would start the
    /// install again), comes many minutes later.
    pub press_keys_for: Duration,
}

impl Limits {
    /// Limits for a real Windows install: generous under KVM, and TCG is many times
    /// slower (an install under TCG takes hours).
    pub fn windows(kvm: bool) -> Limits {
        let scale = if kvm { 1 } else { 6 };
        let min = |m: u64| Duration::from_secs(m * 60 * scale);
        Limits {
            steps: vec![
                (
                    PHASES[0],
                    "Windows Setup, then the first logon's driver install",
                    min(90),
                ),
                (PHASES[1], "installing WinFsp", min(10)),
                (PHASES[2], "installing Cygwin", min(60)),
                (PHASES[3], "setting up sshd with the pinned keys", min(15)),
                (PHASES[4], "the address and the firewall", min(5)),
                (READY_LINE, "finishing the first logon", min(5)),
            ],
            press_keys_for: Duration::from_secs(if kvm { 60 } else { 300 }),
        }
    }

    /// The same steps, each allowed `each`: for stand-in targets and tests.
    pub fn uniform(each: Duration, press_keys_for: Duration) -> Limits {
        let mut l = Limits::windows(true);
        for s in &mut l.steps {
            s.2 = each;
        }
        l.press_keys_for = press_keys_for;
        l
    }
}

/// How an install ended well: each step's seconds, and the keys pressed at the prompt.
#[derive(Debug, Clone)]
pub struct Installed {
    pub steps: Vec<(String, f64)>,
    pub keys_pressed: u32,
}

/// How an install failed; `screen` is the screendump taken then (if QEMU could take one).
#[derive(Debug)]
pub enum InstallFailure {
    TimedOut {
        waiting_for: String,
        doing: String,
        after: Duration,
        screen: Option<PathBuf>,
    },
    /// The target said a phase failed.
    PhaseFailed {
        phase: String,
        screen: Option<PathBuf>,
    },
    /// A phase line out of order: a script and a host of different versions.
    Unexpected {
        line: String,
        waiting_for: String,
        screen: Option<PathBuf>,
    },
    /// QEMU exited (or the target closed its port) before the end.
    QemuExited(String),
    Interrupted,
}

impl std::fmt::Display for InstallFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |s: &Option<PathBuf>| match s {
            Some(p) => format!("; the screen then: {}", p.display()),
            None => "; no screendump could be taken".into(),
        };
        match self {
            InstallFailure::TimedOut {
                waiting_for,
                doing,
                after,
                screen,
            } => write!(
                f,
                "the install timed out in phase '{waiting_for}' ({doing}) after {} s{}",
                after.as_secs(),
                shown(screen)
            ),
            InstallFailure::PhaseFailed { phase, screen } => write!(
                f,
                "the target reported that phase '{phase}' failed (its log: C:\\vmbuild-setup.log){}",
                shown(screen)
            ),
            InstallFailure::Unexpected {
                line,
                waiting_for,
                screen,
            } => write!(
                f,
                "the target said '{line}' while the host waited for '{waiting_for}'{}",
                shown(screen)
            ),
            InstallFailure::QemuExited(why) => write!(f, "the install VM stopped: {why}"),
            InstallFailure::Interrupted => write!(f, "interrupted"),
        }
    }
}

/// What the watch works with: the install VM, its monitor and readiness port.
pub struct Watch<'a> {
    pub qemu: &'a mut QemuProcess,
    pub qmp: &'a mut Qmp,
    /// QEMU's connection to the readiness port's socket.
    pub port: UnixStream,
    pub limits: &'a Limits,
    /// Where the screendump goes on failure (PNG).
    pub screendump: &'a Path,
    pub progress: &'a Progress,
    pub signals: &'a Receiver<()>,
}

/// Watches the install to its end.
pub fn watch(w: Watch) -> Result<Installed, InstallFailure> {
    let Watch {
        qemu,
        qmp,
        port,
        limits,
        screendump,
        progress,
        signals,
    } = w;
    let (tx, lines) = mpsc::channel();
    std::thread::Builder::new()
        .name("readiness-port".into())
        .spawn(move || {
            for line in BufReader::new(port).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| InstallFailure::QemuExited(format!("cannot read the readiness port: {e}")))?;

    let started = Instant::now();
    let mut keys_pressed = 0u32;
    let mut last_key = None::<Instant>;
    let mut done = Vec::new();
    let mut port_open = true;
    for &(waiting_for, doing, limit) in &limits.steps {
        let step_started = Instant::now();
        let step = progress.step(&format!("{doing} (at most {} min)", limit.as_secs() / 60));
        let deadline = step_started + limit;
        loop {
            if signals.try_recv().is_ok() {
                return Err(InstallFailure::Interrupted);
            }
            if let Some(status) = qemu.exit_status() {
                return Err(InstallFailure::QemuExited(format!(
                    "QEMU exited ({status}) while waiting for '{waiting_for}': {}",
                    qemu.stderr()
                )));
            }
            // The CD's prompt waits a few seconds for a key, then boots the empty disk.
            if started.elapsed() < limits.press_keys_for
                && last_key.is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
            {
                last_key = Some(Instant::now());
                let key = json!({"keys": [{"type": "qcode", "data": "ret"}]});
                if qmp.execute("send-key", key).is_ok() {
                    keys_pressed += 1;
                }
            }
            if Instant::now() >= deadline {
                return Err(InstallFailure::TimedOut {
                    waiting_for: waiting_for.into(),
                    doing: doing.into(),
                    after: step_started.elapsed(),
                    screen: take_screendump(qmp, screendump),
                });
            }
            let line = match lines.recv_timeout(Duration::from_millis(100)) {
                Ok(l) => l,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    // QEMU closes the port's socket when it exits; wait for that above.
                    if port_open {
                        port_open = false;
                        tracing::debug!("the readiness port closed");
                    }
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            match parse_line(&line) {
                PortLine::Phase(p) if p == waiting_for => break,
                PortLine::Ready if waiting_for == READY_LINE => break,
                PortLine::Failed(p) => {
                    return Err(InstallFailure::PhaseFailed {
                        phase: p,
                        screen: take_screendump(qmp, screendump),
                    })
                }
                PortLine::Other(text) => tracing::info!("readiness port: {text}"),
                PortLine::Phase(_) | PortLine::Ready => {
                    return Err(InstallFailure::Unexpected {
                        line,
                        waiting_for: waiting_for.into(),
                        screen: take_screendump(qmp, screendump),
                    })
                }
            }
        }
        done.push((waiting_for.to_owned(), step.done()));
    }
    Ok(Installed {
        steps: done,
        keys_pressed,
    })
}

/// QMP `screendump` as PNG; `None` if QEMU could not (it may be gone).
fn take_screendump(qmp: &mut Qmp, to: &Path) -> Option<PathBuf> {
    let _ = std::fs::remove_file(to);
    let args = json!({"filename": to.display().to_string(), "format": "png"});
    match qmp.execute_within("screendump", args, Duration::from_secs(10)) {
        Ok(_) if to.is_file() => Some(to.to_owned()),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!("no screendump: {e:#}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_lines_are_read_as_cmd_and_bash_write_them() {
        // cmd's `echo x> PORT` ends lines with CRLF.
        assert_eq!(
            parse_line("vmbuild-phase drivers\r\n"),
            PortLine::Phase("drivers".into())
        );
        assert_eq!(parse_line("vmbuild-ready\r"), PortLine::Ready);
        assert_eq!(
            parse_line("vmbuild-failed cygwin"),
            PortLine::Failed("cygwin".into())
        );
        assert_eq!(parse_line("hello"), PortLine::Other("hello".into()));
    }

    #[test]
    fn the_steps_follow_the_scripts_phases_and_end_with_ready() {
        let l = Limits::windows(true);
        let names: Vec<&str> = l.steps.iter().map(|s| s.0).collect();
        let mut expected = PHASES.to_vec();
        expected.push(READY_LINE);
        assert_eq!(names, expected);
        // TCG gets more time for every step.
        let tcg = Limits::windows(false);
        for (k, t) in l.steps.iter().zip(&tcg.steps) {
            assert!(t.2 > k.2);
        }
    }
}
