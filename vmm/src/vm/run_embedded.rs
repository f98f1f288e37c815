//! `vmbuild run --vmm embedded`: the same run as under QEMU (the guest kit, the command in
//! the initramfs, the store, xchg and extra shares as virtio-fs or, with
//! `--share-protocol 9p`, virtio-9p, stdout and stderr on
//! ttyS1 and ttyS2, the status on the console), in the embedded KVM VMM: no QEMU process,
//! the shares answered in this process with no socket.
//!
//! Only where the embedded VMM boots Linux (the CLI checks the probe); up to
//! `kvm::linux::MAX_VCPUS` vCPUs; no disks
//! or `--shell`. A NIC is an in-process port of a vswitch (the lifecycle's embedded
//! controller on its build's segment).

use std::path::Path;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use virtiofs_bridge::ninep::NinepServer;
use virtiofs_bridge::{InProcessShare, ShareConfig};
use vswitch::VlanMode;

use crate::guest::cmdline::{KernelCmdline, MountKind};
use crate::guest::initrd::GUEST_SCRIPT_PATH;
use crate::runtime_dir::RuntimeDir;
use crate::vm::embedded_guest::{drive, stop_requested, why_no_status, DriveEnd, GuestConsole};
use crate::vm::run::{
    command_initrd, guest_shares, xchg_dir, NicLink, RunEnd, RunOutcome, RunSpec, ShareProtocol,
};
use crate::vm::timings::Marks;
use embedded_vmm::linux::{LinuxConfig, LinuxVm};
use embedded_vmm::uart::Transcript;
use embedded_vmm::virtio::fs::FsDevice;
use embedded_vmm::virtio::net::NetDevice;
use embedded_vmm::virtio::ninep::NinepDevice;
use embedded_vmm::virtio::shm::ShmRegion;
use embedded_vmm::virtio::VirtioDevice;

/// What the embedded VMM is asked to run, in the terms of its limits.
pub struct EmbeddedFit<'a> {
    pub shell: bool,
    pub disk: bool,
    pub cpus: u32,
    pub memory_mib: u32,
    pub shares: usize,
    /// A distribution image (`--image`), one more virtio device.
    pub image: bool,
    pub kernel: &'a Path,
}

/// Whether the embedded VMM can run `fit`, or why not (in words for `vmbuild run`'s VMM
/// choice, which asks first, and for this back-end's own refusal).
pub fn fits(fit: &EmbeddedFit) -> Result<(), String> {
    use embedded_vmm::linux::{MAX_MEMORY_MIB, MAX_VCPUS, MAX_VIRTIO_DEVICES};
    if fit.shell || fit.disk {
        Err("it runs a command without --shell or --disk".to_owned())
    } else if fit.cpus == 0 {
        Err("a guest needs at least one vCPU".to_owned())
    } else if fit.cpus > u32::from(MAX_VCPUS) {
        Err(format!("it gives a guest at most {MAX_VCPUS} vCPUs"))
    } else if fit.memory_mib > MAX_MEMORY_MIB {
        Err(format!("it gives a guest at most {MAX_MEMORY_MIB} MiB"))
    } else if fit.shares + usize::from(fit.image) > MAX_VIRTIO_DEVICES {
        Err(format!(
            "it has room for {MAX_VIRTIO_DEVICES} shares and images together"
        ))
    } else {
        embedded_vmm::linux::check_kernel(fit.kernel)
    }
}

pub fn run_embedded(spec: &RunSpec, signals: Receiver<()>) -> anyhow::Result<RunOutcome> {
    let mut marks = Marks {
        vmm: Some("embedded"),
        start: Some(Instant::now()),
        ..Marks::default()
    };
    fits(&EmbeddedFit {
        shell: spec.shell,
        disk: spec.disk.is_some(),
        cpus: spec.cpus,
        memory_mib: spec.memory_mib,
        shares: usize::from(spec.store.is_some())
            + usize::from(!spec.no_xchg)
            + spec.extra_shares.len(),
        image: spec.image.is_some(),
        kernel: &spec.kernel,
    })
    .map_err(|why| anyhow::anyhow!("the embedded VMM cannot run this: {why}"))?;
    let vcpus = u8::try_from(spec.cpus).context("--cpus")?;
    let rundir = RuntimeDir::create_in(spec.runtime_dir.as_deref(), "run")?;
    let (xchg, _xchg_temp) = xchg_dir(spec.xchg.as_deref(), spec.keep_xchg)?;
    let shares = guest_shares(spec, &xchg);
    let (devices, cmdline) = devices(spec, &shares)?;
    let cmdline = cmdline
        .command(GUEST_SCRIPT_PATH)
        .extra(spec.append.as_deref())
        .to_string();
    let since_start = |what: &str| {
        let at = marks
            .start
            .map(|s| s.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        tracing::debug!("{at:.3} s: {what}");
    };
    since_start("devices ready");
    let initrd = command_initrd(spec, rundir.path())?;
    since_start("command initramfs written");

    let console = GuestConsole::logged_to(spec.log.as_deref())?;
    let stdout = Transcript::new(Some(Box::new(std::io::stdout())));
    let stderr = Transcript::new(Some(Box::new(std::io::stderr())));
    let mut vm = LinuxVm::new(
        &LinuxConfig {
            kernel: &spec.kernel,
            initrd: Some(&initrd),
            cmdline: &cmdline,
            memory_mib: spec.memory_mib as usize,
            vcpus,
        },
        console.transcript.clone(),
        vec![stdout, stderr],
        devices,
    )?;
    marks.vmm_ready = Some(Instant::now());

    let deadline = spec.timeout.map(|t| Instant::now() + t);
    let mut status: Option<i32> = None;
    let end = drive(
        &mut vm,
        &console,
        &mut marks,
        &mut status,
        &mut || stop_requested(&signals),
        deadline,
        None,
    );
    drop(vm);
    drop(rundir);
    marks.done = Some(Instant::now());
    let end = run_end(status, end, spec, &console);
    Ok(RunOutcome { end, marks })
}

/// A read-only share's DAX window (`--dax`). The guest maps files into it in 2 MiB
/// pieces and reclaims the least used when it is full; its page structures cost the
/// guest 1/64 of the window (4 MiB here), so it stays modest.
const DAX_WINDOW: u64 = 256 << 20;

/// The smallest file read through the DAX window (`dax=inode`: the share marks each file
/// at lookup). The guest maps DAX in 2 MiB ranges per file; a window of them spent on
/// small files is reclaimed over and over (BENCHMARKS.md: 2,400 small files read 0.61×
/// as fast with every file on DAX), and a small file costs one READ either way.
const DAX_MIN_FILE: u64 = 1 << 20;

/// The guest's virtio devices (the image first, so that it is /dev/vda; the NIC; one per
/// share, virtio-fs or virtio-9p) and the kernel command line that mounts the shares.
fn devices(
    spec: &RunSpec,
    shares: &[(ShareConfig, String)],
) -> anyhow::Result<(Vec<Box<dyn VirtioDevice>>, KernelCmdline)> {
    // No virtio-rng or PCI reset register here (see `KernelCmdline::embedded_vmm`).
    let mut cmdline = KernelCmdline::command_guest().embedded_vmm();
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    if let Some(image) = &spec.image {
        devices.push(Box::new(
            embedded_vmm::virtio::block::BlockDevice::open(image)
                .with_context(|| format!("the image {}", image.display()))?,
        ));
        cmdline = cmdline.image("/dev/vda");
    }
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
    for (share, mount) in shares {
        let serving = || format!("serving share {}", share.tag);
        let dax = spec.dax && share.read_only && spec.share_protocol == ShareProtocol::Virtiofs;
        let (device, kind): (Box<dyn VirtioDevice>, MountKind) = match spec.share_protocol {
            ShareProtocol::Virtiofs => {
                let share = ShareConfig {
                    dax_file_size: dax.then_some(DAX_MIN_FILE),
                    ..share.clone()
                };
                let device =
                    FsDevice::new(Arc::new(InProcessShare::new(&share).with_context(serving)?))?;
                let device = match dax {
                    true => device.with_dax(
                        ShmRegion::new(DAX_WINDOW)
                            .with_context(|| format!("a DAX window for share {}", share.tag))?,
                    ),
                    false => device,
                };
                (Box::new(device), MountKind::Virtiofs)
            }
            ShareProtocol::NineP => (
                Box::new(NinepDevice::new(Arc::new(
                    NinepServer::new(share).with_context(serving)?,
                ))),
                MountKind::NineP,
            ),
        };
        devices.push(device);
        let options = if dax { "dax=inode" } else { "" };
        cmdline = cmdline.mount_with(kind, &share.tag, mount, share.read_only, options);
    }
    Ok((devices, cmdline))
}

/// How the run ended, from the status the guest printed (if any) and how the vCPU loop
/// stopped.
fn run_end(status: Option<i32>, end: DriveEnd, spec: &RunSpec, console: &GuestConsole) -> RunEnd {
    match (status, end) {
        (_, DriveEnd::Stopped) => RunEnd::Interrupted,
        (_, DriveEnd::DeadlinePassed | DriveEnd::Reached) => {
            RunEnd::TimedOut(spec.timeout.unwrap_or_default())
        }
        (Some(code), DriveEnd::Guest(_) | DriveEnd::ReportedButStayed) => RunEnd::Exited(code),
        (None, DriveEnd::Guest(end)) => RunEnd::NoExitCode {
            why: why_no_status(&end),
            console_tail: console.tail(40),
        },
        // A guest stays "reported" only once it printed a status.
        (None, DriveEnd::ReportedButStayed) => RunEnd::NoExitCode {
            why: "the guest stopped without a status".into(),
            console_tail: console.tail(40),
        },
    }
}

pub(crate) fn parse_mac(text: &str) -> Option<[u8; 6]> {
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

#[cfg(test)]
mod tests {
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
