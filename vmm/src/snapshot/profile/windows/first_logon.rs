//! What the target runs at its first logon, from the configuration ISO: `setup.cmd`
//! (Windows' own shell, which needs nothing installed) installs the drivers, WinFsp and
//! Cygwin, then hands over to `setup.sh` (Cygwin's bash) for sshd with the snapshot's
//! pinned host key and the controller's key, the network address, and the firewall.
//!
//! Every phase is announced on a virtio-serial port (`READY_PORT`), and the last line
//! says the target is ready: the host waits on that port, not by polling SSH, and knows
//! which phase a stuck install is in.

use std::fmt::Write as _;

/// The virtio-serial port name (QEMU: `-device virtserialport,name=…`); Windows' vioser
/// driver opens it as `\\.\Global\<name>`.
pub const READY_PORT: &str = "org.vmbuild.ready";
/// The first-logon script on the configuration ISO, as the answer file names it.
pub const SETUP_CMD: &str = "vmbuild\\setup.cmd";
/// The line that ends a successful first logon.
pub const READY_LINE: &str = "vmbuild-ready";
/// A phase line is `vmbuild-phase NAME`; a failure `vmbuild-failed WHAT`.
pub const PHASE_PREFIX: &str = "vmbuild-phase ";
pub const FAILED_PREFIX: &str = "vmbuild-failed ";

/// virtio-win's virtio-fs daemon, where its guest tools installer puts it.
pub const VIRTIOFS_EXE: &str = "C:\\Program Files\\Virtio-Win\\VioFS\\virtiofs.exe";

/// The phases in the order `setup.cmd` and `setup.sh` announce them.
pub const PHASES: [&str; 5] = ["drivers", "winfsp", "cygwin", "sshd", "network"];

/// Where Cygwin's packages come from.
#[derive(Debug, Clone)]
pub enum CygwinSource {
    /// A local package directory the user gave (`--cygwin-mirror DIR`), on the ISO as
    /// `vmbuild\cygwin-packages`: no network needed.
    Local,
    /// A mirror URL; the target downloads through the build's network.
    Mirror(String),
}

#[derive(Debug, Clone)]
pub struct FirstLogon<'a> {
    pub user: &'a str,
    pub packages: &'a [String],
    pub cygwin: CygwinSource,
    pub target_ip: &'a str,
    pub prefix_len: u8,
    pub ssh_port: u16,
}

/// The packages every target gets: sshd and the service wrapper it runs under.
pub const BASE_PACKAGES: [&str; 2] = ["openssh", "cygrunsrv"];

/// `vmbuild\setup.cmd`, called with the configuration ISO's drive (`E:`) as `%1`.
pub fn setup_cmd(f: &FirstLogon) -> String {
    let mut packages: Vec<&str> = BASE_PACKAGES.to_vec();
    for p in f.packages {
        if !packages.contains(&p.as_str()) {
            packages.push(p);
        }
    }
    let source = match &f.cygwin {
        CygwinSource::Local => {
            "--local-install --local-package-dir %MEDIA%\\vmbuild\\cygwin-packages".to_owned()
        }
        CygwinSource::Mirror(url) => {
            format!("--site {url} --local-package-dir C:\\cygwin-packages")
        }
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r#"@echo off
rem Written by vmbuild bootstrap (profile windows-cygwin). Runs once, at the first logon,
rem from the configuration ISO, whose drive is %1. Each phase is announced on the
rem virtio-serial port {READY_PORT}; the host waits for "{READY_LINE}" there.
setlocal
set MEDIA=%~1
set LOG=C:\vmbuild-setup.log
set PORT=\\.\Global\{READY_PORT}

rem virtio-win's guest tools: the serial port's driver first, so every later phase can
rem be announced; with it the NIC and virtio-fs drivers and the virtio-fs service.
set VIRTIO=
for %%d in (D E F G H I J K L M N O P Q R S T U V W Y Z) do if exist %%d:\virtio-win-gt-x64.msi set VIRTIO=%%d:
if not defined VIRTIO goto no_virtio
msiexec /i %VIRTIO%\virtio-win-gt-x64.msi /qn /norestart ADDLOCAL=ALL >> %LOG% 2>&1
if errorlevel 1 if not errorlevel 3010 goto failed_drivers
call :say drivers

rem WinFsp: the file system the virtio-fs service mounts shares with.
msiexec /i %MEDIA%\vmbuild\winfsp.msi /qn /norestart >> %LOG% 2>&1
if errorlevel 1 if not errorlevel 3010 goto failed_winfsp
call :say winfsp

%MEDIA%\vmbuild\setup-x86_64.exe --quiet-mode --no-desktop --no-startmenu --no-shortcuts --root C:\cygwin64 {source} --packages {packages} >> %LOG% 2>&1
if errorlevel 1 goto failed_cygwin
if not exist C:\cygwin64\bin\bash.exe goto failed_cygwin
call :say cygwin

rem The rest in Cygwin's bash: sshd, the address, the firewall.
C:\cygwin64\bin\bash.exe --login -c "/usr/bin/bash \"$(cygpath -u '%MEDIA%\vmbuild\setup.sh')\" \"$(cygpath -u '%MEDIA%\vmbuild')\"" >> %LOG% 2>&1
if errorlevel 1 goto failed_sshd

rem The answer file, which holds the password, is not left behind.
del /q C:\Windows\Panther\unattend.xml C:\Windows\Panther\autounattend.xml 2>nul
echo {READY_LINE}> %PORT%
exit /b 0

:say
echo {PHASE_PREFIX}%1> %PORT%
exit /b 0

:no_virtio
echo vmbuild: the virtio-win ISO is not attached >> %LOG%
exit /b 1
:failed_drivers
echo {FAILED_PREFIX}drivers> %PORT%
exit /b 1
:failed_winfsp
echo {FAILED_PREFIX}winfsp> %PORT%
exit /b 1
:failed_cygwin
echo {FAILED_PREFIX}cygwin> %PORT%
exit /b 1
:failed_sshd
echo {FAILED_PREFIX}sshd> %PORT%
exit /b 1
"#,
        packages = packages.join(","),
    );
    // Windows' cmd reads CRLF.
    s.replace("\r\n", "\n").replace('\n', "\r\n")
}

/// `vmbuild\setup.sh`, run by Cygwin's bash with the ISO's `vmbuild` directory as `$1`.
pub fn setup_sh(f: &FirstLogon) -> String {
    let mask = prefix_to_mask(f.prefix_len);
    format!(
        r#"#!/bin/bash
# Written by vmbuild bootstrap (profile windows-cygwin): sshd with the snapshot's pinned
# host key and the controller's public key, the target's address, the firewall.
set -eu
media=$1
port='\\.\Global\{READY_PORT}'
say() {{ cmd /c "echo {PHASE_PREFIX}$1> $port"; }}

# sshd as a service, with the host key pinned in the snapshot's manifest: the
# controller refuses any other.
ssh-host-config --yes --port {ssh_port} --user cyg_server --pwd "$(head -c 24 /dev/urandom | base64)"
for key in /etc/ssh_host_*_key /etc/ssh_host_*_key.pub; do
    rm -f "$key"
done
install -m 600 "$media/ssh/ssh_host_ed25519_key" /etc/ssh_host_ed25519_key
install -m 644 "$media/ssh/ssh_host_ed25519_key.pub" /etc/ssh_host_ed25519_key.pub
sed -i -e '/^#\?HostKey /d' -e '/^#\?PasswordAuthentication /d' /etc/sshd_config
printf 'HostKey /etc/ssh_host_ed25519_key\nPasswordAuthentication no\n' >> /etc/sshd_config
home=/home/{user}
install -d -m 700 "$home/.ssh"
install -m 600 "$media/ssh/authorized_keys" "$home/.ssh/authorized_keys"
chown -R {user} "$home/.ssh"
cygrunsrv --start cygsshd

# virtio-fs: each build starts one virtiofs.exe per share with WinFsp's launcher
# (`launchctl-x64.exe start virtiofs viofsX TAG X:`), so the class is registered as
# WinFsp's fsreg.bat would (its 32-bit registry view), and virtio-win's single-instance
# service, which would take the first device whatever its tag, stays off.
winfsp_class=/HKLM/SOFTWARE/WinFsp/Services/virtiofs
regtool -w add "$winfsp_class"
regtool -w set -s "$winfsp_class/Executable" '{VIRTIOFS_EXE}'
regtool -w set -s "$winfsp_class/CommandLine" '-t %1 -m %2'
regtool -w set -s "$winfsp_class/Security" 'D:P(A;;RPWPLC;;;WD)'
regtool -w set -d "$winfsp_class/JobControl" 1
sc config VirtioFsSvc start= demand >/dev/null || true
sc stop VirtioFsSvc >/dev/null 2>&1 || true
say sshd

# The address the snapshot's network plan gives the target, on its one NIC.
netsh interface ipv4 set address name="$(netsh interface ipv4 show interfaces | awk '/connected/ && !/Loopback/ {{ for (i = 5; i <= NF; i++) printf "%s%s", $i, (i < NF ? " " : ""); exit }}')" static {ip} {mask}
netsh advfirewall firewall add rule name=vmbuild-sshd dir=in action=allow protocol=TCP localport={ssh_port}
say network
"#,
        user = f.user,
        ssh_port = f.ssh_port,
        ip = f.target_ip,
    )
}

fn prefix_to_mask(prefix: u8) -> String {
    let bits: u32 = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix.min(32) as u32)
    };
    std::net::Ipv4Addr::from(bits).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(cygwin: CygwinSource) -> FirstLogon<'static> {
        FirstLogon {
            user: "vmbuild",
            packages: &[],
            cygwin,
            target_ip: "10.77.0.2",
            prefix_len: 24,
            ssh_port: 22,
        }
    }

    #[test]
    fn setup_sh_registers_virtiofs_for_the_launcher_the_builds_call() {
        let sh = setup_sh(&plan(CygwinSource::Local));
        // What `launchctl-x64.exe start virtiofs NAME TAG X:` runs: virtiofs.exe -t TAG -m X:
        assert!(sh.contains("regtool -w set -s \"$winfsp_class/CommandLine\" '-t %1 -m %2'"));
        assert!(sh.contains(&format!("'{VIRTIOFS_EXE}'")));
        assert!(sh.contains("winfsp_class=/HKLM/SOFTWARE/WinFsp/Services/virtiofs"));
        assert!(super::super::LAUNCHCTL.ends_with("WinFsp/bin/launchctl-x64.exe"));
        assert!(sh.contains("sc config VirtioFsSvc start= demand"));
    }

    #[test]
    fn masks_follow_the_prefix() {
        assert_eq!(prefix_to_mask(24), "255.255.255.0");
        assert_eq!(prefix_to_mask(16), "255.255.0.0");
        assert_eq!(prefix_to_mask(32), "255.255.255.255");
    }

    #[test]
    fn setup_cmd_announces_every_phase_on_the_port_and_ends_with_ready() {
        let cmd = setup_cmd(&plan(CygwinSource::Local));
        assert!(cmd.lines().all(|l| !l.contains('\n')));
        assert!(cmd.contains("\r\n"), "CRLF for cmd");
        for phase in ["drivers", "winfsp", "cygwin"] {
            assert!(cmd.contains(&format!("call :say {phase}")), "{phase}");
            assert!(cmd.contains(&format!("{FAILED_PREFIX}{phase}")), "{phase}");
        }
        assert!(cmd.contains(&format!("\\\\.\\Global\\{READY_PORT}")));
        assert!(cmd.contains(&format!("echo {READY_LINE}> %PORT%")));
        assert!(
            cmd.contains("--local-install --local-package-dir %MEDIA%\\vmbuild\\cygwin-packages")
        );
        assert!(cmd.contains("--packages openssh,cygrunsrv"));
        let mirror = setup_cmd(&plan(CygwinSource::Mirror(
            "https://mirrors.kernel.org/sourceware/cygwin/".into(),
        )));
        assert!(mirror.contains("--site https://mirrors.kernel.org/sourceware/cygwin/"));
    }
}
