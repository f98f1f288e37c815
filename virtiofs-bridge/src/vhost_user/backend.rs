//! The virtio-fs device as a vhost-user back-end: two queues (hiprio and one request queue),
//! each descriptor chain one FUSE request, answered in place in guest memory.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Arc, Mutex, RwLock};

use fuse_backend_rs::abi::fuse_abi::{InHeader, Opcode, OutHeader};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{FsCacheReqHandler, Reader, VirtioFsWriter, Writer};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueOwnedT};
use vm_memory::{
    ByteValued, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::record::Recorder;
use crate::share::ShareFs;
use crate::stats::ShareStats;
use crate::vhost_user::pool::WorkerPool;

/// hiprio (FORGET, INTERRUPT) + one request queue. One request queue is what QEMU's
/// vhost-user-fs-pci offers by default and what the Linux driver uses.
pub const NUM_QUEUES: usize = 2;
/// The largest queue a front-end may configure (QEMU's `queue-size` property).
pub const MAX_QUEUE_SIZE: usize = 1024;

pub(crate) type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;
type Chain = DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap>>;

struct QueueState {
    mem: Option<GuestMemory>,
    event_idx: bool,
}

/// One connection's back-end. Built fresh for every front-end connection (see `server`).
pub struct FsBackend {
    server: Arc<Server<Arc<ShareFs>>>,
    state: RwLock<QueueState>,
    stats: Arc<ShareStats>,
    /// The read end of the exit event, owned here for the whole session; the library gets
    /// an alias of it (see [`FsBackend::exit_event`]).
    exit_consumer: EventConsumer,
    /// The write end, handed to the library, which keeps it in its worker's epoll handler.
    exit_notifier: Mutex<Option<EventNotifier>>,
    pool: Option<WorkerPool>,
    recorder: Arc<Recorder>,
}

impl FsBackend {
    pub(crate) fn new(
        fs: ShareFs,
        stats: Arc<ShareStats>,
        thread_pool_size: usize,
    ) -> io::Result<Self> {
        let (exit_consumer, exit_notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        let recorder = Arc::new(Recorder::new(if fs.read_only() {
            "fuse-ro"
        } else {
            "fuse-rw"
        }));
        let pool = match thread_pool_size {
            0 => None,
            n => Some(WorkerPool::new(n)?),
        };
        Ok(FsBackend {
            server: Arc::new(Server::new(Arc::new(fs))),
            state: RwLock::new(QueueState {
                mem: None,
                event_idx: false,
            }),
            stats,
            exit_consumer,
            exit_notifier: Mutex::new(Some(exit_notifier)),
            pool,
            recorder,
        })
    }

    /// Drains the queue: every available chain is one FUSE request.
    fn process_queue(&self, vring: &VringRwLock) -> io::Result<()> {
        let mem = match self.state.read().unwrap().mem.as_ref() {
            Some(m) => m.memory(),
            None => {
                return Err(io::Error::other(
                    "queue kicked before the memory table was set",
                ))
            }
        };
        let chains: Vec<Chain> = match vring.get_mut().get_queue_mut().iter(mem.clone()) {
            Ok(it) => it.collect(),
            Err(e) => {
                // The avail ring itself is broken (index beyond the queue size): nothing on
                // this queue can be trusted until the driver resets it.
                self.stats.count_bad_descriptor();
                tracing::warn!("virtio-fs: unusable avail ring: {e}");
                return Ok(());
            }
        };
        if chains.is_empty() {
            return Ok(());
        }
        match &self.pool {
            Some(pool) => {
                for chain in chains {
                    let server = self.server.clone();
                    let stats = self.stats.clone();
                    let recorder = self.recorder.clone();
                    let vring = vring.clone();
                    // The guard keeps this memory map alive for the request even if the
                    // front-end replaces the memory table meanwhile.
                    let mem = mem.clone();
                    pool.execute(move || {
                        let head = chain.head_index();
                        let used = serve_chain(&server, &stats, &recorder, &mem, chain);
                        complete(&vring, head, used);
                    });
                }
            }
            None => {
                for chain in chains {
                    let head = chain.head_index();
                    let used = serve_chain(&self.server, &self.stats, &self.recorder, &mem, chain);
                    if let Err(e) = vring.add_used(head, used) {
                        tracing::warn!("virtio-fs: add_used failed: {e}");
                    }
                }
                if vring.needs_notification().unwrap_or(true) {
                    vring.signal_used_queue()?;
                }
            }
        }
        Ok(())
    }
}

/// Serves one request and returns how many bytes were written into the chain. A request
/// that cannot be decoded is counted and answered with `EINVAL` (or with an empty used
/// element when no reply header fits), so the guest's waiter is released and the queue
/// keeps moving.
pub(crate) fn serve_chain<M>(
    server: &Server<Arc<ShareFs>>,
    stats: &ShareStats,
    recorder: &Recorder,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
) -> u32
where
    M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
{
    serve_chain_mapping(server, stats, recorder, mem, chain, None)
}

/// [`serve_chain`] with a DAX window for FUSE_SETUPMAPPING and FUSE_REMOVEMAPPING.
pub(crate) fn serve_chain_mapping<M>(
    server: &Server<Arc<ShareFs>>,
    stats: &ShareStats,
    recorder: &Recorder,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    window: Option<&mut dyn FsCacheReqHandler>,
) -> u32
where
    M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
{
    stats.count_request();
    let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
        Ok(r) => r,
        Err(e) => {
            stats.count_bad_descriptor();
            tracing::debug!("virtio-fs: unreadable descriptor chain: {e}");
            return 0;
        }
    };
    if recorder.enabled() {
        let mut request = Vec::new();
        let _ = std::io::Read::read_to_end(&mut reader.clone(), &mut request);
        recorder.record(&request);
    }
    let writer = match VirtioFsWriter::new(mem, chain.clone()) {
        Ok(w) => Writer::VirtioFs(w),
        Err(e) => {
            stats.count_bad_descriptor();
            tracing::debug!("virtio-fs: unwritable descriptor chain: {e}");
            return 0;
        }
    };
    // A header that claims more bytes than the chain holds is malformed. The FUSE layer
    // does not compare the two: it answers a huge claim with ENOMEM and serves a modest
    // one as if nothing were wrong, when a body of fixed size happens to be complete.
    // (The Linux driver's claim is always exactly what it sent.)
    if let Ok(header) = reader.clone().read_obj::<InHeader>() {
        if header.len as usize > reader.available_bytes() {
            stats.count_malformed();
            tracing::debug!(
                claimed = header.len,
                sent = reader.available_bytes(),
                "virtio-fs: request header claims more than was sent"
            );
            return reply_einval(mem, chain);
        }
    }
    match server.handle_message(reader, writer, window, None) {
        Ok(n) => u32::try_from(n).unwrap_or(u32::MAX),
        Err(e) => {
            stats.count_malformed();
            tracing::debug!("virtio-fs: malformed request: {e}");
            reply_einval(mem, chain)
        }
    }
}

/// Answers a request the FUSE layer rejected with `EINVAL`, when its header can be read,
/// so the guest's waiter is released with an error instead of waiting forever. Requests
/// that never get replies (FORGET) and chains with no room for a header get none.
fn reply_einval<M>(mem: &GuestMemoryMmap, chain: DescriptorChain<M>) -> u32
where
    M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
{
    let Ok(mut reader) = Reader::from_descriptor_chain(mem, chain.clone()) else {
        return 0;
    };
    let Ok(header) = reader.read_obj::<InHeader>() else {
        return 0;
    };
    if header.opcode == Opcode::Forget as u32 || header.opcode == Opcode::BatchForget as u32 {
        return 0;
    }
    let reply = OutHeader {
        len: std::mem::size_of::<OutHeader>() as u32,
        error: -libc::EINVAL,
        unique: header.unique,
    };
    match VirtioFsWriter::new(mem, chain) {
        Ok(mut w) if w.available_bytes() >= reply.as_slice().len() => {
            match std::io::Write::write_all(&mut w, reply.as_slice()) {
                Ok(()) => reply.len,
                Err(_) => 0,
            }
        }
        _ => 0,
    }
}

/// Every region of a memory table that maps a file lies within that file. The front-end
/// chooses each region's size and offset; a page mapped past the end of its file is
/// SIGBUS at the first access, which would take the whole process (every share, every
/// VM) down with it. (A front-end that shrinks the file after sending it can still do
/// that: QEMU's memfd memory is sealed against it by default; vswitch's vhost-user-net
/// port checks the same.)
pub(crate) fn regions_within_files(mem: &GuestMemoryMmap) -> io::Result<()> {
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

fn complete(vring: &VringRwLock, head: u16, used: u32) {
    if let Err(e) = vring.add_used(head, used) {
        tracing::warn!("virtio-fs: add_used failed: {e}");
        return;
    }
    if vring.needs_notification().unwrap_or(true) {
        if let Err(e) = vring.signal_used_queue() {
            tracing::warn!("virtio-fs: signalling the guest failed: {e}");
        }
    }
}

impl VhostUserBackend for FsBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.state.write().unwrap().event_idx = enabled;
    }

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        // A table with a region past the end of its file is refused, and no queue is
        // served until a good one comes (the rings now point into it).
        let checked = regions_within_files(&mem.memory());
        self.state.write().unwrap().mem = checked.is_ok().then_some(mem);
        checked
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // One worker thread serves both queues; it gets the one exit event.
        let notifier = self.exit_notifier.lock().unwrap().take()?;
        // vhost-user-backend 0.22 leaks the consumer it is given: VringEpollHandler::new
        // registers it with `consumer.into_raw_fd()` and never closes that fd. Handing it
        // our consumer cost one eventfd per front-end session, for as long as `fs serve`
        // ran. So the consumer stays owned by this backend, which closes it when dropped,
        // and the library gets a second handle on the same fd that it only ever turns back
        // into a raw fd (checked by the test `the_library_never_closes_the_exit_consumer`).
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
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let Some(vring) = vrings.get(device_event as usize) else {
            return Err(io::Error::other(format!(
                "event for unknown queue {device_event}"
            )));
        };
        let (event_idx, have_memory) = {
            let state = self.state.read().unwrap();
            (state.event_idx, state.mem.is_some())
        };
        if !have_memory {
            // No memory table, or a refused one the rings may point into: not even the
            // notification flags in the used ring are touched.
            return Err(io::Error::other(
                "queue kicked without a usable memory table",
            ));
        }
        if event_idx {
            // Re-enable notifications only once the ring looks empty, and go round again if
            // the driver added work in between (virtio spec 2.7.10).
            loop {
                vring.disable_notification().map_err(io::Error::other)?;
                self.process_queue(vring)?;
                if !vring.enable_notification().map_err(io::Error::other)? {
                    break;
                }
            }
        } else {
            self.process_queue(vring)?;
        }
        Ok(())
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

#[cfg(test)]
mod exit_event_tests {
    use super::*;
    use crate::share::ShareConfig;
    use vhost_user_backend::VhostUserDaemon;

    /// `exit_event` hands vhost-user-backend an alias of the exit consumer's fd and closes
    /// the fd itself, because the library (0.22) never closes the consumer it is given. If
    /// a new version closes it, the fd would be closed twice: then drop the alias.
    #[test]
    fn the_library_never_closes_the_exit_consumer() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(ShareStats::default());
        let fs = ShareConfig::xchg(dir.path())
            .open_fs(stats.clone())
            .unwrap();
        let backend = Arc::new(FsBackend::new(fs, stats, 0).unwrap());
        let fd = backend.exit_consumer.as_raw_fd();
        let daemon = VhostUserDaemon::new(
            "leak-test".into(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .unwrap();
        assert!(
            backend.exit_notifier.lock().unwrap().is_none(),
            "the library took the exit event"
        );
        // Signals the exit event, joins the worker thread and lets go of the backend.
        drop(daemon);
        assert_eq!(
            Arc::strong_count(&backend),
            1,
            "the daemon kept the backend"
        );
        assert_eq!(
            std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap(),
            std::path::Path::new("anon_inode:[eventfd]")
        );
        // Still the very eventfd the library signalled, not a new file at the same number.
        backend
            .exit_consumer
            .consume()
            .expect("the exit event is still open and was signalled");
    }
}
