//! The install media a user brings: a Windows ISO (its `sources/install.wim` or
//! `install.esd`, whose XML names the editions and their Windows version) and the
//! virtio-win ISO (the drivers for the Windows version, and the installer of the
//! virtio-fs service).
//!
//! The WIM is read in place inside the ISO: xorriso reports where its extents lie, and
//! the WIM header points at the XML (uncompressed UTF-16, also in solid `.esd` files),
//! so a 5 GB image is never copied to learn its editions.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A Windows version this profile knows how to install.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowsVersion {
    Windows10,
    Windows11,
    Server2022,
}

impl WindowsVersion {
    /// The directory name virtio-win uses for this version's drivers.
    pub fn virtio_win_dir(self) -> &'static str {
        match self {
            WindowsVersion::Windows10 => "w10",
            WindowsVersion::Windows11 => "w11",
            WindowsVersion::Server2022 => "2k22",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WindowsVersion::Windows10 => "Windows 10",
            WindowsVersion::Windows11 => "Windows 11",
            WindowsVersion::Server2022 => "Windows Server 2022",
        }
    }

    /// Windows 11 refuses machines without TPM 2.0 and Secure Boot unless told not to.
    pub fn needs_tpm(self) -> bool {
        self == WindowsVersion::Windows11
    }
}

/// One image (edition) of an install.wim, from its XML.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowsImage {
    pub index: u32,
    pub name: String,
    pub edition_id: Option<String>,
    /// `WinNT` (client) or `ServerNT`.
    pub product_type: Option<String>,
    pub build: Option<u32>,
}

impl WindowsImage {
    /// Client builds from 22000 on are Windows 11; server build 20348 is Server 2022.
    pub fn version(&self) -> Option<WindowsVersion> {
        let build = self.build?;
        let server =
            self.product_type.as_deref() == Some("ServerNT") || self.name.contains("Server");
        match (server, build) {
            (true, 20348) => Some(WindowsVersion::Server2022),
            (true, _) => None,
            (false, b) if b >= 22000 => Some(WindowsVersion::Windows11),
            (false, b) if b >= 10240 => Some(WindowsVersion::Windows10),
            _ => None,
        }
    }
}

/// A Windows ISO that was checked to be install media.
#[derive(Debug, Clone)]
pub struct InstallMedia {
    pub iso: PathBuf,
    /// `/sources/install.wim` or `/sources/install.esd`.
    pub image_path: String,
    pub images: Vec<WindowsImage>,
}

impl InstallMedia {
    /// The edition to install: `wanted` (a name, case-insensitive, or an index), or the only
    /// one; the error lists the choices.
    pub fn pick(&self, wanted: Option<&str>) -> Result<&WindowsImage, String> {
        let list = || {
            self.images
                .iter()
                .map(|i| format!("{} ({})", i.name, i.index))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let image = match wanted {
            Some(w) => self
                .images
                .iter()
                .find(|i| i.name.eq_ignore_ascii_case(w) || w.parse() == Ok(i.index))
                .ok_or_else(|| {
                    format!(
                        "--edition '{w}': {} has no such edition; it has {}",
                        self.iso.display(),
                        list()
                    )
                })?,
            None if self.images.len() == 1 => &self.images[0],
            None => {
                return Err(format!(
                    "{} holds {} editions: pass --edition with one of {}",
                    self.iso.display(),
                    self.images.len(),
                    list()
                ))
            }
        };
        if image.version().is_none() {
            return Err(format!(
                "--edition '{}' is build {} ({}): this vmbuild installs Windows 10, Windows 11 and Windows Server 2022",
                image.name,
                image.build.map_or("unknown".into(), |b| b.to_string()),
                image.product_type.as_deref().unwrap_or("no product type"),
            ));
        }
        Ok(image)
    }
}

/// Checks that `iso` is Windows install media and reads its editions.
pub fn inspect_windows_iso(iso: &Path) -> Result<InstallMedia, String> {
    readable(iso, "--iso")?;
    let extents = find_extents(iso, "/", "install.*")?;
    let Some((image_path, extents)) = extents.into_iter().find(|(p, _)| {
        p.eq_ignore_ascii_case("/sources/install.wim")
            || p.eq_ignore_ascii_case("/sources/install.esd")
    }) else {
        return Err(format!(
            "--iso {}: not Windows install media (it has no sources/install.wim or sources/install.esd)",
            iso.display()
        ));
    };
    let xml = read_wim_xml(iso, &extents).map_err(|e| {
        format!(
            "--iso {}: {image_path} cannot be read as a WIM: {e}",
            iso.display()
        )
    })?;
    let images = parse_wim_xml(&xml).map_err(|e| {
        format!(
            "--iso {}: the XML of {image_path} is not readable: {e}",
            iso.display()
        )
    })?;
    if images.is_empty() {
        return Err(format!(
            "--iso {}: {image_path} holds no images",
            iso.display()
        ));
    }
    Ok(InstallMedia {
        iso: iso.to_owned(),
        image_path,
        images,
    })
}

/// The drivers a Windows version needs from virtio-win, by directory: the disk
/// (viostor), the NIC (NetKVM), the serial port that says the target is ready
/// (vioserial) and virtio-fs (viofs); plus the installer that sets up the virtio-fs
/// service.
pub fn required_virtio_win_paths(version: WindowsVersion) -> Vec<String> {
    let v = version.virtio_win_dir();
    let mut paths: Vec<String> = ["viostor", "NetKVM", "vioserial", "viofs"]
        .iter()
        .map(|d| format!("/{d}/{v}/amd64"))
        .collect();
    paths.push("/virtio-win-gt-x64.msi".into());
    paths
}

/// Checks that `iso` carries the virtio-win drivers for `version`.
pub fn inspect_virtio_win(iso: &Path, version: WindowsVersion) -> Result<(), String> {
    readable(iso, "--virtio-win")?;
    let listing = list_tree(iso)?;
    let missing: Vec<String> = required_virtio_win_paths(version)
        .into_iter()
        .filter(|p| !listing.iter().any(|l| l.eq_ignore_ascii_case(p)))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "--virtio-win {}: not a virtio-win ISO for {} (missing {}); get virtio-win.iso from https://fedorapeople.org/groups/virt/virtio-win/direct-downloads/",
            iso.display(),
            version.name(),
            missing.join(", ")
        ));
    }
    Ok(())
}

/// `iso` can be opened and is an ISO 9660 image: its primary volume descriptor (sector
/// 16) says `CD001`. (xorriso takes any other file for blank media and finds nothing.)
fn readable(iso: &Path, flag: &str) -> Result<(), String> {
    let mut f = match std::fs::File::open(iso) {
        Ok(f) if f.metadata().is_ok_and(|m| m.is_file()) => f,
        Ok(_) => return Err(format!("{flag} {}: not a file", iso.display())),
        Err(e) => return Err(format!("{flag} {}: {e}", iso.display())),
    };
    let mut magic = [0u8; 5];
    let found = f
        .seek(SeekFrom::Start(16 * 2048 + 1))
        .and_then(|_| f.read_exact(&mut magic));
    if found.is_err() || &magic != b"CD001" {
        return Err(format!(
            "{flag} {}: not an ISO 9660 image (no volume descriptor at sector 16)",
            iso.display()
        ));
    }
    Ok(())
}

fn xorriso(iso: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("xorriso")
        .arg("-indev")
        .arg(iso)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run xorriso ({e}): apt-get install xorriso"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let why = stderr
            .lines()
            .filter(|l| l.contains("FAILURE") || l.contains("SORRY"))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(format!(
            "{} is not an ISO 9660 image xorriso can read ({})",
            iso.display(),
            if why.is_empty() { stderr.trim() } else { &why }
        ));
    }
    // xorriso prints its results on stdout, its reports on stderr; both are kept.
    Ok(format!("{}{stderr}", String::from_utf8_lossy(&out.stdout)))
}

/// Every path in the ISO.
fn list_tree(iso: &Path) -> Result<Vec<String>, String> {
    let out = xorriso(iso, &["-find", "/"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.strip_prefix('\'').and_then(|l| l.strip_suffix('\'')))
        .map(str::to_owned)
        .collect())
}

/// One stretch of a file in the ISO: where it starts (bytes into the ISO) and how long.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Extent {
    pub start: u64,
    pub len: u64,
}

/// The files under `dir` named like `pattern`, with their extents in file order (a file
/// over 4 GiB has several).
fn find_extents(
    iso: &Path,
    dir: &str,
    pattern: &str,
) -> Result<Vec<(String, Vec<Extent>)>, String> {
    let out = xorriso(
        iso,
        &["-find", dir, "-name", pattern, "-exec", "report_lba", "--"],
    )?;
    Ok(parse_report_lba(&out))
}

/// `File data lba:  XT ,  START ,  BLOCKS ,  SIZE , 'PATH'` lines, grouped by path.
pub fn parse_report_lba(text: &str) -> Vec<(String, Vec<Extent>)> {
    let mut files: Vec<(String, Vec<(u64, Extent)>)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("File data lba:") else {
            continue;
        };
        let mut fields = rest.splitn(5, ',').map(str::trim);
        let (Some(xt), Some(start), Some(_blocks), Some(size), Some(path)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            continue;
        };
        let (Ok(xt), Ok(start), Ok(size)) =
            (xt.parse::<u64>(), start.parse::<u64>(), size.parse::<u64>())
        else {
            continue;
        };
        let path = path.trim_matches('\'').to_owned();
        let extent = Extent {
            start: start * 2048,
            len: size,
        };
        match files.iter_mut().find(|(p, _)| *p == path) {
            Some((_, v)) => v.push((xt, extent)),
            None => files.push((path, vec![(xt, extent)])),
        }
    }
    files
        .into_iter()
        .map(|(p, mut v)| {
            v.sort_by_key(|(xt, _)| *xt);
            (p, v.into_iter().map(|(_, e)| e).collect())
        })
        .collect()
}

/// Reads `len` bytes at `offset` of a file made of `extents` of `iso`.
fn read_at(
    iso: &mut std::fs::File,
    extents: &[Extent],
    mut offset: u64,
    len: usize,
) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(len);
    for e in extents {
        if out.len() == len {
            break;
        }
        if offset >= e.len {
            offset -= e.len;
            continue;
        }
        let take = ((e.len - offset) as usize).min(len - out.len());
        iso.seek(SeekFrom::Start(e.start + offset))?;
        let mut buf = vec![0u8; take];
        iso.read_exact(&mut buf)?;
        out.extend_from_slice(&buf);
        offset = 0;
    }
    if out.len() < len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "past the end of the file",
        ));
    }
    Ok(out)
}

/// The WIM's XML (UTF-8), read through its header.
fn read_wim_xml(iso: &Path, extents: &[Extent]) -> Result<String, String> {
    let mut f = std::fs::File::open(iso).map_err(|e| e.to_string())?;
    let header = read_at(&mut f, extents, 0, 208).map_err(|e| format!("its header: {e}"))?;
    if &header[..8] != b"MSWIM\0\0\0" && &header[..8] != b"WLPWM\0\0\0" {
        return Err("no WIM magic at its start".into());
    }
    // rhXmlData: size (low 56 bits) and flags, offset, original size.
    let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap());
    let size = u64_at(72) & ((1 << 56) - 1);
    let offset = u64_at(80);
    if size == 0 || size > 64 << 20 {
        return Err(format!("its XML is {size} bytes"));
    }
    let total: u64 = extents.iter().map(|e| e.len).sum();
    if offset.saturating_add(size) > total {
        return Err("its XML lies past its end".into());
    }
    let raw =
        read_at(&mut f, extents, offset, size as usize).map_err(|e| format!("its XML: {e}"))?;
    let units: Vec<u16> = raw
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let text = String::from_utf16(&units).map_err(|_| "its XML is not UTF-16")?;
    Ok(text.trim_start_matches('\u{feff}').to_owned())
}

/// The images a WIM's XML describes.
pub fn parse_wim_xml(xml: &str) -> Result<Vec<WindowsImage>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    let text = |node: roxmltree::Node, path: &[&str]| -> Option<String> {
        let mut n = node;
        for step in path {
            n = n.children().find(|c| c.has_tag_name(*step))?;
        }
        n.text().map(|t| t.trim().to_owned())
    };
    let mut images = Vec::new();
    for image in doc
        .root_element()
        .children()
        .filter(|c| c.has_tag_name("IMAGE"))
    {
        let Some(index) = image.attribute("INDEX").and_then(|i| i.parse().ok()) else {
            continue;
        };
        images.push(WindowsImage {
            index,
            name: text(image, &["NAME"]).unwrap_or_default(),
            edition_id: text(image, &["WINDOWS", "EDITIONID"]),
            product_type: text(image, &["WINDOWS", "PRODUCTTYPE"]),
            build: text(image, &["WINDOWS", "VERSION", "BUILD"]).and_then(|b| b.parse().ok()),
        });
    }
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_follow_the_build_and_product_type() {
        let image = |name: &str, product: &str, build: u32| WindowsImage {
            index: 1,
            name: name.into(),
            edition_id: None,
            product_type: Some(product.into()),
            build: Some(build),
        };
        assert_eq!(
            image("Windows 11 Pro", "WinNT", 22631).version(),
            Some(WindowsVersion::Windows11)
        );
        assert_eq!(
            image("Windows 10 Pro", "WinNT", 19045).version(),
            Some(WindowsVersion::Windows10)
        );
        assert_eq!(
            image("Windows Server 2022 SERVERSTANDARD", "ServerNT", 20348).version(),
            Some(WindowsVersion::Server2022)
        );
        assert_eq!(
            image("Windows Server 2019", "ServerNT", 17763).version(),
            None
        );
        assert_eq!(image("Windows 8.1", "WinNT", 9600).version(), None);
    }

    #[test]
    fn report_lba_lines_group_extents_by_file_in_order() {
        let text = "Report layout: xt , Startlba ,   Blocks , Filesize , ISO image path\n\
                    File data lba:  1 ,   300 ,   2 ,     4096 , '/sources/install.wim'\n\
                    File data lba:  0 ,    33 ,   2 ,     4096 , '/sources/install.wim'\n\
                    File data lba:  0 ,    40 ,   1 ,     100 , '/sources/install.swm'\n";
        let files = parse_report_lba(text);
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].0, "/sources/install.wim");
        assert_eq!(
            files[0].1,
            [
                Extent {
                    start: 33 * 2048,
                    len: 4096
                },
                Extent {
                    start: 300 * 2048,
                    len: 4096
                }
            ]
        );
    }

    #[test]
    fn a_file_in_several_extents_is_read_across_them_in_file_order() {
        // As a WIM over 4 GiB lies in an ISO: its second half may come first on disk.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("iso");
        let mut data = vec![0u8; 8192];
        data[4096..4100].copy_from_slice(b"ABCD"); // extent 0 starts at 4096
        data[0..4].copy_from_slice(b"EFGH"); // extent 1 starts at 0
        std::fs::write(&path, &data).unwrap();
        let extents = [
            Extent {
                start: 4096,
                len: 4,
            },
            Extent { start: 0, len: 4 },
        ];
        let mut f = std::fs::File::open(&path).unwrap();
        assert_eq!(read_at(&mut f, &extents, 2, 4).unwrap(), b"CDEF");
        assert!(read_at(&mut f, &extents, 6, 4).is_err(), "past the end");
    }

    #[test]
    fn an_edition_is_picked_by_name_or_index_and_a_wrong_one_lists_the_choices() {
        let media = InstallMedia {
            iso: "win.iso".into(),
            image_path: "/sources/install.wim".into(),
            images: vec![
                WindowsImage {
                    index: 1,
                    name: "Windows 11 Home".into(),
                    edition_id: None,
                    product_type: Some("WinNT".into()),
                    build: Some(22631),
                },
                WindowsImage {
                    index: 2,
                    name: "Windows 11 Pro".into(),
                    edition_id: None,
                    product_type: Some("WinNT".into()),
                    build: Some(22631),
                },
            ],
        };
        assert_eq!(media.pick(Some("windows 11 pro")).unwrap().index, 2);
        assert_eq!(media.pick(Some("1")).unwrap().index, 1);
        let err = media.pick(Some("Enterprise")).unwrap_err();
        assert!(
            err.contains("Windows 11 Home (1), Windows 11 Pro (2)"),
            "{err}"
        );
        let err = media.pick(None).unwrap_err();
        assert!(err.contains("pass --edition"), "{err}");
    }
}
