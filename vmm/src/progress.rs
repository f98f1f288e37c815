//! Progress of long work (bootstrap, image builds): one line per step with how long it took, and a
//! live percentage for steps that can measure themselves (saving the memory state) when
//! stderr is a terminal.

use std::cell::Cell;
use std::io::{IsTerminal, Write};
use std::time::Instant;

/// On a terminal a step is one line, rewritten in place: `X...`, `X: 40% of 256 MiB`,
/// `X done (1.20 s)`. Into a file or pipe it is two lines, `X...` and `X done (1.20 s)`,
/// and no percentages.
pub struct Progress {
    /// `vmbuild SUBCOMMAND:`, before every line.
    prefix: &'static str,
    enabled: bool,
    tty: bool,
    started: Instant,
    /// The percentage last drawn, so that an unchanged one is not drawn again.
    last_pct: Cell<Option<u64>>,
}

impl Progress {
    /// Progress of `vmbuild bootstrap`.
    pub fn new(enabled: bool) -> Progress {
        Progress::with_prefix("vmbuild bootstrap:", enabled)
    }

    pub fn with_prefix(prefix: &'static str, enabled: bool) -> Progress {
        Progress {
            prefix,
            enabled,
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
            last_pct: Cell::new(None),
        }
    }

    /// Announces a step; the returned guard reports its duration with [`Step::done`].
    pub fn step(&self, what: &str) -> Step<'_> {
        if self.enabled {
            if self.tty {
                eprint!("{} {what}...", self.prefix);
                let _ = std::io::stderr().flush();
            } else {
                eprintln!("{} {what}...", self.prefix);
            }
        }
        self.last_pct.set(None);
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
            if self.last_pct.replace(Some(pct)) == Some(pct) {
                return;
            }
            eprint!(
                "\r\x1b[K{} {what}: {pct}% of {} MiB",
                self.prefix,
                total >> 20
            );
            let _ = std::io::stderr().flush();
        }
    }

    /// The state of the current step in words (`12/122 libc6`), overwritten in place on
    /// a terminal; nothing elsewhere (a log keeps the step lines alone).
    pub fn live(&self, what: &str, state: &str) {
        if self.enabled && self.tty {
            eprint!("\r\x1b[K{} {what}: {state}", self.prefix);
            let _ = std::io::stderr().flush();
        }
    }

    pub fn note(&self, text: &str) {
        if self.enabled {
            eprintln!("{} {text}", self.prefix);
        }
    }

    /// Whether anything is shown (not `--quiet`).
    pub fn enabled(&self) -> bool {
        self.enabled
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
            eprintln!("{} {} done ({secs:.2} s)", self.progress.prefix, self.what);
        }
        secs
    }
}
