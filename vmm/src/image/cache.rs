//! The image cache, by content. An image's key is the digest of everything that decides
//! its bytes (distribution, architecture, every package with its version and digest, the
//! builder recipe, the size, the timestamp); a name points at the key last built under
//! it; a request (the command line's inputs) remembers which key it resolved to, and
//! against which signed Release, so an unchanged archive answers without resolving.
//!
//! ```text
//! images/KEY/image.raw     the ext4 image
//! images/KEY/image.json    ImageInfo
//! images/KEY/build.log     the builder's log
//! images/names/NAME        KEY
//! images/requests/HASH     Request
//! images/building-PID-*    a build in progress (owned, swept when its builder is gone)
//! ```
//! An image appears only by the rename of a finished build directory, so a failed or
//! interrupted build leaves nothing a later one could take for an image.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::apt::write_atomic;
use super::ImageError;

pub const IMAGE_FILE: &str = "image.raw";
pub const INFO_FILE: &str = "image.json";
/// The builder's log: what dpkg and the maintainer scripts said, and when.
pub const LOG_FILE: &str = "build.log";
/// [`crate::owned_dir`]'s prefix for builds in progress: `building-PID-…`.
pub const BUILDING_PREFIX: &str = "building";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PackageEntry {
    pub name: String,
    pub version: String,
    pub arch: String,
    pub sha256: String,
}

/// What `image inspect` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageInfo {
    pub format: u32,
    pub key: String,
    pub distro: String,
    pub suite: String,
    pub arch: String,
    pub mirror: String,
    /// As asked (`--packages`), before resolution.
    pub requested: Vec<String>,
    pub packages: Vec<PackageEntry>,
    pub source_date_epoch: u64,
    pub size_bytes: u64,
    /// The file system's UUID (derived from the key).
    pub fs_uuid: String,
    /// Seconds the build took (not part of the image).
    pub build_seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub key: String,
    pub release_digest: String,
}

pub struct ImageCache {
    root: PathBuf,
}

/// An image as the cache lists it.
pub struct Listed {
    pub key: String,
    pub names: Vec<String>,
    pub info: Option<ImageInfo>,
    pub dir: PathBuf,
}

fn failed(what: &str, path: &Path, e: std::io::Error) -> ImageError {
    ImageError::Failed(anyhow::anyhow!("{what} {}: {e}", path.display()))
}

impl ImageCache {
    pub fn new(root: PathBuf) -> ImageCache {
        ImageCache { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn ensure(&self) -> Result<(), ImageError> {
        for sub in ["names", "requests"] {
            let d = self.root.join(sub);
            std::fs::create_dir_all(&d).map_err(|e| failed("creating", &d, e))?;
        }
        Ok(())
    }

    pub fn image_dir(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    pub fn image_path(&self, key: &str) -> Option<PathBuf> {
        let p = self.image_dir(key).join(IMAGE_FILE);
        p.is_file().then_some(p)
    }

    pub fn info(&self, key: &str) -> Option<ImageInfo> {
        let text = std::fs::read(self.image_dir(key).join(INFO_FILE)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn set_name(&self, name: &str, key: &str) -> Result<(), ImageError> {
        let p = self.root.join("names").join(name);
        write_atomic(&p, key.as_bytes()).map_err(|e| failed("writing", &p, e))
    }

    pub fn request(&self, hash: &str) -> Option<Request> {
        let text = std::fs::read(self.root.join("requests").join(hash)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn set_request(&self, hash: &str, request: &Request) -> Result<(), ImageError> {
        let p = self.root.join("requests").join(hash);
        let text = serde_json::to_vec(request).expect("serializable");
        write_atomic(&p, &text).map_err(|e| failed("writing", &p, e))
    }

    fn names(&self) -> Vec<(String, String)> {
        let Ok(dir) = std::fs::read_dir(self.root.join("names")) else {
            return Vec::new();
        };
        let mut names: Vec<(String, String)> = dir
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_owned();
                let key = std::fs::read_to_string(e.path()).ok()?;
                Some((name, key.trim().to_owned()))
            })
            .filter(|(n, _)| !n.contains(".tmp."))
            .collect();
        names.sort();
        names
    }

    /// Every finished image, by key, with the names pointing at it.
    pub fn list(&self) -> Vec<Listed> {
        let names = self.names();
        let Ok(dir) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut out: Vec<Listed> = dir
            .flatten()
            .filter_map(|e| {
                let key = e.file_name().to_str()?.to_owned();
                if key.len() != 64 || !key.chars().all(|c| c.is_ascii_hexdigit()) {
                    return None;
                }
                Some(Listed {
                    names: names
                        .iter()
                        .filter(|(_, k)| *k == key)
                        .map(|(n, _)| n.clone())
                        .collect(),
                    info: self.info(&key),
                    dir: e.path(),
                    key,
                })
            })
            .collect();
        out.sort_by(|a, b| a.names.cmp(&b.names).then(a.key.cmp(&b.key)));
        out
    }

    /// `what` as a name, or as a key or a unique prefix of one (at least 8 digits).
    pub fn find(&self, what: &str) -> Result<String, String> {
        if let Some((_, key)) = self.names().into_iter().find(|(n, _)| n == what) {
            if self.image_path(&key).is_some() {
                return Ok(key);
            }
            return Err(format!(
                "the image named '{what}' is gone from the cache (key {key}); build it again"
            ));
        }
        if what.len() >= 8 && what.chars().all(|c| c.is_ascii_hexdigit()) {
            let hits: Vec<Listed> = self
                .list()
                .into_iter()
                .filter(|l| l.key.starts_with(what))
                .collect();
            match hits.len() {
                1 => return Ok(hits[0].key.clone()),
                0 => {}
                _ => return Err(format!("'{what}' is the start of more than one image key")),
            }
        }
        Err(format!(
            "no image named '{what}' in {} (see vmbuild image list; vmbuild image build makes one)",
            self.root.display()
        ))
    }

    /// Removes an image and the names pointing at it.
    pub fn remove(&self, key: &str) -> Result<Vec<String>, ImageError> {
        let mut removed = Vec::new();
        for (name, k) in self.names() {
            if k == key {
                let p = self.root.join("names").join(&name);
                std::fs::remove_file(&p).map_err(|e| failed("removing", &p, e))?;
                removed.push(name);
            }
        }
        let dir = self.image_dir(key);
        // Out of sight first (one rename), then the slow removal.
        // Named as an abandoned build, so that a removal cut short is swept later.
        let doomed = self.root.join(format!("{BUILDING_PREFIX}-0-rm-{key}"));
        std::fs::rename(&dir, &doomed).map_err(|e| failed("removing", &dir, e))?;
        std::fs::remove_dir_all(&doomed).map_err(|e| failed("removing", &doomed, e))?;
        Ok(removed)
    }

    /// Removes images no name points at, requests whose image is gone, and what builds
    /// that died left behind. Returns what went.
    pub fn gc(&self) -> Result<Vec<String>, ImageError> {
        let mut gone = Vec::new();
        for l in self.list() {
            if l.names.is_empty() {
                self.remove(&l.key)?;
                gone.push(format!("image {}", l.key));
            }
        }
        for (name, key) in self.names() {
            if self.image_path(&key).is_none() {
                let _ = std::fs::remove_file(self.root.join("names").join(&name));
                gone.push(format!("name {name} (its image was gone)"));
            }
        }
        if let Ok(dir) = std::fs::read_dir(self.root.join("requests")) {
            for e in dir.flatten() {
                let stale = std::fs::read(e.path())
                    .ok()
                    .and_then(|t| serde_json::from_slice::<Request>(&t).ok())
                    .is_none_or(|r| self.image_path(&r.key).is_none());
                if stale {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let swept = crate::owned_dir::sweep(&self.root, BUILDING_PREFIX);
        if swept > 0 {
            gone.push(format!("{swept} unfinished build(s)"));
        }
        Ok(gone)
    }
}
