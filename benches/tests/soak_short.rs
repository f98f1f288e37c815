//! The soak benchmark's short version, in CI (issue 16): 4 concurrent builds from one
//! snapshot, 10 sequential ones, and fs serve and the switch under connecting and
//! disconnecting front-ends for 10 s, held to the same checks as the full run
//! (`soak --check`): every build's own output and exit code, the snapshot unchanged,
//! nothing left behind, no resource that grows. The full run's figures are in
//! BENCHMARKS.md.

use std::process::Command;

#[test]
fn a_short_soak_holds_every_check() {
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_soak"))
        .args([
            "--load",
            "4",
            "--builds",
            "10",
            "--every",
            "5",
            "--servers-seconds",
            "10",
            "--check",
            "--workdir",
        ])
        .arg(work.path().join("soak"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
