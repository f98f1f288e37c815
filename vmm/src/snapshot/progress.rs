//! Progress of long work (bootstrap): one line per step with how long it took, and a
//! live percentage for steps that can measure themselves (saving the memory state) when
//! stderr is a terminal.

use std::io::{IsTerminal, Write};
use std::time::Instant;

pub struct Progress {
    enabled: bool,
    tty: bool,
    started: Instant,
}

impl Progress {
    pub fn new(enabled: bool) -> Progress {
        Progress {
            enabled,
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
        }
    }

    /// Announces a step; the returned guard reports its duration with [`Step::done`].
    pub fn step(&self, what: &str) -> Step<'_> {
        if self.enabled {
            eprintln!("vmbuild: {what}...");
        }
        Step {
            progress: self,
            what: what.to_owned(),
            started: Instant::now(),
        }
    }

    /// A fraction of the current step, overwritten in place on a terminal.
    pub fn fraction(&self, what: &str, done: u64, total: u64) {
        if self.enabled && self.tty && total > 0 {
            let pct = (done.min(total) * 100) / total;
            eprint!("\r\x1b[Kvmbuild:   {what}: {pct}% of {} MiB", total >> 20);
            let _ = std::io::stderr().flush();
        }
    }

    pub fn note(&self, text: &str) {
        if self.enabled {
            eprintln!("vmbuild: {text}");
        }
    }

    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

pub struct Step<'a> {
    progress: &'a Progress,
    what: String,
    started: Instant,
}

impl Step<'_> {
    /// Reports the step finished and returns its duration in seconds.
    pub fn done(self) -> f64 {
        let secs = self.started.elapsed().as_secs_f64();
        if self.progress.enabled {
            if self.progress.tty {
                eprint!("\r\x1b[K");
            }
            eprintln!("vmbuild: {} done ({secs:.2} s)", self.what);
        }
        secs
    }
}
