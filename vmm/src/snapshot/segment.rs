//! A build's private network: its own in-process switch with two stream ports, one for
//! the target and one for a QEMU controller (an embedded controller takes an in-process
//! port instead). Every build gets its own, so concurrent builds
//! from one snapshot can all use the snapshot's addresses without seeing each other.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vswitch::managed::ManagedSwitch;
use vswitch::{Switch, SwitchConfig, VlanMode};

pub struct Segment {
    switch: Arc<ManagedSwitch>,
    pub target_socket: PathBuf,
    pub controller_socket: PathBuf,
}

impl Segment {
    /// The segment's switch, for a guest of this process (the embedded controller).
    pub fn switch(&self) -> &Arc<Switch> {
        self.switch.switch()
    }

    pub fn create(dir: &Path) -> anyhow::Result<Segment> {
        let switch = ManagedSwitch::new(Switch::new(SwitchConfig::default()), false);
        let target_socket = dir.join("net-target.sock");
        let controller_socket = dir.join("net-controller.sock");
        switch.add_stream(&target_socket, VlanMode::default())?;
        switch.add_stream(&controller_socket, VlanMode::default())?;
        Ok(Segment {
            switch,
            target_socket,
            controller_socket,
        })
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // Stops the port threads and unlinks the sockets.
        self.switch.close_all();
    }
}
