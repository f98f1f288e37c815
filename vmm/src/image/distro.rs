//! The distributions `vmbuild image build` knows: their suites, archives, keyrings and
//! architectures, and which package manager installs them.

use std::path::Path;

/// How a distribution's packages are resolved and installed: each value has its own
/// resolver and builder recipe, and the rest of the build (download, cache, mkfs, the
/// image's use) is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackageManager {
    /// apt resolves; dpkg unpacks and configures in a builder VM on the guest kit.
    Dpkg,
    /// dnf resolves; rpm installs in a builder VM whose root is a Debian image with rpm.
    Rpm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Amd64,
    I386,
}

impl Arch {
    /// Debian's name for it.
    pub fn debian(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::I386 => "i386",
        }
    }

    /// rpm's name for it.
    pub fn rpm(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64",
            Arch::I386 => "i686",
        }
    }

    /// What `uname -m` says in a guest with this userland: the kit's kernel is 64-bit
    /// either way, and a 32-bit program sees `i686` only through `linux32`; `file` on its
    /// binaries says "ELF 32-bit".
    pub fn elf_class(self) -> &'static str {
        match self {
            Arch::Amd64 => "ELF 64-bit",
            Arch::I386 => "ELF 32-bit",
        }
    }

    /// The merged-/usr links the root gets before anything is unpacked (as debootstrap
    /// makes them): every path under them is the same file under /usr.
    pub fn merged_usr_links(self) -> &'static [&'static str] {
        match self {
            Arch::Amd64 => &["bin", "sbin", "lib", "lib64"],
            Arch::I386 => &["bin", "sbin", "lib"],
        }
    }
}

#[derive(Debug)]
pub struct Distro {
    /// What the user types: `debian-12`.
    pub name: &'static str,
    /// The suite (Debian: `bookworm`), or the release version dnf's `$releasever` takes.
    pub suite: &'static str,
    pub components: &'static str,
    /// Used when the host's apt names no archive for this family; empty where there is
    /// no default and `--mirror` must be given.
    pub default_mirror: &'static str,
    /// The archive's signing keys (apt's keyring, or the key rpmkeys imports); empty
    /// where only a local repository is taken.
    pub keyring: &'static str,
    /// Installed whatever `--packages` says (Debian's base is Priority required,
    /// found in the archive, so its list is empty).
    pub base_packages: &'static [&'static str],
    pub archs: &'static [Arch],
    pub manager: PackageManager,
    /// False where no archive of this family is reachable from the machines the project
    /// is tested on: it works by `--mirror` but nobody here has seen it work.
    pub tested_here: bool,
}

const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const UBUNTU_MIRROR: &str = "http://archive.ubuntu.com/ubuntu";
const UBUNTU_KEYRING: &str = "/usr/share/keyrings/ubuntu-archive-keyring.gpg";

pub const DISTROS: &[Distro] = &[
    Distro {
        name: "debian-11",
        suite: "bullseye",
        components: "main",
        default_mirror: DEBIAN_MIRROR,
        keyring: DEBIAN_KEYRING,
        archs: &[Arch::Amd64, Arch::I386],
        base_packages: &[],
        manager: PackageManager::Dpkg,
        tested_here: true,
    },
    Distro {
        name: "debian-12",
        suite: "bookworm",
        components: "main",
        default_mirror: DEBIAN_MIRROR,
        keyring: DEBIAN_KEYRING,
        archs: &[Arch::Amd64, Arch::I386],
        base_packages: &[],
        manager: PackageManager::Dpkg,
        tested_here: true,
    },
    Distro {
        name: "debian-13",
        suite: "trixie",
        components: "main",
        default_mirror: DEBIAN_MIRROR,
        keyring: DEBIAN_KEYRING,
        archs: &[Arch::Amd64, Arch::I386],
        base_packages: &[],
        manager: PackageManager::Dpkg,
        tested_here: true,
    },
    Distro {
        name: "ubuntu-22.04",
        suite: "jammy",
        components: "main",
        default_mirror: UBUNTU_MIRROR,
        keyring: UBUNTU_KEYRING,
        archs: &[Arch::Amd64],
        base_packages: &[],
        manager: PackageManager::Dpkg,
        tested_here: false,
    },
    Distro {
        name: "ubuntu-24.04",
        suite: "noble",
        components: "main",
        default_mirror: UBUNTU_MIRROR,
        keyring: UBUNTU_KEYRING,
        archs: &[Arch::Amd64],
        base_packages: &[],
        manager: PackageManager::Dpkg,
        tested_here: false,
    },
    Distro {
        name: "fedora-40",
        suite: "40",
        components: "",
        default_mirror:
            "https://dl.fedoraproject.org/pub/fedora/linux/releases/40/Everything/x86_64/os",
        keyring: "/usr/share/distribution-gpg-keys/fedora/RPM-GPG-KEY-fedora-40-primary",
        base_packages: FEDORA_BASE,
        archs: &[Arch::Amd64],
        manager: PackageManager::Rpm,
        tested_here: false,
    },
    Distro {
        name: "fedora-41",
        suite: "41",
        components: "",
        default_mirror:
            "https://dl.fedoraproject.org/pub/fedora/linux/releases/41/Everything/x86_64/os",
        keyring: "/usr/share/distribution-gpg-keys/fedora/RPM-GPG-KEY-fedora-41-primary",
        base_packages: FEDORA_BASE,
        archs: &[Arch::Amd64],
        manager: PackageManager::Rpm,
        tested_here: false,
    },
    // Any rpm repository on this machine (createrepo_c), nothing installed but what
    // --packages names and its dependencies: how the rpm installer is tested here, with
    // packages built by rpmbuild, since no rpm distribution's archive is reachable.
    Distro {
        name: "rpm-local",
        suite: "0",
        components: "",
        default_mirror: "",
        keyring: "",
        base_packages: &[],
        archs: &[Arch::Amd64],
        manager: PackageManager::Rpm,
        tested_here: true,
    },
];

/// A Fedora root a command can run in: mock's minimal buildroot without the build tools.
const FEDORA_BASE: &[&str] = &[
    "bash",
    "coreutils",
    "filesystem",
    "glibc-minimal-langpack",
    "rpm",
    "shadow-utils",
];

impl Distro {
    pub fn find(name: &str) -> Result<&'static Distro, String> {
        DISTROS.iter().find(|d| d.name == name).ok_or_else(|| {
            let known: Vec<&str> = DISTROS.iter().map(|d| d.name).collect();
            format!(
                "unknown distribution '{name}' (known: {})",
                known.join(", ")
            )
        })
    }

    fn is_ubuntu(&self) -> bool {
        self.name.starts_with("ubuntu-")
    }

    /// The archive to use without `--mirror`: the first one of this family that the
    /// host's apt is configured with, else the family's public one.
    pub fn mirror(&self) -> String {
        if self.manager == PackageManager::Rpm {
            return self.default_mirror.to_owned();
        }
        host_mirrors()
            .into_iter()
            .find(|uri| {
                let ubuntu = uri.contains("ubuntu");
                ubuntu == self.is_ubuntu() && !uri.contains("security")
            })
            .unwrap_or_else(|| self.default_mirror.to_owned())
    }
}

/// The archive URIs in the host's apt sources, both formats (`deb URI suite …` lines and
/// deb822 `URIs:` fields), in the order apt reads them.
fn host_mirrors() -> Vec<String> {
    let mut files = vec![Path::new("/etc/apt/sources.list").to_path_buf()];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<_> = dir.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    let mut uris = Vec::new();
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        uris.extend(mirrors_in(&text));
    }
    uris
}

fn mirrors_in(text: &str) -> Vec<String> {
    let mut uris = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("URIs:") {
            uris.extend(
                rest.split_whitespace()
                    .map(|u| u.trim_end_matches('/').to_owned()),
            );
        } else if let Some(rest) = line.strip_prefix("deb ") {
            // `deb [options] URI suite components`
            let rest = match rest.trim_start().strip_prefix('[') {
                Some(r) => r.split_once(']').map(|(_, r)| r).unwrap_or(""),
                None => rest,
            };
            if let Some(uri) = rest.split_whitespace().next() {
                uris.push(uri.trim_end_matches('/').to_owned());
            }
        }
    }
    uris.retain(|u| u.starts_with("http://") || u.starts_with("https://"));
    uris
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_source_formats_name_their_archives() {
        let one_line = "# comment\ndeb [signed-by=/k.gpg arch=amd64] http://mirror.example/debian/ bookworm main\ndeb-src http://x/ y z\n";
        assert_eq!(mirrors_in(one_line), ["http://mirror.example/debian"]);
        let deb822 = "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n";
        assert_eq!(mirrors_in(deb822), ["http://deb.debian.org/debian"]);
        assert!(mirrors_in("deb file:/srv/repo ./\n").is_empty());
    }

    #[test]
    fn an_unknown_distribution_lists_the_known_ones() {
        let err = Distro::find("debian-99").unwrap_err();
        assert!(err.contains("debian-12"), "{err}");
        assert_eq!(Distro::find("debian-12").unwrap().suite, "bookworm");
    }
}
