//! Which VMM runs a `vmbuild run`: QEMU, or the embedded KVM VMM where it has booted this
//! kit on this host and the run fits it. Decided here, next to the accelerator choice and
//! the probes both rest on; the command line only says what the user asked for.

use std::path::Path;

use crate::vm::run::{ShareProtocol, Vmm};
use crate::vm::run_embedded::{self, EmbeddedFit};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VmmChoice {
    Auto,
    Qemu,
    Embedded,
}

/// What the run needs, in the terms that decide whether the embedded VMM can take it.
pub struct VmmRequest<'a> {
    pub choice: VmmChoice,
    pub share_protocol: ShareProtocol,
    /// `--dax`: DAX windows, which only the embedded VMM has.
    pub dax: bool,
    pub shell: bool,
    pub disk: bool,
    pub cpus: u32,
    pub memory_mib: u32,
    pub shares: usize,
    pub image: bool,
    /// `--accel tcg` asks for QEMU's emulation.
    pub tcg: bool,
    pub qemu: &'a Path,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
}

/// The VMM for `request`, or why what the user insisted on cannot be (one line for an
/// exit 2). `auto` falls back to QEMU, saying why at debug level.
pub fn choose(request: &VmmRequest) -> Result<Vmm, String> {
    // 9p is served by the embedded VMM's virtio-9p device; QEMU's 9p would be its own
    // server, not ours, with none of our share policies.
    let nine_p = request.share_protocol == ShareProtocol::NineP;
    if nine_p && request.choice == VmmChoice::Qemu {
        return Err("--share-protocol 9p needs the embedded VMM (--vmm embedded or auto); under QEMU use virtiofs".into());
    }
    // QEMU's vhost-user-fs has no DAX window (upstream never merged one).
    if request.dax && nine_p {
        return Err("--dax maps virtio-fs shares; 9p has no DAX window".into());
    }
    if request.dax && request.choice == VmmChoice::Qemu {
        return Err("--dax needs the embedded VMM (--vmm embedded or auto): QEMU's vhost-user-fs has no DAX window".into());
    }
    let needs_embedded = nine_p || request.dax;
    if request.choice == VmmChoice::Qemu {
        return Ok(Vmm::Qemu);
    }
    let usable = || {
        let probe = super::probe_embedded_cached(request.qemu, request.kernel, request.initrd);
        if probe.usable {
            Ok(())
        } else {
            Err(probe.reason)
        }
    };
    if request.choice == VmmChoice::Embedded || needs_embedded {
        let what = match request.choice {
            VmmChoice::Embedded => "--vmm embedded",
            _ if request.dax => "--dax (a DAX window of the embedded VMM)",
            _ => "--share-protocol 9p (served by the embedded VMM)",
        };
        fits(request).map_err(|why| format!("{what}: {why}"))?;
        usable().map_err(|why| {
            format!(
                "{what}: {why}; the embedded VMM needs a KVM that runs Linux (use --vmm qemu{})",
                match (nine_p, request.dax) {
                    (true, _) => " with --share-protocol virtiofs",
                    (_, true) => " without --dax",
                    _ => "",
                }
            )
        })?;
        return Ok(Vmm::Embedded);
    }
    match fits(request).and_then(|()| usable()) {
        Ok(()) => Ok(Vmm::Embedded),
        Err(why) => {
            tracing::debug!("--vmm auto: QEMU, not the embedded VMM: {why}");
            Ok(Vmm::Qemu)
        }
    }
}

/// The embedded VMM's own limits ([`run_embedded::fits`]), and `--accel tcg`, which asks
/// for QEMU's emulation.
fn fits(request: &VmmRequest) -> Result<(), String> {
    if request.tcg {
        return Err("it runs on KVM, and --accel tcg asks for QEMU's emulation".to_owned());
    }
    run_embedded::fits(&EmbeddedFit {
        shell: request.shell,
        disk: request.disk,
        cpus: request.cpus,
        memory_mib: request.memory_mib,
        shares: request.shares,
        image: request.image,
        kernel: request.kernel,
    })
}
