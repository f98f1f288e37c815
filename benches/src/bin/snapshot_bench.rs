//! Snapshot latency, side by side in one run, for 256, 512 and 1024 MiB guests that have
//! touched most of their memory: suspend time and state size, and revive time (→ running,
//! → the guest's next output) for the Nix tooling's method (`exec:gzip -c > state.gz`,
//! `-incoming 'exec: gzip -c -d …'`), plain `file:`, and `file:` with `mapped-ram`.
//! The methods run one after another on the same guest: each revive suspends again.
//! Every method is revived twice per round: with the state file in the page cache (warm,
//! as right after a bootstrap or on a farm that revives often) and after evicting it
//! (cold: `fdatasync` + `posix_fadvise(DONTNEED)` on the file, as after a reboot).
//!
//! Reproduce: `cargo build --release -p vmbuild-benches && target/release/snapshot-bench`

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use vmbuild::bench::plot::percentile;
use vmbuild::bench::sample::{write_samples, Sample};
use vmbuild::guest::initrd::{self, GUEST_SCRIPT_PATH};
use vmbuild::guest::kit::GuestKit;
use vmbuild::qemu::console_guest::{ConsoleGuest, ConsoleGuestConfig};
use vmbuild::qemu::migration::StateFormat;
use vmbuild::qemu::recorded_channels::channel_files;
use vmbuild::qemu::{QemuProcess, Qmp};

#[derive(Parser, Debug)]
#[command(about = "QEMU suspend/revive: gzip exec vs file: vs mapped-ram")]
struct Args {
    /// Guest sizes in MiB
    #[arg(long, value_delimiter = ',', default_value = "256,512,1024")]
    sizes: Vec<u32>,
    #[arg(long, default_value = "/var/tmp/vmbuild-snapshot-bench")]
    workdir: PathBuf,
    /// Suspend/revive cycles per method (medians are reported)
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// What the guest fills half its memory with: `text` (`yes` output, which every
    /// codec shrinks to almost nothing) or `random` (base64 of /dev/urandom: a codec
    /// saves a quarter at best)
    #[arg(long, value_enum, default_value = "text")]
    fill: Fill,
    /// Only these methods (gzip, file, mapped-ram, multifd, zstd); all by default. Ratios
    /// are printed when gzip is among them
    #[arg(long, value_delimiter = ',')]
    methods: Vec<String>,
    /// Write every sample (each suspend and revive) to FILE as JSON
    #[arg(long, value_name = "FILE")]
    samples: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Fill {
    Text,
    Random,
}

#[derive(Clone, Copy)]
enum Method {
    Gzip,
    File,
    MappedRam,
    MappedRamMultifd,
    ZstdChannels,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Gzip => "exec: gzip (Nix tooling)",
            Method::File => "file:",
            Method::MappedRam => "file: + mapped-ram",
            Method::MappedRamMultifd => "file: + mapped-ram + multifd ×2",
            Method::ZstdChannels => "multifd ×2 + zstd, recorded channels (vmbuild)",
        }
    }
    fn key(self) -> &'static str {
        match self {
            Method::Gzip => "gzip",
            Method::File => "file",
            Method::MappedRam => "mapped-ram",
            Method::MappedRamMultifd => "multifd",
            Method::ZstdChannels => "zstd",
        }
    }
    fn format(self) -> StateFormat {
        match self {
            Method::MappedRam => StateFormat::MappedRam,
            Method::MappedRamMultifd => StateFormat::MappedRamMultifd(2),
            Method::ZstdChannels => StateFormat::ZstdChannels(2),
            _ => StateFormat::Stream,
        }
    }
    fn path(self, dir: &Path) -> PathBuf {
        match self {
            Method::Gzip => dir.join("state.gz"),
            Method::File => dir.join("state"),
            Method::MappedRam => dir.join("state.mapped"),
            Method::MappedRamMultifd => dir.join("state.multifd"),
            Method::ZstdChannels => dir.join("state.zst"),
        }
    }
    /// Every file the state occupies.
    fn files(self, dir: &Path) -> Vec<PathBuf> {
        match self.format() {
            StateFormat::ZstdChannels(n) => channel_files(&self.path(dir), n),
            _ => vec![self.path(dir)],
        }
    }
    fn out_uri(self, dir: &Path) -> String {
        match self {
            Method::Gzip => format!("exec:gzip -c > {}", self.path(dir).display()),
            _ => format!("file:{}", self.path(dir).display()),
        }
    }
    fn in_uri(self, dir: &Path) -> String {
        match self {
            Method::Gzip => format!("exec:gzip -c -d {}", self.path(dir).display()),
            _ => format!("file:{}", self.path(dir).display()),
        }
    }
}

struct Guest {
    qemu: QemuProcess,
    qmp: Qmp,
    ticks: mpsc::Receiver<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = std::fs::remove_dir_all(&args.workdir);
    std::fs::create_dir_all(&args.workdir)?;
    let kit = GuestKit::locate()?;
    println!("| guest | method | suspend (s) | state on disk (MiB) | warm: revive → running (s) | warm: → next output (s) | cold: revive → running (s) | cold: → next output (s) |");
    println!("|---|---|---|---|---|---|---|---|");
    let methods: Vec<Method> = [
        Method::Gzip,
        Method::File,
        Method::MappedRam,
        Method::MappedRamMultifd,
        Method::ZstdChannels,
    ]
    .into_iter()
    .filter(|m| args.methods.is_empty() || args.methods.iter().any(|k| k == m.key()))
    .collect();
    anyhow::ensure!(!methods.is_empty(), "--methods names no known method");
    anyhow::ensure!(
        args.sizes.iter().all(|&m| m >= 256),
        "--sizes: at least 256 MiB (the guest fills half its memory)"
    );
    // Ratios are against gzip, printed when it ran.
    let against_gzip = matches!(methods[0], Method::Gzip);
    let mut all_samples = Vec::new();
    let mut ratios = Vec::new();
    let mut tails = Vec::new();
    for &mib in &args.sizes {
        // Fill half of memory with non-zero data (zero pages would migrate for free),
        // then count: each revive must carry on counting.
        // Two tmpfs mounts, each capped at half the memory by default.
        let fill = mib / 2;
        let half = fill / 2;
        let source = match args.fill {
            Fill::Text => "yes vmbuild-snapshot-bench",
            Fill::Random => "base64 /dev/urandom",
        };
        let script = format!(
            "{source} | head -c $(({half} * 1048576)) > /dev/shm/fill\n\
             {source} | head -c $(({half} * 1048576)) > /tmp/fill\n\
             i=0\nwhile true; do i=$((i+1)); echo tick=$i; sleep 0.05; done\n"
        );
        let dir = args.workdir.join(format!("{mib}"));
        std::fs::create_dir_all(&dir)?;
        let files: [(&str, u32, &[u8]); 1] = [(GUEST_SCRIPT_PATH, 0o755, script.as_bytes())];
        let initrd = initrd::with_files(&kit.initrd, &dir, &files)?;
        eprintln!("[snapshot-bench] {mib} MiB: booting and filling {fill} MiB");
        let mut guest = start(&dir, "boot", &kit, &initrd, mib, false)?;
        guest
            .ticks
            .recv_timeout(Duration::from_secs(600))
            .context("the guest never started counting")?;
        let mut samples: Vec<[Vec<f64>; 6]> = methods.iter().map(|_| Default::default()).collect();
        let mut cycle: usize = 0;
        for _ in 0..args.rounds {
            for (m, &method) in methods.iter().enumerate() {
                for cold in [false, true] {
                    let t = Instant::now();
                    if let StateFormat::ZstdChannels(_) = method.format() {
                        guest.qmp.save_state(
                            &method.path(&dir),
                            method.format(),
                            Duration::from_secs(600),
                            &mut |_, _| {},
                        )?;
                    } else {
                        guest.qmp.suspend_to_uri(
                            &method.out_uri(&dir),
                            method.format(),
                            Duration::from_secs(600),
                        )?;
                    }
                    let suspend = t.elapsed().as_secs_f64();
                    // Blocks on disk: a mapped-ram file is sparse (zero pages are not written).
                    let mut size = 0.0;
                    for f in method.files(&dir) {
                        let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(f)?);
                        size += blocks as f64 * 512.0 / (1 << 20) as f64;
                    }
                    guest.qemu.kill();
                    if cold {
                        for f in method.files(&dir) {
                            evict_from_page_cache(&f)?;
                        }
                    }
                    cycle += 1;
                    let mut next = start(&dir, &format!("r{cycle}"), &kit, &initrd, mib, true)?;
                    let t = Instant::now();
                    if let StateFormat::ZstdChannels(_) = method.format() {
                        next.qmp.revive_from_file(
                            &method.path(&dir),
                            method.format(),
                            Duration::from_secs(600),
                        )?;
                    } else {
                        next.qmp.revive_from_uri(
                            &method.in_uri(&dir),
                            method.format(),
                            Duration::from_secs(600),
                        )?;
                    }
                    let running = t.elapsed().as_secs_f64();
                    next.ticks
                        .recv_timeout(Duration::from_secs(60))
                        .context("no output after the revive")?;
                    let output = t.elapsed().as_secs_f64();
                    let cache = if cold { "cold" } else { "warm" };
                    let round = cycle.div_ceil(2 * methods.len());
                    for (workload, unit, value) in [
                        ("revive → running", "s", running),
                        ("revive → next output", "s", output),
                        ("suspend", "s", suspend),
                        ("state on disk", "MiB", size),
                    ] {
                        all_samples.push(
                            Sample::new(workload, method.name(), unit, false, round, value)
                                .with("memory_mib", mib)
                                .with("cache", cache)
                                .with("fill", format!("{:?}", args.fill).to_lowercase()),
                        );
                    }
                    if cold {
                        samples[m][4].push(running);
                        samples[m][5].push(output);
                    } else {
                        for (i, v) in [suspend, size, running, output].into_iter().enumerate() {
                            samples[m][i].push(v);
                        }
                    }
                    guest = next;
                }
            }
        }
        for (m, method) in methods.iter().enumerate() {
            let med = |i: usize| vmbuild_benches::report::median(samples[m][i].clone());
            println!(
                "| {mib} MiB | {} | {:.3} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} |",
                method.name(),
                med(0),
                med(1),
                med(2),
                med(3),
                med(4),
                med(5)
            );
        }
        let med = |m: usize, i: usize| vmbuild_benches::report::median(samples[m][i].clone());
        if against_gzip {
            let mut row = format!("| {mib} MiB |");
            for m in 1..methods.len() {
                row += &format!(
                    " {:.1}× | {:.1}× |",
                    med(0, 2) / med(m, 2),
                    med(0, 4) / med(m, 4)
                );
            }
            ratios.push(row);
        }
        for (m, method) in methods.iter().enumerate() {
            for (i, what) in [(2, "warm"), (4, "cold")] {
                let pct = |p: f64, i: usize| percentile(&samples[m][i], p);
                tails.push(format!(
                    "| {mib} MiB | {} | {what} | {} | {:.3} | {:.3} | {:.3} | {:.3} |",
                    method.name(),
                    samples[m][i].len(),
                    pct(50.0, i),
                    pct(99.0, i),
                    pct(50.0, i + 1),
                    pct(99.0, i + 1)
                ));
            }
        }
        guest.qemu.kill();
    }
    if against_gzip && methods.len() > 1 {
        println!();
        println!("Revive → running, how many times faster than the gzip method:");
        println!();
        let mut head = "| guest |".to_string();
        let mut rule = "|---|".to_string();
        for m in &methods[1..] {
            head += &format!(" {} warm | {} cold |", m.name(), m.name());
            rule += "---|---|";
        }
        println!("{head}\n{rule}");
        for r in ratios {
            println!("{r}");
        }
    }
    println!();
    println!(
        "Percentiles over every revive (nearest rank: below 100 revives, p99 is the slowest):"
    );
    println!();
    println!("| guest | method | cache | revives | → running p50 (s) | → running p99 (s) | → next output p50 (s) | → next output p99 (s) |");
    println!("|---|---|---|---|---|---|---|---|");
    for t in tails {
        println!("{t}");
    }
    if let Some(path) = &args.samples {
        write_samples(path, &all_samples)?;
    }
    let _ = std::fs::remove_dir_all(&args.workdir);
    Ok(())
}

/// Writes back and drops `path`'s pages from the page cache, so that the next reader
/// waits for the disk.
fn evict_from_page_cache(path: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    f.sync_data()?;
    // SAFETY: fadvise on a file descriptor we own, whole file.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    anyhow::ensure!(r == 0, "posix_fadvise: error {r}");
    Ok(())
}

fn start(
    dir: &Path,
    name: &str,
    kit: &GuestKit,
    initrd: &Path,
    mib: u32,
    incoming: bool,
) -> anyhow::Result<Guest> {
    let append = format!("console=ttyS0 panic=-1 quiet cryptomgr.notests vmbuild.quiet vmbuild.cmd={GUEST_SCRIPT_PATH}");
    let g = ConsoleGuest::start(
        dir,
        name,
        &ConsoleGuestConfig {
            kernel: &kit.kernel,
            initrd,
            append: &append,
            memory_mib: mib,
            incoming,
            accel: vmbuild::accel::Accel::Tcg,
        },
    )?;
    Ok(Guest {
        qemu: g.qemu,
        qmp: g.qmp,
        ticks: ticks(g.console),
    })
}

fn ticks(stream: UnixStream) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if line.contains("tick=") && tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}
