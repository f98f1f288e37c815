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

/// The FUSE requests each share's session received, in order, as `VMBUILD_RECORD_DIR`
/// recorded them (debug builds of vmbuild): one list of (opcode, body) per session.
pub fn recorded_fuse_sessions(dir: &std::path::Path) -> Vec<Vec<(u32, Vec<u8>)>> {
    const IN_HEADER: usize = 40;
    let mut sessions = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if !entry.file_name().to_string_lossy().starts_with("fuse-") {
            continue;
        }
        let bytes = std::fs::read(entry.path()).unwrap();
        let mut requests = Vec::new();
        let mut at = 0;
        while at + 4 <= bytes.len() {
            let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            let request = &bytes[at + 4..(at + 4 + len).min(bytes.len())];
            at += 4 + len;
            if request.len() >= IN_HEADER {
                let opcode = u32::from_le_bytes(request[4..8].try_into().unwrap());
                requests.push((opcode, request[IN_HEADER..].to_vec()));
            }
        }
        sessions.push(requests);
    }
    sessions
}
