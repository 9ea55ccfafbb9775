//! The RX batch loop: `readv` from the tap straight into guest buffers.
//!
//! Chains are popped ahead and held (with their iovecs) until a frame needs them, so one read
//! can spread a 64 KiB GSO frame over many mergeable buffers, and chains a small frame did not
//! need stay for the next one instead of being popped and pushed back each time.

use std::collections::VecDeque;
use std::io;

use log::{trace, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vutap_virtio::hdr::{num_buffers_bytes, NUM_BUFFERS_OFFSET};
use vutap_virtio::mergeable::{chains_needed, used_len};
use vutap_virtio::{ChainLimits, Direction, Features};

use crate::chain_iov::{collect_iovecs, write_at, IoVec};
use crate::memory::GuestMem;
use crate::metrics::PairCounts;
use crate::tap_io::TapIo;
use crate::tx::is_fatal_tap_error;
use crate::used_ring::UsedBatch;

#[derive(Debug)]
pub enum RxOutcome {
    /// The tap has nothing more to read.
    Idle,
    /// The budget ran out: come back after serving TX.
    MoreWork,
    /// Not enough guest buffers for the largest possible frame: wait for an RX kick.
    NoBuffers,
    TapGone(io::Error),
    RingBroken(String),
}

#[derive(Debug, Clone, Copy)]
struct HeldChain {
    head: u16,
    capacity: usize,
    iov_count: usize,
}

pub struct RxLoop {
    held: VecDeque<HeldChain>,
    held_iovs: VecDeque<IoVec>,
    held_capacity: usize,
    scratch: Vec<IoVec>,
    used: UsedBatch,
    budget: usize,
    limits: ChainLimits,
    hdr_len: usize,
    mergeable: bool,
    max_frame: usize,
    /// False once a bad chain was completed out of order, so rewinding next_avail over the held
    /// chains would hand the guest a completed chain twice.
    rewind_ok: bool,
    warned_bad_chain: bool,
}

impl RxLoop {
    pub fn new(budget: usize, queue_size: u16, features: Features, mtu: u16) -> Self {
        let hdr_len = features.hdr_len();
        RxLoop {
            held: VecDeque::with_capacity(queue_size as usize),
            held_iovs: VecDeque::with_capacity(queue_size as usize),
            held_capacity: 0,
            scratch: Vec::with_capacity(32),
            used: UsedBatch::with_capacity(budget * 4),
            budget,
            limits: ChainLimits { max_descriptors: queue_size as usize, max_bytes: u32::MAX, min_bytes: hdr_len as u32 },
            hdr_len,
            mergeable: features.mrg_rxbuf(),
            max_frame: features.max_rx_frame(mtu),
            rewind_ok: true,
            warned_bad_chain: false,
        }
    }

    /// Whether enough buffers are held for the largest frame (one chain without MRG_RXBUF).
    fn has_room(&self) -> bool {
        if self.mergeable {
            self.held_capacity >= self.max_frame
        } else {
            !self.held.is_empty()
        }
    }

    /// Pops chains until there is room for one frame. Err on a broken ring.
    fn fill(&mut self, queue: &mut Queue, mem: &GuestMem, counts: &mut PairCounts) -> Result<bool, String> {
        while !self.has_room() {
            let chain = match queue.iter(mem) {
                Ok(mut avail) => avail.next(),
                Err(e) => return Err(e.to_string()),
            };
            let Some(chain) = chain else { return Ok(false) };
            let head = chain.head_index();
            self.scratch.clear();
            match collect_iovecs(chain, mem, Direction::DeviceWrites, self.limits, &mut self.scratch) {
                Ok(capacity) => {
                    self.held.push_back(HeldChain { head, capacity: capacity as usize, iov_count: self.scratch.len() });
                    self.held_iovs.extend(self.scratch.iter().copied());
                    self.held_capacity += capacity as usize;
                }
                Err(e) => {
                    counts.rx_bad_chains += 1;
                    if !self.warned_bad_chain {
                        warn!("returning malformed RX chain {head}: {e} (further ones only counted)");
                        self.warned_bad_chain = true;
                    }
                    if !self.held.is_empty() {
                        self.rewind_ok = false;
                    }
                    self.used.push(head, 0);
                }
            }
        }
        Ok(true)
    }

    /// The iovecs one read may fill: the held chains that together can take the largest frame.
    fn read_iov_count(&self) -> usize {
        if !self.mergeable {
            return self.held.front().map_or(0, |c| c.iov_count);
        }
        let mut capacity = 0;
        let mut iovs = 0;
        for c in &self.held {
            capacity += c.capacity;
            iovs += c.iov_count;
            if capacity >= self.max_frame {
                break;
            }
        }
        iovs
    }

    /// Completes the first chains for a frame of `n` bytes. Returns false if it cannot be
    /// delivered (it was truncated), leaving the chains held for the next frame.
    fn deliver(&mut self, n: usize, counts: &mut PairCounts) -> bool {
        if n < self.hdr_len {
            return false;
        }
        let (chains, last_len) = if self.mergeable {
            match chains_needed(n, self.held.iter().map(|c| c.capacity)) {
                Some(layout) => layout,
                None => return false,
            }
        } else {
            match self.held.front() {
                Some(c) if n <= c.capacity => (1, n),
                _ => return false,
            }
        };
        if self.hdr_len == vutap_virtio::features::HDR_LEN {
            let iovs = self.held_iovs.make_contiguous();
            let first = self.held[0].iov_count;
            // The tap leaves num_buffers untouched, so the device writes it.
            if !write_at(&iovs[..first], NUM_BUFFERS_OFFSET, &num_buffers_bytes(chains as u16)) {
                return false;
            }
        }
        for i in 0..chains {
            let Some(chain) = self.held.pop_front() else { break };
            self.held_iovs.drain(..chain.iov_count);
            self.held_capacity -= chain.capacity;
            self.used.push(chain.head, used_len(i, chains, last_len, chain.capacity) as u32);
        }
        counts.rx_frames += 1;
        counts.rx_bytes += n as u64;
        true
    }

    /// Moves up to one budget of frames from the tap to the guest and completes them in one
    /// used-ring update. Returns why it stopped and whether the guest wants an interrupt.
    pub fn process<T: TapIo>(&mut self, queue: &mut Queue, mem: &GuestMem, tap: &T, counts: &mut PairCounts) -> (RxOutcome, bool) {
        let mut outcome = RxOutcome::MoreWork;
        for _ in 0..self.budget {
            match self.fill(queue, mem, counts) {
                Ok(true) => {}
                Ok(false) => {
                    counts.rx_no_buffers += 1;
                    outcome = RxOutcome::NoBuffers;
                    break;
                }
                Err(e) => {
                    outcome = RxOutcome::RingBroken(e);
                    break;
                }
            }
            let iov_count = self.read_iov_count();
            let iovs = &self.held_iovs.make_contiguous()[..iov_count];
            match tap.read_frame(iovs) {
                Ok(0) => {
                    // End of file: the device behind the fd is gone.
                    counts.tap_errors += 1;
                    outcome = RxOutcome::TapGone(io::Error::new(io::ErrorKind::UnexpectedEof, "tap returned end of file"));
                    break;
                }
                Ok(n) => {
                    trace!("rx frame len={n}");
                    if !self.deliver(n, counts) {
                        counts.rx_dropped += 1;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    outcome = RxOutcome::Idle;
                    break;
                }
                Err(e) if is_fatal_tap_error(&e) => {
                    counts.tap_errors += 1;
                    outcome = RxOutcome::TapGone(e);
                    break;
                }
                Err(e) => {
                    // EFAULT: a macvtap frame larger than the buffers; the frame is lost, not the tap.
                    trace!("rx read failed: {e}");
                    counts.rx_dropped += 1;
                }
            }
        }
        if !self.used.is_empty() {
            counts.rx_batches += 1;
        }
        let notify = match self.used.publish(queue, mem) {
            Ok(n) => n,
            Err(e) => {
                outcome = RxOutcome::RingBroken(format!("used ring write failed: {e}"));
                false
            }
        };
        (outcome, notify)
    }

    /// Gives the held (popped, unused) chains back before the ring stops: the ring's next_avail
    /// moves back over them so the next start (or the next backend) offers them again. If that
    /// is unsafe (a bad chain completed out of order), they are completed empty instead.
    pub fn return_held(&mut self, queue: &mut Queue, mem: &GuestMem) -> bool {
        let n = self.held.len() as u16;
        let mut notify = false;
        if self.rewind_ok {
            queue.set_next_avail(queue.next_avail().wrapping_sub(n));
        } else {
            for c in &self.held {
                self.used.push(c.head, 0);
            }
        }
        self.held.clear();
        self.held_iovs.clear();
        self.held_capacity = 0;
        if !self.used.is_empty() {
            notify = self.used.publish(queue, mem).unwrap_or(false);
        }
        notify
    }
}
