//! Pure virtio-net logic for vutap, with no I/O: everything here is a function of its inputs, so
//! it is unit- and property-tested without a tap, a socket or guest memory.
//!
//! - [`features`]: the feature set vutap offers and what a driver's choice implies.
//! - [`offload`]: negotiated guest features -> the tap's `TUN_F_*` offload flags.
//! - [`hdr`]: the virtio_net_hdr (10-byte legacy / 12-byte v1 form).
//! - [`chain`]: checks on a descriptor chain (direction, count, length, overflow).
//! - [`mergeable`]: spreading a received frame over mergeable RX buffers.
//! - [`config`]: the bounds-checked virtio-net config space.
//! - [`announce`]: the RARP frame that announces a migrated guest.
//! - [`resume`]: where a (re)started backend resumes a ring.

pub mod announce;
pub mod chain;
pub mod config;
pub mod features;
pub mod hdr;
pub mod mergeable;
pub mod offload;
pub mod resume;

#[cfg(test)]
mod proptests;

pub use chain::{ChainCheck, ChainError, ChainLimits, Direction};
pub use config::{ConfigError, NetConfig};
pub use features::{FeatureError, Features};
pub use hdr::VirtioNetHdr;
