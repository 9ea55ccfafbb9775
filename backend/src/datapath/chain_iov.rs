//! Turns a descriptor chain into host iovecs that point straight into guest memory, so frames
//! move between the tap and the guest with no copy. Every descriptor is checked (direction,
//! count, length, overflow) and every address resolved through the memory map: a chain that
//! points outside guest memory is rejected, never followed.

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{GuestAddress, GuestMemory, Permissions, VolatileSlice};
use vutap_virtio::{ChainCheck, ChainError, ChainLimits, Direction};

use crate::datapath::avail_chains::Chain;
use crate::datapath::flat_mem::FlatMem;

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

/// One buffer for `readv`/`writev`: a pointer and a length that are valid for reads and writes
/// for as long as the `IoVec` is used. The fields are private, so safe code can only get one
/// from [`collect_iovecs`] (checked guest-memory slices) or through the `unsafe`
/// [`IoVec::from_raw_parts`], whose contract the caller upholds; the safe
/// [`TapIo`](crate::datapath::tap_io::TapIo) calls then rely on that.
#[derive(Clone, Copy, Debug)]
#[repr(transparent)]
pub struct IoVec(libc::iovec);

// SAFETY: an IoVec is a pointer and a length into memory that stays valid while it is used (its
// constructors' contract), not tied to the thread that built it; the worker hands them to the
// kernel, which does not care which thread asks.
unsafe impl Send for IoVec {}

impl IoVec {
    /// # Safety
    ///
    /// `base..base + len` must stay valid for reads and writes (mapped, writable, not freed) for
    /// as long as this `IoVec` or a copy of it is used, and every other access to that memory
    /// meanwhile must be volatile or the kernel's (it is guest memory, or a buffer of ours that
    /// only the kernel touches while the `IoVec` is in use).
    pub unsafe fn from_raw_parts(base: *mut u8, len: usize) -> IoVec {
        IoVec(libc::iovec { iov_base: base.cast(), iov_len: len })
    }

    pub fn len(&self) -> usize {
        self.0.iov_len
    }

    pub fn is_empty(&self) -> bool {
        self.0.iov_len == 0
    }

    /// The buffer's start; dereferencing it is up to the caller (see [`IoVec`]).
    pub fn as_ptr(&self) -> *mut u8 {
        self.0.iov_base.cast()
    }

    /// The buffer as a vm-memory volatile slice, for bounds-checked volatile access.
    pub fn as_volatile_slice(&self) -> VolatileSlice<'_> {
        // SAFETY: the buffer is valid for reads and writes of its length while this IoVec is in
        // use, which covers this borrow, and is only ever accessed volatilely or by the kernel
        // (the constructors' contract).
        unsafe { VolatileSlice::new(self.as_ptr(), self.len()) }
    }

    /// The slice as the kernel's `readv`/`writev` take it (`IoVec` is `repr(transparent)`).
    pub fn as_iovecs(iovs: &[IoVec]) -> *const libc::iovec {
        iovs.as_ptr().cast()
    }

    /// Copies the first `n` bytes `iovs` describe, in order, into `out` (cleared first; fewer if
    /// they hold fewer).
    pub fn copy_out(iovs: &[IoVec], n: usize, out: &mut Vec<u8>) {
        out.clear();
        for iov in iovs {
            let take = (n - out.len()).min(iov.len());
            if take == 0 {
                break;
            }
            let start = out.len();
            out.resize(start + take, 0);
            iov.as_volatile_slice().subslice(0, take).map(|s| s.copy_to(&mut out[start..])).unwrap_or(0);
        }
    }
}

/// Appends the buffers of a chain's descriptors (a [`Chain`](crate::datapath::avail_chains::Chain)
/// or virtio-queue's `DescriptorChain`) to `iovs` (and, if asked, their guest-physical ranges to
/// `ranges`, for the dirty log) and returns the chain's byte count. A chain of more than
/// `max_segments` descriptors or iovecs is refused, which also bounds the walk of a hostile one.
/// On error both are restored to their lengths on entry.
///
/// # Safety
///
/// The appended iovecs point into `mem`'s mappings, with no lifetime to say so: the caller must
/// keep those mappings alive (hold `mem` or a clone of it) for as long as it uses them.
#[inline(always)]
unsafe fn collect_iovecs(
    chain: impl IntoIterator<Item = Descriptor>,
    mem: &FlatMem,
    direction: Direction,
    limits: ChainLimits,
    max_segments: usize,
    iovs: &mut Vec<IoVec>,
    mut ranges: Option<&mut Vec<(u64, u32)>>,
) -> Result<u32, BadChain> {
    let start = iovs.len();
    let ranges_start = ranges.as_ref().map_or(0, |r| r.len());
    // A block, not a closure or a call: inlined whole, the chain stays in registers (passed by
    // value through a call, its reload stalled once per chain in a profile).
    let result = 'walk: {
        let mut check = ChainCheck::new(direction, limits);
        let (mut count, mut open) = (0usize, false);
        for desc in chain {
            count += 1;
            open = desc.has_next();
            if let Err(e) = check.push(desc.len(), desc.is_write_only()) {
                break 'walk Err(e.into());
            }
            // SAFETY: our caller keeps `mem` mapped while it uses the iovecs (our own contract).
            if let Err(e) = unsafe { push_region_iovecs(mem, desc.addr(), desc.len(), iovs) } {
                break 'walk Err(e);
            }
            if count > max_segments || iovs.len() - start > max_segments {
                break 'walk Err(BadChain::TooManySegments { max: max_segments });
            }
            if let Some(r) = ranges.as_mut() {
                r.push((desc.addr().0, desc.len()));
            }
        }
        if open {
            break 'walk Err(BadChain::Truncated(count));
        }
        check.finish().map_err(BadChain::from)
    };
    if result.is_err() {
        iovs.truncate(start);
        if let Some(r) = ranges {
            r.truncate(ranges_start);
        }
    }
    result
}

/// [`collect_iovecs`] for a popped [`Chain`]. Each kind is walked by code of its own: walked
/// through the two-kind enum, a one-descriptor chain's descriptor went through the stack in
/// pieces whose reload stalled (a fifth of the worker's own RX code at 64 B, in a profile).
///
/// # Safety
///
/// As for [`collect_iovecs`].
#[inline(always)]
pub unsafe fn collect_chain_iovecs(
    chain: Chain<'_>,
    mem: &FlatMem,
    direction: Direction,
    limits: ChainLimits,
    max_segments: usize,
    iovs: &mut Vec<IoVec>,
    ranges: Option<&mut Vec<(u64, u32)>>,
) -> Result<u32, BadChain> {
    // SAFETY: our own contract, passed on.
    unsafe {
        match chain {
            Chain::Single(descriptor) => collect_iovecs(descriptor, mem, direction, limits, max_segments, iovs, ranges),
            Chain::Walked(walked) => collect_iovecs(walked, mem, direction, limits, max_segments, iovs, ranges),
        }
    }
}

/// Appends iovecs covering `addr..addr+len`, split where the range crosses memory regions.
///
/// # Safety
///
/// As for [`collect_iovecs`]: the caller keeps `mem`'s mappings alive while it uses the iovecs.
unsafe fn push_region_iovecs(mem: &FlatMem, addr: GuestAddress, len: u32, iovs: &mut Vec<IoVec>) -> Result<(), BadChain> {
    let outside = || BadChain::OutsideMemory { addr: addr.0, len };
    if len == 0 {
        return Ok(());
    }
    for slice in mem.get_slices(addr, len as usize, Permissions::ReadWrite).map_err(|_| outside())? {
        let slice = slice.map_err(|_| outside())?;
        // SAFETY: FlatMem checked that the slice lies inside one mapped region of `mem`; it
        // stays mapped as long as the caller keeps `mem` (this function's contract).
        // Guest memory is shared with the guest, so nothing relies on aliasing rules there.
        iovs.push(unsafe { IoVec::from_raw_parts(slice.ptr_guard_mut().as_ptr(), slice.len()) });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    /// Two adjacent 4 KiB regions, each filled with its own byte pattern.
    fn two_regions() -> FlatMem {
        let mem = FlatMem::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)]).unwrap();
        let pattern: Vec<u8> = (0..0x2000u32).map(|i| (i % 251) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(0)).unwrap();
        mem
    }

    fn bytes_of(iovs: &[IoVec]) -> Vec<u8> {
        let mut out = Vec::new();
        for iov in iovs {
            let mut buf = vec![0u8; iov.len()];
            iov.as_volatile_slice().copy_to(&mut buf[..]);
            out.extend_from_slice(&buf);
        }
        out
    }

    fn expected(addr: u64, len: usize) -> Vec<u8> {
        (addr..addr + len as u64).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn test_buffer_inside_one_region_is_one_iovec_over_its_bytes() {
        let mem = two_regions();
        let mut iovs = Vec::new();
        // SAFETY: `mem` outlives `iovs`.
        unsafe { push_region_iovecs(&mem, GuestAddress(0x1100), 0x200, &mut iovs) }.unwrap();
        assert_eq!(iovs.len(), 1);
        assert_eq!(bytes_of(&iovs), expected(0x1100, 0x200));
        // The last byte of a region is still inside it.
        iovs.clear();
        // SAFETY: as above.
        unsafe { push_region_iovecs(&mem, GuestAddress(0xfff), 1, &mut iovs) }.unwrap();
        assert_eq!((iovs.len(), bytes_of(&iovs)), (1, expected(0xfff, 1)));
    }

    #[test]
    fn test_buffer_across_regions_is_split_at_the_boundary() {
        let mem = two_regions();
        let mut iovs = Vec::new();
        // SAFETY: `mem` outlives `iovs`.
        unsafe { push_region_iovecs(&mem, GuestAddress(0xf00), 0x200, &mut iovs) }.unwrap();
        assert_eq!(iovs.iter().map(IoVec::len).collect::<Vec<_>>(), [0x100, 0x100]);
        assert_eq!(bytes_of(&iovs), expected(0xf00, 0x200));
    }

    #[test]
    fn test_buffer_past_memory_is_refused_and_empty_is_nothing() {
        let mem = two_regions();
        let mut iovs = Vec::new();
        for (addr, len) in [(0x1f00u64, 0x200u32), (0x2000, 1), (u64::MAX, 2)] {
            // SAFETY: `mem` outlives `iovs`.
            let r = unsafe { push_region_iovecs(&mem, GuestAddress(addr), len, &mut iovs) };
            assert!(matches!(r, Err(BadChain::OutsideMemory { .. })), "{addr:#x}+{len:#x}: {r:?}");
        }
        iovs.clear();
        // SAFETY: as above.
        unsafe { push_region_iovecs(&mem, GuestAddress(0x100), 0, &mut iovs) }.unwrap();
        assert!(iovs.is_empty());
    }
}
