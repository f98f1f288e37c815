//! The dpkg recipe: the required packages' files are unpacked from tars made on the host,
//! the core is installed one by one, then dpkg unpacks and configures the rest with
//! services kept from starting (`dpkg.sh`), in a builder VM on the guest kit.

use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;

use super::BuilderVm;
use crate::image::apt::{Archive, PlannedDeb};
use crate::image::ImageError;
use crate::qemu::accel::Accel;

/// The script the builder runs (see its header for the contract with this module).
pub const SCRIPT: &str = include_str!("dpkg.sh");

/// The packages dpkg installs one by one, first, in this order (debootstrap's core):
/// each one's scripts need the ones before it configured.
const CORE: &[&str] = &[
    "base-passwd",
    "base-files",
    "dpkg",
    "libc6",
    "perl-base",
    "mawk",
];

/// What the builder needs from the build.
pub struct BuilderInput<'a> {
    pub archive: &'a Archive,
    pub debs: &'a [PlannedDeb],
    pub deb_cache: &'a Path,
    pub epoch: u64,
    pub size_bytes: u64,
    /// The build's own directory (removed with it).
    pub work: &'a Path,
    pub accel: Accel,
    /// Extract every package and configure nothing (`UNPACK_ONLY` in the recipe).
    pub unpack_only: bool,
}

/// Runs the builder; returns the path of the root's tar.
pub fn run_builder(
    input: &BuilderInput,
    progress: &crate::progress::Progress,
    signals: Receiver<()>,
) -> Result<PathBuf, ImageError> {
    let build = BuilderVm::build_dir(input.work);
    let stage = build.join("stage");
    std::fs::create_dir_all(&stage).map_err(ImageError::io)?;

    // The first stage (the required packages' trees as plain tars, made here without
    // root), and every package with its files uncompressed for dpkg in the VM.
    let debs_dir = build.join("debs");
    std::fs::create_dir_all(&debs_dir).map_err(ImageError::io)?;
    let mut stage_list = String::new();
    let mut jobs = Vec::new();
    for (i, deb) in input.debs.iter().enumerate() {
        let tar = if deb.required || input.unpack_only {
            let name = format!("{i:03}-{}.tar", deb.name);
            stage_list.push_str(&name);
            stage_list.push('\n');
            (stage.join(name), true)
        } else {
            (input.work.join(format!("data-{i:03}.tar")), false)
        };
        jobs.push((deb, tar));
    }
    let repack = !input.unpack_only;
    prepare_packages(
        &jobs,
        input.deb_cache,
        repack.then_some(&*debs_dir),
        progress,
    )?;
    let list = |pick: &dyn Fn(&PlannedDeb) -> bool| -> String {
        input
            .debs
            .iter()
            .filter(|d| pick(d))
            .map(|d| format!("{}\n", d.file))
            .collect()
    };
    let core: String = CORE
        .iter()
        .filter_map(|name| input.debs.iter().find(|d| d.name == *name))
        .map(|d| format!("{}\n", d.file))
        .collect();
    for (file, text) in [
        ("stage.list", stage_list),
        ("core.list", core),
        ("required.list", list(&|d| d.required)),
        ("extra.list", list(&|d| !d.required)),
    ] {
        std::fs::write(build.join(file), text).map_err(ImageError::io)?;
    }

    BuilderVm {
        recipe: SCRIPT,
        root_image: None,
        env: vec![
            ("EPOCH", input.epoch.to_string()),
            ("MIRROR", input.archive.mirror.clone()),
            ("SUITE", input.archive.distro.suite.to_owned()),
            ("COMPONENTS", input.archive.distro.components.to_owned()),
            ("USR_LINKS", input.archive.arch.merged_usr_links().join(" ")),
            ("UNPACK_ONLY", u8::from(input.unpack_only).to_string()),
        ],
        packages: input.debs.len(),
        size_bytes: input.size_bytes,
        work: input.work,
        accel: input.accel,
    }
    .run(progress, signals)
}

/// For each job, the package's files as a tar (kept for the first stage, or removed) and,
/// for dpkg (`debs_dir`), the package again with them uncompressed, in parallel
/// (decompression is most of it).
fn prepare_packages(
    jobs: &[(&PlannedDeb, (PathBuf, bool))],
    cache: &Path,
    debs_dir: Option<&Path>,
    progress: &crate::progress::Progress,
) -> Result<(), ImageError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let step = progress.step(&format!(
        "decompressing {} packages for the builder",
        jobs.len()
    ));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((deb, (tar, keep))) = jobs.get(i) else {
                    break;
                };
                let src = cache.join(&deb.file);
                let result = crate::image::deb::fsys_tarfile(&src, tar).and_then(|()| {
                    let Some(debs_dir) = debs_dir else {
                        return Ok(());
                    };
                    crate::image::deb::repack_uncompressed(&src, tar, &debs_dir.join(&deb.file))
                        .map_err(anyhow::Error::from)
                });
                if !keep {
                    let _ = std::fs::remove_file(tar);
                }
                if let Err(e) = result {
                    error.lock().unwrap().get_or_insert(e);
                    break;
                }
                done.fetch_add(1, Ordering::Relaxed);
            });
        }
        // Progress is drawn from here (it is not shared with the workers).
        loop {
            let n = done.load(Ordering::Relaxed);
            if n >= jobs.len() || error.lock().unwrap().is_some() {
                break;
            }
            progress.live("decompressing", &format!("{n}/{}", jobs.len()));
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    });
    if let Some(e) = error.into_inner().unwrap() {
        return Err(ImageError::Failed(e));
    }
    step.done();
    Ok(())
}
