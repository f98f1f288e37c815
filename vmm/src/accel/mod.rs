//! Choosing the accelerator. KVM only where this host's KVM can actually run a Linux guest:
//! on nested, paging-emulated KVM a 16-bit guest runs but Linux hits emulation failures
//! after tens of seconds, so `/dev/kvm` opening proves nothing. The probe boots the guest
//! kit under KVM with a short limit and remembers the answer per host kernel and kit.

pub mod embedded_probe;
pub mod vmm_choice;

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::guest::cmdline::KernelCmdline;
use crate::guest::console::shows_init;
use crate::guest::kit::KitInfo;
use crate::qemu::QemuCommand;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    /// KVM where the probe says it runs Linux, else TCG
    Auto,
    Kvm,
    Tcg,
}

/// The accelerator itself is QEMU's notion (`-accel`); this layer decides which one.
pub use crate::qemu::Accel;

/// How long a probe's boot may take to reach init. The question is whether KVM runs
/// Linux at all, not how fast: a KVM nested in a TCG guest boots the kit in 5–10 s, more
/// under load, and is still the only way to run Linux on KVM there. A KVM that cannot
/// run Linux mostly says so sooner (QEMU reports the emulation failure, the embedded VMM
/// stops); a guest that hangs costs the whole limit, once an hour (answers are cached).
pub const PROBE_LIMIT: Duration = Duration::from_secs(60);
// What a boot proved is remembered: init reached (yes, until something changes), or
// KVM's own emulation failure (no, for a day). A guest that was merely slow, or a QEMU
// that ended for another reason, is a "no" remembered for an hour only
// ([`SLOW_ANSWER_LIFE`]): a busy moment must not decide for a day, and a host that hangs
// every time must not pay the whole limit on every run.

/// The result of probing whether KVM runs a Linux guest here.
#[derive(Debug, Clone)]
pub struct KvmProbe {
    pub usable: bool,
    pub reason: String,
    /// The answer of a boot that ran (it booted, or it did not within the limit), worth
    /// remembering; not when the probe could not even start (a missing binary, a busy
    /// /dev/kvm), which is quick to ask again.
    pub definitive: bool,
    /// A "no" from a boot that neither reached init nor failed: remembered briefly.
    pub slow: bool,
}

impl KvmProbe {
    /// What a boot attempt showed.
    pub fn answer(usable: bool, reason: String) -> KvmProbe {
        KvmProbe {
            usable,
            reason,
            definitive: true,
            slow: false,
        }
    }

    /// A boot that neither reached init nor showed KVM failing within the limit.
    pub fn slow(reason: String) -> KvmProbe {
        KvmProbe {
            usable: false,
            reason,
            definitive: true,
            slow: true,
        }
    }

    /// No answer: the probe could not run.
    pub fn unknown(reason: String) -> KvmProbe {
        KvmProbe {
            usable: false,
            reason,
            definitive: false,
            slow: false,
        }
    }
}

/// With `--accel kvm`: why not, if this host's KVM is already known (a remembered probe,
/// not a slow one) to stop Linux guests. Without it such a run would wait, silently, for
/// its timeout with the guest stopped in KVM; the probe is not run for this.
pub fn known_not_to_run_linux(kernel: &Path, initrd: &Path) -> Option<String> {
    let cache = cache_file("kvm", kernel, initrd)?;
    let probe = read_cache(&cache)?;
    (!probe.usable && !probe.slow).then_some(probe.reason)
}

/// Whether this user may use KVM at all, and if not, what to do: a clear refusal before
/// QEMU is started with `-accel kvm` and fails on it.
pub fn kvm_access() -> Result<(), String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(
            "this host has no /dev/kvm (no KVM module loaded, or no virtualization in this CPU or VM)"
                .into(),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let group = std::fs::metadata("/dev/kvm")
                .ok()
                .and_then(|m| {
                    use std::os::unix::fs::MetadataExt;
                    nix::unistd::Group::from_gid(m.gid().into()).ok().flatten()
                })
                .map_or("kvm".to_owned(), |g| g.name);
            Err(format!(
                "you may not open /dev/kvm ({e}): join its group {group} \
                 (`usermod -aG {group} $USER`, then log in again)"
            ))
        }
        Err(e) => Err(format!("/dev/kvm cannot be opened: {e}")),
    }
}

/// Whether QEMU's last words are KVM refusing the guest (its KVM code asserting, or an
/// ioctl it could not do), not a slow or a killed guest.
fn kvm_refused(qemu_stderr: &str) -> bool {
    qemu_stderr.contains("target/i386/kvm/")
        || qemu_stderr.contains("kvm_buf_set_msrs")
        || qemu_stderr.contains("failed to set MSR")
}

pub fn resolve(
    choice: AccelChoice,
    qemu: &Path,
    kernel: &Path,
    initrd: &Path,
) -> (Accel, Option<String>) {
    match choice {
        AccelChoice::Kvm => (Accel::Kvm, None),
        AccelChoice::Tcg => (Accel::Tcg, None),
        AccelChoice::Auto => {
            let probe = probe_kvm_cached(qemu, kernel, initrd);
            if probe.usable {
                (Accel::Kvm, None)
            } else {
                (Accel::Tcg, Some(format!("using TCG: {}", probe.reason)))
            }
        }
    }
}

/// One answer per host kernel, guest kernel and initramfs, and prober (`what`). Each file
/// is identified by its checksum where one is recorded next to it (the guest kit's
/// `kit.json`, a snapshot's `manifest.json`: the kit's files and a snapshot's copies of
/// them share one answer), else by size and modification time. The embedded VMM's
/// answer also depends on the vmbuild binary that gave it.
fn cache_file(what: &str, kernel: &Path, initrd: &Path) -> Option<PathBuf> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let id = |f: &Path| recorded_sha256(f).unwrap_or_else(|| file_id(f));
    let prober = match what {
        "kvm" => String::new(),
        _ => std::env::current_exe()
            .map(|exe| file_id(&exe))
            .unwrap_or_default(),
    };
    let key = format!(
        "{}|{}|{}|{}",
        release.trim(),
        id(kernel),
        id(initrd),
        prober
    );
    let hash = key.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    Some(private_cache_dir()?.join(format!("{what}-probe-{hash:016x}")))
}

/// The cache directory, if it is this user's own (created 0700): answers in a directory
/// someone else could write would be theirs to plant.
fn private_cache_dir() -> Option<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let dir = crate::cache_dir::cache_dir();
    let _ = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir);
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    let mine = meta.is_dir() && meta.uid() == nix::unistd::geteuid().as_raw();
    let private = meta.mode() & 0o022 == 0;
    (mine && private).then_some(dir)
}

/// The checksum recorded for `file` next to it: the kit's `kit.json` names its files
/// (`vmlinux`, `bzimage`, `initrd` with their `*_sha256`); a snapshot's manifest lists
/// each file by name.
fn recorded_sha256(file: &Path) -> Option<String> {
    let file_name = file.file_name()?.to_str()?;
    if let Some(kit) = KitInfo::read(file.parent()?) {
        return kit.sha256_of(file_name).map(str::to_owned);
    }
    let text = std::fs::read_to_string(file.with_file_name("manifest.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()?
        .get("files")?
        .as_array()?
        .iter()
        .find(|f| f.get("name").and_then(|n| n.as_str()) == Some(file_name))?
        .get("sha256")?
        .as_str()
        .map(str::to_owned)
}

fn file_id(path: &Path) -> String {
    std::fs::metadata(path)
        .map(|m| format!("{}-{:?}", m.len(), m.modified().ok()))
        .unwrap_or_default()
}

/// Probes once per host kernel and guest kernel; later calls read the cached answer.
pub fn probe_kvm_cached(qemu: &Path, kernel: &Path, initrd: &Path) -> KvmProbe {
    cached("kvm", kernel, initrd, || probe_kvm(qemu, kernel, initrd))
}

/// Whether the embedded VMM itself boots the kit's Linux to init on this host, within the
/// same limit as QEMU's probe. Asked only where QEMU's KVM probe passed: where KVM cannot
/// run Linux at all, neither VMM can. This, not QEMU's answer, is what lets `auto` choose
/// the embedded VMM: it has then booted this kit here.
pub fn probe_embedded_cached(qemu: &Path, kernel: &Path, initrd: &Path) -> KvmProbe {
    if let Err(why) = embedded_vmm::linux::check_kernel(kernel) {
        return KvmProbe::unknown(why);
    }
    let kvm = probe_kvm_cached(qemu, kernel, initrd);
    if !kvm.usable {
        return kvm;
    }
    cached("embedded", kernel, initrd, || {
        embedded_probe::boot_to_init(kernel, initrd, PROBE_LIMIT)
    })
}

/// How long a negative answer is believed: a "no" can come from a host that was busy at
/// the time; a "yes" stands until the host kernel, the guest files or vmbuild change.
const NEGATIVE_ANSWER_LIFE: Duration = Duration::from_secs(24 * 3600);
/// How long a "no" from a boot that was only slow is believed.
const SLOW_ANSWER_LIFE: Duration = Duration::from_secs(3600);

fn cached(what: &str, kernel: &Path, initrd: &Path, probe: impl FnOnce() -> KvmProbe) -> KvmProbe {
    let Some(cache) = cache_file(what, kernel, initrd) else {
        return probe();
    };
    let read_cached = || read_cache(&cache);
    if let Some(p) = read_cached() {
        return p;
    }
    cached_probe(&cache, read_cached, probe)
}

/// A remembered answer, while it is believed.
fn read_cache(cache: &Path) -> Option<KvmProbe> {
    let text = std::fs::read_to_string(cache).ok()?;
    let (flag, reason) = text.split_once('\n')?;
    let usable = flag == "usable";
    let life = if flag == "slow" {
        SLOW_ANSWER_LIFE
    } else {
        NEGATIVE_ANSWER_LIFE
    };
    let age = std::fs::metadata(cache)
        .ok()?
        .modified()
        .ok()?
        .elapsed()
        .ok()?;
    if !usable && age > life {
        return None;
    }
    let reason = reason.trim().to_owned();
    Some(if flag == "slow" {
        KvmProbe::slow(reason)
    } else {
        KvmProbe::answer(usable, reason)
    })
}

fn cached_probe(
    cache: &Path,
    read_cached: impl Fn() -> Option<KvmProbe>,
    probe: impl FnOnce() -> KvmProbe,
) -> KvmProbe {
    // Concurrent runs probe once: the first holds the lock, the others wait and read.
    let _lock = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .open(cache.with_extension("lock"))
        .ok()
        .inspect(|f| {
            // Released when the file is closed. Without the lock two probes may run at
            // once; each still gives a true answer.
            let _ = f.lock();
        });
    if let Some(p) = read_cached() {
        return p;
    }
    let probe = probe();
    if probe.definitive {
        let flag = match (probe.usable, probe.slow) {
            (true, _) => "usable",
            (false, true) => "slow",
            (false, false) => "unusable",
        };
        let tmp = cache.with_extension(format!("tmp{}", std::process::id()));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, format!("{flag}\n{}\n", probe.reason).as_bytes())
            });
        if written.is_ok() {
            let _ = std::fs::rename(&tmp, cache);
        } else {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    probe
}

/// Boots the kit under KVM until its init runs, for at most [`PROBE_LIMIT`].
pub fn probe_kvm(qemu: &Path, kernel: &Path, initrd: &Path) -> KvmProbe {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return KvmProbe::unknown(format!("/dev/kvm cannot be opened ({e})"));
    }
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => return KvmProbe::unknown(format!("probe failed: {e}")),
    };
    let console = dir.path().join("console");
    let errors = match std::fs::File::create(dir.path().join("stderr")) {
        Ok(f) => f,
        Err(e) => return KvmProbe::unknown(format!("probe failed: {e}")),
    };
    let argv = QemuCommand::new("kvm", "q35", 256)
        .cpu(Some("host"))
        .no_user_config()
        .no_reboot()
        .kernel(Some(kernel), Some(initrd))
        .append(Some(&KernelCmdline::probe().to_string()))
        .serial_file(&console)
        .argv();
    let child = Command::new(qemu)
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(errors)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return KvmProbe::unknown(format!("cannot start QEMU for the KVM probe: {e}")),
    };
    let start = Instant::now();
    // QEMU keeps running, paused, after KVM fails to emulate an instruction: its report
    // on stderr ends the probe as surely as its exit.
    let failed = || {
        let text = std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default();
        text.lines()
            .find(|l| l.contains("KVM internal error") || l.contains("emulation failure"))
            .map(str::to_owned)
    };
    let mut failure = None;
    let reached_init = loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if shows_init(&text) {
            break true;
        }
        failure = failure.or_else(failed);
        if failure.is_some()
            || matches!(child.try_wait(), Ok(Some(_)))
            || start.elapsed() > PROBE_LIMIT
        {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    if let Some(why) = failure {
        return KvmProbe::answer(
            false,
            format!(
                "this host's KVM stopped a Linux guest after {:.0} s: {why} (nested or paging-emulated KVM)",
                start.elapsed().as_secs_f64()
            ),
        );
    }
    if reached_init {
        return KvmProbe::answer(
            true,
            format!(
                "KVM booted a Linux guest to init in {:.1} s",
                start.elapsed().as_secs_f64()
            ),
        );
    }
    let errors = std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default();
    let errors = errors.lines().last().unwrap_or("").trim();
    // QEMU that died of KVM itself before init (some hosts' KVM refuses the guest's MSRs
    // and QEMU aborts in target/i386/kvm) is KVM's own "no", as an emulation failure is.
    if start.elapsed() <= PROBE_LIMIT && kvm_refused(errors) {
        return KvmProbe::answer(
            false,
            format!(
                "this host's KVM stopped a Linux guest after {:.0} s: QEMU: {errors} (nested or paging-emulated KVM)",
                start.elapsed().as_secs_f64()
            ),
        );
    }
    // No failure seen, no init: a guest that was slow (a busy host) or a QEMU that ended
    // for another reason: a "no" believed for an hour, not a day.
    let why = if start.elapsed() > PROBE_LIMIT {
        format!(
            "KVM did not boot a Linux guest to init within {} s",
            PROBE_LIMIT.as_secs()
        )
    } else if errors.is_empty() {
        "QEMU ended before the Linux guest's init ran".to_string()
    } else {
        format!("QEMU ended before the Linux guest's init ran: {errors}")
    };
    KvmProbe::slow(why)
}

#[cfg(test)]
mod tests {
    use super::kvm_refused;

    #[test]
    fn qemu_aborting_in_its_kvm_code_is_kvm_refusing_the_guest() {
        assert!(kvm_refused(
            "qemu-system-x86_64: target/i386/kvm/kvm.c:3849: kvm_buf_set_msrs: Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed."
        ));
        assert!(!kvm_refused("qemu-system-x86_64: terminating on signal 15"));
        assert!(!kvm_refused(""));
    }
}
