//! A vhost-user front-end for virtio-fs back-ends, with no VM: guest memory is a memfd this
//! process maps, the virtqueues are split rings this code drives, and requests go to the
//! back-end over a real vhost-user socket. It drives vmbuild's share server and virtiofsd
//! alike, so tests and benchmarks see both through the same front-end.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory size. Big enough for every slot's request and reply buffers.
pub const MEM_SIZE: u64 = 128 << 20;
/// Entries in each split ring.
pub const QUEUE_SIZE: u16 = 256;
/// Descriptors each request slot owns; a slot holds one request in flight.
const DESCS_PER_SLOT: u16 = 4;
/// Requests that can be in flight on one queue at once.
pub const SLOTS: u16 = QUEUE_SIZE / DESCS_PER_SLOT;
/// Bytes of request and of reply buffer each slot owns.
pub const SLOT_BUF: u64 = 264 << 10;
const BUFFERS_BASE: u64 = 1 << 20;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

/// hiprio is queue 0; requests go on queue 1.
pub const HIPRIO: usize = 0;
pub const REQUEST: usize = 1;

/// One descriptor as a test wants to write it, valid or not.
#[derive(Debug, Clone, Copy)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

struct SplitQueue {
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

/// Where a finished request's reply landed.
#[derive(Debug, Clone, Copy)]
pub struct Used {
    pub id: u32,
    pub len: u32,
}

pub struct FsFrontend {
    // Kept so the socket stays open for as long as the front-end lives.
    _frontend: Frontend,
    mem: GuestMemoryMmap,
    queues: Vec<SplitQueue>,
}

impl FsFrontend {
    /// Connects to a virtio-fs back-end's socket (waiting up to 10 s for it to appear) and
    /// sets up memory and both queues, as QEMU would.
    pub fn connect(socket: &Path) -> anyhow::Result<Self> {
        const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
        let deadline = Instant::now() + Duration::from_secs(10);
        // A back-end that never answers (a port still busy with the previous front-end)
        // fails the test after a while instead of hanging it: every reply is awaited at
        // most REPLY_TIMEOUT.
        let mut frontend = loop {
            let connected = std::os::unix::net::UnixStream::connect(socket).and_then(|s| {
                s.set_read_timeout(Some(REPLY_TIMEOUT))?;
                Ok(s)
            });
            match connected.map(|s| Frontend::from_stream(s, 2)) {
                Ok(f) => break f,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => bail!("connecting to {}: {e}", socket.display()),
            }
        };
        let features = frontend.get_features().context("GET_FEATURES")?;
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            bail!("back-end does not offer vhost-user protocol features");
        }
        // VERSION_1 and protocol features; no EVENT_IDX or indirect descriptors, so every
        // completion is signalled and chains are plain.
        let wanted = (1u64 << 32) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        frontend.set_owner().context("SET_OWNER")?;
        frontend
            .set_features(features & wanted)
            .context("SET_FEATURES")?;
        let proto = frontend
            .get_protocol_features()
            .context("GET_PROTOCOL_FEATURES")?;
        let proto = proto & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK);
        frontend
            .set_protocol_features(proto)
            .context("SET_PROTOCOL_FEATURES")?;

        let memfd = memfd("vhost-frontend-mem")?;
        memfd.set_len(MEM_SIZE)?;
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM_SIZE as usize,
            Some(FileOffset::new(memfd, 0)),
        )])
        .context("mapping guest memory")?;
        let region = mem.find_region(GuestAddress(0)).unwrap();
        let host_base = region.as_ptr() as u64;
        let info = VhostUserMemoryRegionInfo::from_guest_region(region)?;
        frontend.set_mem_table(&[info]).context("SET_MEM_TABLE")?;

        let mut queues = Vec::new();
        for q in 0..2usize {
            let base = (q as u64) * 0x4000;
            let queue = SplitQueue {
                desc: base,
                avail: base + 0x1000,
                used: base + 0x2000,
                next_avail: 0,
                last_used: 0,
                kick: EventFd::new(0)?,
                call: EventFd::new(0)?,
            };
            frontend
                .set_vring_num(q, QUEUE_SIZE)
                .context("SET_VRING_NUM")?;
            frontend
                .set_vring_addr(
                    q,
                    &VringConfigData {
                        queue_max_size: QUEUE_SIZE,
                        queue_size: QUEUE_SIZE,
                        flags: 0,
                        desc_table_addr: host_base + queue.desc,
                        used_ring_addr: host_base + queue.used,
                        avail_ring_addr: host_base + queue.avail,
                        log_addr: None,
                    },
                )
                .context("SET_VRING_ADDR")?;
            frontend.set_vring_base(q, 0).context("SET_VRING_BASE")?;
            frontend
                .set_vring_call(q, &queue.call)
                .context("SET_VRING_CALL")?;
            frontend
                .set_vring_kick(q, &queue.kick)
                .context("SET_VRING_KICK")?;
            frontend
                .set_vring_enable(q, true)
                .context("SET_VRING_ENABLE")?;
            queues.push(queue);
        }
        Ok(FsFrontend {
            _frontend: frontend,
            mem,
            queues,
        })
    }

    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Guest address of slot `slot`'s request buffer; its reply buffer follows at
    /// `+ SLOT_BUF`.
    pub fn slot_buffer(slot: u16) -> u64 {
        BUFFERS_BASE + u64::from(slot) * 2 * SLOT_BUF
    }

    /// Writes `descs` as slot `slot`'s descriptors (the first is the head), makes the chain
    /// available and kicks. Addresses and lengths are written as given: tests use this to
    /// send malformed chains.
    pub fn submit_raw(
        &mut self,
        queue: usize,
        slot: u16,
        descs: &[RawDesc],
    ) -> anyhow::Result<u16> {
        assert!(!descs.is_empty() && descs.len() <= DESCS_PER_SLOT as usize);
        let q = &mut self.queues[queue];
        let head = slot * DESCS_PER_SLOT;
        for (i, d) in descs.iter().enumerate() {
            let at = q.desc + 16 * u64::from(head + i as u16);
            self.mem.write_obj(d.addr, GuestAddress(at))?;
            self.mem.write_obj(d.len, GuestAddress(at + 8))?;
            self.mem.write_obj(d.flags, GuestAddress(at + 12))?;
            self.mem.write_obj(d.next, GuestAddress(at + 14))?;
        }
        let ring_slot = q.next_avail % QUEUE_SIZE;
        self.mem
            .write_obj(head, GuestAddress(q.avail + 4 + 2 * u64::from(ring_slot)))?;
        // The ring entry must be visible before the index that publishes it.
        fence(Ordering::SeqCst);
        q.next_avail = q.next_avail.wrapping_add(1);
        self.mem
            .write_obj(q.next_avail, GuestAddress(q.avail + 2))?;
        fence(Ordering::SeqCst);
        Ok(head)
    }

    /// Sets the avail index to any value, for tests of a broken ring.
    pub fn set_avail_idx_raw(&mut self, queue: usize, idx: u16) -> anyhow::Result<()> {
        self.mem
            .write_obj(idx, GuestAddress(self.queues[queue].avail + 2))?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    pub fn kick(&self, queue: usize) -> io::Result<()> {
        self.queues[queue].kick.write(1)
    }

    /// Submits a well-formed request (one readable descriptor holding `request`, one
    /// writable of `reply_capacity` bytes) in `slot` without kicking.
    pub fn submit(
        &mut self,
        queue: usize,
        slot: u16,
        request: &[u8],
        reply_capacity: u32,
    ) -> anyhow::Result<u16> {
        assert!(request.len() as u64 <= SLOT_BUF && u64::from(reply_capacity) <= SLOT_BUF);
        let buf = Self::slot_buffer(slot);
        self.mem.write_slice(request, GuestAddress(buf))?;
        let head = slot * DESCS_PER_SLOT;
        let mut descs = vec![RawDesc {
            addr: buf,
            len: request.len() as u32,
            flags: 0,
            next: 0,
        }];
        if reply_capacity > 0 {
            // Like the Linux driver: the reply header in a descriptor of its own, the data
            // in the next one (contiguous here, so the reply reads back as one buffer).
            let header = 16.min(reply_capacity);
            descs[0].flags = VIRTQ_DESC_F_NEXT;
            descs[0].next = head + 1;
            descs.push(RawDesc {
                addr: buf + SLOT_BUF,
                len: header,
                flags: VIRTQ_DESC_F_WRITE,
                next: 0,
            });
            if reply_capacity > header {
                descs[1].flags |= VIRTQ_DESC_F_NEXT;
                descs[1].next = head + 2;
                descs.push(RawDesc {
                    addr: buf + SLOT_BUF + u64::from(header),
                    len: reply_capacity - header,
                    flags: VIRTQ_DESC_F_WRITE,
                    next: 0,
                });
            }
        }
        self.submit_raw(queue, slot, &descs)
    }

    /// Waits until the back-end has used at least one more chain, up to `timeout`, and
    /// returns every newly used element.
    pub fn wait_used(&mut self, queue: usize, timeout: Duration) -> anyhow::Result<Vec<Used>> {
        let deadline = Instant::now() + timeout;
        loop {
            let used = self.collect_used(queue)?;
            if !used.is_empty() {
                return Ok(used);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no reply from the back-end within {timeout:?}");
            }
            wait_readable(&self.queues[queue].call, left)?;
            let _ = self.queues[queue].call.read();
        }
    }

    fn collect_used(&mut self, queue: usize) -> anyhow::Result<Vec<Used>> {
        fence(Ordering::SeqCst);
        let q = &mut self.queues[queue];
        let idx: u16 = self.mem.read_obj(GuestAddress(q.used + 2))?;
        let mut out = Vec::new();
        while q.last_used != idx {
            let at = q.used + 4 + 8 * u64::from(q.last_used % QUEUE_SIZE);
            out.push(Used {
                id: self.mem.read_obj(GuestAddress(at))?,
                len: self.mem.read_obj(GuestAddress(at + 4))?,
            });
            q.last_used = q.last_used.wrapping_add(1);
        }
        Ok(out)
    }

    /// Reads the reply a used element points at (slot `head / DESCS_PER_SLOT`).
    pub fn reply(&self, used: Used) -> anyhow::Result<Vec<u8>> {
        let slot = (used.id as u16) / DESCS_PER_SLOT;
        let mut buf = vec![0u8; used.len as usize];
        self.mem
            .read_slice(&mut buf, GuestAddress(Self::slot_buffer(slot) + SLOT_BUF))?;
        Ok(buf)
    }

    /// One request, one reply.
    pub fn call(
        &mut self,
        queue: usize,
        request: &[u8],
        reply_capacity: u32,
    ) -> anyhow::Result<Vec<u8>> {
        let head = self.submit(queue, 0, request, reply_capacity)?;
        self.kick(queue)?;
        let mut done = Vec::new();
        while done.is_empty() {
            done = self.wait_used(queue, Duration::from_secs(10))?;
        }
        let used = done
            .into_iter()
            .find(|u| u.id == u32::from(head))
            .context("the back-end used a chain it was not given")?;
        self.reply(used)
    }

    /// Many requests in flight at once (at most [`SLOTS`]); replies in request order.
    pub fn call_batch(
        &mut self,
        queue: usize,
        requests: &[Vec<u8>],
        reply_capacity: u32,
    ) -> anyhow::Result<Vec<Vec<u8>>> {
        assert!(requests.len() <= SLOTS as usize);
        for (slot, req) in requests.iter().enumerate() {
            self.submit(queue, slot as u16, req, reply_capacity)?;
        }
        self.kick(queue)?;
        let mut replies: Vec<Option<Vec<u8>>> = vec![None; requests.len()];
        let mut left = requests.len();
        while left > 0 {
            for used in self.wait_used(queue, Duration::from_secs(10))? {
                let slot = (used.id as u16 / DESCS_PER_SLOT) as usize;
                if slot < replies.len() && replies[slot].is_none() {
                    replies[slot] = Some(self.reply(used)?);
                    left -= 1;
                }
            }
        }
        Ok(replies.into_iter().map(Option::unwrap).collect())
    }
}

fn memfd(name: &str) -> io::Result<std::fs::File> {
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid C string and flags; the fd is owned by the File on success.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

fn wait_readable(fd: &EventFd, timeout: Duration) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
