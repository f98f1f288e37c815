//! Ports: where frames leave the switch (`PortSink`), how a port treats VLANs, and what it
//! counts.

use std::collections::BTreeSet;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

use crate::frame::DropReason;

pub type PortId = u32;

/// Where a port's egress frames go: a tap's fd, a vhost-user device's rx queue, a queue in
/// this process. Called from any ingress thread, so it must be thread-safe.
pub trait PortSink: Send + Sync {
    /// An ordinary, finished frame.
    fn transmit(&self, frame: &[u8]) -> io::Result<()>;
    /// Whether [`PortSink::transmit_offloaded`] takes GSO and partially checksummed frames.
    fn offloads(&self) -> bool {
        false
    }
    /// A frame with its virtio-net header (only called when `offloads()`).
    fn transmit_offloaded(&self, hdr: &crate::offload::VnetHdr, frame: &[u8]) -> io::Result<()> {
        let _ = hdr;
        self.transmit(frame)
    }
    /// The switch has handed this port every frame of one ingress batch: a sink that
    /// queues frames delivers them now (one ring update and one interrupt for the lot,
    /// not one per frame). Called after any `transmit` of a batch.
    fn end_burst(&self) {}
    /// "tap", "vhost-user", "in-process".
    fn kind(&self) -> &'static str;
    /// What a person recognises the port by (interface name, socket path, ...).
    fn describe(&self) -> String;
}

/// 802.1Q membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum VlanMode {
    /// Untagged frames only, all in one VLAN.
    Access { vlan: u16 },
    /// Tagged frames for the allowed VLANs (all when `allowed` is `None`); untagged frames
    /// belong to `native`, or are dropped without one.
    Trunk {
        native: Option<u16>,
        allowed: Option<BTreeSet<u16>>,
    },
}

impl Default for VlanMode {
    fn default() -> Self {
        VlanMode::Access { vlan: 1 }
    }
}

impl VlanMode {
    /// The VLAN an ingress frame belongs to, or `None` if the port does not carry it.
    pub fn classify(&self, tag: Option<u16>) -> Option<u16> {
        match (self, tag) {
            (VlanMode::Access { vlan }, None) => Some(*vlan),
            (VlanMode::Access { .. }, Some(_)) => None,
            (VlanMode::Trunk { native, .. }, None) => *native,
            (VlanMode::Trunk { allowed, .. }, Some(t)) => {
                allowed.as_ref().is_none_or(|a| a.contains(&t)).then_some(t)
            }
        }
    }

    /// Whether frames of `vlan` leave through this port, and tagged or not.
    pub fn egress(&self, vlan: u16) -> Option<Egress> {
        match self {
            VlanMode::Access { vlan: v } => (*v == vlan).then_some(Egress::Untagged),
            VlanMode::Trunk { native, allowed } => {
                if *native == Some(vlan) {
                    Some(Egress::Untagged)
                } else if allowed.as_ref().is_none_or(|a| a.contains(&vlan)) {
                    Some(Egress::Tagged)
                } else {
                    None
                }
            }
        }
    }

    /// `access:10`, `trunk`, `trunk:native=1`, `trunk:10,20`, `trunk:native=1:10,20`.
    pub fn parse(text: &str) -> Result<VlanMode, String> {
        let vid = |s: &str| -> Result<u16, String> {
            match s.parse::<u16>() {
                Ok(v) if (1..=4094).contains(&v) => Ok(v),
                _ => Err(format!("'{s}' is not a VLAN id (1-4094)")),
            }
        };
        let mut parts = text.split(':');
        match parts.next() {
            Some("access") => {
                let v = parts.next().ok_or("access needs a VLAN: access:10")?;
                Ok(VlanMode::Access { vlan: vid(v)? })
            }
            Some("trunk") => {
                let (mut native, mut allowed) = (None, None);
                for p in parts {
                    if let Some(n) = p.strip_prefix("native=") {
                        native = Some(vid(n)?);
                    } else {
                        allowed = Some(p.split(',').map(vid).collect::<Result<BTreeSet<_>, _>>()?);
                    }
                }
                Ok(VlanMode::Trunk { native, allowed })
            }
            _ => Err(format!(
                "unknown VLAN mode '{text}': use access:VID or trunk[:native=VID][:VID,VID]"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    Untagged,
    Tagged,
}

/// Counters a port keeps; read without stopping traffic.
#[derive(Debug, Default)]
pub struct PortCounters {
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
}

impl PortCounters {
    pub(crate) fn rx_many(&self, frames: usize, bytes: usize) {
        self.rx_frames.fetch_add(frames as u64, Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Relaxed);
    }
    pub(crate) fn tx(&self, bytes: usize) {
        self.tx_frames.fetch_add(1, Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Relaxed);
    }
    pub(crate) fn count_drop(&self, why: DropReason) {
        let i = DropReason::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.drops[i].fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            rx_frames: self.rx_frames.load(Relaxed),
            rx_bytes: self.rx_bytes.load(Relaxed),
            tx_frames: self.tx_frames.load(Relaxed),
            tx_bytes: self.tx_bytes.load(Relaxed),
            drops: DropReason::ALL
                .iter()
                .zip(&self.drops)
                .map(|(r, c)| (r.name().to_owned(), c.load(Relaxed)))
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CountersSnapshot {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub drops: std::collections::BTreeMap<String, u64>,
}

impl CountersSnapshot {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops.get(reason.name()).copied().unwrap_or(0)
    }
}

/// Wakes a port's reader thread blocked in poll(2) on its stop eventfd.
pub(crate) fn signal_eventfd(fd: &std::os::fd::OwnedFd) {
    use std::os::fd::AsRawFd;
    let one: u64 = 1;
    // SAFETY: writing 8 bytes from a valid u64 to an eventfd we own.
    unsafe { libc::write(fd.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vlan_modes_parse_and_classify() {
        let access = VlanMode::parse("access:10").unwrap();
        assert_eq!(access.classify(None), Some(10));
        assert_eq!(access.classify(Some(10)), None);
        assert_eq!(access.egress(10), Some(Egress::Untagged));
        assert_eq!(access.egress(20), None);

        let trunk = VlanMode::parse("trunk:native=1:10,20").unwrap();
        assert_eq!(trunk.classify(None), Some(1));
        assert_eq!(trunk.classify(Some(10)), Some(10));
        assert_eq!(trunk.classify(Some(30)), None);
        assert_eq!(trunk.egress(1), Some(Egress::Untagged));
        assert_eq!(trunk.egress(20), Some(Egress::Tagged));
        assert_eq!(trunk.egress(30), None);

        let all = VlanMode::parse("trunk").unwrap();
        assert_eq!(all.classify(None), None);
        assert_eq!(all.classify(Some(4000)), Some(4000));

        for bad in ["access", "access:0", "access:5000", "trunk:x", "bridge"] {
            assert!(VlanMode::parse(bad).is_err(), "{bad}");
        }
    }
}
