//! The embedded VMM against QEMU on a KVM that runs Linux, side by side in one run, the
//! same guest kit and the same vmbuild binary, alternating contenders round by round:
//! - boot to init: `vmbuild run --timings` from the start of the run to the kit's init
//!   announcing itself (`spawn` + `kernel_to_init`),
//! - `vmbuild run -- true`, wall clock from start to exit,
//! - `vmbuild build -- true` from one snapshot with the embedded controller
//!   (`--controller embedded`, restored) vs QEMU's revived controller (`--controller
//!   revive`), wall clock.
//!
//! Where this host's KVM cannot run Linux (kvm_pvm), run it in the nested KVM host; the
//! absolute times there are TCG's underneath, the ratios compare the two VMMs:
//!
//! ```sh
//! cargo build --release -p vmm -p vmbuild-benches
//! scripts/nested-kvm-host.sh --work /var/tmp -- target/release/linux-kvm-bench
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use vmbuild_benches::peers::vmbuild_binary;
use vmbuild_benches::report::{markdown, median, Row};

#[derive(Parser, Debug)]
#[command(about = "embedded VMM vs QEMU+KVM: boot, run and build with Linux guests")]
struct Args {
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Where the lifecycle's snapshot is made (removed afterwards).
    #[arg(long, default_value = "/tmp/vmbuild-linux-kvm-bench")]
    workdir: PathBuf,
    /// Skip the build row (it needs a bootstrap first).
    #[arg(long)]
    no_build: bool,
}

const EMBEDDED: &[&str] = &["--vmm", "embedded"];
const QEMU_KVM: &[&str] = &["--vmm", "qemu", "--accel", "kvm"];

struct RunSample {
    to_init: f64,
    total: f64,
}

fn run(vmbuild: &Path, vmm: &[&str], timings: &Path) -> anyhow::Result<RunSample> {
    let start = Instant::now();
    let out = Command::new(vmbuild)
        .arg("run")
        .args(vmm)
        .arg("--timings")
        .arg(timings)
        .args(["--", "true"])
        .stdin(Stdio::null())
        .output()?;
    let total = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "vmbuild run {vmm:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let t: serde_json::Value = serde_json::from_slice(&std::fs::read(timings)?)?;
    let secs = |k: &str| t[k].as_f64().with_context(|| format!("no {k} in {t}"));
    Ok(RunSample {
        to_init: secs("spawn")? + secs("kernel_to_init")?,
        total,
    })
}

fn build(vmbuild: &Path, snapshot: &Path, controller: &str) -> anyhow::Result<f64> {
    let start = Instant::now();
    let out = Command::new(vmbuild)
        .args(["build", "--controller", controller, "--snapshot"])
        .arg(snapshot)
        .args(["--", "true"])
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "vmbuild build --controller {controller} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(start.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let vmbuild = vmbuild_binary()?;
    let doctor = Command::new(&vmbuild).args(["doctor", "--json"]).output()?;
    let doctor: serde_json::Value = serde_json::from_slice(&doctor.stdout)?;
    let ok = |check: &str| {
        doctor["findings"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|f| f["check"] == check && f["status"] == "ok")
    };
    if !(ok("kvm_runs_linux") && ok("embedded_runs_linux")) {
        bail!("this host's KVM does not run Linux: run this inside scripts/nested-kvm-host.sh");
    }
    let timings = tempfile::NamedTempFile::new()?;
    let (mut init_e, mut init_q, mut total_e, mut total_q) = (vec![], vec![], vec![], vec![]);
    // One warm-up of each (page cache, probe caches), not counted.
    run(&vmbuild, EMBEDDED, timings.path())?;
    run(&vmbuild, QEMU_KVM, timings.path())?;
    for round in 0..args.rounds {
        // Alternate which goes first, so that neither always runs on a warmer host.
        let order: [&[&str]; 2] = if round % 2 == 0 {
            [EMBEDDED, QEMU_KVM]
        } else {
            [QEMU_KVM, EMBEDDED]
        };
        for vmm in order {
            let s = run(&vmbuild, vmm, timings.path())?;
            let (init, total) = if vmm == EMBEDDED {
                (&mut init_e, &mut total_e)
            } else {
                (&mut init_q, &mut total_q)
            };
            init.push(s.to_init);
            total.push(s.total);
        }
        eprintln!("round {} of {} done", round + 1, args.rounds);
    }
    let mut rows = vec![
        Row {
            workload: "boot to init (run start → the kit's init)".into(),
            unit: "s",
            higher_is_better: false,
            values: vec![median(init_e), median(init_q)],
        },
        Row {
            workload: "`vmbuild run -- true`, wall clock".into(),
            unit: "s",
            higher_is_better: false,
            values: vec![median(total_e), median(total_q)],
        },
    ];
    if !args.no_build {
        let _ = std::fs::remove_dir_all(&args.workdir);
        std::fs::create_dir_all(&args.workdir)?;
        let snapshot = args.workdir.join("linux");
        let status = Command::new(&vmbuild)
            .args(["bootstrap", "--profile", "linux", "--quiet", "--out"])
            .arg(&snapshot)
            .stdin(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("vmbuild bootstrap failed ({status})");
        }
        let (mut e, mut q) = (vec![], vec![]);
        build(&vmbuild, &snapshot, "embedded")?;
        build(&vmbuild, &snapshot, "revive")?;
        for round in 0..args.rounds {
            if round % 2 == 0 {
                e.push(build(&vmbuild, &snapshot, "embedded")?);
                q.push(build(&vmbuild, &snapshot, "revive")?);
            } else {
                q.push(build(&vmbuild, &snapshot, "revive")?);
                e.push(build(&vmbuild, &snapshot, "embedded")?);
            }
        }
        rows.push(Row {
            workload: "`vmbuild build -- true` (embedded controller vs QEMU's revived)".into(),
            unit: "s",
            higher_is_better: false,
            values: vec![median(e), median(q)],
        });
        let _ = std::fs::remove_dir_all(&args.workdir);
    }
    println!("{}", markdown(&["embedded VMM", "QEMU+KVM"], &rows));
    println!("median of {} rounds, alternating order", args.rounds);
    Ok(())
}
