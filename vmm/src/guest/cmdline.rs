//! The kernel command line of the kit's guests: the kernel's own parameters and the
//! `vmbuild.*` ones the kit's init reads (see `guest/init`). Every guest vmbuild boots
//! gets its command line from [`KernelCmdline`], which writes the parameters in one fixed
//! order; the tests below pin the line each kind of guest gets.
//!
//! Values are never quoted: the init splits `/proc/cmdline` at spaces and takes a value
//! as it stands, so a value must not contain white space or `"` ([`fits`]), and a mount
//! point not `:` either, which separates the fields of `vmbuild.mount=`
//! ([`valid_mount_point`]). The CLI refuses anything else before it gets here.

use std::fmt;

/// `vmbuild.cmd=` for a guest that must only boot to its init (the probes): the init
/// reports the missing command and powers off.
pub const NO_COMMAND: &str = "/nonexistent";

/// How the guest mounts a share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountKind {
    Virtiofs,
    NineP,
}

impl MountKind {
    fn name(self) -> &'static str {
        match self {
            MountKind::Virtiofs => "virtiofs",
            MountKind::NineP => "9p",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    kind: MountKind,
    tag: String,
    mountpoint: String,
    read_only: bool,
    /// More `mount -o` options (after `ro`), comma-separated.
    options: String,
}

/// What the init does once the shares are mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
enum InitAction {
    /// `vmbuild.cmd=PATH`: run the script at PATH.
    Command(String),
    /// `vmbuild.exitfile=PATH`: an interactive shell, its status written to PATH.
    Shell { exit_file: String },
}

/// A kit guest's kernel command line. [`KernelCmdline::new`] is what every kit guest
/// has: the console on ttyS0, a kernel panic that ends the VM (`panic=-1`; QEMU runs
/// with `-no-reboot`), and a quiet kernel and init.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelCmdline {
    keyboard_reset: bool,
    fast_boot: bool,
    serial_ports: Option<u8>,
    trust_cpu_rng: bool,
    root: Option<String>,
    root_init: Option<String>,
    image: Option<String>,
    modules: Vec<String>,
    ip: Option<String>,
    mounts: Vec<Mount>,
    init: Option<InitAction>,
    extra: Option<String>,
}

impl KernelCmdline {
    pub fn new() -> KernelCmdline {
        KernelCmdline::default()
    }

    /// A guest that runs a command with its stdout and stderr on ttyS1 and ttyS2 (`vmbuild
    /// run`, the controllers), booted as fast as the kit boots.
    pub fn command_guest() -> KernelCmdline {
        KernelCmdline::new().fast_boot().serial_ports(3)
    }

    /// A guest that only boots to its init: the probes.
    pub fn probe() -> KernelCmdline {
        KernelCmdline::new().command(NO_COMMAND)
    }

    /// The kernel skips its crypto self-tests (`cryptomgr.notests`). Measured on the
    /// guest kit under TCG: it and `quiet` each save ~0.4 s of boot; the usual fast-boot
    /// folklore (tsc=reliable, no_timer_check, ...) made no difference.
    pub fn fast_boot(mut self) -> Self {
        self.fast_boot = true;
        self
    }

    /// `n` 8250 UARTs (`8250.nr_uarts=`).
    pub fn serial_ports(mut self, n: u8) -> Self {
        self.serial_ports = Some(n);
        self
    }

    /// Reset through the keyboard controller (`reboot=k`): the embedded VMM has no PCI
    /// reset register.
    pub fn keyboard_reset(mut self) -> Self {
        self.keyboard_reset = true;
        self
    }

    /// The CPU's RDRAND seeds the CRNG at once (`random.trust_cpu=on`): for a guest with
    /// no virtio-rng (an SSH client would otherwise block on it).
    pub fn trust_cpu_rng(mut self) -> Self {
        self.trust_cpu_rng = true;
        self
    }

    /// Both of the above: what the embedded VMM's guests need.
    pub fn embedded_vmm(self) -> Self {
        self.keyboard_reset().trust_cpu_rng()
    }

    /// The init boots the system installed on `device` instead (`vmbuild.root=`).
    pub fn root(mut self, device: &str) -> Self {
        self.root = Some(device.to_owned());
        self
    }

    /// The installed system's init, instead of its /sbin/init (`vmbuild.rootinit=`).
    pub fn root_init(mut self, path: &str) -> Self {
        self.root_init = Some(path.to_owned());
        self
    }

    /// The command runs chrooted in the distribution image on `device` (`vmbuild.image=`).
    pub fn image(mut self, device: &str) -> Self {
        self.image = Some(device.to_owned());
        self
    }

    /// The init loads these kit modules as well (`vmbuild.modules=`).
    pub fn modules(mut self, modules: &[&str]) -> Self {
        self.modules.extend(modules.iter().map(|m| m.to_string()));
        self
    }

    /// The address the installed `linux` target gives its NIC (`vmbuild.ip=ADDR/PREFIX`,
    /// read by its own init script).
    pub fn ip(mut self, address_and_prefix: &str) -> Self {
        self.ip = Some(address_and_prefix.to_owned());
        self
    }

    /// The init mounts share `tag` at `mountpoint` (in the order given); a read-only
    /// share is mounted read-only, so the guest refuses writes itself.
    pub fn mount(self, kind: MountKind, tag: &str, mountpoint: &str, read_only: bool) -> Self {
        self.mount_with(kind, tag, mountpoint, read_only, "")
    }

    /// [`KernelCmdline::mount`] with more `mount -o` options (comma-separated, no `:` or
    /// space), such as `dax=always`.
    pub fn mount_with(
        mut self,
        kind: MountKind,
        tag: &str,
        mountpoint: &str,
        read_only: bool,
        options: &str,
    ) -> Self {
        debug_assert!(!options.contains([':', ' ']), "{options}");
        self.mounts.push(Mount {
            kind,
            tag: tag.to_owned(),
            mountpoint: mountpoint.to_owned(),
            read_only,
            options: options.to_owned(),
        });
        self
    }

    /// The init runs the script at `path` (`vmbuild.cmd=`).
    pub fn command(mut self, path: &str) -> Self {
        self.init = Some(InitAction::Command(path.to_owned()));
        self
    }

    /// The init starts an interactive shell and writes its status to `path`
    /// (`vmbuild.exitfile=`).
    pub fn shell(mut self, exit_file: &str) -> Self {
        self.init = Some(InitAction::Shell {
            exit_file: exit_file.to_owned(),
        });
        self
    }

    /// The user's own parameters, last and as given (`--append`).
    pub fn extra(mut self, params: Option<&str>) -> Self {
        self.extra = params.map(str::to_owned);
        self
    }

    fn params(&self) -> Vec<String> {
        let mut p: Vec<String> = vec!["console=ttyS0".into()];
        if self.keyboard_reset {
            p.push("reboot=k".into());
        }
        p.extend(["panic=-1".into(), "quiet".into()]);
        if self.fast_boot {
            p.push("cryptomgr.notests".into());
        }
        if let Some(n) = self.serial_ports {
            p.push(format!("8250.nr_uarts={n}"));
        }
        p.push("vmbuild.quiet".into());
        if self.trust_cpu_rng {
            p.push("random.trust_cpu=on".into());
        }
        if let Some(dev) = &self.root {
            p.push(format!("vmbuild.root={dev}"));
        }
        if let Some(init) = &self.root_init {
            p.push(format!("vmbuild.rootinit={init}"));
        }
        if let Some(dev) = &self.image {
            p.push(format!("vmbuild.image={dev}"));
        }
        if !self.modules.is_empty() {
            p.push(format!("vmbuild.modules={}", self.modules.join(",")));
        }
        if let Some(ip) = &self.ip {
            p.push(format!("vmbuild.ip={ip}"));
        }
        for m in &self.mounts {
            let options: Vec<&str> = m
                .read_only
                .then_some("ro")
                .into_iter()
                .chain((!m.options.is_empty()).then_some(m.options.as_str()))
                .collect();
            let options = match options.join(",") {
                o if o.is_empty() => o,
                o => format!(":{o}"),
            };
            p.push(format!(
                "vmbuild.mount={}:{}:{}{options}",
                m.kind.name(),
                m.tag,
                m.mountpoint
            ));
        }
        match &self.init {
            Some(InitAction::Command(path)) => p.push(format!("vmbuild.cmd={path}")),
            Some(InitAction::Shell { exit_file }) => {
                p.push(format!("vmbuild.exitfile={exit_file}"))
            }
            None => {}
        }
        if let Some(extra) = &self.extra {
            p.push(extra.clone());
        }
        p
    }
}

impl fmt::Display for KernelCmdline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.params().join(" "))
    }
}

/// Whether `value` can be a parameter's value as it stands (no white space, no `"`).
pub fn fits(value: &str) -> bool {
    !value.contains(char::is_whitespace) && !value.contains('"')
}

/// Whether `path` can be a mount point or working directory on the command line:
/// absolute, [`fits`], and without `:`.
pub fn valid_mount_point(path: &str) -> bool {
    path.starts_with('/') && fits(path) && !path.contains(':')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact line each kind of guest got before the builder, built as its caller
    /// builds it now.
    #[test]
    fn each_guest_gets_the_line_it_always_got() {
        let cases: [(&str, KernelCmdline, &str); 8] = [
            (
                "vmbuild run, QEMU",
                KernelCmdline::command_guest()
                    .mount(MountKind::Virtiofs, "store", "/nix/store", true)
                    .mount(MountKind::Virtiofs, "xchg", "/tmp/xchg", false)
                    .command("/etc/vmbuild/cmd.sh")
                    .extra(Some("foo=1 bar")),
                "console=ttyS0 panic=-1 quiet cryptomgr.notests 8250.nr_uarts=3 vmbuild.quiet \
                 vmbuild.mount=virtiofs:store:/nix/store:ro vmbuild.mount=virtiofs:xchg:/tmp/xchg \
                 vmbuild.cmd=/etc/vmbuild/cmd.sh foo=1 bar",
            ),
            (
                "vmbuild run --shell, QEMU",
                KernelCmdline::command_guest()
                    .mount(MountKind::Virtiofs, "vmbuild-ctl", "/run/vmbuild", false)
                    .mount(MountKind::Virtiofs, "xchg", "/tmp/xchg", false)
                    .shell("/run/vmbuild/status"),
                "console=ttyS0 panic=-1 quiet cryptomgr.notests 8250.nr_uarts=3 vmbuild.quiet \
                 vmbuild.mount=virtiofs:vmbuild-ctl:/run/vmbuild \
                 vmbuild.mount=virtiofs:xchg:/tmp/xchg vmbuild.exitfile=/run/vmbuild/status",
            ),
            (
                "vmbuild run, embedded VMM, 9p",
                KernelCmdline::command_guest()
                    .embedded_vmm()
                    .mount(MountKind::NineP, "xchg", "/tmp/xchg", false)
                    .mount(MountKind::NineP, "share0", "/mnt/a", true)
                    .command("/etc/vmbuild/cmd.sh")
                    .extra(Some("x=y")),
                "console=ttyS0 reboot=k panic=-1 quiet cryptomgr.notests 8250.nr_uarts=3 \
                 vmbuild.quiet random.trust_cpu=on vmbuild.mount=9p:xchg:/tmp/xchg \
                 vmbuild.mount=9p:share0:/mnt/a:ro vmbuild.cmd=/etc/vmbuild/cmd.sh x=y",
            ),
            (
                "revived controller, QEMU",
                KernelCmdline::command_guest().command("/etc/vmbuild/cmd.sh"),
                "console=ttyS0 panic=-1 quiet cryptomgr.notests 8250.nr_uarts=3 vmbuild.quiet \
                 vmbuild.cmd=/etc/vmbuild/cmd.sh",
            ),
            (
                // The one line whose order changed: `reboot=k` used to come after
                // `vmbuild.quiet` (the kernel and the init read parameters in any order).
                "embedded controller",
                KernelCmdline::command_guest()
                    .embedded_vmm()
                    .command("/etc/vmbuild/cmd.sh"),
                "console=ttyS0 reboot=k panic=-1 quiet cryptomgr.notests 8250.nr_uarts=3 \
                 vmbuild.quiet random.trust_cpu=on vmbuild.cmd=/etc/vmbuild/cmd.sh",
            ),
            (
                "KVM probe, QEMU",
                KernelCmdline::probe(),
                "console=ttyS0 panic=-1 quiet vmbuild.quiet vmbuild.cmd=/nonexistent",
            ),
            (
                "embedded VMM probe",
                KernelCmdline::probe().keyboard_reset(),
                "console=ttyS0 reboot=k panic=-1 quiet vmbuild.quiet vmbuild.cmd=/nonexistent",
            ),
            (
                "installed linux target",
                KernelCmdline::new()
                    .fast_boot()
                    .root("/dev/vda")
                    .modules(&["fuse", "virtiofs"])
                    .ip("10.0.2.15/24"),
                "console=ttyS0 panic=-1 quiet cryptomgr.notests vmbuild.quiet \
                 vmbuild.root=/dev/vda vmbuild.modules=fuse,virtiofs vmbuild.ip=10.0.2.15/24",
            ),
        ];
        for (who, cmdline, want) in cases {
            assert_eq!(cmdline.to_string(), want, "{who}");
        }
    }

    #[test]
    fn values_that_the_init_cannot_read_are_told_apart() {
        assert!(valid_mount_point("/mnt/a-b_c.d"));
        for bad in ["mnt", "/mnt/a b", "/mnt/a\tb", "/mnt/a:b", "/mnt/\"a\""] {
            assert!(!valid_mount_point(bad), "{bad}");
        }
        assert!(fits("fuse,virtiofs") && !fits("a b"));
    }

    #[test]
    fn mount_options_follow_ro() {
        let line = KernelCmdline::command_guest()
            .mount_with(MountKind::Virtiofs, "store", "/s", true, "dax=always")
            .mount_with(MountKind::Virtiofs, "w", "/w", false, "dax=always")
            .mount_with(MountKind::Virtiofs, "plain", "/p", false, "")
            .to_string();
        assert!(
            line.contains(" vmbuild.mount=virtiofs:store:/s:ro,dax=always"),
            "{line}"
        );
        assert!(
            line.contains(" vmbuild.mount=virtiofs:w:/w:dax=always"),
            "{line}"
        );
        assert!(line.contains(" vmbuild.mount=virtiofs:plain:/p"), "{line}");
        assert!(!line.contains("/p:"), "{line}");
    }

    /// The kit's init reads the parameters this module writes.
    #[test]
    fn the_kits_init_reads_these_parameters() {
        let init = include_str!("../../../guest/init");
        for param in [
            "vmbuild.quiet)",
            "vmbuild.cmd=*)",
            "vmbuild.exitfile=*)",
            "vmbuild.mount=*)",
            "vmbuild.modules=*)",
            "vmbuild.root=*)",
            "vmbuild.image=*)",
            "vmbuild.rootinit=*)",
        ] {
            assert!(init.contains(param), "guest/init does not read {param}");
        }
    }
}
