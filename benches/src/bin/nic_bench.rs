//! Packets per second from a guest NIC into the switch, side by side in one run:
//! - **in-process**: the embedded VMM's virtio-net device (virtio-mmio), driven as a guest
//!   driver would (64 small frames per notify), its transmit queue feeding a `vswitch`
//!   in-process port by a function call;
//! - **tap**: the same frames entering the same switch through a tap port, as a VMM whose
//!   NIC is a tap (QEMU `-netdev tap`) hands them over: one write per frame into the
//!   kernel (an AF_PACKET socket transmitting on the tap), the switch reading the tap.
//!
//! Both count frames arriving at a third, in-process port. 64-byte frames.
//!
//! Reproduce (root): `cargo build --release -p vmbuild-benches && target/release/nic-bench`

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

use anyhow::{bail, Context};
use clap::Parser;
use embedded_vmm::memory::GuestRam;
use embedded_vmm::virtio::mmio::MmioTransport;
use embedded_vmm::virtio::net::NetDevice;
use embedded_vmm::virtio::{
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};
use vmbuild::bench::sample::{write_samples, Sample};
use vmbuild_benches::report::{markdown, median, Row};
use vswitch::tap::{Tap, TapPort};
use vswitch::{InProcessPort, Switch, SwitchConfig, VlanMode};

#[derive(Parser, Debug)]
#[command(about = "guest NIC → switch: in-process port vs tap, packets/s")]
struct Args {
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per measurement
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Write every measurement as `vmbuild bench` samples (JSON) here
    #[arg(long, value_name = "FILE")]
    samples: Option<std::path::PathBuf>,
}

const IN_PROCESS: &str = "virtio-net → in-process port";
const TAP: &str = "tap port";
const WORKLOAD: &str = "frames into the switch";

const SRC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
const DST: [u8; 6] = [2, 0, 0, 0, 0, 2];
const QSIZE: u16 = 256;
const BATCH: u16 = 64;

fn frame() -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&DST);
    f.extend_from_slice(&SRC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.resize(64, 0x5a);
    f
}

/// Counts what reaches `sink` until told to stop.
fn counter(
    sink: Arc<InProcessPort>,
    stop: Arc<AtomicBool>,
) -> (Arc<AtomicU64>, std::thread::JoinHandle<()>) {
    let n = Arc::new(AtomicU64::new(0));
    let count = n.clone();
    let t = std::thread::spawn(move || {
        let mut batch = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            batch.clear();
            sink.drain(&mut batch);
            if batch.is_empty() {
                if let Some(_f) = sink.recv_timeout(Duration::from_millis(10)) {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                count.fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
        }
    });
    (n, t)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let secs = Duration::from_secs_f64(args.seconds);
    let (mut inproc, mut tap) = (Vec::new(), Vec::new());
    let mut samples = Vec::new();
    for round in 0..args.rounds {
        eprintln!("[nic-bench] round {}", round + 1);
        inproc.push(in_process(secs)?);
        tap.push(through_tap(secs)?);
        for (contender, v) in [(IN_PROCESS, inproc[round]), (TAP, tap[round])] {
            samples.push(Sample::new(WORKLOAD, contender, "Mpps", true, round + 1, v));
        }
    }
    println!(
        "### Guest NIC → switch, 64-byte frames (median of {} rounds)\n",
        args.rounds
    );
    println!(
        "{}",
        markdown(
            &[IN_PROCESS, TAP],
            &[Row {
                workload: WORKLOAD.into(),
                unit: "Mpps",
                higher_is_better: true,
                values: vec![median(inproc), median(tap)],
            }]
        )
    );
    if let Some(path) = &args.samples {
        write_samples(path, &samples)?;
    }
    Ok(())
}

fn in_process(secs: Duration) -> anyhow::Result<f64> {
    let switch = Switch::new(SwitchConfig::default());
    let sink = Arc::new(InProcessPort::attach_with_capacity(
        &switch,
        "sink",
        VlanMode::default(),
        1 << 16,
    ));
    let ram = Arc::new(GuestRam::new(8 << 20)?);
    let nic = NetDevice::new(&switch, "vm", SRC, VlanMode::default());
    let mut t = MmioTransport::new(Box::new(nic), ram.memory().clone(), None);
    let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
    // Bring the device up with the TX queue (1) at 64 KiB.
    let (desc, avail, used) = (0x10000u64, 0x11000u64, 0x12000u64);
    w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    w(&mut t, 0x24, 1);
    w(&mut t, 0x20, 1);
    w(
        &mut t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    for q in 0..2u32 {
        let base = u64::from(q) * 0x10000;
        w(&mut t, 0x30, q);
        w(&mut t, 0x38, u32::from(QSIZE));
        w(&mut t, 0x80, (desc + base) as u32);
        w(&mut t, 0x90, (avail + base) as u32);
        w(&mut t, 0xa0, (used + base) as u32);
        w(&mut t, 0x44, 1);
    }
    w(
        &mut t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
    if t.status() & STATUS_DRIVER_OK == 0 {
        bail!("the NIC did not come up");
    }
    // TX queue is queue 1: its rings are at +64 KiB. One buffer per descriptor, written
    // once: a header and the frame.
    let (desc, avail) = (desc + 0x10000, avail + 0x10000);
    let mut buf = vec![0u8; 12];
    buf.extend_from_slice(&frame());
    for i in 0..QSIZE {
        let addr = 0x100000 + u64::from(i) * 128;
        ram.write_slice(&buf, GuestAddress(addr))?;
        let mut d = Vec::new();
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&(buf.len() as u32).to_le_bytes());
        d.extend_from_slice(&0u16.to_le_bytes());
        d.extend_from_slice(&0u16.to_le_bytes());
        ram.write_slice(&d, GuestAddress(desc + 16 * u64::from(i)))?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (count, counter_thread) = counter(sink, stop.clone());
    let start = Instant::now();
    let mut next: u16 = 0;
    while start.elapsed() < secs {
        for _ in 0..BATCH {
            let head = next % QSIZE;
            ram.write_slice(
                &head.to_le_bytes(),
                GuestAddress(avail + 4 + 2 * u64::from(head)),
            )?;
            next = next.wrapping_add(1);
        }
        ram.write_slice(&next.to_le_bytes(), GuestAddress(avail + 2))?;
        w(&mut t, 0x50, 1);
    }
    let elapsed = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    counter_thread.join().unwrap();
    Ok(count.load(Ordering::Relaxed) as f64 / elapsed / 1e6)
}

fn through_tap(secs: Duration) -> anyhow::Result<f64> {
    let switch = Switch::new(SwitchConfig::default());
    let sink = Arc::new(InProcessPort::attach_with_capacity(
        &switch,
        "sink",
        VlanMode::default(),
        1 << 16,
    ));
    let name = "vmbnicb0";
    let tap = Tap::open_with(name, false).context("opening a tap (run as root)")?;
    let _port = TapPort::attach(&switch, tap, VlanMode::default())?;
    let up = std::process::Command::new("ip")
        .args(["link", "set", name, "up"])
        .status()?;
    if !up.success() {
        bail!("ip link set {name} up failed");
    }
    // SAFETY: plain socket(2)/bind(2) calls with valid arguments; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
    }
    let ifindex = unsafe { libc::if_nametoindex(c"vmbnicb0".as_ptr()) } as i32;
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex;
    // SAFETY: binding our socket to a sockaddr_ll we filled in.
    let r = unsafe {
        libc::bind(
            fd,
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if r < 0 {
        bail!("binding to {name}: {}", std::io::Error::last_os_error());
    }
    let f = frame();
    let stop = Arc::new(AtomicBool::new(false));
    let (count, counter_thread) = counter(sink, stop.clone());
    let start = Instant::now();
    while start.elapsed() < secs {
        for _ in 0..BATCH {
            // SAFETY: sending our buffer on our socket.
            unsafe { libc::send(fd, f.as_ptr().cast(), f.len(), 0) };
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    counter_thread.join().unwrap();
    // SAFETY: closing the socket we opened.
    unsafe { libc::close(fd) };
    Ok(count.load(Ordering::Relaxed) as f64 / elapsed / 1e6)
}
