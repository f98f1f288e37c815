//! A direct-kernel-boot QEMU guest (TCG or KVM) with only a serial console and QMP, both on sockets
//! vmbuild listens on. What snapshot tests and benchmarks boot; `vmbuild run` builds its
//! richer machine itself.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use crate::qemu::{accept_all, ChardevListener, QemuBinary, QemuProcess, Qmp, QmpEvent};

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
        let mut a: Vec<String> = [
            "-accel",
            config.accel.qemu_name(),
            "-M",
            "q35",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(["-m".into(), format!("{}M", config.memory_mib)]);
        if let Some(cpu) = config.accel.cpu_model() {
            a.extend(["-cpu".into(), cpu.into()]);
        }
        if let Some(qboot) = qemu_bin.firmware("qboot.rom") {
            a.extend(["-bios".into(), qboot.display().to_string()]);
        }
        a.extend([
            "-kernel".into(),
            config.kernel.display().to_string(),
            "-initrd".into(),
            config.initrd.display().to_string(),
            "-append".into(),
            config.append.to_owned(),
            "-chardev".into(),
            qmp_l.chardev_arg("qmp"),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
            "-chardev".into(),
            con_l.chardev_arg("con"),
            "-serial".into(),
            "chardev:con".into(),
        ]);
        if config.incoming {
            a.extend(["-incoming".into(), "defer".into()]);
        }
        let mut qemu = QemuProcess::spawn(
            &qemu_bin.path,
            &a,
            &dir.join(format!("{name}.stderr")),
            false,
        )?;
        let mut streams =
            accept_all(&[&qmp_l, &con_l], &mut qemu, Duration::from_secs(30))?.into_iter();
        let (qmp_s, console) = (streams.next().unwrap(), streams.next().unwrap());
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
