//! What the switch needs to know about a frame, and whether it may be forwarded at all.
//! Parsing is etherparse's; the limits are the switch's.

use etherparse::{Ethernet2HeaderSlice, SingleVlanHeaderSlice};

pub type Mac = [u8; 6];

/// EtherType of an 802.1Q tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// EtherType of an 802.1ad (QinQ) service tag.
pub const ETHERTYPE_QINQ: u16 = 0x88a8;
/// Destination + source + EtherType.
pub const ETHERNET_HEADER: usize = 14;
/// The largest frame forwarded: 1500 bytes of payload, header and one VLAN tag. Frames
/// from taps carry no FCS.
pub const DEFAULT_MAX_FRAME: usize = 1500 + ETHERNET_HEADER + 4;

/// Why a frame was dropped instead of forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Shorter than an Ethernet header.
    Runt,
    /// Longer than the switch's maximum frame size.
    Oversize,
    /// A header etherparse rejects (a truncated VLAN tag, ...).
    Malformed,
    /// A VLAN the ingress port does not carry, a tagged frame on an access port, or a
    /// frame with a second tag inside the first (this switch carries one tag; a port
    /// that removes the outer one would pass the inner one into another VLAN).
    VlanFiltered,
    /// A source MAC that is multicast or all zeros cannot be learned or trusted.
    BadSource,
    /// The egress port could not take it (full queue, gone tap).
    EgressFailed,
    /// A GSO super-frame for a port that takes only MTU-sized frames.
    GsoUnsupported,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::Runt,
        DropReason::Oversize,
        DropReason::Malformed,
        DropReason::VlanFiltered,
        DropReason::BadSource,
        DropReason::EgressFailed,
        DropReason::GsoUnsupported,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DropReason::Runt => "runt",
            DropReason::Oversize => "oversize",
            DropReason::Malformed => "malformed",
            DropReason::VlanFiltered => "vlan_filtered",
            DropReason::BadSource => "bad_source",
            DropReason::EgressFailed => "egress_failed",
            DropReason::GsoUnsupported => "gso_unsupported",
        }
    }
}

/// The header fields forwarding looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    pub dst: Mac,
    pub src: Mac,
    /// The 802.1Q VLAN id if the frame is tagged.
    pub tag: Option<u16>,
}

impl FrameInfo {
    pub fn is_multicast_dst(&self) -> bool {
        self.dst[0] & 1 == 1
    }
}

/// Checks a frame and extracts its addresses and tag.
pub fn inspect(frame: &[u8], max_frame: usize) -> Result<FrameInfo, DropReason> {
    if frame.len() < ETHERNET_HEADER {
        return Err(DropReason::Runt);
    }
    if frame.len() > max_frame {
        return Err(DropReason::Oversize);
    }
    let eth = Ethernet2HeaderSlice::from_slice(frame).map_err(|_| DropReason::Malformed)?;
    let src = eth.source();
    if src[0] & 1 == 1 || src == [0u8; 6] {
        return Err(DropReason::BadSource);
    }
    let tag = if eth.ether_type().0 == ETHERTYPE_VLAN {
        let vlan = SingleVlanHeaderSlice::from_slice(&frame[ETHERNET_HEADER..])
            .map_err(|_| DropReason::Malformed)?;
        // A stacked tag: an access port (or a trunk's native VLAN) would get the frame
        // with the outer tag removed, the inner one now outermost: VLAN hopping.
        if matches!(vlan.ether_type().0, ETHERTYPE_VLAN | ETHERTYPE_QINQ) {
            return Err(DropReason::VlanFiltered);
        }
        Some(vlan.vlan_identifier().value())
    } else {
        None
    };
    Ok(FrameInfo {
        dst: eth.destination(),
        src,
        tag,
    })
}

/// `frame` with an 802.1Q tag for `vid` inserted after the addresses.
pub fn push_tag(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.len() + 4);
    out.extend_from_slice(&frame[..12]);
    out.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
    out.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    out.extend_from_slice(&frame[12..]);
    out
}

/// `frame` with its (outer) 802.1Q tag removed. The caller has checked it is tagged.
pub fn pop_tag(frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.len() - 4);
    out.extend_from_slice(&frame[..12]);
    out.extend_from_slice(&frame[16..]);
    out
}

pub fn format_mac(mac: &Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    const A: Mac = [2, 0, 0, 0, 0, 1];
    const B: Mac = [2, 0, 0, 0, 0, 2];

    #[test]
    fn good_frames_are_read() {
        let f = frame(B, A, 0x0800, &[0; 46]);
        let info = inspect(&f, DEFAULT_MAX_FRAME).unwrap();
        assert_eq!((info.dst, info.src, info.tag), (B, A, None));
        let tagged = push_tag(&f, 10);
        assert_eq!(inspect(&tagged, DEFAULT_MAX_FRAME).unwrap().tag, Some(10));
        assert_eq!(pop_tag(&tagged), f);
        // Short frames from taps (no padding) are fine as long as the header is whole.
        assert!(inspect(&frame(B, A, 0x0806, &[]), DEFAULT_MAX_FRAME).is_ok());
    }

    #[test]
    fn bad_frames_are_classified() {
        assert_eq!(
            inspect(&[0u8; 13], DEFAULT_MAX_FRAME),
            Err(DropReason::Runt)
        );
        assert_eq!(inspect(&[], DEFAULT_MAX_FRAME), Err(DropReason::Runt));
        let big = frame(B, A, 0x0800, &[0; 1600]);
        assert_eq!(inspect(&big, DEFAULT_MAX_FRAME), Err(DropReason::Oversize));
        // A VLAN EtherType with the tag cut off.
        let cut = frame(B, A, ETHERTYPE_VLAN, &[0]);
        assert_eq!(inspect(&cut, DEFAULT_MAX_FRAME), Err(DropReason::Malformed));
        let mcast_src = frame(B, [1, 0, 0x5e, 0, 0, 1], 0x0800, &[0; 46]);
        assert_eq!(
            inspect(&mcast_src, DEFAULT_MAX_FRAME),
            Err(DropReason::BadSource)
        );
        let zero_src = frame(B, [0; 6], 0x0800, &[0; 46]);
        assert_eq!(
            inspect(&zero_src, DEFAULT_MAX_FRAME),
            Err(DropReason::BadSource)
        );
        // A tag inside a tag (found by the switch fuzz target: untagged egress passed
        // the inner tag into another VLAN), 802.1Q or 802.1ad inside.
        for inner in [ETHERTYPE_VLAN, ETHERTYPE_QINQ] {
            // Outer tag VLAN 1, then an inner tag for VLAN 10, then IPv4.
            let mut payload = 1u16.to_be_bytes().to_vec();
            payload.extend_from_slice(&inner.to_be_bytes());
            payload.extend_from_slice(&10u16.to_be_bytes());
            payload.extend_from_slice(&0x0800u16.to_be_bytes());
            payload.extend_from_slice(&[0; 46]);
            let stacked = frame(B, A, ETHERTYPE_VLAN, &payload);
            assert_eq!(
                inspect(&stacked, DEFAULT_MAX_FRAME),
                Err(DropReason::VlanFiltered),
                "inner {inner:#x}"
            );
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x1234_5678u32;
        for len in 0..200 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (seed >> 16) as u8
                })
                .collect();
            let _ = inspect(&bytes, DEFAULT_MAX_FRAME);
            let mut tagged = bytes.clone();
            if tagged.len() >= 14 {
                tagged[12] = 0x81;
                tagged[13] = 0x00;
                let _ = inspect(&tagged, DEFAULT_MAX_FRAME);
            }
        }
    }
}
