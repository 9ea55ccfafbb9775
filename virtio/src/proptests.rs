//! Property-based tests (proptest, stable Rust) of header parsing, offload mapping, descriptor
//! chain checks and the mergeable layout. 256 cases per property, so CI stays fast; the fuzz
//! targets in `fuzz/` run the same functions for as long as wanted.

use proptest::prelude::*;
use virtio_bindings::virtio_net::*;

use crate::chain::{check_chain, ChainError, ChainLimits, Direction};
use crate::features::{offered_features, Features, HDR_LEN, LEGACY_HDR_LEN};
use crate::hdr::VirtioNetHdr;
use crate::mergeable::{chains_needed, used_len};
use crate::offload::*;

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(256)
}

/// `bits` cut down to the offered set, then closed under the offload dependencies the way a
/// driver accepts features: ECN brings TSO4, and any TSO/UFO brings its checksum offload.
fn closed_subset(bits: u64) -> u64 {
    let bit = |b: u32| 1u64 << b;
    let mut acked = bits & offered_features();
    for (ecn, tso4, tso6) in [
        (VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6),
        (VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6),
    ] {
        if acked & bit(ecn) != 0 && acked & (bit(tso4) | bit(tso6)) == 0 {
            acked |= bit(tso4);
        }
    }
    for (needs, csum) in [
        ([VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO], VIRTIO_NET_F_GUEST_CSUM),
        ([VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO], VIRTIO_NET_F_CSUM),
    ] {
        if needs.iter().any(|&b| acked & bit(b) != 0) {
            acked |= bit(csum);
        }
    }
    acked
}

proptest! {
    #![proptest_config(config())]

    /// Any 12 bytes parse, and encode back to themselves.
    #[test]
    fn prop_hdr_roundtrip(bytes in prop::array::uniform12(any::<u8>())) {
        let h = VirtioNetHdr::parse(&bytes, HDR_LEN).unwrap();
        prop_assert_eq!(h.to_bytes(), bytes);
    }

    /// Parsing never panics, and succeeds exactly for a known length the buffer holds.
    #[test]
    fn prop_hdr_parse_total(buf in prop::collection::vec(any::<u8>(), 0..32), len in 0usize..40) {
        let r = VirtioNetHdr::parse(&buf, len);
        prop_assert_eq!(r.is_some(), (len == HDR_LEN || len == LEGACY_HDR_LEN) && buf.len() >= len);
        if let (Some(h), true) = (r, len == LEGACY_HDR_LEN) {
            prop_assert_eq!(h.num_buffers, 0);
        }
    }

    /// For any set a driver may accept (a subset of the offered features, closed under the
    /// offload dependencies), negotiation succeeds and the tap flags are exactly the table's
    /// image of the GUEST_* features, all gated on GUEST_CSUM.
    #[test]
    fn prop_offload_mapping(bits in any::<u64>()) {
        let acked = closed_subset(bits);
        let f = Features::negotiate(offered_features(), acked);
        prop_assert!(f.is_ok(), "a closed subset of the offered set was refused: {:?}", f);
        let f = f.unwrap();
        let flags = tun_offload_flags(f);
        prop_assert_eq!(flags & !(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO), 0);
        if !f.has(VIRTIO_NET_F_GUEST_CSUM) {
            prop_assert_eq!(flags, 0);
        } else {
            prop_assert!(flags & TUN_F_CSUM != 0);
            for (feat, flag) in [(VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4), (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
                                 (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN), (VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO)] {
                prop_assert_eq!(flags & flag != 0, f.has(feat));
            }
        }
        prop_assert_eq!(f.bits(), acked);
        prop_assert!(f.hdr_len() == HDR_LEN || f.hdr_len() == LEGACY_HDR_LEN);
    }

    /// Any subset of the offered set is accepted exactly when it keeps the spec's offload
    /// dependencies (checked against a model written out here, not the crate's table).
    #[test]
    fn prop_negotiate_subset_matches_dependency_model(bits in any::<u64>()) {
        let acked = bits & offered_features();
        let has = |b: u32| acked & (1u64 << b) != 0;
        let csum_ok = |feats: &[u32], need: u32| feats.iter().all(|&b| !has(b) || has(need));
        let model_ok = csum_ok(&[VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO], VIRTIO_NET_F_GUEST_CSUM)
            && csum_ok(&[VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO], VIRTIO_NET_F_CSUM)
            && (!has(VIRTIO_NET_F_GUEST_ECN) || has(VIRTIO_NET_F_GUEST_TSO4) || has(VIRTIO_NET_F_GUEST_TSO6))
            && (!has(VIRTIO_NET_F_HOST_ECN) || has(VIRTIO_NET_F_HOST_TSO4) || has(VIRTIO_NET_F_HOST_TSO6));
        prop_assert_eq!(Features::negotiate(offered_features(), acked).is_ok(), model_ok);
    }

    /// A set with any bit outside the offered set is refused, naming exactly those bits.
    #[test]
    fn prop_negotiate_refuses_unoffered_bits(bits in any::<u64>()) {
        let extra = bits & !offered_features();
        let r = Features::negotiate(offered_features(), bits);
        if extra != 0 {
            prop_assert_eq!(r, Err(crate::features::FeatureError::NotOffered(extra)));
        }
    }

    /// The chain check agrees with a plain model: direction first, then the count, then a
    /// u64 sum against the limits.
    #[test]
    fn prop_chain_check_matches_model(
        descs in prop::collection::vec((prop_oneof![0u32..2000, any::<u32>()], prop::bool::weighted(0.9)), 0..12),
        tx in any::<bool>(),
        max_descriptors in 1usize..10,
        max_bytes in prop_oneof![Just(u32::MAX), 0u32..100_000],
        min_bytes in 0u32..20,
    ) {
        let direction = if tx { Direction::DeviceReads } else { Direction::DeviceWrites };
        let want_writable = !tx;
        let descs: Vec<(u32, bool)> = descs.into_iter().map(|(l, right)| (l, if right { want_writable } else { !want_writable })).collect();
        let limits = ChainLimits { max_descriptors, max_bytes, min_bytes };
        let got = check_chain(direction, limits, descs.iter().copied());
        // Model.
        let mut total = 0u64;
        let mut model = None;
        for (i, (len, w)) in descs.iter().enumerate() {
            if *w != want_writable { model = Some(Err("dir")); break; }
            if i >= max_descriptors { model = Some(Err("count")); break; }
            total += u64::from(*len);
            if total > u64::from(u32::MAX) { model = Some(Err("overflow")); break; }
            if total > u64::from(max_bytes) { model = Some(Err("long")); break; }
        }
        let model = model.unwrap_or_else(|| {
            if descs.is_empty() { Err("empty") } else if total < u64::from(min_bytes) { Err("short") } else { Ok(total as u32) }
        });
        let got_kind = got.map_err(|e| match e {
            ChainError::WrongDirection { .. } => "dir",
            ChainError::TooManyDescriptors { .. } => "count",
            ChainError::LengthOverflow => "overflow",
            ChainError::TooLong { .. } => "long",
            ChainError::Empty => "empty",
            ChainError::TooShort { .. } => "short",
        });
        prop_assert_eq!(got_kind, model);
    }

    /// A frame spread over mergeable buffers uses the fewest buffers that hold it, fills all
    /// but the last, and the used lengths add up to the frame.
    #[test]
    fn prop_mergeable_layout(frame in 0usize..70_000, caps in prop::collection::vec(0usize..5000, 0..40)) {
        match chains_needed(frame, caps.iter().copied()) {
            None => prop_assert!(frame == 0 || caps.iter().sum::<usize>() < frame),
            Some((n, last)) => {
                prop_assert!(n >= 1 && n <= caps.len());
                let before: usize = caps[..n - 1].iter().sum();
                prop_assert!(before < frame);
                prop_assert!(last <= caps[n - 1]);
                let total: usize = (0..n).map(|i| used_len(i, n, last, caps[i])).sum();
                prop_assert_eq!(total, frame);
            }
        }
    }
}
