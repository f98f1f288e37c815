//! Stream ports: a Unix socket speaking QEMU's `-netdev stream` protocol (each frame
//! preceded by its length as a big-endian u32). QEMU connects as a client
//! (`-netdev stream,server=off,addr.type=unix,addr.path=…`).
//!
//! Unlike vhost-user-net this netdev keeps no state in the back-end, so a guest that uses
//! it can be migrated (suspended to a file and revived by another QEMU): the snapshot
//! lifecycle's target VMs are attached this way. The port serves one connection at a time
//! and accepts the next when it closes, so a restarted or revived QEMU gets the same port.
//!
//! Frames to the peer go through a bounded queue that a thread of the connection writes
//! out: the switch never waits for a peer, and a peer that stops reading loses frames
//! (counted as egress failures) instead of slowing every other port down.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::port::{PortId, PortSink, VlanMode};
use crate::switch::Switch;

/// Longest frame accepted from a peer: a 64 KiB GSO-less frame plus headers. A longer
/// length prefix means the stream is out of step, and the connection is dropped.
const MAX_FRAME: usize = 65_550;
/// Bytes of frames (with their length prefixes) waiting for a peer that reads slower than
/// the switch sends. Beyond that, frames for it are dropped (and counted) at once, as on a
/// wire: a peer that stops reading costs the other ports nothing, and its queue no more
/// memory than this.
const MAX_QUEUED_BYTES: usize = 1 << 20;

/// Frames on their way to the connected peer, written by that connection's writer thread.
#[derive(Default)]
struct Outbox {
    queue: Mutex<Queued>,
    ready: Condvar,
}

#[derive(Default)]
struct Queued {
    frames: VecDeque<Vec<u8>>,
    bytes: usize,
    /// The connection is over: the writer leaves.
    closed: bool,
}

impl Outbox {
    /// Queues `frame` with its length prefix; refused when the queue is full or closed.
    fn push(&self, frame: &[u8]) -> io::Result<()> {
        let mut q = self.queue.lock().unwrap();
        if q.closed {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "no peer"));
        }
        let len = 4 + frame.len();
        if q.bytes + len > MAX_QUEUED_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "the stream peer is not reading",
            ));
        }
        let mut buf = Vec::with_capacity(len);
        buf.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        buf.extend_from_slice(frame);
        q.frames.push_back(buf);
        q.bytes += len;
        drop(q);
        self.ready.notify_one();
        Ok(())
    }

    fn close(&self) {
        self.queue.lock().unwrap().closed = true;
        self.ready.notify_one();
    }

    /// Writes queued frames to `peer` until the outbox is closed or the peer fails.
    fn write_to(&self, mut peer: UnixStream) {
        loop {
            let frame = {
                let mut q = self.queue.lock().unwrap();
                loop {
                    if q.closed {
                        return;
                    }
                    if let Some(f) = q.frames.pop_front() {
                        q.bytes -= f.len();
                        break f;
                    }
                    q = self.ready.wait(q).unwrap();
                }
            };
            // Blocks while the peer does not read; the queue fills meanwhile, and the
            // connection's end (shutdown) unblocks it.
            if peer.write_all(&frame).is_err() {
                // Nothing more can go out on this connection: refuse frames until the
                // reader sees the hang-up and a peer connects again.
                self.close();
                return;
            }
        }
    }
}

struct StreamSink {
    /// The connected peer's outbox, if a peer is connected.
    peer: Mutex<Option<Arc<Outbox>>>,
    path: PathBuf,
    /// Connections dropped because a peer sent a bad length.
    protocol_errors: AtomicU64,
}

impl PortSink for StreamSink {
    fn transmit(&self, frame: &[u8]) -> io::Result<()> {
        let outbox = self.peer.lock().unwrap().clone();
        match outbox {
            Some(outbox) => outbox.push(frame),
            None => Err(io::Error::new(io::ErrorKind::NotConnected, "no peer")),
        }
    }

    fn kind(&self) -> &'static str {
        "stream"
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// A listening stream port. Dropping it stops its thread, removes the port and unlinks
/// the socket.
pub struct StreamPort {
    switch: Arc<Switch>,
    id: PortId,
    sink: Arc<StreamSink>,
    stop: OwnedFd,
    reader: Option<JoinHandle<()>>,
    /// The socket file, removed (if still ours) when the port drops.
    _file: crate::sockfile::SocketFile,
}

impl StreamPort {
    /// Binds `path` (which must not exist) and attaches the port to `switch`.
    pub fn listen(switch: &Arc<Switch>, path: &Path, vlan: VlanMode) -> io::Result<StreamPort> {
        let (listener, file) = crate::sockfile::bind_listener(path)?;
        let sink = Arc::new(StreamSink {
            peer: Mutex::new(None),
            path: path.to_owned(),
            protocol_errors: AtomicU64::new(0),
        });
        // SAFETY: eventfd with valid flags; the fd is owned by the OwnedFd on success.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd was just created and is owned by nobody else.
        let stop = unsafe { OwnedFd::from_raw_fd(efd) };
        let id = switch.try_add_port(sink.clone(), vlan, None)?;
        let (sw, s, stop_raw) = (switch.clone(), sink.clone(), stop.as_raw_fd());
        let reader = std::thread::Builder::new()
            .name("stream-port".into())
            .spawn(move || serve(sw, id, listener, s, stop_raw));
        let reader = match reader {
            Ok(r) => r,
            Err(e) => {
                switch.remove_port(id);
                return Err(e);
            }
        };
        Ok(StreamPort {
            switch: switch.clone(),
            id,
            sink,
            stop,
            reader: Some(reader),
            _file: file,
        })
    }

    pub fn id(&self) -> PortId {
        self.id
    }

    pub fn path(&self) -> &Path {
        &self.sink.path
    }

    /// Whether a peer is connected right now.
    pub fn connected(&self) -> bool {
        self.sink.peer.lock().unwrap().is_some()
    }

    /// Connections dropped for a bad length prefix.
    pub fn protocol_errors(&self) -> u64 {
        self.sink.protocol_errors.load(Relaxed)
    }
}

/// Waits until `fd` or the stop eventfd is readable; false when told to stop.
fn wait_readable(fd: libc::c_int, stop: libc::c_int) -> bool {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: two valid pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return r > 0 && fds[1].revents == 0;
    }
}

fn serve(
    switch: Arc<Switch>,
    id: PortId,
    listener: UnixListener,
    sink: Arc<StreamSink>,
    stop: libc::c_int,
) {
    let mut frame = vec![0u8; MAX_FRAME];
    while wait_readable(listener.as_raw_fd(), stop) {
        let Ok((stream, _)) = listener.accept() else {
            continue;
        };
        let (Ok(writer), Ok(())) = (stream.try_clone(), stream.set_nonblocking(false)) else {
            continue;
        };
        // A peer that stops mid-frame must not hold the thread (and so Drop) forever.
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let outbox = Arc::new(Outbox::default());
        let writing = {
            let outbox = outbox.clone();
            std::thread::Builder::new()
                .name("stream-port-tx".into())
                .spawn(move || outbox.write_to(writer))
        };
        let Ok(writing) = writing else {
            continue;
        };
        *sink.peer.lock().unwrap() = Some(outbox.clone());
        tracing::debug!(port = id, path = %sink.path.display(), "stream peer connected");
        let stopped = read_frames(&switch, id, &stream, &sink, stop, &mut frame);
        *sink.peer.lock().unwrap() = None;
        // Unblocks a writer stuck on a peer that does not read.
        outbox.close();
        let _ = stream.shutdown(std::net::Shutdown::Both);
        let _ = writing.join();
        tracing::debug!(port = id, "stream peer gone");
        if stopped {
            break;
        }
    }
}

/// Forwards frames from one connection until it closes (false) or the port stops (true).
fn read_frames(
    switch: &Switch,
    id: PortId,
    mut stream: &UnixStream,
    sink: &StreamSink,
    stop: libc::c_int,
    frame: &mut [u8],
) -> bool {
    loop {
        if !wait_readable(stream.as_raw_fd(), stop) {
            return true;
        }
        let mut len = [0u8; 4];
        if stream.read_exact(&mut len).is_err() {
            return false;
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            tracing::warn!(
                port = id,
                len,
                "stream peer sent an impossible frame length"
            );
            sink.protocol_errors.fetch_add(1, Relaxed);
            return false;
        }
        if stream.read_exact(&mut frame[..len]).is_err() {
            return false;
        }
        switch.ingress(id, &frame[..len]);
    }
}

impl Drop for StreamPort {
    fn drop(&mut self) {
        crate::port::signal_eventfd(&self.stop);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.switch.remove_port(self.id);
    }
}
