//! A tap queue behind traits, so the datapath loops and the control plane (sessions, workers)
//! can be tested in memory with a scripted tap (short writes, EAGAIN, errors) and no privileges:
//! [`TapIo`] is the datapath's two syscalls, [`TapControl`] adds what a session does to a queue.

use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;

use log::warn;

use crate::datapath::chain_iov::IoVec;
use crate::datapath::tap_ring::TapRing;
use crate::tap::{TapError, TapQueue};

pub trait TapIo {
    /// Writes one frame (virtio_net_hdr + Ethernet frame) gathered from `iovs`.
    fn write_frame(&self, iovs: &[IoVec]) -> io::Result<usize>;
    /// Reads one frame (virtio_net_hdr + Ethernet frame) scattered into `iovs`.
    fn read_frame(&self, iovs: &[IoVec]) -> io::Result<usize>;

    /// Writes the frames `spans` cut out of `iovs`, in order, and appends one result per frame
    /// it tried. It stops after a result that [ends the batch](ends_batch); it may also stop
    /// after any other failure. Frames without a result were not tried.
    fn write_batch(&self, iovs: &[IoVec], spans: &[Range<usize>], results: &mut Vec<io::Result<usize>>) {
        write_each(self, iovs, spans, results, ends_batch);
    }

    /// How many reads one [`read_batch`](Self::read_batch) call may take; 1: the tap reads one
    /// frame per call, and the RX loop reads frame by frame.
    fn read_batch_capacity(&self) -> usize {
        1
    }

    /// Reads one frame into each of the iovec runs `spans` cut out of `iovs`, in order, and
    /// appends one result per read it tried. Reads after one that found the tap empty
    /// (`EAGAIN`) may still be tried and get a frame that arrived meanwhile; frames without a
    /// result were not tried.
    fn read_batch(&self, iovs: &[IoVec], spans: &[Range<usize>], results: &mut Vec<io::Result<usize>>) {
        read_each(self, iovs, spans, results);
    }

    /// Writes one frame (virtio_net_hdr + Ethernet frame) held in our own memory, such as an
    /// announcement the device builds itself. Rare, so it copies the frame rather than hand out
    /// an iovec over borrowed, read-only memory.
    fn write_bytes(&self, frame: &[u8]) -> io::Result<usize> {
        let mut owned = frame.to_vec();
        // SAFETY: `owned` is ours, writable, and outlives the call; nothing else touches it
        // while the iovec is in use, and the iovec is dropped with this call.
        let iov = unsafe { IoVec::from_raw_parts(owned.as_mut_ptr(), owned.len()) };
        self.write_frame(&[iov])
    }
}

/// [`TapIo::read_batch`] as one `read_frame` per frame, stopping at the first that got no frame.
pub(crate) fn read_each<T: TapIo + ?Sized>(tap: &T, iovs: &[IoVec], spans: &[Range<usize>], results: &mut Vec<io::Result<usize>>) {
    for span in spans {
        let result = tap.read_frame(&iovs[span.clone()]);
        let stop = !matches!(result, Ok(n) if n > 0);
        results.push(result);
        if stop {
            break;
        }
    }
}

/// Failures after which the frames behind this one are not tried: the tap is full or gone, or
/// the frame's memory could not be read.
pub fn ends_batch(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::EFAULT) || is_fatal_tap_error(e)
}

/// Errors after which the tap will never accept a frame again.
pub fn is_fatal_tap_error(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EBADF) | Some(libc::ENODEV) | Some(libc::ENXIO) | Some(libc::EBADFD) | Some(libc::EPIPE))
}

/// [`TapIo::write_batch`] as one `write_frame` per frame, stopping after a failure `stop` names.
pub(crate) fn write_each<T: TapIo + ?Sized>(
    tap: &T,
    iovs: &[IoVec],
    spans: &[Range<usize>],
    results: &mut Vec<io::Result<usize>>,
    stop: impl Fn(&io::Error) -> bool,
) {
    for span in spans {
        let result = tap.write_frame(&iovs[span.clone()]);
        let stop = result.as_ref().is_err_and(&stop);
        results.push(result);
        if stop {
            break;
        }
    }
}

/// A tap queue as a session and its worker use it: the worker polls its fd (readable when a frame
/// waits) and moves frames; the session attaches it while its pair runs, parks it when the pair
/// stops, and sets the header size and offloads the guest negotiated.
pub trait TapControl: TapIo + AsRawFd + Send + Sync + 'static {
    /// Attaches (true) or detaches (false) the queue; repeating the current state is no error.
    fn set_attached(&self, attached: bool) -> Result<(), TapError>;
    /// Detaches the queue and drops the frames waiting on it; returns how many.
    fn park(&self) -> Result<usize, TapError>;
    /// Sets the virtio_net_hdr length the queue reads and writes (10 or 12).
    fn set_vnet_hdr_len(&self, len: usize) -> Result<(), TapError>;
    /// Tells the queue which offloads (`TUN_F_*`) the guest copes with.
    fn set_offload(&self, flags: u32) -> Result<(), TapError>;
}

impl TapControl for TapQueue {
    fn set_attached(&self, attached: bool) -> Result<(), TapError> {
        TapQueue::set_attached(self, attached)
    }

    fn park(&self) -> Result<usize, TapError> {
        TapQueue::park(self)
    }

    fn set_vnet_hdr_len(&self, len: usize) -> Result<(), TapError> {
        TapQueue::set_vnet_hdr_len(self, len)
    }

    fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        TapQueue::set_offload(self, flags)
    }
}

/// The iovec count for the syscall. The loops never pass more than IOV_MAX (they refuse longer
/// chains); were they to, the kernel's EINVAL is the answer, never a silently cut frame.
fn iov_count(iovs: &[IoVec]) -> io::Result<libc::c_int> {
    libc::c_int::try_from(iovs.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

impl TapIo for TapQueue {
    fn write_batch(&self, iovs: &[IoVec], spans: &[Range<usize>], results: &mut Vec<io::Result<usize>>) {
        let mut done = 0;
        let mut ring = self.ring();
        while let Some(r) = ring.as_mut() {
            if done == spans.len() {
                return;
            }
            let chunk = &spans[done..spans.len().min(done + r.capacity())];
            let first = results.len();
            let outcome = r.write_batch(iovs, chunk, results);
            let wrote = results.len() - first;
            done += wrote;
            if let Err(e) = outcome {
                // What the ring wrote is in `results`; the rest goes by writev.
                warn!("tap queue fd {}: {e}; writing frames with writev from now on", self.as_raw_fd());
                *ring = None;
            }
            // A failed frame cancelled the ones behind it: they were not tried.
            let frame_failed = results[first..].last().is_some_and(|r| r.is_err());
            if frame_failed || (ring.is_some() && wrote < chunk.len()) {
                return;
            }
        }
        drop(ring);
        write_each(self, iovs, &spans[done..], results, ends_batch);
    }

    fn read_batch_capacity(&self) -> usize {
        self.ring().as_ref().filter(|r| r.reads_in_batches()).map_or(1, TapRing::capacity)
    }

    fn read_batch(&self, iovs: &[IoVec], spans: &[Range<usize>], results: &mut Vec<io::Result<usize>>) {
        let mut ring = self.ring();
        let Some(r) = ring.as_mut().filter(|r| r.reads_in_batches()) else {
            drop(ring);
            return read_each(self, iovs, spans, results);
        };
        if let Err(e) = r.read_batch(iovs, spans, results) {
            // The reads that went are in `results`; the next batch reads with readv.
            warn!("tap queue fd {}: {e}; reading frames with readv from now on", self.as_raw_fd());
            *ring = None;
        }
    }

    fn write_frame(&self, iovs: &[IoVec]) -> io::Result<usize> {
        let n = if let [only] = iovs {
            // A frame in one buffer (what a Linux guest posts for a linear skb, its header
            // pushed in front of the data) goes by `write`: `writev` would copy and check an
            // iovec array, which costs this path a tenth of its CPU per frame.
            // SAFETY: `only` describes memory valid for reads of its length while it is used
            // (IoVec's constructors' contract), and write only reads it.
            unsafe { libc::write(self.as_raw_fd(), only.as_ptr().cast(), only.len()) }
        } else {
            let count = iov_count(iovs)?;
            // SAFETY: `count` entries of `iovs` are passed; each describes memory valid for its
            // length while it is used (IoVec's constructors' contract), and writev only reads it.
            unsafe { libc::writev(self.as_raw_fd(), IoVec::as_iovecs(iovs), count) }
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn read_frame(&self, iovs: &[IoVec]) -> io::Result<usize> {
        let count = iov_count(iovs)?;
        // SAFETY: as above; readv writes at most each entry's length into it, and the memory
        // behind an IoVec is writable by contract.
        let n = unsafe { libc::readv(self.as_raw_fd(), IoVec::as_iovecs(iovs), count) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{pipe, read_all};
    use std::os::fd::OwnedFd;

    /// A pipe: the write end as a `TapQueue`, the read end to see what arrived.
    fn pipe_queue() -> (TapQueue, OwnedFd) {
        let (r, w) = pipe();
        (TapQueue::from_fd(w), r)
    }

    #[test]
    fn test_write_frame_sends_one_buffer_and_gathered_buffers_byte_for_byte() {
        let (q, r) = pipe_queue();
        let mut frame: Vec<u8> = (0..=255u8).cycle().take(1526).collect();
        // SAFETY: `frame` outlives the iovecs and nothing else touches it meanwhile.
        let one = unsafe { IoVec::from_raw_parts(frame.as_mut_ptr(), frame.len()) };
        assert_eq!(q.write_frame(&[one]).expect("one buffer"), 1526);
        assert_eq!(read_all(&r), frame);
        let (a, b) = frame.split_at_mut(12);
        let (b, c) = b.split_at_mut(700);
        // SAFETY: as above, three disjoint pieces of `frame`.
        let three = unsafe { [a, b, c].map(|s| IoVec::from_raw_parts(s.as_mut_ptr(), s.len())) };
        assert_eq!(q.write_frame(&three).expect("three buffers"), 1526);
        assert_eq!(read_all(&r), frame);
    }

    #[test]
    fn test_write_frame_returns_eagain_and_epipe_for_either_path() {
        let (q, r) = pipe_queue();
        let mut big = vec![7u8; 1 << 20];
        // SAFETY: `big` outlives the iovec.
        let one = unsafe { IoVec::from_raw_parts(big.as_mut_ptr(), big.len()) };
        // The pipe takes 64 KiB, then refuses: a partial write, then EAGAIN, never a block.
        assert!(q.write_frame(&[one]).expect("partial") < big.len());
        let e = q.write_frame(&[one, one]).expect_err("pipe full");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(ends_batch(&e));
        drop(r);
        let e = q.write_frame(&[one]).expect_err("reader gone");
        assert_eq!(e.raw_os_error(), Some(libc::EPIPE), "{e}");
        assert!(is_fatal_tap_error(&e));
    }
}
