//! The embedded VMM against QEMU on a KVM that runs Linux, side by side in one run, the
//! same guest kit and the same vmbuild binary, alternating contenders round by round:
//! - boot to init: `vmbuild run --timings` from the start of the run to the kit's init
//!   announcing itself (`spawn` + `kernel_to_init`),
//! - `vmbuild run -- true`, wall clock from start to exit,
//! - `vmbuild build -- true` from one snapshot with the embedded controller
//!   (`--controller embedded`, restored) vs QEMU's revived controller (`--controller
//!   revive`), wall clock,
//! - restore until a command runs: the kit booted (256 MiB) to a script that waits for a
//!   line on its console (ttyS0), snapshotted there; then, per round, from the snapshot's
//!   files until the guest has printed what it read: the embedded VMM's restore (memory
//!   mapped copy-on-write) with the line fed to its UART, vs QEMU started with `-incoming`
//!   and revived from its `file:` state (mapped-ram + multifd, as bootstrap writes it) with
//!   the line written to its console socket. p50 and p99; first instruction is not
//!   useful work, a lazily mapped memory file pays its faults later, and this counts them.
//!
//! Where this host's KVM cannot run Linux (kvm_pvm), run it in the nested KVM host; the
//! absolute times there are TCG's underneath, the ratios compare the two VMMs:
//!
//! ```sh
//! cargo build --release -p vmbuild -p vmbuild-benches
//! scripts/nested-kvm-host.sh --work /var/tmp -- target/release/linux-kvm-bench
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use embedded_vmm::linux::{LinuxConfig, LinuxEnd, LinuxVm};
use embedded_vmm::uart::Transcript;
use vmbuild::accel::Accel;
use vmbuild::bench::sample::{write_samples, Sample};
use vmbuild::guest::initrd::{self, GUEST_SCRIPT_PATH};
use vmbuild::guest::kit::GuestKit;
use vmbuild::qemu::console_guest::{ConsoleGuest, ConsoleGuestConfig};
use vmbuild::qemu::StateFormat;
use vmbuild_benches::console::wait_for_line;
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
    /// Restores per contender for the restore-to-command row.
    #[arg(long, default_value_t = 20)]
    restores: usize,
    /// Write every measurement as `vmbuild bench` samples (JSON) here
    #[arg(long, value_name = "FILE")]
    samples: Option<PathBuf>,
}

const EMBEDDED: &[&str] = &["--vmm", "embedded"];
const QEMU_KVM: &[&str] = &["--vmm", "qemu", "--accel", "kvm"];

struct RunSample {
    /// Run start → the VMM ready to run the guest (`spawn`): the VMM's own start-up.
    spawn: f64,
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
        spawn: secs("spawn")?,
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

/// The guest's script: wait for a line on the console, say what was read, stay up.
const WAITING_SCRIPT: &str =
    "echo ready\nread x < /dev/ttyS0\necho \"ran $x\"\nwhile true; do sleep 1; done\n";
const RESTORE_MIB: u32 = 256;

/// The p-th percentile (0–100) of `xs`, nearest rank.
fn percentile(mut xs: Vec<f64>, p: f64) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * xs.len() as f64).ceil().max(1.0) as usize;
    xs[rank.min(xs.len()) - 1]
}

/// Milliseconds from the snapshot's files to the command's output, per restore.
fn embedded_restores(
    dir: &Path,
    kit: &GuestKit,
    initrd: &Path,
    append: &str,
    n: usize,
) -> anyhow::Result<Vec<f64>> {
    let console = Transcript::new(None);
    let config = LinuxConfig {
        kernel: &kit.kernel,
        initrd: Some(initrd),
        cmdline: append,
        memory_mib: RESTORE_MIB as usize,
        vcpus: 1,
    };
    let mut vm = LinuxVm::new(&config, console.clone(), Vec::new(), Vec::new())?;
    let booted = Instant::now();
    vm.run_until(|| {
        console.text().contains("ready") || booted.elapsed() > Duration::from_secs(300)
    });
    anyhow::ensure!(
        console.text().contains("ready"),
        "the guest never got ready:\n{}",
        console.text()
    );
    // Into its read.
    vm.run(Duration::from_millis(500));
    let snapshot = dir.join("embedded");
    std::fs::create_dir_all(&snapshot)?;
    vm.snapshot(&snapshot)?;
    drop(vm);
    let mut times = Vec::new();
    for _ in 0..n {
        let console = Transcript::new(None);
        let start = Instant::now();
        let mut vm = LinuxVm::restore(&snapshot, console.clone(), Vec::new(), Vec::new())?;
        vm.serial_input(0)
            .context("no console input")?
            .feed(b"go\n");
        let end = vm.run_until(|| {
            console.text().contains("ran go") || start.elapsed() > Duration::from_secs(60)
        });
        let took = start.elapsed();
        if !console.text().contains("ran go") {
            bail!(
                "a restored guest did not run its command ({end:?}):\n{}",
                console.text()
            );
        }
        anyhow::ensure!(
            end == LinuxEnd::TimedOut,
            "the restored guest ended: {end:?}"
        );
        times.push(took.as_secs_f64() * 1000.0);
    }
    Ok(times)
}

fn qemu_restores(
    dir: &Path,
    kit: &GuestKit,
    initrd: &Path,
    append: &str,
    n: usize,
) -> anyhow::Result<Vec<f64>> {
    let config = |incoming| ConsoleGuestConfig {
        kernel: &kit.kernel,
        initrd,
        append,
        memory_mib: RESTORE_MIB,
        incoming,
        accel: Accel::Kvm,
    };
    let mut g = ConsoleGuest::start(dir, "boot", &config(false))?;
    wait_for_line(&g.console, "ready", Duration::from_secs(300))?;
    std::thread::sleep(Duration::from_millis(500));
    let state = dir.join("qemu-state");
    let format = StateFormat::MappedRamMultifd(2);
    g.qmp
        .suspend_to_file(&state, format, Duration::from_secs(600))
        .context("suspending the QEMU guest")?;
    g.qemu.kill();
    let mut times = Vec::new();
    for r in 0..n {
        let start = Instant::now();
        let mut next = ConsoleGuest::start(dir, &format!("r{r}"), &config(true))?;
        next.qmp
            .revive_from_file(&state, format, Duration::from_secs(600))?;
        (&next.console).write_all(b"go\n")?;
        wait_for_line(&next.console, "ran go", Duration::from_secs(60))?;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
        next.qemu.kill();
    }
    Ok(times)
}

const BOOT_TO_INIT: &str = "boot to init (run start → the kit's init)";
const VMM_START: &str = "of which the VMM's start (run start → VMM ready to run the guest)";
const RUN_TRUE: &str = "`vmbuild run -- true`, wall clock";

/// One workload's measurements, the embedded VMM's and QEMU+KVM's, as samples.
fn push_all(out: &mut Vec<Sample>, workload: &str, unit: &str, embedded: &[f64], qemu: &[f64]) {
    for (contender, values) in [("embedded VMM", embedded), ("QEMU+KVM", qemu)] {
        for (round, v) in values.iter().enumerate() {
            out.push(Sample::new(workload, contender, unit, false, round + 1, *v));
        }
    }
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
    let (mut spawn_e, mut spawn_q) = (vec![], vec![]);
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
            let (spawn, init, total) = if vmm == EMBEDDED {
                (&mut spawn_e, &mut init_e, &mut total_e)
            } else {
                (&mut spawn_q, &mut init_q, &mut total_q)
            };
            spawn.push(s.spawn);
            init.push(s.to_init);
            total.push(s.total);
        }
        eprintln!(
            "[linux-kvm-bench] round {} of {} done",
            round + 1,
            args.rounds
        );
    }
    let mut samples = Vec::new();
    for (workload, e, q) in [
        (BOOT_TO_INIT, &init_e, &init_q),
        (VMM_START, &spawn_e, &spawn_q),
        (RUN_TRUE, &total_e, &total_q),
    ] {
        push_all(&mut samples, workload, "s", e, q);
    }
    let mut rows = vec![
        Row {
            workload: BOOT_TO_INIT.into(),
            unit: "s",
            higher_is_better: false,
            values: vec![median(init_e), median(init_q)],
        },
        Row {
            workload: VMM_START.into(),
            unit: "s",
            higher_is_better: false,
            values: vec![median(spawn_e), median(spawn_q)],
        },
        Row {
            workload: RUN_TRUE.into(),
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
        const BUILD_TRUE: &str = "`vmbuild build -- true` (embedded controller vs QEMU's revived)";
        push_all(&mut samples, BUILD_TRUE, "s", &e, &q);
        rows.push(Row {
            workload: BUILD_TRUE.into(),
            unit: "s",
            higher_is_better: false,
            values: vec![median(e), median(q)],
        });
        let _ = std::fs::remove_dir_all(&args.workdir);
    }
    if args.restores > 0 {
        let kit = GuestKit::locate()?;
        let dir = tempfile::tempdir()?;
        let files: [(&str, u32, &[u8]); 1] =
            [(GUEST_SCRIPT_PATH, 0o755, WAITING_SCRIPT.as_bytes())];
        let initrd = initrd::with_files(&kit.initrd, dir.path(), &files)?;
        let append = format!(
            "console=ttyS0 reboot=k panic=-1 quiet cryptomgr.notests vmbuild.quiet vmbuild.cmd={GUEST_SCRIPT_PATH}"
        );
        let e = embedded_restores(dir.path(), &kit, &initrd, &append, args.restores)?;
        let q = qemu_restores(dir.path(), &kit, &initrd, &append, args.restores)?;
        push_all(
            &mut samples,
            "restore of a booted Linux guest until a command ran",
            "ms",
            &e,
            &q,
        );
        for (p, name) in [(50.0, "p50"), (99.0, "p99")] {
            rows.push(Row {
                workload: format!(
                    "restore of a booted Linux guest until a command ran, {name} of {}",
                    args.restores
                ),
                unit: "ms",
                higher_is_better: false,
                values: vec![percentile(e.clone(), p), percentile(q.clone(), p)],
            });
        }
    }
    println!("{}", markdown(&["embedded VMM", "QEMU+KVM"], &rows));
    println!("median of {} rounds, alternating order", args.rounds);
    if let Some(path) = &args.samples {
        write_samples(path, &samples)?;
    }
    Ok(())
}
