//! The windows-cygwin install watch against a **stand-in target**: a Linux guest (the
//! guest kit under QEMU TCG) that speaks on the same virtio-serial readiness port
//! (`org.vmbuild.ready`) as the first-logon scripts do in Windows, with a VGA screen to
//! dump. Everything the host does is real — QEMU, QMP's send-key and screendump, the
//! port, the per-phase limits — only the target is not Windows (no Windows media can be
//! fetched on these machines).

use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use vmbuild::guest::initrd;
use vmbuild::guest::kit::GuestKit;
use vmbuild::progress::Progress;
use vmbuild::qemu::process::{ChardevListener, QemuProcess};
use vmbuild::qemu::{QemuBinary, QemuCommand, Qmp};
use vmbuild::snapshot::profile::windows::first_logon::READY_PORT;
use vmbuild::snapshot::profile::windows::install_watch::{
    watch, InstallFailure, Installed, Limits, Watch,
};

/// Sets `P` to the readiness port's device. With no udev in the guest there is no
/// /dev/virtio-ports/NAME link: the port is found by the name sysfs gives it.
const FIND_PORT: &str = "P=\n\
    i=0\n\
    while [ -z \"$P\" ] && [ $i -lt 300 ]; do\n\
    \tfor n in /sys/class/virtio-ports/*/name; do\n\
    \t\t[ \"$(cat $n 2>/dev/null)\" = org.vmbuild.ready ] && P=/dev/$(basename $(dirname $n))\n\
    \tdone\n\
    \t[ -n \"$P\" ] || sleep 0.1; i=$((i+1))\n\
    done\n";

/// Boots the stand-in with `script` as its first logon and watches it with `limits`.
fn watch_stand_in(
    dir: &Path,
    script: &str,
    limits: &Limits,
) -> (Result<Installed, InstallFailure>, String) {
    assert!(FIND_PORT.contains(READY_PORT));
    let kit = GuestKit::locate().expect("the guest kit (scripts/guest-kit.sh)");
    let qemu_bin = QemuBinary::locate().unwrap();
    let script = format!(
        "{FIND_PORT}\
         say() {{ echo \"$1\" > $P; sleep 0.2; }}\n\
         {script}\n"
    );
    let initrd = initrd::with_files(
        &kit.initrd,
        dir,
        &[("/stand-in.sh", 0o755, script.as_bytes())],
    )
    .unwrap();
    let qmp_l = ChardevListener::bind(dir.join("qmp.sock")).unwrap();
    let ready_l = ChardevListener::bind(dir.join("ready.sock")).unwrap();
    let console = dir.join("console.log");
    let args = QemuCommand::new("tcg", "q35", 256)
        .firmware(qemu_bin.firmware("qboot.rom"))
        .no_reboot()
        .kernel(Some(&kit.kernel), Some(&initrd))
        .append(Some(
            "console=ttyS0 panic=-1 quiet vmbuild.quiet vmbuild.modules=virtio_console vmbuild.cmd=/stand-in.sh",
        ))
        .monitor(&qmp_l)
        .serial_file(&console)
        .serial_port(READY_PORT, Some(&ready_l.path))
        .vga()
        .argv();
    let (mut qemu, streams) = QemuProcess::start_connected(
        &qemu_bin.path,
        &args,
        &dir.join("qemu.stderr"),
        false,
        &[&qmp_l, &ready_l],
    )
    .unwrap();
    let mut streams = streams.into_iter();
    let (qmp_s, port) = (streams.next().unwrap(), streams.next().unwrap());
    let (tx, _events) = mpsc::channel();
    let mut qmp: Qmp = qemu.qmp_handshake(qmp_s, tx).unwrap();
    let (_stop, signals) = mpsc::channel();
    let result = watch(Watch {
        qemu: &mut qemu,
        qmp: &mut qmp,
        port,
        limits,
        screendump: &dir.join("screen.png"),
        progress: &Progress::new(false),
        signals: &signals,
    });
    drop(qemu);
    let console = std::fs::read_to_string(&console).unwrap_or_default();
    (result, console)
}

fn is_png(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|b| b.starts_with(b"\x89PNG\r\n\x1a\n") && b.len() > 100)
}

const ALL_PHASES: &str =
    "for p in drivers winfsp cygwin sshd network; do say \"vmbuild-phase $p\"; done";

#[test]
fn stand_in_target_that_announces_every_phase_is_watched_to_ready_with_keys_pressed() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits::uniform(Duration::from_secs(120), Duration::from_secs(3));
    // cmd's echo ends its lines with CRLF; a stray line in between is only logged.
    let (result, console) = watch_stand_in(
        dir.path(),
        &format!(
            "say 'stand-in target up'\n{ALL_PHASES}\nprintf 'vmbuild-ready\\r\\n' > $P\nsleep 600"
        ),
        &limits,
    );
    let installed = result.unwrap_or_else(|e| panic!("{e}\nconsole:\n{console}"));
    let names: Vec<&str> = installed.steps.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "drivers",
            "winfsp",
            "cygwin",
            "sshd",
            "network",
            "vmbuild-ready"
        ]
    );
    // A key a second for the CD's boot prompt, through QMP, for the first 3 s only.
    assert!(
        (2..=5).contains(&installed.keys_pressed),
        "{} keys",
        installed.keys_pressed
    );
    assert!(
        !dir.path().join("screen.png").exists(),
        "no failure, no screendump"
    );
}

#[test]
fn stand_in_target_stuck_in_a_phase_times_out_naming_it_with_a_screendump() {
    let dir = tempfile::tempdir().unwrap();
    let mut limits = Limits::uniform(Duration::from_secs(120), Duration::ZERO);
    // sshd never comes: its step gets 3 s.
    limits.steps[3].2 = Duration::from_secs(3);
    let (result, console) = watch_stand_in(
        dir.path(),
        "for p in drivers winfsp cygwin; do say \"vmbuild-phase $p\"; done\nsleep 600",
        &limits,
    );
    match result {
        Err(e @ InstallFailure::TimedOut { .. }) => {
            let InstallFailure::TimedOut {
                waiting_for,
                after,
                screen,
                ..
            } = &e
            else {
                unreachable!()
            };
            assert_eq!(waiting_for, "sshd");
            assert!(*after >= Duration::from_secs(3) && *after < Duration::from_secs(10));
            let screen = screen.as_ref().expect("a screendump");
            assert!(is_png(screen), "{}", screen.display());
            let said = e.to_string();
            assert!(
                said.contains("phase 'sshd'") && said.contains("screen.png"),
                "{said}"
            );
        }
        other => panic!("{other:?}\nconsole:\n{console}"),
    }
}

#[test]
fn stand_in_target_reporting_a_failed_phase_stops_the_watch_at_once_with_a_screendump() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits::uniform(Duration::from_secs(120), Duration::ZERO);
    let (result, console) = watch_stand_in(
        dir.path(),
        "say 'vmbuild-phase drivers'\nsay 'vmbuild-failed winfsp'\nsleep 600",
        &limits,
    );
    match result {
        Err(InstallFailure::PhaseFailed { phase, screen }) => {
            assert_eq!(phase, "winfsp");
            assert!(is_png(screen.as_ref().expect("a screendump")));
        }
        other => panic!("{other:?}\nconsole:\n{console}"),
    }
}

#[test]
fn stand_in_target_that_powers_off_mid_install_is_reported_as_stopped_not_timed_out() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits::uniform(Duration::from_secs(120), Duration::ZERO);
    // The script ends: the kit's init powers the guest off, and QEMU (-no-reboot) exits.
    let started = std::time::Instant::now();
    let (result, console) = watch_stand_in(dir.path(), "say 'vmbuild-phase drivers'", &limits);
    match result {
        Err(InstallFailure::QemuExited(why)) => {
            assert!(why.contains("'winfsp'"), "{why}");
            assert!(started.elapsed() < Duration::from_secs(100));
        }
        other => panic!("{other:?}\nconsole:\n{console}"),
    }
}

#[test]
fn stand_in_target_announcing_phases_out_of_order_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits::uniform(Duration::from_secs(120), Duration::ZERO);
    let (result, console) = watch_stand_in(
        dir.path(),
        "say 'vmbuild-phase drivers'\nsay 'vmbuild-phase cygwin'\nsleep 600",
        &limits,
    );
    match result {
        Err(InstallFailure::Unexpected {
            line, waiting_for, ..
        }) => {
            assert_eq!(line, "vmbuild-phase cygwin");
            assert_eq!(waiting_for, "winfsp");
        }
        other => panic!("{other:?}\nconsole:\n{console}"),
    }
}

mod windows_support;

/// The install run against the stand-in: the target's disk and UEFI variables are made
/// in the snapshot directory, the configuration ISO carries the answer file, the scripts,
/// the pinned host key in OpenSSH's format, the controller's key and the installers, the
/// machine boots (OVMF, the three CD-ROMs on AHCI, the NIC on an in-process switch), the
/// watch sees every phase, and the target shuts down at the end.
#[test]
fn stand_in_target_install_run_makes_the_disk_vars_and_config_iso_and_ends_shut_down() {
    use vmbuild::qemu::Accel;
    use vmbuild::snapshot::dropbear;
    use vmbuild::snapshot::manifest::NetworkPlan;
    use vmbuild::snapshot::profile::windows::config_iso;
    use vmbuild::snapshot::profile::windows::inputs::WindowsInputs;
    use vmbuild::snapshot::profile::windows::install_run::{InstallRun, StandIn, VARS_FILE};
    use vmbuild::snapshot::profile::windows::media::WindowsVersion;
    use vmbuild::snapshot::profile::InstallContext;
    use windows_support::*;

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for sub in ["w", "v", "out", "scratch", "run"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    let inputs = WindowsInputs {
        iso: Some(stand_in_windows_iso(
            &d.join("w"),
            &[("Windows 10 Pro", "WinNT", 19045)],
        )),
        virtio_win: Some(stand_in_virtio_win(
            &d.join("v"),
            &[WindowsVersion::Windows10],
        )),
        winfsp: Some(stand_in_msi(d)),
        cygwin_mirror: Some(stand_in_cygwin_mirror(d).display().to_string()),
        cygwin_packages: vec!["make".into()],
        ..Default::default()
    }
    .check()
    .unwrap();
    let host = dropbear::generate_key(&d.join("host_key")).unwrap();
    let client = dropbear::generate_key(&d.join("client_key")).unwrap();
    let authorized = format!("{}\n", client.public);

    let kit = GuestKit::locate().unwrap();
    let script = format!(
        "{FIND_PORT}\
         for p in drivers winfsp cygwin sshd network; do echo \"vmbuild-phase $p\" > $P; sleep 0.2; done\n\
         echo vmbuild-ready > $P\n\
         sleep 1\n"
    );
    let initrd = initrd::with_files(
        &kit.initrd,
        &d.join("scratch"),
        &[("/stand-in.sh", 0o755, script.as_bytes())],
    )
    .unwrap();
    let stand_in = StandIn {
        kernel: kit.kernel.with_file_name("bzImage"),
        initrd,
        append: "console=ttyS0 panic=-1 quiet vmbuild.quiet vmbuild.modules=virtio_console vmbuild.cmd=/stand-in.sh".into(),
        console: Some(d.join("console.log")),
    };
    let qemu = QemuBinary::locate().unwrap();
    let segment = vmbuild::snapshot::segment::Segment::create(&d.join("run")).unwrap();
    let (_stop, signals) = mpsc::channel();
    let limits = Limits::uniform(Duration::from_secs(180), Duration::from_secs(2));
    let progress = Progress::new(false);
    let network = NetworkPlan::default();
    let ctx = InstallContext {
        out: &d.join("out"),
        scratch: &d.join("scratch"),
        kit: &kit,
        host_key: &host.private,
        authorized_key: &authorized,
        disk_size_mib: 1024,
        network: &network,
        progress: &progress,
        qemu: &qemu,
        accel: Accel::Tcg,
        memory_mib: 256,
        cpus: 1,
        rundir: &d.join("run"),
        net_socket: &segment.target_socket,
        signals: &signals,
        screendump: d.join("screen.png"),
    };
    let run = InstallRun {
        ctx: &ctx,
        machine_type: &qemu.resolve_machine("q35").unwrap(),
        inputs: &inputs,
        limits: &limits,
        shutdown_limit: Duration::from_secs(60),
        stand_in: Some(&stand_in),
    };
    let report = run.run().unwrap_or_else(|e| {
        panic!(
            "{e:?}\nconsole:\n{}",
            std::fs::read_to_string(d.join("console.log")).unwrap_or_default()
        )
    });
    assert_eq!(report.installed.steps.len(), 6);
    assert!(report.clean_shutdown, "the stand-in powered off by itself");

    // The target's files.
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(d.join("out/disk.qcow2"))
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 1024u64 * 1024 * 1024);
    assert_eq!(
        std::fs::metadata(d.join("out").join(VARS_FILE))
            .unwrap()
            .len(),
        std::fs::metadata("/usr/share/OVMF/OVMF_VARS_4M.fd")
            .unwrap()
            .len()
    );
    assert!(!d.join("screen.png").exists());

    // The configuration ISO, read back.
    let iso = d.join("scratch/config.iso");
    let listing = config_iso::list(&iso).unwrap();
    for path in [
        "/autounattend.xml",
        "/vmbuild/setup.cmd",
        "/vmbuild/setup.sh",
        "/vmbuild/ssh/ssh_host_ed25519_key",
        "/vmbuild/ssh/ssh_host_ed25519_key.pub",
        "/vmbuild/ssh/authorized_keys",
        "/vmbuild/winfsp.msi",
        "/vmbuild/setup-x86_64.exe",
        "/vmbuild/cygwin-packages/https%3a%2f%2fmirrors.kernel.org%2fsourceware%2fcygwin%2f/x86_64/setup.ini",
    ] {
        assert!(listing.iter().any(|l| l == path), "{path} in {listing:?}");
    }
    let scratch = d.join("scratch");
    let read = |p: &str| String::from_utf8(config_iso::read(&iso, p, &scratch).unwrap()).unwrap();
    assert!(read("/vmbuild/ssh/ssh_host_ed25519_key")
        .starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
    assert_eq!(
        read("/vmbuild/ssh/ssh_host_ed25519_key.pub").trim(),
        host.public
    );
    assert_eq!(read("/vmbuild/ssh/authorized_keys"), authorized);
    let answers = read("/autounattend.xml");
    assert!(
        answers.contains("<Key>/IMAGE/INDEX</Key><Value>1</Value>"),
        "image index 1"
    );
    assert!(read("/vmbuild/setup.cmd").contains("--packages openssh,cygrunsrv,make"));
    // The OpenSSH key on the ISO is the pinned key: converting it back gives the same
    // public key.
    let back = d.join("back");
    std::fs::write(
        d.join("openssh_key"),
        read("/vmbuild/ssh/ssh_host_ed25519_key"),
    )
    .unwrap();
    let status = std::process::Command::new("dropbearconvert")
        .args(["openssh", "dropbear"])
        .arg(d.join("openssh_key"))
        .arg(&back)
        .output()
        .unwrap();
    assert!(status.status.success());
    assert_eq!(dropbear::public_key(&back).unwrap(), host.public);
}

/// Windows 11's TPM across a suspend: the target machine as the snapshot records it (a
/// UEFI plan with a TPM; plain OVMF here, because Secure Boot would refuse the stand-in's
/// kernel), booted with swtpm on the snapshot's state, suspended, and revived with a new
/// swtpm on an empty directory: QEMU carries the TPM's state in its stream and hands it
/// to the new swtpm, which writes it out; the stand-in counts on where it stopped.
#[test]
fn stand_in_target_with_a_tpm_is_revived_with_a_fresh_swtpm_that_gets_the_tpm_state() {
    use vmbuild::qemu::StateFormat;
    use vmbuild::snapshot::manifest::{MachinePlan, NetworkPlan, UefiPlan};
    use vmbuild::snapshot::target::{Placement, TargetEvent, TargetVm};

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for sub in ["snap", "boot", "revive"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    let kit = GuestKit::locate().unwrap();
    let qemu = QemuBinary::locate().unwrap();
    let snap = d.join("snap");
    std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", snap.join("vars.fd")).unwrap();
    std::fs::copy(kit.kernel.with_file_name("bzImage"), snap.join("bzImage")).unwrap();
    let script = "i=0; while :; do echo \"vmbuild-phase=tick-$i\" >/dev/ttyS0; i=$((i+1)); sleep 0.5; done\n";
    let initrd = initrd::with_files(
        &kit.initrd,
        &snap,
        &[("/tick.sh", 0o755, script.as_bytes())],
    )
    .unwrap();
    std::fs::rename(initrd, snap.join("initrd")).unwrap();
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(snap.join("disk.qcow2"))
            .arg("16M"),
    );
    let plan = MachinePlan {
        machine: qemu.resolve_machine("q35").unwrap(),
        accel: "tcg".into(),
        cpu: None,
        memory_mib: 256,
        cpus: 1,
        kernel: Some("bzImage".into()),
        initrd: Some("initrd".into()),
        append: Some("console=ttyS0 panic=-1 quiet vmbuild.quiet vmbuild.cmd=/tick.sh".into()),
        uefi: Some(UefiPlan {
            firmware: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
            secure_boot: false,
            vars: "vars.fd".into(),
            tpm: true,
        }),
    };
    let net = NetworkPlan::default();
    let segment = vmbuild::snapshot::segment::Segment::create(d).unwrap();
    let placement = |rundir: &Path| Placement {
        snapshot_dir: &snap,
        disk: Box::leak(Box::new(snap.join("disk.qcow2"))),
        net_socket: Box::leak(Box::new(segment.target_socket.clone())),
        rundir: Box::leak(Box::new(rundir.to_owned())),
        console_log: None,
    };
    let tick = |vm: &TargetVm, after: i64| -> i64 {
        let deadline = std::time::Instant::now() + Duration::from_secs(240);
        while std::time::Instant::now() < deadline {
            if let Ok(TargetEvent::Phase(p, _)) = vm.events.recv_timeout(Duration::from_secs(1)) {
                if let Some(n) = p.strip_prefix("tick-").and_then(|n| n.parse::<i64>().ok()) {
                    if n > after {
                        return n;
                    }
                }
            }
        }
        panic!("no tick after {after}; console:\n{}", vm.console_tail());
    };

    let mut vm = TargetVm::start(&qemu, &plan, &net, &placement(&d.join("boot")), false).unwrap();
    let before = tick(&vm, 2);
    assert!(
        snap.join("tpm").read_dir().unwrap().next().is_some(),
        "swtpm keeps the booted target's TPM state with the snapshot"
    );
    let state = d.join("state");
    vm.qmp
        .save_state(
            &state,
            StateFormat::Stream,
            Duration::from_secs(120),
            &mut |_, _| {},
        )
        .unwrap();
    let _ = vm.qmp.quit();
    drop(vm);

    let revive_dir = d.join("revive");
    let mut vm = TargetVm::start(&qemu, &plan, &net, &placement(&revive_dir), true).unwrap();
    vm.qmp
        .revive_from_file(&state, StateFormat::Stream, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("revive with the TPM: {e:#}"));
    let after = tick(&vm, before);
    assert!(after > before);
    let permanent = revive_dir.join("tpm/tpm2-00.permall");
    assert!(
        permanent.is_file(),
        "the revive's swtpm got the TPM's permanent state from QEMU's stream: {:?}",
        std::fs::read_dir(revive_dir.join("tpm")).map(|d| d.count())
    );
    // The same TPM, not a new one: its seeds (made at manufacture, random) came along.
    assert!(
        std::fs::read(&permanent).unwrap()
            == std::fs::read(snap.join("tpm/tpm2-00.permall")).unwrap(),
        "the revived TPM's permanent state is the suspended one's"
    );
    assert!(
        revive_dir.join("vars.fd").is_file(),
        "the revive's own UEFI variables"
    );
    let _ = vm.qmp.quit();
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
