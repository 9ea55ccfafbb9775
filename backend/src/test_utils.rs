//! Test helpers: guest memory, a mock split queue, and a scripted tap.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::datapath::chain_iov::{IoVec, IOV_MAX};
use crate::datapath::flat_mem::FlatMem;
use crate::datapath::tap_io::TapIo;

/// Where the mock rings' data buffers start (rings live below it).
pub const DATA_BASE: u64 = 0x10_0000;

pub fn guest_memory() -> FlatMem {
    FlatMem::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

/// Writes descriptors chained in order (NEXT set on all but the last) starting at table slot
/// `slot`, and makes the chain available.
pub fn add_chain(q: &MockSplitQueue<FlatMem>, slot: u16, bufs: &[(u64, u32, bool)]) {
    let descs: Vec<RawDescriptor> = bufs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, writable))| {
            let mut flags = if writable { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, slot + i as u16 + 1))
        })
        .collect();
    q.add_desc_chains(&descs, slot).unwrap();
}

/// Makes `heads` available again without writing descriptors, wrapping around the avail ring
/// (a driver re-posting heads, maybe ones the device has not returned yet).
pub fn repost_heads(q: &MockSplitQueue<FlatMem>, mem: &FlatMem, size: u16, heads: &[u16]) {
    let avail = q.avail_addr().0;
    let mut idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap();
    for h in heads {
        mem.write_obj(*h, GuestAddress(avail + 4 + 2 * u64::from(idx % size))).unwrap();
        idx = idx.wrapping_add(1);
    }
    mem.write_obj(idx, GuestAddress(avail + 2)).unwrap();
}

/// Where the used ring of a mock queue of `size` goes: right after the avail ring. virtio-queue's
/// mock puts it at `avail.end()`, computed as one byte per entry, so its used ring overlaps the
/// second half of the avail ring and tests that fill more than half a ring read garbage.
pub fn used_addr(q: &MockSplitQueue<FlatMem>, size: u16) -> u64 {
    (q.avail_addr().0 + 4 + 2 * u64::from(size) + 2).next_multiple_of(4)
}

pub fn queue(q: &MockSplitQueue<FlatMem>, event_idx: bool) -> Queue {
    let mut queue: Queue = q.create_queue().unwrap();
    let used = used_addr(q, queue.size());
    queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    queue.set_event_idx(event_idx);
    queue
}

/// The used ring's entries (id, len) up to its published index.
pub fn used_entries(q: &MockSplitQueue<FlatMem>, mem: &FlatMem, size: u16) -> Vec<(u32, u32)> {
    let base = used_addr(q, size);
    let idx: u16 = mem.read_obj(GuestAddress(base + 2)).unwrap();
    (0..idx)
        .map(|i| {
            let slot = base + 4 + u64::from(i % size) * 8;
            (mem.read_obj(GuestAddress(slot)).unwrap(), mem.read_obj(GuestAddress(slot + 4)).unwrap())
        })
        .collect()
}

/// What the scripted tap does on its next call.
#[derive(Debug)]
pub enum TapStep {
    /// Accept a write / deliver these bytes on read.
    Frame(Vec<u8>),
    Accept,
    Fail(i32),
}

/// A tap that records written frames and plays a script for reads and writes.
#[derive(Default)]
pub struct MockTap {
    /// Stop a batch at any failed frame, as the io_uring path's linked writes do (the default
    /// `writev` path goes on after a frame the tap refused).
    pub linked: std::cell::Cell<bool>,
    /// The number of frames in each `write_batch` call.
    pub batches: RefCell<Vec<usize>>,
    pub written: RefCell<Vec<Vec<u8>>>,
    pub write_script: RefCell<VecDeque<TapStep>>,
    pub read_script: RefCell<VecDeque<TapStep>>,
    /// Reads one `read_batch` call may take (0 or 1: frame by frame, as `readv`); above 1 every
    /// read of a batch is tried, as io_uring's unlinked reads are.
    pub read_batch_capacity: std::cell::Cell<usize>,
    /// The number of reads in each `read_batch` call.
    pub read_batches: RefCell<Vec<usize>>,
}

fn gather(iovs: &[IoVec]) -> Vec<u8> {
    let mut out = Vec::new();
    IoVec::copy_out(iovs, iovs.iter().map(IoVec::len).sum(), &mut out);
    out
}

/// A tap read of `bytes` into `iovs`: like tun (measured), it copies what fits and reports
/// only what was copied.
fn scatter(bytes: &[u8], iovs: &[IoVec]) -> usize {
    let mut left = bytes;
    for iov in iovs {
        let n = left.len().min(iov.len());
        iov.as_volatile_slice().copy_from(&left[..n]);
        left = &left[n..];
    }
    bytes.len() - left.len()
}

/// What the kernel answers to a readv/writev of more than IOV_MAX iovecs.
fn check_iov_max(iovs: &[IoVec]) -> io::Result<()> {
    if iovs.len() > IOV_MAX {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(())
}

impl TapIo for MockTap {
    fn write_batch(&self, iovs: &[IoVec], spans: &[std::ops::Range<usize>], results: &mut Vec<io::Result<usize>>) {
        self.batches.borrow_mut().push(spans.len());
        let linked = self.linked.get();
        crate::datapath::tap_io::write_each(self, iovs, spans, results, |e| linked || crate::datapath::tap_io::ends_batch(e));
    }

    fn write_frame(&self, iovs: &[IoVec]) -> io::Result<usize> {
        check_iov_max(iovs)?;
        match self.write_script.borrow_mut().pop_front().unwrap_or(TapStep::Accept) {
            TapStep::Fail(errno) => Err(io::Error::from_raw_os_error(errno)),
            _ => {
                let frame = gather(iovs);
                let n = frame.len();
                self.written.borrow_mut().push(frame);
                Ok(n)
            }
        }
    }

    fn read_batch_capacity(&self) -> usize {
        self.read_batch_capacity.get().max(1)
    }

    fn read_batch(&self, iovs: &[IoVec], spans: &[std::ops::Range<usize>], results: &mut Vec<io::Result<usize>>) {
        self.read_batches.borrow_mut().push(spans.len());
        if self.read_batch_capacity() == 1 {
            return crate::datapath::tap_io::read_each(self, iovs, spans, results);
        }
        results.extend(spans.iter().map(|span| self.read_frame(&iovs[span.clone()])));
    }

    fn read_frame(&self, iovs: &[IoVec]) -> io::Result<usize> {
        check_iov_max(iovs)?;
        match self.read_script.borrow_mut().pop_front() {
            None => Err(io::Error::from_raw_os_error(libc::EAGAIN)),
            Some(TapStep::Fail(errno)) => Err(io::Error::from_raw_os_error(errno)),
            Some(TapStep::Accept) => Ok(0),
            Some(TapStep::Frame(bytes)) => Ok(scatter(&bytes, iovs)),
        }
    }
}

/// A frame: a 12-byte header with `gso_type` marker then `len - 12` payload bytes of a pattern.
pub fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; len];
    for (i, b) in f.iter_mut().enumerate().skip(12) {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    f
}

/// A dirty log backed by a memfd of `len` bytes, plus the file to read the bitmap back.
pub fn memfd_log(len: usize) -> (std::fs::File, crate::datapath::dirty_log::DirtyLog) {
    let name = std::ffi::CString::new("vutap-test-log").unwrap();
    // SAFETY: memfd_create with a valid name; the fd is owned by the File below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: `fd` is a fresh fd we own.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(len as u64).unwrap();
    let owner = crate::control::memory_guard::FaultOwner::new().unwrap();
    let log = crate::datapath::dirty_log::DirtyLog::map(&file, len as u64, 0, &owner).unwrap();
    (file, log)
}

/// Whether page `page` is marked in a log file's bitmap.
pub fn page_marked(file: &std::fs::File, page: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, page / 8).unwrap();
    b[0] & (1 << (page % 8)) != 0
}

/// What a session did to a [`MockTapQueue`], and the frames on it.
#[derive(Debug, Default)]
pub struct MockQueueState {
    /// Every attach (true) and detach (false) in order.
    pub attach_log: Vec<bool>,
    pub attached: bool,
    pub parks: usize,
    pub vnet_hdr_len: Option<usize>,
    pub offload: Option<u32>,
    /// Frames the worker wrote (TX), header included.
    pub written: Vec<Vec<u8>>,
    /// Frames waiting for the worker to read (RX), header included.
    pub to_read: VecDeque<Vec<u8>>,
    /// Errnos the next writes fail with, one each.
    pub write_errors: VecDeque<i32>,
}

/// A tap queue for control-plane tests, shared by the test, the session and a worker thread.
/// Its fd (an eventfd) is readable while frames wait, like a tap queue's, so the worker's epoll
/// loop runs unchanged. A detached queue gets no frames, as with tun and macvtap.
pub struct MockTapQueue {
    readable: vmm_sys_util::eventfd::EventFd,
    state: std::sync::Mutex<MockQueueState>,
}

impl Default for MockTapQueue {
    fn default() -> Self {
        MockTapQueue {
            readable: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            state: std::sync::Mutex::new(MockQueueState::default()),
        }
    }
}

impl MockTapQueue {
    pub fn state(&self) -> std::sync::MutexGuard<'_, MockQueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A frame arrives from the network; false (and dropped) if the queue is detached.
    pub fn deliver(&self, frame: Vec<u8>) -> bool {
        let mut s = self.state();
        if !s.attached {
            return false;
        }
        s.to_read.push_back(frame);
        self.readable.write(1).expect("eventfd write");
        true
    }

    /// Makes the next write fail with `errno`.
    pub fn fail_next_write(&self, errno: i32) {
        self.state().write_errors.push_back(errno);
    }

    pub fn written(&self) -> Vec<Vec<u8>> {
        self.state().written.clone()
    }

    /// Empties the queue and clears its readability (with the state locked).
    fn drain(&self, s: &mut MockQueueState) -> usize {
        let n = s.to_read.len();
        s.to_read.clear();
        let _ = self.readable.read();
        n
    }
}

impl std::os::fd::AsRawFd for MockTapQueue {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.readable.as_raw_fd()
    }
}

impl TapIo for MockTapQueue {
    fn write_frame(&self, iovs: &[IoVec]) -> io::Result<usize> {
        check_iov_max(iovs)?;
        let mut s = self.state();
        if let Some(errno) = s.write_errors.pop_front() {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let frame = gather(iovs);
        let n = frame.len();
        s.written.push(frame);
        Ok(n)
    }

    fn read_frame(&self, iovs: &[IoVec]) -> io::Result<usize> {
        check_iov_max(iovs)?;
        let mut s = self.state();
        let Some(bytes) = s.to_read.pop_front() else { return Err(io::Error::from_raw_os_error(libc::EAGAIN)) };
        if s.to_read.is_empty() {
            let _ = self.readable.read();
        }
        Ok(scatter(&bytes, iovs))
    }
}

impl crate::datapath::tap_io::TapControl for MockTapQueue {
    fn set_attached(&self, attached: bool) -> Result<(), crate::tap::TapError> {
        let mut s = self.state();
        s.attach_log.push(attached);
        s.attached = attached;
        Ok(())
    }

    fn park(&self) -> Result<usize, crate::tap::TapError> {
        let mut s = self.state();
        s.attach_log.push(false);
        s.attached = false;
        s.parks += 1;
        Ok(self.drain(&mut s))
    }

    fn set_vnet_hdr_len(&self, len: usize) -> Result<(), crate::tap::TapError> {
        self.state().vnet_hdr_len = Some(len);
        Ok(())
    }

    fn set_offload(&self, flags: u32) -> Result<(), crate::tap::TapError> {
        self.state().offload = Some(flags);
        Ok(())
    }
}

/// A non-blocking pipe, (read end, write end): stands in for a tap queue where only the bytes
/// written matter.
pub fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array it is given.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe { (std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::os::fd::OwnedFd::from_raw_fd(fds[1])) }
}

/// What one read of `fd` returns (up to 1 MiB; empty when nothing waits).
pub fn read_all(fd: &std::os::fd::OwnedFd) -> Vec<u8> {
    use std::os::fd::AsRawFd;
    let mut out = vec![0u8; 1 << 20];
    // SAFETY: reading into a buffer we own, of the length we pass.
    let n = unsafe { libc::read(fd.as_raw_fd(), out.as_mut_ptr().cast(), out.len()) };
    out.truncate(n.max(0) as usize);
    out
}
