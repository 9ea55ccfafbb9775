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

    /// Whatever a driver acks, negotiation never panics; when it succeeds the tap flags are
    /// exactly the table's image of the GUEST_* features, all gated on GUEST_CSUM.
    #[test]
    fn prop_offload_mapping(acked in any::<u64>()) {
        let Ok(f) = Features::negotiate(offered_features(), acked) else { return Ok(()) };
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
        // Never more than was offered and acked.
        prop_assert_eq!(f.bits() & !(acked & offered_features()), 0);
        prop_assert!(f.hdr_len() == HDR_LEN || f.hdr_len() == LEGACY_HDR_LEN);
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
