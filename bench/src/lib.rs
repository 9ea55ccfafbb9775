//! The VMM side of vhost-user-net for tests and benchmarks, and test-bed helpers.
//!
//! - [`frontend`]: a vhost-user-net frontend (guest memory in a memfd, split virtqueues laid out
//!   in it, the full handshake) that drives any backend socket.
//! - [`testbed`]: network namespaces, veth pairs, macvtaps, and TCG QEMU guests for end-to-end runs.

pub mod frontend;
pub mod loadgen;
pub mod packet;
pub mod testbed;
