//! The guest kit: the Debian kernel (uncompressed vmlinux) and the project's initramfs
//! built by `scripts/guest-kit.sh`, the default guest of `vmbuild run`. The script writes
//! `kit.json` last, so a kit with one is complete; it records what the kit was built from
//! and the checksums of its files ([`KitInfo`]).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The kit's metadata file, next to its kernel and initramfs.
pub const INFO_FILE: &str = "kit.json";

pub struct GuestKit {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// What `kit.json` says (the fields vmbuild reads; the script writes more).
#[derive(Debug, Default, Deserialize)]
pub struct KitInfo {
    /// The kernel's release (`uname -r` in the guest).
    pub kernel_release: Option<String>,
    /// The kit's files by role, each with its checksum.
    pub vmlinux: Option<String>,
    pub vmlinux_sha256: Option<String>,
    pub bzimage: Option<String>,
    pub bzimage_sha256: Option<String>,
    pub initrd: Option<String>,
    pub initrd_sha256: Option<String>,
}

impl KitInfo {
    /// The `kit.json` in `dir`, if there is one that reads.
    pub fn read(dir: &Path) -> Option<KitInfo> {
        let text = std::fs::read_to_string(dir.join(INFO_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The checksum recorded for the kit's file called `file_name`.
    pub fn sha256_of(&self, file_name: &str) -> Option<&str> {
        [
            (&self.vmlinux, &self.vmlinux_sha256),
            (&self.bzimage, &self.bzimage_sha256),
            (&self.initrd, &self.initrd_sha256),
        ]
        .into_iter()
        .find(|(name, _)| name.as_deref() == Some(file_name))
        .and_then(|(_, sha)| sha.as_deref())
    }
}

impl GuestKit {
    /// `$VMBUILD_GUEST_KIT`, else the cache the install script fills.
    pub fn dir() -> PathBuf {
        std::env::var_os("VMBUILD_GUEST_KIT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/vmbuild/guest-kit"))
    }

    pub fn locate() -> anyhow::Result<GuestKit> {
        let dir = Self::dir();
        let kit = GuestKit {
            kernel: dir.join("vmlinux"),
            initrd: dir.join("initrd.img"),
        };
        if !dir.join(INFO_FILE).is_file() || !kit.kernel.is_file() || !kit.initrd.is_file() {
            anyhow::bail!(
                "no guest kit in {}: build it with scripts/guest-kit.sh, set VMBUILD_GUEST_KIT, \
                 or give --kernel and --initrd",
                dir.display()
            );
        }
        Ok(kit)
    }

    /// The kit's `kit.json` (next to its kernel).
    pub fn info(&self) -> Option<KitInfo> {
        KitInfo::read(self.kernel.parent()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kit_json_is_read() {
        let dir = tempfile::tempdir().unwrap();
        assert!(KitInfo::read(dir.path()).is_none());
        std::fs::write(
            dir.path().join(INFO_FILE),
            r#"{
  "kernel_release": "6.1.0-28-amd64",
  "vmlinux": "vmlinux",
  "vmlinux_sha256": "aa",
  "initrd": "initrd.img",
  "initrd_sha256": "bb",
  "recommended_append": "console=ttyS0"
}"#,
        )
        .unwrap();
        let info = KitInfo::read(dir.path()).unwrap();
        assert_eq!(info.kernel_release.as_deref(), Some("6.1.0-28-amd64"));
        assert_eq!(info.sha256_of("vmlinux"), Some("aa"));
        assert_eq!(info.sha256_of("initrd.img"), Some("bb"));
        assert_eq!(info.sha256_of("bzImage"), None);
        let kit = GuestKit {
            kernel: dir.path().join("vmlinux"),
            initrd: dir.path().join("initrd.img"),
        };
        assert_eq!(kit.info().unwrap().sha256_of("vmlinux"), Some("aa"));
    }
}
