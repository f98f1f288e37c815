//! The windows-cygwin profile's media checks and generated ISO, without Windows: the
//! "Windows ISO" here is a stand-in built by the test (a real WIM made with Debian's
//! wimtools, holding a few bytes and the image metadata of real editions, in a real ISO
//! made with xorriso), and wiminfo is the oracle for what vmbuild reads from it.

use std::path::Path;
use std::process::Command;

use vmbuild::snapshot::profile::windows::answer_file::{answer_file, Answers};
use vmbuild::snapshot::profile::windows::config_iso::{self, Source};
use vmbuild::snapshot::profile::windows::media::{
    inspect_virtio_win, inspect_windows_iso, WindowsVersion,
};

mod windows_support;
use windows_support::*;

#[test]
fn a_windows_iso_is_read_in_place_for_its_editions_as_wiminfo_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let iso = stand_in_windows_iso(
        dir.path(),
        &[
            ("Windows 11 Home", "WinNT", 22631),
            ("Windows 11 Pro", "WinNT", 22631),
            ("Windows 10 Pro", "WinNT", 19045),
        ],
    );
    let media = inspect_windows_iso(&iso).unwrap();
    assert_eq!(media.image_path, "/sources/install.wim");
    // wiminfo on the WIM itself is the oracle.
    let listing = Command::new("wiminfo")
        .arg(dir.path().join("iso/sources/install.wim"))
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    let names: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.strip_prefix("Name:"))
        .map(str::trim)
        .collect();
    let ours: Vec<&str> = media.images.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(ours, names);
    assert_eq!(media.images[1].build, Some(22631));
    assert_eq!(
        media.pick(Some("windows 11 pro")).unwrap().version(),
        Some(WindowsVersion::Windows11)
    );
    assert_eq!(
        media.pick(Some("3")).unwrap().version(),
        Some(WindowsVersion::Windows10)
    );
    let err = media.pick(Some("Windows 11 Enterprise")).unwrap_err();
    assert!(
        err.contains("Windows 11 Home (1), Windows 11 Pro (2), Windows 10 Pro (3)"),
        "{err}"
    );
    assert!(media.pick(None).unwrap_err().contains("pass --edition"));
}

#[test]
fn an_edition_this_profile_cannot_install_is_refused_by_its_build() {
    let dir = tempfile::tempdir().unwrap();
    let iso = stand_in_windows_iso(
        dir.path(),
        &[("Windows Server 2019 Standard", "ServerNT", 17763)],
    );
    let err = inspect_windows_iso(&iso).unwrap().pick(None).unwrap_err();
    assert!(
        err.contains("build 17763") && err.contains("Windows Server 2022"),
        "{err}"
    );
}

#[test]
fn isos_that_are_not_windows_media_and_files_that_are_not_isos_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("casper")).unwrap();
    std::fs::write(tree.join("casper/vmlinuz"), b"linux").unwrap();
    let ubuntu = dir.path().join("ubuntu.iso");
    make_iso(&tree, &ubuntu, "CDROM");
    let err = inspect_windows_iso(&ubuntu).unwrap_err();
    assert!(
        err.contains("not Windows install media") && err.contains("sources/install.wim"),
        "{err}"
    );

    let text = dir.path().join("notes.iso");
    std::fs::write(&text, b"not an image at all").unwrap();
    let err = inspect_windows_iso(&text).unwrap_err();
    assert!(err.contains("not an ISO 9660 image"), "{err}");

    let err = inspect_windows_iso(&dir.path().join("missing.iso")).unwrap_err();
    assert!(
        err.contains("--iso") && err.contains("No such file"),
        "{err}"
    );

    // A WIM whose header is damaged.
    let tree = dir.path().join("bad");
    std::fs::create_dir_all(tree.join("sources")).unwrap();
    std::fs::write(tree.join("sources/install.wim"), vec![0u8; 4096]).unwrap();
    let bad = dir.path().join("bad.iso");
    make_iso(&tree, &bad, "CDROM");
    let err = inspect_windows_iso(&bad).unwrap_err();
    assert!(
        err.contains("cannot be read as a WIM") && err.contains("no WIM magic"),
        "{err}"
    );
}

#[test]
fn a_virtio_win_iso_must_hold_the_drivers_of_the_version_being_installed() {
    let dir = tempfile::tempdir().unwrap();
    let iso = stand_in_virtio_win(dir.path(), &[WindowsVersion::Windows10]);
    inspect_virtio_win(&iso, WindowsVersion::Windows10).unwrap();
    let err = inspect_virtio_win(&iso, WindowsVersion::Windows11).unwrap_err();
    assert!(
        err.contains("not a virtio-win ISO for Windows 11")
            && err.contains("/viostor/w11/amd64")
            && err.contains("/viofs/w11/amd64"),
        "{err}"
    );
}

#[test]
fn the_config_iso_carries_the_answer_file_at_its_root_and_the_first_logon_files() {
    let dir = tempfile::tempdir().unwrap();
    let packages = dir.path().join("cygwin-packages");
    std::fs::create_dir_all(packages.join("x86_64/release/openssh")).unwrap();
    std::fs::write(packages.join("x86_64/setup.ini"), b"release: cygwin").unwrap();
    let xml = answer_file(&Answers {
        version: WindowsVersion::Windows11,
        image_index: 2,
        computer_name: "VMBUILD",
        user: "vmbuild",
        password: "secret",
        first_logon_script: "vmbuild\\setup.cmd",
    });
    let iso = dir.path().join("config.iso");
    config_iso::build(
        &iso,
        &[
            ("autounattend.xml", Source::Bytes(xml.clone().into_bytes())),
            ("vmbuild/setup.cmd", Source::Bytes(b"@echo off".to_vec())),
            ("vmbuild/cygwin-packages", Source::Host(packages.clone())),
        ],
        dir.path(),
    )
    .unwrap();
    let listing = config_iso::list(&iso).unwrap();
    for want in [
        "/autounattend.xml",
        "/vmbuild/setup.cmd",
        "/vmbuild/cygwin-packages/x86_64/setup.ini",
        "/vmbuild/cygwin-packages/x86_64/release/openssh",
    ] {
        assert!(
            listing.iter().any(|l| l == want),
            "{want} not in {listing:?}"
        );
    }
    assert_eq!(
        config_iso::read(&iso, "/autounattend.xml", dir.path()).unwrap(),
        xml.as_bytes()
    );
    let err =
        config_iso::build(&iso, &[("../escape", Source::Bytes(vec![]))], dir.path()).unwrap_err();
    assert!(
        err.to_string().contains("not a plain relative path"),
        "{err}"
    );
}

/// The bash half of the first logon passes `bash -n` and shellcheck (the cmd half has no
/// checker here: its golden lines are tested in the crate and read in review).
#[test]
fn the_first_logon_shell_script_passes_bash_n_and_shellcheck() {
    use vmbuild::snapshot::profile::windows::first_logon::{setup_sh, CygwinSource, FirstLogon};
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("setup.sh");
    std::fs::write(
        &script,
        setup_sh(&FirstLogon {
            user: "vmbuild",
            packages: &[],
            cygwin: CygwinSource::Local,
            target_ip: "10.77.0.2",
            prefix_len: 24,
            ssh_port: 22,
        }),
    )
    .unwrap();
    run(Command::new("bash").arg("-n").arg(&script));
    run(Command::new("shellcheck")
        .args(["-s", "bash", "-S", "warning"])
        .arg(&script));
}

/// This host's QEMU accepts the Windows machines as vmbuild spells them: Windows 11 with
/// Secure Boot firmware and a TPM served by a real swtpm, Windows 10 without; every disk,
/// CD-ROM, the TPM and the readiness port are there when QEMU is asked over QMP.
#[test]
fn qemu_accepts_the_windows_machines_with_real_ovmf_and_swtpm() {
    use std::os::unix::net::{UnixListener, UnixStream};
    use vmbuild::snapshot::profile::windows::machine::{
        find_firmware, InstallIsos, WindowsMachine, WindowsPlacement,
    };
    for version in [WindowsVersion::Windows11, WindowsVersion::Windows10] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let win = stand_in_windows_iso(d, &[("Windows 11 Pro", "WinNT", 22631)]);
        let virtio = stand_in_virtio_win(d, &[version]);
        let config = d.join("config.iso");
        config_iso::build(
            &config,
            &[("autounattend.xml", Source::Bytes(b"<unattend/>".to_vec()))],
            d,
        )
        .unwrap();
        let disk = d.join("disk.qcow2");
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&disk)
            .arg("1G"));
        let fw = find_firmware(version).unwrap();
        let vars = d.join("vars.fd");
        std::fs::copy(&fw.vars_template, &vars).unwrap();
        let ready = d.join("ready.sock");
        let _ready = UnixListener::bind(&ready).unwrap();
        let tpm_sock = d.join("tpm.sock");
        let mut swtpm = version.needs_tpm().then(|| {
            std::fs::create_dir_all(d.join("tpm")).unwrap();
            let child = Command::new("swtpm")
                .args(["socket", "--tpm2", "--tpmstate"])
                .arg(format!("dir={}", d.join("tpm").display()))
                .arg("--ctrl")
                .arg(format!("type=unixio,path={}", tpm_sock.display()))
                .arg("--terminate")
                .spawn()
                .unwrap();
            for _ in 0..200 {
                if tpm_sock.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            child
        });
        let machine = WindowsMachine {
            accel: "tcg".into(),
            machine_type: "q35".into(),
            memory_mib: 1024,
            cpus: 1,
            mac: "52:54:00:77:00:02".into(),
        };
        let mut args = machine
            .command(
                &fw,
                &WindowsPlacement {
                    disk: &disk,
                    vars: &vars,
                    net_socket: &d.join("net.sock"),
                    ready_socket: Some(&ready),
                    tpm_socket: version.needs_tpm().then_some(tpm_sock.as_path()),
                    install: Some(InstallIsos {
                        windows: &win,
                        virtio_win: &virtio,
                        config: &config,
                    }),
                },
            )
            .argv();
        let qmp = d.join("qmp.sock");
        args.extend([
            "-S".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp.display()),
        ]);
        let mut qemu = Command::new("qemu-system-x86_64")
            .args(&args)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stream = None;
        for _ in 0..500 {
            if let Ok(s) = UnixStream::connect(&qmp) {
                stream = Some(s);
                break;
            }
            if let Some(status) = qemu.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                qemu.stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("{version:?}: QEMU refused the machine ({status}): {err}\n{args:?}");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let (tx, _rx) = std::sync::mpsc::channel();
        let mut qmp = vmbuild::qemu::Qmp::handshake(stream.expect("QMP socket"), tx).unwrap();
        let blocks = qmp.execute("query-block", serde_json::json!({})).unwrap();
        let devices: Vec<&str> = blocks
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|b| b["device"].as_str().or(b["qdev"].as_str()))
            .collect();
        for want in ["disk0", "cd0", "cd1", "cd2"] {
            assert!(
                devices.contains(&want),
                "{version:?}: {want} not in {devices:?}"
            );
        }
        let tpms = qmp.execute("query-tpm", serde_json::json!({})).unwrap();
        assert_eq!(
            tpms.as_array().unwrap().len(),
            usize::from(version.needs_tpm()),
            "{version:?}: {tpms}"
        );
        let chardevs = qmp
            .execute("query-chardev", serde_json::json!({}))
            .unwrap()
            .to_string();
        assert!(chardevs.contains("port-org.vmbuild.ready"), "{chardevs}");
        qmp.quit().unwrap();
        let status = qemu.wait().unwrap();
        assert!(status.success(), "{version:?}: {status}");
        if let Some(mut s) = swtpm.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

/// `vmbuild bootstrap --profile windows-cygwin` as a user runs it: every bad input is
/// exit 2 with one line naming the flag and the file, before anything starts or anything
/// is written at --out. (Inputs all in order start the install: windows_stand_in_lifecycle.)
#[test]
fn bootstrap_windows_cygwin_checks_every_input_and_refuses_each_bad_one_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let win = stand_in_windows_iso(
        &d.join("w"),
        &[
            ("Windows 11 Pro", "WinNT", 22631),
            ("Windows 10 Pro", "WinNT", 19045),
            ("Windows 8.1 Pro", "WinNT", 9600),
        ],
    );
    std::fs::create_dir_all(d.join("v10")).unwrap();
    let virtio10 = stand_in_virtio_win(&d.join("v10"), &[WindowsVersion::Windows10]);
    std::fs::create_dir_all(d.join("v11")).unwrap();
    let virtio11 = stand_in_virtio_win(
        &d.join("v11"),
        &[WindowsVersion::Windows10, WindowsVersion::Windows11],
    );
    let msi = stand_in_msi(d);
    let mirror = stand_in_cygwin_mirror(d);
    let empty_mirror = d.join("empty-mirror");
    std::fs::create_dir_all(&empty_mirror).unwrap();
    let out = d.join("snap");

    let s = |p: &Path| p.display().to_string();
    let good: Vec<String> = [
        "--iso",
        &s(&win),
        "--virtio-win",
        &s(&virtio11),
        "--edition",
        "Windows 11 Pro",
        "--winfsp",
        &s(&msi),
        "--cygwin-mirror",
        &s(&mirror),
        "--cygwin-packages",
        "gcc-core,make",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    // `good` with the value of `flag` replaced (or the flag dropped, for None).
    let with = |flag: &str, value: Option<&str>| -> Vec<String> {
        let mut args = Vec::new();
        let mut i = 0;
        while i < good.len() {
            if good[i] == flag {
                if let Some(v) = value {
                    args.push(flag.to_owned());
                    args.push(v.to_owned());
                }
            } else {
                args.push(good[i].clone());
                args.push(good[i + 1].clone());
            }
            i += 2;
        }
        args
    };
    let bootstrap = |args: &[String]| {
        Command::new(env!("CARGO_BIN_EXE_vmbuild"))
            .args(["bootstrap", "--profile", "windows-cygwin", "--out"])
            .arg(&out)
            .args(args)
            .output()
            .unwrap()
    };
    let missing_iso = s(&d.join("missing.iso"));
    let not_an_iso = s(&msi);
    let cases: Vec<(Vec<String>, &[&str])> = vec![
        (
            vec![],
            &[
                "needs",
                "--iso",
                "--virtio-win",
                "--winfsp",
                "--cygwin-mirror",
            ],
        ),
        (
            with("--iso", Some(&missing_iso)),
            &["--iso", "missing.iso", "No such file"],
        ),
        (
            with("--iso", Some(&not_an_iso)),
            &["--iso", "not an ISO 9660 image"],
        ),
        (
            // virtio-win is an ISO, but no Windows media.
            with("--iso", Some(&s(&virtio10))),
            &["--iso", "not Windows install media", "sources/install.wim"],
        ),
        (
            with("--edition", Some("Windows 11 Enterprise")),
            &[
                "--edition 'Windows 11 Enterprise'",
                "Windows 11 Pro (1)",
                "Windows 10 Pro (2)",
            ],
        ),
        (with("--edition", None), &["3 editions", "pass --edition"]),
        (
            with("--edition", Some("3")),
            &[
                "Windows 8.1 Pro",
                "build 9600",
                "installs Windows 10, Windows 11",
            ],
        ),
        (
            with("--virtio-win", Some(&s(&virtio10))),
            &[
                "--virtio-win",
                "not a virtio-win ISO for Windows 11",
                "/viofs/w11/amd64",
            ],
        ),
        (
            with("--winfsp", Some(&s(&win))),
            &["--winfsp", "not a Windows Installer package"],
        ),
        (
            with("--cygwin-mirror", Some(&s(&empty_mirror))),
            &["--cygwin-mirror", "no x86_64/setup.ini"],
        ),
        (
            with(
                "--cygwin-mirror",
                Some("https://mirrors.kernel.org/sourceware/cygwin/"),
            ),
            &["is a URL", "--cygwin-setup"],
        ),
        (
            with("--cygwin-packages", Some("gcc-core,make&calc")),
            &["--cygwin-packages", "'make&calc'"],
        ),
    ];
    for (args, says) in &cases {
        let o = bootstrap(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: one line: {err}"
        );
        for s in *says {
            assert!(err.contains(s), "{args:?} should say {s:?}: {err}");
        }
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }

    // The Windows flags belong to the Windows profile.
    let o = Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .args(["bootstrap", "--profile", "linux", "--out"])
        .arg(&out)
        .arg("--iso")
        .arg(&win)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("are for --profile windows-cygwin"), "{err}");
}
