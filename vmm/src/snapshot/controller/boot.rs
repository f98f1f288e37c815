//! A controller booted fresh for every session, through the same machinery as
//! `vmbuild run`: the guest kit, plus the SSH client and key, plus the session's files.
//! It boots under QEMU (on the segment's stream port) or in the embedded VMM (on an
//! in-process port of the segment's switch: no QEMU process, no socket).

use std::ffi::OsString;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use anyhow::Context;

use super::{
    classify, session_files, Controller, ControllerEnd, ControllerOutcome, SessionPlan,
    CONTROLLER_MEMORY_MIB, CONTROLLER_SCRIPT_GUEST,
};
use crate::accel::Accel;
use crate::guest::initrd;
use crate::qemu::QemuBinary;
use crate::vm::run::{self, Nic, NicLink, RunEnd, RunSpec};
use crate::vm::run_embedded::run_embedded;

/// The controller as a guest booted for one session, run through the same machinery as
/// `vmbuild run`.
pub struct BootedController {
    pub qemu: QemuBinary,
    pub accel: Accel,
    pub vmm: BootVmm,
}

pub enum BootVmm {
    /// QEMU (TCG or KVM, as the snapshot says), on the segment's stream port.
    Qemu,
    /// The embedded KVM VMM, on a new in-process port of this switch (the segment's).
    Embedded(Arc<vswitch::Switch>),
}

impl Controller for BootedController {
    fn kind(&self) -> &'static str {
        match self.vmm {
            BootVmm::Qemu => "boot",
            BootVmm::Embedded(_) => "embedded-boot",
        }
    }

    fn run_session(
        &self,
        plan: &SessionPlan,
        stop: Receiver<()>,
    ) -> anyhow::Result<ControllerOutcome> {
        let initrd_path = plan.rundir.join("controller-initrd.img");
        initrd::assemble(&plan.initrd_parts, &session_files(plan), &initrd_path)
            .context("writing the controller's initramfs")?;
        let spec = RunSpec {
            qemu: self.qemu.clone(),
            accel: self.accel,
            kernel: plan.kernel.to_owned(),
            initrd: initrd_path,
            append: None,
            memory_mib: CONTROLLER_MEMORY_MIB,
            cpus: 1,
            argv: vec![
                OsString::from("/bin/sh"),
                OsString::from(CONTROLLER_SCRIPT_GUEST),
            ],
            shell: false,
            env: Vec::new(),
            cwd: None,
            store: None,
            xchg: None,
            keep_xchg: false,
            no_xchg: true,
            xchg_writeback: false,
            nic: Some(Nic {
                link: match &self.vmm {
                    BootVmm::Qemu => NicLink::Stream(plan.net_socket.to_owned()),
                    BootVmm::Embedded(switch) => NicLink::InProcess(switch.clone()),
                },
                mac: plan.network.controller_mac.clone(),
            }),
            extra_shares: Vec::new(),
            disk: None,
            image: None,
            timeout: None,
            log: Some(plan.console_log.clone()),
            vmm: match self.vmm {
                BootVmm::Qemu => run::Vmm::Qemu,
                BootVmm::Embedded(_) => run::Vmm::Embedded,
            },
            share_protocol: run::ShareProtocol::Virtiofs,
            dax: false,
            runtime_dir: None,
        };
        let outcome = match spec.vmm {
            run::Vmm::Qemu => run::run(&spec, stop)?,
            run::Vmm::Embedded => run_embedded(&spec, stop)?,
        };
        let end = match outcome.end {
            RunEnd::Exited(code) => classify(code, &outcome.marks),
            RunEnd::Interrupted | RunEnd::TimedOut(_) => ControllerEnd::Interrupted,
            RunEnd::NoExitCode { why, console_tail } => ControllerEnd::Died { why, console_tail },
            RunEnd::HostFailed(why) => ControllerEnd::Died {
                why,
                console_tail: String::new(),
            },
        };
        Ok(ControllerOutcome {
            end,
            marks: outcome.marks,
        })
    }
}
