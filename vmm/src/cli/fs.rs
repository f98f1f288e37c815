//! `vmbuild fs`: the virtio-fs server on its own, for QEMU or any vhost-user-fs front-end.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use virtiofs_bridge::{CacheMode, ShareConfig, ShareServer};

use crate::exit;
use crate::signals::TermSignals;

#[derive(Subcommand, Debug)]
pub enum FsCommand {
    /// Serve one or more shares until SIGINT/SIGTERM.
    ///
    /// One share, spelled like virtiofsd:
    ///   vmbuild fs serve --shared-dir DIR --socket-path PATH [--readonly] [--cache auto]
    ///
    /// Several shares from one process, one socket each:
    ///   vmbuild fs serve --socket-dir /run/vmb \
    ///     --share tag=store,dir=/nix/store,ro --share tag=xchg,dir=/tmp/xchg
    /// (sockets /run/vmb/store.sock and /run/vmb/xchg.sock; `socket=PATH` overrides).
    #[command(verbatim_doc_comment)]
    Serve(ServeArgs),
}

impl FsCommand {
    pub fn run(self) -> anyhow::Result<i32> {
        match self {
            FsCommand::Serve(args) => serve(args),
        }
    }
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Directory to share (virtiofsd: --shared-dir)
    #[arg(long, value_name = "DIR")]
    shared_dir: Option<PathBuf>,

    /// vhost-user socket to listen on for --shared-dir (virtiofsd: --socket-path)
    #[arg(long, value_name = "PATH", requires = "shared_dir")]
    socket_path: Option<PathBuf>,

    /// Tag of the --shared-dir share (informational; QEMU sets the guest-visible tag)
    #[arg(long, default_value = "share", requires = "shared_dir")]
    tag: String,

    /// Refuse every mutating request with EROFS (virtiofsd: --readonly)
    #[arg(long, requires = "shared_dir")]
    readonly: bool,

    /// Guest caching for --shared-dir: never, auto or always (virtiofsd: --cache).
    /// Default: always with --readonly (the content cannot change), auto otherwise.
    #[arg(long, value_name = "MODE", requires = "shared_dir")]
    cache: Option<CacheMode>,

    /// Serve extended attributes (virtiofsd: --xattr)
    #[arg(long)]
    xattr: bool,

    /// Worker threads per share, 0 to 1024; 0 answers requests on the queue thread
    /// (virtiofsd: --thread-pool-size). The threads start with the share, so the bound
    /// keeps a typo from exhausting the host's threads.
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..=1024))]
    thread_pool_size: u16,

    /// Another share: tag=NAME,dir=DIR[,ro][,cache=MODE][,socket=PATH] (repeatable)
    #[arg(long, value_name = "SPEC")]
    share: Vec<ShareSpec>,

    /// Where --share sockets go when they do not name one (TAG.sock)
    #[arg(long, value_name = "DIR")]
    socket_dir: Option<PathBuf>,
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

impl ServeArgs {
    /// Every share named on the command line, with its socket.
    fn shares(&self) -> anyhow::Result<Vec<(ShareConfig, PathBuf)>> {
        let mut shares = Vec::new();
        if let Some(dir) = &self.shared_dir {
            let socket = self
                .socket_path
                .clone()
                .context("--shared-dir needs --socket-path PATH")?;
            let mut config = if self.readonly {
                ShareConfig::store(dir)
            } else {
                ShareConfig::xchg(dir)
            };
            config.tag = self.tag.clone();
            if let Some(c) = self.cache {
                config.cache = c;
            }
            shares.push((config, socket));
        }
        for spec in &self.share {
            let socket = match (&spec.socket, &self.socket_dir) {
                (Some(s), _) => s.clone(),
                (None, Some(d)) => d.join(format!("{}.sock", spec.config.tag)),
                (None, None) => anyhow::bail!(
                    "share '{}' names no socket: add socket=PATH to it or give --socket-dir DIR",
                    spec.config.tag
                ),
            };
            shares.push((spec.config.clone(), socket));
        }
        if shares.is_empty() {
            anyhow::bail!(
                "nothing to serve: give --shared-dir DIR --socket-path PATH, or --share ..."
            );
        }
        for (config, _) in &mut shares {
            config.thread_pool_size = usize::from(self.thread_pool_size);
            config.xattr = self.xattr || config.xattr;
        }
        Ok(shares)
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<i32> {
    let shares = match args.shares() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmbuild fs serve: {e:#}");
            return Ok(exit::USAGE);
        }
    };
    for (i, (config, _)) in shares.iter().enumerate() {
        if let Err(e) = config.validate() {
            eprintln!("vmbuild fs serve: share '{}': {e}", config.tag);
            return Ok(exit::USAGE);
        }
        if shares[..i].iter().any(|(c, _)| c.tag == config.tag) {
            eprintln!(
                "vmbuild fs serve: share '{}' is given twice: each share needs a tag of its own",
                config.tag
            );
            return Ok(exit::USAGE);
        }
    }
    let sockets: Vec<&std::path::Path> = shares.iter().map(|(_, s)| s.as_path()).collect();
    if let Err(e) = super::socket_path::claim(&sockets) {
        eprintln!("vmbuild fs serve: {e}");
        return Ok(exit::USAGE);
    }
    // Before any thread exists, so that only this thread receives them.
    let signals = TermSignals::block().context("blocking SIGINT/SIGTERM")?;
    let mut servers = Vec::new();
    for (config, socket) in shares {
        let (tag, dir, ro, cache) = (
            config.tag.clone(),
            config.dir.clone(),
            config.read_only,
            config.cache,
        );
        let server = ShareServer::spawn(config, &socket)
            .with_context(|| format!("starting share '{tag}'"))?;
        tracing::info!(
            share = %tag,
            dir = %dir.display(),
            socket = %socket.display(),
            read_only = ro,
            cache = %cache,
            "serving"
        );
        servers.push(server);
    }
    let signal = signals.wait().context("waiting for a signal")?;
    tracing::info!("{signal:?}: stopping");
    for server in servers {
        let stats = server.stats();
        tracing::info!(share = %server.tag(), ?stats, "stopped");
        server.stop(Duration::from_millis(500));
    }
    Ok(exit::SUCCESS)
}
