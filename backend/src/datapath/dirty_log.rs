//! The vhost-user dirty-page log for live migration (VHOST_F_LOG_ALL + SET_LOG_BASE with
//! LOG_SHMFD): a bitmap shared with the frontend, one bit per 4 KiB guest page. While logging
//! is on, every guest page the backend writes (RX buffers, used rings) is marked *after* the
//! write, so the frontend never clears a bit and copies the page before our data is in it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, Ordering};

use thiserror::Error;

use crate::control::mapped_fd::{check_mappable, MappedFdError, ShrinkSeal};
use crate::control::memory_guard::{FaultOwner, GuardError, RangeGuard};

/// The log's page size (VHOST_LOG_PAGE).
pub const LOG_PAGE: u64 = 0x1000;

#[derive(Debug, Error)]
pub enum DirtyLogError {
    #[error("log size {0} is out of range")]
    Size(u64),
    #[error("log offset {0:#x} is too large")]
    Offset(u64),
    #[error("log fd: {0}")]
    BadFd(#[source] MappedFdError),
    #[error("mmap failed: {0}")]
    Mmap(#[source] io::Error),
    #[error(transparent)]
    Guard(#[from] GuardError),
}

pub struct DirtyLog {
    base: *mut u8,
    len: usize,
    /// Whether the log's fd can still shrink.
    pub seal: ShrinkSeal,
    /// A dup of the log's fd with the size and offset it was mapped at (for a live upgrade).
    pub source: (File, u64, u64),
    /// The log's entry in the SIGBUS guard; dropped after `Drop::drop` unmapped the log.
    _guard: RangeGuard,
}

// SAFETY: the mapping is shared memory we own until Drop; all access goes through atomics.
unsafe impl Send for DirtyLog {}
// SAFETY: as above; `mark` only performs atomic read-modify-writes.
unsafe impl Sync for DirtyLog {}

impl DirtyLog {
    /// Maps `size` bytes of `file` at `offset`, as SET_LOG_BASE describes the log, after
    /// checking that the fd holds them, and guards the mapping with `owner`.
    pub fn map(file: &File, size: u64, offset: u64, owner: &FaultOwner) -> Result<Self, DirtyLogError> {
        if size == 0 || size > (1 << 40) {
            return Err(DirtyLogError::Size(size));
        }
        let off = libc::off_t::try_from(offset).map_err(|_| DirtyLogError::Offset(offset))?;
        let seal = check_mappable(file, offset, size).map_err(DirtyLogError::BadFd)?;
        // SAFETY: a fresh shared mapping of a file we were handed; the kernel checks the fd,
        // size and offset, and we only use the result after checking for MAP_FAILED.
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), size as usize, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, file.as_raw_fd(), off)
        };
        if base == libc::MAP_FAILED {
            return Err(DirtyLogError::Mmap(io::Error::last_os_error()));
        }
        let guard = match owner.guard(base as *const u8, size as usize) {
            Ok(g) => g,
            Err(e) => {
                // SAFETY: unmapping the mapping just made, which nothing else has seen.
                unsafe { libc::munmap(base, size as usize) };
                return Err(e.into());
            }
        };
        let dup = match file.try_clone() {
            Ok(f) => f,
            Err(e) => {
                // SAFETY: unmapping the mapping just made, which nothing else has seen.
                unsafe { libc::munmap(base, size as usize) };
                return Err(DirtyLogError::Mmap(e));
            }
        };
        Ok(DirtyLog { base: base as *mut u8, len: size as usize, seal, source: (dup, size, offset), _guard: guard })
    }

    /// Marks every page that `gpa..gpa+len` touches. Pages beyond the log are ignored (the
    /// frontend sizes the log to cover all of guest memory).
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        for page in first..=last {
            let byte = (page / 8) as usize;
            if byte >= self.len {
                break;
            }
            // SAFETY: `byte < self.len`, inside our live mapping; AtomicU8 has the alignment
            // and size of u8, and the frontend also updates the log only atomically.
            let cell = unsafe { AtomicU8::from_ptr(self.base.add(byte)) };
            cell.fetch_or(1 << (page % 8), Ordering::Relaxed);
        }
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region `map` created; no references outlive `self`.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};

    fn log_file(len: usize) -> File {
        let f = tempfile_in_memory();
        f.set_len(len as u64).unwrap();
        f
    }

    fn tempfile_in_memory() -> File {
        let name = std::ffi::CString::new("vutap-log-test").unwrap();
        // SAFETY: memfd_create with a valid name; the returned fd is owned by the File.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a fresh fd we own.
        unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    }

    fn bytes(f: &mut File) -> Vec<u8> {
        let mut v = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    }

    fn owner() -> FaultOwner {
        FaultOwner::new().unwrap()
    }

    #[test]
    fn test_dirty_log_marks_pages_spanned() {
        let mut f = log_file(4);
        let log = DirtyLog::map(&f, 4, 0, &owner()).unwrap();
        log.mark(0x0, 1); // page 0
        log.mark(0x2fff, 2); // pages 2 and 3
        log.mark(0x9000, 0x1000); // page 9 only
        log.mark(0x1000_0000, 10); // beyond the log: ignored
        drop(log);
        assert_eq!(bytes(&mut f), vec![0b0000_1101, 0b0000_0010, 0, 0]);
    }

    #[test]
    fn test_dirty_log_past_end_of_file_is_refused() {
        let f = log_file(0x1000);
        assert!(DirtyLog::map(&f, 0x2000, 0, &owner()).is_err(), "longer than the file");
        assert!(DirtyLog::map(&f, 0x1000, 0x1000, &owner()).is_err(), "offset pushes it past the end");
        assert!(DirtyLog::map(&f, u64::MAX, 1, &owner()).is_err());
        let log = DirtyLog::map(&f, 0x1000, 0, &owner()).expect("exactly the file");
        log.mark(0x7fff_f000, 1); // the last bit of the last byte
    }

    #[test]
    fn test_dirty_log_rejects_empty() {
        let f = log_file(8);
        assert!(matches!(DirtyLog::map(&f, 0, 0, &owner()), Err(DirtyLogError::Size(0))));
    }

    #[test]
    fn test_dirty_log_rejects_an_fd_shorter_than_the_log() {
        let f = log_file(4096);
        let o = owner();
        assert!(matches!(DirtyLog::map(&f, 8192, 0, &o), Err(DirtyLogError::BadFd(MappedFdError::TooShort { .. }))));
        assert!(matches!(DirtyLog::map(&f, 4096, 1, &o), Err(DirtyLogError::BadFd(MappedFdError::TooShort { .. }))));
        assert!(matches!(DirtyLog::map(&f, 4096, 1 << 62, &o), Err(DirtyLogError::BadFd(_))));
        assert!(DirtyLog::map(&f, 4096, 0, &o).is_ok());
    }
}
