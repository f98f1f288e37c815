//! The per-run initramfs: the guest kit's, with a small cpio archive appended that carries
//! the run's command script. The kernel unpacks concatenated archives in order, so the
//! script lands in the guest's root file system with no share, device or mount for it.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Where the command script appears in the guest.
pub const GUEST_SCRIPT_PATH: &str = "/etc/vmbuild/cmd.sh";

/// Copies `base` to `dir/initrd.img` and appends `files` (guest path, mode, contents).
pub fn with_files(
    base: &Path,
    dir: &Path,
    files: &[(&str, u32, &[u8])],
) -> std::io::Result<PathBuf> {
    let out = dir.join("initrd.img");
    let entries: Vec<(&str, u32, &[u8])> = files
        .iter()
        .map(|(p, mode, data)| (*p, libc::S_IFREG | mode, *data))
        .collect();
    assemble(&[base], &newc_archive(&entries), &out)?;
    Ok(out)
}

/// A newc archive of `entries`: (guest path, full `st_mode` with the file type, contents;
/// a directory's contents are empty). Parents must come before what they contain: the
/// kernel creates no missing directories.
pub fn newc_archive(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut archive = Vec::new();
    for (ino, (path, mode, data)) in entries.iter().enumerate() {
        append_entry(
            &mut archive,
            ino as u32 + 1,
            path.trim_start_matches('/'),
            *mode,
            data,
        );
    }
    append_entry(&mut archive, 0, "TRAILER!!!", 0, &[]);
    archive
}

/// Writes `out`: the archives in `parts`, one after the other, then `extra`.
pub fn assemble(parts: &[&Path], extra: &[u8], out: &Path) -> std::io::Result<()> {
    let mut f = std::fs::File::create(out)?;
    let mut len = 0u64;
    for part in parts {
        // Archives start on a 4-byte boundary; the kit's ends on one, pad anyway.
        f.write_all(&vec![0u8; ((4 - len % 4) % 4) as usize])?;
        len += (4 - len % 4) % 4;
        len += std::io::copy(&mut std::fs::File::open(part)?, &mut f)?;
    }
    f.write_all(&vec![0u8; ((4 - len % 4) % 4) as usize])?;
    f.write_all(extra)?;
    Ok(())
}

/// One entry in the "newc" format (cpio -H newc): ASCII hex header, name, data, each
/// padded to 4 bytes.
fn append_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        1, // nlink
        0, // mtime
        data.len() as u32,
        0,
        0,
        0,
        0, // dev and rdev
        name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// GNU cpio (the real peer) lists and extracts what we wrote, after a base archive.
    #[test]
    fn cpio_reads_the_appended_archive() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        std::fs::write(&base, b"").unwrap();
        let out_dir = dir.path().join("out");
        std::fs::create_dir(&out_dir).unwrap();
        let img = with_files(
            &base,
            &out_dir,
            &[("/etc/vmbuild/cmd.sh", 0o755, b"echo hi\n")],
        )
        .unwrap();
        let extract = dir.path().join("x");
        std::fs::create_dir(&extract).unwrap();
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!("cpio -id --quiet < {}", img.display()))
            .current_dir(&extract)
            .status()
            .expect("cpio (Debian package cpio)");
        assert!(status.success());
        let script = extract.join("etc/vmbuild/cmd.sh");
        assert_eq!(std::fs::read(&script).unwrap(), b"echo hi\n");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&script).unwrap().permissions().mode() & 0o777,
            0o755
        );
    }
}
