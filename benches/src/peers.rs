//! The programs a benchmark compares: vmbuild itself and its peers, each run as a child
//! process that is killed when the benchmark lets go of it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A child process killed (and reaped) on drop, so no peer outlives a benchmark.
pub struct Daemon {
    name: String,
    child: Child,
}

impl Daemon {
    pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Daemon> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Daemon {
            name: name.to_owned(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `socket` exists (the daemon is listening), or fails if it died.
    pub fn wait_for_socket(&mut self, socket: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited with {status} before listening", self.name);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not create {} within 10 s",
                    self.name,
                    socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM first so servers can remove their sockets; then make sure.
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `vmbuild` binary next to this benchmark's executable (same profile), or `$VMBUILD`.
pub fn vmbuild_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("VMBUILD") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let candidate = exe.with_file_name("vmbuild");
    if candidate.is_file() {
        return Ok(candidate);
    }
    bail!(
        "no vmbuild binary next to {}: run `cargo build --release -p vmbuild` first or set VMBUILD",
        exe.display()
    )
}

/// virtiofsd from `$VIRTIOFSD`, `PATH` or `~/.cargo/bin`.
pub fn virtiofsd_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("VIRTIOFSD") {
        return Ok(PathBuf::from(p));
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("virtiofsd"))
        .find(|p| p.is_file())
        .context("virtiofsd not found: install it with `cargo install --locked virtiofsd --version 1.14.0` (needs libseccomp-dev libcap-ng-dev)")
}

/// `vmbuild fs serve` for one share.
pub fn vmbuild_share(dir: &Path, socket: &Path, readonly: bool) -> anyhow::Result<Daemon> {
    vmbuild_share_with(dir, socket, readonly, false)
}

/// [`vmbuild_share`], with the guest's writeback cache offered on a read-write share
/// when `writeback` (`--writeback`, as virtiofsd takes it).
pub fn vmbuild_share_with(
    dir: &Path,
    socket: &Path,
    readonly: bool,
    writeback: bool,
) -> anyhow::Result<Daemon> {
    let mut cmd = Command::new(vmbuild_binary()?);
    cmd.args(["fs", "serve", "--shared-dir"])
        .arg(dir)
        .arg("--socket-path")
        .arg(socket)
        .env("RUST_LOG", "warn");
    if readonly {
        cmd.arg("--readonly");
    } else if writeback {
        cmd.arg("--writeback");
    }
    let mut d = Daemon::spawn("vmbuild fs serve", &mut cmd)?;
    d.wait_for_socket(socket)?;
    Ok(d)
}

/// virtiofsd for one share, serving xattrs as `vmbuild fs serve` does, and with the cache
/// policy `vmbuild fs serve` takes by default for the same share: `always` for a read-only one (its content cannot change under the
/// guest), virtiofsd's own default (`auto`) otherwise. Equal settings, so that neither
/// side is measured serving what the other's guest has cached.
pub fn virtiofsd_share(dir: &Path, socket: &Path, readonly: bool) -> anyhow::Result<Daemon> {
    virtiofsd_share_with(dir, socket, readonly, false)
}

/// [`virtiofsd_share`], with `--writeback` on a read-write share when `writeback`.
pub fn virtiofsd_share_with(
    dir: &Path,
    socket: &Path,
    readonly: bool,
    writeback: bool,
) -> anyhow::Result<Daemon> {
    let mut cmd = Command::new(virtiofsd_binary()?);
    cmd.arg("--shared-dir")
        .arg(dir)
        .arg("--socket-path")
        .arg(socket)
        .args([
            "--sandbox",
            "none",
            "--seccomp",
            "none",
            "--log-level",
            "error",
            // vmbuild fs serve serves xattrs by default; virtiofsd only when asked. With
            // them, a guest asks for security.capability before every write.
            "--xattr",
        ]);
    if readonly {
        cmd.args(["--readonly", "--cache", "always"]);
    } else if writeback {
        cmd.arg("--writeback");
    }
    let mut d = Daemon::spawn("virtiofsd", &mut cmd)?;
    d.wait_for_socket(socket)?;
    Ok(d)
}
