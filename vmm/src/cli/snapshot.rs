//! `vmbuild snapshot inspect|verify|share DIR`.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use serde_json::json;

use crate::exit;
use crate::qemu::QemuBinary;
use crate::snapshot::manifest::{self, Manifest, SnapshotError, SnapshotProblem};

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Show a snapshot's manifest: profile, QEMU and machine, sizes, timings
    #[command(after_help = "\
Exit status:
  0    shown (files whose size changed are marked)
  2    bad command line
  120  no snapshot there, or its manifest is damaged
  121  its format is not this vmbuild's")]
    Inspect(InspectArgs),
    /// Check a snapshot: every file's checksum, and that this host's QEMU can revive it
    #[command(after_help = "\
Exit status:
  0    usable
  2    bad command line
  120  missing, truncated or corrupted
  121  made by another QEMU version, machine type or vmbuild format

Environment: VMBUILD_QEMU (the QEMU binary), XDG_CACHE_HOME (verification stamps).")]
    Verify(VerifyArgs),
    /// Let a group build from a snapshot: every file readable by GROUP (its owner or root)
    #[command(after_help = "\
A snapshot is its owner's: bootstrap makes its memory state readable by its owner only.
Sharing makes every file readable by GROUP, so that its members can `vmbuild build
--snapshot DIR`; a build only reads the snapshot. The memory state holds the target's
SSH host key and the controller's key, so the group can read them too: they open nothing
but VMs revived from this snapshot, inside the builder's own vmbuild process.

Exit status:
  0    shared
  2    bad command line, no such group, not a member of it, or not the snapshot's owner
  120  no snapshot there")]
    Share(ShareArgs),
}

#[derive(Args, Debug)]
pub struct ShareArgs {
    /// The snapshot directory
    dir: PathBuf,
    /// The group, a name or a number; you must be in it (or root)
    #[arg(long, value_name = "GROUP")]
    group: String,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The snapshot directory
    dir: PathBuf,
    /// The manifest as JSON
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The snapshot directory
    dir: PathBuf,
    /// One line of JSON
    #[arg(long)]
    json: bool,
}

impl SnapshotCommand {
    pub fn run(self) -> anyhow::Result<i32> {
        match self {
            SnapshotCommand::Inspect(a) => inspect(&a.dir, a.json),
            SnapshotCommand::Verify(a) => verify(&a.dir, a.json),
            SnapshotCommand::Share(a) => Ok(share(&a.dir, &a.group)),
        }
    }
}

/// Whether this user can give `group` a snapshot: it exists, and the user is root or in
/// it (chown to a group needs both).
pub fn may_share_with(group: &str) -> Result<(), String> {
    use nix::unistd::{getegid, geteuid, getgroups, Gid, Group};
    let gid = match group.parse::<u32>() {
        Ok(n) => Gid::from_raw(n),
        Err(_) => Group::from_name(group)
            .ok()
            .flatten()
            .map(|g| g.gid)
            .ok_or_else(|| format!("no group named '{group}' on this host"))?,
    };
    let member = geteuid().is_root()
        || getegid() == gid
        || getgroups().is_ok_and(|groups| groups.contains(&gid));
    if member {
        Ok(())
    } else {
        Err(format!(
            "you are not in group {group}: only its members (or root) can give it a snapshot"
        ))
    }
}

fn share(dir: &Path, group: &str) -> i32 {
    if !dir.join(manifest::MANIFEST_FILE).is_file() {
        eprintln!(
            "vmbuild snapshot share: no snapshot at {} (no {})",
            dir.display(),
            manifest::MANIFEST_FILE
        );
        return exit::SNAPSHOT_DAMAGED;
    }
    if let Err(msg) = may_share_with(group) {
        eprintln!("vmbuild snapshot share: {msg}");
        return exit::USAGE;
    }
    match crate::snapshot::access::share_with_group(dir, group) {
        Ok(n) => {
            eprintln!(
                "vmbuild snapshot share: {} is readable by group {group} ({n} entries)",
                dir.display()
            );
            exit::SUCCESS
        }
        Err(msg) => {
            eprintln!("vmbuild snapshot share: {msg}");
            exit::USAGE
        }
    }
}

fn problem_code(e: &SnapshotError) -> (i32, &'static str) {
    match e {
        SnapshotError::Problem(SnapshotProblem::Damaged(_)) => (exit::SNAPSHOT_DAMAGED, "damaged"),
        SnapshotError::Problem(SnapshotProblem::Incompatible(_)) => {
            (exit::SNAPSHOT_INCOMPATIBLE, "incompatible")
        }
        SnapshotError::Other(_) => (exit::FAILURE, "error"),
    }
}

fn inspect(dir: &Path, as_json: bool) -> anyhow::Result<i32> {
    let m = match Manifest::load(dir) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("vmbuild snapshot inspect: {e:#}");
            return Ok(problem_code(&e).0);
        }
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(exit::SUCCESS);
    }
    println!("snapshot   {}", dir.display());
    println!(
        "profile    {} (made {} by vmbuild {})",
        m.profile, m.created_at, m.vmbuild_version
    );
    println!(
        "qemu       {} ({}), machine {}, accel {}",
        m.qemu.version, m.qemu.binary, m.machine.machine, m.machine.accel
    );
    println!(
        "memory     {} MiB, {} vCPU; state {} ({}, {:.1} MiB)",
        m.machine.memory_mib,
        m.machine.cpus,
        m.state.file,
        m.state.format,
        m.state.bytes as f64 / (1 << 20) as f64
    );
    println!(
        "network    target {} ({}), controller {} ({}), ssh port {}",
        m.network.target_ip,
        m.network.target_mac,
        m.network.controller_ip,
        m.network.controller_mac,
        m.network.ssh_port
    );
    println!(
        "ssh        user {}, pinned host key {}",
        m.ssh.user, m.ssh.host_key
    );
    println!("files");
    // Columns as wide as their longest entry (controller-initrd.img is 21 characters).
    let name_w = m.files.iter().map(|f| f.name.len()).max().unwrap_or(0);
    let role_w = m.files.iter().map(|f| f.role.len()).max().unwrap_or(0);
    for f in &m.files {
        let on_disk = std::fs::metadata(dir.join(&f.name)).map(|md| md.len()).ok();
        let note = match on_disk {
            Some(n) if n == f.bytes => String::new(),
            Some(n) => format!("  (now {n} bytes!)"),
            None => "  (missing!)".into(),
        };
        println!(
            "  {:<name_w$} {:<role_w$} {:>12} bytes  sha256 {}{note}",
            f.name,
            f.role,
            f.bytes,
            &f.sha256[..16.min(f.sha256.len())]
        );
    }
    println!("timings (s)");
    for (k, v) in &m.timings {
        println!("  {k:<16} {v:.3}");
    }
    Ok(exit::SUCCESS)
}

fn verify(dir: &Path, as_json: bool) -> anyhow::Result<i32> {
    let result = Manifest::load(dir).and_then(|m| {
        let qemu = QemuBinary::locate()?;
        let files = manifest::verify_files(dir, &m, true)?;
        m.check_qemu(&qemu)?;
        m.check_state_machine(dir)?;
        Ok(files)
    });
    match result {
        Ok(files) => {
            if as_json {
                // One shape for both outcomes, so that a script reads the same keys.
                println!(
                    "{}",
                    json!({ "ok": true, "problem": null, "message": null, "files": files })
                );
            } else {
                let bytes: u64 = files.iter().map(|f| f.bytes).sum();
                println!(
                    "{}: ok ({} files, {:.1} MiB checked; this QEMU can revive it)",
                    dir.display(),
                    files.len(),
                    bytes as f64 / (1 << 20) as f64
                );
            }
            Ok(exit::SUCCESS)
        }
        Err(e) => {
            let (code, kind) = problem_code(&e);
            if as_json {
                println!(
                    "{}",
                    json!({ "ok": false, "problem": kind, "message": format!("{e:#}"), "files": [] })
                );
            } else {
                eprintln!("vmbuild snapshot verify: {e:#}");
            }
            Ok(code)
        }
    }
}
