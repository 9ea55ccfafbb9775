//! Findings of the fuzz targets (`fuzz/`, `scripts/fuzz.sh`), replayed end to end against an
//! in-process daemon on a real tap: the refusal is acked, logged, and the connection, its
//! rings and the next connection keep working.
//!
//! Needs root; run with `cargo test -p vutap-tests --test fuzz_findings`.

mod common;
mod hardening_util;

use std::os::fd::AsRawFd;
use std::time::Duration;

use common::*;
use hardening_util::*;
use vhost::vhost_user::message::FrontendReq;
use vutap_frontend::{FrontendOptions, NetFrontend, VirtioNetHdr};

const WAIT: Duration = Duration::from_secs(5);

fn start() -> (std::sync::MutexGuard<'static, ()>, Bed) {
    capture_logs();
    let g = serial();
    (g, Bed::tap(1))
}

fn opts() -> FrontendOptions {
    FrontendOptions { queue_pairs: 1, queue_size: 256, rx_prefill: true, ..FrontendOptions::default() }
}

/// One frame out of pair 0, byte for byte at the far end.
fn tx_ok(bed: &Bed, fe: &mut NetFrontend, seq: u32) {
    let out = test_frame(bed.far_mac, bed.guest_mac, 600, seq);
    fe.send_frame(0, &VirtioNetHdr::default(), &out).expect("send_frame");
    let got = bed.far.recv_matching(WAIT, |f| is_test_frame(f) && seq_of(f) == seq);
    assert!(got.as_deref() == Some(&out[..]), "TX frame seq {seq} did not arrive intact");
}

/// A memory region larger than the memfd behind it: mmap accepts it, and the first touch past
/// the file's end (the used-ring read when the rings restart on the new table) was a SIGBUS
/// that killed the daemon. Now the table is refused before anything is mapped and the
/// connection is closed (a frontend that lies about its memory is not trusted further); the
/// next connection is served.
#[test]
fn test_fuzz_finding_mem_region_past_end_of_file_is_refused() {
    let (_g, bed) = start();
    let mut fe = bed.daemon.connect(opts());
    tx_ok(&bed, &mut fe, 1);
    let raw = conn_fd(fe.vhost());
    let mark = log_mark();
    let (errors, bad_fds) =
        (bed.daemon.protocol_errors(), bed.daemon.dev.device_metrics.bad_memory_fds.load(std::sync::atomic::Ordering::SeqCst));
    let small = memfd(0x1000);
    let body = mem_table(&[(0, fe.memory().size() as u64, 0x7000_0000_0000)]);
    raw_send(raw.as_raw_fd(), FrontendReq::SET_MEM_TABLE, NEED_REPLY, body.len() as u32, &body, &[small.as_raw_fd()]).unwrap();
    assert!(closed_within(raw.as_raw_fd(), WAIT), "a lying memory table must close the connection");
    assert!(logged_since(mark, "the fd holds 4096 bytes but the mapping needs", WAIT), "{}", log_since(mark));
    assert!(wait_until(WAIT, || bed.daemon.protocol_errors() == errors + 1), "counted as a protocol error");
    assert_eq!(bed.daemon.dev.device_metrics.bad_memory_fds.load(std::sync::atomic::Ordering::SeqCst), bad_fds + 1);
    drop((fe, raw));
    let mut next = bed.daemon.connect(opts());
    tx_ok(&bed, &mut next, 3);
    assert!(!panicked_since(mark), "{}", log_since(mark));
}
