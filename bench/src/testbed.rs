//! Test bed: netns/veth/macvtap topologies and QEMU guests.
