//! Bounded work on hostile rings: a guest that never stops posting (bad chains, or good frames
//! as fast as it can) cannot keep its queue pair's worker from stopping promptly or starve the
//! other pair; chains longer than one readv/writev takes are refused, not cut; and a frontend
//! that never reads its backend request channel cannot hang link notifications or its own
//! disconnect.
//!
//! The daemon runs in-process on a tap or macvtap; a second thread plays the guest vCPU that
//! keeps posting (`RawPoster`), re-posting the same heads without waiting for them.
//!
//! Needs root; run with `cargo test -p vutap-tests --test bounded`.

mod common;
mod hardening_util;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use hardening_util::*;
use vhost::vhost_user::message::FrontendReq;
use vhost::vhost_user::{VhostUserFrontend, VhostUserProtocolFeatures};
use vutap::control::link_state::LinkMonitor;
use vutap_frontend::net::{rx_queue, tx_queue};
use vutap_frontend::virtqueue::{
    RawPoster, VIRTQ_DESC_F_INDIRECT as F_INDIRECT, VIRTQ_DESC_F_NEXT as F_NEXT, VIRTQ_DESC_F_WRITE as F_WRITE,
};
use vutap_frontend::{DriverQueue, FrontendOptions, NetFrontend, VirtioNetHdr};

const WAIT: Duration = Duration::from_secs(5);
/// Stop must take effect within this, whatever the guest does.
const STOP_WITHIN: Duration = Duration::from_millis(100);
const GET_VRING_BASE: u32 = FrontendReq::GET_VRING_BASE as u32;
/// Chains one RX pass may pop (128 frames x 4 chains per frame).
const RX_CHAIN_BUDGET: u64 = 512;
const IOV_MAX: usize = 1024;

/// A descriptor index at the top of the table, away from the frontend's own chains.
fn top(q: &DriverQueue, i: u16) -> u16 {
    q.size() - 1 - i
}

/// One frame out of `pair`, byte for byte at the far end.
fn tx_ok(bed: &Bed, fe: &mut NetFrontend, pair: u16, seq: u32) {
    let out = test_frame(bed.far_mac, bed.guest_mac, 600, seq);
    fe.send_frame(pair, &VirtioNetHdr::default(), &out).expect("send_frame");
    let got = bed.far.recv_matching(WAIT, |f| is_test_frame(f) && seq_of(f) == seq);
    assert!(got.as_deref() == Some(&out[..]), "TX on pair {pair} (seq {seq}) did not arrive intact");
    fe.reclaim_tx(pair).expect("reclaim_tx");
}

/// One frame from the far end, received on whichever of `pairs` the tap steers it to.
fn rx_ok(bed: &Bed, fe: &mut NetFrontend, pairs: &[u16], seq: u32) {
    let inb = test_frame(bed.guest_mac, bed.far_mac, 600, seq);
    bed.far.send(&inb);
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        for &pair in pairs {
            if let Ok(Some(fr)) = fe.recv_frame(pair, Duration::from_millis(20)) {
                if fr.payload == inb {
                    return;
                }
            }
        }
    }
    panic!("RX frame seq {seq} never reached the guest");
}

/// Lets only frames of the test ethertype into the far end's socket, so a flood of other
/// frames cannot crowd the ones a test waits for out of its buffer.
fn only_test_frames(far: &PacketSocket) {
    let code = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    let prog = [
        code(0x28, 0, 0, 12),                   // ldh [12]
        code(0x15, 0, 1, u32::from(ETHERTYPE)), // jeq ETHERTYPE
        code(0x06, 0, 0, u32::MAX),             // ret accept
        code(0x06, 0, 0, 0),                    // ret drop
    ];
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_ptr() as *mut libc::sock_filter };
    // SAFETY: a valid socket and a sock_fprog pointing at `prog`, alive for the call.
    let rc = unsafe {
        libc::setsockopt(
            far.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as u32,
        )
    };
    assert_eq!(rc, 0, "SO_ATTACH_FILTER: {}", std::io::Error::last_os_error());
}

/// Keeps `heads` posted on a queue until `stop`: re-posts them as fast as the device takes
/// them, never waiting for them to come back, and never more than a ring ahead of what the
/// device has returned (a ring further ahead is a broken ring, a different case). Returns how
/// many it posted.
fn keep_posting(mut poster: RawPoster, size: u16, heads: &[u16], stop: &AtomicBool) -> u64 {
    let mut posted = 0u64;
    let mut next = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let in_flight = poster.avail_idx().wrapping_sub(poster.used_idx());
        let room = size.saturating_sub(in_flight).min(32);
        if room == 0 {
            std::hint::spin_loop();
            continue;
        }
        let batch: Vec<u16> = (0..room).map(|i| heads[(next + usize::from(i)) % heads.len()]).collect();
        next += usize::from(room);
        poster.post(&batch);
        posted += u64::from(room);
        let _ = poster.kick();
    }
    posted
}

/// Sets the flag when dropped, so a failed assertion in a scope stops the guest thread (the
/// scope joins it before the panic goes on).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// GET_VRING_BASE on `queue` over a raw dup of the connection; returns how long the stop took.
fn timed_stop(raw: &std::os::fd::OwnedFd, queue: u16) -> Duration {
    let t = Instant::now();
    raw_send(raw.as_raw_fd(), GET_VRING_BASE, NO_REPLY, 8, &words(&[u32::from(queue), 0]), &[]).unwrap();
    let reply = raw_reply(raw.as_raw_fd(), WAIT);
    let took = t.elapsed();
    assert!(matches!(reply, Reply::U64(v) if v as u32 == u32::from(queue)), "GET_VRING_BASE reply: {reply:?}");
    took
}

fn opts(queue_pairs: u16, queue_size: u16, rx_prefill: bool) -> FrontendOptions {
    FrontendOptions { queue_pairs, queue_size, rx_prefill, tx_buf_len: 20480, ..FrontendOptions::default() }
}

// ------------------------------------------------------------------------------- stop latency

#[test]
fn test_bounded_stop_is_prompt_while_guest_reposts_bad_rx_chains() {
    capture_logs();
    let _g = serial();
    let bed = Bed::tap(2);
    const QSIZE: u16 = 1024;
    let mut fe = bed.daemon.connect(opts(2, QSIZE, false));
    fe.post_rx_buffers(1, 64).unwrap();
    let mark = log_mark();
    let raw = conn_fd(fe.vhost());
    let q = fe.queue_mut(rx_queue(0)).unwrap();
    let (a, b) = (top(q, 0), top(q, 1));
    let s = q.slot_gpa(a);
    // a: read-only in RX. b: chained to itself, so each posting walks the whole table.
    q.write_descriptor(a, desc(s, 2048, 0, 0));
    q.write_descriptor(b, desc(s, 2048, F_WRITE | F_NEXT, b));
    let poster = q.raw_poster().unwrap();
    let refused = |bed: &Bed| {
        let c = bed.daemon.dev.metrics[0].snapshot();
        c.rx_bad_chains + c.rx_too_many_segments
    };
    let stop = AtomicBool::new(false);
    let (posted, stop_took) = std::thread::scope(|sc| {
        let guest = sc.spawn(|| keep_posting(poster, QSIZE, &[a, b], &stop));
        let _stop_guest = StopOnDrop(&stop);
        // The flood is on: many passes' worth of chains refused ...
        let flooding = wait_until(WAIT, || refused(&bed) > 20 * RX_CHAIN_BUDGET);
        // ... while both pairs' TX, and pair 1's RX, still move frames.
        for seq in 0..5 {
            tx_ok(&bed, &mut fe, 1, seq);
            tx_ok(&bed, &mut fe, 0, 100 + seq);
        }
        let before = refused(&bed);
        assert!(wait_until(WAIT, || refused(&bed) > before), "the flood ran throughout");
        let took = if flooding { timed_stop(&raw, rx_queue(0)) } else { Duration::MAX };
        stop.store(true, Ordering::Relaxed);
        (guest.join().unwrap(), took)
    });
    let c = bed.daemon.dev.metrics[0].snapshot();
    eprintln!(
        "bad RX chain flood: {posted} posted, {} refused in {} published batches; stop took {stop_took:?}",
        c.rx_bad_chains + c.rx_too_many_segments,
        c.rx_batches
    );
    assert!(stop_took != Duration::MAX, "the flood never got going: {c:?}\n{}", log_since(mark));
    assert!(stop_took < STOP_WITHIN, "stop took {stop_took:?} with a guest re-posting bad RX chains");
    assert_eq!(c.rings_broken, 0, "the guest stayed within the ring");
    assert!(c.rx_batches > 0 && (c.rx_bad_chains + c.rx_too_many_segments) / c.rx_batches <= RX_CHAIN_BUDGET, "{c:?}");
    assert!(logged_since(mark, "malformed RX chain", WAIT), "{}", log_since(mark));
    // The other pair still moves frames both ways after the stop (pair 0's tap queue is
    // detached now, so every frame comes to pair 1).
    tx_ok(&bed, &mut fe, 1, 200);
    rx_ok(&bed, &mut fe, &[1], 201);
    drop((fe, raw));
    let mut fe = bed.daemon.connect(opts(2, 256, true));
    tx_ok(&bed, &mut fe, 0, 300);
    tx_ok(&bed, &mut fe, 1, 301);
    rx_ok(&bed, &mut fe, &[0, 1], 302);
    assert!(!panicked_since(mark), "{}", log_since(mark));
}

#[test]
fn test_bounded_stop_is_prompt_under_a_good_tx_flood() {
    capture_logs();
    let _g = serial();
    let bed = Bed::tap(2);
    only_test_frames(&bed.far);
    const QSIZE: u16 = 1024;
    let mut fe = bed.daemon.connect(opts(2, QSIZE, true));
    let mark = log_mark();
    let raw = conn_fd(fe.vhost());
    // One good frame (another ethertype, so the far end's filter drops the copies), posted
    // again and again on pair 0's TX ring.
    let mut flood_frame = test_frame(bed.far_mac, bed.guest_mac, 600, 7);
    flood_frame[12..14].copy_from_slice(&(ETHERTYPE + 1).to_be_bytes());
    let hdr_len = fe.hdr_len();
    let q = fe.queue_mut(tx_queue(0)).unwrap();
    let head = top(q, 0);
    let s = q.slot_gpa(head);
    let mut bytes = vec![0u8; hdr_len];
    bytes.extend_from_slice(&flood_frame);
    assert!(q.memory().write(s, &bytes));
    q.write_descriptor(head, desc(s, bytes.len() as u32, 0, 0));
    let poster = q.raw_poster().unwrap();
    let sent = |bed: &Bed| bed.daemon.dev.metrics[0].snapshot().tx_frames;
    let stop = AtomicBool::new(false);
    let (posted, stop_took) = std::thread::scope(|sc| {
        let guest = sc.spawn(|| keep_posting(poster, QSIZE, &[head], &stop));
        let _stop_guest = StopOnDrop(&stop);
        let flooding = wait_until(WAIT, || sent(&bed) > 10_000);
        for seq in 0..5 {
            tx_ok(&bed, &mut fe, 1, seq);
        }
        rx_ok(&bed, &mut fe, &[0, 1], 50);
        let before = sent(&bed);
        assert!(wait_until(WAIT, || sent(&bed) > before), "the flood ran throughout");
        let took = if flooding { timed_stop(&raw, tx_queue(0)) } else { Duration::MAX };
        stop.store(true, Ordering::Relaxed);
        (guest.join().unwrap(), took)
    });
    let c = bed.daemon.dev.metrics[0].snapshot();
    eprintln!("good TX flood: {posted} posted, {} sent in {} batches; stop took {stop_took:?}", c.tx_frames, c.tx_batches);
    assert!(stop_took != Duration::MAX, "the flood never got going: {c:?}\n{}", log_since(mark));
    assert!(stop_took < STOP_WITHIN, "stop took {stop_took:?} under a TX flood");
    assert_eq!((c.rings_broken, c.tx_bad_chains, c.tx_dropped), (0, 0, 0), "{c:?}");
    tx_ok(&bed, &mut fe, 1, 200);
    drop((fe, raw));
    let mut fe = bed.daemon.connect(opts(2, 256, true));
    tx_ok(&bed, &mut fe, 0, 300);
    tx_ok(&bed, &mut fe, 1, 301);
    assert!(!panicked_since(mark), "{}", log_since(mark));
}

// ------------------------------------------------------------------------------- IOV_MAX

/// Writes an indirect table of `n` descriptors at `table`, descriptor i covering
/// `seg` bytes at `data + i * seg` with `flags`; returns its length in bytes.
fn write_table(q: &DriverQueue, table: u64, data: u64, n: usize, seg: u32, flags: u16) -> u32 {
    for i in 0..n {
        let last = i + 1 == n;
        let f = flags | if last { 0 } else { F_NEXT };
        let d = desc(data + i as u64 * u64::from(seg), seg, f, (i + 1) as u16);
        assert!(q.memory().write(table + 16 * i as u64, &d.to_bytes()));
    }
    16 * n as u32
}

fn drain_used(q: &mut DriverQueue) -> Vec<(u32, u32)> {
    std::iter::from_fn(|| q.pop_used()).map(|e| (e.id, e.len)).collect()
}

#[test]
fn test_bounded_chains_over_iov_max_are_refused_tx_and_rx() {
    capture_logs();
    let _g = serial();
    let bed = Bed::tap(1);
    // A ring larger than IOV_MAX, so the spec's bound (the queue size) is not what refuses.
    const QSIZE: u16 = 2048;
    let mut fe = bed.daemon.connect(opts(1, QSIZE, false));
    let mark = log_mark();
    let hdr_len = fe.hdr_len();

    // TX: the same frame through IOV_MAX + 1 and through IOV_MAX four-byte segments.
    let seg = 4u32;
    let frame_len = IOV_MAX * seg as usize - hdr_len;
    let (over_seq, at_seq) = (11, 12);
    let q = fe.queue_mut(tx_queue(0)).unwrap();
    let (h_over, h_at) = (top(q, 0), top(q, 1));
    let mut heads = Vec::new();
    let mut want_at = Vec::new();
    for (i, (h, seq, n)) in [(h_over, over_seq, IOV_MAX + 1), (h_at, at_seq, IOV_MAX)].into_iter().enumerate() {
        let data = q.slot_gpa(top(q, 2 + 2 * i as u16));
        let table = q.slot_gpa(top(q, 3 + 2 * i as u16));
        let frame = test_frame(bed.far_mac, bed.guest_mac, frame_len + seg as usize, seq);
        let mut bytes = vec![0u8; hdr_len];
        bytes.extend_from_slice(&frame);
        assert!(q.memory().write(data, &bytes));
        let len = write_table(q, table, data, n, seg, 0);
        q.write_descriptor(h, desc(table, len, F_INDIRECT, 0));
        heads.push(h);
        if n == IOV_MAX {
            want_at = bytes[hdr_len..IOV_MAX * seg as usize].to_vec();
        }
    }
    q.add_raw_descriptors(&[], &heads);
    q.kick().unwrap();
    let got = bed.far.recv_matching(WAIT, |f| is_test_frame(f) && seq_of(f) == at_seq);
    assert!(got.as_deref() == Some(&want_at[..]), "the {IOV_MAX}-segment frame arrives byte for byte");
    let c = || bed.daemon.dev.metrics[0].snapshot();
    assert!(wait_until(WAIT, || c().tx_too_many_segments == 1), "{:?}\n{}", c(), log_since(mark));
    assert_eq!((c().tx_frames, c().tx_bad_chains), (1, 0), "{:?}", c());
    let q = fe.queue_mut(tx_queue(0)).unwrap();
    assert!(wait_until(WAIT, || q.has_used()));
    assert_eq!(drain_used(q), vec![(u32::from(h_over), 0), (u32::from(h_at), 0)]);
    assert!(
        bed.far.recv_matching(Duration::from_millis(200), |f| is_test_frame(f) && seq_of(f) == over_seq).is_none(),
        "a cut frame went out"
    );
    assert!(logged_since(mark, "more than 1024 segments", WAIT), "{}", log_since(mark));

    // RX: IOV_MAX two-byte segments is one too many (a read keeps one iovec for its spill
    // tail); IOV_MAX - 1 takes a frame byte for byte. Plain buffers follow for the rest of
    // the largest frame's room.
    let q = fe.queue_mut(rx_queue(0)).unwrap();
    let (h_over, h_at) = (top(q, 0), top(q, 1));
    let tx = fe.queue(tx_queue(0)).unwrap();
    let (t_over, t_at, data) = (tx.slot_gpa(top(tx, 10)), tx.slot_gpa(top(tx, 12)), tx.slot_gpa(top(tx, 14)));
    let q = fe.queue_mut(rx_queue(0)).unwrap();
    let len_over = write_table(q, t_over, data, IOV_MAX, 2, F_WRITE);
    let len_at = write_table(q, t_at, data, IOV_MAX - 1, 2, F_WRITE);
    q.add_raw_descriptors(&[(h_over, desc(t_over, len_over, F_INDIRECT, 0)), (h_at, desc(t_at, len_at, F_INDIRECT, 0))], &[h_over, h_at]);
    q.kick().unwrap();
    fe.post_rx_buffers(0, 64).unwrap();
    let inb = test_frame(bed.guest_mac, bed.far_mac, 600, 21);
    bed.far.send(&inb);
    let q = fe.queue_mut(rx_queue(0)).unwrap();
    // A pass adds its counters one by one: wait for all it should have added.
    let expected = |c: vutap::metrics::PairCounts| (c.rx_frames, c.rx_too_many_segments, c.rx_bad_chains) == (1, 1, 0);
    assert!(wait_until(WAIT, || expected(c())), "{:?}\n{}", c(), log_since(mark));
    let used = drain_used(q);
    assert_eq!(used, vec![(u32::from(h_over), 0), (u32::from(h_at), (hdr_len + inb.len()) as u32)]);
    let mut got = vec![0u8; hdr_len + inb.len()];
    assert!(fe.memory().read(data, &mut got));
    assert_eq!(&got[hdr_len..], &inb[..], "delivered byte for byte through {} segments", IOV_MAX - 1);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert!(!panicked_since(mark), "{}", log_since(mark));
}

// ------------------------------------------------------------------------------- backend channel

#[test]
fn test_bounded_backend_channel_never_read_does_not_hang_disconnect() {
    capture_logs();
    let _g = serial();
    let bed = Bed::macvtap_serve_forever(1);
    let dev = bed.daemon.dev.clone();
    let topo = bed.topo.as_ref().unwrap();
    let _monitor = LinkMonitor::spawn(
        "bounded".into(),
        bed.tap_name.clone(),
        dev.link.clone(),
        dev.device_metrics.clone(),
        Duration::from_millis(2),
        dev.policy.seccomp,
    )
    .expect("link monitor");
    let mut o = FrontendOptions::default();
    o.requested_protocol |= VhostUserProtocolFeatures::BACKEND_REQ;
    let mut fe = bed.daemon.connect(o);
    assert!(fe.protocol_features().contains(VhostUserProtocolFeatures::BACKEND_REQ | VhostUserProtocolFeatures::CONFIG));
    let (ours, theirs) = UnixStream::pair().unwrap();
    // The smallest send buffer, so the unread channel fills after a few messages.
    let small: libc::c_int = 1;
    // SAFETY: setsockopt on a valid socket with a pointer to a c_int of the given size.
    assert_eq!(
        unsafe { libc::setsockopt(theirs.as_raw_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, (&small as *const libc::c_int).cast(), 4) },
        0
    );
    fe.vhost().set_backend_request_fd(&theirs).unwrap();
    drop(theirs);
    assert!(wait_until(WAIT, || dev.link.has_channel()));
    let m = &dev.device_metrics;
    let changes = |m: &vutap::metrics::DeviceMetrics| m.link_changes.load(Ordering::Relaxed);
    let (changes0, sent0, dropped0) =
        (changes(m), m.config_change_msgs.load(Ordering::Relaxed), m.config_change_dropped.load(Ordering::Relaxed));
    const FLAPS: u64 = 20;
    for i in 0..FLAPS * 2 {
        let state = if i % 2 == 0 { "down" } else { "up" };
        sh("ip", &["link", "set", &topo.lower, state]);
        assert!(wait_until(WAIT, || changes(m) > changes0 + i), "link change {i} ({state}) not seen: the monitor is stuck");
    }
    // The monitor counts a change before it sends or drops its message: wait for the last one.
    let sent = || m.config_change_msgs.load(Ordering::Relaxed) - sent0;
    let dropped = || m.config_change_dropped.load(Ordering::Relaxed) - dropped0;
    let settled = wait_until(WAIT, || sent() + dropped() == changes(m) - changes0);
    let (sent, dropped) = (sent(), dropped());
    eprintln!("{} link changes: {sent} CONFIG_CHANGE_MSG sent, {dropped} dropped (channel never read)", changes(m) - changes0);
    assert!(settled, "every link change is sent or counted as dropped");
    assert_eq!(sent + dropped, changes(m) - changes0);
    assert!(dropped > 0, "the channel never filled up (sent {sent})");
    assert!(dev.link.is_up());

    let disconnects = m.disconnects.load(Ordering::Relaxed);
    let t = Instant::now();
    drop(fe);
    assert!(wait_until(WAIT, || m.disconnects.load(Ordering::Relaxed) > disconnects), "the disconnect hung");
    let took = t.elapsed();
    eprintln!("disconnect with an unread, full backend channel took {took:?}");
    assert!(took < Duration::from_secs(1), "disconnect took {took:?}");
    assert!(!dev.link.has_channel());
    drop(ours);

    // The next connection is served.
    let mut fe = bed.daemon.connect(FrontendOptions::default());
    tx_ok(&bed, &mut fe, 0, 1);
    rx_ok(&bed, &mut fe, &[0], 2);
}
