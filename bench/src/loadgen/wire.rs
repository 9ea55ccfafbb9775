//! The far side of the tap: AF_PACKET sockets (created inside a peer netns when there is one),
//! the test frames, and the sink / source / reflector threads that count and verify them.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Magic at [`MAGIC_OFF`] of every UDP test frame.
pub const MAGIC: &[u8; 8] = b"VUTAPBN!";
/// Offset of the magic: after Ethernet (14) + IPv4 (20) + UDP (8).
pub const MAGIC_OFF: usize = 42;
/// TCP destination port of the TSO frames.
pub const TSO_PORT: u16 = 5001;
/// MSS of the TSO frames.
pub const TSO_MSS: u16 = 1448;
/// Segments per TSO frame: 45 * 1448 = 65160 payload bytes, a 65214-byte frame.
pub const TSO_SEGS: usize = 45;
/// Destination MAC nobody owns: the far host's stack drops these frames as PACKET_OTHERHOST.
pub const OTHER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xfe, 0x01];
/// Source MAC of frames the far side sends.
pub const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xfe, 0x02];

/// Counters shared between a driver and its far-side thread. "Offered" is what the sending side
/// got rid of; "delivered" is what the receiving side counted and verified.
#[derive(Default, Debug)]
pub struct Counters {
    pub offered_frames: AtomicU64,
    pub offered_bytes: AtomicU64,
    pub delivered_frames: AtomicU64,
    pub delivered_bytes: AtomicU64,
    /// Frames the receiving side saw but could not verify (wrong length / magic).
    pub bad: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Clone, Copy, Default, Debug)]
pub struct Snap {
    pub offered_frames: u64,
    pub offered_bytes: u64,
    pub delivered_frames: u64,
    pub delivered_bytes: u64,
    pub bad: u64,
}

impl Counters {
    pub fn snap(&self) -> Snap {
        Snap {
            offered_frames: self.offered_frames.load(Ordering::Relaxed),
            offered_bytes: self.offered_bytes.load(Ordering::Relaxed),
            delivered_frames: self.delivered_frames.load(Ordering::Relaxed),
            delivered_bytes: self.delivered_bytes.load(Ordering::Relaxed),
            bad: self.bad.load(Ordering::Relaxed),
        }
    }
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s.split(':').filter_map(|p| u8::from_str_radix(p, 16).ok()).collect();
    (v.len() == 6).then(|| [v[0], v[1], v[2], v[3], v[4], v[5]])
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn sum16(b: &[u8]) -> u32 {
    b.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum()
}

fn ipv4(f: &mut Vec<u8>, total_len: u16, proto: u8) {
    let start = f.len();
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total_len.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    f.extend_from_slice(&[10, 99, 0, 2, 10, 99, 0, 1]);
    let c = !csum_fold(sum16(&f[start..start + 20]));
    f[start + 10..start + 12].copy_from_slice(&c.to_be_bytes());
}

/// An Ethernet/IPv4/UDP frame of `len` bytes (>= 60) with the magic and `seq`.
pub fn udp_frame(len: usize, dst: [u8; 6], src: [u8; 6], sport: u16, seq: u32) -> Vec<u8> {
    let len = len.max(60);
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    ipv4(&mut f, (len - 14) as u16, 17);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&9u16.to_be_bytes());
    f.extend_from_slice(&((len - 34) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(MAGIC);
    f.extend_from_slice(&seq.to_be_bytes());
    f.resize(len, 0xa5);
    f
}

/// Sets the UDP source port of a frame made by [`udp_frame`] (flow hashing across queues).
pub fn set_sport(f: &mut [u8], sport: u16) {
    f[34..36].copy_from_slice(&sport.to_be_bytes());
}

/// A TCP/IPv4 frame of [`TSO_SEGS`] * [`TSO_MSS`] payload bytes, checksum left partial (the
/// pseudo-header sum in the checksum field) as NEEDS_CSUM wants.
pub fn tso_frame(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let payload = TSO_SEGS * usize::from(TSO_MSS);
    let ip_len = 40 + payload;
    let mut f = Vec::with_capacity(14 + ip_len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    ipv4(&mut f, ip_len as u16, 6);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&TSO_PORT.to_be_bytes());
    f.extend_from_slice(&1u32.to_be_bytes()); // seq
    f.extend_from_slice(&1u32.to_be_bytes()); // ack
    f.extend_from_slice(&[0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]); // doff 5, ACK|PSH, win, csum, urg
    // Pseudo header: src, dst, proto, TCP length.
    let pseudo = sum16(&[10, 99, 0, 2, 10, 99, 0, 1]) + 6 + (20 + payload) as u32;
    f[50..52].copy_from_slice(&csum_fold(pseudo).to_be_bytes());
    f.extend_from_slice(MAGIC);
    f.resize(14 + ip_len, 0x5a);
    f
}

/// Whether `f` is one of our frames: UDP with the magic, or TCP to [`TSO_PORT`].
pub fn is_test_frame(f: &[u8]) -> bool {
    if f.len() >= MAGIC_OFF + 8 && f[12..14] == [8, 0] && f[23] == 17 {
        return &f[MAGIC_OFF..MAGIC_OFF + 8] == MAGIC;
    }
    f.len() >= 54 && f[12..14] == [8, 0] && f[23] == 6 && f[36..38] == TSO_PORT.to_be_bytes()
}

fn last_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

pub fn ifindex(name: &str) -> Option<i32> {
    let c = CString::new(name).ok()?;
    // SAFETY: c is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i as i32)
}

fn setsockopt_int(fd: RawFd, level: i32, opt: i32, v: i32) -> io::Result<()> {
    // SAFETY: v is a valid int for the duration of the call and its size is passed.
    let r = unsafe { libc::setsockopt(fd, level, opt, (&v as *const i32).cast(), 4) };
    if r < 0 {
        return Err(last_err("setsockopt"));
    }
    Ok(())
}

/// An AF_PACKET socket bound to one interface (seeing only incoming frames), with big buffers.
pub struct PacketSocket {
    pub fd: OwnedFd,
    pub ifindex: i32,
}

impl PacketSocket {
    fn open_here(ifname: &str) -> io::Result<PacketSocket> {
        let ifindex = ifindex(ifname).ok_or_else(|| io::Error::other(format!("no interface {ifname}")))?;
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        if fd < 0 {
            return Err(last_err("AF_PACKET socket"));
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = fd.as_raw_fd();
        let _ = setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 64 << 20);
        let _ = setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 16 << 20);
        // PACKET_IGNORE_OUTGOING (23): do not see what this host sends on the interface.
        let _ = setsockopt_int(raw, libc::SOL_PACKET, 23, 1);
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex;
        // SAFETY: sll is a valid sockaddr_ll and its exact size is passed.
        let r = unsafe {
            libc::bind(raw, (&sll as *const libc::sockaddr_ll).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32)
        };
        if r != 0 {
            return Err(last_err("bind AF_PACKET"));
        }
        Ok(PacketSocket { fd, ifindex })
    }

    /// Opens the socket on `ifname` inside network namespace `netns` (None: this one). The
    /// socket stays in the namespace it was created in, so only the creating thread moves.
    pub fn open(netns: Option<&str>, ifname: &str) -> io::Result<PacketSocket> {
        let Some(ns) = netns else { return Self::open_here(ifname) };
        let path = format!("/var/run/netns/{ns}");
        let ifname = ifname.to_string();
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path)?;
            // SAFETY: setns on a valid netns fd; it only affects this short-lived thread.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(last_err("setns"));
            }
            Self::open_here(&ifname)
        })
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
    }

    /// Sends a batch with one sendmmsg; returns how many went.
    pub fn send_batch(&self, frames: &[Vec<u8>]) -> usize {
        let mut iovs: Vec<libc::iovec> =
            frames.iter().map(|f| libc::iovec { iov_base: f.as_ptr() as *mut _, iov_len: f.len() }).collect();
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

    pub fn send(&self, frame: &[u8]) -> bool {
        // SAFETY: frame is valid for frame.len() bytes.
        unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) == frame.len() as isize }
    }

    /// Waits up to `ms` for something to read.
    pub fn poll_in(&self, ms: i32) -> bool {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
    }

    /// Receives one frame without blocking into `buf`; returns its length.
    pub fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        (n > 0).then_some(n as usize)
    }
}

/// A far-side thread; stops and joins on drop.
pub struct FarThread {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for FarThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Counts our frames arriving on `sock` into `delivered_*`. `expect_len`: the exact frame length
/// to verify (None for TSO, where the far side may see segments; bytes are counted then).
pub fn sink(sock: PacketSocket, counters: Arc<Counters>, expect_len: Option<usize>) -> FarThread {
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let handle = std::thread::Builder::new()
        .name("bench-sink".into())
        .spawn(move || {
            const B: usize = 64;
            const SNAP: usize = 64;
            let mut bufs = vec![[0u8; SNAP]; B];
            let mut iovs: Vec<libc::iovec> =
                bufs.iter_mut().map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: SNAP }).collect();
            // SAFETY: mmsghdr is plain old data.
            let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; B];
            while !st.load(Ordering::Relaxed) {
                for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
                    m.msg_hdr.msg_iov = iov;
                    m.msg_hdr.msg_iovlen = 1;
                    m.msg_len = 0;
                }
                // MSG_TRUNC: msg_len is the real frame length though only SNAP bytes are copied.
                // SAFETY: msgs/iovs/bufs outlive the call.
                let n = unsafe {
                    libc::recvmmsg(
                        sock.fd.as_raw_fd(),
                        msgs.as_mut_ptr(),
                        B as u32,
                        libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                        std::ptr::null_mut(),
                    )
                };
                if n <= 0 {
                    sock.poll_in(20);
                    continue;
                }
                let (mut frames, mut bytes, mut bad) = (0u64, 0u64, 0u64);
                for i in 0..n as usize {
                    let len = msgs[i].msg_len as usize;
                    let b = &bufs[i][..len.min(SNAP)];
                    if !is_test_frame(b) {
                        continue; // kernel chatter
                    }
                    if expect_len.is_some_and(|l| l != len) {
                        bad += 1;
                        continue;
                    }
                    frames += 1;
                    bytes += len as u64;
                }
                counters.delivered_frames.fetch_add(frames, Ordering::Relaxed);
                counters.delivered_bytes.fetch_add(bytes, Ordering::Relaxed);
                if bad > 0 {
                    counters.bad.fetch_add(bad, Ordering::Relaxed);
                }
            }
        })
        .expect("spawn sink");
    FarThread { stop, handle: Some(handle) }
}

/// Floods `frame` (with the UDP source port varied over 64 values) out of `sock` as fast as it
/// goes, counting into `offered_*`.
pub fn source(sock: PacketSocket, counters: Arc<Counters>, frame: Vec<u8>) -> FarThread {
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let handle = std::thread::Builder::new()
        .name("bench-source".into())
        .spawn(move || {
            let batch: Vec<Vec<u8>> = (0..64u16)
                .map(|i| {
                    let mut f = frame.clone();
                    set_sport(&mut f, 10000 + i);
                    f
                })
                .collect();
            let len = frame.len() as u64;
            while !st.load(Ordering::Relaxed) {
                let n = sock.send_batch(&batch) as u64;
                if n == 0 {
                    std::thread::yield_now();
                    continue;
                }
                counters.offered_frames.fetch_add(n, Ordering::Relaxed);
                counters.offered_bytes.fetch_add(n * len, Ordering::Relaxed);
            }
        })
        .expect("spawn source");
    FarThread { stop, handle: Some(handle) }
}

/// Sends every test frame arriving on `sock` back with the MACs set to `dst` / [`PEER_MAC`].
pub fn reflector(sock: PacketSocket, dst: [u8; 6]) -> FarThread {
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let handle = std::thread::Builder::new()
        .name("bench-reflect".into())
        .spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !st.load(Ordering::Relaxed) {
                match sock.recv(&mut buf) {
                    Some(n) if is_test_frame(&buf[..n]) => {
                        buf[..6].copy_from_slice(&dst);
                        buf[6..12].copy_from_slice(&PEER_MAC);
                        sock.send(&buf[..n]);
                    }
                    Some(_) => {}
                    None => {
                        sock.poll_in(20);
                    }
                }
            }
        })
        .expect("spawn reflector");
    FarThread { stop, handle: Some(handle) }
}
