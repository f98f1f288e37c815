//! `vmbuild build`: revive a snapshot, run a command in the target over SSH, exit with its
//! status.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::Args;

use super::command_args::{CommandEnv, SharedDirs};

use super::guest_mounts::{self, Protected};
use super::run::{
    collect_env, command_name, console_log, guest_path, runtime_protected, seconds, store_and_xchg,
    store_and_xchg_mounts, usage, Usage, MAX_TIMEOUT, XCHG_MOUNT,
};
use crate::accel;
use crate::exit;
use crate::qemu::QemuBinary;
use crate::snapshot::{access, KIT_INITRD, KIT_KERNEL};
use crate::workflow::build::{build, snapshot_path, BuildEnd, BuildSpec, ControllerChoice};

#[derive(Args, Debug)]
#[command(after_help = "\
The command's stdin is /dev/null; its stdout and stderr are vmbuild's.

Exit status: the command's own, or
  2    bad command line or input (nothing was started)
  119  the target's SSH host key is not the one pinned in the snapshot
  120  the snapshot is missing, truncated or corrupted (checksum mismatch)
  121  the snapshot was made by another QEMU version, machine type or vmbuild format
  122  the target never answered SSH (--ssh-wait) or refused the snapshot's key
  123  the target or the controller stopped before the command reported its status
  124  --timeout expired (everything was stopped)
  125  vmbuild failed (QEMU would not start, a share would not attach or mount, the
       target's disk could not be written on the host: a full file system)
  127  the command is not in the target
  130  interrupted (SIGINT, SIGTERM or SIGHUP); everything was stopped and cleaned up
A command that itself exits one of these codes cannot be told apart from them.
The snapshot directory is never modified (and cannot be shared as --store or --xchg).

Environment: VMBUILD_QEMU (the QEMU binary), VMBUILD_JOBS (--jobs), XDG_RUNTIME_DIR
(where sockets and build slots go), XDG_CACHE_HOME (probe answers, verification
stamps), TMPDIR (the temporary xchg), RUST_LOG (log filter), NO_COLOR (no colours in
log lines).")]
pub struct BuildArgs {
    /// The snapshot directory made by `vmbuild bootstrap`
    #[arg(long, value_name = "DIR")]
    snapshot: PathBuf,
    #[command(flatten)]
    dirs: SharedDirs,
    #[command(flatten)]
    command_env: CommandEnv,
    /// Stop everything after this many seconds, fractions allowed (exit 124)
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    timeout: Option<f64>,
    /// How long the target's SSH port may take to answer (exit 122)
    #[arg(
        long,
        default_value_t = 30.0,
        value_name = "SECONDS",
        allow_negative_numbers = true
    )]
    ssh_wait: f64,
    /// How many builds of this user run at once on this host; a build beyond that waits
    /// for one to end, and its --timeout and --ssh-wait start only then (0: no limit)
    /// [default: VMBUILD_JOBS, else the number of CPUs]
    #[arg(long, short = 'j', value_name = "N")]
    jobs: Option<usize>,
    /// Hash every snapshot file, even those that passed a check unchanged before
    #[arg(long)]
    verify: bool,
    /// Print a JSON breakdown of where the time went (to stderr, or to FILE)
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    timings: Option<PathBuf>,
    /// The controller: auto takes the fastest this host allows (the embedded VMM's
    /// snapshot, QEMU's suspended controller, a fresh boot); or insist on one
    /// (--timings names the one that served as "controller")
    #[arg(long, value_name = "CONTROLLER", value_enum, default_value = "auto")]
    controller: ControllerChoice,
    /// Write the target's console to FILE (replaced)
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// The command and its arguments, after `--` (passed verbatim: an option before `--`
    /// is vmbuild's, and one vmbuild does not know is an error, not part of the command)
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

impl BuildArgs {
    pub fn run(self) -> anyhow::Result<i32> {
        let timings = self.timings.clone();
        if let Err(msg) = super::signal_channel::check_timings_dest(timings.as_deref()) {
            eprintln!("vmbuild build: {msg}");
            return Ok(exit::USAGE);
        }
        let spec = match self.into_spec() {
            Ok(s) => s,
            Err(Usage(msg)) => {
                eprintln!("vmbuild build: {msg}");
                return Ok(exit::USAGE);
            }
        };
        let signals = super::signal_channel::signal_channel()?;
        let outcome = match build(&spec, signals) {
            Ok(o) => o,
            Err(e) => {
                eprintln!("vmbuild build: {e:#}");
                return Ok(exit::VM_FAILED);
            }
        };
        if let Some(dest) = timings {
            // The command's status still decides the exit code.
            if let Err(e) = super::signal_channel::write_timings(&dest, &outcome.timings) {
                eprintln!("vmbuild build: --timings {}: {e:#}", dest.display());
            }
        }
        let say = |m: String| eprintln!("vmbuild build: {m}");
        Ok(match outcome.end {
            BuildEnd::Exited(code) => {
                if code == crate::guest::command_script::SETUP_FAILED {
                    say(
                        "exit status 125: the command could not be started (see its stderr above)"
                            .into(),
                    );
                }
                code
            }
            BuildEnd::TimedOut(t) => {
                say(format!(
                    "timed out after {} s; everything was stopped",
                    t.as_secs_f64()
                ));
                exit::TIMED_OUT
            }
            BuildEnd::Interrupted => {
                say("interrupted; everything was stopped".into());
                exit::INTERRUPTED
            }
            BuildEnd::SnapshotDamaged(m) => {
                say(m);
                exit::SNAPSHOT_DAMAGED
            }
            BuildEnd::SnapshotIncompatible(m) => {
                say(m);
                exit::SNAPSHOT_INCOMPATIBLE
            }
            BuildEnd::HostKeyChanged => {
                say("the target's SSH host key differs from the one pinned in the snapshot; refusing to run the command (bootstrap the snapshot again if the target really changed)".into());
                exit::HOST_KEY_CHANGED
            }
            BuildEnd::TargetUnreachable { console_tail } => {
                let console = match console_tail.trim() {
                    "" => "its console printed nothing since the revive".to_owned(),
                    tail => format!("its console ended with:\n{tail}"),
                };
                say(format!(
                    "the target did not answer SSH within {} s (a host this busy may need a larger --ssh-wait or a smaller --jobs); {console}",
                    spec.ssh_wait.as_secs_f64()
                ));
                exit::TARGET_UNREACHABLE
            }
            BuildEnd::HandshakeFailed => {
                say("the target refused the snapshot's SSH key".into());
                exit::TARGET_UNREACHABLE
            }
            BuildEnd::Lost { why, console_tail } => {
                say(why);
                if !console_tail.is_empty() {
                    eprintln!("last console lines:\n{console_tail}");
                }
                exit::NO_EXIT_CODE
            }
            BuildEnd::HostFailed(why) => {
                say(format!("{why}; everything was stopped"));
                exit::VM_FAILED
            }
        })
    }

    fn into_spec(self) -> Result<BuildSpec, Usage> {
        if self.command.is_empty() {
            usage!("no command: vmbuild build --snapshot DIR [OPTIONS] -- COMMAND [ARGS...]");
        }
        command_name(&self.command)?;
        let timeout = self
            .timeout
            .map(|t| seconds(t, "--timeout", MAX_TIMEOUT))
            .transpose()?;
        let ssh_wait = seconds(self.ssh_wait, "--ssh-wait", 86_400.0)?;
        let jobs = jobs(self.jobs)?;
        let store = store_and_xchg(
            self.dirs.store,
            self.dirs.store_mount,
            self.dirs.xchg.as_deref(),
        )?;
        if let Some(w) = &self.command_env.workdir {
            guest_path(w, "--workdir")?;
        }
        let env = collect_env(
            &self.command_env.env,
            &self.command_env.env_file,
            &self.command_env.pass_env,
        )?;
        let qemu = QemuBinary::locate().map_err(|e| Usage(format!("{e:#}")))?;
        let snapshot = snapshot_path(&self.snapshot);
        // The target mounts xchg where its profile says; the linux profile's is the same
        // as run's, and only linux targets can be bootstrapped today.
        let mounts = store_and_xchg_mounts(&store, self.dirs.xchg.as_deref(), XCHG_MOUNT);
        let protected = [
            runtime_protected(),
            Protected {
                path: snapshot.clone(),
                what: "the snapshot".into(),
            },
        ];
        guest_mounts::check(&mounts, &protected)?;
        // What this user may not do, said before anything starts (exit 2).
        access::check_readable(&snapshot).map_err(Usage)?;
        access::check_accel(&snapshot).map_err(Usage)?;
        if let Some(log) = &self.log {
            console_log(log)?;
        }
        let controller = check_controller(self.controller, &qemu, &snapshot)?;
        Ok(BuildSpec {
            snapshot,
            qemu,
            argv: self.command,
            env,
            cwd: self.command_env.workdir,
            store,
            xchg: self.dirs.xchg,
            keep_xchg: self.dirs.keep_xchg,
            xchg_writeback: self.dirs.xchg_writeback,
            timeout,
            ssh_wait,
            verify_full: self.verify,
            console_log: self.log,
            controller,
            runtime_dir: None,
            jobs,
        })
    }
}

/// The most builds that may run at once, from `--jobs`, else `VMBUILD_JOBS`, else one per
/// CPU.
fn jobs(flag: Option<usize>) -> Result<usize, Usage> {
    const MAX: usize = 4096;
    let jobs = match (flag, std::env::var_os("VMBUILD_JOBS")) {
        (Some(n), _) => n,
        (None, Some(v)) => match v.to_str().and_then(|v| v.trim().parse::<usize>().ok()) {
            Some(n) => n,
            None => usage!(
                "VMBUILD_JOBS={}: not a number of builds (0 for no limit)",
                v.to_string_lossy()
            ),
        },
        (None, None) => crate::build_slots::default_jobs(),
    };
    if jobs > MAX {
        usage!("--jobs {jobs}: at most {MAX} (0 for no limit)");
    }
    Ok(jobs)
}

/// `embedded` and `embedded-boot` need the embedded VMM to boot Linux here: a usage error
/// (with the probe's reason) where it does not. `auto` is the build's to resolve.
fn check_controller(
    choice: ControllerChoice,
    qemu: &QemuBinary,
    snapshot: &Path,
) -> Result<ControllerChoice, Usage> {
    if !matches!(
        choice,
        ControllerChoice::Embedded | ControllerChoice::EmbeddedBoot
    ) {
        return Ok(choice);
    }
    let (kernel, initrd) = (snapshot.join(KIT_KERNEL), snapshot.join(KIT_INITRD));
    // A missing snapshot is the build's to report (exit 120), not the probe's.
    if !kernel.is_file() || !initrd.is_file() {
        return Ok(choice);
    }
    let probe = accel::probe_embedded_cached(&qemu.path, &kernel, &initrd);
    if !probe.usable {
        let flag = match choice {
            ControllerChoice::EmbeddedBoot => "embedded-boot",
            _ => "embedded",
        };
        usage!(
            "--controller {flag}: {}; use --controller revive or boot (QEMU)",
            probe.reason
        );
    }
    Ok(choice)
}
