//! `vmbuild build`: revive the snapshot's target, attach the store and xchg as they are
//! now, let a fresh controller log in and run the command, and return its exit status.
//!
//! The snapshot directory is only read: the disk gets a per-build qcow2 overlay, the
//! memory state is loaded from the file (mapped-ram, so concurrent builds read one file),
//! and everything else a build creates (overlay, sockets, switch, QEMU processes,
//! temporary xchg) belongs to values dropped on every way out of [`build`].
//!
//! Why the shares are hot-plugged instead of migrated: a guest that had a virtio-fs share
//! mounted at suspend time holds FUSE node ids and cached attributes of the host
//! directory *as it was then*; reviving it against a directory that changed would need
//! the back-end to re-resolve every node id (virtiofsd's "find-paths" migration), and the
//! vhost-user-fs device cannot be migrated at all without back-end state transfer. The
//! target is therefore suspended with no share device, and each build plugs fresh ones
//! into the revived machine (ACPI PCI hot-plug, tens of milliseconds) and mounts them:
//! the guest sees the host directories exactly as they are at build time.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use serde::Serialize;
use virtiofs_bridge::{ShareConfig, ShareServer};

use crate::accel::{self, Accel};
use crate::build_slots::{self, BuildSlot, Waited};
use crate::guest::command_script::{CommandIo, GuestCommand};
use crate::guest::console::{phase, phase_line, EXIT_MARKER};
use crate::qemu::QemuBinary;
use crate::runtime_dir::RuntimeDir;
use crate::snapshot::controller::{
    BootVmm, BootedController, Controller, ControllerEnd, ControllerOutcome,
    EmbeddedRevivedController, RevivedController, SessionPlan, EMBEDDED_CONTROLLER_DIR,
};
use crate::snapshot::manifest::{self, Manifest, SnapshotError, SnapshotProblem};
use crate::snapshot::profile::windows::machine::SHARE_SLOTS;
use crate::snapshot::profile::{self, DISK_FILE};
use crate::snapshot::segment::Segment;
use crate::snapshot::target::{Placement, TargetEvent, TargetVm};
use crate::snapshot::{CONTROLLER_CPIO, KIT_INITRD, KIT_KERNEL};
use crate::vm::run::{create_overlay, xchg_dir};

pub const STORE_TAG: &str = "vmbuild-store";
pub const XCHG_TAG: &str = "vmbuild-xchg";

pub struct BuildSpec {
    pub snapshot: PathBuf,
    pub qemu: QemuBinary,
    pub argv: Vec<OsString>,
    pub env: Vec<(String, Vec<u8>)>,
    pub cwd: Option<String>,
    /// Host directory and where the target mounts it.
    pub store: Option<(PathBuf, String)>,
    pub xchg: Option<PathBuf>,
    pub keep_xchg: bool,
    /// xchg with the guest's writeback cache (`--xchg-writeback`).
    pub xchg_writeback: bool,
    pub timeout: Option<Duration>,
    pub ssh_wait: Duration,
    /// Hash every snapshot file even if it passed a check unchanged before.
    pub verify_full: bool,
    /// The target's console is appended here (by default it is only kept for errors).
    pub console_log: Option<PathBuf>,
    pub controller: ControllerChoice,
    /// Where this build's sockets and control files go, as [`RunSpec::runtime_dir`].
    ///
    /// [`RunSpec::runtime_dir`]: crate::vm::run::RunSpec::runtime_dir
    pub runtime_dir: Option<PathBuf>,
    /// How many builds of this user may run at once ([`crate::build_slots`]); 0 for no
    /// limit. A build waits for a slot before anything else, and its deadlines
    /// (`timeout`, `ssh_wait`) start when it holds one.
    pub jobs: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ControllerChoice {
    /// The fastest this host allows: the embedded VMM's controller snapshot, QEMU's
    /// suspended controller, or a fresh boot
    Auto,
    /// Revive the snapshot's suspended controller
    Revive,
    /// Boot a fresh controller under QEMU
    Boot,
    /// Restore the embedded KVM VMM's controller snapshot, else boot one in that VMM
    /// (only where it boots Linux)
    Embedded,
    /// Boot a fresh controller in the embedded KVM VMM (only where it boots Linux)
    EmbeddedBoot,
}

#[derive(Debug)]
pub enum BuildEnd {
    Exited(i32),
    TimedOut(Duration),
    Interrupted,
    SnapshotDamaged(String),
    SnapshotIncompatible(String),
    HostKeyChanged,
    TargetUnreachable {
        console_tail: String,
    },
    HandshakeFailed,
    /// The target or the controller stopped before the command reported its status.
    Lost {
        why: String,
        console_tail: String,
    },
    /// The host failed the build's VMs (the target's disk could not be written: a full
    /// file system); the build was stopped.
    HostFailed(String),
}

/// Seconds per phase of a build (`--timings`); a phase not reached is `null`.
#[derive(Debug, Default, Serialize)]
pub struct BuildTimings {
    /// Waiting for a build slot (`--jobs`); every other phase, and `total`, starts after.
    pub queued: Option<f64>,
    /// Which controller served the build, as `--controller` names it: revive, boot,
    /// embedded or embedded-boot (what `--controller auto` or `embedded` came down to).
    pub controller: Option<&'static str>,
    /// Reading the manifest, checking QEMU and the files' checksums.
    pub verify: Option<f64>,
    /// Bytes of the snapshot's files this build hashed: all of them the first time or
    /// with `--verify`, none while every file is unchanged since its last full check.
    pub hashed_bytes: Option<u64>,
    /// Target QEMU spawned → guest running again.
    pub revive: Option<f64>,
    /// Share devices plugged into the running target (host side).
    pub shares_attached: Option<f64>,
    /// Controller VM started → running again (a revived controller only: QEMU's
    /// `-incoming`, or the embedded VMM's restore).
    pub controller_revive: Option<f64>,
    /// Revived controller running → its kernel reseeded its RNG for the new VM
    /// generation (before that, its SSH client does not start).
    pub controller_reseed: Option<f64>,
    /// Controller VM started → its network is up and the session in hand (it revives or
    /// boots while the target revives).
    pub controller_up: Option<f64>,
    /// Target's SSH port answered → logged in with the pinned host key and the session
    /// script started in the target.
    pub handshake: Option<f64>,
    /// Session start in the target → shares mounted.
    pub mount: Option<f64>,
    pub command: Option<f64>,
    /// Command end → exit status and all output received.
    pub collect: Option<f64>,
    pub teardown: Option<f64>,
    pub total: Option<f64>,
}

pub struct BuildOutcome {
    pub end: BuildEnd,
    pub timings: BuildTimings,
}

fn secs(from: Option<Instant>, to: Option<Instant>) -> Option<f64> {
    Some(to?.checked_duration_since(from?)?.as_secs_f64())
}

pub fn build(spec: &BuildSpec, signals: Receiver<()>) -> anyhow::Result<BuildOutcome> {
    let mut t = BuildTimings::default();
    // Declared first, so dropped last: the slot is free only once everything is stopped.
    let _slot = match take_slot(spec, &signals)? {
        Ok((slot, waited)) => {
            t.queued = Some(waited.as_secs_f64());
            slot
        }
        Err(end) => return Ok(BuildOutcome { end, timings: t }),
    };
    let start = Instant::now();
    let dir = spec.snapshot.as_path();
    let manifest = match check_snapshot(spec, &mut t)? {
        Ok(m) => m,
        Err(end) => return Ok(BuildOutcome { end, timings: t }),
    };
    let profile = profile::by_name(&manifest.profile)?;
    t.verify = secs(Some(start), Some(Instant::now()));

    let resources = Resources::make(spec)?;
    let accel = if manifest.machine.accel == "kvm" {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    let controller = match choose_controller(spec, &manifest, dir, accel, &resources.segment) {
        Ok(c) => c,
        Err(end) => return Ok(BuildOutcome { end, timings: t }),
    };
    // The controller boots (or revives) while the target revives. Dropped on every way
    // out of this function: stops the controller and waits for it, so that an error below
    // never leaves its QEMU behind.
    let target_script = session_script(spec, &manifest, profile.as_ref());
    let mut controller_thread = ControllerThread::spawn(
        controller.clone(),
        &manifest,
        dir,
        &resources,
        spec.ssh_wait,
        target_script,
    )?;
    let mut target = match revive_target(spec, &manifest, &resources, &mut t) {
        Ok(target) => target,
        // Its QEMU was killed (or crashed) before the session: the target stopped first.
        Err(e) if crate::qemu::stopped(&e) => {
            drop(controller_thread);
            resources.release();
            t.controller = Some(controller.kind());
            let end = BuildEnd::Lost {
                why: format!("the target VM stopped before the session: {e:#}"),
                console_tail: String::new(),
            };
            return Ok(BuildOutcome { end, timings: t });
        }
        Err(e) => return Err(e),
    };
    let session = wait_for_the_session(spec, start, &signals, &mut target, &mut controller_thread)?;

    let target_tail = target.console_tail();
    stop_target(target)?;
    drop(controller_thread);
    resources.release();
    let done = Instant::now();

    let controller_outcome = match session.controller {
        // Its QEMU was killed (or crashed) while it started or revived: it stopped first.
        Some(Err(e)) if crate::qemu::stopped(&e) => Some(ControllerOutcome {
            end: ControllerEnd::Died {
                why: format!("{e:#}"),
                console_tail: String::new(),
            },
            marks: Default::default(),
        }),
        other => other.transpose()?,
    };
    t.controller = Some(controller.kind());
    t.record_session(
        controller.as_ref(),
        controller_outcome.as_ref(),
        &session.phases,
        session.done,
        done,
        start,
    );
    let end = session_end(
        session.early_end,
        controller_outcome.map(|c| c.end),
        session.exit_status,
        session.phases.iter().any(|(n, _)| n == "session"),
        target_tail,
    );
    Ok(BuildOutcome { end, timings: t })
}

/// A build slot, waited for while all are taken (none with `jobs` 0); an interrupted wait
/// is the build's end.
fn take_slot(
    spec: &BuildSpec,
    signals: &Receiver<()>,
) -> anyhow::Result<Result<(Option<BuildSlot>, Duration), BuildEnd>> {
    if spec.jobs == 0 {
        return Ok(Ok((None, Duration::ZERO)));
    }
    let dir = spec
        .runtime_dir
        .clone()
        .unwrap_or_else(crate::runtime_dir::base_dir);
    let say_waiting = || {
        eprintln!(
            "vmbuild build: waiting for a free build slot: {} running, --jobs {}",
            build_slots::held(&dir),
            spec.jobs
        )
    };
    let waited = build_slots::acquire(&dir, spec.jobs, signals, say_waiting)
        .context("taking a build slot")?;
    Ok(match waited {
        Waited::Held { slot, waited } => {
            if waited >= Duration::from_millis(100) {
                eprintln!(
                    "vmbuild build: got build slot {} after {:.1} s",
                    slot.index(),
                    waited.as_secs_f64()
                );
            }
            Ok((Some(slot), waited))
        }
        Waited::Interrupted => Err(BuildEnd::Interrupted),
    })
}

/// The manifest, QEMU and every file checked; a damaged or incompatible snapshot is the
/// build's end (120, 121), anything else an error.
fn check_snapshot(
    spec: &BuildSpec,
    t: &mut BuildTimings,
) -> anyhow::Result<Result<Manifest, BuildEnd>> {
    let dir = spec.snapshot.as_path();
    let checked = Manifest::load(dir).and_then(|m| {
        m.check_qemu(&spec.qemu)?;
        let checks = manifest::verify_some_files(dir, &m, spec.verify_full, |role| {
            role != manifest::OPTIONAL_ROLE
        })?;
        m.check_state_machine(dir)?;
        t.hashed_bytes = Some(checks.iter().filter(|c| c.hashed).map(|c| c.bytes).sum());
        Ok(m)
    });
    match checked {
        Ok(m) => Ok(Ok(m)),
        Err(SnapshotError::Problem(SnapshotProblem::Damaged(m))) => {
            Ok(Err(BuildEnd::SnapshotDamaged(m)))
        }
        Err(SnapshotError::Problem(SnapshotProblem::Incompatible(m))) => {
            Ok(Err(BuildEnd::SnapshotIncompatible(m)))
        }
        Err(SnapshotError::Other(e)) => Err(e),
    }
}

/// This build's private resources: its runtime directory, the disk's overlay, xchg, the
/// share servers and the private segment (switch) the target and controller meet on.
struct Resources {
    rundir: RuntimeDir,
    overlay: PathBuf,
    /// Removes the temporary xchg when dropped (none when the user gave one).
    xchg_temp: Option<crate::owned_dir::OwnedDir>,
    servers: Vec<ShareServer>,
    segment: Segment,
}

impl Resources {
    fn make(spec: &BuildSpec) -> anyhow::Result<Resources> {
        let dir = spec.snapshot.as_path();
        let rundir = RuntimeDir::create_in(spec.runtime_dir.as_deref(), "build")?;
        let overlay = create_overlay(&dir.join(DISK_FILE), "qcow2", rundir.path())?;
        let (xchg, xchg_temp) = xchg_dir(spec.xchg.as_deref(), spec.keep_xchg)?;
        let mut servers = Vec::new();
        if let Some((store, _)) = &spec.store {
            let mut share = ShareConfig::store(store);
            share.tag = STORE_TAG.into();
            servers.push(
                ShareServer::spawn(share, rundir.join("store.sock"))
                    .context("serving the store")?,
            );
        }
        let mut share = ShareConfig::xchg(&xchg);
        share.tag = XCHG_TAG.into();
        share.writeback = spec.xchg_writeback;
        servers.push(ShareServer::spawn(share, rundir.join("xchg.sock")).context("serving xchg")?);
        let segment = Segment::create(rundir.path())?;
        Ok(Resources {
            rundir,
            overlay,
            xchg_temp,
            servers,
            segment,
        })
    }

    /// Stops the servers (briefly waiting for their front-ends), then removes the rest.
    fn release(self) {
        for server in self.servers {
            server.stop(Duration::from_millis(200));
        }
        drop(self.segment);
        drop(self.rundir);
        drop(self.xchg_temp);
    }
}

/// The target from the snapshot's memory state, on this build's overlay and segment, with
/// the store and xchg plugged in as they are now.
fn revive_target(
    spec: &BuildSpec,
    manifest: &Manifest,
    resources: &Resources,
    t: &mut BuildTimings,
) -> anyhow::Result<TargetVm> {
    let dir = spec.snapshot.as_path();
    let mut target = TargetVm::start(
        &spec.qemu,
        &manifest.machine,
        &manifest.network,
        &Placement {
            snapshot_dir: dir,
            disk: &resources.overlay,
            net_socket: &resources.segment.target_socket,
            rundir: resources.rundir.path(),
            console_log: spec.console_log.clone(),
        },
        true,
    )?;
    target
        .qmp
        .revive_from_file(
            &dir.join(&manifest.state.file),
            manifest.state.state_format(),
            Duration::from_secs(120),
        )
        .map_err(|e| target.qemu.explain(e, "QEMU stopped"))
        .context("reviving the target from its memory state")?;
    let revived = Instant::now();
    t.revive = secs(Some(target.spawned), Some(revived));
    tracing::debug!("build: the target runs again; plugging the shares");
    for (i, server) in resources.servers.iter().enumerate() {
        // A UEFI (q35) target takes them in its empty root ports.
        let slot = manifest
            .machine
            .uefi
            .as_ref()
            .and(SHARE_SLOTS.get(i).copied());
        let attached = target.attach_share(&format!("fs{i}"), server.socket(), server.tag(), slot);
        attached.map_err(|e| target.qemu.explain(e, "QEMU stopped"))?;
    }
    t.shares_attached = secs(Some(revived), Some(Instant::now()));
    tracing::debug!("build: shares plugged");
    Ok(target)
}

/// How the session went, as far as the host saw it.
struct Session {
    /// The controller's own account; `None` if it did not give one in time.
    controller: Option<anyhow::Result<ControllerOutcome>>,
    /// The target's console phases and the command's status from its console.
    phases: Vec<(String, Instant)>,
    exit_status: Option<i32>,
    /// Why the host ended it first (signal, timeout, the target gone), if it did.
    early_end: Option<BuildEnd>,
    done: Instant,
}

/// Waits for the controller to finish the session, while watching the target's console,
/// the user's signals, the timeout and the target's QEMU.
fn wait_for_the_session(
    spec: &BuildSpec,
    start: Instant,
    signals: &Receiver<()>,
    target: &mut TargetVm,
    controller_thread: &mut ControllerThread,
) -> anyhow::Result<Session> {
    let deadline = spec.timeout.map(|d| start + d);
    let mut exit_status: Option<i32> = None;
    let mut phases: Vec<(String, Instant)> = Vec::new();
    let mut early_end: Option<BuildEnd> = None;
    let mut target_gone = false;
    let mut stop_sent_at: Option<Instant> = None;
    let controller = loop {
        match controller_thread
            .done
            .recv_timeout(Duration::from_millis(10))
        {
            Ok(outcome) => break Some(outcome),
            Err(RecvTimeoutError::Disconnected) => break None,
            Err(RecvTimeoutError::Timeout) => {}
        }
        drain(&target.events, &mut phases, &mut exit_status);
        if let Some(at) = stop_sent_at {
            // The controller was told to stop; give it a bounded time to do so.
            if at.elapsed() > Duration::from_secs(15) {
                break None;
            }
            continue;
        }
        if signals.try_recv().is_ok() {
            early_end = Some(BuildEnd::Interrupted);
        } else if let Some(why) = target.disk_stopped() {
            // QEMU paused the target for good: nothing will happen until space is freed,
            // and nobody is there to resume it.
            early_end = Some(BuildEnd::HostFailed(why));
        } else if deadline.is_some_and(|d| Instant::now() >= d) {
            early_end = Some(BuildEnd::TimedOut(spec.timeout.unwrap_or_default()));
        } else if let Some(status) = (!target_gone).then(|| target.qemu.exit_status()).flatten() {
            // A command that powered the target off after reporting its status has
            // finished: give its last console lines and the controller a moment.
            target_gone = true;
            std::thread::sleep(Duration::from_millis(200));
            drain(&target.events, &mut phases, &mut exit_status);
            if exit_status.is_none() {
                let how = match status.signal() {
                    Some(_) => format!(" (its QEMU ended by {status})"),
                    None => String::new(),
                };
                early_end = Some(BuildEnd::Lost {
                    why: format!("the target VM stopped during the build{how}"),
                    console_tail: target.console_tail(),
                });
            }
        }
        if early_end.is_some() {
            controller_thread.stop();
            stop_sent_at = Some(Instant::now());
        }
    };
    let done = Instant::now();
    drain(&target.events, &mut phases, &mut exit_status);
    // The controller saw the session end; the target's status line may still be on its
    // way through the console reader.
    let finished =
        matches!(&controller, Some(Ok(c)) if matches!(c.end, ControllerEnd::Finished(_)));
    if finished && exit_status.is_none() {
        let until = Instant::now() + Duration::from_secs(1);
        while exit_status.is_none() && Instant::now() < until {
            if let Ok(ev) = target.events.recv_timeout(Duration::from_millis(20)) {
                record(ev, &mut phases, &mut exit_status);
            }
        }
    }
    Ok(Session {
        controller,
        phases,
        exit_status,
        early_end,
        done,
    })
}

/// Asks the target's QEMU to quit, and kills it if it does not.
fn stop_target(mut target: TargetVm) -> anyhow::Result<()> {
    let _ = target.qmp.quit();
    if target.qemu.wait_timeout(Duration::from_secs(3))?.is_none() {
        target.qemu.kill();
    }
    Ok(())
}

impl BuildTimings {
    /// The phases of the controller and the session, from their marks.
    fn record_session(
        &mut self,
        controller: &dyn Controller,
        outcome: Option<&ControllerOutcome>,
        phases: &[(String, Instant)],
        session_done: Instant,
        done: Instant,
        start: Instant,
    ) {
        let phase = |name: &str| phases.iter().find(|(n, _)| n == name).map(|(_, t)| *t);
        if let Some(c) = outcome {
            let m = &c.marks;
            if controller.revived() {
                self.controller_revive = secs(m.start, m.vmm_ready);
                self.controller_reseed = secs(m.vmm_ready, m.phase("reseeded"));
            }
            self.controller_up = secs(m.start, m.phase("controller-up"));
            self.handshake = secs(m.phase("port-open"), phase("session"));
        }
        self.mount = secs(phase("session"), phase("mounted"));
        self.command = secs(phase("command-start"), phase("command-end"));
        self.collect = secs(phase("command-end"), Some(session_done));
        self.teardown = secs(Some(session_done), Some(done));
        self.total = secs(Some(start), Some(done));
    }
}

/// How the build ended, from what the host saw first and what the controller reported.
/// Once the target has started the session the login was fine (`logged_in`): whatever
/// the SSH client's stderr said was the command's ("Permission denied" included).
fn session_end(
    early_end: Option<BuildEnd>,
    controller: Option<ControllerEnd>,
    exit_status: Option<i32>,
    session_started: bool,
    target_tail: String,
) -> BuildEnd {
    let logged_in = session_started || exit_status.is_some();
    let no_status = |console_tail| BuildEnd::Lost {
        why: "the session ended without the command's exit status (the target may have failed)"
            .into(),
        console_tail,
    };
    match (early_end, controller) {
        (Some(end), _) => end,
        (None, Some(ControllerEnd::HostKeyChanged | ControllerEnd::HandshakeFailed))
            if logged_in =>
        {
            exit_status.map_or_else(|| no_status(target_tail), BuildEnd::Exited)
        }
        (None, Some(ControllerEnd::Finished(_))) => {
            exit_status.map_or_else(|| no_status(target_tail), BuildEnd::Exited)
        }
        (None, Some(ControllerEnd::HostKeyChanged)) => BuildEnd::HostKeyChanged,
        (None, Some(ControllerEnd::TargetUnreachable)) => BuildEnd::TargetUnreachable {
            console_tail: target_tail,
        },
        (None, Some(ControllerEnd::HandshakeFailed)) => BuildEnd::HandshakeFailed,
        (None, Some(ControllerEnd::Interrupted)) => BuildEnd::Interrupted,
        (None, Some(ControllerEnd::Died { why, console_tail })) => BuildEnd::Lost {
            why: format!("the controller VM stopped during the build: {why}"),
            console_tail,
        },
        (None, None) => BuildEnd::Lost {
            why: "the controller thread ended without a result".into(),
            console_tail: String::new(),
        },
    }
}

/// Which controller serves this build. `auto` takes the fastest this host and snapshot
/// allow: the embedded VMM's snapshot (milliseconds, no QEMU), then QEMU's suspended
/// controller, then a fresh boot, in the embedded VMM where it boots Linux, else QEMU.
fn choose_controller(
    spec: &BuildSpec,
    manifest: &Manifest,
    dir: &Path,
    accel: Accel,
    segment: &Segment,
) -> Result<Arc<dyn Controller>, BuildEnd> {
    let qemu_boot = || -> Arc<dyn Controller> {
        Arc::new(BootedController {
            qemu: spec.qemu.clone(),
            accel,
            vmm: BootVmm::Qemu,
        })
    };
    let embedded_boot = || -> Arc<dyn Controller> {
        Arc::new(BootedController {
            qemu: spec.qemu.clone(),
            accel,
            vmm: BootVmm::Embedded(segment.switch().clone()),
        })
    };
    let snapshot = manifest.controller.as_ref();
    let qemu_revive = snapshot.map(|c| -> Arc<dyn Controller> {
        Arc::new(RevivedController {
            qemu: spec.qemu.clone(),
            accel,
            state: dir.join(&c.state),
            initrd: dir.join(&c.initrd),
            format: manifest.state.state_format().single_file(),
        })
    });
    let embedded_revive =
        snapshot
            .and_then(|c| c.embedded.as_ref())
            .map(|sub| EmbeddedRevivedController {
                snapshot: dir.join(sub),
                switch: segment.switch().clone(),
                output: None,
            });
    // Its files are checked only now that it may be used; its state file at least must
    // be among them.
    let verify_embedded = || -> anyhow::Result<()> {
        let checked = manifest::verify_some_files(dir, manifest, spec.verify_full, |role| {
            role == manifest::OPTIONAL_ROLE
        })?;
        let state = format!(
            "{EMBEDDED_CONTROLLER_DIR}/{}",
            embedded_vmm::snapshot::VM_STATE_FILE
        );
        anyhow::ensure!(
            checked.iter().any(|f| f.name == state),
            "the manifest lists no checksum for {state}"
        );
        Ok(())
    };
    Ok(match spec.controller {
        ControllerChoice::Boot => qemu_boot(),
        ControllerChoice::EmbeddedBoot => embedded_boot(),
        ControllerChoice::Revive => qemu_revive.ok_or_else(|| {
            BuildEnd::SnapshotIncompatible(format!(
                "{} keeps no suspended controller (made by an older vmbuild): use --controller boot or bootstrap it again",
                dir.display()
            ))
        })?,
        ControllerChoice::Embedded => match embedded_revive {
            Some(c) => {
                verify_embedded().map_err(|e| BuildEnd::SnapshotDamaged(format!("{e:#}")))?;
                Arc::new(c)
            }
            None => embedded_boot(),
        },
        ControllerChoice::Auto => {
            // Asked only where the answer can change the choice (cached, but the first
            // answer on a host boots the kit for up to 8 s).
            let embedded_here = || {
                accel::probe_embedded_cached(
                    &spec.qemu.path,
                    &dir.join(KIT_KERNEL),
                    &dir.join(KIT_INITRD),
                )
                .usable
            };
            // A snapshot made on another host may not restore here (its vCPU state names
            // that host's CPU): a dry restore says so before the build relies on it.
            let embedded_revive = embedded_revive.filter(|c| {
                embedded_here()
                    && verify_embedded()
                        .and_then(|()| c.check(&manifest.network.controller_mac))
                        .inspect_err(|e| {
                            tracing::warn!(
                                "the snapshot's embedded controller cannot be used here ({e:#}): using QEMU's"
                            )
                        })
                        .is_ok()
            });
            match (embedded_revive, qemu_revive) {
                (Some(c), _) => Arc::new(c),
                (None, Some(c)) => c,
                (None, None) if embedded_here() => embedded_boot(),
                (None, None) => qemu_boot(),
            }
        }
    })
}

/// The controller's thread: stopped and joined when dropped.
struct ControllerThread {
    stop: Option<mpsc::Sender<()>>,
    done: mpsc::Receiver<anyhow::Result<ControllerOutcome>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl ControllerThread {
    /// Runs `controller`'s session on a thread of its own: it boots or revives the
    /// controller on the build's segment, logs into the target and runs `target_script`.
    fn spawn(
        controller: Arc<dyn Controller>,
        manifest: &Manifest,
        dir: &Path,
        resources: &Resources,
        ssh_wait: Duration,
        target_script: Vec<u8>,
    ) -> anyhow::Result<ControllerThread> {
        let (network, ssh) = (manifest.network.clone(), manifest.ssh.clone());
        let (kernel, kit_initrd, cpio) = (
            dir.join(KIT_KERNEL),
            dir.join(KIT_INITRD),
            dir.join(CONTROLLER_CPIO),
        );
        let net_socket = resources.segment.controller_socket.clone();
        let rundir = resources.rundir.path().to_owned();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<anyhow::Result<ControllerOutcome>>();
        let handle = std::thread::Builder::new()
            .name("controller".into())
            .spawn(move || {
                let plan = SessionPlan {
                    network: &network,
                    ssh: &ssh,
                    kernel: &kernel,
                    initrd_parts: vec![&kit_initrd, &cpio],
                    net_socket: &net_socket,
                    target_script: Some(target_script),
                    ssh_wait,
                    rundir: &rundir,
                    console_log: rundir.join("controller-console.log"),
                };
                let _ = done_tx.send(controller.run_session(&plan, stop_rx));
            })?;
        Ok(ControllerThread {
            stop: Some(stop_tx),
            done: done_rx,
            handle: Some(handle),
        })
    }

    fn stop(&mut self) {
        // Closing the channel is the signal (a send could race a controller that has
        // already stopped listening).
        self.stop.take();
    }
}

impl Drop for ControllerThread {
    fn drop(&mut self) {
        self.stop();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn record(ev: TargetEvent, phases: &mut Vec<(String, Instant)>, exit: &mut Option<i32>) {
    match ev {
        TargetEvent::Phase(p, at) => phases.push((p, at)),
        TargetEvent::Exit(n, _) => *exit = Some(n),
        TargetEvent::Qmp(_) => {}
    }
}

fn drain(
    events: &mpsc::Receiver<TargetEvent>,
    phases: &mut Vec<(String, Instant)>,
    exit: &mut Option<i32>,
) {
    while let Ok(ev) = events.try_recv() {
        record(ev, phases, exit);
    }
}

/// What the target runs in the SSH session: markers on its console (fd 3), the clock set
/// to now (the snapshot's clock stopped at bootstrap), the shares mounted, the command,
/// then a `sync` so that everything written to xchg is on the host before the status.
fn session_script(
    spec: &BuildSpec,
    manifest: &Manifest,
    profile: &dyn profile::Profile,
) -> Vec<u8> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut s = Vec::new();
    s.extend_from_slice(
        format!(
            "# vmbuild build session (generated)\nexec 3>{}\n",
            profile.console_device()
        )
        .as_bytes(),
    );
    let (session, mounted) = (phase_line(phase::SESSION), phase_line(phase::MOUNTED));
    s.extend_from_slice(format!("echo {session} >&3\n").as_bytes());
    s.extend_from_slice(format!("date -s @{now} >/dev/null 2>&1\n").as_bytes());
    let mut mounts = String::new();
    if let Some((_, mount)) = &spec.store {
        mounts.push_str(&profile.mount_share(STORE_TAG, mount, true));
    }
    mounts.push_str(&profile.mount_share(XCHG_TAG, &manifest.mounts.xchg, false));
    s.extend_from_slice(b"(\n");
    s.extend_from_slice(mounts.as_bytes());
    s.extend_from_slice(
        format!(") || {{ status=$?; echo \"{EXIT_MARKER}$status\" >&3; exit $status; }}\n")
            .as_bytes(),
    );
    if let (None, Some(dir)) = (&spec.cwd, profile.session_workdir(&manifest.mounts.xchg)) {
        s.extend_from_slice(
            format!(
                "cd {dir} || {{ echo \"vmbuild: cannot change to {dir}\" >&2; echo \"{EXIT_MARKER}125\" >&3; exit 125; }}\n"
            )
            .as_bytes(),
        );
    }
    s.extend_from_slice(format!("echo {mounted} >&3\n(\n").as_bytes());
    s.extend(
        GuestCommand {
            argv: &spec.argv,
            env: &spec.env,
            cwd: spec.cwd.as_deref(),
            io: CommandIo::Session,
        }
        .script(),
    );
    s.extend_from_slice(
        format!(")\nstatus=$?\nsync\necho \"{EXIT_MARKER}$status\" >&3\nexit $status\n").as_bytes(),
    );
    s
}

/// The snapshot directory a build reads, made absolute (QEMU gets absolute paths).
pub fn snapshot_path(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned())
}
