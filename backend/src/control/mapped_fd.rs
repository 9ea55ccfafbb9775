//! Checks on an fd the frontend hands us to map (guest memory regions, the dirty log) before
//! it is mapped: the fd must really hold `offset + size` bytes, and we note whether it is
//! sealed against shrinking. A shared mapping past the end of its file does not fail at mmap
//! time; the first access there raises SIGBUS, which would take every device of the process
//! down with it. So a short fd is refused here, and one that may still shrink later is
//! covered by [`crate::control::memory_guard`].

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum MappedFdError {
    #[error("offset {offset:#x} + size {size:#x} overflows")]
    Overflow { offset: u64, size: u64 },
    #[error("the fd holds {file_len} bytes but the mapping needs {needed} (offset {offset:#x} + size {size:#x})")]
    TooShort { file_len: u64, needed: u64, offset: u64, size: u64 },
    #[error("cannot stat the fd: {0}")]
    Stat(#[source] std::io::Error),
    #[error("the fd is not a file or device ({0:?})")]
    NotMappable(std::fs::FileType),
}

/// Whether a file may still shrink under a mapping of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShrinkSeal {
    /// F_SEAL_SHRINK is set (QEMU's memfd backend seals by default): it can never shrink.
    Sealed,
    /// A memfd (or other sealable file) without F_SEAL_SHRINK.
    Unsealed,
    /// The file does not support seals (e.g. a file on hugetlbfs or a disk).
    NotSealable,
}

impl ShrinkSeal {
    pub fn describe(self) -> &'static str {
        match self {
            ShrinkSeal::Sealed => "sealed against shrinking",
            ShrinkSeal::Unsealed => "NOT sealed against shrinking (a truncation is contained, not prevented)",
            ShrinkSeal::NotSealable => "not sealable (a truncation is contained, not prevented)",
        }
    }
}

/// The end (`offset + size`) of a mapping, refusing an overflow.
pub fn mapping_end(offset: u64, size: u64) -> Result<u64, MappedFdError> {
    offset.checked_add(size).ok_or(MappedFdError::Overflow { offset, size })
}

/// Whether a file of `file_len` bytes backs all of `size` bytes at `offset`.
pub fn check_fits(file_len: u64, offset: u64, size: u64) -> Result<(), MappedFdError> {
    let needed = mapping_end(offset, size)?;
    if needed > file_len {
        return Err(MappedFdError::TooShort { file_len, needed, offset, size });
    }
    Ok(())
}

/// Checks that `file` backs `size` bytes at `offset` and reports its shrink seal.
///
/// Only regular files (memfd, tmpfs, hugetlbfs, disk files) have a length to check; other
/// mappable fds (a DAX character device) are sized by their driver and pass.
pub fn check_mappable(file: &File, offset: u64, size: u64) -> Result<ShrinkSeal, MappedFdError> {
    mapping_end(offset, size)?;
    let meta = file.metadata().map_err(MappedFdError::Stat)?;
    let ft = meta.file_type();
    if ft.is_file() {
        check_fits(meta.len(), offset, size)?;
    } else if !(ft.is_char_device() || ft.is_block_device()) {
        return Err(MappedFdError::NotMappable(ft));
    }
    Ok(shrink_seal(file))
}

/// F_GET_SEALS: whether `file` is sealed against shrinking.
pub fn shrink_seal(file: &File) -> ShrinkSeal {
    // SAFETY: F_GET_SEALS takes no argument and only reads the fd's seal set.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        // EINVAL: the file system has no seals.
        return ShrinkSeal::NotSealable;
    }
    if seals & libc::F_SEAL_SHRINK != 0 {
        ShrinkSeal::Sealed
    } else {
        ShrinkSeal::Unsealed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(len: u64, flags: libc::c_uint) -> File {
        // SAFETY: memfd_create with a valid name; the fd is owned by the File.
        let fd = unsafe { libc::memfd_create(c"vutap-fd-test".as_ptr(), flags) };
        assert!(fd >= 0);
        // SAFETY: fresh fd we own.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn test_check_fits_bounds_and_overflow() {
        const HALF: u64 = 1 << 63;
        assert!(check_fits(0x2000, 0, 0x2000).is_ok());
        assert!(check_fits(0x3000, 0x1000, 0x2000).is_ok());
        assert!(matches!(
            check_fits(0x2000, 0, 0x2001),
            Err(MappedFdError::TooShort { file_len: 0x2000, needed: 0x2001, offset: 0, size: 0x2001 })
        ));
        assert!(matches!(
            check_fits(0x2000, 0x1000, 0x2000),
            Err(MappedFdError::TooShort { file_len: 0x2000, needed: 0x3000, offset: 0x1000, size: 0x2000 })
        ));
        assert!(matches!(check_fits(u64::MAX, u64::MAX, 1), Err(MappedFdError::Overflow { offset: u64::MAX, size: 1 })));
        assert!(matches!(check_fits(u64::MAX, HALF, HALF), Err(MappedFdError::Overflow { offset: HALF, size: HALF })));
        assert!(check_fits(u64::MAX, u64::MAX - 1, 1).is_ok());
    }

    #[test]
    fn test_check_mappable_on_memfds() {
        let f = memfd(0x4000, libc::MFD_ALLOW_SEALING);
        assert_eq!(check_mappable(&f, 0, 0x4000).ok(), Some(ShrinkSeal::Unsealed));
        assert!(matches!(check_mappable(&f, 0x1000, 0x4000), Err(MappedFdError::TooShort { file_len: 0x4000, .. })));
        assert!(matches!(check_mappable(&f, u64::MAX, 2), Err(MappedFdError::Overflow { .. })));
        // SAFETY: F_ADD_SEALS on our own memfd.
        let sealed = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(sealed, 0);
        assert_eq!(check_mappable(&f, 0, 0x4000).ok(), Some(ShrinkSeal::Sealed));
        // Without MFD_ALLOW_SEALING the memfd is sealed with F_SEAL_SEAL only: shrinkable.
        assert_eq!(check_mappable(&memfd(0x1000, 0), 0, 0x1000).ok(), Some(ShrinkSeal::Unsealed));
    }
}
