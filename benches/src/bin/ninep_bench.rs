//! The 9P2000.L server (virtiofs-bridge's `ninep`) against diod (Debian's 9P2000.L server),
//! side by side in one run, both over loopback TCP.
//!
//! Reads of a read-only store, driven by the same small 9p client (one request in flight,
//! as one guest thread):
//! - metadata: for each of 2,000 files, walk to it, getattr, clunk;
//! - 4 KiB reads at scattered offsets of one open file;
//! - sequential read of a 64 MiB file with msize 64 KiB (diod's largest) for both.
//!
//! Writes to a read-write export, by a real client: the guest kit's Linux (QEMU, TCG,
//! user-mode network) mounts both servers with `trans=tcp,msize=65536` (diod's largest)
//! and, alternating between them, times with /proc/uptime:
//! - a 32 MiB sequential write (`dd bs=1M conv=fsync`);
//! - creating and writing 200 files of 1 KiB (the shell's own `echo`, no fork per file).
//!
//! Skipped, with the reason, where no guest kit is built (`--no-guest` skips it too).
//!
//! Reproduce (root): `cargo build --release -p vmbuild-benches && target/release/ninep-bench`

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use virtiofs_bridge::ninep::{self, NinepServer};
use virtiofs_bridge::ShareConfig;
use vmbuild::bench::sample::{write_samples, Sample};
use vmbuild_benches::report::{markdown, median, Row};
use vmbuild_tests::guest::{GuestKit, GuestShare, GuestVm};

#[derive(Parser, Debug)]
#[command(about = "9p server vs diod over loopback TCP")]
struct Args {
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, default_value = "/var/tmp/vmbuild-ninep-bench")]
    workdir: PathBuf,
    /// Skip the write workloads (they boot a Linux guest under QEMU).
    #[arg(long)]
    no_guest: bool,
    /// Write every measurement as `vmbuild bench` samples (JSON) here
    #[arg(long, value_name = "FILE")]
    samples: Option<PathBuf>,
}

/// (workload, unit, vmbuild samples, diod samples); higher is better for all.
type Samples = (&'static str, &'static str, Vec<f64>, Vec<f64>);

struct Client {
    s: TcpStream,
    tag: u16,
    msize: u32,
}

fn str9(v: &[u8]) -> Vec<u8> {
    let mut o = (v.len() as u16).to_le_bytes().to_vec();
    o.extend_from_slice(v);
    o
}

impl Client {
    fn connect(port: u16, aname: &str) -> anyhow::Result<Client> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        let mut c = Client {
            s,
            tag: 0,
            // diod's largest, asked of both servers: equal message sizes (audit B5).
            msize: 64 << 10,
        };
        let mut v = c.msize.to_le_bytes().to_vec();
        v.extend(str9(b"9P2000.L"));
        let r = c.call(100, &v)?;
        c.msize = u32::from_le_bytes(r[..4].try_into()?);
        let mut a = 0u32.to_le_bytes().to_vec();
        a.extend_from_slice(&u32::MAX.to_le_bytes());
        a.extend(str9(b"root"));
        a.extend(str9(aname.as_bytes()));
        a.extend_from_slice(&0u32.to_le_bytes());
        c.call(104, &a)?;
        Ok(c)
    }

    fn call(&mut self, kind: u8, body: &[u8]) -> anyhow::Result<Vec<u8>> {
        self.tag = self.tag.wrapping_add(1) % 0xfffe;
        let mut m = ((7 + body.len()) as u32).to_le_bytes().to_vec();
        m.push(kind);
        m.extend_from_slice(&self.tag.to_le_bytes());
        m.extend_from_slice(body);
        self.s.write_all(&m)?;
        let mut size = [0u8; 4];
        self.s.read_exact(&mut size)?;
        let n = u32::from_le_bytes(size) as usize;
        let mut rest = vec![0u8; n - 4];
        self.s.read_exact(&mut rest)?;
        if rest[0] == 7 {
            bail!("9p error {}", u32::from_le_bytes(rest[3..7].try_into()?));
        }
        Ok(rest[3..].to_vec())
    }

    fn walk(&mut self, newfid: u32, names: &[&[u8]]) -> anyhow::Result<()> {
        let mut b = 0u32.to_le_bytes().to_vec();
        b.extend_from_slice(&newfid.to_le_bytes());
        b.extend_from_slice(&(names.len() as u16).to_le_bytes());
        for n in names {
            b.extend(str9(n));
        }
        self.call(110, &b).map(drop)
    }

    fn open(&mut self, fid: u32) -> anyhow::Result<()> {
        let mut b = fid.to_le_bytes().to_vec();
        b.extend_from_slice(&0u32.to_le_bytes());
        self.call(12, &b).map(drop)
    }

    fn read(&mut self, fid: u32, offset: u64, count: u32) -> anyhow::Result<usize> {
        let mut b = fid.to_le_bytes().to_vec();
        b.extend_from_slice(&offset.to_le_bytes());
        b.extend_from_slice(&count.to_le_bytes());
        let r = self.call(116, &b)?;
        Ok(u32::from_le_bytes(r[..4].try_into()?) as usize)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = std::fs::remove_dir_all(&args.workdir);
    let store = args.workdir.join("store");
    std::fs::create_dir_all(store.join("files"))?;
    for i in 0..2000 {
        std::fs::write(
            store.join(format!("files/f{i:04}")),
            vec![b'a'; 100 + i % 3000],
        )?;
    }
    std::fs::write(store.join("big"), vec![0x5au8; 64 << 20])?;
    // Read-write exports for the guest's writes, one per server, on the same file system.
    let xchg_ours = args.workdir.join("xchg-ours");
    let xchg_diod = args.workdir.join("xchg-diod");
    std::fs::create_dir_all(&xchg_ours)?;
    std::fs::create_dir_all(&xchg_diod)?;

    // Ours: served over TCP by this process, one thread per connection.
    let server = Arc::new(NinepServer::new(&ShareConfig::store(&store))?);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let ours_port = listener.local_addr()?.port();
    ninep::serve_tcp(listener, server);
    let rw_server = Arc::new(NinepServer::new(&ShareConfig::xchg(&xchg_ours))?);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let ours_rw_port = listener.local_addr()?.port();
    ninep::serve_tcp(listener, rw_server);
    // diod, exporting the same directory.
    let diod_port = free_port()?;
    let _diod = Daemon(
        Command::new("diod")
            .args(["-f", "-n", "-N", "-L", "stderr", "-l"])
            .arg(format!("127.0.0.1:{diod_port}"))
            .arg("-e")
            .arg(&store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting diod (apt-get install diod)")?,
    );
    wait_for_port(diod_port)?;
    // And diod exporting its read-write directory to the guest. Without -N: a Linux
    // client's first attach names the user ("nobody", no uid), which diod must look up.
    let diod_rw_port = free_port()?;
    let _diod_rw = Daemon(
        Command::new("diod")
            .args(["-f", "-n", "-L", "stderr", "-l"])
            .arg(format!("127.0.0.1:{diod_rw_port}"))
            .arg("-e")
            .arg(&xchg_diod)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting diod (apt-get install diod)")?,
    );
    wait_for_port(diod_rw_port)?;
    let aname = store.display().to_string();

    let mut rows: Vec<Samples> = vec![
        ("LOOKUP: walk + getattr + clunk", "ops/s", vec![], vec![]),
        ("4 KiB read", "ops/s", vec![], vec![]),
        ("64 MiB sequential read", "MB/s", vec![], vec![]),
    ];
    for round in 0..args.rounds {
        eprintln!("[ninep-bench] round {}", round + 1);
        // Alternate which goes first, so that neither always runs on a warmer host.
        let mut order = [(0, ours_port), (1, diod_port)];
        if round % 2 == 1 {
            order.reverse();
        }
        for (who, port) in order {
            let mut c = Client::connect(port, &aname)?;
            let r = workloads(&mut c)?;
            for (i, v) in r.into_iter().enumerate() {
                if who == 0 {
                    rows[i].2.push(v);
                } else {
                    rows[i].3.push(v);
                }
            }
        }
    }
    if args.no_guest {
        eprintln!("[ninep-bench] write workloads skipped (--no-guest)");
    } else {
        match GuestKit::locate() {
            Ok(kit) => rows.extend(guest_writes(
                kit,
                args.rounds,
                ours_rw_port,
                diod_rw_port,
                &xchg_diod,
            )?),
            Err(e) => eprintln!("[ninep-bench] write workloads skipped: {e}"),
        }
    }
    println!(
        "### 9P2000.L over loopback TCP (median of {} rounds)\n",
        args.rounds
    );
    if let Some(path) = &args.samples {
        let mut samples = Vec::new();
        for (w, unit, ours, diod) in &rows {
            for (contender, values) in [("vmbuild 9p", ours), ("diod", diod)] {
                for (round, v) in values.iter().enumerate() {
                    samples.push(Sample::new(*w, contender, unit, true, round + 1, *v));
                }
            }
        }
        write_samples(path, &samples)?;
    }
    let table: Vec<Row> = rows
        .into_iter()
        .map(|(w, unit, ours, diod)| Row {
            workload: w.into(),
            unit,
            higher_is_better: true,
            values: vec![median(ours), median(diod)],
        })
        .collect();
    println!("{}", markdown(&["vmbuild 9p", "diod"], &table));
    let _ = std::fs::remove_dir_all(&args.workdir);
    Ok(())
}

/// The guest's writes to both servers, alternating, `rounds` times each, in one boot.
fn guest_writes(
    kit: GuestKit,
    rounds: usize,
    ours_port: u16,
    diod_port: u16,
    diod_export: &std::path::Path,
) -> anyhow::Result<Vec<Samples>> {
    eprintln!("[ninep-bench] guest writes ({rounds} rounds, QEMU TCG)");
    let ctl = tempfile::tempdir()?;
    std::fs::write(
        ctl.path().join("run.sh"),
        format!(
            r#"set -e
modprobe 9pnet_fd 2>/dev/null || insmod $(awk '$1=="9pnet_fd"{{print $2}}' /etc/vmbuild/modules)
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
o=trans=tcp,version=9p2000.L,msize=65536
mkdir -p /mnt/ours /mnt/diod
mount -t 9p -o $o,port={ours_port} 10.0.2.2 /mnt/ours
mount -t 9p -o $o,port={diod_port},aname={diod} 10.0.2.2 /mnt/diod
blob=$(head -c 1023 /dev/zero | tr '\0' x)
for r in $(seq {rounds}); do
  for who in ours diod; do
    d=/mnt/$who/r$r
    mkdir -p $d/small
    read t0 _ < /proc/uptime
    dd if=/dev/zero of=$d/seq bs=1M count=32 conv=fsync 2>/dev/null
    read t1 _ < /proc/uptime
    i=0
    while [ $i -lt 200 ]; do echo "$blob" > $d/small/f$i; i=$((i+1)); done
    read t2 _ < /proc/uptime
    [ $(cat $d/small/f199 | wc -c) = 1024 ]
    [ $(wc -c < $d/seq) = 33554432 ]
    echo "$who $t0 $t1 $t2" >> /ctl/times
    rm -r $d
  done
done
umount /mnt/ours
umount /mnt/diod
"#,
            diod = diod_export.display(),
        ),
    )?;
    let mut vm = GuestVm::new(kit, "/ctl/run.sh").share(GuestShare::NineP {
        dir: ctl.path().to_owned(),
        tag: "ctl".into(),
        mount: "/ctl".into(),
        options: String::new(),
    });
    vm.user_net = true;
    vm.exit_file = Some("/ctl/status".into());
    vm.timeout = Duration::from_secs(300 + 300 * rounds as u64);
    let out = vm.run()?;
    if out.exit != Some(0) {
        bail!(
            "guest write workload failed ({:?}):\n{}",
            out.exit,
            vmbuild_tests::guest::tail(&out.console, 30)
        );
    }
    let mut rows: Vec<Samples> = vec![
        (
            "guest: 32 MiB sequential write (dd)",
            "MB/s",
            vec![],
            vec![],
        ),
        (
            "guest: create + write 200 files of 1 KiB",
            "files/s",
            vec![],
            vec![],
        ),
    ];
    for line in std::fs::read_to_string(ctl.path().join("times"))?.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [who, t0, t1, t2] = f[..] else {
            bail!("bad line from the guest: {line}");
        };
        let (t0, t1, t2): (f64, f64, f64) = (t0.parse()?, t1.parse()?, t2.parse()?);
        // /proc/uptime counts in hundredths: never divide by zero.
        let seq = (32u64 << 20) as f64 / 1e6 / (t1 - t0).max(0.01);
        let files = 200.0 / (t2 - t1).max(0.01);
        for (row, v) in rows.iter_mut().zip([seq, files]) {
            if who == "ours" {
                row.2.push(v);
            } else {
                row.3.push(v);
            }
        }
    }
    Ok(rows)
}

fn workloads(c: &mut Client) -> anyhow::Result<[f64; 3]> {
    let t = Instant::now();
    for i in 0..2000 {
        let name = format!("f{i:04}");
        c.walk(10, &[b"files", name.as_bytes()])?;
        let mut g = 10u32.to_le_bytes().to_vec();
        g.extend_from_slice(&0x7ffu64.to_le_bytes());
        c.call(24, &g)?;
        c.call(120, &10u32.to_le_bytes())?;
    }
    let meta = 2000.0 / t.elapsed().as_secs_f64();

    c.walk(11, &[b"big"])?;
    c.open(11)?;
    let t = Instant::now();
    let n = 20_000u64;
    for i in 0..n {
        let offset = (i * 7919 % 16_000) * 4096;
        c.read(11, offset, 4096)?;
    }
    let small = n as f64 / t.elapsed().as_secs_f64();

    let chunk = c.msize - 24;
    let t = Instant::now();
    let mut offset = 0u64;
    loop {
        let got = c.read(11, offset, chunk)?;
        if got == 0 {
            break;
        }
        offset += got as u64;
    }
    let seq = offset as f64 / t.elapsed().as_secs_f64() / 1e6;
    c.call(120, &11u32.to_le_bytes())?;
    Ok([meta, small, seq])
}

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_for_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("diod did not listen on {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
