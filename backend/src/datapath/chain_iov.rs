//! Turns a descriptor chain into host iovecs that point straight into guest memory, so frames
//! move between the tap and the guest with no copy. Every descriptor is checked (direction,
//! count, length, overflow) and every address resolved through the memory map: a chain that
//! points outside guest memory is rejected, never followed.

use std::ops::Deref;

use thiserror::Error;
use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vutap_virtio::{ChainCheck, ChainError, ChainLimits, Direction};

use crate::control::memory::GuestMem;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BadChain {
    #[error(transparent)]
    Shape(#[from] ChainError),
    #[error("descriptor {addr:#x}+{len} is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    /// The walk stopped at a descriptor that still had NEXT set: a loop or a chain longer than
    /// the queue (virtio-queue's TTL ran out), a `next` index outside the table, an unreadable
    /// or invalid (odd length, nested) indirect table, or a length sum past u32. virtio-queue's
    /// iterator just ends there, which would make the chain look shorter than it is.
    #[error("chain cut short after {0} descriptors (loop, longer than the queue, bad next index, bad indirect table or length overflow)")]
    Truncated(usize),
    /// More descriptors, or iovecs (a descriptor crossing a memory region takes two), than one
    /// `readv`/`writev` takes: the kernel would refuse the call, or a clamp would cut the frame.
    #[error("chain has more than {max} segments (one readv/writev takes at most {IOV_MAX})")]
    TooManySegments { max: usize },
}

/// The most iovecs one `readv`/`writev` takes (Linux UIO_MAXIOV).
pub const IOV_MAX: usize = 1024;

/// A raw `iovec`, sendable between our own threads: it only ever points into guest memory that
/// outlives the batch using it.
#[derive(Clone, Copy, Debug)]
#[repr(transparent)]
pub struct IoVec(pub libc::iovec);

// SAFETY: an IoVec is plain data (pointer + length); the worker that builds it is the only user.
unsafe impl Send for IoVec {}

impl IoVec {
    pub fn len(&self) -> usize {
        self.0.iov_len
    }
    pub fn is_empty(&self) -> bool {
        self.0.iov_len == 0
    }
    pub fn base(&self) -> *mut u8 {
        self.0.iov_base as *mut u8
    }
}

/// Appends the chain's buffers to `iovs` (and, if asked, their guest-physical ranges to
/// `ranges`, for the dirty log) and returns the chain's byte count. A chain of more than
/// `max_segments` descriptors or iovecs is refused, which also bounds the walk of a hostile one.
/// On error both are restored to their lengths on entry.
pub fn collect_iovecs<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMem,
    direction: Direction,
    limits: ChainLimits,
    max_segments: usize,
    iovs: &mut Vec<IoVec>,
    mut ranges: Option<&mut Vec<(u64, u32)>>,
) -> Result<u32, BadChain>
where
    M: Deref<Target = GuestMem>,
{
    let start = iovs.len();
    let ranges_start = ranges.as_ref().map_or(0, |r| r.len());
    let result = (|| {
        let mut check = ChainCheck::new(direction, limits);
        let (mut count, mut open) = (0usize, false);
        for desc in chain {
            count += 1;
            open = desc.has_next();
            check.push(desc.len(), desc.is_write_only())?;
            push_region_iovecs(mem, desc.addr(), desc.len(), iovs)?;
            if count > max_segments || iovs.len() - start > max_segments {
                return Err(BadChain::TooManySegments { max: max_segments });
            }
            if let Some(r) = ranges.as_mut() {
                r.push((desc.addr().0, desc.len()));
            }
        }
        if open {
            return Err(BadChain::Truncated(count));
        }
        Ok(check.finish()?)
    })();
    if result.is_err() {
        iovs.truncate(start);
        if let Some(r) = ranges {
            r.truncate(ranges_start);
        }
    }
    result
}

/// Appends iovecs covering `addr..addr+len`, split where the range crosses memory regions.
fn push_region_iovecs(mem: &GuestMem, addr: GuestAddress, len: u32, iovs: &mut Vec<IoVec>) -> Result<(), BadChain> {
    let outside = || BadChain::OutsideMemory { addr: addr.0, len };
    if len == 0 {
        return Ok(());
    }
    for slice in GuestMemoryBackend::get_slices(mem, addr, len as usize) {
        let slice = slice.map_err(|_| outside())?;
        iovs.push(IoVec(libc::iovec { iov_base: slice.ptr_guard_mut().as_ptr() as *mut libc::c_void, iov_len: slice.len() }));
    }
    Ok(())
}

/// Copies `bytes` into the buffers of `iovs` starting `offset` bytes in (used to write
/// `num_buffers`, which may straddle two buffers in a hostile layout). Returns false if the
/// buffers are too short.
pub fn write_at(iovs: &[IoVec], mut offset: usize, bytes: &[u8]) -> bool {
    let mut src = bytes;
    for iov in iovs {
        if src.is_empty() {
            break;
        }
        if offset >= iov.len() {
            offset -= iov.len();
            continue;
        }
        let n = (iov.len() - offset).min(src.len());
        // SAFETY: `iov` points into mapped guest memory of at least `iov.len()` bytes (built by
        // `collect_iovecs` from a checked slice); `offset + n <= iov.len()`, so the copy stays
        // inside it. Guest memory may be written concurrently by the guest, which is why the
        // ring protocol, not Rust aliasing, orders these accesses.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), iov.base().add(offset), n) };
        src = &src[n..];
        offset = 0;
    }
    src.is_empty()
}
