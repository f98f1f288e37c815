//! What the host reads out of `.deb` files without installing them: the time each was
//! built (the ar member headers), and the file system tree of the required packages as
//! plain tar streams for the builder's first stage (`dpkg-deb --fsys-tarfile`, which
//! keeps owners and modes in the headers, so no root is needed to carry them).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use super::apt::PlannedDeb;
use super::{download, usage, ImageError};

/// The modification time of the package's `data.tar.*` member, from its ar header.
pub fn data_mtime(deb: &Path) -> std::io::Result<u64> {
    let (_, members) = members(deb)?;
    let data = members
        .iter()
        .find(|(m, _)| m.name.starts_with("data.tar"))
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{}: not a Debian package (no data.tar member)",
                    deb.display()
                ),
            )
        })?;
    String::from_utf8_lossy(&data.0.header[16..28])
        .trim()
        .parse()
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: not a Debian package (bad member time)", deb.display()),
            )
        })
}

/// One ar member's header, as read.
struct Member {
    header: [u8; 60],
    name: String,
    size: u64,
}

fn members(deb: &Path) -> std::io::Result<(std::fs::File, Vec<(Member, u64)>)> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(deb)?;
    let mut magic = [0u8; 8];
    f.read_exact(&mut magic)?;
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: not a Debian package", deb.display()),
        )
    };
    if &magic != b"!<arch>\n" {
        return Err(bad());
    }
    let len = f.metadata()?.len();
    let mut out = Vec::new();
    let mut at = 8;
    while at + 60 <= len && out.len() < 8 {
        let mut header = [0u8; 60];
        f.read_exact(&mut header)?;
        let name = String::from_utf8_lossy(&header[0..16])
            .trim()
            .trim_end_matches('/')
            .to_owned();
        let size: u64 = String::from_utf8_lossy(&header[48..58])
            .trim()
            .parse()
            .map_err(|_| bad())?;
        out.push((Member { header, name, size }, at + 60));
        at += 60 + size + size % 2;
        f.seek(SeekFrom::Start(at))?;
    }
    Ok((f, out))
}

/// Writes `deb` again to `out` with its `data.tar.*` member replaced by `data_tar` (the
/// same files, uncompressed): dpkg in the builder VM then spends no time decompressing,
/// which under TCG is most of an unpack. The package's files and scripts are unchanged.
pub fn repack_uncompressed(deb: &Path, data_tar: &Path, out: &Path) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let (mut f, members) = members(deb)?;
    let mut w = std::io::BufWriter::new(std::fs::File::create(out)?);
    w.write_all(b"!<arch>\n")?;
    for (m, offset) in members {
        let (mut header, size) = (m.header, m.size);
        if m.name.starts_with("data.tar") {
            let data_len = std::fs::metadata(data_tar)?.len();
            header[0..16].copy_from_slice(format!("{:<16}", "data.tar").as_bytes());
            header[48..58].copy_from_slice(format!("{data_len:<10}").as_bytes());
            w.write_all(&header)?;
            std::io::copy(&mut std::fs::File::open(data_tar)?, &mut w)?;
            if data_len % 2 == 1 {
                w.write_all(b"\n")?;
            }
            continue;
        }
        w.write_all(&header)?;
        f.seek(SeekFrom::Start(offset))?;
        std::io::copy(&mut (&mut f).take(size + size % 2), &mut w)?;
    }
    w.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// Writes the package's files as an uncompressed tar to `out`.
pub fn fsys_tarfile(deb: &Path, out: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::create(out)?;
    let result = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(Stdio::piped())
        .output();
    let output = match result {
        Ok(o) => o,
        Err(e) => anyhow::bail!("running dpkg-deb (Debian package dpkg): {e}"),
    };
    if !output.status.success() {
        anyhow::bail!(
            "dpkg-deb --fsys-tarfile {}: {}",
            deb.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// A `--deb` file's name, version and architecture, or why it is not a package.
pub fn local_fields(deb: &Path) -> Result<(String, String, String), ImageError> {
    if !deb.is_file() {
        usage!("--deb {}: no such file", deb.display());
    }
    let out = Command::new("dpkg-deb")
        .args(["--field"])
        .arg(deb)
        .args(["Package", "Version", "Architecture"])
        .output()
        .map_err(|e| ImageError::Failed(anyhow::anyhow!("running dpkg-deb: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .map(str::to_owned)
    };
    match (
        out.status.success(),
        field("Package"),
        field("Version"),
        field("Architecture"),
    ) {
        (true, Some(p), Some(v), Some(a)) => Ok((p, v, a)),
        _ => usage!(
            "--deb {}: not a Debian package ({})",
            deb.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

/// Copies a `--deb` file into the package cache (under its digest) and plans it.
pub fn add_local(local: &Path, cache: &Path) -> Result<PlannedDeb, ImageError> {
    let (name, version, arch) = local_fields(local)?;
    let sha256 = download::sha256_file(local).map_err(ImageError::io)?;
    let file = format!("local-{}-{name}.deb", &sha256[..16]);
    std::fs::create_dir_all(cache).map_err(ImageError::io)?;
    let dest = cache.join(&file);
    if !dest.is_file() {
        let tmp = cache.join(format!("{file}.part.{}", std::process::id()));
        std::fs::copy(local, &tmp).map_err(ImageError::io)?;
        std::fs::rename(&tmp, &dest).map_err(ImageError::io)?;
    }
    Ok(PlannedDeb {
        name,
        version,
        arch,
        url: format!("file:{}", local.display()),
        file,
        size: std::fs::metadata(local).map_err(ImageError::io)?.len(),
        sha256,
        required: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, mtime: u64, data: &[u8]) -> Vec<u8> {
        let mut h = format!(
            "{name:<16}{mtime:<12}{:<6}{:<6}{:<8}{:<10}`\n",
            0,
            0,
            100644,
            data.len()
        )
        .into_bytes();
        h.extend_from_slice(data);
        if data.len() % 2 == 1 {
            h.push(b'\n');
        }
        h
    }

    /// A package repacked with its files uncompressed is the same package to dpkg-deb:
    /// same control fields, same files with the same owners, modes and contents.
    #[test]
    fn a_repacked_package_has_the_same_files_uncompressed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
        std::fs::create_dir_all(root.join("usr/share/t")).unwrap();
        std::fs::write(
            root.join("DEBIAN/control"),
            "Package: t\nVersion: 1\nArchitecture: all\nMaintainer: t <t@example.invalid>\nDescription: t\n",
        )
        .unwrap();
        std::fs::write(root.join("usr/share/t/odd"), "odd length").unwrap();
        let deb = dir.path().join("t.deb");
        let built = Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&root)
            .arg(&deb)
            .output()
            .unwrap();
        assert!(built.status.success(), "{built:?}");
        let tar = dir.path().join("data.tar");
        fsys_tarfile(&deb, &tar).unwrap();
        let repacked = dir.path().join("r.deb");
        repack_uncompressed(&deb, &tar, &repacked).unwrap();
        let show = |p: &Path, what: &str| {
            let o = Command::new("dpkg-deb").arg(what).arg(p).output().unwrap();
            assert!(o.status.success(), "{what} {}: {o:?}", p.display());
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        assert_eq!(show(&deb, "--contents"), show(&repacked, "--contents"));
        assert_eq!(show(&deb, "--field"), show(&repacked, "--field"));
        assert_eq!(data_mtime(&deb).unwrap(), data_mtime(&repacked).unwrap());
        let ar = Command::new("ar").arg("t").arg(&repacked).output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&ar.stdout),
            "debian-binary\ncontrol.tar.xz\ndata.tar\n"
        );
    }

    #[test]
    fn the_data_members_time_is_read_past_odd_sized_members() {
        let dir = tempfile::tempdir().unwrap();
        let mut deb = b"!<arch>\n".to_vec();
        deb.extend(member("debian-binary", 1, b"2.0\n"));
        deb.extend(member("control.tar.xz", 2, b"odd"));
        deb.extend(member("data.tar.xz", 1_700_000_000, b"x"));
        let path = dir.path().join("p.deb");
        std::fs::write(&path, &deb).unwrap();
        assert_eq!(data_mtime(&path).unwrap(), 1_700_000_000);
        std::fs::write(&path, b"PK\x03\x04 not an ar").unwrap();
        let err = data_mtime(&path).unwrap_err().to_string();
        assert!(err.contains("not a Debian package"), "{err}");
    }
}
