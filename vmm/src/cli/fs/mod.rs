//! `vmbuild fs`: the virtio-fs server on its own, for QEMU, libvirt or any vhost-user-fs
//! front-end; a drop-in for virtiofsd (see [`virtiofsd`]).

mod virtiofsd;

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Subcommand};
use virtiofs_bridge::{CacheMode, ShareConfig, ShareServer};

use crate::exit;
use crate::signals::TermSignals;
use virtiofsd::{VirtiofsdArgs, CAPABILITIES};

#[derive(Subcommand, Debug)]
pub enum FsCommand {
    /// Serve one or more shares until SIGINT, SIGTERM or SIGHUP.
    ///
    /// One share, spelled like virtiofsd:
    ///   vmbuild fs serve --shared-dir DIR --socket-path PATH [--readonly] [--cache auto]
    ///
    /// Several shares from one process, one socket each:
    ///   vmbuild fs serve --socket-dir /run/vmb \
    ///     --share tag=store,dir=/nix/store,ro --share tag=xchg,dir=/tmp/xchg
    /// (sockets /run/vmb/store.sock and /run/vmb/xchg.sock; `socket=PATH` overrides).
    ///
    /// As libvirt's virtiofsd: <binary path='/usr/local/bin/vmbuild-virtiofsd'/> in a
    /// <filesystem> with <driver type='virtiofs'/>, where that file is the two lines
    ///   #!/bin/sh
    ///   exec vmbuild fs serve "$@"
    /// libvirt runs it with --print-capabilities, then --fd=N --shared-dir DIR ...
    ///
    /// A socket is created atomically (bound under a temporary name, then renamed) and
    /// never replaces anything: a stale socket (nobody answers) is removed first, a live
    /// one or any other file is refused. Each front-end that connects gets a fresh
    /// session; when it disconnects the share waits for the next (virtiofsd exits).
    ///
    /// virtiofsd flags, as vmbuild takes them:
    ///   done:     --shared-dir, --socket-path (--socket), --fd, --readonly, --cache,
    ///             --xattr, --thread-pool-size, --socket-group, --rlimit-nofile,
    ///             --log-level, -d, --print-capabilities, -o source=,cache=,sandbox=none,
    ///             log_level=,debug,xattr,no_xattr,writeback,no_writeback, --writeback
    ///   accepted, being what vmbuild does: -f, --sandbox none, --seccomp none,
    ///             --no-announce-submounts, --inode-file-handles=never,
    ///             --posix-acl=never, --security-label=never, --no-killpriv-v2,
    ///             --allow-direct-io, -o no_flock,no_posix_lock and the other defaults
    ///   refused (exit 2, saying what to use): --sandbox chroot|namespace,
    ///             --announce-submounts, --modcaps, --seccomp kill|log|trap, --xattrmap,
    ///             --posix-acl, --security-label, --killpriv-v2, --syslog,
    ///             --uid-map, --gid-map, --translate-uid, --translate-gid,
    ///             -o flock,posix_lock
    ///   not taken (clap's "unexpected argument", exit 2): --allow-mmap, --no-readdirplus,
    ///             --preserve-noatime, --migration-*
    ///   --tag is taken but only names the share in the log: the front-end (QEMU's tag=,
    ///   libvirt's <target dir=>) sets the tag the guest mounts.
    #[command(
        verbatim_doc_comment,
        after_help = "\
Exit status:
  0  stopped by SIGINT, SIGTERM or SIGHUP (sockets removed)
  1  failed while serving
  2  bad command line or input (nothing was started)

Environment: RUST_LOG (log filter; --log-level, -d and -o log_level= set it instead)."
    )]
    Serve(Box<ServeArgs>),
}

impl FsCommand {
    pub fn run(self) -> anyhow::Result<i32> {
        match self {
            FsCommand::Serve(args) => Ok(serve(*args)),
        }
    }
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Directory to share (virtiofsd: --shared-dir); any bytes, UTF-8 or not
    #[arg(long, value_name = "DIR")]
    shared_dir: Option<PathBuf>,

    /// vhost-user socket to create for --shared-dir (virtiofsd: --socket-path); its
    /// directory must exist
    #[arg(long, value_name = "PATH", alias = "socket")]
    socket_path: Option<PathBuf>,

    /// Tag of the --shared-dir share (informational; the front-end sets the guest's tag)
    #[arg(long)]
    tag: Option<String>,

    /// Refuse every mutating request with EROFS (virtiofsd: --readonly)
    #[arg(long)]
    readonly: bool,

    /// Guest caching for --shared-dir: never, auto or always (virtiofsd: --cache).
    /// Default: always with --readonly (the content cannot change), auto otherwise.
    #[arg(long, value_name = "MODE")]
    cache: Option<CacheMode>,

    /// Serve extended attributes (virtiofsd: --xattr; on unless -o no_xattr)
    #[arg(long)]
    xattr: bool,

    /// Worker threads per share, 0 to 1024; 0 answers requests on the queue thread
    /// (virtiofsd: --thread-pool-size). The threads start with the share, so the bound
    /// keeps a typo from exhausting the host's threads.
    #[arg(long, value_name = "N", default_value_t = 0, allow_negative_numbers = true,
          value_parser = clap::value_parser!(u16).range(0..=1024))]
    thread_pool_size: u16,

    /// Another share: tag=NAME,dir=DIR[,ro][,cache=MODE][,socket=PATH] (repeatable)
    #[arg(long, value_name = "SPEC")]
    share: Vec<ShareSpec>,

    /// Where --share sockets go when they do not name one (TAG.sock); must exist
    #[arg(long, value_name = "DIR")]
    socket_dir: Option<PathBuf>,

    #[command(flatten)]
    virtiofsd: VirtiofsdArgs,
}

/// `--share tag=store,dir=/nix/store,ro`
#[derive(Debug, Clone)]
struct ShareSpec {
    config: ShareConfig,
    socket: Option<PathBuf>,
}

impl FromStr for ShareSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut tag, mut dir, mut ro, mut cache, mut socket) = (None, None, false, None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tag", v)) => tag = Some(v.to_owned()),
                Some(("dir", v)) => dir = Some(PathBuf::from(v)),
                Some(("cache", v)) => cache = Some(v.parse::<CacheMode>()?),
                Some(("socket", v)) => socket = Some(PathBuf::from(v)),
                None if part == "ro" || part == "readonly" => ro = true,
                None if part == "rw" => ro = false,
                _ => {
                    return Err(format!(
                    "unknown share option '{part}' (expected tag=, dir=, ro, rw, cache=, socket=)"
                ))
                }
            }
        }
        let tag = tag.ok_or("a share needs tag=NAME")?;
        let dir = dir.ok_or("a share needs dir=DIR")?;
        let mut config = if ro {
            ShareConfig::store(dir)
        } else {
            ShareConfig::xchg(dir)
        };
        config.tag = tag;
        if let Some(c) = cache {
            config.cache = c;
        }
        Ok(ShareSpec { config, socket })
    }
}

/// Where a share listens.
enum Endpoint {
    /// A socket vmbuild creates.
    Path(PathBuf),
    /// An inherited listening socket (`--fd`).
    Fd(RawFd),
}

/// A command-line error: one line, exit 2.
struct Usage(String);

impl<T: Into<String>> From<T> for Usage {
    fn from(s: T) -> Self {
        Usage(s.into())
    }
}

impl ServeArgs {
    /// Every share named on the command line, with where it listens.
    fn shares(&self, compat: &virtiofsd::Compat) -> Result<Vec<(ShareConfig, Endpoint)>, Usage> {
        let shared_dir = match (&self.shared_dir, &compat.source) {
            (Some(a), Some(b)) if a != b => {
                return Err(format!(
                    "--shared-dir {} and -o source={} name two directories: give one",
                    a.display(),
                    b.display()
                )
                .into())
            }
            (Some(d), _) | (None, Some(d)) => Some(d),
            (None, None) => None,
        };
        let fd = self.virtiofsd.fd.map(|fd| fd as RawFd);
        let mut shares = Vec::new();
        match shared_dir {
            Some(dir) => {
                let endpoint = match (&self.socket_path, fd) {
                    (Some(_), Some(_)) => {
                        return Err(
                            "--socket-path and --fd both say where to listen: give one".into()
                        )
                    }
                    (Some(p), None) => Endpoint::Path(p.clone()),
                    (None, Some(fd)) => Endpoint::Fd(fd),
                    (None, None) => {
                        return Err("--shared-dir needs --socket-path PATH (or --fd N)".into())
                    }
                };
                let mut config = if self.readonly {
                    ShareConfig::store(dir)
                } else {
                    ShareConfig::xchg(dir)
                };
                config.tag = self.tag.clone().unwrap_or_else(|| "share".into());
                if let Some(c) = self.cache.or(compat.cache) {
                    config.cache = c;
                }
                shares.push((config, endpoint));
            }
            None => {
                for (given, flag) in [
                    (self.tag.is_some(), "--tag"),
                    (self.readonly, "--readonly"),
                    (self.cache.is_some(), "--cache"),
                    (self.socket_path.is_some(), "--socket-path"),
                    (fd.is_some(), "--fd"),
                ] {
                    if given {
                        return Err(format!(
                            "{flag} belongs to --shared-dir DIR, which is not given \
                             (a --share takes tag=, ro, cache= and socket= in its spec)"
                        )
                        .into());
                    }
                }
            }
        }
        if !self.share.is_empty() && fd.is_some() {
            return Err(
                "--fd serves one share (--shared-dir): --share needs sockets of its own".into(),
            );
        }
        for spec in &self.share {
            let tag = &spec.config.tag;
            let socket = match (&spec.socket, &self.socket_dir) {
                (Some(s), _) => s.clone(),
                (None, Some(d)) => {
                    if tag.contains('/') || tag == "." || tag == ".." || tag.contains('\0') {
                        return Err(format!(
                            "share '{tag}': a tag that names a socket in --socket-dir may not \
                             contain '/' or be '.' or '..' (or give socket=PATH)"
                        )
                        .into());
                    }
                    d.join(format!("{tag}.sock"))
                }
                (None, None) => {
                    return Err(format!(
                    "share '{tag}' names no socket: add socket=PATH to it or give --socket-dir DIR"
                )
                    .into())
                }
            };
            shares.push((spec.config.clone(), Endpoint::Path(socket)));
        }
        if shares.is_empty() {
            return Err(
                "nothing to serve: give --shared-dir DIR --socket-path PATH, or --share ...".into(),
            );
        }
        for (config, _) in &mut shares {
            config.thread_pool_size = usize::from(self.thread_pool_size);
            // virtiofsd's default: the guest's writes reach the host as they are made,
            // unless --writeback / -o writeback asks for the guest's writeback cache.
            config.writeback = compat.writeback;
            config.xattr = match compat.xattr {
                Some(x) => x,
                None => self.xattr || config.xattr,
            };
        }
        Ok(shares)
    }
}

/// `vmbuild fs serve`; returns the exit status.
fn serve(args: ServeArgs) -> i32 {
    if args.virtiofsd.print_capabilities {
        println!("{CAPABILITIES}");
        return exit::SUCCESS;
    }
    match prepare(&args) {
        Ok((shares, compat)) => match run(shares, &compat) {
            Ok(()) => exit::SUCCESS,
            Err(e) => {
                eprintln!("vmbuild fs serve: {e:#}");
                exit::FAILURE
            }
        },
        Err(Usage(e)) => {
            eprintln!("vmbuild fs serve: {e}");
            exit::USAGE
        }
    }
}

/// Everything that can be checked before anything starts.
#[allow(clippy::type_complexity)]
fn prepare(args: &ServeArgs) -> Result<(Vec<(ShareConfig, Endpoint)>, virtiofsd::Compat), Usage> {
    let compat = args.virtiofsd.check()?;
    if let Some(filter) = compat.log_filter {
        apply_log_filter(filter)?;
    }
    if let Some(dir) = &args.socket_dir {
        check_socket_dir(dir, "--socket-dir")?;
    }
    let shares = args.shares(&compat)?;
    for (i, (config, endpoint)) in shares.iter().enumerate() {
        config
            .validate()
            .map_err(|e| format!("share '{}': {e}", config.tag))?;
        if shares[..i].iter().any(|(c, _)| c.tag == config.tag) {
            return Err(format!(
                "share '{}' is given twice: each share needs a tag of its own",
                config.tag
            )
            .into());
        }
        match endpoint {
            Endpoint::Path(socket) => {
                let dir = match socket.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
                check_socket_dir(dir, &format!("{}: its directory", socket.display()))?;
                check_outside_share(socket, dir, config)?;
            }
            Endpoint::Fd(fd) => check_listening_fd(*fd)?,
        }
    }
    let sockets: Vec<&Path> = shares
        .iter()
        .filter_map(|(_, e)| match e {
            Endpoint::Path(p) => Some(p.as_path()),
            Endpoint::Fd(_) => None,
        })
        .collect();
    super::socket_path::claim(&sockets)?;
    if compat.socket_group.is_some() && sockets.is_empty() {
        return Err("--socket-group applies to sockets vmbuild creates, not to --fd".into());
    }
    if let Some(n) = compat.rlimit_nofile {
        let limit = libc::rlimit {
            rlim_cur: n,
            rlim_max: n,
        };
        // SAFETY: setrlimit with a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(format!("--rlimit-nofile {n}: {}", std::io::Error::last_os_error()).into());
        }
    }
    Ok((shares, compat))
}

/// A socket's directory must exist before anything starts.
fn check_socket_dir(dir: &Path, what: &str) -> Result<(), Usage> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("{what} {} is not a directory", dir.display()).into()),
        Err(e) => Err(format!("{what} {}: {e}", dir.display()).into()),
    }
}

/// A socket inside the share it serves is refused: the guest would see it, and on a
/// writable share could delete or replace it.
fn check_outside_share(socket: &Path, dir: &Path, config: &ShareConfig) -> Result<(), Usage> {
    let (Ok(dir), Ok(share)) = (dir.canonicalize(), config.dir.canonicalize()) else {
        return Ok(());
    };
    if dir.starts_with(&share) {
        return Err(format!(
            "the socket {} is inside the shared directory {}: the guest would see it \
             (and could remove it); put it elsewhere",
            socket.display(),
            config.dir.display()
        )
        .into());
    }
    Ok(())
}

/// `--fd N` must be an open, listening unix socket.
fn check_listening_fd(fd: RawFd) -> Result<(), Usage> {
    let get = |opt: libc::c_int| -> std::io::Result<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt into a c_int of the right size.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc == 0 {
            Ok(v)
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    match (get(libc::SO_DOMAIN), get(libc::SO_ACCEPTCONN)) {
        (Ok(libc::AF_UNIX), Ok(1)) => Ok(()),
        (Err(e), _) if e.raw_os_error() == Some(libc::EBADF) => Err(format!(
            "--fd {fd}: no such open file descriptor (it must be inherited from the parent)"
        )
        .into()),
        _ => Err(format!("--fd {fd}: not a listening unix socket").into()),
    }
}

/// `--log-level` and friends: virtiofsd's way to set the log filter, which replaces the
/// one logging started with (`RUST_LOG`'s).
fn apply_log_filter(filter: &str) -> Result<(), Usage> {
    crate::logging::set_filter(filter).map_err(|e| format!("--log-level: {e}").into())
}

/// Starts every share and serves until a signal (Ok) or a share fails (Err).
fn run(shares: Vec<(ShareConfig, Endpoint)>, compat: &virtiofsd::Compat) -> anyhow::Result<()> {
    use anyhow::Context;
    // Before any thread exists, so that only this thread receives them.
    let signals = TermSignals::block().context("blocking SIGINT, SIGTERM and SIGHUP")?;
    let mut servers = Vec::new();
    for (config, endpoint) in shares {
        let (tag, dir, ro, cache) = (
            config.tag.clone(),
            config.dir.clone(),
            config.read_only,
            config.cache,
        );
        let server = match endpoint {
            Endpoint::Path(socket) => {
                let server = ShareServer::spawn(config, &socket)
                    .with_context(|| format!("share '{tag}'"))?;
                if let Some(gid) = compat.socket_group {
                    nix::unistd::chown(&socket, None, Some(nix::unistd::Gid::from_raw(gid)))
                        .with_context(|| {
                            format!(
                                "giving {} to group {gid} (--socket-group)",
                                socket.display()
                            )
                        })?;
                }
                server
            }
            Endpoint::Fd(fd) => {
                // SAFETY: checked to be an open listening socket; from here on it is ours.
                let listener = unsafe { UnixListener::from_raw_fd(fd) };
                ShareServer::from_listener(config, listener)
                    .with_context(|| format!("share '{tag}'"))?
            }
        };
        tracing::info!(
            share = %tag,
            dir = %dir.display(),
            socket = %server.socket().display(),
            read_only = ro,
            cache = %cache,
            "serving"
        );
        servers.push(server);
    }
    let result = wait(&signals, &servers);
    for server in servers {
        let stats = server.stats();
        tracing::info!("share '{}' stopped: {stats}", server.tag());
        server.stop(Duration::from_millis(500));
    }
    result
}

/// Waits for SIGINT, SIGTERM or SIGHUP, or for a share to fail by itself.
fn wait(_signals: &TermSignals, servers: &[ShareServer]) -> anyhow::Result<()> {
    let mut set = nix::sys::signal::SigSet::empty();
    for s in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGHUP,
    ] {
        set.add(s);
    }
    let timeout = libc::timespec {
        tv_sec: 0,
        tv_nsec: 200_000_000,
    };
    loop {
        // SAFETY: the set is blocked in this thread (TermSignals); a null siginfo is allowed.
        let sig = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &timeout) };
        if sig > 0 {
            let name = nix::sys::signal::Signal::try_from(sig)
                .map(|s| s.as_str())
                .unwrap_or("signal");
            tracing::info!("{name}: stopping");
            return Ok(());
        }
        for server in servers {
            if let Some(failure) = server.failure() {
                anyhow::bail!("share '{}' stopped: {failure}", server.tag());
            }
        }
    }
}
