//! Windows 11's TPM 2.0: swtpm, Debian's software TPM, serving QEMU's `tpm-emulator`
//! backend on a socket. The install and the bootstrap's boot keep its state in the
//! snapshot directory; a revive starts it on an empty directory, because QEMU carries the
//! TPM's state in its migration stream and hands it to swtpm while it loads.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// swtpm serving a TPM 2.0 from `state`, on `socket`; stopped on drop.
pub struct Swtpm {
    child: std::process::Child,
    pub socket: PathBuf,
}

impl Swtpm {
    pub fn start(state: &Path, socket: &Path) -> anyhow::Result<Swtpm> {
        std::fs::create_dir_all(state)?;
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", state.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", socket.display()))
            .arg("--terminate")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("cannot run swtpm (Windows 11's TPM): apt-get install swtpm")?;
        let mut t = Swtpm {
            child,
            socket: socket.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Ok(Some(status)) = t.child.try_wait() {
                bail!(
                    "swtpm exited ({status}) before it listened on {}",
                    socket.display()
                );
            }
            if Instant::now() > deadline {
                bail!("swtpm did not listen on {} within 10 s", socket.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(t)
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}
