//! Running one suite's engine as a child: its progress shown as one line, its table and
//! samples collected, and on Ctrl-C its whole process group stopped and everything it made
//! (work directory, namespaces, links, a daemonized vde_switch) removed.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::sample::{read_samples, Sample};
use super::suite::Suite;

/// What one engine produced.
#[derive(Debug, serde::Serialize)]
pub struct EngineRun {
    pub suite: Suite,
    pub engine: PathBuf,
    pub args: Vec<String>,
    /// The engine's tables (Markdown), as BENCHMARKS.md shows them.
    pub tables: String,
    pub seconds: f64,
    pub samples: Vec<Sample>,
}

pub enum Outcome {
    Done(EngineRun),
    Interrupted,
    /// The engine failed: its exit status and last lines.
    Failed(String),
}

/// Runs `engine args…` for `suite`, writing its samples to `samples`, until it ends or a
/// signal arrives on `signals`.
pub fn run(
    suite: Suite,
    engine: &Path,
    args: Vec<String>,
    samples: &Path,
    signals: &Receiver<()>,
    show_progress: bool,
) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let mut cmd = Command::new(engine);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group: Ctrl-C is vmbuild's to handle, and stopping the group stops the
        // engine's QEMUs, servers and iperf3s with it.
        .process_group(0);
    // SAFETY: prctl and sigprocmask between fork and exec are async-signal-safe. The
    // engine dies with vmbuild, and does not inherit the signals vmbuild blocks to wait
    // for them (it must act on the SIGTERM that stops it).
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", engine.display()))?;
    let pid = child.id();
    let (tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped");
    let progress = tx.clone();
    let tables = std::thread::spawn(move || {
        // Engines print tables on stdout and progress (`[engine] …`) on stderr; an engine
        // inside the nested KVM host has both on stdout (its console), so progress lines
        // there count as progress too.
        let mut s = String::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with('[') && line.contains("] ") {
                let _ = progress.send(line.clone());
            }
            s.push_str(&line);
            s.push('\n');
        }
        s
    });
    let stderr = child.stderr.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let line = ProgressLine::new(suite, show_progress);
    let mut tail: Vec<String> = Vec::new();
    let status = loop {
        if signals.try_recv().is_ok() {
            line.clear();
            stop_group(pid, &mut child);
            clean_up_after(suite, pid);
            return Ok(Outcome::Interrupted);
        }
        match lines.recv_timeout(Duration::from_millis(100)) {
            Ok(l) => {
                line.show(&l, started);
                tail.push(l);
                if tail.len() > 200 {
                    tail.remove(0);
                }
            }
            Err(RecvTimeoutError::Timeout) => line.tick(started),
            Err(RecvTimeoutError::Disconnected) => {}
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
    };
    // What the engine wrote last, after it exited.
    while let Ok(l) = lines.recv_timeout(Duration::from_millis(50)) {
        tail.push(l);
    }
    line.clear();
    let tables = tables.join().unwrap_or_default();
    if !status.success() {
        clean_up_after(suite, pid);
        return Ok(Outcome::Failed(format!(
            "{} {status}: {}",
            engine.display(),
            engine_error(&tail)
        )));
    }
    let samples = read_samples(samples)
        .with_context(|| format!("reading the samples {} wrote", engine.display()))?;
    Ok(Outcome::Done(EngineRun {
        suite,
        engine: engine.to_owned(),
        args,
        tables,
        seconds: started.elapsed().as_secs_f64(),
        samples,
    }))
}

/// An engine's error from its last lines: from anyhow's `Error:` up to the backtrace, or
/// else its last few lines.
fn engine_error(tail: &[String]) -> String {
    let lines: Vec<&str> = match tail.iter().rposition(|l| l.starts_with("Error:")) {
        Some(i) => tail[i..]
            .iter()
            .map(|l| l.trim())
            .take_while(|l| !l.starts_with("Stack backtrace"))
            .filter(|l| !l.is_empty())
            .collect(),
        None => tail
            .iter()
            .rev()
            .take(8)
            .rev()
            .map(String::as_str)
            .collect(),
    };
    lines.join(" | ")
}

/// SIGTERM to the engine's process group, SIGKILL to what is left after 5 s.
fn stop_group(pid: u32, child: &mut std::process::Child) {
    let group = nix::unistd::Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The group's other members (QEMU, servers) may outlive the engine by a moment.
    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
}

/// Removes what an engine stopped mid-run leaves outside its work directory. The switch
/// and nic engines name its namespaces `vmbt-*-PID`, its links `sb{a,b,r}N` with N = PID % 10000,
/// and starts vde_switch as a daemon (outside its group) with a pid file and control
/// directory named after N.
pub fn clean_up_after(suite: Suite, pid: u32) {
    if suite == Suite::Build {
        // image-bench loop-mounts the toolchain image for its peers; keeps the rest of its
        // work directory (the source tarball) for the next run.
        let root = Path::new(super::suite::BUILD_WORKDIR).join("root");
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        if mounts
            .lines()
            .any(|l| l.split(' ').nth(1) == Some(&*root.to_string_lossy()))
        {
            quiet(Command::new("umount").arg("-l").arg(&root));
        }
        return;
    }
    // The nic engine (vde-bench) names its namespace the same way; its switches and taps
    // are in its process group and go with it.
    if !matches!(suite, Suite::Switch | Suite::Nic) {
        return;
    }
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for ns in String::from_utf8_lossy(&out.stdout).lines() {
            let name = ns.split_whitespace().next().unwrap_or("");
            if name.starts_with("vmbt-") && name.ends_with(&format!("-{pid}")) {
                quiet(Command::new("ip").args(["netns", "del", name]));
            }
        }
    }
    if suite != Suite::Switch {
        return;
    }
    let n = pid % 10_000;
    for link in [
        format!("sba{n}"),
        format!("sbb{n}"),
        format!("sbr{n}"),
        format!("sba{n}p"),
        format!("sbb{n}p"),
    ] {
        quiet(Command::new("ip").args(["link", "del", &link]));
    }
    let pidfile = std::env::temp_dir().join(format!("vde-bench-{n}.pid"));
    if let Some(vde) = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(vde),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let _ = std::fs::remove_file(&pidfile);
    let _ = std::fs::remove_dir_all(format!("/tmp/vde-bench-{n}.ctl"));
}

fn quiet(cmd: &mut Command) {
    let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// One line of progress: on a terminal rewritten in place with the elapsed time, into a
/// file or pipe one line per engine step.
struct ProgressLine {
    suite: Suite,
    enabled: bool,
    tty: bool,
    last: std::cell::RefCell<String>,
}

impl ProgressLine {
    fn new(suite: Suite, enabled: bool) -> ProgressLine {
        ProgressLine {
            suite,
            enabled,
            tty: std::io::stderr().is_terminal(),
            last: Default::default(),
        }
    }

    fn show(&self, engine_line: &str, started: Instant) {
        // Engines prefix their lines with `[fs-bench] `.
        let text = engine_line
            .split_once("] ")
            .filter(|(p, _)| p.starts_with('['))
            .map_or(engine_line, |(_, rest)| rest);
        *self.last.borrow_mut() = text.to_owned();
        if !self.enabled {
            return;
        }
        if self.tty {
            self.tick(started);
        } else {
            eprintln!("vmbuild bench: {}: {text}", self.suite.name());
        }
    }

    fn tick(&self, started: Instant) {
        if self.enabled && self.tty {
            let s = started.elapsed().as_secs();
            eprint!(
                "\r\x1b[Kvmbuild bench: {} [{}:{:02}] {}",
                self.suite.name(),
                s / 60,
                s % 60,
                self.last.borrow()
            );
            let _ = std::io::stderr().flush();
        }
    }

    fn clear(&self) {
        if self.enabled && self.tty {
            eprint!("\r\x1b[K");
            let _ = std::io::stderr().flush();
        }
    }
}
