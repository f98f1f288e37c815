//! The controller: a minimal Linux guest (the guest kit's kernel and initramfs, plus
//! Debian's SSH client) whose only job is the SSH side of a build. It brings up its NIC on
//! the build's private segment, waits for the target's SSH port, logs in with the
//! snapshot's key while refusing any host key but the pinned one (the handshake), hands
//! the target its session script, and runs it, relaying its output and exit status.
//!
//! [`Controller`] is the interface a build uses, so that other kinds (the embedded KVM
//! VMM's guest, an in-process SSH endpoint) can replace [`QemuController`] later.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use anyhow::Context;

use crate::accel::Accel;
use crate::qemu::QemuBinary;
use crate::snapshot::manifest::{NetworkPlan, SshPlan};
use crate::workflow::initrd;
use crate::workflow::run::{self, Nic, RunEnd, RunSpec};
use crate::workflow::timings::Marks;

/// Statuses of the controller script that are about the SSH side, not the command; each
/// comes with a console marker, so a command that exits with the same number is not
/// mistaken for them.
const HOST_KEY_CHANGED: i32 = 119;
const TARGET_UNREACHABLE: i32 = 122;
const HANDSHAKE_FAILED: i32 = 126;

/// Where the controller's files live in its initramfs.
pub const CLIENT_KEY_GUEST: &str = "/etc/vmbuild/ssh/id";
const SESSION_SCRIPT_GUEST: &str = "/etc/vmbuild/session.sh";
const CONTROLLER_SCRIPT_GUEST: &str = "/etc/vmbuild/controller.sh";

/// What one controller session does.
pub struct SessionPlan<'a> {
    pub network: &'a NetworkPlan,
    pub ssh: &'a SshPlan,
    pub kernel: &'a Path,
    /// The guest kit's initramfs and the archive with the SSH client and key
    /// (`controller.cpio` in a snapshot), concatenated.
    pub initrd_parts: Vec<&'a Path>,
    /// The stream port of the build's switch.
    pub net_socket: &'a Path,
    /// Run in the target after the handshake; `None` only logs in (bootstrap).
    pub target_script: Option<Vec<u8>>,
    /// How long the target's SSH port may take to answer.
    pub ssh_wait: Duration,
    pub rundir: &'a Path,
    /// The controller's console goes here.
    pub console_log: PathBuf,
}

#[derive(Debug)]
pub enum ControllerEnd {
    /// The session ran; the status of the remote command as the SSH client saw it.
    Finished(i32),
    HostKeyChanged,
    TargetUnreachable,
    HandshakeFailed,
    Interrupted,
    /// The controller stopped without finishing its session.
    Died {
        why: String,
        console_tail: String,
    },
}

pub struct ControllerOutcome {
    pub end: ControllerEnd,
    /// `controller-up`, `port-open` and `session-end` phases among them.
    pub marks: Marks,
}

pub trait Controller: Send + Sync {
    /// "qemu", later "embedded".
    fn kind(&self) -> &'static str;
    /// Boots a fresh controller, runs the session, and tears the controller down. A
    /// message on `stop` ends it early ([`ControllerEnd::Interrupted`]).
    fn run_session(
        &self,
        plan: &SessionPlan,
        stop: Receiver<()>,
    ) -> anyhow::Result<ControllerOutcome>;
}

/// The controller as a QEMU guest (TCG or KVM, as the host allows), run through the same
/// machinery as `vmbuild run`.
pub struct QemuController {
    pub qemu: QemuBinary,
    pub accel: Accel,
}

/// The controller needs little: busybox, dbclient, page cache for nothing.
const CONTROLLER_MEMORY_MIB: u32 = 160;

impl Controller for QemuController {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn run_session(
        &self,
        plan: &SessionPlan,
        stop: Receiver<()>,
    ) -> anyhow::Result<ControllerOutcome> {
        let known_hosts = format!("{} {}\n", plan.network.target_ip, plan.ssh.host_key);
        let script = controller_script(plan);
        let mut files: Vec<(&str, u32, &[u8])> = vec![
            ("/root/.ssh", libc::S_IFDIR | 0o700, b""),
            (
                "/root/.ssh/known_hosts",
                libc::S_IFREG | 0o600,
                known_hosts.as_bytes(),
            ),
            (
                CONTROLLER_SCRIPT_GUEST,
                libc::S_IFREG | 0o755,
                script.as_bytes(),
            ),
        ];
        if let Some(s) = &plan.target_script {
            files.push((SESSION_SCRIPT_GUEST, libc::S_IFREG | 0o644, s));
        }
        let initrd_path = plan.rundir.join("controller-initrd.img");
        initrd::assemble(
            &plan.initrd_parts,
            &initrd::newc_archive(&files),
            &initrd_path,
        )
        .context("writing the controller's initramfs")?;
        let spec = RunSpec {
            qemu: self.qemu.clone(),
            accel: self.accel,
            kernel: plan.kernel.to_owned(),
            initrd: initrd_path,
            append: None,
            memory_mib: CONTROLLER_MEMORY_MIB,
            cpus: 1,
            argv: vec![
                OsString::from("/bin/sh"),
                OsString::from(CONTROLLER_SCRIPT_GUEST),
            ],
            shell: false,
            env: Vec::new(),
            cwd: None,
            store: None,
            xchg: None,
            keep_xchg: false,
            no_xchg: true,
            nic: Some(Nic {
                socket: plan.net_socket.to_owned(),
                mac: plan.network.controller_mac.clone(),
            }),
            extra_shares: Vec::new(),
            disk: None,
            timeout: None,
            log: Some(plan.console_log.clone()),
        };
        let outcome = run::run(&spec, stop)?;
        let end = match outcome.end {
            RunEnd::Exited(HOST_KEY_CHANGED) if outcome.marks.phase("ssh-hostkey").is_some() => {
                ControllerEnd::HostKeyChanged
            }
            RunEnd::Exited(TARGET_UNREACHABLE)
                if outcome.marks.phase("ssh-unreachable").is_some() =>
            {
                ControllerEnd::TargetUnreachable
            }
            RunEnd::Exited(HANDSHAKE_FAILED) if outcome.marks.phase("ssh-refused").is_some() => {
                ControllerEnd::HandshakeFailed
            }
            RunEnd::Exited(code) => ControllerEnd::Finished(code),
            RunEnd::Interrupted | RunEnd::TimedOut(_) => ControllerEnd::Interrupted,
            RunEnd::NoExitCode { why, console_tail } => ControllerEnd::Died { why, console_tail },
        };
        Ok(ControllerOutcome {
            end,
            marks: outcome.marks,
        })
    }
}

/// The controller's shell script (busybox sh). Its stdout and stderr are the build's.
///
/// One SSH session does both the handshake and the command (an ed25519 login costs
/// ~1.5 s of emulated CPU under TCG): the session script travels on the session's stdin
/// and the remote side runs it once it has arrived. Before that, the target's port is
/// probed with plain TCP until its SSH banner answers, so that connection failures are
/// never confused with the command's own stderr. dbclient's stderr is copied to a file
/// as it streams, so that a host key mismatch or a refused login can be recognised.
fn controller_script(plan: &SessionPlan) -> String {
    let n = plan.network;
    let target = format!("{}@{}", plan.ssh.user, n.target_ip);
    let ssh = format!(
        "dbclient -T -i {CLIENT_KEY_GUEST} -p {port} {target}",
        port = n.ssh_port
    );
    let session = match plan.target_script {
        Some(_) => format!(
            "{ssh} 'cat >/tmp/vmbuild-session.sh && exec sh /tmp/vmbuild-session.sh </dev/null' <{SESSION_SCRIPT_GUEST}"
        ),
        None => format!("{ssh} 'echo vmbuild-phase=handshake >/dev/console' </dev/null"),
    };
    format!(
        r#"# vmbuild controller (generated)
say() {{ echo "vmbuild controller: $*" >&2; }}
mark() {{ echo "vmbuild-phase=$1" >/dev/console; }}
if ! ip addr add {ip}/{prefix} dev eth0 || ! ip link set eth0 up; then
	say "cannot configure eth0"
	exit 125
fi
mark controller-up
deadline=$(($(date +%s) + {wait}))
while :; do
	banner=$(timeout 3 nc {ip_t} {port} </dev/null 2>/dev/null | head -c 4)
	[ "$banner" = SSH- ] && break
	if [ "$(date +%s)" -ge "$deadline" ]; then
		mark ssh-unreachable
		say "the target's SSH port {ip_t}:{port} did not answer within {wait} s"
		exit {TARGET_UNREACHABLE}
	fi
	sleep 0.05
done
mark port-open
mkfifo /tmp/ssh.fifo
tee /tmp/ssh.err </tmp/ssh.fifo >&2 &
{session} 2>/tmp/ssh.fifo
status=$?
wait
mark session-end
if [ "$status" -ne 0 ]; then
	if grep -qi "host key mismatch" /tmp/ssh.err; then
		mark ssh-hostkey
		exit {HOST_KEY_CHANGED}
	fi
	if grep -q -e "No auth methods could be used" -e "Permission denied" -e "Exited: Disconnect received" /tmp/ssh.err; then
		mark ssh-refused
		exit {HANDSHAKE_FAILED}
	fi
fi
exit $status
"#,
        ip = n.controller_ip,
        prefix = n.prefix_len,
        ip_t = n.target_ip,
        port = n.ssh_port,
        wait = plan.ssh_wait.as_secs().max(1),
    )
}
