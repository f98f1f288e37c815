//! The configuration ISO: the answer file at its root, where Windows Setup looks for it
//! on every removable drive, and the first-logon files under `vmbuild\`. Made with
//! xorriso (Debian's), with Joliet names so Windows sees them as written.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// The volume label Windows shows for the configuration ISO.
pub const VOLUME: &str = "VMBUILD_CFG";

/// A file or directory of the ISO.
#[derive(Debug, Clone)]
pub enum Source {
    /// A file with these contents.
    Bytes(Vec<u8>),
    /// A host file or directory, grafted as it is (a Cygwin package directory is not
    /// copied first).
    Host(PathBuf),
}

/// Writes the ISO `out` holding `entries` (paths in the ISO, `/`-separated, without a
/// leading `/`), staging the in-memory files under `scratch`.
pub fn build(out: &Path, entries: &[(&str, Source)], scratch: &Path) -> anyhow::Result<()> {
    let staging = scratch.join("config-iso");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    let mut grafts = vec![format!("/={}", staging.display())];
    for (path, source) in entries {
        if path.starts_with('/') || path.split('/').any(|c| c == ".." || c.is_empty()) {
            bail!("config ISO path '{path}' is not a plain relative path");
        }
        match source {
            Source::Bytes(bytes) => {
                let file = staging.join(path);
                if let Some(dir) = file.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(&file, bytes)?;
            }
            Source::Host(host) => {
                if !host.exists() {
                    bail!("{} does not exist", host.display());
                }
                // `=` and `\` are special in graft points.
                let escaped = host
                    .display()
                    .to_string()
                    .replace('\\', "\\\\")
                    .replace('=', "\\=");
                grafts.push(format!("/{path}={escaped}"));
            }
        }
    }
    // xorriso prints its banner even with -quiet: shown only if it fails.
    let done = Command::new("xorriso")
        .args([
            "-as",
            "mkisofs",
            "-quiet",
            "-J",
            "-joliet-long",
            "-R",
            "-V",
            VOLUME,
        ])
        .arg("-o")
        .arg(out)
        .arg("-graft-points")
        .args(&grafts)
        .output()
        .context("cannot run xorriso: apt-get install xorriso")?;
    if !done.status.success() {
        bail!(
            "xorriso could not write {} ({}): {}",
            out.display(),
            done.status,
            String::from_utf8_lossy(&done.stderr).trim()
        );
    }
    Ok(())
}

/// Every path in `iso`, as xorriso lists it (`/autounattend.xml`, `/vmbuild`, ...).
pub fn list(iso: &Path) -> anyhow::Result<Vec<String>> {
    let out = Command::new("xorriso")
        .arg("-indev")
        .arg(iso)
        .args(["-find", "/"])
        .output()
        .context("cannot run xorriso: apt-get install xorriso")?;
    if !out.status.success() {
        bail!(
            "xorriso cannot read {}: {}",
            iso.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix('\'').and_then(|l| l.strip_suffix('\'')))
        .map(str::to_owned)
        .collect())
}

/// One file of `iso`, read back (for checks and tests).
pub fn read(iso: &Path, path: &str, scratch: &Path) -> anyhow::Result<Vec<u8>> {
    let dest = scratch.join("extracted");
    let _ = std::fs::remove_file(&dest);
    let status = Command::new("xorriso")
        .args(["-osirrox", "on", "-indev"])
        .arg(iso)
        .arg("-extract")
        .arg(path)
        .arg(&dest)
        .stderr(std::process::Stdio::null())
        .status()
        .context("cannot run xorriso: apt-get install xorriso")?;
    if !status.success() {
        bail!("{path} is not in {}", iso.display());
    }
    Ok(std::fs::read(&dest)?)
}
