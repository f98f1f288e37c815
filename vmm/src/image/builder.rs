//! The builder VM: the guest kit boots, root in a VM of its own, and fills a scratch disk
//! from the packages with dpkg (`builder.sh`); what comes back is a sorted tar of the new
//! root, or a failure report naming the package and dpkg's words.
//!
//! Why a VM and not the host: dpkg's maintainer scripts must run as root (they chown,
//! add users, mknod) in a chroot. On the host that needs root, or user namespaces with
//! subordinate ID ranges (`newuidmap`, `/etc/subuid`), which many build hosts do not
//! grant. In a VM any user is root, as nixpkgs' vmTools did it, and a maintainer script
//! can never touch the host. The cost is the VM's speed: under KVM close to the host's,
//! under TCG several times slower.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use super::apt::{Archive, PlannedDeb};
use super::ImageError;
use crate::guest::kit::GuestKit;
use crate::qemu::accel::Accel;
use crate::qemu::QemuBinary;
use crate::vm::run::{Disk, DiskMode, ExtraShare, RunEnd, RunSpec, ShareProtocol, Vmm};

/// The script the builder runs (see its header for the contract with this module).
const SCRIPT: &str = include_str!("builder.sh");

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

/// The builder's memory: dpkg and the tar of a toolchain fit with room to spare.
const MEMORY_MIB: u32 = 1024;

/// A build that takes longer than this is stuck (a maintainer script waiting for input).
const TIME_LIMIT: Duration = Duration::from_secs(3 * 3600);

/// The recipe's identity, part of every image key: a change to it is a new image.
pub fn recipe_digest() -> String {
    use sha2::{Digest, Sha256};
    super::apt::hex(&Sha256::digest(SCRIPT.as_bytes()))
}

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
}

/// Runs the builder; returns the path of the root's tar.
pub fn run_builder(
    input: &BuilderInput,
    progress: &crate::progress::Progress,
    signals: Receiver<()>,
) -> Result<PathBuf, ImageError> {
    let fail = |e: anyhow::Error| ImageError::Failed(e);
    let build = input.work.join("build");
    let stage = build.join("stage");
    let out = input.work.join("out");
    std::fs::create_dir_all(&stage).map_err(ImageError::io)?;
    std::fs::create_dir_all(&out).map_err(ImageError::io)?;
    std::fs::write(build.join("builder.sh"), SCRIPT).map_err(ImageError::io)?;

    // The first stage (the required packages' trees as plain tars, made here without
    // root), and every package with its files uncompressed for dpkg in the VM.
    let debs_dir = build.join("debs");
    std::fs::create_dir_all(&debs_dir).map_err(ImageError::io)?;
    let mut stage_list = String::new();
    let mut jobs = Vec::new();
    for (i, deb) in input.debs.iter().enumerate() {
        let tar = if deb.required {
            let name = format!("{i:03}-{}.tar", deb.name);
            stage_list.push_str(&name);
            stage_list.push('\n');
            (stage.join(name), true)
        } else {
            (input.work.join(format!("data-{i:03}.tar")), false)
        };
        jobs.push((deb, tar));
    }
    prepare_packages(&jobs, input.deb_cache, &debs_dir, progress)?;
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

    // The scratch disk: sparse, as big as the image, so a full image fails here too.
    let scratch = input.work.join("scratch.raw");
    let mkfs = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-L", "vmbuild-scratch"])
        .arg(&scratch)
        .arg(format!("{}k", input.size_bytes / 1024))
        .output()
        .map_err(|e| {
            fail(anyhow::anyhow!(
                "running mke2fs (Debian package e2fsprogs): {e}"
            ))
        })?;
    if !mkfs.status.success() {
        return Err(fail(anyhow::anyhow!(
            "mke2fs (scratch disk): {}",
            String::from_utf8_lossy(&mkfs.stderr).trim()
        )));
    }

    let qemu = QemuBinary::locate().map_err(fail)?;
    let kit = GuestKit::locate().map_err(fail)?;
    let tty = std::io::stderr().is_terminal();
    let env = [
        ("XCHG", "/tmp/xchg".to_owned()),
        ("EPOCH", input.epoch.to_string()),
        ("MIRROR", input.archive.mirror.clone()),
        ("SUITE", input.archive.distro.suite.to_owned()),
        ("COMPONENTS", input.archive.distro.components.to_owned()),
        ("USR_LINKS", input.archive.arch.merged_usr_links().join(" ")),
        ("TTY", if tty { "1" } else { "0" }.to_owned()),
        (
            "QUIET",
            if progress.enabled() { "0" } else { "1" }.to_owned(),
        ),
    ];
    let spec = RunSpec {
        qemu,
        accel: input.accel,
        kernel: kit.kernel,
        initrd: kit.initrd,
        append: Some("vmbuild.modules=crc32c_generic,ext4".into()),
        memory_mib: MEMORY_MIB,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get().min(4) as u32),
        argv: vec!["/bin/sh".into(), "/build/builder.sh".into()],
        shell: false,
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
        cwd: None,
        store: None,
        xchg: Some(out.clone()),
        keep_xchg: true,
        no_xchg: false,
        nic: None,
        extra_shares: vec![ExtraShare {
            host: build.clone(),
            guest: "/build".into(),
            read_only: true,
        }],
        disk: Some(Disk {
            path: scratch.clone(),
            format: "raw".into(),
            mode: DiskMode::Rw,
        }),
        image: None,
        timeout: Some(TIME_LIMIT),
        log: Some(input.work.join("console.log")),
        vmm: Vmm::Qemu,
        share_protocol: ShareProtocol::Virtiofs,
        runtime_dir: None,
    };
    let step = progress.step(&format!(
        "installing {} packages in a builder VM",
        input.debs.len()
    ));
    let outcome = crate::vm::run::run(&spec, signals).map_err(fail)?;
    let _ = std::fs::remove_file(&scratch);
    match outcome.end {
        RunEnd::Exited(0) if out.join("result").is_file() => {
            step.done();
            Ok(out.join("root.tar"))
        }
        RunEnd::Exited(_) => Err(failure_report(&out, input.size_bytes)),
        RunEnd::Interrupted => Err(ImageError::Interrupted),
        RunEnd::TimedOut(t) => Err(fail(anyhow::anyhow!(
            "the builder VM ran past its {} s limit and was stopped",
            t.as_secs()
        ))),
        RunEnd::NoExitCode { why, console_tail } => Err(fail(anyhow::anyhow!(
            "the builder VM stopped: {why}\n{console_tail}"
        ))),
    }
}

/// For each job, the package's files as a tar (kept for the first stage, or removed) and
/// the package again with them uncompressed, in parallel (decompression is most of it).
fn prepare_packages(
    jobs: &[(&PlannedDeb, (PathBuf, bool))],
    cache: &Path,
    debs_dir: &Path,
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
                let result = super::deb::fsys_tarfile(&src, tar).and_then(|()| {
                    super::deb::repack_uncompressed(&src, tar, &debs_dir.join(&deb.file))
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

/// The builder's `failure` file, as the user's error: a package that fails, or a disk
/// too small, is the input's fault (exit 2); anything else is ours.
fn failure_report(out: &Path, size_bytes: u64) -> ImageError {
    let text = std::fs::read_to_string(out.join("failure")).unwrap_or_default();
    let mut lines = text.lines();
    let kind = lines.next().unwrap_or("");
    let summary = lines
        .next()
        .unwrap_or("the builder failed without a report");
    let detail: Vec<&str> = lines.collect();
    let detail = if detail.is_empty() {
        String::new()
    } else {
        format!("\n{}", detail.join("\n"))
    };
    match kind {
        "package" | "audit" => ImageError::Usage(format!("{summary}{detail}")),
        "disk" => ImageError::Usage(format!(
            "{summary}: the packages do not fit in --size {} MiB; give a larger --size",
            size_bytes >> 20
        )),
        _ => {
            let log = std::fs::read_to_string(out.join("build.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(30)..].join("\n");
            ImageError::Failed(anyhow::anyhow!(
                "{summary}{detail}\nthe end of the builder's log:\n{tail}"
            ))
        }
    }
}
