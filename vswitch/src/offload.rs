//! Offloaded frames: the virtio-net header (`struct virtio_net_hdr_v1`, 12 bytes) that taps
//! in IFF_VNET_HDR mode and virtio NICs put before a frame. With it a TCP stream crosses
//! the switch as 64 KiB segments (GSO) with checksums left to the receiver, instead of
//! MTU-sized frames each checksummed by the sender: one switch traversal per 40 frames.

pub const VNET_HDR_LEN: usize = 12;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum from `csum_start` on is still to be done.
pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
/// The largest (GSO) frame a tap hands over.
pub const MAX_GSO_FRAME: usize = 65535 + 18;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        if b.len() < VNET_HDR_LEN {
            return None;
        }
        let u16le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16le(2),
            gso_size: u16le(4),
            csum_start: u16le(6),
            csum_offset: u16le(8),
            num_buffers: u16le(10),
        })
    }

    pub fn to_bytes(self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// Nothing left to do: an ordinary frame.
    pub fn is_plain(&self) -> bool {
        self.flags & F_NEEDS_CSUM == 0 && self.gso_type == GSO_NONE
    }

    pub fn is_gso(&self) -> bool {
        self.gso_type != GSO_NONE
    }

    /// The same header for the frame with `delta` bytes inserted (+4, a VLAN tag pushed)
    /// or removed (-4) before the L3 header.
    pub fn shifted(self, delta: i32) -> VnetHdr {
        let shift = |v: u16| {
            if v == 0 {
                0
            } else {
                (i32::from(v) + delta).clamp(0, 0xffff) as u16
            }
        };
        VnetHdr {
            csum_start: shift(self.csum_start),
            hdr_len: shift(self.hdr_len),
            ..self
        }
    }
}

/// Completes a partial checksum in place (for a port that takes only finished frames):
/// the one's complement sum from `csum_start` to the end, which already includes the
/// pseudo-header sum the sender left in the field. Returns false if the offsets do not
/// fit the frame.
pub fn finish_checksum(frame: &mut [u8], hdr: &VnetHdr) -> bool {
    let start = usize::from(hdr.csum_start);
    let field = start + usize::from(hdr.csum_offset);
    if start >= frame.len() || field + 2 > frame.len() {
        return false;
    }
    let mut sum: u32 = 0;
    let mut chunks = frame[start..].chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let csum = !(sum as u16);
    frame[field..field + 2].copy_from_slice(&csum.to_be_bytes());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let h = VnetHdr {
            flags: 1,
            gso_type: 1,
            hdr_len: 66,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        };
        assert_eq!(VnetHdr::parse(&h.to_bytes()), Some(h));
        assert!(!h.is_plain() && h.is_gso());
        assert_eq!(h.shifted(4).csum_start, 38);
        assert_eq!(h.shifted(-4).hdr_len, 62);
        assert!(VnetHdr::parse(&[0; 5]).is_none());
    }

    #[test]
    fn finishing_a_checksum_makes_the_sum_verify() {
        // The field starts out holding the pseudo-header sum; a receiver checks that the
        // pseudo-header plus the data with the finished field sums to 0xffff.
        let mut frame: Vec<u8> = (0..101u32).map(|i| (i * 37 + 5) as u8).collect();
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 6,
            ..VnetHdr::default()
        };
        let pseudo = u32::from(u16::from_be_bytes([frame[26], frame[27]]));
        assert!(finish_checksum(&mut frame, &hdr));
        let mut sum: u32 = pseudo;
        for c in frame[20..].chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
        let bad = VnetHdr {
            csum_start: 200,
            ..hdr
        };
        assert!(!finish_checksum(&mut frame, &bad));
    }
}
