//! The two syscalls the datapath makes on a tap queue, behind a trait so the loops can be tested
//! with a scripted tap (short writes, EAGAIN, errors) and no privileges.

use std::io;
use std::os::fd::AsRawFd;

use crate::datapath::chain_iov::IoVec;
use crate::tap::TapQueue;

pub trait TapIo {
    /// Writes one frame (virtio_net_hdr + Ethernet frame) gathered from `iovs`.
    fn write_frame(&self, iovs: &[IoVec]) -> io::Result<usize>;
    /// Reads one frame (virtio_net_hdr + Ethernet frame) scattered into `iovs`.
    fn read_frame(&self, iovs: &[IoVec]) -> io::Result<usize>;
}

/// The iovec count for the syscall. The loops never pass more than IOV_MAX (they refuse longer
/// chains); were they to, the kernel's EINVAL is the answer, never a silently cut frame.
fn iov_count(iovs: &[IoVec]) -> io::Result<libc::c_int> {
    libc::c_int::try_from(iovs.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

impl TapIo for TapQueue {
    fn write_frame(&self, iovs: &[IoVec]) -> io::Result<usize> {
        let count = iov_count(iovs)?;
        // SAFETY: IoVec is repr(transparent) over libc::iovec; every entry points into mapped
        // guest memory valid for its length for the duration of the call.
        let n = unsafe { libc::writev(self.as_raw_fd(), iovs.as_ptr() as *const libc::iovec, count) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn read_frame(&self, iovs: &[IoVec]) -> io::Result<usize> {
        let count = iov_count(iovs)?;
        // SAFETY: as above; the entries describe device-writable guest buffers.
        let n = unsafe { libc::readv(self.as_raw_fd(), iovs.as_ptr() as *const libc::iovec, count) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}
