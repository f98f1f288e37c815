//! One share on one unix socket, served to one front-end at a time, for as long as vmbuild
//! runs: when QEMU quits or restarts, the next connection gets a fresh FUSE session.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::share::ShareConfig;
use crate::stats::{ShareStats, StatsSnapshot};
use crate::vhost_user::FsBackend;
use crate::Error;

/// A running share. Dropping it stops serving and removes the socket.
pub struct ShareServer {
    tag: String,
    read_only: bool,
    socket: PathBuf,
    stats: Arc<ShareStats>,
    stopping: Arc<AtomicBool>,
    finished: mpsc::Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl ShareServer {
    /// Binds `socket` (replacing a stale socket file) and serves `config` on it from a
    /// thread of its own. The socket accepts connections as soon as this returns.
    pub fn spawn(config: ShareConfig, socket: impl Into<PathBuf>) -> Result<ShareServer, Error> {
        config.validate()?;
        let socket = socket.into();
        let listener = Listener::new(&socket, true).map_err(|e| {
            Error::Config(format!(
                "cannot listen on {}: {e} (is the directory there and writable?)",
                socket.display()
            ))
        })?;
        let stats = Arc::new(ShareStats::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let (done_tx, finished) = mpsc::channel();
        let tag = config.tag.clone();
        let read_only = config.read_only;
        let thread = {
            let stats = stats.clone();
            let stopping = stopping.clone();
            std::thread::Builder::new()
                .name(format!("share-{}", config.tag))
                .spawn(move || {
                    accept_loop(&config, listener, &stats, &stopping);
                    let _ = done_tx.send(());
                })
                .map_err(|e| Error::Io("spawning the share thread".into(), e))?
        };
        Ok(ShareServer {
            tag,
            read_only,
            socket,
            stats,
            stopping,
            finished,
            thread: Some(thread),
        })
    }

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

    /// Stops accepting connections and removes the socket. A front-end still connected
    /// keeps its session until it disconnects; this waits for that at most `grace`.
    pub fn stop(mut self, grace: Duration) {
        self.shutdown(grace);
    }

    fn shutdown(&mut self, grace: Duration) {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the accept() the share thread is blocked in; it sees `stopping` and leaves.
        let _ = UnixStream::connect(&self.socket);
        let _ = std::fs::remove_file(&self.socket);
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

fn accept_loop(
    config: &ShareConfig,
    mut listener: Listener,
    stats: &Arc<ShareStats>,
    stopping: &AtomicBool,
) {
    while !stopping.load(Ordering::SeqCst) {
        if let Err(e) = serve_one_connection(config, &mut listener, stats, stopping) {
            tracing::warn!(share = %config.tag, "connection ended with an error: {e}");
            // Do not spin if something is persistently wrong (e.g. the share directory
            // vanished): the next front-end will find out, and we retry.
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    tracing::debug!(share = %config.tag, "share stopped");
}

fn serve_one_connection(
    config: &ShareConfig,
    listener: &mut Listener,
    stats: &Arc<ShareStats>,
    stopping: &AtomicBool,
) -> Result<(), Error> {
    // Built before accept so that a broken share is reported before a guest waits on it.
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
        .start(listener)
        .map_err(|e| Error::Backend(format!("accepting a front-end: {e}")))?;
    if stopping.load(Ordering::SeqCst) {
        return Ok(());
    }
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
        )) => Ok(()),
        Err(e) => Err(Error::Backend(format!("{e}"))),
    }
}
