//! Hostile-input suite: a guest or frontend that puts garbage in its virtqueues or on
//! the vhost-user socket. Every case asserts the log line, the drop counter (or the stopped
//! ring, or the closed connection), that the other queue pair and the next connection still
//! move frames, and that nothing panicked.
//!
//! The daemon runs in-process on a multi-queue tap (`Bed::tap(2)`); bad descriptors are written
//! with the test frontend's raw API at the top of the descriptor table (slots the frontend's own
//! chains never reach in these tests), bad messages are sent on a dup of the live connection.
//!
//! Needs root; run with `cargo test -p vutap-tests --test hostile`.

mod common;
mod hardening_util;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;
use hardening_util::*;
use vhost::vhost_user::message::FrontendReq;
use vutap_frontend::net::{rx_queue, tx_queue};
use vutap_frontend::virtqueue::{VIRTQ_DESC_F_INDIRECT as F_INDIRECT, VIRTQ_DESC_F_NEXT as F_NEXT, VIRTQ_DESC_F_WRITE as F_WRITE};
use vutap_frontend::{Descriptor, DriverQueue, FrontendOptions, NetFrontend, VirtioNetHdr};

const WAIT: Duration = Duration::from_secs(5);
const QSIZE: u16 = 256;

fn opts(rx_prefill: bool) -> FrontendOptions {
    FrontendOptions { queue_pairs: 2, queue_size: QSIZE, rx_prefill, ..FrontendOptions::default() }
}

fn start() -> (std::sync::MutexGuard<'static, ()>, Bed) {
    capture_logs();
    let g = serial();
    (g, Bed::tap(2))
}

/// A descriptor index at the top of the table, away from the frontend's own chains.
fn top(i: u16) -> u16 {
    QSIZE - 1 - i
}

/// One frame out of `pair`, byte for byte at the far end.
fn tx_ok(bed: &Bed, fe: &mut NetFrontend, pair: u16, seq: u32) {
    let out = test_frame(bed.far_mac, bed.guest_mac, 600, seq);
    fe.send_frame(pair, &VirtioNetHdr::default(), &out).expect("send_frame");
    let got = bed.far.recv_matching(WAIT, |f| is_test_frame(f) && seq_of(f) == seq);
    assert!(got.as_deref() == Some(&out[..]), "TX on pair {pair} (seq {seq}) did not arrive intact");
}

/// One frame from the far end, received on whichever pair the tap steers it to.
fn rx_ok(bed: &Bed, fe: &mut NetFrontend, seq: u32) {
    let inb = test_frame(bed.guest_mac, bed.far_mac, 600, seq);
    bed.far.send(&inb);
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        for pair in 0..fe.queue_pairs() {
            if let Ok(Some(fr)) = fe.recv_frame(pair, Duration::from_millis(20)) {
                if fr.payload == inb {
                    return;
                }
            }
        }
    }
    panic!("RX frame seq {seq} never reached the guest");
}

/// TX on each of `tx_pairs`, and RX.
fn healthy(bed: &Bed, fe: &mut NetFrontend, tx_pairs: &[u16], seq: u32) {
    for (i, p) in tx_pairs.iter().enumerate() {
        tx_ok(bed, fe, *p, seq + i as u32);
    }
    rx_ok(bed, fe, seq + 100);
}

/// A fresh connection on the same daemon moves frames both ways on both pairs.
fn next_connection_works(bed: &Bed, seq: u32) {
    let mut fe = bed.daemon.connect(opts(true));
    healthy(bed, &mut fe, &[0, 1], seq);
}

/// Takes (id, len) of the used entries of `q` until there are `n` (or `WAIT` passed).
fn drain_used_until(q: &mut DriverQueue, n: usize) -> Vec<(u32, u32)> {
    let mut got = Vec::new();
    wait_until(WAIT, || {
        got.extend(std::iter::from_fn(|| q.pop_used()).map(|e| (e.id, e.len)));
        got.len() >= n
    });
    got
}

/// Puts `descs` in pair 0's TX table, makes `heads` available, kicks, and checks they come back
/// with length 0, counted as `bad` malformed chains, with `needle` logged; then that both
/// pairs and the next connection work.
fn tx_case(needle: &str, bad: u64, build: impl FnOnce(&DriverQueue, u64) -> (Vec<(u16, Descriptor)>, Vec<u16>)) {
    let (_g, bed) = start();
    let mut fe = bed.daemon.connect(opts(true));
    let mark = log_mark();
    let mem_size = fe.memory().size() as u64;
    let q = fe.queue_mut(tx_queue(0)).unwrap();
    let (descs, heads) = build(q, mem_size);
    q.add_raw_descriptors(&descs, &heads);
    q.kick().unwrap();
    assert!(
        wait_until(WAIT, || bed.daemon.total(|c| c.tx_bad_chains) == bad),
        "expected {bad} bad TX chains: {:?}\n{}",
        bed.daemon.dev.metrics[0].snapshot(),
        log_since(mark)
    );
    assert!(logged_since(mark, "malformed TX chain", WAIT), "no log line:\n{}", log_since(mark));
    assert!(logged_since(mark, needle, WAIT), "no log line with {needle:?}:\n{}", log_since(mark));
    assert_eq!(bed.daemon.total(|c| c.tx_frames), 0, "a bad chain reached the tap");
    let q = fe.queue_mut(tx_queue(0)).unwrap();
    let want: Vec<(u32, u32)> = heads.iter().map(|h| (u32::from(*h), 0)).collect();
    assert_eq!(drain_used_until(q, want.len()), want, "bad chains are returned, in order, with length 0");
    healthy(&bed, &mut fe, &[0, 1], 10);
    drop(fe);
    next_connection_works(&bed, 1000);
    assert!(!panicked_since(mark), "{}", log_since(mark));
}

// ------------------------------------------------------------------------------- TX chains

#[test]
fn test_hostile_tx_descriptor_outside_guest_memory() {
    tx_case("outside guest memory", 2, |_, mem| {
        let (a, b) = (top(0), top(1));
        (vec![(a, desc(mem + 0x10_0000, 100, 0, 0)), (b, desc(0xffff_ffff_0000, 100, 0, 0))], vec![a, b])
    });
}

#[test]
fn test_hostile_tx_descriptor_straddling_end_of_memory() {
    // The frontend's one region ends at `mem`: 50 bytes inside, 50 beyond.
    tx_case("outside guest memory", 1, |_, mem| (vec![(top(0), desc(mem - 50, 100, 0, 0))], vec![top(0)]));
}

#[test]
fn test_hostile_tx_length_overflows_u32_and_u64() {
    tx_case("malformed TX chain", 3, |q, _| {
        let s = q.slot_gpa(top(0));
        (
            vec![
                // u32 sum overflow: virtio-queue ends the walk at the second descriptor.
                (top(0), desc(s, u32::MAX - 10, F_NEXT, top(1))),
                (top(1), desc(s, 100, 0, 0)),
                // u64 address overflow.
                (top(2), desc(u64::MAX - 10, 100, 0, 0)),
                // Huge single length: more than a GSO frame.
                (top(3), desc(s, 0x7fff_ffff, 0, 0)),
            ],
            vec![top(0), top(2), top(3)],
        )
    });
}

#[test]
fn test_hostile_tx_descriptor_loops() {
    tx_case("cut short", 2, |q, _| {
        let s = q.slot_gpa(top(0));
        (
            vec![(top(0), desc(s, 100, F_NEXT, top(0))), (top(1), desc(s, 100, F_NEXT, top(2))), (top(2), desc(s, 100, F_NEXT, top(1)))],
            vec![top(0), top(1)],
        )
    });
}

#[test]
fn test_hostile_tx_chain_longer_than_queue_and_bad_next() {
    tx_case("malformed TX chain", 2, |q, _| {
        // An indirect table of QSIZE + 1 entries, in a data slot.
        let table = q.slot_gpa(top(3));
        let s = q.slot_gpa(top(4));
        let n = u32::from(QSIZE) + 1;
        for i in 0..n {
            let last = i + 1 == n;
            let d = desc(s, 12, if last { 0 } else { F_NEXT }, (i + 1) as u16);
            assert!(q.memory().write(table + 16 * u64::from(i), &d.to_bytes()));
        }
        (
            vec![
                (top(0), desc(table, 16 * n, F_INDIRECT, 0)),
                // next index past the table.
                (top(1), desc(s, 100, F_NEXT, 4000)),
            ],
            vec![top(0), top(1)],
        )
    });
}

#[test]
fn test_hostile_tx_write_only_descriptor() {
    tx_case("writable", 1, |q, _| {
        let s = q.slot_gpa(top(0));
        (vec![(top(0), desc(s, 12, F_NEXT, top(1))), (top(1), desc(s, 100, F_WRITE, 0))], vec![top(0)])
    });
}

#[test]
fn test_hostile_tx_frame_shorter_than_header() {
    tx_case("fewer than the 12", 2, |q, _| {
        let s = q.slot_gpa(top(0));
        // 8 bytes; and only zero-length descriptors.
        (vec![(top(0), desc(s, 8, 0, 0)), (top(1), desc(s, 0, F_NEXT, top(2))), (top(2), desc(s, 0, 0, 0))], vec![top(0), top(1)])
    });
}

#[test]
fn test_hostile_tx_bad_indirect_tables() {
    tx_case("malformed TX chain", 4, |q, mem| {
        let s = q.slot_gpa(top(5));
        let t1 = q.slot_gpa(top(6));
        let t2 = q.slot_gpa(top(7));
        // t1: a nested indirect descriptor.
        assert!(q.memory().write(t1, &desc(t2, 16, F_INDIRECT, 0).to_bytes()));
        // t2: one valid entry.
        assert!(q.memory().write(t2, &desc(s, 100, 0, 0).to_bytes()));
        (
            vec![
                // Length not a multiple of 16.
                (top(0), desc(t2, 20, F_INDIRECT, 0)),
                // Nested indirect.
                (top(1), desc(t1, 16, F_INDIRECT, 0)),
                // Table outside guest memory.
                (top(2), desc(mem + 4096, 64, F_INDIRECT, 0)),
                // A direct descriptor chained to an indirect one with an odd table.
                (top(3), desc(s, 12, F_NEXT, top(4))),
                (top(4), desc(t2, 24, F_INDIRECT, 0)),
            ],
            vec![top(0), top(1), top(2), top(3)],
        )
    });
}

#[test]
fn test_hostile_tx_zero_length_descriptors_are_legal() {
    let (_g, bed) = start();
    let mut fe = bed.daemon.connect(opts(true));
    let frame = test_frame(bed.far_mac, bed.guest_mac, 200, 77);
    let q = fe.queue_mut(tx_queue(0)).unwrap();
    let s = q.slot_gpa(top(0));
    let mut bytes = vec![0u8; 12];
    bytes.extend_from_slice(&frame);
    assert!(q.memory().write(s, &bytes));
    let (a, b, c) = (top(0), top(1), top(2));
    q.add_raw_descriptors(&[(a, desc(s, 0, F_NEXT, b)), (b, desc(s, bytes.len() as u32, F_NEXT, c)), (c, desc(s, 0, 0, 0))], &[a]);
    q.kick().unwrap();
    let got = bed.far.recv_matching(WAIT, |f| is_test_frame(f) && seq_of(f) == 77);
    assert!(got.as_deref() == Some(&frame[..]), "a chain with zero-length descriptors is a valid frame");
    assert_eq!(drain_used_until(q, 1), vec![(u32::from(a), 0)]);
    healthy(&bed, &mut fe, &[0, 1], 10);
    drop(fe);
    bed.daemon.wait_connections_ended(1);
    assert_eq!(bed.daemon.total(|c| c.tx_bad_chains), 0);
}

#[test]
fn test_hostile_tx_avail_index_jump_stops_only_that_ring() {
    let (_g, bed) = start();
    let other = Bed::tap(1); // another device in the same process
    let mut other_fe = other.daemon.connect(FrontendOptions::default());
    let mut fe = bed.daemon.connect(opts(true));
    let mark = log_mark();
    let q = fe.queue_mut(tx_queue(0)).unwrap();
    q.set_avail_idx_raw(QSIZE + 7);
    q.kick().unwrap();
    assert!(wait_until(WAIT, || bed.daemon.total(|c| c.rings_broken) == 1), "{}", log_since(mark));
    assert!(logged_since(mark, "TX ring broken", WAIT), "{}", log_since(mark));
    // Kicks on the broken ring wake the worker but it does nothing: no spinning.
    let kick = q.kick_fd().try_clone().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let kicker = std::thread::spawn(move || {
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = kick.write(1);
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let cpu = cpu_share("vutap-q", Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    kicker.join().unwrap();
    assert!(cpu < 0.2, "workers used {:.0}% of a CPU with a broken ring", cpu * 100.0);
    assert_eq!(bed.daemon.total(|c| c.tx_frames), 0);
    // RX of the same pair, TX of the other pair, and the other device are unaffected.
    healthy(&bed, &mut fe, &[1], 10);
    healthy(&other, &mut other_fe, &[0], 20);
    drop(fe);
    next_connection_works(&bed, 1000);
    assert!(!panicked_since(mark));
}

// ------------------------------------------------------------------------------- RX chains

/// RX cases: no prefill, raw chains on pair 0's RX ring, then real buffers.
fn rx_case(needle: &str, bad: u64, build: impl FnOnce(&DriverQueue, u64) -> (Vec<(u16, Descriptor)>, Vec<u16>)) {
    let (_g, bed) = start();
    let mut fe = bed.daemon.connect(opts(false));
    let mark = log_mark();
    let mem_size = fe.memory().size() as u64;
    let q = fe.queue_mut(rx_queue(0)).unwrap();
    let (descs, heads) = build(q, mem_size);
    q.add_raw_descriptors(&descs, &heads);
    q.kick().unwrap();
    assert!(
        wait_until(WAIT, || bed.daemon.total(|c| c.rx_bad_chains) == bad),
        "expected {bad} bad RX chains: {:?}\n{}",
        bed.daemon.dev.metrics[0].snapshot(),
        log_since(mark)
    );
    assert!(logged_since(mark, "malformed RX chain", WAIT), "{}", log_since(mark));
    assert!(logged_since(mark, needle, WAIT), "no log line with {needle:?}:\n{}", log_since(mark));
    let q = fe.queue_mut(rx_queue(0)).unwrap();
    let want: Vec<(u32, u32)> = heads.iter().map(|h| (u32::from(*h), 0)).collect();
    assert_eq!(drain_used_until(q, want.len()), want, "bad chains are returned, in order, with length 0");
    for pair in 0..2 {
        fe.post_rx_buffers(pair, 64).unwrap();
    }
    healthy(&bed, &mut fe, &[0, 1], 10);
    drop(fe);
    next_connection_works(&bed, 1000);
    assert!(!panicked_since(mark));
}

#[test]
fn test_hostile_rx_read_only_descriptor() {
    rx_case("readable", 1, |q, _| (vec![(top(0), desc(q.slot_gpa(top(0)), 2048, 0, 0))], vec![top(0)]));
}

#[test]
fn test_hostile_rx_outside_memory_loop_and_short() {
    rx_case("malformed RX chain", 4, |q, mem| {
        let s = q.slot_gpa(top(0));
        (
            vec![
                (top(0), desc(mem - 100, 2048, F_WRITE, 0)),
                (top(1), desc(s, 2048, F_WRITE | F_NEXT, top(1))),
                (top(2), desc(s, 4, F_WRITE, 0)),
                (top(3), desc(s, 100, F_WRITE | F_NEXT, top(4))),
                (top(4), desc(s, 100, 0, 0)),
            ],
            vec![top(0), top(1), top(2), top(3)],
        )
    });
}

#[test]
fn test_hostile_rx_avail_index_jump_stops_only_that_ring() {
    let (_g, bed) = start();
    let mut fe = bed.daemon.connect(opts(false));
    let mark = log_mark();
    let q = fe.queue_mut(rx_queue(0)).unwrap();
    q.set_avail_idx_raw(QSIZE * 2 + 1);
    q.kick().unwrap();
    assert!(wait_until(WAIT, || bed.daemon.total(|c| c.rings_broken) == 1), "{}", log_since(mark));
    assert!(logged_since(mark, "RX ring broken", WAIT));
    let cpu = cpu_share("vutap-q", Duration::from_millis(500));
    assert!(cpu < 0.2, "workers used {:.0}% of a CPU with a broken RX ring", cpu * 100.0);
    // TX on the same pair still goes out.
    tx_ok(&bed, &mut fe, 0, 5);
    tx_ok(&bed, &mut fe, 1, 6);
    drop(fe);
    next_connection_works(&bed, 1000);
}

// ------------------------------------------------------------------------------- messages

/// A live, healthy connection and a raw dup of its socket.
fn live(bed: &Bed) -> (NetFrontend, std::os::fd::OwnedFd) {
    let mut fe = bed.daemon.connect(opts(true));
    healthy(bed, &mut fe, &[0, 1], 1);
    let raw = conn_fd(fe.vhost());
    (fe, raw)
}

/// Sends a request asking for an ack and expects a failure ack (connection kept).
fn refused(fd: RawFd, code: FrontendReq, body: &[u8], fds: &[RawFd]) {
    raw_send(fd, code, NEED_REPLY, body.len() as u32, body, fds).unwrap();
    match raw_reply(fd, WAIT) {
        Reply::U64(v) if v != 0 => {}
        r => panic!("{code:?}: expected a failure ack, got {r:?}"),
    }
}

#[test]
fn test_hostile_msg_queue_size_zero_odd_or_too_big() {
    let (_g, bed) = start();
    let (mut fe, raw) = live(&bed);
    let mark = log_mark();
    for num in [0u32, 3, 100, 65536] {
        refused(raw.as_raw_fd(), FrontendReq::SET_VRING_NUM, &words(&[1, num]), &[]);
    }
    assert!(logged_since(mark, "is not a power of two", WAIT), "{}", log_since(mark));
    healthy(&bed, &mut fe, &[0, 1], 10);
    drop((fe, raw));
    next_connection_works(&bed, 1000);
}

#[test]
fn test_hostile_msg_vring_index_out_of_range() {
    let (_g, bed) = start();
    let (mut fe, raw) = live(&bed);
    let mark = log_mark();
    refused(raw.as_raw_fd(), FrontendReq::SET_VRING_NUM, &words(&[99, 256]), &[]);
    refused(raw.as_raw_fd(), FrontendReq::SET_VRING_ENABLE, &words(&[99, 1]), &[]);
    refused(raw.as_raw_fd(), FrontendReq::SET_VRING_BASE, &words(&[4, 0]), &[]);
    assert!(logged_since(mark, "failed", WAIT), "{}", log_since(mark));
    healthy(&bed, &mut fe, &[0, 1], 10);
    drop((fe, raw));
    next_connection_works(&bed, 1000);
}

#[test]
fn test_hostile_msg_mem_table_overlapping_regions() {
    let (_g, bed) = start();
    let (mut fe, raw) = live(&bed);
    let mark = log_mark();
    let (a, b) = (memfd(1 << 20), memfd(1 << 20));
    let body = mem_table(&[(0, 1 << 20, 0x7000_0000_0000), (0x8_0000, 1 << 20, 0x7100_0000_0000)]);
    refused(raw.as_raw_fd(), FrontendReq::SET_MEM_TABLE, &body, &[a.as_raw_fd(), b.as_raw_fd()]);
    assert!(logged_since(mark, "overlap", WAIT), "{}", log_since(mark));
    // The old table stays in force.
    healthy(&bed, &mut fe, &[0, 1], 10);
    drop((fe, raw));
    next_connection_works(&bed, 1000);
}

#[test]
fn test_hostile_msg_mem_table_too_many_regions() {
    let (_g, bed) = start();
    let (mut fe, raw) = live(&bed);
    let mark = log_mark();
    let files: Vec<_> = (0..9).map(|_| memfd(1 << 16)).collect();
    let regions: Vec<_> = (0..9u64).map(|i| (i << 20, 1 << 16, 0x7000_0000_0000 + (i << 20))).collect();
    let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
    refused(raw.as_raw_fd(), FrontendReq::SET_MEM_TABLE, &mem_table(&regions), &fds);
    assert!(logged_since(mark, "more than 8", WAIT), "{}", log_since(mark));
    healthy(&bed, &mut fe, &[0, 1], 10);
    drop((fe, raw));
    next_connection_works(&bed, 1000);
}

#[test]
fn test_hostile_msg_truncated_closes_connection() {
    let (_g, bed) = start();
    let mark = log_mark();
    let (ended, errors) = (bed.daemon.connections_ended(), bed.daemon.protocol_errors());
    // A body shorter than the request's struct, on a live connection.
    let (fe, raw) = live(&bed);
    raw_send(raw.as_raw_fd(), FrontendReq::SET_VRING_NUM, NEED_REPLY, 4, &words(&[1]), &[]).unwrap();
    assert!(closed_within(raw.as_raw_fd(), WAIT), "a truncated message must close the connection");
    drop((fe, raw));
    // A header announcing 8 bytes, 4 sent, then the frontend goes away.
    let s = UnixStream::connect(&bed.daemon.socket).unwrap();
    raw_send(s.as_raw_fd(), FrontendReq::SET_OWNER, NO_REPLY, 0, &[], &[]).unwrap();
    raw_send(s.as_raw_fd(), FrontendReq::SET_VRING_NUM, NO_REPLY, 8, &words(&[1]), &[]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(closed_within(s.as_raw_fd(), WAIT));
    drop(s);
    // vutap itself finished both connections, the first for breaking the protocol.
    bed.daemon.wait_connections_ended(ended + 2);
    assert!(bed.daemon.protocol_errors() > errors, "the truncated body counts as a protocol error");
    assert!(logged_since(mark, "closing connection", WAIT), "{}", log_since(mark));
    next_connection_works(&bed, 1000);
    assert!(!panicked_since(mark));
}

#[test]
fn test_hostile_msg_missing_fds_close_connection() {
    let (_g, bed) = start();
    let mark = log_mark();
    // vhost cannot tell a missing fd from garbage (the fd count is part of the message), so
    // the connection is closed: a mem table of one region with no fd ...
    let (fe, raw) = live(&bed);
    raw_send(raw.as_raw_fd(), FrontendReq::SET_MEM_TABLE, NEED_REPLY, 40, &mem_table(&[(0, 1 << 20, 0x7000_0000_0000)]), &[]).unwrap();
    assert!(closed_within(raw.as_raw_fd(), WAIT));
    drop((fe, raw));
    // ... and a kick without an fd and without the no-fd flag.
    let (fe, raw) = live(&bed);
    raw_send(raw.as_raw_fd(), FrontendReq::SET_VRING_KICK, NEED_REPLY, 8, &1u64.to_le_bytes(), &[]).unwrap();
    assert!(closed_within(raw.as_raw_fd(), WAIT));
    drop((fe, raw));
    assert!(logged_since(mark, "request 5: invalid message", WAIT), "{}", log_since(mark));
    assert!(logged_since(mark, "request 12:", WAIT), "{}", log_since(mark));
    next_connection_works(&bed, 1000);
    assert!(!panicked_since(mark));
}

#[test]
fn test_hostile_msg_extra_fds_close_connection_and_leak_nothing() {
    let (_g, bed) = start();
    let before = fd_count();
    let mark = log_mark();
    let errors = bed.daemon.protocol_errors();
    {
        let (fe, raw) = live(&bed);
        let extra: Vec<_> = (0..3).map(|_| memfd(4096)).collect();
        let fds: Vec<RawFd> = extra.iter().map(|f| f.as_raw_fd()).collect();
        raw_send(raw.as_raw_fd(), FrontendReq::GET_FEATURES, NO_REPLY, 0, &[], &fds).unwrap();
        assert!(closed_within(raw.as_raw_fd(), WAIT), "fds on GET_FEATURES must close the connection");
        drop((fe, raw));
    }
    // vutap closed the connection itself, as a protocol error, and said so.
    assert!(wait_until(WAIT, || bed.daemon.protocol_errors() == errors + 1), "protocol errors: {}", bed.daemon.protocol_errors());
    assert!(logged_since(mark, "closing connection", WAIT), "{}", log_since(mark));
    next_connection_works(&bed, 1000);
    // Every fd the daemon received was closed with the connection.
    assert!(wait_until(WAIT, || fd_count() <= before), "fds: {} before, {} after", before, fd_count());
}

#[test]
fn test_hostile_msg_before_set_owner_closes_connection() {
    let (_g, bed) = start();
    let mark = log_mark();
    let s = UnixStream::connect(&bed.daemon.socket).unwrap();
    // Discovery is fine before SET_OWNER ...
    raw_send(s.as_raw_fd(), FrontendReq::GET_FEATURES, NO_REPLY, 0, &[], &[]).unwrap();
    assert!(matches!(raw_reply(s.as_raw_fd(), WAIT), Reply::U64(f) if f != 0));
    // ... ring setup is not.
    raw_send(s.as_raw_fd(), FrontendReq::SET_VRING_NUM, NO_REPLY, 8, &words(&[0, 256]), &[]).unwrap();
    assert!(closed_within(s.as_raw_fd(), WAIT));
    assert!(logged_since(mark, "before SET_OWNER", WAIT), "{}", log_since(mark));
    drop(s);
    next_connection_works(&bed, 1000);
}

#[test]
fn test_hostile_msg_unknown_request_closes_connection() {
    let (_g, bed) = start();
    let mark = log_mark();
    let (fe, raw) = live(&bed);
    raw_send(raw.as_raw_fd(), 9999u32, NO_REPLY, 12, &words(&[1, 1, 0]), &[]).unwrap();
    assert!(closed_within(raw.as_raw_fd(), WAIT));
    drop((fe, raw));
    assert!(logged_since(mark, "9999", WAIT), "{}", log_since(mark));
    next_connection_works(&bed, 1000);
}

#[test]
fn test_hostile_kick_storm_then_idle() {
    let (_g, bed) = start();
    let (mut fe, _raw) = live(&bed);
    let kicks: Vec<_> =
        [rx_queue(0), tx_queue(0), rx_queue(1), tx_queue(1)].iter().map(|q| fe.queue(*q).unwrap().kick_fd().try_clone().unwrap()).collect();
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < Duration::from_millis(500) {
        for k in &kicks {
            let _ = k.write(1);
            n += 1;
        }
    }
    healthy(&bed, &mut fe, &[0, 1], 10);
    // The workers that took the storm run under the seccomp worker filter (mode 2).
    assert_eq!(seccomp_modes("vutap-q"), vec![2, 2]);
    let cpu = cpu_share("vutap-q", Duration::from_secs(1));
    assert!(cpu < 0.05, "workers used {:.0}% of a CPU after a {n}-kick storm", cpu * 100.0);
}

#[test]
fn test_hostile_call_fd_storm_leaks_nothing() {
    let (_g, bed) = start();
    let (mut fe, raw) = live(&bed);
    let before = fd_count();
    for i in 0..500u64 {
        let e = vmm_sys_util_eventfd();
        raw_send(raw.as_raw_fd(), FrontendReq::SET_VRING_CALL, NO_REPLY, 8, &(i % 4).to_le_bytes(), &[e.as_raw_fd()]).unwrap();
    }
    // Give the calls back to the frontend.
    for q in 0..4u16 {
        let own = fe.queue(q).unwrap().call_fd().as_raw_fd();
        refused_or_ok(raw.as_raw_fd(), FrontendReq::SET_VRING_CALL, &u64::from(q).to_le_bytes(), &[own]);
    }
    assert!(wait_until(WAIT, || fd_count() <= before), "fds: {} before, {} after", before, fd_count());
    healthy(&bed, &mut fe, &[0, 1], 10);
}

fn vmm_sys_util_eventfd() -> std::os::fd::OwnedFd {
    // SAFETY: plain eventfd(2); the result is checked and owned below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0);
    // SAFETY: fresh fd we own.
    unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
}

/// Sends with NEED_REPLY and expects a success ack.
fn refused_or_ok(fd: RawFd, code: FrontendReq, body: &[u8], fds: &[RawFd]) {
    raw_send(fd, code, NEED_REPLY, body.len() as u32, body, fds).unwrap();
    assert_eq!(raw_reply(fd, WAIT), Reply::U64(0), "{code:?}");
}
