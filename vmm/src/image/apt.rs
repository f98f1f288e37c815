//! Resolution with the host's apt, in a private root: its own sources, lists and an empty
//! dpkg status, so the closure is that of a new system and no root is needed. apt
//! verifies the archive's signature against the distribution's keyring and gives each
//! package's URI; the Packages index gives its SHA-256 and priority.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::distro::{Arch, Distro};
use super::ImageError;
use crate::image::usage;

/// One archive: a distribution's suite at a mirror, for one architecture.
pub struct Archive {
    pub distro: &'static Distro,
    pub arch: Arch,
    pub mirror: String,
}

/// A package chosen for the image, as the archive describes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PlannedDeb {
    pub name: String,
    pub version: String,
    pub arch: String,
    pub url: String,
    /// The file's name in the archive's pool (and in the package cache).
    pub file: String,
    pub size: u64,
    pub sha256: String,
    /// Priority required or Essential: unpacked first, from the stage tars.
    pub required: bool,
}

/// A private apt root for one archive, locked for as long as this value lives: two builds
/// of the same archive take turns at its lists.
pub struct AptRoot {
    dir: PathBuf,
    _lock: nix::fcntl::Flock<File>,
}

/// One stanza of `apt-cache dumpavail`, the fields the build uses.
#[derive(Debug, Default, Clone)]
struct Stanza {
    package: String,
    version: String,
    arch: String,
    priority: String,
    essential: bool,
    filename: String,
    size: u64,
    sha256: String,
}

/// The private root of a package manager (apt's, dnf's) for `archive` under `parent`:
/// one per distribution, architecture and mirror, with `subdirs` made, and locked for as
/// long as the lock is held (two builds never write one root's lists at once).
pub(super) fn locked_root(
    parent: &Path,
    archive: &Archive,
    arch: &str,
    subdirs: &[&str],
) -> Result<(PathBuf, nix::fcntl::Flock<File>), ImageError> {
    let tag = hex(&Sha256::digest(archive.mirror.as_bytes()))[..12].to_owned();
    let dir = parent.join(format!("{}-{arch}-{tag}", archive.distro.name));
    for sub in subdirs {
        std::fs::create_dir_all(dir.join(sub))
            .map_err(|e| ImageError::Failed(anyhow::anyhow!("creating {}: {e}", dir.display())))?;
    }
    let lock = File::create(dir.join("lock")).map_err(ImageError::io)?;
    let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| ImageError::Failed(anyhow::anyhow!("locking {}: {e}", dir.display())))?;
    Ok((dir, lock))
}

impl AptRoot {
    /// Creates (or reuses) the apt root for `archive` under `parent`.
    pub fn open(parent: &Path, archive: &Archive) -> Result<AptRoot, ImageError> {
        let keyring = Path::new(archive.distro.keyring);
        if !keyring.is_file() {
            usage!(
                "{} needs the archive keyring {} (Debian package {}), which this host lacks",
                archive.distro.name,
                keyring.display(),
                if archive.distro.name.starts_with("ubuntu") {
                    "ubuntu-keyring"
                } else {
                    "debian-archive-keyring"
                }
            );
        }
        let (dir, lock) = locked_root(
            parent,
            archive,
            archive.arch.debian(),
            &[
                "etc/apt/apt.conf.d",
                "etc/apt/preferences.d",
                "etc/apt/sources.list.d",
                "var/lib/apt/lists/partial",
                "var/cache/apt/archives/partial",
                "var/lib/dpkg",
            ],
        )?;
        let write =
            |rel: &str, text: String| std::fs::write(dir.join(rel), text).map_err(ImageError::io);
        write("var/lib/dpkg/status", String::new())?;
        write(
            "etc/apt/sources.list",
            format!(
                "deb [signed-by={}] {} {} {}\n",
                archive.distro.keyring,
                archive.mirror,
                archive.distro.suite,
                archive.distro.components
            ),
        )?;
        let d = dir.display();
        let arch = archive.arch.debian();
        write(
            "apt.conf",
            format!(
                "Dir \"{d}/\";\n\
                 Dir::State::status \"{d}/var/lib/dpkg/status\";\n\
                 Dir::Etc::trusted \"/nonexistent\";\n\
                 Dir::Etc::trustedparts \"/nonexistent\";\n\
                 APT::Architecture \"{arch}\";\n\
                 APT::Architectures {{ \"{arch}\"; }};\n\
                 APT::Install-Recommends \"false\";\n\
                 Acquire::Languages \"none\";\n\
                 Acquire::Retries \"2\";\n\
                 Debug::NoLocking \"true\";\n"
            ),
        )?;
        Ok(AptRoot { dir, _lock: lock })
    }

    fn apt(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("APT_CONFIG", self.dir.join("apt.conf"))
            .env("LC_ALL", "C")
            .arg("-q");
        c
    }

    /// Fetches the archive's lists; an archive that cannot be reached or verified is the
    /// user's `--mirror` (or network), said in one line.
    pub fn update(&self, archive: &Archive) -> Result<(), ImageError> {
        let out = self
            .apt("apt-get")
            .args(["update", "--error-on=any"])
            .output()
            .map_err(|e| {
                ImageError::Failed(anyhow::anyhow!("running apt-get (Debian package apt): {e}"))
            })?;
        if !out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            let why = text
                .lines()
                .filter(|l| l.starts_with("E:") || l.starts_with("W:") || l.starts_with("Err:"))
                .map(|l| l.trim_start_matches("E: ").trim_start_matches("W: "))
                .find(|l| !l.contains("Some index files failed"))
                .unwrap_or("apt-get update failed")
                .to_owned();
            usage!(
                "cannot use the archive {} {} ({}): {why}",
                archive.mirror,
                archive.distro.suite,
                archive.arch.debian()
            );
        }
        Ok(())
    }

    /// The signed Release file apt verified (its digest says whether the archive changed).
    pub fn release_digest(&self) -> Option<String> {
        let lists = self.dir.join("var/lib/apt/lists");
        let entry = std::fs::read_dir(&lists)
            .ok()?
            .flatten()
            .find(|e| e.file_name().to_string_lossy().ends_with("_InRelease"))?;
        let bytes = std::fs::read(entry.path()).ok()?;
        Some(hex(&Sha256::digest(&bytes)))
    }

    fn available(&self) -> Result<Vec<Stanza>, ImageError> {
        let out = self
            .apt("apt-cache")
            .arg("dumpavail")
            .output()
            .map_err(ImageError::io)?;
        if !out.status.success() {
            return Err(ImageError::Failed(anyhow::anyhow!(
                "apt-cache dumpavail failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(parse_stanzas(&String::from_utf8_lossy(&out.stdout)))
    }

    /// The closure of `packages` and every required or Essential package, as apt would
    /// install it into an empty system, without recommends.
    pub fn resolve(
        &self,
        archive: &Archive,
        packages: &[String],
    ) -> Result<Vec<PlannedDeb>, ImageError> {
        let available = self.available()?;
        let arch = archive.arch.debian();
        let mut required: Vec<String> = available
            .iter()
            .filter(|s| s.arch == arch || s.arch == "all")
            .filter(|s| s.priority == "required" || s.essential)
            .map(|s| s.package.clone())
            .collect();
        required.sort();
        required.dedup();
        // The required set is the closure of the required packages (libc6 is optional,
        // but nothing required runs without it): what the first stage unpacks.
        let base = self.print_uris(archive, &required, &[])?;
        let closure: std::collections::HashSet<&str> =
            base.iter().map(|(url, _)| url.as_str()).collect();
        let all = self.print_uris(archive, &required, packages)?;
        let by_file: HashMap<&str, &Stanza> = available
            .iter()
            .map(|s| (s.filename.rsplit('/').next().unwrap_or(""), s))
            .collect();
        let mut debs = Vec::new();
        for (url, file) in &all {
            let Some(s) = by_file.get(file.as_str()) else {
                return Err(ImageError::Failed(anyhow::anyhow!(
                    "apt chose {file}, which the archive's index does not list"
                )));
            };
            debs.push(PlannedDeb {
                name: s.package.clone(),
                version: s.version.clone(),
                arch: s.arch.clone(),
                url: url.clone(),
                file: file.clone(),
                size: s.size,
                sha256: s.sha256.clone(),
                required: closure.contains(url.as_str()),
            });
        }
        Ok(debs)
    }
}

impl AptRoot {
    /// apt's download list for installing `required` and `packages` into an empty system:
    /// (URL, the pool's file name), in apt's order.
    fn print_uris(
        &self,
        archive: &Archive,
        required: &[String],
        packages: &[String],
    ) -> Result<Vec<(String, String)>, ImageError> {
        let out = self
            .apt("apt-get")
            .args(["install", "--print-uris", "-y", "-qq"])
            .args(required)
            .args(packages)
            .output()
            .map_err(ImageError::io)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(resolution_error(archive, &stdout, &stderr));
        }
        Ok(stdout
            .lines()
            .filter_map(|l| l.strip_prefix('\''))
            .filter_map(|l| l.split_once('\''))
            // The URL's last segment is the pool's file name (apt's own second field
            // puts the version's epoch into it; the pool does not).
            .map(|(url, _)| {
                let file = percent_decoded(url.rsplit('/').next().unwrap_or(""));
                (url.to_owned(), file)
            })
            .collect())
    }
}

/// apt's reason, in one line a user can act on.
fn resolution_error(archive: &Archive, stdout: &str, stderr: &str) -> ImageError {
    let in_archive = format!("{} ({})", archive.distro.name, archive.arch.debian());
    for line in stderr.lines() {
        if let Some(p) = line.strip_prefix("E: Unable to locate package ") {
            return ImageError::Usage(format!("unknown package '{p}' in {in_archive}"));
        }
        if let Some(p) = line.strip_prefix("E: Package '") {
            let p = p.split('\'').next().unwrap_or(p);
            return ImageError::Usage(format!(
                "package '{p}' has no installable candidate in {in_archive}"
            ));
        }
        if let Some(v) = line.strip_prefix("E: Version '") {
            return ImageError::Usage(format!("no such version '{v} in {in_archive}"));
        }
    }
    let unmet: Vec<&str> = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| l.contains("Depends:") || l.contains("Conflicts:") || l.contains("Breaks:"))
        .map(str::trim)
        .collect();
    if !unmet.is_empty() {
        return ImageError::Usage(format!(
            "the packages cannot be installed together in {in_archive}: {}",
            unmet.join("; ")
        ));
    }
    let last = stderr
        .lines()
        .rfind(|l| l.starts_with("E:"))
        .unwrap_or("apt-get could not resolve the packages");
    ImageError::Usage(format!("{in_archive}: {}", last.trim_start_matches("E: ")))
}

fn parse_stanzas(text: &str) -> Vec<Stanza> {
    let mut all = Vec::new();
    let mut cur = Stanza::default();
    for line in text.lines() {
        if line.is_empty() {
            if !cur.package.is_empty() {
                all.push(std::mem::take(&mut cur));
            }
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "Package" => cur.package = value.to_owned(),
            "Version" => cur.version = value.to_owned(),
            "Architecture" => cur.arch = value.to_owned(),
            "Priority" => cur.priority = value.to_owned(),
            "Essential" => cur.essential = value == "yes",
            "Filename" => cur.filename = value.to_owned(),
            "Size" => cur.size = value.parse().unwrap_or(0),
            "SHA256" => cur.sha256 = value.to_owned(),
            _ => {}
        }
    }
    if !cur.package.is_empty() {
        all.push(cur);
    }
    all
}

/// Whether `spec` can be handed to apt as a package: a Debian package name (policy 5.6.1),
/// optionally `=VERSION`. Anything else (an option, a path, a glob) is refused here.
pub fn valid_package(spec: &str) -> bool {
    let (name, version) = match spec.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (spec, None),
    };
    let name_ok = name.len() >= 2
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
    let version_ok = version.is_none_or(|v| {
        !v.is_empty()
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".+-~:".contains(c))
    });
    name_ok && version_ok
}

/// apt's `--print-uris` names files as URLs do (`1%3a2.66` for the epoch `1:2.66`).
fn percent_decoded(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex_at = |j: usize| b.get(j).and_then(|c| (*c as char).to_digit(16));
        match (b[i], hex_at(i + 1), hex_at(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `text` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, text: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = File::create(&tmp)?;
    f.write_all(text)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stanzas_keep_the_fields_the_build_uses() {
        let text = "Package: libc6\nVersion: 2.36-9\nArchitecture: amd64\nPriority: optional\n\
                    Description: x\n more\nFilename: pool/main/g/glibc/libc6_2.36-9_amd64.deb\n\
                    Size: 10\nSHA256: ab\n\nPackage: dash\nEssential: yes\nPriority: required\n";
        let s = parse_stanzas(text);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].filename, "pool/main/g/glibc/libc6_2.36-9_amd64.deb");
        assert_eq!((s[0].size, s[0].sha256.as_str()), (10, "ab"));
        assert!(s[1].essential);
    }

    #[test]
    fn print_uris_file_names_are_decoded() {
        assert_eq!(
            percent_decoded("libcap2_1%3a2.66-4+deb12u3+b1_amd64.deb"),
            "libcap2_1:2.66-4+deb12u3+b1_amd64.deb"
        );
        assert_eq!(percent_decoded("a%zz%4"), "a%zz%4");
    }

    #[test]
    fn only_package_names_reach_apt() {
        for ok in [
            "gcc",
            "g++",
            "libc6-dev",
            "make=4.3-4.1",
            "lib32z1",
            "python3.11",
        ] {
            assert!(valid_package(ok), "{ok}");
        }
        for bad in [
            "-oDir=/",
            "",
            "G",
            "gcc*",
            "a/b",
            "gcc=",
            "x y",
            "gcc:amd64",
        ] {
            assert!(!valid_package(bad), "{bad}");
        }
    }

    #[test]
    fn apts_refusals_become_one_line() {
        let archive = Archive {
            distro: Distro::find("debian-12").unwrap(),
            arch: Arch::Amd64,
            mirror: "http://m".into(),
        };
        let e = resolution_error(&archive, "", "E: Unable to locate package nosuch\n");
        assert!(
            matches!(&e, ImageError::Usage(m) if m == "unknown package 'nosuch' in debian-12 (amd64)"),
            "{e:?}"
        );
    }
}
