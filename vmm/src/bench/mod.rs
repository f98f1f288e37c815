//! `vmbuild bench`: the suites, their engines and peers, the JSON report and the plots.

pub mod engine;
pub mod plot;
pub mod sample;
pub mod suite;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::qemu::QemuBinary;

/// A peer or suite that did not run, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub what: String,
    pub why: String,
}

/// What `vmbuild bench --json` writes: every sample, and what they were measured on.
#[derive(Debug, Serialize)]
pub struct Report {
    pub vmbuild_version: &'static str,
    pub started_at: String,
    pub command: Vec<String>,
    pub machine: BTreeMap<&'static str, serde_json::Value>,
    pub versions: BTreeMap<&'static str, Option<String>>,
    pub skipped: Vec<Skipped>,
    pub suites: Vec<engine::EngineRun>,
}

impl Report {
    pub fn new(qemu: &QemuBinary) -> Report {
        let (a, b, c) = qemu.version;
        let mut versions = BTreeMap::new();
        versions.insert(
            "qemu",
            Some(format!("{a}.{b}.{c} ({})", qemu.path.display())),
        );
        versions.insert("virtiofsd", suite::version_of("virtiofsd", "--version"));
        versions.insert("vde_switch", vde_version());
        versions.insert("iperf3", suite::version_of("iperf3", "--version"));
        versions.insert("mmdebstrap", suite::version_of("mmdebstrap", "--version"));
        versions.insert(
            "guest_kernel",
            crate::guest::kit::GuestKit::locate()
                .ok()
                .and_then(|k| k.info())
                .and_then(|i| i.kernel_release),
        );
        Report {
            vmbuild_version: env!("CARGO_PKG_VERSION"),
            started_at: crate::snapshot::manifest::utc_now(),
            command: std::env::args().collect(),
            machine: machine(),
            versions,
            skipped: Vec::new(),
            suites: Vec::new(),
        }
    }
}

/// vde_switch has no --version; its package's version is what identifies it.
fn vde_version() -> Option<String> {
    suite::which("vde_switch")?;
    let out = std::process::Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "vde2"])
        .output()
        .ok()?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (!v.is_empty()).then(|| format!("vde2 {v}"))
}

/// The CPU, cores, memory and kernel of this host.
fn machine() -> BTreeMap<&'static str, serde_json::Value> {
    let mut m = BTreeMap::new();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned());
    m.insert("cpu", cpu.into());
    m.insert(
        "cpus",
        std::thread::available_parallelism()
            .map_or(0, |n| n.get())
            .into(),
    );
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok());
    m.insert("memory_mib", mem_kib.map(|k| k / 1024).into());
    let uname = nix::sys::utsname::uname().ok();
    m.insert(
        "kernel",
        uname
            .map(|u| u.release().to_string_lossy().into_owned())
            .into(),
    );
    m
}
