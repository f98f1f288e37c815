//! QEMU's command line for every machine vmbuild starts: a `vmbuild run` guest, a
//! snapshot's target, a controller, a console guest, the KVM probe. Each says what it
//! needs in typed options; [`QemuCommand::argv`] spells them, always in the same order,
//! so a flag (the shared-memory backend, the serial wiring, the monitor) is written once.
//!
//! Order matters to QEMU in two places, and both keep the order the caller gave:
//! serial ports (the first is the guest's ttyS0) and PCI devices (their slots, which a
//! snapshot's target must keep from bootstrap to every revive).

use std::path::{Path, PathBuf};

use super::ChardevListener;

/// One machine's QEMU options.
#[derive(Debug, Clone)]
pub struct QemuCommand {
    accel: String,
    machine: String,
    cpu: Option<String>,
    firmware: Option<PathBuf>,
    memory_mib: u32,
    cpus: Option<u32>,
    shared_memory: bool,
    no_user_config: bool,
    no_reboot: bool,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    append: Option<String>,
    monitor: Option<String>,
    serials: Vec<Serial>,
    devices: Vec<Device>,
    incoming: bool,
    uefi: Option<Uefi>,
}

/// UEFI firmware as two flash drives: OVMF's code (read-only) and this machine's own
/// copy of its variables. With Secure Boot the flash is reachable only from SMM.
#[derive(Debug, Clone)]
struct Uefi {
    code: PathBuf,
    vars: PathBuf,
    secure_boot: bool,
}

/// Where a serial port's bytes go, in the order the guest numbers them (ttyS0, …).
#[derive(Debug, Clone)]
enum Serial {
    /// A socket vmbuild listens on (`-chardev socket,id=ID,path=…`).
    Socket { id: String, chardev: String },
    /// The terminal (`--shell`); QEMU's own Ctrl-C handling off.
    Stdio,
    /// A file (the probe's console).
    File(PathBuf),
}

/// A device, in the order the guest's PCI bus gets them.
#[derive(Debug, Clone)]
enum Device {
    Virtiofs {
        id: String,
        socket: PathBuf,
        tag: String,
    },
    NicStream {
        socket: PathBuf,
        mac: String,
        /// A device id (the target's NIC has one, for QMP).
        id: Option<String>,
    },
    Rng,
    VmGenId,
    /// A disk on virtio, QEMU's `-drive if=virtio` shorthand (`vmbuild run --disk`).
    VirtioDrive {
        path: PathBuf,
        format: String,
        snapshot: bool,
    },
    /// The target's disk: a qcow2 overlay on virtio-blk with an id, discards passed down.
    TargetDisk(PathBuf),
    /// A read-only CD-ROM on the q35 AHCI controller's port `index` (install media).
    Cdrom {
        path: PathBuf,
        index: u8,
    },
    /// A TPM 2.0 (CRB interface) backed by swtpm listening on `socket`.
    Tpm {
        socket: PathBuf,
    },
    /// A named virtio-serial port, connected to a socket vmbuild listens on, or to
    /// nothing (`None`: the port exists, as a revive needs, but nobody reads it).
    SerialPort {
        name: String,
        socket: Option<PathBuf>,
    },
    /// An empty PCIe root port on q35: a slot a device can be hot-plugged into later
    /// (q35's root bus takes no hot-plug).
    RootPort {
        id: String,
        chassis: u8,
    },
    /// A standard VGA adapter: a screen to take screendumps of (QMP `screendump`) while
    /// nothing displays it (`-display none`); Windows draws its Setup and desktop there.
    Vga,
}

impl QemuCommand {
    /// A machine of `machine` type under `accel` (QEMU's names) with `memory_mib` MiB.
    pub fn new(accel: &str, machine: &str, memory_mib: u32) -> QemuCommand {
        QemuCommand {
            accel: accel.to_owned(),
            machine: machine.to_owned(),
            cpu: None,
            firmware: None,
            memory_mib,
            cpus: None,
            shared_memory: false,
            no_user_config: false,
            no_reboot: false,
            kernel: None,
            initrd: None,
            append: None,
            monitor: None,
            serials: Vec::new(),
            devices: Vec::new(),
            incoming: false,
            uefi: None,
        }
    }

    /// Boots UEFI firmware (`code`) with this machine's variable store (`vars`, a copy
    /// the machine may write); `secure_boot` also puts the flash behind SMM.
    pub fn uefi(mut self, code: &Path, vars: &Path, secure_boot: bool) -> Self {
        self.uefi = Some(Uefi {
            code: code.to_owned(),
            vars: vars.to_owned(),
            secure_boot,
        });
        self
    }

    pub fn cdrom(mut self, path: &Path, index: u8) -> Self {
        self.devices.push(Device::Cdrom {
            path: path.to_owned(),
            index,
        });
        self
    }

    pub fn tpm(mut self, socket: &Path) -> Self {
        self.devices.push(Device::Tpm {
            socket: socket.to_owned(),
        });
        self
    }

    pub fn serial_port(mut self, name: &str, socket: Option<&Path>) -> Self {
        self.devices.push(Device::SerialPort {
            name: name.to_owned(),
            socket: socket.map(Path::to_owned),
        });
        self
    }

    /// An empty PCIe root port `id` (q35), for a device plugged in at run time.
    pub fn root_port(mut self, id: &str, chassis: u8) -> Self {
        self.devices.push(Device::RootPort {
            id: id.to_owned(),
            chassis,
        });
        self
    }

    pub fn cpu(mut self, model: Option<&str>) -> Self {
        self.cpu = model.map(str::to_owned);
        self
    }

    /// `-bios`: another firmware than SeaBIOS (qboot, for direct kernel boots).
    pub fn firmware(mut self, rom: Option<PathBuf>) -> Self {
        self.firmware = rom;
        self
    }

    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = Some(n);
        self
    }

    /// Guest RAM as shared memory (memfd): what vhost-user back-ends need to map it.
    pub fn shared_memory(mut self) -> Self {
        self.shared_memory = true;
        self
    }

    /// No `/etc/qemu` configuration files: the machine is exactly what is asked.
    pub fn no_user_config(mut self) -> Self {
        self.no_user_config = true;
        self
    }

    /// A guest reboot (and, with the kernel's `panic=-1`, a panic) ends QEMU.
    pub fn no_reboot(mut self) -> Self {
        self.no_reboot = true;
        self
    }

    pub fn kernel(mut self, kernel: Option<&Path>, initrd: Option<&Path>) -> Self {
        self.kernel = kernel.map(Path::to_owned);
        self.initrd = initrd.map(Path::to_owned);
        self
    }

    pub fn append(mut self, cmdline: Option<&str>) -> Self {
        self.append = cmdline.map(str::to_owned);
        self
    }

    /// The QMP monitor, on a socket vmbuild listens on.
    pub fn monitor(mut self, listener: &ChardevListener) -> Self {
        self.monitor = Some(listener.chardev_arg("qmp"));
        self
    }

    /// The next serial port, on a socket vmbuild listens on, as chardev `id`.
    pub fn serial_socket(mut self, id: &str, listener: &ChardevListener) -> Self {
        self.serials.push(Serial::Socket {
            id: id.to_owned(),
            chardev: listener.chardev_arg(id),
        });
        self
    }

    /// The next serial port on QEMU's own stdin and stdout.
    pub fn serial_stdio(mut self) -> Self {
        self.serials.push(Serial::Stdio);
        self
    }

    /// The next serial port written to `path`.
    pub fn serial_file(mut self, path: &Path) -> Self {
        self.serials.push(Serial::File(path.to_owned()));
        self
    }

    /// A vhost-user-fs device `id` on `socket`, mounted by the guest as `tag`.
    pub fn virtiofs(mut self, id: &str, socket: &Path, tag: &str) -> Self {
        self.devices.push(Device::Virtiofs {
            id: id.to_owned(),
            socket: socket.to_owned(),
            tag: tag.to_owned(),
        });
        self
    }

    /// A virtio NIC on a `-netdev stream` socket (a port of vmbuild's switch), which QEMU
    /// keeps reconnecting to.
    pub fn nic_stream(mut self, socket: &Path, mac: &str, id: Option<&str>) -> Self {
        self.devices.push(Device::NicStream {
            socket: socket.to_owned(),
            mac: mac.to_owned(),
            id: id.map(str::to_owned),
        });
        self
    }

    /// virtio-rng: a guest on the network wants randomness at once (an SSH client
    /// blocks until the kernel's CRNG is ready, ~1 s under TCG without a source).
    pub fn rng(mut self) -> Self {
        self.devices.push(Device::Rng);
        self
    }

    /// A new VM generation id at every start: the guest kernel reseeds its RNG when it
    /// changes, so machines revived from one snapshot do not share random streams.
    pub fn vmgenid(mut self) -> Self {
        self.devices.push(Device::VmGenId);
        self
    }

    /// A VGA adapter, so that the screen can be dumped (see [`Device::Vga`]).
    pub fn vga(mut self) -> Self {
        self.devices.push(Device::Vga);
        self
    }

    pub fn virtio_drive(mut self, path: &Path, format: &str, snapshot: bool) -> Self {
        self.devices.push(Device::VirtioDrive {
            path: path.to_owned(),
            format: format.to_owned(),
            snapshot,
        });
        self
    }

    pub fn target_disk(mut self, overlay: &Path) -> Self {
        self.devices.push(Device::TargetDisk(overlay.to_owned()));
        self
    }

    /// Waits for `migrate-incoming` (a revive) instead of running.
    pub fn incoming(mut self, yes: bool) -> Self {
        self.incoming = yes;
        self
    }

    pub fn argv(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
        push(&["-accel", &self.accel, "-M", &self.machine]);
        if let Some(cpu) = &self.cpu {
            push(&["-cpu", cpu]);
        }
        if let Some(rom) = &self.firmware {
            push(&["-bios", &rom.display().to_string()]);
        }
        if let Some(uefi) = &self.uefi {
            if uefi.secure_boot {
                push(&[
                    "-machine",
                    "smm=on",
                    "-global",
                    "driver=cfi.pflash01,property=secure,value=on",
                ]);
            }
            push(&[
                "-drive",
                &format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={}",
                    uefi.code.display()
                ),
                "-drive",
                &format!("if=pflash,format=raw,unit=1,file={}", uefi.vars.display()),
            ]);
        }
        push(&["-nodefaults"]);
        if self.no_user_config {
            push(&["-no-user-config"]);
        }
        push(&["-display", "none"]);
        if self.no_reboot {
            push(&["-no-reboot"]);
        }
        if let Some(n) = self.cpus {
            push(&["-smp", &n.to_string()]);
        }
        let mem = self.memory_mib;
        push(&["-m", &format!("{mem}M")]);
        if self.shared_memory {
            push(&[
                "-object",
                &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
                "-machine",
                "memory-backend=mem",
            ]);
        }
        if let Some(k) = &self.kernel {
            push(&["-kernel", &k.display().to_string()]);
        }
        if let Some(i) = &self.initrd {
            push(&["-initrd", &i.display().to_string()]);
        }
        if let Some(append) = &self.append {
            push(&["-append", append]);
        }
        if let Some(qmp) = &self.monitor {
            push(&["-chardev", qmp, "-mon", "chardev=qmp,mode=control"]);
        }
        for serial in &self.serials {
            match serial {
                Serial::Socket { id, chardev } => {
                    push(&["-chardev", chardev, "-serial", &format!("chardev:{id}")])
                }
                Serial::Stdio => push(&[
                    "-chardev",
                    "stdio,id=con,signal=off",
                    "-serial",
                    "chardev:con",
                ]),
                Serial::File(path) => push(&["-serial", &format!("file:{}", path.display())]),
            }
        }
        for device in &self.devices {
            match device {
                Device::Virtiofs { id, socket, tag } => push(&[
                    "-chardev",
                    &format!("socket,id={id},path={}", socket.display()),
                    "-device",
                    &format!("vhost-user-fs-pci,chardev={id},tag={tag},queue-size=1024"),
                ]),
                Device::NicStream { socket, mac, id } => {
                    let id = id.as_ref().map(|i| format!(",id={i}")).unwrap_or_default();
                    push(&[
                        "-netdev",
                        &format!(
                            "stream,id=net0,server=off,addr.type=unix,addr.path={},reconnect-ms=250",
                            socket.display()
                        ),
                        "-device",
                        &format!("virtio-net-pci,netdev=net0{id},mac={mac}"),
                    ])
                }
                Device::Rng => push(&["-device", "virtio-rng-pci"]),
                Device::VmGenId => push(&["-device", "vmgenid,guid=auto"]),
                Device::VirtioDrive {
                    path,
                    format,
                    snapshot,
                } => {
                    let snapshot = if *snapshot { ",snapshot=on" } else { "" };
                    push(&[
                        "-drive",
                        &format!(
                            "file={},if=virtio,format={format},cache=unsafe{snapshot}",
                            path.display()
                        ),
                    ])
                }
                Device::TargetDisk(overlay) => push(&[
                    "-drive",
                    &format!(
                        "file={},if=none,id=disk0,format=qcow2,discard=unmap",
                        overlay.display()
                    ),
                    "-device",
                    "virtio-blk-pci,drive=disk0,id=blk0",
                ]),
                Device::Cdrom { path, index } => push(&[
                    "-drive",
                    &format!(
                        "file={},if=none,id=cd{index},media=cdrom,readonly=on",
                        path.display()
                    ),
                    "-device",
                    &format!("ide-cd,drive=cd{index},bus=ide.{index},id=cdrom{index}"),
                ]),
                Device::Tpm { socket } => push(&[
                    "-chardev",
                    &format!("socket,id=chrtpm,path={}", socket.display()),
                    "-tpmdev",
                    "emulator,id=tpm0,chardev=chrtpm",
                    "-device",
                    "tpm-crb,tpmdev=tpm0",
                ]),
                Device::SerialPort { name, socket } => push(&[
                    "-device",
                    "virtio-serial-pci,id=vser0",
                    "-chardev",
                    &match socket {
                        Some(socket) => format!("socket,id=port-{name},path={}", socket.display()),
                        None => format!("null,id=port-{name}"),
                    },
                    "-device",
                    &format!("virtserialport,bus=vser0.0,chardev=port-{name},name={name}"),
                ]),
                Device::Vga => push(&["-device", "VGA"]),
                Device::RootPort { id, chassis } => push(&[
                    "-device",
                    &format!("pcie-root-port,id={id},chassis={chassis}"),
                ]),
            }
        }
        if self.incoming {
            push(&["-incoming", "defer"]);
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The argv, with the test's temporary directory written as `$D`.
    fn line(q: &QemuCommand, dir: &Path) -> String {
        q.argv().join(" ").replace(&dir.display().to_string(), "$D")
    }

    fn listener(dir: &Path, name: &str) -> ChardevListener {
        ChardevListener::bind(dir.join(name)).unwrap()
    }

    /// `vmbuild run`'s guest (vm/run.rs): qboot, shared memory, three serial ports, a
    /// virtio-fs share, a NIC with its RNG, a disk in snapshot mode.
    #[test]
    fn a_run_guest() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let q = QemuCommand::new("tcg", "q35", 512)
            .cpu(None)
            .firmware(Some(PathBuf::from("/usr/share/qemu/qboot.rom")))
            .no_user_config()
            .no_reboot()
            .cpus(2)
            .shared_memory()
            .kernel(
                Some(Path::new("/k/vmlinux")),
                Some(Path::new("/k/initrd.img")),
            )
            .monitor(&listener(dir, "qmp.sock"))
            .serial_socket("con", &listener(dir, "con.sock"))
            .serial_socket("out", &listener(dir, "out.sock"))
            .serial_socket("err", &listener(dir, "err.sock"))
            .virtiofs("fs0", &dir.join("xchg.sock"), "xchg")
            .nic_stream(&dir.join("net.sock"), "52:54:00:00:00:01", None)
            .rng()
            .virtio_drive(Path::new("/img/disk.qcow2"), "qcow2", true)
            .append(Some("console=ttyS0 panic=-1"));
        assert_eq!(
            line(&q, dir),
            "-accel tcg -M q35 -bios /usr/share/qemu/qboot.rom -nodefaults -no-user-config \
             -display none -no-reboot -smp 2 -m 512M \
             -object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem \
             -kernel /k/vmlinux -initrd /k/initrd.img -append console=ttyS0 panic=-1 \
             -chardev socket,id=qmp,path=$D/qmp.sock -mon chardev=qmp,mode=control \
             -chardev socket,id=con,path=$D/con.sock -serial chardev:con \
             -chardev socket,id=out,path=$D/out.sock -serial chardev:out \
             -chardev socket,id=err,path=$D/err.sock -serial chardev:err \
             -chardev socket,id=fs0,path=$D/xchg.sock \
             -device vhost-user-fs-pci,chardev=fs0,tag=xchg,queue-size=1024 \
             -netdev stream,id=net0,server=off,addr.type=unix,addr.path=$D/net.sock,reconnect-ms=250 \
             -device virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01 -device virtio-rng-pci \
             -drive file=/img/disk.qcow2,if=virtio,format=qcow2,cache=unsafe,snapshot=on"
        );
    }

    /// `--shell`: the console is the terminal.
    #[test]
    fn a_shell_console_is_stdio() {
        let q = QemuCommand::new("kvm", "q35", 256)
            .cpu(Some("host"))
            .serial_stdio();
        assert_eq!(
            q.argv().join(" "),
            "-accel kvm -M q35 -cpu host -nodefaults -display none -m 256M \
             -chardev stdio,id=con,signal=off -serial chardev:con"
        );
    }

    /// A snapshot's target (snapshot/target.rs), as revived by a build: its disk and NIC
    /// (with an id) in that order, a VM generation id, waiting for the incoming state.
    #[test]
    fn a_revived_target() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let q = QemuCommand::new("tcg", "pc-i440fx-10.0", 256)
            .no_user_config()
            .cpus(1)
            .shared_memory()
            .kernel(
                Some(Path::new("/s/vmlinux")),
                Some(Path::new("/s/initrd.img")),
            )
            .append(Some("console=ttyS0 root=/dev/vda"))
            .target_disk(&dir.join("overlay.qcow2"))
            .nic_stream(&dir.join("net.sock"), "52:54:00:0a:00:02", Some("nic0"))
            .vmgenid()
            .monitor(&listener(dir, "qmp.sock"))
            .serial_socket("con", &listener(dir, "con.sock"))
            .incoming(true);
        assert_eq!(
            line(&q, dir),
            "-accel tcg -M pc-i440fx-10.0 -nodefaults -no-user-config -display none -smp 1 -m 256M \
             -object memory-backend-memfd,id=mem,size=256M,share=on -machine memory-backend=mem \
             -kernel /s/vmlinux -initrd /s/initrd.img -append console=ttyS0 root=/dev/vda \
             -chardev socket,id=qmp,path=$D/qmp.sock -mon chardev=qmp,mode=control \
             -chardev socket,id=con,path=$D/con.sock -serial chardev:con \
             -drive file=$D/overlay.qcow2,if=none,id=disk0,format=qcow2,discard=unmap \
             -device virtio-blk-pci,drive=disk0,id=blk0 \
             -netdev stream,id=net0,server=off,addr.type=unix,addr.path=$D/net.sock,reconnect-ms=250 \
             -device virtio-net-pci,netdev=net0,id=nic0,mac=52:54:00:0a:00:02 \
             -device vmgenid,guid=auto -incoming defer"
        );
    }

    /// The KVM probe (accel): its console to a file, nothing else.
    #[test]
    fn the_kvm_probe() {
        let q = QemuCommand::new("kvm", "q35", 256)
            .cpu(Some("host"))
            .no_user_config()
            .no_reboot()
            .kernel(
                Some(Path::new("/k/vmlinux")),
                Some(Path::new("/k/initrd.img")),
            )
            .append(Some("console=ttyS0"))
            .serial_file(Path::new("/tmp/probe/console"));
        assert_eq!(
            q.argv().join(" "),
            "-accel kvm -M q35 -cpu host -nodefaults -no-user-config -display none -no-reboot \
             -m 256M -kernel /k/vmlinux -initrd /k/initrd.img -append console=ttyS0 \
             -serial file:/tmp/probe/console"
        );
    }

    /// Serial ports and devices keep the order they were given: the guest numbers the
    /// ports, and a revived machine must find its devices in the same PCI slots.
    #[test]
    fn serial_ports_and_devices_keep_their_order() {
        let q = QemuCommand::new("tcg", "q35", 128)
            .vmgenid()
            .rng()
            .serial_file(Path::new("/b"))
            .serial_file(Path::new("/a"));
        let argv = q.argv().join(" ");
        assert!(
            argv.ends_with(
                "-serial file:/b -serial file:/a -device vmgenid,guid=auto -device virtio-rng-pci"
            ),
            "{argv}"
        );
    }
}
