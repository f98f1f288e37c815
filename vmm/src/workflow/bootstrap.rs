//! `vmbuild bootstrap`: install a target once, boot it on a private segment, let a fresh
//! controller log in (which proves the keys and pins the host key), then suspend the
//! target to a state file. The snapshot directory is written under a temporary name next
//! to its destination and renamed into place only when complete, so an interrupted or
//! failed bootstrap never leaves something that looks like a snapshot.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::accel::{self, Accel};
use crate::guest::console::phase;
use crate::guest::initrd;
use crate::guest::kit::GuestKit;
use crate::owned_dir::{self, OwnedDir};
use crate::progress::Progress;
use crate::qemu::{QemuBinary, StateFormat};
use crate::runtime_dir::RuntimeDir;
use crate::snapshot::controller::embedded::{bootstrap_embedded_controller, EmbeddedBootstrap};
use crate::snapshot::controller::revive::{bootstrap_controller, ControllerMachine};
use crate::snapshot::controller::{
    ControllerEnd, CLIENT_KEY_GUEST, CONTROLLER_INITRD, CONTROLLER_MEMORY_MIB, CONTROLLER_STATE,
    EMBEDDED_CONTROLLER_DIR,
};
use crate::snapshot::manifest::{
    self, ControllerSnapshot, MachinePlan, Manifest, MountPlan, NetworkPlan, QemuInfo, SshPlan,
    StateInfo,
};
use crate::snapshot::profile::{
    Boot, InstallContext, InstallFailed, InstallInterrupted, Profile, DISK_FILE,
};
use crate::snapshot::segment::Segment;
use crate::snapshot::target::{machine_args, Placement, TargetEvent, TargetVm};
use crate::snapshot::{
    dropbear, BOOTSTRAP_LOG, CLIENT_KEY, CONTROLLER_CPIO, KIT_INITRD, KIT_KERNEL, STATE_FILE,
};
use crate::vm::timings::Marks;

pub struct BootstrapSpec {
    pub profile: Box<dyn Profile>,
    pub out: PathBuf,
    pub replace: bool,
    pub qemu: QemuBinary,
    pub accel: Accel,
    pub kit: GuestKit,
    pub memory_mib: u32,
    pub cpus: u32,
    pub disk_size_mib: u64,
    pub ssh_wait: Duration,
    pub progress: bool,
    /// How the target's memory is written (`manifest::snapshot_state_format` by default).
    pub state_format: StateFormat,
}

/// Why a bootstrap did not produce a snapshot (errors aside).
#[derive(Debug)]
pub enum BootstrapFailure {
    Interrupted,
    /// The target never answered SSH; the last lines of its console.
    TargetUnreachable(String),
    HandshakeFailed(String),
    ControllerDied(String),
    /// The target's QEMU exited before it answered SSH.
    TargetStopped(String),
    /// The profile's install ran in a VM and failed there (a phase timed out or failed).
    InstallFailed(String),
}

pub fn bootstrap(
    spec: &BootstrapSpec,
    signals: Receiver<()>,
) -> anyhow::Result<Result<Manifest, BootstrapFailure>> {
    match steps(spec, signals) {
        Ok(manifest) => Ok(Ok(manifest)),
        Err(Stop::Failed(why)) => Ok(Err(why)),
        Err(Stop::Error(e)) => Err(e),
    }
}

/// The bootstrap, step by step. Each step either hands the next what it made or stops
/// the bootstrap; whatever is dropped on the way out (VMs, the staging directory, sockets)
/// cleans up after itself.
fn steps(spec: &BootstrapSpec, signals: Receiver<()>) -> Result<Manifest, Stop> {
    dropbear::check_installed()?;
    let mut b = Bootstrap::prepare(spec, signals)?;
    let keys = b.make_keys()?;
    b.stop_if_interrupted()?;
    let boot = b.install(&keys)?;
    b.stop_if_interrupted()?;
    let (plan, ssh) = b.plans(&boot, &keys)?;
    let running = b.boot_and_log_in(&plan, &ssh)?;
    let embedded_controller = b.snapshot_embedded_controller(&running)?;
    b.record_boot_timings(&running);
    b.stop_if_interrupted()?;
    b.suspend(running)?;
    b.stop_if_interrupted()?;
    let manifest = b.write_manifest(plan, ssh, embedded_controller)?;
    b.publish(manifest)
}

/// How a step ends a bootstrap early: a failure the user is told about in its own terms
/// (exit code), or an error.
enum Stop {
    Failed(BootstrapFailure),
    Error(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Stop {
    fn from(e: E) -> Stop {
        Stop::Error(e.into())
    }
}

/// The snapshot's keys: the controller's (kept in the snapshot) and the target's host
/// key (its public half is pinned in the manifest).
struct Keys {
    client: dropbear::KeyPair,
    host: dropbear::KeyPair,
}

/// The target booted and logged into, still running on its private segment.
struct Running {
    target: TargetVm,
    segment: Segment,
    controller_marks: Marks,
    target_up: Option<Instant>,
}

/// What the steps share: where the snapshot is being written, and what was measured.
struct Bootstrap<'a> {
    spec: &'a BootstrapSpec,
    signals: Receiver<()>,
    progress: Progress,
    timings: BTreeMap<String, f64>,
    out: PathBuf,
    /// The snapshot being written, next to `out`, renamed onto it when complete.
    staging: OwnedDir,
    /// Files needed only while bootstrapping (the target's private host key).
    scratch: OwnedDir,
    rundir: RuntimeDir,
    /// The target's private network, from the install (windows-cygwin's runs in a VM) to
    /// the suspend.
    segment: Option<Segment>,
    network: NetworkPlan,
    state_format: StateFormat,
}

impl<'a> Bootstrap<'a> {
    /// Where it goes: `--out` checked, and the staging, scratch and runtime directories
    /// made. They are owned directories: a bootstrap killed outright leaves them to the
    /// next one's sweep.
    fn prepare(spec: &'a BootstrapSpec, signals: Receiver<()>) -> Result<Self, Stop> {
        let out = absolute(&spec.out)?;
        check_out(&out, spec.replace)?;
        let parent = out.parent().context("--out has no parent directory")?;
        let staging_prefix = staging_prefix(&out);
        owned_dir::sweep(parent, &staging_prefix);
        let staging = OwnedDir::create(parent, &staging_prefix)
            .with_context(|| format!("creating a staging directory in {}", parent.display()))?;
        let tmp = std::env::temp_dir();
        let scratch = OwnedDir::create(&tmp, owned_dir::BOOTSTRAP_SCRATCH_PREFIX)
            .with_context(|| format!("creating a scratch directory in {}", tmp.display()))?;
        Ok(Bootstrap {
            spec,
            signals,
            progress: Progress::new(spec.progress),
            timings: BTreeMap::new(),
            out,
            staging,
            scratch,
            rundir: RuntimeDir::create("bootstrap")?,
            segment: None,
            network: NetworkPlan::default(),
            state_format: spec.state_format,
        })
    }

    /// The snapshot directory being written.
    fn dir(&self) -> &Path {
        self.staging.path()
    }

    fn stop_if_interrupted(&self) -> Result<(), Stop> {
        match interrupted(&self.signals) {
            true => Err(Stop::Failed(BootstrapFailure::Interrupted)),
            false => Ok(()),
        }
    }

    fn make_keys(&self) -> Result<Keys, Stop> {
        let step = self.progress.step("creating the snapshot's SSH keys");
        std::fs::create_dir(self.dir().join("ssh"))?;
        let client = dropbear::generate_key(&self.dir().join(CLIENT_KEY))?;
        let host = dropbear::generate_key(&self.scratch.path().join("host_key"))?;
        step.done();
        Ok(Keys { client, host })
    }

    /// The profile installs the target's disk and boot files; the kit's kernel and
    /// initramfs (which boot every build's controller, and the linux target) and the
    /// controller's part are copied in, so a later kit cannot change them.
    fn install(&mut self, keys: &Keys) -> Result<Boot, Stop> {
        let (spec, dir) = (self.spec, self.staging.path());
        let started = Instant::now();
        for (from, to) in [
            (&spec.kit.kernel, KIT_KERNEL),
            (&spec.kit.initrd, KIT_INITRD),
        ] {
            std::fs::copy(from, dir.join(to))
                .with_context(|| format!("copying {} into {}", from.display(), dir.display()))?;
        }
        let segment = Segment::create(self.rundir.path())?;
        let installed = spec.profile.install(&InstallContext {
            out: dir,
            scratch: self.scratch.path(),
            kit: &spec.kit,
            host_key: &keys.host.private,
            authorized_key: &format!("{}\n", keys.client.public),
            disk_size_mib: spec.disk_size_mib,
            network: &self.network,
            progress: &self.progress,
            qemu: &spec.qemu,
            accel: spec.accel,
            memory_mib: spec.memory_mib,
            cpus: spec.cpus,
            rundir: self.rundir.path(),
            net_socket: &segment.target_socket,
            signals: &self.signals,
            screendump: install_screendump(&self.out),
        });
        self.segment = Some(segment);
        let boot = installed.map_err(|e| {
            if e.downcast_ref::<InstallInterrupted>().is_some() {
                Stop::Failed(BootstrapFailure::Interrupted)
            } else if let Some(InstallFailed(why)) = e.downcast_ref::<InstallFailed>() {
                Stop::Failed(BootstrapFailure::InstallFailed(why.clone()))
            } else {
                Stop::Error(e)
            }
        })?;
        // The controller's SSH client and key, appended to the kit's initramfs at every
        // build.
        write_controller_cpio(&dir.join(CONTROLLER_CPIO), &keys.client.private)?;
        self.timings
            .insert("install".into(), started.elapsed().as_secs_f64());
        Ok(boot)
    }

    /// The machine and the SSH login the manifest records.
    fn plans(&self, boot: &Boot, keys: &Keys) -> Result<(MachinePlan, SshPlan), Stop> {
        let spec = self.spec;
        let machine = MachinePlan {
            machine: spec.qemu.resolve_machine(spec.profile.machine_type())?,
            accel: spec.accel.qemu_name().into(),
            cpu: spec.accel.cpu_model().map(str::to_owned),
            memory_mib: spec.memory_mib,
            cpus: spec.cpus,
            kernel: boot.kernel.clone(),
            initrd: boot.initrd.clone(),
            append: boot.append.clone(),
            uefi: boot.uefi.clone(),
        };
        let ssh = SshPlan {
            user: spec.profile.ssh_user().into(),
            client_key: CLIENT_KEY.into(),
            client_public_key: keys.client.public.clone(),
            host_key: keys.host.public.clone(),
            console_device: spec.profile.console_device().into(),
        };
        Ok((machine, ssh))
    }

    /// Boots the target on a private segment, and a controller that logs into it (which
    /// proves the keys and pins the host key) and is suspended right after, waiting for
    /// the session of a build.
    fn boot_and_log_in(&mut self, plan: &MachinePlan, ssh: &SshPlan) -> Result<Running, Stop> {
        let segment = self.segment.take();
        let (spec, dir, rundir) = (self.spec, self.dir(), self.rundir.path());
        let step = self.progress.step(&format!(
            "booting the target ({} MiB, {}) and logging in from a controller",
            spec.memory_mib,
            spec.accel.qemu_name()
        ));
        let segment = match segment {
            Some(s) => s,
            None => Segment::create(rundir)?,
        };
        let target = TargetVm::start(
            &spec.qemu,
            plan,
            &self.network,
            &Placement {
                snapshot_dir: dir,
                disk: &dir.join(DISK_FILE),
                net_socket: &segment.target_socket,
                rundir,
                console_log: Some(dir.join(BOOTSTRAP_LOG)),
            },
            false,
        )?;
        let (kernel, kit_initrd) = (dir.join(KIT_KERNEL), dir.join(KIT_INITRD));
        let controller_log = self.rundir.join("controller-console.log");
        let session = bootstrap_controller(
            &ControllerMachine {
                qemu: &spec.qemu,
                accel: spec.accel,
                kernel: &kernel,
                initrd: &kit_initrd,
                net_socket: &segment.controller_socket,
                mac: &self.network.controller_mac,
                rundir,
                console_log: Some(&controller_log),
            },
            &[&kit_initrd, &dir.join(CONTROLLER_CPIO)],
            dir,
            &self.network,
            ssh,
            spec.ssh_wait,
            &self.signals,
            self.state_format.single_file(),
            &|| target.stopped(),
        )
        .map_err(|e| match target.qemu.has_exited() {
            // The target, not vmbuild, failed: a VM failure with its console.
            true => Stop::Failed(BootstrapFailure::TargetStopped(
                target.stopped().unwrap_or_else(|| format!("{e:#}")),
            )),
            false => Stop::Error(e),
        })?;
        let mut target_up = None;
        while let Ok(ev) = target.events.try_recv() {
            if let TargetEvent::Phase(p, at) = ev {
                if p == phase::TARGET_UP {
                    target_up = Some(at);
                }
            }
        }
        let controller_marks = session.map_err(|end| {
            Stop::Failed(match end {
                ControllerEnd::Finished(0) => {
                    unreachable!("bootstrap_controller reports success as Ok")
                }
                ControllerEnd::Interrupted => BootstrapFailure::Interrupted,
                ControllerEnd::TargetUnreachable => {
                    BootstrapFailure::TargetUnreachable(target.console_tail())
                }
                ControllerEnd::HostKeyChanged | ControllerEnd::HandshakeFailed => {
                    BootstrapFailure::HandshakeFailed(target.console_tail())
                }
                ControllerEnd::Finished(code) => BootstrapFailure::HandshakeFailed(format!(
                    "the controller's session ended with status {code}"
                )),
                ControllerEnd::Died { why, console_tail } => {
                    BootstrapFailure::ControllerDied(format!("{why}\n{console_tail}"))
                }
            })
        })?;
        step.done();
        Ok(Running {
            target,
            segment,
            controller_marks,
            target_up,
        })
    }

    /// Where the embedded VMM boots Linux here, the same controller once more,
    /// snapshotted by it: builds on this host then restore it in milliseconds, with no
    /// QEMU for it. It is an addition: a snapshot without it works everywhere, so a
    /// failure is reported and the bootstrap goes on. Whether it was made.
    fn snapshot_embedded_controller(&mut self, running: &Running) -> Result<bool, Stop> {
        let spec = self.spec;
        // The kit's own files (their checksums key the cached answer), which the
        // snapshot's copies are.
        if !accel::probe_embedded_cached(&spec.qemu.path, &spec.kit.kernel, &spec.kit.initrd).usable
        {
            return Ok(false);
        }
        let dir = self.dir();
        let embedded = EmbeddedBootstrap {
            kernel: &dir.join(KIT_KERNEL),
            initrd: &dir.join(CONTROLLER_INITRD),
            switch: running.segment.switch(),
            mac: &self.network.controller_mac,
            out: &dir.join(EMBEDDED_CONTROLLER_DIR),
            wait: spec.ssh_wait + Duration::from_secs(60),
            console_log: Some(&self.rundir.join("embedded-controller-console.log")),
        };
        let made = snapshot_embedded_controller(
            &embedded,
            &self.signals,
            &self.progress,
            &mut self.timings,
        );
        made.ok_or(Stop::Failed(BootstrapFailure::Interrupted))
    }

    fn record_boot_timings(&mut self, running: &Running) {
        let m = &running.controller_marks;
        if let Some(t) = running.target_up {
            self.timings.insert(
                "target_boot".into(),
                t.duration_since(running.target.spawned).as_secs_f64(),
            );
        }
        if let (Some(s), Some(up)) = (m.start, m.phase("controller-up")) {
            self.timings
                .insert("controller_up".into(), (up - s).as_secs_f64());
        }
        if let (Some(open), Some(end)) = (m.phase("port-open"), m.phase("controller-ready")) {
            self.timings
                .insert("handshake".into(), (end - open).as_secs_f64());
        }
    }

    /// The target's memory to the state file (QMP `stop` + migrate), then QEMU quits.
    fn suspend(&mut self, running: Running) -> Result<(), Stop> {
        let Running {
            mut target,
            segment,
            ..
        } = running;
        let step = self
            .progress
            .step("suspending the target to its memory state");
        let state = self.dir().join(STATE_FILE);
        let progress = &self.progress;
        let saved = target.qmp.save_state(
            &state,
            self.state_format,
            Duration::from_secs(600),
            &mut |done, total| progress.fraction("saving memory", done, total),
        );
        saved
            .map_err(|e| target.qemu.explain(e, "QEMU stopped"))
            .map_err(|e| crate::qemu::migration::save_failed(e, &state))
            .context("suspending the target")?;
        let suspend = step.done();
        self.timings.insert("suspend".into(), suspend);
        let _ = target.qmp.quit();
        if target.qemu.wait_timeout(Duration::from_secs(5))?.is_none() {
            target.qemu.kill();
        }
        drop(target);
        drop(segment);
        Ok(())
    }

    /// Every file's checksum and the plans, in `manifest.json`.
    fn write_manifest(
        &mut self,
        plan: MachinePlan,
        ssh: SshPlan,
        embedded_controller: bool,
    ) -> Result<Manifest, Stop> {
        let (spec, dir) = (self.spec, self.staging.path());
        let step = self.progress.step("writing checksums and the manifest");
        let mut files = vec![
            manifest::file_entry(dir, DISK_FILE, "disk")?,
            manifest::file_entry(dir, CONTROLLER_CPIO, "controller")?,
            manifest::file_entry(dir, CLIENT_KEY, "key")?,
            manifest::file_entry(dir, KIT_KERNEL, "kernel")?,
            manifest::file_entry(dir, KIT_INITRD, "initrd")?,
            manifest::file_entry(dir, CONTROLLER_STATE, "controller-state")?,
            manifest::file_entry(dir, CONTROLLER_INITRD, "controller-initrd")?,
        ];
        if let Some(uefi) = &plan.uefi {
            files.push(manifest::file_entry(dir, &uefi.vars, "uefi-vars")?);
        }
        // A target booted from files of its own (the windows-cygwin tests' stand-in).
        for (file, kit_file, role) in [
            (&plan.kernel, KIT_KERNEL, "target-kernel"),
            (&plan.initrd, KIT_INITRD, "target-initrd"),
        ] {
            if let Some(f) = file.as_deref().filter(|f| *f != kit_file) {
                files.push(manifest::file_entry(dir, f, role)?);
            }
        }
        let mut state_bytes = 0;
        for path in state_files(dir, self.state_format) {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let entry = manifest::file_entry(dir, &name, "state")?;
            state_bytes += entry.bytes;
            files.push(entry);
        }
        if embedded_controller {
            let sub = dir.join(EMBEDDED_CONTROLLER_DIR);
            let mut names: Vec<String> = std::fs::read_dir(&sub)?
                .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
                .collect::<std::io::Result<_>>()?;
            names.sort();
            for name in names {
                files.push(manifest::file_entry(
                    dir,
                    &format!("{EMBEDDED_CONTROLLER_DIR}/{name}"),
                    manifest::OPTIONAL_ROLE,
                )?);
            }
        }
        let (a, b, c) = spec.qemu.version;
        self.timings.insert("total".into(), self.progress.elapsed());
        let qemu_args = machine_args(
            &plan,
            &self.network,
            &Placement {
                snapshot_dir: Path::new("$SNAPSHOT"),
                disk: Path::new("$DISK"),
                net_socket: Path::new("$NET_SOCKET"),
                rundir: Path::new(""),
                console_log: None,
            },
        );
        let manifest = Manifest {
            format: manifest::FORMAT,
            vmbuild_version: env!("CARGO_PKG_VERSION").into(),
            profile: spec.profile.name().into(),
            created_at: manifest::utc_now(),
            qemu: QemuInfo {
                version: format!("{a}.{b}.{c}"),
                binary: spec.qemu.path.display().to_string(),
            },
            machine: plan,
            qemu_args,
            state: StateInfo {
                file: STATE_FILE.into(),
                format: self.state_format.manifest_name().into(),
                bytes: state_bytes,
                multifd_channels: self.state_format.channels(),
            },
            network: self.network.clone(),
            ssh,
            controller: Some(ControllerSnapshot {
                state: CONTROLLER_STATE.into(),
                initrd: CONTROLLER_INITRD.into(),
                memory_mib: CONTROLLER_MEMORY_MIB,
                embedded: embedded_controller.then(|| EMBEDDED_CONTROLLER_DIR.into()),
            }),
            mounts: MountPlan {
                xchg: spec.profile.xchg_mount().into(),
            },
            files,
            timings: self.timings.clone(),
        };
        manifest.save(dir)?;
        step.done();
        Ok(manifest)
    }

    /// Into place: the old snapshot (if any) moves aside, the new one in, and only then
    /// is the old one removed; a failure in between leaves one of them whole under --out.
    fn publish(self, manifest: Manifest) -> Result<Manifest, Stop> {
        let out = &self.out;
        check_out(out, self.spec.replace)?;
        let name = out.file_name().unwrap_or_default().to_string_lossy();
        let parent = out.parent().context("--out has no parent directory")?;
        let old = out
            .exists()
            .then(|| parent.join(format!(".{name}.old-{}", std::process::id())));
        if let Some(old) = &old {
            std::fs::rename(out, old)
                .with_context(|| format!("moving the old snapshot {} aside", out.display()))?;
        }
        if let Err(e) = self.staging.persist_as(out) {
            if let Some(old) = &old {
                let _ = std::fs::rename(old, out);
            }
            return Err(anyhow::Error::from(e)
                .context(format!("moving the snapshot to {}", out.display()))
                .into());
        }
        if let Some(old) = &old {
            std::fs::remove_dir_all(old)
                .with_context(|| format!("removing the old snapshot {}", old.display()))?;
        }
        manifest::mark_verified(out, &manifest);
        self.progress.note(&format!(
            "snapshot ready in {} ({:.1} s)",
            out.display(),
            self.progress.elapsed()
        ));
        Ok(manifest)
    }
}

/// Whether SIGINT, SIGTERM or SIGHUP came (checked between steps that do not watch for
/// it themselves, so that an interrupt does not wait for the rest of the bootstrap).
fn interrupted(signals: &Receiver<()>) -> bool {
    signals.try_recv().is_ok()
}

/// Where a failed install's screendump is kept: beside `out` (the staging directory is
/// removed on failure).
pub fn install_screendump(out: &Path) -> PathBuf {
    let name = out.file_name().unwrap_or_default().to_string_lossy();
    out.with_file_name(format!("{name}.install-failure.png"))
}

/// The name prefix of `out`'s staging directory, next to it: `.NAME.partial`.
fn staging_prefix(out: &Path) -> String {
    let name = out.file_name().unwrap_or_default().to_string_lossy();
    format!(".{name}.partial")
}

/// Another bootstrap that is writing `out` right now (its staging directory, locked by a
/// living process), for refusing a second one before it starts.
pub fn out_in_use(out: &Path) -> Option<PathBuf> {
    let out = absolute(out).ok()?;
    owned_dir::in_use(out.parent()?, &staging_prefix(&out))
}

/// `out` may be written: absent, empty, or (with `replace`) a snapshot. Never replaces a
/// directory that is not a snapshot.
fn check_out(out: &Path, replace: bool) -> anyhow::Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        bail!("{} exists and is not a directory", out.display());
    }
    if std::fs::read_dir(out)?.next().is_none() {
        return Ok(());
    }
    if !replace {
        bail!(
            "{} exists and is not empty: choose another --out or pass --replace",
            out.display()
        );
    }
    if !out.join(manifest::MANIFEST_FILE).is_file() {
        bail!(
            "refusing to replace {}: it is not a vmbuild snapshot (no {})",
            out.display(),
            manifest::MANIFEST_FILE
        );
    }
    Ok(())
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_owned()
    } else {
        std::env::current_dir()?.join(p)
    })
}

/// The embedded controller's snapshot, made next to the QEMU one: whether it was made
/// (a failure only costs builds the faster controller, so it is reported and skipped), or
/// `None` if the user interrupted.
fn snapshot_embedded_controller(
    b: &EmbeddedBootstrap,
    signals: &Receiver<()>,
    progress: &Progress,
    timings: &mut BTreeMap<String, f64>,
) -> Option<bool> {
    let step = progress.step("snapshotting the controller in the embedded VMM");
    let why = match bootstrap_embedded_controller(b, signals) {
        Ok(Ok(_)) => {
            timings.insert("embedded_controller".into(), step.done());
            return Some(true);
        }
        Ok(Err(ControllerEnd::Interrupted)) => return None,
        Ok(Err(end)) => format!("{end:?}"),
        Err(e) => format!("{e:#}"),
    };
    eprintln!("vmbuild bootstrap: no embedded controller (builds will use QEMU's): {why}");
    let _ = std::fs::remove_dir_all(b.out);
    Some(false)
}

/// dbclient, its libraries and the client key as a newc archive.
fn write_controller_cpio(path: &Path, client_key: &Path) -> anyhow::Result<()> {
    let files = dropbear::runtime_files(Path::new(dropbear::CLIENT), "/bin/dbclient")?;
    let mut contents: Vec<(String, u32, Vec<u8>)> = vec![
        (
            "/lib/x86_64-linux-gnu".into(),
            libc::S_IFDIR | 0o755,
            Vec::new(),
        ),
        ("/etc/vmbuild/ssh".into(), libc::S_IFDIR | 0o700, Vec::new()),
    ];
    for (host, guest) in files {
        let data = std::fs::read(&host).with_context(|| format!("reading {}", host.display()))?;
        contents.push((guest, libc::S_IFREG | 0o755, data));
    }
    contents.push((
        CLIENT_KEY_GUEST.into(),
        libc::S_IFREG | 0o600,
        std::fs::read(client_key)?,
    ));
    let entries: Vec<(&str, u32, &[u8])> = contents
        .iter()
        .map(|(p, m, d)| (p.as_str(), *m, d.as_slice()))
        .collect();
    std::fs::write(path, initrd::newc_archive(&entries))?;
    Ok(())
}

/// The files the target's memory state occupies in the snapshot directory `dir`.
fn state_files(dir: &Path, format: StateFormat) -> Vec<PathBuf> {
    let state = dir.join(STATE_FILE);
    match format {
        StateFormat::ZstdChannels(n) => crate::qemu::recorded_channels::channel_files(&state, n),
        _ => vec![state],
    }
}
