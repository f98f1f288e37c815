//! vhost-user-net ports: QEMU attaches a guest NIC with `-netdev vhost-user,chardev=…`
//! and its queues feed the switch directly. tx (queue 1) chains become ingress frames;
//! egress frames are written into buffers the guest posted on rx (queue 0). A port keeps
//! its number across front-end reconnects (a QEMU restart).

use std::collections::VecDeque;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::QueueOwnedT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::offload::VNET_HDR_LEN;
use crate::port::{PortId, PortSink, VlanMode};
use crate::switch::Switch;

const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZE: usize = 1024;
/// Frames held for a guest that has not posted rx buffers yet; beyond that they drop.
const PENDING_FRAMES: usize = 256;
const MAX_FRAME: usize = 65535;

type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// The current front-end's memory and rx queue, when one is connected.
#[derive(Default)]
struct Connection {
    mem: Option<Memory>,
    rx: Option<VringRwLock>,
}

/// The switch's side of the port: writes egress frames into the guest's rx buffers.
struct NetSink {
    path: PathBuf,
    conn: Mutex<Connection>,
    pending: Mutex<VecDeque<Vec<u8>>>,
}

impl NetSink {
    /// Copies as many pending frames as there are rx buffers; true if any was delivered.
    fn flush(&self, conn: &Connection) -> bool {
        let (Some(mem), Some(rx)) = (&conn.mem, &conn.rx) else {
            return false;
        };
        let mem = mem.memory();
        let mut pending = self.pending.lock().unwrap();
        let mut delivered = false;
        while let Some(frame) = pending.front() {
            let chain = match rx.get_mut().get_queue_mut().iter(mem.clone()) {
                Ok(mut it) => it.next(),
                Err(_) => None,
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let mut written = 0usize;
            let mut hdr = [0u8; VNET_HDR_LEN];
            hdr[10] = 1; // num_buffers
            let mut src: Vec<&[u8]> = vec![&hdr, frame];
            'descs: for desc in chain.writable() {
                let mut room = desc.len() as usize;
                let mut addr = desc.addr();
                while room > 0 && !src.is_empty() {
                    let n = room.min(src[0].len());
                    if mem.write_slice(&src[0][..n], addr).is_err() {
                        // A buffer outside guest memory: give the chain back empty.
                        written = 0;
                        break 'descs;
                    }
                    written += n;
                    room -= n;
                    addr = vm_memory::GuestAddress(addr.0 + n as u64);
                    src[0] = &src[0][n..];
                    if src[0].is_empty() {
                        src.remove(0);
                    }
                }
            }
            // A buffer too small for the frame still completes (truncated frames would
            // corrupt the guest's view; an empty one it discards).
            let used = if src.is_empty() { written as u32 } else { 0 };
            let _ = rx.add_used(head, used);
            delivered = true;
            pending.pop_front();
        }
        if delivered && rx.needs_notification().unwrap_or(true) {
            let _ = rx.signal_used_queue();
        }
        delivered
    }
}

impl PortSink for NetSink {
    fn transmit(&self, frame: &[u8]) -> io::Result<()> {
        let conn = self.conn.lock().unwrap();
        if conn.mem.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "no guest attached",
            ));
        }
        {
            let mut pending = self.pending.lock().unwrap();
            if pending.len() >= PENDING_FRAMES {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "guest rx ring full",
                ));
            }
            pending.push_back(frame.to_vec());
        }
        Ok(())
    }

    /// Delivers what this batch queued: one pass over the rx ring, one interrupt.
    fn end_burst(&self) {
        let conn = self.conn.lock().unwrap();
        self.flush(&conn);
    }

    fn kind(&self) -> &'static str {
        "vhost-user"
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// One front-end connection's device.
struct NetBackend {
    switch: Arc<Switch>,
    id: PortId,
    sink: Arc<NetSink>,
    event_idx: RwLock<bool>,
    /// The read end of the exit event, owned here for the whole session; the library gets
    /// an alias of it (see `exit_event`).
    exit_consumer: EventConsumer,
    /// The write end, handed to the library, which keeps it in its worker's epoll handler.
    exit_notifier: Mutex<Option<EventNotifier>>,
}

impl NetBackend {
    fn process_tx(&self, vring: &VringRwLock) -> io::Result<()> {
        let Some(mem) = self.sink.conn.lock().unwrap().mem.clone() else {
            return Ok(());
        };
        let mem = mem.memory();
        let chains: Vec<_> = match vring.get_mut().get_queue_mut().iter(mem.clone()) {
            Ok(it) => it.collect(),
            Err(_) => return Ok(()),
        };
        // Every frame of this kick, back to back in one buffer, then forwarded as one
        // batch (each chain is copied out first, so it can be given back at once).
        let mut data = Vec::with_capacity(chains.len() * 128);
        let mut frames: Vec<std::ops::Range<usize>> = Vec::with_capacity(chains.len());
        for chain in chains {
            let head = chain.head_index();
            let begin = data.len();
            let mut ok = true;
            for desc in chain.readable() {
                let len = desc.len() as usize;
                if data.len() - begin + len > MAX_FRAME + VNET_HDR_LEN {
                    ok = false;
                    break;
                }
                let start = data.len();
                data.resize(start + len, 0);
                if mem.read_slice(&mut data[start..], desc.addr()).is_err() {
                    ok = false;
                    break;
                }
            }
            if ok && data.len() - begin >= VNET_HDR_LEN {
                frames.push(begin + VNET_HDR_LEN..data.len());
            } else {
                // An unreadable chain: give it back and let the switch count a runt.
                data.truncate(begin);
                frames.push(begin..begin);
            }
            let _ = vring.add_used(head, 0);
        }
        let frames: Vec<&[u8]> = frames.into_iter().map(|r| &data[r]).collect();
        self.switch.ingress_batch(self.id, &frames);
        if vring.needs_notification().unwrap_or(true) {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2
    }
    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }
    fn features(&self) -> u64 {
        // QEMU's vhost-user-net needs protocol features (it refuses to start the device
        // without SET_VRING_ENABLE); see vhost_user_relay for the ordering this requires.
        (1 << VIRTIO_F_VERSION_1)
            | (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }
    fn set_event_idx(&self, enabled: bool) {
        *self.event_idx.write().unwrap() = enabled;
    }
    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        // A table with a region past the end of its file is refused, and nothing is
        // received or sent until a good one comes (the rings now point into it).
        let checked = regions_within_files(&mem.memory());
        self.sink.conn.lock().unwrap().mem = checked.is_ok().then_some(mem);
        checked
    }
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let notifier = self.exit_notifier.lock().unwrap().take()?;
        // vhost-user-backend 0.22 leaks the consumer it is given: VringEpollHandler::new
        // registers it with `consumer.into_raw_fd()` and never closes that fd, which cost
        // one eventfd per front-end session. So the consumer stays owned by this backend,
        // which closes it when dropped, and the library gets a second handle on the same fd
        // that it only ever turns back into a raw fd (checked by virtiofs-bridge's test
        // `the_library_never_closes_the_exit_consumer`, same library, same workaround).
        // SAFETY: the fd is open for as long as this backend lives, and the library's epoll
        // handler, the only user of the alias, holds an `Arc` of this backend: the fd is
        // closed, once, by `exit_consumer`, after the handler is gone.
        let alias = unsafe { EventConsumer::from_raw_fd(self.exit_consumer.as_raw_fd()) };
        Some((alias, notifier))
    }
    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        let event_idx = *self.event_idx.read().unwrap();
        if self.sink.conn.lock().unwrap().mem.is_none() {
            // No memory table, or a refused one the rings may point into: not even the
            // notification flags in the used ring are touched.
            return Ok(());
        }
        match device_event as usize {
            RX => {
                // The guest posted buffers: remember its rx ring and deliver what waits.
                let mut conn = self.sink.conn.lock().unwrap();
                conn.rx = Some(vrings[RX].clone());
                self.sink.flush(&conn);
            }
            TX => loop {
                if event_idx {
                    vrings[TX]
                        .disable_notification()
                        .map_err(io::Error::other)?;
                }
                self.process_tx(&vrings[TX])?;
                if !event_idx || !vrings[TX].enable_notification().map_err(io::Error::other)? {
                    break;
                }
            },
            _ => {}
        }
        Ok(())
    }
}

/// Every region of a memory table that maps a file lies within that file. The front-end
/// chooses each region's size and offset; a page mapped past the end of its file is
/// SIGBUS at the first access, which would take the whole process (the switch and every
/// port) down with it. (virtiofs-bridge's vhost-user back-end checks the same.)
fn regions_within_files(mem: &GuestMemoryMmap) -> io::Result<()> {
    use vm_memory::{GuestMemory, GuestMemoryRegion};
    for region in mem.iter() {
        let Some(backing) = region.file_offset() else {
            continue;
        };
        let file_len = backing.file().metadata()?.len();
        let end = backing.start().checked_add(region.len());
        if end.is_none_or(|end| end > file_len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a memory region of {} bytes at offset {} of a file of {file_len} bytes",
                    region.len(),
                    backing.start()
                ),
            ));
        }
    }
    Ok(())
}

/// A vhost-user-net port on `socket`. Dropping it stops serving: it closes the current
/// front-end's connection (if any), waits for the thread that serves the socket to end,
/// removes the socket and its private directory, and removes the port from the switch.
pub struct VhostUserNetPort {
    switch: Arc<Switch>,
    id: PortId,
    /// The public socket, removed (if still ours) when the port drops.
    _socket: crate::sockfile::SocketFile,
    control: Arc<Mutex<Control>>,
    /// A second handle on the public listener: shutting it down wakes the accept loop.
    listener: UnixListener,
    thread: Option<JoinHandle<()>>,
    /// Holds the daemon's private socket. A field, so it is removed only after `drop` has
    /// joined the thread that uses it.
    _private_dir: tempfile::TempDir,
}

/// What `Drop` shares with the serving thread.
#[derive(Default)]
struct Control {
    stopping: bool,
    /// Clones of the relay's two ends while a front-end is connected; shutting them down
    /// ends the relay (its blocking reads return) and with it the back-end session.
    session: Vec<UnixStream>,
}

impl Control {
    fn close_session(&mut self) {
        for end in self.session.drain(..) {
            let _ = end.shutdown(Shutdown::Both);
        }
    }
}

impl VhostUserNetPort {
    /// Listens on `socket`; the back-end's private socket lives in a new directory under
    /// the system's temporary directory.
    pub fn listen(
        switch: &Arc<Switch>,
        socket: &Path,
        vlan: VlanMode,
    ) -> io::Result<VhostUserNetPort> {
        Self::listen_in(switch, socket, vlan, &std::env::temp_dir())
    }

    /// As [`VhostUserNetPort::listen`], with the private directory (`vswitch-vhost-*`,
    /// removed when the port drops) made under `private_parent`.
    pub fn listen_in(
        switch: &Arc<Switch>,
        socket: &Path,
        vlan: VlanMode,
        private_parent: &Path,
    ) -> io::Result<VhostUserNetPort> {
        let (public, file) = crate::sockfile::bind_listener(socket).map_err(|e| {
            io::Error::new(e.kind(), format!("listening on {}: {e}", socket.display()))
        })?;
        let listener = public.try_clone()?;
        // The daemon listens privately; the relay connects QEMU's connection to it.
        let private_dir = tempfile::Builder::new()
            .prefix("vswitch-vhost-")
            .tempdir_in(private_parent)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("private directory in {}: {e}", private_parent.display()),
                )
            })?;
        let internal_path = private_dir.path().join("backend.sock");
        let internal =
            Listener::new(&internal_path, true).map_err(|e| io::Error::other(format!("{e}")))?;
        let sink = Arc::new(NetSink {
            path: socket.to_owned(),
            conn: Mutex::new(Connection::default()),
            pending: Mutex::new(VecDeque::new()),
        });
        let id = switch.try_add_port(sink.clone(), vlan, None)?;
        let control = Arc::new(Mutex::new(Control::default()));
        let (sw, ctl) = (switch.clone(), control.clone());
        let thread = std::thread::Builder::new()
            .name(format!("vhost-net-{id}"))
            .spawn(move || accept_loop(sw, id, sink, public, internal, &internal_path, &ctl));
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                switch.remove_port(id);
                return Err(e);
            }
        };
        Ok(VhostUserNetPort {
            switch: switch.clone(),
            id,
            _socket: file,
            control,
            listener,
            thread: Some(thread),
            _private_dir: private_dir,
        })
    }

    pub fn id(&self) -> PortId {
        self.id
    }
}

fn stopping(control: &Mutex<Control>) -> bool {
    control.lock().unwrap().stopping
}

fn accept_loop(
    switch: Arc<Switch>,
    id: PortId,
    sink: Arc<NetSink>,
    public: UnixListener,
    mut internal: Listener,
    internal_path: &Path,
    control: &Mutex<Control>,
) {
    while !stopping(control) {
        let front = match public.accept() {
            Ok((front, _)) => front,
            // Dropping the port shuts the listener down, which ends a blocked accept.
            Err(_) if stopping(control) => break,
            Err(e) => {
                tracing::warn!(port = id, "vhost-user-net accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        if stopping(control) {
            break;
        }
        let Ok((exit_consumer, exit_notifier)) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
        else {
            break;
        };
        let backend = Arc::new(NetBackend {
            switch: switch.clone(),
            id,
            sink: sink.clone(),
            event_idx: RwLock::new(false),
            exit_consumer,
            exit_notifier: Mutex::new(Some(exit_notifier)),
        });
        let mut daemon = match VhostUserDaemon::new(
            format!("vhost-user-net-{id}"),
            backend,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        ) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(port = id, "vhost-user-net port cannot serve: {e}");
                break;
            }
        };
        // Connect first (the listen backlog holds it), then let the daemon accept.
        let back = match UnixStream::connect(internal_path) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(port = id, "vhost-user-net relay: {e}");
                break;
            }
        };
        if let Err(e) = daemon.start(&mut internal) {
            tracing::warn!(port = id, "vhost-user-net back-end did not start: {e}");
            continue;
        }
        tracing::info!(port = id, "vhost-user-net front-end connected");
        // Let `Drop` close this session; if it has begun already, close it at once.
        let registered = {
            let mut c = control.lock().unwrap();
            match (front.try_clone(), back.try_clone()) {
                (Ok(f), Ok(b)) => {
                    c.session = vec![f, b];
                    if c.stopping {
                        c.close_session();
                    }
                    true
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(port = id, "vhost-user-net session refused: {e}");
                    false
                }
            }
        };
        if !registered {
            // Nothing could end this relay from outside: end it now.
            let _ = front.shutdown(Shutdown::Both);
            let _ = back.shutdown(Shutdown::Both);
        }
        if let Err(e) = crate::vhost_user_relay::relay(front, back) {
            tracing::debug!(port = id, "vhost-user-net relay ended: {e}");
        }
        control.lock().unwrap().session.clear();
        if let Err(e) = daemon.wait() {
            tracing::debug!(port = id, "vhost-user-net session ended: {e}");
        }
        // The request handler has ended; end the queue worker threads too.
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        drop(daemon);
        // The guest is gone: forget its memory and ring, and what was waiting for it.
        *sink.conn.lock().unwrap() = Connection::default();
        sink.pending.lock().unwrap().clear();
        tracing::info!(port = id, "vhost-user-net front-end disconnected");
    }
}

impl Drop for VhostUserNetPort {
    fn drop(&mut self) {
        {
            let mut c = self.control.lock().unwrap_or_else(|e| e.into_inner());
            c.stopping = true;
            c.close_session();
        }
        // SAFETY: shutdown(2) on a socket this port owns; it wakes a blocked accept(2)
        // (EINVAL on Linux) and makes later ones fail at once.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!(port = self.id, "vhost-user-net serving thread panicked");
            }
        }
        self.switch.remove_port(self.id);
        // `_private_dir` goes next, with nothing left using it.
    }
}

#[cfg(test)]
mod memory_table_tests {
    use super::regions_within_files;
    use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

    fn table(file_len: u64, region_len: usize, offset: u64) -> GuestMemoryMmap {
        let file = tempfile::tempfile().unwrap();
        file.set_len(file_len).unwrap();
        GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0),
            region_len,
            Some(FileOffset::new(file, offset)),
        )])
        .unwrap()
    }

    /// The vhost_user fuzz target's region-past-eof inputs: a 4 KiB file sent as a
    /// 1 MiB region made the first kick SIGBUS the whole process.
    #[test]
    fn regions_past_the_end_of_their_file_are_refused() {
        assert!(regions_within_files(&table(1 << 20, 1 << 20, 0)).is_ok());
        assert!(regions_within_files(&table(8192, 4096, 4096)).is_ok());
        assert!(regions_within_files(&table(4096, 1 << 20, 0)).is_err());
        assert!(regions_within_files(&table(8192, 8192, 4096)).is_err());
        assert!(regions_within_files(&table(4096, 4096, 1 << 20)).is_err());
    }
}
