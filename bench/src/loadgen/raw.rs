//! The ceiling: the same traffic through a tight write/read loop on the tap fds themselves, no
//! vhost-user in between. One thread per fd, as a backend would have one worker per pair.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vutap::tap::{Tap, TapQueue, TapSpec};

use super::wire::{is_test_frame, Counters};

/// `queues` queues of `spec` as vutap opens them (non-blocking, IFF_VNET_HDR), then set up as the
/// raw loops want them: a 12-byte vnet header, the kernel's default send buffer (`Tap::open`
/// raises it to INT_MAX for the daemon; the ceiling has always measured with the default), and
/// attached (`Tap::open` leaves them detached).
fn open(spec: &TapSpec, queues: u16) -> io::Result<Vec<TapQueue>> {
    let tap = Tap::open(spec, usize::from(queues)).map_err(io::Error::other)?;
    let wmem_default: libc::c_int = std::fs::read_to_string("/proc/sys/net/core/wmem_default")?
        .trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("net.core.wmem_default: {e}")))?;
    for q in &tap.queues {
        q.set_vnet_hdr_len(12).map_err(io::Error::other)?;
        q.set_sndbuf(wmem_default)?;
        q.set_attached(true).map_err(io::Error::other)?;
    }
    Ok(tap.queues)
}

/// Opens a macvtap's `/dev/tapN` `queues` times.
pub fn open_macvtap(dev: &Path, queues: u16) -> io::Result<Vec<TapQueue>> {
    open(&TapSpec::DevPath(dev.to_path_buf()), queues)
}

/// Creates (or attaches to) multi-queue tap `name` with `queues` fds.
pub fn open_tap(name: &str, queues: u16) -> io::Result<Vec<TapQueue>> {
    open(&TapSpec::Name(name.to_string()), queues)
}

/// The raw loop's worker threads; their kernel thread ids are published for CPU accounting.
pub struct RawLoop {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
    pub tids: Vec<Arc<AtomicI32>>,
}

impl RawLoop {
    /// One thread per queue, each running what `work` made for its queue until told to stop.
    fn spawn<W>(fds: Vec<TapQueue>, mut work: impl FnMut(TapQueue) -> W) -> RawLoop
    where
        W: FnOnce(&AtomicBool) + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        let mut tids = Vec::new();
        for fd in fds {
            let (st, tid) = (stop.clone(), Arc::new(AtomicI32::new(0)));
            tids.push(tid.clone());
            let w = work(fd);
            handles.push(std::thread::spawn(move || {
                tid.store(gettid(), Ordering::Relaxed);
                w(&st);
            }));
        }
        RawLoop { stop, handles, tids }
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

fn poll(fd: RawFd, events: i16) {
    let mut pfd = libc::pollfd { fd, events, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, 20) };
}

/// Buffers each raw loop cycles through: as many as a virtqueue has descriptors (the bench
/// frontend's queue size), so the loop copies from and to memory as cold as a backend's guest
/// buffers are. With one buffer, always in L1, the "ceiling" measured the cache, not the tap.
pub const BUFFERS: usize = 256;

/// The most a read can return: the largest frame a tap hands out, with its header.
const LARGEST_READ: usize = 65536 + 12;

/// A raw loop's buffers laid out as the bench frontend lays out a queue's guest buffers
/// (`QueueLayout`): `BUFFERS` slots of `slot_len` bytes one after another from a page boundary.
/// What a frame's copy costs depends on where its bytes sit in the caches: in buffers packed
/// tighter than the guest's slots the same copy is cheaper, and the ceiling would measure its
/// layout rather than the tap.
struct Slots {
    mem: Vec<u8>,
    base: usize,
    slot_len: usize,
}

impl Slots {
    /// `tail` bytes past the last slot stay writable, for a read that starts in a late slot.
    fn new(slot_len: usize, tail: usize) -> Slots {
        let mem = vec![0u8; 4096 + BUFFERS * slot_len + tail];
        let base = mem.as_ptr().align_offset(4096);
        Slots { mem, base, slot_len }
    }

    fn offset(&self, i: usize) -> usize {
        self.base + i * self.slot_len
    }
}

/// TX ceiling: each thread writes `vnet_hdr ++ frame` to its fd in a tight loop, from `slot_len`
/// byte slots.
pub fn tx(fds: Vec<TapQueue>, hdr: [u8; 12], frame: Vec<u8>, slot_len: usize, counters: Arc<Counters>) -> RawLoop {
    let mut out = hdr.to_vec();
    out.extend_from_slice(&frame);
    assert!(out.len() <= slot_len, "a {}-byte frame in {slot_len}-byte slots", out.len());
    let len = frame.len() as u64;
    RawLoop::spawn(fds, |fd| {
        let c = counters.clone();
        let mut slots = Slots::new(slot_len, 0);
        for i in 0..BUFFERS {
            let at = slots.offset(i);
            slots.mem[at..at + out.len()].copy_from_slice(&out);
        }
        let n_out = out.len();
        move |st: &AtomicBool| {
            let raw = fd.as_raw_fd();
            let mut next = 0;
            while !st.load(Ordering::Relaxed) {
                let mut n = 0u64;
                for _ in 0..32 {
                    let buf = &slots.mem[slots.offset(next)..][..n_out];
                    // SAFETY: buf is valid for buf.len() bytes.
                    let r = unsafe { libc::write(raw, buf.as_ptr().cast(), buf.len()) };
                    if r < 0 {
                        break;
                    }
                    next = (next + 1) % BUFFERS;
                    n += 1;
                }
                if n == 0 {
                    poll(raw, libc::POLLOUT);
                    continue;
                }
                c.offered_frames.fetch_add(n, Ordering::Relaxed);
                c.offered_bytes.fetch_add(n * len, Ordering::Relaxed);
            }
        }
    })
}

/// RX ceiling: each thread reads its fd until EAGAIN, verifying and counting our frames. A frame
/// goes into `slot_len` byte slots from the next free one on, taking as many as it fills, as a
/// frame takes consecutive mergeable buffers of a guest that posts them in order.
pub fn rx(fds: Vec<TapQueue>, slot_len: usize, counters: Arc<Counters>) -> RawLoop {
    RawLoop::spawn(fds, |fd| {
        let c = counters.clone();
        let mut slots = Slots::new(slot_len, LARGEST_READ);
        move |st: &AtomicBool| {
            let raw = fd.as_raw_fd();
            let mut next = 0;
            while !st.load(Ordering::Relaxed) {
                let (mut frames, mut bytes) = (0u64, 0u64);
                for _ in 0..32 {
                    let at = slots.offset(next);
                    let buf = &mut slots.mem[at..];
                    // SAFETY: buf is valid for writes of buf.len() bytes.
                    let r = unsafe { libc::read(raw, buf.as_mut_ptr().cast(), buf.len()) };
                    if r <= 12 {
                        break;
                    }
                    next = (next + (r as usize).div_ceil(slot_len)) % BUFFERS;
                    let f = &buf[12..r as usize];
                    if is_test_frame(f) {
                        frames += 1;
                        bytes += f.len() as u64;
                    }
                }
                if frames == 0 {
                    poll(raw, libc::POLLIN);
                    continue;
                }
                c.delivered_frames.fetch_add(frames, Ordering::Relaxed);
                c.delivered_bytes.fetch_add(bytes, Ordering::Relaxed);
            }
        }
    })
}

/// 64 B ping-pong on fd 0: write a frame, busy-read until it comes back. Returns RTTs in ns,
/// leaving out the first `warmup` round trips.
pub fn ping_pong(fd: &TapQueue, frame: &[u8], warmup: usize, samples: usize, budget: std::time::Duration) -> Vec<u64> {
    let raw = fd.as_raw_fd();
    let mut out = vec![0u8; 12];
    out.extend_from_slice(frame);
    let mut buf = vec![0u8; LARGEST_READ];
    let mut rtts = Vec::with_capacity(samples);
    let end = std::time::Instant::now() + budget;
    let mut trips = 0;
    while rtts.len() < samples && std::time::Instant::now() < end {
        trips += 1;
        let t0 = std::time::Instant::now();
        // SAFETY: out is valid for out.len() bytes.
        if unsafe { libc::write(raw, out.as_ptr().cast(), out.len()) } < 0 {
            continue;
        }
        loop {
            // SAFETY: buf is valid for writes of buf.len() bytes.
            let r = unsafe { libc::read(raw, buf.as_mut_ptr().cast(), buf.len()) };
            if r > 12 && is_test_frame(&buf[12..r as usize]) {
                if trips > warmup {
                    rtts.push(t0.elapsed().as_nanos() as u64);
                }
                break;
            }
            if t0.elapsed() > std::time::Duration::from_millis(200) {
                break; // lost
            }
        }
    }
    rtts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_slots_start_on_a_page_sit_slot_len_apart_and_a_read_in_the_last_takes_any_frame() {
        let s = Slots::new(1536, LARGEST_READ);
        assert_eq!((s.mem.as_ptr() as usize + s.offset(0)) % 4096, 0);
        assert_eq!(s.offset(3) - s.offset(0), 3 * 1536);
        assert!(s.mem.len() - s.offset(BUFFERS - 1) >= LARGEST_READ);
        let t = Slots::new(16384, 0);
        assert_eq!(t.mem.len() - t.offset(BUFFERS - 1), 16384 + 4096 - t.base);
    }
}
