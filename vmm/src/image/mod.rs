//! Distribution images from packages (`vmbuild image build`), for `run --image`.
//!
//! A build goes: resolve the closure in a private root (apt, [`apt`]; or dnf, [`rpm`]),
//! download it in parallel into the package cache ([`download`]), fill a new root with
//! the distribution's installer in a builder VM ([`builder`]), and pack the result with
//! `mke2fs -d` from a sorted tar with fixed UUID, hash seed and times, so the same inputs
//! give the same bytes. Images are kept by content in the [`cache`].

pub mod apt;
pub mod builder;
pub mod cache;
pub mod deb;
pub mod distro;
pub mod download;
pub mod mkfs;
pub mod rpm;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::accel::AccelChoice;
use crate::owned_dir::OwnedDir;
use crate::progress::Progress;
use apt::{hex, AptRoot, Archive, PlannedDeb};
use cache::{ImageCache, ImageInfo, PackageEntry, Request, BUILDING_PREFIX, IMAGE_FILE, INFO_FILE};
use distro::{Arch, Distro, PackageManager};

/// The version of what an image key covers; bump it when the image's bytes would change
/// for the same packages (the recipe's own digest is in the key too).
const IMAGE_FORMAT: u32 = 1;

#[derive(Debug)]
pub enum ImageError {
    /// The input cannot work (exit 2): an unknown package, an unreachable archive, a
    /// package that fails to configure, a size too small.
    Usage(String),
    /// vmbuild or the host failed (exit 1).
    Failed(anyhow::Error),
    Interrupted,
}

impl ImageError {
    pub fn io(e: std::io::Error) -> ImageError {
        ImageError::Failed(e.into())
    }
}

macro_rules! usage {
    ($($t:tt)*) => { return Err($crate::image::ImageError::Usage(format!($($t)*))) };
}
pub(crate) use usage;

/// Where images, packages and apt roots are kept.
pub fn image_cache() -> ImageCache {
    ImageCache::new(crate::cache_dir::cache_dir().join("images"))
}

fn deb_cache() -> PathBuf {
    crate::cache_dir::cache_dir().join("debs")
}

fn rpm_cache() -> PathBuf {
    crate::cache_dir::cache_dir().join("rpms")
}

fn apt_roots() -> PathBuf {
    crate::cache_dir::cache_dir().join("apt")
}

fn dnf_roots() -> PathBuf {
    crate::cache_dir::cache_dir().join("dnf")
}

/// `vmbuild image build`'s inputs.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    pub distro: &'static Distro,
    pub arch: Arch,
    pub packages: Vec<String>,
    /// Package files of the user's own (`--deb`), installed after the archive's, as
    /// vmTools' fillDiskWithDebs took them. Their dependencies must be in the image.
    pub local_debs: Vec<PathBuf>,
    pub mirror: Option<String>,
    pub size_bytes: u64,
    pub name: Option<String>,
    /// Use the cache and the lists already fetched; never ask the archive.
    pub offline: bool,
    /// SOURCE_DATE_EPOCH; default: the newest package's build time.
    pub epoch: Option<u64>,
    pub accel: AccelChoice,
    /// Every package's files and nothing configured (no maintainer script runs): a
    /// builder's own root, whose programs need only their files and libraries. Debian
    /// only; never what a user asks for.
    pub unpack_only: bool,
}

pub struct Built {
    pub key: String,
    pub name: String,
    pub path: PathBuf,
    pub info: ImageInfo,
    pub cache_hit: bool,
}

impl BuildRequest {
    /// The name an image gets without `--name`: the distribution (and architecture).
    pub fn default_name(&self) -> String {
        match self.arch {
            Arch::Amd64 => self.distro.name.to_owned(),
            other => format!("{}-{}", self.distro.name, other.debian()),
        }
    }

    fn archive(&self) -> Archive {
        let mirror = self.mirror.clone().unwrap_or_else(|| self.distro.mirror());
        // A repository on this machine, by absolute path: rpm's tools and curl take
        // file:// URLs.
        let mirror = match std::fs::canonicalize(&mirror) {
            Ok(dir) if !mirror.contains("://") => rpm::mirror_url(&dir.to_string_lossy()),
            _ => mirror,
        };
        Archive {
            distro: self.distro,
            arch: self.arch,
            mirror: mirror.trim_end_matches('/').to_owned(),
        }
    }

    /// The packages to resolve: the distribution's base and the user's.
    fn all_packages(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .distro
            .base_packages
            .iter()
            .map(|p| p.to_string())
            .collect();
        all.extend(self.packages.iter().cloned());
        all
    }

    /// The digest of the command line's inputs.
    fn request_hash(&self, archive: &Archive) -> String {
        let mut packages = self.packages.clone();
        packages.sort();
        packages.dedup();
        let text = serde_json::json!({
            "format": IMAGE_FORMAT,
            "distro": self.distro.name,
            "arch": self.arch.debian(),
            "mirror": archive.mirror,
            "packages": packages,
            "local_debs": self.local_debs.iter().map(|p| download::sha256_file(p).unwrap_or_default()).collect::<Vec<_>>(),
            "size": self.size_bytes,
            "epoch": self.epoch,
            "recipe": builder::recipe_digest(self.distro.manager),
            "unpack_only": self.unpack_only,
        });
        hex(&Sha256::digest(text.to_string().as_bytes()))
    }
}

/// Checks what can be checked before any work: the architecture, the package names, a
/// usable `mke2fs`.
pub fn check(req: &BuildRequest) -> Result<(), ImageError> {
    if !req.distro.archs.contains(&req.arch) {
        usage!(
            "{} has no {} architecture here (it has: {})",
            req.distro.name,
            req.arch.debian(),
            req.distro
                .archs
                .iter()
                .map(|a| a.debian())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    match req.distro.manager {
        PackageManager::Dpkg => {
            if let Some(bad) = req.packages.iter().find(|p| !apt::valid_package(p)) {
                usage!("'{bad}' is not a package name (lowercase letters, digits, + - .; NAME=VERSION pins a version)");
            }
        }
        PackageManager::Rpm => {
            if let Some(bad) = req.packages.iter().find(|p| !rpm::valid_package(p)) {
                usage!("'{bad}' is not an rpm package name (letters, digits, . _ + -; NAME-VERSION pins a version)");
            }
            if !req.local_debs.is_empty() {
                usage!(
                    "--deb is for Debian distributions; {} takes its packages from a repository (make one with createrepo_c and give --mirror)",
                    req.distro.name
                );
            }
        }
    }
    for deb in &req.local_debs {
        deb::local_fields(deb)?;
    }
    if let Some(name) = &req.name {
        if name.is_empty()
            || name.starts_with('.')
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c))
        {
            usage!("--name '{name}': use letters, digits and - _ . + (not starting with .)");
        }
    }
    mkfs::host_tools().map_err(ImageError::Failed)?;
    Ok(())
}

/// Builds the image `req` describes, or finds it in the cache.
pub fn build(
    req: &BuildRequest,
    progress: &Progress,
    signals: Receiver<()>,
) -> Result<Built, ImageError> {
    check(req)?;
    let started = Instant::now();
    let cache = image_cache();
    cache.ensure()?;
    crate::owned_dir::sweep(cache.root(), BUILDING_PREFIX);
    let archive = archive_checked(req)?;
    let name = req.name.clone().unwrap_or_else(|| req.default_name());
    let request_hash = req.request_hash(&archive);

    // An unchanged request against an unchanged archive: no resolution at all.
    if let Some(known) = cache.request(&request_hash) {
        if cache.image_path(&known.key).is_some()
            && (req.offline || current_release(&archive).as_deref() == Some(&known.release_digest))
        {
            return hit(&cache, known.key, name);
        }
    }

    // Before the long work: the accelerator's probe boots a guest once per host and kit,
    // and is better paid (and seen) now than after the downloads.
    let accel = builder_accel(req.accel, progress)?;
    let plan = match req.distro.manager {
        PackageManager::Dpkg => plan_debs(req, &archive, progress, &signals)?,
        PackageManager::Rpm => plan_rpms(req, &archive, progress, &signals)?,
    };
    let key = image_key(req, &plan.packages, plan.epoch);
    let remember = Request {
        key: key.clone(),
        release_digest: plan.release.clone(),
    };
    if cache.image_path(&key).is_some() {
        cache.set_request(&request_hash, &remember)?;
        return hit(&cache, key, name);
    }

    let (tar, work) = install(req, &archive, &plan, accel, &cache, progress, signals)?;
    let step = progress.step("making the ext4 image");
    let fs_uuid = uuid_of(&key);
    let image = work.path().join(IMAGE_FILE);
    mkfs::mkfs(&tar, &image, req.size_bytes, plan.epoch, &fs_uuid)?;
    // The installer's and the scripts' words, with the phases' times, kept with the image.
    let _ = std::fs::rename(
        work.path().join("out/build.log"),
        work.path().join(cache::LOG_FILE),
    );
    let _ = std::fs::remove_dir_all(work.path().join("out"));
    let _ = std::fs::remove_dir_all(work.path().join("build"));
    step.done();
    let mut info = image_info(req, &archive, &plan, &key, fs_uuid);
    info.build_seconds = started.elapsed().as_secs_f64();
    let json = serde_json::to_vec_pretty(&info).expect("serializable");
    std::fs::write(work.path().join(INFO_FILE), json).map_err(ImageError::io)?;
    // Remove what a crashed builder may have left; a concurrent build of the same key may
    // have finished first, and then its image is as good as this one.
    let dest = cache.image_dir(&key);
    if let Err(e) = work.persist_as(&dest) {
        if cache.image_path(&key).is_none() {
            return Err(ImageError::Failed(anyhow::anyhow!(
                "storing the image in {}: {e}",
                dest.display()
            )));
        }
    }
    cache.set_name(&name, &key)?;
    cache.set_request(&request_hash, &remember)?;
    Ok(Built {
        path: cache.image_dir(&key).join(IMAGE_FILE),
        key,
        name,
        info,
        cache_hit: false,
    })
}

/// Installs the planned packages into a new root in a builder VM, in an owned building
/// directory of the cache; returns the root as a tar file and that directory.
fn install(
    req: &BuildRequest,
    archive: &Archive,
    plan: &Plan,
    accel: crate::qemu::accel::Accel,
    cache: &ImageCache,
    progress: &Progress,
    signals: Receiver<()>,
) -> Result<(PathBuf, OwnedDir), ImageError> {
    match req.distro.manager {
        PackageManager::Dpkg => {
            let work = OwnedDir::create(cache.root(), BUILDING_PREFIX).map_err(ImageError::io)?;
            let tar = builder::dpkg::run_builder(
                &builder::dpkg::BuilderInput {
                    archive,
                    debs: &plan.packages,
                    deb_cache: &plan.files,
                    epoch: plan.epoch,
                    size_bytes: req.size_bytes,
                    work: work.path(),
                    accel,
                    unpack_only: req.unpack_only,
                },
                progress,
                signals,
            )?;
            Ok((tar, work))
        }
        PackageManager::Rpm => {
            let (builder_image, signals) = relay(signals, |signals| {
                rpm_builder_image(
                    req,
                    &Progress::with_prefix(
                        "vmbuild image build (rpm builder):",
                        progress.enabled(),
                    ),
                    signals,
                )
            });
            let builder_image = builder_image?;
            // Only now: the builder image's own build sweeps what is not alive.
            let work = OwnedDir::create(cache.root(), BUILDING_PREFIX).map_err(ImageError::io)?;
            let tar = builder::rpm::run_builder(
                &builder::rpm::RpmInput {
                    archive,
                    packages: &plan.packages,
                    cache: &plan.files,
                    epoch: plan.epoch,
                    size_bytes: req.size_bytes,
                    work: work.path(),
                    accel,
                    builder_image,
                },
                progress,
                signals,
            )?;
            Ok((tar, work))
        }
    }
}

/// What `image inspect` shows and the cache keeps next to the image (its build time is
/// the caller's to fill in).
fn image_info(
    req: &BuildRequest,
    archive: &Archive,
    plan: &Plan,
    key: &str,
    fs_uuid: String,
) -> ImageInfo {
    ImageInfo {
        format: IMAGE_FORMAT,
        key: key.to_owned(),
        distro: req.distro.name.to_owned(),
        suite: req.distro.suite.to_owned(),
        arch: req.arch.debian().to_owned(),
        mirror: archive.mirror.clone(),
        requested: req
            .packages
            .iter()
            .cloned()
            .chain(req.local_debs.iter().map(|d| d.display().to_string()))
            .collect(),
        packages: plan
            .packages
            .iter()
            .map(|d| PackageEntry {
                name: d.name.clone(),
                version: d.version.clone(),
                arch: d.arch.clone(),
                sha256: d.sha256.clone(),
            })
            .collect(),
        source_date_epoch: plan.epoch,
        size_bytes: req.size_bytes,
        fs_uuid,
        build_seconds: 0.0,
    }
}

/// What resolution hands the builder.
struct Plan {
    /// In install order, each in `files` and verified, with its SHA-256.
    packages: Vec<PlannedDeb>,
    files: PathBuf,
    /// The digest of the archive's index the resolution read.
    release: String,
    /// SOURCE_DATE_EPOCH.
    epoch: u64,
}

fn plan_debs(
    req: &BuildRequest,
    archive: &Archive,
    progress: &Progress,
    signals: &Receiver<()>,
) -> Result<Plan, ImageError> {
    let apt = AptRoot::open(&apt_roots(), archive)?;
    if !req.offline {
        let step = progress.step(&format!(
            "reading the archive ({} {} {})",
            archive.mirror,
            archive.distro.suite,
            archive.arch.debian()
        ));
        apt.update(archive)?;
        step.done();
    }
    let release = apt.release_digest().ok_or_else(|| no_lists(archive))?;
    let step = progress.step("resolving the packages");
    let mut debs = apt.resolve(archive, &req.all_packages())?;
    drop(apt);
    step.done();
    let files = deb_cache();
    for local in &req.local_debs {
        debs.push(deb::add_local(local, &files)?);
    }
    note_plan(progress, &debs);
    download::fetch_all(
        &debs,
        &files,
        progress,
        signals,
        &download::has_indexed_digest,
    )?;
    let epoch = match req.epoch {
        Some(e) => e,
        None => newest_package(&debs, &files)?,
    };
    Ok(Plan {
        packages: debs,
        files,
        release,
        epoch,
    })
}

fn plan_rpms(
    req: &BuildRequest,
    archive: &Archive,
    progress: &Progress,
    signals: &Receiver<()>,
) -> Result<Plan, ImageError> {
    let dnf = rpm::DnfRoot::open(&dnf_roots(), archive)?;
    if !req.offline {
        let step = progress.step(&format!(
            "reading the repository ({} {})",
            archive.mirror,
            archive.arch.rpm()
        ));
        dnf.update(archive)?;
        step.done();
    }
    let release = dnf.release_digest().ok_or_else(|| no_lists(archive))?;
    let step = progress.step("resolving the packages");
    let mut packages = dnf.resolve(archive, &req.all_packages(), req.offline)?;
    step.done();
    note_plan(progress, &packages);
    let files = rpm_cache();
    download::fetch_all(&packages, &files, progress, signals, &|_, file| {
        dnf.verify(file)
    })?;
    let mut paths = Vec::new();
    for p in &mut packages {
        let path = download::cached_path(&files, p);
        p.sha256 = download::sha256_file(&path).map_err(ImageError::io)?;
        paths.push(path);
    }
    let epoch = match req.epoch {
        Some(e) => e,
        None => rpm::newest_build_time(&paths)?,
    };
    Ok(Plan {
        packages,
        files,
        release,
        epoch,
    })
}

fn no_lists(archive: &Archive) -> ImageError {
    ImageError::Usage(format!(
        "no index of {} {} is cached; build once without --offline",
        archive.mirror, archive.distro.suite
    ))
}

fn note_plan(progress: &Progress, packages: &[PlannedDeb]) {
    let required = packages.iter().filter(|d| d.required).count();
    let size = packages.iter().map(|d| d.size).sum::<u64>() as f64 / 1e6;
    progress.note(&if required > 0 {
        format!(
            "{} packages ({required} required), {size:.1} MB",
            packages.len()
        )
    } else {
        format!("{} packages, {size:.1} MB", packages.len())
    });
}

/// The Debian image with rpm that the rpm builder boots: built like any other image
/// (once, then a cache hit), on the host's Debian archive.
fn rpm_builder_image(
    req: &BuildRequest,
    progress: &Progress,
    signals: Receiver<()>,
) -> Result<PathBuf, ImageError> {
    let builder = BuildRequest {
        distro: Distro::find(builder::rpm::BUILDER_DISTRO).map_err(ImageError::Usage)?,
        arch: Arch::Amd64,
        packages: builder::rpm::BUILDER_PACKAGES
            .iter()
            .map(|p| p.to_string())
            .collect(),
        local_debs: Vec::new(),
        mirror: None,
        size_bytes: 1 << 30,
        name: Some(builder::rpm::BUILDER_IMAGE_NAME.to_owned()),
        offline: req.offline,
        epoch: None,
        accel: req.accel,
        // rpm and its libraries are all the builder runs (rpm.sh's tools are in the
        // required set): no dpkg configuration, a few seconds of extraction instead of
        // minutes of maintainer scripts under TCG.
        unpack_only: true,
    };
    Ok(build(&builder, progress, signals)?.path)
}

/// Runs `f` with a receiver of its own that gets every signal `signals` gets while `f`
/// runs, and gives `signals` back: a VM run consumes its receiver, and an rpm build runs
/// two VMs (its builder image's, the first time, and its own).
fn relay<T>(signals: Receiver<()>, f: impl FnOnce(Receiver<()>) -> T) -> (T, Receiver<()>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (tx, rx) = std::sync::mpsc::channel();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let forwarder = s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                if signals.recv_timeout(Duration::from_millis(100)).is_ok() {
                    let _ = tx.send(());
                }
            }
            signals
        });
        let out = f(rx);
        done.store(true, Ordering::Relaxed);
        (
            out,
            forwarder.join().expect("the signal relay does not panic"),
        )
    })
}

/// The builder VM's accelerator (`auto`: KVM where it runs Linux, found by a probe that
/// is cached; its notice is a progress line here).
fn builder_accel(
    choice: AccelChoice,
    progress: &Progress,
) -> Result<crate::qemu::accel::Accel, ImageError> {
    let qemu = crate::qemu::QemuBinary::locate().map_err(ImageError::Failed)?;
    let kit = crate::guest::kit::GuestKit::locate().map_err(ImageError::Failed)?;
    let (accel, notice) = crate::accel::resolve(choice, &qemu.path, &kit.kernel, &kit.initrd);
    if let Some(n) = notice {
        progress.note(&n);
    }
    Ok(accel)
}

fn archive_checked(req: &BuildRequest) -> Result<Archive, ImageError> {
    let archive = req.archive();
    let network = archive.mirror.starts_with("http://") || archive.mirror.starts_with("https://");
    match req.distro.manager {
        PackageManager::Dpkg if !network => usage!(
            "--mirror {}: give an http:// or https:// URL of a Debian-style archive",
            archive.mirror
        ),
        PackageManager::Rpm if archive.mirror.is_empty() => usage!(
            "{} needs --mirror: a repository on this machine (a directory made with createrepo_c)",
            req.distro.name
        ),
        PackageManager::Rpm if !network && !rpm::is_local(&archive.mirror) => usage!(
            "--mirror {}: give an http:// or https:// URL, or the directory of an rpm repository",
            archive.mirror
        ),
        _ => Ok(archive),
    }
}

fn hit(cache: &ImageCache, key: String, name: String) -> Result<Built, ImageError> {
    let info = cache.info(&key).ok_or_else(|| {
        ImageError::Failed(anyhow::anyhow!(
            "the cached image {key} has no readable {INFO_FILE}; remove it with vmbuild image rm {key}"
        ))
    })?;
    cache.set_name(&name, &key)?;
    Ok(Built {
        path: cache.image_dir(&key).join(IMAGE_FILE),
        key,
        name,
        info,
        cache_hit: true,
    })
}

/// The digest of the archive's signed Release as it is now (one small request), or None
/// when it cannot be fetched.
fn current_release(archive: &Archive) -> Option<String> {
    let url = match archive.distro.manager {
        PackageManager::Dpkg => format!(
            "{}/dists/{}/InRelease",
            archive.mirror, archive.distro.suite
        ),
        PackageManager::Rpm => format!("{}/repodata/repomd.xml", archive.mirror),
    };
    let out = Command::new("curl")
        .args(["--fail", "--silent", "--location", "--max-time", "10"])
        .arg(&url)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| hex(&Sha256::digest(&out.stdout)))
}

/// The build time of the newest package: SOURCE_DATE_EPOCH when none is given, so the
/// same packages give the same times, and no file claims to be older than its package.
fn newest_package(debs: &[PlannedDeb], cache: &Path) -> Result<u64, ImageError> {
    let mut newest = 0;
    for d in debs {
        let t = deb::data_mtime(&download::cached_path(cache, d)).map_err(ImageError::io)?;
        newest = newest.max(t);
    }
    Ok(newest)
}

/// Everything that decides the image's bytes.
fn image_key(req: &BuildRequest, debs: &[PlannedDeb], epoch: u64) -> String {
    let mut packages: Vec<String> = debs
        .iter()
        .map(|d| format!("{} {} {} {}", d.name, d.version, d.arch, d.sha256))
        .collect();
    packages.sort();
    let text = serde_json::json!({
        "format": IMAGE_FORMAT,
        "distro": req.distro.name,
        "suite": req.distro.suite,
        "arch": req.arch.debian(),
        "packages": packages,
        "epoch": epoch,
        "size": req.size_bytes,
        "recipe": builder::recipe_digest(req.distro.manager),
        "unpack_only": req.unpack_only,
    });
    hex(&Sha256::digest(text.to_string().as_bytes()))
}

/// A UUID made from the key: the same image gets the same file system UUID.
fn uuid_of(key: &str) -> String {
    let k = &key[..32];
    format!(
        "{}-{}-4{}-8{}-{}",
        &k[0..8],
        &k[8..12],
        &k[13..16],
        &k[17..20],
        &k[20..32]
    )
}

/// The packages cached for images that no longer exist: removed by `image gc`.
pub fn gc_packages(cache: &ImageCache) -> usize {
    let keep: std::collections::HashSet<String> = cache
        .list()
        .into_iter()
        .filter_map(|l| l.info)
        .flat_map(|i| i.packages.into_iter().map(|p| p.sha256).collect::<Vec<_>>())
        .collect();
    let Ok(dir) = std::fs::read_dir(deb_cache()) else {
        return 0;
    };
    let mut removed = 0;
    for e in dir.flatten() {
        let path = e.path();
        // A download in progress is not ours to judge.
        if path.to_string_lossy().contains(".part.") {
            continue;
        }
        let keep_it = download::sha256_file(&path).is_ok_and(|h| keep.contains(&h));
        if !keep_it && std::fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fs_uuid_is_a_version_4_uuid_made_of_the_key() {
        let key = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(uuid_of(key), "01234567-89ab-4def-8123-456789abcdef");
    }
}
