//! `vmbuild fs serve` as a user runs it: the real binary, virtiofsd's flags, several
//! shares from one process, and a clean exit on SIGTERM.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmbuild_tests::fuse_client::{Errno, FuseClient, ROOT};
use vmbuild_tests::vhost_frontend::FsFrontend;

fn serve(args: &[&str]) -> Child {
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

fn stop(mut child: Child) -> i32 {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().expect("exited by itself");
        }
        assert!(
            Instant::now() < deadline,
            "vmbuild fs serve ignored SIGTERM"
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
