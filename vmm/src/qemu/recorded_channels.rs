//! A guest's state as QEMU's own compressed multifd migration, recorded to files and
//! played back.
//!
//! QEMU compresses a migration (zstd, one thread per multifd channel) only when it goes
//! over a socket: `mapped-ram`, the layout `file:` needs for parallel channels, refuses
//! compression. So to suspend, vmbuild listens on a unix socket in place of the
//! destination and writes what arrives on each connection to its own file; to revive, it
//! connects to the new QEMU's `-incoming` socket once per file and sends each back.
//! The destination tells the channels apart by their content (the main channel opens with
//! `QEVM`, a multifd channel with its own magic and channel number), so the recording is
//! a faithful stand-in for the source.
//!
//! Why bother: a cold revive reads the state from disk, and an uncompressed state is most
//! of the guest's RAM, while zstd both shrinks it and decompresses in QEMU's channel
//! threads in parallel (BENCHMARKS.md, "Snapshot latency").

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The first four bytes of the main migration channel.
const MAIN_MAGIC: u32 = 0x5145_564d;
/// The first four bytes of a multifd channel (`MultiFDInit_t.magic`).
const MULTIFD_MAGIC: u32 = 0x1122_3344;
/// `MultiFDInit_t`: magic, version, uuid[16], then the channel number.
const MULTIFD_ID_OFFSET: usize = 24;

/// The files a recording with `channels` multifd channels consists of: `base` for the main
/// channel, `base.1` … `base.N` for the multifd channels.
pub fn channel_files(base: &Path, channels: u8) -> Vec<PathBuf> {
    let mut files = vec![base.to_path_buf()];
    for i in 1..=channels {
        let mut name = base.as_os_str().to_owned();
        name.push(format!(".{i}"));
        files.push(PathBuf::from(name));
    }
    files
}

/// Listens where a migrating QEMU will connect and records its channels.
pub struct Recorder {
    socket: PathBuf,
    done: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<anyhow::Result<u64>>>,
}

impl Recorder {
    /// Binds `socket` and starts accepting the main channel and `channels` multifd
    /// channels, writing them to [`channel_files`]`(base, channels)`.
    pub fn listen(socket: &Path, base: &Path, channels: u8) -> anyhow::Result<Recorder> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)
            .with_context(|| format!("listening for the migration on {}", socket.display()))?;
        listener.set_nonblocking(true)?;
        let done = Arc::new(AtomicBool::new(false));
        let files = channel_files(base, channels);
        let stop = done.clone();
        let acceptor = std::thread::Builder::new()
            .name("state-recorder".into())
            .spawn(move || accept_and_record(listener, files, &stop))?;
        Ok(Recorder {
            socket: socket.to_path_buf(),
            done,
            acceptor: Some(acceptor),
        })
    }

    /// The URI to give QEMU's `migrate`.
    pub fn uri(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    /// Waits until every channel was recorded to its end (QEMU closes them when the
    /// migration completed); the bytes written in all.
    pub fn finish(mut self, timeout: Duration) -> anyhow::Result<u64> {
        let acceptor = self.acceptor.take().expect("finish is called once");
        let deadline = Instant::now() + timeout;
        while !acceptor.is_finished() {
            if Instant::now() > deadline {
                self.done.store(true, Ordering::Relaxed);
                bail!("QEMU did not close its migration channels within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        acceptor
            .join()
            .map_err(|_| anyhow::anyhow!("the state recorder panicked"))?
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(a) = self.acceptor.take() {
            // A failed migration's QEMU closes its channels as it cleans up; one that
            // does not (stopped, hung) must not hold vmbuild here: the threads are left
            // to end with its sockets.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !a.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if a.is_finished() {
                let _ = a.join();
            }
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn accept_and_record(
    listener: UnixListener,
    files: Vec<PathBuf>,
    stop: &AtomicBool,
) -> anyhow::Result<u64> {
    let mut writers = Vec::new();
    while writers.len() < files.len() {
        if stop.load(Ordering::Relaxed) {
            bail!(
                "QEMU opened {} of {} migration channels",
                writers.len(),
                files.len()
            );
        }
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                let files = files.clone();
                writers.push(std::thread::spawn(move || record(stream, &files)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e).context("accepting a migration channel"),
        }
    }
    let mut total = 0;
    for w in writers {
        total += w
            .join()
            .map_err(|_| anyhow::anyhow!("a channel recorder panicked"))??;
    }
    Ok(total)
}

/// Writes one channel to the file its header names; the bytes written.
fn record(mut stream: UnixStream, files: &[PathBuf]) -> anyhow::Result<u64> {
    let mut head = [0u8; MULTIFD_ID_OFFSET + 1];
    stream
        .read_exact(&mut head[..4])
        .context("reading a migration channel's magic")?;
    let magic = u32::from_be_bytes(head[..4].try_into().unwrap());
    let (file, head_len) = match magic {
        MAIN_MAGIC => (&files[0], 4),
        MULTIFD_MAGIC => {
            stream.read_exact(&mut head[4..])?;
            let id = head[MULTIFD_ID_OFFSET] as usize;
            let Some(file) = files.get(id + 1) else {
                bail!(
                    "QEMU opened multifd channel {id}, more than the {} asked for",
                    files.len() - 1
                );
            };
            (file, head.len())
        }
        other => bail!("a migration channel began with {other:#x}, not a QEMU migration magic"),
    };
    // Private, as QEMU makes its own state files: guest memory holds the guest's keys.
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("creating the state file {}", file.display()))?;
    out.write_all(&head[..head_len])?;
    let copied = std::io::copy(&mut stream, &mut out)
        .with_context(|| format!("writing the state file {}", file.display()))?;
    Ok(copied + head_len as u64)
}

/// Sends the recorded channels to a QEMU listening on `socket` (`migrate-incoming
/// unix:…`), each from its own thread: QEMU reads its channels in parallel and waits on
/// one while another fills, so they cannot be sent one after another.
pub struct Player {
    senders: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Player {
    pub fn start(socket: &Path, base: &Path, channels: u8) -> anyhow::Result<Player> {
        let mut senders = Vec::new();
        for file in channel_files(base, channels) {
            let source = std::fs::File::open(&file)
                .with_context(|| format!("opening the state file {}", file.display()))?;
            // Connected here, in order, so the main channel is QEMU's first.
            let stream = UnixStream::connect(socket).with_context(|| {
                format!("connecting to QEMU's migration socket {}", socket.display())
            })?;
            senders.push(std::thread::spawn(move || send(source, stream, &file)));
        }
        Ok(Player { senders })
    }

    /// Waits for every channel to be sent whole.
    pub fn finish(self) -> anyhow::Result<()> {
        for s in self.senders {
            s.join()
                .map_err(|_| anyhow::anyhow!("a state sender panicked"))??;
        }
        Ok(())
    }
}

fn send(mut source: std::fs::File, mut stream: UnixStream, file: &Path) -> anyhow::Result<()> {
    // std copies a file to a socket with sendfile: no copy through this process.
    std::io::copy(&mut source, &mut stream)
        .with_context(|| format!("sending {} to QEMU", file.display()))?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_files_are_the_base_then_one_per_multifd_channel() {
        let files = channel_files(Path::new("/s/memory.state"), 2);
        assert_eq!(
            files,
            [
                PathBuf::from("/s/memory.state"),
                PathBuf::from("/s/memory.state.1"),
                PathBuf::from("/s/memory.state.2")
            ]
        );
    }

    #[test]
    fn channels_are_filed_by_their_headers_not_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("state");
        let socket = dir.path().join("m.sock");
        let rec = Recorder::listen(&socket, &base, 2).unwrap();
        let mut multifd1 = vec![0u8; 64];
        multifd1[..4].copy_from_slice(&MULTIFD_MAGIC.to_be_bytes());
        multifd1[MULTIFD_ID_OFFSET] = 1;
        let mut multifd0 = multifd1.clone();
        multifd0[MULTIFD_ID_OFFSET] = 0;
        let main = [&MAIN_MAGIC.to_be_bytes()[..], b"rest"].concat();
        for body in [&multifd1, &main, &multifd0] {
            UnixStream::connect(&socket)
                .unwrap()
                .write_all(body)
                .unwrap();
        }
        assert_eq!(rec.finish(Duration::from_secs(5)).unwrap(), 64 + 8 + 64);
        let files = channel_files(&base, 2);
        assert_eq!(std::fs::read(&files[0]).unwrap(), main);
        assert_eq!(std::fs::read(&files[1]).unwrap(), multifd0);
        assert_eq!(std::fs::read(&files[2]).unwrap(), multifd1);
    }

    #[test]
    fn a_stranger_on_the_socket_is_refused_with_what_it_sent() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("m.sock");
        let rec = Recorder::listen(&socket, &dir.path().join("state"), 0).unwrap();
        UnixStream::connect(&socket)
            .unwrap()
            .write_all(b"GET / HTTP/1.1\r\n")
            .unwrap();
        let err = rec.finish(Duration::from_secs(5)).unwrap_err();
        assert!(
            format!("{err:#}").contains("not a QEMU migration magic"),
            "{err:#}"
        );
    }
}
