//! The TX batch loop: guest chains -> one `write`/`writev` per frame straight from guest memory.

use std::io;
use std::ops::Range;
use std::sync::Arc;

use log::{trace, warn};
use virtio_queue::{Queue, QueueT};
use vutap_virtio::features::{HDR_LEN, MAX_GSO_FRAME};
use vutap_virtio::{ChainLimits, Direction};

use crate::control::memory_guard::FaultWatch;
use crate::datapath::avail_chains::AvailChains;
use crate::datapath::chain_iov::{collect_chain_iovecs, BadChain, IoVec, IOV_MAX};
use crate::datapath::dirty_log::DirtyLog;
use crate::datapath::flat_mem::FlatMem;
use crate::datapath::ring_error::RingError;
use crate::datapath::tap_io::{is_fatal_tap_error, TapIo};
use crate::datapath::used_ring::{completions_until_event, UsedBatch};
use crate::metrics::PairCounts;

/// Why a TX pass stopped.
#[derive(Debug)]
pub enum TxOutcome {
    /// The ring is empty.
    Idle,
    /// The budget ran out with chains left: come back after serving RX.
    MoreWork,
    /// The tap is full; the chain was put back. Wait for EPOLLOUT.
    Blocked,
    /// The tap failed for good (device gone); the chain was put back.
    TapGone(io::Error),
    /// The avail ring is corrupt (index jumped by more than the queue size) or the used ring
    /// cannot be written.
    RingBroken(RingError),
    /// The frame's guest memory was lost (its fd shrank): the write failed with EFAULT. The
    /// chain was put back.
    MemoryLost,
}

/// A chain popped in the first half of a pass.
struct Popped {
    head: u16,
    /// The ring position it was popped from, to put it (and every chain after it) back.
    before: u16,
    /// Its frame's iovecs in `TxLoop::iovs` and byte count, or why it is refused.
    frame: Result<(Range<usize>, u32), BadChain>,
}

pub struct TxLoop {
    /// The iovecs of every frame of the pass, back to back.
    iovs: Vec<IoVec>,
    popped: Vec<Popped>,
    spans: Vec<Range<usize>>,
    results: Vec<io::Result<usize>>,
    used: UsedBatch,
    budget: usize,
    limits: ChainLimits,
    warned_bad_chain: bool,
    /// Set while the frontend migrates the guest: used-ring writes are logged.
    log: Option<Arc<DirtyLog>>,
    /// Tells a lost guest memory from other EFAULTs.
    faults: Option<FaultWatch>,
}

impl TxLoop {
    pub fn with_log(mut self, log: Option<Arc<DirtyLog>>) -> Self {
        self.log = log;
        self
    }

    /// Sorts EFAULT on writes into lost guest memory and the rest.
    pub fn with_fault_watch(mut self, faults: Option<FaultWatch>) -> Self {
        self.faults = faults;
        self
    }

    pub fn new(budget: usize, queue_size: u16, hdr_len: usize) -> Self {
        TxLoop {
            iovs: Vec::with_capacity(64),
            popped: Vec::with_capacity(budget),
            spans: Vec::with_capacity(budget),
            results: Vec::with_capacity(budget),
            used: UsedBatch::with_capacity(budget),
            budget,
            limits: ChainLimits {
                max_descriptors: queue_size as usize,
                // A GSO frame plus its header; anything longer no tap accepts.
                max_bytes: (MAX_GSO_FRAME + HDR_LEN) as u32,
                min_bytes: hdr_len as u32,
            },
            warned_bad_chain: false,
            log: None,
            faults: None,
        }
    }

    /// Moves up to one budget of frames from the TX ring to the tap and completes them in one
    /// used-ring update. Returns why it stopped and whether the guest wants an interrupt.
    ///
    /// First it pops the chains and checks them, then hands every frame to the tap in one
    /// [`TapIo::write_batch`] (one `io_uring_enter` with `--io-uring`), then completes them in
    /// ring order; a chain the tap did not take is put back with every chain after it.
    pub fn process<T: TapIo>(&mut self, queue: &mut Queue, mem: &FlatMem, tap: &T, counts: &mut PairCounts) -> (TxOutcome, bool) {
        let mut outcome = self.pop_batch(queue, mem);
        self.spans.clear();
        self.spans.extend(self.popped.iter().filter_map(|p| p.frame.as_ref().ok().map(|(span, _)| span.clone())));
        self.results.clear();
        tap.write_batch(&self.iovs, &self.spans, &mut self.results);
        if let Some(stop) = self.complete_batch(queue, counts) {
            outcome = stop;
        }
        self.iovs.clear();
        self.results.clear();
        if !self.used.is_empty() {
            counts.tx_batches += 1;
        }
        let notify = match self.used.publish(queue, mem, self.log.as_deref()) {
            Ok(n) => n,
            Err(e) => {
                outcome = TxOutcome::RingBroken(RingError::PublishUsed(e));
                false
            }
        };
        (outcome, notify)
    }

    /// Pops up to one budget of chains into `popped` (their frames' iovecs into `iovs`).
    fn pop_batch(&mut self, queue: &mut Queue, mem: &FlatMem) -> TxOutcome {
        self.popped.clear();
        self.iovs.clear();
        let mut chains = AvailChains::new(queue, mem);
        for _ in 0..pass_budget(self.budget, completions_until_event(queue, mem)) {
            let before = queue.next_avail();
            let (head, chain) = match chains.pop(queue) {
                Ok(Some(popped)) => popped,
                Ok(None) => return TxOutcome::Idle,
                Err(e) => return TxOutcome::RingBroken(RingError::PopAvail(e)),
            };
            let start = self.iovs.len();
            // SAFETY: the iovecs are used only in this pass, while `mem` is borrowed, and are
            // dropped before it returns.
            let collected = unsafe { collect_chain_iovecs(chain, mem, Direction::DeviceReads, self.limits, IOV_MAX, &mut self.iovs, None) };
            self.popped.push(Popped { head, before, frame: collected.map(|len| (start..self.iovs.len(), len)) });
        }
        TxOutcome::MoreWork
    }

    /// Completes the popped chains in ring order from the tap's results; returns why the pass
    /// stopped early, if it did.
    fn complete_batch(&mut self, queue: &mut Queue, counts: &mut PairCounts) -> Option<TxOutcome> {
        let mut results = self.results.drain(..);
        for p in &self.popped {
            let head = p.head;
            let (span, len) = match &p.frame {
                Ok(frame) => frame.clone(),
                Err(e) => {
                    // Refused, not cut: a writev of the first IOV_MAX segments would send a
                    // truncated frame and count it as sent.
                    if matches!(e, BadChain::TooManySegments { .. }) {
                        counts.tx_too_many_segments += 1;
                    } else {
                        counts.tx_bad_chains += 1;
                    }
                    if !self.warned_bad_chain {
                        warn!("dropping malformed TX chain {head}: {e} (further ones only counted)");
                        self.warned_bad_chain = true;
                    }
                    self.used.push(head, 0);
                    continue;
                }
            };
            let Some(result) = results.next() else {
                // Not tried (a frame before it failed): it goes again on the next pass.
                queue.set_next_avail(p.before);
                return Some(TxOutcome::MoreWork);
            };
            match result {
                Ok(_) => {
                    trace!("tx frame head={head} len={len}");
                    counts.tx_frames += 1;
                    counts.tx_bytes += u64::from(len);
                    self.used.push(head, 0);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    queue.set_next_avail(p.before);
                    counts.tx_eagain += 1;
                    return Some(TxOutcome::Blocked);
                }
                Err(e) if is_fatal_tap_error(&e) => {
                    queue.set_next_avail(p.before);
                    counts.tap_errors += 1;
                    return Some(TxOutcome::TapGone(e));
                }
                // The kernel could not read the frame; if its memory is gone (probing faults
                // in user space and the guard replaces it), the connection is done.
                Err(e) if e.raw_os_error() == Some(libc::EFAULT) && self.faults.is_some_and(|f| f.probe_lost(&self.iovs[span.clone()])) => {
                    queue.set_next_avail(p.before);
                    counts.guest_memory_faults += 1;
                    return Some(TxOutcome::MemoryLost);
                }
                Err(e) => {
                    // EINVAL (bad virtio_net_hdr), EMSGSIZE, EIO...: the frame is refused, not the tap.
                    trace!("tap refused tx frame head={head} len={len}: {e}");
                    counts.tx_dropped += 1;
                    self.used.push(head, 0);
                }
            }
        }
        None
    }
}

/// A pass stops early where the guest wants its interrupt (EVENT_IDX's used_event), when that
/// is at least this many chains away: the interrupt then goes out mid-ring instead of at the end
/// of a full pass. Closer than this, the pass runs its whole budget (a guest that asks for an
/// interrupt on every completion would otherwise get one-frame passes).
const MIN_EARLY_STOP: u16 = 16;

/// The chains one TX pass may pop. A Linux guest asks for its TX interrupt once 3/4 of the
/// frames in flight are sent, so it refills the ring while the last quarter goes out; with
/// the interrupt only at the end of a full pass, the ring would already be empty and the
/// worker would sleep until the guest refilled it.
fn pass_budget(budget: usize, until_event: Option<u16>) -> usize {
    match until_event {
        Some(n) if n >= MIN_EARLY_STOP && usize::from(n) < budget => usize::from(n),
        _ => budget,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const SIZE: u16 = 16;

    fn put(mem: &FlatMem, addr: u64, bytes: &[u8]) {
        mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    /// Posts `n` one-descriptor frames of `len` bytes, frame `i` (`frame(len, i)`) at
    /// `DATA_BASE + i * stride` in table slot `i`.
    fn post_frames(mq: &MockSplitQueue<FlatMem>, mem: &FlatMem, n: u16, len: usize, stride: u64) {
        for i in 0..n {
            let addr = DATA_BASE + u64::from(i) * stride;
            put(mem, addr, &frame(len, i as u8));
            add_chain(mq, i, &[(addr, len as u32, false)]);
        }
    }

    #[test]
    fn test_tx_frames_arrive_byte_for_byte_and_complete_in_one_batch() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        let (f1, f2) = (frame(60, 1), frame(1514, 2));
        put(&mem, DATA_BASE, &f1);
        // Second frame: header in one descriptor, payload split over two more.
        put(&mem, DATA_BASE + 0x1000, &f2[..12]);
        put(&mem, DATA_BASE + 0x2000, &f2[12..700]);
        put(&mem, DATA_BASE + 0x3000, &f2[700..]);
        add_chain(&mq, 0, &[(DATA_BASE, 60, false)]);
        add_chain(&mq, 1, &[(DATA_BASE + 0x1000, 12, false), (DATA_BASE + 0x2000, 688, false), (DATA_BASE + 0x3000, 814, false)]);
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        let mut counts = PairCounts::default();
        let (outcome, notify) = TxLoop::new(64, SIZE, 12).process(&mut q, &mem, &tap, &mut counts);
        assert!(matches!(outcome, TxOutcome::Idle));
        assert!(notify, "no NO_INTERRUPT flag: the guest wants an interrupt");
        assert_eq!(*tap.written.borrow(), vec![f1, f2]);
        assert_eq!(used_entries(&mq, &mem, SIZE), vec![(0, 0), (1, 0)]);
        assert_eq!((counts.tx_frames, counts.tx_bytes, counts.tx_batches), (2, 60 + 1514, 1));
    }

    #[test]
    fn test_tx_eagain_keeps_chain_and_resumes() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        post_frames(&mq, &mem, 3, 100, 0x1000);
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        tap.write_script.borrow_mut().extend([TapStep::Accept, TapStep::Fail(libc::EAGAIN)]);
        let mut tx = TxLoop::new(64, SIZE, 12);
        let mut counts = PairCounts::default();
        let (outcome, _) = tx.process(&mut q, &mem, &tap, &mut counts);
        assert!(matches!(outcome, TxOutcome::Blocked));
        assert_eq!(q.next_avail(), 1, "the refused chain is put back");
        assert_eq!(used_entries(&mq, &mem, SIZE), vec![(0, 0)]);
        let (outcome, _) = tx.process(&mut q, &mem, &tap, &mut counts);
        assert!(matches!(outcome, TxOutcome::Idle));
        let written = tap.written.borrow();
        assert_eq!(written.len(), 3);
        assert_eq!(written[1], frame(100, 1), "order is kept across the EAGAIN");
        assert_eq!(used_entries(&mq, &mem, SIZE).len(), 3);
        assert_eq!((counts.tx_eagain, counts.tx_frames), (1, 3));
    }

    #[test]
    fn test_tx_refused_frame_is_counted_and_returned() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        add_chain(&mq, 0, &[(DATA_BASE, 100, false)]);
        add_chain(&mq, 1, &[(DATA_BASE, 100, false)]);
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        tap.write_script.borrow_mut().push_back(TapStep::Fail(libc::EINVAL));
        let mut counts = PairCounts::default();
        TxLoop::new(64, SIZE, 12).process(&mut q, &mem, &tap, &mut counts);
        assert_eq!((counts.tx_dropped, counts.tx_frames), (1, 1));
        assert_eq!(used_entries(&mq, &mem, SIZE), vec![(0, 0), (1, 0)]);
    }

    #[test]
    fn test_tx_pass_hands_every_frame_to_the_tap_in_one_batch() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        for i in 0..5u16 {
            put(&mem, DATA_BASE + u64::from(i) * 0x1000, &frame(100 + usize::from(i), i as u8));
            add_chain(&mq, i, &[(DATA_BASE + u64::from(i) * 0x1000, 100 + u32::from(i), false)]);
        }
        add_chain(&mq, 5, &[(DATA_BASE, 8, false)]); // shorter than the header: not a frame
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        let mut counts = PairCounts::default();
        TxLoop::new(64, SIZE, 12).process(&mut q, &mem, &tap, &mut counts);
        assert_eq!(*tap.batches.borrow(), vec![5], "one batch of the five frames, not the bad chain");
        assert_eq!(*tap.written.borrow(), (0..5).map(|i| frame(100 + i, i as u8)).collect::<Vec<_>>());
        assert_eq!((counts.tx_frames, counts.tx_bad_chains), (5, 1));
    }

    #[test]
    fn test_tx_linked_batch_puts_back_frames_behind_a_refused_one_in_order() {
        // As with io_uring's linked writes: a refused frame cancels the ones behind it, which
        // go again on the next pass, in order, and a bad chain among them is counted once.
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        // Head 3 takes descriptors 3 and 4; the last chain starts at 5.
        for i in [0u16, 1, 2, 3, 5] {
            put(&mem, DATA_BASE + u64::from(i) * 0x1000, &frame(200, i as u8));
            if i == 3 {
                add_chain(&mq, i, &[(DATA_BASE, 12, false), (DATA_BASE + 0x100, 50, true)]);
            // writable in TX
            } else {
                add_chain(&mq, i, &[(DATA_BASE + u64::from(i) * 0x1000, 200, false)]);
            }
        }
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        tap.linked.set(true);
        tap.write_script.borrow_mut().extend([TapStep::Accept, TapStep::Fail(libc::EINVAL)]);
        let mut tx = TxLoop::new(64, SIZE, 12);
        let mut counts = PairCounts::default();
        let (outcome, _) = tx.process(&mut q, &mem, &tap, &mut counts);
        assert!(matches!(outcome, TxOutcome::MoreWork), "{outcome:?}");
        assert_eq!(q.next_avail(), 2, "chains 2, 3 and 5 were not tried: put back");
        assert_eq!(used_entries(&mq, &mem, SIZE), vec![(0, 0), (1, 0)]);
        assert_eq!((counts.tx_frames, counts.tx_dropped, counts.tx_bad_chains), (1, 1, 0));
        let (outcome, _) = tx.process(&mut q, &mem, &tap, &mut counts);
        assert!(matches!(outcome, TxOutcome::Idle), "{outcome:?}");
        assert_eq!(*tap.written.borrow(), vec![frame(200, 0), frame(200, 2), frame(200, 5)]);
        assert_eq!(used_entries(&mq, &mem, SIZE), vec![(0, 0), (1, 0), (2, 0), (3, 0), (5, 0)]);
        assert_eq!((counts.tx_frames, counts.tx_dropped, counts.tx_bad_chains), (3, 1, 1));
    }

    #[test]
    fn test_tx_bad_chains_are_returned_without_touching_the_tap() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        add_chain(&mq, 0, &[(DATA_BASE, 12, false), (DATA_BASE + 0x100, 50, true)]); // writable in TX
        add_chain(&mq, 2, &[(DATA_BASE, 8, false)]); // shorter than the header
        add_chain(&mq, 3, &[(0xFFFF_FFF0_0000, 100, false)]); // outside guest memory
        add_chain(&mq, 4, &[(DATA_BASE + 0x10_0000 - 10, 100, false)]); // ok: inside
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        let mut counts = PairCounts::default();
        TxLoop::new(64, SIZE, 12).process(&mut q, &mem, &tap, &mut counts);
        assert_eq!(counts.tx_bad_chains, 3);
        assert_eq!(tap.written.borrow().len(), 1);
        assert_eq!(used_entries(&mq, &mem, SIZE), vec![(0, 0), (2, 0), (3, 0), (4, 0)]);
    }

    #[test]
    fn test_tx_loops_and_cut_chains_are_bad_not_shorter() {
        use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        let next = VRING_DESC_F_NEXT as u16;
        // A descriptor chained to itself: virtio-queue's walk ends after SIZE steps (its TTL),
        // which without the check would be a 16 x 100-byte frame of the same bytes.
        mq.add_desc_chains(&[RawDescriptor::from(SplitDescriptor::new(DATA_BASE, 100, next, 0))], 0).unwrap();
        // `next` past the table: the walk stops after the first descriptor.
        mq.add_desc_chains(&[RawDescriptor::from(SplitDescriptor::new(DATA_BASE, 100, next, 999))], 1).unwrap();
        add_chain(&mq, 2, &[(DATA_BASE, 60, false)]);
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        let mut counts = PairCounts::default();
        TxLoop::new(64, SIZE, 12).process(&mut q, &mem, &tap, &mut counts);
        assert_eq!(counts.tx_bad_chains, 2);
        assert_eq!(*tap.written.borrow(), vec![mem_bytes(&mem, DATA_BASE, 60)]);
        assert_eq!(used_entries(&mq, &mem, SIZE), vec![(0, 0), (1, 0), (2, 0)]);
    }

    fn mem_bytes(mem: &FlatMem, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn test_tx_budget_limits_a_batch() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        for i in 0..5u16 {
            add_chain(&mq, i, &[(DATA_BASE, 60, false)]);
        }
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        let mut counts = PairCounts::default();
        let mut tx = TxLoop::new(3, SIZE, 12);
        assert!(matches!(tx.process(&mut q, &mem, &tap, &mut counts).0, TxOutcome::MoreWork));
        assert_eq!(used_entries(&mq, &mem, SIZE).len(), 3);
        assert!(matches!(tx.process(&mut q, &mem, &tap, &mut counts).0, TxOutcome::Idle));
        assert_eq!((counts.tx_frames, counts.tx_batches), (5, 2));
    }

    #[test]
    fn test_tx_tap_gone_puts_chain_back() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        add_chain(&mq, 0, &[(DATA_BASE, 60, false)]);
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        tap.write_script.borrow_mut().push_back(TapStep::Fail(libc::EBADFD));
        let mut counts = PairCounts::default();
        let (outcome, _) = TxLoop::new(64, SIZE, 12).process(&mut q, &mem, &tap, &mut counts);
        assert!(matches!(outcome, TxOutcome::TapGone(_)));
        assert_eq!(q.next_avail(), 0);
        assert!(used_entries(&mq, &mem, SIZE).is_empty());
    }

    #[test]
    fn test_tx_bad_chains_use_the_budget() {
        const BIG: u16 = 128;
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, BIG);
        for i in 0..100u16 {
            add_chain(&mq, i, &[(DATA_BASE, 8, false)]); // shorter than the header
        }
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        let mut counts = PairCounts::default();
        let mut tx = TxLoop::new(64, BIG, 12);
        let (outcome, notify) = tx.process(&mut q, &mem, &tap, &mut counts);
        assert!(matches!(outcome, TxOutcome::MoreWork), "{outcome:?}");
        assert!(notify);
        assert_eq!((q.next_avail(), used_entries(&mq, &mem, BIG).len()), (64, 64));
        assert!(matches!(tx.process(&mut q, &mem, &tap, &mut counts).0, TxOutcome::Idle));
        assert_eq!((counts.tx_bad_chains, counts.tx_batches), (100, 2));
    }

    #[test]
    fn test_tx_chain_over_iov_max_is_refused_not_cut() {
        const BIG: u16 = 4096;
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, BIG);
        let f = frame(IOV_MAX * 4 + 4, 5);
        put(&mem, DATA_BASE, &f);
        // The same frame in IOV_MAX + 1 and in IOV_MAX four-byte descriptors.
        let over: Vec<_> = (0..=IOV_MAX as u64).map(|i| (DATA_BASE + 4 * i, 4, false)).collect();
        let at: Vec<_> = (0..IOV_MAX as u64).map(|i| (DATA_BASE + 4 * i, 4, false)).collect();
        add_chain(&mq, 0, &over);
        add_chain(&mq, 1100, &at);
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        let mut counts = PairCounts::default();
        TxLoop::new(64, BIG, 12).process(&mut q, &mem, &tap, &mut counts);
        assert_eq!((counts.tx_too_many_segments, counts.tx_bad_chains), (1, 0));
        assert_eq!((counts.tx_frames, counts.tx_bytes), (1, IOV_MAX as u64 * 4));
        assert_eq!(*tap.written.borrow(), vec![f[..IOV_MAX * 4].to_vec()], "only the chain one writev takes is sent");
        assert_eq!(used_entries(&mq, &mem, BIG), vec![(0, 0), (1100, 0)]);
    }

    #[test]
    fn test_tx_pass_budget_stops_at_the_guests_event_unless_it_is_too_close() {
        assert_eq!(pass_budget(128, None), 128);
        assert_eq!(pass_budget(128, Some(1)), 128, "an interrupt per completion: keep batching");
        assert_eq!(pass_budget(128, Some(MIN_EARLY_STOP - 1)), 128);
        assert_eq!(pass_budget(128, Some(MIN_EARLY_STOP)), usize::from(MIN_EARLY_STOP));
        assert_eq!(pass_budget(128, Some(64)), 64);
        assert_eq!(pass_budget(128, Some(200)), 128);
    }

    #[test]
    fn test_tx_pass_ends_where_the_guest_wants_its_interrupt() {
        const RING: u16 = 64;
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, RING);
        post_frames(&mq, &mem, 60, 60, 0x100);
        let mut q = queue(&mq, true);
        // Like Linux's virtqueue_enable_cb_delayed: interrupt once 3/4 of the 60 are sent.
        let used_event_addr = GuestAddress(mq.avail_addr().0 + 4 + 2 * u64::from(RING));
        mem.write_obj(44u16.to_le(), used_event_addr).unwrap();
        let tap = MockTap::default();
        let mut counts = PairCounts::default();
        let mut tx = TxLoop::new(128, RING, 12);
        let (outcome, notify) = tx.process(&mut q, &mem, &tap, &mut counts);
        assert!(matches!(outcome, TxOutcome::MoreWork));
        assert!(notify, "the 45th completion is the one the guest asked to hear about");
        assert_eq!((q.next_used(), used_entries(&mq, &mem, RING).len()), (45, 45));
        let (outcome, notify) = tx.process(&mut q, &mem, &tap, &mut counts);
        assert!(matches!(outcome, TxOutcome::Idle));
        assert!(!notify, "the guest's event is behind: no second interrupt");
        assert_eq!((counts.tx_frames, counts.tx_batches), (60, 2));
        let written = tap.written.borrow();
        assert_eq!(written.len(), 60);
        assert!(written.iter().enumerate().all(|(i, f)| *f == frame(60, i as u8)), "every frame, in order");
    }
}
