//! A QEMU guest's NIC on vmbuild switch's vhost-user-net port, and on QEMU's `-netdev vde`
//! through `vmbuild switch -s DIR` and through `vde_switch -s DIR`:
//! the same guest (the guest kit under TCG, virtio-net on `-netdev vde,sock=DIR`), the same
//! traffic, to the same peer (a tap of the switch in a network namespace of its own):
//! TCP from the guest (`dd | nc`, counted by a receiver in the namespace from its first
//! byte to the last), TCP to the guest (busybox `wget` in the guest fetching from a server
//! in the namespace; from the request until the guest has read everything and closed) and
//! ping round trips. Contenders take turns, the order rotating each
//! round; medians.
//!
//! Reproduce: `apt-get install vde2 && scripts/guest-kit.sh &&
//! cargo build --release -p vmbuild -p vmbuild-benches && target/release/vde-bench`

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use vmbuild::bench::sample::{write_samples, Sample};
use vmbuild_benches::peers;
use vmbuild_benches::report::{markdown, median, Row};
use vmbuild_tests::guest::{GuestKit, GuestShare, GuestVm};
use vmbuild_tests::netns::Netns;

#[derive(Parser, Debug)]
#[command(about = "QEMU -netdev vde: vmbuild switch -s vs vde_switch -s")]
struct Args {
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// MiB the guest sends over TCP per run
    #[arg(long, default_value_t = 32)]
    mib: usize,
    /// Pings per run (0.2 s apart)
    #[arg(long, default_value_t = 20)]
    pings: u32,
    /// Write every run's figures as `vmbuild bench` samples (JSON) here
    #[arg(long, value_name = "FILE")]
    samples: Option<PathBuf>,
    /// The peers to run beside vmbuild: vde (vde_switch -s); "none" for none; all by default
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    peers: Option<Vec<String>>,
}

/// vmbuild's own port for QEMU guests first (what `run` and `build` give a guest's NIC
/// when it is not migrated), then the same switch and vde_switch over `-netdev vde`.
const CONTENDERS: [&str; 3] = [
    "vmbuild switch, vhost-user-net",
    "vmbuild switch -s",
    "vde_switch -s",
];
const PEER: &str = "10.86.0.1";

/// A switch process, killed (SIGTERM, then SIGKILL) on drop; its stdin stays open because
/// vde_switch's console exits at EOF.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let kit = GuestKit::locate()?;
    let vmbuild = peers::vmbuild_binary()?;
    let mut tcp: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut tcp_in: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut rtt: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let with_vde = args
        .peers
        .as_ref()
        .is_none_or(|p| p.iter().any(|n| n == "vde"));
    let contenders: Vec<&str> = CONTENDERS
        .into_iter()
        .filter(|c| with_vde || c.starts_with("vmbuild"))
        .collect();
    let mut samples = Vec::new();
    let out_workload = format!("TCP guest → peer, {} MiB", args.mib);
    let in_workload = format!("TCP peer → guest, {} MiB", args.mib);
    const PING: &str = "ping guest → peer, average round trip";
    for round in 0..args.rounds {
        for i in 0..contenders.len() {
            let contender = contenders[(round + i) % contenders.len()];
            eprintln!("[vde-bench] round {} {contender}", round + 1);
            let (mbps, mbps_in, ms) = one_run(&args, &kit, &vmbuild, contender)
                .with_context(|| format!("{contender}, round {}", round + 1))?;
            eprintln!(
                "[vde-bench]   out {mbps:.1} Mbit/s, in {mbps_in:.1} Mbit/s, ping {ms:.3} ms"
            );
            tcp.entry(contender).or_default().push(mbps);
            tcp_in.entry(contender).or_default().push(mbps_in);
            rtt.entry(contender).or_default().push(ms);
            samples.push(Sample::new(
                &out_workload,
                contender,
                "Mbit/s",
                true,
                round + 1,
                mbps,
            ));
            samples.push(Sample::new(
                &in_workload,
                contender,
                "Mbit/s",
                true,
                round + 1,
                mbps_in,
            ));
            samples.push(Sample::new(PING, contender, "ms", false, round + 1, ms));
        }
    }
    let rows = vec![
        Row {
            workload: out_workload,
            unit: "Mbit/s",
            higher_is_better: true,
            values: contenders.iter().map(|c| median(tcp[c].clone())).collect(),
        },
        Row {
            workload: in_workload,
            unit: "Mbit/s",
            higher_is_better: true,
            values: contenders
                .iter()
                .map(|c| median(tcp_in[c].clone()))
                .collect(),
        },
        Row {
            workload: PING.into(),
            unit: "ms",
            higher_is_better: false,
            values: contenders.iter().map(|c| median(rtt[c].clone())).collect(),
        },
    ];
    println!(
        "### QEMU -netdev vde (TCG guest) to a tap peer, median of {} rounds\n",
        args.rounds
    );
    println!("{}", markdown(&contenders, &rows));
    if let Some(path) = &args.samples {
        write_samples(path, &samples)?;
    }
    Ok(())
}

/// One boot on one contender: (TCP out Mbit/s, TCP in Mbit/s, average ping ms).
fn one_run(
    args: &Args,
    kit: &GuestKit,
    vmbuild: &Path,
    contender: &str,
) -> anyhow::Result<(f64, f64, f64)> {
    let top = tempfile::tempdir()?;
    let dir = top.path().join("switch.vde");
    let vhost = top.path().join("net.sock");
    let tap = format!("vdeb{}", std::process::id() % 100_000);
    let vhost_user = contender.ends_with("vhost-user-net");
    let mut cmd = if contender.starts_with("vmbuild") {
        let mut c = Command::new(vmbuild);
        c.arg("switch").env("RUST_LOG", "warn");
        c
    } else {
        Command::new("vde_switch")
    };
    if vhost_user {
        cmd.arg("--vhost-user").arg(&vhost).args(["-t", &tap]);
    } else {
        cmd.arg("-s").arg(&dir).args(["-t", &tap]);
    }
    let ready = if vhost_user {
        vhost.clone()
    } else {
        dir.join("ctl")
    };
    let switch = Proc(
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {contender}"))?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready.exists() || !Path::new("/sys/class/net").join(&tap).exists() {
        if Instant::now() > deadline {
            bail!("{contender} made no {} and tap {tap}", ready.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ns = Netns::create("vdeb")?;
    ns.adopt(&tap, &format!("{PEER}/24"))?;
    let bytes = args.mib * 1024 * 1024;
    let receiver = ns.run(move || -> anyhow::Result<(f64, f64)> {
        let listener = std::net::TcpListener::bind((PEER, 5001))?;
        let (mut conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0usize;
        let mut first = None;
        while total < bytes {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                break;
            }
            first.get_or_insert_with(Instant::now);
            total += n;
        }
        let secs = first.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
        if total < bytes || secs == 0.0 {
            bail!("received {total} of {bytes} bytes");
        }
        let out = total as f64 * 8.0 / secs / 1e6;
        drop(conn);
        // Then the other way: the guest fetches as much with wget.
        let listener = std::net::TcpListener::bind((PEER, 5002))?;
        let (mut conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(Duration::from_secs(120)))?;
        let _ = conn.read(&mut buf)?; // the request (one small segment)
        let start = Instant::now();
        use std::io::Write;
        conn.write_all(format!("HTTP/1.0 200 OK\r\nContent-Length: {bytes}\r\n\r\n").as_bytes())?;
        let chunk = vec![0u8; 1 << 16];
        for _ in 0..bytes / chunk.len() {
            conn.write_all(&chunk)?;
        }
        // wget closes once it has read everything.
        while conn.read(&mut buf)? > 0 {}
        let secs = start.elapsed().as_secs_f64();
        Ok((out, bytes as f64 * 8.0 / secs / 1e6))
    });
    let xchg = tempfile::tempdir()?;
    std::fs::write(
        xchg.path().join("run.sh"),
        format!(
            "ip link set eth0 up && ip addr add 10.86.0.2/24 dev eth0 && \
             ping -c 1 -w 30 {PEER} > /dev/null && \
             ping -c {pings} -i 0.2 {PEER} > /tmp/xchg/ping.txt 2>&1 && \
             dd if=/dev/zero bs=65536 count={count} 2>/dev/null | nc {PEER} 5001; \
             sleep 1; wget -q -O /dev/null http://{PEER}:5002/data",
            pings = args.pings,
            count = args.mib * 16
        ),
    )?;
    let mut vm = GuestVm::new(kit.clone(), "/tmp/xchg/run.sh").share(GuestShare::NineP {
        dir: xchg.path().to_owned(),
        tag: "xchg".into(),
        mount: "/tmp/xchg".into(),
        options: String::new(),
    });
    if vhost_user {
        vm.nics.push((vhost.clone(), "52:54:00:00:86:02".into()));
    } else {
        vm.vde_nics.push((dir.clone(), "52:54:00:00:86:02".into()));
    }
    vm.timeout = Duration::from_secs(600);
    let outcome = vm.run()?;
    let (mbps, mbps_in) = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??
        .with_context(|| format!("guest console:\n{}", outcome.console))?;
    let ping = std::fs::read_to_string(xchg.path().join("ping.txt"))?;
    // busybox: "round-trip min/avg/max = 0.512/0.734/1.203 ms"
    let avg = ping
        .lines()
        .find_map(|l| l.split(" = ").nth(1))
        .and_then(|v| v.split('/').nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .with_context(|| format!("no round-trip line in {ping}"))?;
    // The switch goes before the namespace that holds its tap.
    drop(switch);
    drop(ns);
    Ok((mbps, mbps_in, avg))
}
