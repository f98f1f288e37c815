//! Finding QEMU and checking it can do what vmbuild asks of it.

use std::path::PathBuf;
use std::process::Command;

/// The oldest QEMU vmbuild drives: memfd-backed shared memory and vhost-user-fs-pci are
/// older, but 7.2 is Debian 12's and the oldest it is tested against.
pub const MIN_VERSION: (u32, u32) = (7, 2);

#[derive(Debug, Clone)]
pub struct QemuBinary {
    pub path: PathBuf,
    pub version: (u32, u32, u32),
}

impl QemuBinary {
    /// `$VMBUILD_QEMU`, else `qemu-system-x86_64` on `PATH`; fails with what to install.
    pub fn locate() -> anyhow::Result<QemuBinary> {
        let path = std::env::var_os("VMBUILD_QEMU")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
        let out = Command::new(&path).arg("--version").output().map_err(|e| {
            anyhow::anyhow!(
                "cannot run {} ({e}): install QEMU with scripts/install-host-deps.sh \
                 (qemu-system-x86 from bookworm-backports)",
                path.display()
            )
        })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = parse_version(&text).ok_or_else(|| {
            anyhow::anyhow!(
                "cannot read QEMU's version from `{} --version` (it printed {:?}): is it QEMU?",
                path.display(),
                text.lines().next().unwrap_or("nothing")
            )
        })?;
        if (version.0, version.1) < MIN_VERSION {
            anyhow::bail!(
                "QEMU {}.{}.{} is too old (vmbuild needs {}.{} or newer): install qemu-system-x86 \
                 from bookworm-backports (scripts/install-host-deps.sh)",
                version.0,
                version.1,
                version.2,
                MIN_VERSION.0,
                MIN_VERSION.1
            );
        }
        Ok(QemuBinary { path, version })
    }
}

impl QemuBinary {
    /// A firmware image QEMU ships (`qboot.rom`, ...), looked up where QEMU keeps its data.
    pub fn firmware(&self, name: &str) -> Option<PathBuf> {
        let mut dirs = vec![
            PathBuf::from("/usr/share/qemu"),
            PathBuf::from("/usr/local/share/qemu"),
        ];
        if let Some(prefix) = self.path.parent().and_then(|bin| bin.parent()) {
            dirs.push(prefix.join("share/qemu"));
        }
        dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
    }
}

impl QemuBinary {
    /// The machine types this QEMU offers (`-M help`), aliases resolved: (name, alias of).
    fn machines(&self) -> anyhow::Result<Vec<(String, Option<String>)>> {
        let out = Command::new(&self.path)
            .args(["-M", "help"])
            .output()
            .map_err(|e| anyhow::anyhow!("cannot run {} -M help: {e}", self.path.display()))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| {
                let name = l.split_whitespace().next()?.to_owned();
                let alias = l
                    .split("(alias of ")
                    .nth(1)
                    .and_then(|r| r.split(')').next())
                    .map(str::to_owned);
                Some((name, alias))
            })
            .collect())
    }

    /// Every machine type name this QEMU accepts.
    pub fn machine_types(&self) -> anyhow::Result<Vec<String>> {
        Ok(self.machines()?.into_iter().map(|(n, _)| n).collect())
    }

    /// The versioned machine type behind an alias (`pc` → `pc-i440fx-10.0`): a snapshot
    /// records this, so that a later QEMU's newer `pc` cannot silently change the machine.
    pub fn resolve_machine(&self, name: &str) -> anyhow::Result<String> {
        let machines = self.machines()?;
        match machines.iter().find(|(n, _)| n == name) {
            Some((_, Some(target))) => Ok(target.clone()),
            Some((n, None)) => Ok(n.clone()),
            None => anyhow::bail!("{} has no machine type {name}", self.path.display()),
        }
    }
}

/// "QEMU emulator version 10.0.2 (Debian ...)" → (10, 0, 2)
fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let rest = text.split("version ").nth(1)?;
    let word = rest.split_whitespace().next()?;
    let mut parts = word.split('.').map(|p| p.parse::<u32>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

#[cfg(test)]
mod tests {
    use super::parse_version;

    #[test]
    fn versions_parse() {
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)\nCopyright"),
            Some((10, 0, 2))
        );
        assert_eq!(
            parse_version("QEMU emulator version 7.2.15"),
            Some((7, 2, 15))
        );
        assert_eq!(parse_version("nonsense"), None);
    }
}
