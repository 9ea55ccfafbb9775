//! virtio_net_hdr parsing: never panics; 12-byte headers round-trip.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vutap_virtio::VirtioNetHdr;

fuzz_target!(|data: &[u8]| {
    let Some((&len, buf)) = data.split_first() else { return };
    if let Some(h) = VirtioNetHdr::parse(buf, usize::from(len)) {
        if len == 12 {
            assert_eq!(&h.to_bytes()[..], &buf[..12]);
        }
    }
});
