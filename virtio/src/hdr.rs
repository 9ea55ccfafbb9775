//! The virtio_net_hdr that precedes every frame, in the guest's buffers and on the tap alike.

use crate::features::{HDR_LEN, LEGACY_HDR_LEN};

/// Offset of `num_buffers` in the 12-byte header: the one field the device writes itself on RX
/// (the tap leaves those two bytes untouched).
pub const NUM_BUFFERS_OFFSET: usize = 10;

/// A decoded virtio_net_hdr (little-endian on the wire, as virtio 1.0 and x86 legacy agree).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VirtioNetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    /// Only present in the 12-byte form.
    pub num_buffers: u16,
}

impl VirtioNetHdr {
    /// Decodes a header of `len` bytes (10 or 12) from the start of `buf`; `None` if `buf` is
    /// shorter than that or `len` is neither form.
    pub fn parse(buf: &[u8], len: usize) -> Option<Self> {
        if (len != HDR_LEN && len != LEGACY_HDR_LEN) || buf.len() < len {
            return None;
        }
        let u16_at = |o: usize| u16::from_le_bytes([buf[o], buf[o + 1]]);
        Some(VirtioNetHdr {
            flags: buf[0],
            gso_type: buf[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: if len == HDR_LEN { u16_at(NUM_BUFFERS_OFFSET) } else { 0 },
        })
    }

    /// Encodes the 12-byte form.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }
}

/// The little-endian bytes the device stores at [`NUM_BUFFERS_OFFSET`] of the first buffer.
pub fn num_buffers_bytes(n: u16) -> [u8; 2] {
    n.to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_hdr_roundtrip_12_bytes() {
        let h = VirtioNetHdr { flags: 1, gso_type: 3, hdr_len: 54, gso_size: 1448, csum_start: 34, csum_offset: 16, num_buffers: 7 };
        let b = h.to_bytes();
        assert_eq!(b, [1, 3, 54, 0, 0xa8, 0x05, 34, 0, 16, 0, 7, 0]);
        assert_eq!(VirtioNetHdr::parse(&b, 12), Some(h));
    }

    #[test]
    fn test_hdr_parse_legacy_has_no_num_buffers() {
        let b = [0u8, 1, 2, 0, 3, 0, 4, 0, 5, 0, 9, 9];
        let h = VirtioNetHdr::parse(&b, 10).unwrap();
        assert_eq!((h.gso_type, h.hdr_len, h.csum_offset, h.num_buffers), (1, 2, 5, 0));
    }

    #[test]
    fn test_hdr_parse_rejects_short_or_odd_length() {
        assert_eq!(VirtioNetHdr::parse(&[0u8; 11], 12), None);
        assert_eq!(VirtioNetHdr::parse(&[0u8; 16], 11), None);
    }

    #[test]
    fn test_num_buffers_bytes_little_endian() {
        assert_eq!(num_buffers_bytes(0x0102), [2, 1]);
    }
}
