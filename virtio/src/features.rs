//! The virtio-net feature set vutap offers, and what a driver's accepted set implies.

use thiserror::Error;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// vhost-user's own feature bit (not a virtio one): protocol features are negotiated.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

/// vhost's "log all writes" bit, set by the frontend during live migration.
pub const VHOST_F_LOG_ALL: u32 = 26;

/// The feature mask for one bit number.
pub const fn bit(n: u32) -> u64 {
    1u64 << n
}

/// Bytes of the legacy virtio_net_hdr (without `num_buffers`).
pub const LEGACY_HDR_LEN: usize = 10;
/// Bytes of the virtio 1.0 / mergeable-buffers virtio_net_hdr (with `num_buffers`).
pub const HDR_LEN: usize = 12;
/// The largest frame (Ethernet header + payload) a GSO packet can carry: 64 KiB of IP plus L2.
pub const MAX_GSO_FRAME: usize = 65535 + 14 + 4;
/// Ethernet header plus one VLAN tag, added to the MTU for the largest non-GSO frame.
pub const L2_OVERHEAD: usize = 14 + 4;

/// Every virtio-net feature vutap offers to the driver.
pub const OFFERED_NET_FEATURES: &[u32] = &[
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_F_LOG_ALL,
];

/// The offered set as a mask.
pub fn offered_features() -> u64 {
    OFFERED_NET_FEATURES.iter().fold(0, |acc, &b| acc | bit(b))
}

/// Rules from the virtio spec (5.1.3.1): a feature the driver may only accept together with one
/// of the features listed after it.
const DEPENDENCIES: &[(u32, &[u32])] = &[
    (VIRTIO_NET_F_GUEST_TSO4, &[VIRTIO_NET_F_GUEST_CSUM]),
    (VIRTIO_NET_F_GUEST_TSO6, &[VIRTIO_NET_F_GUEST_CSUM]),
    (VIRTIO_NET_F_GUEST_UFO, &[VIRTIO_NET_F_GUEST_CSUM]),
    (VIRTIO_NET_F_GUEST_ECN, &[VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6]),
    (VIRTIO_NET_F_HOST_TSO4, &[VIRTIO_NET_F_CSUM]),
    (VIRTIO_NET_F_HOST_TSO6, &[VIRTIO_NET_F_CSUM]),
    (VIRTIO_NET_F_HOST_UFO, &[VIRTIO_NET_F_CSUM]),
    (VIRTIO_NET_F_HOST_ECN, &[VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6]),
];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FeatureError {
    #[error("driver accepted features that were not offered: {0:#x}")]
    NotOffered(u64),
    #[error("driver accepted feature bit {feature} without any of the bits it depends on {requires:?}")]
    MissingDependency { feature: u32, requires: &'static [u32] },
}

/// A feature set the driver accepted and vutap validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features(u64);

impl Features {
    /// Validates `acked` against `offered` and the spec's dependency rules.
    pub fn negotiate(offered: u64, acked: u64) -> Result<Self, FeatureError> {
        let extra = acked & !offered;
        if extra != 0 {
            return Err(FeatureError::NotOffered(extra));
        }
        for &(feature, requires) in DEPENDENCIES {
            let has_any = requires.iter().any(|&r| acked & bit(r) != 0);
            if acked & bit(feature) != 0 && !has_any {
                return Err(FeatureError::MissingDependency { feature, requires });
            }
        }
        Ok(Features(acked))
    }

    pub fn bits(self) -> u64 {
        self.0
    }

    pub fn has(self, feature_bit: u32) -> bool {
        self.0 & bit(feature_bit) != 0
    }

    /// The virtio_net_hdr length both the guest and the tap use: 12 bytes for virtio 1.0 or
    /// mergeable buffers, 10 for a legacy driver without them.
    pub fn hdr_len(self) -> usize {
        if self.has(VIRTIO_F_VERSION_1) || self.has(VIRTIO_NET_F_MRG_RXBUF) {
            HDR_LEN
        } else {
            LEGACY_HDR_LEN
        }
    }

    pub fn mrg_rxbuf(self) -> bool {
        self.has(VIRTIO_NET_F_MRG_RXBUF)
    }

    pub fn event_idx(self) -> bool {
        self.has(VIRTIO_RING_F_EVENT_IDX)
    }

    /// Whether every write to guest memory must be marked in the dirty log (migration).
    pub fn log_all(self) -> bool {
        self.has(VHOST_F_LOG_ALL)
    }

    pub fn protocol_features(self) -> bool {
        self.has(VHOST_USER_F_PROTOCOL_FEATURES)
    }

    /// Whether the guest takes GSO frames, i.e. the tap may hand us frames up to 64 KiB.
    pub fn guest_gso(self) -> bool {
        self.has(VIRTIO_NET_F_GUEST_TSO4) || self.has(VIRTIO_NET_F_GUEST_TSO6) || self.has(VIRTIO_NET_F_GUEST_UFO)
    }

    /// The most bytes (header included) one received frame can take in guest buffers, so the
    /// RX loop only reads when that much room is posted and never truncates a frame.
    pub fn max_rx_frame(self, mtu: u16) -> usize {
        let frame = if self.guest_gso() { MAX_GSO_FRAME } else { mtu as usize + L2_OVERHEAD };
        frame + self.hdr_len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(bits: &[u32]) -> u64 {
        bits.iter().fold(0, |a, &b| a | bit(b))
    }

    #[test]
    fn test_offered_features_include_required_set() {
        let offered = offered_features();
        for b in [VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MQ, VIRTIO_RING_F_EVENT_IDX, 30] {
            assert_ne!(offered & bit(b), 0, "bit {b} missing");
        }
        assert_eq!(offered & bit(VIRTIO_NET_F_CTRL_VQ), 0, "no control queue is offered");
    }

    #[test]
    fn test_negotiate_rejects_unoffered_bits() {
        let offered = set(&[VIRTIO_F_VERSION_1]);
        let acked = set(&[VIRTIO_F_VERSION_1, VIRTIO_NET_F_CTRL_VQ]);
        assert_eq!(Features::negotiate(offered, acked), Err(FeatureError::NotOffered(bit(VIRTIO_NET_F_CTRL_VQ))));
    }

    #[test]
    fn test_negotiate_rejects_tso_without_csum() {
        let acked = set(&[VIRTIO_NET_F_GUEST_TSO4]);
        assert!(matches!(
            Features::negotiate(offered_features(), acked),
            Err(FeatureError::MissingDependency { feature: VIRTIO_NET_F_GUEST_TSO4, .. })
        ));
        let acked = set(&[VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_ECN]);
        assert!(Features::negotiate(offered_features(), acked).is_err());
    }

    #[test]
    fn test_negotiate_accepts_linux_driver_set() {
        let acked = offered_features() & !bit(VHOST_USER_F_PROTOCOL_FEATURES) & !bit(VHOST_F_LOG_ALL);
        let f = Features::negotiate(offered_features(), acked).unwrap();
        assert!(f.mrg_rxbuf() && f.event_idx() && f.guest_gso());
        assert!(!f.protocol_features() && !f.log_all());
    }

    #[test]
    fn test_hdr_len_by_version_and_mergeable() {
        assert_eq!(Features(0).hdr_len(), 10);
        assert_eq!(Features(bit(VIRTIO_NET_F_MRG_RXBUF)).hdr_len(), 12);
        assert_eq!(Features(bit(VIRTIO_F_VERSION_1)).hdr_len(), 12);
    }

    #[test]
    fn test_max_rx_frame_depends_on_gso() {
        let v1 = bit(VIRTIO_F_VERSION_1);
        assert_eq!(Features(v1).max_rx_frame(1500), 1500 + 18 + 12);
        assert_eq!(Features(v1).max_rx_frame(9000), 9000 + 18 + 12);
        let gso = v1 | set(&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4]);
        assert_eq!(Features(gso).max_rx_frame(1500), MAX_GSO_FRAME + 12);
    }
}
