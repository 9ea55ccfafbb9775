//! Maps the offloads a guest accepted to the tap's `TUNSETOFFLOAD` flags.
//!
//! The tap only hands us checksum-less or GSO frames when told the reader copes with them;
//! without this the host segments and checksums everything before the guest sees it.

use crate::features::Features;
use virtio_bindings::virtio_net::*;

pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;

/// Guest feature -> tap flag. Every GSO flag needs `TUN_F_CSUM` too (the kernel ignores them
/// otherwise), which the spec's dependency rules already guarantee for a validated set.
const OFFLOAD_TABLE: &[(u32, u32)] = &[
    (VIRTIO_NET_F_GUEST_CSUM, TUN_F_CSUM),
    (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
    (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
    (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN),
    (VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO),
];

/// The `TUN_F_*` flags for what the guest can receive.
pub fn tun_offload_flags(features: Features) -> u32 {
    if !features.has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    OFFLOAD_TABLE.iter().filter(|(feature, _)| features.has(*feature)).fold(0, |acc, (_, flag)| acc | flag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::{bit, offered_features};

    fn features(bits: &[u32]) -> Features {
        Features::negotiate(offered_features(), bits.iter().fold(0, |a, &b| a | bit(b))).unwrap()
    }

    #[test]
    fn test_tun_offload_flags_one_by_one() {
        let csum = VIRTIO_NET_F_GUEST_CSUM;
        assert_eq!(tun_offload_flags(features(&[])), 0);
        assert_eq!(tun_offload_flags(features(&[csum])), TUN_F_CSUM);
        assert_eq!(tun_offload_flags(features(&[csum, VIRTIO_NET_F_GUEST_TSO4])), TUN_F_CSUM | TUN_F_TSO4);
        assert_eq!(tun_offload_flags(features(&[csum, VIRTIO_NET_F_GUEST_TSO6])), TUN_F_CSUM | TUN_F_TSO6);
        assert_eq!(tun_offload_flags(features(&[csum, VIRTIO_NET_F_GUEST_UFO])), TUN_F_CSUM | TUN_F_UFO);
        assert_eq!(
            tun_offload_flags(features(&[csum, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_ECN])),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN
        );
    }

    #[test]
    fn test_tun_offload_flags_ignore_host_side_features() {
        // HOST_* features describe what the guest sends; they never change what the tap delivers.
        let f = features(&[VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_UFO]);
        assert_eq!(tun_offload_flags(f), 0);
    }

    #[test]
    fn test_tun_offload_flags_full_linux_set() {
        let f = Features::negotiate(offered_features(), offered_features()).unwrap();
        assert_eq!(tun_offload_flags(f), TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO);
    }
}
