//! The guest kit: the Debian kernel (uncompressed vmlinux) and the project's initramfs
//! built by `scripts/guest-kit.sh`, the default guest of `vmbuild run`.

use std::path::PathBuf;

pub struct GuestKit {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
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
        if !dir.join("kit.json").is_file() || !kit.kernel.is_file() || !kit.initrd.is_file() {
            anyhow::bail!(
                "no guest kit in {}: build it with scripts/guest-kit.sh, set VMBUILD_GUEST_KIT, \
                 or give --kernel and --initrd",
                dir.display()
            );
        }
        Ok(kit)
    }
}
