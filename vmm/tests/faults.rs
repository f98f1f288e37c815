//! Injected faults (issue 16, part 3): the disk fills up, a shared directory goes away, a
//! QEMU is killed at each phase of a build, vmbuild itself is killed, a vhost-user
//! front-end vanishes mid-request, a switch port's peer stops reading. Each test checks the
//! exit code and message, and that nothing is left behind: no QEMU, nothing in the runtime
//! directory (XDG_RUNTIME_DIR) or the temporary directory (TMPDIR) each invocation gets of
//! its own, no half-written snapshot. Real QEMU (TCG), real guests, real tmpfs mounts
//! (which need root: without it those tests skip).

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use vmbuild_tests::fuse_client::{encode, Errno, FuseClient, ROOT};
use vmbuild_tests::guest::{GuestKit, GuestShare, GuestVm};
use vmbuild_tests::vhost_frontend::{FsFrontend, REQUEST};

// --- helpers -----------------------------------------------------------------------------

fn vmbuild() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmbuild"));
    cmd.env("XDG_CACHE_HOME", tmp_root().join("cache"))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    cmd
}

fn tmp_root() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fault-tests");
    fs::create_dir_all(&root).unwrap();
    root
}

/// Whether this test may mount file systems; if not it reports the skip (the caller
/// returns).
fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    vmbuild_tests::skip(test, "mounting a tmpfs needs root");
    false
}

/// A tmpfs of `mib` MiB, unmounted (lazily, whatever still holds it) on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(mib: u64) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("tmpfs-")
            .tempdir_in(tmp_root())
            .unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}M,mode=0755"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mount -t tmpfs failed");
        Tmpfs(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// Fills what is left of it with one file.
    fn fill(&self) -> PathBuf {
        let path = self.path().join("filler");
        let mut f = fs::File::create(&path).unwrap();
        let block = vec![0x55u8; 1 << 20];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        path
    }

    fn entries(&self) -> Vec<String> {
        entries(self.path())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// One vmbuild invocation's own runtime directory (XDG_RUNTIME_DIR) and temporary
/// directory (TMPDIR): whatever it leaves there is a leak.
struct Places {
    runtime: tempfile::TempDir,
    tmp: tempfile::TempDir,
}

impl Places {
    fn new() -> Places {
        Places {
            runtime: tempfile::Builder::new()
                .prefix("rt-")
                .tempdir_in(tmp_root())
                .unwrap(),
            tmp: tempfile::Builder::new()
                .prefix("tmp-")
                .tempdir_in(tmp_root())
                .unwrap(),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = vmbuild();
        cmd.env("XDG_RUNTIME_DIR", self.runtime.path())
            .env("TMPDIR", self.tmp.path());
        cmd
    }

    /// vmbuild's runtime base: `$XDG_RUNTIME_DIR/vmbuild`.
    fn base(&self) -> PathBuf {
        self.runtime.path().join("vmbuild")
    }

    fn qemus(&self) -> Vec<(u32, String)> {
        qemu_pids(self.runtime.path())
    }

    /// Nothing left: no QEMU of this invocation, no runtime directory, socket or
    /// temporary directory.
    fn assert_clean(&self) {
        // A QEMU killed with its vmbuild needs a moment to be gone from /proc.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.qemus().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            self.qemus().is_empty(),
            "QEMU left running: {:?}",
            self.qemus()
        );
        let left = entries(&self.base());
        assert!(left.is_empty(), "left in the runtime directory: {left:?}");
        let left = entries(self.tmp.path());
        assert!(left.is_empty(), "left in TMPDIR: {left:?}");
    }
}

/// QEMU processes whose command line mentions `needle`.
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

fn kill(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a process id read from /proc or of our own child.
    unsafe { libc::kill(pid as i32, signal) };
}

/// A vmbuild running in the background: its stdout and stderr are collected as they come,
/// so a test can wait for a line.
struct Running {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    started: Instant,
}

struct Ended {
    code: i32,
    stdout: String,
    stderr: String,
    wall: Duration,
}

impl Running {
    fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let readers = vec![
            {
                let stdout = stdout.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 8192];
                    while let Ok(n) = out.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        stdout.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                })
            },
            {
                let stderr = stderr.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(err).lines() {
                        let Ok(line) = line else { break };
                        let mut s = stderr.lock().unwrap();
                        s.push_str(&line);
                        s.push('\n');
                    }
                })
            },
        ];
        Running {
            child,
            stdout,
            stderr,
            readers,
            started: Instant::now(),
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// Waits until `cond` holds, failing the test after `limit` or if vmbuild ends first.
    fn wait_for(&mut self, what: &str, limit: Duration, mut cond: impl FnMut(&Running) -> bool) {
        let deadline = Instant::now() + limit;
        while !cond(self) {
            assert!(
                !self.exited(),
                "vmbuild ended before {what}: {}",
                self.stderr()
            );
            assert!(
                Instant::now() < deadline,
                "{what}: not within {limit:?}: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits for vmbuild to exit; a vmbuild still running after `limit` hangs: killed, and
    /// the test fails.
    fn end(mut self, limit: Duration) -> Ended {
        let deadline = self.started + limit;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "vmbuild hung (still running after {limit:?}): {}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let wall = self.started.elapsed();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Ended {
            code: status
                .code()
                .unwrap_or_else(|| panic!("vmbuild was killed by {status}")),
            stdout: String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned(),
            stderr: self.stderr(),
            wall,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a fault came to, for the log (`--nocapture`): the exit code and vmbuild's own
/// lines.
fn report(fault: &str, end: &Ended) {
    let said: Vec<&str> = end
        .stderr
        .lines()
        .filter(|l| l.starts_with("vmbuild"))
        .collect();
    eprintln!(
        "fault {fault}: exit {} after {:.1?}: {}",
        end.code,
        end.wall,
        said.join(" | ")
    );
}

fn file_has(path: &Path, needle: &str) -> bool {
    fs::read_to_string(path).is_ok_and(|t| t.contains(needle))
}

// --- the snapshot the builds revive -----------------------------------------------------

/// Bootstrapped once per test run, as build.rs does (its own copy: the tests may run
/// side by side).
fn snapshot() -> &'static Path {
    static SNAPSHOT: OnceLock<PathBuf> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        let dir = tmp_root().join("linux");
        let _ = fs::remove_dir_all(&dir);
        let places = Places::new();
        let out = places
            .command()
            .args(["bootstrap", "--profile", "linux", "--quiet", "--out"])
            .arg(&dir)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "bootstrap failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        places.assert_clean();
        dir
    })
}

fn build(places: &Places, args: &[&str]) -> Command {
    let mut cmd = places.command();
    cmd.arg("build")
        .arg("--snapshot")
        .arg(snapshot())
        .args(args);
    cmd
}

// --- the disk fills up -----------------------------------------------------------------------

/// `--out` on a 64 MiB tmpfs: the guest kit's kernel alone does not fit. The bootstrap
/// fails with the file system's own words, and leaves no snapshot, no staging directory,
/// no VM.
#[test]
fn bootstrap_onto_a_full_disk_fails_and_leaves_no_half_snapshot() {
    let name = "bootstrap_onto_a_full_disk_fails_and_leaves_no_half_snapshot";
    if !root_or_skip(name) {
        return;
    }
    let disk = Tmpfs::mount(64);
    let places = Places::new();
    let out = disk.path().join("snap");
    let mut cmd = places.command();
    cmd.args(["bootstrap", "--quiet", "--out"]).arg(&out);
    let end = Running::spawn(cmd).end(Duration::from_secs(120));
    report(
        "bootstrap_onto_a_full_disk_fails_and_leaves_no_half_snapshot",
        &end,
    );
    assert_eq!(end.code, 125, "{}", end.stderr);
    assert!(
        end.stderr.contains("copying") && end.stderr.contains("No space left on device"),
        "{}",
        end.stderr
    );
    assert_eq!(disk.entries(), Vec::<String>::new(), "a half snapshot");
    places.assert_clean();
}

/// The disk fills up while the target's memory is written to its state file (the rest of
/// the snapshot fitted): QEMU's migration fails, the bootstrap says so, and nothing of the
/// snapshot remains.
#[test]
fn bootstrap_fails_cleanly_when_the_disk_fills_while_the_memory_state_is_saved() {
    let name = "bootstrap_fails_cleanly_when_the_disk_fills_while_the_memory_state_is_saved";
    if !root_or_skip(name) {
        return;
    }
    let disk = Tmpfs::mount(1024);
    let places = Places::new();
    let out = disk.path().join("snap");
    let mut cmd = places.command();
    cmd.args(["bootstrap", "--out"]).arg(&out);
    let mut run = Running::spawn(cmd);
    run.wait_for("the suspend", Duration::from_secs(180), |r| {
        r.stderr()
            .contains("suspending the target to its memory state...")
    });
    // vmbuild itself records the compressed state, in well under a second: it is held
    // (within 2 ms of saying it starts the suspend) while the disk fills, so the fill
    // always comes first.
    let pid = run.child.id();
    kill(pid, libc::SIGSTOP);
    disk.fill();
    kill(pid, libc::SIGCONT);
    let end = run.end(Duration::from_secs(180));
    report(
        "bootstrap_fails_cleanly_when_the_disk_fills_while_the_memory_state_is_saved",
        &end,
    );
    assert_eq!(end.code, 125, "{}", end.stderr);
    assert!(
        end.stderr.contains("suspending the target")
            && end.stderr.contains("No space left on device"),
        "{}",
        end.stderr
    );
    assert_eq!(disk.entries(), vec!["filler".to_owned()], "a half snapshot");
    places.assert_clean();
}

/// The disk fills up while the controller boots and logs in (after the install): its
/// memory state cannot be saved, and the bootstrap says the file system is full (QEMU only
/// says "Input/output error"), leaving nothing behind.
#[test]
fn bootstrap_fails_cleanly_when_the_disk_fills_while_the_controller_boots() {
    let name = "bootstrap_fails_cleanly_when_the_disk_fills_while_the_controller_boots";
    if !root_or_skip(name) {
        return;
    }
    let disk = Tmpfs::mount(1024);
    let places = Places::new();
    let out = disk.path().join("snap");
    let mut cmd = places.command();
    cmd.args(["bootstrap", "--out"]).arg(&out);
    let mut run = Running::spawn(cmd);
    run.wait_for("the controller", Duration::from_secs(180), |_| {
        places
            .qemus()
            .iter()
            .any(|(_, c)| c.contains("controller-qmp"))
    });
    disk.fill();
    let end = run.end(Duration::from_secs(100));
    report(
        "bootstrap_fails_cleanly_when_the_disk_fills_while_the_controller_boots",
        &end,
    );
    assert_eq!(end.code, 125, "{}", end.stderr);
    assert!(
        end.stderr.contains("suspending the controller")
            && end.stderr.contains("No space left on device"),
        "{}",
        end.stderr
    );
    assert_eq!(disk.entries(), vec!["filler".to_owned()], "a half snapshot");
    places.assert_clean();
}

/// xchg on a 16 MiB tmpfs: the command's write fails with ENOSPC in the guest, the command
/// goes on, and its own exit status comes back.
#[test]
fn a_full_xchg_is_enospc_for_the_command_and_its_status_comes_back() {
    let name = "a_full_xchg_is_enospc_for_the_command_and_its_status_comes_back";
    if !root_or_skip(name) {
        return;
    }
    let xchg = Tmpfs::mount(16);
    let places = Places::new();
    let script = "dd if=/dev/zero of=/tmp/xchg/big bs=1M count=64 2>&1; echo dd=$?; \
                  echo small > /tmp/xchg/small 2>&1; echo echo=$?; rm /tmp/xchg/big; \
                  echo after > /tmp/xchg/after; exit 7";
    let cmd = build(
        &places,
        &[
            "--xchg",
            xchg.path().to_str().unwrap(),
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    let end = Running::spawn(cmd).end(Duration::from_secs(180));
    report(
        "a_full_xchg_is_enospc_for_the_command_and_its_status_comes_back",
        &end,
    );
    assert_eq!(end.code, 7, "{}\n{}", end.stdout, end.stderr);
    assert!(
        end.stdout.contains("No space left on device") && end.stdout.contains("dd=1"),
        "{}",
        end.stdout
    );
    assert!(end.stdout.contains("echo=1"), "{}", end.stdout);
    // Space freed in the guest is space again: the share is still working.
    assert_eq!(
        fs::read_to_string(xchg.path().join("after")).unwrap(),
        "after\n"
    );
    places.assert_clean();
}

/// The build's own runtime directory (where the target disk's overlay lives) fills up
/// while the target writes its disk: QEMU pauses the target (its default on ENOSPC, which
/// would wait forever); the build sees it, stops, and says where the space ran out.
#[test]
fn a_full_runtime_directory_ends_the_build_instead_of_hanging_it() {
    let name = "a_full_runtime_directory_ends_the_build_instead_of_hanging_it";
    if !root_or_skip(name) {
        return;
    }
    let snap = snapshot();
    let runtime = Tmpfs::mount(48);
    let places = Places::new();
    let mut cmd = vmbuild();
    cmd.env("XDG_RUNTIME_DIR", runtime.path())
        .env("TMPDIR", places.tmp.path())
        .arg("build")
        .arg("--snapshot")
        .arg(snap)
        .args([
            "--",
            "sh",
            "-c",
            "dd if=/dev/zero of=/root/big bs=1M count=160 2>&1; sync; echo synced; exit 4",
        ]);
    let end = Running::spawn(cmd).end(Duration::from_secs(150));
    report(
        "a_full_runtime_directory_ends_the_build_instead_of_hanging_it",
        &end,
    );
    assert_eq!(end.code, 125, "{}\n{}", end.stdout, end.stderr);
    assert!(
        end.stderr
            .contains("could not be written on the host (No space left on device)")
            && end.stderr.contains(runtime.path().to_str().unwrap()),
        "{}",
        end.stderr
    );
    assert!(!end.stdout.contains("synced"), "{}", end.stdout);
    assert_eq!(
        entries(&runtime.path().join("vmbuild")),
        Vec::<String>::new()
    );
    assert!(qemu_pids(runtime.path()).is_empty());
    places.assert_clean();
}

/// The same for `vmbuild run --disk IMAGE --disk-mode overlay`: the overlay in the run's
/// runtime directory fills up while the guest writes its disk.
#[test]
fn a_full_runtime_directory_ends_a_run_instead_of_hanging_it() {
    let name = "a_full_runtime_directory_ends_a_run_instead_of_hanging_it";
    if !root_or_skip(name) {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let image = scratch.path().join("disk.raw");
    fs::File::create(&image)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let runtime = Tmpfs::mount(32);
    let places = Places::new();
    let mut cmd = vmbuild();
    cmd.env("XDG_RUNTIME_DIR", runtime.path())
        .env("TMPDIR", places.tmp.path())
        .args(["run", "--memory", "256", "--disk"])
        .arg(&image)
        .args([
            "--disk-mode",
            "overlay",
            "--",
            "sh",
            "-c",
            "dd if=/dev/urandom of=/dev/vda bs=1M count=128 2>&1; sync; echo synced; exit 4",
        ]);
    let end = Running::spawn(cmd).end(Duration::from_secs(150));
    report(name, &end);
    assert_eq!(end.code, 125, "{}\n{}", end.stdout, end.stderr);
    assert!(
        end.stderr
            .contains("its disk could not be written on the host (No space left on device)"),
        "{}",
        end.stderr
    );
    assert!(!end.stdout.contains("synced"), "{}", end.stdout);
    assert_eq!(
        entries(&runtime.path().join("vmbuild")),
        Vec::<String>::new()
    );
    assert!(qemu_pids(runtime.path()).is_empty());
    places.assert_clean();
    // The base image was never written.
    let base = fs::read(&image).unwrap();
    assert!(base.iter().all(|b| *b == 0), "the base image changed");
}

// --- a shared directory goes away -------------------------------------------------------

/// The script a build runs to meet the host half-way: it announces itself in xchg, waits
/// until the host removed `started`, then writes once more and lists xchg.
const RENDEZVOUS: &str = "echo up > /tmp/xchg/started; n=0; \
     while [ -e /tmp/xchg/started ]; do n=$((n+1)); [ $n -gt 900 ] && exit 9; sleep 0.1; done; \
     if echo late > /tmp/xchg/late; then echo wrote; else echo write-failed; fi; \
     ls /tmp/xchg; exit 5";

/// xchg removed while the command runs: the guest's next writes fail (ENOENT, the
/// directory is gone), the command goes on and its status comes back.
#[test]
fn xchg_removed_while_shared_fails_the_commands_writes_not_the_build() {
    let root = tempfile::tempdir().unwrap();
    let xchg = root.path().join("xchg");
    fs::create_dir(&xchg).unwrap();
    let places = Places::new();
    let cmd = build(
        &places,
        &[
            "--xchg",
            xchg.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            RENDEZVOUS,
        ],
    );
    let mut run = Running::spawn(cmd);
    run.wait_for("the command", Duration::from_secs(120), |_| {
        xchg.join("started").exists()
    });
    fs::remove_dir_all(&xchg).unwrap();
    let end = run.end(Duration::from_secs(120));
    report(
        "xchg_removed_while_shared_fails_the_commands_writes_not_the_build",
        &end,
    );
    assert_eq!(end.code, 5, "{}\n{}", end.stdout, end.stderr);
    assert!(end.stdout.contains("write-failed"), "{}", end.stdout);
    assert!(
        end.stderr.contains("No such file or directory"),
        "{}",
        end.stderr
    );
    assert!(!xchg.exists());
    places.assert_clean();
}

/// xchg replaced (renamed away, a new directory at its path) while the command runs: the
/// build keeps the directory it was given, wherever it moved, and never writes into the
/// new one.
#[test]
fn xchg_replaced_while_shared_keeps_the_directory_the_build_was_given() {
    let root = tempfile::tempdir().unwrap();
    let xchg = root.path().join("xchg");
    let moved = root.path().join("xchg.old");
    fs::create_dir(&xchg).unwrap();
    let places = Places::new();
    let cmd = build(
        &places,
        &[
            "--xchg",
            xchg.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            RENDEZVOUS,
        ],
    );
    let mut run = Running::spawn(cmd);
    run.wait_for("the command", Duration::from_secs(120), |_| {
        xchg.join("started").exists()
    });
    fs::rename(&xchg, &moved).unwrap();
    fs::create_dir(&xchg).unwrap();
    fs::write(xchg.join("newcomer"), "").unwrap();
    fs::remove_file(moved.join("started")).unwrap();
    let end = run.end(Duration::from_secs(120));
    report(
        "xchg_replaced_while_shared_keeps_the_directory_the_build_was_given",
        &end,
    );
    assert_eq!(end.code, 5, "{}\n{}", end.stdout, end.stderr);
    assert!(end.stdout.contains("wrote"), "{}", end.stdout);
    assert!(!end.stdout.contains("newcomer"), "{}", end.stdout);
    assert_eq!(fs::read_to_string(moved.join("late")).unwrap(), "late\n");
    assert_eq!(entries(&xchg), vec!["newcomer".to_owned()]);
    places.assert_clean();
}

/// The store removed after it was plugged in, before the target mounted it: the target
/// mounts the directory as it was plugged in (now an empty, deleted one), and the command
/// finds nothing there, in its own words and with its own status (the share is not
/// broken: every request is answered).
#[test]
fn a_store_removed_after_it_was_plugged_in_is_an_empty_directory_to_the_command() {
    let root = tempfile::tempdir().unwrap();
    let store = root.path().join("store");
    fs::create_dir(&store).unwrap();
    fs::write(store.join("pkg"), "content\n").unwrap();
    let places = Places::new();
    let script = format!(
        "ls -a {s}; cat {s}/pkg; status=$?; touch {s}/new 2>&1; exit $status",
        s = store.display()
    );
    let mut cmd = build(
        &places,
        &[
            "--store",
            store.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    cmd.env("RUST_LOG", "vmbuild=debug");
    let mut run = Running::spawn(cmd);
    run.wait_for("the shares plugged", Duration::from_secs(120), |r| {
        r.stderr().contains("build: shares plugged")
    });
    fs::remove_dir_all(&store).unwrap();
    let end = run.end(Duration::from_secs(120));
    report(
        "a_store_removed_after_it_was_plugged_in_is_an_empty_directory_to_the_command",
        &end,
    );
    assert_eq!(end.code, 1, "{}\n{}", end.stdout, end.stderr);
    // A deleted directory lists nothing, not even . and ..; it cannot be written either.
    assert!(!end.stdout.contains("pkg"), "{}", end.stdout);
    assert!(
        end.stdout.contains("Read-only file system"),
        "{}",
        end.stdout
    );
    assert!(
        end.stderr.contains("pkg': No such file or directory"),
        "{}",
        end.stderr
    );
    assert!(!end.stderr.contains("Connection refused"), "{}", end.stderr);
    places.assert_clean();
}

/// `fs serve --shared-dir DIR`: DIR replaced while a front-end uses it: that front-end
/// keeps the directory it mounted, the next one gets the new one. DIR removed: requests
/// answer ENOENT, the server keeps its front-end; when that one leaves there is nothing to
/// serve, and the server exits 1 saying why, with its socket removed.
#[test]
fn fs_serve_when_its_shared_dir_is_replaced_or_removed() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("shared");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("first"), "1").unwrap();
    let socket = root.path().join("fs.sock");
    let mut server = Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .args(["fs", "serve", "--shared-dir"])
        .arg(&dir)
        .arg("--socket-path")
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut a = client(&socket);
    assert!(a.lookup(ROOT, "first").is_ok());

    // Replaced: a keeps the old directory.
    fs::rename(&dir, root.path().join("shared.old")).unwrap();
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("second"), "2").unwrap();
    assert!(a.lookup(ROOT, "first").is_ok());
    assert_eq!(a.lookup(ROOT, "second").unwrap_err(), Errno(libc::ENOENT));
    drop(a);
    let mut b = client(&socket);
    assert_eq!(b.lookup(ROOT, "first").unwrap_err(), Errno(libc::ENOENT));
    assert!(b.lookup(ROOT, "second").is_ok());

    // Removed: b's requests fail, the server stays up for it.
    fs::remove_dir_all(&dir).unwrap();
    assert_eq!(b.lookup(ROOT, "second").unwrap_err(), Errno(libc::ENOENT));
    assert_eq!(
        b.create(ROOT, "new", libc::O_WRONLY, 0o644).unwrap_err(),
        Errno(libc::ENOENT)
    );
    assert!(server.try_wait().unwrap().is_none(), "the server quit");
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = server.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "fs serve did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    server
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("No such file or directory") && stderr.contains(dir.to_str().unwrap()),
        "{stderr}"
    );
    assert!(!socket.exists(), "the socket outlived the server");
}

fn client(socket: &Path) -> FuseClient {
    let mut c = FuseClient::new(FsFrontend::connect(socket).unwrap());
    c.init().unwrap();
    c
}

// --- QEMU killed at each phase of a build -------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vm {
    Target,
    Controller,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The target's QEMU is loading its memory state.
    Revive,
    /// The store and xchg are being plugged into the running target.
    Plug,
    /// The controller found the target's SSH port and is logging in.
    Handshake,
    /// The command runs.
    Command,
    /// The command has ended; its status and output are on their way (the target syncs
    /// what it wrote to its disk first).
    Collect,
}

/// What a build whose `vm` was SIGKILLed during `phase` did.
struct Killed {
    end: Ended,
    places: Places,
}

/// Runs a build and SIGKILLs `vm`'s QEMU once the build is in `phase` (known from
/// vmbuild's debug lines and the two consoles). A kill that landed after the phase (the
/// phase was already over when it took effect) is tried again.
fn kill_qemu_during(phase: Phase, vm: Vm) -> Killed {
    for attempt in 1..=3 {
        if let Some(k) = try_kill_qemu_during(phase, vm) {
            return k;
        }
        eprintln!("{phase:?}/{vm:?}: the kill missed its phase (attempt {attempt})");
    }
    panic!("{phase:?}/{vm:?}: the kill never landed in its phase");
}

/// A condition on a running build.
type Check<'a> = Box<dyn Fn(&Running) -> bool + 'a>;

fn try_kill_qemu_during(phase: Phase, vm: Vm) -> Option<Killed> {
    let places = Places::new();
    let scratch = tempfile::tempdir().unwrap();
    let log = scratch.path().join("target-console.log");
    let store = scratch.path().join("store");
    fs::create_dir(&store).unwrap();
    let script = match phase {
        // Dirty pages for the session's closing `sync`: the target is busy writing its
        // disk between the command's end and its status.
        Phase::Collect => "dd if=/dev/zero of=/root/fill bs=1M count=64 2>/dev/null; exit 3",
        _ => "echo started; sleep 30; exit 3",
    };
    let mut cmd = build(
        &places,
        &[
            "--log",
            log.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
            "--timeout",
            "150",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    cmd.env("RUST_LOG", "vmbuild=debug");
    let mut run = Running::spawn(cmd);
    // The build's own directory (the runtime base also holds its build slot).
    let controller_log = || {
        fs::read_dir(places.base())
            .ok()
            .and_then(|d| {
                d.flatten()
                    .find(|e| e.file_name().to_string_lossy().starts_with("build-"))
            })
            .map(|e| e.path().join("controller-console.log"))
            .unwrap_or_default()
    };
    let pid_of = |vm: Vm| {
        let tag = match vm {
            Vm::Target => "target-qmp",
            Vm::Controller => "controller-qmp",
        };
        places
            .qemus()
            .into_iter()
            .find(|(_, cmd)| cmd.contains(tag))
            .map(|(pid, _)| pid)
    };
    // When the phase has begun, and what shows it is over.
    let (begun, over): (Check, Check) = match phase {
        Phase::Revive => (
            Box::new(|_| pid_of(vm).is_some()),
            Box::new(|r| r.stderr().contains("build: the target runs again")),
        ),
        Phase::Plug => (
            Box::new(|r| r.stderr().contains("build: the target runs again")),
            Box::new(|r| r.stderr().contains("build: shares plugged")),
        ),
        Phase::Handshake => (
            Box::new(|_| file_has(&controller_log(), "vmbuild-phase=port-open")),
            Box::new(|_| file_has(&log, "vmbuild-phase=session")),
        ),
        Phase::Command => (
            Box::new(|_| file_has(&log, "vmbuild-phase=command-start")),
            Box::new(|_| file_has(&log, "vmbuild-phase=command-end")),
        ),
        Phase::Collect => (
            Box::new(|_| file_has(&log, "vmbuild-phase=command-end")),
            Box::new(|_| file_has(&log, "vmbuild-exit=")),
        ),
    };
    run.wait_for(&format!("{phase:?}"), Duration::from_secs(120), |r| {
        begun(r) && pid_of(vm).is_some()
    });
    if over(&run) {
        return None;
    }
    kill(pid_of(vm).unwrap(), libc::SIGKILL);
    let missed = over(&run);
    let end = run.end(Duration::from_secs(120));
    // A dead target writes no more console lines, and vmbuild logs no more progress for
    // it: what shows now happened before the kill.
    if missed || (vm == Vm::Target && over_after(phase, &end, &log)) {
        return None;
    }
    drop((begun, over));
    Some(Killed { end, places })
}

/// Whether the end of `phase` shows in what the build left (for a killed target).
fn over_after(phase: Phase, end: &Ended, log: &Path) -> bool {
    match phase {
        Phase::Revive => end.stderr.contains("build: the target runs again"),
        Phase::Plug => end.stderr.contains("build: shares plugged"),
        Phase::Handshake => file_has(log, "vmbuild-phase=session"),
        Phase::Command => file_has(log, "vmbuild-phase=command-end"),
        Phase::Collect => file_has(log, "vmbuild-exit="),
    }
}

fn check_killed(phase: Phase, vm: Vm, code: i32, says: &str) {
    let k = kill_qemu_during(phase, vm);
    let e = &k.end;
    report(&format!("QEMU of the {vm:?} killed during {phase:?}"), e);
    assert_eq!(e.code, code, "{phase:?}/{vm:?}: {}", e.stderr);
    assert!(e.stderr.contains(says), "{phase:?}/{vm:?}: {}", e.stderr);
    assert!(e.wall < Duration::from_secs(90), "{phase:?}/{vm:?}: slow");
    k.places.assert_clean();
}

#[test]
fn qemu_killed_while_the_target_revives() {
    check_killed(Phase::Revive, Vm::Target, 123, "target");
    check_killed(Phase::Revive, Vm::Controller, 123, "controller");
}

#[test]
fn qemu_killed_while_the_shares_are_plugged() {
    check_killed(Phase::Plug, Vm::Target, 123, "target");
    check_killed(Phase::Plug, Vm::Controller, 123, "controller");
}

#[test]
fn qemu_killed_during_the_ssh_handshake() {
    check_killed(Phase::Handshake, Vm::Target, 123, "target");
    check_killed(Phase::Handshake, Vm::Controller, 123, "controller");
}

#[test]
fn qemu_killed_while_the_command_runs() {
    check_killed(Phase::Command, Vm::Target, 123, "target");
    check_killed(Phase::Command, Vm::Controller, 123, "controller");
}

#[test]
fn qemu_killed_while_the_status_is_collected() {
    check_killed(Phase::Collect, Vm::Target, 123, "target");
    check_killed(Phase::Collect, Vm::Controller, 123, "controller");
}

// --- vmbuild itself killed --------------------------------------------------------------------

/// vmbuild SIGKILLed while the command runs: its QEMUs die with it (they are spawned with
/// PR_SET_PDEATHSIG), and what it could not remove (its runtime directory with sockets and
/// the overlay, its temporary xchg) is removed by the next build that starts, at once.
#[test]
fn vmbuild_killed_mid_build_takes_its_qemus_along_and_the_next_build_sweeps() {
    let places = Places::new();
    let scratch = tempfile::tempdir().unwrap();
    let log = scratch.path().join("console.log");
    let cmd = build(
        &places,
        &["--log", log.to_str().unwrap(), "--", "sleep", "60"],
    );
    let mut run = Running::spawn(cmd);
    run.wait_for("the command", Duration::from_secs(120), |_| {
        file_has(&log, "vmbuild-phase=command-start")
    });
    assert_eq!(places.qemus().len(), 2);
    kill(run.child.id(), libc::SIGKILL);
    let _ = run.child.wait();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !places.qemus().is_empty() {
        assert!(
            Instant::now() < deadline,
            "QEMU outlived the vmbuild that started it: {:?}",
            places.qemus()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // What a killed vmbuild cannot remove: its directory and its build slot's file.
    let mut stale = entries(&places.base());
    stale.sort();
    assert!(
        stale.len() == 2 && stale[0].starts_with("build-") && stale[1] == "slot-0",
        "{stale:?}"
    );
    let stale_dir = places.base().join(&stale[0]);
    assert!(
        entries(&stale_dir).iter().any(|n| n.ends_with(".sock")),
        "{:?}",
        entries(&stale_dir)
    );
    let temp = entries(places.tmp.path());
    assert!(
        temp.len() == 1 && temp[0].starts_with("vmbuild-xchg-"),
        "{temp:?}"
    );

    // The next build, right away.
    let end = Running::spawn(build(&places, &["--", "true"])).end(Duration::from_secs(120));
    report("the build after a killed one", &end);
    assert_eq!(end.code, 0, "{}", end.stderr);
    places.assert_clean();
}

/// vmbuild bootstrap SIGKILLed while its VMs boot: they die with it; its staging
/// directory (next to --out), scratch and runtime directories are removed by the next
/// bootstrap into the same --out (here interrupted once its own VMs run).
#[test]
fn vmbuild_killed_mid_bootstrap_leaves_nothing_the_next_one_does_not_sweep() {
    let places = Places::new();
    let parent = tempfile::Builder::new()
        .prefix("killed-bootstrap-")
        .tempdir_in(tmp_root())
        .unwrap();
    let out = parent.path().join("snap");
    let bootstrap = || {
        let mut cmd = places.command();
        cmd.args(["bootstrap", "--out"]).arg(&out);
        Running::spawn(cmd)
    };
    let mut run = bootstrap();
    run.wait_for("the VMs", Duration::from_secs(120), |_| {
        places.qemus().len() == 2
    });
    kill(run.child.id(), libc::SIGKILL);
    let _ = run.child.wait();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !places.qemus().is_empty() {
        assert!(Instant::now() < deadline, "QEMU outlived its bootstrap");
        std::thread::sleep(Duration::from_millis(20));
    }
    let staging = entries(parent.path());
    assert!(
        staging.len() == 1 && staging[0].starts_with(".snap.partial-"),
        "{staging:?}"
    );
    assert_eq!(entries(&places.base()).len(), 1);
    assert_eq!(entries(places.tmp.path()).len(), 1);

    let mut next = bootstrap();
    next.wait_for("the next bootstrap's VMs", Duration::from_secs(120), |_| {
        places.qemus().len() == 2
    });
    // Its own staging directory only.
    let now = entries(parent.path());
    assert!(
        now.len() == 1 && now[0] != staging[0],
        "{now:?} (the killed one's was {staging:?})"
    );
    kill(next.child.id(), libc::SIGINT);
    let end = next.end(Duration::from_secs(60));
    report("the bootstrap after a killed one", &end);
    assert_eq!(end.code, 130, "{}", end.stderr);
    assert_eq!(entries(parent.path()), Vec::<String>::new());
    places.assert_clean();
}

// --- a vhost-user front-end vanishes mid-request ------------------------------------------

/// A `vmbuild fs serve` child that is stopped (SIGTERM) when the test ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            kill(self.0.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Server {
    /// Stops it with SIGTERM: its exit code.
    fn stop(mut self) -> i32 {
        kill(self.0.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s.code().expect("exited by itself");
            }
            assert!(Instant::now() < deadline, "the server ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn assert_running(&mut self) {
        assert!(
            self.0.try_wait().unwrap().is_none(),
            "the server stopped serving"
        );
    }
}

fn fs_serve(dir: &Path, socket: &Path, extra: &[&str]) -> Server {
    Server(
        Command::new(env!("CARGO_BIN_EXE_vmbuild"))
            .args(["fs", "serve", "--shared-dir"])
            .arg(dir)
            .arg("--socket-path")
            .arg(socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// A fresh front-end reads `name` whole, and it is `want`.
fn served_whole(socket: &Path, name: &str, want: &[u8]) {
    let mut c = client(socket);
    let e = c.lookup(ROOT, name).unwrap();
    let o = c.open(e.nodeid, libc::O_RDONLY).unwrap();
    let mut got = Vec::new();
    while got.len() < want.len() {
        let chunk = c.read(e.nodeid, o.fh, got.len() as u64, 128 << 10).unwrap();
        assert!(!chunk.is_empty(), "short file");
        got.extend_from_slice(&chunk);
    }
    assert!(got == want, "{name} came back different");
}

/// Front-ends that go away with requests in flight (64 reads and writes queued and kicked,
/// then the socket closed and the memory unmapped, before any reply was read): the server
/// serves the next front-end, every time, with one worker thread per request or none.
#[test]
fn fs_serve_outlives_front_ends_that_vanish_with_requests_in_flight() {
    use fuse_backend_rs::abi::fuse_abi::{Opcode, ReadIn, WriteIn};
    use vm_memory::ByteValued;

    for pool in ["0", "4"] {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("shared");
        fs::create_dir(&dir).unwrap();
        let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 251) as u8).collect();
        fs::write(dir.join("big"), &data).unwrap();
        let socket = root.path().join("fs.sock");
        let mut server = fs_serve(&dir, &socket, &["--thread-pool-size", pool]);
        for round in 0..5u64 {
            let mut c = client(&socket);
            let big = c.lookup(ROOT, "big").unwrap();
            let o = c.open(big.nodeid, libc::O_RDWR).unwrap();
            let scratch_name = format!("scratch{round}");
            let (scratch, w) = c
                .create(ROOT, &scratch_name, libc::O_WRONLY, 0o644)
                .unwrap();
            let payload = vec![round as u8; 64 << 10];
            for slot in 0..64u16 {
                let unique = c.next_unique();
                let req = if slot % 2 == 0 {
                    let r = ReadIn {
                        fh: o.fh,
                        offset: u64::from(slot) * (64 << 10),
                        size: 128 << 10,
                        ..Default::default()
                    };
                    encode(Opcode::Read, unique, big.nodeid, 0, 0, &[r.as_slice()])
                } else {
                    let wi = WriteIn {
                        fh: w.fh,
                        offset: u64::from(slot) * (64 << 10),
                        size: payload.len() as u32,
                        ..Default::default()
                    };
                    encode(
                        Opcode::Write,
                        unique,
                        scratch.nodeid,
                        0,
                        0,
                        &[wi.as_slice(), &payload],
                    )
                };
                c.frontend
                    .submit(REQUEST, slot, &req, (128 << 10) + 4096)
                    .unwrap();
            }
            c.frontend.kick(REQUEST).unwrap();
            // Gone, mid-request: the socket closes, the memory is unmapped.
            drop(c);
            server.assert_running();
            served_whole(&socket, "big", &data);
        }
        server.assert_running();
        assert_eq!(server.stop(), 0, "thread pool {pool}");
        assert!(!socket.exists());
    }
}

/// QEMU SIGKILLed while its guest reads and writes a `vmbuild fs serve` share: the server
/// keeps serving, and the next front-end gets a fresh session.
#[test]
fn fs_serve_outlives_a_qemu_killed_mid_io() {
    let kit = GuestKit::locate().unwrap();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("shared");
    fs::create_dir(&dir).unwrap();
    let data: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 253) as u8).collect();
    fs::write(dir.join("big"), &data).unwrap();
    let socket = root.path().join("fs.sock");
    let mut server = fs_serve(&dir, &socket, &["--cache", "never"]);
    fs::write(
        dir.join("run.sh"),
        "echo io-loop; while :; do cat /mnt/big > /dev/null; \
         dd if=/dev/zero of=/mnt/out bs=64k count=64 2>/dev/null; done\n",
    )
    .unwrap();
    let mut vm = GuestVm::new(kit, "/mnt/run.sh").share(GuestShare::VirtioFs {
        socket: socket.clone(),
        tag: "share".into(),
        mount: "/mnt".into(),
        options: String::new(),
    });
    vm.memory_mib = 256;
    let console = root.path().join("console.log");
    let mut qemu = vm.spawn(&console).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !file_has(&console, "io-loop") {
        assert!(
            qemu.try_wait().unwrap().is_none(),
            "the guest ended: {}",
            fs::read_to_string(&console).unwrap_or_default()
        );
        assert!(Instant::now() < deadline, "the guest never started its I/O");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let the loop get going, then pull the plug.
    std::thread::sleep(Duration::from_millis(1500));
    qemu.kill().unwrap();
    qemu.wait().unwrap();
    server.assert_running();
    served_whole(&socket, "big", &data);
    assert_eq!(server.stop(), 0);
}

/// A `vmbuild switch`, stopped with SIGTERM when the test ends.
fn switch(args: &[&str], dir: &Path) -> (Server, PathBuf) {
    let mgmt = dir.join("mgmt.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .arg("switch")
        .arg("--mgmt")
        .arg(&mgmt)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !mgmt.exists() {
        assert!(Instant::now() < deadline, "the switch never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    (Server(child), mgmt)
}

/// The switch's ports as its console lists them (JSON).
fn ports(mgmt: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .args(["switch", "ctl"])
        .arg(mgmt)
        .args(["json", "port/print"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn port_at<'a>(ports: &'a [serde_json::Value], endpoint: &Path) -> &'a serde_json::Value {
    ports
        .iter()
        .find(|p| p["endpoint"] == endpoint.to_str().unwrap())
        .unwrap_or_else(|| panic!("no port at {}: {ports:?}", endpoint.display()))
}

/// A client of a `--stream` port (QEMU's `-netdev stream` framing).
struct StreamPeer(UnixStream);

impl StreamPeer {
    fn connect(path: &Path) -> StreamPeer {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        StreamPeer(s)
    }

    fn send(&mut self, frame: &[u8]) {
        self.0
            .write_all(&(frame.len() as u32).to_be_bytes())
            .unwrap();
        self.0.write_all(frame).unwrap();
    }

    fn recv(&mut self) -> Vec<u8> {
        let mut len = [0u8; 4];
        self.0.read_exact(&mut len).unwrap();
        let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
        self.0.read_exact(&mut f).unwrap();
        f
    }
}

fn frame(dst: [u8; 6], src: [u8; 6], seq: u32, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x88b5u16.to_be_bytes()); // local experimental ethertype
    f.extend_from_slice(&seq.to_be_bytes());
    f.resize(len, 0xab);
    f
}

const BROADCAST: [u8; 6] = [0xff; 6];

/// Bytes waiting to be read on `s`.
fn pending_bytes(s: &UnixStream) -> i32 {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
    n
}

fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Two peers that stop reading, a `--stream` client and a VDE client (`vde_plug` whose
/// output nobody reads): broadcasts between the other two ports keep flowing at full
/// speed, the stuck ports' frames are dropped and counted, and the switch's memory stays
/// bounded.
#[test]
fn a_switch_port_whose_peer_stops_reading_costs_the_others_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (a_path, b_path, stuck_path) = (
        dir.path().join("a.sock"),
        dir.path().join("b.sock"),
        dir.path().join("stuck.sock"),
    );
    let vde = dir.path().join("vde");
    let (mut sw, mgmt) = switch(
        &[
            "--stream",
            a_path.to_str().unwrap(),
            "--stream",
            b_path.to_str().unwrap(),
            "--stream",
            stuck_path.to_str().unwrap(),
            "-s",
            vde.to_str().unwrap(),
        ],
        dir.path(),
    );
    let mut a = StreamPeer::connect(&a_path);
    let mut b = StreamPeer::connect(&b_path);
    let stuck = StreamPeer::connect(&stuck_path);
    // A VDE client that stops reading: vde_plug copies the switch's frames to its stdout,
    // a pipe nobody reads, and once that is full it reads its socket no more.
    let mut vde_plug = Command::new("vde_plug")
        .arg(&vde)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("vde_plug (apt-get install vde2)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while ports(&mgmt).len() < 4 {
        assert!(Instant::now() < deadline, "ports: {:?}", ports(&mgmt));
        std::thread::sleep(Duration::from_millis(20));
    }
    // Every stream client accepted: a broadcast from a reaches b and the stuck one.
    let src_a = [2, 0, 0, 0, 0, 0xa];
    b.0.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        a.send(&frame(BROADCAST, src_a, u32::MAX, 64));
        let mut len = [0u8; 4];
        if b.0.read_exact(&mut len).is_ok() {
            let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
            b.0.read_exact(&mut f).unwrap();
            break;
        }
        assert!(Instant::now() < deadline, "b never got a frame");
    }
    while pending_bytes(&stuck.0) == 0 {
        assert!(
            Instant::now() < deadline,
            "the stuck peer never got a frame"
        );
        a.send(&frame(BROADCAST, src_a, u32::MAX, 64));
        std::thread::sleep(Duration::from_millis(20));
    }
    // Drain the rest of the synchronisation frames.
    std::thread::sleep(Duration::from_millis(200));
    while b.0.read(&mut [0u8; 4096]).is_ok_and(|n| n > 0) {}
    b.0.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let rss_before = rss_kib(sw.0.id());

    // 20,000 broadcasts of 1,000 bytes (20 MB: far more than any socket buffer or queue
    // holds), in rounds that b reads as they come.
    let (total, round) = (20_000u32, 200u32);
    let started = Instant::now();
    let mut seq = 0;
    while seq < total {
        for i in seq..seq + round {
            a.send(&frame(BROADCAST, src_a, i, 1000));
        }
        for i in seq..seq + round {
            let f = b.recv();
            assert_eq!(&f[14..18], &i.to_be_bytes(), "b lost or reordered a frame");
        }
        seq += round;
    }
    let took = started.elapsed();
    eprintln!("{total} broadcasts a -> b past two stuck peers in {took:?}");
    assert!(
        took < Duration::from_secs(30),
        "stuck peers slowed the switch: {took:?}"
    );
    // Unicast both ways still works.
    let src_b = [2, 0, 0, 0, 0, 0xb];
    b.send(&frame(src_a, src_b, 1, 64));
    assert_eq!(&a.recv()[14..18], &1u32.to_be_bytes());
    a.send(&frame(src_b, src_a, 2, 64));
    assert_eq!(&b.recv()[14..18], &2u32.to_be_bytes());

    let list = ports(&mgmt);
    let dropped = |p: &serde_json::Value| p["counters"]["drops"]["egress_failed"].as_u64().unwrap();
    let stuck = port_at(&list, &stuck_path);
    assert!(dropped(stuck) > 0, "{stuck}");
    let vde_port = list
        .iter()
        .find(|p| p["kind"] == "vde")
        .expect("the VDE client's port");
    assert!(dropped(vde_port) > 0, "{vde_port}");
    assert_eq!(dropped(port_at(&list, &b_path)), 0);
    let rss_after = rss_kib(sw.0.id());
    eprintln!("switch RSS {rss_before} KiB -> {rss_after} KiB");
    assert!(
        rss_after < rss_before + 16 * 1024,
        "the switch grew from {rss_before} to {rss_after} KiB"
    );
    sw.assert_running();
    let _ = vde_plug.kill();
    let _ = vde_plug.wait();
    assert_eq!(sw.stop(), 0);
}

/// QEMU SIGKILLed while its guest sends through a `--vhost-user` port of `vmbuild
/// switch`: the switch keeps the port, and the next QEMU on the same socket is switched.
#[test]
fn a_switch_outlives_a_qemu_killed_on_its_vhost_user_port() {
    let kit = GuestKit::locate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (vhost, tap_path) = (dir.path().join("vhost.sock"), dir.path().join("peer.sock"));
    let (mut sw, mgmt) = switch(
        &[
            "--vhost-user",
            vhost.to_str().unwrap(),
            "--stream",
            tap_path.to_str().unwrap(),
        ],
        dir.path(),
    );
    let mut peer = StreamPeer::connect(&tap_path);
    // A guest takes a few seconds to boot under TCG.
    peer.0
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let xchg = dir.path().join("xchg");
    fs::create_dir(&xchg).unwrap();
    // Pings at 500/s to a MAC nobody has: every one is flooded to the peer.
    fs::write(
        xchg.join("run.sh"),
        "ip link set eth0 up && ip addr add 10.77.1.2/24 dev eth0 && \
         arp -s 10.77.1.1 02:00:00:00:00:99 && echo net-up && \
         ping -q -i 0.002 -s 1000 10.77.1.1\n",
    )
    .unwrap();
    let guest = |mac: &str| {
        let mut vm = GuestVm::new(kit.clone(), "/tmp/xchg/run.sh").share(GuestShare::NineP {
            dir: xchg.clone(),
            tag: "xchg".into(),
            mount: "/tmp/xchg".into(),
            options: String::new(),
        });
        vm.memory_mib = 256;
        vm.nics.push((vhost.clone(), mac.to_owned()));
        vm
    };
    // Frames from `mac` reach the peer.
    let mut heard_from = |mac: [u8; 6], qemu: &mut Child| {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            assert!(qemu.try_wait().unwrap().is_none(), "the guest ended");
            assert!(Instant::now() < deadline, "nothing from {mac:02x?}");
            let f = peer.recv();
            if f[6..12] == mac {
                return;
            }
        }
    };
    let console = dir.path().join("console1.log");
    let mut first = guest("02:00:00:00:01:01").spawn(&console).unwrap();
    heard_from([2, 0, 0, 0, 1, 1], &mut first);
    std::thread::sleep(Duration::from_millis(500));
    first.kill().unwrap();
    first.wait().unwrap();
    sw.assert_running();

    let console = dir.path().join("console2.log");
    let mut second = guest("02:00:00:00:01:02").spawn(&console).unwrap();
    heard_from([2, 0, 0, 0, 1, 2], &mut second);
    second.kill().unwrap();
    second.wait().unwrap();
    let list = ports(&mgmt);
    assert_eq!(list.len(), 2, "{list:?}");
    sw.assert_running();
    assert_eq!(sw.stop(), 0);
    assert!(!vhost.exists() && !tap_path.exists());
}
