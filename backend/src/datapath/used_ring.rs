//! Completing a batch of chains: all used elements are written first, then the used index is
//! published with one release store, and the guest is interrupted at most once per batch
//! (honouring EVENT_IDX's used_event, or the avail ring's NO_INTERRUPT flag without it).

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::datapath::dirty_log::DirtyLog;
use crate::datapath::flat_mem::FlatMem;

const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Size of a used element: u32 id, u32 len.
const ELEM_LEN: usize = 8;

/// Used elements waiting to be published, kept as the ring lays them out so a batch goes to
/// guest memory in one checked write per run of slots (two at the ring's wrap) instead of one
/// per element.
#[derive(Debug, Default)]
pub struct UsedBatch {
    bytes: Vec<u8>,
}

impl UsedBatch {
    pub fn with_capacity(n: usize) -> Self {
        UsedBatch { bytes: Vec::with_capacity(n * ELEM_LEN) }
    }

    pub fn push(&mut self, head: u16, len: u32) {
        self.bytes.extend_from_slice(&u32::from(head).to_le_bytes());
        self.bytes.extend_from_slice(&len.to_le_bytes());
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Writes the batch to the used ring and publishes the new index. Returns whether the guest
    /// wants an interrupt for it. An empty batch publishes nothing and wants none.
    pub fn publish(&mut self, queue: &mut Queue, mem: &FlatMem, log: Option<&DirtyLog>) -> Result<bool, vm_memory::GuestMemoryError> {
        if self.bytes.is_empty() {
            return Ok(false);
        }
        let size = queue.size();
        let used_ring = queue.used_ring();
        let old = Wrapping(queue.next_used());
        // Elements start after the 4-byte flags/idx header. One write per run of slots up to
        // the ring's end. A guest that re-posts heads can make a batch longer than the ring: it
        // wraps again, later elements overwriting earlier ones, never past the ring.
        let (mut slot, mut rest) = (usize::from(old.0 % size), &self.bytes[..]);
        while !rest.is_empty() {
            let (run, next) = rest.split_at(rest.len().min((usize::from(size) - slot) * ELEM_LEN));
            mem.write_slice(run, GuestAddress(used_ring + 4 + (slot * ELEM_LEN) as u64))?;
            (slot, rest) = (0, next);
        }
        // The index counts elements modulo 2^16, as the ring does.
        let idx = old + Wrapping((self.bytes.len() / ELEM_LEN) as u16);
        self.bytes.clear();
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
            let at = used_event_addr(queue).ok_or(vm_memory::GuestMemoryError::GuestAddressOverflow)?;
            let used_event: u16 = u16::from_le(mem.load(at, Ordering::Acquire)?);
            // vring_need_event(): notify if used_event is in (old, idx].
            Ok((idx - Wrapping(used_event) - Wrapping(1)) < (idx - old))
        } else {
            let flags: u16 = u16::from_le(mem.load(GuestAddress(avail_ring), Ordering::Acquire)?);
            Ok(flags & VRING_AVAIL_F_NO_INTERRUPT == 0)
        }
    }
}

/// After how many more completions the guest wants its interrupt (EVENT_IDX's used_event), or
/// None: no EVENT_IDX, or an event index the used ring has already passed.
pub fn completions_until_event(queue: &Queue, mem: &FlatMem) -> Option<u16> {
    if !queue.event_idx_enabled() {
        return None;
    }
    let used_event = u16::from_le(mem.load(used_event_addr(queue)?, Ordering::Acquire).ok()?);
    // The interrupt is due once the used index passes used_event.
    let due_in = used_event.wrapping_add(1).wrapping_sub(queue.next_used());
    (1..=queue.size()).contains(&due_in).then_some(due_in)
}

/// Where the guest keeps used_event (EVENT_IDX): right after the avail ring's entries.
fn used_event_addr(queue: &Queue) -> Option<GuestAddress> {
    queue.avail_ring().checked_add(4 + 2 * u64::from(queue.size())).map(GuestAddress)
}

/// Marks the whole used ring (flags, idx, elements, avail_event) in the dirty log: a couple of
/// pages, cheaper than tracking which slots changed.
pub fn log_used_ring(queue: &Queue, log: &DirtyLog) {
    log.mark(queue.used_ring(), 6 + 8 * u64::from(queue.size()));
}

/// The used index the guest last saw (for resuming a ring after a reconnect).
pub fn read_used_idx<M: GuestMemory>(queue: &Queue, mem: &M) -> Option<u16> {
    let addr = GuestAddress(queue.used_ring().checked_add(2)?);
    mem.load::<u16>(addr, Ordering::Acquire).ok().map(u16::from_le)
}

#[cfg(test)]
mod tests {
    use virtio_queue::mock::MockSplitQueue;

    use super::*;
    use crate::test_utils::{guest_memory, queue, used_addr};

    const SIZE: u16 = 8;

    /// Every slot of the used ring (id, len), and the 2 bytes right after it (avail_event).
    fn slots(mem: &FlatMem, base: u64) -> (Vec<(u32, u32)>, u16) {
        let slots = (0..u64::from(SIZE))
            .map(|i| (mem.read_obj(GuestAddress(base + 4 + i * 8)).unwrap(), mem.read_obj(GuestAddress(base + 8 + i * 8)).unwrap()))
            .collect();
        (slots, mem.read_obj(GuestAddress(base + 4 + 8 * u64::from(SIZE))).unwrap())
    }

    /// A ring of SIZE whose next used slot is `next_used`, with a marker right after its
    /// elements; returns the queue and the used ring's address.
    fn ring(mem: &FlatMem, next_used: u16) -> (Queue, u64) {
        let mq = MockSplitQueue::new(mem, SIZE);
        let mut q = queue(&mq, false);
        let base = used_addr(&mq, SIZE);
        mem.write_obj(0xbeefu16, GuestAddress(base + 4 + 8 * u64::from(SIZE))).unwrap();
        q.set_next_used(next_used);
        (q, base)
    }

    #[test]
    fn test_publish_writes_each_element_in_its_slot_across_the_wrap() {
        let mem = guest_memory();
        let (mut q, base) = ring(&mem, 6);
        let mut batch = UsedBatch::with_capacity(4);
        for (head, len) in [(3, 100), (5, 200), (1, 300), (7, 400)] {
            batch.push(head, len);
        }
        assert!(batch.publish(&mut q, &mem, None).unwrap(), "no NO_INTERRUPT flag: the guest wants one");
        assert!(batch.is_empty());
        let (slots, after) = slots(&mem, base);
        assert_eq!((slots[6], slots[7], slots[0], slots[1]), ((3, 100), (5, 200), (1, 300), (7, 400)));
        assert_eq!(after, 0xbeef, "nothing written past the ring");
        assert_eq!(mem.read_obj::<u16>(GuestAddress(base + 2)).unwrap(), 10);
        assert_eq!(q.next_used(), 10);
        // An empty batch publishes nothing and wants no interrupt.
        assert!(!batch.publish(&mut q, &mem, None).unwrap());
        assert_eq!(q.next_used(), 10);
    }

    #[test]
    fn test_publish_of_a_batch_longer_than_the_ring_stays_inside_it() {
        let mem = guest_memory();
        let (mut q, base) = ring(&mem, 5);
        // A guest that re-posts heads can make a batch of 20 completions on a ring of 8.
        let mut batch = UsedBatch::with_capacity(20);
        (0..20u32).for_each(|i| batch.push(i as u16, 1000 + i));
        batch.publish(&mut q, &mem, None).unwrap();
        let (slots, after) = slots(&mem, base);
        // Element i went to slot (5 + i) % 8; the last 8 (12..20) are the ones left.
        let expected: Vec<(u32, u32)> = (0..8u32).map(|s| (12..20).find(|i| (5 + i) % 8 == s).unwrap()).map(|i| (i, 1000 + i)).collect();
        assert_eq!(slots, expected);
        assert_eq!(after, 0xbeef, "nothing written past the ring");
        assert_eq!(mem.read_obj::<u16>(GuestAddress(base + 2)).unwrap(), 25);
    }
}
