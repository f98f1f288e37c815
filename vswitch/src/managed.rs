//! A switch together with the ports it owns (taps it opened, vhost-user sockets it
//! serves), so that ports can be added and removed while it runs (from the command line
//! at start, or from the management console later) and a removed port really goes away:
//! its reader stops, its tap or socket is closed.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::port::{PortId, VlanMode};
use crate::stream::StreamPort;
use crate::switch::Switch;
use crate::tap::{Tap, TapPort};
use crate::vhost_user_net::VhostUserNetPort;

enum Owned {
    Tap(#[allow(dead_code)] TapPort),
    VhostUser(#[allow(dead_code)] VhostUserNetPort),
    Stream(#[allow(dead_code)] StreamPort),
}

pub struct ManagedSwitch {
    switch: Arc<Switch>,
    owned: Mutex<HashMap<PortId, Owned>>,
    /// Open taps with virtio-net header offloads.
    tap_offloads: bool,
}

impl ManagedSwitch {
    pub fn new(switch: Arc<Switch>, tap_offloads: bool) -> Arc<ManagedSwitch> {
        Arc::new(ManagedSwitch {
            switch,
            owned: Mutex::new(HashMap::new()),
            tap_offloads,
        })
    }

    pub fn switch(&self) -> &Arc<Switch> {
        &self.switch
    }

    pub fn add_tap(&self, name: &str, vlan: VlanMode) -> std::io::Result<PortId> {
        let port = TapPort::attach(&self.switch, Tap::open_with(name, self.tap_offloads)?, vlan)?;
        let id = port.id();
        self.owned.lock().unwrap().insert(id, Owned::Tap(port));
        Ok(id)
    }

    pub fn add_vhost_user(&self, socket: &Path, vlan: VlanMode) -> std::io::Result<PortId> {
        let port = VhostUserNetPort::listen(&self.switch, socket, vlan)?;
        let id = port.id();
        self.owned
            .lock()
            .unwrap()
            .insert(id, Owned::VhostUser(port));
        Ok(id)
    }

    /// A port for QEMU's `-netdev stream` listening on `socket`.
    pub fn add_stream(&self, socket: &Path, vlan: VlanMode) -> std::io::Result<PortId> {
        let port = StreamPort::listen(&self.switch, socket, vlan)?;
        let id = port.id();
        self.owned.lock().unwrap().insert(id, Owned::Stream(port));
        Ok(id)
    }

    /// Removes a port; an owned one is closed (its tap removed, its socket unlinked).
    pub fn remove(&self, id: PortId) -> bool {
        let owned = self.owned.lock().unwrap().remove(&id);
        let known = owned.is_some();
        drop(owned);
        self.switch.remove_port(id) || known
    }

    /// Closes every owned port.
    pub fn close_all(&self) {
        let ports: Vec<Owned> = self.owned.lock().unwrap().drain().map(|(_, p)| p).collect();
        drop(ports);
    }
}
