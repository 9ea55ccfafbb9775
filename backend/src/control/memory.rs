//! Guest memory as the frontend shares it (SET_MEM_TABLE), and the VMM-address translation
//! SET_VRING_ADDR needs.

use std::fs::File;
use std::sync::Arc;

use thiserror::Error;
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap};

use crate::control::mapped_fd::{check_mappable, MappedFdError, ShrinkSeal};
use crate::control::memory_guard::{FaultOwner, GuardError, RangeGuard};

pub type GuestMem = GuestMemoryMmap<()>;
pub type GuestMemAtomic = GuestMemoryAtomic<GuestMem>;

/// The most regions a frontend may share (QEMU's limit for SET_MEM_TABLE is 8).
pub const MAX_REGIONS: usize = 8;

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("mem table has {regions} regions and {files} fds")]
    FdMismatch { regions: usize, files: usize },
    #[error("mem table has {0} regions, more than {MAX_REGIONS}")]
    TooManyRegions(usize),
    #[error("mmap of region {index} (gpa {gpa:#x}, {size} bytes) failed: {reason}")]
    Map { index: usize, gpa: u64, size: u64, reason: String },
    #[error("mem table regions overlap or are invalid: {0}")]
    Layout(String),
    #[error("VMM address {0:#x} is in no shared region")]
    UnknownVmmAddress(u64),
    #[error("region {index} (gpa {gpa:#x}): {source}")]
    BadFd {
        index: usize,
        gpa: u64,
        #[source]
        source: MappedFdError,
    },
    #[error("region {index}: {source}")]
    Guard {
        index: usize,
        #[source]
        source: GuardError,
    },
}

/// Where one region lives for the frontend (its user address) and for the guest (its GPA).
#[derive(Debug, Clone, Copy)]
struct AddrMapping {
    vmm_addr: u64,
    size: u64,
    gpa: u64,
}

/// One SET_MEM_TABLE entry and a dup of its fd.
#[derive(Debug)]
pub struct SharedRegion {
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    pub user_addr: u64,
    pub mmap_offset: u64,
    pub file: File,
}

/// The shared memory plus the table to translate the frontend's addresses.
#[derive(Debug, Clone)]
pub struct SharedMemory {
    pub mem: GuestMem,
    mappings: Vec<AddrMapping>,
    /// Whether each region's fd can still shrink (logged at SET_MEM_TABLE).
    pub seals: Vec<ShrinkSeal>,
    /// The regions' entries in the SIGBUS guard. Declared after `mem`: the ranges stay guarded
    /// until the last holder of the mapping lets go (workers hold a clone of both).
    pub guards: Arc<Vec<RangeGuard>>,
    /// The table as the frontend sent it, with a dup of each region's fd: what a live upgrade
    /// hands to the next process.
    pub regions: Arc<Vec<SharedRegion>>,
}

impl SharedMemory {
    /// Checks every region's fd (it must hold `mmap_offset + memory_size` bytes), maps it, and
    /// registers the mapping with `owner`'s SIGBUS guard. Any error leaves nothing mapped.
    pub fn map(regions: &[VhostUserMemoryRegion], files: Vec<File>, owner: &FaultOwner) -> Result<Self, MemoryError> {
        if regions.len() != files.len() {
            return Err(MemoryError::FdMismatch { regions: regions.len(), files: files.len() });
        }
        if regions.len() > MAX_REGIONS {
            return Err(MemoryError::TooManyRegions(regions.len()));
        }
        let mut seals = Vec::with_capacity(regions.len());
        for (index, (region, file)) in regions.iter().zip(&files).enumerate() {
            let seal = check_mappable(file, region.mmap_offset, region.memory_size).map_err(|source| MemoryError::BadFd {
                index,
                gpa: region.guest_phys_addr,
                source,
            })?;
            seals.push(seal);
        }
        let mut mapped = Vec::with_capacity(regions.len());
        let mut mappings = Vec::with_capacity(regions.len());
        let mut guards = Vec::with_capacity(regions.len());
        let mut kept = Vec::with_capacity(regions.len());
        for (index, (region, file)) in regions.iter().zip(files).enumerate() {
            let map_err = |reason: String| MemoryError::Map { index, gpa: region.guest_phys_addr, size: region.memory_size, reason };
            let dup = file.try_clone().map_err(|e| map_err(format!("cannot dup the fd: {e}")))?;
            kept.push(SharedRegion {
                guest_phys_addr: region.guest_phys_addr,
                memory_size: region.memory_size,
                user_addr: region.user_addr,
                mmap_offset: region.mmap_offset,
                file: dup,
            });
            let mmap = region.mmap_region(file).map_err(|e| map_err(e.to_string()))?;
            guards.push(owner.guard(mmap.as_ptr(), mmap.size()).map_err(|source| MemoryError::Guard { index, source })?);
            let guest_region = GuestRegionMmap::new(mmap, GuestAddress(region.guest_phys_addr))
                .ok_or_else(|| map_err("region wraps the address space".into()))?;
            mapped.push(guest_region);
            mappings.push(AddrMapping { vmm_addr: region.user_addr, size: region.memory_size, gpa: region.guest_phys_addr });
        }
        let mem = GuestMemoryMmap::from_regions(mapped).map_err(|e| MemoryError::Layout(e.to_string()))?;
        Ok(SharedMemory { mem, mappings, seals, guards: Arc::new(guards), regions: Arc::new(kept) })
    }

    /// The guest-physical address of a frontend (VMM) user address, as used by SET_VRING_ADDR.
    pub fn vmm_to_gpa(&self, vmm_addr: u64) -> Result<u64, MemoryError> {
        self.mappings
            .iter()
            .find(|m| vmm_addr >= m.vmm_addr && vmm_addr - m.vmm_addr < m.size)
            .map(|m| m.gpa + (vmm_addr - m.vmm_addr))
            .ok_or(MemoryError::UnknownVmmAddress(vmm_addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn memfd(len: u64) -> File {
        // SAFETY: memfd_create with a static NUL-terminated name; the fd is checked, then owned
        // by the File.
        let fd = unsafe { libc::memfd_create(c"vutap-memory-test".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create failed");
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        file
    }

    fn map_one(file_len: u64, size: u64, offset: u64) -> Result<SharedMemory, MemoryError> {
        let region = VhostUserMemoryRegion::new(0, size, 0x7f00_0000_0000, offset);
        SharedMemory::map(&[region], vec![memfd(file_len)], &FaultOwner::new().unwrap())
    }

    #[test]
    fn test_memory_region_past_end_of_file_is_refused() {
        // Found by the vhost_user fuzz target too: the ring read at queue start hit SIGBUS.
        let too_short = |r| matches!(r, Err(MemoryError::BadFd { source: MappedFdError::TooShort { .. }, .. }));
        assert!(too_short(map_one(0x1000, 0x2000, 0)));
        assert!(too_short(map_one(0x2000, 0x2000, 0x1000)));
        assert!(matches!(
            map_one(0x1000, u64::MAX - 0xfff, 0x1000),
            Err(MemoryError::BadFd { source: MappedFdError::Overflow { .. }, .. })
        ));
    }

    #[test]
    fn test_memory_region_inside_its_file_maps_and_translates() {
        let shared = map_one(0x3000, 0x2000, 0x1000).unwrap();
        assert_eq!(shared.vmm_to_gpa(0x7f00_0000_1234).unwrap(), 0x1234);
        assert!(matches!(shared.vmm_to_gpa(0x7f00_0000_2000), Err(MemoryError::UnknownVmmAddress(_))));
        let mut b = [0u8; 2];
        vm_memory::Bytes::read_slice(&shared.mem, &mut b, vm_memory::GuestAddress(0x1ffe)).unwrap();
        assert_eq!(b, [0, 0], "the last byte of the region is readable");
    }
}
