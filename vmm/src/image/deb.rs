//! What the host reads out of `.deb` files without installing them: the time each was
//! built (the ar member headers), and the file system tree of the required packages as
//! plain tar streams for the builder's first stage (`dpkg-deb --fsys-tarfile`, which
//! keeps owners and modes in the headers, so no root is needed to carry them).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

/// The modification time of the package's `data.tar.*` member, from its ar header.
pub fn data_mtime(deb: &Path) -> std::io::Result<u64> {
    let mut f = std::fs::File::open(deb)?;
    let bad = |why: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: not a Debian package ({why})", deb.display()),
        )
    };
    let mut magic = [0u8; 8];
    f.read_exact(&mut magic)?;
    if &magic != b"!<arch>\n" {
        return Err(bad("no ar magic"));
    }
    // A handful of members: debian-binary, control.tar.*, data.tar.* (and maybe _gpg*).
    for _ in 0..8 {
        let mut header = [0u8; 60];
        f.read_exact(&mut header)?;
        let field = |r: std::ops::Range<usize>| {
            std::str::from_utf8(&header[r])
                .unwrap_or("")
                .trim()
                .to_owned()
        };
        let name = field(0..16);
        let size: u64 = field(48..58).parse().map_err(|_| bad("bad member size"))?;
        if name.starts_with("data.tar") {
            return field(16..28).parse().map_err(|_| bad("bad member time"));
        }
        // Members are padded to an even size.
        std::io::copy(&mut (&mut f).take(size + size % 2), &mut std::io::sink())?;
    }
    Err(bad("no data.tar member"))
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
