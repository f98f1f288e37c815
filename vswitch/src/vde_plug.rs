//! VDE plug ports: the data socket of `vde_switch -s DIR`, so that QEMU's
//! `-netdev vde,sock=DIR`, `vde_plug DIR` and anything else built on libvdeplug can
//! connect to this switch as they would to vde_switch.
//!
//! The protocol (vde2's `datasock.c` and libvdeplug's `vde` module):
//!
//! 1. The switch listens on a stream socket `DIR/ctl`.
//! 2. A client binds a datagram socket of its own (normally `DIR/.PID-N`), connects to
//!    `DIR/ctl` and sends one `struct request_v3`: magic `0xfeedface`, version 3, a type
//!    (`REQ_NEW_CONTROL`, with a wanted port number in the bits above the low byte, 0 for
//!    any), the `sockaddr_un` of its datagram socket and a description.
//! 3. The switch makes a datagram socket for the new port in DIR (`DIR/NNN.M`), connects it
//!    to the client's socket and answers with that socket's `sockaddr_un`.
//! 4. Frames travel as one raw Ethernet frame per datagram, both ways; the port lives as
//!    long as the control connection.
//!
//! Requests that are not this (another magic or version, a short read, a socket outside
//! DIR and libvdeplug's fallback directories, a socket that is not the caller's) are
//! refused, logged and counted; the connection is closed and the switch serves on.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::port::{PortId, PortSink, VlanMode};
use crate::sockfile::{self, SocketFile};
use crate::switch::Switch;

pub const SWITCH_MAGIC: u32 = 0xfeed_face;
pub const VERSION: u32 = 3;
pub const REQ_NEW_CONTROL: u32 = 0;
pub const REQ_NEW_PORT0: u32 = 1;
/// `sizeof(struct sockaddr_un)` on Linux.
pub const SOCKADDR_UN_LEN: usize = 110;
/// magic, version, type, sockaddr_un: the fixed part of a request.
pub const REQUEST_HEADER: usize = 12 + SOCKADDR_UN_LEN;
/// libvdeplug's MAXDESCR.
const MAX_DESCRIPTION: usize = 128;
/// A client that connects and says nothing is dropped after this long.
const REQUEST_PATIENCE: Duration = Duration::from_secs(5);
/// Largest datagram read from a client (a frame; the switch drops oversize ones).
const RECV_BUFFER: usize = 65536 + 256;
/// Datagrams handled per wake-up before looking at the control socket again.
const BURST: usize = 64;
/// Where libvdeplug puts its data socket when it cannot bind in DIR.
const FALLBACK_DIRS: [&str; 4] = ["/run", "/var/run", "/var/tmp", "/tmp"];

/// Permissions of what the server makes.
#[derive(Debug, Clone)]
pub struct VdeOptions {
    /// Mode of `DIR/ctl` and the per-port data sockets (vde_switch `-m`; 0600 there too).
    pub mode: u32,
    /// Mode of DIR when the server creates it (vde_switch `--dirmode`).
    pub dir_mode: u32,
    /// Group given to DIR and the sockets (vde_switch `-g`).
    pub group: Option<u32>,
    /// VLAN membership of every port made through this directory.
    pub vlan: VlanMode,
}

impl Default for VdeOptions {
    fn default() -> Self {
        VdeOptions {
            mode: 0o600,
            dir_mode: 0o700,
            group: None,
            vlan: VlanMode::default(),
        }
    }
}

impl VdeOptions {
    /// vde_switch's rule for the directory's mode when only `-m` is given: each class that
    /// may read or write the sockets may also search the directory.
    pub fn dir_mode_for(mode: u32) -> u32 {
        let mut dir = mode & 0o777;
        for (rw, x) in [(0o600, 0o100), (0o060, 0o010), (0o006, 0o001)] {
            if mode & rw != 0 {
                dir |= x;
            }
        }
        dir | 0o700
    }
}

/// A parsed `struct request_v3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The port asked for (0: any).
    pub port: u32,
    /// The client's data socket.
    pub socket: PathBuf,
    pub description: String,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("short request: {0} bytes, a request_v3 has at least {REQUEST_HEADER}")]
    Short(usize),
    #[error("bad magic {0:#x} (not a VDE client)")]
    Magic(u32),
    #[error("request version {0}: only version 3 is spoken")]
    Version(u32),
    #[error("request type {0}: only REQ_NEW_CONTROL is served")]
    Type(u32),
    #[error("port 0 (vde_switch's management port) cannot be asked for")]
    Port0,
    #[error("the data socket address is not AF_UNIX")]
    Family,
    #[error("the data socket has no path (unnamed or abstract)")]
    NoPath,
    #[error("the data socket {0} is not absolute")]
    Relative(String),
    #[error(
        "the data socket {0} is outside the switch directory and libvdeplug's fallback directories"
    )]
    Outside(String),
    #[error("the data socket {0} is not a socket")]
    NotSocket(String),
    #[error("the data socket {0} does not belong to the connecting user")]
    NotOwner(String),
    #[error("{0}")]
    Port(String),
}

/// Parses a request as vde_switch does (one read of up to 256 bytes).
pub fn parse_request(buf: &[u8]) -> Result<Request, Refusal> {
    if buf.len() < 4 {
        return Err(Refusal::Short(buf.len()));
    }
    let word = |i: usize| u32::from_ne_bytes(buf[i..i + 4].try_into().unwrap());
    if word(0) != SWITCH_MAGIC {
        return Err(Refusal::Magic(word(0)));
    }
    if buf.len() < 8 {
        return Err(Refusal::Short(buf.len()));
    }
    if word(4) != VERSION {
        return Err(Refusal::Version(word(4)));
    }
    if buf.len() < REQUEST_HEADER {
        return Err(Refusal::Short(buf.len()));
    }
    let kind = word(8);
    match kind & 0xff {
        REQ_NEW_CONTROL => {}
        REQ_NEW_PORT0 => return Err(Refusal::Port0),
        _ => return Err(Refusal::Type(kind)),
    }
    let family = u16::from_ne_bytes([buf[12], buf[13]]);
    if family != libc::AF_UNIX as u16 {
        return Err(Refusal::Family);
    }
    let raw = &buf[14..REQUEST_HEADER];
    let end = raw.iter().position(|b| *b == 0).ok_or(Refusal::NoPath)?;
    if end == 0 {
        return Err(Refusal::NoPath);
    }
    let socket = PathBuf::from(OsStr::from_bytes(&raw[..end]));
    let descr = &buf[REQUEST_HEADER..buf.len().min(REQUEST_HEADER + MAX_DESCRIPTION)];
    let descr = &descr[..descr.iter().position(|b| *b == 0).unwrap_or(descr.len())];
    let description: String = String::from_utf8_lossy(descr)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    Ok(Request {
        port: kind >> 8,
        socket,
        description: description.trim().to_owned(),
    })
}

/// Encodes a request as libvdeplug sends it (for tests and benchmarks).
pub fn encode_request(port: u32, socket: &Path, description: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(REQUEST_HEADER + description.len());
    out.extend_from_slice(&SWITCH_MAGIC.to_ne_bytes());
    out.extend_from_slice(&VERSION.to_ne_bytes());
    out.extend_from_slice(&(REQ_NEW_CONTROL | (port << 8)).to_ne_bytes());
    out.extend_from_slice(&sockaddr_un(socket));
    out.extend_from_slice(description.as_bytes());
    out
}

/// `struct sockaddr_un` for `path` (truncated to fit, NUL-terminated).
fn sockaddr_un(path: &Path) -> [u8; SOCKADDR_UN_LEN] {
    let mut out = [0u8; SOCKADDR_UN_LEN];
    out[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
    let bytes = path.as_os_str().as_bytes();
    let n = bytes.len().min(SOCKADDR_UN_LEN - 3);
    out[2..2 + n].copy_from_slice(&bytes[..n]);
    out
}

/// Decodes the switch's answer: the path of the port's data socket.
pub fn decode_reply(buf: &[u8]) -> Option<PathBuf> {
    if buf.len() < 3 || u16::from_ne_bytes([buf[0], buf[1]]) != libc::AF_UNIX as u16 {
        return None;
    }
    let raw = &buf[2..buf.len().min(SOCKADDR_UN_LEN)];
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    (end > 0).then(|| PathBuf::from(OsStr::from_bytes(&raw[..end])))
}

/// The switch's side of one VDE port: its data socket, connected to the client's.
struct VdeSink {
    data: OnceLock<UnixDatagram>,
    endpoint: OnceLock<String>,
}

impl PortSink for VdeSink {
    fn transmit(&self, frame: &[u8]) -> io::Result<()> {
        match self.data.get() {
            // Non-blocking: a client that does not keep up loses frames, as on a wire.
            Some(d) => d.send(frame).map(drop),
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "port not ready",
            )),
        }
    }
    fn kind(&self) -> &'static str {
        "vde"
    }
    fn describe(&self) -> String {
        self.endpoint.get().cloned().unwrap_or_default()
    }
}

/// Counters of a VDE directory.
#[derive(Debug, Default)]
struct Stats {
    accepted: AtomicU64,
    refused: AtomicU64,
}

/// One control connection: its port number once it has one, a handle to close it, its
/// thread.
struct Conn {
    port: Arc<AtomicU32>,
    ctl: UnixStream,
    thread: JoinHandle<()>,
}

struct Shared {
    switch: Arc<Switch>,
    dir: PathBuf,
    options: VdeOptions,
    stats: Stats,
    conns: Mutex<Vec<Conn>>,
    seq: AtomicU64,
}

/// A VDE switch directory being served: `DIR/ctl` and a port per client. Dropping it
/// closes every client's port, removes the sockets it made and DIR if it made DIR (and
/// DIR is empty by then).
pub struct VdePlugServer {
    shared: Arc<Shared>,
    stop: Arc<OwnedFd>,
    accept: Option<JoinHandle<()>>,
    ctl: Option<SocketFile>,
    made_dir: bool,
}

impl VdePlugServer {
    /// Serves `dir` (created if missing, as vde_switch does); `dir/ctl` must not exist.
    pub fn start(switch: &Arc<Switch>, dir: &Path, options: VdeOptions) -> io::Result<Self> {
        let made_dir = match std::fs::create_dir(dir) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("creating {}: {e}", dir.display()),
                ))
            }
        };
        let result = Self::start_in(switch, dir, options, made_dir);
        if result.is_err() && made_dir {
            let _ = std::fs::remove_dir(dir);
        }
        result
    }

    fn start_in(
        switch: &Arc<Switch>,
        dir: &Path,
        options: VdeOptions,
        made_dir: bool,
    ) -> io::Result<Self> {
        if made_dir {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(options.dir_mode))?;
            chgrp(dir, options.group)?;
        }
        let dir = std::fs::canonicalize(dir)?;
        if !dir.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a directory", dir.display()),
            ));
        }
        let (listener, ctl) = sockfile::bind_listener(&dir.join("ctl"))?;
        std::fs::set_permissions(ctl.path(), std::fs::Permissions::from_mode(options.mode))?;
        chgrp(ctl.path(), options.group)?;
        // SAFETY: eventfd with valid flags; the fd is owned by the OwnedFd below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd was just created and is owned by nobody else.
        let stop = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        let shared = Arc::new(Shared {
            switch: switch.clone(),
            dir,
            options,
            stats: Stats::default(),
            conns: Mutex::new(Vec::new()),
            seq: AtomicU64::new(0),
        });
        let (sh, st) = (shared.clone(), stop.clone());
        let accept = std::thread::Builder::new()
            .name("vde-ctl".into())
            .spawn(move || accept_loop(sh, listener, st))?;
        Ok(VdePlugServer {
            shared,
            stop,
            accept: Some(accept),
            ctl: Some(ctl),
            made_dir,
        })
    }

    /// The directory (canonical).
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Ports made so far.
    pub fn accepted(&self) -> u64 {
        self.shared.stats.accepted.load(Relaxed)
    }

    /// Requests refused so far.
    pub fn refused(&self) -> u64 {
        self.shared.stats.refused.load(Relaxed)
    }

    /// Closes the client connection behind port `id`; false if no client has that port.
    pub fn disconnect(&self, id: PortId) -> bool {
        let conns = self.shared.conns.lock().unwrap();
        match conns.iter().find(|c| c.port.load(Relaxed) == id) {
            Some(c) => {
                let _ = c.ctl.shutdown(std::net::Shutdown::Both);
                true
            }
            None => false,
        }
    }
}

impl Drop for VdePlugServer {
    fn drop(&mut self) {
        crate::port::signal_eventfd(&self.stop);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let conns: Vec<Conn> = self.shared.conns.lock().unwrap().drain(..).collect();
        for c in &conns {
            let _ = c.ctl.shutdown(std::net::Shutdown::Both);
        }
        for c in conns {
            let _ = c.thread.join();
        }
        // Then DIR/ctl, and DIR only if it was made here and nothing else is left in it.
        drop(self.ctl.take());
        if self.made_dir {
            if let Err(e) = std::fs::remove_dir(&self.shared.dir) {
                tracing::debug!("leaving {}: {e}", self.shared.dir.display());
            }
        }
    }
}

fn chgrp(path: &Path, group: Option<u32>) -> io::Result<()> {
    let Some(gid) = group else { return Ok(()) };
    std::os::unix::fs::lchown(path, None, Some(gid))
        .map_err(|e| io::Error::new(e.kind(), format!("chgrp {}: {e}", path.display())))
}

/// Waits for `fds` (all POLLIN); returns their revents, or None when `stop` fired.
fn wait(fds: &[libc::c_int], stop: libc::c_int) -> Option<Vec<libc::c_short>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .chain(std::iter::once(&stop))
        .map(|fd| libc::pollfd {
            fd: *fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: a valid array of pollfds.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        let last = pfds.len() - 1;
        if r < 0 || pfds[last].revents != 0 {
            return None;
        }
        return Some(pfds[..last].iter().map(|p| p.revents).collect());
    }
}

fn accept_loop(shared: Arc<Shared>, listener: UnixListener, stop: Arc<OwnedFd>) {
    while wait(&[listener.as_raw_fd()], stop.as_raw_fd()).is_some() {
        let Ok((ctl, _)) = listener.accept() else {
            continue;
        };
        let Ok(handle) = ctl.try_clone() else {
            continue;
        };
        let port = Arc::new(AtomicU32::new(0));
        let (sh, st, p) = (shared.clone(), stop.clone(), port.clone());
        let thread = std::thread::Builder::new()
            .name("vde-port".into())
            .spawn(move || serve(&sh, ctl, st.as_raw_fd(), &p));
        let mut conns = shared.conns.lock().unwrap();
        // Forget connections that have ended (their threads are done).
        let (done, live): (Vec<Conn>, Vec<Conn>) =
            conns.drain(..).partition(|c| c.thread.is_finished());
        *conns = live;
        for c in done {
            let _ = c.thread.join();
        }
        match thread {
            Ok(thread) => conns.push(Conn {
                port,
                ctl: handle,
                thread,
            }),
            Err(e) => tracing::warn!("vde: cannot serve a connection: {e}"),
        }
    }
}

/// Serves one control connection: the request, then the port until either side ends it.
/// The connection is shut down on the way out (the server holds a clone of it, so
/// dropping this one would not close it).
fn serve(shared: &Shared, ctl: UnixStream, stop: libc::c_int, slot: &AtomicU32) {
    serve_port(shared, &ctl, stop, slot);
    let _ = ctl.shutdown(std::net::Shutdown::Both);
}

fn serve_port(shared: &Shared, ctl: &UnixStream, stop: libc::c_int, slot: &AtomicU32) {
    let (id, sink, data, _file) = match handshake(shared, ctl) {
        Ok(port) => port,
        Err(why) => {
            shared.stats.refused.fetch_add(1, Relaxed);
            tracing::warn!(dir = %shared.dir.display(), "vde: request refused: {why}");
            return;
        }
    };
    slot.store(id, Relaxed);
    shared.stats.accepted.fetch_add(1, Relaxed);
    tracing::info!(port = id, client = %sink.describe(), "vde port connected");
    let mut buf = vec![0u8; RECV_BUFFER];
    let mut scratch = [0u8; 256];
    'serve: while let Some(revents) = wait(&[ctl.as_raw_fd(), data.as_raw_fd()], stop) {
        if revents[1] & libc::POLLIN != 0 {
            for _ in 0..BURST {
                match data.recv(&mut buf) {
                    Ok(n) => shared.switch.ingress(id, &buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        if revents[0] != 0 {
            // The client says nothing more on the control socket; EOF (or an error) is
            // its going away.
            match (&*ctl).read(&mut scratch) {
                Ok(0) => break 'serve,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => break 'serve,
            }
        }
        if revents[1] & (libc::POLLERR | libc::POLLNVAL) != 0 {
            break;
        }
    }
    shared.switch.remove_port(id);
    tracing::info!(port = id, "vde port disconnected");
}

type Port = (PortId, Arc<VdeSink>, UnixDatagram, SocketFile);

fn handshake(shared: &Shared, ctl: &UnixStream) -> Result<Port, Refusal> {
    let _ = ctl.set_read_timeout(Some(REQUEST_PATIENCE));
    let mut buf = vec![0u8; REQUEST_HEADER + MAX_DESCRIPTION];
    let mut got = 0;
    // libvdeplug sends the request in one send(2); a stream may still split it.
    while got < REQUEST_HEADER {
        match (&*ctl).read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let request = parse_request(&buf[..got])?;
    let peer_uid = peer_uid(ctl);
    check_client_socket(&shared.dir, &request.socket, peer_uid)?;
    let client_uid = std::fs::symlink_metadata(&request.socket)
        .map(|m| m.uid())
        .ok();

    let sink = Arc::new(VdeSink {
        data: OnceLock::new(),
        endpoint: OnceLock::new(),
    });
    let at = (request.port != 0).then_some(request.port);
    let id = shared
        .switch
        .try_add_port(sink.clone(), shared.options.vlan.clone(), at)
        .map_err(|e| Refusal::Port(e.to_string()))?;
    let made = make_data_socket(shared, id, &request.socket, client_uid);
    let (data, file) = match made {
        Ok(d) => d,
        Err(e) => {
            shared.switch.remove_port(id);
            return Err(Refusal::Port(format!("port {id}: {e}")));
        }
    };
    // The port carries frames from the moment the client has its answer.
    let mut endpoint = file.path().display().to_string();
    if !request.description.is_empty() {
        endpoint.push_str(&format!(" ({})", request.description));
    }
    let _ = sink.endpoint.set(endpoint);
    let sending = data.try_clone().map_err(|e| {
        shared.switch.remove_port(id);
        Refusal::Port(e.to_string())
    })?;
    let _ = sink.data.set(sending);
    let reply = sockaddr_un(file.path());
    if let Err(e) = (&*ctl).write_all(&reply) {
        shared.switch.remove_port(id);
        return Err(Refusal::Port(format!("answering the client: {e}")));
    }
    let _ = ctl.set_read_timeout(None);
    let _ = ctl.set_nonblocking(true);
    Ok((id, sink, data, file))
}

fn make_data_socket(
    shared: &Shared,
    id: PortId,
    client: &Path,
    client_uid: Option<u32>,
) -> io::Result<(UnixDatagram, SocketFile)> {
    // A name left by an earlier switch (killed, so it could not clean up) is not ours to
    // remove: the next number is taken instead.
    let mut tries = 0;
    let (data, file) = loop {
        let seq = shared.seq.fetch_add(1, Relaxed);
        let path = shared.dir.join(format!("{id:03}.{seq}"));
        match sockfile::bind_datagram(&path) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 1000 => tries += 1,
            other => break other?,
        }
    };
    let path = file.path().to_owned();
    data.connect(client).map_err(|e| {
        io::Error::new(e.kind(), format!("connecting to {}: {e}", client.display()))
    })?;
    data.set_nonblocking(true)?;
    let opts = &shared.options;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    // As vde_switch: run by root, the port's socket goes to the client's user alone.
    let (mode, owner) = match (root, client_uid) {
        (true, Some(uid)) => (opts.mode & 0o700, Some(uid)),
        _ => (opts.mode, None),
    };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    if owner.is_some() || opts.group.is_some() {
        std::os::unix::fs::lchown(&path, owner, opts.group)?;
    }
    Ok((data, file))
}

fn peer_uid(ctl: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes a ucred of `len` bytes into `cred`, which we own.
    let r = unsafe {
        libc::getsockopt(
            ctl.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    (r == 0).then_some(cred.uid)
}

/// The client's data socket must be a socket of the connecting user, in the switch's
/// directory (with libvdeplug's `.`-name) or in one of libvdeplug's fallback directories:
/// the switch will send frames to it, and must not be made to send them anywhere else.
fn check_client_socket(dir: &Path, socket: &Path, peer_uid: Option<u32>) -> Result<(), Refusal> {
    let shown = || socket.display().to_string();
    if !socket.is_absolute() {
        return Err(Refusal::Relative(shown()));
    }
    let (Some(parent), Some(name)) = (socket.parent(), socket.file_name()) else {
        return Err(Refusal::Outside(shown()));
    };
    let parent = std::fs::canonicalize(parent).map_err(|_| Refusal::Outside(shown()))?;
    let name = name.as_bytes();
    let in_dir = parent == dir
        && name.starts_with(b".")
        && !name.starts_with(sockfile::TEMP_PREFIX.as_bytes());
    let in_fallback = FALLBACK_DIRS
        .iter()
        .any(|d| std::fs::canonicalize(d).is_ok_and(|d| d == parent));
    if !in_dir && !in_fallback {
        return Err(Refusal::Outside(shown()));
    }
    let meta = std::fs::symlink_metadata(socket).map_err(|_| Refusal::NotSocket(shown()))?;
    if !meta.file_type().is_socket() {
        return Err(Refusal::NotSocket(shown()));
    }
    match peer_uid {
        Some(0) => Ok(()),
        Some(uid) if uid == meta.uid() => Ok(()),
        _ => Err(Refusal::NotOwner(shown())),
    }
}

/// A client of a VDE switch, as libvdeplug connects (for tests and benchmarks): binds
/// `DIR/.PID-N`, asks for a port and connects to the answer.
pub struct VdeClient {
    pub ctl: UnixStream,
    pub data: UnixDatagram,
    /// The switch's data socket for this port.
    pub port_socket: PathBuf,
}

impl VdeClient {
    pub fn connect(dir: &Path, port: u32, description: &str) -> io::Result<VdeClient> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = std::fs::canonicalize(dir)?;
        let own = dir.join(format!(
            ".{:05}-{:05}",
            std::process::id(),
            SEQ.fetch_add(1, Relaxed)
        ));
        let (data, file) = sockfile::bind_datagram(&own)?;
        let mut ctl = UnixStream::connect(dir.join("ctl"))?;
        ctl.write_all(&encode_request(port, &own, description))?;
        let mut reply = [0u8; SOCKADDR_UN_LEN];
        let mut got = 0;
        while got < reply.len() {
            match ctl.read(&mut reply[got..])? {
                0 => break,
                n => got += n,
            }
        }
        let port_socket = decode_reply(&reply[..got]).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "the switch refused the port",
            )
        })?;
        data.connect(&port_socket)?;
        // Connected both ways: the name is not needed any more (libvdeplug removes it too).
        drop(file);
        Ok(VdeClient {
            ctl,
            data,
            port_socket,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_are_refused() {
        let req = encode_request(5, Path::new("/tmp/x/.00001-00000"), "QEMU user=root");
        let parsed = parse_request(&req).unwrap();
        assert_eq!(parsed.port, 5);
        assert_eq!(parsed.socket, Path::new("/tmp/x/.00001-00000"));
        assert_eq!(parsed.description, "QEMU user=root");

        assert_eq!(parse_request(&req[..3]), Err(Refusal::Short(3)));
        assert_eq!(parse_request(&req[..100]), Err(Refusal::Short(100)));
        let mut bad = req.clone();
        bad[0] ^= 1;
        assert!(matches!(parse_request(&bad), Err(Refusal::Magic(_))));
        let mut bad = req.clone();
        bad[4..8].copy_from_slice(&1u32.to_ne_bytes());
        assert_eq!(parse_request(&bad), Err(Refusal::Version(1)));
        let mut bad = req.clone();
        bad[8..12].copy_from_slice(&REQ_NEW_PORT0.to_ne_bytes());
        assert_eq!(parse_request(&bad), Err(Refusal::Port0));
        let mut bad = req.clone();
        bad[8..12].copy_from_slice(&7u32.to_ne_bytes());
        assert_eq!(parse_request(&bad), Err(Refusal::Type(7)));
        let mut bad = req.clone();
        bad[12] = 2;
        assert_eq!(parse_request(&bad), Err(Refusal::Family));
        let mut bad = req.clone();
        bad[14] = 0;
        assert_eq!(parse_request(&bad), Err(Refusal::NoPath));
        let mut bad = req.clone();
        for b in &mut bad[14..REQUEST_HEADER] {
            *b = b'a';
        }
        assert_eq!(parse_request(&bad), Err(Refusal::NoPath));
    }

    #[test]
    fn dir_mode_follows_vde_switch() {
        assert_eq!(VdeOptions::dir_mode_for(0o600), 0o700);
        assert_eq!(VdeOptions::dir_mode_for(0o660), 0o770);
        assert_eq!(VdeOptions::dir_mode_for(0o666), 0o777);
    }
}
