//! The datapath: one worker thread per queue pair and the batch loops that move frames between
//! guest memory and a tap queue.
//!
//! - [`worker`]: the epoll loop of one pair, scheduled by [`pair_state`], polling before it sleeps
//!   as [`poll_window`] says; [`tx`] and [`rx`]: the
//!   batch loops (RX holds popped chains in [`held_chains`]), stopping a ring on a
//!   [`ring_error::RingError`].
//! - [`tap_io`]: the two syscalls the loops make, behind a trait so they can be mocked;
//!   [`tap_ring`]: TX and RX batches through an io_uring instead (`--io-uring`).
//! - [`avail_chains`]: the posted chains, one-descriptor ones read straight from the ring (any
//!   other through virtio-queue); [`chain_iov`]: a checked chain as iovecs into guest memory;
//!   [`used_ring`]: one used-ring update per batch; [`dirty_log`]: the migration log.

pub(crate) mod avail_chains;
pub(crate) mod chain_iov;
pub(crate) mod dirty_log;
pub mod flat_mem;
pub(crate) mod held_chains;
pub(crate) mod pair_state;
pub mod poll_window;
pub(crate) mod read_window;
pub mod ring_error;
pub mod rx;
pub(crate) mod tap_io;
pub mod tap_ring;
pub mod tx;
pub(crate) mod used_ring;
pub mod worker;
