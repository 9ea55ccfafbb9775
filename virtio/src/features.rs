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
    // The VMM runs the control queue (see FRONTEND_OWNED); offering it lets a VMM that shows the
    // guest only what the backend offers (cloud-hypervisor) expose MQ, which needs it.
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_F_LOG_ALL,
];

/// The offered set as a mask.
pub fn offered_features() -> u64 {
    OFFERED_NET_FEATURES.iter().fold(0, |acc, &b| acc | bit(b))
}

/// Features the VMM implements itself and never hands to the backend: the control queue. vutap
/// serves 2 × pairs queues whether or not the driver accepted it.
pub const FRONTEND_OWNED: &[u32] = &[VIRTIO_NET_F_CTRL_VQ];

/// Rules from the virtio spec (5.1.3.1): a feature the driver may only accept together with one
/// of the features listed after it.
const DEPENDENCIES: &[(u32, &[u32])] = &[
    (VIRTIO_NET_F_MQ, &[VIRTIO_NET_F_CTRL_VQ]),
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
    #[error("offered feature bit {feature} without any of the bits it depends on {requires:?}")]
    OfferedWithoutDependency { feature: u32, requires: &'static [u32] },
}

/// The first rule `set` breaks, skipping rules whose every required bit is frontend-owned when
/// `skip_frontend_owned`.
fn broken_rule(set: u64, skip_frontend_owned: bool) -> Option<(u32, &'static [u32])> {
    DEPENDENCIES.iter().copied().find(|&(feature, requires)| {
        let frontend_owned = requires.iter().all(|r| FRONTEND_OWNED.contains(r));
        let has_any = requires.iter().any(|&r| set & bit(r) != 0);
        set & bit(feature) != 0 && !has_any && !(skip_frontend_owned && frontend_owned)
    })
}

/// Checks that an offered set obeys every dependency rule, so a driver can accept all of it.
pub fn check_offered(offered: u64) -> Result<(), FeatureError> {
    match broken_rule(offered, false) {
        Some((feature, requires)) => Err(FeatureError::OfferedWithoutDependency { feature, requires }),
        None => Ok(()),
    }
}

/// A feature set the driver accepted and vutap validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features(u64);

impl Features {
    /// Validates `acked` (SET_FEATURES) against `offered` and the spec's dependency rules.
    ///
    /// Rules that need a frontend-owned bit (MQ needs CTRL_VQ) are not checked here: QEMU
    /// forwards to a vhost-user backend only the bits in its own list (`user_feature_bits` in
    /// hw/net/vhost_net.c), which has MQ but not CTRL_VQ because QEMU always runs the control
    /// queue itself, so its SET_FEATURES carries MQ without CTRL_VQ even when the guest accepted
    /// both. cloud-hypervisor forwards CTRL_VQ too. The VMM that owns the control queue enforces
    /// that rule towards the guest; vutap keeps it in its offer ([`check_offered`]).
    pub fn negotiate(offered: u64, acked: u64) -> Result<Self, FeatureError> {
        let extra = acked & !offered;
        if extra != 0 {
            return Err(FeatureError::NotOffered(extra));
        }
        match broken_rule(acked, true) {
            Some((feature, requires)) => Err(FeatureError::MissingDependency { feature, requires }),
            None => Ok(Features(acked)),
        }
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
        for b in [VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MQ, VIRTIO_NET_F_CTRL_VQ, VIRTIO_RING_F_EVENT_IDX, 30] {
            assert_ne!(offered & bit(b), 0, "bit {b} missing");
        }
    }

    #[test]
    fn test_check_offered_accepts_offered_set() {
        assert_eq!(check_offered(offered_features()), Ok(()));
    }

    #[test]
    fn test_check_offered_rejects_mq_without_ctrl_vq() {
        let offered = offered_features() & !bit(VIRTIO_NET_F_CTRL_VQ);
        assert_eq!(
            check_offered(offered),
            Err(FeatureError::OfferedWithoutDependency { feature: VIRTIO_NET_F_MQ, requires: &[VIRTIO_NET_F_CTRL_VQ] })
        );
    }

    #[test]
    fn test_negotiate_rejects_unoffered_bits() {
        let offered = set(&[VIRTIO_F_VERSION_1]);
        let acked = set(&[VIRTIO_F_VERSION_1, VIRTIO_NET_F_CTRL_VQ]);
        assert_eq!(Features::negotiate(offered, acked), Err(FeatureError::NotOffered(bit(VIRTIO_NET_F_CTRL_VQ))));
        let acked = set(&[VIRTIO_F_VERSION_1, VIRTIO_NET_F_CTRL_RX]);
        assert_eq!(Features::negotiate(offered_features(), acked), Err(FeatureError::NotOffered(bit(VIRTIO_NET_F_CTRL_RX))));
    }

    /// QEMU's `user_feature_bits` (hw/net/vhost_net.c, 7.2 and 10.0) restricted to the bits
    /// vutap offers: the only device bits QEMU takes from, and forwards to, a vhost-user backend.
    const QEMU_USER_FEATURE_BITS: &[u32] = &[
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_RING_F_EVENT_IDX,
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
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_MQ,
    ];

    /// What QEMU sends in SET_FEATURES when a Linux guest accepts everything its device offers:
    /// the backend decides only the bits in QEMU's list; QEMU adds its own (control queue,
    /// status, MAC, RX filtering), and forwards the guest's acks filtered through the list, plus
    /// the vhost-user protocol bit.
    fn qemu_set_features(backend_offer: u64) -> u64 {
        let list = set(QEMU_USER_FEATURE_BITS);
        let qemu_own = set(&[VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MAC, VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_VLAN]);
        let guest_acked = (backend_offer & list) | qemu_own;
        (guest_acked & list) | (backend_offer & bit(VHOST_USER_F_PROTOCOL_FEATURES))
    }

    #[test]
    fn test_negotiate_accepts_qemu_mq_without_ctrl_vq() {
        let acked = qemu_set_features(offered_features());
        assert_ne!(acked & bit(VIRTIO_NET_F_MQ), 0);
        assert_eq!(acked & bit(VIRTIO_NET_F_CTRL_VQ), 0, "QEMU never forwards CTRL_VQ");
        let f = Features::negotiate(offered_features(), acked).unwrap();
        assert!(f.mrg_rxbuf() && f.event_idx() && f.guest_gso() && f.protocol_features());
        assert!(!f.has(VIRTIO_NET_F_CTRL_VQ));
    }

    #[test]
    fn test_qemu_negotiation_unchanged_by_ctrl_vq_offer() {
        // QEMU ignores backend bits outside its list, so offering CTRL_VQ changes nothing it sends.
        let before = offered_features() & !bit(VIRTIO_NET_F_CTRL_VQ);
        assert_eq!(qemu_set_features(before), qemu_set_features(offered_features()));
    }

    /// What QEMU 7.2 and 10.0 sent in SET_FEATURES in tests/e2e_guest.rs (Linux 6.1 guest, 2 and
    /// 1 queue pairs): MQ without CTRL_VQ, or neither.
    const QEMU_OBSERVED_SET_FEATURES: &[u64] = &[0x1_7040_ff83, 0x1_7000_ff83];

    #[test]
    fn test_negotiate_accepts_observed_qemu_sets() {
        for &acked in QEMU_OBSERVED_SET_FEATURES {
            assert_eq!(acked & bit(VIRTIO_NET_F_CTRL_VQ), 0);
            let f = Features::negotiate(offered_features(), acked).unwrap();
            assert!(f.mrg_rxbuf() && f.event_idx() && f.guest_gso());
        }
    }

    /// What cloud-hypervisor v54 sent in SET_FEATURES for a one-pair device after a Linux 6.1
    /// guest accepted it (vutap's log in tests/e2e_cloud_hypervisor.rs): the guest's acks,
    /// CTRL_VQ and MQ included (with MAC, STATUS, MTU and the protocol bit).
    const CH_V54_SET_FEATURES: u64 = 0x1_7043_ffab;

    #[test]
    fn test_negotiate_accepts_cloud_hypervisor_set() {
        let acked = CH_V54_SET_FEATURES;
        assert_ne!(acked & bit(VIRTIO_NET_F_MQ), 0);
        assert_ne!(acked & bit(VIRTIO_NET_F_CTRL_VQ), 0);
        let f = Features::negotiate(offered_features(), acked).unwrap();
        assert!(f.has(VIRTIO_NET_F_CTRL_VQ) && f.mrg_rxbuf() && f.event_idx() && f.guest_gso());
        // Before CTRL_VQ was offered, CH could only have sent the set without it.
        assert_eq!(
            Features::negotiate(offered_features() & !bit(VIRTIO_NET_F_CTRL_VQ), acked),
            Err(FeatureError::NotOffered(bit(VIRTIO_NET_F_CTRL_VQ)))
        );
    }

    #[test]
    fn test_negotiate_accepts_mq_with_ctrl_vq_and_checks_other_rules() {
        let acked = set(&[VIRTIO_F_VERSION_1, VIRTIO_NET_F_MQ, VIRTIO_NET_F_CTRL_VQ]);
        assert!(Features::negotiate(offered_features(), acked).is_ok());
        // Skipping the control-queue rule does not skip the others.
        let acked = set(&[VIRTIO_NET_F_MQ, VIRTIO_NET_F_HOST_TSO4]);
        assert!(matches!(
            Features::negotiate(offered_features(), acked),
            Err(FeatureError::MissingDependency { feature: VIRTIO_NET_F_HOST_TSO4, .. })
        ));
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
