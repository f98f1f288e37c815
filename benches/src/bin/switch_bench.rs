//! Switching, side by side in one run, between the same two network namespaces: the
//! kernel's limit (a veth pair), a Linux bridge, vde_switch (Debian's vde2) and
//! `vmbuild switch` — TCP throughput and 64-byte UDP packets/s with iperf3. Plus frames/s
//! between two in-process ports on one core.
//!
//! Reproduce: `apt-get install vde2 iperf3 && cargo build --release -p vmbuild -p vmbuild-benches
//! && target/release/switch-bench`

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use vmbuild::bench::sample::{write_samples, Sample};
use vmbuild_benches::peers::{self, Daemon};
use vmbuild_benches::report::{markdown, median, Row};
use vmbuild_tests::netns::{ip, Netns};
use vswitch::{InProcessPort, Switch, SwitchConfig, VlanMode};

#[derive(Parser, Debug)]
#[command(about = "veth vs Linux bridge vs vde_switch vs vmbuild switch")]
struct Args {
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per iperf3 run
    #[arg(long, default_value_t = 4)]
    seconds: u32,
    /// Only the in-process and vhost-user figures (no namespaces, no iperf3)
    #[arg(long)]
    local_only: bool,
    /// The peers to run beside vmbuild: vde (vde_switch), bridge (the Linux bridge); the
    /// veth pair, the kernel's limit, always runs
    #[arg(long, value_delimiter = ',', default_value = "vde,bridge")]
    peers: Vec<String>,
    /// Write every sample to FILE as JSON (`vmbuild bench` reads it)
    #[arg(long, value_name = "FILE")]
    samples: Option<PathBuf>,
}

const CONTENDERS: [&str; 4] = [
    "vmbuild switch",
    "vde_switch",
    "Linux bridge",
    "veth (kernel limit)",
];

/// What holds a contender's topology up; dropped to tear it down.
enum Topology {
    /// Held only to be dropped: the daemon is killed with the topology.
    Process(#[allow(dead_code)] Daemon),
    VdeSwitch(u32),
    Links(Vec<String>),
}

impl Drop for Topology {
    fn drop(&mut self) {
        match self {
            Topology::Process(_) => {}
            Topology::VdeSwitch(pid) => {
                // SAFETY: kill(2) on the vde_switch daemon we started.
                unsafe { libc::kill(*pid as i32, libc::SIGTERM) };
                std::thread::sleep(Duration::from_millis(200));
            }
            Topology::Links(links) => {
                for l in links {
                    let _ = ip(&["link", "del", l]);
                }
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let contenders: Vec<&str> = CONTENDERS
        .into_iter()
        .filter(|c| match *c {
            "vde_switch" => args.peers.iter().any(|p| p == "vde"),
            "Linux bridge" => args.peers.iter().any(|p| p == "bridge"),
            _ => true,
        })
        .collect();
    let mut needed = vec![];
    if !args.local_only {
        needed.push("iperf3");
        if contenders.contains(&"vde_switch") {
            needed.push("vde_switch");
        }
    }
    let peers = &needed;
    for tool in peers {
        if Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()?
            .success()
        {
            continue;
        }
        bail!("{tool} not found: apt-get install iperf3 vde2");
    }
    let mut samples = Vec::new();
    if !args.local_only {
        namespaces(&args, &contenders, &mut samples)?;
    }
    let single = in_process_pps(Duration::from_secs(2), Sending::OneByOne);
    let batched = in_process_pps(Duration::from_secs(2), Sending::Batches);
    let vhost = vhost_user_pps(Duration::from_secs(2))?;
    println!(
        "### Without a kernel in the path\n\n| workload | vmbuild switch |\n|---|---|\n\
         | in-process ports, 64-byte frames A→B, one `send` per frame, one core (Mpps) | {:.2} |\n\
         | in-process ports, 64-byte frames A→B, `send_batch` of {BURST}, one core (Mpps) | {:.2} |\n\
         | vhost-user-net ports, 64-byte frames A→B through a front-end harness (Mpps) | {:.2} |\n",
        single / 1e6,
        batched / 1e6,
        vhost / 1e6
    );
    for (workload, value) in [
        (
            "in-process ports, 64-byte frames, one send per frame",
            single,
        ),
        ("in-process ports, 64-byte frames, send_batch", batched),
        (
            "vhost-user-net ports, 64-byte frames, front-end harness",
            vhost,
        ),
    ] {
        samples.push(Sample::new(
            workload,
            "vmbuild switch",
            "Mpps",
            true,
            1,
            value / 1e6,
        ));
    }
    if let Some(path) = &args.samples {
        write_samples(path, &samples)?;
    }
    Ok(())
}

fn namespaces(args: &Args, contenders: &[&str], samples: &mut Vec<Sample>) -> anyhow::Result<()> {
    let mut tcp: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut udp: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for round in 0..args.rounds {
        // Each round starts with the next contender, so that none always goes first.
        let order = contenders
            .iter()
            .cycle()
            .skip(round % contenders.len())
            .take(contenders.len());
        for &contender in order {
            eprintln!("[switch-bench] round {} {contender}", round + 1);
            let ns1 = Netns::create("s1")?;
            let ns2 = Netns::create("s2")?;
            let topo = connect(contender, &ns1, &ns2)?;
            ns1.exec(&["busybox", "ping", "-c", "1", "-W", "5", "10.78.0.2"])
                .with_context(|| format!("{contender}: no connectivity"))?;
            let bits = iperf(&ns1, &ns2, args.seconds, false)?;
            let packets = iperf(&ns1, &ns2, args.seconds, true)?;
            tcp.entry(contender).or_default().push(bits);
            udp.entry(contender).or_default().push(packets);
            samples.push(Sample::new(
                "TCP throughput",
                contender,
                "Gbit/s",
                true,
                round + 1,
                bits / 1e9,
            ));
            samples.push(Sample::new(
                "UDP 64-byte packets received",
                contender,
                "kpps",
                true,
                round + 1,
                packets / 1e3,
            ));
            drop(topo);
        }
    }
    let rows = vec![
        Row {
            workload: "TCP throughput".into(),
            unit: "Gbit/s",
            higher_is_better: true,
            values: contenders
                .iter()
                .map(|c| median(tcp[c].clone()) / 1e9)
                .collect(),
        },
        Row {
            workload: "UDP 64-byte packets received".into(),
            unit: "kpps",
            higher_is_better: true,
            values: contenders
                .iter()
                .map(|c| median(udp[c].clone()) / 1e3)
                .collect(),
        },
    ];
    println!(
        "### Between two network namespaces (iperf3, median of {} rounds)\n",
        args.rounds
    );
    println!("{}", markdown(contenders, &rows));
    Ok(())
}

/// Puts `va` in ns1 and `vb` in ns2 (10.78.0.1/24 and .2/24), joined by the contender.
fn connect(contender: &str, ns1: &Netns, ns2: &Netns) -> anyhow::Result<Topology> {
    let pid = std::process::id() % 10_000;
    let (a, b) = (format!("sba{pid}"), format!("sbb{pid}"));
    let topo = match contender {
        "veth (kernel limit)" => {
            ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
            Topology::Links(vec![])
        }
        "Linux bridge" => {
            let br = format!("sbr{pid}");
            ip(&["link", "add", &br, "type", "bridge"])?;
            ip(&["link", "set", &br, "up"])?;
            for end in [&a, &b] {
                let peer = format!("{end}p");
                ip(&["link", "add", end, "type", "veth", "peer", "name", &peer])?;
                ip(&["link", "set", &peer, "master", &br])?;
                ip(&["link", "set", &peer, "up"])?;
            }
            Topology::Links(vec![br, format!("{a}p"), format!("{b}p")])
        }
        "vde_switch" => {
            let pidfile = std::env::temp_dir().join(format!("vde-bench-{pid}.pid"));
            let _ = std::fs::remove_file(&pidfile);
            let status = Command::new("vde_switch")
                .args(["-t", &a, "-t", &b, "-d", "-p"])
                .arg(&pidfile)
                .args(["-s", &format!("/tmp/vde-bench-{pid}.ctl")])
                .status()?;
            if !status.success() {
                bail!("vde_switch failed to start");
            }
            wait_for_link(&b)?;
            let vpid: u32 = std::fs::read_to_string(&pidfile)?.trim().parse()?;
            Topology::VdeSwitch(vpid)
        }
        "vmbuild switch" => {
            let mut cmd = Command::new(peers::vmbuild_binary()?);
            cmd.args(["switch", "--tap", &a, "--tap", &b])
                .env("RUST_LOG", "warn");
            let d = Daemon::spawn("vmbuild switch", &mut cmd)?;
            wait_for_link(&b)?;
            Topology::Process(d)
        }
        other => bail!("unknown contender {other}"),
    };
    ns1.adopt(&a, "10.78.0.1/24")?;
    ns2.adopt(&b, "10.78.0.2/24")?;
    Ok(topo)
}

fn wait_for_link(name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while ip(&["link", "show", name]).is_err() {
        if Instant::now() > deadline {
            bail!("{name} did not appear");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// TCP: bits/s received. UDP: 64-byte packets/s received.
fn iperf(ns1: &Netns, ns2: &Netns, seconds: u32, udp: bool) -> anyhow::Result<f64> {
    let mut server = KillOnDrop(
        Command::new("ip")
            .args([
                "netns", "exec", &ns2.name, "iperf3", "-s", "-1", "-p", "5299",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    std::thread::sleep(Duration::from_millis(300));
    let t = seconds.to_string();
    let mut args = vec!["iperf3", "-c", "10.78.0.2", "-p", "5299", "-t", &t, "-J"];
    if udp {
        args.extend(["-u", "-b", "0", "-l", "64"]);
    }
    let out = ns1.exec(&args)?;
    let _ = server.0.wait();
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 JSON")?;
    if udp {
        let sum = &v["end"]["sum"];
        let packets = sum["packets"].as_f64().unwrap_or(0.0);
        let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
        let secs = sum["seconds"].as_f64().unwrap_or(f64::from(seconds));
        Ok((packets - lost) / secs)
    } else {
        Ok(v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0))
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Frames a sender hands the in-process port at a time.
const BURST: usize = 256;

#[derive(Clone, Copy)]
enum Sending {
    /// `send` per frame, as a caller with one frame at a time does.
    OneByOne,
    /// `send_batch` of [`BURST`] frames, as a virtqueue's worth is sent.
    Batches,
}

/// One thread sends learned unicast A→B in bursts of [`BURST`] and drains B: frames/s
/// through the switch on one core.
fn in_process_pps(duration: Duration, sending: Sending) -> f64 {
    let sw = Switch::new(SwitchConfig::default());
    let vlan = VlanMode::Access { vlan: 1 };
    let a = InProcessPort::attach(&sw, "a", vlan.clone());
    let b = InProcessPort::attach(&sw, "b", vlan);
    let mac_a = [2, 0, 0, 0, 0, 0xa];
    let mac_b = [2, 0, 0, 0, 0, 0xb];
    let mut frame = Vec::new();
    frame.extend_from_slice(&mac_b);
    frame.extend_from_slice(&mac_a);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.resize(64, 0);
    let mut reply = frame.clone();
    reply[..6].copy_from_slice(&mac_a);
    reply[6..12].copy_from_slice(&mac_b);
    b.send(&reply);
    a.send(&frame);
    let mut sink = Vec::with_capacity(512);
    b.drain(&mut sink);
    a.drain(&mut sink);
    sink.clear();
    let start = Instant::now();
    let mut delivered = 0usize;
    let burst = vec![frame.as_slice(); BURST];
    while start.elapsed() < duration {
        match sending {
            Sending::OneByOne => {
                for f in &burst {
                    a.send(f);
                }
            }
            Sending::Batches => a.send_batch(&burst),
        }
        b.drain(&mut sink);
        delivered += sink.len();
        b.recycle(&mut sink);
    }
    delivered as f64 / start.elapsed().as_secs_f64()
}

/// Two vhost-user-net ports, each driven by the project's vhost-user front-end harness
/// (memfd guest memory, split rings): A transmits 64-byte frames in batches, B keeps its
/// rx ring full; frames/s that land in B's rx ring.
fn vhost_user_pps(duration: Duration) -> anyhow::Result<f64> {
    use vmbuild_tests::vhost_frontend::{FsFrontend, RawDesc, SLOTS, SLOT_BUF};
    use vswitch::vhost_user_net::VhostUserNetPort;
    const RXQ: usize = 0;
    const TXQ: usize = 1;
    const WRITE: u16 = 2;
    let sw = Switch::new(SwitchConfig::default());
    let dir = tempfile::tempdir()?;
    let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let _pa = VhostUserNetPort::listen(&sw, &sa, VlanMode::Access { vlan: 1 })?;
    let _pb = VhostUserNetPort::listen(&sw, &sb, VlanMode::Access { vlan: 1 })?;
    let mut a = FsFrontend::connect(&sa)?;
    let mut b = FsFrontend::connect(&sb)?;
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&[2, 0, 0, 0, 0, 0xb, 2, 0, 0, 0, 0, 0xa, 0x08, 0x00]);
    frame.resize(12 + 64, 0);
    let post_rx = |b: &mut FsFrontend, slot: u16| -> anyhow::Result<()> {
        let addr = FsFrontend::slot_buffer(slot) + SLOT_BUF;
        b.submit_raw(
            RXQ,
            slot,
            &[RawDesc {
                addr,
                len: 2048,
                flags: WRITE,
                next: 0,
            }],
        )?;
        Ok(())
    };
    for slot in 0..SLOTS {
        post_rx(&mut b, slot)?;
    }
    b.kick(RXQ)?;
    // The switch only learns the rx ring when the guest kicks it; give it a moment.
    std::thread::sleep(Duration::from_millis(50));
    let start = Instant::now();
    let mut delivered = 0usize;
    while start.elapsed() < duration {
        for slot in 0..SLOTS {
            a.submit(TXQ, slot, &frame, 0)?;
        }
        a.kick(TXQ)?;
        // Reap A's tx completions and B's deliveries; recycle B's buffers.
        let mut sent = 0;
        while sent < SLOTS as usize {
            sent += a.wait_used(TXQ, Duration::from_secs(5))?.len();
        }
        let deadline = Instant::now() + Duration::from_millis(200);
        let mut got = 0usize;
        while got < SLOTS as usize && Instant::now() < deadline {
            match b.wait_used(RXQ, Duration::from_millis(50)) {
                Ok(used) => {
                    for u in &used {
                        post_rx(&mut b, (u.id / 4) as u16)?;
                    }
                    got += used.len();
                }
                Err(_) => break,
            }
        }
        b.kick(RXQ)?;
        delivered += got;
    }
    Ok(delivered as f64 / start.elapsed().as_secs_f64())
}
