//! Stand-ins for what a Windows user brings, made by the tests with Debian's tools: a
//! "Windows ISO" with a real WIM (wimtools) holding the metadata of real editions, a
//! virtio-win ISO with the driver directories, WinFsp's MSI and Cygwin's installer and
//! package directory as their headers and layout make them. None of them is Windows.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use vmbuild::snapshot::profile::windows::media::{required_virtio_win_paths, WindowsVersion};

pub fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An ISO 9660 image (Joliet, Rock Ridge) of `tree`, labelled `volume`.
pub fn make_iso(tree: &Path, iso: &Path, volume: &str) {
    run(Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet", "-J", "-R", "-V", volume, "-o"])
        .arg(iso)
        .arg(tree));
}

/// A stand-in Windows ISO: `sources/install.wim` with one image per (name, product type,
/// build), made by wimcapture/wimappend and labelled with wiminfo --image-property.
pub fn stand_in_windows_iso(dir: &Path, editions: &[(&str, &str, u32)]) -> PathBuf {
    let root = dir.join("wimroot/Windows/System32");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("ntoskrnl.exe"), b"stand-in").unwrap();
    let tree = dir.join("iso");
    std::fs::create_dir_all(tree.join("sources")).unwrap();
    let wim = tree.join("sources/install.wim");
    for (i, (name, product, build)) in editions.iter().enumerate() {
        let verb = if i == 0 { "wimcapture" } else { "wimappend" };
        run(Command::new(verb)
            .arg(dir.join("wimroot"))
            .arg(&wim)
            .arg(name));
        run(Command::new("wiminfo")
            .arg(&wim)
            .arg((i + 1).to_string())
            .arg("--image-property")
            .arg(format!("WINDOWS/PRODUCTTYPE={product}"))
            .arg("--image-property")
            .arg(format!("WINDOWS/VERSION/BUILD={build}")));
    }
    let iso = dir.join("win.iso");
    make_iso(&tree, &iso, "CCCOMA_X64FRE");
    iso
}

/// A stand-in virtio-win ISO with the driver directories of `versions`.
pub fn stand_in_virtio_win(dir: &Path, versions: &[WindowsVersion]) -> PathBuf {
    let tree = dir.join("virtio-win");
    for v in versions {
        for p in required_virtio_win_paths(*v) {
            let path = tree.join(p.trim_start_matches('/'));
            if p.ends_with(".msi") {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, b"msi").unwrap();
            } else {
                std::fs::create_dir_all(&path).unwrap();
                std::fs::write(path.join("driver.inf"), b"[Version]").unwrap();
            }
        }
    }
    let iso = dir.join("virtio-win.iso");
    make_iso(&tree, &iso, "virtio-win");
    iso
}

/// WinFsp's installer as far as vmbuild checks it: an OLE compound file.
pub fn stand_in_msi(dir: &Path) -> PathBuf {
    let msi = dir.join("winfsp-2.0.23075.msi");
    std::fs::write(&msi, [0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1, 0, 0]).unwrap();
    msi
}

/// A local Cygwin package directory as `setup-x86_64.exe --download` leaves it, with the
/// installer (an x86-64 PE header) at its top.
pub fn stand_in_cygwin_mirror(dir: &Path) -> PathBuf {
    let mirror = dir.join("cygwin-packages");
    let site = mirror.join("https%3a%2f%2fmirrors.kernel.org%2fsourceware%2fcygwin%2f");
    std::fs::create_dir_all(site.join("x86_64")).unwrap();
    std::fs::write(site.join("x86_64/setup.ini"), "release: cygwin\n").unwrap();
    let mut exe = vec![0u8; 512];
    exe[0..2].copy_from_slice(b"MZ");
    exe[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
    exe[0x80..0x84].copy_from_slice(b"PE\0\0");
    exe[0x84..0x86].copy_from_slice(&0x8664u16.to_le_bytes());
    std::fs::write(mirror.join("setup-x86_64.exe"), &exe).unwrap();
    mirror
}
