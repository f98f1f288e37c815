//! `vmbuild switch -s DIR` as a drop-in for `vde_switch -s DIR`: the same QEMU guest
//! configuration (`-netdev vde,sock=DIR`) reaches a peer through either switch, run side by
//! side; `vde_plug` joins vmbuild's switch to a vde_switch; requests that are not
//! libvdeplug's are refused while the switch keeps serving; and everything it made is gone
//! after SIGHUP.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmbuild_tests::guest::{GuestKit, GuestShare, GuestVm};
use vmbuild_tests::netns::Netns;

/// A child process that must not outlive the test.
struct Proc(Child);

impl Drop for Proc {
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

impl Proc {
    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), sig).unwrap();
    }
}

fn wait_for(paths: &[&Path]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !paths.iter().all(|p| p.exists()) {
        assert!(Instant::now() < deadline, "no socket at {paths:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for_link(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !Path::new("/sys/class/net").join(name).exists() {
        assert!(Instant::now() < deadline, "no link {name}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn vmbuild_switch(args: &[&str]) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_vmbuild"))
            .arg("switch")
            .args(args)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// vde_switch in the foreground; its console reads stdin, and it exits at EOF, so stdin is
/// a pipe kept open for as long as it runs.
fn vde_switch(args: &[&str]) -> Proc {
    Proc(
        Command::new("vde_switch")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("vde_switch (apt-get install vde2)"),
    )
}

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

const TCP_BYTES: usize = 256 * 1024;
const TCP_IN: usize = 4 * 1024 * 1024;

/// A guest on `-netdev vde,sock=DIR` that pings `peer` and sends it TCP_BYTES over TCP.
fn guest(kit: &GuestKit, xchg: &Path, dir: &Path, me: &str, peer: &str, mac: &str) -> GuestVm {
    std::fs::write(
        xchg.join("run.sh"),
        format!(
            "ip link set eth0 up && ip addr add {me}/24 dev eth0 && \
             ping -c 3 -w 60 {peer} > /tmp/xchg/ping.txt 2>&1; status=$?; \
             dd if=/dev/zero bs=1024 count={} 2>/dev/null | nc {peer} 5001; \
             wget -q -O - http://{peer}:5002/ | wc -c > /tmp/xchg/got.txt; \
             exit $status",
            TCP_BYTES / 1024
        ),
    )
    .unwrap();
    let mut vm = GuestVm::new(kit.clone(), "/tmp/xchg/run.sh").share(GuestShare::NineP {
        dir: xchg.to_owned(),
        tag: "xchg".into(),
        mount: "/tmp/xchg".into(),
        options: String::new(),
    });
    vm.vde_nics.push((dir.to_owned(), mac.to_owned()));
    vm.timeout = Duration::from_secs(240);
    vm
}

/// Accepts one TCP connection on `addr` inside `ns` and counts its bytes until EOF (or
/// TCP_BYTES, then closes, which ends the sender).
fn receiver(ns: &Netns, addr: &'static str) -> std::thread::JoinHandle<anyhow::Result<usize>> {
    ns.run(move || {
        let listener = std::net::TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(240);
        let (mut conn, _) = loop {
            match listener.accept() {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("no connection on {addr}: {e}"),
            }
        };
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut buf = vec![0u8; 65536];
        let mut total = 0;
        while total < TCP_BYTES {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
        drop(conn);
        // Then TCP_IN bytes to the guest (its wget): from the tap, in 64 KiB GSO frames
        // when the tap has offloads, which the switch cuts for the VDE port.
        let listener =
            std::net::TcpListener::bind((addr.split(':').next().unwrap(), 5002)).unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let _ = conn.read(&mut buf);
        let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {TCP_IN}\r\n\r\n");
        conn.write_all(head.as_bytes()).unwrap();
        conn.write_all(&vec![7u8; TCP_IN]).unwrap();
        while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
        total
    })
}

/// One contender: a switch with a tap moved into a namespace of its own (the peer), and
/// a directory for QEMU's `-netdev vde`.
struct Side {
    _switch: Proc,
    ns: Netns,
    dir: PathBuf,
}

fn side(kind: &str, dir: &Path, tap: &str, addr: &str, mgmt: Option<&Path>) -> Side {
    let dir_s = dir.display().to_string();
    let switch = if kind == "vmbuild" {
        let mut args = vec!["-s", &dir_s, "-t", tap];
        let m = mgmt.map(|m| m.display().to_string());
        if let Some(m) = &m {
            args.extend(["-M", m.as_str()]);
        }
        vmbuild_switch(&args)
    } else {
        vde_switch(&["-s", &dir_s, "-t", tap])
    };
    wait_for(&[&dir.join("ctl")]);
    wait_for_link(tap);
    let ns = Netns::create(&format!("vde{kind}")).unwrap();
    ns.adopt(tap, addr).unwrap();
    Side {
        _switch: switch,
        ns,
        dir: dir.to_owned(),
    }
}

#[test]
fn the_same_qemu_vde_guest_reaches_its_peer_through_vmbuild_switch_and_vde_switch() {
    let kit = GuestKit::locate().expect("guest kit");
    let top = tempfile::tempdir().unwrap();
    let pid = std::process::id() % 100_000;
    let mgmt = top.path().join("mgmt");
    let ours = side(
        "vmbuild",
        &top.path().join("vmbuild.vde"),
        &format!("vmbq{pid}a"),
        "10.83.0.1/24",
        Some(&mgmt),
    );
    let theirs = side(
        "vde_switch",
        &top.path().join("vde_switch.vde"),
        &format!("vmbq{pid}b"),
        "10.84.0.1/24",
        None,
    );
    let rx_ours = receiver(&ours.ns, "10.83.0.1:5001");
    let rx_theirs = receiver(&theirs.ns, "10.84.0.1:5001");
    let (xa, xb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ga = guest(
        &kit,
        xa.path(),
        &ours.dir,
        "10.83.0.2",
        "10.83.0.1",
        "52:54:00:00:83:02",
    );
    let gb = guest(
        &kit,
        xb.path(),
        &theirs.dir,
        "10.84.0.2",
        "10.84.0.1",
        "52:54:00:00:84:02",
    );
    let ta = std::thread::spawn(move || ga.run());
    let tb = std::thread::spawn(move || gb.run());
    let (oa, ob) = (ta.join().unwrap().unwrap(), tb.join().unwrap().unwrap());
    let ping_a = std::fs::read_to_string(xa.path().join("ping.txt")).unwrap_or_default();
    let ping_b = std::fs::read_to_string(xb.path().join("ping.txt")).unwrap_or_default();
    let (_, ports) = ctl(&mgmt, &["port/print"]);
    assert_eq!(
        oa.exit,
        Some(0),
        "vmbuild switch: {ping_a}\n{ports}\n{}",
        oa.console
    );
    assert_eq!(ob.exit, Some(0), "vde_switch: {ping_b}\n{}", ob.console);
    assert!(ping_a.contains("3 packets received"), "{ping_a}");
    assert!(ping_b.contains("3 packets received"), "{ping_b}");
    assert_eq!(rx_ours.join().unwrap().unwrap(), TCP_BYTES);
    assert_eq!(rx_theirs.join().unwrap().unwrap(), TCP_BYTES);
    for (x, who) in [(&xa, "vmbuild switch"), (&xb, "vde_switch")] {
        let got = std::fs::read_to_string(x.path().join("got.txt")).unwrap_or_default();
        assert_eq!(
            got.trim(),
            TCP_IN.to_string(),
            "{who}: bytes the guest fetched"
        );
    }
    // The peer's tap had offloads: its TCP reached the guest as segments the switch cut.
    let (_, ports) = ctl(&mgmt, &["json", "port/print"]);
    let ports: serde_json::Value = serde_json::from_str(&ports).unwrap();
    let tap = &ports[0]["counters"];
    assert_eq!(ports[0]["kind"], "tap", "{ports}");
    let (bytes, frames) = (
        tap["rx_bytes"].as_f64().unwrap(),
        tap["rx_frames"].as_f64().unwrap(),
    );
    assert!(
        bytes / frames > 3000.0,
        "no GSO frames from the tap: {ports}"
    );
    // (All TCP_IN bytes arrived, so the switch cut every GSO frame for the VDE port.)
    // QEMU has gone: its port went with it; only the tap is left.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, ports) = ctl(&mgmt, &["json", "port/print"]);
        let ports: serde_json::Value = serde_json::from_str(&ports).unwrap();
        if ports.as_array().unwrap().len() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest's port stayed: {ports}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, info) = ctl(&mgmt, &["showinfo"]);
    assert!(info.contains("1 ports made, 0 requests refused"), "{info}");
}

/// `vde_plug` (libvdeplug, as every VDE tool uses it) on both ends of `dpipe` joins
/// vmbuild's switch to a vde_switch: two namespaces, one behind each, ping each other.
#[test]
fn vde_plug_joins_vmbuild_switch_to_vde_switch() {
    let top = tempfile::tempdir().unwrap();
    let pid = std::process::id() % 100_000;
    let ours = side(
        "plugv",
        &top.path().join("a.vde"),
        &format!("vmbp{pid}a"),
        "10.85.0.1/24",
        None,
    );
    let theirs = side(
        "plugd",
        &top.path().join("b.vde"),
        &format!("vmbp{pid}b"),
        "10.85.0.2/24",
        None,
    );
    let _wire = Proc(
        Command::new("dpipe")
            .arg("vde_plug")
            .arg(&ours.dir)
            .arg("=")
            .arg("vde_plug")
            .arg(&theirs.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dpipe (apt-get install vde2)"),
    );
    let out = ours
        .ns
        .exec(&["busybox", "ping", "-c", "3", "-w", "30", "10.85.0.2"])
        .unwrap();
    assert!(out.contains("3 packets received"), "{out}");
}

/// Requests on DIR/ctl that are not libvdeplug's are refused and counted, the switch keeps
/// serving, a requested port number is honoured; -p writes the pid file; SIGHUP stops it
/// with 0 and removes DIR (which it made), its sockets and the pid file.
#[test]
fn bad_requests_are_refused_the_switch_serves_on_and_sighup_cleans_up() {
    let top = tempfile::tempdir().unwrap();
    let dir = top.path().join("sw.vde");
    let mgmt = top.path().join("mgmt");
    let pidfile = top.path().join("sw.pid");
    let switch = vmbuild_switch(&[
        "-s",
        dir.to_str().unwrap(),
        "-M",
        mgmt.to_str().unwrap(),
        "-p",
        pidfile.to_str().unwrap(),
        "-m",
        "660",
    ]);
    wait_for(&[&dir.join("ctl"), &mgmt]);
    let ctl_mode = std::fs::metadata(dir.join("ctl")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(ctl_mode.permissions().mode() & 0o777, 0o660);
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(&pidfile).unwrap_or_default().trim() != switch.0.id().to_string()
    {
        assert!(Instant::now() < deadline, "no pid in {}", pidfile.display());
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut wrong_magic = vswitch::vde_plug::encode_request(0, &dir.join(".x"), "t");
    wrong_magic[0] ^= 0xff;
    let bad: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        wrong_magic,
        vswitch::vde_plug::encode_request(0, Path::new("/etc/passwd"), "t"),
        vswitch::vde_plug::encode_request(0, &dir.join("ctl"), "t"),
    ];
    for request in &bad {
        let mut c = UnixStream::connect(dir.join("ctl")).unwrap();
        c.write_all(request).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut answer = Vec::new();
        let _ = c.read_to_end(&mut answer);
        assert!(answer.is_empty(), "answered {answer:?}");
    }
    let (_, info) = ctl(&mgmt, &["json", "showinfo"]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["vde"][0]["refused"], 4, "{info}");
    // Still serving, and a port number asked for (vde_plug DIR[5], libvdeplug's syntax) is
    // the port's number.
    let client = vswitch::vde_plug::VdeClient::connect(&dir, 5, "test").unwrap();
    let (_, ports) = ctl(&mgmt, &["json", "port/print"]);
    let ports: serde_json::Value = serde_json::from_str(&ports).unwrap();
    assert_eq!(ports[0]["id"], 5, "{ports}");
    assert_eq!(ports[0]["kind"], "vde", "{ports}");
    // port/remove disconnects the client.
    let (code, _) = ctl(&mgmt, &["port/remove", "5"]);
    assert_eq!(code, 0);
    let mut byte = [0u8; 1];
    client
        .ctl
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(
        (&client.ctl).read(&mut byte).unwrap(),
        0,
        "not disconnected"
    );

    let mut switch = switch;
    switch.signal(nix::sys::signal::Signal::SIGHUP);
    assert_eq!(switch.0.wait().unwrap().code(), Some(0));
    drop(client);
    assert!(!dir.exists(), "DIR left behind");
    assert!(!mgmt.exists() && !pidfile.exists());
}

/// `-s DIR` of a running vde_switch is "in use" (exit 2), as vde_switch itself refuses; the
/// running switch keeps its directory.
#[test]
fn a_live_vde_switch_directory_is_not_taken_over() {
    let top = tempfile::tempdir().unwrap();
    let dir = top.path().join("live.vde");
    let _theirs = vde_switch(&["-s", dir.to_str().unwrap()]);
    wait_for(&[&dir.join("ctl")]);
    let out = Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .args(["switch", "-s"])
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.starts_with("vmbuild switch: ") && err.contains("in use"),
        "{err}"
    );
    assert!(
        UnixStream::connect(dir.join("ctl")).is_ok(),
        "vde_switch lost its socket"
    );
}

/// libvdeplug's own ways of asking for a port number (`DIR[N]`, `vde://DIR[port=N]`, what
/// QEMU's `-netdev vde,port=N` sends too) give the port that number.
#[test]
fn libvdeplug_port_numbers_are_honoured() {
    let top = tempfile::tempdir().unwrap();
    let dir = top.path().join("sw.vde");
    let mgmt = top.path().join("mgmt");
    let _switch = vmbuild_switch(&["-s", dir.to_str().unwrap(), "-M", mgmt.to_str().unwrap()]);
    wait_for(&[&dir.join("ctl"), &mgmt]);
    let plug = |url: String| {
        Proc(
            Command::new("vde_plug")
                .arg(url)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let _a = plug(format!("{}[5]", dir.display()));
    let _b = plug(format!("vde://{}[port=9]", dir.display()));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, ports) = ctl(&mgmt, &["json", "port/print"]);
        let ports: serde_json::Value = serde_json::from_str(&ports).unwrap();
        let ids: Vec<u64> = ports
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_u64().unwrap())
            .collect();
        if ids == [5, 9] {
            break;
        }
        assert!(Instant::now() < deadline, "ports {ids:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
