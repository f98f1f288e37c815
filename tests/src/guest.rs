//! Booting the guest kit under QEMU (TCG) for end-to-end tests and benchmarks: a Linux
//! guest whose init mounts the shares named on its command line, runs a script, reports
//! its exit status and powers off.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The kernel and initrd built by `scripts/guest-kit.sh`.
#[derive(Debug, Clone)]
pub struct GuestKit {
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
}

impl GuestKit {
    pub fn default_dir() -> PathBuf {
        std::env::var_os("VMBUILD_GUEST_KIT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/vmbuild/guest-kit"))
    }

    /// Finds a built kit; the error says how to build one.
    pub fn locate() -> anyhow::Result<Self> {
        let dir = Self::default_dir();
        let kit = GuestKit {
            vmlinux: dir.join("vmlinux"),
            initrd: dir.join("initrd.img"),
        };
        if !dir.join("kit.json").is_file() || !kit.vmlinux.is_file() || !kit.initrd.is_file() {
            bail!(
                "no guest kit in {}: build it with scripts/guest-kit.sh (or set VMBUILD_GUEST_KIT)",
                dir.display()
            );
        }
        Ok(kit)
    }
}

/// How a share reaches the guest.
#[derive(Debug, Clone)]
pub enum GuestShare {
    /// A vhost-user virtio-fs back-end listening on `socket` (vmbuild or virtiofsd).
    VirtioFs {
        socket: PathBuf,
        tag: String,
        mount: String,
        options: String,
    },
    /// QEMU's own 9p server exporting `dir`.
    NineP {
        dir: PathBuf,
        tag: String,
        mount: String,
        options: String,
    },
}

/// One boot of the guest kit.
#[derive(Debug, Clone)]
pub struct GuestVm {
    pub kit: GuestKit,
    pub memory_mib: u32,
    /// vCPUs (`-smp`).
    pub cpus: u32,
    pub shares: Vec<GuestShare>,
    /// Script to run, as a path inside the guest.
    pub command: String,
    /// Where the guest writes the exit status, as a path inside the guest.
    pub exit_file: Option<String>,
    pub timeout: Duration,
    /// virtio-net NICs attached to vhost-user-net sockets: (socket, MAC).
    pub nics: Vec<(PathBuf, String)>,
    /// virtio-net NICs on QEMU's `-netdev vde` (libvdeplug): (switch directory, MAC).
    pub vde_nics: Vec<(PathBuf, String)>,
    /// A virtio-net NIC on QEMU's user-mode network (the host is 10.0.2.2).
    pub user_net: bool,
    /// Firmware (`-bios`); QEMU's default (SeaBIOS) when `None`.
    pub bios: Option<PathBuf>,
    /// QEMU's accelerator: `tcg` (the default), or `kvm` where KVM runs Linux.
    pub accel: &'static str,
}

/// What a boot produced.
#[derive(Debug)]
pub struct GuestOutcome {
    /// The `vmbuild-exit=N` status the guest's init reported, if it got that far.
    pub exit: Option<i32>,
    pub console: String,
    pub wall: Duration,
}

/// Kills QEMU if the test panics or times out, so no process outlives the test.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl GuestVm {
    pub fn new(kit: GuestKit, command: &str) -> Self {
        GuestVm {
            kit,
            memory_mib: 512,
            cpus: 1,
            shares: Vec::new(),
            command: command.to_owned(),
            exit_file: None,
            timeout: Duration::from_secs(300),
            nics: Vec::new(),
            vde_nics: Vec::new(),
            user_net: false,
            bios: None,
            accel: "tcg",
        }
    }

    pub fn share(mut self, share: GuestShare) -> Self {
        self.shares.push(share);
        self
    }

    fn qemu_args(&self, console: &Path) -> Vec<String> {
        let mem = self.memory_mib;
        // What the guest kit boots fastest with under TCG (see guest/README.md).
        let mut append: Vec<String> = [
            "console=ttyS0",
            "panic=-1",
            "quiet",
            "cryptomgr.notests",
            "vmbuild.quiet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut args: Vec<String> = [
            "-accel",
            self.accel,
            "-M",
            "q35",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend([
            "-smp".into(),
            self.cpus.to_string(),
            "-m".into(),
            format!("{mem}M"),
            // vhost-user back-ends map guest memory: it must be shared.
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            "-machine".into(),
            "memory-backend=mem".into(),
            "-kernel".into(),
            self.kit.vmlinux.display().to_string(),
            "-initrd".into(),
            self.kit.initrd.display().to_string(),
            "-serial".into(),
            format!("file:{}", console.display()),
            "-monitor".into(),
            "none".into(),
        ]);
        for (i, share) in self.shares.iter().enumerate() {
            match share {
                GuestShare::VirtioFs {
                    socket,
                    tag,
                    mount,
                    options,
                } => {
                    args.push("-chardev".into());
                    args.push(format!("socket,id=fs{i},path={}", socket.display()));
                    args.push("-device".into());
                    args.push(format!(
                        "vhost-user-fs-pci,chardev=fs{i},tag={tag},queue-size=1024"
                    ));
                    append.push(mount_param("virtiofs", tag, mount, options));
                }
                GuestShare::NineP {
                    dir,
                    tag,
                    mount,
                    options,
                } => {
                    args.push("-virtfs".into());
                    args.push(format!(
                        "local,path={},mount_tag={tag},security_model=none,id=p9{i}",
                        dir.display()
                    ));
                    append.push(mount_param("9p", tag, mount, options));
                }
            }
        }
        for (i, (socket, mac)) in self.nics.iter().enumerate() {
            args.push("-chardev".into());
            args.push(format!("socket,id=net{i},path={}", socket.display()));
            args.push("-netdev".into());
            args.push(format!("vhost-user,id=nd{i},chardev=net{i}"));
            args.push("-device".into());
            args.push(format!("virtio-net-pci,netdev=nd{i},mac={mac},romfile="));
        }
        for (i, (dir, mac)) in self.vde_nics.iter().enumerate() {
            args.push("-netdev".into());
            args.push(format!("vde,id=vde{i},sock={}", dir.display()));
            args.push("-device".into());
            args.push(format!("virtio-net-pci,netdev=vde{i},mac={mac},romfile="));
        }
        if self.user_net {
            args.push("-netdev".into());
            args.push("user,id=usernet".into());
            args.push("-device".into());
            args.push("virtio-net-pci,netdev=usernet,romfile=".into());
        }
        if let Some(bios) = &self.bios {
            args.push("-bios".into());
            args.push(bios.display().to_string());
        }
        append.push(format!("vmbuild.cmd={}", self.command));
        if let Some(f) = &self.exit_file {
            append.push(format!("vmbuild.exitfile={f}"));
        }
        args.push("-append".into());
        args.push(append.join(" "));
        args
    }

    /// Starts QEMU with its console in `console` and returns at once: for tests that stop
    /// the guest themselves (the caller must kill and reap the child).
    pub fn spawn(&self, console: &Path) -> anyhow::Result<Child> {
        Command::new("qemu-system-x86_64")
            .args(self.qemu_args(console))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context(
                "starting qemu-system-x86_64 (is QEMU installed? scripts/install-host-deps.sh)",
            )
    }

    /// Boots, waits for the guest to power off (or the timeout), returns what happened.
    pub fn run(&self) -> anyhow::Result<GuestOutcome> {
        let dir = tempfile::tempdir()?;
        let console = dir.path().join("console.log");
        let start = Instant::now();
        let mut qemu = KillOnDrop(self.spawn(&console)?);
        let status = loop {
            if let Some(status) = qemu.0.try_wait()? {
                break status;
            }
            if start.elapsed() > self.timeout {
                let console = std::fs::read_to_string(&console).unwrap_or_default();
                bail!(
                    "guest did not power off within {:?}; console tail:\n{}",
                    self.timeout,
                    tail(&console, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let wall = start.elapsed();
        let console = std::fs::read_to_string(&console).unwrap_or_default();
        if !status.success() {
            let mut stderr = String::new();
            if let Some(mut e) = qemu.0.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut stderr);
            }
            bail!(
                "qemu exited with {status}: {stderr}\nconsole tail:\n{}",
                tail(&console, 30)
            );
        }
        let exit = console
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("vmbuild-exit="))
            .and_then(|n| n.trim().parse().ok());
        Ok(GuestOutcome {
            exit,
            console,
            wall,
        })
    }
}

fn mount_param(kind: &str, tag: &str, mount: &str, options: &str) -> String {
    if options.is_empty() {
        format!("vmbuild.mount={kind}:{tag}:{mount}")
    } else {
        format!("vmbuild.mount={kind}:{tag}:{mount}:{options}")
    }
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
