//! A QEMU process that cannot outlive vmbuild's interest in it, and the sockets it connects
//! back to (vmbuild listens, QEMU connects: no race on socket creation, no polling).

use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// QEMU ended by a signal (killed, or crashed) while vmbuild was working with it: its VM
/// stopped under vmbuild, which is not vmbuild failing. Errors carry it in their chain
/// ([`stopped`]), so a workflow can tell a VM that was stopped from QEMU refusing to do
/// what it was asked (which it says on stderr, and exits with a status).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct QemuStopped(pub String);

/// Whether `e` is, or was caused by, a QEMU that a signal ended ([`QemuStopped`]).
pub fn stopped(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<QemuStopped>())
}

/// The running QEMU. Dropping it asks QEMU to terminate, then kills it, and reaps it.
pub struct QemuProcess {
    child: Child,
    stderr_path: PathBuf,
}

impl QemuProcess {
    /// Spawns QEMU with `args`; its stderr goes to `stderr_path` so errors can be quoted.
    pub fn spawn(
        binary: &Path,
        args: &[String],
        stderr_path: &Path,
        stdio_console: bool,
    ) -> anyhow::Result<Self> {
        let stderr = std::fs::File::create(stderr_path)?;
        let mut cmd = Command::new(binary);
        cmd.args(args).stderr(stderr);
        if !stdio_console {
            // Its own process group: the terminal's Ctrl-C is vmbuild's to handle (stop the
            // guest, clean up, exit 130), not a signal that kills QEMU mid-operation. A
            // QEMU whose console is the terminal must stay in the foreground group.
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .process_group(0);
        }
        // SAFETY: prctl and sigprocmask in the child between fork and exec are
        // async-signal-safe. If the thread that owns this QEMU dies without dropping it
        // (vmbuild killed, a panic), the kernel kills QEMU instead of leaving it running.
        // The signal mask is inherited across exec, and vmbuild blocks SIGINT, SIGTERM and
        // SIGHUP to wait for them on one thread: unblocked, so that QEMU acts on the
        // SIGTERM that stops it (with them blocked, every stop waited out the grace period
        // and ended in SIGKILL).
        //
        // A vmbuild that dies between the fork and the prctl sends no signal: the child
        // then has another parent already, and must not start QEMU at all.
        let parent = std::process::id() as libc::pid_t;
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    libc::_exit(127);
                }
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(QemuProcess {
            child,
            stderr_path: stderr_path.to_owned(),
        })
    }

    /// Whether QEMU has exited, without reaping it (for a check that only has `&self`):
    /// an exited child stays a zombie (`Z` in /proc/PID/stat) until it is waited for.
    pub fn has_exited(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())) {
            // The state follows the command name, which is in parentheses.
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
            Err(_) => true,
        }
    }

    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Waits up to `grace` for QEMU to exit by itself.
    pub fn wait_timeout(&mut self, grace: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + grace;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The QMP handshake on `stream`, QEMU's monitor. When it fails because QEMU gave up
    /// while starting (it connected its sockets, then refused its memory size, kernel or
    /// disk), the error is QEMU's own words, not the EOF on the socket they caused.
    pub fn qmp_handshake(
        &mut self,
        stream: UnixStream,
        events: std::sync::mpsc::Sender<crate::qemu::QmpEvent>,
    ) -> anyhow::Result<crate::qemu::Qmp> {
        crate::qemu::Qmp::handshake(stream, events)
            .map_err(|e| self.explain(e, "QEMU would not start"))
    }

    /// `e`, a failure seen on QEMU's monitor, in QEMU's own words when QEMU exited: the
    /// EOF on its socket is only the consequence of what it wrote to stderr (a kernel it
    /// could not load, a migration stream from another machine type).
    pub fn explain(&mut self, e: anyhow::Error, what: &str) -> anyhow::Error {
        let Some(status) = self.wait_timeout(Duration::from_secs(2)).ok().flatten() else {
            return e;
        };
        let stderr = self.stderr();
        let said: Vec<&str> = stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let message = if said.is_empty() {
            format!("{what} ({status}): {e:#}")
        } else {
            // The last few lines: QEMU often says what it found, then what it gave up on.
            format!(
                "{what} ({status}): {}",
                said[said.len().saturating_sub(3)..].join("; ")
            )
        };
        match status.signal() {
            Some(_) => QemuStopped(message).into(),
            None => anyhow::anyhow!(message),
        }
    }

    /// How QEMU ended, once it has.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// What QEMU wrote to stderr (its error messages), trimmed.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path)
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    pub fn kill(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // Our own child, not yet reaped, so the pid is still its own.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        if let Ok(Some(_)) = self.wait_timeout(Duration::from_secs(2)) {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A socket vmbuild listens on for one QEMU chardev (`-chardev socket,path=…` in client
/// mode).
pub struct ChardevListener {
    listener: UnixListener,
    pub path: PathBuf,
}

impl ChardevListener {
    pub fn bind(path: PathBuf) -> anyhow::Result<Self> {
        let listener = UnixListener::bind(&path)
            .with_context(|| format!("listening on {}", path.display()))?;
        listener.set_nonblocking(true)?;
        Ok(ChardevListener { listener, path })
    }

    /// The `-chardev` argument that makes QEMU connect here.
    pub fn chardev_arg(&self, id: &str) -> String {
        format!("socket,id={id},path={}", self.path.display())
    }
}

/// How long QEMU may take to connect its sockets after it starts.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

impl QemuProcess {
    /// Spawns QEMU (see [`QemuProcess::spawn`]) and waits for it to connect each of
    /// `listeners`: the connected streams come back in the listeners' order.
    pub fn start_connected(
        binary: &Path,
        args: &[String],
        stderr_path: &Path,
        stdio_console: bool,
        listeners: &[&ChardevListener],
    ) -> anyhow::Result<(QemuProcess, Vec<UnixStream>)> {
        let mut qemu = QemuProcess::spawn(binary, args, stderr_path, stdio_console)?;
        let streams = accept_all(listeners, &mut qemu, CONNECT_TIMEOUT)?;
        Ok((qemu, streams))
    }

    /// [`QemuProcess::start_connected`] for the usual pair, the QMP monitor and one
    /// console socket: returns QEMU and the two connections, in that order.
    pub fn start_with_qmp_and_console(
        binary: &Path,
        args: &[String],
        stderr_path: &Path,
        qmp: &ChardevListener,
        console: &ChardevListener,
    ) -> anyhow::Result<(QemuProcess, UnixStream, UnixStream)> {
        let (qemu, streams) =
            Self::start_connected(binary, args, stderr_path, false, &[qmp, console])?;
        let [qmp, console]: [UnixStream; 2] = streams
            .try_into()
            .map_err(|_| anyhow::anyhow!("QEMU made other connections than asked"))?;
        Ok((qemu, qmp, console))
    }
}

/// Accepts QEMU's connection on every listener, in whatever order QEMU makes them; fails
/// if QEMU exits first or takes longer than `timeout`.
pub fn accept_all(
    listeners: &[&ChardevListener],
    qemu: &mut QemuProcess,
    timeout: Duration,
) -> anyhow::Result<Vec<UnixStream>> {
    let deadline = Instant::now() + timeout;
    let mut streams: Vec<Option<UnixStream>> = listeners.iter().map(|_| None).collect();
    while streams.iter().any(Option::is_none) {
        for (i, l) in listeners.iter().enumerate() {
            if streams[i].is_none() {
                match l.listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false)?;
                        streams[i] = Some(s);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if streams.iter().all(Option::is_some) {
            break;
        }
        if let Some(status) = qemu.try_wait()? {
            let message = match qemu.stderr() {
                said if said.is_empty() => format!("QEMU exited ({status}) while starting"),
                said => format!("QEMU exited ({status}) while starting: {said}"),
            };
            if status.signal().is_some() {
                return Err(QemuStopped(message).into());
            }
            bail!(message);
        }
        if Instant::now() > deadline {
            bail!(
                "QEMU did not connect its sockets within {timeout:?}: {}",
                qemu.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(streams.into_iter().map(Option::unwrap).collect())
}
