//! File sharing, side by side in one run: vmbuild's virtiofs-bridge vs virtiofsd 1.14 vs
//! QEMU's own 9p (cache=loose, as the Nix VM tooling mounted it).
//!
//! 1. Harness level, no VM: requests/s through the same vhost-user front-end for
//!    LOOKUP+GETATTR and for 4 KiB READs, vmbuild vs virtiofsd.
//! 2. In a guest (the guest kit under QEMU/TCG): cold find+stat over the store tree, reading
//!    every small file, one 256 MiB sequential read, writing 500 small files and 64 MiB to
//!    xchg. Each round boots a fresh guest per contender (cold guest caches, warm host page
//!    cache), contenders interleaved; medians reported.
//!
//! Reproduce: `cargo build --release -p vmbuild -p vmbuild-benches && target/release/fs-bench`

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use fuse_backend_rs::abi::fuse_abi::{GetattrIn, Opcode};
use vm_memory::ByteValued;
use vmbuild::bench::sample::{write_samples, Sample};
use vmbuild_benches::host;
use vmbuild_benches::peers::{self, Daemon};
use vmbuild_benches::report::{markdown, median, Row};
use vmbuild_tests::fuse_client::{FuseClient, ROOT};
use vmbuild_tests::guest::{GuestKit, GuestShare, GuestVm};
use vmbuild_tests::vhost_frontend::{FsFrontend, SLOTS};

#[derive(Parser, Debug)]
#[command(about = "vmbuild virtiofs-bridge vs virtiofsd vs QEMU 9p, side by side")]
struct Args {
    /// Rounds per contender (medians are reported)
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds each harness measurement runs
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Skip the in-guest workloads
    #[arg(long)]
    harness_only: bool,
    /// Skip the harness-level measurements
    #[arg(long)]
    vm_only: bool,
    /// The guests on KVM, for the DAX window (run it in the nested KVM host where this
    /// host's KVM cannot run Linux): vmbuild's embedded VMM with `--dax` and without,
    /// against QEMU+KVM with virtiofsd
    #[arg(long)]
    kvm: bool,
    /// Serve xchg with the guest's writeback cache on both virtio-fs servers (`--writeback`
    /// to vmbuild fs serve and to virtiofsd), as `vmbuild run` serves its xchg
    #[arg(long)]
    writeback: bool,
    /// Small files in the store tree
    #[arg(long, default_value_t = 2400)]
    files: usize,
    /// Size of the sequential-read file, MiB
    #[arg(long, default_value_t = 256)]
    big_mib: usize,
    /// Work directory (a disk file system, not tmpfs)
    #[arg(long, default_value = "/var/tmp/vmbuild-fs-bench")]
    workdir: PathBuf,
    /// Also write the raw figures as JSON here
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write every sample to FILE as JSON (`vmbuild bench` reads it)
    #[arg(long, value_name = "FILE")]
    samples: Option<PathBuf>,
    /// The peers to run beside vmbuild: virtiofsd, 9p (the harness needs virtiofsd)
    #[arg(long, value_delimiter = ',', default_value = "virtiofsd,9p")]
    peers: Vec<String>,
}

impl Args {
    fn peer(&self, name: &str) -> bool {
        self.peers.iter().any(|p| p == name)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = fs::remove_dir_all(&args.workdir);
    fs::create_dir_all(&args.workdir)?;
    let store = args.workdir.join("store");
    prepare_store(&store, args.files, args.big_mib)?;
    let mut raw = serde_json::Map::new();
    let mut out = String::new();
    out.push_str(&format!("{}\n\n", host::machine()));

    let mut samples = Vec::new();
    if !args.vm_only && args.peer("virtiofsd") {
        let rows = harness(&args, &store, &mut raw, &mut samples)?;
        out.push_str("### Harness (no VM), requests/s, one front-end, 64 requests in flight\n\n");
        out.push_str(&markdown(&["vmbuild", "virtiofsd"], &rows));
        out.push('\n');
    }
    if !args.harness_only {
        let (names, rows) = in_guest(&args, &store, &mut raw, &mut samples)?;
        if args.kvm {
            out.push_str("### In a guest on KVM (1 vCPU, 1 GiB), seconds, median of rounds\n\n");
            out.push_str(&markdown(
                &[
                    "vmbuild embedded --dax",
                    "vmbuild embedded",
                    "QEMU+KVM virtiofsd",
                ],
                &rows,
            ));
        } else {
            out.push_str("### In a guest (QEMU TCG, 1 vCPU, 1 GiB), seconds, median of rounds\n\n");
            out.push_str(&markdown(&names, &rows));
        }
    }
    println!("{out}");
    if let Some(path) = &args.json {
        fs::write(path, serde_json::to_string_pretty(&raw)?)?;
    }
    if let Some(path) = &args.samples {
        write_samples(path, &samples)?;
    }
    let _ = fs::remove_dir_all(&args.workdir);
    Ok(())
}

/// The store: `tree/` of small files in nested directories, `flat/` for the harness,
/// `big` for sequential reads, and the guest's static benchmark program.
fn prepare_store(store: &Path, files: usize, big_mib: usize) -> anyhow::Result<()> {
    eprintln!(
        "[fs-bench] preparing {} ({files} small files, {big_mib} MiB file)",
        store.display()
    );
    for i in 0..files {
        let dir = store.join(format!("tree/d{:02}/s{}", i % 40, (i / 40) % 5));
        fs::create_dir_all(&dir)?;
        let size = 100 + (i * 997) % 8000;
        fs::write(dir.join(format!("f{i:05}")), vec![(i % 251) as u8; size])?;
    }
    fs::create_dir_all(store.join("flat"))?;
    for i in 0..2000 {
        fs::write(store.join(format!("flat/f{i:04}")), [b'x'; 64])?;
    }
    let chunk: Vec<u8> = (0..(1 << 20))
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 7) as u8)
        .collect();
    let mut big = fs::File::create(store.join("big"))?;
    for _ in 0..big_mib {
        std::io::Write::write_all(&mut big, &chunk)?;
    }
    fs::create_dir_all(store.join("bin"))?;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/fsbench.c");
    let status = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(store.join("bin/fsbench"))
        .arg(&src)
        .status()
        .context("running gcc to build the guest benchmark program")?;
    if !status.success() {
        bail!("gcc -static failed for {}", src.display());
    }
    // Warm the host page cache: every contender then reads from memory.
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "find {} -type f -exec cat {{}} + > /dev/null",
            store.display()
        ))
        .status()?;
    Ok(())
}

// ---------------------------------------------------------------- harness ----------

fn harness(
    args: &Args,
    store: &Path,
    raw: &mut serde_json::Map<String, serde_json::Value>,
    samples: &mut Vec<Sample>,
) -> anyhow::Result<Vec<Row>> {
    let mut results: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
    for round in 0..args.rounds {
        for contender in ["vmbuild", "virtiofsd"] {
            eprintln!("[fs-bench] harness round {} {contender}", round + 1);
            let sock = args.workdir.join(format!("harness-{contender}.sock"));
            let _daemon = start_share(contender, store, &sock, true, false)?;
            let mut client = FuseClient::new(FsFrontend::connect(&sock)?);
            // As a Linux guest's driver: each server then serves READs as it serves a
            // guest's (with or without OPEN).
            client
                .init_like_linux()
                .map_err(|e| anyhow::anyhow!("INIT: {e}"))?;
            let (lookup, read) = harness_round(&mut client, args.seconds)?;
            results
                .entry((contender, "lookup"))
                .or_default()
                .push(lookup);
            results.entry((contender, "read")).or_default().push(read);
        }
    }
    let row = |name: &str, key: &str| Row {
        workload: name.into(),
        unit: "req/s",
        higher_is_better: true,
        values: ["vmbuild", "virtiofsd"]
            .iter()
            .map(|c| median(results[&(*c, key)].clone()))
            .collect(),
    };
    let rows = vec![row("LOOKUP+GETATTR", "lookup"), row("READ 4 KiB", "read")];
    for ((c, k), v) in &results {
        raw.insert(format!("harness.{c}.{k}"), serde_json::json!(v));
        let workload = if *k == "lookup" {
            "harness LOOKUP+GETATTR"
        } else {
            "harness READ 4 KiB"
        };
        for (round, value) in v.iter().enumerate() {
            samples.push(Sample::new(workload, *c, "req/s", true, round + 1, *value));
        }
    }
    Ok(rows)
}

/// Returns (LOOKUP+GETATTR req/s, 4 KiB READ req/s).
fn harness_round(c: &mut FuseClient, seconds: f64) -> anyhow::Result<(f64, f64)> {
    let flat = c
        .lookup(ROOT, "flat")
        .map_err(|e| anyhow::anyhow!("lookup flat: {e}"))?;
    let names: Vec<String> = (0..2000).map(|i| format!("f{i:04}\0")).collect();
    let nodes: Vec<u64> = names
        .iter()
        .map(|n| {
            c.lookup(flat.nodeid, n.trim_end_matches('\0'))
                .map(|e| e.nodeid)
        })
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("lookup: {e}"))?;
    let getattr = GetattrIn::default().as_slice().to_vec();
    let half = SLOTS as usize / 2;

    let mut done = 0usize;
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed().as_secs_f64() < seconds {
        let mut batch = Vec::with_capacity(SLOTS as usize);
        for _ in 0..half {
            let k = i % names.len();
            batch.push((Opcode::Lookup, flat.nodeid, names[k].clone().into_bytes()));
            batch.push((Opcode::Getattr, nodes[k], getattr.clone()));
            i += 1;
        }
        let replies = c.batch(&batch);
        if let Some(Err(e)) = replies.iter().find(|r| r.is_err()) {
            bail!("LOOKUP/GETATTR failed: {e}");
        }
        done += replies.len();
    }
    let lookup_rate = done as f64 / start.elapsed().as_secs_f64();

    let big = c
        .lookup(ROOT, "big")
        .map_err(|e| anyhow::anyhow!("lookup big: {e}"))?;
    // A server that takes no OPEN (ENOSYS) gets READs with handle 0, as from a guest.
    let fh = match c.open(big.nodeid, libc::O_RDONLY) {
        Ok(open) => open.fh,
        Err(e) if e.0 == libc::ENOSYS => 0,
        Err(e) => bail!("open big: {e}"),
    };
    let mut done = 0usize;
    let start = Instant::now();
    let mut off = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        let batch: Vec<_> = (0..SLOTS)
            .map(|_| {
                off = (off + 4096 * 7919) % (64 << 20);
                let r = vmbuild_tests::fuse_client::read_in(fh, off, 4096);
                (Opcode::Read, big.nodeid, r.as_slice().to_vec())
            })
            .collect();
        let replies = c.batch(&batch);
        for r in &replies {
            match r {
                Ok(data) if data.len() == 4096 => {}
                Ok(data) => bail!("short read: {} bytes", data.len()),
                Err(e) => bail!("READ failed: {e}"),
            }
        }
        done += replies.len();
    }
    Ok((lookup_rate, done as f64 / start.elapsed().as_secs_f64()))
}

fn start_share(
    contender: &str,
    dir: &Path,
    socket: &Path,
    readonly: bool,
    writeback: bool,
) -> anyhow::Result<Daemon> {
    match contender {
        "vmbuild" => peers::vmbuild_share_with(dir, socket, readonly, writeback),
        "virtiofsd" => peers::virtiofsd_share_with(dir, socket, readonly, writeback),
        other => bail!("unknown contender {other}"),
    }
}

// ---------------------------------------------------------------- in guest ---------

/// The guest's `results.txt` (one `workload seconds` line each) and the run's wall time.
fn collect_results(
    results: &mut BTreeMap<(String, String), Vec<f64>>,
    contender: &str,
    xchg: &Path,
    wall: f64,
) -> anyhow::Result<()> {
    let text = fs::read_to_string(xchg.join("results.txt"))?;
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        if let (Some(name), Some(secs)) = (parts.next(), parts.next()) {
            results
                .entry((contender.to_owned(), name.to_owned()))
                .or_default()
                .push(secs.parse()?);
        }
    }
    results
        .entry((contender.to_owned(), "boot_to_exit".into()))
        .or_default()
        .push(wall);
    Ok(())
}

/// The same guest workload under `vmbuild run` in the embedded VMM (on KVM), the store
/// read-only at /nix/store, with or without its DAX window; the wall time of the run.
fn embedded_run(store: &Path, xchg: &Path, dax: bool) -> anyhow::Result<f64> {
    let started = std::time::Instant::now();
    let mut cmd = Command::new(peers::vmbuild_binary()?);
    cmd.args([
        "run", "--quiet", "--vmm", "embedded", "--memory", "1024", "--store",
    ])
    .arg(store)
    .args(["--store-mount", "/nix/store", "--xchg"])
    .arg(xchg);
    if dax {
        cmd.arg("--dax");
    }
    let out = cmd
        .args(["--", "sh", "/tmp/xchg/run.sh"])
        .stdin(std::process::Stdio::null())
        .output()
        .context("running vmbuild run")?;
    if !out.status.success() {
        bail!(
            "vmbuild run{} failed ({}): {}",
            if dax { " --dax" } else { "" },
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(started.elapsed().as_secs_f64())
}

const WORKLOADS: [(&str, &str); 6] = [
    ("metadata", "cold find + stat, store tree"),
    ("small_read", "read every small file"),
    ("seq_read", "sequential read, big file"),
    ("small_write", "write 500 × 4 KiB to xchg"),
    ("append", "append 20,000 × 64 B to one file in xchg"),
    ("seq_write", "write 64 MiB to xchg + fsync"),
];

fn in_guest(
    args: &Args,
    store: &Path,
    raw: &mut serde_json::Map<String, serde_json::Value>,
    samples: &mut Vec<Sample>,
) -> anyhow::Result<(Vec<&'static str>, Vec<Row>)> {
    let kit = GuestKit::locate()?;
    let all: &[&str] = if args.kvm {
        &["embedded-dax", "embedded", "virtiofsd"]
    } else {
        &["vmbuild", "virtiofsd", "9p"]
    };
    let contenders: Vec<&str> = all
        .iter()
        .copied()
        .filter(|c| !matches!(*c, "virtiofsd" | "9p") || args.peer(c))
        .collect();
    let names: Vec<&'static str> = contenders
        .iter()
        .map(|c| match *c {
            "embedded-dax" => "vmbuild embedded --dax",
            "embedded" => "vmbuild embedded",
            "virtiofsd" if args.kvm => "QEMU+KVM virtiofsd",
            "9p" => "9p cache=loose",
            "virtiofsd" => "virtiofsd",
            _ => "vmbuild",
        })
        .collect();
    let mut results: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    for round in 0..args.rounds {
        for &contender in &contenders {
            eprintln!("[fs-bench] guest round {} {contender}", round + 1);
            let xchg = args.workdir.join(format!("xchg-{contender}"));
            let _ = fs::remove_dir_all(&xchg);
            fs::create_dir_all(&xchg)?;
            fs::write(
                xchg.join("run.sh"),
                "/nix/store/bin/fsbench /nix/store/tree /nix/store/big /tmp/xchg > /tmp/xchg/results.txt\n",
            )?;
            if let Some(dax) = match contender {
                "embedded-dax" => Some(true),
                "embedded" => Some(false),
                _ => None,
            } {
                let wall = embedded_run(store, &xchg, dax)?;
                collect_results(&mut results, contender, &xchg, wall)?;
                continue;
            }
            let mut daemons = Vec::new();
            let (store_share, xchg_share) = match contender {
                "9p" => {
                    // The store is mounted read-only for every contender, as Nix does.
                    (
                        GuestShare::NineP {
                            dir: store.to_owned(),
                            tag: "store".into(),
                            mount: "/nix/store".into(),
                            options: "cache=loose,ro".into(),
                        },
                        GuestShare::NineP {
                            dir: xchg.clone(),
                            tag: "xchg".into(),
                            mount: "/tmp/xchg".into(),
                            options: "cache=loose".into(),
                        },
                    )
                }
                _ => {
                    let s = args.workdir.join(format!("{contender}-store.sock"));
                    let x = args.workdir.join(format!("{contender}-xchg.sock"));
                    daemons.push(start_share(contender, store, &s, true, false)?);
                    daemons.push(start_share(contender, &xchg, &x, false, args.writeback)?);
                    (
                        GuestShare::VirtioFs {
                            socket: s,
                            tag: "store".into(),
                            mount: "/nix/store".into(),
                            options: "ro".into(),
                        },
                        GuestShare::VirtioFs {
                            socket: x,
                            tag: "xchg".into(),
                            mount: "/tmp/xchg".into(),
                            options: String::new(),
                        },
                    )
                }
            };
            let mut vm = GuestVm::new(kit.clone(), "/tmp/xchg/run.sh")
                .share(store_share)
                .share(xchg_share);
            vm.memory_mib = 1024;
            vm.timeout = Duration::from_secs(900);
            if args.kvm {
                vm.accel = "kvm";
            }
            let outcome = vm.run()?;
            if outcome.exit != Some(0) {
                bail!(
                    "{contender}: guest benchmark failed:\n{}",
                    vmbuild_tests::guest::tail(&outcome.console, 20)
                );
            }
            collect_results(&mut results, contender, &xchg, outcome.wall.as_secs_f64())?;
            drop(daemons);
        }
    }
    for ((c, k), v) in &results {
        raw.insert(format!("guest.{c}.{k}"), serde_json::json!(v));
        let workload = WORKLOADS
            .iter()
            .find(|(key, _)| key == k)
            .map_or("whole guest run, start to exit", |(_, label)| label);
        let name = contenders
            .iter()
            .position(|x| x == c)
            .map_or(c.as_str(), |i| names[i]);
        for (round, value) in v.iter().enumerate() {
            samples.push(Sample::new(workload, name, "s", false, round + 1, *value));
        }
    }
    let mut rows: Vec<Row> = WORKLOADS
        .iter()
        .map(|(key, label)| Row {
            workload: label.to_string(),
            unit: "s",
            higher_is_better: false,
            values: contenders
                .iter()
                .map(|c| {
                    median(
                        results
                            .get(&(c.to_string(), key.to_string()))
                            .cloned()
                            .unwrap_or_default(),
                    )
                })
                .collect(),
        })
        .collect();
    rows.push(Row {
        workload: "whole guest run, start to exit".into(),
        unit: "s",
        higher_is_better: false,
        values: contenders
            .iter()
            .map(|c| median(results[&(c.to_string(), "boot_to_exit".to_string())].clone()))
            .collect(),
    });
    Ok((names, rows))
}
