//! `vmbuild run` vs the Nix recipe done by hand, side by side in one run: QEMU + two
//! virtiofsd processes (store read-only, xchg read-write) + the same kernel, initrd and
//! command. Two workloads: `true`, and reading 2,000 store files + writing 200 files to
//! xchg. Rounds interleave the two; medians reported.
//!
//! Reproduce: `cargo build --release -p vmbuild -p vmbuild-benches && target/release/run-bench`

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use vmbuild::bench::sample::{write_samples, Sample as BenchSample};
use vmbuild_benches::host::fresh_dir;
use vmbuild_benches::peers;
use vmbuild_benches::report::{markdown, median, Row};
use vmbuild_tests::guest::{GuestKit, GuestShare, GuestVm};

#[derive(Parser, Debug)]
#[command(about = "vmbuild run vs QEMU + two virtiofsd by hand")]
struct Args {
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    #[arg(long, default_value = "/var/tmp/vmbuild-run-bench")]
    workdir: PathBuf,
    /// Write every run as `vmbuild bench` samples (JSON) here
    #[arg(long, value_name = "FILE")]
    samples: Option<PathBuf>,
}

const OURS: &str = "vmbuild run (1 process + QEMU)";
const RECIPE: &str = "recipe (QEMU + 2 virtiofsd)";

const SMALL_FILES: &str =
    "find /nix/store/tree -type f | xargs cat > /dev/null && mkdir -p /tmp/xchg/out && \
                           for i in $(seq 200); do echo $i > /tmp/xchg/out/$i; done";

struct Sample {
    wall: f64,
    phases: Option<serde_json::Value>,
}

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
    let kit = GuestKit::locate()?;
    let workloads = [("true", "true"), ("small files", SMALL_FILES)];
    let mut rows = Vec::new();
    let mut phase_notes = String::new();
    let mut samples = Vec::new();
    for (name, script) in workloads {
        let (mut ours, mut recipe) = (Vec::new(), Vec::new());
        let workload = format!("`{name}`: wall time");
        for round in 0..args.rounds {
            eprintln!("[run-bench] {name}: round {}", round + 1);
            ours.push(vmbuild_run(&args.workdir, &store, script)?);
            recipe.push(nix_recipe(&args.workdir, &store, &kit, script)?);
            for (contender, s) in [(OURS, ours.last()), (RECIPE, recipe.last())] {
                let wall = s.map_or(f64::NAN, |s| s.wall);
                samples.push(BenchSample::new(
                    &workload,
                    contender,
                    "s",
                    false,
                    round + 1,
                    wall,
                ));
            }
        }
        if let Some(p) = ours.iter().rev().find_map(|s| s.phases.clone()) {
            phase_notes.push_str(&format!(
                "- `{name}`, vmbuild phases (last round, s): `{p}`\n"
            ));
        }
        rows.push(Row {
            workload,
            unit: "s",
            higher_is_better: false,
            values: vec![
                median(ours.iter().map(|s| s.wall).collect()),
                median(recipe.iter().map(|s| s.wall).collect()),
            ],
        });
    }
    println!(
        "### vmbuild run vs QEMU + 2 × virtiofsd by hand (TCG, 512 MiB, median of {} rounds)\n",
        args.rounds
    );
    println!("{}", markdown(&[OURS, RECIPE], &rows));
    println!("{phase_notes}");
    if let Some(path) = &args.samples {
        write_samples(path, &samples)?;
    }
    let _ = fs::remove_dir_all(&args.workdir);
    Ok(())
}

fn vmbuild_run(work: &Path, store: &Path, script: &str) -> anyhow::Result<Sample> {
    let timings = work.join("timings.json");
    let xchg = fresh_dir(&work.join("xchg-vmbuild"))?;
    let start = Instant::now();
    let out = Command::new(peers::vmbuild_binary()?)
        .args(["run", "--accel", "tcg", "--store"])
        .arg(store)
        .args(["--store-mount", "/nix/store", "--xchg"])
        .arg(&xchg)
        .arg("--timings")
        .arg(&timings)
        .args(["--", "sh", "-c", script])
        .stdin(Stdio::null())
        .output()
        .context("running vmbuild")?;
    let wall = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "vmbuild run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let phases = fs::read_to_string(&timings)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    Ok(Sample { wall, phases })
}

/// What the Nix tooling did, by hand: a virtiofsd per share, then QEMU with both.
fn nix_recipe(work: &Path, store: &Path, kit: &GuestKit, script: &str) -> anyhow::Result<Sample> {
    let xchg = fresh_dir(&work.join("xchg-recipe"))?;
    fs::write(xchg.join("run.sh"), script)?;
    let start = Instant::now();
    let store_sock = work.join("recipe-store.sock");
    let xchg_sock = work.join("recipe-xchg.sock");
    let _store_daemon = peers::virtiofsd_share(store, &store_sock, true)?;
    let _xchg_daemon = peers::virtiofsd_share(&xchg, &xchg_sock, false)?;
    let mut vm = GuestVm::new(kit.clone(), "/tmp/xchg/run.sh")
        .share(GuestShare::VirtioFs {
            socket: store_sock,
            tag: "store".into(),
            mount: "/nix/store".into(),
            options: String::new(),
        })
        .share(GuestShare::VirtioFs {
            socket: xchg_sock,
            tag: "xchg".into(),
            mount: "/tmp/xchg".into(),
            options: String::new(),
        });
    vm.exit_file = Some("/tmp/xchg/status".into());
    // The same firmware vmbuild boots (qboot), not QEMU's default SeaBIOS.
    vm.bios = vmbuild::qemu::QemuBinary::locate()?.firmware("qboot.rom");
    vm.timeout = Duration::from_secs(300);
    let outcome = vm.run()?;
    let wall = start.elapsed().as_secs_f64();
    if outcome.exit != Some(0) {
        bail!(
            "recipe guest failed:\n{}",
            vmbuild_tests::guest::tail(&outcome.console, 20)
        );
    }
    Ok(Sample { wall, phases: None })
}
