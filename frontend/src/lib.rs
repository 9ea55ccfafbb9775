//! vhost-user-net frontend (the VMM side), for tests and benchmarks.
//!
//! It does what a VMM and its guest driver do to a vhost-user-net backend: guest memory in a
//! memfd ([`memory`]), split virtqueues laid out in it and driven from the driver side
//! ([`virtqueue`]), the control-plane handshake in Cloud Hypervisor's or QEMU's order
//! ([`handshake`]), and frame-level send/receive over queue pairs ([`net`]).
//!
//! ```no_run
//! use vutap_frontend::{FrontendOptions, NetFrontend, VirtioNetHdr};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut fe = NetFrontend::connect("/tmp/vutap.sock".as_ref(), FrontendOptions::default())?;
//! fe.send_frame(0, &VirtioNetHdr::default(), &[0xff; 60])?;
//! let frame = fe.recv_frame(0, std::time::Duration::from_secs(1))?;
//! # Ok(()) }
//! ```

pub mod error;
pub mod features;
pub mod handshake;
pub mod hdr;
pub mod memory;
pub mod mergeable;
pub mod net;
pub mod virtqueue;

pub use error::{FrontendError, Result};
pub use handshake::HandshakeOrder;
pub use hdr::VirtioNetHdr;
pub use memory::GuestMemory;
pub use net::{rx_queue, tx_queue, FrontendOptions, NetConfig, NetFrontend, RxFrame, Stats, TxShape, TxSplit};
pub use virtqueue::{Descriptor, DriverQueue, QueueLayout, Segment, UsedElem};
