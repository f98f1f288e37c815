//! The lifecycle's embedded controller, end to end through its plumbing, with a guest the
//! test assembles itself (this host's KVM cannot run Linux; this guest runs on any KVM).
//! The guest plays the controller's daemon: it announces `controller-ready`, reads one
//! line (the session) from COM2 and echoes it back on COM2, then reports status 0 and
//! powers off. Bootstrap's half snapshots it where it waits; the build's half restores it
//! (twice at once, from one snapshot), hands it the session through the UART's FIFO and
//! relays what it writes.

use std::path::Path;
use std::time::Duration;

use embedded_vmm::uart::Transcript;
use vmbuild::snapshot::controller::embedded::{
    bootstrap_embedded_controller, EmbeddedBootstrap, EmbeddedRevivedController,
};
use vmbuild::snapshot::controller::{Controller, ControllerEnd, SessionPlan};
use vmbuild::snapshot::manifest::{NetworkPlan, SshPlan};
use vswitch::{Switch, SwitchConfig};

use vmbuild_tests::pvh::{echo_com2_until_newline, kvm_here, out_bytes, pvh_kernel, HALT_FOR_GOOD};

fn daemon_guest() -> Vec<u8> {
    let mut code = out_bytes(0x3f8, b"vmbuild-phase=controller-ready\n");
    code.extend(echo_com2_until_newline(0x2f8));
    code.extend(out_bytes(
        0x3f8,
        b"vmbuild-phase=controller-up\nvmbuild-exit=0\n",
    ));
    code.extend(out_bytes(
        embedded_vmm::acpi::SLEEP_CONTROL_PORT,
        &[embedded_vmm::acpi::S5_POWER_OFF],
    ));
    code.extend(HALT_FOR_GOOD);
    code
}

fn base64_decode(text: &str) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    out.stdout
}

/// Bootstrap's half: the controller snapshotted once it is ready.
fn bootstrap(dir: &Path) -> std::path::PathBuf {
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, pvh_kernel(&daemon_guest())).unwrap();
    let initrd = dir.join("initrd");
    std::fs::write(&initrd, b"").unwrap();
    let out = dir.join("controller-kvm");
    let switch = Switch::new(SwitchConfig::default());
    let (_tx, rx) = std::sync::mpsc::channel();
    let marks = bootstrap_embedded_controller(
        &EmbeddedBootstrap {
            kernel: &kernel,
            initrd: &initrd,
            switch: &switch,
            mac: "52:54:00:77:00:01",
            out: &out,
            wait: Duration::from_secs(20),
            console_log: None,
        },
        &rx,
    )
    .unwrap()
    .unwrap();
    assert!(marks.phase("controller-ready").is_some());
    out
}

#[test]
fn a_snapshotted_controller_takes_sessions_through_its_serial_port() {
    if !kvm_here("a_snapshotted_controller_takes_sessions_through_its_serial_port") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snapshot = bootstrap(dir.path());
    let (network, ssh) = (NetworkPlan::default(), ssh_plan());
    let session = |n: usize| {
        let dir = dir.path().to_owned();
        let snapshot = snapshot.clone();
        let (network, ssh) = (network.clone(), ssh.clone());
        std::thread::spawn(move || {
            let (out, err) = (Transcript::new(None), Transcript::new(None));
            let controller = EmbeddedRevivedController {
                snapshot,
                switch: Switch::new(SwitchConfig::default()),
                output: Some((out.clone(), err)),
            };
            controller.check(&network.controller_mac).unwrap();
            let plan = SessionPlan {
                network: &network,
                ssh: &ssh,
                kernel: Path::new(""),
                initrd_parts: Vec::new(),
                net_socket: Path::new(""),
                target_script: Some(format!("echo session {n}\n").into_bytes()),
                ssh_wait: Duration::from_secs(10),
                rundir: &dir,
                console_log: dir.join(format!("console-{n}.log")),
            };
            let (_tx, rx) = std::sync::mpsc::channel();
            let outcome = controller.run_session(&plan, rx).unwrap();
            (outcome, out.text())
        })
    };
    let (a, b) = (session(1), session(2));
    for (n, s) in [(1, a), (2, b)] {
        let (outcome, echoed) = s.join().unwrap();
        assert!(
            matches!(outcome.end, ControllerEnd::Finished(0)),
            "{:?}",
            outcome.end
        );
        assert!(outcome.marks.phase("controller-up").is_some());
        // The session arrived whole: one base64 line, a newc archive with the pinned
        // host key and this session's script.
        assert!(
            echoed.ends_with('\n') && echoed.lines().count() == 1,
            "{echoed:?}"
        );
        let archive = String::from_utf8_lossy(&base64_decode(echoed.trim())).into_owned();
        assert!(archive.starts_with("070701"), "not a newc archive");
        assert!(archive.contains("10.77.0.2 ssh-ed25519 BBBB"));
        assert!(archive.contains(&format!("echo session {n}")));
    }
}

fn ssh_plan() -> SshPlan {
    SshPlan {
        user: "root".into(),
        client_key: "ssh/client_key".into(),
        client_public_key: "ssh-ed25519 AAAA".into(),
        host_key: "ssh-ed25519 BBBB".into(),
        console_device: "/dev/console".into(),
    }
}

/// A build that goes away stops the controller at once; a damaged snapshot fails the
/// dry restore a build makes before choosing it, and the restore itself.
#[test]
fn a_controller_stops_when_told_and_a_damaged_snapshot_is_caught_early() {
    if !kvm_here("a_controller_stops_when_told_and_a_damaged_snapshot_is_caught_early") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snapshot = bootstrap(dir.path());
    let (network, ssh) = (NetworkPlan::default(), ssh_plan());
    let plan = SessionPlan {
        network: &network,
        ssh: &ssh,
        kernel: Path::new(""),
        initrd_parts: Vec::new(),
        net_socket: Path::new(""),
        target_script: Some(b"true\n".to_vec()),
        ssh_wait: Duration::from_secs(10),
        rundir: dir.path(),
        console_log: dir.path().join("console.log"),
    };
    let controller = EmbeddedRevivedController {
        snapshot: snapshot.clone(),
        switch: Switch::new(SwitchConfig::default()),
        output: Some((Transcript::new(None), Transcript::new(None))),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    drop(tx);
    let started = std::time::Instant::now();
    let outcome = controller.run_session(&plan, rx).unwrap();
    assert!(
        matches!(outcome.end, ControllerEnd::Interrupted),
        "{:?}",
        outcome.end
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    std::fs::write(snapshot.join("vm-state.json"), b"{").unwrap();
    let e = controller.check(&network.controller_mac).unwrap_err();
    assert!(format!("{e:#}").contains("vm-state.json"), "{e:#}");
    let (_tx, rx) = std::sync::mpsc::channel();
    assert!(controller.run_session(&plan, rx).is_err());
}
