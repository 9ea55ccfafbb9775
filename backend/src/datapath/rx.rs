//! The RX batch loop: `readv` from the tap straight into guest buffers.
//!
//! Chains are popped ahead and held (with their iovecs) until a frame needs them, so one read
//! can spread a 64 KiB GSO frame over many mergeable buffers, and chains a small frame did not
//! need stay for the next one instead of being popped and pushed back each time.
//!
//! A driver controls what it posts, so the work of one pass is bounded whatever it posts: at
//! most a budget of frames and of popped chains, never more held chains than the queue has
//! descriptors (a head posted again while held is refused), and no chain of more segments than
//! one `readv` takes. A pass that runs out of budget ends with its used entries published and
//! reports [`RxOutcome::MoreWork`], so the worker comes back after looking at its other fds.

use std::io;
use std::ops::Range;
use std::sync::Arc;

use log::{trace, warn};
use virtio_queue::{Queue, QueueT};
use vutap_virtio::hdr::{num_buffers_bytes, NUM_BUFFERS_OFFSET};
use vutap_virtio::mergeable::{chains_needed, used_len};
use vutap_virtio::{ChainLimits, Features};

use crate::control::memory_guard::FaultWatch;
use crate::datapath::avail_chains::AvailChains;
use crate::datapath::chain_iov::{BadChain, IoVec, IOV_MAX};
use crate::datapath::dirty_log::DirtyLog;
use crate::datapath::flat_mem::FlatMem;
use crate::datapath::held_chains::{HeldChains, HoldError};
use crate::datapath::read_window::ReadWindow;
use crate::datapath::ring_error::RingError;
use crate::datapath::tap_io::is_fatal_tap_error;
use crate::datapath::tap_io::TapIo;
use crate::datapath::used_ring::UsedBatch;
use crate::metrics::PairCounts;

#[derive(Debug)]
pub enum RxOutcome {
    /// The tap has nothing more to read.
    Idle,
    /// The budget (frames or popped chains) ran out: come back after serving TX.
    MoreWork,
    /// Not enough guest buffers for the largest possible frame: wait for an RX kick.
    NoBuffers,
    TapGone(io::Error),
    RingBroken(RingError),
    /// The guest buffers' memory was lost (its fd shrank): the read failed with EFAULT.
    MemoryLost,
}

/// Segments one held chain may have: a read takes at most IOV_MAX iovecs, and the spill tail
/// needs the last one.
const MAX_RX_SEGMENTS: usize = IOV_MAX - 1;

/// Chains one pass may pop, per frame of its budget: room for a 64 KiB GSO frame in 4 KiB
/// buffers (17 chains) every few frames, while a driver posting only bad chains gets the worker
/// back to its epoll after a few hundred.
const CHAINS_PER_FRAME: usize = 4;

/// Reads one batch may take at most (each holds a spill tail of its own, `tap::MAX_READ` bytes).
const MAX_BATCH_READS: usize = 32;

/// Fewer reads than this in a batch: read frame by frame.
const MIN_BATCH_READS: usize = 2;

/// Why [`RxLoop::fill`] stopped.
enum Fill {
    /// Enough buffers are held for the largest frame.
    Room,
    /// The ring has no more chains.
    NoBuffers,
    /// This pass popped its budget of chains.
    BudgetSpent,
}

/// Chains one pass may pop: `CHAINS_PER_FRAME` per frame of the budget, but at most 3/4 of the
/// ring, so the pass ends (used update, interrupt) while the guest still has buffers posted and
/// refills behind it. A pass that runs the ring dry first costs the guest a kick as well as the
/// interrupt (jumbo frames over page-sized buffers: 128 frames take 384 chains).
fn chain_budget(budget: usize, queue_size: u16) -> usize {
    (budget * CHAINS_PER_FRAME).min(usize::from(queue_size) * 3 / 4).max(1)
}

/// The tap answered end of file: the device behind the fd is gone.
fn tap_closed(counts: &mut PairCounts) -> RxOutcome {
    counts.tap_errors += 1;
    RxOutcome::TapGone(io::Error::new(io::ErrorKind::UnexpectedEof, "tap returned end of file"))
}

/// Sorts a failed read into an outcome that stops the pass, or a dropped frame (`None`).
fn read_failed(e: io::Error, faults: Option<FaultWatch>, iovs: &[IoVec], counts: &mut PairCounts) -> Option<RxOutcome> {
    if e.kind() == io::ErrorKind::WouldBlock {
        return Some(RxOutcome::Idle);
    }
    if is_fatal_tap_error(&e) {
        counts.tap_errors += 1;
        return Some(RxOutcome::TapGone(e));
    }
    // The kernel could not write the buffers; if their memory is gone (probing faults in user
    // space and the guard replaces it), the connection is done.
    if e.raw_os_error() == Some(libc::EFAULT) && faults.is_some_and(|f| f.probe_lost(iovs)) {
        counts.guest_memory_faults += 1;
        return Some(RxOutcome::MemoryLost);
    }
    // EFAULT: a macvtap frame larger than the buffers; the frame is lost, not the tap.
    trace!("rx read failed: {e}");
    counts.rx_dropped += 1;
    None
}

/// A read's error as an owned one (a batch's results are borrowed).
fn owned(e: &io::Error) -> io::Error {
    e.raw_os_error().map_or_else(|| io::Error::new(e.kind(), e.to_string()), io::Error::from_raw_os_error)
}

pub struct RxLoop {
    /// Chains popped ahead, not yet filled.
    held: HeldChains,
    log: Option<Arc<DirtyLog>>,
    used: UsedBatch,
    budget: usize,
    chain_budget: usize,
    limits: ChainLimits,
    hdr_len: usize,
    mergeable: bool,
    max_frame: usize,
    /// Catches the part of a frame that does not fit the held buffers. The tap copies what
    /// fits and reports only that, so without a tail behind the guest's buffers an oversized
    /// frame (the tap's MTU raised after vutap sized its window) arrived cut short and
    /// looked whole. With it, `n > capacity` says the frame did not fit. Never resized, so an
    /// iovec over it stays valid as long as the loop.
    spill: Vec<u8>,
    /// The held window plus the spill tail, rebuilt for every read (every batch of reads).
    read_iovs: Vec<IoVec>,
    /// Batched reads (a tap that reads in batches): one spill tail per read, each never resized.
    batch_spills: Vec<Vec<u8>>,
    /// Each read's chain in a batch: its iovecs among the held chains' and its capacity.
    batch_windows: Vec<(Range<usize>, usize)>,
    /// Each read's iovecs in `read_iovs` (its chain's, then its spill tail).
    batch_spans: Vec<Range<usize>>,
    /// Each read's result.
    batch_results: Vec<io::Result<usize>>,
    /// Frames of a batch that did not land in their place, copied aside before the chains are
    /// refilled in order.
    moved: Vec<Vec<u8>>,
    /// Reads the next batch tries: doubles while every read gets a frame, and after a read finds
    /// the tap empty follows the frames that were there, so an idle tap costs few empty reads.
    batch_reads: usize,
    /// How much of the held buffers a read covers (mergeable buffers).
    window: ReadWindow,
    warned_spill: bool,
    /// False once a bad chain was completed out of order, so rewinding next_avail over the held
    /// chains would hand the guest a completed chain twice.
    rewind_ok: bool,
    warned_bad_chain: bool,
    /// Tells a lost guest memory from other EFAULTs.
    faults: Option<FaultWatch>,
    warned_reused_head: bool,
    /// Publish a pass's first frame as soon as it is delivered (the rest at the pass's end, with
    /// the one interrupt): a polling worker's guest is waiting for that frame, and the pass's
    /// next read, which usually finds the tap empty, would hold it back by a system call.
    publish_first_frame: bool,
}

impl RxLoop {
    /// A loop for a queue of `queue_size` whose buffers are in `mem`.
    pub fn new(budget: usize, queue_size: u16, features: Features, mtu: u16, mem: &FlatMem) -> Self {
        let hdr_len = features.hdr_len();
        RxLoop {
            held: HeldChains::new(queue_size, mem),
            log: None,
            used: UsedBatch::with_capacity(budget * 4),
            budget,
            chain_budget: chain_budget(budget, queue_size),
            limits: ChainLimits { max_descriptors: queue_size as usize, max_bytes: u32::MAX, min_bytes: hdr_len as u32 },
            hdr_len,
            mergeable: features.mrg_rxbuf(),
            max_frame: features.max_rx_frame(mtu),
            spill: vec![0u8; crate::tap::MAX_READ],
            read_iovs: Vec::with_capacity(64),
            batch_spills: Vec::new(),
            batch_windows: Vec::with_capacity(MAX_BATCH_READS),
            batch_spans: Vec::with_capacity(MAX_BATCH_READS),
            batch_results: Vec::with_capacity(MAX_BATCH_READS),
            moved: Vec::new(),
            batch_reads: MIN_BATCH_READS,
            window: ReadWindow::default(),
            warned_spill: false,
            rewind_ok: true,
            warned_bad_chain: false,
            faults: None,
            warned_reused_head: false,
            publish_first_frame: false,
        }
    }

    /// Publishes each pass's first frame at once (see [`RxLoop::publish_first_frame`]'s field):
    /// at most two used-ring updates per pass, still at most one interrupt.
    pub fn publishing_first_frame(mut self, early: bool) -> Self {
        self.publish_first_frame = early;
        self
    }

    /// Sorts EFAULT on reads into lost guest memory and the rest.
    pub fn with_fault_watch(mut self, faults: Option<FaultWatch>) -> Self {
        self.faults = faults;
        self
    }

    /// Logs RX writes in `log` (live migration) from now on.
    pub fn with_log(mut self, log: Option<Arc<DirtyLog>>) -> Self {
        self.log = log;
        self
    }

    /// Whether enough buffers are held for the largest frame (one chain without MRG_RXBUF).
    pub fn has_room(&self) -> bool {
        if self.mergeable {
            self.held.capacity() >= self.max_frame
        } else {
            !self.held.is_empty()
        }
    }

    /// Pops chains until there is room for one frame and `want_chains` chains are held, at most
    /// `chains_left` of them; room for one frame is enough once the ring or the budget runs out.
    /// Err on a broken ring.
    fn fill(
        &mut self,
        queue: &mut Queue,
        chains: &mut AvailChains<'_>,
        counts: &mut PairCounts,
        chains_left: &mut usize,
        want_chains: usize,
    ) -> Result<Fill, RingError> {
        while !self.has_room() || self.held.len() < want_chains {
            if *chains_left == 0 {
                return Ok(if self.has_room() { Fill::Room } else { Fill::BudgetSpent });
            }
            let Some((head, chain)) = chains.pop(queue).map_err(RingError::PopAvail)? else {
                return Ok(if self.has_room() { Fill::Room } else { Fill::NoBuffers });
            };
            *chains_left -= 1;
            match self.held.hold(head, chain, self.limits, MAX_RX_SEGMENTS) {
                Ok(()) => {}
                Err(HoldError::AlreadyHeld(_)) => {
                    counts.rx_bad_chains += 1;
                    if !self.warned_reused_head {
                        warn!("RX chain {head} was posted again while vutap still holds it: returned empty (further ones only counted)");
                        self.warned_reused_head = true;
                    }
                    self.complete_refused(head);
                }
                Err(HoldError::BadChain(e)) => {
                    if matches!(e, BadChain::TooManySegments { .. }) {
                        counts.rx_too_many_segments += 1;
                    } else {
                        counts.rx_bad_chains += 1;
                    }
                    if !self.warned_bad_chain {
                        warn!("returning malformed RX chain {head}: {e} (further ones only counted)");
                        self.warned_bad_chain = true;
                    }
                    self.complete_refused(head);
                }
            }
        }
        Ok(Fill::Room)
    }

    /// Returns a refused chain with length 0. Completed ahead of held chains, it makes the
    /// rewind over them on stop unsafe.
    fn complete_refused(&mut self, head: u16) {
        if !self.held.is_empty() {
            self.rewind_ok = false;
        }
        self.used.push(head, 0);
    }

    /// The iovecs one read may fill, and their capacity: the held chains that together can take
    /// the largest frame, as far as one read's iovecs reach (chains past that stay for the next).
    fn read_window(&self) -> (usize, usize) {
        if !self.mergeable {
            return self.held.front().map_or((0, 0), |c| (c.iov_count, c.capacity));
        }
        self.held.window(self.window.bytes(self.max_frame), MAX_RX_SEGMENTS)
    }

    /// Completes the first chains for a frame of `n` bytes whose first `read_capacity` bytes
    /// are in them already and the rest in `overflow` (the spill tail, or the whole frame if it
    /// was moved aside). Returns false if it cannot be delivered (it was truncated), leaving the
    /// chains held for the next frame.
    fn deliver(&mut self, n: usize, read_capacity: usize, overflow: &[u8], counts: &mut PairCounts) -> bool {
        self.window.observe(n);
        if n > read_capacity {
            // It ran into the spill tail (or was moved aside). No bigger than the buffers held
            // for one frame: the rest goes from `overflow` into the chains behind the window.
            let spilled = n - read_capacity;
            let room = if self.mergeable { self.held.capacity() } else { self.held.front().map_or(0, |c| c.capacity) };
            if !(n <= room && spilled <= overflow.len()) {
                self.frame_did_not_fit(n, read_capacity);
                return false;
            }
            if !self.held.write_across(read_capacity, &overflow[..spilled]) {
                return false;
            }
            counts.rx_window_copies += 1;
        }
        if n < self.hdr_len {
            return false;
        }
        let (chains, last_len) = if self.mergeable {
            match chains_needed(n, self.held.capacities()) {
                Some(layout) => layout,
                None => return false,
            }
        } else {
            match self.held.front() {
                Some(c) if n <= c.capacity => (1, n),
                _ => return false,
            }
        };
        // The tap leaves num_buffers untouched, so the device writes it.
        if self.hdr_len == vutap_virtio::features::HDR_LEN
            && !self.held.write_to_front(NUM_BUFFERS_OFFSET, &num_buffers_bytes(chains as u16))
        {
            return false;
        }
        for i in 0..chains {
            let Some(chain) = self.held.release_front(self.log.as_deref()) else { break };
            self.used.push(chain.head, used_len(i, chains, last_len, chain.capacity) as u32);
        }
        counts.rx_frames += 1;
        counts.rx_bytes += n as u64;
        true
    }

    /// A frame of `n` bytes met `capacity` bytes of buffers. With mergeable buffers the window
    /// grows so the next such frame fits (the tap's MTU went up); without, the guest's buffers
    /// are simply too small for it, as with any NIC.
    fn frame_did_not_fit(&mut self, n: usize, capacity: usize) {
        let grow = self.mergeable && n > self.max_frame;
        if !self.warned_spill {
            let then = if grow { format!("; holding buffers for {n} bytes per frame from now on") } else { String::new() };
            warn!("a {n}-byte frame did not fit the {capacity} bytes of guest buffers for one frame (tap MTU above the guest's?): dropped{then} (further ones only counted)");
            self.warned_spill = true;
        }
        if grow {
            self.max_frame = n;
        }
    }

    /// Moves up to one budget of frames from the tap to the guest and completes them in one
    /// used-ring update. Returns why it stopped and whether the guest wants an interrupt.
    pub fn process<T: TapIo>(&mut self, queue: &mut Queue, mem: &FlatMem, tap: &T, counts: &mut PairCounts) -> (RxOutcome, bool) {
        let batch_capacity = tap.read_batch_capacity().min(MAX_BATCH_READS);
        let mut outcome = RxOutcome::MoreWork;
        let mut chains_left = self.chain_budget;
        let mut chains = AvailChains::new(queue, mem);
        let mut reads = 0;
        // Whether the first frame went out ahead of the rest (and its interrupt is due).
        let (mut published_early, mut notify) = (false, false);
        while reads < self.budget {
            let batch = if batch_capacity >= MIN_BATCH_READS { self.batch_reads.min(batch_capacity).min(self.budget - reads) } else { 0 };
            match self.fill(queue, &mut chains, counts, &mut chains_left, batch) {
                Ok(Fill::Room) => {}
                Ok(Fill::NoBuffers) => {
                    counts.rx_no_buffers += 1;
                    outcome = RxOutcome::NoBuffers;
                    break;
                }
                Ok(Fill::BudgetSpent) => break,
                Err(e) => {
                    outcome = RxOutcome::RingBroken(e);
                    break;
                }
            }
            let stop = if batch >= MIN_BATCH_READS && self.plan_batch(batch) {
                tap.read_batch(&self.read_iovs, &self.batch_spans, &mut self.batch_results);
                reads += self.batch_results.len().max(1);
                self.settle_batch(queue, &mut chains, counts, &mut chains_left)
            } else {
                reads += 1;
                self.read_one(tap, counts)
            };
            if let Some(stop) = stop {
                outcome = stop;
                break;
            }
            if reads == 1 && self.publish_first_frame && !self.used.is_empty() {
                match self.used.publish(queue, mem, self.log.as_deref()) {
                    Ok(n) => (published_early, notify) = (true, n),
                    Err(e) => return (RxOutcome::RingBroken(RingError::PublishUsed(e)), false),
                }
            }
        }
        if published_early || !self.used.is_empty() {
            counts.rx_batches += 1;
        }
        match self.used.publish(queue, mem, self.log.as_deref()) {
            Ok(n) => notify |= n,
            Err(e) => {
                outcome = RxOutcome::RingBroken(RingError::PublishUsed(e));
                notify = false;
            }
        }
        (outcome, notify)
    }

    /// Reads one frame into the read window. Returns why the pass stops, if it does.
    fn read_one<T: TapIo>(&mut self, tap: &T, counts: &mut PairCounts) -> Option<RxOutcome> {
        let (iov_count, read_capacity) = self.read_window();
        self.read_iovs.clear();
        self.read_iovs.extend_from_slice(&self.held.iovs()[..iov_count]);
        // SAFETY: `spill` belongs to this loop and is never resized, so its heap buffer is
        // valid for reads and writes of its length as long as the loop; only the kernel
        // (this read) and the fault probe touch it.
        self.read_iovs.push(unsafe { IoVec::from_raw_parts(self.spill.as_mut_ptr(), self.spill.len()) });
        match tap.read_frame(&self.read_iovs) {
            Ok(0) => Some(tap_closed(counts)),
            Ok(n) => {
                trace!("rx frame len={n}");
                // Taken out for the call and put back: the buffer itself does not move.
                let spill = std::mem::take(&mut self.spill);
                if !self.deliver(n, read_capacity, &spill, counts) {
                    counts.rx_dropped += 1;
                }
                self.spill = spill;
                None
            }
            Err(e) => read_failed(e, self.faults, &self.read_iovs, counts),
        }
    }

    /// Lays out a batch of up to `reads` reads, one per leading held chain that alone can take
    /// the read window, each with a spill tail of its own. False if fewer than two chains can.
    fn plan_batch(&mut self, reads: usize) -> bool {
        let window = if self.mergeable { self.window.bytes(self.max_frame) } else { 0 };
        self.held.single_chain_windows(window, reads, &mut self.batch_windows);
        if self.batch_windows.len() < MIN_BATCH_READS {
            return false;
        }
        while self.batch_spills.len() < self.batch_windows.len() {
            self.batch_spills.push(vec![0u8; crate::tap::MAX_READ]);
        }
        self.read_iovs.clear();
        self.batch_spans.clear();
        self.batch_results.clear();
        let held = self.held.iovs();
        for ((chain_iovs, _), spill) in self.batch_windows.iter().zip(&mut self.batch_spills) {
            let start = self.read_iovs.len();
            self.read_iovs.extend_from_slice(&held[chain_iovs.clone()]);
            // SAFETY: each spill tail belongs to this loop and is never resized (the outer Vec
            // only grows, which moves no inner buffer), so it is valid for reads and writes of its
            // length as long as the loop; only the kernel (this batch) and this loop touch it.
            self.read_iovs.push(unsafe { IoVec::from_raw_parts(spill.as_mut_ptr(), spill.len()) });
            self.batch_spans.push(start..self.read_iovs.len());
        }
        true
    }

    /// Delivers the frames of a batch in order. Frames that landed in their chain are completed
    /// in place while every earlier read did too; from the first that did not (it ran into its
    /// spill tail, or a read before it got no frame or one that was dropped) the remaining frames
    /// are copied aside and laid out again over the front chains, as frame-by-frame reads would
    /// have. Returns why the pass stops, if it does.
    fn settle_batch(
        &mut self,
        queue: &mut Queue,
        chains: &mut AvailChains<'_>,
        counts: &mut PairCounts,
        chains_left: &mut usize,
    ) -> Option<RxOutcome> {
        let results = std::mem::take(&mut self.batch_results);
        let got = results.iter().filter(|r| matches!(r, Ok(n) if *n > 0)).count();
        self.batch_reads = if got == results.len() { (got * 2).min(MAX_BATCH_READS) } else { (got + 1).max(MIN_BATCH_READS) };
        let mut in_place = 0;
        while let Some(&Ok(n)) = results.get(in_place) {
            let capacity = self.batch_windows[in_place].1;
            if n == 0 || n > capacity {
                break;
            }
            trace!("rx frame len={n}");
            in_place += 1;
            // The chain this frame is in is the front one: each frame before it used exactly one.
            if !self.deliver(n, capacity, &[], counts) {
                counts.rx_dropped += 1;
                break;
            }
        }
        let mut stop = None;
        if in_place < results.len() {
            stop = self.settle_rest(&results[in_place..], in_place, queue, chains, counts, chains_left);
        }
        self.batch_results = results;
        stop
    }

    /// The reads of a batch from `first` on, whose frames are not where frame-by-frame reads
    /// would have put them.
    fn settle_rest(
        &mut self,
        results: &[io::Result<usize>],
        first: usize,
        queue: &mut Queue,
        chains: &mut AvailChains<'_>,
        counts: &mut PairCounts,
        chains_left: &mut usize,
    ) -> Option<RxOutcome> {
        // Every frame is copied out before any chain is written: a frame laid out again may
        // take the chains later frames arrived in.
        let mut moved = std::mem::take(&mut self.moved);
        if moved.len() < results.len() {
            moved.resize_with(results.len(), Vec::new);
        }
        for (i, result) in results.iter().enumerate() {
            if let Ok(n) = *result {
                let span = &self.batch_spans[first + i];
                IoVec::copy_out(&self.read_iovs[span.clone()], n, &mut moved[i]);
            }
        }
        let mut stop = None;
        let mut idle = false;
        for (i, result) in results.iter().enumerate() {
            match result {
                Ok(0) => stop = Some(tap_closed(counts)),
                Ok(_) => {
                    let frame = &moved[i];
                    trace!("rx frame len={} (laid out again)", frame.len());
                    // Room for one frame, as before each frame-by-frame read.
                    if let Err(e) = self.fill(queue, chains, counts, chains_left, 0) {
                        stop = Some(RxOutcome::RingBroken(e));
                    } else if !self.deliver(frame.len(), 0, frame, counts) {
                        counts.rx_dropped += 1;
                    }
                }
                Err(e) => {
                    let span = &self.batch_spans[first + i];
                    match read_failed(owned(e), self.faults, &self.read_iovs[span.clone()], counts) {
                        Some(RxOutcome::Idle) => idle = true,
                        Some(other) => stop = Some(other),
                        None => {}
                    }
                }
            }
            if stop.is_some() {
                // The frames read after this one cannot be delivered any more: lost, and counted.
                counts.rx_dropped += results[i..].iter().filter(|r| matches!(r, Ok(n) if *n > 0)).count() as u64;
                break;
            }
        }
        self.moved = moved;
        stop.or(idle.then_some(RxOutcome::Idle))
    }

    /// Gives the held (popped, unused) chains back before the ring stops: the ring's next_avail
    /// moves back over them so the next start (or the next backend) offers them again. If that
    /// is unsafe (a bad chain completed out of order), they are completed empty instead.
    pub fn return_held(&mut self, queue: &mut Queue, mem: &FlatMem) -> bool {
        let mut notify = false;
        // Held heads are distinct and below the queue size, so their count fits a u16.
        let n = self.held.len() as u16;
        let heads = self.held.take_back();
        if self.rewind_ok {
            drop(heads);
            queue.set_next_avail(queue.next_avail().wrapping_sub(n));
        } else {
            for head in heads {
                self.used.push(head, 0);
            }
        }
        if !self.used.is_empty() {
            notify = self.used.publish(queue, mem, self.log.as_deref()).unwrap_or(false);
        }
        notify
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::*;
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_net::{VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_MRG_RXBUF};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vutap_virtio::features::{bit, offered_features};

    const SIZE: u16 = 64;

    fn features(mergeable: bool, gso: bool) -> Features {
        let mut f = bit(VIRTIO_F_VERSION_1);
        if mergeable {
            f |= bit(VIRTIO_NET_F_MRG_RXBUF);
        }
        if gso {
            f |= bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4);
        }
        Features::negotiate(offered_features(), f).unwrap()
    }

    fn read(mem: &FlatMem, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Posts `n` single-descriptor RX buffers of `len` bytes, 0x1000 apart... or 0x10000 for big ones.
    fn post(mq: &MockSplitQueue<FlatMem>, first_slot: u16, n: u16, len: u32) -> Vec<u64> {
        let stride = u64::from(len).next_multiple_of(0x1000);
        (0..n)
            .map(|i| {
                let addr = DATA_BASE + u64::from(first_slot + i) * stride;
                add_chain(mq, first_slot + i, &[(addr, len, true)]);
                addr
            })
            .collect()
    }

    #[test]
    fn test_rx_mergeable_frame_spans_buffers_with_num_buffers() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        let addrs = post(&mq, 0, 4, 1000);
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        let f = frame(2500, 7);
        tap.read_script.borrow_mut().push_back(TapStep::Frame(f.clone()));
        let mut counts = PairCounts::default();
        // MTU 3000 without GSO: the largest frame is 3030 bytes, so reads span four buffers.
        let mut rx = RxLoop::new(64, SIZE, features(true, false), 3000, &mem);
        let (outcome, notify) = rx.process(&mut q, &mem, &tap, &mut counts);
        // One 1000-byte buffer is left: too little for the next largest frame.
        assert!(matches!(outcome, RxOutcome::NoBuffers));
        assert!(notify);
        assert_eq!(used_entries(&mq, &mem, SIZE), vec![(0, 1000), (1, 1000), (2, 500)]);
        let mut got = read(&mem, addrs[0], 1000);
        got.extend(read(&mem, addrs[1], 1000));
        got.extend(read(&mem, addrs[2], 500));
        assert_eq!(&got[12..], &f[12..], "payload arrives byte for byte");
        assert_eq!(&got[10..12], &[3, 0], "num_buffers says 3");
        assert_eq!((counts.rx_frames, counts.rx_bytes), (1, 2500));
    }

    #[test]
    fn test_rx_small_frames_leave_unused_chains_held_then_returned() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        post(&mq, 0, 4, 1000);
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        tap.read_script.borrow_mut().extend([TapStep::Frame(frame(60, 1)), TapStep::Frame(frame(80, 2))]);
        let mut counts = PairCounts::default();
        let mut rx = RxLoop::new(64, SIZE, features(true, false), 1500, &mem);
        rx.process(&mut q, &mem, &tap, &mut counts);
        assert_eq!(used_entries(&mq, &mem, SIZE), vec![(0, 60), (1, 80)]);
        assert_eq!(q.next_avail(), 4, "chains were popped ahead");
        rx.return_held(&mut q, &mem);
        assert_eq!(q.next_avail(), 2, "unused chains go back to the ring");
    }

    #[test]
    fn test_rx_non_mergeable_uses_one_chain_per_frame() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        let addrs = post(&mq, 0, 2, 65562);
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        let big = frame(65000, 3);
        tap.read_script.borrow_mut().extend([TapStep::Frame(big.clone()), TapStep::Frame(frame(1514, 4))]);
        let mut counts = PairCounts::default();
        let mut rx = RxLoop::new(64, SIZE, features(false, true), 1500, &mem);
        rx.process(&mut q, &mem, &tap, &mut counts);
        assert_eq!(used_entries(&mq, &mem, SIZE), vec![(0, 65000), (1, 1514)]);
        let got = read(&mem, addrs[0], 65000);
        assert_eq!(&got[12..], &big[12..]);
        assert_eq!(&got[10..12], &[1, 0], "num_buffers is 1 without MRG_RXBUF");
    }

    #[test]
    fn test_rx_without_buffers_waits() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        post(&mq, 0, 1, 1000); // 1000 < 1530 bytes needed for the largest frame
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        tap.read_script.borrow_mut().push_back(TapStep::Frame(frame(60, 1)));
        let mut counts = PairCounts::default();
        let mut rx = RxLoop::new(64, SIZE, features(true, false), 1500, &mem);
        let (outcome, notify) = rx.process(&mut q, &mem, &tap, &mut counts);
        assert!(matches!(outcome, RxOutcome::NoBuffers));
        assert!(!notify);
        assert_eq!(tap.read_script.borrow().len(), 1, "nothing was read from the tap");
        assert_eq!(counts.rx_no_buffers, 1);
    }

    #[test]
    fn test_rx_truncated_frame_is_dropped_and_buffers_kept() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        post(&mq, 0, 2, 1600);
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        tap.read_script.borrow_mut().extend([TapStep::Frame(frame(5000, 1)), TapStep::Frame(frame(100, 2))]);
        let mut counts = PairCounts::default();
        let mut rx = RxLoop::new(64, SIZE, features(false, false), 1500, &mem);
        rx.process(&mut q, &mem, &tap, &mut counts);
        assert_eq!(counts.rx_dropped, 1);
        assert_eq!(used_entries(&mq, &mem, SIZE), vec![(0, 100)], "the next frame reuses the buffer");
    }

    #[test]
    fn test_rx_mergeable_frame_above_mtu_is_dropped_then_window_grows() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        let addrs = post(&mq, 0, 8, 2048);
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        // The tap's MTU was raised to 9000 after vutap sized its window for MTU 1500.
        let big = frame(5000, 3);
        tap.read_script.borrow_mut().extend([TapStep::Frame(big.clone()), TapStep::Frame(big.clone())]);
        let mut counts = PairCounts::default();
        let mut rx = RxLoop::new(64, SIZE, features(true, false), 1500, &mem);
        rx.process(&mut q, &mem, &tap, &mut counts);
        assert_eq!(counts.rx_dropped, 1, "the first one did not fit and is not delivered cut short");
        assert_eq!(counts.rx_frames, 1, "the second one gets enough buffers");
        let used = used_entries(&mq, &mem, SIZE);
        assert_eq!(used.len(), 3, "5000 bytes in three 2048-byte buffers: {used:?}");
        let mut got = read(&mem, addrs[used[0].0 as usize], 2048);
        got.extend(read(&mem, addrs[used[1].0 as usize], 2048));
        got.extend(read(&mem, addrs[used[2].0 as usize], 5000 - 4096));
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        assert!(got[12..] == big[12..], "frame intact");
    }

    #[test]
    fn test_rx_bad_chain_is_returned_empty() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        add_chain(&mq, 0, &[(DATA_BASE, 2000, false)]); // read-only in RX
        add_chain(&mq, 1, &[(DATA_BASE + 0x1000, 2000, true)]);
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        tap.read_script.borrow_mut().push_back(TapStep::Frame(frame(100, 2)));
        let mut counts = PairCounts::default();
        let mut rx = RxLoop::new(64, SIZE, features(true, false), 1500, &mem);
        rx.process(&mut q, &mem, &tap, &mut counts);
        assert_eq!(counts.rx_bad_chains, 1);
        assert_eq!(used_entries(&mq, &mem, SIZE), vec![(0, 0), (1, 100)]);
    }

    #[test]
    fn test_rx_event_idx_interrupts_only_when_asked() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        post(&mq, 0, 4, 2000);
        // used_event (after the avail ring) = 5: the guest wants an interrupt only past entry 5.
        let used_event_addr = mq.avail_addr().0 + 4 + 2 * u64::from(SIZE);
        mem.write_obj(5u16, GuestAddress(used_event_addr)).unwrap();
        let mut q = queue(&mq, true);
        let tap = MockTap::default();
        tap.read_script.borrow_mut().push_back(TapStep::Frame(frame(100, 1)));
        let mut counts = PairCounts::default();
        let mut rx = RxLoop::new(64, SIZE, features(false, false), 1500, &mem);
        let (_, notify) = rx.process(&mut q, &mem, &tap, &mut counts);
        assert!(!notify, "used_event not reached");
        mem.write_obj(0u16, GuestAddress(used_event_addr)).unwrap();
        tap.read_script.borrow_mut().push_back(TapStep::Frame(frame(100, 2)));
        let (_, notify) = rx.process(&mut q, &mem, &tap, &mut counts);
        assert!(!notify, "used_event 0 was passed in an earlier batch");
        mem.write_obj(2u16, GuestAddress(used_event_addr)).unwrap();
        tap.read_script.borrow_mut().extend([TapStep::Frame(frame(100, 3)), TapStep::Frame(frame(100, 4))]);
        let (_, notify) = rx.process(&mut q, &mem, &tap, &mut counts);
        assert!(notify, "used_event 2 is crossed by this batch");
    }

    /// A tap that notes the used index the guest can see at each read.
    struct UsedIdxAtRead<'a> {
        tap: MockTap,
        mem: &'a FlatMem,
        used_idx: u64,
        seen: std::cell::RefCell<Vec<u16>>,
    }

    impl TapIo for UsedIdxAtRead<'_> {
        fn write_frame(&self, iovs: &[IoVec]) -> io::Result<usize> {
            self.tap.write_frame(iovs)
        }
        fn read_frame(&self, iovs: &[IoVec]) -> io::Result<usize> {
            self.seen.borrow_mut().push(self.mem.read_obj(GuestAddress(self.used_idx)).unwrap());
            self.tap.read_frame(iovs)
        }
    }

    fn used_idx_at_reads(publish_first_frame: bool, frames: u8, used_event: u16) -> (Vec<u16>, bool, PairCounts) {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        post(&mq, 0, 8, 2000);
        mem.write_obj(used_event, GuestAddress(mq.avail_addr().0 + 4 + 2 * u64::from(SIZE))).unwrap();
        let mut q = queue(&mq, true);
        let tap = UsedIdxAtRead { tap: MockTap::default(), mem: &mem, used_idx: used_addr(&mq, SIZE) + 2, seen: Default::default() };
        tap.tap.read_script.borrow_mut().extend((0..frames).map(|i| TapStep::Frame(frame(100, i))));
        let mut counts = PairCounts::default();
        let mut rx = RxLoop::new(64, SIZE, features(false, false), 1500, &mem).publishing_first_frame(publish_first_frame);
        let (outcome, notify) = rx.process(&mut q, &mem, &tap, &mut counts);
        assert!(matches!(outcome, RxOutcome::Idle));
        assert_eq!(used_entries(&mq, &mem, SIZE).len(), usize::from(frames), "every frame is used in the end");
        (tap.seen.into_inner(), notify, counts)
    }

    #[test]
    fn test_rx_first_frame_is_published_before_the_next_read_when_asked() {
        // The read after each frame sees only the frames of earlier passes, unless asked.
        assert_eq!(used_idx_at_reads(false, 1, 0).0, vec![0, 0]);
        assert_eq!(used_idx_at_reads(true, 1, 0).0, vec![0, 1], "the guest sees its frame before the empty read");
        assert_eq!(used_idx_at_reads(true, 3, 0).0, vec![0, 1, 1, 1], "the rest go out together at the end");
        // Still one interrupt per pass, asked for by either update, and one batch counted.
        let (_, notify, counts) = used_idx_at_reads(true, 3, 0);
        assert!(notify, "used_event 0 is crossed by the early update");
        assert_eq!((counts.rx_frames, counts.rx_batches), (3, 1));
        let (_, notify, _) = used_idx_at_reads(true, 3, 2);
        assert!(notify, "used_event 2 is crossed by the final update");
        let (_, notify, _) = used_idx_at_reads(true, 3, 7);
        assert!(!notify, "used_event 7 is not reached");
    }

    #[test]
    fn test_rx_logs_written_buffers_and_used_ring_while_migrating() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        let addrs = post(&mq, 0, 3, 2000);
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        tap.read_script.borrow_mut().push_back(TapStep::Frame(frame(100, 1)));
        let (file, log) = memfd_log(4096);
        let mut rx = RxLoop::new(64, SIZE, features(false, false), 1500, &mem).with_log(Some(Arc::new(log)));
        rx.process(&mut q, &mem, &tap, &mut PairCounts::default());
        let page = |a: u64| a / crate::datapath::dirty_log::LOG_PAGE;
        assert!(page_marked(&file, page(addrs[0])), "the written buffer's page is marked");
        assert!(!page_marked(&file, page(addrs[1])), "a held, unwritten buffer is not");
        assert!(page_marked(&file, page(used_addr(&mq, SIZE))), "the used ring is marked");
    }

    /// `n` descriptors of `seg` bytes each, device-writable, back to back from `addr`.
    fn segments(addr: u64, n: usize, seg: u32) -> Vec<(u64, u32, bool)> {
        (0..n as u64).map(|i| (addr + i * u64::from(seg), seg, true)).collect()
    }

    #[test]
    fn test_rx_pass_ends_with_a_quarter_of_the_ring_still_posted() {
        const SMALL: u16 = 16;
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SMALL);
        post(&mq, 0, SMALL, 2000);
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        tap.read_script.borrow_mut().extend((0..SMALL).map(|i| TapStep::Frame(frame(100, i as u8))));
        let mut counts = PairCounts::default();
        let mut rx = RxLoop::new(64, SMALL, features(false, false), 1500, &mem);
        let (outcome, notify) = rx.process(&mut q, &mem, &tap, &mut counts);
        assert!(matches!(outcome, RxOutcome::MoreWork), "{outcome:?}");
        assert!(notify);
        assert_eq!((used_entries(&mq, &mem, SMALL).len(), counts.rx_frames, counts.rx_no_buffers), (12, 12, 0));
        // The next pass takes the rest.
        rx.process(&mut q, &mem, &tap, &mut counts);
        assert_eq!(counts.rx_frames, 16);
        assert_eq!(chain_budget(128, 256), 192);
        assert_eq!(chain_budget(128, 1024), 512);
        assert_eq!(chain_budget(128, 1), 1);
    }

    #[test]
    fn test_rx_bad_chain_flood_is_bounded_per_pass() {
        const BIG: u16 = 1024;
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, BIG);
        for i in 0..1000u16 {
            add_chain(&mq, i, &[(DATA_BASE, 2000, false)]); // read-only: bad in RX
        }
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        let mut counts = PairCounts::default();
        let mut rx = RxLoop::new(64, BIG, features(true, false), 1500, &mem);
        let chain_budget = 64 * CHAINS_PER_FRAME;
        let (outcome, notify) = rx.process(&mut q, &mem, &tap, &mut counts);
        assert!(matches!(outcome, RxOutcome::MoreWork), "{outcome:?}");
        assert!(notify, "the refused chains are published and signalled once");
        assert_eq!(q.next_avail() as usize, chain_budget, "one budget of chains popped");
        assert_eq!(used_entries(&mq, &mem, BIG).len(), chain_budget);
        assert_eq!((counts.rx_bad_chains, counts.rx_batches), (chain_budget as u64, 1));
        let mut passes = 1;
        loop {
            let (outcome, _) = rx.process(&mut q, &mem, &tap, &mut counts);
            passes += 1;
            if matches!(outcome, RxOutcome::NoBuffers) {
                break;
            }
            assert!(matches!(outcome, RxOutcome::MoreWork), "{outcome:?}");
        }
        assert_eq!(passes, 1000usize.div_ceil(chain_budget));
        let used = used_entries(&mq, &mem, BIG);
        assert!(used == (0..1000u32).map(|h| (h, 0)).collect::<Vec<_>>(), "every chain comes back once, in order");
    }

    #[test]
    fn test_rx_head_posted_again_while_held_is_refused() {
        const SMALL: u16 = 8;
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SMALL);
        post(&mq, 0, 4, 100); // 400 bytes: too little for a 1530-byte frame, all held
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        let mut counts = PairCounts::default();
        let mut rx = RxLoop::new(64, SMALL, features(true, false), 1500, &mem);
        assert!(matches!(rx.process(&mut q, &mem, &tap, &mut counts).0, RxOutcome::NoBuffers));
        assert!(used_entries(&mq, &mem, SMALL).is_empty());
        // Heads 0 and 1 again, then a fresh chain at 4.
        repost_heads(&mq, &mem, SMALL, &[0, 1]);
        add_chain(&mq, 4, &[(DATA_BASE + 4 * 0x1000, 100, true)]);
        assert!(matches!(rx.process(&mut q, &mem, &tap, &mut counts).0, RxOutcome::NoBuffers));
        assert_eq!(counts.rx_bad_chains, 2);
        assert_eq!(used_entries(&mq, &mem, SMALL), vec![(0, 0), (1, 0)], "the second postings come back empty");
        assert_eq!(q.next_avail(), 7);
        // Completed out of order, so the held ones are completed empty rather than rewound.
        rx.return_held(&mut q, &mem);
        assert_eq!(q.next_avail(), 7);
        let used = used_entries(&mq, &mem, SMALL);
        assert_eq!(&used[2..], &[(0, 0), (1, 0), (2, 0), (3, 0), (4, 0)]);
    }

    #[test]
    fn test_rx_never_holds_more_than_the_ring() {
        const SMALL: u16 = 4;
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SMALL);
        post(&mq, 0, 4, 100); // 400 bytes, too little for a frame: all four held
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        let mut counts = PairCounts::default();
        let mut rx = RxLoop::new(64, SMALL, features(true, false), 1500, &mem);
        // A pass pops at most 3 of the 4 (3/4 of the ring); passes go on until the ring is dry.
        let until_dry = |rx: &mut RxLoop, q: &mut Queue, counts: &mut PairCounts| {
            let outcomes: Vec<RxOutcome> = (0..4).map(|_| rx.process(q, &mem, &tap, counts).0).collect();
            assert!(outcomes.iter().any(|o| matches!(o, RxOutcome::NoBuffers)), "{outcomes:?}");
            assert!(outcomes.iter().all(|o| matches!(o, RxOutcome::NoBuffers | RxOutcome::MoreWork)), "{outcomes:?}");
        };
        until_dry(&mut rx, &mut q, &mut counts);
        // The driver reuses all four heads without getting them back.
        repost_heads(&mq, &mem, SMALL, &[0, 1, 2, 3]);
        until_dry(&mut rx, &mut q, &mut counts);
        assert_eq!(counts.rx_bad_chains, 4);
        let refused: Vec<(u32, u32)> = (0..4).map(|h| (h, 0)).collect();
        assert_eq!(used_entries(&mq, &mem, SMALL), refused, "the second postings come back empty");
        assert_eq!(q.next_avail(), 8);
        assert_eq!(q.enable_notification(&mem), Ok(false), "nothing left to pop: the worker can sleep");
        // Exactly the first four are held: stopping completes those (the refusals were
        // completed out of order, so no rewind) and next_avail stays where it is.
        rx.return_held(&mut q, &mem);
        assert_eq!(q.next_avail(), 8);
        assert_eq!(&used_entries(&mq, &mem, SMALL)[4..], &refused[..]);
    }

    #[test]
    fn test_rx_chain_over_iov_max_is_refused_and_one_under_is_used() {
        const BIG: u16 = 4096;
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, BIG);
        add_chain(&mq, 0, &segments(DATA_BASE, MAX_RX_SEGMENTS + 1, 16));
        add_chain(&mq, 1100, &segments(DATA_BASE + 0x10_0000, MAX_RX_SEGMENTS, 16));
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        let f = frame(10_000, 9);
        tap.read_script.borrow_mut().push_back(TapStep::Frame(f.clone()));
        let mut counts = PairCounts::default();
        let mut rx = RxLoop::new(64, BIG, features(false, false), 1500, &mem);
        rx.process(&mut q, &mem, &tap, &mut counts);
        assert_eq!((counts.rx_too_many_segments, counts.rx_bad_chains), (1, 0));
        assert_eq!(used_entries(&mq, &mem, BIG), vec![(0, 0), (1100, 10_000)]);
        let got = read(&mem, DATA_BASE + 0x10_0000, 10_000);
        assert_eq!(&got[12..], &f[12..], "delivered byte for byte through 1023 segments");
        assert_eq!(counts.rx_frames, 1);
    }

    #[test]
    fn test_rx_frame_past_the_iovec_limit_is_completed_from_the_spill_tail() {
        const BIG: u16 = 4096;
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, BIG);
        // Two chains of 1000 one-byte segments: together enough for a 1500-byte frame, but
        // 2000 iovecs, more than one read takes: the read reaches the first chain only.
        add_chain(&mq, 0, &segments(DATA_BASE, 1000, 1));
        add_chain(&mq, 1000, &segments(DATA_BASE + 0x1000, 1000, 1));
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        let long = frame(1500, 1);
        tap.read_script.borrow_mut().push_back(TapStep::Frame(long.clone()));
        let mut counts = PairCounts::default();
        let mut rx = RxLoop::new(64, BIG, features(true, false), 1500, &mem);
        rx.process(&mut q, &mem, &tap, &mut counts);
        assert_eq!((counts.rx_frames, counts.rx_dropped, counts.rx_window_copies), (1, 0, 1), "delivered whole, not dropped or cut");
        assert_eq!(used_entries(&mq, &mem, BIG), vec![(0, 1000), (1000, 500)]);
        let (first, second) = (read(&mem, DATA_BASE, 1000), read(&mem, DATA_BASE + 0x1000, 500));
        assert_eq!(&first[12..], &long[12..1000]);
        assert_eq!(second, &long[1000..]);
        assert_eq!(u16::from_le_bytes([first[10], first[11]]), 2, "num_buffers");
    }

    #[test]
    fn test_rx_window_follows_recent_frames_and_a_bigger_one_still_arrives_whole() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, 512);
        // 4 KiB buffers, a GSO-capable guest: vutap holds 17 of them for a 64 KiB frame.
        for i in 0..512u16 {
            add_chain(&mq, i, &[(DATA_BASE + u64::from(i) * 0x1000, 0x1000, true)]);
        }
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        let small = frame(1514 + 12, 7);
        let big = frame(40_000, 9);
        let mut script: Vec<TapStep> = (0..300).map(|_| TapStep::Frame(small.clone())).collect();
        script.push(TapStep::Frame(big.clone()));
        tap.read_script.borrow_mut().extend(script);
        let mut counts = PairCounts::default();
        let mut rx = RxLoop::new(64, 512, features(true, true), 1500, &mem);
        // Warm the window up on small frames (a period and more), then the big one.
        for _ in 0..6 {
            rx.process(&mut q, &mem, &tap, &mut counts);
        }
        assert_eq!((counts.rx_frames, counts.rx_dropped), (301, 0), "{counts:?}");
        let used = used_entries(&mq, &mem, 512);
        let big_chains: Vec<_> = used[300..].to_vec();
        assert_eq!(big_chains.len(), 10, "40 000 bytes in 4 KiB buffers: {big_chains:?}");
        let mut got = Vec::new();
        for (head, len) in &big_chains {
            got.extend(read(&mem, DATA_BASE + u64::from(*head) * 0x1000, *len as usize));
        }
        assert_eq!(&got[12..], &big[12..], "the big frame byte for byte");
        assert_eq!(counts.rx_window_copies, 1, "only the big frame needed the spill copy");
    }

    /// What a run of RX passes left: the used entries, the bytes of each used buffer, and the
    /// frame counters.
    type RxRun = (Vec<(u32, u32)>, Vec<Vec<u8>>, (u64, u64, u64, u64), u64);

    /// Posts `chains` single-buffer chains of `buf_len` bytes, plays `script` through a tap that
    /// reads `batch` frames per call, and runs passes until the script is played out, reposting
    /// each used buffer after reading it back, as a driver does.
    fn run_script(batch: usize, mergeable: bool, buf_len: u32, chains: u16, script: &[TapStep]) -> (RxRun, Vec<usize>) {
        const RING: u16 = 256;
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, RING);
        let stride = u64::from(buf_len).next_multiple_of(0x1000);
        for i in 0..chains {
            add_chain(&mq, i, &[(DATA_BASE + u64::from(i) * stride, buf_len, true)]);
        }
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        tap.read_batch_capacity.set(batch);
        tap.read_script.borrow_mut().extend(script.iter().map(|step| match step {
            TapStep::Frame(f) => TapStep::Frame(f.clone()),
            TapStep::Accept => TapStep::Accept,
            TapStep::Fail(e) => TapStep::Fail(*e),
        }));
        let mut counts = PairCounts::default();
        let mut rx = RxLoop::new(64, RING, features(mergeable, true), 1500, &mem);
        let (mut used, mut bytes) = (Vec::new(), Vec::new());
        let used_base = used_addr(&mq, RING);
        for _ in 0..4 * script.len() {
            if tap.read_script.borrow().is_empty() {
                break;
            }
            rx.process(&mut q, &mem, &tap, &mut counts);
            let idx: u16 = mem.read_obj(GuestAddress(used_base + 2)).unwrap();
            let mut heads = Vec::new();
            for i in used.len()..usize::from(idx) {
                let slot = used_base + 4 + (i % usize::from(RING)) as u64 * 8;
                let (head, len): (u32, u32) = (mem.read_obj(GuestAddress(slot)).unwrap(), mem.read_obj(GuestAddress(slot + 4)).unwrap());
                used.push((head, len));
                bytes.push(read(&mem, DATA_BASE + u64::from(head) * stride, len as usize));
                heads.push(head as u16);
            }
            repost_heads(&mq, &mem, RING, &heads);
        }
        assert!(tap.read_script.borrow().is_empty(), "the script was played out");
        let batches = tap.read_batches.borrow().clone();
        ((used, bytes, (counts.rx_frames, counts.rx_bytes, counts.rx_dropped, counts.tap_errors), counts.rx_window_copies), batches)
    }

    /// Frames of every size class past a warm-up of the read window, a hole (a read that found
    /// the tap empty before one that got a frame), a frame bigger than the read window in the
    /// middle of a batch, a failed read.
    fn mixed_script(big: usize) -> Vec<TapStep> {
        let mut script = Vec::new();
        for i in 0..400u16 {
            let len = [60, 1526, 200, 90][usize::from(i) % 4];
            script.push(TapStep::Frame(frame(len, i as u8)));
            match i {
                300 => script.push(TapStep::Fail(libc::EAGAIN)),
                330 => script.push(TapStep::Frame(frame(big, 0xee))),
                350 => script.push(TapStep::Fail(libc::EIO)),
                _ => {}
            }
        }
        script
    }

    #[test]
    fn test_rx_batched_reads_deliver_exactly_what_frame_by_frame_reads_do() {
        // Mergeable 1536-byte buffers of a GSO guest (a 40 000-byte frame spans 27 of them) and
        // non-mergeable 64 KiB buffers.
        for (mergeable, buf_len, chains, big) in [(true, 1536, 256, 40_000), (false, 65_562, 200, 60_000)] {
            let script = mixed_script(big);
            let (one_by_one, batches) = run_script(1, mergeable, buf_len, chains, &script);
            assert!(batches.iter().all(|&n| n == 1), "the reference reads frame by frame");
            assert_eq!(one_by_one.2, (401, one_by_one.2 .1, 1, 0), "401 frames, the failed read dropped one: {:?}", one_by_one.2);
            let mut moved_any = false;
            for batch in [2, 8, 32] {
                let (batched, batches) = run_script(batch, mergeable, buf_len, chains, &script);
                assert!(batches.contains(&batch), "reads went in batches of up to {batch}: {batches:?}");
                assert_eq!(batched.0, one_by_one.0, "the same chains with the same lengths (mergeable {mergeable}, batch {batch})");
                assert!(batched.1 == one_by_one.1, "the same bytes in every buffer (mergeable {mergeable}, batch {batch})");
                assert_eq!(batched.2, one_by_one.2, "the same counters");
                moved_any |= batched.3 > one_by_one.3;
            }
            // Frames behind the hole, the big frame or the failed read were laid out again by a
            // copy, not where their reads put them (which ones depends on where batches end).
            assert!(moved_any, "some frames were moved (mergeable {mergeable})");
        }
    }

    #[test]
    fn test_rx_batch_stops_at_an_empty_tap_and_next_batch_follows_the_frames_seen() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        post(&mq, 0, SIZE, 2048);
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        tap.read_batch_capacity.set(32);
        tap.read_script.borrow_mut().extend((0..5).map(|i| TapStep::Frame(frame(100, i))));
        let mut counts = PairCounts::default();
        let mut rx = RxLoop::new(64, SIZE, features(false, false), 1500, &mem);
        let (outcome, notify) = rx.process(&mut q, &mem, &tap, &mut counts);
        assert!(matches!(outcome, RxOutcome::Idle), "{outcome:?}");
        assert!(notify);
        // Batches of 2 and 4 read frames 1-2 and 3-5 and found the tap empty once.
        assert_eq!(*tap.read_batches.borrow(), vec![2, 4]);
        assert_eq!(counts.rx_frames, 5);
        assert_eq!(used_entries(&mq, &mem, SIZE), (0..5).map(|h| (h, 100)).collect::<Vec<_>>());
        assert_eq!(rx.batch_reads, 4, "the next batch tries one read more than found frames");
    }

    #[test]
    fn test_rx_batch_stops_at_a_gone_tap_and_counts_the_frames_read_behind_it_as_dropped() {
        let mem = guest_memory();
        let mq = MockSplitQueue::new(&mem, SIZE);
        post(&mq, 0, 8, 2048);
        let mut q = queue(&mq, false);
        let tap = MockTap::default();
        tap.read_batch_capacity.set(8);
        // A batch of 2 (both got a frame), then one of 4: a frame, the tap gone, a frame read
        // behind it, an empty read.
        let script = [TapStep::Frame(frame(100, 1)), TapStep::Frame(frame(100, 2)), TapStep::Frame(frame(100, 3))];
        tap.read_script.borrow_mut().extend(script);
        tap.read_script.borrow_mut().extend([TapStep::Fail(libc::ENODEV), TapStep::Frame(frame(100, 5))]);
        let mut counts = PairCounts::default();
        let mut rx = RxLoop::new(64, SIZE, features(false, false), 1500, &mem);
        let (outcome, _) = rx.process(&mut q, &mem, &tap, &mut counts);
        assert!(matches!(outcome, RxOutcome::TapGone(ref e) if e.raw_os_error() == Some(libc::ENODEV)), "{outcome:?}");
        assert_eq!(*tap.read_batches.borrow(), vec![2, 4]);
        assert_eq!((counts.rx_frames, counts.rx_dropped, counts.tap_errors), (3, 1, 1), "{counts:?}");
        assert_eq!(used_entries(&mq, &mem, SIZE), vec![(0, 100), (1, 100), (2, 100)]);
    }
}
