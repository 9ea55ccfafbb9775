//! Feature bits the frontend reasons about, written out here (not shared with the backend) so
//! the frontend is an independent implementation of the spec to test the backend against.

/// Bit mask for feature bit `n`.
pub const fn bit(n: u32) -> u64 {
    1u64 << n
}

/// `VIRTIO_NET_F_CSUM`: device handles packets with partial checksum.
pub const NET_F_CSUM: u64 = bit(0);
/// `VIRTIO_NET_F_GUEST_CSUM`: driver handles packets with partial checksum.
pub const NET_F_GUEST_CSUM: u64 = bit(1);
/// `VIRTIO_NET_F_MTU`: the config space carries an MTU.
pub const NET_F_MTU: u64 = bit(3);
/// `VIRTIO_NET_F_MAC`: the config space carries a MAC address.
pub const NET_F_MAC: u64 = bit(5);
/// `VIRTIO_NET_F_GUEST_TSO4`.
pub const NET_F_GUEST_TSO4: u64 = bit(7);
/// `VIRTIO_NET_F_GUEST_TSO6`.
pub const NET_F_GUEST_TSO6: u64 = bit(8);
/// `VIRTIO_NET_F_HOST_TSO4`.
pub const NET_F_HOST_TSO4: u64 = bit(11);
/// `VIRTIO_NET_F_HOST_TSO6`.
pub const NET_F_HOST_TSO6: u64 = bit(12);
/// `VIRTIO_NET_F_MRG_RXBUF`: RX frames may span several buffers (`num_buffers`).
pub const NET_F_MRG_RXBUF: u64 = bit(15);
/// `VIRTIO_NET_F_STATUS`: the config space carries a link status.
pub const NET_F_STATUS: u64 = bit(16);
/// `VIRTIO_NET_F_MQ`: more than one queue pair.
pub const NET_F_MQ: u64 = bit(22);
/// `VIRTIO_RING_F_INDIRECT_DESC`: descriptors may point at indirect tables.
pub const RING_F_INDIRECT_DESC: u64 = bit(28);
/// `VIRTIO_RING_F_EVENT_IDX`: `used_event` / `avail_event` replace the ring flags.
pub const RING_F_EVENT_IDX: u64 = bit(29);
/// `VHOST_USER_F_PROTOCOL_FEATURES`: the vhost-user protocol feature negotiation exists.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = bit(30);
/// `VIRTIO_F_VERSION_1`: modern device (12-byte net header, little endian).
pub const F_VERSION_1: u64 = bit(32);

/// What the frontend asks for by default: a modern device with mergeable RX buffers, event
/// index and indirect descriptors, and no offloads (so every frame is a plain <= MTU frame).
pub const DEFAULT_REQUESTED: u64 = F_VERSION_1
    | NET_F_MRG_RXBUF
    | RING_F_EVENT_IDX
    | RING_F_INDIRECT_DESC
    | NET_F_MAC
    | NET_F_STATUS
    | NET_F_MTU
    | NET_F_MQ
    | VHOST_USER_F_PROTOCOL_FEATURES;

/// Length of the virtio_net_hdr the device and driver agree on for `acked` features.
pub fn hdr_len(acked: u64) -> usize {
    if acked & (F_VERSION_1 | NET_F_MRG_RXBUF) != 0 {
        12
    } else {
        10
    }
}
