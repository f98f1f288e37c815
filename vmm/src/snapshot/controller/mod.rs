//! The controller: a minimal Linux guest (the guest kit's kernel and initramfs, plus
//! Debian's SSH client) whose only job is the SSH side of a build. It brings up its NIC on
//! the build's private segment, waits for the target's SSH port, logs in with the
//! snapshot's key while refusing any host key but the pinned one (the handshake), hands
//! the target its session script, and runs it, relaying its output and exit status.
//!
//! [`Controller`] is the interface a build uses. [`BootedController`] boots a fresh
//! controller for every session, under QEMU or in the embedded KVM VMM;
//! [`RevivedController`] revives (QEMU) one that bootstrap suspended right after its first
//! login, which under TCG saves the ~1.8 s boot; [`EmbeddedRevivedController`] restores
//! the embedded VMM's snapshot of the same moment, in milliseconds.

mod boot;
pub mod embedded;
pub mod revive;

pub use boot::{BootVmm, BootedController};
pub use embedded::{EmbeddedRevivedController, EMBEDDED_CONTROLLER_DIR};
pub use revive::{ControllerVm, RevivedController, CONTROLLER_INITRD, CONTROLLER_STATE};

use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use crate::guest::console::{phase, phase_line, PHASE_MARKER};
use crate::guest::initrd;
use crate::snapshot::manifest::{NetworkPlan, SshPlan};
use crate::vm::timings::Marks;

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
    /// The `--controller` value that picks this kind: "revive", "boot", "embedded" (the
    /// embedded VMM's controller snapshot) or "embedded-boot".
    fn kind(&self) -> &'static str;
    /// Whether it is revived from a snapshot (then its revive and reseed are timed).
    fn revived(&self) -> bool {
        matches!(self.kind(), "revive" | "embedded")
    }
    /// Boots a fresh controller, runs the session, and tears the controller down. A
    /// message on `stop` ends it early ([`ControllerEnd::Interrupted`]).
    fn run_session(
        &self,
        plan: &SessionPlan,
        stop: Receiver<()>,
    ) -> anyhow::Result<ControllerOutcome>;
}

/// The controller needs little: busybox, dbclient, page cache for nothing.
pub const CONTROLLER_MEMORY_MIB: u32 = 160;

/// A session's files for the controller, as a newc archive: the pinned host key, the
/// controller script and the script the target runs.
fn session_files(plan: &SessionPlan) -> Vec<u8> {
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
    initrd::newc_archive(&files)
}

/// What the controller script's exit status and markers say.
fn classify(status: i32, marks: &Marks) -> ControllerEnd {
    match status {
        HOST_KEY_CHANGED if marks.phase(phase::SSH_HOSTKEY).is_some() => {
            ControllerEnd::HostKeyChanged
        }
        TARGET_UNREACHABLE if marks.phase(phase::SSH_UNREACHABLE).is_some() => {
            ControllerEnd::TargetUnreachable
        }
        HANDSHAKE_FAILED if marks.phase(phase::SSH_REFUSED).is_some() => {
            ControllerEnd::HandshakeFailed
        }
        code => ControllerEnd::Finished(code),
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
        None => format!(
            "{ssh} 'echo {handshake} >{console}' </dev/null",
            handshake = phase_line(phase::HANDSHAKE),
            console = plan.ssh.console_device
        ),
    };
    format!(
        r#"# vmbuild controller (generated)
say() {{ echo "vmbuild controller: $*" >&2; }}
mark() {{ echo "{PHASE_MARKER}$1" >/dev/console; }}
# A revived controller has its link up and configured already: a shell builtin tells,
# where three `ip` processes would cost ~0.1 s under TCG.
state=
read -r state </sys/class/net/eth0/operstate 2>/dev/null
if [ "$state" != up ] && [ "$state" != unknown ]; then
	ip addr add {ip}/{prefix} dev eth0 2>/dev/null
	if ! ip link set eth0 up || ! ip addr show dev eth0 | grep -q "inet {ip}/"; then
		say "cannot configure eth0"
		exit 125
	fi
fi
mark {controller_up}
deadline=$(($(date +%s) + {wait}))
while :; do
	banner=$(timeout 3 nc {ip_t} {port} </dev/null 2>/dev/null | head -c 4)
	[ "$banner" = SSH- ] && break
	if [ "$(date +%s)" -ge "$deadline" ]; then
		mark {ssh_unreachable}
		say "the target's SSH port {ip_t}:{port} did not answer within {wait} s"
		exit {TARGET_UNREACHABLE}
	fi
	sleep 0.05
done
mark {port_open}
rm -f /tmp/ssh.fifo
mkfifo /tmp/ssh.fifo
tee /tmp/ssh.err </tmp/ssh.fifo >&2 &
{session} 2>/tmp/ssh.fifo
status=$?
wait
mark {session_end}
if [ "$status" -ne 0 ]; then
	if grep -qi "host key mismatch" /tmp/ssh.err; then
		mark {ssh_hostkey}
		exit {HOST_KEY_CHANGED}
	fi
	if grep -q -e "No auth methods could be used" -e "Permission denied" -e "Exited: Disconnect received" /tmp/ssh.err; then
		mark {ssh_refused}
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
        controller_up = phase::CONTROLLER_UP,
        ssh_unreachable = phase::SSH_UNREACHABLE,
        port_open = phase::PORT_OPEN,
        session_end = phase::SESSION_END,
        ssh_hostkey = phase::SSH_HOSTKEY,
        ssh_refused = phase::SSH_REFUSED,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The controller script marks its phases as it always did.
    #[test]
    fn the_controller_script_prints_the_markers() {
        let network = NetworkPlan::default();
        let ssh = SshPlan {
            user: "root".into(),
            client_key: "id".into(),
            client_public_key: "ssh-ed25519 AAAA".into(),
            host_key: "ssh-ed25519 BBBB".into(),
            console_device: "/dev/console".into(),
        };
        let plan = |target_script: Option<Vec<u8>>| SessionPlan {
            network: &network,
            ssh: &ssh,
            kernel: Path::new(""),
            initrd_parts: Vec::new(),
            net_socket: Path::new(""),
            target_script,
            ssh_wait: Duration::from_secs(5),
            rundir: Path::new(""),
            console_log: PathBuf::new(),
        };
        let script = controller_script(&plan(Some(b"true\n".to_vec())));
        for line in [
            "\nmark() { echo \"vmbuild-phase=$1\" >/dev/console; }\n",
            "\nmark controller-up\n",
            "\n\t\tmark ssh-unreachable\n",
            "\nmark port-open\n",
            "\nmark session-end\n",
            "\n\t\tmark ssh-hostkey\n",
            "\n\t\tmark ssh-refused\n",
        ] {
            assert!(script.contains(line), "{line:?} not in\n{script}");
        }
        let probe = controller_script(&plan(None));
        assert!(probe.contains("'echo vmbuild-phase=handshake >/dev/console' </dev/null"));
    }
}
