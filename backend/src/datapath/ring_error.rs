//! Why a batch loop stopped a ring: the guest's avail ring cannot be read or its used ring
//! cannot be written. The worker reports it and leaves the ring alone until the frontend resets
//! it.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum RingError {
    /// The avail ring is corrupt (its index jumped by more than the queue size) or outside
    /// guest memory.
    #[error("{0}")]
    PopAvail(#[source] virtio_queue::Error),
    #[error("used ring write failed: {0}")]
    PublishUsed(#[source] vm_memory::GuestMemoryError),
}
