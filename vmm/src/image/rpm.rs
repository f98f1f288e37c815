//! Resolution for rpm distributions with the host's dnf, in a private root: its own repo
//! file, metadata cache and an empty installroot, so the closure is that of a new system.
//! `dnf download --url --resolve --alldeps` runs the real depsolver without root (dnf's
//! `install --downloadonly` insists on root); `repoquery` gives each package's version
//! and size. The packages themselves are fetched by the same parallel downloader as
//! Debian's ([`super::download`]) and each is checked with `rpmkeys --checksig`: its own
//! digests always, and for a network archive the distribution's signature as well.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

use super::apt::{hex, locked_root, Archive, PlannedDeb};
use super::ImageError;
use crate::image::usage;

/// A private dnf root for one repository, locked while this value lives.
pub struct DnfRoot {
    dir: PathBuf,
    /// Where the distribution's key is imported for `rpmkeys --checksig`; None for a
    /// local repository (the user's own packages, as `--deb` files are).
    keydb: Option<PathBuf>,
    _lock: nix::fcntl::Flock<File>,
}

/// A repository on this machine: `file://` URLs and plain directories.
pub fn is_local(mirror: &str) -> bool {
    mirror.starts_with("file://") || mirror.starts_with('/')
}

/// `--mirror` as a URL dnf and curl take: a directory becomes `file://`.
pub fn mirror_url(mirror: &str) -> String {
    if mirror.starts_with('/') {
        format!("file://{mirror}")
    } else {
        mirror.to_owned()
    }
}

impl DnfRoot {
    pub fn open(parent: &Path, archive: &Archive) -> Result<DnfRoot, ImageError> {
        let local = is_local(&archive.mirror);
        if local {
            let dir = archive.mirror.trim_start_matches("file://");
            if !Path::new(dir).join("repodata/repomd.xml").is_file() {
                usage!(
                    "--mirror {}: no rpm repository there (no repodata/repomd.xml; make one with createrepo_c)",
                    archive.mirror
                );
            }
        } else if archive.distro.keyring.is_empty() {
            usage!(
                "{} takes a repository on this machine (--mirror file:///DIR or /DIR); \
                 for a distribution's archive over the network, name the distribution",
                archive.distro.name
            );
        } else if !Path::new(archive.distro.keyring).is_file() {
            usage!(
                "{} needs the signing key {} (Debian package distribution-gpg-keys), which this host lacks",
                archive.distro.name,
                archive.distro.keyring
            );
        }
        let (dir, lock) = locked_root(
            parent,
            archive,
            archive.arch.rpm(),
            &["repos.d", "cache", "root"],
        )?;
        // Signatures are checked on the packages themselves (rpmkeys), not by dnf, which
        // only resolves here and never installs.
        std::fs::write(
            dir.join("repos.d/vmbuild.repo"),
            format!(
                "[vmbuild]\nname=vmbuild\nbaseurl={}\nenabled=1\ngpgcheck=0\n",
                archive.mirror
            ),
        )
        .map_err(ImageError::io)?;
        let keydb = if local {
            None
        } else {
            let keydb = dir.join("keys");
            std::fs::create_dir_all(&keydb).map_err(ImageError::io)?;
            let out = run(Command::new("rpmkeys")
                .arg("--dbpath")
                .arg(&keydb)
                .arg("--import")
                .arg(archive.distro.keyring))?;
            if !out.status.success() {
                return Err(ImageError::Failed(anyhow::anyhow!(
                    "rpmkeys --import {}: {}",
                    archive.distro.keyring,
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            Some(keydb)
        };
        Ok(DnfRoot {
            dir,
            keydb,
            _lock: lock,
        })
    }

    fn dnf(&self, archive: &Archive) -> Command {
        let mut c = Command::new("dnf");
        c.env("LC_ALL", "C")
            .arg("-q")
            .arg("-y")
            .arg("--installroot")
            .arg(self.dir.join("root"))
            .args(["--releasever", archive.distro.suite])
            .args(["--forcearch", archive.arch.rpm()])
            .arg(format!(
                "--setopt=reposdir={}",
                self.dir.join("repos.d").display()
            ))
            .arg(format!(
                "--setopt=cachedir={}",
                self.dir.join("cache").display()
            ))
            .args([
                "--setopt=install_weak_deps=False",
                "--setopt=skip_if_unavailable=False",
                "--repo",
                "vmbuild",
            ]);
        c
    }

    /// Fetches the repository's metadata; one that cannot be reached is the user's
    /// `--mirror` (or network), said in one line.
    pub fn update(&self, archive: &Archive) -> Result<(), ImageError> {
        let out = run(self.dnf(archive).args(["makecache", "--refresh"]))?;
        if !out.status.success() {
            let text = String::from_utf8_lossy(&out.stderr);
            let why = text
                .lines()
                .find(|l| l.starts_with("Error:") || l.contains("Cannot download"))
                .or_else(|| text.lines().next())
                .unwrap_or("dnf makecache failed")
                .trim_start_matches("Error: ");
            usage!("cannot use the repository {}: {why}", archive.mirror);
        }
        Ok(())
    }

    /// The digest of the repository's index (repomd.xml) dnf read.
    pub fn release_digest(&self) -> Option<String> {
        let cache = std::fs::read_dir(self.dir.join("cache")).ok()?;
        for entry in cache.flatten() {
            let repomd = entry.path().join("repodata/repomd.xml");
            if entry.file_name().to_string_lossy().starts_with("vmbuild-") && repomd.is_file() {
                return Some(hex(&Sha256::digest(std::fs::read(repomd).ok()?)));
            }
        }
        None
    }

    /// The closure of `packages` as dnf would install it into an empty root, without
    /// weak dependencies: one entry per package file, in dnf's order. The digests are
    /// filled in once the files are here ([`DnfRoot::verify`]).
    pub fn resolve(
        &self,
        archive: &Archive,
        packages: &[String],
        offline: bool,
    ) -> Result<Vec<PlannedDeb>, ImageError> {
        let mut download = self.dnf(archive);
        if offline {
            download.arg("--cacheonly");
        }
        let out = run(download
            .args(["download", "--url", "--resolve", "--alldeps"])
            .args(packages))?;
        if !out.status.success() {
            return Err(resolution_error(
                archive,
                &String::from_utf8_lossy(&out.stderr),
            ));
        }
        let urls: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| l.contains("://") && l.ends_with(".rpm"))
            .map(str::to_owned)
            .collect();
        if urls.is_empty() {
            usage!("dnf resolved nothing for {}", packages.join(" "));
        }
        // name-version-release.arch, the file name without .rpm: what repoquery takes.
        let nevras: Vec<String> = urls
            .iter()
            .map(|u| file_of(u).trim_end_matches(".rpm").to_owned())
            .collect();
        let mut query = self.dnf(archive);
        query.arg("--cacheonly").args([
            "repoquery",
            "--qf",
            "%{location}\t%{name}\t%{evr}\t%{arch}\t%{downloadsize}",
        ]);
        let out = run(query.args(&nevras))?;
        if !out.status.success() {
            return Err(ImageError::Failed(anyhow::anyhow!(
                "dnf repoquery failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut planned = Vec::new();
        for url in &urls {
            let file = file_of(url);
            let row = text
                .lines()
                .map(|l| l.split('\t').collect::<Vec<_>>())
                .find(|f| f.len() == 5 && file_of(f[0]) == file)
                .ok_or_else(|| {
                    ImageError::Failed(anyhow::anyhow!(
                        "dnf chose {file}, which repoquery does not list"
                    ))
                })?;
            planned.push(PlannedDeb {
                name: row[1].to_owned(),
                version: row[2].to_owned(),
                arch: row[3].to_owned(),
                url: url.clone(),
                file: file.to_owned(),
                size: row[4].parse().unwrap_or(0),
                sha256: String::new(),
                required: false,
            });
        }
        Ok(planned)
    }

    /// Checks a downloaded package: its digests, and for a network archive the
    /// distribution's signature. Returns why not.
    pub fn verify(&self, file: &Path) -> Result<(), String> {
        let mut check = Command::new("rpmkeys");
        match &self.keydb {
            Some(db) => check.arg("--dbpath").arg(db),
            None => check.arg("--nosignature"),
        };
        let out = check
            .arg("--checksig")
            .arg(file)
            .env("LC_ALL", "C")
            .output()
            .map_err(|e| format!("running rpmkeys (Debian package rpm): {e}"))?;
        let said = String::from_utf8_lossy(&out.stdout);
        let said = said.trim();
        let signed = self.keydb.is_none() || said.ends_with("signatures OK");
        if out.status.success() && said.ends_with(" OK") && signed {
            Ok(())
        } else {
            Err(format!("rpmkeys --checksig: {said}"))
        }
    }
}

/// The newest build time among the packages: SOURCE_DATE_EPOCH when none is given.
pub fn newest_build_time(files: &[PathBuf]) -> Result<u64, ImageError> {
    if files.is_empty() {
        return Ok(0);
    }
    let out = run(Command::new("rpm")
        .args(["-qp", "--nosignature", "--qf", "%{BUILDTIME}\\n"])
        .args(files))?;
    if !out.status.success() {
        return Err(ImageError::Failed(anyhow::anyhow!(
            "rpm -qp: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .max()
        .unwrap_or(0))
}

/// Whether `spec` can be handed to dnf as a package: an rpm name (letters, digits and
/// `._+-`, not starting with `-`), optionally `-VERSION` as dnf takes it. Options,
/// paths and globs are refused here.
pub fn valid_package(spec: &str) -> bool {
    !spec.is_empty()
        && spec.starts_with(|c: char| c.is_ascii_alphanumeric())
        && spec
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c))
}

fn file_of(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}

fn run(cmd: &mut Command) -> Result<Output, ImageError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.output().map_err(|e| {
        ImageError::Failed(anyhow::anyhow!(
            "running {program} (Debian packages dnf, dnf-plugins-core and rpm): {e}"
        ))
    })
}

/// dnf's reason, in one line a user can act on.
fn resolution_error(archive: &Archive, stderr: &str) -> ImageError {
    let in_repo = format!("{} ({})", archive.distro.name, archive.mirror);
    for line in stderr.lines() {
        if let Some(p) = line.strip_prefix("No package ") {
            let p = p.trim_end_matches(" available.");
            return ImageError::Usage(format!("unknown package '{p}' in {in_repo}"));
        }
    }
    let problems: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("- ") || l.starts_with("Problem"))
        .collect();
    if !problems.is_empty() {
        return ImageError::Usage(format!(
            "the packages cannot be installed together from {in_repo}:\n{}",
            problems.join("\n")
        ));
    }
    ImageError::Usage(format!(
        "dnf cannot resolve the packages from {in_repo}: {}",
        stderr.trim()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_a_file_url_and_local() {
        assert_eq!(mirror_url("/srv/repo"), "file:///srv/repo");
        assert!(is_local("file:///srv/repo") && is_local("/srv/repo"));
        assert!(!is_local("https://dl.fedoraproject.org/pub/fedora"));
        assert_eq!(
            file_of("file:///r/Packages/a-1-1.noarch.rpm"),
            "a-1-1.noarch.rpm"
        );
    }

    #[test]
    fn rpm_names_keep_their_case_and_options_are_refused() {
        for ok in [
            "perl-Data-Dumper",
            "python3-PyYAML",
            "gcc-c++",
            "glibc-2.39",
        ] {
            assert!(valid_package(ok), "{ok}");
        }
        for bad in ["", "-y", "--installroot=/", "a/b", "gcc*", "a b", "@core"] {
            assert!(!valid_package(bad), "{bad}");
        }
    }
}
