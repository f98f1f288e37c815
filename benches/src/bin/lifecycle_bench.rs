//! The snapshot lifecycle end to end, side by side in one run: `vmbuild build` (revive a
//! bootstrapped target, hot-plug the shares, a fresh controller logs in over SSH, the
//! command runs) against `vmbuild run` (a fresh boot of the guest kit with the shares),
//! for `true` and for a small-files workload on the store and xchg. Rounds interleave
//! the two; medians reported, with the build's phases (`--timings`).
//!
//! Reproduce: `cargo build --release -p vmbuild -p vmbuild-benches && target/release/lifecycle-bench`

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use vmbuild::bench::sample::{write_samples, Sample};
use vmbuild_benches::host::fresh_dir;
use vmbuild_benches::peers;
use vmbuild_benches::report::{markdown, median, Row};

#[derive(Parser, Debug)]
#[command(about = "vmbuild build (revive a snapshot) vs vmbuild run (fresh boot)")]
struct Args {
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Target memory in MiB (the run guest gets the same)
    #[arg(long, default_value_t = 256)]
    memory: u32,
    #[arg(long, default_value = "/var/tmp/vmbuild-lifecycle-bench")]
    workdir: PathBuf,
    /// Write every run as `vmbuild bench` samples (JSON) here
    #[arg(long, value_name = "FILE")]
    samples: Option<PathBuf>,
}

const BUILD: &str = "vmbuild build (revive + controller)";
const RUN: &str = "vmbuild run (fresh boot)";

const SMALL_FILES: &str =
    "find /nix/store/tree -type f | xargs cat > /dev/null && mkdir -p /tmp/xchg/out && \
     for i in $(seq 200); do echo $i > /tmp/xchg/out/$i; done";

const PHASES: [&str; 11] = [
    "verify",
    "revive",
    "shares_attached",
    "controller_revive",
    "controller_up",
    "handshake",
    "mount",
    "command",
    "collect",
    "teardown",
    "total",
];

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = fs::remove_dir_all(&args.workdir);
    fs::create_dir_all(&args.workdir)?;
    let store = args.workdir.join("store");
    for i in 0..2000 {
        let dir = store.join(format!("tree/d{:02}", i % 40));
        fs::create_dir_all(&dir)?;
        fs::write(dir.join(format!("f{i:04}")), vec![b'a'; 100 + i % 3000])?;
    }
    let snapshot = args.workdir.join("snapshot");
    eprintln!(
        "[lifecycle-bench] bootstrapping a {} MiB linux target",
        args.memory
    );
    let t = Instant::now();
    let out = Command::new(peers::vmbuild_binary()?)
        .args(["bootstrap", "--quiet", "--accel", "tcg", "--memory"])
        .arg(args.memory.to_string())
        .arg("--out")
        .arg(&snapshot)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!("bootstrap failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let bootstrap = t.elapsed().as_secs_f64();

    let mut rows = Vec::new();
    let mut notes = String::new();
    let mut samples = Vec::new();
    for (name, script) in [("true", "true"), ("small files", SMALL_FILES)] {
        let workload = format!("`{name}`: wall time");
        let (mut builds, mut runs) = (Vec::new(), Vec::new());
        let mut phases: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for round in 0..args.rounds {
            eprintln!("[lifecycle-bench] {name}: round {}", round + 1);
            let (wall, timings) = build(&args.workdir, &snapshot, &store, script)?;
            builds.push(wall);
            for p in PHASES {
                if let Some(v) = timings.get(p).and_then(|v| v.as_f64()) {
                    phases.entry(p).or_default().push(v);
                }
            }
            runs.push(run(&args.workdir, &store, args.memory, script)?);
            for (contender, v) in [(BUILD, builds.last()), (RUN, runs.last())] {
                let v = v.copied().unwrap_or(f64::NAN);
                samples.push(Sample::new(&workload, contender, "s", false, round + 1, v));
            }
        }
        rows.push(Row {
            workload,
            unit: "s",
            higher_is_better: false,
            values: vec![median(builds), median(runs)],
        });
        let m = |p: &str| phases.get(p).cloned().map(median).unwrap_or(f64::NAN);
        notes.push_str(&format!("- `{name}`, build phases (medians, s): "));
        notes.push_str(
            &PHASES
                .iter()
                .map(|p| format!("{p} {:.3}", m(p)))
                .collect::<Vec<_>>()
                .join(", "),
        );
        notes.push_str(&format!(
            "; overhead beyond the command {:.3}\n",
            m("total") - m("command")
        ));
    }
    println!(
        "### vmbuild build (revive) vs vmbuild run (fresh boot), TCG, {} MiB, median of {} rounds\n",
        args.memory, args.rounds
    );
    println!("{}", markdown(&[BUILD, RUN], &rows));
    println!("{notes}- bootstrap (install, boot, handshake, suspend): {bootstrap:.1} s");
    if let Some(path) = &args.samples {
        write_samples(path, &samples)?;
    }
    let _ = fs::remove_dir_all(&args.workdir);
    Ok(())
}

fn build(
    work: &Path,
    snapshot: &Path,
    store: &Path,
    script: &str,
) -> anyhow::Result<(f64, serde_json::Value)> {
    let timings = work.join("build-timings.json");
    let xchg = fresh_dir(&work.join("xchg-build"))?;
    let start = Instant::now();
    let out = Command::new(peers::vmbuild_binary()?)
        .arg("build")
        .arg("--snapshot")
        .arg(snapshot)
        .arg("--store")
        .arg(store)
        .args(["--store-mount", "/nix/store", "--xchg"])
        .arg(&xchg)
        .arg("--timings")
        .arg(&timings)
        .args(["--", "sh", "-c", script])
        .stdin(Stdio::null())
        .output()
        .context("running vmbuild build")?;
    let wall = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "vmbuild build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let t = serde_json::from_str(&fs::read_to_string(&timings)?)?;
    Ok((wall, t))
}

fn run(work: &Path, store: &Path, memory: u32, script: &str) -> anyhow::Result<f64> {
    let xchg = fresh_dir(&work.join("xchg-run"))?;
    let start = Instant::now();
    let out = Command::new(peers::vmbuild_binary()?)
        .args(["run", "--accel", "tcg", "--memory"])
        .arg(memory.to_string())
        .arg("--store")
        .arg(store)
        .args(["--store-mount", "/nix/store", "--xchg"])
        .arg(&xchg)
        .args(["--", "sh", "-c", script])
        .stdin(Stdio::null())
        .output()
        .context("running vmbuild run")?;
    let wall = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "vmbuild run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(wall)
}
