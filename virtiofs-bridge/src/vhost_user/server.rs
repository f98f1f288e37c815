//! One share on one unix socket, served to one front-end at a time, for as long as vmbuild
//! runs: when QEMU quits or restarts, the next connection gets a fresh FUSE session.
//!
//! The socket is either bound here ([`ShareServer::spawn`]: atomically, and never over
//! anything already at the path) or inherited already listening
//! ([`ShareServer::from_listener`]: virtiofsd's `--fd`, which libvirt uses). This module
//! removes only a socket it bound itself, and only while that very socket is still there.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::share::ShareConfig;
use crate::stats::{ShareStats, StatsSnapshot};
use crate::vhost_user::FsBackend;
use crate::Error;

/// A running share. Dropping it stops serving and removes the socket it bound.
pub struct ShareServer {
    tag: String,
    read_only: bool,
    socket: PathBuf,
    /// The socket file this server bound, removed when it stops if it is still that very
    /// socket (nothing that replaced it); `None` for an inherited listener.
    bound: Option<sockfile::SocketFile>,
    stats: Arc<ShareStats>,
    stopping: Arc<AtomicBool>,
    /// Written to wake the share thread out of its wait for a front-end.
    wake: UnixStream,
    failure: Arc<Mutex<Option<String>>>,
    finished: mpsc::Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl ShareServer {
    /// Binds `socket` and serves `config` on it from a thread of its own. The socket
    /// accepts connections as soon as this returns.
    ///
    /// The bind is atomic: the socket is bound under a temporary name in the same
    /// directory and renamed into place without replacing anything, so a front-end never
    /// sees a half-made socket, and whatever is already at `socket` (a file, a live or a
    /// stale socket) is an error, never removed. Clearing a stale socket is the caller's
    /// decision.
    pub fn spawn(config: ShareConfig, socket: impl Into<PathBuf>) -> Result<ShareServer, Error> {
        config.validate()?;
        let socket = socket.into();
        if socket.file_name().is_none() {
            return Err(Error::Config(format!(
                "{} names no socket file",
                socket.display()
            )));
        }
        let (listener, bound) = sockfile::bind_listener(&socket).map_err(|e| {
            if e.kind() == ErrorKind::AlreadyExists {
                Error::Config(format!(
                    "{} already exists: a share never replaces what is at its socket path",
                    socket.display()
                ))
            } else {
                Error::Io(
                    format!(
                        "cannot listen on {} (is the directory there and writable?)",
                        socket.display()
                    ),
                    e,
                )
            }
        })?;
        Self::start(config, listener, socket, Some(bound))
    }

    /// Serves `config` on a socket that is already bound and listening, e.g. one inherited
    /// from a parent (virtiofsd's `--fd`). The socket file, if any, is the parent's: it is
    /// left where it is when the server stops.
    pub fn from_listener(
        config: ShareConfig,
        listener: UnixListener,
    ) -> Result<ShareServer, Error> {
        config.validate()?;
        let socket = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_path_buf))
            .unwrap_or_default();
        Self::start(config, listener, socket, None)
    }

    fn start(
        config: ShareConfig,
        listener: UnixListener,
        socket: PathBuf,
        bound: Option<sockfile::SocketFile>,
    ) -> Result<ShareServer, Error> {
        // The share thread waits in poll() and accepts only when a front-end is there.
        listener
            .set_nonblocking(false)
            .map_err(|e| Error::Io("making the listening socket blocking".into(), e))?;
        let (wake, woken) =
            UnixStream::pair().map_err(|e| Error::Io("creating a wake-up socket".into(), e))?;
        let stats = Arc::new(ShareStats::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let failure = Arc::new(Mutex::new(None));
        let (done_tx, finished) = mpsc::channel();
        let tag = config.tag.clone();
        let read_only = config.read_only;
        let thread = {
            let stats = stats.clone();
            let stopping = stopping.clone();
            let failure = failure.clone();
            std::thread::Builder::new()
                .name(format!("share-{}", config.tag))
                .spawn(move || {
                    let listener = Listener::from(listener);
                    if let Err(e) = accept_loop(&config, listener, woken, &stats, &stopping) {
                        tracing::error!(share = %config.tag, "share stopped: {e}");
                        *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    }
                    let _ = done_tx.send(());
                })
                .map_err(|e| Error::Io("spawning the share thread".into(), e))?
        };
        Ok(ShareServer {
            tag,
            read_only,
            socket,
            bound,
            stats,
            stopping,
            wake,
            failure,
            finished,
            thread: Some(thread),
        })
    }

    /// The socket's path (empty for an inherited socket that has none).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Why the share stopped serving by itself (its directory could not be opened, the
    /// socket failed, ...), once it has. A server that fails reports it once, here and in
    /// the log, and does not retry.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops accepting connections and removes the socket it bound. A front-end still
    /// connected keeps its session until it disconnects; this waits for that at most `grace`.
    pub fn stop(mut self, grace: Duration) {
        self.shutdown(grace);
    }

    fn shutdown(&mut self, grace: Duration) {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the poll() the share thread waits in; it sees `stopping` and leaves.
        let _ = self.wake.write_all(&[0]);
        // Only the socket this server made: not a file someone put there since.
        drop(self.bound.take());
        if self.finished.recv_timeout(grace).is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for ShareServer {
    fn drop(&mut self) {
        self.shutdown(Duration::from_millis(200));
    }
}

/// Serves one front-end after another until `stopping`. Returns an error only for what
/// will not get better by waiting for the next front-end (the share cannot be opened, the
/// listening socket fails); a session that ends badly is logged and the next one served.
fn accept_loop(
    config: &ShareConfig,
    mut listener: Listener,
    mut woken: UnixStream,
    stats: &Arc<ShareStats>,
    stopping: &AtomicBool,
) -> Result<(), Error> {
    while !stopping.load(Ordering::SeqCst) {
        // Checked before accept so that a broken share is reported before a guest waits on
        // it.
        config.validate()?;
        if !wait_for_frontend(&listener, &mut woken)? || stopping.load(Ordering::SeqCst) {
            break;
        }
        // The share's directory is opened now, as it is when this front-end connects:
        // this session serves that directory, whatever later happens at its path (a
        // directory removed while shared is an empty, read-only one to the guest; one
        // renamed away is still served). A directory replaced between two sessions is
        // the new one to the next.
        let fs = config.open_fs(stats.clone())?;
        let backend = FsBackend::new(fs, stats.clone(), config.thread_pool_size)
            .map_err(|e| Error::Io("creating the virtio-fs back-end".into(), e))?;
        let mut daemon = VhostUserDaemon::new(
            format!("vhost-user-fs-{}", config.tag),
            Arc::new(backend),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| Error::Backend(format!("{e}")))?;
        daemon
            .start(&mut listener)
            .map_err(|e| Error::Backend(format!("accepting a front-end: {e}")))?;
        stats.count_connection();
        tracing::info!(share = %config.tag, "front-end connected");
        let result = daemon.wait();
        tracing::info!(share = %config.tag, "front-end disconnected");
        // Dropping the daemon stops its vring worker threads before the next connection.
        drop(daemon);
        match result {
            // A front-end that quits (or is killed) mid-message is the normal end of a session.
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => {}
            // One bad session; each further one needs a new connection, so this cannot spin.
            Err(e) => tracing::warn!(share = %config.tag, "front-end session ended: {e}"),
        }
    }
    tracing::debug!(share = %config.tag, "share stopped");
    Ok(())
}

/// Waits until a front-end is waiting to be accepted (true) or the server is woken to
/// stop (false).
fn wait_for_frontend(listener: &Listener, woken: &mut UnixStream) -> Result<bool, Error> {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: woken.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Io("waiting for a front-end".into(), e));
        }
        if fds[1].revents != 0 {
            let _ = woken.read(&mut [0u8; 8]);
            return Ok(false);
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return Ok(true);
        }
        if fds[0].revents != 0 {
            return Err(Error::Backend(format!(
                "the listening socket failed (poll events {:#x})",
                fds[0].revents
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(dir: &Path) -> ShareConfig {
        ShareConfig::xchg(dir)
    }

    #[test]
    fn binding_never_replaces_what_is_at_the_path_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let sockets = tempfile::tempdir().unwrap();
        let file = sockets.path().join("fs.sock");
        std::fs::write(&file, "keep me").unwrap();
        let e = ShareServer::spawn(share(dir.path()), &file).err().unwrap();
        assert!(e.to_string().contains("already exists"), "{e}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
        // A stale socket is not cleared by the library either: that is the caller's call.
        let stale = sockets.path().join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        assert!(ShareServer::spawn(share(dir.path()), &stale).is_err());
        assert!(stale.exists());
        assert_eq!(
            std::fs::read_dir(sockets.path()).unwrap().count(),
            2,
            "no temporary left"
        );

        let fresh = sockets.path().join("new.sock");
        let server = ShareServer::spawn(share(dir.path()), &fresh).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_socket(
            &std::fs::metadata(&fresh).unwrap().file_type()
        ));
        assert_eq!(std::fs::read_dir(sockets.path()).unwrap().count(), 3);
        server.stop(Duration::from_secs(1));
        assert!(!fresh.exists(), "its own socket is removed");
    }

    #[test]
    fn an_inherited_listener_is_served_and_its_socket_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let sockets = tempfile::tempdir().unwrap();
        let path = sockets.path().join("parent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = ShareServer::from_listener(share(dir.path()), listener).unwrap();
        assert_eq!(server.socket(), path);
        let stop = std::time::Instant::now();
        server.stop(Duration::from_secs(2));
        assert!(stop.elapsed() < Duration::from_secs(1), "woken promptly");
        assert!(path.exists(), "the parent's socket file is the parent's");
    }

    #[test]
    fn a_share_that_cannot_be_opened_fails_once() {
        let dir = tempfile::tempdir().unwrap();
        let sockets = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        std::fs::create_dir(&gone).unwrap();
        let config = share(&gone);
        std::fs::remove_dir(&gone).unwrap();
        // validate() passed at spawn time in real use; here the directory vanishes first.
        let listener = UnixListener::bind(sockets.path().join("s.sock")).unwrap();
        let server = ShareServer::start(config, listener, PathBuf::new(), None).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while server.failure().is_none() {
            assert!(std::time::Instant::now() < deadline, "no failure reported");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(server.failure().unwrap().contains("gone"));
    }
}
