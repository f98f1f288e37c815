//! The benchmark suites `vmbuild bench` runs, the engine binary behind each, and the
//! peers each compares vmbuild against: which are installed, and how to install the rest.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The build suite's work directory: kept between runs for the GNU Hello tarball; its
/// `root` is where the toolchain image is loop-mounted during a run.
pub const BUILD_WORKDIR: &str = "/var/tmp/vmbuild-image-bench";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Suite {
    /// virtio-fs: vmbuild's server against virtiofsd and QEMU's 9p
    Fs,
    /// switching: vmbuild switch against vde_switch and the Linux bridge
    Switch,
    /// suspend and revive: vmbuild's snapshot formats against the gzip method
    Snapshot,
    /// a QEMU guest's NIC: vhost-user-net on vmbuild switch against `-netdev vde`
    Nic,
    /// a real build (GNU Hello) in vmbuild's image against virtiofsd, 9p and RAM; the
    /// image build against mmdebstrap
    Build,
    /// the store through a DAX window: Linux guests on KVM (the embedded VMM with and
    /// without DAX, QEMU+KVM with virtiofsd), inside a nested KVM host
    Dax,
    /// `vmbuild run` against the recipe it replaces: QEMU and two virtiofsd by hand
    Run,
    /// `vmbuild build` (revive a snapshot) against `vmbuild run` (a fresh boot)
    Lifecycle,
    /// the 9P2000.L server against diod, over loopback TCP and from a Linux guest
    Ninep,
    /// the embedded VMM against QEMU: VM creation, snapshot restore at 256–1024 MiB, the
    /// controller's restore (on this host's KVM; the guests are not Linux)
    Kvm,
    /// the embedded VMM's NIC into the switch: an in-process port against a tap
    VmmNic,
    /// the embedded VMM against QEMU+KVM with Linux guests (boot, run, build, restore),
    /// inside a nested KVM host
    LinuxKvm,
}

impl Suite {
    pub const ALL: [Suite; 12] = [
        Suite::Fs,
        Suite::Switch,
        Suite::Snapshot,
        Suite::Nic,
        Suite::Build,
        Suite::Dax,
        Suite::Run,
        Suite::Lifecycle,
        Suite::Ninep,
        Suite::Kvm,
        Suite::VmmNic,
        Suite::LinuxKvm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Suite::Fs => "fs",
            Suite::Switch => "switch",
            Suite::Snapshot => "snapshot",
            Suite::Nic => "nic",
            Suite::Build => "build",
            Suite::Dax => "dax",
            Suite::Run => "run",
            Suite::Lifecycle => "lifecycle",
            Suite::Ninep => "9p-server",
            Suite::Kvm => "kvm",
            Suite::VmmNic => "vmm-nic",
            Suite::LinuxKvm => "linux-kvm",
        }
    }

    /// The binary (from the `vmbuild-benches` package) that measures this suite.
    pub fn engine(self) -> &'static str {
        match self {
            Suite::Fs => "fs-bench",
            Suite::Switch => "switch-bench",
            Suite::Snapshot => "snapshot-bench",
            Suite::Nic => "vde-bench",
            Suite::Build => "image-bench",
            // fs-bench --kvm, run by the nested KVM host script (see `nested_host`).
            Suite::Dax => "fs-bench",
            Suite::Run => "run-bench",
            Suite::Lifecycle => "lifecycle-bench",
            Suite::Ninep => "ninep-bench",
            Suite::Kvm => "kvm-bench",
            Suite::VmmNic => "nic-bench",
            Suite::LinuxKvm => "linux-kvm-bench",
        }
    }

    /// The peers this suite can run beside vmbuild.
    pub fn peers(self) -> &'static [Peer] {
        match self {
            Suite::Fs => &[Peer::Virtiofsd, Peer::NineP],
            Suite::Switch => &[Peer::Vde, Peer::Bridge],
            Suite::Snapshot => &[Peer::Gzip],
            Suite::Nic => &[Peer::Vde],
            Suite::Build => &[Peer::Virtiofsd, Peer::NineP, Peer::Mmdebstrap],
            Suite::Dax => &[Peer::Virtiofsd],
            Suite::Run => &[Peer::Virtiofsd],
            Suite::Ninep => &[Peer::Diod],
            Suite::Lifecycle | Suite::Kvm | Suite::VmmNic | Suite::LinuxKvm => &[],
        }
    }

    /// Whether the suite's engine needs a work directory on a disk file system.
    /// Whether the suite's engine runs inside the nested KVM host (its guests need a KVM
    /// that runs Linux, which this host's own may not be).
    pub fn nested(self) -> bool {
        matches!(self, Suite::Dax | Suite::LinuxKvm)
    }

    /// The peer every ratio of the suite is against: it runs even when `--peers` leaves
    /// it out.
    pub fn baseline(self) -> Option<Peer> {
        match self {
            Suite::Snapshot => Some(Peer::Gzip),
            // The recipe `vmbuild run` replaces is QEMU with virtiofsd.
            Suite::Run => Some(Peer::Virtiofsd),
            Suite::Ninep => Some(Peer::Diod),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Peer {
    Virtiofsd,
    NineP,
    Vde,
    Bridge,
    Gzip,
    Mmdebstrap,
    Diod,
}

impl Peer {
    pub const ALL: [Peer; 7] = [
        Peer::Virtiofsd,
        Peer::NineP,
        Peer::Vde,
        Peer::Bridge,
        Peer::Gzip,
        Peer::Mmdebstrap,
        Peer::Diod,
    ];

    /// The name `--peers` takes and the engines understand.
    pub fn name(self) -> &'static str {
        match self {
            Peer::Virtiofsd => "virtiofsd",
            Peer::NineP => "9p",
            Peer::Vde => "vde",
            Peer::Bridge => "bridge",
            Peer::Gzip => "gzip",
            Peer::Mmdebstrap => "mmdebstrap",
            Peer::Diod => "diod",
        }
    }

    pub fn parse(name: &str) -> Option<Peer> {
        Peer::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Why this peer cannot run here and how to make it run, or `None` when it can.
    pub fn missing(self, qemu: &Path) -> Option<String> {
        match self {
            // Where the fs engine looks: PATH, then cargo's bin directory.
            Peer::Virtiofsd => (!on_path("virtiofsd")
                && !std::env::var_os("HOME")
                    .is_some_and(|h| Path::new(&h).join(".cargo/bin/virtiofsd").is_file()))
            .then(|| {
                "virtiofsd is not installed: cargo install --locked virtiofsd --version 1.14.0 \
                 (needs libseccomp-dev libcap-ng-dev; the README's install command does it)"
                    .into()
            }),
            Peer::NineP => {
                let devices = Command::new(qemu).args(["-device", "help"]).output();
                match devices {
                    Ok(o) if String::from_utf8_lossy(&o.stdout).contains("virtio-9p") => None,
                    _ => Some(format!(
                        "{} has no virtio-9p device: apt-get install qemu-system-x86",
                        qemu.display()
                    )),
                }
            }
            Peer::Vde => (!on_path("vde_switch"))
                .then(|| "vde_switch is not installed: apt-get install vde2".into()),
            Peer::Bridge => (!nix::unistd::geteuid().is_root()).then(|| {
                "the Linux bridge needs root (network namespaces and links): run as root".into()
            }),
            Peer::Gzip => {
                (!on_path("gzip")).then(|| "gzip is not installed: apt-get install gzip".into())
            }
            Peer::Mmdebstrap => (!on_path("mmdebstrap"))
                .then(|| "mmdebstrap is not installed: apt-get install mmdebstrap".into()),
            Peer::Diod => (!on_path("diod") && !Path::new("/usr/sbin/diod").is_file())
                .then(|| "diod is not installed: apt-get install diod".into()),
        }
    }
}

/// What a suite needs beyond its peers, or `None` when it has it.
pub fn suite_missing(suite: Suite) -> Option<String> {
    match suite {
        Suite::Switch if !nix::unistd::geteuid().is_root() => Some(
            "the switch suite makes network namespaces and taps: run it as root".into(),
        ),
        Suite::Nic if !nix::unistd::geteuid().is_root() => Some(
            "the nic suite gives the switch a tap in a network namespace: run it as root".into(),
        ),
        Suite::Build if !nix::unistd::geteuid().is_root() => Some(
            "the build suite loop-mounts the toolchain image for its peers: run it as root"
                .into(),
        ),
        Suite::Dax | Suite::LinuxKvm if !nix::unistd::geteuid().is_root() => Some(format!(
            "the {} suite's nested KVM host shares this host's root file system: run it as root",
            suite.name()
        )),
        Suite::Dax | Suite::LinuxKvm => nested_host().err(),
        Suite::VmmNic if !nix::unistd::geteuid().is_root() => Some(
            "the vmm-nic suite's tap port needs CAP_NET_ADMIN: run it as root".into(),
        ),
        Suite::Kvm if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err() =>
        {
            Some("the kvm suite needs /dev/kvm, readable and writable (group kvm)".into())
        }
        Suite::Switch if !on_path("iperf3") => {
            Some("iperf3 is not installed: apt-get install iperf3".into())
        }
        Suite::Fs if !on_path("gcc") => Some(
            "gcc (which builds the guest's benchmark program) is not installed: apt-get install gcc libc6-dev".into(),
        ),
        _ => None,
    }
}

/// The script that runs a command in a nested KVM host (a TCG guest with SVM whose KVM
/// runs Linux): `vmbuild-nested-kvm-host` beside vmbuild or on PATH (scripts/install.sh
/// installs it), or `scripts/nested-kvm-host.sh` of the source tree vmbuild was built in.
pub fn nested_host() -> Result<PathBuf, String> {
    const NAME: &str = "vmbuild-nested-kvm-host";
    if let Ok(exe) = std::env::current_exe() {
        if exe.with_file_name(NAME).is_file() {
            return Ok(exe.with_file_name(NAME));
        }
    }
    if let Some(p) = which(NAME) {
        return Ok(p);
    }
    let tree = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/nested-kvm-host.sh");
    if tree.is_file() {
        return Ok(tree);
    }
    Err(format!(
        "the dax suite runs its guests in a nested KVM host, and {NAME} was found neither next to vmbuild nor on PATH: scripts/install.sh installs it"
    ))
}

/// The engine binary: next to this vmbuild (as `cargo build --release` leaves them), or on
/// PATH.
pub fn find_engine(suite: Suite) -> Result<PathBuf, String> {
    let name = suite.engine();
    if let Ok(exe) = std::env::current_exe() {
        let beside = exe.with_file_name(name);
        if beside.is_file() {
            return Ok(beside);
        }
    }
    which(name).ok_or_else(|| {
        format!(
            "the {} suite's engine {name} was found neither next to vmbuild nor on PATH: \
             build it with `cargo build --release -p vmbuild-benches` (the README's install \
             command does)",
            suite.name()
        )
    })
}

pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

fn on_path(program: &str) -> bool {
    which(program).is_some()
}

/// The first line a program prints for `--version` (or `-V`), if it runs.
pub fn version_of(program: &str, flag: &str) -> Option<String> {
    let out = Command::new(program)
        .arg(flag)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_owned())
}
