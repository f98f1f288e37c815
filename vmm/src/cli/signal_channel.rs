//! What the workflow subcommands share: SIGINT/SIGTERM as messages on a channel for their
//! wait loops, and `--timings` output.

use std::sync::mpsc::{self, Receiver};

use crate::signals::TermSignals;

/// Blocks SIGINT/SIGTERM in this thread (call before any other thread exists, so that
/// every thread inherits the mask) and delivers them on the returned channel.
pub fn signal_channel() -> anyhow::Result<Receiver<()>> {
    let signals = TermSignals::block()?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        while signals.wait().is_ok() {
            if tx.send(()).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// `--timings FILE` checked before anything starts: FILE can be written (it is created
/// now, empty), so that a bad path is a usage error, not a failure after the whole run.
pub fn check_timings_dest(dest: Option<&std::path::Path>) -> Result<(), String> {
    match dest {
        Some(d) if d.as_os_str() != "-" => std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(d)
            .map(drop)
            .map_err(|e| format!("--timings {}: {e}", d.display())),
        _ => Ok(()),
    }
}

/// `--timings[=FILE]`: one line of JSON on stderr (`-`) or in FILE.
pub fn write_timings(
    dest: &std::path::Path,
    timings: &impl serde::Serialize,
) -> anyhow::Result<()> {
    let json = serde_json::to_string(timings)?;
    if dest.as_os_str() == "-" {
        eprintln!("{json}");
    } else {
        std::fs::write(dest, format!("{json}\n"))?;
    }
    Ok(())
}
