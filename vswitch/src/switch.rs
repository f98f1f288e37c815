//! The forwarding core: classify the frame's VLAN at ingress, learn its source, find where
//! its destination lives, and hand it to each egress port tagged or untagged as that port
//! wants. Every ingress path (tap reader threads, vhost-user queues, in-process senders)
//! calls [`Switch::ingress`] directly: there is no switch thread and no queue in between.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::fast_hash::KeyedState;
use crate::frame::{self, DropReason, FrameInfo};
use crate::mac_table::{Learned, MacRow, MacTable, Tick, DEFAULT_AGING, DEFAULT_CAPACITY};
use crate::offload::{self, VnetHdr};
use crate::port::{CountersSnapshot, Egress, PortCounters, PortId, PortSink, VlanMode};

#[derive(Debug, Clone)]
pub struct SwitchConfig {
    /// Flood everything, learn nothing (a hub, as `vde_switch -x`).
    pub hub: bool,
    pub mac_table_size: usize,
    pub aging: Duration,
    pub max_frame: usize,
    /// The most ports at once (`vde_switch -n`); more are refused.
    pub max_ports: usize,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        SwitchConfig {
            hub: false,
            mac_table_size: DEFAULT_CAPACITY,
            aging: DEFAULT_AGING,
            max_frame: frame::DEFAULT_MAX_FRAME,
            max_ports: usize::MAX,
        }
    }
}

struct Port {
    vlan: VlanMode,
    sink: Arc<dyn PortSink>,
    counters: Arc<PortCounters>,
}

/// Why a port could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddPortError {
    #[error("the switch has its maximum of {0} ports (-n/--numports)")]
    Full(usize),
    #[error("port {0} is in use")]
    Taken(PortId),
    #[error("there is no port {0}: ports are numbered from 1")]
    Invalid(PortId),
}

impl From<AddPortError> for std::io::Error {
    fn from(e: AddPortError) -> Self {
        std::io::Error::other(e.to_string())
    }
}

/// A port as the management console lists it.
#[derive(Debug, Clone, Serialize)]
pub struct PortInfo {
    pub id: PortId,
    pub kind: &'static str,
    pub endpoint: String,
    pub vlan: VlanMode,
    pub counters: CountersSnapshot,
}

pub struct Switch {
    config: SwitchConfig,
    ports: RwLock<HashMap<PortId, Arc<Port>, KeyedState>>,
    table: Mutex<MacTable>,
    next_id: AtomicU32,
}

impl Switch {
    pub fn new(config: SwitchConfig) -> Arc<Switch> {
        Arc::new(Switch {
            table: Mutex::new(MacTable::new(config.mac_table_size, config.aging)),
            config,
            ports: RwLock::new(HashMap::with_hasher(KeyedState::new())),
            next_id: AtomicU32::new(1),
        })
    }

    pub fn config(&self) -> &SwitchConfig {
        &self.config
    }

    /// Adds a port; frames start reaching it at once. Not bounded by
    /// [`SwitchConfig::max_ports`] (in-process ports belong to the program itself); ports
    /// that outsiders open use [`Switch::try_add_port`].
    pub fn add_port(&self, sink: Arc<dyn PortSink>, vlan: VlanMode) -> PortId {
        let mut ports = self.ports.write().unwrap();
        let id = self.free_id(&ports);
        ports.insert(id, Self::new_port(sink, vlan));
        id
    }

    /// Adds a port numbered `at` (or the next free number), unless the switch has
    /// [`SwitchConfig::max_ports`] ports already or `at` is taken.
    pub fn try_add_port(
        &self,
        sink: Arc<dyn PortSink>,
        vlan: VlanMode,
        at: Option<PortId>,
    ) -> Result<PortId, AddPortError> {
        let mut ports = self.ports.write().unwrap();
        if ports.len() >= self.config.max_ports {
            return Err(AddPortError::Full(self.config.max_ports));
        }
        let id = match at {
            Some(0) => return Err(AddPortError::Invalid(0)),
            Some(id) if ports.contains_key(&id) => return Err(AddPortError::Taken(id)),
            Some(id) => id,
            None => self.free_id(&ports),
        };
        ports.insert(id, Self::new_port(sink, vlan));
        Ok(id)
    }

    fn new_port(sink: Arc<dyn PortSink>, vlan: VlanMode) -> Arc<Port> {
        Arc::new(Port {
            vlan,
            sink,
            counters: Arc::default(),
        })
    }

    /// The next number not in use (numbers asked for explicitly are skipped).
    fn free_id(&self, ports: &HashMap<PortId, Arc<Port>, KeyedState>) -> PortId {
        loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 && !ports.contains_key(&id) {
                return id;
            }
        }
    }

    /// Removes a port and forgets what was learned on it. Returns whether it existed.
    pub fn remove_port(&self, id: PortId) -> bool {
        let removed = self.ports.write().unwrap().remove(&id).is_some();
        self.table.lock().unwrap().forget_port(id);
        removed
    }

    /// Changes a port's VLAN membership.
    pub fn set_vlan(&self, id: PortId, vlan: VlanMode) -> bool {
        let mut ports = self.ports.write().unwrap();
        let Some(old) = ports.get(&id) else {
            return false;
        };
        // Ports are immutable so ingress reads them without a lock; replace it, keeping
        // its counters.
        let port = Arc::new(Port {
            vlan,
            sink: old.sink.clone(),
            counters: old.counters.clone(),
        });
        ports.insert(id, port);
        true
    }

    /// One frame arriving on `ingress`. Never fails: what cannot be forwarded is dropped
    /// and counted on the port it came from (or went to).
    pub fn ingress(&self, ingress: PortId, frame: &[u8]) {
        self.forward(ingress, &[(None, frame)])
    }

    /// Frames arriving together on `ingress` (a virtqueue's worth, a sender's burst):
    /// forwarded as [`Switch::ingress`] would, one after the other, but deciding up to
    /// [`BATCH`] of them under one hold of the locks and one reading of the clock.
    pub fn ingress_batch<F: AsRef<[u8]>>(&self, ingress: PortId, frames: &[F]) {
        for chunk in frames.chunks(BATCH) {
            let mut batch: [(Option<&VnetHdr>, &[u8]); BATCH] = [(None, &[]); BATCH];
            for (slot, frame) in batch.iter_mut().zip(chunk) {
                slot.1 = frame.as_ref();
            }
            self.forward(ingress, &batch[..chunk.len()]);
        }
    }

    /// A frame with a virtio-net header (from a tap in vnet-header mode): GSO and partial
    /// checksums pass through to ports that take them; for ports that do not, checksums
    /// are finished and TCP GSO frames cut into MTU-sized segments (other GSO is dropped,
    /// counted).
    pub fn ingress_offloaded(&self, ingress: PortId, hdr: &VnetHdr, frame: &[u8]) {
        let hdr = (!hdr.is_plain()).then_some(hdr);
        self.forward(ingress, &[(hdr, frame)])
    }

    /// Forwards at most [`BATCH`] frames in three passes: check each frame and find its
    /// VLAN (no lock), learn and look up every one under one hold of the table's lock,
    /// then hand each to its ports with the table unlocked (a sink may block in a
    /// syscall, and other ingress threads must not wait on it).
    fn forward(&self, ingress: PortId, frames: &[(Option<&VnetHdr>, &[u8])]) {
        debug_assert!(frames.len() <= BATCH);
        let ports = self.ports.read().unwrap();
        let Some(in_port) = ports.get(&ingress) else {
            return;
        };
        let bytes: usize = frames.iter().map(|(_, f)| f.len()).sum();
        in_port.counters.rx_many(frames.len(), bytes);

        let mut decided: [Option<Decided>; BATCH] = [None; BATCH];
        for ((hdr, frame), slot) in frames.iter().zip(decided.iter_mut()) {
            let max_frame = match hdr {
                Some(h) if h.is_gso() => offload::MAX_GSO_FRAME,
                _ => self.config.max_frame,
            };
            let info = match frame::inspect(frame, max_frame) {
                Ok(i) => i,
                Err(why) => {
                    in_port.counters.count_drop(why);
                    continue;
                }
            };
            let Some(vlan) = in_port.vlan.classify(info.tag) else {
                in_port.counters.count_drop(DropReason::VlanFiltered);
                continue;
            };
            *slot = Some(Decided {
                info,
                vlan,
                route: Route::Flood,
            });
        }

        if !self.config.hub {
            let now = Tick::from(Instant::now());
            let mut table = self.table.lock().unwrap();
            for d in decided[..frames.len()].iter_mut().flatten() {
                if let Learned::Moved { from } = table.learn(d.vlan, d.info.src, ingress, now) {
                    tracing::debug!(vlan = d.vlan, mac = %frame::format_mac(&d.info.src), from, to = ingress, "MAC moved");
                }
                if !d.info.is_multicast_dst() {
                    if let Some(out) = table.lookup(d.vlan, &d.info.dst, now) {
                        d.route = Route::To(out);
                    }
                }
            }
        }

        let mut touched = Touched::default();
        for ((hdr, frame), d) in frames.iter().zip(&decided) {
            let Some(d) = d else { continue };
            let mut copies = Copies::new(frame, &d.info, *hdr);
            match d.route {
                // Known unicast: one port, or none if it lives where it came from.
                Route::To(out) if out == ingress => {}
                Route::To(out) => {
                    if let Some(port) = ports.get(&out) {
                        send(port, d.vlan, &mut copies);
                        touched.add(port);
                    }
                }
                // Unknown unicast, broadcast, multicast: every other port in the VLAN.
                Route::Flood => {
                    for (id, port) in ports.iter() {
                        if *id != ingress {
                            send(port, d.vlan, &mut copies);
                            touched.add(port);
                        }
                    }
                }
            }
        }
        match touched {
            Touched::Few(n, list) => list[..n].iter().flatten().for_each(|p| p.sink.end_burst()),
            Touched::Many => ports
                .iter()
                .filter(|(id, _)| **id != ingress)
                .for_each(|(_, p)| p.sink.end_burst()),
        }
    }

    /// Forgets aged-out MAC entries; the owner calls this periodically.
    pub fn age(&self) -> usize {
        self.table.lock().unwrap().age(Instant::now())
    }

    pub fn mac_table(&self) -> Vec<MacRow> {
        self.table.lock().unwrap().rows(Instant::now())
    }

    pub fn mac_table_len(&self) -> usize {
        self.table.lock().unwrap().len()
    }

    pub fn ports(&self) -> Vec<PortInfo> {
        let ports = self.ports.read().unwrap();
        let mut out: Vec<PortInfo> = ports
            .iter()
            .map(|(id, p)| PortInfo {
                id: *id,
                kind: p.sink.kind(),
                endpoint: p.sink.describe(),
                vlan: p.vlan.clone(),
                counters: p.counters.snapshot(),
            })
            .collect();
        out.sort_by_key(|p| p.id);
        out
    }

    pub fn counters(&self, id: PortId) -> Option<CountersSnapshot> {
        self.ports
            .read()
            .unwrap()
            .get(&id)
            .map(|p| p.counters.snapshot())
    }
}

/// The ports one batch was sent to, for their [`PortSink::end_burst`]; past a few,
/// every port gets it (a flood reaches them all anyway).
enum Touched<'p> {
    Few(usize, [Option<&'p Port>; 8]),
    Many,
}

impl Default for Touched<'_> {
    fn default() -> Self {
        Touched::Few(0, [None; 8])
    }
}

impl<'p> Touched<'p> {
    fn add(&mut self, port: &'p Port) {
        if let Touched::Few(n, list) = self {
            if list[..*n].iter().flatten().any(|p| std::ptr::eq(*p, port)) {
                return;
            }
            if *n == list.len() {
                *self = Touched::Many;
            } else {
                list[*n] = Some(port);
                *n += 1;
            }
        }
    }
}

/// The most frames [`Switch::forward`] decides under one hold of the table's lock.
pub const BATCH: usize = 64;

/// Where a checked frame goes.
#[derive(Clone, Copy)]
enum Route {
    To(PortId),
    /// Unknown unicast, broadcast, multicast.
    Flood,
}

#[derive(Clone, Copy)]
struct Decided {
    info: FrameInfo,
    vlan: u16,
    route: Route,
}

/// The frame as received, and (made at most once) with its tag added or removed.
struct Copies<'a> {
    original: &'a [u8],
    hdr: Option<&'a VnetHdr>,
    tagged_in: bool,
    other: Option<Vec<u8>>,
}

impl<'a> Copies<'a> {
    fn new(original: &'a [u8], info: &FrameInfo, hdr: Option<&'a VnetHdr>) -> Self {
        Copies {
            original,
            hdr,
            tagged_in: info.tag.is_some(),
            other: None,
        }
    }

    fn for_egress(&mut self, egress: Egress, vlan: u16) -> Cow<'_, [u8]> {
        let want_tag = egress == Egress::Tagged;
        if want_tag == self.tagged_in {
            return Cow::Borrowed(self.original);
        }
        let original = self.original;
        let other = self.other.get_or_insert_with(|| {
            if want_tag {
                frame::push_tag(original, vlan)
            } else {
                frame::pop_tag(original)
            }
        });
        Cow::Borrowed(other.as_slice())
    }
}

fn send(port: &Port, vlan: u16, copies: &mut Copies<'_>) {
    let Some(egress) = port.vlan.egress(vlan) else {
        return;
    };
    let hdr = copies.hdr.copied();
    let original_len = copies.original.len();
    let frame = copies.for_egress(egress, vlan);
    let result = match hdr {
        None => port.sink.transmit(&frame),
        Some(h) => {
            // A tag pushed or popped moves the L3/L4 offsets the header points at.
            let h = h.shifted(frame.len() as i32 - original_len as i32);
            if port.sink.offloads() {
                port.sink.transmit_offloaded(&h, &frame)
            } else if h.is_gso() {
                // Cut in software, as the kernel does for a device without TSO.
                let Some(segments) = offload::segment(&frame, &h) else {
                    return port.counters.count_drop(DropReason::GsoUnsupported);
                };
                for seg in &segments {
                    match port.sink.transmit(seg) {
                        Ok(()) => port.counters.tx(seg.len()),
                        Err(_) => port.counters.count_drop(DropReason::EgressFailed),
                    }
                }
                return;
            } else {
                let mut finished = frame.into_owned();
                if !offload::finish_checksum(&mut finished, &h) {
                    return port.counters.count_drop(DropReason::Malformed);
                }
                port.sink.transmit(&finished)
            }
        }
    };
    match result {
        Ok(()) => port.counters.tx(original_len),
        Err(_) => port.counters.count_drop(DropReason::EgressFailed),
    }
}
