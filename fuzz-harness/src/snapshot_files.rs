//! `snapshot_files`: the files a snapshot directory holds, as a restore or `vmbuild
//! build` reads them: the embedded VMM's state file (`vm-state.json`: vCPUs, memory file,
//! device state) and the lifecycle's `manifest.json`.
//!
//! Input: `kind[1]`. Kind bit 0 clear: `devices[1] state-file...`: the rest is
//! `vm-state.json` in a directory that also holds memory files (`memory-0000000000000001`,
//! 64 KiB, and `memory-0000000000000002`, 12 KiB); `devices` picks, in this order, the
//! devices the restoring VM offers: console, net, 9p (the store), fs (the store), block.
//! Kind bit 0 set: the rest is `manifest.json` in a directory with the files a bootstrap
//! leaves (see [`manifest_files`]).
//!
//! State file: [`embedded_vmm::snapshot::check`] (everything a restore checks before it
//! creates a VM) must refuse or map exactly the memory the file names, all of it
//! readable (a mapping past the end of the file would be SIGBUS); the device state then
//! goes through [`embedded_vmm::linux::check_device_states`], and each restored live
//! queue is notified (a restored queue may point anywhere). A 9p session's fids must
//! resolve inside the share. Manifest: `Manifest::load` must refuse, or accept only a
//! manifest whose every file name lies inside the snapshot directory; then the
//! checksums are verified and the state file's machine type read. Neither may panic.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use embedded_vmm::virtio::block::BlockDevice;
use embedded_vmm::virtio::console::ConsoleDevice;
use embedded_vmm::virtio::fs::FsDevice;
use embedded_vmm::virtio::net::NetDevice;
use embedded_vmm::virtio::ninep::NinepDevice;
use embedded_vmm::virtio::VirtioDevice;
use virtiofs_bridge::ninep::NinepServer;
use virtiofs_bridge::{InProcessShare, ShareConfig};
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmbuild::snapshot::manifest::{self, Manifest};

use crate::common::{content, env, Fds, Input};

/// Kind bit: the input is a manifest.
pub const MANIFEST: u8 = 1;
pub const MEMORY_FILES: [(&str, usize); 2] = [
    ("memory-0000000000000001", 64 << 10),
    ("memory-0000000000000002", 12 << 10),
];

/// The files of a QEMU snapshot directory a bootstrap leaves: name, contents.
pub fn manifest_files() -> Vec<(&'static str, Vec<u8>)> {
    let mut state = b"QEVM\x00\x00\x00\x03\x07".to_vec();
    let machine = b"pc-i440fx-10.0";
    state.extend_from_slice(&(machine.len() as u32).to_be_bytes());
    state.extend_from_slice(machine);
    state.extend_from_slice(&content(20, 3000));
    vec![
        ("disk.qcow2", content(21, 4096)),
        ("state", state),
        ("controller.cpio", content(22, 1000)),
        ("ssh/client_key", content(23, 400)),
        ("vmlinux", content(24, 5000)),
        ("initrd.img", content(25, 2000)),
        ("controller-state", content(26, 700)),
        ("controller-initrd.img", content(27, 900)),
        ("controller-kvm/vm-state.json", b"{}".to_vec()),
    ]
}

fn scratch(name: &str) -> PathBuf {
    // One directory per thread: replay tests run in parallel.
    let dir = env()
        .base()
        .join(format!("{name}-{:?}", std::thread::current().id()).replace(['(', ')'], ""));
    if !dir.exists() {
        std::fs::create_dir_all(&dir).unwrap();
    }
    dir
}

pub fn run(data: &[u8]) {
    crate::common::harness_thread();
    let env = env();
    // Verified-file stamps go to the cache; keep them in the harness's directory.
    std::env::set_var("XDG_CACHE_HOME", env.base().join("cache"));
    let mut input = Input::new(data);
    let kind = input.u8();
    if kind & MANIFEST != 0 {
        manifest_input(input.rest());
    } else {
        let devices = input.u8();
        state_input(devices, input.rest());
    }
    env.check_unchanged();
    crate::common::check_no_panic_elsewhere();
}

fn state_input(devices: u8, state: &[u8]) {
    let env = env();
    let dir = scratch("state");
    for (name, len) in MEMORY_FILES {
        let p = dir.join(name);
        if !p.exists() {
            std::fs::write(&p, content(len as u64, len)).unwrap();
        }
    }
    std::fs::write(dir.join(embedded_vmm::snapshot::VM_STATE_FILE), state).unwrap();
    let fds = Fds::now();
    let Ok((ram, device_state)) = embedded_vmm::snapshot::check(&dir) else {
        return;
    };
    // The mapping is the file, all of it readable.
    let file = MEMORY_FILES
        .iter()
        .find(|(_, len)| *len == ram.len())
        .map(|(name, len)| (name, *len));
    let (_, len) = file.expect("a memory mapping of a size no memory file has");
    let mem = ram.memory();
    let mut all = vec![0u8; len];
    mem.read_slice(&mut all, GuestAddress(0))
        .expect("the mapped memory reads back");
    assert_eq!(
        all,
        content(len as u64, len),
        "the mapping is not the memory file"
    );
    assert!(
        mem.last_addr().0 + 1 == len as u64,
        "guest memory larger than the memory file"
    );
    let Some(device_state) = device_state else {
        return;
    };
    let mut given: Vec<Box<dyn VirtioDevice>> = Vec::new();
    let store = || ShareConfig::store(env.store());
    for bit in 0..5 {
        if devices & (1 << bit) == 0 {
            continue;
        }
        given.push(match bit {
            0 => Box::new(ConsoleDevice::new().0),
            1 => {
                let switch = vswitch::Switch::new(vswitch::SwitchConfig::default());
                Box::new(NetDevice::new(
                    &switch,
                    "nic",
                    [2, 0, 0, 0, 0, 1],
                    vswitch::VlanMode::default(),
                ))
            }
            2 => Box::new(NinepDevice::new(Arc::new(
                NinepServer::new(&store()).unwrap(),
            ))),
            3 => Box::new(FsDevice::new(Arc::new(InProcessShare::new(&store()).unwrap())).unwrap()),
            _ => Box::new(BlockDevice::open(&dir.join(MEMORY_FILES[0].0)).unwrap()),
        });
    }
    let Ok(mut transports) =
        embedded_vmm::linux::check_device_states(device_state, given, mem.clone())
    else {
        return;
    };
    fds.check_since(&[env.store(), &dir]);
    // Restored queues may point anywhere: a notify of each must not hurt.
    for t in &mut transports {
        let n = t.save().queues.len();
        for q in 0..n {
            t.write(0x50, &(q as u32).to_le_bytes());
        }
    }
    drop(transports);
    fds.check_since(&[env.store(), &dir]);
}

fn manifest_input(text: &[u8]) {
    let env = env();
    let dir = scratch("manifest");
    for (name, bytes) in manifest_files() {
        let p = dir.join(name);
        if !p.exists() {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, bytes).unwrap();
        }
    }
    std::fs::write(dir.join(manifest::MANIFEST_FILE), text).unwrap();
    let Ok(m) = Manifest::load(&dir) else {
        return;
    };
    // Whatever the manifest names is a file of the snapshot: inside its directory.
    let mut names: Vec<(&str, &str)> = m
        .files
        .iter()
        .map(|f| ("files[].name", f.name.as_str()))
        .collect();
    names.push(("state.file", &m.state.file));
    names.push(("ssh.client_key", &m.ssh.client_key));
    for (what, n) in [
        ("machine.kernel", &m.machine.kernel),
        ("machine.initrd", &m.machine.initrd),
    ] {
        if let Some(n) = n {
            names.push((what, n));
        }
    }
    if let Some(c) = &m.controller {
        names.push(("controller.state", &c.state));
        names.push(("controller.initrd", &c.initrd));
    }
    for (what, name) in names {
        assert!(
            inside(name),
            "Manifest::load accepted {what} '{name}', which is not a file inside the snapshot"
        );
    }
    let _ = manifest::verify_files(&dir, &m, true);
    let _ = manifest::verify_files(&dir, &m, false);
    let _ = m.check_state_machine(&dir);
    let _ = env;
}

/// A relative path of plain names (no root, no `..`), as a snapshot's files are named.
pub fn inside(name: &str) -> bool {
    let p = Path::new(name);
    !name.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)))
}
