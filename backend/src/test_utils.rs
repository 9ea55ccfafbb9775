//! Test helpers: guest memory, a mock split queue, and a scripted tap.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::chain_iov::{IoVec, IOV_MAX};
use crate::memory::GuestMem;
use crate::tap_io::TapIo;

/// Where the mock rings' data buffers start (rings live below it).
pub const DATA_BASE: u64 = 0x10_0000;

pub fn guest_memory() -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

/// Writes descriptors chained in order (NEXT set on all but the last) starting at table slot
/// `slot`, and makes the chain available.
pub fn add_chain(q: &MockSplitQueue<GuestMem>, slot: u16, bufs: &[(u64, u32, bool)]) {
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
pub fn repost_heads(q: &MockSplitQueue<GuestMem>, mem: &GuestMem, size: u16, heads: &[u16]) {
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
pub fn used_addr(q: &MockSplitQueue<GuestMem>, size: u16) -> u64 {
    (q.avail_addr().0 + 4 + 2 * u64::from(size) + 2).next_multiple_of(4)
}

pub fn queue(q: &MockSplitQueue<GuestMem>, event_idx: bool) -> Queue {
    let mut queue: Queue = q.create_queue().unwrap();
    let used = used_addr(q, queue.size());
    queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    queue.set_event_idx(event_idx);
    queue
}

/// The used ring's entries (id, len) up to its published index.
pub fn used_entries(q: &MockSplitQueue<GuestMem>, mem: &GuestMem, size: u16) -> Vec<(u32, u32)> {
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
    pub written: RefCell<Vec<Vec<u8>>>,
    pub write_script: RefCell<VecDeque<TapStep>>,
    pub read_script: RefCell<VecDeque<TapStep>>,
}

fn gather(iovs: &[IoVec]) -> Vec<u8> {
    let mut out = Vec::new();
    for iov in iovs {
        let start = out.len();
        out.resize(start + iov.len(), 0);
        iov.as_volatile_slice().copy_to(&mut out[start..]);
    }
    out
}

/// What the kernel answers to a readv/writev of more than IOV_MAX iovecs.
fn check_iov_max(iovs: &[IoVec]) -> io::Result<()> {
    if iovs.len() > IOV_MAX {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(())
}

impl TapIo for MockTap {
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

    fn read_frame(&self, iovs: &[IoVec]) -> io::Result<usize> {
        check_iov_max(iovs)?;
        match self.read_script.borrow_mut().pop_front() {
            None => Err(io::Error::from_raw_os_error(libc::EAGAIN)),
            Some(TapStep::Fail(errno)) => Err(io::Error::from_raw_os_error(errno)),
            Some(TapStep::Accept) => Ok(0),
            Some(TapStep::Frame(bytes)) => {
                // Like tun (measured): copy what fits, report only what was copied.
                let mut left = &bytes[..];
                for iov in iovs {
                    let n = left.len().min(iov.len());
                    iov.as_volatile_slice().copy_from(&left[..n]);
                    left = &left[n..];
                }
                Ok(bytes.len() - left.len())
            }
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
pub fn memfd_log(len: usize) -> (std::fs::File, crate::dirty_log::DirtyLog) {
    let name = std::ffi::CString::new("vutap-test-log").unwrap();
    // SAFETY: memfd_create with a valid name; the fd is owned by the File below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: `fd` is a fresh fd we own.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(len as u64).unwrap();
    let owner = crate::memory_guard::FaultOwner::new().unwrap();
    let log = crate::dirty_log::DirtyLog::map(&file, len as u64, 0, &owner).unwrap();
    (file, log)
}

/// Whether page `page` is marked in a log file's bitmap.
pub fn page_marked(file: &std::fs::File, page: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, page / 8).unwrap();
    b[0] & (1 << (page % 8)) != 0
}
