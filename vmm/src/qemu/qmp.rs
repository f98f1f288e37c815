//! A small typed QMP client: the handful of commands and events vmbuild needs, over the
//! socket QEMU connects to. Written by hand rather than with a QAPI-generated crate: four
//! commands and three events do not justify a generated schema of the whole QAPI.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::Sender;

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// Why QEMU's guest stopped, from the `SHUTDOWN` event's `reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShutdownReason {
    /// The guest powered off (ACPI or `poweroff -f`).
    GuestShutdown,
    /// The guest reset; with `-no-reboot` and `panic=-1` this is how a kernel panic ends.
    GuestReset,
    /// The guest reported a panic (pvpanic).
    GuestPanic,
    /// QEMU was told to quit (QMP `quit`, a signal).
    Host(String),
}

/// Something QEMU said on its own.
#[derive(Debug, Clone)]
pub enum QmpEvent {
    Shutdown {
        reason: ShutdownReason,
    },
    GuestPanicked,
    /// A disk's host side failed (`BLOCK_IO_ERROR`); with `stopped` QEMU paused the guest
    /// (its default for ENOSPC: the guest waits until someone frees space and resumes it).
    DiskError {
        stopped: bool,
        reason: String,
    },
}

/// The command side of a QMP connection. Events are read on a thread of their own and
/// sent to the channel given to [`Qmp::handshake`].
pub struct Qmp {
    writer: UnixStream,
    replies: std::sync::mpsc::Receiver<Value>,
}

impl Qmp {
    /// Reads the greeting, enters command mode, and starts the reader thread.
    pub fn handshake(stream: UnixStream, events: Sender<QmpEvent>) -> anyhow::Result<Qmp> {
        let writer = stream.try_clone().context("cloning the QMP socket")?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .context("reading the QMP greeting")?;
        let greeting: Value = serde_json::from_str(&line).context("parsing the QMP greeting")?;
        if greeting.get("QMP").is_none() {
            bail!("QEMU's monitor did not greet with QMP: {line}");
        }
        let (reply_tx, replies) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || read_messages(reader, reply_tx, events))
            .context("spawning the QMP reader")?;
        let mut qmp = Qmp { writer, replies };
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// How long a command's reply may take, unless the caller knows better.
    pub const PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

    /// Runs one command and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        self.execute_within(command, arguments, Self::PATIENCE)
    }

    /// [`Qmp::execute`], waiting up to `patience` for the reply: QEMU answers only between
    /// main-loop iterations, and loading a migration stream holds the main loop for as
    /// long as the load takes.
    pub fn execute_within(
        &mut self,
        command: &str,
        arguments: Value,
        patience: std::time::Duration,
    ) -> anyhow::Result<Value> {
        let msg = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{msg}").with_context(|| format!("sending QMP {command}"))?;
        let reply = self
            .replies
            .recv_timeout(patience)
            .with_context(|| format!("no QMP reply to {command} within {patience:?}"))?;
        if let Some(err) = reply.get("error") {
            bail!("QMP {command} failed: {err}");
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    /// Asks QEMU to exit now (the guest is not consulted).
    pub fn quit(&mut self) -> anyhow::Result<()> {
        // QEMU may close the socket before its reply arrives; that is a success too.
        let msg = json!({ "execute": "quit" });
        let _ = writeln!(self.writer, "{msg}");
        Ok(())
    }
}

fn read_messages(reader: BufReader<UnixStream>, replies: Sender<Value>, events: Sender<QmpEvent>) {
    for line in reader.lines() {
        let Ok(line) = line else { break };
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            tracing::debug!("unparsable QMP message: {line}");
            continue;
        };
        match msg.get("event").and_then(Value::as_str) {
            Some("SHUTDOWN") => {
                let reason = msg
                    .pointer("/data/reason")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let reason = match reason {
                    "guest-shutdown" => ShutdownReason::GuestShutdown,
                    "guest-reset" => ShutdownReason::GuestReset,
                    "guest-panic" => ShutdownReason::GuestPanic,
                    other => ShutdownReason::Host(other.to_owned()),
                };
                let _ = events.send(QmpEvent::Shutdown { reason });
            }
            Some("GUEST_PANICKED") => {
                let _ = events.send(QmpEvent::GuestPanicked);
            }
            Some("BLOCK_IO_ERROR") => {
                let data = |k: &str| msg.pointer(&format!("/data/{k}")).and_then(Value::as_str);
                let _ = events.send(QmpEvent::DiskError {
                    stopped: data("action") == Some("stop"),
                    reason: data("reason").unwrap_or("an I/O error").to_owned(),
                });
            }
            Some(_) => {}
            None => {
                let _ = replies.send(msg);
            }
        }
    }
}
