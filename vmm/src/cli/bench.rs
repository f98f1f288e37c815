//! `vmbuild bench`: the benchmarks of BENCHMARKS.md for users, run side by side against
//! the installed peers, with every sample in JSON and plots.

use std::path::PathBuf;

use clap::Args;

use crate::bench::engine::{self, Outcome};
use crate::bench::suite::{self, Peer, Suite};
use crate::bench::{plot, Report, Skipped};
use crate::exit;
use crate::owned_dir::OwnedDir;
use crate::qemu::QemuBinary;

/// Exit code of a bench that ran, but without some peers or suites (named on stderr and
/// in the JSON): its ratios are not the whole table.
pub const INCOMPLETE: i32 = 3;

#[derive(Args, Debug)]
#[command(after_help = "\
Each suite runs its engine (fs-bench, switch-bench, snapshot-bench, vde-bench,
image-bench, run-bench, lifecycle-bench, ninep-bench, kvm-bench, nic-bench,
linux-kvm-bench, built with
`cargo build --release -p vmbuild-benches`) with the contenders alternating round by round,
and prints the ratio tables of BENCHMARKS.md.

Suites and their peers:
  fs        virtiofsd, 9p     (store and xchg in a QEMU guest; a vhost-user harness)
  switch    vde, bridge       (iperf3 between two network namespaces; needs root)
  snapshot  gzip              (suspend and revive, warm and cold, 256/512/1024 MiB)
  nic       vde               (a QEMU guest's NIC: vhost-user-net vs -netdev vde; root)
  build     virtiofsd, 9p,    (GNU Hello's configure + make in the Debian 12 toolchain
            mmdebstrap         image vs the tree shared by virtiofsd or 9p vs RAM; the
                               image build vs mmdebstrap; root, downloads packages once)
  run       virtiofsd         (`vmbuild run` vs QEMU + two virtiofsd by hand, the recipe it
                               replaces: `true` and a small-files workload)
  lifecycle                   (`vmbuild build`, a revive, vs `vmbuild run`, a fresh boot)
  9p-server diod              (the 9P2000.L server vs diod: loopback TCP, a Linux guest)
  kvm                         (the embedded VMM vs QEMU: creation, restore 256-1024 MiB, the
                               controller's restore; needs /dev/kvm)
  vmm-nic                     (the embedded VMM's NIC into the switch: in-process vs tap;
                               root)
  linux-kvm                   (the embedded VMM vs QEMU+KVM with Linux guests, in a nested
                               KVM host; root)
  dax       virtiofsd         (the store through a DAX window: the embedded VMM with and
                               without --dax vs QEMU+KVM with virtiofsd, on KVM inside a
                               nested KVM host (a TCG guest with SVM); root)

Exit status:
    0  every suite ran with every peer asked for
    1  a suite's engine failed (its last lines are shown)
    2  bad command line: an unknown suite or peer, a peer named in --peers that is not
       installed, or an engine that is not built; nothing was started
    3  it ran, but without a peer or suite that is not installed here (named on stderr
       and in the JSON)
  130  interrupted (Ctrl-C); the engine, its VMs, namespaces and files were removed

Environment: VMBUILD_QEMU (the QEMU binary), VMBUILD_GUEST_KIT (the guest kit directory),
PATH (the engines and peers), RUST_LOG (the engines' log filter).

Examples:
  vmbuild bench all --plot plots/ --json bench.json
  vmbuild bench snapshot --rounds 20 --sizes 256,1024 --plot plots/
  vmbuild bench fs --peers virtiofsd --rounds 5")]
pub struct BenchArgs {
    /// What to measure: fs, switch, snapshot, nic, build, dax, run, lifecycle, 9p-server,
    /// kvm, vmm-nic, linux-kvm or all
    #[arg(value_name = "SUITE")]
    suite: String,
    /// The peers to compare against (virtiofsd, 9p, vde, bridge, gzip, mmdebstrap, diod); all that are
    /// installed by default. A peer named here that is not installed is an error
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    peers: Option<Vec<String>>,
    /// Rounds per contender (each round runs every contender once, alternating)
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    rounds: u32,
    /// Guest memory sizes for the snapshot suite, MiB
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "MIB",
        default_value = "256,512,1024"
    )]
    sizes: Vec<u32>,
    /// The snapshot suite's methods: gzip, file, mapped-ram, multifd, zstd (all by
    /// default; ratios are against gzip, printed when it runs)
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    methods: Option<Vec<String>>,
    /// Write every sample, the machine and the versions to FILE as JSON
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Draw SVG plots into DIR: a box plot per workload, and revive latency against memory
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
    /// No progress line
    #[arg(long, short)]
    quiet: bool,
}

impl BenchArgs {
    pub fn run(self) -> anyhow::Result<i32> {
        let signals = super::signal_channel::signal_channel()?;
        let plan = match self.plan() {
            Ok(p) => p,
            Err(msg) => {
                eprintln!("vmbuild bench: {msg}");
                return Ok(exit::USAGE);
            }
        };
        let work = OwnedDir::create(std::path::Path::new("/var/tmp"), "vmbuild-bench")
            .or_else(|_| OwnedDir::create(&std::env::temp_dir(), "vmbuild-bench"))?;
        let mut report = Report::new(&plan.qemu);
        report.skipped = plan.skipped.clone();
        for s in &plan.skipped {
            eprintln!("vmbuild bench: without {}: {}", s.what, s.why);
        }
        let mut failed = false;
        for (suite, engine_path, peers) in &plan.suites {
            let samples = work.path().join(format!("{}-samples.json", suite.name()));
            let (engine_path, args) =
                self.engine_command(*suite, engine_path, peers, work.path(), &samples)?;
            let engine_path = &engine_path;
            if !self.quiet {
                eprintln!(
                    "vmbuild bench: {}: {} {}",
                    suite.name(),
                    engine_path.display(),
                    args.join(" ")
                );
            }
            let outcome = engine::run(*suite, engine_path, args, &samples, &signals, !self.quiet)?;
            let _ = std::fs::remove_dir_all(work.path().join(suite.name()));
            match outcome {
                Outcome::Interrupted => {
                    eprintln!(
                        "vmbuild bench: interrupted; the engine and what it made were removed"
                    );
                    return Ok(exit::INTERRUPTED);
                }
                Outcome::Failed(why) => {
                    eprintln!("vmbuild bench: {} failed: {why}", suite.name());
                    failed = true;
                }
                Outcome::Done(run) => {
                    let tables = if suite.nested() {
                        // Its stdout is the nested host's console: only the tables.
                        run.tables
                            .lines()
                            .filter(|l| {
                                l.starts_with('|')
                                    || l.starts_with("###")
                                    || l.starts_with("machine:")
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    } else {
                        run.tables.clone()
                    };
                    println!(
                        "## {} ({:.0} s)\n\n{}",
                        suite.name(),
                        run.seconds,
                        tables.trim_end()
                    );
                    println!();
                    if let Some(dir) = &self.plot {
                        let files = plot::draw(dir, *suite, &run.samples)?;
                        if !self.quiet {
                            eprintln!(
                                "vmbuild bench: {}: {} plots in {}",
                                suite.name(),
                                files.len(),
                                dir.display()
                            );
                        }
                    }
                    report.suites.push(run);
                }
            }
        }
        if let Some(path) = &self.json {
            std::fs::write(path, serde_json::to_string_pretty(&report)?)
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        }
        Ok(if failed {
            exit::FAILURE
        } else if !plan.skipped.is_empty() {
            INCOMPLETE
        } else {
            exit::SUCCESS
        })
    }

    /// The program and arguments that run `suite`'s engine: its rounds, samples file, work
    /// directory and peers, as that engine takes them; for suites whose guests need a KVM
    /// that runs Linux, inside the nested KVM host, which shares `work` at the same path
    /// (the samples come back through it).
    fn engine_command(
        &self,
        suite: Suite,
        engine: &std::path::Path,
        peers: &[String],
        work: &std::path::Path,
        samples: &std::path::Path,
    ) -> anyhow::Result<(PathBuf, Vec<String>)> {
        let mut args = vec![
            "--rounds".to_string(),
            self.rounds.to_string(),
            "--samples".into(),
            samples.display().to_string(),
        ];
        // An empty list still must be a value: "none" matches no peer.
        let peer_list = if peers.is_empty() {
            "none".into()
        } else {
            peers.join(",")
        };
        let workdir = work.join(suite.name()).display().to_string();
        match suite {
            Suite::Fs
            | Suite::Snapshot
            | Suite::Run
            | Suite::Lifecycle
            | Suite::Ninep
            | Suite::Kvm => {
                args.extend(["--workdir".into(), workdir.clone()]);
            }
            Suite::Build => args.extend(["--workdir".into(), suite::BUILD_WORKDIR.into()]),
            Suite::Dax => args.extend([
                "--kvm".into(),
                "--vm-only".into(),
                "--big-mib".into(),
                "64".into(),
                "--workdir".into(),
                workdir.clone(),
            ]),
            Suite::LinuxKvm => args.extend(["--workdir".into(), workdir.clone()]),
            Suite::Switch | Suite::Nic | Suite::VmmNic => {}
        }
        match suite {
            Suite::Fs | Suite::Switch | Suite::Nic | Suite::Build | Suite::Dax => {
                args.extend(["--peers".into(), peer_list]);
            }
            Suite::Snapshot => {
                let sizes: Vec<String> = self.sizes.iter().map(u32::to_string).collect();
                args.extend(["--sizes".into(), sizes.join(",")]);
                if let Some(methods) = &self.methods {
                    args.extend(["--methods".into(), methods.join(",")]);
                }
            }
            Suite::Run
            | Suite::Lifecycle
            | Suite::Ninep
            | Suite::Kvm
            | Suite::VmmNic
            | Suite::LinuxKvm => {}
        }
        if !suite.nested() {
            return Ok((engine.to_owned(), args));
        }
        let nested = suite::nested_host().map_err(|e| anyhow::anyhow!(e))?;
        let mut outer = vec![
            "--work".to_string(),
            work.display().to_string(),
            "--timeout".into(),
            "7200".into(),
            "--".into(),
            engine.display().to_string(),
        ];
        outer.extend(args);
        Ok((nested, outer))
    }

    /// The suites to run with their engines and peers; an error is a usage error.
    fn plan(&self) -> Result<Plan, String> {
        let suites: Vec<Suite> = match self.suite.as_str() {
            "all" => Suite::ALL.to_vec(),
            name => vec![Suite::ALL
                .into_iter()
                .find(|s| s.name() == name)
                .ok_or_else(|| {
                    format!(
                        "no suite '{name}': {} or all",
                        Suite::ALL.map(Suite::name).join(", ")
                    )
                })?],
        };
        let asked: Option<Vec<Peer>> = match &self.peers {
            None => None,
            Some(names) => Some(
                names
                    .iter()
                    .filter(|n| !n.is_empty())
                    .map(|n| {
                        Peer::parse(n).ok_or_else(|| {
                            format!(
                                "--peers: no peer '{n}' ({})",
                                Peer::ALL.map(Peer::name).join(", ")
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?,
            ),
        };
        const METHODS: [&str; 5] = ["gzip", "file", "mapped-ram", "multifd", "zstd"];
        if let Some(bad) = self
            .methods
            .iter()
            .flatten()
            .find(|m| !METHODS.contains(&m.as_str()))
        {
            return Err(format!(
                "--methods: no method '{bad}' ({})",
                METHODS.join(", ")
            ));
        }
        if let Some(small) = self.sizes.iter().find(|&&m| m < 256) {
            return Err(format!(
                "--sizes: {small} MiB is too small: the guest fills half its memory, and below 256 MiB that leaves its kernel too little"
            ));
        }
        if self
            .plot
            .as_ref()
            .is_some_and(|d| d.exists() && !d.is_dir())
        {
            return Err("--plot: not a directory".into());
        }
        let qemu = QemuBinary::locate().map_err(|e| format!("{e:#}"))?;
        let mut plan = Plan {
            qemu,
            suites: Vec::new(),
            skipped: Vec::new(),
        };
        for suite in suites {
            let engine = suite::find_engine(suite)?;
            // What the suite needs, then its baseline: without that it has nothing to
            // compare against.
            let missing = suite::suite_missing(suite)
                .or_else(|| suite.baseline().and_then(|b| b.missing(&plan.qemu.path)));
            if let Some(why) = missing {
                if self.suite != "all" {
                    return Err(why);
                }
                plan.skipped.push(Skipped {
                    what: format!("the {} suite", suite.name()),
                    why,
                });
                continue;
            }
            let mut peers = Vec::new();
            for &peer in suite.peers() {
                let named = asked.as_ref().map(|a| a.contains(&peer));
                // A suite's baseline (gzip for snapshots, virtiofsd for run) runs always:
                // every ratio is against it.
                if named == Some(false) && suite.baseline() != Some(peer) {
                    continue;
                }
                match peer.missing(&plan.qemu.path) {
                    None => peers.push(peer.name().to_owned()),
                    Some(why) if named == Some(true) => return Err(why),
                    Some(why) => plan.skipped.push(Skipped {
                        what: format!("{} in the {} suite", peer.name(), suite.name()),
                        why,
                    }),
                }
            }
            plan.suites.push((suite, engine, peers));
        }
        Ok(plan)
    }
}

struct Plan {
    qemu: QemuBinary,
    suites: Vec<(Suite, PathBuf, Vec<String>)>,
    skipped: Vec<Skipped>,
}
