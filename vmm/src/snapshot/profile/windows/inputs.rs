//! What a user brings to `vmbuild bootstrap --profile windows-cygwin`, checked before
//! anything starts: the Windows and virtio-win ISOs (through `media`), the edition,
//! WinFsp's installer, Cygwin's installer and packages. Every refusal is one line naming
//! the flag, the file and what to do; the CLI turns it into exit 2.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::first_logon::CygwinSource;
use super::media::{self, WindowsImage, WindowsVersion};

/// The command line's Windows inputs, as given.
#[derive(Debug, Clone, Default)]
pub struct WindowsInputs {
    pub iso: Option<PathBuf>,
    pub virtio_win: Option<PathBuf>,
    pub edition: Option<String>,
    /// A local package directory (as `setup-x86_64.exe --download` leaves it) or a URL.
    pub cygwin_mirror: Option<String>,
    /// Cygwin's installer; by default `setup-x86_64.exe` at the top of a local mirror.
    pub cygwin_setup: Option<PathBuf>,
    pub cygwin_packages: Vec<String>,
    /// WinFsp's installer (winfsp-*.msi), which the virtio-fs service needs.
    pub winfsp: Option<PathBuf>,
}

/// The inputs, checked: everything the install needs, found and of the right kind.
#[derive(Debug, Clone)]
pub struct CheckedInputs {
    pub iso: PathBuf,
    pub virtio_win: PathBuf,
    pub image: WindowsImage,
    pub version: WindowsVersion,
    pub cygwin: CygwinSource,
    /// The local package directory for `CygwinSource::Local`.
    pub cygwin_dir: Option<PathBuf>,
    pub cygwin_setup: PathBuf,
    pub cygwin_packages: Vec<String>,
    pub winfsp: PathBuf,
}

/// Cygwin's installer, as cygwin.com names it and as a local mirror holds it.
pub const CYGWIN_SETUP: &str = "setup-x86_64.exe";

impl WindowsInputs {
    /// Checks in the order a user fixes things: the required flags first (all named at
    /// once), then each file.
    pub fn check(&self) -> Result<CheckedInputs, String> {
        let mut missing = Vec::new();
        if self.iso.is_none() {
            missing.push("--iso WIN.iso (Windows 10, 11 or Server 2022 install media)");
        }
        if self.virtio_win.is_none() {
            missing.push("--virtio-win VIRTIO.iso (the virtio-win driver ISO)");
        }
        if self.winfsp.is_none() {
            missing.push("--winfsp winfsp.msi (WinFsp's installer, from https://winfsp.dev)");
        }
        if self.cygwin_mirror.is_none() {
            missing.push(
                "--cygwin-mirror DIR|URL (a local Cygwin package directory, or a mirror URL)",
            );
        }
        if !missing.is_empty() {
            return Err(format!(
                "--profile windows-cygwin needs {}",
                missing.join(", ")
            ));
        }
        let (iso, virtio_win, winfsp, mirror) = (
            self.iso.as_ref().unwrap(),
            self.virtio_win.as_ref().unwrap(),
            self.winfsp.as_ref().unwrap(),
            self.cygwin_mirror.as_ref().unwrap(),
        );
        let install = media::inspect_windows_iso(iso)?;
        let image = install.pick(self.edition.as_deref())?.clone();
        let version = image
            .version()
            .expect("pick returns only editions of a known version");
        media::inspect_virtio_win(virtio_win, version)?;
        check_msi(winfsp, "--winfsp")?;

        let (cygwin, cygwin_dir) = if is_url(mirror) {
            (CygwinSource::Mirror(mirror.clone()), None)
        } else {
            let dir = PathBuf::from(mirror);
            check_cygwin_dir(&dir)?;
            (CygwinSource::Local, Some(dir))
        };
        let cygwin_setup = match (&self.cygwin_setup, &cygwin_dir) {
            (Some(file), _) => file.clone(),
            (None, Some(dir)) => dir.join(CYGWIN_SETUP),
            (None, None) => {
                return Err(format!(
                    "--cygwin-mirror {mirror} is a URL: pass --cygwin-setup {CYGWIN_SETUP} too (https://cygwin.com/{CYGWIN_SETUP}); the target runs it from the configuration ISO"
                ))
            }
        };
        check_windows_exe(&cygwin_setup, "--cygwin-setup")?;
        for p in &self.cygwin_packages {
            check_package_name(p)?;
        }
        Ok(CheckedInputs {
            iso: iso.clone(),
            virtio_win: virtio_win.clone(),
            image,
            version,
            cygwin,
            cygwin_dir,
            cygwin_setup,
            cygwin_packages: self.cygwin_packages.clone(),
            winfsp: winfsp.clone(),
        })
    }

    /// Whether any Windows flag was given (they are refused with other profiles).
    pub fn any(&self) -> bool {
        self.iso.is_some()
            || self.virtio_win.is_some()
            || self.edition.is_some()
            || self.cygwin_mirror.is_some()
            || self.cygwin_setup.is_some()
            || !self.cygwin_packages.is_empty()
            || self.winfsp.is_some()
    }
}

fn is_url(s: &str) -> bool {
    ["http://", "https://", "ftp://"]
        .iter()
        .any(|p| s.starts_with(p))
}

/// The first bytes of `path`, or the error naming `flag`.
fn head(path: &Path, flag: &str, n: usize) -> Result<Vec<u8>, String> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) if f.metadata().is_ok_and(|m| m.is_file()) => f,
        Ok(_) => return Err(format!("{flag} {}: not a file", path.display())),
        Err(e) => return Err(format!("{flag} {}: {e}", path.display())),
    };
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) => return Err(format!("{flag} {}: {e}", path.display())),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// An MSI is an OLE compound file.
fn check_msi(path: &Path, flag: &str) -> Result<(), String> {
    const OLE: [u8; 8] = [0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1];
    if head(path, flag, 8)? != OLE {
        return Err(format!(
            "{flag} {}: not a Windows Installer package (.msi); WinFsp's is winfsp-<version>.msi from https://winfsp.dev/rel/",
            path.display()
        ));
    }
    Ok(())
}

/// A 64-bit Windows program: `MZ`, and at the offset it gives, a PE header for x86-64.
fn check_windows_exe(path: &Path, flag: &str) -> Result<(), String> {
    let bytes = head(path, flag, 4096)?;
    let pe = bytes
        .get(0x3c..0x40)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let machine = pe.and_then(|at| {
        (bytes.get(at..at + 4) == Some(b"PE\0\0"))
            .then(|| bytes.get(at + 4..at + 6))
            .flatten()
            .map(|m| u16::from_le_bytes([m[0], m[1]]))
    });
    match (bytes.starts_with(b"MZ"), machine) {
        (true, Some(0x8664)) => Ok(()),
        (true, Some(_)) => Err(format!(
            "{flag} {}: a Windows program, but not for x86-64: use {CYGWIN_SETUP}",
            path.display()
        )),
        _ => Err(format!(
            "{flag} {}: not a Windows program; Cygwin's installer is {CYGWIN_SETUP} from https://cygwin.com",
            path.display()
        )),
    }
}

/// A local package directory, as `setup-x86_64.exe --download --local-package-dir DIR`
/// leaves it: one directory per mirror, each with `x86_64/setup.ini`.
fn check_cygwin_dir(dir: &Path) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        format!(
            "--cygwin-mirror {}: {e} (a local package directory, or a mirror URL)",
            dir.display()
        )
    })?;
    let has_index = entries
        .flatten()
        .any(|e| e.path().join("x86_64/setup.ini").is_file())
        || dir.join("x86_64/setup.ini").is_file();
    if !has_index {
        return Err(format!(
            "--cygwin-mirror {}: no x86_64/setup.ini in it or in a directory under it; make one with `{CYGWIN_SETUP} --download --local-package-dir DIR --packages openssh,cygrunsrv,...` or give a mirror URL",
            dir.display()
        ));
    }
    Ok(())
}

/// Cygwin package names: letters, digits and `._+-`; they go on setup's command line.
fn check_package_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c));
    if !ok {
        return Err(format!(
            "--cygwin-packages: '{name}' is not a Cygwin package name (letters, digits, . _ + -)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// The smallest x86-64 PE header the check accepts.
    fn pe(machine: u16) -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[0..2].copy_from_slice(b"MZ");
        b[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        b[0x80..0x84].copy_from_slice(b"PE\0\0");
        b[0x84..0x86].copy_from_slice(&machine.to_le_bytes());
        b
    }

    #[test]
    fn every_missing_flag_is_named_at_once() {
        let err = WindowsInputs::default().check().unwrap_err();
        for flag in ["--iso", "--virtio-win", "--winfsp", "--cygwin-mirror"] {
            assert!(err.contains(flag), "{err}");
        }
    }

    #[test]
    fn installers_are_recognised_by_their_headers() {
        let d = tempfile::tempdir().unwrap();
        let msi = file(
            d.path(),
            "winfsp.msi",
            &[0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1, 0, 0],
        );
        assert_eq!(check_msi(&msi, "--winfsp"), Ok(()));
        let text = file(d.path(), "readme.msi", b"not an installer");
        assert!(check_msi(&text, "--winfsp")
            .unwrap_err()
            .contains("not a Windows Installer package"));
        assert!(check_msi(&d.path().join("none.msi"), "--winfsp")
            .unwrap_err()
            .contains("No such file"));
        assert!(check_msi(d.path(), "--winfsp")
            .unwrap_err()
            .contains("not a file"));

        let exe = file(d.path(), "setup-x86_64.exe", &pe(0x8664));
        assert_eq!(check_windows_exe(&exe, "--cygwin-setup"), Ok(()));
        let x86 = file(d.path(), "setup-x86.exe", &pe(0x14c));
        assert!(check_windows_exe(&x86, "--cygwin-setup")
            .unwrap_err()
            .contains("not for x86-64"));
        assert!(check_windows_exe(&msi, "--cygwin-setup")
            .unwrap_err()
            .contains("not a Windows program"));
        // An e_lfanew pointing past the file is no PE, not a panic.
        let mut short = pe(0x8664);
        short[0x3c..0x40].copy_from_slice(&u32::MAX.to_le_bytes());
        let short = file(d.path(), "short.exe", &short);
        assert!(check_windows_exe(&short, "--cygwin-setup").is_err());
    }

    #[test]
    fn a_local_mirror_needs_its_index() {
        let d = tempfile::tempdir().unwrap();
        assert!(check_cygwin_dir(d.path())
            .unwrap_err()
            .contains("no x86_64/setup.ini"));
        let m = d
            .path()
            .join("https%3a%2f%2fmirrors.kernel.org%2fsourceware%2fcygwin%2f");
        std::fs::create_dir_all(m.join("x86_64")).unwrap();
        std::fs::write(m.join("x86_64/setup.ini"), "release: cygwin\n").unwrap();
        assert_eq!(check_cygwin_dir(d.path()), Ok(()));
        assert!(check_cygwin_dir(&d.path().join("nope"))
            .unwrap_err()
            .contains("--cygwin-mirror"));
    }

    #[test]
    fn package_names_cannot_carry_a_command_line() {
        for good in ["gcc-core", "make", "libstdc++-devel", "python3.12"] {
            assert_eq!(check_package_name(good), Ok(()));
        }
        for bad in ["", "gcc core", "make&calc", "a,b", "x;y", "\"q\""] {
            assert!(check_package_name(bad).is_err(), "{bad:?}");
        }
    }
}
