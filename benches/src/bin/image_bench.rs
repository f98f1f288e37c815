//! Distribution images and a real build, side by side (issue 15).
//!
//! GNU Hello 2.10's `./configure && make` in a Debian 12 toolchain (gcc, make, libc6-dev),
//! four ways, the order rotating each round:
//!
//! 1. **vmbuild**: `vmbuild run --image debian-12-toolchain`: the toolchain is an ext4
//!    image on virtio-blk behind a discarded overlay;
//! 2. **virtiofsd**: what nixpkgs' vmTools does today: QEMU and two virtiofsd, the
//!    toolchain root read-only and xchg read-write; the guest chroots into the shared root;
//! 3. **9p**: what vmTools did before: QEMU's own 9p, `cache=loose`, the largest `msize`
//!    the guest's virtio transport takes (512000);
//! 4. **floor**: the toolchain copied into guest RAM first (untimed), then the build with
//!    no file server behind its root at all.
//!
//! The same guest for all: QEMU with TCG on a host whose KVM cannot run Linux, the guest
//! kit's kernel, q35, qboot, 1 GiB, 2 vCPUs, the same script. The source is copied from a
//! read-only share into the guest's tmpfs first (untimed) and built there; the guest times
//! configure and make itself with `date +%s.%N`, so boot is excluded; the wall clock of
//! each whole run is recorded too. A build that fails, or a `hello` that does not say
//! "Hello, world!", fails the benchmark. The toolchain tree for 2–4 is the image's own
//! file tree, loop-mounted read-only for the run's duration.
//!
//! Then `vmbuild image build` from an empty image cache (the packages already downloaded)
//! vs `mmdebstrap --variant=required` with the same packages (already downloaded too),
//! and vmbuild's cache hit.
//!
//! Needs root (the loop mount, mmdebstrap). Reproduce:
//! `cargo build --release -p vmbuild -p vmbuild-benches && target/release/image-bench --rounds 3`

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use vmbuild::bench::sample::{write_samples, Sample as BenchSample};
use vmbuild_benches::host::{self, fresh_dir, ForeignLoad, LoopMount};
use vmbuild_benches::peers::{self, Daemon};
use vmbuild_benches::report::{markdown, median, Row};
use vmbuild_tests::guest::{tail, GuestKit, GuestShare, GuestVm};

#[derive(Parser, Debug)]
#[command(
    about = "A real build in vmbuild's image vs virtiofsd, 9p and RAM; image build vs mmdebstrap"
)]
struct Args {
    /// Rounds of the four builds (medians are reported; 0: skip them)
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Rounds of image build vs mmdebstrap (0: skip them)
    #[arg(long, default_value_t = 1)]
    image_rounds: usize,
    /// The toolchain image's name in root's image cache (built if missing)
    #[arg(long, default_value = "debian-12-toolchain")]
    image: String,
    /// Work directory (a disk file system, not tmpfs); the source tarball is kept here
    #[arg(long, default_value = "/var/tmp/vmbuild-image-bench")]
    workdir: PathBuf,
    /// Seconds one guest run may take
    #[arg(long, default_value_t = 1800)]
    timeout: u64,
    /// Before each measurement, wait until the rest of the host uses less than this many
    /// cores (it is shared; what else ran is reported either way)
    #[arg(long, default_value_t = 0.3)]
    quiet_cores: f64,
    /// Wait at most this many seconds for that
    #[arg(long, default_value_t = 300)]
    max_wait: u64,
    /// Measure a run again (at most this many times) when the rest of the host used more
    /// than --quiet-cores during it; the repeats are reported
    #[arg(long, default_value_t = 2)]
    retries: usize,
    /// Also write the raw figures as JSON here
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write every build's figures as `vmbuild bench` samples (JSON) here
    #[arg(long, value_name = "FILE")]
    samples: Option<PathBuf>,
    /// The peers to run beside vmbuild: virtiofsd (and the floor, whose copy into RAM
    /// goes through it), 9p, mmdebstrap; "none" for none; all by default
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    peers: Option<Vec<String>>,
}

impl Args {
    fn peer(&self, name: &str) -> bool {
        self.peers
            .as_ref()
            .is_none_or(|p| p.iter().any(|n| n == name))
    }

    /// vmbuild always; the others as --peers asks.
    fn contenders(&self) -> Vec<Contender> {
        CONTENDERS
            .into_iter()
            .filter(|c| match c {
                Contender::Vmbuild => true,
                Contender::Virtiofsd | Contender::Floor => self.peer("virtiofsd"),
                Contender::NineP => self.peer("9p"),
            })
            .collect()
    }
}

const DISTRO: &str = "debian-12";
const SUITE: &str = "bookworm";
const PACKAGES: &str = "gcc,make,libc6-dev";
const MIRROR: &str = "http://deb.debian.org/debian";
const HELLO_URL: &str = "http://deb.debian.org/debian/pool/main/h/hello/hello_2.10.orig.tar.gz";
const HELLO_SHA256: &str = "31e066137a962676e89f69d1b65382de95a7ef7d914b8cb956f41ea72e0f516b";
const HELLO_TARBALL: &str = "hello_2.10.orig.tar.gz";
const HELLO_DIR: &str = "hello-2.10";
const MEMORY_MIB: u32 = 1024;
const CPUS: u32 = 2;
/// The largest 9p message the guest kernel's virtio transport takes: asked for more,
/// Linux 6.1 says "9pnet: Limiting 'msize' to 512000 as this is the maximum supported by
/// transport virtio" (PAGE_SIZE × (VIRTQUEUE_NUM − 3)).
const MSIZE: u32 = 512_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Contender {
    Vmbuild,
    Virtiofsd,
    NineP,
    Floor,
}

const CONTENDERS: [Contender; 4] = [
    Contender::Vmbuild,
    Contender::Virtiofsd,
    Contender::NineP,
    Contender::Floor,
];

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::Vmbuild => "vmbuild",
            Contender::Virtiofsd => "virtiofsd",
            Contender::NineP => "9p",
            Contender::Floor => "floor",
        }
    }

    fn column(self) -> &'static str {
        match self {
            Contender::Vmbuild => "vmbuild (image on virtio-blk)",
            Contender::Virtiofsd => "virtiofsd (root shared)",
            Contender::NineP => "9p cache=loose",
            Contender::Floor => "floor (root in RAM)",
        }
    }
}

/// The build, in the toolchain root (Debian's sh): /tmp is the guest's tmpfs, the source
/// is on the read-only share at /tmp/src, xchg at /tmp/xchg.
const BUILD_SH: &str = r#"X=/tmp/xchg
cat /proc/mounts > $X/mounts
nproc > $X/nproc
cp -a /tmp/src/hello-2.10 /tmp/build || exit 1
cd /tmp/build || exit 1
t0=$(date +%s.%N)
if ! ./configure > /tmp/build.log 2>&1; then tail -n 40 /tmp/build.log > $X/build-log-tail; exit 1; fi
t1=$(date +%s.%N)
if ! make >> /tmp/build.log 2>&1; then tail -n 40 /tmp/build.log > $X/build-log-tail; exit 1; fi
t2=$(date +%s.%N)
echo "$t0 $t1 $t2" > $X/times
./hello > $X/hello.out
"#;

/// The hand-made recipes' command (the kit's busybox, in its initramfs): the shares are
/// mounted at /toolchain (read-only), /src (read-only) and /xchg. Gives the toolchain root
/// /proc, /sys, /dev, /tmp and /run of its own in its existing mount points, brings the
/// source and xchg in, and runs the build chrooted there.
fn outer_sh(floor: bool) -> String {
    let copy = if floor {
        // Into guest RAM, untimed; then no file server is behind the build's root.
        "mkdir -p /floor\n\
         mount -t tmpfs -o size=80% tmpfs /floor\n\
         c0=$(cut -d' ' -f1 /proc/uptime)\n\
         cp -a /toolchain/. /floor/\n\
         c1=$(cut -d' ' -f1 /proc/uptime)\n\
         echo \"$c0 $c1\" > /xchg/copy-times\n\
         umount /toolchain\n\
         R=/floor\n"
    } else {
        "R=/toolchain\n"
    };
    format!(
        "set -e\n\
         {copy}\
         mount -t proc proc $R/proc\n\
         mount -t sysfs sysfs $R/sys\n\
         mount -t devtmpfs devtmpfs $R/dev\n\
         mount -t tmpfs -o mode=1777 tmpfs $R/tmp\n\
         mount -t tmpfs -o mode=755 tmpfs $R/run\n\
         mkdir $R/tmp/src $R/tmp/xchg\n\
         mount -o bind /src $R/tmp/src\n\
         mount -o bind /xchg $R/tmp/xchg\n\
         cat /proc/mounts > /xchg/outer-mounts\n\
         chroot $R /bin/sh /tmp/xchg/build.sh\n"
    )
}

/// One build: configure and make as the guest timed them, and the whole run's wall clock.
#[derive(Debug, Clone, Copy)]
struct Sample {
    configure: f64,
    make: f64,
    wall: f64,
    /// Cores' worth of CPU the rest of the host used meanwhile.
    foreign: f64,
    /// The floor's copy of the toolchain into guest RAM (untimed; NaN for the others).
    copy: f64,
}

struct Ctx {
    vmbuild: PathBuf,
    kit: GuestKit,
    qboot: Option<PathBuf>,
    image: String,
    src: PathBuf,
    root: PathBuf,
    work: PathBuf,
    logs: PathBuf,
    run: PathBuf,
    timeout: Duration,
    quiet_cores: f64,
    max_wait: Duration,
}

/// What a run found beyond its tables: the raw figures (`--json`) and notes.
#[derive(Default)]
struct Findings {
    raw: serde_json::Map<String, serde_json::Value>,
    notes: Vec<String>,
    /// Runs measured again because the host was busy meanwhile, and how busy.
    repeated: Vec<String>,
}

impl Findings {
    /// Whether a run during which the rest of the host used `foreign` cores is measured
    /// again (it is noted).
    fn again(&mut self, args: &Args, what: String, foreign: f64, attempt: usize) -> bool {
        if foreign <= args.quiet_cores || attempt >= args.retries {
            return false;
        }
        eprintln!("[image-bench]   other processes used {foreign:.2} cores meanwhile: once more");
        self.repeated.push(format!("{what} ({foreign:.2} cores)"));
        true
    }
}

/// Every build's figures and the /proc/mounts line of each contender's build root.
#[derive(Default)]
struct Builds {
    contenders: Vec<Contender>,
    samples: BTreeMap<&'static str, Vec<Sample>>,
    roots: BTreeMap<&'static str, String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("image-bench needs root: it loop-mounts the image and runs mmdebstrap");
    }
    fs::create_dir_all(&args.workdir)?;
    let work = fs::canonicalize(&args.workdir)?;
    let vmbuild = peers::vmbuild_binary()?;
    if args.peer("virtiofsd") {
        peers::virtiofsd_binary()?;
    }
    let image_rounds = if args.peer("mmdebstrap") {
        args.image_rounds
    } else {
        0
    };
    let mut bench_samples = Vec::new();
    let mut found = Findings::default();
    let image = toolchain_image(&vmbuild, &args.image, &mut found)?;

    let mut out = format!(
        "{}; guest: the kit's kernel ({}), QEMU TCG, q35, qboot, {MEMORY_MIB} MiB, {CPUS} vCPUs\n\n",
        host::machine(),
        kernel_release(&GuestKit::locate()?)
    );
    if args.rounds > 0 {
        let builds = measure_builds(&args, &work, &vmbuild, &image, &mut found)?;
        out.push_str(&builds_report(&builds, args.rounds, &mut found));
        bench_samples.extend(builds.bench_samples());
    }
    if image_rounds > 0 {
        if args.rounds > 0 {
            out.push('\n');
        }
        out.push_str(&images_vs_mmdebstrap(
            &args,
            image_rounds,
            &work,
            &vmbuild,
            &mut found,
            &mut bench_samples,
        )?);
    }
    if !found.repeated.is_empty() {
        found.notes.push(format!(
            "measured again because the rest of the host used more than {} cores meanwhile: {}",
            args.quiet_cores,
            found.repeated.join(", ")
        ));
    }
    out.push('\n');
    for n in &found.notes {
        out.push_str(&format!("- {n}\n"));
    }
    println!("{out}");
    if let Some(path) = &args.json {
        fs::write(path, serde_json::to_string_pretty(&found.raw)?)?;
    }
    if let Some(path) = &args.samples {
        write_samples(path, &bench_samples)?;
    }
    // Keep the tarball and the guests' consoles (logs/); the rest is scratch.
    for c in CONTENDERS {
        let _ = fs::remove_dir_all(work.join(format!("xchg-{}", c.name())));
    }
    for d in ["root", "run", "src", "apt-archives"] {
        let _ = fs::remove_dir_all(work.join(d));
    }
    Ok(())
}

/// The toolchain image in root's cache (built if missing, with the bench's own vmbuild),
/// and the cache hit a second identical call is; returns the image file.
fn toolchain_image(vmbuild: &Path, name: &str, found: &mut Findings) -> anyhow::Result<PathBuf> {
    eprintln!("[image-bench] the toolchain image `{name}` (built if root's image cache has none)");
    let first = image_build(vmbuild, name, None)?;
    let again = image_build(vmbuild, name, None)?;
    ensure!(
        again.cache_hit,
        "a second identical image build was no cache hit"
    );
    found.notes.push(format!(
        "`{name}` in root's image cache: {} in {:.2} s ({} packages); a second call: cache hit in {:.3} s",
        if first.cache_hit { "found (cache hit)" } else { "built" },
        first.seconds,
        first.packages,
        again.seconds
    ));
    found.raw.insert(
        "toolchain_image".into(),
        serde_json::json!({"first": first.json, "second": again.json}),
    );
    Ok(first.path)
}

/// `--rounds` rounds of the four builds, the order rotating each round, with the image's
/// tree loop-mounted for the hand-made recipes meanwhile.
fn measure_builds(
    args: &Args,
    work: &Path,
    vmbuild: &Path,
    image: &Path,
    found: &mut Findings,
) -> anyhow::Result<Builds> {
    let src = fresh_dir(&work.join("src"))?;
    unpack_hello(work, &src)?;
    let mount = LoopMount::read_only(image, &work.join("root"))?;
    let ctx = Ctx {
        vmbuild: vmbuild.to_owned(),
        kit: GuestKit::locate()?,
        qboot: vmbuild::qemu::QemuBinary::locate()?.firmware("qboot.rom"),
        image: args.image.clone(),
        src,
        root: mount.path().to_owned(),
        work: work.to_owned(),
        logs: fresh_dir(&work.join("logs"))?,
        run: fresh_dir(&work.join("run"))?,
        timeout: Duration::from_secs(args.timeout),
        quiet_cores: args.quiet_cores,
        max_wait: Duration::from_secs(args.max_wait),
    };
    warm_host_cache(image, &ctx.root)?;
    let mut builds = Builds {
        contenders: args.contenders(),
        ..Builds::default()
    };
    let contenders = builds.contenders.clone();
    for round in 0..args.rounds {
        for i in 0..contenders.len() {
            let c = contenders[(i + round) % contenders.len()];
            let mut attempt = 0;
            let (s, root) = loop {
                eprintln!("[image-bench] round {} {}", round + 1, c.name());
                let (s, root) = one_build(&ctx, c, round)?;
                eprintln!(
                    "[image-bench]   configure {:.1} s, make {:.1} s, wall {:.1} s; other processes used {:.2} cores",
                    s.configure, s.make, s.wall, s.foreign
                );
                let what = format!("{} round {}", c.name(), round + 1);
                if !found.again(args, what, s.foreign, attempt) {
                    break (s, root);
                }
                attempt += 1;
            };
            builds.samples.entry(c.name()).or_default().push(s);
            builds.roots.insert(c.name(), root);
        }
    }
    Ok(builds)
}

impl Builds {
    /// Every build as `vmbuild bench` samples: configure + make, each part, the wall clock.
    fn bench_samples(&self) -> Vec<BenchSample> {
        let mut out = Vec::new();
        for c in &self.contenders {
            for (round, s) in self.samples[c.name()].iter().enumerate() {
                for (workload, value) in [
                    ("GNU Hello, configure + make", s.configure + s.make),
                    ("GNU Hello, configure", s.configure),
                    ("GNU Hello, make", s.make),
                    ("GNU Hello, whole run (wall clock)", s.wall),
                ] {
                    // The rest of the host's load is in the engine's notes and --json; as
                    // a sample parameter it would split every plot by its value.
                    out.push(BenchSample::new(
                        workload,
                        c.name(),
                        "s",
                        false,
                        round + 1,
                        value,
                    ));
                }
            }
        }
        out
    }
}

/// The builds' table (medians, ratios against vmbuild) and what each root was.
fn builds_report(builds: &Builds, rounds: usize, found: &mut Findings) -> String {
    let column = |f: fn(&Sample) -> f64| -> Vec<f64> {
        builds
            .contenders
            .iter()
            .map(|c| median(builds.samples[c.name()].iter().map(f).collect()))
            .collect()
    };
    let row = |workload: &str, f: fn(&Sample) -> f64| Row {
        workload: workload.into(),
        unit: "s",
        higher_is_better: false,
        values: column(f),
    };
    let rows = [
        row("configure + make, timed in the guest", |s| {
            s.configure + s.make
        }),
        row("of which `./configure`", |s| s.configure),
        row("of which `make`", |s| s.make),
        row(
            "whole run, wall clock (file servers + QEMU + boot + copies + build)",
            |s| s.wall,
        ),
    ];
    let names: Vec<&str> = builds.contenders.iter().map(|c| c.column()).collect();
    let mut out = format!(
        "### GNU Hello 2.10, `./configure && make` in the Debian 12 toolchain (seconds, median of {rounds} rounds)\n\n"
    );
    out.push_str(&markdown(&names, &rows));
    out.push('\n');
    for c in &builds.contenders {
        let foreign: Vec<f64> = builds.samples[c.name()].iter().map(|s| s.foreign).collect();
        out.push_str(&format!(
            "- {}: the build's root: `{}`; other processes on the host used {:.2} cores (median; max {:.2})\n",
            c.name(),
            builds.roots[c.name()],
            median(foreign.clone()),
            foreign.iter().cloned().fold(0.0, f64::max)
        ));
    }
    if let Some(floor) = builds.samples.get("floor") {
        let copy: Vec<f64> = floor.iter().map(|s| s.copy).collect();
        out.push_str(&format!(
            "- floor: copying the toolchain tree into guest RAM over virtiofsd (untimed, in its wall clock) took {:.1} s (median)\n",
            median(copy)
        ));
    }
    for (c, v) in &builds.samples {
        let runs: Vec<_> = v
            .iter()
            .map(|s| {
                serde_json::json!({"configure": s.configure, "make": s.make, "wall": s.wall,
                                   "foreign_cores": s.foreign,
                                   "copy": if s.copy.is_nan() { None } else { Some(s.copy) }})
            })
            .collect();
        found
            .raw
            .insert(format!("build.{c}"), serde_json::json!(runs));
    }
    out
}

// ------------------------------------------------------------------ the builds ----------

/// One build by `c`; returns its figures and the line of /proc/mounts its root came from.
fn one_build(ctx: &Ctx, c: Contender, round: usize) -> anyhow::Result<(Sample, String)> {
    let xchg = fresh_dir(&ctx.work.join(format!("xchg-{}", c.name())))?;
    fs::write(xchg.join("build.sh"), BUILD_SH)?;
    let log = ctx
        .logs
        .join(format!("{}-round{}.log", c.name(), round + 1));
    host::wait_for_quiet(ctx.quiet_cores, ctx.max_wait);
    let load = ForeignLoad::start();
    let wall = match c {
        Contender::Vmbuild => vmbuild_run(ctx, &xchg, &log)?,
        _ => by_hand(ctx, c, &xchg, &log)?,
    };
    let foreign = load.cores();
    let fail = |what: &str| -> anyhow::Error {
        let tail_of_log = fs::read_to_string(xchg.join("build-log-tail")).unwrap_or_default();
        anyhow::anyhow!(
            "{}: {what} (console: {}){}",
            c.name(),
            log.display(),
            if tail_of_log.is_empty() {
                String::new()
            } else {
                format!("\nbuild log tail:\n{tail_of_log}")
            }
        )
    };
    let hello = fs::read_to_string(xchg.join("hello.out")).map_err(|_| fail("no hello output"))?;
    if hello.trim_end() != "Hello, world!" {
        return Err(fail(&format!("hello printed {hello:?}")));
    }
    let times: Vec<f64> = fs::read_to_string(xchg.join("times"))
        .map_err(|_| fail("no times"))?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| fail("unreadable times"))?;
    let [t0, t1, t2] = times[..] else {
        return Err(fail("unreadable times"));
    };
    let nproc = fs::read_to_string(xchg.join("nproc")).unwrap_or_default();
    if nproc.trim() != CPUS.to_string() {
        return Err(fail(&format!("the guest had {} CPUs", nproc.trim())));
    }
    let root_mount = check_root(c, &xchg).map_err(|e| fail(&e.to_string()))?;
    let copy = match c {
        Contender::Floor => {
            let t: Vec<f64> = fs::read_to_string(xchg.join("copy-times"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|t| t.parse().ok())
                .collect();
            match t[..] {
                [c0, c1] => c1 - c0,
                _ => return Err(fail("no copy times")),
            }
        }
        _ => f64::NAN,
    };
    Ok((
        Sample {
            configure: t1 - t0,
            make: t2 - t1,
            wall,
            foreign,
            copy,
        },
        root_mount,
    ))
}

/// Checks that the build's root was what `c` says it is; returns its /proc/mounts line.
fn check_root(c: Contender, xchg: &Path) -> anyhow::Result<String> {
    let read = |f: &str| fs::read_to_string(xchg.join(f)).unwrap_or_default();
    let line = |text: &str, mountpoint: &str| -> Option<String> {
        text.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(mountpoint))
            .map(str::to_owned)
    };
    let found = match c {
        Contender::Vmbuild => line(&read("mounts"), "/").filter(|l| l.contains(" ext4 ")),
        Contender::Virtiofsd => line(&read("outer-mounts"), "/toolchain")
            .filter(|l| l.contains(" virtiofs ") && l.contains("ro,")),
        Contender::NineP => line(&read("outer-mounts"), "/toolchain").filter(|l| {
            l.contains(" 9p ") && l.contains("loose") && l.contains(&format!("msize={MSIZE},"))
        }),
        Contender::Floor => {
            let outer = read("outer-mounts");
            line(&outer, "/floor")
                .filter(|l| l.contains(" tmpfs ") && line(&outer, "/toolchain").is_none())
        }
    };
    found.with_context(|| format!("the build's root is not what {} needs", c.name()))
}

/// `vmbuild run --image`, timed from start to exit.
fn vmbuild_run(ctx: &Ctx, xchg: &Path, log: &Path) -> anyhow::Result<f64> {
    let start = Instant::now();
    let out = Command::new(&ctx.vmbuild)
        .args([
            "run", "--accel", "tcg", "--vmm", "qemu", "--quiet", "--image",
        ])
        .arg(&ctx.image)
        .args(["--memory", &MEMORY_MIB.to_string()])
        .args(["--cpus", &CPUS.to_string()])
        .arg("--share")
        .arg(format!("{}:/tmp/src:ro", ctx.src.display()))
        .arg("--xchg")
        .arg(xchg)
        .args(["--timeout", &ctx.timeout.as_secs().to_string()])
        .arg("--log")
        .arg(log)
        .args(["--", "/bin/sh", "/tmp/xchg/build.sh"])
        .stdin(Stdio::null())
        .output()
        .context("running vmbuild")?;
    let wall = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "vmbuild run failed ({}): {}\nconsole tail:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            tail(&fs::read_to_string(log).unwrap_or_default(), 20)
        );
    }
    Ok(wall)
}

/// The recipes by hand: the file servers, then QEMU with the kit; timed from starting the
/// first file server to QEMU's exit.
fn by_hand(ctx: &Ctx, c: Contender, xchg: &Path, log: &Path) -> anyhow::Result<f64> {
    fs::write(xchg.join("outer.sh"), outer_sh(c == Contender::Floor))?;
    let dirs = [
        (ctx.root.as_path(), "toolchain", "/toolchain", true),
        (ctx.src.as_path(), "src", "/src", true),
        (xchg, "xchg", "/xchg", false),
    ];
    let start = Instant::now();
    let mut daemons: Vec<Daemon> = Vec::new();
    let mut vm = GuestVm::new(ctx.kit.clone(), "/xchg/outer.sh");
    for (dir, tag, mount, read_only) in dirs {
        let ro = if read_only { "ro" } else { "" };
        let share = match c {
            Contender::NineP => GuestShare::NineP {
                dir: dir.to_owned(),
                tag: tag.into(),
                mount: mount.into(),
                options: format!(
                    "cache=loose,msize={MSIZE}{}{ro}",
                    if read_only { "," } else { "" }
                ),
            },
            // The floor copies its root in over virtiofsd before the timed part.
            _ => {
                let socket = ctx.run.join(format!("{}-{tag}.sock", c.name()));
                daemons.push(peers::virtiofsd_share(dir, &socket, read_only)?);
                GuestShare::VirtioFs {
                    socket,
                    tag: tag.into(),
                    mount: mount.into(),
                    options: ro.into(),
                }
            }
        };
        vm = vm.share(share);
    }
    vm.memory_mib = MEMORY_MIB;
    vm.cpus = CPUS;
    // The firmware vmbuild boots (qboot), not QEMU's default SeaBIOS.
    vm.bios = ctx.qboot.clone();
    vm.timeout = ctx.timeout;
    let outcome = vm.run();
    let wall = start.elapsed().as_secs_f64();
    drop(daemons);
    let outcome = outcome?;
    fs::write(log, &outcome.console)?;
    if outcome.exit != Some(0) {
        bail!(
            "{}: the guest's build failed (exit {:?}):\n{}",
            c.name(),
            outcome.exit,
            tail(&outcome.console, 20)
        );
    }
    Ok(wall)
}

/// Downloads the source once (kept in the work directory) and unpacks it into `src`.
fn unpack_hello(work: &Path, src: &Path) -> anyhow::Result<()> {
    let tarball = work.join(HELLO_TARBALL);
    if !tarball.is_file() || sha256(&tarball)? != HELLO_SHA256 {
        eprintln!("[image-bench] downloading {HELLO_URL}");
        let partial = work.join(format!("{HELLO_TARBALL}.part"));
        let status = Command::new("curl")
            .args(["-fsSL", "--retry", "3", "-o"])
            .arg(&partial)
            .arg(HELLO_URL)
            .status()
            .context("running curl")?;
        ensure!(status.success(), "downloading {HELLO_URL} failed");
        let got = sha256(&partial)?;
        ensure!(
            got == HELLO_SHA256,
            "{HELLO_URL} has SHA-256 {got}, not {HELLO_SHA256}"
        );
        fs::rename(&partial, &tarball)?;
    }
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(src)
        .status()?;
    ensure!(
        status.success() && src.join(HELLO_DIR).join("configure").is_file(),
        "unpacking {} failed",
        tarball.display()
    );
    Ok(())
}

fn sha256(path: &Path) -> anyhow::Result<String> {
    Ok(vmbuild::image::download::sha256_file(path)?)
}

/// Reads the image file and the loop-mounted tree once, so every contender starts from a
/// warm host page cache (the guests' own caches are cold: each round boots fresh guests).
fn warm_host_cache(image: &Path, root: &Path) -> anyhow::Result<()> {
    eprintln!("[image-bench] warming the host page cache");
    let status = Command::new("sh")
        .arg("-c")
        .arg(r#"cat "$1" > /dev/null && find "$2" -xdev -type f -exec cat {} + > /dev/null"#)
        .arg("sh")
        .arg(image)
        .arg(root)
        .status()?;
    ensure!(status.success(), "reading the image and its tree failed");
    Ok(())
}

fn kernel_release(kit: &GuestKit) -> String {
    let json = kit.vmlinux.with_file_name("kit.json");
    fs::read_to_string(json)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["kernel_release"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "release unknown".into())
}

// ------------------------------------------------------------ image vs mmdebstrap ------

struct ImageBuilt {
    path: PathBuf,
    cache_hit: bool,
    /// As vmbuild reports it (its own start to its end).
    seconds: f64,
    /// Process start to exit.
    wall: f64,
    packages: u64,
    stderr: String,
    json: serde_json::Value,
}

/// `vmbuild image build` of the toolchain, in root's cache or in `$XDG_CACHE_HOME=xdg`.
fn image_build(vmbuild: &Path, name: &str, xdg: Option<&Path>) -> anyhow::Result<ImageBuilt> {
    let mut cmd = Command::new(vmbuild);
    cmd.args(["image", "build", "--distro", DISTRO, "--packages", PACKAGES])
        .args(["--name", name, "--accel", "tcg", "--json"])
        .stdin(Stdio::null());
    if let Some(xdg) = xdg {
        cmd.env("XDG_CACHE_HOME", xdg);
    }
    let start = Instant::now();
    let out = cmd.output().context("running vmbuild image build")?;
    let wall = start.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!("vmbuild image build failed ({}):\n{stderr}", out.status);
    }
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("reading image build's JSON")?;
    Ok(ImageBuilt {
        path: json["path"]
            .as_str()
            .map(PathBuf::from)
            .context("no path in image build's JSON")?,
        cache_hit: json["cache_hit"].as_bool() == Some(true),
        seconds: json["seconds"].as_f64().unwrap_or(f64::NAN),
        wall,
        packages: json["packages"].as_u64().unwrap_or(0),
        stderr,
        json,
    })
}

/// Figures of the image builds, per contender.
#[derive(Default)]
struct ImageRounds {
    /// vmbuild from an empty image cache, packages downloaded: wall clock.
    cold: Vec<f64>,
    /// vmbuild, the same build again: wall clock.
    hit: Vec<f64>,
    mmdebstrap: Vec<f64>,
    foreign: BTreeMap<&'static str, Vec<f64>>,
    packages: BTreeMap<&'static str, u64>,
}

fn images_vs_mmdebstrap(
    args: &Args,
    image_rounds: usize,
    work: &Path,
    vmbuild: &Path,
    found: &mut Findings,
    bench_samples: &mut Vec<BenchSample>,
) -> anyhow::Result<String> {
    let debs = vmbuild::cache_dir::cache_dir().join("debs");
    ensure!(
        debs.is_dir(),
        "no downloaded packages in {}",
        debs.display()
    );
    let apt_debs = work.join("apt-archives");
    apt_archive(&debs, &apt_debs)?;
    let mut r = ImageRounds::default();
    for round in 0..image_rounds {
        let mut order = ["vmbuild", "mmdebstrap"];
        if round % 2 == 1 {
            order.reverse();
        }
        for who in order {
            let mut attempt = 0;
            loop {
                eprintln!("[image-bench] image round {} {who}", round + 1);
                host::wait_for_quiet(args.quiet_cores, Duration::from_secs(args.max_wait));
                let load = ForeignLoad::start();
                let (secs, hit, packages) = if who == "vmbuild" {
                    let (secs, hit, packages) = vmbuild_cold(work, vmbuild, &debs, round, found)?;
                    (secs, Some(hit), packages)
                } else {
                    let (secs, packages) = mmdebstrap(work, &apt_debs, round, found)?;
                    (secs, None, packages)
                };
                let foreign = load.cores();
                let what = format!("{who}'s image build, round {}", round + 1);
                if found.again(args, what, foreign, attempt) {
                    attempt += 1;
                    continue;
                }
                const WORKLOAD: &str = "image from downloaded packages";
                match hit {
                    Some(hit) => {
                        r.cold.push(secs);
                        r.hit.push(hit);
                        bench_samples.push(BenchSample::new(
                            WORKLOAD,
                            "vmbuild",
                            "s",
                            false,
                            round + 1,
                            secs,
                        ));
                        bench_samples.push(BenchSample::new(
                            "the same image again (cache hit)",
                            "vmbuild",
                            "s",
                            false,
                            round + 1,
                            hit,
                        ));
                    }
                    None => {
                        r.mmdebstrap.push(secs);
                        bench_samples.push(BenchSample::new(
                            WORKLOAD,
                            "mmdebstrap",
                            "s",
                            false,
                            round + 1,
                            secs,
                        ));
                    }
                }
                r.packages.insert(who, packages);
                r.foreign.entry(who).or_default().push(foreign);
                break;
            }
        }
    }
    let raw = serde_json::json!({"vmbuild_cold": r.cold, "vmbuild_hit": r.hit,
                                 "mmdebstrap": r.mmdebstrap, "foreign_cores": r.foreign});
    found.raw.insert("image".into(), raw);
    found.notes.push(format!(
        "packages installed: vmbuild's image {}, mmdebstrap's tarball {}",
        r.packages.get("vmbuild").unwrap_or(&0),
        r.packages.get("mmdebstrap").unwrap_or(&0)
    ));
    for (who, f) in &r.foreign {
        found.notes.push(format!(
            "{who}'s image builds: other processes on the host used {:.2} cores (median)",
            median(f.clone())
        ));
    }
    let rows = [
        Row {
            workload: "image from downloaded packages (archive lists fetched)".into(),
            unit: "s",
            higher_is_better: false,
            values: vec![median(r.cold), median(r.mmdebstrap)],
        },
        Row {
            workload: "the same build again (vmbuild: cache hit)".into(),
            unit: "s",
            higher_is_better: false,
            values: vec![median(r.hit), f64::NAN],
        },
    ];
    let mut out = format!(
        "### `{DISTRO}` + {PACKAGES}: vmbuild image build vs mmdebstrap (seconds, wall clock, median of {image_rounds} rounds)\n\n"
    );
    out.push_str(&markdown(
        &[
            "vmbuild image build (builder VM, TCG)",
            "mmdebstrap --variant=required (native)",
        ],
        &rows,
    ));
    Ok(out)
}

/// vmbuild's image build in a fresh `XDG_CACHE_HOME` whose package cache holds the
/// downloaded packages, then the same build again (a cache hit).
/// Returns (the build's wall clock, the cache hit's, packages).
fn vmbuild_cold(
    work: &Path,
    vmbuild: &Path,
    debs: &Path,
    round: usize,
    found: &mut Findings,
) -> anyhow::Result<(f64, f64, u64)> {
    let xdg = fresh_dir(&work.join("xdg-cache"))?;
    prefill(debs, &xdg.join("vmbuild/debs"))?;
    let built = image_build(vmbuild, "bench-toolchain", Some(&xdg))?;
    ensure!(!built.cache_hit, "an empty image cache gave a cache hit");
    if !built.stderr.contains("packages are in the cache") {
        found.notes.push(format!(
            "vmbuild image build round {}: not every package was in the pre-filled cache (some were downloaded)",
            round + 1
        ));
    }
    let again = image_build(vmbuild, "bench-toolchain", Some(&xdg))?;
    ensure!(again.cache_hit, "a second identical build was no cache hit");
    eprintln!(
        "[image-bench]   built in {:.1} s (wall {:.1} s), cache hit {:.3} s (wall {:.3} s)",
        built.seconds, built.wall, again.seconds, again.wall
    );
    found.raw.insert(
        format!("image.vmbuild.round{}", round + 1),
        serde_json::json!({"build": built.json, "hit": again.json}),
    );
    let _ = fs::remove_dir_all(&xdg);
    Ok((built.wall, again.wall, built.packages))
}

/// Hard links (or copies) of the downloaded packages in `dest`.
fn prefill(debs: &Path, dest: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dest)?;
    for entry in fs::read_dir(debs)? {
        let entry = entry?;
        let to = dest.join(entry.file_name());
        if fs::hard_link(entry.path(), &to).is_err() {
            fs::copy(entry.path(), &to)?;
        }
    }
    Ok(())
}

/// The downloaded packages under the names apt gives them (`NAME_VERSION_ARCH.deb`, an
/// epoch's colon as `%3a`), so that apt finds them in its archive cache; vmbuild's cache
/// leaves the epoch out of the name.
fn apt_archive(debs: &Path, dest: &Path) -> anyhow::Result<()> {
    fresh_dir(dest)?;
    for entry in fs::read_dir(debs)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "deb") {
            continue;
        }
        let out = Command::new("dpkg-deb")
            .arg("--field")
            .arg(&path)
            .args(["Package", "Version", "Architecture"])
            .output()
            .context("running dpkg-deb")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .map(str::trim)
                .with_context(|| format!("{}: no {name}", path.display()))
        };
        let name = format!(
            "{}_{}_{}.deb",
            field("Package")?,
            field("Version")?.replace(':', "%3a"),
            field("Architecture")?
        );
        if fs::hard_link(&path, dest.join(&name)).is_err() {
            fs::copy(&path, dest.join(&name))?;
        }
    }
    Ok(())
}

/// mmdebstrap of the same package set into a tarball, the packages synced in from `debs`
/// (the man page's recipe for a local package cache); returns (seconds, packages) and
/// notes what apt still had to download.
fn mmdebstrap(
    work: &Path,
    debs: &Path,
    round: usize,
    found: &mut Findings,
) -> anyhow::Result<(f64, u64)> {
    let out = work.join("mmdebstrap.tar");
    let _ = fs::remove_file(&out);
    let start = Instant::now();
    let result = Command::new("mmdebstrap")
        .args([
            // For apt's "Need to get" lines.
            "--verbose",
            "--mode=root",
            "--variant=required",
            &format!("--include={PACKAGES}"),
            "--skip=essential/unlink",
            "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/",
        ])
        .arg(format!(
            "--setup-hook=sync-in {} /var/cache/apt/archives/",
            debs.display()
        ))
        .arg(SUITE)
        .arg(&out)
        .arg(MIRROR)
        .stdin(Stdio::null())
        .output()
        .context("running mmdebstrap (apt-get install mmdebstrap)")?;
    let secs = start.elapsed().as_secs_f64();
    if !result.status.success() {
        bail!(
            "mmdebstrap failed ({}):\n{}",
            result.status,
            tail(&String::from_utf8_lossy(&result.stderr), 30)
        );
    }
    let status = Command::new("tar")
        .arg("-xOf")
        .arg(&out)
        .arg("./var/lib/dpkg/status")
        .output()?;
    let packages = String::from_utf8_lossy(&status.stdout)
        .lines()
        .filter(|l| l.starts_with("Package: "))
        .count() as u64;
    let _ = fs::remove_file(&out);
    let downloads: Vec<String> = String::from_utf8_lossy(&result.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&result.stdout).lines())
        .filter(|l| l.starts_with("Need to get ") && !l.starts_with("Need to get 0 B/"))
        .map(str::to_owned)
        .collect();
    eprintln!("[image-bench]   mmdebstrap {secs:.1} s");
    if !downloads.is_empty() {
        found.notes.push(format!(
            "mmdebstrap round {}: apt still downloaded: {}",
            round + 1,
            downloads.join("; ")
        ));
    }
    Ok((secs, packages))
}
