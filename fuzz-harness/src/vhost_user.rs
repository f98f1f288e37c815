//! `vhost_user`: a front-end's messages, as bytes and file descriptors on a unix socket,
//! into vmbuild's two vhost-user back-ends as they really listen: a share server
//! ([`virtiofs_bridge::ShareServer`], the store) and a vhost-user-net switch port
//! ([`vswitch::vhost_user_net::VhostUserNetPort`], through its relay). Both serve one
//! front-end after another for the life of the process; every input is one connection.
//!
//! Input: `target[1]` (bit 0: the net port, else the share), then records:
//! * `code[1] flags[1] len[2] payload[len]` (code below 0xf0): a message with request
//!   code `code & 0x3f`. Flags: bit 0 NEED_REPLY, bit 1 a wrong version in the header,
//!   bit 2 a size field 8 bytes longer than the payload, bits 3-5 the file descriptors
//!   sent with it: none, the guest memory (a 1 MiB memfd), an eventfd (kept for kicks),
//!   /dev/null, a directory, the memory twice, a 4 KiB memfd, a pipe;
//! * `0xf0 + i`: a kick of the `i`-th eventfd sent (the back-end then reads the rings);
//! * `0xf8.. off[4] len[1] bytes[len]`: the front-end writes its guest memory.
//!
//! Checked: no back-end thread panics or dies of a signal (a mapping past the end of a
//! file it was sent would be SIGBUS); every reply is a reply with a sane size; after
//! the connection closes, the back-end serves a well-formed front-end at once (the share
//! answers INIT and GETATTR, the port forwards a frame the guest sends); the share
//! server has not stopped; the store is unchanged.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use virtiofs_bridge::{ShareConfig, ShareServer};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vswitch::vhost_user_net::VhostUserNetPort;
use vswitch::{InProcessPort, Switch, SwitchConfig, VlanMode};

use crate::common::{env, Input};

/// Target bit: the net port.
pub const NET: u8 = 1;
pub const FLAG_NEED_REPLY: u8 = 1;
pub const FLAG_BAD_VERSION: u8 = 2;
pub const FLAG_LONG_SIZE: u8 = 4;
/// File descriptors to send (flags bits 3-5).
pub const FD_NONE: u8 = 0;
pub const FD_MEMORY: u8 = 1 << 3;
pub const FD_EVENT: u8 = 2 << 3;
pub const FD_NULL: u8 = 3 << 3;
pub const FD_DIR: u8 = 4 << 3;
pub const FD_MEMORY_TWICE: u8 = 5 << 3;
pub const FD_SMALL_MEMFD: u8 = 6 << 3;
pub const FD_PIPE: u8 = 7 << 3;
pub const KICK: u8 = 0xf0;
pub const WRITE_MEM: u8 = 0xf8;

/// The front-end's guest memory: one memfd this size.
pub const MEM_SIZE: usize = 1 << 20;

struct Servers {
    /// Only touched under the mutex (`ShareServer` is `Send`, not `Sync`).
    fs: std::sync::Mutex<ShareServer>,
    fs_socket: PathBuf,
    _switch: Arc<Switch>,
    net: VhostUserNetPort,
    net_socket: PathBuf,
    /// Where frames the net port's guest sends come out.
    wire: InProcessPort,
}

fn servers() -> &'static Servers {
    static S: OnceLock<Servers> = OnceLock::new();
    S.get_or_init(|| {
        let env = env();
        let dir = env.base().join("vhost-user");
        std::fs::create_dir_all(&dir).unwrap();
        let fs_socket = dir.join("fs.sock");
        let fs = ShareServer::spawn(ShareConfig::store(env.store()), &fs_socket).unwrap();
        let switch = Switch::new(SwitchConfig::default());
        let net_socket = dir.join("net.sock");
        let net =
            VhostUserNetPort::listen_in(&switch, &net_socket, VlanMode::Access { vlan: 1 }, &dir)
                .unwrap();
        let wire = InProcessPort::attach(&switch, "wire", VlanMode::Access { vlan: 1 });
        Servers {
            fs: std::sync::Mutex::new(fs),
            fs_socket,
            _switch: switch,
            net,
            net_socket,
            wire,
        }
    })
}

fn memfd(name: &str, len: usize) -> OwnedFd {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a NUL-terminated name; the fd is owned at once.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: fd was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on our own descriptor.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) }, 0);
    fd
}

/// The front-end side of one connection.
struct Front {
    sock: UnixStream,
    memory: OwnedFd,
    events: Vec<EventFd>,
    replies: std::thread::JoinHandle<Vec<u8>>,
}

impl Front {
    fn connect(path: &std::path::Path) -> Front {
        let sock = UnixStream::connect(path).expect("connecting to the back-end");
        let mut reader = sock.try_clone().unwrap();
        let replies = std::thread::spawn(move || {
            let mut all = Vec::new();
            let _ = reader.read_to_end(&mut all);
            all
        });
        Front {
            sock,
            memory: memfd("fuzz-guest-memory", MEM_SIZE),
            events: Vec::new(),
            replies,
        }
    }

    fn send(&mut self, code: u32, flags: u8, payload: &[u8]) {
        let mut hdr_flags = if flags & FLAG_BAD_VERSION != 0 {
            0x2
        } else {
            0x1
        };
        if flags & FLAG_NEED_REPLY != 0 {
            hdr_flags |= 0x8;
        }
        let size = payload.len() as u32 + if flags & FLAG_LONG_SIZE != 0 { 8 } else { 0 };
        let mut msg = code.to_le_bytes().to_vec();
        msg.extend_from_slice(&u32::to_le_bytes(hdr_flags));
        msg.extend_from_slice(&size.to_le_bytes());
        msg.extend_from_slice(payload);
        let mut keep: Vec<OwnedFd> = Vec::new();
        match flags & (7 << 3) {
            FD_MEMORY => keep.push(self.memory.try_clone().unwrap()),
            FD_EVENT => {
                let e = EventFd::new(libc::EFD_NONBLOCK).unwrap();
                // SAFETY: dup of an eventfd we own; the copy is owned by `keep`.
                keep.push(unsafe { OwnedFd::from_raw_fd(libc::dup(e.as_raw_fd())) });
                self.events.push(e);
            }
            FD_NULL => keep.push(std::fs::File::open("/dev/null").unwrap().into()),
            FD_DIR => keep.push(std::fs::File::open(env().store()).unwrap().into()),
            FD_MEMORY_TWICE => {
                keep.push(self.memory.try_clone().unwrap());
                keep.push(self.memory.try_clone().unwrap());
            }
            FD_SMALL_MEMFD => keep.push(memfd("fuzz-small", 4096)),
            FD_PIPE => {
                let mut p = [0; 2];
                // SAFETY: pipe2 into an array of two.
                assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
                // SAFETY: both ends were just created and are owned by nobody else.
                unsafe {
                    keep.push(OwnedFd::from_raw_fd(p[0]));
                    keep.push(OwnedFd::from_raw_fd(p[1]));
                }
                keep.truncate(1);
            }
            _ => {}
        }
        let fds: Vec<RawFd> = keep.iter().map(|f| f.as_raw_fd()).collect();
        // A back-end that gave up on the connection: the rest of the input goes nowhere.
        let _ = self.sock.send_with_fds(&[&msg[..]], &fds);
    }

    fn write_memory(&self, off: u64, bytes: &[u8]) {
        let off = off % MEM_SIZE as u64;
        // SAFETY: pwrite from a valid buffer into our own memfd.
        unsafe {
            libc::pwrite(
                self.memory.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                off as i64,
            )
        };
    }

    /// Closes the connection and waits until the back-end has closed its end.
    fn close(self) -> Vec<u8> {
        let _ = self.sock.shutdown(std::net::Shutdown::Write);
        self.replies.join().expect("the reply reader")
    }
}

/// Waits (up to what is left of `budget` for the input) until the back-end has read a
/// kick, and a little more for it to serve the ring: kicks are handled on the back-end's
/// own thread, and the input's next message should meet what the kick did.
fn wait_taken(e: &EventFd, budget: &mut Duration) {
    let start = std::time::Instant::now();
    loop {
        let mut p = libc::pollfd {
            fd: e.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut p, 1, 0) };
        if ready <= 0 || start.elapsed() >= *budget {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    std::thread::sleep(Duration::from_millis(1));
    *budget = budget.saturating_sub(start.elapsed());
}

/// Replies are well-formed vhost-user replies.
fn check_replies(mut bytes: &[u8]) {
    while bytes.len() >= 12 {
        let flags = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
        let size = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        assert_ne!(
            flags & 0x4,
            0,
            "a message from the back-end that is not a reply"
        );
        assert!(size <= 0x1000, "a reply of {size} bytes");
        bytes = &bytes[(12 + size).min(bytes.len())..];
    }
}

pub fn run(data: &[u8]) {
    crate::common::harness_thread();
    let env = env();
    let s = servers();
    let mut input = Input::new(data);
    let net = input.u8() & NET != 0;
    let mut front = Front::connect(if net { &s.net_socket } else { &s.fs_socket });
    let mut kick_wait = Duration::from_millis(100);
    while !input.is_empty() {
        let code = input.u8();
        match code {
            KICK..=0xf7 => {
                if let Some(e) = front.events.get(usize::from(code - KICK)) {
                    let _ = e.write(1);
                    wait_taken(e, &mut kick_wait);
                }
            }
            WRITE_MEM..=0xff => {
                let off = u64::from(input.u32());
                let n = usize::from(input.u8());
                front.write_memory(off, input.take(n));
            }
            _ => {
                let flags = input.u8();
                let payload = input.record();
                front.send(u32::from(code & 0x3f), flags, payload);
            }
        }
    }
    let replies = front.close();
    check_replies(&replies);
    crate::common::check_no_panic_elsewhere();
    if net {
        net_still_serves(s);
    } else {
        fs_still_serves(s);
    }
    let failure = s.fs.lock().unwrap().failure();
    assert!(failure.is_none(), "the share server stopped: {failure:?}");
    let _ = &s.net;
    env.check_unchanged();
    crate::common::check_no_panic_elsewhere();
}

fn fs_still_serves(s: &Servers) {
    let front = vmbuild_tests::vhost_frontend::FsFrontend::connect(&s.fs_socket)
        .expect("a well-formed front-end after the input");
    let mut client = vmbuild_tests::fuse_client::FuseClient::new(front);
    client.init().expect("INIT after the input");
    client
        .getattr(1)
        .expect("GETATTR of the root after the input");
}

fn net_still_serves(s: &Servers) {
    use vmbuild_tests::vhost_frontend::FsFrontend;
    while s.wire.try_recv().is_some() {}
    let mut front =
        FsFrontend::connect(&s.net_socket).expect("a well-formed front-end after the input");
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&[2, 0, 0, 0, 0x77, 1, 0x08, 0x00]);
    frame.extend_from_slice(&[0x45; 46]);
    // The guest transmits on queue 1.
    front.submit(1, 0, &frame, 0).unwrap();
    front.kick(1).unwrap();
    // A frame of the input's session may still arrive (its queue threads end after it).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let got = s
            .wire
            .recv_timeout(left)
            .expect("the port did not forward the frame sent after the input");
        if got == frame[12..] {
            break;
        }
    }
    drop(front);
}
