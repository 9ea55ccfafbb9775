//! `--io-uring`: the frames of one TX batch go to the tap in one `io_uring_enter` instead of one
//! `writev` each, and RX reads a run of frames in one `io_uring_enter` instead of one `readv` each.
//!
//! The ring is built where the tap queue is opened, before any thread is filtered: created
//! disabled, the tap queue registered as its only fixed file, then restricted to `WRITE`s,
//! `WRITEV`s and `READV`s on fixed files (no other opcode, no file descriptor of the process, no
//! further registration, no flag but `IO_LINK`) and only then enabled. A frame in one buffer goes
//! as a `WRITE`, which spares the kernel importing an iovec array per frame. A worker therefore
//! needs `io_uring_enter` and nothing else, and a worker taken over by a hostile guest can do with
//! the ring no more than move frames between its own tap and its own memory.
//!
//! The writes of a batch leave in ring order. While the tap may refuse a write (a limited send
//! buffer answers `EAGAIN` when full) they are linked, so the first that fails cancels the rest
//! and the TX loop puts their chains back, as with `writev`. A tap with an unlimited send buffer
//! never refuses for room, so its writes go unlinked and the kernel issues them one after the
//! other inside `io_uring_enter`, without the task work a link costs per write (about half of
//! io_uring's own time per frame). Should such a write be refused anyway while later ones went,
//! the refused frame is reported dropped (`ENOBUFS`), never sent twice or behind its followers.
//!
//! Reads go unlinked with `RWF_NOWAIT`: each takes the next frame waiting on the tap or answers
//! `EAGAIN` at once, and the kernel issues them in ring order, so the frames of the reads that
//! succeeded are in arrival order (a read after an `EAGAIN` may still get a frame that arrived
//! meanwhile; the RX loop keeps the order). A file without `RWF_NOWAIT` is read by `readv`.

use std::io;
use std::ops::Range;
use std::os::fd::RawFd;

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, types, IoUring};
use thiserror::Error;

use crate::datapath::chain_iov::IoVec;

#[derive(Debug, Error)]
pub enum TapRingError {
    #[error("io_uring_setup: {0}")]
    Setup(#[source] io::Error),
    #[error("io_uring: cannot register the tap queue as a fixed file: {0}")]
    RegisterFile(#[source] io::Error),
    #[error("io_uring: cannot restrict the ring to WRITE, WRITEV and READV: {0}")]
    Restrict(#[source] io::Error),
    #[error("io_uring: cannot enable the ring: {0}")]
    Enable(#[source] io::Error),
    #[error("io_uring: cannot probe the tap queue for RWF_NOWAIT: {0}")]
    Probe(#[source] io::Error),
}

/// The ring failed as a whole (not one write): the caller stops using it.
#[derive(Debug, Error)]
#[error("io_uring_enter: {0}")]
pub struct RingFailed(#[source] pub io::Error);

/// An io_uring that can only write frames to and read frames from one tap queue.
pub struct TapRing {
    ring: IoUring,
    /// `RWF_NOWAIT` on every write and read, if the file supports it. Without it io_uring
    /// answers a full (empty) file that supports non-blocking I/O by waiting for room (a frame):
    /// it ignores `O_NONBLOCK`, and the worker would sleep in `io_uring_enter` instead of serving
    /// the other direction.
    rw_flags: i32,
    /// Link the writes of a batch: the tap may refuse one for room (see the module docs).
    linked: bool,
}

impl std::fmt::Debug for TapRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapRing").field("entries", &self.ring.params().sq_entries()).finish()
    }
}

/// The fixed-file slot of the tap queue.
const TAP_SLOT: types::Fixed = types::Fixed(0);

impl TapRing {
    /// A ring of `entries` submissions (a TX batch's worth) bound to the tap queue `tap_fd`;
    /// `may_refuse`: the queue can answer `EAGAIN` (its send buffer is limited).
    pub fn new(tap_fd: RawFd, entries: u32, may_refuse: bool) -> Result<TapRing, TapRingError> {
        let ring = IoUring::builder()
            .setup_r_disabled()
            // Every write of a batch gets a completion even if one cannot be submitted, so
            // waiting for the batch's completions can never wait for one that will not come.
            .setup_submit_all()
            .build(entries)
            .map_err(TapRingError::Setup)?;
        let submitter = ring.submitter();
        submitter.register_files(&[tap_fd]).map_err(TapRingError::RegisterFile)?;
        let mut rules = [
            Restriction::sqe_op(opcode::Write::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_flags_allowed(squeue::Flags::IO_LINK.bits()),
            Restriction::sqe_flags_required(squeue::Flags::FIXED_FILE.bits()),
        ];
        submitter.register_restrictions(&mut rules).map_err(TapRingError::Restrict)?;
        submitter.register_enable_rings().map_err(TapRingError::Enable)?;
        let mut ring = TapRing { ring, rw_flags: libc::RWF_NOWAIT, linked: true };
        let probe = ring.probe_nowait().map_err(TapRingError::Probe)?;
        log::debug!(
            "io_uring for tap queue fd {tap_fd}: RWF_NOWAIT {}",
            if probe == Some(libc::EOPNOTSUPP) { "not supported" } else { "supported" }
        );
        if probe == Some(libc::EOPNOTSUPP) {
            // The file cannot take IOCB_NOWAIT; io_uring then honours O_NONBLOCK itself.
            ring.rw_flags = 0;
        }
        // Unlinked writes need RWF_NOWAIT: without it a refused write would be retried later,
        // behind the ones after it.
        ring.set_may_refuse(may_refuse);
        Ok(ring)
    }

    /// Whether the queue can refuse a write for room (its send buffer was limited or lifted).
    pub fn set_may_refuse(&mut self, may_refuse: bool) {
        self.linked = may_refuse || self.rw_flags == 0;
        log::debug!("io_uring: the writes of a batch {}", if self.linked { "are linked" } else { "go unlinked" });
    }

    /// Whether the writes of a batch are linked.
    pub fn links_writes(&self) -> bool {
        self.linked
    }

    /// Writes nothing with `RWF_NOWAIT` and returns the error, if any: EOPNOTSUPP says the file
    /// does not support it (checked before the write; an empty write sends no frame).
    fn probe_nowait(&mut self) -> io::Result<Option<i32>> {
        let entry = opcode::Writev::new(TAP_SLOT, std::ptr::null(), 0).rw_flags(self.rw_flags).build();
        // SAFETY: an empty iovec array; nothing is read.
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| io::Error::from_raw_os_error(libc::EBUSY))?;
        self.ring.submit_and_wait(1)?;
        let res = self.ring.completion().next().map_or(0, |c| c.result());
        Ok((res < 0).then_some(-res))
    }

    /// Whether reads may go through the ring: only with `RWF_NOWAIT`, without which a read of an
    /// empty queue would wait in `io_uring_enter` for the next frame (io_uring ignores
    /// `O_NONBLOCK` on a file that supports non-blocking reads).
    pub fn reads_in_batches(&self) -> bool {
        self.rw_flags != 0
    }

    /// How many frames one call may write or read.
    pub fn capacity(&self) -> usize {
        self.ring.params().sq_entries() as usize
    }

    /// Writes the frames `spans` cut out of `iovs` (at most [`capacity`](Self::capacity)) in
    /// order and appends one result per frame the kernel tried; a frame cancelled because an
    /// earlier one failed gets none. Returns only when every submitted write has completed, so
    /// the iovecs are not used after it returns.
    pub fn write_batch(&mut self, iovs: &[IoVec], spans: &[Range<usize>], results: &mut Vec<io::Result<usize>>) -> Result<(), RingFailed> {
        let n = spans.len().min(self.capacity());
        if n == 0 {
            return Ok(());
        }
        let first = results.len();
        {
            let mut sq = self.ring.submission();
            for (i, span) in spans[..n].iter().enumerate() {
                let mut entry = match &iovs[span.clone()] {
                    [only] => opcode::Write::new(TAP_SLOT, only.as_ptr(), only.len() as u32).rw_flags(self.rw_flags).build(),
                    frame => opcode::Writev::new(TAP_SLOT, IoVec::as_iovecs(frame), frame.len() as u32).rw_flags(self.rw_flags).build(),
                }
                .user_data(i as u64);
                if self.linked && i + 1 < n {
                    entry = entry.flags(squeue::Flags::IO_LINK);
                }
                // SAFETY: the iovecs and the memory they describe stay valid until every
                // completion is reaped below (IoVec's contract; the caller holds the memory for
                // this call); the queue has room (n <= its size, and it is empty between calls).
                unsafe { sq.push(&entry) }.map_err(|_| RingFailed(io::Error::from_raw_os_error(libc::EBUSY)))?;
            }
        }
        let submitted = self.submit_and_reap(n, results)?;
        // Writes after a failed one were cancelled, not tried.
        let tried = results[first..].iter().position(|r| r.as_ref().is_err_and(|e| e.raw_os_error() == Some(libc::ECANCELED)));
        if let Some(k) = tried {
            results.truncate(first + k);
        }
        if !self.linked {
            settle_unlinked(&mut results[first..]);
            if let Some(k) = results[first..].iter().position(|r| r.as_ref().is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock)) {
                // Nothing behind it went: those are untried, as with linked writes.
                results.truncate(first + k + 1);
            }
        }
        if submitted < n {
            // With SUBMIT_ALL only a failing ring submits fewer; its leftovers must never run.
            return Err(RingFailed(io::Error::other(format!("{submitted} of {n} writes submitted"))));
        }
        Ok(())
    }

    /// Reads one frame into each of the iovec runs `spans` cut out of `iovs` (at most
    /// [`capacity`](Self::capacity)), in ring order, and appends one result per read: every read
    /// is tried, and one that found the tap empty answers `EAGAIN`. Returns only when every read
    /// has completed, so the iovecs are not used after it returns.
    pub fn read_batch(&mut self, iovs: &[IoVec], spans: &[Range<usize>], results: &mut Vec<io::Result<usize>>) -> Result<(), RingFailed> {
        let n = spans.len().min(self.capacity());
        if n == 0 {
            return Ok(());
        }
        {
            let mut sq = self.ring.submission();
            for (i, span) in spans[..n].iter().enumerate() {
                let frame = &iovs[span.clone()];
                let entry = opcode::Readv::new(TAP_SLOT, IoVec::as_iovecs(frame), frame.len() as u32)
                    .rw_flags(self.rw_flags)
                    .build()
                    .user_data(i as u64);
                // SAFETY: the iovecs and the memory they describe stay valid and writable until
                // every completion is reaped below (IoVec's contract; the caller holds the memory
                // for this call); the queue has room (n <= its size, and it is empty between calls).
                unsafe { sq.push(&entry) }.map_err(|_| RingFailed(io::Error::from_raw_os_error(libc::EBUSY)))?;
            }
        }
        let first = results.len();
        let submitted = self.submit_and_reap(n, results)?;
        if submitted < n {
            // The reads that were not submitted were not tried.
            results.truncate(first + submitted);
            return Err(RingFailed(io::Error::other(format!("{submitted} of {n} reads submitted"))));
        }
        Ok(())
    }

    /// Submits the `n` queued entries (their `user_data` is their index among them) and waits
    /// for every one submitted to complete, appending one result per entry to `results` (an
    /// entry that did not complete stays `ECANCELED`). Returns how many were submitted.
    fn submit_and_reap(&mut self, n: usize, results: &mut Vec<io::Result<usize>>) -> Result<usize, RingFailed> {
        let first = results.len();
        results.extend((0..n).map(|_| Err(io::Error::from_raw_os_error(libc::ECANCELED))));
        let results = &mut results[first..];
        let submitted = loop {
            match self.ring.submit() {
                Ok(s) => break s,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(RingFailed(e)),
            }
        };
        let mut reaped = 0;
        while reaped < submitted {
            for cqe in self.ring.completion() {
                if let Some(slot) = results.get_mut(cqe.user_data() as usize) {
                    let res = cqe.result();
                    *slot = if res < 0 { Err(io::Error::from_raw_os_error(-res)) } else { Ok(res as usize) };
                }
                reaped += 1;
            }
            if reaped < submitted {
                match self.ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(e) => return Err(RingFailed(e)),
                }
            }
        }
        Ok(submitted)
    }
}

/// Unlinked writes run even after one was refused: a refused frame with a written one behind
/// it cannot go again without leaving out of order, so it is reported dropped.
fn settle_unlinked(results: &mut [io::Result<usize>]) {
    let Some(last_ok) = results.iter().rposition(|r| r.is_ok()) else { return };
    for r in &mut results[..last_ok] {
        if r.as_ref().is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock) {
            *r = Err(io::Error::from_raw_os_error(libc::ENOBUFS));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    // A pipe stands in for the tap queue: the ring does not care what it writes to.
    use crate::test_utils::{pipe, read_all};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// The buffers as frames, the odd ones in two iovecs (WRITEV) and the even ones in one
    /// (WRITE), and the spans that cut them out.
    fn frames(bufs: &mut [Vec<u8>]) -> (Vec<IoVec>, Vec<Range<usize>>) {
        let mut iovs = Vec::new();
        let mut spans = Vec::new();
        for (i, b) in bufs.iter_mut().enumerate() {
            let half = if i % 2 == 1 { b.len() / 2 } else { b.len() };
            let start = iovs.len();
            // SAFETY: the buffers outlive the iovecs (both live until the test ends) and only
            // the kernel touches them meanwhile.
            unsafe {
                iovs.push(IoVec::from_raw_parts(b.as_mut_ptr(), half));
                if half < b.len() {
                    iovs.push(IoVec::from_raw_parts(b.as_mut_ptr().add(half), b.len() - half));
                }
            }
            spans.push(start..iovs.len());
        }
        (iovs, spans)
    }

    #[test]
    fn test_ring_writes_a_batch_in_order_in_one_call() {
        for may_refuse in [true, false] {
            writes_a_batch_in_order(may_refuse);
        }
    }

    fn writes_a_batch_in_order(may_refuse: bool) {
        let (rd, wr) = pipe();
        let mut ring = TapRing::new(wr.as_raw_fd(), 8, may_refuse).expect("io_uring");
        assert_eq!(ring.linked, may_refuse, "a pipe takes RWF_NOWAIT: links only where writes may be refused");
        let mut bufs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 100 + usize::from(i)]).collect();
        let (iovs, spans) = frames(&mut bufs);
        assert_eq!(spans.iter().map(|s| s.len()).collect::<Vec<_>>(), vec![1, 2, 1, 2, 1], "WRITEs and WRITEVs mixed");
        let mut results = Vec::new();
        ring.write_batch(&iovs, &spans, &mut results).expect("ring works");
        let lens: Vec<usize> = results.into_iter().map(|r| r.expect("written")).collect();
        assert_eq!(lens, vec![100, 101, 102, 103, 104]);
        assert_eq!(read_all(&rd), bufs.concat(), "byte for byte, in order");
    }

    /// A pipe of one page (the kernel rounds up to it).
    fn small_pipe() -> (OwnedFd, OwnedFd, usize) {
        let (rd, wr) = pipe();
        // SAFETY: F_SETPIPE_SZ on our own pipe.
        let size = unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
        assert!(size >= 4096, "pipe size {size}");
        (rd, wr, size as usize)
    }

    #[test]
    fn test_ring_failed_write_leaves_the_ones_behind_it_untried() {
        for may_refuse in [true, false] {
            failed_write_leaves_the_rest_untried(may_refuse);
        }
    }

    // A pipe full after two frames: the third fails with EAGAIN and the rest are not tried
    // (linked: cancelled; unlinked: refused too, so reported untried and sent later in order).
    fn failed_write_leaves_the_rest_untried(may_refuse: bool) {
        let (rd, wr, size) = small_pipe();
        let mut ring = TapRing::new(wr.as_raw_fd(), 8, may_refuse).expect("io_uring");
        let frame_len = size / 2;
        let mut bufs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; frame_len]).collect();
        let (iovs, spans) = frames(&mut bufs);
        let mut results = Vec::new();
        ring.write_batch(&iovs, &spans, &mut results).expect("ring works");
        assert_eq!(results.len(), 3, "two written, one failed, two not tried: {results:?}");
        assert!(results[..2].iter().all(|r| r.as_ref().is_ok_and(|&n| n == frame_len)));
        assert_eq!(results[2].as_ref().unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert_eq!(read_all(&rd), bufs[..2].concat());
        // Room again: the untried frames go through the same ring.
        let mut rest = Vec::new();
        ring.write_batch(&iovs, &spans[2..], &mut rest).expect("ring works");
        assert_eq!(rest.len(), 3, "{rest:?}");
        assert!(rest[..2].iter().all(|r| r.is_ok()) && rest[2].is_err());
        assert_eq!(read_all(&rd), bufs[2..4].concat());
    }

    /// A datagram socket pair stands in for a tap queue that reads one frame per read.
    fn datagram_pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two fds into `fds`, which we then own.
        let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK, 0, fds.as_mut_ptr()) };
        assert_eq!(r, 0, "socketpair: {}", io::Error::last_os_error());
        // SAFETY: both fds are fresh and ours.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn test_ring_reads_one_frame_per_read_in_order_and_eagain_when_empty() {
        let (mine, peer) = datagram_pair();
        let mut ring = TapRing::new(mine.as_raw_fd(), 8, false).expect("io_uring");
        assert!(ring.reads_in_batches(), "a socket takes RWF_NOWAIT");
        let sent: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i + 1; 100 + 50 * usize::from(i)]).collect();
        for f in &sent {
            // SAFETY: sends `f`, which outlives the call.
            assert_eq!(unsafe { libc::send(peer.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) }, f.len() as isize);
        }
        // Five reads, each into a 64-byte buffer and a 1000-byte tail (two iovecs).
        let mut bufs: Vec<Vec<u8>> = (0..5).flat_map(|_| [vec![0u8; 64], vec![0u8; 1000]]).collect();
        // SAFETY: the buffers outlive the iovecs and only the kernel writes them meanwhile.
        let iovs: Vec<IoVec> = bufs.iter_mut().map(|b| unsafe { IoVec::from_raw_parts(b.as_mut_ptr(), b.len()) }).collect();
        let spans: Vec<Range<usize>> = (0..5).map(|i| 2 * i..2 * i + 2).collect();
        let mut results = Vec::new();
        ring.read_batch(&iovs, &spans, &mut results).expect("ring works");
        let got: Vec<Result<usize, Option<i32>>> = results.iter().map(|r| r.as_ref().map(|n| *n).map_err(|e| e.raw_os_error())).collect();
        assert_eq!(got, vec![Ok(100), Ok(150), Ok(200), Err(Some(libc::EAGAIN)), Err(Some(libc::EAGAIN))], "every read tried, none waited");
        for (i, f) in sent.iter().enumerate() {
            let read: Vec<u8> = [&bufs[2 * i][..], &bufs[2 * i + 1][..]].concat();
            assert_eq!(&read[..f.len()], &f[..], "frame {i} byte for byte, in order");
        }
    }

    #[test]
    fn test_ring_refuses_anything_but_reads_and_writes_of_its_fixed_file() {
        let (rd, wr) = pipe();
        let mut ring = TapRing::new(wr.as_raw_fd(), 8, true).expect("io_uring");
        let mut buf = [0u8; 16];
        // A read of the pipe by its fd number, a READ (not READV) of the fixed file, a readv of
        // the pipe by its fd number, and a writev and a write not on the fixed file: all refused.
        let read = opcode::Read::new(types::Fd(rd.as_raw_fd()), buf.as_mut_ptr(), 16).build().user_data(1);
        let read_fixed = opcode::Read::new(TAP_SLOT, buf.as_mut_ptr(), 16).build().user_data(2);
        let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: 16 };
        let readv = opcode::Readv::new(types::Fd(rd.as_raw_fd()), &iov, 1).build().user_data(3);
        let writev = opcode::Writev::new(types::Fd(wr.as_raw_fd()), &iov, 1).build().user_data(4);
        let write = opcode::Write::new(types::Fd(wr.as_raw_fd()), buf.as_ptr(), 16).build().user_data(5);
        // SAFETY: the buffers outlive the wait below.
        unsafe {
            for e in [&read, &read_fixed, &readv, &writev, &write] {
                ring.ring.submission().push(e).unwrap();
            }
        }
        ring.ring.submit_and_wait(5).expect("io_uring_enter");
        let mut codes: Vec<(u64, i32)> = ring.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        codes.sort();
        assert_eq!(codes, (1..=5).map(|i| (i, -libc::EACCES)).collect::<Vec<_>>());
        assert!(read_all(&rd).is_empty());
        // Registering more files is refused too.
        assert!(ring.ring.submitter().register_files(&[rd.as_raw_fd()]).is_err());
    }

    #[test]
    fn test_unlinked_refused_frame_with_a_written_one_behind_it_is_dropped_not_resent() {
        // 3000 B fit, 2000 B do not (a pipe write up to a page is all or nothing), 500 B fit:
        // unlinked, the third went before the second could; the second is reported dropped.
        let (rd, wr, size) = small_pipe();
        assert_eq!(size, 4096);
        let mut ring = TapRing::new(wr.as_raw_fd(), 8, false).expect("io_uring");
        let mut bufs: Vec<Vec<u8>> = [(1u8, 3000), (2, 2000), (3, 500)].map(|(b, n)| vec![b; n]).to_vec();
        let (iovs, spans) = frames(&mut bufs);
        let mut results = Vec::new();
        ring.write_batch(&iovs, &spans, &mut results).expect("ring works");
        assert_eq!(results.len(), 3, "{results:?}");
        assert_eq!(results[0].as_ref().ok(), Some(&3000));
        assert_eq!(results[1].as_ref().unwrap_err().raw_os_error(), Some(libc::ENOBUFS), "{results:?}");
        assert_eq!(results[2].as_ref().ok(), Some(&500));
        assert_eq!(read_all(&rd), [bufs[0].clone(), bufs[2].clone()].concat());
    }

    #[test]
    fn test_a_limited_send_buffer_links_the_writes_again() {
        let (_rd, wr) = pipe();
        let mut ring = TapRing::new(wr.as_raw_fd(), 4, false).expect("io_uring");
        assert!(!ring.linked);
        ring.set_may_refuse(true);
        assert!(ring.linked);
        ring.rw_flags = 0;
        ring.set_may_refuse(false);
        assert!(ring.linked, "without RWF_NOWAIT a refused write would be retried behind the others");
        assert!(!ring.reads_in_batches(), "without RWF_NOWAIT a read of an empty queue would wait for a frame");
    }

    #[test]
    fn test_settle_unlinked_drops_only_refusals_with_a_written_frame_behind() {
        let eagain = || Err(io::Error::from_raw_os_error(libc::EAGAIN));
        let mut r: Vec<io::Result<usize>> = vec![Ok(1), eagain(), Err(io::Error::from_raw_os_error(libc::EINVAL)), Ok(2), eagain()];
        settle_unlinked(&mut r);
        let codes: Vec<Option<i32>> = r.iter().map(|r| r.as_ref().err().and_then(|e| e.raw_os_error())).collect();
        assert_eq!(codes, vec![None, Some(libc::ENOBUFS), Some(libc::EINVAL), None, Some(libc::EAGAIN)]);
    }
}
