//! `vmbuild switch`: the L2 switch on its own, in the foreground, like vde_switch; and
//! `vmbuild switch ctl` to talk to its management console.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use vswitch::managed::ManagedSwitch;
use vswitch::mgmt::{self, MgmtServer};
use vswitch::{Switch, SwitchConfig, VlanMode};

use crate::exit;
use crate::signals::TermSignals;

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SwitchArgs {
    #[command(subcommand)]
    ctl: Option<SwitchCommand>,

    /// Management console socket (vde_switch: -M/--mgmt)
    #[arg(short = 'M', long, value_name = "SOCKET")]
    mgmt: Option<PathBuf>,

    /// A tap port, created (or attached if it exists): NAME or NAME=VLANMODE, where
    /// VLANMODE is access:VID or trunk[:native=VID][:VID,VID] (vde_switch: -t/--tap)
    #[arg(short = 't', long, value_name = "NAME[=MODE]")]
    tap: Vec<String>,

    /// A vhost-user-net port: PATH or PATH=VLANMODE; QEMU attaches with
    /// `-chardev socket,id=c,path=PATH -netdev vhost-user,id=n,chardev=c`
    #[arg(long, value_name = "PATH[=MODE]")]
    vhost_user: Vec<String>,

    /// A port for QEMU's stream netdev: PATH or PATH=VLANMODE; QEMU attaches with
    /// `-netdev stream,id=n,server=off,addr.type=unix,addr.path=PATH` (migratable)
    #[arg(long, value_name = "PATH[=MODE]")]
    stream: Vec<String>,

    /// Flood every frame, learn nothing (vde_switch: -x/--hub)
    #[arg(short = 'x', long)]
    hub: bool,

    /// MAC table entries (vde_switch: --hashsize)
    #[arg(long, alias = "hashsize", value_name = "N", default_value_t = vswitch::mac_table::DEFAULT_CAPACITY)]
    mac_table_size: usize,

    /// Plain MTU-sized frames on taps (no virtio-net header, GSO or checksum offload)
    #[arg(long)]
    no_offload: bool,

    /// Seconds before a MAC entry is forgotten
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    aging: u64,
}

#[derive(Subcommand, Debug)]
enum SwitchCommand {
    /// Send one command to a running switch's console and print the answer
    Ctl {
        /// The switch's --mgmt socket
        socket: PathBuf,
        /// The command (try `help`); prefix with `json` for JSON
        #[arg(required = true, num_args = 1.., trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
}

impl SwitchArgs {
    pub fn run(self) -> anyhow::Result<i32> {
        if let Some(SwitchCommand::Ctl { socket, command }) = self.ctl {
            return ctl(&socket, &command.join(" "));
        }
        if self.mac_table_size == 0 {
            eprintln!("vmbuild switch: --mac-table-size must be at least 1");
            return Ok(exit::USAGE);
        }
        if self.aging == 0 {
            eprintln!("vmbuild switch: --aging must be at least 1 second");
            return Ok(exit::USAGE);
        }
        let mut taps = Vec::new();
        for spec in &self.tap {
            let parsed = port_spec(spec).and_then(|(name, mode)| {
                vswitch::tap::check_name(name)?;
                Ok((name.to_owned(), mode))
            });
            match parsed {
                Ok(tap) => taps.push(tap),
                Err(e) => {
                    eprintln!("vmbuild switch: --tap {spec}: {e}");
                    return Ok(exit::USAGE);
                }
            }
        }
        let mut vhost_ports = Vec::new();
        for spec in &self.vhost_user {
            match port_spec(spec) {
                Ok((path, mode)) => vhost_ports.push((PathBuf::from(path), mode)),
                Err(e) => {
                    eprintln!("vmbuild switch: --vhost-user {spec}: {e}");
                    return Ok(exit::USAGE);
                }
            }
        }
        let mut stream_ports = Vec::new();
        for spec in &self.stream {
            match port_spec(spec) {
                Ok((path, mode)) => stream_ports.push((PathBuf::from(path), mode)),
                Err(e) => {
                    eprintln!("vmbuild switch: --stream {spec}: {e}");
                    return Ok(exit::USAGE);
                }
            }
        }
        let mut sockets: Vec<&std::path::Path> = self.mgmt.iter().map(|p| p.as_path()).collect();
        sockets.extend(vhost_ports.iter().map(|(p, _)| p.as_path()));
        sockets.extend(stream_ports.iter().map(|(p, _)| p.as_path()));
        if let Err(e) = super::socket_path::claim(&sockets) {
            eprintln!("vmbuild switch: {e}");
            return Ok(exit::USAGE);
        }
        let signals = TermSignals::block().context("blocking SIGINT/SIGTERM")?;
        let switch = Switch::new(SwitchConfig {
            hub: self.hub,
            mac_table_size: self.mac_table_size,
            aging: Duration::from_secs(self.aging),
            ..SwitchConfig::default()
        });
        // Every port here is a tap or a virtio NIC, so every port takes offloaded frames:
        // TCP crosses as 64 KiB segments with the checksums left to the receiver.
        let managed = ManagedSwitch::new(switch.clone(), !self.no_offload);
        for (name, mode) in taps {
            let id = managed
                .add_tap(&name, mode)
                .with_context(|| format!("tap {name}"))?;
            tracing::info!(port = id, tap = %name, "port added");
        }
        for (path, mode) in vhost_ports {
            let id = managed
                .add_vhost_user(&path, mode)
                .with_context(|| format!("vhost-user port {}", path.display()))?;
            tracing::info!(port = id, socket = %path.display(), "port added");
        }
        for (path, mode) in stream_ports {
            let id = managed
                .add_stream(&path, mode)
                .with_context(|| format!("stream port {}", path.display()))?;
            tracing::info!(port = id, socket = %path.display(), "port added");
        }
        let _mgmt = match &self.mgmt {
            Some(path) => Some(
                MgmtServer::start(managed.clone(), path)
                    .with_context(|| format!("management socket {}", path.display()))?,
            ),
            None => None,
        };
        // Aging runs beside the traffic, a few times per aging period.
        let ager = switch.clone();
        let period = Duration::from_secs(self.aging)
            .div_f64(4.0)
            .max(Duration::from_millis(250));
        std::thread::spawn(move || loop {
            std::thread::sleep(period);
            ager.age();
        });
        tracing::info!(
            "switch running ({} ports); SIGINT or SIGTERM stops it",
            switch.ports().len()
        );
        let signal = signals.wait().context("waiting for a signal")?;
        tracing::info!("{signal:?}: stopping; removing taps and sockets");
        managed.close_all();
        Ok(exit::SUCCESS)
    }
}

/// `WHERE` or `WHERE=VLANMODE` (access:VID, trunk[:native=VID][:VID,...]); access:1 by default.
fn port_spec(spec: &str) -> Result<(&str, VlanMode), String> {
    match spec.split_once('=') {
        Some((place, mode)) => Ok((place, VlanMode::parse(mode)?)),
        None => Ok((spec, VlanMode::default())),
    }
}

fn ctl(socket: &std::path::Path, command: &str) -> anyhow::Result<i32> {
    match mgmt::ctl(socket, command) {
        Ok(answer) => {
            print!("{answer}");
            let failed = answer.starts_with("error: ") || answer.starts_with("{\"error\"");
            Ok(if failed { exit::FAILURE } else { exit::SUCCESS })
        }
        Err(e) => {
            eprintln!("vmbuild switch ctl: cannot reach {}: {e}", socket.display());
            Ok(exit::USAGE)
        }
    }
}
