//! Guest memory: one memfd, mapped shared by the frontend and passed to the backend with
//! SET_MEM_TABLE. Guest-physical address `gpa` lives at `base + gpa - GPA_BASE` in our mapping,
//! and the backend maps the same pages, so writes on either side are seen by the other.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;

use vhost::VhostUserMemoryRegionInfo;

/// Guest-physical address of the first byte of guest memory (QEMU starts RAM at 0 too).
pub const GPA_BASE: u64 = 0;

/// Why guest memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memfd_create failed: {0}")]
    MemfdCreate(#[source] io::Error),
    #[error("sizing the memfd to {size} bytes failed: {source}")]
    Resize { size: usize, source: io::Error },
    #[error("mmap of {size} bytes failed: {source}")]
    Mmap { size: usize, source: io::Error },
}

/// A shared, file-backed guest memory region.
pub struct GuestMemory {
    file: File,
    base: NonNull<u8>,
    size: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value until Drop; all access goes
// through raw pointers whose users synchronise with the device via fences/atomics.
unsafe impl Send for GuestMemory {}
// SAFETY: as above; &GuestMemory only hands out addresses, never references into the memory.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Creates a zero-filled region of `size` bytes (rounded up to a page).
    pub fn new(size: usize) -> Result<Self, MemoryError> {
        let size = size.div_ceil(4096).max(1) * 4096;
        let name: &CStr = c"vutap-guest-mem";
        // SAFETY: name is a valid NUL-terminated string; flags are valid memfd flags.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::MemfdCreate(io::Error::last_os_error()));
        }
        // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64).map_err(|source| MemoryError::Resize { size, source })?;
        // SAFETY: mapping a fresh fd of `size` bytes at a kernel-chosen address; the result is
        // checked against MAP_FAILED before use.
        let ptr =
            unsafe { libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(MemoryError::Mmap { size, source: io::Error::last_os_error() });
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(MemoryError::Mmap { size, source: io::Error::from(io::ErrorKind::InvalidData) })?;
        Ok(Self { file, base, size })
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The region description for SET_MEM_TABLE. The fd stays owned by `self`.
    pub fn region_info(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: GPA_BASE,
            memory_size: self.size as u64,
            userspace_addr: self.base.as_ptr() as u64,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    /// Our (frontend) virtual address of `gpa`, as vring addresses are given in vhost-user.
    /// `None` if `gpa` is outside the region.
    pub fn user_addr(&self, gpa: u64) -> Option<u64> {
        self.ptr(gpa, 0).map(|p| p as u64)
    }

    /// Pointer to `len` bytes at `gpa`, or `None` if any of them are outside the region.
    pub fn ptr(&self, gpa: u64, len: usize) -> Option<*mut u8> {
        let off = usize::try_from(gpa.checked_sub(GPA_BASE)?).ok()?;
        if off.checked_add(len)? > self.size {
            return None;
        }
        // SAFETY: off + len <= size, so the result stays within (or one past) the mapping.
        Some(unsafe { self.base.as_ptr().add(off) })
    }

    /// Copies `data` into guest memory at `gpa`. Returns false (copying nothing) if out of range.
    pub fn write(&self, gpa: u64, data: &[u8]) -> bool {
        match self.ptr(gpa, data.len()) {
            Some(dst) => {
                // SAFETY: dst..dst+len is inside the mapping (checked by ptr); the source is a
                // Rust slice, which cannot overlap the mmap we own.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
                true
            }
            None => false,
        }
    }

    /// Copies guest memory at `gpa` into `out`. Returns false (copying nothing) if out of range.
    pub fn read(&self, gpa: u64, out: &mut [u8]) -> bool {
        match self.ptr(gpa, out.len()) {
            Some(src) => {
                // SAFETY: src..src+len is inside the mapping (checked by ptr); `out` is a Rust
                // slice, which cannot overlap the mmap we own.
                unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) };
                true
            }
            None => false,
        }
    }

    /// Appends `len` bytes at `gpa` to `out`. Returns false (appending nothing) if out of range.
    pub fn read_append(&self, gpa: u64, len: usize, out: &mut Vec<u8>) -> bool {
        let Some(src) = self.ptr(gpa, len) else {
            return false;
        };
        out.reserve(len);
        // SAFETY: src..src+len is inside the mapping; `out` has `len` spare bytes reserved and
        // does not overlap the mapping; set_len only covers bytes just initialised.
        unsafe {
            std::ptr::copy_nonoverlapping(src, out.as_mut_ptr().add(out.len()), len);
            out.set_len(out.len() + len);
        }
        true
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: base/size describe the mapping made in new(); nothing uses it after drop.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.size) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked() {
        let m = GuestMemory::new(5000).unwrap();
        assert_eq!(m.size(), 8192);
        assert!(m.write(8190, &[1, 2]));
        assert!(!m.write(8191, &[1, 2]));
        let mut b = [0u8; 2];
        assert!(m.read(8190, &mut b));
        assert_eq!(b, [1, 2]);
        assert_eq!(m.ptr(u64::MAX, 1), None);
        let mut v = vec![9];
        assert!(m.read_append(8190, 2, &mut v));
        assert_eq!(v, [9, 1, 2]);
    }
}
