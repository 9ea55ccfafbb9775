//! The virtio_net_hdr that precedes every frame on both queues.

/// `flags` bit: the checksum at `csum_start + csum_offset` must be completed.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// `gso_type` values.
pub const GSO_NONE: u8 = 0;
/// TCPv4 segmentation offload.
pub const GSO_TCPV4: u8 = 1;
/// TCPv6 segmentation offload.
pub const GSO_TCPV6: u8 = 4;

/// A virtio_net_hdr in host form. On the wire it is little endian, 10 bytes, plus `num_buffers`
/// (2 bytes) when VERSION_1 or MRG_RXBUF is negotiated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

impl VirtioNetHdr {
    /// Serialises into `out`, which must be 10 or 12 bytes (the negotiated length); a 10-byte
    /// `out` drops `num_buffers`. Returns the number of bytes written, 0 if `out` is shorter.
    pub fn write_to(&self, out: &mut [u8]) -> usize {
        if out.len() < 10 {
            return 0;
        }
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        if out.len() >= 12 {
            out[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
            12
        } else {
            10
        }
    }

    /// Parses the first 10 or 12 bytes of `bytes` (`len` = negotiated header length). A 10-byte
    /// header reads as `num_buffers = 1`. `None` if `bytes` is shorter than `len`.
    pub fn read_from(bytes: &[u8], len: usize) -> Option<Self> {
        if bytes.len() < len || len < 10 {
            return None;
        }
        let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
        Some(Self {
            flags: bytes[0],
            gso_type: bytes[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: if len >= 12 { u16_at(10) } else { 1 },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_lengths() {
        let h = VirtioNetHdr {
            flags: HDR_F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        let mut b = [0u8; 12];
        assert_eq!(h.write_to(&mut b), 12);
        assert_eq!(b, [1, 1, 54, 0, 0xa8, 0x05, 34, 0, 16, 0, 3, 0]);
        assert_eq!(VirtioNetHdr::read_from(&b, 12), Some(h));
        let mut s = [0u8; 10];
        assert_eq!(h.write_to(&mut s), 10);
        assert_eq!(VirtioNetHdr::read_from(&s, 10).unwrap().num_buffers, 1);
        assert_eq!(VirtioNetHdr::read_from(&s[..9], 10), None);
    }
}
