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
use crate::vde_plug::{VdeOptions, VdePlugServer};
use crate::vhost_user_net::VhostUserNetPort;

enum Owned {
    Tap(TapPort),
    VhostUser(#[allow(dead_code)] VhostUserNetPort),
    Stream(#[allow(dead_code)] StreamPort),
}

pub struct ManagedSwitch {
    switch: Arc<Switch>,
    owned: Mutex<HashMap<PortId, Owned>>,
    /// VDE switch directories served (`-s DIR`); their ports come and go with clients.
    vde: Mutex<Vec<VdePlugServer>>,
    /// Open taps with virtio-net header offloads.
    tap_offloads: bool,
}

impl ManagedSwitch {
    pub fn new(switch: Arc<Switch>, tap_offloads: bool) -> Arc<ManagedSwitch> {
        Arc::new(ManagedSwitch {
            switch,
            owned: Mutex::new(HashMap::new()),
            vde: Mutex::new(Vec::new()),
            tap_offloads,
        })
    }

    pub fn switch(&self) -> &Arc<Switch> {
        &self.switch
    }

    pub fn add_tap(&self, name: &str, vlan: VlanMode) -> std::io::Result<PortId> {
        if self.has_tap(name) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("tap {name} is already port of this switch (port/print lists it)"),
            ));
        }
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

    /// Whether a tap of this name is one of the ports.
    pub fn has_tap(&self, name: &str) -> bool {
        self.owned
            .lock()
            .unwrap()
            .values()
            .any(|p| matches!(p, Owned::Tap(t) if t.name() == name))
    }

    /// Serves a VDE switch directory (`vde_switch -s DIR`): every libvdeplug client that
    /// connects (QEMU's `-netdev vde`, `vde_plug`) gets a port.
    pub fn add_vde(&self, dir: &Path, options: VdeOptions) -> std::io::Result<()> {
        let server = VdePlugServer::start(&self.switch, dir, options)?;
        self.vde.lock().unwrap().push(server);
        Ok(())
    }

    /// The VDE directories served: (directory, ports made, requests refused).
    pub fn vde_dirs(&self) -> Vec<(std::path::PathBuf, u64, u64)> {
        self.vde
            .lock()
            .unwrap()
            .iter()
            .map(|s| (s.dir().to_owned(), s.accepted(), s.refused()))
            .collect()
    }

    /// Removes a port; an owned one is closed (its tap removed, its socket unlinked), a
    /// VDE client is disconnected.
    pub fn remove(&self, id: PortId) -> bool {
        let owned = self.owned.lock().unwrap().remove(&id);
        let mut known = owned.is_some();
        drop(owned);
        for server in self.vde.lock().unwrap().iter() {
            known |= server.disconnect(id);
        }
        self.switch.remove_port(id) || known
    }

    /// Closes every owned port and VDE directory.
    pub fn close_all(&self) {
        let servers: Vec<VdePlugServer> = self.vde.lock().unwrap().drain(..).collect();
        drop(servers);
        let ports: Vec<Owned> = self.owned.lock().unwrap().drain().map(|(_, p)| p).collect();
        drop(ports);
    }
}
