//! The far side of the tap: its AF_PACKET socket ([`far_socket`], inside the peer netns when
//! there is one), the test frames, and the sink / source / reflector threads that count and
//! verify them.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vutap_testbed::frames::{self, TcpFlow};
use vutap_testbed::host_cpu::this_thread_ns;
use vutap_testbed::packet::{PacketOptions, PacketSocket, RecvBatch};

use super::error::{LoadgenError, Result};

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
    /// The far-side thread (sink or source), and the CPU time it spent polling a socket that
    /// had nothing for it: it polls instead of sleeping (see [`sink`]), so its CPU time alone
    /// would make the load side look busy whatever the load.
    pub far_tid: AtomicI32,
    pub far_idle_ns: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Clone, Copy, Default, Debug)]
pub struct Snap {
    pub offered_frames: u64,
    pub offered_bytes: u64,
    pub delivered_frames: u64,
    pub delivered_bytes: u64,
    pub bad: u64,
    pub far_idle_ns: u64,
}

impl Counters {
    pub fn snap(&self) -> Snap {
        Snap {
            offered_frames: self.offered_frames.load(Ordering::Relaxed),
            offered_bytes: self.offered_bytes.load(Ordering::Relaxed),
            delivered_frames: self.delivered_frames.load(Ordering::Relaxed),
            delivered_bytes: self.delivered_bytes.load(Ordering::Relaxed),
            bad: self.bad.load(Ordering::Relaxed),
            far_idle_ns: self.far_idle_ns.load(Ordering::Relaxed),
        }
    }
}

impl Snap {
    /// What the counters moved by between `earlier` and `self`.
    pub fn since(&self, earlier: &Snap) -> Snap {
        Snap {
            offered_frames: self.offered_frames - earlier.offered_frames,
            offered_bytes: self.offered_bytes - earlier.offered_bytes,
            delivered_frames: self.delivered_frames - earlier.delivered_frames,
            delivered_bytes: self.delivered_bytes - earlier.delivered_bytes,
            bad: self.bad - earlier.bad,
            far_idle_ns: self.far_idle_ns - earlier.far_idle_ns,
        }
    }
}

/// Addresses of the test frames' IPv4 header (never routed: the frames stay on the wire).
const SRC_IP: [u8; 4] = [10, 99, 0, 2];
const DST_IP: [u8; 4] = [10, 99, 0, 1];
/// UDP destination port of the test frames (discard).
const UDP_DPORT: u16 = 9;

/// An Ethernet/IPv4/UDP frame of `len` bytes (at least 60) carrying the magic and `seq`.
pub fn udp_frame(len: usize, dst: [u8; 6], src: [u8; 6], sport: u16, seq: u32) -> Vec<u8> {
    let payload_len = len.max(60) - MAGIC_OFF;
    let mut payload = Vec::with_capacity(payload_len);
    payload.extend_from_slice(MAGIC);
    payload.extend_from_slice(&seq.to_be_bytes());
    payload.resize(payload_len, 0xa5);
    frames::udp_frame_with(dst, src, (SRC_IP, DST_IP), (sport, UDP_DPORT), &payload, 0)
}

/// A TCP/IPv4 frame of [`TSO_SEGS`] * [`TSO_MSS`] payload bytes, checksum left partial (the
/// pseudo-header sum in the checksum field) as NEEDS_CSUM wants.
pub fn tso_frame(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let flow = TcpFlow { src_mac: src, dst_mac: dst, src_ip: SRC_IP, dst_ip: DST_IP, sport: 40000, dport: TSO_PORT, seq: 1 };
    let mut payload = MAGIC.to_vec();
    payload.resize(TSO_SEGS * usize::from(TSO_MSS), 0x5a);
    frames::tcp_frame(&flow, &payload, false)
}

/// Whether `f` is one of our frames: UDP with the magic, or TCP to [`TSO_PORT`].
pub fn is_test_frame(f: &[u8]) -> bool {
    if f.len() >= MAGIC_OFF + 8 && f[12..14] == [8, 0] && f[23] == 17 {
        return &f[MAGIC_OFF..MAGIC_OFF + 8] == MAGIC;
    }
    f.len() >= 54 && f[12..14] == [8, 0] && f[23] == 6 && f[36..38] == TSO_PORT.to_be_bytes()
}

/// The loadgen's far-end socket on `ifname` (inside `netns` when there is one): big buffers,
/// blind to what this host sends.
pub fn far_socket(netns: Option<&str>, ifname: &str) -> Result<PacketSocket> {
    let opts = PacketOptions { rcvbuf: Some(64 << 20), sndbuf: Some(16 << 20), ignore_outgoing: true };
    PacketSocket::open(netns, ifname, opts).map_err(|source| LoadgenError::FarSocket { ifname: ifname.to_string(), source })
}

/// A far-side thread; stops and joins on drop.
pub struct FarThread {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl FarThread {
    /// Runs `body` (given the stop flag) on a thread named `name`.
    fn spawn(name: &str, body: impl FnOnce(&AtomicBool) + Send + 'static) -> FarThread {
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let handle = std::thread::Builder::new().name(name.into()).spawn(move || body(&st)).unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        FarThread { stop, handle: Some(handle) }
    }
}

impl Drop for FarThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Adds up the CPU time a far-side thread spends in runs of empty polls into
/// [`Counters::far_idle_ns`]. The thread's CPU clock is read where a run starts and ends (and
/// every [`IdlePolls::FLUSH_EVERY`] polls inside one, so a window's snapshot misses little of a
/// long run), not on every poll; a run counts from the end of its first empty poll to the end
/// of the poll that found work again, so it is off by about one system call per run.
struct IdlePolls<'a> {
    counters: &'a Counters,
    since: Option<u64>,
    polls: u32,
}

impl<'a> IdlePolls<'a> {
    const FLUSH_EVERY: u32 = 64;

    fn new(counters: &'a Counters) -> Self {
        // SAFETY: gettid has no preconditions.
        counters.far_tid.store(unsafe { libc::gettid() }, Ordering::Relaxed);
        IdlePolls { counters, since: None, polls: 0 }
    }

    /// A poll found nothing to do.
    fn empty(&mut self) {
        match self.since {
            None => self.since = Some(this_thread_ns()),
            Some(since) => {
                self.polls += 1;
                if self.polls.is_multiple_of(Self::FLUSH_EVERY) {
                    let now = this_thread_ns();
                    self.counters.far_idle_ns.fetch_add(now.saturating_sub(since), Ordering::Relaxed);
                    self.since = Some(now);
                }
            }
        }
    }

    /// A poll found work: ends a run of empty ones.
    fn busy(&mut self) {
        if let Some(since) = self.since.take() {
            self.counters.far_idle_ns.fetch_add(this_thread_ns().saturating_sub(since), Ordering::Relaxed);
            self.polls = 0;
        }
    }
}

/// Counts our frames arriving on `sock` into `delivered_*`. `expect_len`: the exact frame length
/// to verify (None for TSO, where the far side may see segments; bytes are counted then).
pub fn sink(sock: PacketSocket, counters: Arc<Counters>, expect_len: Option<usize>) -> FarThread {
    FarThread::spawn("bench-sink", move |st| {
        const B: usize = 64;
        const SNAP: usize = 64;
        let mut batch = RecvBatch::new(B, SNAP);
        let mut idle = IdlePolls::new(&counters);
        while !st.load(Ordering::Relaxed) {
            let n = sock.recv_batch(&mut batch);
            if n == 0 {
                idle.empty();
                // Poll, not sleep: a sleeping sink is woken by every frame, and that wake-up
                // (an IPI, ~20% of a 64 B frame's cost) lands on the sender, i.e. on the
                // backend under test. The load side has its own CPUs (see `placement`).
                std::thread::yield_now();
                continue;
            }
            idle.busy();
            let (mut frames, mut bytes, mut bad) = (0u64, 0u64, 0u64);
            for i in 0..n {
                let (b, len) = batch.frame(i);
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
}

/// Floods `frame` (with the UDP source port varied over 64 values) out of `sock` as fast as it
/// goes, counting into `offered_*`.
pub fn source(sock: PacketSocket, counters: Arc<Counters>, frame: Vec<u8>) -> FarThread {
    FarThread::spawn("bench-source", move |st| {
        let batch: Vec<Vec<u8>> = (0..64u16)
            .map(|i| {
                let mut f = frame.clone();
                frames::set_udp_sport(&mut f, 10000 + i);
                f
            })
            .collect();
        let len = frame.len() as u64;
        let mut idle = IdlePolls::new(&counters);
        while !st.load(Ordering::Relaxed) {
            let n = sock.send_batch(&batch) as u64;
            if n == 0 {
                idle.empty();
                std::thread::yield_now();
                continue;
            }
            idle.busy();
            counters.offered_frames.fetch_add(n, Ordering::Relaxed);
            counters.offered_bytes.fetch_add(n * len, Ordering::Relaxed);
        }
    })
}

/// What one look at the far side's socket found.
#[derive(Debug, PartialEq, Eq)]
pub enum Reflected {
    /// Nothing was waiting.
    Nothing,
    /// A frame that is not a test frame, dropped.
    Other,
    /// A test frame, sent back.
    TestFrame,
}

/// Takes one frame from `sock` and, if it is a test frame, sends it back with the MACs set to
/// `dst` / [`PEER_MAC`]. `buf` must hold the largest frame.
pub fn reflect_one(sock: &PacketSocket, buf: &mut [u8], dst: [u8; 6]) -> Reflected {
    match sock.try_recv(buf) {
        Some(n) if is_test_frame(&buf[..n]) => {
            buf[..6].copy_from_slice(&dst);
            buf[6..12].copy_from_slice(&PEER_MAC);
            let _ = sock.send(&buf[..n]);
            Reflected::TestFrame
        }
        Some(_) => Reflected::Other,
        None => Reflected::Nothing,
    }
}

/// Sends every test frame arriving on `sock` back (see [`reflect_one`]), polling the socket
/// (yielding the CPU between looks) until stopped.
pub fn reflector(sock: PacketSocket, dst: [u8; 6]) -> FarThread {
    FarThread::spawn("bench-reflect", move |st| {
        let mut buf = vec![0u8; 65536];
        while !st.load(Ordering::Relaxed) {
            // Polls, as the sink and source do: a reflector sleeping in poll(2) would leave its
            // CPU idle, and waking an idle CPU of this VM takes 20-40 us, which only the raw
            // loop's round trips would pay (in a vhost-user backend's, the frontend keeps that
            // CPU busy).
            if reflect_one(&sock, &mut buf, dst) == Reflected::Nothing {
                std::thread::yield_now();
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_idle_polls_add_up_the_cpu_of_runs_of_empty_polls_and_nothing_else() {
        let c = Counters::default();
        let mut idle = IdlePolls::new(&c);
        // SAFETY: gettid has no preconditions.
        assert_eq!(c.far_tid.load(Ordering::Relaxed), unsafe { libc::gettid() });
        // Busy polls between runs add nothing.
        idle.busy();
        assert_eq!(c.far_idle_ns.load(Ordering::Relaxed), 0);
        let start = this_thread_ns();
        idle.empty();
        let mut polls = 1u32;
        while this_thread_ns() - start < 20_000_000 {
            idle.empty();
            polls += 1;
        }
        let flushed = c.far_idle_ns.load(Ordering::Relaxed);
        assert!(polls > IdlePolls::FLUSH_EVERY && flushed > 0, "a long run is counted as it goes: {polls} polls, {flushed} ns");
        idle.busy();
        let run = c.far_idle_ns.load(Ordering::Relaxed);
        let spent = this_thread_ns() - start;
        assert!(run <= spent && run >= spent * 9 / 10, "run of empty polls {run} ns, thread CPU over it {spent} ns");
        idle.busy();
        assert_eq!(c.far_idle_ns.load(Ordering::Relaxed), run);
        // A short run (one long empty poll, no flush inside) is counted when it ends.
        idle.empty();
        let start = this_thread_ns();
        while this_thread_ns() - start < 5_000_000 {
            std::hint::spin_loop();
        }
        idle.busy();
        let short = c.far_idle_ns.load(Ordering::Relaxed) - run;
        assert!(short >= 5_000_000, "short run counted {short} ns");
    }

    #[test]
    fn udp_frames_have_the_asked_length_and_are_recognised() {
        for len in [0, 60, 1514, 9014] {
            let f = udp_frame(len, OTHER_MAC, PEER_MAC, 4000, 3);
            assert_eq!(f.len(), len.max(60));
            assert!(is_test_frame(&f));
            assert_eq!(f[MAGIC_OFF + 8..MAGIC_OFF + 12], 3u32.to_be_bytes());
        }
        let mut other = udp_frame(100, OTHER_MAC, PEER_MAC, 4000, 3);
        other[MAGIC_OFF] ^= 1;
        assert!(!is_test_frame(&other));
    }

    #[test]
    fn tso_frame_is_one_recognised_65214_byte_segment() {
        let f = tso_frame(OTHER_MAC, PEER_MAC);
        assert_eq!(f.len(), 14 + 40 + TSO_SEGS * usize::from(TSO_MSS));
        assert_eq!(f.len(), 65214);
        assert!(is_test_frame(&f));
        let seg = frames::parse_tcp(&f).expect("a TCP frame");
        assert_eq!((seg.dport, seg.payload.len()), (TSO_PORT, TSO_SEGS * usize::from(TSO_MSS)));
        assert!(seg.ip_csum_ok);
    }
}
