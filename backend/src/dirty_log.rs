//! The vhost-user dirty-page log for live migration (VHOST_F_LOG_ALL + SET_LOG_BASE with
//! LOG_SHMFD): a bitmap shared with the frontend, one bit per 4 KiB guest page. While logging
//! is on, every guest page the backend writes (RX buffers, used rings) is marked *after* the
//! write, so the frontend never clears a bit and copies the page before our data is in it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, Ordering};

/// The log's page size (VHOST_LOG_PAGE).
pub const LOG_PAGE: u64 = 0x1000;

pub struct DirtyLog {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is shared memory we own until Drop; all access goes through atomics.
unsafe impl Send for DirtyLog {}
// SAFETY: as above; `mark` only performs atomic read-modify-writes.
unsafe impl Sync for DirtyLog {}

impl DirtyLog {
    /// Maps `size` bytes of `file` at `offset`, as SET_LOG_BASE describes the log.
    pub fn map(file: &File, size: u64, offset: u64) -> io::Result<Self> {
        if size == 0 || size > (1 << 40) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("log size {size} is out of range")));
        }
        // As for guest memory: a log past the end of its file would SIGBUS on the first mark.
        if let Some(file_len) = crate::memory::regular_file_len(file)? {
            if !crate::memory::range_in_file(offset, size, file_len) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("log of {size} bytes at offset {offset} runs past the end of its {file_len}-byte file"),
                ));
            }
        }
        let off = libc::off_t::try_from(offset).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "log offset too large"))?;
        // SAFETY: a fresh shared mapping of a file we were handed; the kernel checks the fd,
        // size and offset, and we only use the result after checking for MAP_FAILED.
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), size as usize, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, file.as_raw_fd(), off)
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(DirtyLog { base: base as *mut u8, len: size as usize })
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

    #[test]
    fn test_dirty_log_marks_pages_spanned() {
        let mut f = log_file(4);
        let log = DirtyLog::map(&f, 4, 0).unwrap();
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
        assert!(DirtyLog::map(&f, 0x2000, 0).is_err(), "longer than the file");
        assert!(DirtyLog::map(&f, 0x1000, 0x1000).is_err(), "offset pushes it past the end");
        assert!(DirtyLog::map(&f, u64::MAX, 1).is_err());
        let log = DirtyLog::map(&f, 0x1000, 0).expect("exactly the file");
        log.mark(0x7fff_f000, 1); // the last bit of the last byte
    }

    #[test]
    fn test_dirty_log_rejects_empty() {
        let f = log_file(8);
        assert!(DirtyLog::map(&f, 0, 0).is_err());
    }
}
