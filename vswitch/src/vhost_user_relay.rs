//! A vhost-user message relay between QEMU and a vhost-user-backend daemon that holds back
//! `SET_VRING_ENABLE` until `SET_FEATURES` has been seen.
//!
//! QEMU's virtio-net enables its rings at device realize (`peer_attach`), long before the
//! driver starts and QEMU sends `SET_FEATURES`; the vhost crate refuses `SET_VRING_ENABLE`
//! until `VHOST_USER_F_PROTOCOL_FEATURES` has been acked, and drops the connection. The
//! spec's "negotiated" allows either reading. The relay acknowledges early enables itself
//! and replays them right after `SET_FEATURES`, so both sides see what they expect.
//! Everything else, file descriptors included, passes through unchanged.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const HEADER: usize = 12;
const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// The vhost crate accepts at most this many fds per message.
const MAX_FDS: usize = 32;
/// No vhost-user message this relay passes is larger (memory tables are the biggest).
const MAX_PAYLOAD: usize = 64 * 1024;

/// Relays until either side closes. Runs on the calling thread (front-end → back-end);
/// replies are copied back on a second thread.
pub fn relay(front: UnixStream, back: UnixStream) -> io::Result<()> {
    let mut front_reply = front.try_clone()?;
    let mut back_reply = back.try_clone()?;
    let copier = std::thread::Builder::new()
        .name("vhost-user-relay".into())
        .spawn(move || {
            // Replies carry no file descriptors in the messages this device handles.
            let _ = io::copy(&mut back_reply, &mut front_reply);
            let _ = front_reply.shutdown(std::net::Shutdown::Both);
        })?;
    let result = forward_requests(&front, &back);
    let _ = back.shutdown(std::net::Shutdown::Both);
    let _ = front.shutdown(std::net::Shutdown::Both);
    let _ = copier.join();
    result
}

fn forward_requests(front: &UnixStream, back: &UnixStream) -> io::Result<()> {
    let mut features_seen = false;
    let mut held: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut header = [0u8; HEADER];
        let mut raw_fds = [-1 as RawFd; MAX_FDS];
        let mut iov = [libc::iovec {
            iov_base: header.as_mut_ptr() as *mut libc::c_void,
            iov_len: HEADER,
        }];
        // SAFETY: the iovec points at `header`, which may hold any bytes.
        let (got, nfds) = unsafe { front.recv_with_fds(&mut iov, &mut raw_fds) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        // Own the fds at once so every path out closes them.
        // SAFETY: recvmsg handed us these fds; nobody else owns them.
        let fds: Vec<OwnedFd> = raw_fds[..nfds]
            .iter()
            .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) })
            .collect();
        if got == 0 {
            return Ok(());
        }
        (&*front).read_exact(&mut header[got..])?;
        let code = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let flags = u32::from_le_bytes(header[4..8].try_into().unwrap());
        let size = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize;
        if size > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("vhost-user message of {size} bytes"),
            ));
        }
        let mut message = header.to_vec();
        message.resize(HEADER + size, 0);
        (&*front).read_exact(&mut message[HEADER..])?;

        if code == SET_VRING_ENABLE && !features_seen {
            if flags & FLAG_NEED_REPLY != 0 {
                // Acknowledge as the back-end would: success.
                let mut ack = Vec::with_capacity(HEADER + 8);
                ack.extend_from_slice(&SET_VRING_ENABLE.to_le_bytes());
                ack.extend_from_slice(&(FLAG_VERSION_1 | FLAG_REPLY).to_le_bytes());
                ack.extend_from_slice(&8u32.to_le_bytes());
                ack.extend_from_slice(&0u64.to_le_bytes());
                (&*front).write_all(&ack)?;
            }
            // Replayed later without asking for a reply the front-end would not expect.
            let cleared = flags & !FLAG_NEED_REPLY;
            message[4..8].copy_from_slice(&cleared.to_le_bytes());
            held.push(message);
            continue;
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        back.send_with_fds(&[message.as_slice()], &raw)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        drop(fds);
        if code == SET_FEATURES {
            features_seen = true;
            for m in held.drain(..) {
                (&*back).write_all(&m)?;
            }
        }
    }
}
