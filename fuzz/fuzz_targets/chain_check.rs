//! Descriptor chains as a guest could write them: (len, writable) pairs and limits from the
//! input. The check must never panic, and a success must respect every limit.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vutap_virtio::{chain::check_chain, ChainLimits, Direction};

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let direction = if data[0] & 1 == 0 { Direction::DeviceReads } else { Direction::DeviceWrites };
    let max_descriptors = usize::from(data[1]);
    let max_bytes = u32::from_le_bytes([data[2], data[3], data[4], data[5]]);
    let min_bytes = u32::from(u16::from_le_bytes([data[6], data[7]]));
    let limits = ChainLimits { max_descriptors, max_bytes, min_bytes };
    let descs: Vec<(u32, bool)> =
        data[8..].chunks_exact(5).map(|c| (u32::from_le_bytes([c[0], c[1], c[2], c[3]]), c[4] & 1 == 1)).collect();
    if let Ok(total) = check_chain(direction, limits, descs.iter().copied()) {
        assert!(descs.len() <= max_descriptors && !descs.is_empty());
        assert!(total <= max_bytes && total >= min_bytes);
        assert_eq!(u64::from(total), descs.iter().map(|d| u64::from(d.0)).sum::<u64>());
        assert!(descs.iter().all(|d| d.1 == (direction == Direction::DeviceWrites)));
    }
});
