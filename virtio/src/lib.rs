//! Pure virtio-net logic (no I/O): headers, feature sets, offload mapping, chain checks, config space.
