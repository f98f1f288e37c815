//! The SSH pieces of the snapshot lifecycle, taken from the host's Debian `dropbear-bin`
//! package (as the guest kit takes its kernel from Debian): the server for the `linux`
//! target, the client for the controller, and `dropbearkey` for the keys each snapshot
//! gets. Dropbear rather than OpenSSH because server and client together are ~600 KiB
//! with four small libraries, so the controller's initramfs stays small.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

pub const SERVER: &str = "/usr/sbin/dropbear";
pub const CLIENT: &str = "/usr/bin/dbclient";
pub const KEYGEN: &str = "/usr/bin/dropbearkey";

/// Where a guest finds the dynamic loader. The guest kit links /lib64 to /lib, so the
/// loader goes to /lib and the libraries to Debian's multiarch directory.
const GUEST_LOADER: &str = "/lib/ld-linux-x86-64.so.2";
const GUEST_LIBDIR: &str = "/lib/x86_64-linux-gnu";

pub fn check_installed() -> anyhow::Result<()> {
    for p in [SERVER, CLIENT, KEYGEN] {
        if !Path::new(p).is_file() {
            bail!("{p} is missing: install Debian's dropbear-bin (apt-get install dropbear-bin)");
        }
    }
    Ok(())
}

/// A key pair in dropbear's format, and its public half as an OpenSSH line
/// (`ssh-ed25519 AAAA…`, without the comment).
pub struct KeyPair {
    pub private: PathBuf,
    pub public: String,
}

/// Creates an ed25519 key pair at `path` (which must not exist).
pub fn generate_key(path: &Path) -> anyhow::Result<KeyPair> {
    let out = Command::new(KEYGEN)
        .args(["-t", "ed25519", "-f"])
        .arg(path)
        .output()
        .with_context(|| format!("running {KEYGEN}"))?;
    if !out.status.success() {
        bail!(
            "{KEYGEN} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(KeyPair {
        private: path.to_owned(),
        public: public_key(path)?,
    })
}

/// The public half of a dropbear private key.
pub fn public_key(path: &Path) -> anyhow::Result<String> {
    let out = Command::new(KEYGEN)
        .args(["-y", "-f"])
        .arg(path)
        .output()
        .with_context(|| format!("running {KEYGEN}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("ssh-"))
        .with_context(|| format!("{KEYGEN} -y printed no public key for {}", path.display()))?;
    // Drop the comment (user@host of whoever made it): it says nothing about the key.
    Ok(line
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" "))
}

/// The files `binary` needs in a guest: itself at `guest_path`, its shared libraries and
/// the dynamic loader, as (host file, guest path), found with ldd(1).
pub fn runtime_files(binary: &Path, guest_path: &str) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd (Debian package libc-bin)")?;
    if !out.status.success() {
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut files = vec![(binary.to_owned(), guest_path.to_owned())];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let line = line.trim();
        if let Some((name, rest)) = line.split_once(" => ") {
            let host = rest.split_whitespace().next().unwrap_or("");
            if host.starts_with('/') {
                files.push((
                    PathBuf::from(host),
                    format!("{GUEST_LIBDIR}/{}", name.trim()),
                ));
            }
        } else if line.contains("ld-linux") {
            let host = line.split_whitespace().next().unwrap_or("");
            files.push((PathBuf::from(host), GUEST_LOADER.to_owned()));
        }
    }
    Ok(files)
}

/// `runtime_files` for several binaries, without duplicates.
pub fn runtime_files_of(binaries: &[(&str, &str)]) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let mut all: Vec<(PathBuf, String)> = Vec::new();
    for (host, guest) in binaries {
        for f in runtime_files(Path::new(host), guest)? {
            if !all.iter().any(|(_, g)| *g == f.1) {
                all.push(f);
            }
        }
    }
    Ok(all)
}
