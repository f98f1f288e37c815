//! The 9P2000.L server (virtiofs-bridge's `ninep`, read-only store) against diod (Debian's
//! 9P2000.L server), side by side in one run, both over loopback TCP, driven by the same
//! small 9p client (one request in flight, as one guest thread):
//! - metadata: for each of 2,000 files, walk to it, getattr, clunk;
//! - 4 KiB reads at scattered offsets of one open file;
//! - sequential read of a 64 MiB file with msize 128 KiB.
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
use vmbuild_benches::report::{markdown, median, Row};

#[derive(Parser, Debug)]
#[command(about = "9p server vs diod over loopback TCP")]
struct Args {
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, default_value = "/var/tmp/vmbuild-ninep-bench")]
    workdir: PathBuf,
}

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
            msize: 128 << 10,
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

    // Ours: served over TCP by this process, one thread per connection.
    let server = Arc::new(NinepServer::new(&ShareConfig::store(&store))?);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let ours_port = listener.local_addr()?.port();
    ninep::serve_tcp(listener, server);
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
    let aname = store.display().to_string();

    // (workload, unit, vmbuild samples, diod samples); higher is better for all.
    type Samples = (&'static str, &'static str, Vec<f64>, Vec<f64>);
    let mut rows: Vec<Samples> = vec![
        ("LOOKUP: walk + getattr + clunk", "ops/s", vec![], vec![]),
        ("4 KiB read", "ops/s", vec![], vec![]),
        ("64 MiB sequential read", "MB/s", vec![], vec![]),
    ];
    for round in 0..args.rounds {
        eprintln!("[ninep-bench] round {}", round + 1);
        for (who, port) in [(0, ours_port), (1, diod_port)] {
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
    println!(
        "### 9P2000.L over loopback TCP, one request in flight (median of {} rounds)\n",
        args.rounds
    );
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
