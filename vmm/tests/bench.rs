//! `vmbuild bench` as a user runs it: bad command lines, an engine that is not built, the
//! snapshot suite for real (QEMU guests, every method) with its JSON and plots, and Ctrl-C
//! in the middle of the switch suite, which must leave no engine, peer, namespace or link.
//!
//! The engines are the `vmbuild-benches` binaries beside this vmbuild (`cargo build
//! --workspace --bins`, which scripts/test.sh runs first).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn vmbuild() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmbuild"))
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The engines must be built: a test that cannot find them says how to build them.
fn engines_built() {
    let dir = Path::new(env!("CARGO_BIN_EXE_vmbuild")).parent().unwrap();
    for e in [
        "fs-bench",
        "switch-bench",
        "snapshot-bench",
        "vde-bench",
        "image-bench",
        "run-bench",
        "lifecycle-bench",
        "ninep-bench",
        "kvm-bench",
        "nic-bench",
        "linux-kvm-bench",
    ] {
        assert!(
            dir.join(e).is_file(),
            "{e} is not built beside vmbuild in {}: run `cargo build --workspace --bins` first",
            dir.display()
        );
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn bad_command_lines_are_exit_2_with_the_reason_and_start_nothing() {
    for (args, says) in [
        (&["bench", "disk"][..], "no suite 'disk'"),
        (&["bench", "fs", "--peers", "samba"], "no peer 'samba'"),
        (&["bench", "snapshot", "--rounds", "0"], "--rounds"),
        (&["bench", "snapshot", "--sizes", "128"], "too small"),
        (
            &["bench", "snapshot", "--methods", "lz4"],
            "no method 'lz4'",
        ),
    ] {
        let out = vmbuild().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{args:?} should say {says}: {}",
            text(&out)
        );
    }

    // A vmbuild with no engines beside it or on PATH says how to build them.
    let lonely = tempfile::tempdir().unwrap();
    let copy = lonely.path().join("vmbuild");
    std::fs::copy(env!("CARGO_BIN_EXE_vmbuild"), &copy).unwrap();
    let out = Command::new(&copy)
        .args(["bench", "snapshot"])
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cargo build --release -p vmbuild-benches"),
        "{}",
        text(&out)
    );
}

/// The snapshot suite end to end at one small size: every method suspends and revives a
/// real guest warm and cold, the ratio table is printed, the JSON holds every sample with
/// the machine and versions, the plots are drawn, and the work directory is gone.
#[test]
fn the_snapshot_suite_prints_ratios_writes_every_sample_and_draws_plots() {
    engines_built();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let plots = dir.path().join("plots");
    let out = vmbuild()
        .args([
            "bench", "snapshot", "--sizes", "256", "--rounds", "1", "--json",
        ])
        .arg(&json)
        .arg("--plot")
        .arg(&plots)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("how many times faster than the gzip method"),
        "{}",
        text(&out)
    );

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(report["machine"]["cpus"].as_u64().unwrap() > 0, "{report}");
    assert!(
        report["versions"]["qemu"]
            .as_str()
            .unwrap()
            .starts_with(char::is_numeric),
        "{report}"
    );
    let samples = report["suites"][0]["samples"].as_array().unwrap();
    let methods = [
        "exec: gzip (Nix tooling)",
        "file:",
        "file: + mapped-ram",
        "file: + mapped-ram + multifd ×2",
        "multifd ×2 + zstd, recorded channels (vmbuild)",
    ];
    for method in methods {
        for cache in ["warm", "cold"] {
            let revives: Vec<f64> = samples
                .iter()
                .filter(|s| {
                    s["contender"] == method
                        && s["workload"] == "revive → running"
                        && s["params"]["cache"] == cache
                        && s["params"]["memory_mib"] == 256
                })
                .map(|s| s["value"].as_f64().unwrap())
                .collect();
            assert_eq!(revives.len(), 1, "{method} {cache}: {revives:?}");
            assert!(
                revives[0] > 0.0 && revives[0] < 120.0,
                "{method} {cache}: {revives:?}"
            );
        }
    }

    let svgs: Vec<PathBuf> = std::fs::read_dir(&plots)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        svgs.iter()
            .any(|p| p.to_string_lossy().contains("latency-vs-memory")),
        "{svgs:?}"
    );
    assert!(svgs.len() >= 5, "{svgs:?}");
    for svg in &svgs {
        let body = std::fs::read_to_string(svg).unwrap();
        assert!(
            body.starts_with("<svg") && body.trim_end().ends_with("</svg>"),
            "{}",
            svg.display()
        );
    }

    // The engine's work directory (named on stderr) is gone.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let workdir = stderr
        .split("--workdir ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the engine's command line is shown");
    assert!(!Path::new(workdir).exists(), "{workdir} left behind");
}

/// Ctrl-C while the switch suite runs iperf3 between namespaces through vde_switch and
/// vmbuild switch: exit 130, and no engine, peer, namespace or link is left.
#[test]
fn ctrl_c_in_the_switch_suite_leaves_no_engine_peer_namespace_or_link() {
    engines_built();
    if !is_root() {
        vmbuild_tests::skip(
            "ctrl_c_in_the_switch_suite_leaves_no_engine_peer_namespace_or_link",
            "the switch suite makes namespaces and links: it needs root",
        );
        return;
    }
    let mut child = vmbuild()
        .args(["bench", "switch", "--rounds", "3"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    // Into the second contender of the first round: namespaces, links and a daemonized
    // vde_switch or a vmbuild switch exist now.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no second contender within 120 s: {seen:?}"));
        seen.push(line.clone());
        if seen.iter().filter(|l| l.contains("round 1")).count() >= 2 {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "vmbuild bench still running 30 s after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    while let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
        seen.push(l);
    }
    assert_eq!(status.code(), Some(130), "{seen:?}");

    let netns = String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(!netns.contains("vmbt-s"), "namespaces left: {netns}");
    let links = String::from_utf8(
        Command::new("ip")
            .args(["-br", "link"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for l in links.lines() {
        let name = l.split_whitespace().next().unwrap_or("");
        assert!(
            !(name.starts_with("sba") || name.starts_with("sbb") || name.starts_with("sbr")),
            "link left: {l}"
        );
    }
    let ps = String::from_utf8(
        Command::new("ps")
            .args(["-eo", "args"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for l in ps.lines() {
        assert!(
            !(l.contains("switch-bench")
                || l.contains("vde-bench")
                || l.contains("iperf3 -s -1 -p 5299")),
            "process left: {l}"
        );
    }
}
