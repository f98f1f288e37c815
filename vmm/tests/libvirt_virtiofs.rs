//! The real drop-in check (issue 13): a libvirt-managed guest uses `vmbuild fs serve` as
//! its virtiofsd. libvirt probes the binary with `--print-capabilities`, creates the
//! vhost-user socket itself and passes it with `--fd=N`, QEMU connects, the guest kit's
//! init mounts the share, reads what the host wrote and writes back; `virsh destroy`
//! then stops vmbuild (SIGTERM from libvirt) and nothing is left.
//!
//! Runs twice: with the separate options libvirt uses for a binary that advertises
//! "separate-options" (vmbuild does), and with the legacy `-o source=...` list libvirt
//! falls back to for one that does not (a wrapper hides the feature).
//!
//! Needs root, libvirt (libvirt-daemon-system, libvirt-clients: scripts/install-host-deps.sh)
//! and the guest kit; it starts virtlogd and libvirtd if they are not running, and skips
//! with the reason printed only if libvirt cannot run here.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use vmbuild_tests::guest::GuestKit;

const URI: &str = "qemu:///system";

fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .output()
        .expect("running virsh")
}

/// The daemons this test started, stopped again when it ends (a test leaves the host as
/// it found it).
struct StartedDaemons(Vec<&'static str>);

impl Drop for StartedDaemons {
    fn drop(&mut self) {
        for daemon in &self.0 {
            let pidfile = format!("/run/{daemon}.pid");
            if let Some(pid) = fs::read_to_string(&pidfile)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                // SAFETY: kill(2) on the daemon this test started.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
    }
}

/// Connects to libvirt, starting its daemons if needed; the reason it cannot, otherwise.
fn libvirt() -> Result<StartedDaemons, String> {
    if Command::new("virsh").arg("--version").output().is_err() {
        return Err(
            "virsh is not installed (scripts/install-host-deps.sh installs libvirt)".into(),
        );
    }
    if virsh(&["version"]).status.success() {
        return Ok(StartedDaemons(Vec::new()));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("libvirtd is not running and only root can start it".into());
    }
    let mut started = StartedDaemons(Vec::new());
    for daemon in ["virtlogd", "libvirtd"] {
        if Command::new(daemon)
            .arg("-d")
            .status()
            .is_ok_and(|s| s.success())
        {
            started.0.push(daemon);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = virsh(&["version"]);
        if out.status.success() {
            return Ok(started);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "libvirtd would not start: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(format!(
                    "{}: {cmdline}",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
    }
    found
}

struct Outcome {
    argv: String,
    log: String,
}

fn boot(kit: &GuestKit, legacy: bool) -> Outcome {
    let dir = tempfile::Builder::new()
        .prefix("vmbuild-libvirt-")
        .tempdir()
        .unwrap();
    // libvirt's QEMU runs as another user; it reads nothing in here, virtlogd (root)
    // writes the console and vmbuild (root) serves the share.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let share = dir.path().join("share");
    fs::create_dir(&share).unwrap();
    let token = format!("written by the host for {}", std::process::id());
    fs::write(share.join("in.txt"), &token).unwrap();
    // The guest reads the host's file, writes one back, and then stays up until
    // `virsh destroy`, so that libvirt, not the guest, ends vmbuild.
    fs::write(
        share.join("run.sh"),
        "cat /mnt/in.txt > /mnt/out.tmp && echo ' and read back by the guest' >> /mnt/out.tmp \
         && mv /mnt/out.tmp /mnt/out.txt && sync\nsleep 600\n",
    )
    .unwrap();
    let argv_file = dir.path().join("argv.txt");
    let wrapper = dir.path().join("vmbuild-virtiofsd");
    let hide = if legacy {
        // A virtiofsd without "separate-options": libvirt then writes `-o source=...`.
        "if [ \"$1\" = --print-capabilities ]; then echo '{\"type\": \"fs\", \"features\": []}'; exit 0; fi\n"
    } else {
        ""
    };
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$*\" >> {argv}\n{hide}exec {vmbuild} fs serve \"$@\"\n",
            argv = argv_file.display(),
            vmbuild = env!("CARGO_BIN_EXE_vmbuild"),
        ),
    )
    .unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    let name = format!(
        "vmbuild-virtiofs-{}-{}",
        std::process::id(),
        if legacy { "legacy" } else { "separate" }
    );
    let console = dir.path().join("console.log");
    let xml = format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet cryptomgr.notests vmbuild.quiet vmbuild.mount=virtiofs:hostshare:/mnt vmbuild.cmd=/mnt/run.sh</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <filesystem type='mount' accessmode='passthrough'>
      <driver type='virtiofs' queue='1024'/>
      <binary path='{wrapper}' xattr='on'>
        <cache mode='none'/>
        <thread_pool size='2'/>
        <openfiles max='4096'/>
      </binary>
      <source dir='{share}'/>
      <target dir='hostshare'/>
    </filesystem>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <console type='file'><source path='{console}'/><target type='serial' port='0'/></console>
    <memballoon model='none'/>
  </devices>
</domain>
",
        kernel = kit.vmlinux.display(),
        initrd = kit.initrd.display(),
        wrapper = wrapper.display(),
        share = share.display(),
        console = console.display(),
    );
    let xml_file = dir.path().join("domain.xml");
    fs::write(&xml_file, xml).unwrap();
    let log_path = PathBuf::from(format!("/var/log/libvirt/qemu/{name}-fs0-virtiofsd.log"));
    let _ = fs::remove_file(&log_path);

    let out = virsh(&["create", &xml_file.display().to_string()]);
    assert!(
        out.status.success(),
        "virsh create: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Destroys the domain even if an assertion below fails.
    struct Domain(String);
    impl Drop for Domain {
        fn drop(&mut self) {
            let _ = virsh(&["destroy", &self.0]);
        }
    }
    let domain = Domain(name.clone());

    let out_file = share.join("out.txt");
    let deadline = Instant::now() + Duration::from_secs(180);
    while !out_file.exists() {
        assert!(
            Instant::now() < deadline,
            "the guest wrote nothing within 3 minutes; console:\n{}\nvmbuild's log:\n{}",
            fs::read_to_string(&console).unwrap_or_default(),
            fs::read_to_string(&log_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        fs::read_to_string(&out_file).unwrap(),
        format!("{token} and read back by the guest\n")
    );

    let out = virsh(&["destroy", &name]);
    assert!(out.status.success(), "virsh destroy: {out:?}");
    drop(domain);
    let share_arg = share.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = processes_mentioning(&share_arg);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes left after virsh destroy: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = fs::read_to_string(&log_path).unwrap_or_default();
    let socket = log
        .split_whitespace()
        .find_map(|w| w.strip_prefix("socket="))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("vmbuild logged no socket:\n{log}"));
    assert!(!socket.exists(), "{} left behind", socket.display());
    assert!(
        log.contains("SIGTERM: stopping") && log.contains("stopped: "),
        "vmbuild did not stop cleanly on libvirt's SIGTERM:\n{log}"
    );
    Outcome {
        argv: fs::read_to_string(&argv_file).unwrap(),
        log,
    }
}

#[test]
fn a_libvirt_guest_uses_vmbuild_fs_serve_as_its_virtiofsd() {
    const NAME: &str = "a_libvirt_guest_uses_vmbuild_fs_serve_as_its_virtiofsd";
    let _daemons = match libvirt() {
        Ok(d) => d,
        Err(why) => return vmbuild_tests::skip(NAME, &why),
    };
    let kit = match GuestKit::locate() {
        Ok(kit) => kit,
        Err(e) => return vmbuild_tests::skip(NAME, &e.to_string()),
    };

    let separate = boot(&kit, false);
    eprintln!("libvirt ran (separate options):\n{}", separate.argv);
    eprintln!("vmbuild's log:\n{}", separate.log);
    let lines: Vec<&str> = separate.argv.lines().collect();
    assert_eq!(lines[0], "--print-capabilities");
    assert!(
        lines[1].starts_with("--fd=") && lines[1].contains("--shared-dir "),
        "{lines:?}"
    );
    assert!(
        lines[1].contains("--cache never") && lines[1].contains("--xattr"),
        "{lines:?}"
    );

    let legacy = boot(&kit, true);
    eprintln!("libvirt ran (legacy -o):\n{}", legacy.argv);
    eprintln!("vmbuild's log:\n{}", legacy.log);
    let lines: Vec<&str> = legacy.argv.lines().collect();
    assert!(
        lines[1].starts_with("--fd=") && lines[1].contains(" -o source="),
        "{lines:?}"
    );
    assert!(legacy.log.contains("cache=never"), "{}", legacy.log);
}
