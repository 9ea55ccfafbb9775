//! The frontend side of a case: zero-copy TX posting (every TX slot is written once up front,
//! then chains are re-posted as the backend returns them) and RX buffer recycling that only
//! looks at the header and the magic, like a guest that hands frames up without copying.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vutap_frontend::features::NET_F_MRG_RXBUF;
use vutap_frontend::{rx_queue, tx_queue, NetFrontend, Segment, VirtioNetHdr};
use vutap_testbed::packet::PacketSocket;

use super::error::{LoadgenError, Result};
use super::wire::{is_test_frame, reflect_one, Counters, Reflected};

/// A driver thread owning the frontend; `stop` returns it (or the error that ended it).
pub struct Driver {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<NetFrontend>>,
}

impl Driver {
    pub fn stop(self) -> Result<NetFrontend> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().map_err(|_| LoadgenError::DriverPanicked)?
    }
}

/// Writes `hdr ++ frame` into every slot of every TX queue, so posting needs no copy.
pub fn prefill_tx(fe: &NetFrontend, hdr: &VirtioNetHdr, frame: &[u8]) {
    let mut h = [0u8; 12];
    let hl = fe.hdr_len();
    hdr.write_to(&mut h[..hl]);
    for pair in 0..fe.queue_pairs() {
        let q = fe.queue(tx_queue(pair)).expect("tx queue");
        for d in 0..q.size() {
            let gpa = q.slot_gpa(d);
            fe.memory().write(gpa, &h[..hl]);
            fe.memory().write(gpa + hl as u64, frame);
        }
    }
}

/// TX: keep every TX ring as full as the backend lets us, counting completions as offered.
pub fn tx(mut fe: NetFrontend, frame_len: usize, counters: Arc<Counters>) -> Driver {
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let handle = std::thread::Builder::new()
        .name("bench-tx".into())
        .spawn(move || {
            let seg = [Segment { off: 0, len: (fe.hdr_len() + frame_len) as u32 }];
            let pairs = fe.queue_pairs();
            while !st.load(Ordering::Relaxed) {
                let mut progress = 0u64;
                for pair in 0..pairs {
                    let q = fe.queue_mut(tx_queue(pair)).expect("tx queue");
                    let mut done = 0u64;
                    while let Some(e) = q.pop_used() {
                        if !e.known {
                            return Err(LoadgenError::UnknownId { dir: "TX", id: e.id });
                        }
                        done += 1;
                    }
                    let mut added = 0;
                    while added < 128 && q.num_free() > 0 {
                        q.add_chain(&seg, false)?;
                        added += 1;
                    }
                    if added > 0 && q.publish() {
                        q.kick().map_err(LoadgenError::Kick)?;
                    }
                    if done > 0 {
                        counters.offered_frames.fetch_add(done, Ordering::Relaxed);
                        counters.offered_bytes.fetch_add(done * frame_len as u64, Ordering::Relaxed);
                    }
                    progress += done + added;
                }
                if progress == 0 {
                    // Rings full and nothing returned: sleep until the backend has used 3/4 of
                    // what is in flight, as a Linux guest's stopped TX queue does. Spinning here
                    // would take a core from the backend on a small host.
                    // Arm every queue (no short-circuit), then see whether any is ready.
                    let mut ready = false;
                    for pair in 0..pairs {
                        let q = fe.queue_mut(tx_queue(pair)).expect("tx queue");
                        let pending = q.descriptors_in_flight() * 3 / 4;
                        ready |= q.enable_calls_after(pending);
                    }
                    if !ready {
                        wait_calls(&fe, (0..pairs).map(tx_queue));
                    }
                    (0..pairs).for_each(|pair| fe.queue_mut(tx_queue(pair)).expect("tx queue").disable_calls());
                }
            }
            Ok(fe)
        })
        .expect("spawn tx driver");
    Driver { stop, handle }
}

/// NAPI's poll budget in a Linux guest.
const NAPI_BUDGET: u16 = 64;

/// Whether a Linux guest refills its RX ring now: after a poll, `virtnet_receive` refills
/// (`try_fill_recv`, up to a full ring, one kick) only once more than min(budget, ring size) / 2
/// buffers are free, so mergeable buffers go back in batches of at least 33, not one by one.
fn linux_refills(num_free: u16, ring: u16) -> bool {
    num_free > NAPI_BUDGET.min(ring) / 2
}

/// RX: take frames off every RX ring, verify the first buffer, re-post the buffers (mergeable
/// ones in batches, as a Linux guest does; the others at once).
pub fn rx(mut fe: NetFrontend, counters: Arc<Counters>) -> Driver {
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let handle = std::thread::Builder::new()
        .name("bench-rx".into())
        .spawn(move || {
            let hl = fe.hdr_len();
            let buf_len = fe.options().rx_buf_len;
            let seg = [Segment { off: 0, len: buf_len }];
            let mrg = fe.acked_features() & NET_F_MRG_RXBUF != 0;
            let pairs = fe.queue_pairs();
            let mut peek = [0u8; 64];
            while !st.load(Ordering::Relaxed) {
                let (mut frames, mut bytes, mut any) = (0u64, 0u64, false);
                for pair in 0..pairs {
                    let q = fe.queue_mut(rx_queue(pair)).expect("rx queue");
                    let mut reposted = 0;
                    let mut budget = 256;
                    while budget > 0 {
                        let Some(first) = q.pop_used() else { break };
                        budget -= 1;
                        if !first.known {
                            return Err(LoadgenError::UnknownId { dir: "RX", id: first.id });
                        }
                        let slot = q.slot_gpa(first.id as u16);
                        let n = (first.len as usize).min(peek.len());
                        q.memory().read(slot, &mut peek[..n]);
                        let nb = if mrg && n >= 12 { u16::from_le_bytes([peek[10], peek[11]]).max(1) } else { 1 };
                        let mut len = (first.len as usize).saturating_sub(hl);
                        let ok = n > hl && is_test_frame(&peek[hl..n]);
                        let mut used = 1;
                        let deadline = Instant::now() + Duration::from_secs(1);
                        while used < nb {
                            match q.pop_used() {
                                Some(e) => {
                                    len += e.len as usize;
                                    used += 1;
                                }
                                None if Instant::now() > deadline => return Err(LoadgenError::MergedFrameShort { used, expected: nb }),
                                None => std::hint::spin_loop(),
                            }
                        }
                        if !mrg {
                            for _ in 0..used {
                                q.add_chain(&seg, true)?;
                                reposted += 1;
                            }
                        }
                        // Anything else is kernel chatter (ND, ARP): not ours, not counted.
                        if ok {
                            frames += 1;
                            bytes += len as u64;
                        }
                        any = true;
                    }
                    if mrg && linux_refills(q.num_free(), q.size()) {
                        while q.num_free() > 0 {
                            q.add_chain(&seg, true)?;
                            reposted += 1;
                        }
                    }
                    if reposted > 0 && q.publish() {
                        q.kick().map_err(LoadgenError::Kick)?;
                    }
                }
                if !any {
                    // Nothing arrived: sleep until the backend calls, like NAPI re-arming the
                    // interrupt when a poll comes back under budget.
                    let mut ready = false;
                    for pair in 0..pairs {
                        ready |= fe.queue_mut(rx_queue(pair)).expect("rx queue").enable_calls();
                    }
                    if !ready {
                        wait_calls(&fe, (0..pairs).map(rx_queue));
                    }
                    (0..pairs).for_each(|pair| fe.queue_mut(rx_queue(pair)).expect("rx queue").disable_calls());
                    continue;
                }
                counters.delivered_frames.fetch_add(frames, Ordering::Relaxed);
                counters.delivered_bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            Ok(fe)
        })
        .expect("spawn rx driver");
    Driver { stop, handle }
}

/// Sleeps until one of `queues` is called, or 10 ms pass (so a stop request is seen); clears
/// the call eventfds that fired.
fn wait_calls(fe: &NetFrontend, queues: impl Iterator<Item = u16>) {
    let mut fds: Vec<libc::pollfd> =
        queues.map(|i| libc::pollfd { fd: fe.queue(i).expect("queue").call_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    // SAFETY: `fds` is a valid pollfd array of its length for the duration of the call.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 10) };
    if r > 0 {
        let mut buf = [0u8; 8];
        for p in fds.iter().filter(|p| p.revents & libc::POLLIN != 0) {
            // SAFETY: reading 8 bytes into an 8-byte buffer from an eventfd we own.
            unsafe { libc::read(p.fd, buf.as_mut_ptr() as *mut libc::c_void, 8) };
        }
    }
}

/// 64 B ping-pong on pair 0: send one frame, reflect it on the far side, then poll RX until
/// it comes back. The first `warmup` round trips are not recorded.
///
/// The far side's reflector runs on this thread, between the frontend's looks: the two stand in
/// for a guest and a far host on a CPU each, both polling, but share the load CPU here, and
/// with one frame in flight only one of them has anything to do at a time. As two threads they
/// would hand that CPU to each other twice per round trip (~1 us on this host,
/// `scripts/probes/handoff.c`), which a raw loop, whose reflector has the load CPU to itself,
/// does not pay.
pub fn ping_pong(
    fe: &mut NetFrontend,
    far: &PacketSocket,
    reply_to: [u8; 6],
    frame: &[u8],
    warmup: usize,
    samples: usize,
    budget: Duration,
) -> Result<Vec<u64>> {
    let hdr = VirtioNetHdr::default();
    let mut rtts = Vec::with_capacity(samples);
    let mut buf = vec![0u8; 65536];
    let end = Instant::now() + budget;
    let mut trips = 0;
    while rtts.len() < samples && Instant::now() < end {
        trips += 1;
        fe.reclaim_tx(0)?;
        let t0 = Instant::now();
        fe.send_frame(0, &hdr, frame)?;
        let mut reflected = false;
        loop {
            if !reflected {
                reflected = reflect_one(far, &mut buf, reply_to) == Reflected::TestFrame;
            } else {
                let mut got = false;
                fe.recv_batch(0, 16, |_, p| got |= is_test_frame(p))?;
                if got {
                    if trips > warmup {
                        rtts.push(t0.elapsed().as_nanos() as u64);
                    }
                    break;
                }
            }
            if t0.elapsed() > Duration::from_millis(200) {
                break;
            }
        }
    }
    Ok(rtts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_linux_refills_once_more_than_half_a_budget_is_free() {
        assert!(!linux_refills(0, 256));
        assert!(!linux_refills(32, 256));
        assert!(linux_refills(33, 256));
        assert!(linux_refills(9, 16), "a small ring refills past half of itself");
        assert!(!linux_refills(8, 16));
    }
}
