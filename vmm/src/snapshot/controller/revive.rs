//! A controller revived from a snapshot of its own. Bootstrap boots the controller once:
//! it configures its NIC, logs into the target (which proves the key and the pinned host
//! key), announces `controller-ready` and blocks reading a session from its second serial
//! port; bootstrap suspends it right there. A build revives it (≈0.1 s instead of a ≈1.8 s
//! boot under TCG), writes the session to that port, and the controller runs it exactly
//! as a booted one would. The VM generation id changes at every revive, so the guest
//! kernel reseeds its RNG before the SSH client draws its first random byte.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::{
    classify, session_files, Controller, ControllerEnd, ControllerOutcome, SessionPlan,
    CONTROLLER_MEMORY_MIB,
};
use crate::accel::Accel;
use crate::guest::cmdline::KernelCmdline;
use crate::guest::console::{phase, phase_line, ConsoleTail};
use crate::guest::initrd::{self, GUEST_SCRIPT_PATH};
use crate::qemu::{ChardevListener, QemuBinary, QemuCommand, QemuProcess, Qmp, StateFormat};
use crate::snapshot::manifest::{NetworkPlan, SshPlan};
use crate::snapshot::target::{console_to_events, TargetEvent};
use crate::vm::run::spawn_copy;
use crate::vm::timings::Marks;

/// The controller's memory state and initramfs in a snapshot directory.
pub const CONTROLLER_STATE: &str = "controller-state";
pub const CONTROLLER_INITRD: &str = "controller-initrd.img";

/// The controller VM: console, QMP, and its second and third serial ports (the session's
/// input and stdout, and its stderr) on sockets vmbuild listens on.
pub struct ControllerVm {
    pub qemu: QemuProcess,
    pub qmp: Qmp,
    pub events: Receiver<TargetEvent>,
    pub tail: ConsoleTail,
    pub stdout: UnixStream,
    pub stderr: UnixStream,
    pub spawned: Instant,
}

pub struct ControllerMachine<'a> {
    pub qemu: &'a QemuBinary,
    pub accel: Accel,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub net_socket: &'a Path,
    pub mac: &'a str,
    pub rundir: &'a Path,
    pub console_log: Option<&'a Path>,
}

impl ControllerVm {
    pub fn start(m: &ControllerMachine, incoming: bool) -> anyhow::Result<ControllerVm> {
        let l =
            |name: &str| ChardevListener::bind(m.rundir.join(format!("controller-{name}.sock")));
        let (qmp_l, con_l, out_l, err_l) = (l("qmp")?, l("con")?, l("out")?, l("err")?);
        // SeaBIOS, not qboot: qboot hangs before the kernel when a vmgenid device is
        // present (it cannot process QEMU's ACPI write-pointer command), and vmgenid is
        // what makes every revived controller reseed its RNG. The boot it slows down
        // happens once, at bootstrap.
        let a = QemuCommand::new(m.accel.qemu_name(), "q35", CONTROLLER_MEMORY_MIB)
            .cpu(m.accel.cpu_model())
            .no_user_config()
            .cpus(1)
            .kernel(Some(m.kernel), Some(m.initrd))
            .append(Some(
                &KernelCmdline::command_guest()
                    .command(GUEST_SCRIPT_PATH)
                    .to_string(),
            ))
            .monitor(&qmp_l)
            .serial_socket("con", &con_l)
            .serial_socket("out", &out_l)
            .serial_socket("err", &err_l)
            .nic_stream(m.net_socket, m.mac, None)
            .rng()
            .vmgenid()
            .incoming(incoming)
            .argv();
        tracing::debug!("controller QEMU: {}", a.join(" "));
        let spawned = Instant::now();
        let (mut qemu, s) = QemuProcess::start_connected(
            &m.qemu.path,
            &a,
            &m.rundir.join("controller-qemu.stderr"),
            false,
            &[&qmp_l, &con_l, &out_l, &err_l],
        )?;
        let mut s = s.into_iter();
        let (qmp_s, con, stdout, stderr) = (
            s.next().unwrap(),
            s.next().unwrap(),
            s.next().unwrap(),
            s.next().unwrap(),
        );
        let (tx, events) = std::sync::mpsc::channel();
        let (qmp_tx, qmp_rx) = std::sync::mpsc::channel();
        let forward = tx.clone();
        std::thread::spawn(move || {
            for e in qmp_rx {
                if forward.send(TargetEvent::Qmp(e)).is_err() {
                    break;
                }
            }
        });
        let qmp = qemu.qmp_handshake(qmp_s, qmp_tx)?;
        let tail = ConsoleTail::default();
        console_to_events(con, m.console_log.map(Path::to_owned), tail.clone(), tx)?;
        Ok(ControllerVm {
            qemu,
            qmp,
            events,
            tail,
            stdout,
            stderr,
            spawned,
        })
    }
}

/// The script the bootstrap controller runs (as the kit init's command): log in once
/// (`probe.sh`, the controller script without a session), then wait for a session on
/// ttyS1, which is where bootstrap suspends it.
fn daemon_script() -> String {
    DAEMON_SCRIPT
        .replace("@READY@", &phase_line(phase::CONTROLLER_READY))
        .replace("@RESEEDED@", &phase_line(phase::RESEEDED))
}

const DAEMON_SCRIPT: &str = r#"# vmbuild controller, bootstrap: prove the login, then wait for a session
# Keep both ports open from here on: closing a serial port's last descriptor shuts the
# UART down, and reopening it clears its FIFO, which could eat a session written just
# after the revive.
exec 4<>/dev/ttyS1 5<>/dev/ttyS2
stty raw -echo <&4 2>/dev/null
stty raw -echo <&5 2>/dev/null
sh /etc/vmbuild/probe.sh </dev/null >&4 2>&5 || exit $?
# Every build is a fork of this moment: its VM generation ID changes at the revive and the
# kernel reseeds its RNG ("crng reseeded due to virtual machine fork"). That happens
# asynchronously; the SSH client must not draw randomness before it.
forks() { n=$(dmesg 2>/dev/null | grep -c 'crng reseeded due to virtual machine fork'); echo "${n:-0}"; }
seen=$(forks)
echo @READY@ >/dev/console
# Suspended here; a build revives it and writes one line: its session, base64.
read -r session <&4
i=0
while [ "$(forks)" -le "$seen" ]; do
	i=$((i + 1))
	if [ "$i" -gt 40 ]; then
		echo "vmbuild controller: no RNG reseed seen after the revive (VM generation ID); carrying on" >&5
		break
	fi
	sleep 0.05
done
echo @RESEEDED@ >/dev/console
echo "$session" | base64 -d >/tmp/session.cpio && (cd / && cpio -idmu </tmp/session.cpio 2>/dev/null)
exec sh /etc/vmbuild/controller.sh </dev/null >&4 2>&5 4>&- 5>&-
"#;

/// Boots the controller for a snapshot, lets it log into the running target, and
/// suspends it to `dir/CONTROLLER_STATE`; gives up with `target_stopped`'s reason once it
/// has one. `parts` are the kit's initramfs and the controller archive; the assembled
/// initramfs is kept as `dir/CONTROLLER_INITRD`.
#[allow(clippy::too_many_arguments)]
pub fn bootstrap_controller(
    machine: &ControllerMachine,
    parts: &[&Path],
    dir: &Path,
    network: &NetworkPlan,
    ssh: &SshPlan,
    ssh_wait: Duration,
    signals: &Receiver<()>,
    format: StateFormat,
    target_stopped: &dyn Fn() -> Option<String>,
) -> anyhow::Result<Result<Marks, ControllerEnd>> {
    let known_hosts = format!("{} {}\n", network.target_ip, ssh.host_key);
    let probe = super::controller_script(&SessionPlan {
        network,
        ssh,
        kernel: Path::new(""),
        initrd_parts: Vec::new(),
        net_socket: Path::new(""),
        target_script: None,
        ssh_wait,
        rundir: Path::new(""),
        console_log: PathBuf::new(),
    });
    let daemon = daemon_script();
    let files: Vec<(&str, u32, &[u8])> = vec![
        ("/root/.ssh", libc::S_IFDIR | 0o700, b""),
        (
            "/root/.ssh/known_hosts",
            libc::S_IFREG | 0o600,
            known_hosts.as_bytes(),
        ),
        (
            "/etc/vmbuild/probe.sh",
            libc::S_IFREG | 0o755,
            probe.as_bytes(),
        ),
        (GUEST_SCRIPT_PATH, libc::S_IFREG | 0o755, daemon.as_bytes()),
    ];
    let initrd_path = dir.join(CONTROLLER_INITRD);
    initrd::assemble(parts, &initrd::newc_archive(&files), &initrd_path)?;

    let mut vm = ControllerVm::start(
        &ControllerMachine {
            initrd: &initrd_path,
            ..*machine
        },
        false,
    )?;
    let mut marks = Marks {
        start: Some(vm.spawned),
        ..Marks::default()
    };
    let deadline = Instant::now() + ssh_wait + Duration::from_secs(120);
    let mut status = None;
    loop {
        if signals.try_recv().is_ok() {
            return Ok(Err(ControllerEnd::Interrupted));
        }
        // A target QEMU paused (its disk full) would never answer: say why at once.
        if let Some(why) = target_stopped() {
            bail!(why);
        }
        match vm.events.recv_timeout(Duration::from_millis(20)) {
            Ok(TargetEvent::Phase(p, at)) => {
                let ready = p == phase::CONTROLLER_READY;
                marks.phases.push((p, at));
                if ready {
                    break;
                }
            }
            Ok(TargetEvent::Exit(n, _)) => status = Some(n),
            _ => {}
        }
        if vm.qemu.try_wait()?.is_some() {
            // Drain what arrived just before the end.
            std::thread::sleep(Duration::from_millis(100));
            while let Ok(ev) = vm.events.try_recv() {
                match ev {
                    TargetEvent::Phase(p, at) => marks.phases.push((p, at)),
                    TargetEvent::Exit(n, _) => status = Some(n),
                    _ => {}
                }
            }
            let mut err = String::new();
            let _ = vm.stderr.set_read_timeout(Some(Duration::from_millis(100)));
            let _ = vm.stderr.read_to_string(&mut err);
            return Ok(Err(match status {
                Some(1) | None => ControllerEnd::Died {
                    why: format!("the controller stopped before it was ready: {}", err.trim()),
                    console_tail: vm.tail.text(),
                },
                Some(code) => classify(code, &marks),
            }));
        }
        if Instant::now() > deadline {
            bail!(
                "the controller was not ready within {:?}",
                deadline - marks.start.unwrap()
            );
        }
    }
    let state = dir.join(CONTROLLER_STATE);
    let saved = vm
        .qmp
        .suspend_to_file(&state, format, Duration::from_secs(120));
    saved
        .map_err(|e| vm.qemu.explain(e, "QEMU stopped"))
        .map_err(|e| crate::qemu::migration::save_failed(e, &state))
        .context("suspending the controller")?;
    let _ = vm.qmp.quit();
    if vm.qemu.wait_timeout(Duration::from_secs(5))?.is_none() {
        vm.qemu.kill();
    }
    Ok(Ok(marks))
}

/// The controller of a snapshot that has one suspended.
pub struct RevivedController {
    pub qemu: QemuBinary,
    pub accel: Accel,
    pub state: PathBuf,
    pub initrd: PathBuf,
    /// The target's format kept to one file (`StateFormat::single_file`).
    pub format: StateFormat,
}

impl Controller for RevivedController {
    fn kind(&self) -> &'static str {
        "revive"
    }

    fn run_session(
        &self,
        plan: &SessionPlan,
        stop: Receiver<()>,
    ) -> anyhow::Result<ControllerOutcome> {
        let mut vm = ControllerVm::start(
            &ControllerMachine {
                qemu: &self.qemu,
                accel: self.accel,
                kernel: plan.kernel,
                initrd: &self.initrd,
                net_socket: plan.net_socket,
                mac: &plan.network.controller_mac,
                rundir: plan.rundir,
                console_log: Some(&plan.console_log),
            },
            true,
        )?;
        let mut marks = Marks {
            start: Some(vm.spawned),
            ..Marks::default()
        };
        let revived = vm
            .qmp
            .revive_from_file(&self.state, self.format, Duration::from_secs(60));
        revived
            .map_err(|e| vm.qemu.explain(e, "QEMU stopped"))
            .context("reviving the controller")?;
        marks.vmm_ready = Some(Instant::now());
        tracing::debug!("build: the controller runs again; handing it the session");
        // The session, as one line on the port the controller waits on. An emulated UART
        // is slow, but never this slow: a stuck controller must not hold the build.
        let mut line = base64(&session_files(plan));
        line.push('\n');
        vm.stdout.set_write_timeout(Some(Duration::from_secs(60)))?;
        let handed = vm.stdout.write_all(line.as_bytes());
        handed
            .map_err(|e| vm.qemu.explain(e.into(), "QEMU stopped"))
            .context("handing the session to the controller")?;
        vm.stdout.set_write_timeout(None)?;
        let out = spawn_copy(vm.stdout.try_clone()?, std::io::stdout())?;
        let err = spawn_copy(vm.stderr.try_clone()?, std::io::stderr())?;

        let mut status = None;
        let mut interrupted: Option<Instant> = None;
        loop {
            if vm.qemu.try_wait()?.is_some() {
                break;
            }
            // A message or a closed channel: the build is over, stop.
            if interrupted.is_none() && !matches!(stop.try_recv(), Err(TryRecvError::Empty)) {
                interrupted = Some(Instant::now());
                let _ = vm.qmp.quit();
            }
            if interrupted.is_some_and(|at| at.elapsed() > Duration::from_secs(3)) {
                vm.qemu.kill();
                break;
            }
            match vm.events.recv_timeout(Duration::from_millis(10)) {
                Ok(TargetEvent::Phase(p, at)) => marks.phases.push((p, at)),
                Ok(TargetEvent::Exit(n, _)) => {
                    // The session's output is out of the guest: its serial ports drained
                    // when the script closed them, before init printed the status. No
                    // need to wait for a clean power-off of a VM that is thrown away.
                    status = Some(n);
                    let _ = vm.qmp.quit();
                }
                _ => {}
            }
        }
        marks.exited = Some(Instant::now());
        let _ = out.join();
        let _ = err.join();
        while let Ok(ev) = vm.events.try_recv() {
            match ev {
                TargetEvent::Phase(p, at) => marks.phases.push((p, at)),
                TargetEvent::Exit(n, _) => status = Some(n),
                _ => {}
            }
        }
        let end = if interrupted.is_some() {
            ControllerEnd::Interrupted
        } else {
            match status {
                Some(code) => classify(code, &marks),
                None => ControllerEnd::Died {
                    why: match (vm.qemu.stderr(), vm.qemu.exit_status()) {
                        (e, Some(status)) if e.is_empty() => {
                            format!("its QEMU ended ({status})")
                        }
                        (e, _) if e.is_empty() => "the controller VM stopped".into(),
                        (e, _) => format!("the controller's QEMU exited: {e}"),
                    },
                    console_tail: vm.tail.text(),
                },
            }
        };
        Ok(ControllerOutcome { end, marks })
    }
}

pub(super) fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    /// The daemon announces its phases with the markers the host waits for.
    #[test]
    fn the_daemon_script_prints_the_markers() {
        let script = super::daemon_script();
        assert!(!script.contains('@'));
        assert!(script.contains("\necho vmbuild-phase=controller-ready >/dev/console\n"));
        assert!(script.contains("\necho vmbuild-phase=reseeded >/dev/console\n"));
    }

    /// The encoding the guest's busybox decodes: checked against base64(1).
    #[test]
    fn base64_matches_coreutils() {
        for data in [
            &b""[..],
            b"a",
            b"ab",
            b"abc",
            b"abcd",
            &[0xff, 0x00, 0x80, 0x7f, 0x01],
        ] {
            let mut child = std::process::Command::new("base64")
                .arg("-w0")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            child.stdin.take().unwrap().write_all(data).unwrap();
            let out = child.wait_with_output().unwrap();
            assert_eq!(super::base64(data), String::from_utf8(out.stdout).unwrap());
        }
    }
}
