//! `vmbuild switch`: the L2 switch on its own, in the foreground, as a drop-in for
//! vde_switch (its data socket directory `-s DIR` included, so QEMU's `-netdev vde` and
//! `vde_plug` connect as they would to vde_switch); and `vmbuild switch ctl` to talk to its
//! management console.

mod ctl;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use vswitch::managed::ManagedSwitch;
use vswitch::mgmt::MgmtServer;
use vswitch::vde_plug::VdeOptions;
use vswitch::{Switch, SwitchConfig, VlanMode};

use crate::exit;
use crate::signals::TermSignals;

const PREFIX: &str = "vmbuild switch";

/// The most ports `-n` may ask for.
const MAX_PORTS: i64 = 65_535;
/// The longest `--aging`: a day.
const MAX_AGING: i64 = 86_400;

#[derive(Args, Debug)]
#[command(
    args_conflicts_with_subcommands = true,
    verbatim_doc_comment,
    after_help = "\
vde_switch flags, as vmbuild takes them:
  done:    -s/--sock/--vdesock/--unix DIR, -m/--mode, --dirmode, -g/--group, -M/--mgmt,
           --mgmtmode, --mgmtgroup, -t/--tap, -x/--hub, -n/--numports, -H/--hashsize,
           -p/--pidfile
  refused (exit 2, saying what to use): -d/--daemon, -F/--fstp, --macaddr, --priority,
           -f/--rcfile, -D/--debugclients

Exit status:
  0  stopped by SIGINT, SIGTERM or SIGHUP (taps and sockets removed)
  1  failed while running
  2  bad command line or input (nothing was started)

Environment: RUST_LOG (log filter, e.g. RUST_LOG=debug shows every port's comings and goings)."
)]
pub struct SwitchArgs {
    #[command(subcommand)]
    ctl: Option<SwitchCommand>,

    #[command(flatten)]
    options: Box<SwitchOptions>,
}

/// The switch's own flags (boxed: the command enum stays small).
#[derive(Args, Debug)]
struct SwitchOptions {
    /// A VDE switch directory, as vde_switch's: created if missing; clients connect to
    /// DIR/ctl with libvdeplug (`qemu -netdev vde,id=n,sock=DIR`, `vde_plug DIR`) and each
    /// gets a port (vde_switch: -s/--sock)
    #[arg(short = 's', long, visible_aliases = ["vdesock", "unix"], value_name = "DIR")]
    sock: Vec<PathBuf>,

    /// Permissions of DIR/ctl and the ports' sockets, octal (vde_switch: -m/--mode)
    #[arg(short = 'm', long, value_name = "MODE", value_parser = octal_mode)]
    mode: Option<u32>,

    /// Permissions of DIR when it is created, octal (vde_switch: --dirmode); default: the
    /// classes of --mode, searchable
    #[arg(long, value_name = "MODE", value_parser = octal_mode)]
    dirmode: Option<u32>,

    /// Group of DIR and its sockets, a name or a number (vde_switch: -g/--group)
    #[arg(short = 'g', long, value_name = "GROUP")]
    group: Option<String>,

    /// Management console socket; its directory must exist (vde_switch: -M/--mgmt)
    #[arg(short = 'M', long, value_name = "SOCKET")]
    mgmt: Option<PathBuf>,

    /// Permissions of the --mgmt socket, octal (vde_switch: --mgmtmode)
    #[arg(long, value_name = "MODE", value_parser = octal_mode)]
    mgmtmode: Option<u32>,

    /// Group of the --mgmt socket (vde_switch: --mgmtgroup)
    #[arg(long, value_name = "GROUP")]
    mgmtgroup: Option<String>,

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

    /// The most ports at once, 1-65535; more are refused (vde_switch: -n/--numports)
    #[arg(short = 'n', long, value_name = "N", allow_negative_numbers = true)]
    numports: Option<i64>,

    /// MAC table entries, 1-1048576 (vde_switch: -H/--hashsize)
    #[arg(short = 'H', long, visible_alias = "hashsize", value_name = "N",
          allow_negative_numbers = true,
          default_value_t = vswitch::mac_table::DEFAULT_CAPACITY as i64)]
    mac_table_size: i64,

    /// Plain MTU-sized frames on taps (no virtio-net header, GSO or checksum offload;
    /// with them, the switch cuts TCP segments for -s and --stream ports, which take
    /// plain frames only)
    #[arg(long)]
    no_offload: bool,

    /// Seconds before a MAC entry is forgotten, 1-86400
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 300,
        allow_negative_numbers = true
    )]
    aging: i64,

    /// Write the switch's process id to FILE, removed when it stops (vde_switch: -p/--pidfile)
    #[arg(short = 'p', long, value_name = "FILE")]
    pidfile: Option<PathBuf>,

    // vde_switch flags refused with a line that says what to use instead.
    #[arg(short = 'd', long, hide = true)]
    daemon: bool,
    #[arg(short = 'F', long, hide = true)]
    fstp: bool,
    #[arg(long, hide = true, value_name = "MAC")]
    macaddr: Option<String>,
    #[arg(long, hide = true, value_name = "N", allow_negative_numbers = true)]
    priority: Option<String>,
    #[arg(short = 'f', long, hide = true, value_name = "FILE")]
    rcfile: Option<String>,
    #[arg(
        short = 'D',
        long,
        hide = true,
        value_name = "N",
        allow_negative_numbers = true
    )]
    debugclients: Option<String>,
}

#[derive(Subcommand, Debug)]
enum SwitchCommand {
    /// Send one command to a running switch's console and print the answer
    #[command(after_help = ctl::AFTER_HELP)]
    Ctl {
        /// The switch's --mgmt socket
        socket: PathBuf,
        /// The command (try `help`); add --json (or put `json` first) for one line of JSON
        #[arg(required = true, num_args = 1.., trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
}

/// Everything checked and parsed, before anything starts.
struct Plan {
    config: SwitchConfig,
    offloads: bool,
    taps: Vec<(String, VlanMode)>,
    vhost_ports: Vec<(PathBuf, VlanMode)>,
    stream_ports: Vec<(PathBuf, VlanMode)>,
    vde_dirs: Vec<PathBuf>,
    vde: VdeOptions,
    mgmt: Option<PathBuf>,
    mgmt_mode: Option<u32>,
    mgmt_group: Option<u32>,
    pidfile: Option<PathBuf>,
}

impl SwitchArgs {
    pub fn run(self) -> anyhow::Result<i32> {
        if let Some(SwitchCommand::Ctl { socket, command }) = &self.ctl {
            return Ok(ctl::ctl(socket, &command.join(" ")));
        }
        let plan = match self.options.plan() {
            Ok(plan) => plan,
            Err(e) => {
                eprintln!("{PREFIX}: {e}");
                return Ok(exit::USAGE);
            }
        };
        Ok(serve(plan))
    }
}

impl SwitchOptions {
    /// Checks the command line and what it names, without changing anything but stale
    /// sockets (removed) and the pid file (created, to know it can be written).
    fn plan(&self) -> Result<Plan, String> {
        self.refuse_unsupported()?;
        let mac_table_size = bounded(
            "--mac-table-size (-H/--hashsize)",
            self.mac_table_size,
            1,
            vswitch::mac_table::MAX_CAPACITY as i64,
            "",
        )?;
        let aging = bounded("--aging", self.aging, 1, MAX_AGING, " seconds")?;
        let max_ports = match self.numports {
            Some(n) => bounded("-n/--numports", n, 1, MAX_PORTS, "")?,
            None => usize::MAX,
        };

        let taps = self.taps()?;
        let sockets = |flag: &str, specs: &[String]| -> Result<Vec<(PathBuf, VlanMode)>, String> {
            specs
                .iter()
                .map(|spec| {
                    let (path, mode) =
                        port_spec(spec).map_err(|e| format!("{flag} {spec}: {e}"))?;
                    let path = PathBuf::from(path);
                    parent_exists(flag, &path)?;
                    Ok((path, mode))
                })
                .collect()
        };
        let vhost_ports = sockets("--vhost-user", &self.vhost_user)?;
        let stream_ports = sockets("--stream", &self.stream)?;
        if let Some(m) = &self.mgmt {
            parent_exists("-M/--mgmt", m)?;
        }
        let vde_ctl = self.vde_ctl_sockets()?;
        if self.mgmt.is_none()
            && taps.is_empty()
            && vhost_ports.is_empty()
            && stream_ports.is_empty()
            && self.sock.is_empty()
        {
            return Err(
                "nothing to switch: give -s DIR, --tap, --vhost-user or --stream \
                        (or -M SOCKET to add ports later with `vmbuild switch ctl`)"
                    .into(),
            );
        }
        let group = self.group.as_deref().map(group_id).transpose()?;
        let mgmt_group = self.mgmtgroup.as_deref().map(group_id).transpose()?;
        let mode = self.mode.unwrap_or(0o600);

        let mut claimed: Vec<&Path> = self.mgmt.iter().map(|p| p.as_path()).collect();
        claimed.extend(vhost_ports.iter().map(|(p, _)| p.as_path()));
        claimed.extend(stream_ports.iter().map(|(p, _)| p.as_path()));
        claimed.extend(vde_ctl.iter().map(|p| p.as_path()));
        for (i, dir) in self.sock.iter().enumerate() {
            if self.sock[..i].contains(dir) {
                return Err(format!("-s {} is given twice", dir.display()));
            }
        }
        super::socket_path::claim(&claimed)?;
        if let Some(p) = &self.pidfile {
            std::fs::write(p, "").map_err(|e| format!("-p/--pidfile {}: {e}", p.display()))?;
        }
        Ok(Plan {
            config: SwitchConfig {
                hub: self.hub,
                mac_table_size,
                aging: Duration::from_secs(aging as u64),
                max_ports,
                ..SwitchConfig::default()
            },
            // Ports that take plain frames only (-s, --stream) get a tap's 64 KiB TCP
            // segments cut to MTU size by the switch.
            offloads: !self.no_offload,
            taps,
            vhost_ports,
            stream_ports,
            vde_dirs: self.sock.clone(),
            vde: VdeOptions {
                mode,
                dir_mode: self
                    .dirmode
                    .unwrap_or_else(|| VdeOptions::dir_mode_for(mode)),
                group,
                vlan: VlanMode::default(),
            },
            mgmt: self.mgmt.clone(),
            mgmt_mode: self.mgmtmode,
            mgmt_group,
            pidfile: self.pidfile.clone(),
        })
    }

    /// `--tap NAME[=MODE]`: each once, and each a tap (or a name still free).
    fn taps(&self) -> Result<Vec<(String, VlanMode)>, String> {
        let mut taps: Vec<(String, VlanMode)> = Vec::new();
        for spec in &self.tap {
            let (name, mode) = port_spec(spec).map_err(|e| format!("--tap {spec}: {e}"))?;
            vswitch::tap::check_name(name).map_err(|e| format!("--tap {spec}: {e}"))?;
            if taps.iter().any(|(n, _)| n == name) {
                return Err(format!(
                    "--tap {name} is given twice: each tap can be one port only"
                ));
            }
            let sys = Path::new("/sys/class/net").join(name);
            if sys.exists() && !sys.join("tun_flags").exists() {
                return Err(format!(
                    "--tap {name}: {name} exists and is not a tap (choose another name)"
                ));
            }
            taps.push((name.to_owned(), mode));
        }
        Ok(taps)
    }

    /// `-s DIR`: the control sockets of the VDE directories that exist already (checked
    /// like every other socket path before anything starts).
    fn vde_ctl_sockets(&self) -> Result<Vec<PathBuf>, String> {
        let mut vde_ctl = Vec::new();
        for dir in &self.sock {
            parent_exists("-s/--sock", dir)?;
            match std::fs::metadata(dir) {
                Ok(m) if !m.is_dir() => {
                    return Err(format!(
                        "-s {}: exists and is not a directory (vde_switch's -s names a directory)",
                        dir.display()
                    ))
                }
                Ok(_) => vde_ctl.push(dir.join("ctl")),
                Err(_) => {}
            }
        }
        Ok(vde_ctl)
    }

    fn refuse_unsupported(&self) -> Result<(), String> {
        if self.daemon {
            return Err(
                "-d/--daemon is not supported: run it under systemd (Type=simple), or \
                        in the background with `vmbuild switch ... &` (add -p FILE for its pid)"
                    .into(),
            );
        }
        let no_stp = "vmbuild switch has no spanning tree: build loop-free topologies \
                      (each pair of switches joined once)";
        if self.fstp {
            return Err(format!("-F/--fstp is not supported: {no_stp}"));
        }
        if self.macaddr.is_some() {
            return Err(format!(
                "--macaddr is not supported (it names the switch in spanning-tree frames): {no_stp}"
            ));
        }
        if self.priority.is_some() {
            return Err(format!(
                "--priority is not supported (a spanning-tree priority): {no_stp}"
            ));
        }
        if self.rcfile.is_some() {
            return Err("-f/--rcfile is not supported: give the commands with \
                        `vmbuild switch ctl SOCKET COMMAND` once the switch runs"
                .into());
        }
        if self.debugclients.is_some() {
            return Err(
                "-D/--debugclients is not supported: RUST_LOG=debug logs every \
                        port's traffic events to stderr"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Runs the switch until a signal; returns the exit status.
fn serve(plan: Plan) -> i32 {
    let signals = match TermSignals::block() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{PREFIX}: blocking SIGINT/SIGTERM/SIGHUP: {e}");
            return exit::FAILURE;
        }
    };
    let switch = Switch::new(plan.config.clone());
    let managed = ManagedSwitch::new(switch.clone(), plan.offloads);
    let status = match start(&plan, &managed) {
        Ok(mgmt) => {
            // Aging runs beside the traffic, a few times per aging period.
            let ager = switch.clone();
            let period = plan
                .config
                .aging
                .div_f64(4.0)
                .max(Duration::from_millis(250));
            std::thread::spawn(move || loop {
                std::thread::sleep(period);
                ager.age();
            });
            tracing::info!(
                "switch running ({} ports); SIGINT, SIGTERM or SIGHUP stops it",
                switch.ports().len()
            );
            let status = match signals.wait() {
                Ok(signal) => {
                    tracing::info!("{signal:?}: stopping; removing taps and sockets");
                    exit::SUCCESS
                }
                Err(e) => {
                    eprintln!("{PREFIX}: waiting for a signal: {e}");
                    exit::FAILURE
                }
            };
            drop(mgmt);
            status
        }
        Err(e) => {
            eprintln!("{PREFIX}: {e:#}");
            // A tap without CAP_NET_ADMIN, a socket in a directory of someone else's:
            // what this user may do, not a failure of the switch (exit 2, as the message
            // says what is missing).
            let denied = e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
            });
            if denied {
                exit::USAGE
            } else {
                exit::FAILURE
            }
        }
    };
    managed.close_all();
    if let Some(p) = &plan.pidfile {
        // Only a pid file that still names this process.
        if std::fs::read_to_string(p).is_ok_and(|s| s.trim() == std::process::id().to_string()) {
            let _ = std::fs::remove_file(p);
        }
    }
    status
}

/// Opens every port and socket of `plan`; the console server comes back to be kept.
fn start(
    plan: &Plan,
    managed: &std::sync::Arc<ManagedSwitch>,
) -> anyhow::Result<Option<MgmtServer>> {
    for (name, mode) in &plan.taps {
        let id = managed
            .add_tap(name, mode.clone())
            .with_context(|| format!("--tap {name}"))?;
        tracing::info!(port = id, tap = %name, "port added");
    }
    for (path, mode) in &plan.vhost_ports {
        let id = managed
            .add_vhost_user(path, mode.clone())
            .with_context(|| format!("--vhost-user {}", path.display()))?;
        tracing::info!(port = id, socket = %path.display(), "port added");
    }
    for (path, mode) in &plan.stream_ports {
        let id = managed
            .add_stream(path, mode.clone())
            .with_context(|| format!("--stream {}", path.display()))?;
        tracing::info!(port = id, socket = %path.display(), "port added");
    }
    for dir in &plan.vde_dirs {
        managed
            .add_vde(dir, plan.vde.clone())
            .with_context(|| format!("-s {}", dir.display()))?;
        tracing::info!(dir = %dir.display(), "VDE switch directory ready (DIR/ctl)");
    }
    let mgmt = match &plan.mgmt {
        Some(path) => {
            let server = MgmtServer::start(managed.clone(), path)
                .with_context(|| format!("-M {}", path.display()))?;
            if let Some(mode) = plan.mgmt_mode {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                    .with_context(|| format!("--mgmtmode on {}", path.display()))?;
            }
            if let Some(gid) = plan.mgmt_group {
                std::os::unix::fs::lchown(path, None, Some(gid))
                    .with_context(|| format!("--mgmtgroup on {}", path.display()))?;
            }
            Some(server)
        }
        None => None,
    };
    if let Some(p) = &plan.pidfile {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing the pid file {}", p.display()))?;
    }
    Ok(mgmt)
}

/// `value` within `min..=max`, or a message that names the flag and the range.
fn bounded(flag: &str, value: i64, min: i64, max: i64, unit: &str) -> Result<usize, String> {
    if value < min || value > max {
        return Err(format!(
            "{flag} must be from {min} to {max}{unit} (got {value})"
        ));
    }
    Ok(value as usize)
}

fn parent_exists(flag: &str, path: &Path) -> Result<(), String> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => return Ok(()),
    };
    if parent.is_dir() {
        Ok(())
    } else {
        Err(format!(
            "{flag} {}: the directory {} does not exist (create it first)",
            path.display(),
            parent.display()
        ))
    }
}

fn octal_mode(text: &str) -> Result<u32, String> {
    match u32::from_str_radix(text, 8) {
        Ok(m) if m <= 0o7777 => Ok(m),
        _ => Err(format!("'{text}' is not an octal mode (like 660)")),
    }
}

/// A group name or number, as vde_switch's -g takes it.
fn group_id(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(format!("no group named '{name}'")),
        Err(e) => Err(format!("looking up group '{name}': {e}")),
    }
}

/// `WHERE` or `WHERE=VLANMODE` (access:VID, trunk[:native=VID][:VID,...]); access:1 by default.
fn port_spec(spec: &str) -> Result<(&str, VlanMode), String> {
    match spec.split_once('=') {
        Some((place, mode)) => Ok((place, VlanMode::parse(mode)?)),
        None => Ok((spec, VlanMode::default())),
    }
}
