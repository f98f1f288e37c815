//! A controller booted fresh for every session, through the same machinery as
//! `vmbuild run`: the guest kit, plus the SSH client and key, plus the session's files.

use std::ffi::OsString;
use std::sync::mpsc::Receiver;

use anyhow::Context;

use super::{
    classify, session_files, Controller, ControllerEnd, ControllerOutcome, SessionPlan,
    CONTROLLER_MEMORY_MIB, CONTROLLER_SCRIPT_GUEST,
};
use crate::accel::Accel;
use crate::qemu::QemuBinary;
use crate::workflow::initrd;
use crate::workflow::run::{self, Nic, RunEnd, RunSpec};

/// The controller as a QEMU guest (TCG or KVM, as the host allows), run through the same
/// machinery as `vmbuild run`.
pub struct BootedController {
    pub qemu: QemuBinary,
    pub accel: Accel,
}

impl Controller for BootedController {
    fn kind(&self) -> &'static str {
        "qemu-boot"
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
            nic: Some(Nic {
                socket: plan.net_socket.to_owned(),
                mac: plan.network.controller_mac.clone(),
            }),
            extra_shares: Vec::new(),
            disk: None,
            timeout: None,
            log: Some(plan.console_log.clone()),
            vmm: run::Vmm::Qemu,
        };
        let outcome = run::run(&spec, stop)?;
        let end = match outcome.end {
            RunEnd::Exited(code) => classify(code, &outcome.marks),
            RunEnd::Interrupted | RunEnd::TimedOut(_) => ControllerEnd::Interrupted,
            RunEnd::NoExitCode { why, console_tail } => ControllerEnd::Died { why, console_tail },
        };
        Ok(ControllerOutcome {
            end,
            marks: outcome.marks,
        })
    }
}
