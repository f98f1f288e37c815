//! What the devices need from the rest of the system, as three small traits: a NIC needs
//! a port to send frames to and receive them from, virtio-fs a FUSE server, virtio-9p a
//! 9P server. The devices see only these; the adapters below connect them to vmbuild's
//! own in-process switch port (`vswitch`) and shares (`virtiofs-bridge`), so the devices
//! do not depend on how those work and can be tested against anything that answers.

use std::sync::Arc;
use std::time::Duration;

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use crate::virtio::shm::{DaxMapper, ShmRegion};

/// An Ethernet port: frames the guest transmits go in, frames for the guest come out.
pub trait FramePort: Send + Sync {
    /// Forwards one frame the guest sent (without the virtio-net header).
    fn send(&self, frame: &[u8]);
    /// Forwards frames the guest sent together, in order (one notify's worth).
    fn send_batch(&self, frames: &[&[u8]]) {
        for frame in frames {
            self.send(frame);
        }
    }
    /// The next frame for the guest, waiting at most `timeout`.
    fn recv_timeout(&self, timeout: Duration) -> Option<Vec<u8>>;
}

/// A virtio-fs server: answers one FUSE request held in a descriptor chain.
pub trait FuseServer: Send + Sync {
    /// The mount tag the guest mounts the share by.
    fn tag(&self) -> &str;
    /// Serves one request and returns how many bytes it wrote into the chain. A
    /// malformed request is answered with an error or dropped, never a panic. `dax` is
    /// the device's DAX window, where FUSE_SETUPMAPPING maps file ranges (`None`: the
    /// device has none, and such requests fail).
    fn serve(
        &self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        dax: Option<&Arc<ShmRegion>>,
    ) -> u32;
}

/// A 9P2000.L server for one session, whose open fids a snapshot keeps.
pub trait NinepSession: Send + Sync {
    fn tag(&self) -> &str;
    /// The largest message (msize) the server negotiates: a longer request is malformed.
    fn max_message(&self) -> usize;
    /// The reply to one request (`None`: no reply fits or the request had no tag).
    fn handle(&self, request: &[u8]) -> Option<Vec<u8>>;
    /// The session (the guest's fids) as a snapshot keeps it.
    fn save(&self) -> serde_json::Value;
    /// Takes over a saved session; returns the fids that could not be restored, with
    /// why.
    fn restore(&self, state: &serde_json::Value) -> anyhow::Result<Vec<(u32, String)>>;
}

impl FramePort for vswitch::InProcessPort {
    fn send(&self, frame: &[u8]) {
        vswitch::InProcessPort::send(self, frame)
    }

    fn send_batch(&self, frames: &[&[u8]]) {
        vswitch::InProcessPort::send_batch(self, frames)
    }

    fn recv_timeout(&self, timeout: Duration) -> Option<Vec<u8>> {
        vswitch::InProcessPort::recv_timeout(self, timeout)
    }
}

impl FuseServer for virtiofs_bridge::InProcessShare {
    fn tag(&self) -> &str {
        virtiofs_bridge::InProcessShare::tag(self)
    }

    fn serve(
        &self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        dax: Option<&Arc<ShmRegion>>,
    ) -> u32 {
        match dax {
            Some(window) => {
                let mut mapper = DaxMapper(window.clone());
                virtiofs_bridge::InProcessShare::serve_mapping(self, mem, chain, &mut mapper)
            }
            None => virtiofs_bridge::InProcessShare::serve(self, mem, chain),
        }
    }
}

impl NinepSession for virtiofs_bridge::ninep::NinepServer {
    fn tag(&self) -> &str {
        virtiofs_bridge::ninep::NinepServer::tag(self)
    }

    fn max_message(&self) -> usize {
        virtiofs_bridge::ninep::MAX_MSIZE as usize
    }

    fn handle(&self, request: &[u8]) -> Option<Vec<u8>> {
        virtiofs_bridge::ninep::NinepServer::handle(self, request)
    }

    fn save(&self) -> serde_json::Value {
        serde_json::to_value(self.save_state()).unwrap_or(serde_json::Value::Null)
    }

    fn restore(&self, state: &serde_json::Value) -> anyhow::Result<Vec<(u32, String)>> {
        let state: virtiofs_bridge::ninep::NinepState = serde_json::from_value(state.clone())
            .map_err(|e| anyhow::anyhow!("the saved 9p session is damaged: {e}"))?;
        Ok(self.restore_state(&state).lost)
    }
}
