//! `vmbuild run`: a command in a fresh Linux VM, with the store, xchg and any extra shares
//! served in-process, its output streamed back and its exit code returned.
//!
//! One QEMU process and this one: the shares are `ShareServer`s on private sockets, the
//! guest's console, stdout and stderr are serial ports connected to sockets vmbuild
//! listens on, and QMP reports how the guest stopped.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use anyhow::Context;
use virtiofs_bridge::{CacheMode, ShareConfig, ShareServer};

use crate::guest::cmdline::{KernelCmdline, MountKind};
use crate::guest::command_script::{CommandIo, GuestCommand};
use crate::guest::console::{self, phase, ConsoleEvent, ConsoleLog, ConsoleTail};
use crate::guest::initrd::{self, GUEST_SCRIPT_PATH};
use crate::owned_dir::{self, OwnedDir};
use crate::qemu::Accel;
use crate::qemu::{
    ChardevListener, QemuBinary, QemuCommand, QemuProcess, Qmp, QmpEvent, ShutdownReason,
};
use crate::runtime_dir::RuntimeDir;
use crate::vm::timings::{note_console_event, Marks};

/// Where the control share (command script, exit status) is mounted in the guest.
const CTL_MOUNT: &str = "/run/vmbuild";

/// A host directory mounted in the guest.
#[derive(Debug, Clone)]
pub struct ExtraShare {
    pub host: PathBuf,
    pub guest: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiskMode {
    /// Writes go to a temporary overlay QEMU discards (`snapshot=on`).
    Snapshot,
    /// Writes go to a qcow2 overlay vmbuild creates over the image and deletes afterwards.
    Overlay,
    /// Writes go to the image itself.
    Rw,
}

#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    pub format: String,
    pub mode: DiskMode,
}

/// The guest's NIC and where it plugs into a switch.
#[derive(Clone)]
pub struct Nic {
    pub link: NicLink,
    pub mac: String,
}

#[derive(Clone)]
pub enum NicLink {
    /// A switch's stream port (QEMU's `-netdev stream`).
    Stream(PathBuf),
    /// A new in-process port of this switch (the embedded VMM's virtio-net).
    InProcess(std::sync::Arc<vswitch::Switch>),
}

/// Everything a run needs, checked by the CLI before anything starts.
pub struct RunSpec {
    pub qemu: QemuBinary,
    pub accel: Accel,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: Option<String>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Empty with `shell`.
    pub argv: Vec<OsString>,
    pub shell: bool,
    pub env: Vec<(String, Vec<u8>)>,
    pub cwd: Option<String>,
    pub store: Option<(PathBuf, String)>,
    pub xchg: Option<PathBuf>,
    pub keep_xchg: bool,
    /// xchg with the guest's writeback cache (`--xchg-writeback`).
    pub xchg_writeback: bool,
    /// No xchg share at all (a guest that only talks over the network).
    pub no_xchg: bool,
    pub nic: Option<Nic>,
    pub extra_shares: Vec<ExtraShare>,
    pub disk: Option<Disk>,
    /// A distribution image the command runs in (`vmbuild.image=`): /dev/vda, before
    /// `disk`, always through a discarded overlay.
    pub image: Option<PathBuf>,
    pub timeout: Option<Duration>,
    /// Console to this file instead of stderr.
    pub log: Option<PathBuf>,
    /// Which VMM runs the guest.
    pub vmm: Vmm,
    /// How the guest mounts its shares.
    pub share_protocol: ShareProtocol,
    /// Read-only virtio-fs shares get a DAX window (the embedded VMM only).
    pub dax: bool,
    /// Where this run's sockets and control files go (a directory is made inside it);
    /// `None`: `$XDG_RUNTIME_DIR/vmbuild`, `/run/vmbuild` for root, else the temp dir.
    pub runtime_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ShareProtocol {
    /// virtio-fs (FUSE): QEMU over vhost-user, the embedded VMM in-process
    #[default]
    Virtiofs,
    /// virtio-9p (9P2000.L), served in-process; the embedded VMM only
    #[value(name = "9p")]
    NineP,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vmm {
    Qemu,
    /// The embedded KVM VMM (`vm::run_embedded`).
    Embedded,
}

/// How a run ended.
#[derive(Debug)]
pub enum RunEnd {
    /// The command ran; its exit status.
    Exited(i32),
    TimedOut(Duration),
    Interrupted,
    /// The guest stopped without reporting an exit status.
    NoExitCode {
        why: String,
        console_tail: String,
    },
    /// The host failed the VM (QEMU paused it for good: its disk could not be written, a
    /// full file system); it was stopped.
    HostFailed(String),
}

pub struct RunOutcome {
    pub end: RunEnd,
    pub marks: Marks,
}

enum Event {
    /// A marker line of the console.
    Console(ConsoleEvent, Instant),
    Qmp(QmpEvent),
    Signal,
}

/// Runs the spec to the end. Every resource it creates (QEMU, sockets, runtime directory,
/// temporary xchg) is owned by a value dropped on every way out of this function.
pub fn run(spec: &RunSpec, signals: Receiver<()>) -> anyhow::Result<RunOutcome> {
    if let Some(Nic {
        link: NicLink::InProcess(_),
        ..
    }) = &spec.nic
    {
        anyhow::bail!("QEMU reaches a switch through a stream port, not an in-process one");
    }
    let mut marks = Marks {
        vmm: Some("qemu"),
        start: Some(Instant::now()),
        ..Marks::default()
    };
    let rundir = RuntimeDir::create_in(spec.runtime_dir.as_deref(), "run")?;

    let (xchg, _xchg_temp) = xchg_dir(spec.xchg.as_deref(), spec.keep_xchg)?;
    // The command travels in the initrd and its exit status comes back on the console,
    // so a run needs no share of its own. Only --shell, whose console is the user's
    // terminal, gets a control share for the exit status.
    let (initrd, ctl) = if spec.shell {
        let ctl = rundir.join("ctl");
        std::fs::create_dir(&ctl)?;
        (spec.initrd.clone(), Some(ctl))
    } else {
        (command_initrd(spec, rundir.path())?, None)
    };
    let servers = serve_shares(spec, &rundir, &xchg, ctl.as_deref())?;
    let Started {
        mut qemu,
        qmp: qmp_stream,
        stdout: out_stream,
        stderr: err_stream,
        console: console_stream,
    } = start_qemu(spec, &rundir, &initrd, &servers)?;

    let (tx, rx) = mpsc::channel::<Event>();
    let (qmp_tx, qmp_rx) = mpsc::channel::<QmpEvent>();
    forward(qmp_rx, tx.clone(), Event::Qmp);
    // A closed channel means stop too: a caller (a build's controller thread) that goes
    // away must not leave this VM running.
    let stop_tx = tx.clone();
    std::thread::spawn(move || {
        let _ = signals.recv();
        let _ = stop_tx.send(Event::Signal);
    });
    let mut qmp = qemu.qmp_handshake(qmp_stream, qmp_tx)?;
    marks.vmm_ready = Some(Instant::now());

    let tail = ConsoleTail::default();
    let console_thread = console_stream
        .map(|s| console_to_user(s, spec.log.as_deref(), tail.clone(), tx.clone()))
        .transpose()?;
    let out_thread = spawn_copy(out_stream, std::io::stdout())?;
    let err_thread = spawn_copy(err_stream, std::io::stderr())?;
    drop(tx);

    let Waited {
        end,
        mut console_exit,
        shutdown,
    } = wait_for_the_guest(spec, &mut qemu, &mut qmp, &rx, &mut marks)?;
    // QEMU has exited or been told to; make sure, then collect what the guest left.
    if qemu.wait_timeout(Duration::from_secs(3))?.is_none() {
        qemu.kill();
    }
    marks.exited.get_or_insert_with(Instant::now);
    for t in [Some(out_thread), Some(err_thread), console_thread]
        .into_iter()
        .flatten()
    {
        let _ = t.join();
    }
    // Drain console lines that arrived after QEMU exited.
    while let Ok(ev) = rx.try_recv() {
        match ev {
            Event::Console(ConsoleEvent::Phase(p), at) if p == phase::COMMAND_END => {
                marks.command_end.get_or_insert(at);
            }
            Event::Console(ConsoleEvent::Exit(n), _) => console_exit = n,
            _ => {}
        }
    }
    let status_file = ctl
        .as_ref()
        .and_then(|ctl| std::fs::read_to_string(ctl.join("status")).ok())
        .and_then(|s| s.trim().parse::<i32>().ok());
    let console_tail = tail.text();
    let end = end.unwrap_or_else(|| match status_file.or(console_exit) {
        Some(code) => RunEnd::Exited(code),
        None => RunEnd::NoExitCode {
            why: explain_no_exit(shutdown.as_ref(), &console_tail, &qemu.stderr()),
            console_tail,
        },
    });
    drop(qemu);
    for (server, _) in servers {
        server.stop(Duration::from_millis(200));
    }
    drop(rundir);
    marks.done = Some(Instant::now());
    Ok(RunOutcome { end, marks })
}

/// QEMU running the run's machine, and the sockets it connected.
struct Started {
    qemu: QemuProcess,
    qmp: UnixStream,
    /// The command's stdout and stderr (the guest's second and third serial ports).
    stdout: UnixStream,
    stderr: UnixStream,
    /// The guest console; none with --shell, whose console is the user's terminal.
    console: Option<UnixStream>,
}

/// Starts QEMU with the run's machine (the disk through an overlay if asked) and waits
/// for it to connect the sockets vmbuild listens on.
fn start_qemu(
    spec: &RunSpec,
    rundir: &RuntimeDir,
    initrd: &Path,
    servers: &[(ShareServer, String)],
) -> anyhow::Result<Started> {
    let chardevs = Chardevs {
        qmp: ChardevListener::bind(rundir.join("qmp.sock"))?,
        console: if spec.shell {
            None
        } else {
            Some(ChardevListener::bind(rundir.join("console.sock"))?)
        },
        stdout: ChardevListener::bind(rundir.join("stdout.sock"))?,
        stderr: ChardevListener::bind(rundir.join("stderr.sock"))?,
    };

    let disk = match &spec.disk {
        Some(d) if d.mode == DiskMode::Overlay => Some(Disk {
            path: create_overlay(&d.path, &d.format, rundir.path())?,
            format: "qcow2".into(),
            mode: DiskMode::Rw,
        }),
        other => other.clone(),
    };
    let args = qemu_args(spec, initrd, disk.as_ref(), servers, &chardevs);
    let (major, minor, micro) = spec.qemu.version;
    tracing::debug!("QEMU {major}.{minor}.{micro}: {}", args.join(" "));
    let mut listeners = vec![&chardevs.qmp, &chardevs.stdout, &chardevs.stderr];
    if let Some(c) = &chardevs.console {
        listeners.push(c);
    }
    let (qemu, streams) = QemuProcess::start_connected(
        &spec.qemu.path,
        &args,
        &rundir.join("qemu.stderr"),
        spec.shell,
        &listeners,
    )?;
    let mut streams = streams.into_iter();
    let (qmp_stream, out_stream, err_stream) = (
        streams.next().unwrap(),
        streams.next().unwrap(),
        streams.next().unwrap(),
    );
    Ok(Started {
        qemu,
        qmp: qmp_stream,
        stdout: out_stream,
        stderr: err_stream,
        console: streams.next(),
    })
}

/// What waiting for the guest saw.
struct Waited {
    /// Why the host ended the run (timeout, signal); `None` when QEMU exited by itself.
    end: Option<RunEnd>,
    console_exit: Option<i32>,
    shutdown: Option<ShutdownReason>,
}

/// Waits until QEMU exits, the timeout passes or a signal comes, noting the console's
/// phases and QEMU's shutdown reason on the way.
fn wait_for_the_guest(
    spec: &RunSpec,
    qemu: &mut QemuProcess,
    qmp: &mut Qmp,
    rx: &Receiver<Event>,
    marks: &mut Marks,
) -> anyhow::Result<Waited> {
    let deadline = spec.timeout.map(|t| Instant::now() + t);
    let mut console_exit: Option<i32> = None;
    let mut shutdown: Option<ShutdownReason> = None;
    let mut end: Option<RunEnd> = None;
    loop {
        if qemu.try_wait()?.is_some() {
            marks.exited = Some(Instant::now());
            break;
        }
        if let Some(d) = deadline {
            if Instant::now() >= d {
                end = Some(RunEnd::TimedOut(spec.timeout.unwrap()));
                let _ = qmp.quit();
                break;
            }
        }
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(Event::Console(ev, at)) => note_console_event(marks, &mut console_exit, &ev, at),
            Ok(Event::Qmp(QmpEvent::Shutdown { reason })) => shutdown = Some(reason),
            Ok(Event::Qmp(QmpEvent::GuestPanicked)) => shutdown = Some(ShutdownReason::GuestPanic),
            // QEMU pauses the guest on ENOSPC and waits for someone to free space and
            // resume it: nobody will.
            Ok(Event::Qmp(QmpEvent::DiskError {
                stopped: true,
                reason,
            })) => {
                end = Some(RunEnd::HostFailed(format!(
                    "QEMU stopped the guest: its disk could not be written on the host ({reason})"
                )));
                let _ = qmp.quit();
                break;
            }
            Ok(Event::Qmp(QmpEvent::DiskError { .. })) => {}
            Ok(Event::Signal) => {
                end = Some(RunEnd::Interrupted);
                let _ = qmp.quit();
                break;
            }
            Err(_) => {}
        }
    }
    Ok(Waited {
        end,
        console_exit,
        shutdown,
    })
}

/// The run's shares (store, xchg, extras, and --shell's control share), each served on
/// its own socket in `rundir`, with where the guest mounts it.
fn serve_shares(
    spec: &RunSpec,
    rundir: &RuntimeDir,
    xchg: &Path,
    ctl: Option<&Path>,
) -> anyhow::Result<Vec<(ShareServer, String)>> {
    let mut mounts: Vec<(ShareConfig, String)> = Vec::new();
    if let Some(ctl) = ctl {
        let mut ctl_share = ShareConfig::xchg(ctl);
        ctl_share.tag = "vmbuild-ctl".into();
        ctl_share.cache = CacheMode::Never;
        mounts.push((ctl_share, CTL_MOUNT.into()));
    }
    mounts.extend(guest_shares(spec, xchg));
    let mut servers = Vec::new();
    for (share, mount) in mounts {
        let socket = rundir.join(&format!("{}.sock", share.tag));
        let tag = share.tag.clone();
        let server =
            ShareServer::spawn(share, &socket).with_context(|| format!("serving share {tag}"))?;
        servers.push((server, mount));
    }
    Ok(servers)
}

/// The xchg directory of a run or build: the user's, or a temporary one that lives as long
/// as the returned guard (or is kept, and named on stderr, with `keep`). A temporary one
/// left by a vmbuild that was killed is removed by the next (see [`crate::owned_dir`]).
pub(crate) fn xchg_dir(
    given: Option<&Path>,
    keep: bool,
) -> anyhow::Result<(PathBuf, Option<OwnedDir>)> {
    if let Some(dir) = given {
        return Ok((dir.to_owned(), None));
    }
    let tmp = std::env::temp_dir();
    if keep {
        let kept = tempfile::Builder::new()
            .prefix(&format!("{}-", owned_dir::KEPT_XCHG_PREFIX))
            .tempdir_in(&tmp)
            .with_context(|| format!("creating a temporary xchg in {}", tmp.display()))?
            .keep();
        eprintln!("vmbuild: xchg is {}", kept.display());
        return Ok((kept, None));
    }
    let dir = OwnedDir::create(&tmp, owned_dir::XCHG_PREFIX)
        .with_context(|| format!("creating a temporary xchg in {}", tmp.display()))?;
    Ok((dir.path().to_owned(), Some(dir)))
}

/// The kit's initramfs with the run's command as its init's script (stdout and stderr on
/// the second and third serial ports), written into `rundir`.
pub(crate) fn command_initrd(spec: &RunSpec, rundir: &Path) -> anyhow::Result<PathBuf> {
    let script = GuestCommand {
        argv: &spec.argv,
        env: &spec.env,
        cwd: spec.cwd.as_deref(),
        io: CommandIo::SerialPorts,
    }
    .script();
    let files: [(&str, u32, &[u8]); 1] = [(GUEST_SCRIPT_PATH, 0o755, &script)];
    initrd::with_files(&spec.initrd, rundir, &files).context("writing the run's initrd")
}

/// The store, xchg and extra shares of a run, with where the guest mounts each.
pub(crate) fn guest_shares(spec: &RunSpec, xchg: &Path) -> Vec<(ShareConfig, String)> {
    let mut shares = Vec::new();
    if let Some((dir, mount)) = &spec.store {
        shares.push((ShareConfig::store(dir), mount.clone()));
    }
    if !spec.no_xchg {
        let mut share = ShareConfig::xchg(xchg);
        share.writeback = spec.xchg_writeback;
        shares.push((share, "/tmp/xchg".into()));
    }
    for (i, extra) in spec.extra_shares.iter().enumerate() {
        let mut share = if extra.read_only {
            ShareConfig::store(&extra.host)
        } else {
            ShareConfig::xchg(&extra.host)
        };
        share.tag = format!("share{i}");
        shares.push((share, extra.guest.clone()));
    }
    shares
}

fn explain_no_exit(shutdown: Option<&ShutdownReason>, console: &str, qemu_stderr: &str) -> String {
    if console::mentions(console, &ConsoleEvent::KernelPanic)
        || shutdown == Some(&ShutdownReason::GuestPanic)
    {
        return "the guest kernel panicked".into();
    }
    if console::mentions(console, &ConsoleEvent::OutOfMemory) {
        return "the guest ran out of memory (try a larger --memory)".into();
    }
    match shutdown {
        Some(ShutdownReason::GuestReset) => "the guest reset before its command finished".into(),
        Some(ShutdownReason::GuestShutdown) => {
            "the guest powered off before its command finished".into()
        }
        Some(ShutdownReason::Host(r)) => format!("QEMU stopped the guest ({r})"),
        _ if !qemu_stderr.is_empty() => format!("QEMU exited: {qemu_stderr}"),
        _ => "the VM stopped without a reason".into(),
    }
}

fn forward<T: Send + 'static>(
    from: Receiver<T>,
    to: Sender<Event>,
    wrap: impl Fn(T) -> Event + Send + 'static,
) {
    std::thread::spawn(move || {
        for item in from {
            if to.send(wrap(item)).is_err() {
                break;
            }
        }
    });
}

/// Reads the guest console: markers become events, everything else goes to the log (or
/// stderr, prefixed) and to the tail kept for error messages.
fn console_to_user(
    stream: UnixStream,
    log: Option<&Path>,
    tail: ConsoleTail,
    events: Sender<Event>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let log = match log {
        Some(p) => ConsoleLog::ForUser {
            to: Box::new(
                std::fs::File::create(p)
                    .with_context(|| format!("creating the console log {}", p.display()))?,
            ),
            prefix: "",
        },
        None => ConsoleLog::ForUser {
            to: Box::new(std::io::stderr()),
            prefix: "[guest] ",
        },
    };
    Ok(console::spawn_reader(
        "console",
        stream,
        log,
        tail,
        move |ev, at| {
            let _ = events.send(Event::Console(ev, at));
        },
    )?)
}

/// Copies a guest serial port to one of our output streams, byte for byte.
pub(crate) fn spawn_copy(
    mut from: UnixStream,
    mut to: impl Write + Send + 'static,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    Ok(std::thread::Builder::new()
        .name("guest-output".into())
        .spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        let _ = to.flush();
                    }
                }
            }
        })?)
}

/// The sockets QEMU's chardevs connect to.
struct Chardevs {
    qmp: ChardevListener,
    /// ttyS0; `None` with --shell, where the console is the user's terminal.
    console: Option<ChardevListener>,
    /// ttyS1 and ttyS2: the command's stdout and stderr.
    stdout: ChardevListener,
    stderr: ChardevListener,
}

fn qemu_args(
    spec: &RunSpec,
    initrd: &Path,
    disk: Option<&Disk>,
    servers: &[(ShareServer, String)],
    chardevs: &Chardevs,
) -> Vec<String> {
    // qboot instead of SeaBIOS: it does what a direct kernel boot needs (PCI, ACPI tables,
    // PVH entry) and nothing else, which saves ~0.3 s of firmware under TCG. Shared
    // memory: vhost-user back-ends map guest RAM. -no-reboot with the kernel's panic=-1
    // turns a panic into QEMU's exit.
    let mut q = QemuCommand::new(spec.accel.qemu_name(), "q35", spec.memory_mib)
        .cpu(spec.accel.cpu_model())
        .firmware(spec.qemu.firmware("qboot.rom"))
        .no_user_config()
        .no_reboot()
        .cpus(spec.cpus)
        .shared_memory()
        .kernel(Some(&spec.kernel), Some(initrd))
        .monitor(&chardevs.qmp);
    q = match &chardevs.console {
        Some(c) => q.serial_socket("con", c),
        None => q.serial_stdio(),
    };
    q = q
        .serial_socket("out", &chardevs.stdout)
        .serial_socket("err", &chardevs.stderr);
    let mut cmdline = KernelCmdline::command_guest();
    for (i, (server, mount)) in servers.iter().enumerate() {
        q = q.virtiofs(&format!("fs{i}"), server.socket(), server.tag());
        cmdline = cmdline.mount(MountKind::Virtiofs, server.tag(), mount, server.read_only());
    }
    // `run` refuses an in-process link before it gets here.
    if let Some(Nic {
        link: NicLink::Stream(socket),
        mac,
    }) = &spec.nic
    {
        q = q.nic_stream(socket, mac, None).rng();
    }
    if let Some(image) = &spec.image {
        q = q.virtio_drive(image, "raw", true);
        cmdline = cmdline.image("/dev/vda");
    }
    if let Some(disk) = disk {
        q = q.virtio_drive(&disk.path, &disk.format, disk.mode == DiskMode::Snapshot);
    }
    cmdline = if spec.shell {
        cmdline.shell(&format!("{CTL_MOUNT}/status"))
    } else {
        cmdline.command(GUEST_SCRIPT_PATH)
    };
    let cmdline = cmdline.extra(spec.append.as_deref());
    q.append(Some(&cmdline.to_string())).argv()
}

/// A qcow2 overlay over `base` in `dir`, so the base image is never written.
pub fn create_overlay(base: &Path, format: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    let overlay = dir.join("overlay.qcow2");
    let base = std::fs::canonicalize(base)?;
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
        .arg(&base)
        .arg(&overlay)
        .output()
        .context("running qemu-img (install qemu-utils)")?;
    if !out.status.success() {
        anyhow::bail!(
            "qemu-img create failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(overlay)
}
