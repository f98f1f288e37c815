//! Test support shared by vmbuild's integration tests and benchmarks: a vhost-user
//! front-end that plays the guest driver with no VM, a FUSE client on top of it, and a
//! launcher that boots the guest kit under QEMU, and hand-assembled kernels for the
//! embedded VMM.

pub mod fuse_client;
pub mod guest;
pub mod netns;
pub mod pvh;
pub mod vhost_frontend;

/// Reports a test skipped because this host lacks exactly `reason`: on stderr, and as a
/// line in `$VMBUILD_SKIP_LOG` when set (scripts/test.sh counts each test named there
/// once as skipped; cargo itself only knows passed and ignored). Whole tests only: the
/// caller returns right after, so a skipped test can never also fail or pass.
pub fn skip(test: &str, reason: &str) {
    let line = format!("vmbuild-test-skipped: {test}: {reason}");
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("VMBUILD_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}
