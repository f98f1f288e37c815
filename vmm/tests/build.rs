//! The snapshot lifecycle end to end: the real binary bootstraps the `linux` profile once
//! per test run (QEMU TCG, the guest kit, Debian's dropbear), then builds revive it. Every
//! build gets its own runtime directory (XDG_RUNTIME_DIR) and is checked afterwards for
//! leftovers: sockets, directories, QEMU processes.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn vmbuild() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmbuild"));
    // Verification stamps of this run stay with this run.
    cmd.env("XDG_CACHE_HOME", tmp_root().join("cache"))
        .stdin(Stdio::null());
    cmd
}

/// Where the tests make their snapshots (created here, so that any test runs alone).
fn tmp_root() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("build-tests");
    fs::create_dir_all(&root).unwrap();
    root
}

/// The snapshot every test builds from: bootstrapped once per test run.
fn snapshot() -> &'static Path {
    static SNAPSHOT: OnceLock<PathBuf> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        let root = tmp_root();
        let dir = root.join("linux");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&root).unwrap();
        let runtime = tempfile::tempdir().unwrap();
        let out = vmbuild()
            .args(["bootstrap", "--profile", "linux", "--out"])
            .arg(&dir)
            .env("XDG_RUNTIME_DIR", runtime.path())
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "bootstrap failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_clean(runtime.path());
        dir
    })
}

struct Build {
    runtime: tempfile::TempDir,
    cmd: Command,
}

fn build_from(snapshot: &Path, args: &[&str]) -> Build {
    let runtime = tempfile::tempdir().unwrap();
    let mut cmd = vmbuild();
    cmd.arg("build")
        .arg("--snapshot")
        .arg(snapshot)
        .args(args)
        .env("XDG_RUNTIME_DIR", runtime.path());
    Build { runtime, cmd }
}

fn build(args: &[&str]) -> Build {
    build_from(snapshot(), args)
}

impl Build {
    fn output(mut self) -> Output {
        let out = self.cmd.output().unwrap();
        assert_clean(self.runtime.path());
        out
    }

    fn spawn(mut self) -> (Child, tempfile::TempDir) {
        let child = self
            .cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        (child, self.runtime)
    }
}

/// Nothing of a vmbuild invocation remains: its runtime directory is empty and no QEMU
/// process refers to it.
fn assert_clean(runtime: &Path) {
    let dir = runtime.join("vmbuild");
    if dir.exists() {
        let left: Vec<PathBuf> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
    assert!(qemu_pids(runtime).is_empty(), "QEMU left running");
}

/// QEMU processes whose command line mentions `needle` (a runtime directory).
fn qemu_pids(needle: &Path) -> Vec<(u32, String)> {
    let needle = needle.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmdline) = fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains("qemu-system") && cmdline.contains(&needle) {
                pids.push((pid, cmdline));
            }
        }
    }
    pids
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("vmbuild was killed by a signal")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A copy of the snapshot whose files are hard links (cheap), except `copied`, which are
/// real copies a test may damage, and the manifest, which a test may edit.
fn snapshot_copy(copied: &[&str]) -> tempfile::TempDir {
    let src = snapshot();
    let dst = tempfile::Builder::new()
        .prefix("snapshot-copy-")
        .tempdir_in(tmp_root())
        .unwrap();
    fs::create_dir(dst.path().join("ssh")).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(src.join("manifest.json")).unwrap()).unwrap();
    for file in manifest["files"].as_array().unwrap() {
        let name = file["name"].as_str().unwrap();
        if let Some(parent) = Path::new(name).parent() {
            fs::create_dir_all(dst.path().join(parent)).unwrap();
        }
        if copied.contains(&name) {
            fs::copy(src.join(name), dst.path().join(name)).unwrap();
        } else {
            fs::hard_link(src.join(name), dst.path().join(name)).unwrap();
        }
    }
    fs::copy(src.join("manifest.json"), dst.path().join("manifest.json")).unwrap();
    dst
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    edit(&mut m);
    fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

fn verify(dir: &Path) -> Output {
    vmbuild()
        .args(["snapshot", "verify"])
        .arg(dir)
        .output()
        .unwrap()
}

// --- behaviour -------------------------------------------------------------------------

#[test]
fn bootstrap_writes_a_complete_verifiable_snapshot() {
    let dir = snapshot();
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["profile"], "linux");
    assert!(m["machine"]["machine"]
        .as_str()
        .unwrap()
        .starts_with("pc-i440fx-"));
    assert!(m["ssh"]["host_key"]
        .as_str()
        .unwrap()
        .starts_with("ssh-ed25519 "));
    for key in ["install", "suspend", "controller_up", "handshake", "total"] {
        assert!(m["timings"][key].as_f64().is_some(), "no timing {key}: {m}");
    }
    let roles: Vec<&str> = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["role"].as_str().unwrap())
        .collect();
    for role in ["disk", "state", "kernel", "initrd", "controller", "key"] {
        assert!(roles.contains(&role), "no {role} in {roles:?}");
    }
    let key = fs::metadata(dir.join("ssh/client_key")).unwrap();
    assert_eq!(
        key.permissions().mode() & 0o077,
        0,
        "the private key is readable by others"
    );
    // No staging directory is left next to it.
    for e in fs::read_dir(dir.parent().unwrap()).unwrap().flatten() {
        assert!(
            !e.file_name().to_string_lossy().contains(".partial-"),
            "staging left: {:?}",
            e.path()
        );
    }
    let out = verify(dir);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = vmbuild()
        .args(["snapshot", "inspect", "--json"])
        .arg(dir)
        .output()
        .unwrap();
    assert_eq!(code(&out), 0);
    let inspected: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The default format: QEMU's zstd multifd channels, each recorded to its own file,
    // every one of them listed (and so checksummed) in the manifest.
    assert_eq!(inspected["state"]["format"], "multifd-zstd");
    let channels = inspected["state"]["multifd_channels"].as_u64().unwrap();
    assert!(channels >= 2, "{inspected}");
    let state_files: Vec<&str> = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["role"] == "state")
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    let mut expected = vec!["state".to_owned()];
    expected.extend((1..=channels).map(|i| format!("state.{i}")));
    assert_eq!(state_files, expected);
    for name in &state_files {
        let mode = fs::metadata(dir.join(name)).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{name}: guest memory readable by others");
    }
}

#[test]
fn exit_codes_come_back_from_the_target() {
    for expected in [0, 3, 255] {
        let script = format!("echo out; echo err >&2; exit {expected}");
        let out = build(&["--", "sh", "-c", &script]).output();
        assert_eq!(code(&out), expected, "{}", stderr(&out));
        assert_eq!(stdout(&out), "out\n");
        assert!(stderr(&out).contains("err\n"), "{}", stderr(&out));
    }
}

#[test]
fn a_freshly_booted_controller_does_the_same_job() {
    let out = build(&[
        "--controller",
        "boot",
        "--timings",
        "--",
        "sh",
        "-c",
        "echo booted; exit 7",
    ])
    .output();
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    assert_eq!(stdout(&out), "booted\n");
}

#[test]
fn xchg_is_seen_as_it_is_now_and_outputs_arrive() {
    let xchg = tempfile::tempdir().unwrap();
    // Made long after the bootstrap: the build must see it.
    fs::write(xchg.path().join("input.txt"), "made after bootstrap\n").unwrap();
    let out = build(&[
        "--xchg",
        xchg.path().to_str().unwrap(),
        "--timings",
        "--",
        "sh",
        "-c",
        "cat /tmp/xchg/input.txt; mkdir /tmp/xchg/out && uname -n > /tmp/xchg/out/host && \
         head -c 1048576 /dev/urandom > /tmp/xchg/out/blob && sha256sum /tmp/xchg/out/blob | cut -d' ' -f1",
    ])
    .output();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lines: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    assert_eq!(lines[0], "made after bootstrap");
    assert_eq!(
        fs::read_to_string(xchg.path().join("out/host")).unwrap(),
        "vmbuild-target\n"
    );
    let blob = fs::read(xchg.path().join("out/blob")).unwrap();
    assert_eq!(blob.len(), 1 << 20);
    let host_sum = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(&blob);
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    assert_eq!(lines[1], host_sum, "the output arrived damaged");
    // --timings: one JSON line on stderr with every phase.
    let timings: serde_json::Value = stderr(&out)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("no timings JSON on stderr");
    for key in [
        "verify",
        "revive",
        "shares_attached",
        "controller_revive",
        // The revived controller waits until its kernel has reseeded for the new VM
        // generation: its SSH keys are its own, not every build's.
        "controller_reseed",
        "controller_up",
        "handshake",
        "mount",
        "command",
        "collect",
        "teardown",
        "total",
    ] {
        assert!(timings[key].as_f64().is_some(), "{key} missing: {timings}");
    }
    assert!(!stderr(&out).contains("no RNG reseed"), "{}", stderr(&out));
}

#[test]
fn the_store_is_read_only_in_the_target() {
    let store = tempfile::tempdir().unwrap();
    fs::write(store.path().join("pkg"), "content\n").unwrap();
    let store_path = store.path().to_str().unwrap();
    let script = format!(
        "cat {store_path}/pkg; if touch {store_path}/new 2>/dev/null; then echo writable; else echo refused; fi"
    );
    let out = build(&["--store", store_path, "--", "sh", "-c", &script]).output();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), "content\nrefused\n");
    assert!(!store.path().join("new").exists());
}

#[test]
fn builds_from_one_snapshot_run_concurrently_with_separate_results() {
    // A rendezvous proves the overlap: each target announces itself in its xchg, then
    // waits for a "go" the test gives only once both have announced. Builds that could
    // not run at once would never both announce, and the first would give up (exit 9).
    let xchgs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut children = Vec::new();
    for (i, x) in xchgs.iter().enumerate() {
        let script = format!(
            "echo {i} > /root/mine; echo up > /tmp/xchg/started; n=0; \
             while [ ! -e /tmp/xchg/go ]; do n=$((n+1)); [ $n -gt 1800 ] && exit 9; sleep 0.1; done; \
             cat /root/mine > /tmp/xchg/result; ls /root > /tmp/xchg/listing"
        );
        let b = build(&[
            "--xchg",
            x.path().to_str().unwrap(),
            "--",
            "sh",
            "-c",
            &script,
        ]);
        children.push(b.spawn());
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while !xchgs.iter().all(|x| x.path().join("started").exists()) {
        assert!(
            Instant::now() < deadline,
            "the two builds' commands never ran at the same time"
        );
        for (child, _) in children.iter_mut() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "a build ended before both had started"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for x in &xchgs {
        fs::write(x.path().join("go"), "").unwrap();
    }
    for (child, runtime) in children {
        let out = child.wait_with_output().unwrap();
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_clean(runtime.path());
    }
    for (i, x) in xchgs.iter().enumerate() {
        assert_eq!(
            fs::read_to_string(x.path().join("result")).unwrap(),
            format!("{i}\n")
        );
        // Each target's disk is its own overlay: neither saw the other's file.
        assert_eq!(
            fs::read_to_string(x.path().join("listing")).unwrap(),
            "mine\n"
        );
    }
}

/// Builds beyond `--jobs` wait for a slot, say so, and each still gets its own result.
/// The slots are proven exclusive by the clock: a build's own time (`total`, which starts
/// when it holds the slot) began only after the build before it had ended.
#[test]
fn builds_beyond_jobs_wait_for_a_slot_and_each_gets_its_own_result() {
    const BUILDS: usize = 4;
    let runtime = tempfile::tempdir().unwrap();
    let xchgs: Vec<_> = (0..BUILDS).map(|_| tempfile::tempdir().unwrap()).collect();
    let started = Instant::now();
    let waiters: Vec<_> = xchgs
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let script = format!(
                "echo token-{i}; echo token-{i} > /tmp/xchg/mine; exit {}",
                3 + i
            );
            let mut cmd = vmbuild();
            cmd.arg("build")
                .arg("--snapshot")
                .arg(snapshot())
                .args(["--jobs", "1", "--timings", "--xchg"])
                .arg(x.path())
                .args(["--", "sh", "-c", &script])
                .env("XDG_RUNTIME_DIR", runtime.path());
            std::thread::spawn(move || {
                let out = cmd.output().unwrap();
                (out, started.elapsed().as_secs_f64())
            })
        })
        .collect();
    let mut ends = Vec::new();
    let mut waited = 0;
    for (i, w) in waiters.into_iter().enumerate() {
        let (out, ended) = w.join().unwrap();
        assert_eq!(code(&out), 3 + i as i32, "build {i}: {}", stderr(&out));
        assert_eq!(stdout(&out), format!("token-{i}\n"), "build {i}");
        assert_eq!(
            fs::read_to_string(xchgs[i].path().join("mine")).unwrap(),
            format!("token-{i}\n")
        );
        if stderr(&out).contains("waiting for a free build slot: 1 running, --jobs 1") {
            waited += 1;
            assert!(
                stderr(&out).contains("got build slot 0 after"),
                "{}",
                stderr(&out)
            );
        }
        let t = timings_of(&out);
        let total = t["total"].as_f64().expect("total");
        assert!(t["queued"].as_f64().is_some(), "{t}");
        ends.push((ended, total));
    }
    assert!(
        waited >= BUILDS - 1,
        "only {waited} builds waited for the one slot"
    );
    ends.sort_by(|a, b| a.0.total_cmp(&b.0));
    for pair in ends.windows(2) {
        let (previous_end, _) = pair[0];
        let (end, total) = pair[1];
        // The slot is released just before the process exits: allow for that and for
        // this thread seeing the exit late.
        assert!(
            end - total >= previous_end - 1.0,
            "two builds held the one slot at once: one ran {:.2}..{end:.2} s, the one before ended at {previous_end:.2} s",
            end - total
        );
    }
    assert_clean(runtime.path());
}

/// A build waiting for a slot is not timed out by `--timeout` (its deadlines start when
/// it holds one), and Ctrl-C ends the wait like a build: exit 130, nothing left.
#[test]
fn a_build_waiting_for_a_slot_is_not_timed_out_and_ctrl_c_ends_the_wait() {
    use vmbuild::build_slots::{acquire, Waited};
    let runtime = tempfile::tempdir().unwrap();
    let (_tx, rx) = std::sync::mpsc::channel();
    let Waited::Held { slot, .. } =
        acquire(&runtime.path().join("vmbuild"), 1, &rx, || {}).unwrap()
    else {
        panic!("no slot")
    };
    let mut child = vmbuild()
        .arg("build")
        .arg("--snapshot")
        .arg(snapshot())
        .args(["--jobs", "1", "--timeout", "1", "--", "true"])
        .env("XDG_RUNTIME_DIR", runtime.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr_pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stderr_pipe, &mut text).unwrap();
        text
    });
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        child.try_wait().unwrap().is_none(),
        "a build waiting for a slot ended (its --timeout 1 ran while it waited?)"
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    let text = reader.join().unwrap();
    assert_eq!(status.code(), Some(130), "{text}");
    assert!(
        text.contains("waiting for a free build slot: 1 running, --jobs 1"),
        "{text}"
    );
    drop(slot);
    assert_clean(runtime.path());
}

/// Revived from one snapshot, two targets would replay one kernel RNG state; the VM
/// generation ID the revive changes makes each reseed, so their random streams differ.
#[test]
fn revived_builds_do_not_share_random_streams() {
    let script = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    let draw = || {
        let out = build(&["--", "sh", "-c", script]).output();
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let hex = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(hex.len(), 64, "{hex}");
        hex
    };
    let (a, b) = (draw(), draw());
    assert_ne!(a, b, "two revived builds drew the same random bytes");
}

#[test]
fn builds_leave_the_snapshot_unchanged() {
    let dir = snapshot();
    let before = fs::read(dir.join("manifest.json")).unwrap();
    let out = build(&[
        "--",
        "sh",
        "-c",
        "echo scribble > /root/scribble; dd if=/dev/zero of=/root/zeros bs=1M count=8 2>/dev/null; sync",
    ])
    .output();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = build(&["--", "sh", "-c", "ls /root"]).output();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        !stdout(&out).contains("scribble"),
        "a build saw an earlier build's writes"
    );
    let out = verify(dir);
    assert_eq!(code(&out), 0, "checksums changed: {}", stderr(&out));
    assert_eq!(fs::read(dir.join("manifest.json")).unwrap(), before);
}

// --- faults ------------------------------------------------------------------------------

#[test]
fn a_missing_or_foreign_snapshot_is_refused() {
    let nowhere = tmp_root().join("no-such-snapshot");
    let out = build_from(&nowhere, &["--", "true"]).output();
    assert_eq!(code(&out), 120, "{}", stderr(&out));
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));

    let empty = tempfile::tempdir().unwrap();
    let out = build_from(empty.path(), &["--", "true"]).output();
    assert_eq!(code(&out), 120, "{}", stderr(&out));
    assert!(stderr(&out).contains("manifest.json"), "{}", stderr(&out));
}

#[test]
fn a_truncated_or_corrupted_snapshot_is_refused() {
    let copy = snapshot_copy(&["state", "disk.qcow2"]);
    // Truncated state: caught by its size before anything starts.
    let state = fs::OpenOptions::new()
        .write(true)
        .open(copy.path().join("state"))
        .unwrap();
    let len = state.metadata().unwrap().len();
    state.set_len(len / 2).unwrap();
    drop(state);
    let out = build_from(copy.path(), &["--", "true"]).output();
    assert_eq!(code(&out), 120, "{}", stderr(&out));
    assert!(stderr(&out).contains("truncated"), "{}", stderr(&out));

    // Restore the size, corrupt one byte of the disk: caught by its checksum.
    fs::copy(snapshot().join("state"), copy.path().join("state")).unwrap();
    let disk = copy.path().join("disk.qcow2");
    let mut bytes = fs::read(&disk).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0xff;
    fs::write(&disk, bytes).unwrap();
    let out = build_from(copy.path(), &["--", "true"]).output();
    assert_eq!(code(&out), 120, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("checksum mismatch"),
        "{}",
        stderr(&out)
    );
    let out = verify(copy.path());
    assert_eq!(code(&out), 120);
}

/// A manifest whose machine type was edited passes every checksum and names a machine
/// this QEMU offers, but QEMU would refuse its state at every build: `verify` and `build`
/// compare it with the state file's own header (issue 13 review, 2.4).
#[test]
fn a_manifest_that_disagrees_with_its_state_file_is_refused() {
    let copy = snapshot_copy(&[]);
    edit_manifest(copy.path(), |m| {
        let machine = m["machine"]["machine"].as_str().unwrap().to_owned();
        let other = if machine.starts_with("pc-i440fx-") {
            "pc-i440fx-9.0"
        } else {
            "pc-q35-9.0"
        };
        m["machine"]["machine"] = other.into();
    });
    let out = verify(copy.path());
    assert_eq!(code(&out), 120, "{}", stderr(&out));
    assert!(stderr(&out).contains("was saved from"), "{}", stderr(&out));
    let out = build_from(copy.path(), &["--", "true"]).output();
    assert_eq!(code(&out), 120, "{}", stderr(&out));
    assert!(stderr(&out).contains("was saved from"), "{}", stderr(&out));
}

#[test]
fn checksum_stamps_spare_rehashing_but_not_a_changed_file() {
    let copy = snapshot_copy(&["state", "disk.qcow2"]);
    let hashed = |args: &[&str]| {
        let mut all = vec!["--timings"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--", "true"]);
        let out = build_from(copy.path(), &all).output();
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        timings_of(&out)["hashed_bytes"]
            .as_u64()
            .expect("hashed_bytes in --timings")
    };
    // Every file a build checks (the optional embedded controller's only when used).
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(copy.path().join("manifest.json")).unwrap()).unwrap();
    let all: u64 = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["role"] != "embedded-controller")
        .map(|f| f["bytes"].as_u64().unwrap())
        .sum();
    let copied: u64 = ["state", "disk.qcow2"]
        .iter()
        .map(|f| fs::metadata(copy.path().join(f)).unwrap().len())
        .sum();
    // The copied files have no stamps yet: at least they are hashed, then stamped.
    assert!(hashed(&[]) >= copied);
    // Unchanged files: their stamps hold, nothing is hashed again.
    assert_eq!(hashed(&[]), 0);
    // --verify hashes everything regardless.
    assert_eq!(hashed(&["--verify"]), all);
    // One byte changed with the mtime put back: the ctime still moves, the stamp no
    // longer matches, and the checksum catches it.
    let disk = copy.path().join("disk.qcow2");
    let mtime = fs::metadata(&disk).unwrap().modified().unwrap();
    let mut bytes = fs::read(&disk).unwrap();
    let i = bytes.len() / 3;
    bytes[i] ^= 0x55;
    fs::write(&disk, bytes).unwrap();
    fs::File::options()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let out = build_from(copy.path(), &["--", "true"]).output();
    assert_eq!(code(&out), 120, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("checksum mismatch"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_snapshot_from_another_qemu_or_machine_is_refused() {
    let copy = snapshot_copy(&[]);
    edit_manifest(copy.path(), |m| m["qemu"]["version"] = "9.2.0".into());
    let out = build_from(copy.path(), &["--", "true"]).output();
    assert_eq!(code(&out), 121, "{}", stderr(&out));
    assert!(stderr(&out).contains("QEMU 9.2.0"), "{}", stderr(&out));

    let copy = snapshot_copy(&[]);
    edit_manifest(copy.path(), |m| {
        m["machine"]["machine"] = "pc-i440fx-1.0-imaginary".into()
    });
    let out = build_from(copy.path(), &["--", "true"]).output();
    assert_eq!(code(&out), 121, "{}", stderr(&out));
    assert!(stderr(&out).contains("machine type"), "{}", stderr(&out));

    let copy = snapshot_copy(&[]);
    edit_manifest(copy.path(), |m| m["format"] = 99.into());
    let out = verify(copy.path());
    assert_eq!(code(&out), 121, "{}", stderr(&out));
}

#[test]
fn a_target_that_never_answers_ssh_is_reported_in_bounded_time() {
    // The controller is sent to an address nobody has.
    let copy = snapshot_copy(&[]);
    edit_manifest(copy.path(), |m| {
        m["network"]["target_ip"] = "10.77.0.99".into()
    });
    let started = Instant::now();
    let out = build_from(copy.path(), &["--ssh-wait", "3", "--", "true"]).output();
    assert_eq!(code(&out), 122, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("did not answer SSH within 3 s"),
        "{}",
        stderr(&out)
    );
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[test]
fn a_changed_host_key_is_refused() {
    let copy = snapshot_copy(&[]);
    // Pin some other key: the real target's key no longer matches.
    edit_manifest(copy.path(), |m| {
        let client = m["ssh"]["client_public_key"].clone();
        m["ssh"]["host_key"] = client;
    });
    let out = build_from(copy.path(), &["--", "sh", "-c", "echo must-not-run"]).output();
    assert_eq!(code(&out), 119, "{}", stderr(&out));
    assert!(!stdout(&out).contains("must-not-run"));
    assert!(stderr(&out).contains("host key"), "{}", stderr(&out));
}

#[test]
fn a_hanging_command_times_out() {
    let started = Instant::now();
    let out = build(&["--timeout", "8", "--", "sleep", "600"]).output();
    assert_eq!(code(&out), 124, "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(40));
}

#[test]
fn a_target_that_dies_mid_build_is_reported() {
    let out = build(&["--", "sh", "-c", "echo o > /proc/sysrq-trigger; sleep 30"]).output();
    assert_eq!(code(&out), 123, "{}", stderr(&out));
    assert!(stderr(&out).contains("target"), "{}", stderr(&out));
}

#[test]
fn a_controller_that_dies_mid_build_is_reported() {
    let log = tempfile::NamedTempFile::new().unwrap();
    let b = build(&["--log", log.path().to_str().unwrap(), "--", "sleep", "60"]);
    let runtime_path = b.runtime.path().to_owned();
    let (child, runtime) = b.spawn();
    // Wait until the command runs (both VMs are up), then kill the controller.
    let deadline = Instant::now() + Duration::from_secs(60);
    let controller = loop {
        assert!(
            Instant::now() < deadline,
            "the build never started its command"
        );
        let pids = qemu_pids(&runtime_path);
        if pids.len() == 2 && command_started(log.path()) {
            break pids
                .into_iter()
                .find(|(_, cmd)| cmd.contains("controller-qmp"))
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // SAFETY: kill(2) on a process id read from /proc.
    unsafe { libc::kill(controller.0 as i32, libc::SIGKILL) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), 123, "{}", stderr(&out));
    assert!(stderr(&out).contains("controller"), "{}", stderr(&out));
    assert_clean(runtime.path());
}

/// Whether the target has started the command, from its console log (`--log`).
fn command_started(log: &Path) -> bool {
    fs::read_to_string(log)
        .map(|l| l.contains("vmbuild-phase=command-start"))
        .unwrap_or(false)
}

#[test]
fn ctrl_c_stops_everything_and_cleans_up() {
    let log = tempfile::NamedTempFile::new().unwrap();
    let b = build(&["--log", log.path().to_str().unwrap(), "--", "sleep", "600"]);
    let (child, runtime) = b.spawn();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !command_started(log.path()) {
        assert!(Instant::now() < deadline, "the build never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), 130, "{}", stderr(&out));
    assert_clean(runtime.path());
}

#[test]
fn bootstrap_shows_progress_refuses_to_overwrite_and_leaves_nothing_when_interrupted() {
    let root = tempfile::Builder::new()
        .prefix("bootstrap-")
        .tempdir_in(tmp_root())
        .unwrap();
    let out = root.path().join("snap");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("precious"), "keep me").unwrap();
    let refused = vmbuild()
        .args(["bootstrap", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(code(&refused), 2, "{}", stderr(&refused));
    assert!(stderr(&refused).contains("--replace"));
    assert_eq!(fs::read_to_string(out.join("precious")).unwrap(), "keep me");
    // --replace replaces snapshots only.
    let refused = vmbuild()
        .args(["bootstrap", "--replace", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(code(&refused), 2, "{}", stderr(&refused));
    assert!(stderr(&refused).contains("not a vmbuild snapshot"));
    assert_eq!(fs::read_to_string(out.join("precious")).unwrap(), "keep me");

    // Interrupted while the target boots: no snapshot, no staging, no VM.
    let fresh = root.path().join("fresh");
    let runtime = tempfile::tempdir().unwrap();
    let child = vmbuild()
        .args(["bootstrap", "--out"])
        .arg(&fresh)
        .env("XDG_RUNTIME_DIR", runtime.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while qemu_pids(runtime.path()).len() < 2 {
        assert!(Instant::now() < deadline, "bootstrap never started its VMs");
        std::thread::sleep(Duration::from_millis(50));
    }
    // QEMU acts on the SIGTERM that stops it: vmbuild's own mask (it waits for SIGINT,
    // SIGTERM and SIGHUP on one thread) is not inherited. It was, and every stop waited
    // two seconds per QEMU before SIGKILL.
    // QEMU itself blocks every signal for the instant it creates a thread
    // (qemu_thread_create), so one reading can catch that; an inherited mask stays.
    let stops = [libc::SIGHUP, libc::SIGINT, libc::SIGTERM]
        .iter()
        .fold(0u64, |m, s| m | 1 << (s - 1));
    for (pid, _) in qemu_pids(runtime.path()) {
        let mut blocked_every_time = None;
        for _ in 0..40 {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let Some(mask) = status.lines().find_map(|l| l.strip_prefix("SigBlk:")) else {
                blocked_every_time = None; // Already gone.
                break;
            };
            let mask = u64::from_str_radix(mask.trim(), 16).unwrap();
            if mask & stops == 0 {
                blocked_every_time = None;
                break;
            }
            blocked_every_time = Some(mask);
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            blocked_every_time, None,
            "QEMU {pid} blocks SIGHUP, SIGINT or SIGTERM in 40 readings over 2 s (SigBlk)"
        );
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), 130, "{}", stderr(&out));
    // Progress was shown while it worked.
    assert!(
        stderr(&out).contains("installing the linux target"),
        "{}",
        stderr(&out)
    );
    assert!(!fresh.exists());
    let left: Vec<_> = fs::read_dir(root.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 1, "left behind: {left:?}");
    assert_clean(runtime.path());
}

#[test]
fn a_failing_command_whose_stderr_looks_like_ssh_is_still_the_command() {
    // "Permission denied" and "host key mismatch" on the command's stderr once logged in
    // are the command's business, not a refused login (122) or a changed key (119).
    let out = build(&[
        "--",
        "sh",
        "-c",
        "echo 'Permission denied' >&2; echo 'Host key mismatch' >&2; exit 126",
    ])
    .output();
    assert_eq!(code(&out), 126, "{}", stderr(&out));
}

#[test]
fn a_store_path_with_a_quote_is_mounted_where_asked() {
    let root = tempfile::tempdir().unwrap();
    let store = root.path().join("o'neil store");
    fs::create_dir(&store).unwrap();
    fs::write(store.join("f"), "quoted\n").unwrap();
    let out = build(&[
        "--store",
        store.to_str().unwrap(),
        "--store-mount",
        "/srv/o'neil",
        "--",
        "cat",
        "/srv/o'neil/f",
    ])
    .output();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), "quoted\n");
}

#[test]
fn bad_input_exits_2() {
    let out = build(&[]).output();
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("no command"));
    // `run`'s options are not `build`'s, and an unknown option is refused before
    // anything starts, not handed to the command.
    let out = build(&["--cpus", "2", "--", "true"]).output();
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("unexpected argument '--cpus'"),
        "{}",
        stderr(&out)
    );
    let out = build(&["--timeout", "-1", "--", "true"]).output();
    assert_eq!(code(&out), 2);
    let out = build(&["--xchg", "/nonexistent/xchg", "--", "true"]).output();
    assert_eq!(code(&out), 2);
    let out = build(&["--timeout", "1e20", "--", "true"]).output();
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    for jobs in ["-1", "many", "100000"] {
        let out = build(&["--jobs", jobs, "--", "true"]).output();
        assert_eq!(code(&out), 2, "--jobs {jobs}: {}", stderr(&out));
    }
    let mut b = build(&["--", "true"]);
    b.cmd.env("VMBUILD_JOBS", "two");
    let out = b.output();
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("VMBUILD_JOBS=two: not a number of builds"),
        "{}",
        stderr(&out)
    );
    let scratch = tempfile::tempdir().unwrap();
    let never = scratch.path().join("never");
    let out = vmbuild()
        .args(["bootstrap", "--profile", "beos", "--out"])
        .arg(&never)
        .output()
        .unwrap();
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("unknown profile"));
    assert!(!never.exists());
    // Issue 13: refused before anything starts, in one line, rather than after the VM
    // (or the bootstrap) did its work.
    let snap = snapshot().display().to_string();
    let inside = format!("{snap}/ssh");
    let log_dir = scratch.path().display().to_string();
    for (args, needle) in [
        // The guest must not write into the snapshot that "is never modified".
        (vec!["--xchg", snap.as_str(), "--", "true"], "the snapshot"),
        (
            vec!["--xchg", inside.as_str(), "--", "true"],
            "inside the snapshot",
        ),
        (
            vec![
                "--store",
                log_dir.as_str(),
                "--store-mount",
                "/tmp/xchg",
                "--",
                "true",
            ],
            "both mounted",
        ),
        (
            vec!["--log", log_dir.as_str(), "--", "true"],
            "is a directory",
        ),
        (
            vec!["--log", "/nonexistent/c.log", "--", "true"],
            "/nonexistent/c.log",
        ),
        (vec!["--", ""], "name is empty"),
    ] {
        let out = build(&args).output();
        assert_eq!(code(&out), 2, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
        assert_eq!(
            stderr(&out).lines().count(),
            1,
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let bootstrap = |args: &[&str], out: &Path| {
        vmbuild()
            .arg("bootstrap")
            .args(args)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let out = bootstrap(&["--profile", "windows-cygwin"], &never);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("needs --iso"), "{}", stderr(&out));
    assert!(!never.exists());
    // A typo in the parent is not a directory tree to create.
    let typo = scratch.path().join("no-such-parent/snap");
    let out = bootstrap(&[], &typo);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    assert!(!scratch.path().join("no-such-parent").exists());
    // A second bootstrap into an --out that one is writing now (its locked staging
    // directory, as a running bootstrap holds it) is refused at once.
    let busy = vmbuild::owned_dir::OwnedDir::create(scratch.path(), ".busy.partial").unwrap();
    let out = bootstrap(&[], &scratch.path().join("busy"));
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("another bootstrap"),
        "{}",
        stderr(&out)
    );
    drop(busy);
    let out = bootstrap(&["--memory", "-1"], &never);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("not a size"), "{}", stderr(&out));
}

/// The last JSON line of a build's stderr: its `--timings`.
fn timings_of(out: &Output) -> serde_json::Value {
    let text = stderr(out);
    let line = text
        .lines()
        .rfind(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no timings in {text}"));
    serde_json::from_str(line).unwrap()
}

/// Where the embedded VMM cannot boot Linux (this host's KVM, by the binary's own
/// probe, which `doctor` reports), the snapshot has no embedded controller, `--controller
/// embedded` is refused before anything starts (exit 2, with the probe's reason), `auto`
/// keeps the revived QEMU controller, and a build that asks the library for an embedded
/// controller anyway ends "lost" with this KVM's failure, leaving nothing behind. (Where
/// it boots Linux, `the_lifecycle_runs_on_kvm_with_the_embedded_controller` checks the
/// other side.)
#[test]
fn without_a_kvm_that_runs_linux_builds_keep_qemus_controller() {
    let name = "without_a_kvm_that_runs_linux_builds_keep_qemus_controller";
    let doctor = vmbuild().args(["doctor", "--json"]).output().unwrap();
    let doctor: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    let finding = doctor["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "embedded_runs_linux")
        .cloned()
        .expect("doctor reports embedded_runs_linux");
    if finding["status"] == "ok" {
        vmbuild_tests::skip(
            name,
            "this host's KVM runs Linux: the ignored KVM tests cover it",
        );
        return;
    }
    let snap = snapshot();
    let script = "echo embedded; exit 7";
    let out = build(&["--controller", "embedded", "--", "sh", "-c", script]).output();
    let auto = build(&["--timings", "--", "sh", "-c", script]).output();
    assert_eq!(code(&auto), 7, "{}", stderr(&auto));
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(snap.join("manifest.json")).unwrap()).unwrap();
    assert!(
        manifest["controller"].get("embedded").is_none(),
        "{manifest}"
    );
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--controller embedded:")
            && stderr(&out).contains("use --controller revive or boot"),
        "{}",
        stderr(&out)
    );
    assert_eq!(timings_of(&auto)["controller"], "revive");

    // The library does what it is told: the embedded controller boots, this KVM stops it,
    // and the build reports the controller lost instead of hanging.
    use vmbuild::workflow::build::{build as run_build, BuildEnd, BuildSpec, ControllerChoice};
    let runtime = tempfile::tempdir().unwrap();
    let spec = BuildSpec {
        snapshot: snap.to_owned(),
        qemu: vmbuild::qemu::QemuBinary::locate().unwrap(),
        argv: vec!["true".into()],
        env: Vec::new(),
        cwd: None,
        store: None,
        xchg: None,
        keep_xchg: false,
        xchg_writeback: false,
        timeout: Some(Duration::from_secs(120)),
        ssh_wait: Duration::from_secs(60),
        verify_full: false,
        console_log: None,
        controller: ControllerChoice::Embedded,
        runtime_dir: Some(runtime.path().to_owned()),
        jobs: 1,
    };
    let (_tx, rx) = std::sync::mpsc::channel();
    let outcome = run_build(&spec, rx).unwrap();
    assert_eq!(outcome.timings.controller, Some("embedded-boot"));
    match &outcome.end {
        BuildEnd::Lost { why, console_tail } => assert!(
            why.contains("controller") && why.contains("emulation failure"),
            "{why}\n{console_tail}"
        ),
        other => panic!("unexpected end of a build with an embedded controller here: {other:?}"),
    }
    assert_clean(runtime.path());
}

/// The whole lifecycle on a KVM that runs Linux: bootstrap (on KVM) snapshots the
/// controller in the embedded VMM too (`controller-kvm/`); `--controller embedded` and
/// `auto` restore it, `embedded-boot` boots one, `revive` takes QEMU's suspended
/// controller; every kind does the whole job, and `--timings` names it.
#[test]
#[ignore = "needs a KVM that runs Linux (scripts/test.sh runs it in a nested KVM host)"]
fn the_lifecycle_runs_on_kvm_with_the_embedded_controller() {
    let snap = snapshot();
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(snap.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        manifest["controller"]["embedded"], "controller-kvm",
        "{manifest}"
    );
    let script = "echo embedded; exit 7";
    for (controller, kind) in [
        ("embedded", "embedded"),
        ("auto", "embedded"),
        ("embedded-boot", "embedded-boot"),
        ("revive", "revive"),
    ] {
        let out = build(&[
            "--controller",
            controller,
            "--timeout",
            "300",
            "--timings",
            "--",
            "sh",
            "-c",
            script,
        ])
        .output();
        assert_eq!(code(&out), 7, "{controller}: {}", stderr(&out));
        assert_eq!(stdout(&out), "embedded\n", "{controller}");
        assert_eq!(timings_of(&out)["controller"], kind, "{controller}");
    }
}

/// The embedded controller's files are checked only by builds about to use it: a
/// snapshot whose embedded controller is missing still builds, with QEMU's controller,
/// while `snapshot verify`, which checks everything, reports the damage.
#[test]
fn a_missing_embedded_controller_costs_only_itself() {
    let copy = snapshot_copy(&[]);
    let _ = fs::remove_dir_all(copy.path().join("controller-kvm"));
    edit_manifest(copy.path(), |m| {
        m["controller"]["embedded"] = "controller-kvm".into();
        let files = m["files"].as_array_mut().unwrap();
        files.retain(|f| f["role"] != "embedded-controller");
        files.push(serde_json::json!({
            "name": "controller-kvm/vm-state.json",
            "role": "embedded-controller",
            "bytes": 10,
            "sha256": "00",
        }));
    });
    let out = build_from(copy.path(), &["--timings", "--", "sh", "-c", "exit 5"]).output();
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    let timings: serde_json::Value = stderr(&out)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("timings");
    assert_eq!(timings["controller"], "revive");
    let out = verify(copy.path());
    assert_eq!(code(&out), 120, "{}", stderr(&out));
    assert!(stderr(&out).contains("controller-kvm"), "{}", stderr(&out));
}

/// A working directory the target lacks is exit 125 with vmbuild's line on stderr: the
/// command's stdout carries only what the command wrote (issue 13).
#[test]
fn a_missing_workdir_is_reported_on_stderr_not_the_commands_stdout() {
    let out = build(&["-w", "/does-not-exist", "--", "pwd"]).output();
    assert_eq!(code(&out), 125, "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    assert!(
        stderr(&out).contains("cannot change to the working directory")
            && stderr(&out).contains("could not be started"),
        "{}",
        stderr(&out)
    );
}

/// As in `run`: a program the target lacks is exit 127 with its name (issue 13).
#[test]
fn a_missing_command_is_named() {
    let out = build(&["--", "no-such-cmd"]).output();
    assert_eq!(code(&out), 127, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("vmbuild: no-such-cmd: no such command in the guest"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("session.sh"), "{}", stderr(&out));
}
