//! The RX chains popped ahead of the frames that will fill them, with their iovecs (for the next
//! `readv` and the `num_buffers` write) and their guest-physical ranges (for the dirty log).
//!
//! Invariants, kept by every method:
//! - the iovecs (and the ranges) from `iov_start` (`range_start`) on are the held chains' own,
//!   concatenated in hold order, so the first chain's are always at the front and a release
//!   steps over exactly them; those before the start are released ones not yet dropped;
//! - the byte capacity is the sum of the held chains' capacities;
//! - a head is held at most once, and heads are below the queue size, so at most a ring's worth
//!   of chains is ever held;
//! - every iovec points into the guest memory this type keeps a handle on, so the memory stays
//!   mapped for as long as any chain is held.

use std::collections::VecDeque;
use std::ops::Range;

use thiserror::Error;
use vm_memory::Bytes;
use vutap_virtio::{ChainLimits, Direction};

use crate::datapath::avail_chains::Chain;
use crate::datapath::chain_iov::{collect_chain_iovecs, BadChain, IoVec};
use crate::datapath::dirty_log::DirtyLog;
use crate::datapath::flat_mem::FlatMem;

/// Why a chain was not held.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HoldError {
    /// The driver posted a head again before getting it back: completing it twice, or holding
    /// more chains than the ring has, would follow.
    #[error("chain {0} is already held")]
    AlreadyHeld(u16),
    #[error(transparent)]
    BadChain(#[from] BadChain),
}

/// One held chain, as [`HeldChains::front`] and [`HeldChains::release_front`] report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldChain {
    pub head: u16,
    /// Bytes the chain's buffers take.
    pub capacity: usize,
    /// How many of the held iovecs are this chain's.
    pub iov_count: usize,
    range_count: usize,
}

pub struct HeldChains {
    /// The memory every held iovec points into: holding it keeps them valid.
    mem: FlatMem,
    chains: VecDeque<HeldChain>,
    /// Plain vectors with a start, not deques: a chain's iovecs are collected straight into
    /// them (no copy from a scratch vector) and read as one slice (no `make_contiguous`).
    iovs: Vec<IoVec>,
    iov_start: usize,
    ranges: Vec<(u64, u32)>,
    range_start: usize,
    capacity: usize,
    held_heads: Vec<bool>,
}

impl HeldChains {
    /// Holds chains of a queue of `queue_size` whose buffers are in `mem`.
    pub fn new(queue_size: u16, mem: &FlatMem) -> Self {
        let n = usize::from(queue_size);
        HeldChains {
            mem: mem.clone(),
            chains: VecDeque::with_capacity(n),
            iovs: Vec::with_capacity(2 * n),
            iov_start: 0,
            ranges: Vec::with_capacity(2 * n),
            range_start: 0,
            capacity: 0,
            held_heads: vec![false; n],
        }
    }

    pub fn len(&self) -> usize {
        self.chains.len()
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }

    /// Bytes the held chains take together.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Each held chain's capacity, oldest first.
    #[inline]
    pub fn capacities(&self) -> impl Iterator<Item = usize> + '_ {
        self.chains.iter().map(|c| c.capacity)
    }

    #[inline]
    pub fn front(&self) -> Option<HeldChain> {
        self.chains.front().copied()
    }

    /// The held chains' iovecs, oldest chain first.
    #[inline]
    pub fn iovs(&self) -> &[IoVec] {
        &self.iovs[self.iov_start..]
    }

    /// Checks the chain of `head` as a device-writable chain of at most `max_segments` iovecs
    /// and holds it behind the others. On error nothing changes.
    #[inline]
    pub fn hold(&mut self, head: u16, chain: Chain<'_>, limits: ChainLimits, max_segments: usize) -> Result<(), HoldError> {
        if self.held_heads.get(usize::from(head)).copied().unwrap_or(false) {
            return Err(HoldError::AlreadyHeld(head));
        }
        drop_released(&mut self.iovs, &mut self.iov_start);
        drop_released(&mut self.ranges, &mut self.range_start);
        let (iovs_before, ranges_before) = (self.iovs.len(), self.ranges.len());
        // SAFETY: the iovecs point into `self.mem`, which lives as long as `self` and so as long
        // as they are held; they leave `self` only as a borrowed slice (`iovs`).
        let capacity = unsafe {
            collect_chain_iovecs(chain, &self.mem, Direction::DeviceWrites, limits, max_segments, &mut self.iovs, Some(&mut self.ranges))
        }? as usize;
        // A head at or past the queue size cannot come out of the queue; were it to, it is held
        // untracked rather than refused.
        if let Some(slot) = self.held_heads.get_mut(usize::from(head)) {
            *slot = true;
        }
        let (iov_count, range_count) = (self.iovs.len() - iovs_before, self.ranges.len() - ranges_before);
        self.chains.push_back(HeldChain { head, capacity, iov_count, range_count });
        self.capacity += capacity;
        Ok(())
    }

    /// The leading chains one read may fill: as many as fit in `max_iovs` iovecs, stopping once
    /// they can take `max_bytes`. Returns their iovec count and capacity.
    #[inline]
    pub fn window(&self, max_bytes: usize, max_iovs: usize) -> (usize, usize) {
        let (mut iovs, mut capacity) = (0, 0);
        for c in &self.chains {
            if iovs + c.iov_count > max_iovs {
                break;
            }
            capacity += c.capacity;
            iovs += c.iov_count;
            if capacity >= max_bytes {
                break;
            }
        }
        (iovs, capacity)
    }

    /// The leading chains that can each take `min_bytes` alone, at most `max` of them: each one's
    /// iovecs as a range of [`iovs`](Self::iovs), and its capacity.
    pub fn single_chain_windows(&self, min_bytes: usize, max: usize, out: &mut Vec<(Range<usize>, usize)>) {
        out.clear();
        let mut start = 0;
        for c in self.chains.iter().take(max) {
            if c.capacity < min_bytes {
                break;
            }
            out.push((start..start + c.iov_count, c.capacity));
            start += c.iov_count;
        }
    }

    /// Writes `bytes` at `offset` into the oldest chain's buffers, through vm-memory's checked
    /// volatile accessors (the field may straddle two buffers in a hostile layout). Returns false
    /// if its buffers are too short or nothing is held.
    #[inline]
    pub fn write_to_front(&self, offset: usize, bytes: &[u8]) -> bool {
        let Some(front) = self.chains.front() else { return false };
        Self::write_iovs(self.iovs()[..front.iov_count].iter(), offset, bytes)
    }

    /// Writes `bytes` at `offset` into the held chains' buffers taken as one run, oldest first
    /// (the part of a frame that did not fit one read's window). Returns false if they are too
    /// short.
    pub fn write_across(&self, offset: usize, bytes: &[u8]) -> bool {
        Self::write_iovs(self.iovs().iter(), offset, bytes)
    }

    #[inline]
    fn write_iovs<'a>(iovs: impl Iterator<Item = &'a IoVec>, mut offset: usize, bytes: &[u8]) -> bool {
        let mut src = bytes;
        for iov in iovs {
            if src.is_empty() {
                break;
            }
            let buf = iov.as_volatile_slice();
            if offset >= buf.len() {
                offset -= buf.len();
                continue;
            }
            let n = (buf.len() - offset).min(src.len());
            if buf.write_slice(&src[..n], offset).is_err() {
                return false;
            }
            src = &src[n..];
            offset = 0;
        }
        src.is_empty()
    }

    /// Releases the oldest chain once its buffers were written, marking them in `log` (after
    /// the data, so the frontend never copies a page too early).
    #[inline]
    pub fn release_front(&mut self, log: Option<&DirtyLog>) -> Option<HeldChain> {
        let chain = self.chains.pop_front()?;
        let ranges = self.range_start..self.range_start + chain.range_count;
        if let Some(log) = log {
            for &(gpa, len) in &self.ranges[ranges.clone()] {
                log.mark(gpa, u64::from(len));
            }
        }
        self.iov_start += chain.iov_count;
        self.range_start = ranges.end;
        self.capacity -= chain.capacity;
        if let Some(slot) = self.held_heads.get_mut(usize::from(chain.head)) {
            *slot = false;
        }
        Some(chain)
    }

    /// Lets go of every held chain, unwritten, and yields their heads oldest first (to rewind
    /// the ring over them or complete them empty).
    pub fn take_back(&mut self) -> impl Iterator<Item = u16> + '_ {
        (self.iov_start, self.range_start) = (0, 0);
        self.iovs.clear();
        self.ranges.clear();
        self.capacity = 0;
        self.held_heads.fill(false);
        self.chains.drain(..).map(|c| c.head)
    }
}

/// Drops the released entries before `start` once they are at least half of `v`: each entry is
/// moved at most once per release, and `v` never grows past twice what is held.
#[inline]
fn drop_released<T>(v: &mut Vec<T>, start: &mut usize) {
    if *start > 0 && *start >= v.len() / 2 {
        v.drain(..*start);
        *start = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::*;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::{GuestAddress, GuestMemoryBackend};

    const SIZE: u16 = 16;
    const LIMITS: ChainLimits = ChainLimits { max_descriptors: SIZE as usize, max_bytes: u32::MAX, min_bytes: 12 };

    /// Pops the next chain of `q` and tries to hold it.
    fn hold_next(held: &mut HeldChains, q: &mut Queue, mem: &FlatMem) -> Result<(), HoldError> {
        let chain = q.iter(mem).unwrap().next().expect("a chain is posted");
        held.hold(chain.head_index(), Chain::Walked(chain), LIMITS, 64)
    }

    fn iov_lens(held: &HeldChains) -> Vec<usize> {
        held.iovs().iter().map(IoVec::len).collect()
    }

    #[test]
    fn test_held_chains_keep_iovecs_and_capacity_in_step() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        add_chain(&mq, 0, &[(DATA_BASE, 100, true), (DATA_BASE + 0x1000, 200, true)]);
        add_chain(&mq, 2, &[(DATA_BASE + 0x2000, 300, true)]);
        let mut q = queue(&mq, false);
        let mut held = HeldChains::new(SIZE, &mem);
        hold_next(&mut held, &mut q, &mem).unwrap();
        hold_next(&mut held, &mut q, &mem).unwrap();
        assert_eq!((held.len(), held.capacity()), (2, 600));
        assert_eq!(held.capacities().collect::<Vec<_>>(), vec![300, 300]);
        assert_eq!(iov_lens(&held), vec![100, 200, 300]);
        assert_eq!(held.iovs()[2].as_ptr() as usize, mem.guest_mem().get_host_address(GuestAddress(DATA_BASE + 0x2000)).unwrap() as usize);

        let first = held.release_front(None).unwrap();
        assert_eq!((first.head, first.capacity, first.iov_count), (0, 300, 2));
        assert_eq!((held.len(), held.capacity()), (1, 300));
        assert_eq!(iov_lens(&held), vec![300], "the released chain's iovecs went with it");
        assert_eq!(held.release_front(None).map(|c| c.head), Some(2));
        assert!(held.is_empty() && held.iovs().is_empty() && held.capacity() == 0);
        assert_eq!(held.release_front(None), None);
    }

    #[test]
    fn test_held_chains_refuse_a_head_held_twice_and_a_bad_chain_unchanged() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        add_chain(&mq, 0, &[(DATA_BASE, 100, true)]);
        add_chain(&mq, 1, &[(DATA_BASE + 0x1000, 100, false)]); // read-only: bad in RX
        repost_heads(&mq, &mem, SIZE, &[0]);
        let mut q = queue(&mq, false);
        let mut held = HeldChains::new(SIZE, &mem);
        hold_next(&mut held, &mut q, &mem).unwrap();
        assert!(matches!(hold_next(&mut held, &mut q, &mem), Err(HoldError::BadChain(_))));
        assert_eq!(hold_next(&mut held, &mut q, &mem), Err(HoldError::AlreadyHeld(0)));
        assert_eq!((held.len(), held.capacity()), (1, 100));
        assert_eq!(iov_lens(&held), vec![100]);
        // Released, the head may be held again.
        held.release_front(None).unwrap();
        repost_heads(&mq, &mem, SIZE, &[0]);
        hold_next(&mut held, &mut q, &mem).unwrap();
        assert_eq!(held.front().map(|c| c.head), Some(0));
    }

    #[test]
    fn test_held_chains_take_back_yields_heads_in_order_and_empties() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        for slot in [3u16, 7, 9] {
            add_chain(&mq, slot, &[(DATA_BASE + u64::from(slot) * 0x1000, 64, true)]);
        }
        let mut q = queue(&mq, false);
        let mut held = HeldChains::new(SIZE, &mem);
        for _ in 0..3 {
            hold_next(&mut held, &mut q, &mem).unwrap();
        }
        assert_eq!(held.take_back().collect::<Vec<_>>(), vec![3, 7, 9]);
        assert!(held.is_empty() && held.iovs().is_empty() && held.capacity() == 0);
        repost_heads(&mq, &mem, SIZE, &[7]);
        hold_next(&mut held, &mut q, &mem).expect("a head taken back may be held again");
    }

    #[test]
    fn test_held_chains_window_stops_at_the_iovec_limit_and_at_enough_bytes() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        add_chain(&mq, 0, &[(DATA_BASE, 500, true), (DATA_BASE + 0x1000, 500, true)]);
        add_chain(&mq, 2, &[(DATA_BASE + 0x2000, 1000, true)]);
        add_chain(&mq, 3, &[(DATA_BASE + 0x3000, 1000, true)]);
        let mut q = queue(&mq, false);
        let mut held = HeldChains::new(SIZE, &mem);
        for _ in 0..3 {
            hold_next(&mut held, &mut q, &mem).unwrap();
        }
        assert_eq!(held.window(1500, 64), (3, 2000), "two chains reach 1500 bytes");
        assert_eq!(held.window(10_000, 64), (4, 3000), "everything held");
        assert_eq!(held.window(10_000, 3), (3, 2000), "the third chain's iovec does not fit");
        assert_eq!(held.window(10_000, 1), (0, 0), "not even the first chain fits");
    }

    #[test]
    fn test_held_chains_single_chain_windows_stop_at_a_chain_too_small() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        add_chain(&mq, 0, &[(DATA_BASE, 500, true), (DATA_BASE + 0x1000, 1000, true)]);
        add_chain(&mq, 2, &[(DATA_BASE + 0x2000, 1500, true)]);
        add_chain(&mq, 3, &[(DATA_BASE + 0x3000, 1000, true)]);
        add_chain(&mq, 4, &[(DATA_BASE + 0x4000, 2000, true)]);
        let mut q = queue(&mq, false);
        let mut held = HeldChains::new(SIZE, &mem);
        for _ in 0..4 {
            hold_next(&mut held, &mut q, &mem).unwrap();
        }
        let mut w = Vec::new();
        held.single_chain_windows(1500, 8, &mut w);
        assert_eq!(w, vec![(0..2, 1500), (2..3, 1500)], "the third chain holds only 1000 bytes");
        held.single_chain_windows(0, 3, &mut w);
        assert_eq!(w, vec![(0..2, 1500), (2..3, 1500), (3..4, 1000)], "at most three");
        held.single_chain_windows(1501, 8, &mut w);
        assert!(w.is_empty());
    }

    #[test]
    fn test_held_chains_write_to_front_straddles_descriptors() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        // The 2-byte field at offset 10 is split over an 11-byte and a 100-byte descriptor.
        add_chain(&mq, 0, &[(DATA_BASE, 11, true), (DATA_BASE + 0x1000, 100, true)]);
        add_chain(&mq, 2, &[(DATA_BASE + 0x2000, 4, true), (DATA_BASE + 0x3000, 4, true), (DATA_BASE + 0x4000, 4, true)]);
        let mut q = queue(&mq, false);
        let mut held = HeldChains::new(SIZE, &mem);
        hold_next(&mut held, &mut q, &mem).unwrap();
        hold_next(&mut held, &mut q, &mem).unwrap();
        assert!(held.write_to_front(10, &[0xaa, 0xbb]));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA_BASE + 10)).unwrap(), 0xaa);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA_BASE + 0x1000)).unwrap(), 0xbb);
        assert!(!held.write_to_front(110, &[1, 2]), "past the front chain's 111 bytes");
        held.release_front(None).unwrap();
        assert!(held.write_to_front(10, &[1, 2]), "the next chain's third descriptor");
        assert_eq!(mem.read_obj::<u16>(GuestAddress(DATA_BASE + 0x4000 + 2)).unwrap(), u16::from_le_bytes([1, 2]));
        held.release_front(None).unwrap();
        assert!(!held.write_to_front(0, &[1]), "nothing held");
    }

    #[test]
    fn test_held_chains_hold_and_release_in_turn_keep_iovecs_and_ranges_in_step() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        add_chain(&mq, 0, &[(DATA_BASE, 100, true), (DATA_BASE + 0x1000, 200, true)]);
        add_chain(&mq, 2, &[(DATA_BASE + 0x10_0000, 300, true)]);
        add_chain(&mq, 3, &[(DATA_BASE + 0x20_0000, 400, true)]);
        add_chain(&mq, 4, &[(DATA_BASE + 0x3000, 100, false)]); // read-only: bad in RX
        let mut q = queue(&mq, false);
        let mut held = HeldChains::new(SIZE, &mem);
        let (file, log) = memfd_log(4096);
        let page = |a: u64| a / crate::datapath::dirty_log::LOG_PAGE;
        hold_next(&mut held, &mut q, &mem).unwrap();
        hold_next(&mut held, &mut q, &mem).unwrap();
        assert_eq!(held.release_front(None).map(|c| c.head), Some(0));
        hold_next(&mut held, &mut q, &mem).unwrap();
        assert_eq!(iov_lens(&held), vec![300, 400]);
        assert!(matches!(hold_next(&mut held, &mut q, &mem), Err(HoldError::BadChain(_))));
        assert_eq!(iov_lens(&held), vec![300, 400], "a bad chain leaves the held ones as they were");
        assert!(held.write_to_front(0, &[7; 300]) && !held.write_to_front(0, &[7; 301]));
        assert_eq!(held.release_front(Some(&log)).map(|c| c.head), Some(2));
        assert!(page_marked(&file, page(DATA_BASE + 0x10_0000)));
        assert!(!page_marked(&file, page(DATA_BASE + 0x20_0000)), "still held: not written yet");
        // Many more rounds than the ring has entries, the oldest chain released after each hold.
        for round in 0..3 * SIZE {
            repost_heads(&mq, &mem, SIZE, &[if round % 2 == 0 { 0 } else { 2 }]);
            hold_next(&mut held, &mut q, &mem).unwrap();
            let expect = match round {
                0 => vec![400, 100, 200],
                _ if round % 2 == 0 => vec![300, 100, 200],
                _ => vec![100, 200, 300],
            };
            assert_eq!(iov_lens(&held), expect, "round {round}");
            held.release_front(Some(&log)).unwrap();
            assert_eq!(held.capacity(), held.iovs().iter().map(IoVec::len).sum::<usize>());
        }
        assert!(page_marked(&file, page(DATA_BASE)) && page_marked(&file, page(DATA_BASE + 0x20_0000)));
    }

    #[test]
    fn test_held_chains_release_marks_the_chain_in_the_dirty_log() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        add_chain(&mq, 0, &[(DATA_BASE, 100, true)]);
        add_chain(&mq, 1, &[(DATA_BASE + 0x10_0000, 100, true)]);
        let mut q = queue(&mq, false);
        let mut held = HeldChains::new(SIZE, &mem);
        hold_next(&mut held, &mut q, &mem).unwrap();
        hold_next(&mut held, &mut q, &mem).unwrap();
        let (file, log) = memfd_log(4096);
        held.release_front(Some(&log)).unwrap();
        let page = |a: u64| a / crate::datapath::dirty_log::LOG_PAGE;
        assert!(page_marked(&file, page(DATA_BASE)));
        assert!(!page_marked(&file, page(DATA_BASE + 0x10_0000)), "still held: not written yet");
    }
}
