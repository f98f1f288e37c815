//! `vmbuild run`: parse and check everything first (bad input exits 2 with nothing
//! started), then hand a `RunSpec` to the workflow.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::io::IsTerminal;

use clap::Args;

use super::command_args::{CommandEnv, SharedDirs};

use super::guest_mounts::{self, GuestMount, Protected};

use crate::accel::vmm_choice::{VmmChoice, VmmRequest};
use crate::accel::{self, AccelChoice};
use crate::exit;
use crate::guest::command_script::valid_env_name;
use crate::guest::kit::GuestKit;
use crate::qemu::QemuBinary;
use crate::vm::run::{run, Disk, DiskMode, ExtraShare, RunEnd, RunSpec, ShareProtocol, Vmm};

/// The least memory the guest kit's kernel boots in, with room for a command.
const MIN_MEMORY_MIB: u32 = 128;

#[derive(Args, Debug)]
#[command(after_help = "\
The command's stdin is /dev/null; its stdout and stderr are vmbuild's. The guest console
goes to stderr, each line marked [guest], or to --log FILE.

Exit status: the command's own, or
  2    bad command line or input (nothing was started)
  123  the VM produced no exit code (kernel panic, crash, early power-off)
  124  --timeout expired (the VM was killed)
  125  vmbuild or the guest's init failed (QEMU would not start, a share would not mount,
       the disk could not be written on the host: a full file system)
  127  the command is not in the guest
  130  interrupted (SIGINT, SIGTERM or SIGHUP); the VM was stopped and cleaned up
A command that itself exits 123, 124, 125 or 127 cannot be told apart from these.

Environment: VMBUILD_QEMU (the QEMU binary), VMBUILD_GUEST_KIT (the guest kit directory),
XDG_RUNTIME_DIR (where sockets go),
XDG_CACHE_HOME (probe answers, verification stamps), TMPDIR (the temporary xchg), RUST_LOG (log filter),
NO_COLOR (no colours in log lines).")]
pub struct RunArgs {
    #[command(flatten)]
    dirs: SharedDirs,
    /// Extra share HOST:GUEST[:ro|:rw] (repeatable; read-write unless :ro)
    #[arg(long, value_name = "HOST:GUEST[:ro]")]
    share: Vec<String>,
    #[command(flatten)]
    command_env: CommandEnv,
    /// Guest memory: MiB, or with a unit (512M, 2G); at most the host's RAM
    #[arg(long, value_name = "SIZE", default_value = "512", allow_negative_numbers = true,
          value_parser = super::values::memory_mib)]
    memory: u32,
    /// Guest vCPUs, 1 to 255
    #[arg(long, value_name = "N", default_value = "1", allow_negative_numbers = true,
          value_parser = super::values::cpus)]
    cpus: u32,
    /// Run the command in a distribution image (`vmbuild image build`): a cached image's
    /// name or key, or an image file. It is the command's root, through an overlay that
    /// is thrown away: the image is never changed
    #[arg(long, value_name = "IMAGE|NAME")]
    image: Option<String>,
    /// A disk image (qcow2 or raw), /dev/vda in the guest (/dev/vdb with --image)
    #[arg(long, value_name = "IMAGE")]
    disk: Option<PathBuf>,
    /// How the disk takes writes (needs --disk)
    #[arg(long, value_name = "MODE", value_enum, requires = "disk")]
    disk_mode: Option<DiskMode>,
    /// Stop the VM after this many seconds, fractions allowed (exit 124)
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    timeout: Option<f64>,
    /// Guest kernel (default: the guest kit's)
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Guest initramfs (default: the guest kit's)
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Extra kernel command-line parameters
    #[arg(long, value_name = "PARAMS")]
    append: Option<String>,
    /// Accelerator: auto uses KVM only where it can run a Linux guest
    #[arg(long, value_name = "ACCEL", value_enum, default_value = "auto")]
    accel: AccelChoice,
    /// Which VMM runs the guest: qemu, or embedded (vmbuild's own KVM VMM, only where it
    /// boots Linux on this host); auto picks embedded where that probe passed and the run
    /// fits it (no --shell or --disk, at most 64 vCPUs), else qemu
    #[arg(long, value_name = "VMM", value_enum, default_value = "auto")]
    vmm: VmmChoice,
    /// How the guest mounts the store, xchg and --share directories: virtiofs, or 9p
    /// (served in-process; needs the embedded VMM)
    #[arg(long, value_name = "PROTOCOL", value_enum, default_value = "virtiofs")]
    share_protocol: ShareProtocol,
    /// Map read-only shares (the store) into the guest through a DAX window: after a
    /// file range's first mapping the guest reads it with no request, from the host's
    /// page cache (virtio-fs on the embedded VMM only)
    #[arg(long)]
    dax: bool,
    /// An interactive shell in the same VM setup instead of a command (needs a terminal)
    #[arg(long)]
    shell: bool,
    /// No notices from vmbuild (such as the fallback to TCG); errors are still printed
    #[arg(long, short)]
    quiet: bool,
    /// Print a JSON breakdown of where the time went (to stderr, or to FILE)
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    timings: Option<PathBuf>,
    /// Write the guest console to FILE (replaced) instead of to stderr
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// The command and its arguments, after `--` (passed verbatim: an option before `--`
    /// is vmbuild's, and one vmbuild does not know is an error, not part of the command)
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

pub(super) use super::usage::{usage, Usage};

/// `--share HOST:GUEST[:ro|:rw]`, checked.
fn extra_share(spec: &str) -> Result<ExtraShare, Usage> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (host, guest, read_only) = match parts.as_slice() {
        [h, g] => (*h, *g, false),
        [h, g, "ro"] => (*h, *g, true),
        [h, g, "rw"] => (*h, *g, false),
        _ => usage!("--share {spec}: expected HOST:GUEST or HOST:GUEST:ro"),
    };
    directory(Path::new(host), &format!("--share {spec}"))?;
    guest_path(guest, &format!("--share {spec}"))?;
    Ok(ExtraShare {
        host: PathBuf::from(host),
        guest: guest.to_owned(),
        read_only,
    })
}

impl RunArgs {
    /// A command after `--`, or `--shell` on a terminal: one of the two.
    fn check_command(&self) -> Result<(), Usage> {
        if self.shell && !self.command.is_empty() {
            usage!("--shell takes no command");
        }
        if !self.shell && self.command.is_empty() {
            usage!("no command: vmbuild run [OPTIONS] -- COMMAND [ARGS...] (or --shell)");
        }
        if self.shell && !std::io::stdin().is_terminal() {
            usage!(
                "--shell needs a terminal on stdin, and stdin is not one; from a script, give \
                 the commands after -- (vmbuild run -- sh -c '...')"
            );
        }
        command_name(&self.command)
    }

    pub fn run(self) -> anyhow::Result<i32> {
        let timings = self.timings.clone();
        if let Err(msg) = super::signal_channel::check_timings_dest(timings.as_deref()) {
            eprintln!("vmbuild run: {msg}");
            return Ok(exit::USAGE);
        }
        let spec = match self.into_spec() {
            Ok(s) => s,
            Err(Usage(msg)) => {
                eprintln!("vmbuild run: {msg}");
                return Ok(exit::USAGE);
            }
        };
        let console_streamed = spec.vmm == Vmm::Qemu && spec.log.is_none();
        // Before any thread exists, so the signal thread alone receives them.
        let sig_rx = super::signal_channel::signal_channel()?;
        let result = match spec.vmm {
            Vmm::Qemu => run(&spec, sig_rx),
            Vmm::Embedded => crate::vm::run_embedded::run_embedded(&spec, sig_rx),
        };
        let outcome = match result {
            Ok(o) => o,
            Err(e) => {
                eprintln!("vmbuild run: {e:#}");
                return Ok(exit::VM_FAILED);
            }
        };
        if let Some(dest) = timings {
            // The command's status still decides the exit code.
            if let Err(e) = super::signal_channel::write_timings(&dest, &outcome.marks.timings()) {
                eprintln!("vmbuild run: --timings {}: {e:#}", dest.display());
            }
        }
        Ok(match outcome.end {
            RunEnd::Exited(code) => {
                if code > 128 && code < 128 + 65 {
                    eprintln!(
                        "vmbuild run: the command was killed by signal {} (exit status {code})",
                        code - 128
                    );
                }
                if code == crate::guest::command_script::SETUP_FAILED {
                    eprintln!("vmbuild run: exit status 125: the command could not be started (see the console above)");
                }
                code
            }
            RunEnd::TimedOut(t) => {
                eprintln!(
                    "vmbuild run: timed out after {} s; the VM was stopped",
                    t.as_secs_f64()
                );
                exit::TIMED_OUT
            }
            RunEnd::Interrupted => {
                eprintln!("vmbuild run: interrupted; the VM was stopped");
                exit::INTERRUPTED
            }
            RunEnd::HostFailed(why) => {
                eprintln!("vmbuild run: {why}; the VM was stopped");
                exit::VM_FAILED
            }
            RunEnd::NoExitCode { why, console_tail } => {
                eprintln!("vmbuild run: the VM produced no exit code: {why}");
                // QEMU's console without --log was already on stderr, line by line.
                if !console_tail.is_empty() && !console_streamed {
                    eprintln!("last console lines:\n{console_tail}");
                }
                exit::NO_EXIT_CODE
            }
        })
    }

    /// Everything checked, in the order a user fixes things: the command, the guest's
    /// size, its files, its shares, its environment and disk, then the VMM and the
    /// accelerator.
    fn into_spec(self) -> Result<RunSpec, Usage> {
        self.check_command()?;
        if self.memory < MIN_MEMORY_MIB {
            usage!(
                "--memory {} MiB is below the {MIN_MEMORY_MIB} MiB the guest kernel needs",
                self.memory
            );
        }
        super::values::check_fits_host(self.memory).map_err(Usage)?;
        let timeout = self
            .timeout
            .map(|t| seconds(t, "--timeout", MAX_TIMEOUT))
            .transpose()?;
        let qemu = QemuBinary::locate().map_err(|e| Usage(format!("{e:#}")))?;
        let (kernel, initrd) = match (self.kernel, self.initrd) {
            (Some(k), Some(i)) => (k, i),
            (k, i) => {
                let kit = GuestKit::locate().map_err(|e| Usage(format!("{e:#}")))?;
                (k.unwrap_or(kit.kernel), i.unwrap_or(kit.initrd))
            }
        };
        readable_file(&kernel, "kernel (--kernel)")?;
        readable_file(&initrd, "initrd (--initrd)")?;
        let store = store_and_xchg(
            self.dirs.store,
            self.dirs.store_mount,
            self.dirs.xchg.as_deref(),
        )?;
        let extra_shares = self
            .share
            .iter()
            .map(|spec| extra_share(spec))
            .collect::<Result<Vec<_>, _>>()?;
        let mut mounts = store_and_xchg_mounts(&store, self.dirs.xchg.as_deref(), XCHG_MOUNT);
        for (spec, share) in self.share.iter().zip(&extra_shares) {
            mounts.push(GuestMount {
                what: format!("--share {spec}"),
                guest: &share.guest,
                host: &share.host,
                read_only: share.read_only,
            });
        }
        guest_mounts::check(&mounts, &[runtime_protected()])?;
        let env = collect_env(
            &self.command_env.env,
            &self.command_env.env_file,
            &self.command_env.pass_env,
        )?;
        if let Some(w) = &self.command_env.workdir {
            guest_path(w, "--workdir")?;
        }
        let disk = match self.disk {
            Some(path) => Some(Disk {
                format: image_format(&path)?,
                path,
                mode: self.disk_mode.unwrap_or(DiskMode::Snapshot),
            }),
            None => None,
        };
        let image = match &self.image {
            Some(what) => Some(super::image::locate(what).map_err(Usage)?),
            None => None,
        };
        if let Some(log) = &self.log {
            console_log(log)?;
        }
        let vmm = accel::vmm_choice::choose(&VmmRequest {
            choice: self.vmm,
            share_protocol: self.share_protocol,
            dax: self.dax,
            shell: self.shell,
            disk: disk.is_some(),
            cpus: self.cpus,
            memory_mib: self.memory,
            shares: usize::from(store.is_some()) + 1 + extra_shares.len(),
            image: image.is_some(),
            tcg: self.accel == AccelChoice::Tcg,
            qemu: &qemu.path,
            kernel: &kernel,
            initrd: &initrd,
        })
        .map_err(Usage)?;
        if self.accel == AccelChoice::Kvm {
            if let Err(why) = accel::kvm_access() {
                usage!("--accel kvm: {why} (or use --accel auto or tcg)");
            }
            if let Some(why) = accel::known_not_to_run_linux(&kernel, &initrd) {
                usage!("--accel kvm: {why}; the guest would stop in KVM (use --accel auto or tcg)");
            }
        }
        let (accel, notice) = accel::resolve(self.accel, &qemu.path, &kernel, &initrd);
        if let (Some(n), false) = (notice, self.quiet) {
            eprintln!("vmbuild run: {n}");
        }
        Ok(RunSpec {
            qemu,
            accel,
            kernel,
            initrd,
            append: self.append,
            memory_mib: self.memory,
            cpus: self.cpus,
            argv: self.command,
            shell: self.shell,
            env,
            cwd: self.command_env.workdir,
            store,
            xchg: self.dirs.xchg,
            keep_xchg: self.dirs.keep_xchg,
            xchg_writeback: self.dirs.xchg_writeback,
            no_xchg: false,
            nic: None,
            extra_shares,
            disk,
            image,
            timeout,
            log: self.log,
            vmm,
            share_protocol: self.share_protocol,
            dax: self.dax,
            runtime_dir: None,
        })
    }
}

/// `--store`/`--store-mount`/`--xchg`, as `run` and `build` take them: the store's
/// canonical host path and where the guest mounts it (its host path unless told).
pub(super) fn store_and_xchg(
    store: Option<PathBuf>,
    store_mount: Option<String>,
    xchg: Option<&Path>,
) -> Result<Option<(PathBuf, String)>, Usage> {
    let store = match store {
        Some(dir) => {
            directory(&dir, "store (--store)")?;
            let dir = std::fs::canonicalize(&dir)
                .map_err(|e| Usage(format!("{}: {e}", dir.display())))?;
            let mount = store_mount.unwrap_or_else(|| dir.display().to_string());
            guest_path(&mount, "--store-mount")?;
            Some((dir, mount))
        }
        None if store_mount.is_some() => usage!("--store-mount needs --store"),
        None => None,
    };
    if let Some(x) = xchg {
        directory(x, "xchg (--xchg)")?;
    }
    Ok(store)
}

/// Where the Linux guests mount xchg.
pub(super) const XCHG_MOUNT: &str = "/tmp/xchg";

/// The store and xchg as [`guest_mounts::check`] takes them (a temporary xchg cannot
/// clash on the host, but its guest path still can).
pub(super) fn store_and_xchg_mounts<'a>(
    store: &'a Option<(PathBuf, String)>,
    xchg: Option<&'a Path>,
    xchg_mount: &'a str,
) -> Vec<GuestMount<'a>> {
    let mut mounts = Vec::new();
    if let Some((dir, mount)) = store {
        mounts.push(GuestMount {
            what: "the store (--store-mount)".into(),
            guest: mount,
            host: dir,
            read_only: true,
        });
    }
    mounts.push(GuestMount {
        what: "xchg".into(),
        guest: xchg_mount,
        // The temporary xchg is made later, outside every protected directory.
        host: xchg.unwrap_or(Path::new("")),
        read_only: false,
    });
    mounts
}

/// vmbuild's own runtime directory (sockets, overlays): never a share.
pub(super) fn runtime_protected() -> Protected {
    Protected {
        path: crate::runtime_dir::base_dir(),
        what: "vmbuild's runtime directory".into(),
    }
}

/// `--log FILE`: created (emptied) now, so that a path that cannot be written is exit 2
/// before a VM starts, and so that run and build both replace an old log.
pub(super) fn console_log(path: &Path) -> Result<(), Usage> {
    if path.is_dir() {
        usage!("--log {}: is a directory; give a file name", path.display());
    }
    if let Err(e) = std::fs::File::create(path) {
        usage!("--log {}: {e}", path.display());
    }
    Ok(())
}

/// The command's name must be something a shell can run: not empty.
pub(super) fn command_name(argv: &[OsString]) -> Result<(), Usage> {
    if argv.first().is_some_and(|a| a.is_empty()) {
        usage!("the command's name is empty (\"\"): give the program to run after --");
    }
    Ok(())
}

/// The longest --timeout accepted (30 days): past that, "no timeout" is what is meant.
pub(super) const MAX_TIMEOUT: f64 = 30.0 * 86_400.0;

/// A positive, finite number of seconds up to `max`.
pub(super) fn seconds(value: f64, flag: &str, max: f64) -> Result<Duration, Usage> {
    if !(value > 0.0 && value.is_finite()) {
        usage!("{flag} must be a positive number of seconds");
    }
    if value > max {
        usage!("{flag} {value} is more than {max} seconds");
    }
    Ok(Duration::from_secs_f64(value))
}

pub(super) fn readable_file(path: &Path, what: &str) -> Result<(), Usage> {
    match std::fs::File::open(path) {
        Ok(f) if f.metadata().map(|m| m.is_file()).unwrap_or(false) => Ok(()),
        Ok(_) => usage!("{what} {} is not a file", path.display()),
        Err(e) => usage!("cannot read {what} {}: {e}", path.display()),
    }
}

pub(super) fn directory(path: &Path, what: &str) -> Result<(), Usage> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => usage!("{what}: {} is not a directory", path.display()),
        Err(e) => usage!("{what}: cannot use {}: {e}", path.display()),
    }
}

/// Guest paths go on the kernel command line (see `guest::cmdline::valid_mount_point`).
pub(super) fn guest_path(path: &str, what: &str) -> Result<(), Usage> {
    if !crate::guest::cmdline::valid_mount_point(path) {
        usage!("{what}: guest path '{path}' must be absolute, without spaces, '\"' or ':'");
    }
    Ok(())
}

pub(super) fn collect_env(
    env: &[OsString],
    files: &[PathBuf],
    pass: &[String],
) -> Result<Vec<(String, Vec<u8>)>, Usage> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |name: &str, value: Vec<u8>, from: &str| -> Result<(), Usage> {
        if !valid_env_name(name) {
            usage!("{from}: '{name}' is not a valid variable name");
        }
        out.retain(|(n, _)| n != name);
        out.push((name.to_owned(), value));
        Ok(())
    };
    for path in files {
        let text = std::fs::read(path)
            .map_err(|e| Usage(format!("--env-file {}: {e}", path.display())))?;
        for (number, line) in text.split(|b| *b == b'\n').enumerate() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() || line.starts_with(b"#") {
                continue;
            }
            let at = format!("--env-file {}, line {}", path.display(), number + 1);
            let Some(eq) = line.iter().position(|b| *b == b'=') else {
                usage!(
                    "{at}: expected K=V, found '{}'",
                    String::from_utf8_lossy(line)
                );
            };
            let name = String::from_utf8_lossy(&line[..eq]).into_owned();
            add(&name, line[eq + 1..].to_vec(), &at)?;
        }
    }
    for name in pass {
        if !valid_env_name(name) {
            usage!("--pass-env {name}: '{name}' is not a variable name (--pass-env takes NAME; use --env K=V to set a value)");
        }
        let Some(value) = std::env::var_os(name) else {
            usage!("--pass-env {name}: not set on the host");
        };
        add(name, value.into_vec(), "--pass-env")?;
    }
    for kv in env {
        let bytes = kv.as_bytes();
        let Some(eq) = bytes.iter().position(|b| *b == b'=') else {
            usage!("--env {}: expected K=V", kv.to_string_lossy());
        };
        let name = String::from_utf8_lossy(&bytes[..eq]).into_owned();
        add(&name, bytes[eq + 1..].to_vec(), "--env")?;
    }
    Ok(out)
}

/// qcow2 or raw, as `qemu-img info` sees it.
fn image_format(path: &Path) -> Result<String, Usage> {
    if let Err(e) = std::fs::File::open(path) {
        usage!("cannot read --disk {}: {e}", path.display());
    }
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .map_err(|e| {
            Usage(format!(
                "cannot run qemu-img to inspect --disk ({e}): install qemu-utils"
            ))
        })?;
    if !out.status.success() {
        usage!(
            "--disk {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let info: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| Usage(format!("qemu-img info: {e}")))?;
    match info.get("format").and_then(|f| f.as_str()) {
        Some(f @ ("qcow2" | "raw")) => Ok(f.to_owned()),
        Some(f) => usage!("--disk {}: a {f} image; vmbuild takes qcow2 or raw (convert with qemu-img convert -O qcow2)", path.display()),
        None => usage!("--disk {}: qemu-img could not tell its format", path.display()),
    }
}
