//! Where the shares of a run or build appear in the guest, and where they come from on the
//! host, checked together before anything starts. Each check stops a mistake that used to
//! pass in silence:
//!
//! * two shares on one guest path, or one inside another: the later mount hides the
//!   earlier, and a mount point inside a read-write share is created as a directory in
//!   the host's copy of it;
//! * a share on `/`: the guest's root cannot be replaced, so it was quietly not mounted;
//! * a share whose host directory lies inside a directory that must not change (a
//!   snapshot, vmbuild's runtime directory): the guest could write into it.

use std::path::{Path, PathBuf};

use super::usage::{usage, Usage};

/// One share as the guest will see it.
pub struct GuestMount<'a> {
    /// The option that asked for it, for the message (`--store`, `--share A:B`, xchg).
    pub what: String,
    pub guest: &'a str,
    pub host: &'a Path,
    pub read_only: bool,
}

/// A host directory that no share may be in (or be): `(path, what it is)`.
pub struct Protected {
    pub path: PathBuf,
    pub what: String,
}

pub fn check(mounts: &[GuestMount], protected: &[Protected]) -> Result<(), Usage> {
    for (i, m) in mounts.iter().enumerate() {
        if normalize(m.guest) == "/" {
            usage!(
                "{}: a share cannot be mounted on the guest's / (choose a directory such as /mnt/x)",
                m.what
            );
        }
        for earlier in &mounts[..i] {
            let (a, b) = (normalize(earlier.guest), normalize(m.guest));
            if a == b {
                usage!(
                    "{} and {} are both mounted on {a} in the guest: give each its own path",
                    earlier.what,
                    m.what
                );
            }
            let (outer, inner) = if inside(&b, &a) {
                (earlier, m)
            } else if inside(&a, &b) {
                (m, earlier)
            } else {
                continue;
            };
            usage!(
                "{} ({}) would be mounted inside {} ({}) in the guest: mount points must not nest",
                inner.what,
                normalize(inner.guest),
                outer.what,
                normalize(outer.guest)
            );
        }
        let Ok(host) = std::fs::canonicalize(m.host) else {
            continue; // Its own check reports a missing directory.
        };
        for p in protected {
            let protected = resolve(&p.path);
            let writable = if m.read_only { "" } else { " read-write" };
            if host.starts_with(&protected) {
                usage!(
                    "{}: {} is inside {} ({}); sharing it{writable} would let the guest see or change it",
                    m.what,
                    m.host.display(),
                    p.what,
                    p.path.display()
                );
            }
            if !m.read_only && protected.starts_with(&host) {
                usage!(
                    "{}: {} holds {} ({}); sharing it read-write would let the guest change it",
                    m.what,
                    m.host.display(),
                    p.what,
                    p.path.display()
                );
            }
        }
    }
    Ok(())
}

/// `path` with symlinks resolved as far as it exists (a protected directory may not have
/// been created yet, and must still be protected).
fn resolve(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => resolve(parent).join(name),
        _ => path.to_owned(),
    }
}

/// `/a//b/` → `/a/b`. Guest paths are absolute, without `..` tricks that matter here (the
/// guest's mount would resolve them; comparing their text is what catches mistakes).
fn normalize(path: &str) -> String {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

/// Whether `inner` lies strictly below `outer` (whole components).
fn inside(inner: &str, outer: &str) -> bool {
    outer == "/"
        || inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m<'a>(what: &str, guest: &'a str, host: &'a Path, read_only: bool) -> GuestMount<'a> {
        GuestMount {
            what: what.into(),
            guest,
            host,
            read_only,
        }
    }

    #[test]
    fn clashing_nested_and_root_mounts_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let h = d.path();
        let ok = [m("xchg", "/tmp/xchg", h, false), m("a", "/mnt/a", h, true)];
        assert!(check(&ok, &[]).is_ok());
        let same = [
            m("xchg", "/tmp/xchg", h, false),
            m("a", "/tmp/xchg/", h, true),
        ];
        assert!(check(&same, &[]).unwrap_err().0.contains("both mounted"));
        let nested = [
            m("xchg", "/tmp/xchg", h, false),
            m("a", "/tmp/xchg/in", h, true),
        ];
        assert!(check(&nested, &[]).unwrap_err().0.contains("must not nest"));
        let sibling = [
            m("xchg", "/tmp/xchg", h, false),
            m("a", "/tmp/xchg2", h, true),
        ];
        assert!(check(&sibling, &[]).is_ok());
        let root = [m("--store-mount /", "/", h, true)];
        assert!(check(&root, &[]).unwrap_err().0.contains("guest's /"));
    }

    #[test]
    fn shares_in_or_over_protected_directories_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let snap = d.path().join("snap");
        std::fs::create_dir(&snap).unwrap();
        let protected = [Protected {
            path: snap.clone(),
            what: "the snapshot".into(),
        }];
        let inside_snap = [m("--xchg", "/tmp/xchg", &snap, false)];
        assert!(check(&inside_snap, &protected)
            .unwrap_err()
            .0
            .contains("inside the snapshot"));
        let above_rw = [m("--xchg", "/tmp/xchg", d.path(), false)];
        assert!(check(&above_rw, &protected)
            .unwrap_err()
            .0
            .contains("holds the snapshot"));
        let above_ro = [m("--store", "/nix/store", d.path(), true)];
        assert!(check(&above_ro, &protected).is_ok());
    }
}
