//! `vmbuild bootstrap --profile windows-cygwin` → suspend → `vmbuild build`, end to end,
//! against a **STAND-IN target**: a Linux guest (the guest kit, booted by OVMF in the
//! Windows machine) plays Windows' part. vmbuild runs exactly as for Windows — the inputs
//! checked, the configuration ISO with the pinned keys, q35 + OVMF + the three CD-ROMs,
//! the readiness port, the shutdown, the boot from the installed disk, the controller's
//! login with the pinned host key, the suspend, a revive with the shares hot-plugged into
//! the root ports, WinFsp's launcher per share, cygpath, the exit code — only the target
//! is not Windows (no Windows media can be fetched on these machines). The test hook is
//! `VMBUILD_TEST_WINDOWS_STAND_IN`.
//!
//! What the stand-in does, as Windows and the first-logon scripts would:
//! - install: finds the configuration ISO among the CD-ROMs, announces every phase on the
//!   readiness port, "installs" the ISO's keys and setup.sh on its disk, says ready, and
//!   powers off;
//! - boot: reads them back from the disk, takes the address from setup.sh's `netsh` line,
//!   converts the pinned OpenSSH host key (as Cygwin's sshd reads it) and runs an SSH
//!   server with it for user `vmbuild`, and provides `launchctl-x64.exe` (mounting the
//!   tag's virtio-fs on /cygdrive/LETTER) and `cygpath`, the two Windows tools a build's
//!   session calls.

use std::path::{Path, PathBuf};
use std::process::Command;

use vmbuild::guest::initrd;
use vmbuild::guest::kit::GuestKit;
use vmbuild::snapshot::dropbear;
use vmbuild::snapshot::profile::windows::media::WindowsVersion;
use vmbuild::snapshot::profile::windows::{LAUNCHCTL, STAND_IN_ENV};

mod windows_support;
use windows_support::*;

const VMBUILD: &str = env!("CARGO_BIN_EXE_vmbuild");

/// Sets `P` to the readiness port's device (no udev in the guest: found through sysfs).
const FIND_PORT: &str = r#"P=
i=0
while [ -z "$P" ] && [ $i -lt 300 ]; do
	for n in /sys/class/virtio-ports/*/name; do
		[ "$(cat $n 2>/dev/null)" = org.vmbuild.ready ] && P=/dev/$(basename $(dirname $n))
	done
	[ -n "$P" ] || sleep 0.1; i=$((i+1))
done
"#;

/// The stand-in's script; `install_phases` is what it says on the port while installing.
fn stand_in_script(install_phases: &str) -> String {
    format!(
        r#"PATH=/bin:/sbin:/usr/bin
say() {{ echo "$1" > $P; sleep 0.2; }}
mkdir -p /cfg /inst /tmp
tar -C /inst -xf /dev/vda 2>/dev/null
if [ ! -f /inst/vmbuild/setup.sh ]; then
	# Windows setup and the first logon: the configuration ISO is one of the CD-ROMs.
	{FIND_PORT}
	i=0
	while [ ! -b /dev/sr2 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
	for d in /dev/sr0 /dev/sr1 /dev/sr2; do
		mount -t iso9660 -o ro $d /cfg 2>/dev/null || continue
		[ -f /cfg/vmbuild/setup.sh ] && break
		umount /cfg
	done
	{install_phases}
	exit 0
fi
# The installed system boots.
set -- $(sed -n 's/.* static \([0-9.]*\) \([0-9.]*\)$/\1 \2/p' /inst/vmbuild/setup.sh)
ifconfig lo up
ifconfig eth0 "$1" netmask "$2" up
dropbearconvert openssh dropbear /inst/vmbuild/ssh/ssh_host_ed25519_key /etc/host_key >/dev/null 2>&1
echo 'vmbuild:x:0:0:stand-in:/home/vmbuild:/bin/sh' >> /etc/passwd
mkdir -p /home/vmbuild/.ssh
cp /inst/vmbuild/ssh/authorized_keys /home/vmbuild/.ssh/authorized_keys
chmod 700 /home/vmbuild/.ssh; chmod 600 /home/vmbuild/.ssh/authorized_keys
launchctl='{LAUNCHCTL}'
mkdir -p "${{launchctl%/*}}"
cat > "$launchctl" <<'EOF'
#!/bin/sh
# WinFsp's launcher as the stand-in plays it: start virtiofs NAME TAG X:
[ "$1 $2" = "start virtiofs" ] || exit 2
l=$(echo "${{5%:}}" | tr A-Z a-z)
mkdir -p /cygdrive/$l && mount -t virtiofs "$4" /cygdrive/$l
EOF
cat > /bin/cygpath <<'EOF'
#!/bin/sh
# cygpath -u 'X:\dir': /cygdrive/x/dir
[ "$1" = -u ] || exit 2
l=$(printf %s "$2" | cut -c1 | tr A-Z a-z)
echo "/cygdrive/$l$(printf %s "$2" | cut -c3- | tr '\\' /)"
EOF
chmod +x "$launchctl" /bin/cygpath
echo "stand-in: sshd on $1" >/dev/console
exec dropbear -F -s -p 22 -r /etc/host_key
"#
    )
}

const INSTALLS: &str = r#"for p in drivers winfsp cygwin; do say "vmbuild-phase $p"; done
	tar -C /cfg -cf /dev/vda vmbuild/ssh vmbuild/setup.sh && sync || { say "vmbuild-failed sshd"; exit 1; }
	say "vmbuild-phase sshd"; say "vmbuild-phase network"; say "vmbuild-ready"
	sleep 1"#;

/// The stand-in's directory for `STAND_IN_ENV`: OVMF boots the kit's bzImage with an
/// initramfs holding the script, dropbear and dropbearconvert.
fn stand_in_dir(dir: &Path, install_phases: &str, limit_secs: u64) -> PathBuf {
    stand_in_dir_booting(dir, install_phases, limit_secs, true)
}

/// As `stand_in_dir`; without `sshd`, the installed system powers off instead of
/// serving SSH.
fn stand_in_dir_booting(dir: &Path, install_phases: &str, limit_secs: u64, sshd: bool) -> PathBuf {
    let kit = GuestKit::locate().expect("the guest kit (scripts/guest-kit.sh)");
    let stand_in = dir.join("stand-in");
    std::fs::create_dir_all(&stand_in).unwrap();
    let mut script = stand_in_script(install_phases);
    if !sshd {
        script = script.replace(
            "exec dropbear",
            "echo 'stand-in: powering off instead' >/dev/console; exit 1; dropbear",
        );
    }
    let bins = dropbear::runtime_files_of(&[
        (dropbear::SERVER, "/bin/dropbear"),
        ("/usr/bin/dropbearconvert", "/bin/dropbearconvert"),
    ])
    .unwrap();
    let data: Vec<(String, Vec<u8>)> = bins
        .iter()
        .map(|(host, guest)| (guest.clone(), std::fs::read(host).unwrap()))
        .collect();
    let mut files: Vec<(&str, u32, &[u8])> = vec![
        ("/stand-in.sh", libc::S_IFREG | 0o755, script.as_bytes()),
        ("/lib/x86_64-linux-gnu", libc::S_IFDIR | 0o755, &[]),
    ];
    files.extend(
        data.iter()
            .map(|(g, d)| (g.as_str(), libc::S_IFREG | 0o755, d.as_slice())),
    );
    initrd::assemble(
        &[&kit.initrd],
        &initrd::newc_archive(&files),
        &stand_in.join("initrd"),
    )
    .unwrap();
    std::fs::copy(
        kit.kernel.with_file_name("bzImage"),
        stand_in.join("bzImage"),
    )
    .unwrap();
    std::fs::write(
        stand_in.join("append"),
        "console=ttyS0 panic=-1 quiet vmbuild.quiet \
         vmbuild.modules=virtio_console,virtio_blk,virtio_net,ahci,sr_mod,isofs,virtiofs \
         vmbuild.cmd=/stand-in.sh",
    )
    .unwrap();
    std::fs::write(stand_in.join("limit-secs"), limit_secs.to_string()).unwrap();
    stand_in
}

/// The user's inputs (stand-ins of the ISOs and installers: see windows_support).
fn inputs(d: &Path) -> Vec<String> {
    for sub in ["w", "v"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    let iso = stand_in_windows_iso(&d.join("w"), &[("Windows 10 Pro", "WinNT", 19045)]);
    let virtio = stand_in_virtio_win(&d.join("v"), &[WindowsVersion::Windows10]);
    let winfsp = stand_in_msi(d);
    let mirror = stand_in_cygwin_mirror(d);
    let s = |p: &Path| p.display().to_string();
    vec![
        "--profile".into(),
        "windows-cygwin".into(),
        "--iso".into(),
        s(&iso),
        "--virtio-win".into(),
        s(&virtio),
        "--winfsp".into(),
        s(&winfsp),
        "--cygwin-mirror".into(),
        s(&mirror),
        "--cygwin-packages".into(),
        "make".into(),
        "--memory".into(),
        "512M".into(),
        "--cpus".into(),
        "1".into(),
        "--disk-size".into(),
        "64M".into(),
        "--accel".into(),
        "tcg".into(),
        "--ssh-wait".into(),
        "300".into(),
    ]
}

/// `vmbuild bootstrap` of the stand-in's inputs in `d` to `snap`.
fn bootstrap(d: &Path, stand_in: &Path, snap: &Path) -> std::process::Output {
    Command::new(VMBUILD)
        .arg("bootstrap")
        .args(inputs(d))
        .arg("--out")
        .arg(snap)
        .env(STAND_IN_ENV, stand_in)
        .output()
        .unwrap()
}

/// A failed bootstrap left nothing: no snapshot, no staging directory, no QEMU.
fn assert_nothing_left(d: &Path, snap: &Path) {
    assert!(!snap.exists(), "nothing at --out");
    let left: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(left.is_empty(), "no staging directory left: {left:?}");
    assert!(qemus_using(d).is_empty(), "no QEMU left");
}

fn processes_named(name: &str) -> Vec<String> {
    let out = Command::new("pgrep").args(["-a", name]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn qemus_using(dir: &Path) -> Vec<String> {
    let d = dir.display().to_string();
    processes_named("qemu-system")
        .into_iter()
        .filter(|l| l.contains(&d))
        .collect()
}

#[test]
fn stand_in_target_bootstraps_suspends_and_builds_with_the_exit_code_and_xchg_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let stand_in = stand_in_dir(d, INSTALLS, 300);
    let snap = d.join("snap");
    let out = bootstrap(d, &stand_in, &snap);
    let console = |name: &str| std::fs::read_to_string(stand_in.join(name)).unwrap_or_default();
    assert!(
        out.status.success(),
        "bootstrap: {:?}\n{}\ninstall console:\n{}\nboot console:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        console("install-console.log"),
        std::fs::read_to_string(snap.join("bootstrap-console.log")).unwrap_or_default()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("STAND-IN"),
        "the stand-in says so: {stderr}"
    );
    for phase in [
        "Windows Setup",
        "WinFsp",
        "Cygwin",
        "sshd",
        "address",
        "logging in",
        "suspending",
    ] {
        assert!(stderr.contains(phase), "progress names {phase}: {stderr}");
    }

    // The snapshot records the Windows machine.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["profile"], "windows-cygwin");
    let uefi = &manifest["machine"]["uefi"];
    assert_eq!(uefi["vars"], "uefi-vars.fd", "{manifest}");
    assert_eq!(uefi["tpm"], false, "Windows 10 has no TPM");
    assert!(manifest["machine"]["machine"]
        .as_str()
        .unwrap()
        .starts_with("pc-q35-"));
    let args = manifest["qemu_args"].to_string();
    for want in [
        "pcie-root-port,id=share0",
        "pcie-root-port,id=share1",
        "virtserialport",
        "if=pflash",
        "vmgenid",
    ] {
        assert!(args.contains(want), "{want} in {args}");
    }
    assert!(!args.contains("media=cdrom"), "no install media after it");
    assert!(!args.contains("tpm"), "Windows 10: no TPM: {args}");
    assert_eq!(manifest["ssh"]["user"], "vmbuild");
    assert_eq!(manifest["ssh"]["console_device"], "/dev/ttyS0");
    let roles: Vec<&str> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["role"].as_str().unwrap())
        .collect();
    assert!(roles.contains(&"uefi-vars"), "{roles:?}");
    assert!(roles.contains(&"state"), "{roles:?}");
    assert!(
        qemus_using(d).is_empty(),
        "no QEMU left after the bootstrap"
    );

    // A build: revived, shares on drives, the command in xchg, its exit code back.
    let xchg = d.join("xchg");
    std::fs::create_dir_all(&xchg).unwrap();
    std::fs::write(xchg.join("input.txt"), "from the host\n").unwrap();
    let out = Command::new(VMBUILD)
        .args(["build", "--snapshot"])
        .arg(&snap)
        .arg("--xchg")
        .arg(&xchg)
        .arg(format!("--timings={}", d.join("timings.json").display()))
        .args([
            "--",
            "sh",
            "-c",
            "pwd > where.txt; cat input.txt > copy.txt; echo built > out.txt; exit 7",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "the command's status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |n: &str| std::fs::read_to_string(xchg.join(n)).unwrap_or_default();
    assert_eq!(read("out.txt"), "built\n");
    assert_eq!(read("copy.txt"), "from the host\n");
    assert_eq!(
        read("where.txt").trim_end_matches(['\n', '/']),
        "/cygdrive/x",
        "started in X: through cygpath"
    );
    let timings: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("timings.json")).unwrap()).unwrap();
    eprintln!("stand-in build timings: {timings}");
    for phase in ["revive", "shares_attached", "mount", "command", "total"] {
        assert!(timings[phase].as_f64().is_some(), "{phase} in {timings}");
    }
    assert!(qemus_using(d).is_empty(), "no QEMU left after the build");
}

#[test]
fn stand_in_target_failing_its_cygwin_phase_fails_the_bootstrap_with_125_and_a_screendump() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let stand_in = stand_in_dir(
        d,
        r#"say "vmbuild-phase drivers"; say "vmbuild-phase winfsp"; say "vmbuild-failed cygwin"; sleep 600"#,
        300,
    );
    let snap = d.join("snap");
    let out = bootstrap(d, &stand_in, &snap);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("cygwin"), "names the phase: {stderr}");
    let shot = d.join("snap.install-failure.png");
    assert!(stderr.contains(&shot.display().to_string()), "{stderr}");
    assert!(
        std::fs::read(&shot).is_ok_and(|b| b.starts_with(b"\x89PNG")),
        "a screendump beside --out"
    );
    assert_nothing_left(d, &snap);
}

#[test]
fn stand_in_target_install_interrupted_with_ctrl_c_exits_130_and_leaves_nothing() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let stand_in = stand_in_dir(
        d,
        r#"say "vmbuild-phase drivers"; say "vmbuild-phase winfsp"; sleep 600"#,
        300,
    );
    let snap = d.join("snap");
    let mut child = Command::new(VMBUILD)
        .arg("bootstrap")
        .args(inputs(d))
        .arg("--out")
        .arg(&snap)
        .env(STAND_IN_ENV, &stand_in)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("installing Cygwin") {
            // In the middle of the install: QEMU, its sockets and the staging dir exist.
            assert!(!qemus_using(d).is_empty(), "the install's QEMU runs");
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        }
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{seen}");
    assert!(seen.contains("interrupted"), "{seen}");
    assert_nothing_left(d, &snap);
    assert!(
        !d.join("snap.install-failure.png").exists(),
        "an interrupt is not a failure to take a screendump of"
    );
}

#[test]
fn stand_in_target_that_powers_off_at_its_first_boot_fails_the_bootstrap_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let stand_in = stand_in_dir_booting(d, INSTALLS, 300, false);
    let snap = d.join("snap");
    let started = std::time::Instant::now();
    let out = bootstrap(d, &stand_in, &snap);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "a VM failed: {stderr}");
    assert!(stderr.contains("the target's QEMU exited"), "{stderr}");
    assert!(
        stderr.contains("powering off instead"),
        "its console: {stderr}"
    );
    // Not the 300 s of --ssh-wait.
    assert!(started.elapsed().as_secs() < 200, "{:?}", started.elapsed());
    assert_nothing_left(d, &snap);
}
