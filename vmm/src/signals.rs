//! Waiting for the signals that end a foreground server.

use nix::sys::signal::{SigSet, Signal};

/// Blocks SIGINT, SIGTERM and SIGHUP (a closed terminal) in this thread and every thread
/// spawned after it, so the one thread that calls [`TermSignals::wait`] receives them and
/// can clean up in order.
pub struct TermSignals(SigSet);

impl TermSignals {
    pub fn block() -> nix::Result<Self> {
        let mut set = SigSet::empty();
        set.add(Signal::SIGINT);
        set.add(Signal::SIGTERM);
        set.add(Signal::SIGHUP);
        set.thread_block()?;
        Ok(TermSignals(set))
    }

    pub fn wait(&self) -> nix::Result<Signal> {
        self.0.wait()
    }
}
