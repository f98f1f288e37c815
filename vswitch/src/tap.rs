//! Tap ports: a Linux tap device (`/dev/net/tun`, IFF_TAP | IFF_NO_PI) whose frames enter
//! the switch from a reader thread, and to which egress frames are written. A tap the port
//! created disappears when the port is dropped; an existing persistent tap is attached to.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::port::{PortId, PortSink, VlanMode};
use crate::switch::Switch;

const TUNSETIFF: libc::c_ulong = 0x400454ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETOFFLOAD: libc::c_ulong = 0x400454d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x400454d8;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;
/// Largest frame read from a tap (no offloads: MTU-sized frames, with room to spare so
/// an oversize frame is seen as oversize, not truncated).
const READ_BUFFER: usize = 65536 + 256;

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap device.
pub struct Tap {
    file: File,
    name: String,
    /// Frames carry a virtio-net header (IFF_VNET_HDR) and may be GSO/partial-checksum.
    offloads: bool,
}

impl Tap {
    /// Creates the tap `name`, or attaches to it if it exists (and is free), for plain
    /// MTU-sized frames.
    pub fn open(name: &str) -> io::Result<Tap> {
        Self::open_with(name, false)
    }

    /// Like [`Tap::open`]; with `offloads` the kernel hands over (and takes) TCP segments
    /// of up to 64 KiB with checksums left undone, behind a virtio-net header. Worth it
    /// when the frames go to other offload-capable ports (taps, virtio NICs); ports that
    /// are not get finished checksums, and no GSO frames (those are dropped, counted).
    pub fn open_with(name: &str, offloads: bool) -> io::Result<Tap> {
        check_name(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|e| io::Error::new(e.kind(), format!("opening /dev/net/tun: {e}")))?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | if offloads { IFF_VNET_HDR } else { 0 },
            _pad: [0; 22],
        };
        for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        // SAFETY: TUNSETIFF reads and writes an ifreq we own, on a tun fd we own.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), explain_tunsetiff(name, &e)));
        }
        if offloads {
            let hdr_len: libc::c_int = crate::offload::VNET_HDR_LEN as libc::c_int;
            let features = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
            // SAFETY: TUNSETVNETHDRSZ reads an int we own; TUNSETOFFLOAD takes its
            // argument by value.
            let ok = unsafe {
                libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) == 0
                    && libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, features as libc::c_ulong) == 0
            };
            if !ok {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(
                    e.kind(),
                    format!("enabling offloads on tap {name}: {e}"),
                ));
            }
        }
        Ok(Tap {
            file,
            name: name.to_owned(),
            offloads,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// What went wrong when TUNSETIFF refused `name`, in words that say what to do.
fn explain_tunsetiff(name: &str, e: &io::Error) -> String {
    let sys = std::path::Path::new("/sys/class/net").join(name);
    let exists = sys.exists();
    let is_tun = sys.join("tun_flags").exists();
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            format!("creating tap {name}: {e} (needs CAP_NET_ADMIN, or a persistent tap owned by this user)")
        }
        Some(libc::EINVAL) if exists && !is_tun => {
            format!("{name} exists and is not a tap: choose another name")
        }
        Some(libc::EINVAL) if is_tun => {
            format!("{name} is a tun device, not a tap: choose another name")
        }
        Some(libc::EBUSY) if is_tun => {
            format!("tap {name} is in use (another program, or this switch, has it open)")
        }
        _ => format!("creating tap {name}: {e}"),
    }
}

/// Whether `name` can name a network interface: 1-15 bytes, no '/', NUL or whitespace.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && !name.contains(['/', '\0'])
        && !name.contains(char::is_whitespace)
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{name}' is not a valid interface name (1-15 bytes, no '/' or spaces)"
        ))
    }
}

struct TapSink {
    file: File,
    name: String,
    offloads: bool,
}

impl TapSink {
    fn write_with_header(&self, hdr: &[u8], frame: &[u8]) -> io::Result<()> {
        // One writev is one frame; writes on a shared fd are thread-safe.
        (&self.file)
            .write_vectored(&[io::IoSlice::new(hdr), io::IoSlice::new(frame)])
            .map(drop)
    }
}

impl PortSink for TapSink {
    fn transmit(&self, frame: &[u8]) -> io::Result<()> {
        if self.offloads {
            self.write_with_header(&[0u8; crate::offload::VNET_HDR_LEN], frame)
        } else {
            (&self.file).write(frame).map(drop)
        }
    }
    fn offloads(&self) -> bool {
        self.offloads
    }
    fn transmit_offloaded(&self, hdr: &crate::offload::VnetHdr, frame: &[u8]) -> io::Result<()> {
        self.write_with_header(&hdr.to_bytes(), frame)
    }
    fn kind(&self) -> &'static str {
        "tap"
    }
    fn describe(&self) -> String {
        self.name.clone()
    }
}

/// A tap attached to a switch. Dropping it stops its reader, removes the port and closes
/// the tap (which removes the interface if the port created it non-persistent).
pub struct TapPort {
    switch: Arc<Switch>,
    id: PortId,
    name: String,
    stop: OwnedFd,
    reader: Option<JoinHandle<()>>,
}

impl TapPort {
    pub fn attach(switch: &Arc<Switch>, tap: Tap, vlan: VlanMode) -> io::Result<TapPort> {
        let reader_file = tap.file.try_clone()?;
        let offloads = tap.offloads;
        let sink = Arc::new(TapSink {
            file: tap.file,
            name: tap.name.clone(),
            offloads,
        });
        let id = switch.try_add_port(sink, vlan, None)?;
        // SAFETY: eventfd with valid flags; the fd is owned by the OwnedFd on success.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            switch.remove_port(id);
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd was just created and is owned by nobody else.
        let stop = unsafe { OwnedFd::from_raw_fd(efd) };
        let stop_raw = stop.as_raw_fd();
        let sw = switch.clone();
        let reader = std::thread::Builder::new()
            .name(format!("tap-{}", tap.name))
            .spawn(move || read_loop(sw, id, reader_file, stop_raw, offloads))?;
        Ok(TapPort {
            switch: switch.clone(),
            id,
            name: tap.name,
            stop,
            reader: Some(reader),
        })
    }

    pub fn id(&self) -> PortId {
        self.id
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

fn read_loop(switch: Arc<Switch>, id: PortId, mut tap: File, stop: libc::c_int, offloads: bool) {
    let mut buf = vec![0u8; READ_BUFFER];
    let mut fds = [
        libc::pollfd {
            fd: tap.as_raw_fd(),
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
        if r < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        if fds[1].revents != 0 {
            break;
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            tracing::warn!(port = id, "tap went away");
            break;
        }
        // One read per wake-up: poll said a frame is there, so the (blocking) read returns
        // at once. Draining until EAGAIN would cost a third syscall per frame whenever the
        // reader keeps up, which is the common case.
        match tap.read(&mut buf) {
            Ok(0) => {}
            Ok(n) if offloads => {
                // The kernel always writes the header first; a read shorter than it has
                // nothing to forward.
                if let Some(hdr) = crate::offload::VnetHdr::parse(&buf[..n]) {
                    switch.ingress_offloaded(id, &hdr, &buf[crate::offload::VNET_HDR_LEN..n]);
                }
            }
            Ok(n) => switch.ingress(id, &buf[..n]),
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
    }
}

impl Drop for TapPort {
    fn drop(&mut self) {
        crate::port::signal_eventfd(&self.stop);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.switch.remove_port(self.id);
    }
}
