//! The machine a benchmark ran on, scratch directories and mounts.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// One line for a report: cores, CPU model and QEMU's version.
pub fn machine() -> String {
    format!(
        "machine: {} cores, {}; {}",
        num_cpus(),
        cpu_model(),
        qemu_version()
    )
}

pub fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The first `model name` in /proc/cpuinfo.
pub fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The first line of `qemu-system-x86_64 --version`.
pub fn qemu_version() -> String {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "QEMU not found".into())
}

/// `p`, emptied (created if missing).
pub fn fresh_dir(p: &Path) -> anyhow::Result<PathBuf> {
    let _ = fs::remove_dir_all(p);
    fs::create_dir_all(p)?;
    Ok(p.to_owned())
}

/// A file system image loop-mounted read-only on a directory for as long as this lives:
/// unmounted on drop, on success, error or panic alike.
pub struct LoopMount {
    dir: PathBuf,
}

impl LoopMount {
    pub fn read_only(image: &Path, dir: &Path) -> anyhow::Result<LoopMount> {
        unmount_stale(dir);
        fs::create_dir_all(dir)?;
        let out = Command::new("mount")
            .args(["-o", "loop,ro"])
            .arg(image)
            .arg(dir)
            .output()
            .context("running mount")?;
        if !out.status.success() {
            bail!(
                "mount -o loop,ro {} {} failed (needs root): {}",
                image.display(),
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(LoopMount {
            dir: dir.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        // A file server that just exited may still hold files for a moment.
        for _ in 0..20 {
            if umount(&self.dir, false) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        if !umount(&self.dir, true) {
            eprintln!("warning: could not unmount {}", self.dir.display());
        }
    }
}

fn umount(dir: &Path, lazy: bool) -> bool {
    let mut cmd = Command::new("umount");
    if lazy {
        cmd.arg("-l");
    }
    cmd.arg(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Unmounts whatever a killed earlier run left mounted on `dir`.
pub fn unmount_stale(dir: &Path) {
    let Ok(dir) = fs::canonicalize(dir) else {
        return;
    };
    let mounted = |d: &Path| {
        fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(&*d.to_string_lossy()))
    };
    while mounted(&dir) {
        eprintln!("unmounting {}, left by an earlier run", dir.display());
        if !umount(&dir, false) && !umount(&dir, true) {
            return;
        }
    }
}

/// What the rest of the host does while a benchmark measures: the CPU time every process
/// but this one and its children spent, from /proc/stat. On a shared 2-core machine a
/// figure taken while something else ran is not comparable; reports say how busy it was.
pub struct ForeignLoad {
    busy: f64,
    own: f64,
    start: std::time::Instant,
}

impl ForeignLoad {
    pub fn start() -> ForeignLoad {
        ForeignLoad {
            busy: host_busy_seconds(),
            own: own_cpu_seconds(),
            start: std::time::Instant::now(),
        }
    }

    /// Cores' worth of CPU the rest of the host used since `start`. Children count as
    /// this benchmark's once they have been waited for.
    pub fn cores(&self) -> f64 {
        let foreign = (host_busy_seconds() - self.busy) - (own_cpu_seconds() - self.own);
        foreign.max(0.0) / self.start.elapsed().as_secs_f64().max(1e-3)
    }
}

/// Waits (at most `max`) until the rest of the host uses less than `cores` of CPU over a
/// few seconds; returns what it used in the last sample.
pub fn wait_for_quiet(cores: f64, max: std::time::Duration) -> f64 {
    let deadline = std::time::Instant::now() + max;
    let mut said = false;
    loop {
        let sample = ForeignLoad::start();
        std::thread::sleep(std::time::Duration::from_secs(3));
        let load = sample.cores();
        if load < cores || std::time::Instant::now() >= deadline {
            return load;
        }
        if !said {
            eprintln!(
                "waiting for the host to be quiet (other processes use {load:.2} cores; at most {} s)",
                max.as_secs()
            );
            said = true;
        }
    }
}

/// Busy CPU seconds of the whole host (all cores; idle and iowait excluded).
pub fn host_busy_seconds() -> f64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    if ticks.len() < 5 {
        return 0.0;
    }
    // user nice system idle iowait irq softirq (guest time is in user already; steal is
    // the hypervisor's, not a process here).
    let busy: f64 = ticks.iter().take(7).sum::<f64>() - ticks[3] - ticks[4];
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    busy / hz
}

/// CPU seconds of this process and of every child it has waited for.
pub fn own_cpu_seconds() -> f64 {
    let usage = |who| {
        // SAFETY: getrusage fills the struct we hand it.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(who, &mut ru) };
        let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        t(ru.ru_utime) + t(ru.ru_stime)
    };
    usage(libc::RUSAGE_SELF) + usage(libc::RUSAGE_CHILDREN)
}
