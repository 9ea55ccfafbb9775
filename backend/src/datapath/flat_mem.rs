//! Guest memory as the datapath reads it: the regions of a [`GuestMem`] flattened into one small
//! table of guest ranges and host addresses.
//!
//! Every ring access (avail index, avail entry, descriptor, used entry) and every buffer
//! translation goes through vm-memory's [`GuestMemory::get_slices`]. On a `GuestMemoryMmap` that
//! walks from the memory to its region list, through each region's `Arc` to its mapping, per
//! access: four or more times per frame, 4-5 % of a worker's CPU in a perf profile. The table
//! holds the same ranges inline, so a lookup touches one cache line. It implements vm-memory's
//! [`GuestMemory`] itself, so virtio-queue and vm-memory's `Bytes` run on it unchanged, with the
//! same checks: an access that is not wholly inside guest memory fails.

use std::iter::FusedIterator;

use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion, GuestMemoryResult, MemoryRegionAddress,
    Permissions, VolatileSlice,
};

use crate::control::memory::GuestMem;

/// One region: guest `start..end` mapped at `host`.
#[derive(Clone, Copy, Debug)]
struct FlatRegion {
    start: u64,
    /// Exclusive; never wraps (a region ending at 2^64 is refused when the table is built).
    end: u64,
    host: *mut u8,
}

/// A [`GuestMem`] and its regions' host addresses in one table.
#[derive(Clone, Debug)]
pub struct FlatMem {
    regions: Vec<FlatRegion>,
    /// Keeps the mappings the table points into alive.
    mem: GuestMem,
}

// SAFETY: the table's pointers are addresses inside `mem`'s mappings, which `mem` (Send + Sync)
// keeps alive; FlatMem hands them out only as volatile slices or iovecs, exactly as `mem` would.
unsafe impl Send for FlatMem {}
// SAFETY: as above; nothing in the table is mutated after it is built.
unsafe impl Sync for FlatMem {}

impl FlatMem {
    pub fn new(mem: GuestMem) -> FlatMem {
        let regions: Vec<FlatRegion> = mem
            .iter()
            .filter_map(|r| {
                let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
                let end = r.start_addr().0.checked_add(r.len())?;
                Some(FlatRegion { start: r.start_addr().0, end, host })
            })
            .collect();
        FlatMem { regions, mem }
    }

    /// Anonymous test memory over `ranges` (see `GuestMemoryMmap::from_ranges`).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn from_ranges(ranges: &[(GuestAddress, usize)]) -> Result<FlatMem, vm_memory::mmap::FromRangesError> {
        Ok(FlatMem::new(GuestMem::from_ranges(ranges)?))
    }

    /// The memory the table was built from.
    pub fn guest_mem(&self) -> &GuestMem {
        &self.mem
    }

    /// The host address of the `len` bytes from guest `addr`, if they lie inside one region:
    /// for what is read at every frame (a queue's avail ring and descriptor table), translated
    /// once per pass instead of at every access. Valid while this table (its mappings) lives.
    #[inline]
    pub fn host_range(&self, addr: u64, len: usize) -> Option<*mut u8> {
        let region = self.region_of(addr)?;
        let end = addr.checked_add(len as u64)?;
        // SAFETY: `addr - start` is inside the region's mapping (region_of), so the pointer stays
        // within the allocation `host` points into.
        (end <= region.end).then(|| unsafe { region.host.add((addr - region.start) as usize) })
    }

    /// The region holding `addr`.
    #[inline]
    fn region_of(&self, addr: u64) -> Option<&FlatRegion> {
        // A memory table has at most MAX_REGIONS (8) regions, QEMU's one or two (below and
        // above 4 GiB): a scan of a few inline entries beats a binary search.
        self.regions.iter().find(|r| r.start <= addr && addr < r.end)
    }
}

impl GuestMemory for FlatMem {
    type PhysicalMemory = GuestMem;
    type Bitmap = ();

    fn check_range(&self, addr: GuestAddress, count: usize, _access: Permissions) -> bool {
        FlatSlices { mem: self, addr: addr.0, count }.all(|s| s.is_ok())
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        _access: Permissions,
    ) -> GuestMemoryResult<impl GuestMemorySliceIterator<'a, ()>> {
        Ok(FlatSlices { mem: self, addr: addr.0, count })
    }

    fn physical_memory(&self) -> Option<&GuestMem> {
        Some(&self.mem)
    }
}

/// The slices covering `count` bytes from `addr`, one per region crossed; an error (and the
/// end) where the range leaves guest memory.
struct FlatSlices<'a> {
    mem: &'a FlatMem,
    addr: u64,
    count: usize,
}

impl<'a> Iterator for FlatSlices<'a> {
    type Item = GuestMemoryResult<VolatileSlice<'a>>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.count == 0 {
            return None;
        }
        let Some(region) = self.mem.region_of(self.addr) else {
            self.count = 0;
            return Some(Err(GuestMemoryError::InvalidGuestAddress(GuestAddress(self.addr))));
        };
        let offset = self.addr - region.start;
        // Fits in usize: it is at most `count`.
        let len = (self.count as u64).min(region.end - self.addr) as usize;
        // SAFETY: `addr..addr + len` lies inside the region, whose mapping `self.mem` keeps alive
        // for 'a; guest memory is only ever accessed volatilely (it is shared with the guest).
        let slice = unsafe { VolatileSlice::new(region.host.add(offset as usize), len) };
        self.count -= len;
        // Cannot wrap: addr + len <= region.end, which did not.
        self.addr += len as u64;
        Some(Ok(slice))
    }
}

impl FusedIterator for FlatSlices<'_> {}

impl<'a> GuestMemorySliceIterator<'a, ()> for FlatSlices<'a> {}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestMemoryBackend};

    use super::*;

    /// Regions at 0x1000 and 0x2000 (adjacent) and 0x10000, each with its own byte pattern.
    fn mem() -> (GuestMem, FlatMem) {
        let gm = GuestMem::from_ranges(&[(GuestAddress(0x1000), 0x1000), (GuestAddress(0x2000), 0x1000), (GuestAddress(0x10000), 0x1000)])
            .unwrap();
        for (base, fill) in [(0x1000u64, 1u8), (0x2000, 2), (0x10000, 3)] {
            let bytes: Vec<u8> = (0..0x1000u32).map(|i| fill.wrapping_mul(i as u8)).collect();
            gm.write_slice(&bytes, GuestAddress(base)).unwrap();
        }
        (gm.clone(), FlatMem::new(gm))
    }

    #[test]
    fn test_flat_mem_reads_what_the_mmap_reads_inside_and_across_regions() {
        let (gm, flat) = mem();
        for (addr, len) in [(0x1000u64, 16usize), (0x1ff8, 16), (0x2ff0, 16), (0x10000, 0x1000), (0x1800, 0x1800)] {
            let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
            gm.read_slice(&mut a, GuestAddress(addr)).unwrap();
            flat.read_slice(&mut b, GuestAddress(addr)).unwrap();
            assert_eq!(a, b, "{addr:#x}+{len}");
        }
        let x: u16 = flat.load(GuestAddress(0x1ffe), std::sync::atomic::Ordering::Acquire).unwrap();
        assert_eq!(x, gm.load::<u16>(GuestAddress(0x1ffe), std::sync::atomic::Ordering::Acquire).unwrap());
    }

    #[test]
    fn test_flat_mem_splits_at_region_boundaries() {
        let (_, flat) = mem();
        let lens: Vec<usize> = flat.get_slices(GuestAddress(0x1f00), 0x200, Permissions::Read).unwrap().map(|s| s.unwrap().len()).collect();
        assert_eq!(lens, [0x100, 0x100]);
    }

    #[test]
    fn test_flat_mem_refuses_what_leaves_guest_memory_like_the_mmap() {
        let (gm, flat) = mem();
        // Before the first region, across the gap after 0x3000, past the end, at the top.
        for (addr, len) in [(0x0u64, 4usize), (0xfff, 2), (0x2ffe, 4), (0x3000, 1), (0x10ffe, 4), (u64::MAX - 1, 4)] {
            let mut buf = vec![0u8; len];
            assert!(flat.read_slice(&mut buf, GuestAddress(addr)).is_err(), "{addr:#x}+{len}");
            assert!(gm.read_slice(&mut buf, GuestAddress(addr)).is_err(), "mmap {addr:#x}+{len}");
            assert!(!GuestMemory::check_range(&flat, GuestAddress(addr), len, Permissions::Read));
            assert!(flat.write_slice(&buf, GuestAddress(addr)).is_err());
        }
        assert!(GuestMemory::check_range(&flat, GuestAddress(0x1000), 0x2000, Permissions::Read));
        assert_eq!(GuestMemoryBackend::num_regions(flat.guest_mem()), 3);
    }

    #[test]
    fn test_flat_mem_writes_land_in_the_mapping() {
        let (gm, flat) = mem();
        flat.write_slice(&[0xaa; 32], GuestAddress(0x1ff0)).unwrap();
        let mut back = [0u8; 32];
        gm.read_slice(&mut back, GuestAddress(0x1ff0)).unwrap();
        assert_eq!(back, [0xaa; 32]);
    }
}
