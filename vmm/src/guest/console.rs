//! The guest console protocol. A guest marks its progress with lines of its own on the
//! console, among whatever the kernel and its programs print there:
//!
//! * `vmbuild-phase=NAME` at the start of a line: the guest reached phase `NAME` ([`phase`]);
//! * `vmbuild-exit=N` anywhere in a line: the command's exit status. The kit's init prints
//!   it twice, through the kernel log first (after printk's timestamp), then on its own.
//!
//! This module is the one place that knows the markers: the host reads consoles through
//! [`spawn_reader`] (a stream, under QEMU) or [`LineSplitter`] (bytes handed over, in the
//! embedded VMM), both with one line cap, [`MAX_LINE`], and [`ConsoleEvent::parse`] says what
//! a line means. The scripts vmbuild writes for its guests print the markers with
//! [`phase_line`], [`PHASE_MARKER`] and [`EXIT_MARKER`]; the kit's own init
//! (`guest/init`) is checked against them by a test below.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// Starts a phase marker: `vmbuild-phase=NAME`.
pub const PHASE_MARKER: &str = "vmbuild-phase=";
/// Starts an exit marker: `vmbuild-exit=N`.
pub const EXIT_MARKER: &str = "vmbuild-exit=";

/// The phases guests announce, by who announces them.
pub mod phase {
    /// The kit's init started (the kernel's boot is over).
    pub const INIT: &str = "init";
    /// The kit's init loaded its modules and mounted the shares; a build's session
    /// script mounted its shares.
    pub const MOUNTED: &str = "mounted";
    /// The kit's init hands over to an installed system (`vmbuild.root=`).
    pub const SWITCH_ROOT: &str = "switch-root";
    /// The command script: right before and after the command.
    pub const COMMAND_START: &str = "command-start";
    pub const COMMAND_END: &str = "command-end";
    /// A build's session script started in the target.
    pub const SESSION: &str = "session";
    /// The installed `linux` target configured its network.
    pub const TARGET_UP: &str = "target-up";
    /// The controller script: its NIC is up, the target's SSH port answered, the SSH
    /// session ended, and the three ways the SSH side fails.
    pub const CONTROLLER_UP: &str = "controller-up";
    pub const PORT_OPEN: &str = "port-open";
    pub const SESSION_END: &str = "session-end";
    pub const SSH_UNREACHABLE: &str = "ssh-unreachable";
    pub const SSH_HOSTKEY: &str = "ssh-hostkey";
    pub const SSH_REFUSED: &str = "ssh-refused";
    /// A login without a session (the controller's probe at bootstrap) got in.
    pub const HANDSHAKE: &str = "handshake";
    /// The bootstrap controller logged in and waits for a session; after a revive, its
    /// RNG reseeded.
    pub const CONTROLLER_READY: &str = "controller-ready";
    pub const RESEEDED: &str = "reseeded";
}

/// The line a guest prints to announce phase `name`.
pub fn phase_line(name: &str) -> String {
    format!("{PHASE_MARKER}{name}")
}

/// Longest console line kept in one piece; a longer one is split into pieces of this
/// size (a guest that never prints a newline must not grow host memory at will).
pub const MAX_LINE: usize = 64 << 10;

/// How many of the last console lines are kept for error messages.
pub const TAIL_LINES: usize = 40;

/// What one console line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// `vmbuild-phase=NAME` at the start of the line.
    Phase(String),
    /// `vmbuild-exit=N` in the line; `None` when no number follows (a garbled line).
    Exit(Option<i32>),
    /// The kernel panicked.
    KernelPanic,
    /// The kernel's OOM killer ran.
    OutOfMemory,
    /// The kernel's last word at every power-off (it says nothing about the command).
    PowerDown,
    /// Anything else.
    Other,
}

impl ConsoleEvent {
    pub fn parse(line: &str) -> ConsoleEvent {
        if let Some(name) = line.strip_prefix(PHASE_MARKER) {
            return ConsoleEvent::Phase(name.to_owned());
        }
        // The exit marker also arrives through the kernel log, after a timestamp.
        if let Some(i) = line.find(EXIT_MARKER) {
            return ConsoleEvent::Exit(line[i + EXIT_MARKER.len()..].trim().parse().ok());
        }
        if line.contains("Kernel panic") {
            ConsoleEvent::KernelPanic
        } else if line.contains("Out of memory") {
            ConsoleEvent::OutOfMemory
        } else if line.ends_with("reboot: Power down") {
            ConsoleEvent::PowerDown
        } else {
            ConsoleEvent::Other
        }
    }

    /// A phase or exit marker: protocol, not the guest's output.
    pub fn is_marker(&self) -> bool {
        matches!(self, ConsoleEvent::Phase(_) | ConsoleEvent::Exit(_))
    }

    /// Phase `name`.
    pub fn is_phase(&self, name: &str) -> bool {
        matches!(self, ConsoleEvent::Phase(p) if p == name)
    }
}

/// Whether a console transcript shows the kit's init running: its first marker, or an
/// exit status (which it prints only after that).
pub fn shows_init(text: &str) -> bool {
    // A tty ends lines with `\r\n`, written one byte at a time: a transcript read between
    // the two ends in `\r`, which is not part of the line (`lines` keeps it there).
    text.lines().any(|l| {
        let ev = ConsoleEvent::parse(l.trim_end_matches('\r'));
        ev.is_phase(phase::INIT) || matches!(ev, ConsoleEvent::Exit(_))
    })
}

/// Whether any line of `text` says `what` (e.g. [`ConsoleEvent::KernelPanic`]).
pub fn mentions(text: &str, what: &ConsoleEvent) -> bool {
    text.lines()
        .any(|l| ConsoleEvent::parse(l.trim_end_matches('\r')) == *what)
}

/// Splits console bytes into lines: at each `\n`, and after [`MAX_LINE`] bytes without
/// one. Trailing `\r`s are dropped, bytes that are not UTF-8 become U+FFFD.
#[derive(Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    /// Hands each line that `bytes` completes to `line`.
    pub fn push(&mut self, bytes: &[u8], mut line: impl FnMut(String)) {
        for &b in bytes {
            if b == b'\n' {
                line(self.take());
            } else {
                self.partial.push(b);
                if self.partial.len() == MAX_LINE {
                    line(self.take());
                }
            }
        }
    }

    /// The last line, if the console ended in the middle of one.
    pub fn finish(&mut self) -> Option<String> {
        (!self.partial.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> String {
        let line = String::from_utf8_lossy(&self.partial)
            .trim_end_matches('\r')
            .to_owned();
        self.partial.clear();
        line
    }
}

/// The last lines a guest printed on its console (markers and blank lines left out), for
/// error messages.
#[derive(Clone, Default)]
pub struct ConsoleTail(Arc<Mutex<VecDeque<String>>>);

impl ConsoleTail {
    pub fn text(&self) -> String {
        let t = self.0.lock().unwrap();
        t.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    pub fn push(&self, line: String) {
        let mut t = self.0.lock().unwrap();
        if t.len() == TAIL_LINES {
            t.pop_front();
        }
        t.push_back(line);
    }
}

/// Where a console's lines are copied.
pub enum ConsoleLog {
    None,
    /// Every line as it came, markers included: a transcript for diagnosis.
    Transcript(Box<dyn Write + Send>),
    /// What a user reads: each line after `prefix`, without markers, blank lines and the
    /// kernel's power-off line (which are not kept in the tail either).
    ForUser {
        to: Box<dyn Write + Send>,
        prefix: &'static str,
    },
}

/// Reads a guest console until it ends, on a thread of its own: markers go to
/// `on_marker` with the moment their line was complete, the other lines to `log` and
/// `tail`.
pub fn spawn_reader(
    thread_name: &str,
    mut stream: impl Read + Send + 'static,
    mut log: ConsoleLog,
    tail: ConsoleTail,
    mut on_marker: impl FnMut(ConsoleEvent, Instant) + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(thread_name.into())
        .spawn(move || {
            let mut each = |line: String| {
                let at = Instant::now();
                let ev = ConsoleEvent::parse(&line);
                if let ConsoleLog::Transcript(to) = &mut log {
                    let _ = writeln!(to, "{line}");
                }
                if ev.is_marker() {
                    on_marker(ev, at);
                    return;
                }
                if line.is_empty() {
                    return;
                }
                if let ConsoleLog::ForUser { to, prefix } = &mut log {
                    if ev == ConsoleEvent::PowerDown {
                        return;
                    }
                    let _ = writeln!(to, "{prefix}{line}");
                }
                tail.push(line);
            };
            let mut lines = LineSplitter::default();
            let mut buf = [0u8; 16 * 1024];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => lines.push(&buf[..n], &mut each),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            if let Some(line) = lines.finish() {
                each(line);
            }
            if let ConsoleLog::Transcript(to) | ConsoleLog::ForUser { to, .. } = &mut log {
                let _ = to.flush();
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> (Vec<String>, Option<String>) {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, |l| out.push(l));
        }
        (out, s.finish())
    }

    #[test]
    fn lines_are_split_across_chunks_and_capped() {
        let long = vec![b'x'; MAX_LINE + 10];
        let (lines, rest) = split(&[
            b"vmbuild-phase=init\r\nvmbuild-ex",
            b"it=12\n",
            b"bad \xff\xfe utf-8\n",
            long.as_slice(),
            b"\n",
            b"tail without newline",
        ]);
        assert_eq!(
            lines[..3],
            [
                "vmbuild-phase=init",
                "vmbuild-exit=12",
                "bad \u{fffd}\u{fffd} utf-8"
            ]
        );
        assert_eq!(lines[3].len(), MAX_LINE);
        assert_eq!(lines[4], "x".repeat(10));
        assert_eq!(lines.len(), 5);
        assert_eq!(rest.as_deref(), Some("tail without newline"));
        // A line of exactly the cap: the piece, then the empty rest.
        let exact = vec![b'y'; MAX_LINE];
        let (lines, rest) = split(&[exact.as_slice(), b"\n"]);
        assert_eq!(lines.len(), 2);
        assert!(lines[1].is_empty() && rest.is_none());
    }

    #[test]
    fn lines_are_parsed() {
        use ConsoleEvent::*;
        let cases = [
            ("vmbuild-phase=init", Phase("init".into())),
            ("vmbuild-phase=command-end", Phase("command-end".into())),
            ("vmbuild-exit=3", Exit(Some(3))),
            ("[    2.345678] vmbuild-exit=125 ", Exit(Some(125))),
            ("vmbuild-exit=", Exit(None)),
            ("vmbuild-exit=x", Exit(None)),
            ("say vmbuild-phase=init", Other),
            ("[    1.0] Kernel panic - not syncing: x", KernelPanic),
            ("Out of memory: Killed process 1", OutOfMemory),
            ("[    3.1] reboot: Power down", PowerDown),
            ("", Other),
        ];
        for (line, want) in cases {
            assert_eq!(ConsoleEvent::parse(line), want, "{line:?}");
        }
        assert!(shows_init("noise\r\nvmbuild-phase=init\r\n"));
        assert!(shows_init("[ 1.0] vmbuild-exit=125\n"));
        assert!(!shows_init("vmbuild-phase=initx\nvmbuild-phase=mounted\n"));
        // Read between the `\r` and the `\n` of the tty's line end.
        assert!(shows_init("noise\r\nvmbuild-phase=init\r"));
        assert!(mentions("a\nKernel panic - x\nb", &KernelPanic));
        assert_eq!(phase_line(phase::TARGET_UP), "vmbuild-phase=target-up");
    }

    /// A log writer the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn read_console(log: impl Fn(Shared) -> ConsoleLog) -> (Vec<ConsoleEvent>, String, String) {
        let text: &[u8] = b"hello\r\nvmbuild-phase=init\r\n\r\n[ 1.0] vmbuild-exit=7\r\nvmbuild-exit=7\r\n[ 1.1] reboot: Power down\r\nlast";
        let shared = Shared::default();
        let tail = ConsoleTail::default();
        let markers = Arc::new(Mutex::new(Vec::new()));
        let m = markers.clone();
        spawn_reader(
            "test-console",
            text,
            log(shared.clone()),
            tail.clone(),
            move |ev, _| m.lock().unwrap().push(ev),
        )
        .unwrap()
        .join()
        .unwrap();
        let logged = String::from_utf8(shared.0.lock().unwrap().clone()).unwrap();
        let markers = markers.lock().unwrap().clone();
        (markers, logged, tail.text())
    }

    #[test]
    fn the_reader_sorts_markers_from_output() {
        use ConsoleEvent::*;
        let want = [Phase("init".into()), Exit(Some(7)), Exit(Some(7))];
        let (markers, logged, tail) = read_console(|s| ConsoleLog::ForUser {
            to: Box::new(s),
            prefix: "[guest] ",
        });
        assert_eq!(markers, want);
        assert_eq!(logged, "[guest] hello\n[guest] last\n");
        assert_eq!(tail, "hello\nlast");
        let (markers, logged, tail) = read_console(|s| ConsoleLog::Transcript(Box::new(s)));
        assert_eq!(markers, want);
        assert_eq!(
            logged,
            "hello\nvmbuild-phase=init\n\n[ 1.0] vmbuild-exit=7\nvmbuild-exit=7\n[ 1.1] reboot: Power down\nlast\n"
        );
        assert_eq!(tail, "hello\n[ 1.1] reboot: Power down\nlast");
    }

    /// The kit's init (a shell script, `guest/init`) prints the markers this module reads.
    #[test]
    fn the_kits_init_prints_these_markers() {
        let init = include_str!("../../../guest/init");
        for printed in [
            format!("echo \"{}\"", phase_line(phase::INIT)),
            format!("echo \"{}\"", phase_line(phase::MOUNTED)),
            format!("echo \"{}\"", phase_line(phase::SWITCH_ROOT)),
            format!("echo \"{EXIT_MARKER}$status\""),
            format!("echo \"<2>{EXIT_MARKER}$status\" >/dev/kmsg"),
        ] {
            assert!(
                init.contains(&printed),
                "guest/init does not print {printed}"
            );
        }
    }
}
