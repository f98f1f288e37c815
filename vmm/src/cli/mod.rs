//! The command line: one subcommand per capability.

mod bench;
mod bootstrap;
mod build;
mod command_args;
mod doctor;
mod fs;
mod guest_mounts;
mod image;
mod run;
mod signal_channel;
mod snapshot;
mod socket_path;
mod switch;
mod usage;
mod values;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "vmbuild",
    version,
    about = "Run builds and tests inside virtual machines, reproducibly and fast, from one process",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve host directories to guests over virtio-fs (vhost-user), like virtiofsd
    #[command(subcommand)]
    Fs(fs::FsCommand),
    /// Run a command in a fresh Linux VM with the store and xchg shared; exit with its code
    Run(Box<run::RunArgs>),
    /// Install a target once and suspend it to a snapshot directory
    Bootstrap(Box<bootstrap::BootstrapArgs>),
    /// Revive a snapshot, run a command in its target over SSH, exit with its code
    Build(Box<build::BuildArgs>),
    /// Distribution images from packages (Debian, Ubuntu), for `run --image`
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Inspect or verify a snapshot directory
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// What this host can do (KVM, QEMU features, tun, the guest kit), with fix hints
    Doctor(doctor::DoctorArgs),
    /// An L2 learning switch over taps, with a management console (replaces vde_switch)
    Switch(switch::SwitchArgs),
    /// Measure vmbuild against its peers (virtiofsd, 9p, vde_switch, the bridge, gzip)
    Bench(Box<bench::BenchArgs>),
}

impl Cli {
    /// `vmbuild SUBCOMMAND`, the prefix of every message the subcommand prints.
    pub fn prefix(&self) -> &'static str {
        match &self.command {
            Command::Fs(_) => "vmbuild fs serve",
            Command::Run(_) => "vmbuild run",
            Command::Switch(_) => "vmbuild switch",
            Command::Doctor(_) => "vmbuild doctor",
            Command::Bootstrap(_) => "vmbuild bootstrap",
            Command::Build(_) => "vmbuild build",
            Command::Snapshot(_) => "vmbuild snapshot",
            Command::Image(_) => "vmbuild image",
            Command::Bench(_) => "vmbuild bench",
        }
    }

    /// Runs the chosen subcommand and returns the process exit code.
    pub fn run(self) -> anyhow::Result<i32> {
        match self.command {
            Command::Fs(cmd) => cmd.run(),
            Command::Run(args) => args.run(),
            Command::Switch(args) => args.run(),
            Command::Doctor(args) => args.run(),
            Command::Bootstrap(args) => args.run(),
            Command::Build(args) => args.run(),
            Command::Snapshot(cmd) => cmd.run(),
            Command::Image(cmd) => cmd.run(),
            Command::Bench(args) => args.run(),
        }
    }
}
