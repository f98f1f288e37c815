//! The target VM under QEMU: started fresh at bootstrap or with `-incoming defer` for a
//! revive, always from the same `MachinePlan` so that the revived machine is the one that
//! was suspended. Its NIC is a `-netdev stream` port of the build's private switch (a
//! vhost-user NIC would block migration), its console a socket whose marker lines
//! (`vmbuild-phase=…`, `vmbuild-exit=N`) become events, and the shares are hot-plugged
//! after the revive.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use serde_json::json;

use crate::guest::console::{self, ConsoleEvent, ConsoleLog, ConsoleTail};
use crate::qemu::{ChardevListener, QemuBinary, QemuCommand, QemuProcess, Qmp, QmpEvent};
use crate::snapshot::manifest::{MachinePlan, NetworkPlan, UefiPlan};
use crate::snapshot::profile::windows::install_run::TPM_DIR;
use crate::snapshot::profile::windows::machine::{Firmware, WindowsMachine, WindowsPlacement};
use crate::snapshot::profile::windows::tpm::Swtpm;

/// What the target reports.
#[derive(Debug)]
pub enum TargetEvent {
    /// `vmbuild-phase=NAME` on the console.
    Phase(String, Instant),
    /// `vmbuild-exit=N` on the console: the command's status.
    Exit(i32, Instant),
    Qmp(QmpEvent),
}

/// Where this instance of the machine keeps what differs between instances.
pub struct Placement<'a> {
    /// The snapshot directory (kernel, initrd).
    pub snapshot_dir: &'a Path,
    /// The disk QEMU opens read-write (the snapshot's at bootstrap, an overlay in a build).
    pub disk: &'a Path,
    /// The switch's stream port.
    pub net_socket: &'a Path,
    /// Sockets and QEMU's stderr go here.
    pub rundir: &'a Path,
    /// Console lines are appended here as well (bootstrap keeps them for diagnosis).
    pub console_log: Option<PathBuf>,
}

pub struct TargetVm {
    pub qemu: QemuProcess,
    pub qmp: Qmp,
    pub events: Receiver<TargetEvent>,
    tail: ConsoleTail,
    /// The time QEMU was spawned.
    pub spawned: Instant,
    /// Set when QEMU paused the guest because its disk could not be written on the host.
    disk_stopped: Arc<Mutex<Option<String>>>,
    disk: PathBuf,
    /// Windows 11's TPM; declared last, so it stops after QEMU.
    _tpm: Option<Swtpm>,
}

/// The QEMU options that make the machine: identical for bootstrap and every revive.
pub fn machine_args(plan: &MachinePlan, net: &NetworkPlan, at: &Placement) -> Vec<String> {
    let uefi = UefiInstance {
        vars: PathBuf::from("$UEFI_VARS"),
        tpm_socket: plan
            .uefi
            .as_ref()
            .is_some_and(|u| u.tpm)
            .then(|| PathBuf::from("$TPM_SOCKET")),
    };
    machine(plan, net, at, Some(&uefi)).argv()
}

/// A UEFI machine's own files: its copy of the variables and its TPM's socket.
struct UefiInstance {
    vars: PathBuf,
    tpm_socket: Option<PathBuf>,
}

/// What a UEFI target needs beside QEMU: at bootstrap the snapshot's own variables and
/// TPM state (the installed system's), at a revive a copy of the variables (QEMU writes
/// them) and a TPM with an empty state, which QEMU fills from the memory state.
fn uefi_instance(
    uefi: &UefiPlan,
    at: &Placement,
    incoming: bool,
) -> anyhow::Result<(UefiInstance, Option<Swtpm>)> {
    let vars = if incoming {
        let copy = at.rundir.join(&uefi.vars);
        std::fs::copy(at.snapshot_dir.join(&uefi.vars), &copy).with_context(|| {
            format!("copying the target's UEFI variables to {}", copy.display())
        })?;
        copy
    } else {
        at.snapshot_dir.join(&uefi.vars)
    };
    // A revive's TPM starts empty; the booted target's is the installed system's.
    let tpm_state = match incoming {
        true => at.rundir.join(TPM_DIR),
        false => at.snapshot_dir.join(TPM_DIR),
    };
    let tpm = match uefi.tpm {
        true => Some(Swtpm::start(&tpm_state, &at.rundir.join("tpm.sock"))?),
        false => None,
    };
    let tpm_socket = tpm.as_ref().map(|t| t.socket.clone());
    Ok((UefiInstance { vars, tpm_socket }, tpm))
}

/// The target's machine, as the snapshot records it: the same at bootstrap and at every
/// revive (its devices in the same PCI slots). Shared memory: the virtio-fs back-ends
/// plugged in after a revive map guest RAM. A new VM generation id on every start, so
/// builds revived from one snapshot do not share random streams (SSH session keys among
/// them).
fn machine(
    plan: &MachinePlan,
    net: &NetworkPlan,
    at: &Placement,
    uefi: Option<&UefiInstance>,
) -> QemuCommand {
    let file = |name: &Option<String>| name.as_ref().map(|n| at.snapshot_dir.join(n));
    let (kernel, initrd) = (file(&plan.kernel), file(&plan.initrd));
    if let (Some(plan_uefi), Some(instance)) = (&plan.uefi, uefi) {
        // The windows-cygwin machine; a kernel only for the tests' stand-in target.
        let windows = WindowsMachine {
            accel: plan.accel.clone(),
            machine_type: plan.machine.clone(),
            memory_mib: plan.memory_mib,
            cpus: plan.cpus,
            mac: net.target_mac.clone(),
        };
        let firmware = Firmware {
            code: PathBuf::from(&plan_uefi.firmware),
            vars_template: PathBuf::new(),
            secure_boot: plan_uefi.secure_boot,
        };
        return windows
            .command(
                &firmware,
                &WindowsPlacement {
                    disk: at.disk,
                    vars: &instance.vars,
                    net_socket: at.net_socket,
                    ready_socket: None,
                    tpm_socket: instance.tpm_socket.as_deref(),
                    install: None,
                },
            )
            .kernel(kernel.as_deref(), initrd.as_deref())
            .append(plan.append.as_deref());
    }
    QemuCommand::new(&plan.accel, &plan.machine, plan.memory_mib)
        .cpu(plan.cpu.as_deref())
        .no_user_config()
        .cpus(plan.cpus)
        .shared_memory()
        .kernel(kernel.as_deref(), initrd.as_deref())
        .append(plan.append.as_deref())
        .target_disk(at.disk)
        .nic_stream(at.net_socket, &net.target_mac, Some("nic0"))
        .vmgenid()
}

impl TargetVm {
    /// Starts the machine; with `incoming` it waits for [`TargetVm::revive`].
    pub fn start(
        qemu_bin: &QemuBinary,
        plan: &MachinePlan,
        net: &NetworkPlan,
        at: &Placement,
        incoming: bool,
    ) -> anyhow::Result<TargetVm> {
        let qmp_l = ChardevListener::bind(at.rundir.join("target-qmp.sock"))?;
        let con_l = ChardevListener::bind(at.rundir.join("target-con.sock"))?;
        let (uefi, tpm) = match &plan.uefi {
            Some(u) => {
                let (instance, tpm) = uefi_instance(u, at, incoming)?;
                (Some(instance), tpm)
            }
            None => (None, None),
        };
        // The console is the first serial port: the Linux targets' /dev/console, the
        // Windows target's COM1 (Cygwin's /dev/ttyS0).
        let args = machine(plan, net, at, uefi.as_ref())
            .monitor(&qmp_l)
            .serial_socket("con", &con_l)
            .incoming(incoming)
            .argv();
        tracing::debug!("target QEMU: {}", args.join(" "));
        let spawned = Instant::now();
        let (mut qemu, qmp_s, console) = QemuProcess::start_with_qmp_and_console(
            &qemu_bin.path,
            &args,
            &at.rundir.join("target-qemu.stderr"),
            &qmp_l,
            &con_l,
        )?;
        let (tx, events) = mpsc::channel();
        let (qmp_tx, qmp_rx) = mpsc::channel();
        let forward_tx = tx.clone();
        let disk_stopped = Arc::new(Mutex::new(None));
        let stopped = disk_stopped.clone();
        std::thread::spawn(move || {
            for e in qmp_rx {
                if let QmpEvent::DiskError {
                    stopped: true,
                    reason,
                } = &e
                {
                    let mut s = stopped.lock().unwrap_or_else(|p| p.into_inner());
                    s.get_or_insert_with(|| reason.clone());
                }
                if forward_tx.send(TargetEvent::Qmp(e)).is_err() {
                    break;
                }
            }
        });
        let qmp = qemu.qmp_handshake(qmp_s, qmp_tx)?;
        let tail = ConsoleTail::default();
        console_to_events(console, at.console_log.clone(), tail.clone(), tx)?;
        Ok(TargetVm {
            qemu,
            qmp,
            events,
            tail,
            spawned,
            disk_stopped,
            disk: at.disk.to_owned(),
            _tpm: tpm,
        })
    }

    /// Why the guest is paused for good, if QEMU paused it because its disk could not be
    /// written on the host (a full file system: QEMU stops the guest on ENOSPC rather than
    /// fail its writes, and it would wait forever).
    pub fn disk_stopped(&self) -> Option<String> {
        let reason = self
            .disk_stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        Some(format!(
            "QEMU stopped the target: its disk {} could not be written on the host ({reason})",
            self.disk.display()
        ))
    }

    /// Why the target will never answer: QEMU paused it for its disk, or QEMU exited
    /// (the guest powered off or crashed), with the console's last lines.
    pub fn stopped(&self) -> Option<String> {
        if let Some(why) = self.disk_stopped() {
            return Some(why);
        }
        self.qemu.has_exited().then(|| {
            format!(
                "the target's QEMU exited (the guest powered off or QEMU failed: {}); its console ended with:\n{}",
                self.qemu.stderr().trim(),
                self.console_tail()
            )
        })
    }

    /// The last console lines, for error messages.
    pub fn console_tail(&self) -> String {
        self.tail.text()
    }

    /// Plugs a vhost-user-fs device for the share served on `socket` into the running
    /// machine (ACPI PCI hot-plug; on q35 into the empty root port `slot`); the guest sees
    /// it a moment later.
    pub fn attach_share(
        &mut self,
        id: &str,
        socket: &Path,
        tag: &str,
        slot: Option<&str>,
    ) -> anyhow::Result<()> {
        let mut device = json!({
            "driver": "vhost-user-fs-pci",
            "id": id,
            "chardev": format!("{id}-chr"),
            "tag": tag,
            "queue-size": 1024
        });
        if let Some(slot) = slot {
            device["bus"] = json!(slot);
        }
        self.qmp
            .execute(
                "chardev-add",
                json!({
                    "id": format!("{id}-chr"),
                    "backend": { "type": "socket", "data": {
                        "addr": { "type": "unix", "data": { "path": socket.display().to_string() } },
                        "server": false
                    } }
                }),
            )
            .with_context(|| format!("connecting QEMU to the share {tag}"))?;
        self.qmp
            .execute("device_add", device)
            .with_context(|| format!("plugging the share {tag} into the target"))?;
        Ok(())
    }
}

/// Reads a guest console: markers become events, the other lines go to the tail (and
/// every line to `log`, appended).
pub fn console_to_events(
    stream: UnixStream,
    log: Option<PathBuf>,
    tail: ConsoleTail,
    events: Sender<TargetEvent>,
) -> anyhow::Result<()> {
    let log = match log {
        Some(p) => ConsoleLog::Transcript(Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .with_context(|| format!("opening {}", p.display()))?,
        )),
        None => ConsoleLog::None,
    };
    console::spawn_reader("target-console", stream, log, tail, move |ev, at| {
        let ev = match ev {
            ConsoleEvent::Phase(p) => TargetEvent::Phase(p, at),
            ConsoleEvent::Exit(Some(n)) => TargetEvent::Exit(n, at),
            _ => return,
        };
        let _ = events.send(ev);
    })?;
    Ok(())
}
