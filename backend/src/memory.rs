//! Guest memory as the frontend shares it (SET_MEM_TABLE), and the VMM-address translation
//! SET_VRING_ADDR needs.

use std::fs::File;

use thiserror::Error;
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap};

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
    #[error("region {index} (gpa {gpa:#x}): {size} bytes at file offset {offset} run past the end of its {file_len}-byte file")]
    PastEndOfFile { index: usize, gpa: u64, size: u64, offset: u64, file_len: u64 },
}

/// The length of `file` if it is a regular file (memfd, tmpfs, hugetlbfs), whose pages past the
/// end raise SIGBUS when touched through a mapping; None for other kinds, which have no such
/// end to check.
pub fn regular_file_len(file: &File) -> std::io::Result<Option<u64>> {
    let meta = file.metadata()?;
    Ok(meta.file_type().is_file().then_some(meta.len()))
}

/// Whether `size` bytes at `offset` lie inside a file of `file_len` bytes.
pub fn range_in_file(offset: u64, size: u64, file_len: u64) -> bool {
    offset.checked_add(size).is_some_and(|end| end <= file_len)
}

/// Where one region lives for the frontend (its user address) and for the guest (its GPA).
#[derive(Debug, Clone, Copy)]
struct AddrMapping {
    vmm_addr: u64,
    size: u64,
    gpa: u64,
}

/// The shared memory plus the table to translate the frontend's addresses.
#[derive(Debug, Clone)]
pub struct SharedMemory {
    pub mem: GuestMem,
    mappings: Vec<AddrMapping>,
}

impl SharedMemory {
    /// Maps every region's fd. Any error leaves nothing mapped.
    pub fn map(regions: &[VhostUserMemoryRegion], files: Vec<File>) -> Result<Self, MemoryError> {
        if regions.len() != files.len() {
            return Err(MemoryError::FdMismatch { regions: regions.len(), files: files.len() });
        }
        if regions.len() > MAX_REGIONS {
            return Err(MemoryError::TooManyRegions(regions.len()));
        }
        let mut mapped = Vec::with_capacity(regions.len());
        let mut mappings = Vec::with_capacity(regions.len());
        for (index, (region, file)) in regions.iter().zip(files).enumerate() {
            let map_err = |reason: String| MemoryError::Map {
                index,
                gpa: region.guest_phys_addr,
                size: region.memory_size,
                reason,
            };
            // mmap succeeds past the end of a file; the first touch there (a ring read in the
            // control thread, a buffer in a worker) would kill the whole daemon with SIGBUS.
            if let Some(file_len) = regular_file_len(&file).map_err(|e| map_err(format!("fstat: {e}")))? {
                if !range_in_file(region.mmap_offset, region.memory_size, file_len) {
                    return Err(MemoryError::PastEndOfFile {
                        index,
                        gpa: region.guest_phys_addr,
                        size: region.memory_size,
                        offset: region.mmap_offset,
                        file_len,
                    });
                }
            }
            let mmap = region.mmap_region(file).map_err(|e| map_err(e.to_string()))?;
            let guest_region = GuestRegionMmap::new(mmap, GuestAddress(region.guest_phys_addr))
                .ok_or_else(|| map_err("region wraps the address space".into()))?;
            mapped.push(guest_region);
            mappings.push(AddrMapping { vmm_addr: region.user_addr, size: region.memory_size, gpa: region.guest_phys_addr });
        }
        let mem = GuestMemoryMmap::from_regions(mapped).map_err(|e| MemoryError::Layout(e.to_string()))?;
        Ok(SharedMemory { mem, mappings })
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
        SharedMemory::map(&[region], vec![memfd(file_len)])
    }

    #[test]
    fn test_memory_region_past_end_of_file_is_refused() {
        // Found by the vhost_user fuzz target: the ring read at queue start hit SIGBUS.
        assert!(matches!(map_one(0x1000, 0x2000, 0), Err(MemoryError::PastEndOfFile { file_len: 0x1000, .. })));
        assert!(matches!(map_one(0x2000, 0x2000, 0x1000), Err(MemoryError::PastEndOfFile { offset: 0x1000, .. })));
        assert!(matches!(map_one(0x1000, u64::MAX - 0xfff, 0x1000), Err(MemoryError::PastEndOfFile { .. })));
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
