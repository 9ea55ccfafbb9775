//! Completing a batch of chains: all used elements are written first, then the used index is
//! published with one release store, and the guest is interrupted at most once per batch
//! (honouring EVENT_IDX's used_event, or the avail ring's NO_INTERRUPT flag without it).

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::control::memory::GuestMem;
use crate::datapath::dirty_log::DirtyLog;

const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Used elements waiting to be published.
#[derive(Debug, Default)]
pub struct UsedBatch {
    elems: Vec<(u16, u32)>,
}

impl UsedBatch {
    pub fn with_capacity(n: usize) -> Self {
        UsedBatch { elems: Vec::with_capacity(n) }
    }

    pub fn push(&mut self, head: u16, len: u32) {
        self.elems.push((head, len));
    }

    pub fn is_empty(&self) -> bool {
        self.elems.is_empty()
    }

    /// Writes the batch to the used ring and publishes the new index. Returns whether the guest
    /// wants an interrupt for it. An empty batch publishes nothing and wants none.
    pub fn publish(&mut self, queue: &mut Queue, mem: &GuestMem, log: Option<&DirtyLog>) -> Result<bool, vm_memory::GuestMemoryError> {
        if self.elems.is_empty() {
            return Ok(false);
        }
        let size = queue.size();
        let used_ring = queue.used_ring();
        let old = Wrapping(queue.next_used());
        let mut idx = old;
        for &(head, len) in &self.elems {
            // Element layout: u32 id, u32 len, after the 4-byte flags/idx header.
            let slot = used_ring + 4 + u64::from(idx.0 % size) * 8;
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            elem[4..].copy_from_slice(&len.to_le_bytes());
            mem.write_slice(&elem, GuestAddress(slot))?;
            idx += Wrapping(1);
        }
        self.elems.clear();
        // The elements must be visible before the index that announces them.
        fence(Ordering::Release);
        mem.store(idx.0.to_le(), GuestAddress(used_ring + 2), Ordering::Release)?;
        queue.set_next_used(idx.0);
        if let Some(log) = log {
            log_used_ring(queue, log);
        }
        // The guest's used_event / flags must be read after our index store is visible.
        fence(Ordering::SeqCst);
        let avail_ring = queue.avail_ring();
        if queue.event_idx_enabled() {
            let used_event: u16 = u16::from_le(mem.load(GuestAddress(avail_ring + 4 + 2 * u64::from(size)), Ordering::Acquire)?);
            // vring_need_event(): notify if used_event is in (old, idx].
            Ok((idx - Wrapping(used_event) - Wrapping(1)) < (idx - old))
        } else {
            let flags: u16 = u16::from_le(mem.load(GuestAddress(avail_ring), Ordering::Acquire)?);
            Ok(flags & VRING_AVAIL_F_NO_INTERRUPT == 0)
        }
    }
}

/// Marks the whole used ring (flags, idx, elements, avail_event) in the dirty log: a couple of
/// pages, cheaper than tracking which slots changed.
pub fn log_used_ring(queue: &Queue, log: &DirtyLog) {
    log.mark(queue.used_ring(), 6 + 8 * u64::from(queue.size()));
}

/// The used index the guest last saw (for resuming a ring after a reconnect).
pub fn read_used_idx(queue: &Queue, mem: &GuestMem) -> Option<u16> {
    let addr = GuestAddress(queue.used_ring() + 2);
    mem.check_address(addr)?;
    mem.load::<u16>(addr, Ordering::Acquire).ok().map(u16::from_le)
}
