//! vmbuild as a build farm's unprivileged user (issue 16): uid and gid 65534 (nobody,
//! nogroup), not in group kvm, no capabilities, a home of its own. It runs commands,
//! bootstraps and builds from its own snapshots, builds from root's snapshot once root
//! shares it, serves files and runs a switch without taps; and what it may not do (read
//! an unshared snapshot, use /dev/kvm, create a tap) is refused before anything starts,
//! with exit 2 and what is missing.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const NOBODY: u32 = 65534;

fn vmbuild() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmbuild"))
}

/// `vmbuild ARGS` as uid/gid 65534 with no supplementary groups, its home and caches in
/// `home`, and no runtime directory of root's.
fn as_nobody(home: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"))
        .arg("--clear-groups")
        .arg("--inh-caps=-all")
        .arg(env!("CARGO_BIN_EXE_vmbuild"))
        .args(args)
        .env("HOME", home)
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env_remove("XDG_RUNTIME_DIR")
        .stdin(Stdio::null());
    c
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn output(mut c: Command) -> Output {
    c.output().unwrap()
}

/// A directory under the temp dir that `owner` owns and everyone may traverse.
fn dir_for(owner: u32) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(d.path(), Some(owner), Some(owner)).unwrap();
    d
}

fn wait_for(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !path.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            use std::io::Read;
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("exited {st} before {} appeared: {err}", path.display());
        }
        assert!(Instant::now() < deadline, "no {}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM, then the exit status (within 10 s).
fn stop(mut child: Child) -> Option<i32> {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("did not stop within 10 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `c` with a time limit (a refusal must come at once; anything else would serve).
fn refused_within(mut c: Command, limit: Duration) -> Output {
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running after {limit:?}: it was not refused");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn an_unprivileged_user_runs_bootstraps_builds_and_serves() {
    if !nix_is_root() {
        vmbuild_tests::skip(
            "an_unprivileged_user_runs_bootstraps_builds_and_serves",
            "not root: the test switches to uid 65534 with setpriv",
        );
        return;
    }
    let home_dir = dir_for(NOBODY);
    let home = home_dir.path();
    let root_dir = dir_for(0);
    let shared = root_dir.path().join("linux");

    // Commands in a fresh VM: TCG when /dev/kvm is not this user's.
    let out = output(as_nobody(
        home,
        &["run", "--", "sh", "-c", "echo ran; exit 6"],
    ));
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ran");

    // KVM asked for, and not this user's: exit 2 saying why, before QEMU starts.
    let out = output(as_nobody(home, &["run", "--accel", "kvm", "--", "true"]));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/dev/kvm"),
        "{}",
        text(&out)
    );

    // A snapshot of its own: bootstrap and build, no root anywhere.
    let own = home.join("snap");
    let out = output(as_nobody(
        home,
        &[
            "bootstrap",
            "--quiet",
            "--group",
            "65534",
            "--out",
            own.to_str().unwrap(),
        ],
    ));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // --group: the memory state, private by default, is the group's to read.
    let state = std::fs::metadata(own.join("state")).unwrap();
    assert_eq!(state.permissions().mode() & 0o777, 0o640);
    let out = output(as_nobody(
        home,
        &[
            "build",
            "--snapshot",
            own.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "echo own; exit 5",
        ],
    ));
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "own");

    // Root's snapshot: refused until shared, with what to do.
    let out = output({
        let mut c = vmbuild();
        c.args(["bootstrap", "--quiet", "--out"]).arg(&shared);
        c
    });
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let build_shared = || {
        output(as_nobody(
            home,
            &[
                "build",
                "--snapshot",
                shared.to_str().unwrap(),
                "--",
                "sh",
                "-c",
                "echo shared; exit 7",
            ],
        ))
    };
    let out = build_shared();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        err.contains("cannot read the snapshot's") && err.contains("vmbuild snapshot share"),
        "{}",
        text(&out)
    );
    // Only its owner can share it.
    let out = output(as_nobody(
        home,
        &[
            "snapshot",
            "share",
            shared.to_str().unwrap(),
            "--group",
            "65534",
        ],
    ));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = output({
        let mut c = vmbuild();
        c.args(["snapshot", "share"])
            .arg(&shared)
            .args(["--group", "65534"]);
        c
    });
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = build_shared();
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "shared");
    // A build only reads the snapshot.
    let verify = output({
        let mut c = vmbuild();
        c.args(["snapshot", "verify"]).arg(&shared);
        c
    });
    assert_eq!(verify.status.code(), Some(0), "{}", text(&verify));

    // A tap needs CAP_NET_ADMIN: exit 2 at once, saying so.
    let out = refused_within(
        as_nobody(home, &["switch", "--tap", "vmbt-np0"]),
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CAP_NET_ADMIN"),
        "{}",
        text(&out)
    );

    // Servers without taps: a file server and a switch with vhost-user and VDE ports.
    let share = home.join("share");
    std::fs::create_dir(&share).unwrap();
    std::os::unix::fs::chown(&share, Some(NOBODY), Some(NOBODY)).unwrap();
    let fs_sock = home.join("fs.sock");
    let mut fs = as_nobody(
        home,
        &[
            "fs",
            "serve",
            "--socket-path",
            fs_sock.to_str().unwrap(),
            "--shared-dir",
            share.to_str().unwrap(),
        ],
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_for(&fs_sock, &mut fs);
    assert_eq!(stop(fs), Some(0));
    assert!(!fs_sock.exists(), "fs serve left its socket");

    let vhost = home.join("sw.sock");
    let vde = home.join("vde");
    let mut sw = as_nobody(
        home,
        &[
            "switch",
            "--vhost-user",
            vhost.to_str().unwrap(),
            "--sock",
            vde.to_str().unwrap(),
        ],
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_for(&vhost, &mut sw);
    wait_for(&vde.join("ctl"), &mut sw);
    assert_eq!(stop(sw), Some(0));
    assert!(!vhost.exists(), "the switch left its vhost-user socket");

    // Nothing of this user's is left running or in its runtime directory.
    let runtime = std::env::temp_dir().join(format!("vmbuild-{NOBODY}"));
    let left: Vec<_> = std::fs::read_dir(&runtime)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in {}: {left:?}", runtime.display());
    let qemus = Command::new("pgrep")
        .args(["-u", &NOBODY.to_string(), "qemu"])
        .output()
        .unwrap();
    assert!(
        qemus.stdout.is_empty(),
        "QEMU left running as uid {NOBODY}: {}",
        String::from_utf8_lossy(&qemus.stdout)
    );
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail.
    unsafe { libc::geteuid() == 0 }
}
