//! Suspending a QEMU guest to a file and reviving it from one: QMP `stop` + `migrate` to a
//! `file:` URI, and `-incoming defer` + `migrate-incoming`. The building block of the
//! snapshot lifecycle (bootstrap suspends, build revives).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::qemu::recorded_channels::{Player, Recorder};
use crate::qemu::Qmp;
use crate::runtime_dir::RuntimeDir;

/// What a suspend cost.
#[derive(Debug, Clone)]
pub struct SuspendStats {
    pub duration: Duration,
    pub state_bytes: u64,
}

/// How to lay out the state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFormat {
    /// A stream of pages, as `migrate` writes to any channel.
    Stream,
    /// `mapped-ram`: every page at a fixed offset (QEMU ≥ 9.0); revives read it in place.
    MappedRam,
    /// `mapped-ram` written and read by this many multifd channels (threads) in parallel.
    MappedRamMultifd(u8),
    /// This many multifd channels, each zstd-compressed by QEMU, recorded to one file per
    /// channel (`recorded_channels`): smaller on disk, decompressed in parallel.
    ZstdChannels(u8),
}

impl StateFormat {
    /// The name a manifest records (`StateInfo::format`).
    pub fn manifest_name(self) -> &'static str {
        match self {
            StateFormat::Stream => "stream",
            StateFormat::MappedRam | StateFormat::MappedRamMultifd(_) => "mapped-ram",
            StateFormat::ZstdChannels(_) => "multifd-zstd",
        }
    }

    /// Its multifd channels, if it has any.
    pub fn channels(self) -> Option<u8> {
        match self {
            StateFormat::MappedRamMultifd(n) | StateFormat::ZstdChannels(n) => Some(n),
            _ => None,
        }
    }

    /// The nearest format that keeps the state in one file (for small guests such as the
    /// controller, where a second layout would buy nothing).
    pub fn single_file(self) -> StateFormat {
        match self {
            StateFormat::ZstdChannels(n) => StateFormat::MappedRamMultifd(n),
            other => other,
        }
    }
}

/// `e`, a failed save to the file `path`, with the reason QEMU does not give when the
/// file system filled up (it reports what failed, often only as EIO): said when less than
/// 1 MiB is left there.
pub fn save_failed(e: anyhow::Error, path: &Path) -> anyhow::Error {
    let dir = path.parent().unwrap_or(Path::new("."));
    match nix::sys::statvfs::statvfs(dir) {
        Ok(s) if s.blocks_available().saturating_mul(s.fragment_size()) < 1 << 20 => {
            e.context(format!(
                "the file system of {} is full (No space left on device)",
                dir.display()
            ))
        }
        _ => e,
    }
}

impl Qmp {
    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.execute("stop", json!({})).map(drop)
    }

    pub fn cont(&mut self) -> anyhow::Result<()> {
        self.execute("cont", json!({})).map(drop)
    }

    /// `query-status`'s status ("running", "paused", "inmigrate", "postmigrate", ...).
    pub fn status(&mut self) -> anyhow::Result<String> {
        self.status_within(Self::PATIENCE)
    }

    /// [`Qmp::status`], waiting up to `patience` for QEMU to answer.
    fn status_within(&mut self, patience: Duration) -> anyhow::Result<String> {
        let s = self.execute_within("query-status", json!({}), patience)?;
        Ok(s.get("status")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned())
    }

    /// Sets mapped-ram on or off explicitly: a QEMU revived from a mapped-ram file keeps
    /// the capability, and a later stream migration (to `exec:`) would then be refused.
    fn set_format(&mut self, format: StateFormat) -> anyhow::Result<()> {
        let (mapped, channels, compression) = match format {
            StateFormat::Stream => (false, None, "none"),
            StateFormat::MappedRam => (true, None, "none"),
            StateFormat::MappedRamMultifd(n) => (true, Some(n.max(1)), "none"),
            StateFormat::ZstdChannels(n) => (false, Some(n.max(1)), "zstd"),
        };
        // Compression too is set either way: it stays from a revive and mapped-ram refuses it.
        let mut parameters = json!({ "multifd-compression": compression });
        if let Some(n) = channels {
            parameters["multifd-channels"] = json!(n);
        }
        self.execute("migrate-set-parameters", parameters)?;
        self.execute(
            "migrate-set-capabilities",
            json!({ "capabilities": [
                { "capability": "mapped-ram", "state": mapped },
                { "capability": "multifd", "state": channels.is_some() }
            ] }),
        )
        .map(drop)
    }

    /// Stops the guest and writes its whole state to `path`. The guest stays stopped.
    pub fn suspend_to_file(
        &mut self,
        path: &Path,
        format: StateFormat,
        timeout: Duration,
    ) -> anyhow::Result<SuspendStats> {
        self.save_state(path, format, timeout, &mut |_, _| {})
    }

    /// Stops the guest and writes its state to `path` (for [`StateFormat::ZstdChannels`],
    /// `path` and one file per channel beside it), calling `progress(bytes written, guest
    /// RAM bytes)` meanwhile. The guest stays stopped.
    pub fn save_state(
        &mut self,
        path: &Path,
        format: StateFormat,
        timeout: Duration,
        progress: &mut dyn FnMut(u64, u64),
    ) -> anyhow::Result<SuspendStats> {
        let start = Instant::now();
        let state_bytes = if let StateFormat::ZstdChannels(n) = format {
            let socket_dir = RuntimeDir::create("migrate")?;
            let recorder = Recorder::listen(&socket_dir.join("migrate.sock"), path, n)?;
            self.suspend_with_progress(&recorder.uri(), format, timeout, progress)?;
            recorder.finish(Duration::from_secs(30))?
        } else {
            let uri = format!("file:{}", path.display());
            self.suspend_with_progress(&uri, format, timeout, progress)?;
            std::fs::metadata(path)
                .with_context(|| format!("the state file {} was not written", path.display()))?
                .len()
        };
        Ok(SuspendStats {
            duration: start.elapsed(),
            state_bytes,
        })
    }

    /// Loads the state from `path` into a QEMU started with `-incoming defer` (and the
    /// same machine), and waits until the guest runs again.
    pub fn revive_from_file(
        &mut self,
        path: &Path,
        format: StateFormat,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let StateFormat::ZstdChannels(n) = format else {
            return self.revive_from_uri(&format!("file:{}", path.display()), format, timeout);
        };
        let start = Instant::now();
        let socket_dir = RuntimeDir::create("migrate")?;
        let socket = socket_dir.join("migrate.sock");
        self.set_format(format)?;
        self.execute(
            "migrate-incoming",
            json!({ "uri": format!("unix:{}", socket.display()) }),
        )?;
        let player = Player::start(&socket, path, n)?;
        self.wait_until_running(start, timeout, &path.display().to_string())?;
        player.finish()?;
        Ok(start.elapsed())
    }

    /// Stops the guest and migrates it to any migration URI (`file:`, `exec:`, ...); waits
    /// until QEMU reports the migration completed. The guest stays stopped.
    pub fn suspend_to_uri(
        &mut self,
        uri: &str,
        format: StateFormat,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        self.suspend_with_progress(uri, format, timeout, &mut |_, _| {})
    }

    /// [`Qmp::suspend_to_uri`], calling `progress(bytes written, guest RAM bytes)` while
    /// the state is written.
    pub fn suspend_with_progress(
        &mut self,
        uri: &str,
        format: StateFormat,
        timeout: Duration,
        progress: &mut dyn FnMut(u64, u64),
    ) -> anyhow::Result<()> {
        self.stop()?;
        self.set_format(format)?;
        self.execute("migrate", json!({ "uri": uri }))?;
        self.wait_for_migration(timeout, progress)
    }

    /// Like [`Qmp::revive_from_file`] for any migration URI.
    pub fn revive_from_uri(
        &mut self,
        uri: &str,
        format: StateFormat,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        self.set_format(format)?;
        self.execute("migrate-incoming", json!({ "uri": uri }))?;
        self.wait_until_running(start, timeout, uri)
    }

    /// Waits, after `migrate-incoming`, until the loaded guest runs (starting it if QEMU
    /// was given `-S`); the time since `start`.
    fn wait_until_running(
        &mut self,
        start: Instant,
        timeout: Duration,
        what: &str,
    ) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            // While the state loads, QEMU's main loop answers nothing: as long as the
            // revive may take, not QMP's usual 30 s (a starved host took longer).
            let patience = deadline
                .saturating_duration_since(Instant::now())
                .max(Self::PATIENCE);
            match self.status_within(patience)?.as_str() {
                "running" => return Ok(start.elapsed()),
                // Loaded but not started (QEMU was given -S): start it.
                "paused" | "prelaunch" if self.migration_status()? == "completed" => self.cont()?,
                _ => {}
            }
            if Instant::now() > deadline {
                bail!("the guest did not run again within {timeout:?} after loading {what}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn migration_status(&mut self) -> anyhow::Result<String> {
        let m = self.execute("query-migrate", json!({}))?;
        Ok(m.get("status")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned())
    }

    fn wait_for_migration(
        &mut self,
        timeout: Duration,
        progress: &mut dyn FnMut(u64, u64),
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.execute("query-migrate", json!({}))?;
            if let Some(ram) = m.get("ram") {
                let n = |k: &str| ram.get(k).and_then(Value::as_u64).unwrap_or(0);
                progress(n("transferred"), n("total"));
            }
            match m.get("status").and_then(Value::as_str).unwrap_or("") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => bail!(
                    "QEMU could not save the guest: {}",
                    m.get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given")
                ),
                _ => {}
            }
            if Instant::now() > deadline {
                bail!("saving the guest took longer than {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
