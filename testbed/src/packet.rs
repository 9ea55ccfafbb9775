//! AF_PACKET raw sockets bound to one interface, on the host or inside a named network
//! namespace: the far end of the wire for the tests, the DPDK frontend test and the load
//! generator.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// Buffer size of [`PacketSocket::recv_matching`]: the largest frame it returns whole.
pub const RECV_BUF: usize = 65536 + 128;

/// The index of interface `name` in the calling thread's network namespace.
pub fn ifindex(name: &str) -> Option<i32> {
    let c = CString::new(name).ok()?;
    // SAFETY: c is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i as i32)
}

fn last_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn setsockopt_int(fd: RawFd, level: i32, opt: i32, v: libc::c_int) -> io::Result<()> {
    // SAFETY: v is a valid int for the duration of the call and its size is passed.
    let r = unsafe { libc::setsockopt(fd, level, opt, (&v as *const libc::c_int).cast(), 4) };
    if r < 0 {
        return Err(last_err("setsockopt"));
    }
    Ok(())
}

fn sockaddr(ifindex: i32, proto_be: u16, dst: Option<[u8; 6]>) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto_be;
    sll.sll_ifindex = ifindex;
    if let Some(d) = dst {
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&d);
    }
    sll
}

/// Socket options applied (best effort: a failure is ignored) before the socket is bound.
#[derive(Clone, Copy, Debug, Default)]
pub struct PacketOptions {
    /// `SO_RCVBUFFORCE` in bytes.
    pub rcvbuf: Option<libc::c_int>,
    /// `SO_SNDBUFFORCE` in bytes.
    pub sndbuf: Option<libc::c_int>,
    /// `PACKET_IGNORE_OUTGOING`: do not see what this host sends on the interface.
    pub ignore_outgoing: bool,
}

/// An AF_PACKET raw socket (`ETH_P_ALL`) bound to one interface of the network namespace it was
/// created in. Blocking; the receive calls never block.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl AsRawFd for PacketSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl PacketSocket {
    /// Opens the socket on `ifname` inside network namespace `netns` (a name under
    /// `/var/run/netns`; None: the calling thread's). A socket keeps the namespace it was
    /// created in, and setns(2) moves only the calling thread, so a short-lived thread enters
    /// the namespace, makes the socket, and hands it back; the caller never moves.
    pub fn open(netns: Option<&str>, ifname: &str, opts: PacketOptions) -> io::Result<PacketSocket> {
        let Some(ns) = netns else { return Self::open_here(ifname, opts) };
        let path = format!("/var/run/netns/{ns}");
        let ifname = ifname.to_string();
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("open {path}: {e}")))?;
            // SAFETY: setns on a valid netns fd; it only affects this short-lived thread.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(last_err(&format!("setns {path}")));
            }
            Self::open_here(&ifname, opts)
        })
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
    }

    /// Opens the socket on `ifname` in the calling thread's network namespace.
    fn open_here(ifname: &str, opts: PacketOptions) -> io::Result<PacketSocket> {
        let ifindex = ifindex(ifname).ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no interface {ifname}")))?;
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) };
        if fd < 0 {
            return Err(last_err("AF_PACKET socket"));
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = fd.as_raw_fd();
        if let Some(b) = opts.rcvbuf {
            let _ = setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, b);
        }
        if let Some(b) = opts.sndbuf {
            let _ = setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, b);
        }
        if opts.ignore_outgoing {
            let _ = setsockopt_int(raw, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1);
        }
        let sll = sockaddr(ifindex, proto, None);
        // SAFETY: sll is a valid sockaddr_ll and its exact size is passed.
        let r = unsafe { libc::bind(raw, (&sll as *const libc::sockaddr_ll).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32) };
        if r != 0 {
            return Err(last_err(&format!("bind AF_PACKET to {ifname}")));
        }
        Ok(PacketSocket { fd, ifindex })
    }

    /// The interface the socket is bound to.
    pub fn ifindex(&self) -> i32 {
        self.ifindex
    }

    /// Enables PACKET_VNET_HDR: every sent frame is preceded by a 10-byte virtio_net_hdr.
    pub fn set_vnet_hdr(&self) -> io::Result<()> {
        setsockopt_int(self.fd.as_raw_fd(), libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1)
            .map_err(|e| io::Error::new(e.kind(), format!("PACKET_VNET_HDR: {e}")))
    }

    /// Sends `bytes` (with its virtio_net_hdr first if [`set_vnet_hdr`](Self::set_vnet_hdr) was
    /// called) to `dst`, the frame's destination MAC, with ethertype `ethertype`. A short send
    /// is an error.
    pub fn send_to(&self, bytes: &[u8], dst: [u8; 6], ethertype: u16) -> io::Result<()> {
        let sll = sockaddr(self.ifindex, ethertype.to_be(), Some(dst));
        // SAFETY: bytes is valid for bytes.len(); sll is valid with its size.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r < 0 {
            return Err(last_err(&format!("sendto ({} bytes)", bytes.len())));
        }
        if r as usize != bytes.len() {
            return Err(io::Error::other(format!("sendto: {r} of {} bytes sent", bytes.len())));
        }
        Ok(())
    }

    /// Sends an Ethernet frame, to its own destination MAC and ethertype.
    ///
    /// # Panics
    /// If `frame` is shorter than an Ethernet header (14 bytes).
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let dst = frame[..6].try_into().unwrap();
        self.send_to(frame, dst, u16::from_be_bytes([frame[12], frame[13]]))
    }

    /// Sends a batch with one sendmmsg; returns how many went (0 on an error).
    pub fn send_batch(&self, frames: &[Vec<u8>]) -> usize {
        let mut iovs: Vec<libc::iovec> = frames.iter().map(|f| libc::iovec { iov_base: f.as_ptr() as *mut _, iov_len: f.len() }).collect();
        // SAFETY: mmsghdr is plain old data.
        let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; frames.len()];
        for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: msgs point at iovs, which point at frames; all outlive the call.
        let r = unsafe { libc::sendmmsg(self.fd.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as u32, 0) };
        r.max(0) as usize
    }

    /// Waits up to `ms` for something to read.
    pub fn poll_in(&self, ms: i32) -> bool {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
    }

    /// Receives one frame without blocking into `buf`; returns its length.
    pub fn try_recv(&self, buf: &mut [u8]) -> Option<usize> {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        (n > 0).then_some(n as usize)
    }

    /// Receives up to a batch of frames with one recvmmsg, without blocking; returns how many
    /// (0 when there were none or on an error). Read them with [`RecvBatch::frame`].
    pub fn recv_batch(&self, batch: &mut RecvBatch) -> usize {
        let snap = batch.snap;
        for ((m, iov), buf) in batch.msgs.iter_mut().zip(batch.iovs.iter_mut()).zip(batch.bufs.chunks_exact_mut(snap)) {
            *iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: snap };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m.msg_len = 0;
        }
        // MSG_TRUNC: msg_len is the real frame length though only `snap` bytes are copied.
        // SAFETY: msgs point at iovs, which point at bufs; all are owned by `batch` and outlive
        // the call.
        let n = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                batch.msgs.as_mut_ptr(),
                batch.msgs.len() as u32,
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                std::ptr::null_mut(),
            )
        };
        n.max(0) as usize
    }

    /// Next incoming (not sent by this host) frame for which `keep` holds, within `timeout`.
    ///
    /// # Panics
    /// On a frame longer than [`RECV_BUF`].
    pub fn recv_matching(&self, timeout: Duration, keep: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            if !self.poll_in(left.as_millis().max(1) as i32) {
                continue;
            }
            // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut sl = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: buf and sll are valid for writes of the given sizes.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                    (&mut sll as *mut libc::sockaddr_ll).cast(),
                    &mut sl,
                )
            };
            if n <= 0 || sll.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            assert!(n as usize <= buf.len(), "frame of {n} bytes truncated by the receive buffer");
            let f = &buf[..n as usize];
            if keep(f) {
                return Some(f.to_vec());
            }
        }
    }

    /// All matching frames until none arrives for `quiet` (or `max` are collected).
    pub fn collect(&self, max: usize, quiet: Duration, keep: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while out.len() < max {
            match self.recv_matching(quiet, &keep) {
                Some(f) => out.push(f),
                None => break,
            }
        }
        out
    }
}

/// Buffers of [`PacketSocket::recv_batch`]: room for `n` frames, of which the first `snap` bytes
/// are kept (and the full length reported).
pub struct RecvBatch {
    snap: usize,
    bufs: Vec<u8>,
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
}

impl RecvBatch {
    pub fn new(n: usize, snap: usize) -> RecvBatch {
        RecvBatch {
            snap,
            bufs: vec![0u8; n * snap],
            iovs: vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; n],
            // SAFETY: mmsghdr is plain old data; all-zero is a valid value.
            msgs: vec![unsafe { std::mem::zeroed() }; n],
        }
    }

    /// Frame `i` of the last [`PacketSocket::recv_batch`]: its first bytes (at most `snap`) and
    /// its real length.
    pub fn frame(&self, i: usize) -> (&[u8], usize) {
        let len = self.msgs[i].msg_len as usize;
        (&self.bufs[i * self.snap..i * self.snap + len.min(self.snap)], len)
    }
}
