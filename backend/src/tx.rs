//! The TX batch loop: guest chains -> one `writev` per frame straight from guest memory.

use std::io;

use log::{trace, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vutap_virtio::features::{HDR_LEN, MAX_GSO_FRAME};
use vutap_virtio::{ChainLimits, Direction};

use crate::chain_iov::{collect_iovecs, IoVec};
use crate::memory::GuestMem;
use crate::metrics::PairCounts;
use crate::tap_io::TapIo;
use crate::used_ring::UsedBatch;

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
    /// The avail ring is corrupt (index jumped by more than the queue size).
    RingBroken(String),
}

/// Errors after which the tap will never accept a frame again.
pub fn is_fatal_tap_error(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EBADF) | Some(libc::ENODEV) | Some(libc::ENXIO) | Some(libc::EBADFD) | Some(libc::EPIPE))
}

pub struct TxLoop {
    iovs: Vec<IoVec>,
    used: UsedBatch,
    budget: usize,
    limits: ChainLimits,
    warned_bad_chain: bool,
}

impl TxLoop {
    pub fn new(budget: usize, queue_size: u16, hdr_len: usize) -> Self {
        TxLoop {
            iovs: Vec::with_capacity(64),
            used: UsedBatch::with_capacity(budget),
            budget,
            limits: ChainLimits {
                max_descriptors: queue_size as usize,
                // A GSO frame plus its header; anything longer no tap accepts.
                max_bytes: (MAX_GSO_FRAME + HDR_LEN) as u32,
                min_bytes: hdr_len as u32,
            },
            warned_bad_chain: false,
        }
    }

    /// Moves up to one budget of frames from the TX ring to the tap and completes them in one
    /// used-ring update. Returns why it stopped and whether the guest wants an interrupt.
    pub fn process<T: TapIo>(&mut self, queue: &mut Queue, mem: &GuestMem, tap: &T, counts: &mut PairCounts) -> (TxOutcome, bool) {
        let mut outcome = TxOutcome::MoreWork;
        for _ in 0..self.budget {
            let before = queue.next_avail();
            let chain = match queue.iter(mem) {
                Ok(mut avail) => avail.next(),
                Err(e) => {
                    outcome = TxOutcome::RingBroken(e.to_string());
                    break;
                }
            };
            let Some(chain) = chain else {
                outcome = TxOutcome::Idle;
                break;
            };
            let head = chain.head_index();
            self.iovs.clear();
            let len = match collect_iovecs(chain, mem, Direction::DeviceReads, self.limits, &mut self.iovs) {
                Ok(len) => len,
                Err(e) => {
                    counts.tx_bad_chains += 1;
                    if !self.warned_bad_chain {
                        warn!("dropping malformed TX chain {head}: {e} (further ones only counted)");
                        self.warned_bad_chain = true;
                    }
                    self.used.push(head, 0);
                    continue;
                }
            };
            match tap.write_frame(&self.iovs) {
                Ok(_) => {
                    trace!("tx frame head={head} len={len}");
                    counts.tx_frames += 1;
                    counts.tx_bytes += u64::from(len);
                    self.used.push(head, 0);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    queue.set_next_avail(before);
                    counts.tx_eagain += 1;
                    outcome = TxOutcome::Blocked;
                    break;
                }
                Err(e) if is_fatal_tap_error(&e) => {
                    queue.set_next_avail(before);
                    counts.tap_errors += 1;
                    outcome = TxOutcome::TapGone(e);
                    break;
                }
                Err(e) => {
                    // EINVAL (bad virtio_net_hdr), EMSGSIZE, EIO...: the frame is refused, not the tap.
                    trace!("tap refused tx frame head={head} len={len}: {e}");
                    counts.tx_dropped += 1;
                    self.used.push(head, 0);
                }
            }
        }
        if !self.used.is_empty() {
            counts.tx_batches += 1;
        }
        let notify = match self.used.publish(queue, mem) {
            Ok(n) => n,
            Err(e) => {
                outcome = TxOutcome::RingBroken(format!("used ring write failed: {e}"));
                false
            }
        };
        (outcome, notify)
    }
}
