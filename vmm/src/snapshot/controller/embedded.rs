//! The controller in the embedded KVM VMM: no QEMU process, its NIC an in-process port of
//! the build's switch. Where the embedded VMM boots Linux on this host, bootstrap boots
//! this controller once, lets it log into the target exactly as the QEMU controller does
//! (the same initramfs and daemon script), and snapshots it where it waits for a session
//! ([`EMBEDDED_CONTROLLER_DIR`]). A build restores it in milliseconds (memory mapped
//! copy-on-write, a new VM generation ID so that its RNG reseeds before the SSH client
//! draws from it), writes the session to its COM2 and relays COM2 and COM3 as the
//! session's stdout and stderr.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use vswitch::{Switch, SwitchConfig, VlanMode};

use super::revive::base64;
use super::{
    classify, session_files, Controller, ControllerEnd, ControllerOutcome, SessionPlan,
    CONTROLLER_MEMORY_MIB,
};
use crate::guest::cmdline::KernelCmdline;
use crate::guest::console::phase;
use crate::guest::initrd::GUEST_SCRIPT_PATH;
use crate::vm::embedded_guest::{drive, stop_requested, why_no_status, DriveEnd, GuestConsole};
use crate::vm::run_embedded::parse_mac;
use crate::vm::timings::Marks;
use embedded_vmm::linux::{LinuxConfig, LinuxEnd, LinuxVm};
use embedded_vmm::uart::Transcript;
use embedded_vmm::virtio::net::NetDevice;

pub use crate::snapshot::EMBEDDED_CONTROLLER_DIR;

/// Time for the daemon to get from announcing itself to blocking in `read`, so that the
/// snapshot holds it there rather than in the middle of its shell's work.
const SETTLE: Duration = Duration::from_millis(300);

/// How long feeding the session may take: the guest drains COM2's 64-byte FIFO from its
/// interrupt handler, which is quick, but a stuck controller must not hold the build.
const FEED_LIMIT: Duration = Duration::from_secs(60);

fn cmdline() -> String {
    KernelCmdline::command_guest()
        .embedded_vmm()
        .command(GUEST_SCRIPT_PATH)
        .to_string()
}

fn nic(switch: &Arc<Switch>, mac: &str) -> anyhow::Result<NetDevice> {
    let mac = parse_mac(mac).with_context(|| format!("{mac:?} is not a MAC address"))?;
    Ok(NetDevice::new(
        switch,
        "embedded-controller",
        mac,
        VlanMode::default(),
    ))
}

/// The machine bootstrap boots the embedded controller on.
pub struct EmbeddedBootstrap<'a> {
    pub kernel: &'a Path,
    /// The controller's initramfs, with the daemon script as its command (the one the
    /// QEMU controller boots).
    pub initrd: &'a Path,
    /// The bootstrap's switch, where the target is.
    pub switch: &'a Arc<Switch>,
    pub mac: &'a str,
    /// Where the snapshot goes (created).
    pub out: &'a Path,
    /// How long the boot and the first login may take.
    pub wait: Duration,
    pub console_log: Option<&'a Path>,
}

/// Boots the controller in the embedded VMM, waits until it has logged into the target
/// and is ready for a session, and snapshots it into `b.out`.
pub fn bootstrap_embedded_controller(
    b: &EmbeddedBootstrap,
    signals: &Receiver<()>,
) -> anyhow::Result<Result<Marks, ControllerEnd>> {
    let console = GuestConsole::logged_to(b.console_log)?;
    // The first login's own output (COM2, COM3) is nobody's: kept for errors only.
    let (out, err) = (Transcript::new(None), Transcript::new(None));
    let started = Instant::now();
    let mut vm = LinuxVm::new(
        &LinuxConfig {
            kernel: b.kernel,
            initrd: Some(b.initrd),
            cmdline: &cmdline(),
            memory_mib: CONTROLLER_MEMORY_MIB as usize,
            vcpus: 1,
        },
        console.transcript.clone(),
        vec![out, err.clone()],
        vec![Box::new(nic(b.switch, b.mac)?)],
    )
    .context("booting the embedded controller")?;
    let mut marks = Marks {
        start: Some(started),
        vmm_ready: Some(Instant::now()),
        ..Marks::default()
    };
    let mut status = None;
    let deadline = Instant::now() + b.wait;
    let died = |why: String, status: Option<i32>, marks: &Marks| match status {
        Some(code) if code != 1 => classify(code, marks),
        _ => ControllerEnd::Died {
            why: format!(
                "the embedded controller stopped before it was ready ({why}): {}",
                err.text().trim()
            ),
            console_tail: console.tail(40),
        },
    };
    match drive(
        &mut vm,
        &console,
        &mut marks,
        &mut status,
        &mut || stop_requested(signals),
        Some(deadline),
        // What the daemon announces once logged in, right before it reads its session.
        Some(phase::CONTROLLER_READY),
    ) {
        DriveEnd::Reached => {}
        DriveEnd::Stopped => return Ok(Err(ControllerEnd::Interrupted)),
        DriveEnd::DeadlinePassed => anyhow::bail!(
            "the embedded controller was not ready within {} s",
            b.wait.as_secs()
        ),
        DriveEnd::Guest(end) => return Ok(Err(died(why_no_status(&end), status, &marks))),
        DriveEnd::ReportedButStayed => {
            return Ok(Err(died("its script ended".into(), status, &marks)))
        }
    }
    // Into its `read`, and still alive there: a controller that failed after announcing
    // itself must not become the snapshot every build restores.
    let settled = vm.run(SETTLE);
    console.note(&mut marks, &mut status);
    if settled != LinuxEnd::TimedOut || status.is_some() {
        let why = match &settled {
            LinuxEnd::TimedOut => "its script ended".to_owned(),
            end => why_no_status(end),
        };
        return Ok(Err(died(why, status, &marks)));
    }
    std::fs::create_dir_all(b.out).with_context(|| format!("creating {}", b.out.display()))?;
    vm.snapshot(b.out)
        .context("snapshotting the embedded controller")?;
    Ok(Ok(marks))
}

/// The controller restored from a snapshot's [`EMBEDDED_CONTROLLER_DIR`].
pub struct EmbeddedRevivedController {
    pub snapshot: PathBuf,
    /// The build's switch, where the target is.
    pub switch: Arc<Switch>,
    /// Where the session's stdout and stderr go; `None`: this process's.
    pub output: Option<(Transcript, Transcript)>,
}

impl EmbeddedRevivedController {
    /// Whether this host restores the snapshot: a dry restore (milliseconds), on a switch
    /// of its own. A snapshot made on a host with another CPU can fail here, and a build
    /// then uses the QEMU controller instead.
    pub fn check(&self, mac: &str) -> anyhow::Result<()> {
        let switch = Switch::new(SwitchConfig::default());
        let vm = LinuxVm::restore(
            &self.snapshot,
            Transcript::new(None),
            vec![Transcript::new(None), Transcript::new(None)],
            vec![Box::new(nic(&switch, mac)?)],
        )?;
        drop(vm);
        Ok(())
    }
}

impl Controller for EmbeddedRevivedController {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn run_session(
        &self,
        plan: &SessionPlan,
        stop: Receiver<()>,
    ) -> anyhow::Result<ControllerOutcome> {
        let console = GuestConsole::logged_to(Some(&plan.console_log))?;
        let (stdout, stderr) = self.output.clone().unwrap_or_else(|| {
            (
                Transcript::new(Some(Box::new(std::io::stdout()))),
                Transcript::new(Some(Box::new(std::io::stderr()))),
            )
        });
        let started = Instant::now();
        let mut vm = LinuxVm::restore(
            &self.snapshot,
            console.transcript.clone(),
            vec![stdout, stderr],
            vec![Box::new(nic(&self.switch, &plan.network.controller_mac)?)],
        )
        .context("restoring the embedded controller")?;
        let mut marks = Marks {
            start: Some(started),
            vmm_ready: Some(Instant::now()),
            ..Marks::default()
        };
        let input = vm
            .serial_input(1)
            .context("the embedded controller's snapshot has no COM2")?;
        // The session, as one line on the port the daemon reads.
        let mut line = base64(&session_files(plan)).into_bytes();
        line.push(b'\n');
        // Fed as the guest drains the FIFO. A controller that does not take its session
        // within the limit (a broken serial interrupt, a dead snapshot) ends the session.
        let done = Arc::new(AtomicBool::new(false));
        let starved = Arc::new(AtomicBool::new(false));
        let feeder = {
            let (done, starved) = (done.clone(), starved.clone());
            std::thread::Builder::new()
                .name("controller-session".into())
                .spawn(move || {
                    let (mut at, limit) = (0, Instant::now() + FEED_LIMIT);
                    while at < line.len() && !done.load(Ordering::Acquire) {
                        if Instant::now() > limit {
                            starved.store(true, Ordering::Release);
                            break;
                        }
                        match input.feed_wait(&line[at..], Duration::from_millis(10)) {
                            // Full, quiesced, or a UART in loopback mode: not now.
                            0 => std::thread::sleep(Duration::from_millis(1)),
                            n => at += n,
                        }
                    }
                })?
        };
        let mut status = None;
        let end = drive(
            &mut vm,
            &console,
            &mut marks,
            &mut status,
            &mut || starved.load(Ordering::Acquire) || stop_requested(&stop),
            None,
            None,
        );
        // The feeder ends at its next turn; it is not waited for, since a vCPU abandoned in
        // a COM2 write would hold the port it waits on. (It keeps the bus it feeds.)
        done.store(true, Ordering::Release);
        drop(feeder);
        drop(vm);
        let end = match (end, status) {
            (DriveEnd::Stopped, _) if starved.load(Ordering::Acquire) => ControllerEnd::Died {
                why: format!(
                    "the embedded controller did not read its session within {} s",
                    FEED_LIMIT.as_secs()
                ),
                console_tail: console.tail(40),
            },
            (DriveEnd::Stopped, _) => ControllerEnd::Interrupted,
            (DriveEnd::Guest(_) | DriveEnd::ReportedButStayed, Some(code)) => {
                classify(code, &marks)
            }
            (DriveEnd::Guest(end), None) => ControllerEnd::Died {
                why: why_no_status(&end),
                console_tail: console.tail(40),
            },
            (DriveEnd::ReportedButStayed | DriveEnd::DeadlinePassed | DriveEnd::Reached, _) => {
                ControllerEnd::Died {
                    why: "the embedded controller was stopped".into(),
                    console_tail: console.tail(40),
                }
            }
        };
        Ok(ControllerOutcome { end, marks })
    }
}
