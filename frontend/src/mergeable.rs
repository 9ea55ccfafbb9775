//! Mergeable RX buffer sizes as a Linux guest chooses them.
//!
//! Linux's virtio_net (drivers/net/virtio_net.c, `get_mergeable_buf_len` and
//! `add_recvbuf_mergeable`) sizes each mergeable buffer from an average of recent frame lengths
//! (an EWMA), clamped between `GOOD_PACKET_LEN` (1518) and a page minus the header, plus the
//! header, aligned to a cache line. A guest seeing 64 B or 1500 B frames posts ~1.5 KiB buffers;
//! one seeing 9000 B frames posts page-sized buffers (a frame then spans three of them).
//! (`mergeable_min_buf_len` only goes above 1518 for rings too small to hold a 64 KiB frame in
//! minimum-sized buffers, which the bench's rings never are.)

/// `GOOD_PACKET_LEN`: ETH_HLEN + VLAN_HLEN + ETH_DATA_LEN.
pub const GOOD_PACKET_LEN: u32 = 1518;
/// The guest's page size.
pub const PAGE_SIZE: u32 = 4096;
/// `L1_CACHE_BYTES` on x86-64.
pub const L1_CACHE_BYTES: u32 = 64;

/// The buffer length a Linux guest posts once its average received frame length (virtio-net
/// header excluded) has settled at `avg_frame_len`; `hdr_len` is the negotiated header length.
pub fn linux_buf_len(avg_frame_len: u32, hdr_len: u32) -> u32 {
    let len = hdr_len + avg_frame_len.clamp(GOOD_PACKET_LEN, PAGE_SIZE - hdr_len);
    len.next_multiple_of(L1_CACHE_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_linux_buf_len_small_frames_get_the_minimum() {
        assert_eq!(linux_buf_len(60, 12), 1536);
        assert_eq!(linux_buf_len(1514, 12), 1536);
    }

    #[test]
    fn test_linux_buf_len_jumbo_frames_get_a_page() {
        assert_eq!(linux_buf_len(9014, 12), 4096);
        assert_eq!(linux_buf_len(65_000, 12), 4096);
    }

    #[test]
    fn test_linux_buf_len_between_is_aligned_to_a_cache_line() {
        assert_eq!(linux_buf_len(2000, 12), 2048);
        assert_eq!(linux_buf_len(2036, 12), 2048);
        assert_eq!(linux_buf_len(2037, 12), 2112);
    }
}
