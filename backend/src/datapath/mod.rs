//! The datapath: one worker thread per queue pair and the batch loops that move frames between
//! guest memory and a tap queue.
//!
//! - [`worker`]: the epoll loop of one pair; [`tx`] and [`rx`]: the batch loops.
//! - [`tap_io`]: the two syscalls the loops make, behind a trait so they can be mocked.
//! - [`chain_iov`]: a checked chain as iovecs into guest memory; [`used_ring`]: one used-ring
//!   update per batch; [`dirty_log`]: the migration log.

pub(crate) mod chain_iov;
pub(crate) mod dirty_log;
pub mod rx;
pub(crate) mod tap_io;
pub mod tx;
pub(crate) mod used_ring;
pub mod worker;
