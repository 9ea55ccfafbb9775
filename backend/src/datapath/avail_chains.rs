//! Pops the chains a guest posted: chains of one descriptor straight from the avail ring and
//! descriptor table, any other through virtio-queue.
//!
//! A Linux guest posts each mergeable RX buffer, and most TX frames, as a chain of one
//! descriptor. Popping one through virtio-queue builds an `AvailIter` (reading the avail index
//! again) and a `DescriptorChain`, and reads each ring field through the memory map: 20-30 ns
//! more of a worker's CPU per chain, in a profiled A/B, than reading the same fields through
//! pointers translated once (a minimal backend's whole ring work is 5-7 ns per frame,
//! `scripts/probes/virtio-rx-floor.c`). [`AvailChains`] reads the avail index once per run of
//! posted chains, and the ring entry and the descriptor through pointers translated once per
//! pass. A chain it does not take whole (a descriptor with
//! NEXT or INDIRECT set, a head out of range, an avail index too far ahead) it leaves in the
//! ring and pops through virtio-queue, with all its checks, as before. Either way the caller
//! checks the descriptors it gets (`collect_iovecs`) the same. The guest writes each descriptor
//! on its own CPU, so the first read of one misses the cache: the direct ring prefetches the
//! descriptor of the chain posted a few after the one it pops.

use std::sync::atomic::{AtomicU16, Ordering};

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

use crate::datapath::flat_mem::FlatMem;

/// A popped chain's descriptors.
pub enum Chain<'a> {
    /// The one descriptor of a chain read straight from the ring (neither NEXT nor INDIRECT).
    Single(Option<Descriptor>),
    /// Any other chain, walked by virtio-queue.
    Walked(DescriptorChain<&'a FlatMem>),
}

impl Iterator for Chain<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        match self {
            Chain::Single(d) => d.take(),
            Chain::Walked(chain) => chain.next(),
        }
    }
}

/// How many chains ahead of the one popped [`DirectRing`] prefetches a descriptor: far enough
/// that the load is done when that chain is popped (one frame's system call apart), near
/// enough that a Linux guest's refills (runs of 32 or more) cover it.
const PREFETCH_AHEAD: u16 = 4;

/// The chains posted on one queue, for one pass.
pub struct AvailChains<'a> {
    mem: &'a FlatMem,
    /// The ring read directly, unless it could not be translated.
    direct: Option<DirectRing>,
}

impl<'a> AvailChains<'a> {
    pub fn new(queue: &Queue, mem: &'a FlatMem) -> AvailChains<'a> {
        AvailChains { mem, direct: DirectRing::new(queue, mem) }
    }

    /// Pops `queue`'s next chain: its head and descriptors, or None if none is posted.
    /// Inlined: returned by value, the chain otherwise goes through the stack in pieces whose
    /// reloads stall (store forwarding), ~10 ns per chain in a profile.
    #[inline(always)]
    pub fn pop(&mut self, queue: &mut Queue) -> Result<Option<(u16, Chain<'a>)>, virtio_queue::Error> {
        match self.direct.as_mut().map_or(Direct::Other, |d| d.pop(queue)) {
            Direct::Empty => Ok(None),
            Direct::Single(head, descriptor) => Ok(Some((head, Chain::Single(Some(descriptor))))),
            Direct::Other => Ok(queue.iter(self.mem)?.next().map(|chain| (chain.head_index(), Chain::Walked(chain)))),
        }
    }
}

/// What [`DirectRing::pop`] found.
#[derive(Debug)]
enum Direct {
    /// No chain is posted.
    Empty,
    /// A chain of one descriptor, popped (the queue's next_avail moved past it).
    Single(u16, Descriptor),
    /// A chain to pop through virtio-queue: nothing was consumed.
    Other,
}

/// One queue's avail ring and descriptor table as host pointers. Valid only while the memory
/// they were translated in is mapped: [`AvailChains`] keeps it borrowed.
struct DirectRing {
    /// `size` descriptors of 16 bytes.
    desc_table: *const u64,
    /// The avail ring's index, then its `size` entries.
    avail_idx: *const AtomicU16,
    avail_entries: *const AtomicU16,
    size: u16,
    /// The avail index as last read: the chains before it are posted.
    posted_to: u16,
}

impl DirectRing {
    /// `queue`'s descriptor table and avail ring in `mem`, or None (every chain then goes through
    /// virtio-queue) if the queue is not ready, or either lies across two regions or outside
    /// guest memory, or is not aligned as virtio requires (16 and 2 bytes) in host memory.
    fn new(queue: &Queue, mem: &FlatMem) -> Option<DirectRing> {
        let size = queue.size();
        if !queue.ready() || size == 0 {
            return None;
        }
        let n = usize::from(size);
        let desc_table = mem.host_range(queue.desc_table(), 16 * n)?;
        let avail = mem.host_range(queue.avail_ring(), 4 + 2 * n)?;
        if !(desc_table as usize).is_multiple_of(16) || !(avail as usize).is_multiple_of(std::mem::align_of::<AtomicU16>()) {
            return None;
        }
        Some(DirectRing {
            desc_table: desc_table.cast(),
            // SAFETY: inside the 4 + 2n bytes host_range found in one region.
            avail_idx: unsafe { avail.add(2) }.cast(),
            // SAFETY: as above.
            avail_entries: unsafe { avail.add(4) }.cast(),
            size,
            posted_to: queue.next_avail(),
        })
    }

    /// Pops `queue`'s next chain if it is one descriptor. The memory the pointers are into must
    /// still be mapped (the caller's borrow).
    #[inline]
    fn pop(&mut self, queue: &mut Queue) -> Direct {
        let next = queue.next_avail();
        let known = self.posted_to.wrapping_sub(next);
        if known == 0 || known > self.size {
            // SAFETY: inside guest memory, still mapped (our contract), and aligned (new()).
            let idx = u16::from_le(unsafe { &*self.avail_idx }.load(Ordering::Acquire));
            if idx == next {
                return Direct::Empty;
            }
            if idx.wrapping_sub(next) > self.size {
                // A driver posting more than a ring: virtio-queue reports it.
                return Direct::Other;
            }
            self.posted_to = idx;
        }
        let head = self.head_at(next);
        if head >= self.size {
            return Direct::Other;
        }
        if self.posted_to.wrapping_sub(next) > PREFETCH_AHEAD {
            self.prefetch_descriptor(self.head_at(next.wrapping_add(PREFETCH_AHEAD)));
        }
        // SAFETY: head < size, so its 16 bytes are inside the table (new()), still mapped, and
        // 8-aligned (the table is 16-aligned). The driver may be rewriting them (a misbehaving
        // one): the value is then garbage, which the chain checks treat as any other descriptor.
        let (addr, rest) = unsafe {
            let desc = self.desc_table.add(2 * usize::from(head));
            (u64::from_le(std::ptr::read_volatile(desc)), u64::from_le(std::ptr::read_volatile(desc.add(1))))
        };
        // len (32 bits), flags, next: the second half of the descriptor.
        let descriptor = Descriptor::new(addr, rest as u32, (rest >> 32) as u16, (rest >> 48) as u16);
        if descriptor.flags() & (VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT) as u16 != 0 {
            return Direct::Other;
        }
        queue.set_next_avail(next.wrapping_add(1));
        Direct::Single(head, descriptor)
    }

    /// The head the avail ring holds for chain number `index`.
    #[inline]
    fn head_at(&self, index: u16) -> u16 {
        let entry = usize::from(index % self.size);
        // SAFETY: entry < size, inside the ring (new()); aligned, still mapped.
        u16::from_le(unsafe { &*self.avail_entries.add(entry) }.load(Ordering::Acquire))
    }

    /// Starts loading descriptor `head` into the cache (no-op if out of range). The driver
    /// wrote it on its own CPU, so the first read here misses (~15 ns per frame at 64 B on RX,
    /// in a profile); started a few chains ahead, the miss overlaps that chain's frame.
    #[inline]
    fn prefetch_descriptor(&self, head: u16) {
        if head >= self.size {
            return;
        }
        // Within the table (head < size): the pointer is only formed, a prefetch never faults.
        let desc = self.desc_table.wrapping_add(2 * usize::from(head));
        // SAFETY: SSE, which the intrinsic needs, is part of every x86_64 CPU.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(desc.cast())
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = desc;
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::test_utils::*;

    const SIZE: u16 = 16;

    /// A popped chain: its head, whether it was read straight from the ring, its descriptors.
    #[derive(Debug, PartialEq, Eq)]
    struct Got {
        head: u16,
        direct: bool,
        descs: Vec<(u64, u32, u16)>,
    }

    fn pop(chains: &mut AvailChains<'_>, q: &mut Queue) -> Option<Got> {
        let (head, chain) = chains.pop(q).expect("a valid avail index")?;
        let direct = matches!(chain, Chain::Single(_));
        Some(Got { head, direct, descs: chain.map(|d| (d.addr().0, d.len(), d.flags())).collect() })
    }

    /// What virtio-queue alone pops next.
    fn pop_walked(q: &mut Queue, mem: &FlatMem) -> Option<Got> {
        let chain = q.iter(mem).ok()?.next()?;
        let head = chain.head_index();
        Some(Got { head, direct: false, descs: chain.map(|d| (d.addr().0, d.len(), d.flags())).collect() })
    }

    const W: u16 = VRING_DESC_F_WRITE as u16;

    #[test]
    fn pops_one_descriptor_chains_from_the_ring_as_virtio_queue_would() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        for i in 0..3u16 {
            add_chain(&mq, i, &[(DATA_BASE + 0x1000 * u64::from(i), 1536, true)]);
        }
        let (mut q, mut walked_q) = (queue(&mq, true), queue(&mq, true));
        let mut chains = AvailChains::new(&q, &mem);
        for i in 0..3u16 {
            let got = pop(&mut chains, &mut q).expect("posted");
            assert_eq!(got, Got { head: i, direct: true, descs: vec![(DATA_BASE + 0x1000 * u64::from(i), 1536, W)] });
            assert_eq!(pop_walked(&mut walked_q, &mem), Some(Got { direct: false, ..got }));
        }
        assert_eq!(pop(&mut chains, &mut q), None);
        assert_eq!(q.next_avail(), 3);
    }

    #[test]
    fn pops_the_same_chains_while_it_prefetches_ahead_including_a_bad_head() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        for i in 0..10u16 {
            add_chain(&mq, i, &[(DATA_BASE + 0x1000 * u64::from(i), 1536, true)]);
        }
        // The ring entry of chain 5 names no descriptor: popping chain 1 prefetches for it.
        mem.write_obj(SIZE + 3, GuestAddress(mq.avail_addr().0 + 4 + 2 * 5)).unwrap();
        let (mut q, mut walked_q) = (queue(&mq, true), queue(&mq, true));
        let mut chains = AvailChains::new(&q, &mem);
        for i in 0..10u16 {
            let got = pop(&mut chains, &mut q).expect("posted");
            assert_eq!(got.direct, i != 5, "chain {i}");
            assert_eq!(pop_walked(&mut walked_q, &mem), Some(Got { direct: false, ..got }), "chain {i}");
        }
        assert_eq!(pop(&mut chains, &mut q), None);
        assert_eq!(q.next_avail(), 10);
    }

    #[test]
    fn sees_chains_posted_after_it_found_the_ring_empty() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        let mut q = queue(&mq, true);
        let mut chains = AvailChains::new(&q, &mem);
        assert_eq!(pop(&mut chains, &mut q), None);
        add_chain(&mq, 0, &[(DATA_BASE, 64, true)]);
        assert_eq!(pop(&mut chains, &mut q).map(|g| (g.head, g.direct)), Some((0, true)));
        assert_eq!(pop(&mut chains, &mut q), None);
    }

    #[test]
    fn walks_chained_and_indirect_descriptors_through_virtio_queue() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        add_chain(&mq, 0, &[(DATA_BASE, 12, true), (DATA_BASE + 0x1000, 1500, true)]);
        let table = DATA_BASE + 0x8000;
        for (i, len) in [12u32, 1500].into_iter().enumerate() {
            let next = if i == 0 { VRING_DESC_F_NEXT as u16 } else { 0 };
            mem.write_obj(Descriptor::new(DATA_BASE + 0x2000 * (i as u64 + 1), len, W | next, 1), GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let indirect = RawDescriptor::from(Descriptor::new(table, 32, VRING_DESC_F_INDIRECT as u16, 0));
        mq.add_desc_chains(&[indirect], 2).unwrap();
        let mut q = queue(&mq, true);
        let mut chains = AvailChains::new(&q, &mem);
        let next = W | VRING_DESC_F_NEXT as u16;
        assert_eq!(
            pop(&mut chains, &mut q),
            Some(Got { head: 0, direct: false, descs: vec![(DATA_BASE, 12, next), (DATA_BASE + 0x1000, 1500, W)] })
        );
        assert_eq!(
            pop(&mut chains, &mut q),
            Some(Got { head: 2, direct: false, descs: vec![(DATA_BASE + 0x2000, 12, next), (DATA_BASE + 0x4000, 1500, W)] })
        );
        assert_eq!(pop(&mut chains, &mut q), None);
    }

    #[test]
    fn leaves_a_head_out_of_range_to_virtio_queue() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        add_chain(&mq, 0, &[(DATA_BASE, 64, true)]);
        repost_heads(&mq, &mem, SIZE, &[SIZE + 3]);
        let mut q = queue(&mq, true);
        let mut chains = AvailChains::new(&q, &mem);
        assert_eq!(pop(&mut chains, &mut q).map(|g| g.direct), Some(true));
        // virtio-queue pops it and yields no descriptor, which the chain checks refuse.
        assert_eq!(pop(&mut chains, &mut q), Some(Got { head: SIZE + 3, direct: false, descs: vec![] }));
        assert_eq!(q.next_avail(), 2);
    }

    #[test]
    fn reports_an_avail_index_more_than_a_ring_ahead() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        add_chain(&mq, 0, &[(DATA_BASE, 64, true)]);
        mem.write_obj(SIZE + 1, GuestAddress(mq.avail_addr().0 + 2)).unwrap();
        let mut q = queue(&mq, true);
        let mut chains = AvailChains::new(&q, &mem);
        assert!(matches!(chains.pop(&mut q), Err(virtio_queue::Error::InvalidAvailRingIndex)));
        assert_eq!(q.next_avail(), 0);
    }

    #[test]
    fn reads_the_avail_index_again_once_the_chains_it_announced_are_popped() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        add_chain(&mq, 0, &[(DATA_BASE, 64, true)]);
        let mut q = queue(&mq, true);
        let mut chains = AvailChains::new(&q, &mem);
        assert_eq!(pop(&mut chains, &mut q).map(|g| g.head), Some(0));
        // Popped by virtio-queue meanwhile, past the index it read: it must not trust it.
        add_chain(&mq, 1, &[(DATA_BASE + 0x1000, 64, true)]);
        add_chain(&mq, 2, &[(DATA_BASE + 0x2000, 64, true)]);
        assert_eq!(pop_walked(&mut q, &mem).map(|g| g.head), Some(1));
        assert_eq!(pop(&mut chains, &mut q).map(|g| (g.head, g.direct)), Some((2, true)));
        assert_eq!(pop(&mut chains, &mut q), None);
    }

    /// A ready queue of SIZE with the given ring addresses.
    fn queue_at(desc: u32, avail: u32, used: u32) -> Queue {
        let mut q = Queue::new(SIZE).unwrap();
        q.set_desc_table_address(Some(desc), Some(0));
        q.set_avail_ring_address(Some(avail), Some(0));
        q.set_used_ring_address(Some(used), Some(0));
        q.set_ready(true);
        q
    }

    #[test]
    fn reads_the_ring_directly_only_where_it_is_one_aligned_piece_of_memory() {
        let two = FlatMem::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)]).unwrap();
        // The descriptor table (256 bytes) across the two regions.
        assert!(DirectRing::new(&queue_at(0xf80, 0x400, 0x800), &two).is_none());
        assert!(DirectRing::new(&queue_at(0x000, 0x400, 0x800), &two).is_some());
        let mut not_ready = queue_at(0x000, 0x400, 0x800);
        not_ready.set_ready(false);
        assert!(DirectRing::new(&not_ready, &two).is_none());
        // A region mapped from an odd guest address: aligned guest addresses (virtio-queue
        // refuses others) land on odd host addresses.
        let odd = FlatMem::from_ranges(&[(GuestAddress(0x1001), 0x2000)]).unwrap();
        let q = queue_at(0x1010, 0x1400, 0x1800);
        assert_eq!(q.desc_table(), 0x1010);
        assert!(DirectRing::new(&q, &odd).is_none());
    }

    #[test]
    fn pops_through_virtio_queue_alone_where_the_ring_cannot_be_read_directly() {
        // One chain whose descriptor table crosses from one region into the next.
        let mem = FlatMem::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)]).unwrap();
        let mut q = queue_at(0xf80, 0x400, 0x800);
        mem.write_obj(Descriptor::new(0x1800, 64, W, 0), GuestAddress(0xf80)).unwrap();
        mem.write_obj(1u16, GuestAddress(0x402)).unwrap();
        let mut chains = AvailChains::new(&q, &mem);
        assert_eq!(pop(&mut chains, &mut q), Some(Got { head: 0, direct: false, descs: vec![(0x1800, 64, W)] }));
        assert_eq!(pop(&mut chains, &mut q), None);
    }
}
