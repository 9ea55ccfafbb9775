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

    /// Writes one frame (virtio_net_hdr + Ethernet frame) held in our own memory, such as an
    /// announcement the device builds itself. Rare, so it copies the frame rather than hand out
    /// an iovec over borrowed, read-only memory.
    fn write_bytes(&self, frame: &[u8]) -> io::Result<usize> {
        let mut owned = frame.to_vec();
        // SAFETY: `owned` is ours, writable, and outlives the call; nothing else touches it
        // while the iovec is in use, and the iovec is dropped with this call.
        let iov = unsafe { IoVec::from_raw_parts(owned.as_mut_ptr(), owned.len()) };
        self.write_frame(&[iov])
    }
}

/// The iovec count for the syscall. The loops never pass more than IOV_MAX (they refuse longer
/// chains); were they to, the kernel's EINVAL is the answer, never a silently cut frame.
fn iov_count(iovs: &[IoVec]) -> io::Result<libc::c_int> {
    libc::c_int::try_from(iovs.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

impl TapIo for TapQueue {
    fn write_frame(&self, iovs: &[IoVec]) -> io::Result<usize> {
        let count = iov_count(iovs)?;
        // SAFETY: `count` entries of `iovs` are passed; each describes memory valid for its length
        // while it is used (IoVec's constructors' contract), and writev only reads it.
        let n = unsafe { libc::writev(self.as_raw_fd(), IoVec::as_iovecs(iovs), count) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn read_frame(&self, iovs: &[IoVec]) -> io::Result<usize> {
        let count = iov_count(iovs)?;
        // SAFETY: as above; readv writes at most each entry's length into it, and the memory
        // behind an IoVec is writable by contract.
        let n = unsafe { libc::readv(self.as_raw_fd(), IoVec::as_iovecs(iovs), count) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}
