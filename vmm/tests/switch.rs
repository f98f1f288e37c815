//! `vmbuild switch` as a user runs it: taps created, the console answering in text and
//! JSON, and everything removed on SIGTERM.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ctl(socket: &Path, cmd: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .args(["switch", "ctl"])
        .arg(socket)
        .args(cmd)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// As [`ctl`], with what the command printed on stderr (where errors go).
fn ctl_stderr(socket: &Path, cmd: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .args(["switch", "ctl"])
        .arg(socket)
        .args(cmd)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The switch must not outlive a failed test.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    /// SIGTERM first, so that a switch left running by a failed assertion still removes
    /// its taps, sockets and temporary directories; SIGKILL if it does not stop.
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Waits (bounded) until every path in `paths` exists: a server's sockets are up.
fn wait_for(paths: &[&Path]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !paths.iter().all(|p| p.exists()) {
        assert!(Instant::now() < deadline, "no socket at {paths:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn taps_console_and_clean_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mgmt = dir.path().join("mgmt.sock");
    let pid = std::process::id() % 100_000;
    let (t0, t1) = (format!("vmbsw{pid}a"), format!("vmbsw{pid}b"));
    let child = Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .args(["switch", "--mgmt"])
        .arg(&mgmt)
        .args([
            "--tap",
            &t0,
            "--tap",
            &format!("{t1}=trunk:native=1:10,20"),
            "--aging",
            "60",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    wait_for(&[&mgmt]);
    assert!(link_exists(&t0) && link_exists(&t1));

    let (code, text) = ctl(&mgmt, &["port/print"]);
    assert_eq!(code, 0);
    assert!(
        text.contains(&t0) && text.contains("trunk:native=1:10,20"),
        "{text}"
    );
    let (code, json) = ctl(&mgmt, &["json", "port/print"]);
    assert_eq!(code, 0);
    let ports: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(ports.as_array().unwrap().len(), 2);
    assert_eq!(ports[0]["kind"], "tap");
    let (_, info) = ctl(&mgmt, &["showinfo", "--json"]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["aging_secs"], 60);
    let (code, _) = ctl(&mgmt, &["port/setvlan", "1", "access:10"]);
    assert_eq!(code, 0);
    // Ports come and go from the console: a tap added, then removed with its interface.
    let t2 = format!("vmbsw{pid}c");
    let (code, added) = ctl(&mgmt, &["json", "port/add", "tap", &t2, "access:20"]);
    assert_eq!(code, 0, "{added}");
    let added: serde_json::Value = serde_json::from_str(&added).unwrap();
    assert!(link_exists(&t2));
    let vu = dir.path().join("vm.sock");
    let (code, text) = ctl(
        &mgmt,
        &["port/add", "vhost-user", &vu.display().to_string()],
    );
    assert_eq!(code, 0, "{text}");
    assert!(vu.exists());
    let (code, _) = ctl(&mgmt, &["port/remove", &added["port"].to_string()]);
    assert_eq!(code, 0);
    assert!(!link_exists(&t2), "removing the port removed the tap");
    let (_, listing) = ctl(&mgmt, &["port/print"]);
    assert!(
        listing.contains("vhost-user") && !listing.contains(&t2),
        "{listing}"
    );
    let (code, err) = ctl_stderr(&mgmt, &["port/add", "floppy", "x"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown port kind"), "{err}");
    let (code, err) = ctl_stderr(&mgmt, &["port/remove", "99"]);
    assert_eq!(code, 1);
    assert!(err.starts_with("vmbuild switch ctl: no port 99"), "{err}");

    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!link_exists(&t0) && !link_exists(&t1), "taps removed");
    assert!(!mgmt.exists(), "socket removed");
    assert!(!vu.exists(), "vhost-user socket removed");
}

#[test]
fn bad_arguments_exit_2() {
    for args in [
        &["--tap", "x=access:9999"][..],
        &["--mac-table-size", "0"],
        &["--tap", "name/with/slash"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_vmbuild"))
            .arg("switch")
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
}

/// vde_switch's spellings (`-M`, `-t`, `-x`), hub mode, `--no-offload` and a vhost-user
/// port from the command line; the console's `help`, `vlan/print` and `hash/print`; and
/// SIGINT (a user's Ctrl-C) removing the tap and both sockets.
#[test]
fn vde_switch_flags_hub_mode_console_and_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let mgmt = dir.path().join("mgmt.sock");
    let vu = dir.path().join("vm.sock");
    let tap = format!("vmbsw{}h", std::process::id() % 100_000);
    let child = Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .args(["switch", "-M"])
        .arg(&mgmt)
        .args(["-t", &tap, "-x", "--no-offload", "--vhost-user"])
        .arg(format!("{}=access:5", vu.display()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    wait_for(&[&mgmt, &vu]);
    assert!(link_exists(&tap));
    let (code, help) = ctl(&mgmt, &["help"]);
    assert_eq!(code, 0);
    for command in ["port/print", "vlan/print", "hash/print", "showinfo"] {
        assert!(help.contains(command), "help lacks {command}: {help}");
    }
    let (_, info) = ctl(&mgmt, &["showinfo", "--json"]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["hub"], true, "{info}");
    let (code, vlans) = ctl(&mgmt, &["vlan/print"]);
    assert_eq!(code, 0);
    assert!(vlans.contains('5'), "{vlans}");
    let (code, _) = ctl(&mgmt, &["hash/print"]);
    assert_eq!(code, 0);
    let (_, ports) = ctl(&mgmt, &["json", "port/print"]);
    let ports: serde_json::Value = serde_json::from_str(&ports).unwrap();
    let kinds: Vec<&str> = ports
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["tap", "vhost-user"], "{ports}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!link_exists(&tap), "tap removed");
    assert!(!mgmt.exists() && !vu.exists(), "sockets removed");
}

/// `-M` never clobbers: a file at the path is refused and kept, and a second switch on
/// a live switch's console socket is refused while the first keeps answering (issue 13).
#[test]
fn console_sockets_never_clobber() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "my notes").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .args(["switch", "-M"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "my notes");

    let mgmt = dir.path().join("mgmt.sock");
    let first = Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .args(["switch", "-M"])
        .arg(&mgmt)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = KillOnDrop(first);
    wait_for(&[&mgmt]);
    let out = Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .args(["switch", "-M"])
        .arg(&mgmt)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    assert_eq!(
        ctl(&mgmt, &["showinfo"]).0,
        0,
        "the first switch stopped answering"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(first.0.wait().unwrap().code(), Some(0));
}

fn switch_out(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .arg("switch")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The review's bad inputs (issue 13): each is one `vmbuild switch: ` line and exit 2
/// before anything starts, never clap's "unexpected argument" for a negative number, and
/// vde_switch flags that have no equivalent say what to use instead.
#[test]
fn bad_input_is_one_prefixed_line_and_exit_2_before_anything_starts() {
    let pid = std::process::id() % 100_000;
    let dup = format!("vmbsw{pid}d");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![], "nothing to switch"),
        (vec!["--tap", &dup, "--tap", &dup], "given twice"),
        (vec!["--tap", "lo"], "lo exists and is not a tap"),
        (
            vec!["-M", "/does-not-exist/sw.mgmt"],
            "/does-not-exist does not exist",
        ),
        (
            vec!["-s", "/does-not-exist/sw.vde"],
            "/does-not-exist does not exist",
        ),
        (vec!["-s", "/etc/hostname"], "not a directory"),
        (
            vec!["-M", "/tmp/x.mgmt", "--aging", "-1"],
            "--aging must be from 1",
        ),
        (
            vec!["-M", "/tmp/x.mgmt", "--mac-table-size", "99999999999"],
            "must be from 1 to 1048576",
        ),
        (vec!["-M", "/tmp/x.mgmt", "-H", "-5"], "must be from 1"),
        (
            vec!["-M", "/tmp/x.mgmt", "-n", "0"],
            "-n/--numports must be from 1",
        ),
        (vec!["-M", "/tmp/x.mgmt", "-d"], "systemd"),
        (vec!["-M", "/tmp/x.mgmt", "-F"], "no spanning tree"),
        (
            vec!["-M", "/tmp/x.mgmt", "--macaddr", "02:00:00:00:00:01"],
            "no spanning tree",
        ),
        (
            vec!["-M", "/tmp/x.mgmt", "--priority", "10"],
            "no spanning tree",
        ),
        (
            vec!["-M", "/tmp/x.mgmt", "-f", "/etc/vde2/vde_switch.rc"],
            "switch ctl",
        ),
        (
            vec!["-M", "/tmp/x.mgmt", "-g", "no-such-group-here"],
            "no group named",
        ),
        (vec!["-M", "/tmp/x.mgmt", "-m", "999"], "octal"),
        (
            vec!["-M", "/tmp/x.mgmt", "-p", "/does-not-exist/pid"],
            "-p/--pidfile /does-not-exist/pid",
        ),
    ];
    for (args, want) in cases {
        let (code, _, err) = switch_out(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        if !err.starts_with("error:") {
            assert!(err.starts_with("vmbuild switch: "), "{args:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        }
        assert!(!err.contains("unexpected argument"), "{args:?}: {err}");
        assert!(!link_exists(&dup));
    }
    assert!(!Path::new("/tmp/x.mgmt").exists());
}

/// `--help` carries the exit table, the environment and which vde_switch flags exist;
/// `ctl --help` mentions --json.
#[test]
fn help_lists_exit_statuses_environment_and_vde_switch_flags() {
    let (code, help, _) = switch_out(&["--help"]);
    assert_eq!(code, 0);
    for want in [
        "Exit status:\n  0  stopped by SIGINT, SIGTERM or SIGHUP (taps and sockets removed)\n  1  failed while running\n  2  bad command line or input (nothing was started)",
        "RUST_LOG",
        "-s, --sock <DIR>",
        "refused (exit 2, saying what to use): -d/--daemon, -F/--fstp",
        "-p/--pidfile",
    ] {
        assert!(help.contains(want), "--help lacks {want:?}:\n{help}");
    }
    let (code, help, _) = switch_out(&["ctl", "--help"]);
    assert_eq!(code, 0);
    assert!(help.contains("--json"), "{help}");
    assert!(help.contains("1  the switch refused the command"), "{help}");
}

/// `switch ctl`: errors on stderr with the `vmbuild switch ctl: ` prefix (JSON errors stay
/// on stdout), an empty MAC table says so, a tap that is a port already is named as such;
/// a switch that fails while starting (its tap held by another switch) says why with its
/// prefix and exits 1; SIGHUP stops a switch like SIGINT.
#[test]
fn ctl_errors_go_to_stderr_and_runtime_failures_exit_1_with_the_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let mgmt = dir.path().join("mgmt.sock");
    let tap = format!("vmbsw{}e", std::process::id() % 100_000);
    let child = Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .args(["switch", "-M"])
        .arg(&mgmt)
        .args(["--tap", &tap])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    wait_for(&[&mgmt]);

    let out = Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .args(["switch", "ctl"])
        .arg(&mgmt)
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "{:?}", out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("vmbuild switch ctl: unknown command 'frobnicate'"),
        "{err}"
    );
    let (code, json) = ctl(&mgmt, &["json", "frobnicate"]);
    assert_eq!(code, 1);
    assert!(json.starts_with("{\"error\""), "{json}");
    let (code, table) = ctl(&mgmt, &["hash/print"]);
    assert_eq!(code, 0);
    assert!(table.contains("(empty"), "{table:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .args(["switch", "ctl"])
        .arg(&mgmt)
        .args(["port/add", "tap", &tap])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already") && !err.contains("CAP_NET_ADMIN"),
        "{err}"
    );

    // A second switch on the same tap: it fails while starting, says why, exits 1.
    let (code, _, err) = switch_out(&["--tap", &tap]);
    assert_eq!(code, 1, "{err}");
    assert!(err.starts_with("vmbuild switch: "), "{err}");
    assert!(
        err.contains("in use") && !err.contains("CAP_NET_ADMIN"),
        "{err}"
    );
    assert!(!err.contains("\nvmbuild: "), "{err}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    assert_eq!(child.0.wait().unwrap().code(), Some(0));
    assert!(
        !link_exists(&tap) && !mgmt.exists(),
        "SIGHUP left things behind"
    );
}
