//! A direct-kernel-boot QEMU guest (TCG or KVM) with only a serial console and QMP, both on sockets
//! vmbuild listens on. What snapshot tests and benchmarks boot; `vmbuild run` builds its
//! richer machine itself.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;

use crate::qemu::{ChardevListener, QemuBinary, QemuCommand, QemuProcess, Qmp, QmpEvent};

pub struct ConsoleGuest {
    pub qemu: QemuProcess,
    pub qmp: Qmp,
    /// ttyS0: what the guest prints.
    pub console: UnixStream,
    /// SHUTDOWN and panic events from QMP.
    pub events: mpsc::Receiver<QmpEvent>,
}

pub struct ConsoleGuestConfig<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub append: &'a str,
    pub memory_mib: u32,
    /// Start with `-incoming defer`, to be revived with `Qmp::revive_from_*`.
    pub incoming: bool,
    /// TCG, or KVM with the host's CPU model.
    pub accel: super::Accel,
}

impl ConsoleGuest {
    /// Starts QEMU (TCG, q35, qboot where QEMU ships it); its sockets and stderr go in
    /// `dir`, named after `name`.
    pub fn start(
        dir: &Path,
        name: &str,
        config: &ConsoleGuestConfig<'_>,
    ) -> anyhow::Result<ConsoleGuest> {
        let qemu_bin = QemuBinary::locate()?;
        let qmp_l = ChardevListener::bind(dir.join(format!("{name}-qmp.sock")))?;
        let con_l = ChardevListener::bind(dir.join(format!("{name}-con.sock")))?;
        let a = QemuCommand::new(config.accel.qemu_name(), "q35", config.memory_mib)
            .cpu(config.accel.cpu_model())
            .firmware(qemu_bin.firmware("qboot.rom"))
            .no_reboot()
            .kernel(Some(config.kernel), Some(config.initrd))
            .append(Some(config.append))
            .monitor(&qmp_l)
            .serial_socket("con", &con_l)
            .incoming(config.incoming)
            .argv();
        let (mut qemu, qmp_s, console) = QemuProcess::start_with_qmp_and_console(
            &qemu_bin.path,
            &a,
            &dir.join(format!("{name}.stderr")),
            &qmp_l,
            &con_l,
        )?;
        let (tx, events) = mpsc::channel();
        let qmp = qemu.qmp_handshake(qmp_s, tx)?;
        Ok(ConsoleGuest {
            qemu,
            qmp,
            console,
            events,
        })
    }
}
