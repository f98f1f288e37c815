//! Suspend to a file and revive from it, with a real guest under QEMU (TCG): a counter the
//! guest prints carries on from where it was, instead of starting again.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vmbuild::guest::initrd::{self, GUEST_SCRIPT_PATH};
use vmbuild::guest::kit::GuestKit;
use vmbuild::qemu::console_guest::{ConsoleGuest, ConsoleGuestConfig};
use vmbuild::qemu::migration::StateFormat;
use vmbuild::qemu::{QemuProcess, Qmp};

const COUNTER: &[u8] = b"i=0\nwhile true; do i=$((i+1)); echo tick=$i; sleep 0.1; done\n";

struct Guest {
    qemu: QemuProcess,
    qmp: Qmp,
    ticks: mpsc::Receiver<u64>,
}

/// Boots (or, with `incoming`, prepares to revive) the counting guest.
fn start(dir: &Path, name: &str, initrd: &Path, incoming: bool) -> Guest {
    let kit = GuestKit::locate().unwrap();
    let append = vmbuild::guest::cmdline::KernelCmdline::new()
        .fast_boot()
        .command(GUEST_SCRIPT_PATH)
        .to_string();
    let g = ConsoleGuest::start(
        dir,
        name,
        &ConsoleGuestConfig {
            kernel: &kit.kernel,
            initrd,
            append: &append,
            memory_mib: 256,
            incoming,
            accel: vmbuild::accel::Accel::Tcg,
        },
    )
    .unwrap();
    Guest {
        qemu: g.qemu,
        qmp: g.qmp,
        ticks: read_ticks(g.console),
    }
}

fn read_ticks(stream: UnixStream) -> mpsc::Receiver<u64> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if let Some(n) = line
                .trim()
                .strip_prefix("tick=")
                .and_then(|n| n.parse().ok())
            {
                if tx.send(n).is_err() {
                    break;
                }
            }
        }
    });
    rx
}

fn next_tick(g: &Guest, within: Duration) -> u64 {
    g.ticks
        .recv_timeout(within)
        .expect("the guest stopped counting")
}

#[test]
fn a_suspended_guest_revives_where_it_stopped() {
    for format in [
        StateFormat::Stream,
        StateFormat::MappedRam,
        StateFormat::ZstdChannels(2),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let kit = GuestKit::locate().unwrap();
        let files: [(&str, u32, &[u8]); 1] = [(GUEST_SCRIPT_PATH, 0o755, COUNTER)];
        let initrd = initrd::with_files(&kit.initrd, dir.path(), &files).unwrap();
        let state = dir.path().join("state");

        let mut first = start(dir.path(), "a", &initrd, false);
        let mut last = 0;
        while last < 10 {
            last = next_tick(&first, Duration::from_secs(60));
        }
        let stats = first
            .qmp
            .suspend_to_file(&state, format, Duration::from_secs(60))
            .unwrap();
        // Whatever was printed before the stop took effect.
        while let Ok(n) = first.ticks.recv_timeout(Duration::from_millis(300)) {
            last = n;
        }
        assert!(stats.state_bytes > 1 << 20, "{format:?}: {stats:?}");
        first.qemu.kill();

        let mut second = start(dir.path(), "b", &initrd, true);
        let started = Instant::now();
        second
            .qmp
            .revive_from_file(&state, format, Duration::from_secs(60))
            .unwrap();
        let resumed = next_tick(&second, Duration::from_secs(30));
        assert!(
            resumed > last && resumed <= last + 3,
            "{format:?}: counted {last} before the suspend and {resumed} after the revive"
        );
        assert!(
            next_tick(&second, Duration::from_secs(30)) > resumed,
            "keeps counting"
        );
        assert!(started.elapsed() < Duration::from_secs(30));
        second.qemu.kill();
    }
}

/// A recorded channel cut short (a copy that stopped half way, a disk error): the revive
/// fails with QEMU's reason within its time, instead of waiting for bytes that never come.
#[test]
fn a_truncated_recorded_channel_fails_the_revive_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let kit = GuestKit::locate().unwrap();
    let files: [(&str, u32, &[u8]); 1] = [(GUEST_SCRIPT_PATH, 0o755, COUNTER)];
    let initrd = initrd::with_files(&kit.initrd, dir.path(), &files).unwrap();
    let state = dir.path().join("state");
    let format = StateFormat::ZstdChannels(2);

    let mut first = start(dir.path(), "a", &initrd, false);
    next_tick(&first, Duration::from_secs(60));
    first
        .qmp
        .suspend_to_file(&state, format, Duration::from_secs(60))
        .unwrap();
    first.qemu.kill();
    let channel = vmbuild::qemu::recorded_channels::channel_files(&state, 2)[2].clone();
    let len = std::fs::metadata(&channel).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&channel)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let mut second = start(dir.path(), "b", &initrd, true);
    let started = Instant::now();
    let err = second
        .qmp
        .revive_from_file(&state, format, Duration::from_secs(30))
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(40), "{err:#}");
    second.qemu.kill();
}
