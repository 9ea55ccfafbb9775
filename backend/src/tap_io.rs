//! The two syscalls the datapath makes on a tap queue, behind a trait so the loops can be tested
//! with a scripted tap (short writes, EAGAIN, errors) and no privileges.

use std::io;
use std::os::fd::AsRawFd;

use crate::chain_iov::IoVec;
use crate::tap::TapQueue;

pub trait TapIo {
    /// Writes one frame (virtio_net_hdr + Ethernet frame) gathered from `iovs`.
    fn write_frame(&self, iovs: &[IoVec]) -> io::Result<usize>;
    /// Reads one frame (virtio_net_hdr + Ethernet frame) scattered into `iovs`.
    fn read_frame(&self, iovs: &[IoVec]) -> io::Result<usize>;
}

fn iov_count(iovs: &[IoVec]) -> libc::c_int {
    // IOV_MAX is 1024; chains are bounded by the queue size (<= 32768) plus region splits, so
    // clamp rather than overflow: a chain that long is truncated and then rejected by length.
    iovs.len().min(1024) as libc::c_int
}

impl TapIo for TapQueue {
    fn write_frame(&self, iovs: &[IoVec]) -> io::Result<usize> {
        // SAFETY: IoVec is repr(transparent) over libc::iovec; every entry points into mapped
        // guest memory valid for its length for the duration of the call.
        let n = unsafe { libc::writev(self.as_raw_fd(), iovs.as_ptr() as *const libc::iovec, iov_count(iovs)) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn read_frame(&self, iovs: &[IoVec]) -> io::Result<usize> {
        // SAFETY: as above; the entries describe device-writable guest buffers.
        let n = unsafe { libc::readv(self.as_raw_fd(), iovs.as_ptr() as *const libc::iovec, iov_count(iovs)) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}
