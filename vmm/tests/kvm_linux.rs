//! The guest kit's Linux under the embedded VMM (PVH entry, initramfs, COM1 console).
//!
//! Tests marked `needs a KVM that runs Linux` boot the kit to init and beyond; where
//! this host's KVM cannot (kvm_pvm, which stops Linux with an emulation failure),
//! `scripts/test.sh` runs them in a nested KVM host, so they always run, and must
//! pass. The others check, on any KVM, what holds before the kernel gets far: it starts
//! from the PVH entry, finds its command line, prints its banner and reads the ACPI
//! tables the VMM wrote.

use std::time::Duration;

use embedded_vmm::linux::{LinuxConfig, LinuxEnd, LinuxVm};
use embedded_vmm::uart::Transcript;
use embedded_vmm::virtio::console::ConsoleDevice;

/// The guest kit's kernel and initramfs, where there is a KVM to boot them; otherwise
/// reports test `name` skipped and gives nothing.
fn kit(name: &str) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    if !std::path::Path::new("/dev/kvm").exists() {
        vmbuild_tests::skip(name, "no /dev/kvm");
        return None;
    }
    Some(kit_files())
}

/// The guest kit's kernel and initramfs, which a test that needs them cannot do without.
fn kit_files() -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::var_os("VMBUILD_GUEST_KIT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/var/cache/vmbuild/guest-kit".into());
    let (k, i) = (dir.join("vmlinux"), dir.join("initrd.img"));
    assert!(
        k.is_file() && i.is_file(),
        "no guest kit in {} (scripts/guest-kit.sh)",
        dir.display()
    );
    (k, i)
}

fn show_console() -> bool {
    std::env::var_os("VMBUILD_SHOW_CONSOLE").is_some()
}

/// Runs `vm` until the guest ends it (at most 120 s): how, and its console.
fn run_to_end(vm: &mut LinuxVm) -> (LinuxEnd, String) {
    let end = vm.run(Duration::from_secs(120));
    let console = vm.console.text();
    if show_console() {
        eprintln!("{console}\n--- {end:?}");
    }
    (end, console)
}

const BOOT_CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1 cryptomgr.notests \
                            vmbuild.cmd=/etc/vmbuild/true.sh";

/// The kit's initramfs with a command script that succeeds (kept in `dir`).
fn initrd_with_command(initrd: &std::path::Path, dir: &std::path::Path) -> std::path::PathBuf {
    vmbuild::guest::initrd::with_files(initrd, dir, &[("/etc/vmbuild/true.sh", 0o755, b"exit 0\n")])
        .unwrap()
}

fn boot_kit(kernel: &std::path::Path, initrd: &std::path::Path) -> LinuxVm {
    let dir = tempfile::tempdir().unwrap();
    let initrd = initrd_with_command(initrd, dir.path());
    LinuxVm::new(
        &LinuxConfig {
            kernel,
            initrd: Some(&initrd),
            cmdline: BOOT_CMDLINE,
            memory_mib: 256,
            vcpus: 1,
        },
        Transcript::new(None),
        Vec::new(),
        vec![Box::new(ConsoleDevice::new().0)],
    )
    .unwrap()
}

/// On a KVM that runs Linux (the current host's own KVM stops it before the banner):
/// the kernel ran from the PVH entry, got its command
/// line and, past setup_arch, read the ACPI tables (the virtio-mmio devices' DSDT, the
/// MADT with its IOAPIC).
#[test]
#[ignore = "needs a KVM that runs Linux (scripts/test.sh runs it in a nested KVM host): some hosts' KVM stops it before the banner"]
fn the_guest_kit_starts_from_its_pvh_entry_and_reads_the_acpi_tables() {
    let Some((kernel, initrd)) =
        kit("the_guest_kit_starts_from_its_pvh_entry_and_reads_the_acpi_tables")
    else {
        return;
    };
    let mut vm = boot_kit(&kernel, &initrd);
    // Until the kernel is past reading the tables (or the VM ends: this host's KVM may
    // stop Linux with an emulation failure).
    let mut end = LinuxEnd::TimedOut;
    for _ in 0..15 {
        end = vm.run(Duration::from_secs(2));
        if end != LinuxEnd::TimedOut || vm.console.text().contains("Using ACPI (MADT)") {
            break;
        }
    }
    let console = vm.console.text();
    if show_console() {
        eprintln!("{console}\n--- {end:?}");
    }
    assert!(
        console.contains("Linux version"),
        "no kernel banner on the console ({end:?}):\n{console}"
    );
    assert!(
        console.contains("vmbuild.cmd=/etc/vmbuild/true.sh"),
        "the kernel did not see its command line:\n{console}"
    );
    for line in ["ACPI: DSDT", "ACPI: APIC", "Using ACPI (MADT)"] {
        assert!(
            console.contains(line),
            "no '{line}' on the console ({end:?}):\n{console}"
        );
    }
}

/// The whole boot: the guest finds KVM (CPUID's hypervisor bit), runs on kvm-clock, gets
/// to the kit's init, runs its command and powers off through ACPI.
#[test]
#[ignore = "needs a KVM that runs Linux (scripts/test.sh runs it in a nested KVM host)"]
fn the_guest_kit_boots_to_init_on_kvm_clock_and_powers_off() {
    let (kernel, initrd) = kit_files();
    let mut vm = boot_kit(&kernel, &initrd);
    let (end, console) = run_to_end(&mut vm);
    for line in [
        "Hypervisor detected: KVM",
        "kvm-clock: Using msrs",
        "clocksource: Switched to clocksource kvm-clock",
        "vmbuild-phase=init",
        "vmbuild-exit=0",
    ] {
        assert!(console.contains(line), "no '{line}' ({end:?}):\n{console}");
    }
    assert_eq!(end, LinuxEnd::PowerOff, "the kit powers off with ACPI");
}

/// A Linux guest idling in the kit's shell is snapshotted and restored: the restored
/// guest carries on (no second boot), its clock goes on from where it was, and a restore
/// with other devices than the snapshot had is refused.
#[test]
#[ignore = "needs a KVM that runs Linux (scripts/test.sh runs it in a nested KVM host)"]
fn a_running_linux_is_snapshotted_and_restored_and_keeps_running() {
    let (kernel, initrd) = kit_files();
    let config = LinuxConfig {
        kernel: &kernel,
        initrd: Some(&initrd),
        // No vmbuild.cmd: the kit's init ends in an idle shell, which keeps the guest up.
        cmdline: "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1 cryptomgr.notests",
        memory_mib: 256,
        vcpus: 1,
    };
    let mut vm = LinuxVm::new(
        &config,
        Transcript::new(None),
        Vec::new(),
        vec![Box::new(ConsoleDevice::new().0)],
    )
    .unwrap();
    let mut slices = 0;
    let before = loop {
        let end = vm.run(Duration::from_secs(2));
        assert_eq!(end, LinuxEnd::TimedOut, "{}", vm.console.text());
        let text = vm.console.text();
        if text.contains("vmbuild-phase=init") {
            // A little longer: into the idle shell.
            assert_eq!(vm.run(Duration::from_secs(2)), LinuxEnd::TimedOut);
            break vm.console.text();
        }
        slices += 1;
        assert!(slices < 60, "no init within 120 s:\n{text}");
    };
    let dir = tempfile::tempdir().unwrap();
    vm.snapshot(dir.path()).unwrap();
    drop(vm);

    let mut restored = LinuxVm::restore(
        dir.path(),
        Transcript::new(None),
        Vec::new(),
        vec![Box::new(ConsoleDevice::new().0)],
    )
    .unwrap();
    let end = restored.run(Duration::from_secs(5));
    let after = restored.console.text();
    if show_console() {
        eprintln!("--- before the snapshot:\n{before}\n--- after the restore ({end:?}):\n{after}");
    }
    assert!(
        !after.contains("Linux version"),
        "the restored guest booted from scratch:\n{after}"
    );
    assert_eq!(
        end,
        LinuxEnd::TimedOut,
        "the restored guest stopped:\n{after}"
    );
    // Device state came along: a restore with another set of devices is refused.
    assert!(LinuxVm::restore(dir.path(), Transcript::new(None), Vec::new(), Vec::new()).is_err());
}

#[test]
#[ignore = "needs a KVM that runs Linux (scripts/test.sh runs it in a nested KVM host)"]
fn a_run_in_the_embedded_vmm_serves_its_shares_and_cleans_up() {
    use vmbuild::vm::run::{RunEnd, RunSpec, Vmm};
    let (kernel, initrd) = kit_files();
    let qemu = vmbuild::qemu::QemuBinary::locate().unwrap();
    let runtime = tempfile::tempdir().unwrap();
    let xchg = tempfile::tempdir().unwrap();
    std::fs::write(xchg.path().join("in"), "from the host\n").unwrap();
    let spec = RunSpec {
        qemu,
        accel: vmbuild::accel::Accel::Kvm,
        kernel,
        initrd,
        append: None,
        memory_mib: 256,
        cpus: 1,
        argv: ["sh", "-c", "cat /tmp/xchg/in > /tmp/xchg/out"]
            .iter()
            .map(Into::into)
            .collect(),
        shell: false,
        env: Vec::new(),
        cwd: None,
        store: None,
        xchg: Some(xchg.path().to_owned()),
        keep_xchg: false,
        xchg_writeback: false,
        no_xchg: false,
        nic: None,
        extra_shares: Vec::new(),
        disk: None,
        image: None,
        timeout: Some(Duration::from_secs(120)),
        log: None,
        vmm: Vmm::Embedded,
        share_protocol: Default::default(),
        dax: false,
        runtime_dir: Some(runtime.path().to_owned()),
    };
    let (_tx, rx) = std::sync::mpsc::channel();
    let outcome = vmbuild::vm::run_embedded::run_embedded(&spec, rx).unwrap();
    // Nothing of the run is left.
    let left: Vec<_> = std::fs::read_dir(runtime.path().join("vmbuild"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(
        matches!(outcome.end, RunEnd::Exited(0)),
        "{:?}",
        outcome.end
    );
    assert_eq!(
        std::fs::read_to_string(xchg.path().join("out")).unwrap(),
        "from the host\n"
    );
}

fn boot_bzimage(vmlinux: &std::path::Path, initrd: &std::path::Path) -> LinuxVm {
    let bzimage = vmlinux.with_file_name("bzImage");
    let dir = tempfile::tempdir().unwrap();
    let initrd = initrd_with_command(initrd, dir.path());
    LinuxVm::new(
        &LinuxConfig {
            kernel: &bzimage,
            initrd: Some(&initrd),
            cmdline: BOOT_CMDLINE,
            memory_mib: 256,
            vcpus: 1,
        },
        Transcript::new(None),
        Vec::new(),
        Vec::new(),
    )
    .unwrap()
}

/// On any KVM: the bzImage's decompressor runs from the 64-bit entry (under an
/// emulated-paging KVM it alone takes minutes): it relocated itself above the 16 MiB the
/// kernel is decompressed to, and keeps running there, with no fault and no exit.
#[test]
fn the_guest_kits_bzimage_decompressor_runs_from_the_64_bit_entry() {
    let name = "the_guest_kits_bzimage_decompressor_runs_from_the_64_bit_entry";
    let Some((vmlinux, initrd)) = kit(name) else {
        return;
    };
    let mut vm = boot_bzimage(&vmlinux, &initrd);
    // Sampled once a second for up to 30 s: a slow KVM (emulated or nested paging, a
    // busy host) spends seconds in one `rep movs` of the relocation, where the RIP does
    // not move, so a few samples prove nothing either way.
    let mut rips = Vec::new();
    for _ in 0..30 {
        let end = vm.run(Duration::from_secs(1));
        if vm.console.text().contains("Linux version") {
            // A KVM that runs Linux is through the decompressor already.
            return;
        }
        assert_eq!(end, LinuxEnd::TimedOut, "the bzImage stopped: {rips:x?}");
        rips.push(vm.vcpu_regs().unwrap().rip);
        let relocated: Vec<u64> = rips.iter().copied().filter(|r| *r > 16 << 20).collect();
        if relocated.windows(2).any(|w| w[0] != w[1]) {
            return;
        }
    }
    panic!("the decompressor did not run on above 16 MiB within 30 s: {rips:x?}");
}

/// The whole bzImage boot through the 64-bit protocol: banner, command line, init.
#[test]
#[ignore = "needs a KVM that runs Linux (scripts/test.sh runs it in a nested KVM host)"]
fn the_guest_kits_bzimage_boots_through_the_64_bit_protocol() {
    let (vmlinux, initrd) = kit_files();
    let mut vm = boot_bzimage(&vmlinux, &initrd);
    let (end, console) = run_to_end(&mut vm);
    assert!(console.contains("Linux version"), "no banner:\n{console}");
    assert!(
        console.contains("vmbuild.cmd=/etc/vmbuild/true.sh"),
        "{console}"
    );
    assert!(console.contains("vmbuild-exit=0"), "{console}");
    assert_eq!(end, LinuxEnd::PowerOff);
}

/// The embedded VMM's own probe (what lets `run --vmm auto` and a build's controller pick
/// it) must agree with QEMU's: where KVM cannot run Linux, the embedded VMM must say so
/// with a reason rather than hang or claim success.
#[test]
fn the_embedded_probe_agrees_with_qemus() {
    let name = "the_embedded_probe_agrees_with_qemus";
    let Some((kernel, initrd)) = kit(name) else {
        return;
    };
    let qemu = vmbuild::qemu::QemuBinary::locate().unwrap();
    let by_qemu = vmbuild::accel::probe_kvm_cached(&qemu.path, &kernel, &initrd);
    let started = std::time::Instant::now();
    let embedded =
        vmbuild::accel::embedded_probe::boot_to_init(&kernel, &initrd, vmbuild::accel::PROBE_LIMIT);
    assert!(
        started.elapsed() < vmbuild::accel::PROBE_LIMIT + Duration::from_secs(5),
        "the probe overran its limit: {:?}",
        started.elapsed()
    );
    assert_eq!(
        embedded.usable, by_qemu.usable,
        "QEMU: {}; embedded: {}",
        by_qemu.reason, embedded.reason
    );
    assert!(!embedded.reason.is_empty());
}

/// Where KVM runs Linux, both probes say yes (and `doctor` reports it).
#[test]
#[ignore = "needs a KVM that runs Linux (scripts/test.sh runs it in a nested KVM host)"]
fn both_probes_say_yes_where_kvm_runs_linux() {
    let (kernel, initrd) = kit_files();
    let qemu = vmbuild::qemu::QemuBinary::locate().unwrap();
    let by_qemu = vmbuild::accel::probe_kvm(&qemu.path, &kernel, &initrd);
    assert!(by_qemu.usable, "{}", by_qemu.reason);
    let embedded =
        vmbuild::accel::embedded_probe::boot_to_init(&kernel, &initrd, vmbuild::accel::PROBE_LIMIT);
    assert!(embedded.usable, "{}", embedded.reason);
    let doctor = std::process::Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    for check in ["kvm_runs_linux", "embedded_runs_linux"] {
        let finding = report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["check"] == check)
            .unwrap_or_else(|| panic!("doctor reports no {check}: {report}"));
        assert_eq!(finding["status"], "ok", "{finding}");
    }
}

/// The guest's MAC on the test's switches.
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// A Linux guest with a NIC on an in-process switch port and xchg over 9p, per copy.
struct Copy {
    switch: std::sync::Arc<vswitch::Switch>,
    observer: vswitch::InProcessPort,
    xchg: tempfile::TempDir,
}

impl Copy {
    fn new() -> Copy {
        let switch = vswitch::Switch::new(vswitch::SwitchConfig::default());
        let observer =
            vswitch::InProcessPort::attach(&switch, "observer", vswitch::VlanMode::default());
        Copy {
            switch,
            observer,
            xchg: tempfile::tempdir().unwrap(),
        }
    }

    fn devices(&self) -> Vec<Box<dyn embedded_vmm::virtio::VirtioDevice>> {
        use embedded_vmm::virtio::net::NetDevice;
        use embedded_vmm::virtio::ninep::NinepDevice;
        let share = virtiofs_bridge::ShareConfig::xchg(self.xchg.path());
        vec![
            Box::new(NetDevice::new(
                &self.switch,
                "guest",
                GUEST_MAC,
                vswitch::VlanMode::default(),
            )),
            Box::new(NinepDevice::new(std::sync::Arc::new(
                virtiofs_bridge::ninep::NinepServer::new(&share).unwrap(),
            ))),
        ]
    }

    /// Frames the guest sent (by its source MAC) that reached the observer.
    fn frames_from_guest(&self) -> usize {
        let mut frames = Vec::new();
        self.observer.drain(&mut frames);
        frames
            .iter()
            .filter(|f| f.get(6..12) == Some(&GUEST_MAC[..]))
            .count()
    }
}

/// A running Linux guest with a NIC and a 9p share is snapshotted while its command
/// waits, and restored twice at once from the one snapshot, each copy with its own switch
/// and its own xchg directory: both copies carry on, the command started before the
/// snapshot completes in each, each copy's NIC sends on its own switch, and the results
/// are independent (each in its own directory, each from an RNG reseeded by the restore's
/// new VM generation).
#[test]
#[ignore = "needs a KVM that runs Linux (scripts/test.sh runs it in a nested KVM host)"]
fn a_running_linux_with_a_nic_and_a_9p_share_is_restored_twice_at_once() {
    let (kernel, initrd) = kit_files();
    let dir = tempfile::tempdir().unwrap();
    // Link-local addresses on the test's own in-process switches: nothing leaves them.
    let job = b"set -e
forks() { dmesg | grep -c 'crng reseeded due to virtual machine fork' || true; }
ip link set eth0 up
ip addr add 169.254.7.2/16 dev eth0
echo started > /tmp/xchg/started
echo job: waiting for go
while [ ! -e /tmp/xchg/go ]; do sleep 0.1; done
echo job: go
n=0
while [ \"$(forks)\" -eq 0 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done
ping -c 2 -W 1 169.254.7.1 >/dev/null 2>&1 || true
cat /proc/sys/kernel/random/uuid > /tmp/xchg/result
echo \"forks=$(forks)\" >> /tmp/xchg/result
echo job: done
";
    let initrd = vmbuild::guest::initrd::with_files(
        &initrd,
        dir.path(),
        &[("/etc/vmbuild/job.sh", 0o755, &job[..])],
    )
    .unwrap();
    let config = LinuxConfig {
        kernel: &kernel,
        initrd: Some(&initrd),
        cmdline: "console=ttyS0 reboot=k panic=-1 quiet cryptomgr.notests random.trust_cpu=on \
                  vmbuild.mount=9p:xchg:/tmp/xchg vmbuild.cmd=/etc/vmbuild/job.sh",
        memory_mib: 256,
        vcpus: 1,
    };
    let original = Copy::new();
    let mut vm = LinuxVm::new(
        &config,
        Transcript::new(None),
        Vec::new(),
        original.devices(),
    )
    .unwrap();
    let started = original.xchg.path().join("started");
    for slice in 0.. {
        assert_eq!(
            vm.run(Duration::from_secs(1)),
            LinuxEnd::TimedOut,
            "{}",
            vm.console.text()
        );
        if started.exists() {
            break;
        }
        assert!(slice < 120, "the job never started:\n{}", vm.console.text());
    }
    // Into its wait for `go`, then the snapshot.
    assert_eq!(vm.run(Duration::from_millis(500)), LinuxEnd::TimedOut);
    let snapshot = tempfile::tempdir().unwrap();
    vm.snapshot(snapshot.path()).unwrap();
    drop(vm);

    let copies: Vec<Copy> = (0..2).map(|_| Copy::new()).collect();
    std::thread::scope(|scope| {
        let runs: Vec<_> = copies
            .iter()
            .map(|copy| {
                let snapshot = snapshot.path();
                scope.spawn(move || {
                    std::fs::write(copy.xchg.path().join("started"), "started\n").unwrap();
                    let mut vm = LinuxVm::restore(
                        snapshot,
                        Transcript::new(None),
                        Vec::new(),
                        copy.devices(),
                    )
                    .unwrap();
                    std::fs::write(copy.xchg.path().join("go"), "").unwrap();
                    let end = vm.run(Duration::from_secs(120));
                    (end, vm.console.text())
                })
            })
            .collect();
        for (i, run) in runs.into_iter().enumerate() {
            let (end, console) = run.join().unwrap();
            assert_eq!(end, LinuxEnd::PowerOff, "copy {i}:\n{console}");
            assert!(console.contains("vmbuild-exit=0"), "copy {i}:\n{console}");
            assert!(
                !console.contains("Linux version"),
                "copy {i} booted again:\n{console}"
            );
        }
    });
    let results: Vec<String> = copies
        .iter()
        .map(|c| std::fs::read_to_string(c.xchg.path().join("result")).unwrap())
        .collect();
    for (i, r) in results.iter().enumerate() {
        assert!(r.contains("forks=1"), "copy {i} did not reseed: {r}");
        assert!(
            copies[i].frames_from_guest() > 0,
            "copy {i}'s NIC sent nothing on its switch"
        );
    }
    assert_ne!(
        results[0], results[1],
        "the copies drew the same random numbers"
    );
    assert!(!original.xchg.path().join("result").exists());
}

/// `run --image` under the embedded VMM: the image on its virtio-blk device, the command
/// chrooted in it with its own /proc and the shares inside, and the guest's writes kept
/// out of the image. (An ext4 root with busybox, made here with mke2fs: the same device
/// and init path as a Debian image, which would take minutes to build in a nested host.)
#[test]
#[ignore = "needs a KVM that runs Linux (scripts/test.sh runs it in a nested KVM host)"]
fn the_embedded_vmm_runs_a_command_in_an_image() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    for d in ["bin", "proc", "sys", "dev", "tmp", "run", "root", "etc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "echo", "stty", "test", "mkdir"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("marker"), "inside the image\n").unwrap();
    let image = dir.path().join("image.raw");
    let mkfs = std::process::Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-d"])
        .arg(&root)
        .arg(&image)
        .arg("32M")
        .output()
        .unwrap();
    assert!(mkfs.status.success(), "{mkfs:?}");
    let before = std::fs::read(&image).unwrap();
    let xchg = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .args(["run", "--quiet", "--vmm", "embedded", "--image"])
        .arg(&image)
        .arg("--xchg")
        .arg(xchg.path())
        .args([
            "--",
            "sh",
            "-c",
            "cat /marker; echo changed > /marker; cat /marker; \
             test -d /proc/self && echo proc; echo out > /tmp/xchg/f; exit 4",
        ])
        .output()
        .unwrap();
    let text = format!(
        "{:?}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "inside the image\nchanged\nproc\n",
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(xchg.path().join("f")).unwrap(),
        "out\n"
    );
    assert!(
        std::fs::read(&image).unwrap() == before,
        "the run changed the image"
    );
}

/// `vmbuild run --dax`: the store is mounted `dax=inode` over the virtio-fs device's DAX
/// window, a large file is read through it (a small one with READ), both match the
/// host's, and once its ranges are mapped the guest reads the large file again with no
/// request at all, even after dropping its page cache. The same run without `--dax`
/// sends READs again: the count tells the two apart.
#[test]
#[ignore = "needs a KVM that runs Linux (scripts/test.sh runs it in a nested KVM host)"]
fn a_dax_window_serves_the_store_with_no_request_after_the_first_mapping() {
    use sha2::Digest;
    const LOOKUP: u32 = 1;
    const READ: u32 = 15;
    const SETUPMAPPING: u32 = 48;
    let store = tempfile::tempdir().unwrap();
    // 6 MiB and a bit: several of the guest's 2 MiB mapping ranges, the last one partial.
    let big: Vec<u8> = (0..(6 << 20) + 12_345u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(store.path().join("big"), &big).unwrap();
    std::fs::write(store.path().join("small"), "a small file\n").unwrap();
    let hex = |data: &[u8]| {
        sha2::Sha256::digest(data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let sums = format!("{}\n{}\n{}\n", hex(&big), hex(b"a small file\n"), hex(&big));
    let script = "grep -o 'dax=inode' /proc/mounts | head -n 1; \
        sha256sum /store/big /store/small | cut -d' ' -f1; ls /store/marker-one 2>/dev/null; \
        echo 1 > /proc/sys/vm/drop_caches; \
        sha256sum /store/big | cut -d' ' -f1; ls /store/marker-two 2>/dev/null; true";
    let run = |dax: bool| {
        let record = tempfile::tempdir().unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vmbuild"));
        cmd.args(["run", "--quiet", "--vmm", "embedded", "--store"])
            .arg(store.path())
            .args(["--store-mount", "/store"])
            .env("VMBUILD_RECORD_DIR", record.path());
        if dax {
            cmd.arg("--dax");
        }
        let out = cmd.args(["--", "sh", "-c", script]).output().unwrap();
        let text = format!(
            "{:?}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(0), "{text}");
        let sessions = vmbuild_tests::recorded_fuse_sessions(record.path());
        let is_marker = |name: &'static str| {
            move |(op, body): &(u32, Vec<u8>)| *op == LOOKUP && body.starts_with(name.as_bytes())
        };
        let store_session = sessions
            .into_iter()
            .find(|s| s.iter().any(is_marker("marker-one")))
            .unwrap_or_else(|| panic!("no session of the store was recorded\n{text}"));
        let first = store_session
            .iter()
            .position(is_marker("marker-one"))
            .unwrap();
        let second = store_session
            .iter()
            .position(is_marker("marker-two"))
            .unwrap();
        let count = |ops: &[(u32, Vec<u8>)], opcode: u32| {
            ops.iter().filter(|(op, _)| *op == opcode).count()
        };
        let before = &store_session[..first];
        let between = &store_session[first + 1..second];
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            [count(before, READ), count(before, SETUPMAPPING)],
            [count(between, READ), count(between, SETUPMAPPING)],
            text,
        )
    };

    let (stdout, before, between, text) = run(true);
    assert_eq!(stdout, format!("dax=inode\n{sums}"), "{text}");
    // The small file (13 bytes) is read with READ; the large one only through the window.
    assert!(
        before[0] <= 2,
        "{} READs before the marker: {text}",
        before[0]
    );
    assert!(before[1] >= 1, "no FUSE_SETUPMAPPING: {text}");
    assert_eq!(between, [0, 0], "the second read sent requests: {text}");

    let (stdout, _, between, text) = run(false);
    assert_eq!(stdout, sums, "{text}");
    assert!(
        between[0] > 0,
        "without DAX the second read should READ again: {text}"
    );
}
