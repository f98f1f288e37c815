//! Downloads the planned packages into the package cache, in parallel (one `curl
//! --parallel`, up to [`PARALLEL`] transfers at once), each checked before it is kept
//! (Debian: against the SHA-256 the signed index gives; rpm: by rpmkeys). A package
//! already in the cache that passes the check is not fetched again.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::apt::{hex, PlannedDeb};
use super::ImageError;
use crate::progress::Progress;

/// Transfers at once: enough to hide a mirror's per-request latency.
const PARALLEL: usize = 8;

/// The SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Where a package lives in the cache.
pub fn cached_path(cache: &Path, deb: &PlannedDeb) -> PathBuf {
    cache.join(&deb.file)
}

/// The check for packages whose index gives their SHA-256 (Debian's).
pub fn has_indexed_digest(d: &PlannedDeb, file: &Path) -> Result<(), String> {
    let got = sha256_file(file).map_err(|e| e.to_string())?;
    if got == d.sha256 {
        Ok(())
    } else {
        Err(format!(
            "it has SHA-256 {got}, but the archive's signed index says {}",
            d.sha256
        ))
    }
}

/// Makes every package of `debs` present in `cache`, each one passing `verify` (which
/// says why not).
pub fn fetch_all(
    debs: &[PlannedDeb],
    cache: &Path,
    progress: &Progress,
    signals: &Receiver<()>,
    verify: &(dyn Fn(&PlannedDeb, &Path) -> Result<(), String> + Sync),
) -> Result<(), ImageError> {
    std::fs::create_dir_all(cache).map_err(ImageError::io)?;
    let missing: Vec<&PlannedDeb> = debs
        .iter()
        .filter(|d| {
            let p = cached_path(cache, d);
            !(p.is_file() && verify(d, &p).is_ok())
        })
        .collect();
    if missing.is_empty() {
        progress.note(&format!("all {} packages are in the cache", debs.len()));
        return Ok(());
    }
    let total: u64 = missing.iter().map(|d| d.size).sum();
    let step = progress.step(&format!(
        "downloading {} packages ({:.1} MB; {} cached)",
        missing.len(),
        total as f64 / 1e6,
        debs.len() - missing.len()
    ));
    let pid = std::process::id();
    let part = |d: &PlannedDeb| cache.join(format!("{}.part.{pid}", d.file));
    let mut config = String::new();
    for d in &missing {
        config.push_str(&format!(
            "url = \"{}\"\noutput = \"{}\"\n",
            d.url,
            part(d).display()
        ));
    }
    let config_path = cache.join(format!(".curl.{pid}"));
    std::fs::write(&config_path, config).map_err(ImageError::io)?;
    let child = Command::new("curl")
        .args(["--parallel", "--parallel-max", &PARALLEL.to_string()])
        .args(["--fail", "--silent", "--show-error", "--location"])
        .args(["--retry", "2", "--connect-timeout", "20"])
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&config_path);
            return Err(ImageError::Failed(anyhow::anyhow!(
                "running curl (Debian package curl): {e}"
            )));
        }
    };
    let mut stderr = child.stderr.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let cleanup = || {
        for d in &missing {
            let _ = std::fs::remove_file(part(d));
        }
    };
    let status = loop {
        if signals.try_recv().is_ok() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(&config_path);
            cleanup();
            return Err(ImageError::Interrupted);
        }
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => {}
            Err(e) => return Err(ImageError::io(e)),
        }
        let got: u64 = missing
            .iter()
            .filter_map(|d| std::fs::metadata(part(d)).ok())
            .map(|m| m.len())
            .sum();
        progress.live(
            "downloading",
            &format!("{:.1} of {:.1} MB", got as f64 / 1e6, total as f64 / 1e6),
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let errors = reader.join().unwrap_or_default();
    let _ = std::fs::remove_file(&config_path);
    if !status.success() {
        cleanup();
        let first = errors.lines().next().unwrap_or("curl failed").to_owned();
        return Err(ImageError::Failed(anyhow::anyhow!(
            "downloading the packages failed: {first}"
        )));
    }
    for d in &missing {
        if let Err(why) = verify(d, &part(d)) {
            cleanup();
            return Err(ImageError::Failed(anyhow::anyhow!(
                "{} from {}: {why}: a broken mirror or proxy",
                d.file,
                d.url
            )));
        }
        std::fs::rename(part(d), cached_path(cache, d)).map_err(ImageError::io)?;
    }
    step.done();
    Ok(())
}
