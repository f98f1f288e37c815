//! `vmbuild image build|list|inspect|rm|gc`: distribution images for `run --image`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::json;

use crate::accel::AccelChoice;
use crate::exit;
use crate::image::distro::{Arch, Distro};
use crate::image::{self, BuildRequest, ImageError};
use crate::progress::Progress;

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Build a distribution image from packages (or find it in the cache) and print its path
    #[command(after_help = "\
The packages' closure (with every required package) is resolved with apt from the
archive, downloaded in parallel and installed with dpkg in a builder VM: maintainer
scripts run as root there, never on the host, so no root is needed here. Services are
kept from starting (policy-rc.d, diverted start-stop-daemon and initctl); any dpkg error
fails the build. The same inputs give a byte-identical image (SOURCE_DATE_EPOCH: the
newest package's build time unless given), kept in the cache by content: a second build
of the same request is a cache hit.

For rpm distributions, dnf resolves (`dnf download --resolve`, no root) and rpm installs
every package in one transaction in a builder VM whose root is a Debian image with rpm
(built once, cached as vmbuild-rpm-builder). Each package's digests are checked, and
for a network archive its signature against the distribution's key; a failing
scriptlet fails the build.

Distributions: debian-11, debian-12, debian-13 (amd64, i386); ubuntu-22.04, ubuntu-24.04
(amd64; untested here: give --mirror and install ubuntu-keyring); fedora-40, fedora-41
(amd64; untested here: no Fedora archive is reachable from the machines it is tested
on); rpm-local (any rpm repository on this machine, --mirror DIR, made with
createrepo_c: nothing is installed but --packages and their dependencies).

Exit status:
  0    built or found; its path is printed on stdout
  1    vmbuild or the host failed (download, builder VM)
  2    bad input: unknown distribution or package, unreachable archive, a package that
       fails to install, a --size too small
  130  interrupted; nothing is left in the cache

Environment: XDG_CACHE_HOME (where images and packages are kept), SOURCE_DATE_EPOCH,
VMBUILD_QEMU, VMBUILD_GUEST_KIT, RUST_LOG.")]
    Build(BuildArgs),
    /// List the cached images
    List(ListArgs),
    /// Show an image: distribution, packages with versions, input hash
    Inspect(InspectArgs),
    /// Remove an image (by name or key) and its names
    Rm(RmArgs),
    /// Remove unnamed images, unfinished builds and packages no image uses
    Gc,
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// The distribution, e.g. debian-12
    #[arg(long, value_name = "DISTRO")]
    distro: String,
    #[arg(long, value_enum, default_value = "amd64")]
    arch: Arch,
    /// Packages to install besides the required ones, comma-separated (Debian: NAME or
    /// NAME=VERSION; rpm: NAME or NAME-VERSION)
    #[arg(long, value_name = "PKG,...", value_delimiter = ',')]
    packages: Vec<String>,
    /// A package file of your own to install after the archive's (repeatable); what it
    /// depends on must be in the image (list it in --packages)
    #[arg(long = "deb", value_name = "FILE")]
    debs: Vec<PathBuf>,
    /// The archive (default: the one this host's apt uses for the distribution's family;
    /// for rpm distributions, the distribution's own); for rpm also a directory
    #[arg(long, value_name = "URL")]
    mirror: Option<String>,
    /// The image's file system size (sparse on disk): MiB or with a unit (4G)
    #[arg(long, value_name = "SIZE", default_value = "4G", value_parser = super::values::image_size_mib)]
    size: u64,
    /// The name to find the image by (default: the distribution, and the architecture
    /// unless amd64)
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Also copy the image to FILE (sparse)
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Never contact the archive: use the lists and packages already cached
    #[arg(long)]
    offline: bool,
    /// The builder VM's accelerator
    #[arg(long, value_name = "ACCEL", value_enum, default_value = "auto")]
    accel: AccelChoice,
    /// Print the result as JSON on stdout (path, key, name, cache hit, seconds)
    #[arg(long)]
    json: bool,
    /// No progress lines
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A name, or a key (or its first 8+ digits)
    image: String,
}

#[derive(Args, Debug)]
pub struct RmArgs {
    /// Names or keys
    #[arg(required = true)]
    images: Vec<String>,
}

impl ImageCommand {
    pub fn run(self) -> anyhow::Result<i32> {
        match self {
            ImageCommand::Build(a) => a.run(),
            ImageCommand::List(a) => list(a.json),
            ImageCommand::Inspect(a) => inspect(&a.image),
            ImageCommand::Rm(a) => rm(&a.images),
            ImageCommand::Gc => gc(),
        }
    }
}

const PREFIX: &str = "vmbuild image build:";

fn report(e: ImageError) -> i32 {
    match e {
        ImageError::Usage(m) => {
            eprintln!("{PREFIX} {m}");
            exit::USAGE
        }
        ImageError::Failed(e) => {
            eprintln!("{PREFIX} {e:#}");
            exit::FAILURE
        }
        ImageError::Interrupted => {
            eprintln!("{PREFIX} interrupted; nothing was added to the cache");
            exit::INTERRUPTED
        }
    }
}

impl BuildArgs {
    fn run(self) -> anyhow::Result<i32> {
        let distro = match Distro::find(&self.distro) {
            Ok(d) => d,
            Err(m) => {
                eprintln!("{PREFIX} {m}");
                return Ok(exit::USAGE);
            }
        };
        if self.size < 64 {
            eprintln!(
                "{PREFIX} --size {} MiB: an image needs at least 64 MiB",
                self.size
            );
            return Ok(exit::USAGE);
        }
        let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(v) => match v.trim().parse::<u64>() {
                Ok(e) => Some(e),
                Err(_) => {
                    eprintln!("{PREFIX} SOURCE_DATE_EPOCH='{v}' is not a number of seconds");
                    return Ok(exit::USAGE);
                }
            },
            Err(_) => None,
        };
        if let Some(out) = &self.out {
            if out.is_dir() {
                eprintln!(
                    "{PREFIX} --out {}: a directory; give a file name",
                    out.display()
                );
                return Ok(exit::USAGE);
            }
        }
        let req = BuildRequest {
            distro,
            arch: self.arch,
            packages: self
                .packages
                .iter()
                .filter(|p| !p.is_empty())
                .cloned()
                .collect(),
            local_debs: self.debs.clone(),
            mirror: self.mirror.clone(),
            size_bytes: self.size << 20,
            name: self.name.clone(),
            offline: self.offline,
            epoch,
            accel: self.accel,
            unpack_only: false,
        };
        if !distro.tested_here && !self.quiet {
            eprintln!(
                "{PREFIX} note: {} is supported by mirror but untested on vmbuild's own machines",
                distro.name
            );
        }
        let progress = Progress::with_prefix(PREFIX, !self.quiet);
        let signals = super::signal_channel::signal_channel()?;
        let started = std::time::Instant::now();
        let built = match image::build(&req, &progress, signals) {
            Ok(b) => b,
            Err(e) => return Ok(report(e)),
        };
        let seconds = started.elapsed().as_secs_f64();
        if let Some(out) = &self.out {
            let cp = std::process::Command::new("cp")
                .args(["--sparse=always", "--reflink=auto"])
                .arg(&built.path)
                .arg(out)
                .status();
            if !matches!(cp, Ok(s) if s.success()) {
                eprintln!("{PREFIX} cannot copy the image to {}", out.display());
                return Ok(exit::FAILURE);
            }
        }
        if !self.quiet {
            eprintln!(
                "{PREFIX} {} {} ({}, {} packages) in {seconds:.2} s",
                if built.cache_hit {
                    "cache hit:"
                } else {
                    "built"
                },
                built.name,
                &built.key[..12],
                built.info.packages.len()
            );
        }
        if self.json {
            println!(
                "{}",
                json!({
                    "path": built.path,
                    "key": built.key,
                    "name": built.name,
                    "cache_hit": built.cache_hit,
                    "seconds": seconds,
                    "packages": built.info.packages.len(),
                })
            );
        } else {
            println!("{}", built.path.display());
        }
        Ok(exit::SUCCESS)
    }
}

fn list(as_json: bool) -> anyhow::Result<i32> {
    let cache = image::image_cache();
    let images = cache.list();
    if as_json {
        let rows: Vec<_> = images
            .iter()
            .map(|l| {
                json!({
                    "key": l.key,
                    "names": l.names,
                    "distro": l.info.as_ref().map(|i| &i.distro),
                    "arch": l.info.as_ref().map(|i| &i.arch),
                    "packages": l.info.as_ref().map(|i| i.packages.len()),
                    "requested": l.info.as_ref().map(|i| &i.requested),
                    "path": l.dir.join(image::cache::IMAGE_FILE),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(exit::SUCCESS);
    }
    if images.is_empty() {
        eprintln!(
            "no images in {} (vmbuild image build --distro debian-12 makes one)",
            cache.root().display()
        );
        return Ok(exit::SUCCESS);
    }
    println!(
        "{:<24} {:<12} {:<10} {:<6} {:>8}  REQUESTED",
        "NAME", "KEY", "DISTRO", "ARCH", "PACKAGES"
    );
    for l in images {
        let names = if l.names.is_empty() {
            "-".to_owned()
        } else {
            l.names.join(",")
        };
        let (distro, arch, n, req) = match &l.info {
            Some(i) => (
                i.distro.clone(),
                i.arch.clone(),
                i.packages.len(),
                i.requested.join(","),
            ),
            None => ("?".into(), "?".into(), 0, String::new()),
        };
        println!(
            "{names:<24} {:<12} {distro:<10} {arch:<6} {n:>8}  {req}",
            &l.key[..12]
        );
    }
    Ok(exit::SUCCESS)
}

fn inspect(what: &str) -> anyhow::Result<i32> {
    let cache = image::image_cache();
    let key = match cache.find(what) {
        Ok(k) => k,
        Err(m) => {
            eprintln!("vmbuild image inspect: {m}");
            return Ok(exit::USAGE);
        }
    };
    let Some(info) = cache.info(&key) else {
        eprintln!(
            "vmbuild image inspect: the image {key} has no readable {}",
            image::cache::INFO_FILE
        );
        return Ok(exit::FAILURE);
    };
    let mut value = serde_json::to_value(&info)?;
    value["path"] = json!(cache.image_dir(&key).join(image::cache::IMAGE_FILE));
    let log = cache.image_dir(&key).join(image::cache::LOG_FILE);
    if log.is_file() {
        value["build_log"] = json!(log);
    }
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(exit::SUCCESS)
}

fn rm(what: &[String]) -> anyhow::Result<i32> {
    let cache = image::image_cache();
    let mut status = exit::SUCCESS;
    for w in what {
        match cache.find(w) {
            Ok(key) => match cache.remove(&key) {
                Ok(names) => eprintln!("removed {} ({})", &key[..12], names.join(", ")),
                Err(e) => {
                    eprintln!("vmbuild image rm: {w}: {e:?}");
                    status = exit::FAILURE;
                }
            },
            Err(m) => {
                eprintln!("vmbuild image rm: {m}");
                status = exit::USAGE;
            }
        }
    }
    Ok(status)
}

fn gc() -> anyhow::Result<i32> {
    let cache = image::image_cache();
    match cache.gc() {
        Ok(gone) => {
            for g in &gone {
                eprintln!("removed {g}");
            }
            let debs = image::gc_packages(&cache);
            eprintln!("removed {debs} cached package(s) no image uses");
            Ok(exit::SUCCESS)
        }
        Err(e) => {
            eprintln!("vmbuild image gc: {e:?}");
            Ok(exit::FAILURE)
        }
    }
}

/// `run --image`: a path to an image file, or a cached image's name or key.
pub(super) fn locate(what: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(what);
    if what.contains('/') || p.is_file() {
        if p.is_file() {
            return Ok(p);
        }
        return Err(format!("--image {what}: no such file"));
    }
    let cache = image::image_cache();
    let key = cache
        .find(what)
        .map_err(|m| format!("--image {what}: {m}"))?;
    cache
        .image_path(&key)
        .ok_or_else(|| format!("--image {what}: the image file is missing"))
}
