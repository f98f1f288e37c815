//! `vmbuild run --vmm embedded`: the same run as under QEMU (the guest kit, the command in
//! the initramfs, the store, xchg and extra shares as virtio-fs, stdout and stderr on
//! ttyS1 and ttyS2, the status on the console), in the embedded KVM VMM: no QEMU process,
//! the shares answered in this process with no socket.
//!
//! Only where the embedded VMM boots Linux (the CLI checks the probe); one vCPU; no disks
//! or `--shell`. A NIC is an in-process port of a vswitch (the lifecycle's embedded
//! controller on its build's segment).

use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use virtiofs_bridge::InProcessShare;
use vswitch::VlanMode;

use crate::kvm::linux::{LinuxConfig, LinuxEnd, LinuxVm};
use crate::kvm::uart::Transcript;
use crate::kvm::virtio::fs::FsDevice;
use crate::kvm::virtio::net::NetDevice;
use crate::kvm::virtio::VirtioDevice;
use crate::runtime_dir::RuntimeDir;
use crate::workflow::guest_script::{CommandIo, GuestCommand};
use crate::workflow::initrd::{self, GUEST_SCRIPT_PATH};
use crate::workflow::run::{guest_shares, note_console_line, NicLink, RunEnd, RunOutcome, RunSpec};
use crate::workflow::timings::Marks;

/// How often the loop looks at the console, the deadline and signals.
const SLICE: Duration = Duration::from_millis(100);
/// How long a guest that reported its status may take to power off.
const EXIT_GRACE: Duration = Duration::from_secs(2);

pub fn run_embedded(spec: &RunSpec, signals: Receiver<()>) -> anyhow::Result<RunOutcome> {
    let mut marks = Marks {
        start: Some(Instant::now()),
        ..Marks::default()
    };
    anyhow::ensure!(
        !spec.shell && spec.disk.is_none() && spec.cpus == 1,
        "the embedded VMM runs a command on one vCPU, without disks or --shell"
    );
    let rundir = RuntimeDir::create("run")?;
    let (xchg, _xchg_temp) = match &spec.xchg {
        Some(dir) => (dir.clone(), None),
        None => {
            let dir = tempfile::Builder::new().prefix("vmbuild-xchg-").tempdir()?;
            (dir.path().to_owned(), Some(dir))
        }
    };
    let shares = guest_shares(spec, &xchg);
    let mut append: Vec<String> = [
        "console=ttyS0",
        "reboot=k",
        "panic=-1",
        "quiet",
        "cryptomgr.notests",
        "8250.nr_uarts=3",
        "vmbuild.quiet",
        // No virtio-rng here: the CPU's RDRAND seeds the CRNG at once (an SSH client
        // would otherwise block on it).
        "random.trust_cpu=on",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    if let Some(nic) = &spec.nic {
        let NicLink::InProcess(switch) = &nic.link else {
            anyhow::bail!("the embedded VMM's NIC is an in-process switch port, not a socket");
        };
        let mac = parse_mac(&nic.mac)
            .with_context(|| format!("{:?} is not a MAC address (aa:bb:cc:dd:ee:ff)", nic.mac))?;
        devices.push(Box::new(NetDevice::new(
            switch,
            "embedded-guest",
            mac,
            VlanMode::default(),
        )));
    }
    for (share, mount) in &shares {
        let served = Arc::new(
            InProcessShare::new(share).with_context(|| format!("serving share {}", share.tag))?,
        );
        devices.push(Box::new(FsDevice::new(served)?));
        let ro = if share.read_only { ":ro" } else { "" };
        append.push(format!("vmbuild.mount=virtiofs:{}:{mount}{ro}", share.tag));
    }
    append.push(format!("vmbuild.cmd={GUEST_SCRIPT_PATH}"));
    if let Some(extra) = &spec.append {
        append.push(extra.clone());
    }
    let script = GuestCommand {
        argv: &spec.argv,
        env: &spec.env,
        cwd: spec.cwd.as_deref(),
        io: CommandIo::SerialPorts,
    }
    .script();
    let files: [(&str, u32, &[u8]); 1] = [(GUEST_SCRIPT_PATH, 0o755, &script)];
    let initrd = initrd::with_files(&spec.initrd, rundir.path(), &files)
        .context("writing the run's initrd")?;

    let log: Option<Box<dyn std::io::Write + Send>> = match &spec.log {
        Some(p) => {
            Some(Box::new(std::fs::File::create(p).with_context(|| {
                format!("creating the console log {}", p.display())
            })?))
        }
        None => None,
    };
    let lines = Arc::new(Mutex::new(Vec::new()));
    let console_sink: Option<Box<dyn std::io::Write + Send>> = Some(Box::new(ConsoleLines {
        partial: Vec::new(),
        lines: lines.clone(),
        log,
    }));
    let console = Transcript::new(console_sink);
    let stdout = Transcript::new(Some(Box::new(std::io::stdout())));
    let stderr = Transcript::new(Some(Box::new(std::io::stderr())));
    let cmdline = append.join(" ");
    let mut vm = LinuxVm::new(
        &LinuxConfig {
            kernel: &spec.kernel,
            initrd: Some(&initrd),
            cmdline: &cmdline,
            memory_mib: spec.memory_mib as usize,
        },
        console.clone(),
        vec![stdout, stderr],
        devices,
    )?;
    marks.vmm_ready = Some(Instant::now());

    let deadline = spec.timeout.map(|t| Instant::now() + t);
    let mut status: Option<i32> = None;
    let mut reported: Option<Instant> = None;
    let end = loop {
        let end = vm.run(SLICE);
        for (line, at) in lines.lock().unwrap().drain(..) {
            note_console_line(&mut marks, &mut status, &line, at);
        }
        // The status is out: the guest powers off next. One that does not (a kernel
        // without ACPI power-off halts with interrupts off, which never leaves KVM_RUN)
        // is stopped after a grace period rather than held until the timeout.
        if reported.is_none() && status.is_some() {
            reported = Some(Instant::now());
        }
        if end == LinuxEnd::TimedOut && reported.is_some_and(|at| at.elapsed() > EXIT_GRACE) {
            tracing::debug!("the guest reported its status but did not power off: stopped");
            break LinuxEnd::PowerOff;
        }
        if end != LinuxEnd::TimedOut {
            break end;
        }
        // A closed channel means stop too, as under QEMU: a build's controller thread
        // that goes away must not leave this VM running.
        if !matches!(signals.try_recv(), Err(TryRecvError::Empty)) {
            marks.exited = Some(Instant::now());
            marks.done = Some(Instant::now());
            return Ok(RunOutcome {
                end: RunEnd::Interrupted,
                marks,
            });
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            marks.exited = Some(Instant::now());
            marks.done = Some(Instant::now());
            return Ok(RunOutcome {
                end: RunEnd::TimedOut(spec.timeout.unwrap_or_default()),
                marks,
            });
        }
    };
    marks.exited = Some(Instant::now());
    drop(vm);
    drop(rundir);
    marks.done = Some(Instant::now());
    for (line, at) in lines.lock().unwrap().drain(..) {
        note_console_line(&mut marks, &mut status, &line, at);
    }
    let text = console.text();
    let end = match (status, end) {
        (Some(code), _) => RunEnd::Exited(code),
        (None, end) => RunEnd::NoExitCode {
            why: match end {
                LinuxEnd::Failed(why) => format!("the embedded VMM stopped the guest: {why}"),
                LinuxEnd::PowerOff => "the guest powered off before its command finished".into(),
                _ => "the guest reset before its command finished".into(),
            },
            console_tail: tail(&text, 40),
        },
    };
    Ok(RunOutcome { end, marks })
}

/// Console lines as they arrive, with the moment each was complete (the run's phases),
/// copied on to the log if there is one.
struct ConsoleLines {
    partial: Vec<u8>,
    lines: Arc<Mutex<Vec<(String, Instant)>>>,
    log: Option<Box<dyn std::io::Write + Send>>,
}

/// A console line longer than this is cut (a guest must not grow host memory at will).
const MAX_LINE: usize = 4096;

impl std::io::Write for ConsoleLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(log) = &mut self.log {
            let _ = log.write_all(buf);
        }
        for &b in buf {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.partial)
                    .trim_end_matches('\r')
                    .to_owned();
                self.partial.clear();
                self.lines.lock().unwrap().push((line, Instant::now()));
            } else if self.partial.len() < MAX_LINE {
                self.partial.push(b);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.log {
            Some(log) => log.flush(),
            None => Ok(()),
        }
    }
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The kernel the embedded VMM boots: an ELF vmlinux (PVH), not a bzImage.
pub fn check_kernel(path: &std::path::Path) -> Result<(), String> {
    let mut magic = [0u8; 4];
    let ok = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok();
    if !ok || magic != *b"\x7fELF" {
        return Err(format!(
            "{} is not an ELF vmlinux: the embedded VMM boots the uncompressed kernel (the guest kit's vmlinux)",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn console_lines_are_split_and_timed() {
        use std::io::Write;
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut c = super::ConsoleLines {
            partial: Vec::new(),
            lines: lines.clone(),
            log: None,
        };
        c.write_all(b"vmbuild-phase=init\r\nvmbuild-ex").unwrap();
        c.write_all(b"it=12\n").unwrap();
        c.write_all(&vec![b'x'; 10_000]).unwrap();
        c.write_all(b"\n").unwrap();
        let got: Vec<String> = lines
            .lock()
            .unwrap()
            .iter()
            .map(|(l, _)| l.clone())
            .collect();
        assert_eq!(got[..2], ["vmbuild-phase=init", "vmbuild-exit=12"]);
        assert_eq!(got[2].len(), super::MAX_LINE);
    }

    #[test]
    fn mac_addresses_parse_strictly() {
        assert_eq!(
            super::parse_mac("52:54:00:0a:Bc:ff"),
            Some([0x52, 0x54, 0, 0x0a, 0xbc, 0xff])
        );
        for bad in [
            "",
            "52:54:00:0a:bc",
            "52:54:00:0a:bc:ff:00",
            "5:54:00:0a:bc:ff",
            "zz:54:00:0a:bc:ff",
        ] {
            assert_eq!(super::parse_mac(bad), None, "{bad}");
        }
    }
}
