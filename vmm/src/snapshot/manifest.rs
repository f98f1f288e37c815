//! A snapshot directory's manifest (`manifest.json`): what the snapshot is (profile, the
//! QEMU and machine that made it, memory, network and SSH plan, keys), the checksums of
//! its files, and what making it cost. `vmbuild build` refuses a snapshot whose files do
//! not match it or whose QEMU differs from this host's.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::qemu::{QemuBinary, StateFormat};

pub const MANIFEST_FILE: &str = "manifest.json";
/// Bumped when a snapshot made by an older vmbuild can no longer be revived by this one.
pub const FORMAT: u32 = 1;

/// Why a snapshot cannot be used; each has its own exit code.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotProblem {
    /// Missing, truncated, corrupted: bootstrap again.
    #[error("{0}")]
    Damaged(String),
    /// Made by another QEMU, machine or vmbuild format: bootstrap again on this host.
    #[error("{0}")]
    Incompatible(String),
}

/// What checking a snapshot can end in: a problem with the snapshot, which callers
/// branch on (each has its exit code), or anything else (an I/O error, QEMU that will
/// not list its machines), which they pass up.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Problem(#[from] SnapshotProblem),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub vmbuild_version: String,
    pub profile: String,
    /// UTC, RFC 3339.
    pub created_at: String,
    pub qemu: QemuInfo,
    pub machine: MachinePlan,
    /// The QEMU options `machine` renders to (for people; a revive derives them from
    /// `machine` again), with $SNAPSHOT, $DISK and $NET_SOCKET for what differs per run.
    #[serde(default)]
    pub qemu_args: Vec<String>,
    pub state: StateInfo,
    pub network: NetworkPlan,
    pub ssh: SshPlan,
    /// Where the target mounts xchg (the store is mounted at its host path, as in `run`).
    pub mounts: MountPlan,
    /// The controller suspended after its first login, when bootstrap made one.
    #[serde(default)]
    pub controller: Option<ControllerSnapshot>,
    pub files: Vec<FileEntry>,
    /// Seconds per bootstrap phase.
    pub timings: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QemuInfo {
    /// `major.minor.micro`: a state file is only revived by the QEMU version that wrote it.
    pub version: String,
    pub binary: String,
}

/// The target's virtual machine. A revive must recreate exactly this machine, so every
/// QEMU option that shapes it is derived from these fields (`target::machine_args`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MachinePlan {
    /// A versioned machine type (`pc-i440fx-10.0`), never an alias that could change.
    pub machine: String,
    /// `tcg` or `kvm`: a snapshot is revived under the accelerator that made it.
    pub accel: String,
    pub cpu: Option<String>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Direct kernel boot (files in the snapshot directory), for profiles that use it.
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub append: Option<String>,
    /// A UEFI machine (the windows-cygwin profile); absent for the Linux profiles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uefi: Option<UefiPlan>,
}

/// The windows-cygwin target's firmware and TPM: a q35 machine booted by OVMF, with the
/// shares' hot-plug slots and the readiness port (`profile::windows::machine`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UefiPlan {
    /// OVMF's code on the host (Debian's `ovmf`; read-only, not copied).
    pub firmware: String,
    pub secure_boot: bool,
    /// The target's UEFI variables in the snapshot directory; each build gets a copy.
    pub vars: String,
    /// A TPM 2.0 from swtpm (Windows 11); its state travels in the memory state.
    pub tpm: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateInfo {
    pub file: String,
    /// `multifd-zstd` (the main channel in `file`, channel N in `file.N`), `mapped-ram`
    /// or `stream`.
    pub format: String,
    pub bytes: u64,
    /// Written (and to be read) by this many multifd channels in parallel.
    #[serde(default)]
    pub multifd_channels: Option<u8>,
}

impl StateInfo {
    pub fn state_format(&self) -> StateFormat {
        match (self.format.as_str(), self.multifd_channels) {
            ("stream", _) => StateFormat::Stream,
            ("multifd-zstd", n) => StateFormat::ZstdChannels(n.unwrap_or(1).max(1)),
            (_, Some(n)) => StateFormat::MappedRamMultifd(n),
            (_, None) => StateFormat::MappedRam,
        }
    }
}

/// How snapshots are written by default: QEMU's multifd channels, zstd-compressed, one
/// thread per core (2 to 4), recorded to files (`recorded_channels`). Measured
/// (`snapshot-bench`, BENCHMARKS.md): a cold revive reads a fraction of what mapped-ram
/// reads, and the channels decompress in parallel; mapped-ram, read in place, stays the
/// faster warm revive for incompressible memory (`bootstrap --state-format mapped-ram`).
pub fn snapshot_state_format() -> StateFormat {
    StateFormat::ZstdChannels(default_channels())
}

/// One multifd channel per core, 2 to 4.
pub fn default_channels() -> u8 {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    cores.clamp(2, 4) as u8
}

/// The private segment every build gets a copy of: the same addresses each time, since
/// each build has its own switch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkPlan {
    pub target_ip: String,
    pub controller_ip: String,
    pub prefix_len: u8,
    pub target_mac: String,
    pub controller_mac: String,
    pub ssh_port: u16,
}

impl Default for NetworkPlan {
    fn default() -> Self {
        NetworkPlan {
            target_ip: "10.77.0.2".into(),
            controller_ip: "10.77.0.1".into(),
            prefix_len: 24,
            target_mac: "52:54:00:77:00:02".into(),
            controller_mac: "52:54:00:77:00:01".into(),
            ssh_port: 22,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SshPlan {
    pub user: String,
    /// The controller's private key (dropbear format), relative to the snapshot.
    pub client_key: String,
    pub client_public_key: String,
    /// The target's host key, pinned at bootstrap: a build refuses any other.
    pub host_key: String,
    /// Where the target's shell writes vmbuild's markers: its console as QEMU connects
    /// it (the Linux targets' /dev/console, Windows' COM1 as Cygwin's /dev/ttyS0).
    #[serde(default = "default_console_device")]
    pub console_device: String,
}

fn default_console_device() -> String {
    "/dev/console".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControllerSnapshot {
    pub state: String,
    pub initrd: String,
    pub memory_mib: u32,
    /// The same controller snapshotted by the embedded KVM VMM (a directory), made where
    /// that VMM boots Linux; builds there restore it in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedded: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountPlan {
    pub xchg: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    /// disk, state, kernel, initrd, controller, key.
    pub role: String,
    pub bytes: u64,
    pub sha256: String,
}

impl Manifest {
    /// Reads `dir`'s manifest; a missing or unreadable one makes the snapshot damaged.
    pub fn load(dir: &Path) -> Result<Manifest, SnapshotError> {
        if !dir.is_dir() {
            let what = if dir.exists() {
                "it is not a directory"
            } else {
                "the directory does not exist"
            };
            return Err(SnapshotProblem::Damaged(format!(
                "no snapshot at {}: {what} (create one with `vmbuild bootstrap --out DIR`)",
                dir.display(),
            ))
            .into());
        }
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            SnapshotProblem::Damaged(format!(
                "{} is not a usable snapshot: cannot read {MANIFEST_FILE} ({e}); its bootstrap may not have finished",
                dir.display()
            ))
        })?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| SnapshotProblem::Damaged(format!("{} is damaged: {e}", path.display())))?;
        let format = value.get("format").and_then(|f| f.as_u64());
        if format != Some(FORMAT as u64) {
            return Err(SnapshotProblem::Incompatible(format!(
                "{} has snapshot format {}, this vmbuild reads format {FORMAT}: bootstrap it again",
                dir.display(),
                format.map_or("(none)".into(), |f| f.to_string())
            ))
            .into());
        }
        let m: Manifest = serde_json::from_value(value)
            .map_err(|e| SnapshotProblem::Damaged(format!("{} is damaged: {e}", path.display())))?;
        m.check_plan().map_err(|why| {
            SnapshotProblem::Damaged(format!("{} is damaged: {why}", path.display()))
        })?;
        Ok(m)
    }

    /// The values that end up in guest scripts and QEMU options must be what bootstrap
    /// writes: addresses, a MAC, a plain user name, an absolute path without quotes.
    fn check_plan(&self) -> Result<(), String> {
        let n = &self.network;
        for (what, ip) in [
            ("target_ip", &n.target_ip),
            ("controller_ip", &n.controller_ip),
        ] {
            ip.parse::<std::net::Ipv4Addr>()
                .map_err(|_| format!("network.{what} '{ip}' is not an IPv4 address"))?;
        }
        if n.prefix_len == 0 || n.prefix_len > 30 {
            return Err(format!("network.prefix_len {} is not 1-30", n.prefix_len));
        }
        for (what, mac) in [
            ("target_mac", &n.target_mac),
            ("controller_mac", &n.controller_mac),
        ] {
            let ok = mac.len() == 17
                && mac
                    .split(':')
                    .all(|b| b.len() == 2 && u8::from_str_radix(b, 16).is_ok());
            if !ok {
                return Err(format!("network.{what} '{mac}' is not a MAC address"));
            }
        }
        let user_ok = !self.ssh.user.is_empty()
            && self
                .ssh
                .user
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !user_ok {
            return Err(format!(
                "ssh.user '{}' is not a plain user name",
                self.ssh.user
            ));
        }
        let key_ok = |k: &str| {
            k.split(' ').count() == 2
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+/=- ".contains(c))
        };
        if !key_ok(&self.ssh.host_key) {
            return Err("ssh.host_key is not a public key line".into());
        }
        if let Some(e) = self.controller.as_ref().and_then(|c| c.embedded.as_ref()) {
            if e != crate::snapshot::EMBEDDED_CONTROLLER_DIR {
                return Err(format!(
                    "controller.embedded '{e}' is not the embedded controller's directory"
                ));
            }
        }
        let x = &self.mounts.xchg;
        if !x.starts_with('/') || x.contains(['\'', '"', '\\', '\n']) {
            return Err(format!("mounts.xchg '{x}' is not a plain absolute path"));
        }
        // Every file the manifest names is read (hashed, given to QEMU, revived) from the
        // snapshot directory: a name that leaves it (absolute, or through `..`) would have
        // a build read or hand QEMU any file of the host.
        let mut names: Vec<(&str, &str)> = self
            .files
            .iter()
            .map(|f| ("files[].name", f.name.as_str()))
            .collect();
        names.push(("state.file", &self.state.file));
        names.push(("ssh.client_key", &self.ssh.client_key));
        for (what, name) in [
            ("machine.kernel", &self.machine.kernel),
            ("machine.initrd", &self.machine.initrd),
        ] {
            if let Some(name) = name {
                names.push((what, name));
            }
        }
        if let Some(c) = &self.controller {
            names.push(("controller.state", &c.state));
            names.push(("controller.initrd", &c.initrd));
        }
        for (what, name) in names {
            if !is_snapshot_file_name(name) {
                return Err(format!(
                    "{what} '{name}' is not a file inside the snapshot directory"
                ));
            }
        }
        Ok(())
    }

    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        let tmp = dir.join(".manifest.json.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, dir.join(MANIFEST_FILE))?;
        Ok(())
    }

    pub fn file(&self, role: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.role == role)
    }

    /// Whether this host's QEMU can revive the snapshot: the same version (QEMU keeps
    /// migration compatible across versions only for live migration with matching
    /// machine types and devices; a state file made by another build is refused rather
    /// than risked) and the machine type.
    pub fn check_qemu(&self, qemu: &QemuBinary) -> Result<(), SnapshotError> {
        let (a, b, c) = qemu.version;
        let here = format!("{a}.{b}.{c}");
        if here != self.qemu.version {
            return Err(SnapshotProblem::Incompatible(format!(
                "the snapshot was made by QEMU {} and this host has QEMU {here} ({}): bootstrap it again with this QEMU",
                self.qemu.version,
                qemu.path.display()
            ))
            .into());
        }
        let machines = qemu.machine_types()?;
        if !machines.contains(&self.machine.machine) {
            return Err(SnapshotProblem::Incompatible(format!(
                "the snapshot's machine type {} is not offered by {}: bootstrap it again",
                self.machine.machine,
                qemu.path.display()
            ))
            .into());
        }
        if self.machine.accel == "kvm" && !Path::new("/dev/kvm").exists() {
            return Err(SnapshotProblem::Incompatible(
                "the snapshot was made under KVM and this host has no /dev/kvm".into(),
            )
            .into());
        }
        Ok(())
    }
}

impl Manifest {
    /// The state file and the manifest agree on the machine type the target was saved
    /// from. An edited manifest (or files from two snapshots) would pass every checksum,
    /// "can revive" by QEMU's list of machine types, and then fail at every build.
    pub fn check_state_machine(&self, dir: &Path) -> Result<(), SnapshotError> {
        let path = dir.join(&self.state.file);
        match state_machine_type(&path) {
            Ok(Some(saved)) if saved != self.machine.machine => Err(SnapshotProblem::Damaged(format!(
                "the manifest says machine type {}, but the state file {} was saved from {saved}: \
                 the manifest was edited or its files come from another snapshot; bootstrap it again",
                self.machine.machine,
                path.display()
            ))
            .into()),
            Ok(_) => Ok(()),
            Err(e) => Err(SnapshotProblem::Damaged(format!(
                "the snapshot's state file {} cannot be read ({e}): bootstrap the snapshot again",
                path.display()
            ))
            .into()),
        }
    }
}

/// A relative path of plain names (no root, no `.` or `..`, not empty): a file inside the
/// snapshot directory, as bootstrap names them (`state`, `ssh/client_key`, ...).
fn is_snapshot_file_name(name: &str) -> bool {
    !name.is_empty()
        && Path::new(name)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// The machine type a QEMU migration stream was saved from: its header (`QEVM`, version
/// 3) is followed by a configuration section that names it. `None` for a stream without
/// one.
pub fn state_machine_type(path: &Path) -> std::io::Result<Option<String>> {
    use std::io::Read;
    let mut head = Vec::with_capacity(13 + 256);
    std::fs::File::open(path)?
        .take(13 + 256)
        .read_to_end(&mut head)?;
    const CONFIGURATION_SECTION: u8 = 0x07;
    if head.len() < 13
        || &head[..4] != b"QEVM"
        || head[4..8] != [0, 0, 0, 3]
        || head[8] != CONFIGURATION_SECTION
    {
        return Ok(None);
    }
    let len = u32::from_be_bytes([head[9], head[10], head[11], head[12]]) as usize;
    Ok(head
        .get(13..13 + len)
        .map(|name| String::from_utf8_lossy(name).into_owned()))
}

/// One file checked against the manifest.
#[derive(Debug, Clone, Serialize)]
pub struct FileCheck {
    pub name: String,
    pub bytes: u64,
    /// False when an earlier full check of the unchanged file was reused.
    pub hashed: bool,
}

/// Checks every file of the manifest: present, of the recorded size, with the recorded
/// sha256. `full` hashes every file; otherwise a file whose inode, size, mtime and ctime
/// are unchanged since it last passed a full check is not hashed again (any write to it
/// changes its ctime), which keeps a 1 GiB state file from costing every build ~0.5 s.
pub fn verify_files(
    dir: &Path,
    manifest: &Manifest,
    full: bool,
) -> Result<Vec<FileCheck>, SnapshotError> {
    verify_some_files(dir, manifest, full, |_| true)
}

/// The role of files only some hosts use: the embedded VMM's controller snapshot. A build
/// checks them only when it is about to use them, and does without them if they fail.
pub const OPTIONAL_ROLE: &str = "embedded-controller";

/// As [`verify_files`], for the entries whose role `wanted` accepts.
pub fn verify_some_files(
    dir: &Path,
    manifest: &Manifest,
    full: bool,
    wanted: impl Fn(&str) -> bool,
) -> Result<Vec<FileCheck>, SnapshotError> {
    let mut checks = Vec::new();
    for entry in manifest.files.iter().filter(|e| wanted(&e.role)) {
        let path = dir.join(&entry.name);
        let meta = std::fs::metadata(&path).map_err(|e| {
            SnapshotProblem::Damaged(format!(
                "the snapshot's {} file {} is missing ({e}): bootstrap the snapshot again",
                entry.role,
                path.display()
            ))
        })?;
        if !meta.is_file() {
            return Err(SnapshotProblem::Damaged(format!(
                "the snapshot's {} file {} is not a file (replaced by a directory or device?): bootstrap the snapshot again",
                entry.role,
                path.display()
            ))
            .into());
        }
        if meta.len() != entry.bytes {
            return Err(SnapshotProblem::Damaged(format!(
                "the snapshot's {} file {} has {} bytes, the manifest says {} (truncated or replaced): bootstrap the snapshot again",
                entry.role,
                path.display(),
                meta.len(),
                entry.bytes
            ))
            .into());
        }
        let stamp = stamp_path(&path, &meta, &entry.sha256);
        if !full && stamp.as_ref().is_some_and(|s| s.exists()) {
            if let Some(stamp) = &stamp {
                refresh_stamp(stamp);
            }
            checks.push(FileCheck {
                name: entry.name.clone(),
                bytes: entry.bytes,
                hashed: false,
            });
            continue;
        }
        let sum = sha256_file(&path)?;
        if sum != entry.sha256 {
            return Err(SnapshotProblem::Damaged(format!(
                "checksum mismatch for the snapshot's {} file {}: the snapshot is damaged; bootstrap it again",
                entry.role,
                path.display()
            ))
            .into());
        }
        if let Some(stamp) = stamp {
            write_stamp(&stamp);
        }
        checks.push(FileCheck {
            name: entry.name.clone(),
            bytes: entry.bytes,
            hashed: true,
        });
    }
    Ok(checks)
}

/// Records that the files as they are now match the manifest (bootstrap has just hashed
/// them), so that the first build does not hash them again.
pub fn mark_verified(dir: &Path, manifest: &Manifest) {
    for entry in &manifest.files {
        let path = dir.join(&entry.name);
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if let Some(stamp) = stamp_path(&path, &meta, &entry.sha256) {
            write_stamp(&stamp);
        }
    }
}

pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Stamps unused for this long are removed: each one names a file version that has since
/// been replaced or not built from, and they would pile up forever (one per file of every
/// snapshot ever verified).
const STAMP_UNUSED_FOR: Duration = Duration::from_secs(30 * 86_400);

/// Writes a stamp (best effort: without it the next build just hashes again), and prunes
/// the stamps nobody used for [`STAMP_UNUSED_FOR`].
fn write_stamp(stamp: &Path) {
    let Some(dir) = stamp.parent() else {
        return;
    };
    let _ = std::fs::create_dir_all(dir);
    let _ = std::fs::write(stamp, b"");
    prune_stamps(dir, STAMP_UNUSED_FOR);
}

/// Marks a stamp used (its mtime), at most once a day, so pruning keeps it.
fn refresh_stamp(stamp: &Path) {
    let stale = std::fs::metadata(stamp)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .is_some_and(|age| age > Duration::from_secs(86_400));
    if stale {
        if let Ok(f) = std::fs::File::options().write(true).open(stamp) {
            let _ = f.set_modified(SystemTime::now());
        }
    }
}

fn prune_stamps(dir: &Path, unused_for: Duration) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_some_and(|age| age > unused_for);
        if old {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Where the "this exact file passed a full check" stamp lives.
fn stamp_path(path: &Path, meta: &std::fs::Metadata, sha256: &str) -> Option<PathBuf> {
    let canonical = std::fs::canonicalize(path).ok()?;
    let key = format!(
        "{}\0{}\0{}\0{}\0{}.{}\0{}.{}\0{sha256}",
        canonical.display(),
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    );
    Some(
        crate::cache_dir::cache_dir()
            .join("verified")
            .join(hex(&Sha256::digest(key.as_bytes()))),
    )
}

/// Now, as RFC 3339 UTC (`2026-11-25T21:44:45Z`).
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The manifest entry for a file that is now final.
pub fn file_entry(dir: &Path, name: &str, role: &str) -> anyhow::Result<FileEntry> {
    let path = dir.join(name);
    Ok(FileEntry {
        name: name.to_owned(),
        role: role.to_owned(),
        bytes: std::fs::metadata(&path)
            .with_context(|| format!("{}", path.display()))?
            .len(),
        sha256: sha256_file(&path)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_must_stay_inside_the_snapshot() {
        for ok in ["state", "ssh/client_key", "controller-kvm/vm-state.json"] {
            assert!(is_snapshot_file_name(ok), "{ok}");
        }
        // Manifest::load accepted names like these (the snapshot_files fuzz target's
        // check, on its seeds that name files outside the directory).
        for bad in ["", "/etc/shadow", "../outside", "ssh/../../x", "./state"] {
            assert!(!is_snapshot_file_name(bad), "{bad}");
        }
    }

    #[test]
    fn utc_now_looks_like_rfc3339() {
        let s = utc_now();
        assert_eq!(s.len(), 20, "{s}");
        assert!(s.starts_with("20") && s.ends_with('Z'), "{s}");
    }
}

#[cfg(test)]
mod stamp_tests {
    use super::*;

    #[test]
    fn stamps_unused_for_long_are_pruned_and_used_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (old, used, fresh) = (
            dir.path().join("old"),
            dir.path().join("used"),
            dir.path().join("fresh"),
        );
        let long_ago = SystemTime::now() - Duration::from_secs(40 * 86_400);
        for path in [&old, &used] {
            std::fs::write(path, b"").unwrap();
            std::fs::File::options()
                .write(true)
                .open(path)
                .unwrap()
                .set_modified(long_ago)
                .unwrap();
        }
        refresh_stamp(&used);
        write_stamp(&fresh);
        assert!(!old.exists());
        assert!(used.exists());
        assert!(fresh.exists());
    }
}
