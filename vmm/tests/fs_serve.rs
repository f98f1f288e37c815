//! `vmbuild fs serve` as a user runs it: the real binary, virtiofsd's flags, several
//! shares from one process, and a clean exit on SIGTERM.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmbuild_tests::fuse_client::{Errno, FuseClient, ROOT};
use vmbuild_tests::vhost_frontend::FsFrontend;

fn serve(args: &[&str]) -> Child {
    serve_os(args)
}

fn serve_os<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .args(["fs", "serve"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn client(socket: &Path) -> FuseClient {
    let mut c = FuseClient::new(FsFrontend::connect(socket).unwrap());
    c.init().unwrap();
    c
}

fn stop(child: Child) -> i32 {
    stop_with(child, libc::SIGTERM)
}

fn stop_with(mut child: Child, signal: i32) -> i32 {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, signal) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().expect("exited by itself");
        }
        assert!(
            Instant::now() < deadline,
            "vmbuild fs serve ignored signal {signal}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn virtiofsd_style_flags_serve_one_share() {
    let dir = tempfile::tempdir().unwrap();
    let sockets = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("f"), "content").unwrap();
    let socket = sockets.path().join("fs.sock");
    let child = serve(&[
        "--shared-dir",
        &dir.path().display().to_string(),
        "--socket-path",
        &socket.display().to_string(),
        "--readonly",
        "--cache",
        "auto",
        "--thread-pool-size",
        "2",
    ]);
    let mut c = client(&socket);
    let e = c.lookup(ROOT, "f").unwrap();
    assert_eq!(e.entry_valid, 1, "--cache auto: one-second timeouts");
    let o = c.open(e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(c.read(e.nodeid, o.fh, 0, 100).unwrap(), b"content");
    assert_eq!(
        c.create(ROOT, "x", libc::O_WRONLY, 0o644).unwrap_err(),
        Errno(libc::EROFS)
    );
    drop(c);
    assert_eq!(stop(child), 0);
    assert!(!socket.exists(), "socket removed at exit");
}

#[test]
fn several_shares_from_one_process() {
    let store = tempfile::tempdir().unwrap();
    let xchg = tempfile::tempdir().unwrap();
    let sockets = tempfile::tempdir().unwrap();
    fs::write(store.path().join("in"), "from the store").unwrap();
    let child = serve(&[
        "--socket-dir",
        &sockets.path().display().to_string(),
        "--share",
        &format!("tag=store,dir={},ro", store.path().display()),
        "--share",
        &format!("tag=xchg,dir={}", xchg.path().display()),
    ]);
    let mut s = client(&sockets.path().join("store.sock"));
    let mut x = client(&sockets.path().join("xchg.sock"));
    let e = s.lookup(ROOT, "in").unwrap();
    assert!(e.entry_valid >= 3600, "the store is cached for long");
    let o = s.open(e.nodeid, libc::O_RDONLY).unwrap();
    let data = s.read(e.nodeid, o.fh, 0, 100).unwrap();
    let (f, w) = x.create(ROOT, "out", libc::O_WRONLY, 0o644).unwrap();
    x.write(f.nodeid, w.fh, 0, &data).unwrap();
    x.release(f.nodeid, w.fh).unwrap();
    assert_eq!(
        fs::read_to_string(xchg.path().join("out")).unwrap(),
        "from the store"
    );
    assert_eq!(s.unlink(ROOT, "in").unwrap_err(), Errno(libc::EROFS));
    drop((s, x));
    assert_eq!(stop(child), 0);
    assert_eq!(
        fs::read_dir(sockets.path()).unwrap().count(),
        0,
        "sockets removed"
    );
}

/// `child`'s output, or a failure if it is still running after `limit` (it is killed):
/// a server that should have refused its command line and serves instead must not hang
/// the test.
fn output_within(mut child: Child, limit: Duration, what: &str) -> std::process::Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn bad_command_lines_exit_2_with_one_line() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let socket = scratch.path().join("x.sock").display().to_string();
    let missing = scratch.path().join("never").display().to_string();
    let dir = scratch.path().display().to_string();
    let share = format!("tag=x,dir={dir}");
    let bogus = format!("tag=x,dir={dir},bogus");
    let file = file.path().display().to_string();
    let cases: [&[&str]; 6] = [
        &[],
        // Bounded: a million threads panicked and aborted, leaving the socket behind.
        &[
            "--shared-dir",
            &dir,
            "--socket-path",
            &socket,
            "--thread-pool-size",
            "1000000",
        ],
        &["--shared-dir", &missing, "--socket-path", &socket],
        &["--shared-dir", &file, "--socket-path", &socket],
        &["--share", &share],
        &["--share", &bogus, "--socket-dir", &dir],
    ];
    for args in cases {
        let out = output_within(serve(args), Duration::from_secs(30), &format!("{args:?}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            !Path::new(&socket).exists(),
            "{args:?}: a refused command line created its socket"
        );
        assert!(!stderr.trim().is_empty(), "{args:?}: says why");
    }
}

/// A socket path never clobbers: an ordinary file there is refused and kept, a live
/// server's socket is refused and the server keeps serving, the same tag twice is
/// refused; all with exit 2 before anything starts (issue 13).
#[test]
fn socket_paths_never_clobber() {
    let share = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let dir = share.path().display().to_string();
    let file = scratch.path().join("notes.txt");
    fs::write(&file, "my notes").unwrap();
    let file_arg = file.display().to_string();
    let out = output_within(
        serve(&["--shared-dir", &dir, "--socket-path", &file_arg]),
        Duration::from_secs(30),
        "a file at --socket-path",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(fs::read_to_string(&file).unwrap(), "my notes");

    let socket = scratch.path().join("fs.sock");
    let socket_arg = socket.display().to_string();
    let first = serve(&["--shared-dir", &dir, "--socket-path", &socket_arg]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the first server made no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = output_within(
        serve(&["--shared-dir", &dir, "--socket-path", &socket_arg]),
        Duration::from_secs(30),
        "a second server on a live socket",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    // The first server still answers on its socket.
    drop(client(&socket));
    assert_eq!(stop(first), 0);

    let twice = format!("tag=x,dir={dir}");
    let out = output_within(
        serve(&[
            "--share",
            &twice,
            "--share",
            &twice,
            "--socket-dir",
            &scratch.path().display().to_string(),
        ]),
        Duration::from_secs(30),
        "one tag twice",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("given twice"));
}

fn wait_for_socket(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "no socket at {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every case of the review's table (issue 13) that used to run, exit 1, or give clap's
/// odd messages: exit 2 before anything starts, one line with the `vmbuild fs serve: `
/// prefix (clap's own errors aside), nothing created.
#[test]
fn bad_input_is_exit_2_with_one_prefixed_line_before_anything_starts() {
    let share = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let dir = share.path().display().to_string();
    let sd = scratch.path().display().to_string();
    let socket = scratch.path().join("x.sock").display().to_string();
    let inside = share.path().join("x.sock").display().to_string();
    let escaping = format!("tag=../x,dir={dir}");
    let plain = format!("tag=a,dir={dir}");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--share", &plain, "--socket-dir", "/does-not-exist"],
            "/does-not-exist",
        ),
        (
            vec![
                "--shared-dir",
                &dir,
                "--socket-path",
                "/does-not-exist/s.sock",
            ],
            "/does-not-exist",
        ),
        (
            vec!["--shared-dir", &dir, "--socket-path", &sd],
            "is a directory",
        ),
        (
            vec!["--share", &escaping, "--socket-dir", &sd],
            "may not contain '/'",
        ),
        (
            vec!["--shared-dir", &dir, "--socket-path", &inside],
            "inside the shared directory",
        ),
        (
            vec!["--tag", "x", "--share", &plain, "--socket-dir", &sd],
            "--tag belongs to --shared-dir",
        ),
        (
            vec!["--readonly", "--share", &plain, "--socket-dir", &sd],
            "--readonly belongs to --shared-dir",
        ),
        (
            vec!["--fd", "0", "--shared-dir", &dir],
            "not a listening unix socket",
        ),
        (vec!["--fd=99", "--shared-dir", &dir], "no such open file"),
        (
            vec!["--fd=-1", "--shared-dir", &dir],
            "not a file descriptor number",
        ),
        (
            vec!["-o", "source=/x,frobnicate", "--fd=0"],
            "-o frobnicate: unknown option",
        ),
        (
            vec![
                "--sandbox",
                "namespace",
                "--shared-dir",
                &dir,
                "--socket-path",
                &socket,
            ],
            "use --sandbox none",
        ),
        (
            vec![
                "--announce-submounts",
                "--shared-dir",
                &dir,
                "--socket-path",
                &socket,
            ],
            "--announce-submounts is not supported",
        ),
        (
            vec![
                "--log-level",
                "loud",
                "--shared-dir",
                &dir,
                "--socket-path",
                &socket,
            ],
            "unknown level",
        ),
        (
            vec![
                "--socket-group",
                "no-such-group-here",
                "--shared-dir",
                &dir,
                "--socket-path",
                &socket,
            ],
            "no such group",
        ),
    ];
    for (args, says) in cases {
        let out = output_within(serve(&args), Duration::from_secs(30), &format!("{args:?}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr}");
        assert!(
            stderr.starts_with("vmbuild fs serve: ") && stderr.contains(says),
            "{args:?}: expected '{says}': {stderr}"
        );
        assert!(!Path::new(&socket).exists(), "{args:?}: created its socket");
        assert!(!Path::new(&inside).exists(), "{args:?}: created its socket");
    }
    // Negative numbers reach the value check instead of clap's "unexpected argument".
    let out = output_within(
        serve(&[
            "--shared-dir",
            &dir,
            "--socket-path",
            &socket,
            "--thread-pool-size",
            "-1",
        ]),
        Duration::from_secs(30),
        "--thread-pool-size -1",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("-1 is not in 0..=1024"), "{stderr}");
}

/// What libvirt runs first: the vhost-user.json capabilities, claiming only what is true.
#[test]
fn print_capabilities_is_the_json_libvirt_reads() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .args(["fs", "serve", "--print-capabilities"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let caps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(caps["type"], "fs");
    assert_eq!(caps["features"], serde_json::json!(["separate-options"]));
}

/// `--fd N` as libvirt passes it: a listening socket made by the parent. The server
/// serves it (here with the legacy `-o` spelling and `--log-level`, which replaces the log
/// filter) and leaves the parent's socket file alone.
#[test]
fn an_inherited_listening_fd_is_served_as_libvirt_passes_it() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let sockets = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("f"), "via fd").unwrap();
    let path = sockets.path().join("parent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let fd = listener.as_raw_fd();
    // SAFETY: fcntl on our own descriptor: let the child inherit it.
    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    let child = serve(&[
        &format!("--fd={fd}"),
        "-o",
        &format!(
            "source={},cache=none,no_xattr,no_flock",
            dir.path().display()
        ),
        "--thread-pool-size=1",
        "--log-level",
        "debug",
    ]);
    let mut child = child;
    let mut log = child.stderr.take().unwrap();
    // SAFETY: as above; the child has its copy now.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    let mut c = client(&path);
    let e = c.lookup(ROOT, "f").unwrap();
    assert_eq!(e.entry_valid, 0, "-o cache=none: nothing cached");
    let o = c.open(e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(c.read(e.nodeid, o.fh, 0, 100).unwrap(), b"via fd");
    drop(c);
    assert_eq!(stop(child), 0);
    assert!(
        path.exists(),
        "the parent's socket is the parent's to remove"
    );
    // --log-level debug took effect: debug records, which the default filter hides.
    let mut text = String::new();
    std::io::Read::read_to_string(&mut log, &mut text).unwrap();
    assert!(text.contains("DEBUG"), "{text}");
}

/// A share directory whose name is not UTF-8 is served (it used to warn every 100 ms).
#[test]
fn a_non_utf8_shared_dir_is_served() {
    use std::os::unix::ffi::OsStrExt;
    let parent = tempfile::tempdir().unwrap();
    let sockets = tempfile::tempdir().unwrap();
    let dir = parent.path().join(std::ffi::OsStr::from_bytes(b"d\xff"));
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("f"), "latin-1 dir").unwrap();
    let socket = sockets.path().join("fs.sock");
    let child = serve_os(&[
        std::ffi::OsStr::new("--shared-dir"),
        dir.as_os_str(),
        std::ffi::OsStr::new("--socket-path"),
        socket.as_os_str(),
    ]);
    wait_for_socket(&socket);
    let mut c = client(&socket);
    let e = c.lookup(ROOT, "f").unwrap();
    let o = c.open(e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(c.read(e.nodeid, o.fh, 0, 100).unwrap(), b"latin-1 dir");
    drop(c);
    let out = {
        assert_eq!(stop_with(child, libc::SIGINT), 0);
        socket.exists()
    };
    assert!(!out, "socket removed");
}

/// A share that can no longer be served (its directory was removed) stops the server
/// once, exit 1 with a `vmbuild fs serve: ` line, instead of a warning every 100 ms.
#[test]
fn a_share_that_fails_while_serving_exits_1_once() {
    let parent = tempfile::tempdir().unwrap();
    let sockets = tempfile::tempdir().unwrap();
    let dir = parent.path().join("share");
    fs::create_dir(&dir).unwrap();
    let socket = sockets.path().join("fs.sock");
    let child = serve(&[
        "--shared-dir",
        &dir.display().to_string(),
        "--socket-path",
        &socket.display().to_string(),
    ]);
    wait_for_socket(&socket);
    let c = client(&socket);
    fs::remove_dir(&dir).unwrap();
    drop(c);
    let out = output_within(
        child,
        Duration::from_secs(30),
        "a share whose directory went away",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("vmbuild fs serve: share 'share' stopped:") && last.contains("share"),
        "{stderr}"
    );
    assert!(stderr.lines().count() < 10, "no warning loop: {stderr}");
    assert!(!socket.exists(), "socket removed");
}

/// SIGHUP (a closed terminal) stops it like SIGINT and SIGTERM: exit 0, socket removed,
/// and the counters as one readable line.
#[test]
fn sighup_stops_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let sockets = tempfile::tempdir().unwrap();
    let socket = sockets.path().join("fs.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .args(["fs", "serve", "--shared-dir"])
        .arg(dir.path())
        .arg("--socket-path")
        .arg(&socket)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(&socket);
    drop(client(&socket));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "SIGHUP ignored");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!socket.exists(), "socket removed");
    assert!(
        stderr.contains("stopped: ") && stderr.contains(", 1 connection, 0 malformed, "),
        "{stderr}"
    );
    assert!(!stderr.contains("StatsSnapshot"), "{stderr}");
}

/// The exit statuses and the environment are in `--help`.
#[test]
fn help_names_exit_statuses_and_rust_log() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .args(["fs", "serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains(
            "Exit status:\n  0  stopped by SIGINT, SIGTERM or SIGHUP (sockets removed)\n  \
         1  failed while serving\n  2  bad command line or input (nothing was started)"
        ),
        "{help}"
    );
    assert!(help.contains("RUST_LOG"), "{help}");
}

/// `--socket-group` gives the socket vmbuild creates to that group (virtiofsd's meaning).
#[test]
fn socket_group_owns_the_socket() {
    use std::os::unix::fs::MetadataExt;
    let Some(gid) = fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&"nogroup")).then(|| f[2].parse::<u32>().unwrap())
        })
    else {
        eprintln!("SKIPPED: no group 'nogroup' here");
        return;
    };
    // SAFETY: getegid has no preconditions.
    if unsafe { libc::geteuid() } != 0 && unsafe { libc::getegid() } != gid {
        eprintln!("SKIPPED: only root may give a socket to another group");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sockets = tempfile::tempdir().unwrap();
    let socket = sockets.path().join("fs.sock");
    let child = serve(&[
        "--shared-dir",
        &dir.path().display().to_string(),
        "--socket-path",
        &socket.display().to_string(),
        "--socket-group",
        "nogroup",
    ]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::metadata(&socket).map(|m| m.gid()).ok() != Some(gid) {
        assert!(
            Instant::now() < deadline,
            "the socket never went to group {gid}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(client(&socket));
    assert_eq!(stop(child), 0);
}

/// The files `pid` has open, by what they are (`anon_inode:[eventfd]`, `socket:[…]`, paths).
fn open_fds(pid: u32) -> Vec<String> {
    let mut fds: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .map(|p| {
            let p = p.to_string_lossy();
            // Sockets and pipes by kind, not by inode.
            match p.split_once(":[") {
                Some((kind @ ("socket" | "pipe"), _)) => format!("{kind}:[…]"),
                _ => p.into_owned(),
            }
        })
        .collect();
    fds.sort();
    fds
}

/// Kills the server if the test fails before stopping it: an orphan would keep files open
/// that the harness holds (a build lock) for as long as it waits for a front-end.
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One front-end after another, as QEMU restarting a guest does many times over a long
/// `fs serve`: each session's back-end is dropped whole. (vhost-user-backend never closes
/// the exit eventfd it is given, which used to leak one eventfd per session.)
#[test]
fn sessions_one_after_another_leak_no_file_descriptors() {
    const SESSIONS: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let sockets = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("f"), "content").unwrap();
    let socket = sockets.path().join("fs.sock");
    let mut server = KillOnDrop(Some(serve(&[
        "--shared-dir",
        &dir.path().display().to_string(),
        "--socket-path",
        &socket.display().to_string(),
    ])));
    let pid = server.0.as_ref().unwrap().id();
    let mut first = None;
    let mut last = Vec::new();
    for _ in 0..SESSIONS {
        let mut c = client(&socket);
        let e = c.lookup(ROOT, "f").unwrap();
        let o = c.open(e.nodeid, libc::O_RDONLY).unwrap();
        assert_eq!(c.read(e.nodeid, o.fh, 0, 100).unwrap(), b"content");
        // Counted while a session is live: the server tears a session down completely
        // before it accepts the next front-end, so every earlier one is gone by now.
        last = open_fds(pid);
        first.get_or_insert_with(|| last.clone());
        drop(c);
    }
    let first = first.unwrap();
    assert!(
        last.len() <= first.len() + 3,
        "fs serve held {} files in the first session and {} in session {SESSIONS}: \
         {first:?} then {last:?}",
        first.len(),
        last.len(),
    );
    assert_eq!(stop(server.0.take().unwrap()), 0);
}
