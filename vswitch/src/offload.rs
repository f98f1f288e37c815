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

/// `VIRTIO_NET_HDR_GSO_TCPV4` / `_TCPV6`, and the ECN bit that may be or'ed in.
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_ECN: u8 = 0x80;

/// Cuts a TCP GSO frame into MTU-sized frames with finished checksums, as the kernel's
/// software GSO does, for a port that takes plain frames only (a VDE client, a stream
/// peer). Every segment gets the headers of the original with its own IP length (and IPv4
/// id and header checksum), TCP sequence number and checksum; FIN and PSH stay on the last
/// segment, CWR on the first. `None` if the frame is not TCP over IPv4/IPv6 as the header
/// says (then it is dropped and counted).
pub fn segment(frame: &[u8], hdr: &VnetHdr) -> Option<Vec<Vec<u8>>> {
    let v6 = match hdr.gso_type & !GSO_ECN {
        GSO_TCPV4 => false,
        GSO_TCPV6 => true,
        _ => return None,
    };
    let mss = usize::from(hdr.gso_size);
    if mss == 0 {
        return None;
    }
    // L3 after the Ethernet header and any 802.1Q tags.
    let mut l3 = 14;
    while frame.len() >= l3 && frame.get(l3 - 2..l3)? == [0x81, 0x00] {
        l3 += 4;
    }
    let ethertype = u16::from_be_bytes([*frame.get(l3 - 2)?, *frame.get(l3 - 1)?]);
    let l4 = if v6 {
        if ethertype != 0x86dd || *frame.get(l3 + 6)? != 6 {
            return None; // extension headers: not produced by the stacks that send GSO
        }
        l3 + 40
    } else {
        if ethertype != 0x0800 || *frame.get(l3 + 9)? != 6 {
            return None;
        }
        l3 + usize::from(frame.get(l3)? & 0x0f) * 4
    };
    let tcp_len = usize::from(frame.get(l4 + 12)? >> 4) * 4;
    let payload_at = l4 + tcp_len;
    if tcp_len < 20 || payload_at > frame.len() {
        return None;
    }
    let payload = &frame[payload_at..];
    let seq = u32::from_be_bytes(frame[l4 + 4..l4 + 8].try_into().ok()?);
    let flags = frame[l4 + 13];
    let ip_id = u16::from_be_bytes([frame[l3 + 4], frame[l3 + 5]]);
    let chunks: Vec<&[u8]> = if payload.is_empty() {
        vec![payload]
    } else {
        payload.chunks(mss).collect()
    };
    let last = chunks.len() - 1;
    let mut out = Vec::with_capacity(chunks.len());
    for (i, chunk) in chunks.into_iter().enumerate() {
        let mut f = Vec::with_capacity(payload_at + chunk.len());
        f.extend_from_slice(&frame[..payload_at]);
        f.extend_from_slice(chunk);
        let tcp_total = tcp_len + chunk.len();
        if v6 {
            f[l3 + 4..l3 + 6].copy_from_slice(&(tcp_total as u16).to_be_bytes());
        } else {
            let total = (l4 - l3 + tcp_total) as u16;
            f[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
            f[l3 + 4..l3 + 6].copy_from_slice(&ip_id.wrapping_add(i as u16).to_be_bytes());
            f[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
            let c = !fold(sum16(&f[l3..l4], 0));
            f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        }
        let offset = (i * mss) as u32;
        f[l4 + 4..l4 + 8].copy_from_slice(&seq.wrapping_add(offset).to_be_bytes());
        let mut fl = flags;
        if i != last {
            fl &= !(0x01 | 0x08); // FIN, PSH
        }
        if i != 0 {
            fl &= !0x80; // CWR
        }
        f[l4 + 13] = fl;
        // The TCP checksum over the pseudo-header and the segment.
        f[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
        let addrs = if v6 {
            &f[l3 + 8..l3 + 40]
        } else {
            &f[l3 + 12..l3 + 20]
        };
        let mut sum = sum16(addrs, 0);
        sum += 6 + tcp_total as u32;
        let c = !fold(sum16(&f[l4..], sum));
        f[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
        out.push(f);
    }
    Some(out)
}

/// One's complement sum of `data` as big-endian 16-bit words, added to `sum` (unfolded).
fn sum16(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
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

    /// A 64 KiB-style TCP/IPv4 GSO frame (checksum left partial, as a tap hands it over)
    /// cut for a plain port: every segment verifies as etherparse reads it, sequence
    /// numbers follow the payload, PSH/FIN only on the last one, and the payload is whole.
    #[test]
    fn gso_frames_are_cut_into_finished_segments() {
        use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
        let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        for v6 in [false, true] {
            let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
            let builder = if v6 {
                builder.ipv6([0x20; 16], [0x21; 16], 64)
            } else {
                builder.ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            };
            let builder = builder.tcp(4000, 5001, 1_000_000, 65000).ack(7).psh().fin();
            let mut frame = Vec::new();
            builder.write(&mut frame, &payload).unwrap();
            let hdr = VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
                gso_size: 1448,
                ..VnetHdr::default()
            };
            let segs = segment(&frame, &hdr).unwrap();
            assert_eq!(segs.len(), 3);
            let mut joined = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                let p = SlicedPacket::from_ethernet(s).unwrap();
                let Some(TransportSlice::Tcp(tcp)) = p.transport else {
                    panic!("no TCP")
                };
                assert_eq!(tcp.sequence_number(), 1_000_000 + 1448 * i as u32);
                assert_eq!(tcp.psh() && tcp.fin(), i == 2, "segment {i}");
                let ok = match &p.net {
                    Some(etherparse::NetSlice::Ipv4(ip)) => {
                        assert_eq!(
                            ip.header().to_header().calc_header_checksum(),
                            ip.header().header_checksum()
                        );
                        tcp.calc_checksum_ipv4(ip.header().source(), ip.header().destination())
                            .unwrap()
                    }
                    Some(etherparse::NetSlice::Ipv6(ip)) => tcp
                        .calc_checksum_ipv6(ip.header().source(), ip.header().destination())
                        .unwrap(),
                    _ => panic!("no IP"),
                };
                assert_eq!(ok, tcp.checksum(), "segment {i} (v6 {v6})");
                joined.extend_from_slice(tcp.payload());
            }
            assert_eq!(joined, payload);
        }
        let udp = VnetHdr {
            gso_type: 3,
            gso_size: 1000,
            ..VnetHdr::default()
        };
        assert!(segment(&[0u8; 100], &udp).is_none());
        let tcp4 = VnetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 1000,
            ..VnetHdr::default()
        };
        assert!(segment(&[0u8; 20], &tcp4).is_none());
    }
}
