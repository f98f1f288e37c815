//! The install run: from the checked inputs to an installed, SSH-ready target on disk.
//!
//! 1. the target's files in the snapshot directory: an empty qcow2 disk and its own copy
//!    of OVMF's variable store (boot entries live there), and for Windows 11 swtpm's state;
//! 2. the configuration ISO: autounattend.xml, the first-logon scripts, the snapshot's
//!    pinned host key (OpenSSH's format, which Cygwin's sshd reads) and the controller's
//!    public key, WinFsp's and Cygwin's installers, a local Cygwin package directory;
//! 3. QEMU with the Windows machine and the three CD-ROMs, watched by `install_watch`;
//! 4. a clean shutdown (ACPI power button), so the disk holds a finished system.
//!
//! `stand_in` boots a Linux kernel in the same machine instead of the Windows CD: the
//! tests' stand-in target, which speaks on the readiness port as the first-logon scripts
//! do. Everything else (files, ISO, machine, watch, shutdown) is what Windows gets.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use super::answer_file::{answer_file, Answers};
use super::config_iso::{self, Source};
use super::first_logon::{setup_cmd, setup_sh, CygwinSource, FirstLogon, SETUP_CMD};
use super::inputs::CheckedInputs;
use super::install_watch::{self, InstallFailure, Installed, Limits, Watch};
use super::machine::{find_firmware, InstallIsos, WindowsMachine, WindowsPlacement};
use super::tpm::Swtpm;
use crate::qemu::{ChardevListener, QemuProcess};
use crate::snapshot::dropbear;
use crate::snapshot::profile::InstallContext;

/// The target's files in the snapshot directory, beside `DISK_FILE`.
pub const VARS_FILE: &str = "uefi-vars.fd";
pub const TPM_DIR: &str = "tpm";
/// The local administrator the answer file creates and SSH logs in as.
pub const USER: &str = "vmbuild";

/// A Linux kernel booted in the Windows machine in place of the Windows CD.
#[derive(Debug, Clone)]
pub struct StandIn {
    /// A kernel OVMF can boot (bzImage, with its EFI stub).
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    /// Its serial console, into this file.
    pub console: Option<PathBuf>,
}

pub struct InstallRun<'a> {
    /// The bootstrap's side: the snapshot directory, scratch and socket directories, the
    /// keys, the network plan, the machine's size, the switch port, progress and signals.
    pub ctx: &'a InstallContext<'a>,
    /// A versioned q35 type (`pc-q35-10.0`).
    pub machine_type: &'a str,
    pub inputs: &'a CheckedInputs,
    pub limits: &'a Limits,
    /// How long Windows may take to shut down after the install.
    pub shutdown_limit: Duration,
    pub stand_in: Option<&'a StandIn>,
}

/// How an install run failed.
#[derive(Debug)]
pub enum RunFailure {
    Install(InstallFailure),
    Error(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for RunFailure {
    fn from(e: E) -> RunFailure {
        RunFailure::Error(e.into())
    }
}

/// What the run leaves: the phases' times and whether Windows shut down by itself.
#[derive(Debug)]
pub struct InstallReport {
    pub installed: Installed,
    pub clean_shutdown: bool,
}

impl InstallRun<'_> {
    pub fn run(&self) -> Result<InstallReport, RunFailure> {
        let inputs = self.inputs;
        let version = inputs.version;
        let firmware = find_firmware(version).map_err(|e| anyhow::anyhow!(e))?;

        let step = self
            .ctx
            .progress
            .step("creating the target's disk and UEFI variables");
        let disk = self.ctx.out.join(super::super::DISK_FILE);
        run(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&disk)
                .arg(format!("{}M", self.ctx.disk_size_mib)),
            "qemu-img create",
        )?;
        let vars = self.ctx.out.join(VARS_FILE);
        std::fs::copy(&firmware.vars_template, &vars)
            .with_context(|| format!("copying {}", firmware.vars_template.display()))?;
        step.done();

        let step = self.ctx.progress.step("writing the configuration ISO");
        let config = self.ctx.scratch.join("config.iso");
        self.config_iso(&config)?;
        step.done();

        // Windows 11's TPM: swtpm keeps its state with the snapshot.
        let tpm = if version.needs_tpm() {
            Some(Swtpm::start(
                &self.ctx.out.join(TPM_DIR),
                &self.ctx.rundir.join("tpm.sock"),
            )?)
        } else {
            None
        };

        let qmp_l = ChardevListener::bind(self.ctx.rundir.join("install-qmp.sock"))?;
        let ready_l = ChardevListener::bind(self.ctx.rundir.join("install-ready.sock"))?;
        let machine = WindowsMachine {
            accel: self.ctx.accel.qemu_name().to_owned(),
            machine_type: self.machine_type.to_owned(),
            memory_mib: self.ctx.memory_mib,
            cpus: self.ctx.cpus,
            mac: self.ctx.network.target_mac.clone(),
        };
        let mut cmd = machine
            .command(
                &firmware,
                &WindowsPlacement {
                    disk: &disk,
                    vars: &vars,
                    net_socket: self.ctx.net_socket,
                    ready_socket: Some(&ready_l.path),
                    tpm_socket: tpm.as_ref().map(|t| t.socket.as_path()),
                    install: Some(InstallIsos {
                        windows: &inputs.iso,
                        virtio_win: &inputs.virtio_win,
                        config: &config,
                    }),
                },
            )
            .monitor(&qmp_l);
        if let Some(s) = self.stand_in {
            cmd = cmd
                .kernel(Some(&s.kernel), Some(&s.initrd))
                .append(Some(&s.append));
            if let Some(console) = &s.console {
                cmd = cmd.serial_file(console);
            }
        }
        let (mut qemu, streams) = QemuProcess::start_connected(
            &self.ctx.qemu.path,
            &cmd.argv(),
            &self.ctx.rundir.join("install-qemu.stderr"),
            false,
            &[&qmp_l, &ready_l],
        )?;
        let mut streams = streams.into_iter();
        let (qmp_s, port) = (
            streams.next().context("no QMP connection")?,
            streams.next().context("no readiness port connection")?,
        );
        let (events_tx, _events) = std::sync::mpsc::channel();
        let mut qmp = qemu.qmp_handshake(qmp_s, events_tx)?;
        let installed = install_watch::watch(Watch {
            qemu: &mut qemu,
            qmp: &mut qmp,
            port,
            limits: self.limits,
            screendump: &self.ctx.screendump,
            progress: self.ctx.progress,
            signals: self.ctx.signals,
        })
        .map_err(RunFailure::Install)?;

        // A finished system on disk: Windows shuts down on the ACPI power button.
        let step = self.ctx.progress.step("shutting the installed target down");
        let _ = qmp.execute("system_powerdown", serde_json::json!({}));
        let clean_shutdown = qemu.wait_timeout(self.shutdown_limit)?.is_some();
        if !clean_shutdown {
            let _ = qmp.quit();
            qemu.kill();
        }
        step.done();
        drop(tpm);
        Ok(InstallReport {
            installed,
            clean_shutdown,
        })
    }

    /// The configuration ISO at `to`.
    fn config_iso(&self, to: &Path) -> anyhow::Result<()> {
        let inputs = self.inputs;
        // Not a secret worth keeping: only the console could use it (SSH takes keys only),
        // and the answer file is deleted at the end of the first logon.
        let password = random_password()?;
        let answers = answer_file(&Answers {
            version: inputs.version,
            image_index: inputs.image.index,
            computer_name: "VMBUILD-TARGET",
            user: USER,
            password: &password,
            first_logon_script: SETUP_CMD,
        });
        let first_logon = FirstLogon {
            user: USER,
            packages: &inputs.cygwin_packages,
            cygwin: inputs.cygwin.clone(),
            target_ip: &self.ctx.network.target_ip,
            prefix_len: self.ctx.network.prefix_len,
            ssh_port: self.ctx.network.ssh_port,
        };
        // Cygwin's OpenSSH reads OpenSSH's key format; the pinned public key is the same.
        let openssh_key = self.ctx.scratch.join("ssh_host_ed25519_key");
        run(
            Command::new("dropbearconvert")
                .args(["dropbear", "openssh"])
                .arg(self.ctx.host_key)
                .arg(&openssh_key),
            "dropbearconvert (Debian package dropbear-bin)",
        )?;
        let host_public = dropbear::public_key(self.ctx.host_key)?;
        let mut entries: Vec<(&str, Source)> = vec![
            ("autounattend.xml", Source::Bytes(answers.into_bytes())),
            (
                "vmbuild/setup.cmd",
                Source::Bytes(setup_cmd(&first_logon).into_bytes()),
            ),
            (
                "vmbuild/setup.sh",
                Source::Bytes(setup_sh(&first_logon).into_bytes()),
            ),
            (
                "vmbuild/ssh/ssh_host_ed25519_key",
                Source::Host(openssh_key.clone()),
            ),
            (
                "vmbuild/ssh/ssh_host_ed25519_key.pub",
                Source::Bytes(format!("{host_public}\n").into_bytes()),
            ),
            (
                "vmbuild/ssh/authorized_keys",
                Source::Bytes(self.ctx.authorized_key.as_bytes().to_vec()),
            ),
            ("vmbuild/winfsp.msi", Source::Host(inputs.winfsp.clone())),
            (
                "vmbuild/setup-x86_64.exe",
                Source::Host(inputs.cygwin_setup.clone()),
            ),
        ];
        if let (CygwinSource::Local, Some(dir)) = (&inputs.cygwin, &inputs.cygwin_dir) {
            entries.push(("vmbuild/cygwin-packages", Source::Host(dir.clone())));
        }
        config_iso::build(to, &entries, self.ctx.scratch)?;
        std::fs::remove_file(&openssh_key)?;
        Ok(())
    }
}

fn random_password() -> anyhow::Result<String> {
    let mut bytes = [0u8; 18];
    getrandom(&mut bytes)?;
    // Letters and digits, and one of each class Windows' complexity rule asks for.
    let body: String = bytes
        .iter()
        .map(|b| {
            const A: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
            A[*b as usize % A.len()] as char
        })
        .collect();
    Ok(format!("{body}-Aa1"))
}

fn getrandom(buf: &mut [u8]) -> anyhow::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)?;
    Ok(())
}

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
