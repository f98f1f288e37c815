//! Load and soak of the lifecycle (issue 16), with recorded results:
//!
//! - **load**: N concurrent `vmbuild build` from one snapshot; each must succeed with its
//!   own stdout, exit code and xchg (no cross-talk), and the snapshot must be unchanged;
//! - **soak**: M sequential builds (`true`, then a small-file write to xchg, alternating);
//!   every K builds a checkpoint records the builds' p50/p99, the most open fds, threads
//!   and RSS a vmbuild process reached (sampled from /proc while it ran), and what is
//!   left afterwards (runtime directory entries, QEMU processes, host open files);
//! - **servers**: `vmbuild fs serve` and `vmbuild switch` under continuous traffic for T
//!   seconds, front-ends connecting and disconnecting all the time (FUSE sessions over
//!   vhost-user; VDE ports exchanging frames); their RSS, fds and threads sampled.
//!
//! With `--check` it fails (exit 1) when something drifted or leaked (see [`Verdict`]).
//!
//! Reproduce (as root, a quiet machine): `cargo build --release -p vmbuild -p vmbuild-benches
//! && target/release/soak` (defaults: --load 16 --builds 1000 --servers-seconds 600).
//! CI runs a short version (benches/tests/soak_short.rs).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use serde::Serialize;
use vmbuild_benches::peers::{self, Daemon};
use vmbuild_benches::report::median;

#[derive(Parser, Debug)]
#[command(about = "load and soak of vmbuild's lifecycle and long-lived servers")]
struct Args {
    /// Concurrent builds from one snapshot
    #[arg(long, default_value_t = 16)]
    load: usize,
    /// `vmbuild build --jobs` for the concurrent builds (default: vmbuild's, one per CPU;
    /// 0 lets them all run at once)
    #[arg(long)]
    jobs: Option<usize>,
    /// Sequential builds
    #[arg(long, default_value_t = 1000)]
    builds: usize,
    /// Builds per checkpoint
    #[arg(long, default_value_t = 100)]
    every: usize,
    /// Seconds of traffic through fs serve and the switch
    #[arg(long, default_value_t = 600)]
    servers_seconds: u64,
    /// Target memory in MiB
    #[arg(long, default_value_t = 256)]
    memory: u32,
    #[arg(long, default_value = "/var/tmp/vmbuild-soak")]
    workdir: PathBuf,
    /// Write the results as JSON here
    #[arg(long)]
    json: Option<PathBuf>,
    /// Exit 1 when a build failed or crossed another's output, the snapshot changed,
    /// something was left behind, or a resource grew
    #[arg(long)]
    check: bool,
}

/// The most a process used while it was watched.
#[derive(Debug, Default, Clone, Copy, Serialize)]
struct Peak {
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

impl Peak {
    fn sample(pid: u32) -> Option<Peak> {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| -> Option<u64> {
            status
                .lines()
                .find(|l| l.starts_with(name))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        };
        let fds = fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
        Some(Peak {
            fds,
            threads: field("Threads:")? as usize,
            rss_kib: field("VmRSS:").unwrap_or(0),
        })
    }

    fn max(self, o: Peak) -> Peak {
        Peak {
            fds: self.fds.max(o.fds),
            threads: self.threads.max(o.threads),
            rss_kib: self.rss_kib.max(o.rss_kib),
        }
    }

    fn min(self, o: Peak) -> Peak {
        Peak {
            fds: self.fds.min(o.fds),
            threads: self.threads.min(o.threads),
            rss_kib: self.rss_kib.min(o.rss_kib),
        }
    }
}

#[derive(Debug, Serialize)]
struct Checkpoint {
    builds: usize,
    p50_s: f64,
    p99_s: f64,
    /// The most any vmbuild of this window reached.
    vmbuild_peak: Peak,
    /// After the window's last build.
    runtime_entries: usize,
    qemu_processes: usize,
    host_open_files: u64,
}

#[derive(Debug, Serialize)]
struct ServerSample {
    seconds: f64,
    fs_serve: Peak,
    switch: Peak,
    fs_sessions: u64,
    vde_sessions: u64,
}

#[derive(Debug, Default, Serialize)]
struct Results {
    load: usize,
    load_wall_s: f64,
    load_build_s: Vec<f64>,
    /// How long each concurrent build waited for a build slot (`--timings` `queued`).
    load_queued_s: Vec<f64>,
    load_failures: Vec<String>,
    snapshot_unchanged: bool,
    checkpoints: Vec<Checkpoint>,
    soak_failures: Vec<String>,
    servers: Vec<ServerSample>,
    server_failures: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let vmbuild = peers::vmbuild_binary()?;
    let _ = fs::remove_dir_all(&args.workdir);
    fs::create_dir_all(&args.workdir)?;
    let snapshot = args.workdir.join("snapshot");
    eprintln!("[soak] bootstrapping a {} MiB linux target", args.memory);
    let out = Command::new(&vmbuild)
        .args(["bootstrap", "--quiet", "--memory"])
        .arg(args.memory.to_string())
        .arg("--out")
        .arg(&snapshot)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!("bootstrap failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut results = Results {
        load: args.load,
        ..Default::default()
    };
    let before = fingerprint(&snapshot)?;
    if args.load > 0 {
        load(&args, &vmbuild, &snapshot, &mut results)?;
    }
    soak(&args, &vmbuild, &snapshot, &mut results)?;
    results.snapshot_unchanged = fingerprint(&snapshot)? == before;
    if args.servers_seconds > 0 {
        servers(&args, &mut results)?;
    }
    println!("{}", report(&args, &results));
    if let Some(path) = &args.json {
        fs::write(path, serde_json::to_vec_pretty(&results)?)?;
    }
    if args.check {
        let problems = Verdict::of(&results).problems;
        if !problems.is_empty() {
            eprintln!("[soak] FAILED:\n  {}", problems.join("\n  "));
            std::process::exit(1);
        }
        eprintln!("[soak] every check held");
    }
    Ok(())
}

/// Every file of the snapshot: name, size, mtime and SHA-256.
fn fingerprint(dir: &Path) -> anyhow::Result<BTreeMap<String, (u64, i64, String)>> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::MetadataExt;
    let mut all = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let p = e?.path();
            let m = fs::symlink_metadata(&p)?;
            if m.is_dir() {
                stack.push(p);
            } else {
                let digest = hex(&Sha256::digest(fs::read(&p)?));
                let name = p.strip_prefix(dir)?.display().to_string();
                all.insert(name, (m.len(), m.mtime(), digest));
            }
        }
    }
    Ok(all)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A watched build's outcome.
struct Watched {
    seconds: f64,
    code: Option<i32>,
    stdout: String,
    stderr: String,
    peak: Peak,
    pid: u32,
}

/// One build, watched from /proc while it runs.
fn watched_build(
    vmbuild: &Path,
    snapshot: &Path,
    xchg: &Path,
    options: &[String],
    script: &str,
) -> anyhow::Result<Watched> {
    let t = Instant::now();
    let mut child = Command::new(vmbuild)
        .args(["build", "--snapshot"])
        .arg(snapshot)
        .arg("--xchg")
        .arg(xchg)
        .args(options)
        .args(["--", "sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting vmbuild build")?;
    let pid = child.id();
    // The pipes are drained beside the sampling so a chatty build cannot block.
    let mut out_pipe = child.stdout.take().expect("piped");
    let mut err_pipe = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out_pipe, &mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err_pipe, &mut s);
        s
    });
    let mut peak = Peak::default();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if let Some(p) = Peak::sample(pid) {
            peak = peak.max(p);
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Watched {
        seconds: t.elapsed().as_secs_f64(),
        code: status.code(),
        stdout,
        stderr,
        peak,
        pid,
    })
}

fn load(args: &Args, vmbuild: &Path, snapshot: &Path, r: &mut Results) -> anyhow::Result<()> {
    eprintln!("[soak] load: {} concurrent builds", args.load);
    let t = Instant::now();
    let handles: Vec<_> = (0..args.load)
        .map(|i| {
            let xchg = args.workdir.join(format!("load-xchg-{i}"));
            let vmbuild = vmbuild.to_owned();
            let snapshot = snapshot.to_owned();
            let mut options = vec!["--timings".to_owned()];
            if let Some(jobs) = args.jobs {
                options.extend(["--jobs".to_owned(), jobs.to_string()]);
            }
            std::thread::spawn(
                move || -> anyhow::Result<(f64, Option<f64>, Option<String>)> {
                    fs::create_dir_all(&xchg)?;
                    let token = format!("build-{i}-{}", std::process::id());
                    let code = 3 + (i % 100) as i32;
                    let script = format!(
                        "echo {token}; echo {token} > /tmp/xchg/mine; ls /tmp/xchg; exit {code}"
                    );
                    let Watched {
                        seconds: secs,
                        code: got,
                        stdout,
                        stderr,
                        ..
                    } = watched_build(&vmbuild, &snapshot, &xchg, &options, &script)?;
                    let queued = stderr
                        .lines()
                        .rev()
                        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                        .and_then(|t| t["queued"].as_f64());
                    let mut why = Vec::new();
                    if got != Some(code) {
                        why.push(format!("exit {got:?}, expected {code}"));
                    }
                    // Its own token, and only its own file in its xchg.
                    if stdout != format!("{token}\nmine\n") {
                        why.push(format!("stdout {stdout:?}"));
                    }
                    let mine = fs::read_to_string(xchg.join("mine")).unwrap_or_default();
                    if mine.trim() != token {
                        why.push(format!("xchg/mine holds {mine:?}"));
                    }
                    let names: Vec<_> = fs::read_dir(&xchg)?
                        .flatten()
                        .map(|e| e.file_name())
                        .collect();
                    if names.len() != 1 {
                        why.push(format!("xchg holds {names:?}"));
                    }
                    let failure = (!why.is_empty()).then(|| {
                        format!(
                            "build {i}: {}; stderr: {}",
                            why.join(", "),
                            last_word(&stderr)
                        )
                    });
                    Ok((secs, queued, failure))
                },
            )
        })
        .collect();
    for h in handles {
        match h.join() {
            Ok(Ok((secs, queued, failure))) => {
                r.load_build_s.push(secs);
                r.load_queued_s.extend(queued);
                r.load_failures.extend(failure);
            }
            Ok(Err(e)) => r.load_failures.push(format!("{e:#}")),
            Err(_) => r.load_failures.push("a load thread panicked".into()),
        }
    }
    r.load_wall_s = t.elapsed().as_secs_f64();
    Ok(())
}

/// vmbuild's own verdict on a build (its last `vmbuild build:` line), else the last line
/// that is not empty: a console tail may end a message.
fn last_word(stderr: &str) -> &str {
    stderr
        .lines()
        .rfind(|l| l.starts_with("vmbuild build:") && !l.contains("build slot"))
        .or_else(|| stderr.lines().rfind(|l| !l.trim().is_empty()))
        .unwrap_or("")
}

/// Where this user's vmbuild keeps its runtime directories (as vmbuild decides it).
fn runtime_base() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Path::new(&d).join("vmbuild");
    }
    // SAFETY: geteuid(2) cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 && Path::new("/run").is_dir() {
        return PathBuf::from("/run/vmbuild");
    }
    std::env::temp_dir().join(format!("vmbuild-{uid}"))
}

/// Runtime directories (`build-PID-…`) of the builds this soak started: another vmbuild
/// on the host has its own, which are not this soak's to count.
fn count_entries(dir: &Path, pids: &std::collections::HashSet<u32>) -> usize {
    fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.split('-')
                        .nth(1)
                        .and_then(|p| p.parse::<u32>().ok())
                        .is_some_and(|p| pids.contains(&p))
                })
                .count()
        })
        .unwrap_or(0)
}

/// QEMU processes whose command line names `needle` (this soak's snapshot).
fn qemu_processes(needle: &Path) -> usize {
    let needle = needle.to_string_lossy().into_owned();
    fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let cmd = fs::read(e.path().join("cmdline")).unwrap_or_default();
                    let cmd = String::from_utf8_lossy(&cmd);
                    cmd.contains("qemu-system") && cmd.contains(&needle)
                })
                .count()
        })
        .unwrap_or(0)
}

fn host_open_files() -> u64 {
    fs::read_to_string("/proc/sys/fs/file-nr")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn percentile(mut xs: Vec<f64>, p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let i = ((xs.len() as f64 - 1.0) * p).round() as usize;
    xs[i.min(xs.len() - 1)]
}

fn soak(args: &Args, vmbuild: &Path, snapshot: &Path, r: &mut Results) -> anyhow::Result<()> {
    eprintln!("[soak] soak: {} sequential builds", args.builds);
    let xchg = args.workdir.join("soak-xchg");
    fs::create_dir_all(&xchg)?;
    let base = runtime_base();
    let every = args.every.max(1);
    let mut window = Vec::new();
    let mut peak = Peak::default();
    let mut pids = std::collections::HashSet::new();
    for b in 1..=args.builds {
        let script = if b % 2 == 1 {
            "true"
        } else {
            "mkdir -p /tmp/xchg/o && for i in $(seq 50); do echo $i > /tmp/xchg/o/$i; done"
        };
        let Watched {
            seconds: secs,
            code,
            stderr,
            peak: p,
            pid,
            ..
        } = watched_build(vmbuild, snapshot, &xchg, &[], script)?;
        pids.insert(pid);
        if code != Some(0) {
            r.soak_failures
                .push(format!("build {b}: exit {code:?}: {}", last_word(&stderr)));
        }
        window.push(secs);
        peak = peak.max(p);
        if b % every == 0 || b == args.builds {
            let c = Checkpoint {
                builds: b,
                p50_s: median(window.clone()),
                p99_s: percentile(window.clone(), 0.99),
                vmbuild_peak: peak,
                runtime_entries: count_entries(&base, &pids),
                qemu_processes: qemu_processes(snapshot),
                host_open_files: host_open_files(),
            };
            eprintln!("[soak] {c:?}");
            r.checkpoints.push(c);
            window.clear();
            peak = Peak::default();
        }
    }
    Ok(())
}

fn servers(args: &Args, r: &mut Results) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    eprintln!(
        "[soak] servers: fs serve and switch under traffic for {} s",
        args.servers_seconds
    );
    let share = args.workdir.join("share");
    fs::create_dir_all(share.join("ro"))?;
    for i in 0..100 {
        fs::write(share.join(format!("ro/f{i:03}")), vec![b'x'; 1000 + i * 37])?;
    }
    let fs_sock = args.workdir.join("fs.sock");
    let fs_daemon = peers::vmbuild_share(&share, &fs_sock, false)?;
    let vde = args.workdir.join("vde");
    let mut sw_cmd = Command::new(peers::vmbuild_binary()?);
    sw_cmd
        .args(["switch", "--sock"])
        .arg(&vde)
        .env("RUST_LOG", "warn");
    let mut sw_daemon = Daemon::spawn("vmbuild switch", &mut sw_cmd)?;
    sw_daemon.wait_for_socket(&vde.join("ctl"))?;

    let stop = Arc::new(AtomicBool::new(false));
    let fs_sessions = Arc::new(AtomicU64::new(0));
    let vde_sessions = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let fs_traffic = {
        let (stop, n, failures, sock) = (
            stop.clone(),
            fs_sessions.clone(),
            failures.clone(),
            fs_sock.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = fs_session(&sock) {
                    failures.lock().unwrap().push(format!("fs session: {e:#}"));
                    std::thread::sleep(Duration::from_millis(200));
                }
                n.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let vde_traffic = {
        let (stop, n, failures, dir) = (
            stop.clone(),
            vde_sessions.clone(),
            failures.clone(),
            vde.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = vde_session(&dir) {
                    failures.lock().unwrap().push(format!("vde session: {e:#}"));
                    std::thread::sleep(Duration::from_millis(200));
                }
                n.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let t = Instant::now();
    let samples = 20u64;
    let step = Duration::from_secs_f64(args.servers_seconds as f64 / samples as f64);
    while t.elapsed().as_secs() < args.servers_seconds {
        std::thread::sleep(step);
        let s = ServerSample {
            seconds: t.elapsed().as_secs_f64(),
            fs_serve: Peak::sample(fs_daemon.pid()).unwrap_or_default(),
            switch: Peak::sample(sw_daemon.pid()).unwrap_or_default(),
            fs_sessions: fs_sessions.load(Ordering::Relaxed),
            vde_sessions: vde_sessions.load(Ordering::Relaxed),
        };
        eprintln!("[soak] {s:?}");
        r.servers.push(s);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = fs_traffic.join();
    let _ = vde_traffic.join();
    let mut f = failures.lock().unwrap();
    // Each kind of failure once, with its count.
    let mut counted: BTreeMap<String, usize> = BTreeMap::new();
    for e in f.drain(..) {
        *counted.entry(e).or_default() += 1;
    }
    r.server_failures = counted
        .into_iter()
        .map(|(e, n)| format!("{n} × {e}"))
        .collect();
    Ok(())
}

/// One front-end's life: connect, INIT, look up and read files, write one, disconnect.
fn fs_session(sock: &Path) -> anyhow::Result<()> {
    use vmbuild_tests::fuse_client::FuseClient;
    use vmbuild_tests::vhost_frontend::FsFrontend;
    const ROOT: u64 = 1;
    let mut c = FuseClient::new(FsFrontend::connect(sock)?);
    c.init().map_err(|e| anyhow::anyhow!("INIT: {e}"))?;
    let ro = c
        .lookup(ROOT, "ro")
        .map_err(|e| anyhow::anyhow!("lookup ro: {e}"))?;
    for i in (0..100).step_by(7) {
        let e = c
            .lookup(ro.nodeid, &format!("f{i:03}"))
            .map_err(|e| anyhow::anyhow!("lookup: {e}"))?;
        let fh = c
            .open(e.nodeid, libc::O_RDONLY)
            .map_err(|e| anyhow::anyhow!("open: {e}"))?;
        let data = c
            .read(e.nodeid, fh.fh, 0, 8192)
            .map_err(|e| anyhow::anyhow!("read: {e}"))?;
        if data.len() != 1000 + i * 37 {
            bail!("read {} bytes of f{i:03}", data.len());
        }
        c.release(e.nodeid, fh.fh)
            .map_err(|e| anyhow::anyhow!("release: {e}"))?;
        c.forget(e.nodeid, 1);
    }
    c.forget(ro.nodeid, 1);
    Ok(())
}

/// Three VDE ports for a moment: frames between them, then all gone. Each session's
/// ports have MAC addresses of their own, as new guests would.
fn vde_session(dir: &Path) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicU32, Ordering};
    use vswitch::vde_plug::VdeClient;
    static SESSION: AtomicU32 = AtomicU32::new(0);
    let session = SESSION.fetch_add(1, Ordering::Relaxed).to_be_bytes();
    let ports: Vec<VdeClient> = (0..3)
        .map(|i| VdeClient::connect(dir, 0, &format!("soak {i}")))
        .collect::<Result<_, _>>()?;
    for p in &ports {
        p.data.set_read_timeout(Some(Duration::from_secs(2)))?;
    }
    let mac = |i: u8| [0x02, session[1], session[2], session[3], 0, i + 1];
    for round in 0..20u8 {
        for (i, p) in ports.iter().enumerate() {
            let to = mac(((i + 1) % 3) as u8);
            let mut frame = Vec::with_capacity(64);
            // The first round floods (unknown destination); later ones are learned.
            frame.extend_from_slice(if round == 0 { &[0xff; 6] } else { &to });
            frame.extend_from_slice(&mac(i as u8));
            frame.extend_from_slice(&[0x88, 0xb5]);
            frame.resize(64, round);
            p.data.send(&frame)?;
        }
        // Each port gets at least one frame per round.
        let mut buf = [0u8; 2048];
        for p in &ports {
            p.data
                .recv(&mut buf)
                .context("a frame did not arrive within 2 s")?;
        }
    }
    Ok(())
}

/// What --check holds the results to.
struct Verdict {
    problems: Vec<String>,
}

impl Verdict {
    fn of(r: &Results) -> Verdict {
        let mut p = Vec::new();
        p.extend(r.load_failures.iter().map(|f| format!("load: {f}")));
        p.extend(r.soak_failures.iter().map(|f| format!("soak: {f}")));
        p.extend(r.server_failures.iter().map(|f| format!("servers: {f}")));
        if !r.snapshot_unchanged {
            p.push("the snapshot changed".into());
        }
        if let Some(last) = r.checkpoints.last() {
            if last.runtime_entries > 0 {
                p.push(format!(
                    "{} entries left in the runtime directory",
                    last.runtime_entries
                ));
            }
            if last.qemu_processes > 0 {
                p.push(format!("{} QEMU processes left", last.qemu_processes));
            }
        }
        if let (Some(first), Some(last)) = (r.checkpoints.first(), r.checkpoints.last()) {
            // One build's use does not depend on how many came before it.
            if last.vmbuild_peak.fds > first.vmbuild_peak.fds + 8 {
                p.push(format!(
                    "a build's fds grew from {} to {}",
                    first.vmbuild_peak.fds, last.vmbuild_peak.fds
                ));
            }
            if last.vmbuild_peak.threads > first.vmbuild_peak.threads + 8 {
                p.push(format!(
                    "a build's threads grew from {} to {}",
                    first.vmbuild_peak.threads, last.vmbuild_peak.threads
                ));
            }
            // A median of a few builds says little on a shared host: judged from 20 up.
            if first.builds >= 20 && last.p50_s > first.p50_s * 1.5 {
                p.push(format!(
                    "the p50 build time drifted from {:.2} s to {:.2} s",
                    first.p50_s, last.p50_s
                ));
            }
        }
        // The servers: the last quarter of the samples against the first (after a
        // warm-up sample). Each sample is one instant, and a server's fds and threads at an
        // instant depend on where the session in flight is (between sessions, or holding
        // the front-end's memory, kick, call and error fds, a vring worker, ...): over a
        // run the switch's fds range over 9-19 and fs serve's over 12-23. Comparing the
        // highest early sample with the highest late one, within 4, failed by chance in
        // about 3% of runs (a quarter of the samples that all happened to fall between
        // sessions). A leak lifts every sample, so it is the late quarter's lowest against
        // the early quarter's highest: a server that holds one more fd per session lifts
        // even its lowest sample by hundreds. RSS does not swing with sessions: highest
        // against highest, within 25% + 4 MiB.
        if r.servers.len() >= 4 {
            let q = r.servers.len() / 4;
            let early = &r.servers[1..1 + q];
            let late = &r.servers[r.servers.len() - q..];
            for (name, pick) in [
                (
                    "fs serve",
                    (|s: &ServerSample| s.fs_serve) as fn(&ServerSample) -> Peak,
                ),
                ("switch", |s: &ServerSample| s.switch),
            ] {
                let max =
                    |xs: &[ServerSample]| xs.iter().map(pick).fold(Peak::default(), Peak::max);
                let min = |xs: &[ServerSample]| {
                    xs.iter().map(pick).fold(
                        Peak {
                            fds: usize::MAX,
                            threads: usize::MAX,
                            rss_kib: u64::MAX,
                        },
                        Peak::min,
                    )
                };
                let (a, b, b_low) = (max(early), max(late), min(late));
                if b_low.fds > a.fds + 4 {
                    p.push(format!(
                        "{name}: fds grew from at most {} to at least {}",
                        a.fds, b_low.fds
                    ));
                }
                if b_low.threads > a.threads + 4 {
                    p.push(format!(
                        "{name}: threads grew from at most {} to at least {}",
                        a.threads, b_low.threads
                    ));
                }
                if b.rss_kib as f64 > a.rss_kib as f64 * 1.25 + 4096.0 {
                    p.push(format!(
                        "{name}: RSS grew from {} KiB to {} KiB",
                        a.rss_kib, b.rss_kib
                    ));
                }
            }
            if late.last().map(|s| s.fs_sessions) == early.first().map(|s| s.fs_sessions) {
                p.push("fs serve stopped serving sessions".into());
            }
        }
        Verdict { problems: p }
    }
}

fn report(args: &Args, r: &Results) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "### Load: {} concurrent builds from one snapshot (--jobs {})\n\n\
         wall {:.1} s; per build median {:.1} s, max {:.1} s; waited for a slot: {} builds, \
         at most {:.1} s; failures {}; snapshot unchanged: {}\n\n",
        r.load,
        args.jobs.map_or("default".to_owned(), |j| j.to_string()),
        r.load_wall_s,
        median(r.load_build_s.clone()),
        r.load_build_s.iter().cloned().fold(0.0, f64::max),
        r.load_queued_s.iter().filter(|&&q| q >= 0.1).count(),
        r.load_queued_s.iter().cloned().fold(0.0, f64::max),
        r.load_failures.len(),
        r.snapshot_unchanged
    ));
    s.push_str(&format!(
        "### Soak: {} sequential builds (checkpoints every {})\n\n\
         | builds | p50 (s) | p99 (s) | vmbuild max fds | max threads | max RSS (MiB) | runtime entries after | QEMU left | host open files |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        args.builds, args.every
    ));
    for c in &r.checkpoints {
        s.push_str(&format!(
            "| {} | {:.2} | {:.2} | {} | {} | {:.1} | {} | {} | {} |\n",
            c.builds,
            c.p50_s,
            c.p99_s,
            c.vmbuild_peak.fds,
            c.vmbuild_peak.threads,
            c.vmbuild_peak.rss_kib as f64 / 1024.0,
            c.runtime_entries,
            c.qemu_processes,
            c.host_open_files
        ));
    }
    s.push_str(&format!(
        "\nfailures: {}\n\n### Servers under traffic for {} s (front-ends connecting and disconnecting)\n\n\
         | s | fs serve fds | threads | RSS (MiB) | FUSE sessions | switch fds | threads | RSS (MiB) | VDE sessions |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        r.soak_failures.len(),
        args.servers_seconds
    ));
    for x in &r.servers {
        s.push_str(&format!(
            "| {:.0} | {} | {} | {:.1} | {} | {} | {} | {:.1} | {} |\n",
            x.seconds,
            x.fs_serve.fds,
            x.fs_serve.threads,
            x.fs_serve.rss_kib as f64 / 1024.0,
            x.fs_sessions,
            x.switch.fds,
            x.switch.threads,
            x.switch.rss_kib as f64 / 1024.0,
            x.vde_sessions
        ));
    }
    if !r.server_failures.is_empty() {
        s.push_str(&format!(
            "\nserver failures: {}\n",
            r.server_failures.join("; ")
        ));
    }
    s
}
