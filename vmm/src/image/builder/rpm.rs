//! The rpm recipe: one rpm transaction into an empty database (`rpm.sh`), in a builder
//! VM whose root is a Debian image with rpm, which vmbuild makes once with its own dpkg
//! recipe, unpacked only (rpm needs its files and libraries, not Debian's maintainer
//! scripts), and keeps in the image cache under [`BUILDER_IMAGE_NAME`].

use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;

use super::BuilderVm;
use crate::image::apt::{Archive, PlannedDeb};
use crate::image::ImageError;
use crate::qemu::accel::Accel;

/// The script the builder runs (see its header for the contract with this module).
pub const SCRIPT: &str = include_str!("rpm.sh");

/// The builder's own image: Debian 12 with rpm (and GNU tar, which is required).
pub const BUILDER_IMAGE_NAME: &str = "vmbuild-rpm-builder";
pub const BUILDER_DISTRO: &str = "debian-12";
pub const BUILDER_PACKAGES: &[&str] = &["rpm"];

/// Where the rpm database lives in the new root: Fedora's place since 36 (rpm keeps a
/// /var/lib/rpm link for older tools).
const DBPATH: &str = "/usr/lib/sysimage/rpm";

pub struct RpmInput<'a> {
    pub archive: &'a Archive,
    /// In install order (rpm reorders them by their dependencies anyway).
    pub packages: &'a [PlannedDeb],
    pub cache: &'a Path,
    pub epoch: u64,
    pub size_bytes: u64,
    pub work: &'a Path,
    pub accel: Accel,
    /// The Debian image with rpm the builder boots.
    pub builder_image: PathBuf,
}

/// Runs the builder; returns the path of the root's tar.
pub fn run_builder(
    input: &RpmInput,
    progress: &crate::progress::Progress,
    signals: Receiver<()>,
) -> Result<PathBuf, ImageError> {
    let build = BuilderVm::build_dir(input.work);
    let rpms = build.join("rpms");
    std::fs::create_dir_all(&rpms).map_err(ImageError::io)?;
    let mut list = String::new();
    for p in input.packages {
        let from = input.cache.join(&p.file);
        let to = rpms.join(&p.file);
        // A link where the cache and the build share a file system, else a copy.
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).map_err(|e| {
                ImageError::Failed(anyhow::anyhow!("copying {}: {e}", from.display()))
            })?;
        }
        list.push_str(&p.file);
        list.push('\n');
    }
    std::fs::write(build.join("rpms.list"), list).map_err(ImageError::io)?;
    BuilderVm {
        recipe: SCRIPT,
        root_image: Some(input.builder_image.clone()),
        env: vec![
            ("EPOCH", input.epoch.to_string()),
            ("DBPATH", DBPATH.to_owned()),
            ("MIRROR", input.archive.mirror.clone()),
        ],
        packages: input.packages.len(),
        size_bytes: input.size_bytes,
        work: input.work,
        accel: input.accel,
    }
    .run(progress, signals)
}
