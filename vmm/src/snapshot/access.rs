//! Who may use a snapshot. A snapshot belongs to the user who bootstrapped it; others
//! build from it when its owner shares it with a group they are in (`bootstrap --group`
//! or `vmbuild snapshot share`), which makes every file group-readable. A build only
//! reads the snapshot: its overlays, sockets and verification stamps are the builder's
//! own (runtime and cache directories).
//!
//! The keys cannot stay private from the group: the memory state holds the target's SSH
//! host key and the controller's client key, as any RAM image of a running sshd does, so
//! whoever may revive the snapshot may read them. They open nothing but VMs revived from
//! that same snapshot, on a network that lives inside one vmbuild process; that is why
//! sharing them with the group that may revive it gives nothing away.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::manifest::{Manifest, MANIFEST_FILE};

/// Says, for the first file of the snapshot this user may not read, whose it is and what
/// to do. Other problems (missing, damaged) are verification's to report.
pub fn check_readable(dir: &Path) -> Result<(), String> {
    let manifest = dir.join(MANIFEST_FILE);
    readable(&manifest)?;
    let Ok(m) = Manifest::load(dir) else {
        return Ok(());
    };
    for entry in &m.files {
        readable(&dir.join(&entry.name))?;
    }
    Ok(())
}

fn readable(path: &Path) -> Result<(), String> {
    match std::fs::File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let meta = std::fs::metadata(path).ok();
            let owner = meta
                .as_ref()
                .map(|m| {
                    let user = nix::unistd::User::from_uid(m.uid().into())
                        .ok()
                        .flatten()
                        .map_or(m.uid().to_string(), |u| u.name);
                    let group = nix::unistd::Group::from_gid(m.gid().into())
                        .ok()
                        .flatten()
                        .map_or(m.gid().to_string(), |g| g.name);
                    format!(
                        " (owner {user}, group {group}, mode {:o})",
                        m.permissions().mode() & 0o7777
                    )
                })
                .unwrap_or_default();
            let dir = path.parent().unwrap_or(path);
            Err(format!(
                "cannot read the snapshot's {}{owner}: {e}. A snapshot is its owner's until \
                 shared: its owner (or root) can run `vmbuild snapshot share {} --group GROUP` \
                 for a group you are in; or bootstrap a snapshot of your own",
                path.display(),
                dir.display()
            ))
        }
        _ => Ok(()),
    }
}

/// A snapshot made under KVM revives only under KVM: this user must be able to open
/// /dev/kvm.
pub fn check_accel(dir: &Path) -> Result<(), String> {
    let Ok(m) = Manifest::load(dir) else {
        return Ok(());
    };
    if m.machine.accel != "kvm" {
        return Ok(());
    }
    crate::accel::kvm_access().map_err(|why| {
        format!(
            "the snapshot {} was made under KVM and revives only under KVM, but {why}",
            dir.display()
        )
    })
}

/// Gives `group` read access to every file of the snapshot (and search access to its
/// directories). Returns how many entries were changed.
pub fn share_with_group(dir: &Path, group: &str) -> Result<usize, String> {
    let gid = match group.parse::<u32>() {
        Ok(n) => nix::unistd::Gid::from_raw(n),
        Err(_) => nix::unistd::Group::from_name(group)
            .ok()
            .flatten()
            .map(|g| g.gid)
            .ok_or_else(|| format!("no group named '{group}' on this host"))?,
    };
    if !dir.join(MANIFEST_FILE).is_file() {
        return Err(format!(
            "no snapshot at {} (no {MANIFEST_FILE})",
            dir.display()
        ));
    }
    let mut changed = 0;
    share_tree(dir, gid, &mut changed)?;
    Ok(changed)
}

fn share_tree(path: &Path, gid: nix::unistd::Gid, changed: &mut usize) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let explain = |e: nix::Error| {
        let hint = if e == nix::Error::EPERM {
            ": only the snapshot's owner (in that group) or root can share it"
        } else {
            ""
        };
        format!("{}: {e}{hint}", path.display())
    };
    nix::unistd::chown(path, None, Some(gid)).map_err(explain)?;
    let add = if meta.is_dir() { 0o050 } else { 0o040 };
    let mode = meta.permissions().mode() & 0o7777;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | add))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    *changed += 1;
    if meta.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for entry in entries.flatten() {
            share_tree(&entry.path(), gid, changed)?;
        }
    }
    Ok(())
}
