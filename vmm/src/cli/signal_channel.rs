//! SIGINT/SIGTERM as messages on a channel, for the workflows' wait loops.

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
