//! The image file: `mke2fs -d` from the builder's sorted tar, with the UUID, hash seed
//! and every time fixed, so that the same tar gives the same bytes; and the check that
//! the host's tools can do it.

use std::path::Path;
use std::process::Command;

use super::{usage, ImageError};

/// The oldest `mke2fs` that reads a tar for `-d` (e2fsprogs 1.47.1).
const MKE2FS_TAR_SINCE: (u32, u32, u32) = (1, 47, 1);

/// The host programs an image build runs: apt's, dpkg-deb, curl and a `mke2fs` that
/// reads tars. Ok: what was found, for `doctor`.
pub fn host_tools() -> anyhow::Result<String> {
    for (program, package) in [
        ("apt-get", "apt"),
        ("apt-cache", "apt"),
        ("dpkg-deb", "dpkg"),
        ("curl", "curl"),
    ] {
        let found = Command::new(program)
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok();
        if !found {
            anyhow::bail!("{program} is missing (Debian package {package})");
        }
    }
    mke2fs_reads_tar()?;
    Ok("apt, dpkg-deb, curl, and mke2fs 1.47.1+ (reads tars)".into())
}

/// `mke2fs -V`'s version, if it reads tars.
pub fn mke2fs_reads_tar() -> anyhow::Result<()> {
    let out = Command::new("mke2fs")
        .arg("-V")
        .output()
        .map_err(|e| anyhow::anyhow!("running mke2fs (Debian package e2fsprogs): {e}"))?;
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    let version = text.split_whitespace().nth(1).and_then(|v| {
        let n: Vec<u32> = v.split('.').filter_map(|x| x.parse().ok()).collect();
        (n.len() == 3).then(|| (n[0], n[1], n[2]))
    });
    match version {
        Some(v) if v >= MKE2FS_TAR_SINCE => Ok(()),
        _ => anyhow::bail!(
            "this host's mke2fs ({}) cannot make an image from a tar; e2fsprogs 1.47.1 or newer \
             can (on Debian 12: apt-get install -t bookworm-backports e2fsprogs, which \
             scripts/install-host-deps.sh does)",
            text.lines().next().unwrap_or("unknown version").trim()
        ),
    }
}

/// The image: ext4 from the sorted tar, with the UUID, hash seed and every time fixed.
pub fn mkfs(
    tar: &Path,
    image: &Path,
    size_bytes: u64,
    epoch: u64,
    uuid: &str,
) -> Result<(), ImageError> {
    let out = Command::new("mke2fs")
        .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-I",
            "256",
            "-L",
            "vmbuild-image",
        ])
        .args(["-U", uuid, "-E"])
        .arg(format!("hash_seed={uuid},root_owner=0:0"))
        .arg("-d")
        .arg(tar)
        .arg(image)
        .arg(format!("{}k", size_bytes / 1024))
        .output()
        .map_err(|e| ImageError::Failed(anyhow::anyhow!("running mke2fs: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if err.contains("Could not allocate") || err.contains("No space") {
            usage!(
                "the packages do not fit in --size {} MiB; give a larger --size ({err})",
                size_bytes >> 20
            );
        }
        return Err(ImageError::Failed(anyhow::anyhow!("mke2fs -d: {err}")));
    }
    Ok(())
}
